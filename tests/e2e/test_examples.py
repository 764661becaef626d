"""The deployment examples (examples/docker-compose, examples/istio, examples/envoy-gateway) and the Dockerfile
are consistent and loadable: Docker, Kubernetes and Keycloak cannot run here, so everything that can be checked
without them is: `docker-compose config`, `envoy --mode validate` with the built module, the Keycloak realm
against the Envoy config, the Kubernetes objects' required fields, and every embedded plugin configuration
against docs/config.schema.json AND the real filter."""
from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import jsonschema
import pytest
import yaml

from harness import (
    CLIENT_A, CLIENT_B, REPO, ROUTE_HEADER, TENANT_A, TENANT_B, TENANT_HEADER, envoy_validate, free_port,
    hcm_settings, load_yaml, plugin_json, wasm_plugin_config, write_config,
)

EXAMPLES = REPO / "examples"
COMPOSE_DIR = EXAMPLES / "docker-compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
COMPOSE_ENVOY = COMPOSE_DIR / "envoy.yaml"
REALM_FILE = COMPOSE_DIR / "keycloak" / "fhir-realm.json"
LOADER_DIR = COMPOSE_DIR / "loader"
ISTIO_PLUGIN = EXAMPLES / "istio" / "wasmplugin.yaml"
ISTIO_ROUTING = EXAMPLES / "istio" / "routing.yaml"
EG_POLICY = EXAMPLES / "envoy-gateway" / "envoy-extension-policy.yaml"
EG_ROUTING = EXAMPLES / "envoy-gateway" / "httproute.yaml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / "Dockerfile.dockerignore"
SCHEMA = json.loads((REPO / "docs" / "config.schema.json").read_text(encoding="utf-8"))

MODULE_IN_CONTAINER = "/etc/envoy/fhir_tenant_router.wasm"
BUILT_MODULE = "target/wasm32-wasip1/release/fhir_tenant_router.wasm"
TENANTS = {TENANT_A: (CLIENT_A, "hapi-a"), TENANT_B: (CLIENT_B, "hapi-b")}


def _docs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _one(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d.get("kind") == kind]
    return doc


def _compose() -> dict:
    return load_yaml(COMPOSE_FILE)


def _realm() -> dict:
    return json.loads(REALM_FILE.read_text(encoding="utf-8"))


def _istio_plugin() -> dict:
    return _one(_docs(ISTIO_PLUGIN), "WasmPlugin")


def _eg_policy() -> dict:
    return _one(_docs(EG_POLICY), "EnvoyExtensionPolicy")


def _eg_idp_cluster() -> dict:
    patch = _one(_docs(EG_ROUTING), "EnvoyPatchPolicy")
    (op,) = [p for p in patch["spec"]["jsonPatches"] if p["type"].endswith("envoy.config.cluster.v3.Cluster")]
    assert op["operation"]["op"] == "add" and op["operation"]["path"] == "", op
    return op["operation"]["value"]


# Every plugin configuration shipped in an example: name -> (config, Envoy clusters the filter itself needs).
def _embedded_plugin_configs() -> dict[str, tuple[dict, list[dict]]]:
    compose_cfg = load_yaml(COMPOSE_ENVOY)
    istio = _istio_plugin()["spec"]["pluginConfig"]
    eg = _eg_policy()["spec"]["wasm"][0]["config"]
    return {
        "docker-compose": (plugin_json(compose_cfg), compose_cfg["static_resources"]["clusters"]),
        "istio": (istio, [_dns_cluster(istio["provider"]["jwks_cluster"], istio["provider"]["jwks_uri"])]),
        "envoy-gateway": (eg, [_eg_idp_cluster()]),
    }


def _dns_cluster(name: str, url: str) -> dict:
    u = urllib.parse.urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    return {"name": name, "type": "STRICT_DNS", "connect_timeout": "2s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": u.hostname, "port_value": port}}}}]}]}}


