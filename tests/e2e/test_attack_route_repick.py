"""Attack on the wasm build's dropped `clear_route_cache` call (c550f3f): the shell skips the foreign call when
the same callback edited a request header, trusting Envoy's wasm host to clear the route cache on each edit
(`Context::onHeadersModified`, modules of Proxy-Wasm ABI 0.2.1). Each test sends a client route header naming
another tenant (Envoy's connection manager picked the route from it before any filter ran) down a path where
the filter's edit is made somewhere else than the request-headers callback, or in a form Envoy parses
differently, and asserts the request reached only the token's tenant: Envoy's router is the oracle (a route
not re-picked sends it to `tenant_b`, as `test_route_repick.py`'s Lua oracle shows on this Envoy).

Paths: a request parked for a key-set refetch and resumed from the fetch answer in the root context (the
effective-context switch), several at once; a request parked for its tenant's upstream token and resumed from
the answer to another request's context; a body held and decided in the body callback (POST `_search`, a
batch Bundle); the route header duplicated, in another case, with `_` for `-`, over HTTP/1.1 and HTTP/2.
Also: Envoy's Lua filter reading the route before ours and after it; an internal redirect (302) from a
tenant's server followed by Envoy. Run with
`ENVOY_BIN=.venv-envoy139/bin/envoy` for 1.39 (passes there too, and with `--build dynamic-module`)."""
from __future__ import annotations

import json
import socket
import threading

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from checks import assert_served_only_by, assert_wasm_vm_never_crashed
from conftest import stop_envoy, wait_for_jwks
from harness import (
    KEYS_FILE, SHIPPED_CONFIG, Envoy, load_yaml, render_config, wasm_plugin_config, ROUTE_HEADER, TENANT_A, TENANT_B, TENANT_HEADER, Idp, bearer, free_port, http_request, wait_until,
)
from test_route_repick import raw_request
from test_trailers_end_a_held_body import h2_post
from test_upstream_auth import _start as start_with_upstream_auth, keyed, pkjwt_b  # noqa: F401 (fixture)
from tokens import Minter

NEW_KID = "test-rs256-repick"


def _concurrently(n: int, send) -> list:
    """`send(i)` from `n` threads started together; their results in order."""
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        results[i] = send(i)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def _no_envoy_bug(env) -> None:
    """Envoy counts each `ENVOY_BUG` it hits (one is a route-cache clear after the route was handed to the
    router: `clearRouteCache` on a blocked route cache)."""
    stats = env.stats(r"^server\.envoy_bug_failures$")
    assert stats.get("server.envoy_bug_failures") == 0, (stats, env.log_tail(30))


def _only_tenant_a(upstreams, n: int, name: str = "tenant-a", tenant: str = TENANT_A) -> None:
    hits = upstreams.hits()
    assert list(hits) == [name], hits
    assert len(hits[name]) == n, hits
    for req in hits[name]:
        assert req.headers.get(TENANT_HEADER) == [tenant], req.headers


@pytest.fixture(scope="module")
def rotating(start_envoy, upstreams, workdir):
    """An Envoy whose IdP is about to publish a key it has never seen (its own IdP, restarted with it)."""
    original = json.loads(KEYS_FILE.read_text(encoding="utf-8"))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
    jwk.update(kid=NEW_KID, alg="RS256", use="sig")
    rotated = workdir / "keys-repick.json"
    rotated.write_text(json.dumps({"keys": original["keys"] + [jwk]}), encoding="utf-8")
    idp = Idp(free_port(), workdir, name="idp-repick").start()

    def plugin(doc):
        doc["provider"]["jwks_min_refetch_s"] = 1

    env = start_envoy("envoy-attack-repick-jwks", {"idp": idp.port, **upstreams.cluster_ports()}, plugin=plugin)
    wait_for_jwks(env, Minter(idp.issuer), upstreams)
    yield env, idp, rotated, key
    stop_envoy(env)
    idp.stop()


