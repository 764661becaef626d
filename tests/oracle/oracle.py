"""Start and stop tests/oracle/server.mjs (the TEST-ONLY reference search server) from Python.

    o = Oracle("tenant-a", workdir, data=TENANT_DATA["tenant-a"]).start()
    o.base_url            # http://127.0.0.1:<port>
    o.journal_mark()      # position in the oracle's request journal
    o.requests_since(m)   # [{"method", "target", "bodyBytes"}, ...] received since the mark
    o.get("/Patient?...") # (status, parsed JSON) straight to the oracle, bypassing Envoy
    o.stop()

Same start protocol as tests/fhir/engine.py: the server picks a free port and says which in its
"ORACLE READY <name> <port>" line. Standard library only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVER = HERE / "server.mjs"


class OracleError(RuntimeError):
    pass


class Oracle:
    def __init__(self, name: str, workdir: Path, data: Path | None = None):
        self.name, self.data = name, data
        self.log_path = Path(workdir) / f"oracle-{name}.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise OracleError(f"oracle {self.name} is not running")
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "Oracle":
        if not (HERE / "node_modules" / "fhirpath").is_dir():
            raise OracleError("oracle dependencies missing: make deps (cd tests/oracle && npm ci)")
        node = os.environ.get("NODE_BIN") or shutil.which("node")
        if not node:
            raise OracleError("node not found (needed for tests/oracle/server.mjs)")
        env = dict(os.environ, ORACLE_PORT="0", ORACLE_NAME=self.name)
        env.pop("ORACLE_DATA", None)
        if self.data is not None:
            env["ORACLE_DATA"] = str(self.data)
        log = open(self.log_path, "ab")
        offset = log.tell()
        self.proc = subprocess.Popen([node, str(SERVER)], env=env, cwd=HERE, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        ready = re.compile(rf"^ORACLE READY {re.escape(self.name)} (\d+)$", re.M)
        deadline = time.monotonic() + timeout
        while True:
            m = ready.search(self.log()[offset:])
            if m:
                self.port = int(m.group(1))
                return self
            if self.proc.poll() is not None:
                raise OracleError(f"oracle {self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise OracleError(f"oracle {self.name} not ready after {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, object]:
        req = urllib.request.Request(self.base_url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        return status, (json.loads(raw) if raw else None)

    def get(self, path: str) -> tuple[int, object]:
        return self.request("GET", path)

    def journal_mark(self) -> int:
        return self.get("/__oracle/journal?since=999999999")[1]["next"]

    def requests_since(self, mark: int) -> list[dict]:
        return self.get(f"/__oracle/journal?since={mark}")[1]["entries"]

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        return self.proc.returncode
