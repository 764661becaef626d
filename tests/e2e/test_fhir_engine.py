"""The tenant FHIR engines on their own (no Envoy): tests/fhir/server.mjs (npm @medplum/fhir-router, in
memory) loaded with tests/fhir/data/tenant-{a,b}.json answers the Patients app's calls (tests/fhir/contract.py)
as an R4 server should, and each tenant's engine holds only its own tenant's patients."""
from __future__ import annotations

import json
import sys
import urllib.parse
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fhir"))

from contract import (  # noqa: E402
    TAG_SYSTEM, TENANT_DATA, VITAL_SIGNS, call_named, calls, check, contract_patient, data_patients,
    data_resources, resources, run,
)
from engine import EngineError, FhirEngine  # noqa: E402
from harness import http_request  # noqa: E402

TENANTS = ("tenant-a", "tenant-b")
PATIENTS = {t: contract_patient(TENANT_DATA[t], t) for t in TENANTS}
CALL_NAMES = [c.name for c in calls(PATIENTS["tenant-a"])]
BASE_PATH = "/api/FHIR/R4"
FORM = {"content-type": "application/x-www-form-urlencoded"}
FHIR_JSON = {"content-type": "application/fhir+json"}


@pytest.fixture(scope="module")
def engines(workdir):
    started = {}
    try:
        for t in TENANTS:
            started[t] = FhirEngine(t, workdir, TENANT_DATA[t]).start()
    except EngineError as exc:
        for e in started.values():
            e.stop()
        pytest.fail(str(exc), pytrace=False)
    yield started
    for e in started.values():
        e.stop()


@pytest.fixture(scope="module")
def plain(workdir):
    """No data, served under a base path, forwarded headers ignored: a scratch engine tests may write to."""
    eng = FhirEngine("plain", workdir, base_path=BASE_PATH, honour_forwarded=False)
    try:
        eng.start()
    except EngineError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield eng
    eng.stop()


def get(engine: FhirEngine, path: str, headers: dict | None = None, method: str = "GET", body: bytes | None = None):
    return http_request(engine.port, method, engine.base_path + path, headers, body)


def data_of(tenant: str, rtype: str, patient_id: str | None = None) -> list[dict]:
    ref = f"Patient/{patient_id}" if patient_id else None
    return [r for r in data_resources(TENANT_DATA[tenant]) if r["resourceType"] == rtype and (
        ref is None or ref in (r.get("subject", {}).get("reference"), r.get("patient", {}).get("reference"),
                               r.get("beneficiary", {}).get("reference")))]


# ------------------------------------------------------------------------------------------ the contract

@pytest.mark.parametrize("tenant", TENANTS)
@pytest.mark.parametrize("name", CALL_NAMES)
def test_each_patients_app_call_gets_the_answer_an_r4_server_gives(engines, tenant, name):
    p = PATIENTS[tenant]
    call = call_named(p, name)
    status, body = run(engines[tenant].base_url, call)
    assert check(call, p, status, body) == [], json.dumps(body)[:2000]


@pytest.mark.parametrize("tenant", TENANTS)
def test_a_family_name_search_finds_every_patient_of_that_family_and_nobody_else(engines, tenant):
    p = PATIENTS[tenant]
    status, body = run(engines[tenant].base_url, call_named(p, "patient-search-family-given"))
    expected = {r["id"] for r in data_patients(TENANT_DATA[tenant])
                if r["name"][0]["family"] == p.family and r["name"][0]["given"][0] == p.given}
    assert status == 200 and {r["id"] for r in resources(body)} == expected
    assert body["total"] == len(expected)


@pytest.mark.parametrize("tenant", TENANTS)
def test_every_record_of_the_patient_is_found_by_patient_search(engines, tenant):
    p = PATIENTS[tenant]
    for rtype in ("Observation", "Condition", "Encounter", "AllergyIntolerance", "MedicationRequest",
                  "MedicationStatement", "Coverage"):
        r = get(engines[tenant], f"/{rtype}?patient={p.id}&_count=100")
        assert r.status == 200, r
        expected = {x["id"] for x in data_of(tenant, rtype, p.id)}
        assert expected and {x["id"] for x in resources(r.json())} == expected, rtype
        assert r.json()["total"] == len(expected), rtype


