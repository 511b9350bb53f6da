//! `GET /metrics`: the control plane in the Prometheus text format
//! (OpenMetrics, encoded by the Prometheus project's own `prometheus-client`).
//!
//! Each component owns its instruments (the service its write and usage
//! counters, the store decorator its call histogram, the xDS server its push
//! counters), so that a test or a second instance in one process never
//! shares counts with another; [`Metrics::new`] registers handles to them.
//! What is a state rather than an event (Envoys connected and what each
//! acknowledged, replicas alive, the published revision) is read from its
//! owner when scraped, never kept twice.
//!
//! Labels never carry a token's name or namespace (unbounded, and a
//! namespace's business): only operations, outcomes, Envoy nodes and
//! replicas, which the operator names.

use crate::acks::{Lag, Tracker};
use crate::config::Publisher;
use crate::push::server::PushCounters;
use crate::store::StoreMetrics;
use crate::tokens::Service;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The media type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A token API write, as counted by `apitokens_writes_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Operation {
    create,
    regenerate,
    delete,
    disable,
    enable,
    update,
}

/// How a write ended (`apitokens_writes_total{outcome}`): `ok`, or why not.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    ok,
    /// No valid credential (401).
    unauthenticated,
    /// The role or a delegation rule refuses it (403).
    forbidden,
    /// A field or body is invalid (400, 413).
    invalid,
    not_found,
    conflict,
    /// The namespace holds `--max-tokens-per-namespace` tokens.
    quota_exceeded,
    /// The namespace writes faster than `--namespace-writes-per-second`.
    rate_limited,
    /// The store cannot be reached (503).
    unavailable,
    /// Anything else (a 5xx).
    error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub operation: Operation,
    pub outcome: Outcome,
}

/// How a webhook delivery's try ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Delivered {
    /// A 2xx answer.
    delivered,
    /// Anything else: retried.
    failed,
}

/// A webhook delivery's try, by endpoint (`--webhook NAME=`, a DNS label
/// the operator chose) and outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub endpoint: String,
    pub outcome: Delivered,
}

/// A webhook endpoint.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub endpoint: String,
}

/// What the webhooks' deliveries did.
#[derive(Clone, Debug, Default)]
pub struct WebhookMetrics {
    pub deliveries: Family<DeliveryLabels, Counter>,
    /// The time (Unix seconds) of the oldest event not delivered yet; 0:
    /// none is waiting.
    pub oldest_undelivered: Family<EndpointLabel, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EnvoyState {
    state: &'static str,
}

/// An Envoy as `apitokens_envoy_acknowledged_revision` labels it: by node
/// and replica, not by stream (a reconnect would be a new series).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EnvoyNode {
    node: Text,
    replica: Text,
}

/// A label value someone else chose (an Envoy's node id is whatever its
/// client sends): escaped as the text format requires, which
/// `prometheus-client` leaves to the caller. Unescaped, a node id holding
/// `"} 1\n` would forge samples or break every scrape.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Text(String);

