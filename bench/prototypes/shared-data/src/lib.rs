//! Throwaway prototype (issue 15, third candidate design): the token table in
//! proxy-wasm shared data, one key per token, one `proxy_get_shared_data` per
//! request. Raw proxy-wasm ABI 0.2.1 exports, as the root filter has.
//!
//! Plugin configuration, one of:
//! - the bench harness's JSON (`{"tokens":[{"name":..,"role":..,"secretSha256":..,"expireTime":..},..]}`,
//!   exactly as `bench/run.py` writes it: a scanner, not a JSON parser);
//! - `{"synthetic": N}`: N deterministic tokens (secret i = `sd-synthetic-<i>`,
//!   never written anywhere; see `measure.py`).
//!
//! Key: the raw 32-byte SHA-256 of the secret. Value: role (1 byte), expiry
//! (i64 LE unix seconds, 0 = never), the token's name
//! (`namespaces/{ns}/apitokens/{id}`, from which the namespace is read).
//! An empty value is a tombstone (there is no delete hostcall).
//!
//! Per request (both builds): the header pairs in one host call,
//! `authorization` → `Bearer <secret>` → SHA-256 → lookup → expiry (clock
//! read only for tokens with one) → the namespace in `:path` → three identity
//! headers set and `authorization` removed, continue; otherwise the three
//! identity headers removed and a 401 local reply, as the root filter does.
//! With `--features local` the lookup is a per-VM HashMap each VM fills
//! itself, the rest is identical: the A/B control for the host call's cost.

use sha2::{Digest, Sha256};
use std::ptr::null_mut;

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const MAP_HTTP_REQUEST_HEADERS: u32 = 0;
const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(map_type: u32, return_data: *mut *mut u8, return_size: *mut usize) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    #[cfg_attr(feature = "local", allow(dead_code))]
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    #[cfg_attr(feature = "local", allow(dead_code))]
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
}

unsafe fn host_buffer(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

fn log_info(msg: &str) {
    unsafe {
        proxy_log(2, msg.as_ptr(), msg.len());
    }
}

fn now_nanos() -> u64 {
    let mut t = 0u64;
    unsafe {
        proxy_get_current_time_nanoseconds(&mut t);
    }
    t
}

// ------------------------------------------------------------ the table

#[cfg(not(feature = "local"))]
mod table {
    use super::*;

    /// The marker key (not 32 bytes, so it never collides with a digest).
    const MARKER: &[u8] = b"proto-sd:loaded";

    pub fn get(key: &[u8; 32]) -> Option<Vec<u8>> {
        let mut data = null_mut();
        let mut len = 0usize;
        let mut cas = 0u32;
        let status = unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut len, &mut cas) };
        match status {
            OK => Some(unsafe { host_buffer(data, len) }),
            _ => None,
        }
    }

    fn get_raw(key: &[u8]) -> Option<(Vec<u8>, u32)> {
        let mut data = null_mut();
        let mut len = 0usize;
        let mut cas = 0u32;
        let status = unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut len, &mut cas) };
        (status == OK).then(|| (unsafe { host_buffer(data, len) }, cas))
    }

    fn set_raw(key: &[u8], value: &[u8], cas: u32) -> bool {
        unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) == OK }
    }

    /// True if this VM won the right to load: the marker is created empty if
    /// absent, then claimed with its CAS (only one claimant succeeds; Envoy's
    /// set cannot CAS-protect the creation of a key, hence the two steps).
    pub fn claim() -> bool {
        let (value, cas) = match get_raw(MARKER) {
            Some(v) => v,
            None => {
                set_raw(MARKER, b"", 0);
                match get_raw(MARKER) {
                    Some(v) => v,
                    None => return false,
                }
            }
        };
        if !value.is_empty() {
            return false; // loaded or being loaded by another VM
        }
        set_raw(MARKER, b"claimed", cas)
    }

    pub fn put(key: &[u8; 32], value: &[u8]) {
        set_raw(key, value, 0);
    }

    pub fn done(count: usize) {
        set_raw(MARKER, format!("loaded {count}").as_bytes(), 0);
    }

    pub const MODE: &str = "shared-data";
}

#[cfg(feature = "local")]
mod table {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::hash::{BuildHasherDefault, Hasher};

    /// The key is a SHA-256 digest: its first 8 bytes are already a hash.
    #[derive(Default)]
    pub struct DigestHasher(u64);
    impl Hasher for DigestHasher {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for &b in bytes.iter().take(8) {
                self.0 = (self.0 << 8) | u64::from(b);
            }
        }
    }

    thread_local! {
        static TABLE: RefCell<HashMap<[u8; 32], Box<[u8]>, BuildHasherDefault<DigestHasher>>> =
            RefCell::new(HashMap::default());
    }

    /// A copy, as the shared-data build gets one: the request path is then
    /// identical apart from where the bytes come from.
    pub fn get(key: &[u8; 32]) -> Option<Vec<u8>> {
        TABLE.with(|t| t.borrow().get(key).map(|v| v.to_vec()))
    }

    pub fn claim() -> bool {
        TABLE.with(|t| t.borrow_mut().clear());
        true
    }

    pub fn put(key: &[u8; 32], value: &[u8]) {
        TABLE.with(|t| t.borrow_mut().insert(*key, value.into()));
    }

    pub fn done(_count: usize) {}

    pub const MODE: &str = "per-VM HashMap";
}