def _minimal_envoy(plugin: dict | str, clusters: list[dict], wasm: Path) -> dict:
    """The smallest Envoy config that loads the filter with `plugin` (the way every platform ends up doing it)."""
    value = plugin if isinstance(plugin, str) else json.dumps(plugin)
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": free_port()}}},
        "static_resources": {
            "listeners": [{"name": "fhir", "address": {"socket_address": {"address": "127.0.0.1",
                                                                        "port_value": free_port()}},
                           "filter_chains": [{"filters": [{
                               "name": "envoy.filters.network.http_connection_manager",
                               "typed_config": {
                                   "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                            "http_connection_manager.v3.HttpConnectionManager",
                                   "stat_prefix": "fhir",
                                   "route_config": {"virtual_hosts": [{"name": "fhir", "domains": ["*"], "routes": [
                                       {"match": {"prefix": "/"}, "route": {"cluster_header": ROUTE_HEADER}}]}]},
                                   "http_filters": [
                                       {"name": "envoy.filters.http.wasm", "typed_config": {
                                           "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                                           "config": {
                                               "name": "fhir_tenant_router", "root_id": "fhir_tenant_router",
                                               "failure_policy": "FAIL_CLOSED",
                                               "vm_config": {"runtime": "envoy.wasm.runtime.v8",
                                                             "code": {"local": {"filename": str(wasm)}}},
                                               "configuration": {
                                                   "@type": "type.googleapis.com/google.protobuf.StringValue",
                                                   "value": value}}}},
                                       {"name": "envoy.filters.http.router", "typed_config": {
                                           "@type": "type.googleapis.com/envoy.extensions.filters.http.router."
                                                    "v3.Router"}}]}}]}]}],
            "clusters": copy.deepcopy(clusters),
        },
    }


def _validate(cfg: dict, path: Path) -> tuple[int, str]:
    result = envoy_validate(write_config(cfg, path))
    return result.returncode, result.stdout + result.stderr


# ------------------------------------------------------------------------------------- docker-compose

def _compose_cli() -> tuple[list[str], int] | None:
    """The Compose command line here and its major version: `docker compose` (v2) if the plugin is there, else
    a standalone `docker-compose` (Debian's is v1)."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        r = subprocess.run(cmd + ["version", "--short"], capture_output=True, text=True, timeout=60)
        m = re.match(r"v?(\d+)\.", r.stdout.strip())
        if r.returncode == 0 and m:
            return cmd, int(m[1])
    return None


def _module_volume() -> dict:
    (v,) = [v for v in _compose()["services"]["envoy"]["volumes"]
            if isinstance(v, dict) and v["target"] == MODULE_IN_CONTAINER]
    return v


def test_compose_file_passes_docker_compose_config(tmp_path):
    """Compose v2 validates the file as it is. Debian's docker-compose is v1, which predates
    `bind.create_host_path` (and so cannot run this file): it must refuse exactly that key, and accept the
    rest of the file."""
    found = _compose_cli()
    if found is None:
        pytest.skip("no Compose CLI (Debian: apt-get install -y docker-compose); the file's other checks still ran")
    cmd, major = found
    run = lambda f: subprocess.run(cmd + ["-f", str(f), "--project-directory", str(COMPOSE_DIR), "config", "-q"],
                                   cwd=COMPOSE_DIR, capture_output=True, text=True, timeout=120)
    result = run(COMPOSE_FILE)
    if major >= 2:
        assert result.returncode == 0, result.stdout + result.stderr
        return
    assert result.returncode != 0 and "create_host_path" in result.stdout + result.stderr, result
    doc = _compose()
    for v in doc["services"]["envoy"]["volumes"]:
        if isinstance(v, dict):
            v.pop("bind")
    stripped = tmp_path / "docker-compose.v1.yml"
    stripped.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    result = run(stripped)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_mounts_the_module_so_that_a_missing_module_is_an_error_not_a_directory():
    """Long syntax with `create_host_path: false`: Compose v2 then uses the Mount API, and the engine refuses a
    missing source ("bind source path does not exist"). The short form, or the long form without `bind`, goes
    through the Binds API, where Docker creates an empty directory at the missing path (compose
    pkg/compose/create.go: requireMountAPI)."""
    v = _module_volume()
    assert v["type"] == "bind" and v["read_only"] is True, v
    assert v["bind"] == {"create_host_path": False}, v


def test_compose_pins_every_image_to_an_exact_version():
    images = {name: svc["image"] for name, svc in _compose()["services"].items()}
    assert set(images) == {"envoy", "keycloak", "hapi-a", "hapi-b", "loader"}, images
    for name, image in images.items():
        repo, _, tag = image.rpartition(":")
        assert repo and re.fullmatch(r"v?\d+\.\d+\.\d+(-\d+)?", tag), f"{name}: {image} is not pinned to a version"
    assert images["envoy"] == "envoyproxy/envoy:v1.40.0"
    assert images["keycloak"].startswith("quay.io/keycloak/keycloak:")
    assert images["hapi-a"] == images["hapi-b"] and images["hapi-a"].startswith("hapiproject/hapi:")


def _mounts(svc: dict) -> dict[str, str]:
    """container path -> host path (relative to the compose folder) of a service's bind mounts."""
    out = {}
    for v in svc.get("volumes", []):
        if isinstance(v, dict):
            assert v["type"] == "bind", v
            out[v["target"]] = v["source"]
        else:
            host, container, *_ = v.split(":")
            out[container] = host
    return out


