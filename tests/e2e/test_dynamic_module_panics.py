"""A panic in the dynamic module never takes Envoy down: every hook runs under a guard that catches it,
answers that request 503 with an OperationOutcome (request-path hooks), counts it in `panics`, and lets the
next request be served. The panic is forced by a test-only build (`make build-so-probe`: cargo feature
`panic-probe`, target/panic-probe/), which panics in the first n calls of the hook named by
FHIR_TENANT_ROUTER_PANIC_PROBE=<hook>:<n> in Envoy's environment. The shipped .so has no such switch."""
from __future__ import annotations

import pytest

from checks import assert_operation_outcome, assert_served_only_by
from conftest import _running_envoys, stop_envoy
from harness import INLINE_JWKS_CONFIG, REPO, SO_PATH, TENANT_A, Envoy, bearer, free_port, plugin_json, render_config
from tokens import Minter

PROBE_SO = REPO / "target" / "panic-probe" / "dynamic-module" / "libfhir_tenant_router.so"

pytestmark = pytest.mark.wasm_only("runs its own dynamic-module Envoys; once per `make e2e` is enough")


class ProbeEnvoy(Envoy):
    """An Envoy on the panic-probe build of the .so, armed to panic in `hook` `times` times."""

    def __init__(self, cfg, workdir, name, port, admin, hook: str, times: int):
        super().__init__(cfg, workdir, name, port, admin, log_level="info", build="dynamic-module",
                         so_path=PROBE_SO)
        self.env["FHIR_TENANT_ROUTER_PANIC_PROBE"] = f"{hook}:{times}"


@pytest.fixture(scope="module")
def probe_so():
    if not PROBE_SO.is_file():
        pytest.fail(f"{PROBE_SO} is missing: make build-so-probe", pytrace=False)
    switch = b"FHIR_TENANT_ROUTER_PANIC_PROBE"
    assert switch in PROBE_SO.read_bytes()
    assert switch not in SO_PATH.read_bytes(), "the shipped .so must not carry the panic probe"
    return PROBE_SO


@pytest.fixture
def armed(request, probe_so, workdir, upstreams):
    started = []

    def start(hook: str, times: int) -> tuple[Envoy, Minter]:
        port, admin = free_port(), free_port()
        cfg = render_config(INLINE_JWKS_CONFIG, listener_port=port, admin_port=admin,
                            cluster_ports=upstreams.cluster_ports())
        env = ProbeEnvoy(cfg, workdir, f"envoy-panic-{hook}", port, admin, hook, times)
        _running_envoys.append(env)
        started.append(env)
        env.start()
        return env, Minter(plugin_json(cfg)["provider"]["issuer"])

    yield start
    for env in started:
        stop_envoy(env)


def test_a_panic_deciding_a_request_is_answered_503_counted_and_the_next_request_is_served(armed, upstreams):
    env, minter = armed("request_headers", 1)
    token = minter.token(TENANT_A)
    resp = env.request("GET", "/Patient", bearer(token))
    assert_operation_outcome(resp, 503, code="exception")  # FHIR's "unexpected internal error", under transient
    assert not any(u.requests for u in upstreams.all()), "a request whose decision panicked reached an upstream"
    assert env.router_stat("panics") == 1
    assert "the request_headers hook panicked; the request was answered 503" in env.log()
    # Envoy and the worker's router are intact: the next request is decided and routed as usual.
    assert_served_only_by(upstreams, env.request("GET", "/Patient", bearer(token)), "tenant-a", TENANT_A)
    assert env.proc.poll() is None


# What the first request gets when the hook panics: a request-path hook answers 503 itself; without a stream
# object (`filter_new` panicked) Envoy itself answers 500 and the request goes nowhere (fail closed; the module's
# request hook would refuse it too); a panic in a response hook or at the end of the stream leaves the
# upstream's answer as it was.
HOOKS = {"filter_new": 500, "request_body": 503, "response_headers": 200, "stream_complete": 200}


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_a_panic_in_any_other_hook_is_caught_and_envoy_keeps_serving(armed, upstreams, hook):
    env, minter = armed(hook, 1)
    token = minter.token(TENANT_A)
    headers = {**bearer(token), "content-type": "application/x-www-form-urlencoded"}
    first = env.request("POST", "/Patient/_search", headers, b"name=x")
    assert first.status == HOOKS[hook], first
    if hook == "filter_new":
        assert not any(u.requests for u in upstreams.all()), "a request without a stream object reached an upstream"
    assert env.router_stat("panics") == 1
    assert f"the {hook} hook panicked" in env.log()
    upstreams.clear()
    # A panic in request_body comes after the form's headers went on (an unnarrowed search is not held): Envoy
    # resets the upstream request after the 503, and the upstream may still record it after the clear.
    earlier = ("POST", "/Patient/_search") if hook == "request_body" else None
    for _ in range(3):
        resp = env.request("GET", "/Patient", bearer(token))
        assert_served_only_by(upstreams, resp, "tenant-a", TENANT_A, earlier=earlier)
        upstreams.clear()
    assert env.proc.poll() is None
