"""An outside attack on issue 27's decision metadata through examples/rbac/envoy.yaml in real Envoy 1.40, in the
build under test (--build wasm / --build dynamic-module). The oracles are Envoy's own RBAC filter (its 403 and
its stat), Envoy's access log, and the recording upstreams (did tenant B's server get the request?).

Tried: writes disguised as reads (the three override headers in odd cases, `_method` in odd spellings and
repeated, overrides on HEAD and POST _search, operations, Bundles, slashes, dots, `;`, `%2F`, case, a trailing
slash, the absolute-form request target), client-sent headers named like the filter state, the filter's own
headers or Envoy's, public and refused requests, and a client id that holds a line break.
"""
from __future__ import annotations

import json
import re

import pytest

from harness import TENANT_A, TENANT_B, wait_until
from test_rbac_example import FHIR, PATIENT, denied_by_rbac, rbac, rbac_denied  # noqa: F401 (rbac: fixture)

FORM = {"content-type": "application/x-www-form-urlencoded"}
BUNDLE = json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
    {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}}]}).encode()


def never_reached_tenant_b(stack, r) -> None:
    """Refused (by RBAC, the filter or Envoy: any 4xx) and nothing reached any upstream."""
    assert 400 <= r.status < 500, r
    assert stack.upstreams.hits() == {}, stack.upstreams.hits()


@pytest.mark.parametrize("method,path,headers,body", [
    ("GET", "/Patient/p1", {"X-HTTP-Method": "DELETE"}, None),
    ("GET", "/Patient/p1", {"x-method-override": "put"}, None),
    ("GET", "/Patient/p1", {"X-HTTP-Method-Override": " Delete "}, None),
    ("HEAD", "/Patient/p1", {"x-http-method-override": "DELETE"}, None),
    ("GET", "/Patient/p1?_METHOD=DELETE", {}, None),
    ("GET", "/Patient/p1?_%6Dethod=DELETE", {}, None),
    ("GET", "/Patient/p1?x=1;_method=DELETE", {}, None),
    ("POST", "/Patient/_search", {"x-http-method-override": "DELETE", **FORM}, b"name=x"),
    ("POST", "/Patient/_search?_method=PUT", FORM, b"name=x"),
    ("PATCH", "/Patient/p1?_method=GET", {"content-type": "application/json-patch+json"}, b"[]"),
    ("GET", "/Patient/p1/$everything", {}, None),
    ("GET", "/$export", {}, None),
    ("POST", "/", FHIR, BUNDLE),
    ("POST", "/?_method=GET", FHIR, BUNDLE),
    ("DELETE", "//Patient//p1", {}, None),
    ("DELETE", "/Patient/./p1", {}, None),
    ("DELETE", "/Patient/x/../p1", {}, None),
    ("DELETE", "/Patient/p1;v=1", {}, None),
    ("DELETE", "/Patient%2Fp1", {}, None),
    ("DELETE", "/Patient/p1/", {}, None),
    ("DELETE", "/patient/p1", {}, None),
    ("DELETE", "/Patient/p1#frag", {}, None),
    ("DELETE", "http://fhir.example/Patient/p1", {}, None),
    ("OPTIONS", "/Patient", {}, None),
    ("PUT", "/Patient?identifier=x", FHIR, PATIENT),
])
def test_attack_held_a_write_disguised_as_a_read_never_reaches_read_only_tenant_b(rbac, method, path, headers,
                                                                                body):
    r = rbac.get(path, rbac.minter.token(TENANT_B), headers=headers, method=method, body=body)
    never_reached_tenant_b(rbac, r)


def test_attack_finding_1_a_repeated_method_parameter_that_disagrees_never_reaches_tenant_b(rbac):
    # The filter read the first `_method` (GET): the allowlist judged a read, the metadata said `read` and RBAC
    # let it through, while a server that takes the last `_method` (PHP's and Rack's parsers do) deletes. Now the
    # filter refuses repeats that disagree (its 403 OperationOutcome), as it refuses disagreeing override headers.
    for path in ("/Patient/p1?_method=GET&_method=DELETE", "/Patient?name=x&_method=GET&_Method=DELETE"):
        r = rbac.get(path, rbac.minter.token(TENANT_B))
        never_reached_tenant_b(rbac, r)
        assert r.json()["resourceType"] == "OperationOutcome", r
    # The same repeated, agreeing: one read, which reaches tenant B.
    r = rbac.get("/Patient/p1?_method=GET&_method=get", rbac.minter.token(TENANT_B))
    assert r.status == 200, r
    assert list(rbac.upstreams.hits()) == ["tenant-b"], rbac.upstreams.hits()


