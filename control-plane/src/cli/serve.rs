//! `apitokens serve`: the REST API, `/healthz`, `/status`, the publisher and
//! the configuration push (ECDS over gRPC and/or a file, and the filter VMs'
//! delta channel on the xDS server), wired together.

use super::error::{Error, Result};
use super::http::{self, HttpOptions};
use super::{load_base, open_store, ConfigArgs, StoreArgs, ECDS_BASE};
use crate::acks::Tracker;
use crate::api::{self, AppState};
use crate::clock::Clock;
use crate::config::{Publisher, PublisherOptions};
use crate::metrics::Metrics;
use crate::push::delta::DeltaServer;
use crate::push::file;
use crate::push::grpc::Grpc;
use crate::push::peers::{Counted, Identities, PeerLimits};
use crate::push::resource::{self, EcdsResource, FilterParams};
use crate::push::server::{EcdsServer, PushCounters, XdsLimits};
use crate::push::usage::UsageServer;
use crate::replicas::{Coordinator, ReplicaOptions};
use crate::store::OpenStore;
use crate::store::{Store, StoreMetrics};
use crate::tokens::inactivity::{self, Policies};
use crate::tokens::{Lifetimes, Rate, Service, ServiceOptions};
use crate::webhooks;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Args)]
pub(super) struct ServeArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    config: ConfigArgs,
    /// Address of the REST API, the console, /healthz and (without --status-listen) /status and /metrics
    #[arg(long, default_value = "127.0.0.1:8081", value_name = "ADDR")]
    listen: SocketAddr,
    /// Serve /status, /metrics and /healthz on this address of their own (an operators' network), and /status and /metrics no longer on --listen
    #[arg(long, value_name = "ADDR")]
    status_listen: Option<SocketAddr>,
    /// Certificate chain (PEM) for HTTPS on --listen and --status-listen
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The most time a client has for a TLS handshake and for a request's headers on --listen and --status-listen, in seconds (also the most a kept-alive connection waits for its next request)
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    header_read_timeout_seconds: u64,
    /// The most connections open at once on --listen (and, apart, on --status-listen); more wait in the kernel's backlog
    #[arg(long, default_value_t = 1024, value_name = "N")]
    max_connections: usize,
    /// A proxy whose X-Forwarded-For the audit trail believes (an address or CIDR range, such as the Envoy in front of the API); repeatable. From other peers the header is ignored and the connection's address is the client's
    #[arg(long, value_name = "CIDR", value_parser = api::Cidr::parse)]
    trusted_proxy: Vec<api::Cidr>,
    /// The longest a new token may live: DURATION for every namespace, NAMESPACE=DURATION for one (90d, 12h, 30m, 3600s); repeatable. A create asking for a later expireTime is refused, one asking for none gets the limit
    #[arg(long, value_name = "[NAMESPACE=]DURATION")]
    max_token_lifetime: Vec<String>,
    /// Writes (create, regenerate, delete) per second one namespace may sustain through the API, per control-plane process; faster ones answer 429 with Retry-After (0: no limit)
    #[arg(long, default_value_t = 10.0, value_name = "N")]
    namespace_writes_per_second: f64,
    /// Writes one namespace may make at once before --namespace-writes-per-second applies
    #[arg(long, default_value_t = 100.0, value_name = "N")]
    namespace_write_burst: f64,
    /// Leak reports (credentials:revoke, no authentication) per second one client address (an IPv6 /64) may sustain, per control-plane process; faster ones answer 429 with Retry-After (0: no limit). The client is the X-Forwarded-For hop of a --trusted-proxy, else the peer
    #[arg(long, default_value_t = crate::tokens::leaks::DEFAULT_REPORT_RATE.per_second, value_name = "N")]
    leak_reports_per_second: f64,
    /// Leak reports one client address may make at once before --leak-reports-per-second applies
    #[arg(long, default_value_t = crate::tokens::leaks::DEFAULT_REPORT_RATE.burst, value_name = "N")]
    leak_report_burst: f64,
    /// How long audit events are kept (90d, 12h, 3600s), or `forever`; older ones are deleted in the background
    #[arg(long, default_value = "400d", value_name = "DURATION", value_parser = parse_retention)]
    audit_retention: Retention,
    /// The longest a request waits for the database (a frozen or unreachable server): then it answers 503 with Retry-After. Loading every token gets longer
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    store_timeout_ms: u64,
    /// Write answers name each Envoy that did not apply a change (node id and stream; with replicas, the replica), as /status does; otherwise they count them by reason (the callers are namespaces' owners, the names are the operator's)
    #[arg(long)]
    name_envoys_in_answers: bool,
    /// Address of the xDS gRPC server: ECDS, the filter VMs' delta channel (apitokens.v1.Delta) and their usage reports
    #[arg(long, default_value = "127.0.0.1:18000", value_name = "ADDR")]
    xds_listen: SocketAddr,
    /// How often at most an Envoy whose filter VMs hold delta streams gets a full snapshot over ECDS, in milliseconds: the changes reach its VMs on their streams (a write waits for those), and the snapshot follows this long after the first change it lacks; at once when one of its VMs has no history to catch up from, and for an Envoy without delta streams (an older filter). Also how often the table is encoded with the writes staged since, in the background. 0: every Envoy gets every version at once
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    snapshot_interval_ms: u64,
    /// Do not serve ECDS over gRPC (use with --ecds-file)
    #[arg(long)]
    no_xds: bool,
    /// TLS certificate chain of the ECDS gRPC server (PEM); needs --xds-tls-key and --xds-client-ca
    #[arg(long, value_name = "PEM", requires_all = ["xds_tls_key", "xds_client_ca"])]
    xds_tls_cert: Option<PathBuf>,
    /// Private key of the ECDS gRPC server (PEM)
    #[arg(long, value_name = "PEM", requires = "xds_tls_cert")]
    xds_tls_key: Option<PathBuf>,
    /// CA that signs the Envoys' client certificates (PEM): only Envoys presenting one get the configuration
    #[arg(long, value_name = "PEM", requires = "xds_tls_cert")]
    xds_client_ca: Option<PathBuf>,
    /// An identity allowed on the xDS port under mutual TLS: a DNS name or URI (e.g. a SPIFFE id) among the client certificate's subject alternative names; repeatable (none: any certificate the CA signed)
    #[arg(long, value_name = "SAN", requires = "xds_tls_cert")]
    xds_client_san: Vec<String>,
    /// Serve xDS without mutual TLS on an address beyond loopback (anyone who reaches it reads every token's digest and name, can fake ACKs, and can mark tokens used)
    #[arg(long)]
    insecure_xds: bool,
    /// Largest request accepted on the xDS port, in bytes (a DiscoveryRequest is a few hundred)
    #[arg(long, default_value_t = 64 * 1024, value_name = "BYTES")]
    xds_max_request_bytes: usize,
    /// Most HTTP/2 streams at once on one xDS connection
    #[arg(long, default_value_t = 16, value_name = "N")]
    xds_max_streams_per_connection: u32,
    /// Most xDS connections at once from one peer address (more are closed at once). An Envoy opens one for ECDS and one per worker thread for usage reports and delta streams
    #[arg(long, default_value_t = 64, value_name = "N")]
    xds_max_connections_per_peer: usize,
    /// An xDS connection is closed (GOAWAY, then 60 s for its streams) after this long; Envoy reconnects (0: never)
    #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
    xds_max_connection_age_seconds: u64,
    /// Also write the ECDS resource to this file (binary DiscoveryResponse, must end in .pb), replaced by atomic rename
    #[arg(long, value_name = "PATH")]
    ecds_file: Option<PathBuf>,
    /// Name of the ECDS resource: the name of the HTTP filter in Envoy's config_discovery
    #[arg(long, default_value = resource::DEFAULT_RESOURCE_NAME, value_name = "NAME")]
    resource_name: String,
    /// Path of the filter module as Envoy sees it (relative to Envoy's working directory)
    #[arg(long, default_value = resource::DEFAULT_MODULE, value_name = "PATH")]
    wasm_module: String,
    /// How long a create, regenerate or delete waits for every connected Envoy to apply it before answering (the answer then says which did not)
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    apply_timeout_ms: u64,
    /// The most tokens a namespace may hold; creating more answers 429 (0: no limit; bootstrap and import are exempt)
    #[arg(long, default_value_t = 1000, value_name = "N")]
    max_tokens_per_namespace: u32,
    /// How long an expired token stays in the pushed configuration (refused and counted as `expired`, not `unknown`) before it is left out, in seconds
    #[arg(long, default_value_t = 7 * 24 * 3600, value_name = "SECONDS")]
    expired_retention_seconds: u64,
    /// How often reported last uses are written to the store, in seconds
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    usage_flush_seconds: u64,
    /// How often to look for changes made by other processes (e.g. bootstrap), in milliseconds
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    poll_interval_ms: u64,
    /// No longer used: responses are never copied per stream, and requests are bounded by --xds-max-request-bytes
    #[arg(long, hide = true, value_name = "BYTES")]
    max_message_bytes: Option<usize>,
    /// With a PostgreSQL store: this replica's name on /status and in write answers (default: host name and process id)
    #[arg(long, value_name = "NAME")]
    replica_name: Option<String>,
    /// With a PostgreSQL store: a replica silent for this long (killed, or cut off from the database) is no longer waited for; heartbeats go every quarter of it
    #[arg(long, default_value_t = 3000, value_name = "MS")]
    replica_timeout_ms: u64,
    /// Deliver the audit trail (and expiry warnings) to this endpoint as signed CloudEvents, at least once and in order: NAME=URL (http:// or https://), NAME a DNS label naming its delivery cursor in the store; repeatable. Needs --webhook-key-file
    #[arg(long, value_name = "NAME=URL", value_parser = webhooks::Endpoint::parse)]
    webhook: Vec<webhooks::Endpoint>,
    /// The key the webhooks are signed with (HMAC-SHA256 as Standard Webhooks specifies: whsec_ and base64, or the file's bytes; at least 16 bytes)
    #[arg(long, value_name = "PATH")]
    webhook_key_file: Option<PathBuf>,
    /// CA certificates (PEM) that https:// webhook endpoints are verified with (default: the system's roots)
    #[arg(long, value_name = "PEM")]
    webhook_ca: Option<PathBuf>,
    /// The CloudEvents `source` of the webhooks' events
    #[arg(long, default_value = "apitokens", value_name = "URI")]
    webhook_source: String,
    /// The longest a webhook delivery waits for its answer, in milliseconds
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    webhook_timeout_ms: u64,
    /// The longest wait between two tries of one webhook delivery, in milliseconds (the first retry after 0.5 s, doubled per failure)
    #[arg(long, default_value_t = 60_000, value_name = "MS")]
    webhook_max_backoff_ms: u64,
    /// How long a control plane delivers to an endpoint without renewing its lease, in milliseconds: with replicas, another one takes over this long after one dies. More than twice --webhook-timeout-ms
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    webhook_lease_ms: u64,
    /// Lead times of expiry warnings (apitoken.expiring events in the audit trail, and to the webhooks), such as 7d,1d; default none
    #[arg(long, value_name = "DURATIONS", value_parser = parse_leads)]
    expiry_warning: Option<Leads>,
    /// How often due expiry warnings are looked for, in seconds
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    expiry_warning_scan_seconds: u64,
    /// Tokens unused for DURATION (by their last use, or since their creation) are disabled or deleted, audited as the tool `apitokens inactivity policy`: `90d:disable` for every namespace, `ci=30d:delete` for one, `legacy=off` to exempt one; repeatable; default none
    #[arg(long, value_name = "[NAMESPACE=]DURATION:ACTION")]
    inactive_tokens: Vec<String>,
    /// How often inactive tokens are looked for, in seconds (60 to 86400)
    #[arg(long, default_value_t = 3600, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(60..=86_400))]
    inactivity_sweep_seconds: u64,
    /// The window of each token's access evidence (`access` in the API: the kinds of access its requests used, and the narrowest role that would have admitted them), in days
    #[arg(long, default_value_t = crate::tokens::evidence::DEFAULT_DAYS, value_name = "DAYS",
          value_parser = clap::value_parser!(u32).range(1..=3650))]
    evidence_days: u32,
    /// Log level: error, warn, info, debug
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    pub(super) log_level: tracing::Level,
    /// Log lines as text, or as one JSON object each (for log shippers: the request's method, path and caller, token names, namespaces, revisions, Envoy nodes and durations as fields). Audit events are one JSON line each either way
    #[arg(long, value_enum, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    pub(super) log_format: LogFormat,
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `--audit-retention`: a duration, or none.
#[derive(Clone, Copy, Debug)]
struct Retention(Option<Duration>);

