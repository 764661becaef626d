//! The dynamic-module shell driven through its hooks by a fake Envoy that enforces Envoy's rules
//! ([`super::fake`]): header bytes handed out are poisoned by the next change to their map, and a local reply
//! (or a continue answered locally further down) ends the stream inside the call. Every test asserts the
//! exact callbacks a hook makes, and that no re-entered hook did any work.

use serde_json::{json, Value};

use crate::testkeys::{self, NOW, TENANT_A};

use super::abi::{
    BODY_CONTINUE, BODY_STOP_AND_BUFFER, HEADERS_CONTINUE, HEADERS_STOP_ITERATION, TRAILERS_CONTINUE,
    TRAILERS_STOP_ITERATION,
};
use super::fake::{FakeEnvoy, Id};

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
            "remove_request_header authorization",
            "set_request_header :path: /api/FHIR/R4/Patient/1",
            &format!("set_request_header {TENANT}: {TENANT_A}"),
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
            "remove_request_header authorization",
            "set_request_header :path: /api/",
            &format!("set_request_header {TENANT}: {TENANT_A}"),
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
            "remove_request_header authorization",
            &format!("set_request_header {TENANT}: {TENANT_A}"),
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
            // The unlabelled counts come after the tenants' (the panic above was before them: both requests').
            "config_increment_counter fhir_tenant_router.requests.allowed 2",
            "config_increment_counter fhir_tenant_router.signature.host 1",
            "config_increment_counter fhir_tenant_router.cache.hits 1",
            "config_increment_counter fhir_tenant_router.cache.misses 1",
        ],
        "{}",
        dump(&calls)
    );
    envoy.tick();
    assert!(envoy.take_calls().is_empty(), "said once per panic");
    assert_eq!(envoy.metric("upkeep.recovered"), 1);
}

// ---- every hook: the exact callbacks ----

#[test]
fn a_panicking_hook_is_answered_503_and_its_stream_completes_after_the_hook() {
    let envoy = configured(&plugin());
    let auth = bearer(&testkeys::claims_now());
    let s = envoy.new_stream(0);
    // A bug in the core while it edits the headers (here: Envoy's setter panics on the module's side).
    *envoy.0.panic_on.borrow_mut() = Some("set_request_header".into());
    assert_eq!(envoy.request_headers(s, &request("GET", "/Patient", &auth), true), HEADERS_STOP_ITERATION);
    let calls = envoy.take_calls();
    let body = r#"{"issue":[{"code":"exception","diagnostics":"The request could not be processed; retry shortly.","severity":"error"}],"resourceType":"OperationOutcome"}"#;
    assert_eq!(
        calls,
        [
            "get_headers request",
            "remove_request_header authorization",
            "log Error fhir_tenant_router: the request_headers hook panicked; the request was answered 503",
            "increment_counter fhir_tenant_router.panics 1",
            &format!(
                "send_response 503 {:?} {body}",
                [("content-type", "application/fhir+json"), ("cache-control", "no-store")]
            ),
            "re-entered stream_complete (inside request_headers)",
            "increment_gauge fhir_tenant_router.cache.entries 1",
        ],
        "{}",
        dump(&calls)
    );
    // The worker's and the stream's borrows were released by the unwind: the next request is served.
    let s2 = envoy.new_stream(0);
    assert_eq!(envoy.request_headers(s2, &request("GET", "/Patient", &auth), true), HEADERS_CONTINUE);
    envoy.complete(s2);
    envoy.destroy(s);
    envoy.destroy(s2);
}

#[test]
fn a_response_is_edited_from_headers_read_afresh_and_its_body_replaced() {
    let mut p = plugin();
    p["tenants"][TENANT_A] = json!({
        "cluster": "tenant_a", "authority": "fhir.partner", "base_path": "/api/FHIR/R4",
        "links_base_url": "http://fhir.partner/api/FHIR/R4"
    });
    p["public_base_url"] = json!("https://fhir.example");
    p["audit_log"] = json!(false);
    let envoy = configured(&p);
    let s = envoy.new_stream(0);
    let auth = bearer(&testkeys::claims_now());
    assert_eq!(envoy.request_headers(s, &request("GET", "/Patient?_count=1", &auth), true), HEADERS_CONTINUE);
    envoy.take_calls();
    let response = [
        (":status", "200"),
        ("location", "http://fhir.partner/api/FHIR/R4/Patient/1"),
        ("content-type", "application/fhir+json"),
    ];
    assert_eq!(envoy.response_headers(s, &response, false), HEADERS_CONTINUE);
    let calls = envoy.take_calls();
    assert_eq!(
        calls,
        [
            "get_header response location",
            "set_response_header location: https://fhir.example/Patient/1",
            "get_header response content-location",
            "get_header response content-encoding",
            "get_header response content-type",
            "remove_response_header content-length",
        ],
        "{}",
        dump(&calls)
    );
    let bundle = json!({"resourceType": "Bundle",
        "link": [{"relation": "next", "url": "http://fhir.partner/api/FHIR/R4/Patient?page=2"}]});
    let bundle = bundle.to_string();
    assert_eq!(envoy.response_body(s, bundle.as_bytes()), BODY_CONTINUE);
    let calls = envoy.take_calls();
    let rewritten =
        r#"{"link":[{"relation":"next","url":"https://fhir.example/Patient?page=2"}],"resourceType":"Bundle"}"#;
    assert_eq!(
        calls,
        [
            "get_body_chunks 3",
            "get_body_chunks 2",
            "drain_body 2 0",
            &format!("drain_body 3 {}", bundle.len()),
            &format!("append_body 3 {rewritten}")
        ],
        "{}",
        dump(&calls)
    );
    envoy.complete(s);
    assert_eq!(envoy.take_calls(), ["increment_gauge fhir_tenant_router.cache.entries 1"]);
    envoy.destroy(s);
    envoy.destroy_config();
    assert_eq!(envoy.take_calls(), ["config_scheduler_delete"]);
}

