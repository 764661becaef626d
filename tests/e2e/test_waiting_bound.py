"""Requests waiting for a key set are bounded: a flood of tokens naming unknown `kid`s while the JWKS
refetch hangs (an IdP outage) parks at most `jwks_max_waiting` of them; the rest get 503 with Retry-After
and an OperationOutcome at once, nothing copied or queued, and the VM's memory stays flat.

The hanging JWKS endpoint is a fake (no real IdP hangs on command): it forwards to the real IdP until told
to hang, and then holds each fetch open until released."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from checks import assert_wasm_vm_never_crashed
from conftest import stop_envoy, wait_for_jwks
import harness
from harness import TENANT_A, bearer, wait_until
from test_idp_outage import FaultInjectingJwksProxy
from tokens import RS_KID, Minter, private_key

MAX_WAITING = 8
FLOOD = 200


@pytest.fixture(scope="module")
def hanging(start_envoy, upstreams, idp):
    jwks = FaultInjectingJwksProxy(idp.port)

    def plugin(doc):
        doc["provider"]["issuer"] = idp.issuer  # the `idp` cluster points at the fake; tokens are the IdP's
        doc["provider"]["jwks_timeout_ms"] = 30_000  # the refetch stays in flight while the endpoint hangs
        doc["provider"]["jwks_min_refetch_s"] = 1
        doc["provider"]["jwks_max_waiting"] = MAX_WAITING

    env = start_envoy("envoy-waiting-bound", {"idp": jwks.port, **upstreams.cluster_ports()}, plugin=plugin)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    assert env.request("GET", "/Patient", bearer(minter.token(TENANT_A))).status == 200
    upstreams.clear()
    yield env, jwks, minter
    stop_envoy(env)
    jwks.stop()


def _well_formed_refusal(resp) -> None:
    assert resp.status in (401, 503), resp
    assert resp.header("content-type") == "application/fhir+json", resp
    assert resp.json()["resourceType"] == "OperationOutcome", resp
    if resp.status == 503:
        assert int(resp.header("retry-after")) >= 1, resp
    else:
        assert resp.header("www-authenticate").startswith('Bearer realm="fhir-tenant-router"'), resp


def _memory_after(env, refused: int, full_before: int) -> int | None:
    """The wasm VM's memory, read once a stats flush (every 500 ms) has counted `refused` refusals: the
    memory gauge is set in the same flush."""
    wait_until(lambda: env.router_stat("requests.rejected.wait_queue_full") - full_before >= refused, 10,
               f"{refused} refusals to be counted")
    if harness.BUILD != "wasm":
        return None  # a dynamic module has no VM: its memory is Envoy's (the soak measures Envoy's RSS)
    return env.router_stats()["vm.memory_bytes"]


def test_a_flood_of_unknown_kids_during_a_hanging_refetch_waits_bounded(hanging, upstreams):
    env, jwks, minter = hanging
    full_before = env.router_stat("requests.rejected.wait_queue_full")
    waits_before = env.router_stat("jwks.unknown_kid_refetch_waits")
    # Large tokens (~5.5 KB each, under the 8 KB default max_token_bytes): what an unbounded queue would copy.
    tokens = [minter.token(TENANT_A, kid=f"made-up-{i}", key=private_key(RS_KID), padding="x" * 4000)
              for i in range(2 * FLOOD + 1)]
    jwks.mode = "hold"
    with ThreadPoolExecutor(max_workers=32) as pool:
        first = pool.submit(env.request, "GET", "/Patient", bearer(tokens[0]), None, 40)
        wait_until(lambda: jwks.fetches.get("hold", 0) >= 1, 20, "the unknown kid to trigger a refetch that hangs")
        answers = []
        memory = []
        for wave in (tokens[1:FLOOD + 1], tokens[FLOOD + 1:]):
            flood = [pool.submit(env.request, "GET", "/Patient", bearer(t), None, 40) for t in wave]
            # Everything beyond the queue is answered while the refetch still hangs.
            wait_until(lambda: sum(f.done() for f in flood) >= len(wave) - MAX_WAITING, 30,
                       "the requests beyond jwks_max_waiting to be refused at once")
            early = [f.result() for f in flood if f.done()]
            assert all(r.status == 503 for r in early), sorted({r.status for r in early})
            answers += flood
            memory.append(_memory_after(env, len(answers) - MAX_WAITING, full_before))
        assert not first.done(), "the first waiter is answered only when the refetch ends"
        if memory[0] is not None:
            # A second flood parks nothing more: the VM does not grow (an unbounded queue would now hold
            # ~400 copies of a 5.5 KB token, 2.2 MB).
            assert memory[1] - memory[0] <= 128 * 1024, f"VM memory grew by {memory[1] - memory[0]} bytes"
        jwks.release()
        answers = [first.result()] + [f.result() for f in answers]
    for resp in answers:
        _well_formed_refusal(resp)
    waited = env.router_stat("jwks.unknown_kid_refetch_waits") - waits_before
    assert 1 <= waited <= MAX_WAITING, waited
    wait_until(lambda: env.router_stat("requests.rejected.wait_queue_full") - full_before >= 2 * FLOOD - MAX_WAITING,
               5, "the refusals to be counted")
    assert upstreams.hits() == {}
    assert env.request("GET", "/Patient", bearer(minter.token(TENANT_A))).status == 200
    assert_wasm_vm_never_crashed(env)
