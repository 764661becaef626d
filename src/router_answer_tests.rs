//! The answer check driven through the router: a narrowed request's answer is held, checked, and replaced
//! by an `OperationOutcome` when it holds what the client may not read (or cannot be checked).

use serde_json::{json, Value};

use super::*;
use crate::crypto::PureRust;
use crate::effect::Recorded;
use crate::testkeys::{self, NOW, TENANT_A, TENANT_B};

const T0_MS: u64 = NOW as u64 * 1000;

pub(super) fn plugin() -> Value {
    json!({
        "provider": {"issuer": testkeys::ISSUER, "audiences": [testkeys::AUDIENCE],
                     "jwks": serde_json::from_str::<Value>(&testkeys::public_jwks()).unwrap()},
        "tenants": {TENANT_A: {"cluster": "tenant_a"},
                    TENANT_B: {"cluster": "tenant_b", "allow": {"interactions": ["read", "search"],
                                                                 "resource_types": ["Patient"]}}},
        "metadata_cluster": "fhir_metadata",
        "audit_log": false
    })
}

pub(super) fn router_with(plugin: &Value) -> Router {
    Router::new(Config::from_json(plugin.to_string().as_bytes()).unwrap(), T0_MS, &mut Recorded::default())
}

pub(super) fn token(tenant: &str, scopes: &str, client: &str) -> String {
    let mut claims = testkeys::claims_now();
    claims["scope"] = json!(format!("{tenant} {scopes}").trim().to_string());
    claims["client_id"] = json!(client);
    format!("Bearer {}", testkeys::sign_rs256(&claims))
}

/// Sends a request's headers (whole, no body): its stream, flow and effects.
pub(super) fn send(router: &mut Router, method: &str, path: &str, auth: &str) -> (Stream, Flow, Vec<String>) {
    send_at(router, method, path, auth, T0_MS)
}

pub(super) fn send_at(
    router: &mut Router,
    method: &str,
    path: &str,
    auth: &str,
    now_ms: u64,
) -> (Stream, Flow, Vec<String>) {
    let mut stream = router.open_stream(1);
    let headers: [(&[u8], &[u8]); 3] =
        [(b":method", method.as_bytes()), (b":path", path.as_bytes()), (b"authorization", auth.as_bytes())];
    let mut out = Recorded::default();
    let flow = router.on_request_headers(&mut stream, headers.iter().copied(), true, now_ms, &PureRust, &mut out);
    (stream, flow, out.0)
}

/// The answer `body` (with `content_type`) to `stream`'s request: the flows of its headers and body, and
/// the effects of both.
pub(super) fn answer(
    router: &Router,
    stream: &mut Stream,
    content_type: &str,
    body: &[u8],
) -> (Flow, Flow, Vec<String>) {
    let mut out = Recorded::default();
    let ct = content_type.to_string();
    let header = move |name: &str| (name == "content-type").then(|| ct.clone());
    let headers = router.on_response_headers(stream, body.is_empty(), &header, &mut out);
    let mut reads = 0;
    let mut read = || {
        reads += 1;
        body.to_vec()
    };
    let flow = if headers == Flow::Stop || body.is_empty() {
        headers
    } else {
        let _ = router.on_response_body(stream, false, &mut || Vec::new(), &mut out);
        router.on_response_body(stream, true, &mut read, &mut out)
    };
    (headers, flow, out.0)
}

fn replied(effects: &[String]) -> Option<(u32, String)> {
    effects.iter().find_map(|e| {
        let rest = e.strip_prefix("Reply(")?;
        let (status, rest) = rest.split_once(", ")?;
        Some((status.parse().ok()?, rest.to_string()))
    })
}

fn bundle_of(types: &[&str]) -> Vec<u8> {
    let entries: Vec<Value> = types.iter().map(|t| json!({"resource": {"resourceType": t, "id": "x"}})).collect();
    json!({"resourceType": "Bundle", "type": "searchset", "entry": entries}).to_string().into_bytes()
}

