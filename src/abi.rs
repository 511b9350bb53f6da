//! The few proxy-wasm (ABI 0.2.1) host calls the filter makes, declared here
//! rather than taken from the SDK: its `hostcalls` `panic!` on any status they
//! do not expect, and a panic is a trap that kills the worker's VM. Here every
//! status other than OK is an `Err`, and statuses are plain integers so an
//! unexpected value from the host is never an invalid Rust enum.

use std::ptr::null_mut;

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
/// `WasmResult::CasMismatch`: another VM set the value first.
const CAS_MISMATCH: u32 = 8;

const MAP_HTTP_REQUEST_HEADERS: u32 = 0;
const BUFFER_GRPC_RECEIVE: u32 = 5;
const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;
const METRIC_COUNTER: u32 = 0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failed(pub u32);

/// proxy-wasm log levels (ABI values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum Level {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_log_level(return_level: *mut u32) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(map_type: u32, return_data: *mut *mut u8, return_size: *mut usize) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
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
    fn proxy_define_metric(metric_type: u32, name_data: *const u8, name_size: usize, return_id: *mut u32) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_grpc_call(
        upstream_data: *const u8,
        upstream_size: usize,
        service_name_data: *const u8,
        service_name_size: usize,
        method_name_data: *const u8,
        method_name_size: usize,
        initial_metadata_data: *const u8,
        initial_metadata_size: usize,
        message_data: *const u8,
        message_size: usize,
        timeout_milliseconds: u32,
        return_callout_id: *mut u32,
    ) -> u32;
    fn proxy_grpc_stream(
        upstream_data: *const u8,
        upstream_size: usize,
        service_name_data: *const u8,
        service_name_size: usize,
        method_name_data: *const u8,
        method_name_size: usize,
        initial_metadata_data: *const u8,
        initial_metadata_size: usize,
        return_stream_id: *mut u32,
    ) -> u32;
    fn proxy_grpc_send(token: u32, message_data: *const u8, message_size: usize, end_stream: u32) -> u32;
    fn proxy_grpc_cancel(token: u32) -> u32;
}

fn check(status: u32) -> Result<(), Failed> {
    if status == OK {
        Ok(())
    } else {
        Err(Failed(status))
    }
}

/// Takes ownership of a buffer the host allocated through our
/// `proxy_on_memory_allocate` (a `Vec<u8>` of capacity exactly `size`).
///
/// # Safety
/// `data` must be null or come from `proxy_on_memory_allocate(size)`.
unsafe fn host_buffer(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        // SAFETY: see above; the allocation has length and capacity `size`.
        unsafe { Vec::from_raw_parts(data, size, size) }
    }
}

pub fn log_level() -> Result<Level, Failed> {
    let mut level = 0u32;
    // SAFETY: the host writes one u32 to a valid pointer.
    check(unsafe { proxy_get_log_level(&mut level) })?;
    Ok(match level {
        0 => Level::Trace,
        1 => Level::Debug,
        2 => Level::Info,
        3 => Level::Warn,
        4 => Level::Error,
        _ => Level::Critical,
    })
}

pub fn log(level: Level, message: &str) -> Result<(), Failed> {
    // SAFETY: pointer and length describe a live string.
    check(unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) })
}

pub fn now_nanos() -> Result<u64, Failed> {
    let mut nanos = 0u64;
    // SAFETY: the host writes one u64 to a valid pointer.
    check(unsafe { proxy_get_current_time_nanoseconds(&mut nanos) })?;
    Ok(nanos)
}

/// The first `size` bytes of a host buffer (empty if there is none).
fn buffer(kind: u32, size: usize) -> Result<Vec<u8>, Failed> {
    let mut data = null_mut();
    let mut len = 0usize;
    // SAFETY: out-pointers are valid; the host allocates the returned buffer.
    let status = unsafe { proxy_get_buffer_bytes(kind, 0, size, &mut data, &mut len) };
    match status {
        // SAFETY: on OK the host allocated `data` with `len` bytes through
        // `proxy_on_memory_allocate`.
        OK => Ok(unsafe { host_buffer(data, len) }),
        NOT_FOUND => Ok(Vec::new()),
        other => Err(Failed(other)),
    }
}

