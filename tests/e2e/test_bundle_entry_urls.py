"""A batch entry may name this server by an absolute URL under `public_base_url` (FHIR allows either form);
an absolute URL of any other origin is refused with a message that says so, not "no valid method and url"."""
import json

import pytest

from checks import assert_served_only_by, assert_wasm_vm_never_crashed
from conftest import Stack, stop_envoy, wait_for_jwks
from harness import TENANT_A
from tokens import Minter

PUBLIC_BASE = "https://fhir.example.org/r4"


@pytest.fixture(scope="module")
def based(start_envoy, idp, upstreams):
    def with_public_base(doc):
        doc["public_base_url"] = PUBLIC_BASE

    env = start_envoy("envoy-bundle-entry-urls", {"idp": idp.port, **upstreams.cluster_ports()},
                      plugin=with_public_base)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    yield Stack(env, upstreams, minter, idp)
    stop_envoy(env)


def _batch(url):
    return json.dumps({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/1"}},
        {"request": {"method": "GET", "url": url}},
    ]}).encode()


def _post(stack, body):
    return stack.get("/", stack.minter.token(TENANT_A), {"content-type": "application/fhir+json"}, method="POST",
                     body=body)


@pytest.mark.parametrize("url", [f"{PUBLIC_BASE}/Patient/1", "HTTPS://FHIR.example.org/r4/Observation?patient=1"])
def test_an_absolute_entry_url_under_the_public_base_is_judged_as_the_relative_one(based, url):
    body = _batch(url)
    req = assert_served_only_by(based.upstreams, _post(based, body), "tenant-a", TENANT_A, method="POST", path="/")
    assert req.body == body, "the Bundle goes on unchanged"


@pytest.mark.parametrize("url", [
    "https://other.example.org/r4/Patient/1",
    "https://fhir.example.org/r5/Patient/1",
    "http://fhir.example.org/r4/Patient/1",
])
def test_an_absolute_entry_url_of_another_origin_is_refused_saying_so(based, url):
    body = _batch(url)
    resp = _post(based, body)
    assert resp.status == 403, resp
    diagnostics = resp.json()["issue"][0]["diagnostics"]
    assert "entry 1" in diagnostics and f"outside this server's base {PUBLIC_BASE}" in diagnostics, diagnostics
    got = [r for reqs in based.upstreams.hits().values() for r in reqs if r.body == body]
    assert not got, "no upstream got the Bundle"


def test_no_request_in_this_module_crashed_the_wasm_vm(based):
    assert_wasm_vm_never_crashed(based.envoy)
