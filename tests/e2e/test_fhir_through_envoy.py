"""The FHIR layer end to end: real Envoy with our filter, the real IdP, and a real FHIR engine per tenant
(tests/fhir/server.mjs, @medplum/fhir-router) loaded with different patients.

Tenant A's engine lives under a commercial-style base path (/api/FHIR/R4) and does NOT honour X-Forwarded-*,
so its links must be rewritten by the filter; tenant B's engine sits at its root and honours them. The
Patients app's calls made through Envoy with A's token must answer what A's engine answers directly
(modulo the rewritten links), and none of A's patients may be read with B's token.
"""
from __future__ import annotations

import json
import urllib.request
import sys
import urllib.parse
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fhir"))

from checks import assert_wasm_vm_never_crashed  # noqa: E402
from conftest import stop_envoy  # noqa: E402
from contract import TAG_SYSTEM, TENANT_DATA, calls, contract_patient, resources, run  # noqa: E402
from engine import EngineError, FhirEngine  # noqa: E402
from harness import (  # noqa: E402
    CLIENT_A, CLIENT_B, TENANT_A, TENANT_B, bearer, free_port, render_config, wait_until, wasm_plugin_config,
)
from harness import Envoy  # noqa: E402

BASE_PATH = "/api/FHIR/R4"
PATIENT_A = contract_patient(TENANT_DATA["tenant-a"], "tenant-a")
PATIENT_B = contract_patient(TENANT_DATA["tenant-b"], "tenant-b")
CALL_NAMES = [c.name for c in calls(PATIENT_A)]


@pytest.fixture(scope="module")
def fhir(workdir, idp, wasm):
    engines = {}
    try:
        engines["a"] = FhirEngine("tenant-a", workdir, TENANT_DATA["tenant-a"], base_path=BASE_PATH,
                                  honour_forwarded=False).start()
        engines["b"] = FhirEngine("tenant-b", workdir, TENANT_DATA["tenant-b"]).start()
        engines["meta"] = FhirEngine("metadata", workdir, None).start()
    except EngineError as exc:
        for e in engines.values():
            e.stop()
        pytest.fail(str(exc), pytrace=False)

    def plugin(doc):
        doc["discovery"] = {"token_endpoint": f"{idp.issuer}/token", "scopes_supported": [TENANT_A, TENANT_B]}
        doc["public_base_url"] = f"http://127.0.0.1:{port}"  # links go here, never to the client's Host
        doc["tenants"][TENANT_A] = {
            "cluster": "tenant_a",
            "authority": f"127.0.0.1:{engines['a'].port}",  # the Host a commercial API expects: its own
            "base_path": BASE_PATH,
            "links_base_url": engines["a"].base_url,
        }

    port, admin = free_port(), free_port()
    cfg = render_config(
        Path(__file__).resolve().parents[2] / "envoy" / "envoy.yaml", listener_port=port, admin_port=admin,
        cluster_ports={"idp": idp.port, "fhir_metadata": engines["meta"].port, "tenant_a": engines["a"].port,
                       "tenant_b": engines["b"].port},
        wasm_path=wasm, plugin=plugin)
    env = Envoy(cfg, workdir, "envoy-fhir", port, admin)
    try:
        env.start()
        token = idp.access_token(CLIENT_A, TENANT_A)
        wait_until(lambda: env.request("GET", f"/Patient/{PATIENT_A.id}", bearer(token)).status != 503, 30,
                   "the JWKS to load")
    except Exception as exc:  # noqa: BLE001 - report any start-up failure with the logs
        env.stop()
        for e in engines.values():
            e.stop()
        pytest.fail(f"{exc}\n{env.log_tail()}", pytrace=False)
    yield env, engines
    stop_envoy(env)
    for e in engines.values():
        e.stop()


def proxy_base(env) -> str:
    return f"http://127.0.0.1:{env.port}"


def normalise(body, direct_base: str, proxy: str):
    """A direct answer as the proxy should show it: the engine's own base replaced by the proxy's."""
    return json.loads(json.dumps(body).replace(direct_base, proxy)) if body is not None else None


def without_volatile(body):
    """Bundle `meta.lastUpdated`/`id` and OperationOutcome timestamps vary per answer; drop them."""
    if isinstance(body, dict):
        return {k: without_volatile(v) for k, v in body.items() if k not in ("lastUpdated", "timestamp", "lastModified")
                and not (k == "id" and body.get("resourceType") == "Bundle")}
    if isinstance(body, list):
        return [without_volatile(v) for v in body]
    return body


