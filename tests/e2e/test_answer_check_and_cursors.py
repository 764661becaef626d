"""Issue 23: the answer to a narrowed request holds only what its client may read, and paging goes through
signed cursors bound to tenant and client.

The FHIR server is a FAKE HAPI (tests/e2e/fake_hapi.py, FakeHapiPagingServer): HAPI is Java and cannot run here.
It pages the way HAPI does (`<base>?_getpages=<id>&_getpagesoffset=<n>`, links naming no type) out of one paging
cache shared by both tenants' clusters (as a HAPI serving several tenants has), and misbehaves on purpose where a
test needs an upstream that returns a type the client may not read. Each test first shows that its oracle can
fail: the same request with an unnarrowed token gets the forbidden type; the fake's raw paging link read
directly serves whoever holds it.
"""
from __future__ import annotations

import json

import pytest

from conftest import stop_envoy
from fake_hapi import FakeHapiPagingServer
from harness import SHIPPED_CONFIG, TENANT_A, TENANT_B, bearer, http_request, load_yaml, wait_until
from harness import wasm_plugin_config
from tokens import Minter
from upstream import RecordingUpstream

PUBLIC = "https://fhir.example.test"
CURSOR_KEY = "e2e-only-cursor-key-0123456789abcdef0123456789"


class Paging:
    def __init__(self, env, hapi, minter):
        self.env, self.hapi, self.minter = env, hapi, minter

    def token(self, tenant: str, scopes: str = "", client: str = "patients-app-a") -> str:
        return self.minter.token(f"{tenant} {scopes}".strip(), client_id=client, sub=client)

    def get(self, token: str, target: str):
        return self.env.request("GET", target, bearer(token))


@pytest.fixture(scope="module")
def paging(start_envoy, idp):
    hapi = FakeHapiPagingServer("shared-hapi").start()
    meta = RecordingUpstream("metadata", "metadata").start()

    def plugin(doc):
        doc["public_base_url"] = PUBLIC
        doc["paging_cursors"] = {"key": {"env": "CURSOR_KEY"}, "ttl_s": 600}
        # Both tenants' clusters reach the one fake HAPI: its paging cache is shared, as a partitioned HAPI's is.
        doc["tenants"][TENANT_B]["allow"] = {"interactions": ["read", "search"], "resource_types": ["Patient"]}

    base = load_yaml(SHIPPED_CONFIG)
    # The key reaches the wasm VM as its environment (the dynamic module reads Envoy's, set from the same map).
    wasm_plugin_config(base)["vm_config"]["environment_variables"] = {"key_values": {"CURSOR_KEY": CURSOR_KEY}}
    env = start_envoy("envoy-answer-check", {"idp": idp.port, "tenant_a": hapi.port, "tenant_b": hapi.port,
                                             "fhir_metadata": meta.port}, base=base, plugin=plugin)
    minter = Minter(idp.issuer)
    t = minter.token(TENANT_A)
    wait_until(lambda: env.request("GET", "/Patient", bearer(t)).status != 503, 30, "the remote JWKS",
               on_timeout=lambda: "\n--- envoy log tail ---\n" + env.log_tail())
    hapi.clear()
    try:
        yield Paging(env, hapi, minter)
    finally:
        stop_envoy(env)
        hapi.stop()
        meta.stop()


def _types(bundle: dict) -> set[str]:
    """Every resourceType anywhere in a document (the test's own walk, independent of the filter's)."""
    found = set()

    def walk(v):
        if isinstance(v, dict):
            if isinstance(v.get("resourceType"), str):
                found.add(v["resourceType"])
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
    walk(bundle)
    return found


def _link(bundle: dict, relation: str) -> str | None:
    return next((l["url"] for l in bundle.get("link", []) if l.get("relation") == relation), None)


def _target(url: str) -> str:
    """The path and query of a link under the public base: what a client sends to this Envoy."""
    assert url.startswith(PUBLIC + "/"), url
    return url[len(PUBLIC):]


def test_a_narrowed_token_pages_through_a_fake_hapi_server_seeing_only_granted_types(paging):
    token = paging.token(TENANT_A, "system/Patient.rs")
    resp = paging.get(token, "/Patient?_count=2")
    assert resp.status == 200, resp
    page, seen, upstream_paths = resp.json(), [], []
    while True:
        assert _types(page) == {"Bundle", "Patient"}, page
        assert "_getpages" not in json.dumps(page["link"]), page["link"]
        seen += [e["resource"]["id"] for e in page["entry"]]
        nxt = _link(page, "next")
        if nxt is None:
            break
        assert "/?_cursor=" in nxt, nxt
        resp = paging.get(token, _target(nxt))
        assert resp.status == 200, resp
        upstream_paths.append(paging.hapi.requests[-1].path)
        page = resp.json()
    assert seen == FakeHapiPagingServer.PATIENTS, "every page, in order, once"
    assert len(upstream_paths) == 2 and all(p.startswith("/?_getpages=") for p in upstream_paths), upstream_paths
    # `previous` is a cursor too, and goes back.
    back = paging.get(token, _target(_link(page, "previous")))
    assert back.status == 200 and [e["resource"]["id"] for e in back.json()["entry"]] == ["p2", "p3"], back