#[test]
fn an_unnarrowed_request_pays_nothing_on_the_way_back() {
    let mut r = router_with(&plugin());
    let (mut s, flow, effects) = send(&mut r, "GET", "/Patient", &token(TENANT_A, "", "app"));
    assert_eq!(flow, Flow::Continue);
    assert!(!effects.iter().any(|e| e.contains("accept-encoding")), "{effects:?}");
    let (h, b, effects) = answer(&r, &mut s, "application/fhir+json", &bundle_of(&["Patient", "Observation"]));
    assert_eq!((h, b), (Flow::Continue, Flow::Continue), "not held, not buffered");
    assert!(effects.is_empty(), "{effects:?}");
    // `system/*.read` narrows nothing by type either.
    let (mut s, _, _) = send(&mut r, "GET", "/Patient", &token(TENANT_A, "system/*.read", "app"));
    let (h, _, _) = answer(&r, &mut s, "application/fhir+json", &bundle_of(&["Observation"]));
    assert_eq!(h, Flow::Continue);
}

#[test]
fn a_narrowed_answer_with_only_granted_types_goes_on_untouched() {
    let mut r = router_with(&plugin());
    let (mut s, flow, effects) = send(&mut r, "GET", "/Patient", &token(TENANT_A, "system/Patient.rs", "app"));
    assert_eq!(flow, Flow::Continue);
    assert!(effects.iter().any(|e| e == "RemoveRequestHeader(\"accept-encoding\")"), "{effects:?}");
    let (h, b, effects) = answer(&r, &mut s, "application/fhir+json", &bundle_of(&["Patient", "Patient"]));
    assert_eq!((h, b), (Flow::Buffer, Flow::Continue), "held for the check, then let go");
    assert!(effects.is_empty(), "unchanged, content-length kept: {effects:?}");
}

#[test]
fn a_forbidden_type_anywhere_is_withheld_counted_and_logged_without_data() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (json!({"resourceType": "Observation", "id": "o"}).to_string().into_bytes(), "Observation x1"),
        (bundle_of(&["Patient", "Observation", "Observation"]), "Observation x2"),
        (
            json!({"resourceType": "Patient", "name": [{"family": "Secret"}], "contained": [{"resourceType": "Patient",
                "contained": [{"resourceType": "Organization"}]}]})
            .to_string()
            .into_bytes(),
            "Organization x1",
        ),
        (
            json!({"resourceType": "Bundle", "type": "batch-response", "entry": [{"resource": {"resourceType": "Bundle",
                "entry": [{"resource": {"resourceType": "Condition"}}]}}, {"response": {"status": "200",
                "outcome": {"resourceType": "Encounter"}}}]})
            .to_string()
            .into_bytes(),
            "Condition x1, Encounter x1",
        ),
    ];
    for (body, summary) in cases {
        let mut r = router_with(&plugin());
        let (mut s, _, _) = send(&mut r, "GET", "/Patient?name=Secret", &token(TENANT_A, "system/Patient.read", "app"));
        let (h, b, effects) = answer(&r, &mut s, "application/fhir+json;charset=utf-8", &body);
        assert_eq!((h, b), (Flow::Buffer, Flow::Stop), "{summary}");
        let (status, reply) = replied(&effects).unwrap();
        assert_eq!(status, 403);
        assert!(reply.contains("OperationOutcome") && reply.contains("forbidden"), "{reply}");
        assert!(!reply.contains("Observation") && !reply.contains("Secret"), "{reply}");
        assert!(effects.contains(&"Count(ResponsesWithheldForbidden)".to_string()), "{effects:?}");
        let log = effects.iter().find(|e| e.starts_with("Log(Warn")).unwrap();
        assert!(log.contains(summary) && log.contains(TENANT_A), "{log}");
        assert!(!log.contains("Secret") && !log.contains("name="), "no data, no path: {log}");
    }
}

#[test]
fn a_tenant_allowlist_narrows_an_unscoped_token_too() {
    let mut r = router_with(&plugin());
    let (mut s, flow, _) = send(&mut r, "GET", "/Patient", &token(TENANT_B, "", "app"));
    assert_eq!(flow, Flow::Continue);
    let (_, b, effects) = answer(&r, &mut s, "application/fhir+json", &bundle_of(&["Patient", "Practitioner"]));
    assert_eq!(b, Flow::Stop);
    assert_eq!(replied(&effects).unwrap().0, 403);
}