// ------------------------------------------------------------ loading

fn role_byte(role: &[u8]) -> u8 {
    match role {
        b"viewer" => 1,
        b"editor" => 2,
        b"owner" => 3,
        _ => 0,
    }
}

fn role_name(b: u8) -> &'static [u8] {
    match b {
        1 => b"viewer",
        2 => b"editor",
        3 => b"owner",
        _ => b"",
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` → unix seconds (the harness's only form).
fn parse_time(s: &[u8]) -> Option<i64> {
    if s.len() != 20 || s[19] != b'Z' {
        return None;
    }
    let n = |a: usize, b: usize| -> Option<i64> { std::str::from_utf8(&s[a..b]).ok()?.parse().ok() };
    let (y, m, d) = (n(0, 4)?, n(5, 7)?, n(8, 10)?);
    let (hh, mm, ss) = (n(11, 13)?, n(14, 16)?, n(17, 19)?);
    // days from civil (Howard Hinnant)
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + hh * 3600 + mm * 60 + ss)
}

fn unhex(s: &[u8]) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let h = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        *o = h(s[2 * i])? << 4 | h(s[2 * i + 1])?;
    }
    Some(out)
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// The string value of `"field":"…"` after `from`, within `[from, end)`.
fn field<'a>(cfg: &'a [u8], name: &[u8], from: usize, end: usize) -> Option<&'a [u8]> {
    let at = find(&cfg[..end], name, from)? + name.len();
    let close = find(&cfg[..end], b"\"", at)?;
    Some(&cfg[at..close])
}

fn value_of(role: u8, expiry: i64, name: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + name.len());
    v.push(role);
    v.extend_from_slice(&expiry.to_le_bytes());
    v.extend_from_slice(name);
    v
}

/// The unsigned integer after `key` (e.g. `"synthetic":`), spaces allowed.
fn number(cfg: &[u8], key: &[u8]) -> Option<usize> {
    let at = find(cfg, key, 0)? + key.len();
    let digits: Vec<u8> = cfg[at..]
        .iter()
        .copied()
        .skip_while(u8::is_ascii_whitespace)
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

fn load(cfg: &[u8]) -> Option<usize> {
    let mut count = 0usize;
    if let Some(n) = number(cfg, b"\"synthetic\":") {
        let expiry = parse_time(b"2099-01-01T00:00:00Z")?;
        let mut secret = String::new();
        let mut name = String::new();
        for i in 0..n {
            use std::fmt::Write;
            secret.clear();
            let _ = write!(secret, "sd-synthetic-{i}");
            name.clear();
            if i % 2 == 1 {
                let _ = write!(name, "namespaces/default/apitokens/t{i}");
            } else {
                let _ = write!(name, "namespaces/ns{}/apitokens/t{i}", i % 97);
            }
            let role = if i == 1 { 2 } else { (i % 3) as u8 + 1 };
            let key: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
            table::put(&key, &value_of(role, expiry, name.as_bytes()));
            count += 1;
        }
        // `"churn": M`: then M regenerations (the old key "removed", i.e. set
        // to an empty value since there is no delete hostcall; a new key for
        // the new secret `sd-synthetic-r<j>`), to see what churn leaves behind.
        let churn = number(cfg, b"\"churn\":").unwrap_or(0);
        for j in 0..churn.min(n) {
            use std::fmt::Write;
            secret.clear();
            let _ = write!(secret, "sd-synthetic-{j}");
            let old: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
            table::put(&old, b"");
            secret.clear();
            let _ = write!(secret, "sd-synthetic-r{j}");
            let key: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
            name.clear();
            if j % 2 == 1 {
                let _ = write!(name, "namespaces/default/apitokens/t{j}");
            } else {
                let _ = write!(name, "namespaces/ns{}/apitokens/t{j}", j % 97);
            }
            table::put(&key, &value_of(2, expiry, name.as_bytes()));
        }
        return Some(count);
    }
    // The harness's JSON: objects `{"name":..,"role":..,"secretSha256":..[,"expireTime":..]}`.
    let mut at = 0;
    while let Some(start) = find(cfg, b"{\"name\":\"", at) {
        let end = find(cfg, b"}", start)?;
        let name = field(cfg, b"\"name\":\"", start, end)?;
        let role = role_byte(field(cfg, b"\"role\":\"", start, end)?);
        let digest = unhex(field(cfg, b"\"secretSha256\":\"", start, end)?)?;
        let expiry = match field(cfg, b"\"expireTime\":\"", start, end) {
            Some(t) => parse_time(t)?,
            None => 0,
        };
        table::put(&digest, &value_of(role, expiry, name));
        count += 1;
        at = end;
    }
    Some(count)
}

#[cfg(target_os = "wasi")]
extern "C" {
    fn __wasm_call_ctors();
}

#[no_mangle]
pub extern "C" fn _initialize() {
    #[cfg(target_os = "wasi")]
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
    if !table::claim() {
        log_info("proto-sd: table already in shared data, not loading");
        return true;
    }
    let mut data = null_mut();
    let mut len = 0usize;
    let status = unsafe { proxy_get_buffer_bytes(BUFFER_PLUGIN_CONFIGURATION, 0, size, &mut data, &mut len) };
    let cfg = if status == OK {
        unsafe { host_buffer(data, len) }
    } else {
        Vec::new()
    };
    let t0 = now_nanos();
    let Some(n) = load(&cfg) else {
        log_info("proto-sd: configuration not understood");
        return false;
    };
    drop(cfg);
    table::done(n);
    let ms = (now_nanos() - t0) as f64 / 1e6;
    log_info(&format!(
        "proto-sd: loaded {n} tokens into the {} table in {ms:.1} ms",
        table::MODE
    ));
    true
}

// ------------------------------------------------------------ per request

/// (name, value) of every header in the pairs encoding.
fn pairs(buf: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let u32_at = |at: usize| -> usize {
        buf.get(at..at + 4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let count = u32_at(0);
    let mut at = 4 + count * 8;
    (0..count).map_while(move |i| {
        let (k, v) = (u32_at(4 + i * 8), u32_at(8 + i * 8));
        let key = buf.get(at..at + k)?;
        let value = buf.get(at + k + 1..at + k + 1 + v)?;
        at += k + v + 2;
        Some((key, value))
    })
}

const IDENTITY: [&str; 3] = ["x-apitoken-name", "x-apitoken-namespace", "x-apitoken-role"];

fn remove(name: &str) {
    unsafe {
        proxy_remove_header_map_value(MAP_HTTP_REQUEST_HEADERS, name.as_ptr(), name.len());
    }
}

fn replace(name: &str, value: &[u8]) {
    unsafe {
        proxy_replace_header_map_value(
            MAP_HTTP_REQUEST_HEADERS,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        );
    }
}

/// The serialized header map of the 401 (one `www-authenticate`).
fn deny_headers() -> Vec<u8> {
    let (k, v): (&[u8], &[u8]) = (
        b"www-authenticate",
        b"Bearer realm=\"apitokens\", error=\"invalid_token\"",
    );
    let mut out = Vec::new();
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&(k.len() as u32).to_le_bytes());
    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    out.extend_from_slice(k);
    out.push(0);
    out.extend_from_slice(v);
    out.push(0);
    out
}

fn deny() -> u32 {
    for h in IDENTITY {
        remove(h);
    }
    let headers = deny_headers();
    let body = b"{\"code\": 401, \"message\": \"invalid token\"}";
    let details = "apitokens_unknown";
    unsafe {
        proxy_send_local_response(
            401,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        );
    }
    1
}

/// The token's namespace equals the path segment after `/namespaces/`.
fn namespace_ok(path: &[u8], ns: &[u8]) -> bool {
    let Some(at) = find(path, b"/namespaces/", 0) else {
        return false;
    };
    let rest = &path[at + 12..];
    let seg_end = rest.iter().position(|&c| c == b'/' || c == b'?').unwrap_or(rest.len());
    &rest[..seg_end] == ns
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(_context: u32, _headers: usize, _end_of_stream: bool) -> u32 {
    let mut data = null_mut();
    let mut len = 0usize;
    let status = unsafe { proxy_get_header_map_pairs(MAP_HTTP_REQUEST_HEADERS, &mut data, &mut len) };
    if status != OK && status != NOT_FOUND {
        return deny();
    }
    let buf = unsafe { host_buffer(data, len) };
    let (mut auth, mut path) = (None, None);
    for (k, v) in pairs(&buf) {
        match k {
            b"authorization" => auth = Some(v),
            b":path" => path = Some(v),
            _ => {}
        }
    }
    let Some(secret) = auth.and_then(|a| (a.len() > 7 && a[..7].eq_ignore_ascii_case(b"bearer ")).then(|| &a[7..]))
    else {
        return deny();
    };
    let digest: [u8; 32] = Sha256::digest(secret).into();
    // The one lookup: a host call into shared data (or the per-VM map).
    let Some(value) = table::get(&digest) else {
        return deny();
    };
    if value.len() < 9 {
        return deny(); // a tombstone: "removed" keys stay, empty
    }
    let expiry = i64::from_le_bytes(value[1..9].try_into().unwrap_or([0; 8]));
    if expiry != 0 && (now_nanos() / 1_000_000_000) as i64 >= expiry {
        return deny();
    }
    let name = &value[9..];
    // namespaces/{ns}/apitokens/{id}
    let ns = name
        .get(11..)
        .and_then(|r| r.iter().position(|&c| c == b'/').map(|e| &r[..e]))
        .unwrap_or(b"");
    if !namespace_ok(path.unwrap_or(b""), ns) {
        return deny(); // (the real filter answers 403 here; never taken in the bench)
    }
    replace(IDENTITY[0], name);
    replace(IDENTITY[1], ns);
    replace(IDENTITY[2], role_name(value[0]));
    remove("authorization");
    0
}
