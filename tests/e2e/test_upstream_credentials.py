"""A per-tenant upstream credential (e.g. the partner's API key for the EHR connection) comes from an
environment variable that Envoy passes to the VM: never from the client, never logged."""
from __future__ import annotations

from checks import assert_served_only_by
from conftest import stop_envoy
from harness import SHIPPED_CONFIG, TENANT_A, TENANT_B, envoy_validate, load_yaml, render_config, wasm_plugin_config, write_config

SECRET = "k-3b1f-test-only-api-key"


def _with_vm_env(env: dict[str, str]) -> dict:
    cfg = load_yaml(SHIPPED_CONFIG)
    wasm_plugin_config(cfg)["vm_config"]["environment_variables"] = {"key_values": env}
    return cfg


def _plugin(doc):
    doc["tenants"][TENANT_A]["upstream_header"] = {"name": "X-Api-Key", "env": "TENANT_A_API_KEY"}


def test_the_tenants_credential_is_sent_and_a_client_sent_copy_is_replaced(start_envoy, idp, upstreams):
    env = start_envoy("envoy-credentials", {"idp": idp.port, **upstreams.cluster_ports()},
                      base=_with_vm_env({"TENANT_A_API_KEY": SECRET}), plugin=_plugin)
    from tokens import Minter
    from conftest import wait_for_jwks
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    resp = env.request("GET", "/Patient", {"authorization": f"Bearer {minter.token(TENANT_A)}", "x-api-key": "client-chosen"})
    req = assert_served_only_by(upstreams, resp, "tenant-a", TENANT_A)
    assert req.headers.get("x-api-key") == [SECRET]
    upstreams.clear()
    # Tenant B has no credential configured: nothing is added, and the client's header is not ours to strip.
    resp = env.request("GET", "/Patient", {"authorization": f"Bearer {minter.token(TENANT_B)}"})
    req = assert_served_only_by(upstreams, resp, "tenant-b", TENANT_B)
    assert "x-api-key" not in req.headers
    assert SECRET not in env.log()
    stop_envoy(env)


def test_a_missing_credential_variable_makes_envoy_refuse_the_plugin_naming_the_field(workdir, wasm):
    cfg = render_config(_with_vm_env({}), listener_port=1, admin_port=2, cluster_ports={}, wasm_path=wasm,
                        plugin=_plugin)
    proc = envoy_validate(write_config(cfg, workdir / "missing-credential.yaml"))
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert f"tenants.{TENANT_A}.upstream_header.env" in out, out[-3000:]
    assert "TENANT_A_API_KEY" in out
