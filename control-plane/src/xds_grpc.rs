//! The ECDS gRPC service: adapts tonic streams to the [`Session`] state
//! machine and records every event with the status tracker.

use crate::clock;
use crate::engine::Engine;
use crate::xds::{Event, Session};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_server::{
    ExtensionConfigDiscoveryService, ExtensionConfigDiscoveryServiceServer,
};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub struct EcdsService {
    engine: Arc<Engine>,
    shutdown: watch::Receiver<bool>,
}

/// The tonic service with raised message limits (tonic's default is 4 MiB;
/// 100k tokens are about 14 MiB of JSON).
pub fn server(
    engine: Arc<Engine>,
    shutdown: watch::Receiver<bool>,
    max_message_bytes: usize,
) -> ExtensionConfigDiscoveryServiceServer<EcdsService> {
    ExtensionConfigDiscoveryServiceServer::new(EcdsService { engine, shutdown })
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes)
}

fn record(engine: &Engine, node: &str, event: &Event) {
    let now = clock::now();
    match event {
        Event::Connected { node, cluster, version } => {
            log::info!("xds: envoy {node:?} (cluster {cluster:?}) connected, has version {version:?}");
            engine.status.connected(node, cluster, version, now);
        }
        Event::Ack { version } => {
            log::info!("xds: envoy {node:?} ACKed version {version}");
            engine.status.acked(node, version, now);
        }
        Event::Nack { version, error } => {
            log::warn!("xds: envoy {node:?} NACKed version {version}: {error}");
            engine.status.nacked(node, version, error, now);
        }
    }
}

async fn serve_stream(
    engine: Arc<Engine>,
    mut inbound: Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut session = Session::new(&engine.filter_params().resource_name);
    let mut snapshots = engine.subscribe();
    loop {
        let response = tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    // Not marked as seen: if the request is stale and sends
                    // nothing, `changed()` still pushes the new snapshot.
                    let snapshot = Arc::clone(&snapshots.borrow());
                    match session.on_request(&req, &snapshot) {
                        Ok(step) => {
                            let node = session.node().unwrap_or_default().to_owned();
                            for event in &step.events {
                                record(&engine, &node, event);
                            }
                            step.response
                        }
                        Err(e) => {
                            log::warn!("xds: closing a stream: {e}");
                            let _ = tx.send(Err(Status::invalid_argument(e.to_string()))).await;
                            break;
                        }
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    log::debug!("xds: stream ended: {}", status.message());
                    break;
                }
            },
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                let snapshot = Arc::clone(&snapshots.borrow_and_update());
                session.on_snapshot(&snapshot)
            }
            _ = shutdown.changed() => break,
            () = tx.closed() => break,
        };
        if let Some(response) = response {
            if let Some(node) = session.node() {
                engine.status.sent(node, &response.version_info);
            }
            if tx.send(Ok(response)).await.is_err() {
                break;
            }
        }
    }
    if let Some(node) = session.node() {
        log::info!("xds: envoy {node:?} disconnected");
        engine.status.disconnected(node, clock::now());
    }
}

#[tonic::async_trait]
impl ExtensionConfigDiscoveryService for EcdsService {
    type StreamExtensionConfigsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn stream_extension_configs(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamExtensionConfigsStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(serve_stream(
            Arc::clone(&self.engine),
            request.into_inner(),
            tx,
            self.shutdown.clone(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type DeltaExtensionConfigsStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_extension_configs(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaExtensionConfigsStream>, Status> {
        Err(Status::unimplemented(
            "apitokens serves the state-of-the-world protocol (api_type: GRPC), not delta",
        ))
    }

    async fn fetch_extension_configs(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let snapshot = self.engine.current();
        Ok(Response::new(snapshot.discovery_response(String::new(), true)))
    }
}
