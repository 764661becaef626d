//! The dynamic-module shell driven through its hooks by a fake Envoy that enforces Envoy's rules
//! ([`super::fake`]): header bytes handed out are poisoned by the next change to their map, and a local reply
//! (or a continue answered locally further down) ends the stream inside the call. Every test asserts the
//! exact callbacks a hook makes, and that no re-entered hook did any work.

use serde_json::{json, Value};

use crate::testkeys::{self, NOW, TENANT_A};

use super::abi::{HEADERS_CONTINUE, HEADERS_STOP_ITERATION};
use super::fake::{FakeEnvoy, Id};

#[allow(dead_code)]
const _ID: Option<Id> = None;

const T0_MS: u64 = NOW as u64 * 1000;
const ROUTE: &str = "x-fhir-tenant-router-cluster";
const TENANT: &str = "x-fhir-tenant-id";

fn jwks() -> Value {
    serde_json::from_str(&testkeys::public_jwks()).unwrap()
}

/// The plugin JSON of the tests: inline keys, tenant A, audit line on.
fn plugin() -> Value {
    json!({
        "provider": {"issuer": testkeys::ISSUER, "audiences": [testkeys::AUDIENCE], "jwks": jwks()},
        "tenants": {TENANT_A: {"cluster": "tenant_a"}},
        "metadata_cluster": "fhir_metadata",
        "audit_log": true
    })
}

/// A remote JWKS instead of inline keys.
fn remote_plugin() -> Value {
    let mut p = plugin();
    p["provider"] = json!({
        "issuer": testkeys::ISSUER, "audiences": [testkeys::AUDIENCE],
        "jwks_uri": "http://127.0.0.1:9000/jwks", "jwks_cluster": "idp", "jwks_min_refetch_s": 1
    });
    p
}

fn configured(plugin: &Value) -> FakeEnvoy {
    let envoy = FakeEnvoy::default();
    envoy.set_now_ms(T0_MS);
    assert!(envoy.configure(&plugin.to_string()), "{:?}", envoy.take_calls());
    envoy.take_calls();
    envoy
}

/// A token naming a `kid` no key set has (its signature is never checked: cheap enough for Miri).
fn unknown_kid_bearer() -> String {
    use base64::Engine as _;
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let header = b64(json!({"alg": "RS256", "typ": "JWT", "kid": "nobody-knows-me"}));
    format!("Bearer {header}.{}.c2lnbmF0dXJl", b64(testkeys::claims_now()))
}

fn bearer(claims: &Value) -> String {
    format!("Bearer {}", testkeys::sign_rs256(claims))
}

fn request<'a>(method: &'a str, path: &'a str, authorization: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        (":method", method),
        (":path", path),
        (":authority", "fhir.example"),
        (":scheme", "https"),
        ("authorization", authorization),
    ]
}

/// The audit line among `calls`, parsed.
fn audit_line(calls: &[String]) -> Value {
    let line = calls.iter().find_map(|c| c.strip_prefix("log Info {\"audit\"")).expect("an audit line");
    serde_json::from_str(&format!("{{\"audit\"{line}")).unwrap()
}

/// The callbacks a re-entered hook made (see `fake`): work done while the outer hook's state is in use.
fn violations(calls: &[String]) -> Vec<&String> {
    calls.iter().filter(|c| c.starts_with("!! ")).collect()
}

/// `calls` with the audit line shortened to `log Info <audit>`.
fn shown(calls: &[String]) -> Vec<String> {
    calls
        .iter()
        .map(|c| if c.starts_with("log Info {\"audit\"") { "log Info <audit>".into() } else { c.clone() })
        .collect()
}

fn dump(calls: &[String]) -> String {
    calls.iter().map(|c| format!("  {c:?},\n")).collect()
}

// ---- finding 1: what the core reads is read before anything changes the header map ----

#[test]
fn a_base_path_tenants_audit_line_names_the_requests_own_interaction_and_type() {
    let mut p = plugin();
    p["tenants"][TENANT_A] = json!({"cluster": "tenant_a", "base_path": "/api/FHIR/R4"});
    let envoy = configured(&p);
    let auth = bearer(&testkeys::claims_now());
    let s = envoy.new_stream(0);
    assert_eq!(envoy.request_headers(s, &request("GET", "/Patient/1", &auth), true), HEADERS_CONTINUE);
    let calls = envoy.take_calls();
    let audit = audit_line(&calls);
    assert_eq!(audit["interaction"], "read", "{audit}");
    assert_eq!(audit["resource_type"], "Patient", "{audit}");
    assert_eq!(audit["tenant"], TENANT_A, "{audit}");
    assert_eq!(envoy.request_header(s, ":path").as_deref(), Some("/api/FHIR/R4/Patient/1"));
    assert_eq!(
        shown(&calls),
        [
            "get_headers request",
            "increment_counter fhir_tenant_router.signature.host 1",
            "increment_counter fhir_tenant_router.cache.misses 1",
            "remove_request_header authorization",
            "set_request_header :path: /api/FHIR/R4/Patient/1",
            &format!("set_request_header {TENANT}: {TENANT_A}"),
            "increment_counter fhir_tenant_router.requests.allowed 1",
            &format!("set_request_header {ROUTE}: tenant_a"),
            "clear_route_cache",
            "log Info <audit>",
        ],
        "{}",
        dump(&calls)
    );
    assert!(violations(&calls).is_empty(), "{}", dump(&calls));
}

