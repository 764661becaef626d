"""The FHIR calls of the Microsoft Teams Patients app (its DSTU2 and STU3 interface documents), as one
reusable list, plus a runner and content checks.

The Patients app speaks DSTU2 or STU3; our tenant engines (tests/fhir/server.mjs) are R4 and answer these
calls as R4. Where the DSTU2 wording is not R4 the call is listed twice, and the DSTU2 one says what an R4
engine answers:

* ``_sort:desc=date`` (DSTU2) vs ``_sort=-date`` (STU3/R4): medplum accepts the DSTU2 spelling but ignores
  the ``:desc`` modifier, so it sorts OLDEST first (checked by the ``*-dstu2-sort`` calls);
* ``MedicationOrder`` (DSTU2 only; R4 has MedicationRequest): 404 with an OperationOutcome.

Use::

    from contract import contract_patient, calls, run, check
    patient = contract_patient(DATA / "tenant-a.json")
    for call in calls(patient):
        status, body = run("http://127.0.0.1:9101", call, headers={"authorization": "Bearer ..."})
        assert check(call, patient, status, body) == []

Standard library only, so Envoy-level tests can import it next to tests/e2e/harness.py.
"""
from __future__ import annotations

import http.client
import json
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
TENANT_DATA = {"tenant-a": DATA / "tenant-a.json", "tenant-b": DATA / "tenant-b.json"}
TAG_SYSTEM = "urn:fhir-tenant-router:tenant"
VITAL_SIGNS = ("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs")
FORM = "application/x-www-form-urlencoded"
FHIR_JSON = "application/fhir+json"
# Every kind of record the Patients app shows; the contract patient has all of them.
FULL_RECORD = {"Patient", "Encounter", "Observation", "Condition", "AllergyIntolerance", "MedicationRequest",
               "MedicationStatement", "Coverage"}


@dataclass(frozen=True)
class ContractPatient:
    tenant: str
    id: str
    family: str
    given: str
    birth_date: str
    gender: str
    mrn: str  # identifier value (system is carebundle's synthetic MRN urn)
    counts: dict = field(default_factory=dict, compare=False)  # resource type -> number in the data set

    @property
    def reference(self) -> str:
        return f"Patient/{self.id}"


def data_resources(data_file: Path) -> list[dict]:
    """Every resource of a tests/fhir/data/*.json file (a JSON array of transaction Bundles)."""
    bundles = json.loads(Path(data_file).read_text(encoding="utf-8"))
    return [e["resource"] for b in bundles for e in b["entry"]]


def data_patients(data_file: Path) -> list[dict]:
    return [r for r in data_resources(data_file) if r["resourceType"] == "Patient"]


def contract_patient(data_file: Path, tenant: str | None = None) -> ContractPatient:
    """The first patient of a data file who has every kind of record the Patients app shows."""
    bundles = json.loads(Path(data_file).read_text(encoding="utf-8"))
    for b in bundles:
        resources = [e["resource"] for e in b["entry"]]
        types = {r["resourceType"] for r in resources}
        if not FULL_RECORD <= types:
            continue
        (p,) = [r for r in resources if r["resourceType"] == "Patient"]
        counts: dict[str, int] = {}
        for r in resources:
            counts[r["resourceType"]] = counts.get(r["resourceType"], 0) + 1
        tag = next((t["code"] for t in p.get("meta", {}).get("tag", []) if t.get("system") == TAG_SYSTEM), None)
        return ContractPatient(tenant=tenant or tag or Path(data_file).stem, id=p["id"],
                               family=p["name"][0]["family"], given=p["name"][0]["given"][0],
                               birth_date=p["birthDate"], gender=p["gender"], mrn=p["identifier"][0]["value"],
                               counts=counts)
    raise ValueError(f"{data_file}: no patient has all of {sorted(FULL_RECORD)}")


# ------------------------------------------------------------------------------------------ calls

@dataclass(frozen=True)
class Call:
    name: str
    method: str
    path: str                        # relative to the FHIR base, starting with "/"
    form: tuple | None = None        # POST _search: form fields, sent as application/x-www-form-urlencoded
    body: dict | None = None         # JSON body (batch Bundle)
    status: int = 200                # what an R4 engine answers
    resource_type: str | None = None  # what the answer is (besides OperationOutcome for errors)
    note: str = ""

    def __str__(self) -> str:
        return self.name


def _q(**params) -> str:
    return urllib.parse.urlencode(params, safe="/:,")


