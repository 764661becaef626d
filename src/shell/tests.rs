//! The proxy-wasm shell driven natively through its event handlers against a fake host: every test
//! asserts the exact host calls an event makes (the way Kuadrant's wasm-shim tests assert host-call
//! sequences).

use serde_json::{json, Value};

use crate::effect::Flow;
use crate::rejection::Rejection;
use crate::testkeys::{self, NOW, TENANT_A, TENANT_B};

use super::fake::FakeHost;
use super::filter::Filter;
use super::root::Root;

const T0_MS: u64 = NOW as u64 * 1000;
const ROUTE: &str = "x-fhir-tenant-router-cluster";
const TENANT: &str = "x-fhir-tenant-id";

fn jwks() -> Value {
    serde_json::from_str(&testkeys::public_jwks()).unwrap()
}

/// The plugin JSON of the tests: inline keys, tenants A and B, audit line off unless a test turns it on.
fn plugin() -> Value {
    json!({
        "provider": {"issuer": testkeys::ISSUER, "audiences": [testkeys::AUDIENCE], "jwks": jwks()},
        "tenants": {TENANT_A: {"cluster": "tenant_a"}, TENANT_B: {"cluster": "tenant_b"}},
        "metadata_cluster": "fhir_metadata",
        "audit_log": false
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

/// A configured root over a fresh fake host, with the calls of `on_configure` taken.
fn configured(plugin: &Value) -> (FakeHost, Root<FakeHost>) {
    let host = FakeHost::default();
    host.0.now_ms.set(T0_MS);
    *host.0.plugin_configuration.borrow_mut() = plugin.to_string().into_bytes();
    let mut root = Root::new(host.clone());
    assert!(root.on_configure(), "{:?}", host.take_calls());
    host.take_calls();
    (host, root)
}

fn get(path: &str, authorization: Option<&str>) -> Vec<(&'static str, String)> {
    let mut h =
        vec![(":method", "GET".to_string()), (":path", path.to_string()), (":authority", "fhir.example".into())];
    h.push((":scheme", "https".into()));
    if let Some(a) = authorization {
        h.push(("authorization", a.to_string()));
    }
    h
}

fn send(
    host: &FakeHost,
    root: &Root<FakeHost>,
    id: u32,
    headers: &[(&str, String)],
    eos: bool,
) -> (Filter<FakeHost>, Flow) {
    let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    host.request(&pairs);
    let mut filter = root.create_filter(id).unwrap();
    let flow = filter.on_request_headers(eos);
    (filter, flow)
}

fn bearer(claims: &Value) -> String {
    format!("Bearer {}", testkeys::sign_rs256(claims))
}

fn refusal(status: u32, extra: &str, body: &str) -> String {
    let mut headers = vec![("content-type", "application/fhir+json"), ("cache-control", "no-store")];
    if let Some((n, v)) = extra.split_once(": ") {
        headers.push((n, v));
    }
    format!("send_reply {status} {headers:?} {body}")
}

/// The request's header map as the fake host now holds it: what Envoy would send upstream (lossy UTF-8).
fn request_map(host: &FakeHost) -> Vec<(String, String)> {
    host.0.request_headers.borrow().iter().map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned())).collect()
}

/// Every value of `name` in that map, in order.
fn sent(host: &FakeHost, name: &str) -> Vec<String> {
    request_map(host).into_iter().filter(|(n, _)| n == name).map(|(_, v)| v).collect()
}

/// The pseudo-headers of `get(path, ..)`.
fn pseudo(path: &str) -> Vec<(&'static str, String)> {
    get(path, None)
}

// ---- on_configure ----

#[test]
fn a_bad_configuration_is_refused_with_a_log_line_naming_the_field() {
    let host = FakeHost::default();
    let mut p = plugin();
    p["provider"]["audiences"] = json!([]);
    *host.0.plugin_configuration.borrow_mut() = p.to_string().into_bytes();
    let mut root = Root::new(host.clone());
    assert!(!root.on_configure());
    let calls = host.take_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].starts_with("log Error invalid plugin configuration: field `provider.audiences`"), "{calls:?}");
    assert!(root.create_filter(1).is_none());
}

#[test]
fn configure_logs_what_it_loaded_and_starts_the_timer() {
    let host = FakeHost::default();
    *host.0.plugin_configuration.borrow_mut() = remote_plugin().to_string().into_bytes();
    let mut root = Root::new(host.clone());
    assert!(root.on_configure());
    assert_eq!(
        host.take_calls(),
        [
            "log Info configured: 2 tenants, issuers http://127.0.0.1:9000 (JWKS from cluster idp every 300 s), \
             signature verifier Auto",
            "set_tick_period 500"
        ]
    );
}

// ---- request headers: every Decision arm ----

#[test]
fn metadata_goes_to_the_metadata_cluster_without_a_token_and_without_the_authorization_header() {
    let (host, root) = configured(&plugin());
    let (_f, flow) = send(&host, &root, 1, &get("/metadata", None), true);
    assert_eq!(flow, Flow::Continue);
    assert_eq!(
        host.take_calls(),
        // Envoy re-picks the route on the route header's edit: no `clear_route_cache` call.
        [
            "get_request_headers",
            "remove_request_header authorization",
            &format!("set_request_header {ROUTE}: fhir_metadata")
        ]
    );
    assert_eq!(request_map(&host).last(), Some(&(ROUTE.to_string(), "fhir_metadata".to_string())));
}

#[test]
fn a_valid_token_routes_to_its_tenant_verified_once_then_from_the_cache() {
    let (host, root) = configured(&plugin());
    let auth = bearer(&testkeys::claims_now());
    let expected = [
        "get_request_headers",
        "remove_request_header authorization",
        &format!("set_request_header {TENANT}: {TENANT_A}"),
        &format!("set_request_header {ROUTE}: tenant_a"),
    ];
    for id in 1..=2 {
        let (_f, flow) = send(&host, &root, id, &get("/Patient?family=x", Some(&auth)), true);
        assert_eq!(flow, Flow::Continue);
        // The host has no verify_signature: the first request's check fell back to pure Rust.
        let mut calls = host.take_calls();
        if id == 1 {
            assert_eq!(calls.remove(1), "call_foreign_function verify_signature");
            assert_eq!(
                calls.remove(1),
                "log Warn the host has no verify_signature function: using the pure-Rust verifier"
            );
        }
        assert_eq!(calls, expected, "request {id}");
    }
    root.on_tick_for_test();
    assert_eq!((host.metric("cache.misses"), host.metric("cache.hits")), (1, 1));
    assert_eq!(host.metric("requests.allowed"), 2);
    assert_eq!(host.metric(&format!("tenant.{TENANT_A}.allowed")), 2);
    assert_eq!(host.metric("signature.pure_rust"), 1);
}

#[test]
fn the_host_verifies_signatures_when_it_can() {
    let (host, root) = configured(&plugin());
    // verify_signature's answer: protobuf field 1 (result) = true.
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let (_f, flow) = send(&host, &root, 1, &get("/Patient", Some(&bearer(&testkeys::claims_now()))), true);
    assert_eq!(flow, Flow::Continue);
    assert_eq!(host.take_calls()[1], "call_foreign_function verify_signature");
    root.on_tick_for_test();
    assert_eq!((host.metric("signature.host"), host.metric("signature.pure_rust")), (1, 0));
}

#[test]
fn client_copies_of_the_headers_the_filter_owns_are_removed_first() {
    let (host, root) = configured(&plugin());
    let mut headers = get("/metadata", None);
    headers.push((ROUTE, "tenant_b".into()));
    send(&host, &root, 1, &headers, true);
    assert_eq!(
        host.take_calls()[..3],
        ["get_request_headers", &format!("remove_request_header {ROUTE}"), "remove_request_header authorization"]
    );
    assert_eq!(sent(&host, ROUTE), ["fhir_metadata"]);
    // Every forwarding header a client sends is removed (only those that came), but X-Forwarded-Proto: Envoy
    // sets one on every request and routes none without it; `public_base_url` overwrites it.
    let mut headers = get("/metadata", None);
    for (name, value) in [
        (TENANT, TENANT_B),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "gopher"),
        ("x-forwarded-prefix", "/evil"),
        ("x-forwarded-port", "6666"),
        ("forwarded", "host=evil.example;proto=gopher"),
    ] {
        headers.push((name, value.into()));
    }
    send(&host, &root, 2, &headers, true);
    assert_eq!(
        host.take_calls()[..6],
        [
            "get_request_headers",
            &format!("remove_request_header {TENANT}"),
            "remove_request_header x-forwarded-host",
            "remove_request_header x-forwarded-prefix",
            "remove_request_header x-forwarded-port",
            "remove_request_header forwarded",
        ]
    );
    let mut expected = pseudo("/metadata");
    expected.extend([("x-forwarded-proto", "gopher".to_string()), (ROUTE, "fhir_metadata".to_string())]);
    let expected: Vec<(String, String)> = expected.into_iter().map(|(n, v)| (n.to_string(), v)).collect();
    assert_eq!(request_map(&host), expected, "what goes upstream");
}

/// What goes upstream (the fake applies each edit as Envoy does: a removal drops every entry of the name, a
/// set drops them and adds one at the end) is the client's map but for the filter's edits: a client's copies
/// of the tenant and route headers (three of each, empty ones too, in any place) are gone and the filter's
/// are the only ones; every other header keeps its bytes (a value that is not UTF-8 too), its duplicates and
/// its place; `authorization` is gone.
#[test]
fn what_goes_upstream_is_the_clients_map_but_for_the_filters_edits_byte_for_byte() {
    let (host, root) = configured(&plugin());
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let auth = bearer(&testkeys::claims_now());
    let mut headers = get("/Patient?family=x", Some(&auth));
    headers.insert(4, (TENANT, TENANT_B.into()));
    for (name, value) in [
        ("accept", "application/fhir+json"),
        (ROUTE, "tenant_b"),
        ("x-dup", "1"),
        (TENANT, TENANT_B),
        (ROUTE, ""),
        ("x-dup", "2"),
        (TENANT, ""),
        (ROUTE, "tenant_b"),
    ] {
        headers.push((name, value.into()));
    }
    let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    host.request(&pairs);
    host.0.request_headers.borrow_mut().push(("x-bytes".into(), b"caf\xe9 \xff\x01".to_vec()));
    let mut f = root.create_filter(1).unwrap();
    assert_eq!(f.on_request_headers(true), Flow::Continue);
    let calls = host.take_calls();
    assert!(!calls.contains(&"clear_route_cache".to_string()), "Envoy re-picks the route on an edit: {calls:?}");
    let map = host.0.request_headers.borrow().clone();
    let expected: Vec<(String, Vec<u8>)> = [
        (":method", &b"GET"[..]),
        (":path", b"/Patient?family=x"),
        (":authority", b"fhir.example"),
        (":scheme", b"https"),
        ("accept", b"application/fhir+json"),
        ("x-dup", b"1"),
        ("x-dup", b"2"),
        ("x-bytes", b"caf\xe9 \xff\x01"),
        (TENANT, TENANT_A.as_bytes()),
        (ROUTE, b"tenant_a"),
    ]
    .iter()
    .map(|(n, v)| (n.to_string(), v.to_vec()))
    .collect();
    assert_eq!(map, expected);
}