def test_compose_envoy_mounts_the_built_module_and_its_config_where_the_config_names_them():
    svc = _compose()["services"]["envoy"]
    mounts = _mounts(svc)
    assert (COMPOSE_DIR / mounts[MODULE_IN_CONTAINER]).resolve() == (REPO / BUILT_MODULE).resolve()
    assert wasm_plugin_config(load_yaml(COMPOSE_ENVOY))["vm_config"]["code"]["local"]["filename"] \
        == MODULE_IN_CONTAINER
    command = svc["command"]
    config_in_container = command[command.index("-c") + 1]
    assert (COMPOSE_DIR / mounts[config_in_container]).resolve() == COMPOSE_ENVOY.resolve()


def test_compose_keycloak_imports_the_realm_file_at_start():
    svc = _compose()["services"]["keycloak"]
    assert "--import-realm" in svc["command"]
    imported = [c for c, h in _mounts(svc).items() if c.startswith("/opt/keycloak/data/import/")]
    assert [(COMPOSE_DIR / _mounts(svc)[c]).resolve() for c in imported] == [REALM_FILE.resolve()]


def test_compose_publishes_only_envoy_and_keycloak_and_only_on_loopback():
    services = _compose()["services"]
    published = {name: svc.get("ports", []) for name, svc in services.items() if svc.get("ports")}
    assert set(published) == {"envoy", "keycloak"}, published  # the FHIR servers are reachable only via Envoy
    for name, ports in published.items():
        for p in ports:
            assert str(p).startswith("127.0.0.1:"), f"{name} publishes {p} beyond loopback"


def test_compose_envoy_config_passes_envoy_validate_with_the_built_module(wasm, tmp_path):
    cfg = load_yaml(COMPOSE_ENVOY)
    wasm_plugin_config(cfg)["vm_config"]["code"]["local"]["filename"] = str(wasm)
    code, output = _validate(cfg, tmp_path / "compose-envoy.yaml")
    assert code == 0, output[-3000:]


def test_compose_envoy_config_keeps_the_security_relevant_settings():
    cfg = load_yaml(COMPOSE_ENVOY)
    hcm = hcm_settings(cfg)
    assert (hcm["normalize_path"], hcm["merge_slashes"], hcm["path_with_escaped_slashes_action"]) \
        == (True, True, "REJECT_REQUEST")
    assert [f["name"] for f in hcm["http_filters"]] == ["envoy.filters.http.wasm", "envoy.filters.http.router"]
    (route,) = [r for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]]
    assert route["route"]["cluster_header"] == ROUTE_HEADER
    assert wasm_plugin_config(cfg)["failure_policy"] == "FAIL_RELOAD"
    assert plugin_json(cfg)["forward_authorization"] is False


