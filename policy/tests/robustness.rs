//! The policy parser never panics: random bytes, random YAML-ish text and mutated real
//! policies (the corpus and the fixtures) all give `Ok` or diagnostics that point inside the
//! text. The same property is fuzzed without bounds by `policy/fuzz` (cargo-fuzz); this test
//! runs a fixed, deterministic sample of it in the normal suite.

use std::path::{Path, PathBuf};

use policy::parse::parse_policies;

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The text's lines as YAML counts them (`\r\n`, `\r` and `\n` end a line), in characters.
fn line_lengths(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut len = 0;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push(len);
                len = 0;
            }
            '\n' => {
                out.push(len);
                len = 0;
            }
            _ => len += 1,
        }
    }
    out.push(len);
    out
}

/// Parses `text`; on error every diagnostic must name the file, carry a message and point
/// at a line of the text and a column within (or just past the end of) that line.
fn check(name: &str, text: &str) -> Result<(), String> {
    let result = std::panic::catch_unwind(|| parse_policies("fuzz.yaml", text));
    let diags = match result {
        Err(_) => return Err(format!("{name}: the parser panicked on {text:?}")),
        Ok(Ok(_)) => return Ok(()),
        Ok(Err(d)) => d,
    };
    if diags.is_empty() {
        return Err(format!("{name}: Err without diagnostics on {text:?}"));
    }
    let lines = line_lengths(text);
    for d in &diags {
        let (line, col) = (d.span.line as usize, d.span.column as usize);
        let ok = &*d.file == "fuzz.yaml"
            && !d.message.is_empty()
            && line >= 1
            && line <= lines.len()
            && col >= 1
            && col <= lines[line - 1] + 1;
        if !ok {
            return Err(format!(
                "{name}: diagnostic {d} is outside the text ({} lines; line {line} has {} characters): {text:?}",
                lines.len(),
                lines.get(line.wrapping_sub(1)).copied().unwrap_or(0)
            ));
        }
    }
    Ok(())
}

fn policy_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = rd.map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            policy_files(&p, out);
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(p);
        }
    }
}

/// Real policies to mutate: the fixtures, and the shared corpus when it is there.
fn seeds() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    policy_files(&root.join("tests/fixtures"), &mut files);
    policy_files(&root.join("../../shared/corpus"), &mut files);
    assert!(files.len() >= 50, "only {} seed files", files.len());
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            (f.display().to_string(), text)
        })
        .collect()
}

/// Pieces that make YAML and policies interesting to break.
const TOKENS: &[&str] = &[
    "\n",
    "\r\n",
    "\r",
    " ",
    "  ",
    "\t",
    ":",
    ": ",
    "- ",
    "-",
    "[",
    "]",
    "{",
    "}",
    ",",
    "\"",
    "'",
    "#",
    "&a ",
    "*a",
    "<<: ",
    "!!str ",
    "? ",
    "|",
    ">",
    "---\n",
    "...\n",
    "%YAML 1.2\n",
    "~",
    "null",
    "true",
    "0x1F",
    "1e400",
    "-1",
    "65536",
    "99999999999999999999",
    "\u{feff}",
    "\u{0}",
    "é",
    "💥",
    "\\",
    "spec",
    "endpointSelector",
    "ingress",
    "egress",
    "toPorts",
    "ports",
    "port",
    "rules",
    "http",
    "dns",
    "kafka",
    "toFQDNs",
    "matchPattern",
    "matchName",
    "fromRequires",
    "toRequires",
    "fromEndpoints",
    "matchLabels",
    "matchExpressions",
    "toCIDRSet",
    "except",
    "icmps",
    "fields",
    "kind: CiliumNetworkPolicy\n",
    "apiVersion: cilium.io/v2\n",
    "metadata: {name: x}\n",
];

fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(chars.len() + 1);
        match rng.below(6) {
            // Delete a run.
            0 if !chars.is_empty() => {
                let end = (at + 1 + rng.below(8)).min(chars.len());
                chars.drain(at.min(chars.len())..end);
            }
            // Insert a token.
            1 | 2 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                chars.splice(at..at, t.chars());
            }
            // Replace one character by a random one.
            3 if at < chars.len() => {
                chars[at] = char::from_u32(rng.below(0x250) as u32).unwrap_or('?');
            }
            // Duplicate a slice somewhere else.
            4 if !chars.is_empty() => {
                let start = rng.below(chars.len());
                let end = (start + rng.below(40)).min(chars.len());
                let piece: Vec<char> = chars[start..end].to_vec();
                let at = at.min(chars.len());
                chars.splice(at..at, piece);
            }
            // Truncate.
            _ => chars.truncate(at),
        }
    }
    chars.into_iter().collect()
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut failures = Vec::new();
    for i in 0..1500 {
        let len = rng.below(200);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = check(&format!("bytes #{i}"), &text) {
            failures.push(e);
        }
    }
    for i in 0..1500 {
        let text: String = (0..rng.below(30))
            .map(|_| TOKENS[rng.below(TOKENS.len())])
            .collect();
        if let Err(e) = check(&format!("tokens #{i}"), &text) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn mutated_policies_never_panic() {
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let mut failures = Vec::new();
    let seeds = seeds();
    for (name, text) in &seeds {
        if let Err(e) = check(name, text) {
            failures.push(e);
        }
        for i in 0..12 {
            let m = mutate(&mut rng, text);
            if let Err(e) = check(&format!("{name} mutation #{i}"), &m) {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    for (open, close) in [("[", "]"), ("{a: ", "}"), ("- ", "")] {
        let depth = 20_000;
        let text = if close.is_empty() {
            (0..depth)
                .map(|i| format!("{}- x\n", " ".repeat(i.min(200))))
                .collect::<String>()
        } else {
            format!("{}{}", open.repeat(depth), close.repeat(depth))
        };
        if let Err(e) = check("deep", &text) {
            panic!("{}", &e[..e.len().min(300)]);
        }
    }
}
