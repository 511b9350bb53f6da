//! Getting the configuration to every Envoy: ECDS over gRPC (a state machine
//! per stream, `sotw`, adapted to tonic by `server`), or a file Envoy watches
//! (`file`); the wire encoding of the resource (`resource`); which Envoy
//! stream has applied which version (`acks`); and, on the same server, the
//! filters' usage reports (`usage`).

pub mod acks;
pub mod file;
pub mod resource;
pub mod server;
mod sotw;
pub mod usage;

use std::future::Future;
use std::pin::Pin;

/// The future of the hand-written tonic services (`server`, `usage`).
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