#[test]
fn what_cannot_be_checked_fails_closed() {
    let mut r = router_with(&plugin());
    let auth = token(TENANT_A, "system/Patient.read", "app");
    // XML (and any other media type) is refused at the headers: nothing of it goes on.
    let (mut s, _, _) = send(&mut r, "GET", "/Patient", &auth);
    let xml = b"<Bundle xmlns=\"http://hl7.org/fhir\"/>";
    let (h, _, effects) = answer(&r, &mut s, "application/fhir+xml", xml);
    assert_eq!(h, Flow::Stop);
    assert_eq!(replied(&effects).unwrap().0, 406);
    assert!(effects.contains(&"Count(ResponsesWithheldUnchecked)".to_string()));
    let (mut s, _, _) = send(&mut r, "GET", "/Patient", &auth);
    assert_eq!(answer(&r, &mut s, "application/fhir+ndjson", b"{}\n{}\n").0, Flow::Stop);
    // Truncated or invalid JSON: 502.
    let full = bundle_of(&["Patient"]);
    for cut in [1, full.len() / 2, full.len() - 1] {
        let (mut s, _, _) = send(&mut r, "GET", "/Patient", &auth);
        let (_, b, effects) = answer(&r, &mut s, "application/fhir+json", &full[..cut]);
        assert_eq!(b, Flow::Stop, "cut at {cut}");
        assert_eq!(replied(&effects).unwrap().0, 502);
    }
    // `_format=xml` is refused before the upstream sees it.
    for path in ["/Patient?_format=xml", "/Patient?_format=application/fhir%2Bxml", "/Patient/1?_format=ttl"] {
        let (_, flow, effects) = send(&mut r, "GET", path, &auth);
        assert_eq!(flow, Flow::Stop, "{path}");
        assert_eq!(replied(&effects).unwrap().0, 406, "{path}");
        assert!(!effects.iter().any(|e| e.contains("SetRequestHeader(\"x-fhir-tenant-router-cluster\"")));
    }
    let (_, flow, _) = send(&mut r, "GET", "/Patient?_format=json", &auth);
    assert_eq!(flow, Flow::Continue);
    // An answer without a body needs no check.
    let (mut s, _, _) = send(&mut r, "GET", "/Patient", &auth);
    assert_eq!(answer(&r, &mut s, "", b"").0, Flow::Continue);
}

#[test]
fn a_batch_response_may_show_what_its_entries_wrote_and_nothing_else() {
    let mut p = plugin();
    p["tenants"][TENANT_A]["allow"] = json!({"interactions": ["read", "search", "create", "update"]});
    let mut r = router_with(&p);
    let auth = token(TENANT_A, "system/Observation.c system/Patient.rs", "app");
    let (mut s, flow, _) = send_body(
        &mut r,
        "POST",
        "/",
        &auth,
        &json!({"resourceType": "Bundle", "type": "batch",
        "entry": [{"request": {"method": "POST", "url": "Observation"}, "resource": {"resourceType": "Observation"}},
                  {"request": {"method": "GET", "url": "Patient/1"}}]})
        .to_string(),
    );
    assert_eq!(flow, Flow::Continue);
    let written = json!({"resourceType": "Bundle", "type": "batch-response", "entry": [
        {"resource": {"resourceType": "Observation", "id": "new"}, "response": {"status": "201"}},
        {"resource": {"resourceType": "Patient", "id": "1"}, "response": {"status": "200"}}]});
    let (_, b, effects) = answer(&r, &mut s, "application/fhir+json", written.to_string().as_bytes());
    assert_eq!(b, Flow::Continue, "{effects:?}");
    // The same token's batch that writes nothing may not show an Observation.
    let (mut s, _, _) = send_body(
        &mut r,
        "POST",
        "/",
        &auth,
        &json!({"resourceType": "Bundle", "type": "batch",
        "entry": [{"request": {"method": "GET", "url": "Patient/1"}}]})
        .to_string(),
    );
    let (_, b, effects) = answer(&r, &mut s, "application/fhir+json", written.to_string().as_bytes());
    assert_eq!((b, replied(&effects).unwrap().0), (Flow::Stop, 403));
}

/// Sends a request with a body (headers, then the whole body).
fn send_body(router: &mut Router, method: &str, path: &str, auth: &str, body: &str) -> (Stream, Flow, Vec<String>) {
    let mut stream = router.open_stream(1);
    let headers: [(&[u8], &[u8]); 3] =
        [(b":method", method.as_bytes()), (b":path", path.as_bytes()), (b"authorization", auth.as_bytes())];
    let mut out = Recorded::default();
    let _ = router.on_request_headers(&mut stream, headers.iter().copied(), false, T0_MS, &PureRust, &mut out);
    let flow = router.on_request_body(&mut stream, true, T0_MS, &mut || body.as_bytes().to_vec(), &mut out);
    (stream, flow, out.0)
}

