"""Tenants from a registry: the filter fetches the tenant map from an HTTP URL through an Envoy cluster on a timer,
swaps it in whole, and keeps the last good map whenever a fetch fails.

The registry here is a small HTTP server in the test process whose answer the test changes while Envoy runs (a
tenant added, a tenant removed, 500, garbage, an invalid tenant, an answer slower than the timeout). Envoy is the
shipped envoy/envoy.yaml plus one STATIC cluster for the registry; refresh_s is 1, so every change must be in
effect within about one refresh.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from checks import assert_forbidden, assert_no_upstream_saw_anything, assert_operation_outcome, assert_served_only_by
from checks import assert_unauthorized, assert_wasm_vm_never_crashed
from conftest import Stack, stop_envoy, wait_for_jwks
from harness import (
    SHIPPED_CONFIG, TENANT_A, TENANT_B, bearer, envoy_validate, load_yaml, render_config, wait_until, write_config,
)
from tokens import Minter

REFRESH_S = 1
# One refresh, plus the fetch and a loaded 2-core machine's scheduling: a change must show within this.
WITHIN_ONE_REFRESH_S = REFRESH_S + 2.0
TENANT_C = "0c0c0c0c-1111-4222-8333-444455556666"
STATIC_ONLY = "static-only-tenant"  # in the static `tenants` only: gone once a registry document is loaded
REGISTRY_CLUSTER = "tenant_registry"


# ------------------------------------------------------------------------------------------- registry

class Registry:
    """GET /tenants answers whatever the test last set: a document, or a raw status + body, optionally late."""

    def __init__(self):
        self._lock = threading.Lock()
        self._answer: tuple[int, bytes, float] = (500, b"not set yet", 0.0)
        self._fetches: list[dict] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}/tenants"

    @property
    def fetches(self) -> list[dict]:
        with self._lock:
            return list(self._fetches)

    def serve(self, tenants: dict) -> None:
        self.serve_raw(200, json.dumps({"tenants": tenants}).encode())

    def serve_raw(self, status: int, body: bytes, delay_s: float = 0.0) -> None:
        with self._lock:
            self._answer = (status, body, delay_s)

    def start(self) -> "Registry":
        threading.Thread(target=self._server.serve_forever, name="tenant-registry", daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        registry = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - http.server API
                with registry._lock:
                    status, body, delay = registry._answer
                    registry._fetches.append({"path": self.path, "host": self.headers.get("host"),
                                              "at": time.monotonic()})
                if delay:
                    time.sleep(delay)  # bounded: the slowest answer the tests set is a few seconds
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # Envoy gave up on a deliberately slow answer

            def log_message(self, fmt, *args):
                pass

        return Handler


def base_tenants() -> dict:
    return {TENANT_A: {"cluster": "tenant_a"}, TENANT_B: {"cluster": "tenant_b"}}


def static_cluster(name: str, port: int) -> dict:
    return {"name": name, "type": "STATIC", "connect_timeout": "2s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


def with_registry_cluster(port: int) -> dict:
    cfg = load_yaml(SHIPPED_CONFIG)
    cfg["static_resources"]["clusters"].append(static_cluster(REGISTRY_CLUSTER, port))
    return cfg


def registry_plugin(registry: Registry, static_tenants: dict | None):
    def edit(doc):
        # Without public_base_url (the shipped demo sets one since issue 24): a document whose tenant rewrites
        # links is then refused, which one test checks.
        doc.pop("public_base_url", None)
        if static_tenants is None:
            doc.pop("tenants", None)
        else:
            doc["tenants"] = static_tenants
        doc["tenant_registry"] = {"uri": registry.uri, "cluster": REGISTRY_CLUSTER, "refresh_s": REFRESH_S,
                                  "timeout_ms": 1000}
    return edit


# ---------------------------------------------------------------------------------------------- stats

def _stats(env) -> dict[str, int]:
    return env.router_stats()


def _wait_stat(env, name: str, predicate, what: str, timeout: float = 15.0) -> dict[str, int]:
    return wait_until(lambda: (lambda s: s if predicate(s.get(name, 0)) else None)(_stats(env)), timeout,
                      f"{name} {what}", on_timeout=lambda: f"\nstats: {_stats(env)}")


# -------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def registry():
    r = Registry().start()
    r.serve(base_tenants())
    yield r
    r.stop()


@pytest.fixture(scope="module")
def reg(start_envoy, idp, upstreams, registry) -> Stack:
    """Static tenants name only STATIC_ONLY; the registry names A and B."""
    env = start_envoy("envoy-tenant-registry", {"idp": idp.port, **upstreams.cluster_ports()},
                      base=with_registry_cluster(registry.port),
                      plugin=registry_plugin(registry, {STATIC_ONLY: {"cluster": "tenant_a"}}))
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)  # polls with tenant A's token: A comes from the registry only
    yield Stack(env, upstreams, minter, idp, extra={"registry": registry})
    stop_envoy(env)


def _status(stack: Stack, tenant: str, method: str = "GET", path: str = "/Patient", body: bytes | None = None):
    headers = bearer(Minter(stack.minter.issuer).token(tenant))  # fresh iat/exp: the module runs for a while
    if body is not None:
        headers["content-type"] = "application/fhir+json"
    return stack.envoy.request(method, path, headers, body)


def _serve_and_wait(stack: Stack, tenants: dict, tenant: str, status: int) -> float:
    """Serve `tenants`; wait until a request for `tenant` gets `status`; returns the seconds that took."""
    stack.extra["registry"].serve(tenants)
    began = time.monotonic()
    wait_until(lambda: _status(stack, tenant).status == status, WITHIN_ONE_REFRESH_S,
               f"tenant {tenant} to answer {status} after the registry changed",
               on_timeout=lambda: "\n--- envoy log tail ---\n" + stack.envoy.log_tail(20))
    stack.upstreams.clear()
    return time.monotonic() - began


def _healthy(stack: Stack) -> None:
    """Serve the base map and wait for a successful fetch (which also ends any retry backoff of a failure streak,
    so that the next test starts with fetches every refresh_s again)."""
    ok_before = _stats(stack.envoy).get("registry.fetch_ok", 0)
    stack.extra["registry"].serve(base_tenants())
    _wait_stat(stack.envoy, "registry.fetch_ok", lambda v: v > ok_before, "to count a good fetch (after any backoff)",
               timeout=40)


def _assert_a_and_b_each_reach_their_own(reg) -> None:
    """A's token reaches only tenant A's upstream, B's only B's."""
    for tenant, upstream in ((TENANT_A, "tenant-a"), (TENANT_B, "tenant-b")):
        assert_served_only_by(reg.upstreams, _status(reg, tenant), upstream, tenant)
        reg.upstreams.clear()


# ------------------------------------------------------------------------------------------------ tests

def test_tenants_come_from_the_registry_and_replace_the_static_ones(reg):
    _serve_and_wait(reg, base_tenants(), TENANT_A, 200)
    _assert_a_and_b_each_reach_their_own(reg)
    assert_forbidden(_status(reg, STATIC_ONLY))
    assert_no_upstream_saw_anything(reg.upstreams)


def test_the_registry_is_fetched_through_its_cluster_with_the_uris_path_and_authority(reg):
    fetches = reg.extra["registry"].fetches
    assert fetches, "the registry was never asked"
    assert {f["path"] for f in fetches} == {"/tenants"}, fetches[-3:]
    assert {f["host"] for f in fetches} == {f"127.0.0.1:{reg.extra['registry'].port}"}, fetches[-3:]


def test_the_registry_is_fetched_again_every_refresh(reg):
    registry = reg.extra["registry"]
    before = len(registry.fetches)
    wait_until(lambda: len(registry.fetches) >= before + 3, 3 * REFRESH_S + 3,
               "three more registry fetches at refresh_s=1")
    before_ok = _stats(reg.envoy).get("registry.fetch_ok", 0)
    _wait_stat(reg.envoy, "registry.fetch_ok", lambda v: v >= before_ok + 2, "to count two more fetches")


def test_a_tenant_added_while_envoy_runs_becomes_routable_within_one_refresh(reg):
    _serve_and_wait(reg, base_tenants(), TENANT_C, 403)
    assert_forbidden(_status(reg, TENANT_C))
    assert_no_upstream_saw_anything(reg.upstreams)
    took = _serve_and_wait(reg, {**base_tenants(), TENANT_C: {"cluster": "tenant_b"}}, TENANT_C, 200)
    assert took <= WITHIN_ONE_REFRESH_S
    assert_served_only_by(reg.upstreams, _status(reg, TENANT_C), "tenant-b", TENANT_C)
    _wait_stat(reg.envoy, "registry.tenants", lambda v: v == 3, "== 3 (gauge)", timeout=5)


def test_a_tenant_removed_from_the_registry_is_refused(reg):
    _serve_and_wait(reg, base_tenants(), TENANT_B, 200)
    _serve_and_wait(reg, {TENANT_A: {"cluster": "tenant_a"}}, TENANT_B, 403)
    resp = _status(reg, TENANT_B)
    assert_forbidden(resp)
    assert_no_upstream_saw_anything(reg.upstreams)
    # The tenant that stayed is still served.
    assert_served_only_by(reg.upstreams, _status(reg, TENANT_A), "tenant-a", TENANT_A)
    _wait_stat(reg.envoy, "registry.tenants", lambda v: v == 1, "== 1 (gauge)", timeout=5)


def test_a_registry_tenants_own_settings_apply(reg):
    """The registry's tenant object is the configuration's: here an allowlist that permits create."""
    writable = {"cluster": "tenant_a", "allow": {"interactions": ["read", "search", "create"]}}
    _serve_and_wait(reg, {**base_tenants(), TENANT_C: writable}, TENANT_C, 200)
    resp = _status(reg, TENANT_C, "POST", "/Patient", b'{"resourceType":"Patient"}')
    assert_served_only_by(reg.upstreams, resp, "tenant-a", TENANT_C, method="POST")
    reg.upstreams.clear()
    # Tenant B keeps the default read-only policy.
    assert _status(reg, TENANT_B, "POST", "/Patient", b'{"resourceType":"Patient"}').status == 403
    assert_no_upstream_saw_anything(reg.upstreams)


def test_a_registry_tenants_client_binding_and_smart_scope_requirement_apply(reg):
    """`allowed_clients` and `require_smart_scopes` come with the registry's tenant object as well."""
    bound = {"cluster": "tenant_b", "allowed_clients": ["patients-app-a"], "require_smart_scopes": True}
    reg.extra["registry"].serve({**base_tenants(), TENANT_C: bound})

    def get(scope: str, **claims):
        return reg.envoy.request("GET", "/Patient", bearer(Minter(reg.minter.issuer).token(scope, **claims)))

    scoped = f"{TENANT_C} system/Patient.read"
    # Only the new document serves C to a scoped token and refuses it the tenant id alone (an earlier test's
    # map may serve C to both, and a map without C to neither).
    wait_until(lambda: get(scoped).status == 200 and get(TENANT_C).status == 403, WITHIN_ONE_REFRESH_S,
               "tenant C to need SMART scopes")
    reg.upstreams.clear()
    assert_served_only_by(reg.upstreams, get(scoped), "tenant-b", TENANT_C)
    reg.upstreams.clear()
    bare = get(TENANT_C)
    assert_forbidden(bare)
    assert 'scope="system/Patient.read"' in bare.header("www-authenticate"), bare
    other = get(scoped, client_id="another-app")
    assert_forbidden(other)
    assert "client may not use this tenant" in other.json()["issue"][0]["diagnostics"], other
    assert_no_upstream_saw_anything(reg.upstreams)


