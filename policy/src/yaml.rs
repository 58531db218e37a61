//! Span-aware YAML (and JSON) document tree: every node knows its line and column.
//!
//! Built from yaml-rust2's marked event parser rather than its `Yaml` tree because that tree
//! forgets positions, silently keeps the last of duplicate keys and turns bad values into
//! `BadValue`; a firewall's policy loader must point at the exact place of every problem.
//! JSON files go through the same loader (JSON is YAML 1.2 flow syntax).
//!
//! Scalars are resolved with the YAML 1.2 core schema (`true`/`false`, `null`/`~`/empty,
//! integers, floats); quoted scalars are always strings. Anchors and aliases are resolved by
//! copying the anchored node (bounded, so an alias bomb is an error, not an out-of-memory).
//! Merge keys (`<<`) and application tags (`!foo`) are rejected with a clear message.
//!
//! [`Decoder`] is the strict reader on top of the tree, shared by the policy parser and the
//! agent's configuration loader: it reads maps with unknown-field detection, checks types and
//! collects [`Diagnostic`]s with field paths instead of stopping at the first problem.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::error::{Diagnostic, Span};

/// One node of a document with the position where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub span: Span,
    pub value: Value,
}

/// The value of a node. Maps keep their key order and the key nodes (with their spans).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Value {
    /// A short name of the value's type, for error messages ("expected a list, found a string").
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a map",
        }
    }
}

impl Node {
    pub fn is_null(&self) -> bool {
        matches!(self.value, Value::Null)
    }
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }
    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.value {
            Value::Seq(s) => Some(s),
            _ => None,
        }
    }
    /// The value of `key` in a map node (keys compared as strings).
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }
}

impl fmt::Display for Value {
    /// A compact rendering for messages (scalars as written, collections abbreviated).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Seq(_) => f.write_str("[...]"),
            Value::Map(_) => f.write_str("{...}"),
        }
    }
}

/// Most nodes an alias expansion may produce in one file: far above any real policy file,
/// far below what would hurt the agent ("billion laughs").
const MAX_ALIAS_NODES: usize = 1_000_000;

fn span_of(m: &Marker) -> Span {
    // yaml-rust2 lines are 1-based, columns 0-based.
    Span::new(m.line() as u32, m.col() as u32 + 1)
}

/// Parses every document of `text` (YAML or JSON). An empty stream gives no documents; an
/// empty document (`---` alone) gives a `Null` node. The error is the first syntax or
/// structure problem (duplicate key, unknown alias, ...) with its position.
pub fn load_documents(text: &str) -> Result<Vec<Node>, (Span, String)> {
    let mut collector = Collector::default();
    let mut parser = Parser::new_from_str(text);
    parser.load(&mut collector, true).map_err(|e| {
        (
            span_of(e.marker()),
            format!("YAML syntax error: {}", e.info()),
        )
    })?;
    let mut builder = Builder {
        events: collector.events,
        pos: 0,
        anchors: HashMap::new(),
        expanded: 0,
    };
    builder.documents()
}

#[derive(Default)]
struct Collector {
    events: Vec<(Event, Marker)>,
}

impl MarkedEventReceiver for Collector {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        self.events.push((ev, mark));
    }
}

struct Builder {
    events: Vec<(Event, Marker)>,
    pos: usize,
    anchors: HashMap<usize, Node>,
    expanded: usize,
}

type BuildResult<T> = Result<T, (Span, String)>;

impl Builder {
    fn next(&mut self) -> Option<(Event, Marker)> {
        let e = self.events.get(self.pos).cloned();
        self.pos += 1;
        e
    }

    fn documents(&mut self) -> BuildResult<Vec<Node>> {
        let mut docs = Vec::new();
        while let Some((ev, mark)) = self.next() {
            match ev {
                Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => {}
                Event::DocumentStart => {
                    // Anchors are scoped to their document.
                    self.anchors.clear();
                    match self.next() {
                        Some((Event::DocumentEnd, m)) => docs.push(Node {
                            span: span_of(&m),
                            value: Value::Null,
                        }),
                        Some((ev, m)) => docs.push(self.node(ev, m)?),
                        None => return Err((span_of(&mark), "unexpected end of input".into())),
                    }
                }
                other => {
                    return Err((
                        span_of(&mark),
                        format!("unexpected YAML event {other:?} outside a document"),
                    ))
                }
            }
        }
        Ok(docs)
    }

