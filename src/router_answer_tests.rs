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
    let mut stream = router.open_stream(1);
    let headers: [(&[u8], &[u8]); 3] =
        [(b":method", method.as_bytes()), (b":path", path.as_bytes()), (b"authorization", auth.as_bytes())];
    let mut out = Recorded::default();
    let flow = router.on_request_headers(&mut stream, headers.iter().copied(), true, T0_MS, &PureRust, &mut out);
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
fn a_granted_binary_read_may_come_back_raw() {
    let mut r = router_with(&plugin());
    let (mut s, _, _) = send(&mut r, "GET", "/Binary/1", &token(TENANT_A, "system/Binary.read", "app"));
    assert_eq!(answer(&r, &mut s, "image/png", b"\x89PNG").0, Flow::Continue);
    let (mut s, _, _) = send(&mut r, "GET", "/Binary/1", &token(TENANT_A, "system/Binary.read", "app"));
    let (_, b, _) = answer(&r, &mut s, "application/fhir+json", &bundle_of(&["Patient"]));
    assert_eq!(b, Flow::Stop, "JSON is still checked");
}
