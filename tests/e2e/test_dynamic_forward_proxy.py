"""Tenants given by URL, through the shipped envoy/envoy-dynamic-forward-proxy.yaml: one dynamic forward proxy
cluster reaches every tenant, so adding a tenant needs no new Envoy cluster.

Tenant A's url points at a real FHIR engine (tests/fhir/server.mjs) under a base path, which builds its links from
the Host it is sent and ignores X-Forwarded-*: reaching it at all needs the URL's authority and base path, and its
links must be rewritten from the URL. Tenant B's url points at a recording upstream at its root.
"""
from __future__ import annotations

import json
import sys
import urllib.parse
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fhir"))

from checks import (  # noqa: E402
    assert_no_upstream_saw_anything, assert_served_only_by, assert_unauthorized, assert_wasm_vm_never_crashed,
)
from conftest import stop_envoy  # noqa: E402
from contract import TENANT_DATA, contract_patient, resources  # noqa: E402
from engine import EngineError, FhirEngine  # noqa: E402
from harness import (  # noqa: E402
    ENVOY_DIR, SHIPPED_CONFIG, TENANT_A, TENANT_B, TENANT_HEADER, Envoy, bearer, envoy_validate,
    hcm_settings, http_request, load_yaml, plugin_json, render_config, wait_until, wasm_plugin_config, write_config,
)
from test_tenant_registry import Registry, static_cluster  # noqa: E402
from tokens import Minter  # noqa: E402
from upstream import RecordingUpstream  # noqa: E402

DFP_CONFIG = ENVOY_DIR / "envoy-dynamic-forward-proxy.yaml"
DFP_CLUSTER = "dynamic_forward_proxy_cluster"
DFP_FILTER = "envoy.filters.http.dynamic_forward_proxy"
BASE_PATH = "/api/FHIR/R4"
PATIENT_A = contract_patient(TENANT_DATA["tenant-a"], "tenant-a")
TENANT_C = "0c0c0c0c-1111-4222-8333-444455556666"


# ------------------------------------------------------------------------------ the shipped config itself

def test_the_shipped_config_puts_the_dynamic_forward_proxy_between_the_filter_and_the_router():
    cfg = load_yaml(DFP_CONFIG)
    hcm = hcm_settings(cfg)
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == ["envoy.filters.http.wasm", DFP_FILTER, "envoy.filters.http.router"], names
    shipped = hcm_settings(load_yaml(SHIPPED_CONFIG))
    for key in ("normalize_path", "merge_slashes", "path_with_escaped_slashes_action", "route_config"):
        assert hcm[key] == shipped[key], key
    (dfp_filter,) = [f for f in hcm["http_filters"] if f["name"] == DFP_FILTER]
    cache = dfp_filter["typed_config"]["dns_cache_config"]
    assert cache["name"] == "dynamic_forward_proxy_cache_config"
    assert cache["dns_lookup_family"] == "V4_ONLY"
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    assert set(clusters) == {"idp", "fhir_metadata", DFP_CLUSTER}, sorted(clusters)
    dfp = clusters[DFP_CLUSTER]
    assert dfp["cluster_type"]["name"] == "envoy.clusters.dynamic_forward_proxy"
    assert dfp["lb_policy"] == "CLUSTER_PROVIDED"
    assert dfp["cluster_type"]["typed_config"]["dns_cache_config"] == cache, "filter and cluster share one cache"
    assert "transport_socket" not in dfp, "the demo tenants speak plain HTTP"
    pc = wasm_plugin_config(cfg)
    assert (pc["name"], pc["root_id"], pc["failure_policy"]) == ("fhir_tenant_router", "fhir_tenant_router",
                                                                 "FAIL_RELOAD")
    doc = plugin_json(cfg)
    assert doc["dynamic_forward_proxy_cluster"] == DFP_CLUSTER
    assert doc["tenants"] == {TENANT_A: {"url": "http://127.0.0.1:9101"}, TENANT_B: {"url": "http://127.0.0.1:9102"}}
    assert doc["forward_authorization"] is False
    assert doc["metadata_cluster"] == "fhir_metadata"
    addresses = [cfg["admin"]["address"]] + [l["address"] for l in cfg["static_resources"]["listeners"]]
    assert all(a["socket_address"]["address"] == "127.0.0.1" for a in addresses)
    text = DFP_CONFIG.read_text(encoding="utf-8")
    assert "auto_sni" in text and "auto_san_validation" in text, "the TLS recipe for https URLs is documented"


