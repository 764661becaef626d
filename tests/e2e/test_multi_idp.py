"""Several IdPs: `providers` instead of `provider`. The token's `iss` picks the provider, which has its own issuer,
audiences and JWKS; `tenants.<id>.issuers` binds a tenant to the IdPs allowed to name it.

Two real IdP processes (tests/idp/server.mjs) on different ports: IdP one signs with the repository's test keys and
issues tokens for the usual audience; IdP two signs with a key generated for this run and issues tokens for another
audience. Tenant A is bound to IdP one, tenant B to IdP two, tenant C to both (listed), tenant D to any (default).
Each IdP has a client allowed to ask for every tenant, so "which IdP may name which tenant" is decided by the filter.
"""
from __future__ import annotations

import json

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from checks import assert_forbidden, assert_no_upstream_saw_anything, assert_served_only_by, assert_unauthorized
from checks import assert_wasm_vm_never_crashed
from conftest import stop_envoy
from harness import (
    AUDIENCE, SHIPPED_CONFIG, TENANT_A, TENANT_B, HarnessError, Idp, bearer, envoy_validate, free_port, load_yaml,
    render_config, wait_until, write_config,
)
from tokens import Minter
from upstream import RecordingUpstream

TENANT_C = "0c0c0c0c-1111-4222-8333-444455556666"
TENANT_D = "0e0e0e0e-3333-4444-8555-666677778888"
ALL_TENANTS = f"{TENANT_A} {TENANT_B} {TENANT_C} {TENANT_D}"
AUDIENCE_TWO = "urn:example:fhir-router:idp-two"
CLIENT_ONE = ("app-of-idp-one", "secret-one")
CLIENT_TWO = ("app-of-idp-two", "secret-two")
KID_TWO = "idp-two-rs256-1"


def static_cluster(name: str, port: int) -> dict:
    return {"name": name, "type": "STATIC", "connect_timeout": "2s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


def _stats(env) -> dict[str, int]:
    return env.router_stats()


class Two:
    def __init__(self, env, one: Idp, two: Idp, key_two, upstreams, tenant_c: RecordingUpstream):
        self.env, self.one, self.two, self.key_two = env, one, two, key_two
        self.upstreams, self.tenant_c = upstreams, tenant_c

    def idp(self, which: str) -> Idp:
        return self.one if which == "one" else self.two

    def token(self, which: str, tenant: str) -> str:
        return self.idp(which).access_token(CLIENT_ONE if which == "one" else CLIENT_TWO, tenant)

    def get(self, token: str, path: str = "/Patient"):
        return self.env.request("GET", path, bearer(token))

    def nothing_reached_an_upstream(self):
        assert_no_upstream_saw_anything(self.upstreams)
        assert self.tenant_c.requests == [], self.tenant_c.requests


@pytest.fixture(scope="module")
def two(workdir, start_envoy, upstreams):
    key_two = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key_two))
    jwk.update(kid=KID_TWO, alg="RS256", use="sig")
    keys_two = workdir / "idp-two-private-jwks.json"
    keys_two.write_text(json.dumps({"keys": [jwk]}), encoding="utf-8")

    one = Idp(free_port(), workdir, name="idp-one",
              clients=[{"client_id": CLIENT_ONE[0], "client_secret": CLIENT_ONE[1], "scope": ALL_TENANTS}])
    second = Idp(free_port(), workdir, name="idp-two", audience=AUDIENCE_TWO,
                 clients=[{"client_id": CLIENT_TWO[0], "client_secret": CLIENT_TWO[1], "scope": ALL_TENANTS}])
    second.env["IDP_KEYS"] = str(keys_two)
    tenant_c = RecordingUpstream("tenant-c", "tenant").start()
    try:
        one.start()
        second.start()
    except HarnessError as exc:
        for p in (one, second):
            p.stop()
        tenant_c.stop()
        pytest.fail(str(exc), pytrace=False)

    cfg = load_yaml(SHIPPED_CONFIG)
    cfg["static_resources"]["clusters"] += [static_cluster("idp_two", second.port),
                                            static_cluster("tenant_c", tenant_c.port)]

    def plugin(doc):
        p_one = doc.pop("provider")  # already re-pointed at IdP one by render_config
        p_two = dict(p_one, issuer=second.issuer, audiences=[AUDIENCE_TWO], jwks_uri=f"{second.issuer}/jwks",
                     jwks_cluster="idp_two")
        doc["providers"] = [p_one, p_two]
        doc["tenants"] = {
            TENANT_A: {"cluster": "tenant_a", "issuers": [one.issuer]},
            TENANT_B: {"cluster": "tenant_b", "issuers": [second.issuer]},
            TENANT_C: {"cluster": "tenant_c", "issuers": [one.issuer, second.issuer]},
            TENANT_D: {"cluster": "tenant_c"},
        }

    env = start_envoy("envoy-multi-idp", {"idp": one.port, **upstreams.cluster_ports()}, base=cfg, plugin=plugin)
    t = Two(env, one, second, key_two, upstreams, tenant_c)
    try:
        for which, tenant in (("one", TENANT_A), ("two", TENANT_B)):
            token = t.token(which, tenant)
            wait_until(lambda: t.get(token).status != 503, 30, f"IdP {which}'s JWKS to load",
                       on_timeout=lambda: "\n" + env.log_tail(30))
        yield t
    finally:
        stop_envoy(env)
        for p in (one, second):
            p.stop()
        tenant_c.stop()


@pytest.fixture(autouse=True)
def _clear_tenant_c(request):
    if "two" in request.fixturenames:
        request.getfixturevalue("two").tenant_c.clear()


