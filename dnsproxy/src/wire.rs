//! The fast path of message reading: the messages the proxy sees by the hundred thousand per
//! second, read in place without building hickory's message model.
//!
//! A query of one question (plus at most an option-less OPT record) and an answer made of A,
//! AAAA and CNAME records (NS and SOA in the authority section, A/AAAA glue and an option-less
//! OPT in the additional section) make up nearly all traffic. For those this module validates
//! the framing exactly as hickory's decoder does (name labels and compression pointers,
//! record lengths, RDATA lengths) and reads what the proxy needs. It claims a message only when
//! it is certain hickory would accept it and read the same: a name with a byte outside
//! letters, digits, `-` and `_`, a record type it does not read, an EDNS option, trailing
//! bytes, anything malformed: `None`, and the caller decides with hickory (`message.rs`). The
//! property tests there hold the two paths to the same results.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;

use hickory_proto::op::Query;
use hickory_proto::rr::Name;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable};
use policy::fqdn::DnsName;

use crate::hooks::LearnedAnswer;
use crate::message::{plain_name_end, DEDUP_SCAN, HEADER_LEN, MAX_CHAIN};

const TYPE_A: u16 = 1;
const TYPE_NS: u16 = 2;
const TYPE_CNAME: u16 = 5;
const TYPE_SOA: u16 = 6;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// Names longer than this (label bytes plus one per label) are left to hickory, whose limit
/// is 255 counted slightly differently; real names are far shorter.
const FAST_NAME_MAX: usize = 200;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// A label hickory writes back verbatim in its ASCII form: letters, digits and `_`, and `-`
/// anywhere but first.
fn plain_label(label: &[u8]) -> bool {
    label.first() != Some(&b'-') && label.iter().all(|&c| PLAIN[usize::from(c)] != 0)
}

/// Per byte: its lower-case form when it may appear in a plain label (letters, digits, `_`,
/// `-`), else 0. One lookup both checks and folds a byte on the path every name takes.
static PLAIN: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            t[c] = b.to_ascii_lowercase();
        }
        c += 1;
    }
    t
};

/// Appends `label` lower-cased and a dot to `out` if it is a plain label (see
/// [`plain_label`]); false (and `out` as it was, up to its length) if not.
fn push_plain_label(label: &[u8], out: &mut Vec<u8>) -> bool {
    if label.first() == Some(&b'-') {
        return false;
    }
    // Folded into the spare capacity in one pass (no capacity check per byte); the length
    // moves only once the whole label proved plain.
    out.reserve(label.len() + 1);
    let spare = &mut out.spare_capacity_mut()[..label.len() + 1];
    if !fold_plain(label, &mut spare[..label.len()]) {
        return false;
    }
    spare[label.len()].write(b'.');
    // SAFETY: the label's bytes and the dot were written just above.
    unsafe { out.set_len(out.len() + label.len() + 1) };
    true
}

/// Writes `label` folded (see [`PLAIN`]) into `out` (as long as it); false when a byte is
/// not plain (then `out` holds garbage to ignore).
fn fold_plain(label: &[u8], out: &mut [std::mem::MaybeUninit<u8>]) -> bool {
    let mut all = true;
    for (o, &c) in out.iter_mut().zip(label) {
        let folded = PLAIN[usize::from(c)];
        all &= folded != 0;
        o.write(folded);
    }
    all
}

/// Walks the name at `pos` by hickory's rules (labels of 1–63 bytes, pointers only to bytes
/// before the start of the part being read, no overlap with it), calling `label` with each
/// label; `label` returning false gives up. Returns the position after the name in the message
/// (after the first pointer, if any). `None`: malformed, unusual or given up.
fn walk_name(msg: &[u8], mut pos: usize, mut label: impl FnMut(&[u8]) -> bool) -> Option<usize> {
    let mut part_start = pos;
    let mut limit: Option<usize> = None;
    let mut end = None;
    let mut length = 0usize;
    loop {
        if limit.is_some_and(|l| pos >= l) {
            return None;
        }
        let b = *msg.get(pos)?;
        match b {
            0 => return Some(end.unwrap_or(pos + 1)),
            1..=63 => {
                let l = msg.get(pos + 1..pos + 1 + usize::from(b))?;
                length += l.len() + 1;
                if length > FAST_NAME_MAX || !label(l) {
                    return None;
                }
                pos += 1 + l.len();
            }
            0xc0..=0xff => {
                let target = usize::from(u16_at(msg, pos)? & 0x3fff);
                if target >= part_start {
                    return None;
                }
                end.get_or_insert(pos + 2);
                limit = Some(part_start);
                pos = target;
                part_start = target;
            }
            _ => return None,
        }
    }
}

