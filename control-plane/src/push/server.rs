//! The ECDS gRPC service: adapts HTTP/2 streams to the [`Session`] state
//! machine, records every event with the ACK [`Tracker`], and sends each
//! version as a [`Frame`] around the shared payload ([`FrameBody`]: no
//! stream copies the table, a stalled one costs a reference to it).
//!
//! Only `StreamExtensionConfigs` is served: `FetchExtensionConfigs` would
//! hand out the table outside any stream (uncounted, untracked), and Envoy
//! never uses it. Requests are decoded with a small limit of their own
//! (`--xds-max-request-bytes`): a DiscoveryRequest is a few hundred bytes.
//!
//! ECDS is the snapshot; the changes travel on the delta channel
//! (`push::delta`) to every filter VM. So an Envoy whose node has a
//! connected VM stream gets the tables the publisher writes in the
//! background (every `--snapshot-interval-ms`), at most one per interval,
//! never on a write's path (a write waits for the VMs); and the current
//! version at once (written for it then) when one of its VMs awaits a
//! snapshot (no history reaches its table) or its last VM stream goes. An
//! Envoy without VM streams (an older filter) gets every version at once, as
//! a new subscription does. With an interval of 0, every Envoy gets every
//! version at once.

use super::frames::FrameBody;
use super::grpc::{Answer, Route};
use super::peers::{peer_of, Identities};
use super::resource::{EcdsResource, Frame};
use super::sotw::{Event, Respond, Session};
use crate::acks::{StreamId, Tracker};
use crate::config::{Encoded, Publisher, Version};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use prometheus_client::metrics::counter::Counter;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::{Status, Streaming};
use tracing::Instrument as _;

const SERVICE: &str = "envoy.service.extension.v3.ExtensionConfigDiscoveryService";

/// The ExtensionConfigDiscoveryService (state of the world; delta and fetch
/// are refused).
#[derive(Clone)]
pub struct EcdsServer {
    shared: Arc<Shared>,
}

struct Shared {
    publisher: Arc<Publisher>,
    acks: Arc<Tracker>,
    resource: EcdsResource,
    shutdown: watch::Receiver<bool>,
    max_request_bytes: usize,
    identities: Identities,
    counters: PushCounters,
    /// `--snapshot-interval-ms` (zero: every version at once).
    snapshot_interval: Duration,
}

/// What the ECDS and delta streams sent (`/metrics`).
#[derive(Clone, Debug, Default)]
pub struct PushCounters {
    pub responses: Counter,
    /// Bytes of the responses, gRPC framing included.
    pub bytes: Counter,
    /// Delta channel responses to filter VMs.
    pub delta_responses: Counter,
    /// Their bytes, gRPC framing included.
    pub delta_bytes: Counter,
}

/// What an xDS server accepts from its clients.
#[derive(Clone, Debug)]
pub struct XdsLimits {
    /// The largest request decoded (a DiscoveryRequest, a usage report).
    pub max_request_bytes: usize,
    /// Under mutual TLS: the client identities allowed (empty: any).
    pub identities: Identities,
}

impl EcdsServer {
    pub fn new(
        publisher: Arc<Publisher>,
        acks: Arc<Tracker>,
        resource: EcdsResource,
        shutdown: watch::Receiver<bool>,
        limits: XdsLimits,
        counters: PushCounters,
        snapshot_interval: Duration,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                publisher,
                acks,
                resource,
                shutdown,
                max_request_bytes: limits.max_request_bytes,
                identities: limits.identities,
                counters,
                snapshot_interval,
            }),
        }
    }

    /// A stream: its requests decoded as they come, its responses written
    /// by a task of its own.
    fn stream(&self, req: http::Request<Body>) -> http::Response<Body> {
        if let Err(status) = self.shared.identities.check(req.extensions()) {
            return status.into_http();
        }
        let peer = peer_of(req.extensions()).map_or_else(|| "-".to_owned(), |a| a.to_string());
        let inbound = Streaming::new_request(
            tonic_prost::ProstDecoder::<DiscoveryRequest>::default(),
            req.into_body(),
            None,
            Some(self.shared.max_request_bytes),
        );
        let (tx, rx) = mpsc::channel(4);
        // Every event of the stream is logged in its span: the peer, then
        // the stream's number and node once the first request names them.
        let span = tracing::info_span!(
            "xds_stream",
            peer = %peer,
            stream = tracing::field::Empty,
            node = tracing::field::Empty
        );
        tokio::spawn(serve_stream(Arc::clone(&self.shared), peer, inbound, tx).instrument(span));
        let mut resp = http::Response::new(Body::new(FrameBody::new(rx)));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        resp
    }
}

