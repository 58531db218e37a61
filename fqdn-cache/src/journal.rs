//! The journal: learned-state changes appended once a second beside the snapshot, so a write
//! costs what changed rather than what is cached.
//!
//! # Files
//!
//! The state directory holds the snapshot (`fqdn-cache.json`, the JSON of [`crate::Snapshot`],
//! version 1, unchanged) and the journal (`fqdn-cache.journal`). Restoring reads the
//! snapshot, then replays the journal over it ([`apply_journal`]); an older fqdnwall's state
//! (a snapshot and no journal) restores as it always did.
//!
//! # Journal layout
//!
//! ```text
//! file    := "FQDNJRN1" batch*
//! batch   := len:u32le crc:u32le payload[len]        crc = CRC-32 (IEEE) of payload
//! payload := ep_count:u16le (ep_len:u16le ep_utf8)*  record*
//! record  := kind:u8 ep_index:u16le name_len:u16le name_utf8
//!            family:u8 (4 | 6) ip[4 | 16] time:u64le (absent when kind = 3)
//! kind    := 1 lookup (time = expiry) | 2 zombie (time = end of the lookup lifetime)
//!          | 3 removed
//! ```
//!
//! Times are Unix milliseconds. Endpoints are named as in the snapshot (their configured
//! name, not their number); each batch carries its own small endpoint table. A batch sums up
//! a second of changes, coalesced per (endpoint, name, IP): first the keys that left the
//! lookups (evicted, cleaned, ended as zombies, zombies gone, zombies learned again), each
//! with its last such state; then, for every (endpoint, name) learned or refreshed, its
//! lookups as they are when the batch is written. So a key appears at most twice — removed,
//! then the lookup it is again — however often it changed. A lookup that simply expires is
//! not recorded: replay drops it by its time.
//!
//! # Torn and corrupt batches
//!
//! A batch is written with one `write` and then synced. A crash may leave the last batch
//! incomplete: its length runs past the end of the file, or the file was extended but the
//! data never reached the disk (the checksum does not match and the batch ends the file).
//! That is [`Error::JournalTorn`]: the batch is dropped and the earlier ones are kept. Any
//! other mismatch — a checksum that fails before the end, a record that does not decode, a
//! bad header — is [`Error::JournalCorrupt`] with the byte offset; replay keeps the batches
//! before it (a batch applies whole or not at all). Neither is fatal: the agent sets the file
//! aside and goes on with the good prefix.
//!
//! # Replay
//!
//! Records apply in file order, each to its (endpoint, name, IP): a lookup keeps the later
//! of its expiry and any lookup already there and ends a zombie; a zombie record replaces the
//! lookup; a removal removes both. Lookups whose expiry has passed are dropped. Replaying a
//! journal over a snapshot that already contains some of its changes gives the same state
//! (the cache only ever moves an expiry later while a lookup lives), which is what lets a
//! compaction write the new snapshot while the journal keeps taking batches.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use policy::fqdn::{DnsName, MAX_NAME_LEN};

use crate::cache::EndpointId;
use crate::error::Error;
use crate::persist::{EndpointSnapshot, IpSnapshot, NameSnapshot, Snapshot, ZombieSnapshot};
use crate::time::Timestamp;

/// The first bytes of every journal file ("FQDNJRN" and the format version).
pub const JOURNAL_HEADER: &[u8; 8] = b"FQDNJRN1";

/// Length and checksum before each batch.
const FRAME_HEADER: usize = 8;

/// A batch longer than this is not something fqdnwall wrote (a million records are about
/// 40 MiB): reading one means the length field is damaged.
const MAX_BATCH: usize = 256 << 20;

const KIND_LOOKUP: u8 = 1;
const KIND_ZOMBIE: u8 = 2;
const KIND_REMOVED: u8 = 3;

