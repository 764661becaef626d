"""Issue 23: a narrowed token (or a tenant with `resource_types`) is judged by what its request reaches.

A real IdP (tests/idp/server.mjs) issues client-credentials tokens with narrow SMART scopes; requests that
reach other resource types through `_include`, `_revinclude`, forward and reverse chains, `_filter`,
compartment searches and operations (in the URL, encoded, in a `POST _search` form body, in batch entries)
must get 403 naming the scope that is missing, and reach no upstream (the recording upstreams). Each refused
request is shown to be one the filter would forward with a wider token (`system/*.rs`), so the refusal comes
from the reach and nothing else. Also: HEAD as GET, conditional interactions, method override headers, a
`client_id` that is not a string on a client-bound tenant, and a request costing more than the burst.

What the upstream would have answered (the leak itself) needs a FHIR engine that implements these classes;
the recording upstreams here only prove that nothing was forwarded.
"""
from __future__ import annotations

from urllib.parse import quote

import pytest

from checks import assert_forbidden, assert_no_upstream_saw_anything, assert_operation_outcome
from checks import assert_served_only_by, assert_wasm_vm_never_crashed
from conftest import stop_envoy, wait_for_jwks
from harness import TENANT_A, CLIENT_A, HarnessError, Idp, free_port
from test_smart_scopes import EVERY_INTERACTION, Scoped, _bundle, assert_insufficient_scope

TENANT_T = "0e0e0e0e-3333-4444-8555-666677778888"  # resource_types: Patient only; no SMART scopes needed
TENANT_C = "0f0f0f0f-4444-4555-8666-777788889999"  # bound to the client CLIENT_A
TENANT_Q = "1a1a1a1a-5555-4666-8777-88889999aaaa"  # quota: burst 3, a search costs _count / 10
CLIENT_R = ("reach-backend", "secret-reach")
SCOPES = (f"{TENANT_A} {TENANT_T} {TENANT_Q} system/Patient.rs system/Patient.read system/*.rs "
          "system/Patient.cud system/Patient.cruds system/Patient.rds system/Patient.s system/Observation.rs")


@pytest.fixture(scope="module")
def reach(workdir, start_envoy, upstreams):
    idp = Idp(free_port(), workdir, name="idp-reach", clients=[
        {"client_id": CLIENT_R[0], "client_secret": CLIENT_R[1], "scope": SCOPES},
        {"client_id": CLIENT_A[0], "client_secret": CLIENT_A[1], "scope": f"{TENANT_C}"},
    ])
    try:
        idp.start()
    except HarnessError as exc:
        idp.stop()
        pytest.fail(str(exc), pytrace=False)

    def plugin(doc):
        doc["tenants"] = {
            TENANT_A: {"cluster": "tenant_a", "allow": {"interactions": EVERY_INTERACTION}},
            TENANT_T: {"cluster": "tenant_b", "allow": {"interactions": ["read", "search", "operation"],
                                                        "resource_types": ["Patient"]}},
            TENANT_C: {"cluster": "tenant_b", "allowed_clients": [CLIENT_A[0]]},
            TENANT_Q: {"cluster": "tenant_b", "quota": {"rate_per_s": 0.001, "burst": 3,
                                                        "search_count_per_unit": 10}},
        }

    env = start_envoy("envoy-reach", {"idp": idp.port, **upstreams.cluster_ports()}, plugin=plugin)
    s = Scoped(env, idp, upstreams)
    s.tokens = {}
    try:
        wait_for_jwks(env, s.minter, upstreams)
        yield s
    finally:
        stop_envoy(env)
        idp.stop()


def token(s: Scoped, scope: str) -> str:
    """One IdP token per scope string for the module (the IdP is real; asking once is enough)."""
    if scope not in s.tokens:
        s.tokens[scope] = s.token(CLIENT_R, scope)
    return s.tokens[scope]


def forwarded(s: Scoped, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
              tenant: str = TENANT_A, scope: str = "system/*.rs"):
    """The same request with a token wide enough reaches the upstream unchanged: the refusal is the reach's."""
    s.upstreams.clear()
    h = {"authorization": f"Bearer {token(s, f'{tenant} {scope}')}", **(headers or {})}
    if body is not None:
        h.setdefault("content-type", "application/x-www-form-urlencoded")
    resp = s.env.request(method, path, h, body)
    upstream = "tenant-a" if tenant == TENANT_A else "tenant-b"
    req = assert_served_only_by(s.upstreams, resp, upstream, tenant, method=method, path=path)
    s.upstreams.clear()
    return req


