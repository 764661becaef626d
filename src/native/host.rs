//! What both sides of the dynamic module use: the clock and the stats defined per config.

#[cfg(not(test))]
use std::time::{SystemTime, UNIX_EPOCH};

use crate::effect::{CounterSlot, Gauge, Metric, TenantRefusal, TokenEvent, COUNTERS};
use crate::rejection::Rejection;

use super::abi::ConfigEnvoyPtr;
use super::envoy::Envoy;

/// Milliseconds since the epoch (the ABI has no clock for HTTP filters).
#[cfg(not(test))]
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
thread_local! {
    /// The unit tests' clock (set by the fake Envoy).
    pub(crate) static TEST_NOW_MS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The unit tests' clock.
#[cfg(test)]
pub(crate) fn now_ms() -> u64 {
    TEST_NOW_MS.with(std::cell::Cell::get)
}

/// A monotonic clock in nanoseconds since the first read (the verify time of `span_tags`).
#[cfg(not(test))]
pub(crate) fn now_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    u64::try_from(EPOCH.get_or_init(std::time::Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
thread_local! {
    static TEST_NOW_NS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The unit tests' nanosecond clock: each read is 2,500 ns after the one before.
#[cfg(test)]
pub(crate) fn now_ns() -> u64 {
    TEST_NOW_NS.with(|c| {
        c.set(c.get() + 2500);
        c.get()
    })
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
    /// Panics that poisoned the upkeep lock, recovered (see `module::FilterConfig::upkeep`).
    pub(crate) upkeep_recovered: Option<usize>,
}

impl MetricIds {
    /// Defines every stat (only possible in `config_new`).
    pub(crate) fn define(env: &impl Envoy, config: ConfigEnvoyPtr) -> Self {
        let define = |name: &str, gauge: bool, labels: &[&str]| env.define_metric(config, name, gauge, labels);
        Self {
            counters: COUNTERS.iter().map(|m| define(m.name(), false, &[])).collect(),
            rejected: Rejection::ALL.iter().map(|r| define(r.stat_name(), false, &[])).collect(),
            // No VM here: `vm.memory_bytes` is the wasm build's alone (Envoy's own memory stats cover a module).
            gauges: Gauge::ALL
                .iter()
                .map(|g| if *g == Gauge::VmMemoryBytes { None } else { define(g.name(), true, &[]) })
                .collect(),
            tenant: (define("tenant.allowed", false, &["tenant"]), define("tenant.forbidden", false, &["tenant"])),
            token: TokenEvent::ALL
                .iter()
                .map(|e| define(&format!("tenant.{}", e.name()), false, &["tenant"]))
                .collect(),
            tenant_refusals: TenantRefusal::ALL
                .iter()
                .map(|r| define(&format!("tenant.{}", r.name()), false, &["tenant"]))
                .collect(),
            tenant_quota: (
                define("tenant.quota.allowed", false, &["tenant"]),
                define("tenant.quota.limited", false, &["tenant"]),
            ),
            panics: define("panics", false, &[]),
            upkeep_recovered: define("upkeep.recovered", false, &[]),
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

    /// An unlabelled counter's id, by its slot (see `counts::UnlabelledCounts`).
    pub(crate) fn unlabelled(&self, slot: CounterSlot<'_>) -> Option<usize> {
        match slot {
            CounterSlot::Fixed(i) => self.counters.get(i).copied().flatten(),
            CounterSlot::Rejected(i) => self.rejected.get(i).copied().flatten(),
            _ => None,
        }
    }

    /// A gauge's id.
    pub(crate) fn gauge(&self, gauge: Gauge) -> Option<usize> {
        self.gauges.get(gauge.index()).copied().flatten()
    }
}