NEW = "0d0d0d0d-2222-4333-8444-555566667777"
FAILURES = {
    # status, body, delay: none of these may replace the map {A, B}; each would drop A and B and add NEW.
    "a-500-carrying-a-registry-document": (500, json.dumps({"tenants": {NEW: {"cluster": "tenant_a"}}}).encode(), 0),
    "a-404": (404, b"", 0),
    "garbage": (200, b"\x00\xffthis is not json{{", 0),
    "json-that-is-not-a-registry-document": (200, json.dumps([{"tenants": {NEW: {"cluster": "tenant_a"}}}]).encode(),
                                             0),
    "a-document-with-an-invalid-tenant": (200, json.dumps({"tenants": {
        NEW: {"cluster": "tenant_a"}, TENANT_C: {"clutser": "tenant_b"}}}).encode(), 0),
    "a-document-with-an-invalid-tenant-id": (200, json.dumps({"tenants": {
        NEW: {"cluster": "tenant_a"}, "not a tenant id!": {"cluster": "tenant_b"}}}).encode(), 0),
    "an-answer-slower-than-the-timeout": (200, json.dumps({"tenants": {NEW: {"cluster": "tenant_a"}}}).encode(), 2.5),
}


@pytest.mark.parametrize("status,body,delay", FAILURES.values(), ids=FAILURES.keys())
def test_a_failing_registry_keeps_the_last_good_tenant_map(reg, status, body, delay):
    _healthy(reg)
    _serve_and_wait(reg, base_tenants(), TENANT_B, 200)
    _wait_stat(reg.envoy, "registry.tenants", lambda v: v == 2, "== 2 (gauge)", timeout=5)
    failed_before = _stats(reg.envoy).get("registry.fetch_failed", 0)
    reg.extra["registry"].serve_raw(status, body, delay)
    try:
        # Two failed fetches counted: the bad answer has certainly been judged (at least) once.
        _wait_stat(reg.envoy, "registry.fetch_failed", lambda v: v >= failed_before + 2, "to count two failures",
                   timeout=20)
        _assert_a_and_b_each_reach_their_own(reg)
        assert_forbidden(_status(reg, NEW))
        assert_no_upstream_saw_anything(reg.upstreams)
        assert _stats(reg.envoy).get("registry.tenants") == 2
    finally:
        _healthy(reg)
    assert_wasm_vm_never_crashed(reg.envoy)