#[test]
fn a_batch_bundles_audit_line_is_written_from_the_request_as_it_came() {
    let mut p = plugin();
    p["tenants"][TENANT_A] = json!({"cluster": "tenant_a", "base_path": "/api"});
    let envoy = configured(&p);
    let auth = bearer(&testkeys::claims_now());
    let s = envoy.new_stream(0);
    let headers = [request("POST", "/", &auth), vec![("content-type", "application/fhir+json")]].concat();
    assert_eq!(envoy.request_headers(s, &headers, false), HEADERS_STOP_ITERATION);
    let first = envoy.take_calls();
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/1"}}
    ]});
    assert_eq!(
        shown(&first),
        [
            "get_headers request",
            "increment_counter fhir_tenant_router.signature.host 1",
            "increment_counter fhir_tenant_router.cache.misses 1",
            "remove_request_header authorization",
            "set_request_header :path: /api/",
            &format!("set_request_header {TENANT}: {TENANT_A}"),
            "increment_counter fhir_tenant_router.requests.allowed 1",
            &format!("set_request_header {ROUTE}: tenant_a"),
            "clear_route_cache",
        ],
        "{}",
        dump(&first)
    );
    envoy.request_body(s, bundle.to_string().as_bytes());
    let calls = envoy.take_calls();
    assert_eq!(shown(&calls), ["get_body_chunks 1", "get_body_chunks 0", "log Info <audit>"], "{}", dump(&calls));
    let audit = audit_line(&calls);
    assert_eq!(audit["interaction"], "batch", "{audit}");
    assert_eq!(audit["outcome"], "allowed", "{audit}");
    assert!(violations(&calls).is_empty(), "{}", dump(&calls));
}

// ---- finding 2: Envoy re-enters the stream-complete hook from a local reply or a continue ----

/// A config whose first key set lacks the RS256 key, and a stream on worker 0 whose token (`auth`) waits for
/// the refetch; the refetch is sent (callout 2).
fn parked(auth: &str) -> (FakeEnvoy, Id) {
    let envoy = configured(&remote_plugin());
    envoy.tick();
    let es_only = format!("{{\"keys\": [{}]}}", testkeys::es_public_jwk());
    envoy.config_callout_done(1, "200", es_only.as_bytes());
    envoy.set_now_ms(T0_MS + 2_000);
    let s = envoy.new_stream(0);
    assert_eq!(envoy.request_headers(s, &request("GET", "/Patient", auth), true), HEADERS_STOP_ITERATION);
    envoy.tick();
    let calls = envoy.take_calls();
    assert!(calls.iter().any(|c| c.starts_with("config_http_callout idp")), "{}", dump(&calls));
    (envoy, s)
}

#[test]
fn an_unknown_kid_refused_after_the_refetch_ends_the_stream_only_after_the_hook() {
    let (envoy, s) = parked(&unknown_kid_bearer());
    let es_only = format!("{{\"keys\": [{}]}}", testkeys::es_public_jwk());
    envoy.config_callout_done(2, "200", es_only.as_bytes());
    envoy.take_calls();
    envoy.run_scheduled();
    let calls = envoy.take_calls();
    assert_eq!(envoy.local_reply(s), Some(401));
    let www = "Bearer realm=\"fhir-tenant-router\", error=\"invalid_token\"";
    let body = crate::rejection::Rejection::UnknownKey.operation_outcome();
    let headers = [("content-type", "application/fhir+json"), ("cache-control", "no-store"), ("www-authenticate", www)];
    // The core's effects first; the local reply (which ends the stream inside the call) once the core has
    // returned; the stream's completion once the hook is over.
    assert_eq!(
        shown(&calls),
        [
            "increment_counter fhir_tenant_router.requests.rejected.unknown_kid 1",
            "log Info <audit>",
            &format!("send_response 401 {headers:?} {body}"),
            "re-entered stream_complete (inside scheduled)",
        ],
        "{}",
        dump(&calls)
    );
    assert!(violations(&calls).is_empty(), "{}", dump(&calls));
    envoy.destroy(s);
}

