//! The ECDS gRPC service: adapts HTTP/2 streams to the [`Session`] state
//! machine, records every event with the ACK [`Tracker`], and sends each
//! version as a [`Frame`] around the shared payload ([`FrameBody`]: no
//! stream copies the table, a stalled one costs a reference to it).
//!
//! Only `StreamExtensionConfigs` is served: `FetchExtensionConfigs` would
//! hand out the table outside any stream (uncounted, untracked), and Envoy
//! never uses it. Requests are decoded with a small limit of their own
//! (`--xds-max-request-bytes`): a DiscoveryRequest is a few hundred bytes.

use super::acks::{StreamId, Tracker};
use super::frames::FrameBody;
use super::peers::{peer_of, Identities};
use super::resource::{EcdsResource, Frame};
use super::sotw::{Event, Respond, Session};
use super::BoxFuture;
use crate::config::{Publisher, Snapshot};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use prometheus_client::metrics::counter::Counter;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{mpsc, watch};
use tonic::body::Body;
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::{Status, Streaming};

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
}

/// What the ECDS streams sent (`/metrics`).
#[derive(Clone, Debug, Default)]
pub struct PushCounters {
    pub responses: Counter,
    /// Bytes of the responses, gRPC framing included.
    pub bytes: Counter,
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
        tokio::spawn(serve_stream(Arc::clone(&self.shared), peer, inbound, tx));
        let mut resp = http::Response::new(Body::new(FrameBody::new(rx)));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        resp
    }
}

impl NamedService for EcdsServer {
    const NAME: &'static str = SERVICE;
}

impl Service<http::Request<Body>> for EcdsServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let method = req.uri().path().strip_prefix('/').and_then(|p| p.strip_prefix(SERVICE));
        let resp = match method {
            Some("/StreamExtensionConfigs") => self.stream(req),
            Some("/FetchExtensionConfigs") => Status::unimplemented(
                "apitokens serves the configuration on StreamExtensionConfigs only (api_type: GRPC)",
            )
            .into_http(),
            Some("/DeltaExtensionConfigs") => {
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

async fn serve_stream(
    shared: Arc<Shared>,
    peer: String,
    mut inbound: Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<Result<Frame, Status>>,
) {
    let mut session = Session::new(&shared.resource.params().resource_name);
    let mut published = shared.publisher.subscribe();
    let mut shutdown = shared.shutdown.clone();
    let mut stream: Option<StreamId> = None;
    loop {
        // The snapshot a response carries: the one whose version the state
        // machine decided on.
        let (respond, snapshot): (Option<Respond>, Arc<Snapshot>) = tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    // Not marked as seen: if the request is stale and sends
                    // nothing, `changed()` still pushes the new version.
                    let snapshot = Arc::clone(&published.borrow().snapshot);
                    match session.on_request(&req, snapshot.version) {
                        Ok(step) => {
                            for event in &step.events {
                                record(&shared, &mut stream, &peer, event);
                            }
                            (step.respond, snapshot)
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
                let snapshot = Arc::clone(&published.borrow_and_update().snapshot);
                let step = session.on_version(snapshot.version);
                for event in &step.events {
                    record(&shared, &mut stream, &peer, event);
                }
                (step.respond, snapshot)
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