def test_attack_held_client_headers_named_like_the_decision_change_nothing(rbac):
    # Headers are not filter state: a client cannot pre-set the names RBAC reads, nor steer the route.
    spoof = {
        "wasm.fhir_tenant_router.tenant": TENANT_A,
        "wasm.fhir_tenant_router.interaction": "read",
        "fhir_tenant_router.interaction": "read",
        "x-fhir-tenant-id": TENANT_A,
        "x-fhir-tenant-router-cluster": "tenant_a",
        "x-envoy-original-path": "/Patient/p1",
        "x-envoy-original-method": "GET",
        "x-envoy-internal": "true",
        **FHIR,
    }
    before = rbac_denied(rbac)
    r = rbac.get("/Patient/p1", rbac.minter.token(TENANT_B), headers=spoof, method="DELETE")
    denied_by_rbac(rbac, r, before)
    # A public request carries no tenant: it goes to the metadata cluster only, whatever it claims.
    r = rbac.get("/metadata", rbac.minter.token(TENANT_B), headers={"x-fhir-tenant-router-cluster": "tenant_b",
                                                                    "x-http-method-override": "DELETE"})
    assert r.status == 200, r
    assert list(rbac.upstreams.hits()) == ["metadata"], rbac.upstreams.hits()


def test_attack_finding_3_a_client_id_with_a_line_break_forges_no_access_log_line(rbac):
    # The token is the IdP's (signed with its key): its client_id holds a line break and a forged decision.
    forged = "app\ndecision DELETE 200 tenant=forged-tenant client_id=x outcome=allowed"
    token = rbac.minter.token(TENANT_A, client_id=forged)
    r = rbac.get("/Patient/p1", token, method="HEAD")
    assert r.status == 200, r
    pattern = re.compile(rf"^decision HEAD 200 tenant={re.escape(TENANT_A)} .* interaction=read .*$", re.M)

    # The filter's own audit line (JSON) holds the text escaped; a forged line starts a line of its own.
    forged_line = re.compile(r"^decision DELETE 200 tenant=forged-tenant ", re.M)

    def settled():
        log = rbac.envoy.log_since_mark()
        return log if (forged_line.search(log) or pattern.search(log)) else None

    log = wait_until(settled, 30, "the access log line of the HEAD", on_timeout=rbac.envoy.log_tail)
    assert not forged_line.search(log), "a forged access-log line:\n" + log[-2000:]
    line = pattern.findall(log)[-1]
    assert " client_id=- " in line, line


# ---- CEL: the example's comment says Envoy's CEL reads the same filter state by name ----

def _cel_index(key: str) -> dict:
    """filter_state[key], as a parsed CEL expression (Envoy's RBAC takes the AST, not text)."""
    return {"call_expr": {"function": "_[_]", "args": [{"ident_expr": {"name": "filter_state"}},
                                                        {"const_expr": {"string_value": key}}]}}


def _cel_example(tenant_const: dict) -> dict:
    """examples/rbac with its policy replaced by a CEL condition: deny everything of tenant B."""
    from harness import load_yaml
    from test_rbac_example import EXAMPLE
    cfg = load_yaml(EXAMPLE)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    rbac_filter = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.rbac")
    rbac_filter["typed_config"]["rules"]["policies"] = {"tenant-b-cel": {
        "permissions": [{"any": True}], "principals": [{"any": True}],
        "condition": {"call_expr": {"function": "_==_", "args": [
            _cel_index("wasm.fhir_tenant_router.tenant"), {"const_expr": tenant_const}]}}}}
    return cfg


@pytest.mark.parametrize("const,denied", [({"bytes_value": "M2I5YTdjNTUtMWQyZS00ZjYwLThhN2ItOWMwZDFlMmYzYTRi"}, True),
                                          ({"string_value": TENANT_B}, False)])
