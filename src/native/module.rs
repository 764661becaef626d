//! The hooks Envoy calls (`envoy_dynamic_module_on_*`): each reads its inputs through the ABI, hands them to
//! the core with the stream's state, and applies the effects. Every hook runs inside [`guard`]: a panic is
//! caught, counted, and answered with a 503 `OperationOutcome` for that request, never unwound into Envoy.
//!
//! Threads: the filter config is built on Envoy's main thread and shared by every worker. Each worker has
//! its own [`Router`] (token cache included) in the config's slot for that worker, touched by that worker
//! only: the hot path takes no lock.

// The hooks' safety contract is the ABI's, stated once above the hooks rather than on each of them.
#![allow(clippy::missing_safety_doc)]

use std::cell::UnsafeCell;
use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use crate::config::Config;
use crate::effect::{CounterSlot, Effect, Effects, Flow, Gauge, Level, Metric, TokenEvent};
use crate::router::{Router, Stream};

use super::abi::*;
use super::counts::TenantCounts;
use super::crypto::Ring;
use super::host::{log, now_ms, send_response, set_header, MetricIds};
use super::upkeep::{park, unpark, want_token, Awaited, Main, Parked, Published, Quiet, SendPtr, Upkeep};

/// Most worker slots a config keeps (Envoy's `--concurrency`); a worker beyond them gets 503s.
const MAX_WORKERS: usize = 256;

/// One worker's router, and the generation of published fetch answers it has installed.
struct Worker {
    router: Router,
    seen: u64,
    /// This worker's share of the `cache.entries` gauge last added to it: the gauge is the sum over workers.
    cache_entries: u64,
}

/// One worker's state, touched only by that worker's thread.
struct Slot(UnsafeCell<Option<Worker>>);

// SAFETY: slot `i` is only ever accessed on Envoy worker `i` (every hook of a stream runs on its worker's
// thread, and a stream uses the slot of the worker that created it), and dropped with the config on the main
// thread after every stream (each holding the config alive) is gone.
unsafe impl Sync for Slot {}
unsafe impl Send for Slot {}

/// The module's filter config: shared by every worker.
pub struct FilterConfig {
    config: Config,
    metrics: MetricIds,
    slots: Vec<Slot>,
    /// The main thread's part: fetching (with a remote JWKS or a registry) and handing the configured
    /// tenants' counts to Envoy; `None` only without either.
    upkeep: Option<Mutex<Upkeep>>,
    tenant_counts: TenantCounts,
    /// The configured tenants' quota counts (allowed, limited), handed to Envoy on the main thread's tick.
    quota_counts: TenantCounts,
    published: Published,
    parked: Mutex<Parked>,
}

impl FilterConfig {
    /// The sink for one hook's effects on stream `filter`.
    fn apply(&self, filter: FilterEnvoyPtr) -> Apply<'_> {
        Apply {
            filter,
            metrics: &self.metrics,
            tenant_counts: &self.tenant_counts,
            quota_counts: &self.quota_counts,
            resend_failed: None,
        }
    }

    fn main(&self, envoy_config: ConfigEnvoyPtr) -> Main<'_> {
        Main {
            envoy_config: SendPtr(envoy_config),
            metrics: &self.metrics,
            parked: &self.parked,
            published: &self.published,
            tenant_counts: &self.tenant_counts,
            quota_counts: &self.quota_counts,
        }
    }
}

/// One stream's state.
pub struct StreamObject {
    config: *const FilterConfig,
    slot: usize,
    stream: Stream,
    signatures: Ring,
    /// Once parked (for a key set or an upstream token): the scheduler the main thread commits to wake it.
    scheduler: Option<SchedulerPtr>,
}

/// Applies the core's effects to one stream through the ABI.
struct Apply<'a> {
    filter: FilterEnvoyPtr,
    metrics: &'a MetricIds,
    tenant_counts: &'a TenantCounts,
    /// A request to send again (after a 401) that could not be sent: why (see [`token_followup`]).
    resend_failed: Option<String>,
    quota_counts: &'a TenantCounts,
}

fn count(filter: FilterEnvoyPtr, counter: Option<(usize, Option<&str>)>) {
    let Some((id, label)) = counter else { return };
    let mut labels = [ModuleBuffer::of(label.unwrap_or_default().as_bytes())];
    let n = usize::from(label.is_some());
    // SAFETY: as in `set_header`; Envoy reads `n` (0 or 1) labels.
    unsafe { envoy_dynamic_module_callback_http_filter_increment_counter(filter, id, labels.as_mut_ptr(), n, 1) };
}

