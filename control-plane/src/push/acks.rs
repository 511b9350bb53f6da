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
//! The filter VMs' delta streams are tracked here too (`push::vms`): an
//! Envoy whose node has VM streams has applied a version when each of them
//! enforces it, whatever its ECDS stream acknowledged ([`Tracker::rollout`]).

use super::vms::{self, RemoteVm, Vm, VmStatus};
use crate::clock;
use crate::config::Version;
use apitokens_core::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

const HISTORY: usize = 16;
const MAX_DISCONNECTED: usize = 256;

/// One xDS stream, numbered in the order they connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(pub u64);

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

/// A connected stream of this replica, as shared with the others.
#[derive(Clone, Debug)]
pub struct LocalStream {
    pub acked: Option<Version>,
    pub nacked: Option<(Version, String)>,
    pub status: EnvoyStatus,
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

#[derive(Clone, Debug)]
struct Stream {
    node: String,
    cluster: String,
    peer: String,
    connected_at: Timestamp,
    disconnected_at: Option<Timestamp>,
    initial_version: String,
    /// Held (see [`EnvoyStatus::held`]): the version Envoy reported.
    held: Option<Version>,
    sent: Option<Version>,
    /// When the response awaiting an answer (ACK or NACK) was sent.
    unanswered_since: Option<Instant>,
    acked: Option<Version>,
    nacked: Option<(Version, String)>,
    history: VecDeque<VersionEvent>,
}

#[derive(Clone, Debug, Default)]
struct File {
    path: String,
    written: Option<Version>,
    written_at: Option<Timestamp>,
    error: Option<String>,
}

#[derive(Default)]
pub(super) struct Inner {
    /// See [`Tracker::with_settle`].
    pub settle: Duration,
    /// When each (node, VM) first subscribed: a VM that reopens its stream
    /// (its root context replaced by a snapshot) is not a new VM.
    pub first_seen: BTreeMap<(String, String), Instant>,
    /// Numbers both ECDS and VM streams (one numbering, shared with the
    /// other replicas).
    pub next_id: u64,
    streams: BTreeMap<StreamId, Stream>,
    disconnected: VecDeque<(StreamId, Stream)>,
    file: Option<File>,
    /// This replica's name (with replicas only).
    pub replica: Option<String>,
    remote: Vec<RemoteStream>,
    replicas: Vec<ReplicaStatus>,
    /// Connected VM streams.
    pub vms: BTreeMap<StreamId, Vm>,
    /// VMs whose stream ended awaiting a snapshot, newest first.
    pub awaiting: VecDeque<(StreamId, Vm)>,
    pub remote_vms: Vec<RemoteVm>,
}

impl Inner {
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

/// Why a consumer does not enforce a version (yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lag {
    /// No ACK yet (when the wait is over: it did not come in time).
    Pending,
    /// Envoy rejected this version (or a later one): it keeps enforcing an
    /// older configuration.
    Rejected(String),
    /// The ECDS file could not be written.
    WriteFailed(String),
    /// Envoy enforces this version, newer than this control plane's: its
    /// stream is held (nothing older is ever sent to it).
    Held(Version),
    /// The stream has not answered a response sent this long ago (longer
    /// than the tracker's patience): no write waits for it any more (a client
    /// that never ACKs must not hold every write to its deadline).
    Unresponsive(Duration),
}

/// A consumer that does not enforce a version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lagging {
    /// `node-1 (stream 3)` or `ECDS file /path/x.pb`.
    pub who: String,
    pub lag: Lag,
}

/// How far a version got: every connected stream and the ECDS file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rollout {
    pub version: Version,
    /// Connected streams.
    pub envoys: usize,
    /// Of those, the ones that acknowledged this version or a later one.
    pub applied: usize,
    pub lagging: Vec<Lagging>,
}

impl Rollout {
    /// Every connected Envoy (and the file, if any) has the version.
    pub fn complete(&self) -> bool {
        self.lagging.is_empty()
    }

    /// Nothing left to wait for: only rejections, failed writes and held
    /// streams remain.
    fn settled(&self) -> bool {
        self.lagging.iter().all(|l| l.lag != Lag::Pending)
    }
}

/// Shared by every xDS stream, the file writer, the writes that wait, and
/// the status endpoint.
pub struct Tracker {
    /// How long a stream may leave a response unanswered before writes stop
    /// waiting for it (`--apply-timeout-ms`).
    patience: Duration,
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
    /// Changes of this replica's own streams only (what it shares).
    local_changed: watch::Sender<u64>,
    /// VM streams connected or gone, a VM awaiting a snapshot.
    pub(super) vms_changed: watch::Sender<u64>,
}

