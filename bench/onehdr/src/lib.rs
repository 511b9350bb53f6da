//! Benchmark filter: by default reads the `authorization` request header and
//! continues (the cheapest useful thing a proxy-wasm filter can do: the wasm
//! crossing floor of `make bench`).
//!
//! The plugin configuration may list other operations, run in order on every
//! request, to price single host calls (see bench/README.md):
//!
//! | op            | host calls                                           |
//! |---------------|------------------------------------------------------|
//! | `get:<name>`  | `proxy_get_header_map_value` (buffer freed)          |
//! | `sha:<name>`  | the same, then SHA-256 of the value inside the VM   |
//! | `set:<name>`  | `proxy_replace_header_map_value` (value `bench`)    |
//! | `add:<name>`  | `proxy_add_header_map_value` (value `bench`)        |
//! | `del:<name>`  | `proxy_remove_header_map_value`                      |
//! | `pairs`       | `proxy_get_header_map_pairs` (all request headers)   |
//! | `rewrite`     | `pairs`, then `proxy_set_header_map_pairs` with      |
//! |               | `authorization` dropped and 3 identity headers added |
//! | `now`         | `proxy_get_current_time_nanoseconds`                 |
//! | `loglevel`    | `proxy_get_log_level`                                |
//! | `log`         | `proxy_log` at info                                  |
//! | `metric`      | `proxy_increment_metric`                             |
//! | `deny`        | `proxy_send_local_response` 401 (stops the request)  |
//! | `none`        | nothing (the cost of the callbacks alone)            |
//!
//! Two builds: with the SDK's dispatcher (default feature `sdk`, what a
//! filter written the usual way exports: every callback, so Envoy calls
//! `on_context_create`, `on_response_headers`, `on_log`, `on_done`, ... for
//! every request) and without (`--no-default-features`: hand-written exports of
//! only what is used). The operations are the same code in both.

use std::cell::RefCell;
use std::ptr::null_mut;

const OK: u32 = 0;
const MAP_REQUEST_HEADERS: u32 = 0;
const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;

#[allow(clashing_extern_declarations)]
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, data: *const u8, size: usize) -> u32;
    fn proxy_get_log_level(level: *mut u32) -> u32;
    fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
    fn proxy_get_buffer_bytes(kind: u32, start: usize, max: usize, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_get_header_map_pairs(map: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_set_header_map_pairs(map: u32, data: *const u8, size: usize) -> u32;
    fn proxy_get_header_map_value(map: u32, key: *const u8, key_size: usize, data: *mut *mut u8, size: *mut usize)
        -> u32;
    fn proxy_replace_header_map_value(map: u32, key: *const u8, ks: usize, value: *const u8, vs: usize) -> u32;
    fn proxy_add_header_map_value(map: u32, key: *const u8, ks: usize, value: *const u8, vs: usize) -> u32;
    fn proxy_remove_header_map_value(map: u32, key: *const u8, key_size: usize) -> u32;
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, offset: i64) -> u32;
}

enum Op {
    Get(Box<str>),
    Sha(Box<str>),
    Set(Box<str>),
    Add(Box<str>),
    Del(Box<str>),
    Pairs,
    Rewrite,
    Now,
    LogLevel,
    Log,
    Metric,
    Deny,
}

struct Plan {
    ops: Vec<Op>,
    metric: u32,
}

thread_local! {
    static PLAN: RefCell<Plan> = RefCell::new(Plan { ops: vec![Op::Get("authorization".into())], metric: 0 });
}

/// A buffer the host allocated through `proxy_on_memory_allocate`.
fn take(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        // SAFETY: allocated by proxy_on_memory_allocate(size) (both builds
        // allocate exactly `size` bytes).
        unsafe { Vec::from_raw_parts(data, size, size) }
    }
}

fn get_header(name: &str) -> Option<Vec<u8>> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: valid key slice and out-pointers.
    let status = unsafe { proxy_get_header_map_value(MAP_REQUEST_HEADERS, name.as_ptr(), name.len(), &mut data, &mut size) };
    (status == OK).then(|| take(data, size))
}

