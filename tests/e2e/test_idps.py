"""Issue 25: Entra ID, Okta, Auth0, Keycloak and Cognito tokens as they really are, through real Envoy (both builds).

The five IdPs cannot run here (no internet): their key sets and discovery documents are served by a real HTTP server
on 127.0.0.1 (`idps.IdpServer`) under each IdP's real host name (the Envoy cluster of the IdP points there, so the
configs carry the real URLs), and their tokens are minted with exactly the header and claims each IdP documents for a
client-credentials access token (and, for the refusals, for its ID token). Each IdP's plugin configuration is the
```json block of docs/idp/<idp>.md, loaded from the page. Sources of every shape (the oracle of these tests):

Microsoft Entra ID
  https://learn.microsoft.com/en-us/entra/identity-platform/access-token-claims-reference
      header typ "always JWT", alg, kid; x5t "emitted only in v1.0 access tokens"; aud (App ID URI or GUID), iss, tid,
      roles, appid/appidacr (v1.0), azp/azpacr (v2.0), oid, sub, ver
  https://learn.microsoft.com/en-us/entra/identity-platform/access-tokens     v1.0/v2.0 chosen by the API; validation
  https://learn.microsoft.com/en-us/entra/identity-platform/optional-claims-reference     idtyp "app"
  https://learn.microsoft.com/en-us/entra/identity-platform/signing-key-rollover    keys: kty, use, kid, x5t, n, e, x5c
  https://learn.microsoft.com/en-us/answers/questions/1283131     common/discovery/v2.0/keys serves every tenant
  https://github.com/coreos/go-oidc/issues/121       common discovery: "issuer": ".../{tenantid}/v2.0"
  https://learn.microsoft.com/en-us/graph/api/resources/approle     role value: <=120 chars, '/' allowed, no space
Okta
  https://developer.okta.com/standards/OIDC/     the authorization servers' tokens: iss .../oauth2/{authServerId}
      (.../oauth2/default), aud (api://default), scp array, cid, uid (users only), ver, jti "AT."
  https://support.okta.com/help/s/article/list-of-reserved-claim-names    cid, uid: access token claims
  https://developer.okta.com/docs/guides/implement-client-creds/     client credentials: custom scopes, no user
  https://groups.google.com/g/rabbitmq-users/c/O3GdCKf8soM/m/ZsjMcizrAgAJ    a decoded Okta access token (no typ)
Auth0
  https://auth0.com/docs/secure/tokens/access-tokens/access-token-profiles      Auth0 profile (azp) and RFC 9068
      profile (client_id, jti), scope string, permissions
  https://auth0.com/docs/get-started/apis/configure-access-token-profile
  https://www.rfc-editor.org/rfc/rfc9068#section-2.1      typ "at+jwt"; section 4: the resource server checks it
  https://auth0.com/docs/manage-users/organizations/organizations-for-m2m-applications      org_id in M2M tokens
  https://auth0.com/docs/get-started/authentication-and-authorization-flow/client-credentials-flow   gty, sub @clients
Keycloak
  https://www.keycloak.org/docs/latest/server_admin/#_service_accounts     azp, scope string, payload typ "Bearer"
  https://www.keycloak.org/docs/latest/server_admin/#audience-support       aud absent or "account" without a mapper
  https://www.keycloak.org/docs/latest/server_admin/#realm_keys     RS256 signing key and RSA-OAEP "enc" key published
Amazon Cognito
  https://docs.aws.amazon.com/cognito/latest/developerguide/amazon-cognito-user-pools-using-the-access-token.html
      header kid/alg (no typ); no aud; client_id, token_use "access", scope, version 2, jti, auth_time
  https://docs.aws.amazon.com/cognito/latest/developerguide/amazon-cognito-user-pools-using-tokens-verifying-a-jwt.html
  https://docs.aws.amazon.com/cognito-user-identity-pools/latest/APIReference/API_ResourceServerScopeType.html
      scope names [\\x21\\x23-\\x2E\\x30-\\x5B\\x5D-\\x7E]+ (no '/'), rendered resourceServerIdentifier/ScopeName

The upstreams are the suite's recording servers: a verdict "routed" means the tenant's server saw the request (and
only it); "refused" means the status and no upstream saw anything.
"""
from __future__ import annotations

import base64
import json
import uuid

import pytest

from checks import assert_forbidden, assert_no_upstream_saw_anything, assert_served_only_by, assert_unauthorized
from checks import assert_operation_outcome, assert_wasm_vm_never_crashed
from conftest import stop_envoy
from harness import bearer, wait_until
from idps import (
    IdpKey, IdpServer, auth0_jwk, b64u, cognito_jwk, entra_jwk, envoy_base, keycloak_jwk, new_id, now, okta_jwk,
    page_config, page_path,
)

PATIENT = b'{"resourceType":"Patient","name":[{"family":"Doe"}]}'


# ------------------------------------------------------------------------------------------ plumbing

@pytest.fixture(scope="module")
def server():
    s = IdpServer()
    yield s
    s.stop()


class Site:
    """One Envoy running one IdP's page config."""

    def __init__(self, env, upstreams, server: IdpServer):
        self.env, self.upstreams, self.server = env, upstreams, server

    def send(self, token: str, method: str = "GET", path: str = "/Patient", body: bytes | None = None):
        headers = bearer(token)
        if body is not None:
            headers["content-type"] = "application/fhir+json"
        return self.env.request(method, path, headers, body)

    def wait_ready(self, token: str, what: str) -> None:
        wait_until(lambda: self.send(token).status != 503, 30, f"{what}'s key set to load",
                   on_timeout=lambda: "\n" + self.env.log_tail(40))
        self.upstreams.clear()

    def routed(self, token: str, upstream: str, tenant: str, method: str = "GET", path: str = "/Patient"):
        self.upstreams.clear()
        resp = self.send(token, method, path, PATIENT if method == "POST" else None)
        # Tenant ids are compared case-insensitively and sent upstream lower-cased (src/tenant.rs).
        return assert_served_only_by(self.upstreams, resp, upstream, tenant.lower(), method=method, path=path)

    def refused(self, token: str, status: int, method: str = "GET", path: str = "/Patient"):
        self.upstreams.clear()
        resp = self.send(token, method, path, PATIENT if method == "POST" else None)
        if status == 401:
            assert_unauthorized(resp, invalid_token=True)
        elif status == 403:
            assert_forbidden(resp)
        else:
            assert_operation_outcome(resp, status)
        assert_no_upstream_saw_anything(self.upstreams)
        return resp


