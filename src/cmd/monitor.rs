//! `fqdnwall monitor [--type T]...`: streams the agent's events until interrupted.

use std::io::Write;
use std::process::ExitCode;

use clap::ValueEnum;

use crate::api::paths;
use crate::cli::{Format, Global};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EventType {
    PolicyVerdict,
    Drop,
    Dns,
    L7,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::PolicyVerdict => "policy-verdict",
            EventType::Drop => "drop",
            EventType::Dns => "dns",
            EventType::L7 => "l7",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Event types to show (repeatable); all when not given
    #[arg(long = "type", short = 't', value_enum, value_name = "T")]
    pub types: Vec<EventType>,
}

pub fn run(g: &Global, a: Args) -> anyhow::Result<ExitCode> {
    let q: Vec<String> = a
        .types
        .iter()
        .map(|t| format!("type={}", t.as_str()))
        .collect();
    let path = if q.is_empty() {
        paths::MONITOR.to_string()
    } else {
        format!("{}?{}", paths::MONITOR, q.join("&"))
    };
    let json = g.output == Format::Json;
    let stdout = std::io::stdout();
    super::client(g)?.stream(&path, |line| {
        let mut out = stdout.lock();
        let text = if json { line.to_string() } else { render(line) };
        // A closed stdout (e.g. `| head`) ends the stream quietly.
        writeln!(out, "{text}").and_then(|_| out.flush()).is_ok()
    })?;
    Ok(ExitCode::SUCCESS)
}

/// One event as a text line.
fn render(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return line.to_string();
    };
    let f = |k: &str| match &v[k] {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut s = format!(
        "{} {} {} {} {}",
        f("time"),
        f("type"),
        f("verdict"),
        f("endpoint"),
        f("direction")
    );
    if v["type"] == "dns" {
        s.push_str(&format!(
            " {} -> {}: {} {} {} ips={} ttl={}",
            f("srcIp"),
            f("dstIp"),
            f("query"),
            f("qtype"),
            f("rcode"),
            f("ips"),
            f("ttl")
        ));
    } else {
        s.push_str(&format!(
            " {} ({}) -> {}:{} ({}) {}",
            f("srcIp"),
            f("srcIdentity"),
            f("dstIp"),
            f("dport"),
            f("dstIdentity"),
            f("protocol")
        ));
    }
    s
}