impl Route for EcdsServer {
    const SERVICE: &'static str = SERVICE;

    fn route(&mut self, method: Option<&str>, req: http::Request<Body>) -> Answer {
        let resp = match method {
            Some("StreamExtensionConfigs") => self.stream(req),
            Some("FetchExtensionConfigs") => Status::unimplemented(
                "apitokens serves the configuration on StreamExtensionConfigs only (api_type: GRPC)",
            )
            .into_http(),
            Some("DeltaExtensionConfigs") => {
                Status::unimplemented("apitokens serves the state-of-the-world protocol (api_type: GRPC), not delta")
                    .into_http()
            }
            _ => Status::unimplemented("no such method").into_http(),
        };
        Box::pin(async move { Ok(resp) })
    }
}

fn record(shared: &Arc<Shared>, stream: &mut Option<StreamId>, peer: &str, event: &Event) {
    let acks = &shared.acks;
    match (event, *stream) {
        (Event::Connected { node, cluster, version }, _) => {
            let id = acks.connected(node, cluster, peer, version);
            let span = tracing::Span::current();
            span.record("stream", id.0);
            span.record("node", tracing::field::debug(node));
            tracing::info!(
                // Debug-escaped: the client chose them (a newline would
                // forge a log line in the text format).
                node = ?node,
                cluster = ?cluster,
                peer,
                stream = id.0,
                "xds: envoy {node:?} (cluster {cluster:?}, {peer}) connected as stream {}, has version {version:?}",
                id.0
            );
            *stream = Some(id);
        }
        (Event::Held { reported, current }, Some(id)) => {
            tracing::warn!(
                revision = reported.revision.0,
                epoch = reported.epoch.0,
                "xds: stream {} enforces version {} of epoch {}, newer than this control plane's {} of epoch {}: \
                 nothing is sent to it until this control plane has caught up (an older copy of the store would \
                 bring revoked tokens back)",
                id.0,
                reported.revision,
                reported.epoch,
                current.revision,
                current.epoch
            );
            acks.held(id, *reported);
            // A fresh look at the store: this replica may only lag behind
            // another; if the store itself is behind, writes stop.
            let publisher = Arc::clone(&shared.publisher);
            let reported = *reported;
            tokio::spawn(async move { publisher.reported(reported).await });
        }
        (Event::Released { version }, Some(id)) => {
            tracing::info!(
                revision = version.revision.0,
                "xds: stream {} released: this control plane reached version {version}",
                id.0
            );
            acks.released(id);
        }
        (Event::Ack { version }, Some(id)) => {
            tracing::info!(
                stream = id.0,
                revision = version.revision.0,
                "xds: stream {} ACKed version {version}",
                id.0
            );
            acks.acked(id, *version);
        }
        (Event::Nack { version, error }, Some(id)) => {
            tracing::warn!(
                stream = id.0,
                revision = version.revision.0,
                "xds: stream {} NACKed version {version}: {error}",
                id.0
            );
            acks.nacked(id, *version, error);
        }
        _ => {}
    }
}

/// When a stream's Envoy gets a new snapshot (see the module's notes).
struct Pacing {
    interval: Duration,
    /// Its node, once it said.
    node: Option<String>,
    /// The stream is held (it enforces a newer version): every version goes
    /// to the state machine at once.
    held: bool,
    /// When the snapshot it lacks goes out.
    due: Option<tokio::time::Instant>,
}

