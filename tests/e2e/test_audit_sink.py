"""The batched FHIR audit sink (`audit_sink`, issue 27) through real Envoy 1.40, in the build under test
(--build wasm / dynamic-module): each request's IHE BALP AuditEvent posted, per tenant, in FHIR `batch` Bundles
to a real FHIR engine (tests/fhir/server.mjs, Medplum), one engine per tenant through `{tenant}` in the sink's
URI (a plain Envoy in front routes `/<tenant id>...` to that tenant's engine). The events the
engines stored are read back and checked like the access log's (test_balp_audit_events.py: the BALP profile
checks and @medplum/core's validateResource).

An outage: the sink's cluster pointed at a port that accepts and never answers, then at one that refuses
connections. Every request still gets its normal answer, with a client timeout far below the sink's; the drop
counters are what `queue_size` implies; once the server is back, events are delivered again.
"""
from __future__ import annotations

import json
import re
import socket
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fhir"))

from conftest import Stack, stop_envoy, wait_for_jwks  # noqa: E402
from engine import FhirEngine  # noqa: E402
from harness import SHIPPED_CONFIG, TENANT_A, TENANT_B, Envoy, free_port, load_yaml, wait_until  # noqa: E402
from test_balp_audit_events import BALP, balp_problems, r4_validate  # noqa: E402
from tokens import Minter  # noqa: E402

ORG = "urn:fhir-tenant-router:tenant"


def _cluster(name: str, port: int) -> dict:
    return {"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


def _config(sink_port: int) -> dict:
    """The shipped config, plus the sink's cluster (`audit_sink` -> `sink_port`)."""
    cfg = load_yaml(SHIPPED_CONFIG)
    cfg["static_resources"]["clusters"].append(_cluster("audit_sink", sink_port))
    return cfg


def _front(workdir, engines: dict[str, int]) -> Envoy:
    """A plain Envoy (no filter of ours) in front of the tenants' engines: `/<tenant id>...` to that tenant's."""
    port, admin = free_port(), free_port()
    routes = [{"match": {"prefix": f"/{t}"}, "route": {"cluster": f"audit_{t}", "timeout": "30s"}} for t in engines]
    cfg = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "audit_front",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                                 "HttpConnectionManager",
                        "stat_prefix": "audit_front",
                        "route_config": {"virtual_hosts": [{"name": "audit", "domains": ["*"], "routes": routes}]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}],
            "clusters": [_cluster(f"audit_{t}", p) for t, p in engines.items()],
        },
    }
    return Envoy(cfg, workdir, "envoy-audit-front", port, admin, build="none").start()


def _sink(**over) -> callable:
    def plugin(doc):
        doc["audit_sink"] = {"cluster": "audit_sink", "uri": "http://audit.test/{tenant}", "batch_size": 3,
                             "queue_size": 50, "flush_interval_ms": 200, "timeout_ms": 3000, "attempts": 3,
                             "backoff_ms": 100, "max_backoff_ms": 400, **over}
    return plugin


def stored(engine: FhirEngine) -> list[dict]:
    with urllib.request.urlopen(f"{engine.base_url}/AuditEvent?_count=1000", timeout=10) as r:
        bundle = json.load(r)
    return [e["resource"] for e in bundle.get("entry", [])]


def orgs(event: dict) -> list[str]:
    return [a["who"]["identifier"]["value"] for a in event["agent"]
            if a.get("who", {}).get("identifier", {}).get("system") == ORG]


def moved(env, before: dict, name: str) -> int:
    return env.router_stats().get(name, 0) - before.get(name, 0)


@pytest.fixture(scope="module")
def engines(workdir):
    started = {t: FhirEngine(f"audit-{t[:8]}", workdir, base_path=f"/{t}").start() for t in (TENANT_A, TENANT_B)}
    yield started
    for e in started.values():
        e.stop()


@pytest.fixture(scope="module")
def sink_stack(start_envoy, idp, upstreams, engines, workdir) -> Stack:
    front = _front(workdir, {t: e.port for t, e in engines.items()})
    env = start_envoy("envoy-audit-sink", {"idp": idp.port, **upstreams.cluster_ports()}, base=_config(front.port),
                      plugin=_sink())
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    yield Stack(env, upstreams, minter, idp)
    stop_envoy(env)
    front.stop()


