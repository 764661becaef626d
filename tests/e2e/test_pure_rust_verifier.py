"""signature_verifier "pure_rust": the RustCrypto path verifies (and rejects) inside real Envoy too."""
import pytest

from checks import (
    assert_no_upstream_saw_anything, assert_served_only_by, assert_unauthorized, assert_wasm_vm_never_crashed,
)
from conftest import Stack, stop_envoy, wait_for_jwks
from harness import CLIENT_A, TENANT_A, TENANT_B
from tokens import Minter


@pytest.fixture(scope="module")
def pure(start_envoy, idp, upstreams):
    def use_pure_rust(doc):
        doc["signature_verifier"] = "pure_rust"

    env = start_envoy("envoy-pure-rust", {"idp": idp.port, **upstreams.cluster_ports()}, plugin=use_pure_rust)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    yield Stack(env, upstreams, minter, idp)
    stop_envoy(env)


def test_an_idp_rs256_token_is_accepted_by_the_pure_rust_verifier(pure):
    token = pure.idp.access_token(CLIENT_A, TENANT_A)
    assert_served_only_by(pure.upstreams, pure.get("/Patient", token), "tenant-a", TENANT_A)


def test_an_es256_token_is_accepted_by_the_pure_rust_verifier(pure):
    token = pure.minter.token(TENANT_B, alg="ES256")
    assert_served_only_by(pure.upstreams, pure.get("/Patient", token), "tenant-b", TENANT_B)


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_a_wrongly_signed_token_is_rejected_by_the_pure_rust_verifier(pure, alg):
    m = pure.minter
    good = m.token(TENANT_A, alg=alg)
    other = m.token(TENANT_A, alg=alg, jti="different")
    spliced = ".".join(good.split(".")[:2] + [other.split(".")[2]])  # valid shape, wrong signature
    assert_unauthorized(pure.get("/Patient", spliced), invalid_token=True)
    assert_no_upstream_saw_anything(pure.upstreams)


def test_no_request_in_this_module_crashed_the_wasm_vm(pure):
    assert_wasm_vm_never_crashed(pure.envoy)
