//! The HTTP context: request headers in, the core's decision applied; for some requests the request body
//! (Bundles judged by the allowlist) or the response (CapabilityStatement patching, link rewriting) too.
//! Nothing from the request (path, query, token, body) is ever logged.
//!
//! [`handle`] works on whatever context is the host's effective one, so the root context can also use it
//! to finish requests that waited for a JWKS refetch; what must happen later in the stream is left in
//! [`Shared::after`] under the context id.

use std::borrow::Cow;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};

use crate::audit::{Outcome, Record};
use crate::cache::Identity;
use crate::config::JwksSource;
use crate::decision::{decide, operation_outcome, Decision, Rejection, Request};
use crate::fhir::{Policy, Refusal};
use crate::links;
use crate::tenant::Tenant;

use super::root::{Shared, Waiter};
use super::{header_map, header_value, millis};
use crate::headers::parse_pairs;

/// The request data the decision needs, borrowed from the host's header map (owned only when a request
/// must wait for a JWKS refetch or for its body).
#[derive(Clone, Debug, Default)]
pub struct HttpRequest<'a> {
    pub method: Cow<'a, str>,
    pub path: Cow<'a, str>,
    pub authority: Cow<'a, str>,
    pub scheme: Cow<'a, str>,
    pub authorization: Option<Cow<'a, str>>,
    pub duplicate_authorization: bool,
}

/// A request kept beyond the header callback.
pub type OwnedRequest = HttpRequest<'static>;

fn owned(v: &str) -> Cow<'static, str> {
    Cow::Owned(v.to_owned())
}

impl<'a> HttpRequest<'a> {
    /// Reads the request out of the raw header map (one host call), and removes client-sent copies of the
    /// headers this filter owns (they must never reach routing or an upstream).
    fn read(shared: &Shared, raw: &'a [u8]) -> Self {
        let config = &shared.config;
        let mut request = HttpRequest::default();
        let mut spoofed = false;
        // Values are used in place; a non-UTF-8 byte (lossily decoded, copied) becomes U+FFFD, which no token,
        // path or cluster name contains.
        let text = |v: &'a [u8]| String::from_utf8_lossy(v);
        for (name, value) in parse_pairs(raw).unwrap_or_default() {
            match name {
                b":method" => request.method = text(value),
                b":path" => request.path = text(value),
                b":authority" => request.authority = text(value),
                b":scheme" => request.scheme = text(value),
                b"authorization" => {
                    request.duplicate_authorization |= request.authorization.is_some();
                    request.authorization = Some(text(value));
                }
                // Ours to set (and X-Forwarded-Host/-Prefix, which servers use to build their links).
                n if n == config.route_header.as_bytes()
                    || n == config.tenant_header.as_bytes()
                    || n == b"x-forwarded-host"
                    || n == b"x-forwarded-prefix" =>
                {
                    spoofed = true
                }
                _ => {}
            }
        }
        if spoofed {
            for name in [config.route_header.as_str(), &config.tenant_header, "x-forwarded-host", "x-forwarded-prefix"]
            {
                remove_header(name);
            }
        }
        request
    }

    /// A copy that outlives the header map.
    pub fn to_owned_request(&self) -> OwnedRequest {
        HttpRequest {
            method: owned(&self.method),
            path: owned(&self.path),
            authority: owned(&self.authority),
            scheme: owned(&self.scheme),
            authorization: self.authorization.as_deref().map(owned),
            duplicate_authorization: self.duplicate_authorization,
        }
    }

    fn as_request(&self) -> Request<'_> {
        Request {
            method: &self.method,
            path: &self.path,
            authorization: self.authorization.as_deref(),
            duplicate_authorization: self.duplicate_authorization,
        }
    }

    /// How this client reached us: the configured public base, or the request's scheme and authority.
    fn public_base(&self, shared: &Shared) -> String {
        match &shared.config.public_base_url {
            Some(base) => base.clone(),
            None => {
                let scheme = if self.scheme.is_empty() { "http" } else { self.scheme.as_ref() };
                format!("{scheme}://{}", self.authority)
            }
        }
    }
}

/// What happens to a response on its way back.
#[derive(Clone, Debug)]
pub enum ResponseEdit {
    /// Patch the CapabilityStatement with the IdP's endpoints.
    PatchCapability,
    /// Rewrite links under `from` (the upstream's base) to `to` (the public base).
    RewriteLinks { from: String, to: String },
}

/// The audit record of a request whose verdict waits for its body (a Bundle judged by the allowlist).
#[derive(Clone, Debug)]
pub struct PendingAudit {
    pub request: OwnedRequest,
    pub identity: Identity,
    pub cluster: String,
}

