//! The effect interpreter: each [`Effect`] the core pushes becomes the host call that does it, at once and
//! in order. Nothing here looks at the request.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::audit_sink::Sink;
use crate::effect::{Effect, Effects, FetchTarget, Metric, SinkDrop};

use super::host::Host;
use super::metrics::Metrics;

/// Applies effects to `host`. Fetches are sent here; one that cannot be sent is kept in `unsent`, for the
/// caller to report back to the core once the event is over.
pub struct Apply<'s, H> {
    pub host: &'s H,
    pub metrics: &'s Metrics,
    /// The root context's calls in flight, by token.
    pub calls: &'s RefCell<HashMap<u32, FetchTarget>>,
    pub unsent: Vec<(FetchTarget, String)>,
    /// The size of the buffered response body a replacement replaces (from the body callback).
    pub response_body_size: usize,
    /// This VM's audit sink (`audit_sink`), where the request path's AuditEvents are queued.
    pub sink: Option<&'s RefCell<Sink>>,
    /// A request header was edited by this callback: Envoy has cleared the route cache itself.
    edited: bool,
}

impl<'s, H: Host> Apply<'s, H> {
    pub fn new(host: &'s H, metrics: &'s Metrics, calls: &'s RefCell<HashMap<u32, FetchTarget>>) -> Self {
        Self { host, metrics, calls, unsent: Vec::new(), response_body_size: 0, sink: None, edited: false }
    }

    fn request_header(&mut self, name: &str, value: Option<&str>) {
        self.edited = true;
        self.host.set_request_header(name, value);
    }
}

impl<H: Host> Effects for Apply<'_, H> {
    fn push(&mut self, effect: Effect<'_>) {
        let host = self.host;
        match effect {
            Effect::SetRequestHeader(name, value) => self.request_header(name, Some(value)),
            Effect::RemoveRequestHeader(name) => self.request_header(name, None),
            // Envoy's wasm host clears the route cache on every request-header edit (`onHeadersModified`,
            // for modules of ABI 0.2.1 like ours), so after one the foreign call would clear it again.
            Effect::ClearRouteCache if self.edited => {}
            Effect::ClearRouteCache => host.clear_route_cache(),
            Effect::Reply(reply) => host.send_reply(reply.status, reply.headers, reply.body),
            // proxy_set_property(k) stores filter state `wasm.k`: the core's names already carry the `wasm.`.
            Effect::FilterState(key, value) => host.set_filter_state(key.strip_prefix("wasm.").unwrap_or(key), value),
            // Envoy's proxy-wasm host has no way to set dynamic metadata (no ABI call, no foreign function):
            // the wasm build's decision is its filter state.
            Effect::DynamicMetadata(..) => {}
            // Nor a span: each tag is filter state of its name (`wasm.fhir_tenant_router.tenant`), which the
            // tracing `custom_tags` of Envoy's connection manager read (`%FILTER_STATE(...:PLAIN)%`).
            Effect::SpanTags(tags) => {
                for (name, value) in tags {
                    host.set_filter_state(name, value);
                }
            }
            Effect::Count(metric) => self.metrics.count(host, metric),
            Effect::Gauge(gauge, value) => self.metrics.set(host, gauge, value),
            Effect::Log(level, line) => host.log(level, line),
            Effect::SetResponseHeader(name, value) => host.set_response_header(name, Some(value)),
            Effect::RemoveResponseHeader(name) => host.set_response_header(name, None),
            Effect::ReplaceResponseBody(body) => host.set_response_body(self.response_body_size, body),
            Effect::ResumeRequest => host.resume_request(),
            Effect::Resend(resend) => match host.dispatch(resend.cluster, resend.headers, &[], resend.timeout_ms) {
                Ok(token) => {
                    self.calls.borrow_mut().insert(token, FetchTarget::Resend(resend.context_id));
                }
                Err(status) => {
                    let why = format!("could not be sent through cluster {}: {status}", resend.cluster);
                    self.unsent.push((FetchTarget::Resend(resend.context_id), why));
                }
            },
            // Into the bounded queue: no host call (counts are flushed on the tick), no wait.
            Effect::SinkEvent { tenant, event, time_ms } => {
                let Some(sink) = self.sink else { return };
                match sink.try_borrow_mut() {
                    Ok(mut sink) => sink.offer(tenant, event, time_ms, self),
                    // The sink is busy with its own work further up this VM's stack (never on the request
                    // path): the event is dropped and counted, never waited for.
                    Err(_) => self.metrics.count(host, Metric::AuditSinkDropped(SinkDrop::Contended)),
                }
            }
            Effect::Fetch(fetch) => {
                // A call made from a request's context is answered to that context, which hands the answer
                // to the shared handler (`Shared::fetch_ended`); one whose request went away is never
                // answered, and the core gives it up after its timeout.
                match host.dispatch(fetch.cluster, &fetch.headers(), fetch.body(), fetch.timeout_ms) {
                    Ok(token) => {
                        self.calls.borrow_mut().insert(token, fetch.target);
                    }
                    Err(status) => {
                        let why = format!("could not be sent through cluster {}: {status}", fetch.cluster);
                        self.unsent.push((fetch.target, why));
                    }
                }
            }
        }
    }
}
