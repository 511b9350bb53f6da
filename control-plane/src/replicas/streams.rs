//! This replica's streams as the database stores them, and the rows read
//! back as the ACK tracker takes them: the other replicas' Envoy and filter
//! VM streams, and every replica for `/status`.

use crate::config::Version;
use crate::push::acks::{EnvoyStatus, RemoteStream, ReplicaStatus, Tracker};
use crate::push::vms::{self, RemoteVm, VmStatus};
use crate::store::{ReplicaRow, StreamRow};
use std::collections::BTreeMap;

/// This replica's streams now, Envoys' and filter VMs' (numbered together),
/// by number.
pub(super) fn local(acks: &Tracker) -> BTreeMap<u64, StreamRow> {
    let row = |stream: u64, acked: Option<Version>, nacked, status: Option<String>| {
        let status = status?;
        Some((
            stream,
            StreamRow {
                stream,
                acked,
                nacked,
                status,
            },
        ))
    };
    acks.local_streams()
        .into_iter()
        .filter_map(|s| {
            row(
                s.status.stream,
                s.acked,
                s.nacked,
                serde_json::to_string(&s.status).ok(),
            )
        })
        .chain(
            acks.local_vms()
                .into_iter()
                .filter_map(|vm| row(vm.status.stream, vm.acked, None, serde_json::to_string(&vm.status).ok())),
        )
        .collect()
}

/// What the tracker takes from the replicas read.
#[derive(Debug, Default)]
pub(super) struct Remote {
    pub(super) streams: Vec<RemoteStream>,
    pub(super) vms: Vec<RemoteVm>,
    pub(super) replicas: Vec<ReplicaStatus>,
}

/// The replicas read, this one (`this_id`) included; `counts` says whether
/// a replica's streams count for writes (see `state`). A stream whose
/// status cannot be read (written by another version) is left out.
pub(super) fn remote(rows: Vec<ReplicaRow>, this_id: &str, counts: impl Fn(&ReplicaRow, bool) -> bool) -> Remote {
    let mut out = Remote::default();
    for replica in rows {
        let this = replica.id == this_id;
        let live = counts(&replica, this);
        let mut envoys = 0;
        for stream in replica.streams {
            let Ok(mut json) = serde_json::from_str::<serde_json::Value>(&stream.status) else {
                continue;
            };
            let vm = vms::is_vm(&json);
            if !vm {
                envoys += 1;
            }
            if this {
                continue;
            }
            // Shown as the other replica's.
            if let Some(fields) = json.as_object_mut() {
                fields.insert("replica".into(), replica.name.clone().into());
            }
            let acked = stream.acked;
            if vm {
                if let Ok(status) = serde_json::from_value::<VmStatus>(json) {
                    out.vms.push(RemoteVm { live, acked, status });
                }
            } else if let Ok(status) = serde_json::from_value::<EnvoyStatus>(json) {
                let nacked = stream.nacked;
                out.streams.push(RemoteStream {
                    live,
                    acked,
                    nacked,
                    status,
                });
            }
        }
        out.replicas.push(ReplicaStatus {
            name: replica.name,
            id: replica.id,
            this,
            live,
            heartbeat_age_ms: u64::try_from(replica.silent_for.as_millis()).unwrap_or(u64::MAX),
            envoys,
        });
    }
    out
}