/// The name at `pos` as normal text (lower case, trailing dot) appended to `out`, when every
/// label is plain; the root name is `.`. Returns the position after the name.
fn read_plain_name(msg: &[u8], pos: usize, out: &mut String) -> Option<usize> {
    let start = out.len();
    // SAFETY: only bytes of plain labels (ASCII letters, digits, `-`, `_`, lower-cased) and
    // `.` are added, so the string stays UTF-8. Bytes, not chars: this runs for every name
    // of every answer, and a char push per byte cost more than the rest of the walk.
    let text = unsafe { out.as_mut_vec() };
    let end = walk_name(msg, pos, |l| push_plain_label(l, text));
    match end {
        Some(_) if text.len() == start => text.push(b'.'),
        Some(_) => {}
        None => text.truncate(start),
    }
    end
}

/// Whether the name at `pos` is valid for the fast path (as [`read_plain_name`] would read it)
/// without reading it: its end, and whether it is the root.
fn check_plain_name(msg: &[u8], pos: usize) -> Option<(usize, bool)> {
    let mut labels = 0usize;
    let end = walk_name(msg, pos, |l| {
        labels += 1;
        plain_label(l)
    })?;
    Some((end, labels == 0))
}

/// A question as the proxy matches answers to it: the name's wire form (uncompressed; as the
/// client wrote it on the fast path, lower case from hickory), type and class. Names compare
/// case-insensitively, as DNS compares them.
#[derive(Debug, Clone)]
pub(crate) struct Question {
    name: WireName,
    pub qtype: u16,
    pub qclass: u16,
}

/// Wire-form names up to this long are kept inline (nearly all are: the longest label is 63).
const INLINE_NAME: usize = 62;

/// A name's wire form, inline when short so that a query costs no allocation for it.
#[derive(Clone)]
enum WireName {
    Inline { len: u8, bytes: [u8; INLINE_NAME] },
    Boxed(Box<[u8]>),
}

impl WireName {
    fn new(wire: &[u8]) -> WireName {
        match u8::try_from(wire.len()) {
            Ok(len) if wire.len() <= INLINE_NAME => {
                let mut bytes = [0; INLINE_NAME];
                bytes[..wire.len()].copy_from_slice(wire);
                WireName::Inline { len, bytes }
            }
            _ => WireName::Boxed(wire.into()),
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            WireName::Inline { len, bytes } => &bytes[..usize::from(*len)],
            WireName::Boxed(b) => b,
        }
    }
}

impl std::fmt::Debug for WireName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_slice())
    }
}

impl PartialEq for Question {
    fn eq(&self, other: &Question) -> bool {
        self.qtype == other.qtype
            && self.qclass == other.qclass
            && self
                .name
                .as_slice()
                .eq_ignore_ascii_case(other.name.as_slice())
    }
}

impl Eq for Question {}

impl Question {
    /// From hickory's reading of a question (the slow path).
    pub(crate) fn from_query(q: &Query) -> Question {
        let name = q
            .name()
            .to_lowercase()
            .to_bytes()
            .expect("a decoded name encodes");
        Question {
            name: WireName::new(&name),
            qtype: u16::from(q.query_type()),
            qclass: u16::from(q.query_class()),
        }
    }

    /// The name as hickory's (lower case), for the slow path of learning.
    pub(crate) fn name(&self) -> Name {
        Name::read(&mut BinDecoder::new(self.name.as_slice()))
            .expect("built from a valid name")
            .to_lowercase()
    }

    /// The name's wire form.
    pub(crate) fn wire_name(&self) -> &[u8] {
        self.name.as_slice()
    }

    /// Type and class as on the wire.
    pub(crate) fn type_class(&self) -> [u8; 4] {
        let [t0, t1] = self.qtype.to_be_bytes();
        let [c0, c1] = self.qclass.to_be_bytes();
        [t0, t1, c0, c1]
    }

