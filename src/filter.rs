//! The proxy-wasm exports, written by hand rather than through the SDK's
//! dispatcher: Envoy (proxy-wasm-cpp-host) skips callbacks a module does not
//! export, so a request costs three calls into the VM (context create,
//! request headers, delete) instead of the SDK's eight, the largest saving
//! available to a filter whose own work is a hash and a lookup.
//!
//! A VM may serve several plugin configurations (root contexts) at once, e.g.
//! when listeners share a `vm_config`: every HTTP context is tied to its root
//! context, and so to its configuration, at creation, and reads that
//! configuration when its request headers arrive.
//!
//! An update pushed by the control plane (the compact encoding) arrives as a
//! new root context with the same plugin name (the ECDS resource name) and
//! lineage (the control plane's token store) and supersedes the previous one: the previous table is dropped *before* the
//! new one is read, so a VM never holds two tables (wasm memory never shrinks,
//! so two at once would be the VM's size from then on), and requests of the
//! previous root context are decided by the newest configuration. JSON
//! configurations (static files, Istio) are never superseded this way: two
//! listeners may share a VM with different ones.
//!
//! No configuration moves an Envoy backwards (`compact::arrival`): one older
//! than the newest of its lineage that this VM enforces is not applied (the
//! new root context shares the newer table), and Envoy's validation VM (a
//! fresh VM that configures once) refuses it against the floor every VM of
//! this Envoy raises in shared data, so Envoy NACKs it. Only a fresh VM
//! consults the floor: a worker applies updates some moments after the main
//! thread (they are posted to it), so the floor is often ahead of it, and a
//! worker whose `on_configure` fails is left failed by Envoy. Envoy skips its
//! validation for exact bytes it validated before; the VMs that serve
//! requests then keep their newer table all the same.

use crate::abi::{self, Level};
use crate::delta::{self, Channel};
use crate::floor::{self, Kind};
use crate::pairs::{self, Pairs};
use crate::usage;
use apitokens_core::compact::{Arrival, Stamp};
use apitokens_core::denial::Counter;
use apitokens_core::gate::{self, Host, HostError, LogLevel, Verdict};
use apitokens_core::reply::Reply;
use apitokens_core::table::{Overlay, Token};
use apitokens_core::usage::{Marks, Seen, MAX_SEEN_PER_REPORT};
use apitokens_core::{compact, Access, Config, Timestamp};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;

/// Counters are kept in the VM and handed to Envoy once a second (a host call
/// per request saved); the log level is re-read at the same pace.
const TICK_MS: u32 = 1000;
/// The tick of a root context whose delta stream is not live: it opens the
/// stream, and a root context replaced every few hundred milliseconds (ECDS
/// pushing every write to an Envoy without live streams) must get to tick.
const FAST_TICK_MS: u32 = 50;

/// The tick period a root context with `active` wants.
fn tick_period(active: &Active) -> u32 {
    match &active.channel {
        Some(channel) if !channel.live() => FAST_TICK_MS,
        _ => TICK_MS,
    }
}

/// A configuration ready for requests: the validated rules and tokens plus
/// the local replies already serialized for the host, and which of its
/// tokens were used since the last usage report.
struct Active {
    config: Config,
    reply_headers: Vec<Vec<u8>>,
    /// The store the table came from (compact configurations), for reports.
    lineage: Vec<u8>,
    /// Set only when the configuration asks for usage reports.
    marks: Option<RefCell<Marks>>,
    /// Where tokens' first requests in the interval came from (with the
    /// marks).
    seen: RefCell<Vec<Seen>>,
    /// The delta channel's changes since this table (compact
    /// configurations reporting to a control plane).
    channel: Option<Rc<Channel>>,
}

