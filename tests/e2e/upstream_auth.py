"""The upstream's own OAuth side for issue 12 (the router gets a token from each tenant upstream's authorization
server and sends it to that tenant's FHIR server): key material, the upstream authorization server
(tests/upstream-as/server.mjs, real oidc-provider) as a child process with its control API, our fake token
guards (tests/upstream-as/fake_token_guard.py) in front of tenant FHIR servers, and pytest fixtures.

    keys = UpstreamKeys.generate(workdir / "upstream-keys")
    as_ = UpstreamAs(workdir, keys, token_ttl=10).start()
    as_.token_url                    # http://127.0.0.1:<port>/token  (Envoy: cluster at 127.0.0.1:as_.port)
    as_.secrets[BASIC_CLIENT]        # the current secret of a client_secret_basic client
    guard = start_fake_token_guard(as_, FHIR_A_AUDIENCE, target_port=engine.port)
    as_.outage("503"); as_.rotate_secret(POST_CLIENT); as_.requests(); as_.counters()

Fixtures (conftest imports them): upstream_keys (session), start_upstream_as (session factory),
upstream_as (module, default clients), start_fake_token_guard (session factory), upstream_auth (module: an AS
and one fake guard per tenant in front of the session's recording upstreams tenant_a / tenant_b).
"""
from __future__ import annotations

import base64
import json
import re
import secrets
import subprocess
import sys
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from harness import REPO, HarnessError, Response, _tail, http_request, node_bin, stop_process, wait_until

UPSTREAM_AS_DIR = REPO / "tests" / "upstream-as"
UPSTREAM_AS_SERVER = UPSTREAM_AS_DIR / "server.mjs"
sys.path.insert(0, str(UPSTREAM_AS_DIR))

from fake_token_guard import FakeTokenGuard, GuardError, GuardRecord  # noqa: E402,F401

# The upstream FHIR servers' audiences (resource indicators). Opaque strings: nothing resolves these names.
FHIR_A_AUDIENCE = "http://fhir-a.upstream.test"
FHIR_B_AUDIENCE = "http://fhir-b.upstream.test"
UPSTREAM_AUDIENCES = (FHIR_A_AUDIENCE, FHIR_B_AUDIENCE)
# SMART v1 and v2 system scopes every default client may ask for (a subset, or nothing).
UPSTREAM_SCOPES = "system/*.read system/*.rs system/Patient.read"

BASIC_CLIENT = "upstream-basic"      # client_secret_basic
POST_CLIENT = "upstream-post"        # client_secret_post
PKJWT_CLIENT = "upstream-pkjwt"      # private_key_jwt: RS384 (RSA 2048) or ES384 (P-384)
SERVICE_ACCOUNT = "fhir-router@upstream-project.iam.gserviceaccount.test"  # JWT-bearer grant (RS256)
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
OUTAGE_MODES = ("off", "503", "drop", "hang", "refuse")


# ------------------------------------------------------------------------------------------------ keys

