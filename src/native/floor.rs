//! Bench only (cargo feature `bench-floor`, never in a shipped build): the least a header-routing dynamic
//! module asks of Envoy per request, without the core. With `FHIR_TENANT_ROUTER_BENCH_FLOOR_TENANT=<id>` in
//! Envoy's environment the request hook answers 401 without an `Authorization` header, and otherwise removes
//! it, sets the tenant header to `<id>` and the route header to that tenant's cluster, and clears the route
//! cache. `bench/run.py` measures it beside the real module (`dm-floor`): the difference is the core's cost,
//! and the floor against native `jwt_authn` is the ABI's.

use std::sync::OnceLock;

use crate::config::Config;

use super::abi::*;
use super::envoy::Envoy;

static TENANT: OnceLock<Option<String>> = OnceLock::new();

/// The floor's answer for a request's headers, or `None` when the floor is off (no tenant in the environment).
pub(crate) fn request_headers(env: &impl Envoy, filter: FilterEnvoyPtr, config: &Config) -> Option<u32> {
    let tenant = TENANT.get_or_init(|| std::env::var("FHIR_TENANT_ROUTER_BENCH_FLOOR_TENANT").ok()).as_deref()?;
    let cluster = config.tenants.get(tenant).map_or("", |t| t.cluster.as_str());
    if env.header(filter, REQUEST_HEADER, "authorization").is_none() {
        env.send_response(filter, 401, &[], b"{}");
        return Some(HEADERS_STOP_ITERATION);
    }
    env.set_header(filter, REQUEST_HEADER, "authorization", None);
    env.set_header(filter, REQUEST_HEADER, &config.tenant_header, Some(tenant));
    env.set_header(filter, REQUEST_HEADER, &config.route_header, Some(cluster));
    env.clear_route_cache(filter);
    Some(HEADERS_CONTINUE)
}