/// What is left to do for a request after its headers were decided.
#[derive(Clone, Debug, Default)]
pub struct After {
    /// Written once the body is judged.
    pub audit: Option<PendingAudit>,
    /// The tenant's allowlist (and the tenant's id) must judge the request body (a Bundle posted to the base).
    pub inspect_body: Option<(Policy, String)>,
    pub response: Option<ResponseEdit>,
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
            let states = shared.keys.borrow();
            let soonest = states.0.iter().filter_map(|s| s.schedule.as_ref()).map(|s| s.retry_after_s(now_ms)).min();
            Some(soonest.unwrap_or(1).to_string())
        }
        Rejection::TenantsUnavailable => {
            let state = shared.tenants.borrow();
            Some(state.schedule.as_ref().map_or(1, |s| s.retry_after_s(now_ms)).to_string())
        }
        _ => None,
    };
    let extra = [("www-authenticate", www.as_deref()), ("retry-after", retry_after.as_deref())];
    send_outcome(rejection.status(), &body, &extra);
}

/// A local answer with a FHIR `OperationOutcome` body, never cached; `extra` headers are added when set.
fn send_outcome(status: u32, body: &str, extra: &[(&str, Option<&str>)]) {
    let mut headers = vec![("content-type", "application/fhir+json"), ("cache-control", "no-store")];
    headers.extend(extra.iter().filter_map(|(name, value)| value.map(|v| (*name, v))));
    let _ = hostcalls::send_http_response(status, headers, Some(body.as_bytes()));
}

/// 403 for a request the tenant's allowlist refuses; the message names the interaction (and Bundle entry).
fn forbid(shared: &Shared, refusal: &Refusal) {
    shared.metrics.count(shared.metrics.forbidden_by_policy);
    send_outcome(403, &operation_outcome("forbidden", &refusal.to_string()), &[]);
}

/// Rewrites the request for the tenant's FHIR server as it really is, and says what the response needs.
fn prepare_upstream(shared: &Shared, tenant: &Tenant, request: &HttpRequest<'_>) -> Option<ResponseEdit> {
    let upstream = tenant.upstream.as_deref()?;
    let public = request.public_base(shared);
    // Servers that honour X-Forwarded-* build their links from these; client-sent copies are overwritten.
    let (proto, rest) = public.split_once("://").unwrap_or(("http", public.as_str()));
    let (host, prefix) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    set_header("x-forwarded-host", host);
    set_header("x-forwarded-proto", proto);
    if prefix.is_empty() {
        remove_header("x-forwarded-prefix");
    } else {
        set_header("x-forwarded-prefix", prefix);
    }
    if let Some(authority) = &upstream.authority {
        set_header(":authority", authority);
    }
    if !upstream.base_path.is_empty() {
        let path = format!("{}{}", upstream.base_path, request.path);
        set_header(":path", &path);
    }
    if let Some((name, value)) = &upstream.header {
        set_header(name, value);
    }
    let from = upstream.links_base_url.clone()?;
    remove_header("accept-encoding"); // a compressed body could not be rewritten
    Some(ResponseEdit::RewriteLinks { from, to: public })
}

/// Writes the audit line and the filter state the access log reads (each when configured).
fn record(shared: &Shared, request: &HttpRequest<'_>, now_ms: u64, outcome: Outcome, detail: RecordDetail<'_>) {
    if shared.config.access_log_filter_state {
        if let Some(tenant) = detail.tenant {
            super::set_filter_state("fhir_tenant_router.tenant", tenant);
        }
        if let Some(client_id) = detail.identity.and_then(Identity::client_id) {
            super::set_filter_state("fhir_tenant_router.client_id", client_id);
        }
    }
    if shared.config.audit_log {
        let line = Record {
            time_ms: now_ms,
            method: &request.method,
            path: &request.path,
            outcome,
            reason: detail.reason,
            tenant: detail.tenant,
            identity: detail.identity,
            cluster: detail.cluster,
        }
        .to_line();
        log::info!("{line}");
    }
}

#[derive(Default)]
struct RecordDetail<'a> {
    reason: Option<&'a str>,
    tenant: Option<&'a str>,
    identity: Option<&'a Identity>,
    cluster: Option<&'a str>,
}

