//! What replicas on one PostgreSQL database exchange through it
//! (`crate::replicas`): this replica's streams for the others, the others'
//! for this replica's waiting writes.

use super::state::view;
use super::status::{LocalStream, LocalVm, RemoteStream, RemoteVm, ReplicaStatus};
use super::tracker::Tracker;
use std::collections::BTreeSet;
use tokio::sync::watch;

impl Tracker {
    /// Names this replica on the status page (replicas on PostgreSQL).
    pub fn set_replica(&self, name: &str) {
        self.lock().replica = Some(name.to_owned());
    }

    /// The other replicas' streams (Envoys' and VMs') and the replicas
    /// themselves, as last read from the database: writes waiting for a
    /// version see them at once.
    pub fn set_remote(&self, streams: Vec<RemoteStream>, vms: Vec<RemoteVm>, replicas: Vec<ReplicaStatus>) {
        // Which nodes have VM streams, and which await a snapshot: what the
        // ECDS streams decide on.
        let shape = |vms: &[RemoteVm]| -> BTreeSet<(String, bool, bool)> {
            vms.iter()
                .filter(|r| r.live)
                .map(|r| (r.status.node.clone(), r.status.connected, r.status.awaiting_snapshot))
                .collect()
        };
        let vms_changed = {
            let mut inner = self.lock();
            let changed = shape(&inner.remote_vms) != shape(&vms);
            inner.remote = streams;
            inner.remote_vms = vms;
            inner.replicas = replicas;
            changed
        };
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        if vms_changed {
            self.vms_changed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// This replica's connected streams, to share with the other replicas.
    pub fn local_streams(&self) -> Vec<LocalStream> {
        let inner = self.lock();
        inner
            .streams
            .iter()
            .map(|(id, s)| LocalStream {
                acked: s.acked,
                nacked: s.nacked.clone(),
                status: view(inner.replica.as_ref(), id, s),
            })
            .collect()
    }

    /// This replica's VM streams (and the VMs awaiting a snapshot), to share
    /// with the other replicas.
    pub fn local_vms(&self) -> Vec<LocalVm> {
        self.lock()
            .own_vms()
            .map(|(vm, status)| LocalVm {
                acked: Some(vm.acked),
                status,
            })
            .collect()
    }

    /// Resolves at the next change of this replica's own streams.
    pub fn subscribe_local(&self) -> watch::Receiver<u64> {
        self.local_changed.subscribe()
    }
}

/// Whether a stream's JSON as shared through the database is a VM's.
pub(crate) fn is_vm(json: &serde_json::Value) -> bool {
    json.get("vm").is_some()
}
