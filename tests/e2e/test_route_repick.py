"""The route follows the filter's route header, not the client's, and the request the upstream gets is the
client's but for the filter's edits, byte for byte.

Envoy's connection manager picks the request's route when its headers arrive, before any filter runs (with
`cluster_header`, the cluster's name is read from the header then). A filter that edits a routing header must
make Envoy pick again. The wasm build makes no `clear_route_cache` call for it: Envoy's wasm host clears the
route cache on every request-header edit (`Context::onHeadersModified`, for modules of Proxy-Wasm ABI 0.2.1
such as ours; since Envoy 1.33 only newer ABIs opt out), and the build makes its edits one by one
(`proxy_remove_header_map_value`, `proxy_replace_header_map_value`: the last test traces them; one
`proxy_set_header_map_pairs` was measured and not kept). test_attack_route_repick.py tries the other paths
(requests woken from another context, bodies and trailers judged later, header spellings).

The first test is the oracle for the others: with Envoy's own Lua filter as the editor (no code of ours), an
edit of the route header without a route-cache clear leaves the route Envoy picked from the client's header,
on this Envoy. Run with `ENVOY_BIN=.venv-envoy139/bin/envoy` for 1.39."""
from __future__ import annotations

import re
import socket

import pytest

from checks import assert_served_only_by, assert_wasm_vm_never_crashed
from harness import (
    DM_FILTER, ROUTE_HEADER, SHIPPED_CONFIG, TENANT_A, TENANT_B, TENANT_HEADER, WASM_FILTER, WASM_PATH, Envoy,
    free_port, http_request, render_config, wait_until,
)

LUA_EDIT = f"""
function envoy_on_request(handle)
  handle:headers():replace("{ROUTE_HEADER}", "tenant_a")
end
"""


def lua_editor_config(cluster_ports: dict[str, int], clear_route_cache: bool) -> tuple[dict, int, int]:
    """The shipped config with its router filter in front of it replaced by a Lua filter that sets the route
    header to `tenant_a` (and clears the route cache or not, Lua's own option)."""
    port, admin = free_port(), free_port()
    cfg = render_config(SHIPPED_CONFIG, listener_port=port, admin_port=admin, cluster_ports=cluster_ports)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] not in (WASM_FILTER, DM_FILTER)]
    hcm["http_filters"].insert(0, {"name": "envoy.filters.http.lua", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "clear_route_cache": clear_route_cache,
        "default_source_code": {"inline_string": LUA_EDIT}}})
    return cfg, port, admin


def test_envoy_routes_by_the_clients_header_unless_an_edit_clears_the_route_cache(workdir, upstreams):
    for clear, served_by in [(False, "tenant-b"), (True, "tenant-a")]:
        cfg, port, admin = lua_editor_config(upstreams.cluster_ports(), clear)
        env = Envoy(cfg, workdir, f"envoy-lua-edit-clear-{clear}", port, admin, build="none").start()
        try:
            upstreams.clear()
            resp = env.request("GET", "/Patient", {ROUTE_HEADER: "tenant_b"})
            assert resp.status == 200, resp
            hits = upstreams.hits()
            assert list(hits) == [served_by], (clear, hits)
            # The upstream got the edited header either way: only the route differs.
            assert hits[served_by][0].headers.get(ROUTE_HEADER, ["tenant_a"]) == ["tenant_a"], hits
        finally:
            env.stop()


def test_a_client_route_header_naming_another_tenant_or_a_header_matched_route_is_not_the_route(stack):
    token = stack.minter.token(TENANT_A)
    # tenant_b: `cluster_header` read it when Envoy picked the route; fhir_metadata: the shipped config's
    # header-matched route for discovery documents would have been picked.
    for spoofed in ["tenant_b", "fhir_metadata"]:
        stack.upstreams.clear()
        resp = stack.get("/Patient", token, {ROUTE_HEADER: spoofed})
        assert_served_only_by(stack.upstreams, resp, "tenant-a", TENANT_A)
    assert_wasm_vm_never_crashed(stack.envoy)


def raw_request(port: int, lines: list[bytes]) -> bytes:
    """One HTTP/1.1 request of these header lines (bytes: any octet a client can send), the answer's status
    line."""
    head = b"\r\n".join([b"GET /Patient?family=x HTTP/1.1", b"host: fhir.example.test", b"connection: close",
                         *lines]) + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    return received.split(b"\r\n", 1)[0]