def test_attack_requests_parked_for_a_key_set_refetch_and_resumed_from_the_root_context_keep_the_tokens_route(
        rotating, upstreams):
    """Held: requests signed with a kid the filter has not seen wait for the refetch; the answer comes to the
    root context, which makes each request's context effective and edits its headers there. Envoy clears that
    stream's route cache on the edit: every one lands on the token's tenant, none on the client's route."""
    env, idp, rotated, key = rotating
    idp.stop()
    idp.env["IDP_KEYS"] = str(rotated)
    idp.start()
    token = Minter(idp.issuer).token(TENANT_A, kid=NEW_KID, key=key)
    waits_before = env.router_stat("jwks.unknown_kid_refetch_waits")
    upstreams.clear()
    n = 4
    statuses = _concurrently(n, lambda i: env.request(
        "GET", "/Patient", {**bearer(token), ROUTE_HEADER: "tenant_b", TENANT_HEADER: TENANT_B}).status)
    assert statuses == [200] * n, (statuses, env.log_tail(30))
    _only_tenant_a(upstreams, n)
    # They did wait (the path under attack was taken): stats are flushed on the VM's tick.
    waits = wait_until(lambda: (lambda v: v if v > waits_before else None)(
        env.router_stat("jwks.unknown_kid_refetch_waits")), 10, "a parked request counted")
    print(f"requests parked for the refetch: {waits - waits_before} of {n}")
    assert_wasm_vm_never_crashed(env)


@pytest.fixture(scope="module")
def upstream_authed(start_envoy, idp, upstreams, upstream_auth, keyed):  # noqa: F811
    ua = upstream_auth
    # Tenant B has upstream auth, tenant A none: the key set is loaded with A's tokens, B's first requests
    # are still to come.
    env = start_with_upstream_auth(start_envoy, idp, upstreams, ua, "envoy-attack-repick-upstream-auth",
                                   {TENANT_B: pkjwt_b(ua.as_, ua.keys)}, keyed)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    ua.clear()  # tenant A's guard refused the readiness probes (they carry no upstream token)
    yield env, ua, minter
    stop_envoy(env)


def test_attack_first_requests_parked_for_the_upstream_token_resumed_from_another_streams_answer_keep_the_route(
        upstream_authed, upstreams):
    """Held: a tenant's first requests wait for its upstream token; the answer comes to the context that sent
    the token request, which wakes the others by making each one's context effective. Each lands on the
    token's tenant (behind its guard, with the AS's token), none on the client's route header's."""
    env, ua, minter = upstream_authed
    token = minter.token(TENANT_B)
    upstreams.clear()
    n = 4
    statuses = _concurrently(n, lambda i: env.request(
        "GET", "/Patient", {**bearer(token), ROUTE_HEADER: "tenant_a", TENANT_HEADER: TENANT_A}).status)
    assert statuses == [200] * n, (statuses, env.log_tail(30))
    _only_tenant_a(upstreams, n, "tenant-b", TENANT_B)
    assert not ua.guards["tenant_a"].records, ua.guards["tenant_a"].records
    assert len(ua.guards["tenant_b"].allowed()) == n, ua.guards["tenant_b"].records
    waits = wait_until(lambda: env.router_stat(f"tenant.{TENANT_B}.upstream_token.waits") or None, 10,
                       "a request counted as waiting for the token")
    print(f"requests parked for the upstream token: {waits} of {n}")
    assert_wasm_vm_never_crashed(env)


def test_attack_a_post_search_decided_in_the_body_callback_keeps_the_tokens_route(stack):
    token = stack.minter.token(TENANT_A)
    body = b"family=Doe&_count=5"
    resp = stack.get("/Patient/_search", token, {"content-type": "application/x-www-form-urlencoded",
                                                  ROUTE_HEADER: "tenant_b", TENANT_HEADER: TENANT_B},
                     method="POST", body=body)
    req = assert_served_only_by(stack.upstreams, resp, "tenant-a", TENANT_A, method="POST", path="/Patient/_search")
    assert req.body == body


