//! The delta channel's server (`apitokens.v1.Delta/Subscribe`, the wire
//! format in `apitokens_core::delta`): every filter VM holds a stream, says
//! which table it enforces, and is sent the publisher's steps after it, as
//! they are published; each of its later requests says the table it now
//! enforces, which is what a write waits for (`crate::acks`). ECDS stays the
//! snapshot; this is what makes a write cost what changed.
//!
//! On the xDS server next to ECDS and the usage reports, with their trust:
//! mutual TLS when configured, and the allowed identities. A VM is served
//! from where its table stands:
//! - at the published head: one empty response, so that it knows it is live;
//! - inside the publisher's history: every later step, in order;
//! - before it, in the store's epoch: one step read from the store's change
//!   log, then the history's later steps (records are final states, so an
//!   overlap is harmless);
//! - after what this process published (it was served by a replica that is
//!   ahead): nothing, until this process gets there (an older table would
//!   bring back tokens revoked since);
//! - anything else (another epoch, a change log that does not reach back):
//!   `snapshot_needed`, and its Envoy gets the current snapshot by ECDS at
//!   once.
//!
//! Steps are chunked at record boundaries below the size a VM accepts
//! (`to` left empty on all chunks but a step's last). Requests are bounded
//! (1 KiB); a malformed one, or one from another store's table (lineage),
//! ends the stream with an error. Nothing logged here carries a digest.

use super::grpc::{refuse, Answer, Route};
use super::peers::{peer_of, Identities};
use super::server::PushCounters;
use super::sotw::MAX_NAME;
use super::BoxFuture;
use crate::acks::{StreamId, Tracker};
use crate::config::{CatchUp, Element, Publisher, Reach};
use crate::store::{Epoch, Position, Revision};
use apitokens_core::compact::Stamp;
use apitokens_core::delta::{MAX_RESPONSE_BYTES, METHOD, SERVICE};
use bytes::Bytes;
use prost::Message as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::{Grpc, StreamingService};
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument as _;

/// `apitokens.v1.DeltaRequest`: the first subscribes, every later one
/// acknowledges (the table the VM now enforces).
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeltaRequest {
    /// The store the VM's table came from.
    #[prost(bytes = "vec", tag = "1")]
    pub lineage: Vec<u8>,
    /// The Envoy's node id.
    #[prost(string, tag = "2")]
    pub node: String,
    /// The VM's id, random per VM.
    #[prost(string, tag = "3")]
    pub vm: String,
    /// The stamp of the table the VM enforces (epoch, then revision).
    #[prost(bytes = "vec", tag = "4")]
    pub at: Vec<u8>,
    /// The VMs of this Envoy that the filter has seen open a stream (0: not
    /// said): fewer streams than that, and the node is not on the channel.
    #[prost(uint32, tag = "5")]
    pub vms: u32,
}

/// `apitokens.v1.DeltaResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeltaResponse {
    /// Applies to a table at or after this stamp.
    #[prost(bytes = "bytes", tag = "1")]
    pub from: Bytes,
    /// The table's stamp after it; empty: more chunks of the step follow.
    #[prost(bytes = "bytes", tag = "2")]
    pub to: Bytes,
    /// Change records (`apitokens_core::delta::encode_change`).
    #[prost(bytes = "bytes", tag = "3")]
    pub changes: Bytes,
    /// No history reaches the VM's table: it waits for a snapshot.
    #[prost(bool, tag = "4")]
    pub snapshot_needed: bool,
    /// The step changes or removes a token that existed before it: a VM
    /// raises its Envoy's position only for these (see `src/delta.rs`).
    #[prost(bool, tag = "5")]
    pub revokes: bool,
}

/// The largest request decoded: a subscription is about 100 bytes.
pub const MAX_REQUEST_BYTES: usize = 1024;
/// The most of a VM id taken.
const MAX_VM_ID: usize = 64;
/// How long a stream may stay without its subscription.
const FIRST_REQUEST: Duration = Duration::from_secs(10);
/// After a failed read of the store's change log: the next try.
const RETRY: Duration = Duration::from_secs(1);

fn stamp(position: Position) -> Bytes {
    Bytes::copy_from_slice(&position.stamp().to_bytes())
}

