"""Tenants from a registry: the filter fetches the tenant map from an HTTP URL through an Envoy cluster on a timer,
swaps it in whole, and keeps the last good map whenever a fetch fails; a document may name only the secrets the
operator's tenant_registry.secret_scope allows (the last part of this file).

The registry here is a small HTTP server in the test process whose answer the test changes while Envoy runs (a
tenant added, a tenant removed, 500, garbage, an invalid tenant, an answer slower than the timeout). Envoy is the
shipped envoy/envoy.yaml plus one STATIC cluster for the registry; refresh_s is 1, so every change must be in
effect within about one refresh.
"""
from __future__ import annotations

import json
import secrets as _secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from checks import assert_forbidden, assert_no_upstream_saw_anything, assert_operation_outcome, assert_served_only_by
from checks import assert_unauthorized, assert_wasm_vm_never_crashed
from conftest import Stack, stop_envoy, wait_for_jwks
from harness import (
    REPO, SHIPPED_CONFIG, TENANT_A, TENANT_B, bearer, envoy_validate, load_yaml, plugin_json, render_config,
    wait_until, wasm_plugin_config, write_config,
)
from tokens import Minter
from upstream_auth import BASIC_CLIENT, FHIR_A_AUDIENCE, POST_CLIENT
import harness

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


# ----------------------------------------------------------------------- what a registry document may name
#
# The operator's plugin JSON declares in tenant_registry.secret_scope which environment variables (a name
# prefix) and files (a directory) a registry document may name; anything else refuses the document as a whole.
# The oracles are outside the filter: the real upstream authorization server (tests/upstream-as, oidc-provider)
# records every token request it receives, the recording upstreams every request and its headers, and Envoy's
# own log file is grepped for the operator's secret values.

SCOPE_PREFIX = "FTR_REGISTRY_"
AS_CLUSTER = "upstream_as"
PLAIN_CLUSTER = "plain_upstream"  # straight to the recording upstream tenant-b (no token guard)


class Secrets:
    """The operator's secrets: some in the registry's scope, the rest (the canaries) outside it."""

    def __init__(self, root, ua):
        self.in_scope_key = "in-scope-api-key-" + _secrets.token_hex(8)
        self.api_key_canary = "OPERATOR-API-KEY-CANARY-" + _secrets.token_hex(8)
        # The operator's real secret of another client of the same authorization server: a registry that could
        # name it would get tokens with it.
        self.post_secret = ua.as_.secrets[POST_CLIENT]
        self.basic_secret = ua.as_.secrets[BASIC_CLIENT]
        self.dir = root / "registry-secrets"
        self.outside = root / "operator-only"
        self.evil = root / "registry-secrets-evil"  # a sibling whose name starts with the scope directory's
        for d in (self.dir, self.outside, self.evil):
            d.mkdir(parents=True, exist_ok=True)
        (self.dir / "a_secret").write_text(self.basic_secret)
        (self.outside / "post_secret").write_text(self.post_secret)
        (self.outside / "api_key").write_text(self.api_key_canary)
        (self.evil / "post_secret").write_text(self.post_secret)
        link = self.dir / "link"
        if not link.is_symlink():
            link.symlink_to(self.outside / "post_secret")  # inside the directory, pointing out of it

    def vm_env(self) -> dict[str, str]:
        return {f"{SCOPE_PREFIX}A_SECRET": self.basic_secret, f"{SCOPE_PREFIX}API_KEY": self.in_scope_key,
                "OPERATOR_POST_SECRET": self.post_secret, "OPERATOR_API_KEY": self.api_key_canary,
                "ftr_registry_api_key": self.api_key_canary,       # the scope's prefix in another case
                "FTR_REGISTRYX_API_KEY": self.api_key_canary}      # a name the prefix (without `_`) would match

    def canaries(self) -> tuple[str, ...]:
        return self.post_secret, self.api_key_canary


def _scoped_tenants(as_, secrets: Secrets) -> dict:
    """Both inside the scope: A gets its upstream token with an FTR_REGISTRY_ secret, B an FTR_REGISTRY_ key."""
    return {
        TENANT_A: {"cluster": "tenant_a", "upstream_auth": {
            "method": "client_secret_basic", "token_url": as_.token_url, "cluster": AS_CLUSTER, "timeout_ms": 2000,
            "client_id": BASIC_CLIENT, "client_secret": {"env": f"{SCOPE_PREFIX}A_SECRET"},
            "resource": FHIR_A_AUDIENCE, "scope": "system/*.read"}},
        TENANT_B: {"cluster": PLAIN_CLUSTER, "upstream_header": {"name": "x-api-key", "env": f"{SCOPE_PREFIX}API_KEY"}},
    }