def test_compose_envoy_clusters_reach_the_compose_services_by_name():
    cfg = load_yaml(COMPOSE_ENVOY)
    doc = plugin_json(cfg)
    services = _compose()["services"]
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    needed = {doc["provider"]["jwks_cluster"], doc["metadata_cluster"]} | {t["cluster"] for t in doc["tenants"].values()}
    assert needed == set(clusters) == {"keycloak", "hapi-a", "hapi-b"}
    for name, c in clusters.items():
        assert c["type"] in ("STRICT_DNS", "LOGICAL_DNS"), f"{name}: {c['type']} cannot resolve a service name"
        (ep,) = [lb["endpoint"]["address"]["socket_address"] for e in c["load_assignment"]["endpoints"]
                 for lb in e["lb_endpoints"]]
        assert ep["address"] in services and ep["port_value"] == 8080, (name, ep)
    jwks = urllib.parse.urlsplit(doc["provider"]["jwks_uri"])
    kc = clusters[doc["provider"]["jwks_cluster"]]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert (jwks.hostname, jwks.port) == (kc["endpoint"]["address"]["socket_address"]["address"], 8080)
    assert doc["metadata_cluster"] == "hapi-a"


# ----------------------------------------------------------------------------------------- the realm

def test_realm_issuer_and_jwks_endpoint_are_the_ones_the_plugin_expects():
    realm, provider = _realm(), plugin_json(load_yaml(COMPOSE_ENVOY))["provider"]
    issuer = f"{realm['attributes']['frontendUrl'].rstrip('/')}/realms/{realm['realm']}"
    assert realm["enabled"] is True
    assert provider["issuer"] == issuer == "http://keycloak:8080/realms/fhir"
    assert provider["jwks_uri"] == issuer + "/protocol/openid-connect/certs"


def _client(realm: dict, client_id: str) -> dict:
    (c,) = [c for c in realm["clients"] if c["clientId"] == client_id]
    return c


@pytest.mark.parametrize("tenant", [TENANT_A, TENANT_B], ids=["tenant-a", "tenant-b"])
def test_realm_client_has_only_client_credentials_and_only_its_tenant_guid_as_scope(tenant):
    (client_id, secret), _ = TENANTS[tenant]
    c = _client(_realm(), client_id)
    assert c["enabled"] is True and c["publicClient"] is False
    assert c["clientAuthenticatorType"] == "client-secret" and c["secret"] == secret
    assert c["serviceAccountsEnabled"] is True
    assert (c["standardFlowEnabled"], c["implicitFlowEnabled"], c["directAccessGrantsEnabled"]) \
        == (False, False, False)
    assert c["optionalClientScopes"] + c["defaultClientScopes"] == [tenant]


@pytest.mark.parametrize("tenant", [TENANT_A, TENANT_B], ids=["tenant-a", "tenant-b"])
def test_realm_client_tokens_carry_an_audience_the_plugin_accepts(tenant):
    (client_id, _), _ = TENANTS[tenant]
    audiences = plugin_json(load_yaml(COMPOSE_ENVOY))["provider"]["audiences"]
    mappers = [m for m in _client(_realm(), client_id).get("protocolMappers", [])
               if m["protocolMapper"] == "oidc-audience-mapper"]
    assert mappers, f"{client_id} has no audience mapper"
    assert any(m["config"]["included.custom.audience"] in audiences
               and m["config"]["access.token.claim"] == "true" for m in mappers), mappers


def test_realm_tenant_scopes_are_exactly_the_plugin_tenants_and_appear_in_the_scope_claim():
    realm, doc = _realm(), plugin_json(load_yaml(COMPOSE_ENVOY))
    scopes = {s["name"]: s for s in realm["clientScopes"]}
    assert set(scopes) == set(doc["tenants"]) == set(TENANTS)
    for name, s in scopes.items():
        assert s["protocol"] == "openid-connect"
        assert s["attributes"]["include.in.token.scope"] == "true", name
    # No realm-wide default scopes: no other client is handed a tenant GUID.
    assert realm["defaultDefaultClientScopes"] == [] and realm["defaultOptionalClientScopes"] == []
    assert doc["tenant_claim"] == "scope" and "" in doc["tenant_scope_prefixes"]


def test_each_tenant_is_routed_to_its_own_fhir_server():
    doc = plugin_json(load_yaml(COMPOSE_ENVOY))
    assert {t: v["cluster"] for t, v in doc["tenants"].items()} == {t: up for t, (_, up) in TENANTS.items()}


