//! The proxy-wasm shell: the only code that talks to Envoy. It turns host callbacks into core calls and the
//! core's answers into host calls, and holds no policy of its own.

pub mod host_crypto;
pub mod http;
pub mod metrics;
pub mod root;

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the epoch, from the host's clock.
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The pairs of a header map as raw bytes, through the ABI directly: the SDK's `get_map` panics on a header
/// value that is not UTF-8, and a client chooses its header values. Empty when the map is unavailable.
pub fn header_map(map: proxy_wasm::types::MapType) -> Vec<u8> {
    #[link(wasm_import_module = "env")]
    extern "C" {
        #[allow(clashing_extern_declarations)]
        fn proxy_get_header_map_pairs(map_type: u32, return_map_data: *mut *mut u8, return_map_size: *mut usize)
            -> u32;
    }
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a buffer it allocated through this module's `proxy_on_memory_allocate` (the
    // SDK's allocator, i.e. the global one) and its size; ownership passes to us, as in the SDK's `get_map`.
    let status = unsafe { proxy_get_header_map_pairs(map as u32, &mut data, &mut size) };
    if status != 0 || data.is_null() {
        return Vec::new();
    }
    unsafe { Vec::from_raw_parts(data, size, size) }
}

/// One header's value, lossily decoded: a non-UTF-8 byte becomes U+FFFD.
pub fn header_value(map: proxy_wasm::types::MapType, name: &str) -> Option<String> {
    proxy_wasm::hostcalls::get_map_value_bytes(map, name)
        .ok()
        .flatten()
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

/// Sets filter state `wasm.<key>` for the access log (`%FILTER_STATE(wasm.<key>:PLAIN)%`), through the ABI
/// directly: the SDK's `set_property` panics on a status it does not expect. Failures are ignored.
pub fn set_filter_state(key: &str, value: &str) {
    #[link(wasm_import_module = "env")]
    extern "C" {
        #[allow(clashing_extern_declarations)]
        fn proxy_set_property(path_data: *const u8, path_size: usize, value_data: *const u8, value_size: usize) -> u32;
    }
    // SAFETY: both buffers are valid for their lengths during the call; the host copies them.
    let _ = unsafe { proxy_set_property(key.as_ptr(), key.len(), value.as_ptr(), value.len()) };
}

/// The buffered request body of the host's effective context, through the ABI directly (the SDK's
/// `get_buffer` panics on a status it does not expect); empty when there is none.
pub fn buffered_request_body(max: usize) -> Vec<u8> {
    #[link(wasm_import_module = "env")]
    extern "C" {
        #[allow(clashing_extern_declarations)]
        fn proxy_get_buffer_bytes(
            buffer_type: u32,
            start: usize,
            max_size: usize,
            return_buffer_data: *mut *mut u8,
            return_buffer_size: *mut usize,
        ) -> u32;
    }
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    let request_body = proxy_wasm::types::BufferType::HttpRequestBody as u32;
    // SAFETY: as in `header_map`: the host allocates through this module's allocator and passes ownership.
    let status = unsafe { proxy_get_buffer_bytes(request_body, 0, max, &mut data, &mut size) };
    if status != 0 || data.is_null() {
        return Vec::new();
    }
    unsafe { Vec::from_raw_parts(data, size, size) }
}
