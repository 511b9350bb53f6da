//! The tracker's rules, driven through its public events.
use super::tracker::MAX_DISCONNECTED;
use super::*;
use crate::config::Version;
use crate::store::{Epoch, Revision};
use std::sync::Arc;
use std::time::{Duration, Instant};

const V1: Version = v(1);
const V2: Version = v(2);

/// Version `n` of epoch 1.
const fn v(n: u64) -> Version {
    Version::new(Epoch(1), Revision(n))
}

#[test]
fn ack_and_nack_per_version() {
    let tr = Tracker::new().with_settle(Duration::ZERO);
    assert!(!tr.applied(V1), "nobody listening: not applied");
    assert!(tr.rollout(V1).complete(), "but nothing lags either");
    let a = tr.connected("host-1", "gw", "127.0.0.1:1", "");
    tr.sent(a, V1);
    assert!(!tr.applied(V1));
    tr.acked(a, V1);
    assert!(tr.applied(V1));
    tr.sent(a, V2);
    tr.nacked(a, V2, "bad module");
    assert!(!tr.applied(V2));
    assert!(tr.applied(V1));
    assert_eq!(
        tr.rollout(V2).lagging,
        [Lagging {
            who: "host-1 (stream 1)".into(),
            lag: Lag::Rejected("bad module".into())
        }]
    );
    let e = &tr.envoys()[0];
    assert_eq!(e.acked_version.as_deref(), Some("1"));
    assert_eq!(e.sent_version.as_deref(), Some("2"));
    let nack = e.last_nack.as_ref().unwrap();
    assert_eq!(
        (nack.version.as_str(), nack.error.as_deref()),
        ("2", Some("bad module"))
    );
    let json = serde_json::to_value(e).unwrap();
    assert_eq!(json["lastNack"]["outcome"], "NACK");
    assert_eq!(json["ackedVersion"], "1");
}

#[test]
fn two_envoys_sharing_a_node_id_are_two_streams() {
    let tr = Tracker::new().with_settle(Duration::ZERO);
    let a = tr.connected("gateway", "gw", "127.0.0.1:1", "");
    let b = tr.connected("gateway", "gw", "127.0.0.1:2", "");
    tr.acked(a, V2);
    tr.nacked(b, V2, "rejected");
    assert!(!tr.applied(V2), "one stream's ACK does not hide the other's NACK");
    let r = tr.rollout(V2);
    assert_eq!((r.envoys, r.applied), (2, 1));
    tr.disconnected(b);
    assert!(tr.applied(V2), "a disconnected Envoy does not hold things up");
    assert_eq!(tr.envoys().len(), 2, "the disconnected one is still shown");
    assert!(!tr.envoys()[1].connected);
}

#[test]
fn the_initial_version_does_not_count_as_applied() {
    let tr = Tracker::new().with_settle(Duration::ZERO);
    let a = tr.connected("a", "gw", "p", "41");
    assert!(!tr.applied(v(41)));
    assert_eq!(tr.envoys()[0].initial_version, "41");
    tr.acked(a, v(45));
    assert!(tr.applied(v(41)));
}

#[test]
fn file_consumer() {
    let tr = Tracker::new().with_settle(Duration::ZERO);
    tr.file_written("/x.pb", Ok(v(3)));
    assert!(tr.applied(v(3)));
    assert!(!tr.applied(v(4)));
    tr.file_written("/x.pb", Err(&std::io::Error::other("disk full")));
    assert_eq!(tr.file().unwrap().error.as_deref(), Some("disk full"));
    assert_eq!(tr.rollout(v(4)).lagging[0].lag, Lag::WriteFailed("disk full".into()));
}

#[test]
fn disconnected_streams_are_bounded() {
    let tr = Tracker::new().with_settle(Duration::ZERO);
    for i in 0..(MAX_DISCONNECTED + 10) {
        let id = tr.connected(&format!("n{i}"), "gw", "p", "");
        tr.disconnected(id);
    }
    assert_eq!(tr.envoys().len(), MAX_DISCONNECTED);
}