def test_a_cursor_replayed_by_another_tenant_or_client_is_refused_and_reaches_no_upstream(paging):
    token = paging.token(TENANT_A, "system/Patient.rs")
    first = paging.get(token, "/Patient?_count=2").json()
    nxt = _target(_link(first, "next"))
    # The oracle can fail: the fake's shared paging cache serves the raw link to whoever holds it.
    raw_id = list(paging.hapi.searches)[-1]
    direct = http_request(paging.hapi.port, "GET", f"/?_getpages={raw_id}&_getpagesoffset=2&_count=2")
    assert direct.status == 200 and direct.json()["entry"], "the shared cache serves any holder"
    paging.hapi.clear()
    # Earlier tests may have raised the counter: this test's own ten refusals are the difference (issue 24).
    before = paging.env.settled_router_stats().get("requests.cursor_refused", 0)
    others = {
        "tenant B (same HAPI behind it)": paging.token(TENANT_B, "system/Patient.rs"),
        "tenant B without SMART scopes": paging.token(TENANT_B),
        "another client of tenant A": paging.token(TENANT_A, "system/Patient.rs", client="other-app"),
        "another client of tenant A with every scope": paging.token(TENANT_A, "system/*.*", client="other-app"),
    }
    for who, other in others.items():
        resp = paging.get(other, nxt)
        assert resp.status == 403, (who, resp)
        assert resp.json()["resourceType"] == "OperationOutcome", resp
    # Tampered (one character), or with more in the query: 400. A raw `_getpages`: 400, for anyone.
    cut = nxt.rindex(".") + 3
    tampered = nxt[:cut] + ("A" if nxt[cut] != "A" else "B") + nxt[cut + 1:]
    for target in [tampered, nxt + "&_count=100", f"/?_getpages={raw_id}&_getpagesoffset=2&_count=2"]:
        for t in [token, paging.token(TENANT_A)]:
            resp = paging.get(t, target)
            assert resp.status == 400 and resp.json()["resourceType"] == "OperationOutcome", (target, resp)
    assert paging.hapi.requests == [], "no refused cursor reached the upstream"
    # Its own client still pages with it.
    assert paging.get(token, nxt).status == 200
    # Four replays by others and six tampered or raw targets: ten refusals, each counted once.
    wait_until(lambda: paging.env.router_stat("requests.cursor_refused") - before == 10, 10,
               "the ten refusals in the stats", on_timeout=lambda: f"\nbefore {before}; {paging.env.router_stats()}")
    assert paging.env.settled_router_stats().get("requests.cursor_refused", 0) - before == 10


def test_an_upstream_answering_a_forbidden_type_is_replaced_by_an_operation_outcome(paging):
    # The oracle can fail: unnarrowed, the fake's answer holds an Observation and a contained Organization.
    open_answer = paging.get(paging.token(TENANT_A), "/Patient?name=misbehave")
    assert open_answer.status == 200 and {"Observation", "Organization"} <= _types(open_answer.json()), open_answer
    paging.env.mark_log()
    for token in [paging.token(TENANT_A, "system/Patient.rs"), paging.token(TENANT_A, "system/Patient.read"),
                  paging.token(TENANT_B)]:  # B: no SMART scopes, but resource_types [Patient]
        resp = paging.get(token, "/Patient?name=misbehave")
        assert resp.status == 403, resp
        body = resp.json()
        assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "forbidden", body
        assert b"Observation" not in resp.body and b"obs1" not in resp.body, resp.body
    log = wait_until(lambda: (l := paging.env.log_since_mark()).count("was withheld") >= 3 and l, 10,
                     "the withheld answers in the log")
    lines = [l for l in log.splitlines() if "was withheld" in l]
    assert all("Observation x1" in l and "Organization x1" in l for l in lines), lines
    assert not any("misbehave" in l or "obs1" in l for l in lines), "no path, no data in the log"
    stats = wait_until(lambda: (s := paging.env.router_stats()).get("responses.withheld.forbidden_type", 0) >= 3
                       and s, 10, "the withheld answers in the stats")
    assert stats["responses.withheld.forbidden_type"] >= 3


def test_an_answer_that_cannot_be_checked_fails_closed(paging):
    # Unnarrowed: XML goes through as it is (the oracle: it holds an Observation).
    resp = paging.get(paging.token(TENANT_A), "/Patient?name=xml")
    assert resp.status == 200 and b"<Observation>" in resp.body, resp
    narrowed = paging.token(TENANT_A, "system/Patient.rs")
    resp = paging.get(narrowed, "/Patient?name=xml")
    assert resp.status == 406 and resp.json()["resourceType"] == "OperationOutcome", resp
    assert b"Observation" not in resp.body
    paging.hapi.clear()
    resp = paging.get(narrowed, "/Patient?_format=xml")
    assert resp.status == 406 and paging.hapi.requests == [], "refused before the upstream"


def test_an_answer_beyond_the_buffer_limit_is_never_sent_to_a_narrowed_client(paging):
    # The oracle can fail: unnarrowed, a read's whole answer (over 2 MiB, ending in an Observation) streams through.
    resp = paging.get(paging.token(TENANT_A), "/Patient/big")
    assert resp.status == 200 and len(resp.body) > 2 * 1024 * 1024 and b"obs-big" in resp.body, resp.status
    # Narrowed: held for the check, beyond Envoy's buffer limit (1 MiB by default): Envoy's own 500, and none of it.
    for target in ["/Patient/big", "/Patient?name=big"]:
        resp = paging.get(paging.token(TENANT_A, "system/Patient.rs"), target)
        assert resp.status == 500, (target, resp)
        assert b"obs-big" not in resp.body and b"Patient" not in resp.body, resp.body[:200]
    # With paging cursors on, every search answer is held to rewrite its links: a search answer beyond the limit
    # is Envoy's clean 500 for an unnarrowed client too (not a reset after its headers).
    resp = paging.get(paging.token(TENANT_A), "/Patient?name=big")
    assert resp.status == 500 and b"obs-big" not in resp.body, resp
