//! `fqdnwall lockdown --policy FILE [--label K=V]... -- CMD [ARG...]`: run a command as a
//! fresh endpoint in its own network namespace, enforced by the eBPF datapath.
//!
//! Lockdown only makes sense with packet enforcement: without the eBPF datapath the command's
//! traffic could not be confined, and pretending otherwise would be a firewall that lies. So
//! the policy is checked first (a broken policy is reported the same way `policy validate`
//! reports it), and then the command refuses to run unconfined.

use std::process::ExitCode;

use anyhow::bail;

use crate::cli::Global;
use crate::policies::{self, Loaded};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The policy the command runs under
    #[arg(long, value_name = "FILE")]
    pub policy: std::path::PathBuf,
    /// A label of the command's endpoint (repeatable)
    #[arg(long = "label", value_name = "K=V")]
    pub labels: Vec<String>,
    /// The command and its arguments
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

pub fn run(_g: &Global, a: Args) -> anyhow::Result<ExitCode> {
    for l in &a.labels {
        if l.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
            bail!("--label takes K=V, found {l:?}");
        }
    }
    match policies::load(&a.policy) {
        Loaded::Ok(_) => {}
        Loaded::Invalid(diags) => {
            for d in diags {
                eprintln!("{d}");
            }
            return Ok(ExitCode::from(1));
        }
        Loaded::Io(e) => bail!("cannot read {}: {e}", a.policy.display()),
    }
    bail!(
        "lockdown confines {:?} with the eBPF datapath, which this build of fqdnwall does not \
         include yet; the command was not started",
        a.command[0]
    )
}