fn remote(replica: &str, stream: u64, live: bool, acked: Option<Version>) -> RemoteStream {
    // A stream as that replica's own tracker shows it.
    let there = Tracker::new().with_settle(Duration::ZERO);
    there.set_replica(replica);
    there.connected(&format!("gw-{replica}-{stream}"), "gw", "p", "");
    let mut status = there.envoys().remove(0);
    status.stream = stream;
    RemoteStream {
        live,
        acked,
        nacked: None,
        status,
    }
}

#[tokio::test]
async fn other_replicas_streams_count_while_their_replica_is_live() {
    let tr = Arc::new(Tracker::new().with_settle(Duration::ZERO));
    tr.set_replica("r1");
    let a = tr.connected("gw-1", "gw", "p", "");
    tr.acked(a, V2);
    tr.set_remote(
        vec![remote("r2", 4, true, Some(V1)), remote("r3", 7, false, Some(V1))],
        vec![],
        vec![],
    );
    let r = tr.rollout(V2);
    assert_eq!(
        (r.envoys, r.applied),
        (2, 1),
        "the dead replica's stream is not counted"
    );
    assert_eq!(r.lagging[0].who, "gw-r2-4 (replica r2, stream 4)");
    let names: Vec<_> = tr.envoys().iter().map(|e| (e.replica.clone(), e.connected)).collect();
    assert_eq!(
        names,
        [
            (Some("r1".to_owned()), true),
            (Some("r2".to_owned()), true),
            (Some("r3".to_owned()), false)
        ]
    );
    // A wait ends when the other replica's ACK arrives through the database.
    let t = Arc::clone(&tr);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        t.set_remote(vec![remote("r2", 4, true, Some(V2))], vec![], vec![]);
    });
    let r = tr.wait(V2, Instant::now() + Duration::from_secs(10)).await;
    assert!(r.complete(), "{r:?}");
    assert_eq!((r.envoys, r.applied), (2, 2));
    // The local stream alone is shared with the others.
    let local = tr.local_streams();
    assert_eq!(local.len(), 1);
    assert_eq!(
        (local[0].acked, local[0].status.replica.as_deref()),
        (Some(V2), Some("r1"))
    );
}

#[tokio::test]
async fn waiting_ends_at_the_ack_the_nack_or_the_deadline() {
    let tr = Arc::new(Tracker::new().with_settle(Duration::ZERO));
    let a = tr.connected("a", "gw", "p", "");
    let b = tr.connected("b", "gw", "p", "");
    let t = Arc::clone(&tr);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        t.acked(a, V2);
        tokio::time::sleep(Duration::from_millis(30)).await;
        t.nacked(b, V2, "no");
    });
    let started = Instant::now();
    let r = tr.wait(V2, Instant::now() + Duration::from_secs(10)).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(r.applied, 1);
    assert_eq!(r.lagging[0].lag, Lag::Rejected("no".into()));
    // Nobody answers: the deadline.
    let started = Instant::now();
    let r = tr.wait(v(3), Instant::now() + Duration::from_millis(100)).await;
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(r.lagging.len(), 2);
    assert!(r.lagging.iter().all(|l| l.lag == Lag::Pending));
}

#[tokio::test]
async fn a_stream_that_never_answers_holds_writes_for_its_patience_only() {
    let tr = Arc::new(Tracker::with_patience(Duration::from_millis(150)).with_settle(Duration::ZERO));
    let silent = tr.connected("flood", "x", "p", "");
    tr.sent(silent, V1);
    let good = tr.connected("gw", "gw", "p", "");
    tr.sent(good, V1);
    tr.acked(good, V1);
    // Within its patience the silent stream is waited for...
    let started = Instant::now();
    let r = tr.wait(V1, Instant::now() + Duration::from_secs(5)).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(140) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    assert!(matches!(r.lagging[0].lag, Lag::Unresponsive(_)), "{r:?}");
    assert_eq!((r.envoys, r.applied), (2, 1));
    // ... and then no more: the next write answers at once.
    tr.sent(silent, V2);
    tr.sent(good, V2);
    tr.acked(good, V2);
    let started = Instant::now();
    let r = tr.wait(V2, Instant::now() + Duration::from_secs(5)).await;
    assert!(started.elapsed() < Duration::from_millis(50));
    assert!(matches!(r.lagging[0].lag, Lag::Unresponsive(_)));
    // An answer ends it.
    tr.acked(silent, V2);
    assert!(tr.rollout(V2).complete());
}