def start_site(start_envoy, upstreams, server, name: str, clusters: list[str], doc: dict) -> Site:
    env = start_envoy(name, upstreams.cluster_ports(), base=envoy_base(clusters, server.port), plugin=lambda _: doc)
    return Site(env, upstreams, server)


def narrowing(site: Site, read_only: str, wide: str, upstream: str, tenant: str) -> None:
    """A `system/Patient.read` grant reads Patients only; a wide grant of the same IdP may write (so the refusal
    comes from the token's scopes, not from the tenant's allowlist)."""
    site.routed(read_only, upstream, tenant)
    site.refused(read_only, 403, "POST")
    site.refused(read_only, 403, path="/Observation")
    site.routed(wide, upstream, tenant, "POST")
    site.routed(wide, upstream, tenant, path="/Observation")


# ------------------------------------------------------------------------------------- Entra ID

ENTRA = "login.microsoftonline.com"
ENTRA_DISCOVERY = f"https://{ENTRA}/common/v2.0/.well-known/openid-configuration"
ENTRA_KEYS_V2 = f"https://{ENTRA}/common/discovery/v2.0/keys"
ENTRA_KEYS_V1 = f"https://{ENTRA}/common/discovery/keys"
TID_A = "4a1f8e2c-3b7d-4c9e-a5f6-0d2e8b7c6a51"   # customer A's directory (page: tenant_a)
TID_B = "9c3e7b1d-5f2a-4e8b-b6c4-2a9d1e0f7b83"   # customer B's directory (page: tenant_b)
TID_C = "2d8f0a6b-9e1c-4f3d-8b7a-5c4e3f2a1b0d"   # a directory that consented but is not configured
API_APP_ID = "00000000-0000-0000-0000-0000000000aa"
CLIENT_APP_ID = "5b2c1a0e-7d4f-4e3b-9a8c-6f1e2d3c4b5a"  # the vendor's multi-tenant client: the same id everywhere
GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"


class Entra:
    def __init__(self, server: IdpServer):
        self.server = server
        self.keys = [IdpKey("accounts.accesscontrol.windows.net")]
        self.publish()

    def publish(self) -> None:
        self.server.put(ENTRA_DISCOVERY, {
            "token_endpoint": f"https://{ENTRA}/common/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": ENTRA_KEYS_V2,
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"https://{ENTRA}/{{tenantid}}/v2.0",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
            "authorization_endpoint": f"https://{ENTRA}/common/oauth2/v2.0/authorize",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"https://{ENTRA}/common/oauth2/v2.0/logout",
            "claims_supported": ["sub", "iss", "cloud_instance_name", "cloud_instance_host_name",
                                 "cloud_graph_host_name",
                                 "msgraph_host", "aud", "exp", "iat", "auth_time", "acr", "nonce",
                                 "preferred_username", "name", "tid", "ver", "at_hash", "c_hash", "email"],
            "kerberos_endpoint": f"https://{ENTRA}/common/kerberos",
            "tenant_region_scope": None,
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        })
        self.server.put(ENTRA_KEYS_V2, {"keys": [entra_jwk(k) for k in self.keys]})
        self.server.put(ENTRA_KEYS_V1, {"keys": [entra_jwk(k, "https://sts.windows.net/{tenantid}/")
                                                 for k in self.keys]})

    def v2(self, tid: str, roles: list[str] | None = ("system/*.*",), *, iss_tid: str | None = None,
           aud: str = API_APP_ID, key: IdpKey | None = None, **over) -> str:
        key = key or self.keys[0]
        oid = new_id()  # the client's service principal in that directory
        claims = {"aud": aud, "iss": f"https://{ENTRA}/{iss_tid or tid}/v2.0", "iat": now() - 5, "nbf": now() - 5,
                  "exp": now() + 3600, "aio": "k2BgYJiVr5Hh8n3Oc+fcmv4/AQA=", "azp": CLIENT_APP_ID, "azpacr": "1",
                  "idtyp": "app", "oid": oid, "rh": "0.AXkA7y4JLzEwq0mdcbgZNbRP6Q.", "roles": roles, "sub": oid,
                  "tid": tid, "uti": "d7sV2VbcE0O8fYgPZCcEAA", "ver": "2.0"}
        claims.update(over)
        claims = {k: (list(v) if isinstance(v, tuple) else v) for k, v in claims.items() if v is not None}
        return key.sign({"typ": "JWT", "alg": "RS256", "kid": key.kid}, claims)

    def v1(self, tid: str, roles: list[str] | None = ("system/*.*",), *, iss_tid: str | None = None,
           aud: str = "api://fhir-router", key: IdpKey | None = None, **over) -> str:
        key = key or self.keys[0]
        oid = new_id()
        claims = {"aud": aud, "iss": f"https://sts.windows.net/{iss_tid or tid}/", "iat": now() - 5,
                  "nbf": now() - 5, "exp": now() + 3600, "aio": "E2RgYPjVfHXh9nL5+wd4nT8A", "appid": CLIENT_APP_ID,
                  "appidacr": "1", "idp": f"https://sts.windows.net/{tid}/", "idtyp": "app", "oid": oid,
                  "rh": "0.AXkA7y4JLzEwq0mdcbgZNbRP6Q.", "roles": roles, "sub": oid, "tid": tid,
                  "uti": "Qx9v2lT7ZkOx1mFAJbQeAA", "ver": "1.0"}
        claims.update(over)
        claims = {k: (list(v) if isinstance(v, tuple) else v) for k, v in claims.items() if v is not None}
        return key.sign({"typ": "JWT", "alg": "RS256", "x5t": key.x5t, "kid": key.kid}, claims)

    def id_token(self, tid: str) -> str:
        """What the client app gets as an ID token when a user signs in to it: `aud` is the client itself."""
        key = self.keys[0]
        oid = new_id()
        claims = {"aud": CLIENT_APP_ID, "iss": f"https://{ENTRA}/{tid}/v2.0", "iat": now() - 5, "nbf": now() - 5,
                  "exp": now() + 3600, "name": "Pat Admin", "nonce": "n-0S6_WzA2Mj", "oid": oid,
                  "preferred_username": "pat@customer.example", "rh": "0.AXkA.", "sub": "AAAAAAAAAAAAAAAAAAAAAIkz",
                  "tid": tid, "uti": "fqiBqXLPj0eQa82S-IYFAA", "ver": "2.0"}
        return key.sign({"typ": "JWT", "alg": "RS256", "kid": key.kid}, claims)


