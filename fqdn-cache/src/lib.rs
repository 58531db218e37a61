//! The FQDN cache of fqdnwall: what allowed DNS answers taught, and which identities the
//! learned IPs carry. Pure: no runtime, no sockets, no clock — time is a [`Timestamp`] argument
//! and open connections come from a [`ConnectionSource`] the caller passes.
//!
//! Data flow: the DNS proxy hands each allowed answer to [`FqdnCache::learn`], which files the
//! IPs per endpoint under the question's name and every CNAME name with an expiry. The name
//! manager inside matches names against the `toFQDNs` selectors in force
//! ([`FqdnCache::set_selectors`], through the [`PatternIndex`]) and gives each IP one
//! node-local identity per distinct set of matching selectors and address family. Every
//! operation returns [`Changes`] — identities to add, ipcache upserts/deletes, identities to
//! release — that the agent applies through the policy engine and the datapath. [`FqdnCache::next_expiry`] tells
//! the agent when to call [`FqdnCache::expire`]; IPs with open connections linger as zombies.
//! Persistence: [`Snapshot`] is the base state file, written whole at start and at
//! compactions ([`FqdnCache::snapshot_chunk`] + [`SnapshotWriter`], in bounded steps); the
//! cache's change log ([`FqdnCache::take_changes`]) feeds the [`journal`] appended beside it
//! once a second. [`journal`] describes the files and how restore combines them.

pub mod cache;
pub mod error;
pub mod index;
pub mod journal;
pub mod persist;
pub mod time;

pub use cache::{
    Answer, Changes, Config, ConnectionSource, EndpointId, FqdnCache, FqdnIdentity, ListEntry,
    NoConnections, PendingChanges, SnapshotCursor, Source, Stats,
};
pub use error::Error;
pub use index::PatternIndex;
pub use journal::{apply_journal, read_journal, BatchEncoder, EntryState, JournalRecord};
pub use persist::{Snapshot, SnapshotChunk, SnapshotWriter};
pub use time::Timestamp;
