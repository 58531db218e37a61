//! Fuzzes the policy parser with arbitrary text: it must never panic, and every diagnostic
//! must name the file and point at a line and column that exist in the text (or just past
//! the end of a line).
#![no_main]

use libfuzzer_sys::fuzz_target;

/// Characters per line, line breaks as YAML counts them (`\r\n`, `\r`, `\n`).
fn line_lengths(text: &str) -> Vec<usize> {
    let mut out = vec![0];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' | '\n' => {
                if c == '\r' && chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push(0);
            }
            _ => *out.last_mut().unwrap() += 1,
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    // Policy files are text; invalid UTF-8 is rejected before the parser sees it.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Err(diags) = policy::parse::parse_policies("fuzz.yaml", text) else {
        return;
    };
    assert!(!diags.is_empty(), "an error without diagnostics");
    let lines = line_lengths(text);
    for d in &diags {
        let (line, col) = (d.span.line as usize, d.span.column as usize);
        assert_eq!(&*d.file, "fuzz.yaml");
        assert!(!d.message.is_empty(), "empty message: {d}");
        assert!(
            (1..=lines.len()).contains(&line) && (1..=lines[line - 1] + 1).contains(&col),
            "{d} points outside the text ({} lines)",
            lines.len()
        );
    }
});
