//! The dynamic module's part of per-tenant quotas ([`crate::quota`]): the buckets themselves live in the
//! core's process-wide store, which every worker's router uses as it is; here the configured tenants' quota
//! counts (`tenant.quota.allowed` / `tenant.quota.limited`, labelled by tenant), kept in atomics by the
//! workers like the other per-tenant counts ([`super::counts`]), are handed to Envoy on the main thread's tick.

use crate::effect::Metric;

use super::abi::*;
use super::counts::TenantCounts;
use super::host::MetricIds;

/// Hands the quota counts since the last tick to Envoy: one labelled increment per tenant and counter that
/// moved. Main thread only.
pub(crate) fn hand_over(envoy_config: ConfigEnvoyPtr, metrics: &MetricIds, counts: &TenantCounts) {
    counts.drain(|tenant, allowed, n| {
        if let Some((id, Some(label))) = metrics.counter(Metric::TenantQuota(tenant, allowed)) {
            let mut labels = [ModuleBuffer::of(label.as_bytes())];
            // SAFETY: main thread, live config; the label outlives the call.
            unsafe {
                envoy_dynamic_module_callback_http_filter_config_increment_counter(
                    envoy_config,
                    id,
                    labels.as_mut_ptr(),
                    1,
                    n,
                )
            };
        }
    });
}
