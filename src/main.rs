//! The `fqdnwall` binary: the agent (`run`), its local API, and the command line that talks to
//! it or works offline on config and policy files.
//!
//! `main` only parses the command line, sets up logging and maps the outcome to the exit
//! status of the interface contract: 0 success, 1 a verdict or validation failure the command
//! reported, 2 a usage or I/O error (clap's own usage errors exit 2 too).

mod agent;
mod api;
mod cli;
mod cmd;
mod config;
mod peer;
mod policies;
mod view;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_logging();
    match cli.run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fqdnwall: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Logs go to stderr; `RUST_LOG` overrides the default level (info).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