def test_attack_a_batch_bundle_held_and_judged_in_the_body_callback_keeps_the_tokens_route(stack):
    token = stack.minter.token(TENANT_A)
    body = json.dumps({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient?family=Doe"}}]}).encode()
    resp = stack.get("/", token, {"content-type": "application/fhir+json", ROUTE_HEADER: "tenant_b"},
                     method="POST", body=body)
    req = assert_served_only_by(stack.upstreams, resp, "tenant-a", TENANT_A, method="POST", path="/")
    assert req.body == body


def test_attack_a_bundle_ended_by_trailers_and_judged_in_the_trailers_callback_keeps_the_tokens_route(stack):
    """Held: over HTTP/2 a batch Bundle whose end comes as a trailers frame (a client route header in its
    headers, another in its trailers) is judged in the trailers callback, and lands on the token's tenant."""
    body = json.dumps({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient?family=Doe"}}]}).encode()
    headers = {**bearer(stack.minter.token(TENANT_A)), "content-type": "application/fhir+json",
               ROUTE_HEADER: "tenant_b"}
    stack.upstreams.clear()
    status = h2_post(stack.envoy.port, headers, body, trailers=True, trailer=(ROUTE_HEADER, "tenant_b"))
    assert status == 200, status
    _only_tenant_a(stack.upstreams, 1)
    (req,) = stack.upstreams.hits()["tenant-a"]
    assert req.body == body


@pytest.mark.parametrize("spelling", [
    [f"{ROUTE_HEADER}: tenant_b", f"{ROUTE_HEADER}: tenant_b"],
    ["X-FHIR-Tenant-Router-Cluster: tenant_b", f"{ROUTE_HEADER.upper()}: tenant_b"],
    [f"{ROUTE_HEADER.replace('-', '_')}: tenant_b", f"{ROUTE_HEADER}: tenant_b"],
    [f"{ROUTE_HEADER}: tenant_b,tenant_b", f"{ROUTE_HEADER}:tenant_b"],
], ids=["duplicated", "upper-case", "underscore", "comma-and-no-space"])
def test_attack_an_http1_client_route_header_in_any_spelling_is_not_the_route(stack, spelling):
    token = stack.minter.token(TENANT_A)
    stack.upstreams.clear()
    status = raw_request(stack.envoy.port, [f"authorization: Bearer {token}".encode(),
                                            *[s.encode() for s in spelling]])
    assert status == b"HTTP/1.1 200 OK", status
    _only_tenant_a(stack.upstreams, 1)
    (req,) = stack.upstreams.hits()["tenant-a"]
    assert req.headers.get(ROUTE_HEADER, ["tenant_a"]) == ["tenant_a"], req.headers


def _h2_get(port: int, headers: list[tuple[str, str]]) -> tuple[str | None, bool]:
    """One HTTP/2 (prior knowledge) GET /Patient with these headers sent as given (no validation or
    normalisation by the client): the answer's :status, or None with `True` when Envoy reset the stream."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False,
        validate_inbound_headers=False))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "GET"), (":path", "/Patient"), (":scheme", "http"),
                              (":authority", "fhir.example.test"), *headers], end_stream=True)
        s.sendall(conn.data_to_send())
        status = None
        while True:
            data = s.recv(65536)
            if not data:
                return status, status is None
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict((k.decode() if isinstance(k, bytes) else k, v.decode() if isinstance(v, bytes)
                                   else v) for k, v in event.headers)[":status"]
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset,
                                        h2.events.ConnectionTerminated)):
                    return status, isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated))
            s.sendall(conn.data_to_send())


@pytest.mark.parametrize("spelling", [
    [(ROUTE_HEADER, "tenant_b"), (ROUTE_HEADER, "tenant_b")],
    [(ROUTE_HEADER.replace("-", "_"), "tenant_b"), (ROUTE_HEADER, "tenant_b")],
    [("X-FHIR-Tenant-Router-Cluster", "tenant_b")],
], ids=["duplicated", "underscore", "upper-case"])
def test_attack_an_http2_client_route_header_in_any_spelling_is_not_the_route(stack, spelling):
    """Over HTTP/2 a header name is sent as is: duplicated, with `_`, or in upper case (a protocol error
    Envoy refuses). Either the request lands on the token's tenant or it reaches no upstream at all."""
    token = stack.minter.token(TENANT_A)
    stack.upstreams.clear()
    status, reset = _h2_get(stack.envoy.port, [("authorization", f"Bearer {token}"), *spelling])
    hits = stack.upstreams.hits()
    if status == "200":
        _only_tenant_a(stack.upstreams, 1)
        (req,) = hits["tenant-a"]
        assert req.headers.get(ROUTE_HEADER, ["tenant_a"]) == ["tenant_a"], req.headers
    else:
        assert reset or (status is not None and status.startswith("4")), (status, reset)
        assert hits == {}, hits
    print(spelling, status, reset)


@pytest.fixture(scope="module")
def headers_not_held(start_envoy, idp, upstreams):
    """The wasm PluginConfig without `allow_on_headers_stop_iteration` (Istio's WasmPlugin cannot set it): a
    held Bundle's headers are let go from the root context's tick, a second later."""
    cfg = load_yaml(SHIPPED_CONFIG)
    del wasm_plugin_config(cfg)["allow_on_headers_stop_iteration"]
    env = start_envoy("envoy-attack-repick-no-stop-iteration", {"idp": idp.port, **upstreams.cluster_ports()},
                      base=cfg)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    yield env, minter
    stop_envoy(env)


@pytest.mark.wasm_only("allow_on_headers_stop_iteration is a wasm PluginConfig field")
def test_attack_a_bundle_resumed_from_the_root_tick_with_no_edit_there_keeps_the_tokens_route(
        headers_not_held, upstreams):
    """Held: the Bundle's route header is edited in its headers callback, its stream resumed from the root
    context's tick a second later (no edit, no `clear_route_cache` there), its body judged in the body
    callback: it lands on the token's tenant, and Envoy hit no bug on the way."""
    env, minter = headers_not_held
    body = json.dumps({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient?family=Doe"}}]}).encode()
    upstreams.clear()
    resp = env.request("POST", "/", {**bearer(minter.token(TENANT_A)), "content-type": "application/fhir+json",
                                     ROUTE_HEADER: "tenant_b"}, body, timeout=15)
    req = assert_served_only_by(upstreams, resp, "tenant-a", TENANT_A, method="POST", path="/")
    assert req.body == body
    assert "set allow_on_headers_stop_iteration: true" in env.log(), "the request was not held: not this path"
    _no_envoy_bug(env)
    assert_wasm_vm_never_crashed(env)


LUA_READS_THE_ROUTE = """
function envoy_on_request(handle)
  -- The route's metadata: Envoy hands over the route cached for the stream (picked anew if cleared).
  handle:headers():add("x-lua-saw-route-metadata", tostring(handle:metadata():get("k") ~= nil))
end
"""


@pytest.fixture(scope="module")
def route_readers(start_envoy, idp, upstreams):
    """The shipped config with Envoy's Lua filter before ours and after it, each reading the stream's route
    (its metadata) before the router does."""
    cfg = load_yaml(SHIPPED_CONFIG)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    lua = {"name": "envoy.filters.http.lua", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": LUA_READS_THE_ROUTE}}}
    filters = hcm["http_filters"]
    hcm["http_filters"] = [dict(lua, name="lua-before"), *filters[:-1], dict(lua, name="lua-after"), filters[-1]]
    env = start_envoy("envoy-attack-repick-route-readers", {"idp": idp.port, **upstreams.cluster_ports()}, base=cfg)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    yield env, minter
    stop_envoy(env)


def test_attack_a_filter_that_reads_the_route_before_ours_or_after_it_does_not_pin_the_clients_route(
        route_readers, upstreams):
    """Held: a filter before ours that reads the route (picked from the client's header) and one after ours
    that reads it before the router: the route is still the token's tenant's."""
    env, minter = route_readers
    for spoofed in ["tenant_b", "fhir_metadata"]:
        upstreams.clear()
        resp = env.request("GET", "/Patient", {**bearer(minter.token(TENANT_A)), ROUTE_HEADER: spoofed})
        req = assert_served_only_by(upstreams, resp, "tenant-a", TENANT_A)
        assert req.headers.get("x-lua-saw-route-metadata") == ["false", "false"], req.headers
    _no_envoy_bug(env)
    assert_wasm_vm_never_crashed(env)


def _redirector(port: int, location: str) -> dict:
    """A listener of the same Envoy standing in for tenant A's server: it answers every request 302 to
    `location` (Envoy's own route redirect)."""
    return {"name": "redirector", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                         "HttpConnectionManager",
                "stat_prefix": "redirector",
                "route_config": {"virtual_hosts": [{"name": "r", "domains": ["*"], "routes": [{
                    "match": {"prefix": "/"},
                    "redirect": {"path_redirect": location, "response_code": "FOUND"}}]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}


@pytest.mark.parametrize("location", ["/Patient?redirected=1", "/metadata"])
def test_attack_an_internal_redirect_from_a_tenants_server_never_reaches_another_tenant(
        workdir, wasm, idp, upstreams, location):
    """Held: the tenant route follows a 302 inside Envoy (`internal_redirect_policy`): the new stream carries
    the first pass's headers (the filter's route header naming tenant A, no `authorization`), Envoy picks its
    route from them and our filter runs again. A redirect to a FHIR path is refused (no token), one to
    /metadata goes to the metadata server; tenant B's server sees nothing either way."""
    redirector, port, admin = free_port(), free_port(), free_port()
    cfg = render_config(SHIPPED_CONFIG, listener_port=port, admin_port=admin, wasm_path=wasm,
                        cluster_ports={"idp": idp.port, **upstreams.cluster_ports(), "tenant_a": redirector})
    cfg["static_resources"]["listeners"].append(_redirector(redirector, location))
    routes = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"]["virtual_hosts"][0]["routes"]
    for route in routes:
        route["route"]["internal_redirect_policy"] = {"max_internal_redirects": 3}
    name = f"envoy-attack-repick-redirect-{location.strip('/').split('?')[0]}"
    env = Envoy(cfg, workdir, name, port, admin).start()
    try:
        minter = Minter(idp.issuer)
        wait_for_jwks(env, minter, upstreams)
        stat = "cluster.tenant_a.upstream_rq_total"
        before = env.stats(rf"^{stat}$").get(stat, 0)
        upstreams.clear()
        resp = env.request("GET", "/Patient", {**bearer(minter.token(TENANT_A)), ROUTE_HEADER: "tenant_b"})
        # The redirect was followed inside Envoy (tenant A's "server" answered once, the client saw no 302).
        assert env.stats(rf"^{stat}$").get(stat, 0) == before + 1
        assert resp.status != 302, resp
        hits = upstreams.hits()
        assert "tenant-b" not in hits, hits
        if location == "/metadata":
            assert resp.status == 200, resp
            assert list(hits) == ["metadata"], hits
            (req,) = hits["metadata"]
            assert TENANT_HEADER not in req.headers and "authorization" not in req.headers, req.headers
        else:
            assert resp.status == 401, resp
            assert hits == {}, hits
        _no_envoy_bug(env)
        assert_wasm_vm_never_crashed(env)
    finally:
        env.stop()


def test_no_request_in_this_module_crashed_the_wasm_vm_or_hit_an_envoy_bug(
        stack, rotating, upstream_authed):
    assert http_request(stack.envoy.admin_port, "GET", "/ready").status == 200
    for env in (stack.envoy, rotating[0], upstream_authed[0]):
        _no_envoy_bug(env)
        assert_wasm_vm_never_crashed(env)