const DENY_HEADERS: &[u8] = b"\x01\x00\x00\x00\x0c\x00\x00\x00\x10\x00\x00\x00content-type\x00application/json\x00";
const DENY_BODY: &[u8] = b"{\"code\":401,\"message\":\"The bearer token is invalid or expired.\"}";
const DENY_DETAILS: &[u8] = b"bench_denied";

/// Runs the plan; true when the request was answered locally.
fn run_plan() -> bool {
    PLAN.with(|plan| {
        let plan = plan.borrow();
        let mut denied = false;
        for op in &plan.ops {
            // SAFETY (all arms): pointers describe live slices or locals.
            match op {
                Op::Get(name) => {
                    std::hint::black_box(get_header(name));
                }
                Op::Sha(name) => {
                    use sha2::Digest;
                    let value = get_header(name).unwrap_or_default();
                    let secret = value.strip_prefix(b"Bearer ").unwrap_or(&value);
                    std::hint::black_box(sha2::Sha256::digest(secret));
                }
                Op::Set(name) => unsafe {
                    proxy_replace_header_map_value(MAP_REQUEST_HEADERS, name.as_ptr(), name.len(), b"bench".as_ptr(), 5);
                },
                Op::Add(name) => unsafe {
                    proxy_add_header_map_value(MAP_REQUEST_HEADERS, name.as_ptr(), name.len(), b"bench".as_ptr(), 5);
                },
                Op::Del(name) => unsafe {
                    proxy_remove_header_map_value(MAP_REQUEST_HEADERS, name.as_ptr(), name.len());
                },
                Op::Pairs => {
                    let (mut data, mut size) = (null_mut(), 0usize);
                    if unsafe { proxy_get_header_map_pairs(MAP_REQUEST_HEADERS, &mut data, &mut size) } == OK {
                        std::hint::black_box(take(data, size));
                    }
                }
                Op::Rewrite => {
                    let (mut data, mut size) = (null_mut(), 0usize);
                    if unsafe { proxy_get_header_map_pairs(MAP_REQUEST_HEADERS, &mut data, &mut size) } == OK {
                        let out = rewrite(&take(data, size));
                        unsafe { proxy_set_header_map_pairs(MAP_REQUEST_HEADERS, out.as_ptr(), out.len()) };
                    }
                }
                Op::Now => {
                    let mut t = 0u64;
                    unsafe { proxy_get_current_time_nanoseconds(&mut t) };
                    std::hint::black_box(t);
                }
                Op::LogLevel => {
                    let mut l = 0u32;
                    unsafe { proxy_get_log_level(&mut l) };
                    std::hint::black_box(l);
                }
                Op::Log => {
                    let line = b"bench: denied reason=unknown token=-";
                    unsafe { proxy_log(2, line.as_ptr(), line.len()) };
                }
                Op::Metric => unsafe {
                    proxy_increment_metric(plan.metric, 1);
                },
                Op::Deny => {
                    unsafe {
                        proxy_send_local_response(
                            401,
                            DENY_DETAILS.as_ptr(),
                            DENY_DETAILS.len(),
                            DENY_BODY.as_ptr(),
                            DENY_BODY.len(),
                            DENY_HEADERS.as_ptr(),
                            DENY_HEADERS.len(),
                            -1,
                        )
                    };
                    denied = true;
                }
            }
        }
        denied
    })
}