#[test]
fn a_woken_request_answered_locally_downstream_ends_the_stream_only_after_the_hook() {
    let (envoy, s) = parked(&bearer(&testkeys::claims_now()));
    envoy.config_callout_done(2, "200", testkeys::public_jwks().as_bytes());
    assert_eq!(envoy.take_calls().last().map(String::as_str), Some("scheduler_commit stream Some(0)"));
    envoy.upstream_answers_locally(s);
    envoy.run_scheduled();
    let calls = envoy.take_calls();
    // The stream's completion (its cache gauge) runs after the outer hook's work, not inside the continue.
    assert_eq!(
        shown(&calls),
        [
            "increment_counter fhir_tenant_router.signature.host 1",
            "increment_counter fhir_tenant_router.cache.misses 1",
            "remove_request_header authorization",
            &format!("set_request_header {TENANT}: {TENANT_A}"),
            "increment_counter fhir_tenant_router.requests.allowed 1",
            &format!("set_request_header {ROUTE}: tenant_a"),
            "clear_route_cache",
            "log Info <audit>",
            "continue_decoding",
            "(upstream: 503 no healthy upstream, a local reply)",
            "re-entered stream_complete (inside scheduled)",
            "increment_gauge fhir_tenant_router.cache.entries 1",
        ],
        "{}",
        dump(&calls)
    );
    assert!(violations(&calls).is_empty(), "{}", dump(&calls));
    envoy.destroy(s);
}

// ---- finding 4: background work cannot stop silently ----

#[test]
fn a_config_without_a_scheduler_is_refused_with_a_log_line() {
    let envoy = FakeEnvoy::default();
    envoy.set_now_ms(T0_MS);
    envoy.0.fail_config_scheduler.set(true);
    assert!(!envoy.configure(&plugin().to_string()), "{:?}", envoy.take_calls());
    let calls = envoy.take_calls();
    assert_eq!(calls.get(1).map(String::as_str), Some("config_scheduler_new"), "{}", dump(&calls));
    let refused = "log Error fhir_tenant_router: configuration refused: Envoy gave no config scheduler";
    assert!(calls.last().is_some_and(|c| c.starts_with(refused)), "{}", dump(&calls));
}

#[test]
fn a_config_whose_ticker_thread_cannot_start_is_refused_with_a_log_line() {
    let envoy = FakeEnvoy::default();
    envoy.set_now_ms(T0_MS);
    envoy.0.fail_ticker.set(true);
    assert!(!envoy.configure(&plugin().to_string()), "{:?}", envoy.take_calls());
    let calls = envoy.take_calls();
    let expected = ["config_scheduler_new", "start_ticker 500", "config_scheduler_delete"];
    assert_eq!(calls.get(1..4).unwrap_or_default(), expected, "{}", dump(&calls));
    let refused = "log Error fhir_tenant_router: configuration refused: the ticker thread could not start";
    assert!(calls.last().is_some_and(|c| c.starts_with(refused)), "{}", dump(&calls));
}

#[test]
fn a_panic_inside_the_upkeep_lock_is_recovered_said_and_counted_and_the_work_goes_on() {
    let envoy = configured(&plugin());
    let auth = bearer(&testkeys::claims_now());
    let counted = format!("config_increment_counter fhir_tenant_router.tenant.allowed{{{TENANT_A}}} 1");
    let s = envoy.new_stream(0);
    envoy.request_headers(s, &request("GET", "/Patient", &auth), true);
    envoy.take_calls();
    // Handing the tenant's count to Envoy panics, inside the tick, with the upkeep lock held.
    *envoy.0.panic_on.borrow_mut() = Some("config_increment_counter".into());
    envoy.tick();
    let calls = envoy.take_calls();
    assert_eq!(calls, ["log Error fhir_tenant_router: the config_scheduled hook panicked; caught"], "{}", dump(&calls));
    let s = envoy.new_stream(0);
    envoy.request_headers(s, &request("GET", "/Patient", &auth), true);
    envoy.take_calls();
    envoy.tick();
    let calls = envoy.take_calls();
    assert_eq!(
        calls,
        [
            "log Error fhir_tenant_router: a panic interrupted the background work (key sets, registry, tokens, \
             counts); its lock was recovered and the work goes on",
            "config_increment_counter fhir_tenant_router.upkeep.recovered 1",
            &counted,
        ],
        "{}",
        dump(&calls)
    );
    envoy.tick();
    assert!(envoy.take_calls().is_empty(), "said once per panic");
    assert_eq!(envoy.metric("upkeep.recovered"), 1);
}
