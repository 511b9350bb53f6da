//! Which Envoy has acknowledged (ACK) or rejected (NACK) which configuration
//! version, for the status endpoint and the logs.

use apitokens_core::timestamp::Timestamp;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use tokio::sync::Notify;

const HISTORY: usize = 16;
const MAX_DISCONNECTED: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Outcome {
    Ack,
    Nack,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionEvent {
    pub version: String,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub time: String,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvoyStatus {
    pub node: String,
    pub cluster: String,
    pub connected: bool,
    /// Open streams from this node id (more than one means two Envoys share
    /// a node id, or a reconnect overlaps the old stream).
    pub streams: u32,
    pub connected_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disconnected_at: Option<String>,
    /// The version Envoy said it had when it connected (from before a
    /// control-plane restart, for example).
    pub initial_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_version: Option<String>,
    /// The latest version Envoy accepted: what it enforces.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acked_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_nack: Option<VersionEvent>,
    /// Recent ACKs and NACKs, newest first.
    pub history: VecDeque<VersionEvent>,
    #[serde(skip)]
    seq: u64,
}

impl EnvoyStatus {
    /// The version this Envoy enforces, as a number when it is one of ours.
    pub fn acked(&self) -> Option<u64> {
        self.acked_version.as_deref().and_then(|v| v.parse().ok())
    }
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

#[derive(Default)]
struct Inner {
    envoys: BTreeMap<String, EnvoyStatus>,
    file: Option<FileStatus>,
    seq: u64,
}

/// Shared by every xDS stream and the status endpoint.
#[derive(Default)]
pub struct Tracker {
    inner: Mutex<Inner>,
    changed: Notify,
}

fn time(t: Timestamp) -> String {
    t.to_rfc3339()
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The data is plain bookkeeping: recover it even after a panic.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn update(&self, f: impl FnOnce(&mut Inner)) {
        f(&mut self.lock());
        self.changed.notify_waiters();
    }

    /// Resolves at the next change (ACK, NACK, connect, ...).
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    pub fn connected(&self, node: &str, cluster: &str, initial_version: &str, now: Timestamp) {
        self.update(|inner| {
            inner.seq += 1;
            let seq = inner.seq;
            let e = inner.envoys.entry(node.to_owned()).or_default();
            e.node = node.to_owned();
            e.cluster = cluster.to_owned();
            e.streams += 1;
            e.connected = true;
            e.connected_at = time(now);
            e.disconnected_at = None;
            e.initial_version = initial_version.to_owned();
            if e.acked_version.is_none() && !initial_version.is_empty() {
                e.acked_version = Some(initial_version.to_owned());
            }
            e.seq = seq;
        });
    }

    pub fn sent(&self, node: &str, version: &str) {
        self.update(|inner| {
            if let Some(e) = inner.envoys.get_mut(node) {
                e.sent_version = Some(version.to_owned());
            }
        });
    }

    fn record(&self, node: &str, event: VersionEvent) {
        self.update(|inner| {
            if let Some(e) = inner.envoys.get_mut(node) {
                match event.outcome {
                    Outcome::Ack => e.acked_version = Some(event.version.clone()),
                    Outcome::Nack => e.last_nack = Some(event.clone()),
                }
                e.history.push_front(event);
                e.history.truncate(HISTORY);
            }
        });
    }

    pub fn acked(&self, node: &str, version: &str, now: Timestamp) {
        self.record(
            node,
            VersionEvent {
                version: version.to_owned(),
                outcome: Outcome::Ack,
                error: None,
                time: time(now),
            },
        );
    }

    pub fn nacked(&self, node: &str, version: &str, error: &str, now: Timestamp) {
        self.record(
            node,
            VersionEvent {
                version: version.to_owned(),
                outcome: Outcome::Nack,
                error: Some(error.to_owned()),
                time: time(now),
            },
        );
    }

    pub fn disconnected(&self, node: &str, now: Timestamp) {
        self.update(|inner| {
            if let Some(e) = inner.envoys.get_mut(node) {
                e.streams = e.streams.saturating_sub(1);
                if e.streams == 0 {
                    e.connected = false;
                    e.disconnected_at = Some(time(now));
                }
            }
            // Forget the oldest disconnected Envoys beyond a bound.
            let mut gone: Vec<(u64, String)> = inner
                .envoys
                .values()
                .filter(|e| !e.connected)
                .map(|e| (e.seq, e.node.clone()))
                .collect();
            if gone.len() > MAX_DISCONNECTED {
                gone.sort();
                for (_, node) in gone.iter().take(gone.len() - MAX_DISCONNECTED) {
                    inner.envoys.remove(node);
                }
            }
        });
    }

    pub fn file_written(&self, path: &str, result: Result<u64, String>, now: Timestamp) {
        self.update(|inner| {
            let f = inner.file.get_or_insert_with(FileStatus::default);
            f.path = path.to_owned();
            match result {
                Ok(version) => {
                    f.written_version = Some(version.to_string());
                    f.written_at = Some(time(now));
                    f.error = None;
                }
                Err(e) => f.error = Some(e),
            }
        });
    }

    pub fn envoys(&self) -> Vec<EnvoyStatus> {
        self.lock().envoys.values().cloned().collect()
    }

    pub fn file(&self) -> Option<FileStatus> {
        self.lock().file.clone()
    }

    /// True when at least one Envoy (or the ECDS file) consumes the
    /// configuration and every connected Envoy has acknowledged `version` or
    /// a later one (and the file holds it). Never true before the ACKs.
    pub fn applied(&self, version: u64) -> bool {
        let inner = self.lock();
        let connected: Vec<&EnvoyStatus> = inner.envoys.values().filter(|e| e.connected).collect();
        let file_ok = inner.file.as_ref().map(|f| {
            f.written_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|v| v >= version)
        });
        if connected.is_empty() && file_ok.is_none() {
            return false;
        }
        connected.iter().all(|e| e.acked().is_some_and(|v| v >= version)) && file_ok.unwrap_or(true)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_unix(s, 0)
    }

    #[test]
    fn ack_and_nack_per_version() {
        let tr = Tracker::new();
        assert!(!tr.applied(1), "nobody listening: not applied");
        tr.connected("host-1", "gw", "", t(1));
        tr.sent("host-1", "1");
        assert!(!tr.applied(1));
        tr.acked("host-1", "1", t(2));
        assert!(tr.applied(1));
        tr.sent("host-1", "2");
        tr.nacked("host-1", "2", "bad module", t(3));
        assert!(!tr.applied(2));
        assert!(tr.applied(1));
        let e = &tr.envoys()[0];
        assert_eq!(e.acked_version.as_deref(), Some("1"));
        assert_eq!(e.sent_version.as_deref(), Some("2"));
        let nack = e.last_nack.as_ref().unwrap();
        assert_eq!(
            (nack.version.as_str(), nack.error.as_deref()),
            ("2", Some("bad module"))
        );
        assert_eq!(
            e.history.iter().map(|h| h.outcome).collect::<Vec<_>>(),
            [Outcome::Nack, Outcome::Ack]
        );
        let json = serde_json::to_value(e).unwrap();
        assert_eq!(json["lastNack"]["outcome"], "NACK");
        assert_eq!(json["ackedVersion"], "1");
    }

    #[test]
    fn every_connected_envoy_must_ack() {
        let tr = Tracker::new();
        tr.connected("a", "gw", "", t(1));
        tr.connected("b", "gw", "", t(1));
        tr.acked("a", "5", t(2));
        assert!(!tr.applied(5));
        tr.acked("b", "6", t(2));
        assert!(tr.applied(5));
        assert!(!tr.applied(6));
        tr.disconnected("a", t(3));
        assert!(tr.applied(6), "a disconnected Envoy does not hold things up");
    }

    #[test]
    fn reconnect_keeps_history_and_initial_version_counts_as_acked() {
        let tr = Tracker::new();
        tr.connected("a", "gw", "41", t(1));
        assert_eq!(tr.envoys()[0].acked(), Some(41));
        tr.connected("a", "gw", "41", t(2)); // overlapping reconnect
        tr.disconnected("a", t(3));
        assert!(tr.envoys()[0].connected, "one stream is still open");
        tr.disconnected("a", t(4));
        assert!(!tr.envoys()[0].connected);
        assert!(tr.envoys()[0].disconnected_at.is_some());
    }

    #[test]
    fn file_consumer() {
        let tr = Tracker::new();
        tr.file_written("/x.pb", Ok(3), t(1));
        assert!(tr.applied(3));
        assert!(!tr.applied(4));
        tr.file_written("/x.pb", Err("disk full".into()), t(2));
        assert_eq!(tr.file().unwrap().error.as_deref(), Some("disk full"));
        assert!(tr.applied(3));
    }

    #[test]
    fn disconnected_envoys_are_bounded() {
        let tr = Tracker::new();
        for i in 0..(MAX_DISCONNECTED + 10) {
            let node = format!("n{i}");
            tr.connected(&node, "gw", "", t(1));
            tr.disconnected(&node, t(2));
        }
        assert_eq!(tr.envoys().len(), MAX_DISCONNECTED);
    }
}