/// The first `size` bytes of the plugin configuration.
pub fn plugin_configuration(size: usize) -> Result<Vec<u8>, Failed> {
    buffer(BUFFER_PLUGIN_CONFIGURATION, size)
}

/// A host property by its path, segments separated by NUL (`plugin_name`,
/// `xds\0cluster_name`).
pub fn property(name: &str) -> Result<Option<Vec<u8>>, Failed> {
    let mut data = null_mut();
    let mut len = 0usize;
    // SAFETY: the path is a live string; out-pointers are valid.
    let status = unsafe { proxy_get_property(name.as_ptr(), name.len(), &mut data, &mut len) };
    match status {
        // SAFETY: on OK the host allocated `data` with `len` bytes through
        // `proxy_on_memory_allocate`.
        OK => Ok(Some(unsafe { host_buffer(data, len) })),
        NOT_FOUND => Ok(None),
        other => Err(Failed(other)),
    }
}

/// Every request header, in the pairs encoding (see `pairs`).
pub fn request_header_pairs() -> Result<Vec<u8>, Failed> {
    let mut data = null_mut();
    let mut len = 0usize;
    // SAFETY: out-pointers are valid; the host allocates the returned buffer.
    let status = unsafe { proxy_get_header_map_pairs(MAP_HTTP_REQUEST_HEADERS, &mut data, &mut len) };
    match status {
        // SAFETY: on OK the host allocated `data` with `len` bytes through
        // `proxy_on_memory_allocate`.
        OK => Ok(unsafe { host_buffer(data, len) }),
        NOT_FOUND => Ok(Vec::new()),
        other => Err(Failed(other)),
    }
}

