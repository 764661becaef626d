"""Self-check of the upstream's OAuth side (issue 12), without Envoy or the filter: the upstream authorization
server (tests/upstream-as/server.mjs, real oidc-provider 9.13.3) issues tokens by every method the router will
use, enforces what it should (private_key_jwt per SMART Backend Services, the RFC 7523 JWT-bearer grant, each
client's own authentication method, resources and scopes), and obeys its test controls (outage, secret
rotation, token lifetime, counters); our fake token guard (tests/upstream-as/fake_token_guard.py) in front of a
real FHIR engine serves exactly the requests bearing that server's valid token for its audience.

Everything here talks to the parts directly from Python, so a failure here is in the test parts, not the router.
"""
from __future__ import annotations

import http.client
import json
import sys
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fhir"))

from contract import TENANT_DATA  # noqa: E402
from engine import EngineError, FhirEngine  # noqa: E402
from harness import CLIENT_A, TENANT_A, bearer, http_request, wait_until  # noqa: E402
from upstream_auth import (  # noqa: E402
    BASIC_CLIENT, CLIENT_ASSERTION_TYPE, FHIR_A_AUDIENCE, FHIR_B_AUDIENCE, JWT_BEARER_GRANT, PKJWT_CLIENT,
    POST_CLIENT, SERVICE_ACCOUNT, KeyFile, client_assertion, decode_unverified, service_account_assertion,
    write_key,
)

pytestmark = pytest.mark.wasm_only("independent of the build under test (no Envoy): once per make e2e is enough")

SCOPE = "system/*.read"
METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt_rs384", "private_key_jwt_es384",
           "jwt_bearer"]
CLIENT_OF = {"client_secret_basic": BASIC_CLIENT, "client_secret_post": POST_CLIENT,
             "private_key_jwt_rs384": PKJWT_CLIENT, "private_key_jwt_es384": PKJWT_CLIENT,
             "jwt_bearer": SERVICE_ACCOUNT}


@pytest.fixture(scope="module")
def fhir_a(workdir):
    try:
        eng = FhirEngine("upstream-fhir-a", workdir, TENANT_DATA["tenant-a"]).start(timeout=120)
    except EngineError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def guards(upstream_as, upstreams, fhir_a, start_fake_token_guard):
    """fake guard A in front of a real FHIR engine, fake guard B in front of a recording upstream."""
    a = start_fake_token_guard(upstream_as, FHIR_A_AUDIENCE, fhir_a.port, "fake-guard-a")
    b = start_fake_token_guard(upstream_as, FHIR_B_AUDIENCE, upstreams.tenant_b.port, "fake-guard-b")
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(autouse=True)
def _fresh(request):
    if "guards" in request.fixturenames:
        for g in request.getfixturevalue("guards"):
            g.clear()
    if "upstream_as" in request.fixturenames:
        request.getfixturevalue("upstream_as").reset()


def obtain(as_, keys, method: str, **params):
    if method == "client_secret_basic":
        return as_.token_basic(**params)
    if method == "client_secret_post":
        return as_.token_post(**params)
    if method == "private_key_jwt_rs384":
        return as_.token_private_key_jwt(keys.rs384, **params)
    if method == "private_key_jwt_es384":
        return as_.token_private_key_jwt(keys.es384, **params)
    if method == "jwt_bearer":
        return as_.token_jwt_bearer(**params)
    raise ValueError(method)


def get(guard, path: str, token: str | None = None, **kw):
    return http_request(guard.port, "GET", path, bearer(token) if token else {}, **kw)


def assert_refused(resp, guard, verdict: str):
    assert resp.status == 401, resp
    challenge = resp.header("www-authenticate")
    assert challenge.startswith(f'Bearer realm="{guard.name}"'), challenge
    if verdict == "missing_token":
        assert "error=" not in challenge, challenge  # RFC 6750 3.1: no error code without credentials
    else:
        assert 'error="invalid_token"' in challenge, challenge
    outcome = resp.json()
    assert outcome["resourceType"] == "OperationOutcome" and verdict in outcome["issue"][0]["diagnostics"]
    assert guard.records[-1].verdict == verdict, guard.records[-1]
    assert guard.records[-1].status == 401


