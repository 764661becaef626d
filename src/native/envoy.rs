//! Everything the dynamic-module shell asks of Envoy, as one small trait: the per-stream calls (a stream's
//! headers, bodies, local reply, stats, scheduler, callouts) and the per-config calls of the main thread
//! (stats, the config-level scheduler and its ticker, callouts). [`Abi`] makes them through Envoy's C ABI
//! ([`super::abi`]) and is the only code that calls an `extern "C"` function of it; the unit tests drive the
//! same hook logic with a fake Envoy that enforces Envoy's rules (`super::fake`).
//!
//! The getters hand out Envoy's own memory, as the ABI does ([`EnvoyHeader`], [`EnvoyBuffer`]): valid during
//! the hook and only until the next setter or remover on that header map (or body). A caller copies what
//! it keeps before it changes anything.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::effect::Level;

use super::abi::{ConfigEnvoyPtr, EnvoyBuffer, EnvoyHeader, FilterEnvoyPtr, SchedulerPtr};

/// Envoy's callbacks. Every method is total: a call Envoy refuses reads as absent or `false`.
pub trait Envoy: Clone {
    /// A line in Envoy's log (the `dynamic_modules` logger).
    fn log(&self, level: Level, message: &str);

    // ---- per stream: `filter` is the live stream of the current hook ----

