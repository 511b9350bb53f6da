//! Which Envoy stream has acknowledged (ACK) or rejected (NACK) which
//! configuration version: for read-your-writes (a write answers once every
//! connected stream applied its version), the status page and the logs.
//!
//! Every xDS stream is tracked on its own, never merged by node id: two
//! Envoys started from one configuration share a node id, and one's ACK must
//! not hide the other's NACK.
//!
//! With replicas on PostgreSQL, the streams of the other replicas (as they
//! recorded them in the database, see `crate::replicas`) count too: a write
//! waits for every Envoy of every live replica ([`Tracker::set_remote`]).
//!
//! The filter VMs' delta streams are tracked here too (`vms`): an
//! Envoy whose node has VM streams has applied a version when each of them
//! enforces it, whatever its ECDS stream acknowledged ([`Tracker::rollout`]).
//!
//! One job per file: the bookkeeping (`state`), the [`Tracker`] and what
//! Envoy streams and the ECDS file tell it (`tracker`), what VM streams tell
//! it (`vms`), how far a version got and waiting for it (`rollout`), what
//! the status page shows (`status`, `views`), and what replicas exchange
//! (`shared`).

mod rollout;
mod shared;
mod state;
mod status;
#[cfg(test)]
mod tests;
mod tracker;
mod views;
mod vms;

pub use rollout::{Lag, Lagging, Rollout};
pub(crate) use shared::is_vm;
pub use state::StreamId;
pub use status::{
    EnvoyStatus, FileStatus, LocalStream, LocalVm, Outcome, RemoteStream, RemoteVm, ReplicaStatus, VersionEvent,
    VmStatus,
};
pub use tracker::Tracker;