@pytest.fixture(scope="module")
def entra(start_envoy, upstreams, server):
    idp = Entra(server)
    site = start_site(start_envoy, upstreams, server, "envoy-idp-entra", ["entra"], page_config("entra"))
    site.idp = idp
    try:
        site.wait_ready(idp.v2(TID_A), "Entra v2.0")
        site.wait_ready(idp.v1(TID_A), "Entra v1.0")
        yield site
    finally:
        stop_envoy(site.env)


@pytest.mark.parametrize("tid,upstream", [(TID_A, "tenant-a"), (TID_B, "tenant-b")], ids=["customer-a", "customer-b"])
def test_entra_v2_app_token_reaches_the_tenant_of_its_directory(entra, tid, upstream):
    entra.routed(entra.idp.v2(tid), upstream, tid)


@pytest.mark.parametrize("aud", ["api://fhir-router", "api://fhir-router/", API_APP_ID],
                         ids=["app-id-uri", "app-id-uri-with-slash", "app-guid"])
@pytest.mark.parametrize("tid,upstream", [(TID_A, "tenant-a"), (TID_B, "tenant-b")], ids=["customer-a", "customer-b"])
def test_entra_v1_app_token_reaches_the_tenant_of_its_directory(entra, tid, upstream, aud):
    entra.routed(entra.idp.v1(tid, aud=aud), upstream, tid)


def test_entra_both_directories_share_one_key_set(entra):
    """Two customers' tokens verify against the one common key set: one key-set document was ever needed."""
    entra.routed(entra.idp.v2(TID_A), "tenant-a", TID_A)
    entra.routed(entra.idp.v2(TID_B), "tenant-b", TID_B)
    assert {s.path for s in entra.server.seen(ENTRA)} <= {"/common/v2.0/.well-known/openid-configuration",
                                                          "/common/discovery/v2.0/keys", "/common/discovery/keys"}


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("iss_tid,tid", [(TID_A, TID_B), (TID_B, TID_A), (TID_C, TID_A)],
                         ids=["iss-a-tid-b", "iss-b-tid-a", "iss-unconfigured-tid-a"])
def test_entra_token_whose_iss_names_another_directory_than_its_tid_is_refused(entra, version, iss_tid, tid):
    mint = entra.idp.v1 if version == "v1" else entra.idp.v2
    entra.refused(mint(tid, iss_tid=iss_tid), 401)


def test_entra_token_with_a_non_identifier_tid_is_refused(entra):
    """The placeholder's value is 1-128 chars of A-Za-z0-9._- : a `tid` with a '/' cannot stretch the template."""
    entra.refused(entra.idp.v2("x/../" + TID_A, iss_tid="x/../" + TID_A), 401)


def test_entra_app_roles_narrow_what_the_client_may_do(entra):
    narrowing(entra, entra.idp.v2(TID_A, ["system/Patient.read"]), entra.idp.v2(TID_A, ["system/*.*"]),
              "tenant-a", TID_A)
    entra.refused(entra.idp.v1(TID_B, ["system/Patient.read"]), 403, "POST")
    entra.routed(entra.idp.v1(TID_B, ["system/Patient.read"]), "tenant-b", TID_B)


def test_entra_app_token_without_roles_is_refused(entra):
    """Entra omits `roles` when no app role is granted; the page's tenants require SMART scopes."""
    entra.refused(entra.idp.v2(TID_A, None), 403)
    entra.refused(entra.idp.v1(TID_A, None), 403)


def test_entra_scope_claim_is_not_read_as_smart_scopes(entra):
    """App-only tokens carry no `scp`/`scope`; one that did would not be read: the page reads `roles`."""
    entra.refused(entra.idp.v2(TID_A, None, scope="system/*.*", scp="system/*.*"), 403)


@pytest.mark.parametrize("kind", ["id-token", "graph-v2", "graph-v1"])
def test_entra_id_token_or_another_apis_token_is_refused(entra, kind):
    token = {"id-token": lambda: entra.idp.id_token(TID_A),
             "graph-v2": lambda: entra.idp.v2(TID_A, aud=GRAPH_APP_ID),
             "graph-v1": lambda: entra.idp.v1(TID_A, aud="https://graph.microsoft.com")}[kind]()
    entra.refused(token, 401)


def test_entra_directory_not_configured_is_refused(entra):
    entra.refused(entra.idp.v2(TID_C), 403)
    entra.refused(entra.idp.v1(TID_C), 403)


def test_entra_token_signed_by_a_key_outside_the_set_is_refused(entra):
    stranger = IdpKey("accounts.accesscontrol.windows.net", kid=entra.idp.keys[0].kid)
    entra.refused(entra.idp.v2(TID_A, key=stranger), 401)


def test_entra_configured_from_the_common_discovery_document(entra):
    """The v2.0 provider has no jwks_uri: Envoy asked the common discovery document, then the jwks_uri it names."""
    paths = [s.path for s in entra.server.seen(ENTRA)]
    assert "/common/v2.0/.well-known/openid-configuration" in paths, paths
    assert "/common/discovery/v2.0/keys" in paths, paths
    assert paths.index("/common/v2.0/.well-known/openid-configuration") < paths.index("/common/discovery/v2.0/keys")


def test_entra_rolled_key_is_picked_up_through_discovery(entra):
    """A token signed by a key the set does not list yet makes the filter read the discovery document and the key
    set again (the spec: both are fetched at every refresh)."""
    discovery = "/common/v2.0/.well-known/openid-configuration"
    before = len(entra.server.seen(ENTRA, discovery))
    new = IdpKey("accounts.accesscontrol.windows.net")
    entra.idp.keys.append(new)
    entra.idp.publish()
    token = entra.idp.v2(TID_B, key=new)
    wait_until(lambda: entra.send(token).status == 200, 60, "the rolled Entra key to be picked up",
               on_timeout=lambda: "\n" + entra.env.log_tail(40))
    entra.routed(token, "tenant-b", TID_B)
    assert len(entra.server.seen(ENTRA, discovery)) > before, "the key set was refreshed without discovery"
    entra.routed(entra.idp.v2(TID_A), "tenant-a", TID_A)  # the old key still works while it is listed


