"""What five IdPs really send, minted here: keys with X.509 certificates, key sets and discovery documents shaped
like each IdP's, served by a real HTTP server on 127.0.0.1 under the IdP's real host name, and access tokens (and
ID tokens) with exactly the header and claims each IdP documents for the client-credentials grant.

Entra ID, Okta, Auth0, Keycloak and Cognito cannot run here (no internet), so their documents and tokens are built
from their public documentation; the sources are cited in tests/e2e/test_idps.py and docs/idp/*.md. The config each
test runs is the one in docs/idp/<idp>.md (`page_config`), so a page cannot drift from what is tested.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from harness import REPO, SHIPPED_CONFIG, load_yaml

DOCS_IDP = REPO / "docs" / "idp"


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _uint(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


class IdpKey:
    """An RSA-2048 key pair with a self-signed certificate (the IdPs publish `x5c`, `x5t` next to `n`, `e`)."""

    def __init__(self, common_name: str, kid: str | None = None):
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = datetime.datetime.now(datetime.timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self.private.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=365))
                .sign(self.private, hashes.SHA256()))
        self.der = cert.public_bytes(serialization.Encoding.DER)
        self.x5t = b64u(hashlib.sha1(self.der).digest())  # noqa: S324 - RFC 7517 §4.8 defines x5t as SHA-1
        self.x5t_s256 = b64u(hashlib.sha256(self.der).digest())
        self.x5c = [base64.b64encode(self.der).decode("ascii")]  # standard base64, not base64url (RFC 7517 §4.7)
        self.kid = kid or self.x5t
        numbers = self.private.public_key().public_numbers()
        self.n, self.e = b64u(_uint(numbers.n)), b64u(_uint(numbers.e))

    def sign(self, header: dict, claims: dict) -> str:
        """A JWS in compact form with exactly this header (nothing added: no default `typ`)."""
        signing_input = (b64u(json.dumps(header, separators=(",", ":")).encode()) + "."
                         + b64u(json.dumps(claims, separators=(",", ":")).encode()))
        sig = self.private.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + b64u(sig)


# ------------------------------------------------------------------------------ key sets, IdP by IdP

def entra_jwk(k: IdpKey, issuer: str = "https://login.microsoftonline.com/{tenantid}/v2.0") -> dict:
    # Entra's keys carry kty, use, kid, x5t, n, e, x5c and an `issuer` (the common endpoint's template); no alg.
    return {"kty": "RSA", "use": "sig", "kid": k.kid, "x5t": k.x5t, "n": k.n, "e": k.e, "x5c": k.x5c,
            "issuer": issuer}


def okta_jwk(k: IdpKey) -> dict:
    return {"kty": "RSA", "alg": "RS256", "kid": k.kid, "use": "sig", "e": k.e, "n": k.n}


def auth0_jwk(k: IdpKey) -> dict:
    return {"kty": "RSA", "use": "sig", "n": k.n, "e": k.e, "kid": k.kid, "x5t": k.x5t, "x5c": k.x5c,
            "alg": "RS256"}


def keycloak_jwk(k: IdpKey, use: str = "sig") -> dict:
    # A realm publishes its RS256 signing key and its RSA-OAEP encryption key side by side.
    return {"kid": k.kid, "kty": "RSA", "alg": "RS256" if use == "sig" else "RSA-OAEP", "use": use, "n": k.n,
            "e": k.e, "x5c": k.x5c, "x5t": k.x5t, "x5t#S256": k.x5t_s256}


def cognito_jwk(k: IdpKey) -> dict:
    return {"alg": "RS256", "e": k.e, "kid": k.kid, "kty": "RSA", "n": k.n, "use": "sig"}


# --------------------------------------------------------------------------------- the HTTP server

@dataclass
class Seen:
    host: str
    path: str


class IdpServer:
    """A real HTTP/1.1 server on 127.0.0.1 answering the documents set with `put(url, doc)` by the request's Host
    and path, so every IdP's real URL can be configured (its Envoy cluster points here). Records what was asked."""

    def __init__(self):
        self._lock = threading.Lock()
        self._docs: dict[tuple[str, str], tuple[int, bytes]] = {}
        self._seen: list[Seen] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - http.server's name
                host = (self.headers.get("host") or "").lower()
                with outer._lock:
                    outer._seen.append(Seen(host, self.path))
                    status, body = outer._docs.get((host, self.path), (404, b'{"error":"not_found"}'))
                self.send_response(status)
                self.send_header("content-type", "application/json; charset=utf-8")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="idp-docs", daemon=True).start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def put(self, url: str, doc: dict | None, status: int = 200) -> None:
        m = re.fullmatch(r"https?://([^/]+)(/.*)", url)
        assert m, url
        with self._lock:
            if doc is None:
                self._docs.pop((m.group(1).lower(), m.group(2)), None)
            else:
                self._docs[(m.group(1).lower(), m.group(2))] = (status, json.dumps(doc).encode())

    def seen(self, host: str | None = None, path: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self._seen if (host is None or s.host == host.lower())
                    and (path is None or s.path == path)]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# ---------------------------------------------------------------------------------- docs/idp pages

def page_config(idp: str) -> dict:
    """The plugin configuration of docs/idp/<idp>.md: its first ```json block holding `providers` or `provider`."""
    text = (DOCS_IDP / f"{idp}.md").read_text(encoding="utf-8")
    for block in re.findall(r"```json\n(.*?)```", text, flags=re.S):
        doc = json.loads(block)
        if isinstance(doc, dict) and ("providers" in doc or "provider" in doc):
            return doc
    raise AssertionError(f"docs/idp/{idp}.md has no ```json block with providers")


def envoy_base(idp_clusters: list[str], port: int) -> dict:
    """The shipped envoy/envoy.yaml with one STATIC cluster per IdP name (all pointing at our IdpServer)."""
    cfg = load_yaml(SHIPPED_CONFIG)
    for name in idp_clusters:
        cfg["static_resources"]["clusters"].append(
            {"name": name, "type": "STATIC", "connect_timeout": "2s",
             "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                 {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}})
    return cfg


def now() -> int:
    return int(time.time())


def new_id() -> str:
    return str(uuid.uuid4())


def page_path(idp: str) -> Path:
    return DOCS_IDP / f"{idp}.md"