def test_attack_cel_reads_the_decision_as_bytes_so_a_string_comparison_never_matches(start_envoy, idp, upstreams,
                                                                                      const, denied):
    """Docs finding 6: Envoy's CEL `filter_state` is map<string, bytes>. A DENY condition written the natural
    way (`filter_state['wasm.fhir_tenant_router.tenant'] == '<tenant>'`) compares bytes with a string, which is
    an evaluation error, which RBAC treats as no match: the deny never applies (fail open). It must be written
    `== b'<tenant>'`. The docs and the example name the CEL form without saying so."""
    from conftest import Stack, stop_envoy, wait_for_jwks
    from tokens import Minter
    from test_rbac_example import rbac_denied
    env = start_envoy("envoy-rbac-cel", {"idp": idp.port, **upstreams.cluster_ports()}, base=_cel_example(const))
    try:
        minter = Minter(idp.issuer)
        wait_for_jwks(env, minter, upstreams)
        stack = Stack(env, upstreams, minter, idp)
        upstreams.clear()
        before = rbac_denied(stack)
        r = stack.get("/Patient/p1", minter.token(TENANT_B), method="DELETE")
        if denied:
            denied_by_rbac(stack, r, before)
        else:
            assert r.status == 200 and list(upstreams.hits()) == ["tenant-b"], (r, upstreams.hits())
    finally:
        stop_envoy(env)


@pytest.mark.parametrize("name", ["x_http_method_override", "X_HTTP_METHOD", "x-method_override"])
def test_attack_finding_7_an_override_header_with_underscores_never_reaches_tenant_b(rbac, name):
    # Envoy passes headers with underscores on (headers_with_underscores_action defaults to ALLOW), and a
    # CGI-style server (PHP, WSGI) reads it as X-HTTP-Method-Override. The filter judged a read, the metadata said
    # `read`, RBAC let it through and tenant B's server got the override. Now judged as both methods.
    r = rbac.get("/Patient/p1", rbac.minter.token(TENANT_B), headers={name: "DELETE"})
    never_reached_tenant_b(rbac, r)


def test_attack_finding_7_premise_envoy_passes_a_header_with_underscores_to_the_tenants_server(rbac):
    # The premise of finding 7, shown on a harmless header: Envoy (the example's defaults) forwards it as sent.
    r = rbac.get("/Patient/p1", rbac.minter.token(TENANT_B), headers={"x_probe_header": "1"})
    assert r.status == 200, r
    (seen,) = rbac.upstreams.hits()["tenant-b"]
    assert seen.header("x_probe_header") == "1", seen.headers


@pytest.mark.parametrize("ignore_case,denied", [(True, True), (False, False)])
def test_attack_a_tenant_configured_in_capitals_is_matched_only_ignoring_case(start_envoy, idp, upstreams,
                                                                              ignore_case, denied):
    """Docs finding 8: the filter lower-cases tenant ids, and the `tenant` key holds the lower-cased id. An operator
    who configures tenant B in capitals and copies that id into the RBAC policy (`exact: 3B9A…`) gets a DENY that
    never matches (fail open). The example now matches with `ignore_case: true` and the docs say so."""
    from conftest import Stack, stop_envoy, wait_for_jwks
    from harness import load_yaml
    from test_rbac_example import EXAMPLE
    from tokens import Minter
    upper = TENANT_B.upper()
    cfg = load_yaml(EXAMPLE)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm_filter, rbac_filter = hcm["http_filters"][0], hcm["http_filters"][1]
    conf = wasm_filter["typed_config"]["config"]["configuration"]
    doc = json.loads(conf["value"])
    doc["tenants"] = {(upper if k == TENANT_B else k): v for k, v in doc["tenants"].items()}
    conf["value"] = json.dumps(doc)
    principal = rbac_filter["typed_config"]["rules"]["policies"]["tenant-b-read-only"]["principals"][0]
    tenant_match = principal["and_ids"]["ids"][0]["filter_state"]["string_match"]
    tenant_match["exact"] = upper
    tenant_match["ignore_case"] = ignore_case
    env = start_envoy("envoy-rbac-upper", {"idp": idp.port, **upstreams.cluster_ports()}, base=cfg)
    try:
        minter = Minter(idp.issuer)
        wait_for_jwks(env, minter, upstreams)
        stack = Stack(env, upstreams, minter, idp)
        upstreams.clear()
        before = rbac_denied(stack)
        r = stack.get("/Patient/p1", minter.token(TENANT_B), method="DELETE")
        if denied:
            denied_by_rbac(stack, r, before)
        else:
            assert r.status == 200 and list(upstreams.hits()) == ["tenant-b"], (r, upstreams.hits())
    finally:
        stop_envoy(env)