/// What a stream takes now.
#[derive(Debug, PartialEq, Eq)]
enum Take {
    Nothing,
    /// The current version, the table written for it now if need be.
    Current,
    /// The table last written (in the background), newer than its own.
    Written,
}

impl Pacing {
    fn track(&mut self, event: &Event) {
        match event {
            Event::Connected { node, .. } => self.node = Some(node.clone()),
            Event::Held { .. } => self.held = true,
            Event::Released { .. } => self.held = false,
            _ => {}
        }
    }

    /// Whether a new version may wait: the interval is on, and the node has
    /// a VM stream none of whose VMs awaits a snapshot.
    fn defers(&self, acks: &Tracker) -> bool {
        !self.interval.is_zero() && !self.held && self.node.as_deref().is_some_and(|n| acks.defers_snapshots(n))
    }

    /// A version was published (`current`) or a table written (`written`),
    /// or the node's VM streams changed, or the due time came (`due`): what
    /// the stream, which has `target`, takes now.
    fn take(&mut self, acks: &Tracker, current: Version, written: Version, target: Version, due: bool) -> Take {
        if !self.defers(acks) {
            self.due = None;
            return if current == target {
                Take::Nothing
            } else {
                Take::Current
            };
        }
        if current == target {
            self.due = None;
            return Take::Nothing;
        }
        if due {
            // What the background wrote, if it is newer (it writes every
            // interval: usually), else the current version.
            self.due = None;
            return if written > target { Take::Written } else { Take::Current };
        }
        self.due
            .get_or_insert_with(|| tokio::time::Instant::now() + self.interval);
        Take::Nothing
    }
}

async fn serve_stream(
    shared: Arc<Shared>,
    peer: String,
    mut inbound: Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<Result<Frame, Status>>,
) {
    let mut session = Session::new(&shared.resource.params().resource_name);
    let mut published = shared.publisher.subscribe();
    let mut vms = shared.acks.subscribe_vms();
    let mut shutdown = shared.shutdown.clone();
    let mut stream: Option<StreamId> = None;
    // The snapshot this Envoy is to have now: the current version, or an
    // earlier one while its VMs' delta streams carry the changes.
    let mut target: Arc<Encoded> = shared.publisher.latest_encoded();
    let mut pacing = Pacing {
        interval: shared.snapshot_interval,
        node: None,
        held: false,
        due: None,
    };
    loop {
        // The snapshot a response carries: the one whose version the state
        // machine decided on.
        let (respond, snapshot): (Option<Respond>, Arc<Encoded>) = tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    if stream.is_none() {
                        // A new subscription gets the current version.
                        target = shared.publisher.encoded().await;
                    }
                    // Not marked as seen: if the request is stale and sends
                    // nothing, `changed()` still pushes the new version.
                    match session.on_request(&req, target.version) {
                        Ok(step) => {
                            for event in &step.events {
                                pacing.track(event);
                                record(&shared, &mut stream, &peer, event);
                            }
                            (step.respond, Arc::clone(&target))
                        }
                        Err(e) => {
                            tracing::warn!("xds: closing a stream from {peer}: {e}");
                            let _ = tx.send(Err(Status::invalid_argument(e.to_string()))).await;
                            break;
                        }
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!("xds: stream from {peer} ended: {}", status.message());
                    break;
                }
            },
            changed = published.changed() => {
                if changed.is_err() {
                    break;
                }
                let (current, written) = {
                    let p = published.borrow_and_update();
                    (p.snapshot.version, p.encoded.version)
                };
                next(&shared, &mut session, &mut pacing, &mut stream, &peer, &mut target, (current, written), false).await
            }
            () = async {
                match pacing.due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                let p = shared.publisher.state();
                let versions = (p.snapshot.version, p.encoded.version);
                next(&shared, &mut session, &mut pacing, &mut stream, &peer, &mut target, versions, true).await
            }
            changed = vms.changed() => {
                if changed.is_err() {
                    break;
                }
                let p = shared.publisher.state();
                let versions = (p.snapshot.version, p.encoded.version);
                next(&shared, &mut session, &mut pacing, &mut stream, &peer, &mut target, versions, false).await
            }
            _ = shutdown.changed() => break,
            () = tx.closed() => break,
        };
        if let Some(respond) = respond {
            if let Some(id) = stream {
                shared.acks.sent(id, respond.version);
            }
            let frame = shared.resource.response(&snapshot, &respond.nonce, respond.include);
            // The 5-byte gRPC message prefix and the message.
            let bytes = 5 + frame.len() as u64;
            // A client that does not read fills the channel: the send waits,
            // but not past the end of this serving.
            let sent = tokio::select! {
                sent = tx.send(Ok(frame)) => sent.is_ok(),
                _ = shutdown.changed() => false,
            };
            if !sent {
                break;
            }
            shared.counters.responses.inc();
            shared.counters.bytes.inc_by(bytes);
        }
    }
    if let Some(id) = stream {
        tracing::info!(stream = id.0, peer, "xds: stream {} ({peer}) disconnected", id.0);
        shared.acks.disconnected(id);
    }
}

