//! The fqdnwall policy engine. Pure: no I/O, no clock, no runtime.
//!
//! Data flows one way: policy text → [`parse`] → typed [`model`] → identities and selectors
//! → per-endpoint map state (entries keyed like the datapath's policy map) → diffs that a
//! datapath applies. The map-state lookup is checked against a deliberately simple reference
//! evaluator that decides flows straight from the rules.

pub mod error;
pub mod fqdn;
pub mod labels;
pub mod model;

pub use error::{Diagnostic, PolicyError, Span};
