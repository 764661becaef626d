#!/usr/bin/env python3
"""Soak test: minutes of mixed valid and hostile traffic against Envoy 1.40 running the shipped envoy/envoy.yaml.

Looks for slow leaks and VM crashes, not for speed. Envoy (2 workers by default) loads the built module with the
shipped configuration re-pointed at ephemeral ports, fetches the JWKS from the real test IdP (tests/idp), and
forwards to a separate Envoy that answers at once (direct_response). wrk processes, one keep-alive connection each,
send a shuffled mix of 16 kinds of request (valid tokens, many distinct and a few repeated; expired, garbage,
wrong-signature, oversized, unknown-kid tokens; no token; unknown tenant; /metadata; batch Bundles; writes) without
a break: a warm-up that fills the token caches, then the soak. Memory (Envoy's RSS, the filter's wasm linear
memory gauge, Envoy's heap) is read under load after the warm-up and at the end; VM reloads and crashes are
counted (Envoy's wasm stats, the Envoy log); every answer is checked against the status its kind must get.

    .venv/bin/python bench/soak.py                 # 10 minutes (make soak)
    .venv/bin/python bench/soak.py --minutes 2     # a short run; BENCHMARKS.md marks it SHORT

All on 127.0.0.1, ephemeral ports. Writes only its own section of BENCHMARKS.md, between
<!-- soak:begin --> and <!-- soak:end --> (appended if absent; the rest of the file is kept byte for byte).
Exit 0 when it ran (PASS or FAIL are the result; --strict: exit 3 on a FAIL), 1 when it could not run.
"""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import importlib.util
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(REPO / "tests"))

import harness  # noqa: E402  tests/e2e/harness.py: render_config, Idp, the demo tenants and clients
from harness import AUDIENCE, CLIENT_A, CLIENT_B, SHIPPED_CONFIG, TENANT_A, TENANT_B  # noqa: E402
from tokens import ES_KID, RS_KID, Minter, private_key  # noqa: E402
from upstream import capability_statement, tenant_bundle  # noqa: E402


def _load_bench():
    """bench/run.py as a module (process handling, Envoy on ephemeral ports, stats parsing, wrk)."""
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()
BenchError, log, wait_until = bench.BenchError, bench.log, bench.wait_until

OUT_DEFAULT = REPO / "BENCHMARKS.md"
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
PREFIX = "wasmcustom.fhir_tenant_router."   # the filter's stats; "fhir_tenant_router." for the dynamic module
BUILD = "wasm"                               # --build; main() sets these three for the dynamic module
LISTENER = "fhir_ingress"                    # stat_prefix of the shipped config's HCM
GROWTH_LIMIT = 0.05                          # target: under 5 % memory growth (wasm: V8's heap moves)
DM_RSS_GROWTH_LIMIT = 0.01                   # the dynamic module's target: Envoy's RSS grows under 1 %
TENANT_ECHO = "x-soak-upstream-tenant"       # the upstream echoes x-fhir-tenant-id (pre-check only)
AUTHZ_ECHO = "x-soak-upstream-authz"         # ... and Authorization (must never arrive)
PATIENT_ID = "e8690a7b-c733-5bba-b027-ccf8db547f3f"
UNKNOWN_TENANT = "0badc0de-0000-4000-8000-000000000000"
VM_EVENT_RE = re.compile(r"reload|crash|fail|created|restart|vm_count")
CRASH_PATTERNS = re.compile(r"panicked|Function: proxy_on_|wasm.*(crash|runtime error|trap)|Wasm VM failed|"
                            r"failed to (re)?load|unreachable|stack overflow", re.I)

# What each kind of request is and the one status it must get. Weights are requests per 100.
KINDS: dict[str, tuple[int, int, str]] = {
    # kind:            (weight, expected status, what)
    "valid-distinct":  (40, 200, "valid token, tenant A or B, each token used once per pass over a pool bigger "
                                 "than the caches (misses and evictions)"),
    "valid-repeated":  (21, 200, "a few valid tokens used again and again (IdP-issued and minted; cache hits)"),
    "search-post":     (3, 200, "POST /Patient/_search (form), repeated token"),
    "batch-read":      (2, 200, "POST / batch Bundle of GET entries"),
    "batch-write":     (1, 403, "POST / batch Bundle with a create entry (default read-only allowlist)"),
    "write":           (1, 403, "POST /Patient (create; read-only allowlist)"),
    "metadata":        (4, 200, "GET /metadata, no token (CapabilityStatement patched on the way back)"),
    "smart-config":    (1, 200, "GET /.well-known/smart-configuration, no token (answered by the filter)"),
    "unknown-tenant":  (3, 403, "valid signature, scope names no configured tenant"),
    "two-tenants":     (1, 403, "valid signature, scope names both tenants"),
    "expired":         (5, 401, "valid signature, exp an hour ago"),
    "garbage":         (5, 401, "not a JWT: random text, truncated tokens, alg none, Basic credentials"),
    "wrong-signature": (5, 401, "signed by another key claiming our kid, or a signature swapped in"),
    "no-token":        (5, 401, "no Authorization header"),
    "oversized":       (2, 401, "a token over max_token_bytes (9 to 24 KB)"),
    "unknown-kid":     (1, 401, "valid-looking token naming a kid the JWKS lacks (triggers a rate-limited "
                               "JWKS refetch)"),
}
assert sum(w for w, _, _ in KINDS.values()) == 100

SEARCH_PATHS = ["/Patient?family=smith&_count=10",
                f"/Observation?patient={PATIENT_ID}&category=vital-signs&_sort=-date&_count=3",
                f"/Patient/{PATIENT_ID}",
                "/Encounter?patient=x&_count=5"]

