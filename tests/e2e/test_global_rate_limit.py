"""examples/global-rate-limit/envoy.yaml: the tenant as the descriptor of Envoy's global rate limit service,
for a limit across Envoy replicas (issue 14). No rate limit service runs here: what is proven is that Envoy
and the filter accept the file (`envoy --mode validate`, both builds), that it follows the JSON Schema, and
that the route's descriptor action reads the very header the filter sets."""
from __future__ import annotations

import json

from harness import REPO, envoy_validate, load_yaml, plugin_json

EXAMPLE = REPO / "examples" / "global-rate-limit" / "envoy.yaml"


def _hcm(cfg: dict) -> dict:
    return cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def test_the_global_rate_limit_example_loads_in_envoy(wasm):
    proc = envoy_validate(EXAMPLE)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def test_the_descriptor_is_the_header_the_filter_sets_and_the_rate_limit_filter_runs_after_ours():
    cfg = load_yaml(EXAMPLE)
    doc = plugin_json(cfg)
    header = doc["rate_limit_descriptor_header"]
    hcm = _hcm(cfg)
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == ["envoy.filters.http.wasm", "envoy.filters.http.ratelimit", "envoy.filters.http.router"], names
    # The tenants' route (the one whose cluster is the filter's header); the metadata route before it has no limit.
    (route,) = [r for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if "cluster_header" in r["route"]]
    [limit] = route["route"]["rate_limits"]
    [action] = limit["actions"]
    assert action["request_headers"] == {"header_name": header, "descriptor_key": "tenant"}
    ratelimit = hcm["http_filters"][1]["typed_config"]
    cluster = ratelimit["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    assert cluster in {c["name"] for c in cfg["static_resources"]["clusters"]}


def test_the_example_follows_the_config_schema():
    import jsonschema
    schema = json.loads((REPO / "docs" / "config.schema.json").read_text(encoding="utf-8"))
    errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(plugin_json(load_yaml(EXAMPLE)))]
    assert not errors, errors
