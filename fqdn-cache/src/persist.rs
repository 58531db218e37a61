//! The persistence format of the learned state, and when to write it.
//!
//! JSON, one document:
//! `{"version": 1, "endpoints": [{"endpoint": "frontend", "names": [{"name": "www.example.com.",
//! "ips": [{"ip": "192.0.2.1", "expires": 1795693645000}]}], "zombies": [{"ip": ..., "name": ...,
//! "expired": ...}]}]}` with times in Unix milliseconds. Endpoints are keyed by their configured
//! name, not their numeric id, so a reordered configuration cannot hand one endpoint's allows
//! to another. An endpoint, and a name within it, may appear more than once (a snapshot
//! written in steps, [`SnapshotWriter`]): restoring merges them, keeping the later expiry.
//! Writing the bytes atomically (temporary file + rename) is the agent's part.
//!
//! This snapshot is the base; the changes since it was written are in the journal
//! ([`crate::journal`], which describes the files and how they combine).

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::IpAddr;

use policy::fqdn::{DnsName, MAX_NAME_LEN};
use serde::{Deserialize, Serialize};

use crate::cache::EndpointId;
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// A range (start, length) in one of a [`SnapshotChunk`]'s buffers.
type Span = (u32, u32);

/// One step of a snapshot taken in bounded steps ([`crate::FqdnCache::snapshot_chunk`]):
/// plain copies of names, IPs and times, made while the caller holds its lock, formatted
/// by [`SnapshotWriter::write_chunk`] after it is released.
#[derive(Debug, Default)]
pub struct SnapshotChunk {
    /// The names' text, one after the other.
    pub(crate) text: String,
    /// (endpoint, name's range in `text`, range in `ips`), in the order taken.
    pub(crate) groups: Vec<(EndpointId, Span, Span)>,
    pub(crate) ips: Vec<IpSnapshot>,
    /// (endpoint, name's range in `text`, IP, end of its lookup lifetime).
    pub(crate) zombies: Vec<(EndpointId, Span, IpAddr, Timestamp)>,
}

impl SnapshotChunk {
    /// Empties the chunk, keeping its allocations for the next step.
    pub fn clear(&mut self) {
        self.text.clear();
        self.groups.clear();
        self.ips.clear();
        self.zombies.clear();
    }

    /// (endpoint, name, IP) entries held: lookups and zombies.
    pub fn entries(&self) -> usize {
        self.ips.len() + self.zombies.len()
    }

    pub(crate) fn push_name(&mut self, name: &str) -> Span {
        let start = u32::try_from(self.text.len()).expect("a chunk's text is under 4 GiB");
        self.text.push_str(name);
        (start, name.len() as u32)
    }

    fn name(&self, (start, len): Span) -> &str {
        &self.text[start as usize..(start + len) as usize]
    }
}

#[derive(Serialize)]
struct NameRef<'a> {
    name: &'a str,
    ips: &'a [IpSnapshot],
}

#[derive(Serialize)]
struct ZombieRef<'a> {
    ip: IpAddr,
    name: &'a str,
    expired: Timestamp,
}

/// Writes the JSON of a [`Snapshot`] step by step, so a million entries are never all
/// copied at once: each [`SnapshotChunk`] becomes one `endpoints` element per endpoint it
/// holds. [`Snapshot::decode`] reads the result.
pub struct SnapshotWriter<W: Write> {
    out: W,
    endpoints: HashMap<EndpointId, String>,
    first: bool,
    entries: usize,
}

impl<W: Write> SnapshotWriter<W> {
    /// Starts the document. `endpoints` names each endpoint (number, configured name);
    /// entries of endpoints not named are left out.
    pub fn new<'a>(
        mut out: W,
        endpoints: impl IntoIterator<Item = (EndpointId, &'a str)>,
    ) -> io::Result<SnapshotWriter<W>> {
        write!(out, "{{\"version\":{FORMAT_VERSION},\"endpoints\":[")?;
        Ok(SnapshotWriter {
            out,
            endpoints: endpoints
                .into_iter()
                .map(|(id, n)| (id, n.to_string()))
                .collect(),
            first: true,
            entries: 0,
        })
    }

    /// Appends a chunk's entries.
    pub fn write_chunk(&mut self, chunk: &SnapshotChunk) -> io::Result<()> {
        let mut eps: Vec<EndpointId> = chunk
            .groups
            .iter()
            .map(|g| g.0)
            .chain(chunk.zombies.iter().map(|z| z.0))
            .collect();
        eps.sort_unstable();
        eps.dedup();
        for ep in eps {
            let Some(key) = self.endpoints.get(&ep) else {
                continue;
            };
            if !self.first {
                self.out.write_all(b",")?;
            }
            self.first = false;
            self.out.write_all(b"{\"endpoint\":")?;
            serde_json::to_writer(&mut self.out, key)?;
            self.out.write_all(b",\"names\":[")?;
            let mut first = true;
            for &(_, name, (start, len)) in chunk.groups.iter().filter(|g| g.0 == ep) {
                if !first {
                    self.out.write_all(b",")?;
                }
                first = false;
                let ips = &chunk.ips[start as usize..(start + len) as usize];
                serde_json::to_writer(
                    &mut self.out,
                    &NameRef {
                        name: chunk.name(name),
                        ips,
                    },
                )?;
                self.entries += ips.len();
            }
            self.out.write_all(b"]")?;
            let mut zombies = chunk.zombies.iter().filter(|z| z.0 == ep).peekable();
            if zombies.peek().is_some() {
                self.out.write_all(b",\"zombies\":[")?;
                let mut first = true;
                for &(_, name, ip, expired) in zombies {
                    if !first {
                        self.out.write_all(b",")?;
                    }
                    first = false;
                    serde_json::to_writer(
                        &mut self.out,
                        &ZombieRef {
                            ip,
                            name: chunk.name(name),
                            expired,
                        },
                    )?;
                    self.entries += 1;
                }
                self.out.write_all(b"]")?;
            }
            self.out.write_all(b"}")?;
        }
        Ok(())
    }

    /// Entries written so far.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Ends the document and hands back the sink.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.write_all(b"]}")?;
        Ok(self.out)
    }
}