impl Active {
    fn new(config: Config, lineage: &[u8], channel: Option<Rc<Channel>>) -> Self {
        let reply_headers = config
            .replies()
            .all()
            .iter()
            .map(|reply| {
                let pairs: Vec<(&str, &[u8])> = reply.headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
                pairs::serialize(&pairs)
            })
            .collect();
        let marks = config
            .usage_report()
            .map(|_| RefCell::new(Marks::new(config.tokens().len())));
        Self {
            config,
            reply_headers,
            lineage: lineage.to_vec(),
            marks,
            seen: RefCell::new(Vec::new()),
            channel,
        }
    }

    /// Hands the tokens marked since the last report to the reporter.
    fn report_marks(&self) {
        let (Some(marks), Some(report)) = (&self.marks, self.config.usage_report()) else {
            return;
        };
        let mut uses = Vec::new();
        if let Ok(mut marks) = marks.try_borrow_mut() {
            marks.drain(self.config.tokens(), &mut uses);
        }
        if let Some(channel) = &self.channel {
            channel.drain_used(&mut uses);
        }
        let seen = self
            .seen
            .try_borrow_mut()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        usage::queue((report.cluster.clone(), self.lineage.clone()), uses, seen);
    }
}

/// Context ids come from the host, not from clients: a multiplicative hash is
/// enough, and cheaper than SipHash on every request.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type ContextMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

/// A root context's configuration.
struct RootEntry {
    active: Rc<Active>,
    /// The plugin name and lineage when the configuration came in the
    /// compact encoding: a later compact configuration with the same ones
    /// supersedes it.
    lineage: Option<Vec<u8>>,
    /// Where `active`'s table stands in its store's history (compact only).
    stamp: Option<Stamp>,
    /// The tick period asked of the host for this root context.
    tick_ms: u32,
}

thread_local! {
    /// Root contexts: one per plugin configuration this VM serves.
    static ROOTS: RefCell<ContextMap<RootEntry>> = RefCell::new(ContextMap::default());
    /// HTTP context -> its root context.
    static STREAMS: RefCell<ContextMap<u32>> = RefCell::new(ContextMap::default());
    /// Counter ids, defined once per VM.
    static METRICS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// Increments not yet handed to the host.
    static PENDING: RefCell<[i64; Counter::ALL.len()]> = const { RefCell::new([0; Counter::ALL.len()]) };
    /// The host's log level as last read.
    static LOG_LEVEL: Cell<Level> = const { Cell::new(Level::Info) };
    /// `on_configure` ran in this VM before (see the module comment).
    static CONFIGURED: Cell<bool> = const { Cell::new(false) };
}

fn define_metrics() {
    METRICS.with(|m| {
        let mut m = m.borrow_mut();
        if m.is_empty() {
            *m = Counter::ALL
                .iter()
                .map(|c| abi::define_counter(c.name()).unwrap_or(u32::MAX))
                .collect();
        }
    });
}

fn flush_counters() {
    METRICS.with(|ids| {
        PENDING.with(|pending| {
            for (n, id) in pending.borrow_mut().iter_mut().zip(ids.borrow().iter()) {
                if *n != 0 && abi::increment(*id, *n).is_ok() {
                    *n = 0;
                }
            }
        });
    });
}

fn refresh_log_level() {
    if let Ok(level) = abi::log_level() {
        LOG_LEVEL.with(|l| l.set(level));
    }
}

fn log(level: Level, args: fmt::Arguments<'_>) {
    if level >= LOG_LEVEL.with(Cell::get) {
        let mut line = String::with_capacity(128);
        if line.write_fmt(args).is_ok() {
            let _ = abi::log(level, &line);
        }
    }
}

/// The VM's linear memory (it only grows): what the tokens cost a VM.
fn vm_memory_kib() -> usize {
    #[cfg(target_arch = "wasm32")]
    {
        core::arch::wasm32::memory_size(0) * 64
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        0
    }
}

fn deny_all() -> Rc<Active> {
    Rc::new(Active::new(Config::deny_all(), &[], None))
}

