//! Counters and gauges through proxy-wasm metrics. Envoy shows them as `wasmcustom.fhir_tenant_router.*` in
//! `/stats` and `/stats/prometheus`; every VM defining the same name shares one stat.
//!
//! Counting on the hot path is local (no host call); the root context flushes the counts to the host on
//! every tick (500 ms), so stats lag by at most that.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

use crate::decision::Rejection;
use crate::tenant::FxHasher;

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
    pub allowed: Option<u32>,
    pub public: Option<u32>,
    rejected: Vec<Option<u32>>,
    pub jwks_fetch_ok: Option<u32>,
    pub jwks_fetch_failed: Option<u32>,
    pub jwks_keys: Option<u32>,
    pub signature_host: Option<u32>,
    pub signature_pure_rust: Option<u32>,
    pub cache_hits: Option<u32>,
    pub cache_misses: Option<u32>,
    pub cache_entries: Option<u32>,
    pub jwks_unknown_kid_waits: Option<u32>,
    pub vm_memory_bytes: Option<u32>,
    pub forbidden_by_policy: Option<u32>,
    pub registry_fetch_ok: Option<u32>,
    pub registry_fetch_failed: Option<u32>,
    pub registry_tenants: Option<u32>,
}

fn define(kind: MetricType, name: &str) -> Option<u32> {
    hostcalls::define_metric(kind, &format!("{PREFIX}.{name}")).ok()
}

impl Metrics {
    /// Defines every metric.
    pub fn define() -> Self {
        Self {
            pending: RefCell::default(),
            tenants: RefCell::default(),
            allowed: define(MetricType::Counter, "requests.allowed"),
            public: define(MetricType::Counter, "requests.public"),
            rejected: Rejection::ALL
                .iter()
                .map(|r| define(MetricType::Counter, &format!("requests.rejected.{}", r.reason())))
                .collect(),
            jwks_fetch_ok: define(MetricType::Counter, "jwks.fetch_ok"),
            jwks_fetch_failed: define(MetricType::Counter, "jwks.fetch_failed"),
            jwks_keys: define(MetricType::Gauge, "jwks.keys"),
            signature_host: define(MetricType::Counter, "signature.host"),
            signature_pure_rust: define(MetricType::Counter, "signature.pure_rust"),
            cache_hits: define(MetricType::Counter, "cache.hits"),
            cache_misses: define(MetricType::Counter, "cache.misses"),
            cache_entries: define(MetricType::Gauge, "cache.entries"),
            jwks_unknown_kid_waits: define(MetricType::Counter, "jwks.unknown_kid_refetch_waits"),
            vm_memory_bytes: define(MetricType::Gauge, "vm.memory_bytes"),
            forbidden_by_policy: define(MetricType::Counter, "requests.forbidden_by_policy"),
            registry_fetch_ok: define(MetricType::Counter, "registry.fetch_ok"),
            registry_fetch_failed: define(MetricType::Counter, "registry.fetch_failed"),
            registry_tenants: define(MetricType::Gauge, "registry.tenants"),
        }
    }

    /// Adds one to a counter (handed to the host at the next [`Metrics::flush`]).
    pub fn count(&self, id: Option<u32>) {
        let Some(id) = id else { return };
        let mut pending = self.pending.borrow_mut();
        match pending.iter_mut().find(|(m, _)| *m == id) {
            Some((_, n)) => *n += 1,
            None => pending.push((id, 1)),
        }
    }

    /// Counts a request of `tenant`: allowed, or refused by its allowlist.
    pub fn count_tenant(&self, tenant: &str, allowed: bool) {
        let ids = {
            let mut tenants = self.tenants.borrow_mut();
            match tenants.get(tenant) {
                Some(ids) => *ids,
                None => {
                    let ids = (
                        define(MetricType::Counter, &format!("tenant.{tenant}.allowed")),
                        define(MetricType::Counter, &format!("tenant.{tenant}.forbidden")),
                    );
                    tenants.insert(tenant.to_string(), ids);
                    ids
                }
            }
        };
        self.count(if allowed { ids.0 } else { ids.1 });
    }

    /// Hands the pending counts to the host.
    pub fn flush(&self) {
        for (id, n) in self.pending.borrow_mut().drain(..) {
            let _ = hostcalls::increment_metric(id, n);
        }
    }

    /// Sets a gauge.
    pub fn set(id: Option<u32>, value: u64) {
        if let Some(id) = id {
            let _ = hostcalls::record_metric(id, value);
        }
    }

    /// Counts one refusal under its reason.
    pub fn count_rejection(&self, rejection: Rejection) {
        let index = Rejection::ALL.iter().position(|r| *r == rejection);
        self.count(index.and_then(|i| self.rejected.get(i).copied().flatten()));
    }
}
