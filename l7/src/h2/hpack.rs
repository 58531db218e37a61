//! HPACK (RFC 7541): a full decoder with its dynamic table, a transcoder that forwards a
//! peer's header block so that it decodes the same in any context, and a context-free
//! encoder (static-table references and literals never added to the peer's dynamic table).
//!
//! Why transcode rather than decode and encode again: a response block from a server like
//! nginx is Huffman-coded literals (nginx marks them for indexing but never refers to them);
//! decoding those values into a header map and encoding them again was a quarter of the
//! relay's cost per request with the `h2` crate. The transcoder checks each field as it goes
//! and copies each representation with its strings as they came, changing only how a field
//! uses the table, so nothing the relay forwards depends on a table.

use std::collections::VecDeque;

use super::huffman::{self, HuffmanError};

/// Why a header block cannot be decoded: a COMPRESSION_ERROR for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HpackError {
    /// An integer longer than fits in 32 bits, or cut off.
    Integer,
    /// A string or representation cut off by the end of the block.
    Truncated,
    /// Index 0, or past the end of the tables.
    Index(usize),
    Huffman(HuffmanError),
    /// A dynamic table size update after the first field, or above the limit we advertised.
    SizeUpdate,
}

impl std::fmt::Display for HpackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HpackError::Integer => f.write_str("integer overflow"),
            HpackError::Truncated => f.write_str("truncated header block"),
            HpackError::Index(i) => write!(f, "invalid table index {i}"),
            HpackError::Huffman(HuffmanError::Eos) => f.write_str("EOS in a Huffman string"),
            HpackError::Huffman(HuffmanError::Padding) => f.write_str("bad Huffman padding"),
            HpackError::SizeUpdate => f.write_str("invalid dynamic table size update"),
        }
    }
}

/// The static table (RFC 7541 Appendix A), index 1 first.
pub(crate) const STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// The first static index with this name.
pub(crate) fn static_name_index(name: &[u8]) -> Option<u8> {
    Some(match name {
        b":authority" => 1,
        b":method" => 2,
        b":path" => 4,
        b":scheme" => 6,
        b":status" => 8,
        b"accept-charset" => 15,
        b"accept-encoding" => 16,
        b"accept-language" => 17,
        b"accept-ranges" => 18,
        b"accept" => 19,
        b"access-control-allow-origin" => 20,
        b"age" => 21,
        b"allow" => 22,
        b"authorization" => 23,
        b"cache-control" => 24,
        b"content-disposition" => 25,
        b"content-encoding" => 26,
        b"content-language" => 27,
        b"content-length" => 28,
        b"content-location" => 29,
        b"content-range" => 30,
        b"content-type" => 31,
        b"cookie" => 32,
        b"date" => 33,
        b"etag" => 34,
        b"expect" => 35,
        b"expires" => 36,
        b"from" => 37,
        b"host" => 38,
        b"if-match" => 39,
        b"if-modified-since" => 40,
        b"if-none-match" => 41,
        b"if-range" => 42,
        b"if-unmodified-since" => 43,
        b"last-modified" => 44,
        b"link" => 45,
        b"location" => 46,
        b"max-forwards" => 47,
        b"proxy-authenticate" => 48,
        b"proxy-authorization" => 49,
        b"range" => 50,
        b"referer" => 51,
        b"refresh" => 52,
        b"retry-after" => 53,
        b"server" => 54,
        b"set-cookie" => 55,
        b"strict-transport-security" => 56,
        b"transfer-encoding" => 57,
        b"user-agent" => 58,
        b"vary" => 59,
        b"via" => 60,
        b"www-authenticate" => 61,
        _ => return None,
    })
}

/// The static index of exactly this field, for the few fields that have one and are common.
fn static_field_index(name: &[u8], value: &[u8]) -> Option<u8> {
    Some(match (name, value) {
        (b":method", b"GET") => 2,
        (b":method", b"POST") => 3,
        (b":path", b"/") => 4,
        (b":scheme", b"http") => 6,
        (b":scheme", b"https") => 7,
        (b":status", b"200") => 8,
        (b":status", b"204") => 9,
        (b":status", b"206") => 10,
        (b":status", b"304") => 11,
        (b":status", b"400") => 12,
        (b":status", b"404") => 13,
        (b":status", b"500") => 14,
        _ => return None,
    })
}

/// The size HPACK counts for an entry (RFC 7541 §4.1).
const ENTRY_OVERHEAD: usize = 32;

