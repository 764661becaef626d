"""Assertions shared by the e2e test modules (plain functions, so failures show the full response)."""
from __future__ import annotations

from harness import TENANT_HEADER, Response

FHIR_JSON = "application/fhir+json"
ISSUE_CODE = {401: "login", 403: "forbidden", 503: "transient"}


def assert_operation_outcome(resp: Response, status: int, code: str | None = None) -> dict:
    assert resp.status == status, resp
    ctype = resp.header("content-type") or ""
    assert ctype.split(";")[0].strip() == FHIR_JSON, resp
    doc = resp.json()
    assert doc["resourceType"] == "OperationOutcome", doc
    issue = doc["issue"][0]
    assert issue["severity"] == "error", doc
    if code or status in ISSUE_CODE:
        assert issue["code"] == (code or ISSUE_CODE[status]), doc
    return doc


def assert_unauthorized(resp: Response, *, invalid_token: bool) -> None:
    assert_operation_outcome(resp, 401)
    challenge = resp.header("www-authenticate") or ""
    assert challenge.startswith("Bearer"), resp
    if invalid_token:
        assert 'error="invalid_token"' in challenge, resp
    else:
        assert "error=" not in challenge, resp


def assert_forbidden(resp: Response) -> None:
    assert_operation_outcome(resp, 403)
    challenge = resp.header("www-authenticate") or ""
    assert challenge.startswith("Bearer"), resp
    assert 'error="insufficient_scope"' in challenge, resp


def assert_no_upstream_saw_anything(upstreams) -> None:
    assert upstreams.hits() == {}, f"request leaked to upstream(s): {upstreams.hits()}"


def assert_served_only_by(upstreams, resp: Response, upstream_name: str, tenant: str, *, path: str = "/Patient",
                          method: str = "GET", earlier: tuple[str, str] | None = None):
    """200 from exactly one tenant upstream, which saw our tenant header once and no credentials. `earlier`:
    the (method, path) of an earlier request whose record an upstream may still add late (one Envoy reset
    after its headers went on): such records are not counted; every other one is."""
    assert resp.status == 200, resp
    hits = upstreams.hits()
    if earlier is not None:
        hits = {name: kept for name, reqs in hits.items()
                if (kept := [r for r in reqs if (r.method, r.path) != earlier])}
    assert list(hits) == [upstream_name], f"expected only {upstream_name}, got {hits}"
    (req,) = hits[upstream_name]
    assert (req.method, req.path) == (method, path)
    assert req.headers.get(TENANT_HEADER) == [tenant], req.headers
    assert "authorization" not in req.headers, req.headers
    if method != "HEAD":
        assert resp.json()["meta"]["tag"][0]["code"] == upstream_name
    return req


def assert_wasm_vm_never_crashed(envoy) -> None:
    """FAIL_RELOAD turns a VM crash (panic/trap) into a 503 plus a fresh VM, which could hide bugs. The dynamic
    module has no VM: a panic there is caught at the hook, answered 503 and counted in `panics`."""
    if envoy.build == "dynamic-module":
        assert envoy.router_stat("panics") == 0, "the dynamic module caught a panic"
    stats = envoy.wasm_stats()
    reloads = {k: v for k, v in stats.items() if k.endswith((".vm_reload", ".vm_reload_failure")) and v}
    assert not reloads, f"wasm VM was reloaded (it crashed): {reloads}"
    bad = [line for line in envoy.log().splitlines() if "panicked" in line or "Function: proxy_on_" in line]
    assert not bad, "\n".join(bad[-20:])