def test_a_patients_app_session_lands_in_each_tenants_own_fhir_store_as_valid_balp_events(sink_stack, engines):
    stack = sink_stack
    env = stack.envoy
    # The readiness check's request (wait_for_jwks) made an event of its own: delivered before the baseline.
    wait_until(lambda: env.router_stat("audit_sink.delivered") >= 1, 10, "the readiness request's event delivered")
    before = env.settled_router_stats()
    already = {t: {e["id"] for e in stored(eng)} for t, eng in engines.items()}
    token, token_b = stack.minter.token(TENANT_A), stack.minter.token(TENANT_B)
    bundle = {"resourceType": "Bundle", "type": "batch",
              "entry": [{"request": {"method": "GET", "url": "Patient/p-secret-1"}}]}
    session = [
        ("GET", "/metadata", None, None, 200),
        ("GET", "/Patient?name=Zzyzx&birthdate=1970-01-01", token, None, 200),
        ("GET", "/Patient/p-secret-1", token, None, 200),
        ("GET", "/Patient/p-secret-1/_history/1", token, None, 200),
        ("GET", "/Patient/p-secret-1/Observation?code=Zzyzx", token, None, 200),
        ("POST", "/Patient", token, b'{"resourceType":"Patient"}', 403),
        ("GET", "/Patient", None, None, 401),
        ("POST", "/", token, json.dumps(bundle).encode(), 200),
        ("GET", "/Patient/b-secret-2", token_b, None, 200),
        ("GET", "/Observation?code=Zzyzx", token_b, None, 200),
    ]
    for method, path, tok, body, status in session:
        headers = {"content-type": "application/fhir+json"} if body else None
        r = stack.get(path, tok, headers=headers, method=method, body=body)
        assert r.status == status, (method, path, r)
    want = {TENANT_A: 6, TENANT_B: 2}

    def landed():
        now = {t: [e for e in stored(eng) if e["id"] not in already[t]] for t, eng in engines.items()}
        return now if all(len(now[t]) >= n for t, n in want.items()) else None

    events = wait_until(landed, 30, "the session's AuditEvents in the tenants' FHIR stores",
                        on_timeout=lambda: json.dumps(env.router_stats()) + "\n" + env.log_tail())
    assert {t: len(v) for t, v in events.items()} == want
    # Each store holds only its own tenant's events (the tenant is the Organization agent).
    for tenant, evs in events.items():
        assert [orgs(e) for e in evs] == [[tenant]] * len(evs), (tenant, evs)
    a = sorted(events[TENANT_A], key=lambda e: e["recorded"])
    subtypes = sorted(e["subtype"][0]["code"] for e in a)
    assert subtypes == sorted(["search", "read", "vread", "search", "create", "batch"]), subtypes
    assert sorted(e["subtype"][0]["code"] for e in events[TENANT_B]) == ["read", "search"]
    everything = events[TENANT_A] + events[TENANT_B]
    for e in everything:
        assert balp_problems(e) == [], e
    claimed = sorted(p for e in everything for p in (e.get("meta") or {}).get("profile", []))
    assert claimed == sorted([BALP + "Query"] * 3 + [BALP + "Read"] * 3), claimed
    results = r4_validate(everything)
    assert [r["ok"] for r in results] == [True] * len(everything), results
    text = json.dumps(everything)
    for secret in ("Zzyzx", "1970", "p-secret-1", "b-secret-2", token.split(".")[1][:20]):
        assert secret not in text, secret
    # Counted: every tenant's event delivered, none dropped; the two without a tenant not sent.
    wait_until(lambda: moved(env, before, "audit_sink.delivered") >= 8, 10, "the delivered count")
    assert moved(env, before, "audit_sink.delivered") == 8
    assert moved(env, before, "audit_sink.untenanted_skipped") == 2
    for reason in ("queue_full", "rejected", "retries_exhausted", "contended"):
        assert moved(env, before, f"audit_sink.dropped.{reason}") == 0, reason


class Gate:
    """The sink server's port, as a test double of its network only: `hold` accepts connections and never
    answers; `open()` closes what it held (as a restarted server would) and forwards every new connection to
    `target` (the real FHIR engine)."""

    def __init__(self, target: int):
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.forward = False
        self.held: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                if not self.forward:
                    self.held.append(conn)
                    threading.Thread(target=self._drain, args=(conn,), daemon=True).start()
                    continue
            up = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _drain(conn):
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def held_count(self) -> int:
        with self.lock:
            return len(self.held)

    def open(self):
        with self.lock:
            self.forward = True
            for c in self.held:
                # shutdown, not only close: a close would wait for the reader thread's recv to return.
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self.held.clear()

    def close(self):
        self.sock.close()
        self.open()