def refused(s: Scoped, method: str, path: str, want: str, body: bytes | None = None,
            headers: dict | None = None, scope: str = "system/Patient.rs"):
    s.upstreams.clear()
    h = {"authorization": f"Bearer {token(s, f'{TENANT_A} {scope}')}", **(headers or {})}
    if body is not None:
        h.setdefault("content-type", "application/x-www-form-urlencoded")
    resp = s.env.request(method, path, h, body)
    assert_insufficient_scope(s, resp, want, says="do not grant")
    return resp


# Each class, several spellings: (path, the scope a system/Patient.rs token is missing).
URL_CASES = [
    ("/Patient?_include=Patient:general-practitioner", "system/Organization.r"),
    ("/Patient?_include=Patient:general-practitioner:Practitioner", "system/Practitioner.r"),
    ("/Patient?_include=*", "system/*.r"),
    ("/Patient?_include:iterate=Patient:organization", "system/Organization.r"),
    ("/Patient?%5Finclude=Patient%3Aorganization", "system/Organization.r"),
    ("/Patient?_INCLUDE=Patient:organization", "system/Organization.r"),
    ("/Patient?name=x&_revinclude=Observation:patient", "system/Observation.r"),
    ("/Patient?_revinclude:iterate=Observation%3Apatient", "system/Observation.r"),
    ("/Patient?_revinclude=*", "system/*.r"),
    ("/Patient?_has:Observation:patient:code=1234-5", "system/Observation.s"),
    ("/Patient?_has:Observation:patient:_has:AuditEvent:entity:agent=x", "system/AuditEvent.s"),
    ("/Patient?%5Fhas%3AEncounter%3Apatient%3Astatus=finished", "system/Encounter.s"),
    ("/Patient?organization.name=Acme", "system/Organization.s"),
    ("/Patient?general-practitioner:Practitioner.name=x", "system/Practitioner.s"),
    ("/Patient?organization%2Epartof.name=x", "system/Organization.s"),
    ("/Patient?_filter=" + quote("name eq x"), "system/*.s"),
    ("/Patient?name=a&name=b;_include=Patient:link:RelatedPerson", "system/RelatedPerson.r"),
    ("/Patient?%255Finclude=Patient%253Aorganization", "system/Organization.r"),
    ("/Patient?_include%20=Patient:organization", "system/Organization.r"),
    ("/Patient/1/$everything", "system/*.r"),
    ("/Patient/$everything", "system/*.r"),
    ("/Patient/$export", "system/*.r"),
    ("/Patient/$graphql?query=%7BPatient%7Bid%7D%7D", "system/*.r"),
    ("/Patient/$nosuch-operation", "system/*.r"),
    ("/Patient/1/Observation", "system/Observation.s"),
    ("/Patient/1/*", "system/*.s"),
    ("/?_type=Patient", "system/*.s"),
]


@pytest.mark.parametrize("path,want", URL_CASES, ids=[p for p, _ in URL_CASES])
def test_a_narrowed_token_is_refused_what_its_url_reaches(reach, path, want):
    refused(reach, "GET", path, want)
    forwarded(reach, "GET", path)


FORM_CASES = [
    (b"_include=Patient%3Aorganization", "system/Organization.r"),
    (b"name=x&_revinclude=Observation:patient", "system/Observation.r"),
    (b"_has%3AObservation%3Apatient%3Acode=1", "system/Observation.s"),
    (b"organization.name=Acme&_count=5", "system/Organization.s"),
]


@pytest.mark.parametrize("form,want", FORM_CASES, ids=[f.decode() for f, _ in FORM_CASES])
def test_a_post_search_form_body_is_judged_as_its_query(reach, form, want):
    refused(reach, "POST", "/Patient/_search", want, body=form)
    req = forwarded(reach, "POST", "/Patient/_search", body=form)
    assert req.body == form, "the form body goes on unchanged"
    # In the URL of a POST _search too.
    query = form.decode()
    refused(reach, "POST", f"/Patient/_search?{query}", want, body=b"name=x")


def test_a_post_search_with_a_plain_form_passes(reach):
    s = reach
    h = {"authorization": f"Bearer {token(s, f'{TENANT_A} system/Patient.rs')}",
         "content-type": "application/x-www-form-urlencoded"}
    resp = s.env.request("POST", "/Patient/_search", h, b"name=x&_count=5")
    req = assert_served_only_by(s.upstreams, resp, "tenant-a", TENANT_A, method="POST", path="/Patient/_search")
    assert req.body == b"name=x&_count=5"


