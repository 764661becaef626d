"""Forwarding headers from the client are never trusted: a spoofed Host, X-Forwarded-Host/-Proto/-Prefix/-Port and
Forwarded never appear in a rewritten link, a Location header, or what an upstream receives. Links are built from
`public_base_url` only (issue 13, item 3).

Four tenants behind the shipped envoy/envoy.yaml, with `public_base_url` set to a base no client sends:
  A  a recording upstream, with an authority, base path and links base of its own (what an upstream receives);
  B  a recording upstream with no settings at all;
  C  a real FHIR engine under a base path that ignores X-Forwarded-* (its links are rewritten by the filter);
  D  a real FHIR engine that builds its links and Location from X-Forwarded-* (the filter sets them).
Discovery (`/metadata`) goes to the recording metadata upstream.

X-Forwarded-Proto is Envoy's: it sets one on every request and routes none without it, so the filter overwrites
it from `public_base_url` instead of removing it. Without `public_base_url`, what the upstream gets is what Envoy
left: with `use_remote_address: true` (the edge setting) that is the connection's own scheme, tested last.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fhir"))

from checks import assert_wasm_vm_never_crashed  # noqa: E402
from conftest import stop_envoy, wait_for_jwks  # noqa: E402
from engine import EngineError, FhirEngine  # noqa: E402
from harness import (  # noqa: E402
    SHIPPED_CONFIG, TENANT_A, TENANT_B, TENANT_HEADER, Response, bearer, hcm_settings, http_request, load_yaml,
)
from test_tenant_registry import static_cluster  # noqa: E402
from tokens import Minter  # noqa: E402

TENANT_C = "0c0c0c0c-1111-4222-8333-444455556666"
TENANT_D = "0d0d0d0d-2222-4333-8444-555566667777"
PUBLIC = "https://fhir.public.example/r4"
BASE_PATH = "/api/FHIR/R4"
SPOOFED = {
    "host": "host.evil.example",
    "x-forwarded-host": "xfh.evil.example",
    "x-forwarded-proto": "gopher",
    "x-forwarded-prefix": "/evil-prefix",
    "x-forwarded-port": "6543",
    "forwarded": "for=192.0.2.1;host=fwd.evil.example;proto=gopher",
}
# Every spoofed value carries one of these; neither is hex, so no request id or hash can hold one by chance.
MARKERS = ("evil", "gopher")
# What every upstream is told instead, from public_base_url.
FROM_CONFIG = {"x-forwarded-host": ["fhir.public.example"], "x-forwarded-proto": ["https"],
               "x-forwarded-prefix": ["/r4"]}
WRITABLE = {"interactions": ["read", "search", "create"]}


def spoofed_request(port: int, method: str, path: str, headers: dict[str, str], body: bytes | None = None) -> Response:
    """A request with the spoofed Host and forwarding headers (and `headers`)."""
    typed = {"content-type": "application/fhir+json"} if body is not None else {}
    return http_request(port, method, path, {**SPOOFED, **typed, **headers}, body)


class Fwd:
    def __init__(self, env, upstreams, minter, engines):
        self.env, self.upstreams, self.minter, self.engines = env, upstreams, minter, engines

    def send(self, tenant: str | None, method: str, path: str, body: bytes | None = None) -> Response:
        headers = bearer(self.minter.token(tenant)) if tenant else {}
        return spoofed_request(self.env.port, method, path, headers, body)


@pytest.fixture(scope="module")
def fwd(workdir, start_envoy, idp, upstreams):
    engines = {}
    try:
        engines["plain"] = FhirEngine("fwd-plain", workdir, base_path=BASE_PATH, honour_forwarded=False).start()
        engines["honouring"] = FhirEngine("fwd-honouring", workdir).start()
    except EngineError as exc:
        for e in engines.values():
            e.stop()
        pytest.fail(str(exc), pytrace=False)
    cfg = load_yaml(SHIPPED_CONFIG)
    cfg["static_resources"]["clusters"] += [static_cluster("engine_plain", engines["plain"].port),
                                            static_cluster("engine_honouring", engines["honouring"].port)]

    def plugin(doc):
        doc["public_base_url"] = PUBLIC
        doc["tenants"] = {
            TENANT_A: {"cluster": "tenant_a", "authority": "fhir.internal.example", "base_path": "/fhir",
                       "links_base_url": "http://fhir.internal.example/fhir"},
            TENANT_B: {"cluster": "tenant_b"},
            TENANT_C: {"cluster": "engine_plain", "authority": f"127.0.0.1:{engines['plain'].port}",
                       "base_path": BASE_PATH, "links_base_url": engines["plain"].base_url, "allow": WRITABLE},
            TENANT_D: {"cluster": "engine_honouring", "allow": WRITABLE},
        }
    try:
        env = start_envoy("envoy-forwarding-headers", {"idp": idp.port, **upstreams.cluster_ports()}, base=cfg,
                          plugin=plugin)
        minter = Minter(idp.issuer)
        wait_for_jwks(env, minter, upstreams)
        yield Fwd(env, upstreams, minter, engines)
        stop_envoy(env)
    finally:
        for e in engines.values():
            e.stop()


def assert_no_spoofed_value(where: str, text: str) -> None:
    found = [m for m in MARKERS if m in text.lower()]
    assert not found, f"a client-sent forwarding value reached {where}: {text[:2000]}"


def only_request(upstream):
    (req,) = upstream.requests
    return req


@pytest.mark.parametrize("tenant,upstream_name,path", [
    (TENANT_A, "tenant_a", "/fhir/Patient?family=x"),
    (TENANT_B, "tenant_b", "/Patient?family=x"),
    (None, "metadata", "/metadata"),
], ids=["tenant-with-settings", "tenant-without-settings", "discovery"])
def test_no_spoofed_forwarding_header_reaches_an_upstream(fwd, tenant, upstream_name, path):
    resp = fwd.send(tenant, "GET", "/metadata" if tenant is None else "/Patient?family=x")
    assert resp.status == 200, resp
    req = only_request(getattr(fwd.upstreams, upstream_name))
    assert req.path == path
    for name, value in FROM_CONFIG.items():
        assert req.headers.get(name) == value, (name, req.headers)
    assert "x-forwarded-port" not in req.headers and "forwarded" not in req.headers, req.headers
    # Host is the filter's for a tenant with an `authority`; otherwise Envoy's route decides (it passes the
    # client's on here: docs/security.md, "Forwarding headers and links").
    headers = {k: v for k, v in req.headers.items() if k != "host" or tenant == TENANT_A}
    assert_no_spoofed_value(f"the {upstream_name} upstream", repr(headers))
    if tenant == TENANT_A:
        assert req.headers["host"] == ["fhir.internal.example"], req.headers
        assert req.headers[TENANT_HEADER] == [TENANT_A]
    assert_no_spoofed_value("the answer", repr(resp.headers) + resp.body.decode())


def test_links_and_location_of_a_rewritten_server_are_built_from_public_base_url(fwd):
    created = fwd.send(TENANT_C, "POST", "/Patient", b'{"resourceType":"Patient","name":[{"family":"Spoofless"}]}')
    assert created.status == 201, created
    location = created.header("location") or ""
    assert location.startswith(f"{PUBLIC}/Patient/"), created.headers
    assert_no_spoofed_value("the Location", repr(created.headers) + created.body.decode())
    found = fwd.send(TENANT_C, "GET", "/Patient?family=Spoofless&_count=1")
    assert found.status == 200, found
    doc = found.json()
    urls = [link["url"] for link in doc["link"]] + [e["fullUrl"] for e in doc.get("entry", [])]
    assert len(urls) >= 2 and all(u.startswith(f"{PUBLIC}/") for u in urls), urls
    assert fwd.engines["plain"].base_url not in found.body.decode()
    assert_no_spoofed_value("a link", repr(found.headers) + found.body.decode())


def test_a_server_that_honours_forwarded_headers_gets_public_base_url_not_the_clients(fwd):
    created = fwd.send(TENANT_D, "POST", "/Patient", b'{"resourceType":"Patient","name":[{"family":"Honoured"}]}')
    assert created.status == 201, created
    assert (created.header("location") or "").startswith(f"{PUBLIC}/Patient/"), created.headers
    assert_no_spoofed_value("the Location", repr(created.headers) + created.body.decode())
    found = fwd.send(TENANT_D, "GET", "/Patient?family=Honoured&_count=1")
    assert found.status == 200, found
    doc = found.json()
    urls = [link["url"] for link in doc["link"]] + [e["fullUrl"] for e in doc.get("entry", [])]
    assert len(urls) >= 2 and all(u.startswith(f"{PUBLIC}/") for u in urls), urls
    assert_no_spoofed_value("a link", repr(found.headers) + found.body.decode())
    assert_wasm_vm_never_crashed(fwd.env)


def test_without_public_base_url_no_forwarding_header_is_sent_and_envoy_owns_x_forwarded_proto(
        start_envoy, idp, upstreams):
    cfg = load_yaml(SHIPPED_CONFIG)
    hcm_settings(cfg)["use_remote_address"] = True  # the edge: Envoy overwrites the client's X-Forwarded-Proto

    def plugin(doc):
        doc.pop("public_base_url", None)  # the shipped demo sets one (issue 24); this test is about its absence

    env = start_envoy("envoy-forwarding-edge", {"idp": idp.port, **upstreams.cluster_ports()}, base=cfg,
                      plugin=plugin)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    for tenant, upstream in ((TENANT_A, upstreams.tenant_a), (None, upstreams.metadata)):
        headers = bearer(minter.token(tenant)) if tenant else {}
        resp = spoofed_request(env.port, "GET", "/Patient" if tenant else "/metadata", headers)
        assert resp.status == 200, resp
        req = only_request(upstream)
        upstream.clear()
        assert req.headers.get("x-forwarded-proto") == ["http"], req.headers  # the connection's, from Envoy
        for name in ("x-forwarded-host", "x-forwarded-prefix", "x-forwarded-port", "forwarded"):
            assert name not in req.headers, (name, req.headers)
        assert_no_spoofed_value("an upstream", repr({k: v for k, v in req.headers.items() if k != "host"}))
    stop_envoy(env)