/// A body as one buffer: what the filter buffered so far, then the frame of this hook (`body_types`:
/// those two, for the request or the response).
fn read_body(filter: FilterEnvoyPtr, body_types: [u32; 2]) -> Vec<u8> {
    let mut out = Vec::new();
    for body_type in body_types {
        // SAFETY: `filter` is live; the vector holds `n` entries for Envoy to fill, each valid during the hook.
        unsafe {
            let n = envoy_dynamic_module_callback_http_get_body_chunks_size(filter, body_type);
            let mut chunks = vec![EnvoyBuffer { ptr: std::ptr::null(), length: 0 }; n];
            if n > 0 && envoy_dynamic_module_callback_http_get_body_chunks(filter, body_type, chunks.as_mut_ptr()) {
                for c in chunks.iter().filter(|c| !c.ptr.is_null()) {
                    out.extend_from_slice(std::slice::from_raw_parts(c.ptr, c.length));
                }
            }
        }
    }
    out
}

/// Replaces the response body (buffered, plus this hook's frame) with `body`.
fn replace_response_body(filter: FilterEnvoyPtr, body: &[u8]) {
    // SAFETY: `filter` is live; `body` outlives the call.
    unsafe {
        let buffered = envoy_dynamic_module_callback_http_get_body_size(filter, BUFFERED_RESPONSE_BODY);
        let received = envoy_dynamic_module_callback_http_get_body_size(filter, RECEIVED_RESPONSE_BODY);
        envoy_dynamic_module_callback_http_drain_body(filter, RECEIVED_RESPONSE_BODY, received);
        let target = if buffered > 0 {
            envoy_dynamic_module_callback_http_drain_body(filter, BUFFERED_RESPONSE_BODY, buffered);
            BUFFERED_RESPONSE_BODY
        } else {
            RECEIVED_RESPONSE_BODY
        };
        envoy_dynamic_module_callback_http_append_body(filter, target, ModuleBuffer::of(body));
    }
}

fn response_header(filter: FilterEnvoyPtr, name: &str) -> Option<String> {
    let mut value = EnvoyBuffer { ptr: std::ptr::null(), length: 0 };
    // SAFETY: `filter` is live; `value` is a valid out pointer, its bytes valid during the hook.
    unsafe {
        let found = envoy_dynamic_module_callback_http_get_header(
            filter,
            RESPONSE_HEADER,
            ModuleBuffer::of(name.as_bytes()),
            &mut value,
            0,
            std::ptr::null_mut(),
        );
        if !found || value.ptr.is_null() {
            return None;
        }
        Some(String::from_utf8_lossy(std::slice::from_raw_parts(value.ptr, value.length)).into_owned())
    }
}

