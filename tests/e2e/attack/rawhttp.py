"""Clients that send exactly what a test says: HTTP/1.1 over a raw socket (no library normalises the request
target or the header bytes) and HTTP/2 with prior knowledge (h2c) through the `h2` state machine with its
outbound validation switched off. Bounded by timeouts everywhere."""
from __future__ import annotations

import json
import re
import socket
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions

CRLF = b"\r\n"


@dataclass
class RawResponse:
    """The first response read from the connection (`status` 0 when the peer closed without one)."""
    status: int
    headers: dict[str, list[str]] = field(default_factory=dict)
    body: bytes = b""
    raw: bytes = b""  # everything read from the connection (several responses when pipelining)
    reset: str = ""   # HTTP/2: why the stream or connection ended without a response, if it did

    def header(self, name: str) -> str | None:
        v = self.headers.get(name.lower())
        return v[0] if v else None

    def json(self):
        return json.loads(self.body)

    def statuses(self) -> list[int]:
        """Every HTTP/1.x status line in the raw stream (pipelined responses)."""
        return [int(s) for s in re.findall(rb"HTTP/1\.[01] (\d{3}) ", self.raw)]

    def __repr__(self) -> str:
        return f"<RawResponse {self.status} {self.reset!r} {dict(self.headers)} {self.body[:300]!r}>"


def _to_bytes(v: str | bytes) -> bytes:
    return v if isinstance(v, bytes) else v.encode("latin-1")


def build_request(method: str | bytes, target: str | bytes, headers: list[tuple[str | bytes, str | bytes]],
                  body: bytes | None = None, *, host: str | bytes = b"127.0.0.1",
                  close: bool = True, version: bytes = b"HTTP/1.1") -> bytes:
    """An HTTP/1.1 request, byte for byte: `target` goes on the request line untouched."""
    lines = [_to_bytes(method) + b" " + _to_bytes(target) + b" " + version]
    if host is not None:
        lines.append(b"host: " + _to_bytes(host))
    for name, value in headers:
        lines.append(_to_bytes(name) + b": " + _to_bytes(value))
    if body is not None:
        lines.append(b"content-length: " + str(len(body)).encode())
    if close:
        lines.append(b"connection: close")
    return CRLF.join(lines) + CRLF + CRLF + (body or b"")


def send_raw(port: int, data: bytes, timeout: float = 10.0, *, until_eof: bool = False,
             head: bool = False) -> RawResponse:
    """Send `data` on a fresh connection and parse the first response. Reading stops once that response is
    complete (by content-length / chunked framing; `head`: no body expected), or when the peer closes,
    or at `timeout`. `until_eof`: read everything until Envoy closes (pipelined requests)."""
    deadline = time.monotonic() + timeout
    buf = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)  # no half-close: Envoy would treat it as the client going away
        while time.monotonic() < deadline:
            if not until_eof and _complete(buf, head):
                break
            s.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except (socket.timeout, TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            buf += chunk
    return parse_response(buf)


def _complete(buf: bytes, head: bool) -> bool:
    """Whether `buf` holds one whole response."""
    end = buf.find(CRLF + CRLF)
    if end < 0:
        return False
    r = parse_response(buf)
    if head or r.status in (204, 304) or 100 <= r.status < 200:
        return True
    rest = buf[end + 4:]
    if "content-length" in r.headers:
        return len(rest) >= int(r.headers["content-length"][0])
    if r.headers.get("transfer-encoding", [""])[0].lower() == "chunked":
        return rest.endswith(b"0" + CRLF + CRLF)
    return False  # delimited by close


def parse_response(raw: bytes) -> RawResponse:
    head, sep, rest = raw.partition(CRLF + CRLF)
    if not sep or not head.startswith(b"HTTP/"):
        return RawResponse(0, raw=raw)
    lines = head.split(CRLF)
    status = int(lines[0].split(b" ")[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower().decode("latin-1"), []).append(value.strip().decode("latin-1"))
    body = rest
    if "content-length" in headers:
        body = rest[: int(headers["content-length"][0])]
    elif headers.get("transfer-encoding", [""])[0].lower() == "chunked":
        body = _dechunk(rest)
    return RawResponse(status, headers, body, raw)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(CRLF)
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return out


# -------------------------------------------------------------------------------------------- HTTP/2

def h2_request(port: int, headers: list[tuple[str | bytes, str | bytes]], body: bytes | None = None,
               timeout: float = 10.0) -> RawResponse:
    """One HTTP/2 request with prior knowledge (no upgrade, no TLS) on a fresh connection. `headers` are
    sent as given, pseudo-headers included, without h2's validation or normalisation. Returns the
    response, or status 0 with `reset` set when Envoy reset the stream or closed the connection."""
    cfg = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False,
                                    normalize_outbound_headers=False, validate_inbound_headers=False)
    conn = h2.connection.H2Connection(config=cfg)
    deadline = time.monotonic() + timeout
    resp = RawResponse(0)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        conn.initiate_connection()
        s.sendall(conn.data_to_send())
        sid = conn.get_next_available_stream_id()
        hdrs = [(_to_bytes(k), _to_bytes(v)) for k, v in headers]
        conn.send_headers(sid, hdrs, end_stream=body is None)
        if body is not None:
            conn.send_data(sid, body, end_stream=True)
        s.sendall(conn.data_to_send())
        done = False
        while not done and time.monotonic() < deadline:
            s.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data = s.recv(65536)
            except (socket.timeout, TimeoutError):
                resp.reset = resp.reset or "timeout"
                break
            except ConnectionResetError:
                resp.reset = resp.reset or "connection reset"
                break
            if not data:
                resp.reset = resp.reset or "connection closed"
                break
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                resp.reset = f"protocol error: {exc}"
                break
            for ev in events:
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    for k, v in ev.headers:
                        k, v = _to_bytes(k).decode("latin-1"), _to_bytes(v).decode("latin-1")
                        if k == ":status":
                            resp.status = int(v)
                        else:
                            resp.headers.setdefault(k, []).append(v)
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    resp.body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    done = True
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    resp.reset = f"stream reset {ev.error_code!r}"
                    done = True
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    resp.reset = f"goaway {ev.error_code!r}"
                    done = True
            out = conn.data_to_send()
            if out:
                try:
                    s.sendall(out)
                except OSError:
                    break
    return resp