# ------------------------------------------------------------------------------------------ Okta

OKTA = "fhir-router.okta.com"
OKTA_ACME = f"https://{OKTA}/oauth2/aus8acme0clinic1a2b3"
OKTA_GLOBEX = f"https://{OKTA}/oauth2/aus9globex0health4c5"
OKTA_CLIENT = "0oa5fhirbackend7x8y9"


class Okta:
    def __init__(self, server: IdpServer):
        self.keys = {OKTA_ACME: IdpKey("okta-acme", kid="Qq8TGbAmtLp1gJdQz7mH2vHrU8lK9s4xW0yE3fR6tYc"),
                     OKTA_GLOBEX: IdpKey("okta-globex", kid="x2LgXh7fN4pR9sV1bT6wK3mJ8qD0cZ5yA7eU2iO4nHs")}
        for iss, key in self.keys.items():
            server.put(f"{iss}/v1/keys", {"keys": [okta_jwk(key)]})

    def token(self, iss: str, scp: list[str] | None = ("system/*.*",), *, aud: str = "api://fhir-router",
              key_of: str | None = None, **over) -> str:
        key = self.keys[key_of or iss]
        claims = {"ver": 1, "jti": "AT." + b64u(uuid.uuid4().bytes + uuid.uuid4().bytes), "iss": iss, "aud": aud,
                  "iat": now() - 5, "exp": now() + 3600, "cid": OKTA_CLIENT, "scp": scp, "sub": OKTA_CLIENT}
        claims.update(over)
        claims = {k: (list(v) if isinstance(v, tuple) else v) for k, v in claims.items() if v is not None}
        return key.sign({"kid": key.kid, "alg": "RS256"}, claims)

    def id_token(self, iss: str) -> str:
        key = self.keys[iss]
        claims = {"sub": "00u1a2b3c4d5e6f7g8h9", "name": "Pat Admin", "ver": 1, "iss": iss, "aud": OKTA_CLIENT,
                  "iat": now() - 5, "exp": now() + 3600, "jti": "ID.radCQMOQUmyvcTBmmIL0J6BaS60apUEiC7-vI7pOmkw",
                  "amr": ["pwd"], "idp": "00o1a2b3c4d5e6f7g8h9", "auth_time": now() - 60,
                  "at_hash": "fPlsvVszI29LU2UhDyJ9vg"}
        return key.sign({"kid": key.kid, "alg": "RS256"}, claims)


@pytest.fixture(scope="module")
def okta(start_envoy, upstreams, server):
    idp = Okta(server)
    site = start_site(start_envoy, upstreams, server, "envoy-idp-okta", ["okta"], page_config("okta"))
    site.idp = idp
    try:
        site.wait_ready(idp.token(OKTA_ACME), "Okta acme")
        site.wait_ready(idp.token(OKTA_GLOBEX), "Okta globex")
        yield site
    finally:
        stop_envoy(site.env)


@pytest.mark.parametrize("iss,upstream,tenant", [(OKTA_ACME, "tenant-a", "acme"), (OKTA_GLOBEX, "tenant-b", "globex")],
                         ids=["acme-server", "globex-server"])
def test_okta_each_authorization_server_is_one_tenant(okta, iss, upstream, tenant):
    okta.routed(okta.idp.token(iss), upstream, tenant)


def test_okta_claims_cannot_name_another_tenant_than_the_issuer(okta):
    """A token of acme's server naming globex in every claim a tenant could come from still goes to acme only."""
    token = okta.idp.token(OKTA_ACME, ["globex", "tenant/globex", "system/*.*"], scope="globex tenant/globex",
                           tid="globex", org_id="globex")
    okta.routed(token, "tenant-a", "acme")


def test_okta_scp_array_narrows_what_the_client_may_do(okta):
    narrowing(okta, okta.idp.token(OKTA_GLOBEX, ["system/Patient.read"]), okta.idp.token(OKTA_GLOBEX),
              "tenant-b", "globex")


def test_okta_token_without_smart_scopes_is_refused(okta):
    okta.refused(okta.idp.token(OKTA_ACME, ["fhir_router_access"]), 403)


@pytest.mark.parametrize("kind", ["signed-by-the-other-server", "default-server", "audience-of-another-api",
                                  "id-token"])
def test_okta_wrong_tenants_or_non_access_token_is_refused(okta, kind):
    token = {
        "signed-by-the-other-server": lambda: okta.idp.token(OKTA_GLOBEX, key_of=OKTA_ACME),
        "default-server": lambda: okta.idp.token(f"https://{OKTA}/oauth2/default", key_of=OKTA_ACME,
                                                 aud="api://default"),
        "audience-of-another-api": lambda: okta.idp.token(OKTA_ACME, aud="api://default"),
        "id-token": lambda: okta.idp.id_token(OKTA_ACME),
    }[kind]()
    okta.refused(token, 401)


# ----------------------------------------------------------------------------------------- Auth0

AUTH0 = "https://fhir-router.us.auth0.com/"
AUTH0_API = "https://fhir.example.com/api"
ORG_A = "org_6qS1lBKxMNgUiXuk"
ORG_B = "org_W3cGzX9pPZk1AbCd"
AUTH0_CLIENT = "9QjXyHBnlDzfLR2pW7cK4sTu1vEa8mGo"


