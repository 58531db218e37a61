//! `fqdnwall endpoint list|get|config`.

use std::process::ExitCode;

use anyhow::bail;
use hyper::Method;

use crate::api::{encode, paths};
use crate::cli::Global;
use crate::view::{self, EndpointView};

#[derive(Debug, clap::Args)]
pub struct ListArgs {}

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// Endpoint name or numeric id
    pub endpoint: String,
}

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// Endpoint name or numeric id
    pub endpoint: String,
    /// PolicyAuditMode=Enabled|Disabled
    #[arg(value_name = "OPTION=VALUE")]
    pub setting: String,
}

/// Body of an endpoint configuration change.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EndpointSettings {
    pub policy_audit_mode: bool,
}

pub fn list(g: &Global, _a: ListArgs) -> anyhow::Result<ExitCode> {
    let eps: Vec<EndpointView> = super::client(g)?.get(paths::ENDPOINTS)?;
    super::show(g, &eps, |e| view::text::endpoints(e))
}

pub fn get(g: &Global, a: GetArgs) -> anyhow::Result<ExitCode> {
    let ep: EndpointView =
        super::client(g)?.get(&format!("{}/{}", paths::ENDPOINTS, encode(&a.endpoint)))?;
    super::show(g, &ep, view::text::endpoint)
}

/// `PolicyAuditMode=Enabled|Disabled` (also true/false, case-insensitive).
pub fn parse_setting(s: &str) -> anyhow::Result<EndpointSettings> {
    let Some((k, v)) = s.split_once('=') else {
        bail!("expected OPTION=VALUE, e.g. PolicyAuditMode=Enabled, found {s:?}");
    };
    if !k.eq_ignore_ascii_case("PolicyAuditMode") {
        bail!("unknown endpoint option {k:?}; the option is PolicyAuditMode");
    }
    let on = match v.to_ascii_lowercase().as_str() {
        "enabled" | "true" => true,
        "disabled" | "false" => false,
        _ => bail!("PolicyAuditMode takes Enabled or Disabled, found {v:?}"),
    };
    Ok(EndpointSettings {
        policy_audit_mode: on,
    })
}

pub fn config(g: &Global, a: ConfigArgs) -> anyhow::Result<ExitCode> {
    let settings = parse_setting(&a.setting)?;
    let ep: EndpointView = super::client(g)?.call(
        Method::PATCH,
        &format!("{}/{}", paths::ENDPOINTS, encode(&a.endpoint)),
        Some(&settings),
    )?;
    super::show(g, &ep, |e| {
        format!(
            "Endpoint {} ({}): PolicyAuditMode {}\n",
            e.name,
            e.id,
            if e.audit_mode { "Enabled" } else { "Disabled" }
        )
    })
}
