//! Sans-I/O message work: judging a client's bytes, building the proxy's own answers, matching
//! upstream answers to queries and reading what an answer teaches. No sockets, no clock.

use std::collections::HashSet;
use std::net::IpAddr;

use hickory_proto::op::{Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::svcb::SvcParamValue;
use hickory_proto::rr::{Name, RData};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use policy::fqdn::DnsName;

use crate::hooks::LearnedAnswer;
use crate::wire::{fast_query, Question};

pub(crate) const HEADER_LEN: usize = 12;
/// The EDNS payload size the proxy advertises in answers it builds itself (the DNS flag day
/// 2020 value: no fragmentation).
const OWN_EDNS_PAYLOAD: u16 = 1232;
/// Longest CNAME chain followed; real chains are a handful of names, longer ones are loops
/// or abuse.
pub(crate) const MAX_CHAIN: usize = 16;
/// Learned IPs up to which duplicates are found by a scan rather than a set.
pub(crate) const DEDUP_SCAN: usize = 16;

/// A client query the proxy can judge and forward: its name (moved into the query's
/// context for the policy and the learner) and the rest.
#[derive(Debug)]
pub(crate) struct ClientQuery {
    pub qname: DnsName,
    pub meta: QueryMeta,
}

/// What the proxy keeps of a client query besides its name: the question answers must
/// carry, and what an answer of the proxy's own echoes.
#[derive(Debug)]
pub(crate) struct QueryMeta {
    pub id: u16,
    pub question: Question,
    /// Read by the fast path (a plain name): its answers may be read by the fast path too.
    pub plain: bool,
    head: Head,
}

/// What to do with client bytes that are not a judgeable query.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// Not answerable (no header, or a response): dropped and counted.
    Drop(&'static str),
    /// Answered with `rcode` (FORMERR or NOTIMP); `response` is ready to send.
    Answer {
        response: Vec<u8>,
        rcode: ResponseCode,
        reason: String,
    },
}

/// The header fields and question an answer of the proxy's own echoes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Head {
    id: u16,
    op_code: OpCode,
    rd: bool,
    cd: bool,
    /// The question's bytes as the client sent them (case kept: some clients check it).
    question: Echo,
    /// (DO bit) when the query carried an OPT record: the answer carries one too (RFC 6891).
    edns_do: Option<bool>,
}

/// The question an answer of the proxy's own echoes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Echo {
    /// None (no single readable question).
    None,
    /// These bytes.
    Bytes(Vec<u8>),
    /// The query's [`Question`], which the fast path keeps as the client wrote it: its
    /// name's wire form, type and class are the question's bytes (no copy of them kept).
    Question,
}

fn read_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Where the first question of a message ends, when it parses (as hickory's `Query::read`
/// decides). Uncompressed names, which every real query carries, are walked by hand: a name
/// of labels of 1–63 bytes ending in the root label, at most 255 bytes on the wire, then type
/// and class. Anything else (a compression pointer, a reserved label code, a truncation) is
/// left to hickory, so the answer is hickory's in every case.
pub(crate) fn question_end(bytes: &[u8]) -> Option<usize> {
    match plain_name_end(bytes, HEADER_LEN) {
        Some(end) => (end + 4 <= bytes.len()).then_some(end + 4),
        None => {
            let mut dec = BinDecoder::new(bytes);
            dec.read_slice(HEADER_LEN).ok()?;
            Query::read(&mut dec).ok()?;
            Some(dec.index())
        }
    }
}

/// The end of an uncompressed, valid name starting at `start`; `None` when the name is not one
/// (pointer, reserved label code, too long, truncated), for the caller to decide with a full
/// decoder.
pub(crate) fn plain_name_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut at = start;
    loop {
        let len = usize::from(*bytes.get(at)?);
        if len == 0 {
            // hickory's limit: label bytes plus one length byte each plus the root, ≤ 255.
            return (at + 1 - start <= Name::MAX_LENGTH).then_some(at + 1);
        }
        if len > 63 {
            return None; // a pointer or a reserved label type
        }
        at += 1 + len;
        if at - start >= Name::MAX_LENGTH {
            return None;
        }
    }
}

/// Judges the bytes a client sent: exactly one question and opcode QUERY, and the whole
/// message must parse; otherwise FORMERR / NOTIMP (with ID and question echoed where they
/// parse) or, when not even a query header is there, a drop.
pub(crate) fn parse_client_query(bytes: &[u8]) -> Result<ClientQuery, Rejection> {
    parse_query(bytes, true)
}