# ---------------------------------------------------------------------------------------- end to end

class Dfp:
    def __init__(self, env: Envoy, engine: FhirEngine, upstreams, minter: Minter):
        self.env, self.engine, self.upstreams, self.minter = env, engine, upstreams, minter

    @property
    def proxy_base(self) -> str:
        return f"http://127.0.0.1:{self.env.port}"

    def get(self, path: str, tenant: str | None = TENANT_A, headers: dict | None = None, token: str | None = None):
        h = dict(headers or {})
        if tenant is not None or token is not None:
            h.update(bearer(token or self.minter.token(tenant)))
        if "host" in h:
            return http_request(self.env.port, "GET", path, h)
        return self.env.request("GET", path, h)


def url_tenants(engine_a: FhirEngine, upstream_b: RecordingUpstream):
    def edit(doc):
        doc["tenants"][TENANT_A]["url"] = engine_a.base_url  # http://127.0.0.1:<port>/api/FHIR/R4
        doc["tenants"][TENANT_B]["url"] = f"http://127.0.0.1:{upstream_b.port}"
    return edit


@pytest.fixture(scope="module")
def dfp(workdir, start_envoy, idp, upstreams):
    try:
        engine = FhirEngine("tenant-a-by-url", workdir, TENANT_DATA["tenant-a"], base_path=BASE_PATH,
                            honour_forwarded=False).start()
    except EngineError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        env = start_envoy("envoy-dynamic-forward-proxy", {"idp": idp.port, "fhir_metadata": upstreams.metadata.port},
                          base=DFP_CONFIG, plugin=url_tenants(engine, upstreams.tenant_b))
        minter = Minter(idp.issuer)
        token = minter.token(TENANT_A)
        wait_until(lambda: env.request("GET", f"/Patient/{PATIENT_A.id}", bearer(token)).status != 503, 30,
                   "the JWKS to load", on_timeout=lambda: "\n" + env.log_tail(30))
        upstreams.clear()
        yield Dfp(env, engine, upstreams, minter)
        stop_envoy(env)
    finally:
        engine.stop()


def test_a_tenant_given_by_url_reaches_its_fhir_engine_under_the_urls_base_path(dfp):
    resp = dfp.get(f"/Patient/{PATIENT_A.id}")
    assert resp.status == 200, resp
    doc = resp.json()
    assert (doc["resourceType"], doc["id"]) == ("Patient", PATIENT_A.id)
    direct = json.loads(http_request(dfp.engine.port, "GET", f"{BASE_PATH}/Patient/{PATIENT_A.id}").body)
    assert doc == direct
    assert_no_upstream_saw_anything(dfp.upstreams)


def test_a_url_tenants_links_are_rewritten_from_the_url_and_paging_works(dfp):
    path = "/Observation?" + urllib.parse.urlencode({"patient": PATIENT_A.id, "_count": 2})
    first = dfp.get(path)
    assert first.status == 200, first
    assert dfp.engine.base_url not in first.body.decode(), "a link still points at the tenant's URL"
    links = {link["relation"]: link["url"] for link in first.json()["link"]}
    assert links["next"].startswith(dfp.proxy_base + "/Observation?"), links
    nxt = urllib.parse.urlsplit(links["next"])
    second = dfp.get(f"{nxt.path}?{nxt.query}")
    assert second.status == 200, second
    ids_1 = {r["id"] for r in resources(first.json())}
    ids_2 = {r["id"] for r in resources(second.json())}
    assert ids_2 and not ids_1 & ids_2, (ids_1, ids_2)
    full_urls = [e["fullUrl"] for e in second.json().get("entry", [])]
    assert full_urls and all(u.startswith(dfp.proxy_base + "/") for u in full_urls), full_urls


