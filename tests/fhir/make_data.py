#!/usr/bin/env python3
"""Generate the TEST-ONLY FHIR R4 data of the two demo tenants: tests/fhir/data/tenant-{a,b}.json.

    .venv/bin/python tests/fhir/make_data.py           # (re)write both files
    .venv/bin/python tests/fhir/make_data.py --check   # exit 1 if the files differ from what would be written

Each file is a JSON array of transaction Bundles (one shared bundle with the tenant's payer Organization, then
one per patient) that tests/fhir/server.mjs loads at start (FHIR_DATA). The clinical content comes from PyPI
`carebundle` (offline, seeded, deterministic): per patient one visit on 2026-01-01 with vital signs, an HbA1c,
conditions, allergies and medication requests (`generate_bundle`), plus three earlier quarterly visits with
blood pressure (`generate_history`). carebundle makes neither MedicationStatement nor Coverage, so this script
derives them: one MedicationStatement per MedicationRequest and one Coverage per patient.

Rewritten for a stable, known data set: carebundle's transaction entries are `POST` with `urn:uuid:` fullUrls,
so the server would invent new ids at every start; here each entry becomes `PUT <Type>/<carebundle's uuid>`
and every `urn:uuid:` reference becomes `<Type>/<uuid>`. Every resource is tagged
`urn:fhir-tenant-router:tenant|<tenant>` (meta.tag) so a response shows which tenant's server produced it,
and keeps carebundle's HTEST security label. The two tenants use different seeds, so they share no id and no
identifier (names come from carebundle's pool of 10 x 10 fictional names and may repeat).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import uuid
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

import carebundle
from carebundle import generate_bundle, generate_history, to_json

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
CAREBUNDLE_VERSION = "0.5.0"  # pinned: other versions may draw different values for the same seed

PATIENTS = 20
# name -> carebundle seed. Chosen so that each tenant has a patient with every kind of record (carebundle draws
# allergies rarely); tenant_bundles() checks it.
TENANTS = {"tenant-a": 20260101, "tenant-b": 20260203}
REFERENCE_DATE = date(2026, 1, 1)   # the latest visit
HISTORY_VISITS = 3                  # earlier visits, every 90 days before the latest one
PANELS = ("hba1c",)                 # one lab panel: keeps the files small, and labs are not vital signs
PROFILE_CYCLE = ("hypertension", "type2_diabetes", "healthy", "ckd_stage3", "hypertension", "anaemia",
                 "type2_diabetes", "healthy")
TAG_SYSTEM = "urn:fhir-tenant-router:tenant"
FULL_RECORD = {"Patient", "Encounter", "Observation", "Condition", "AllergyIntolerance", "MedicationRequest",
               "MedicationStatement", "Coverage"}
HTEST = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HTEST",
         "display": "test health data"}
NAMESPACE = uuid.UUID("5b0c6f8e-2d41-4b7a-9e3c-1f0a7d6b8c24")  # uuid5 namespace of the derived resources

_DEC = "@@FHIRDEC@@"
_DEC_RE = re.compile(rf'"{re.escape(_DEC)}([-+0-9.eE]+){re.escape(_DEC)}"')


def loads(text: str):
    # decimals stay Decimal so that their precision ("12.50") survives the round trip
    return json.loads(text, parse_float=Decimal)


def dumps(doc) -> str:
    def default(o):
        if isinstance(o, Decimal):
            return f"{_DEC}{o}{_DEC}"
        raise TypeError(type(o).__name__)
    return _DEC_RE.sub(r"\1", json.dumps(doc, default=default, ensure_ascii=False, separators=(",", ":")))


def derived_id(*parts: object) -> str:
    return str(uuid.uuid5(NAMESPACE, "/".join(str(p) for p in parts)))


def narrative(summary: str) -> dict:
    return {"status": "generated",
            "div": '<div xmlns="http://www.w3.org/1999/xhtml"><p><b>SYNTHETIC TEST DATA \u2014 not a real '
                   f"person.</b></p><p>{summary}</p></div>"}


def rewrite_references(node, urn_to_ref: dict[str, str]):
    if isinstance(node, dict):
        return {k: (urn_to_ref.get(v, v) if k == "reference" and isinstance(v, str) else
                    rewrite_references(v, urn_to_ref)) for k, v in node.items()}
    if isinstance(node, list):
        return [rewrite_references(v, urn_to_ref) for v in node]
    return node


def put_entry(resource: dict, tenant: str) -> dict:
    meta = resource.setdefault("meta", {})
    meta.setdefault("security", [HTEST])
    meta["tag"] = [{"system": TAG_SYSTEM, "code": tenant}]
    rtype, rid = resource["resourceType"], resource["id"]
    return {"fullUrl": f"urn:uuid:{rid}", "resource": resource, "request": {"method": "PUT", "url": f"{rtype}/{rid}"}}


def payer(tenant: str, seed: int) -> dict:
    letter = tenant.rsplit("-", 1)[-1].upper()
    return {"resourceType": "Organization", "id": derived_id(seed, "payer"),
            "text": narrative(f"Fictional Test Health Plan {letter} (synthetic)."),
            "active": True,
            "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/organization-type",
                                  "code": "pay", "display": "Payer"}]}],
            "name": f"Fictional Test Health Plan {letter}"}


def medication_statement(seed: int, index: int, k: int, request: dict) -> dict:
    med = request["medicationCodeableConcept"]
    return {"resourceType": "MedicationStatement", "id": derived_id(seed, "medication-statement", index, k),
            "text": narrative(f"Taking: {med.get('text', 'medication')} (synthetic)."),
            "basedOn": [{"reference": f"MedicationRequest/{request['id']}"}],
            "status": "active",
            "medicationCodeableConcept": med,
            "subject": request["subject"],
            **({"context": request["encounter"]} if "encounter" in request else {}),
            "effectivePeriod": {"start": request["authoredOn"]},
            "dateAsserted": request["authoredOn"],
            "informationSource": request["subject"]}


def coverage(seed: int, index: int, patient: dict, payer_id: str) -> dict:
    mrn = patient["identifier"][0]["value"]
    return {"resourceType": "Coverage", "id": derived_id(seed, "coverage", index),
            "text": narrative("Health plan coverage (synthetic)."),
            "status": "active",
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HIP",
                                 "display": "health insurance plan policy"}]},
            "subscriberId": f"SUB-{mrn}",
            "beneficiary": {"reference": f"Patient/{patient['id']}"},
            "relationship": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/subscriber-relationship",
                                         "code": "self"}]},
            "period": {"start": "2025-01-01", "end": "2026-12-31"},
            "payor": [{"reference": f"Organization/{payer_id}"}],
            "class": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/coverage-class",
                                            "code": "plan"}]},
                       "value": f"PLAN-{'ABCDE'[index % 5]}", "name": "Synthetic Standard Plan"}]}


def patient_bundle(tenant: str, seed: int, index: int, payer_id: str) -> dict:
    profile = PROFILE_CYCLE[index % len(PROFILE_CYCLE)]
    sex = ("F", "M")[index % 2]
    visit = loads(to_json(generate_bundle(profile=profile, seed=seed, sex=sex, index=index, panels=PANELS,
                                          reference_date=REFERENCE_DATE)))
    history = loads(to_json(generate_history(profile=profile, seed=seed, sex=sex, index=index,
                                             visits=HISTORY_VISITS,
                                             reference_date=REFERENCE_DATE - timedelta(days=90))))
    # From the history keep only its encounters and blood pressures: its Patient, Practitioner and Conditions
    # are the visit's own (same urns), drawn a second time with other demographics.
    entries = list(visit["entry"]) + [e for e in history["entry"]
                                      if e["resource"]["resourceType"] in ("Encounter", "Observation")]
    urn_to_ref, resources = {}, []
    for e in entries:
        rid = e["fullUrl"].removeprefix("urn:uuid:")
        urn_to_ref[e["fullUrl"]] = f"{e['resource']['resourceType']}/{rid}"
        resources.append({"resourceType": e["resource"]["resourceType"], "id": rid,
                          **{k: v for k, v in e["resource"].items() if k != "resourceType"}})
    resources = [rewrite_references(r, urn_to_ref) for r in resources]
    (patient,) = [r for r in resources if r["resourceType"] == "Patient"]
    requests = [r for r in resources if r["resourceType"] == "MedicationRequest"]
    resources += [medication_statement(seed, index, k, r) for k, r in enumerate(requests)]
    resources.append(coverage(seed, index, patient, payer_id))
    return {"resourceType": "Bundle", "type": "transaction", "entry": [put_entry(r, tenant) for r in resources]}


def tenant_bundles(tenant: str, seed: int) -> list[dict]:
    org = payer(tenant, seed)
    shared = {"resourceType": "Bundle", "type": "transaction", "entry": [put_entry(org, tenant)]}
    bundles = [shared] + [patient_bundle(tenant, seed, i, org["id"]) for i in range(PATIENTS)]
    if not any(FULL_RECORD <= {e["resource"]["resourceType"] for e in b["entry"]} for b in bundles[1:]):
        raise SystemExit(f"make_data: no {tenant} patient has all of {sorted(FULL_RECORD)}: pick another seed")
    return bundles


def render(bundles: list[dict]) -> str:
    return "[\n" + ",\n".join(dumps(b) for b in bundles) + "\n]\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the files instead of writing them")
    args = ap.parse_args()
    if carebundle.__version__ != CAREBUNDLE_VERSION:
        print(f"make_data: carebundle {carebundle.__version__} installed, {CAREBUNDLE_VERSION} pinned "
              f"(pip install carebundle=={CAREBUNDLE_VERSION})", file=sys.stderr)
        return 1
    DATA.mkdir(exist_ok=True)
    stale = []
    for tenant, seed in TENANTS.items():
        path = DATA / f"{tenant}.json"
        text = render(tenant_bundles(tenant, seed))
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        path.write_text(text, encoding="utf-8")
        counts: dict[str, int] = {}
        for b in json.loads(text):
            for e in b["entry"]:
                counts[e["resource"]["resourceType"]] = counts.get(e["resource"]["resourceType"], 0) + 1
        print(f"{path.relative_to(HERE.parents[1])}: {len(text.encode()) // 1024} KiB, "
              + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if stale:
        print("make_data: out of date (run tests/fhir/make_data.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
