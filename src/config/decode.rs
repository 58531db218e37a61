//! A small strict decoder over the span-aware YAML tree: every problem is collected as a
//! `Diagnostic` with the node's line, column and field path, and decoding goes on so that one
//! run reports every mistake of the file.

use std::sync::Arc;
use std::time::Duration;

use policy::yaml::{Node, Value};
use policy::{Diagnostic, Span};

pub struct Decoder {
    pub file: Arc<str>,
    pub diags: Vec<Diagnostic>,
}

/// The fields of one mapping, looked up by name after unknown and repeated keys were reported.
pub struct Fields<'n> {
    entries: Vec<(&'n str, &'n Node)>,
}

impl<'n> Fields<'n> {
    pub fn get(&self, name: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
    }
}

/// The message for an unknown field, worded as the policy parser words it: a suggestion when a
/// known field is close (a typo or a case slip), else the list of known fields.
pub fn unknown_field(name: &str, known: &[&str]) -> String {
    match known
        .iter()
        .find(|k| k.eq_ignore_ascii_case(name) || edit_distance(k, name) <= 2)
    {
        Some(close) => format!("unknown field `{name}` (did you mean `{close}`?)"),
        None => format!(
            "unknown field `{name}`; expected one of: {}",
            known.join(", ")
        ),
    }
}

/// Levenshtein distance (fields are short; quadratic is fine).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
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

pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Int(_) => "an integer",
        Value::Float(_) => "a number",
        Value::Str(_) => "a string",
        Value::Seq(_) => "a list",
        Value::Map(_) => "a mapping",
    }
}

impl Decoder {
    pub fn new(file: &str) -> Decoder {
        Decoder {
            file: Arc::from(file),
            diags: Vec::new(),
        }
    }

    pub fn error(&mut self, span: Span, path: &str, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            file: self.file.clone(),
            span,
            path: path.to_string(),
            message: message.into(),
        });
    }

    fn expected(&mut self, node: &Node, path: &str, what: &str) {
        let got = kind_of(&node.value);
        self.error(node.span, path, format!("expected {what}, found {got}"));
    }

    /// A mapping whose keys must all be in `known`. Unknown keys and repeated keys are
    /// reported at the key; `null` (an empty section such as `host:`) is an empty mapping.
    pub fn fields<'n>(&mut self, node: &'n Node, path: &str, known: &[&str]) -> Option<Fields<'n>> {
        let pairs = match &node.value {
            Value::Map(pairs) => pairs.as_slice(),
            Value::Null => &[],
            _ => {
                self.expected(node, path, "a mapping");
                return None;
            }
        };
        let mut entries: Vec<(&'n str, &'n Node)> = Vec::new();
        for (k, v) in pairs {
            let Value::Str(key) = &k.value else {
                self.expected(k, path, "a string key");
                continue;
            };
            if !known.contains(&key.as_str()) {
                self.error(k.span, &join(path, key), unknown_field(key, known));
                continue;
            }
            if entries.iter().any(|(seen, _)| *seen == key.as_str()) {
                self.error(k.span, &join(path, key), "field given twice");
                continue;
            }
            entries.push((key.as_str(), v));
        }
        Some(Fields { entries })
    }

    /// A mapping with free-form string keys (labels, named ports, namespaces).
    pub fn map<'n>(&mut self, node: &'n Node, path: &str) -> Vec<(&'n Node, &'n str, &'n Node)> {
        let pairs = match &node.value {
            Value::Map(pairs) => pairs.as_slice(),
            Value::Null => &[],
            _ => {
                self.expected(node, path, "a mapping");
                return Vec::new();
            }
        };
        let mut out: Vec<(&'n Node, &'n str, &'n Node)> = Vec::new();
        for (k, v) in pairs {
            let Value::Str(key) = &k.value else {
                self.expected(k, path, "a string key");
                continue;
            };
            if out.iter().any(|(_, seen, _)| *seen == key.as_str()) {
                self.error(k.span, &join(path, key), "key given twice");
                continue;
            }
            out.push((k, key.as_str(), v));
        }
        out
    }

    pub fn seq<'n>(&mut self, node: &'n Node, path: &str) -> &'n [Node] {
        match &node.value {
            Value::Seq(items) => items.as_slice(),
            Value::Null => &[],
            _ => {
                self.expected(node, path, "a list");
                &[]
            }
        }
    }

    pub fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.value {
            Value::Str(s) => Some(s.clone()),
            _ => {
                self.expected(node, path, "a string");
                None
            }
        }
    }

    /// A label value: Kubernetes only has string values, but a bare `true` or `1` in YAML is
    /// what people write, so scalars are accepted in their written form.
    pub fn scalar_string(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.value {
            Value::Str(s) => Some(s.clone()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Int(i) => Some(i.to_string()),
            Value::Null => Some(String::new()),
            _ => {
                self.expected(node, path, "a string");
                None
            }
        }
    }

    pub fn bool(&mut self, node: &Node, path: &str) -> Option<bool> {
        match &node.value {
            Value::Bool(b) => Some(*b),
            _ => {
                self.expected(node, path, "true or false");
                None
            }
        }
    }

    pub fn uint(&mut self, node: &Node, path: &str, max: u64) -> Option<u64> {
        match &node.value {
            Value::Int(i) if *i >= 0 && (*i as u64) <= max => Some(*i as u64),
            Value::Int(i) => {
                self.error(node.span, path, format!("{i} is out of range (0 to {max})"));
                None
            }
            _ => {
                self.expected(node, path, "a non-negative integer");
                None
            }
        }
    }

    /// `100ms`, `10s`, `2m`, `1h`, `500us`; a bare integer is seconds.
    pub fn duration(&mut self, node: &Node, path: &str) -> Option<Duration> {
        match &node.value {
            Value::Int(i) if *i >= 0 => Some(Duration::from_secs(*i as u64)),
            Value::Str(s) => match parse_duration(s) {
                Ok(d) => Some(d),
                Err(e) => {
                    self.error(node.span, path, e);
                    None
                }
            },
            _ => {
                self.expected(node, path, "a duration such as `100ms` or `10s`");
                None
            }
        }
    }

    /// A string parsed by `f`; its error message is reported at the node.
    pub fn parsed<T>(
        &mut self,
        node: &Node,
        path: &str,
        f: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let s = self.string(node, path)?;
        match f(&s) {
            Ok(v) => Some(v),
            Err(e) => {
                self.error(node.span, path, e);
                None
            }
        }
    }

    pub fn string_list(&mut self, node: &Node, path: &str) -> Vec<(Span, String, String)> {
        let items = self.seq(node, path);
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = index(path, i);
            if let Some(s) = self.string(item, &p) {
                out.push((item.span, p, s));
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

    #[test]
    fn unknown_fields_suggest_the_close_one() {
        let known = ["listen", "upstreams"];
        assert_eq!(
            unknown_field("upstream", &known),
            "unknown field `upstream` (did you mean `upstreams`?)"
        );
        assert_eq!(
            unknown_field("Listen", &known),
            "unknown field `Listen` (did you mean `listen`?)"
        );
        assert_eq!(
            unknown_field("servers", &known),
            "unknown field `servers`; expected one of: listen, upstreams"
        );
    }
}
