"""Issue 14: SMART scopes narrow the token, and tenants bind the clients allowed to name them.

A real IdP (tests/idp/server.mjs) issues client-credentials tokens whose `scope` holds the tenant id and SMART
`system/` scopes, v1 (`system/Patient.read`) or v2 (`system/Observation.rs`). Tenant A's allowlist allows every
interaction, so what a request may do there is decided by the token's scopes; tenant B requires SMART scopes
(`require_smart_scopes`); tenant C (served by tenant B's upstream) allows only the client `patients-app-a`
(`allowed_clients`). A token with no SMART scope gets the tenant's allowlist alone (the Patients app's contract).
"""
from __future__ import annotations

import json

import pytest

from checks import assert_forbidden, assert_no_upstream_saw_anything, assert_served_only_by
from checks import assert_wasm_vm_never_crashed
from conftest import stop_envoy, wait_for_jwks
from harness import TENANT_A, TENANT_B, CLIENT_A, HarnessError, Idp, bearer, free_port, wait_until
from tokens import Minter

TENANT_C = "0c0c0c0c-1111-4222-8333-444455556666"
TENANT_D = "0d0d0d0d-2222-4333-8444-555566667777"  # only the stats test uses it: its counts start at zero
EVERY_INTERACTION = ["read", "vread", "search", "history", "create", "update", "patch", "delete", "operation"]
CLIENT_V1 = ("smart-backend-v1", "secret-v1")
CLIENT_V2 = ("smart-backend-v2", "secret-v2")
CLIENT_OTHER = ("other-app", "secret-other")
V1_SCOPES = f"{TENANT_A} {TENANT_B} {TENANT_D} system/Patient.read system/*.read"
V2_SCOPES = (f"{TENANT_A} {TENANT_B} system/Observation.rs system/Patient.cruds "
             "system/Observation.rs?category=laboratory patient/Patient.read user/*.cruds")
AUDIT_START = '{"audit":"fhir-tenant-router"'


class Scoped:
    def __init__(self, env, idp: Idp, upstreams):
        self.env, self.idp, self.upstreams = env, idp, upstreams
        self.minter = Minter(idp.issuer)

    def token(self, client: tuple[str, str], scope: str) -> str:
        token = self.idp.access_token(client, scope)
        claims = json.loads(_b64(token.split(".")[1]))
        assert claims["scope"] == scope and claims["client_id"] == client[0], claims  # what the filter reads
        return token

    def send(self, token: str, method: str, path: str, body: bytes | None = None):
        headers = bearer(token)
        if body is not None:
            headers["content-type"] = "application/fhir+json"
        return self.env.request(method, path, headers, body)


def _b64(part: str) -> bytes:
    import base64
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def assert_insufficient_scope(s: Scoped, resp, scope: str, *, says: str) -> None:
    """403 per RFC 6750 with the scope the request needs, a FHIR OperationOutcome, and no upstream request."""
    assert_forbidden(resp)
    challenge = resp.header("www-authenticate")
    assert challenge == (f'Bearer realm="fhir-tenant-router", error="insufficient_scope", scope="{scope}"'), resp
    diagnostics = resp.json()["issue"][0]["diagnostics"]
    assert says in diagnostics and scope in diagnostics, diagnostics
    assert_no_upstream_saw_anything(s.upstreams)


