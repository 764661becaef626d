"""The BALP AuditEvent of a narrowed request whose answer the filter withholds (issue 27; the issue-27 attack's
finding 5): it says what the client got, not a successful query. Real Envoy 1.40 in the build under test; the
FHIR server is the FAKE HAPI of test_answer_check_and_cursors.py (HAPI is Java and cannot run here), which
answers `name=misbehave` with an Observation a Patient-only token may not read.

The oracle: the client's own answer (403 OperationOutcome, or the 200 searchset) and the BALP profile checks of
test_balp_audit_events.py (outcome 0 and the Query profile only for a success) with @medplum/core's R4
validation.
"""
from __future__ import annotations

import json

import pytest

from conftest import stop_envoy
from fake_hapi import FakeHapiPagingServer
from harness import TENANT_A, bearer, wait_until
from test_balp_audit_events import PREFIX, _config, balp_problems, r4_validate
from tokens import Minter
from upstream import RecordingUpstream


@pytest.fixture(scope="module")
def withheld(start_envoy, idp):
    hapi = FakeHapiPagingServer("balp-hapi").start()
    meta = RecordingUpstream("metadata", "metadata").start()

    def plugin(doc):
        doc["audit_event"] = True

    env = start_envoy("envoy-balp-withheld", {"idp": idp.port, "tenant_a": hapi.port, "tenant_b": hapi.port,
                                              "fhir_metadata": meta.port}, base=_config(), plugin=plugin)
    minter = Minter(idp.issuer)
    t = minter.token(TENANT_A)
    wait_until(lambda: env.request("GET", "/Patient", bearer(t)).status != 503, 30, "the remote JWKS",
               on_timeout=lambda: "\n--- envoy log tail ---\n" + env.log_tail())
    try:
        yield env, minter
    finally:
        stop_envoy(env)
        hapi.stop()
        meta.stop()


def _events(env, count: int) -> list[dict]:
    def found():
        lines = [l[len(PREFIX):] for l in env.log_since_mark().split("\n") if l.startswith(PREFIX)]
        return lines if len(lines) >= count else None
    lines = wait_until(found, 30, f"{count} AuditEvents", on_timeout=env.log_tail)
    return [json.loads(l) for l in lines[-count:]]


def test_a_withheld_answer_is_audited_as_the_refusal_the_client_got_and_a_checked_one_as_a_success(withheld):
    env, minter = withheld
    narrowed = minter.token(f"{TENANT_A} system/Patient.rs")
    env.mark_log()
    bad = env.request("GET", "/Patient?name=misbehave", bearer(narrowed))
    assert bad.status == 403 and bad.json()["issue"][0]["code"] == "forbidden", bad
    good = env.request("GET", "/Patient?name=x", bearer(narrowed))
    assert good.status == 200 and good.json()["resourceType"] == "Bundle", good
    # The same misbehaving answer to a token nothing narrows goes through: a success, written at the request.
    open_ = env.request("GET", "/Patient?name=misbehave", bearer(minter.token(TENANT_A)))
    assert open_.status == 200, open_
    events = _events(env, 3)
    withheld_event, passed, unnarrowed = events
    assert withheld_event["outcome"] == "4", withheld_event
    assert withheld_event["outcomeDesc"] == "403 answer_withheld", withheld_event
    assert "meta" not in withheld_event, "a refusal does not claim the (successful) Query profile"
    for ok in (passed, unnarrowed):
        assert ok["outcome"] == "0" and ok["meta"]["profile"][0].endswith("IHE.BasicAudit.Query"), ok
        assert balp_problems(ok) == [], balp_problems(ok)
    results = r4_validate(events)
    assert [r["ok"] for r in results] == [True] * len(events), results
    assert not any("misbehave" in json.dumps(e) for e in events), "no query value"
