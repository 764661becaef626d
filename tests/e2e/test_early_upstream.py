"""An upstream that answers as soon as it has the request headers (before the body) against the allowlist.

A Bundle posted to the base is judged from its body. The filter holds the whole request, headers included,
until the verdict (`hold_bundle_headers`, on by default, with the wasm PluginConfig's
`allow_on_headers_stop_iteration: true` that every shipped config sets): a refused Bundle causes no upstream
request at all, so not even an upstream that answers before reading the body can race the refusal."""
from __future__ import annotations

import json
import socket
import threading

import pytest

from checks import assert_wasm_vm_never_crashed
from conftest import stop_envoy, wait_for_jwks
from harness import TENANT_A, bearer
from tokens import Minter

EARLY = b'{"resourceType":"Bundle","type":"batch-response","id":"early-answer"}'


class EarlyAnsweringUpstream:
    """Reads the request headers, answers 200 at once, never reads the body (a fake by design: no real FHIR
    server answers a batch before reading it, which is what makes this the worst case). One request per
    connection (`connection: close`): it drains, never parses, what follows the headers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.answered = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        conn.settimeout(10)
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            self.answered += 1  # before the answer goes: the client may check the count as soon as it has it
            conn.sendall(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-type: application/fhir+json\r\n"
                         b"content-length: "
                         + str(len(EARLY)).encode() + b"\r\n\r\n" + EARLY)
            while conn.recv(4096):
                pass
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self):
        self.sock.close()


@pytest.fixture(scope="module")
def early(start_envoy, idp, upstreams):
    up = EarlyAnsweringUpstream()
    env = start_envoy("envoy-early-upstream", {"idp": idp.port, **upstreams.cluster_ports(), "tenant_a": up.port})
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    yield env, up, minter
    stop_envoy(env)
    up.stop()


def _batch(*entries):
    return json.dumps({"resourceType": "Bundle", "type": "batch",
                       "entry": [{"request": {"method": m, "url": u}} for m, u in entries]}).encode()


def test_a_refused_bundle_gets_the_refusal_even_when_the_upstream_answers_first(early):
    env, up, minter = early
    headers = {**bearer(minter.token(TENANT_A)), "content-type": "application/fhir+json"}
    before = up.answered
    for _ in range(20):  # the race, if any, is timing-dependent: try it many times
        resp = env.request("POST", "/", headers, _batch(("GET", "Patient/1"), ("DELETE", "Patient/1")),
                           timeout=3)
        assert resp.status == 403, resp
        assert b"early-answer" not in resp.body
        assert "entry 1" in resp.json()["issue"][0]["diagnostics"]
    assert up.answered == before, "the upstream saw a refused Bundle's headers"
    assert_wasm_vm_never_crashed(env)


def test_a_refused_bundle_causes_zero_upstream_requests(early):
    """Counted by Envoy itself: the tenant cluster's `upstream_rq_total` does not move for refused Bundles
    (large ones too, sent in several chunks), and moves by one for an allowed one."""
    env, up, minter = early
    headers = {**bearer(minter.token(TENANT_A)), "content-type": "application/fhir+json"}
    stat = "cluster.tenant_a.upstream_rq_total"
    before = env.stats(f"^{stat}$").get(stat, 0)
    padding = [("GET", f"Patient/{i}") for i in range(3000)]  # ~150 KB: more than one read of the body
    for bundle in (_batch(("DELETE", "Patient/1")), _batch(*padding, ("PUT", "Patient/1"))):
        resp = env.request("POST", "/", headers, bundle, timeout=10)
        assert resp.status == 403, resp
    assert env.stats(f"^{stat}$").get(stat, 0) == before
    resp = env.request("POST", "/", headers, _batch(*padding), timeout=10)
    assert resp.status == 200, resp
    assert env.stats(f"^{stat}$").get(stat, 0) == before + 1


def test_an_allowed_bundle_gets_the_upstreams_answer(early):
    env, up, minter = early
    headers = {**bearer(minter.token(TENANT_A)), "content-type": "application/fhir+json"}
    before = up.answered
    resp = env.request("POST", "/", headers, _batch(("GET", "Patient/1"), ("GET", "Observation?patient=1")))
    assert resp.status == 200, resp
    assert resp.body == EARLY
    assert up.answered == before + 1


def test_a_bundle_over_envoys_buffer_limit_is_refused_by_envoy_without_an_upstream_request(early):
    """The filter judges a Bundle whole, so the largest it can judge is Envoy's buffer limit (1 MiB by default,
    `per_connection_buffer_limit_bytes`): a larger one is answered 413 by Envoy, and nothing goes upstream."""
    env, up, minter = early
    headers = {**bearer(minter.token(TENANT_A)), "content-type": "application/fhir+json"}
    stat = "cluster.tenant_a.upstream_rq_total"
    before = env.stats(f"^{stat}$").get(stat, 0)
    bundle = _batch(*[("GET", f"Patient/{i}") for i in range(40000)])
    assert len(bundle) > 1 << 21
    resp = env.request("POST", "/", headers, bundle, timeout=10)
    assert resp.status == 413, resp
    assert env.stats(f"^{stat}$").get(stat, 0) == before
    assert_wasm_vm_never_crashed(env)