@pytest.fixture(scope="module")
def scoped(workdir, start_envoy, upstreams):
    idp = Idp(free_port(), workdir, name="idp-smart", clients=[
        {"client_id": CLIENT_V1[0], "client_secret": CLIENT_V1[1], "scope": V1_SCOPES},
        {"client_id": CLIENT_V2[0], "client_secret": CLIENT_V2[1], "scope": V2_SCOPES},
        {"client_id": CLIENT_A[0], "client_secret": CLIENT_A[1], "scope": f"{TENANT_A} {TENANT_B} {TENANT_C}"},
        {"client_id": CLIENT_OTHER[0], "client_secret": CLIENT_OTHER[1], "scope": f"{TENANT_C} {TENANT_D}"},
    ])
    try:
        idp.start()
    except HarnessError as exc:
        idp.stop()
        pytest.fail(str(exc), pytrace=False)

    def plugin(doc):
        doc["audit_log"] = True
        doc["tenants"] = {
            TENANT_A: {"cluster": "tenant_a", "allow": {"interactions": EVERY_INTERACTION}},
            TENANT_B: {"cluster": "tenant_b", "require_smart_scopes": True},
            TENANT_C: {"cluster": "tenant_b", "allowed_clients": [CLIENT_A[0]]},
            TENANT_D: {"cluster": "tenant_b", "allowed_clients": [CLIENT_V1[0]], "require_smart_scopes": True},
        }

    env = start_envoy("envoy-smart-scopes", {"idp": idp.port, **upstreams.cluster_ports()}, plugin=plugin)
    s = Scoped(env, idp, upstreams)
    try:
        wait_for_jwks(env, s.minter, upstreams)
        yield s
    finally:
        stop_envoy(env)
        idp.stop()


def _bundle(*entries: tuple[str, str]) -> bytes:
    return json.dumps({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": m, "url": u}, **({"resource": {"resourceType": u.split("/")[0]}} if m in ("POST", "PUT")
                                               else {})}
        for m, u in entries]}).encode()


# ------------------------------------------------------------------------------------------- SMART v1

def test_v1_read_scope_grants_reads_of_its_type_only(scoped):
    token = scoped.token(CLIENT_V1, f"{TENANT_A} system/Patient.read")
    assert_served_only_by(scoped.upstreams, scoped.send(token, "GET", "/Patient/1"), "tenant-a", TENANT_A,
                          path="/Patient/1")
    scoped.upstreams.clear()
    assert_insufficient_scope(scoped, scoped.send(token, "GET", "/Observation?code=8867-4"),
                              "system/Observation.read", says="search interaction on Observation")
    assert_insufficient_scope(scoped, scoped.send(token, "POST", "/Patient", b'{"resourceType":"Patient"}'),
                              "system/Patient.write", says="create interaction on Patient")


def test_v1_wildcard_read_grants_every_type_but_no_write(scoped):
    token = scoped.token(CLIENT_V1, f"{TENANT_A} system/*.read")
    assert_served_only_by(scoped.upstreams, scoped.send(token, "GET", "/Observation?code=8867-4"), "tenant-a",
                          TENANT_A, path="/Observation?code=8867-4")
    scoped.upstreams.clear()
    assert_insufficient_scope(scoped, scoped.send(token, "DELETE", "/Observation/1"), "system/Observation.write",
                              says="delete interaction on Observation")


def test_v1_batch_entries_are_each_narrowed(scoped):
    token = scoped.token(CLIENT_V1, f"{TENANT_A} system/Patient.read")
    reads = _bundle(("GET", "Patient/1"), ("GET", "Patient?name=x"))
    req = assert_served_only_by(scoped.upstreams, scoped.send(token, "POST", "/", reads), "tenant-a", TENANT_A,
                                method="POST", path="/")
    assert req.body == reads
    scoped.upstreams.clear()
    mixed = _bundle(("GET", "Patient/1"), ("GET", "Observation?patient=1"))
    assert_insufficient_scope(scoped, scoped.send(token, "POST", "/", mixed), "system/Observation.read",
                              says="Bundle entry 1")


# ------------------------------------------------------------------------------------------- SMART v2

