//! The tracker's bookkeeping: the streams (ECDS and VM) and the ECDS file
//! as this replica knows them, the other replicas' as last read, and which
//! node is on the delta channel. Plain data behind the tracker's lock.

use super::status::{time, EnvoyStatus, Outcome, RemoteStream, RemoteVm, ReplicaStatus, VersionEvent, VmStatus};
use crate::config::Version;
use apitokens_core::Timestamp;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// One xDS stream, numbered in the order they connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(pub u64);

/// How long after a VM of a node subscribes that node stays on the ECDS
/// rule: its other VMs (an Envoy starting, streams reopening after a restart
/// of this control plane) subscribe within a few ticks, and until they have,
/// the VMs counted so far are not all of them.
pub const SETTLE: Duration = Duration::from_millis(500);

#[derive(Clone, Debug)]
pub(super) struct Stream {
    pub(super) node: String,
    pub(super) cluster: String,
    pub(super) peer: String,
    pub(super) connected_at: Timestamp,
    pub(super) disconnected_at: Option<Timestamp>,
    pub(super) initial_version: String,
    /// Held (see [`EnvoyStatus::held`]): the version Envoy reported.
    pub(super) held: Option<Version>,
    pub(super) sent: Option<Version>,
    /// When the response awaiting an answer (ACK or NACK) was sent.
    pub(super) unanswered_since: Option<Instant>,
    pub(super) acked: Option<Version>,
    pub(super) nacked: Option<(Version, String)>,
    pub(super) history: VecDeque<VersionEvent>,
}

#[derive(Clone, Debug, Default)]
pub(super) struct File {
    pub(super) path: String,
    pub(super) written: Option<Version>,
    pub(super) written_at: Option<Timestamp>,
    pub(super) error: Option<String>,
}

#[derive(Default)]
pub(super) struct Inner {
    /// See [`Tracker::with_settle`].
    pub(super) settle: Duration,
    /// When each (node, VM) first subscribed: a VM that reopens its stream
    /// (its root context replaced by a snapshot) is not a new VM.
    pub(super) first_seen: BTreeMap<(String, String), Instant>,
    /// Numbers both ECDS and VM streams (one numbering, shared with the
    /// other replicas).
    pub(super) next_id: u64,
    pub(super) streams: BTreeMap<StreamId, Stream>,
    pub(super) disconnected: VecDeque<(StreamId, Stream)>,
    pub(super) file: Option<File>,
    /// This replica's name (with replicas only).
    pub(super) replica: Option<String>,
    pub(super) remote: Vec<RemoteStream>,
    pub(super) replicas: Vec<ReplicaStatus>,
    /// Connected VM streams.
    pub(super) vms: BTreeMap<StreamId, Vm>,
    /// VMs whose stream ended awaiting a snapshot, newest first.
    pub(super) awaiting: VecDeque<(StreamId, Vm)>,
    pub(super) remote_vms: Vec<RemoteVm>,
}

impl Inner {
    /// This replica's VM streams, connected then awaiting a snapshot, each
    /// with its status.
    pub(super) fn own_vms(&self) -> impl Iterator<Item = (&Vm, VmStatus)> {
        let replica = self.replica.as_ref();
        let connected = self.vms.iter().map(|(id, vm)| (id, vm, true));
        let awaiting = self.awaiting.iter().map(|(id, vm)| (id, vm, false));
        connected
            .chain(awaiting)
            .map(move |(id, vm, connected)| (vm, vm.view(replica, *id, connected)))
    }