# ----------------------------------------------------------------------------------------- the loader

def _bundle(name: str) -> dict:
    return json.loads((LOADER_DIR / name).read_text(encoding="utf-8"))


def test_loader_bundles_are_transactions_of_patients_with_different_patients_per_tenant():
    ids = {}
    for name in ("tenant-a.json", "tenant-b.json"):
        b = _bundle(name)
        assert (b["resourceType"], b["type"]) == ("Bundle", "transaction")
        assert b["entry"], name
        for e in b["entry"]:
            r = e["resource"]
            assert r["resourceType"] == "Patient" and r["name"][0]["family"]
            assert e["request"] == {"method": "PUT", "url": f"Patient/{r['id']}"}  # idempotent re-runs
        ids[name] = {e["resource"]["id"] for e in b["entry"]}
    assert not ids["tenant-a.json"] & ids["tenant-b.json"]


def test_loader_script_sends_each_bundle_to_its_own_server_with_a_bounded_wait():
    script = (LOADER_DIR / "load.sh").read_text(encoding="utf-8")
    assert subprocess.run(["sh", "-n", str(LOADER_DIR / "load.sh")], capture_output=True).returncode == 0
    assert "load hapi-a http://hapi-a:8080/fhir /loader/tenant-a.json" in script
    assert "load hapi-b http://hapi-b:8080/fhir /loader/tenant-b.json" in script
    assert re.search(r"^TRIES=\d+", script, re.M) and "exit 1" in script
    loader = _compose()["services"]["loader"]
    assert (COMPOSE_DIR / _mounts(loader)["/loader"]).resolve() == LOADER_DIR.resolve()
    assert loader["entrypoint"] == ["/bin/sh", "/loader/load.sh"]


# ------------------------------------------------------------------------------------------- Istio

def test_istio_wasmplugin_has_the_required_fields():
    p = _istio_plugin()
    assert p["apiVersion"] == "extensions.istio.io/v1alpha1" and p["metadata"]["name"]
    s = p["spec"]
    assert re.fullmatch(r"oci://[^/]+/.+/fhir-tenant-router:\d+\.\d+\.\d+", s["url"]), s["url"]
    # FAIL_RELOAD (Istio >= 1.27) never fails open: a module that cannot be fetched is replaced by a deny-all
    # filter (pkg/wasm/convert.go: only FAIL_OPEN allows), a crashed VM by a fresh one.
    assert s["phase"] == "AUTHN" and s["failStrategy"] == "FAIL_RELOAD" and s["type"] == "HTTP"
    assert "sha256" not in s or re.fullmatch(r"[0-9a-f]{64}", s["sha256"]), "Istio wants the digest's hex only"
    assert s["selector"]["matchLabels"], "a WasmPlugin without a selector applies to every proxy in the namespace"
    assert s["pluginName"] == "fhir_tenant_router"
    assert isinstance(s["pluginConfig"], dict)


def _labels(doc: dict) -> set[str]:
    return {t["cluster"] for t in doc["tenants"].values()} | {doc["metadata_cluster"]}


def test_istio_virtualservice_routes_every_filter_label_and_nothing_without_the_header():
    doc = _istio_plugin()["spec"]["pluginConfig"]
    header = doc.get("route_header", ROUTE_HEADER)
    vs = _one(_docs(ISTIO_ROUTING), "VirtualService")
    routed = []
    for http in vs["spec"]["http"]:
        for m in http["match"]:
            assert header in m.get("headers", {}), f"route {http.get('name')} matches without {header}"
            routed.append(m["headers"][header]["exact"])
        assert http["route"][0]["destination"]["host"].endswith(".svc.cluster.local")
    assert sorted(routed) == sorted(_labels(doc))
    gw = _one(_docs(ISTIO_ROUTING), "Gateway")
    assert f"{gw['metadata']['namespace']}/{gw['metadata']['name']}" in vs["spec"]["gateways"]


# ----------------------------------------------------------------------------------- Envoy Gateway

