//! The config's strict reader over the span-aware YAML tree: every problem is collected as a
//! `Diagnostic` with the node's line, column and field path, and decoding goes on so that one
//! run reports every mistake of the file.

use std::time::Duration;

use policy::yaml::{self, Node, Value};
use policy::{Diagnostic, Span};

/// The config's decoder: the policy crate's strict decoder (unknown fields with suggestions,
/// type errors, field paths), with paths written as strings and the few readers the config
/// needs beyond it (free-form label maps, durations, parsed strings).
pub struct Decoder {
    inner: yaml::Decoder,
}

/// The fields of one mapping, looked up by name after unknown keys were reported.
pub struct Fields<'n> {
    entries: Vec<(&'static str, &'n Node)>,
}

impl<'n> Fields<'n> {
    pub fn get(&self, name: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
    }
}

/// `parent.child`, or `child` at the top.
pub fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_string()
    } else {
        format!("{parent}.{child}")
    }
}

pub fn index(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

fn path(p: &str) -> yaml::Path {
    yaml::Path::root().key(p)
}

impl Decoder {
    pub fn new(file: &str) -> Decoder {
        Decoder {
            inner: yaml::Decoder::new(file),
        }
    }

    pub fn error(&mut self, span: Span, p: &str, message: impl Into<String>) {
        self.inner.error(span, &path(p), message);
    }

    pub fn has_errors(&self) -> bool {
        self.inner.has_errors()
    }

    /// Every diagnostic, in file order.
    pub fn into_diagnostics(self) -> Vec<Diagnostic> {
        self.inner.into_diagnostics()
    }

    fn expected(&mut self, node: &Node, p: &str, what: &str) {
        let found = node.value.type_name();
        self.error(node.span, p, format!("expected {what}, found {found}"));
    }

    /// A mapping whose keys must all be in `known` (unknown keys are reported at the key,
    /// with a suggestion when one is close); `null` (an empty section such as `host:`) is an
    /// empty mapping.
    pub fn fields<'n>(
        &mut self,
        node: &'n Node,
        p: &str,
        known: &[&'static str],
    ) -> Option<Fields<'n>> {
        let mut reader = self.inner.expect_map(node, &path(p))?;
        let entries = known
            .iter()
            .filter_map(|k| reader.take(k).map(|v| (*k, v)))
            .collect();
        reader.finish(&mut self.inner);
        Some(Fields { entries })
    }

    /// A mapping with free-form string keys (labels, named ports, namespaces). Repeated keys
    /// are already refused by the loader.
    pub fn map<'n>(&mut self, node: &'n Node, p: &str) -> Vec<(&'n Node, &'n str, &'n Node)> {
        let pairs = match &node.value {
            Value::Map(pairs) => pairs.as_slice(),
            Value::Null => &[],
            _ => {
                self.expected(node, p, "a map");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for (k, v) in pairs {
            match &k.value {
                Value::Str(key) => out.push((k, key.as_str(), v)),
                _ => self.expected(k, p, "a string key"),
            }
        }
        out
    }

    pub fn seq<'n>(&mut self, node: &'n Node, p: &str) -> &'n [Node] {
        self.inner.expect_seq(node, &path(p)).unwrap_or(&[])
    }

    pub fn string(&mut self, node: &Node, p: &str) -> Option<String> {
        self.inner.expect_str(node, &path(p)).map(str::to_string)
    }

    /// A label value: Kubernetes only has string values, but a bare `true` or `1` in YAML is
    /// what people write, so scalars are accepted in their written form.
    pub fn scalar_string(&mut self, node: &Node, p: &str) -> Option<String> {
        match &node.value {
            Value::Str(s) => Some(s.clone()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Int(i) => Some(i.to_string()),
            Value::Null => Some(String::new()),
            _ => {
                self.expected(node, p, "a string");
                None
            }
        }
    }

    pub fn bool(&mut self, node: &Node, p: &str) -> Option<bool> {
        self.inner.expect_bool(node, &path(p))
    }

    pub fn uint(&mut self, node: &Node, p: &str, max: u64) -> Option<u64> {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        self.inner
            .expect_int_in(node, &path(p), 0, max)
            .map(|i| i as u64)
    }

    /// `100ms`, `10s`, `2m`, `1h`, `500us`; a bare integer is seconds.
    pub fn duration(&mut self, node: &Node, p: &str) -> Option<Duration> {
        match &node.value {
            Value::Int(i) if *i >= 0 => Some(Duration::from_secs(*i as u64)),
            Value::Str(s) => match parse_duration(s) {
                Ok(d) => Some(d),
                Err(e) => {
                    self.error(node.span, p, e);
                    None
                }
            },
            _ => {
                self.expected(node, p, "a duration such as `100ms` or `10s`");
                None
            }
        }
    }

    /// A string parsed by `f`; its error message is reported at the node.
    pub fn parsed<T>(
        &mut self,
        node: &Node,
        p: &str,
        f: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let s = self.string(node, p)?;
        match f(&s) {
            Ok(v) => Some(v),
            Err(e) => {
                self.error(node.span, p, e);
                None
            }
        }
    }

    pub fn string_list(&mut self, node: &Node, p: &str) -> Vec<(Span, String, String)> {
        let items = self.seq(node, p);
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let ip = index(p, i);
            if let Some(s) = self.string(item, &ip) {
                out.push((item.span, ip, s));
            }
        }
        out
    }
}

/// Parses `100ms`, `1.5s`, `10s`, `2m`, `1h`, `250us`, `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}; write e.g. `100ms` or `10s`"))?;
    let scale = match unit {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "" if value == 0.0 => 0.0,
        _ => {
            return Err(format!(
                "invalid duration {s:?}: unit must be one of ns, us, ms, s, m, h"
            ))
        }
    };
    let secs = value * scale;
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("duration {s:?} is too long"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("10 parsecs").is_err());
    }
}