@pytest.fixture(scope="module")
def scoped(start_envoy, idp, upstreams, upstream_auth, tmp_path_factory):
    ua = upstream_auth
    secrets = Secrets(tmp_path_factory.mktemp("registry-scope"), ua)
    registry = Registry().start()
    registry.serve(_scoped_tenants(ua.as_, secrets))
    cfg = with_registry_cluster(registry.port)
    cfg["static_resources"]["clusters"] += [static_cluster(AS_CLUSTER, ua.as_.port),
                                            static_cluster(PLAIN_CLUSTER, upstreams.tenant_b.port)]
    wasm_plugin_config(cfg)["vm_config"]["environment_variables"] = {"key_values": secrets.vm_env()}

    def plugin(doc):
        doc.pop("tenants", None)
        doc["tenant_registry"] = {"uri": registry.uri, "cluster": REGISTRY_CLUSTER, "refresh_s": REFRESH_S,
                                  "timeout_ms": 1000, "secret_scope": {"env_prefixes": [SCOPE_PREFIX],
                                                                       "file_directory": str(secrets.dir)}}
    env = start_envoy("envoy-registry-secret-scope", {"idp": idp.port, **upstreams.cluster_ports(),
                                                      **ua.cluster_ports()}, base=cfg, plugin=plugin)
    minter = Minter(idp.issuer)
    wait_until(lambda: env.request("GET", "/Patient", bearer(minter.token(TENANT_B))).status == 200, 30,
               "the JWKS and the first registry document", on_timeout=lambda: "\n" + env.log_tail(30))
    yield Stack(env, upstreams, minter, idp, extra={"registry": registry, "secrets": secrets, "ua": ua})
    stop_envoy(env)
    registry.stop()


def _scoped_healthy(stack: Stack) -> None:
    ok_before = _stats(stack.envoy).get("registry.fetch_ok", 0)
    stack.extra["registry"].serve(_scoped_tenants(stack.extra["ua"].as_, stack.extra["secrets"]))
    _wait_stat(stack.envoy, "registry.fetch_ok", lambda v: v > ok_before, "to count a good fetch (after any backoff)",
               timeout=40)


def _assert_a_and_b_served_with_in_scope_secrets(stack: Stack) -> None:
    """A through its token guard with a token the AS issued for the in-scope secret; B with the in-scope key."""
    secrets, ua = stack.extra["secrets"], stack.extra["ua"]
    stack.upstreams.clear()
    resp = _status(stack, TENANT_A)
    assert resp.status == 200, (resp, stack.envoy.log_tail(20))
    assert [r.verdict for r in ua.guards["tenant_a"].records][-1:] == ["allowed"], ua.guards["tenant_a"].records
    stack.upstreams.clear()
    resp = _status(stack, TENANT_B)
    assert resp.status == 200, resp
    (req,) = stack.upstreams.hits()["tenant-b"]
    assert req.headers.get("x-api-key") == [secrets.in_scope_key], req.headers
    stack.upstreams.clear()


def test_a_registry_document_naming_secrets_inside_the_operators_scope_is_served(scoped):
    _scoped_healthy(scoped)
    ua = scoped.extra["ua"]
    _assert_a_and_b_served_with_in_scope_secrets(scoped)
    issued = [r for r in ua.as_.requests() if r.get("client_id") == BASIC_CLIENT and r.get("outcome") == "issued"]
    assert issued, "tenant A's token was issued for the in-scope secret"


NEW_T = "0e0e0e0e-3333-4444-8555-666677778888"


def _post_auth(token_url: str, secret: dict) -> dict:
    return {"method": "client_secret_post", "token_url": token_url, "cluster": AS_CLUSTER, "timeout_ms": 2000,
            "client_id": POST_CLIENT, "client_secret": secret, "scope": "system/*.read"}


