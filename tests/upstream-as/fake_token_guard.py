"""OURS, TEST-ONLY: a fake token guard in front of a tenant's FHIR server (issue 12's "check that serves only
requests bearing that server's valid token for the right audience").

A real FHIR cloud checks the access token its own authorization server issued before it serves a request.
The FHIR engines in tests/fhir check nothing, so this reverse proxy does it for them. It is a *fake* in the test
double sense: a working implementation, written here for the tests, with shortcuts (no TLS, no introspection,
an in-memory revocation list). The authorization server behind it (tests/upstream-as/server.mjs) is real
oidc-provider; this guard is not a product of anyone.

A request is forwarded to the target (a FHIR engine, a RecordingUpstream, anything HTTP/1.1 on 127.0.0.1) only
if ``Authorization: Bearer <jwt>`` is
  signed by a key of the authorization server's JWKS (fetched at start; fetched again, at most once a second,
  when a token names an unknown kid), with an allowed alg (the JWKS key's own), ``typ`` ``at+jwt``,
  ``iss`` = the authorization server's issuer, ``aud`` = this guard's audience, ``exp`` in the future (no
  leeway), ``iat`` and ``jti`` present, and its ``jti`` not revoked.
Anything else: 401, ``WWW-Authenticate: Bearer realm="<name>", error="invalid_token", error_description="<why>"``
(no ``error`` when there is no token at all, as RFC 6750 section 3.1 asks) and a FHIR OperationOutcome; nothing
reaches the target.

Every request is recorded (method, path, verdict, status, and the token's jti / client_id / aud / iss / scope /
exp: never the token). ``revoke_all_seen()`` revokes every jti seen so far, so the next request with an old
token is 401 (the router must then get a new token once and retry).

Standard library + PyJWT + cryptography (tests/requirements.txt). Binds 127.0.0.1.

    guard = FakeTokenGuard("guard-a", issuer=as_.issuer, jwks_url=as_.jwks_url,
                           audience="http://fhir-a.upstream.test", target_port=engine.port).start()
    guard.port, guard.records, guard.counters(), guard.revoke_all_seen(), guard.stop()
"""
from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt

ALLOWED = "allowed"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "trailers", "transfer-encoding", "upgrade", "content-length"}
FHIR_JSON = "application/fhir+json"


class GuardError(RuntimeError):
    pass


@dataclass
class GuardRecord:
    """One request the guard answered. `verdict` is "allowed" or why it was refused (see `_REASONS`)."""
    method: str
    path: str
    verdict: str
    status: int = 0  # what the guard answered (the target's status when allowed; 502 if the target failed)
    jti: str | None = None
    client_id: str | None = None
    aud: object = None
    iss: str | None = None
    scope: str | None = None
    exp: int | None = None
    time: float = field(default_factory=time.time)


class Refusal(Exception):
    def __init__(self, verdict: str, description: str, claims: dict | None = None):
        super().__init__(description)
        self.verdict = verdict
        self.description = description
        self.claims = claims or {}


# verdict -> what it means (the error_description says more)
_REASONS = {
    "missing_token": "no Authorization: Bearer header",
    "malformed": "not a JWS compact JWT, or its header/claims do not decode",
    "wrong_typ": "typ is not at+jwt",
    "unknown_kid": "kid not in the authorization server's JWKS (after a refetch)",
    "wrong_alg": "alg is not the JWKS key's alg",
    "bad_signature": "signature does not verify",
    "wrong_issuer": "iss is not the authorization server",
    "wrong_audience": "aud is not this guard's audience",
    "expired": "exp has passed",
    "missing_claim": "exp, iat, jti or client_id is missing",
    "revoked": "jti revoked by revoke()/revoke_all_seen()",
}


