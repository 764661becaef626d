#!/usr/bin/env python3
"""Self-check against a RUNNING test IdP (tests/idp/server.mjs).

Reads the same environment variables as the server (IDP_PORT, IDP_HOST, IDP_ISSUER,
IDP_AUDIENCE, IDP_SIGNING_ALG, IDP_TOKEN_TTL, IDP_CLIENTS) so that
`IDP_SIGNING_ALG=ES256 node server.mjs` is checked with
`IDP_SIGNING_ALG=ES256 python3 selfcheck.py`.

Needs only the standard library; if the `cryptography` package is installed
the token signatures are also verified against /jwks.
Exit status 0 = all checks passed. Prints a payload sample with -v.
"""
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
PORT = os.environ.get("IDP_PORT") or "9000"
HOST = os.environ.get("IDP_HOST") or "127.0.0.1"
# where to connect; endpoint URLs in discovery are derived from the request Host
BASE = f"http://{HOST}:{PORT}"
ISSUER = os.environ.get("IDP_ISSUER") or f"http://127.0.0.1:{PORT}"
AUDIENCE = os.environ.get("IDP_AUDIENCE") or "http://127.0.0.1:10000"
ALG = os.environ.get("IDP_SIGNING_ALG") or "RS256"
TTL = int(os.environ.get("IDP_TOKEN_TTL") or "3600")
CLIENTS = os.environ.get("IDP_CLIENTS") or os.path.join(HERE, "demo-clients.json")
KID = {"RS256": "test-rs256-1", "ES256": "test-es256-1"}[ALG]
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
VERBOSE = "-v" in sys.argv

failures = 0


def check(cond, what):
    global failures
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures += 1


