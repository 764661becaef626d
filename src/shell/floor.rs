//! Bench only (cargo feature `bench-floor-wasm`, never in a shipped build): the wasm twin of the dynamic
//! module's floor (`src/native/floor.rs`), the least a header-routing proxy-wasm filter asks of Envoy per
//! request, without the core. With `FHIR_TENANT_ROUTER_BENCH_FLOOR_TENANT=<id>` in the VM's environment
//! (`vm_config.environment_variables`) the request-headers callback answers 401 without an `Authorization`
//! header, and otherwise removes it, sets the tenant header to `<id>` and the route header to that tenant's
//! cluster: one header read and three header edits (each edit makes Envoy re-pick the route for a module of
//! ABI 0.2.1, so, like ours, it makes no `clear_route_cache` call), where ours reads the whole header map and
//! makes its other calls (the clock, the audit line). `bench/run.py` measures
//! it beside the real module (`wasm-floor`): against the do-nothing filter it prices V8's host calls, and ours
//! on top of it is the core's cost in the VM and the calls the floor does not make.

use std::cell::OnceCell;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{Action, MapType};

use super::filter::Filter;
use super::host::Host;

const TENANT_ENV: &str = "FHIR_TENANT_ROUTER_BENCH_FLOOR_TENANT";

/// What the floor sets: the tenant header's name and value, the route header's name and value.
struct Route {
    tenant_header: String,
    tenant: String,
    route_header: String,
    cluster: String,
}

thread_local! {
    static ROUTE: OnceCell<Option<Route>> = const { OnceCell::new() };
}

/// The floor's answer for a request's headers, or `None` when the floor is off (no tenant in the environment).
pub(crate) fn request_headers<H: Host>(filter: &Filter<H>) -> Option<Action> {
    ROUTE.with(|cell| {
        let route = cell
            .get_or_init(|| {
                let tenant = std::env::var(TENANT_ENV).ok()?;
                let (tenant_header, route_header, cluster) = filter.floor_route(&tenant);
                Some(Route { tenant_header, tenant, route_header, cluster })
            })
            .as_ref()?;
        let request = MapType::HttpRequestHeaders;
        if !matches!(hostcalls::get_map_value_bytes(request, "authorization"), Ok(Some(_))) {
            let _ = hostcalls::send_http_response(401, vec![], Some(b"{}"));
            return Some(Action::Pause);
        }
        let _ = hostcalls::set_map_value(request, "authorization", None);
        let _ = hostcalls::set_map_value(request, &route.tenant_header, Some(&route.tenant));
        let _ = hostcalls::set_map_value(request, &route.route_header, Some(&route.cluster));
        Some(Action::Continue)
    })
}
