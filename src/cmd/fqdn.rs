//! `fqdnwall fqdn cache list|clean`: learned names and IPs.

use std::process::ExitCode;

use hyper::Method;

use crate::api::{encode, paths};
use crate::cli::Global;
use crate::view::{self, FqdnCleanView, FqdnEntryView};

#[derive(Debug, clap::Args)]
pub struct CacheArgs {
    /// Only this endpoint (name or numeric id)
    #[arg(long, value_name = "EP")]
    pub endpoint: Option<String>,
    /// Only this name, or names matching this pattern (`*.example.com`)
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
}

impl CacheArgs {
    fn query(&self) -> String {
        let mut q = Vec::new();
        if let Some(e) = &self.endpoint {
            q.push(format!("endpoint={}", encode(e)));
        }
        if let Some(n) = &self.name {
            q.push(format!("name={}", encode(n)));
        }
        if q.is_empty() {
            paths::FQDN_CACHE.to_string()
        } else {
            format!("{}?{}", paths::FQDN_CACHE, q.join("&"))
        }
    }
}

pub fn list(g: &Global, a: CacheArgs) -> anyhow::Result<ExitCode> {
    let rows: Vec<FqdnEntryView> = super::client(g)?.get(&a.query())?;
    super::show(g, &rows, |r| view::text::fqdn(r))
}

pub fn clean(g: &Global, a: CacheArgs) -> anyhow::Result<ExitCode> {
    let done: FqdnCleanView = super::client(g)?.call(Method::DELETE, &a.query(), None::<&()>)?;
    super::show(g, &done, |d| {
        format!("Removed {} learned entries\n", d.removed)
    })
}
