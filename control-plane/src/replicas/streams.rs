//! This replica's streams as the database stores them, and the rows read
//! back as the ACK tracker takes them: the other replicas' Envoy and filter
//! VM streams, and every replica for `/status`.

use crate::acks::{self, EnvoyStatus, RemoteStream, RemoteVm, ReplicaStatus, Tracker, VmStatus};
use crate::config::Version;
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
            let vm = acks::is_vm(&json);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DbTime, Epoch, Position, Revision};
    use serde_json::json;
    use std::time::Duration;

    fn envoy(stream: u64, node: &str) -> String {
        json!({
            "stream": stream, "node": node, "cluster": "gateways", "peer": "10.0.0.1:1", "connected": true,
            "connectedAt": "2026-01-01T00:00:00Z", "initialVersion": ""
        })
        .to_string()
    }

    fn vm(stream: u64, node: &str) -> String {
        json!({
            "stream": stream, "node": node, "vm": "vm-1", "peer": "10.0.0.1:2", "connected": true,
            "connectedAt": "2026-01-01T00:00:00Z", "subscribedRevision": "1", "subscribedEpoch": "1"
        })
        .to_string()
    }

    fn replica(id: &str, name: &str, streams: Vec<StreamRow>) -> ReplicaRow {
        ReplicaRow {
            id: id.into(),
            name: name.into(),
            silent_for: Duration::from_millis(120),
            beat: DbTime(1.0),
            streams,
        }
    }

    fn row(stream: u64, status: String) -> StreamRow {
        let v = Position::new(Epoch(2), Revision(7));
        StreamRow {
            stream,
            acked: Some(v),
            nacked: Some((v, "bad".into())),
            status,
        }
    }

    #[test]
    fn the_other_replicas_streams_go_to_the_tracker_named_by_their_replica() {
        let rows = vec![
            replica("a1", "a", vec![row(1, envoy(1, "gw-a")), row(2, vm(2, "gw-a"))]),
            replica(
                "b1",
                "b",
                vec![
                    row(1, envoy(1, "gw-b")),
                    row(2, vm(2, "gw-b")),
                    row(3, "not json".into()),
                ],
            ),
        ];
        // a is this replica; b counts, as `state` would say.
        let remote = remote(rows, "a1", |r, this| this || r.id == "b1");
        let streams: Vec<_> = remote
            .streams
            .iter()
            .map(|s| (s.status.node.as_str(), s.live))
            .collect();
        assert_eq!(streams, [("gw-b", true)], "this replica's own streams are not remote");
        assert_eq!(remote.streams[0].status.replica.as_deref(), Some("b"));
        assert_eq!(remote.streams[0].nacked.as_ref().map(|(_, e)| e.as_str()), Some("bad"));
        assert_eq!(remote.vms.len(), 1);
        assert_eq!(remote.vms[0].status.replica.as_deref(), Some("b"));
        assert_eq!(remote.vms[0].acked, Some(Position::new(Epoch(2), Revision(7))));
        let replicas: Vec<_> = remote
            .replicas
            .iter()
            .map(|r| (r.name.as_str(), r.this, r.envoys, r.heartbeat_age_ms))
            .collect();
        assert_eq!(
            replicas,
            [("a", true, 1, 120), ("b", false, 1, 120)],
            "Envoys counted, not VMs or unreadable rows"
        );
    }
}