# ------------------------------------------------------------------------------------- the AS itself

def test_discovery_names_the_token_endpoint_methods_algs_and_grants(upstream_as, idp):
    d = http_request(upstream_as.port, "GET", "/.well-known/openid-configuration").json()
    assert d["issuer"] == upstream_as.issuer != idp.issuer
    assert d["token_endpoint"] == upstream_as.token_url
    assert d["jwks_uri"] == upstream_as.jwks_url
    assert set(d["token_endpoint_auth_methods_supported"]) >= {"client_secret_basic", "client_secret_post",
                                                               "private_key_jwt"}
    assert d["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert {"client_credentials", JWT_BEARER_GRANT} <= set(d["grant_types_supported"])
    jwks = http_request(upstream_as.port, "GET", "/jwks").json()
    assert [k["kid"] for k in jwks["keys"]] == [upstream_as.state()["signing_kid"]]
    assert all("d" not in k for k in jwks["keys"])


@pytest.mark.parametrize("method", METHODS)
def test_each_method_gets_a_token_the_fake_guard_serves_for_its_audience_only(method, upstream_as, upstream_keys,
                                                                               guards, upstreams):
    guard_a, guard_b = guards
    resp = obtain(upstream_as, upstream_keys, method, scope=SCOPE, resource=FHIR_A_AUDIENCE)
    assert resp.status == 200, resp
    body = resp.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 300 and body["scope"] == SCOPE
    header, claims = decode_unverified(body["access_token"])
    assert header["typ"] == "at+jwt" and header["alg"] == "RS256"
    assert claims["iss"] == upstream_as.issuer and claims["aud"] == FHIR_A_AUDIENCE
    assert claims["client_id"] == CLIENT_OF[method] and claims["scope"] == SCOPE
    assert claims["exp"] - claims["iat"] == 300

    ok = get(guard_a, "/Patient?_count=1", body["access_token"])
    assert ok.status == 200, ok
    assert ok.json()["resourceType"] == "Bundle" and ok.json()["entry"][0]["resource"]["resourceType"] == "Patient"
    assert guard_a.records[-1].verdict == "allowed" and guard_a.records[-1].jti == claims["jti"]
    assert guard_a.records[-1].client_id == CLIENT_OF[method]

    assert_refused(get(guard_b, "/Patient", body["access_token"]), guard_b, "wrong_audience")
    assert upstreams.tenant_b.requests == []

    (rec,) = upstream_as.requests()
    assert rec["outcome"] == "issued" and rec["client_id"] == CLIENT_OF[method]
    assert rec["params"]["scope"] == SCOPE and rec["params"]["resource"] == FHIR_A_AUDIENCE
    assert rec["token"]["jti"] == claims["jti"] and rec["token"]["aud"] == FHIR_A_AUDIENCE
    if method.startswith("private_key_jwt"):
        assert rec["auth_method"] == "private_key_jwt"
        assert rec["params"]["client_assertion_type"] == CLIENT_ASSERTION_TYPE
        assert rec["params"]["client_assertion"] == "[jwt]"
        ca = rec["client_assertion"]
        assert ca["header"]["alg"] == method[-5:].upper()
        assert ca["claims"]["aud"] == upstream_as.token_url
        assert ca["claims"]["exp"] - ca["claims"]["iat"] <= 300
    elif method == "jwt_bearer":
        assert rec["grant_type"] == JWT_BEARER_GRANT and rec["params"]["assertion"] == "[jwt]"
        assert rec["assertion"]["claims"]["iss"] == SERVICE_ACCOUNT
        assert rec["assertion"]["claims"]["aud"] == upstream_as.token_url
    else:
        assert rec["auth_method"] == method and rec["grant_type"] == "client_credentials"
    # Nothing secret is kept: no client secret, no assertion, no access token.
    dump = json.dumps(upstream_as.requests()) + upstream_as.log()
    for s in upstream_as.secrets.values():
        assert s not in dump
    assert body["access_token"] not in dump and body["access_token"].split(".")[2] not in dump


def test_audience_parameter_and_default_resource_decide_the_tokens_aud(upstream_as, guards):
    guard_a, guard_b = guards
    by_audience = upstream_as.token_post(audience=FHIR_B_AUDIENCE)
    assert decode_unverified(upstream_as.access_token(by_audience))[1]["aud"] == FHIR_B_AUDIENCE
    assert get(guard_b, "/Patient", upstream_as.access_token(by_audience)).status == 200
    by_default = upstream_as.token_basic()
    assert decode_unverified(upstream_as.access_token(by_default))[1]["aud"] == FHIR_A_AUDIENCE
    assert "scope" not in decode_unverified(upstream_as.access_token(by_default))[1]
    recs = upstream_as.requests()
    assert recs[0]["params"]["audience"] == FHIR_B_AUDIENCE and "resource" not in recs[0]["params"]
    assert "audience" not in recs[1]["params"] and "resource" not in recs[1]["params"]


def test_resources_and_scopes_outside_the_clients_registration_are_refused(upstream_as):
    r = upstream_as.token_post(resource="http://fhir-c.upstream.test")
    assert r.status == 400 and r.json()["error"] == "invalid_target", r
    r = upstream_as.token_post(audience="http://fhir-c.upstream.test")
    assert r.status == 400 and r.json()["error"] == "invalid_target", r
    r = upstream_as.token_basic(scope="system/*.write")
    assert r.status == 400 and r.json()["error"] == "invalid_scope", r
    r = upstream_as.token_basic(resource=[FHIR_A_AUDIENCE, FHIR_B_AUDIENCE])
    assert r.status == 400 and r.json()["error"] == "invalid_target", r
    c = upstream_as.counters()
    assert c["issued"] == 0 and c["rejected"] == 4
    assert c["clients"][POST_CLIENT]["errors"] == {"invalid_target": 2}
    assert c["clients"][BASIC_CLIENT]["errors"] == {"invalid_scope": 1, "invalid_target": 1}


def test_each_secret_client_is_held_to_its_registered_method_and_secret(upstream_as):
    r = upstream_as.token_post(BASIC_CLIENT, upstream_as.secrets[BASIC_CLIENT])
    assert r.status == 401 and r.json()["error"] == "invalid_client", r
    r = upstream_as.token_basic(POST_CLIENT, upstream_as.secrets[POST_CLIENT])
    assert r.status == 401 and r.json()["error"] == "invalid_client", r
    assert r.header("www-authenticate").startswith("Basic ")
    r = upstream_as.token_post(secret="not-the-secret")
    assert r.status == 401 and r.json()["error"] == "invalid_client", r
    r = upstream_as.token_basic(secret="not-the-secret")
    assert r.status == 401 and r.json()["error"] == "invalid_client", r
    recs = upstream_as.requests()
    assert [x["auth_method"] for x in recs] == ["client_secret_post", "client_secret_basic",
                                                "client_secret_post", "client_secret_basic"]
    assert "registered for client_secret_basic" in recs[0]["error_detail"]
    assert recs[2]["error_detail"] == recs[3]["error_detail"] == "invalid secret provided"
    c = upstream_as.counters()
    assert c["clients"][BASIC_CLIENT] == {"issued": 0, "rejected": 2, "outage": 0,
                                                    "errors": {"invalid_client": 2}}
    assert c["clients"][POST_CLIENT] == {"issued": 0, "rejected": 2, "outage": 0,
                                                    "errors": {"invalid_client": 2}}


# ------------------------------------------------------------------------- private_key_jwt enforcement

def _other_key(alg: str, kid: str, directory: Path) -> KeyFile:
    """A key the AS does not know, claiming a registered kid."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if alg.startswith("RS") \
        else ec.generate_private_key(ec.SECP384R1())
    fresh = write_key(directory, "unregistered", alg, key)
    return KeyFile(kid, alg, fresh.pem_path, fresh.public_jwk)


def test_urls_are_the_issuers_whatever_host_a_client_sends(upstream_as, upstream_keys):
    """Envoy may send the cluster's name (or anything) as :authority: the token URL stays the issuer's."""
    form = f"grant_type=client_credentials&client_assertion_type={CLIENT_ASSERTION_TYPE}&client_assertion=" \
        + client_assertion(upstream_keys.rs384, PKJWT_CLIENT, upstream_as.token_url)
    conn = http.client.HTTPConnection("127.0.0.1", upstream_as.port, timeout=15)
    try:
        conn.request("POST", "/token", form, {"host": "upstream_as", "content-type":
                                              "application/x-www-form-urlencoded"})
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200, body
        conn.request("GET", "/.well-known/openid-configuration", headers={"host": "upstream_as"})
        assert json.loads(conn.getresponse().read())["token_endpoint"] == upstream_as.token_url
    finally:
        conn.close()
    assert upstream_as.requests()[-1]["host"] == "upstream_as"


def test_a_client_assertion_is_accepted_once(upstream_as, upstream_keys):
    assertion = client_assertion(upstream_keys.rs384, PKJWT_CLIENT, upstream_as.token_url)
    assert upstream_as.token_private_key_jwt(upstream_keys.rs384, assertion=assertion).status == 200
    again = upstream_as.token_private_key_jwt(upstream_keys.rs384, assertion=assertion)
    assert again.status == 401 and again.json()["error"] == "invalid_client", again
    # A new assertion reusing the jti (new iat/exp, new signature) is a replay too.
    jti = decode_unverified(assertion)[1]["jti"]
    same_jti = client_assertion(upstream_keys.es384, PKJWT_CLIENT, upstream_as.token_url, jti=jti, lifetime=200)
    third = upstream_as.token_private_key_jwt(upstream_keys.es384, assertion=same_jti)
    assert third.status == 401, third
    recs = upstream_as.requests()
    assert recs[1]["error_detail"] == recs[2]["error_detail"] == "client assertion tokens must only be used once"
    assert [a["claims"]["jti"] for a in upstream_as.client_assertions()] == [jti, jti, jti]
    assert upstream_as.last_request()["client_assertion"]["header"]["alg"] == "ES384"
    assert upstream_as.counters()["clients"][PKJWT_CLIENT] == {"issued": 1, "rejected": 2, "outage": 0,
                                                               "errors": {"invalid_client": 2}}


# case -> why the AS refused (error_detail); the first five come from our SMART hook or oidc-provider's alg list
PKJWT_REFUSALS = {
    "aud_issuer": "aud must be the token endpoint URL",  # oidc-provider alone accepts the issuer
    "aud_list": "aud must be the token endpoint URL",
    "exp_too_far": "exp must be at most 300 s ahead",
    "expired": "jwt expired",
    "rs256": "alg mismatch",
    "es256": "alg mismatch",
    "unregistered_key": "signature verification failed",
    "iss_not_sub": "iss (JWT issuer) must be the client_id",
    "no_jti": "unique jti (JWT ID) must be provided",
    "no_exp": "expiration must be specified",
}


@pytest.mark.parametrize("case", list(PKJWT_REFUSALS))
def test_private_key_jwt_refuses_assertions_smart_forbids(case, upstream_as, upstream_keys, tmp_path):
    url, key = upstream_as.token_url, upstream_keys.rs384
    make = {
        "aud_issuer": lambda: client_assertion(key, PKJWT_CLIENT, url, aud=upstream_as.issuer),
        "aud_list": lambda: client_assertion(key, PKJWT_CLIENT, url, aud=[url, upstream_as.issuer]),
        "exp_too_far": lambda: client_assertion(key, PKJWT_CLIENT, url, lifetime=330),
        "expired": lambda: client_assertion(key, PKJWT_CLIENT, url, now=int(time.time()) - 400),
        "rs256": lambda: client_assertion(key, PKJWT_CLIENT, url, alg="RS256"),
        "es256": lambda: jwt.encode({"iss": PKJWT_CLIENT, "sub": PKJWT_CLIENT, "aud": url, "jti": "x-es256",
                                     "exp": int(time.time()) + 60}, ec.generate_private_key(ec.SECP256R1()),
                                    algorithm="ES256", headers={"kid": upstream_keys.es384.kid}),
        "unregistered_key": lambda: client_assertion(_other_key("RS384", key.kid, tmp_path), PKJWT_CLIENT,
                                                     url),
        "iss_not_sub": lambda: client_assertion(key, PKJWT_CLIENT, url, iss="someone-else"),
        "no_jti": lambda: jwt.encode({"iss": PKJWT_CLIENT, "sub": PKJWT_CLIENT, "aud": url,
                                      "exp": int(time.time()) + 60}, key.private_key(), algorithm="RS384",
                                     headers={"kid": key.kid}),
        "no_exp": lambda: client_assertion(key, PKJWT_CLIENT, url, exp=None),
    }[case]
    r = upstream_as.token_private_key_jwt(key, assertion=make())
    assert r.status in (400, 401) and r.json()["error"] in ("invalid_client", "invalid_request"), r
    assert upstream_as.issued() == 0
    assert PKJWT_REFUSALS[case] in upstream_as.last_request()["error_detail"]


def test_the_lifetime_limit_is_exactly_300_seconds(upstream_as, upstream_keys):
    ok = client_assertion(upstream_keys.es384, PKJWT_CLIENT, upstream_as.token_url, lifetime=290)
    assert upstream_as.token_private_key_jwt(upstream_keys.es384, assertion=ok).status == 200
    late = client_assertion(upstream_keys.es384, PKJWT_CLIENT, upstream_as.token_url, lifetime=310)
    r = upstream_as.token_private_key_jwt(upstream_keys.es384, assertion=late)
    assert r.status == 401 and "at most 300 s ahead" in upstream_as.requests()[-1]["error_detail"]


# ---------------------------------------------------------------------------- the JWT-bearer grant

def test_jwt_bearer_takes_the_scope_from_the_assertion_or_the_form(upstream_as):
    r = upstream_as.token_jwt_bearer(scope_in_assertion="system/Patient.read")
    assert decode_unverified(upstream_as.access_token(r))[1]["scope"] == "system/Patient.read"
    r = upstream_as.token_jwt_bearer(scope_in_assertion="system/Patient.read", scope="system/*.rs")
    assert decode_unverified(upstream_as.access_token(r))[1]["scope"] == "system/*.rs"
    r = upstream_as.token_jwt_bearer(scope_in_assertion="system/*.write")
    assert r.status == 400 and r.json()["error"] == "invalid_scope", r
    recs = upstream_as.requests()
    assert all(x["client_id"] == SERVICE_ACCOUNT and x["auth_method"] == "jwt_bearer" for x in recs)
    assert "client_id" not in recs[0]["params"]  # Google style: only grant_type and assertion


JWT_BEARER_REFUSALS = {
    "wrong_aud": 'unexpected "aud" claim value',
    "aud_list": "aud must be exactly",
    "exp_too_far": "exp must be at most 3600 s ahead",
    "expired": "ERR_JWT_EXPIRED",
    "no_iat": 'missing required "iat" claim',
    "other_key": "ERR_JWS_SIGNATURE_VERIFICATION_FAILED",
    "sub_other": "sub must be the service account",
    "unknown_kid": "unknown kid not-the-key-id",
    "hs256": "ERR_JOSE_ALG_NOT_ALLOWED",
}


@pytest.mark.parametrize("case", list(JWT_BEARER_REFUSALS))
def test_jwt_bearer_refuses_bad_assertions(case, upstream_as, upstream_keys, tmp_path):
    sa, url = upstream_keys.service_account, upstream_as.token_url
    make = {
        "wrong_aud": lambda: service_account_assertion(sa, SERVICE_ACCOUNT, upstream_as.issuer),
        "aud_list": lambda: service_account_assertion(sa, SERVICE_ACCOUNT, url, aud=[url, "x"]),
        "exp_too_far": lambda: service_account_assertion(sa, SERVICE_ACCOUNT, url, lifetime=3700),
        "expired": lambda: service_account_assertion(sa, SERVICE_ACCOUNT, url, now=int(time.time()) - 3700),
        "no_iat": lambda: service_account_assertion(sa, SERVICE_ACCOUNT, url, iat=None),
        "other_key": lambda: service_account_assertion(_other_key("RS256", sa.kid, tmp_path), SERVICE_ACCOUNT,
                                                       url),
        "sub_other": lambda: service_account_assertion(sa, SERVICE_ACCOUNT, url, sub="user@example.test"),
        "unknown_kid": lambda: jwt.encode({"iss": SERVICE_ACCOUNT, "aud": url, "iat": int(time.time()),
                                           "exp": int(time.time()) + 60}, sa.private_key(), algorithm="RS256",
                                          headers={"kid": "not-the-key-id"}),
        "hs256": lambda: jwt.encode({"iss": SERVICE_ACCOUNT, "aud": url, "iat": int(time.time()),
                                     "exp": int(time.time()) + 60}, "a-shared-secret-of-32-bytes-or-more!",
                                    algorithm="HS256", headers={"kid": sa.kid}),
    }[case]
    r = upstream_as.token_jwt_bearer(assertion=make())
    assert r.status == 400 and r.json()["error"] == "invalid_grant", r
    assert upstream_as.issued() == 0
    detail = upstream_as.last_request()["error_detail"]
    assert detail.startswith("assertion: ") and JWT_BEARER_REFUSALS[case] in detail, detail


def test_jwt_bearer_needs_a_known_service_account_and_is_theirs_only(upstream_as, upstream_keys):
    stranger = service_account_assertion(upstream_keys.service_account, "stranger@upstream-project.test",
                                         upstream_as.token_url)
    r = upstream_as.token_jwt_bearer(assertion=stranger)
    assert r.status == 401 and r.json()["error"] == "invalid_client", r
    r = upstream_as.token_post(grant_type=JWT_BEARER_GRANT, assertion=service_account_assertion(
        upstream_keys.service_account, SERVICE_ACCOUNT, upstream_as.token_url))
    assert r.status == 400 and r.json()["error"] == "invalid_request", r  # grant not allowed for the client
    r = upstream_as._token({"grant_type": "client_credentials", "client_id": SERVICE_ACCOUNT})
    assert r.status == 400 and r.json()["error"] == "invalid_request", r


# --------------------------------------------------------------------------------------- the fake guard

def test_the_fake_guard_refuses_everything_but_a_valid_token_and_nothing_reaches_the_target(
        upstream_as, guards, upstreams, idp):
    _, guard_b = guards
    good = upstream_as.access_token(upstream_as.token_basic(resource=FHIR_B_AUDIENCE))
    assert_refused(get(guard_b, "/Patient"), guard_b, "missing_token")
    assert_refused(http_request(guard_b.port, "GET", "/Patient", {"authorization": "Basic eDp5"}), guard_b,
                   "missing_token")
    assert_refused(get(guard_b, "/Patient", "not.a.jwt"), guard_b, "malformed")
    # The router's own clients' token (tests/idp): another issuer, another key.
    assert_refused(get(guard_b, "/Patient", idp.access_token(CLIENT_A, TENANT_A)), guard_b, "unknown_kid")
    # The upstream AS's kid, another key.
    h, c = decode_unverified(good)
    forged = jwt.encode(c, rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256",
                        headers={"kid": h["kid"], "typ": "at+jwt"})
    assert_refused(get(guard_b, "/Patient", forged), guard_b, "bad_signature")
    # Right signature, claims edited after signing.
    head, _, sig = good.split(".")
    import base64
    edited = base64.urlsafe_b64encode(json.dumps({**c, "aud": FHIR_A_AUDIENCE}).encode()).rstrip(b"=").decode()
    assert_refused(get(guard_b, "/Patient", f"{head}.{edited}.{sig}"), guard_b, "bad_signature")
    assert upstreams.tenant_b.requests == []
    assert guard_b.counters() == {"missing_token": 2, "malformed": 1, "unknown_kid": 1, "bad_signature": 2}

    ok = http_request(guard_b.port, "POST", "/Patient/_search", {**bearer(good), "content-type":
                      "application/x-www-form-urlencoded", "x-probe": "1"}, b"family=probe")
    assert ok.status == 200 and ok.header("x-upstream-name") == "tenant-b"
    (seen,) = upstreams.tenant_b.requests
    assert seen.method == "POST" and seen.path == "/Patient/_search" and seen.body == b"family=probe"
    assert seen.header("x-probe") == "1" and seen.header("authorization") == f"Bearer {good}"
    assert all(good not in repr(r) for r in guard_b.records)


def test_an_unknown_kid_makes_the_fake_guard_refetch_the_jwks_at_most_once_a_second(guards, idp):
    _, guard_b = guards
    stranger = idp.access_token(CLIENT_A, TENANT_A)
    time.sleep(max(0.0, 1.1 - (time.monotonic() - guard_b._last_fetch)))  # past the rate limit
    before = guard_b.jwks_fetches
    begin = time.monotonic()
    assert get(guard_b, "/Patient", stranger).status == 401
    assert get(guard_b, "/Patient", stranger).status == 401
    assert guard_b.jwks_fetches >= before + 1
    if time.monotonic() - begin < 1.0:
        assert guard_b.jwks_fetches == before + 1
    assert [r.verdict for r in guard_b.records] == ["unknown_kid", "unknown_kid"]


def test_revoked_tokens_are_refused_until_a_new_one_is_obtained(upstream_as, guards):
    guard_a, _ = guards
    first = upstream_as.access_token(upstream_as.token_post(resource=FHIR_A_AUDIENCE))
    assert get(guard_a, "/metadata", first).status == 200
    assert guard_a.revoke_all_seen() >= {decode_unverified(first)[1]["jti"]}
    assert_refused(get(guard_a, "/metadata", first), guard_a, "revoked")
    second = upstream_as.access_token(upstream_as.token_post(resource=FHIR_A_AUDIENCE))
    assert get(guard_a, "/metadata", second).status == 200
    assert [r.verdict for r in guard_a.records] == ["allowed", "revoked", "allowed"]


def test_a_short_lived_token_is_served_then_refused_as_expired(upstream_as, guards):
    guard_a, _ = guards
    upstream_as.set_ttl(4, client_id=BASIC_CLIENT)
    try:
        resp = upstream_as.token_basic(resource=FHIR_A_AUDIENCE)
        token = upstream_as.access_token(resp)
        assert resp.json()["expires_in"] == 4
        claims = decode_unverified(token)[1]
        assert claims["exp"] - claims["iat"] == 4
        assert upstream_as.token_post().json()["expires_in"] == 300  # only that client's lifetime changed
        first = get(guard_a, "/metadata", token)
        if time.time() < claims["exp"]:  # on a badly overloaded machine the 4 s may be gone already
            assert first.status == 200, first
        wait_until(lambda: get(guard_a, "/metadata", token).status == 401, 30, "the token to expire")
        assert time.time() >= claims["exp"]
        assert guard_a.records[-1].verdict == "expired"
    finally:
        upstream_as.set_ttl(300, client_id=BASIC_CLIENT)


# ---------------------------------------------------------------------------------------- AS controls

def test_outage_modes_stop_the_token_endpoint_but_issued_tokens_keep_working(upstream_as, guards):
    guard_a, _ = guards
    token = upstream_as.access_token(upstream_as.token_post())
    try:
        upstream_as.outage("503")
        r = upstream_as.token_post()
        assert r.status == 503 and r.json()["error"] == "temporarily_unavailable", r
        assert http_request(upstream_as.port, "GET", "/jwks").status == 200  # only the token endpoint is down
        assert get(guard_a, "/metadata", token).status == 200

        upstream_as.outage("drop")
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            upstream_as.token_post()

        upstream_as.outage("hang")
        conn = http.client.HTTPConnection("127.0.0.1", upstream_as.port, timeout=1.5)
        with pytest.raises(TimeoutError):
            conn.request("POST", "/token", "grant_type=client_credentials",
                         {"content-type": "application/x-www-form-urlencoded"})
            conn.getresponse()
        conn.close()

        upstream_as.outage("refuse")
        with pytest.raises(ConnectionRefusedError):
            upstream_as.token_post()
        assert get(guard_a, "/metadata", token).status == 200  # the guard has the keys already
    finally:
        upstream_as.outage("off")
    assert upstream_as.token_post().status == 200
    c = upstream_as.counters()
    assert c["outage"] == {"503": 1, "drop": 1, "hang": 1} and c["issued"] == 2
    assert c["clients"][POST_CLIENT] == {"issued": 2, "rejected": 0, "outage": 2, "errors": {}}
    assert c["clients"]["(none)"]["outage"] == 1  # the hung request named no client
    assert [r["outcome"] for r in upstream_as.requests()] == ["issued", "outage", "outage", "outage", "issued"]


def test_secret_rotation_refuses_the_old_secret_and_accepts_the_new(upstream_as):
    before = {c["client_id"]: c["secret_version"] for c in upstream_as.state()["clients"]}
    for client, fetch in ((POST_CLIENT, upstream_as.token_post), (BASIC_CLIENT, upstream_as.token_basic)):
        old = upstream_as.secrets[client]
        assert fetch().status == 200
        new = upstream_as.rotate_secret(client)
        assert new != old and upstream_as.secrets[client] == new
        r = fetch(secret=old)
        assert r.status == 401 and r.json()["error"] == "invalid_client", r
        assert fetch().status == 200
        assert upstream_as.counters()["clients"][client] == {"issued": 2, "rejected": 1, "outage": 0,
                                                             "errors": {"invalid_client": 1}}
    versions = {c["client_id"]: c["secret_version"] for c in upstream_as.state()["clients"]}
    assert versions == {**before, POST_CLIENT: before[POST_CLIENT] + 1, BASIC_CLIENT: before[BASIC_CLIENT] + 1}


def test_a_secret_with_reserved_characters_works_form_encoded_in_basic_and_post(upstream_as):
    for client, fetch in ((POST_CLIENT, upstream_as.token_post), (BASIC_CLIENT, upstream_as.token_basic)):
        upstream_as.rotate_secret(client, "p+s/w:r%d =&~")
        assert fetch().status == 200, client
    # Basic per RFC 6749 2.3.1 form-encodes before base64: the raw secret in Basic is refused.
    import base64
    raw = base64.b64encode(f"{BASIC_CLIENT}:p+s/w:r%d =&é".encode()).decode()
    r = upstream_as._token({"grant_type": "client_credentials"}, {"authorization": f"Basic {raw}"})
    assert r.status in (400, 401), r


def test_the_upstream_auth_fixture_puts_a_fake_guard_before_each_tenant_cluster(upstream_auth, upstreams):
    assert set(upstream_auth.cluster_ports()) == {"tenant_a", "tenant_b"}
    as_ = upstream_auth.as_
    for cluster, audience, upstream in (("tenant_a", FHIR_A_AUDIENCE, upstreams.tenant_a),
                                        ("tenant_b", FHIR_B_AUDIENCE, upstreams.tenant_b)):
        guard = upstream_auth.guards[cluster]
        assert guard.port == upstream_auth.cluster_ports()[cluster] and guard.audience == audience
        token = as_.access_token(as_.token_post(resource=audience))
        assert get(guard, "/Patient", token).json()["resourceType"] == "Bundle"
        assert [r.path for r in upstream.requests] == ["/Patient"]
        assert get(guard, "/Patient", as_.access_token(as_.token_post(
            resource=FHIR_B_AUDIENCE if cluster == "tenant_a" else FHIR_A_AUDIENCE))).status == 401
        assert len(upstream.requests) == 1
    upstream_auth.clear()
    assert as_.counters()["total"] == 0 and all(g.records == [] for g in upstream_auth.guards.values())


def test_the_service_account_key_file_is_google_style(upstream_as, upstream_keys):
    doc = json.loads(upstream_as.service_account_key_file.read_text())
    assert doc["type"] == "service_account" and doc["client_email"] == SERVICE_ACCOUNT
    assert doc["token_uri"] == upstream_as.token_url and doc["private_key_id"] == upstream_keys.service_account.kid
    assert doc["private_key"].startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8
    for k in (upstream_keys.rs384, upstream_keys.es384):
        assert k.pem().startswith("-----BEGIN PRIVATE KEY-----")