    fn count(&mut self, span: Span, n: usize) -> BuildResult<()> {
        self.expanded += n;
        if self.expanded > MAX_ALIAS_NODES {
            return Err((
                span,
                format!("aliases expand to more than {MAX_ALIAS_NODES} nodes"),
            ));
        }
        Ok(())
    }

    fn node(&mut self, ev: Event, mark: Marker) -> BuildResult<Node> {
        let span = span_of(&mark);
        let (node, anchor) = match ev {
            Event::Scalar(text, style, anchor, tag) => (
                Node {
                    span,
                    value: scalar(text, style, tag.as_ref(), span)?,
                },
                anchor,
            ),
            Event::SequenceStart(anchor, tag) => {
                check_collection_tag(tag.as_ref(), "seq", span)?;
                let mut items = Vec::new();
                loop {
                    match self.next() {
                        Some((Event::SequenceEnd, _)) => break,
                        Some((ev, m)) => items.push(self.node(ev, m)?),
                        None => return Err((span, "unterminated sequence".into())),
                    }
                }
                (
                    Node {
                        span,
                        value: Value::Seq(items),
                    },
                    anchor,
                )
            }
            Event::MappingStart(anchor, tag) => {
                check_collection_tag(tag.as_ref(), "map", span)?;
                let mut entries: Vec<(Node, Node)> = Vec::new();
                loop {
                    let key = match self.next() {
                        Some((Event::MappingEnd, _)) => break,
                        Some((ev, m)) => self.node(ev, m)?,
                        None => return Err((span, "unterminated mapping".into())),
                    };
                    let value = match self.next() {
                        Some((ev, m)) => {
                            let empty = matches!(&ev, Event::Scalar(t, TScalarStyle::Plain, _, None) if t.is_empty());
                            let mut v = self.node(ev, m)?;
                            // An empty value (`egress:`) has no position of its own; the
                            // parser reports the next token's. Point at its key instead.
                            if empty {
                                v.span = key.span;
                            }
                            v
                        }
                        None => return Err((span, "unterminated mapping".into())),
                    };
                    match &key.value {
                        Value::Str(k) if k == "<<" => {
                            return Err((
                                key.span,
                                "YAML merge keys (<<) are not supported; write the fields out"
                                    .into(),
                            ))
                        }
                        Value::Seq(_) | Value::Map(_) => {
                            return Err((key.span, "a map key must be a scalar".into()))
                        }
                        _ => {}
                    }
                    if let Some((first, _)) = entries.iter().find(|(k, _)| k.value == key.value) {
                        return Err((
                            key.span,
                            format!(
                                "duplicate key {} (first at line {}, column {})",
                                key.value, first.span.line, first.span.column
                            ),
                        ));
                    }
                    entries.push((key, value));
                }
                // A block mapping's start event is reported one column past its first key;
                // a flow mapping's at its `{`. The earlier of the two is where it starts.
                let span = match entries.first() {
                    Some((k, _)) if k.span < span => k.span,
                    _ => span,
                };
                (
                    Node {
                        span,
                        value: Value::Map(entries),
                    },
                    anchor,
                )
            }
            Event::Alias(id) => {
                let Some(target) = self.anchors.get(&id).cloned() else {
                    return Err((span, "alias refers to an unknown anchor".into()));
                };
                let n = size(&target);
                self.count(span, n)?;
                return Ok(target);
            }
            other => return Err((span, format!("unexpected YAML event {other:?}"))),
        };
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        Ok(node)
    }
}

fn size(n: &Node) -> usize {
    1 + match &n.value {
        Value::Seq(items) => items.iter().map(size).sum(),
        Value::Map(entries) => entries.iter().map(|(k, v)| size(k) + size(v)).sum(),
        _ => 0,
    }
}

const CORE_TAG: &str = "tag:yaml.org,2002:";

fn check_collection_tag(tag: Option<&Tag>, expect: &str, span: Span) -> BuildResult<()> {
    match tag {
        None => Ok(()),
        Some(t) if t.handle == CORE_TAG && t.suffix == expect => Ok(()),
        Some(t) => Err((
            span,
            format!("unsupported YAML tag {}{}", t.handle, t.suffix),
        )),
    }
}