/// Decides and applies the decision on the host's effective context. `may_wait`: an unknown `kid` may park
/// the request until a JWKS refetch (not for a request that already waited).
pub fn handle(shared: &Shared, context_id: u32, request: &HttpRequest<'_>, now_ms: u64, may_wait: bool) -> Action {
    let config = &shared.config;
    let now_s = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
    let tenants = shared.tenants.borrow().map.clone();
    let decision = {
        let keys = shared.keys.borrow();
        let mut cache = shared.cache.borrow_mut();
        decide(config, tenants.as_deref(), &request.as_request(), &*keys, &mut cache, now_s, &shared.signatures)
    };
    match decision {
        Decision::Public { cluster, patch } => {
            if !config.forward_authorization {
                remove_header("authorization");
            }
            if patch {
                remove_header("accept-encoding");
                shared
                    .after
                    .borrow_mut()
                    .insert(context_id, After { response: Some(ResponseEdit::PatchCapability), ..Default::default() });
            }
            shared.metrics.count(shared.metrics.public);
            route_to(shared, cluster);
            record(
                shared,
                request,
                now_ms,
                Outcome::Public,
                RecordDetail { cluster: Some(cluster), ..Default::default() },
            );
            Action::Continue
        }
        Decision::SmartConfiguration { body } => {
            shared.metrics.count(shared.metrics.public);
            let headers = vec![("content-type", "application/json"), ("cache-control", "max-age=3600")];
            let _ = hostcalls::send_http_response(200, headers, Some(body.as_bytes()));
            record(shared, request, now_ms, Outcome::Public, RecordDetail::default());
            Action::Pause
        }
        Decision::Route { tenant, identity, cached, inspect_body } => {
            if !config.forward_authorization {
                remove_header("authorization");
            }
            let response = prepare_upstream(shared, tenant, request);
            set_header(&config.tenant_header, &tenant.id);
            let inspect_body = inspect_body.then(|| (tenant.policy().clone(), tenant.id.clone()));
            let audit = inspect_body.as_ref().map(|_| PendingAudit {
                request: request.to_owned_request(),
                identity: identity.clone(),
                cluster: tenant.cluster.clone(),
            });
            let deferred = audit.is_some();
            if inspect_body.is_some() || response.is_some() {
                shared.after.borrow_mut().insert(context_id, After { audit, inspect_body, response });
            }
            shared.metrics.count(if cached { shared.metrics.cache_hits } else { shared.metrics.cache_misses });
            shared.metrics.count(shared.metrics.allowed);
            route_to(shared, &tenant.cluster);
            // The headers go on; the body is held (buffered) until the Bundle is judged. Envoy's wasm host
            // cannot hold headers and read the body at once (a paused header phase gets no body
            // callbacks), so a refused Bundle's headers may reach the upstream, its body never does: the
            // upstream sees a reset stream, not a request it could execute.
            if !deferred {
                shared.metrics.count_tenant(&tenant.id, true);
                let detail = RecordDetail {
                    tenant: Some(&tenant.id),
                    identity: Some(&identity),
                    cluster: Some(&tenant.cluster),
                    ..Default::default()
                };
                record(shared, request, now_ms, Outcome::Allowed, detail);
            }
            Action::Continue
        }
        Decision::Forbidden { tenant, identity, refusal } => {
            forbid(shared, &refusal);
            shared.metrics.count_tenant(&tenant.id, false);
            let detail = RecordDetail {
                reason: Some("allowlist"),
                tenant: Some(&tenant.id),
                identity: Some(&identity),
                cluster: None,
            };
            record(shared, request, now_ms, Outcome::Forbidden, detail);
            Action::Pause
        }
        Decision::IssuerNotAllowed { tenant } => {
            reject(shared, Rejection::IssuerNotAllowed, now_ms);
            shared.metrics.count_tenant(&tenant.id, false);
            let detail = RecordDetail {
                reason: Some(Rejection::IssuerNotAllowed.reason()),
                tenant: Some(&tenant.id),
                ..Default::default()
            };
            record(shared, request, now_ms, Outcome::Rejected, detail);
            Action::Pause
        }
        Decision::UnknownKey { provider } => {
            let min_refetch_ms = match config.providers.get(provider).map(|p| &p.jwks) {
                Some(JwksSource::Remote(remote)) if may_wait => Some(remote.min_refetch_ms),
                _ => None,
            };
            if let Some(min_refetch_ms) = min_refetch_ms {
                let mut states = shared.keys.borrow_mut();
                if let Some(state) = states.0.get_mut(provider) {
                    if state.schedule.as_mut().is_some_and(|s| s.unknown_kid(now_ms, min_refetch_ms)) {
                        shared.metrics.count(shared.metrics.jwks_unknown_kid_waits);
                        state.waiting.push(Waiter { context_id, request: request.to_owned_request() });
                        return Action::Pause;
                    }
                }
            }
            reject(shared, Rejection::UnknownKey, now_ms);
            record(
                shared,
                request,
                now_ms,
                Outcome::Rejected,
                RecordDetail { reason: Some(Rejection::UnknownKey.reason()), ..Default::default() },
            );
            Action::Pause
        }
        Decision::Reject(rejection) => {
            reject(shared, rejection, now_ms);
            record(
                shared,
                request,
                now_ms,
                Outcome::Rejected,
                RecordDetail { reason: Some(rejection.reason()), ..Default::default() },
            );
            Action::Pause
        }
    }
}