/// `parse_client_query`, with the fast path (`wire`) for the queries it takes or hickory for
/// all: the two give the same result (property-tested).
fn parse_query(bytes: &[u8], fast: bool) -> Result<ClientQuery, Rejection> {
    if bytes.len() < HEADER_LEN {
        return Err(Rejection::Drop("shorter than a DNS header"));
    }
    if bytes[2] & 0x80 != 0 {
        return Err(Rejection::Drop("a response, not a query"));
    }
    let id = read_u16(bytes, 0);
    let op_code = OpCode::from_u8((bytes[2] >> 3) & 0x0f);
    let rd = bytes[2] & 0x01 != 0;
    let cd = bytes[3] & 0x10 != 0;
    let qdcount = read_u16(bytes, 4);
    if fast && op_code == OpCode::Query && qdcount == 1 {
        if let Some(fast) = fast_query(bytes) {
            return Ok(ClientQuery {
                qname: fast.qname,
                meta: QueryMeta {
                    id,
                    question: fast.question,
                    plain: true,
                    head: Head {
                        id,
                        op_code,
                        rd,
                        cd,
                        question: Echo::Question,
                        edns_do: fast.edns_do,
                    },
                },
            });
        }
    }
    let first_question = if qdcount >= 1 {
        question_end(bytes).map(|end| bytes[HEADER_LEN..end].to_vec())
    } else {
        None
    };
    let mut head = Head {
        id,
        op_code,
        rd,
        cd,
        question: match first_question {
            Some(q) if qdcount == 1 => Echo::Bytes(q),
            _ => Echo::None,
        },
        edns_do: None,
    };
    let answer = |head: &Head, rcode: ResponseCode, reason: String| Rejection::Answer {
        response: build_answer(head, None, rcode),
        rcode,
        reason,
    };
    if op_code != OpCode::Query {
        return Err(answer(
            &head,
            ResponseCode::NotImp,
            format!("opcode {op_code} is not QUERY"),
        ));
    }
    if qdcount != 1 {
        return Err(answer(
            &head,
            ResponseCode::FormErr,
            format!("{qdcount} questions, exactly one is served"),
        ));
    }
    let msg = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(e) => {
            return Err(answer(
                &head,
                ResponseCode::FormErr,
                format!("unparsable: {e}"),
            ))
        }
    };
    let Some(query) = msg.queries.first().cloned() else {
        return Err(answer(&head, ResponseCode::FormErr, "no question".into()));
    };
    head.edns_do = msg.edns.as_ref().map(|e| e.flags().dnssec_ok);
    let qname = DnsName::new(&query.name().to_ascii());
    Ok(ClientQuery {
        qname,
        meta: QueryMeta {
            id,
            question: Question::from_query(&query),
            plain: false,
            head,
        },
    })
}

impl QueryMeta {
    /// The answer to a query the policy denied: `rcode`, question echoed, no records.
    pub(crate) fn reject(&self, rcode: ResponseCode) -> Vec<u8> {
        build_answer(&self.head, Some(&self.question), rcode)
    }

    /// SERVFAIL for this query (the proxy or the upstream failed).
    pub(crate) fn servfail(&self) -> Vec<u8> {
        build_answer(&self.head, Some(&self.question), ResponseCode::ServFail)
    }
}

/// Builds a bodiless answer by hand: header, the client's question bytes verbatim, and an OPT
/// record when the query had one. RA mirrors RD: the proxy fronts recursive resolvers, so
/// recursion is available exactly to those who asked for it.
fn build_answer(head: &Head, question: Option<&Question>, rcode: ResponseCode) -> Vec<u8> {
    let (name, type_class): (&[u8], Option<[u8; 4]>) = match (&head.question, question) {
        (Echo::Bytes(b), _) => (b, None),
        (Echo::Question, Some(q)) => (q.wire_name(), Some(q.type_class())),
        (Echo::None, _) | (Echo::Question, None) => (&[], None),
    };
    let type_class = type_class.as_ref().map_or(&[][..], |t| &t[..]);
    let echoed = !name.is_empty();
    let mut v = Vec::with_capacity(HEADER_LEN + name.len() + type_class.len() + 11);
    v.extend_from_slice(&head.id.to_be_bytes());
    v.push(0x80 | (u8::from(head.op_code) << 3) | u8::from(head.rd));
    v.push((u8::from(head.rd) << 7) | (u8::from(head.cd) << 4) | (rcode.low() & 0x0f));
    v.extend_from_slice(&u16::from(echoed).to_be_bytes());
    v.extend_from_slice(&[0, 0, 0, 0]); // no answer, no authority
    v.extend_from_slice(&u16::from(head.edns_do.is_some()).to_be_bytes());
    v.extend_from_slice(name);
    v.extend_from_slice(type_class);
    if let Some(dnssec_ok) = head.edns_do {
        v.push(0); // root name
        v.extend_from_slice(&41u16.to_be_bytes()); // OPT
        v.extend_from_slice(&OWN_EDNS_PAYLOAD.to_be_bytes());
        v.extend_from_slice(&[0, 0]); // extended rcode, version 0
        v.extend_from_slice(&(u16::from(dnssec_ok) << 15).to_be_bytes());
        v.extend_from_slice(&[0, 0]); // no options
    }
    v
}

/// The ID of an upstream answer (a response of one question), read without parsing the rest;
/// [`Question::asked_in`] matches its question.
pub(crate) fn answer_id(bytes: &[u8]) -> Option<u16> {
    if bytes.len() < HEADER_LEN || bytes[2] & 0x80 == 0 || read_u16(bytes, 4) != 1 {
        return None;
    }
    Some(read_u16(bytes, 0))
}

/// Sets the ID of a message in place.
pub(crate) fn set_id(bytes: &mut [u8], id: u16) {
    bytes[0..2].copy_from_slice(&id.to_be_bytes());
}

/// The rcode of a message (header bits only; extended rcodes in OPT are not looked at).
pub(crate) fn header_rcode(bytes: &[u8]) -> u16 {
    u16::from(bytes[3] & 0x0f)
}