class Auth0:
    def __init__(self, server: IdpServer):
        self.key = IdpKey("fhir-router.us.auth0.com", kid="aBcD3fGhIjK1mNoPqRsT5")
        server.put(f"{AUTH0}.well-known/jwks.json", {"keys": [auth0_jwk(self.key)]})

    def token(self, org: str | None, scope: str = "system/*.*", *, typ: str | None = "at+jwt", **over) -> str:
        """RFC 9068 profile, client credentials (client_id, jti), with the organization's org_id."""
        claims = {"iss": AUTH0, "sub": f"{AUTH0_CLIENT}@clients", "aud": AUTH0_API, "client_id": AUTH0_CLIENT,
                  "exp": now() + 86400, "iat": now() - 5, "jti": b64u(uuid.uuid4().bytes), "scope": scope,
                  "gty": "client-credentials", "org_id": org}
        claims.update(over)
        claims = {k: v for k, v in claims.items() if v is not None}
        header = {"alg": "RS256", "typ": typ, "kid": self.key.kid}
        return self.key.sign({k: v for k, v in header.items() if v is not None}, claims)

    def auth0_profile_token(self, org: str) -> str:
        """The default Auth0 profile of the same grant: typ JWT, azp instead of client_id."""
        claims = {"iss": AUTH0, "sub": f"{AUTH0_CLIENT}@clients", "aud": AUTH0_API, "azp": AUTH0_CLIENT,
                  "exp": now() + 86400, "iat": now() - 5, "scope": "system/*.*", "gty": "client-credentials",
                  "org_id": org}
        return self.key.sign({"alg": "RS256", "typ": "JWT", "kid": self.key.kid}, claims)

    def id_token(self, org: str) -> str:
        claims = {"iss": AUTH0, "sub": "auth0|123456", "aud": AUTH0_CLIENT, "exp": now() + 36000, "iat": now() - 5,
                  "nonce": "n-0S6_WzA2Mj", "name": "Pat Admin", "org_id": org, "sid": "Hd7cJ3"}
        return self.key.sign({"alg": "RS256", "typ": "JWT", "kid": self.key.kid}, claims)


@pytest.fixture(scope="module")
def auth0(start_envoy, upstreams, server):
    idp = Auth0(server)
    site = start_site(start_envoy, upstreams, server, "envoy-idp-auth0", ["auth0"], page_config("auth0"))
    site.idp = idp
    try:
        site.wait_ready(idp.token(ORG_A), "Auth0")
        yield site
    finally:
        stop_envoy(site.env)


@pytest.mark.parametrize("org,upstream", [(ORG_A, "tenant-a"), (ORG_B, "tenant-b")], ids=["org-a", "org-b"])
@pytest.mark.parametrize("typ", ["at+jwt", "application/at+jwt", "AT+JWT"])
def test_auth0_rfc9068_token_reaches_the_tenant_of_its_organization(auth0, org, upstream, typ):
    auth0.routed(auth0.idp.token(org, typ=typ), upstream, org)


def test_auth0_scope_string_narrows_what_the_client_may_do(auth0):
    narrowing(auth0, auth0.idp.token(ORG_B, "system/Patient.read"), auth0.idp.token(ORG_B), "tenant-b", ORG_B)


@pytest.mark.parametrize("kind", ["typ-JWT", "no-typ", "auth0-profile", "id-token", "no-gty", "another-grant",
                                  "another-api"])
def test_auth0_token_that_is_not_an_rfc9068_client_credentials_token_for_us_is_refused(auth0, kind):
    token = {
        "typ-JWT": lambda: auth0.idp.token(ORG_A, typ="JWT"),
        "no-typ": lambda: auth0.idp.token(ORG_A, typ=None),
        "auth0-profile": lambda: auth0.idp.auth0_profile_token(ORG_A),
        "id-token": lambda: auth0.idp.id_token(ORG_A),
        "no-gty": lambda: auth0.idp.token(ORG_A, gty=None),
        "another-grant": lambda: auth0.idp.token(ORG_A, gty="authorization_code"),
        "another-api": lambda: auth0.idp.token(ORG_A, aud="https://other.example.com/api"),
    }[kind]()
    auth0.refused(token, 401)


@pytest.mark.parametrize("org", [None, "org_Unlisted0000000", f"tenant/{ORG_A}"],
                         ids=["no-org_id", "unlisted-organization", "prefixed-organization"])
def test_auth0_token_of_no_listed_organization_is_refused(auth0, org):
    auth0.refused(auth0.idp.token(org, scope=f"system/*.* {ORG_A}"), 403)


@pytest.fixture(scope="module")
def auth0_rbac(start_envoy, upstreams, server, auth0):
    """The page's variant for RBAC's "Add Permissions in the Access Token": `"scopes": "permissions"`."""
    doc = page_config("auth0")
    doc["provider"]["claims"]["scopes"] = "permissions"
    site = start_site(start_envoy, upstreams, server, "envoy-idp-auth0-rbac", ["auth0"], doc)
    site.idp = auth0.idp
    try:
        site.wait_ready(site.idp.token(ORG_A, permissions=["system/*.*"]), "Auth0 (RBAC)")
        yield site
    finally:
        stop_envoy(site.env)


def test_auth0_rbac_permissions_array_narrows_what_the_client_may_do(auth0_rbac):
    mint = auth0_rbac.idp.token
    narrowing(auth0_rbac, mint(ORG_A, "", permissions=["system/Patient.read"]),
              mint(ORG_A, "", permissions=["system/*.*"]), "tenant-a", ORG_A)
    # With permissions configured, the scope string grants nothing.
    auth0_rbac.refused(mint(ORG_A, "system/*.*", permissions=[]), 403)


# -------------------------------------------------------------------------------------- Keycloak

KEYCLOAK = "https://keycloak.example.com"
REALM_ACME = f"{KEYCLOAK}/realms/acme"
REALM_GLOBEX = f"{KEYCLOAK}/realms/globex"
EVIL_HOST = "keycloak-keys.example.net"


def keycloak_discovery(iss: str, jwks_uri: str | None = None) -> dict:
    proto = f"{iss}/protocol/openid-connect"
    return {"issuer": iss, "authorization_endpoint": f"{proto}/auth", "token_endpoint": f"{proto}/token",
            "introspection_endpoint": f"{proto}/token/introspect", "userinfo_endpoint": f"{proto}/userinfo",
            "end_session_endpoint": f"{proto}/logout", "jwks_uri": jwks_uri or f"{proto}/certs",
            "grant_types_supported": ["authorization_code", "implicit", "refresh_token", "password",
                                      "client_credentials"],
            "response_types_supported": ["code", "none", "id_token", "token", "id_token token", "code id_token"],
            "subject_types_supported": ["public", "pairwise"],
            "id_token_signing_alg_values_supported": ["PS384", "RS384", "ES384", "RS256", "ES256", "RS512"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic", "client_secret_post",
                                                      "tls_client_auth", "client_secret_jwt"],
            "scopes_supported": ["openid", "profile", "email", "roles", "web-origins", "acr", "basic"]}