/// What a compact configuration supersedes: earlier compact configurations
/// with the same plugin name and the same lineage (the token store they were
/// built from), so that two control planes feeding one Envoy under the same
/// resource name never drop each other's tables.
fn lineage(head: &[u8]) -> Option<Vec<u8>> {
    if !compact::is_compact(head) {
        return None;
    }
    let mut key = abi::property("plugin_name").ok().flatten()?;
    key.push(0);
    key.extend_from_slice(compact::lineage(head).unwrap_or_default());
    Some(key)
}

/// The newest configuration of `lineage` this VM enforces (other than
/// `root`'s), with its stamp.
fn newest_here(lineage: &[u8], root: u32) -> Option<(Stamp, Rc<Active>)> {
    ROOTS.with(|r| {
        r.borrow()
            .iter()
            .filter(|(id, entry)| **id != root && entry.lineage.as_deref() == Some(lineage))
            .filter_map(|(_, entry)| Some((entry.stamp?, Rc::clone(&entry.active))))
            .max_by_key(|(stamp, _)| *stamp)
    })
}

fn configure(root: u32, size: usize) -> bool {
    let started = abi::now_nanos().unwrap_or(0);
    define_metrics();
    refresh_log_level();
    let head = abi::plugin_configuration(compact::STAMP_END).unwrap_or_default();
    let lineage = lineage(&head);
    let stamp = compact::stamp(&head);
    let fresh = !CONFIGURED.with(|c| c.replace(true));
    // Never backwards (see the module comment): decided before anything is
    // dropped or read.
    if let (Some(key), Some(incoming)) = (&lineage, stamp) {
        let here = newest_here(key, root);
        let floor = if fresh { floor::get(Kind::Snapshot, key) } else { None };
        match (compact::arrival(incoming, here.as_ref().map(|(s, _)| *s), floor), here) {
            (Arrival::KeepNewer, Some((kept, active))) => {
                log(
                    Level::Warn,
                    format_args!(
                        "configuration {} is older than {}, which this VM enforces: kept the newer one \
                         (a control plane serving an older copy of the token store?)",
                        At(incoming),
                        At(kept)
                    ),
                );
                insert_root(root, active, lineage, Some(kept));
                return true;
            }
            (Arrival::Refuse, _) => {
                log(
                    Level::Error,
                    format_args!(
                        "configuration rejected: {} is older than the configuration this Envoy enforces \
                         (a control plane serving an older copy of the token store?)",
                        At(incoming)
                    ),
                );
                return false;
            }
            // Not older than anything this VM or this Envoy enforces.
            _ => {}
        }
    }
    // Drop the tables this configuration supersedes before reading it (see
    // the module comment); if it were refused, those roots refuse everything.
    let superseded: Vec<u32> = ROOTS.with(|r| {
        let mut roots = r.borrow_mut();
        let ids: Vec<u32> = roots
            .iter()
            .filter(|(id, entry)| **id != root && lineage.is_some() && entry.lineage == lineage)
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            if let Some(entry) = roots.get_mut(id) {
                // Its marks go to the reporter before its table goes.
                entry.active.report_marks();
                entry.active = deny_all();
            }
        }
        ids
    });
    let bytes = match abi::plugin_configuration(size) {
        Ok(bytes) => bytes,
        Err(abi::Failed(status)) => {
            log(
                Level::Error,
                format_args!("cannot read the plugin configuration (status {status})"),
            );
            return false;
        }
    };
    match Config::from_plugin_configuration(bytes) {
        Ok(config) => {
            if config.token_count() == 0 {
                log(
                    Level::Warn,
                    format_args!("configuration has no tokens: every request is refused"),
                );
            }
            let (tokens, rules) = (config.token_count(), config.rules().len());
            let store = compact::lineage(&head).unwrap_or_default();
            let channel = match (&lineage, stamp, config.usage_report()) {
                (Some(key), Some(stamp), Some(report)) if report.delta_channel => {
                    let channel = delta::channel(key, store, &report.cluster, stamp);
                    let mut used = Vec::new();
                    channel.rebased(stamp, &mut used);
                    usage::queue((report.cluster.clone(), store.to_vec()), used, Vec::new());
                    Some(channel)
                }
                _ => None,
            };
            let active = Rc::new(Active::new(config, store, channel));
            // Logged once the table is ready to serve, its usage marks
            // allocated: the time and the memory are all of it.
            let elapsed = abi::now_nanos().unwrap_or(started).saturating_sub(started);
            log(
                Level::Info,
                format_args!(
                    "configuration accepted: {tokens} tokens, {rules} rules, {size} bytes, in {}.{:03} ms, VM memory {} KiB{}",
                    elapsed / 1_000_000,
                    elapsed / 1_000 % 1_000,
                    vm_memory_kib(),
                    Generation(stamp)
                ),
            );
            if let (Some(key), Some(stamp)) = (&lineage, stamp) {
                floor::raise(Kind::Snapshot, key, stamp);
                floor::raise(Kind::Position, key, stamp);
            }
            ROOTS.with(|r| {
                let mut roots = r.borrow_mut();
                for id in &superseded {
                    if let Some(entry) = roots.get_mut(id) {
                        entry.active = Rc::clone(&active);
                        entry.stamp = stamp;
                    }
                }
            });
            insert_root(root, active, lineage, stamp);
            true
        }
        Err(e) => {
            // Names the field, never a value: see ConfigError.
            log(Level::Error, format_args!("configuration rejected: {e}"));
            false
        }
    }
}

