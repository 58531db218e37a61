//! The persistence format of the learned state, and when to write it.
//!
//! JSON, one document:
//! `{"version": 1, "endpoints": [{"endpoint": "frontend", "names": [{"name": "www.example.com.",
//! "ips": [{"ip": "192.0.2.1", "expires": 1795693645000}]}], "zombies": [{"ip": ..., "name": ...,
//! "expired": ...}]}]}` with times in Unix milliseconds. Endpoints are keyed by their configured
//! name, not their numeric id, so a reordered configuration cannot hand one endpoint's allows
//! to another. Writing the bytes atomically (temporary file + rename) is the agent's part.

use std::net::IpAddr;

use policy::fqdn::{DnsName, MAX_NAME_LEN};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::time::Timestamp;

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub version: u32,
    pub endpoints: Vec<EndpointSnapshot>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSnapshot {
    /// The endpoint's configured name.
    pub endpoint: String,
    pub names: Vec<NameSnapshot>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zombies: Vec<ZombieSnapshot>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameSnapshot {
    /// Lower case with a trailing dot.
    pub name: String,
    pub ips: Vec<IpSnapshot>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpSnapshot {
    pub ip: IpAddr,
    pub expires: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZombieSnapshot {
    pub ip: IpAddr,
    pub name: String,
    /// When the lookup lifetime ended.
    pub expired: Timestamp,
}

impl Snapshot {
    pub fn new(endpoints: Vec<EndpointSnapshot>) -> Snapshot {
        Snapshot {
            version: FORMAT_VERSION,
            endpoints,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a snapshot always serializes")
    }

    /// Reads bytes written by [`Snapshot::encode`]. Anything else — not JSON, unknown
    /// fields, another version, a name not in normal form — is an error naming the place;
    /// the agent sets such a file aside and starts empty.
    pub fn decode(bytes: &[u8]) -> Result<Snapshot, Error> {
        let snapshot: Snapshot = serde_json::from_slice(bytes).map_err(|e| Error::Corrupt {
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
        if snapshot.version != FORMAT_VERSION {
            return Err(Error::Version {
                found: snapshot.version,
                expected: FORMAT_VERSION,
            });
        }
        for (i, ep) in snapshot.endpoints.iter().enumerate() {
            let names = ep.names.iter().map(|n| &n.name).enumerate();
            let zombies = ep.zombies.iter().map(|z| &z.name).enumerate();
            for (path, (j, name)) in names
                .map(|x| ("names", x))
                .chain(zombies.map(|x| ("zombies", x)))
            {
                let normal = DnsName::new(name);
                if normal.as_str() != name || name.len() > MAX_NAME_LEN + 1 {
                    return Err(Error::Invalid {
                        path: format!("endpoints[{i}].{path}[{j}].name"),
                        message: format!("{name:?} is not a DNS name in normal form"),
                    });
                }
            }
        }
        Ok(snapshot)
    }
}

/// Batches writes: the state is saved at most once per `min_interval_ms`, and only when it
/// changed ([`crate::FqdnCache::generation`] moved) since the last save.
#[derive(Debug, Clone)]
pub struct SaveSchedule {
    min_interval_ms: u64,
    saved_generation: u64,
    last_save: Option<Timestamp>,
}

impl SaveSchedule {
    /// `generation` is the cache's generation right after restore (nothing to save yet).
    pub fn new(min_interval_ms: u64, generation: u64) -> SaveSchedule {
        SaveSchedule {
            min_interval_ms,
            saved_generation: generation,
            last_save: None,
        }
    }

    /// When the next write is due: `None` when nothing changed since the last one.
    pub fn due(&self, generation: u64) -> Option<Timestamp> {
        if generation == self.saved_generation {
            return None;
        }
        Some(match self.last_save {
            Some(t) => t.add_millis(self.min_interval_ms),
            None => Timestamp::from_unix_millis(0),
        })
    }

    /// Records a successful write of the state at `generation`.
    pub fn saved(&mut self, generation: u64, now: Timestamp) {
        self.saved_generation = generation;
        self.last_save = Some(now);
    }
}