SOAK_LUA = r"""-- bench/soak.py: one connection per wrk process, so responses come back in request order and each
-- answer can be tallied under the kind of request that caused it, and under the phase (w = warm-up, s = soak).
-- args[1]: plan file, one request a line: kind TAB method TAB path TAB authorization TAB content-type TAB body
-- args[2]: where in the plan to start; args[3]: the Unix time at which the soak (after the warm-up) starts
local plan, n, i = {}, 0, 0
local pending = nil
local soak_at = 0
counts = {}
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then
      local f = {}
      for x in (line .. "\t"):gmatch("([^\t]*)\t") do f[#f + 1] = x end
      local headers = {["Accept"] = "application/fhir+json"}
      if f[4] ~= "" then headers["Authorization"] = f[4] end
      if f[5] ~= "" then headers["Content-Type"] = f[5] end
      local body = nil
      if f[6] ~= "" then body = f[6] end
      n = n + 1
      plan[n] = {kind = f[1], req = wrk.format(f[2], f[3], headers, body)}
    end
  end
  i = (tonumber(args[2]) or 0) % n
  soak_at = tonumber(args[3]) or 0
end

function request()
  i = i % n + 1
  pending = plan[i].kind
  return plan[i].req
end

function response(status, headers, body)
  local phase = "w"
  if os.time() >= soak_at then phase = "s" end
  local key = phase .. "|" .. (pending or "?") .. "|" .. status
  counts[key] = (counts[key] or 0) + 1
  pending = nil
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('SOAK_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
  for _, t in ipairs(threads) do
    local c = t:get("counts")
    if c then
      for k, v in pairs(c) do io.write(string.format("SOAK_COUNT %s %d\n", k, v)) end
    end
  end
end
"""


# ------------------------------------------------------------------------------------------------ upstream

def upstream_config() -> dict:
    """A separate Envoy answering everything at once (direct_response): the CapabilityStatement on /metadata,
    a batch-response Bundle on POST /, a searchset Bundle elsewhere. JSON, so the filter's body paths run."""
    fhir = {"header": {"key": "content-type", "value": "application/fhir+json"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
    echo = [{"header": {"key": TENANT_ECHO, "value": "%REQ(x-fhir-tenant-id)%"}},
            {"header": {"key": AUTHZ_ECHO, "value": "%REQ(authorization)%"}}, fhir]

    def direct(body: dict) -> dict:
        return {"direct_response": {"status": 200, "body": {"inline_string": json.dumps(body)}}}
    batch_response = {"resourceType": "Bundle", "type": "batch-response",
                      "entry": [{"response": {"status": "200 OK"}}, {"response": {"status": "200 OK"}}]}
    routes = [
        {"match": {"path": "/metadata"}, **direct(capability_statement("http://127.0.0.1"))},
        {"match": {"path": "/", "headers": [{"name": ":method", "string_match": {"exact": "POST"}}]},
         **direct(batch_response)},
        {"match": {"prefix": "/"}, **direct(tenant_bundle("soak", "/Patient"))},
    ]
    hcm = {"@type": bench.HCM, "stat_prefix": "upstream",
           "route_config": {"name": "r", "max_direct_response_body_size_bytes": 65536,
                            "response_headers_to_add": echo,
                            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
           # Like a real FHIR server, answer only once the whole request has arrived: the filter lets a Bundle's
           # headers go on while it judges the body, and resets the stream when it refuses the Bundle; an
           # upstream answering at the headers would race the refusal.
           "http_filters": [{"name": "envoy.filters.http.buffer", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
               "max_request_bytes": 1048576}}, bench.ROUTER]}
    return {"admin": bench.admin_block(), "static_resources": {"listeners": [{
        "name": "upstream", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}]}]}}


class SoakEnvoy(bench.Envoy):
    """bench/run.py's Envoy (ephemeral ports read back from the admin API), with a choice of worker count and
    the filter's own log lines (wasm:info) in the log for the crash grep."""

    def __init__(self, name: str, cfg: dict, workdir: Path, wasm: bool, concurrency: int,
                 env: dict[str, str] | None = None):
        super().__init__(name, cfg, workdir, wasm)
        self.concurrency = concurrency
        self.env = dict(os.environ, **env) if env else None

    def start(self, timeout: float = 180) -> "SoakEnvoy":
        self.proc = bench.spawn([bench.envoy_bin(), "-c", str(self.config_path), "--concurrency",
                                 str(self.concurrency), "--disable-hot-restart", "--admin-address-path",
                                 str(self.admin_path), "-l", "warning", "--component-log-level",
                                 "wasm:info,dynamic_modules:info"],
                                self.log_path, env=self.env)
        return self

    def rss_bytes(self) -> int:
        """VmRSS of the Envoy process, from /proc/<pid>/status."""
        self.check_alive()
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise BenchError("no VmRSS in /proc/<pid>/status")


# -------------------------------------------------------------------------------------------------- tokens

def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class Tokens:
    distinct: list[str] = field(default_factory=list)
    pools: dict[str, list[str]] = field(default_factory=dict)   # kind -> Authorization values ("" = none)