    /// Whether `node` is on the delta channel: a write waits for its VMs
    /// (not its ECDS ACK) and its snapshots may wait for the interval. Only
    /// when the VMs and the Envoy can be told apart and none is missing:
    /// - at least one connected VM stream (here or at a live replica);
    /// - at most one connected Envoy (ECDS) stream with this node id (two
    ///   Envoys sharing a node id cannot be told apart by their VMs: each
    ///   keeps the ECDS rule, so one's NACK is never hidden by the other's VMs);
    /// - as many connected VM streams as the filter counts VMs in its Envoy
    ///   (a worker whose stream is refused or broken gets snapshots at once);
    /// - its Envoy did not reject its latest snapshot (a NACK not followed by
    ///   an ACK of that version or a later one): a configuration it cannot
    ///   load (settings, module) is pushed and reported at once, and a write
    ///   is not counted as applied while its Envoy rejects what it is sent.
    pub(super) fn on_delta(&self, node: &str) -> bool {
        let local = self.vms.values().filter(|vm| vm.node == node && vm.awaiting.is_none());
        // - none of its VMs subscribed within [`vms::SETTLE`] (the others
        //   may not have registered yet).
        if local.clone().any(|vm| vm.subscribed_at.elapsed() < self.settle) {
            return false;
        }
        let remote = self
            .remote_vms
            .iter()
            .filter(|r| r.live && r.status.connected && r.status.node == node);
        let (mut connected, mut expected) = (0u32, 0u32);
        for envoy_vms in local.map(|vm| vm.envoy_vms).chain(remote.map(|r| r.status.envoy_vms)) {
            connected += 1;
            expected = expected.max(envoy_vms);
        }
        let rejecting = |acked: Option<Version>, nacked: Option<&(Version, String)>| {
            nacked.is_some_and(|(rejected, _)| acked.is_none_or(|a| a < *rejected))
        };
        let local = self.streams.values().filter(|s| s.node == node);
        let remote = self.remote.iter().filter(|r| r.live && r.status.node == node);
        let mut envoys = 0;
        for (acked, nacked) in local
            .map(|s| (s.acked, s.nacked.as_ref()))
            .chain(remote.map(|r| (r.acked, r.nacked.as_ref())))
        {
            if rejecting(acked, nacked) {
                return false;
            }
            envoys += 1;
        }
        connected > 0 && connected >= expected && envoys <= 1
    }
}

#[derive(Clone, Debug)]
pub(super) struct Vm {
    pub(super) node: String,
    pub(super) vm: String,
    pub(super) peer: String,
    pub(super) connected_at: Timestamp,
    pub(super) subscribed: Version,
    pub(super) held: bool,
    pub(super) sent: Option<Version>,
    /// Since when a table it was sent is not acknowledged.
    pub(super) unanswered_since: Option<Instant>,
    /// What it enforces: where it subscribed, then what it acknowledged.
    pub(super) acked: Version,
    /// Told to wait for a snapshot, at this time.
    pub(super) awaiting: Option<Instant>,
    /// Its Envoy's VMs, as the filter counted them (0: unknown).
    pub(super) envoy_vms: u32,
    /// When it first subscribed, on any stream (see [`SETTLE`]).
    pub(super) subscribed_at: Instant,
}

impl Vm {
    /// Its status, `connected` or not.
    pub fn view(&self, replica: Option<&String>, id: StreamId, connected: bool) -> VmStatus {
        VmStatus {
            replica: replica.cloned(),
            stream: id.0,
            node: self.node.clone(),
            vm: self.vm.clone(),
            peer: self.peer.clone(),
            connected,
            connected_at: self.connected_at.to_rfc3339(),
            subscribed_revision: self.subscribed.revision.to_string(),
            subscribed_epoch: self.subscribed.epoch.to_string(),
            held: self.held,
            sent_revision: self.sent.map(|v| v.revision.to_string()),
            acked_revision: Some(self.acked.revision.to_string()),
            acked_epoch: Some(self.acked.epoch.to_string()),
            awaiting_snapshot: self.awaiting.is_some(),
            envoy_vms: self.envoy_vms,
        }
    }
}

pub(super) fn view(replica: Option<&String>, id: &StreamId, s: &Stream) -> EnvoyStatus {
    EnvoyStatus {
        replica: replica.cloned(),
        stream: id.0,
        node: s.node.clone(),
        cluster: s.cluster.clone(),
        peer: s.peer.clone(),
        connected: s.disconnected_at.is_none(),
        connected_at: time(s.connected_at),
        disconnected_at: s.disconnected_at.map(time),
        initial_version: s.initial_version.clone(),
        held: s.held.is_some(),
        sent_version: s.sent.map(|v| v.to_string()),
        acked_version: s.acked.map(|v| v.to_string()),
        acked_epoch: s.acked.map(|v| v.epoch.to_string()),
        last_nack: s.history.iter().find(|e| e.outcome == Outcome::Nack).cloned(),
        history: s.history.clone(),
        delta: false,
        vms: Vec::new(),
        enforced_version: None,
    }
}