def _outside_cases(s: Secrets, token_url: str) -> dict:
    """id -> (tenant NEW's object, the field the refusal names, whether the refusal is the scope's own)."""
    header = lambda env: {"cluster": PLAIN_CLUSTER, "upstream_header": {"name": "x-api-key", "env": env}}  # noqa: E731
    auth = lambda secret: {"cluster": "tenant_b", "upstream_auth": _post_auth(token_url, secret)}  # noqa: E731
    hf, ce, cf = "upstream_header.env", "upstream_auth.client_secret.env", "upstream_auth.client_secret.file"
    return {
        "header-env-outside-the-prefix": (header("OPERATOR_API_KEY"), hf, True),
        "header-env-in-another-case": (header("ftr_registry_api_key"), hf, True),
        "header-env-the-prefix-is-a-string-prefix-of": (header("FTR_REGISTRYX_API_KEY"), hf, True),
        "header-env-naming-a-file": (header(f"\0file:{s.outside / 'api_key'}"), hf, True),
        "secret-env-outside-the-prefix": (auth({"env": "OPERATOR_POST_SECRET"}), ce, True),
        "secret-env-with-an-equals-sign": (auth({"env": "FTR_REGISTRY_A=B"}), ce, True),
        "secret-file-outside-the-directory": (auth({"file": str(s.outside / "post_secret")}), cf, True),
        "secret-file-through-dotdot": (auth({"file": f"{s.dir}/../{s.outside.name}/post_secret"}), cf, True),
        "secret-file-in-a-sibling-named-like-the-directory": (auth({"file": str(s.evil / "post_secret")}), cf, True),
        "secret-file-relative": (auth({"file": "post_secret"}), cf, True),
        # Lexically inside; the file opened is outside once the symlink is resolved: not read.
        "secret-file-through-a-symlink-pointing-out": (auth({"file": str(s.dir / "link")}), cf, False),
    }


_CASE_IDS = ["header-env-outside-the-prefix", "header-env-in-another-case",
             "header-env-the-prefix-is-a-string-prefix-of", "header-env-naming-a-file",
             "secret-env-outside-the-prefix", "secret-env-with-an-equals-sign", "secret-file-outside-the-directory",
             "secret-file-through-dotdot", "secret-file-in-a-sibling-named-like-the-directory",
             "secret-file-relative", "secret-file-through-a-symlink-pointing-out"]


@pytest.mark.parametrize("case", _CASE_IDS)
def test_a_registry_document_naming_a_secret_outside_the_scope_is_refused_and_nothing_reaches_anyone(scoped, case):
    envoy, ua, s = scoped.envoy, scoped.extra["ua"], scoped.extra["secrets"]
    tenant, field, by_scope = _outside_cases(s, ua.as_.token_url)[case]
    _scoped_healthy(scoped)
    _assert_a_and_b_served_with_in_scope_secrets(scoped)
    ua.as_.reset()  # the token endpoint's log starts here
    failed_before = _stats(envoy).get("registry.fetch_failed", 0)
    envoy.mark_log()
    scoped.extra["registry"].serve({**_scoped_tenants(ua.as_, s), NEW_T: tenant})
    try:
        # Judged: refused (counted), or (what this test exists to catch) installed with its third tenant.
        wait_until(lambda: (lambda st: st.get("registry.fetch_failed", 0) > failed_before
                            or st.get("registry.tenants") == 3)(_stats(envoy)), 20, "the document to be judged",
                   on_timeout=lambda: f"\nstats: {_stats(envoy)}")
        scoped.upstreams.clear()
        answers = [_status(scoped, NEW_T) for _ in range(3)]
        # Nothing reached any upstream or the token endpoint: no request of the new tenant, no operator secret.
        seen = [(name, req.headers) for name, reqs in scoped.upstreams.hits().items() for req in reqs]
        leaked = [h for _, h in seen if any(c in json.dumps(h) for c in s.canaries())]
        assert not leaked, f"the operator's secret reached an upstream: {leaked}"
        tokens = [r for r in ua.as_.requests() if r.get("client_id") == POST_CLIENT]
        assert not tokens, f"the token endpoint got requests with the operator's other client: {tokens}"
        assert_no_upstream_saw_anything(scoped.upstreams)
        # The document is refused whole: its new tenant is unknown.
        for resp in answers:
            assert_forbidden(resp)
        assert _stats(envoy).get("registry.fetch_failed", 0) > failed_before
        # The log names the tenant and the field (and, when the scope refused it, the scope), never a value.
        full = f"tenants.{NEW_T}.{field}"
        lines = [line for line in envoy.log_since_mark().splitlines() if full in line]
        assert lines, f"no log line names {full}:\n{envoy.log_tail(20)}"
        if by_scope:
            assert all("secret_scope" in line or "must be" in line for line in lines), lines
        log = envoy.log()
        for canary in s.canaries():
            assert canary not in log, f"the operator's secret is in Envoy's log ({case})"
        # The previous map keeps serving, with its own (in-scope) secrets.
        _assert_a_and_b_served_with_in_scope_secrets(scoped)
        assert _stats(envoy).get("registry.tenants") == 2
        # The token endpoint heard only of tenant A's in-scope client, and never of the operator's other one.
        after = ua.as_.requests()
        assert all(r.get("client_id") == BASIC_CLIENT for r in after), after
    finally:
        _scoped_healthy(scoped)