def make_tokens(idp: harness.Idp, n_distinct: int, ttl: int, rng: random.Random) -> Tokens:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    now = int(time.time())
    m = Minter(idp.issuer, AUDIENCE, now=now)
    keys = {"RS256": private_key(RS_KID), "ES256": private_key(ES_KID)}
    exp = now + ttl

    def tok(scope: str, alg: str = "RS256", **kw) -> str:
        kw.setdefault("exp", exp)
        return m.token(scope, alg=alg, key=kw.pop("key", keys[alg]), **kw)

    t0 = time.monotonic()
    t = Tokens()
    # Half RS256 (what the IdP signs with), half ES256; tenants alternate.
    t.distinct = [tok(TENANT_A if i % 2 == 0 else TENANT_B, "RS256" if i % 4 < 2 else "ES256", jti=f"soak-{i}")
                  for i in range(n_distinct)]
    if len(set(t.distinct)) != n_distinct:
        raise BenchError("distinct tokens are not distinct")
    bearer = lambda x: f"Bearer {x}"  # noqa: E731
    hot = [idp.access_token(CLIENT_A, TENANT_A) for _ in range(3)] + \
          [idp.access_token(CLIENT_B, TENANT_B) for _ in range(3)] + \
          [tok(TENANT_A, "ES256", jti="hot-a"), tok(TENANT_B, "ES256", jti="hot-b")]
    fresh_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fresh_ec = ec.generate_private_key(ec.SECP256R1())
    good = tok(TENANT_A, jti="swap-donor")
    wrong = [tok(TENANT_A, key=fresh_rsa, jti=f"w{i}") for i in range(8)] + \
            [tok(TENANT_B, "ES256", key=fresh_ec, jti=f"we{i}") for i in range(8)]
    # a valid header and payload with another valid token's signature
    wrong += [".".join(tok(TENANT_B, jti=f"s{i}").split(".")[:2] + [good.split(".")[2]]) for i in range(8)]
    garbage = ["x", "abc.def", "a.b.c", "...", "null", "Bearer", "eyJhbGciOiJSUzI1NiJ9",
               good[: len(good) // 2], good[:-10], good.replace(".", "", 1),
               m.unsigned_token(TENANT_A, exp=exp)]
    garbage += [".".join(b64u(rng.randbytes(rng.randint(1, 400))) for _ in range(3)) for _ in range(12)]
    garbage += ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~+/=")
                        for _ in range(rng.randint(1, 600))) for _ in range(12)]
    oversized = []
    for size in (9_000, 12_000, 16_000, 24_000):
        pad = b64u(rng.randbytes(size))
        oversized.append(good.split(".")[0] + "." + pad + "." + good.split(".")[2])
    t.pools = {
        "valid-repeated": [bearer(x) for x in hot],
        "search-post": [bearer(x) for x in hot],
        "batch-read": [bearer(x) for x in hot],
        "batch-write": [bearer(x) for x in hot],
        "write": [bearer(x) for x in hot],
        "metadata": [""],
        "smart-config": [""],
        "unknown-tenant": [bearer(tok(UNKNOWN_TENANT, "RS256" if i % 2 else "ES256", jti=f"u{i}"))
                           for i in range(16)],
        "two-tenants": [bearer(tok(f"{TENANT_A} {TENANT_B}", jti=f"tt{i}")) for i in range(4)],
        "expired": [bearer(tok(TENANT_A if i % 2 else TENANT_B, "RS256" if i % 3 else "ES256",
                               iat=now - 7200, exp=now - 3600, jti=f"e{i}")) for i in range(16)],
        "garbage": [bearer(x) for x in garbage] + ["Basic c29hazpzb2Fr", "Bearer ", "Token abc"],
        "wrong-signature": [bearer(x) for x in wrong],
        "no-token": [""],
        "oversized": [bearer(x) for x in oversized],
        "unknown-kid": [bearer(tok(TENANT_A, kid=f"soak-unknown-{i}", jti=f"k{i}")) for i in range(4)],
    }
    log(f"==> minted {n_distinct:,} distinct tokens + {sum(len(v) for v in t.pools.values())} others, "
        f"{len(hot)} of them repeated ({6} from the IdP), in {time.monotonic() - t0:.1f}s")
    return t


BATCH_READ = json.dumps({"resourceType": "Bundle", "type": "batch", "entry": [
    {"request": {"method": "GET", "url": "Patient?family=smith"}},
    {"request": {"method": "GET", "url": f"Observation?patient={PATIENT_ID}&_count=3"}}]}, separators=(",", ":"))
BATCH_WRITE = json.dumps({"resourceType": "Bundle", "type": "batch", "entry": [
    {"request": {"method": "GET", "url": "Patient?family=smith"}},
    {"request": {"method": "POST", "url": "Patient"}, "resource": {"resourceType": "Patient", "active": True}}]},
    separators=(",", ":"))
PATIENT = json.dumps({"resourceType": "Patient", "active": True}, separators=(",", ":"))


def request_of(kind: str, auth: str, k: int) -> tuple[str, str, str, str, str]:
    """(method, path, authorization, content-type, body) of the k-th request of a kind."""
    fj = "application/fhir+json"
    if kind == "search-post":
        return "POST", "/Patient/_search", auth, "application/x-www-form-urlencoded", "family=smith&_count=10"
    if kind == "batch-read":
        return "POST", "/", auth, fj, BATCH_READ
    if kind == "batch-write":
        return "POST", "/", auth, fj, BATCH_WRITE
    if kind == "write":
        return "POST", "/Patient", auth, fj, PATIENT
    if kind == "metadata":
        return "GET", "/metadata" if k % 2 else "/metadata?_format=json", "", "", ""
    if kind == "smart-config":
        return "GET", "/.well-known/smart-configuration", "", "", ""
    return "GET", SEARCH_PATHS[k % len(SEARCH_PATHS)], auth, "", ""


