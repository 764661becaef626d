//! The HTTP context: request headers in, the core's decision applied. Nothing from the request (path,
//! query, token) is ever logged.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use crate::decision::{decide, Decision, Rejection, Request};

use super::metrics::Metrics;
use super::millis;
use super::root::Shared;

pub struct Filter {
    shared: Rc<Shared>,
}

impl Filter {
    pub fn new(shared: Rc<Shared>) -> Self {
        Self { shared }
    }

    /// Points Envoy's `cluster_header` route at `cluster`, and makes Envoy pick the route again.
    fn route_to(&self, cluster: &str) {
        self.set_http_request_header(&self.shared.config.route_header, Some(cluster));
        let _ = hostcalls::call_foreign_function("clear_route_cache", None);
    }

    fn reject(&self, rejection: Rejection, now_ms: u64) {
        self.shared.metrics.count_rejection(rejection);
        log::debug!("request refused: {}", rejection.reason());
        let body = rejection.operation_outcome();
        let www = rejection.www_authenticate();
        let retry_after = match rejection {
            Rejection::KeysUnavailable => {
                let state = self.shared.keys.borrow();
                Some(
                    state
                        .schedule
                        .as_ref()
                        .map_or(1, |s| s.retry_after_s(now_ms))
                        .to_string(),
                )
            }
            _ => None,
        };
        let mut headers = vec![
            ("content-type", "application/fhir+json"),
            ("cache-control", "no-store"),
        ];
        if let Some(v) = www.as_deref() {
            headers.push(("www-authenticate", v));
        }
        if let Some(v) = retry_after.as_deref() {
            headers.push(("retry-after", v));
        }
        self.send_http_response(rejection.status(), headers, Some(body.as_bytes()));
    }
}

impl Context for Filter {}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let shared = Rc::clone(&self.shared);
        let config = &shared.config;
        // Client-sent copies of the headers this filter owns must never reach routing or an upstream.
        self.set_http_request_header(&config.route_header, None);
        self.set_http_request_header(&config.tenant_header, None);

        let method = self.get_http_request_header(":method").unwrap_or_default();
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let authorization = self.get_http_request_header("authorization");
        let now_ms = millis(self.get_current_time());
        let keys = shared.keys.borrow().keys.clone();
        let request = Request {
            method: &method,
            path: &path,
            authorization: authorization.as_deref(),
        };
        let now_s = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);

        match decide(config, &request, keys.as_deref(), now_s, &shared.signatures) {
            Decision::Public { cluster } => {
                if !config.forward_authorization {
                    self.set_http_request_header("authorization", None);
                }
                Metrics::count(shared.metrics.public);
                self.route_to(cluster);
                Action::Continue
            }
            Decision::Route { tenant, .. } => {
                if !config.forward_authorization {
                    self.set_http_request_header("authorization", None);
                }
                self.set_http_request_header(&config.tenant_header, Some(&tenant.id));
                Metrics::count(shared.metrics.allowed);
                self.route_to(&tenant.cluster);
                Action::Continue
            }
            Decision::Reject(rejection) => {
                self.reject(rejection, now_ms);
                Action::Pause
            }
        }
    }
}