/// The default (and our advertised) SETTINGS_HEADER_TABLE_SIZE.
pub(crate) const DEFAULT_TABLE_SIZE: usize = 4096;

struct Entry {
    /// Name then value.
    data: Box<[u8]>,
    name_len: usize,
}

impl Entry {
    fn name(&self) -> &[u8] {
        &self.data[..self.name_len]
    }
    fn value(&self) -> &[u8] {
        &self.data[self.name_len..]
    }
    fn size(&self) -> usize {
        self.data.len() + ENTRY_OVERHEAD
    }
}

/// One side's HPACK decoder.
pub(crate) struct Decoder {
    /// Newest first (index 62).
    entries: VecDeque<Entry>,
    size: usize,
    max: usize,
    /// The SETTINGS_HEADER_TABLE_SIZE we advertised: the most a size update may ask.
    limit: usize,
    name_buf: Vec<u8>,
    value_buf: Vec<u8>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_TABLE_SIZE)
    }
}

impl Decoder {
    pub(crate) fn new(limit: usize) -> Decoder {
        Decoder {
            entries: VecDeque::new(),
            size: 0,
            max: limit,
            limit,
            name_buf: Vec::new(),
            value_buf: Vec::new(),
        }
    }

    #[cfg(test)]
    fn table(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.entries
            .iter()
            .map(|e| (e.name().to_vec(), e.value().to_vec()))
            .collect()
    }

    fn evict_to(&mut self, max: usize) {
        while self.size > max {
            let e = self.entries.pop_back().expect("size counts entries");
            self.size -= e.size();
        }
    }

    fn insert(&mut self, e: Entry) {
        let size = e.size();
        if size > self.max {
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max - size);
        self.size += size;
        self.entries.push_front(e);
    }

    /// Name and value at `index` (1-based: static then dynamic).
    fn get(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        match index {
            0 => Err(HpackError::Index(0)),
            1..=61 => Ok(STATIC[index - 1]),
            _ => self
                .entries
                .get(index - 62)
                .map(|e| (e.name(), e.value()))
                .ok_or(HpackError::Index(index)),
        }
    }

    /// Decodes `block`, handing each field to `field` (a name and value, and whether it was
    /// sent never-indexed).
    pub(crate) fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8], bool),
    ) -> Result<(), HpackError> {
        self.walk(block, None, |n, v, never| {
            field(n, v, never);
            true
        })
    }

    /// Decodes `block` (the dynamic table kept as the peer's encoder has it) and appends to
    /// `out` the fields `keep` keeps, encoded so that they decode the same in any context:
    /// a representation that does not use the table is copied as it came (Huffman-coded
    /// strings included, so they are decoded only to be checked); one that adds to the table
    /// is copied as a literal without indexing, its strings as they came; one that refers to
    /// the table becomes a plain literal. Size updates are dropped. Never-indexed fields stay
    /// never indexed (RFC 7541 §7.1.3).
    pub(crate) fn transcode(
        &mut self,
        block: &[u8],
        out: &mut Vec<u8>,
        keep: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), HpackError> {
        let mut keep = keep;
        self.walk(block, Some(out), |n, v, _| keep(n, v))
    }

    fn walk(
        &mut self,
        block: &[u8],
        mut out: Option<&mut Vec<u8>>,
        mut field: impl FnMut(&[u8], &[u8], bool) -> bool,
    ) -> Result<(), HpackError> {
        let mut pos = 0;
        let mut fields = false;
        while pos < block.len() {
            let start = pos;
            let b = block[pos];
            if b & 0x20 != 0 && b & 0xc0 == 0 {
                // A dynamic table size update (001xxxxx), only before the fields.
                if fields {
                    return Err(HpackError::SizeUpdate);
                }
                let size = int(block, &mut pos, 5)?;
                if size > self.limit {
                    return Err(HpackError::SizeUpdate);
                }
                self.max = size;
                self.evict_to(size);
                continue;
            }
            fields = true;
            if b & 0x80 != 0 {
                let index = int(block, &mut pos, 7)?;
                let (n, v) = self.get(index)?;
                if field(n, v, false) {
                    if let Some(out) = out.as_deref_mut() {
                        if index <= 61 {
                            out.extend_from_slice(&block[start..pos]);
                        } else {
                            put_field(out, n, v, false);
                        }
                    }
                }
                continue;
            }
            // Literals: with incremental indexing (01), never indexed (0001), without
            // indexing (0000).
            let indexing = b & 0x40 != 0;
            let never = !indexing && b & 0x10 != 0;
            let index = int(block, &mut pos, if indexing { 6 } else { 4 })?;
            let name_at = pos;
            let name_buf = &mut self.name_buf;
            let value_buf = &mut self.value_buf;
            let name: &[u8] = match index {
                0 => string(block, &mut pos, name_buf)?,
                1..=61 => STATIC[index - 1].0,
                _ => self
                    .entries
                    .get(index - 62)
                    .map(|e| e.name())
                    .ok_or(HpackError::Index(index))?,
            };
            let value_at = pos;
            let value = string(block, &mut pos, value_buf)?;
            if field(name, value, never) {
                if let Some(out) = out.as_deref_mut() {
                    let flags = if never { 0x10 } else { 0 };
                    match index {
                        // The representation as it came.
                        0..=61 if !indexing => out.extend_from_slice(&block[start..pos]),
                        0 => {
                            out.push(flags);
                            out.extend_from_slice(&block[name_at..pos]);
                        }
                        1..=61 => {
                            put_int(out, index, 4, flags);
                            out.extend_from_slice(&block[value_at..pos]);
                        }
                        _ => {
                            out.push(flags);
                            put_str(out, name);
                            out.extend_from_slice(&block[value_at..pos]);
                        }
                    }
                }
            }
            if indexing {
                let mut data = Vec::with_capacity(name.len() + value.len());
                data.extend_from_slice(name);
                data.extend_from_slice(value);
                let name_len = name.len();
                self.insert(Entry {
                    data: data.into_boxed_slice(),
                    name_len,
                });
            }
        }
        Ok(())
    }
}