/// `--expiry-warning`: lead times, shortest first.
#[derive(Clone, Debug)]
struct Leads(Vec<Duration>);

fn parse_leads(text: &str) -> Result<Leads, &'static str> {
    webhooks::expiry::parse_leads(text)
        .map(Leads)
        .ok_or("expected durations with a unit, separated by commas, such as 7d,1d")
}

fn parse_retention(text: &str) -> Result<Retention, &'static str> {
    if text == "forever" {
        return Ok(Retention(None));
    }
    crate::clock::parse_duration(text)
        .map(|d| Retention(Some(d)))
        .ok_or("expected a duration with a unit (400d, 12h, 3600s) or forever")
}

fn inactivity_policies(flags: &[String]) -> Result<Policies> {
    let mut policies = Policies::default();
    for flag in flags {
        policies
            .add(flag)
            .map_err(|e| Error::input(format!("--inactive-tokens {flag}"), e))?;
    }
    Ok(policies)
}

fn lifetimes(flags: &[String]) -> Result<Lifetimes> {
    let mut lifetimes = Lifetimes::default();
    for flag in flags {
        lifetimes
            .add(flag)
            .map_err(|e| Error::input(format!("--max-token-lifetime {flag}"), e))?;
    }
    Ok(lifetimes)
}

pub(super) fn serve(args: ServeArgs) -> Result<()> {
    // Read again where the sweep starts; refused here, before anything runs.
    inactivity_policies(&args.inactive_tokens)?;
    if args.no_xds && args.ecds_file.is_none() {
        return Err(Error::input(
            "--no-xds",
            "needs --ecds-file: otherwise no Envoy can get the configuration",
        ));
    }
    if !args.no_xds && !args.xds_listen.ip().is_loopback() && args.xds_tls_cert.is_none() && !args.insecure_xds {
        return Err(Error::Refused(format!(
            "--xds-listen {} is beyond loopback without mutual TLS: anyone who reaches it reads every token's digest \
             and name, fakes ACKs and marks tokens used. Give --xds-tls-cert, --xds-tls-key and --xds-client-ca \
             (and --xds-client-san), or --insecure-xds if a network policy stands in front of it",
            args.xds_listen
        )));
    }
    if let Some(path) = &args.ecds_file {
        file::check_path(path).map_err(|e| Error::input(format!("--ecds-file {}", path.display()), e))?;
    }
    for (flag, value) in [
        ("--namespace-writes-per-second", args.namespace_writes_per_second),
        ("--namespace-write-burst", args.namespace_write_burst),
        ("--leak-reports-per-second", args.leak_reports_per_second),
        ("--leak-report-burst", args.leak_report_burst),
    ] {
        if !value.is_finite() || !(0.0..=1e9).contains(&value) {
            return Err(Error::input(flag, "must be a number from 0 to 1e9"));
        }
    }
    let hooks = webhook_signing(&args)?;
    let base = load_base(&args.config, ECDS_BASE)?;
    // Idle means unreported: without usage reports every token would look
    // unused, and be disabled or deleted N days after its creation.
    if !inactivity_policies(&args.inactive_tokens)?.is_empty() && (args.no_xds || base.usage_report.is_none()) {
        return Err(Error::input(
            "--inactive-tokens",
            "needs the filters' usage reports (a --plugin-config with usageReport, and xDS): without them every token looks unused",
        ));
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?
        .block_on(run(args, base, hooks))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn wait_true(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// The host name and the process id: unique among replicas on one machine
/// and across a Deployment's pods.
fn default_replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "replica".to_owned());
    format!("{host}-{}", std::process::id())
}

fn warn_if_exposed(what: &str, addr: SocketAddr) {
    if !addr.ip().is_loopback() {
        tracing::warn!("{what} listens on {addr}, beyond loopback: put TLS and network policy in front of it");
    }
}

/// Mutual TLS for the ECDS server: anyone who can reach it would otherwise
/// read every token's name, role and digest, and could fake ACKs.
fn xds_tls(args: &ServeArgs) -> Result<Option<tonic::transport::ServerTlsConfig>> {
    let (Some(cert), Some(key), Some(ca)) = (&args.xds_tls_cert, &args.xds_tls_key, &args.xds_client_ca) else {
        return Ok(None);
    };
    let read = |flag: &str, path: &PathBuf| {
        std::fs::read(path).map_err(|e| Error::input(format!("--{flag} {}", path.display()), e))
    };
    let identity = tonic::transport::Identity::from_pem(read("xds-tls-cert", cert)?, read("xds-tls-key", key)?);
    let ca = tonic::transport::Certificate::from_pem(read("xds-client-ca", ca)?);
    Ok(Some(
        tonic::transport::ServerTlsConfig::new()
            .identity(identity)
            .client_ca_root(ca)
            .client_auth_optional(false),
    ))
}

/// Accepted connections, at most `--xds-max-connections-per-peer` per peer
/// address (more are closed at once), without Nagle's algorithm: otherwise a
/// small push (a revocation) can wait for Envoy's delayed ACK, about 40 ms
/// (measured).
fn admitted(
    listener: tokio::net::TcpListener,
    peers: Arc<PeerLimits>,
    cut: tokio_util::sync::CancellationToken,
) -> impl tokio_stream::Stream<Item = std::io::Result<Counted>> {
    use tokio_stream::StreamExt as _;
    tokio_stream::wrappers::TcpListenerStream::new(listener).filter_map(move |accepted| match accepted {
        Ok(tcp) => {
            let _ = tcp.set_nodelay(true);
            peers.admit(tcp, &cut).map(Ok)
        }
        Err(e) => Some(Err(e)),
    })
}

/// What the webhooks sign and send with, checked before anything starts
/// (none without `--webhook`).
struct Signing {
    client: webhooks::client::Client,
    key: webhooks::sign::Key,
}

fn webhook_signing(args: &ServeArgs) -> Result<Option<Signing>> {
    if args.webhook.is_empty() {
        return Ok(None);
    }
    let mut names: Vec<&str> = args.webhook.iter().map(|e| e.name.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w.first() == w.get(1)) {
        return Err(Error::input(
            "--webhook",
            "two endpoints have one NAME: each keeps its own cursor",
        ));
    }
    if args.webhook_timeout_ms.saturating_mul(2) >= args.webhook_lease_ms {
        return Err(Error::input(
            "--webhook-lease-ms",
            "must be more than twice --webhook-timeout-ms: a lease renewed before each delivery must outlast it",
        ));
    }
    let Some(path) = &args.webhook_key_file else {
        return Err(Error::input(
            "--webhook",
            "needs --webhook-key-file: every delivery is signed",
        ));
    };
    let what = || format!("--webhook-key-file {}", path.display());
    let text = std::fs::read(path).map_err(|e| Error::input(what(), e))?;
    let key = webhooks::sign::Key::parse(&text).map_err(|e| Error::input(what(), e))?;
    let client = webhooks::client::Client::new(
        args.webhook_ca.as_deref(),
        Duration::from_millis(args.webhook_timeout_ms.max(1)),
    )
    .map_err(|e| Error::input("--webhook-ca", e))?;
    Ok(Some(Signing { client, key }))
}

async fn run(args: ServeArgs, base: apitokens_core::PluginConfig, hooks: Option<Signing>) -> Result<()> {
    // Idle means unreported: inactivity policies only where the gateways
    // report their uses.
    let reported = !args.no_xds && base.usage_report.is_some();
    let mut core = Core::open(&args, base).await?;
    let service = core.service(&args, reported)?;
    let listeners = Listeners::bind(&args).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    // With replicas: no xDS while the database is out of reach (see
    // `replicas`); a single process on SQLite always serves.
    let liveness = core.coordinator.as_ref().map(Coordinator::liveness);
    core.spawn_background(&args, &service, &mut tasks, &stop_rx);
    core.spawn_events(&args, hooks, &service, &mut tasks, &stop_rx);
    if args.max_message_bytes.is_some() {
        tracing::warn!(
            "--max-message-bytes is ignored: responses are not copied per stream, requests are bounded by \
             --xds-max-request-bytes"
        );
    }
    let identities = Identities::new(args.xds_client_san.clone());
    let usage = UsageServer::new(Arc::clone(&service), identities.clone());
    let push_counters = PushCounters::default();
    let metrics = Arc::new(Metrics::new(&service, &core.store_metrics, &push_counters));
    let state = Arc::new(AppState {
        metrics,
        service,
        publisher: Arc::clone(&core.publisher),
        acks: Arc::clone(&core.acks),
        resource_name: args.resource_name.clone(),
        name_envoys: args.name_envoys_in_answers,
        trusted_proxies: api::TrustedProxies(args.trusted_proxy.clone()),
    });
    let Listeners {
        http,
        api: api_listener,
        api_addr,
        status: status_listener,
        xds_tls,
        xds: xds_listener,
    } = listeners;

    // The HTTP servers: the API (and the console), and /status and /metrics
    // on their own address when asked.
    let scheme = if http.tls.is_some() { "https" } else { "http" };
    let status_at = match status_listener {
        Some((listener, addr)) => {
            tasks.spawn(http::serve(
                listener,
                api::operator(Arc::clone(&state)),
                http.clone(),
                wait_true(stop_rx.clone()),
                Duration::from_secs(4),
            ));
            addr
        }
        None => api_addr,
    };
    let app = api::app(state, args.status_listen.is_none());
    tasks.spawn(http::serve(
        api_listener,
        app,
        http,
        wait_true(stop_rx.clone()),
        Duration::from_secs(4),
    ));

    // The xDS server: ECDS, the delta channel, usage reports.
    if let Some((listener, addr)) = xds_listener {
        let secured = xds_tls.is_some();
        let xds = Xds {
            addr,
            tls: xds_tls,
            publisher: Arc::clone(&core.publisher),
            acks: Arc::clone(&core.acks),
            resource: core.resource.clone(),
            usage,
            limits: XdsLimits {
                max_request_bytes: args.xds_max_request_bytes.max(1024),
                identities,
            },
            counters: push_counters,
            snapshot_interval: Duration::from_millis(args.snapshot_interval_ms),
            peers: PeerLimits::new(args.xds_max_connections_per_peer),
            streams_per_connection: args.xds_max_streams_per_connection.max(1),
            max_age: (args.xds_max_connection_age_seconds > 0)
                .then(|| Duration::from_secs(args.xds_max_connection_age_seconds)),
        };
        tasks.spawn(xds.run(listener, liveness, stop_rx.clone()));
        tracing::info!(
            "xDS (ECDS and the delta channel, gRPC{}) on {addr}, resource {:?}, snapshots to Envoys with delta streams {}",
            if secured { ", mutual TLS" } else { "" },
            args.resource_name,
            match args.snapshot_interval_ms {
                0 => "on every change".to_owned(),
                ms => format!("at most every {ms} ms"),
            }
        );
    }
    tracing::info!(
        "API on {scheme}://{api_addr}/apitokens/v1/namespaces/{{namespace}}/apitokens, health {scheme}://{api_addr}/healthz, status {scheme}://{status_at}/status, metrics {scheme}://{status_at}/metrics"
    );
    until_shutdown(tasks, stop_tx).await;
    Ok(())
}

/// What every part of `serve` shares: the store, the publisher over it, the
/// ACK tracker, the replica coordinator (on PostgreSQL) and the ECDS
/// resource; the ECDS file is written before anything serves (Envoy needs
/// it at startup).
struct Core {
    store: Arc<dyn Store>,
    store_metrics: StoreMetrics,
    publisher: Arc<Publisher>,
    acks: Arc<Tracker>,
    /// Until its task starts.
    coordinator: Option<Coordinator>,
    /// This replica's name, with a PostgreSQL store.
    replica: Option<String>,
    resource: EcdsResource,
}

impl Core {
    async fn open(args: &ServeArgs, base: apitokens_core::PluginConfig) -> Result<Self> {
        let (opened, _) = open_store(&args.store, false).await?;
        let store_metrics = StoreMetrics::default();
        let store = opened.store_within(
            Duration::from_millis(args.store_timeout_ms.max(1)),
            store_metrics.clone(),
        );
        let publisher = Publisher::open(
            Arc::clone(&store),
            PublisherOptions {
                base,
                expired_retention: Duration::from_secs(args.expired_retention_seconds),
                snapshot_interval: Duration::from_millis(args.snapshot_interval_ms),
                clock: Clock::system(),
            },
        )
        .await?;
        // A stream that leaves a response unanswered for a write's whole
        // wait is not waited for again (see `acks`).
        let acks = Arc::new(Tracker::with_patience(Duration::from_millis(args.apply_timeout_ms)));
        let mut replica = None;
        let coordinator = match &opened {
            OpenStore::Postgres(pg) => {
                tracing::info!("store: {}", pg.describe());
                replica = Some(args.replica_name.clone().unwrap_or_else(default_replica_name));
                let opts = ReplicaOptions {
                    name: replica.clone().unwrap_or_default(),
                    timeout: Duration::from_millis(args.replica_timeout_ms),
                };
                Some(
                    Coordinator::join(Arc::clone(pg), Arc::clone(&acks), opts)
                        .await
                        .map_err(|e| Error::input("--store", e))?,
                )
            }
            OpenStore::Sqlite(_) => None,
        };
        let resource = EcdsResource::new(FilterParams {
            resource_name: args.resource_name.clone(),
            module: args.wasm_module.clone(),
            ..FilterParams::default()
        });
        if let Some(path) = &args.ecds_file {
            file::write_current(&publisher, &acks, &resource, path)
                .map_err(|e| Error::input(format!("--ecds-file {}", path.display()), e))?;
        }
        Ok(Self {
            store,
            store_metrics,
            publisher,
            acks,
            coordinator,
            replica,
            resource,
        })
    }

    /// The background work: the publisher's catch-up, the replicas'
    /// heartbeats, the ECDS file, last use, the audit trail's retention.
    fn spawn_background(
        &mut self,
        args: &ServeArgs,
        service: &Arc<Service>,
        tasks: &mut tokio::task::JoinSet<()>,
        stop: &watch::Receiver<bool>,
    ) {
        let poll = Duration::from_millis(args.poll_interval_ms.max(10));
        tasks.spawn(Arc::clone(&self.publisher).run(poll, stop.clone()));
        if let Some(coordinator) = self.coordinator.take() {
            tasks.spawn(coordinator.run(stop.clone()));
        }
        if let Some(path) = args.ecds_file.clone() {
            tasks.spawn(file::run(
                Arc::clone(&self.publisher),
                Arc::clone(&self.acks),
                self.resource.clone(),
                path,
                stop.clone(),
            ));
        }
        let flush = Duration::from_secs(args.usage_flush_seconds.max(1));
        tasks.spawn(Arc::clone(service).run_usage(flush, stop.clone()));
        // Wherever uses are reported: the operator's policies, and those
        // the namespaces' owners set (read at each sweep).
        if let Some(policies) = service.inactivity_policies() {
            let every = Duration::from_secs(args.inactivity_sweep_seconds.max(1));
            tasks.spawn(inactivity::run(
                Arc::clone(service),
                policies.clone(),
                every,
                stop.clone(),
            ));
        }
        if let Retention(Some(keep)) = args.audit_retention {
            // Hourly, or more often for a short retention.
            let every = (keep / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
            tasks.spawn(Arc::clone(service).run_audit_retention(keep, every, stop.clone()));
        }
    }

    /// The events to other systems: the expiry warnings, and one delivery
    /// per webhook endpoint.
    fn spawn_events(
        &self,
        args: &ServeArgs,
        hooks: Option<Signing>,
        service: &Arc<Service>,
        tasks: &mut tokio::task::JoinSet<()>,
        stop: &watch::Receiver<bool>,
    ) {
        if let Some(Leads(leads)) = &args.expiry_warning {
            let told = Arc::clone(service);
            tasks.spawn(webhooks::expiry::run(
                Arc::clone(&self.store),
                leads.clone(),
                service.clock().clone(),
                Duration::from_secs(args.expiry_warning_scan_seconds.max(1)),
                move || told.tell_events_written(),
                stop.clone(),
            ));
        }
        let Some(Signing { client, key }) = hooks else {
            return;
        };
        let max_backoff = Duration::from_millis(args.webhook_max_backoff_ms.max(1));
        let settings = webhooks::Settings {
            client,
            key,
            source: args.webhook_source.clone(),
            // Replicas deliver under their own names; a single process
            // takes its lease back at once after a restart.
            holder: self.replica.clone().unwrap_or_else(|| "apitokens serve".to_owned()),
            lease: Duration::from_millis(args.webhook_lease_ms.max(100)),
            poll: Duration::from_millis(args.poll_interval_ms.max(10)),
            backoff: Duration::from_millis(500).min(max_backoff),
            max_backoff,
            clock: service.clock().clone(),
            metrics: service.metrics.webhooks.clone(),
        };
        for endpoint in &args.webhook {
            tracing::info!(webhook = %endpoint.name, "webhook {}: delivering the audit trail to {}", endpoint.name, endpoint.target);
            tasks.spawn(webhooks::deliver::run(
                Arc::clone(&self.store),
                settings.clone(),
                endpoint.clone(),
                service.events_written(),
                stop.clone(),
            ));
        }
    }

    /// The token service: the only writer, its writes waiting for the ACKs.
    fn service(&self, args: &ServeArgs, reported: bool) -> Result<Arc<Service>> {
        Ok(Arc::new(Service::with_push(
            Arc::clone(&self.store),
            Arc::clone(&self.publisher),
            Arc::clone(&self.acks),
            ServiceOptions {
                quota: (args.max_tokens_per_namespace > 0).then_some(args.max_tokens_per_namespace),
                apply_timeout: Duration::from_millis(args.apply_timeout_ms),
                lifetimes: lifetimes(&args.max_token_lifetime)?,
                write_rate: Rate {
                    per_second: args.namespace_writes_per_second,
                    burst: args.namespace_write_burst,
                },
                report_rate: Rate {
                    per_second: args.leak_reports_per_second,
                    burst: args.leak_report_burst,
                },
                // One clock for the service and the publisher.
                clock: self.publisher.clock().clone(),
                evidence_days: args.evidence_days,
                inactivity: if reported {
                    Some(inactivity_policies(&args.inactive_tokens)?)
                } else {
                    None
                },
            },
        )))
    }
}

/// Every address `serve` listens on, bound before anything is served, so
/// that a port in use or a bad certificate stops `serve` at once.
struct Listeners {
    http: HttpOptions,
    api: tokio::net::TcpListener,
    api_addr: SocketAddr,
    status: Option<(tokio::net::TcpListener, SocketAddr)>,
    xds_tls: Option<tonic::transport::ServerTlsConfig>,
    xds: Option<(tokio::net::TcpListener, SocketAddr)>,
}

impl Listeners {
    async fn bind(args: &ServeArgs) -> Result<Self> {
        let http = HttpOptions {
            tls: match (&args.tls_cert, &args.tls_key) {
                (Some(cert), Some(key)) => Some(http::tls_acceptor(cert, key, "tls")?),
                _ => None,
            },
            header_read_timeout: Duration::from_secs(args.header_read_timeout_seconds.max(1)),
            max_connections: args.max_connections.max(1),
        };
        let (api, api_addr) = bind("--listen", args.listen).await?;
        if http.tls.is_none() {
            warn_if_exposed("the API", api_addr);
        }
        let status = match args.status_listen {
            Some(addr) => Some(bind("--status-listen", addr).await?),
            None => None,
        };
        let xds_tls = xds_tls(args)?;
        if let Some(tls) = &xds_tls {
            tonic::transport::Server::builder()
                .tls_config(tls.clone())
                .map_err(|e| Error::input("--xds-tls-cert/--xds-tls-key/--xds-client-ca", e))?;
        }
        let xds = if args.no_xds {
            None
        } else {
            let (listener, addr) = bind("--xds-listen", args.xds_listen).await?;
            if xds_tls.is_none() && !addr.ip().is_loopback() {
                tracing::warn!(
                    "the xDS server listens on {addr}, beyond loopback, without TLS (--insecure-xds): anyone who \
                     reaches it reads every token's digest and can fake ACKs; use --xds-tls-cert, --xds-tls-key and \
                     --xds-client-ca"
                );
            }
            Some((listener, addr))
        };
        Ok(Self {
            http,
            api,
            api_addr,
            status,
            xds_tls,
            xds,
        })
    }
}

/// A listener on `addr` (`flag` names it in errors) and the address it got.
async fn bind(flag: &str, addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::input(format!("{flag} {addr}"), e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::input(format!("{flag} {addr}"), e))?;
    Ok((listener, bound))
}

/// Serves until a signal (or until a server task stops), then tells every
/// task to stop and gives their connections 5 seconds.
async fn until_shutdown(mut tasks: tokio::task::JoinSet<()>, stop: watch::Sender<bool>) {
    tokio::select! {
        () = shutdown_signal() => tracing::info!("shutting down"),
        Some(_) = tasks.join_next() => tracing::error!("a server task stopped; shutting down"),
    }
    let _ = stop.send(true);
    if tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!("some connections did not close within 5 s");
    }
}

/// Resolves once `live` says `wanted` (at once without a liveness signal
/// when `wanted` is true, never when it is false).
async fn until_live(live: Option<watch::Receiver<bool>>, wanted: bool) {
    match live {
        Some(mut rx) => {
            if rx.wait_for(|l| *l == wanted).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None if wanted => {}
        None => std::future::pending().await,
    }
}

/// The xDS server (ECDS, the delta channel and usage reports) on one address, served while
/// `live` says so: closed, streams and port, while this replica cannot
/// reach the database, and opened again when it can.
struct Xds {
    addr: SocketAddr,
    tls: Option<tonic::transport::ServerTlsConfig>,
    publisher: Arc<Publisher>,
    acks: Arc<Tracker>,
    resource: EcdsResource,
    usage: UsageServer,
    limits: XdsLimits,
    counters: PushCounters,
    snapshot_interval: Duration,
    peers: Arc<PeerLimits>,
    streams_per_connection: u32,
    max_age: Option<Duration>,
}

impl Xds {
    async fn run(
        self,
        listener: tokio::net::TcpListener,
        live: Option<watch::Receiver<bool>>,
        stop: watch::Receiver<bool>,
    ) {
        let mut listener = Some(listener);
        loop {
            tokio::select! {
                () = until_live(live.clone(), true) => {}
                () = wait_true(stop.clone()) => return,
            }
            let listener = match listener.take() {
                Some(l) => l,
                None => match tokio::net::TcpListener::bind(self.addr).await {
                    Ok(l) => {
                        tracing::info!("xDS on {} again", self.addr);
                        l
                    }
                    Err(e) => {
                        tracing::warn!("xDS: cannot listen on {} again (retrying): {e}", self.addr);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                },
            };
            // This serving's streams end with it.
            let (end_tx, end_rx) = watch::channel(false);
            let service = EcdsServer::new(
                Arc::clone(&self.publisher),
                Arc::clone(&self.acks),
                self.resource.clone(),
                end_rx.clone(),
                self.limits.clone(),
                self.counters.clone(),
                self.snapshot_interval,
            );
            let delta = DeltaServer::new(
                Arc::clone(&self.publisher),
                Arc::clone(&self.acks),
                end_rx,
                self.limits.identities.clone(),
                self.counters.clone(),
            );
            let (lost, stopped) = (live.clone(), stop.clone());
            // Connections still open a few seconds after the end (a client
            // that does not read its stream) are cut.
            let cut = tokio_util::sync::CancellationToken::new();
            let cutter = cut.clone();
            let ended = async move {
                tokio::select! {
                    () = until_live(lost, false) => {}
                    () = wait_true(stopped) => {}
                }
                let _ = end_tx.send(true);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    cutter.cancel();
                });
            };
            let mut builder = tonic::transport::Server::builder();
            if let Some(tls) = self.tls.clone() {
                builder = match builder.tls_config(tls) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!("xDS: TLS: {e}");
                        return;
                    }
                };
            }
            builder = builder
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                .max_concurrent_streams(Some(self.streams_per_connection));
            if let Some(age) = self.max_age {
                builder = builder
                    .max_connection_age(age)
                    .max_connection_age_grace(Duration::from_secs(60));
            }
            let result = builder
                .add_service(Grpc(service))
                .add_service(Grpc(delta))
                .add_service(Grpc(self.usage.clone()))
                .serve_with_incoming_shutdown(admitted(listener, Arc::clone(&self.peers), cut), ended)
                .await;
            if let Err(e) = result {
                tracing::error!("xDS server failed: {e}");
                return;
            }
            if *stop.borrow() {
                return;
            }
        }
    }
}