def write_plans(tokens: Tokens, processes: int, workdir: Path, rng: random.Random) -> list[Path]:
    """One plan per wrk process: blocks of 100 requests in the KINDS proportions, shuffled within each block.
    The distinct tokens are split between the processes, so each token appears once per pass of the whole."""
    slices = [tokens.distinct[p::processes] for p in range(processes)]
    w_distinct = KINDS["valid-distinct"][0]
    paths = []
    for p, mine in enumerate(slices):
        blocks = max(1, -(-len(mine) // w_distinct))
        lines, used, per_kind = [], 0, {k: 0 for k in KINDS}
        for _ in range(blocks):
            block = [k for k, (w, _, _) in KINDS.items() for _ in range(w)]
            rng.shuffle(block)
            for kind in block:
                n = per_kind[kind]
                per_kind[kind] += 1
                if kind == "valid-distinct":
                    auth = f"Bearer {mine[used % len(mine)]}"
                    used += 1
                else:
                    pool = tokens.pools[kind]
                    auth = pool[(n + p) % len(pool)]
                fields = (kind,) + request_of(kind, auth, n + p)
                if any("\t" in f or "\n" in f for f in fields):
                    raise BenchError(f"a {kind} request contains a tab or newline")
                lines.append("\t".join(fields))
        path = workdir / f"plan-{p}.tsv"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------- soak

@dataclass
class Snapshot:
    at: float
    rss: int
    vm_memory: int | None          # max of the gauge over the reads (see Soak.snapshot)
    vm_values: list[int]           # distinct values seen
    allocated: int | None
    heap_size: int | None
    cache_entries: int | None      # max over the reads: the fullest VM's cache
    cache_values: list[int]        # distinct values seen
    stats: dict[str, int]          # every stat, for deltas


@dataclass
class WrkRun:
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    counts: dict[tuple[str, str, int], int] = field(default_factory=dict)   # (phase w|s, kind, status) -> n
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    max_ms: float = 0.0

    def phase(self, ph: str) -> dict[tuple[str, int], int]:
        return {(k, st): n for (p, k, st), n in self.counts.items() if p == ph}


class Soak:
    def __init__(self, args):
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="fhir-soak-"))
        self.wrk = bench.ensure_wrk(not args.no_install)
        self.rng = random.Random(args.seed)
        self.idp: harness.Idp | None = None
        self.upstream: SoakEnvoy | None = None
        self.envoy: SoakEnvoy | None = None
        self.plans: list[Path] = []
        self.load_start = bench.loadavg()
        self.cache_capacity = 0
        self.run = WrkRun()
        self.samples: list[tuple[float, int, int | None, int | None, int]] = []
        self.first_snap: Snapshot | None = None    # idle, after start-up
        self.start_snap: Snapshot | None = None    # under load, right after the warm-up
        self.end_snap: Snapshot | None = None      # under load, just before the load stops
        self.idle_snap: Snapshot | None = None     # idle, after the load stopped
        self.soak_seconds = 0.0
        self.caches_full = False
        self.log_mark = 0
        (self.workdir / "soak.lua").write_text(SOAK_LUA)

    # --- set-up
    def setup(self) -> None:
        bench.MODULE.snapshot(self.workdir)
        if BUILD == "dynamic-module":
            bench.MODULE.snapshot_so(self.workdir)
        a = self.args
        self.upstream = SoakEnvoy("upstream", upstream_config(), self.workdir, wasm=False, concurrency=1)
        self.upstream.start().wait_ready()
        ttl = int(a.warmup + a.minutes * 60 + 3600)
        self.idp = harness.Idp(harness.free_port(), self.workdir, token_ttl=ttl).start()
        up = self.upstream.port
        cfg = harness.render_config(SHIPPED_CONFIG, listener_port=0, admin_port=0,
                                    cluster_ports={"idp": self.idp.port, "fhir_metadata": up, "tenant_a": up,
                                                   "tenant_b": up},
                                    wasm_path=bench.MODULE.path)
        self.cache_capacity = int(harness.plugin_json(cfg).get("token_cache_entries", 10_000))
        env = None
        if BUILD == "dynamic-module":
            env = harness.dynamic_module_env(cfg)
            cfg = harness.as_dynamic_module(cfg, bench.MODULE.so_path)
        self.envoy = SoakEnvoy("envoy", cfg, self.workdir, wasm=BUILD == "wasm", concurrency=a.workers,
                               env=env).start().wait_ready()
        log(f"==> Envoy ({a.workers} workers, shipped envoy/envoy.yaml on port {self.envoy.port}, admin "
            f"{self.envoy.admin_port}), IdP :{self.idp.port}, upstream :{up}; work dir {self.workdir}")
        self.tokens = make_tokens(self.idp, a.distinct_tokens, ttl, self.rng)
        self.plans = write_plans(self.tokens, a.connections, self.workdir, self.rng)

    def precheck(self) -> None:
        """Every request of every pool gets the status its kind expects, before any load: the expectations
        are right and the stack works. The first valid token is retried until the JWKS has been fetched."""
        e = self.envoy
        hot = self.tokens.pools["valid-repeated"][0]
        wait_until(lambda: harness.http_request(e.port, "GET", SEARCH_PATHS[0], {"authorization": hot}).status
                   == 200, 30, "a valid token to get 200 (JWKS fetched)")
        for tok, tenant in ((self.tokens.distinct[0], TENANT_A), (self.tokens.distinct[1], TENANT_B)):
            r = harness.http_request(e.port, "GET", SEARCH_PATHS[0], {"authorization": f"Bearer {tok}"})
            if r.status != 200 or r.header(TENANT_ECHO) != tenant or r.header(AUTHZ_ECHO):
                raise BenchError(f"pre-check: a token for {tenant} got {r.status}, upstream saw tenant "
                                 f"{r.header(TENANT_ECHO)!r}, authorization {bool(r.header(AUTHZ_ECHO))}")
        bad = []
        checked = 0
        for kind, (_, expect, _) in KINDS.items():
            pool = [f"Bearer {x}" for x in self.tokens.distinct[:8]] if kind == "valid-distinct" \
                else self.tokens.pools[kind]
            for k, auth in enumerate(pool):
                method, path, auth, ctype, body = request_of(kind, auth, k)
                hdrs = {"authorization": auth} if auth else {}
                if ctype:
                    hdrs["content-type"] = ctype
                checked += 1
                try:
                    r = harness.http_request(e.port, method, path, hdrs, body.encode() if body else None)
                except OSError as exc:
                    bad.append(f"{kind} #{k}: {method} {path}: no answer ({exc!r}), expected {expect}")
                    continue
                if r.status != expect:
                    bad.append(f"{kind} #{k}: {method} {path} got {r.status}, expected {expect}: {r.body[:160]!r}")
        r = harness.http_request(e.port, "GET", "/metadata")
        if "oauth-uris" not in r.body.decode(errors="replace"):
            bad.append("/metadata came back without the SMART oauth-uris extension: the body was not patched")
        if bad:
            raise BenchError("pre-check failed:\n  " + "\n  ".join(bad))
        log(f"==> pre-check: {checked} requests, each kind got its expected status; tenants routed; "
            "/metadata patched")

    # --- measurement helpers
    def snapshot(self, reads: int = 25, every: float = 0.137) -> Snapshot:
        """The filter's gauges are one stat per name shared by every VM of the plugin (each worker's, and the
        main thread's, which validated the configuration and ticks too, without traffic); each VM sets them
        every 500 ms, so a read shows the last writer. `reads` reads `every` seconds apart (a period that
        walks across the 500 ms tick) see every VM; the max is the biggest VM, the fullest cache."""
        vm, entries = set(), set()
        s: dict[str, int] = {}
        for i in range(reads):
            if i:
                time.sleep(every)
            s = self.envoy.stats()
            if (v := s.get(PREFIX + "vm.memory_bytes")) is not None:
                vm.add(v)
            if (c := s.get(PREFIX + "cache.entries")) is not None:
                entries.add(c)
        return Snapshot(time.monotonic(), self.envoy.rss_bytes(), max(vm) if vm else None, sorted(vm),
                        s.get("server.memory_allocated"), s.get("server.memory_heap_size"),
                        max(entries) if entries else None, sorted(entries), s)

    def sample(self, t0: float) -> None:
        """One point of the time series: a short snapshot (5 reads span a tick period, so the VM gauge's max
        is the biggest VM's)."""
        sn = self.snapshot(reads=5)
        self.samples.append((time.monotonic() - t0, sn.rss, sn.vm_memory, sn.allocated,
                             sn.stats.get(f"http.{LISTENER}.downstream_rq_total", 0)))

    def sleep_until(self, deadline: float, t0: float, procs) -> None:
        """Sleep until `deadline` (monotonic), taking a sample every --sample-s and printing one a minute;
        fail early if Envoy or a wrk process died."""
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, self.args.sample_s))
            self.envoy.check_alive()
            for p, proc, out in procs:
                if proc.poll() is not None and time.monotonic() < deadline - 1:
                    raise BenchError(f"wrk {p} stopped early ({proc.returncode}):\n"
                                     + out.read_text(errors="replace")[-2000:])
            try:
                self.sample(t0)
            except Exception as exc:  # noqa: BLE001 - a failed sample is reported, the run goes on
                log(f"!!! sample failed: {exc!r}")
                continue
            el, rss, vm, alloc, rq = self.samples[-1]
            if len(self.samples) == 1 or int(el // 60) != int(self.samples[-2][0] // 60):
                log(f"    {el / 60:4.1f} min: RSS {mib(rss)}, VM {mib(vm)} (max over VMs), allocated {mib(alloc)}, "
                    f"{rq:,} requests so far")

    def run_load(self) -> None:
        """One wrk run per connection for warm-up and soak without a break (the load never stops between the
        start and end readings, which are both taken under it)."""
        a = self.args
        soak_s = int(round(a.minutes * 60))
        total = a.warmup + soak_s + 8
        now_wall, now = time.time(), time.monotonic()
        soak_at_wall = int(now_wall + a.warmup) + 1         # the Lua scripts tally answers from then on as soak
        soak_at = now + (soak_at_wall - now_wall)
        procs = []
        for p, plan in enumerate(self.plans):
            out = self.workdir / f"wrk-{p}.out"
            cmd = [self.wrk, "-t1", "-c1", f"-d{total}s", "--timeout", "10s", "-s", str(self.workdir / "soak.lua"),
                   f"http://127.0.0.1:{self.envoy.port}/", "--", str(plan), str(p * 997), str(soak_at_wall)]
            procs.append((p, bench.spawn(cmd, out), out))
        log(f"==> load: {len(procs)} wrk processes x 1 connection; warm-up {a.warmup}s, then the soak, "
            f"{a.minutes:g} min")
        self.sleep_until(soak_at, now, procs)
        self.start_snap = self.snapshot()
        self.log_mark = self.log_size()
        if BUILD == "dynamic-module":  # one gauge, the sum over the workers' caches
            full = (self.start_snap.cache_entries or 0) >= self.cache_capacity * self.args.workers
        else:
            full = self.start_snap.cache_entries is not None and self.start_snap.cache_entries >= self.cache_capacity \
                and not [c for c in self.start_snap.cache_values if 0 < c < self.cache_capacity]
        self.caches_full = full
        log(f"==> start (after warm-up, under load): RSS {mib(self.start_snap.rss)}, VM {mib(self.start_snap.vm_memory)} "
            f"(values seen {self.start_snap.vm_values}), allocated {mib(self.start_snap.allocated)}, "
            f"cache.entries seen {self.start_snap.cache_values}")
        if not full:
            log("!!! not every token cache seen is full after the warm-up: memory growth may include filling them "
                "(longer --warmup)")
        self.sleep_until(soak_at + soak_s - 5, now, procs)
        self.end_snap = self.snapshot()
        self.soak_seconds = self.end_snap.at - self.start_snap.at
        log(f"==> end (under load): RSS {mib(self.end_snap.rss)}, VM {mib(self.end_snap.vm_memory)} "
            f"(values seen {self.end_snap.vm_values}), allocated {mib(self.end_snap.allocated)}")
        for p, proc, out in procs:
            try:
                rc = proc.wait(timeout=max(5.0, now + total - time.monotonic()) + 60)
            except Exception as exc:  # noqa: BLE001
                raise BenchError(f"wrk {p} did not finish: {exc!r}")
            finally:
                bench.stop(proc)
            text = out.read_text(errors="replace")
            m = re.search(r"^SOAK_JSON (\{.*\})$", text, re.M)
            if rc != 0 or not m:
                raise BenchError(f"wrk {p} failed ({rc}):\n{text[-3000:]}")
            j = json.loads(m.group(1))
            r = self.run
            r.requests += j["requests"]
            for k in ("connect", "read", "write", "timeout"):
                r.errors[k] = r.errors.get(k, 0) + j[k]
            r.p50_ms.append(j["p50_us"] / 1000)
            r.p99_ms.append(j["p99_us"] / 1000)
            r.max_ms = max(r.max_ms, j["max_us"] / 1000)
            for km in re.finditer(r"^SOAK_COUNT ([ws])\|(\S+)\|(\d+) (\d+)$", text, re.M):
                key = (km.group(1), km.group(2), int(km.group(3)))
                r.counts[key] = r.counts.get(key, 0) + int(km.group(4))
        self.envoy.check_alive()
        time.sleep(1.2)  # the filter hands its counts to Envoy every 500 ms
        self.idle_snap = self.snapshot()

    def log_size(self) -> int:
        return self.envoy.log_path.stat().st_size if self.envoy.log_path.exists() else 0

    def crash_lines(self) -> list[str]:
        """Lines of the Envoy log from the start reading on that speak of a panic, a trap or a failed VM. Read
        line by line: the shipped config's access log writes one line per request into the same log."""
        out = []
        if self.envoy.log_path.exists():
            with open(self.envoy.log_path, "rb") as f:
                f.seek(self.log_mark)
                for raw in f:
                    line = raw.decode("utf-8", "replace")
                    if CRASH_PATTERNS.search(line):
                        out.append(line.rstrip())
        return out

    def execute(self) -> None:
        self.setup()
        self.first_snap = self.snapshot(reads=10)
        self.precheck()
        self.run_load()

    def close(self, keep: bool) -> None:
        if self.idp:
            self.idp.stop()
        bench.stop_all()
        if keep:
            log(f"==> logs and configs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- report

def mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.2f} MiB"


def growth(a: int | None, b: int | None) -> float | None:
    return None if not a or b is None else (b - a) / a


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:+.2f} %"


