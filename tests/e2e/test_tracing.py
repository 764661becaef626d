"""`span_tags` (issue 27): the filter's decision on the request's trace span, through real Envoy 1.40 in the build
under test (--build wasm / dynamic-module). Envoy's own Zipkin tracer (HTTP JSON, v2 API) posts its spans to a
collector this test runs on 127.0.0.1; the spans are what Envoy sent, parsed from the wire.

The connection manager's tracing is configured as docs/operations.md ("Tracing") shows: `custom_tags` that read
the filter state `wasm.fhir_tenant_router.<key>` (how the wasm build's tags reach the span; the dynamic module
tags Envoy's active span itself through the ABI and sets no such filter state), and `max_path_tag_length: 1` so
that Envoy's own `http.url` tag carries no path or query.

Checked for a routed request and a refused one: the tenant, client, issuer, interaction, resource type, outcome
and reason tags, and `verify_ns` (a positive integer); that no token, query value or resource id is in any span
Envoy sent; that without the option no span has any of these tags; and that the check itself fails on a span
whose tag is missing or mis-named.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import Stack, stop_envoy, wait_for_jwks
from harness import SHIPPED_CONFIG, TENANT_A, load_yaml, wait_until
from tokens import Minter

PREFIX = "fhir_tenant_router."
TAGS = ("tenant", "client_id", "issuer", "scopes", "interaction", "resource_type", "outcome", "reason", "verify_ns")


class Collector:
    """A Zipkin collector: takes `POST /api/v2/spans` (a JSON array of spans) and keeps every span."""

    def __init__(self):
        self.spans: list[dict] = []
        self.bodies: list[str] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self._body().decode()
                with collector.lock:
                    collector.bodies.append(body)
                    if self.path == "/api/v2/spans":
                        collector.spans.extend(json.loads(body))

            def _body(self) -> bytes:
                if "chunked" not in (self.headers.get("transfer-encoding") or "").lower():
                    return self.rfile.read(int(self.headers.get("content-length") or 0))
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
                self.send_response(202)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def span_of(self, user_agent: str, timeout: float = 30) -> dict:
        """The span of the request sent with this User-Agent (Envoy's `user_agent` tag), once Envoy posted it."""
        def found():
            with self.lock:
                return next((s for s in self.spans if (s.get("tags") or {}).get("user_agent") == user_agent), None)
        return wait_until(found, timeout, f"Envoy's span of the request {user_agent!r}",
                          on_timeout=lambda: f"spans so far: {json.dumps(self.spans)[:3000]}")

    def everything(self) -> str:
        with self.lock:
            return "\n".join(self.bodies)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def _config(collector_port: int) -> dict:
    cfg = load_yaml(SHIPPED_CONFIG)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["tracing"] = {
        "random_sampling": {"value": 100},
        "max_path_tag_length": 1,
        "provider": {
            "name": "envoy.tracers.zipkin",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
                "collector_cluster": "zipkin",
                "collector_endpoint": "/api/v2/spans",
                "collector_endpoint_version": "HTTP_JSON",
            },
        },
        "custom_tags": [{"tag": PREFIX + key, "value": f"%FILTER_STATE(wasm.{PREFIX}{key}:PLAIN)%"} for key in TAGS],
    }
    cfg["static_resources"]["clusters"].append({
        "name": "zipkin",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "zipkin", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": "127.0.0.1", "port_value": collector_port}}}}]}]},
    })
    # Envoy's Zipkin tracer posts once it holds this many spans (else every 5 s): one, so each span goes at once.
    cfg["layered_runtime"] = {"layers": [{"name": "static", "static_layer": {"tracing.zipkin.min_flush_spans": 1}}]}
    return cfg


def _stack(start_envoy, idp, upstreams, name: str, span_tags: bool):
    collector = Collector()

    def plugin(doc):
        doc["span_tags"] = span_tags
        doc["decision_metadata"] = False  # the tags come from `span_tags` alone
        if not span_tags:
            # The shipped config's access-log filter state (tenant, client) is what the custom tags read in
            # the wasm build: off too, so that nothing but `span_tags` could put a decision tag on a span.
            doc["access_log_filter_state"] = False

    env = start_envoy(name, {"idp": idp.port, **upstreams.cluster_ports()}, base=_config(collector.port),
                      plugin=plugin)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    return Stack(env, upstreams, minter, idp, extra={"collector": collector})