impl Effects for Apply<'_> {
    fn push(&mut self, effect: Effect<'_>) {
        let filter = self.filter;
        match effect {
            Effect::SetRequestHeader(name, value) => set_header(filter, REQUEST_HEADER, name, Some(value)),
            Effect::RemoveRequestHeader(name) => set_header(filter, REQUEST_HEADER, name, None),
            // SAFETY (this and the calls below): `filter` is the live stream of the current hook.
            Effect::ClearRouteCache => unsafe { envoy_dynamic_module_callback_http_clear_route_cache(filter) },
            Effect::Reply(reply) => send_response(filter, reply.status, reply.headers, reply.body),
            Effect::FilterState(key, value) => unsafe {
                envoy_dynamic_module_callback_http_set_filter_state_bytes(
                    filter,
                    ModuleBuffer::of(key.as_bytes()),
                    ModuleBuffer::of(value.as_bytes()),
                );
            },
            // A worker's token request is the main thread's to send and count (see `upkeep`).
            Effect::Count(Metric::UpstreamToken(_, TokenEvent::Fetch)) => {}
            Effect::Count(metric) => {
                // A configured tenant's count goes to Envoy with the main thread's next tick (see `counts`).
                match metric.slot() {
                    CounterSlot::Tenant { tenant, allowed } if self.tenant_counts.add(tenant, allowed) => return,
                    CounterSlot::TenantQuota { tenant, allowed } if self.quota_counts.add(tenant, allowed) => return,
                    _ => {}
                }
                count(filter, self.metrics.counter(metric))
            }
            Effect::Gauge(gauge, value) => {
                if let Some(id) = self.metrics.gauge(gauge) {
                    unsafe {
                        envoy_dynamic_module_callback_http_filter_set_gauge(filter, id, std::ptr::null_mut(), 0, value)
                    };
                }
            }
            Effect::Log(level, line) => log(level, line),
            Effect::SetResponseHeader(name, value) => set_header(filter, RESPONSE_HEADER, name, Some(value)),
            Effect::RemoveResponseHeader(name) => set_header(filter, RESPONSE_HEADER, name, None),
            Effect::ReplaceResponseBody(body) => replace_response_body(filter, body),
            Effect::ResumeRequest => unsafe { envoy_dynamic_module_callback_http_filter_continue_decoding(filter) },
            // Fetches are the main thread's (see `upkeep`): a worker asks it for a tenant's token instead
            // (see `token_followup`).
            Effect::Fetch(_) => {}
            // A request sent again after a 401, from its own stream: answered in `http_callout_done`.
            Effect::Resend(resend) => {
                let mut headers = ModuleHeader::callout_views(resend.headers.iter().copied());
                let mut id = 0u64;
                let status = unsafe {
                    envoy_dynamic_module_callback_http_filter_http_callout(
                        filter,
                        &mut id,
                        ModuleBuffer::of(resend.cluster.as_bytes()),
                        headers.as_mut_ptr(),
                        headers.len(),
                        ModuleBuffer::null(),
                        resend.timeout_ms,
                    )
                };
                if status != CALLOUT_SUCCESS {
                    self.resend_failed =
                        Some(format!("could not be sent through cluster {} (callout status {status})", resend.cluster));
                }
            }
        }
    }
}

/// Copies of the stream's request headers as they are now (after this hook's edits).
fn request_header_copies(filter: FilterEnvoyPtr) -> Vec<(Vec<u8>, Vec<u8>)> {
    let bytes = |ptr: *const u8, len: usize| -> Vec<u8> {
        if ptr.is_null() {
            Vec::new()
        } else {
            // SAFETY: Envoy's header views are valid during this hook.
            unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec()
        }
    };
    // SAFETY: `filter` is live; the vector holds `n` entries for Envoy to fill, valid during this hook.
    unsafe {
        let n = envoy_dynamic_module_callback_http_get_headers_size(filter, REQUEST_HEADER);
        let empty =
            EnvoyHeader { key_ptr: std::ptr::null(), key_length: 0, value_ptr: std::ptr::null(), value_length: 0 };
        let mut views = vec![empty; n];
        if n == 0 || !envoy_dynamic_module_callback_http_get_headers(filter, REQUEST_HEADER, views.as_mut_ptr()) {
            return Vec::new();
        }
        views
            .iter()
            .filter(|h| !h.key_ptr.is_null())
            .map(|h| (bytes(h.key_ptr, h.key_length), bytes(h.value_ptr, h.value_length)))
            .collect()
    }
}

/// After an event of a stream whose tenant has `upstream_auth`: keeps its request headers if it may be
/// sent again after a 401, answers it if it could not be sent again (`resend_failed`), parks it if it
/// waits for its tenant's token, and asks the main thread for a new token when one is wanted (for it, or
/// a renewal).
fn token_followup(
    cfg: &FilterConfig,
    router: &mut Router,
    object: &mut StreamObject,
    filter: FilterEnvoyPtr,
    resend_failed: Option<String>,
) {
    if object.stream.token_slot().is_none() {
        return;
    }
    if object.stream.wants_headers() {
        let headers = request_header_copies(filter);
        object.stream.keep_header_pairs(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
    }
    if let Some(why) = resend_failed {
        let mut apply = cfg.apply(filter);
        router.on_resend_response(&mut object.stream, Err(&why), &[], &[], &mut apply);
    }
    let Some((tenant, have)) = router.token_wanted(&object.stream, now_ms()) else { return };
    if object.stream.waits_for_token() {
        // SAFETY: `filter` is live; the scheduler is deleted in `destroy`, after it is unlisted.
        let scheduler = *object
            .scheduler
            .get_or_insert_with(|| unsafe { envoy_dynamic_module_callback_http_filter_scheduler_new(filter) });
        park(&cfg.parked, object.stream.context_id(), scheduler, Awaited::Token(tenant.to_string()));
    }
    want_token(&cfg.parked, tenant, have);
}

/// The body of the 503 that answers a request whose hook panicked.
const PANIC_OUTCOME: &str = r#"{"issue":[{"code":"exception","diagnostics":"The request could not be processed; retry shortly.","severity":"error"}],"resourceType":"OperationOutcome"}"#;

/// A 503 with an `OperationOutcome` body (no config needed).
fn unavailable(filter: FilterEnvoyPtr, body: &[u8]) {
    send_response(filter, 503, &[("content-type", "application/fhir+json"), ("cache-control", "no-store")], body);
}

/// Runs a hook, catching a panic: counted, logged, and (for request-path hooks with a stream) answered
/// with a 503 `OperationOutcome`. `fallback` is what the hook returns then.
fn guard<T>(
    hook: &'static str,
    filter: FilterEnvoyPtr,
    config: Option<&FilterConfig>,
    answer: bool,
    fallback: T,
    f: impl FnOnce() -> T,
) -> T {
    let f = || {
        #[cfg(feature = "panic-probe")]
        super::probe::fire(hook);
        f()
    };
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => value,
        Err(_) => {
            let line = if answer {
                format!("fhir_tenant_router: the {hook} hook panicked; the request was answered 503")
            } else {
                format!("fhir_tenant_router: the {hook} hook panicked; caught")
            };
            log(Level::Error, &line);
            if let Some(config) = config {
                count(filter, config.metrics.panics.map(|id| (id, None)));
            }
            if answer && !filter.is_null() {
                let _ = catch_unwind(|| unavailable(filter, PANIC_OUTCOME.as_bytes()));
            }
            fallback
        }
    }
}