def test_the_upstream_gets_the_clients_headers_but_for_the_filters_edits_byte_for_byte(stack):
    token = stack.minter.token(TENANT_A)
    lines = [
        f"{TENANT_HEADER}: {TENANT_B}".encode(),
        b"x-dup: 1",
        f"{ROUTE_HEADER}: tenant_b".encode(),
        f"authorization: Bearer {token}".encode(),
        b"x-bytes: caf\xe9 \xff~",
        f"{TENANT_HEADER}: {TENANT_B}".encode(),
        b"x-dup: 2",
        f"{ROUTE_HEADER}: tenant_b".encode(),
        f"{TENANT_HEADER}: ".encode(),
        b"x-dup: 3",
    ]
    status = raw_request(stack.envoy.port, lines)
    assert status == b"HTTP/1.1 200 OK", status
    hits = stack.upstreams.hits()
    assert list(hits) == ["tenant-a"], hits
    (req,) = hits["tenant-a"]
    assert req.headers.get(TENANT_HEADER) == [TENANT_A], req.headers
    assert req.headers.get(ROUTE_HEADER, ["tenant_a"]) == ["tenant_a"], req.headers
    assert "authorization" not in req.headers, req.headers
    # Duplicates in their order; a value that is not UTF-8 with its bytes (the recorder reads Latin-1).
    assert req.headers.get("x-dup") == ["1", "2", "3"], req.headers
    assert [v.encode("latin-1") for v in req.headers.get("x-bytes", [])] == [b"caf\xe9 \xff~"], req.headers
    assert_wasm_vm_never_crashed(stack.envoy)


def request_headers_host_calls(log: str) -> list[str]:
    """The host calls the VM made during its last complete `proxy_on_request_headers`, from V8's trace lines
    (`[vm->host] env.<call>(`) on that callback's thread."""
    lines = log.splitlines()
    ends = [i for i, l in enumerate(lines) if "[host<-vm] proxy_on_request_headers return" in l]
    assert ends, "no traced request-headers callback"
    end = ends[-1]
    start = max(i for i, l in enumerate(lines[:end]) if "[host->vm] proxy_on_request_headers(" in l)
    thread = re.search(r"\]\[(\d+)\]\[", lines[start]).group(1)
    return [m.group(1) for l in lines[start:end] if f"][{thread}][" in l
            for m in [re.search(r"\[vm->host\] env\.(\w+)\(", l)] if m]


@pytest.mark.wasm_only("counts the proxy-wasm host calls V8 traces")
def test_a_cache_hit_makes_no_clear_route_cache_call_and_still_lands_on_its_tenant(stack):
    """Envoy's own trace of the VM's calls into the host (V8's `[vm->host]` lines at `wasm` trace level) for a
    cache hit with the shipped configuration and a client's route header naming another tenant: one
    header-map read, the three header edits, no foreign call (no `clear_route_cache`; a cache hit checks no
    signature), and the request lands on the token's tenant."""
    token = stack.minter.token(TENANT_A)
    stack.get("/Patient", token)  # the cache is filled
    assert http_request(stack.envoy.admin_port, "POST", "/logging?wasm=trace").status == 200
    try:
        start = len(stack.envoy.log())
        stack.upstreams.clear()
        resp = stack.get("/Patient", token, {ROUTE_HEADER: "tenant_b"})
        assert_served_only_by(stack.upstreams, resp, "tenant-a", TENANT_A)
        wait_until(lambda: "[host<-vm] proxy_on_request_headers return" in stack.envoy.log()[start:], 10,
                   "the trace of the request's host calls")
    finally:
        http_request(stack.envoy.admin_port, "POST", "/logging?wasm=info")
    calls = request_headers_host_calls(stack.envoy.log()[start:])
    print("host calls of the request-headers callback:", calls)
    assert calls.count("proxy_get_header_map_pairs") == 1, calls
    # The shipped configuration: the client's route header and `authorization` out; X-Forwarded-Host and
    # -Proto from `public_base_url`, the tenant's `authority`, the tenant and route headers set; the clock;
    # the access log's two filter-state values; the audit line. Before: the same and a `clear_route_cache`.
    assert calls == [
        "proxy_get_header_map_pairs", "proxy_get_current_time_nanoseconds",
        *["proxy_remove_header_map_value"] * 2, *["proxy_replace_header_map_value"] * 5,
        "proxy_set_property", "proxy_set_property", "proxy_log",
    ], calls


@pytest.mark.wasm_only("the Proxy-Wasm ABI the module declares")
def test_the_module_declares_proxy_wasm_abi_0_2_1_whose_header_edits_make_envoy_repick_the_route():
    """The shell leaves `clear_route_cache` out because Envoy re-picks the route on a header edit of a module of
    ABI 0.2.1 or older; for a newer ABI it would not (envoy 1.33 changelog). An SDK upgrade that changes the
    declared ABI must fail here, not misroute."""
    exports = set(re.findall(rb"proxy_abi_version_\d+_\d+_\d+", WASM_PATH.read_bytes()))
    assert exports == {b"proxy_abi_version_0_2_1"}, exports
