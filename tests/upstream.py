#!/usr/bin/env python3
"""Tiny recording HTTP upstreams for fhir-tenant-router's demo and end-to-end tests.

Two kinds of server, both answering 200 with JSON and recording every request they receive
(method, path, headers, body):

* ``metadata`` — the public FHIR discovery server: ``/metadata`` answers a FHIR R4 CapabilityStatement,
  ``/.well-known/smart-configuration`` a SMART configuration document; anything else 404.
* ``tenant``   — a tenant's FHIR server: every path answers a small searchset Bundle naming the tenant,
  so a caller can see which tenant served it.

Demo use (``make demo``)::

    python tests/upstream.py --port 9100 --name metadata          # kind inferred from the name
    python tests/upstream.py --port 9101 --name tenant-a
    python tests/upstream.py --port 9102 --name tenant-b --kind tenant

Test use: ``RecordingUpstream(name, kind).start()`` (port 0 = pick a free port), ``.requests``, ``.clear()``,
``.stop()``. Standard library only. Binds 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FHIR_JSON = "application/fhir+json"


@dataclass
class RecordedRequest:
    method: str
    path: str  # raw request target as received (path + query)
    headers: dict[str, list[str]] = field(default_factory=dict)  # lower-cased names
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def capability_statement(base_url: str) -> dict:
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2024-01-01",
        "kind": "instance",
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "implementation": {"description": "fhir-tenant-router demo", "url": base_url},
        "rest": [{
            "mode": "server",
            "security": {
                "service": [{"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "SMART-on-FHIR"}]}],
            },
            "resource": [{"type": "Patient", "interaction": [{"code": "read"}, {"code": "search-type"}]}],
        }],
    }


def smart_configuration(issuer: str) -> dict:
    return {
        "issuer": issuer,
        "token_endpoint": issuer.rstrip("/") + "/token",
        "jwks_uri": issuer.rstrip("/") + "/jwks",
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
        "capabilities": ["client-confidential-symmetric"],
    }


def tenant_bundle(name: str, path: str) -> dict:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 1,
        "meta": {"tag": [{"system": "urn:fhir-tenant-router:upstream", "code": name}]},
        "entry": [{
            "resource": {
                "resourceType": "Patient",
                "id": f"{name}-patient-1",
                "name": [{"family": name, "given": ["Demo"]}],
            },
        }],
        "link": [{"relation": "self", "url": path}],
    }


@dataclass
class RawBody:
    """An answer sent as it is, with its own content type (not JSON)."""
    content_type: str
    body: bytes


class RecordingUpstream:
    def __init__(self, name: str, kind: str | None = None, port: int = 0,
                 base_url: str = "http://127.0.0.1:10000", issuer: str = "http://127.0.0.1:9000"):
        self.name = name
        self.kind = kind or ("metadata" if "metadata" in name else "tenant")
        if self.kind not in ("metadata", "tenant"):
            raise ValueError(f"unknown kind {self.kind!r}")
        self.base_url = base_url
        self.issuer = issuer
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def start(self) -> "RecordingUpstream":
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"upstream-{self.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _record(self, req: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(req)

    def respond(self, method: str, target: str) -> tuple[int, dict]:
        path = urlsplit(target).path
        if self.kind == "metadata":
            if path == "/metadata":
                return 200, capability_statement(self.base_url)
            if path == "/.well-known/smart-configuration":
                return 200, smart_configuration(self.issuer)
            return 404, {"resourceType": "OperationOutcome", "issue": [{
                "severity": "error", "code": "not-found",
                "diagnostics": f"{self.name}: only /metadata and /.well-known/smart-configuration"}]}
        return 200, tenant_bundle(self.name, target)

    def _handler_class(self):
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "fhir-demo-upstream"

            def _chunked(self) -> bytes:
                """A chunked body (RFC 9112 7.1: Envoy sends one so when the client's request had no length,
                an HTTP/2 request ended by trailers for one), its trailer section read and dropped."""
                body = b""
                while size := int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return body

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                if not length and "chunked" in (self.headers.get("transfer-encoding") or "").lower():
                    body = self._chunked()
                headers: dict[str, list[str]] = {}
                for k, v in self.headers.items():
                    headers.setdefault(k.lower(), []).append(v)
                upstream._record(RecordedRequest(self.command, self.path, headers, body))
                status, doc = upstream.respond(self.command, self.path)
                content_type = "application/json" if "smart-configuration" in self.path else FHIR_JSON
                if isinstance(doc, RawBody):  # an answer that is not JSON
                    content_type, payload = doc.content_type, doc.body
                else:
                    payload = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(payload)))
                self.send_header("x-upstream-name", upstream.name)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _handle

            def log_message(self, fmt, *args):  # quiet by default; the demo prints its own line
                if getattr(upstream, "verbose", False):
                    sys.stderr.write(f"[{upstream.name}] {self.command} {self.path} -> {fmt % args}\n")

        return Handler


def main() -> int:
    ap = argparse.ArgumentParser(description="recording demo FHIR upstream (binds 127.0.0.1)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--name", required=True, help="e.g. metadata, tenant-a, tenant-b")
    ap.add_argument("--kind", choices=["metadata", "tenant"],
                    help="default: metadata if the name contains 'metadata', else tenant")
    ap.add_argument("--base-url", default="http://127.0.0.1:10000")
    ap.add_argument("--issuer", default="http://127.0.0.1:9000")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    up = RecordingUpstream(args.name, args.kind, args.port, args.base_url, args.issuer)
    up.verbose = not args.quiet
    print(f"UPSTREAM READY {up.name} ({up.kind}) http://127.0.0.1:{up.port}", flush=True)
    try:
        up._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        up._server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
