//! The ECDS gRPC service: adapts tonic streams to the [`Session`] state
//! machine, records every event with the ACK [`Tracker`], and sends each
//! version as a [`Frame`] around the shared payload (a codec of our own, so
//! that no stream copies the table into a message first).

use super::acks::{StreamId, Tracker};
use super::resource::{EcdsResource, Frame};
use super::sotw::{Event, Respond, Session};
use super::BoxFuture;
use crate::config::{Publisher, Snapshot};
use bytes::BufMut;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::body::Body;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::{http, Service};
use tonic::server::{Grpc, NamedService, StreamingService, UnaryService};
use tonic::{Request, Response, Status, Streaming};

const SERVICE: &str = "envoy.service.extension.v3.ExtensionConfigDiscoveryService";

/// The codec: requests decoded with prost, responses written as frames.
#[derive(Clone, Copy, Debug, Default)]
struct FrameCodec;

struct FrameEncoder;

impl Encoder for FrameEncoder {
    type Item = Frame;
    type Error = Status;

    fn encode(&mut self, frame: Frame, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(frame.len());
        for part in frame.parts() {
            dst.put_slice(part);
        }
        Ok(())
    }
}

impl Codec for FrameCodec {
    type Encode = Frame;
    type Decode = DiscoveryRequest;
    type Encoder = FrameEncoder;
    type Decoder = tonic_prost::ProstDecoder<DiscoveryRequest>;

    fn encoder(&mut self) -> FrameEncoder {
        FrameEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

/// The ExtensionConfigDiscoveryService (state of the world; delta is refused).
#[derive(Clone)]
pub struct EcdsServer {
    shared: Arc<Shared>,
}

struct Shared {
    publisher: Arc<Publisher>,
    acks: Arc<Tracker>,
    resource: EcdsResource,
    shutdown: watch::Receiver<bool>,
    max_message_bytes: usize,
}

impl EcdsServer {
    /// `max_message_bytes` bounds requests and responses (tonic's default of
    /// 4 MiB is too small for about 30k tokens).
    pub fn new(
        publisher: Arc<Publisher>,
        acks: Arc<Tracker>,
        resource: EcdsResource,
        shutdown: watch::Receiver<bool>,
        max_message_bytes: usize,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                publisher,
                acks,
                resource,
                shutdown,
                max_message_bytes,
            }),
        }
    }

    fn grpc(&self) -> Grpc<FrameCodec> {
        Grpc::new(FrameCodec)
            .apply_max_message_size_config(Some(self.shared.max_message_bytes), Some(self.shared.max_message_bytes))
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
        let this = self.clone();
        let method = req.uri().path().strip_prefix('/').and_then(|p| p.strip_prefix(SERVICE));
        match method {
            Some("/StreamExtensionConfigs") => Box::pin(async move {
                let mut grpc = this.grpc();
                Ok(grpc.streaming(StreamMethod(this.shared), req).await)
            }),
            Some("/FetchExtensionConfigs") => Box::pin(async move {
                let mut grpc = this.grpc();
                Ok(grpc.unary(FetchMethod(this.shared), req).await)
            }),
            Some("/DeltaExtensionConfigs") => Box::pin(async move {
                Ok(Status::unimplemented(
                    "apitokens serves the state-of-the-world protocol (api_type: GRPC), not delta",
                )
                .into_http())
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

struct StreamMethod(Arc<Shared>);

impl StreamingService<DiscoveryRequest> for StreamMethod {
    type Response = Frame;
    type ResponseStream = ReceiverStream<Result<Frame, Status>>;
    type Future = BoxFuture<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<DiscoveryRequest>>) -> Self::Future {
        let shared = Arc::clone(&self.0);
        Box::pin(async move {
            let peer = request.remote_addr().map_or_else(|| "-".to_owned(), |a| a.to_string());
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(serve_stream(shared, peer, request.into_inner(), tx));
            Ok(Response::new(ReceiverStream::new(rx)))
        })
    }
}

struct FetchMethod(Arc<Shared>);

impl UnaryService<DiscoveryRequest> for FetchMethod {
    type Response = Frame;
    type Future = BoxFuture<Result<Response<Frame>, Status>>;

    fn call(&mut self, _request: Request<DiscoveryRequest>) -> Self::Future {
        let shared = Arc::clone(&self.0);
        Box::pin(async move {
            let snapshot = shared.publisher.current();
            Ok(Response::new(shared.resource.response(&snapshot, "", true)))
        })
    }
}

fn record(shared: &Arc<Shared>, stream: &mut Option<StreamId>, peer: &str, event: &Event) {
    let acks = &shared.acks;
    match (event, *stream) {
        (Event::Connected { node, cluster, version }, _) => {
            let id = acks.connected(node, cluster, peer, version);
            tracing::info!(
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
            tracing::info!("xds: stream {} ACKed version {version}", id.0);
            acks.acked(id, *version);
        }
        (Event::Nack { version, error }, Some(id)) => {
            tracing::warn!("xds: stream {} NACKed version {version}: {error}", id.0);
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
            if tx.send(Ok(frame)).await.is_err() {
                break;
            }
        }
    }
    if let Some(id) = stream {
        tracing::info!("xds: stream {} ({peer}) disconnected", id.0);
        shared.acks.disconnected(id);
    }
}
