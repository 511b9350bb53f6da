//! Decision logic of the apitokens gateway filter, free of any proxy API: the
//! configuration schema and its validation, the token table, the permission
//! rules and the decision. The proxy-wasm filter and the control plane both
//! build on this crate.

// Decisions are plain safe Rust; the filter's ABI glue is the only unsafe code.
#![forbid(unsafe_code)]

pub mod access;
pub mod bearer;
pub mod compact;
pub mod conditions;
pub mod config;
pub mod decision;
pub mod delta;
pub mod denial;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod gate;
pub mod name;
pub mod overrides;
pub mod ratelimit;
pub mod reply;
pub mod role;
pub mod rules;
pub mod spec;
pub mod table;
pub mod timestamp;
pub mod usage;

pub use access::Access;
pub use config::Config;
pub use decision::Grant;
pub use denial::{Counter, Denial};
pub use error::ConfigError;
pub use role::{Role, Verb};
pub use spec::{PluginConfig, TokenSpec};
pub use timestamp::Timestamp;