/// The state of one (endpoint, name, IP) as a journal record gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// Learned, until `expires`.
    Lookup { expires: Timestamp },
    /// Its lookup lifetime ended at `expired`; kept while a connection is open.
    Zombie { expired: Timestamp },
    /// Cleaned, evicted, or its zombie's connection closed.
    Removed,
}

/// One decoded journal record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalRecord {
    /// The endpoint's configured name.
    pub endpoint: String,
    /// Lower case with a trailing dot.
    pub name: String,
    pub ip: IpAddr,
    pub state: EntryState,
}

/// Builds one batch: records are added by [`crate::FqdnCache::encode_changes`], and
/// [`BatchEncoder::finish`] frames them for appending.
#[derive(Debug)]
pub struct BatchEncoder {
    /// Endpoint number → index in the batch's endpoint table.
    endpoints: HashMap<EndpointId, u16>,
    payload: Vec<u8>,
    records: usize,
}

impl BatchEncoder {
    /// A batch whose records may name these endpoints (number, configured name); records
    /// of other endpoints are skipped (they cannot be restored to anything).
    pub fn new<'a>(endpoints: impl IntoIterator<Item = (EndpointId, &'a str)>) -> BatchEncoder {
        let mut table = HashMap::new();
        let mut payload = vec![0, 0];
        for (id, name) in endpoints {
            let Ok(index) = u16::try_from(table.len()) else {
                break;
            };
            let Ok(len) = u16::try_from(name.len()) else {
                continue;
            };
            if table.contains_key(&id) {
                continue;
            }
            table.insert(id, index);
            payload.extend_from_slice(&len.to_le_bytes());
            payload.extend_from_slice(name.as_bytes());
        }
        let count = u16::try_from(table.len()).expect("at most u16::MAX endpoints");
        payload[..2].copy_from_slice(&count.to_le_bytes());
        BatchEncoder {
            endpoints: table,
            payload,
            records: 0,
        }
    }

    pub(crate) fn push(&mut self, endpoint: EndpointId, name: &str, ip: IpAddr, state: EntryState) {
        let Some(&ep) = self.endpoints.get(&endpoint) else {
            return;
        };
        let Ok(name_len) = u16::try_from(name.len()) else {
            return;
        };
        let (kind, time) = match state {
            EntryState::Lookup { expires } => (KIND_LOOKUP, Some(expires)),
            EntryState::Zombie { expired } => (KIND_ZOMBIE, Some(expired)),
            EntryState::Removed => (KIND_REMOVED, None),
        };
        let p = &mut self.payload;
        p.push(kind);
        p.extend_from_slice(&ep.to_le_bytes());
        p.extend_from_slice(&name_len.to_le_bytes());
        p.extend_from_slice(name.as_bytes());
        match ip {
            IpAddr::V4(a) => {
                p.push(4);
                p.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                p.push(6);
                p.extend_from_slice(&a.octets());
            }
        }
        if let Some(t) = time {
            p.extend_from_slice(&t.as_unix_millis().to_le_bytes());
        }
        self.records += 1;
    }

    /// Makes room for about `records` more, so that adding them (under the caller's lock)
    /// does not grow the buffer: growing copies all of it.
    pub fn reserve(&mut self, records: usize) {
        // A record is 1 + 2 + 2 + name + 1 + 4..16 + 8 bytes: ~48 for a typical name.
        self.payload.reserve(records.saturating_mul(48));
    }

    /// Records added so far.
    pub fn records(&self) -> usize {
        self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// The framed batch, to append to the journal with one write.
    pub fn finish(self) -> Vec<u8> {
        let len = u32::try_from(self.payload.len()).expect("a batch is under 4 GiB");
        let mut out = Vec::with_capacity(FRAME_HEADER + self.payload.len());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&self.payload).to_le_bytes());
        out.extend_from_slice(&self.payload);
        out
    }
}

