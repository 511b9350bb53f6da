//! The apitokens control plane: the token REST API over durable storage, and
//! live push of the filter configuration to every Envoy over ECDS (gRPC,
//! state of the world) or an atomically replaced file.
//!
//! - `tokens`: the domain, the rules of API tokens and the only writer;
//! - `store`: durable storage (SQLite or PostgreSQL) with a change log;
//! - `config`: the configuration Envoy should enforce, kept and edited in
//!   memory, published as versioned snapshots;
//! - `push`: ECDS over gRPC and to a file, the delta channel, usage reports;
//! - `acks`: which Envoy (and filter VM) applied which version;
//! - `replicas`: several `serve` processes on one PostgreSQL database;
//! - `api`: the HTTP adapter; `cli`: the command-line adapter;
//! - `metrics`: `/metrics` for Prometheus.
//!
//! The configuration schema, its validation and the authorization decision
//! come from `apitokens_core`, the same code the filter runs.

#![forbid(unsafe_code)]

pub mod acks;
pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod metrics;
pub mod push;
pub mod render;
pub mod replicas;
pub mod store;
pub mod tokens;
pub mod trust;
pub mod webhooks;

#[cfg(test)]
mod testutil;
