"""examples/rbac/envoy.yaml in real Envoy 1.40, in the build under test (--build wasm / dynamic-module): Envoy's
RBAC filter, after ours, reads the filter's decision (`decision_metadata`: filter state
wasm.fhir_tenant_router.*) and makes tenant B read-only, while tenant A may write. The oracle is Envoy's own
RBAC filter and the recording upstreams: every deny is RBAC's 403 (its response code details
`rbac_access_denied_matched_policy[tenant-b-read-only]`, counted in http.fhir_ingress.rbac.denied), and a
denied request never reaches tenant B's server; every allow reaches the tenant's server.

The ways around an interaction rule tried here: a method override header or `_method` naming a write on a
read, a write inside a Bundle posted to the base, a write spelled as a POST the server may take as a search.
"""
from __future__ import annotations

import json
import re

import pytest

from conftest import Stack, stop_envoy, wait_for_jwks
from harness import REPO, TENANT_A, TENANT_B, envoy_validate, load_yaml, plugin_json, wait_until
from tokens import Minter

EXAMPLE = REPO / "examples" / "rbac" / "envoy.yaml"
FHIR = {"content-type": "application/fhir+json"}
PATIENT = json.dumps({"resourceType": "Patient", "name": [{"family": "Zzyzx"}]}).encode()


@pytest.fixture(scope="module")
def rbac(start_envoy, idp, upstreams) -> Stack:
    env = start_envoy("envoy-rbac-example", {"idp": idp.port, **upstreams.cluster_ports()}, base=EXAMPLE)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    yield Stack(env, upstreams, minter, idp)
    stop_envoy(env)


def denied_by_rbac(stack: Stack, r, before: int) -> None:
    """RBAC's own 403 (not the filter's OperationOutcome), counted by RBAC, and nothing reached an upstream."""
    assert r.status == 403, r
    assert r.body == b"RBAC: access denied", r.body[:200]
    assert stack.upstreams.hits() == {}, stack.upstreams.hits()
    wait_until(lambda: rbac_denied(stack) > before, 5, "http.fhir_ingress.rbac.denied to count the deny")


def rbac_denied(stack: Stack) -> int:
    return stack.envoy.stats(r"^http\.fhir_ingress\.rbac\.denied$").get("http.fhir_ingress.rbac.denied", 0)


def reached(stack: Stack, r, upstream: str, method: str) -> None:
    assert r.status == 200, r
    hits = stack.upstreams.hits()
    assert list(hits) == [upstream], hits
    assert [q.method for q in hits[upstream]] == [method], hits


def test_the_example_loads_in_envoy_and_rbac_runs_after_the_filter(wasm):
    proc = envoy_validate(EXAMPLE)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    cfg = load_yaml(EXAMPLE)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == ["envoy.filters.http.wasm", "envoy.filters.http.rbac", "envoy.filters.http.router"], names
    assert plugin_json(cfg)["decision_metadata"] is True


@pytest.mark.parametrize("method,path", [
    ("POST", "/Patient"),
    ("PUT", "/Patient/p1"),
    ("PATCH", "/Patient/p1"),
    ("DELETE", "/Patient/p1"),
    ("DELETE", "/Patient?identifier=x"),
    ("POST", "/Patient/p1/$validate"),
])
def test_tenant_b_writes_are_denied_by_rbac_and_never_reach_its_server(rbac, method, path):
    before = rbac_denied(rbac)
    body = PATIENT if method in ("POST", "PUT") else (b"[]" if method == "PATCH" else None)
    headers = {"content-type": "application/json-patch+json"} if method == "PATCH" else FHIR
    r = rbac.get(path, rbac.minter.token(TENANT_B), headers=headers, method=method, body=body)
    denied_by_rbac(rbac, r, before)


@pytest.mark.parametrize("method,path", [
    ("GET", "/Patient/p1"),
    ("GET", "/Patient?name=Zzyzx"),
    ("GET", "/Patient/p1/_history/1"),
    ("GET", "/Patient/p1/_history"),
    ("POST", "/Patient/_search"),
    ("HEAD", "/Patient/p1"),
])
def test_tenant_b_reads_reach_its_server(rbac, method, path):
    headers = {"content-type": "application/x-www-form-urlencoded"} if method == "POST" else None
    body = b"name=Zzyzx" if method == "POST" else None
    r = rbac.get(path, rbac.minter.token(TENANT_B), headers=headers, method=method, body=body)
    reached(rbac, r, "tenant-b", method)


@pytest.mark.parametrize("method,path", [
    ("POST", "/Patient"),
    ("PUT", "/Patient/p1"),
    ("DELETE", "/Patient/p1"),
    ("GET", "/Patient/p1"),
])
def test_tenant_a_may_write_and_read(rbac, method, path):
    r = rbac.get(path, rbac.minter.token(TENANT_A), headers=FHIR, method=method,
                 body=PATIENT if method in ("POST", "PUT") else None)
    reached(rbac, r, "tenant-a", method)