/// What [`read_journal`] found.
#[derive(Debug)]
pub struct JournalRead {
    /// The records of every good batch, in file order.
    pub records: Vec<JournalRecord>,
    /// Complete batches read.
    pub batches: usize,
    /// Bytes from the start of the file up to the end of the last good batch: where the
    /// next batch is to be appended once the rest is set aside.
    pub valid_len: usize,
    /// Why reading stopped before the end ([`Error::JournalTorn`] or
    /// [`Error::JournalCorrupt`]).
    pub problem: Option<Error>,
}

/// Reads a journal file's bytes up to the first damaged batch (see the module docs).
pub fn read_journal(bytes: &[u8]) -> JournalRead {
    let mut read = JournalRead {
        records: Vec::new(),
        batches: 0,
        valid_len: 0,
        problem: None,
    };
    if bytes.len() < JOURNAL_HEADER.len() {
        if !JOURNAL_HEADER.starts_with(bytes) {
            read.problem = Some(corrupt(0, "not an fqdnwall journal (bad header)"));
        } else if !bytes.is_empty() {
            read.problem = Some(Error::JournalTorn { offset: 0 });
        }
        return read;
    }
    if &bytes[..JOURNAL_HEADER.len()] != JOURNAL_HEADER {
        read.problem = Some(corrupt(0, "not an fqdnwall journal (bad header)"));
        return read;
    }
    let mut at = JOURNAL_HEADER.len();
    read.valid_len = at;
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < FRAME_HEADER {
            read.problem = Some(Error::JournalTorn { offset: at });
            return read;
        }
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        if len > MAX_BATCH {
            read.problem = Some(corrupt(at, &format!("batch length {len} is implausible")));
            return read;
        }
        if rest.len() < FRAME_HEADER + len {
            read.problem = Some(Error::JournalTorn { offset: at });
            return read;
        }
        let payload = &rest[FRAME_HEADER..FRAME_HEADER + len];
        let end = at + FRAME_HEADER + len;
        if crc32fast::hash(payload) != crc {
            read.problem = Some(if end == bytes.len() {
                // The last batch, exactly to the end of the file: a write the disk did not
                // finish (the size grew, the data did not all arrive).
                Error::JournalTorn { offset: at }
            } else {
                corrupt(at, "batch checksum does not match")
            });
            return read;
        }
        // A batch applies whole or not at all, so what is restored is exactly what the
        // journal's good prefix holds.
        let mut batch = Vec::new();
        if let Err((pos, message)) = decode_batch(payload, &mut batch) {
            read.problem = Some(corrupt(at + FRAME_HEADER + pos, &message));
            return read;
        }
        read.records.append(&mut batch);
        read.batches += 1;
        at = end;
        read.valid_len = at;
    }
    read
}

fn corrupt(offset: usize, message: &str) -> Error {
    Error::JournalCorrupt {
        offset,
        message: message.to_string(),
    }
}

/// A cursor over one payload; errors carry the offset in the payload.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], (usize, String)> {
        if self.bytes.len() - self.at < n {
            return Err((self.at, format!("{what} runs past the end of its batch")));
        }
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, (usize, String)> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, (usize, String)> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2 bytes"),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64, (usize, String)> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
    fn text(&mut self, what: &str) -> Result<&'a str, (usize, String)> {
        let at = self.at;
        let len = self.u16(what)? as usize;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|_| (at, format!("{what} is not UTF-8")))
    }
}

