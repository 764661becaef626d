"""The shipped demo config (envoy/envoy.yaml, only its ports re-pointed) applies its own advice on `Host`
(docs/security.md, "Forwarding headers and links"; issue 24, item 5): no spoofed `Host` reaches a link, a `Location` or an
upstream.

Tenant A is served by the real FHIR engine (tests/fhir, Medplum) started with FHIR_HONOUR_FORWARDED=0: it builds
its links from the request's own `Host`, the server the README warns about. Tenant B and the discovery
endpoints are served by recording upstreams, which show the `Host` they were sent. The control is the same
request sent straight to the engine: there the spoofed `Host` IS echoed into every link, so the engine is one
that would leak it, and the shipped config is what stops it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fhir"))

from conftest import stop_envoy, wait_for_jwks  # noqa: E402
from engine import EngineError, FhirEngine  # noqa: E402
from harness import SHIPPED_CONFIG, TENANT_A, TENANT_B, bearer, http_request, load_yaml, plugin_json  # noqa: E402
from tokens import Minter  # noqa: E402

SPOOFED_HOST = "spoofed-host.evil.example"


def _links(body: bytes) -> list[str]:
    doc = json.loads(body)
    return [link["url"] for link in doc.get("link", [])] + [e["fullUrl"] for e in doc.get("entry", [])
                                                            if "fullUrl" in e]


@pytest.fixture(scope="module")
def shipped(workdir, start_envoy, idp, upstreams):
    try:
        engine = FhirEngine("host-from-host", workdir, honour_forwarded=False).start()
    except EngineError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        env = start_envoy("envoy-shipped-host", {"idp": idp.port, "tenant_a": engine.port,
                                                 "tenant_b": upstreams.tenant_b.port,
                                                 "fhir_metadata": upstreams.metadata.port})
        minter = Minter(idp.issuer)
        wait_for_jwks(env, minter, upstreams)
        yield env, minter, engine
        stop_envoy(env)
    finally:
        engine.stop()


def test_the_engine_echoes_a_spoofed_host_into_its_links_when_asked_directly(shipped):
    """The control: without the proxy, this engine writes the client's Host into every link."""
    _, _, engine = shipped
    resp = http_request(engine.port, "GET", "/Patient?_count=1", {"host": SPOOFED_HOST})
    assert resp.status == 200, resp
    links = _links(resp.body)
    assert links and all(SPOOFED_HOST in u for u in links), links


def test_the_shipped_config_lets_no_spoofed_host_into_a_link_a_location_or_an_upstream(shipped, upstreams):
    env, minter, _ = shipped
    doc = plugin_json(load_yaml(SHIPPED_CONFIG))
    assert all(t.get("authority") for t in doc["tenants"].values()), "every shipped tenant names its Host"
    assert doc.get("public_base_url"), "links and X-Forwarded-* come from the configuration"
    # Tenant A: the engine that builds links from Host.
    resp = http_request(env.port, "GET", "/Patient?_count=1", {**bearer(minter.token(TENANT_A)), "host": SPOOFED_HOST,
                                                                "x-forwarded-host": SPOOFED_HOST})
    assert resp.status == 200, resp
    links = _links(resp.body)
    assert links, resp.body[:500]
    assert not [u for u in links if "evil" in u], links
    assert all(u.startswith(("http://tenant-a.fhir.internal/", f"http://127.0.0.1:{env.port}/")) for u in links), links
    assert "evil" not in json.dumps(resp.headers).lower(), resp.headers  # Location, Content-Location, …
    # Tenant B and the discovery endpoints: what Host the upstream was sent.
    upstreams.clear()
    for tenant, upstream, path in ((TENANT_B, upstreams.tenant_b, "/Patient"), (None, upstreams.metadata, "/metadata")):
        headers = {**(bearer(minter.token(tenant)) if tenant else {}), "host": SPOOFED_HOST}
        resp = http_request(env.port, "GET", path, headers)
        assert resp.status == 200, resp
        (req,) = upstream.requests
        assert "evil" not in repr(req.headers).lower(), repr(req.headers)
        assert req.headers.get("host") == (["tenant-b.fhir.internal"] if tenant else ["fhir-metadata.internal"])
        assert req.headers.get("x-forwarded-host") == [f"127.0.0.1:{env.port}"], req.headers
