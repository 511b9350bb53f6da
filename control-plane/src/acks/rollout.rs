//! How far a version got (a [`Rollout`]: who enforces it, who lags and
//! why), and waiting until it got everywhere it can: what a write answers
//! with (read-your-writes) and what the status page waits for.

use super::state::Inner;
use super::tracker::Tracker;
use crate::config::Version;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

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
    pub(super) fn settled(&self) -> bool {
        self.lagging.iter().all(|l| l.lag != Lag::Pending)
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
            Who::Vm(replica, vm) => who_vm(self.node, replica, vm),
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

/// `node-1 (vm ab12)`, or `node-1 (replica r2, vm ab12)`.
fn who_vm(node: &str, replica: Option<&str>, vm: &str) -> String {
    match replica {
        Some(replica) => format!("{node} (replica {replica}, vm {vm})"),
        None => format!("{node} (vm {vm})"),
    }
}

impl Tracker {
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
        self.rollout_in(&self.lock(), version)
    }

    fn rollout_in(&self, inner: &Inner, version: Version) -> Rollout {
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
        self.wait_for(deadline, |tracker| {
            let rollout = tracker.rollout(version);
            (rollout.settled(), rollout)
        })
        .await
    }

    /// For the status page: waits until [`Tracker::applied`] or `deadline`.
    pub async fn wait_applied(&self, version: Version, deadline: Instant) -> bool {
        self.wait_for(deadline, |tracker| {
            let applied = tracker.applied(version);
            (applied, applied)
        })
        .await
    }

    /// The one waiting loop: asks `check` (done, and the answer) at every
    /// change, and when a stream runs out of patience (which changes the
    /// picture too), until it is done or `deadline` passes.
    async fn wait_for<T>(&self, deadline: Instant, check: impl Fn(&Self) -> (bool, T)) -> T {
        let mut changes = self.changed.subscribe();
        loop {
            changes.borrow_and_update();
            let (done, answer) = check(self);
            if done || Instant::now() >= deadline {
                return answer;
            }
            let wake = self.next_silence().map_or(deadline, |t| t.min(deadline));
            // Woken by a change, by a stream's silence or by the deadline:
            // each is checked again above.
            let _ = tokio::time::timeout_at(wake.into(), changes.changed()).await;
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

    /// For the status page: at least one consumer (a stream or the file),
    /// and every one has `version`. Never true before the ACKs.
    pub fn applied(&self, version: Version) -> bool {
        let inner = self.lock();
        let any = !inner.streams.is_empty()
            || !inner.vms.is_empty()
            || inner.file.is_some()
            || inner.remote.iter().any(|r| r.live)
            || inner.remote_vms.iter().any(|r| r.live && r.status.connected);
        any && self.rollout_in(&inner, version).complete()
    }
}
