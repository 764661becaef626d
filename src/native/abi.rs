//! The part of Envoy's dynamic-module ABI this filter uses, declared by hand: no Rust SDK for this ABI is
//! published. It targets the oldest ABI the module supports, "v0.1.0" (Envoy 1.38 and 1.39), so that
//! Envoy's own promise (a v0.1.y module runs on a v0.2.x Envoy) covers Envoy 1.40 ("v0.2.0"). Types and
//! signatures follow Envoy's `source/extensions/dynamic_modules/abi/abi.h`; every declaration below is the
//! same in the headers of 1.38, 1.39 and 1.40 (docs/dynamic-module.md, "Envoy versions and the ABI"). The two
//! callbacks 1.38 lacks (config-level metrics) are not imported but resolved at load time ([`optional`]).
//! `make abi-check` (part of `make test`) checks the `.so` against every supported Envoy binary: each
//! imported callback is exported by each, none of the optional ones is imported, and the hooks this module
//! exports are the ones each Envoy resolves (a missing mandatory hook fails the filter config).

#![allow(non_camel_case_types)]

use std::ffi::c_void;

/// The ABI version this module is written against, the oldest supported Envoy's: Envoy 1.38 and 1.39 log
/// "Dynamic module ABI version v0.1.0 matched."; Envoy 1.40 (ABI "v0.2.0") logs, once per load, the warning
/// "Dynamic module ABI version v0.1.0 is deprecated. ..." and runs it (v0.1.y is promised to work on v0.2.x).
pub const ABI_VERSION: &[u8] = b"v0.1.0\0";

/// Envoy-owned bytes, valid during the hook (or until a setter is called).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EnvoyBuffer {
    pub ptr: *const u8,
    pub length: usize,
}

/// Module-owned bytes, valid for the duration of the call.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ModuleBuffer {
    pub ptr: *const u8,
    pub length: usize,
}

impl ModuleBuffer {
    pub fn of(bytes: &[u8]) -> Self {
        Self { ptr: bytes.as_ptr(), length: bytes.len() }
    }

    /// The "no value" buffer: with `set_header`, removes the header.
    pub fn null() -> Self {
        Self { ptr: std::ptr::null(), length: 0 }
    }
}

/// A module-owned header.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ModuleHeader {
    pub key_ptr: *const u8,
    pub key_length: usize,
    pub value_ptr: *const u8,
    pub value_length: usize,
}

impl ModuleHeader {
    /// Views of a callout's request headers for one call (they borrow the strings): `:authority` goes as
    /// `host`, the name Envoy's callouts check for.
    pub fn callout_views<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<ModuleHeader> {
        Self::views(pairs.into_iter().map(|(k, v)| if k == ":authority" { ("host", v) } else { (k, v) }))
    }

    /// Views of `pairs` for one call (they borrow the strings).
    pub fn views<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<ModuleHeader> {
        pairs
            .into_iter()
            .map(|(k, v)| ModuleHeader {
                key_ptr: k.as_ptr(),
                key_length: k.len(),
                value_ptr: v.as_ptr(),
                value_length: v.len(),
            })
            .collect()
    }
}

/// A module-owned string key and value (`envoy_dynamic_module_type_module_key_value_pair`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ModuleKeyValue {
    pub key_ptr: *const u8,
    pub key_length: usize,
    pub value_ptr: *const u8,
    pub value_length: usize,
}

impl ModuleKeyValue {
    /// Views of `pairs` for one call (they borrow the strings).
    pub fn views<'a>(pairs: impl IntoIterator<Item = &'a (&'a str, &'a str)>) -> Vec<ModuleKeyValue> {
        pairs
            .into_iter()
            .map(|(k, v)| ModuleKeyValue {
                key_ptr: k.as_ptr(),
                key_length: k.len(),
                value_ptr: v.as_ptr(),
                value_length: v.len(),
            })
            .collect()
    }
}

