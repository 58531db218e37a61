//! The datapath's error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel object could not be loaded (verifier, missing kernel feature, bpffs).
    #[error("loading the kernel programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// A map has no room for another entry. The entry is not in the map, so its traffic is
    /// dropped (never silently allowed); `status` counts these failures.
    #[error("map {map} is full ({capacity} entries)")]
    MapFull { map: &'static str, capacity: u32 },
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("link {path}: {message}")]
    Link { path: PathBuf, message: String },
    /// A pinned map was made by an incompatible build (another key or value layout).
    #[error(
        "pinned map {path} has key size {key_size} and value size {value_size}, this build \
         expects {want_key} and {want_value}; remove it (fqdnwall cleanup / unload) to start afresh"
    )]
    Incompatible {
        path: PathBuf,
        key_size: u32,
        value_size: u32,
        want_key: u32,
        want_value: u32,
    },
    #[error("interface {0}: no such interface")]
    NoInterface(String),
    #[error("ifindex {0}: no such interface")]
    NoIfindex(u32),
    #[error("ifindex {0} is not attached")]
    NotAttached(u32),
    #[error("endpoint id {0} is not attached to any interface")]
    UnknownEndpoint(u16),
    #[error("invalid policy entry for endpoint {endpoint}: {reason}")]
    InvalidEntry { endpoint: u16, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the event stream was already taken")]
    EventsTaken,
    #[error("{0}")]
    Command(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Maps a failed map update to `MapFull` when the kernel said there is no room.
pub(crate) fn map_err(map: &'static str, capacity: u32, e: aya::maps::MapError) -> Error {
    if let aya::maps::MapError::SyscallError(s) = &e {
        if matches!(
            s.io_error.raw_os_error(),
            Some(libc::E2BIG) | Some(libc::ENOSPC)
        ) {
            return Error::MapFull { map, capacity };
        }
    }
    Error::Map { map, source: e }
}