/// Makes `active` `root`'s configuration, with the tick it needs.
fn insert_root(root: u32, active: Rc<Active>, lineage: Option<Vec<u8>>, stamp: Option<Stamp>) {
    let tick_ms = tick_period(&active);
    let _ = abi::set_tick_period_ms(tick_ms);
    ROOTS.with(|r| {
        r.borrow_mut().insert(
            root,
            RootEntry {
                active,
                lineage,
                stamp,
                tick_ms,
            },
        )
    });
}

/// `, version N (epoch E)` for a compact configuration from the control plane.
struct Generation(Option<Stamp>);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(s) => write!(f, ", {}", At(s)),
            None => Ok(()),
        }
    }
}

/// `version N (epoch E)`.
struct At(Stamp);

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "version {} (epoch {})", self.0.generation, self.0.epoch)
    }
}

struct ProxyHost<'a> {
    active: &'a Active,
    overlay: Option<&'a Overlay>,
    /// The host said more than headers follow (`end_of_stream` false).
    has_body: bool,
}

impl Host for ProxyHost<'_> {
    type Headers = Pairs;

    fn request_headers(&mut self) -> Result<Pairs, HostError> {
        abi::request_header_pairs().map(Pairs::new).map_err(|_| HostError)
    }

    fn request_has_body(&mut self) -> bool {
        self.has_body
    }

    fn now(&mut self) -> Option<Timestamp> {
        let nanos = abi::now_nanos().ok()?;
        let secs = i64::try_from(nanos / 1_000_000_000).ok()?;
        Some(Timestamp::from_unix(secs, (nanos % 1_000_000_000) as u32))
    }

    fn client_address(&mut self) -> Option<IpAddr> {
        // The attribute `source.address`: the downstream remote address as
        // the connection manager set it: the peer, or the `X-Forwarded-For`
        // hop its settings select (`xff_num_trusted_hops`, an original IP
        // detection extension; with `use_remote_address: false` the last
        // hop, whoever wrote it). "ip:port", "[ipv6]:port"; a pipe has no IP.
        let text = abi::property("source\0address").ok().flatten()?;
        let text = std::str::from_utf8(&text).ok()?;
        text.parse::<SocketAddr>()
            .map(|a| a.ip())
            .or_else(|_| text.parse::<IpAddr>())
            .ok()
    }

    fn add_request_header(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
        abi::add_request_header(name, value).map_err(|_| HostError)
    }

    fn set_request_header(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
        abi::replace_request_header(name, value).map_err(|_| HostError)
    }

    fn remove_request_header(&mut self, name: &str) -> Result<(), HostError> {
        abi::remove_request_header(name).map_err(|_| HostError)
    }

    fn route_cluster(&mut self) -> Option<Vec<u8>> {
        // The attribute `xds.cluster_name`: the route's cluster, known once
        // the connection manager has picked the route, before the router
        // runs. (The legacy `cluster_name` property is empty until an
        // upstream host is chosen: measured on Envoy 1.40.)
        abi::property("xds\0cluster_name").ok().flatten()
    }

    fn send_reply(&mut self, reply: &Reply, extra: &[(&str, &str)]) -> Result<(), HostError> {
        let sent = if extra.is_empty() {
            let headers = self.active.reply_headers.get(reply.slot).ok_or(HostError)?;
            abi::send_local_response(reply.status, reply.details(), headers, &reply.body)
        } else {
            // Fields built for this request (a 429's): serialized with the
            // reply's own, per request.
            let pairs: Vec<(&str, &[u8])> = reply
                .headers
                .iter()
                .map(|(k, v)| (*k, v.as_bytes()))
                .chain(extra.iter().map(|(k, v)| (*k, v.as_bytes())))
                .collect();
            abi::send_local_response(reply.status, reply.details(), &pairs::serialize(&pairs), &reply.body)
        };
        sent.map_err(|_| HostError)
    }

    fn shared(&mut self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError> {
        abi::shared_data(key).map_err(|_| HostError)
    }

    fn set_shared(&mut self, key: &str, value: &[u8], version: u32) -> Result<bool, HostError> {
        abi::swap_shared_data(key, value, version).map_err(|_| HostError)
    }

    fn used(&mut self, token: Token<'_>, access: Access) {
        let table = self.active.config.tokens();
        let marked = self.overlay.and_then(|o| o.mark(table, token.index(), access));
        let first = match marked {
            Some((first, digest)) => first.then_some(digest),
            None => match self.active.marks.as_ref().map(RefCell::try_borrow_mut) {
                Some(Ok(mut marks)) => marks
                    .mark(token.index(), access)
                    .then(|| table.digest_at(token.index()))
                    .flatten(),
                _ => None,
            },
        };
        // Where from, once per token per report interval: reading the
        // address is a host call that costs as much as a tenth of the
        // filter's work on a request.
        if let Some(digest) = first {
            let room = self
                .active
                .seen
                .try_borrow()
                .is_ok_and(|s| s.len() < MAX_SEEN_PER_REPORT);
            if let Some(address) = room.then(|| self.client_address()).flatten() {
                if let Ok(mut seen) = self.active.seen.try_borrow_mut() {
                    seen.push((digest, address));
                }
            }
        }
    }

    fn count(&mut self, counter: Counter) {
        PENDING.with(|p| {
            if let Some(n) = p.borrow_mut().get_mut(counter.index()) {
                *n += 1;
            }
        });
    }

    fn log(&mut self, level: LogLevel, message: fmt::Arguments<'_>) {
        let level = match level {
            LogLevel::Debug => Level::Debug,
            LogLevel::Info => Level::Info,
            LogLevel::Warn => Level::Warn,
            LogLevel::Error => Level::Error,
        };
        log(level, message);
    }

    fn catching_up(&mut self) -> bool {
        self.active.channel.as_ref().is_some_and(|c| c.catching_up())
    }
}

