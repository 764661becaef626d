"""A Bundle held for its verdict where the host cannot hold headers and still deliver the body.

The shipped configs set the wasm PluginConfig's `allow_on_headers_stop_iteration: true` (test_early_upstream.py
shows what that buys: zero upstream requests for a refused Bundle). Istio's WasmPlugin cannot set it. Without it
a proxy-wasm host gives a filter that paused on headers no body until it resumes: the filter notices, warns
once, and lets such a request's headers go on after a second; its body is still judged before it leaves. With
`hold_bundle_headers: false` the headers go at once (both builds)."""
from __future__ import annotations

import json
import time

import pytest

from checks import assert_wasm_vm_never_crashed
from conftest import stop_envoy, wait_for_jwks
from harness import SHIPPED_CONFIG, TENANT_A, bearer, load_yaml, wasm_plugin_config
from tokens import Minter

READ = json.dumps({"resourceType": "Bundle", "type": "batch",
                   "entry": [{"request": {"method": "GET", "url": "Patient/1"}}]}).encode()
DELETE = json.dumps({"resourceType": "Bundle", "type": "batch",
                     "entry": [{"request": {"method": "DELETE", "url": "Patient/1"}}]}).encode()


def _post(env, minter, body):
    headers = {**bearer(minter.token(TENANT_A)), "content-type": "application/fhir+json"}
    started = time.monotonic()
    resp = env.request("POST", "/", headers, body, timeout=15)
    return resp, time.monotonic() - started


@pytest.fixture(scope="module")
def without_flag(start_envoy, idp, upstreams):
    cfg = load_yaml(SHIPPED_CONFIG)
    del wasm_plugin_config(cfg)["allow_on_headers_stop_iteration"]
    env = start_envoy("envoy-no-stop-iteration", {"idp": idp.port, **upstreams.cluster_ports()}, base=cfg)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    yield env, minter
    stop_envoy(env)


@pytest.mark.wasm_only("allow_on_headers_stop_iteration is a wasm PluginConfig field; the dynamic module's "
                       "StopIteration always delivers the body")
def test_without_allow_on_headers_stop_iteration_a_bundle_goes_on_after_a_second_and_is_still_judged(
        without_flag, upstreams):
    env, minter = without_flag
    env.mark_log()
    resp, took = _post(env, minter, READ)
    assert resp.status == 200, resp
    assert 0.9 <= took < 5, took
    assert len(upstreams.tenant_a.requests) == 1
    resp, _ = _post(env, minter, DELETE)
    assert resp.status == 403, resp
    assert "entry 0" in resp.json()["issue"][0]["diagnostics"]
    # A Bundle is always `POST /`: what must not have reached the upstream is its body (issue 24: checking the
    # method for DELETE could never fail). Only the READ Bundle's body was ever received.
    assert not [r for r in upstreams.tenant_a.requests if b"DELETE" in r.body], upstreams.tenant_a.requests
    assert [r.body for r in upstreams.tenant_a.requests if r.body] == [READ], upstreams.tenant_a.requests
    assert env.log_since_mark().count("set allow_on_headers_stop_iteration: true") == 1
    assert_wasm_vm_never_crashed(env)


@pytest.fixture(scope="module")
def not_held(start_envoy, idp, upstreams):
    def plugin(doc):
        doc["hold_bundle_headers"] = False

    env = start_envoy("envoy-hold-off", {"idp": idp.port, **upstreams.cluster_ports()}, plugin=plugin)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    yield env, minter
    stop_envoy(env)


def test_with_hold_bundle_headers_off_a_refused_bundles_headers_reach_the_upstream_but_its_body_never(
        not_held, upstreams):
    env, minter = not_held
    stat = "cluster.tenant_a.upstream_rq_total"
    before = env.stats(f"^{stat}$").get(stat, 0)
    resp, took = _post(env, minter, DELETE)
    assert resp.status == 403, resp
    assert took < 0.9, took
    # Envoy opened the upstream request (the documented cost of the setting); the server got no Bundle.
    assert env.stats(f"^{stat}$").get(stat, 0) == before + 1
    assert not any(r.body for r in upstreams.tenant_a.requests)
    resp, _ = _post(env, minter, READ)
    assert resp.status == 200, resp
