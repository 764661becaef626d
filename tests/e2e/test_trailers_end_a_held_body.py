"""A body held for judgement whose end comes as trailers is judged like one ended by its last data frame.

Found 2026-12-06 (branch answer-hold): a client (HTTP/2) can end its request with a trailers frame instead of a
data frame with end-of-stream. Neither shell had a trailers hook, and Envoy continues a stopped stream whose
trailers hook says continue: the refused Bundle reached the upstream, which answered it (200). Now both
shells' trailers hooks hand the complete body to the core (`Router::on_request_trailers`) and stop the
trailers unless the request may go on. The oracle is the upstream's own journal: what reached it."""
from __future__ import annotations

import json
import socket

import h2.connection
import h2.events

from conftest import wait_for_jwks
from harness import TENANT_A, bearer
from tokens import Minter

DELETE = json.dumps({"resourceType": "Bundle", "type": "batch",
                     "entry": [{"request": {"method": "DELETE", "url": "Patient/1"}}]}).encode()
READ = json.dumps({"resourceType": "Bundle", "type": "batch",
                   "entry": [{"request": {"method": "GET", "url": "Patient?name=x"}}]}).encode()


def h2_post(port: int, headers: dict[str, str], body: bytes, trailers: bool,
            trailer: tuple[str, str] = ("x-trailer", "1")) -> int | None:
    """POST / over h2c (prior knowledge), its body ended by a trailers frame (`trailer`) or by the DATA frame:
    the status."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        c = h2.connection.H2Connection()
        c.initiate_connection()
        c.send_headers(1, [(":method", "POST"), (":path", "/"), (":authority", "fhir.example.test"),
                           (":scheme", "http"), *headers.items()])
        c.send_data(1, body, end_stream=not trailers)
        if trailers:
            c.send_headers(1, [trailer], end_stream=True)
        s.sendall(c.data_to_send())
        status = None
        while chunk := s.recv(65536):
            for ev in c.receive_data(chunk):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                if isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return status
            s.sendall(c.data_to_send())
    return status


def test_a_bundle_ended_by_trailers_is_judged_too(start_envoy, idp, upstreams):
    env = start_envoy("envoy-trailers", {"idp": idp.port, **upstreams.cluster_ports()})
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    upstreams.tenant_a.requests.clear()
    headers = {**bearer(minter.token(TENANT_A)), "content-type": "application/fhir+json"}
    # The oracle can fail: ended by its DATA frame, the Bundle (a DELETE, not allowed) is refused upstream of it.
    assert h2_post(env.port, headers, DELETE, trailers=False) == 403
    assert upstreams.tenant_a.requests == []
    status = h2_post(env.port, headers, DELETE, trailers=True)
    assert (status, upstreams.tenant_a.requests) == (403, []), f"{status}: the upstream got the refused Bundle"
    # An allowed Bundle ended by trailers still goes on, its body whole.
    status = h2_post(env.port, headers, READ, trailers=True)
    assert status == 200, status
    assert len(upstreams.tenant_a.requests) == 1, upstreams.tenant_a.requests