#[test]
fn a_granted_binary_read_may_come_back_raw() {
    let mut r = router_with(&plugin());
    let (mut s, _, _) = send(&mut r, "GET", "/Binary/1", &token(TENANT_A, "system/Binary.read", "app"));
    assert_eq!(answer(&r, &mut s, "image/png", b"\x89PNG").0, Flow::Continue);
    let (mut s, _, _) = send(&mut r, "GET", "/Binary/1", &token(TENANT_A, "system/Binary.read", "app"));
    let (_, b, _) = answer(&r, &mut s, "application/fhir+json", &bundle_of(&["Patient"]));
    assert_eq!(b, Flow::Stop, "JSON is still checked");
}

// Paging cursors.

const BASE: &str = "https://fhir.example.org/r4";
const KEY: &str = "0123456789abcdef0123456789abcdef-test-only";

fn paging_router() -> Router {
    let mut p = plugin();
    p["public_base_url"] = json!(BASE);
    p["paging_cursors"] = json!({"key": {"env": "CURSOR_KEY"}, "ttl_s": 600});
    let config =
        Config::from_json_with_env(p.to_string().as_bytes(), &|name| (name == "CURSOR_KEY").then(|| KEY.to_string()))
            .unwrap();
    Router::new(config, T0_MS, &mut Recorded::default())
}

/// A HAPI-style searchset whose paging links name no type (and one link to another origin).
fn hapi_page(types: &[&str]) -> Vec<u8> {
    let entries: Vec<Value> = types.iter().map(|t| json!({"resource": {"resourceType": t, "id": "x"}})).collect();
    json!({"resourceType": "Bundle", "type": "searchset",
           "link": [{"relation": "self", "url": format!("{BASE}/Patient?name=x")},
                    {"relation": "next", "url": format!("{BASE}?_getpages=abc&_getpagesoffset=1&_count=1")},
                    {"relation": "last", "url": "https://elsewhere.example/fhir?_getpages=abc"}],
           "entry": entries})
    .to_string()
    .into_bytes()
}

/// The body the answer's effects put in place of the upstream's.
fn replaced_body(effects: &[String]) -> Value {
    let body = effects.iter().find_map(|e| e.strip_prefix("ReplaceResponseBody(")).unwrap();
    serde_json::from_str(body.strip_suffix(')').unwrap()).unwrap()
}

/// The `next` cursor path (relative to the base) of a first page answered to a narrowed Patient search.
fn first_page_next(r: &mut Router, auth: &str) -> String {
    let (mut s, flow, _) = send(r, "GET", "/Patient?name=x", auth);
    assert_eq!(flow, Flow::Continue);
    let (h, b, effects) = answer(r, &mut s, "application/fhir+json", &hapi_page(&["Patient"]));
    assert_eq!((h, b), (Flow::Buffer, Flow::Continue), "{effects:?}");
    let page = replaced_body(&effects);
    assert_eq!(page["link"][2]["url"], "https://elsewhere.example/fhir?_getpages=abc", "another origin: left");
    assert!(page["link"][0]["url"].as_str().unwrap().starts_with(&format!("{BASE}/?_cursor=")));
    let next = page["link"][1]["url"].as_str().unwrap();
    assert!(!next.contains("_getpages"), "{next}");
    next.strip_prefix(BASE).unwrap().to_string()
}

#[test]
fn a_narrowed_token_pages_through_a_cursor_judged_as_its_search() {
    let mut r = paging_router();
    let auth = token(TENANT_A, "system/Patient.rs", "app-a");
    let next = first_page_next(&mut r, &auth);
    // The raw link would be refused to this token (no type, no `*` scope) — and to anyone: paging is cursors.
    let (_, flow, effects) = send(&mut r, "GET", "/?_getpages=abc&_getpagesoffset=1&_count=1", &auth);
    assert_eq!((flow, replied(&effects).unwrap().0), (Flow::Stop, 400));
    let (_, _, effects) = send(&mut r, "GET", "/?_getpages=abc", &token(TENANT_A, "", "app-a"));
    assert_eq!(replied(&effects).unwrap().0, 400, "unnarrowed too");
    // The cursor goes upstream as the link's path, to the tenant's cluster.
    let (mut s, flow, effects) = send(&mut r, "GET", &next, &auth);
    assert_eq!(flow, Flow::Continue, "{effects:?}");
    assert!(
        effects.contains(&"SetRequestHeader(\":path\", \"/?_getpages=abc&_getpagesoffset=1&_count=1\")".to_string())
    );
    assert!(effects.contains(&"SetRequestHeader(\"x-fhir-tenant-router-cluster\", \"tenant_a\")".to_string()));
    // Its answer is checked and its links are cursors again.
    let (_, b, effects) = answer(&r, &mut s, "application/fhir+json", &hapi_page(&["Patient", "Observation"]));
    assert_eq!((b, replied(&effects).unwrap().0), (Flow::Stop, 403));
    let (mut s, _, _) = send(&mut r, "GET", &next, &auth);
    let (_, _, effects) = answer(&r, &mut s, "application/fhir+json", &hapi_page(&["Patient"]));
    assert!(replaced_body(&effects)["link"][1]["url"].as_str().unwrap().contains("_cursor="));
}