/// A worker's housekeeping effects: its cache size goes into the process-wide `cache.entries` gauge as the
/// change since its last report (each worker has its own cache; a plain set would keep only the last one's).
struct WorkerGauges<'a> {
    filter: FilterEnvoyPtr,
    metrics: &'a MetricIds,
    cache_entries: &'a mut u64,
}

impl Effects for WorkerGauges<'_> {
    fn push(&mut self, effect: Effect<'_>) {
        match effect {
            Effect::Gauge(Gauge::CacheEntries, now) => {
                let Some(id) = self.metrics.gauge(Gauge::CacheEntries) else { return };
                let before = std::mem::replace(self.cache_entries, now);
                // SAFETY: `filter` is the live stream of the current hook.
                unsafe {
                    if now > before {
                        envoy_dynamic_module_callback_http_filter_increment_gauge(
                            self.filter,
                            id,
                            std::ptr::null_mut(),
                            0,
                            now - before,
                        );
                    } else if now < before {
                        envoy_dynamic_module_callback_http_filter_decrement_gauge(
                            self.filter,
                            id,
                            std::ptr::null_mut(),
                            0,
                            before - now,
                        );
                    }
                }
            }
            Effect::Log(level, line) => log(level, line),
            _ => {}
        }
    }
}

/// Applies only the log lines of a series of effects.
struct LogsOnly;

impl Effects for LogsOnly {
    fn push(&mut self, effect: Effect<'_>) {
        if let Effect::Log(level, line) = effect {
            log(level, line);
        }
    }
}

thread_local! {
    /// A worker's buffer for the request header views (taken during a hook, put back after).
    static HEADERS: std::cell::Cell<Vec<EnvoyHeader>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Context ids for the core's streams (unique per process).
static NEXT_STREAM_ID: AtomicU32 = AtomicU32::new(1);

/// The config's worker state for the current worker, created on the worker's first stream.
///
/// # Safety
/// Call only on Envoy worker `slot`'s thread (see [`Slot`]).
#[allow(clippy::mut_from_ref)] // the slot's UnsafeCell: one worker's exclusive state (see `Slot`)
unsafe fn worker(config: &FilterConfig, slot: usize) -> Option<&mut Worker> {
    let cell = config.slots.get(slot)?;
    let worker = unsafe { &mut *cell.0.get() };
    Some(worker.get_or_insert_with(|| Worker {
        router: Router::new(config.config.clone(), now_ms(), &mut Quiet),
        seen: 0,
        cache_entries: 0,
    }))
}

/// The worker's router.
///
/// # Safety
/// As for [`worker`].
#[allow(clippy::mut_from_ref)] // see `worker`
unsafe fn router(config: &FilterConfig, slot: usize) -> Option<&mut Router> {
    unsafe { worker(config, slot) }.map(|w| &mut w.router)
}

/// The worker's router with the latest published key sets and tenant map installed: for the hooks that
/// decide a request (its headers, and its wake-up after a key set).
///
/// # Safety
/// As for [`worker`].
#[allow(clippy::mut_from_ref)] // see `worker`
unsafe fn deciding_router(config: &FilterConfig, slot: usize) -> Option<&mut Router> {
    let worker = unsafe { worker(config, slot) }?;
    config.published.sync(&mut worker.router, &mut worker.seen);
    Some(&mut worker.router)
}

fn headers_status(flow: Flow) -> u32 {
    if flow.proceeds() {
        HEADERS_CONTINUE
    } else {
        HEADERS_STOP_ITERATION
    }
}

fn body_status(flow: Flow) -> u32 {
    if flow.proceeds() {
        BODY_CONTINUE
    } else {
        BODY_STOP_AND_BUFFER
    }
}

/// The stream object and its config behind a hook's module pointer.
///
/// # Safety
/// `module` must be a pointer returned by [`envoy_dynamic_module_on_http_filter_new`], not yet destroyed.
unsafe fn stream<'a>(module: FilterModulePtr) -> Option<(&'a FilterConfig, &'a mut StreamObject)> {
    let object = unsafe { (module as *mut StreamObject).as_mut()? };
    let config = unsafe { object.config.as_ref()? };
    Some((config, object))
}