    /// Whether the question of `msg` (one question, at the header's end) is this one: name
    /// case-insensitive, same type and class. An unreadable question is not.
    pub(crate) fn asked_in(&self, msg: &[u8]) -> bool {
        if u16_at(msg, 4) != Some(1) {
            return false;
        }
        // Answers echo the question uncompressed: compare in place.
        let name = self.name.as_slice();
        let n = name.len();
        if let Some(wire) = msg.get(HEADER_LEN..HEADER_LEN + n) {
            // The same bytes but for the letters' case: the same labels, so as valid an
            // uncompressed name as this one (built from a valid name) is.
            if wire.eq_ignore_ascii_case(name) {
                let at = HEADER_LEN + n;
                return u16_at(msg, at) == Some(self.qtype)
                    && u16_at(msg, at + 2) == Some(self.qclass);
            }
        }
        // Anything else (a pointer, a different name): hickory reads it.
        let mut dec = BinDecoder::new(msg);
        if dec.read_slice(HEADER_LEN).is_err() {
            return false;
        }
        Query::read(&mut dec).is_ok_and(|q| Question::from_query(&q) == *self)
    }
}

/// A query read by the fast path.
#[derive(Debug)]
pub(crate) struct FastQuery {
    pub qname: DnsName,
    pub question: Question,
    /// The DO bit when the query carried an OPT record.
    pub edns_do: Option<bool>,
}

/// Reads a query whose header was judged already (a query, opcode QUERY, one question): one
/// question with a plain name, no answer or authority records, at most an option-less OPT.
pub(crate) fn fast_query(bytes: &[u8]) -> Option<FastQuery> {
    if u16_at(bytes, 6)? != 0 || u16_at(bytes, 8)? != 0 {
        return None;
    }
    let additional = u16_at(bytes, 10)?;
    if additional > 1 {
        return None;
    }
    // Uncompressed (a question's name has nothing before it to point to but the header),
    // not the root, and no longer than the fast path reads names.
    let name_end = plain_name_end(bytes, HEADER_LEN)?;
    let wire = &bytes[HEADER_LEN..name_end];
    if wire.len() == 1 || wire.len() - 1 > FAST_NAME_MAX {
        return None;
    }
    let text = plain_text(wire)?;
    let qtype = u16_at(bytes, name_end)?;
    let qclass = u16_at(bytes, name_end + 2)?;
    let question_end = name_end + 4;
    let mut edns_do = None;
    let mut at = question_end;
    if additional == 1 {
        // root name, OPT, payload size, extended rcode/version/flags, no RDATA
        if *bytes.get(at)? != 0 || u16_at(bytes, at + 1)? != TYPE_OPT {
            return None;
        }
        let flags = u32_at(bytes, at + 5)?;
        if u16_at(bytes, at + 9)? != 0 {
            return None;
        }
        edns_do = Some(flags & 0x8000 != 0);
        at += 11;
    }
    if at != bytes.len() {
        return None;
    }
    Some(FastQuery {
        qname: DnsName::from_normal(text),
        question: Question {
            name: WireName::new(wire),
            qtype,
            qclass,
        },
        edns_do,
    })
}

/// The normal text of `wire`, a valid uncompressed name other than the root (see
/// [`plain_name_end`]), when every label is plain: one allocation of the exact size.
fn plain_text(wire: &[u8]) -> Option<String> {
    let mut text = Vec::with_capacity(wire.len() - 1);
    let mut at = 0;
    loop {
        let len = usize::from(wire[at]);
        if len == 0 {
            break;
        }
        if !push_plain_label(&wire[at + 1..at + 1 + len], &mut text) {
            return None;
        }
        at += 1 + len;
    }
    // SAFETY: only bytes of the PLAIN table (ASCII letters, digits, `-`, `_`) and `.`.
    Some(unsafe { String::from_utf8_unchecked(text) })
}

/// One record of an answer section the fast path read.
enum Data {
    V4(Ipv4Addr),
    V6(Ipv6Addr),
    /// The target's text in the owner arena.
    Cname(std::ops::Range<usize>),
}

struct Rec {
    owner: std::ops::Range<usize>,
    ttl: u32,
    data: Data,
}

/// Reads an upstream's response whose question the pool matched already: validates every
/// record as hickory would and, with `learn` (a NOERROR answer), computes what it teaches
/// about `qname` exactly as `message::extract_learning` does, into `out` (its vectors are
/// cleared and reused). `Some(true)`: valid and `out` holds what it teaches; `Some(false)`:
/// valid, teaches nothing. `None`: not for the fast path.
pub(crate) fn fast_answer(
    bytes: &[u8],
    qname: &DnsName,
    min_ttl: u32,
    learn: bool,
    out: &mut LearnedAnswer,
) -> Option<bool> {
    if bytes.len() < HEADER_LEN || bytes[2] & 0x80 == 0 || (bytes[2] >> 3) & 0x0f != 0 {
        return None;
    }
    if u16_at(bytes, 4)? != 1 {
        return None;
    }
    let counts = [u16_at(bytes, 6)?, u16_at(bytes, 8)?, u16_at(bytes, 10)?];
    SCRATCH.with(|scratch| {
        // Taken, not borrowed: a panic inside leaves the thread an empty scratch, not a
        // poisoned one.
        let (mut arena, mut recs) = scratch.take();
        arena.clear();
        recs.clear();
        let result = read_question(bytes, qname, &mut arena).and_then(|(at, question)| {
            read_records(bytes, at, counts, question, &mut arena, &mut recs)
                .map(|()| learn && learning(&arena, &recs, qname, min_ttl, out))
        });
        scratch.set((arena, recs));
        result
    })
}