#[test]
fn a_cursor_is_refused_to_another_tenant_or_client_tampered_or_expired() {
    let mut r = paging_router();
    let auth = token(TENANT_A, "system/Patient.rs", "app-a");
    let next = first_page_next(&mut r, &auth);
    let refused = |r: &mut Router, path: &str, auth: &str, now_ms: u64| {
        let (_, flow, effects) = send_at(r, "GET", path, auth, now_ms);
        assert_eq!(flow, Flow::Stop, "{effects:?}");
        assert!(!effects.iter().any(|e| e.contains("x-fhir-tenant-router-cluster")), "routed nowhere: {effects:?}");
        assert!(effects.contains(&"Count(CursorRefused)".to_string()));
        replied(&effects).unwrap()
    };
    // Tenant B's client (B allows Patient search), and another client of tenant A.
    assert_eq!(refused(&mut r, &next, &token(TENANT_B, "system/Patient.rs", "app-a"), T0_MS).0, 403);
    assert_eq!(refused(&mut r, &next, &token(TENANT_A, "system/Patient.rs", "app-b"), T0_MS).0, 403);
    assert_eq!(refused(&mut r, &next, &token(TENANT_A, "system/*.*", "app-b"), T0_MS).0, 403);
    // Tampered: one character of the signature, or of the payload.
    let flip = |s: &str, at: usize| {
        let mut b = s.as_bytes().to_vec();
        b[at] = if b[at] == b'A' { b'B' } else { b'A' };
        String::from_utf8(b).unwrap()
    };
    assert_eq!(refused(&mut r, &flip(&next, next.len() - 2), &auth, T0_MS).0, 400);
    assert_eq!(refused(&mut r, &flip(&next, "/?_cursor=".len() + 5), &auth, T0_MS).0, 400);
    assert_eq!(refused(&mut r, &format!("{next}&_count=1000"), &auth, T0_MS).0, 400);
    // Expired: its lifetime (600 s) later.
    let (status, body) = refused(&mut r, &next, &auth, T0_MS + 600_000);
    assert!(status == 400 && body.contains("expired"), "{body}");
    // Still good just before, for its own client; and a token that lost the scope is refused as the search.
    let (_, flow, _) = send_at(&mut r, "GET", &next, &auth, T0_MS + 599_000);
    assert_eq!(flow, Flow::Continue);
    let (_, flow, effects) = send(&mut r, "GET", &next, &token(TENANT_A, "system/Observation.rs", "app-a"));
    assert_eq!((flow, replied(&effects).unwrap().0), (Flow::Stop, 403));
    assert!(effects.contains(&"Count(ForbiddenByScope)".to_string()), "judged as the Patient search: {effects:?}");
    // Without a valid token, the token speaks first.
    let (_, _, effects) = send(&mut r, "GET", &next, "Bearer nope");
    assert_eq!(replied(&effects).unwrap().0, 401);
}

#[test]
fn the_configuration_needs_a_key_and_a_public_base() {
    let env = |name: &str| match name {
        "SHORT" => Some("too short".to_string()),
        "GOOD" => Some(KEY.to_string()),
        _ => None,
    };
    let field = |paging: Value, base: bool| {
        let mut p = plugin();
        if base {
            p["public_base_url"] = json!(BASE);
        }
        p["paging_cursors"] = paging;
        Config::from_json_with_env(p.to_string().as_bytes(), &env).err().map(|e| e.field)
    };
    assert_eq!(field(json!({"key": {"env": "GOOD"}}), true), None);
    assert_eq!(field(json!({"key": {"env": "GOOD"}}), false).as_deref(), Some("paging_cursors"));
    assert_eq!(field(json!({}), true).as_deref(), Some("paging_cursors.key"));
    assert_eq!(field(json!({"key": {"env": "SHORT"}}), true).as_deref(), Some("paging_cursors.key"));
    assert_eq!(field(json!({"key": {"env": "UNSET"}}), true).as_deref(), Some("paging_cursors.key.env"));
    assert_eq!(field(json!({"key": {"env": "GOOD"}, "ttl_s": 0}), true).as_deref(), Some("paging_cursors.ttl_s"));
    assert_eq!(field(json!({"key": {"env": "GOOD"}, "other": 1}), true).as_deref(), Some("paging_cursors.other"));
}

