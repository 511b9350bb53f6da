//! What the status page shows of every consumer of the configuration (Envoy
//! streams, their VMs, the ECDS file, the replicas), and what replicas share
//! of their own through the database (the same JSON).

use crate::config::Version;
use apitokens_core::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Outcome {
    Ack,
    Nack,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionEvent {
    pub version: String,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub time: String,
}

/// One stream as the status page shows it (and as replicas share it through
/// the database).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvoyStatus {
    /// The `serve` replica the stream is connected to (`--replica-name`;
    /// only with replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    pub stream: u64,
    pub node: String,
    pub cluster: String,
    /// The Envoy's address as this control plane sees it.
    pub peer: String,
    pub connected: bool,
    pub connected_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disconnected_at: Option<String>,
    /// The version Envoy said it had when it connected (from before a
    /// control-plane restart, for example): not counted as applied. As Envoy
    /// sent it (`EPOCH.REVISION`).
    pub initial_version: String,
    /// Envoy enforces a version newer than this control plane's (as
    /// `initial_version` says): nothing is sent to it until this control
    /// plane reaches it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_version: Option<String>,
    /// The latest version this stream sent and Envoy accepted: what it enforces.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acked_version: Option<String>,
    /// The store epoch of `acked_version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_epoch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_nack: Option<VersionEvent>,
    /// Recent ACKs and NACKs, newest first.
    #[serde(default)]
    pub history: VecDeque<VersionEvent>,
    /// Its node has VM streams (the delta channel): a write waits for
    /// those, not for this stream's ACK. `false`: ECDS only (an older
    /// filter), a write waits for this stream's ACK. Filled in by
    /// [`Tracker::envoys`].
    #[serde(default)]
    pub delta: bool,
    /// Its node's VM streams (connected, or awaiting a snapshot).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<VmStatus>,
    /// The version it enforces everywhere: on the delta channel, its VMs'
    /// oldest; otherwise its ECDS ACK. Filled in by [`Tracker::envoys`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforced_version: Option<String>,
}

/// One VM stream as `/status` shows it (under its Envoy) and as replicas
/// share it through the database (told from an Envoy stream by `vm`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmStatus {
    /// The replica it is connected to (with replicas only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    pub stream: u64,
    pub node: String,
    /// The VM's id (random per VM, chosen by the filter).
    pub vm: String,
    pub peer: String,
    pub connected: bool,
    pub connected_at: String,
    /// The table the VM enforced when it subscribed (`revision`, `epoch`).
    pub subscribed_revision: String,
    pub subscribed_epoch: String,
    /// It enforces a table newer than this control plane's: nothing is sent
    /// to it until this control plane reaches it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    /// The table the changes sent so far bring it to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_revision: Option<String>,
    /// The table it said it enforces last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_revision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_epoch: Option<String>,
    /// No history reaches its table: it waits for a snapshot (its stream
    /// ended; not counted as connected).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub awaiting_snapshot: bool,
    /// How many VMs its Envoy has, as the filter counted them (0: unknown).
    #[serde(default)]
    pub envoy_vms: u32,
}

/// A `serve` replica on the shared database, for the status page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    pub name: String,
    pub id: String,
    /// The replica answering this request.
    pub this: bool,
    pub live: bool,
    pub heartbeat_age_ms: u64,
    /// Its connected Envoy streams.
    pub envoys: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FileStatus {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub written_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub written_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A stream of another replica, as that replica recorded it in the database.
#[derive(Clone, Debug)]
pub struct RemoteStream {
    /// Its replica's heartbeat is recent: the stream counts for
    /// read-your-writes. (A replica that stopped heartbeating is shown, but
    /// no write waits for its Envoys: they are moving to another replica.)
    pub live: bool,
    pub acked: Option<Version>,
    pub nacked: Option<(Version, String)>,
    pub status: EnvoyStatus,
}

/// A connected stream of this replica, as shared with the others.
#[derive(Clone, Debug)]
pub struct LocalStream {
    pub acked: Option<Version>,
    pub nacked: Option<(Version, String)>,
    pub status: EnvoyStatus,
}

/// A VM stream of another replica, as that replica recorded it.
#[derive(Clone, Debug)]
pub struct RemoteVm {
    /// Its replica's heartbeat is recent.
    pub live: bool,
    pub acked: Option<Version>,
    pub status: VmStatus,
}

/// A VM stream of this replica, as shared with the others.
#[derive(Clone, Debug)]
pub struct LocalVm {
    pub acked: Option<Version>,
    pub status: VmStatus,
}

/// A time as the status page shows it.
pub(super) fn time(t: Timestamp) -> String {
    t.to_rfc3339()
}
