//! Delivery: the audit trail is the outbox. Every event is written in the
//! same transaction as its change (and expiry warnings in their own), in
//! the order of the store's log, so nothing committed can be lost by a
//! crash; each endpoint keeps a cursor in the store (the last event it
//! acknowledged) and a lease, so that with several control planes on one
//! PostgreSQL only one of them delivers to an endpoint at a time, and a
//! replica that dies hands over when its lease runs out.
//!
//! An endpoint gets its events one at a time, in the log's order (so in
//! order per token), each POSTed until a 2xx answers, with exponential
//! backoff between tries; the cursor moves after each 2xx. So delivery is at
//! least once: a crash between a receiver's 2xx and the cursor's write sends
//! that one event again (same CloudEvent `id`), and a receiver back after an
//! outage gets the backlog once, in order, never the whole backlog per
//! retry. A new endpoint starts after the newest event.

use super::client::{Client, Target};
use super::{cloudevent, sign::Key};
use crate::clock::Clock;
use crate::metrics::{Delivered, DeliveryLabels, EndpointLabel, WebhookMetrics};
use crate::store::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// One endpoint, as configured (`--webhook NAME=URL`).
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// The name its cursor is kept under in the store (a DNS label).
    pub name: String,
    pub target: Target,
}

/// What every endpoint's delivery shares.
#[derive(Clone)]
pub struct Settings {
    pub client: Client,
    pub key: Key,
    /// The CloudEvents `source`.
    pub source: String,
    /// This process, as the lease's holder.
    pub holder: String,
    /// How long a lease lasts without renewal (a dead replica's endpoints
    /// move on after this).
    pub lease: Duration,
    /// How often the outbox is read when nothing woke it.
    pub poll: Duration,
    /// The first retry's delay, doubled per failure up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub clock: Clock,
    pub metrics: WebhookMetrics,
}

/// Events read from the store at a time.
const BATCH: u32 = 100;

/// The delay before the next try after `failures` failures in a row:
/// `base` doubled per failure, at most `max`, then scaled by `jitter` (from
/// 0.5 to 1, so that endpoints and replicas do not retry in step).
pub(crate) fn backoff(base: Duration, max: Duration, failures: u32, jitter: f64) -> Duration {
    let doubled = base.saturating_mul(1u32.checked_shl(failures.min(30)).unwrap_or(u32::MAX));
    doubled.min(max).mul_f64(jitter.clamp(0.5, 1.0))
}

/// A jitter from 0.5 to 1.
fn jitter() -> f64 {
    let mut byte = [0u8; 1];
    let _ = getrandom::fill(&mut byte);
    0.5 + f64::from(byte[0]) / 510.0
}

/// Delivers `endpoint`'s events until `shutdown` changes; `written`
/// changes after every event this process writes (others' are read at the
/// next poll).
pub async fn run(
    store: Arc<dyn Store>,
    settings: Settings,
    endpoint: Endpoint,
    mut written: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut feed = true;
    let lineage: String = store.lineage().iter().map(|b| format!("{b:02x}")).collect();
    let mut failures: u32 = 0;
    // While a retry waits out its backoff (up to a minute), the lease is
    // renewed every half lease, so that no other replica takes the endpoint
    // over and sends the same event too.
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let pause = match retry_at.map(|at| at.saturating_duration_since(tokio::time::Instant::now())) {
            Some(left) if !left.is_zero() => {
                if let Ok(None) = claim(&*store, &settings, &endpoint).await {
                    // Taken over (this replica was cut off from the store
                    // for longer than the lease): the other one retries.
                    retry_at = None;
                    failures = 0;
                }
                left.min(settings.lease / 2)
            }
            _ => {
                retry_at = None;
                match deliver_some(&*store, &settings, &endpoint, &lineage, &mut failures).await {
                    Ok(Progress::More) => continue,
                    Ok(Progress::Idle) => settings.poll,
                    Ok(Progress::NotOurs) => settings.lease / 2,
                    Err(pause) => {
                        retry_at = Some(tokio::time::Instant::now() + pause);
                        pause.min(settings.lease / 2)
                    }
                }
            }
        };
        // (A retry waits out its backoff, whatever is written meanwhile.)
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            changed = written.changed(), if feed && failures == 0 => feed = changed.is_ok(),
            _ = shutdown.changed() => return,
        }
    }
}

/// Takes or renews `endpoint`'s lease: its cursor, `None` if another
/// control plane holds it.
async fn claim(store: &dyn Store, s: &Settings, endpoint: &Endpoint) -> Result<Option<u64>, crate::store::StoreError> {
    let now = s.clock.now();
    let now_ms = now
        .unix_seconds()
        .saturating_mul(1000)
        .saturating_add(i64::from(now.subsec_nanos() / 1_000_000));
    let lease_ms = i64::try_from(s.lease.as_millis()).unwrap_or(i64::MAX);
    store
        .claim_outbox(&endpoint.name, &s.holder, now_ms, now_ms.saturating_add(lease_ms))
        .await
}