@pytest.mark.parametrize("tenant", TENANTS)
def test_vital_signs_leave_out_laboratory_results_and_come_newest_first(engines, tenant):
    p = PATIENTS[tenant]
    status, body = run(engines[tenant].base_url, call_named(p, "vital-signs"))
    all_obs = data_of(tenant, "Observation", p.id)
    vitals = [o for o in all_obs if any(c.get("code") == VITAL_SIGNS[1]
                                        for cat in o["category"] for c in cat["coding"])]
    assert 0 < len(vitals) < len(all_obs), "the data set should mix vital signs and labs"
    assert status == 200 and body["total"] == len(vitals)
    dates = [o["effectiveDateTime"] for o in resources(body)]
    assert dates == sorted(dates, reverse=True) and len(set(dates)) > 1


@pytest.mark.parametrize("tenant", TENANTS)
def test_the_latest_encounter_is_the_patients_most_recent_visit(engines, tenant):
    p = PATIENTS[tenant]
    encounters = data_of(tenant, "Encounter", p.id)
    newest = max(encounters, key=lambda e: e["period"]["start"])
    status, body = run(engines[tenant].base_url, call_named(p, "latest-encounter"))
    assert status == 200 and [e["id"] for e in resources(body)] == [newest["id"]]
    assert body["total"] == len(encounters) > 1
    assert any(link["relation"] == "next" for link in body["link"])


def test_the_dstu2_sort_spelling_is_accepted_but_medplum_ignores_desc_and_sorts_oldest_first(engines):
    # Recorded behaviour of @medplum/core's search parser: `_sort:desc=date` is parsed as `_sort=date`.
    # A filter translating DSTU2 calls must send `_sort=-date`.
    p = PATIENTS["tenant-a"]
    oldest = min(data_of("tenant-a", "Encounter", p.id), key=lambda e: e["period"]["start"])
    status, body = run(engines["tenant-a"].base_url, call_named(p, "latest-encounter-dstu2-sort"))
    assert status == 200 and [e["id"] for e in resources(body)] == [oldest["id"]]


def test_medication_order_is_dstu2_only_and_an_r4_engine_answers_404_with_an_operation_outcome(engines):
    r = get(engines["tenant-a"], f"/MedicationOrder?patient={PATIENTS['tenant-a'].id}")
    assert r.status == 404, r
    assert r.header("content-type").startswith("application/fhir+json")
    assert r.json()["resourceType"] == "OperationOutcome" and r.json()["issue"][0]["code"] == "not-supported"


# ------------------------------------------------------------------------------------------ isolation

@pytest.mark.parametrize("tenant,other", [("tenant-a", "tenant-b"), ("tenant-b", "tenant-a")])
def test_a_tenants_engine_holds_none_of_the_other_tenants_patients(engines, tenant, other):
    mine, theirs = data_patients(TENANT_DATA[tenant]), data_patients(TENANT_DATA[other])
    assert not {p["id"] for p in mine} & {p["id"] for p in theirs}
    for p in theirs:
        assert get(engines[tenant], f"/Patient/{p['id']}").status == 404
        r = get(engines[tenant], "/Patient/_search", FORM, "POST",
                urllib.parse.urlencode({"identifier": p["identifier"][0]["value"]}).encode())
        assert r.status == 200 and r.json()["total"] == 0, r
    r = get(engines[tenant], f"/Patient?_tag={TAG_SYSTEM}|{other}")
    assert r.status == 200 and r.json()["total"] == 0
    r = get(engines[tenant], f"/Patient?_tag={TAG_SYSTEM}|{tenant}&_count=100")
    assert r.status == 200 and {x["id"] for x in resources(r.json())} == {p["id"] for p in mine}


# ------------------------------------------------------------------------------------------ R4 behaviour

