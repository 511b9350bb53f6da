//! The filter's end of the delta channel (`apitokens_core::delta`): each VM
//! keeps, per lineage (plugin name and token store), a [`Channel`]: the
//! changes received since its ECDS snapshot (an `Overlay` requests look
//! tokens up in) and its gRPC stream to the control plane.
//!
//! - A root context opens the stream on its tick (never in `on_configure`:
//!   Envoy's validation VM configures once and is thrown away), through the
//!   cluster it reports usage to, and subscribes from the table it enforces.
//!   The stream belongs to that root context: Envoy resets it when the root
//!   goes, and the next tick of another root context opens a new one.
//! - A response is validated whole (every chunk of a catch-up) before any of
//!   it is applied; anything wrong ends the stream and leaves the table as
//!   it was. After applying, the VM raises its Envoy's shared position and
//!   then acknowledges (says the stamp it now enforces).
//! - Until its stream has delivered its first response, a VM refuses
//!   requests while the shared position is ahead of its own table
//!   (`Denial::CatchingUp`, 503): a VM that starts, or whose stream broke,
//!   never admits a token another VM of its Envoy already refuses. A
//!   control plane that is down costs nothing beyond that: VMs keep
//!   enforcing their last table, and one shared-data read per request while
//!   not live.

use crate::abi::{self, Level};
use crate::floor::{self, Kind};
use crate::pairs;
use apitokens_core::compact::Stamp;
use apitokens_core::delta::{self, MAX_RESPONSE_BYTES, METHOD, SERVICE};
use apitokens_core::table::Overlay;
use apitokens_core::usage;
use apitokens_core::usage::Use;
use std::cell::{Ref, RefCell};
use std::collections::hash_map::RandomState;
use std::fmt::Write as _;
use std::hash::BuildHasher;
use std::rc::Rc;

/// Wait before opening a stream again after one ended: short, since a VM
/// whose siblings caught up first refuses requests until it has too (a
/// control plane that is down costs a failed connection per VM this often).
const RETRY_MS: u64 = 200;
/// The most a catch-up may hold in chunks not yet applied; beyond it the
/// VM waits for a snapshot instead.
const MAX_PENDING_BYTES: usize = 64 << 20;

/// What one VM knows of one lineage's changes.
pub struct Channel {
    overlay: RefCell<Overlay>,
    state: RefCell<State>,
}

struct State {
    /// The plugin name and the store's lineage (the shared-data key).
    key: Vec<u8>,
    /// The store's lineage (16 bytes), as the control plane knows it.
    lineage: Vec<u8>,
    /// The serialized `GrpcService` of the control plane's cluster.
    upstream: Vec<u8>,
    /// The table this VM enforces: its snapshot with the changes applied.
    at: Stamp,
    stream: Option<Open>,
    retry_at_ms: u64,
    /// The control plane has no history back to `at`: no stream until a
    /// newer snapshot arrives.
    awaiting_snapshot: bool,
    /// `at` moved without the control plane being told (a snapshot).
    ack_due: bool,
    /// Chunks of a catch-up, validated, applied with its last one.
    pending: Vec<Vec<u8>>,
    /// One of those chunks said its step revokes something.
    pending_revokes: bool,
}

struct Open {
    root: u32,
    token: u32,
    /// The stream delivered its first response: writes wait for this VM.
    live: bool,
}

thread_local! {
    static CHANNELS: RefCell<Vec<Rc<Channel>>> = const { RefCell::new(Vec::new()) };
    /// This VM's id, random, for the control plane's bookkeeping.
    static VM: RefCell<String> = const { RefCell::new(String::new()) };
}

fn log(level: Level, message: std::fmt::Arguments<'_>) {
    let mut line = String::with_capacity(96);
    if line.write_fmt(message).is_ok() {
        let _ = abi::log(level, &line);
    }
}

fn vm_id() -> String {
    VM.with(|vm| {
        let mut vm = vm.borrow_mut();
        if vm.is_empty() {
            // WASI's random_get seeds RandomState.
            let n = RandomState::new().hash_one(abi::now_nanos().unwrap_or(0));
            let _ = write!(vm, "{n:016x}");
        }
        vm.clone()
    })
}