@pytest.mark.parametrize("method,path,headers", [
    # A read that names a write: the filter writes both interactions ("search delete"), not an exact read.
    ("GET", "/Patient?identifier=x&_method=DELETE", {}),
    ("GET", "/Patient/p1", {"x-http-method-override": "DELETE"}),
    # A create the server may take as a search ("create search").
    ("POST", "/Patient", {"x-http-method-override": "GET", **FHIR}),
])
def test_a_method_override_cannot_pass_a_write_as_a_read(rbac, method, path, headers):
    before = rbac_denied(rbac)
    r = rbac.get(path, rbac.minter.token(TENANT_B), headers=headers, method=method,
                 body=PATIENT if method == "POST" else None)
    denied_by_rbac(rbac, r, before)


def test_a_bundle_posted_to_the_base_is_denied_whole_for_tenant_b(rbac):
    # Its entries are a read and a write: as "batch" it is no exact read, so RBAC denies it (fail closed),
    # after the filter held and judged it; nothing of it reaches tenant B's server.
    before = rbac_denied(rbac)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "GET", "url": "Patient/p1"}},
        {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
    ]}
    r = rbac.get("/", rbac.minter.token(TENANT_B), headers=FHIR, method="POST", body=json.dumps(bundle).encode())
    denied_by_rbac(rbac, r, before)
    # Tenant A's same Bundle goes through.
    r = rbac.get("/", rbac.minter.token(TENANT_A), headers=FHIR, method="POST", body=json.dumps(bundle).encode())
    reached(rbac, r, "tenant-a", "POST")


def test_public_metadata_and_the_filters_own_refusals_are_untouched(rbac):
    r = rbac.get("/metadata")
    assert r.status == 200, r
    assert list(rbac.upstreams.hits()) == ["metadata"], rbac.upstreams.hits()
    rbac.upstreams.clear()
    # No token: the filter's own 401 with its OperationOutcome, before RBAC.
    r = rbac.get("/Patient", method="POST", headers=FHIR, body=PATIENT)
    assert r.status == 401, r
    assert r.json()["resourceType"] == "OperationOutcome"
    assert rbac.upstreams.hits() == {}


def access_log_line(stack: Stack, method: str, code: int, tenant: str, interaction: str, has: str = "") -> str:
    """The access log line of this request (written after the answer: waited for, not slept for). Envoy flushes
    its access log late, so lines of an earlier test's requests may come after this test's mark: `has` picks
    this request's."""
    pattern = re.compile(rf"^decision {method} {code} tenant={re.escape(tenant)} .*{re.escape(has)}.*"
                         rf" interaction={interaction} .*$", re.M)

    def found():
        m = pattern.findall(stack.envoy.log_since_mark())
        return m[-1] if m else None

    # Envoy flushes its access log every 10 s (--file-flush-interval-msec) at worst.
    return wait_until(found, 30, f"the access log line of {method} {code}",
                      on_timeout=lambda: stack.envoy.log_tail())


def test_the_access_log_carries_the_decision_and_the_dynamic_module_sets_dynamic_metadata(rbac):
    import harness

    r = rbac.get("/Patient/p1", rbac.minter.token(TENANT_B), headers=FHIR, method="DELETE")
    assert r.status == 403, r
    line = access_log_line(rbac, "DELETE", 403, TENANT_B, "delete")
    assert "client_id=" in line and "interaction=delete resource_type=Patient outcome=allowed" in line, line
    assert "rbac_access_denied_matched_policy[tenant-b-read-only]" in line, line
    # A token with SMART scopes: the scopes the filter enforces, in v2 form, and the issuer that verified it.
    r = rbac.get("/Patient/p1", rbac.minter.token(f"{TENANT_A} system/Patient.read system/Observation.rs"))
    assert r.status == 200, r
    line = access_log_line(rbac, "GET", 200, TENANT_A, "read", has="scopes=system/Patient.rs system/Observation.rs")
    assert f"issuer={rbac.idp.issuer} scopes=system/Patient.rs system/Observation.rs " in line, line
    assert "interaction=read resource_type=Patient outcome=allowed reason=-" in line, line
    if harness.BUILD == "dynamic-module":
        # One set_dynamic_metadata_string_batch call, read back by Envoy's formatter.
        assert f"dm_interaction=read dm_tenant={TENANT_A} " in line, line
    else:
        # Proxy-wasm cannot set dynamic metadata in Envoy 1.40.
        assert "dm_interaction=- dm_tenant=- " in line, line
    assert "p1" not in line, "no path, no id: " + line


def test_the_example_follows_the_config_schema():
    import jsonschema
    schema = json.loads((REPO / "docs" / "config.schema.json").read_text(encoding="utf-8"))
    errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(plugin_json(load_yaml(EXAMPLE)))]
    assert not errors, errors
    doc = plugin_json(load_yaml(EXAMPLE))
    doc["decision_metadata"] = "yes"
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(doc)), "the schema types the field"
