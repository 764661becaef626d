"""`envoy --mode validate` accepts every shipped config and refuses bad plugin configs, naming the field."""
import json
from pathlib import Path

import pytest

import harness
from harness import (
    ENVOY_DIR, SHIPPED_CONFIG, envoy_validate, hcm_settings, load_yaml, plugin_json, render_config, wasm_plugin_config,
    write_config,
)

SHIPPED = sorted(ENVOY_DIR.glob("*.yaml"))


@pytest.mark.parametrize("config", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_passes_envoy_validate(config, wasm):
    result = envoy_validate(config)
    assert result.returncode == 0, result.stdout + result.stderr


def _set(path, value):
    def edit(doc):
        *parents, leaf = path
        node = doc
        for p in parents:
            node = node[p]
        node[leaf] = value
    return edit


def _delete(*path):
    def edit(doc):
        *parents, leaf = path
        node = doc
        for p in parents:
            node = node[p]
        del node[leaf]
    return edit


def _inline_jwks(jwks):
    def edit(doc):
        for k in ("jwks_uri", "jwks_cluster", "jwks_refresh_s", "jwks_timeout_ms"):
            doc["provider"].pop(k, None)
        doc["provider"]["jwks"] = jwks
    return edit


def _paging(paging):
    def edit(doc):
        doc["public_base_url"] = "https://fhir.example.test"
        doc["paging_cursors"] = paging
    return edit


BAD_CONFIGS = {
    "an-unknown-top-level-key": (_set(["tenant_claims"], "scope"), "tenant_claims"),
    "an-unknown-provider-key": (_set(["provider", "jwks_url"], "http://127.0.0.1:9000/jwks"), "jwks_url"),
    "an-unknown-tenant-key": (_set(["tenants", "6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f", "clutser"], "x"),
                              "clutser"),
    "a-missing-provider-issuer": (_delete("provider", "issuer"), "issuer"),
    "a-jwks-uri-that-is-not-a-url": (_set(["provider", "jwks_uri"], "not a url"), "jwks_uri"),
    "a-jwks-uri-with-another-scheme": (_set(["provider", "jwks_uri"], "ftp://127.0.0.1/jwks"), "jwks_uri"),
    "an-empty-tenants-map": (_set(["tenants"], {}), "tenants"),
    "a-garbage-inline-jwks": (_inline_jwks("garbage"), "jwks"),
    "an-inline-jwks-with-a-broken-key": (_inline_jwks({"keys": [{"kty": "RSA", "kid": "k", "n": "!!", "e": "AQAB"}]}),
                                         "jwks"),
    "an-unknown-signature-verifier": (_set(["signature_verifier"], "openssl"), "signature_verifier"),
    "paging-cursors-without-public-base-url": (_set(["paging_cursors"], {"key": {"env": "CURSOR_KEY"}}),
                                               "paging_cursors"),
    "a-paging-cursor-key-the-vm-does-not-have": (_paging({"key": {"env": "NO_SUCH_CURSOR_KEY"}}),
                                                 "paging_cursors.key.env"),
    "a-paging-cursor-ttl-of-zero": (_paging({"key": {"env": "NO_SUCH_CURSOR_KEY"}, "ttl": 0}), "paging_cursors.ttl"),
}


@pytest.mark.parametrize("edit,field", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_envoy_validate_refuses_a_plugin_config_with(edit, field, wasm, tmp_path):
    cfg = render_config(SHIPPED_CONFIG, listener_port=10000, admin_port=9901, cluster_ports={}, wasm_path=wasm,
                        plugin=edit)
    path = write_config(cfg, tmp_path / "bad.yaml")
    result = envoy_validate(path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"envoy accepted a bad plugin config:\n{output[-3000:]}"
    error_lines = [l for l in output.splitlines() if field in l and ("error" in l.lower() or "critical" in l.lower()
                                                                     or "fail" in l.lower())]
    assert error_lines, f"no error log line names {field!r}:\n{output[-3000:]}"


def _p384_jwk(kid):
    from base64 import urlsafe_b64encode

    from cryptography.hazmat.primitives.asymmetric import ec

    numbers = ec.generate_private_key(ec.SECP384R1()).public_key().public_numbers()
    b64 = lambda n: urlsafe_b64encode(n.to_bytes(48, "big")).rstrip(b"=").decode()
    return {"kty": "EC", "crv": "P-384", "alg": "ES384", "use": "sig", "kid": kid, "x": b64(numbers.x),
            "y": b64(numbers.y)}


def test_pure_rust_with_a_p384_key_it_cannot_check_is_refused_naming_the_key(wasm, tmp_path):
    # The wasm module `make build` ships has no pure-Rust P-384: under "pure_rust" every ES384 token would be
    # refused, so the configuration is. The dynamic module checks every signature with ring: it accepts it.
    kid = "es384-signing-key-7"

    def edit(doc):
        _inline_jwks({"keys": [_p384_jwk(kid)]})(doc)
        doc["signature_verifier"] = "pure_rust"

    cfg = render_config(SHIPPED_CONFIG, listener_port=10000, admin_port=9901, cluster_ports={}, wasm_path=wasm,
                        plugin=edit)
    result = envoy_validate(write_config(cfg, tmp_path / "p384.yaml"))
    output = result.stdout + result.stderr
    if harness.BUILD == "dynamic-module":
        assert result.returncode == 0, output[-3000:]
        return
    assert result.returncode != 0, f"envoy accepted a key the verifier cannot check:\n{output[-3000:]}"
    lines = [l for l in output.splitlines() if kid in l and "provider.jwks" in l and "P-384" in l]
    assert lines, f"no error line names the key {kid!r}:\n{output[-3000:]}"
    # Under "auto" (Envoy's BoringSSL checks ES384) the same key set is fine.
    cfg = render_config(SHIPPED_CONFIG, listener_port=10000, admin_port=9901, cluster_ports={}, wasm_path=wasm,
                        plugin=_inline_jwks({"keys": [_p384_jwk(kid)]}))
    result = envoy_validate(write_config(cfg, tmp_path / "p384-auto.yaml"))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def test_envoy_validate_refuses_plugin_config_that_is_not_json(wasm, tmp_path):
    cfg = render_config(SHIPPED_CONFIG, listener_port=10000, admin_port=9901, cluster_ports={}, wasm_path=wasm,
                        plugin=lambda doc: json.dumps(doc)[:-1])
    result = envoy_validate(write_config(cfg, tmp_path / "bad.yaml"))
    assert result.returncode != 0, result.stdout + result.stderr


@pytest.mark.parametrize("config", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_keeps_the_security_relevant_envoy_settings(config):
    cfg = load_yaml(config)
    hcm = hcm_settings(cfg)
    assert hcm["normalize_path"] is True
    assert hcm["merge_slashes"] is True
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    names = [f["name"] for f in hcm["http_filters"]]
    # Ours first; only the dynamic forward proxy (which must see the :authority we set) may sit between.
    assert names in (["envoy.filters.http.wasm", "envoy.filters.http.router"],
                     ["envoy.filters.http.wasm", "envoy.filters.http.dynamic_forward_proxy",
                      "envoy.filters.http.router"]), names
    (route,) = [r for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]]
    assert route["route"] == {"cluster_header": "x-fhir-tenant-router-cluster"}, route
    pc = wasm_plugin_config(cfg)
    assert (pc["name"], pc["root_id"], pc["failure_policy"]) == ("fhir_tenant_router", "fhir_tenant_router",
                                                                 "FAIL_RELOAD")
    assert pc["vm_config"]["code"]["local"]["filename"] == "target/wasm32-wasip1/release/fhir_tenant_router.wasm"
    doc = plugin_json(cfg)
    assert doc["forward_authorization"] is False
    addresses = [cfg["admin"]["address"]] + [l["address"] for l in cfg["static_resources"]["listeners"]]
    assert all(a["socket_address"]["address"] == "127.0.0.1" for a in addresses)


@pytest.mark.parametrize("config", sorted(p.name for p in (Path(__file__).resolve().parents[2] / "envoy").glob("*.yaml")))
def test_every_shipped_plugin_config_is_valid_against_the_json_schema(config):
    import jsonschema

    from harness import ENVOY_DIR, load_yaml, plugin_json

    schema = json.loads((ENVOY_DIR.parent / "docs" / "config.schema.json").read_text(encoding="utf-8"))
    errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(plugin_json(load_yaml(ENVOY_DIR / config)))]
    assert errors == []
