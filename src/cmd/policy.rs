//! `fqdnwall policy validate|get|trace`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use hyper::Method;

use crate::agent::state::AgentState;
use crate::api::paths;
use crate::cli::{Format, Global};
use crate::peer;
use crate::policies::{self, Loaded};
use crate::view::{self, ErrorView, PolicyGetView, TraceRequest, TraceView, ValidateView};

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// Policy files (YAML or JSON, several documents each); a directory stands for its
    /// *.yaml, *.yml and *.json files, as the agent reads them
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct GetArgs {}

#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    /// Source: endpoint:NAME, labels:K=V[,K=V...], ip:ADDR or entity:NAME
    #[arg(long, value_name = "SEL")]
    pub src: String,
    /// Destination: endpoint:NAME, labels:K=V[,K=V...], ip:ADDR or entity:NAME
    #[arg(long, value_name = "SEL")]
    pub dst: String,
    /// Destination port and protocol (TCP when not given), e.g. 443 or 53/UDP
    #[arg(long, value_name = "PORT[/PROTO]")]
    pub dport: String,
    /// Trace offline against this config and its policy directory instead of the running agent
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Checks each file; every problem goes to stderr as `FILE:LINE:COLUMN: message`.
/// Exit 1 when any file is invalid, 2 when one cannot be read.
pub fn validate(g: &Global, a: ValidateArgs) -> anyhow::Result<ExitCode> {
    let mut results = Vec::new();
    let mut unreadable = false;
    let mut files = Vec::new();
    for f in a.files {
        if f.is_dir() {
            let inside = policies::policy_files(&f)
                .map_err(|e| anyhow::anyhow!("cannot read directory {}: {e}", f.display()))?;
            files.extend(inside);
        } else {
            files.push(f);
        }
    }
    for f in &files {
        let file = f.display().to_string();
        let mut r = ValidateView {
            file: file.clone(),
            valid: false,
            policies: 0,
            rules: 0,
            errors: Vec::new(),
        };
        match policies::load(f) {
            Loaded::Ok(p) => {
                r.valid = true;
                r.policies = p.len();
                r.rules = policies::rule_count(&p);
            }
            Loaded::Invalid(diags) => {
                for d in diags {
                    if g.output == Format::Text {
                        eprintln!("{d}");
                    }
                    r.errors.push(ErrorView {
                        line: d.span.line,
                        column: d.span.column,
                        path: d.path,
                        message: d.message,
                    });
                }
            }
            Loaded::Io(e) => {
                unreadable = true;
                let message = format!("cannot read: {e}");
                if g.output == Format::Text {
                    eprintln!("{file}: {message}");
                }
                r.errors.push(ErrorView {
                    line: 0,
                    column: 0,
                    path: String::new(),
                    message,
                });
            }
        }
        results.push(r);
    }
    match g.output {
        Format::Json => super::print_out(&(serde_json::to_string_pretty(&results)? + "\n"))?,
        Format::Text => {
            for r in results.iter().filter(|r| r.valid) {
                super::print_out(&format!(
                    "{}: OK ({} {}, {} {})\n",
                    r.file,
                    r.policies,
                    plural(r.policies, "policy", "policies"),
                    r.rules,
                    plural(r.rules, "rule", "rules")
                ))?;
            }
            let bad = results.iter().filter(|r| !r.valid).count();
            if bad > 0 {
                eprintln!(
                    "{bad} of {} {} invalid",
                    results.len(),
                    plural(results.len(), "file", "files")
                );
            }
        }
    }
    Ok(if unreadable {
        ExitCode::from(2)
    } else if results.iter().all(|r| r.valid) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 {
        one
    } else {
        many
    }
}

pub fn get(g: &Global, _a: GetArgs) -> anyhow::Result<ExitCode> {
    let p: PolicyGetView = super::client(g)?.get(paths::POLICY)?;
    super::show(g, &p, view::text::policy_get)
}

/// Exit 0 when the flow is allowed (or only audited), 1 when it is denied.
pub fn trace(g: &Global, a: TraceArgs) -> anyhow::Result<ExitCode> {
    // Check the arguments before anything else so a typo is a usage error either way.
    let src = peer::parse(&a.src).map_err(anyhow::Error::msg)?;
    let dst = peer::parse(&a.dst).map_err(anyhow::Error::msg)?;
    let (port, proto) = peer::parse_dport(&a.dport).map_err(anyhow::Error::msg)?;
    let t: TraceView = match &a.config {
        Some(path) => {
            let cfg = match super::run::load_config(Some(path))? {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let (state, problems) =
                AgentState::offline(cfg).context("building the policy engine")?;
            for p in problems {
                eprintln!("warning: {p}");
            }
            state
                .trace(&src, &a.src, &dst, &a.dst, port, proto, "offline")
                .map_err(anyhow::Error::msg)?
        }
        None => super::client(g)?.call(
            Method::POST,
            paths::POLICY_TRACE,
            Some(&TraceRequest {
                src: a.src.clone(),
                dst: a.dst.clone(),
                dport: a.dport.clone(),
            }),
        )?,
    };
    super::show(g, &t, view::text::trace)?;
    if t.verdict == "denied" {
        return Ok(ExitCode::from(1));
    }
    if !matches!(t.verdict.as_str(), "allowed" | "audit") {
        bail!("unexpected verdict {:?}", t.verdict);
    }
    Ok(ExitCode::SUCCESS)
}
