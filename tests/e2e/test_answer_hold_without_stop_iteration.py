"""A narrowed token's answer, and an answer whose paging links become cursors, where the host cannot hold
headers and still deliver the body.

The answer check and cursors hold an answer until its body is whole. Envoy's wasm host delivers the body of an
answer whose headers a filter holds only with the PluginConfig's `allow_on_headers_stop_iteration: true`;
without it proxy-wasm-cpp-host turns the filter's StopIteration into StopAllIterationAndWatermark and Envoy
never calls the body hook: such a request never got an answer (BENCHMARKS.md, the narrowed wasm row). Istio's
WasmPlugin and Envoy Gateway's extension policy cannot set the flag; their examples set `hold_bundle_headers:
false`, and with it the answer's headers go on and only its body is held. A refused body can then no longer
become a 403: the filter's local reply makes Envoy reset the stream (a local reply after the response headers
went), and none of the body's bytes reach the client.

Run in both builds: the dynamic module has no such flag, but the core path with `hold_bundle_headers: false`
must behave the same. The FHIR server is the FAKE HAPI of test_answer_check_and_cursors.py (HAPI is Java and
cannot run here). Every request has a client timeout, so the old code's hang fails instead of hanging."""
from __future__ import annotations

import json
import socket

import pytest

from checks import assert_wasm_vm_never_crashed
from conftest import stop_envoy
from fake_hapi import FakeHapiPagingServer
from harness import SHIPPED_CONFIG, TENANT_A, bearer, load_yaml, wait_until, wasm_plugin_config
from tokens import Minter
from upstream import RecordingUpstream

PUBLIC = "https://fhir.example.test"
CURSOR_KEY = "e2e-only-cursor-key-0123456789abcdef0123456789"
CLIENT_TIMEOUT_S = 5
RESET_STAT = "http.fhir_ingress.downstream_rq_tx_reset"


def raw_get(port: int, target: str, headers: dict[str, str]) -> tuple[bytes, str]:
    """One GET on a fresh connection: every byte the client received, and how the connection ended ("closed",
    "reset"). A client timeout (no answer) fails the test."""
    lines = [f"GET {target} HTTP/1.1", "host: fhir.example.test", "accept: application/fhir+json",
             "connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return received, "reset"
            except socket.timeout:
                pytest.fail(f"no answer within {CLIENT_TIMEOUT_S} s to GET {target.split('?')[0]} "
                            f"(received {len(received)} bytes: {received[:200]!r})")
            if not chunk:
                return received, "closed"
            received += chunk


def parse(received: bytes) -> tuple[int, dict[str, str], bytes, bool]:
    """Status, headers, body (de-chunked) and whether the message is complete."""
    head, _, rest = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in header_lines)}
    status = int(status_line.split()[1])
    if "content-length" in headers:
        n = int(headers["content-length"])
        return status, headers, rest[:n], len(rest) >= n
    body, complete = b"", False
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            complete = True
            break
        if len(rest) < size + 2:
            body += rest[:size]
            break
        body, rest = body + rest[:size], rest[size + 2:]
    return status, headers, body, complete


@pytest.fixture(scope="module")
def not_held(start_envoy, idp):
    hapi = FakeHapiPagingServer("shared-hapi").start()
    meta = RecordingUpstream("metadata", "metadata").start()

    def plugin(doc):
        doc["public_base_url"] = PUBLIC
        doc["paging_cursors"] = {"key": {"env": "CURSOR_KEY"}, "ttl_s": 600}
        doc["hold_bundle_headers"] = False

    base = load_yaml(SHIPPED_CONFIG)
    wasm = wasm_plugin_config(base)
    del wasm["allow_on_headers_stop_iteration"]  # as Istio's WasmPlugin and Envoy Gateway configure it
    wasm["vm_config"]["environment_variables"] = {"key_values": {"CURSOR_KEY": CURSOR_KEY}}
    env = start_envoy("envoy-answer-not-held", {"idp": idp.port, "tenant_a": hapi.port, "tenant_b": hapi.port,
                                                "fhir_metadata": meta.port}, base=base, plugin=plugin)
    minter = Minter(idp.issuer)
    t = minter.token(TENANT_A)
    wait_until(lambda: env.request("GET", "/Patient/p1", bearer(t), timeout=CLIENT_TIMEOUT_S).status != 503, 30,
               "the remote JWKS", on_timeout=lambda: "\n--- envoy log tail ---\n" + env.log_tail())
    try:
        yield env, hapi, minter
    finally:
        stop_envoy(env)
        hapi.stop()
        meta.stop()