@pytest.mark.parametrize("entry,want", [
    (("GET", "Patient?_revinclude=Observation:patient"), "system/Observation.r"),
    (("GET", "Patient?_has:Observation:patient:code=1"), "system/Observation.s"),
    (("GET", "Patient?%5Finclude=Patient%3Aorganization"), "system/Organization.r"),
    (("GET", "Patient/1/$everything"), "system/*.r"),
], ids=["revinclude", "has", "encoded-include", "everything"])
def test_batch_entries_are_judged_by_what_they_reach(reach, entry, want):
    bundle = _bundle(("GET", "Patient/1"), entry)
    resp = refused(reach, "POST", "/", want, body=bundle, headers={"content-type": "application/fhir+json"})
    assert "Bundle entry 1" in resp.json()["issue"][0]["diagnostics"]
    forwarded(reach, "POST", "/", body=bundle, headers={"content-type": "application/fhir+json"})


def test_resource_types_judge_the_reach_too(reach):
    s = reach
    scope = f"{TENANT_T} system/*.rs"
    for path in ["/Patient?_revinclude=Observation:patient", "/Patient?_has:Observation:patient:code=1",
                 "/Patient?organization.name=x", "/Patient/1/$everything"]:
        s.upstreams.clear()
        resp = s.env.request("GET", path, {"authorization": f"Bearer {token(s, scope)}"})
        assert_operation_outcome(resp, 403)
        assert "www-authenticate" not in {k.lower() for k in resp.headers}, "the allowlist, not the scopes"
        assert "this request reaches it" in resp.json()["issue"][0]["diagnostics"], path
        assert_no_upstream_saw_anything(s.upstreams)
    forwarded(s, "GET", "/Patient?_include=Patient:link:Patient", tenant=TENANT_T)


def test_head_is_allowed_wherever_get_is(reach):
    s = reach
    auth = {"authorization": f"Bearer {token(s, f'{TENANT_A} system/Patient.rs')}"}
    for path in ["/Patient/1", "/Patient?name=x"]:
        s.upstreams.clear()
        assert_served_only_by(s.upstreams, s.env.request("HEAD", path, auth), "tenant-a", TENANT_A,
                              method="HEAD", path=path)
    s.upstreams.clear()
    resp = s.env.request("HEAD", "/Observation/1", {"authorization": f"Bearer {token(s, f'{TENANT_A} system/Patient.s')}"})
    assert resp.status == 403
    assert 'scope="system/Observation.r"' in (resp.header("www-authenticate") or "")
    assert_no_upstream_saw_anything(s.upstreams)


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
def test_conditional_update_patch_and_delete_are_a_write_and_a_search(reach, method):
    path = "/Patient?identifier=" + quote("http://example.org|1", safe="")
    body = b'{"resourceType":"Patient"}' if method != "DELETE" else None
    hdr = {"content-type": "application/fhir+json"} if body else {}
    refused(reach, method, path, "system/Patient.s", body=body, headers=hdr, scope="system/Patient.cud")
    forwarded(reach, method, path, body=body, headers=hdr, scope="system/Patient.cruds")
    refused(reach, method, path + "&_has:Observation:patient:code=1", "system/Observation.s", body=body,
            headers=hdr, scope="system/Patient.cruds")


def test_conditional_create_if_none_exist_is_a_search(reach):
    body = b'{"resourceType":"Patient"}'
    hdr = {"content-type": "application/fhir+json", "if-none-exist": "identifier=http://example.org|1"}
    refused(reach, "POST", "/Patient", "system/Patient.s", body=body, headers=hdr, scope="system/Patient.cud")
    forwarded(reach, "POST", "/Patient", body=body, headers=hdr, scope="system/Patient.cruds")
    hdr["if-none-exist"] = "_has:Observation:patient:code=1"
    refused(reach, "POST", "/Patient", "system/Observation.s", body=body, headers=hdr, scope="system/Patient.cruds")


@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"])
def test_a_method_override_is_judged_as_the_method_it_names(reach, header):
    refused(reach, "GET", "/Patient/1", "system/Patient.d", headers={header: "DELETE"})
    refused(reach, "POST", "/Patient/_search", "system/Patient.d", body=b"name=x", headers={header: "delete"})
    req = forwarded(reach, "GET", "/Patient/1", headers={header: "DELETE"}, scope="system/Patient.rds")
    assert req.headers.get(header.lower()) == ["DELETE"], "judged as both, it goes on as it came"


