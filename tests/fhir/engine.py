"""Start and stop tests/fhir/server.mjs (the TEST-ONLY in-memory FHIR R4 engine) from Python.

    eng = FhirEngine("tenant-a", workdir, data=TENANT_DATA["tenant-a"]).start()
    eng.base_url   # http://127.0.0.1:<port><base path>
    eng.stop()

The engine picks a free port itself (FHIR_PORT=0) and says which in its "FHIR READY <name> <port>" line, so
there is no race between choosing a port and binding it. Standard library only.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVER = HERE / "server.mjs"


class EngineError(RuntimeError):
    pass


class FhirEngine:
    def __init__(self, name: str, workdir: Path, data: Path | None = None, *, port: int = 0,
                 base_path: str = "", honour_forwarded: bool = True, env: dict[str, str] | None = None):
        self.name = name
        self.data = data
        self.requested_port = port
        self.base_path = base_path.rstrip("/")
        self.honour_forwarded = honour_forwarded
        self.extra_env = env or {}
        self.log_path = Path(workdir) / f"fhir-{name}.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.startup_seconds: float | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise EngineError(f"FHIR engine {self.name} is not running")
        return f"http://127.0.0.1:{self.port}{self.base_path}"

    def command(self) -> list[str]:
        node = os.environ.get("NODE_BIN") or shutil.which("node")
        if not node:
            raise EngineError("node not found (needed for tests/fhir/server.mjs)")
        return [node, str(SERVER)]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ, FHIR_PORT=str(self.requested_port), FHIR_NAME=self.name,
                   FHIR_BASE_PATH=self.base_path, FHIR_HONOUR_FORWARDED="1" if self.honour_forwarded else "0")
        env.pop("FHIR_DATA", None)
        if self.data is not None:
            env["FHIR_DATA"] = str(self.data)
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 60.0) -> "FhirEngine":
        if not (HERE / "node_modules" / "@medplum" / "fhir-router").is_dir():
            raise EngineError("FHIR engine dependencies missing: cd tests/fhir && npm ci")
        begin = time.monotonic()
        log = open(self.log_path, "ab")
        self._offset = log.tell()
        self.proc = subprocess.Popen(self.command(), env=self.environment(), cwd=HERE, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        ready = re.compile(rf"^FHIR READY {re.escape(self.name)} (\d+)$", re.M)
        deadline = begin + timeout
        while True:
            m = ready.search(self.log()[self._offset:])
            if m:
                self.port = int(m.group(1))
                self.startup_seconds = time.monotonic() - begin
                return self
            if self.proc.poll() is not None:
                raise EngineError(f"FHIR engine {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise EngineError(f"FHIR engine {self.name} not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
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