pub fn add_request_header(name: &str, value: &[u8]) -> Result<(), Failed> {
    // SAFETY: key and value are live slices.
    check(unsafe {
        proxy_add_header_map_value(
            MAP_HTTP_REQUEST_HEADERS,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

pub fn replace_request_header(name: &str, value: &[u8]) -> Result<(), Failed> {
    // SAFETY: key and value are live slices.
    check(unsafe {
        proxy_replace_header_map_value(
            MAP_HTTP_REQUEST_HEADERS,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

pub fn remove_request_header(name: &str) -> Result<(), Failed> {
    // SAFETY: key is a live string.
    check(unsafe { proxy_remove_header_map_value(MAP_HTTP_REQUEST_HEADERS, name.as_ptr(), name.len()) })
}

/// `headers` is a header map in the proxy-wasm serialization (see
/// [`serialize_headers`]); `details` becomes Envoy's response code details.
pub fn send_local_response(status: u32, details: &str, headers: &[u8], body: &[u8]) -> Result<(), Failed> {
    // SAFETY: all pointers describe live slices; -1 means "not gRPC".
    check(unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    })
}

pub fn define_counter(name: &str) -> Result<u32, Failed> {
    let mut id = 0u32;
    // SAFETY: name is a live string; the host writes one u32.
    check(unsafe { proxy_define_metric(METRIC_COUNTER, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub fn increment(metric: u32, by: i64) -> Result<(), Failed> {
    // SAFETY: no pointers.
    check(unsafe { proxy_increment_metric(metric, by) })
}

/// A unary gRPC call to `upstream` (a serialized `GrpcService`); the answer
/// comes to `proxy_on_grpc_receive` or `proxy_on_grpc_close` with the
/// returned token.
pub fn grpc_call(
    upstream: &[u8],
    service: &str,
    method: &str,
    metadata: &[u8],
    message: &[u8],
    timeout_ms: u32,
) -> Result<u32, Failed> {
    let mut token = 0u32;
    // SAFETY: every pointer describes a live slice; the host writes one u32.
    check(unsafe {
        proxy_grpc_call(
            upstream.as_ptr(),
            upstream.len(),
            service.as_ptr(),
            service.len(),
            method.as_ptr(),
            method.len(),
            metadata.as_ptr(),
            metadata.len(),
            message.as_ptr(),
            message.len(),
            timeout_ms,
            &mut token,
        )
    })?;
    Ok(token)
}

/// Opens a gRPC stream to `upstream` (a serialized `GrpcService`), owned by
/// the calling root context: messages come to `proxy_on_grpc_receive`, the
/// end to `proxy_on_grpc_close`, with the returned token. Envoy resets it
/// when that root context goes.
pub fn grpc_stream(upstream: &[u8], service: &str, method: &str, metadata: &[u8]) -> Result<u32, Failed> {
    let mut token = 0u32;
    // SAFETY: every pointer describes a live slice; the host writes one u32.
    check(unsafe {
        proxy_grpc_stream(
            upstream.as_ptr(),
            upstream.len(),
            service.as_ptr(),
            service.len(),
            method.as_ptr(),
            method.len(),
            metadata.as_ptr(),
            metadata.len(),
            &mut token,
        )
    })?;
    Ok(token)
}

/// Sends a message on a stream the calling root context owns (an error, not
/// a trap, if the stream is gone).
pub fn grpc_send(token: u32, message: &[u8]) -> Result<(), Failed> {
    // SAFETY: the message is a live slice.
    check(unsafe { proxy_grpc_send(token, message.as_ptr(), message.len(), 0) })
}

pub fn grpc_cancel(token: u32) -> Result<(), Failed> {
    // SAFETY: no pointers.
    check(unsafe { proxy_grpc_cancel(token) })
}

/// The message `proxy_on_grpc_receive` announced (`size` bytes).
pub fn grpc_message(size: usize) -> Result<Vec<u8>, Failed> {
    buffer(BUFFER_GRPC_RECEIVE, size)
}

/// A value of the shared data every VM of this `vm_id` in the Envoy process
/// sees (Envoy's validation VM included), with its CAS token; `None` if the
/// key was never set.
pub fn shared_data(key: &str) -> Result<Option<(Vec<u8>, u32)>, Failed> {
    let mut data = null_mut();
    let mut len = 0usize;
    let mut cas = 0u32;
    // SAFETY: the key is a live string; out-pointers are valid; the host
    // allocates the returned buffer.
    let status = unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut len, &mut cas) };
    match status {
        // SAFETY: on OK the host allocated `data` with `len` bytes through
        // `proxy_on_memory_allocate`.
        OK => Ok(Some((unsafe { host_buffer(data, len) }, cas))),
        NOT_FOUND => Ok(None),
        other => Err(Failed(other)),
    }
}

/// Sets a shared data value if it is still at `cas` (0: unconditionally).
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Result<(), Failed> {
    // SAFETY: key and value are live slices.
    check(unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) })
}

/// Sets a shared data value if it is still at `cas` (0: unconditionally):
/// `Ok(false)` if another VM set it first.
pub fn swap_shared_data(key: &str, value: &[u8], cas: u32) -> Result<bool, Failed> {
    match set_shared_data(key, value, cas) {
        Ok(()) => Ok(true),
        Err(Failed(CAS_MISMATCH)) => Ok(false),
        Err(e) => Err(e),
    }
}

pub fn set_tick_period_ms(period: u32) -> Result<(), Failed> {
    // SAFETY: no pointers.
    check(unsafe { proxy_set_tick_period_milliseconds(period) })
}

/// The host allocates memory in the VM through this export (for the values
/// it returns: header maps, the plugin configuration).
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut buf = std::mem::ManuallyDrop::new(Vec::<u8>::with_capacity(size));
    buf.as_mut_ptr()
}
