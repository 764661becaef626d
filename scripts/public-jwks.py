#!/usr/bin/env python3
"""Print the PUBLIC JWK set derived from a private JWK set (default: the TEST-ONLY keys).

    python3 scripts/public-jwks.py [tests/keys/test-only-private-jwks.json]

Used to refresh the inline "jwks" in envoy/envoy-inline-jwks.yaml after tests/keys/generate.py ran
(the e2e suite checks that the shipped inline JWKS matches the key file). Only the public members
(kty, kid, alg, use, n, e / crv, x, y) are kept; d, p, q, dp, dq, qi are dropped.
"""
import json
import os
import sys

PUBLIC_MEMBERS = {
    "RSA": ("kty", "kid", "alg", "use", "n", "e"),
    "EC": ("kty", "kid", "alg", "use", "crv", "x", "y"),
}


def public_jwks(private_jwks: dict) -> dict:
    keys = []
    for k in private_jwks["keys"]:
        keys.append({m: k[m] for m in PUBLIC_MEMBERS[k["kty"]] if m in k})
    return {"keys": keys}


def main() -> int:
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "keys",
                           "test-only-private-jwks.json")
    path = sys.argv[1] if len(sys.argv) > 1 else default
    with open(path, encoding="utf-8") as f:
        print(json.dumps(public_jwks(json.load(f)), separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
