"""The deployment examples' routes, run by a real Envoy loading our module: what path and Host the FHIR server
receives for `/metadata`, a patient search, a paging link and a batch POST, through each example as written.

* docker-compose: examples/docker-compose/envoy.yaml itself (addresses re-pointed, nothing else).
* Istio and Envoy Gateway: the Envoy configuration those gateways render from examples/istio/*.yaml and
  examples/envoy-gateway/*.yaml (tests/e2e/gateways.py, which cites the gateways' source for each rule):
  Istio's prefix rewrite, Envoy Gateway's regex rewrite and per-route wasm filter, and in both the route chosen
  again on the filter's header after `clear_route_cache`.

The FHIR servers are FAKE HAPI servers (tests/e2e/fake_hapi.py): they serve FHIR under /fhir/ only and write
their links from the example's own `hapi.fhir.server_address`, the way HAPI does. The IdP is a JWKS server
that serves the test keys at whatever path the example's `jwks_uri` names; tokens carry the example's own
issuer and audience, so every plugin configuration runs exactly as shipped.
"""
from __future__ import annotations

import copy
import json
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from attack.forge import public_jwk
from checks import assert_unauthorized, assert_wasm_vm_never_crashed
from conftest import stop_envoy
from fake_hapi import FakeHapi, batch_body
from gateways import WASM_TYPE, eg_url_rewrite, eg_routes, render_envoy_gateway, render_istio
from harness import (
    REPO, ROUTE_HEADER, TENANT_A, TENANT_B, TENANT_HEADER, Envoy, Response, free_port, http_request, load_yaml,
    plugin_json, render_config, wait_until,
)
from tokens import ES_KID, RS_KID, Minter
from upstream import RecordingUpstream

pytestmark = pytest.mark.wasm_only("the examples load the .wasm (WasmPlugin, EnvoyExtensionPolicy, compose)")

EXAMPLES_DIR = REPO / "examples"
FHIR_SERVERS = EXAMPLES_DIR / "kubernetes" / "fhir-servers.yaml"
COMPOSE_DIR = EXAMPLES_DIR / "docker-compose"
EXAMPLES = ["istio", "envoy-gateway", "docker-compose"]


def _docs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


class JwksServer(RecordingUpstream):
    """The IdP's key endpoint: the public half of the test keys, at any path."""

    def respond(self, method: str, target: str) -> tuple[int, dict]:
        return 200, {"keys": [public_jwk(RS_KID), public_jwk(ES_KID)]}


# ------------------------------------------------------------------------------------ the FHIR servers

def k8s_fhir_servers() -> dict[tuple[str, str, int], str | None]:
    """Service (namespace, name, port) -> the hapi.fhir.server_address of the HAPI behind it."""
    docs = _docs(FHIR_SERVERS)
    out = {}
    for svc in [d for d in docs if d["kind"] == "Service"]:
        ns = svc["metadata"]["namespace"]
        (dep,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["namespace"] == ns
                  and d["spec"]["template"]["metadata"]["labels"] == svc["spec"]["selector"]]
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        for port in svc["spec"]["ports"]:
            out[(ns, svc["metadata"]["name"], port["port"])] = env.get("hapi.fhir.server_address")
    return out


def compose_fhir_servers() -> dict[str, str | None]:
    """compose service name -> its hapi.fhir.server_address."""
    services = load_yaml(COMPOSE_DIR / "docker-compose.yml")["services"]
    return {name: (svc.get("environment") or {}).get("hapi.fhir.server_address")
            for name, svc in services.items() if svc["image"].startswith("hapiproject/hapi:")}


# ------------------------------------------------------------------------------------------ examples

@dataclass
class Example:
    name: str
    envoy: Envoy
    plugin: dict
    hapis: dict[str, FakeHapi]          # by the name the route's backend has (Service or compose service)
    tenant_servers: dict[str, str]      # tenant id -> hapis key
    metadata_server: str
    minter: Minter
    jwks_requests: list = field(default_factory=list)

    @property
    def public(self) -> urllib.parse.SplitResult:
        return urllib.parse.urlsplit(self.plugin["public_base_url"])

    def token(self, tenant: str = TENANT_A) -> str:
        return self.minter.token(tenant)

    def request(self, method: str, target: str, *, tenant: str | None = None, headers: dict | None = None,
                body: bytes | None = None, host: str | None = None) -> Response:
        """One request as a client of the public endpoint sends it: Host is the public host."""
        all_headers = {"host": host or self.public.netloc}
        if tenant:
            all_headers["authorization"] = f"Bearer {self.token(tenant)}"
        if body is not None:
            all_headers["content-type"] = "application/fhir+json"
        all_headers.update(headers or {})
        return http_request(self.envoy.port, method, target, all_headers, body)

    def hits(self) -> dict[str, list]:
        return {name: h.requests for name, h in self.hapis.items() if h.requests}

    def clear(self) -> None:
        for h in self.hapis.values():
            h.clear()


