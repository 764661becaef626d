"""The attacker's web site: serves files (forged JWKS, certificates) from a directory on 127.0.0.1 and
records every request, so a test can prove nothing ever fetched a `jku`/`x5u` it planted."""
from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class AttackerSite:
    def __init__(self, directory: Path):
        self.directory = directory
        self._lock = threading.Lock()
        self._hits: list[str] = []
        site = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                with site._lock:
                    site._hits.append(self.path)
                super().do_GET()

            def log_message(self, fmt, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="attacker-site", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    @property
    def hits(self) -> list[str]:
        with self._lock:
            return list(self._hits)

    def clear(self) -> None:
        with self._lock:
            self._hits.clear()

    def start(self) -> "AttackerSite":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