def test_envoy_gateway_extension_policy_has_the_required_fields():
    p = _eg_policy()
    assert p["apiVersion"] == "gateway.envoyproxy.io/v1alpha1" and p["metadata"]["name"]
    (w,) = p["spec"]["wasm"]
    assert w["code"]["type"] == "Image"
    assert re.fullmatch(r"[^/:]+(\.[^/:]+)+/.+/fhir-tenant-router:\d+\.\d+\.\d+", w["code"]["image"]["url"])
    assert w["rootID"] == "fhir_tenant_router" and w["failOpen"] is False
    assert isinstance(w["config"], dict)
    routes = {(d["kind"], d["metadata"]["name"]) for d in _docs(EG_ROUTING)}
    for ref in p["spec"]["targetRefs"]:
        assert (ref["kind"], ref["name"]) in routes, ref


def test_envoy_gateway_httproute_routes_every_filter_label_and_answers_the_rest_with_503():
    doc = _eg_policy()["spec"]["wasm"][0]["config"]
    header = doc.get("route_header", ROUTE_HEADER)
    docs = _docs(EG_ROUTING)
    route = _one(docs, "HTTPRoute")
    routed, catch_all = [], []
    for rule in route["spec"]["rules"]:
        headers = [h for m in rule["matches"] for h in m.get("headers", [])]
        if headers:
            (h,) = headers
            assert (h["type"], h["name"]) == ("Exact", header)
            assert rule["backendRefs"], rule
            routed.append(h["value"])
        else:
            catch_all.append(rule)
    assert sorted(routed) == sorted(_labels(doc))
    # The catch-all is what makes the per-route filter run for requests without the header; it forwards nothing.
    (rule,) = catch_all
    assert not rule.get("backendRefs")
    (f,) = rule["filters"]
    ref = f["extensionRef"]
    filters = {d["metadata"]["name"]: d for d in docs if d["kind"] == "HTTPRouteFilter"}
    assert ref["kind"] == "HTTPRouteFilter"
    assert filters[ref["name"]]["spec"]["directResponse"]["statusCode"] == 503


def test_envoy_gateway_patch_policy_adds_the_jwks_cluster_the_plugin_names():
    doc = _eg_policy()["spec"]["wasm"][0]["config"]
    cluster = _eg_idp_cluster()
    assert cluster["name"] == doc["provider"]["jwks_cluster"]
    u = urllib.parse.urlsplit(doc["provider"]["jwks_uri"])
    ep = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (ep["address"], ep["port_value"]) == (u.hostname, u.port)


# --------------------------------------------------------------- every embedded plugin configuration

CONFIGS = _embedded_plugin_configs()


def test_the_config_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("example", CONFIGS, ids=list(CONFIGS))
def test_embedded_plugin_config_is_valid_against_the_json_schema(example):
    config, _ = CONFIGS[example]
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft202012Validator(SCHEMA).iter_errors(config)]
    assert not errors, errors


def test_json_schema_check_refuses_a_config_with_an_unknown_key():
    config = copy.deepcopy(CONFIGS["istio"][0])
    config["provider"]["jwks_url"] = config["provider"].pop("jwks_uri")
    assert not jsonschema.Draft202012Validator(SCHEMA).is_valid(config)


@pytest.mark.parametrize("example", CONFIGS, ids=list(CONFIGS))
def test_embedded_plugin_config_is_accepted_by_the_filter_in_envoy_validate(example, wasm, tmp_path):
    config, clusters = CONFIGS[example]
    code, output = _validate(_minimal_envoy(config, clusters, wasm), tmp_path / f"{example}.yaml")
    assert code == 0, output[-3000:]


def test_envoy_validate_of_a_rendered_config_refuses_a_plugin_config_the_filter_rejects(wasm, tmp_path):
    """Guards the test above: the minimal config really makes the filter parse the plugin configuration."""
    config, clusters = copy.deepcopy(CONFIGS["istio"])
    config["tenant_claims"] = "scope"
    code, output = _validate(_minimal_envoy(config, clusters, wasm), tmp_path / "bad.yaml")
    assert code != 0, output[-3000:]
    assert "tenant_claims" in output, output[-3000:]