#[test]
fn a_held_stream_lags_with_the_version_it_has() {
    let tr = Tracker::new().with_settle(Duration::ZERO);
    let a = tr.connected("gw", "gw", "p", &v(9).xds());
    tr.held(a, v(9));
    let r = tr.rollout(v(5));
    assert_eq!(r.lagging[0].lag, Lag::Held(v(9)));
    assert!(
        r.settled(),
        "nothing to wait for: it gets nothing until the control plane catches up"
    );
    assert!(tr.envoys()[0].held);
    tr.released(a);
    tr.acked(a, v(9));
    assert!(tr.rollout(v(9)).complete());
    assert!(!tr.envoys()[0].held);
    // An ACK of another epoch's version is not this epoch's.
    assert!(!tr.rollout(Version::new(Epoch(2), Revision(1))).complete());
}

#[tokio::test]
async fn a_node_with_vm_streams_waits_for_its_vms_not_its_ecds_ack() {
    let tr = Arc::new(Tracker::new().with_settle(Duration::ZERO));
    let gw1 = tr.connected("gw-1", "gw", "p", "");
    let gw2 = tr.connected("gw-2", "gw", "p", "");
    let a = tr.vm_connected("gw-1", "ab12", "p", V1);
    let b = tr.vm_connected("gw-1", "cd34", "p", V1);
    // gw-1's ECDS ACK no longer counts; gw-2 has no VM stream: its does.
    tr.acked(gw1, V2);
    let r = tr.rollout(V2);
    assert_eq!((r.envoys, r.applied), (2, 0));
    let who: Vec<_> = r.lagging.iter().map(|l| (l.who.as_str(), l.lag.clone())).collect();
    assert_eq!(
        who,
        [
            ("gw-1 (vm ab12)", Lag::Pending),
            ("gw-1 (vm cd34)", Lag::Pending),
            ("gw-2 (stream 2)", Lag::Pending)
        ]
    );
    // The write waits for every VM of gw-1.
    let t = Arc::clone(&tr);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        t.vm_sent(a, V2);
        t.vm_sent(b, V2);
        t.vm_acked(a, V2);
        t.acked(gw2, V2);
        tokio::time::sleep(Duration::from_millis(20)).await;
        t.vm_acked(b, v(3));
    });
    let r = tr.wait(V2, Instant::now() + Duration::from_secs(10)).await;
    assert!(r.complete(), "{r:?}");
    assert_eq!((r.envoys, r.applied), (2, 2));
    // Its ECDS ACK alone is not enough while a VM lags ...
    tr.acked(gw1, v(5));
    assert_eq!(tr.rollout(v(5)).lagging.len(), 3);
    // ... and is again once its node has no VM stream (an older filter).
    tr.vm_disconnected(a);
    tr.vm_disconnected(b);
    let r = tr.rollout(v(5));
    assert_eq!(
        r.lagging.iter().map(|l| l.who.as_str()).collect::<Vec<_>>(),
        ["gw-2 (stream 2)"]
    );
    // Status: which Envoys are on the delta channel.
    let c = tr.vm_connected("gw-2", "ef56", "p", v(5));
    let envoys = tr.envoys();
    assert_eq!((envoys[0].delta, envoys[1].delta), (false, true));
    assert_eq!(envoys[1].vms[0].vm, "ef56");
    assert_eq!(envoys[1].vms[0].acked_revision.as_deref(), Some("5"));
    let json = serde_json::to_value(&envoys[0]).unwrap();
    assert_eq!(json["delta"], false);
    assert!(tr.rollout(v(5)).complete(), "a VM subscribing at a version has it");
    tr.vm_disconnected(c);
    assert_eq!(tr.delta_streams(), 0);
}

