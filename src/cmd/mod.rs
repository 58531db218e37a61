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
    match g.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Format::Text => print!("{}", text(value)),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn client(g: &Global) -> anyhow::Result<Client> {
    Client::new(&g.socket())
}
