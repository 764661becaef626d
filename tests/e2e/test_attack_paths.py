"""Path and method bypasses: requests WITHOUT a token that dress a protected resource up as one of the public
discovery endpoints (/metadata, /.well-known/smart-configuration), sent to real Envoy running the shipped
envoy/envoy.yaml (normalize_path, merge_slashes, escaped slashes rejected) with our filter.

HTTP/1.1 requests go over a raw socket (attack/rawhttp.py): the request target is sent byte for byte, no
client library normalises it. HTTP/2 requests use h2c with prior knowledge (the listener's codec is AUTO)
through the `h2` state machine with its header validation off, so odd pseudo-headers really go out.

For every case: no TENANT upstream may see anything. The metadata upstream may legitimately receive a
request that Envoy normalised to a public path, and then only GET/HEAD of exactly that path. Each case
also pins the status Envoy answers and what (if anything) the metadata upstream saw, so a change in
Envoy's or the filter's behaviour shows up as a failure to look at."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest

from attack.rawhttp import RawResponse, build_request, h2_request, send_raw
from checks import assert_operation_outcome, assert_wasm_vm_never_crashed

PUBLIC = ("/metadata", "/.well-known/smart-configuration")


@dataclass
class Case:
    send: Callable[[int], RawResponse]  # listener port -> response
    status: int | tuple[int, ...]       # what Envoy answers (0: no response, the stream/connection was reset)
    metadata_saw: str | None = None     # the one request target the metadata upstream saw, if any
    note: str = ""


def h1(method: str | bytes, target: str | bytes | Callable[[int], str], headers=(), body: bytes | None = None,
       version: bytes = b"HTTP/1.1", host: str | bytes | None = b"127.0.0.1"):
    def send(port: int) -> RawResponse:
        t = target(port) if callable(target) else target
        hdrs = [("accept", "application/fhir+json"), *headers]
        return send_raw(port, build_request(method, t, hdrs, body, version=version, host=host),
                        head=method in ("HEAD", b"HEAD"))
    return send


def h2(*pseudo: tuple[str, str], headers=(), body: bytes | None = None):
    def send(port: int) -> RawResponse:
        hdrs = [(k, v.replace("{port}", str(port))) for k, v in pseudo] + list(headers)
        return h2_request(port, hdrs, body)
    return send


def h2_get(path: str, method: str = "GET"):
    return h2((":method", method), (":scheme", "http"), (":authority", "127.0.0.1:{port}"), (":path", path))


def raw_bytes(data: Callable[[int], bytes], until_eof: bool = False):
    return lambda port: send_raw(port, data(port), until_eof=until_eof)


H2_REFUSED = "ENVOY: malformed HTTP/2 request, the connection is closed or reset without a response"
SMUGGLE = (b"GET /metadata HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 44\r\ntransfer-encoding: chunked\r\n\r\n"
           b"0\r\n\r\nGET /Patient HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
PIPELINE = (b"GET /metadata HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
            b"GET /metadata/../Patient HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")

CASES: dict[str, Case] = {
    # --- dot segments, encoded or not, behind the public path: Envoy resolves them, the filter sees /Patient
    "h1-metadata-dot-dot-patient": Case(h1("GET", "/metadata/../Patient"), 401),
    "h1-metadata-encoded-dot-dot-patient": Case(h1("GET", "/metadata/%2e%2e/Patient"), 401),
    "h1-metadata-upper-encoded-dot-dot-patient": Case(h1("GET", "/metadata/%2E%2E/Patient"), 401),
    "h1-metadata-encoded-dot-dot-encoded-slash": Case(h1("GET", "/metadata/%2e%2e%2fPatient"), 400,
                                                      note="ENVOY: escaped slash, REJECT_REQUEST"),
    "h1-metadata-encoded-slash-dot-dot": Case(h1("GET", "/metadata%2F..%2FPatient"), 400,
                                              note="ENVOY: escaped slash, REJECT_REQUEST"),
    "h1-double-slash-metadata-dot-dot": Case(h1("GET", "//metadata/../Patient"), 401),
    "h1-metadata-semicolon-dot-dot": Case(h1("GET", "/metadata;/../Patient"), 401),
    "h1-metadata-dot-dot-semicolon-tomcat-style": Case(h1("GET", "/metadata/..;/Patient"), 401),
    "h1-metadata-semicolon-parameter": Case(h1("GET", "/metadata;x"), 401),
    "h1-smart-configuration-dot-dot-dot-dot": Case(h1("GET", "/.well-known/smart-configuration/../../Patient"),
                                                   401),
    "h1-smart-configuration-encoded-slashes": Case(h1("GET", "/.well-known/smart-configuration%2F..%2F..%2FPatient"),
                                                   400, note="ENVOY: escaped slash, REJECT_REQUEST"),
    "h1-deep-dot-dots-to-a-history": Case(h1("GET", "/metadata/%2e%2e/%2e%2e/Patient/1/_history"), 401),
    "h1-dot-dot-back-to-metadata-is-public": Case(h1("GET", "/Patient/../metadata"), 200, "/metadata",
                                                  note="normalised by Envoy to the public path itself"),
    # --- case, suffixes, query
    "h1-upper-case-metadata": Case(h1("GET", "/METADATA"), 401),
    "h1-capitalised-metadata": Case(h1("GET", "/Metadata"), 401),
    "h1-metadata-dot-dot-in-the-query-is-public": Case(h1("GET", "/metadata?/../Patient"), 200,
                                                       "/metadata?/../Patient",
                                                       note="the path is /metadata; the query is not a path"),
    # --- methods
    "h1-post-metadata": Case(h1("POST", "/metadata", [("content-type", "application/fhir+json")], b"{}"), 401),
    "h1-put-metadata": Case(h1("PUT", "/metadata", [("content-type", "application/fhir+json")], b"{}"), 401),
    "h1-delete-metadata": Case(h1("DELETE", "/metadata"), 401),
    "h1-patch-metadata": Case(h1("PATCH", "/metadata", [("content-type", "application/json-patch+json")], b"[]"),
                              401),
    "h1-options-metadata": Case(h1("OPTIONS", "/metadata"), 401),
    "h1-lower-case-get-metadata": Case(h1("get", "/metadata"), 400,
                                       note="ENVOY: methods are case-sensitive, 'get' is refused by the codec"),
    "h1-head-patient": Case(h1("HEAD", "/Patient"), 401),
    "h1-get-metadata-with-a-method-override-header-is-public": Case(
        h1("GET", "/metadata", [("x-http-method-override", "DELETE")]), 200, "/metadata",
        note="reaches the public metadata server only, as the GET it is"),
    # --- request-target forms
    "h1-absolute-form-patient": Case(h1("GET", lambda p: f"http://127.0.0.1:{p}/Patient"), 401),
    "h1-absolute-form-metadata-dot-dot": Case(h1("GET", "http://x/metadata/../Patient"), 401),
    "h1-absolute-form-metadata-is-public": Case(h1("GET", lambda p: f"http://127.0.0.1:{p}/metadata"), 200,
                                                "/metadata"),
    "h1-origin-form-without-leading-slash": Case(h1("GET", "metadata"), 400, note="ENVOY: invalid request target"),
    "h1-asterisk-form-get": Case(h1("GET", "*"), 400, note="ENVOY: '*' only with OPTIONS"),
    "h1-asterisk-form-options": Case(h1("OPTIONS", "*"), 404, note="ENVOY: local reply absolute_path_rejected"),
    "h1-connect": Case(h1("CONNECT", lambda p: f"127.0.0.1:{p}"), 401, note="the filter: CONNECT is not public"),
    "h1-http-1-0-metadata-dot-dot": Case(h1("GET", "/metadata/../Patient", version=b"HTTP/1.0"), 426,
                                          note="ENVOY: HTTP/1.0 not accepted (Upgrade Required)"),
    # --- fragments, backslashes, NUL, overlong UTF-8
    "h1-patient-fragment-metadata": Case(h1("GET", "/Patient#/metadata"), 400, note="ENVOY: fragment in the target"),
    "h1-metadata-fragment-dot-dot": Case(h1("GET", "/metadata#/../Patient"), 400, note="ENVOY: fragment in the target"),
    "h1-metadata-backslash-dot-dot": Case(h1("GET", "/metadata\\..\\Patient"), 401,
                                          note="Envoy turns \\ into / and resolves .."),
    "h1-metadata-slash-dot-dot-backslash": Case(h1("GET", "/metadata/..\\Patient"), 401),
    "h1-metadata-encoded-backslash-dot-dot": Case(h1("GET", "/metadata%5C..%5CPatient"), 400,
                                                  note="ENVOY: escaped backslash, REJECT_REQUEST"),
    "h1-metadata-encoded-nul": Case(h1("GET", "/metadata%00"), 400, note="ENVOY: %00 refused by normalisation"),
    "h1-metadata-encoded-nul-dot-dot": Case(h1("GET", "/metadata%00/../../Patient"), 400,
                                            note="ENVOY: %00 refused by normalisation"),
    "h1-metadata-raw-nul": Case(h1("GET", b"/metadata\x00/../Patient"), 400, note="ENVOY: NUL in the target"),
    "h1-metadata-overlong-utf8-dots-encoded": Case(h1("GET", "/metadata/%c0%ae%c0%ae/Patient"), 401,
                                                   note="not decoded as dots; not a public path"),
    "h1-metadata-overlong-utf8-dots-raw": Case(h1("GET", b"/metadata/\xc0\xae\xc0\xae/Patient"), 400,
                                               note="ENVOY: raw non-ASCII in the target"),
    # --- several requests on one connection
    "h1-pipelined-metadata-then-dot-dot-patient": Case(raw_bytes(lambda p: PIPELINE, until_eof=True), 200,
                                                       "/metadata", note="first response; second checked below"),
    "h1-smuggled-patient-in-a-chunked-get-metadata": Case(raw_bytes(lambda p: SMUGGLE, until_eof=True), 400,
                                                          note="ENVOY: content-length with transfer-encoding"),
    # --- HTTP/2 (h2c prior knowledge)
    "h2-path-metadata-dot-dot-patient": Case(h2_get("/metadata/../Patient"), 401),
    "h2-path-without-leading-slash": Case(h2_get("metadata"), 0, note=H2_REFUSED),
    "h2-path-asterisk-get": Case(h2_get("*"), 0, note=H2_REFUSED),
    "h2-path-metadata-fragment-dot-dot": Case(h2_get("/metadata#/../Patient"), 400, note="ENVOY: fragment"),
    "h2-path-double-slash-metadata-dot-dot": Case(h2_get("//metadata/../Patient"), 401),
    "h2-path-metadata-encoded-slash-dot-dot": Case(h2_get("/metadata%2F..%2FPatient"), 400),
    "h2-path-empty": Case(h2_get(""), 0, note=H2_REFUSED),
    "h2-post-metadata": Case(h2_get("/metadata", "POST"), 401),
    "h2-connect": Case(h2((":method", "CONNECT"), (":authority", "127.0.0.1:{port}")), 401,
                       note="the filter: CONNECT is not public"),
    "h2-two-paths-metadata-then-patient": Case(
        h2((":method", "GET"), (":scheme", "http"), (":authority", "127.0.0.1:{port}"), (":path", "/metadata"),
           (":path", "/Patient")), 0, note=H2_REFUSED),
    "h2-two-paths-patient-then-metadata": Case(
        h2((":method", "GET"), (":scheme", "http"), (":authority", "127.0.0.1:{port}"), (":path", "/Patient"),
           (":path", "/metadata")), 0, note=H2_REFUSED),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_disguised_request_without_a_token_never_reaches_a_tenant(stack, case):
    resp = case.send(stack.envoy.port)
    hits = stack.upstreams.hits()
    seen = [(r.method, r.path) for r in hits.get("metadata", [])]
    observed = f"status={resp.status} reset={resp.reset!r} metadata saw={seen} ({case.note})"

    assert "tenant-a" not in hits and "tenant-b" not in hits, f"REACHED A TENANT: {hits} — {observed}"
    for method, path in seen:  # the metadata server only ever sees a public GET/HEAD
        assert method in ("GET", "HEAD") and path.split("?")[0] in PUBLIC, observed
    allowed = case.status if isinstance(case.status, tuple) else (case.status,)
    assert resp.status in allowed, observed
    expected_seen = [] if case.metadata_saw is None else [case.metadata_saw]
    assert [p for _, p in seen] == expected_seen, observed
    if resp.status == 200:
        assert seen, observed  # a 200 must come from the metadata server, not from anywhere else
    if resp.status == 401:  # the filter's refusal (no body to check for HEAD)
        assert (resp.header("content-type") or "").startswith("application/fhir+json"), resp
        assert (resp.header("www-authenticate") or "").startswith("Bearer"), resp
        assert "error=" not in (resp.header("www-authenticate") or ""), resp
        if resp.body:
            assert_operation_outcome(resp, 401)


def test_the_path_corpus_has_at_least_twenty_five_cases():
    assert len(CASES) >= 25, len(CASES)


def test_the_second_pipelined_request_is_refused_after_the_public_first_one(stack):
    resp = raw_bytes(lambda p: PIPELINE, until_eof=True)(stack.envoy.port)
    assert resp.statuses() == [200, 401], resp.raw[:2000]
    assert [r.path for r in stack.upstreams.hits().get("metadata", [])] == ["/metadata"]
    assert set(stack.upstreams.hits()) == {"metadata"}


def test_control_h2c_prior_knowledge_reaches_envoy_and_metadata_is_public(stack):
    resp = h2_get("/metadata")(stack.envoy.port)
    assert resp.status == 200, resp
    assert [(r.method, r.path) for r in stack.upstreams.hits()["metadata"]] == [("GET", "/metadata")]


def test_control_h2c_get_patient_without_a_token_is_the_filters_401(stack):
    resp = h2_get("/Patient")(stack.envoy.port)
    assert_operation_outcome(resp, 401)
    assert stack.upstreams.hits() == {}


def test_control_h2c_get_patient_with_a_valid_token_reaches_tenant_a(stack):
    resp = h2((":method", "GET"), (":scheme", "http"), (":authority", "127.0.0.1:{port}"), (":path", "/Patient"),
              headers=[("authorization", "Bearer " + stack.minter.token())])(stack.envoy.port)
    assert resp.status == 200, resp
    assert list(stack.upstreams.hits()) == ["tenant-a"], stack.upstreams.hits()


def test_control_a_raw_http1_get_metadata_is_public(stack):
    resp = h1("GET", "/metadata")(stack.envoy.port)
    assert resp.status == 200, resp
    assert [r.path for r in stack.upstreams.hits()["metadata"]] == ["/metadata"]


def test_no_request_in_this_module_crashed_the_wasm_vm(stack):
    assert_wasm_vm_never_crashed(stack.envoy)
