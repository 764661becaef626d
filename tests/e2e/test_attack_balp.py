"""An outside attack on issue 27's BALP AuditEvents (`audit_event`) in real Envoy 1.40, in the build under test
(--build wasm / --build dynamic-module): every outcome the filter writes (forwarded, public, a local SMART
configuration, 401, 403, 429) with odd paths and queries and a hostile client id, each event one access-log line
that parses as JSON, passes the R4 structure check of a FHIR library we did not write (@medplum/core, via
tests/fhir/validate-resources.mjs) and holds no query value, id or token.
"""
from __future__ import annotations

import base64
import json

import pytest

from conftest import Stack, stop_envoy, wait_for_jwks
from harness import TENANT_A, TENANT_B, wait_until
from test_balp_audit_events import PREFIX, _config, balp_problems, r4_validate
from tokens import Minter

HOSTILE = 'x","outcome":"0"}],"agent":[{"who":"\n\u2028\' || filter_state[\'a\'] == "'


@pytest.fixture(scope="module")
def hostile_balp(start_envoy, idp, upstreams) -> Stack:
    def plugin(doc):
        doc["audit_event"] = True
        doc["tenants"][TENANT_B]["quota"] = {"rate_per_s": 0.01, "burst": 1}

    env = start_envoy("envoy-attack-balp", {"idp": idp.port, **upstreams.cluster_ports()}, base=_config(),
                      plugin=plugin)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    yield Stack(env, upstreams, minter, idp)
    stop_envoy(env)


def test_attack_held_every_outcome_with_odd_paths_is_one_valid_r4_audit_event_per_line(hostile_balp):
    stack = hostile_balp
    a, b = stack.minter.token(TENANT_A), stack.minter.token(TENANT_B)
    hostile = stack.minter.token(TENANT_A, client_id=HOSTILE)
    session = [
        ("GET", "/.well-known/smart-configuration", None, 200),
        ("HEAD", "/metadata", None, 200),
        ("GET", "/Patient?na%22me=Zzyzx&%0Aevil%0D=Zzyzx&x%5C=Zzyzx&=Zzyzx&name=a=Zzyzx;given=Zzyzx", a, 200),
        ("GET", "/Patient/p-secret-1/Observation?code=Zzyzx&_include=Observation:subject", a, 200),
        ("GET", "/Patient?name=Zzyzx", hostile, 200),
        ("GET", "/Patient/p-secret-1/$everything?start=Zzyzx", a, 403),  # the shipped allowlist: no operations
        ("DELETE", "/Patient?identifier=Zzyzx", a, 403),
        ("GET", "/Patient/p-secret-1;Zzyzx/_history/1", a, 200),
        ("GET", "/Patient?name=Zzyzx", "not.a.token", 401),
        ("GET", "/Patient/p-secret-1", b, 200),  # tenant B's burst
        ("GET", "/Patient?name=Zzyzx", b, 429),
    ]
    for method, path, token, status in session:
        r = stack.get(path, token, method=method)
        assert r.status == status, (method, path, r)

    def lines():
        found = [line[len(PREFIX):] for line in stack.envoy.log_since_mark().split("\n") if line.startswith(PREFIX)]
        return found if len(found) >= len(session) and "429 quota_rate" in found[-1] else None

    found = wait_until(lines, 30, "the events", on_timeout=stack.envoy.log_tail)[-len(session):]
    events = [json.loads(line) for line in found]  # one line each: a hostile client id broke none
    outcomes = [(e["outcome"], e.get("outcomeDesc")) for e in events]
    assert outcomes == [("0", None)] * 5 + [("4", "403 allowlist"), ("4", "403 allowlist"), ("0", None),
                                            ("4", "401 malformed_token"), ("0", None),
                                            ("4", "429 quota_rate")], outcomes
    hostile_event = events[4]
    clients = [a["who"].get("identifier", {}).get("value") for a in hostile_event["agent"]]
    assert HOSTILE in clients and len(hostile_event["agent"]) == 3, hostile_event
    for e in events:
        assert balp_problems(e) == [], e
    results = r4_validate(events)
    assert [r["ok"] for r in results] == [True] * len(events), results
    text = json.dumps(events) + "".join(base64.b64decode(en["query"]).decode() for e in events
                                        for en in e["entity"] if "query" in en)
    for secret in ("Zzyzx", "p-secret-1", a.split(".")[1][:20], "not.a.token"):
        assert secret not in text, secret


def test_attack_finding_4_a_value_in_a_parameter_names_place_never_reaches_the_audit_event(hostile_balp):
    stack = hostile_balp
    r = stack.get("/Patient?John%20Zzyzx&name%3DZzyzx", stack.minter.token(TENANT_A))
    assert r.status == 200, r

    def line():
        found = [x[len(PREFIX):] for x in stack.envoy.log_since_mark().split("\n") if x.startswith(PREFIX)]
        return found[-1] if found and '"search"' in found[-1] else None

    event = json.loads(wait_until(line, 30, "the event", on_timeout=stack.envoy.log_tail))
    query = base64.b64decode(event["entity"][0]["query"]).decode()
    assert "Zzyzx" not in query and "Zzyzx" not in json.dumps(event), query