    /// The index of the worker running the stream.
    fn worker_index(&self, filter: FilterEnvoyPtr) -> u32;
    /// Views of every header of a map (`header_type`) into `out` (cleared first): Envoy's memory, valid
    /// until the hook ends or a setter or remover changes that map.
    fn headers(&self, filter: FilterEnvoyPtr, header_type: u32, out: &mut Vec<EnvoyHeader>);
    /// A view of the first value of header `name` (same validity as [`Envoy::headers`]).
    fn header(&self, filter: FilterEnvoyPtr, header_type: u32, name: &str) -> Option<EnvoyBuffer>;
    /// Sets (`Some`) or removes (`None`) a header.
    fn set_header(&self, filter: FilterEnvoyPtr, header_type: u32, name: &str, value: Option<&str>);
    /// A local reply. Envoy may run the stream-complete hook inside this call.
    fn send_response(&self, filter: FilterEnvoyPtr, status: u32, headers: &[(&str, &str)], body: &[u8]);
    fn clear_route_cache(&self, filter: FilterEnvoyPtr);
    fn set_filter_state(&self, filter: FilterEnvoyPtr, key: &str, value: &str);
    /// Sets `tags` on the stream's active trace span (`span_tags`); none when Envoy traces nothing for it.
    fn span_tags(&self, filter: FilterEnvoyPtr, tags: &[(&str, &str)]);
    /// The downstream peer's address (`source.address`, `ip:port`), copied.
    fn source_address(&self, filter: FilterEnvoyPtr) -> Option<String>;
    /// Whether this Envoy sets several dynamic-metadata entries in one call (1.39 and later; not 1.38).
    fn dynamic_metadata_batch(&self) -> bool;
    /// Sets string entries of the stream's dynamic metadata under `namespace`, in one call. Only where
    /// [`Envoy::dynamic_metadata_batch`].
    fn set_dynamic_metadata(&self, filter: FilterEnvoyPtr, namespace: &str, entries: &[(&str, &str)]);
    /// Sets one string entry of the stream's dynamic metadata under `namespace` (every supported Envoy).
    fn set_dynamic_metadata_entry(&self, filter: FilterEnvoyPtr, namespace: &str, key: &str, value: &str);
    /// Lets a stopped request go on. Envoy may run the stream-complete hook inside this call (a local reply
    /// further down the chain, such as "no healthy upstream").
    fn continue_decoding(&self, filter: FilterEnvoyPtr);
    /// Views of the chunks of a body (`body_type`) into `out` (cleared first), valid during the hook and
    /// until that body changes.
    fn body_chunks(&self, filter: FilterEnvoyPtr, body_type: u32, out: &mut Vec<EnvoyBuffer>);
    fn body_size(&self, filter: FilterEnvoyPtr, body_type: u32) -> usize;
    fn drain_body(&self, filter: FilterEnvoyPtr, body_type: u32, bytes: usize);
    fn append_body(&self, filter: FilterEnvoyPtr, body_type: u32, data: &[u8]);
    fn increment_counter(&self, filter: FilterEnvoyPtr, id: usize, label: Option<&str>, by: u64);
    fn set_gauge(&self, filter: FilterEnvoyPtr, id: usize, value: u64);
    fn increment_gauge(&self, filter: FilterEnvoyPtr, id: usize, by: u64);
    fn decrement_gauge(&self, filter: FilterEnvoyPtr, id: usize, by: u64);
    /// A scheduler whose commits run the stream's scheduled hook on its worker (null: none).
    fn scheduler_new(&self, filter: FilterEnvoyPtr) -> SchedulerPtr;
    /// Commits a stream's scheduler (any thread).
    fn scheduler_commit(&self, scheduler: SchedulerPtr, event_id: u64);
    fn scheduler_delete(&self, scheduler: SchedulerPtr);
    /// A request through `cluster` from the stream, answered in its callout-done hook: its id, or Envoy's
    /// status when it could not be sent.
    fn http_callout(
        &self,
        filter: FilterEnvoyPtr,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u64, u32>;

    // ---- per config, on the main thread: `config` is Envoy's filter config ----

    /// Defines a counter or a gauge (only in `config_new`): its id, `None` if Envoy refused.
    fn define_metric(&self, config: ConfigEnvoyPtr, name: &str, gauge: bool, labels: &[&str]) -> Option<usize>;
    /// Whether this Envoy has the config-level metric callbacks below (Envoy 1.39 and later; 1.38 has not).
    /// Without them, the main thread's stats go through [`super::relay::ConfigStats`] and a worker.
    fn config_metrics(&self) -> bool;
    /// Config-level counter and gauge: only where [`Envoy::config_metrics`] (a no-op elsewhere).
    fn config_increment_counter(&self, config: ConfigEnvoyPtr, id: usize, label: Option<&str>, by: u64);
    fn config_set_gauge(&self, config: ConfigEnvoyPtr, id: usize, value: u64);
    /// A scheduler whose commits run the config-scheduled hook on the main thread (null: none).
    fn config_scheduler_new(&self, config: ConfigEnvoyPtr) -> SchedulerPtr;
    fn config_scheduler_delete(&self, scheduler: SchedulerPtr);
    /// Commits the config-level scheduler (any thread): runs the config-scheduled hook on the main thread.
    fn config_scheduler_commit(&self, scheduler: SchedulerPtr, event_id: u64);
    /// Starts the thread that commits `scheduler` every `period_ms` until `stop` is set (the caller joins
    /// it before deleting the scheduler).
    fn start_ticker(
        &self,
        scheduler: SchedulerPtr,
        period_ms: u64,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<JoinHandle<()>>;
    /// A request through `cluster` from the main thread, answered in the config callout-done hook.
    fn config_http_callout(
        &self,
        config: ConfigEnvoyPtr,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u64, u32>;
}

#[cfg(not(test))]
pub use real::Abi;

// The pointers the methods take are the ones Envoy handed the current hook (the trait's contract above);
// the hooks that receive them are `unsafe fn`s whose callers (Envoy) guarantee them.
#[cfg(not(test))]
#[allow(clippy::not_unsafe_ptr_arg_deref)]
mod real {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Duration;

    use crate::effect::Level;

    use super::super::abi::*;
    use super::Envoy;

    /// Envoy's C ABI: the only caller of its `extern "C"` functions.
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Abi;

    /// A scheduler handed to the ticker thread.
    struct SendScheduler(SchedulerPtr);

    // SAFETY: the ABI allows a config scheduler's commit from any thread; the scheduler is deleted only
    // after the ticker thread has been joined (see `Upkeep`'s drop).
    unsafe impl Send for SendScheduler {}

    fn buffer(bytes: &[u8]) -> ModuleBuffer {
        ModuleBuffer::of(bytes)
    }

    fn callout_headers<'a>(headers: &[(&'a str, &'a str)]) -> Vec<ModuleHeader> {
        ModuleHeader::callout_views(headers.iter().copied())
    }

    fn body_buffer(body: &[u8]) -> ModuleBuffer {
        if body.is_empty() {
            ModuleBuffer::null()
        } else {
            ModuleBuffer::of(body)
        }
    }

    impl Envoy for Abi {
        fn log(&self, level: Level, message: &str) {
            let level = match level {
                Level::Debug => LOG_DEBUG,
                Level::Info => LOG_INFO,
                Level::Warn => LOG_WARN,
                Level::Error => LOG_ERROR,
            };
            // SAFETY: ABI: the message buffer need only be valid for the call (Envoy copies it).
            unsafe { envoy_dynamic_module_callback_log(level, buffer(message.as_bytes())) }
        }

        fn worker_index(&self, filter: FilterEnvoyPtr) -> u32 {
            // SAFETY: ABI: `filter` is the stream Envoy passed to the current hook (alive during it).
            unsafe { envoy_dynamic_module_callback_http_filter_get_worker_index(filter) }
        }

        fn headers(&self, filter: FilterEnvoyPtr, header_type: u32, out: &mut Vec<EnvoyHeader>) {
            let empty =
                EnvoyHeader { key_ptr: std::ptr::null(), key_length: 0, value_ptr: std::ptr::null(), value_length: 0 };
            out.clear();
            // SAFETY: ABI: `filter` is the live stream of the hook; `get_headers` writes exactly
            // `get_headers_size` entries into an array of that many (asked just before, on this thread).
            unsafe {
                let n = envoy_dynamic_module_callback_http_get_headers_size(filter, header_type);
                out.resize(n, empty);
                if n > 0 && !envoy_dynamic_module_callback_http_get_headers(filter, header_type, out.as_mut_ptr()) {
                    out.clear();
                }
            }
        }

        fn header(&self, filter: FilterEnvoyPtr, header_type: u32, name: &str) -> Option<EnvoyBuffer> {
            let mut value = EnvoyBuffer { ptr: std::ptr::null(), length: 0 };
            // SAFETY: ABI: live stream; `value` is a valid out pointer; the size pointer may be null.
            let found = unsafe {
                envoy_dynamic_module_callback_http_get_header(
                    filter,
                    header_type,
                    buffer(name.as_bytes()),
                    &mut value,
                    0,
                    std::ptr::null_mut(),
                )
            };
            (found && !value.ptr.is_null()).then_some(value)
        }

        fn set_header(&self, filter: FilterEnvoyPtr, header_type: u32, name: &str, value: Option<&str>) {
            let value = value.map_or(ModuleBuffer::null(), |v| buffer(v.as_bytes()));
            // SAFETY: ABI: live stream; Envoy copies the buffers during the call (a null value removes).
            unsafe {
                envoy_dynamic_module_callback_http_set_header(filter, header_type, buffer(name.as_bytes()), value)
            };
        }

        fn send_response(&self, filter: FilterEnvoyPtr, status: u32, headers: &[(&str, &str)], body: &[u8]) {
            let mut headers = ModuleHeader::views(headers.iter().copied());
            // SAFETY: ABI: live stream; every buffer (and the header array) is valid for the call, which
            // copies them. Envoy may call this stream's hooks (stream complete) before it returns: the caller
            // holds no borrow of the stream's state across it.
            unsafe {
                envoy_dynamic_module_callback_http_send_response(
                    filter,
                    status,
                    headers.as_mut_ptr(),
                    headers.len(),
                    buffer(body),
                    buffer(b"fhir_tenant_router"),
                )
            };
        }

        fn clear_route_cache(&self, filter: FilterEnvoyPtr) {
            // SAFETY: ABI: live stream.
            unsafe { envoy_dynamic_module_callback_http_clear_route_cache(filter) }
        }

        fn set_filter_state(&self, filter: FilterEnvoyPtr, key: &str, value: &str) {
            // SAFETY: ABI: live stream; Envoy copies both buffers.
            unsafe {
                envoy_dynamic_module_callback_http_set_filter_state_bytes(
                    filter,
                    buffer(key.as_bytes()),
                    buffer(value.as_bytes()),
                )
            };
        }

        fn span_tags(&self, filter: FilterEnvoyPtr, tags: &[(&str, &str)]) {
            // SAFETY: ABI: live stream; the answer is the stream's own active span (owned by Envoy's stream,
            // alive as long as it is) or null when tracing is off (abi.h "Tracing callbacks"; Envoy 1.38,
            // 1.39 and 1.40 alike). No hook of the stream runs inside it.
            let span = unsafe { envoy_dynamic_module_callback_http_get_active_span(filter) };
            if span.is_null() {
                return;
            }
            for (key, value) in tags {
                // SAFETY: ABI: `span` is the live stream's active span, got just above in this hook and used
                // only here; both buffers are valid for the call, and `setTag` copies them.
                unsafe {
                    envoy_dynamic_module_callback_http_span_set_tag(
                        span,
                        buffer(key.as_bytes()),
                        buffer(value.as_bytes()),
                    )
                };
            }
        }

        fn source_address(&self, filter: FilterEnvoyPtr) -> Option<String> {
            let mut out = EnvoyBuffer { ptr: std::ptr::null(), length: 0 };
            // SAFETY: ABI: live stream; `out` is a valid place for one buffer, which Envoy fills with a view
            // of the peer address's string (its memory, valid during the hook), copied below before anything
            // else is called. Three arguments in Envoy 1.38, 1.39 and 1.40 (abi.h; each binary's function
            // reads the result pointer from the third argument register).
            let found = unsafe {
                envoy_dynamic_module_callback_http_filter_get_attribute_string(
                    filter,
                    ATTRIBUTE_SOURCE_ADDRESS,
                    &mut out,
                )
            };
            if !found || out.ptr.is_null() {
                return None;
            }
            // SAFETY: Envoy answered `out.length` bytes at `out.ptr`, valid during the hook; copied at once.
            let bytes = unsafe { std::slice::from_raw_parts(out.ptr, out.length) };
            std::str::from_utf8(bytes).ok().map(str::to_string)
        }

        fn dynamic_metadata_batch(&self) -> bool {
            optional().set_dynamic_metadata_string_batch.is_some()
        }

        fn set_dynamic_metadata(&self, filter: FilterEnvoyPtr, namespace: &str, entries: &[(&str, &str)]) {
            let Some(batch) = optional().set_dynamic_metadata_string_batch else { return };
            let views = ModuleKeyValue::views(entries);
            // SAFETY: ABI: live stream; `entries` points to `entries_size` pairs (a null pointer is allowed
            // only for zero entries: a Vec's pointer is never null), and every buffer is valid for the call,
            // which copies them into the stream's metadata (abi.h,
            // `envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch`); `batch` is this Envoy's
            // own callback of that signature (see `abi::optional`). No hook of the stream runs inside it.
            unsafe { batch(filter, buffer(namespace.as_bytes()), views.as_ptr(), views.len()) };
        }

        fn set_dynamic_metadata_entry(&self, filter: FilterEnvoyPtr, namespace: &str, key: &str, value: &str) {
            // SAFETY: ABI: live stream; the three buffers are valid for the call, which copies them into the
            // stream's metadata (abi.h, `envoy_dynamic_module_callback_http_set_dynamic_metadata_string`, the
            // same signature in Envoy 1.38, 1.39 and 1.40). No hook of the stream runs inside it.
            unsafe {
                envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
                    filter,
                    buffer(namespace.as_bytes()),
                    buffer(key.as_bytes()),
                    buffer(value.as_bytes()),
                )
            };
        }

        fn continue_decoding(&self, filter: FilterEnvoyPtr) {
            // SAFETY: ABI: live stream. May re-enter this stream's hooks (see `send_response`).
            unsafe { envoy_dynamic_module_callback_http_filter_continue_decoding(filter) }
        }

        fn body_chunks(&self, filter: FilterEnvoyPtr, body_type: u32, out: &mut Vec<EnvoyBuffer>) {
            out.clear();
            // SAFETY: ABI: live stream; `get_body_chunks` writes exactly `get_body_chunks_size` entries.
            unsafe {
                let n = envoy_dynamic_module_callback_http_get_body_chunks_size(filter, body_type);
                out.resize(n, EnvoyBuffer { ptr: std::ptr::null(), length: 0 });
                if n > 0 && !envoy_dynamic_module_callback_http_get_body_chunks(filter, body_type, out.as_mut_ptr()) {
                    out.clear();
                }
            }
        }

        fn body_size(&self, filter: FilterEnvoyPtr, body_type: u32) -> usize {
            // SAFETY: ABI: live stream.
            unsafe { envoy_dynamic_module_callback_http_get_body_size(filter, body_type) }
        }

        fn drain_body(&self, filter: FilterEnvoyPtr, body_type: u32, bytes: usize) {
            // SAFETY: ABI: live stream.
            unsafe { envoy_dynamic_module_callback_http_drain_body(filter, body_type, bytes) };
        }

        fn append_body(&self, filter: FilterEnvoyPtr, body_type: u32, data: &[u8]) {
            // SAFETY: ABI: live stream; Envoy copies `data`.
            unsafe { envoy_dynamic_module_callback_http_append_body(filter, body_type, buffer(data)) };
        }

        fn increment_counter(&self, filter: FilterEnvoyPtr, id: usize, label: Option<&str>, by: u64) {
            let mut labels = [buffer(label.unwrap_or_default().as_bytes())];
            let n = usize::from(label.is_some());
            // SAFETY: ABI: live stream; Envoy reads `n` (0 or 1) label buffers, valid for the call.
            unsafe {
                envoy_dynamic_module_callback_http_filter_increment_counter(filter, id, labels.as_mut_ptr(), n, by)
            };
        }

        fn set_gauge(&self, filter: FilterEnvoyPtr, id: usize, value: u64) {
            // SAFETY: ABI: live stream; no labels (a null array of length 0).
            unsafe { envoy_dynamic_module_callback_http_filter_set_gauge(filter, id, std::ptr::null_mut(), 0, value) };
        }

        fn increment_gauge(&self, filter: FilterEnvoyPtr, id: usize, by: u64) {
            // SAFETY: as for `set_gauge`.
            unsafe {
                envoy_dynamic_module_callback_http_filter_increment_gauge(filter, id, std::ptr::null_mut(), 0, by)
            };
        }

        fn decrement_gauge(&self, filter: FilterEnvoyPtr, id: usize, by: u64) {
            // SAFETY: as for `set_gauge`.
            unsafe {
                envoy_dynamic_module_callback_http_filter_decrement_gauge(filter, id, std::ptr::null_mut(), 0, by)
            };
        }

        fn scheduler_new(&self, filter: FilterEnvoyPtr) -> SchedulerPtr {
            // SAFETY: ABI: live stream; the scheduler is Envoy's until `scheduler_delete`.
            unsafe { envoy_dynamic_module_callback_http_filter_scheduler_new(filter) }
        }

        fn scheduler_commit(&self, scheduler: SchedulerPtr, event_id: u64) {
            // SAFETY: ABI: any thread may commit a scheduler not yet deleted (the caller keeps it listed
            // only while it is alive, see `upkeep::Parked`).
            unsafe { envoy_dynamic_module_callback_http_filter_scheduler_commit(scheduler, event_id) }
        }

        fn scheduler_delete(&self, scheduler: SchedulerPtr) {
            // SAFETY: ABI: deleted once, on the stream's worker, after nothing can commit it any more.
            unsafe { envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler) }
        }

        fn http_callout(
            &self,
            filter: FilterEnvoyPtr,
            cluster: &str,
            headers: &[(&str, &str)],
            body: &[u8],
            timeout_ms: u64,
        ) -> Result<u64, u32> {
            let mut headers = callout_headers(headers);
            let mut id = 0u64;
            // SAFETY: ABI: live stream; `id` is a valid out pointer; every buffer is valid for the call.
            let status = unsafe {
                envoy_dynamic_module_callback_http_filter_http_callout(
                    filter,
                    &mut id,
                    buffer(cluster.as_bytes()),
                    headers.as_mut_ptr(),
                    headers.len(),
                    body_buffer(body),
                    timeout_ms,
                )
            };
            if status == CALLOUT_SUCCESS {
                Ok(id)
            } else {
                Err(status)
            }
        }

        fn define_metric(&self, config: ConfigEnvoyPtr, name: &str, gauge: bool, labels: &[&str]) -> Option<usize> {
            let mut labels: Vec<ModuleBuffer> = labels.iter().map(|l| buffer(l.as_bytes())).collect();
            let mut id = 0usize;
            let name = buffer(name.as_bytes());
            // SAFETY: ABI: config_new's config on the main thread; every buffer is valid for the call; `id`
            // is a valid out pointer.
            let status = unsafe {
                if gauge {
                    envoy_dynamic_module_callback_http_filter_config_define_gauge(
                        config,
                        name,
                        labels.as_mut_ptr(),
                        labels.len(),
                        &mut id,
                    )
                } else {
                    envoy_dynamic_module_callback_http_filter_config_define_counter(
                        config,
                        name,
                        labels.as_mut_ptr(),
                        labels.len(),
                        &mut id,
                    )
                }
            };
            (status == METRICS_SUCCESS).then_some(id)
        }

        fn config_metrics(&self) -> bool {
            let optional = optional();
            optional.config_increment_counter.is_some() && optional.config_set_gauge.is_some()
        }

        fn config_increment_counter(&self, config: ConfigEnvoyPtr, id: usize, label: Option<&str>, by: u64) {
            let Some(increment) = optional().config_increment_counter else { return };
            let mut labels = [buffer(label.unwrap_or_default().as_bytes())];
            let n = usize::from(label.is_some());
            // SAFETY: ABI: main thread, live config; Envoy reads `n` (0 or 1) labels, valid for the call;
            // `increment` is this Envoy's own callback of that signature (see `abi::optional`).
            unsafe { increment(config, id, labels.as_mut_ptr(), n, by) };
        }

        fn config_set_gauge(&self, config: ConfigEnvoyPtr, id: usize, value: u64) {
            let Some(set) = optional().config_set_gauge else { return };
            // SAFETY: ABI: main thread, live config; no labels; `set` is this Envoy's own callback of that
            // signature (see `abi::optional`).
            unsafe { set(config, id, std::ptr::null_mut(), 0, value) };
        }

        fn config_scheduler_new(&self, config: ConfigEnvoyPtr) -> SchedulerPtr {
            // SAFETY: ABI: config_new, main thread, the config being created.
            unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_new(config) }
        }