// ---- upstream_auth: a parked request, a resend after a 401, its callout's answer ----

const TOKEN_URL: &str = "https://login.example/t/oauth2/v2.0/token";

fn upstream_auth_plugin() -> Value {
    // The secret comes from Envoy's environment (one name per test binary: tests run in parallel).
    std::env::set_var("FHIR_TENANT_ROUTER_NATIVE_TEST_SECRET", "s3cret");
    let mut p = plugin();
    p["tenants"][TENANT_A] = json!({
        "cluster": "tenant_a",
        "upstream_auth": {"method": "client_secret_post", "token_url": TOKEN_URL, "cluster": "entra",
                          "client_id": "router", "client_secret": {"env": "FHIR_TENANT_ROUTER_NATIVE_TEST_SECRET"},
                          "scope": "https://fhir-a.example/.default"}
    });
    p["audit_log"] = json!(false);
    p
}

fn token_answer(token: &str) -> Vec<u8> {
    json!({"access_token": token, "token_type": "Bearer", "expires_in": 3600}).to_string().into_bytes()
}

/// Asserts that `calls` sent a config-level callout through `cluster`.
fn callout_to(calls: &[String], cluster: &str) {
    let prefix = format!("config_http_callout {cluster} ");
    assert!(calls.iter().any(|c| c.starts_with(&prefix)), "no callout through {cluster}: {}", dump(calls));
}

