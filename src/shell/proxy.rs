//! The proxy-wasm side (wasm32 only): [`ProxyWasmHost`] implements [`Host`] over the ABI, and two small
//! adapters give the SDK's traits to the shell's root and HTTP contexts. No logic lives here.
//!
//! Buffers, header maps and filter state go through the ABI directly where the SDK would panic: its
//! `get_map` panics on a header value that is not UTF-8 (a client chooses those), and its `get_buffer`,
//! `set_property` and shared-data calls panic on a status they do not expect.

use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};

use crate::effect::{Flow, Level};

use super::filter::Filter;
use super::host::{ForeignCall, Host, MetricKind, SharedWrite};
use super::root::Root;

#[link(wasm_import_module = "env")]
extern "C" {
    #[allow(clashing_extern_declarations)]
    fn proxy_get_header_map_pairs(map_type: u32, return_map_data: *mut *mut u8, return_map_size: *mut usize) -> u32;
    #[allow(clashing_extern_declarations)]
    fn proxy_set_property(path_data: *const u8, path_size: usize, value_data: *const u8, value_size: usize) -> u32;
    #[allow(clashing_extern_declarations)]
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    #[allow(clashing_extern_declarations)]
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    #[allow(clashing_extern_declarations)]
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
}

/// A buffer the host allocated through this module's allocator, taken over; empty on any failure.
///
/// SAFETY (of the callers): the host writes a buffer it allocated through this module's
/// `proxy_on_memory_allocate` (the SDK's allocator, i.e. the global one) and its size; ownership passes
/// to us, as in the SDK's own `get_map` and `get_buffer`.
fn take_host_buffer(status: u32, data: *mut u8, size: usize) -> Vec<u8> {
    if status != 0 || data.is_null() {
        return Vec::new();
    }
    unsafe { Vec::from_raw_parts(data, size, size) }
}

fn buffer(kind: BufferType, max: usize) -> Vec<u8> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    let status = unsafe { proxy_get_buffer_bytes(kind as u32, 0, max, &mut data, &mut size) };
    take_host_buffer(status, data, size)
}

fn header(map: MapType, name: &str) -> Option<String> {
    hostcalls::get_map_value_bytes(map, name).ok().flatten().map(|v| String::from_utf8_lossy(&v).into_owned())
}

/// The host inside Envoy.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProxyWasmHost;

impl Host for ProxyWasmHost {
    fn now_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn now_ns(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }

    fn log(&self, level: Level, message: &str) {
        let level = match level {
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        let _ = hostcalls::log(level, message);
    }

    fn plugin_configuration(&self) -> Vec<u8> {
        buffer(BufferType::PluginConfiguration, usize::MAX)
    }

    fn set_tick_period_ms(&self, period_ms: u64) {
        let _ = hostcalls::set_tick_period(Duration::from_millis(period_ms));
    }

    fn memory_bytes(&self) -> u64 {
        (core::arch::wasm32::memory_size(0) as u64).saturating_mul(65_536)
    }

    fn env(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn request_header_pairs(&self) -> Vec<u8> {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut size: usize = 0;
        let map = MapType::HttpRequestHeaders as u32;
        let status = unsafe { proxy_get_header_map_pairs(map, &mut data, &mut size) };
        take_host_buffer(status, data, size)
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value);
    }

    fn request_body(&self, max: usize) -> Vec<u8> {
        buffer(BufferType::HttpRequestBody, max)
    }

    fn response_header(&self, name: &str) -> Option<String> {
        header(MapType::HttpResponseHeaders, name)
    }

    fn set_response_header(&self, name: &str, value: Option<&str>) {
        let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, value);
    }

    fn response_body(&self, size: usize) -> Vec<u8> {
        buffer(BufferType::HttpResponseBody, size)
    }

