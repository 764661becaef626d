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

from upstream import RawBody, RecordingUpstream

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


class FakeHapiPagingServer(RecordingUpstream):
    """A FAKE HAPI FHIR server for the paging-cursor and answer-check tests (HAPI is Java and cannot run here): it
    serves FHIR at the root of its port, searches a fixed set of Patients, and pages the way HAPI does
    (RestfulServerUtils.createPagingLink): `<base>?_getpages=<id>&_getpagesoffset=<n>&_count=<n>&_bundletype=
    searchset`, served by a GET on the base, out of ONE paging cache for every caller, as a HAPI shared by several
    tenants (partitions) has: whoever holds a `_getpages` id reads that search's pages (the leak cursors stop).
    The base written into links is `X-Forwarded-Proto`://`X-Forwarded-Host` when given (Spring Boot honours them),
    else the Host header.

    It misbehaves ON PURPOSE where a test asks it to (the answer check's oracle must be able to fail):
    * `GET /Patient?name=misbehave`: a searchset that also holds an Observation, and a Patient with a contained
      Organization, as a server with a reach bug (or a buggy `_include`) would answer;
    * `GET /Patient?name=xml`: an XML searchset (`application/fhir+xml`);
    * `GET /Patient?name=big`, `GET /Patient/big`: a searchset, or a Patient whose contained resources make it,
      over 2 MiB (beyond Envoy's default buffer limit), ending in an Observation."""

    PATIENTS = [f"p{i}" for i in range(5)]

    def __init__(self, name: str):
        super().__init__(name, "tenant")
        self.searches: dict[str, list[str]] = {}
        self._current = threading.local()
        self.content_type: dict[int, str] = {}

    def _record(self, req) -> None:
        self._current.headers = req.headers
        super()._record(req)

    def base(self) -> str:
        h = getattr(self._current, "headers", {})
        proto = (h.get("x-forwarded-proto") or ["http"])[0]
        host = (h.get("x-forwarded-host") or h.get("host") or ["localhost"])[0]
        return f"{proto}://{host}"

    def page(self, search_id: str, offset: int, count: int) -> dict:
        ids = self.searches[search_id]
        base = self.base()
        links = [{"relation": "self", "url": f"{base}?_getpages={search_id}&_getpagesoffset={offset}&_count={count}"
                                             f"&_bundletype=searchset"}]
        if offset + count < len(ids):
            links.append({"relation": "next", "url": f"{base}?_getpages={search_id}&_getpagesoffset={offset + count}"
                                                     f"&_count={count}&_bundletype=searchset"})
        if offset > 0:
            links.append({"relation": "previous", "url": f"{base}?_getpages={search_id}&_getpagesoffset="
                                                         f"{max(0, offset - count)}&_count={count}&_bundletype=searchset"})
        return {"resourceType": "Bundle", "type": "searchset", "total": len(ids), "link": links,
                "entry": [{"fullUrl": f"{base}/Patient/{pid}", "search": {"mode": "match"},
                           "resource": {"resourceType": "Patient", "id": pid, "name": [{"family": self.name}]}}
                          for pid in ids[offset:offset + count]]}

    def respond(self, method: str, target: str) -> tuple[int, dict]:
        url = urlsplit(target)
        query = parse_qs(url.query)
        first = lambda k, d=None: (query.get(k) or [d])[0]  # noqa: E731
        if method == "GET" and url.path == "/Patient" and first("name") == "misbehave":
            return 200, {"resourceType": "Bundle", "type": "searchset", "entry": [
                {"resource": {"resourceType": "Patient", "id": "m1",
                              "contained": [{"resourceType": "Organization", "id": "o1"}]}},
                {"resource": {"resourceType": "Observation", "id": "obs1", "status": "final"},
                 "search": {"mode": "include"}}]}
        if method == "GET" and (url.path == "/Patient/big" or (url.path == "/Patient" and first("name") == "big")):
            filler = "x" * 1000
            big = [{"resourceType": "Patient", "id": f"b{i}", "text": {"status": "generated",
                                                                   "div": f"<div>{filler}</div>"}}
                   for i in range(2100)]
            if url.path == "/Patient/big":
                return 200, {"resourceType": "Patient", "id": "big", "contained": [
                    *big, {"resourceType": "Observation", "id": "obs-big"}]}
            return 200, {"resourceType": "Bundle", "type": "searchset", "entry": [
                *({"resource": r} for r in big), {"resource": {"resourceType": "Observation", "id": "obs-big"}}]}
        if method == "GET" and url.path == "/Patient" and first("name") == "xml":
            return 200, RawBody("application/fhir+xml",
                                b'<Bundle xmlns="http://hl7.org/fhir"><type value="searchset"/><entry><resource>'
                                b'<Observation><id value="obs1"/></Observation></resource></entry></Bundle>')
        if method == "GET" and url.path == "/Patient":
            count = int(first("_count", "2"))
            search_id = str(uuid.uuid4())
            self.searches[search_id] = list(self.PATIENTS)
            bundle = self.page(search_id, 0, count)
            bundle["link"][0] = {"relation": "self", "url": f"{self.base()}/Patient?{url.query}"}
            return 200, bundle
        if method == "GET" and url.path == "/" and "_getpages" in query:
            search_id = first("_getpages")
            if search_id not in self.searches:
                return 410, _outcome("not-found", "search expired")
            return 200, self.page(search_id, int(first("_getpagesoffset", "0")), int(first("_count", "2")))
        return 404, _outcome("not-supported", f"{method} {url.path!r} is not modelled by this fake")