#[test]
fn a_request_waits_for_its_upstream_token_is_sent_again_after_a_401_and_gets_the_resent_answer() {
    let envoy = configured(&upstream_auth_plugin());
    let client = bearer(&testkeys::claims_now());
    let s = envoy.new_stream(0);
    assert_eq!(envoy.request_headers(s, &request("GET", "/Patient", &client), true), HEADERS_STOP_ITERATION);
    let calls = envoy.take_calls();
    assert_eq!(calls.first().map(String::as_str), Some("get_headers request"), "{}", dump(&calls));
    // Parked for its token, and its wish wakes the main thread at once (not at its next tick).
    assert_eq!(
        calls.iter().rev().take(2).rev().map(String::as_str).collect::<Vec<_>>(),
        ["scheduler_new", "config_scheduler_commit 1"],
        "parked for its token: {}",
        dump(&calls)
    );
    assert!(!calls.iter().any(|c| c.starts_with("send_response") || c.starts_with("continue")), "{}", dump(&calls));
    // The main thread fetches the token (callout 1) and wakes the request.
    envoy.tick();
    let calls = envoy.take_calls();
    callout_to(&calls, "entra");
    envoy.config_callout_done(1, "200", &token_answer("upstream-token-1"));
    assert_eq!(envoy.take_calls().last().map(String::as_str), Some("scheduler_commit stream Some(0)"));
    envoy.run_scheduled();
    let calls = envoy.take_calls();
    assert_eq!(
        calls,
        [
            "set_request_header authorization: Bearer upstream-token-1",
            &format!("set_request_header {TENANT}: {TENANT_A}"),
            &format!("set_request_header {ROUTE}: tenant_a"),
            "clear_route_cache",
            "continue_decoding",
            "get_headers request",
        ],
        "{}",
        dump(&calls)
    );
    assert_eq!(envoy.request_header(s, "authorization").as_deref(), Some("Bearer upstream-token-1"));
    // The upstream refuses the token: the request waits for a new one, then is sent again (a callout).
    assert_eq!(envoy.response_headers(s, &[(":status", "401")], true), HEADERS_STOP_ITERATION);
    let calls = envoy.take_calls();
    assert_eq!(calls.first().map(String::as_str), Some("get_header response :status"), "{}", dump(&calls));
    envoy.set_now_ms(T0_MS + 1_000);
    envoy.tick();
    let calls = envoy.take_calls();
    callout_to(&calls, "entra");
    envoy.config_callout_done(2, "200", &token_answer("upstream-token-2"));
    envoy.take_calls();
    envoy.run_scheduled();
    let calls = envoy.take_calls();
    let resend = calls.iter().find(|c| c.starts_with("http_callout tenant_a")).expect("the request sent again");
    assert!(resend.contains(r#"("authorization", "Bearer upstream-token-2")"#), "{resend}");
    assert!(resend.contains(r#"(":path", "/Patient")"#), "{resend}");
    assert!(!resend.contains(&client), "never the client's token: {resend}");
    assert!(!calls.iter().any(|c| c.starts_with("send_response")), "{}", dump(&calls));
    // Its answer reaches the client as a local reply, which ends the stream: after the hook.
    envoy.callout_done(s, Some("200"), &[("content-type", "application/fhir+json")], b"{\"resourceType\":\"Bundle\"}");
    let calls = envoy.take_calls();
    let reply = calls.iter().position(|c| c.starts_with("send_response 200")).expect("the answer");
    assert_eq!(
        calls.get(reply + 1).map(String::as_str),
        Some("re-entered stream_complete (inside http_callout_done)"),
        "{}",
        dump(&calls)
    );
    assert!(violations(&calls).is_empty(), "{}", dump(&calls));
    envoy.destroy(s);
    assert!(envoy.take_calls().iter().any(|c| c == "scheduler_delete stream Some(0)"));
}

// ---- the hot path: nothing allocated per request once warm ----

#[test]
fn a_cache_hit_allocates_nothing_in_the_shell_once_the_worker_is_warm() {
    let mut p = plugin();
    p["audit_log"] = json!(false);
    let envoy = configured(&p);
    let auth = bearer(&testkeys::claims_now());
    let mut allocations = Vec::new();
    for _ in 0..6 {
        let s = envoy.new_stream(0);
        let before = super::fake::module_allocations();
        assert_eq!(envoy.request_headers(s, &request("GET", "/Patient", &auth), true), HEADERS_CONTINUE);
        assert_eq!(envoy.response_headers(s, &[(":status", "200")], true), HEADERS_CONTINUE);
        envoy.complete(s);
        allocations.push(super::fake::module_allocations() - before);
        envoy.destroy(s);
    }
    // The first request verifies the token and fills the cache and the worker's buffers; a cache hit after
    // that allocates nothing in its hooks (the stream object itself is filter_new's, once per stream).
    assert!(allocations.iter().skip(2).all(|&n| n == 0), "allocations per request: {allocations:?}");
}

// ---- the outside review of the native shell (its tests, kept as written) ----

#[test] // F1 (Miri: UB at filter_destroy's Box::from_raw)
fn review_an_unknown_kid_401_on_an_envoy_that_destroys_inline_touches_nothing_after_the_destroy() {
    let (envoy, _s) = parked(&unknown_kid_bearer());
    let es_only = format!("{{\"keys\": [{}]}}", testkeys::es_public_jwk());
    envoy.config_callout_done(2, "200", es_only.as_bytes());
    envoy.take_calls();
    envoy.0.destroy_inline.set(true);
    envoy.run_scheduled();
    let calls = envoy.take_calls();
    let destroyed = calls.iter().position(|c| c == "destroyed").expect("destroyed inside the reply");
    assert_eq!(calls.get(destroyed + 1..).unwrap_or_default(), &[] as &[String], "{}", dump(&calls));
}

#[test] // F1, continue path
fn review_a_woken_request_answered_locally_on_an_envoy_that_destroys_inline_touches_nothing_after_the_destroy() {
    let (envoy, s) = parked(&bearer(&testkeys::claims_now()));
    envoy.config_callout_done(2, "200", testkeys::public_jwks().as_bytes());
    envoy.take_calls();
    envoy.upstream_answers_locally(s);
    envoy.0.destroy_inline.set(true);
    envoy.run_scheduled();
    let calls = envoy.take_calls();
    let destroyed = calls.iter().position(|c| c == "destroyed").expect("destroyed inside the continue");
    assert_eq!(calls.get(destroyed + 1..).unwrap_or_default(), &[] as &[String], "{}", dump(&calls));
}

#[test] // F1, request_headers path
fn review_a_401_in_request_headers_on_an_envoy_that_destroys_inline() {
    let envoy = configured(&plugin());
    let s = envoy.new_stream(0);
    envoy.0.destroy_inline.set(true);
    assert_eq!(envoy.request_headers(s, &request("GET", "/Patient", ""), true), HEADERS_STOP_ITERATION);
    let calls = envoy.take_calls();
    let destroyed = calls.iter().position(|c| c == "destroyed").expect("destroyed inside the reply");
    assert_eq!(calls.get(destroyed + 1..).unwrap_or_default(), &[] as &[String], "{}", dump(&calls));
}

#[test] // passes: one answer
fn review_a_resend_answered_inside_the_callout_gets_one_answer() {
    let envoy = configured(&upstream_auth_plugin());
    let client = bearer(&testkeys::claims_now());
    let s = envoy.new_stream(0);
    envoy.request_headers(s, &request("GET", "/Patient", &client), true);
    envoy.tick();
    envoy.config_callout_done(1, "200", &token_answer("upstream-token-1"));
    envoy.run_scheduled();
    assert_eq!(envoy.response_headers(s, &[(":status", "401")], true), HEADERS_STOP_ITERATION);
    envoy.set_now_ms(T0_MS + 1_000);
    envoy.tick();
    envoy.config_callout_done(2, "200", &token_answer("upstream-token-2"));
    envoy.take_calls();
    envoy.0.callout_answers_inline.set(true);
    envoy.run_scheduled();
    let calls = envoy.take_calls();
    let replies: Vec<&String> = calls.iter().filter(|c| c.contains("send_response")).collect();
    assert_eq!(replies.len(), 1, "{}", dump(&calls));
    envoy.destroy(s);
}

#[test] // F2: FAILS today
fn review_a_panic_while_a_key_set_is_installed_leaves_the_background_work_going_on() {
    let envoy = configured(&remote_plugin());
    envoy.tick();
    assert!(envoy.take_calls().iter().any(|c| c.starts_with("config_http_callout idp")));
    *envoy.0.panic_on.borrow_mut() = Some("config_increment_counter fhir_tenant_router.jwks.fetch_ok".into());
    envoy.config_callout_done(1, "200", testkeys::public_jwks().as_bytes());
    let calls = envoy.take_calls();
    assert!(calls.iter().any(|c| c.contains("config_http_callout_done hook panicked")), "{}", dump(&calls));
    let mut refetched = false;
    for minute in 1..=60u64 {
        envoy.set_now_ms(T0_MS + minute * 60_000);
        envoy.tick();
        refetched |= envoy.take_calls().iter().any(|c| c.starts_with("config_http_callout idp"));
    }
    assert!(refetched, "the key set was never fetched again after the recovered panic");
}

#[test] // F3: FAILS today
fn review_a_poisoned_parked_lock_is_recovered_or_said() {
    let (envoy, _s) = parked(&unknown_kid_bearer());
    *envoy.0.panic_on.borrow_mut() = Some("scheduler_commit".into());
    let es_only = format!("{{\"keys\": [{}]}}", testkeys::es_public_jwk());
    envoy.config_callout_done(2, "200", es_only.as_bytes());
    envoy.take_calls();
    envoy.set_now_ms(T0_MS + 10_000);
    let s2 = envoy.new_stream(0);
    assert_eq!(
        envoy.request_headers(s2, &request("GET", "/Patient", &unknown_kid_bearer()), true),
        HEADERS_STOP_ITERATION
    );
    let mut all = envoy.take_calls();
    for second in 11..=70u64 {
        envoy.set_now_ms(T0_MS + second * 1_000);
        envoy.tick();
        let calls = envoy.take_calls();
        if calls.iter().any(|c| c.starts_with("config_http_callout idp ")) {
            envoy.config_callout_done(3, "200", es_only.as_bytes());
        }
        all.extend(calls);
        all.extend(envoy.take_calls());
        envoy.run_scheduled();
        all.extend(envoy.take_calls());
    }
    let said = all.iter().any(|c| c.starts_with("log Error") && c.contains("parked"));
    assert!(envoy.local_reply(s2).is_some() || said, "parked for ever, nothing said: {}", dump(&all));
    // Both, in fact: the lock is recovered (the request parked after the panic is listed, refetched for and
    // answered), and the recovery is said at error level and counted, once for each lock the panic
    // poisoned: the upkeep's and the parked list's.
    assert_eq!(envoy.local_reply(s2), Some(401), "{}", dump(&all));
    assert!(said, "{}", dump(&all));
    assert_eq!(envoy.metric("upkeep.recovered"), 2);
    let parked_said = "log Error fhir_tenant_router: a panic poisoned the lock of the parked requests or of the \
                       published answers; it was recovered (1 since the last tick) and the work goes on";
    assert_eq!(all.iter().filter(|c| *c == parked_said).count(), 1, "{}", dump(&all));
}

#[test] // passes: response hooks re-entered inside the continue are safe
fn review_a_continue_answered_locally_runs_the_response_hooks_inside_the_continue() {
    let envoy = configured(&upstream_auth_plugin());
    let client = bearer(&testkeys::claims_now());
    let s = envoy.new_stream(0);
    envoy.request_headers(s, &request("GET", "/Patient", &client), true);
    envoy.tick();
    envoy.config_callout_done(1, "200", &token_answer("upstream-token-1"));
    envoy.take_calls();
    envoy.upstream_answers_locally(s);
    envoy.0.local_reply_encoded_through_module.set(true);
    envoy.run_scheduled();
    let calls = envoy.take_calls();
    assert!(calls.iter().any(|c| c == "re-entered stream_complete (inside scheduled)"), "{}", dump(&calls));
    envoy.destroy(s);
}
#[test]
fn a_stream_destroyed_inside_its_hook_is_completed_and_freed_once_the_hook_returns() {
    let (envoy, s) = parked(&bearer(&testkeys::claims_now()));
    envoy.config_callout_done(2, "200", testkeys::public_jwks().as_bytes());
    envoy.take_calls();
    envoy.upstream_answers_locally(s);
    envoy.0.destroy_inline.set(true);
    let live = super::module::live_streams();
    envoy.run_scheduled();
    let calls = envoy.take_calls();
    // Destroyed inside the continue (with the scheduled hook on the stack): its queue left at once, the
    // object freed after the hook (one fewer alive), nothing called for it after the destroy.
    let tail = ["destroy (with 1 hooks of the stream on the stack)", "scheduler_delete stream Some(0)", "destroyed"];
    assert_eq!(calls.get(calls.len().saturating_sub(3)..).unwrap_or_default(), tail, "{}", dump(&calls));
    assert_eq!(super::module::live_streams(), live - 1);
    // Its completion ran after the hook, quietly: the worker's next report carries its cache entry.
    envoy.0.destroy_inline.set(false);
    envoy.set_now_ms(T0_MS + 3_000);
    let s2 = envoy.new_stream(0);
    let auth = bearer(&testkeys::claims_now());
    assert_eq!(envoy.request_headers(s2, &request("GET", "/Patient", &auth), true), HEADERS_CONTINUE);
    envoy.take_calls();
    envoy.complete(s2);
    assert_eq!(envoy.take_calls(), ["increment_gauge fhir_tenant_router.cache.entries 1"]);
    envoy.destroy(s2);
    assert_eq!(super::module::live_streams(), live - 1);
}

#[test]
fn a_key_set_fetch_that_never_gets_its_answer_is_said_and_sent_again() {
    let mut p = remote_plugin();
    p["provider"]["jwks_timeout_ms"] = json!(5_000);
    let envoy = configured(&p);
    envoy.tick();
    callout_to(&envoy.take_calls(), "idp");
    // Its answer never comes (a bug lost it, as a panic while installing it would): past the timeout and
    // the grace it is given up, said, and sent again after the first backoff.
    let lost_at = T0_MS + 5_000 + crate::refresh::LOST_FETCH_GRACE_MS;
    envoy.set_now_ms(lost_at - 1);
    envoy.tick();
    assert!(envoy.take_calls().is_empty());
    envoy.set_now_ms(lost_at);
    envoy.tick();
    let calls = envoy.take_calls();
    let said = format!(
        "log Error JWKS fetch for {} got no answer within its timeout; it is counted as failed and retried",
        testkeys::ISSUER
    );
    assert_eq!(calls, [said], "{}", dump(&calls));
    envoy.set_now_ms(lost_at + crate::refresh::FIRST_BACKOFF_MS);
    envoy.tick();
    callout_to(&envoy.take_calls(), "idp");
}

// ---- Envoy 1.38: no config-level metric callbacks ----

/// The remote-JWKS config on `envoy`, its key set fetched and installed (`fetch_ok` counted on the main
/// thread); the calls since configuring.
fn fetched_keys(envoy: &FakeEnvoy) -> Vec<String> {
    envoy.set_now_ms(T0_MS);
    assert!(envoy.configure(&remote_plugin().to_string()), "{:?}", envoy.take_calls());
    envoy.tick();
    envoy.config_callout_done(1, "200", testkeys::public_jwks().as_bytes());
    envoy.take_calls()
}

#[test]
fn envoy_1_39_and_later_take_the_main_threads_counts_at_once_and_requests_relay_nothing() {
    let envoy = FakeEnvoy::default();
    let calls = fetched_keys(&envoy);
    assert!(!calls.iter().any(|c| c.contains("no config-level stats callbacks")), "{}", dump(&calls));
    assert!(
        calls.iter().any(|c| c == "config_increment_counter fhir_tenant_router.jwks.fetch_ok 1"),
        "{}",
        dump(&calls)
    );
    assert_eq!(envoy.metric("jwks.fetch_ok"), 1);
    let auth = bearer(&testkeys::claims_now());
    let s = envoy.new_stream(0);
    assert_eq!(envoy.request_headers(s, &request("GET", "/Patient", &auth), true), HEADERS_CONTINUE);
    envoy.tick();
    let calls = envoy.take_calls();
    let tenant = format!("fhir_tenant_router.tenant.allowed{{{TENANT_A}}}");
    assert!(calls.iter().any(|c| *c == format!("config_increment_counter {tenant} 1")), "{}", dump(&calls));
    assert!(!calls.iter().any(|c| c.starts_with("increment_counter fhir_tenant_router.jwks")), "{}", dump(&calls));
    assert_eq!(envoy.metric("jwks.fetch_ok"), 1);
}

#[test]
fn envoy_1_38_gets_the_main_threads_counts_and_gauges_through_the_next_request_and_says_so_once() {
    let envoy = FakeEnvoy::default();
    envoy.0.no_config_metrics.set(true);
    let calls = fetched_keys(&envoy);
    // Said once, at config load; nothing called that this Envoy lacks (the fake panics if it is: a hook
    // would say it panicked).
    let said = calls.iter().filter(|c| c.contains("no config-level stats callbacks (Envoy 1.38)")).count();
    assert_eq!(said, 1, "{}", dump(&calls));
    assert!(!calls.iter().any(|c| c.contains("panicked") || c.starts_with("config_increment")), "{}", dump(&calls));
    assert!(!calls.iter().any(|c| c.starts_with("config_set_gauge")), "{}", dump(&calls));
    assert_eq!(envoy.metric("jwks.fetch_ok"), 0, "not published yet");

    // The next request publishes them through its own stream's callbacks, before its own work.
    let auth = bearer(&testkeys::claims_now());
    let s = envoy.new_stream(0);
    assert_eq!(envoy.request_headers(s, &request("GET", "/Patient", &auth), true), HEADERS_CONTINUE);
    let calls = envoy.take_calls();
    let first_other = calls.iter().position(|c| c.starts_with("get_headers")).unwrap_or(calls.len());
    let relayed = calls.iter().position(|c| c == "increment_counter fhir_tenant_router.jwks.fetch_ok 1");
    assert!(relayed.is_some_and(|i| i < first_other), "{}", dump(&calls));
    assert_eq!(envoy.metric("jwks.fetch_ok"), 1);
    envoy.destroy(s);

    // The configured tenant's count cannot wait for the tick here: it went to Envoy with the request.
    let tenant = format!("fhir_tenant_router.tenant.allowed{{{TENANT_A}}}");
    assert!(calls.iter().any(|c| *c == format!("increment_counter {tenant} 1")), "{}", dump(&calls));
    envoy.tick();
    let calls = envoy.take_calls();
    assert!(!calls.iter().any(|c| c.contains("panicked") || c.contains("counter")), "{}", dump(&calls));
    assert_eq!(envoy.metric(&format!("tenant.allowed{{{TENANT_A}}}")), 1);

    // What the main thread counts while a stream is open goes out when that stream completes.
    let s = envoy.new_stream(1);
    envoy.request_headers(s, &request("GET", "/Patient", &auth), true);
    envoy.set_now_ms(T0_MS + 3_600_000);
    envoy.tick();
    let refetch = envoy.take_calls();
    assert!(refetch.iter().any(|c| c.starts_with("config_http_callout idp")), "{}", dump(&refetch));
    envoy.config_callout_done(2, "200", testkeys::public_jwks().as_bytes());
    assert_eq!(envoy.metric("jwks.fetch_ok"), 1, "not published yet");
    envoy.take_calls();
    envoy.complete(s);
    let calls = envoy.take_calls();
    assert!(calls.iter().any(|c| c == "increment_counter fhir_tenant_router.jwks.fetch_ok 1"), "{}", dump(&calls));
    assert_eq!(envoy.metric("jwks.fetch_ok"), 2);
    envoy.destroy(s);

    // Nothing waiting: a request relays nothing.
    let s = envoy.new_stream(0);
    envoy.request_headers(s, &request("GET", "/Patient", &auth), true);
    let calls = envoy.take_calls();
    assert!(!calls.iter().any(|c| c.contains("jwks") || c.contains("set_gauge")), "{}", dump(&calls));
    envoy.destroy(s);
}

#[test]
fn envoy_1_38_main_thread_gauges_and_repeated_counts_are_relayed_as_one_call_each() {
    let stats = super::relay::ConfigStats::new(false);
    let envoy = configured(&plugin());
    let config = std::ptr::null_mut();
    stats.count(&envoy, config, 0, Some("t"), 2);
    stats.count(&envoy, config, 0, Some("t"), 3);
    stats.gauge(&envoy, config, 1, 7);
    stats.gauge(&envoy, config, 1, 9);
    assert!(envoy.take_calls().is_empty(), "nothing reaches Envoy on the main thread");
    let s = envoy.new_stream(0);
    envoy.take_calls();
    stats.relay(&envoy, envoy.filter(s));
    let mut calls = envoy.take_calls();
    calls.sort();
    assert_eq!(calls.len(), 2, "{}", dump(&calls));
    assert!(calls[0].starts_with("increment_counter ") && calls[0].ends_with("{t} 5"), "{}", dump(&calls));
    assert!(calls[1].starts_with("set_gauge ") && calls[1].ends_with(" 9"), "{}", dump(&calls));
    stats.relay(&envoy, envoy.filter(s));
    assert!(envoy.take_calls().is_empty(), "taken once");
    envoy.destroy(s);
}

#[test]
fn optional_callbacks_are_looked_up_in_the_process_and_an_absent_one_is_none() {
    // A symbol every process has, and one this test binary (no Envoy in it, as Envoy 1.38) has not.
    assert!(super::abi::lookup(c"malloc").is_some());
    assert!(super::abi::lookup(c"envoy_dynamic_module_callback_http_filter_config_increment_counter").is_none());
    assert!(super::abi::lookup(c"envoy_dynamic_module_callback_http_filter_config_set_gauge").is_none());
}

// ---- configuration from discovery (issue 25): the document's answer sends the key set's callout ----

fn discovery_plugin() -> Value {
    let mut p = plugin();
    p["provider"] = json!({
        "issuer": testkeys::ISSUER, "audiences": [testkeys::AUDIENCE], "jwks_cluster": "idp", "jwks_min_refetch_s": 1
    });
    p
}

fn get(path: &str) -> String {
    format!(
        "config_http_callout idp [(\":method\", \"GET\"), (\":path\", \"{path}\"), (\":authority\", \"127.0.0.1:9000\"), \
         (\"accept\", \"application/json\")] 0 5000"
    )
}

/// Answers the discovery callout `id` with a document naming `/keys/v2`: the key set's callout goes out at
/// once, from the document's answer (not at the next tick).
fn discovered(envoy: &FakeEnvoy, id: u64) {
    let doc = json!({"issuer": testkeys::ISSUER, "jwks_uri": "http://127.0.0.1:9000/keys/v2",
                     "token_endpoint": "http://127.0.0.1:9000/token", "id_token_signing_alg_values_supported": ["RS256"]});
    envoy.config_callout_done(id, "200", doc.to_string().as_bytes());
    let calls = envoy.take_calls();
    assert_eq!(calls, [get("/keys/v2")], "{}", dump(&calls));
}

#[test]
fn a_discovery_documents_answer_sends_the_key_set_callout_and_its_keys_wake_a_parked_request() {
    let envoy = configured(&discovery_plugin());
    envoy.tick();
    let calls = envoy.take_calls();
    assert_eq!(calls, [get("/.well-known/openid-configuration")], "{}", dump(&calls));
    discovered(&envoy, 1);
    // A first key set without the RS256 key.
    let es_only = format!("{{\"keys\": [{}]}}", testkeys::es_public_jwk());
    envoy.config_callout_done(2, "200", es_only.as_bytes());
    let calls = envoy.take_calls();
    assert!(
        calls.iter().any(|c| c == "config_increment_counter fhir_tenant_router.jwks.fetch_ok 1"),
        "{}",
        dump(&calls)
    );
    // A token signed with the RS256 key waits for a refetch, which starts with the document again.
    envoy.set_now_ms(T0_MS + 2_000);
    let s = envoy.new_stream(0);
    let auth = bearer(&testkeys::claims_now());
    assert_eq!(envoy.request_headers(s, &request("GET", "/Patient", &auth), true), HEADERS_STOP_ITERATION);
    envoy.tick();
    let calls = envoy.take_calls();
    assert!(calls.contains(&get("/.well-known/openid-configuration")), "{}", dump(&calls));
    discovered(&envoy, 3);
    envoy.config_callout_done(4, "200", testkeys::public_jwks().as_bytes());
    let calls = envoy.take_calls();
    assert_eq!(calls.last().map(String::as_str), Some("scheduler_commit stream Some(0)"), "{}", dump(&calls));
    envoy.run_scheduled();
    let calls = envoy.take_calls();
    assert!(calls.iter().any(|c| c == "continue_decoding"), "{}", dump(&calls));
    assert!(violations(&calls).is_empty(), "{}", dump(&calls));
    envoy.destroy(s);
}

#[test]
fn a_discovery_document_naming_keys_elsewhere_sends_nothing_and_is_a_failed_fetch() {
    let envoy = configured(&discovery_plugin());
    envoy.tick();
    envoy.take_calls();
    let doc = json!({"issuer": testkeys::ISSUER, "jwks_uri": "http://attacker.example/keys"});
    envoy.config_callout_done(1, "200", doc.to_string().as_bytes());
    let calls = envoy.take_calls();
    assert!(!calls.iter().any(|c| c.starts_with("config_http_callout")), "{}", dump(&calls));
    assert!(
        calls.iter().any(|c| c == "config_increment_counter fhir_tenant_router.jwks.fetch_failed 1"),
        "{}",
        dump(&calls)
    );
    assert!(
        calls.iter().any(|c| c.starts_with("log Warn JWKS fetch") && c.contains("discovery document")),
        "{}",
        dump(&calls)
    );
    assert!(!calls.iter().any(|c| c.contains("attacker")), "{}", dump(&calls));
    // Retried after the first backoff, with the document.
    envoy.set_now_ms(T0_MS + crate::refresh::FIRST_BACKOFF_MS);
    envoy.tick();
    assert_eq!(envoy.take_calls(), [get("/.well-known/openid-configuration")]);
}

// ---- issue 26: what a cache hit asks of Envoy, with the filter's defaults ----

#[test]
fn a_cache_hit_with_the_defaults_makes_these_calls_into_envoy_and_no_more() {
    let envoy = configured(&plugin());
    let auth = bearer(&testkeys::claims_now());
    let mut per_request = Vec::new();
    for _ in 0..3 {
        let s = envoy.new_stream(0);
        assert_eq!(envoy.request_headers(s, &request("GET", "/Patient", &auth), true), HEADERS_CONTINUE);
        assert_eq!(envoy.response_headers(s, &[(":status", "200")], true), HEADERS_CONTINUE);
        envoy.complete(s);
        envoy.destroy(s);
        per_request.push(envoy.take_calls());
    }
    // A cache hit (the third request: the first filled the cache) with the defaults (the audit line on): one
    // header-map read, three header edits, the route-cache clear and the audit line; no counter call (the
    // unlabelled counters, `cache.hits` and `requests.allowed`, and the per-tenant ones wait in `counts` for
    // the main thread's tick); nothing on the response or at the end. The floor (`floor.rs`) makes the same
    // edits and nothing else.
    let calls = &per_request[2];
    let tenant = format!("set_request_header x-fhir-tenant-id: {TENANT_A}");
    assert_eq!(
        shown(calls),
        [
            "get_headers request",
            "remove_request_header authorization",
            tenant.as_str(),
            "set_request_header x-fhir-tenant-router-cluster: tenant_a",
            "clear_route_cache",
            "log Info <audit>",
        ],
        "{}",
        dump(calls)
    );
    // The tick hands the three requests' counts to Envoy: one increment per counter that moved.
    envoy.tick();
    let counted: Vec<String> =
        envoy.take_calls().into_iter().filter(|c| c.starts_with("config_increment_counter")).collect();
    let tenant_allowed = format!("config_increment_counter fhir_tenant_router.tenant.allowed{{{TENANT_A}}} 3");
    let mut want = vec![
        tenant_allowed.as_str(),
        "config_increment_counter fhir_tenant_router.requests.allowed 3",
        "config_increment_counter fhir_tenant_router.signature.host 1",
        "config_increment_counter fhir_tenant_router.cache.hits 2",
        "config_increment_counter fhir_tenant_router.cache.misses 1",
    ];
    let mut got: Vec<&str> = counted.iter().map(String::as_str).collect();
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, want);
    for (name, n) in [("requests.allowed", 3), ("cache.hits", 2), ("cache.misses", 1), ("signature.host", 1)] {
        assert_eq!(envoy.metric(name), n, "{name}");
    }
}

/// `audit_log: "filter_state"`: a cache hit sets the audit line, the same bytes as the log line, as one filter
/// state value instead of the log call.
#[test]
fn a_cache_hit_with_the_audit_line_as_filter_state_sets_it_instead_of_logging_it() {
    let auth = bearer(&testkeys::claims_now());
    let mut hits = Vec::new();
    for delivery in [json!(true), json!("filter_state")] {
        let mut p = plugin();
        p["audit_log"] = delivery;
        let envoy = configured(&p);
        for _ in 0..2 {
            let s = envoy.new_stream(0);
            assert_eq!(envoy.request_headers(s, &request("GET", "/Patient", &auth), true), HEADERS_CONTINUE);
            envoy.complete(s);
            envoy.destroy(s);
            hits.push(envoy.take_calls());
        }
    }
    let (logged, stated) = (&hits[1], &hits[3]);
    let line = logged.last().and_then(|c| c.strip_prefix("log Info ")).unwrap_or_default();
    assert!(line.starts_with("{\"audit\""), "{}", dump(logged));
    let state = format!("set_filter_state wasm.fhir_tenant_router.audit_line={line}");
    let mut want: Vec<String> = logged[..logged.len() - 1].to_vec();
    want.push(state);
    assert_eq!(stated, &want, "{}", dump(stated));
    assert!(!stated.iter().any(|c| c.starts_with("log")), "{}", dump(stated));
}

/// With `hold_bundle_headers: false` a narrowed answer's headers go on and only its body is held; a refused
/// body's reply comes after the headers went, which Envoy turns into a reset (the fake models its rule), and
/// the body is never handed back.
#[test]
fn without_hold_bundle_headers_a_refused_answer_after_its_headers_is_a_reset_and_its_body_never_leaves() {
    let mut p = plugin();
    p["hold_bundle_headers"] = json!(false);
    p["audit_log"] = json!(false);
    let envoy = configured(&p);
    let mut claims = testkeys::claims_now();
    claims["scope"] = json!(format!("{TENANT_A} system/Patient.rs"));
    let auth = bearer(&claims);
    let response = [(":status", "200"), ("content-type", "application/fhir+json"), ("content-length", "99")];
    for (types, refused) in [(vec!["Patient"], false), (vec!["Patient", "Observation"], true)] {
        let s = envoy.new_stream(0);
        assert_eq!(envoy.request_headers(s, &request("GET", "/Patient?name=x", &auth), true), HEADERS_CONTINUE);
        assert_eq!(envoy.response_headers(s, &response, false), HEADERS_CONTINUE, "the headers go on");
        envoy.take_calls();
        let entries: Vec<_> =
            types.iter().map(|t| json!({"resource": {"resourceType": t, "id": "secret-1"}})).collect();
        let body = json!({"resourceType": "Bundle", "type": "searchset", "entry": entries}).to_string();
        let status = envoy.response_body(s, body.as_bytes());
        let calls = envoy.take_calls();
        assert!(!calls.iter().any(|c| c.contains("secret-1") && !c.starts_with("get_body")), "{}", dump(&calls));
        if refused {
            assert_eq!(status, BODY_STOP_AND_BUFFER, "the held body is not let go: {}", dump(&calls));
            assert_eq!(envoy.local_reply(s), Some(403));
            assert!(calls.iter().any(|c| c.starts_with("reset_stream")), "{}", dump(&calls));
            let log = calls.iter().find(|c| c.contains("was withheld")).expect("logged");
            assert!(log.contains("the stream is reset"), "{log}");
        } else {
            assert_eq!(status, BODY_CONTINUE);
            assert!(!calls.iter().any(|c| c.starts_with("send_response")), "{}", dump(&calls));
            envoy.complete(s);
        }
        envoy.destroy(s);
    }
}

// ---- a body ended by trailers (HTTP/2) is judged like one ended by its last data frame ----

#[test]
fn a_held_bundle_ended_by_trailers_is_judged_and_a_refused_one_never_goes_on() {
    let envoy = configured(&plugin());
    let auth = bearer(&testkeys::claims_now());
    let headers = [request("POST", "/", &auth), vec![("content-type", "application/fhir+json")]].concat();
    let refused = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "DELETE", "url": "Patient/1"}}
    ]});
    let s = envoy.new_stream(0);
    assert_eq!(envoy.request_headers(s, &headers, false), HEADERS_STOP_ITERATION);
    envoy.take_calls();
    let (body, trailers) = envoy.request_body_then_trailers(s, refused.to_string().as_bytes());
    let calls = envoy.take_calls();
    assert_eq!(body, BODY_STOP_AND_BUFFER, "{}", dump(&calls));
    // Envoy continues a stopped stream whose trailers hook says continue: a refusal must stop them.
    assert_eq!(trailers, TRAILERS_STOP_ITERATION, "{}", dump(&calls));
    assert!(calls.iter().any(|c| c.starts_with("send_response 403")), "{}", dump(&calls));
    assert!(!calls.iter().any(|c| c == "continue_decoding"), "{}", dump(&calls));
    assert!(violations(&calls).is_empty(), "{}", dump(&calls));
    envoy.destroy(s);

    let allowed = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/1"}}
    ]});
    let s = envoy.new_stream(0);
    assert_eq!(envoy.request_headers(s, &headers, false), HEADERS_STOP_ITERATION);
    envoy.take_calls();
    let (body, trailers) = envoy.request_body_then_trailers(s, allowed.to_string().as_bytes());
    let calls = envoy.take_calls();
    assert_eq!((body, trailers), (BODY_STOP_AND_BUFFER, TRAILERS_CONTINUE), "{}", dump(&calls));
    assert!(!calls.iter().any(|c| c.starts_with("send_response")), "{}", dump(&calls));
    assert!(audit_line(&calls)["outcome"] == "allowed", "{}", dump(&calls));
    envoy.destroy(s);
}

