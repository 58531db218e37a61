//! `fqdnwall bpf policy get EP` and `bpf ipcache list`: the datapath's maps as the agent
//! applied them (whichever datapath is in use).

use std::process::ExitCode;

use crate::api::{encode, paths};
use crate::cli::Global;
use crate::view::{self, IpcacheView, MapEntryView};

#[derive(Debug, clap::Args)]
pub struct PolicyGetArgs {
    /// Endpoint name or numeric id
    pub endpoint: String,
}

#[derive(Debug, clap::Args)]
pub struct IpcacheListArgs {}

pub fn policy_get(g: &Global, a: PolicyGetArgs) -> anyhow::Result<ExitCode> {
    let rows: Vec<MapEntryView> =
        super::client(g)?.get(&format!("{}/{}", paths::BPF_POLICY, encode(&a.endpoint)))?;
    super::show(g, &rows, |r| view::text::map_entries(r))
}

pub fn ipcache_list(g: &Global, _a: IpcacheListArgs) -> anyhow::Result<ExitCode> {
    let rows: Vec<IpcacheView> = super::client(g)?.get(paths::BPF_IPCACHE)?;
    super::show(g, &rows, |r| view::text::ipcache(r))
}