// The exports (proxy-wasm ABI 0.2.1).

#[cfg(target_os = "wasi")]
extern "C" {
    fn __wasm_call_ctors();
}

#[no_mangle]
pub extern "C" fn _initialize() {
    #[cfg(target_os = "wasi")]
    // SAFETY: the reactor's constructors, once, before any other export.
    unsafe {
        __wasm_call_ctors();
    }
    std::panic::set_hook(Box::new(|info| {
        // Reached only through a bug; the location says where. The message
        // comes from our own code, which never formats a secret.
        let _ = abi::log(Level::Critical, &format!("apitokens: panic: {info}"));
    }));
}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root: u32, _vm_configuration_size: usize) -> bool {
    define_metrics();
    true
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(root: u32, plugin_configuration_size: usize) -> bool {
    configure(root, plugin_configuration_size)
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(context: u32, parent: u32) {
    if parent != 0 {
        // An HTTP context (a root context gets its configuration in on_configure).
        STREAMS.with(|s| s.borrow_mut().insert(context, parent));
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(root: u32) {
    flush_counters();
    refresh_log_level();
    report_usage();
    let Some(active) = ROOTS.with(|r| r.borrow().get(&root).map(|e| Rc::clone(&e.active))) else {
        return;
    };
    if let Some(channel) = &active.channel {
        channel.tick(root, abi::now_nanos().unwrap_or(0) / 1_000_000);
    }
    let wanted = tick_period(&active);
    ROOTS.with(|r| {
        if let Some(entry) = r.borrow_mut().get_mut(&root) {
            if entry.tick_ms != wanted && abi::set_tick_period_ms(wanted).is_ok() {
                entry.tick_ms = wanted;
            }
        }
    });
}

/// Every configuration's marks to the reporter, and the reports out, once
/// the shortest configured interval has passed.
fn report_usage() {
    let actives: Vec<Rc<Active>> = ROOTS.with(|r| {
        let mut seen: Vec<Rc<Active>> = Vec::new();
        for entry in r.borrow().values() {
            if entry.active.marks.is_some() && !seen.iter().any(|a| Rc::ptr_eq(a, &entry.active)) {
                seen.push(Rc::clone(&entry.active));
            }
        }
        seen
    });
    let Some(interval) = actives
        .iter()
        .filter_map(|a| a.config.usage_report().map(|u| u64::from(u.interval_seconds) * 1000))
        .min()
    else {
        return;
    };
    let now_ms = abi::now_nanos().unwrap_or(0) / 1_000_000;
    if usage::due(now_ms, interval) {
        for active in &actives {
            active.report_marks();
        }
        usage::send();
    }
}

/// A delta stream's message, or a usage report's answer.
#[no_mangle]
pub extern "C" fn proxy_on_grpc_receive(_context: u32, token: u32, response_size: usize) {
    if !delta::receive(token, response_size) {
        usage::delivered(token);
    }
}

/// A delta stream ended, or a usage report failed (the control plane is
/// down, or refused it).
#[no_mangle]
pub extern "C" fn proxy_on_grpc_close(_context: u32, token: u32, status_code: u32) {
    if !delta::close(token, status_code) {
        usage::failed(token);
    }
}

/// 0 = Continue, 1 = StopIteration (a local reply was sent).
#[no_mangle]
pub extern "C" fn proxy_on_request_headers(context: u32, _headers: usize, end_of_stream: bool) -> u32 {
    // A root context without a (valid) configuration refuses everything.
    let active = STREAMS
        .with(|s| s.borrow().get(&context).copied())
        .and_then(|root| ROOTS.with(|r| r.borrow().get(&root).map(|entry| Rc::clone(&entry.active))))
        .unwrap_or_else(deny_all);
    let overlay = active.channel.as_ref().map(|c| c.overlay());
    let mut host = ProxyHost {
        active: &active,
        overlay: overlay.as_deref(),
        has_body: !end_of_stream,
    };
    match gate::on_request_headers(&mut host, &active.config, overlay.as_deref()) {
        Verdict::Continue => 0,
        Verdict::Stop => 1,
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(context: u32) {
    if STREAMS.with(|s| s.borrow_mut().remove(&context)).is_none() {
        if let Some(entry) = ROOTS.with(|r| r.borrow_mut().remove(&context)) {
            entry.active.report_marks();
        }
        delta::root_gone(context);
        flush_counters();
    }
}