def _k8s_hapis() -> tuple[dict[str, FakeHapi], dict[tuple[str, str, int], int]]:
    hapis, services = {}, {}
    for (ns, name, port), address in k8s_fhir_servers().items():
        hapis[name] = FakeHapi(name, address).start()
        services[(ns, name, port)] = hapis[name].port
    return hapis, services


def _labels_to_servers(plugin: dict, label_to_server: dict[str, str]) -> tuple[dict[str, str], str]:
    tenants = {t: label_to_server[v["cluster"]] for t, v in plugin["tenants"].items()}
    return tenants, label_to_server[plugin["metadata_cluster"]]


def _istio_backends(vs: dict, route_header: str) -> dict[str, str]:
    """route label -> Service name, from the VirtualService."""
    out = {}
    for http in vs["spec"]["http"]:
        host = http["route"][0]["destination"]["host"]
        for m in http["match"]:
            out[m["headers"][route_header]["exact"]] = host.split(".")[0]
    return out


def _eg_backends(route: dict, route_header: str) -> dict[str, str]:
    out = {}
    for rule in route["spec"]["rules"]:
        for m in rule["matches"]:
            for h in m.get("headers", []):
                if h["name"] == route_header:
                    out[h["value"]] = rule["backendRefs"][0]["name"]
    return out


def build_istio(wasm: Path, jwks: JwksServer, listener_port: int, admin_port: int):
    plugin_doc = _one(_docs(EXAMPLES_DIR / "istio" / "wasmplugin.yaml"), "WasmPlugin")
    routing = _docs(EXAMPLES_DIR / "istio" / "routing.yaml")
    vs, gw = _one(routing, "VirtualService"), _one(routing, "Gateway")
    hapis, services = _k8s_hapis()
    services[("keycloak", "keycloak", 8080)] = jwks.port
    cfg = render_istio(plugin_doc, gw, vs, wasm, listener_port=listener_port, admin_port=admin_port,
                       services=services)
    plugin = plugin_doc["spec"]["pluginConfig"]
    return cfg, plugin, hapis, _istio_backends(vs, plugin["route_header"])


def eg_objects() -> tuple[dict, dict, dict, dict[str, dict], list[dict]]:
    policy = _one(_docs(EXAMPLES_DIR / "envoy-gateway" / "envoy-extension-policy.yaml"), "EnvoyExtensionPolicy")
    docs = _docs(EXAMPLES_DIR / "envoy-gateway" / "httproute.yaml")
    filters = {d["metadata"]["name"]: d for d in docs if d["kind"] == "HTTPRouteFilter"}
    patches = [d for d in docs if d["kind"] == "EnvoyPatchPolicy"]
    return policy, _one(docs, "Gateway"), _one(docs, "HTTPRoute"), filters, patches


def build_envoy_gateway(wasm: Path, jwks: JwksServer, listener_port: int, admin_port: int, route=None):
    policy, gw, http_route, filters, patches = eg_objects()
    hapis, services = _k8s_hapis()
    services[("keycloak", "keycloak", 8080)] = jwks.port
    cfg = render_envoy_gateway(policy, gw, route or http_route, filters, patches, wasm,
                               listener_port=listener_port, admin_port=admin_port, services=services)
    plugin = policy["spec"]["wasm"][0]["config"]
    return cfg, plugin, hapis, _eg_backends(http_route, plugin["route_header"])


def build_compose(wasm: Path, jwks: JwksServer, listener_port: int, admin_port: int):
    hapis = {name: FakeHapi(name, address).start() for name, address in compose_fhir_servers().items()}
    cluster_ports = {name: h.port for name, h in hapis.items()}
    cfg = load_yaml(COMPOSE_DIR / "envoy.yaml")
    plugin = plugin_json(cfg)
    cluster_ports[plugin["provider"]["jwks_cluster"]] = jwks.port
    cfg = render_config(cfg, listener_port=listener_port, admin_port=admin_port, cluster_ports=cluster_ports,
                        wasm_path=wasm)
    return cfg, plugin, hapis, {name: name for name in hapis}  # compose: the label IS the Envoy cluster


BUILDERS = {"istio": build_istio, "envoy-gateway": build_envoy_gateway, "docker-compose": build_compose}