@pytest.mark.parametrize("example", CONFIGS, ids=list(CONFIGS))
def test_embedded_plugin_config_serves_the_same_tenants_with_the_same_security_settings(example):
    config, _ = CONFIGS[example]
    assert set(config["tenants"]) == {TENANT_A, TENANT_B}
    assert config.get("forward_authorization", False) is False
    assert config.get("route_header", ROUTE_HEADER) == ROUTE_HEADER
    assert config.get("tenant_header", TENANT_HEADER) == TENANT_HEADER
    assert "jwks_uri" in config["provider"] and config["provider"]["jwks_cluster"]


# ------------------------------------------------------------------------------------------ Dockerfile

def _dockerfile_instructions(text: str) -> list[tuple[str, list[str]]]:
    """(INSTRUCTION, arguments) in order; comments dropped, line continuations joined."""
    logical, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    out = []
    for line in logical:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), shlex.split(rest)))
    return out


def _stages() -> list[dict]:
    stages: list[dict] = []
    for instr, args in _dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if instr == "FROM":
            flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--"))
            args = [a for a in args if not a.startswith("--")]
            name = args[2] if len(args) >= 3 and args[1].upper() == "AS" else None
            stages.append({"base": args[0], "name": name, "steps": [], "platform": flags.get("platform")})
        elif stages:
            stages[-1]["steps"].append((instr, args))
    return stages


def _global_args() -> dict[str, str]:
    out = {}
    for instr, args in _dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if instr == "FROM":
            break
        if instr == "ARG":
            k, _, v = args[0].partition("=")
            out[k] = v
    return out


def test_dockerfile_image_is_from_scratch_with_one_layer_holding_plugin_wasm():
    final = _stages()[-1]
    assert final["base"] == "scratch"
    assert [i for i, _ in final["steps"]] == ["COPY"], final["steps"]  # one COPY = one layer, nothing else
    (_, args), = final["steps"]
    assert args[-1] == "/plugin.wasm"


def _copy_source_stage(final: dict) -> str:
    (_, args), = final["steps"]
    (frm,) = [a for a in args if a.startswith("--from=")]
    return frm.split("=", 1)[1]


@pytest.mark.parametrize("variant", ["source", "prebuilt"])
def test_dockerfile_both_ways_of_getting_the_module_put_the_built_wasm_into_the_image(variant):
    stages = _stages()
    by_name = {s["name"]: s for s in stages if s["name"]}
    module = by_name[_copy_source_stage(stages[-1])]
    # The module stage is chosen by a build arg whose default is the source build.
    assert module["base"] == "${WASM_FROM}" and _global_args()["WASM_FROM"] == "source"
    (_, args), = stages[-1]["steps"]
    produced = args[-2]
    stage = by_name[variant]
    if variant == "prebuilt":
        assert stage["base"] == "scratch"
        assert stage["steps"] == [("COPY", [BUILT_MODULE, produced])]
    else:
        run = " ".join(" ".join(a) for i, a in stage["steps"] if i == "RUN")
        # `make build` itself (its cargo features and wasm-opt), locked, and failing rather than skipping
        # wasm-opt; binaryen installed for it.
        assert "make build CARGO_FLAGS=--locked REQUIRE_WASM_OPT=1" in run
        assert re.search(r"apt-get install .*\bbinaryen\b", run) and re.search(r"apt-get install .*\bmake\b", run)
        assert f"cp {BUILT_MODULE} {produced}" in run
        copied = [a for i, args in stage["steps"] if i == "COPY" for a in args[:-1]]
        assert "Makefile" in copied


def _make_recipe(target: str) -> str:
    """The recipe of `target` in the Makefile, continuation lines joined."""
    lines = (REPO / "Makefile").read_text(encoding="utf-8").splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return " ".join(recipe).replace("\\ ", " ")


