//! Errors of the fqdn-cache crate.

/// Reading persisted state failed; the agent sets the file aside and starts empty.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("FQDN state is corrupt at line {line}, column {column}: {message}")]
    Corrupt {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("FQDN state has format version {found}; this fqdnwall reads version {expected}")]
    Version { found: u32, expected: u32 },
    #[error("FQDN state: {path}: {message}")]
    Invalid { path: String, message: String },
}