def calls(p: ContractPatient) -> list[Call]:
    pid = p.id
    batch_entries = [
        ("GET", f"Patient/{pid}"),
        ("GET", f"Observation?{_q(patient=pid, category='vital-signs', _sort='-date')}"),
        ("GET", f"Condition?{_q(patient=pid, _count=10)}"),
        ("GET", f"Encounter?{_q(patient=pid, _sort='-date', _count=1)}"),
        ("GET", f"AllergyIntolerance?{_q(patient=pid)}"),
        ("GET", f"MedicationRequest?{_q(patient=pid)}"),
        ("GET", f"MedicationStatement?{_q(patient=pid)}"),
        ("GET", f"Coverage?{_q(patient=pid)}"),
        ("GET", f"MedicationOrder?{_q(patient=pid)}"),
    ]
    return [
        Call("patient-search-family-given", "POST", "/Patient/_search",
             form=(("family", p.family), ("given", p.given)), resource_type="Bundle"),
        Call("patient-search-name-birthdate-gender", "POST", "/Patient/_search",
             form=(("name", p.family), ("birthdate", p.birth_date), ("gender", p.gender), ("_count", "10")),
             resource_type="Bundle"),
        Call("patient-search-identifier", "POST", "/Patient/_search", form=(("identifier", p.mrn),),
             resource_type="Bundle"),
        Call("patient-read", "GET", f"/Patient/{pid}", resource_type="Patient"),
        Call("vital-signs", "GET", f"/Observation?{_q(patient=pid, category='vital-signs', _sort='-date')}",
             resource_type="Bundle"),
        Call("vital-signs-dstu2-sort", "GET",
             f"/Observation?{_q(patient=pid, category='vital-signs', **{'_sort:desc': 'date'})}",
             resource_type="Bundle", note="medplum ignores :desc and sorts oldest first"),
        Call("conditions", "GET", f"/Condition?{_q(patient=pid, _count=10)}", resource_type="Bundle"),
        Call("latest-encounter", "GET", f"/Encounter?{_q(patient=pid, _sort='-date', _count=1)}",
             resource_type="Bundle"),
        Call("latest-encounter-dstu2-sort", "GET",
             f"/Encounter?{_q(patient=pid, **{'_sort:desc': 'date'}, _count=1)}", resource_type="Bundle",
             note="medplum ignores :desc: this is the OLDEST encounter"),
        Call("allergies", "GET", f"/AllergyIntolerance?{_q(patient=pid)}", resource_type="Bundle"),
        Call("medication-requests", "GET", f"/MedicationRequest?{_q(patient=pid, _count=10)}",
             resource_type="Bundle"),
        Call("medication-statements", "GET", f"/MedicationStatement?{_q(patient=pid)}", resource_type="Bundle"),
        Call("medication-orders-dstu2", "GET", f"/MedicationOrder?{_q(patient=pid)}", status=404,
             note="DSTU2-only resource type: an R4 engine does not know it"),
        Call("coverage", "GET", f"/Coverage?{_q(patient=pid)}", resource_type="Bundle"),
        Call("batch", "POST", "/", resource_type="Bundle",
             body={"resourceType": "Bundle", "type": "batch",
                   "entry": [{"request": {"method": m, "url": u}} for m, u in batch_entries]}),
    ]


def call_named(p: ContractPatient, name: str) -> Call:
    (c,) = [c for c in calls(p) if c.name == name]
    return c


# ------------------------------------------------------------------------------------------ running

def run(base_url: str, call: Call, headers: dict[str, str] | None = None,
        timeout: float = 10.0) -> tuple[int, dict | None]:
    """Send one call to `base_url` (e.g. http://127.0.0.1:9101 or http://127.0.0.1:10000/api/FHIR/R4);
    return (status, parsed JSON body or None)."""
    u = urllib.parse.urlsplit(base_url)
    if u.scheme != "http" or not u.hostname:
        raise ValueError(f"expected an http:// base URL, got {base_url!r}")
    path = u.path.rstrip("/") + call.path
    h = {"accept": FHIR_JSON}
    data = None
    if call.form is not None:
        data = urllib.parse.urlencode(call.form).encode()
        h["content-type"] = FORM
    elif call.body is not None:
        data = json.dumps(call.body).encode()
        h["content-type"] = FHIR_JSON
    h.update(headers or {})
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        conn.request(call.method, path, body=data, headers=h)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = None
    return resp.status, body


def run_all(base_url: str, p: ContractPatient, headers: dict[str, str] | None = None) -> dict[str, tuple]:
    return {c.name: run(base_url, c, headers) for c in calls(p)}


# ------------------------------------------------------------------------------------------ checks

def resources(bundle: dict) -> list[dict]:
    return [e["resource"] for e in bundle.get("entry", [])]


def _refs_patient(r: dict, p: ContractPatient) -> bool:
    for key in ("subject", "patient", "beneficiary"):
        if r.get(key, {}).get("reference") == p.reference:
            return True
    return False


def _has_category(r: dict, system: str, code: str) -> bool:
    return any(c.get("system") == system and c.get("code") == code
               for cat in r.get("category", []) for c in cat.get("coding", []))


def _when(r: dict) -> str:
    return r.get("effectiveDateTime") or r.get("period", {}).get("start") or ""


