//! Getting the configuration to every Envoy: ECDS over gRPC (a state machine
//! per stream, `sotw`, adapted to tonic by `server`), or a file Envoy watches
//! (`file`); the wire encoding of the resource (`resource`); and which Envoy
//! stream has applied which version (`acks`).

pub mod acks;
pub mod file;
pub mod resource;
pub mod server;
mod sotw;
