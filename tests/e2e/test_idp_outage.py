"""IdP outage under load: the JWKS endpoint down, answering 500, answering garbage, or hanging, for 60 s in all.

Requests with known keys keep working, one warning is logged per failure streak (not per request or attempt),
the failures are counted in a stat, and the filter recovers by itself.

The faults come from a fault-injecting JWKS proxy (a fake, by necessity: no real IdP fails on command) that sits
between Envoy's `idp` cluster and the real IdP and forwards to it while healthy.
"""
from __future__ import annotations

import collections
import http.client
import re
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from checks import assert_wasm_vm_never_crashed
from conftest import stop_envoy, wait_for_jwks
from harness import TENANT_A, bearer, wait_until
from tokens import Minter

OUTAGE_SECONDS = float(os.environ.get("FHIR_TR_OUTAGE_SECONDS", "60"))
MODES = ["500", "garbage", "hang", "down"]


class FaultInjectingJwksProxy:
    """Forwards GET /jwks to the real IdP in mode "pass"; otherwise fails as told. In mode "hold" each fetch
    is held open until `release()`, then forwarded."""

    def __init__(self, idp_port: int):
        self.idp_port = idp_port
        self.mode = "pass"
        self.fetches: dict[str, int] = {}
        self.released = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                mode = proxy.mode
                proxy.fetches[mode] = proxy.fetches.get(mode, 0) + 1
                if mode == "down":  # drop the connection without an answer
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if mode == "hang":  # never answer within the filter's timeout; bounded here
                    time.sleep(3)
                    self.close_connection = True
                    return
                if mode == "hold":
                    proxy.released.wait(60)
                if mode == "500":
                    body, status = b'{"error":"server_error"}', 500
                elif mode == "garbage":
                    body, status = b'{"keys": "\x00definitely not a JWKS', 200
                else:
                    conn = http.client.HTTPConnection("127.0.0.1", proxy.idp_port, timeout=5)
                    conn.request("GET", self.path)
                    r = conn.getresponse()
                    body, status = r.read(), r.status
                    conn.close()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def release(self):
        self.released.set()

    def stop(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


def _stat(env, name: str) -> int:
    return env.router_stat(name)


@pytest.fixture(scope="module")
def outage(start_envoy, upstreams, idp):
    proxy = FaultInjectingJwksProxy(idp.port)

    def plugin(doc):
        doc["provider"]["issuer"] = idp.issuer
        doc["provider"]["jwks_refresh_s"] = 10  # the shortest allowed: several refreshes fall in the outage
        doc["provider"]["jwks_timeout_ms"] = 1000

    env = start_envoy("envoy-outage", {"idp": proxy.port, **upstreams.cluster_ports()}, plugin=plugin)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    yield env, proxy, minter
    stop_envoy(env)
    proxy.stop()


def test_known_keys_keep_working_through_a_60s_jwks_outage_and_the_filter_recovers(outage, upstreams):
    env, proxy, minter = outage
    env.mark_log()
    failed_before = _stat(env, "jwks.fetch_failed")
    ok_before = _stat(env, "jwks.fetch_ok")
    statuses: list[int] = []
    stop = threading.Event()
    cached = minter.token(TENANT_A)

    def load():
        i = 0
        deadline = time.monotonic() + OUTAGE_SECONDS + 60
        while not stop.is_set() and time.monotonic() < deadline:
            # Mostly one cached token, and every 10th a fresh one that needs full verification.
            token = minter.token(TENANT_A) if i % 10 == 0 else cached
            statuses.append(env.request("GET", "/Patient", bearer(token)).status)
            i += 1

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        for mode in MODES:
            proxy.mode = mode
            time.sleep(OUTAGE_SECONDS / len(MODES))  # the outage itself: a duration, not a synchronisation
        failed_during = _stat(env, "jwks.fetch_failed") - failed_before
        proxy.mode = "pass"
        # The recovery line is the signal (stats are flushed every 500 ms, so a count could be an old one).
        wait_until(lambda: re.search(r"JWKS fetch for \S+ recovered", env.log_since_mark()), 40,
                   "the filter to fetch the JWKS again and log its recovery")
        assert _stat(env, "jwks.fetch_ok") > ok_before
    finally:
        stop.set()
        worker.join(timeout=15)

    bad = [s for s in statuses if s != 200]
    assert not bad, f"{len(bad)} of {len(statuses)} requests failed during the outage: {sorted(set(bad))}"
    assert len(statuses) > 100
    assert failed_during >= 3, f"expected several failed fetches during {OUTAGE_SECONDS}s, got {failed_during}"
    assert all(proxy.fetches.get(m, 0) >= 1 for m in MODES), proxy.fetches

    log = env.log_since_mark()
    warnings = [line for line in log.splitlines() if re.search(r"JWKS fetch for \S+ failed", line)]
    # Every VM (Envoy's main thread and each worker, --concurrency 1 here) fetches for itself: one warning per
    # VM for the whole streak, however many attempts failed.
    per_thread = collections.Counter(re.search(r"\]\[(\d+)\]\[", line).group(1) for line in warnings)
    assert per_thread and set(per_thread.values()) == {1} and len(per_thread) <= 2, "\n".join(warnings)
    assert all("keeping the last 2 keys" in w for w in warnings), warnings
    assert any(re.search(r"JWKS fetch for \S+ recovered", line) for line in log.splitlines()), log[-2000:]
    for secret in (cached, "definitely not a JWKS"):
        assert secret not in log
    assert_wasm_vm_never_crashed(env)
