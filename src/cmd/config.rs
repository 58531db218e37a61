//! `fqdnwall config PolicyAuditMode=true|false`: the running agent's global settings.

use std::process::ExitCode;

use anyhow::bail;
use hyper::Method;

use crate::api::paths;
use crate::cli::Global;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// PolicyAuditMode=true|false
    #[arg(value_name = "OPTION=VALUE")]
    pub setting: String,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct GlobalSettings {
    pub policy_audit_mode: bool,
}

pub fn parse_setting(s: &str) -> anyhow::Result<GlobalSettings> {
    let Some((k, v)) = s.split_once('=') else {
        bail!("expected OPTION=VALUE, e.g. PolicyAuditMode=true, found {s:?}");
    };
    if !k.eq_ignore_ascii_case("PolicyAuditMode") {
        bail!("unknown option {k:?}; the option is PolicyAuditMode");
    }
    let on = match v.to_ascii_lowercase().as_str() {
        "true" | "enabled" => true,
        "false" | "disabled" => false,
        _ => bail!("PolicyAuditMode takes true or false, found {v:?}"),
    };
    Ok(GlobalSettings {
        policy_audit_mode: on,
    })
}

pub fn run(g: &Global, a: Args) -> anyhow::Result<ExitCode> {
    let s = parse_setting(&a.setting)?;
    let now: GlobalSettings = super::client(g)?.call(Method::PATCH, paths::CONFIG, Some(&s))?;
    super::show(g, &now, |n| {
        format!("PolicyAuditMode={}\n", n.policy_audit_mode)
    })
}
