//! The command line: one clap-derived struct per subcommand, the global flags, and the
//! dispatch from a parsed command to its module's `run`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::cmd;

/// Where the agent's API socket is when neither the flag, the environment nor the config says.
pub const DEFAULT_API_SOCKET: &str = "/run/fqdnwall/api.sock";

/// fqdnwall: a DNS-proxy-centric FQDN egress firewall that enforces Cilium and Kubernetes
/// network policy on one machine.
#[derive(Debug, Parser)]
#[command(name = "fqdnwall", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command accepts.
#[derive(Debug, Clone, clap::Args)]
pub struct Global {
    /// Unix socket of the agent's local API [default: /run/fqdnwall/api.sock, or the config's
    /// `apiSocket` for `run`]
    #[arg(long, global = true, env = "FQDNWALL_API_SOCKET", value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Output format
    #[arg(
        short = 'o',
        long = "output",
        global = true,
        value_enum,
        default_value_t = Format::Text
    )]
    pub output: Format,
}

impl Global {
    /// The API socket a client command talks to.
    pub fn socket(&self) -> PathBuf {
        self.api_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_API_SOCKET))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent in the foreground (logs to stderr; SIGTERM/SIGINT stop it cleanly)
    Run(cmd::run::Args),
    /// Validate, show and trace policies
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Endpoints the agent enforces for (live)
    #[command(subcommand)]
    Endpoint(EndpointCommand),
    /// Change the agent's global settings (live): PolicyAuditMode=true|false
    Config(cmd::config::Args),
    /// Numeric identities and their labels (live)
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Datapath state: policy maps and the ipcache (live)
    #[command(subcommand)]
    Bpf(BpfCommand),
    /// Learned DNS names and their IPs (live)
    #[command(subcommand)]
    Fqdn(FqdnCommand),
    /// Stream events until interrupted (live)
    Monitor(cmd::monitor::Args),
    /// Datapath, proxy ports, counts and health (live)
    Status(cmd::status::Args),
    /// Run a command as a fresh endpoint under a policy (bpf datapath)
    Lockdown(cmd::lockdown::Args),
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Parse and check policy files; errors as FILE:LINE:COLUMN: message
    Validate(cmd::policy::ValidateArgs),
    /// The rules in force, with source file and revision (live)
    Get(cmd::policy::GetArgs),
    /// The verdict for one flow and the rules that decide it (offline with --config, else live)
    Trace(cmd::policy::TraceArgs),
}

#[derive(Debug, Subcommand)]
pub enum EndpointCommand {
    /// Every endpoint: id, name, identity, labels, ips, enforcement, audit mode
    List(cmd::endpoint::ListArgs),
    /// One endpoint by name or numeric id
    Get(cmd::endpoint::GetArgs),
    /// Set an endpoint option: PolicyAuditMode=Enabled|Disabled
    Config(cmd::endpoint::ConfigArgs),
}

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Every numeric identity and its labels
    List(cmd::identity::ListArgs),
    /// One identity by number
    Get(cmd::identity::GetArgs),
}

#[derive(Debug, Subcommand)]
pub enum BpfCommand {
    /// Policy maps
    #[command(subcommand)]
    Policy(BpfPolicyCommand),
    /// The ipcache: prefix → identity
    #[command(subcommand)]
    Ipcache(BpfIpcacheCommand),
}

#[derive(Debug, Subcommand)]
pub enum BpfPolicyCommand {
    /// One endpoint's policy map, one row per entry
    Get(cmd::bpf::PolicyGetArgs),
}

#[derive(Debug, Subcommand)]
pub enum BpfIpcacheCommand {
    /// Every prefix and its identity
    List(cmd::bpf::IpcacheListArgs),
}

#[derive(Debug, Subcommand)]
pub enum FqdnCommand {
    /// The FQDN cache
    #[command(subcommand)]
    Cache(FqdnCacheCommand),
}

#[derive(Debug, Subcommand)]
pub enum FqdnCacheCommand {
    /// Learned names and IPs with expiry
    List(cmd::fqdn::CacheArgs),
    /// Forget learned entries (their allows go with them)
    Clean(cmd::fqdn::CacheArgs),
}

impl Cli {
    /// Runs the parsed command. `Ok` carries the exit status of a command that ran to its end
    /// (0, or 1 for a verdict or validation failure it reported); `Err` is a usage or I/O error
    /// (exit status 2).
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let g = self.global;
        match self.command {
            Command::Run(a) => cmd::run::run(&g, a),
            Command::Policy(PolicyCommand::Validate(a)) => cmd::policy::validate(&g, a),
            Command::Policy(PolicyCommand::Get(a)) => cmd::policy::get(&g, a),
            Command::Policy(PolicyCommand::Trace(a)) => cmd::policy::trace(&g, a),
            Command::Endpoint(EndpointCommand::List(a)) => cmd::endpoint::list(&g, a),
            Command::Endpoint(EndpointCommand::Get(a)) => cmd::endpoint::get(&g, a),
            Command::Endpoint(EndpointCommand::Config(a)) => cmd::endpoint::config(&g, a),
            Command::Config(a) => cmd::config::run(&g, a),
            Command::Identity(IdentityCommand::List(a)) => cmd::identity::list(&g, a),
            Command::Identity(IdentityCommand::Get(a)) => cmd::identity::get(&g, a),
            Command::Bpf(BpfCommand::Policy(BpfPolicyCommand::Get(a))) => {
                cmd::bpf::policy_get(&g, a)
            }
            Command::Bpf(BpfCommand::Ipcache(BpfIpcacheCommand::List(a))) => {
                cmd::bpf::ipcache_list(&g, a)
            }
            Command::Fqdn(FqdnCommand::Cache(FqdnCacheCommand::List(a))) => cmd::fqdn::list(&g, a),
            Command::Fqdn(FqdnCommand::Cache(FqdnCacheCommand::Clean(a))) => {
                cmd::fqdn::clean(&g, a)
            }
            Command::Monitor(a) => cmd::monitor::run(&g, a),
            Command::Status(a) => cmd::status::run(&g, a),
            Command::Lockdown(a) => cmd::lockdown::run(&g, a),
        }
    }
}