enum Progress {
    /// Events were delivered; there may be more.
    More,
    /// Nothing to deliver.
    Idle,
    /// Another control plane delivers to this endpoint.
    NotOurs,
}

/// Claims the lease, reads a batch after the cursor and delivers it in
/// order; stops at the first failure (`Err`: how long to wait).
async fn deliver_some(
    store: &dyn Store,
    s: &Settings,
    endpoint: &Endpoint,
    lineage: &str,
    failures: &mut u32,
) -> Result<Progress, Duration> {
    let cursor = match claim(store, s, endpoint).await {
        Ok(Some(cursor)) => cursor,
        Ok(None) => return Ok(Progress::NotOurs),
        Err(e) => {
            tracing::warn!(webhook = %endpoint.name, "webhook {}: the outbox cannot be read (next try soon): {e}", endpoint.name);
            return Err(s.poll);
        }
    };
    let events = match store.events_after(cursor, BATCH).await {
        Ok(events) => events,
        Err(e) => {
            tracing::warn!(webhook = %endpoint.name, "webhook {}: the outbox cannot be read (next try soon): {e}", endpoint.name);
            return Err(s.poll);
        }
    };
    // (A handle of its own: the family's guard must not live across awaits.)
    let waiting = s
        .metrics
        .oldest_undelivered
        .get_or_create(&EndpointLabel {
            endpoint: endpoint.name.clone(),
        })
        .clone();
    let Some((_, oldest)) = events.first() else {
        waiting.set(0);
        return Ok(Progress::Idle);
    };
    waiting.set(oldest.time.unix_seconds());
    let tried = |outcome| {
        s.metrics
            .deliveries
            .get_or_create(&DeliveryLabels {
                endpoint: endpoint.name.clone(),
                outcome,
            })
            .inc();
    };
    for (i, (seq, event)) in events.into_iter().enumerate() {
        // The lease is renewed before each delivery (each may take up to
        // the timeout, under half the lease: see `serve`), so that no other
        // replica starts sending this batch's events meanwhile.
        if i > 0 {
            match claim(store, s, endpoint).await {
                Ok(Some(_)) => {}
                Ok(None) => return Ok(Progress::NotOurs),
                Err(e) => {
                    tracing::warn!(webhook = %endpoint.name, "webhook {}: the lease cannot be renewed (next try soon): {e}", endpoint.name);
                    return Err(s.poll);
                }
            }
        }
        waiting.set(event.time.unix_seconds());
        let id = cloudevent::id(lineage, seq);
        let body = cloudevent::body(&s.source, lineage, seq, &event);
        let timestamp = s.clock.now().unix_seconds();
        let headers = [
            ("content-type", cloudevent::CONTENT_TYPE.to_owned()),
            ("webhook-id", id.clone()),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", s.key.signature(&id, timestamp, &body)),
        ];
        let answer = s.client.post(&endpoint.target, &headers, body).await;
        match answer {
            Ok(status) if (200..300).contains(&status) => {
                tried(Delivered::delivered);
                *failures = 0;
            }
            other => {
                tried(Delivered::failed);
                *failures = failures.saturating_add(1);
                let why = match other {
                    Ok(status) => format!("answered {status}"),
                    Err(e) => e.to_string(),
                };
                let wait = backoff(s.backoff, s.max_backoff, *failures - 1, jitter());
                tracing::warn!(
                    webhook = %endpoint.name,
                    seq,
                    failures = *failures,
                    retry_ms = wait.as_millis() as u64,
                    "webhook {} ({}): event {id} not delivered ({why}); try {} in {wait:?}",
                    endpoint.name,
                    endpoint.target,
                    *failures + 1
                );
                return Err(wait);
            }
        }
        match store.advance_outbox(&endpoint.name, &s.holder, seq).await {
            Ok(true) => {
                tracing::debug!(webhook = %endpoint.name, seq, "webhook {}: delivered {id}", endpoint.name);
            }
            // The lease went to another control plane (this one was too
            // slow): it delivers from the cursor it finds; this event may
            // reach the receiver twice, with the same id.
            Ok(false) => return Ok(Progress::NotOurs),
            Err(e) => {
                tracing::warn!(webhook = %endpoint.name, seq, "webhook {}: delivered {id} but could not record it (it may be sent again): {e}", endpoint.name);
                return Err(s.poll);
            }
        }
    }
    Ok(Progress::More)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::{put, test_event};
    use crate::store::{Action, AuditEvent, SqliteStore};
    use crate::testutil::TempDir;
    use apitokens_core::Role;
    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode};
    use std::sync::Mutex;

    /// A real HTTP receiver on loopback: what it got, and the statuses it
    /// answers in turn (then 200).
    #[derive(Clone, Default)]
    struct Receiver {
        got: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
        answers: Arc<Mutex<Vec<u16>>>,
    }

    impl Receiver {
        async fn start(answers: Vec<u16>) -> (Self, Target) {
            let r = Self {
                answers: Arc::new(Mutex::new(answers)),
                ..Self::default()
            };
            let state = r.clone();
            let app = axum::Router::new().route(
                "/hook",
                axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                    let state = state.clone();
                    async move {
                        state.got.lock().unwrap().push((headers, body));
                        let mut answers = state.answers.lock().unwrap();
                        let status = if answers.is_empty() { 200 } else { answers.remove(0) };
                        StatusCode::from_u16(status).unwrap()
                    }
                }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            (r, Target::parse(&format!("http://{addr}/hook")).unwrap())
        }

        fn ids(&self) -> Vec<String> {
            let got = self.got.lock().unwrap();
            got.iter()
                .map(|(h, _)| h["webhook-id"].to_str().unwrap().to_owned())
                .collect()
        }
    }

    fn settings(key: &Key) -> Settings {
        Settings {
            client: Client::new(None, Duration::from_secs(5)).unwrap(),
            key: key.clone(),
            source: "apitokens://test".into(),
            holder: "me".into(),
            lease: Duration::from_secs(10),
            poll: Duration::from_millis(20),
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
            clock: Clock::system(),
            metrics: WebhookMetrics::default(),
        }
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what}: not in 5 s");
    }

    #[tokio::test]
    async fn events_arrive_in_order_signed_once_each_through_failures() {
        let dir = TempDir::new("webhooks");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("w.db")).unwrap());
        let key = Key::parse(b"a-test-key-of-enough-bytes").unwrap();
        // Down twice (503, then a refused status), then up.
        let (receiver, target) = Receiver::start(vec![503, 400]).await;
        let endpoint = Endpoint {
            name: "audit".into(),
            target,
        };
        let (tick, written) = watch::channel(0u64);
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(run(Arc::clone(&store), settings(&key), endpoint, written, shutdown));
        // The first claim starts the cursor after the newest event: wait
        // for it (a probe with no time of its own is refused once it did).
        for _ in 0..500 {
            if store.claim_outbox("audit", "probe", 0, 0).await.unwrap().is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let names = ["a", "b", "c"];
        for (i, id) in names.iter().enumerate() {
            let name = format!("namespaces/default/apitokens/{id}");
            put(&*store, &name, Role::Viewer, 1 + i as u8).await;
            let e = AuditEvent {
                action: Action::Delete,
                token: Some(name.clone()),
                ..test_event()
            };
            store.delete(&name, e).await.unwrap();
            tick.send_modify(|n| *n += 1);
        }
        until("three deliveries", || receiver.ids().len() >= 5).await;
        let ids = receiver.ids();
        // The first event three times (two failures), then each once, in order.
        assert_eq!(ids.len(), 5, "{ids:?}");
        assert_eq!(ids[0], ids[1]);
        assert_eq!(ids[1], ids[2]);
        let mut unique = ids.clone();
        unique.dedup();
        assert_eq!(unique.len(), 3);
        let got = receiver.got.lock().unwrap().clone();
        for ((headers, body), id) in got.iter().skip(2).zip(names) {
            assert_eq!(headers["content-type"], cloudevent::CONTENT_TYPE);
            let event: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert_eq!(event["subject"], format!("namespaces/default/apitokens/{id}"));
            assert_eq!(event["type"], "io.apitokens.apitoken.delete");
            assert_eq!(event["id"], headers["webhook-id"].to_str().unwrap());
            // The signature is the key's over id, timestamp and body.
            let ts: i64 = headers["webhook-timestamp"].to_str().unwrap().parse().unwrap();
            let sig = key.signature(headers["webhook-id"].to_str().unwrap(), ts, body);
            assert_eq!(headers["webhook-signature"], sig.as_str());
        }
        stop.send(true).unwrap();
        task.await.unwrap();
        // The cursor is the last event: a restart sends nothing again.
        let cursor = store.claim_outbox("audit", "me", 0, 1).await.unwrap().unwrap();
        assert!(store.events_after(cursor, 10).await.unwrap().is_empty());
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter_below_one() {
        let base = Duration::from_millis(500);
        let max = Duration::from_secs(60);
        let at = |n| backoff(base, max, n, 1.0);
        assert_eq!(at(0), Duration::from_millis(500));
        assert_eq!(at(1), Duration::from_secs(1));
        assert_eq!(at(3), Duration::from_secs(4));
        assert_eq!(at(7), Duration::from_secs(60));
        assert_eq!(at(u32::MAX), Duration::from_secs(60));
        assert_eq!(backoff(base, max, 1, 0.5), Duration::from_millis(500));
        assert_eq!(
            backoff(base, max, 1, 0.0),
            Duration::from_millis(500),
            "jitter at least 0.5"
        );
        assert!((0..1000).all(|_| (0.5..=1.0).contains(&jitter())));
    }
}
