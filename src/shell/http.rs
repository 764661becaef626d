//! The HTTP context: request headers in, the core's decision applied. Nothing from the request (path,
//! query, token) is ever logged.
//!
//! [`handle`] works on whatever context is the host's effective one, so the root context can also use it
//! to finish requests that waited for a JWKS refetch.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};

use crate::config::JwksSource;
use crate::decision::{decide, Decision, Rejection, Request};

use super::metrics::Metrics;
use super::millis;
use super::root::{Shared, Waiter};

/// The request data the decision needs, owned so that a request can wait for a JWKS refetch.
#[derive(Clone, Debug, Default)]
pub struct OwnedRequest {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub duplicate_authorization: bool,
}

impl OwnedRequest {
    /// Reads the request headers in one host call, and removes client-sent copies of the headers this filter
    /// owns (they must never reach routing or an upstream).
    fn read(shared: &Shared) -> Self {
        let config = &shared.config;
        let mut request = OwnedRequest::default();
        let mut spoofed = false;
        for (name, value) in hostcalls::get_map(MapType::HttpRequestHeaders).unwrap_or_default() {
            match name.as_str() {
                ":method" => request.method = value,
                ":path" => request.path = value,
                "authorization" => {
                    request.duplicate_authorization |= request.authorization.is_some();
                    request.authorization = Some(value);
                }
                n if n == config.route_header || n == config.tenant_header => spoofed = true,
                _ => {}
            }
        }
        if spoofed {
            remove_header(&config.route_header);
            remove_header(&config.tenant_header);
        }
        request
    }

    fn as_request(&self) -> Request<'_> {
        Request {
            method: &self.method,
            path: &self.path,
            authorization: self.authorization.as_deref(),
            duplicate_authorization: self.duplicate_authorization,
        }
    }
}

fn set_header(name: &str, value: &str) {
    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value));
}

fn remove_header(name: &str) {
    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None);
}

/// Points Envoy's `cluster_header` route at `cluster`, and makes Envoy pick the route again.
fn route_to(shared: &Shared, cluster: &str) {
    set_header(&shared.config.route_header, cluster);
    let _ = hostcalls::call_foreign_function("clear_route_cache", None);
}

fn reject(shared: &Shared, rejection: Rejection, now_ms: u64) {
    shared.metrics.count_rejection(rejection);
    log::debug!("request refused: {}", rejection.reason());
    let body = rejection.operation_outcome();
    let www = rejection.www_authenticate();
    let retry_after = match rejection {
        Rejection::KeysUnavailable => {
            let state = shared.keys.borrow();
            Some(state.schedule.as_ref().map_or(1, |s| s.retry_after_s(now_ms)).to_string())
        }
        _ => None,
    };
    let mut headers = vec![("content-type", "application/fhir+json"), ("cache-control", "no-store")];
    if let Some(v) = www.as_deref() {
        headers.push(("www-authenticate", v));
    }
    if let Some(v) = retry_after.as_deref() {
        headers.push(("retry-after", v));
    }
    let _ = hostcalls::send_http_response(rejection.status(), headers, Some(body.as_bytes()));
}

/// Decides and applies the decision on the host's effective context. `may_wait`: an unknown `kid` may park
/// the request until a JWKS refetch (not for a request that already waited).
pub fn handle(shared: &Shared, context_id: u32, request: OwnedRequest, now_ms: u64, may_wait: bool) -> Action {
    let config = &shared.config;
    let now_s = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
    let keys = shared.keys.borrow().keys.clone();
    let decision = {
        let mut cache = shared.cache.borrow_mut();
        decide(config, &request.as_request(), keys.as_deref(), &mut cache, now_s, &shared.signatures)
    };
    match decision {
        Decision::Public { cluster } => {
            if !config.forward_authorization {
                remove_header("authorization");
            }
            Metrics::count(shared.metrics.public);
            route_to(shared, cluster);
            Action::Continue
        }
        Decision::Route { tenant, cached, .. } => {
            if !config.forward_authorization {
                remove_header("authorization");
            }
            set_header(&config.tenant_header, &tenant.id);
            Metrics::count(if cached { shared.metrics.cache_hits } else { shared.metrics.cache_misses });
            Metrics::count(shared.metrics.allowed);
            route_to(shared, &tenant.cluster);
            Action::Continue
        }
        Decision::Reject(Rejection::UnknownKey) if may_wait => {
            let JwksSource::Remote(remote) = &config.jwks else {
                reject(shared, Rejection::UnknownKey, now_ms);
                return Action::Pause;
            };
            let mut state = shared.keys.borrow_mut();
            let wait = state.schedule.as_mut().is_some_and(|s| s.unknown_kid(now_ms, remote.min_refetch_ms));
            if wait {
                Metrics::count(shared.metrics.jwks_unknown_kid_waits);
                state.waiting.push(Waiter { context_id, request });
            } else {
                drop(state);
                reject(shared, Rejection::UnknownKey, now_ms);
            }
            Action::Pause
        }
        Decision::Reject(rejection) => {
            reject(shared, rejection, now_ms);
            Action::Pause
        }
    }
}

pub struct Filter {
    context_id: u32,
    shared: Rc<Shared>,
}

impl Filter {
    pub fn new(context_id: u32, shared: Rc<Shared>) -> Self {
        Self { context_id, shared }
    }
}

impl Context for Filter {}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let request = OwnedRequest::read(&self.shared);
        let now_ms = millis(self.get_current_time());
        handle(&self.shared, self.context_id, request, now_ms, true)
    }
}
