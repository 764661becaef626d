"""Hand-made token forgeries: a JWS signer that writes exactly the header it is given (PyJWT adds and
reorders members, and refuses some of what an attacker would send), plus the key material an attacker
has: the IdP's PUBLIC keys in every encoding (for HMAC key confusion) and keys of their own."""
from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
from dataclasses import dataclass
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tokens import ES_KID, RS_KID, load_private_jwks, private_key


def b64u(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_decode(seg: str) -> bytes:
    return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))


def segment(obj) -> str:
    """A JOSE segment: compact JSON (or raw bytes/str as given), base64url without padding."""
    if isinstance(obj, (bytes, str)):
        return b64u(obj)
    return b64u(json.dumps(obj, separators=(",", ":"), ensure_ascii=False))


_HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
_HASHLIB = {"256": hashlib.sha256, "384": hashlib.sha384, "512": hashlib.sha512}


def raw_signature(alg: str, key, signing_input: bytes) -> bytes:
    """Sign `signing_input` as `alg` with `key` (HS*: bytes secret; RS*/PS*: RSA key; ES*: EC key)."""
    family, bits = alg[:2].upper(), alg[2:]
    if family == "HS":
        return hmac.new(key, signing_input, _HASHLIB[bits]).digest()
    if family == "RS":
        return key.sign(signing_input, padding.PKCS1v15(), _HASHES[bits]())
    if family == "PS":
        h = _HASHES[bits]()
        return key.sign(signing_input, padding.PSS(padding.MGF1(h), h.digest_size), h)
    if family == "ES":
        der = key.sign(signing_input, ec.ECDSA(_HASHES[bits]()))
        r, s = decode_dss_signature(der)
        size = (key.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    raise ValueError(alg)


def sign(header: dict, claims: dict, alg: str, key) -> str:
    """A compact JWS with exactly `header` (its `alg` member is NOT set from `alg`: the caller decides what
    the header claims; `alg` is how it is really signed)."""
    signing_input = segment(header) + "." + segment(claims)
    return signing_input + "." + b64u(raw_signature(alg, key, signing_input.encode("ascii")))


def unsigned(header: dict, claims: dict, signature: str = "") -> str:
    return segment(header) + "." + segment(claims) + "." + signature


def parts(token: str) -> list[str]:
    return token.split(".")


def header_of(token: str) -> dict:
    return json.loads(b64u_decode(token.split(".")[0]))


def claims_of(token: str) -> dict:
    return json.loads(b64u_decode(token.split(".")[1]))


def public_jwk(kid: str) -> dict:
    """The IdP's published (public) JWK for `kid`."""
    for k in load_private_jwks()["keys"]:
        if k["kid"] == kid:
            return {n: v for n, v in k.items() if n not in ("d", "p", "q", "dp", "dq", "qi")}
    raise KeyError(kid)


def rsa_jwk(pub: rsa.RSAPublicKey, kid: str | None = None) -> dict:
    n = pub.public_numbers()
    jwk = {"kty": "RSA", "n": b64u(n.n.to_bytes((n.n.bit_length() + 7) // 8, "big")),
           "e": b64u(n.e.to_bytes((n.e.bit_length() + 7) // 8, "big"))}
    if kid:
        jwk.update(kid=kid, alg="RS256", use="sig")
    return jwk


def ec_jwk(pub: ec.EllipticCurvePublicKey, kid: str | None = None) -> dict:
    nums = pub.public_numbers()
    jwk = {"kty": "EC", "crv": "P-256", "x": b64u(nums.x.to_bytes(32, "big")), "y": b64u(nums.y.to_bytes(32, "big"))}
    if kid:
        jwk.update(kid=kid, alg="ES256", use="sig")
    return jwk


def self_signed_cert(key: rsa.RSAPrivateKey, cn: str = "attacker") -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))


@dataclass
class KeyMaterial:
    """What a forger has: the IdP's private test keys (to make tokens that are valid except for one
    detail), its public keys (everyone has those), and fresh keys of an attacker."""

    @cached_property
    def idp_rsa(self) -> rsa.RSAPrivateKey:
        return private_key(RS_KID)

    @cached_property
    def idp_ec(self) -> ec.EllipticCurvePrivateKey:
        return private_key(ES_KID)

    @cached_property
    def attacker_rsa(self) -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    @cached_property
    def attacker_ec(self) -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    @cached_property
    def attacker_cert(self) -> x509.Certificate:
        return self_signed_cert(self.attacker_rsa)

    # the IdP's RSA public key in the encodings HMAC key-confusion exploits use as the "secret"
    def rsa_public(self, form: str) -> bytes:
        pub = self.idp_rsa.public_key()
        E, F = serialization.Encoding, serialization.PublicFormat
        if form == "pem-spki":
            return pub.public_bytes(E.PEM, F.SubjectPublicKeyInfo)
        if form == "pem-spki-no-newline":
            return pub.public_bytes(E.PEM, F.SubjectPublicKeyInfo).rstrip(b"\n")
        if form == "pem-pkcs1":
            return pub.public_bytes(E.PEM, F.PKCS1)
        if form == "der-spki":
            return pub.public_bytes(E.DER, F.SubjectPublicKeyInfo)
        if form == "der-pkcs1":
            return pub.public_bytes(E.DER, F.PKCS1)
        if form == "jwk-json":
            return json.dumps(public_jwk(RS_KID)).encode()
        if form == "jwk-n":
            return b64u_decode(public_jwk(RS_KID)["n"])
        raise ValueError(form)

    def ec_public_pem(self) -> bytes:
        return self.idp_ec.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)

    def attacker_rsa_pem(self) -> bytes:
        return self.attacker_rsa.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption())

    def attacker_cert_pem(self) -> bytes:
        return self.attacker_cert.public_bytes(serialization.Encoding.PEM)

    def attacker_cert_der_b64(self) -> str:
        return base64.b64encode(self.attacker_cert.public_bytes(serialization.Encoding.DER)).decode()