def _b64u_int(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class KeyFile:
    """A private key on disk (PKCS#8 PEM, unencrypted) with its kid, alg and public JWK."""
    kid: str
    alg: str
    pem_path: Path
    public_jwk: dict

    def private_key(self):
        return serialization.load_pem_private_key(self.pem_path.read_bytes(), password=None)

    def pem(self) -> str:
        return self.pem_path.read_text(encoding="ascii")


def write_key(directory: Path, kid: str, alg: str, key) -> KeyFile:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path = directory / f"{kid}.pem"
    path.write_bytes(pem)
    path.chmod(0o600)
    pub = key.public_key().public_numbers()
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = {"kty": "RSA", "n": _b64u_int(pub.n), "e": _b64u_int(pub.e)}
    else:
        size = (key.curve.key_size + 7) // 8
        enc = lambda v: base64.urlsafe_b64encode(v.to_bytes(size, "big")).rstrip(b"=").decode("ascii")  # noqa: E731
        jwk = {"kty": "EC", "crv": {"secp256r1": "P-256", "secp384r1": "P-384"}[key.curve.name],
               "x": enc(pub.x), "y": enc(pub.y)}
    jwk.update(kid=kid, alg=alg, use="sig")
    return KeyFile(kid, alg, path, jwk)


@dataclass(frozen=True)
class UpstreamKeys:
    """The router's keys at the upstream: the private_key_jwt client's RSA (RS384) and P-384 (ES384) keys,
    and the service account's RSA key (RS256, JWT-bearer grant). Fresh for every test session."""
    directory: Path
    rs384: KeyFile
    es384: KeyFile
    service_account: KeyFile

    @classmethod
    def generate(cls, directory: Path) -> "UpstreamKeys":
        directory.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        return cls(
            directory,
            write_key(directory, f"router-rs384-{tag}", "RS384",
                       rsa.generate_private_key(public_exponent=65537, key_size=2048)),
            write_key(directory, f"router-es384-{tag}", "ES384", ec.generate_private_key(ec.SECP384R1())),
            write_key(directory, f"service-account-{tag}", "RS256",
                       rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        )

    def client_jwks(self) -> dict:
        """The public JWKS registered for the private_key_jwt client."""
        return {"keys": [self.rs384.public_jwk, self.es384.public_jwk]}


def default_clients(keys: UpstreamKeys, secrets_by_client: dict[str, str]) -> list[dict]:
    """One client per way of getting a token. Every client may get tokens for both audiences (a token for
    the wrong FHIR server is then the guard's to refuse); without `resource`/`audience` the token is for
    FHIR_A_AUDIENCE."""
    common = {"scope": UPSTREAM_SCOPES, "resources": list(UPSTREAM_AUDIENCES), "default_resource": FHIR_A_AUDIENCE}
    return [
        {"client_id": BASIC_CLIENT, "auth_method": "client_secret_basic",
         "client_secret": secrets_by_client[BASIC_CLIENT], **common},
        {"client_id": POST_CLIENT, "auth_method": "client_secret_post",
         "client_secret": secrets_by_client[POST_CLIENT], **common},
        {"client_id": PKJWT_CLIENT, "auth_method": "private_key_jwt", "jwks": keys.client_jwks(), **common},
        {"client_id": SERVICE_ACCOUNT, "auth_method": "jwt_bearer", "public_jwk": keys.service_account.public_jwk,
         "assertion_algs": ["RS256"], "assertion_max_lifetime": 3600, **common},
    ]


def new_secret() -> str:
    return "upstream-" + secrets.token_urlsafe(24)


# -------------------------------------------------------------------------------------- assertions

def client_assertion(key: KeyFile, client_id: str, token_url: str, *, lifetime: int = 300,
                     jti: str | None = None, now: int | None = None, alg: str | None = None,
                     **claims) -> str:
    """An RFC 7523 / SMART Backend Services client assertion (private_key_jwt). Override any claim with
    keyword arguments (None drops it)."""
    now = int(time.time()) if now is None else now
    body = {"iss": client_id, "sub": client_id, "aud": token_url, "jti": jti or uuid.uuid4().hex,
            "iat": now, "exp": now + lifetime}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key.private_key(), algorithm=alg or key.alg, headers={"kid": key.kid, "typ": "JWT"})


def service_account_assertion(key: KeyFile, email: str, token_url: str, *, scope: str | None = None,
                              lifetime: int = 3600, now: int | None = None, **claims) -> str:
    """A Google-style JWT-bearer grant assertion: iss = the service account, aud = token URL, scope inside."""
    now = int(time.time()) if now is None else now
    body = {"iss": email, "aud": token_url, "iat": now, "exp": now + lifetime, "scope": scope}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key.private_key(), algorithm=key.alg, headers={"kid": key.kid, "typ": "JWT"})


def decode_unverified(token: str) -> tuple[dict, dict]:
    return jwt.get_unverified_header(token), jwt.decode(token, options={"verify_signature": False})


# ----------------------------------------------------------------------------- the authorization server