impl EncodeLabelValue for Text {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaState {
    state: &'static str,
}

/// Everything `/metrics` shows.
pub struct Metrics {
    registry: Registry,
    writes: Family<WriteLabels, Counter>,
    envoys: Family<EnvoyState, Gauge>,
    acknowledged: Family<EnvoyNode, Gauge>,
    /// One scrape at a time: the state families are cleared and refilled.
    scraping: std::sync::Mutex<()>,
    replicas: Family<ReplicaState, Gauge>,
    delta_streams: Gauge,
    revision: Gauge,
    tokens: Gauge,
}

impl Metrics {
    pub fn new(service: &Service, store: &StoreMetrics, push: &PushCounters) -> Self {
        let mut registry = Registry::with_prefix("apitokens");
        let writes = Family::<WriteLabels, Counter>::default();
        // Each operation's successes from zero, so that a rate exists before
        // the first write.
        for operation in [
            Operation::create,
            Operation::regenerate,
            Operation::delete,
            Operation::disable,
            Operation::enable,
            Operation::update,
        ] {
            let _ = writes.get_or_create(&WriteLabels {
                operation,
                outcome: Outcome::ok,
            });
        }
        registry.register(
            "writes",
            "Token API writes (create, regenerate, delete, disable, enable) by operation and outcome; quota_exceeded and rate_limited are the refusals of --max-tokens-per-namespace and --namespace-writes-per-second",
            writes.clone(),
        );
        let w = &service.metrics;
        registry.register(
            "write_apply_seconds",
            "From a write's commit to every connected Envoy applying it (writes that waited for the Envoys and got every ACK)",
            w.apply_seconds.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "Webhook delivery tries by endpoint and outcome (delivered: a 2xx answer; failed: retried)",
            w.webhooks.deliveries.clone(),
        );
        registry.register(
            "webhook_oldest_undelivered_seconds",
            "The time (Unix seconds) of the oldest audit event an endpoint has not acknowledged yet, 0 when none waits: time() minus it is how far behind the endpoint is",
            w.webhooks.oldest_undelivered.clone(),
        );
        registry.register(
            "store_call_seconds",
            "Store calls by operation, from the call to its answer or its deadline",
            store.seconds.clone(),
        );
        registry.register(
            "store_errors",
            "Store calls that failed, by operation and kind (timeout: no answer within --store-timeout-ms)",
            store.errors.clone(),
        );
        let counters = [
            (
                "write_rollouts_incomplete",
                "Writes that answered before every connected Envoy applied them (a NACK, a timeout, an unresponsive stream, a change not yet published)",
                &w.incomplete,
            ),
            ("usage_reports_accepted", "Usage reports taken from the filters", &w.usage_accepted),
            ("usage_report_digests", "Token digests in the accepted usage reports", &w.usage_digests),
            (
                "usage_reports_refused",
                "Usage reports refused: not from an identity allowed on the xDS port",
                &w.usage_refused,
            ),
            (
                "leak_reports",
                "Leak reports taken (credentials:revoke), whatever they matched",
                &w.leak_reports,
            ),
            (
                "leak_reports_rate_limited",
                "Leak reports refused (429): their client address was over --leak-reports-per-second",
                &w.leak_reports_rate_limited,
            ),
            (
                "leak_report_credentials",
                "Credentials in the leak reports taken",
                &w.leak_report_credentials,
            ),
            (
                "leaked_tokens_revoked",
                "Tokens revoked because one of their secrets was reported leaked",
                &w.leaked_tokens_revoked,
            ),
            ("push_responses", "ECDS responses sent to Envoys over gRPC", &push.responses),
            (
                "push_bytes",
                "Bytes of ECDS responses sent to Envoys over gRPC (gRPC framing included)",
                &push.bytes,
            ),
            (
                "delta_responses",
                "Delta channel responses sent to filter VMs (steps, chunks of steps, snapshot_needed)",
                &push.delta_responses,
            ),
            (
                "delta_bytes",
                "Bytes of delta channel responses sent to filter VMs (gRPC framing included)",
                &push.delta_bytes,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        let envoys = Family::<EnvoyState, Gauge>::default();
        registry.register(
            "envoys",
            "Envoy streams by state for the published version: connected, applied, lagging (not applied yet or unresponsive), rejecting (NACKed it); with replicas, every live replica's streams",
            envoys.clone(),
        );
        let acknowledged = Family::<EnvoyNode, Gauge>::default();
        registry.register(
            "envoy_acknowledged_revision",
            "The store revision each connected Envoy acknowledged last (what it enforces; the oldest of a node's streams; with delta streams, the oldest its VMs enforce)",
            acknowledged.clone(),
        );
        let replicas = Family::<ReplicaState, Gauge>::default();
        registry.register(
            "replicas",
            "Control-plane replicas on the shared PostgreSQL database, live or not (a heartbeat older than --replica-timeout-ms)",
            replicas.clone(),
        );
        let delta_streams = Gauge::default();
        registry.register(
            "delta_streams",
            "Filter VMs' delta streams connected (with replicas, every live replica's)",
            delta_streams.clone(),
        );
        let revision = Gauge::default();
        registry.register(
            "published_revision",
            "The store revision of the published configuration",
            revision.clone(),
        );
        let tokens = Gauge::default();
        registry.register(
            "published_tokens",
            "Tokens in the published configuration",
            tokens.clone(),
        );
        Self {
            registry,
            writes,
            envoys,
            acknowledged,
            scraping: std::sync::Mutex::default(),
            replicas,
            delta_streams,
            revision,
            tokens,
        }
    }

    /// Counts one token API write.
    pub fn write(&self, operation: Operation, outcome: Outcome) {
        self.writes.get_or_create(&WriteLabels { operation, outcome }).inc();
    }

    /// The text of a scrape: the states read now, the counters as they are.
    pub fn encode(&self, publisher: &Publisher, acks: &Tracker) -> String {
        let _one = self.scraping.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let state = publisher.state();
        let current = &state.snapshot;
        self.revision.set(gauge(current.version.revision.0));
        self.tokens.set(gauge(current.tokens as u64));
        let rollout = acks.rollout(current.version);
        // Envoys only (the ECDS file's failed writes are not an Envoy), each
        // once: an Envoy with several lagging VMs is one lagging Envoy, and
        // only an Envoy stream rejects.
        let rejecting = rollout
            .lagging
            .iter()
            .filter(|l| matches!(l.lag, Lag::Rejected(_)))
            .count();
        let lagging = rollout.envoys.saturating_sub(rollout.applied).saturating_sub(rejecting);
        self.delta_streams.set(gauge(acks.delta_streams() as u64));
        for (name, n) in [
            ("connected", rollout.envoys),
            ("applied", rollout.applied),
            ("lagging", lagging),
            ("rejecting", rejecting),
        ] {
            self.envoys
                .get_or_create(&EnvoyState { state: name })
                .set(gauge(n as u64));
        }
        // Streams come and go: the family holds the connected ones only,
        // the oldest revision of each node's streams.
        self.acknowledged.clear();
        let mut oldest = std::collections::BTreeMap::<(String, String), u64>::new();
        for envoy in acks.envoys().into_iter().filter(|e| e.connected) {
            // With delta streams, what its VMs enforce (the oldest); its
            // ECDS stream's snapshots may be older.
            let revision = if envoy.delta {
                envoy
                    .vms
                    .iter()
                    .filter(|vm| vm.connected)
                    .filter_map(|vm| vm.acked_revision.as_deref()?.parse::<u64>().ok())
                    .min()
            } else {
                envoy
                    .acked_version
                    .as_deref()
                    .and_then(|v| v.rsplit('.').next())
                    .and_then(|r| r.parse::<u64>().ok())
            };
            let Some(revision) = revision else {
                continue;
            };
            let at = oldest
                .entry((envoy.node, envoy.replica.unwrap_or_default()))
                .or_insert(revision);
            *at = (*at).min(revision);
        }
        for ((node, replica), revision) in oldest {
            let labels = EnvoyNode {
                node: Text(node),
                replica: Text(replica),
            };
            self.acknowledged.get_or_create(&labels).set(gauge(revision));
        }
        let replicas = acks.replicas();
        let live = replicas.iter().filter(|r| r.live).count();
        for (name, n) in [("live", live), ("down", replicas.len() - live)] {
            self.replicas
                .get_or_create(&ReplicaState { state: name })
                .set(gauge(n as u64));
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The service's own instruments: what its writes and usage reports did.
#[derive(Debug)]
pub struct ServiceMetrics {
    pub apply_seconds: Histogram,
    pub incomplete: Counter,
    pub usage_accepted: Counter,
    pub usage_digests: Counter,
    pub usage_refused: Counter,
    pub leak_reports: Counter,
    pub leak_reports_rate_limited: Counter,
    pub leak_report_credentials: Counter,
    pub leaked_tokens_revoked: Counter,
    pub webhooks: WebhookMetrics,
}

impl Default for ServiceMetrics {
    fn default() -> Self {
        Self {
            // 1 ms to about 16 s: a revocation at 100k tokens takes ~10 ms,
            // at 1M ~1 s, and an --apply-timeout-ms is 5 s by default.
            apply_seconds: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.001, 2.0, 15,
            )),
            incomplete: Counter::default(),
            usage_accepted: Counter::default(),
            usage_digests: Counter::default(),
            usage_refused: Counter::default(),
            leak_reports: Counter::default(),
            leak_reports_rate_limited: Counter::default(),
            leak_report_credentials: Counter::default(),
            leaked_tokens_revoked: Counter::default(),
            webhooks: WebhookMetrics::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_value_someone_else_chose_cannot_forge_samples() {
        let family = Family::<EnvoyNode, Gauge>::default();
        let mut registry = Registry::default();
        registry.register("acked", "test", family.clone());
        let hostile = "x\"} 1\napitokens_published_revision 0\n# \\";
        family
            .get_or_create(&EnvoyNode {
                node: Text(hostile.to_owned()),
                replica: Text(String::new()),
            })
            .set(7);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [r#"acked{node="x\"} 1\napitokens_published_revision 0\n# \\",replica=""} 7"#],
            "{text}"
        );
    }
}