/// The request headers (pairs encoding) without `authorization`, plus three
/// identity headers: what `rewrite` hands back in one call.
fn rewrite(pairs: &[u8]) -> Vec<u8> {
    let word = |b: &[u8], at: usize| {
        b.get(at..at + 4).map_or(0, |w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize)
    };
    let n = word(pairs, 0);
    let mut entries: Vec<(&[u8], &[u8])> = Vec::with_capacity(n + 3);
    let mut at = 4 + 8 * n;
    for i in 0..n {
        let (k, v) = (word(pairs, 4 + 8 * i), word(pairs, 8 + 8 * i));
        let (Some(key), Some(value)) = (pairs.get(at..at + k), pairs.get(at + k + 1..at + k + 1 + v)) else {
            break;
        };
        if key != b"authorization" {
            entries.push((key, value));
        }
        at += k + v + 2;
    }
    entries.push((b"x-apitoken-name", b"namespaces/default/apitokens/t1"));
    entries.push((b"x-apitoken-namespace", b"default"));
    entries.push((b"x-apitoken-role", b"editor"));
    let mut out = Vec::with_capacity(pairs.len() + 128);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (k, v) in &entries {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in &entries {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

fn configure(size: usize) -> bool {
    let (mut data, mut len) = (null_mut(), 0usize);
    // SAFETY: valid out-pointers.
    let status = unsafe { proxy_get_buffer_bytes(BUFFER_PLUGIN_CONFIGURATION, 0, size, &mut data, &mut len) };
    let text = if status == OK { take(data, len) } else { Vec::new() };
    let text = String::from_utf8_lossy(&text);
    let mut ops = Vec::new();
    for word in text.split_whitespace() {
        let (op, arg) = word.split_once(':').unwrap_or((word, ""));
        let arg: Box<str> = arg.into();
        ops.push(match op {
            "get" => Op::Get(arg),
            "sha" => Op::Sha(arg),
            "set" => Op::Set(arg),
            "add" => Op::Add(arg),
            "del" => Op::Del(arg),
            "pairs" => Op::Pairs,
            "rewrite" => Op::Rewrite,
            "now" => Op::Now,
            "loglevel" => Op::LogLevel,
            "log" => Op::Log,
            "metric" => Op::Metric,
            "deny" => Op::Deny,
            "none" => continue,
            _ => return false,
        });
    }
    if text.trim().is_empty() {
        ops.push(Op::Get("authorization".into()));
    }
    let mut metric = 0u32;
    let name = "bench.requests";
    // SAFETY: valid name slice and out-pointer.
    unsafe { proxy_define_metric(0, name.as_ptr(), name.len(), &mut metric) };
    PLAN.with(|plan| *plan.borrow_mut() = Plan { ops, metric });
    true
}

#[cfg(feature = "sdk")]
mod sdk {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType};

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| Box::new(Root));
    }}

    struct Root;
    impl Context for Root {}
    impl RootContext for Root {
        fn on_configure(&mut self, size: usize) -> bool {
            super::configure(size)
        }
        fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Request))
        }
        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Request;
    impl Context for Request {}
    impl HttpContext for Request {
        fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
            if super::run_plan() {
                Action::Pause
            } else {
                Action::Continue
            }
        }
    }
}

#[cfg(not(feature = "sdk"))]
mod raw {
    //! Only the exports this filter needs. Envoy (proxy-wasm-cpp-host) skips
    //! every callback a module does not export.

    #[cfg(target_os = "wasi")]
    extern "C" {
        fn __wasm_call_ctors();
    }

    #[no_mangle]
    pub extern "C" fn _initialize() {
        #[cfg(target_os = "wasi")]
        // SAFETY: the reactor's constructor call, once, as the SDK does.
        unsafe {
            __wasm_call_ctors();
        }
    }

    #[no_mangle]
    pub extern "C" fn proxy_abi_version_0_2_1() {}

    #[no_mangle]
    pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
        let mut buf = std::mem::ManuallyDrop::new(Vec::<u8>::with_capacity(size));
        buf.as_mut_ptr()
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_vm_start(_root: u32, _size: usize) -> bool {
        true
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_configure(_root: u32, size: usize) -> bool {
        super::configure(size)
    }

    /// 0 = Continue, 1 = Pause (StopIteration).
    #[no_mangle]
    pub extern "C" fn proxy_on_request_headers(_context: u32, _headers: usize, _end_of_stream: bool) -> u32 {
        u32::from(super::run_plan())
    }
}