// ---- audit_sink: the workers' AuditEvents, batched and posted by the main thread ----

#[test]
fn audit_events_go_from_the_workers_through_the_inbox_to_per_tenant_batches_on_the_main_thread() {
    let mut p = plugin();
    p["audit_log"] = json!(false);
    p["tenants"][crate::testkeys::TENANT_B] = json!({"cluster": "tenant_b"});
    p["audit_sink"] = json!({
        "cluster": "audit", "uri": "http://audit.example/fhir/{tenant}", "batch_size": 2, "queue_size": 3,
        "attempts": 2, "backoff_ms": 100
    });
    let envoy = configured(&p);
    let a = bearer(&testkeys::claims_now());
    let mut claims_b = testkeys::claims_now();
    claims_b["scope"] = json!(crate::testkeys::TENANT_B);
    let b = bearer(&claims_b);
    for (worker, auth) in [(0, &a), (1, &b), (0, &a), (1, &b)] {
        let s = envoy.new_stream(worker);
        assert_eq!(envoy.request_headers(s, &request("GET", "/Patient", auth), true), HEADERS_CONTINUE);
        envoy.complete(s);
    }
    let calls = envoy.take_calls();
    assert!(!calls.iter().any(|c| c.contains("callout")), "nothing sent from a worker: {}", dump(&calls));
    // Queue 3: the fourth is dropped on its worker, and counted there.
    assert!(calls.contains(&"increment_counter fhir_tenant_router.audit_sink.dropped.queue_full 1".to_string()));
    envoy.tick();
    let calls = envoy.take_calls();
    let sent: Vec<&String> = calls.iter().filter(|c| c.starts_with("config_http_callout audit")).collect();
    assert_eq!(sent.len(), 1, "A's batch is full, B's event waits: {}", dump(&calls));
    assert!(sent[0].contains(&format!("(\":path\", \"/fhir/{TENANT_A}\")")), "{}", sent[0]);
    assert!(sent[0].contains("(\"content-type\", \"application/fhir+json\")"), "{}", sent[0]);
    let body: Value = serde_json::from_slice(envoy.0.callout_bodies.borrow().last().unwrap()).unwrap();
    let orgs: Vec<&Value> = body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"]["agent"][2]["who"]["identifier"]["value"])
        .collect();
    assert_eq!(orgs, [TENANT_A, TENANT_A], "{body}");
    // A 500: sent again after the backoff; then delivered, which gives the room back to the workers.
    envoy.config_callout_done(1, "500", b"");
    envoy.set_now_ms(T0_MS + 100);
    envoy.tick();
    assert_eq!(envoy.take_calls().iter().filter(|c| c.starts_with("config_http_callout audit")).count(), 1);
    envoy.config_callout_done(2, "200", b"");
    assert_eq!(envoy.metric("audit_sink.delivered"), 2);
    assert_eq!(envoy.metric("audit_sink.retries"), 1);
    for _ in 0..2 {
        let s = envoy.new_stream(0);
        assert_eq!(envoy.request_headers(s, &request("GET", "/Patient", &a), true), HEADERS_CONTINUE);
        envoy.complete(s);
    }
    assert_eq!(envoy.metric("audit_sink.dropped.queue_full"), 1, "room again for two");
    // A callout that cannot start: the batch fails at once and, its attempts spent, is dropped and counted.
    envoy.0.callout_error.set(Some(1));
    envoy.set_now_ms(T0_MS + 1_100);
    envoy.tick();
    envoy.set_now_ms(T0_MS + 1_200);
    envoy.tick();
    assert!(envoy.metric("audit_sink.dropped.retries_exhausted") >= 1);
    let calls = envoy.take_calls();
    assert!(!calls.iter().filter(|c| c.starts_with("log")).any(|c| c.contains("resourceType")), "{}", dump(&calls));
}
