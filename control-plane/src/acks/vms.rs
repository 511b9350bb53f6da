//! The filter VMs' delta streams (`push::delta`) as the ACK [`Tracker`]
//! keeps them: which VM of which Envoy node is connected, what it was sent,
//! and which table it says it enforces (its acknowledgement).
//!
//! They change what a write waits for: an Envoy node with at least one
//! connected VM stream has applied a version when every one of its VM
//! streams enforces it (each worker VM, not Envoy's main thread, which is
//! what an ECDS ACK says), and its ECDS stream is no longer waited for; a
//! node without one (an older filter, or a VM between two streams) keeps the
//! ECDS semantics. See [`Tracker::rollout`].
//!
//! They also tell the ECDS server when a node needs a snapshot at once
//! ([`Tracker::defers_snapshots`]): when it has no VM stream (ECDS is then
//! its only channel), or when one of its VMs was told that no history
//! reaches its table. Such a VM ends its stream and waits for a snapshot;
//! it is remembered as awaiting one (shared with the other replicas like
//! the streams) until it subscribes again or [`AWAIT_FOR`] passes.

use super::state::{StreamId, Vm};
use super::tracker::Tracker;
use crate::clock;
use crate::config::Version;
use std::time::{Duration, Instant};

/// How long a VM told to wait for a snapshot keeps its node's snapshots
/// coming at once (it subscribes again as soon as one arrives).
pub const AWAIT_FOR: Duration = Duration::from_secs(60);
/// The most VMs whose first subscription is remembered (beyond it, all are
/// forgotten: a node then waits one more [`super::SETTLE`]).
const MAX_FIRST_SEEN: usize = 16_384;
/// The most VMs remembered as awaiting a snapshot.
const MAX_AWAITING: usize = 256;

impl Tracker {
    /// A VM subscribed: it enforces the table at `at` (counted as applied).
    pub fn vm_connected(&self, node: &str, vm: &str, peer: &str, at: Version) -> StreamId {
        self.update_vms(|inner| {
            inner.next_id += 1;
            let id = StreamId(inner.next_id);
            if inner.first_seen.len() >= MAX_FIRST_SEEN {
                inner.first_seen.clear();
            }
            let subscribed_at = *inner
                .first_seen
                .entry((node.to_owned(), vm.to_owned()))
                .or_insert_with(Instant::now);
            // It got its snapshot (or gave up on it): no longer awaiting.
            inner.awaiting.retain(|(_, v)| !(v.node == node && v.vm == vm));
            inner.vms.insert(
                id,
                Vm {
                    node: node.to_owned(),
                    vm: vm.to_owned(),
                    peer: peer.to_owned(),
                    connected_at: clock::now(),
                    subscribed: at,
                    held: false,
                    sent: None,
                    unanswered_since: None,
                    acked: at,
                    awaiting: None,
                    envoy_vms: 0,
                    subscribed_at,
                },
            );
            id
        })
    }

    fn with_vm(&self, id: StreamId, f: impl FnOnce(&mut Vm)) {
        self.update(|inner| {
            if let Some(vm) = inner.vms.get_mut(&id) {
                f(vm);
            }
        });
    }

    /// The VM enforces a table newer than this control plane's (see
    /// [`VmStatus::held`]), or no longer is ahead.
    pub fn vm_held(&self, id: StreamId, held: bool) {
        self.with_vm(id, |vm| vm.held = held);
    }

    /// The changes that bring the VM's table to `to` were sent.
    pub fn vm_sent(&self, id: StreamId, to: Version) {
        self.with_vm(id, |vm| {
            vm.sent = Some(to);
            if vm.acked < to {
                vm.unanswered_since.get_or_insert_with(Instant::now);
            }
        });
    }

    /// The VM says it enforces the table at `at`.
    pub fn vm_acked(&self, id: StreamId, at: Version) {
        self.with_vm(id, |vm| {
            vm.acked = at;
            // An answer: patience starts over for what is still unanswered.
            vm.unanswered_since = vm.sent.filter(|s| *s > at).map(|_| Instant::now());
        });
    }

    /// The VM counts `vms` VMs in its Envoy (it says so with each request).
    pub fn vm_counted(&self, id: StreamId, vms: u32) {
        self.with_vm(id, |vm| vm.envoy_vms = vms);
    }

    /// The VM was told that no history reaches its table: its node's
    /// snapshots go out at once until it subscribes again.
    pub fn vm_snapshot_needed(&self, id: StreamId) {
        self.update_vms(|inner| {
            if let Some(vm) = inner.vms.get_mut(&id) {
                vm.awaiting = Some(Instant::now());
            }
        });
    }

    pub fn vm_disconnected(&self, id: StreamId) {
        self.update_vms(|inner| {
            if let Some(vm) = inner.vms.remove(&id) {
                if vm.awaiting.is_some() {
                    inner.awaiting.push_front((id, vm));
                    inner.awaiting.truncate(MAX_AWAITING);
                }
            }
        });
    }

    /// Changes when VM streams connect or go, or a VM awaits a snapshot
    /// (here or at another replica): what [`Tracker::defers_snapshots`]
    /// answers may have changed.
    pub fn subscribe_vms(&self) -> tokio::sync::watch::Receiver<u64> {
        self.vms_changed.subscribe()
    }

    /// Whether `node`'s new snapshots may wait for the snapshot interval:
    /// it has a connected VM stream (here or at a live replica), and none of
    /// its VMs awaits a snapshot.
    pub fn defers_snapshots(&self, node: &str) -> bool {
        let mut inner = self.lock();
        if !inner.on_delta(node) {
            return false;
        }
        inner
            .awaiting
            .retain(|(_, vm)| vm.awaiting.is_some_and(|t| t.elapsed() < AWAIT_FOR));
        let local = inner.vms.values().filter(|vm| vm.node == node);
        let remote = inner.remote_vms.iter().filter(|r| r.live && r.status.node == node);
        let mut connected = false;
        for (is_connected, awaiting) in local
            .map(|vm| (true, vm.awaiting.is_some()))
            .chain(remote.map(|r| (r.status.connected, r.status.awaiting_snapshot)))
        {
            if awaiting {
                return false;
            }
            connected |= is_connected;
        }
        connected && !inner.awaiting.iter().any(|(_, vm)| vm.node == node)
    }
}
