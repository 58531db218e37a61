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
    /// The journal ends inside a batch: the last write was cut short (a crash or a full
    /// disk). The batches before `offset` are good.
    #[error("FQDN journal: the batch at byte {offset} is incomplete (a write cut short); replay stops there")]
    JournalTorn { offset: usize },
    /// The journal holds bytes that are not what fqdnwall wrote at `offset` (a checksum
    /// that does not match, a record that does not decode). The batches before are good.
    #[error("FQDN journal: corrupt at byte {offset}: {message}; replay stops there")]
    JournalCorrupt { offset: usize, message: String },
}