/// A version was published or a table written (`versions`: the current
/// version, the last written), or the due time came, or the node's VM
/// streams changed: the response to send, if the stream takes one now.
#[allow(clippy::too_many_arguments)]
async fn next(
    shared: &Arc<Shared>,
    session: &mut Session,
    pacing: &mut Pacing,
    stream: &mut Option<StreamId>,
    peer: &str,
    target: &mut Arc<Encoded>,
    (current, written): (Version, Version),
    due: bool,
) -> (Option<Respond>, Arc<Encoded>) {
    *target = match pacing.take(&shared.acks, current, written, target.version, due) {
        Take::Nothing => return (None, Arc::clone(target)),
        Take::Current => shared.publisher.encoded().await,
        Take::Written => shared.publisher.latest_encoded(),
    };
    let step = session.on_version(target.version);
    for event in &step.events {
        pacing.track(event);
        record(shared, stream, peer, event);
    }
    (step.respond, Arc::clone(target))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::push::resource::{FilterParams, TYPE_URL};
    use crate::store::contract::record;
    use crate::testutil::{grpc_client, serve_grpc, Core};
    use apitokens_core::Role;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use std::time::Instant;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::Request;

    const NODE: &str = "gw-1";

    struct Plane {
        core: Core,
        addr: std::net::SocketAddr,
        _stop: watch::Sender<bool>,
    }

    /// The plane's store, publisher and tracker are its core's.
    impl std::ops::Deref for Plane {
        type Target = Core;

        fn deref(&self) -> &Core {
            &self.core
        }
    }

    async fn plane(tag: &str, interval: Duration) -> Plane {
        let core = Core::open(tag).await;
        let (stop, stopped) = watch::channel(false);
        let server = EcdsServer::new(
            Arc::clone(&core.publisher),
            Arc::clone(&core.acks),
            EcdsResource::new(FilterParams::default()),
            stopped,
            XdsLimits {
                max_request_bytes: 64 * 1024,
                identities: Identities::new(vec![]),
            },
            PushCounters::default(),
            interval,
        );
        let addr = serve_grpc(server).await;
        Plane {
            core,
            addr,
            _stop: stop,
        }
    }

    /// An Envoy on ECDS that ACKs every response.
    struct Envoy {
        tx: mpsc::Sender<DiscoveryRequest>,
        inbound: Streaming<DiscoveryResponse>,
    }

    impl Envoy {
        async fn connect(addr: std::net::SocketAddr) -> Self {
            let mut grpc = grpc_client(addr).await;
            let (tx, rx) = mpsc::channel(4);
            tx.send(DiscoveryRequest {
                node: Some(Node {
                    id: NODE.into(),
                    ..Default::default()
                }),
                resource_names: vec!["apitokens".into()],
                type_url: TYPE_URL.into(),
                ..Default::default()
            })
            .await
            .unwrap();
            let path = http::uri::PathAndQuery::from_static(
                "/envoy.service.extension.v3.ExtensionConfigDiscoveryService/StreamExtensionConfigs",
            );
            let codec = tonic_prost::ProstCodec::<DiscoveryRequest, DiscoveryResponse>::default();
            let response = grpc
                .streaming(Request::new(ReceiverStream::new(rx)), path, codec)
                .await
                .unwrap();
            Self {
                tx,
                inbound: response.into_inner(),
            }
        }

        /// The next version within `within`, ACKed.
        async fn version(&mut self, within: Duration) -> Option<String> {
            let response = tokio::time::timeout(within, self.inbound.message()).await.ok()?;
            let response = response.unwrap().unwrap();
            self.tx
                .send(DiscoveryRequest {
                    version_info: response.version_info.clone(),
                    resource_names: vec!["apitokens".into()],
                    type_url: TYPE_URL.into(),
                    response_nonce: response.nonce.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
            Some(response.version_info)
        }
    }

    async fn write(cp: &Plane, n: u8) -> String {
        let r = cp
            .store
            .insert(
                vec![record(&format!("namespaces/a/apitokens/t{n}"), Role::Viewer, n)],
                None,
                vec![],
            )
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        cp.publisher.publish(r, deadline).await.unwrap().version.xds()
    }

    #[tokio::test]
    async fn an_envoy_with_vm_streams_gets_snapshots_at_most_every_interval() {
        let cp = plane("ecds-interval", Duration::from_millis(400)).await;
        let mut envoy = Envoy::connect(cp.addr).await;
        let first = envoy.version(Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            first,
            cp.publisher.current().version.xds(),
            "a new subscription: at once"
        );
        // Without a VM stream: every version at once (an older filter).
        let v1 = write(&cp, 1).await;
        assert_eq!(envoy.version(Duration::from_secs(5)).await, Some(v1));
        // With one: the snapshot waits for the interval.
        let vm = cp.acks.vm_connected(NODE, "ab12", "p", cp.publisher.current().version);
        let started = Instant::now();
        write(&cp, 2).await;
        let v3 = write(&cp, 3).await;
        assert_eq!(envoy.version(Duration::from_secs(5)).await, Some(v3), "both in one");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(350), "{waited:?}");
        // A VM no history reaches: its Envoy's snapshot goes out at once.
        let v4 = write(&cp, 4).await;
        assert_eq!(envoy.version(Duration::from_millis(150)).await, None);
        cp.acks.vm_snapshot_needed(vm);
        assert_eq!(envoy.version(Duration::from_millis(300)).await, Some(v4));
        cp.acks.vm_disconnected(vm);
        // The node's last VM stream gone: at once again, and a pending
        // snapshot goes out when it goes.
        let again = cp.acks.vm_connected(NODE, "ab12", "p", cp.publisher.current().version);
        assert!(cp.acks.defers_snapshots(NODE));
        let v5 = write(&cp, 5).await;
        assert_eq!(envoy.version(Duration::from_millis(150)).await, None);
        cp.acks.vm_disconnected(again);
        assert_eq!(envoy.version(Duration::from_millis(300)).await, Some(v5));
    }

    #[tokio::test]
    async fn an_interval_of_zero_sends_every_version_at_once() {
        let cp = plane("ecds-zero", Duration::ZERO).await;
        let mut envoy = Envoy::connect(cp.addr).await;
        envoy.version(Duration::from_secs(5)).await.unwrap();
        cp.acks.vm_connected(NODE, "ab12", "p", cp.publisher.current().version);
        let v1 = write(&cp, 1).await;
        assert_eq!(envoy.version(Duration::from_millis(300)).await, Some(v1));
    }
}