def b64d(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, json.load(r)


def post_token(form, basic=None):
    data = urllib.parse.urlencode(form).encode()
    req = urllib.request.Request(f"{TOKEN_URL}", data=data, method="POST")
    if basic:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def decode(jwt):
    h, p, s = jwt.split(".")
    return json.loads(b64d(h)), json.loads(b64d(p)), (h + "." + p).encode(), b64d(s)


def verify(jwk, alg, signing_input, sig):
    """True/False if verified, None if `cryptography` is unavailable."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    except ImportError:
        return None
    i = lambda v: int.from_bytes(b64d(v), "big")  # noqa: E731
    try:
        if alg == "RS256":
            key = rsa.RSAPublicNumbers(i(jwk["e"]), i(jwk["n"])).public_key()
            key.verify(sig, signing_input, padding.PKCS1v15(), hashes.SHA256())
        else:
            key = ec.EllipticCurvePublicNumbers(i(jwk["x"]), i(jwk["y"]), ec.SECP256R1()).public_key()
            if len(sig) != 64:
                return False
            der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
            key.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
        return True
    except InvalidSignature:
        return False


# --- discovery + jwks -------------------------------------------------------
status, disco = get_json(BASE + "/.well-known/openid-configuration")
check(status == 200, "discovery document served")
check(disco.get("issuer") == ISSUER, f"discovery issuer == {ISSUER}")
check(disco.get("jwks_uri") == BASE + "/jwks", f"jwks_uri == {BASE}/jwks")
check(disco.get("token_endpoint") == BASE + "/token", f"token_endpoint == {BASE}/token")
TOKEN_URL = BASE + "/token"

status, jwks = get_json(BASE + "/jwks")
keys = jwks.get("keys", [])
check(len(keys) == 2, f"/jwks has 2 keys (got {len(keys)})")
check({k.get("kid") for k in keys} == {"test-rs256-1", "test-es256-1"}, "/jwks kids are test-rs256-1, test-es256-1")
check(all(not (PRIVATE_MEMBERS & set(k)) for k in keys), "/jwks has no private members (d, p, q, ...)")
jwk_by_kid = {k.get("kid"): k for k in keys}

# --- tokens for every client -------------------------------------------------
with open(CLIENTS, encoding="utf-8") as f:
    clients = json.load(f)

for n, c in enumerate(clients):
    scope = c["scope"].split()[0]
    # alternate auth methods: client_secret_post for even, client_secret_basic for odd entries
    if n % 2 == 0:
        how = "client_secret_post"
        status, body = post_token({"grant_type": "client_credentials", "client_id": c["client_id"],
                                   "client_secret": c["client_secret"], "scope": scope})
    else:
        how = "client_secret_basic"
        status, body = post_token({"grant_type": "client_credentials", "scope": scope},
                                  basic=(c["client_id"], c["client_secret"]))
    name = c["client_id"]
    check(status == 200, f"{name}: token issued ({how})")
    if status != 200:
        print("     ", body)
        continue
    check(body.get("token_type") == "Bearer", f"{name}: token_type Bearer")
    check(body.get("expires_in") == TTL, f"{name}: expires_in == {TTL} (got {body.get('expires_in')})")
    header, payload, signing_input, sig = decode(body["access_token"])
    if VERBOSE:
        print("      header: ", json.dumps(header))
        print("      payload:", json.dumps(payload))
    check(header.get("alg") == ALG, f"{name}: header alg == {ALG}")
    check(header.get("kid") == KID, f"{name}: header kid == {KID}")
    check(header.get("typ") == "at+jwt", f"{name}: header typ == at+jwt")
    check(payload.get("iss") == ISSUER, f"{name}: iss == {ISSUER}")
    check(payload.get("aud") == AUDIENCE, f"{name}: aud == {AUDIENCE} (no resource parameter sent)")
    check(payload.get("scope") == scope, f"{name}: scope == {scope}")
    check(payload.get("client_id") == name, f"{name}: client_id == {name}")
    check(isinstance(payload.get("jti"), str) and payload["jti"], f"{name}: jti present")
    now = int(time.time())
    check(isinstance(payload.get("iat"), int) and abs(payload["iat"] - now) < 60, f"{name}: iat ~ now")
    check(payload.get("exp", 0) - payload.get("iat", 0) == TTL, f"{name}: exp - iat == {TTL}")
    v = verify(jwk_by_kid.get(header.get("kid"), {}), ALG, signing_input, sig)
    if v is None:
        print("skip signature check (python cryptography not installed)")
    else:
        check(v, f"{name}: signature verifies against /jwks")

a = clients[0]
if len(clients) > 1:
    other = clients[1]["scope"].split()[0]
    status, body = post_token({"grant_type": "client_credentials", "client_id": a["client_id"],
                               "client_secret": a["client_secret"], "scope": other})
    check(status == 400 and body.get("error") == "invalid_scope",
          f"{a['client_id']} asking for another client's scope -> 400 invalid_scope (got {status} {body.get('error')})")

status, body = post_token({"grant_type": "client_credentials", "client_id": a["client_id"],
                           "client_secret": a["client_secret"], "scope": "not-a-tenant"})
check(status == 400 and body.get("error") == "invalid_scope", f"unknown scope -> 400 invalid_scope (got {status})")

status, body = post_token({"grant_type": "client_credentials", "client_id": a["client_id"],
                           "client_secret": "wrong-secret", "scope": a["scope"].split()[0]})
check(status == 401 and body.get("error") == "invalid_client", f"wrong secret -> 401 invalid_client (got {status})")

status, body = post_token({"grant_type": "client_credentials", "client_id": a["client_id"],
                           "client_secret": a["client_secret"], "scope": a["scope"].split()[0],
                           "resource": AUDIENCE})
check(status == 200 and decode(body["access_token"])[1].get("aud") == AUDIENCE,
      "explicit resource=<audience> -> token with that aud")

status, body = post_token({"grant_type": "client_credentials", "client_id": a["client_id"],
                           "client_secret": a["client_secret"], "resource": "http://127.0.0.1:1/other"})
check(status == 400 and body.get("error") == "invalid_target", f"other resource -> 400 invalid_target (got {status})")

status, body = post_token({"grant_type": "client_credentials", "client_id": a["client_id"],
                           "client_secret": a["client_secret"]})
check(status == 200 and "scope" not in decode(body["access_token"])[1],
      "no scope requested -> token without scope claim")

print("ALL OK" if failures == 0 else f"{failures} FAILURE(S)")
sys.exit(1 if failures else 0)
