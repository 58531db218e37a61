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
    // The agent logs what it does; the other commands speak through their output and only
    // log warnings.
    let level = match cli.command {
        cli::Command::Run(_) => "info",
        _ => "warn",
    };
    init_logging(level);
    match cli.run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fqdnwall: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Logs go to stderr; `RUST_LOG` overrides the default level.
fn init_logging(level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}
