//! Counters and gauges through the host's metrics. Envoy shows them as `wasmcustom.fhir_tenant_router.*` in
//! `/stats` and `/stats/prometheus`; every VM defining the same name shares one stat.
//!
//! Counting on the hot path is local (no host call); the root context flushes the counts to the host on
//! every tick (500 ms), so stats lag by at most that.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use crate::effect::{CounterSlot, Gauge, Metric, TenantRefusal, TokenEvent, COUNTERS};
use crate::rejection::Rejection;
use crate::tenant::FxHasher;

use super::host::{Host, MetricKind};

/// Prefix of every metric name.
pub const PREFIX: &str = "fhir_tenant_router";

/// Counters of each tenant, `tenant.<id>.<name>` for each of `N` names, defined on the tenant's first use.
#[derive(Debug)]
struct PerTenant<const N: usize> {
    names: [&'static str; N],
    ids: RefCell<HashMap<String, [Option<u32>; N], BuildHasherDefault<FxHasher>>>,
}

impl<const N: usize> PerTenant<N> {
    fn new(names: [&'static str; N]) -> Self {
        Self { names, ids: RefCell::default() }
    }

    /// The id of `tenant`'s counter `index` (of `names`).
    fn id(&self, host: &impl Host, tenant: &str, index: usize) -> Option<u32> {
        if let Some(ids) = self.ids.borrow().get(tenant) {
            return ids.get(index).copied().flatten();
        }
        let ids = self.names.map(|n| define(host, MetricKind::Counter, &format!("tenant.{tenant}.{n}")));
        let id = ids.get(index).copied().flatten();
        self.ids.borrow_mut().insert(tenant.to_string(), ids);
        id
    }
}

/// The metric ids of one VM. An id the host refused to define is `None`, and counting it does nothing.
#[derive(Debug)]
pub struct Metrics {
    /// Counts not yet handed to the host, by metric id.
    pending: RefCell<Vec<(u32, i64)>>,
    /// Per tenant: allowed, forbidden.
    tenants: PerTenant<2>,
    /// Per tenant: upstream token counters, by [`TokenEvent::index`].
    tokens: PerTenant<5>,
    /// Per tenant: refusals counted on their own, by [`TenantRefusal::index`].
    refusals: PerTenant<2>,
    /// Per tenant: quota allowed, limited.
    quotas: PerTenant<2>,
    counters: Vec<Option<u32>>,
    rejected: Vec<Option<u32>>,
    gauges: Vec<Option<u32>>,
}

fn define(host: &impl Host, kind: MetricKind, name: &str) -> Option<u32> {
    host.define_metric(kind, &format!("{PREFIX}.{name}"))
}

impl Metrics {
    /// Defines every fixed metric.
    pub fn define(host: &impl Host) -> Self {
        Self {
            pending: RefCell::default(),
            tenants: PerTenant::new(["allowed", "forbidden"]),
            tokens: PerTenant::new(TokenEvent::ALL.map(TokenEvent::name)),
            refusals: PerTenant::new(TenantRefusal::ALL.map(TenantRefusal::name)),
            quotas: PerTenant::new(["quota.allowed", "quota.limited"]),
            counters: COUNTERS.iter().map(|m| define(host, MetricKind::Counter, m.name())).collect(),
            rejected: Rejection::ALL.iter().map(|r| define(host, MetricKind::Counter, r.stat_name())).collect(),
            gauges: Gauge::ALL.iter().map(|g| define(host, MetricKind::Gauge, g.name())).collect(),
        }
    }

    fn id(&self, host: &impl Host, metric: Metric<'_>) -> Option<u32> {
        match metric.slot() {
            CounterSlot::Fixed(i) => self.counters.get(i).copied().flatten(),
            CounterSlot::Rejected(i) => self.rejected.get(i).copied().flatten(),
            CounterSlot::Tenant { tenant, allowed } => self.tenants.id(host, tenant, usize::from(!allowed)),
            CounterSlot::TenantToken { tenant, event } => self.tokens.id(host, tenant, event.index()),
            CounterSlot::TenantRefusal { tenant, refusal } => self.refusals.id(host, tenant, refusal.index()),
            CounterSlot::TenantQuota { tenant, allowed } => self.quotas.id(host, tenant, usize::from(!allowed)),
        }
    }

    /// Adds one to a counter (handed to the host at the next [`Metrics::flush`]).
    pub fn count(&self, host: &impl Host, metric: Metric<'_>) {
        let Some(id) = self.id(host, metric) else { return };
        let mut pending = self.pending.borrow_mut();
        match pending.iter_mut().find(|(m, _)| *m == id) {
            Some((_, n)) => *n += 1,
            None => pending.push((id, 1)),
        }
    }

    /// Hands the pending counts to the host.
    pub fn flush(&self, host: &impl Host) {
        for (id, n) in self.pending.borrow_mut().drain(..) {
            host.increment_metric(id, n);
        }
    }

    /// Sets a gauge.
    pub fn set(&self, host: &impl Host, gauge: Gauge, value: u64) {
        if let Some(id) = self.gauges.get(gauge.index()).copied().flatten() {
            host.record_metric(id, value);
        }
    }
}
