//! `fqdnwall status`: datapath, proxy ports, counts and health of the running agent.

use std::process::ExitCode;

use crate::api::paths;
use crate::cli::Global;
use crate::view::{self, StatusView};

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(g: &Global, _a: Args) -> anyhow::Result<ExitCode> {
    let st: StatusView = super::client(g)?.get(paths::STATUS)?;
    super::show(g, &st, view::text::status)
}