def test_make_build_ships_the_plugin_features_optimised_and_can_insist_on_wasm_opt():
    """What the Dockerfile's `make build` does: the shipped features (no pure-Rust P-384), wasm-opt -Oz, and
    with REQUIRE_WASM_OPT set a missing wasm-opt fails the build instead of leaving the module unoptimised."""
    recipe = _make_recipe("build")
    assert "cargo build $(CARGO_FLAGS) --target wasm32-wasip1 --release --no-default-features --features plugin" \
        in recipe
    assert "wasm-opt -Oz" in recipe
    assert re.search(r'elif \[ -n "\$\(REQUIRE_WASM_OPT\)" \]; then [^;]*; exit 1;', recipe), recipe


def test_dockerfile_compiles_the_module_on_the_build_machine_and_leaves_the_platform_to_the_build():
    """The module is the same on every platform, so the compiler runs natively ($BUILDPLATFORM); the image's
    platform is the build's --platform (a scratch stage takes it from there), which the docs set to linux/amd64."""
    stages = {s["name"]: s for s in _stages()}
    assert stages["source"]["platform"] == "$BUILDPLATFORM"
    assert _stages()[-1]["platform"] is None


DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), DOCKERFILE, *sorted(EXAMPLES.glob("*/README.md"))]


def _commands(path: Path, word: str) -> list[str]:
    """Every `docker build`-like command line in a doc (comments and code blocks alike)."""
    return [l for l in path.read_text(encoding="utf-8").splitlines() if re.search(word, l)]


def test_every_documented_image_build_is_for_linux_amd64():
    builds = [(p.name, l) for p in DOCS for l in _commands(p, r"docker (buildx )?build ")]
    assert builds, "no docker build command documented"
    for name, line in builds:
        assert "--platform linux/amd64" in line, f"{name}: {line.strip()}"


def test_every_documented_digest_to_pin_is_the_linux_amd64_manifest_digest():
    lines = [(p.name, l) for p in DOCS + [ISTIO_PLUGIN, EG_POLICY] for l in _commands(p, r"crane digest")]
    assert lines, "no digest command documented"
    for name, line in lines:
        assert "--platform linux/amd64" in line, f"{name}: {line.strip()}"


def test_the_envoy_gateway_checksum_field_is_named_as_it_is():
    """`code.image.sha256` (the image's manifest digest); there is no `code.sha256`."""
    for p in DOCS + [EG_POLICY]:
        assert "code.sha256" not in p.read_text(encoding="utf-8"), p
    policy = EG_POLICY.read_text(encoding="utf-8")
    image = policy[policy.index("      image:"):policy.index("      pullPolicy:")]
    assert "# sha256:" in image, "the commented checksum must sit under code.image"


def test_the_istio_check_looks_for_the_plugin_where_istio_puts_it():
    """The WasmPlugin reaches the gateway through ECDS, as `<namespace>.<name>`; the listener dump only
    names the ECDS resource, never the filter."""
    text = (EXAMPLES / "istio" / "README.md").read_text(encoding="utf-8")
    assert "istioctl proxy-config ecds" in text
    assert "proxy-config listeners" not in text


def test_dockerfile_compiles_with_a_pinned_rust_no_older_than_the_crate_needs():
    base = {s["name"]: s["base"] for s in _stages()}["source"]
    m = re.fullmatch(r"rust:(\d+)\.(\d+)\.(\d+)(-[a-z-]+)?", base)
    assert m, f"{base} is not pinned to an exact Rust version"
    need = re.search(r'^rust-version\s*=\s*"(\d+)\.(\d+)', (REPO / "Cargo.toml").read_text(), re.M)
    assert (int(m[1]), int(m[2])) >= (int(need[1]), int(need[2]))


def test_dockerignore_keeps_everything_the_dockerfile_copies_from_the_context():
    keep = {l.strip()[1:].rstrip("/") for l in DOCKERIGNORE.read_text().splitlines() if l.strip().startswith("!")}
    assert "*" in [l.strip() for l in DOCKERIGNORE.read_text().splitlines()]
    copied = [a for s in _stages() for i, args in s["steps"] if i == "COPY"
              and not any(x.startswith("--from=") for x in args) for a in args[:-1]]
    assert copied, "no COPY from the build context"
    for src in copied:
        assert src.rstrip("/") in keep, f"{src} is copied but excluded by {DOCKERIGNORE.name}"
        assert (REPO / src).exists() or src == BUILT_MODULE, src