// A host that cannot stop on headers (`hold_bundle_headers: false`).

#[test]
fn without_hold_bundle_headers_an_answers_headers_go_on_and_only_its_body_is_held() {
    let mut p = plugin();
    p["hold_bundle_headers"] = json!(false);
    let mut r = router_with(&p);
    let auth = token(TENANT_A, "system/Patient.rs", "app");
    // Allowed: headers go on at once (content-length kept: the body is not edited), the body is held whole.
    let (mut s, _, _) = send(&mut r, "GET", "/Patient", &auth);
    let mut out = Recorded::default();
    let header = |name: &str| (name == "content-type").then(|| "application/fhir+json".to_string());
    assert_eq!(r.on_response_headers(&mut s, false, &header, &mut out), Flow::Continue);
    assert_eq!(r.on_response_body(&mut s, false, &mut Vec::new, &mut out), Flow::Buffer, "a chunk is held");
    let body = bundle_of(&["Patient"]);
    assert_eq!(r.on_response_body(&mut s, true, &mut || body.clone(), &mut out), Flow::Continue);
    assert!(out.0.is_empty(), "{:?}", out.0);
    // Refused: the body is held (never let go), the reply is asked for (Envoy resets the stream, the headers
    // having gone), counted and logged as any withheld answer.
    let (mut s, _, _) = send(&mut r, "GET", "/Patient", &auth);
    let (h, b, effects) = answer(&r, &mut s, "application/fhir+json", &bundle_of(&["Patient", "Observation"]));
    assert_eq!((h, b), (Flow::Continue, Flow::Stop));
    assert_eq!(replied(&effects).unwrap().0, 403);
    assert!(effects.contains(&"Count(ResponsesWithheldForbidden)".to_string()), "{effects:?}");
    assert!(effects.contains(&format!("Count(TenantForbidden({TENANT_A:?}))")), "{effects:?}");
    let log = effects.iter().find(|e| e.starts_with("Log(Warn")).unwrap();
    assert!(log.contains("the stream is reset") && log.contains("Observation x1"), "{log}");
    // What cannot be checked is still answered from the headers (nothing went yet).
    let (mut s, _, _) = send(&mut r, "GET", "/Patient", &auth);
    let (h, _, effects) = answer(&r, &mut s, "application/xml", b"<x/>");
    assert_eq!((h, replied(&effects).unwrap().0), (Flow::Stop, 406));
    assert!(!effects.iter().any(|e| e.contains("reset")), "{effects:?}");
}

#[test]
fn without_hold_bundle_headers_paging_cursors_edit_the_body_behind_headers_that_went_on() {
    let config = |hold: bool| {
        let mut p = plugin();
        p["public_base_url"] = json!(BASE);
        p["paging_cursors"] = json!({"key": {"env": "CURSOR_KEY"}, "ttl_s": 600});
        p["hold_bundle_headers"] = json!(hold);
        Config::from_json_with_env(p.to_string().as_bytes(), &|n| (n == "CURSOR_KEY").then(|| KEY.to_string())).unwrap()
    };
    let auth = token(TENANT_A, "", "app-a");
    for hold in [true, false] {
        let mut r = Router::new(config(hold), T0_MS, &mut Recorded::default());
        let (mut s, _, _) = send(&mut r, "GET", "/Patient?name=x", &auth);
        let (h, b, effects) = answer(&r, &mut s, "application/fhir+json", &hapi_page(&["Patient"]));
        let held = if hold { Flow::Buffer } else { Flow::Continue };
        assert_eq!((h, b), (held, Flow::Continue), "hold_bundle_headers {hold}: {effects:?}");
        assert!(effects.contains(&"RemoveResponseHeader(\"content-length\")".to_string()), "{effects:?}");
        assert!(replaced_body(&effects)["link"][1]["url"].as_str().unwrap().contains("_cursor="));
    }
}