/// Reads the question of an answer: where its records start, and, when the name is `qname`
/// (as it is in every answer the pool matched to its query), the name's text in `arena`:
/// answer records nearly always name their owner by a pointer to the question, and the text
/// is then copied rather than read again.
fn read_question(
    bytes: &[u8],
    qname: &DnsName,
    arena: &mut String,
) -> Option<(usize, Option<Range<usize>>)> {
    let (end, text) = match question_named(bytes, qname.as_str()) {
        Some(end) => {
            arena.push_str(qname.as_str());
            (end, Some(0..arena.len()))
        }
        None => (walk_name(bytes, HEADER_LEN, |_| true)?, None),
    };
    (end + 4 <= bytes.len()).then_some((end + 4, text))
}

/// The end of the name at the question's place when it is `text` (normal form) in wire form,
/// uncompressed, in any case, and every label is plain, within the fast path's length: then
/// [`read_plain_name`] would read `text` there. `None` otherwise (the name may still be
/// readable: the caller reads it the long way).
fn question_named(bytes: &[u8], text: &str) -> Option<usize> {
    let text = text.as_bytes();
    if text.len() < 2 || text.len() > FAST_NAME_MAX {
        return None; // the root, or longer than the fast path reads
    }
    // In wire form each label's length byte stands where the text has the dot before it
    // (and the root label where the text has its last dot), so text byte `j` lines up with
    // wire byte `j + 1`: one pass compares both.
    let wire = bytes.get(HEADER_LEN..HEADER_LEN + text.len() + 1)?;
    let mut start = 0;
    for (j, &c) in text.iter().enumerate() {
        if c == b'.' {
            let len = j - start;
            if len == 0 || len > 63 || usize::from(wire[start]) != len || text[start] == b'-' {
                return None;
            }
            start = j + 1;
        } else if c == 0 || PLAIN[usize::from(wire[j + 1])] != c {
            // PLAIN folds the wire byte: equal to the text's byte only when both are plain
            // and the same but for case.
            return None;
        }
    }
    (start == text.len() && wire[text.len()] == 0).then_some(HEADER_LEN + text.len() + 1)
}

/// A compression pointer to the question's name (right after the header).
const POINTER_TO_QUESTION: [u8; 2] = [0xc0, HEADER_LEN as u8];

thread_local! {
    /// [`fast_answer`]'s working space, kept between answers: names read and records.
    static SCRATCH: std::cell::Cell<(String, Vec<Rec>)> =
        const { std::cell::Cell::new((String::new(), Vec::new())) };
}