def test_an_unanswering_sink_never_delays_a_request_drops_what_the_queue_cannot_hold_and_delivers_once_back(
        start_envoy, idp, upstreams, workdir):
    engine = FhirEngine("audit-outage", workdir, base_path=f"/{TENANT_A}").start()
    gate = Gate(engine.port)
    env = None
    try:
        cfg = _config(gate.port)
        # A batch under way counts against the queue: at most 10 events held, whatever the timing.
        plugin = _sink(batch_size=5, queue_size=10, timeout_ms=30000, attempts=5)
        env = start_envoy("envoy-audit-hold", {"idp": idp.port, **upstreams.cluster_ports()}, base=cfg, plugin=plugin)
        minter = Minter(idp.issuer)
        wait_for_jwks(env, minter, upstreams)
        before = env.settled_router_stats()
        token = minter.token(TENANT_A)
        for _ in range(25):
            # Answered in well under the sink's 30 s timeout: nothing waits for the sink.
            r = env.request("GET", "/Patient", {"authorization": f"Bearer {token}"}, timeout=3)
            assert r.status == 200, r
        wait_until(lambda: gate.held_count() >= 1, 10, "a batch held by the unanswering server")
        # 26 events (the readiness check's last request, answered 200, made one too); 10 held: 16 dropped.
        wait_until(lambda: moved(env, before, "audit_sink.dropped.queue_full") >= 16, 10, "the drops counted")
        assert moved(env, before, "audit_sink.dropped.queue_full") == 16
        assert moved(env, before, "audit_sink.delivered") == 0
        assert env.router_stat("audit_sink.batches") == 1, "one batch of the tenant under way at a time"
        # The server comes back: the held batch fails (reset), is posted again, and the queue drains.
        already = len(stored(engine))
        gate.open()
        wait_until(lambda: moved(env, before, "audit_sink.delivered") >= 10, 20, "the held events delivered",
                   on_timeout=lambda: json.dumps(env.router_stats()))
        assert len(stored(engine)) - already == 10
        assert moved(env, before, "audit_sink.retries") >= 1
        r = env.request("GET", "/Patient", {"authorization": f"Bearer {token}"}, timeout=3)
        assert r.status == 200
        wait_until(lambda: len(stored(engine)) - already == 11, 10, "a new event delivered")
        assert moved(env, before, "audit_sink.dropped.retries_exhausted") == 0
        assert moved(env, before, "audit_sink.dropped.queue_full") == 16
    finally:
        if env is not None:
            stop_envoy(env)
        gate.close()
        engine.stop()


def test_a_sink_that_refuses_connections_drops_each_event_after_its_attempts_and_never_delays_a_request(
        start_envoy, idp, upstreams):
    cfg = _config(free_port())  # nothing listens there
    env = start_envoy("envoy-audit-refused", {"idp": idp.port, **upstreams.cluster_ports()}, base=cfg,
                      plugin=_sink(batch_size=5, queue_size=50, attempts=2, backoff_ms=100))
    try:
        minter = Minter(idp.issuer)
        wait_for_jwks(env, minter, upstreams)
        # The readiness check's request made an event too: dropped before the baseline.
        wait_until(lambda: env.router_stat("audit_sink.dropped.retries_exhausted") >= 1, 20,
                   "the readiness request's event dropped")
        before = env.settled_router_stats()
        env.mark_log()
        token = minter.token(TENANT_A)
        for _ in range(8):
            r = env.request("GET", "/Patient", {"authorization": f"Bearer {token}"}, timeout=3)
            assert r.status == 200, r
        wait_until(lambda: moved(env, before, "audit_sink.dropped.retries_exhausted") >= 8, 20,
                   "every event dropped after its attempts", on_timeout=lambda: json.dumps(env.router_stats()))
        assert moved(env, before, "audit_sink.dropped.retries_exhausted") == 8
        assert moved(env, before, "audit_sink.dropped.queue_full") == 0
        assert moved(env, before, "audit_sink.delivered") == 0
        # Each batch (one of the tenant under way at a time) posted twice, then dropped with one warning line.
        batches = moved(env, before, "audit_sink.batches")
        assert batches >= 2 and moved(env, before, "audit_sink.retries") == batches
        lines = [ln for ln in env.log_since_mark().splitlines() if "audit sink:" in ln]
        assert len(lines) == batches, lines
        assert all(re.search(r"audit sink: \d+ AuditEvent\(s\) of tenant \S+ dropped", ln) for ln in lines), lines
        assert not any("resourceType" in ln or "Patient" in ln for ln in lines), lines
    finally:
        stop_envoy(env)