/// The allowlist's verdict on a Bundle posted to the base (the request's audit line waited for it), on the
/// host's effective context: `Continue` lets the held request go on.
pub fn judge_bundle(shared: &Shared, context_id: u32, after: After, body: &[u8], now_ms: u64) -> Action {
    let Some((policy, tenant)) = after.inspect_body else {
        return Action::Continue;
    };
    let verdict = policy.check_bundle(body);
    let allowed = verdict.is_ok();
    if let Some(a) = shared.after.borrow_mut().get_mut(&context_id) {
        a.inspect_body = None; // judged
        a.audit = None;
    }
    if let Err(refusal) = &verdict {
        forbid(shared, refusal);
    }
    shared.metrics.count_tenant(&tenant, allowed);
    if let Some(audit) = after.audit {
        let detail = RecordDetail {
            reason: (!allowed).then_some("allowlist"),
            tenant: Some(&tenant),
            identity: Some(&audit.identity),
            cluster: allowed.then_some(audit.cluster.as_str()),
        };
        let outcome = if allowed { Outcome::Allowed } else { Outcome::Forbidden };
        record(shared, &audit.request, now_ms, outcome, detail);
    }
    if allowed {
        Action::Continue
    } else {
        Action::Pause
    }
}

pub struct Filter {
    context_id: u32,
    shared: Rc<Shared>,
    /// The response body is being buffered for an edit.
    editing_response: Option<ResponseEdit>,
}

impl Filter {
    pub fn new(context_id: u32, shared: Rc<Shared>) -> Self {
        Self { context_id, shared, editing_response: None }
    }

    fn after(&self) -> Option<After> {
        self.shared.after.borrow().get(&self.context_id).cloned()
    }
}

impl Context for Filter {
    fn on_done(&mut self) -> bool {
        self.shared.after.borrow_mut().remove(&self.context_id);
        self.shared.body_complete.borrow_mut().remove(&self.context_id);
        true
    }
}

fn is_json(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|t| t.to_ascii_lowercase().contains("json"))
}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let raw = header_map(MapType::HttpRequestHeaders);
        let request = HttpRequest::read(&self.shared, &raw);
        let now_ms = millis(self.get_current_time());
        let action = handle(&self.shared, self.context_id, &request, now_ms, true);
        if end_of_stream {
            if let Some(after) = self.after().filter(|a| a.inspect_body.is_some()) {
                // POST to the base without a body: not a Bundle.
                return judge_bundle(&self.shared, self.context_id, after, &[], now_ms);
            }
        }
        action
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.shared.is_waiting(self.context_id) {
            // Still waiting for a JWKS refetch: nothing may go on. Note when the body is complete, so that
            // the root context can judge it when it decides this request.
            if end_of_stream {
                self.shared.body_complete.borrow_mut().insert(self.context_id);
            }
            return Action::Pause;
        }
        let Some(after) = self.after().filter(|a| a.inspect_body.is_some()) else {
            return Action::Continue;
        };
        if !end_of_stream {
            return Action::Pause; // buffer the whole Bundle
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        judge_bundle(&self.shared, self.context_id, after, &body, millis(self.get_current_time()))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.edit_response_headers(end_of_stream)
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(edit) = &self.editing_response else {
            return Action::Continue;
        };
        if !end_of_stream {
            return Action::Pause; // buffer the whole body
        }
        let body = self.get_http_response_body(0, body_size).unwrap_or_default();
        let edited = match edit {
            ResponseEdit::PatchCapability => {
                self.shared.config.discovery.as_ref().and_then(|d| d.patch_capability_statement(&body))
            }
            ResponseEdit::RewriteLinks { from, to } => links::rewrite_body(&body, from, to),
        };
        if let Some(new) = edited {
            self.set_http_response_body(0, body_size, &new);
        }
        Action::Continue
    }
}

impl Filter {
    /// Response-header edits (link headers; prepare a body edit); the body edit happens in the body callback.
    fn edit_response_headers(&mut self, end_of_stream: bool) -> Action {
        let Some(edit) = self.after().and_then(|a| a.response) else {
            return Action::Continue;
        };
        if let ResponseEdit::RewriteLinks { from, to } = &edit {
            for name in ["location", "content-location"] {
                if let Some(new) =
                    header_value(MapType::HttpResponseHeaders, name).and_then(|v| links::rewrite_url(&v, from, to))
                {
                    self.set_http_response_header(name, Some(&new));
                }
            }
        }
        let encoded = header_value(MapType::HttpResponseHeaders, "content-encoding").is_some_and(|e| e != "identity");
        let content_type = header_value(MapType::HttpResponseHeaders, "content-type");
        if end_of_stream || encoded || !is_json(content_type.as_deref()) {
            return Action::Continue;
        }
        self.set_http_response_header("content-length", None); // the body changes length
        self.editing_response = Some(edit);
        Action::Continue
    }
}