def _token(minter: Minter, scopes: str = "") -> str:
    return minter.token(f"{TENANT_A} {scopes}".strip(), client_id="patients-app-a", sub="patients-app-a")


def _link(bundle: dict, relation: str) -> str | None:
    return next((l["url"] for l in bundle.get("link", []) if l.get("relation") == relation), None)


def test_a_narrowed_tokens_allowed_answer_arrives_whole_and_pages_through_cursors(not_held):
    env, hapi, minter = not_held
    auth = bearer(_token(minter, "system/Patient.rs"))
    # An answer checked, not edited (the fake's OperationOutcome to a read it does not model): content-length
    # kept, and whole.
    received, _ = raw_get(env.port, "/Patient/p1", auth)
    status, headers, body, complete = parse(received)
    assert (status, complete) == (404, True) and "content-length" in headers, received[:300]
    assert json.loads(body)["resourceType"] == "OperationOutcome"
    # Searches: checked, and their paging links made cursors (content-length removed: the body changes).
    target, seen = "/Patient?_count=2", []
    while target:
        received, _ = raw_get(env.port, target, auth)
        status, headers, body, complete = parse(received)
        assert (status, complete) == (200, True), received[:300]
        assert "content-length" not in headers or int(headers["content-length"]) == len(body), headers
        page = json.loads(body)
        assert "_getpages" not in json.dumps(page.get("link", [])), page.get("link")
        seen += [e["resource"]["id"] for e in page["entry"]]
        nxt = _link(page, "next")
        assert nxt is None or "/?_cursor=" in nxt, nxt
        target = nxt[len(PUBLIC):] if nxt else None
    assert seen == FakeHapiPagingServer.PATIENTS, "every page, in order, once"
    assert_wasm_vm_never_crashed(env)


def test_a_refused_answer_never_delivers_the_forbidden_resource(not_held):
    env, hapi, minter = not_held
    # The oracle can fail: unnarrowed, the fake's answer holds the Observation obs1.
    received, _ = raw_get(env.port, "/Patient?name=misbehave", bearer(_token(minter)))
    status, _, body, complete = parse(received)
    assert (status, complete) == (200, True) and b"obs1" in body, received[:300]
    before = env.settled_router_stats().get("responses.withheld.forbidden_type", 0)
    resets = env.stats(RESET_STAT).get(RESET_STAT, 0)
    env.mark_log()
    received, how = raw_get(env.port, "/Patient?name=misbehave", bearer(_token(minter, "system/Patient.rs")))
    # The headers went on (they cannot be taken back); the stream is reset, and nothing of the body arrived.
    assert b"obs1" not in received and b"Observation" not in received, received
    assert received == b"" or not parse(received)[3], f"an incomplete answer or none ({how}): {received[:300]!r}"
    # Envoy reset the stream (its FilterManager, on a local reply after the response headers went).
    wait_until(lambda: env.stats(RESET_STAT).get(RESET_STAT, 0) == resets + 1, 10, "Envoy's reset of the stream")
    stats = wait_until(lambda: (s := env.router_stats()).get("responses.withheld.forbidden_type", 0) > before
                       and s, 10, "the withheld answer in the stats")
    assert stats["responses.withheld.forbidden_type"] == before + 1
    log = wait_until(lambda: (l := env.log_since_mark()).count("was withheld") >= 1 and l, 10,
                     "the withheld answer in the log")
    (line,) = [l for l in log.splitlines() if "was withheld" in l]
    assert "the stream is reset" in line and "Observation x1" in line, line
    assert "misbehave" not in line and "obs1" not in line, "no path, no data in the log"
    assert_wasm_vm_never_crashed(env)


def test_an_answer_beyond_the_buffer_limit_after_its_headers_is_cut_before_any_of_its_body(not_held):
    env, hapi, minter = not_held
    # The oracle can fail: unnarrowed, the whole answer (over 2 MiB, ending in an Observation) streams through.
    received, _ = raw_get(env.port, "/Patient/big", bearer(_token(minter)))
    status, _, body, complete = parse(received)
    assert (status, complete) == (200, True) and b"obs-big" in body, received[:300]
    # Narrowed: its headers went, its body is held and goes beyond Envoy's buffer limit: Envoy resets the stream.
    received, how = raw_get(env.port, "/Patient/big", bearer(_token(minter, "system/Patient.rs")))
    assert b"obs-big" not in received and b'"Patient"' not in received, received[:300]
    assert received == b"" or not parse(received)[3], f"an incomplete answer or none ({how}): {received[:300]!r}"
