//! `decision_metadata` in the dynamic module, against the fake Envoy (which keeps filter state read-only
//! once set, as Envoy 1.40 stores a module's filter state): the decision's keys as filter state and, in
//! one call, as dynamic metadata; each key set once per request, a held Bundle's outcome included.

use serde_json::{json, Value};

use crate::testkeys::{self, NOW, TENANT_A};

use super::abi::{HEADERS_CONTINUE, HEADERS_STOP_ITERATION};
use super::fake::{FakeEnvoy, Id};

const T0_MS: u64 = NOW as u64 * 1000;
const NS: &str = "fhir_tenant_router";

fn plugin(decision_metadata: bool) -> Value {
    json!({
        "provider": {"issuer": testkeys::ISSUER, "audiences": [testkeys::AUDIENCE],
                     "jwks": serde_json::from_str::<Value>(&testkeys::public_jwks()).unwrap()},
        "tenants": {TENANT_A: {"cluster": "tenant_a",
                               "allow": {"interactions": ["read", "search", "create"]}}},
        "metadata_cluster": "fhir_metadata",
        "audit_log": false,
        "access_log_filter_state": true,
        "decision_metadata": decision_metadata
    })
}

fn configured(plugin: &Value) -> FakeEnvoy {
    let envoy = FakeEnvoy::default();
    envoy.set_now_ms(T0_MS);
    assert!(envoy.configure(&plugin.to_string()), "{:?}", envoy.take_calls());
    envoy.take_calls();
    envoy
}

fn send(envoy: &FakeEnvoy, method: &str, path: &str, claims: &Value, end: bool) -> (Id, u32, Vec<String>) {
    let auth = format!("Bearer {}", testkeys::sign_rs256(claims));
    let s = envoy.new_stream(0);
    let headers = [(":method", method), (":path", path), (":authority", "fhir.example"), ("authorization", &auth)];
    let status = envoy.request_headers(s, &headers, end);
    (s, status, envoy.take_calls())
}

fn violations(calls: &[String]) -> Vec<&String> {
    calls.iter().filter(|c| c.starts_with("!! ")).collect()
}

fn state(envoy: &FakeEnvoy, s: Id, key: &str) -> Option<String> {
    envoy.filter_state(s, &format!("wasm.fhir_tenant_router.{key}"))
}

#[test]
fn a_routed_request_sets_each_key_once_as_filter_state_and_all_in_one_metadata_call() {
    let envoy = configured(&plugin(true));
    let mut claims = testkeys::claims_now();
    claims["scope"] = json!(format!("{TENANT_A} system/Patient.rs"));
    let (s, status, calls) = send(&envoy, "GET", "/Patient/1?_elements=name", &claims, true);
    assert_eq!(status, HEADERS_CONTINUE, "{calls:#?}");
    let expected = [
        ("tenant", TENANT_A),
        ("client_id", "patients-app-a"),
        ("issuer", testkeys::ISSUER),
        ("scopes", "system/Patient.rs"),
        ("interaction", "read"),
        ("resource_type", "Patient"),
        ("outcome", "allowed"),
    ];
    for (key, value) in expected {
        assert_eq!(state(&envoy, s, key).as_deref(), Some(value), "{key}: {calls:#?}");
        assert_eq!(envoy.dynamic_metadata(s, NS, key).as_deref(), Some(value), "{key}: {calls:#?}");
    }
    assert_eq!(state(&envoy, s, "reason"), None, "an allowed request has no reason");
    // The cost: one call per key set, and one metadata call; the access log's two keys are not set again.
    assert_eq!(calls.iter().filter(|c| c.starts_with("set_filter_state ")).count(), expected.len(), "{calls:#?}");
    assert_eq!(calls.iter().filter(|c| c.starts_with("set_dynamic_metadata ")).count(), 1, "{calls:#?}");
    assert!(violations(&calls).is_empty(), "{calls:#?}");
    // Nothing of the query, the id or the token.
    assert!(!calls.iter().any(|c| c.contains("_elements") || c.contains("Patient/1")), "{calls:#?}");
}

