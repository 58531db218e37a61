//! `fqdnwall identity list|get`: numeric identities and their labels.

use std::process::ExitCode;

use crate::api::paths;
use crate::cli::Global;
use crate::view::{self, IdentityView};

#[derive(Debug, clap::Args)]
pub struct ListArgs {}

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// Numeric identity
    pub id: u32,
}

pub fn list(g: &Global, _a: ListArgs) -> anyhow::Result<ExitCode> {
    let ids: Vec<IdentityView> = super::client(g)?.get(paths::IDENTITIES)?;
    super::show(g, &ids, |i| view::text::identities(i))
}

pub fn get(g: &Global, a: GetArgs) -> anyhow::Result<ExitCode> {
    let id: IdentityView = super::client(g)?.get(&format!("{}/{}", paths::IDENTITIES, a.id))?;
    super::show(g, &id, |i| view::text::identities(std::slice::from_ref(i)))
}