    fn set_response_body(&self, size: usize, body: &[u8]) {
        let _ = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, size, body);
    }

    fn send_reply(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        let _ = hostcalls::send_http_response(status, headers.to_vec(), Some(body));
    }

    fn resume_request(&self) {
        let _ = hostcalls::resume_http_request();
    }

    fn source_address(&self) -> Option<String> {
        // Envoy's `source.address` attribute: the downstream peer's address as a string (`ip:port`).
        let bytes = hostcalls::get_property(vec!["source", "address"]).ok().flatten()?;
        String::from_utf8(bytes).ok()
    }

    fn set_effective_context(&self, context_id: u32) -> bool {
        hostcalls::set_effective_context(context_id).is_ok()
    }

    fn clear_route_cache(&self) {
        let _ = hostcalls::call_foreign_function("clear_route_cache", None);
    }

    fn set_filter_state(&self, key: &str, value: &str) {
        // SAFETY: both buffers are valid for their lengths during the call; the host copies them.
        let _ = unsafe { proxy_set_property(key.as_ptr(), key.len(), value.as_ptr(), value.len()) };
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> Option<u32> {
        let kind = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Gauge => MetricType::Gauge,
        };
        hostcalls::define_metric(kind, name).ok()
    }

    fn increment_metric(&self, id: u32, by: i64) {
        let _ = hostcalls::increment_metric(id, by);
    }

    fn record_metric(&self, id: u32, value: u64) {
        let _ = hostcalls::record_metric(id, value);
    }

    fn dispatch(&self, cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout_ms: u64) -> Result<u32, String> {
        let body = (!body.is_empty()).then_some(body);
        hostcalls::dispatch_http_call(cluster, headers.to_vec(), body, vec![], Duration::from_millis(timeout_ms))
            .map_err(|status| format!("{status:?}"))
    }

    fn call_response_status(&self) -> Option<String> {
        header(MapType::HttpCallResponseHeaders, ":status")
    }

    fn call_response_headers(&self) -> Vec<(String, String)> {
        hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders)
            .map(|pairs| pairs.into_iter().map(|(n, v)| (n, String::from_utf8_lossy(&v).into_owned())).collect())
            .unwrap_or_default()
    }

    fn call_response_body(&self, size: usize) -> Vec<u8> {
        buffer(BufferType::HttpCallResponseBody, size)
    }

    fn shared_data(&self, key: &str) -> Option<(Option<Vec<u8>>, u32)> {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut size: usize = 0;
        let mut cas: u32 = 0;
        // SAFETY: the key is valid for the call; the host fills the out pointers (see `take_host_buffer`).
        let status = unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
        match status {
            s if s == Status::Ok as u32 => Some(((!data.is_null()).then(|| take_host_buffer(status, data, size)), cas)),
            s if s == Status::NotFound as u32 => Some((None, 0)),
            _ => None,
        }
    }

    fn set_shared_data(&self, key: &str, value: &[u8], cas: u32) -> SharedWrite {
        // SAFETY: both buffers are valid for their lengths during the call; the host copies them.
        let status = unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) };
        match status {
            s if s == Status::Ok as u32 => SharedWrite::Stored,
            s if s == Status::CasMismatch as u32 => SharedWrite::CasMismatch,
            _ => SharedWrite::Failed,
        }
    }

    fn verify_signature(&self, arguments: &[u8]) -> ForeignCall {
        match hostcalls::call_foreign_function("verify_signature", Some(arguments)) {
            Ok(result) => ForeignCall::Answered(result.unwrap_or_default()),
            Err(Status::NotFound) => ForeignCall::NotFound,
            Err(_) => ForeignCall::Failed,
        }
    }
}

fn action(flow: Flow) -> Action {
    if flow.proceeds() {
        Action::Continue
    } else {
        Action::Pause
    }
}

/// The SDK's root context over the shell's [`Root`].
pub struct RootAdapter(Root<ProxyWasmHost>);

impl Default for RootAdapter {
    fn default() -> Self {
        Self(Root::new(ProxyWasmHost))
    }
}

impl Context for RootAdapter {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _trailers: usize) {
        self.0.on_http_call_response(token_id, body_size);
    }
}

impl RootContext for RootAdapter {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.0.on_configure()
    }

    fn on_tick(&mut self) {
        self.0.on_tick();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(FilterAdapter(self.0.create_filter(context_id)?)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The SDK's HTTP context over the shell's [`Filter`].
pub struct FilterAdapter(Filter<ProxyWasmHost>);

impl Context for FilterAdapter {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _trailers: usize) {
        self.0.on_http_call_response(token_id, body_size);
    }

    fn on_done(&mut self) -> bool {
        self.0.on_done();
        true
    }
}

impl HttpContext for FilterAdapter {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        #[cfg(feature = "bench-floor-wasm")]
        if let Some(action) = super::floor::request_headers(&self.0) {
            return action;
        }
        action(self.0.on_request_headers(end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.0.on_request_body(body_size, end_of_stream))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        action(self.0.on_request_trailers())
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(self.0.on_response_headers(end_of_stream))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.0.on_response_body(body_size, end_of_stream))
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        action(self.0.on_response_trailers())
    }
}