/// Appends a batch's records to `out`.
fn decode_batch(payload: &[u8], out: &mut Vec<JournalRecord>) -> Result<(), (usize, String)> {
    let mut r = Reader {
        bytes: payload,
        at: 0,
    };
    let count = r.u16("the endpoint count")? as usize;
    let mut endpoints = Vec::with_capacity(count);
    for _ in 0..count {
        endpoints.push(r.text("an endpoint name")?);
    }
    while r.at < payload.len() {
        let start = r.at;
        let kind = r.u8("a record")?;
        if !matches!(kind, KIND_LOOKUP | KIND_ZOMBIE | KIND_REMOVED) {
            return Err((start, format!("unknown record kind {kind}")));
        }
        let ep = r.u16("a record's endpoint")? as usize;
        let endpoint = *endpoints.get(ep).ok_or_else(|| {
            (
                start,
                format!("endpoint index {ep} is not in the batch's table of {count}"),
            )
        })?;
        let name_at = r.at;
        let name = r.text("a record's name")?;
        if DnsName::new(name).as_str() != name || name.len() > MAX_NAME_LEN + 1 {
            return Err((
                name_at,
                format!("{name:?} is not a DNS name in normal form"),
            ));
        }
        let ip = match r.u8("a record's address family")? {
            4 => IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(r.take(4, "an IPv4 address")?).expect("4 bytes"),
            )),
            6 => IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(r.take(16, "an IPv6 address")?).expect("16 bytes"),
            )),
            f => return Err((r.at - 1, format!("unknown address family {f}"))),
        };
        let state = match kind {
            KIND_LOOKUP => EntryState::Lookup {
                expires: Timestamp::from_unix_millis(r.u64("a record's expiry")?),
            },
            KIND_ZOMBIE => EntryState::Zombie {
                expired: Timestamp::from_unix_millis(r.u64("a record's time")?),
            },
            _ => EntryState::Removed,
        };
        out.push(JournalRecord {
            endpoint: endpoint.to_string(),
            name: name.to_string(),
            ip,
            state,
        });
    }
    Ok(())
}

/// The state of one (endpoint, name, IP) while a replay builds it.
#[derive(Debug, Clone, Copy)]
enum Held {
    Lookup(Timestamp),
    Zombie(Timestamp),
}

