//! Getting the configuration to every Envoy: ECDS over gRPC (a state machine
//! per stream, `sotw`, adapted to HTTP/2 by `server`, its responses written
//! around the shared payload by `frames`), or a file Envoy watches (`file`);
//! the wire encoding of the resource (`resource`); who may hold the port and
//! how much of it (`peers`); and, on the same server, the filters' usage
//! reports (`usage`) and the delta channel to every filter VM (`delta`).
//! What each stream applied is kept by the ACK tracker (`crate::acks`).

pub mod delta;
pub mod file;
mod frames;
pub mod grpc;
pub mod peers;
pub mod resource;
pub mod server;
mod sotw;
pub mod usage;

use std::future::Future;
use std::pin::Pin;

/// The future of the hand-written tonic services (`server`, `usage`).
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