def test_a_tenant_given_by_url_gets_the_urls_authority_and_its_headers(dfp):
    resp = dfp.get("/Patient?family=x", TENANT_B, {"host": "fhir.example.org"})
    req = assert_served_only_by(dfp.upstreams, resp, "tenant-b", TENANT_B, path="/Patient?family=x")
    assert req.headers.get("host") == [f"127.0.0.1:{dfp.upstreams.tenant_b.port}"], req.headers


def test_the_client_cannot_choose_where_a_url_tenants_request_goes(dfp):
    b_authority = f"127.0.0.1:{dfp.upstreams.tenant_b.port}"
    spoofed = {"host": b_authority, "x-fhir-tenant-router-cluster": "fhir_metadata", TENANT_HEADER: TENANT_B}
    resp = dfp.get(f"/Patient/{PATIENT_A.id}", TENANT_A, spoofed)
    assert resp.status == 200, resp
    assert resp.json()["id"] == PATIENT_A.id, "served by tenant A's engine"
    assert_no_upstream_saw_anything(dfp.upstreams)
    # The absolute form of the request line names B's authority: still A's engine, or refused; never B.
    resp = dfp.get(f"http://{b_authority}/Patient/{PATIENT_A.id}", TENANT_A)
    assert resp.status in (200, 400, 404), resp
    if resp.status == 200:
        assert resp.json()["id"] == PATIENT_A.id
    assert_no_upstream_saw_anything(dfp.upstreams)


def test_a_request_without_a_valid_token_never_reaches_a_url_tenant(dfp):
    b_authority = f"127.0.0.1:{dfp.upstreams.tenant_b.port}"
    assert_unauthorized(dfp.get("/Patient", None, {"host": b_authority}), invalid_token=False)
    bad = dfp.minter.wrong_key_token(TENANT_B)
    assert_unauthorized(dfp.get("/Patient", None, {"host": b_authority}, token=bad), invalid_token=True)
    assert_no_upstream_saw_anything(dfp.upstreams)


def test_discovery_still_goes_to_the_metadata_cluster(dfp):
    resp = dfp.get("/metadata", None)
    assert resp.status == 200, resp
    assert [r.path for r in dfp.upstreams.metadata.requests] == ["/metadata"]


def test_url_tenants_are_reached_through_the_one_dynamic_forward_proxy_cluster(dfp):
    assert dfp.get(f"/Patient/{PATIENT_A.id}").status == 200
    assert dfp.get("/Patient", TENANT_B).status == 200
    listing = json.loads(dfp.env.admin("/clusters?format=json").body)
    names = {c["name"] for c in listing["cluster_statuses"]}
    assert names == {"idp", "fhir_metadata", DFP_CLUSTER}, names
    hosts = {f'{h["address"]["socket_address"]["address"]}:{h["address"]["socket_address"]["port_value"]}'
             for c in listing["cluster_statuses"] if c["name"] == DFP_CLUSTER for h in c.get("host_statuses", [])}
    assert {f"127.0.0.1:{dfp.engine.port}", f"127.0.0.1:{dfp.upstreams.tenant_b.port}"} <= hosts, hosts
    assert_wasm_vm_never_crashed(dfp.env)