class Keycloak:
    def __init__(self, server: IdpServer, publish: bool = True):
        self.server = server
        self.sig = {REALM_ACME: [IdpKey("acme", kid="nnniBrxL0qhG79pkF3ccQj_l0jDmxKrYYy2YLlEe1s")],
                    REALM_GLOBEX: [IdpKey("globex", kid="5JmZ3hT8xWq0pLr2sN7vY4kB9cF1dG6eH3iA0oU2tRw")]}
        self.enc = {REALM_ACME: IdpKey("acme", kid="Vw4mK9qP2xZ7rT1bN6yL3hJ8dF0sG5cA2eU9iO7nRk"),
                    REALM_GLOBEX: IdpKey("globex", kid="Tz1aB6cD3eF8gH4iJ9kL2mN7oP5qR0sU3vW8xY1zA4")}
        for iss in self.sig if publish else ():
            server.put(f"{iss}/.well-known/openid-configuration", keycloak_discovery(iss))
            self.publish(iss)

    def publish(self, iss: str) -> None:
        keys = [keycloak_jwk(k) for k in self.sig[iss]] + [keycloak_jwk(self.enc[iss], "enc")]
        self.server.put(f"{iss}/protocol/openid-connect/certs", {"keys": keys})

    def token(self, iss: str, scope: str = "profile email system/*.*", *, azp: str | None = None,
              aud: str | list[str] | None = None, key: IdpKey | None = None, typ: str = "Bearer",
              drop: tuple[str, ...] = (), **over) -> str:
        acme = iss == REALM_ACME
        azp = azp or ("fhir-backend" if acme else "globex-backend")
        if aud is None:
            aud = ["fhir-router", "account"] if acme else "account"
        key = key or self.sig[iss][0]
        sa = new_id()
        claims = {"exp": now() + 300, "iat": now() - 5, "jti": "trtcc:" + new_id(), "iss": iss, "aud": aud,
                  "sub": sa, "typ": typ, "azp": azp, "acr": "1", "allowed-origins": ["/*"],
                  "realm_access": {"roles": ["offline_access", "default-roles-" + iss.rsplit("/", 1)[1],
                                             "uma_authorization"]},
                  "resource_access": {"account": {"roles": ["manage-account", "view-profile"]}},
                  "scope": scope, "clientHost": "10.0.0.12", "email_verified": False,
                  "preferred_username": f"service-account-{azp}", "clientAddress": "10.0.0.12", "client_id": azp}
        claims.update(over)
        claims = {k: v for k, v in claims.items() if v is not None and k not in drop}
        return key.sign({"alg": "RS256", "typ": "JWT", "kid": key.kid}, claims)

    def id_token(self, iss: str, client: str) -> str:
        """An ID token of the same client: payload typ ID, aud and azp the client."""
        return self.token(iss, azp=client, aud=client, typ="ID", nonce="n-0S6_WzA2Mj", at_hash="fPlsvVszI29LU2UhDyJ9vg",
                          sid=new_id(), drop=("scope", "allowed-origins", "realm_access", "resource_access"))


@pytest.fixture(scope="module")
def keycloak(start_envoy, upstreams, server):
    idp = Keycloak(server)
    site = start_site(start_envoy, upstreams, server, "envoy-idp-keycloak", ["keycloak"], page_config("keycloak"))
    site.idp = idp
    try:
        site.wait_ready(idp.token(REALM_ACME), "Keycloak acme")
        site.wait_ready(idp.token(REALM_GLOBEX), "Keycloak globex")
        yield site
    finally:
        stop_envoy(site.env)


@pytest.mark.parametrize("iss,upstream,tenant", [(REALM_ACME, "tenant-a", "acme"),
                                                 (REALM_GLOBEX, "tenant-b", "globex")], ids=["acme", "globex"])
def test_keycloak_each_realm_is_one_tenant_configured_from_its_discovery_document(keycloak, iss, upstream, tenant):
    keycloak.routed(keycloak.idp.token(iss), upstream, tenant)
    host, realm = "keycloak.example.com", iss.removeprefix(KEYCLOAK)
    assert keycloak.server.seen(host, f"{realm}/.well-known/openid-configuration")
    assert keycloak.server.seen(host, f"{realm}/protocol/openid-connect/certs")


def test_keycloak_scope_string_narrows_what_the_client_may_do(keycloak):
    narrowing(keycloak, keycloak.idp.token(REALM_ACME, "profile email system/Patient.read"),
              keycloak.idp.token(REALM_ACME), "tenant-a", "acme")


def test_keycloak_claims_cannot_name_another_tenant_than_the_realm(keycloak):
    keycloak.routed(keycloak.idp.token(REALM_GLOBEX, "acme tenant/acme system/*.*"), "tenant-b", "globex")


@pytest.mark.parametrize("kind", ["acme-aud-account-only", "acme-no-aud", "globex-another-client",
                                  "acme-id-token", "globex-id-token", "signed-with-the-enc-key",
                                  "acme-token-with-globex-iss"])
def test_keycloak_wrong_audience_client_key_or_realm_or_an_id_token_is_refused(keycloak, kind):
    kc = keycloak.idp
    token = {
        "acme-aud-account-only": lambda: kc.token(REALM_ACME, aud="account"),
        "acme-no-aud": lambda: kc.token(REALM_ACME, drop=("aud",)),  # nothing filled it: Keycloak omits aud
        "globex-another-client": lambda: kc.token(REALM_GLOBEX, azp="globex-reporting"),
        "acme-id-token": lambda: kc.id_token(REALM_ACME, "fhir-backend"),
        # With audience_claim azp, an ID token of the right client passes the audience check: typ Bearer stops it.
        "globex-id-token": lambda: kc.id_token(REALM_GLOBEX, "globex-backend"),
        "signed-with-the-enc-key": lambda: kc.token(REALM_ACME, key=kc.enc[REALM_ACME]),
        "acme-token-with-globex-iss": lambda: kc.token(REALM_GLOBEX, key=kc.sig[REALM_ACME][0]),
    }[kind]()
    keycloak.refused(token, 401)