/// An Envoy-owned header (same layout).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EnvoyHeader {
    pub key_ptr: *const u8,
    pub key_length: usize,
    pub value_ptr: *const u8,
    pub value_length: usize,
}

pub type ConfigEnvoyPtr = *mut c_void;
pub type ConfigModulePtr = *const c_void;
pub type FilterEnvoyPtr = *mut c_void;
pub type FilterModulePtr = *const c_void;
/// A scheduler Envoy allocated for the module (per stream, or per config on the main thread).
pub type SchedulerPtr = *mut c_void;

/// `envoy_dynamic_module_type_http_header_type`.
pub const REQUEST_HEADER: u32 = 0;
pub const RESPONSE_HEADER: u32 = 2;
/// `envoy_dynamic_module_type_http_body_type`: what the filter buffered, and the frame of the current hook.
pub const RECEIVED_REQUEST_BODY: u32 = 0;
pub const BUFFERED_REQUEST_BODY: u32 = 1;
pub const RECEIVED_RESPONSE_BODY: u32 = 2;
pub const BUFFERED_RESPONSE_BODY: u32 = 3;
/// `envoy_dynamic_module_type_log_level`.
pub const LOG_DEBUG: u32 = 1;
pub const LOG_INFO: u32 = 2;
pub const LOG_WARN: u32 = 3;
pub const LOG_ERROR: u32 = 4;
/// Header hooks' statuses (request and response alike).
pub const HEADERS_CONTINUE: u32 = 0;
pub const HEADERS_STOP_ITERATION: u32 = 1;
/// Body hooks' statuses.
pub const BODY_CONTINUE: u32 = 0;
pub const BODY_STOP_AND_BUFFER: u32 = 1;
/// Trailer hooks' statuses (`envoy_dynamic_module_type_on_http_filter_{request,response}_trailers_status`,
/// the same in Envoy 1.38–1.40). Envoy continues a stopped stream whose trailers hook says continue.
pub const TRAILERS_CONTINUE: u32 = 0;
pub const TRAILERS_STOP_ITERATION: u32 = 1;
/// `envoy_dynamic_module_type_http_callout_init_result` and `..._http_callout_result`.
pub const CALLOUT_SUCCESS: u32 = 0;
/// `envoy_dynamic_module_type_metrics_result`.
pub const METRICS_SUCCESS: u32 = 0;
/// `envoy_dynamic_module_type_attribute_id_SourceAddress` (`source.address`: the downstream peer's
/// `ip:port`): the 25th entry of `envoy_dynamic_module_type_attribute_id` in the abi.h of every supported
/// Envoy (the enum only grows at its end), and inside the range each of the 1.38.3, 1.39.0 and 1.40.0
/// binaries' `get_attribute_string` dispatches on.
pub const ATTRIBUTE_SOURCE_ADDRESS: u32 = 24;

/// An Envoy-owned trace span (`envoy_dynamic_module_type_span_envoy_ptr`).
pub type SpanEnvoyPtr = *mut c_void;