/// The patience of [`Tracker::new`]: the default apply timeout.
const PATIENCE: Duration = Duration::from_secs(5);

impl Default for Tracker {
    fn default() -> Self {
        Self {
            patience: PATIENCE,
            inner: Mutex::new(Inner {
                settle: vms::SETTLE,
                ..Inner::default()
            }),
            changed: watch::channel(0).0,
            local_changed: watch::channel(0).0,
            vms_changed: watch::channel(0).0,
        }
    }
}

fn time(t: Timestamp) -> String {
    t.to_rfc3339()
}

fn view(replica: Option<&String>, id: &StreamId, s: &Stream) -> EnvoyStatus {
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

/// Who a consumer is, named only when it lags (a rollout is computed at
/// every ACK of every stream a write waits for).
enum Who<'a> {
    Stream(u64),
    Remote(Option<&'a str>, u64),
    Vm(Option<&'a str>, &'a str),
}

/// One consumer as a rollout sees it.
struct Consumer<'a> {
    who: Who<'a>,
    node: &'a str,
    acked: Option<Version>,
    nacked: Option<&'a (Version, String)>,
    held: Option<Version>,
    silent: Option<Duration>,
}

impl Consumer<'_> {
    /// `node-1 (stream 3)`, `node-1 (replica r2, stream 4)`, `node-1 (vm ab12)`.
    fn who(&self) -> String {
        match self.who {
            Who::Stream(id) => format!("{} (stream {id})", self.node),
            Who::Remote(replica, id) => format!("{} (replica {}, stream {id})", self.node, replica.unwrap_or("-")),
            Who::Vm(replica, vm) => vms::who(self.node, replica, vm),
        }
    }

    fn lag(&self, version: Version) -> Option<Lag> {
        if self.acked.is_some_and(|a| a >= version) {
            return None;
        }
        Some(match (self.nacked, self.held, self.silent) {
            (_, Some(reported), _) => Lag::Held(reported),
            (Some((rejected, error)), _, _) if *rejected >= version => Lag::Rejected(error.clone()),
            (_, _, Some(silent)) => Lag::Unresponsive(silent),
            _ => Lag::Pending,
        })
    }
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A tracker whose writes stop waiting for a stream that left a response
    /// unanswered for `patience`.
    pub fn with_patience(patience: Duration) -> Self {
        Self {
            patience,
            ..Self::default()
        }
    }

    /// How long a node stays on the ECDS rule after one of its VMs subscribes
    /// ([`vms::SETTLE`] unless told).
    pub fn with_settle(self, settle: Duration) -> Self {
        self.lock().settle = settle;
        self
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        // The data is plain bookkeeping: recover it even after a panic.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn update<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let out = f(&mut self.lock());
        self.local_changed.send_modify(|n| *n = n.wrapping_add(1));
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        out
    }

    /// [`Tracker::update`] of the VM streams' set.
    pub(super) fn update_vms<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let out = self.update(f);
        self.vms_changed.send_modify(|n| *n = n.wrapping_add(1));
        out
    }

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

    /// Resolves at the next change of this replica's own streams.
    pub fn subscribe_local(&self) -> watch::Receiver<u64> {
        self.local_changed.subscribe()
    }

    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        self.lock().replicas.clone()
    }

    /// A stream's first request named its node.
    pub fn connected(&self, node: &str, cluster: &str, peer: &str, initial_version: &str) -> StreamId {
        self.update(|inner| {
            inner.next_id += 1;
            let id = StreamId(inner.next_id);
            inner.streams.insert(
                id,
                Stream {
                    node: node.to_owned(),
                    cluster: cluster.to_owned(),
                    peer: peer.to_owned(),
                    connected_at: clock::now(),
                    disconnected_at: None,
                    initial_version: initial_version.to_owned(),
                    held: None,
                    sent: None,
                    unanswered_since: None,
                    acked: None,
                    nacked: None,
                    history: VecDeque::new(),
                },
            );
            id
        })
    }

    /// The stream is held: Envoy enforces `reported`, newer than this
    /// control plane's version.
    pub fn held(&self, id: StreamId, reported: Version) {
        self.update(|inner| {
            if let Some(s) = inner.streams.get_mut(&id) {
                s.held = Some(reported);
            }
        });
    }

    pub fn released(&self, id: StreamId) {
        self.update(|inner| {
            if let Some(s) = inner.streams.get_mut(&id) {
                s.held = None;
            }
        });
    }

    pub fn sent(&self, id: StreamId, version: Version) {
        self.update(|inner| {
            if let Some(s) = inner.streams.get_mut(&id) {
                s.sent = Some(version);
                s.unanswered_since.get_or_insert_with(Instant::now);
            }
        });
    }

    fn record(&self, id: StreamId, version: Version, error: Option<&str>) {
        self.update(|inner| {
            if let Some(s) = inner.streams.get_mut(&id) {
                s.unanswered_since = None;
                match error {
                    None => s.acked = Some(s.acked.map_or(version, |a| a.max(version))),
                    Some(e) => s.nacked = Some((version, e.to_owned())),
                }
                s.history.push_front(VersionEvent {
                    version: version.to_string(),
                    outcome: if error.is_some() { Outcome::Nack } else { Outcome::Ack },
                    error: error.map(str::to_owned),
                    time: time(clock::now()),
                });
                s.history.truncate(HISTORY);
            }
        });
    }

    /// Envoy applied the version this stream sent with the nonce it answered.
    pub fn acked(&self, id: StreamId, version: Version) {
        self.record(id, version, None);
    }

    pub fn nacked(&self, id: StreamId, version: Version, error: &str) {
        self.record(id, version, Some(error));
    }

    pub fn disconnected(&self, id: StreamId) {
        self.update(|inner| {
            if let Some(mut s) = inner.streams.remove(&id) {
                s.disconnected_at = Some(clock::now());
                inner.disconnected.push_front((id, s));
                inner.disconnected.truncate(MAX_DISCONNECTED);
            }
        });
    }

    pub fn file_written(&self, path: &str, result: Result<Version, String>) {
        self.update(|inner| {
            let f = inner.file.get_or_insert_with(File::default);
            f.path = path.to_owned();
            match result {
                Ok(version) => {
                    f.written = Some(version);
                    f.written_at = Some(clock::now());
                    f.error = None;
                }
                Err(e) => f.error = Some(e),
            }
        });
    }

    /// How far `version` got, now.
    ///
    /// Each connected Envoy stream (this replica's, and the live replicas')
    /// is one Envoy. If its node has connected VM streams, it has `version`
    /// when every one of them enforces it (each lagging VM is named, once
    /// per node), whatever the Envoy stream acknowledged; otherwise when the
    /// Envoy stream acknowledged it. A node whose VMs are connected without
    /// an Envoy stream (its ECDS goes to a replica that is not live, or to a
    /// file) counts as one more Envoy.
    pub fn rollout(&self, version: Version) -> Rollout {
        let inner = self.lock();
        let mut rollout = Rollout {
            version,
            envoys: 0,
            applied: 0,
            lagging: Vec::new(),
        };
        let patience = self.patience;
        let silent = |since: Option<Instant>| since.map(|t| t.elapsed()).filter(|d| *d >= patience);
        let local = inner.streams.iter().map(|(id, s)| Consumer {
            who: Who::Stream(id.0),
            node: &s.node,
            acked: s.acked,
            nacked: s.nacked.as_ref(),
            held: s.held,
            silent: silent(s.unanswered_since),
        });
        let remote = inner.remote.iter().filter(|r| r.live).map(|r| Consumer {
            who: Who::Remote(r.status.replica.as_deref(), r.status.stream),
            node: &r.status.node,
            acked: r.acked,
            nacked: r.nacked.as_ref(),
            held: r
                .status
                .held
                .then(|| Version::from_xds(&r.status.initial_version))
                .flatten(),
            silent: None,
        });
        let envoys: Vec<Consumer<'_>> = local.chain(remote).collect();
        // The connected VM streams, by node.
        let mut by_node: BTreeMap<&str, Vec<Consumer<'_>>> = BTreeMap::new();
        for vm in inner.vms.values() {
            by_node.entry(&vm.node).or_default().push(Consumer {
                who: Who::Vm(None, &vm.vm),
                node: &vm.node,
                // Ahead of this control plane (held): not counted as applied.
                acked: (!vm.held).then_some(vm.acked),
                nacked: None,
                held: vm.held.then_some(vm.subscribed),
                silent: silent(vm.unanswered_since),
            });
        }
        for r in inner.remote_vms.iter().filter(|r| r.live && r.status.connected) {
            let subscribed = Version::new(
                crate::store::Epoch(r.status.subscribed_epoch.parse().unwrap_or(0)),
                crate::store::Revision(r.status.subscribed_revision.parse().unwrap_or(0)),
            );
            by_node.entry(&r.status.node).or_default().push(Consumer {
                who: Who::Vm(r.status.replica.as_deref(), &r.status.vm),
                node: &r.status.node,
                acked: r.acked.filter(|_| !r.status.held),
                nacked: None,
                held: r.status.held.then_some(subscribed),
                silent: None,
            });
        }
        let mut named: BTreeSet<String> = BTreeSet::new();
        let mut group = |node: &str, rollout: &mut Rollout, vms: &[Consumer<'_>]| {
            let lagging: Vec<Lagging> = vms
                .iter()
                .filter_map(|vm| vm.lag(version).map(|lag| Lagging { who: vm.who(), lag }))
                .collect();
            if lagging.is_empty() {
                rollout.applied += 1;
            } else if named.insert(node.to_owned()) {
                rollout.lagging.extend(lagging);
            }
        };
        for envoy in &envoys {
            rollout.envoys += 1;
            if let Some(vms) = by_node.get(envoy.node).filter(|_| inner.on_delta(envoy.node)) {
                let node: &str = envoy.node;
                group(node, &mut rollout, vms);
                continue;
            }
            match envoy.lag(version) {
                None => rollout.applied += 1,
                Some(lag) => rollout.lagging.push(Lagging { who: envoy.who(), lag }),
            }
        }
        for (node, vms) in &by_node {
            if !envoys.iter().any(|e| e.node == *node) {
                rollout.envoys += 1;
                group(node, &mut rollout, vms);
            }
        }
        if let Some(f) = &inner.file {
            if f.written.is_none_or(|w| w < version) {
                rollout.lagging.push(Lagging {
                    who: format!("ECDS file {}", f.path),
                    lag: f.error.clone().map_or(Lag::Pending, Lag::WriteFailed),
                });
            }
        }
        rollout
    }

    /// Waits until every connected stream acknowledged `version` (or a later
    /// one) or rejected it, and the ECDS file holds it, or until `deadline`.
    /// Streams that connect meanwhile count too.
    pub async fn wait(&self, version: Version, deadline: Instant) -> Rollout {
        let mut changes = self.changed.subscribe();
        loop {
            changes.borrow_and_update();
            let rollout = self.rollout(version);
            if rollout.settled() {
                return rollout;
            }
            // A stream that runs out of patience changes the picture too.
            let wake = self.next_silence().map_or(deadline, |t| t.min(deadline));
            let changed = tokio::time::timeout_at(wake.into(), changes.changed()).await;
            if !matches!(changed, Ok(Ok(()))) && Instant::now() >= deadline {
                return self.rollout(version);
            }
        }
    }

    /// When the next stream that leaves a response unanswered runs out of
    /// patience.
    fn next_silence(&self) -> Option<Instant> {
        let inner = self.lock();
        inner
            .streams
            .values()
            .filter_map(|s| s.unanswered_since)
            .chain(inner.vms.values().filter_map(|vm| vm.unanswered_since))
            .map(|t| t + self.patience)
            .filter(|t| *t > Instant::now())
            .min()
    }

    /// For the status page: waits until [`Tracker::applied`] or `deadline`.
    pub async fn wait_applied(&self, version: Version, deadline: Instant) -> bool {
        let mut changes = self.changed.subscribe();
        loop {
            changes.borrow_and_update();
            if self.applied(version) {
                return true;
            }
            let changed = tokio::time::timeout_at(deadline.into(), changes.changed()).await;
            if !matches!(changed, Ok(Ok(()))) {
                return self.applied(version);
            }
        }
    }

    /// For the status page: at least one consumer (a stream or the file),
    /// and every one has `version`. Never true before the ACKs.
    pub fn applied(&self, version: Version) -> bool {
        let any = {
            let inner = self.lock();
            !inner.streams.is_empty()
                || !inner.vms.is_empty()
                || inner.file.is_some()
                || inner.remote.iter().any(|r| r.live)
                || inner.remote_vms.iter().any(|r| r.live && r.status.connected)
        };
        any && self.rollout(version).complete()
    }

    /// Resolves at the next change (ACK, NACK, connect, ...).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
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

    pub fn file(&self) -> Option<FileStatus> {
        self.lock().file.as_ref().map(|f| FileStatus {
            path: f.path.clone(),
            written_version: f.written.map(|v| v.to_string()),
            written_at: f.written_at.map(time),
            error: f.error.clone(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::store::{Epoch, Revision};
    use std::sync::Arc;

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
        tr.file_written("/x.pb", Err("disk full".into()));
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
}