#[test]
fn a_refused_request_says_why_and_a_write_by_override_names_both_interactions() {
    let envoy = configured(&plugin(true));
    let (s, _, calls) = send(&envoy, "DELETE", "/Patient/1", &testkeys::claims_now(), true);
    assert_eq!(envoy.local_reply(s), Some(403), "{calls:#?}");
    assert_eq!(state(&envoy, s, "outcome").as_deref(), Some("forbidden"));
    assert_eq!(state(&envoy, s, "reason").as_deref(), Some("allowlist"));
    assert_eq!(state(&envoy, s, "interaction").as_deref(), Some("delete"));
    assert_eq!(envoy.dynamic_metadata(s, NS, "reason").as_deref(), Some("allowlist"));
    assert!(violations(&calls).is_empty(), "{calls:#?}");

    // A POST the server may take as a search (the allowlist allows both): both are named.
    let auth = format!("Bearer {}", testkeys::sign_rs256(&testkeys::claims_now()));
    let s = envoy.new_stream(0);
    let headers = [
        (":method", "POST"),
        (":path", "/Patient"),
        (":authority", "fhir.example"),
        ("authorization", auth.as_str()),
        ("x-http-method-override", "GET"),
    ];
    envoy.request_headers(s, &headers, true);
    let calls = envoy.take_calls();
    assert_eq!(state(&envoy, s, "interaction").as_deref(), Some("create search"), "{calls:#?}");
}

#[test]
fn a_held_bundle_gets_its_outcome_once_when_its_body_is_judged() {
    let envoy = configured(&plugin(true));
    let (s, status, first) = send(&envoy, "POST", "/", &testkeys::claims_now(), false);
    assert_eq!(status, HEADERS_STOP_ITERATION, "{first:#?}");
    assert_eq!(state(&envoy, s, "tenant").as_deref(), Some(TENANT_A));
    assert_eq!(state(&envoy, s, "interaction").as_deref(), Some("batch"));
    assert_eq!(state(&envoy, s, "outcome"), None, "not decided before the body");
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "DELETE", "url": "Patient/1"}}
    ]});
    envoy.request_body(s, bundle.to_string().as_bytes());
    let calls = envoy.take_calls();
    assert_eq!(state(&envoy, s, "outcome").as_deref(), Some("forbidden"), "{calls:#?}");
    assert_eq!(envoy.dynamic_metadata(s, NS, "outcome").as_deref(), Some("forbidden"), "{calls:#?}");
    assert_eq!(envoy.dynamic_metadata(s, NS, "tenant").as_deref(), Some(TENANT_A), "the first batch stays");
    assert!(violations(&[first, calls].concat()).is_empty());
}

#[test]
fn off_by_default_the_access_log_keys_alone_and_no_metadata_call() {
    let mut p = plugin(false);
    p.as_object_mut().unwrap().remove("decision_metadata");
    let envoy = configured(&p);
    let (s, _, calls) = send(&envoy, "GET", "/Patient/1", &testkeys::claims_now(), true);
    assert_eq!(
        calls.iter().filter(|c| c.starts_with("set_filter_state ") || c.starts_with("set_dynamic_metadata")).count(),
        2,
        "{calls:#?}"
    );
    assert_eq!(state(&envoy, s, "tenant").as_deref(), Some(TENANT_A));
    assert_eq!(state(&envoy, s, "outcome"), None);
    p["access_log_filter_state"] = json!(false);
    let envoy = configured(&p);
    let (_, _, calls) = send(&envoy, "GET", "/Patient/1", &testkeys::claims_now(), true);
    assert!(!calls.iter().any(|c| c.starts_with("set_filter_state") || c.starts_with("set_dynamic")), "{calls:#?}");
}

#[test]
fn the_fake_reports_a_filter_state_key_written_twice() {
    use super::envoy::Envoy as _;
    let envoy = configured(&plugin(true));
    let s = envoy.new_stream(0);
    let filter = envoy.filter_ptr(s);
    envoy.set_filter_state(filter, "k", "1");
    envoy.set_filter_state(filter, "k", "2");
    let calls = envoy.take_calls();
    assert_eq!(violations(&calls), [&"!! set_filter_state twice k".to_string()]);
    assert_eq!(envoy.filter_state(s, "k").as_deref(), Some("1"), "Envoy keeps the first value");
}