class UpstreamAs:
    """tests/upstream-as/server.mjs as a child process: the upstream FHIR cloud's authorization server.

    It picks its own free ports (the READY line says which), so nothing races for a port. `issuer` is
    http://127.0.0.1:<port>; the token URL, discovery and JWKS are under it. The control API is on a
    second port (`control_port`)."""

    def __init__(self, workdir: Path, keys: UpstreamKeys, *, name: str = "upstream-as", token_ttl: int = 300,
                 clients: list[dict] | None = None, signing_alg: str = "RS256",
                 client_auth_signing_algs: tuple[str, ...] = ("RS384", "ES384"),
                 client_assertion_max_lifetime: int = 300, issuer: str | None = None):
        self.name = name
        self.keys = keys
        self.workdir = Path(workdir)
        self.secrets: dict[str, str] = {BASIC_CLIENT: new_secret(), POST_CLIENT: new_secret()}
        self.clients = clients if clients is not None else default_clients(keys, self.secrets)
        for c in self.clients:
            if "client_secret" in c:
                self.secrets[c["client_id"]] = c["client_secret"]
        self.config = {"host": "127.0.0.1", "port": 0, "control_port": 0, "token_ttl": token_ttl,
                       "signing_alg": signing_alg, "client_auth_signing_algs": list(client_auth_signing_algs),
                       "client_assertion_max_lifetime": client_assertion_max_lifetime, "clients": self.clients}
        if issuer:
            self.config["issuer"] = issuer
        self.config_path = self.workdir / f"{name}.json"
        self.log_path = self.workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.control_port: int | None = None
        self.issuer: str | None = None
        self.service_account_key_file: Path | None = None

    # ----------------------------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 60.0) -> "UpstreamAs":
        if not (UPSTREAM_AS_DIR / "node_modules" / "oidc-provider").is_dir():
            raise HarnessError("upstream AS dependencies missing: make deps (cd tests/upstream-as && npm ci)")
        self.config_path.write_text(json.dumps(self.config, indent=2), encoding="utf-8")
        self.config_path.chmod(0o600)
        log = open(self.log_path, "ab")
        offset = log.tell()
        self.proc = subprocess.Popen([node_bin(), str(UPSTREAM_AS_SERVER), str(self.config_path)],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=UPSTREAM_AS_DIR, start_new_session=True)
        log.close()
        ready = re.compile(r"^UPSTREAM-AS READY (\S+) port=(\d+) control=(\d+)$", re.M)

        def _ready():
            if self.proc.poll() is not None:
                raise HarnessError(f"{self.name} exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
            m = ready.search(self.log_path.read_text(encoding="utf-8", errors="replace")[offset:])
            return m

        try:
            m = wait_until(_ready, timeout, f"{self.name} READY line",
                           on_timeout=lambda: "\n--- log ---\n" + _tail(self.log_path))
            self.issuer, self.port, self.control_port = m.group(1), int(m.group(2)), int(m.group(3))
            wait_until(self._discovery_ok, timeout, f"{self.name} discovery",
                       on_timeout=lambda: "\n--- log ---\n" + _tail(self.log_path))
        except HarnessError:
            self.stop()
            raise
        self.service_account_key_file = self._write_service_account_key_file()
        return self

    def _discovery_ok(self) -> bool:
        r = http_request(self.port, "GET", "/.well-known/openid-configuration", timeout=5)
        return r.status == 200 and r.json().get("issuer") == self.issuer

    def _write_service_account_key_file(self) -> Path:
        """A Google-style service account key file for this AS (token_uri = our token URL)."""
        sa = self.keys.service_account
        path = self.workdir / f"{self.name}-service-account.json"
        path.write_text(json.dumps({
            "type": "service_account", "project_id": "upstream-project", "private_key_id": sa.kid,
            "private_key": sa.pem(), "client_email": SERVICE_ACCOUNT, "client_id": "100000000000000000001",
            "token_uri": self.token_url,
        }, indent=2), encoding="utf-8")
        path.chmod(0o600)
        return path

    def stop(self) -> None:
        stop_process(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    # ------------------------------------------------------------------------------------ addresses

    @property
    def authority(self) -> str:
        """host:port for an Envoy cluster (and the Host header the AS expects: URLs derive from it)."""
        return f"127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/jwks"

    # -------------------------------------------------------------------------------------- control

    def _control(self, method: str, path: str, body: dict | None = None) -> object:
        data = json.dumps(body).encode() if body is not None else None
        r = http_request(self.control_port, method, path, {"content-type": "application/json",
                                                           "accept": "application/json"}, data, timeout=15)
        if r.status != 200:
            raise HarnessError(f"{self.name} control {method} {path}: {r}")
        return r.json()

    def state(self) -> dict:
        return self._control("GET", "/state")

    def requests(self) -> list[dict]:
        """Token requests received, oldest first (secrets redacted; assertions as decoded header+claims)."""
        return self._control("GET", "/requests")

    def last_request(self) -> dict:
        """The last token request received (as `requests()[-1]`)."""
        recs = self.requests()
        if not recs:
            raise HarnessError(f"{self.name} has received no token request")
        return recs[-1]

    def client_assertions(self) -> list[dict]:
        """The decoded {header, claims} of every private_key_jwt client assertion received, oldest first."""
        return [r["client_assertion"] for r in self.requests() if r.get("client_assertion")]

    def counters(self) -> dict:
        """{"total", "issued", "rejected", "outage": {mode: n}, "clients": {id: {"issued", "rejected", "outage",
        "errors": {error: n}}}} (id "(none)" when a request named no client)"""
        return self._control("GET", "/counters")

    def issued(self, client_id: str | None = None) -> int:
        c = self.counters()
        return c["issued"] if client_id is None else c["clients"].get(client_id, {}).get("issued", 0)

    def reset(self) -> None:
        """Forget the recorded requests and counters (not secrets, TTLs or the outage mode)."""
        self._control("POST", "/reset", {})

    def outage(self, mode: str) -> None:
        """"503": the token endpoint answers 503 temporarily_unavailable; "drop": it closes the connection
        without an answer; "hang": it never answers (until the outage ends, then drops); "refuse": the OAuth
        port stops listening (connection refused); "off": back to normal. Discovery/JWKS keep working except
        under "refuse"."""
        if mode not in OUTAGE_MODES:
            raise ValueError(mode)
        self._control("POST", "/outage", {"mode": mode})

    def rotate_secret(self, client_id: str, secret: str | None = None) -> str:
        """Give the client a new secret (returned): the old one is refused from now on."""
        secret = secret or new_secret()
        self._control("POST", f"/clients/{urllib.parse.quote(client_id, safe='')}/secret", {"secret": secret})
        self.secrets[client_id] = secret
        return secret

    def set_ttl(self, seconds: int, client_id: str | None = None) -> None:
        """Lifetime of tokens issued from now on: for every client without its own, or for one client."""
        self._control("POST", "/ttl", {"seconds": seconds, **({"client_id": client_id} if client_id else {})})

    # ----------------------------------------------------------------- direct token requests (Python)

    def _token(self, form: dict, headers: dict | None = None) -> Response:
        h = {"content-type": "application/x-www-form-urlencoded", "accept": "application/json"}
        h.update(headers or {})
        data = urllib.parse.urlencode({k: v for k, v in form.items() if v is not None}, doseq=True).encode()
        return http_request(self.port, "POST", "/token", h, data, timeout=15)

    def token_basic(self, client_id: str = BASIC_CLIENT, secret: str | None = None, **params) -> Response:
        secret = self.secrets[client_id] if secret is None else secret
        cred = f"{urllib.parse.quote(client_id, safe='')}:{urllib.parse.quote(secret, safe='')}"
        auth = "Basic " + base64.b64encode(cred.encode()).decode()
        return self._token({"grant_type": "client_credentials", **params}, {"authorization": auth})

    def token_post(self, client_id: str = POST_CLIENT, secret: str | None = None, **params) -> Response:
        secret = self.secrets[client_id] if secret is None else secret
        return self._token({"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret,
                            **params})

    def token_private_key_jwt(self, key: KeyFile, client_id: str = PKJWT_CLIENT, *, assertion: str | None = None,
                              **params) -> Response:
        assertion = assertion or client_assertion(key, client_id, self.token_url)
        return self._token({"grant_type": "client_credentials", "client_assertion_type": CLIENT_ASSERTION_TYPE,
                            "client_assertion": assertion, **params})

    def token_jwt_bearer(self, *, assertion: str | None = None, scope_in_assertion: str | None = None,
                         **params) -> Response:
        assertion = assertion or service_account_assertion(self.keys.service_account, SERVICE_ACCOUNT,
                                                           self.token_url, scope=scope_in_assertion)
        return self._token({"grant_type": JWT_BEARER_GRANT, "assertion": assertion, **params})

    def access_token(self, response: Response) -> str:
        if response.status != 200:
            raise HarnessError(f"{self.name} refused a token: {response}")
        return response.json()["access_token"]


# ------------------------------------------------------------------------------------ a stack of both

@dataclass
class UpstreamAuth:
    """An upstream AS and one fake token guard per tenant cluster (in front of that tenant's server)."""
    as_: UpstreamAs
    keys: UpstreamKeys
    guards: dict[str, FakeTokenGuard] = field(default_factory=dict)  # cluster name -> guard

    def cluster_ports(self) -> dict[str, int]:
        """Point Envoy's tenant clusters at the guards (not at the FHIR servers behind them)."""
        return {cluster: g.port for cluster, g in self.guards.items()}

    def clear(self) -> None:
        for g in self.guards.values():
            g.clear()
        self.as_.reset()


def start_guard(as_: UpstreamAs, audience: str, target_port: int, name: str | None = None) -> FakeTokenGuard:
    return FakeTokenGuard(name or f"fake-guard-{audience.split('//')[-1]}", issuer=as_.issuer,
                          jwks_url=as_.jwks_url, audience=audience, target_port=target_port).start()


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def upstream_keys(workdir) -> UpstreamKeys:
    return UpstreamKeys.generate(workdir / "upstream-keys")


@pytest.fixture(scope="session")
def start_upstream_as(workdir, upstream_keys):
    """Factory: start_upstream_as(name="upstream-as", token_ttl=300, clients=None, ...) -> running UpstreamAs
    (stopped at the end of the session, or earlier with .stop())."""
    started: list[UpstreamAs] = []
    names = set()

    def _start(name: str = "upstream-as", **kwargs) -> UpstreamAs:
        base, n = name, 1
        while name in names:  # one log/config file per instance
            n += 1
            name = f"{base}-{n}"
        names.add(name)
        as_ = UpstreamAs(workdir, upstream_keys, name=name, **kwargs)
        started.append(as_)
        try:
            return as_.start()
        except HarnessError as exc:
            pytest.fail(str(exc), pytrace=False)

    yield _start
    for a in started:
        a.stop()


@pytest.fixture(scope="module")
def upstream_as(request, start_upstream_as) -> UpstreamAs:
    """A fresh upstream AS with the default clients for each test module (token_ttl 300 s)."""
    as_ = start_upstream_as("upstream-as-" + request.module.__name__.rsplit(".", 1)[-1])
    yield as_
    as_.stop()


@pytest.fixture(scope="session")
def start_fake_token_guard():
    """Factory: start_fake_token_guard(as_, audience, target_port, name=None) -> running FakeTokenGuard."""
    started: list[FakeTokenGuard] = []

    def _start(as_: UpstreamAs, audience: str, target_port: int, name: str | None = None) -> FakeTokenGuard:
        try:
            g = start_guard(as_, audience, target_port, name)
        except GuardError as exc:
            pytest.fail(str(exc), pytrace=False)
        started.append(g)
        return g

    yield _start
    for g in started:
        g.stop()


@pytest.fixture(scope="module")
def upstream_auth(upstream_as, upstream_keys, upstreams, start_fake_token_guard) -> UpstreamAuth:
    """The module's upstream AS and fake guards for tenant_a (FHIR_A_AUDIENCE) and tenant_b (FHIR_B_AUDIENCE)
    in front of the session's recording upstreams. Envoy: cluster_ports() for tenant_a / tenant_b, and a
    cluster for the AS at upstream_as.port."""
    ua = UpstreamAuth(upstream_as, upstream_keys, {
        "tenant_a": start_fake_token_guard(upstream_as, FHIR_A_AUDIENCE, upstreams.tenant_a.port, "fake-guard-a"),
        "tenant_b": start_fake_token_guard(upstream_as, FHIR_B_AUDIENCE, upstreams.tenant_b.port, "fake-guard-b"),
    })
    yield ua
    for g in ua.guards.values():
        g.stop()