/// The snapshot with the journal's records replayed over it, in order (see the module
/// docs); lookups expired at `now` are dropped. Only the (endpoint, name) pairs the journal
/// touches are rebuilt; the rest of the snapshot passes through as it is.
pub fn apply_journal(snapshot: Snapshot, records: &[JournalRecord], now: Timestamp) -> Snapshot {
    if records.is_empty() {
        return snapshot;
    }
    // Endpoint → name → IP → state, for the touched pairs only.
    type Names<'r> = HashMap<&'r str, BTreeMap<IpAddr, Held>>;
    type Touched<'r> = HashMap<&'r str, Names<'r>>;
    let mut touched: Touched<'_> = HashMap::new();
    for r in records {
        touched
            .entry(r.endpoint.as_str())
            .or_default()
            .entry(r.name.as_str())
            .or_default();
    }
    // What the snapshot holds for touched pairs moves into `touched` (a chunked snapshot
    // may list an endpoint or a name more than once: their entries merge as restore would).
    let mut endpoints = Vec::with_capacity(snapshot.endpoints.len());
    for mut ep in snapshot.endpoints {
        if let Some(names) = touched.get_mut(ep.endpoint.as_str()) {
            ep.names
                .retain_mut(|n| match names.get_mut(n.name.as_str()) {
                    Some(held) => {
                        for e in std::mem::take(&mut n.ips) {
                            let slot = held.entry(e.ip).or_insert(Held::Lookup(e.expires));
                            if let Held::Lookup(t) = slot {
                                *t = (*t).max(e.expires);
                            }
                        }
                        false
                    }
                    None => true,
                });
            ep.zombies.retain(|z| match names.get_mut(z.name.as_str()) {
                Some(held) => {
                    // A lookup of the same key wins over a zombie, as in restore.
                    held.entry(z.ip).or_insert(Held::Zombie(z.expired));
                    false
                }
                None => true,
            });
        }
        if !ep.names.is_empty() || !ep.zombies.is_empty() {
            endpoints.push(ep);
        }
    }
    for r in records {
        let held = touched
            .get_mut(r.endpoint.as_str())
            .and_then(|n| n.get_mut(r.name.as_str()))
            .expect("every record's pair is listed");
        match r.state {
            EntryState::Lookup { expires } => {
                // A zombie of the key ends; a lookup keeps the later expiry.
                let keep = match held.get(&r.ip) {
                    Some(Held::Lookup(t)) => (*t).max(expires),
                    _ => expires,
                };
                if keep > now {
                    held.insert(r.ip, Held::Lookup(keep));
                } else {
                    held.remove(&r.ip);
                }
            }
            EntryState::Zombie { expired } => {
                held.insert(r.ip, Held::Zombie(expired));
            }
            EntryState::Removed => {
                held.remove(&r.ip);
            }
        }
    }
    // The rebuilt pairs, one snapshot entry per endpoint, in a stable order.
    let mut rebuilt: Vec<(&str, Names<'_>)> = touched.into_iter().collect();
    rebuilt.sort_by(|a, b| a.0.cmp(b.0));
    for (endpoint, names) in rebuilt {
        let mut names: Vec<(&str, BTreeMap<IpAddr, Held>)> = names.into_iter().collect();
        names.sort_by(|a, b| a.0.cmp(b.0));
        let mut ep = EndpointSnapshot {
            endpoint: endpoint.to_string(),
            names: Vec::new(),
            zombies: Vec::new(),
        };
        for (name, held) in names {
            let mut ips = Vec::new();
            for (ip, h) in held {
                match h {
                    Held::Lookup(expires) if expires > now => ips.push(IpSnapshot { ip, expires }),
                    Held::Lookup(_) => {}
                    Held::Zombie(expired) => ep.zombies.push(ZombieSnapshot {
                        ip,
                        name: name.to_string(),
                        expired,
                    }),
                }
            }
            if !ips.is_empty() {
                ep.names.push(NameSnapshot {
                    name: name.to_string(),
                    ips,
                });
            }
        }
        if !ep.names.is_empty() || !ep.zombies.is_empty() {
            endpoints.push(ep);
        }
    }
    Snapshot::new(endpoints)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> Timestamp {
        Timestamp::from_unix_secs(1_795_693_645 + secs)
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn rec(ep: &str, name: &str, a: &str, state: EntryState) -> JournalRecord {
        JournalRecord {
            endpoint: ep.into(),
            name: name.into(),
            ip: ip(a),
            state,
        }
    }
    fn batch(records: &[JournalRecord]) -> Vec<u8> {
        let mut e = BatchEncoder::new([(1, "frontend"), (2, "backend")]);
        for r in records {
            let id = if r.endpoint == "frontend" { 1 } else { 2 };
            e.push(id, &r.name, r.ip, r.state);
        }
        e.finish()
    }
    fn journal(batches: &[&[JournalRecord]]) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = JOURNAL_HEADER.to_vec();
        let mut starts = Vec::new();
        for b in batches {
            starts.push(bytes.len());
            bytes.extend_from_slice(&batch(b));
        }
        (bytes, starts)
    }
    fn first() -> Vec<JournalRecord> {
        vec![
            rec(
                "frontend",
                "a.example.com.",
                "192.0.2.1",
                EntryState::Lookup { expires: t(60) },
            ),
            rec(
                "backend",
                "b.example.com.",
                "2001:db8::1",
                EntryState::Zombie { expired: t(5) },
            ),
        ]
    }
    fn second() -> Vec<JournalRecord> {
        vec![rec(
            "frontend",
            "a.example.com.",
            "192.0.2.1",
            EntryState::Removed,
        )]
    }

    #[test]
    fn framing_round_trip() {
        let (bytes, _) = journal(&[&first(), &second()]);
        let r = read_journal(&bytes);
        assert!(r.problem.is_none(), "{:?}", r.problem);
        assert_eq!(r.batches, 2);
        assert_eq!(r.valid_len, bytes.len());
        let mut want = first();
        want.extend(second());
        assert_eq!(r.records, want);
        // Records of endpoints the batch does not name are skipped.
        let mut e = BatchEncoder::new([(1, "frontend")]);
        e.push(9, "x.example.com.", ip("192.0.2.9"), EntryState::Removed);
        assert!(e.is_empty());
        // An empty journal is just the header.
        let r = read_journal(JOURNAL_HEADER);
        assert!(r.problem.is_none() && r.records.is_empty());
        assert_eq!(r.valid_len, JOURNAL_HEADER.len());
    }

    #[test]
    fn a_torn_last_batch_is_dropped_and_the_earlier_kept() {
        let (bytes, starts) = journal(&[&first(), &second()]);
        // Cut anywhere inside the last batch: its length header, or its payload.
        for cut in [starts[1] + 3, starts[1] + 9, bytes.len() - 1] {
            let r = read_journal(&bytes[..cut]);
            assert_eq!(r.records, first(), "cut at {cut}");
            assert_eq!(r.valid_len, starts[1]);
            assert!(
                matches!(r.problem, Some(Error::JournalTorn { offset }) if offset == starts[1]),
                "{:?}",
                r.problem
            );
        }
        // The file grew but the last batch's data never arrived (zeros): torn as well.
        let mut zeroed = bytes.clone();
        for b in &mut zeroed[starts[1] + FRAME_HEADER..] {
            *b = 0;
        }
        let r = read_journal(&zeroed);
        assert_eq!(r.records, first());
        assert!(matches!(r.problem, Some(Error::JournalTorn { .. })));
        // A header cut short.
        let r = read_journal(&JOURNAL_HEADER[..5]);
        assert!(matches!(r.problem, Some(Error::JournalTorn { offset: 0 })));
    }

    #[test]
    fn a_checksum_mismatch_mid_file_ends_the_replay_there() {
        let (mut bytes, starts) = journal(&[&first(), &second(), &first()]);
        // One flipped bit in the second batch's payload.
        bytes[starts[1] + FRAME_HEADER + 5] ^= 0x10;
        let r = read_journal(&bytes);
        assert_eq!(r.records, first());
        assert_eq!(r.valid_len, starts[1]);
        match &r.problem {
            Some(e @ Error::JournalCorrupt { offset, .. }) => {
                assert_eq!(*offset, starts[1]);
                assert!(e.to_string().contains("checksum"), "{e}");
                assert!(
                    e.to_string().contains(&format!("byte {}", starts[1])),
                    "{e}"
                );
            }
            other => panic!("{other:?}"),
        }
        // Not a journal at all.
        let r = read_journal(b"{\"version\": 1}");
        assert!(matches!(
            r.problem,
            Some(Error::JournalCorrupt { offset: 0, .. })
        ));
        assert_eq!(r.valid_len, 0);
    }

    #[test]
    fn a_record_that_does_not_decode_is_corrupt_at_its_offset() {
        // A well-framed batch whose record names a name not in normal form.
        let mut e = BatchEncoder::new([(1, "frontend")]);
        e.push(
            1,
            "ok.example.com.",
            ip("192.0.2.1"),
            EntryState::Lookup { expires: t(9) },
        );
        e.push(1, "Bad.Example", ip("192.0.2.2"), EntryState::Removed);
        let mut bytes = JOURNAL_HEADER.to_vec();
        bytes.extend_from_slice(&e.finish());
        let r = read_journal(&bytes);
        assert!(r.records.is_empty(), "the damaged batch applies not at all");
        assert_eq!(r.valid_len, JOURNAL_HEADER.len());
        match r.problem {
            Some(Error::JournalCorrupt { offset, message }) => {
                // Header, frame, endpoint table (2 + 2 + 8), first record (1+2+2+15+1+4+8 = 33),
                // kind, endpoint: the name's length field.
                assert_eq!(offset, 8 + 8 + 12 + 33 + 3);
                assert!(message.contains("\"Bad.Example\""), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    fn snap(endpoints: Vec<EndpointSnapshot>) -> Snapshot {
        Snapshot::new(endpoints)
    }
    fn name(n: &str, ips: &[(&str, Timestamp)]) -> NameSnapshot {
        NameSnapshot {
            name: n.into(),
            ips: ips
                .iter()
                .map(|(a, e)| IpSnapshot {
                    ip: ip(a),
                    expires: *e,
                })
                .collect(),
        }
    }

    #[test]
    fn replay_later_expiry_wins_removals_apply_expired_dropped() {
        let base = snap(vec![EndpointSnapshot {
            endpoint: "frontend".into(),
            names: vec![
                name(
                    "a.example.com.",
                    &[("192.0.2.1", t(100)), ("192.0.2.2", t(100))],
                ),
                name("keep.example.com.", &[("192.0.2.9", t(100))]),
            ],
            zombies: vec![ZombieSnapshot {
                ip: ip("192.0.2.7"),
                name: "z.example.com.".into(),
                expired: t(1),
            }],
        }]);
        let records = vec![
            // Earlier than what the snapshot has: the snapshot's stays.
            rec(
                "frontend",
                "a.example.com.",
                "192.0.2.1",
                EntryState::Lookup { expires: t(50) },
            ),
            // Later: moves it.
            rec(
                "frontend",
                "a.example.com.",
                "192.0.2.2",
                EntryState::Lookup { expires: t(200) },
            ),
            rec(
                "frontend",
                "a.example.com.",
                "192.0.2.2",
                EntryState::Lookup { expires: t(150) },
            ),
            // New, but already expired at restore.
            rec(
                "frontend",
                "a.example.com.",
                "192.0.2.3",
                EntryState::Lookup { expires: t(10) },
            ),
            // The zombie's IP learned again: a lookup.
            rec(
                "frontend",
                "z.example.com.",
                "192.0.2.7",
                EntryState::Lookup { expires: t(300) },
            ),
            // A new endpoint's entry, removed again, then learned.
            rec(
                "backend",
                "b.example.com.",
                "192.0.2.5",
                EntryState::Lookup { expires: t(400) },
            ),
            rec(
                "backend",
                "b.example.com.",
                "192.0.2.5",
                EntryState::Removed,
            ),
            rec(
                "backend",
                "b.example.com.",
                "192.0.2.6",
                EntryState::Zombie { expired: t(3) },
            ),
        ];
        let out = apply_journal(base, &records, t(20));
        let want = snap(vec![
            EndpointSnapshot {
                endpoint: "frontend".into(),
                names: vec![name("keep.example.com.", &[("192.0.2.9", t(100))])],
                zombies: vec![],
            },
            EndpointSnapshot {
                endpoint: "backend".into(),
                names: vec![],
                zombies: vec![ZombieSnapshot {
                    ip: ip("192.0.2.6"),
                    name: "b.example.com.".into(),
                    expired: t(3),
                }],
            },
            EndpointSnapshot {
                endpoint: "frontend".into(),
                names: vec![
                    name(
                        "a.example.com.",
                        &[("192.0.2.1", t(100)), ("192.0.2.2", t(200))],
                    ),
                    name("z.example.com.", &[("192.0.2.7", t(300))]),
                ],
                zombies: vec![],
            },
        ]);
        assert_eq!(out, want);
        // Replaying again over the result changes nothing (compaction relies on it).
        let twice = apply_journal(out.clone(), &records, t(20));
        let flat = |s: &Snapshot| {
            let mut v: Vec<String> = s
                .endpoints
                .iter()
                .flat_map(|e| {
                    e.names
                        .iter()
                        .flat_map(move |n| {
                            n.ips.iter().map(move |i| {
                                format!("{} {} {} {}", e.endpoint, n.name, i.ip, i.expires)
                            })
                        })
                        .chain(e.zombies.iter().map(move |z| {
                            format!("{} {} {} zombie {}", e.endpoint, z.name, z.ip, z.expired)
                        }))
                })
                .collect();
            v.sort();
            v
        };
        assert_eq!(flat(&twice), flat(&out));
    }
}