def test_a_method_query_parameter_is_an_override_too(reach):
    refused(reach, "GET", "/Patient/1?_method=DELETE", "system/Patient.d")
    forwarded(reach, "GET", "/Patient/1?_method=DELETE", scope="system/Patient.rds")


def test_a_form_it_cannot_read_as_the_server_would_is_refused(reach):
    s = reach
    auth = {"authorization": f"Bearer {token(s, f'{TENANT_A} system/*.rs')}"}
    for extra in [{"content-type": "application/x-www-form-urlencoded", "content-encoding": "gzip"},
                  {"content-type": "application/x-www-form-urlencoded; charset=UTF-16"}]:
        s.upstreams.clear()
        resp = s.env.request("POST", "/Patient/_search", {**auth, **extra}, b"name=x")
        assert_operation_outcome(resp, 403)
        assert "Content-Encoding" in resp.json()["issue"][0]["diagnostics"], extra
        assert_no_upstream_saw_anything(s.upstreams)


def test_a_conditional_reference_in_a_transaction_entry_is_a_search(reach):
    import json
    def transaction(reference: str) -> bytes:
        return json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"request": {"method": "POST", "url": "Patient"},
             "resource": {"resourceType": "Patient", "generalPractitioner": [{"reference": reference}]}}]}).encode()
    hdr = {"content-type": "application/fhir+json"}
    refused(reach, "POST", "/", "system/Practitioner.s", body=transaction("Practitioner?identifier=x|1"),
            headers=hdr, scope="system/Patient.cruds")
    forwarded(reach, "POST", "/", body=transaction("Practitioner/1"), headers=hdr, scope="system/Patient.cruds")


def test_method_override_headers_that_disagree_or_name_no_method_are_refused(reach):
    s = reach
    auth = {"authorization": f"Bearer {token(s, f'{TENANT_A} system/*.rs')}"}
    for extra in [{"X-HTTP-Method-Override": "GET", "X-Method-Override": "DELETE"},
                  {"X-HTTP-Method-Override": "BREW"}, {"X-HTTP-Method": "DELETE, GET"}]:
        s.upstreams.clear()
        resp = s.env.request("GET", "/Patient/1", {**auth, **extra})
        assert_operation_outcome(resp, 403)
        assert "method override" in resp.json()["issue"][0]["diagnostics"], extra
        assert_no_upstream_saw_anything(s.upstreams)


@pytest.mark.parametrize("client_id", [[CLIENT_A[0]], 7, {"id": CLIENT_A[0]}], ids=["list", "number", "object"])
def test_a_client_id_that_is_not_a_string_is_refused_on_a_client_bound_tenant(reach, client_id):
    s = reach
    ok = s.env.request("GET", "/Patient", {"authorization": f"Bearer {s.minter.token(TENANT_C, azp=CLIENT_A[0], client_id=None)}"})
    assert_served_only_by(s.upstreams, ok, "tenant-b", TENANT_C)
    s.upstreams.clear()
    bad = s.minter.token(TENANT_C, client_id=client_id, azp=CLIENT_A[0])
    resp = s.env.request("GET", "/Patient", {"authorization": f"Bearer {bad}"})
    assert_forbidden(resp)
    assert "client may not use this tenant" in resp.json()["issue"][0]["diagnostics"]
    assert_no_upstream_saw_anything(s.upstreams)


def test_a_request_costing_more_than_the_burst_is_told_it_can_never_pass(reach):
    s = reach
    auth = {"authorization": f"Bearer {token(s, f'{TENANT_Q} system/*.rs')}"}
    for method, path, body in [("GET", "/Patient?_count=100", None),
                               ("POST", "/Patient/_search", b"name=x&_count=100")]:
        s.upstreams.clear()
        h = {**auth, **({"content-type": "application/x-www-form-urlencoded"} if body else {})}
        resp = s.env.request(method, path, h, body)
        assert_operation_outcome(resp, 400)
        assert resp.header("retry-after") is None, "no retry can help"
        issue = resp.json()["issue"][0]
        assert issue["code"] == "too-costly" and "burst of 3" in issue["diagnostics"], issue
        assert_no_upstream_saw_anything(s.upstreams)
    # Within the burst it passes (and is charged).
    req = forwarded(s, "GET", "/Patient?_count=20", tenant=TENANT_Q)
    assert req.path == "/Patient?_count=20"


def test_no_request_in_this_module_crashed_the_wasm_vm(reach):
    assert_wasm_vm_never_crashed(reach.env)
