//! Errors of the policy crate. Every diagnostic about input text carries file, line, column
//! and the field path, and prints as `FILE:LINE:COLUMN: message`.

use std::fmt;
use std::sync::Arc;

/// A position in a source file (1-based line and column; 0 when unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Span {
    pub line: u32,
    pub column: u32,
}

impl Span {
    pub fn new(line: u32, column: u32) -> Span {
        Span { line, column }
    }
}

/// One problem found in a policy (or config) file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: Arc<str>,
    pub span: Span,
    /// Field path in the document, e.g. `spec.egress[0].toPorts[1].ports[0].port`.
    /// Empty when the problem is with the document as a whole (YAML syntax, unknown kind).
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.span.line, self.span.column)?;
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Errors of the policy crate.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A file (or several) had problems; every one found is listed, in file order.
    #[error("{}", format_diagnostics(.0))]
    Invalid(Vec<Diagnostic>),
    /// A named endpoint, identity or selector that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Persisted state that cannot be read back.
    #[error("corrupt state: {0}")]
    CorruptState(String),
}

fn format_diagnostics(d: &[Diagnostic]) -> String {
    d.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}
