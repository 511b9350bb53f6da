//! The tracker as the status page and the metrics read it.

use super::state::view;
use super::status::{time, EnvoyStatus, FileStatus, ReplicaStatus, VmStatus};
use super::tracker::Tracker;
use std::collections::BTreeSet;

impl Tracker {
    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        self.lock().replicas.clone()
    }

    /// Every connected stream (this replica's, then the other replicas'),
    /// then this replica's recently disconnected ones; each connected one
    /// with its node's VM streams.
    pub fn envoys(&self) -> Vec<EnvoyStatus> {
        let vms = self.vms();
        let inner = self.lock();
        let replica = inner.replica.as_ref();
        let mut envoys: Vec<EnvoyStatus> = inner
            .streams
            .iter()
            .map(|(id, s)| view(replica, id, s))
            .chain(inner.remote.iter().map(|r| EnvoyStatus {
                connected: r.live,
                ..r.status.clone()
            }))
            .collect();
        for envoy in envoys.iter_mut().filter(|e| e.connected) {
            envoy.vms = vms.iter().filter(|vm| vm.node == envoy.node).cloned().collect();
            envoy.delta = inner.on_delta(&envoy.node);
            // What it enforces: its VMs' oldest table on the delta channel,
            // else what its ECDS stream acknowledged.
            envoy.enforced_version = if envoy.delta {
                envoy
                    .vms
                    .iter()
                    .filter(|vm| vm.connected && !vm.held)
                    .filter_map(|vm| vm.acked_revision.as_deref()?.parse::<u64>().ok())
                    .min()
                    .map(|r| r.to_string())
            } else {
                envoy.acked_version.clone()
            };
        }
        envoys.extend(inner.disconnected.iter().map(|(id, s)| view(replica, id, s)));
        envoys
    }

    /// Every VM stream (connected or awaiting a snapshot), this replica's
    /// then the live replicas', for the status page.
    pub fn vms(&self) -> Vec<VmStatus> {
        let inner = self.lock();
        inner
            .own_vms()
            .map(|(_, status)| status)
            .chain(inner.remote_vms.iter().filter(|r| r.live).map(|r| r.status.clone()))
            .collect()
    }

    /// VM streams whose node has no connected Envoy stream (its ECDS goes
    /// to a file, or to a replica that is not live).
    pub fn vms_without_envoy(&self) -> Vec<VmStatus> {
        let envoys: BTreeSet<String> = {
            let inner = self.lock();
            inner
                .streams
                .values()
                .map(|s| s.node.clone())
                .chain(inner.remote.iter().filter(|r| r.live).map(|r| r.status.node.clone()))
                .collect()
        };
        self.vms().into_iter().filter(|vm| !envoys.contains(&vm.node)).collect()
    }

    /// Connected VM streams: this replica's and the live replicas'.
    pub fn delta_streams(&self) -> usize {
        let inner = self.lock();
        inner.vms.len() + inner.remote_vms.iter().filter(|r| r.live && r.status.connected).count()
    }

    pub fn file(&self) -> Option<FileStatus> {
        self.lock().file.as_ref().map(|f| FileStatus {
            path: f.path.clone(),
            written_version: f.written.map(|v| v.to_string()),
            written_at: f.written_at.map(time),
            error: f.error.clone(),
        })
    }
}