#[test]
fn links_and_forwarded_headers_come_from_public_base_url_never_from_the_request() {
    let mut p = plugin();
    p["public_base_url"] = json!("https://fhir.example.org/r4/");
    p["tenants"][TENANT_A] =
        json!({"cluster": "tenant_a", "authority": "fhir.partner", "links_base_url": "http://fhir.partner/fhir"});
    let (host, root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let mut headers = get("/Patient", Some(&bearer(&testkeys::claims_now())));
    for (name, value) in [
        (":authority", "evil.example"),
        (":scheme", "http"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "gopher"),
        ("forwarded", "host=evil.example"),
    ] {
        headers.retain(|(n, _)| *n != name);
        headers.push((name, value.into()));
    }
    let (mut f, _) = send(&host, &root, 1, &headers, true);
    let calls = host.take_calls();
    assert!(!calls.iter().any(|c| c.contains("evil") || c.contains("gopher")), "{calls:?}");
    for (name, value) in [
        ("x-forwarded-host", "fhir.example.org"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-prefix", "/r4"),
        (":authority", "fhir.partner"),
    ] {
        assert_eq!(sent(&host, name), [value], "{name} in {calls:?}");
    }
    assert!(sent(&host, "forwarded").is_empty(), "{calls:?}");
    host.0.response_headers.borrow_mut().insert("location".into(), "http://fhir.partner/fhir/Patient/1".into());
    f.on_response_headers(true);
    assert_eq!(host.take_calls(), ["set_response_header location: https://fhir.example.org/r4/Patient/1"]);
    // Discovery documents too: the metadata server is told the public base, not the client's Host.
    let mut headers = get("/metadata", None);
    headers.retain(|(n, _)| *n != ":authority");
    headers.push((":authority", "evil.example".into()));
    send(&host, &root, 2, &headers, true);
    let calls = host.take_calls();
    assert_eq!(sent(&host, "x-forwarded-host"), ["fhir.example.org"], "{calls:?}");
}

#[test]
fn without_public_base_url_no_forwarded_header_is_set_and_the_clients_are_removed() {
    let mut p = plugin();
    p["tenants"][TENANT_A] = json!({"cluster": "tenant_a", "authority": "fhir.partner", "base_path": "/api"});
    let (host, root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let mut headers = get("/Patient", Some(&bearer(&testkeys::claims_now())));
    headers.push(("x-forwarded-host", "evil.example".into()));
    send(&host, &root, 1, &headers, true);
    let calls = host.take_calls();
    let map = request_map(&host);
    assert!(!map.iter().any(|(n, _)| n.starts_with("x-forwarded")), "{calls:?}");
    assert!(!calls.iter().any(|c| c.contains("fhir.example.org")), "{calls:?}");
}

#[test]
fn a_tenant_with_settings_gets_its_authority_base_path_header_and_forwarded_headers() {
    let mut p = plugin();
    p["tenants"][TENANT_A] = json!({
        "cluster": "tenant_a", "authority": "fhir.partner", "base_path": "/api/FHIR/R4",
        "links_base_url": "http://fhir.partner/api/FHIR/R4",
        "upstream_header": {"name": "x-api-key", "env": "KEY_A"}
    });
    p["public_base_url"] = json!("https://fhir.example");
    let host = FakeHost::default();
    host.0.now_ms.set(T0_MS);
    host.0.env.borrow_mut().insert("KEY_A".into(), "secret-a".into());
    *host.0.plugin_configuration.borrow_mut() = p.to_string().into_bytes();
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let mut root = Root::new(host.clone());
    assert!(root.on_configure());
    host.take_calls();
    let (mut f, _) = send(&host, &root, 1, &get("/Patient?_count=1", Some(&bearer(&testkeys::claims_now()))), true);
    assert_eq!(
        host.take_calls(),
        [
            "get_request_headers",
            "call_foreign_function verify_signature",
            "remove_request_header authorization",
            "set_request_header x-forwarded-host: fhir.example",
            "set_request_header x-forwarded-proto: https",
            "set_request_header :authority: fhir.partner",
            "set_request_header :path: /api/FHIR/R4/Patient?_count=1",
            "set_request_header x-api-key: secret-a",
            "remove_request_header accept-encoding",
            &format!("set_request_header {TENANT}: {TENANT_A}"),
            &format!("set_request_header {ROUTE}: tenant_a"),
        ]
    );
    // The response: links under the upstream's base point at the public base.
    host.0.response_headers.borrow_mut().extend([
        ("location".to_string(), "http://fhir.partner/api/FHIR/R4/Patient/1".to_string()),
        ("content-type".to_string(), "application/fhir+json".to_string()),
    ]);
    assert_eq!(f.on_response_headers(false), Flow::Continue);
    assert_eq!(
        host.take_calls(),
        ["set_response_header location: https://fhir.example/Patient/1", "remove_response_header content-length"]
    );
    let bundle = json!({"resourceType": "Bundle", "link": [{"relation": "next", "url": "http://fhir.partner/api/FHIR/R4/Patient?page=2"}]});
    *host.0.response_body.borrow_mut() = bundle.to_string().into_bytes();
    assert_eq!(f.on_response_body(10, false), Flow::Buffer);
    assert!(host.take_calls().is_empty(), "nothing read before the end");
    let size = bundle.to_string().len();
    assert_eq!(f.on_response_body(size, true), Flow::Continue);
    let calls = host.take_calls();
    assert_eq!(calls[0], "get_response_body");
    assert!(calls[1].starts_with(&format!("set_response_body {size} ")), "{calls:?}");
    assert!(calls[1].contains("https://fhir.example/Patient?page=2"), "{calls:?}");
}

#[test]
fn smart_configuration_is_answered_locally() {
    let mut p = plugin();
    p["discovery"] = json!({"token_endpoint": "http://127.0.0.1:9000/token"});
    let (host, root) = configured(&p);
    let (_f, flow) = send(&host, &root, 1, &get("/.well-known/smart-configuration", None), true);
    assert_eq!(flow, Flow::Stop);
    let calls = host.take_calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(
        calls[1].starts_with(
            r#"send_reply 200 [("content-type", "application/json"), ("cache-control", "max-age=3600")] {"#
        ),
        "{calls:?}"
    );
    assert!(calls[1].contains("http://127.0.0.1:9000/token"));
}

#[test]
fn metadata_is_patched_with_the_token_url_on_its_way_back() {
    let mut p = plugin();
    p["discovery"] = json!({"token_endpoint": "http://127.0.0.1:9000/token"});
    let (host, root) = configured(&p);
    let (mut f, _) = send(&host, &root, 1, &get("/metadata", None), true);
    assert_eq!(
        host.take_calls(),
        [
            "get_request_headers",
            "remove_request_header authorization",
            "remove_request_header accept-encoding",
            &format!("set_request_header {ROUTE}: fhir_metadata"),
        ]
    );
    host.0.response_headers.borrow_mut().insert("content-type".into(), "application/fhir+json".into());
    assert_eq!(f.on_response_headers(false), Flow::Continue);
    assert_eq!(host.take_calls(), ["remove_response_header content-length"]);
    let cs = json!({"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1", "rest": [{"mode": "server"}]});
    *host.0.response_body.borrow_mut() = cs.to_string().into_bytes();
    assert_eq!(f.on_response_body(cs.to_string().len(), true), Flow::Continue);
    let calls = host.take_calls();
    assert!(calls[1].contains("oauth-uris") && calls[1].contains("http://127.0.0.1:9000/token"), "{calls:?}");
}

#[test]
fn head_metadata_answers_without_the_upstream_content_length_of_the_unpatched_body() {
    let mut p = plugin();
    p["discovery"] = json!({"token_endpoint": "http://127.0.0.1:9000/token"});
    let (host, root) = configured(&p);
    let mut head = get("/metadata", None);
    head[0].1 = "HEAD".into();
    let (mut f, _) = send(&host, &root, 1, &head, true);
    host.take_calls();
    let mut headers = host.0.response_headers.borrow_mut();
    headers.insert("content-type".into(), "application/fhir+json".into());
    headers.insert("content-length".into(), "1234".into());
    drop(headers);
    // A HEAD answer ends with its headers: GET's patched body has another length, which no one knows here.
    assert_eq!(f.on_response_headers(true), Flow::Continue);
    assert_eq!(host.take_calls(), ["remove_response_header content-length"]);
    // A non-JSON or compressed answer is not patched on GET either: its length stands.
    host.0.response_headers.borrow_mut().insert("content-encoding".into(), "gzip".into());
    let (mut f, _) = send(&host, &root, 2, &head, true);
    host.take_calls();
    assert_eq!(f.on_response_headers(true), Flow::Continue);
    assert!(host.take_calls().is_empty());
    // GET's headers-only answer (an empty body) is not edited.
    host.0.response_headers.borrow_mut().remove("content-encoding");
    let (mut f, _) = send(&host, &root, 3, &get("/metadata", None), true);
    host.take_calls();
    assert_eq!(f.on_response_headers(true), Flow::Continue);
    assert!(host.take_calls().is_empty());
}

#[test]
fn a_compressed_or_non_json_response_is_passed_on_untouched() {
    let mut p = plugin();
    p["discovery"] = json!({"token_endpoint": "http://127.0.0.1:9000/token"});
    let (host, root) = configured(&p);
    for (name, value) in [("content-encoding", "gzip"), ("content-type", "text/html")] {
        let (mut f, _) = send(&host, &root, 1, &get("/metadata", None), true);
        host.take_calls();
        let mut headers = host.0.response_headers.borrow_mut();
        headers.clear();
        headers.insert("content-type".into(), "application/fhir+json".into());
        headers.insert(name.into(), value.into());
        drop(headers);
        assert_eq!(f.on_response_headers(false), Flow::Continue);
        assert_eq!(f.on_response_body(10, true), Flow::Continue);
        assert!(host.take_calls().is_empty(), "{name}: {value}");
    }
}

#[test]
fn a_missing_token_is_401_with_www_authenticate_and_an_operation_outcome() {
    let (host, root) = configured(&plugin());
    let (_f, flow) = send(&host, &root, 1, &get("/Patient", None), true);
    assert_eq!(flow, Flow::Stop);
    let r = Rejection::MissingToken;
    assert_eq!(
        host.take_calls(),
        [
            "get_request_headers",
            &refusal(401, "www-authenticate: Bearer realm=\"fhir-tenant-router\"", r.operation_outcome())
        ]
    );
    root.on_tick_for_test();
    assert_eq!(host.metric("requests.rejected.missing_token"), 1);
}

#[test]
fn a_token_for_no_tenant_is_403_and_one_for_a_tenant_bound_to_another_issuer_is_403_counted_on_it() {
    let mut p = plugin();
    p["providers"] = json!([
        {"issuer": testkeys::ISSUER, "audiences": [testkeys::AUDIENCE], "jwks": jwks()},
        {"issuer": "http://other-idp", "audiences": [testkeys::AUDIENCE], "jwks": jwks()}
    ]);
    p.as_object_mut().unwrap().remove("provider");
    p["tenants"][TENANT_A] = json!({"cluster": "tenant_a", "issuers": ["http://other-idp"]});
    let (host, root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    send(&host, &root, 1, &get("/Patient", Some(&bearer(&testkeys::claims_now()))), true);
    let r = Rejection::IssuerNotAllowed;
    let www = "www-authenticate: Bearer realm=\"fhir-tenant-router\", error=\"insufficient_scope\"";
    assert_eq!(host.take_calls()[2..], [refusal(403, www, r.operation_outcome())]);
    let mut claims = testkeys::claims_now();
    claims["scope"] = json!("openid");
    send(&host, &root, 2, &get("/Patient", Some(&bearer(&claims))), true);
    assert_eq!(host.take_calls()[2..], [refusal(403, www, Rejection::NoTenant.operation_outcome())]);
    root.on_tick_for_test();
    assert_eq!(host.metric(&format!("tenant.{TENANT_A}.forbidden")), 1);
    assert_eq!(host.metric("requests.rejected.no_tenant"), 1);
}

/// Issue 24: a verified token refused because its issuer may not name the tenant still has an audit line
/// naming the tenant, the client and the cluster (whose request it was, and where it was going).
#[test]
fn the_audit_line_of_a_tenant_bound_to_another_issuer_names_tenant_client_and_cluster() {
    let mut p = plugin();
    p["providers"] = json!([
        {"issuer": testkeys::ISSUER, "audiences": [testkeys::AUDIENCE], "jwks": jwks()},
        {"issuer": "http://other-idp", "audiences": [testkeys::AUDIENCE], "jwks": jwks()}
    ]);
    p.as_object_mut().unwrap().remove("provider");
    p["tenants"][TENANT_A] = json!({"cluster": "tenant_a", "issuers": ["http://other-idp"]});
    p["audit_log"] = json!(true);
    let (host, root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    send(&host, &root, 1, &get("/Patient", Some(&bearer(&testkeys::claims_now()))), true);
    let calls = host.take_calls();
    let line = calls.iter().find_map(|c| c.strip_prefix("log Info ")).expect("an audit line");
    let line: Value = serde_json::from_str(line).unwrap();
    assert_eq!(line["reason"], "issuer_not_allowed", "{line}");
    assert_eq!((line["tenant"].as_str(), line["client_id"].as_str()), (Some(TENANT_A), Some("patients-app-a")));
    assert_eq!(line["cluster"], "tenant_a", "{line}");
}

#[test]
fn a_token_from_a_client_the_tenant_does_not_allow_is_403_counted_on_the_tenant() {
    let mut p = plugin();
    p["tenants"][TENANT_A] = json!({"cluster": "tenant_a", "allowed_clients": ["backend-a"]});
    let (host, root) = configured(&p);
    send(&host, &root, 1, &get("/Patient", Some(&bearer(&testkeys::claims_now()))), true);
    let www = "www-authenticate: Bearer realm=\"fhir-tenant-router\", error=\"insufficient_scope\"";
    assert_eq!(host.take_calls().last(), Some(&refusal(403, www, Rejection::ClientNotAllowed.operation_outcome())));
    root.on_tick_for_test();
    assert_eq!(host.metric(&format!("tenant.{TENANT_A}.client_not_allowed")), 1);
    assert_eq!(host.metric(&format!("tenant.{TENANT_A}.forbidden")), 1);
    assert_eq!(host.metric("requests.rejected.client_not_allowed"), 1);
}

#[test]
fn the_allowlist_refuses_with_403_naming_the_interaction() {
    let (host, root) = configured(&plugin());
    let mut headers = get("/Patient/1", Some(&bearer(&testkeys::claims_now())));
    headers[0].1 = "DELETE".into();
    let (_f, flow) = send(&host, &root, 1, &headers, true);
    assert_eq!(flow, Flow::Stop);
    let calls = host.take_calls();
    let last = calls.last().unwrap();
    assert!(last.starts_with("send_reply 403 "), "{calls:?}");
    assert!(last.contains("the delete interaction on Patient is not allowed for this tenant."), "{last}");
    root.on_tick_for_test();
    assert_eq!(host.metric("requests.forbidden_by_policy"), 1);
    assert_eq!(host.metric(&format!("tenant.{TENANT_A}.forbidden")), 1);
}

#[test]
fn an_unknown_kid_with_inline_keys_is_refused_at_once() {
    let (host, root) = configured(&plugin());
    let token = testkeys::sign_rs256_with_fresh_key(&testkeys::claims_now(), "nobody-knows-me");
    let (_f, flow) = send(&host, &root, 1, &get("/Patient", Some(&format!("Bearer {token}"))), true);
    assert_eq!(flow, Flow::Stop);
    let www = "www-authenticate: Bearer realm=\"fhir-tenant-router\", error=\"invalid_token\"";
    assert_eq!(
        host.take_calls(),
        ["get_request_headers", &refusal(401, www, Rejection::UnknownKey.operation_outcome())]
    );
}

/// Every refusal the filter can send for a bad token, with the bytes actually sent checked for the token.
#[test]
fn answers_and_log_lines_never_echo_the_token() {
    let mut p = plugin();
    p["audit_log"] = json!(true);
    let (host, root) = configured(&p);
    let mut cases = Vec::new();
    let mut c = testkeys::claims_now();
    c["exp"] = json!(NOW - 3600);
    cases.push(testkeys::sign_rs256(&c)); // expired
    let mut c = testkeys::claims_now();
    c["aud"] = json!("http://elsewhere");
    cases.push(testkeys::sign_rs256(&c)); // audience
    let mut c = testkeys::claims_now();
    c["scope"] = json!("secret-scope-value");
    cases.push(testkeys::sign_rs256(&c)); // no tenant
    cases.push(testkeys::sign_rs256_with_fresh_key(&testkeys::claims_now(), testkeys::RS_KID)); // signature
    cases.push("not-a-token-but-a-secret-string".to_string()); // malformed
    for (i, token) in cases.iter().enumerate() {
        let (_f, flow) =
            send(&host, &root, i as u32 + 1, &get("/Patient?name=Zzyzx", Some(&format!("Bearer {token}"))), true);
        assert_eq!(flow, Flow::Stop);
        let calls = host.take_calls().join("\n");
        assert!(calls.contains("send_reply 40"), "{calls}");
        assert!(calls.contains("log Info {\"audit\""), "{calls}");
        for part in token.split('.').filter(|p| p.len() > 8) {
            assert!(!calls.contains(part), "case {i} echoes the token: {calls}");
        }
        assert!(!calls.contains("secret-scope-value") && !calls.contains("Zzyzx"), "{calls}");
    }
}

#[test]
fn the_audit_line_and_filter_state_are_written_only_when_configured() {
    let mut p = plugin();
    p["audit_log"] = json!(true);
    p["access_log_filter_state"] = json!(true);
    let (host, root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    send(&host, &root, 1, &get("/Patient", Some(&bearer(&testkeys::claims_now()))), true);
    let calls = host.take_calls();
    assert_eq!(calls[calls.len() - 3], format!("set_filter_state fhir_tenant_router.tenant={TENANT_A}"));
    assert_eq!(calls[calls.len() - 2], "set_filter_state fhir_tenant_router.client_id=patients-app-a");
    let line: Value = serde_json::from_str(calls[calls.len() - 1].strip_prefix("log Info ").unwrap()).unwrap();
    assert_eq!((line["outcome"].as_str(), line["tenant"].as_str()), (Some("allowed"), Some(TENANT_A)));
}

/// `audit_log: "filter_state"`: the same line, byte for byte, as one filter state value for Envoy's access
/// log, and no log call; a refused request's too.
#[test]
fn audit_log_filter_state_sets_the_same_line_as_filter_state_and_logs_nothing() {
    let auth = bearer(&testkeys::claims_now());
    let mut lines = Vec::new();
    for delivery in [json!(true), json!("filter_state")] {
        let mut p = plugin();
        p["audit_log"] = delivery.clone();
        let (host, root) = configured(&p);
        *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
        send(&host, &root, 1, &get("/Patient?name=x", Some(&auth)), true);
        send(&host, &root, 2, &get("/Patient", None), true);
        let calls = host.take_calls();
        let logged: Vec<&str> = calls.iter().filter_map(|c| c.strip_prefix("log Info {\"audit\"")).collect();
        let states: Vec<&str> =
            calls.iter().filter_map(|c| c.strip_prefix("set_filter_state fhir_tenant_router.audit_line=")).collect();
        if delivery == json!(true) {
            assert_eq!((logged.len(), states.len()), (2, 0), "{calls:#?}");
            lines.push(calls.iter().filter_map(|c| c.strip_prefix("log Info ")).map(String::from).collect::<Vec<_>>());
        } else {
            assert_eq!((logged.len(), states.len()), (0, 2), "{calls:#?}");
            assert!(!calls.iter().any(|c| c.starts_with("log ")), "{calls:#?}");
            lines.push(states.iter().map(|s| s.to_string()).collect());
        }
    }
    assert_eq!(lines[0], lines[1]);
    let refused: Value = serde_json::from_str(&lines[1][1]).unwrap();
    assert_eq!(refused["outcome"], "rejected");
}

// ---- Bundles judged on their body ----

fn post_base(auth: &str) -> Vec<(&'static str, String)> {
    let mut h = get("/", Some(auth));
    h[0].1 = "POST".into();
    h
}

#[test]
fn a_batch_bundle_is_held_until_its_body_is_judged() {
    let mut p = plugin();
    p["audit_log"] = json!(true);
    let (host, root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let auth = bearer(&testkeys::claims_now());
    let read = json!({"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET", "url": "Patient?name=x"}}]});
    let delete = json!({"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "DELETE", "url": "Patient/1"}}]});
    for (bundle, allowed) in [(read, true), (delete, false)] {
        let (mut f, flow) = send(&host, &root, 1, &post_base(&auth), false);
        assert_eq!(flow, Flow::Buffer, "the headers are held too: nothing reaches the upstream before the verdict");
        let calls = host.take_calls();
        assert!(!calls.iter().any(|c| c.starts_with("log Info {\"audit\"")), "the audit line waits: {calls:?}");
        *host.0.request_body.borrow_mut() = bundle.to_string().into_bytes();
        assert_eq!(f.on_request_body(5, false), Flow::Buffer);
        assert!(host.take_calls().is_empty());
        let flow = f.on_request_body(bundle.to_string().len(), true);
        let calls = host.take_calls();
        assert_eq!(calls[0], "get_request_body");
        if allowed {
            assert_eq!(flow, Flow::Continue);
            assert!(calls[1].contains("\"outcome\":\"allowed\""), "{calls:?}");
        } else {
            assert_eq!(flow, Flow::Stop);
            assert!(calls[1].starts_with("send_reply 403 ") && calls[1].contains("Bundle entry 0"), "{calls:?}");
            assert!(calls[2].contains("\"outcome\":\"forbidden\""), "{calls:?}");
        }
        f.on_done();
    }
}

/// An HTTP/2 client may end its body with a trailers frame instead of a data frame with end-of-stream: the
/// trailers hook judges the held body, and a refusal stops them (Envoy continues a stopped stream whose
/// trailers hook says continue, which would send the refused Bundle on).
#[test]
fn a_held_bundle_ended_by_trailers_is_judged_and_a_refused_one_never_goes_on() {
    let (host, root) = configured(&plugin());
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let auth = bearer(&testkeys::claims_now());
    let read = json!({"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET", "url": "Patient?name=x"}}]});
    let delete = json!({"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "DELETE", "url": "Patient/1"}}]});
    for (bundle, allowed) in [(read, true), (delete, false)] {
        let (mut f, flow) = send(&host, &root, 1, &post_base(&auth), false);
        assert_eq!(flow, Flow::Buffer);
        host.take_calls();
        *host.0.request_body.borrow_mut() = bundle.to_string().into_bytes();
        let size = bundle.to_string().len();
        assert_eq!(f.on_request_body(size, false), Flow::Buffer, "not ended: held");
        let flow = f.on_request_trailers();
        let calls = host.take_calls();
        assert_eq!(calls.first().map(String::as_str), Some("get_request_body"), "{calls:?}");
        if allowed {
            assert_eq!(flow, Flow::Continue, "{calls:?}");
        } else {
            assert_eq!(flow, Flow::Stop, "{calls:?}");
            assert!(calls.iter().any(|c| c.starts_with("send_reply 403 ")), "{calls:?}");
        }
        f.on_done();
    }
}

#[test]
fn smart_scopes_narrow_requests_and_batch_entries_with_403_insufficient_scope_naming_the_scope() {
    let mut p = plugin();
    p["audit_log"] = json!(true);
    p["tenants"][TENANT_A] = json!({"cluster": "tenant_a", "allow": {"interactions": ["read", "search", "create"]}});
    let (host, root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let mut claims = testkeys::claims_now();
    claims["scope"] = json!(format!("{TENANT_A} system/Patient.read"));
    let auth = bearer(&claims);
    // Twice: the second time the token comes from the cache, with its scopes.
    for id in [1, 2] {
        let (_f, flow) = send(&host, &root, id, &get("/Patient/1", Some(&auth)), true);
        assert_eq!(flow, Flow::Continue);
        host.take_calls();
        let (_f, flow) = send(&host, &root, 10 + id, &get("/Observation?code=x", Some(&auth)), true);
        assert_eq!(flow, Flow::Stop);
        let calls = host.take_calls();
        let www = "Bearer realm=\\\"fhir-tenant-router\\\", error=\\\"insufficient_scope\\\", scope=\\\"system/Observation.read\\\"";
        let reply = calls.iter().find(|c| c.starts_with("send_reply 403 ")).unwrap();
        assert!(reply.contains(www), "{reply}");
        assert!(reply.contains("do not grant the search interaction on Observation"), "{reply}");
        let audit = calls.iter().find(|c| c.starts_with("log Info {\"audit\"")).unwrap();
        assert!(audit.contains("\"reason\":\"insufficient_scope\""), "{audit}");
        assert!(!audit.contains("code=x"), "no query string in the audit line: {audit}");
    }
    // The allowlist allows create; the token's scopes do not, in the second entry of a batch.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/1"}},
        {"request": {"method": "POST", "url": "Patient"}, "resource": {"resourceType": "Patient"}}
    ]});
    let (mut f, flow) = send(&host, &root, 20, &post_base(&auth), false);
    assert_eq!(flow, Flow::Buffer);
    host.take_calls();
    *host.0.request_body.borrow_mut() = batch.to_string().into_bytes();
    assert_eq!(f.on_request_body(batch.to_string().len(), true), Flow::Stop);
    let calls = host.take_calls();
    let reply = calls.iter().find(|c| c.starts_with("send_reply 403 ")).unwrap();
    assert!(reply.contains("scope=\\\"system/Patient.write\\\"") && reply.contains("Bundle entry 1"), "{reply}");
    // A token without SMART scopes gets the allowlist alone: the same batch passes.
    let (mut f, _) = send(&host, &root, 21, &post_base(&bearer(&testkeys::claims_now())), false);
    host.take_calls();
    assert_eq!(f.on_request_body(batch.to_string().len(), true), Flow::Continue);
    root.on_tick_for_test();
    assert_eq!(host.metric("requests.forbidden_by_scope"), 3);
    assert_eq!(host.metric(&format!("tenant.{TENANT_A}.insufficient_scope")), 3);
    assert_eq!(host.metric(&format!("tenant.{TENANT_A}.forbidden")), 3);
    assert_eq!(host.metric("requests.forbidden_by_policy"), 0);
}

#[test]
fn a_narrowed_post_search_is_held_until_its_form_is_judged_and_headers_that_change_the_method_are_judged() {
    let mut p = plugin();
    p["tenants"][TENANT_A] = json!({"cluster": "tenant_a", "allow": {"interactions": ["read", "search", "delete"]}});
    p["tenants"][TENANT_B] = json!({"cluster": "tenant_b", "allow": {"interactions": ["read", "search", "create"]}});
    let (host, root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let mut claims = testkeys::claims_now();
    claims["scope"] = json!(format!("{TENANT_A} system/Patient.rs"));
    let auth = bearer(&claims);
    let post_search = || {
        let mut h = get("/Patient/_search", Some(&auth));
        h[0].1 = "POST".into();
        h.push(("content-type", "application/x-www-form-urlencoded".into()));
        h
    };
    for (id, form, passes) in [
        (1, "name=x&_count=5", true),
        (2, "name=x&_revinclude=Observation%3Apatient", false),
        (3, "_has%3AObservation%3Apatient%3Acode=1", false),
    ] {
        let (mut f, flow) = send(&host, &root, id, &post_search(), false);
        assert_eq!(flow, Flow::Buffer, "held whole until the form is judged");
        assert!(!host.take_calls().iter().any(|c| c.starts_with("send_reply")));
        *host.0.request_body.borrow_mut() = form.as_bytes().to_vec();
        let flow = f.on_request_body(form.len(), true);
        let calls = host.take_calls();
        if passes {
            assert_eq!(flow, Flow::Continue, "{form}");
        } else {
            assert_eq!(flow, Flow::Stop, "{form}");
            let reply = calls.iter().find(|c| c.starts_with("send_reply 403 ")).unwrap();
            assert!(reply.contains("scope=\\\"system/Observation."), "{reply}");
        }
        f.on_done();
    }
    // A form it cannot read as the server would (compressed, or in another charset) is refused.
    for (id, name, value) in
        [(4, "content-encoding", "gzip"), (5, "content-type", "application/x-www-form-urlencoded; charset=UTF-16")]
    {
        let mut h = post_search();
        h.retain(|(n, _)| *n != name);
        h.push((name, value.into()));
        let (mut f, flow) = send(&host, &root, id, &h, false);
        assert_eq!(flow, Flow::Buffer);
        host.take_calls();
        *host.0.request_body.borrow_mut() = b"name=x".to_vec();
        assert_eq!(f.on_request_body(6, true), Flow::Stop, "{name}: {value}");
        let calls = host.take_calls();
        assert!(calls.iter().any(|c| c.starts_with("send_reply 403 ") && c.contains("Content-Encoding")), "{calls:?}");
        f.on_done();
    }
    // A token without SMART scopes (and no resource_types, no search costing): no hold, as before.
    let plain = bearer(&testkeys::claims_now());
    let mut h = get("/Patient/_search", Some(&plain));
    h[0].1 = "POST".into();
    let (_f, flow) = send(&host, &root, 9, &h, false);
    assert_eq!(flow, Flow::Continue);
    host.take_calls();
    // Method override headers: judged as the method they name too.
    for (id, name, value, passes) in [
        (10, "x-http-method-override", "DELETE", false),
        (11, "x-http-method", "delete", false),
        (12, "x-method-override", "GET", true),
        (13, "x-http-method-override", "BREW", false),
    ] {
        let mut h = get("/Patient/1", Some(&auth));
        h.push((name, value.into()));
        let (_f, flow) = send(&host, &root, id, &h, true);
        assert_eq!(flow == Flow::Continue, passes, "{name}: {value}");
        host.take_calls();
    }
    let mut h = get("/Patient/1", Some(&auth));
    h.push(("x-http-method-override", "GET".into()));
    h.push(("x-method-override", "DELETE".into()));
    assert_eq!(send(&host, &root, 14, &h, true).1, Flow::Stop, "overrides that disagree");
    host.take_calls();
    // If-None-Exist makes a create a search too: its reach is judged against the scopes.
    let mut claims = testkeys::claims_now();
    claims["scope"] = json!(format!("{TENANT_B} system/Patient.cruds"));
    let writer = bearer(&claims);
    let mut h = get("/Patient", Some(&writer));
    h[0].1 = "POST".into();
    assert_eq!(send(&host, &root, 15, &h, true).1, Flow::Continue, "a plain create");
    host.take_calls();
    h.push(("if-none-exist", "_has:Observation:patient:code=1".into()));
    let (_f, flow) = send(&host, &root, 16, &h, true);
    assert_eq!(flow, Flow::Stop);
    let calls = host.take_calls();
    let reply = calls.iter().find(|c| c.starts_with("send_reply 403 ")).unwrap();
    assert!(reply.contains("scope=\\\"system/Observation.s\\\""), "{reply}");
}

#[test]
fn a_tenant_that_requires_smart_scopes_refuses_a_token_without_them() {
    let mut p = plugin();
    p["tenants"][TENANT_A] = json!({"cluster": "tenant_a", "require_smart_scopes": true});
    let (host, root) = configured(&p);
    let (_f, flow) = send(&host, &root, 1, &get("/Patient/1", Some(&bearer(&testkeys::claims_now()))), true);
    assert_eq!(flow, Flow::Stop);
    let calls = host.take_calls();
    assert!(calls.last().unwrap().contains("scope=\\\"system/Patient.read\\\""), "{calls:?}");
    let mut claims = testkeys::claims_now();
    claims["scope"] = json!([TENANT_A, "system/*.rs"]);
    let (_f, flow) = send(&host, &root, 2, &get("/Patient/1", Some(&bearer(&claims))), true);
    assert_eq!(flow, Flow::Continue);
}

/// A proxy-wasm host without `allow_on_headers_stop_iteration` delivers no body while the headers are
/// held: after 1 s the shell lets the headers go (warning once), and the body is judged when it comes.
/// Once a held request got a body, the host is proven and nothing is watched any more.
#[test]
fn a_held_bundle_that_gets_no_body_goes_on_after_a_second_with_one_warning() {
    let (host, mut root) = configured(&plugin());
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let auth = bearer(&testkeys::claims_now());
    let (mut f, flow) = send(&host, &root, 1, &post_base(&auth), false);
    assert_eq!(flow, Flow::Buffer);
    let (_g, _) = send(&host, &root, 2, &post_base(&auth), false);
    host.take_calls();
    host.0.now_ms.set(T0_MS + 999);
    root.on_tick();
    assert!(!host.take_calls().iter().any(|c| c.starts_with("set_effective_context")));
    host.0.now_ms.set(T0_MS + 1_000);
    root.on_tick();
    let calls = host.take_calls();
    let warnings: Vec<_> = calls.iter().filter(|c| c.contains("allow_on_headers_stop_iteration")).collect();
    assert_eq!(warnings.len(), 1, "{calls:?}");
    let tail = &calls[calls.len() - 4..];
    assert_eq!(tail, ["set_effective_context 1", "resume_request", "set_effective_context 2", "resume_request"]);
    root.on_tick();
    assert!(!host.take_calls().iter().any(|c| c.starts_with("set_effective_context")), "released once");
    let delete = json!({"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "DELETE", "url": "Patient/1"}}]});
    *host.0.request_body.borrow_mut() = delete.to_string().into_bytes();
    assert_eq!(f.on_request_body(delete.to_string().len(), true), Flow::Stop, "still judged");
    // A host that delivers the body proves itself: later held requests are not watched.
    let (mut h, _) = send(&host, &root, 3, &post_base(&auth), false);
    assert_eq!(h.on_request_body(5, false), Flow::Buffer);
    let (_i, _) = send(&host, &root, 4, &post_base(&auth), false);
    host.take_calls();
    host.0.now_ms.set(T0_MS + 5_000);
    root.on_tick();
    assert!(!host.take_calls().iter().any(|c| c.starts_with("set_effective_context")));
}

#[test]
fn without_hold_bundle_headers_a_bundles_headers_go_on_and_only_its_body_is_held() {
    let mut p = plugin();
    p["hold_bundle_headers"] = json!(false);
    let (host, root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let (mut f, flow) = send(&host, &root, 1, &post_base(&bearer(&testkeys::claims_now())), false);
    assert_eq!(flow, Flow::Continue);
    host.take_calls();
    let delete = json!({"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "DELETE", "url": "Patient/1"}}]});
    *host.0.request_body.borrow_mut() = delete.to_string().into_bytes();
    assert_eq!(f.on_request_body(5, false), Flow::Buffer);
    assert_eq!(f.on_request_body(delete.to_string().len(), true), Flow::Stop);
    assert!(host.take_calls().iter().any(|c| c.starts_with("send_reply 403 ")));
}

/// A Bundle whose token waited for a key set, woken before its body is complete: the wake does not let
/// its headers go; the body's end does, once judged.
#[test]
fn a_woken_bundle_stays_held_until_its_body_is_judged() {
    let (host, mut root) = configured(&remote_plugin());
    root.on_tick();
    let es_only = format!("{{\"keys\": [{}]}}", testkeys::es_public_jwk());
    deliver(&host, &mut root, 1, Some("200"), es_only.as_bytes());
    host.0.now_ms.set(T0_MS + 2_000);
    let (mut f, flow) = send(&host, &root, 7, &post_base(&bearer(&testkeys::claims_now())), false);
    assert_eq!(flow, Flow::WaitForKeys);
    assert_eq!(f.on_request_body(5, false), Flow::WaitForKeys);
    root.on_tick();
    host.take_calls();
    deliver(&host, &mut root, 2, Some("200"), testkeys::public_jwks().as_bytes());
    let calls = host.take_calls();
    assert!(calls.contains(&format!("set_request_header {ROUTE}: tenant_a")), "{calls:?}");
    assert!(!calls.contains(&"clear_route_cache".to_string()), "Envoy re-picked the route on the edit: {calls:?}");
    assert!(!calls.contains(&"resume_request".to_string()), "the body is not judged yet: {calls:?}");
    let read = json!({"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET", "url": "Patient/1"}}]});
    *host.0.request_body.borrow_mut() = read.to_string().into_bytes();
    assert_eq!(f.on_request_body(read.to_string().len(), true), Flow::Continue, "judged: body and headers go on");
    f.on_done();
}

#[test]
fn a_post_to_the_base_without_a_body_is_judged_at_once() {
    let (host, root) = configured(&plugin());
    let (_f, flow) = send(&host, &root, 1, &post_base(&bearer(&testkeys::claims_now())), true);
    assert_eq!(flow, Flow::Stop);
    assert!(host.take_calls().iter().any(|c| c.starts_with("send_reply 403 ") && c.contains("batch or transaction")));
}

// ---- keys: fetching, failing, waiting ----

fn deliver(host: &FakeHost, root: &mut Root<FakeHost>, token: u32, status: Option<&str>, body: &[u8]) {
    *host.0.call_status.borrow_mut() = status.map(str::to_string);
    *host.0.call_body.borrow_mut() = body.to_vec();
    root.on_http_call_response(token, body.len());
}

fn jwks_fetch_call() -> String {
    r#"dispatch idp [(":method", "GET"), (":path", "/jwks"), (":authority", "127.0.0.1:9000"), ("accept", "application/json")] 5000"#
        .to_string()
}

#[test]
fn before_the_first_key_set_a_token_gets_503_with_retry_after() {
    let (host, root) = configured(&remote_plugin());
    send(&host, &root, 1, &get("/Patient", Some(&bearer(&testkeys::claims_now()))), true);
    let r = Rejection::KeysUnavailable;
    assert_eq!(host.take_calls(), ["get_request_headers", &refusal(503, "retry-after: 1", r.operation_outcome())]);
}

#[test]
fn a_failed_fetch_is_retried_with_backoff_and_its_streak_logged_once_each_way() {
    let (host, mut root) = configured(&remote_plugin());
    *host.0.dispatch_error.borrow_mut() = Some("BadArgument".into());
    root.on_tick();
    assert_eq!(
        host.take_calls(),
        [
            jwks_fetch_call(),
            "log Warn JWKS fetch for http://127.0.0.1:9000 failed (could not be sent through cluster idp: \
             BadArgument); no keys yet: token requests get 503; retrying with backoff (logged once per failure \
             streak)"
                .to_string()
        ]
    );
    *host.0.dispatch_error.borrow_mut() = None;
    host.0.now_ms.set(T0_MS + 500);
    root.on_tick();
    assert!(host.take_calls().is_empty(), "backing off for 1 s");
    host.0.now_ms.set(T0_MS + 1_000);
    root.on_tick();
    assert_eq!(host.take_calls(), [jwks_fetch_call()]);
    deliver(&host, &mut root, 1, Some("500"), b"");
    assert!(host.take_calls().is_empty(), "the streak goes on: no second warning");
    host.0.now_ms.set(T0_MS + 3_000);
    root.on_tick();
    assert_eq!(host.take_calls(), [jwks_fetch_call()]);
    deliver(&host, &mut root, 2, Some("200"), testkeys::public_jwks().as_bytes());
    assert_eq!(host.take_calls(), ["log Info JWKS fetch for http://127.0.0.1:9000 recovered after 2 failed attempts"]);
    root.on_tick_for_test();
    assert_eq!((host.metric("jwks.fetch_failed"), host.metric("jwks.fetch_ok"), host.metric("jwks.keys")), (2, 1, 2));
}

/// The keys of the first fetch lack the token's kid; the request waits, its body arrives meanwhile, and a
/// refetch with the kid lets it go on.
#[test]
fn an_unknown_kid_waits_for_a_refetch_and_resumes_on_the_new_key_set() {
    let (host, mut root) = configured(&remote_plugin());
    root.on_tick();
    host.take_calls();
    let es_only = format!("{{\"keys\": [{}]}}", testkeys::es_public_jwk());
    deliver(&host, &mut root, 1, Some("200"), es_only.as_bytes());
    host.take_calls();
    host.0.now_ms.set(T0_MS + 2_000);
    let (mut f, flow) = send(&host, &root, 7, &get("/Patient", Some(&bearer(&testkeys::claims_now()))), false);
    assert_eq!(flow, Flow::WaitForKeys);
    assert_eq!(host.take_calls(), ["get_request_headers"]);
    assert_eq!(f.on_request_body(3, true), Flow::WaitForKeys, "nothing goes on while waiting");
    root.on_tick();
    assert_eq!(host.take_calls()[0], jwks_fetch_call(), "the refetch was made due at once");
    deliver(&host, &mut root, 2, Some("200"), testkeys::public_jwks().as_bytes());
    assert_eq!(
        host.take_calls(),
        [
            "set_effective_context 7",
            "call_foreign_function verify_signature",
            "log Warn the host has no verify_signature function: using the pure-Rust verifier",
            // Woken, the callback has no map read: the edits go one by one, and each makes Envoy re-pick
            // the route (no `clear_route_cache`).
            "remove_request_header authorization",
            &format!("set_request_header {TENANT}: {TENANT_A}"),
            &format!("set_request_header {ROUTE}: tenant_a"),
            "resume_request",
        ]
    );
    // The context takes its stream back: the response side works as for any request.
    assert_eq!(f.on_response_headers(true), Flow::Continue);
    f.on_done();
    assert!(root.shared().unwrap().parked.borrow().is_empty());
    root.on_tick_for_test();
    assert_eq!(host.metric("jwks.unknown_kid_refetch_waits"), 1);
}

/// A root whose first key set lacks the RS256 key, and request `id` with an RS256 token parked on it.
fn parked(id: u32) -> (FakeHost, Root<FakeHost>, Filter<FakeHost>) {
    let (host, mut root) = configured(&remote_plugin());
    root.on_tick();
    let es_only = format!("{{\"keys\": [{}]}}", testkeys::es_public_jwk());
    deliver(&host, &mut root, 1, Some("200"), es_only.as_bytes());
    host.0.now_ms.set(T0_MS + 2_000);
    let (f, flow) = send(&host, &root, id, &get("/Patient", Some(&bearer(&testkeys::claims_now()))), true);
    assert_eq!(flow, Flow::WaitForKeys);
    (host, root, f)
}

#[test]
fn a_request_that_ends_while_waiting_leaves_the_queue_at_once() {
    let (host, mut root, mut f) = parked(9);
    let shared = root.shared().unwrap().clone();
    assert_eq!(shared.router.borrow().keys.0[0].waiting, [9]);
    f.on_done();
    assert!(shared.router.borrow().keys.0[0].waiting.is_empty());
    assert!(shared.parked.borrow().is_empty());
    root.on_tick();
    host.take_calls();
    deliver(&host, &mut root, 2, Some("200"), testkeys::public_jwks().as_bytes());
    assert!(!host.take_calls().iter().any(|c| c.starts_with("set_effective_context")), "nobody to wake");
}

/// A flood of tokens naming unknown `kid`s while a refetch is pending: `jwks_max_waiting` of them wait,
/// the rest get 503 with Retry-After at once (nothing copied, nothing queued), and a waiter that ends
/// makes room.
#[test]
fn waiters_beyond_jwks_max_waiting_get_503_with_retry_after() {
    let mut p = remote_plugin();
    p["provider"]["jwks_max_waiting"] = json!(2);
    let (host, mut root) = configured(&p);
    root.on_tick();
    let es_only = format!("{{\"keys\": [{}]}}", testkeys::es_public_jwk());
    deliver(&host, &mut root, 1, Some("200"), es_only.as_bytes());
    host.0.now_ms.set(T0_MS + 2_000);
    let auth = bearer(&testkeys::claims_now());
    let (mut first, flow) = send(&host, &root, 10, &get("/Patient", Some(&auth)), true);
    assert_eq!(flow, Flow::WaitForKeys);
    root.on_tick(); // the refetch is now in flight: later unknown kids wait for it too
    let (_second, flow) = send(&host, &root, 11, &get("/Patient", Some(&auth)), true);
    assert_eq!(flow, Flow::WaitForKeys);
    host.take_calls();
    let (_third, flow) = send(&host, &root, 12, &get("/Patient", Some(&auth)), true);
    assert_eq!(flow, Flow::Stop);
    let r = Rejection::WaitQueueFull;
    assert_eq!(host.take_calls(), ["get_request_headers", &refusal(503, "retry-after: 1", r.operation_outcome())]);
    let shared = root.shared().unwrap().clone();
    assert_eq!(shared.router.borrow().keys.0[0].waiting, [10, 11]);
    first.on_done();
    let (_fourth, flow) = send(&host, &root, 13, &get("/Patient", Some(&auth)), true);
    assert_eq!(flow, Flow::WaitForKeys, "a waiter that ended made room");
    root.on_tick_for_test();
    assert_eq!(host.metric("requests.rejected.wait_queue_full"), 1);
}

#[test]
fn a_woken_request_whose_client_went_away_is_skipped() {
    let (host, mut root, _f) = parked(4);
    host.0.gone.borrow_mut().push(4);
    root.on_tick();
    host.take_calls();
    deliver(&host, &mut root, 2, Some("200"), testkeys::public_jwks().as_bytes());
    assert_eq!(host.take_calls(), ["set_effective_context 4"]);
}

// ---- the tenant registry ----

#[test]
fn a_registry_document_swaps_the_tenant_map_and_a_bad_one_keeps_the_last() {
    let mut p = plugin();
    p["tenants"] = json!({});
    p["tenant_registry"] = json!({"uri": "http://127.0.0.1:9100/tenants", "cluster": "registry"});
    let (host, mut root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let auth = bearer(&testkeys::claims_now());
    send(&host, &root, 1, &get("/Patient", Some(&auth)), true);
    assert_eq!(host.take_calls()[2], refusal(503, "retry-after: 1", Rejection::TenantsUnavailable.operation_outcome()));
    root.on_tick();
    assert!(host.take_calls()[0].starts_with("dispatch registry "));
    let doc = json!({"tenants": {TENANT_A: {"cluster": "tenant_a"}}});
    deliver(&host, &mut root, 1, Some("200"), doc.to_string().as_bytes());
    let (_f, flow) = send(&host, &root, 2, &get("/Patient", Some(&auth)), true);
    assert_eq!(flow, Flow::Continue);
    host.take_calls();
    assert_eq!(sent(&host, ROUTE), ["tenant_a"]);
    // A document that does not compile is refused whole; the last good map stays.
    host.0.now_ms.set(T0_MS + 61_000);
    root.on_tick();
    host.take_calls();
    deliver(&host, &mut root, 2, Some("200"), br#"{"tenants": {"bad id!": {"cluster": "x"}}}"#);
    let calls = host.take_calls();
    assert!(
        calls[0].starts_with(
            "log Warn tenant registry fetch failed (invalid plugin configuration: field `tenants.bad id!`"
        ),
        "{calls:?}"
    );
    assert!(calls[0].contains("keeping the last 1 tenants"), "{calls:?}");
    // The next good document replaces the map: A is gone, B is served.
    host.0.now_ms.set(T0_MS + 63_000);
    root.on_tick();
    let doc = json!({"tenants": {TENANT_B: {"cluster": "tenant_b"}}});
    deliver(&host, &mut root, 3, Some("200"), doc.to_string().as_bytes());
    host.take_calls();
    send(&host, &root, 3, &get("/Patient", Some(&auth)), true);
    let www = "www-authenticate: Bearer realm=\"fhir-tenant-router\", error=\"insufficient_scope\"";
    // A cache hit (no signature check): the cached token is judged against the new map.
    assert_eq!(
        host.take_calls(),
        ["get_request_headers".to_string(), refusal(403, www, Rejection::NoTenant.operation_outcome())]
    );
    root.on_tick_for_test();
    assert_eq!(host.metric("registry.tenants"), 1);
    assert_eq!((host.metric("registry.fetch_ok"), host.metric("registry.fetch_failed")), (2, 1));
}

#[test]
fn an_oversized_or_absent_answer_is_a_failed_fetch() {
    let (host, mut root) = configured(&remote_plugin());
    root.on_tick();
    host.take_calls();
    *host.0.call_status.borrow_mut() = Some("200".into());
    root.on_http_call_response(1, crate::jwks::MAX_JWKS_BYTES + 1);
    let calls = host.take_calls();
    assert!(calls[0].contains("failed (body larger than 262144 bytes)"), "{calls:?}");
    host.0.now_ms.set(T0_MS + 1_000);
    root.on_tick();
    host.take_calls();
    deliver(&host, &mut root, 2, None, b"");
    root.on_tick_for_test();
    assert_eq!(host.metric("jwks.fetch_failed"), 2);
    // An answer to a call nobody made is ignored.
    deliver(&host, &mut root, 99, Some("200"), b"{}");
    assert!(host.take_calls().is_empty());
}

#[test]
fn ticks_flush_the_counts_and_only_a_serving_vm_publishes_its_gauges() {
    let (host, mut root) = configured(&plugin());
    root.on_tick();
    assert_eq!(host.metric("vm.memory_bytes"), 0, "the main thread's VM serves nothing");
    send(&host, &root, 1, &get("/metadata", None), true);
    assert_eq!(host.metric("requests.public"), 0, "counted locally until the tick");
    root.on_tick();
    assert_eq!(host.metric("requests.public"), 1);
    assert_eq!(host.metric("vm.memory_bytes"), 1 << 20);
}

impl Root<FakeHost> {
    /// A tick that only flushes the stats (no fetch is due in these configurations, or it is ignored).
    fn on_tick_for_test(&self) {
        if let Some(shared) = self.shared() {
            shared.metrics.flush(&shared.host);
        }
    }
}

// ---- upstream_auth: the tenant's own access token toward its FHIR server ----

const TOKEN_URL: &str = "https://login.example/t/oauth2/v2.0/token";

fn upstream_auth_plugin() -> Value {
    let mut p = plugin();
    p["tenants"][TENANT_A] = json!({
        "cluster": "tenant_a",
        "upstream_auth": {"method": "client_secret_post", "token_url": TOKEN_URL, "cluster": "entra",
                          "client_id": "router", "client_secret": {"env": "SECRET_A"},
                          "scope": "https://fhir-a.example/.default", "max_waiting": 2}
    });
    p["audit_log"] = json!(true);
    p
}

fn configured_with_secret(plugin: &Value) -> (FakeHost, Root<FakeHost>) {
    let host = FakeHost::default();
    host.0.now_ms.set(T0_MS);
    host.0.env.borrow_mut().insert("SECRET_A".into(), "s3cret".into());
    *host.0.plugin_configuration.borrow_mut() = plugin.to_string().into_bytes();
    let mut root = Root::new(host.clone());
    assert!(root.on_configure(), "{:?}", host.take_calls());
    host.take_calls();
    (host, root)
}

fn token_answer(token: &str, expires_in: u64) -> Vec<u8> {
    json!({"access_token": token, "token_type": "Bearer", "expires_in": expires_in}).to_string().into_bytes()
}

/// The filter's own answer to a call it sent from a request's context.
fn deliver_to(host: &FakeHost, filter: &mut Filter<FakeHost>, token: u32, status: Option<&str>, body: &[u8]) {
    *host.0.call_status.borrow_mut() = status.map(str::to_string);
    *host.0.call_body.borrow_mut() = body.to_vec();
    filter.on_http_call_response(token, body.len());
}

#[test]
fn the_first_request_of_a_tenant_with_upstream_auth_waits_for_its_token_which_replaces_the_clients() {
    let (host, mut root) = configured_with_secret(&upstream_auth_plugin());
    let client = bearer(&testkeys::claims_now());
    let (mut f1, flow) = send(&host, &root, 1, &get("/Patient", Some(&client)), true);
    assert_eq!(flow, Flow::WaitForKeys);
    let calls = host.take_calls();
    let dispatch = calls.iter().find(|c| c.starts_with("dispatch entra")).expect("a token request");
    assert!(
        dispatch.contains(r#"(":method", "POST"), (":path", "/t/oauth2/v2.0/token"), (":authority", "login.example")"#)
    );
    assert!(dispatch.contains(r#"("content-type", "application/x-www-form-urlencoded")"#), "{dispatch}");
    assert!(dispatch.ends_with(
        "body=grant_type=client_credentials&client_id=router&client_secret=s3cret&scope=https%3A%2F%2Ffhir-a.example%2F.default"
    ));
    assert!(!calls.iter().any(|c| c.starts_with("set_request_header") || c.starts_with("send_reply")), "{calls:?}");
    // A second request waits for the same fetch; a third finds the queue full (503, Retry-After).
    let (_f2, flow) = send(&host, &root, 2, &get("/Patient", Some(&client)), true);
    assert_eq!(flow, Flow::WaitForKeys);
    assert!(!host.take_calls().iter().any(|c| c.starts_with("dispatch")), "one fetch in flight per tenant");
    send(&host, &root, 3, &get("/Patient", Some(&client)), true);
    let r = Rejection::UpstreamAuthUnavailable;
    assert!(host.take_calls().contains(&refusal(503, "retry-after: 1", r.operation_outcome())));
    // The token comes (to the context that asked): both waiters go on with it, never with the client's token.
    deliver_to(&host, &mut f1, 1, Some("200"), &token_answer("upstream-token-1", 3600));
    let calls = host.take_calls();
    for id in [1, 2] {
        let mine = calls.iter().skip_while(|c| **c != format!("set_effective_context {id}")).take(12);
        let mine: Vec<&String> = mine.collect();
        assert!(mine.contains(&&"set_request_header authorization: Bearer upstream-token-1".to_string()), "{calls:?}");
        assert!(mine.contains(&&"resume_request".to_string()), "{calls:?}");
    }
    assert!(!calls.iter().any(|c| c.contains(&client)));
    let audit = calls.iter().find(|c| c.contains("\"audit\"")).unwrap();
    assert!(audit.contains(r#""upstream_credential":"client_secret_post""#), "{audit}");
    assert!(!audit.contains("upstream-token-1") && !audit.contains("s3cret"));
    // Later requests use it at once.
    send(&host, &root, 4, &get("/Patient", Some(&client)), true);
    let calls = host.take_calls();
    assert_eq!(sent(&host, "authorization"), ["Bearer upstream-token-1"], "{calls:?}");
    assert!(!calls.iter().any(|c| c.starts_with("dispatch")));
    // Stats per tenant.
    root.on_tick();
    let metrics = host.0.metrics.borrow();
    let stat =
        |name: &str| metrics.get(&format!("fhir_tenant_router.tenant.{TENANT_A}.upstream_token.{name}")).copied();
    assert_eq!((stat("fetches"), stat("waits"), stat("failures")), (Some(1), Some(2), None));
}

#[test]
fn a_refused_token_request_is_logged_naming_the_tenant_and_its_waiters_get_503() {
    let (host, root) = configured_with_secret(&upstream_auth_plugin());
    let client = bearer(&testkeys::claims_now());
    let (mut f1, _) = send(&host, &root, 1, &get("/Patient", Some(&client)), true);
    host.take_calls();
    let error =
        json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."});
    deliver_to(&host, &mut f1, 1, Some("401"), error.to_string().as_bytes());
    let calls = host.take_calls();
    let log = calls.iter().find(|c| c.starts_with("log Error upstream token")).expect("an error line");
    assert!(log.contains(TENANT_A) && log.contains("invalid_client"), "{log}");
    // The description is the server's free text (it may echo the form): not logged (issue 24).
    assert!(!log.contains("AADSTS7000215"), "{log}");
    assert!(!log.contains("s3cret"), "{log}");
    let r = Rejection::UpstreamAuthUnavailable;
    assert!(calls.contains(&refusal(503, "retry-after: 1", r.operation_outcome())), "{calls:?}");
    // Within the backoff, a new request is answered 503 at once, with no new token request.
    send(&host, &root, 2, &get("/Patient", Some(&client)), true);
    let calls = host.take_calls();
    assert!(calls.contains(&refusal(503, "retry-after: 1", r.operation_outcome())), "{calls:?}");
    assert!(!calls.iter().any(|c| c.starts_with("dispatch")));
}

#[test]
fn a_token_request_that_cannot_be_sent_answers_its_waiter_at_once() {
    let (host, root) = configured_with_secret(&upstream_auth_plugin());
    *host.0.dispatch_error.borrow_mut() = Some("BadArgument".into());
    let (_f, flow) = send(&host, &root, 1, &get("/Patient", Some(&bearer(&testkeys::claims_now()))), true);
    assert_eq!(flow, Flow::WaitForKeys);
    let calls = host.take_calls();
    let log = calls.iter().find(|c| c.starts_with("log Error upstream token")).expect("an error line");
    assert!(log.contains("could not be sent through cluster entra"), "{log}");
    let r = Rejection::UpstreamAuthUnavailable;
    assert!(calls.contains(&refusal(503, "retry-after: 1", r.operation_outcome())), "{calls:?}");
}

#[test]
fn a_lost_token_request_is_given_up_after_its_timeout_and_its_waiters_answered() {
    let (host, mut root) = configured_with_secret(&upstream_auth_plugin());
    send(&host, &root, 1, &get("/Patient", Some(&bearer(&testkeys::claims_now()))), true);
    host.take_calls();
    host.0.now_ms.set(T0_MS + 6_000);
    root.on_tick();
    assert!(!host.take_calls().iter().any(|c| c.starts_with("send_reply")), "not yet: timeout 5 s + 2 s grace");
    host.0.now_ms.set(T0_MS + 7_000);
    root.on_tick();
    let calls = host.take_calls();
    assert!(calls.iter().any(|c| c.starts_with("log Error upstream token") && c.contains("no answer")), "{calls:?}");
    assert!(calls.iter().any(|c| c.starts_with("send_reply 503")), "{calls:?}");
}

#[test]
fn a_401_from_the_upstream_refreshes_the_token_once_and_sends_a_safe_request_again() {
    let (host, root) = configured_with_secret(&upstream_auth_plugin());
    let client = bearer(&testkeys::claims_now());
    let mut headers = get("/Patient?name=x", Some(&client));
    headers.push(("accept", "application/fhir+json".to_string()));
    let (mut f1, _) = send(&host, &root, 1, &headers, true);
    deliver_to(&host, &mut f1, 1, Some("200"), &token_answer("tok-1", 3600));
    host.take_calls();
    // The upstream refuses tok-1 (revoked there): the response is held and a new token asked for.
    host.0.response_headers.borrow_mut().insert(":status".into(), "401".into());
    assert_eq!(f1.on_response_headers(false), Flow::WaitForKeys);
    assert_eq!(f1.on_response_body(10, true), Flow::Buffer, "the refused answer's body is held, never sent");
    let calls = host.take_calls();
    assert!(calls.iter().any(|c| c.starts_with("dispatch entra")), "{calls:?}");
    assert!(!calls.iter().any(|c| c.starts_with("send_reply")), "{calls:?}");
    // The new token comes: the request goes again with it, with the headers it left with (kept then: Envoy
    // shows no request headers once the response has begun; the filter's own tenant and route headers
    // included, as the first request carried them), no pseudo-headers beyond :method, :path, :authority.
    host.request(&[]);
    deliver_to(&host, &mut f1, 2, Some("200"), &token_answer("tok-2", 3600));
    let calls = host.take_calls();
    let resend = calls.iter().find(|c| c.starts_with("dispatch tenant_a")).expect("sent again");
    assert_eq!(
        resend,
        r#"dispatch tenant_a [(":method", "GET"), (":path", "/Patient?name=x"), (":authority", "fhir.example"), ("accept", "application/fhir+json"), ("x-fhir-tenant-id", "6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f"), ("x-fhir-tenant-router-cluster", "tenant_a"), ("authorization", "Bearer tok-2")] 15000"#
    );
    // Its answer is the client's.
    *host.0.call_headers.borrow_mut() = vec![
        (":status".into(), "200".into()),
        ("content-type".into(), "application/fhir+json".into()),
        ("content-length".into(), "27".into()),
    ];
    deliver_to(&host, &mut f1, 3, Some("200"), br#"{"resourceType":"Bundle"}"#);
    let calls = host.take_calls();
    assert!(
        calls.contains(
            &r#"send_reply 200 [("content-type", "application/fhir+json")] {"resourceType":"Bundle"}"#.to_string()
        ),
        "{calls:?}"
    );
    root.shared().unwrap().metrics.flush(&host);
    let stat = |name: &str| {
        host.0.metrics.borrow().get(&format!("fhir_tenant_router.tenant.{TENANT_A}.upstream_token.{name}")).copied()
    };
    assert_eq!((stat("retries"), stat("fetches")), (Some(1), Some(2)));
}

#[test]
fn the_answer_to_a_narrowed_request_sent_again_is_checked_too() {
    let (host, root) = configured_with_secret(&upstream_auth_plugin());
    let mut claims = testkeys::claims_now();
    claims["scope"] = json!(format!("{TENANT_A} system/Patient.rs"));
    let (mut f1, _) = send(&host, &root, 1, &get("/Patient?name=x", Some(&bearer(&claims))), true);
    deliver_to(&host, &mut f1, 1, Some("200"), &token_answer("tok-1", 3600));
    host.0.response_headers.borrow_mut().insert(":status".into(), "401".into());
    assert_eq!(f1.on_response_headers(false), Flow::WaitForKeys);
    host.request(&[]);
    deliver_to(&host, &mut f1, 2, Some("200"), &token_answer("tok-2", 3600));
    host.take_calls();
    // The answer to the request sent again holds an Observation: the client gets a 403 OperationOutcome.
    *host.0.call_headers.borrow_mut() =
        vec![(":status".into(), "200".into()), ("content-type".into(), "application/fhir+json".into())];
    let body = json!({"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Observation"}}]});
    deliver_to(&host, &mut f1, 3, Some("200"), body.to_string().as_bytes());
    let calls = host.take_calls();
    let reply = calls.iter().find(|c| c.starts_with("send_reply")).expect("answered");
    assert!(reply.starts_with("send_reply 403 ") && reply.contains("OperationOutcome"), "{calls:?}");
    assert!(!reply.contains("\"Observation\""), "{reply}");
}

#[test]
fn a_second_401_or_an_unsafe_method_is_not_sent_again() {
    let (host, root) = configured_with_secret(&upstream_auth_plugin());
    let client = bearer(&testkeys::claims_now());
    let (mut f1, _) = send(&host, &root, 1, &get("/Patient", Some(&client)), true);
    deliver_to(&host, &mut f1, 1, Some("200"), &token_answer("tok-1", 3600));
    host.0.response_headers.borrow_mut().insert(":status".into(), "401".into());
    assert_eq!(f1.on_response_headers(true), Flow::WaitForKeys);
    deliver_to(&host, &mut f1, 2, Some("200"), &token_answer("tok-2", 3600));
    host.take_calls();
    deliver_to(&host, &mut f1, 3, Some("401"), b"");
    let calls = host.take_calls();
    let r = Rejection::UpstreamAuthUnavailable;
    assert!(calls.contains(&refusal(503, "retry-after: 1", r.operation_outcome())), "{calls:?}");
    assert!(calls.iter().any(|c| c.starts_with("log Error") && c.contains("refused a new token too")), "{calls:?}");
    // A POST is never sent again: its 401 goes to the client as it is.
    let mut p = upstream_auth_plugin();
    p["tenants"][TENANT_A]["allow"] = json!({"interactions": ["create", "read"]});
    let (host, root) = configured_with_secret(&p);
    let post = vec![
        (":method", "POST".to_string()),
        (":path", "/Patient".to_string()),
        (":authority", "fhir.example".to_string()),
        ("authorization", client.clone()),
    ];
    let (mut f, _) = send(&host, &root, 1, &post, false);
    deliver_to(&host, &mut f, 1, Some("200"), &token_answer("tok-1", 3600));
    host.0.response_headers.borrow_mut().insert(":status".into(), "401".into());
    assert_eq!(f.on_response_headers(true), Flow::Continue);
}

#[test]
fn a_token_due_for_renewal_is_renewed_from_the_timer_while_requests_go_on_with_it() {
    let (host, mut root) = configured_with_secret(&upstream_auth_plugin());
    let client = bearer(&testkeys::claims_now());
    let (mut f1, _) = send(&host, &root, 1, &get("/Patient", Some(&client)), true);
    deliver_to(&host, &mut f1, 1, Some("200"), &token_answer("tok-1", 100));
    f1.on_done();
    host.take_calls();
    // 80 % of the 89 s it is used: a request finds it due, goes on with it, and sends nothing itself (its
    // own call could die with it).
    host.0.now_ms.set(T0_MS + 71_300);
    let (mut f2, _) = send(&host, &root, 2, &get("/Patient", Some(&client)), true);
    let calls = host.take_calls();
    assert_eq!(sent(&host, "authorization"), ["Bearer tok-1"], "{calls:?}");
    assert!(!calls.iter().any(|c| c.starts_with("dispatch")), "{calls:?}");
    f2.on_done();
    // The timer sends the renewal; its answer comes to the root context.
    root.on_tick();
    let calls = host.take_calls();
    assert_eq!(calls.iter().filter(|c| c.starts_with("dispatch entra")).count(), 1, "{calls:?}");
    root.on_tick();
    assert!(!host.take_calls().iter().any(|c| c.starts_with("dispatch")), "once");
    *host.0.call_status.borrow_mut() = Some("200".into());
    *host.0.call_body.borrow_mut() = token_answer("tok-2", 100);
    root.on_http_call_response(2, token_answer("tok-2", 100).len());
    host.take_calls();
    send(&host, &root, 3, &get("/Patient", Some(&client)), true);
    host.take_calls();
    assert_eq!(sent(&host, "authorization"), ["Bearer tok-2"]);
    root.on_tick();
    let metrics = host.0.metrics.borrow();
    assert_eq!(metrics.get(&format!("fhir_tenant_router.tenant.{TENANT_A}.upstream_token.refreshes")), Some(&1));
}

// ---- quotas: buckets in the host's shared data ----

fn quota_plugin(quota: Value) -> Value {
    let mut p = plugin();
    p["quota"] = quota;
    p
}

fn quota_key() -> String {
    format!("ftr.quota.{TENANT_A}")
}

/// The tenant's bucket as the shared data holds it.
fn bucket(host: &FakeHost) -> crate::quota::Bucket {
    let shared = host.0.shared.borrow();
    crate::quota::Bucket::decode(&shared.get(&quota_key()).unwrap().0).unwrap()
}

#[test]
fn a_tenant_over_its_quota_gets_429_with_retry_after_and_passes_again_after_the_refill() {
    let (host, root) = configured(&quota_plugin(json!({"rate_per_s": 1, "burst": 2})));
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let auth = bearer(&testkeys::claims_now());
    let key = quota_key();
    for id in 1..=2 {
        let (_f, flow) = send(&host, &root, id, &get("/Patient", Some(&auth)), true);
        assert_eq!(flow, Flow::Continue);
        let calls = host.take_calls();
        // The bucket was created at configuration (cas 1): every request's write is compared.
        let cas = id;
        let at = calls.iter().position(|c| c.starts_with("get_shared_data")).unwrap();
        assert_eq!(calls[at..at + 2], [format!("get_shared_data {key}"), format!("set_shared_data {key} cas={cas}")]);
        assert_eq!(sent(&host, ROUTE), ["tenant_a"], "{calls:?}");
    }
    let (_f, flow) = send(&host, &root, 3, &get("/Patient", Some(&auth)), true);
    assert_eq!(flow, Flow::Stop);
    let calls = host.take_calls();
    let body = r#"{"issue":[{"code":"throttled","diagnostics":"Tenant quota exceeded: rate 1/s, burst 2. Retry after the time in Retry-After.","severity":"error"}],"resourceType":"OperationOutcome"}"#;
    assert_eq!(
        calls[1..],
        [
            format!("get_shared_data {key}"),
            format!(
                "send_reply 429 {:?} {body}",
                [("content-type", "application/fhir+json"), ("cache-control", "no-store"), ("retry-after", "1")]
            ),
        ],
        "a refusal stores nothing and never routes"
    );
    host.0.now_ms.set(T0_MS + 1_000);
    let (_f, flow) = send(&host, &root, 4, &get("/Patient", Some(&auth)), true);
    assert_eq!(flow, Flow::Continue, "one unit came back after a second");
    root.on_tick_for_test();
    assert_eq!(host.metric(&format!("tenant.{TENANT_A}.quota.allowed")), 3);
    assert_eq!(host.metric(&format!("tenant.{TENANT_A}.quota.limited")), 1);
    assert_eq!(host.metric("requests.rejected.quota_rate"), 1);
    assert_eq!(host.metric(&format!("tenant.{TENANT_A}.allowed")), 3);
}

#[test]
fn every_known_tenants_bucket_is_created_before_its_first_request_so_no_request_writes_unconditionally() {
    // Envoy's shared data has no create-if-absent: a CAS of 0 overwrites. Two workers' first requests for a
    // tenant would both read "absent" and both write, the later one erasing the other's charge and slot.
    let plugin = quota_plugin(json!({"max_in_flight": 2}));
    let host = FakeHost::default();
    host.0.now_ms.set(T0_MS);
    *host.0.plugin_configuration.borrow_mut() = plugin.to_string().into_bytes();
    let mut main_vm = Root::new(host.clone());
    assert!(main_vm.on_configure());
    let mut created: Vec<String> = host.take_calls().into_iter().filter(|c| c.starts_with("set_shared_data")).collect();
    created.sort();
    let mut expected = [TENANT_A, TENANT_B].map(|t| format!("set_shared_data ftr.quota.{t} cas=0"));
    expected.sort();
    assert_eq!(created, expected);
    // A worker's VM configured next finds them: it writes nothing, so it cannot erase a charge.
    let mut worker = Root::new(host.clone());
    assert!(worker.on_configure());
    assert!(!host.take_calls().iter().any(|c| c.starts_with("set_shared_data")));
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let auth = bearer(&testkeys::claims_now());
    let mut held = Vec::new();
    for (id, vm) in [(1, &main_vm), (2, &worker)] {
        let (f, flow) = send(&host, vm, id, &get("/Patient", Some(&auth)), true);
        assert_eq!(flow, Flow::Continue);
        let writes: Vec<String> = host.take_calls().into_iter().filter(|c| c.starts_with("set_shared_data")).collect();
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert!(!writes[0].ends_with(" cas=0"), "a request's write is always compared: {writes:?}");
        held.push(f);
    }
    assert_eq!(bucket(&host).in_flight, 2);
    let (_f, flow) = send(&host, &worker, 3, &get("/Patient", Some(&auth)), true);
    assert_eq!(flow, Flow::Stop, "the third request of the process is refused");
}

/// A registry document may name only the VM variables `tenant_registry.secret_scope` allows: one naming another
/// (here the operator's own key) is refused whole, the warning names the field and never the value, and the
/// last map keeps serving with its in-scope header.
#[test]
fn a_registry_document_naming_a_variable_outside_the_secret_scope_is_refused_and_the_last_map_kept() {
    let mut p = plugin();
    p["tenants"] = json!({});
    p["tenant_registry"] = json!({"uri": "http://127.0.0.1:9100/tenants", "cluster": "registry",
                                  "secret_scope": {"env_prefixes": ["REG_"]}});
    let host = FakeHost::default();
    host.0.now_ms.set(T0_MS);
    host.0.env.borrow_mut().insert("REG_KEY_A".into(), "in-scope-a".into());
    host.0.env.borrow_mut().insert("OPERATOR_KEY".into(), "operator-canary".into());
    *host.0.plugin_configuration.borrow_mut() = p.to_string().into_bytes();
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let mut root = Root::new(host.clone());
    assert!(root.on_configure());
    root.on_tick();
    host.take_calls();
    let header = |env: &str| json!({"cluster": "tenant_a", "upstream_header": {"name": "x-api-key", "env": env}});
    let doc = json!({"tenants": {TENANT_A: header("REG_KEY_A")}});
    deliver(&host, &mut root, 1, Some("200"), doc.to_string().as_bytes());
    host.take_calls();
    let auth = bearer(&testkeys::claims_now());
    send(&host, &root, 1, &get("/Patient", Some(&auth)), true);
    host.take_calls();
    assert_eq!(sent(&host, "x-api-key"), ["in-scope-a"]);
    host.0.now_ms.set(T0_MS + 61_000);
    root.on_tick();
    host.take_calls();
    let doc = json!({"tenants": {TENANT_A: header("REG_KEY_A"), TENANT_B: header("OPERATOR_KEY")}});
    deliver(&host, &mut root, 2, Some("200"), doc.to_string().as_bytes());
    let calls = host.take_calls();
    let field = format!("tenants.{TENANT_B}.upstream_header.env");
    assert!(calls[0].starts_with("log Warn tenant registry fetch failed") && calls[0].contains(&field), "{calls:?}");
    assert!(calls[0].contains("secret_scope") && calls[0].contains("keeping the last 1 tenants"), "{calls:?}");
    assert!(!calls.iter().any(|c| c.contains("operator-canary") || c.contains("OPERATOR_KEY")), "{calls:?}");
    // B stays unknown; A is served as before.
    let claims_b = {
        let mut c = testkeys::claims_now();
        c["scope"] = json!(TENANT_B);
        c
    };
    send(&host, &root, 2, &get("/Patient", Some(&bearer(&claims_b))), true);
    let calls = host.take_calls();
    assert!(calls.iter().any(|c| c.starts_with("send_reply 403")), "{calls:?}");
    assert!(!calls.iter().any(|c| c.contains("operator-canary")), "{calls:?}");
    send(&host, &root, 3, &get("/Patient", Some(&auth)), true);
    host.take_calls();
    assert_eq!(sent(&host, "x-api-key"), ["in-scope-a"]);
}

#[test]
fn a_registry_install_creates_the_buckets_of_its_new_tenants_only() {
    let mut p = quota_plugin(json!({"rate_per_s": 5, "burst": 5}));
    p["tenants"] = json!({});
    p["tenant_registry"] = json!({"uri": "http://127.0.0.1:9100/tenants", "cluster": "registry"});
    let (host, mut root) = configured(&p);
    root.on_tick();
    host.take_calls();
    let doc = json!({"tenants": {TENANT_A: {"cluster": "tenant_a"}}});
    deliver(&host, &mut root, 1, Some("200"), doc.to_string().as_bytes());
    let writes = |host: &FakeHost| -> Vec<String> {
        host.take_calls().into_iter().filter(|c| c.starts_with("set_shared_data")).collect()
    };
    assert_eq!(writes(&host), [format!("set_shared_data ftr.quota.{TENANT_A} cas=0")]);
    assert_eq!(bucket(&host).tokens, 5 * crate::quota::SCALE);
    // The next document adds B: only B's bucket is looked at and created.
    host.0.now_ms.set(T0_MS + 61_000);
    root.on_tick();
    host.take_calls();
    let doc = json!({"tenants": {TENANT_A: {"cluster": "tenant_a"}, TENANT_B: {"cluster": "tenant_b"}}});
    deliver(&host, &mut root, 2, Some("200"), doc.to_string().as_bytes());
    let calls = host.take_calls();
    assert!(!calls.iter().any(|c| c.contains(&format!("shared_data ftr.quota.{TENANT_A}"))), "{calls:?}");
    assert!(calls.contains(&format!("set_shared_data ftr.quota.{TENANT_B} cas=0")), "{calls:?}");
}

#[test]
fn a_lost_compare_and_swap_is_retried_and_endless_contention_lets_the_request_through_uncharged() {
    let (host, root) = configured(&quota_plugin(json!({"rate_per_s": 1, "burst": 5, "max_in_flight": 10})));
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let auth = bearer(&testkeys::claims_now());
    host.0.shared_conflicts.set(2);
    let (mut f, flow) = send(&host, &root, 1, &get("/Patient", Some(&auth)), true);
    assert_eq!(flow, Flow::Continue);
    let writes = host.take_calls().iter().filter(|c| c.starts_with("set_shared_data")).count();
    assert_eq!(writes, 3, "two lost writes, then one that lands");
    assert_eq!((bucket(&host).tokens, bucket(&host).in_flight), (4 * crate::quota::SCALE, 1));
    host.0.shared_conflicts.set(crate::quota::ADMIT_ATTEMPTS as u32);
    let (mut g, flow) = send(&host, &root, 2, &get("/Patient", Some(&auth)), true);
    assert_eq!(flow, Flow::Continue, "contention alone never refuses");
    assert_eq!(bucket(&host).in_flight, 1, "the uncharged request holds no slot");
    g.on_done();
    assert_eq!(bucket(&host).in_flight, 1, "and gives none back");
    host.0.shared_conflicts.set(3);
    f.on_done();
    assert_eq!(bucket(&host).in_flight, 0, "a release retries until it lands");
    root.on_tick_for_test();
    assert_eq!(host.metric("quota.unchecked"), 1);
}

#[test]
fn without_shared_data_requests_pass_uncharged_with_one_warning() {
    let (host, root) = configured(&quota_plugin(json!({"rate_per_s": 1, "burst": 1})));
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    host.0.no_shared_data.set(true);
    let auth = bearer(&testkeys::claims_now());
    for id in 1..=3 {
        let (_f, flow) = send(&host, &root, id, &get("/Patient", Some(&auth)), true);
        assert_eq!(flow, Flow::Continue);
    }
    let warnings = host.take_calls().into_iter().filter(|c| c.starts_with("log Warn quota:")).count();
    assert_eq!(warnings, 1);
}

#[test]
fn in_flight_slots_are_taken_on_admission_and_given_back_once_when_the_stream_ends() {
    let (host, root) = configured(&quota_plugin(json!({"max_in_flight": 1})));
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let auth = bearer(&testkeys::claims_now());
    let (mut first, flow) = send(&host, &root, 1, &get("/Patient", Some(&auth)), true);
    assert_eq!(flow, Flow::Continue);
    let (mut second, flow) = send(&host, &root, 2, &get("/Patient", Some(&auth)), true);
    assert_eq!(flow, Flow::Stop);
    let calls = host.take_calls();
    let reply = calls.iter().find(|c| c.starts_with("send_reply 429")).unwrap();
    assert!(reply.contains("at most 1 requests in flight") && reply.contains("(\"retry-after\", \"1\")"), "{reply}");
    second.on_done();
    assert_eq!(bucket(&host).in_flight, 1, "a refused request held no slot");
    first.on_done();
    first.on_done();
    assert_eq!(bucket(&host).in_flight, 0, "given back once");
    // A request answered locally after its admission (a Bundle refused by the allowlist is judged before
    // it is charged; a waiting request reset by its client) gives its slot back too.
    let (mut third, flow) = send(&host, &root, 3, &get("/Patient", Some(&auth)), true);
    assert_eq!(flow, Flow::Continue);
    assert_eq!(bucket(&host).in_flight, 1);
    third.on_done();
    assert_eq!(bucket(&host).in_flight, 0);
    root.on_tick_for_test();
    assert_eq!(host.metric("requests.rejected.quota_in_flight"), 1);
}

#[test]
fn a_bundle_costs_one_unit_per_entry_charged_before_anything_goes_on() {
    let (host, root) = configured(&quota_plugin(json!({"rate_per_s": 0.001, "burst": 3})));
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let auth = bearer(&testkeys::claims_now());
    let entry = json!({"request": {"method": "GET", "url": "Patient?name=x"}});
    let bundle = |n: usize| json!({"resourceType": "Bundle", "type": "batch", "entry": vec![entry.clone(); n]});
    // 4 entries cost more than the burst: never admitted, so 400 (too-costly) and no Retry-After.
    for (id, entries, passes) in [(1, 4, false), (2, 2, true), (3, 2, false), (4, 1, true)] {
        let (mut f, flow) = send(&host, &root, id, &post_base(&auth), false);
        assert_eq!(flow, Flow::Buffer, "held whole: the cost is known from the body");
        assert!(!host.take_calls().iter().any(|c| c.contains("shared_data")), "not charged before its body");
        let body = bundle(entries).to_string();
        *host.0.request_body.borrow_mut() = body.clone().into_bytes();
        let flow = f.on_request_body(body.len(), true);
        let calls = host.take_calls();
        if passes {
            assert_eq!(flow, Flow::Continue, "{entries} entries");
        } else {
            assert_eq!(flow, Flow::Stop, "{entries} entries");
            let status = if entries > 3 { "send_reply 400" } else { "send_reply 429" };
            assert!(calls.iter().any(|c| c.starts_with(status)), "{calls:?}");
            if entries > 3 {
                assert!(!calls.iter().any(|c| c.contains("retry-after")), "{calls:?}");
                assert!(calls.iter().any(|c| c.contains("too-costly")), "{calls:?}");
            }
        }
        f.on_done();
    }
    assert_eq!(bucket(&host).tokens / crate::quota::SCALE, 0);
}

#[test]
fn a_search_may_cost_more_with_a_large_count() {
    let (host, root) =
        configured(&quota_plugin(json!({"rate_per_s": 0.001, "burst": 10, "search_count_per_unit": 50})));
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let auth = bearer(&testkeys::claims_now());
    let (_f, flow) = send(&host, &root, 1, &get("/Observation?_count=400", Some(&auth)), true);
    assert_eq!(flow, Flow::Continue);
    assert_eq!(bucket(&host).tokens / crate::quota::SCALE, 2, "400 / 50 = 8 units");
    let (_f, flow) = send(&host, &root, 2, &get("/Observation?_count=150", Some(&auth)), true);
    assert_eq!(flow, Flow::Stop, "3 units, 2 left");
}

#[test]
fn a_tenant_may_have_its_own_quota_or_none_and_the_rate_limit_descriptor_header_is_the_filters() {
    let mut p = quota_plugin(json!({"rate_per_s": 0.001, "burst": 1}));
    p["tenants"][TENANT_B] = json!({"cluster": "tenant_b", "quota": {"unlimited": true}});
    p["rate_limit_descriptor_header"] = json!("x-ftr-tenant");
    let (host, root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let mut claims_b = testkeys::claims_now();
    claims_b["scope"] = json!(TENANT_B);
    let auth_b = bearer(&claims_b);
    for id in 1..=3 {
        let mut headers = get("/Patient", Some(&auth_b));
        headers.push(("x-ftr-tenant", TENANT_A.into()));
        let (_f, flow) = send(&host, &root, id, &headers, true);
        assert_eq!(flow, Flow::Continue);
        let calls = host.take_calls();
        assert!(!calls.iter().any(|c| c.contains("shared_data")), "{calls:?}");
        assert_eq!(sent(&host, "x-ftr-tenant"), [TENANT_B], "the client's copy gone: {calls:?}");
    }
    let auth_a = bearer(&testkeys::claims_now());
    assert_eq!(send(&host, &root, 4, &get("/Patient", Some(&auth_a)), true).1, Flow::Continue);
    assert_eq!(send(&host, &root, 5, &get("/Patient", Some(&auth_a)), true).1, Flow::Stop);
}

#[test]
fn a_large_rate_quota_leases_units_so_most_requests_make_no_shared_data_call() {
    let (host, root) = configured(&quota_plugin(json!({"rate_per_s": 1000, "burst": 100})));
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let auth = bearer(&testkeys::claims_now());
    let mut shared_calls = Vec::new();
    for id in 1..=7 {
        let (_f, flow) = send(&host, &root, id, &get("/Patient", Some(&auth)), true);
        assert_eq!(flow, Flow::Continue);
        shared_calls.push(host.take_calls().iter().filter(|c| c.contains("shared_data")).count());
    }
    // min(100, 1000) / 20 = 5 units leased with the first charge: the next five are served from them.
    assert_eq!(shared_calls, [2, 0, 0, 0, 0, 0, 2]);
    assert_eq!(bucket(&host).tokens / crate::quota::SCALE, 100 - 12);
    root.on_tick_for_test();
    assert_eq!(host.metric(&format!("tenant.{TENANT_A}.quota.allowed")), 7);
}

// ---- configuration from discovery (issue 25) ----

fn discovery_call(path: &str) -> String {
    format!(
        r#"dispatch idp [(":method", "GET"), (":path", "{path}"), (":authority", "127.0.0.1:9000"), ("accept", "application/json")] 5000"#
    )
}

/// The document's answer dispatches the key set's fetch at once (the root applies the fetches the core asks
/// for while it takes an answer); a document whose jwks_uri leaves the IdP's host dispatches nothing.
#[test]
fn a_discovery_documents_answer_dispatches_the_key_set_fetch_it_names() {
    let mut p = plugin();
    p["provider"] = json!({"issuer": testkeys::ISSUER, "audiences": [testkeys::AUDIENCE], "jwks_cluster": "idp"});
    let (host, mut root) = configured(&p);
    root.on_tick();
    assert_eq!(host.take_calls(), [discovery_call("/.well-known/openid-configuration")]);
    let doc = json!({"issuer": testkeys::ISSUER, "jwks_uri": "http://127.0.0.1:9000/oauth2/v1/keys"});
    deliver(&host, &mut root, 1, Some("200"), doc.to_string().as_bytes());
    assert_eq!(host.take_calls(), [discovery_call("/oauth2/v1/keys")]);
    deliver(&host, &mut root, 2, Some("200"), testkeys::public_jwks().as_bytes());
    host.take_calls();
    let (_f, flow) = send(&host, &root, 7, &get("/Patient", Some(&bearer(&testkeys::claims_now()))), true);
    assert_eq!(flow, Flow::Continue);
    host.take_calls();
    // At the next refresh the document names keys elsewhere: nothing is fetched, the keys in force stay.
    host.0.now_ms.set(T0_MS + 300_000);
    root.on_tick();
    assert_eq!(host.take_calls(), [discovery_call("/.well-known/openid-configuration")]);
    let doc = json!({"issuer": testkeys::ISSUER, "jwks_uri": "http://127.0.0.2:9000/oauth2/v1/keys"});
    deliver(&host, &mut root, 3, Some("200"), doc.to_string().as_bytes());
    let calls = host.take_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(
        calls[0].starts_with("log Warn JWKS fetch for http://127.0.0.1:9000 failed (discovery document "),
        "{calls:?}"
    );
    assert!(calls[0].contains("keeping the last 2 keys") && !calls[0].contains("127.0.0.2"), "{calls:?}");
    let (_f, flow) = send(&host, &root, 8, &get("/Patient", Some(&bearer(&testkeys::claims_now()))), true);
    assert_eq!(flow, Flow::Continue);
}

#[test]
fn decision_metadata_sets_the_same_filter_state_names_as_the_dynamic_module_and_no_metadata() {
    let mut p = plugin();
    p["decision_metadata"] = json!(true);
    p["access_log_filter_state"] = json!(true);
    let (host, root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    send(&host, &root, 1, &get("/Patient?name=Zzyzx", Some(&bearer(&testkeys::claims_now()))), true);
    let calls = host.take_calls();
    let states: Vec<&String> = calls.iter().filter(|c| c.starts_with("set_filter_state ")).collect();
    // proxy_set_property(k) is filter state `wasm.k`: the names Envoy shows are the dynamic module's.
    assert_eq!(
        states,
        [
            &format!("set_filter_state fhir_tenant_router.tenant={TENANT_A}"),
            "set_filter_state fhir_tenant_router.client_id=patients-app-a",
            &format!("set_filter_state fhir_tenant_router.issuer={}", testkeys::ISSUER),
            "set_filter_state fhir_tenant_router.interaction=search",
            "set_filter_state fhir_tenant_router.resource_type=Patient",
            "set_filter_state fhir_tenant_router.outcome=allowed",
        ],
        "{calls:#?}"
    );
    assert!(!calls.iter().any(|c| c.contains("Zzyzx")), "{calls:#?}");
    // Refused: the reason, and nothing about a tenant no token named.
    send(&host, &root, 2, &get("/Patient", None), true);
    let calls = host.take_calls();
    let states: Vec<&String> = calls.iter().filter(|c| c.starts_with("set_filter_state ")).collect();
    assert_eq!(
        states,
        [
            "set_filter_state fhir_tenant_router.interaction=search",
            "set_filter_state fhir_tenant_router.resource_type=Patient",
            "set_filter_state fhir_tenant_router.outcome=rejected",
            "set_filter_state fhir_tenant_router.reason=missing_token",
        ],
        "{calls:#?}"
    );
}

#[test]
fn span_tags_are_filter_state_for_the_tracers_custom_tags_with_the_verify_time_from_the_host_clock() {
    let mut p = plugin();
    p["span_tags"] = json!(true);
    let (host, root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    send(&host, &root, 1, &get("/Patient?name=Zzyzx", Some(&bearer(&testkeys::claims_now()))), true);
    let calls = host.take_calls();
    let states: Vec<&String> = calls.iter().filter(|c| c.starts_with("set_filter_state ") || *c == "now_ns").collect();
    // The clock read before and after the check (1,500 ns apart in the fake); then the tags, as the filter
    // state `wasm.fhir_tenant_router.<key>` a `%FILTER_STATE(...:PLAIN)%` custom tag reads.
    assert_eq!(
        states,
        [
            "now_ns",
            "now_ns",
            &format!("set_filter_state fhir_tenant_router.tenant={TENANT_A}"),
            "set_filter_state fhir_tenant_router.client_id=patients-app-a",
            &format!("set_filter_state fhir_tenant_router.issuer={}", testkeys::ISSUER),
            "set_filter_state fhir_tenant_router.interaction=search",
            "set_filter_state fhir_tenant_router.resource_type=Patient",
            "set_filter_state fhir_tenant_router.outcome=allowed",
            "set_filter_state fhir_tenant_router.verify_ns=1500",
        ],
        "{calls:#?}"
    );
    assert!(!calls.iter().any(|c| c.contains("Zzyzx")), "{calls:#?}");
    // Without the option: no clock read, no tag.
    let (host, root) = configured(&plugin());
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    send(&host, &root, 1, &get("/Patient", Some(&bearer(&testkeys::claims_now()))), true);
    let calls = host.take_calls();
    assert!(!calls.iter().any(|c| c == "now_ns" || c.contains("verify_ns")), "{calls:#?}");
}

#[test]
fn the_audit_event_names_the_clients_ip_from_one_property_read_only_with_the_option() {
    let mut p = plugin();
    p["audit_event"] = json!(true);
    let (host, root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    *host.0.source_address.borrow_mut() = Some("10.1.2.3:40000".into());
    send(&host, &root, 1, &get("/Patient/1", Some(&bearer(&testkeys::claims_now()))), true);
    let calls = host.take_calls();
    assert_eq!(calls.iter().filter(|c| *c == "get_property source.address").count(), 1, "{calls:#?}");
    let event = calls
        .iter()
        .find_map(|c| c.strip_prefix("set_filter_state fhir_tenant_router.audit_event="))
        .expect("an event");
    let event: Value = serde_json::from_str(event).unwrap();
    assert_eq!(event["agent"][0]["network"], json!({"address": "10.1.2.3", "type": "2"}), "{event}");
    assert!(!event.to_string().contains("40000"), "no port: {event}");
    let (host, root) = configured(&plugin());
    send(&host, &root, 1, &get("/Patient/1", Some(&bearer(&testkeys::claims_now()))), true);
    assert!(!host.take_calls().iter().any(|c| c.contains("source.address")));
}

// ---- issue 26: what a cache hit asks of the host, with the filter's defaults ----

#[test]
fn a_cache_hit_with_the_defaults_makes_these_host_calls_and_no_more() {
    let mut p = plugin();
    p.as_object_mut().unwrap().remove("audit_log"); // its default: on
    let (host, root) = configured(&p);
    let auth = bearer(&testkeys::claims_now());
    let mut per_request = Vec::new();
    for id in 1..=3 {
        let (mut f, flow) = send(&host, &root, id, &get("/Patient?family=x", Some(&auth)), true);
        assert_eq!(flow, Flow::Continue);
        host.0.response_headers.borrow_mut().insert(":status".into(), "200".into());
        assert_eq!(f.on_response_headers(true), Flow::Continue);
        f.on_done();
        per_request.push(host.take_calls());
    }
    // A cache hit (the third request: the first filled the cache) with the defaults (the audit line on): one
    // header-map read, three header edits (Envoy re-picks the route on them: no `clear_route_cache`) and the
    // audit line; the clock (not recorded by the fake) once; no metric call (the counts are kept in the VM and
    // handed over on the tick), nothing on the response or at the end: 6 host calls (7 with the foreign
    // call). `bench/README.md` ("Host calls per request") compares it with the do-nothing filter's zero.
    let calls = &per_request[2];
    let (audit, edits) = calls.split_last().unwrap();
    assert_eq!(
        edits,
        [
            "get_request_headers",
            "remove_request_header authorization",
            &format!("set_request_header {TENANT}: {TENANT_A}"),
            &format!("set_request_header {ROUTE}: tenant_a"),
        ]
    );
    assert!(audit.starts_with("log Info {\"audit\""), "{audit}");
    assert_eq!(host.metric("requests.allowed"), 0, "counted per request, not on the tick");
    root.on_tick_for_test();
    assert_eq!(host.metric("requests.allowed"), 3);
}

/// Envoy's wasm host without `allow_on_headers_stop_iteration` never delivers the body of an answer whose
/// headers a filter paused on: with `hold_bundle_headers: false` a narrowed answer's headers go on, only its
/// body is held, and a refused body is never handed back to the host (the reply becomes Envoy's reset).
#[test]
fn without_hold_bundle_headers_a_narrowed_answers_headers_go_on_and_a_refused_body_never_leaves() {
    let mut p = plugin();
    p["hold_bundle_headers"] = json!(false);
    let (host, root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let mut claims = testkeys::claims_now();
    claims["scope"] = json!(format!("{TENANT_A} system/Patient.rs"));
    for (types, refused) in [(vec!["Patient"], false), (vec!["Patient", "Observation"], true)] {
        let (mut f, flow) = send(&host, &root, 1, &get("/Patient?name=x", Some(&bearer(&claims))), true);
        assert_eq!(flow, Flow::Continue);
        host.0.response_headers.borrow_mut().insert("content-type".into(), "application/fhir+json".into());
        assert_eq!(f.on_response_headers(false), Flow::Continue, "the headers go on");
        host.take_calls();
        let entries: Vec<_> =
            types.iter().map(|t| json!({"resource": {"resourceType": t, "id": "secret-1"}})).collect();
        let body = json!({"resourceType": "Bundle", "type": "searchset", "entry": entries}).to_string();
        *host.0.response_body.borrow_mut() = body.clone().into_bytes();
        assert_eq!(f.on_response_body(10, false), Flow::Buffer, "the body is held");
        let end = f.on_response_body(body.len(), true);
        let calls = host.take_calls();
        assert!(!calls.iter().any(|c| c.starts_with("set_response_body")), "{calls:?}");
        if refused {
            assert_eq!(end, Flow::Stop, "the held body is not let go");
            let reply = calls.iter().find(|c| c.starts_with("send_reply 403 ")).expect("the reply (a reset)");
            assert!(!reply.contains("secret-1") && !reply.contains("\"Observation\""), "{reply}");
            let log = calls.iter().find(|c| c.contains("was withheld")).expect("logged");
            assert!(log.contains("the stream is reset") && !log.contains("secret-1"), "{log}");
        } else {
            assert_eq!(end, Flow::Continue);
            assert!(!calls.iter().any(|c| c.starts_with("send_reply")), "{calls:?}");
        }
        f.on_done();
    }
}

// ---- attack on issue 27 (decision metadata, BALP): an outside reviewer's tests ----

/// The filter-state calls of one request, in order.
fn states_of(calls: &[String]) -> Vec<&String> {
    calls.iter().filter(|c| c.starts_with("set_filter_state ")).collect()
}

/// Finding 1: a `_method` repeated with different values. Two override headers that disagree are refused
/// (a server may read either); two `_method` parameters that disagree are not: the filter reads the first
/// (`GET`), while a server that takes the last (PHP's and Rack's query parsers do) deletes. The read-only
/// allowlist lets it through, and the decision metadata says `read`, so a read-only RBAC policy does too.
#[test]
fn attack_a_repeated_method_parameter_that_disagrees_is_refused_like_disagreeing_headers() {
    let mut p = plugin();
    p["decision_metadata"] = json!(true);
    let (host, root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let auth = bearer(&testkeys::claims_now());
    // The single override is judged (the oracle: the filter's own rule, shown working).
    let (_f, flow) = send(&host, &root, 1, &get("/Patient/p1?_method=DELETE", Some(&auth)), true);
    assert_eq!(flow, Flow::Stop, "{:#?}", host.take_calls());
    host.take_calls();
    for (id, path) in [
        (2, "/Patient/p1?_method=GET&_method=DELETE"),
        (3, "/Patient/p1?_method=GET&_METHOD=DELETE"),
        (4, "/Patient/p1?_method=GET&_%6Dethod=DELETE"),
    ] {
        let (_f, flow) = send(&host, &root, id, &get(path, Some(&auth)), true);
        let calls = host.take_calls();
        assert_eq!(flow, Flow::Stop, "{path}: a DELETE the server may honour went on: {:#?}", states_of(&calls));
        assert!(calls.iter().any(|c| c.starts_with("send_reply 403 ")), "{path}: {calls:#?}");
    }
    // Repeats that agree are one override (no refusal of a harmless repeat).
    let (_f, flow) = send(&host, &root, 5, &get("/Patient/p1?_method=GET&_method=get", Some(&auth)), true);
    assert_eq!(flow, Flow::Continue, "{:#?}", host.take_calls());
}

/// Finding 2: a client id longer than 128 characters is cut, and the cut value is set as `client_id`:
/// two different clients (same first 128 characters) look the same to an Envoy policy that allows or denies
/// by `client_id`. The filter itself treats a cut id as no one's (`whole_client_id`, `allowed_clients`);
/// the metadata should too (leave the key unset: a policy that needs it fails closed).
#[test]
fn attack_a_cut_client_id_is_not_set_as_the_client_id_two_clients_could_share() {
    let mut p = plugin();
    p["decision_metadata"] = json!(true);
    let (host, root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let stem = "c".repeat(128);
    let mut seen = Vec::new();
    for (id, suffix) in [(1, "-trusted-reporting-app"), (2, "-attacker-app")] {
        let mut claims = testkeys::claims_now();
        claims["client_id"] = json!(format!("{stem}{suffix}"));
        let (_f, flow) = send(&host, &root, id, &get("/Patient/p1", Some(&bearer(&claims))), true);
        assert_eq!(flow, Flow::Continue);
        let calls = host.take_calls();
        let client = states_of(&calls)
            .into_iter()
            .find(|c| c.starts_with("set_filter_state fhir_tenant_router.client_id="))
            .cloned();
        seen.push(client);
    }
    assert!(
        seen[0].is_none() || seen[0] != seen[1],
        "two different clients got the same client_id filter state: {:?}",
        seen[0]
    );
}

/// Finding 3: a client id (from a verified token: the IdP's, but an IdP lets administrators or dynamic
/// registration pick it) holding a line break is set as filter state as it is. Envoy's text access log
/// (`%FILTER_STATE(...:PLAIN)%`, as examples/rbac uses) writes it raw: one request becomes two access-log
/// lines, the second forged. The BALP event and the audit line escape it (JSON); the metadata does not.
#[test]
fn attack_a_client_id_with_a_line_break_never_reaches_the_filter_state_raw() {
    let mut p = plugin();
    p["decision_metadata"] = json!(true);
    p["audit_event"] = json!(true);
    let (host, root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let mut claims = testkeys::claims_now();
    claims["client_id"] = json!("app\ndecision DELETE 200 tenant=forged outcome=allowed\r\u{1b}[2J");
    let (_f, flow) = send(&host, &root, 1, &get("/Patient/p1", Some(&bearer(&claims))), true);
    assert_eq!(flow, Flow::Continue);
    let calls = host.take_calls();
    for state in states_of(&calls) {
        assert!(!state.chars().any(|c| c.is_control()), "a control character in filter state: {state:?}");
    }
}

/// Held: the BALP event of a client id with quotes, backslashes, control characters and CEL/JSON-looking
/// text is one JSON document whose client value is exactly the (cut) claim, and forges no other field.
#[test]
fn attack_held_balp_event_of_a_hostile_client_id_is_one_json_document_with_no_forged_field() {
    let mut p = plugin();
    p["audit_event"] = json!(true);
    let (host, root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let hostile = "x\",\"outcome\":\"0\"}],\"agent\":[{\"who\":\"\\u0000\n\u{2028}' || true || filter_state['a'] == \"";
    let mut claims = testkeys::claims_now();
    claims["client_id"] = json!(hostile);
    let (_f, flow) = send(&host, &root, 1, &get("/Patient/p1?name=Zzyzx", Some(&bearer(&claims))), true);
    assert_eq!(flow, Flow::Continue);
    let calls = host.take_calls();
    let event = calls
        .iter()
        .find_map(|c| c.strip_prefix("set_filter_state fhir_tenant_router.audit_event="))
        .expect("the event");
    assert!(!event.contains('\n'), "{event}");
    let v: Value = serde_json::from_str(event).expect("one JSON document");
    assert_eq!(v["agent"][0]["who"]["identifier"]["value"], json!(hostile));
    assert_eq!(v["agent"].as_array().map(Vec::len), Some(3), "{v:#}");
    assert_eq!(v["outcome"], json!("0"));
    assert!(!event.contains("Zzyzx") && !event.contains("p1"), "{event}");
}

/// Finding 4: the BALP Query entity keeps every query parameter's name (only values become `*`), and a name is
/// whatever comes before `=`: a client that puts a value where a name goes (`?John%20Smith`, `?name%3DSmith`:
/// no `=` in clear) has it written, percent-encoded but readable, into the access log's AuditEvent. Fix (not
/// small): keep only names a FHIR search can have (the R4 SearchParameter registry in `search_params`, the
/// special `_` names, modifiers and chains over them) and write any other as `*`. Fixed: `balp::redacted_query`.
#[test]
fn attack_a_value_written_where_a_parameter_name_goes_never_reaches_the_balp_query() {
    for query in ["John%20Smith", "name%3DSmith", "name=x&Smith", "Smith"] {
        let redacted = crate::balp::redacted_query(query);
        assert!(!redacted.contains("Smith"), "{query} -> {redacted}");
    }
}

/// Held: every shape of query keeps no value (`=` inside a value, `;`, `+`, escapes, an empty name).
#[test]
fn attack_held_query_values_never_reach_the_balp_query() {
    for query in ["name=Smith", "name=a=Smith", "name=x;y=Smith", "=Smith", "name=Sm%69th&&", "name:exact=Smith+J"] {
        let redacted = crate::balp::redacted_query(query);
        assert!(!redacted.contains("Smith") && !redacted.contains("Sm%69th"), "{query} -> {redacted}");
    }
}

/// Finding 5: an answer the filter withholds (a narrowed token's search whose answer holds a type the token may
/// not read: the client gets the filter's 403) keeps the decision it had at the request: `outcome=allowed` in
/// the metadata, and a BALP event with outcome `0` claiming the Query profile. The access log, a tracer and an
/// audit repository record a success the client never had. Fix (not small): write the AuditEvent (and
/// `outcome`) when the answer is known for requests whose answer is checked, or name the withholding in a key
/// of its own (`withheld`), documented.
#[test]
fn attack_a_withheld_answer_is_not_recorded_as_a_successful_query() {
    let mut p = plugin();
    p["audit_event"] = json!(true);
    let (host, root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let mut claims = testkeys::claims_now();
    claims["scope"] = json!(format!("{TENANT_A} system/Patient.rs"));
    let (mut f, flow) = send(&host, &root, 1, &get("/Patient?name=x", Some(&bearer(&claims))), true);
    assert_eq!(flow, Flow::Continue);
    host.0.response_headers.borrow_mut().insert(":status".into(), "200".into());
    host.0.response_headers.borrow_mut().insert("content-type".into(), "application/fhir+json".into());
    f.on_response_headers(false);
    let body = json!({"resourceType": "Bundle", "type": "searchset",
                      "entry": [{"resource": {"resourceType": "Observation", "id": "o1"}}]})
    .to_string();
    *host.0.response_body.borrow_mut() = body.clone().into_bytes();
    f.on_response_body(body.len(), true);
    f.on_done();
    let calls = host.take_calls();
    assert!(calls.iter().any(|c| c.starts_with("send_reply 403 ")), "withheld: {calls:#?}");
    let events: Vec<Value> = calls
        .iter()
        .filter_map(|c| c.strip_prefix("set_filter_state fhir_tenant_router.audit_event="))
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        events.iter().all(|e| e["outcome"] != json!("0")),
        "the access log's AuditEvent says the withheld query succeeded: {events:#?}"
    );
    // Fixed: the event waits for the verdict and says what the client got instead.
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["outcome"], json!("4"));
    assert_eq!(events[0]["outcomeDesc"], json!("403 answer_withheld"));
}

/// The AuditEvent of a narrowed request whose answer passes the check is written once, as a success, when
/// the answer is through (not at the request).
#[test]
fn a_checked_answer_that_passes_writes_one_successful_event_after_the_check() {
    let mut p = plugin();
    p["audit_event"] = json!(true);
    let (host, root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let mut claims = testkeys::claims_now();
    claims["scope"] = json!(format!("{TENANT_A} system/Patient.rs"));
    let (mut f, flow) = send(&host, &root, 1, &get("/Patient?name=x", Some(&bearer(&claims))), true);
    assert_eq!(flow, Flow::Continue);
    let event_calls = |calls: &[String]| {
        calls
            .iter()
            .filter_map(|c| c.strip_prefix("set_filter_state fhir_tenant_router.audit_event="))
            .map(|e| serde_json::from_str::<Value>(e).unwrap())
            .collect::<Vec<_>>()
    };
    assert!(event_calls(&host.take_calls()).is_empty(), "no event before the answer is checked");
    host.0.response_headers.borrow_mut().insert(":status".into(), "200".into());
    host.0.response_headers.borrow_mut().insert("content-type".into(), "application/fhir+json".into());
    f.on_response_headers(false);
    let body = json!({"resourceType": "Bundle", "type": "searchset",
                      "entry": [{"resource": {"resourceType": "Patient", "id": "p1"}}]})
    .to_string();
    *host.0.response_body.borrow_mut() = body.clone().into_bytes();
    f.on_response_body(body.len(), true);
    f.on_done();
    let events = event_calls(&host.take_calls());
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["outcome"], json!("0"));
}

/// Held: a request parked for a key-set refetch sets nothing while it waits (Envoy's RBAC has not run: the
/// filter stopped it), and its whole decision, tenant and interaction included, before it resumes.
#[test]
fn attack_held_a_request_parked_for_keys_gets_its_decision_before_it_resumes() {
    let mut p = remote_plugin();
    p["decision_metadata"] = json!(true);
    let (host, mut root) = configured(&p);
    root.on_tick();
    let es_only = format!("{{\"keys\": [{}]}}", testkeys::es_public_jwk());
    deliver(&host, &mut root, 1, Some("200"), es_only.as_bytes());
    host.take_calls();
    host.0.now_ms.set(T0_MS + 2_000);
    let mut claims = testkeys::claims_now();
    claims["scope"] = json!(TENANT_B);
    let (_f, flow) = send(&host, &root, 7, &get("/Patient/p1", Some(&bearer(&claims))), true);
    assert_eq!(flow, Flow::WaitForKeys);
    assert!(states_of(&host.take_calls()).is_empty(), "nothing while waiting");
    root.on_tick();
    host.take_calls();
    deliver(&host, &mut root, 2, Some("200"), testkeys::public_jwks().as_bytes());
    let calls = host.take_calls();
    let resumed = calls.iter().position(|c| c == "resume_request").unwrap_or(usize::MAX);
    let tenant = format!("set_filter_state fhir_tenant_router.tenant={TENANT_B}");
    let interaction = "set_filter_state fhir_tenant_router.interaction=read".to_string();
    let at = |s: &String| calls.iter().position(|c| c == s).unwrap_or(usize::MAX);
    assert!(resumed != usize::MAX, "{calls:#?}");
    assert!(at(&tenant) < resumed && at(&interaction) < resumed, "set before it resumes: {calls:#?}");
}

/// Finding 7: a method override header spelled with underscores (`x_http_method_override`). Envoy passes headers
/// with underscores on by default (`headers_with_underscores_action: ALLOW`), and a CGI-style server (PHP,
/// WSGI) reads `X_HTTP_METHOD_OVERRIDE` and `X-HTTP-METHOD-OVERRIDE` as the same `HTTP_X_HTTP_METHOD_OVERRIDE`,
/// so a framework that honours the override (Symfony, Django middleware) deletes. The filter did not see it:
/// the read-only allowlist passed it as a read and the metadata said `read`.
#[test]
fn attack_an_override_header_spelled_with_underscores_is_judged_too() {
    let mut p = plugin();
    p["decision_metadata"] = json!(true);
    let (host, root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let auth = bearer(&testkeys::claims_now());
    for (id, name) in
        [(1, "x-http-method-override"), (2, "x_http_method_override"), (3, "x_http_method"), (4, "x-method_override")]
    {
        let mut headers = get("/Patient/p1", Some(&auth));
        headers.push((name, "DELETE".into()));
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        host.request(&pairs);
        let mut f = root.create_filter(id).unwrap();
        let flow = f.on_request_headers(true);
        let calls = host.take_calls();
        assert_eq!(flow, Flow::Stop, "{name}: a DELETE the server may honour went on: {:#?}", states_of(&calls));
    }
}

// ---- audit_sink: BALP AuditEvents posted per tenant, in batches, from the tick ----

fn sink_plugin() -> Value {
    let mut p = plugin();
    p["audit_sink"] = json!({
        "cluster": "audit", "uri": "http://audit.example/fhir/{tenant}", "batch_size": 2, "queue_size": 3,
        "attempts": 2, "backoff_ms": 100
    });
    p
}

/// The audit batches dispatched among `calls`: (path, entries).
fn audit_batches(calls: &[String]) -> Vec<(String, Vec<Value>)> {
    calls
        .iter()
        .filter_map(|c| c.strip_prefix("dispatch audit "))
        .map(|c| {
            let path = c.split("(\":path\", \"").nth(1).and_then(|r| r.split('"').next()).unwrap().to_string();
            assert!(c.contains("(\":method\", \"POST\")") && c.contains("(\":authority\", \"audit.example\")"), "{c}");
            assert!(c.contains("(\"content-type\", \"application/fhir+json\")"), "{c}");
            let body: Value = serde_json::from_str(c.split(" body=").nth(1).unwrap()).unwrap();
            assert_eq!(body["type"], "batch");
            (path, body["entry"].as_array().unwrap().clone())
        })
        .collect()
}

#[test]
fn audit_events_are_queued_without_a_host_call_and_posted_per_tenant_from_the_tick() {
    let (host, mut root) = configured(&sink_plugin());
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    let a = bearer(&testkeys::claims_now());
    let mut claims_b = testkeys::claims_now();
    claims_b["scope"] = json!(TENANT_B);
    let b = bearer(&claims_b);
    for (id, auth) in [(1, Some(&a)), (2, Some(&b)), (3, Some(&a)), (4, Some(&b)), (5, None)] {
        send(&host, &root, id, &get("/Patient", auth.map(String::as_str)), true);
    }
    let calls = host.take_calls();
    assert!(!calls.iter().any(|c| c.starts_with("dispatch")), "nothing sent on the request path: {calls:?}");
    root.on_tick();
    // Queue 3: the fourth is dropped and counted; the 401 has no tenant (and no untenanted_uri): skipped.
    assert_eq!(host.metric("audit_sink.dropped.queue_full"), 1);
    assert_eq!(host.metric("audit_sink.untenanted_skipped"), 1);
    let batches = audit_batches(&host.take_calls());
    assert_eq!(batches.len(), 1, "tenant A's batch is full; B's one event waits for the flush interval");
    assert_eq!(batches[0].0, format!("/fhir/{TENANT_A}"));
    assert_eq!(batches[0].1.len(), 2);
    for entry in &batches[0].1 {
        assert_eq!(entry["request"], json!({"method": "POST", "url": "AuditEvent"}));
        assert_eq!(entry["resource"]["resourceType"], "AuditEvent");
        let org = entry["resource"]["agent"][2]["who"]["identifier"]["value"].clone();
        assert_eq!(org, TENANT_A, "only tenant A's events: {entry}");
    }
    // A 503: sent again after its backoff, then delivered.
    *host.0.call_status.borrow_mut() = Some("503".into());
    root.on_http_call_response(1, 0);
    host.0.now_ms.set(T0_MS + 100);
    root.on_tick();
    let again = audit_batches(&host.take_calls());
    assert_eq!(again.iter().map(|b| b.0.clone()).collect::<Vec<_>>(), [format!("/fhir/{TENANT_A}")]);
    *host.0.call_status.borrow_mut() = Some("200".into());
    *host.0.call_body.borrow_mut() = br#"{"resourceType":"Bundle","type":"batch-response","entry":[
        {"response":{"status":"201 Created"}},{"response":{"status":"201 Created"}}]}"#
        .to_vec();
    root.on_http_call_response(2, host.0.call_body.borrow().len());
    // B's event, once old enough.
    host.0.now_ms.set(T0_MS + 1_000);
    root.on_tick();
    let b_batch = audit_batches(&host.take_calls());
    assert_eq!(
        b_batch.iter().map(|b| (b.0.clone(), b.1.len())).collect::<Vec<_>>(),
        [(format!("/fhir/{TENANT_B}"), 1)]
    );
    root.on_tick();
    assert_eq!(host.metric("audit_sink.delivered"), 2);
    assert_eq!((host.metric("audit_sink.batches"), host.metric("audit_sink.retries")), (2, 1));
}

#[test]
fn an_audit_batch_that_cannot_be_sent_fails_at_once_and_is_dropped_and_counted_after_its_attempts() {
    let (host, mut root) = configured(&sink_plugin());
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    *host.0.dispatch_error.borrow_mut() = Some("BadArgument".into());
    send(&host, &root, 1, &get("/Patient", Some(&bearer(&testkeys::claims_now()))), true);
    host.0.now_ms.set(T0_MS + 1_000);
    root.on_tick();
    host.0.now_ms.set(T0_MS + 1_100);
    root.on_tick();
    root.on_tick();
    assert_eq!(host.metric("audit_sink.dropped.retries_exhausted"), 1);
    let calls = host.take_calls();
    let warn = calls.iter().find(|c| c.contains("audit sink")).unwrap();
    assert!(warn.starts_with("log Warn") && warn.contains("1 AuditEvent(s) of tenant"), "{warn}");
    assert!(!calls.iter().filter(|c| c.starts_with("log")).any(|c| c.contains("resourceType")), "{calls:?}");
}

#[test]
fn the_audit_sink_adds_no_host_call_to_a_request_but_the_clients_address() {
    let calls_of = |plugin: &Value| {
        let (host, root) = configured(plugin);
        *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
        let mut all = Vec::new();
        for (id, auth) in [(1, Some(bearer(&testkeys::claims_now()))), (2, None)] {
            send(&host, &root, id, &get("/Patient", auth.as_deref()), true);
            all.extend(host.take_calls());
        }
        all
    };
    let without = calls_of(&plugin());
    let with = calls_of(&sink_plugin());
    assert!(!without.is_empty());
    // The client's address is read once per request (BALP requires `agent[client].network`), as with
    // `audit_event`; the event itself goes into the VM's queue: no host call, nothing else changes.
    let reads = with.iter().filter(|c| *c == "get_property source.address").count();
    assert_eq!(reads, 2, "one address read per request: {with:#?}");
    let with: Vec<String> = with.into_iter().filter(|c| c != "get_property source.address").collect();
    assert_eq!(with, without, "the event goes into the VM's queue: no host call, nothing else changes");
}

#[test]
fn a_sink_that_cannot_be_posted_to_costs_one_post_a_tick_never_a_recursion_through_the_queue() {
    let mut p = sink_plugin();
    p["audit_sink"]["batch_size"] = json!(1);
    p["audit_sink"]["queue_size"] = json!(1000);
    p["audit_sink"]["attempts"] = json!(1);
    let (host, mut root) = configured(&p);
    *host.0.verify_signature.borrow_mut() = Some(vec![0x08, 0x01]);
    *host.0.dispatch_error.borrow_mut() = Some("BadArgument".into());
    let auth = bearer(&testkeys::claims_now());
    for id in 1..=300 {
        send(&host, &root, id, &get("/Patient", Some(&auth)), true);
    }
    host.take_calls();
    root.on_tick();
    let posts = host.take_calls().iter().filter(|c| c.starts_with("dispatch audit")).count();
    assert_eq!(posts, 1, "the next batch waits for the next tick");
    root.on_tick();
    assert_eq!(host.metric("audit_sink.dropped.retries_exhausted"), 1);
}

/// The skip rule of [`super::apply::Apply`] (c550f3f), held by the attack on it: a route-cache clear is
/// dropped only after a request-header edit of the same callback (Envoy's `onHeadersModified` cleared the
/// cache then, for our ABI 0.2.1); one that no edit of that callback backs (a path the core may add that
/// re-picks the route after something else than a header edit) still makes the foreign call, and a new
/// callback's interpreter starts with no edit. The fake host records each call as Envoy would receive it.
#[test]
fn attack_held_a_route_cache_clear_with_no_request_header_edit_in_its_callback_still_makes_the_call() {
    use crate::effect::{Effect, Effects};
    let host = FakeHost::default();
    let metrics = super::metrics::Metrics::define(&host);
    let calls = std::cell::RefCell::new(std::collections::HashMap::new());
    host.take_calls();
    let mut apply = super::apply::Apply::new(&host, &metrics, &calls);
    apply.push(Effect::FilterState("wasm.fhir_tenant_router.tenant", TENANT_A));
    apply.push(Effect::ClearRouteCache);
    assert_eq!(
        host.take_calls(),
        ["set_filter_state fhir_tenant_router.tenant=".to_string() + TENANT_A, "clear_route_cache".into()]
    );
    apply.push(Effect::SetRequestHeader(ROUTE, "tenant_a"));
    apply.push(Effect::ClearRouteCache);
    assert_eq!(host.take_calls(), [format!("set_request_header {ROUTE}: tenant_a")]);
    // The next callback (a body, a wake in another stream's context) has an interpreter of its own.
    let mut next = super::apply::Apply::new(&host, &metrics, &calls);
    next.push(Effect::ClearRouteCache);
    assert_eq!(host.take_calls(), ["clear_route_cache"]);
    // The shell counts a removal as an edit too. Not shown on Envoy here (the core's only clear, `route_to`,
    // follows a set of the route header): a path that removed a header and then cleared would rest on
    // Envoy's `removeHeaderMapValue` calling `onHeadersModified` as its setters do.
    next.push(Effect::RemoveRequestHeader(ROUTE));
    next.push(Effect::ClearRouteCache);
    assert_eq!(host.take_calls(), [format!("remove_request_header {ROUTE}")]);
}