/// A 16-byte stamp as a store position.
fn position(bytes: &[u8]) -> Option<Position> {
    if bytes.len() != 16 {
        return None;
    }
    let s = Stamp::from_bytes(bytes)?;
    Some(Position::new(Epoch(s.epoch), Revision(s.generation)))
}

/// The delta service on the xDS server.
#[derive(Clone)]
pub struct DeltaServer {
    shared: Arc<Shared>,
}

struct Shared {
    publisher: Arc<Publisher>,
    acks: Arc<Tracker>,
    shutdown: watch::Receiver<bool>,
    identities: Identities,
    counters: PushCounters,
}

impl DeltaServer {
    /// Streams end when `shutdown` changes (this serving of the xDS port ends).
    pub fn new(
        publisher: Arc<Publisher>,
        acks: Arc<Tracker>,
        shutdown: watch::Receiver<bool>,
        identities: Identities,
        counters: PushCounters,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                publisher,
                acks,
                shutdown,
                identities,
                counters,
            }),
        }
    }
}

struct Subscribe {
    shared: Arc<Shared>,
    peer: String,
}

impl StreamingService<DeltaRequest> for Subscribe {
    type Response = DeltaResponse;
    type ResponseStream = ReceiverStream<Result<DeltaResponse, Status>>;
    type Future = BoxFuture<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<DeltaRequest>>) -> Self::Future {
        let (tx, rx) = mpsc::channel(4);
        let shared = Arc::clone(&self.shared);
        let peer = self.peer.clone();
        // Every event of the stream is logged in its span: the peer, then
        // the stream's number, node and VM once it subscribed.
        let span = tracing::info_span!(
            "delta_stream",
            peer = %peer,
            stream = tracing::field::Empty,
            node = tracing::field::Empty,
            vm = tracing::field::Empty
        );
        tokio::spawn(serve_stream(shared, peer, request.into_inner(), tx).instrument(span));
        Box::pin(async move { Ok(Response::new(ReceiverStream::new(rx))) })
    }
}

impl Route for DeltaServer {
    const SERVICE: &'static str = SERVICE;

    fn route(&mut self, method: Option<&str>, req: http::Request<Body>) -> Answer {
        if let Err(status) = self.shared.identities.check(req.extensions()) {
            return refuse(status);
        }
        if method != Some(METHOD) {
            return refuse(Status::unimplemented("no such method"));
        }
        let subscribe = Subscribe {
            shared: Arc::clone(&self.shared),
            peer: peer_of(req.extensions()).map_or_else(|| "-".to_owned(), |a| a.to_string()),
        };
        Box::pin(async move {
            let mut grpc = Grpc::new(tonic_prost::ProstCodec::<DeltaResponse, DeltaRequest>::default())
                .apply_max_message_size_config(Some(MAX_REQUEST_BYTES), Some(MAX_RESPONSE_BYTES));
            Ok(grpc.streaming(subscribe, req).await)
        })
    }
}

/// A subscription, checked.
#[derive(Debug, PartialEq, Eq)]
struct Subscription {
    node: String,
    vm: String,
    at: Position,
    vms: u32,
}

fn check_lineage(req: &DeltaRequest, lineage: &[u8]) -> Result<(), Status> {
    if req.lineage != lineage {
        return Err(Status::failed_precondition(
            "this VM's table comes from another token store (lineage): this control plane does not serve it",
        ));
    }
    Ok(())
}

fn subscription(req: DeltaRequest, lineage: &[u8]) -> Result<Subscription, Status> {
    check_lineage(&req, lineage)?;
    if req.node.is_empty() || req.node.len() > MAX_NAME {
        return Err(Status::invalid_argument(format!(
            "the subscription must name the Envoy's node (1 to {MAX_NAME} bytes)"
        )));
    }
    if req.vm.is_empty() || req.vm.len() > MAX_VM_ID || !req.vm.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Status::invalid_argument(format!(
            "the subscription must name the VM (1 to {MAX_VM_ID} visible ASCII characters)"
        )));
    }
    let at = position(&req.at).ok_or_else(|| Status::invalid_argument("`at` must be a 16-byte stamp"))?;
    Ok(Subscription {
        node: req.node,
        vm: req.vm,
        at,
        vms: req.vms,
    })
}

/// Whether an error reading the stream is the client's doing (a request too
/// large or malformed) rather than the stream ending.
fn refused(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Internal | Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
    )
}