def test_metadata_is_an_r4_capability_statement_of_a_server(engines):
    r = get(engines["tenant-a"], "/metadata")
    assert r.status == 200 and r.header("content-type").startswith("application/fhir+json")
    cs = r.json()
    assert cs["resourceType"] == "CapabilityStatement" and cs["fhirVersion"] == "4.0.1"
    assert cs["kind"] == "instance" and cs["rest"][0]["mode"] == "server"
    assert {i["code"] for i in cs["rest"][0]["interaction"]} == {"batch", "transaction"}
    by_type = {res["type"]: res for res in cs["rest"][0]["resource"]}
    assert "MedicationOrder" not in by_type and len(by_type) > 140
    wanted = {
        "Patient": {"family", "given", "name", "birthdate", "gender", "identifier", "_id"},
        "Observation": {"patient", "category", "date", "code"},
        "Condition": {"patient"}, "Encounter": {"patient", "date"}, "AllergyIntolerance": {"patient"},
        "MedicationRequest": {"patient"}, "MedicationStatement": {"patient"}, "Coverage": {"patient"},
    }
    for rtype, params in wanted.items():
        res = by_type[rtype]
        assert {"read", "search-type"} <= {i["code"] for i in res["interaction"]}, rtype
        assert params <= {s["name"] for s in res["searchParam"]}, rtype
    # quantity/number/composite params cannot be evaluated in memory, so they are not advertised
    assert "value-quantity" not in {s["name"] for s in by_type["Observation"]["searchParam"]}


