//! Policy files on disk: which files of a policy directory count, and reading one into
//! policies or diagnostics.

use std::io;
use std::path::{Path, PathBuf};

use policy::model::Policy;
use policy::Diagnostic;

/// The outcome of reading and parsing one policy file.
pub enum Loaded {
    Ok(Vec<Policy>),
    /// Parse or validation problems, every one found.
    Invalid(Vec<Diagnostic>),
    /// The file could not be read.
    Io(io::Error),
}

/// Whether a directory entry is a policy file: `*.yaml`, `*.yml` or `*.json`, not hidden
/// (editors write hidden swap and backup files next to the real ones).
pub fn is_policy_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let ext = path.extension().and_then(|e| e.to_str());
    !hidden && matches!(ext, Some("yaml" | "yml" | "json")) && path.is_file()
}

/// The policy files of `dir`, sorted by name. A missing directory has none.
pub fn policy_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if is_policy_file(&path) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Reads and parses one file; diagnostics name it as `path` is displayed.
pub fn load(path: &Path) -> Loaded {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&path.display().to_string(), &text),
        Err(e) => Loaded::Io(e),
    }
}

pub fn parse(file: &str, text: &str) -> Loaded {
    match policy::parse::parse_policies(file, text) {
        Ok(p) => Loaded::Ok(p),
        Err(d) => Loaded::Invalid(d),
    }
}

/// Number of rules in a set of policies.
pub fn rule_count(policies: &[Policy]) -> usize {
    policies.iter().map(|p| p.rules.len()).sum()
}
