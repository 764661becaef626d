"""A FAKE HAPI FHIR server (hapiproject/hapi, the JPA starter) for the deployment-example route tests: it records
every request and answers the four calls those tests make the way HAPI does, with links built the way HAPI
builds them. It is not a FHIR server; it exists so that Envoy can run each example's routes without Docker or
Kubernetes, and so that what "HAPI" receives (path, Host) can be asserted exactly.

What is modelled, and from where in HAPI:
* FHIR is served under `/fhir/` only (the starter's servlet mapping); any other path answers 404, as Tomcat
  does, so a rewrite that yields `/fhirPatient` fails here as it fails there.
* The base written into links: with `hapi.fhir.server_address` set, that value (the starter's StarterJpaConfig
  installs a HardcodedServerAddressStrategy); without it, the request's own scheme, host and `/fhir`
  (IncomingRequestAddressStrategy; Spring Boot on Kubernetes also honours X-Forwarded-Proto/-Host, modelled
  here too). A trailing `/` is dropped (RestfulServer.getServerBaseForRequest).
* Paging: `<base>?_getpages=<id>&_getpagesoffset=<n>&_count=<n>&_bundletype=searchset`
  (RestfulServerUtils.createPagingLink); such a link is served by a GET on the base with `_getpages`.
* `GET metadata`: a CapabilityStatement whose `implementation.url` is the base. `GET Patient`: a searchset of
  one Patient with `self` and `next` links and an absolute `fullUrl`. `POST` to the base: a batch-response.
"""
from __future__ import annotations

import json
import threading
import uuid
from urllib.parse import parse_qs, urlsplit

from upstream import RecordingUpstream

SERVLET = "/fhir"


class FakeHapi(RecordingUpstream):
    def __init__(self, name: str, server_address: str | None):
        super().__init__(name, "tenant")
        self.server_address = server_address
        self._current = threading.local()  # the headers of the request this handler thread answers

    def base(self) -> str:
        """The base HAPI writes into links for the request being answered."""
        if self.server_address:
            return self.server_address.rstrip("/")
        h = getattr(self._current, "headers", {})
        proto = (h.get("x-forwarded-proto") or ["http"])[0]
        host = (h.get("x-forwarded-host") or h.get("host") or ["localhost"])[0]
        return f"{proto}://{host}{SERVLET}"

    def _record(self, req) -> None:
        self._current.headers = req.headers
        super()._record(req)

    def respond(self, method: str, target: str) -> tuple[int, dict]:
        url = urlsplit(target)
        if url.path != SERVLET and not url.path.startswith(SERVLET + "/"):
            return 404, _outcome("not-found", f"no servlet at {url.path}")
        rel = url.path[len(SERVLET):].strip("/")
        query = parse_qs(url.query)
        base = self.base()
        if (method, rel) == ("GET", "metadata"):
            return 200, {"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
                         "fhirVersion": "4.0.1", "format": ["json"], "date": "2026-01-01",
                         "implementation": {"description": f"fake HAPI {self.name}", "url": base},
                         "rest": [{"mode": "server"}]}
        if (method, rel) == ("GET", "Patient"):
            page = f"{base}?_getpages={uuid.uuid4()}&_getpagesoffset=1&_count=1&_bundletype=searchset"
            return 200, _searchset(self.name, base, 1, [
                {"relation": "self", "url": f"{base}/Patient?{url.query}" if url.query else f"{base}/Patient"},
                {"relation": "next", "url": page}])
        if (method, rel) == ("GET", "") and "_getpages" in query:
            return 200, _searchset(self.name, base, 2, [{"relation": "self", "url": f"{base}?{url.query}"}])
        if (method, rel) == ("POST", ""):
            return 200, {"resourceType": "Bundle", "type": "batch-response",
                         "entry": [{"response": {"status": "200 OK"}}]}
        return 404, _outcome("not-supported", f"{method} {rel!r} is not modelled by this fake")


def _searchset(name: str, base: str, number: int, links: list[dict]) -> dict:
    pid = f"{name}-{number}"
    return {"resourceType": "Bundle", "type": "searchset", "total": 2,
            "meta": {"tag": [{"system": "urn:fhir-tenant-router:upstream", "code": name}]},
            "link": links,
            "entry": [{"fullUrl": f"{base}/Patient/{pid}",
                       "resource": {"resourceType": "Patient", "id": pid, "name": [{"family": name}]},
                       "search": {"mode": "match"}}]}


def _outcome(code: str, text: str) -> dict:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]}


def batch_body() -> bytes:
    """A batch of two reads (allowed by the examples' default read-only allowlist)."""
    return json.dumps({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/p1"}},
        {"request": {"method": "GET", "url": "Patient?family=smith"}}]}).encode()