def test_a_registry_tenant_that_rewrites_links_without_public_base_url_is_refused_with_a_log_line(reg):
    """Without public_base_url (the registry stack drops envoy.yaml's): a document whose tenant rewrites links is refused as a whole (its links
    would otherwise go to the client's Host), and the log line names the field."""
    _healthy(reg)
    _serve_and_wait(reg, base_tenants(), TENANT_B, 200)
    failed_before = _stats(reg.envoy).get("registry.fetch_failed", 0)
    reg.envoy.mark_log()
    reg.extra["registry"].serve({**base_tenants(), NEW: {"cluster": "tenant_a",
                                                         "links_base_url": "http://fhir.internal.example/fhir"}})
    try:
        _wait_stat(reg.envoy, "registry.fetch_failed", lambda v: v > failed_before, "to count the refused document",
                   timeout=20)
        assert_forbidden(_status(reg, NEW))
        assert_no_upstream_saw_anything(reg.upstreams)
        field = f"tenants.{NEW}.links_base_url"
        lines = [line for line in reg.envoy.log_since_mark().splitlines() if field in line]
        assert lines and all("public_base_url" in line for line in lines), reg.envoy.log_tail(20)
    finally:
        _healthy(reg)


def test_before_the_first_registry_document_a_token_gets_503_and_then_the_tenant_is_served(
        start_envoy, idp, upstreams):
    """Static tenants omitted, the registry failing from the start: tokens get 503 + retry-after, never 403."""
    late = Registry().start()
    try:
        late.serve_raw(500, b"")
        env = start_envoy("envoy-registry-late", {"idp": idp.port, **upstreams.cluster_ports()},
                          base=with_registry_cluster(late.port), plugin=registry_plugin(late, None))
        _wait_stat(env, "jwks.fetch_ok", lambda v: v >= 1, "(the keys are there: a 503 is for the tenants)")
        _wait_stat(env, "registry.fetch_failed", lambda v: v >= 1, "(the registry was asked and failed)")
        minter = Minter(idp.issuer)
        resp = env.request("GET", "/Patient", bearer(minter.token(TENANT_A)))
        assert_operation_outcome(resp, 503)
        retry_after = resp.header("retry-after")
        assert retry_after is not None and retry_after.strip().isdigit(), resp
        assert_no_upstream_saw_anything(upstreams)
        assert_unauthorized(env.request("GET", "/Patient"), invalid_token=False)
        assert env.request("GET", "/metadata").status == 200, "public discovery needs no tenant"
        upstreams.clear()
        late.serve(base_tenants())
        token = minter.token(TENANT_A)
        # Failed fetches are retried with backoff (up to 30 s), so the first good answer may wait that long.
        wait_until(lambda: env.request("GET", "/Patient", bearer(token)).status == 200, 35,
                   "tenant A to be served once the registry answers")
        upstreams.clear()
        assert_served_only_by(upstreams, env.request("GET", "/Patient", bearer(token)), "tenant-a", TENANT_A)
        stop_envoy(env)
    finally:
        late.stop()