#[test]
fn a_node_is_on_the_delta_channel_only_whole_and_alone() {
    let tr = Tracker::new().with_settle(Duration::ZERO);
    let envoy = tr.connected("gw", "c", "p", "");
    tr.sent(envoy, V1);
    tr.acked(envoy, V1);
    let a = tr.vm_connected("gw", "ab12", "p", V1);
    tr.vm_counted(a, 2);
    // One of its two VMs has a stream: the ECDS rule, snapshots at once.
    assert!(!tr.defers_snapshots("gw"));
    assert!(!tr.envoys()[0].delta);
    tr.sent(envoy, V2);
    tr.vm_acked(a, V2);
    assert!(!tr.rollout(V2).complete(), "waits for the ECDS ACK");
    tr.acked(envoy, V2);
    assert!(tr.rollout(V2).complete());
    // Both VMs: the delta rule.
    let b = tr.vm_connected("gw", "cd34", "p", V2);
    tr.vm_counted(b, 2);
    assert!(tr.defers_snapshots("gw") && tr.envoys()[0].delta);
    assert_eq!(tr.envoys()[0].enforced_version.as_deref(), Some("2"));
    tr.vm_acked(a, v(3));
    assert!(!tr.rollout(v(3)).complete(), "waits for VM cd34");
    tr.vm_acked(b, v(3));
    assert!(tr.rollout(v(3)).complete(), "not for the ECDS ACK");
    assert_eq!(tr.envoys()[0].enforced_version.as_deref(), Some("3"));
    // A second Envoy with the same node id: VMs cannot be told apart,
    // each Envoy keeps the ECDS rule (one's NACK is never hidden).
    let other = tr.connected("gw", "c", "p2", "");
    tr.nacked(other, v(3), "cannot load the module");
    assert!(!tr.defers_snapshots("gw"));
    let r = tr.rollout(v(3));
    assert_eq!((r.envoys, r.applied), (2, 0), "{r:?}");
    assert!(r.lagging.iter().any(|l| matches!(l.lag, Lag::Rejected(_))), "{r:?}");
}

#[test]
fn an_envoy_that_rejects_its_snapshot_leaves_the_delta_channel_until_it_accepts_one() {
    let tr = Tracker::new().with_settle(Duration::ZERO);
    let envoy = tr.connected("gw", "c", "p", "");
    tr.sent(envoy, V1);
    tr.acked(envoy, V1);
    let vm = tr.vm_connected("gw", "ab12", "p", V1);
    assert!(tr.defers_snapshots("gw"));
    tr.sent(envoy, V2);
    tr.nacked(envoy, V2, "cannot load the module");
    tr.vm_acked(vm, V2);
    assert!(!tr.defers_snapshots("gw"), "the next version goes out at once");
    assert!(!tr.rollout(V2).complete(), "not applied while rejected");
    tr.sent(envoy, v(3));
    tr.acked(envoy, v(3));
    assert!(tr.defers_snapshots("gw"));
}

#[test]
fn a_node_whose_vm_just_subscribed_keeps_the_ecds_rule_until_they_settle() {
    let tr = Tracker::new().with_settle(Duration::from_millis(100));
    tr.connected("gw", "c", "p", "");
    tr.vm_connected("gw", "ab12", "p", V1);
    assert!(!tr.defers_snapshots("gw"), "its other VMs may not have subscribed yet");
    std::thread::sleep(Duration::from_millis(120));
    assert!(tr.defers_snapshots("gw"));
    // The same VM on a new stream (its root context was replaced): no new wait.
    let again = tr.vm_connected("gw", "ab12", "p", V1);
    assert!(tr.defers_snapshots("gw"));
    tr.vm_disconnected(again);
}

#[test]
fn a_held_vm_is_not_counted_as_applied() {
    let tr = Tracker::new().with_settle(Duration::ZERO);
    let vm = tr.vm_connected("gw", "ab12", "p", v(9));
    tr.vm_held(vm, true);
    let r = tr.rollout(v(5));
    assert_eq!(r.lagging.len(), 1, "{r:?}");
    assert_eq!(r.lagging[0].lag, Lag::Held(v(9)));
}