def test_keycloak_new_realm_key_is_picked_up_through_discovery(keycloak):
    """The realm's discovery document moves its jwks_uri to a new URL holding the new key (the old URL keeps the
    old set): only a filter that reads discovery again at the refresh finds the new key."""
    new = IdpKey("globex", kid="rotated-" + new_id())
    keycloak.idp.sig[REALM_GLOBEX].insert(0, new)
    moved = f"{REALM_GLOBEX}/protocol/openid-connect/certs?rotated=1"
    keycloak.server.put(moved, {"keys": [keycloak_jwk(k) for k in keycloak.idp.sig[REALM_GLOBEX]]
                                + [keycloak_jwk(keycloak.idp.enc[REALM_GLOBEX], "enc")]})
    keycloak.server.put(f"{REALM_GLOBEX}/.well-known/openid-configuration", keycloak_discovery(REALM_GLOBEX, moved))
    token = keycloak.idp.token(REALM_GLOBEX, key=new)
    wait_until(lambda: keycloak.send(token).status == 200, 60, "the new Keycloak key to be picked up",
               on_timeout=lambda: "\n" + keycloak.env.log_tail(40))
    keycloak.routed(token, "tenant-b", "globex")


@pytest.fixture(scope="module")
def keycloak_misled(start_envoy, upstreams, server):
    """Two realms whose discovery documents must not be followed (both point at key sets that would verify):
    `acme-elsewhere` names a jwks_uri on another host; `acme-mislabelled` says it is the realm globex."""
    kc = Keycloak(server, publish=False)  # its keys only: the realms acme and globex stay as published
    key = kc.sig[REALM_ACME][0]
    elsewhere_iss, mislabelled_iss = f"{KEYCLOAK}/realms/acme-elsewhere", f"{KEYCLOAK}/realms/acme-mislabelled"
    elsewhere = f"https://{EVIL_HOST}/realms/acme-elsewhere/protocol/openid-connect/certs"
    server.put(f"{elsewhere_iss}/.well-known/openid-configuration", keycloak_discovery(elsewhere_iss, elsewhere))
    server.put(elsewhere, {"keys": [keycloak_jwk(key)]})
    mislabelled = keycloak_discovery(mislabelled_iss)
    mislabelled["issuer"] = REALM_GLOBEX
    server.put(f"{mislabelled_iss}/.well-known/openid-configuration", mislabelled)
    server.put(mislabelled["jwks_uri"], {"keys": [keycloak_jwk(key)]})
    doc = page_config("keycloak")
    doc["providers"] = [dict(doc["providers"][0], issuer=elsewhere_iss),
                        dict(doc["providers"][0], issuer=mislabelled_iss)]
    doc["tenants"].pop("globex")
    site = start_site(start_envoy, upstreams, server, "envoy-idp-keycloak-misled", ["keycloak"], doc)
    site.idp, site.key, site.issuers = kc, key, (elsewhere_iss, mislabelled_iss)

    def refusals() -> list[str]:
        return [line for line in site.env.log().splitlines() if "failed" in line and "discovery" in line]

    site.refusals = refusals
    fetched = {elsewhere_iss: lambda: server.seen(EVIL_HOST),
               mislabelled_iss: lambda: server.seen("keycloak.example.com", "/realms/acme-mislabelled/protocol/"
                                                    "openid-connect/certs")}

    def settled(iss: str) -> bool:  # refused in the log, or (the defect) its key set fetched
        return any(iss + " " in line for line in refusals()) or bool(fetched[iss]())

    try:
        wait_until(lambda: all(settled(i) for i in site.issuers), 30, "both discovery documents to be judged",
                   on_timeout=lambda: "\n" + site.env.log_tail(40))
        yield site
    finally:
        stop_envoy(site.env)


@pytest.mark.parametrize("which", ["jwks_uri-on-another-host", "issuer-of-another-realm"])
def test_keycloak_discovery_document_that_cannot_be_trusted_installs_no_key_set(keycloak_misled, which):
    site = keycloak_misled
    iss = site.issuers[0 if which == "jwks_uri-on-another-host" else 1]
    token = site.idp.token(iss, key=site.key, azp="fhir-backend", aud=["fhir-router", "account"])
    site.refused(token, 503)  # no key set: the filter's documented answer before a first good fetch
    assert site.server.seen(EVIL_HOST) == [], "the filter fetched a key set from another host"
    assert site.server.seen("keycloak.example.com", "/realms/acme-mislabelled/protocol/openid-connect/certs") == [], \
        "the filter fetched the key set of a document naming another issuer"
    lines = [line for line in site.refusals() if iss + " " in line]
    assert lines, "no log line says why the key set was not fetched"
    assert not any(EVIL_HOST in line for line in lines), "the log quotes the document"


# --------------------------------------------------------------------------------------- Cognito

POOL_ACME = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AcmE7kQ2x"
POOL_GLOBEX = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_GlObx9Zp4"
COGNITO_CLIENT = {POOL_ACME: "3n4b5urk1ft4fl3mg5e62d9ado", POOL_GLOBEX: "6c1q2r3s4t5u6v7w8x9y0z1a2b"}
RS = "https://fhir.example.com/"  # the resource server identifier


class Cognito:
    def __init__(self, server: IdpServer):
        self.keys = {POOL_ACME: IdpKey("cognito-acme", kid="1234exampleAcmeKid5678abcdEFGH="),
                     POOL_GLOBEX: IdpKey("cognito-globex", kid="9876exampleGlobexKid4321zyxwVUT=")}
        for iss, key in self.keys.items():
            server.put(f"{iss}/.well-known/jwks.json", {"keys": [cognito_jwk(key)]})

    def token(self, iss: str, scope: str = f"{RS}system.*.*", *, client: str | None = None,
              key_of: str | None = None, **over) -> str:
        key = self.keys[key_of or iss]
        client = client or COGNITO_CLIENT[iss]
        claims = {"sub": client, "token_use": "access", "scope": scope, "auth_time": now() - 5, "iss": iss,
                  "exp": now() + 3600, "iat": now() - 5, "version": 2, "jti": new_id(), "client_id": client}
        claims.update(over)
        claims = {k: v for k, v in claims.items() if v is not None}
        return key.sign({"kid": key.kid, "alg": "RS256"}, claims)

    def id_token(self, iss: str) -> str:
        key = self.keys[iss]
        claims = {"sub": new_id(), "aud": COGNITO_CLIENT[iss], "email_verified": True, "token_use": "id",
                  "auth_time": now() - 5, "iss": iss, "cognito:username": "pat", "exp": now() + 3600,
                  "iat": now() - 5, "jti": new_id(), "origin_jti": new_id(), "email": "pat@acme.example"}
        return key.sign({"kid": key.kid, "alg": "RS256"}, claims)


