"""The filter's stats in Envoy's admin /stats: the signature path really used, the token cache, refusals."""
from __future__ import annotations

from harness import CLIENT_A, TENANT_A, bearer, wait_until

PREFIX = "wasmcustom.fhir_tenant_router."


def _stats(env) -> dict[str, int]:
    return {k[len(PREFIX):]: v for k, v in env.wasm_stats().items() if k.startswith(PREFIX)}


def test_signatures_are_checked_by_envoys_boringssl_by_default(stack):
    before = _stats(stack.envoy)
    assert stack.get("/Patient", stack.minter.token(TENANT_A)).status == 200
    assert stack.get("/Patient", stack.minter.token(TENANT_A, alg="ES256")).status == 200
    after = _stats(stack.envoy)
    assert after["signature.host"] - before.get("signature.host", 0) == 2
    assert after.get("signature.pure_rust", 0) == before.get("signature.pure_rust", 0)


def test_a_repeated_token_is_served_from_the_cache(stack):
    token = stack.idp.access_token(CLIENT_A, TENANT_A)
    before = _stats(stack.envoy)
    for _ in range(5):
        assert stack.get("/Patient", token).status == 200
    after = _stats(stack.envoy)
    assert after["cache.misses"] - before.get("cache.misses", 0) == 1
    assert after["cache.hits"] - before.get("cache.hits", 0) == 4
    assert after["signature.host"] - before.get("signature.host", 0) == 1
    assert after["requests.allowed"] - before["requests.allowed"] == 5
    wait_until(lambda: _stats(stack.envoy).get("cache.entries", 0) >= 1, 5, "the cache.entries gauge")


def test_refusals_are_counted_by_reason(stack):
    before = _stats(stack.envoy)
    assert stack.get("/Patient").status == 401
    assert stack.get("/Patient", stack.minter.token(TENANT_A, exp=1)).status == 401
    assert stack.get("/Patient", stack.minter.token("openid")).status == 403
    assert stack.get("/metadata").status == 200
    after = _stats(stack.envoy)
    for name in ("requests.rejected.missing_token", "requests.rejected.expired", "requests.rejected.no_tenant",
                 "requests.public"):
        assert after[name] - before.get(name, 0) == 1, name


def test_jwks_and_memory_gauges_are_published(stack):
    wait_until(lambda: _stats(stack.envoy).get("vm.memory_bytes", 0) > 0, 5, "the vm.memory_bytes gauge")
    stats = _stats(stack.envoy)
    assert stats["jwks.keys"] == 2
    assert stats["jwks.fetch_ok"] >= 1
    assert 64 * 1024 <= stats["vm.memory_bytes"] <= 64 * 1024 * 1024