/// What a NOERROR answer to `question` teaches: the CNAME chain from the question name through
/// the answer section, the A/AAAA of the chain's names, the SVCB/HTTPS ipv4hint/ipv6hint of
/// the chain's names, and the smallest TTL of the records used, raised to `min_ttl`. `None`
/// when it teaches no IP.
pub(crate) fn extract_learning(
    msg: &Message,
    question: &Name,
    min_ttl: u32,
) -> Option<LearnedAnswer> {
    let mut chain: Vec<Name> = vec![question.clone()];
    let mut ttl = u32::MAX;
    // Follow CNAMEs in whatever order the server put them.
    'follow: while chain.len() < MAX_CHAIN {
        let current = chain.last().expect("chain starts non-empty");
        for r in &msg.answers {
            if let RData::CNAME(target) = &r.data {
                if &r.name == current {
                    if chain.contains(&target.0) {
                        break 'follow; // a loop: stop at its first repetition
                    }
                    ttl = ttl.min(r.ttl);
                    chain.push(target.0.clone());
                    continue 'follow;
                }
            }
        }
        break;
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    // Answers carry a handful of addresses: a scan of those kept beats hashing each; a set
    // takes over once there are many (a large answer must not cost quadratic time).
    let mut seen: Option<HashSet<IpAddr>> = None;
    let mut push = |ip: IpAddr, ips: &mut Vec<IpAddr>| {
        let new = match &mut seen {
            Some(set) => set.insert(ip),
            None if ips.len() < DEDUP_SCAN => !ips.contains(&ip),
            None => {
                let mut set: HashSet<IpAddr> = ips.iter().copied().collect();
                let new = set.insert(ip);
                seen = Some(set);
                new
            }
        };
        if new {
            ips.push(ip);
        }
    };
    let in_chain = |n: &Name| chain.iter().any(|c| c == n);
    let mut hint_ips = Vec::new();
    let mut hint_ttl = u32::MAX;
    for r in &msg.answers {
        if !in_chain(&r.name) {
            continue;
        }
        match &r.data {
            RData::A(a) => {
                push(IpAddr::V4(a.0), &mut ips);
                ttl = ttl.min(r.ttl);
            }
            RData::AAAA(a) => {
                push(IpAddr::V6(a.0), &mut ips);
                ttl = ttl.min(r.ttl);
            }
            RData::SVCB(s) | RData::HTTPS(hickory_proto::rr::rdata::HTTPS(s)) => {
                let before = hint_ips.len();
                for (_, v) in &s.svc_params {
                    match v {
                        SvcParamValue::Ipv4Hint(h) => {
                            hint_ips.extend(h.0.iter().map(|a| IpAddr::V4(a.0)))
                        }
                        SvcParamValue::Ipv6Hint(h) => {
                            hint_ips.extend(h.0.iter().map(|a| IpAddr::V6(a.0)))
                        }
                        _ => {}
                    }
                }
                if hint_ips.len() > before {
                    hint_ttl = hint_ttl.min(r.ttl);
                }
            }
            _ => {}
        }
    }
    // Hints after the addresses proper, so the order reads "A/AAAA, then hints".
    if !hint_ips.is_empty() {
        ttl = ttl.min(hint_ttl);
        for ip in hint_ips {
            push(ip, &mut ips);
        }
    }
    if ips.is_empty() {
        return None;
    }
    Some(LearnedAnswer {
        chain: chain[1..]
            .iter()
            .map(|n| DnsName::new(&n.to_ascii()))
            .collect(),
        ips,
        ttl: ttl.max(min_ttl),
    })
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::str::FromStr;

    use hickory_proto::rr::rdata::svcb::{IpHint, SvcParamKey, SVCB};
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, HTTPS};
    use hickory_proto::rr::{Record, RecordType};

    use hickory_proto::op::{Edns, MessageType};

    use super::*;

    fn name(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    fn query_bytes(id: u16, qname: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(name(qname), qtype));
        m.to_vec().unwrap()
    }

    fn rejected_rcode(bytes: &[u8]) -> (ResponseCode, Message) {
        match parse_client_query(bytes) {
            Err(Rejection::Answer {
                response, rcode, ..
            }) => (rcode, Message::from_vec(&response).unwrap()),
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    #[test]
    fn good_query_parses_and_normalises_name() {
        let mut bytes = query_bytes(7, "www.example.com.", RecordType::A);
        bytes[13..16].copy_from_slice(b"WwW"); // mixed case on the wire (0x20 clients)
        let q = parse_client_query(&bytes).unwrap();
        assert_eq!(q.meta.id, 7);
        assert_eq!(q.qname.as_str(), "www.example.com.");
        let refused_bytes = q.meta.reject(ResponseCode::Refused);
        assert_eq!(
            refused_bytes[12..],
            bytes[12..],
            "question echoed byte for byte"
        );
        let refused = Message::from_vec(&refused_bytes).unwrap();
        assert_eq!(refused.id, 7);
        assert_eq!(refused.response_code, ResponseCode::Refused);
        assert_eq!(refused.message_type, MessageType::Response);
        assert!(refused.recursion_available && refused.recursion_desired);
        assert!(refused.answers.is_empty());
        assert!(refused.edns.is_none());
    }

    #[test]
    fn edns_is_echoed_in_own_answers() {
        let mut m = Message::new(9, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(name("a.test."), RecordType::A));
        let mut e = Edns::new();
        e.set_max_payload(4096);
        e.set_dnssec_ok(true);
        m.set_edns(e);
        let q = parse_client_query(&m.to_vec().unwrap()).unwrap();
        let nx = Message::from_vec(&q.meta.reject(ResponseCode::NXDomain)).unwrap();
        assert_eq!(nx.response_code, ResponseCode::NXDomain);
        let edns = nx.edns.expect("OPT echoed");
        assert!(edns.flags().dnssec_ok);
    }

    #[test]
    fn garbage_and_responses_are_dropped() {
        assert!(matches!(
            parse_client_query(&[1, 2, 3]),
            Err(Rejection::Drop(_))
        ));
        let mut resp = query_bytes(1, "a.test.", RecordType::A);
        resp[2] |= 0x80;
        assert!(matches!(parse_client_query(&resp), Err(Rejection::Drop(_))));
    }

    #[test]
    fn two_questions_formerr_without_question() {
        let mut m = Message::new(3, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(name("a.test."), RecordType::A));
        m.add_query(Query::query(name("b.test."), RecordType::A));
        let (rcode, msg) = rejected_rcode(&m.to_vec().unwrap());
        assert_eq!(rcode, ResponseCode::FormErr);
        assert_eq!(msg.id, 3);
        assert!(msg.queries.is_empty());
    }

    #[test]
    fn truncated_query_formerr_with_question_when_it_parses() {
        let mut b = query_bytes(4, "a.test.", RecordType::A);
        b[11] = 1; // claims an additional record that is not there
        let (rcode, msg) = rejected_rcode(&b);
        assert_eq!(rcode, ResponseCode::FormErr);
        assert_eq!(msg.queries.len(), 1);
        let b = query_bytes(5, "a.test.", RecordType::A);
        let (rcode, msg) = rejected_rcode(&b[..b.len() - 3]);
        assert_eq!(rcode, ResponseCode::FormErr);
        assert_eq!(msg.id, 5);
        assert!(msg.queries.is_empty());
    }

    #[test]
    fn other_opcode_notimp() {
        let mut b = query_bytes(6, "a.test.", RecordType::SOA);
        b[2] |= 4 << 3; // NOTIFY
        let (rcode, msg) = rejected_rcode(&b);
        assert_eq!(rcode, ResponseCode::NotImp);
        assert_eq!(msg.op_code, OpCode::Notify);
        assert_eq!(msg.queries.len(), 1);
    }

    #[test]
    fn answer_id_and_question_match() {
        let mut b = query_bytes(0x1234, "A.Test.", RecordType::AAAA);
        assert!(answer_id(&b).is_none(), "a query is not an answer");
        b[2] |= 0x80;
        assert_eq!(answer_id(&b), Some(0x1234));
        let asked = |n: &str, t| Question::from_query(&Query::query(name(n), t));
        assert!(asked("a.test.", RecordType::AAAA).asked_in(&b));
        assert!(asked("A.TEST.", RecordType::AAAA).asked_in(&b));
        assert!(!asked("a.test.", RecordType::A).asked_in(&b));
        assert!(!asked("b.test.", RecordType::AAAA).asked_in(&b));
        assert!(!asked("a.test.x.", RecordType::AAAA).asked_in(&b));
        set_id(&mut b, 9);
        assert_eq!(answer_id(&b), Some(9));
    }

    fn rec(n: &str, ttl: u32, data: RData) -> Record {
        Record::from_rdata(name(n), ttl, data)
    }

    #[test]
    fn learning_follows_cname_chain_with_min_ttl() {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        // Deliberately out of order, plus an unrelated record.
        m.add_answer(rec("c.test.", 30, RData::A(A(Ipv4Addr::new(192, 0, 2, 1)))));
        m.add_answer(rec("a.test.", 300, RData::CNAME(CNAME(name("B.test.")))));
        m.add_answer(rec("b.test.", 20, RData::CNAME(CNAME(name("c.test.")))));
        m.add_answer(rec(
            "x.test.",
            1,
            RData::A(A(Ipv4Addr::new(198, 51, 100, 1))),
        ));
        m.add_answer(rec(
            "c.test.",
            60,
            RData::AAAA(AAAA(Ipv6Addr::from_str("2001:db8::1").unwrap())),
        ));
        let l = extract_learning(&m, &name("A.TEST."), 0).unwrap();
        let chain: Vec<_> = l.chain.iter().map(|n| n.as_str()).collect();
        assert_eq!(chain, ["b.test.", "c.test."]);
        assert_eq!(
            l.ips,
            vec![
                IpAddr::from_str("192.0.2.1").unwrap(),
                IpAddr::from_str("2001:db8::1").unwrap()
            ]
        );
        assert_eq!(l.ttl, 20);
        assert_eq!(
            extract_learning(&m, &name("a.test."), 100).unwrap().ttl,
            100
        );
    }

    #[test]
    fn learning_cname_loop_terminates_and_no_ips_is_none() {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.add_answer(rec("a.test.", 5, RData::CNAME(CNAME(name("b.test.")))));
        m.add_answer(rec("b.test.", 5, RData::CNAME(CNAME(name("a.test.")))));
        assert!(extract_learning(&m, &name("a.test."), 0).is_none());
    }

    #[test]
    fn learning_svcb_hints() {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        let svcb = SVCB::new(
            1,
            name("."),
            vec![
                (
                    SvcParamKey::Ipv4Hint,
                    SvcParamValue::Ipv4Hint(IpHint(vec![A(Ipv4Addr::new(192, 0, 2, 7))])),
                ),
                (
                    SvcParamKey::Ipv6Hint,
                    SvcParamValue::Ipv6Hint(IpHint(vec![AAAA(
                        Ipv6Addr::from_str("2001:db8::7").unwrap(),
                    )])),
                ),
            ],
        );
        m.add_answer(rec("svc.test.", 42, RData::HTTPS(HTTPS(svcb))));
        let l = extract_learning(&m, &name("svc.test."), 0).unwrap();
        assert_eq!(l.ips.len(), 2);
        assert_eq!(l.ttl, 42);
    }

    /// hickory's verdict on the first question: where it ends, when it parses.
    fn hickory_question_end(bytes: &[u8]) -> Option<usize> {
        let mut dec = BinDecoder::new(bytes);
        dec.read_slice(HEADER_LEN).ok()?;
        Query::read(&mut dec).ok()?;
        Some(dec.index())
    }

    fn with_header(question: &[u8]) -> Vec<u8> {
        let mut b = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        b.extend_from_slice(question);
        b
    }

    fn wire_name(labels: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for l in labels {
            v.push(u8::try_from(l.len()).unwrap());
            v.extend_from_slice(l);
        }
        v.push(0);
        v
    }

    #[test]
    fn question_end_plain_names() {
        let mut q = wire_name(&[b"www", b"Example", b"com"]);
        q.extend_from_slice(&[0, 1, 0, 1]);
        let b = with_header(&q);
        assert_eq!(question_end(&b), Some(b.len()));
        assert_eq!(question_end(&b), hickory_question_end(&b));
        // The root name.
        let b = with_header(&[0, 0, 1, 0, 1]);
        assert_eq!(question_end(&b), Some(17));
        // Trailing sections are not part of the question.
        let mut longer = with_header(&q);
        longer.extend_from_slice(&[0, 0, 41, 4, 0xd0]);
        assert_eq!(question_end(&longer), Some(HEADER_LEN + q.len()));
    }

    #[test]
    fn question_end_truncated_and_malformed() {
        let mut q = wire_name(&[b"www", b"example", b"com"]);
        q.extend_from_slice(&[0, 1, 0, 1]);
        let full = with_header(&q);
        // Every cut, inside the name or the type/class: no question, as hickory says.
        for cut in HEADER_LEN..full.len() {
            assert_eq!(question_end(&full[..cut]), None, "cut at {cut}");
            assert_eq!(hickory_question_end(&full[..cut]), None, "cut at {cut}");
        }
        // A label length running past the end.
        assert_eq!(question_end(&with_header(&[5, b'a', b'b'])), None);
        // Reserved label codes 0b01 and 0b10.
        for code in [0x40, 0x80, 0x7f, 0xbf] {
            let b = with_header(&[code, 0, 0, 1, 0, 1]);
            assert_eq!(question_end(&b), None);
            assert_eq!(hickory_question_end(&b), None);
        }
        // Only a header.
        assert_eq!(question_end(&with_header(&[])), None);
    }

    #[test]
    fn question_end_length_limit_matches_hickory() {
        // Names of 63-byte labels around the 255-byte limit, and 1-byte labels up to it.
        let long = [b'a'; 63];
        for extra in 0..70 {
            let mut labels: Vec<&[u8]> = vec![&long[..]; 3];
            let tail = vec![b'b'; extra.clamp(1, 63)];
            if extra > 0 {
                labels.push(&tail);
            }
            let mut q = wire_name(&labels);
            q.extend_from_slice(&[0, 1, 0, 1]);
            let b = with_header(&q);
            assert_eq!(question_end(&b), hickory_question_end(&b), "extra {extra}");
        }
        let one = [b'x'];
        for n in 120..135 {
            let labels: Vec<&[u8]> = vec![&one[..]; n];
            let mut q = wire_name(&labels);
            q.extend_from_slice(&[0, 1, 0, 1]);
            let b = with_header(&q);
            assert_eq!(question_end(&b), hickory_question_end(&b), "{n} labels");
        }
        // 255 bytes on the wire parse, 256 do not.
        let mut ok = wire_name(&[&long, &long, &long, &[b'c'; 61]]);
        assert_eq!(ok.len(), 255);
        ok.extend_from_slice(&[0, 1, 0, 1]);
        assert!(question_end(&with_header(&ok)).is_some());
        let mut too_long = wire_name(&[&long, &long, &long, &[b'c'; 62]]);
        too_long.extend_from_slice(&[0, 1, 0, 1]);
        assert_eq!(question_end(&with_header(&too_long)), None);
    }

    #[test]
    fn question_end_compression_pointers_are_hickorys() {
        // A pointer to itself (a loop), forward, into the header, and after a label: hickory
        // decides each, and the fast path agrees by deferring.
        let cases: [&[u8]; 5] = [
            &[0xc0, 12, 0, 1, 0, 1],
            &[0xc0, 14, 0, 1, 0, 1, 0],
            &[0xc0, 0, 0, 1, 0, 1],
            &[1, b'a', 0xc0, 12, 0, 1, 0, 1],
            &[1, b'a', 0xc0, 0x0e, 0, 1, 0, 1],
        ];
        for q in cases {
            let b = with_header(q);
            assert_eq!(question_end(&b), hickory_question_end(&b), "{q:?}");
        }
        // A loop is never a question.
        assert_eq!(question_end(&with_header(&[0xc0, 12, 0, 1, 0, 1])), None);
    }

    #[test]
    fn learning_dedups_past_the_scan_limit() {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        for round in 0..2u8 {
            for i in 0..40u8 {
                m.add_answer(rec(
                    "many.test.",
                    60 + u32::from(round),
                    RData::A(A(Ipv4Addr::new(192, 0, 2, i))),
                ));
            }
        }
        let l = extract_learning(&m, &name("many.test."), 0).unwrap();
        let want: Vec<IpAddr> = (0..40u8)
            .map(|i| IpAddr::V4(Ipv4Addr::new(192, 0, 2, i)))
            .collect();
        assert_eq!(l.ips, want, "each IP once, in answer order");
        assert_eq!(l.ttl, 60);
    }

    mod untrusted_bytes {
        use proptest::prelude::*;

        use super::*;

        fn valid_query() -> impl Strategy<Value = Vec<u8>> {
            (
                "[a-z]{1,10}(\\.[a-z]{1,10}){0,3}",
                any::<u16>(),
                prop::sample::select(vec![
                    RecordType::A,
                    RecordType::AAAA,
                    RecordType::HTTPS,
                    RecordType::MX,
                ]),
            )
                .prop_map(|(n, id, t)| query_bytes(id, &format!("{n}."), t))
        }

        proptest! {
            /// Whatever a client sends: no panic; an answer of the proxy's own parses and
            /// carries the client's ID.
            #[test]
            fn client_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
                check_client_bytes(&bytes)?;
            }

            /// Valid queries with bytes flipped, cut or appended: the same.
            #[test]
            fn mutated_queries_never_panic(
                q in valid_query(),
                flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
                cut in any::<prop::sample::Index>(),
                tail in prop::collection::vec(any::<u8>(), 0..20),
            ) {
                let mut b = q.clone();
                for (i, v) in flips {
                    let i = i.index(b.len());
                    b[i] ^= v;
                }
                b.truncate(cut.index(b.len() + 1));
                b.extend_from_slice(&tail);
                check_client_bytes(&b)?;
                // Upstream answers are untrusted too.
                let _ = answer_id(&b);
                let _ = Question::from_query(&Query::query(name("a.test."), RecordType::A))
                    .asked_in(&b);
                if let Ok(m) = Message::from_vec(&b) {
                    let _ = extract_learning(&m, &name("a.test."), 0);
                }
            }
        }

        /// A message of random labels (any bytes, 1–63 long, any case), random type and class,
        /// and random trailing bytes.
        fn valid_question_message() -> impl Strategy<Value = Vec<u8>> {
            (
                prop::collection::vec(prop::collection::vec(any::<u8>(), 1..64), 0..6),
                any::<u16>(),
                any::<u16>(),
                prop::collection::vec(any::<u8>(), 0..16),
            )
                .prop_map(|(labels, t, c, tail)| {
                    let mut b = vec![0, 1, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
                    for l in labels {
                        b.push(u8::try_from(l.len()).unwrap());
                        b.extend_from_slice(&l);
                    }
                    b.push(0);
                    b.extend_from_slice(&t.to_be_bytes());
                    b.extend_from_slice(&c.to_be_bytes());
                    b.extend_from_slice(&tail);
                    b
                })
        }

        proptest! {
            /// The hand-walked question ends where hickory's decoder ends it, or both refuse:
            /// on valid questions, on hickory-built queries, and on those cut or mutated.
            #[test]
            fn question_end_agrees_with_hickory(
                q in prop_oneof![valid_question_message(), valid_query()],
                flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
                cut in any::<prop::sample::Index>(),
            ) {
                prop_assert_eq!(question_end(&q), hickory_question_end(&q));
                let mut b = q.clone();
                for (i, v) in flips {
                    let i = i.index(b.len());
                    b[i] ^= v;
                }
                prop_assert_eq!(question_end(&b), hickory_question_end(&b));
                b.truncate(cut.index(b.len() + 1));
                prop_assert_eq!(question_end(&b), hickory_question_end(&b));
            }

            /// A whole valid message: the question hickory parses is the bytes walked.
            #[test]
            fn question_bytes_are_hickorys_question(q in valid_query()) {
                let end = question_end(&q).expect("a valid query has a question");
                let m = Message::from_vec(&q).unwrap();
                let mut dec = BinDecoder::new(&q[HEADER_LEN..end]);
                let parsed = Query::read(&mut dec).unwrap();
                prop_assert_eq!(&parsed, &m.queries[0]);
                prop_assert_eq!(dec.index(), end - HEADER_LEN);
            }
        }

        fn check_client_bytes(bytes: &[u8]) -> Result<(), TestCaseError> {
            match parse_client_query(bytes) {
                Ok(q) => {
                    let r = q.meta.reject(ResponseCode::Refused);
                    prop_assert!(Message::from_vec(&r).is_ok());
                    prop_assert_eq!(&r[0..2], &bytes[0..2]);
                }
                Err(Rejection::Answer { response, .. }) => {
                    prop_assert!(Message::from_vec(&response).is_ok(), "own answer parses");
                    prop_assert_eq!(&response[0..2], &bytes[0..2]);
                }
                Err(Rejection::Drop(_)) => {}
            }
            Ok(())
        }
    }

    /// The fast path (`wire`) against hickory: the same result on every message it claims,
    /// and it claims the common ones.
    mod fast_path {
        use hickory_proto::rr::rdata::{NS, SOA};
        use proptest::prelude::*;

        use super::*;
        use crate::wire::fast_answer;

        /// Labels of letters, digits, `_` and `-` (a leading `-` makes a name the fast path
        /// leaves to hickory), in any case.
        fn label() -> impl Strategy<Value = String> {
            "[a-zA-Z0-9_-]{1,10}"
        }

        fn plain(n: &str) -> bool {
            !n.split('.').any(|l| l.starts_with('-'))
        }

        fn labels_name(n: &str) -> Name {
            Name::from_labels(n.trim_end_matches('.').split('.').map(str::as_bytes)).unwrap()
        }

        fn query_of(n: &str, id: u16, t: u16, edns: Option<(bool, u16)>) -> Vec<u8> {
            let mut m = Message::new(id, MessageType::Query, OpCode::Query);
            m.metadata.recursion_desired = id.is_multiple_of(2);
            m.add_query(Query::query(labels_name(n), RecordType::from(t)));
            if let Some((dnssec_ok, payload)) = edns {
                let mut e = Edns::new();
                e.set_dnssec_ok(dnssec_ok);
                e.set_max_payload(payload.max(512));
                m.set_edns(e);
            }
            m.to_vec().unwrap()
        }

        fn qname() -> impl Strategy<Value = String> {
            prop::collection::vec(label(), 1..5).prop_map(|l| format!("{}.", l.join(".")))
        }

        fn query() -> impl Strategy<Value = (String, Vec<u8>)> {
            (
                qname(),
                any::<u16>(),
                prop::sample::select(vec![1u16, 28, 65, 15, 255]),
                prop::option::of((any::<bool>(), any::<u16>())),
            )
                .prop_map(|(n, id, t, e)| {
                    let b = query_of(&n, id, t, e);
                    (n, b)
                })
        }

        fn same_parse(b: &[u8]) -> Result<(), TestCaseError> {
            match (parse_query(b, true), parse_query(b, false)) {
                (Ok(f), Ok(s)) => {
                    prop_assert_eq!(f.meta.id, s.meta.id);
                    prop_assert_eq!(&f.meta.question, &s.meta.question);
                    prop_assert_eq!(&f.qname, &s.qname);
                    // The proxy's own answers, byte for byte: the question echoed as sent.
                    prop_assert_eq!(
                        f.meta.reject(ResponseCode::Refused),
                        s.meta.reject(ResponseCode::Refused)
                    );
                    prop_assert_eq!(f.meta.servfail(), s.meta.servfail());
                }
                (Err(f), Err(s)) => prop_assert_eq!(f, s),
                (f, s) => prop_assert!(false, "fast {:?}, hickory {:?}", f, s),
            }
            Ok(())
        }

        /// One answer record: owner and CNAME target from a small set of names (so chains,
        /// loops and strangers occur), addresses from a small set (so duplicates occur).
        #[derive(Debug, Clone)]
        enum Rec {
            A(usize, u8, u32),
            Aaaa(usize, u8, u32),
            Cname(usize, usize, u32),
        }

        fn rec() -> impl Strategy<Value = Rec> {
            let ttl = prop_oneof![Just(0u32), Just(30), Just(300), any::<u32>()];
            prop_oneof![
                (0..5usize, 0..4u8, ttl.clone()).prop_map(|(o, i, t)| Rec::A(o, i, t)),
                (0..5usize, 0..4u8, ttl.clone()).prop_map(|(o, i, t)| Rec::Aaaa(o, i, t)),
                (0..5usize, 0..5usize, ttl).prop_map(|(o, c, t)| Rec::Cname(o, c, t)),
            ]
        }

        #[derive(Debug, Clone)]
        struct AnswerCase {
            qname: String,
            names: Vec<String>,
            recs: Vec<Rec>,
            soa: bool,
            ns: bool,
            glue: bool,
            edns: Option<bool>,
            rcode: ResponseCode,
            min_ttl: u32,
        }

        fn answer_case() -> impl Strategy<Value = AnswerCase> {
            (
                qname(),
                prop::collection::vec(qname(), 4),
                prop::collection::vec(rec(), 0..9),
                (any::<bool>(), any::<bool>(), any::<bool>()),
                prop::option::of(any::<bool>()),
                prop::sample::select(vec![ResponseCode::NoError, ResponseCode::NXDomain]),
                prop_oneof![Just(0u32), Just(60), any::<u32>()],
            )
                .prop_map(
                    |(qname, others, recs, (soa, ns, glue), edns, rcode, min_ttl)| {
                        // The question name in another case is still the question name.
                        let mut names = vec![qname.to_uppercase()];
                        names.extend(others);
                        AnswerCase {
                            qname,
                            names,
                            recs,
                            soa,
                            ns,
                            glue,
                            edns,
                            rcode,
                            min_ttl,
                        }
                    },
                )
        }

        fn answer_bytes(c: &AnswerCase) -> Vec<u8> {
            let n = |i: usize| labels_name(&c.names[i]);
            let mut m = Message::new(77, MessageType::Response, OpCode::Query);
            m.metadata.response_code = c.rcode;
            m.add_query(Query::query(labels_name(&c.qname), RecordType::A));
            for r in &c.recs {
                let record = match *r {
                    Rec::A(o, i, t) => {
                        Record::from_rdata(n(o), t, RData::A(A(Ipv4Addr::new(192, 0, 2, i))))
                    }
                    Rec::Aaaa(o, i, t) => Record::from_rdata(
                        n(o),
                        t,
                        RData::AAAA(AAAA(Ipv6Addr::new(
                            0x2001,
                            0xdb8,
                            0,
                            0,
                            0,
                            0,
                            0,
                            u16::from(i),
                        ))),
                    ),
                    Rec::Cname(o, target, t) => {
                        Record::from_rdata(n(o), t, RData::CNAME(CNAME(n(target))))
                    }
                };
                m.add_answer(record);
            }
            if c.soa {
                let soa = SOA::new(n(1), n(2), 1, 2, 3, 4, 5);
                m.add_authority(Record::from_rdata(n(1), 60, RData::SOA(soa)));
            }
            if c.ns {
                m.add_authority(Record::from_rdata(n(2), 60, RData::NS(NS(n(3)))));
            }
            if c.glue {
                let glue = RData::A(A(Ipv4Addr::new(198, 51, 100, 1)));
                m.add_additional(Record::from_rdata(n(3), 60, glue));
            }
            if let Some(dnssec_ok) = c.edns {
                let mut e = Edns::new();
                e.set_dnssec_ok(dnssec_ok);
                m.set_edns(e);
            }
            m.to_vec().unwrap()
        }

        /// Whenever the fast path claims an answer, hickory parses it and learns the same.
        fn same_learning(b: &[u8], qname: &str, min_ttl: u32) -> Result<bool, TestCaseError> {
            let learn = b.len() >= HEADER_LEN && header_rcode(b) == 0;
            // What an earlier answer left in the reused scratch must not leak into this one.
            let mut out = LearnedAnswer {
                chain: vec![DnsName::new("earlier.test.")],
                ips: vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9))],
                ttl: 7,
            };
            let Some(teaches) = fast_answer(b, &DnsName::new(qname), min_ttl, learn, &mut out)
            else {
                return Ok(false);
            };
            let fast = teaches.then_some(out);
            let msg = Message::from_vec(b);
            prop_assert!(msg.is_ok(), "claimed, but hickory says {:?}", msg.err());
            let slow = if learn {
                extract_learning(&msg.unwrap(), &labels_name(qname), min_ttl)
            } else {
                None
            };
            prop_assert_eq!(fast, slow);
            Ok(true)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn queries_read_the_same(
                (n, q) in query(),
                flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
                cut in any::<prop::sample::Index>(),
                tail in prop::collection::vec(any::<u8>(), 0..4),
            ) {
                same_parse(&q)?;
                let parsed = parse_query(&q, true).unwrap();
                prop_assert_eq!(parsed.meta.plain, plain(&n), "the fast path takes plain names");
                let mut b = q.clone();
                for (i, v) in flips {
                    let i = i.index(b.len());
                    b[i] ^= v;
                }
                same_parse(&b)?;
                b.truncate(cut.index(b.len() + 1));
                same_parse(&b)?;
                b.extend_from_slice(&tail);
                same_parse(&b)?;
            }

            /// An answer's question is the query's exactly when hickory reads the same
            /// question there (name in any case), on answers cut and mutated too.
            #[test]
            fn answers_are_matched_as_hickory_matches_them(
                (_, q) in query(),
                upper in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
                flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
                cut in any::<prop::sample::Index>(),
            ) {
                let asked = parse_query(&q, true).unwrap().meta.question;
                let hickory = |b: &[u8]| {
                    let mut dec = BinDecoder::new(b);
                    b.len() >= HEADER_LEN
                        && read_u16(b, 4) == 1
                        && dec.read_slice(HEADER_LEN).is_ok()
                        && Query::read(&mut dec).is_ok_and(|x| Question::from_query(&x) == asked)
                };
                let mut b = q.clone();
                b[2] |= 0x80;
                for i in upper {
                    let i = i.index(b.len());
                    b[i] = b[i].to_ascii_uppercase();
                }
                prop_assert!(asked.asked_in(&b), "the question itself, in any case");
                for (i, v) in flips {
                    let i = i.index(b.len());
                    b[i] ^= v;
                }
                prop_assert_eq!(asked.asked_in(&b), hickory(&b));
                b.truncate(cut.index(b.len() + 1));
                prop_assert_eq!(asked.asked_in(&b), hickory(&b));
            }

            #[test]
            fn answers_learn_the_same(c in answer_case()) {
                let b = answer_bytes(&c);
                let claimed = same_learning(&b, &c.qname, c.min_ttl)?;
                let mut used: Vec<usize> = c
                    .recs
                    .iter()
                    .flat_map(|r| match *r {
                        Rec::A(o, ..) | Rec::Aaaa(o, ..) => vec![o],
                        Rec::Cname(o, t, _) => vec![o, t],
                    })
                    .collect();
                // Owner names must be plain; names inside NS and SOA data need not be.
                used.extend(c.soa.then_some(1));
                used.extend(c.ns.then_some(2));
                used.extend(c.glue.then_some(3));
                let all_plain = used.iter().all(|&i| plain(&c.names[i]));
                prop_assert_eq!(claimed, all_plain, "the fast path takes plain answers");
            }

            #[test]
            fn mutated_answers_learn_the_same(
                c in answer_case(),
                flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
                cut in any::<prop::sample::Index>(),
            ) {
                let mut b = answer_bytes(&c);
                for (i, v) in flips {
                    let i = i.index(b.len());
                    b[i] ^= v;
                }
                same_learning(&b, &c.qname, c.min_ttl)?;
                b.truncate(cut.index(b.len() + 1));
                same_learning(&b, &c.qname, c.min_ttl)?;
            }
        }
    }
}