async fn serve_stream(
    shared: Arc<Shared>,
    peer: String,
    mut inbound: Streaming<DeltaRequest>,
    tx: mpsc::Sender<Result<DeltaResponse, Status>>,
) {
    let lineage = shared.publisher.lineage();
    let first = tokio::time::timeout(FIRST_REQUEST, inbound.message()).await;
    let sub = match first {
        Ok(Ok(Some(req))) => subscription(req, &lineage),
        Ok(Ok(None)) => return,
        Ok(Err(status)) => Err(status),
        Err(_) => Err(Status::deadline_exceeded("no subscription in time")),
    };
    let sub = match sub {
        Ok(sub) => sub,
        Err(status) => {
            tracing::warn!(peer, code = ?status.code(), "delta: refused a subscription from {peer}: {}", status.message());
            let _ = tx.send(Err(status)).await;
            return;
        }
    };
    let id = shared.acks.vm_connected(&sub.node, &sub.vm, &peer, sub.at);
    shared.acks.vm_counted(id, sub.vms);
    let span = tracing::Span::current();
    span.record("stream", id.0);
    span.record("node", tracing::field::debug(&sub.node));
    span.record("vm", tracing::field::debug(&sub.vm));
    tracing::info!(
        // Debug-escaped: the client chose them.
        node = ?sub.node,
        vm = ?sub.vm,
        peer,
        stream = id.0,
        revision = sub.at.revision.0,
        "delta: VM {:?} of {:?} ({peer}) subscribed as stream {} at revision {} of epoch {}",
        sub.vm,
        sub.node,
        id.0,
        sub.at.revision,
        sub.at.epoch
    );
    let mut stream = VmStream {
        shared: Arc::clone(&shared),
        id,
        tx,
        sent: sub.at,
        responded: false,
        held: false,
    };
    if let Err(status) = stream.run(&mut inbound, &lineage).await {
        tracing::warn!(
            stream = id.0,
            peer,
            "delta: closing stream {}: {}",
            id.0,
            status.message()
        );
        let _ = stream.tx.send(Err(status)).await;
    }
    tracing::info!(stream = id.0, peer, "delta: stream {} ({peer}) ended", id.0);
    shared.acks.vm_disconnected(id);
}

/// What the stream does after sending what it could.
enum Next {
    /// Wait for the next publication or request.
    Wait,
    /// Try again after [`RETRY`] (the store could not be read).
    Retry,
    /// The stream is over (the VM needs a snapshot, or went away).
    End,
}

struct VmStream {
    shared: Arc<Shared>,
    id: StreamId,
    tx: mpsc::Sender<Result<DeltaResponse, Status>>,
    /// Where the VM's table is once it applied what was sent.
    sent: Position,
    /// Something was sent (the VM knows it is live).
    responded: bool,
    /// Its table is ahead of this process's: nothing sent yet.
    held: bool,
}

impl VmStream {
    async fn run(&mut self, inbound: &mut Streaming<DeltaRequest>, lineage: &[u8]) -> Result<(), Status> {
        let mut published = self.shared.publisher.subscribe();
        let mut shutdown = self.shared.shutdown.clone();
        loop {
            published.borrow_and_update();
            let retry = match self.advance().await {
                Next::Wait => None,
                Next::Retry => Some(tokio::time::Instant::now() + RETRY),
                Next::End => return Ok(()),
            };
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => self.acknowledged(&req, lineage)?,
                    Ok(None) => return Ok(()),
                    Err(status) if refused(&status) => return Err(status),
                    Err(status) => {
                        tracing::debug!(stream = self.id.0, "delta: stream {} ended: {}", self.id.0, status.message());
                        return Ok(());
                    }
                },
                changed = published.changed() => if changed.is_err() {
                    return Ok(());
                },
                () = async {
                    match retry {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = shutdown.changed() => return Ok(()),
                () = self.tx.closed() => return Ok(()),
            }
        }
    }

    /// A later request: the table the VM now enforces.
    fn acknowledged(&self, req: &DeltaRequest, lineage: &[u8]) -> Result<(), Status> {
        check_lineage(req, lineage)?;
        let at = position(&req.at).ok_or_else(|| Status::invalid_argument("`at` must be a 16-byte stamp"))?;
        tracing::debug!(
            stream = self.id.0,
            revision = at.revision.0,
            "delta: stream {} enforces revision {} of epoch {}",
            self.id.0,
            at.revision,
            at.epoch
        );
        self.shared.acks.vm_acked(self.id, at);
        self.shared.acks.vm_counted(self.id, req.vms);
        Ok(())
    }