fn scalar(text: String, style: TScalarStyle, tag: Option<&Tag>, span: Span) -> BuildResult<Value> {
    if let Some(t) = tag {
        if t.handle != CORE_TAG {
            return Err((
                span,
                format!("unsupported YAML tag {}{}", t.handle, t.suffix),
            ));
        }
        let bad = |what: &str| (span, format!("{text:?} is not a valid {what}"));
        return match t.suffix.as_str() {
            "str" => Ok(Value::Str(text)),
            "null" => match resolve_plain(&text) {
                Value::Null => Ok(Value::Null),
                _ => Err(bad("null")),
            },
            "bool" => match resolve_plain(&text) {
                Value::Bool(b) => Ok(Value::Bool(b)),
                _ => Err(bad("boolean")),
            },
            "int" => match resolve_plain(&text) {
                Value::Int(i) => Ok(Value::Int(i)),
                _ => Err(bad("integer")),
            },
            "float" => match resolve_plain(&text) {
                Value::Int(i) => Ok(Value::Float(i as f64)),
                Value::Float(x) => Ok(Value::Float(x)),
                _ => Err(bad("float")),
            },
            other => Err((span, format!("unsupported YAML tag !!{other}"))),
        };
    }
    if style != TScalarStyle::Plain {
        return Ok(Value::Str(text));
    }
    Ok(resolve_plain(&text))
}

/// YAML 1.2 core schema resolution of a plain scalar.
fn resolve_plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Value::Float(f64::INFINITY)
        }
        "-.inf" | "-.Inf" | "-.INF" => return Value::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Value::Float(f64::NAN),
        _ => {}
    }
    let bytes = s.as_bytes();
    let digits = |b: &[u8]| !b.is_empty() && b.iter().all(u8::is_ascii_digit);
    let unsigned = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits(unsigned.as_bytes()) {
        if let Ok(i) = s.parse::<i64>() {
            return Value::Int(i);
        }
        return Value::Str(s.to_string());
    }
    if let Some(h) = s.strip_prefix("0x") {
        if !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()) {
            if let Ok(i) = i64::from_str_radix(h, 16) {
                return Value::Int(i);
            }
        }
    }
    if let Some(o) = s.strip_prefix("0o") {
        if !o.is_empty() && o.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            if let Ok(i) = i64::from_str_radix(o, 8) {
                return Value::Int(i);
            }
        }
    }
    // Floats: [-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?
    let looks_float = !bytes.is_empty()
        && bytes
            .iter()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
        && unsigned.bytes().any(|b| b.is_ascii_digit())
        && unsigned
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_digit() || b == b'.');
    if looks_float {
        if let Ok(x) = s.parse::<f64>() {
            return Value::Float(x);
        }
    }
    Value::Str(s.to_string())
}

/// A field path inside a document, as printed in diagnostics: `spec.egress[0].toPorts`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Path(String);

impl Path {
    pub fn root() -> Path {
        Path(String::new())
    }
    /// `self.name` (or `name` at the root).
    pub fn key(&self, name: &str) -> Path {
        if self.0.is_empty() {
            Path(name.to_string())
        } else {
            Path(format!("{}.{name}", self.0))
        }
    }
    /// `self[i]`.
    pub fn index(&self, i: usize) -> Path {
        Path(format!("{}[{i}]", self.0))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Collects diagnostics for one file while a document tree is read into typed values.
///
/// Every `expect_*` helper reports a type error itself and returns `None`, so callers simply
/// skip what could not be read and carry on: all problems of a file are reported at once.
#[derive(Debug)]
pub struct Decoder {
    file: Arc<str>,
    diagnostics: Vec<Diagnostic>,
    fold_case: bool,
}

impl Decoder {
    pub fn new(file: &str) -> Decoder {
        Decoder {
            file: Arc::from(file),
            diagnostics: Vec::new(),
            fold_case: false,
        }
    }

    /// Field names match regardless of ASCII case when no exact match exists, as Go's
    /// `encoding/json` (and so Cilium's own policy decoding) does: `HTTP:` reads as `http:`.
    /// Off by default (configuration files want exact camelCase keys).
    pub fn with_case_insensitive_fields(mut self) -> Decoder {
        self.fold_case = true;
        self
    }

    pub fn file(&self) -> &Arc<str> {
        &self.file
    }

    /// Records a problem at `span` about the field at `path`.
    pub fn error(&mut self, span: Span, path: &Path, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic {
            file: self.file.clone(),
            span,
            path: path.as_str().to_string(),
            message: message.into(),
        });
    }

    pub fn has_errors(&self) -> bool {
        !self.diagnostics.is_empty()
    }

    pub fn error_count(&self) -> usize {
        self.diagnostics.len()
    }

    /// The diagnostics so far, in the order found.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        &self.diagnostics
    }