def test_next_links_walk_every_observation_exactly_once(engines):
    eng = engines["tenant-b"]
    first = get(eng, "/Observation?_count=50")
    total, seen, url, pages = first.json()["total"], [], eng.base_path + "/Observation?_count=50", 0
    while url and pages < 20:
        page = http_request(eng.port, "GET", url).json()
        seen += [e["fullUrl"] for e in page.get("entry", [])]
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        url = urllib.parse.urlsplit(nxt[0])._replace(scheme="", netloc="").geturl() if nxt else None
        pages += 1
    assert total == len(data_of("tenant-b", "Observation")) and pages == -(-total // 50)
    assert len(seen) == total == len(set(seen))
    assert all(u.startswith(eng.base_url + "/Observation/") for u in seen)


def test_a_post_search_answers_a_get_style_self_link_with_the_form_parameters(engines):
    p = PATIENTS["tenant-a"]
    r = get(engines["tenant-a"], "/Patient/_search", FORM, "POST",
            urllib.parse.urlencode({"family": p.family, "_count": "5"}).encode())
    (self_link,) = [link["url"] for link in r.json()["link"] if link["relation"] == "self"]
    assert self_link == f"{engines['tenant-a'].base_url}/Patient?family={p.family}&_count=5"


def test_unknown_search_parameters_are_ignored_unless_strict_handling_is_asked(engines):
    p = PATIENTS["tenant-a"]
    lenient = get(engines["tenant-a"], f"/Coverage?patient={p.id}&no-such-param=1")
    assert lenient.status == 200 and lenient.json()["total"] == 1
    assert "no-such-param" not in lenient.json()["link"][0]["url"]
    strict = get(engines["tenant-a"], f"/Coverage?patient={p.id}&no-such-param=1", {"prefer": "handling=strict"})
    assert strict.status == 400 and strict.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("path,method,headers,body,status", [
    pytest.param("/Patient?_count=lots", "GET", None, None, 400, id="a-count-that-is-not-a-number"),
    pytest.param("/Patient/does-not-exist", "GET", None, None, 404, id="an-unknown-id"),
    pytest.param("/Patient/_search", "POST", FHIR_JSON, b'{"family":"x"}', 415, id="a-json-search-body"),
    pytest.param("/Patient", "POST", FHIR_JSON, b"{not json", 400, id="a-body-that-is-not-json"),
    pytest.param("/", "POST", FHIR_JSON, b'{"resourceType":"Patient"}', 400, id="a-bundle-that-is-not-a-bundle"),
    pytest.param("/", "GET", None, None, 400, id="a-system-level-search"),
])
def test_a_request_the_engine_cannot_serve_gets_an_operation_outcome(engines, path, method, headers, body, status):
    r = get(engines["tenant-a"], path, headers, method, body)
    assert r.status == status, r
    assert r.json()["resourceType"] == "OperationOutcome" and r.json()["issue"][0]["severity"] == "error"


def test_links_follow_the_forwarded_headers_when_the_engine_honours_them(engines):
    r = get(engines["tenant-a"], "/Patient?_count=1", {"x-forwarded-proto": "https",
                                                      "x-forwarded-host": "fhir.example.test",
                                                      "x-forwarded-prefix": "/tenant"})
    body = r.json()
    assert body["link"][0]["url"] == "https://fhir.example.test/tenant/Patient?_count=1"
    assert body["entry"][0]["fullUrl"].startswith("https://fhir.example.test/tenant/Patient/")


def test_links_and_location_ignore_forwarded_headers_when_the_engine_does_not_honour_them(plain):
    forwarded = {"x-forwarded-proto": "https", "x-forwarded-host": "fhir.example.test", "x-forwarded-prefix": "/t"}
    created = get(plain, "/Patient", {**FHIR_JSON, **forwarded}, "POST",
                  b'{"resourceType":"Patient","name":[{"family":"Forwardless"}]}')
    assert created.status == 201, created
    assert created.header("location").startswith(f"http://127.0.0.1:{plain.port}{BASE_PATH}/Patient/")
    r = get(plain, "/Patient?family=Forwardless", forwarded)
    assert r.json()["link"][0]["url"] == f"http://127.0.0.1:{plain.port}{BASE_PATH}/Patient?family=Forwardless&_count=20"


def test_a_create_answers_201_with_a_location_that_reads_back_the_new_version(plain):
    r = get(plain, "/Patient", FHIR_JSON, "POST",
            b'{"resourceType":"Patient","id":"client-chosen","name":[{"family":"Created"}]}')
    assert r.status == 201, r
    made = r.json()
    assert made["id"] != "client-chosen" and r.header("etag") == f'W/"{made["meta"]["versionId"]}"'
    location = urllib.parse.urlsplit(r.header("location")).path
    assert location == f"{BASE_PATH}/Patient/{made['id']}/_history/{made['meta']['versionId']}"
    again = http_request(plain.port, "GET", location)
    assert again.status == 200 and again.json()["name"] == [{"family": "Created"}]


def test_a_transaction_resolves_urn_uuid_references_to_the_new_ids(plain):
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:11111111-2222-4333-8444-555555555555",
         "resource": {"resourceType": "Patient", "name": [{"family": "Transacted"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "urn:uuid:11111111-2222-4333-8444-555555555555"}},
         "request": {"method": "POST", "url": "Observation"}}]}
    r = get(plain, "/", FHIR_JSON, "POST", json.dumps(tx).encode())
    assert r.status == 200 and r.json()["type"] == "transaction-response", r
    patient, obs = (e["resource"] for e in r.json()["entry"])
    assert [e["response"]["status"] for e in r.json()["entry"]] == ["201", "201"]
    assert obs["subject"]["reference"] == f"Patient/{patient['id']}"


def test_only_requests_under_the_base_path_are_served(plain):
    assert http_request(plain.port, "GET", "/metadata").status == 404
    assert http_request(plain.port, "GET", BASE_PATH + "/metadata").status == 200


def test_the_engine_logs_no_names_ids_or_query_strings(engines):
    p = PATIENTS["tenant-b"]
    for call in calls(p):
        run(engines["tenant-b"].base_url, call)
    log = engines["tenant-b"].log()
    assert "FHIR READY tenant-b" in log
    for secret in (p.id, p.family, p.mrn, "vital-signs", "_search"):
        assert secret not in log


def test_an_engine_loads_its_data_quickly_and_exits_cleanly_on_sigterm(workdir):
    eng = FhirEngine("tenant-b-restart", workdir, TENANT_DATA["tenant-b"]).start(timeout=30)
    try:
        assert eng.startup_seconds < 30
        assert http_request(eng.port, "GET", f"/Patient/{PATIENTS['tenant-b'].id}").status == 200
    finally:
        code = eng.stop()
    assert code == 0
    assert "loaded" in eng.log() and "entries" in eng.log()
