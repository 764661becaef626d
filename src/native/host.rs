//! What both sides of the dynamic module use: the clock, Envoy's log, and the stats defined per config.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::effect::{CounterSlot, Gauge, Level, Metric, TenantRefusal, TokenEvent, COUNTERS};
use crate::rejection::Rejection;

use super::abi::*;

/// Milliseconds since the epoch (the ABI has no clock for HTTP filters).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A line in Envoy's log (the `dynamic_modules` logger).
pub(crate) fn log(level: Level, message: &str) {
    let level = match level {
        Level::Debug => LOG_DEBUG,
        Level::Info => LOG_INFO,
        Level::Warn => LOG_WARN,
        Level::Error => LOG_ERROR,
    };
    // SAFETY: the buffer is valid for the call; Envoy copies it.
    unsafe { envoy_dynamic_module_callback_log(level, ModuleBuffer::of(message.as_bytes())) }
}

/// The stats this config defined in `config_new` (ids by position; `None`: the host refused one).
pub struct MetricIds {
    counters: Vec<Option<usize>>,
    rejected: Vec<Option<usize>>,
    gauges: Vec<Option<usize>>,
    /// `tenant.allowed` and `tenant.forbidden`, labelled by `tenant`.
    tenant: (Option<usize>, Option<usize>),
    /// `tenant.upstream_token.<event>`, labelled by `tenant`, in [`TokenEvent::ALL`]'s order.
    token: Vec<Option<usize>>,
    /// `tenant.insufficient_scope` and `tenant.client_not_allowed`, labelled by `tenant`, by
    /// [`TenantRefusal::index`].
    tenant_refusals: Vec<Option<usize>>,
    /// `tenant.quota.allowed` and `tenant.quota.limited`, labelled by `tenant`.
    tenant_quota: (Option<usize>, Option<usize>),
    /// Hooks that panicked (caught; the request got a 503).
    pub(crate) panics: Option<usize>,
}

fn define(config: ConfigEnvoyPtr, name: &str, gauge: bool, labels: &[&str]) -> Option<usize> {
    let mut labels: Vec<ModuleBuffer> = labels.iter().map(|l| ModuleBuffer::of(l.as_bytes())).collect();
    let mut id = 0usize;
    let name = ModuleBuffer::of(name.as_bytes());
    // SAFETY: every buffer outlives the call; `id` is a valid out pointer.
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

impl MetricIds {
    /// Defines every stat (only possible in `config_new`).
    pub(crate) fn define(config: ConfigEnvoyPtr) -> Self {
        Self {
            counters: COUNTERS.iter().map(|m| define(config, m.name(), false, &[])).collect(),
            rejected: Rejection::ALL.iter().map(|r| define(config, r.stat_name(), false, &[])).collect(),
            // No VM here: `vm.memory_bytes` is the wasm build's alone (Envoy's own memory stats cover a module).
            gauges: Gauge::ALL
                .iter()
                .map(|g| if *g == Gauge::VmMemoryBytes { None } else { define(config, g.name(), true, &[]) })
                .collect(),
            tenant: (
                define(config, "tenant.allowed", false, &["tenant"]),
                define(config, "tenant.forbidden", false, &["tenant"]),
            ),
            token: TokenEvent::ALL
                .iter()
                .map(|e| define(config, &format!("tenant.{}", e.name()), false, &["tenant"]))
                .collect(),
            tenant_refusals: TenantRefusal::ALL
                .iter()
                .map(|r| define(config, &format!("tenant.{}", r.name()), false, &["tenant"]))
                .collect(),
            tenant_quota: (
                define(config, "tenant.quota.allowed", false, &["tenant"]),
                define(config, "tenant.quota.limited", false, &["tenant"]),
            ),
            panics: define(config, "panics", false, &[]),
        }
    }
}

impl MetricIds {
    /// A counter's id, and the `tenant` label value for a per-tenant counter.
    pub(crate) fn counter<'m>(&self, metric: Metric<'m>) -> Option<(usize, Option<&'m str>)> {
        match metric.slot() {
            CounterSlot::Fixed(i) => self.counters.get(i).copied().flatten().map(|id| (id, None)),
            CounterSlot::Rejected(i) => self.rejected.get(i).copied().flatten().map(|id| (id, None)),
            CounterSlot::Tenant { tenant, allowed } => {
                let id = if allowed { self.tenant.0 } else { self.tenant.1 };
                id.map(|id| (id, Some(tenant)))
            }
            CounterSlot::TenantToken { tenant, event } => {
                self.token.get(event.index()).copied().flatten().map(|id| (id, Some(tenant)))
            }
            // Refusals are rare: counted through Envoy's labelled stat directly (no tick batching).
            CounterSlot::TenantRefusal { tenant, refusal } => {
                self.tenant_refusals.get(refusal.index()).copied().flatten().map(|id| (id, Some(tenant)))
            }
            CounterSlot::TenantQuota { tenant, allowed } => {
                let id = if allowed { self.tenant_quota.0 } else { self.tenant_quota.1 };
                id.map(|id| (id, Some(tenant)))
            }
        }
    }

    /// A gauge's id.
    pub(crate) fn gauge(&self, gauge: Gauge) -> Option<usize> {
        self.gauges.get(gauge.index()).copied().flatten()
    }
}

/// Sets (or, with `None`, removes) a header of the current hook's stream.
pub(crate) fn set_header(filter: FilterEnvoyPtr, header_type: u32, name: &str, value: Option<&str>) {
    let value = value.map_or(ModuleBuffer::null(), |v| ModuleBuffer::of(v.as_bytes()));
    // SAFETY: `filter` is the live stream of the current hook; the buffers outlive the call.
    unsafe {
        envoy_dynamic_module_callback_http_set_header(filter, header_type, ModuleBuffer::of(name.as_bytes()), value)
    };
}

/// A local answer through the ABI.
pub(crate) fn send_response(filter: FilterEnvoyPtr, status: u32, headers: &[(&str, &str)], body: &[u8]) {
    let mut headers = ModuleHeader::views(headers.iter().copied());
    // SAFETY: `filter` is the live stream of the current hook; every buffer outlives the call.
    unsafe {
        envoy_dynamic_module_callback_http_send_response(
            filter,
            status,
            headers.as_mut_ptr(),
            headers.len(),
            ModuleBuffer::of(body),
            ModuleBuffer::of(b"fhir_tenant_router"),
        )
    };
}