/// Validates the records from `at` on (`counts` per section) and gathers the answer
/// section's A, AAAA and CNAME records into `recs`, their names into `arena`. `None`: not for
/// the fast path.
fn read_records(
    bytes: &[u8],
    mut at: usize,
    counts: [u16; 3],
    question: Option<Range<usize>>,
    arena: &mut String,
    recs: &mut Vec<Rec>,
) -> Option<()> {
    let mut seen_opt = false;
    for (section, &count) in counts.iter().enumerate() {
        for _ in 0..count {
            // Only answer-section owners are read; the others are checked alike.
            let owner_start = arena.len();
            let (fixed, root) = if section == 0 {
                match &question {
                    // What reading the pointer would read: the question's name, which ends
                    // before this record (the walk's limits are the same).
                    Some(q) if bytes.get(at..at + 2) == Some(&POINTER_TO_QUESTION[..]) => {
                        arena.extend_from_within(q.clone());
                        (at + 2, false)
                    }
                    _ => (read_plain_name(bytes, at, arena)?, false),
                }
            } else {
                check_plain_name(bytes, at)?
            };
            let owner = owner_start..arena.len();
            let rtype = u16_at(bytes, fixed)?;
            let class = u16_at(bytes, fixed + 2)?;
            let ttl = u32_at(bytes, fixed + 4)?;
            let rdlen = usize::from(u16_at(bytes, fixed + 8)?);
            let rdata = fixed + 10;
            let rdend = rdata + rdlen;
            if rdend > bytes.len() {
                return None;
            }
            at = rdend;
            if rtype == TYPE_OPT {
                // Only in the additional section, once, with the root name and no options.
                if section != 2 || seen_opt || !root || rdlen != 0 {
                    return None;
                }
                seen_opt = true;
                continue;
            }
            if class != CLASS_IN {
                return None;
            }
            let data = match (section, rtype) {
                (0 | 2, TYPE_A) if rdlen == 4 => {
                    let o: [u8; 4] = bytes[rdata..rdend].try_into().ok()?;
                    Data::V4(Ipv4Addr::from(o))
                }
                (0 | 2, TYPE_AAAA) if rdlen == 16 => {
                    let o: [u8; 16] = bytes[rdata..rdend].try_into().ok()?;
                    Data::V6(Ipv6Addr::from(o))
                }
                (0, TYPE_CNAME) => {
                    let target_start = arena.len();
                    if walk_rdata_name(bytes, rdata, arena)? != rdend {
                        return None;
                    }
                    Data::Cname(target_start..arena.len())
                }
                (1, TYPE_NS) => {
                    if walk_name(bytes, rdata, |_| true)? != rdend {
                        return None;
                    }
                    continue;
                }
                (1, TYPE_SOA) => {
                    let rname = walk_name(bytes, rdata, |_| true)?;
                    if walk_name(bytes, rname, |_| true)? + 20 != rdend {
                        return None;
                    }
                    continue;
                }
                _ => return None,
            };
            if section == 0 {
                recs.push(Rec { owner, ttl, data });
            }
        }
    }
    (at == bytes.len()).then_some(())
}

/// A name in RDATA (a CNAME target): plain text into `arena`; its end.
fn walk_rdata_name(bytes: &[u8], at: usize, arena: &mut String) -> Option<usize> {
    let start = arena.len();
    let end = read_plain_name(bytes, at, arena)?;
    // The root as a target is valid but teaches no name worth filing: leave it to hickory.
    (&arena[start..] != ".").then_some(end)
}

/// `message::extract_learning` over the records read in place (no SVCB here: those answers
/// take the slow path), into `out`; false when the answer teaches no IP.
fn learning(
    arena: &str,
    recs: &[Rec],
    qname: &DnsName,
    min_ttl: u32,
    out: &mut LearnedAnswer,
) -> bool {
    let text = |r: &std::ops::Range<usize>| &arena[r.clone()];
    // The chain is at most MAX_CHAIN names: on the stack.
    let mut names = [""; MAX_CHAIN];
    names[0] = qname.as_str();
    let mut len = 1;
    let mut ttl = u32::MAX;
    'follow: while len < MAX_CHAIN {
        let chain = &names[..len];
        let current = chain[len - 1];
        for r in recs {
            if let Data::Cname(target) = &r.data {
                if text(&r.owner) == current {
                    let target = text(target);
                    if chain.contains(&target) {
                        break 'follow;
                    }
                    ttl = ttl.min(r.ttl);
                    names[len] = target;
                    len += 1;
                    continue 'follow;
                }
            }
        }
        break;
    }
    let chain = &names[..len];
    let ips = &mut out.ips;
    ips.clear();
    let mut seen: Option<std::collections::HashSet<IpAddr>> = None;
    for r in recs {
        let ip = match r.data {
            Data::V4(a) => IpAddr::V4(a),
            Data::V6(a) => IpAddr::V6(a),
            Data::Cname(_) => continue,
        };
        if !chain.contains(&text(&r.owner)) {
            continue;
        }
        ttl = ttl.min(r.ttl);
        let new = match &mut seen {
            Some(set) => set.insert(ip),
            None if ips.len() < DEDUP_SCAN => !ips.contains(&ip),
            None => {
                let mut set: std::collections::HashSet<IpAddr> = ips.iter().copied().collect();
                let new = set.insert(ip);
                seen = Some(set);
                new
            }
        };
        if new {
            ips.push(ip);
        }
    }
    out.chain.clear();
    if ips.is_empty() {
        return false;
    }
    out.chain.extend(
        chain[1..]
            .iter()
            .map(|n| DnsName::from_normal((*n).to_owned())),
    );
    out.ttl = ttl.max(min_ttl);
    true
}