def test_envoy_validate_accepts_a_registry_without_static_tenants(wasm, tmp_path):
    r = Registry()  # not started: validate does not fetch
    try:
        cfg = render_config(with_registry_cluster(r.port), listener_port=10000, admin_port=9901, cluster_ports={},
                            wasm_path=wasm, plugin=registry_plugin(r, None))
        result = envoy_validate(write_config(cfg, tmp_path / "registry.yaml"))
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    finally:
        r._server.server_close()


BAD_REGISTRY = {
    "refresh-s-0": ({"refresh_s": 0}, "tenant_registry.refresh_s"),
    "refresh-s-86401": ({"refresh_s": 86401}, "tenant_registry.refresh_s"),
    "timeout-ms-99": ({"timeout_ms": 99}, "tenant_registry.timeout_ms"),
    "timeout-ms-60001": ({"timeout_ms": 60001}, "tenant_registry.timeout_ms"),
    "a-uri-that-is-not-a-url": ({"uri": "not a url"}, "tenant_registry.uri"),
    "no-cluster": ({"cluster": None}, ("tenant_registry", "cluster")),
    "an-unknown-key": ({"refresh": 5}, ("tenant_registry", "refresh")),
}


@pytest.mark.parametrize("change,field", BAD_REGISTRY.values(), ids=BAD_REGISTRY.keys())
def test_envoy_validate_refuses_a_tenant_registry_with(change, field, wasm, tmp_path):
    def edit(doc):
        doc.pop("tenants", None)
        reg_cfg = {"uri": "http://127.0.0.1:9999/tenants", "cluster": REGISTRY_CLUSTER, "refresh_s": 60,
                   "timeout_ms": 5000}
        for k, v in change.items():
            if v is None:
                reg_cfg.pop(k)
            else:
                reg_cfg[k] = v
        doc["tenant_registry"] = reg_cfg
    cfg = render_config(with_registry_cluster(9999), listener_port=10000, admin_port=9901, cluster_ports={},
                        wasm_path=wasm, plugin=edit)
    result = envoy_validate(write_config(cfg, tmp_path / "bad.yaml"))
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"envoy accepted a bad tenant_registry:\n{output[-3000:]}"
    needles = (field,) if isinstance(field, str) else field
    assert any(all(n in line for n in needles) and "invalid plugin configuration" in line
               for line in output.splitlines()), f"no error line names {needles!r}:\n{output[-3000:]}"
