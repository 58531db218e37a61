//! The fqdnwall policy engine. Pure: no I/O, no clock, no runtime.
//!
//! Data flows one way: policy text → [`parse`] (via the span-aware [`yaml`] tree) → typed
//! [`model`] → [`identity`] and [`selector`] cache → per-endpoint [`mapstate`] (entries keyed
//! like the datapath's policy map) → diffs that a datapath applies; [`engine`] drives it and
//! keeps it incremental, [`ipcache`] maps prefixes to identities, [`trace`] explains verdicts.
//! The map-state lookup is checked against the [`reference`] evaluator, which decides flows
//! straight from the rules.

pub mod engine;
pub mod error;
pub mod fqdn;
pub mod identity;
pub mod ipcache;
pub mod labels;
pub mod mapstate;
pub mod model;
pub mod parse;
pub mod reference;
pub mod selector;
pub mod trace;
pub mod yaml;

pub use error::{Diagnostic, PolicyError, Span};