#[test]
fn vms_without_an_envoy_stream_count_as_one_envoy() {
    let tr = Tracker::new().with_settle(Duration::ZERO);
    let a = tr.vm_connected("gw", "ab12", "p", V1);
    tr.vm_connected("gw", "cd34", "p", V2);
    assert!(tr.applied(V1));
    let r = tr.rollout(V2);
    assert_eq!((r.envoys, r.applied), (1, 0));
    assert_eq!(r.lagging[0].who, "gw (vm ab12)");
    tr.vm_acked(a, V2);
    assert!(tr.applied(V2));
    assert_eq!(tr.vms_without_envoy().len(), 2);
}

#[tokio::test]
async fn a_vm_that_never_answers_holds_writes_for_its_patience_only() {
    let tr = Arc::new(Tracker::with_patience(Duration::from_millis(150)).with_settle(Duration::ZERO));
    let vm = tr.vm_connected("gw", "ab12", "p", V1);
    tr.vm_sent(vm, V2);
    let started = Instant::now();
    let r = tr.wait(V2, Instant::now() + Duration::from_secs(5)).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(140) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    assert!(matches!(r.lagging[0].lag, Lag::Unresponsive(_)), "{r:?}");
    tr.vm_acked(vm, V2);
    assert!(tr.rollout(V2).complete());
    // A VM ahead of this control plane is held, not waited for.
    let held = tr.vm_connected("gw", "cd34", "p", v(9));
    tr.vm_held(held, true);
    let r = tr.rollout(v(10));
    assert_eq!(r.lagging[1].who, "gw (vm cd34)");
    assert_eq!(r.lagging[1].lag, Lag::Held(v(9)));
    assert!(tr.vms()[1].held);
}

#[tokio::test]
async fn snapshots_wait_only_for_nodes_whose_vms_are_on_the_delta_channel() {
    let tr = Tracker::new().with_settle(Duration::ZERO);
    let mut changes = tr.subscribe_vms();
    assert!(!tr.defers_snapshots("gw"), "no VM stream: ECDS is its only channel");
    let a = tr.vm_connected("gw", "ab12", "p", V1);
    assert!(changes.has_changed().unwrap());
    changes.borrow_and_update();
    assert!(tr.defers_snapshots("gw"));
    assert!(!tr.defers_snapshots("other"));
    // A VM no history reaches: snapshots at once, until it subscribes again.
    tr.vm_snapshot_needed(a);
    assert!(changes.has_changed().unwrap());
    assert!(!tr.defers_snapshots("gw"));
    tr.vm_disconnected(a);
    let b = tr.vm_connected("gw", "cd34", "p", V1);
    assert!(!tr.defers_snapshots("gw"), "another VM of the node still awaits one");
    assert!(tr
        .local_vms()
        .iter()
        .any(|v| v.status.awaiting_snapshot && !v.status.connected));
    tr.vm_connected("gw", "ab12", "p", V2);
    assert!(tr.defers_snapshots("gw"));
    // A VM of the node at another replica counts the same.
    tr.vm_disconnected(b);
    let mut status = tr.local_vms().remove(0).status;
    tr.lock().vms.clear();
    assert!(!tr.defers_snapshots("gw"));
    status.replica = Some("r2".into());
    let remote = RemoteVm {
        live: true,
        acked: Some(V1),
        status: status.clone(),
    };
    changes.borrow_and_update();
    tr.set_remote(vec![], vec![remote.clone()], vec![]);
    assert!(changes.has_changed().unwrap());
    assert!(tr.defers_snapshots("gw"));
    assert_eq!(tr.delta_streams(), 1);
    let r = tr.rollout(V2);
    assert_eq!(r.lagging[0].who, "gw (replica r2, vm ab12)");
    // Its ACK arrives through the database.
    tr.set_remote(
        vec![],
        vec![RemoteVm {
            acked: Some(V2),
            ..remote.clone()
        }],
        vec![],
    );
    assert!(tr.rollout(V2).complete());
    // A replica that is not live: neither waited for nor deferring.
    tr.set_remote(vec![], vec![RemoteVm { live: false, ..remote }], vec![]);
    assert!(!tr.defers_snapshots("gw"));
    assert_eq!(tr.rollout(V2).envoys, 0);
}
