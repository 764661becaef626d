"""envoy/envoy-inline-jwks.yaml: keys in the plugin config, no IdP involved at all."""
import json
import subprocess
import sys

import pytest

from checks import (
    assert_no_upstream_saw_anything, assert_served_only_by, assert_unauthorized, assert_wasm_vm_never_crashed,
)
from conftest import stop_envoy
from harness import INLINE_JWKS_CONFIG, REPO, TENANT_A, TENANT_B, bearer, load_yaml, plugin_json
from tokens import Minter


@pytest.fixture(scope="module")
def inline(start_envoy, upstreams):
    env = start_envoy("envoy-inline-jwks", upstreams.cluster_ports(), base=INLINE_JWKS_CONFIG)
    issuer = plugin_json(env.cfg)["provider"]["issuer"]
    yield env, Minter(issuer)
    stop_envoy(env)


def test_the_shipped_inline_jwks_is_the_public_half_of_the_test_keys():
    expected = json.loads(subprocess.check_output([sys.executable, str(REPO / "scripts" / "public-jwks.py")]))
    shipped = plugin_json(load_yaml(INLINE_JWKS_CONFIG))["provider"]["jwks"]
    assert shipped == expected, "envoy/envoy-inline-jwks.yaml is stale: refresh it with scripts/public-jwks.py"
    assert all("d" not in k for k in shipped["keys"])


def test_an_rs256_token_signed_with_the_test_key_is_routed(inline, upstreams):
    env, minter = inline
    resp = env.request("GET", "/Patient", bearer(minter.token(TENANT_A)))
    assert_served_only_by(upstreams, resp, "tenant-a", TENANT_A)


def test_an_es256_token_signed_with_the_test_key_is_routed(inline, upstreams):
    env, minter = inline
    resp = env.request("GET", "/Patient", bearer(minter.token(TENANT_B, alg="ES256")))
    assert_served_only_by(upstreams, resp, "tenant-b", TENANT_B)


def test_a_token_signed_by_another_key_is_rejected(inline, upstreams):
    env, minter = inline
    resp = env.request("GET", "/Patient", bearer(minter.wrong_key_token(TENANT_A)))
    assert_unauthorized(resp, invalid_token=True)
    assert_no_upstream_saw_anything(upstreams)


def test_no_request_in_this_module_crashed_the_wasm_vm(inline):
    assert_wasm_vm_never_crashed(inline[0])