def test_v2_letters_grant_exactly_their_interactions(scoped):
    token = scoped.token(CLIENT_V2, f"{TENANT_A} system/Observation.rs system/Patient.cruds")
    for method, path in [("GET", "/Observation?code=8867-4"), ("GET", "/Observation/1"), ("DELETE", "/Patient/1"),
                         ("POST", "/Patient/$match")]:
        assert_served_only_by(scoped.upstreams, scoped.send(token, method, path, b"{}" if method == "POST" else None),
                              "tenant-a", TENANT_A, method=method, path=path)
        scoped.upstreams.clear()
    assert_insufficient_scope(scoped, scoped.send(token, "PUT", "/Observation/1", b'{"resourceType":"Observation"}'),
                              "system/Observation.u", says="update interaction on Observation")
    assert_insufficient_scope(scoped, scoped.send(token, "GET", "/Encounter?patient=1"), "system/Encounter.s",
                              says="search interaction on Encounter")
    # An operation by GET changes nothing (FHIR): rs is enough; by POST it may change anything: cruds.
    assert_served_only_by(scoped.upstreams, scoped.send(token, "GET", "/Observation/$lastn?patient=1"), "tenant-a",
                          TENANT_A, path="/Observation/$lastn?patient=1")
    scoped.upstreams.clear()
    assert_insufficient_scope(scoped, scoped.send(token, "POST", "/Observation/$validate", b"{}"),
                              "system/Observation.cruds", says="operation interaction on Observation")


def test_v2_batch_entries_are_each_narrowed(scoped):
    token = scoped.token(CLIENT_V2, f"{TENANT_A} system/Observation.rs system/Patient.cruds")
    fine = _bundle(("GET", "Observation?patient=1"), ("PUT", "Patient/1"), ("DELETE", "Patient/2"))
    assert_served_only_by(scoped.upstreams, scoped.send(token, "POST", "/", fine), "tenant-a", TENANT_A,
                          method="POST", path="/")
    scoped.upstreams.clear()
    refused = _bundle(("GET", "Observation?patient=1"), ("PUT", "Patient/1"), ("POST", "Observation"))
    assert_insufficient_scope(scoped, scoped.send(token, "POST", "/", refused), "system/Observation.c",
                              says="Bundle entry 2")


@pytest.mark.parametrize("scope,path,needed", [
    ("system/Observation.rs?category=laboratory", "/Observation?category=laboratory", "system/Observation.s"),
    ("patient/Patient.read", "/Patient/1", "system/Patient.read"),
    ("user/*.cruds", "/Patient/1", "system/Patient.r"),
], ids=["v2-parameters", "patient-context", "user-context"])
def test_parameterised_patient_and_user_scopes_grant_nothing(scoped, scope, path, needed):
    token = scoped.token(CLIENT_V2, f"{TENANT_A} {scope}")
    assert_insufficient_scope(scoped, scoped.send(token, "GET", path), needed, says="do not grant")


# ------------------------------------------------------------------ no SMART scopes; require_smart_scopes

def test_a_token_with_only_the_tenant_id_gets_the_allowlist_alone(scoped):
    token = scoped.token(CLIENT_A, TENANT_A)
    assert_served_only_by(scoped.upstreams, scoped.send(token, "DELETE", "/Patient/1"), "tenant-a", TENANT_A,
                          method="DELETE", path="/Patient/1")


def test_a_tenant_that_requires_smart_scopes_refuses_the_tenant_id_alone(scoped):
    assert_insufficient_scope(scoped, scoped.send(scoped.token(CLIENT_A, TENANT_B), "GET", "/Patient?name=x"),
                              "system/Patient.read", says="search interaction on Patient")
    token = scoped.token(CLIENT_V1, f"{TENANT_B} system/Patient.read")
    assert_served_only_by(scoped.upstreams, scoped.send(token, "GET", "/Patient?name=x"), "tenant-b", TENANT_B,
                          path="/Patient?name=x")


# --------------------------------------------------------------------------------------- client binding