/// Reads an integer with an `n`-bit prefix at `block[*pos]` (RFC 7541 §5.1), at most
/// 2^32 - 1 (more is refused: no size or index here comes near it).
fn int(block: &[u8], pos: &mut usize, n: u8) -> Result<usize, HpackError> {
    let mask = (1u32 << n) - 1;
    let first = *block.get(*pos).ok_or(HpackError::Truncated)? as u32 & mask;
    *pos += 1;
    if first < mask {
        return Ok(first as usize);
    }
    let mut value = mask as u64;
    let mut shift = 0;
    loop {
        let b = *block.get(*pos).ok_or(HpackError::Integer)?;
        *pos += 1;
        value += ((b & 0x7f) as u64) << shift;
        if value > u32::MAX as u64 {
            return Err(HpackError::Integer);
        }
        if b & 0x80 == 0 {
            return Ok(value as usize);
        }
        shift += 7;
        if shift > 28 {
            return Err(HpackError::Integer);
        }
    }
}

/// Reads a string literal (RFC 7541 §5.2): the raw octets in the block, or the Huffman
/// code decoded into `buf`.
fn string<'a>(
    block: &'a [u8],
    pos: &mut usize,
    buf: &'a mut Vec<u8>,
) -> Result<&'a [u8], HpackError> {
    let huffman = *block.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = int(block, pos, 7)?;
    let end = pos
        .checked_add(len)
        .filter(|&e| e <= block.len())
        .ok_or(HpackError::Truncated)?;
    let raw = &block[*pos..end];
    *pos = end;
    if !huffman {
        return Ok(raw);
    }
    buf.clear();
    huffman::decode(raw, buf).map_err(HpackError::Huffman)?;
    Ok(buf)
}