def test_a_tenant_added_to_the_registry_by_url_is_reached_without_a_new_cluster(start_envoy, idp, upstreams):
    registry = Registry().start()
    tenant_c = RecordingUpstream("tenant-c", "tenant").start()
    try:
        registry.serve({TENANT_A: {"url": f"http://127.0.0.1:{upstreams.tenant_a.port}"}})
        cfg = load_yaml(DFP_CONFIG)
        cfg["static_resources"]["clusters"].append(static_cluster("tenant_registry", registry.port))

        def plugin(doc):
            doc["tenants"] = {}
            doc["tenant_registry"] = {"uri": registry.uri, "cluster": "tenant_registry", "refresh_s": 1,
                                      "timeout_ms": 1000}
        env = start_envoy("envoy-dfp-registry", {"idp": idp.port, "fhir_metadata": upstreams.metadata.port},
                          base=cfg, plugin=plugin)
        minter = Minter(idp.issuer)
        wait_until(lambda: env.request("GET", "/Patient", bearer(minter.token(TENANT_A))).status == 200, 30,
                   "tenant A from the registry", on_timeout=lambda: "\n" + env.log_tail(30))
        assert env.request("GET", "/Patient", bearer(minter.token(TENANT_C))).status == 403
        assert tenant_c.requests == []
        registry.serve({TENANT_A: {"url": f"http://127.0.0.1:{upstreams.tenant_a.port}"},
                        TENANT_C: {"url": f"http://127.0.0.1:{tenant_c.port}/fhir"}})
        token = minter.token(TENANT_C)
        wait_until(lambda: env.request("GET", "/Patient?x=1", bearer(token)).status == 200, 3,
                   "tenant C to be served within one refresh", on_timeout=lambda: "\n" + env.log_tail(30))
        (req,) = tenant_c.requests
        assert req.path == "/fhir/Patient?x=1"
        assert req.headers.get("host") == [f"127.0.0.1:{tenant_c.port}"]
        assert req.headers.get(TENANT_HEADER) == [TENANT_C]
        names = {c["name"] for c in json.loads(env.admin("/clusters?format=json").body)["cluster_statuses"]}
        assert names == {"idp", "fhir_metadata", DFP_CLUSTER, "tenant_registry"}, names
        stop_envoy(env)
    finally:
        registry.stop()
        tenant_c.stop()


# --------------------------------------------------------------------------------------- validation

def _validate(edit, wasm, tmp_path):
    cfg = render_config(DFP_CONFIG, listener_port=10000, admin_port=9901, cluster_ports={}, wasm_path=wasm,
                        plugin=edit)
    result = envoy_validate(write_config(cfg, tmp_path / "dfp.yaml"))
    return result.returncode, result.stdout + result.stderr


def _without_dfp_cluster(doc):
    del doc["dynamic_forward_proxy_cluster"]


def _url(value):
    def edit(doc):
        doc["tenants"][TENANT_A]["url"] = value
    return edit


def _url_and_cluster(doc):
    doc["tenants"][TENANT_A]["cluster"] = "fhir_metadata"


def _neither_url_nor_cluster(doc):
    del doc["tenants"][TENANT_A]["url"]


def _without_public_base_url(doc):
    del doc["public_base_url"]  # links would otherwise be rewritten to the client's Host


@pytest.mark.parametrize("edit,field", [
    (_without_dfp_cluster, "dynamic_forward_proxy_cluster"),
    (_url("not a url"), f"tenants.{TENANT_A}.url"),
    (_url("ftp://127.0.0.1:9101/"), f"tenants.{TENANT_A}.url"),
    (_url("http://127.0.0.1:9101/fhir?x=1"), f"tenants.{TENANT_A}.url"),
    (_url_and_cluster, f"tenants.{TENANT_A}"),
    (_neither_url_nor_cluster, f"tenants.{TENANT_A}"),
    (_without_public_base_url, f"tenants.{TENANT_B}.url"),  # the first url tenant, in id order
], ids=["url-tenants-without-a-dynamic-forward-proxy-cluster", "a-url-that-is-not-a-url", "an-ftp-url",
        "a-url-with-a-query", "both-url-and-cluster", "neither-url-nor-cluster", "url-tenants-without-public-base-url"])
def test_envoy_validate_refuses(edit, field, wasm, tmp_path):
    code, out = _validate(edit, wasm, tmp_path)
    assert code != 0, f"envoy accepted it:\n{out[-3000:]}"
    assert any(field in line and "invalid plugin configuration" in line for line in out.splitlines()), out[-3000:]