// ---- hooks ----
//
// Envoy calls these with the pointers it was given (or gave): they are `unsafe extern "C"` because their
// safety rests on Envoy keeping the ABI's contract (live pointers, a stream's hooks on its worker).

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    ABI_VERSION.as_ptr().cast()
}

/// Compiles the plugin JSON (the same as the wasm filter's); a bad one is refused with a log line naming the
/// field (Envoy then rejects the filter config).
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    envoy_config: ConfigEnvoyPtr,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> ConfigModulePtr {
    guard("config_new", std::ptr::null_mut(), None, false, std::ptr::null(), || {
        // SAFETY: Envoy's buffer is valid during this call.
        let bytes = if config.ptr.is_null() {
            &[][..]
        } else {
            unsafe { std::slice::from_raw_parts(config.ptr, config.length) }
        };
        let compiled = match Config::from_json(bytes) {
            Ok(c) => c,
            Err(e) => {
                log(Level::Error, &e.to_string());
                return std::ptr::null();
            }
        };
        // The start-up line, once (each worker's router is built quietly from the same config); with anything
        // to fetch, this router stays on the main thread to fetch it.
        let main = Router::new(compiled.clone(), now_ms(), &mut LogsOnly);
        let tenant_counts = TenantCounts::new(compiled.tenants.ids());
        let quota_counts = TenantCounts::new(compiled.tenants.ids());
        let ticks = compiled.fetches() || !compiled.tenants.is_empty();
        // SAFETY: config_new, main thread, this config.
        let upkeep = ticks.then(|| unsafe { Upkeep::start(main, envoy_config) });
        // A worker's token wish wakes the main thread at once.
        let parked = Mutex::new(Parked::waking(upkeep.as_ref().map(Upkeep::waker)));
        let upkeep = upkeep.map(Mutex::new);
        let slots = (0..MAX_WORKERS).map(|_| Slot(UnsafeCell::new(None))).collect();
        let filter_config = FilterConfig {
            config: compiled,
            metrics: MetricIds::define(envoy_config),
            slots,
            upkeep,
            tenant_counts,
            quota_counts,
            published: Published::default(),
            parked,
        };
        Box::into_raw(Box::new(filter_config)) as ConfigModulePtr
    })
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: ConfigModulePtr) {
    guard("config_destroy", std::ptr::null_mut(), None, false, (), || {
        if !config.is_null() {
            // SAFETY: `config` came from `Box::into_raw` in config_new, and Envoy destroys it once.
            drop(unsafe { Box::from_raw(config as *mut FilterConfig) });
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: ConfigModulePtr,
    filter: FilterEnvoyPtr,
) -> FilterModulePtr {
    // SAFETY: Envoy keeps the config alive while any of its filters exist.
    let Some(cfg) = (unsafe { (config as *const FilterConfig).as_ref() }) else { return std::ptr::null() };
    guard("filter_new", filter, Some(cfg), false, std::ptr::null(), || {
        // SAFETY: `filter` is the stream being created.
        let slot = unsafe { envoy_dynamic_module_callback_http_filter_get_worker_index(filter) } as usize;
        let stream = match unsafe { router(cfg, slot) } {
            Some(router) => router.open_stream(NEXT_STREAM_ID.fetch_add(1, Ordering::Relaxed)),
            None => Stream::new(0),
        };
        let object = StreamObject { config: cfg, slot, stream, signatures: Ring::default(), scheduler: None };
        Box::into_raw(Box::new(object)) as FilterModulePtr
    })
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter: FilterEnvoyPtr,
    module: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: `module` is this stream's object; hooks of a stream run on its worker.
    let Some((cfg, object)) = (unsafe { stream(module) }) else {
        // No stream object (`filter_new` failed): an undecided request never goes on. Fail closed.
        if !filter.is_null() {
            let _ = catch_unwind(|| unavailable(filter, PANIC_OUTCOME.as_bytes()));
        }
        return HEADERS_STOP_ITERATION;
    };
    guard("request_headers", filter, Some(cfg), true, HEADERS_STOP_ITERATION, || {
        #[cfg(feature = "bench-floor")]
        if let Some(status) = super::floor::request_headers(filter, &cfg.config) {
            return status;
        }
        let Some(router) = (unsafe { deciding_router(cfg, object.slot) }) else {
            unavailable(filter, PANIC_OUTCOME.as_bytes());
            return HEADERS_STOP_ITERATION;
        };
        // SAFETY: `filter` is live; the array holds `n` entries for Envoy to fill, valid during this hook.
        // The header views go into this worker's reusable buffer: no allocation per request.
        let mut buffer = HEADERS.with(|b| b.take());
        // SAFETY: `filter` is live; the buffer holds `n` entries for Envoy to fill, valid during this hook.
        unsafe {
            let n = envoy_dynamic_module_callback_http_get_headers_size(filter, REQUEST_HEADER);
            buffer.clear();
            buffer.resize(
                n,
                EnvoyHeader { key_ptr: std::ptr::null(), key_length: 0, value_ptr: std::ptr::null(), value_length: 0 },
            );
            if n > 0 && !envoy_dynamic_module_callback_http_get_headers(filter, REQUEST_HEADER, buffer.as_mut_ptr()) {
                buffer.clear();
            }
        }
        let headers = &buffer;
        let pairs = headers.iter().filter(|h| !h.key_ptr.is_null()).map(|h| {
            // SAFETY: Envoy's header views are valid during this hook.
            unsafe {
                let value: &[u8] =
                    if h.value_ptr.is_null() { &[] } else { std::slice::from_raw_parts(h.value_ptr, h.value_length) };
                (std::slice::from_raw_parts(h.key_ptr, h.key_length), value)
            }
        });
        let mut apply = cfg.apply(filter);
        let flow = router.on_request_headers(
            &mut object.stream,
            pairs,
            end_of_stream,
            now_ms(),
            &object.signatures,
            &mut apply,
        );
        let resend_failed = apply.resend_failed.take();
        HEADERS.with(|b| b.replace(buffer));
        if let Some(provider) = object.stream.waiting_for() {
            // SAFETY: `filter` is live; the scheduler is deleted in `destroy`, after it is unlisted.
            let scheduler = unsafe { envoy_dynamic_module_callback_http_filter_scheduler_new(filter) };
            object.scheduler = Some(scheduler);
            park(&cfg.parked, object.stream.context_id(), scheduler, Awaited::Keys(provider));
        }
        token_followup(cfg, router, object, filter, resend_failed);
        headers_status(flow)
    })
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    filter: FilterEnvoyPtr,
    module: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    let Some((cfg, object)) = (unsafe { stream(module) }) else { return BODY_CONTINUE };
    guard("request_body", filter, Some(cfg), true, BODY_STOP_AND_BUFFER, || {
        let Some(router) = (unsafe { router(cfg, object.slot) }) else { return BODY_CONTINUE };
        let mut apply = cfg.apply(filter);
        let mut body = || read_body(filter, [BUFFERED_REQUEST_BODY, RECEIVED_REQUEST_BODY]);
        body_status(router.on_request_body(&mut object.stream, end_of_stream, now_ms(), &mut body, &mut apply))
    })
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _filter: FilterEnvoyPtr,
    _module: FilterModulePtr,
) -> u32 {
    TRAILERS_CONTINUE
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    filter: FilterEnvoyPtr,
    module: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    let Some((cfg, object)) = (unsafe { stream(module) }) else { return HEADERS_CONTINUE };
    guard("response_headers", filter, Some(cfg), false, HEADERS_CONTINUE, || {
        if object.stream.may_resend() {
            // Sent with an upstream token: a 401 sends it again with a new one (the response held meanwhile).
            let Some(router) = (unsafe { deciding_router(cfg, object.slot) }) else { return HEADERS_CONTINUE };
            let status = response_header(filter, ":status");
            let mut apply = cfg.apply(filter);
            if let Some(flow) = router.on_upstream_response(&mut object.stream, status.as_deref(), now_ms(), &mut apply)
            {
                let resend_failed = apply.resend_failed.take();
                token_followup(cfg, router, object, filter, resend_failed);
                return headers_status(flow);
            }
        }
        let Some(router) = (unsafe { router(cfg, object.slot) }) else { return HEADERS_CONTINUE };
        let mut apply = cfg.apply(filter);
        let header = |name: &str| response_header(filter, name);
        headers_status(router.on_response_headers(&mut object.stream, end_of_stream, &header, &mut apply))
    })
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    filter: FilterEnvoyPtr,
    module: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    let Some((cfg, object)) = (unsafe { stream(module) }) else { return BODY_CONTINUE };
    guard("response_body", filter, Some(cfg), false, BODY_CONTINUE, || {
        let Some(router) = (unsafe { router(cfg, object.slot) }) else { return BODY_CONTINUE };
        let mut apply = cfg.apply(filter);
        let mut body = || read_body(filter, [BUFFERED_RESPONSE_BODY, RECEIVED_RESPONSE_BODY]);
        body_status(router.on_response_body(&mut object.stream, end_of_stream, &mut body, &mut apply))
    })
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _filter: FilterEnvoyPtr,
    _module: FilterModulePtr,
) -> u32 {
    TRAILERS_CONTINUE
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    filter: FilterEnvoyPtr,
    module: FilterModulePtr,
) {
    let Some((cfg, object)) = (unsafe { stream(module) }) else { return };
    guard("stream_complete", filter, Some(cfg), false, (), || {
        if let Some(worker) = unsafe { worker(cfg, object.slot) } {
            worker.router.on_stream_done(&mut object.stream);
            let mut gauges = WorkerGauges { filter, metrics: &cfg.metrics, cache_entries: &mut worker.cache_entries };
            worker.router.housekeep_if_due(now_ms(), &mut gauges);
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(module: FilterModulePtr) {
    if module.is_null() {
        return;
    }
    let _ = catch_unwind(|| {
        // SAFETY: `module` came from `Box::into_raw` in filter_new; Envoy destroys it once, and its config
        // outlives it.
        let object = unsafe { Box::from_raw(module as *mut StreamObject) };
        if let (Some(scheduler), Some(cfg)) = (object.scheduler, unsafe { object.config.as_ref() }) {
            unpark(&cfg.parked, object.stream.context_id());
            // SAFETY: unlisted above, so the main thread will not commit it any more.
            unsafe { envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler) };
        }
    });
}

/// The answer to a request sent again after a 401 (its stream's only callout): the client gets it.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    filter: FilterEnvoyPtr,
    module: FilterModulePtr,
    _callout_id: u64,
    result: u32,
    headers: *mut EnvoyHeader,
    headers_size: usize,
    body_chunks: *mut EnvoyBuffer,
    body_chunks_size: usize,
) {
    let Some((cfg, object)) = (unsafe { stream(module) }) else { return };
    guard("http_callout_done", filter, Some(cfg), true, (), || {
        let Some(router) = (unsafe { router(cfg, object.slot) }) else { return };
        // SAFETY: Envoy's arrays (or null on failure) are valid during this hook.
        let (status, headers, body) =
            unsafe { callout_answer(result, headers, headers_size, body_chunks, body_chunks_size) };
        let status = status.as_deref().ok_or("connection failure or timeout");
        let mut apply = cfg.apply(filter);
        router.on_resend_response(&mut object.stream, status, &headers, &body, &mut apply);
    })
}

/// A callout's answer: its `:status` (`None` if it failed: `result` not success), its headers (lowercase
/// names, as Envoy keeps them) and its body.
///
/// # Safety
/// The arrays (or nulls) are Envoy's, valid during the hook that reads them.
unsafe fn callout_answer(
    result: u32,
    headers: *mut EnvoyHeader,
    headers_size: usize,
    body_chunks: *mut EnvoyBuffer,
    body_chunks_size: usize,
) -> (Option<String>, Vec<(String, String)>, Vec<u8>) {
    let headers: &[EnvoyHeader] =
        if headers.is_null() { &[] } else { unsafe { std::slice::from_raw_parts(headers, headers_size) } };
    let chunks: &[EnvoyBuffer] =
        if body_chunks.is_null() { &[] } else { unsafe { std::slice::from_raw_parts(body_chunks, body_chunks_size) } };
    let bytes = |ptr: *const u8, len: usize| -> &[u8] {
        if ptr.is_null() {
            &[]
        } else {
            unsafe { std::slice::from_raw_parts(ptr, len) }
        }
    };
    let text = |ptr: *const u8, len: usize| String::from_utf8_lossy(bytes(ptr, len)).into_owned();
    let headers: Vec<(String, String)> =
        headers.iter().map(|h| (text(h.key_ptr, h.key_length), text(h.value_ptr, h.value_length))).collect();
    let status =
        headers.iter().find(|(n, _)| n == ":status").map(|(_, v)| v.clone()).filter(|_| result == CALLOUT_SUCCESS);
    let body: Vec<u8> = chunks.iter().flat_map(|c| bytes(c.ptr, c.length).iter().copied()).collect();
    (status, headers, body)
}

// Hooks Envoy requires but this filter does not use (streams, watermarks).

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _filter: FilterEnvoyPtr,
    _module: FilterModulePtr,
    _stream_id: u64,
    _headers: *mut EnvoyHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _filter: FilterEnvoyPtr,
    _module: FilterModulePtr,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _filter: FilterEnvoyPtr,
    _module: FilterModulePtr,
    _stream_id: u64,
    _trailers: *mut EnvoyHeader,
    _trailers_size: usize,
) {
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _filter: FilterEnvoyPtr,
    _module: FilterModulePtr,
    _stream_id: u64,
) {
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _filter: FilterEnvoyPtr,
    _module: FilterModulePtr,
    _stream_id: u64,
    _reason: u32,
) {
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    filter: FilterEnvoyPtr,
    module: FilterModulePtr,
    _event_id: u64,
) {
    // A key set or an upstream token arrived (or its fetch failed) while this request was parked: decide it
    // again (or send it again, after a 401).
    let Some((cfg, object)) = (unsafe { stream(module) }) else { return };
    guard("scheduled", filter, Some(cfg), true, (), || {
        let Some(router) = (unsafe { deciding_router(cfg, object.slot) }) else { return };
        let mut apply = cfg.apply(filter);
        let mut body = || read_body(filter, [BUFFERED_REQUEST_BODY, RECEIVED_REQUEST_BODY]);
        router.wake(&mut object.stream, now_ms(), &object.signatures, &mut body, &mut apply);
        let resend_failed = apply.resend_failed.take();
        token_followup(cfg, router, object, filter, resend_failed);
    })
}

/// A config-level scheduler event on the main thread: the fetch schedules' tick.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    envoy_config: ConfigEnvoyPtr,
    config: ConfigModulePtr,
    _event_id: u64,
) {
    let Some(cfg) = (unsafe { (config as *const FilterConfig).as_ref() }) else { return };
    guard("config_scheduled", std::ptr::null_mut(), None, false, (), || {
        if let Some(Ok(mut upkeep)) = cfg.upkeep.as_ref().map(Mutex::lock) {
            upkeep.tick(&cfg.main(envoy_config));
        }
    })
}

/// A config-level callout's answer, on the main thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    envoy_config: ConfigEnvoyPtr,
    config: ConfigModulePtr,
    callout_id: u64,
    result: u32,
    headers: *mut EnvoyHeader,
    headers_size: usize,
    body_chunks: *mut EnvoyBuffer,
    body_chunks_size: usize,
) {
    let Some(cfg) = (unsafe { (config as *const FilterConfig).as_ref() }) else { return };
    guard("config_http_callout_done", std::ptr::null_mut(), None, false, (), || {
        // SAFETY: Envoy's arrays (or null on failure) are valid during this hook.
        let (status, _, body) = unsafe { callout_answer(result, headers, headers_size, body_chunks, body_chunks_size) };
        if let Some(Ok(mut upkeep)) = cfg.upkeep.as_ref().map(Mutex::lock) {
            upkeep.called_back(&cfg.main(envoy_config), callout_id, status.as_deref(), body);
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _filter: FilterEnvoyPtr,
    _module: FilterModulePtr,
) {
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _filter: FilterEnvoyPtr,
    _module: FilterModulePtr,
) {
}
