"""Mint access tokens (good and deliberately bad) with the TEST-ONLY keys the IdP also signs with."""
from __future__ import annotations

import base64
import json
import time
import uuid

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from harness import AUDIENCE, KEYS_FILE, TENANT_A


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def load_private_jwks() -> dict:
    return json.loads(KEYS_FILE.read_text(encoding="utf-8"))


def private_key(kid: str):
    for k in load_private_jwks()["keys"]:
        if k["kid"] == kid:
            return jwt.PyJWK.from_dict(k).key
    raise KeyError(kid)


RS_KID = "test-rs256-1"
ES_KID = "test-es256-1"


class Minter:
    """`Minter(issuer).token(**overrides)`; `now` is fixed when the Minter is created (time.time())."""

    def __init__(self, issuer: str, audience: str = AUDIENCE, now: int | None = None):
        self.issuer = issuer
        self.audience = audience
        self.now = int(time.time()) if now is None else now

    def claims(self, scope: str = TENANT_A, **overrides) -> dict:
        c = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": "patients-app-a",
            "client_id": "patients-app-a",
            "scope": scope,
            "iat": self.now,
            "exp": self.now + 300,
            "jti": uuid.uuid4().hex,
        }
        c.update(overrides)
        return {k: v for k, v in c.items() if v is not None}  # override with None = drop the claim

    def token(self, scope: str = TENANT_A, *, alg: str = "RS256", kid: str | None = None, key=None,
              headers: dict | None = None, **claims) -> str:
        kid = kid or (ES_KID if alg.startswith("ES") else RS_KID)
        key = key if key is not None else private_key(kid)
        hdr = {"kid": kid, "typ": "at+jwt"}
        hdr.update(headers or {})
        return jwt.encode(self.claims(scope, **claims), key, algorithm=alg, headers=hdr)

    def unsigned_token(self, scope: str = TENANT_A, **claims) -> str:
        """alg "none" with an empty signature (built by hand: no library helps with this)."""
        header = {"alg": "none", "typ": "at+jwt", "kid": RS_KID}
        return (_b64u(json.dumps(header).encode()) + "." + _b64u(json.dumps(self.claims(scope, **claims)).encode())
                + ".")

    def wrong_key_token(self, scope: str = TENANT_A, **claims) -> str:
        """RS256 with a freshly generated key that claims the real kid."""
        fresh = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return self.token(scope, alg="RS256", kid=RS_KID, key=fresh, **claims)