#[test]
fn the_audit_event_is_set_once_per_request_a_held_bundle_at_its_verdict() {
    let mut p = plugin(true);
    p["audit_event"] = json!(true);
    let envoy = configured(&p);
    let key = "wasm.fhir_tenant_router.audit_event";
    let (s, _, calls) = send(&envoy, "GET", "/Patient?name=Zzyzx", &testkeys::claims_now(), true);
    let event: Value = serde_json::from_str(&envoy.filter_state(s, key).expect("an event")).unwrap();
    assert_eq!(event["subtype"][0]["code"], "search", "{event}");
    assert!(!calls.iter().any(|c| c.contains("Zzyzx")), "{calls:#?}");
    assert!(violations(&calls).is_empty(), "{calls:#?}");
    let (s, _, first) = send(&envoy, "POST", "/", &testkeys::claims_now(), false);
    assert_eq!(envoy.filter_state(s, key), None, "no event before the verdict");
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/1"}}
    ]});
    envoy.request_body(s, bundle.to_string().as_bytes());
    let calls = envoy.take_calls();
    let event: Value = serde_json::from_str(&envoy.filter_state(s, key).expect("an event")).unwrap();
    assert_eq!((event["subtype"][0]["code"].as_str(), event["outcome"].as_str()), (Some("batch"), Some("0")));
    assert_eq!(event["agent"][0]["network"], json!({"address": "127.0.0.1", "type": "2"}), "{event}");
    assert!(violations(&[first, calls].concat()).is_empty());
}

#[test]
fn the_audit_event_names_the_clients_ip_read_once_from_envoy_and_only_with_the_option() {
    let mut p = plugin(false);
    p["audit_event"] = json!(true);
    let envoy = configured(&p);
    *envoy.0.source_address.borrow_mut() = Some("[2001:db8::7]:50102".into());
    let (s, _, calls) = send(&envoy, "GET", "/Patient/1", &testkeys::claims_now(), true);
    let reads = calls.iter().filter(|c| *c == "get_attribute_string source.address").count();
    assert_eq!(reads, 1, "{calls:#?}");
    let event: Value =
        serde_json::from_str(&envoy.filter_state(s, "wasm.fhir_tenant_router.audit_event").expect("an event")).unwrap();
    assert_eq!(event["agent"][0]["network"], json!({"address": "2001:db8::7", "type": "2"}), "{event}");
    // An address that is no IP (a pipe): no network, still an event.
    *envoy.0.source_address.borrow_mut() = Some("/tmp/envoy.sock".into());
    let (s, _, _) = send(&envoy, "GET", "/Patient/1", &testkeys::claims_now(), true);
    let event: Value =
        serde_json::from_str(&envoy.filter_state(s, "wasm.fhir_tenant_router.audit_event").expect("an event")).unwrap();
    assert_eq!(event["agent"][0]["network"], Value::Null, "{event}");
    // Without the option: Envoy is not asked.
    let envoy = configured(&plugin(true));
    let (_, _, calls) = send(&envoy, "GET", "/Patient/1", &testkeys::claims_now(), true);
    assert!(!calls.iter().any(|c| c.contains("source.address")), "{calls:#?}");
}

#[test]
fn envoy_1_38_has_no_batch_setter_and_gets_one_metadata_call_per_key() {
    let envoy = FakeEnvoy::default();
    // Envoy 1.38: no `set_dynamic_metadata_string_batch` (the fake panics if it is called: a hook would say
    // it panicked).
    envoy.0.no_config_metrics.set(true);
    envoy.set_now_ms(T0_MS);
    assert!(envoy.configure(&plugin(true).to_string()), "{:?}", envoy.take_calls());
    envoy.take_calls();
    let mut claims = testkeys::claims_now();
    claims["scope"] = json!(format!("{TENANT_A} system/Patient.rs"));
    let (s, status, calls) = send(&envoy, "GET", "/Patient/1", &claims, true);
    assert_eq!(status, HEADERS_CONTINUE, "{calls:#?}");
    assert!(!calls.iter().any(|c| c.contains("panicked") || c.starts_with("set_dynamic_metadata ")), "{calls:#?}");
    let entries = calls.iter().filter(|c| c.starts_with("set_dynamic_metadata_entry ")).count();
    assert_eq!(entries, 7, "one per key: {calls:#?}");
    for (key, value) in [("tenant", TENANT_A), ("interaction", "read"), ("outcome", "allowed")] {
        assert_eq!(envoy.dynamic_metadata(s, NS, key).as_deref(), Some(value), "{key}: {calls:#?}");
    }
    assert!(violations(&calls).is_empty(), "{calls:#?}");
}

// ---- span_tags: the decision on Envoy's active trace span ----

fn tag_calls(calls: &[String]) -> Vec<&str> {
    calls
        .iter()
        .filter(|c| c.starts_with("get_active_span") || c.starts_with("span_set_tag "))
        .map(String::as_str)
        .collect()
}

