//! Everything the shell asks of its host, as one small trait: the proxy-wasm ABI inside Envoy
//! ([`super::proxy`], wasm32 only), and a fake that records every call in tests ([`super::fake`]).
//! Every method is total: a host call that fails is ignored or reads as absent, never a panic.

use crate::effect::Level;

/// A counter or a gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
}

/// What the host's `verify_signature` foreign function answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForeignCall {
    /// It answered (the result's bytes).
    Answered(Vec<u8>),
    /// The host has no function of that name.
    NotFound,
    /// The call failed (bad arguments).
    Failed,
}

/// What a compare-and-swap write to the host's shared data did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedWrite {
    Stored,
    /// Another writer changed the key since its CAS token was read.
    CasMismatch,
    /// The host refused the write (no shared data).
    Failed,
}

/// The host calls of the proxy-wasm shell.
pub trait Host {
    /// The host's clock, milliseconds since the epoch.
    fn now_ms(&self) -> u64;
    /// The host's clock, nanoseconds since the epoch (the verify time of `span_tags`).
    fn now_ns(&self) -> u64;
    /// The downstream peer's address (`source.address`, `ip:port`) of the current request.
    fn source_address(&self) -> Option<String>;
    fn log(&self, level: Level, message: &str);
    /// The plugin configuration (empty when there is none).
    fn plugin_configuration(&self) -> Vec<u8>;
    fn set_tick_period_ms(&self, period_ms: u64);
    /// The VM's linear memory, in bytes.
    fn memory_bytes(&self) -> u64;
    /// An environment variable of the VM (`vm_config.environment_variables`).
    fn env(&self, name: &str) -> Option<String>;

    /// The request headers, serialized as the proxy-wasm ABI hands them over (see [`crate::headers`]).
    fn request_header_pairs(&self) -> Vec<u8>;
    /// Sets (`Some`) or removes (`None`) a request header. Envoy (its wasm host, for a module of ABI 0.2.1
    /// such as ours) clears the route cache on every request-header edit: see [`Host::clear_route_cache`].
    fn set_request_header(&self, name: &str, value: Option<&str>);
    /// Up to `max` bytes of the buffered request body.
    fn request_body(&self, max: usize) -> Vec<u8>;
    /// One response header, lossily decoded.
    fn response_header(&self, name: &str) -> Option<String>;
    /// Sets (`Some`) or removes (`None`) a response header.
    fn set_response_header(&self, name: &str, value: Option<&str>);
    /// The first `size` bytes of the buffered response body.
    fn response_body(&self, size: usize) -> Vec<u8>;
    /// Replaces the first `size` bytes of the response body.
    fn set_response_body(&self, size: usize, body: &[u8]);
    fn send_reply(&self, status: u32, headers: &[(&str, &str)], body: &[u8]);
    fn resume_request(&self);
    /// Makes `context_id` the context later calls act on; `false` when it is gone.
    fn set_effective_context(&self, context_id: u32) -> bool;
    /// Envoy's `clear_route_cache` foreign function (Envoy 1.33+). Redundant after a request-header edit of
    /// this callback: Envoy's `Context::onHeadersModified` already cleared the route cache (it stops doing so
    /// only for modules of an ABI newer than 0.2.1; ours is 0.2.1), so [`super::apply::Apply`] calls it only
    /// where no edit was made.
    fn clear_route_cache(&self);
    fn set_filter_state(&self, key: &str, value: &str);

    fn define_metric(&self, kind: MetricKind, name: &str) -> Option<u32>;
    fn increment_metric(&self, id: u32, by: i64);
    fn record_metric(&self, id: u32, value: u64);

    /// Sends an HTTP call through `cluster`; its token, or why it could not be sent.
    fn dispatch(&self, cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout_ms: u64) -> Result<u32, String>;
    /// The `:status` of the HTTP call response being delivered (`None`: no response).
    fn call_response_status(&self) -> Option<String>;
    /// Every header of that response (lowercase names), pseudo-headers included.
    fn call_response_headers(&self) -> Vec<(String, String)>;
    /// The first `size` bytes of that response's body.
    fn call_response_body(&self, size: usize) -> Vec<u8>;

    /// Envoy's `verify_signature` foreign function.
    fn verify_signature(&self, arguments: &[u8]) -> ForeignCall;

    /// The host's shared data under `key` (one namespace per `vm_id`, shared by every worker's VM): its
    /// value (`None`: no such key) and CAS token; `None` when the host has none.
    fn shared_data(&self, key: &str) -> Option<(Option<Vec<u8>>, u32)>;
    /// Writes `value` under `key` if its CAS token is still `cas` (Envoy: `0` writes unconditionally).
    fn set_shared_data(&self, key: &str, value: &[u8], cas: u32) -> SharedWrite;
}