def start_example(name: str, workdir: Path, wasm: Path, jwks: JwksServer, **kw) -> Example:
    port, admin = free_port(), free_port()
    cfg, plugin, hapis, label_to_server = BUILDERS[name](wasm, jwks, port, admin, **kw)
    env = Envoy(cfg, workdir, f"example-{name}" + ("-variant" if kw else ""), port, admin)
    tenants, metadata = _labels_to_servers(plugin, label_to_server)
    minter = Minter(plugin["provider"]["issuer"], audience=plugin["provider"]["audiences"][0])
    ex = Example(name, env, plugin, hapis, tenants, metadata, minter)
    jwks.clear()
    try:
        env.start()
        # The JWKS is fetched after start: a valid token gets 503 until it arrives.
        wait_until(lambda: ex.request("GET", "/Patient", tenant=TENANT_A).status != 503, 30,
                   f"{name}: the module to fetch the JWKS", on_timeout=lambda: "\n" + env.log_tail())
    except Exception:
        stop_example(ex)
        raise
    ex.jwks_requests = jwks.requests
    ex.clear()
    return ex


def stop_example(ex: Example) -> None:
    stop_envoy(ex.envoy)
    for h in ex.hapis.values():
        h.stop()


@pytest.fixture(scope="module")
def jwks():
    server = JwksServer("jwks").start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=EXAMPLES)
def example(request, workdir, wasm, jwks) -> Example:
    try:
        ex = start_example(request.param, workdir, wasm, jwks)
    except Exception as exc:  # noqa: BLE001 - report the Envoy log, not a stack of harness frames
        pytest.fail(f"{request.param}: {exc}", pytrace=False)
    yield ex
    stop_example(ex)


@pytest.fixture(autouse=True)
def _clear_fake_hapis(request):
    if "example" in request.fixturenames:
        request.getfixturevalue("example").clear()


def only_request(ex: Example, server: str):
    hits = ex.hits()
    assert list(hits) == [server], f"expected exactly {server} to be asked, got {hits}"
    (req,) = hits[server]
    return req


# ---------------------------------------------------------------------------------------------- tests

def test_every_hapi_writes_its_links_from_the_public_base_url(example):
    """hapi.fhir.server_address is what makes HAPI's links work behind the gateway (without it HAPI writes
    .../fhir/..., which the rewrite turns into /fhir/fhir/...); it must be the plugin's public base."""
    for name, hapi in example.hapis.items():
        assert hapi.server_address, f"{name}: no hapi.fhir.server_address"
        assert hapi.server_address.rstrip("/") == example.plugin["public_base_url"], name


def test_the_module_runs_the_examples_plugin_configuration_unchanged(example):
    filters = [f for listener in example.envoy.cfg["static_resources"]["listeners"]
               for chain in listener["filter_chains"] for nf in chain["filters"]
               for f in nf["typed_config"]["http_filters"] if f["typed_config"]["@type"] == WASM_TYPE]
    (wasm_filter,) = filters
    assert json.loads(wasm_filter["typed_config"]["config"]["configuration"]["value"]) == example.plugin


def test_the_module_fetched_the_keys_from_the_examples_jwks_uri_through_its_cluster(example):
    jwks_uri = urllib.parse.urlsplit(example.plugin["provider"]["jwks_uri"])
    assert example.jwks_requests, "no JWKS fetch reached the IdP"
    for req in example.jwks_requests:
        assert (req.method, req.path, req.header("host")) == ("GET", jwks_uri.path, jwks_uri.netloc)


def test_metadata_reaches_hapi_as_fhir_metadata_without_a_token(example):
    resp = example.request("GET", "/metadata")
    assert resp.status == 200, resp
    assert resp.json()["resourceType"] == "CapabilityStatement"
    req = only_request(example, example.metadata_server)
    assert (req.method, req.path) == ("GET", "/fhir/metadata")
    assert req.header("host") == example.public.netloc
    assert req.header("x-forwarded-host") == example.public.netloc
    assert req.header("x-forwarded-proto") == example.public.scheme


@pytest.mark.parametrize("tenant", [TENANT_A, TENANT_B], ids=["tenant-a", "tenant-b"])
def test_patient_search_reaches_the_tenants_hapi_as_fhir_patient(example, tenant):
    resp = example.request("GET", "/Patient?_count=1", tenant=tenant)
    assert resp.status == 200, resp
    server = example.tenant_servers[tenant]
    assert resp.json()["meta"]["tag"][0]["code"] == server
    req = only_request(example, server)
    assert (req.method, req.path) == ("GET", "/fhir/Patient?_count=1")
    assert req.header("host") == example.public.netloc
    assert req.headers.get(TENANT_HEADER) == [tenant]
    assert "authorization" not in req.headers


