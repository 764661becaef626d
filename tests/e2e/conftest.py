"""Fixtures for the end-to-end suite: real Envoy 1.40 + our .wasm + the test IdP + recording upstreams.

Scopes: upstreams and the shared IdP live for the session; each test module starts its own Envoy(s)
(module-scoped), so a module's tests share one Envoy. Upstream recordings are cleared before every test.
On a failing test the Envoy/IdP log lines written during that test are attached to the report.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # tests/upstream.py

from harness import (  # noqa: E402
    SHIPPED_CONFIG, TENANT_A, Envoy, HarnessError, Idp, bearer, free_port, render_config, require_wasm,
    wait_until,
)
from tokens import Minter  # noqa: E402
from upstream import RecordingUpstream  # noqa: E402
# The upstream's own authorization server and our fake token guards (issue 12): fixtures defined there.
from upstream_auth import (  # noqa: E402,F401
    start_fake_token_guard, start_upstream_as, upstream_as, upstream_auth, upstream_keys,
)

import harness  # noqa: E402

_running_envoys: list[Envoy] = []


def pytest_addoption(parser):
    parser.addoption("--build", choices=harness.BUILDS, default=None,
                     help="the build under test: wasm (default) or dynamic-module (the same configs with the "
                          "wasm filter swapped for target/dynamic-module/libfhir_tenant_router.so)")


def pytest_configure(config):
    build = config.getoption("--build") or harness.BUILD
    harness.BUILD = build
    config.addinivalue_line("markers", "wasm_only(why): the test is about something only the wasm build has")


def pytest_report_header(config):
    return f"fhir-tenant-router build under test: {harness.BUILD}"


def pytest_collection_modifyitems(config, items):
    if harness.BUILD == "wasm":
        return
    for item in items:
        mark = item.get_closest_marker("wasm_only")
        if mark:
            item.add_marker(pytest.mark.skip(reason="wasm build only: " + (mark.args[0] if mark.args else "")))


@dataclass
class Upstreams:
    metadata: RecordingUpstream
    tenant_a: RecordingUpstream
    tenant_b: RecordingUpstream

    def all(self) -> list[RecordingUpstream]:
        return [self.metadata, self.tenant_a, self.tenant_b]

    def clear(self) -> None:
        for u in self.all():
            u.clear()

    def hits(self) -> dict[str, list]:
        return {u.name: u.requests for u in self.all() if u.requests}

    def cluster_ports(self) -> dict[str, int]:
        return {"fhir_metadata": self.metadata.port, "tenant_a": self.tenant_a.port,
                "tenant_b": self.tenant_b.port}


@dataclass
class Stack:
    envoy: Envoy
    upstreams: Upstreams
    minter: Minter
    idp: Idp | None = None
    extra: dict = field(default_factory=dict)

    def get(self, path: str, token: str | None = None, headers: dict | None = None, method: str = "GET",
            body: bytes | None = None):
        h = dict(headers or {})
        if token is not None:
            h.update(bearer(token))
        return self.envoy.request(method, path, h, body)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def wasm() -> Path:
    try:
        if harness.BUILD == "dynamic-module" and not harness.SO_PATH.is_file():
            raise HarnessError(f"{harness.SO_PATH} is missing: make build-so")
        return require_wasm()
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def upstreams():
    ups = Upstreams(RecordingUpstream("metadata", "metadata").start(),
                    RecordingUpstream("tenant-a", "tenant").start(),
                    RecordingUpstream("tenant-b", "tenant").start())
    yield ups
    for u in ups.all():
        u.stop()


@pytest.fixture(autouse=True)
def _clean_recordings_and_mark_logs(request):
    if "upstreams" in request.fixturenames:
        request.getfixturevalue("upstreams").clear()
    for e in _running_envoys:
        e.mark_log()
    yield


@pytest.fixture(scope="session")
def idp(workdir):
    p = Idp(free_port(), workdir, name="idp-shared")
    try:
        p.start()
    except HarnessError as exc:
        p.stop()
        pytest.fail(str(exc), pytrace=False)
    yield p
    p.stop()


@pytest.fixture(scope="session")
def start_envoy(workdir, wasm):
    """Factory: start_envoy(name, cluster_ports, base=SHIPPED_CONFIG, plugin=None, concurrency=1) -> running
    Envoy."""
    started: list[Envoy] = []

    def _start(name: str, cluster_ports: dict[str, int], base=SHIPPED_CONFIG,
               plugin: Callable | None = None, concurrency: int = 1) -> Envoy:
        port, admin = free_port(), free_port()
        cfg = render_config(base, listener_port=port, admin_port=admin, cluster_ports=cluster_ports,
                            wasm_path=wasm, plugin=plugin)
        env = Envoy(cfg, workdir, name, port, admin, concurrency=concurrency)
        started.append(env)
        _running_envoys.append(env)
        try:
            env.start()
        except HarnessError as exc:
            pytest.fail(str(exc), pytrace=False)
        return env

    yield _start
    for e in started:
        e.stop()


def stop_envoy(env: Envoy) -> None:
    env.stop()
    if env in _running_envoys:
        _running_envoys.remove(env)


def wait_for_jwks(env: Envoy, minter: Minter, upstreams: Upstreams, timeout: float = 30.0) -> None:
    """Remote JWKS is fetched asynchronously after start: poll with a valid token until it is not 503."""
    token = minter.token(TENANT_A)
    wait_until(lambda: env.request("GET", "/Patient", bearer(token)).status != 503, timeout,
               f"Envoy {env.name} to load the remote JWKS",
               on_timeout=lambda: "\n--- envoy log tail ---\n" + env.log_tail())
    upstreams.clear()


@pytest.fixture(scope="module")
def stack(request, start_envoy, idp, upstreams) -> Stack:
    """Shipped envoy/envoy.yaml (remote JWKS from the shared IdP), one Envoy per test module."""
    name = "envoy-" + request.module.__name__.rsplit(".", 1)[-1]
    env = start_envoy(name, {"idp": idp.port, **upstreams.cluster_ports()})
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    yield Stack(env, upstreams, minter, idp)
    stop_envoy(env)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for e in _running_envoys:
            text = e.log_since_mark().strip()
            report.sections.append((f"envoy {e.name} log during test", text or "(nothing logged)"))