def test_metadata_advertises_the_idp_token_url_and_keeps_the_engines_statement(fhir, idp):
    env, engines = fhir
    direct_status, direct = run(engines["meta"].base_url, type("C", (), {"method": "GET", "path": "/metadata",
                                                                          "form": None, "body": None})())
    resp = env.request("GET", "/metadata")
    assert resp.status == 200 and direct_status == 200, resp
    doc = resp.json()
    assert int(resp.header("content-length") or len(resp.body)) == len(resp.body)
    security = doc["rest"][0]["security"]
    (ext,) = [e for e in security["extension"]
              if e["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"]
    assert ext["extension"] == [{"url": "token", "valueUri": f"{idp.issuer}/token"}]
    codes = {c["code"] for s in security["service"] for c in s["coding"]}
    assert {"OAuth", "SMART-on-FHIR"} <= codes
    assert doc["fhirVersion"] == direct["fhirVersion"] == "4.0.1"
    assert doc["rest"][0]["resource"] == direct["rest"][0]["resource"], "the rest of the statement is kept"


def test_smart_configuration_is_answered_by_the_filter(fhir, idp):
    env, _ = fhir
    resp = env.request("GET", "/.well-known/smart-configuration")
    assert resp.status == 200, resp
    doc = resp.json()
    assert doc["token_endpoint"] == f"{idp.issuer}/token"
    assert doc["grant_types_supported"] == ["client_credentials"]
    assert "client_secret_post" in doc["token_endpoint_auth_methods_supported"]
    assert doc["scopes_supported"] == [TENANT_A, TENANT_B]


@pytest.mark.parametrize("name", CALL_NAMES)
def test_a_patients_app_call_through_envoy_answers_what_tenant_as_engine_answers(fhir, idp, name):
    env, engines = fhir
    (call,) = [c for c in calls(PATIENT_A) if c.name == name]
    token = idp.access_token(CLIENT_A, TENANT_A)
    direct_status, direct = run(engines["a"].base_url, call)
    status, body = run(proxy_base(env), call, bearer(token))
    assert status == direct_status == call.status, (status, direct_status, body)
    assert without_volatile(body) == without_volatile(normalise(direct, engines["a"].base_url, proxy_base(env)))
    assert engines["a"].base_url not in json.dumps(body), "a link still points at the upstream"


@pytest.mark.parametrize("name", [n for n in CALL_NAMES if n != "medication-orders-dstu2"])
def test_none_of_tenant_as_records_can_be_read_with_tenant_bs_token(fhir, idp, name):
    env, _ = fhir
    (call,) = [c for c in calls(PATIENT_A) if c.name == name]
    token = idp.access_token(CLIENT_B, TENANT_B)
    status, body = run(proxy_base(env), call, bearer(token))
    assert status in (200, 404), (status, body)
    leaked = list(tenant_a_resources(body))
    assert not leaked, f"tenant A's records served with B's token: {leaked[:3]}"
    if status == 200 and body.get("resourceType") == "Bundle" and body.get("type") == "searchset":
        assert resources(body) == [], body
    # The same call with A's token does find A's records: the check above can fail.
    if name in ("patient-read", "vital-signs", "batch"):
        _, own = run(proxy_base(env), call, bearer(idp.access_token(CLIENT_A, TENANT_A)))
        assert list(tenant_a_resources(own)), own


def tenant_a_resources(doc):
    """Every resource in a response (at any depth) tagged as tenant A's by the data generator."""
    if isinstance(doc, dict):
        tags = (doc.get("meta") or {}).get("tag") or []
        if any(t.get("system") == TAG_SYSTEM and t.get("code") == "tenant-a" for t in tags):
            yield f"{doc.get('resourceType')}/{doc.get('id')}"
        for v in doc.values():
            yield from tenant_a_resources(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from tenant_a_resources(v)


def test_paging_links_work_through_the_proxy_with_the_same_token(fhir, idp):
    env, engines = fhir
    token = idp.access_token(CLIENT_A, TENANT_A)
    path = "/Observation?" + urllib.parse.urlencode({"patient": PATIENT_A.id, "_count": 2})
    first = env.request("GET", path, bearer(token))
    assert first.status == 200, first
    links = {link["relation"]: link["url"] for link in first.json()["link"]}
    assert links["next"].startswith(proxy_base(env) + "/Observation?"), links
    nxt = urllib.parse.urlsplit(links["next"])
    second = env.request("GET", f"{nxt.path}?{nxt.query}", bearer(token))
    assert second.status == 200, second
    ids_1 = [e["resource"]["id"] for e in first.json()["entry"]]
    ids_2 = [e["resource"]["id"] for e in second.json()["entry"]]
    assert len(ids_2) >= 1 and not set(ids_1) & set(ids_2)
    # Page 2 through the proxy is page 2 of the engine.
    direct = json.loads(urllib.request.urlopen(
        links["next"].replace(proxy_base(env), engines["a"].base_url), timeout=10).read())
    assert [e["resource"]["id"] for e in direct["entry"]] == ids_2


def test_tenant_bs_engine_builds_its_links_from_the_forwarded_host(fhir, idp):
    env, _ = fhir
    token = idp.access_token(CLIENT_B, TENANT_B)
    # A Host other than the public base (issue 24: with Host equal to it, an engine ignoring X-Forwarded-*
    # passed too): the links can only be the public base's if the engine built them from X-Forwarded-*.
    resp = env.request("GET", "/Patient?_count=1", {**bearer(token), "host": "another-name.example:8443"})
    assert resp.status == 200, resp
    links = [link["url"] for link in resp.json()["link"]]
    assert links and all(u.startswith(proxy_base(env) + "/") for u in links), links


def test_a_batch_with_a_write_is_refused_naming_the_entry_and_reaches_no_engine(fhir, idp):
    env, engines = fhir
    token = idp.access_token(CLIENT_A, TENANT_A)
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Patient/{PATIENT_A.id}"}},
        {"request": {"method": "DELETE", "url": f"Patient/{PATIENT_A.id}"}},
    ]}
    resp = env.request("POST", "/", {**bearer(token), "content-type": "application/fhir+json"},
                       json.dumps(bundle).encode())
    assert resp.status == 403, resp
    diagnostics = resp.json()["issue"][0]["diagnostics"]
    assert "entry 1" in diagnostics and "delete" in diagnostics, diagnostics
    # The patient is still there: the DELETE never reached the engine.
    assert env.request("GET", f"/Patient/{PATIENT_A.id}", bearer(token)).status == 200
    assert_wasm_vm_never_crashed(env)


def test_a_create_is_refused_by_the_default_read_only_policy(fhir, idp):
    env, _ = fhir
    token = idp.access_token(CLIENT_A, TENANT_A)
    resp = env.request("POST", "/Patient", {**bearer(token), "content-type": "application/fhir+json"},
                       b'{"resourceType":"Patient"}')
    assert resp.status == 403, resp
    assert resp.json()["resourceType"] == "OperationOutcome"