def _searchset(body, p: ContractPatient, rtype: str, at_least: int, at_most: int | None = None) -> list[str]:
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle" or body.get("type") != "searchset":
        return [f"expected a searchset Bundle, got {str(body)[:200]}"]
    rs = resources(body)
    problems = []
    if len(rs) < at_least:
        problems.append(f"expected at least {at_least} {rtype}, got {len(rs)}")
    if at_most is not None and len(rs) > at_most:
        problems.append(f"expected at most {at_most} {rtype}, got {len(rs)}")
    wrong = [r.get("resourceType") for r in rs if r.get("resourceType") != rtype]
    if wrong:
        problems.append(f"not {rtype}: {wrong}")
    if rtype != "Patient":
        strangers = [r.get("id") for r in rs if not _refs_patient(r, p)]
        if strangers:
            problems.append(f"{rtype} of another patient: {strangers}")
    if not any(link.get("relation") == "self" for link in body.get("link", [])):
        problems.append("no self link")
    return problems


def _sorted(rs: list[dict], newest_first: bool) -> list[str]:
    dates = [_when(r) for r in rs]
    return [] if dates == sorted(dates, reverse=newest_first) else [
        f"not sorted {'newest' if newest_first else 'oldest'} first: {dates}"]


def _patient_found(body, p: ContractPatient, exactly_one: bool = False) -> list[str]:
    problems = _searchset(body, p, "Patient", 1)
    if problems:
        return problems
    ids = [r["id"] for r in resources(body)]
    if p.id not in ids:
        problems.append(f"patient {p.id} not among {ids}")
    if exactly_one and len(ids) != 1:
        problems.append(f"expected exactly this patient, got {ids}")
    return problems


def _outcome(body) -> list[str]:
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome" or not body.get("issue"):
        return [f"expected an OperationOutcome, got {str(body)[:200]}"]
    return []


CHECKS: dict[str, Callable[[dict, ContractPatient], list[str]]] = {
    "patient-search-family-given": lambda b, p: _patient_found(b, p) + [
        f"family {r['name'][0]['family']} != {p.family}" for r in resources(b or {})
        if r["name"][0]["family"].lower() != p.family.lower()],
    "patient-search-name-birthdate-gender": lambda b, p: _patient_found(b, p) + [
        f"{r['id']}: {r.get('birthDate')} {r.get('gender')}" for r in resources(b or {})
        if (r.get("birthDate"), r.get("gender")) != (p.birth_date, p.gender)],
    "patient-search-identifier": lambda b, p: _patient_found(b, p, exactly_one=True),
    "patient-read": lambda b, p: [] if isinstance(b, dict) and b.get("resourceType") == "Patient"
    and b.get("id") == p.id and b["name"][0]["family"] == p.family else [f"not patient {p.id}: {str(b)[:200]}"],
    "vital-signs": lambda b, p: _searchset(b, p, "Observation", 1) + [
        f"{r['id']} is not a vital sign" for r in resources(b or {}) if not _has_category(r, *VITAL_SIGNS)]
    + _sorted(resources(b or {}), newest_first=True),
    "vital-signs-dstu2-sort": lambda b, p: _searchset(b, p, "Observation", 1) + [
        f"{r['id']} is not a vital sign" for r in resources(b or {}) if not _has_category(r, *VITAL_SIGNS)],
    "conditions": lambda b, p: _searchset(b, p, "Condition", 1, 10),
    "latest-encounter": lambda b, p: _searchset(b, p, "Encounter", 1, 1),
    "latest-encounter-dstu2-sort": lambda b, p: _searchset(b, p, "Encounter", 1, 1),
    "allergies": lambda b, p: _searchset(b, p, "AllergyIntolerance", 1),
    "medication-requests": lambda b, p: _searchset(b, p, "MedicationRequest", 1, 10),
    "medication-statements": lambda b, p: _searchset(b, p, "MedicationStatement", 1),
    "medication-orders-dstu2": lambda b, p: _outcome(b),
    "coverage": lambda b, p: _searchset(b, p, "Coverage", 1),
}

BATCH_STATUSES = ["200", "200", "200", "200", "200", "200", "200", "200", "404"]


def _check_batch(body, p: ContractPatient) -> list[str]:
    if not isinstance(body, dict) or body.get("type") != "batch-response":
        return [f"expected a batch-response Bundle, got {str(body)[:200]}"]
    statuses = [e.get("response", {}).get("status", "").split(" ")[0] for e in body.get("entry", [])]
    problems = [] if statuses == BATCH_STATUSES else [f"entry statuses {statuses} != {BATCH_STATUSES}"]
    entries = body.get("entry", [])
    if len(entries) == len(BATCH_STATUSES):
        problems += CHECKS["patient-read"](entries[0].get("resource"), p)
        for i, name in ((1, "vital-signs"), (2, "conditions"), (3, "latest-encounter"), (4, "allergies"),
                        (5, "medication-requests"), (6, "medication-statements"), (7, "coverage")):
            problems += [f"entry {i}: {m}" for m in CHECKS[name](entries[i].get("resource"), p)]
        problems += [f"entry 8: {m}" for m in _outcome(entries[8].get("response", {}).get("outcome"))]
    return problems


CHECKS["batch"] = _check_batch


def check(call: Call, p: ContractPatient, status: int, body) -> list[str]:
    """What is wrong with an answer to `call` about patient `p` (empty list: nothing)."""
    problems = [] if status == call.status else [f"status {status}, expected {call.status}"]
    return problems + CHECKS[call.name](body, p)
