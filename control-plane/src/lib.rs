//! The apitokens control plane: the token REST API over durable storage, and
//! live push of the filter configuration to every Envoy over ECDS (gRPC,
//! state of the world) or an atomically replaced file.
//!
//! The configuration schema, its validation and the authorization decision
//! come from `apitokens_core`, the same code the filter runs.

pub mod api;
pub mod clock;
pub mod console;
pub mod ecds;
pub mod engine;
pub mod file_ecds;
pub mod logging;
pub mod render;
pub mod secret;
pub mod status;
pub mod store;
pub mod xds;
pub mod xds_grpc;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod testutil;