/// Appends an integer with an `n`-bit prefix, `flags` in the first octet's other bits.
pub(crate) fn put_int(out: &mut Vec<u8>, value: usize, n: u8, flags: u8) {
    let mask = (1usize << n) - 1;
    if value < mask {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        out.push(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// Appends a plain (not Huffman-coded) string literal.
fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    put_int(out, s.len(), 7, 0);
    out.extend_from_slice(s);
}

/// Appends a field that does not touch the decoder's dynamic table: indexed when the static
/// table has it exactly, else a literal without indexing (`never`: never indexed; the name
/// indexed when the static table has it).
pub(crate) fn put_field(out: &mut Vec<u8>, name: &[u8], value: &[u8], never: bool) {
    let literal = if never { 0x10 } else { 0 };
    if !never {
        if let Some(i) = static_field_index(name, value) {
            out.push(0x80 | i);
            return;
        }
    }
    match static_name_index(name) {
        Some(i) => put_int(out, i as usize, 4, literal),
        None => {
            out.push(literal);
            put_str(out, name);
        }
    }
    put_str(out, value);
}

/// Appends a dynamic table size update.
pub(crate) fn put_size_update(out: &mut Vec<u8>, size: usize) {
    put_int(out, size, 5, 0x20);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn decode_all(d: &mut Decoder, block: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        d.decode(block, |n, v, _| {
            out.push((
                String::from_utf8(n.to_vec()).unwrap(),
                String::from_utf8(v.to_vec()).unwrap(),
            ))
        })
        .unwrap();
        out
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn table(d: &Decoder) -> Vec<(String, String)> {
        d.table()
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    #[test]
    fn integers_rfc_7541_c1_and_overflow() {
        let mut out = Vec::new();
        put_int(&mut out, 10, 5, 0);
        assert_eq!(out, [0x0a]);
        out.clear();
        put_int(&mut out, 1337, 5, 0);
        assert_eq!(out, [0x1f, 0x9a, 0x0a]);
        assert_eq!(int(&out, &mut 0, 5), Ok(1337));
        out.clear();
        put_int(&mut out, 42, 8, 0);
        assert_eq!(out, [42]);
        for v in [0, 30, 31, 127, 128, 4096, 1 << 20, u32::MAX as usize] {
            for n in 4..=8 {
                out.clear();
                put_int(&mut out, v, n, 0);
                let mut pos = 0;
                assert_eq!(int(&out, &mut pos, n), Ok(v), "{v} in {n} bits");
                assert_eq!(pos, out.len());
            }
        }
        // 2^32 and longer encodings, and one cut off.
        out.clear();
        put_int(&mut out, u32::MAX as usize + 1, 5, 0);
        assert_eq!(int(&out, &mut 0, 5), Err(HpackError::Integer));
        assert_eq!(
            int(&[0x1f, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01], &mut 0, 5),
            Err(HpackError::Integer)
        );
        assert_eq!(int(&[0x1f, 0x9a], &mut 0, 5), Err(HpackError::Integer));
    }

    /// RFC 7541 C.2: one representation of each kind.
    #[test]
    fn rfc_7541_c2_representations() {
        let mut d = Decoder::default();
        let got = decode_all(
            &mut d,
            &hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572"),
        );
        assert_eq!(got, pairs(&[("custom-key", "custom-header")]));
        assert_eq!(d.size, 55);
        let mut d = Decoder::default();
        let got = decode_all(&mut d, &hex("040c 2f73 616d 706c 652f 7061 7468"));
        assert_eq!(got, pairs(&[(":path", "/sample/path")]));
        assert!(d.table().is_empty());
        let got = decode_all(&mut d, &hex("1008 7061 7373 776f 7264 0673 6563 7265 74"));
        assert_eq!(got, pairs(&[("password", "secret")]));
        assert!(d.table().is_empty());
        assert_eq!(decode_all(&mut d, &[0x82]), pairs(&[(":method", "GET")]));
        assert!(d.table().is_empty());
    }

    /// RFC 7541 C.3 (plain literals) and C.4 (Huffman): three requests on one connection.
    #[test]
    fn rfc_7541_c3_c4_requests() {
        let blocks = [
            (
                "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            ),
            (
                "8286 84be 5808 6e6f 2d63 6163 6865",
                "8286 84be 5886 a8eb 1064 9cbf",
            ),
            (
                "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            ),
        ];
        let want = [
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ]),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ]),
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ]),
        ];
        let tables = [
            (pairs(&[(":authority", "www.example.com")]), 57),
            (
                pairs(&[
                    ("cache-control", "no-cache"),
                    (":authority", "www.example.com"),
                ]),
                110,
            ),
            (
                pairs(&[
                    ("custom-key", "custom-value"),
                    ("cache-control", "no-cache"),
                    (":authority", "www.example.com"),
                ]),
                164,
            ),
        ];
        for huffman in [false, true] {
            let mut d = Decoder::default();
            for (i, (plain, huff)) in blocks.iter().enumerate() {
                let block = hex(if huffman { huff } else { plain });
                assert_eq!(decode_all(&mut d, &block), want[i], "request {i}");
                assert_eq!(table(&d), tables[i].0, "table after {i}");
                assert_eq!(d.size, tables[i].1);
            }
        }
    }

    /// RFC 7541 C.5 (plain) and C.6 (Huffman): three responses with a 256-octet table, so
    /// entries are evicted.
    #[test]
    fn rfc_7541_c5_c6_responses_with_evictions() {
        let blocks = [
            (
                "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133
                 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70
                 6c65 2e63 6f6d",
                "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6
                 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
            ),
            ("4803 3330 37c1 c0bf", "4883 640e ffc1 c0bf"),
            (
                "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d
                 54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049
                 5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e
                 3d31",
                "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab
                 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f
                 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
            ),
        ];
        let date1 = "Mon, 21 Oct 2013 20:13:21 GMT";
        let date2 = "Mon, 21 Oct 2013 20:13:22 GMT";
        let cookie = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1";
        let want = [
            pairs(&[
                (":status", "302"),
                ("cache-control", "private"),
                ("date", date1),
                ("location", "https://www.example.com"),
            ]),
            pairs(&[
                (":status", "307"),
                ("cache-control", "private"),
                ("date", date1),
                ("location", "https://www.example.com"),
            ]),
            pairs(&[
                (":status", "200"),
                ("cache-control", "private"),
                ("date", date2),
                ("location", "https://www.example.com"),
                ("content-encoding", "gzip"),
                ("set-cookie", cookie),
            ]),
        ];
        let tables = [
            (
                pairs(&[
                    ("location", "https://www.example.com"),
                    ("date", date1),
                    ("cache-control", "private"),
                    (":status", "302"),
                ]),
                222,
            ),
            (
                pairs(&[
                    (":status", "307"),
                    ("location", "https://www.example.com"),
                    ("date", date1),
                    ("cache-control", "private"),
                ]),
                222,
            ),
            (
                pairs(&[
                    ("set-cookie", cookie),
                    ("content-encoding", "gzip"),
                    ("date", date2),
                ]),
                215,
            ),
        ];
        for huffman in [false, true] {
            let mut d = Decoder::new(256);
            for (i, (plain, huff)) in blocks.iter().enumerate() {
                let block = hex(if huffman { huff } else { plain });
                assert_eq!(decode_all(&mut d, &block), want[i], "response {i}");
                assert_eq!(table(&d), tables[i].0, "table after {i}");
                assert_eq!(d.size, tables[i].1);
            }
        }
    }

    #[test]
    fn size_updates_only_first_and_within_the_limit() {
        let mut d = Decoder::default();
        decode_all(
            &mut d,
            &hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572"),
        );
        assert_eq!(d.table().len(), 1);
        // To 0 and back: the table empties.
        assert_eq!(
            d.decode(&[0x20, 0x3f, 0xe1, 0x1f, 0x82], |_, _, _| {}),
            Ok(())
        );
        assert!(d.table().is_empty());
        assert_eq!(d.max, 4096);
        // After a field, or above what we allow.
        assert_eq!(
            d.decode(&[0x82, 0x20], |_, _, _| {}),
            Err(HpackError::SizeUpdate)
        );
        let mut over = Vec::new();
        put_size_update(&mut over, 4097);
        assert_eq!(d.decode(&over, |_, _, _| {}), Err(HpackError::SizeUpdate));
    }

    #[test]
    fn bad_indexes_and_truncation() {
        let mut d = Decoder::default();
        assert_eq!(d.decode(&[0x80], |_, _, _| {}), Err(HpackError::Index(0)));
        assert_eq!(d.decode(&[0xbe], |_, _, _| {}), Err(HpackError::Index(62)));
        assert_eq!(
            d.decode(&[0x0f, 0x2f, 0x01, b'a'], |_, _, _| {}),
            Err(HpackError::Index(62))
        );
        assert_eq!(
            d.decode(&[0x00, 0x05, b'a'], |_, _, _| {}),
            Err(HpackError::Truncated)
        );
        assert_eq!(d.decode(&[0x04], |_, _, _| {}), Err(HpackError::Truncated));
        assert_eq!(
            d.decode(&[0x04, 0x81, 0xff], |_, _, _| {}),
            Err(HpackError::Huffman(HuffmanError::Padding))
        );
        // An entry bigger than the table empties it and is not added.
        let mut d = Decoder::new(64);
        let mut block = vec![0x40];
        put_str(&mut block, b"a");
        put_str(&mut block, &[b'v'; 40]);
        let mut n = 0;
        d.decode(&block, |_, _, _| n += 1).unwrap();
        assert_eq!(n, 1);
        assert!(d.table().is_empty());
    }

    /// The fields of `block` as a decoder with an empty table reads them, which must leave
    /// the table empty (the block is context-free).
    fn context_free(block: &[u8]) -> Vec<(Vec<u8>, Vec<u8>, bool)> {
        let mut d = Decoder::default();
        let mut got = Vec::new();
        d.decode(block, |n, v, never| {
            got.push((n.to_vec(), v.to_vec(), never))
        })
        .unwrap();
        assert!(d.table().is_empty(), "the block adds to the table");
        got
    }

    #[test]
    fn transcoding_copies_what_needs_no_table_and_rewrites_the_rest() {
        let mut d = Decoder::default();
        // Static index, literal without indexing (indexed name and new name), never indexed
        // with a Huffman value: copied as they came.
        let mut block = vec![0x88, 0x0f, 0x27];
        put_str(&mut block, b"nginx");
        block.push(0x00);
        put_str(&mut block, b"x-a");
        put_str(&mut block, b"1");
        block.extend_from_slice(&[0x10, 0x01, b'b']);
        let mut enc = Vec::new();
        huffman::encode(b"abcd", &mut enc);
        put_int(&mut block, enc.len(), 7, 0x80);
        block.extend_from_slice(&enc);
        let mut seen = Vec::new();
        let mut out = Vec::new();
        d.transcode(&block, &mut out, |n, v| {
            seen.push((n.to_vec(), v.to_vec()));
            true
        })
        .unwrap();
        assert_eq!(out, block);
        assert_eq!(
            seen,
            [
                (b":status".to_vec(), b"200".to_vec()),
                (b"server".to_vec(), b"nginx".to_vec()),
                (b"x-a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"abcd".to_vec()),
            ]
        );
        assert!(context_free(&out)[3].2, "never indexed stays so");
        // A leading size update is applied and dropped; a field left out is not there.
        let mut with_update = vec![0x3f, 0xe1, 0x0f];
        with_update.extend_from_slice(&block);
        let mut out = Vec::new();
        d.transcode(&with_update, &mut out, |n, _| n != b"x-a")
            .unwrap();
        assert_eq!(out.len(), block.len() - 7);
        assert_eq!(context_free(&out).len(), 3);
        // Incremental indexing (a new name, a static name with a Huffman value): the table
        // learns them, the output is without indexing with the strings as they came.
        let mut indexing = vec![0x88, 0x40];
        put_str(&mut indexing, b"x-a");
        put_str(&mut indexing, b"1");
        indexing.push(0x40 | 54);
        put_int(&mut indexing, enc.len(), 7, 0x80);
        indexing.extend_from_slice(&enc);
        let mut out = Vec::new();
        d.transcode(&indexing, &mut out, |_, _| true).unwrap();
        let mut want = vec![0x88, 0x00];
        put_str(&mut want, b"x-a");
        put_str(&mut want, b"1");
        want.extend_from_slice(&[0x0f, 0x27]);
        put_int(&mut want, enc.len(), 7, 0x80);
        want.extend_from_slice(&enc);
        assert_eq!(out, want);
        assert_eq!(
            d.table(),
            [
                (b"server".to_vec(), b"abcd".to_vec()),
                (b"x-a".to_vec(), b"1".to_vec())
            ]
        );
        // References to the table (a field, a name) become plain literals.
        let mut refs = vec![0x88, 0xbe, 0x1f, 0x30];
        put_str(&mut refs, b"2");
        let mut out = Vec::new();
        d.transcode(&refs, &mut out, |_, _| true).unwrap();
        let fields: Vec<_> = context_free(&out)
            .into_iter()
            .map(|(n, v, never)| {
                (
                    String::from_utf8(n).unwrap(),
                    String::from_utf8(v).unwrap(),
                    never,
                )
            })
            .collect();
        let f = |n: &str, v: &str, never| (n.to_string(), v.to_string(), never);
        assert_eq!(
            fields,
            [
                f(":status", "200", false),
                f("server", "abcd", false),
                f("x-a", "2", true)
            ]
        );
    }

    #[test]
    fn encoded_fields_decode_back_without_touching_the_table() {
        let fields: &[(&[u8], &[u8])] = &[
            (b":status", b"200"),
            (b":status", b"302"),
            (b":method", b"POST"),
            (b":path", b"/a/b"),
            (b"content-type", b"application/grpc"),
            (b"x-custom", b""),
            (b"grpc-message", &[b'x'; 300]),
        ];
        let mut block = Vec::new();
        put_size_update(&mut block, 0);
        for (n, v) in fields {
            put_field(&mut block, n, v, false);
        }
        let got: Vec<_> = context_free(&block)
            .into_iter()
            .map(|(n, v, _)| (n, v))
            .collect();
        let want: Vec<_> = fields
            .iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(got, want);
    }
}
