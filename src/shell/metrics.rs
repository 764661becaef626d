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

/// A tenant's (allowed, forbidden) counter ids.
type TenantMetrics = (Option<u32>, Option<u32>);

/// Prefix of every metric name.
pub const PREFIX: &str = "fhir_tenant_router";

/// The metric ids of one VM. An id the host refused to define is `None`, and counting it does nothing.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Counts not yet handed to the host, by metric id.
    pending: RefCell<Vec<(u32, i64)>>,
    /// Per-tenant counters (allowed, forbidden), defined on a tenant's first request.
    tenants: RefCell<HashMap<String, TenantMetrics, BuildHasherDefault<FxHasher>>>,
    /// Per-tenant upstream token counters, by [`TokenEvent::index`], defined on first use.
    tokens: RefCell<HashMap<String, [Option<u32>; 5], BuildHasherDefault<FxHasher>>>,
    /// Per-tenant refusal counters, by [`TenantRefusal::index`], defined on a tenant's first such refusal.
    refusals: RefCell<HashMap<String, [Option<u32>; 2], BuildHasherDefault<FxHasher>>>,
    /// Per-tenant quota counters (allowed, limited), defined on first use.
    quotas: RefCell<HashMap<String, TenantMetrics, BuildHasherDefault<FxHasher>>>,
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
            tenants: RefCell::default(),
            tokens: RefCell::default(),
            refusals: RefCell::default(),
            quotas: RefCell::default(),
            counters: COUNTERS.iter().map(|m| define(host, MetricKind::Counter, m.name())).collect(),
            rejected: Rejection::ALL.iter().map(|r| define(host, MetricKind::Counter, r.stat_name())).collect(),
            gauges: Gauge::ALL.iter().map(|g| define(host, MetricKind::Gauge, g.name())).collect(),
        }
    }

    fn id(&self, host: &impl Host, metric: Metric<'_>) -> Option<u32> {
        match metric.slot() {
            CounterSlot::Fixed(i) => self.counters.get(i).copied().flatten(),
            CounterSlot::Rejected(i) => self.rejected.get(i).copied().flatten(),
            CounterSlot::Tenant { tenant, allowed: true } => self.tenant(host, tenant).0,
            CounterSlot::Tenant { tenant, allowed: false } => self.tenant(host, tenant).1,
            CounterSlot::TenantToken { tenant, event } => self.token(host, tenant, event),
            CounterSlot::TenantRefusal { tenant, refusal } => self.refusal(host, tenant, refusal),
            CounterSlot::TenantQuota { tenant, allowed } => {
                let ids = self.quota(host, tenant);
                if allowed {
                    ids.0
                } else {
                    ids.1
                }
            }
        }
    }

    fn refusal(&self, host: &impl Host, tenant: &str, refusal: TenantRefusal) -> Option<u32> {
        let mut refusals = self.refusals.borrow_mut();
        if let Some(ids) = refusals.get(tenant) {
            return ids.get(refusal.index()).copied().flatten();
        }
        let ids =
            TenantRefusal::ALL.map(|r| define(host, MetricKind::Counter, &format!("tenant.{tenant}.{}", r.name())));
        let id = ids.get(refusal.index()).copied().flatten();
        refusals.insert(tenant.to_string(), ids);
        id
    }

    fn quota(&self, host: &impl Host, tenant: &str) -> TenantMetrics {
        let mut quotas = self.quotas.borrow_mut();
        if let Some(ids) = quotas.get(tenant) {
            return *ids;
        }
        let ids = (
            define(host, MetricKind::Counter, &format!("tenant.{tenant}.quota.allowed")),
            define(host, MetricKind::Counter, &format!("tenant.{tenant}.quota.limited")),
        );
        quotas.insert(tenant.to_string(), ids);
        ids
    }

    fn token(&self, host: &impl Host, tenant: &str, event: TokenEvent) -> Option<u32> {
        let mut tokens = self.tokens.borrow_mut();
        if let Some(ids) = tokens.get(tenant) {
            return ids.get(event.index()).copied().flatten();
        }
        let ids = TokenEvent::ALL.map(|e| define(host, MetricKind::Counter, &format!("tenant.{tenant}.{}", e.name())));
        let id = ids.get(event.index()).copied().flatten();
        tokens.insert(tenant.to_string(), ids);
        id
    }

    fn tenant(&self, host: &impl Host, tenant: &str) -> TenantMetrics {
        let mut tenants = self.tenants.borrow_mut();
        if let Some(ids) = tenants.get(tenant) {
            return *ids;
        }
        let ids = (
            define(host, MetricKind::Counter, &format!("tenant.{tenant}.allowed")),
            define(host, MetricKind::Counter, &format!("tenant.{tenant}.forbidden")),
        );
        tenants.insert(tenant.to_string(), ids);
        ids
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