@pytest.fixture(scope="module")
def cognito(start_envoy, upstreams, server):
    idp = Cognito(server)
    site = start_site(start_envoy, upstreams, server, "envoy-idp-cognito", ["cognito"], page_config("cognito"))
    site.idp = idp
    try:
        site.wait_ready(idp.token(POOL_ACME), "Cognito acme")
        site.wait_ready(idp.token(POOL_GLOBEX), "Cognito globex")
        yield site
    finally:
        stop_envoy(site.env)


@pytest.mark.parametrize("iss,upstream,tenant", [(POOL_ACME, "tenant-a", "acme"), (POOL_GLOBEX, "tenant-b", "globex")],
                         ids=["acme-pool", "globex-pool"])
def test_cognito_each_user_pool_is_one_tenant_checked_by_client_id(cognito, iss, upstream, tenant):
    cognito.routed(cognito.idp.token(iss), upstream, tenant)


def test_cognito_resource_server_scopes_are_read_as_smart_scopes(cognito):
    narrowing(cognito, cognito.idp.token(POOL_ACME, f"{RS}system.Patient.read"), cognito.idp.token(POOL_ACME),
              "tenant-a", "acme")
    # SMART v2 letters through the map too (the recording upstream answers a Patient: hence Patient.rs as well).
    v2 = cognito.idp.token(POOL_GLOBEX, f"{RS}system.Observation.rs {RS}system.Patient.rs")
    cognito.routed(v2, "tenant-b", "globex", path="/Observation")
    cognito.refused(v2, 403, "POST", path="/Observation")
    cognito.refused(v2, 403, path="/Encounter")


@pytest.mark.parametrize("scope", [f"https://other.example.com/system.*.*", "system.*.*", f"{RS}tenant.read"],
                         ids=["another-resource-server", "bare-name", "not-a-smart-scope"])
def test_cognito_scope_of_no_mapped_resource_server_grants_nothing(cognito, scope):
    cognito.refused(cognito.idp.token(POOL_ACME, scope), 403)


@pytest.mark.parametrize("kind", ["id-token", "another-app-client", "signed-by-the-other-pool", "token-use-id"])
def test_cognito_id_token_or_wrong_client_or_pool_is_refused(cognito, kind):
    cg = cognito.idp
    token = {
        "id-token": lambda: cg.id_token(POOL_ACME),
        "another-app-client": lambda: cg.token(POOL_ACME, client="7abcdefghijklmnopqrstuvwxy"),
        "signed-by-the-other-pool": lambda: cg.token(POOL_GLOBEX, key_of=POOL_ACME),
        "token-use-id": lambda: cg.token(POOL_ACME, token_use="id"),
    }[kind]()
    cognito.refused(token, 401)


# ------------------------------------------------------------------------------------ the audit line

AUDIT_START = '{"audit":"fhir-tenant-router"'


def claims_of(token: str) -> dict:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def audit_record(site: Site, claims: dict) -> dict:
    """The audit line of the request made with the token of these claims (by jti, else by sub)."""
    key, value = ("jti", claims["jti"]) if "jti" in claims else ("sub", claims["sub"])
    decoder = json.JSONDecoder()

    def found():
        out = []
        for line in site.env.log().splitlines():
            i = line.find(AUDIT_START)
            if i >= 0:
                rec = decoder.raw_decode(line[i:])[0]
                if rec.get(key) == value:
                    out.append(rec)
        return out

    (rec,) = wait_until(found, 10, f"the audit line with {key} {value}",
                        on_timeout=lambda: "\n" + site.env.log_tail(20))
    return rec


@pytest.mark.parametrize("idp,mint,client", [
    ("entra", lambda s: s.idp.v2(TID_A), CLIENT_APP_ID),          # azp
    ("entra", lambda s: s.idp.v1(TID_B), CLIENT_APP_ID),          # appid
    ("okta", lambda s: s.idp.token(OKTA_ACME), OKTA_CLIENT),      # cid
    ("auth0", lambda s: s.idp.token(ORG_A), AUTH0_CLIENT),        # client_id (RFC 9068 profile)
    ("keycloak", lambda s: s.idp.token(REALM_GLOBEX, drop=("client_id",)), "globex-backend"),  # azp
    ("cognito", lambda s: s.idp.token(POOL_GLOBEX), COGNITO_CLIENT[POOL_GLOBEX]),  # client_id
], ids=["entra-v2-azp", "entra-v1-appid", "okta-cid", "auth0-client_id", "keycloak-azp", "cognito-client_id"])
def test_the_audited_client_is_the_one_the_idp_names(request, idp, mint, client):
    """`claims.client` (or its default) finds each IdP's client claim: the audit line names that client."""
    site = request.getfixturevalue(idp)
    token = mint(site)
    assert site.send(token).status == 200
    rec = audit_record(site, claims_of(token))
    assert rec["client_id"] == client, rec
    assert rec["outcome"] == "allowed", rec


# ------------------------------------------------------------------------------------------ all

def test_no_request_of_this_module_crashed_the_filter(entra, okta, auth0, keycloak, cognito):
    for site in (entra, okta, auth0, keycloak, cognito):
        assert_wasm_vm_never_crashed(site.env)


OWN_DOCS = {"entra": "https://learn.microsoft.com/", "okta": "https://developer.okta.com/docs/",
            "auth0": "https://auth0.com/docs/", "keycloak": "https://www.keycloak.org/docs/",
            "cognito": "https://docs.aws.amazon.com/cognito"}


@pytest.mark.parametrize("idp", sorted(OWN_DOCS))
def test_each_page_cites_the_idps_own_documentation_and_says_which_test_runs_its_block(idp):
    text = page_path(idp).read_text(encoding="utf-8")
    assert OWN_DOCS[idp] in text, f"docs/idp/{idp}.md cites none of the IdP's own pages"
    assert "tests/e2e/test_idps.py" in text
    assert page_config(idp)["metadata_cluster"] == "fhir_metadata"