@pytest.fixture(scope="module")
def traced(start_envoy, idp, upstreams):
    stack = _stack(start_envoy, idp, upstreams, "envoy-tracing", True)
    yield stack
    stop_envoy(stack.envoy)
    stack.extra["collector"].stop()


@pytest.fixture(scope="module")
def untraced(start_envoy, idp, upstreams):
    stack = _stack(start_envoy, idp, upstreams, "envoy-tracing-off", False)
    yield stack
    stop_envoy(stack.envoy)
    stack.extra["collector"].stop()


def decision_tags(span: dict) -> dict:
    """The filter's tags of a span, by key (`tenant`, ...); Envoy leaves out a custom tag with nothing to read."""
    return {k.removeprefix(PREFIX): v for k, v in (span.get("tags") or {}).items() if k.startswith(PREFIX) and v}


def check_routed(span: dict, issuer: str) -> None:
    tags = decision_tags(span)
    verify_ns = tags.pop("verify_ns", None)
    assert verify_ns is not None and verify_ns.isdigit() and int(verify_ns) > 0, span
    assert tags == {"tenant": TENANT_A, "client_id": "patients-app-a", "issuer": issuer, "interaction": "search",
                    "resource_type": "Patient", "outcome": "allowed"}, span


def check_refused(span: dict) -> None:
    tags = decision_tags(span)
    verify_ns = tags.pop("verify_ns", None)
    assert verify_ns is not None and verify_ns.isdigit(), span
    assert tags == {"interaction": "read", "resource_type": "Patient", "outcome": "rejected",
                    "reason": "missing_token"}, span


def test_a_routed_and_a_refused_request_carry_the_decision_on_their_spans(traced):
    token = traced.minter.token(TENANT_A)
    collector = traced.extra["collector"]
    r = traced.get("/Patient?name=Zzyzx&family=Wqpvk", token, headers={"user-agent": "trace-routed"})
    assert r.status == 200, r
    r = traced.get("/Patient/p-secret-1?_elements=Qqqx", headers={"user-agent": "trace-refused"})
    assert r.status == 401, r
    routed, refused = collector.span_of("trace-routed"), collector.span_of("trace-refused")
    check_routed(routed, traced.idp.issuer)
    check_refused(refused)
    assert routed["tags"].get("http.status_code") == "200" and refused["tags"].get("http.status_code") == "401"
    # Nothing of the token, the query values or the resource id in anything Envoy sent.
    sent = collector.everything()
    for secret in (token, token.split(".")[1][:24], token.split(".")[2][:24], "Zzyzx", "Wqpvk", "p-secret-1", "Qqqx"):
        assert secret not in sent, secret


def test_without_the_option_no_span_has_a_decision_tag(untraced):
    token = untraced.minter.token(TENANT_A)
    collector = untraced.extra["collector"]
    assert untraced.get("/Patient?name=Zzyzx", token, headers={"user-agent": "off-routed"}).status == 200
    assert untraced.get("/Patient/p1", headers={"user-agent": "off-refused"}).status == 401
    routed, refused = collector.span_of("off-routed"), collector.span_of("off-refused")
    assert decision_tags(routed) == {} and decision_tags(refused) == {}, (routed, refused)
    # The checks of the test above fail on these spans.
    with pytest.raises(AssertionError):
        check_routed(routed, untraced.idp.issuer)
    with pytest.raises(AssertionError):
        check_refused(refused)


def test_the_checks_fail_on_a_missing_or_misnamed_tag(traced):
    token = traced.minter.token(TENANT_A)
    collector = traced.extra["collector"]
    assert traced.get("/Patient?name=x", token, headers={"user-agent": "trace-names"}).status == 200
    span = collector.span_of("trace-names")
    check_routed(span, traced.idp.issuer)
    for key in ("tenant", "client_id", "outcome", "verify_ns"):
        misnamed = json.loads(json.dumps(span))
        misnamed["tags"][PREFIX + key + "s"] = misnamed["tags"].pop(PREFIX + key)
        with pytest.raises(AssertionError):
            check_routed(misnamed, traced.idp.issuer)
