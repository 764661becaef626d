"""The filter's stats in Envoy's admin /stats: the signature path really used, the token cache, refusals.

The filter counts locally and hands its counts to Envoy every 500 ms, so each check polls until the expected
change appears (or a deadline passes) and then checks that nothing else moved."""
from __future__ import annotations

import time

import pytest

from harness import CLIENT_A, TENANT_A, wait_until



def _stats(env) -> dict[str, int]:
    return env.router_stats()


def _snapshot(env) -> dict[str, int]:
    """The stats once earlier requests' counts have been flushed: two reads a flush period apart agree."""
    last = {"stats": _stats(env), "at": time.monotonic()}

    def stable():
        if time.monotonic() - last["at"] < 0.6:
            return None
        now = _stats(env)
        if now == last["stats"]:
            return now
        last.update(stats=now, at=time.monotonic())
        return None
    return wait_until(stable, 10, "the filter's stats to settle", interval=0.1)


def _settled(env, before: dict[str, int], expected: dict[str, int]) -> dict[str, int]:
    """Waits until every stat in `expected` has moved by at least that much since `before`; returns the stats."""
    def moved():
        now = _stats(env)
        return now if all(now.get(k, 0) - before.get(k, 0) >= v for k, v in expected.items()) else None
    # One flush carries every count of the worker VM, so once these moved, the others have too.
    return wait_until(moved, 10, f"stats to move by {expected}")


def test_signatures_are_checked_natively_by_default(stack):
    """`signature.host`: Envoy's BoringSSL (`verify_signature`) in the wasm build, `ring` in the dynamic module."""
    before = _snapshot(stack.envoy)
    assert stack.get("/Patient", stack.minter.token(TENANT_A)).status == 200
    assert stack.get("/Patient", stack.minter.token(TENANT_A, alg="ES256")).status == 200
    after = _settled(stack.envoy, before, {"signature.host": 2})
    assert after["signature.host"] - before.get("signature.host", 0) == 2
    assert after.get("signature.pure_rust", 0) == before.get("signature.pure_rust", 0)


def test_a_repeated_token_is_served_from_the_cache(stack):
    token = stack.idp.access_token(CLIENT_A, TENANT_A)
    before = _snapshot(stack.envoy)
    for _ in range(5):
        assert stack.get("/Patient", token).status == 200
    after = _settled(stack.envoy, before, {"requests.allowed": 5, "cache.hits": 4})
    assert after["cache.misses"] - before.get("cache.misses", 0) == 1
    assert after["cache.hits"] - before.get("cache.hits", 0) == 4
    assert after["signature.host"] - before.get("signature.host", 0) == 1
    assert after["requests.allowed"] - before["requests.allowed"] == 5
    wait_until(lambda: _stats(stack.envoy).get("cache.entries", 0) >= 1, 5, "the cache.entries gauge")


def test_refusals_are_counted_by_reason(stack):
    before = _snapshot(stack.envoy)
    assert stack.get("/Patient").status == 401
    assert stack.get("/Patient", stack.minter.token(TENANT_A, exp=1)).status == 401
    assert stack.get("/Patient", stack.minter.token("openid")).status == 403
    assert stack.get("/metadata").status == 200
    after = _settled(stack.envoy, before, {"requests.rejected.missing_token": 1, "requests.rejected.expired": 1,
                                           "requests.rejected.no_tenant": 1, "requests.public": 1})
    for name in ("requests.rejected.missing_token", "requests.rejected.expired", "requests.rejected.no_tenant",
                 "requests.public"):
        assert after[name] - before.get(name, 0) == 1, name


def test_jwks_gauges_are_published(stack):
    stats = _stats(stack.envoy)
    assert stats["jwks.keys"] == 2
    assert stats["jwks.fetch_ok"] >= 1


@pytest.mark.wasm_only("a dynamic module has no VM; Envoy's own memory stats cover it")
def test_the_vm_memory_gauge_is_published(stack):
    wait_until(lambda: _stats(stack.envoy).get("vm.memory_bytes", 0) > 0, 5, "the vm.memory_bytes gauge")
    assert 64 * 1024 <= _stats(stack.envoy)["vm.memory_bytes"] <= 64 * 1024 * 1024
