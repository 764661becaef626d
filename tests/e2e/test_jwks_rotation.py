"""IdP key rotation with zero failed requests, and retirement of the old key (cached tokens included).

Real Envoy, the real IdP (restarted with a new key file, as an IdP rotating keys would publish them), real
upstreams. The rotation happens while a load thread keeps sending requests; every answer must be 200.
"""
from __future__ import annotations

import json
import threading
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from checks import assert_unauthorized, assert_wasm_vm_never_crashed
from conftest import stop_envoy, wait_for_jwks
from harness import CLIENT_A, KEYS_FILE, TENANT_A, Idp, bearer, free_port, wait_until
from tokens import RS_KID, Minter, private_key

NEW_KID = "test-rs256-rotated"


def _new_private_jwk() -> dict:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
    jwk.update(kid=NEW_KID, alg="RS256", use="sig")
    return jwk


def _stat(env, name: str) -> int:
    return env.router_stat(name)


@pytest.fixture(scope="module")
def rotation(start_envoy, upstreams, workdir):
    original = json.loads(KEYS_FILE.read_text(encoding="utf-8"))
    new_key = _new_private_jwk()
    rotated = workdir / "keys-rotated.json"  # new key first: the IdP signs with it, publishes both
    rotated.write_text(json.dumps({"keys": [new_key] + original["keys"]}), encoding="utf-8")
    retired = workdir / "keys-retired.json"  # the old RSA key is gone
    retired.write_text(json.dumps({"keys": [new_key] + [k for k in original["keys"] if k["kid"] != "test-rs256-1"]}),
                       encoding="utf-8")
    idp = Idp(free_port(), workdir, name="idp-rotation").start()

    def plugin(doc):
        doc["provider"]["jwks_min_refetch_s"] = 1  # let the test trigger refetches quickly

    env = start_envoy("envoy-rotation", {"idp": idp.port, **upstreams.cluster_ports()}, plugin=plugin)
    wait_for_jwks(env, Minter(idp.issuer), upstreams)
    yield env, idp, rotated, retired
    stop_envoy(env)
    idp.stop()


def _restart(idp: Idp, keys_path) -> None:
    idp.stop()
    idp.env["IDP_KEYS"] = str(keys_path)
    idp.start()


def test_rotation_under_load_fails_no_request_and_retiring_the_old_key_stops_its_tokens(rotation, upstreams):
    env, idp, rotated, retired = rotation
    old_token = idp.access_token(CLIENT_A, TENANT_A)
    assert jwt.get_unverified_header(old_token)["kid"] == "test-rs256-1"
    assert env.request("GET", "/Patient", bearer(old_token)).status == 200  # now cached too

    current = {"token": old_token}
    statuses: list[int] = []
    stop = threading.Event()

    def load():
        deadline = time.monotonic() + 60  # bounded whatever happens
        while not stop.is_set() and time.monotonic() < deadline:
            statuses.append(env.request("GET", "/Patient", bearer(current["token"])).status)

    waits_before = _stat(env, "jwks.unknown_kid_refetch_waits")
    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        wait_until(lambda: len(statuses) >= 20, 20, "load before the rotation")
        _restart(idp, rotated)  # the IdP now signs with a kid the filter has never seen
        new_token = idp.access_token(CLIENT_A, TENANT_A)
        assert jwt.get_unverified_header(new_token)["kid"] == NEW_KID
        seen = len(statuses)
        current["token"] = new_token
        wait_until(lambda: len(statuses) >= seen + 50, 20, "load after the rotation")
    finally:
        stop.set()
        worker.join(timeout=10)
    failed = [s for s in statuses if s != 200]
    assert not failed, f"{len(failed)} of {len(statuses)} requests failed during rotation: {sorted(set(failed))}"
    wait_until(lambda: _stat(env, "jwks.unknown_kid_refetch_waits") > waits_before, 5,
               "the new kid to have triggered a refetch (stats are flushed every 500 ms)")
    assert len(statuses) >= 70

    # Retire the old key. Any refetch installs the retired set; an unknown kid triggers one at once.
    _restart(idp, retired)
    time.sleep(1.1)  # jwks_min_refetch_s=1 in this test's config: the rate limit window must pass
    stray = Minter(idp.issuer).token(TENANT_A, kid="no-such-kid-anywhere", key=private_key(RS_KID))
    assert_unauthorized(env.request("GET", "/Patient", bearer(stray)), invalid_token=True)
    upstreams.clear()
    resp = env.request("GET", "/Patient", bearer(old_token))
    assert_unauthorized(resp, invalid_token=True)  # was cached: the refresh dropped it with its key
    assert upstreams.hits() == {}
    assert env.request("GET", "/Patient", bearer(current["token"])).status == 200
    assert_wasm_vm_never_crashed(env)


def test_a_flood_of_made_up_kids_triggers_at_most_one_refetch_per_window(rotation):
    env, idp, _, _ = rotation
    minter = Minter(idp.issuer)
    time.sleep(1.1)  # let the previous test's rate-limit window pass
    tokens = [minter.token(TENANT_A, kid=f"made-up-{i}", key=private_key(RS_KID)) for i in range(30)]
    before = _stat(env, "jwks.fetch_ok") + _stat(env, "jwks.fetch_failed")
    started = time.monotonic()
    for token in tokens:
        assert_unauthorized(env.request("GET", "/Patient", bearer(token)), invalid_token=True)
    elapsed = time.monotonic() - started
    wait_until(lambda: _stat(env, "jwks.fetch_ok") + _stat(env, "jwks.fetch_failed") > before, 10,
               "the one allowed refetch to finish")
    fetches = _stat(env, "jwks.fetch_ok") + _stat(env, "jwks.fetch_failed") - before
    # At most one refetch per 1 s window (this module's jwks_min_refetch_s), so 30 made-up kids sent in
    # `elapsed` seconds cause at most one fetch per window they span, not one each.
    assert 1 <= fetches <= int(elapsed) + 1, (fetches, elapsed)
    assert fetches < 10, fetches
