//! One module per subcommand: its clap `Args` and its `run`.

pub mod bpf;
pub mod config;
pub mod endpoint;
pub mod fqdn;
pub mod identity;
pub mod lockdown;
pub mod monitor;
pub mod policy;
pub mod run;
pub mod status;

use std::process::ExitCode;

use serde::Serialize;

use crate::api::client::Client;
use crate::cli::{Format, Global};

/// Prints `value` as JSON in json mode, else the text rendering.
pub fn show<T: Serialize>(
    g: &Global,
    value: &T,
    text: impl FnOnce(&T) -> String,
) -> anyhow::Result<ExitCode> {
    let out = match g.output {
        Format::Json => serde_json::to_string_pretty(value)? + "\n",
        Format::Text => text(value),
    };
    print_out(&out)?;
    Ok(ExitCode::SUCCESS)
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
pub fn print_out(s: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    match o.write_all(s.as_bytes()).and_then(|_| o.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

pub fn client(g: &Global) -> anyhow::Result<Client> {
    Client::new(&g.socket())
}