    /// Sends whatever the VM lacks that is available now.
    async fn advance(&mut self) -> Next {
        loop {
            let step = match self.shared.publisher.delta_since(self.sent) {
                Reach::Live if self.responded => return Next::Wait,
                Reach::Live => Arc::new(self.empty_step(self.sent)),
                Reach::Elements(steps) => {
                    for step in steps {
                        if !self.send_step(&step).await {
                            return Next::End;
                        }
                    }
                    continue;
                }
                Reach::Unchanged { head } => Arc::new(self.empty_step(head)),
                Reach::Before => match self.shared.publisher.catch_up_from(self.sent).await {
                    Ok(CatchUp::Step(step)) => step,
                    Ok(CatchUp::Nothing) => return Next::Wait,
                    Ok(CatchUp::SnapshotNeeded) => return self.snapshot_needed().await,
                    Err(e) => {
                        tracing::warn!(
                            stream = self.id.0,
                            "delta: stream {}: cannot read the store's changes since revision {} (retrying): {e}",
                            self.id.0,
                            self.sent.revision
                        );
                        return Next::Retry;
                    }
                },
                Reach::Ahead => {
                    if !self.responded && !self.held {
                        self.hold();
                    }
                    return Next::Wait;
                }
                Reach::Gone => return self.snapshot_needed().await,
            };
            if !self.send_step(&step).await {
                return Next::End;
            }
        }
    }

    fn empty_step(&self, to: Position) -> Element {
        Element {
            from: self.sent,
            to,
            chunks: Vec::new(),
            revokes: false,
        }
    }

    /// The VM enforces a table this process has not published: nothing is
    /// sent until it has (see `push::sotw` on held streams).
    fn hold(&mut self) {
        self.held = true;
        let current = self.shared.publisher.state();
        tracing::warn!(
            stream = self.id.0,
            "delta: stream {} enforces revision {} of epoch {}, newer than this control plane's {} of epoch {}: \
             nothing is sent to it until this control plane has caught up",
            self.id.0,
            self.sent.revision,
            self.sent.epoch,
            current.revision,
            current.epoch
        );
        self.shared.acks.vm_held(self.id, true);
        // A fresh look at the store: this replica may only lag behind
        // another; if the store itself is behind, writes stop.
        let publisher = Arc::clone(&self.shared.publisher);
        let seen = self.sent;
        tokio::spawn(async move { publisher.reported(seen).await });
    }

    /// Sends one step, chunked; false if the stream is gone.
    async fn send_step(&mut self, step: &Element) -> bool {
        if self.held {
            self.held = false;
            tracing::info!(
                stream = self.id.0,
                "delta: stream {} released: this control plane reached its table",
                self.id.0
            );
            self.shared.acks.vm_held(self.id, false);
        }
        let from = stamp(step.from);
        let count = step.chunks.len().max(1);
        for n in 0..count {
            let last = n + 1 == count;
            if last {
                // Patience counts from here (`crate::acks`).
                self.shared.acks.vm_sent(self.id, step.to);
            }
            let response = DeltaResponse {
                from: from.clone(),
                to: if last { stamp(step.to) } else { Bytes::new() },
                changes: step.chunks.get(n).cloned().unwrap_or_default(),
                snapshot_needed: false,
                revokes: step.revokes,
            };
            if !self.send(response).await {
                return false;
            }
        }
        self.sent = self.sent.max(step.to);
        self.responded = true;
        true
    }

    /// Tells the VM to wait for a snapshot, and has its Envoy sent one.
    async fn snapshot_needed(&mut self) -> Next {
        let current = self.shared.publisher.state();
        tracing::info!(
            stream = self.id.0,
            "delta: stream {}: no history reaches revision {} of epoch {} (this control plane is at {} of epoch {}): \
             the VM waits for a snapshot, sent by ECDS at once",
            self.id.0,
            self.sent.revision,
            self.sent.epoch,
            current.revision,
            current.epoch
        );
        self.shared.acks.vm_snapshot_needed(self.id);
        let response = DeltaResponse {
            from: stamp(self.sent),
            to: Bytes::new(),
            changes: Bytes::new(),
            snapshot_needed: true,
            revokes: false,
        };
        self.send(response).await;
        Next::End
    }