// The callbacks: linked against Envoy, so only in the `.so` (the unit tests drive the shell through
// `super::envoy::Envoy` and a fake instead). `super::envoy::Abi` is their only caller.
#[cfg(not(test))]
extern "C" {
    pub fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);
    pub fn envoy_dynamic_module_callback_log_enabled(level: u32) -> bool;

    pub fn envoy_dynamic_module_callback_http_get_headers_size(filter: FilterEnvoyPtr, header_type: u32) -> usize;
    pub fn envoy_dynamic_module_callback_http_get_headers(
        filter: FilterEnvoyPtr,
        header_type: u32,
        result_headers: *mut EnvoyHeader,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_get_header(
        filter: FilterEnvoyPtr,
        header_type: u32,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;
    /// Replaces every value of `key`; a null `value.ptr` removes the header.
    pub fn envoy_dynamic_module_callback_http_set_header(
        filter: FilterEnvoyPtr,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_send_response(
        filter: FilterEnvoyPtr,
        status_code: u32,
        headers: *mut ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );
    pub fn envoy_dynamic_module_callback_http_clear_route_cache(filter: FilterEnvoyPtr);
    pub fn envoy_dynamic_module_callback_http_set_filter_state_bytes(
        filter: FilterEnvoyPtr,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: FilterEnvoyPtr);
    /// Sets one string entry of the stream's dynamic metadata under `ns` (overwriting); Envoy copies every
    /// buffer. In every supported Envoy (1.38–1.40).
    pub fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
        filter: FilterEnvoyPtr,
        ns: ModuleBuffer,
        key: ModuleBuffer,
        value: ModuleBuffer,
    );

    pub fn envoy_dynamic_module_callback_http_get_body_chunks_size(filter: FilterEnvoyPtr, body_type: u32) -> usize;
    pub fn envoy_dynamic_module_callback_http_get_body_chunks(
        filter: FilterEnvoyPtr,
        body_type: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_get_body_size(filter: FilterEnvoyPtr, body_type: u32) -> usize;
    pub fn envoy_dynamic_module_callback_http_drain_body(filter: FilterEnvoyPtr, body_type: u32, bytes: usize) -> bool;
    pub fn envoy_dynamic_module_callback_http_append_body(
        filter: FilterEnvoyPtr,
        body_type: u32,
        data: ModuleBuffer,
    ) -> bool;

    pub fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: ConfigEnvoyPtr,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        id: *mut usize,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        config: ConfigEnvoyPtr,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        id: *mut usize,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    /// A scheduler whose commits run `on_http_filter_scheduled` on the stream's worker (any thread may commit).
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_new(filter: FilterEnvoyPtr) -> SchedulerPtr;
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_commit(scheduler: SchedulerPtr, event_id: u64);
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: SchedulerPtr);
    /// A scheduler whose commits run `on_http_filter_config_scheduled` on the main thread.
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(config: ConfigEnvoyPtr) -> SchedulerPtr;
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(scheduler: SchedulerPtr, event_id: u64);
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler: SchedulerPtr);
    /// A GET (or any request) through `cluster_name` from the main thread, answered in
    /// `on_http_filter_config_http_callout_done`; `headers` must hold `:method`, `:path` and `host`.
    pub fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        config: ConfigEnvoyPtr,
        callout_id: *mut u64,
        cluster_name: ModuleBuffer,
        headers: *mut ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_milliseconds: u64,
    ) -> u32;
    /// A request through `cluster_name` from a stream's worker, answered in `on_http_filter_http_callout_done`
    /// on that stream (cancelled if the stream ends first); `headers` as for the config-level callout.
    pub fn envoy_dynamic_module_callback_http_filter_http_callout(
        filter: FilterEnvoyPtr,
        callout_id: *mut u64,
        cluster_name: ModuleBuffer,
        headers: *mut ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_milliseconds: u64,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_get_worker_index(filter: FilterEnvoyPtr) -> u32;

    /// The stream's active trace span, or null when Envoy has none for it (tracing off: Envoy's
    /// `NullSpan`). The same in Envoy 1.38, 1.39 and 1.40 (abi.h, "Tracing callbacks").
    pub fn envoy_dynamic_module_callback_http_get_active_span(filter: FilterEnvoyPtr) -> SpanEnvoyPtr;
    /// Sets a tag on `span` (`Tracing::Span::setTag`, which copies both strings); a null span is ignored.
    pub fn envoy_dynamic_module_callback_http_span_set_tag(span: SpanEnvoyPtr, key: ModuleBuffer, value: ModuleBuffer);
    /// A string attribute of the stream (`attribute_id`: `envoy_dynamic_module_type_attribute_id`) into
    /// `result`: Envoy's memory, valid during the hook. `false`: not available.
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: FilterEnvoyPtr,
        attribute_id: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;

    pub fn envoy_dynamic_module_callback_http_filter_set_gauge(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_increment_gauge(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_decrement_gauge(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
}

/// The signature of the two config-level metric callbacks Envoy 1.38 lacks:
/// `envoy_dynamic_module_callback_http_filter_config_increment_counter` and
/// `envoy_dynamic_module_callback_http_filter_config_set_gauge` (`config`, metric id, label values and their
/// count, value; returns an `envoy_dynamic_module_type_metrics_result`), the same in the `abi.h` of Envoy 1.39
/// and 1.40. Not imported (an undefined symbol 1.38 lacks would stop it loading the `.so`): resolved at load
/// time by [`optional`].
pub type ConfigMetricFn = unsafe extern "C" fn(
    config: ConfigEnvoyPtr,
    id: usize,
    label_values: *mut ModuleBuffer,
    label_values_length: usize,
    value: u64,
) -> u32;

/// `envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch` (abi.h, Envoy 1.39 and 1.40): sets
/// `entries_size` string entries of the stream's dynamic metadata under `ns` (overwriting); Envoy copies every
/// buffer.
pub type MetadataBatchFn =
    unsafe extern "C" fn(filter: FilterEnvoyPtr, ns: ModuleBuffer, entries: *const ModuleKeyValue, entries_size: usize);

/// The callbacks the module uses when this Envoy has them and does without otherwise.
#[derive(Clone, Copy, Debug, Default)]
pub struct Optional {
    pub config_increment_counter: Option<ConfigMetricFn>,
    pub config_set_gauge: Option<ConfigMetricFn>,
    /// `envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch` (Envoy 1.39 and later): every
    /// entry in one call; without it, one `set_dynamic_metadata_string` call per entry.
    pub set_dynamic_metadata_string_batch: Option<MetadataBatchFn>,
}

/// The address of `name` in the process's global symbol scope (Envoy's executable, whose callbacks it
/// exports, and the libraries loaded globally), if it is there.
pub fn lookup(name: &std::ffi::CStr) -> Option<std::ptr::NonNull<c_void>> {
    // SAFETY: dlsym only reads `name`, a NUL-terminated string valid for the call; RTLD_DEFAULT is a valid
    // handle. A null answer (no such symbol) is mapped to `None`; nothing is called here.
    std::ptr::NonNull::new(unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) })
}

/// The optional callbacks of the Envoy that loaded the module, resolved once.
#[cfg(not(test))]
pub fn optional() -> Optional {
    static RESOLVED: std::sync::OnceLock<Optional> = std::sync::OnceLock::new();
    *RESOLVED.get_or_init(|| {
        let resolve = |name: &std::ffi::CStr| {
            lookup(name).map(|address| {
                // SAFETY: ABI: an Envoy that exports a symbol of this name defines it with the signature of
                // `ConfigMetricFn` (abi.h of Envoy 1.39 and 1.40, the only versions that have it; checked by
                // `make abi-check`), and it stays loaded as long as the process: Envoy is the executable.
                unsafe { std::mem::transmute::<*mut c_void, ConfigMetricFn>(address.as_ptr()) }
            })
        };
        Optional {
            config_increment_counter: resolve(c"envoy_dynamic_module_callback_http_filter_config_increment_counter"),
            config_set_gauge: resolve(c"envoy_dynamic_module_callback_http_filter_config_set_gauge"),
            set_dynamic_metadata_string_batch: lookup(
                c"envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch",
            )
            .map(|address| {
                // SAFETY: ABI: an Envoy that exports this symbol defines it with the signature of
                // `MetadataBatchFn` (abi.h of Envoy 1.39 and 1.40; 1.38 has none), and it stays loaded as
                // long as the process: Envoy is the executable.
                unsafe { std::mem::transmute::<*mut c_void, MetadataBatchFn>(address.as_ptr()) }
            }),
        }
    })
}