def test_hapis_paging_link_is_public_and_following_it_reaches_the_same_hapi(example):
    first = example.request("GET", "/Patient?_count=1", tenant=TENANT_A)
    assert first.status == 200, first
    links = {link["relation"]: link["url"] for link in first.json()["link"]}
    nxt = urllib.parse.urlsplit(links["next"])
    assert (nxt.scheme, nxt.netloc) == (example.public.scheme, example.public.netloc), links["next"]
    full_url = first.json()["entry"][0]["fullUrl"]
    example.clear()

    # What a client does with the link: GET its path and query from its host, with the same token.
    page = example.request("GET", (nxt.path or "/") + "?" + nxt.query, tenant=TENANT_A, host=nxt.netloc)
    assert page.status == 200, page
    req = only_request(example, example.tenant_servers[TENANT_A])
    assert (req.method, req.path) == ("GET", "/fhir/?" + nxt.query)
    assert req.header("host") == example.public.netloc
    assert page.json()["entry"][0]["resource"]["id"].endswith("-2")
    assert full_url.startswith(example.plugin["public_base_url"] + "/Patient/"), full_url


def test_batch_post_reaches_the_tenants_hapi_at_the_fhir_base(example):
    body = batch_body()
    resp = example.request("POST", "/", tenant=TENANT_A, body=body)
    assert resp.status == 200, resp
    assert resp.json()["type"] == "batch-response"
    req = only_request(example, example.tenant_servers[TENANT_A])
    assert (req.method, req.path, req.body) == ("POST", "/fhir/", body)
    assert req.header("host") == example.public.netloc


def test_a_client_sent_route_header_does_not_choose_the_hapi(example):
    label_b = example.plugin["tenants"][TENANT_B]["cluster"]
    resp = example.request("GET", "/Patient", tenant=TENANT_A, headers={ROUTE_HEADER: label_b})
    assert resp.status == 200, resp
    assert only_request(example, example.tenant_servers[TENANT_A]).path == "/fhir/Patient"


def test_a_request_without_a_token_gets_the_filters_401_and_reaches_no_hapi(example):
    """For Envoy Gateway this is what the catch-all rule is for: the wasm filter runs only on a matched route."""
    assert_unauthorized(example.request("GET", "/Patient"), invalid_token=False)
    assert example.hits() == {}


def test_no_request_crashed_the_wasm_vm(example):
    assert_wasm_vm_never_crashed(example.envoy)


# ------------------------------------------------- Envoy Gateway: why the example does not use URLRewrite

PREFIX_REPLACE = {"type": "URLRewrite",
                  "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/fhir/"}}}


def test_envoy_gateway_renders_prefix_replace_slash_fhir_slash_without_its_trailing_slash():
    """route.go buildXdsURLRewriteAction: `strings.TrimSuffix(replacePrefixMatch, "/")`, so on `PathPrefix /`
    the replacement `/fhir/` is `prefix_rewrite: /fhir`; only "" and "/" become a regex."""
    assert eg_url_rewrite({"prefix": "/"}, PREFIX_REPLACE["urlRewrite"]) == {"prefix_rewrite": "/fhir"}
    assert eg_url_rewrite({"prefix": "/"}, {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}) \
        == {"regex_rewrite": {"pattern": {"regex": r"^/\/*"}, "substitution": "/"}}


def test_the_envoy_gateway_example_rewrites_with_a_regex_not_a_prefix_replace():
    policy, _, route, filters, _ = eg_objects()
    routes, _ = eg_routes(route, filters, {k: 1 for k in k8s_fhir_servers()}, ["f"])
    forwarding = [r for r in routes if "route" in r]
    assert forwarding and all(r["route"].get("regex_rewrite") == {"pattern": {"regex": "^/"},
                                                                   "substitution": "/fhir/"}
                              and "prefix_rewrite" not in r["route"] for r in forwarding), forwarding
    # The catch-all, which enables the filter for a request without the header, comes last.
    assert "headers" not in routes[-1]["match"] and routes[-1]["direct_response"]["status"] == 503


def test_with_a_prefix_replace_hapi_would_get_fhirpatient(workdir, wasm, jwks):
    """The example before this fix, through the same rendering: HAPI gets /fhirPatient and answers 404."""
    _, _, route, _, _ = eg_objects()
    old = copy.deepcopy(route)
    for rule in old["spec"]["rules"]:
        if rule.get("backendRefs"):
            rule["filters"] = [copy.deepcopy(PREFIX_REPLACE)]
    ex = start_example("envoy-gateway", workdir, wasm, jwks, route=old)
    try:
        resp = ex.request("GET", "/Patient?_count=1", tenant=TENANT_A)
        assert resp.status == 404, resp
        assert only_request(ex, ex.tenant_servers[TENANT_A]).path == "/fhirPatient?_count=1"
    finally:
        stop_example(ex)


@pytest.mark.parametrize("path", ["/Patient?_count=1", "/metadata"])
def test_a_spoofed_host_reaches_no_hapi(example, path):
    """Each example accepts only its public name (issue 24: the compose example answered any Host): a request
    with another Host is answered by Envoy and reaches no FHIR server, its links or a Location."""
    example.clear()
    resp = example.request("GET", path, tenant=TENANT_A if path != "/metadata" else None,
                           host="spoofed-host.evil.example")
    assert resp.status == 404, resp
    assert example.hits() == {}
