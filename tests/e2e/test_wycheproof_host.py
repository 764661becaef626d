"""Wycheproof vectors through the host signature path, inside a real Envoy: tests/wasm-wycheproof is a
proxy-wasm module that runs every vector through `crypto::Signatures` over `shell::host_crypto::HostCrypto`,
in mode `host` (Envoy's `verify_signature`, BoringSSL, with the JWS raw r||s -> DER conversion) in
`on_configure`, so `envoy --mode validate` runs it and fails on any disagreement."""
import json
import re
import subprocess

import pytest

from harness import REPO, envoy_validate, write_config

pytestmark = pytest.mark.wasm_only("Envoy's verify_signature is a wasm foreign function; the .so's ring runs the "
                                    "same vectors in tests/wycheproof.rs")

CRATE = REPO / "tests" / "wasm-wycheproof"
MODULE = CRATE / "target" / "wasm32-wasip1" / "release" / "wasm_wycheproof.wasm"
SUMMARY = re.compile(
    r"wycheproof host: rsa (?P<rsa>\d+) vectors (?P<rsa_agree>\d+) agree (?P<rsa_disagree>\d+) disagree "
    r"(?P<rsa_acceptable>\d+) acceptable \(\d+ of them verified; (?P<rsa_valid>\d+) valid verified, \d+ skipped\), "
    r"ecdsa (?P<ec>\d+) vectors (?P<ec_agree>\d+) agree (?P<ec_disagree>\d+) disagree "
    r"(?P<ec_acceptable>\d+) acceptable \(\d+ of them verified; (?P<ec_valid>\d+) valid verified, \d+ skipped\)")


@pytest.fixture(scope="module")
def module():
    build = subprocess.run(["cargo", "build", "--release", "--target", "wasm32-wasip1",
                            "--manifest-path", str(CRATE / "Cargo.toml")],
                           cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stderr[-3000:]
    assert MODULE.is_file()
    return MODULE


def _config(module, tmp_path, plugin_configuration=None):
    wasm = {
        "name": "wycheproof",
        "root_id": "wycheproof",
        "failure_policy": "FAIL_CLOSED",
        "vm_config": {"runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": str(module)}}},
    }
    if plugin_configuration is not None:
        wasm["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                 "value": json.dumps(plugin_configuration)}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": "wycheproof",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]},
        "http_filters": [
            {"name": "envoy.filters.http.wasm", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm", "config": wasm}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    cfg = {"static_resources": {"listeners": [{
        "name": "wycheproof",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }]}}
    return write_config(cfg, tmp_path / "wycheproof.yaml")


def _summary(output):
    matches = list(SUMMARY.finditer(output))
    assert matches, f"no summary line in Envoy's output:\n{output[-3000:]}"
    return {k: int(v) for k, v in matches[-1].groupdict().items()}


def test_every_wycheproof_vector_agrees_with_envoys_host_signature_check(module, tmp_path):
    result = envoy_validate(_config(module, tmp_path))
    output = result.stdout + result.stderr
    summary = _summary(output)
    print(re.findall(r"wycheproof host: .*", output))
    assert result.returncode == 0, output[-3000:]
    assert summary["rsa_disagree"] == 0 and summary["ec_disagree"] == 0, summary
    # RSA PKCS#1 v1.5 2048/3072/4096 (SHA-256), 2048 SHA-384/512; ECDSA P-256 and P-384 in JWS (P1363) form.
    assert summary["rsa"] >= 1200 and summary["ec"] >= 500, summary
    # Mode `host` fails closed without verify_signature: valid vectors verifying prove the host call worked.
    assert summary["rsa_valid"] > 0 and summary["ec_valid"] > 0, summary


def test_the_host_wycheproof_check_fails_envoy_validate_when_the_signatures_are_corrupted(module, tmp_path):
    result = envoy_validate(_config(module, tmp_path, {"corrupt_signatures": True}))
    output = result.stdout + result.stderr
    summary = _summary(output)
    assert result.returncode != 0, f"envoy accepted a run with disagreements:\n{output[-3000:]}"
    assert summary["rsa_disagree"] > 0 and summary["ec_disagree"] > 0, summary
    assert summary["rsa_valid"] == 0 and summary["ec_valid"] == 0, summary