#[test]
fn span_tags_tag_the_active_span_with_the_decision_and_the_verify_time_and_set_no_state() {
    let mut p = plugin(false);
    p["span_tags"] = json!(true);
    p["access_log_filter_state"] = json!(false);
    let envoy = configured(&p);
    let (s, status, calls) = send(&envoy, "GET", "/Patient/1?name=Zzyzx", &testkeys::claims_now(), true);
    assert_eq!(status, HEADERS_CONTINUE, "{calls:#?}");
    let tenant = format!("span_set_tag fhir_tenant_router.tenant={TENANT_A}");
    let issuer = format!("span_set_tag fhir_tenant_router.issuer={}", testkeys::ISSUER);
    assert_eq!(
        tag_calls(&calls),
        [
            "get_active_span",
            &tenant,
            "span_set_tag fhir_tenant_router.client_id=patients-app-a",
            &issuer,
            "span_set_tag fhir_tenant_router.interaction=read",
            "span_set_tag fhir_tenant_router.resource_type=Patient",
            "span_set_tag fhir_tenant_router.outcome=allowed",
            // The fake's clock moves 2,500 ns a read: the clock was read once before the check and once after.
            "span_set_tag fhir_tenant_router.verify_ns=2500",
        ],
        "{calls:#?}"
    );
    // Tags only: no filter state, no dynamic metadata, nothing of the query, the id or the token.
    assert!(!calls.iter().any(|c| c.starts_with("set_filter_state") || c.starts_with("set_dynamic")), "{calls:#?}");
    assert_eq!(state(&envoy, s, "tenant"), None);
    assert!(!calls.iter().any(|c| c.contains("Zzyzx") || c.contains("Patient/1") || c.contains("eyJ")), "{calls:#?}");
    // Refused: the outcome and its reason.
    let s = envoy.new_stream(0);
    envoy.request_headers(s, &[(":method", "GET"), (":path", "/Patient"), (":authority", "fhir.example")], true);
    let calls = envoy.take_calls();
    assert_eq!(
        tag_calls(&calls),
        [
            "get_active_span",
            "span_set_tag fhir_tenant_router.interaction=search",
            "span_set_tag fhir_tenant_router.resource_type=Patient",
            "span_set_tag fhir_tenant_router.outcome=rejected",
            "span_set_tag fhir_tenant_router.reason=missing_token",
            "span_set_tag fhir_tenant_router.verify_ns=2500",
        ],
        "{calls:#?}"
    );
    assert!(violations(&calls).is_empty(), "{calls:#?}");
}

#[test]
fn span_tags_without_tracing_cost_one_call_and_off_cost_none() {
    let mut p = plugin(false);
    p["span_tags"] = json!(true);
    let envoy = configured(&p);
    envoy.0.no_tracing.set(true);
    let (_, _, calls) = send(&envoy, "GET", "/Patient/1", &testkeys::claims_now(), true);
    assert_eq!(tag_calls(&calls), ["get_active_span (none)"], "{calls:#?}");
    let envoy = configured(&plugin(true));
    let (_, _, calls) = send(&envoy, "GET", "/Patient/1", &testkeys::claims_now(), true);
    assert!(tag_calls(&calls).is_empty(), "decision_metadata alone tags no span: {calls:#?}");
}

#[test]
fn a_held_bundle_is_tagged_when_its_headers_are_decided_and_gets_its_outcome_at_the_verdict() {
    let mut p = plugin(false);
    p["span_tags"] = json!(true);
    p["access_log_filter_state"] = json!(false);
    let envoy = configured(&p);
    let (s, _, calls) = send(&envoy, "POST", "/", &testkeys::claims_now(), false);
    let tags = tag_calls(&calls);
    assert!(tags.contains(&"span_set_tag fhir_tenant_router.interaction=batch"), "{calls:#?}");
    assert!(tags.iter().any(|t| t.starts_with("span_set_tag fhir_tenant_router.verify_ns=")), "{calls:#?}");
    assert!(!tags.iter().any(|t| t.contains(".outcome=")), "no outcome before the verdict: {calls:#?}");
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "DELETE", "url": "Patient/1"}}
    ]});
    envoy.request_body(s, bundle.to_string().as_bytes());
    let calls = envoy.take_calls();
    assert_eq!(
        tag_calls(&calls),
        [
            "get_active_span",
            "span_set_tag fhir_tenant_router.outcome=forbidden",
            "span_set_tag fhir_tenant_router.reason=allowlist"
        ],
        "{calls:#?}"
    );
    assert!(violations(&calls).is_empty(), "{calls:#?}");
}