/// The channel of `key` in this VM, created with `at` as its table.
pub fn channel(key: &[u8], lineage: &[u8], cluster: &str, at: Stamp) -> Rc<Channel> {
    CHANNELS.with(|c| {
        let mut channels = c.borrow_mut();
        if let Some(found) = channels.iter().find(|ch| ch.state.borrow().key == key) {
            return Rc::clone(found);
        }
        let channel = Rc::new(Channel {
            overlay: RefCell::new(Overlay::default()),
            state: RefCell::new(State {
                key: key.to_vec(),
                lineage: lineage.to_vec(),
                upstream: usage::grpc_service(cluster),
                at,
                stream: None,
                retry_at_ms: 0,
                awaiting_snapshot: false,
                ack_due: false,
                pending: Vec::new(),
                pending_revokes: false,
            }),
        });
        channels.push(Rc::clone(&channel));
        channel
    })
}

impl Channel {
    /// What requests look tokens up in over the snapshot's table.
    pub fn overlay(&self) -> Ref<'_, Overlay> {
        self.overlay.borrow()
    }

    /// Whether the stream delivered its first response (see [`Open::live`]).
    pub fn live(&self) -> bool {
        self.state.borrow().stream.as_ref().is_some_and(|s| s.live)
    }

    /// The table this VM enforces.
    pub fn at(&self) -> Stamp {
        self.state.borrow().at
    }

    /// A snapshot at `stamp` replaced the table: the overlay keeps only
    /// later changes; the marks of what it drops go to `used`.
    pub fn rebased(&self, stamp: Stamp, used: &mut Vec<Use>) {
        self.overlay.borrow_mut().rebase(stamp, used);
        let mut state = self.state.borrow_mut();
        if stamp > state.at {
            state.at = stamp;
            state.ack_due = true;
            state.awaiting_snapshot = false;
        }
    }

    /// Whether requests must wait (see the module comment).
    pub fn catching_up(&self) -> bool {
        let state = self.state.borrow();
        if state.stream.as_ref().is_some_and(|s| s.live) {
            return false;
        }
        floor::get(Kind::Position, &state.key).is_some_and(|newest| newest > state.at)
    }

    pub fn drain_used(&self, into: &mut Vec<Use>) {
        self.overlay.borrow().drain_used(into);
    }

    fn request(&self) -> Vec<u8> {
        let state = self.state.borrow();
        // Envoy's `xds.node` attribute: the bootstrap's Node, its `id`.
        let node = abi::property("xds\0node\0id").ok().flatten().unwrap_or_default();
        let vm = vm_id();
        let vms = floor::register_vm(&state.key, vm.as_bytes());
        delta::request(&state.lineage, &node, vm.as_bytes(), state.at, vms)
    }

    /// Opens the stream if there is none (through `root`), or sends a due
    /// acknowledgement on it if `root` owns it.
    pub fn tick(&self, root: u32, now_ms: u64) {
        let (open, owned, due) = {
            let state = self.state.borrow();
            let owned = state.stream.as_ref().filter(|s| s.root == root).map(|s| s.token);
            (
                state.stream.is_none() && !state.awaiting_snapshot && now_ms >= state.retry_at_ms,
                owned,
                state.ack_due,
            )
        };
        if open {
            self.open(root, now_ms);
        } else if let (Some(token), true) = (owned, due) {
            self.acknowledge(token);
        }
    }

    fn open(&self, root: u32, now_ms: u64) {
        let upstream = self.state.borrow().upstream.clone();
        let token = match abi::grpc_stream(&upstream, SERVICE, METHOD, &pairs::serialize(&[])) {
            Ok(token) => token,
            Err(abi::Failed(status)) => {
                self.state.borrow_mut().retry_at_ms = now_ms + RETRY_MS;
                log(
                    Level::Warn,
                    format_args!("apitokens: cannot open the delta stream (status {status})"),
                );
                return;
            }
        };
        let message = self.request();
        if abi::grpc_send(token, &message).is_err() {
            let _ = abi::grpc_cancel(token);
            self.state.borrow_mut().retry_at_ms = now_ms + RETRY_MS;
            return;
        }
        let mut state = self.state.borrow_mut();
        state.stream = Some(Open {
            root,
            token,
            live: false,
        });
        state.ack_due = false;
        state.pending.clear();
    }

    fn acknowledge(&self, token: u32) {
        let message = self.request();
        if abi::grpc_send(token, &message).is_ok() {
            self.state.borrow_mut().ack_due = false;
        }
    }

    /// Ends the stream (it misbehaved, or the VM must wait for a snapshot).
    fn end(&self, token: u32, why: std::fmt::Arguments<'_>) {
        log(Level::Warn, format_args!("apitokens: delta stream ended: {why}"));
        let _ = abi::grpc_cancel(token);
        self.closed();
    }

    fn closed(&self) {
        let mut state = self.state.borrow_mut();
        state.stream = None;
        state.pending.clear();
        state.pending_revokes = false;
        state.retry_at_ms = abi::now_nanos().unwrap_or(0) / 1_000_000 + RETRY_MS;
    }

    /// A response arrived on this channel's stream.
    fn received(&self, token: u32, size: usize) {
        if size > MAX_RESPONSE_BYTES {
            return self.end(
                token,
                format_args!("a response of {size} bytes (at most {MAX_RESPONSE_BYTES})"),
            );
        }
        let Ok(bytes) = abi::grpc_message(size) else {
            return self.end(token, format_args!("the response could not be read"));
        };
        let response = match delta::parse_response(&bytes) {
            Ok(response) => response,
            Err(e) => return self.end(token, format_args!("{e}")),
        };
        let at = self.at();
        if response.snapshot_needed {
            self.state.borrow_mut().awaiting_snapshot = true;
            return self.end(
                token,
                format_args!("the control plane has no history back to this table: waiting for a snapshot"),
            );
        }
        if response.from > at {
            return self.end(token, format_args!("a response from a later table than this VM's"));
        }
        // Validated now, applied with the last chunk.
        if let Err(e) = delta::decode_changes(response.changes) {
            return self.end(token, format_args!("{e}"));
        }
        let pending: usize = self.state.borrow().pending.iter().map(Vec::len).sum();
        if pending + bytes.len() > MAX_PENDING_BYTES {
            self.state.borrow_mut().awaiting_snapshot = true;
            return self.end(token, format_args!("a catch-up larger than {MAX_PENDING_BYTES} bytes"));
        }
        let Some(to) = response.to else {
            let mut state = self.state.borrow_mut();
            state.pending_revokes |= response.revokes;
            state.pending.push(bytes);
            return;
        };
        let (chunks, revokes) = {
            let mut state = self.state.borrow_mut();
            let revokes = std::mem::take(&mut state.pending_revokes) | response.revokes;
            (std::mem::take(&mut state.pending), revokes)
        };
        // Changes older than the table (a snapshot overtook them) would
        // take tokens back in time: only later ones apply.
        if to > at {
            let mut overlay = self.overlay.borrow_mut();
            for chunk in chunks.iter().chain(std::iter::once(&bytes)) {
                let changes = delta::parse_response(chunk).and_then(|r| delta::decode_changes(r.changes));
                if let Ok(changes) = changes {
                    overlay.apply(to, &changes);
                }
            }
        }
        let key = {
            let mut state = self.state.borrow_mut();
            state.at = state.at.max(to);
            if let Some(open) = state.stream.as_mut() {
                open.live = true;
            }
            state.key.clone()
        };
        // Every VM of this Envoy refuses what this one refuses from now on,
        // or waits (`catching_up`); then the control plane may count it.
        // Creations alone do not raise it: a VM that lacks one refuses
        // nothing its siblings admit.
        if revokes && to > at {
            floor::raise(Kind::Position, &key, self.at());
        }
        self.acknowledge(token);
    }
}

fn by_token(token: u32) -> Option<Rc<Channel>> {
    CHANNELS.with(|c| {
        c.borrow()
            .iter()
            .find(|ch| ch.state.borrow().stream.as_ref().is_some_and(|s| s.token == token))
            .cloned()
    })
}

/// A gRPC message for `token`: whether it was a delta stream's.
pub fn receive(token: u32, size: usize) -> bool {
    match by_token(token) {
        Some(channel) => {
            channel.received(token, size);
            true
        }
        None => false,
    }
}

/// A gRPC stream or call ended: whether it was a delta stream.
pub fn close(token: u32, status: u32) -> bool {
    match by_token(token) {
        Some(channel) => {
            log(
                Level::Info,
                format_args!("apitokens: delta stream closed (gRPC status {status}); reopening"),
            );
            channel.closed();
            true
        }
        None => false,
    }
}

/// A root context is gone, and with it the streams it owned.
pub fn root_gone(root: u32) {
    CHANNELS.with(|c| {
        for channel in c.borrow().iter() {
            let mut state = channel.state.borrow_mut();
            if state.stream.as_ref().is_some_and(|s| s.root == root) {
                state.stream = None;
                state.pending.clear();
                state.retry_at_ms = 0;
            }
        }
    });
}
