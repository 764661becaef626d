"""Requests without a valid token are answered 401 by the filter and never reach an upstream."""
import base64
import json

import jwt
import pytest

from checks import (
    assert_no_upstream_saw_anything, assert_served_only_by, assert_unauthorized, assert_wasm_vm_never_crashed,
)
from harness import TENANT_A, TENANT_B
from tokens import RS_KID, Minter, private_key


def _tamper_scope(token: str, scope: str) -> str:
    header, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["scope"] = scope
    new_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{new_payload}.{sig}"


def _hs256(m: Minter) -> str:
    return jwt.encode(m.claims(TENANT_A), "not-a-secret-" * 4, algorithm="HS256",
                      headers={"kid": "test-rs256-1"})


BAD_TOKENS = {
    "expired-beyond-the-clock-skew": lambda m: m.token(TENANT_A, iat=m.now - 900, exp=m.now - 120),
    "not-yet-valid-beyond-the-clock-skew": lambda m: m.token(TENANT_A, nbf=m.now + 120),
    "for-another-audience": lambda m: m.token(TENANT_A, aud="http://127.0.0.1:10001"),
    "from-another-issuer": lambda m: m.token(TENANT_A, iss=m.issuer + "/other"),
    "signed-by-a-fresh-key-claiming-the-real-kid": lambda m: m.wrong_key_token(TENANT_A),
    "with-alg-none": lambda m: m.unsigned_token(TENANT_A),
    "with-alg-hs256": _hs256,
    "with-an-unknown-kid": lambda m: m.token(TENANT_A, kid="no-such-kid", key=private_key(RS_KID)),
    "whose-scope-was-changed-after-signing": lambda m: _tamper_scope(m.token(TENANT_A), TENANT_B),
    "that-is-not-a-jwt": lambda m: "not-a-jwt",
    "without-exp": lambda m: m.token(TENANT_A, exp=None),
}


def test_a_request_without_authorization_is_unauthorized_without_an_error_code(stack):
    assert_unauthorized(stack.get("/Patient"), invalid_token=False)
    assert_no_upstream_saw_anything(stack.upstreams)


def test_a_request_with_basic_authorization_is_unauthorized(stack):
    resp = stack.get("/Patient", None, {"authorization": "Basic cGF0aWVudHMtYXBwLWE6ZGVtby1zZWNyZXQtYQ=="})
    assert_unauthorized(resp, invalid_token=False)
    assert_no_upstream_saw_anything(stack.upstreams)


@pytest.mark.parametrize("make_token", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
def test_a_bad_token_is_rejected_as_invalid_token_and_reaches_no_upstream(stack, make_token):
    resp = stack.get("/Patient", make_token(stack.minter))
    assert_unauthorized(resp, invalid_token=True)
    assert_no_upstream_saw_anything(stack.upstreams)


def test_a_token_expired_within_the_clock_skew_is_still_accepted(stack):
    m = Minter(stack.minter.issuer)  # a fresh `now`: the margin is only 40 s
    token = m.token(TENANT_A, iat=m.now - 600, exp=m.now - 20)
    assert_served_only_by(stack.upstreams, stack.get("/Patient", token), "tenant-a", TENANT_A)


def test_a_token_valid_from_within_the_clock_skew_is_accepted(stack):
    m = Minter(stack.minter.issuer)
    token = m.token(TENANT_A, nbf=m.now + 20)
    assert_served_only_by(stack.upstreams, stack.get("/Patient", token), "tenant-a", TENANT_A)


def test_a_token_whose_audience_list_contains_ours_is_accepted(stack):
    m = stack.minter
    token = m.token(TENANT_A, aud=["https://elsewhere.example", m.audience])
    assert_served_only_by(stack.upstreams, stack.get("/Patient", token), "tenant-a", TENANT_A)


def test_no_request_in_this_module_crashed_the_wasm_vm(stack):
    assert_wasm_vm_never_crashed(stack.envoy)