    /// The diagnostics sorted by position (file order), consuming the decoder.
    pub fn into_diagnostics(mut self) -> Vec<Diagnostic> {
        self.diagnostics.sort_by_key(|d| d.span);
        self.diagnostics
    }

    /// `Ok(value)` if nothing was reported, else every diagnostic in file order.
    pub fn finish<T>(self, value: T) -> Result<T, Vec<Diagnostic>> {
        if self.diagnostics.is_empty() {
            Ok(value)
        } else {
            Err(self.into_diagnostics())
        }
    }

    fn type_error(&mut self, node: &Node, path: &Path, expected: &str) {
        let found = node.value.type_name();
        self.error(
            node.span,
            path,
            format!("expected {expected}, found {found}"),
        );
    }

    /// Starts reading a map strictly; `None` (after reporting) if the node is not a map.
    /// A `null` node reads as an empty map.
    pub fn expect_map<'n>(&mut self, node: &'n Node, path: &Path) -> Option<MapReader<'n>> {
        match &node.value {
            Value::Map(entries) => Some(MapReader::new(
                node.span,
                entries,
                path.clone(),
                self.fold_case,
            )),
            Value::Null => Some(MapReader::new(node.span, &[], path.clone(), self.fold_case)),
            _ => {
                self.type_error(node, path, "a map");
                None
            }
        }
    }

    /// The items of a list; `null` reads as an empty list.
    pub fn expect_seq<'n>(&mut self, node: &'n Node, path: &Path) -> Option<&'n [Node]> {
        match &node.value {
            Value::Seq(items) => Some(items),
            Value::Null => Some(&[]),
            _ => {
                self.type_error(node, path, "a list");
                None
            }
        }
    }

    /// A string. Numbers and booleans are not coerced: YAML `on`, `1e3` or `0123` written
    /// where a string belongs is almost always a mistake, so the message suggests quoting.
    pub fn expect_str<'n>(&mut self, node: &'n Node, path: &Path) -> Option<&'n str> {
        match &node.value {
            Value::Str(s) => Some(s),
            Value::Bool(_) | Value::Int(_) | Value::Float(_) => {
                let v = node.value.to_string();
                self.error(
                    node.span,
                    path,
                    format!(
                        "expected a string, found {} (write it in quotes: \"{v}\")",
                        node.value.type_name()
                    ),
                );
                None
            }
            _ => {
                self.type_error(node, path, "a string");
                None
            }
        }
    }

    /// A non-empty string.
    pub fn expect_nonempty_str<'n>(&mut self, node: &'n Node, path: &Path) -> Option<&'n str> {
        let s = self.expect_str(node, path)?;
        if s.is_empty() {
            self.error(node.span, path, "must not be empty");
            return None;
        }
        Some(s)
    }

    pub fn expect_bool(&mut self, node: &Node, path: &Path) -> Option<bool> {
        match &node.value {
            Value::Bool(b) => Some(*b),
            _ => {
                self.type_error(node, path, "true or false");
                None
            }
        }
    }

    pub fn expect_int(&mut self, node: &Node, path: &Path) -> Option<i64> {
        match &node.value {
            Value::Int(i) => Some(*i),
            _ => {
                self.type_error(node, path, "an integer");
                None
            }
        }
    }

    /// An integer within `min..=max`.
    pub fn expect_int_in(&mut self, node: &Node, path: &Path, min: i64, max: i64) -> Option<i64> {
        let i = self.expect_int(node, path)?;
        if i < min || i > max {
            self.error(
                node.span,
                path,
                format!("{i} is out of range {min}..={max}"),
            );
            return None;
        }
        Some(i)
    }

    /// A list of strings, each with its span.
    pub fn expect_str_list<'n>(
        &mut self,
        node: &'n Node,
        path: &Path,
    ) -> Option<Vec<(&'n str, Span)>> {
        let items = self.expect_seq(node, path)?;
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.expect_str(item, &path.index(i)) {
                Some(s) => out.push((s, item.span)),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// A map of string keys to string values (labels, annotations), in file order.
    pub fn expect_str_map<'n>(&mut self, node: &'n Node, path: &Path) -> Option<Vec<StrEntry<'n>>> {
        let entries: &[(Node, Node)] = match &node.value {
            Value::Map(m) => m,
            Value::Null => &[],
            _ => {
                self.type_error(node, path, "a map of strings");
                return None;
            }
        };
        let mut out = Vec::with_capacity(entries.len());
        let mut ok = true;
        for (k, v) in entries {
            let key = match &k.value {
                Value::Str(s) => s.as_str(),
                _ => {
                    self.type_error(k, path, "a string key");
                    ok = false;
                    continue;
                }
            };
            let vpath = path.key(key);
            match self.expect_str(v, &vpath) {
                Some(value) => out.push(StrEntry {
                    key,
                    key_span: k.span,
                    value,
                    value_span: v.span,
                }),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }
}

/// One entry of a string map.
#[derive(Debug, Clone, Copy)]
pub struct StrEntry<'n> {
    pub key: &'n str,
    pub key_span: Span,
    pub value: &'n str,
    pub value_span: Span,
}