def test_a_registry_document_naming_a_file_inside_the_scope_is_read_by_the_dynamic_module_only(scoped):
    """The dynamic module reads the in-scope file and gets the token with it; the proxy-wasm VM reads no files and
    refuses the document, saying so (the last good map stays)."""
    envoy, ua, s = scoped.envoy, scoped.extra["ua"], scoped.extra["secrets"]
    _scoped_healthy(scoped)
    from_file = _scoped_tenants(ua.as_, s)
    from_file[TENANT_A]["upstream_auth"]["client_secret"] = {"file": str(s.dir / "a_secret")}
    from_file[TENANT_A]["upstream_auth"]["timeout_ms"] = 2500  # a changed client: its token is fetched anew
    envoy.mark_log()
    ok_before = _stats(envoy).get("registry.fetch_ok", 0)
    failed_before = _stats(envoy).get("registry.fetch_failed", 0)
    issued_before = ua.as_.issued(BASIC_CLIENT)
    scoped.extra["registry"].serve(from_file)
    try:
        if harness.BUILD == "dynamic-module":
            _wait_stat(envoy, "registry.fetch_ok", lambda v: v > ok_before, "to count the document", timeout=20)
            wait_until(lambda: _status(scoped, TENANT_A).status == 200 and ua.as_.issued(BASIC_CLIENT) > issued_before,
                       10, "tenant A served with a token got with the secret from the file")
        else:
            _wait_stat(envoy, "registry.fetch_failed", lambda v: v > failed_before, "to count the refusal", timeout=20)
            field = f"tenants.{TENANT_A}.upstream_auth.client_secret.file"
            assert field in envoy.log_since_mark(), envoy.log_tail(20)
            _assert_a_and_b_served_with_in_scope_secrets(scoped)
        assert s.basic_secret not in envoy.log()
    finally:
        _scoped_healthy(scoped)


SCOPES = {
    # secret_scope -> the field Envoy's refusal names (None: accepted). docs/config.schema.json must agree.
    "a-prefix-without-its-underscore": ({"env_prefixes": ["FTR_REG"]}, "tenant_registry.secret_scope.env_prefixes"),
    "a-prefix-with-an-equals-sign": ({"env_prefixes": ["A=B_"]}, "tenant_registry.secret_scope.env_prefixes"),
    "the-root-directory": ({"file_directory": "/"}, "tenant_registry.secret_scope.file_directory"),
    "a-relative-directory": ({"file_directory": "relative/dir"}, "tenant_registry.secret_scope.file_directory"),
    "a-directory-with-dotdot": ({"file_directory": "/etc/../root"}, "tenant_registry.secret_scope.file_directory"),
    "an-unknown-key": ({"env_prefix": "FTR_"}, "secret_scope"),
    "a-good-scope": ({"env_prefixes": ["FTR_REGISTRY_", "TENANT_KEYS_"], "file_directory": "/etc/ftr/secrets/"}, None),
    "an-empty-scope": ({}, None),
}


@pytest.mark.parametrize("scope,field", SCOPES.values(), ids=SCOPES.keys())
def test_envoy_and_the_json_schema_agree_on_a_secret_scope(scope, field, wasm, tmp_path):
    import jsonschema
    schema = json.loads((REPO / "docs" / "config.schema.json").read_text(encoding="utf-8"))

    def edit(doc):
        doc.pop("tenants", None)
        doc["tenant_registry"] = {"uri": "http://127.0.0.1:9999/tenants", "cluster": REGISTRY_CLUSTER,
                                  "secret_scope": scope}
    cfg = render_config(with_registry_cluster(9999), listener_port=10000, admin_port=9901, cluster_ports={},
                        wasm_path=wasm, plugin=edit)
    result = envoy_validate(write_config(cfg, tmp_path / "scope.yaml"))
    output = result.stdout + result.stderr
    schema_ok = jsonschema.Draft202012Validator(schema).is_valid(plugin_json(cfg))
    if field is None:
        assert result.returncode == 0, output[-3000:]
        assert schema_ok
        return
    assert result.returncode != 0, f"envoy accepted secret_scope {scope}:\n{output[-3000:]}"
    assert any(field in line and "invalid plugin configuration" in line for line in output.splitlines()), \
        f"no error line names {field}:\n{output[-3000:]}"
    assert not schema_ok, f"docs/config.schema.json accepts secret_scope {scope}"