def test_a_tenant_bound_to_clients_refuses_a_token_of_another_client(scoped):
    assert_served_only_by(scoped.upstreams, scoped.send(scoped.token(CLIENT_A, TENANT_C), "GET", "/Patient"),
                          "tenant-b", TENANT_C)
    scoped.upstreams.clear()
    resp = scoped.send(scoped.token(CLIENT_OTHER, TENANT_C), "GET", "/Patient")
    assert_forbidden(resp)
    assert resp.header("www-authenticate") == 'Bearer realm="fhir-tenant-router", error="insufficient_scope"'
    assert "client may not use this tenant" in resp.json()["issue"][0]["diagnostics"]
    assert_no_upstream_saw_anything(scoped.upstreams)


@pytest.mark.parametrize("claims,allowed", [
    ({"client_id": None, "azp": CLIENT_A[0]}, True),
    ({"client_id": None, "azp": CLIENT_OTHER[0]}, False),
    ({"client_id": None}, False),
    ({"client_id": CLIENT_A[0].upper()}, False),
], ids=["azp-allowed", "azp-other", "no-client", "other-case"])
def test_the_client_is_client_id_else_azp_compared_exactly(scoped, claims, allowed):
    resp = scoped.send(scoped.minter.token(TENANT_C, **claims), "GET", "/Patient")
    if allowed:
        assert_served_only_by(scoped.upstreams, resp, "tenant-b", TENANT_C)
    else:
        assert_forbidden(resp)
        assert_no_upstream_saw_anything(scoped.upstreams)


# ---------------------------------------------------------------------------------------- stats, audit

def test_refusals_are_counted_per_tenant_and_audited_with_their_reason(scoped):
    scoped.env.mark_log()
    # Earlier tests raised the global counters: this test's own two refusals are the difference (issue 24).
    before = scoped.env.settled_router_stats()
    scope_token = scoped.token(CLIENT_V1, f"{TENANT_D} system/Patient.read")
    assert scoped.send(scope_token, "GET", "/Observation?code=8867-4&patient=secret-name").status == 403
    assert scoped.send(scoped.token(CLIENT_OTHER, TENANT_D), "GET", "/Patient?name=secret-name").status == 403
    want = {
        f"tenant.{TENANT_D}.insufficient_scope": 1,
        f"tenant.{TENANT_D}.client_not_allowed": 1,
        f"tenant.{TENANT_D}.forbidden": 2,
        f"tenant.{TENANT_D}.allowed": 0,
    }

    def counted():
        now = scoped.env.router_stats()
        return now if all(now.get(k, 0) == n for k, n in want.items()) else None

    stats = wait_until(counted, 10, "the refusals in the stats", on_timeout=lambda: f"\n{scoped.env.router_stats()}")
    for name in ("requests.forbidden_by_scope", "requests.rejected.client_not_allowed"):
        assert stats.get(name, 0) - before.get(name, 0) == 1, (name, before.get(name), stats.get(name))

    def audited():
        lines = [line[line.find(AUDIT_START):] for line in scoped.env.log_since_mark().splitlines()
                 if AUDIT_START in line]
        records = [json.JSONDecoder().raw_decode(line)[0] for line in lines]
        return records if len(records) >= 2 else None

    records = wait_until(audited, 10, "two audit lines")
    by_reason = {r["reason"]: r for r in records}
    scope_rec, client_rec = by_reason["insufficient_scope"], by_reason["client_not_allowed"]
    assert (scope_rec["outcome"], scope_rec["tenant"], scope_rec["client_id"]) == ("forbidden", TENANT_D, CLIENT_V1[0])
    assert (scope_rec["interaction"], scope_rec["resource_type"]) == ("search", "Observation")
    assert (client_rec["outcome"], client_rec["tenant"], client_rec["client_id"]) == ("rejected", TENANT_D,
                                                                                      CLIENT_OTHER[0])
    log = scoped.env.log_since_mark()
    assert "secret-name" not in log and scope_token not in log, "no query string and no token in the log"


def test_no_request_in_this_module_crashed_the_wasm_vm(scoped):
    assert_wasm_vm_never_crashed(scoped.env)