def test_each_idps_token_reaches_the_tenant_bound_to_it(two):
    assert_served_only_by(two.upstreams, two.get(two.token("one", TENANT_A)), "tenant-a", TENANT_A)
    two.upstreams.clear()
    assert_served_only_by(two.upstreams, two.get(two.token("two", TENANT_B)), "tenant-b", TENANT_B)


@pytest.mark.parametrize("which,tenant", [("one", TENANT_B), ("two", TENANT_A)],
                         ids=["idp-one-naming-b-bound-to-idp-two", "idp-two-naming-a-bound-to-idp-one"])
def test_a_valid_token_naming_a_tenant_bound_to_the_other_idp_is_forbidden(two, which, tenant):
    resp = two.get(two.token(which, tenant))
    assert_forbidden(resp)
    two.nothing_reached_an_upstream()


@pytest.mark.parametrize("tenant", [TENANT_C, TENANT_D], ids=["bound-to-both", "bound-to-any-by-default"])
@pytest.mark.parametrize("which", ["one", "two"])
def test_a_tenant_open_to_both_idps_accepts_tokens_from_either(two, which, tenant):
    resp = two.get(two.token(which, tenant))
    assert resp.status == 200, resp
    (req,) = two.tenant_c.requests
    assert req.headers.get("x-fhir-tenant-id") == [tenant], req.headers
    assert "authorization" not in req.headers
    assert_no_upstream_saw_anything(two.upstreams)


def test_each_provider_verifies_tokens_with_its_own_idps_keys(two):
    """A key of IdP two does not make a token claiming IdP one's issuer valid, and vice versa."""
    m_one, m_two = Minter(two.one.issuer), Minter(two.two.issuer, audience=AUDIENCE_TWO)
    # Positive controls: each IdP's own key and issuer pass.
    assert two.get(m_one.token(TENANT_A)).status == 200
    assert two.get(m_two.token(TENANT_B, kid=KID_TWO, key=two.key_two)).status == 200
    two.upstreams.clear()
    crossed = [
        Minter(two.one.issuer).token(TENANT_A, kid=KID_TWO, key=two.key_two),          # IdP two's key, IdP one's iss
        Minter(two.two.issuer, audience=AUDIENCE_TWO).token(TENANT_B),                # IdP one's key, IdP two's iss
    ]
    for token in crossed:
        assert_unauthorized(two.get(token), invalid_token=True)
    two.nothing_reached_an_upstream()


def test_each_provider_checks_its_own_audiences(two):
    assert_unauthorized(two.get(Minter(two.one.issuer, audience=AUDIENCE_TWO).token(TENANT_A)), invalid_token=True)
    assert_unauthorized(two.get(Minter(two.two.issuer, audience=AUDIENCE).token(TENANT_B, kid=KID_TWO,
                                                                                 key=two.key_two)),
                        invalid_token=True)
    two.nothing_reached_an_upstream()


def test_a_token_from_an_unconfigured_issuer_is_refused(two):
    stranger = Minter(f"http://127.0.0.1:{free_port()}")
    assert_unauthorized(two.get(stranger.token(TENANT_D)), invalid_token=True)
    two.nothing_reached_an_upstream()


def test_a_refused_issuer_binding_is_counted_as_forbidden_for_that_tenant(two):
    def stat(name):
        return _stats(two.env).get(name, 0)

    forbidden, allowed = f"tenant.{TENANT_B}.forbidden", f"tenant.{TENANT_B}.allowed"
    before_f, before_a = stat(forbidden), stat(allowed)
    assert two.get(two.token("one", TENANT_B)).status == 403
    assert two.get(two.token("two", TENANT_B)).status == 200
    wait_until(lambda: stat(forbidden) >= before_f + 1 and stat(allowed) >= before_a + 1, 10,
               f"{forbidden} and {allowed} to move", on_timeout=lambda: f"\nstats: {_stats(two.env)}")
    assert stat(forbidden) == before_f + 1
    assert stat(allowed) == before_a + 1
    assert_wasm_vm_never_crashed(two.env)


def _validate_with(plugin, wasm, tmp_path):
    cfg = render_config(SHIPPED_CONFIG, listener_port=10000, admin_port=9901, cluster_ports={}, wasm_path=wasm,
                        plugin=plugin)
    result = envoy_validate(write_config(cfg, tmp_path / "multi-idp.yaml"))
    return result.returncode, result.stdout + result.stderr


def _two_providers(doc):
    p = doc.pop("provider")
    doc["providers"] = [p, dict(p, issuer="http://127.0.0.1:9003", jwks_uri="http://127.0.0.1:9003/jwks")]


def test_envoy_validate_accepts_two_providers(wasm, tmp_path):
    code, out = _validate_with(_two_providers, wasm, tmp_path)
    assert code == 0, out[-3000:]


def _both(doc):
    doc["providers"] = [dict(doc["provider"])]


def _neither(doc):
    del doc["provider"]


def _empty(doc):
    del doc["provider"]
    doc["providers"] = []


def _unknown_issuer_binding(doc):
    # Inferred, not in the written contract: a tenant bound to an issuer no provider has can never be served.
    _two_providers(doc)
    doc["tenants"][TENANT_A]["issuers"] = ["http://127.0.0.1:9999"]


@pytest.mark.parametrize("edit,field", [(_both, "provider"), (_neither, "provider"), (_empty, "providers"),
                                        (_unknown_issuer_binding, "issuers")],
                         ids=["provider-and-providers", "neither-provider-nor-providers", "an-empty-providers-list",
                              "a-tenant-bound-to-an-unconfigured-issuer"])
def test_envoy_validate_refuses(edit, field, wasm, tmp_path):
    code, out = _validate_with(edit, wasm, tmp_path)
    assert code != 0, f"envoy accepted it:\n{out[-3000:]}"
    assert any(field in line and "invalid plugin configuration" in line for line in out.splitlines()), out[-3000:]