/// Strict reader of one map: fields are taken by name; [`MapReader::finish`] reports every
/// field that was not taken as unknown, naming the fields that are known there.
#[derive(Debug)]
pub struct MapReader<'n> {
    span: Span,
    entries: &'n [(Node, Node)],
    taken: Vec<bool>,
    known: Vec<&'static str>,
    path: Path,
    fold_case: bool,
    dup_case: Vec<(Span, &'static str)>,
}

impl<'n> MapReader<'n> {
    fn new(span: Span, entries: &'n [(Node, Node)], path: Path, fold_case: bool) -> MapReader<'n> {
        MapReader {
            span,
            entries,
            taken: vec![false; entries.len()],
            known: Vec::new(),
            path,
            fold_case,
            dup_case: Vec::new(),
        }
    }

    /// Index of field `name`: the exact key, else (when folding case) the first untaken key
    /// equal ignoring ASCII case.
    fn position(&self, name: &str) -> Option<usize> {
        let exact = self
            .entries
            .iter()
            .position(|(k, _)| k.as_str() == Some(name));
        if exact.is_some() || !self.fold_case {
            return exact;
        }
        self.entries
            .iter()
            .position(|(k, _)| k.as_str().is_some_and(|k| k.eq_ignore_ascii_case(name)))
    }

    /// Where the map starts.
    pub fn span(&self) -> Span {
        self.span
    }

    /// The map's own path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of field `name` of this map.
    pub fn field_path(&self, name: &str) -> Path {
        self.path.key(name)
    }

    /// Takes field `name` (present, possibly `null`). Records `name` as a known field.
    pub fn take(&mut self, name: &'static str) -> Option<&'n Node> {
        if !self.known.contains(&name) {
            self.known.push(name);
        }
        let i = self.position(name)?;
        if self.fold_case {
            // `http` and `HTTP` in one map would be the same field twice.
            for (j, (k, _)) in self.entries.iter().enumerate() {
                if j != i && k.as_str().is_some_and(|k| k.eq_ignore_ascii_case(name)) {
                    self.taken[j] = true;
                    self.dup_case.push((k.span, name));
                }
            }
        }
        self.taken[i] = true;
        Some(&self.entries[i].1)
    }

    /// Takes field `name` unless it is absent or `null` (JSON/Kubernetes treat both alike).
    pub fn take_some(&mut self, name: &'static str) -> Option<&'n Node> {
        self.take(name).filter(|n| !n.is_null())
    }

    /// Whether field `name` is present (without taking it).
    pub fn has(&self, name: &str) -> bool {
        self.position(name).is_some()
    }

    /// The key node of field `name`, for errors that are about the field itself.
    pub fn key_span(&self, name: &str) -> Option<Span> {
        self.position(name).map(|i| self.entries[i].0.span)
    }

    /// Takes a field without reading it: accepted and ignored.
    pub fn ignore(&mut self, name: &'static str) {
        let _ = self.take(name);
    }

    /// Reports an error on the key of field `name` (the map's start if absent).
    pub fn error_at(&self, d: &mut Decoder, name: &str, message: impl Into<String>) {
        let span = self.key_span(name).unwrap_or(self.span);
        d.error(span, &self.path.key(name), message);
    }

    /// A required field: reports `missing field` at the map when absent or null.
    pub fn require(&mut self, d: &mut Decoder, name: &'static str) -> Option<&'n Node> {
        let n = self.take_some(name);
        if n.is_none() {
            d.error(self.span, &self.path, format!("missing field `{name}`"));
        }
        n
    }

    /// Entries that were not taken, for callers with their own message.
    pub fn untaken(&self) -> impl Iterator<Item = &'n (Node, Node)> + '_ {
        self.entries
            .iter()
            .zip(&self.taken)
            .filter(|(_, t)| !**t)
            .map(|(e, _)| e)
    }

    /// Reports every field not taken as unknown.
    pub fn finish(self, d: &mut Decoder) {
        self.finish_with(d, |_| None)
    }

    /// As [`MapReader::finish`], with a custom message for some unknown fields
    /// (e.g. "toFQDNs is not allowed in egressDeny").
    pub fn finish_with(self, d: &mut Decoder, explain: impl Fn(&str) -> Option<String>) {
        for (span, name) in &self.dup_case {
            d.error(
                *span,
                &self.path.key(name),
                format!("field `{name}` is given twice (field names are compared ignoring case)"),
            );
        }
        for (k, _) in self.untaken() {
            let name = match &k.value {
                Value::Str(s) => s.clone(),
                other => other.to_string(),
            };
            let path = self.path.key(&name);
            let message = explain(&name).unwrap_or_else(|| self.unknown_message(&name));
            d.error(k.span, &path, message);
        }
    }

    fn unknown_message(&self, name: &str) -> String {
        let mut msg = format!("unknown field `{name}`");
        if let Some(close) = self
            .known
            .iter()
            .find(|k| k.eq_ignore_ascii_case(name) || edit_distance(k, name) <= 2)
        {
            msg.push_str(&format!(" (did you mean `{close}`?)"));
        } else if !self.known.is_empty() {
            msg.push_str(&format!("; expected one of: {}", self.known.join(", ")));
        }
        msg
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Node {
        let mut docs = load_documents(text).unwrap();
        assert_eq!(docs.len(), 1, "{docs:?}");
        docs.remove(0)
    }

    #[test]
    fn spans_are_one_based() {
        let doc = one("a: 1\nb:\n  - x\n  - \"y\"\n");
        assert_eq!(doc.span, Span::new(1, 1));
        let b = doc.get("b").unwrap();
        let items = b.as_seq().unwrap();
        assert_eq!(items[0].span, Span::new(3, 5));
        assert_eq!(items[1].span, Span::new(4, 5));
        assert_eq!(items[1].value, Value::Str("y".into()));
        let keys: Vec<_> = doc.as_map().unwrap().iter().map(|(k, _)| k.span).collect();
        assert_eq!(keys, vec![Span::new(1, 1), Span::new(2, 1)]);
    }

    #[test]
    fn core_schema_scalars() {
        let doc = one(
            "a: true\nb: ~\nc: 12\nd: '12'\ne: 1.5\nf: yes\ng: 0x1F\nh: -3\ni:\nj: 1e3\nk: 08\n",
        );
        let v = |k: &str| doc.get(k).unwrap().value.clone();
        assert_eq!(v("a"), Value::Bool(true));
        assert_eq!(v("b"), Value::Null);
        assert_eq!(v("c"), Value::Int(12));
        assert_eq!(v("d"), Value::Str("12".into()));
        assert_eq!(v("e"), Value::Float(1.5));
        assert_eq!(v("f"), Value::Str("yes".into()));
        assert_eq!(v("g"), Value::Int(31));
        assert_eq!(v("h"), Value::Int(-3));
        assert_eq!(v("i"), Value::Null);
        assert_eq!(v("j"), Value::Float(1000.0));
        assert_eq!(v("k"), Value::Int(8));
    }

    #[test]
    fn json_is_accepted() {
        let doc = one("[{\"a\": [1, \"2\", null, false]}]");
        let a = doc.as_seq().unwrap()[0].get("a").unwrap().as_seq().unwrap();
        assert_eq!(a[0].value, Value::Int(1));
        assert_eq!(a[1].value, Value::Str("2".into()));
        assert_eq!(a[2].value, Value::Null);
        assert_eq!(a[3].value, Value::Bool(false));
        assert_eq!(a[1].span, Span::new(1, 12));
    }

    #[test]
    fn several_documents() {
        let docs = load_documents("a: 1\n---\nb: 2\n---\n").unwrap();
        assert_eq!(docs.len(), 3);
        assert!(docs[2].is_null());
        assert_eq!(docs[1].span.line, 3);
        assert!(load_documents("").unwrap().is_empty());
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let (span, msg) = load_documents("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(span, Span::new(3, 1));
        assert!(
            msg.contains("duplicate key \"a\" (first at line 1, column 1)"),
            "{msg}"
        );
    }

    #[test]
    fn syntax_errors_have_positions() {
        let (span, msg) = load_documents("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(span.line >= 1, "{span:?}");
        assert!(msg.starts_with("YAML syntax error"), "{msg}");
        let (span, _) = load_documents("a:\n  - b\n c: 1\n").unwrap_err();
        assert_eq!(span.line, 3);
    }

    #[test]
    fn aliases_resolve_and_merge_keys_are_rejected() {
        let doc = one("base: &b {x: 1}\nother: *b\n");
        assert_eq!(
            doc.get("other").unwrap().get("x").unwrap().value,
            Value::Int(1)
        );
        let (span, msg) = load_documents("base: &b {x: 1}\nother:\n  <<: *b\n").unwrap_err();
        assert_eq!(span, Span::new(3, 3));
        assert!(msg.contains("merge keys"), "{msg}");
        let bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n\
                    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n\
                    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n";
        let (_, msg) = load_documents(bomb).unwrap_err();
        assert!(msg.contains("aliases expand"), "{msg}");
    }

    #[test]
    fn tags() {
        let doc = one("a: !!str 12\nb: !!int \"7\"\n");
        assert_eq!(doc.get("a").unwrap().value, Value::Str("12".into()));
        assert_eq!(doc.get("b").unwrap().value, Value::Int(7));
        let (_, msg) = load_documents("a: !custom x\n").unwrap_err();
        assert!(msg.contains("unsupported YAML tag"), "{msg}");
    }

    #[test]
    fn decoder_reports_unknown_fields_and_types() {
        let doc = one("name: x\ncount: \"3\"\nnmae: y\nzzz: 1\n");
        let mut d = Decoder::new("f.yaml");
        let mut m = d.expect_map(&doc, &Path::root()).unwrap();
        let name = m
            .take("name")
            .and_then(|n| d.expect_str(n, &Path::root().key("name")));
        assert_eq!(name, Some("x"));
        let count = m.take("count").unwrap();
        assert_eq!(d.expect_int(count, &Path::root().key("count")), None);
        m.finish(&mut d);
        let out: Vec<String> = d.into_diagnostics().iter().map(|x| x.to_string()).collect();
        assert_eq!(
            out,
            vec![
                "f.yaml:2:8: count: expected an integer, found a string",
                "f.yaml:3:1: nmae: unknown field `nmae` (did you mean `name`?)",
                "f.yaml:4:1: zzz: unknown field `zzz`; expected one of: name, count",
            ]
        );
    }

    #[test]
    fn decoder_string_helpers() {
        let doc = one("l: {a: b, c: 1}\nxs: [a, true]\n");
        let mut d = Decoder::new("f");
        let m = d.expect_str_map(doc.get("l").unwrap(), &Path::root().key("l"));
        assert!(m.is_none());
        let xs = d.expect_str_list(doc.get("xs").unwrap(), &Path::root().key("xs"));
        assert!(xs.is_none());
        let msgs: Vec<String> = d.into_diagnostics().iter().map(|x| x.to_string()).collect();
        assert_eq!(
            msgs,
            vec![
                "f:1:14: l.c: expected a string, found an integer (write it in quotes: \"1\")",
                "f:2:9: xs[1]: expected a string, found a boolean (write it in quotes: \"true\")",
            ]
        );
    }
}
