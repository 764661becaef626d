"""Hostile tokens: a corpus of forged, mangled and mis-delivered credentials sent to real Envoy running the
shipped envoy/envoy.yaml with our filter, the real test IdP's JWKS, and recording upstreams.

Every case must be refused with the status it names and must reach NO upstream. Case ids start with their
provenance: `tool-myjwt-` (forged by the published attack tool myjwt 2.1.0, see attack/myjwt_forge.py),
`hand-` (forged here, attack/forge.py), `idp-` (a real IdP token, then mangled by hand). Requests go over a
raw socket (attack/rawhttp.py) so that header bytes are sent exactly as written.

Positive controls at the bottom prove that the harness is not passing by refusing everything."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from attack import myjwt_forge
from attack.attacker_site import AttackerSite
from attack.forge import (
    KeyMaterial, b64u, claims_of, ec_jwk, header_of, public_jwk, rsa_jwk, segment, sign, unsigned,
)
from attack.rawhttp import RawResponse, build_request, send_raw
from checks import (
    assert_forbidden, assert_operation_outcome, assert_served_only_by, assert_wasm_vm_never_crashed,
)
from harness import CLIENT_A, CLIENT_B, TENANT_A, TENANT_B
from tokens import ES_KID, RS_KID, Minter


# ------------------------------------------------------------------------------------------ plumbing

@dataclass
class Attack:
    """What one case sends: extra header lines (raw bytes allowed), on `method path`, after `prime`
    (valid tokens sent first, each asserted 200, so the filter's verified-token cache holds them)."""
    headers: list[tuple[str, bytes]]
    path: str = "/Patient"
    method: str = "GET"
    body: bytes | None = None
    prime: list[str] = field(default_factory=list)


def auth(value: str | bytes) -> Attack:
    """One `Authorization: Bearer <value>` header."""
    v = value if isinstance(value, bytes) else value.encode("latin-1")
    return Attack([("authorization", b"Bearer " + v)])


def raw_auth(*values: bytes) -> Attack:
    """`Authorization` header line(s) with exactly these values (scheme included)."""
    return Attack([("authorization", v) for v in values])


class Forge:
    """Everything a case needs to build its attack; `m` is a fresh Minter per test (fresh `now`)."""

    def __init__(self, stack, site: AttackerSite, site_dir: Path):
        self.stack = stack
        self.site = site
        self.site_dir = site_dir
        self.keys = KeyMaterial()
        self.m = Minter(stack.minter.issuer)
        self.idp_jwks = {"keys": [public_jwk(RS_KID), public_jwk(ES_KID)]}
        self.pem_file = site_dir / "idp-rsa-public.pem"
        self.pem_file.write_bytes(self.keys.rsa_public("pem-spki"))
        self.ec_pem_file = site_dir / "idp-ec-public.pem"
        self.ec_pem_file.write_bytes(self.keys.ec_public_pem())

    def fresh(self) -> "Forge":
        self.m = Minter(self.stack.minter.issuer)
        return self

    def claims(self, scope: str = TENANT_A, **overrides) -> dict:
        return self.m.claims(scope, **overrides)

    def valid(self, scope: str = TENANT_A, **claims) -> str:
        """A token that would be accepted (RS256, the IdP's real key) — the starting point of mutations."""
        return self.m.token(scope, **claims)

    def idp_token(self, client=CLIENT_A, scope: str = TENANT_A) -> str:
        return self.stack.idp.access_token(client, scope)

    def rs(self, header_extra: dict | None = None, alg: str = "RS256", key=None, kid: str | None = RS_KID,
           drop: tuple[str, ...] = (), scope: str = TENANT_A, claims: dict | None = None) -> str:
        """Hand-signed with the IdP's real RSA key (or `key`); header is {alg, typ, kid} + extra − drop."""
        h = {"alg": alg, "typ": "at+jwt"}
        if kid is not None:
            h["kid"] = kid
        h.update(header_extra or {})
        for d in drop:
            h.pop(d, None)
        return sign(h, claims if claims is not None else self.claims(scope), alg,
                    key if key is not None else self.keys.idp_rsa)

    def hs(self, secret: bytes, alg: str = "HS256", kid: str = RS_KID) -> str:
        return sign({"alg": alg, "typ": "at+jwt", "kid": kid}, self.claims(), alg, secret)

    def put_on_site(self, name: str, data: bytes) -> str:
        (self.site_dir / name).write_bytes(data)
        return self.site.url + name


@pytest.fixture(scope="module")
def attacker_site(tmp_path_factory):
    d = tmp_path_factory.mktemp("attacker-site")
    site = AttackerSite(d).start()
    yield site
    site.stop()


ATTACKER_CLUSTER = "attacker_site"
# A tenant served by the attacker's site: the control that shows the site is reachable from Envoy's clusters
# and records what reaches it (issue 24: it was reachable from none, so its "no hits" proved nothing).
TENANT_ON_SITE = "a77ac4e2-0000-4000-8000-00000000a77a"


@pytest.fixture(scope="module")
def stack(request, start_envoy, idp, upstreams, attacker_site):
    """The shipped envoy/envoy.yaml plus a cluster to the attacker's site (and a tenant routed there)."""
    from conftest import Stack, stop_envoy, wait_for_jwks
    from harness import SHIPPED_CONFIG, load_yaml
    from test_tenant_registry import static_cluster

    cfg = load_yaml(SHIPPED_CONFIG)
    port = int(attacker_site.url.rstrip("/").rsplit(":", 1)[1])
    cfg["static_resources"]["clusters"].append(static_cluster(ATTACKER_CLUSTER, port))

    def plugin(doc):
        doc["tenants"][TENANT_ON_SITE] = {"cluster": ATTACKER_CLUSTER}
        doc.get("discovery", {}).pop("scopes_supported", None)

    env = start_envoy("envoy-test_attack_tokens", {"idp": idp.port, **upstreams.cluster_ports()}, base=cfg,
                      plugin=plugin)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    yield Stack(env, upstreams, minter, idp)
    stop_envoy(env)


def test_the_attacker_site_is_reachable_from_envoys_clusters_and_records_what_reaches_it(stack, attacker_site):
    """The control for every "the attacker's site got no hit" below: Envoy has a cluster to it, and a request
    Envoy does send there is recorded."""
    attacker_site.clear()
    token = stack.minter.token(TENANT_ON_SITE)
    resp = stack.envoy.request("GET", "/Patient", {"authorization": f"Bearer {token}"})
    assert resp.status == 404, resp  # the site's own answer: no such file
    assert attacker_site.hits == ["/Patient"], attacker_site.hits


@pytest.fixture(scope="module")
def forge_base(stack, attacker_site) -> Forge:
    return Forge(stack, attacker_site, attacker_site.directory)


@pytest.fixture
def forge(forge_base) -> Forge:
    return forge_base.fresh()


def send(stack, attack: Attack) -> RawResponse:
    headers = [("accept", "application/fhir+json"), *attack.headers]
    return send_raw(stack.envoy.port, build_request(attack.method, attack.path, headers, attack.body))


# -------------------------------------------------------------------------------------------- corpus

def _none(variant: str, keep_signature: bool):
    def build(f: Forge) -> Attack:
        tok = f.valid()
        sig = tok.split(".")[2] if keep_signature else ""
        return auth(unsigned({"alg": variant, "typ": "at+jwt", "kid": RS_KID}, claims_of(tok), sig))
    return build


def _myjwt_none(f: Forge) -> Attack:
    return auth(myjwt_forge.alg_none(f.idp_token()))


def _myjwt_confusion(f: Forge) -> Attack:
    return auth(myjwt_forge.hmac_key_confusion(f.idp_token(), f.pem_file))


def _myjwt_confusion_ec(f: Forge) -> Attack:
    return auth(myjwt_forge.hmac_key_confusion(f.m.token(TENANT_A, alg="ES256"), f.ec_pem_file))


def _myjwt_kid(injection: str):
    return lambda f: auth(myjwt_forge.kid_injection(f.idp_token(), injection))


def _myjwt_jku(f: Forge) -> Attack:
    return auth(myjwt_forge.jku_attack(f.idp_token(), f.site.url, f.site_dir, f.idp_jwks))


def _myjwt_x5u(f: Forge) -> Attack:
    return auth(myjwt_forge.x5u_attack(f.idp_token(), f.site.url, f.site_dir, f.idp_jwks))


def _confusion(form: str, alg: str = "HS256"):
    return lambda f: auth(f.hs(f.keys.rsa_public(form), alg))


def _jwk_header(with_kid: bool):
    def build(f: Forge) -> Attack:
        return auth(f.rs({"jwk": rsa_jwk(f.keys.attacker_rsa.public_key())}, key=f.keys.attacker_rsa,
                         kid=RS_KID if with_kid else None))
    return build


def _jwk_header_ec(f: Forge) -> Attack:
    h = {"alg": "ES256", "typ": "at+jwt", "kid": ES_KID, "jwk": ec_jwk(f.keys.attacker_ec.public_key())}
    return auth(sign(h, f.claims(), "ES256", f.keys.attacker_ec))


def _jku_hand(f: Forge) -> Attack:
    url = f.put_on_site("hand-jwks.json", json.dumps(
        {"keys": [rsa_jwk(f.keys.attacker_rsa.public_key(), kid="attacker-1")]}).encode())
    return auth(f.rs({"jku": url}, key=f.keys.attacker_rsa, kid="attacker-1"))


def _x5u_hand(f: Forge) -> Attack:
    url = f.put_on_site("attacker.crt", f.keys.attacker_cert_pem())
    return auth(f.rs({"x5u": url}, key=f.keys.attacker_rsa))


def _x5c(with_kid: bool):
    def build(f: Forge) -> Attack:
        return auth(f.rs({"x5c": [f.keys.attacker_cert_der_b64()]}, key=f.keys.attacker_rsa,
                         kid=RS_KID if with_kid else None))
    return build


def _claims(**overrides):
    return lambda f: auth(f.rs(claims=f.claims(**overrides)))


def _relative_claims(**offsets):
    """Claims whose time members are `now + offset` (iat/exp/nbf)."""
    return lambda f: auth(f.rs(claims=f.claims(**{k: f.m.now + v for k, v in offsets.items()})))


def _scope(scope):
    return lambda f: auth(f.rs(claims=f.claims(scope=scope) if isinstance(scope, str)
                               else {**f.claims(), "scope": scope}))


def _std_alphabet(part: int):
    """A valid token whose segment `part` is re-spelled with the standard base64 alphabet ('+' '/')."""
    def build(f: Forge) -> Attack:
        for _ in range(50):  # bounded: nearly every RS256 signature has a '-' or '_'
            tok = f.valid(pad="??>>" * 8)  # '?' '>' runs encode to '/' '+' style bytes in the payload
            segs = tok.split(".")
            if "-" in segs[part] or "_" in segs[part]:
                segs[part] = segs[part].replace("-", "+").replace("_", "/")
                return auth(".".join(segs))
        raise AssertionError("could not mint a token with '-' or '_' in the segment")
    return build


def _splice(f: Forge) -> Attack:
    a, b = f.idp_token(CLIENT_A, TENANT_A), f.idp_token(CLIENT_B, TENANT_B)
    return auth(".".join(b.split(".")[:2] + a.split(".")[2:]))


def _splice_after_caching(f: Forge) -> Attack:
    """Tenant B's header+payload with tenant A's (valid, cached) signature, after A was accepted."""
    a, b = f.idp_token(CLIENT_A, TENANT_A), f.valid(TENANT_B)
    return Attack(auth(".".join(b.split(".")[:2] + a.split(".")[2:])).headers, prime=[a, b])


def _flip_signature_after_caching(f: Forge) -> Attack:
    tok = f.valid()
    h, p, s = tok.split(".")
    i = len(s) // 2
    s2 = s[:i] + ("A" if s[i] != "A" else "B") + s[i + 1:]
    return Attack(auth(f"{h}.{p}.{s2}").headers, prime=[tok])


def _payload_swapped_after_caching(f: Forge) -> Attack:
    """A's cached token with its payload re-encoded to name tenant B (signature kept)."""
    tok = f.valid()
    h, _, s = tok.split(".")
    return Attack(auth(f"{h}.{segment(f.claims(TENANT_B))}.{s}").headers, prime=[tok])


def _jwe(f: Forge) -> Attack:
    hdr = segment({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": RS_KID})
    return auth(".".join([hdr, b64u(b"k" * 256), b64u(b"iv" * 6), b64u(json.dumps(f.claims()).encode()),
                          b64u(b"t" * 16)]))


def _big(size: int):
    """A correctly signed token of about `size` bytes (a padding claim), otherwise valid."""
    return lambda f: auth(f.rs(claims=f.claims(pad="x" * int(size * 0.75))))


def _mutate(fn):
    """A hand mutation of a valid token's text."""
    return lambda f: auth(fn(f.valid()))


def _dup(order: str):
    def build(f: Forge) -> Attack:
        good = f.valid()
        bad = {"valid-then-invalid": [good, "not.a.jwt"], "invalid-then-valid": ["not.a.jwt", good],
               "tenant-a-then-tenant-b": [good, f.valid(TENANT_B)],
               "tenant-b-then-tenant-a": [f.valid(TENANT_B), good],
               "same-valid-twice": [good, good]}[order]
        return raw_auth(*[b"Bearer " + t.encode() for t in bad])
    return build


CYRILLIC_A = TENANT_A.replace("c", "\u0441").replace("e", "\u0435").replace("a", "\u0430")
FULLWIDTH_A = TENANT_A.replace("6", "\uff16", 1)


# (id, build, expected status, note). 400/431 only where ENVOY refuses the request before the filter.
CASES = [
    # --- alg none, all spellings, with and without a signature
    ("tool-myjwt-alg-none-from-an-idp-token", _myjwt_none, 401, ""),
    ("hand-alg-none-empty-signature", _none("none", False), 401, ""),
    ("hand-alg-None-empty-signature", _none("None", False), 401, ""),
    ("hand-alg-NONE-empty-signature", _none("NONE", False), 401, ""),
    ("hand-alg-nOnE-empty-signature", _none("nOnE", False), 401, ""),
    ("hand-alg-none-with-the-original-signature", _none("none", True), 401, ""),
    ("hand-alg-None-with-the-original-signature", _none("None", True), 401, ""),
    ("hand-alg-NONE-with-the-original-signature", _none("NONE", True), 401, ""),
    ("hand-alg-empty-string", _none("", True), 401, ""),
    ("hand-alg-member-missing", lambda f: auth(f.rs(drop=("alg",))), 401, ""),
    ("hand-alg-none-two-segments-no-trailing-dot",
     lambda f: auth(".".join(_none("none", False)(f).headers[0][1][7:].decode().split(".")[:2])), 401, ""),
    # --- HMAC with the IdP's public RSA key as the secret (key confusion)
    ("tool-myjwt-hs256-keyed-with-the-rsa-public-pem", _myjwt_confusion, 401, ""),
    ("tool-myjwt-hs256-keyed-with-the-ec-public-pem", _myjwt_confusion_ec, 401, ""),
    ("hand-hs256-keyed-with-the-rsa-public-pem-spki", _confusion("pem-spki"), 401, ""),
    ("hand-hs256-keyed-with-the-rsa-public-pem-without-final-newline", _confusion("pem-spki-no-newline"), 401, ""),
    ("hand-hs256-keyed-with-the-rsa-public-pem-pkcs1", _confusion("pem-pkcs1"), 401, ""),
    ("hand-hs256-keyed-with-the-rsa-public-der-spki", _confusion("der-spki"), 401, ""),
    ("hand-hs256-keyed-with-the-rsa-public-der-pkcs1", _confusion("der-pkcs1"), 401, ""),
    ("hand-hs256-keyed-with-the-rsa-public-jwk-json", _confusion("jwk-json"), 401, ""),
    ("hand-hs256-keyed-with-the-rsa-modulus-bytes", _confusion("jwk-n"), 401, ""),
    ("hand-hs384-keyed-with-the-rsa-public-pem", _confusion("pem-spki", "HS384"), 401, ""),
    ("hand-hs512-keyed-with-the-rsa-public-pem", _confusion("pem-spki", "HS512"), 401, ""),
    # --- algorithm / key-type confusion between the IdP's own keys (signed with the IdP's real keys)
    ("hand-rs256-signed-by-the-rsa-key-under-the-ec-kid", lambda f: auth(f.rs(kid=ES_KID)), 401, ""),
    ("hand-es256-signed-by-the-ec-key-under-the-rsa-kid",
     lambda f: auth(sign({"alg": "ES256", "typ": "at+jwt", "kid": RS_KID}, f.claims(), "ES256", f.keys.idp_ec)),
     401, ""),
    ("hand-rs384-under-the-rs256-only-kid", lambda f: auth(f.rs(alg="RS384")), 401, ""),
    ("hand-ps256-under-the-rs256-only-kid", lambda f: auth(f.rs(alg="PS256")), 401, ""),
    # --- kid
    ("hand-unknown-kid-signed-by-the-real-key", lambda f: auth(f.rs(kid="no-such-kid")), 401, ""),
    ("hand-kid-path-traversal", lambda f: auth(f.rs(kid="../../etc/passwd")), 401, ""),
    ("hand-kid-dev-null", lambda f: auth(f.rs(kid="../../../../../../dev/null")), 401, ""),
    ("hand-kid-sql-injection", lambda f: auth(f.rs(kid="' OR 1=1 --")), 401, ""),
    ("hand-kid-with-a-trailing-null-byte", lambda f: auth(f.rs(kid=RS_KID + "\u0000")), 401, ""),
    ("hand-kid-null-byte-then-the-real-kid", lambda f: auth(f.rs(kid="\u0000" + RS_KID)), 401, ""),
    ("hand-kid-empty-string", lambda f: auth(f.rs(kid="")), 401, ""),
    ("hand-kid-as-an-array", lambda f: auth(f.rs({"kid": [RS_KID]})), 401, ""),
    ("hand-kid-missing-signed-by-an-attacker-key", lambda f: auth(f.rs(kid=None, key=f.keys.attacker_rsa)), 401, ""),
    ("tool-myjwt-kid-sql-injection-hs256-empty-secret", _myjwt_kid("' OR 1=1 --"), 401, ""),
    ("tool-myjwt-kid-path-traversal-hs256-empty-secret", _myjwt_kid("../../../../../../dev/null"), 401, ""),
    # --- keys embedded in or referenced by the header, signed by the attacker's key
    ("hand-jwk-header-attacker-rsa-key-with-the-real-kid", _jwk_header(True), 401, ""),
    ("hand-jwk-header-attacker-rsa-key-without-kid", _jwk_header(False), 401, ""),
    ("hand-jwk-header-attacker-ec-key-with-the-real-ec-kid", _jwk_header_ec, 401, ""),
    ("tool-myjwt-jku-attacker-jwks-with-the-real-kid", _myjwt_jku, 401, ""),
    ("hand-jku-attacker-jwks-with-the-attacker-kid", _jku_hand, 401, ""),
    ("tool-myjwt-x5u-attacker-certificate", _myjwt_x5u, 401, ""),
    ("hand-x5u-attacker-certificate-with-the-real-kid", _x5u_hand, 401, ""),
    ("hand-x5c-attacker-certificate-with-the-real-kid", _x5c(True), 401, ""),
    ("hand-x5c-attacker-certificate-without-kid", _x5c(False), 401, ""),
    # --- crit (signed by the real key: only crit is wrong)
    ("hand-crit-unknown-extension", lambda f: auth(f.rs({"crit": ["urn:x:ext"], "urn:x:ext": True})), 401, ""),
    ("hand-crit-b64-false", lambda f: auth(f.rs({"crit": ["b64"], "b64": False})), 401, ""),
    ("hand-crit-empty-list", lambda f: auth(f.rs({"crit": []})), 401, ""),
    # --- time claims (signed by the real key)
    ("hand-exp-missing", _claims(exp=None), 401, ""),
    ("hand-exp-a-numeric-string", lambda f: auth(f.rs(claims=f.claims(exp=str(f.m.now + 300)))), 401, ""),
    ("hand-exp-true", _claims(exp=True), 401, ""),
    ("hand-exp-an-object", _claims(exp={"$numberLong": "9999999999"}), 401, ""),
    ("hand-exp-two-minutes-past-beyond-the-skew", _relative_claims(iat=-900, exp=-120), 401, ""),
    ("hand-exp-zero", _claims(exp=0), 401, ""),
    ("hand-exp-negative", _claims(exp=-1), 401, ""),
    ("hand-nbf-two-minutes-ahead-beyond-the-skew", _relative_claims(nbf=120), 401, ""),
    ("hand-iat-two-minutes-ahead-beyond-the-skew", _relative_claims(iat=120, exp=600), 401, ""),
    # --- iss / aud
    ("hand-iss-another-issuer", lambda f: auth(f.rs(claims=f.claims(iss="http://127.0.0.1:1/"))), 401, ""),
    ("hand-iss-with-a-trailing-slash", lambda f: auth(f.rs(claims=f.claims(iss=f.m.issuer + "/"))), 401, ""),
    ("hand-iss-missing", _claims(iss=None), 401, ""),
    ("hand-aud-array-without-ours", _claims(aud=["https://a.example", "https://b.example"]), 401, ""),
    ("hand-aud-missing", _claims(aud=None), 401, ""),
    ("hand-aud-empty-array", _claims(aud=[]), 401, ""),
    ("hand-aud-ours-upper-cased", lambda f: auth(f.rs(claims=f.claims(aud=f.m.audience.upper()))), 401, ""),
    # --- shape
    ("hand-empty-token", lambda f: raw_auth(b"Bearer "), 401, ""),
    ("hand-scheme-only", lambda f: raw_auth(b"Bearer"), 401, ""),
    ("hand-one-segment", _mutate(lambda t: t.split(".")[0]), 401, ""),
    ("hand-two-segments", _mutate(lambda t: ".".join(t.split(".")[:2])), 401, ""),
    ("hand-four-segments", _mutate(lambda t: t + "." + t.split(".")[2]), 401, ""),
    ("hand-five-segments-jwe-shaped", _jwe, 401, ""),
    ("hand-three-empty-segments", lambda f: auth(".."), 401, ""),
    ("hand-base64-padding-inside-the-header-segment",
     _mutate(lambda t: t.split(".")[0] + "==." + ".".join(t.split(".")[1:])), 401, ""),
    ("hand-base64-padding-after-the-signature", _mutate(lambda t: t + "=="), 401, ""),
    ("hand-standard-base64-alphabet-in-the-signature", _std_alphabet(2), 401, ""),
    ("hand-standard-base64-alphabet-in-the-payload", _std_alphabet(1), 401, ""),
    ("hand-illegal-character-in-the-payload", _mutate(lambda t: t[:40] + "!" + t[41:]), 401, ""),
    ("hand-percent-encoded-dots", _mutate(lambda t: t.replace(".", "%2E")), 401, ""),
    ("hand-trailing-garbage-on-the-signature", _mutate(lambda t: t + "AAAA"), 401, ""),
    ("hand-trailing-word-after-a-space", _mutate(lambda t: t + " garbage"), 401, ""),
    ("idp-signature-of-tenant-a-spliced-onto-tenant-b", _splice, 401, ""),
    ("hand-signature-of-a-cached-token-spliced-onto-tenant-b", _splice_after_caching, 401, ""),
    ("hand-cached-token-with-one-signature-character-changed", _flip_signature_after_caching, 401, ""),
    ("hand-cached-token-with-its-payload-swapped-for-tenant-b", _payload_swapped_after_caching, 401, ""),
    ("hand-16-kib-token-correctly-signed", _big(16 * 1024), 401, "filter: max_token_bytes 8192"),
    ("hand-70-kib-token-correctly-signed", _big(70 * 1024), 431,
     "ENVOY refuses: request headers over max_request_headers_kb (60 KiB), before the filter"),
    # --- bytes that are not UTF-8 / not header-safe
    ("hand-non-utf8-bytes-as-the-token", lambda f: raw_auth(b"Bearer \xff\xfe\xfd\xfc"), 401, ""),
    ("hand-non-utf8-byte-inside-a-valid-token",
     lambda f: (lambda t: raw_auth(b"Bearer " + t[:30].encode() + b"\xe9" + t[31:].encode()))(f.valid()), 401, ""),
    ("hand-invalid-utf8-sequence-after-a-valid-token",
     lambda f: raw_auth(b"Bearer " + f.valid().encode() + b"\xc3\x28"), 401, ""),
    ("hand-non-utf8-scheme", lambda f: raw_auth(b"B\xe9arer " + f.valid().encode()), 401, ""),
    ("hand-non-utf8-user-agent-and-no-token", lambda f: Attack([("user-agent", b"caf\xe9 \xff")]), 401,
     "any header is read by the filter: a non-UTF-8 value must not crash it"),
    ("hand-nul-byte-after-a-valid-token", lambda f: raw_auth(b"Bearer " + f.valid().encode() + b"\x00"), 400,
     "ENVOY refuses: NUL in a header value is invalid HTTP/1.1, rejected by the codec"),
    # --- delivery
    ("hand-two-authorization-headers-valid-then-invalid", _dup("valid-then-invalid"), (400, 401), ""),
    ("hand-two-authorization-headers-invalid-then-valid", _dup("invalid-then-valid"), (400, 401), ""),
    ("hand-two-authorization-headers-tenant-a-then-tenant-b", _dup("tenant-a-then-tenant-b"), (400, 401), ""),
    ("hand-two-authorization-headers-tenant-b-then-tenant-a", _dup("tenant-b-then-tenant-a"), (400, 401), ""),
    ("hand-two-authorization-headers-same-valid-token", _dup("same-valid-twice"), (400, 401), ""),
    ("hand-two-bearer-credentials-in-one-header",
     lambda f: raw_auth(b"Bearer " + f.valid().encode() + b", Bearer not.a.jwt"), 401, ""),
    ("hand-tab-between-scheme-and-token", lambda f: raw_auth(b"Bearer\t" + f.valid().encode()), 401, ""),
    ("hand-scheme-repeated", lambda f: raw_auth(b"Bearer Bearer " + f.valid().encode()), 401, ""),
    ("hand-scheme-without-separator", lambda f: raw_auth(b"Bearer" + f.valid().encode()), 401, ""),
    ("hand-token-scheme-instead-of-bearer", lambda f: raw_auth(b"Token " + f.valid().encode()), 401, ""),
    ("hand-basic-scheme-carrying-the-token", lambda f: raw_auth(b"Basic " + f.valid().encode()), 401, ""),
    ("hand-space-before-the-header-colon",
     lambda f: Attack([("authorization ", b"Bearer " + f.valid().encode())]), 400,
     "ENVOY refuses: whitespace between field name and colon (RFC 9112 5.1)"),
    ("hand-token-only-in-the-access-token-query-parameter",
     lambda f: Attack([], path="/Patient?access_token=" + f.valid()), 401, ""),
    ("hand-token-only-in-a-form-body",
     lambda f: Attack([("content-type", b"application/x-www-form-urlencoded")], method="POST",
                      body=b"access_token=" + f.valid().encode()), 401, ""),
    ("hand-token-only-in-a-cookie", lambda f: Attack([("cookie", b"access_token=" + f.valid().encode())]), 401, ""),
    ("hand-token-only-in-x-access-token", lambda f: Attack([("x-access-token", f.valid().encode())]), 401, ""),
    # --- scope: correctly signed, but not exactly one configured tenant
    ("hand-scope-two-tenants", _scope(f"{TENANT_A} {TENANT_B}"), 403, ""),
    ("hand-scope-array-of-two-tenants", _scope([TENANT_A, TENANT_B]), 403, ""),
    ("hand-scope-tenant-a-dot-dot-tenant-b", _scope(f"{TENANT_A}/../{TENANT_B}"), 403, ""),
    ("hand-scope-dot-dot-slash-tenant-a", _scope(f"../{TENANT_A}"), 403, ""),
    ("hand-scope-tenant-prefix-dot-dot-tenant-a", _scope(f"tenant/../{TENANT_A}"), 403, ""),
    ("hand-scope-tenant-a-slash-dot-dot", _scope(f"{TENANT_A}/.."), 403, ""),
    ("hand-scope-cyrillic-look-alike-of-tenant-a", _scope(CYRILLIC_A), 403, ""),
    ("hand-scope-fullwidth-digit-look-alike-of-tenant-a", _scope(FULLWIDTH_A), 403, ""),
    ("hand-scope-tenant-a-with-a-zero-width-space", _scope(TENANT_A + "\u200b"), 403, ""),
    ("hand-scope-tenant-a-with-a-nul", _scope(TENANT_A + "\u0000"), 403, ""),
    ("hand-scope-tenants-comma-separated", _scope(f"{TENANT_A},{TENANT_B}"), 403, ""),
]


@pytest.mark.parametrize("build,expected,note", [pytest.param(b, e, n, id=i) for i, b, e, n in CASES])
def test_a_hostile_credential_is_refused_and_reaches_no_upstream(stack, forge, attacker_site, build, expected,
                                                                  note):
    attack = build(forge)
    for token in attack.prime:  # put these in the filter's verified-token cache first
        primed = send(stack, auth(token))
        assert primed.status == 200, ("priming with a valid token failed", primed)
    stack.upstreams.clear()
    attacker_site.clear()

    resp = send(stack, attack)

    allowed = expected if isinstance(expected, tuple) else (expected,)
    assert resp.status in allowed, (note, resp)
    if resp.status in (401, 403):  # the filter's refusal, not some other component's
        assert_operation_outcome(resp, resp.status)
        assert (resp.header("www-authenticate") or "").startswith("Bearer"), resp
    if resp.status == 403:
        assert_forbidden(resp)
    assert stack.upstreams.hits() == {}, f"request reached upstream(s): {stack.upstreams.hits()}"
    assert attacker_site.hits == [], f"something fetched the attacker's keys: {attacker_site.hits}"


def test_the_token_corpus_has_at_least_sixty_cases():
    assert len(CASES) >= 60, len(CASES)
    assert len({c[0] for c in CASES}) == len(CASES), "duplicate case ids"


# ------------------------------------------------------------------------------- positive controls

def test_control_an_idp_token_for_tenant_a_over_the_raw_client_reaches_only_tenant_a(stack, forge):
    resp = send(stack, auth(forge.idp_token(CLIENT_A, TENANT_A)))
    assert_served_only_by(stack.upstreams, resp, "tenant-a", TENANT_A)


def test_control_an_idp_token_for_tenant_b_reaches_only_tenant_b(stack, forge):
    resp = send(stack, auth(forge.idp_token(CLIENT_B, TENANT_B)))
    assert_served_only_by(stack.upstreams, resp, "tenant-b", TENANT_B)


def test_control_a_hand_signed_token_like_the_corpus_ones_is_accepted(stack, forge):
    """The corpus' own signer makes acceptable tokens: its refusals are about the one thing each case breaks."""
    resp = send(stack, auth(forge.rs()))
    assert_served_only_by(stack.upstreams, resp, "tenant-a", TENANT_A)


def test_control_a_hand_signed_es256_token_under_the_ec_kid_is_accepted(stack, forge):
    tok = sign({"alg": "ES256", "typ": "at+jwt", "kid": ES_KID}, forge.claims(TENANT_B), "ES256", forge.keys.idp_ec)
    assert_served_only_by(stack.upstreams, send(stack, auth(tok)), "tenant-b", TENANT_B)


@pytest.mark.parametrize("scheme", [b"bearer ", b"BEARER ", b"bEaReR ", b"Bearer    "],
                         ids=["lower-case", "upper-case", "mixed-case", "four-spaces-after-the-scheme"])
def test_control_the_bearer_scheme_is_case_insensitive_and_allows_several_spaces(stack, forge, scheme):
    resp = send(stack, raw_auth(scheme + forge.valid().encode()))
    assert_served_only_by(stack.upstreams, resp, "tenant-a", TENANT_A)


def test_control_a_7_kib_token_under_the_size_limit_is_accepted(stack, forge):
    tok = forge.rs(claims=forge.claims(pad="x" * 5000))
    assert 6000 < len(tok) < 8192, len(tok)
    assert_served_only_by(stack.upstreams, send(stack, auth(tok)), "tenant-a", TENANT_A)


def test_control_a_valid_token_next_to_a_non_utf8_header_is_still_served(stack, forge):
    attack = auth(forge.valid())
    attack.headers.append(("user-agent", b"caf\xe9 \xff"))
    assert_served_only_by(stack.upstreams, send(stack, attack), "tenant-a", TENANT_A)


def test_control_tenant_ids_in_scope_match_case_insensitively(stack, forge):
    resp = send(stack, auth(forge.rs(scope=TENANT_A.upper())))
    assert resp.status == 200, resp
    assert list(stack.upstreams.hits()) == ["tenant-a"], stack.upstreams.hits()


def test_the_attack_tool_forgeries_are_well_formed_jws(forge):
    """myjwt really produced what the ids say (so a refusal is not just a broken forgery)."""
    tok = forge.idp_token()
    none = myjwt_forge.alg_none(tok)
    assert header_of(none)["alg"] == "none" and none.endswith(".")
    conf = myjwt_forge.hmac_key_confusion(tok, forge.pem_file)
    assert header_of(conf)["alg"] == "HS256" and claims_of(conf) == claims_of(tok)
    jku = myjwt_forge.jku_attack(tok, forge.site.url, forge.site_dir, forge.idp_jwks)
    assert header_of(jku)["jku"] == forge.site.url + "forged-jwks.json"
    forged = json.loads((forge.site_dir / "forged-jwks.json").read_text())
    assert forged["keys"][0]["n"] != public_jwk(RS_KID)["n"]
    x5u = myjwt_forge.x5u_attack(tok, forge.site.url, forge.site_dir, forge.idp_jwks)
    assert header_of(x5u)["x5u"] == forge.site.url + "forged-x5u.json"
    kid = myjwt_forge.kid_injection(tok, "' OR 1=1 --")
    assert header_of(kid)["kid"] == "' OR 1=1 --"


def test_no_request_in_this_module_crashed_the_wasm_vm(stack):
    assert_wasm_vm_never_crashed(stack.envoy)