    async fn send(&self, response: DeltaResponse) -> bool {
        // The 5-byte gRPC message prefix and the message.
        let bytes = 5 + response.encoded_len() as u64;
        let mut shutdown = self.shared.shutdown.clone();
        // A VM that does not read fills the channel: the send waits, but
        // not past the end of this serving.
        let sent = tokio::select! {
            sent = self.tx.send(Ok(response)) => sent.is_ok(),
            _ = shutdown.changed() => false,
        };
        if sent {
            self.shared.counters.delta_responses.inc();
            self.shared.counters.delta_bytes.inc_by(bytes);
        }
        sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_encoding_decodes_and_ours_reads_back() {
        let at = Stamp {
            epoch: 3,
            generation: 41,
        };
        let bytes = apitokens_core::delta::request(b"0123456789abcdef", b"node-1", b"ab12", at, 5);
        let req = DeltaRequest::decode(bytes.as_slice()).unwrap();
        let sub = subscription(req.clone(), b"0123456789abcdef").unwrap();
        assert_eq!(
            sub,
            Subscription {
                node: "node-1".into(),
                vm: "ab12".into(),
                at: Position::new(Epoch(3), Revision(41)),
                vms: 5,
            }
        );
        // Another store's table: refused, not tracked.
        let other = subscription(req.clone(), b"fedcba9876543210").unwrap_err();
        assert_eq!(other.code(), Code::FailedPrecondition);
        // No node, no VM, a short stamp.
        for bad in [
            DeltaRequest {
                node: String::new(),
                ..req.clone()
            },
            DeltaRequest {
                vm: "a b".into(),
                ..req.clone()
            },
            DeltaRequest {
                at: vec![0; 15],
                ..req.clone()
            },
        ] {
            assert_eq!(
                subscription(bad, b"0123456789abcdef").unwrap_err().code(),
                Code::InvalidArgument
            );
        }
        // A response as the filter reads it.
        let response = DeltaResponse {
            from: stamp(Position::new(Epoch(3), Revision(41))),
            to: Bytes::new(),
            changes: Bytes::from_static(b"xyz"),
            snapshot_needed: false,
            revokes: true,
        };
        let bytes = response.encode_to_vec();
        let read = apitokens_core::delta::parse_response(&bytes).unwrap();
        assert_eq!((read.from, read.to, read.changes), (at, None, &b"xyz"[..]));
        let done = DeltaResponse {
            to: stamp(Position::new(Epoch(3), Revision(42))),
            snapshot_needed: true,
            ..response
        };
        let bytes = done.encode_to_vec();
        let read = apitokens_core::delta::parse_response(&bytes).unwrap();
        assert_eq!(read.to.map(|t| t.generation), Some(42));
        assert!(read.snapshot_needed);
    }

    use crate::store::contract::{record, test_event};
    use crate::store::TokenRecord;
    use crate::testutil::{grpc_client, serve_grpc, Core};
    use apitokens_core::delta::decode_changes;
    use apitokens_core::table::{Digest, Overlay, TokenTable};
    use apitokens_core::Role;
    use std::net::SocketAddr;
    use std::time::Instant;

    fn token(name: &str, n: u8) -> TokenRecord {
        record(name, Role::Viewer, n)
    }

    struct Plane {
        core: Core,
        counters: PushCounters,
        addr: SocketAddr,
        _stop: watch::Sender<bool>,
    }

    /// The plane's store, publisher and tracker are its core's.
    impl std::ops::Deref for Plane {
        type Target = Core;

        fn deref(&self) -> &Core {
            &self.core
        }
    }

    impl Plane {
        async fn start(tag: &str) -> Self {
            let core = Core::open(tag).await;
            let counters = PushCounters::default();
            let (stop, stopped) = watch::channel(false);
            let server = DeltaServer::new(
                Arc::clone(&core.publisher),
                Arc::clone(&core.acks),
                stopped,
                Identities::new(vec![]),
                counters.clone(),
            );
            let addr = serve_grpc(server).await;
            Self {
                core,
                counters,
                addr,
                _stop: stop,
            }
        }

        async fn write(&self, records: Vec<TokenRecord>) -> Position {
            let r = self.store.insert(records, None, vec![]).await.unwrap();
            self.published(r).await
        }

        async fn published(&self, r: Revision) -> Position {
            let deadline = Instant::now() + Duration::from_secs(5);
            let snapshot = self.publisher.publish(r, deadline).await.unwrap();
            Position::new(snapshot.version.epoch, r)
        }

        /// The table a VM gets by ECDS now.
        async fn table(&self) -> TokenTable {
            let encoded = self.publisher.encoded().await;
            apitokens_core::Config::from_plugin_configuration(encoded.payload.to_vec())
                .unwrap()
                .tokens()
                .clone()
        }

        fn request(&self, vm: &str, at: Position) -> DeltaRequest {
            DeltaRequest {
                lineage: self.publisher.lineage().to_vec(),
                node: "gw-1".into(),
                vm: vm.into(),
                at: at.stamp().to_bytes().to_vec(),
                vms: 0,
            }
        }

        async fn subscribe(&self, first: DeltaRequest) -> Result<Vm, Status> {
            let mut grpc = grpc_client(self.addr).await;
            let (tx, rx) = mpsc::channel(4);
            tx.send(first).await.unwrap();
            let path = http::uri::PathAndQuery::from_static("/apitokens.v1.Delta/Subscribe");
            let codec = tonic_prost::ProstCodec::<DeltaRequest, DeltaResponse>::default();
            let response = grpc
                .streaming(Request::new(ReceiverStream::new(rx)), path, codec)
                .await?;
            Ok(Vm {
                tx,
                inbound: response.into_inner(),
            })
        }
    }

    struct Vm {
        tx: mpsc::Sender<DeltaRequest>,
        inbound: Streaming<DeltaResponse>,
    }

    impl Vm {
        async fn next(&mut self) -> Result<Option<DeltaResponse>, Status> {
            tokio::time::timeout(Duration::from_secs(5), self.inbound.message())
                .await
                .expect("a response in time")
        }

        /// The responses up to and including the next one with a `to`.
        async fn step(&mut self) -> Vec<DeltaResponse> {
            let mut chunks = Vec::new();
            loop {
                let response = self.next().await.unwrap().expect("a response");
                let done = !response.to.is_empty();
                chunks.push(response);
                if done {
                    return chunks;
                }
            }
        }
    }

    fn apply(overlay: &mut Overlay, step: &[DeltaResponse]) -> Position {
        let to = position(&step.last().unwrap().to).unwrap();
        for response in step {
            overlay.apply(to.stamp(), &decode_changes(&response.changes).unwrap());
        }
        to
    }

    fn lookups(table: &TokenTable, overlay: &Overlay) -> Vec<Option<String>> {
        (0..8u8)
            .map(|n| overlay.get(table, &Digest([n; 32])).map(|t| t.name().to_owned()))
            .collect()
    }

    async fn until(what: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !what() {
            assert!(Instant::now() < deadline, "not in time");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_vm_is_sent_what_it_lacks_then_every_change_and_its_acks_count() {
        let cp = Plane::start("delta-stream").await;
        let p1 = cp.write(vec![token("namespaces/a/apitokens/t0", 0)]).await;
        let old = cp.table().await;
        cp.write(vec![token("namespaces/a/apitokens/t1", 1)]).await;
        let r = cp
            .store
            .delete("namespaces/a/apitokens/t0", test_event())
            .await
            .unwrap()
            .unwrap();
        let p3 = cp.published(r).await;
        // Subscribed at p1: the two later steps, in order.
        let mut vm = cp.subscribe(cp.request("ab12", p1)).await.unwrap();
        let mut overlay = Overlay::default();
        let first = vm.step().await;
        assert_eq!(position(&first[0].from), Some(p1));
        let mid = apply(&mut overlay, &first);
        assert!(mid > p1 && mid < p3);
        assert_eq!(apply(&mut overlay, &vm.step().await), p3);
        assert_eq!(lookups(&old, &overlay), lookups(&cp.table().await, &Overlay::default()));
        // Tracked: sent p3, enforcing p1 until it says otherwise.
        until(|| cp.acks.vms().first().and_then(|v| v.sent_revision.clone()) == Some(p3.revision.to_string())).await;
        assert!(!cp.acks.rollout(p3).complete());
        vm.tx.send(cp.request("ab12", p3)).await.unwrap();
        until(|| cp.acks.rollout(p3).complete()).await;
        // A write while subscribed: its step at once.
        let p4 = cp.write(vec![token("namespaces/a/apitokens/t2", 2)]).await;
        assert!(!cp.acks.rollout(p4).complete(), "the write waits for the VM");
        let step = vm.step().await;
        assert_eq!(step.len(), 1);
        assert_eq!((position(&step[0].from), position(&step[0].to)), (Some(p3), Some(p4)));
        assert_eq!(decode_changes(&step[0].changes).unwrap().len(), 1);
        // A VM at the head: one empty response, so that it knows it is live.
        let mut live = cp.subscribe(cp.request("cd34", p4)).await.unwrap();
        let hello = live.step().await;
        assert_eq!((position(&hello[0].from), position(&hello[0].to)), (Some(p4), Some(p4)));
        assert!(hello[0].changes.is_empty() && !hello[0].snapshot_needed);
        assert_eq!(cp.acks.delta_streams(), 2);
        assert!(cp.counters.delta_responses.get() >= 4);
        assert!(cp.counters.delta_bytes.get() > 0);
        // A VM going away is no longer tracked.
        drop(live);
        until(|| cp.acks.delta_streams() == 1).await;
    }

    #[tokio::test]
    async fn bad_requests_end_the_stream_and_are_not_tracked() {
        let cp = Plane::start("delta-bad").await;
        let head = cp.write(vec![token("namespaces/a/apitokens/t0", 0)]).await;
        // Another store's table.
        let other = DeltaRequest {
            lineage: vec![7; 16],
            ..cp.request("ab12", head)
        };
        let refused = match cp.subscribe(other).await {
            Err(status) => status,
            Ok(mut vm) => vm.next().await.unwrap_err(),
        };
        assert_eq!(refused.code(), Code::FailedPrecondition);
        assert_eq!(cp.acks.delta_streams(), 0);
        // A request over 1 KiB after the subscription.
        let mut vm = cp.subscribe(cp.request("ab12", head)).await.unwrap();
        vm.step().await;
        let big = DeltaRequest {
            node: "n".repeat(2000),
            ..cp.request("ab12", head)
        };
        vm.tx.send(big).await.unwrap();
        assert!(vm.next().await.is_err(), "the stream ends with an error");
        until(|| cp.acks.delta_streams() == 0).await;
    }

    #[tokio::test]
    async fn a_vm_no_history_reaches_is_told_to_wait_for_a_snapshot() {
        let cp = Plane::start("delta-snapshot").await;
        let head = cp.write(vec![token("namespaces/a/apitokens/t0", 0)]).await;
        // A table of an earlier epoch.
        let earlier = Position::new(Epoch(head.epoch.0 - 1), Revision(head.revision.0 + 50));
        let mut vm = cp.subscribe(cp.request("ab12", earlier)).await.unwrap();
        let response = vm.next().await.unwrap().unwrap();
        assert!(response.snapshot_needed);
        assert_eq!(position(&response.from), Some(earlier));
        assert!(vm.next().await.unwrap().is_none(), "then the stream ends");
        // Its Envoy's snapshots go out at once.
        until(|| cp.acks.delta_streams() == 0).await;
        assert!(!cp.acks.defers_snapshots("gw-1"));
        assert!(cp.acks.vms()[0].awaiting_snapshot);
    }

    #[tokio::test]
    async fn a_vm_ahead_of_this_control_plane_is_held_and_stops_writes_if_the_store_is_behind() {
        let cp = Plane::start("delta-ahead").await;
        let head = cp.write(vec![token("namespaces/a/apitokens/t0", 0)]).await;
        let ahead = Position::new(head.epoch, Revision(head.revision.0 + 3));
        let mut vm = cp.subscribe(cp.request("ab12", ahead)).await.unwrap();
        until(|| cp.acks.vms().first().is_some_and(|v| v.held)).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(200), vm.inbound.message())
                .await
                .is_err(),
            "nothing older is sent"
        );
        // The store never reached it: it went back in time.
        until(|| cp.publisher.state().behind == Some(ahead)).await;
    }
}