        fn config_scheduler_delete(&self, scheduler: SchedulerPtr) {
            // SAFETY: ABI: deleted once, while the config is alive, after the ticker (its only other user)
            // has been joined.
            unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler) }
        }

        fn config_scheduler_commit(&self, scheduler: SchedulerPtr, event_id: u64) {
            // SAFETY: ABI: a config scheduler may be committed from any thread; it is deleted in
            // config_destroy, after every stream (each holding the config alive) is gone.
            unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_commit(scheduler, event_id) }
        }

        fn start_ticker(
            &self,
            scheduler: SchedulerPtr,
            period_ms: u64,
            stop: Arc<AtomicBool>,
        ) -> std::io::Result<JoinHandle<()>> {
            let scheduler = SendScheduler(scheduler);
            std::thread::Builder::new().name("fhir-tenant-router-tick".into()).spawn(move || {
                let scheduler = scheduler;
                while !stop.load(Ordering::Acquire) {
                    std::thread::park_timeout(Duration::from_millis(period_ms));
                    if !stop.load(Ordering::Acquire) {
                        // SAFETY: ABI: a config scheduler may be committed from any thread; it is deleted
                        // only after this thread has been joined.
                        unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_commit(scheduler.0, 0) };
                    }
                }
            })
        }

        fn config_http_callout(
            &self,
            config: ConfigEnvoyPtr,
            cluster: &str,
            headers: &[(&str, &str)],
            body: &[u8],
            timeout_ms: u64,
        ) -> Result<u64, u32> {
            let mut headers = callout_headers(headers);
            let mut id = 0u64;
            // SAFETY: ABI: main thread, live config; `id` is a valid out pointer; buffers valid for the call.
            let status = unsafe {
                envoy_dynamic_module_callback_http_filter_config_http_callout(
                    config,
                    &mut id,
                    buffer(cluster.as_bytes()),
                    headers.as_mut_ptr(),
                    headers.len(),
                    body_buffer(body),
                    timeout_ms,
                )
            };
            if status == CALLOUT_SUCCESS {
                Ok(id)
            } else {
                Err(status)
            }
        }
    }
}
