#!/usr/bin/env python3
"""Regenerate tests/keys/test-only-private-jwks.json.

TEST-ONLY KEYS. The output is a PRIVATE JWK set that is committed to the
repository on purpose so tests can sign edge-case tokens. Never use it
anywhere real.

Usage:
    python3 tests/keys/generate.py                 # writes next to this script
    python3 tests/keys/generate.py -o other.json   # writes elsewhere
    python3 tests/keys/generate.py -o -            # prints to stdout

Requires the `cryptography` package (pip install cryptography).
"""
import argparse
import base64
import json
import os
import sys

from cryptography.hazmat.primitives.asymmetric import ec, rsa


def b64u_int(n: int, length: int | None = None) -> str:
    if length is None:
        length = max(1, (n.bit_length() + 7) // 8)
    return base64.urlsafe_b64encode(n.to_bytes(length, "big")).rstrip(b"=").decode("ascii")


def rsa_jwk(kid: str) -> dict:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv = key.private_numbers()
    pub = priv.public_numbers
    return {
        "kty": "RSA",
        "kid": kid,
        "alg": "RS256",
        "use": "sig",
        "n": b64u_int(pub.n),
        "e": b64u_int(pub.e),
        "d": b64u_int(priv.d),
        "p": b64u_int(priv.p),
        "q": b64u_int(priv.q),
        "dp": b64u_int(priv.dmp1),
        "dq": b64u_int(priv.dmq1),
        "qi": b64u_int(priv.iqmp),
    }


def ec_p256_jwk(kid: str) -> dict:
    key = ec.generate_private_key(ec.SECP256R1())
    priv = key.private_numbers()
    pub = priv.public_numbers
    # RFC 7518 6.2.1.2 / 6.2.2.1: coordinates and d are fixed-length (32 bytes for P-256)
    return {
        "kty": "EC",
        "kid": kid,
        "alg": "ES256",
        "use": "sig",
        "crv": "P-256",
        "x": b64u_int(pub.x, 32),
        "y": b64u_int(pub.y, 32),
        "d": b64u_int(priv.private_value, 32),
    }


def main() -> int:
    default_out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test-only-private-jwks.json")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default=default_out, help="output path, or - for stdout")
    args = ap.parse_args()

    jwks = {"keys": [rsa_jwk("test-rs256-1"), ec_p256_jwk("test-es256-1")]}
    text = json.dumps(jwks, indent=2) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.output} (TEST-ONLY keys: test-rs256-1, test-es256-1)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