def vm_events(s0: dict[str, int], s1: dict[str, int]) -> dict[str, int]:
    """Envoy's own wasm stats (not the filter's) that moved and speak of reloads, crashes, failures or new VMs."""
    out = {}
    for k, v in s1.items():
        if k.startswith("wasmcustom.") or "wasm" not in k:
            continue
        if VM_EVENT_RE.search(k):
            d = v - s0.get(k, 0)
            if d:
                out[k] = d
    return out


def report(s: Soak, started: float) -> tuple[str, list[tuple[bool, str]]]:
    a = s.args
    st0, st1 = s.start_snap, s.end_snap
    d = lambda k: st1.stats.get(k, 0) - st0.stats.get(k, 0)  # noqa: E731
    events = vm_events(st0.stats, s.idle_snap.stats)
    reloads = {k: v for k, v in events.items() if "fail" not in k}
    failures = {k: v for k, v in events.items() if "fail" in k}
    crash_lines = s.crash_lines()
    expected = {k: e for k, (_, e, _) in KINDS.items()}
    soak_counts, warm_counts = s.run.phase("s"), s.run.phase("w")
    by_kind: dict[str, dict[int, int]] = {}
    for (kind, status), n in soak_counts.items():
        by_kind.setdefault(kind, {})[status] = n
    tallied = sum(soak_counts.values())
    unexpected = sum(n for (kind, status), n in soak_counts.items() if expected.get(kind) != status)
    warm_unexpected = sum(n for (kind, status), n in warm_counts.items() if expected.get(kind) != status)
    sock_err = sum(s.run.errors.values())
    rq = {c: d(f"http.{LISTENER}.downstream_rq_{c}") for c in ("2xx", "3xx", "4xx", "5xx")}
    g_rss, g_vm, g_alloc = growth(st0.rss, st1.rss), growth(st0.vm_memory, st1.vm_memory), \
        growth(st0.allocated, st1.allocated)
    checks: list[tuple[bool, str]] = []
    dm = BUILD == "dynamic-module"
    limits = ((("Envoy RSS", g_rss, DM_RSS_GROWTH_LIMIT), ("server.memory_allocated", g_alloc, GROWTH_LIMIT)) if dm
              else (("Envoy RSS", g_rss, GROWTH_LIMIT), ("wasm VM memory (max over VMs)", g_vm, GROWTH_LIMIT),
                    ("server.memory_allocated", g_alloc, GROWTH_LIMIT)))
    for name, g, limit in limits:
        checks.append((g is not None and g < limit, f"{name} growth {pct(g)} over the soak (target: under {limit:.0%})"))
    if dm:
        panics = d(PREFIX + "panics")
        checks.append((panics == 0 and not crash_lines and s.envoy.proc.poll() is None,
                       f"panics caught in the module: {panics} (`panics`), crash lines in the Envoy log "
                       f"{len(crash_lines)}, Envoy {'running' if s.envoy.proc.poll() is None else 'EXITED'} "
                       "(target: zero, running)"))
    else:
        checks.append((not events and not crash_lines,
                       f"VM reloads/crashes: {sum(reloads.values())} (Envoy's wasm stats on reloads, crashes, "
                       f"failures, VMs created: {events or 'unchanged'}), crash lines in the Envoy log "
                       f"{len(crash_lines)} (target: zero)"))
    checks.append((unexpected == 0 and warm_unexpected == 0 and rq["5xx"] == 0 and tallied > 0,
                   f"answers: {tallied:,} in the soak (+{sum(warm_counts.values()):,} in the warm-up), "
                   f"{unexpected + warm_unexpected:,} not the status their kind expects, Envoy 5xx "
                   f"{rq['5xx']:,} (target: zero)"))
    checks.append((sock_err == 0, f"wrk socket errors/timeouts: {s.run.errors} (target: zero)"))
    verifs = d(PREFIX + "signature.host") + d(PREFIX + "signature.pure_rust")
    hits, misses = d(PREFIX + "cache.hits"), d(PREFIX + "cache.misses")

    lines: list[str] = []
    P = lines.append
    short = a.minutes < 10
    P(BEGIN)
    P("## Soak" + (" (dynamic module)" if dm else ""))
    P("")
    P(f"**{'SHORT ' if short else ''}run of {a.minutes:g} min** — generated by `bench/soak.py"
      f"{f' --minutes {a.minutes:g}' if a.minutes != 10 else ''}{' --build dynamic-module' if dm else ''}` "
      "(`make soak`); only this section is rewritten "
      "by a soak run." + (" Too short to judge slow leaks: run `make soak` (10 min)." if short else ""))
    P("")
    P("| | |")
    P("|---|---|")
    P(f"| date (UTC) | {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M')} |")
    P(f"| machine | {bench.cpu_model()} × {os.cpu_count()} (shared); load average at start {s.load_start}, "
      f"at end {bench.loadavg()} |")
    P(f"| Envoy | {bench.envoy_version()}, `--concurrency {a.workers}` "
      f"({'a router and a token cache per worker' if dm else 'a VM and a token cache per worker'}), "
      f"the shipped `envoy/envoy.yaml` on ephemeral ports; JWKS from the real test IdP (`tests/idp`, refetched "
      f"every 300 s); upstream: a separate Envoy (direct_response, JSON bodies) |")
    built = bench.SO if dm else bench.WASM
    wasm = built.relative_to(REPO) if built.is_relative_to(REPO) else built
    src = (f"working tree {bench.git_describe()}" if built.is_relative_to(REPO)
           else "set by $FHIR_TENANT_ROUTER_WASM/_SO, built outside this working tree")
    size, sha = (bench.MODULE.so_size, bench.MODULE.so_sha256) if dm else (bench.MODULE.size, bench.MODULE.sha256)
    P(f"| module | `{wasm}` {size:,} bytes, sha256 {sha[:12]}…; source: {src} |")
    P(f"| load | {a.connections} wrk {bench.wrk_version(s.wrk)} processes × 1 keep-alive connection each, closed "
      f"loop (as fast as Envoy answers), without a break from warm-up to end; {a.distinct_tokens:,} distinct "
      f"valid tokens (RS256/ES256, tenants A/B), split between the connections, each connection cycling more "
      f"tokens than a worker's cache holds ({s.cache_capacity:,}) |")
    cx = {}
    for k in st1.stats:
        if (m := re.match(r"^listener\..*\.worker_(\d+)\.downstream_cx_total$", k)):
            cx[int(m.group(1))] = d(k)
    P(f"| connections in the soak | {sum(cx.values()):,} opened ("
      + ", ".join(f"worker {w}: {n:,}" for w, n in sorted(cx.items()))
      + "): Envoy closes the connection after refusing a request whose body it has not read (the `write` "
      "kind), and wrk reconnects; the kernel spreads connections over the workers |")
    P(f"| warm-up | {a.warmup}s; after it the token caches held {st0.cache_values} entries (values seen; "
      f"{'full' if s.caches_full else 'NOT all full: growth includes filling them'}) |")
    P(f"| soak | {s.soak_seconds:.0f}s between the start and end readings; {tallied:,} answers "
      f"({tallied / max(s.soak_seconds, 1):,.0f}/s); wrk over the whole run: p50 {statistics.median(s.run.p50_ms):.2f} ms, "
      f"p99 {statistics.median(s.run.p99_ms):.2f} ms (median over connections), max {s.run.max_ms:.0f} ms |")
    P(f"| token work in the soak | {verifs:,} signature verifications, cache {hits:,} hits / {misses:,} misses |")
    P(f"| wall time | {(time.monotonic() - started) / 60:.1f} min |")
    P("")
    P("### Targets")
    P("")
    P("```")
    for ok, text in checks:
        P(f"{'PASS' if ok else 'FAIL'}  {text}")
    P("```")
    P("")
    P("### Memory")
    P("")
    P("Start and end are read under load (it runs without a break from the warm-up to the end); the growth "
      "targets compare them. " + ("The dynamic module has no VM; `cache.entries` is the sum over the workers' "
                                  "caches. " if dm else "") +
      "The filter's gauges are one stat per name that every VM of the plugin sets every 500 ms (each worker's, "
      "and the main thread's, which checked the configuration and has no traffic): 25 reads 137 ms apart see "
      "each VM, the max is shown, and the values seen in brackets. The wasm linear memory never shrinks.")
    P("")
    P("| | after start-up (idle) | start: after the warm-up | end | change start → end | after the load (idle) |")
    P("|---|---:|---:|---:|---:|---:|")
    f0, ix = s.first_snap, s.idle_snap
    vm = lambda sn: f"{mib(sn.vm_memory)} ({', '.join(f'{v / 2**20:.2f}' for v in sn.vm_values)})"  # noqa: E731
    rows = (("Envoy RSS (VmRSS)", mib(f0.rss), mib(st0.rss), mib(st1.rss), pct(g_rss), mib(ix.rss)),
            ("wasm VM memory (`vm.memory_bytes`)", vm(f0), vm(st0), vm(st1), pct(g_vm), vm(ix)),
            ("`server.memory_allocated`", mib(f0.allocated), mib(st0.allocated), mib(st1.allocated), pct(g_alloc),
             mib(ix.allocated)),
            ("`server.memory_heap_size`", mib(f0.heap_size), mib(st0.heap_size), mib(st1.heap_size),
             pct(growth(st0.heap_size, st1.heap_size)), mib(ix.heap_size)),
            ("token cache entries (`cache.entries`, values seen)", f0.cache_values, st0.cache_values,
             st1.cache_values, "", ix.cache_values))
    for row in rows:
        P("| " + " | ".join(str(x) for x in row) + " |")
    P("")
    if s.samples:
        P("Under load, about every minute from the start of the warm-up (VM memory: the max of 5 reads, which "
          "can miss the worker VMs and show the idle main-thread VM; the 25-read table above is the one to judge):")
        P("")
        P("| min | RSS | VM memory | memory_allocated | requests |")
        P("|---:|---:|---:|---:|---:|")
        picked = []
        for smp in s.samples:
            if not picked or int(smp[0] // 60) != int(picked[-1][0] // 60):
                picked.append(smp)
        if picked[-1] is not s.samples[-1]:
            picked.append(s.samples[-1])
        base = s.first_snap.stats.get(f"http.{LISTENER}.downstream_rq_total", 0)
        for el, rss, vmb, alloc, n in picked:
            P(f"| {el / 60:.1f} | {mib(rss)} | {mib(vmb)} | {mib(alloc)} | {n - base:,} |")
        P("")
    P("### Traffic and answers (soak phase)")
    P("")
    P("Each wrk process has one connection, so every answer is tallied under the kind of request that caused "
      "it. Every process interleaves all kinds (blocks of 100 requests in these shares, shuffled). Tallied "
      "from the end of the warm-up until wrk stopped, a few seconds more than the window of Envoy's counters "
      "below (start reading to end reading).")
    P("")
    P("| kind | share | expected | answers (status: count) | unexpected |")
    P("|---|---:|---:|---|---:|")
    for kind, (w, e, what) in KINDS.items():
        got = by_kind.get(kind, {})
        bad = sum(n for st, n in got.items() if st != e)
        P(f"| **{kind}**: {what} | {w} % | {e} | "
          f"{', '.join(f'{st}: {n:,}' for st, n in sorted(got.items())) or '-'} | {bad:,} |")
    other = {k: v for k, v in by_kind.items() if k not in KINDS}
    if other:
        P(f"| (unattributed) | | | {other} | |")
    P("")
    P(f"Envoy's listener between the start and end readings: 2xx {rq['2xx']:,}, 3xx {rq['3xx']:,}, "
      f"4xx {rq['4xx']:,}, 5xx {rq['5xx']:,}.")
    P("")
    fs = sorted((k[len(PREFIX):], d(k)) for k in st1.stats if k.startswith(PREFIX) and not k.endswith(
        ("vm.memory_bytes", "cache.entries", "jwks.keys")) and d(k))
    if fs:
        P("The filter's counters over the same window: " + ", ".join(f"`{k}` {v:,}" for k, v in fs) + ".")
        P("")
    P("Envoy's wasm stats that speak of reloads, crashes, failures or new VMs (`" + VM_EVENT_RE.pattern
      + "`) and moved from the start reading to after the load: "
      + (", ".join(f"`{k}` +{v}" for k, v in events.items()) if events else "none") + ". "
      f"Envoy log lines from the start reading on that match `{CRASH_PATTERNS.pattern}`: {len(crash_lines)}"
      + (f" (first: `{crash_lines[0][:200]}`)" if crash_lines else "") + ".")
    P("")
    P("Reproduce: `make build && .venv/bin/python bench/soak.py` (or `make soak`); `--help` lists the knobs.")
    P(END)
    return "\n".join(lines) + "\n", checks


def write_section(out: Path, section: str) -> None:
    """Replace the text between the soak markers, or append the section; nothing else in the file changes."""
    text = out.read_text(encoding="utf-8") if out.exists() else ""
    i, j = text.find(BEGIN), text.find(END)
    if i >= 0 and j > i:
        new = text[:i] + section.rstrip("\n") + text[j + len(END):]
    else:
        new = text + ("" if not text or text.endswith("\n\n") else "\n" if text.endswith("\n") else "\n\n") + section
    out.write_text(new, encoding="utf-8")


# --------------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10, help="length of the soak (default 10)")
    p.add_argument("--build", choices=("wasm", "dynamic-module"), default="wasm",
                   help="the build under test (default wasm; dynamic-module: target/dynamic-module/*.so, its own "
                        "section of the report)")
    p.add_argument("--workers", type=int, default=2, help="Envoy --concurrency (default 2: two VMs, two caches)")
    p.add_argument("--connections", type=int, default=6,
                   help="wrk processes, one connection each (default 6)")
    p.add_argument("--distinct-tokens", type=int, default=66_000,
                   help="distinct valid tokens, split between the connections (default 66000: 11000 per "
                        "connection, more than a worker's 10000-entry cache, so they always miss)")
    p.add_argument("--warmup", type=int, default=60,
                   help="seconds of load before the start reading (default 60: fills every worker's cache)")
    p.add_argument("--sample-s", type=float, default=5, help="seconds between memory samples (default 5)")
    p.add_argument("--seed", type=int, default=20261126, help="seed of the traffic plan")
    p.add_argument("--out", type=Path, default=OUT_DEFAULT, help="report file (default BENCHMARKS.md)")
    p.add_argument("--no-write", action="store_true", help="print only, do not touch the report file")
    p.add_argument("--strict", action="store_true", help="exit 3 if a target FAILs (default: report only)")
    p.add_argument("--no-install", action="store_true", help="never apt-get install wrk")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs, plans and logs")
    a = p.parse_args(argv)
    if a.minutes <= 0 or a.minutes > 24 * 60:
        p.error("--minutes must be in (0, 1440]")
    if not 1 <= a.connections <= 64 or not 1 <= a.workers <= 16:
        p.error("--connections must be 1..64 and --workers 1..16")
    if a.distinct_tokens < 100:
        p.error("--distinct-tokens must be at least 100")
    if a.warmup < 5:
        p.error("--warmup must be at least 5 seconds")
    return a


def main(argv: list[str]) -> int:
    global BUILD, PREFIX, BEGIN, END
    args = parse_args(argv)
    if args.build == "dynamic-module":
        BUILD, PREFIX = "dynamic-module", harness.DM_STATS_PREFIX
        BEGIN, END = "<!-- soak-dynamic-module:begin -->", "<!-- soak-dynamic-module:end -->"
    started = time.monotonic()
    try:
        s = Soak(args)
    except BenchError as e:
        print(f"soak: {e}", file=sys.stderr)
        return 1
    ok = False
    try:
        s.execute()
        text, checks = report(s, started)
        print("\n" + text)
        if not args.no_write:
            write_section(args.out, text)
            log(f"==> wrote the Soak section of {args.out}")
        ok = True
        failed = [c for c in checks if not c[0]]
        log(f"==> {len(failed)} of {len(checks)} targets FAIL" if failed else "==> all targets PASS")
        return 3 if (failed and args.strict) else 0
    except (BenchError, harness.HarnessError) as e:
        print(f"\nsoak: {e}", file=sys.stderr)
        return 1
    finally:
        s.close(keep=args.keep_workdir or not ok)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
