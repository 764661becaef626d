"""Only GET/HEAD of the FHIR discovery endpoints are public, and no spelling of another path is."""
import pytest

from checks import assert_no_upstream_saw_anything, assert_unauthorized, assert_wasm_vm_never_crashed
from harness import ROUTE_HEADER, TENANT_A, TENANT_HEADER


def _only_metadata_saw(stack, method, path):
    hits = stack.upstreams.hits()
    assert list(hits) == ["metadata"], hits
    (req,) = hits["metadata"]
    assert (req.method, req.path) == (method, path)
    return req


def test_get_metadata_without_a_token_returns_the_capability_statement(stack):
    resp = stack.get("/metadata")
    assert resp.status == 200, resp
    assert resp.json()["resourceType"] == "CapabilityStatement"
    _only_metadata_saw(stack, "GET", "/metadata")


def test_get_metadata_with_a_query_without_a_token_is_public_too(stack):
    resp = stack.get("/metadata?_format=json")
    assert resp.status == 200, resp
    assert resp.json()["resourceType"] == "CapabilityStatement"
    _only_metadata_saw(stack, "GET", "/metadata?_format=json")


def test_head_metadata_without_a_token_is_public(stack):
    resp = stack.get("/metadata", method="HEAD")
    assert resp.status == 200, resp
    assert resp.body == b""
    _only_metadata_saw(stack, "HEAD", "/metadata")


def test_head_metadata_announces_the_length_get_sends_or_none(stack):
    # RFC 9110 §8.6: a HEAD answer's content-length is GET's, or absent. GET sends the patched statement; the
    # upstream's HEAD answer announces the unpatched one's length.
    get = stack.get("/metadata")
    head = stack.get("/metadata", method="HEAD")
    assert head.status == 200 and head.body == b"", head
    length = head.header("content-length")
    assert length is None or int(length) == len(get.body), (head, len(get.body))


def test_the_smart_configuration_without_a_token_is_answered_by_the_filter_from_its_config(stack):
    resp = stack.get("/.well-known/smart-configuration")
    assert resp.status == 200, resp
    doc = resp.json()
    assert doc["token_endpoint"] == "http://127.0.0.1:9000/token"  # envoy/envoy.yaml's discovery section
    assert doc["grant_types_supported"] == ["client_credentials"]
    # Client credentials never use an authorization endpoint: no response type (and never the implicit `token`).
    assert "authorization_endpoint" not in doc and "response_types_supported" not in doc, doc
    assert doc["code_challenge_methods_supported"] == ["S256"], doc
    assert stack.upstreams.hits() == {}, "answered locally, no upstream involved"


def test_metadata_is_patched_with_the_token_url(stack):
    resp = stack.get("/metadata")
    assert resp.status == 200, resp
    ext = resp.json()["rest"][0]["security"]["extension"][0]
    assert ext["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    assert ext["extension"][0] == {"url": "token", "valueUri": "http://127.0.0.1:9000/token"}


def test_a_spoofed_route_header_on_metadata_still_goes_to_the_metadata_server(stack):
    resp = stack.get("/metadata", None, {ROUTE_HEADER: "tenant_a", TENANT_HEADER: TENANT_A})
    assert resp.status == 200, resp
    req = _only_metadata_saw(stack, "GET", "/metadata")
    assert req.headers.get(ROUTE_HEADER, ["fhir_metadata"]) == ["fhir_metadata"], req.headers
    assert TENANT_HEADER not in req.headers, req.headers


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_writing_to_metadata_without_a_token_is_unauthorized(stack, method):
    resp = stack.get("/metadata", method=method, body=b"{}", headers={"content-type": "application/fhir+json"})
    assert_unauthorized(resp, invalid_token=False)
    assert_no_upstream_saw_anything(stack.upstreams)


def test_get_patient_without_a_token_is_unauthorized(stack):
    assert_unauthorized(stack.get("/Patient"), invalid_token=False)
    assert_no_upstream_saw_anything(stack.upstreams)


@pytest.mark.parametrize("path", [
    "/metadata/../Patient",
    "/metadata/%2e%2e/Patient",
    "/metadata/.%2E/Patient",
    "//metadata/../Patient",
    "/./metadata/../../Patient",
    "/metadata/..//Patient",
    "/metadata/x/../../Patient",
])
def test_dot_segment_spellings_are_normalised_to_the_protected_path_and_refused(stack, path):
    resp = stack.get(path)
    assert_unauthorized(resp, invalid_token=False)
    assert_no_upstream_saw_anything(stack.upstreams)


@pytest.mark.parametrize("path", [
    "/metadata%2F..%2FPatient",
    "/metadata/..%2FPatient",
    "/metadata%2f..%2fPatient",
    "/metadata%5C..%5CPatient",
])
def test_escaped_slash_spellings_are_rejected_by_envoy(stack, path):
    resp = stack.get(path)
    assert resp.status == 400, resp
    assert_no_upstream_saw_anything(stack.upstreams)


@pytest.mark.parametrize("path", [
    "//metadata", "///metadata?_format=json", "/metadata/", "/metadata/Patient", "/Metadata", "/metadataX",
    "/metadata;/Patient", "/metadata%00", "/%6Detadata", "/metadata/.", "/metadata\\..\\Patient",
    "/metadata?x=/../Patient", "/.well-known/smart-configuration/../../Patient",
])
def test_metadata_like_spellings_without_a_token_never_reach_a_tenant(stack, path):
    resp = stack.get(path)
    hits = stack.upstreams.hits()
    assert "tenant-a" not in hits and "tenant-b" not in hits, (path, resp, hits)
    # the metadata server may see it only if Envoy normalised it to the public path itself
    for req in hits.get("metadata", []):
        assert req.path.split("?")[0] == "/metadata", (path, req.path)
    if not hits:
        assert resp.status in (400, 401), resp


def test_no_request_in_this_module_crashed_the_wasm_vm(stack):
    assert_wasm_vm_never_crashed(stack.envoy)