class FakeTokenGuard:
    def __init__(self, name: str, *, issuer: str, jwks_url: str, audience: str, target_port: int,
                 target_host: str = "127.0.0.1", port: int = 0, target_timeout: float = 60.0):
        self.name = name
        self.issuer = issuer
        self.jwks_url = jwks_url
        self.audience = audience
        self.target_host = target_host
        self.target_port = target_port
        self.target_timeout = target_timeout
        self._lock = threading.Lock()
        self._records: list[GuardRecord] = []
        self._seen: set[str] = set()
        self._revoked: set[str] = set()
        self._keys: dict[str, jwt.PyJWK] = {}
        self._last_fetch = 0.0
        self.jwks_fetches = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, jwks_timeout: float = 30.0) -> "FakeTokenGuard":
        deadline = time.monotonic() + jwks_timeout
        while True:
            try:
                self._fetch_jwks()
                break
            except Exception as exc:  # noqa: BLE001 - the AS may still be starting
                if time.monotonic() > deadline:
                    self._server.server_close()
                    raise GuardError(f"{self.name}: cannot fetch the JWKS {self.jwks_url}: {exc!r}") from exc
                time.sleep(0.1)
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"guard-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread = None
        self._server.server_close()

    # ------------------------------------------------------------------------------------ test controls

    @property
    def records(self) -> list[GuardRecord]:
        with self._lock:
            return list(self._records)

    def clear(self) -> None:
        """Forget the records (not the revocations nor the jti values seen)."""
        with self._lock:
            self._records.clear()

    def counters(self) -> dict[str, int]:
        """{"allowed": n, "<refusal verdict>": n, ...} over the records kept."""
        with self._lock:
            return dict(Counter(r.verdict for r in self._records))

    def allowed(self) -> list[GuardRecord]:
        return [r for r in self.records if r.verdict == ALLOWED]

    def refused(self) -> list[GuardRecord]:
        return [r for r in self.records if r.verdict != ALLOWED]

    def seen_jtis(self) -> set[str]:
        with self._lock:
            return set(self._seen)

    def revoke(self, jti: str) -> None:
        with self._lock:
            self._revoked.add(jti)

    def revoke_all_seen(self) -> set[str]:
        """Revoke every token (jti) that reached this guard so far; returns them."""
        with self._lock:
            self._revoked |= self._seen
            return set(self._seen)

    def unrevoke_all(self) -> None:
        with self._lock:
            self._revoked.clear()

    # ------------------------------------------------------------------------------------------ checking

    def _fetch_jwks(self) -> None:
        # http.client, not urllib: no proxy from the environment between two local test processes
        url = urllib.parse.urlsplit(self.jwks_url)
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=10)
        try:
            conn.request("GET", url.path or "/", headers={"accept": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise GuardError(f"{self.jwks_url} answered {resp.status}")
        doc = json.loads(body)
        keys = {}
        for k in doc.get("keys", []):
            if "kid" in k and "d" not in k:
                keys[k["kid"]] = jwt.PyJWK.from_dict(k)
        with self._lock:
            self._keys = keys
            self._last_fetch = time.monotonic()
            self.jwks_fetches += 1

    def _key_for(self, kid: str) -> jwt.PyJWK | None:
        with self._lock:
            key = self._keys.get(kid)
            may_refetch = time.monotonic() - self._last_fetch >= 1.0
        if key is None and may_refetch:
            try:
                self._fetch_jwks()
            except Exception:  # noqa: BLE001 - AS down: keep the keys we have
                pass
            with self._lock:
                key = self._keys.get(kid)
        return key

    def check(self, authorization: str | None) -> dict:
        """The token's claims if it may pass, else raise Refusal."""
        if not authorization or not authorization[:7].lower() == "bearer " or not authorization[7:].strip():
            raise Refusal("missing_token", "no bearer token")
        token = authorization[7:].strip()
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise Refusal("malformed", f"not a JWT: {exc}") from exc
        if header.get("typ") != "at+jwt":
            raise Refusal("wrong_typ", "typ must be at+jwt", unverified)
        kid = header.get("kid")
        key = self._key_for(kid) if isinstance(kid, str) else None
        if key is None:
            raise Refusal("unknown_kid", f"kid {kid!r} is not a key of {self.issuer}", unverified)
        if header.get("alg") != key.algorithm_name:
            raise Refusal("wrong_alg", f"alg {header.get('alg')!r} is not the key's {key.algorithm_name}", unverified)
        try:
            claims = jwt.decode(token, key.key, algorithms=[key.algorithm_name], audience=self.audience,
                                issuer=self.issuer, leeway=0,
                                options={"require": ["exp", "iat", "jti", "iss", "aud"], "strict_aud": True})
        except jwt.InvalidSignatureError as exc:
            raise Refusal("bad_signature", "signature does not verify", unverified) from exc
        except jwt.ExpiredSignatureError as exc:
            raise Refusal("expired", "token expired", unverified) from exc
        except jwt.InvalidIssuerError as exc:
            raise Refusal("wrong_issuer", f"iss is not {self.issuer}", unverified) from exc
        except jwt.InvalidAudienceError as exc:
            raise Refusal("wrong_audience", f"aud is not {self.audience}", unverified) from exc
        except jwt.MissingRequiredClaimError as exc:
            raise Refusal("missing_claim", str(exc), unverified) from exc
        except jwt.PyJWTError as exc:
            raise Refusal("malformed", str(exc), unverified) from exc
        if not isinstance(claims.get("client_id"), str):
            raise Refusal("missing_claim", "client_id missing", claims)
        with self._lock:
            self._seen.add(claims["jti"])
            if claims["jti"] in self._revoked:
                raise Refusal("revoked", "token revoked", claims)
        return claims

    def _record(self, rec: GuardRecord) -> None:
        with self._lock:
            self._records.append(rec)

    # -------------------------------------------------------------------------------------------- HTTP

    def _handler_class(self):
        guard = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "fake-token-guard"

            def _read_body(self) -> bytes:
                if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("content-length") or 0)
                return self.rfile.read(length) if length else b""

            def _send(self, status: int, headers: list[tuple[str, str]], body: bytes,
                      length: str | None = None) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("content-length", length if length is not None else str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._read_body()
                rec = GuardRecord(self.command, self.path, ALLOWED)
                try:
                    claims = guard.check(self.headers.get("authorization"))
                except Refusal as r:
                    rec.verdict = r.verdict
                    _fill(rec, r.claims)
                    rec.status = 401
                    guard._record(rec)
                    self._refuse(r)
                    return
                _fill(rec, claims)
                try:
                    status, headers, payload, length = guard._forward(self.command, self.path, self.headers,
                                                                      body)
                except Exception as exc:  # noqa: BLE001 - the target is down or broke the connection
                    rec.status = 502
                    guard._record(rec)
                    self._send(502, [("content-type", FHIR_JSON)], _outcome("exception", f"{guard.name}: "
                                                                            f"target failed: {exc!r}"))
                    return
                rec.status = status
                guard._record(rec)
                self._send(status, headers, payload, length)

            def _refuse(self, r: Refusal) -> None:
                if r.verdict == "missing_token":
                    challenge = f'Bearer realm="{guard.name}"'
                else:
                    desc = r.description.replace('"', "'")
                    challenge = f'Bearer realm="{guard.name}", error="invalid_token", error_description="{desc}"'
                self._send(401, [("www-authenticate", challenge), ("content-type", FHIR_JSON),
                                 ("x-fake-token-guard", guard.name)],
                           _outcome("login", f"{guard.name}: {r.verdict}: {r.description}"))

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _handle

            def log_message(self, fmt, *args):
                pass

        return Handler

    def _forward(self, method: str, path: str, headers,
                 body: bytes) -> tuple[int, list[tuple[str, str]], bytes, str | None]:
        conn = http.client.HTTPConnection(self.target_host, self.target_port, timeout=self.target_timeout)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers.items():
                if k.lower() not in HOP_BY_HOP:
                    conn.putheader(k, v)
            if body or method in ("POST", "PUT", "PATCH"):
                conn.putheader("content-length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            payload = resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
            # HEAD: there is no body to count, keep the target's length
            length = resp.getheader("content-length") if method == "HEAD" else None
            return resp.status, out, payload, length
        finally:
            conn.close()


def _fill(rec: GuardRecord, claims: dict) -> None:
    rec.jti = claims.get("jti")
    rec.client_id = claims.get("client_id")
    rec.aud = claims.get("aud")
    rec.iss = claims.get("iss")
    rec.scope = claims.get("scope")
    rec.exp = claims.get("exp")


def _outcome(code: str, diagnostics: str) -> bytes:
    return json.dumps({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": code, "diagnostics": diagnostics}]}).encode()
