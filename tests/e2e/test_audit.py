"""What an operator sees: one audit line per request in Envoy's log, per-tenant stats, and the tenant and client id
in Envoy's access log (filter state) — and never a query string, a body or a token anywhere in what Envoy writes.

The audit line is the message of a wasm info log line, a JSON object starting with {"audit":"fhir-tenant-router".
Requests carry distinctive strings in their query and body (FHIR searches carry names and birth dates); each test
checks that the upstream did receive them (so the absence from the logs means something) and that they appear
nowhere in Envoy's log or access log, while the request's audit line is there with the right fields.
"""
from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import jwt
import pytest

from checks import assert_wasm_vm_never_crashed
from conftest import stop_envoy, wait_for_jwks
from harness import (
    CLIENT_A, SHIPPED_CONFIG, TENANT_A, TENANT_B, bearer, hcm_settings, load_yaml, plugin_json, set_plugin_json,
    wait_until,
)
from tokens import Minter

AUDIT_START = '{"audit":"fhir-tenant-router"'
TENANT_STATE = "wasm.fhir_tenant_router.tenant"
CLIENT_STATE = "wasm.fhir_tenant_router.client_id"
FILE_LOGGER = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
# Used only if the shipped config has no access log yet.
OWN_ACCESS_LOG_FORMAT = (f"[access] tenant=%FILTER_STATE({TENANT_STATE}:PLAIN)% "
                         f"client=%FILTER_STATE({CLIENT_STATE}:PLAIN)% status=%RESPONSE_CODE%\n")
# The refusal reasons the filter already counts (docs/operations.md, Stats): an audit `reason` should be one of them.
REJECTION_REASONS = {
    "missing_token", "malformed_credentials", "token_too_large", "malformed_token", "unsupported_alg", "crit_header",
    "issuer_mismatch", "missing_exp", "expired", "not_yet_valid", "audience_mismatch", "unknown_kid",
    "key_alg_mismatch", "bad_signature", "jwks_unavailable", "no_tenant", "several_tenants", "issuer_not_allowed",
    "tenants_unavailable", "wait_queue_full", "upstream_auth_unavailable", "client_not_allowed", "quota_rate",
    "quota_in_flight",
}
ACCESS_LOG_FLUSH_S = 25  # Envoy writes access log files out every 10 s by default; leave room for a loaded machine
FIELDS = {"audit", "time", "tenant", "client_id", "sub", "jti", "method", "resource_type", "interaction", "outcome",
          "reason", "cluster", "upstream_credential"}


# ------------------------------------------------------------------------------------------- helpers

def access_logs(cfg: dict) -> list:
    return hcm_settings(cfg).setdefault("access_log", [])


def log_format_text(entry: dict) -> str:
    return json.dumps(entry.get("typed_config", {}).get("log_format", {}))


def redirect_access_logs(cfg: dict, path) -> bool:
    """Every access log of the shipped config, re-pointed at `path` with its own format (stdout loggers become
    file loggers); if there is none, one with OWN_ACCESS_LOG_FORMAT. Returns whether the shipped config had one."""
    logs = access_logs(cfg)
    for entry in logs:
        fmt = entry.get("typed_config", {}).get("log_format")
        entry["name"] = "envoy.access_loggers.file"
        entry["typed_config"] = {"@type": FILE_LOGGER, "path": str(path), **({"log_format": fmt} if fmt else {})}
    if not logs:
        logs.append({"name": "envoy.access_loggers.file", "typed_config": {
            "@type": FILE_LOGGER, "path": str(path),
            "log_format": {"text_format_source": {"inline_string": OWN_ACCESS_LOG_FORMAT}}}})
        return False
    return True


def audit_records(text: str) -> list[dict]:
    decoder = json.JSONDecoder()
    out = []
    for line in text.splitlines():
        i = line.find(AUDIT_START)
        if i >= 0:
            out.append(decoder.raw_decode(line[i:])[0])
    return out


def _stats(env) -> dict[str, int]:
    return env.router_stats()


def claims_of(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


class Audited:
    def __init__(self, env, upstreams, minter, idp, access_log_path, shipped_access_log: bool):
        self.env, self.upstreams, self.minter, self.idp = env, upstreams, minter, idp
        self.access_log_path, self.shipped_access_log = access_log_path, shipped_access_log

    def access_log(self) -> str:
        p = self.access_log_path
        return p.read_text(encoding="utf-8", errors="replace") if p.exists() else ""

    def everything_envoy_wrote(self) -> str:
        return self.env.log() + "\n" + self.access_log()

    def record(self, jti: str) -> dict:
        """The one audit line of the request whose token had this jti (the line may follow the response)."""
        found = wait_until(lambda: [r for r in audit_records(self.env.log()) if r.get("jti") == jti], 10,
                           f"the audit line with jti {jti}",
                           on_timeout=lambda: "\n" + self.env.log_since_mark()[-3000:])
        assert len(found) == 1, found
        return found[0]

    def new_records(self, n: int) -> list[dict]:
        """The audit lines logged since the test began, once there are at least `n`."""
        return wait_until(lambda: (lambda r: r if len(r) >= n else None)(audit_records(self.env.log_since_mark())),
                          10, f"{n} audit line(s)", on_timeout=lambda: "\n" + self.env.log_since_mark()[-3000:])


@pytest.fixture(scope="module")
def audited(start_envoy, idp, upstreams, workdir) -> Audited:
    cfg = load_yaml(SHIPPED_CONFIG)
    path = workdir / "access-audit.log"
    shipped = redirect_access_logs(cfg, path)
    env = start_envoy("envoy-audit", {"idp": idp.port, **upstreams.cluster_ports()}, base=cfg)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    yield Audited(env, upstreams, minter, idp, path, shipped)
    stop_envoy(env)


def assert_time_is_now_in_utc(value: str) -> None:
    assert isinstance(value, str) and value[:4].isdigit() and "T" in value, value
    assert value.endswith("Z") or value.endswith("+00:00"), f"not UTC: {value}"
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert t.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - t) < timedelta(seconds=120), value


def assert_absent(text: str, *secrets: str) -> None:
    for s in secrets:
        assert s not in text, f"{s!r} was written to Envoy's log: " + next(
            line for line in text.splitlines() if s in line)[:500]


# ---------------------------------------------------------------------------------------------- audit

def test_an_allowed_search_is_audited_without_its_query_string_or_its_token(audited):
    token = audited.idp.access_token(CLIENT_A, TENANT_A)
    claims = claims_of(token)
    resp = audited.env.request("GET", "/Patient?family=Zzyzx-Secret&birthdate=1901-02-03", bearer(token))
    assert resp.status == 200, resp
    (seen,) = audited.upstreams.tenant_a.requests
    assert "Zzyzx-Secret" in seen.path, "the query really was sent"
    rec = audited.record(claims["jti"])
    assert set(rec) <= FIELDS, f"unexpected fields: {set(rec) - FIELDS}"
    assert rec["audit"] == "fhir-tenant-router"
    assert_time_is_now_in_utc(rec["time"])
    assert rec["tenant"] == TENANT_A
    assert rec["client_id"] == CLIENT_A[0] == claims["client_id"]
    assert rec.get("sub") == claims.get("sub")
    assert (rec["method"], rec["resource_type"], rec["interaction"]) == ("GET", "Patient", "search")
    assert rec["outcome"] == "allowed"
    assert rec.get("reason") in (None, ""), rec
    assert rec["cluster"] == "tenant_a"
    assert_absent(audited.env.log(), "Zzyzx-Secret", "1901-02-03", token, token.split(".")[2])


def test_a_form_post_search_is_audited_without_its_body(audited):
    token = audited.minter.token(TENANT_A)
    body = b"family=Zzyzx-Body-Secret&given=Qwertyuiop-Body"
    resp = audited.env.request("POST", "/Patient/_search", {
        **bearer(token), "content-type": "application/x-www-form-urlencoded"}, body)
    assert resp.status == 200, resp
    (seen,) = audited.upstreams.tenant_a.requests
    assert seen.body == body, "the body really was sent"
    rec = audited.record(claims_of(token)["jti"])
    assert (rec["method"], rec["resource_type"], rec["interaction"], rec["outcome"]) == (
        "POST", "Patient", "search", "allowed")
    assert (rec["tenant"], rec["client_id"], rec["cluster"]) == (TENANT_A, "patients-app-a", "tenant_a")
    assert_absent(audited.env.log(), "Zzyzx-Body-Secret", "Qwertyuiop-Body", token)


def test_a_read_is_audited_with_its_resource_type(audited):
    token = audited.minter.token(TENANT_B, client_id="patients-app-b", sub="patients-app-b")
    assert audited.env.request("GET", "/Observation/obs-1?_elements=Zzyzx-Elements", bearer(token)).status == 200
    rec = audited.record(claims_of(token)["jti"])
    assert (rec["tenant"], rec["client_id"], rec["sub"], rec["cluster"]) == (
        TENANT_B, "patients-app-b", "patients-app-b", "tenant_b")
    assert (rec["method"], rec["resource_type"], rec["interaction"], rec["outcome"]) == (
        "GET", "Observation", "read", "allowed")
    assert_absent(audited.env.log(), "Zzyzx-Elements")


def test_a_refused_interaction_is_audited_as_forbidden_without_its_body(audited):
    token = audited.minter.token(TENANT_A)
    resp = audited.env.request("POST", "/Patient", {**bearer(token), "content-type": "application/fhir+json"},
                               b'{"resourceType":"Patient","name":[{"family":"Zzyzx-Create-Secret"}]}')
    assert resp.status == 403, resp
    assert audited.upstreams.hits() == {}
    rec = audited.record(claims_of(token)["jti"])
    assert (rec["tenant"], rec["client_id"]) == (TENANT_A, "patients-app-a")
    assert (rec["method"], rec["resource_type"], rec["interaction"], rec["outcome"]) == (
        "POST", "Patient", "create", "forbidden")
    assert isinstance(rec.get("reason"), str) and rec["reason"], rec
    assert_absent(audited.env.log(), "Zzyzx-Create-Secret", token)


def test_a_batch_refused_for_one_entry_is_audited_once_as_forbidden(audited):
    """The Bundle is judged after the headers: the audit line must tell the outcome the client got."""
    token = audited.minter.token(TENANT_A)
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient?family=Zzyzx-Bundle-Secret"}},
        {"request": {"method": "DELETE", "url": "Patient/zzyzx-bundle-id"}},
    ]}
    resp = audited.env.request("POST", "/", {**bearer(token), "content-type": "application/fhir+json"},
                               json.dumps(bundle).encode())
    assert resp.status == 403, resp
    rec = audited.record(claims_of(token)["jti"])  # exactly one line for this request
    assert (rec["tenant"], rec["client_id"], rec["method"]) == (TENANT_A, "patients-app-a", "POST"), rec
    assert rec["outcome"] == "forbidden", rec
    assert_absent(audited.env.log(), "Zzyzx-Bundle-Secret", token)
    # Not about the audit, but it must hold too: the refused Bundle never reaches an upstream. (Its headers
    # may: Envoy's wasm host gives no body callbacks while the header phase is paused, so a body can only be
    # judged after the headers went on; the upstream then sees a reset stream with no body, never a request
    # it could execute.)
    for reqs in audited.upstreams.hits().values():
        for req in reqs:
            assert b"Zzyzx" not in req.body and b"DELETE" not in req.body, req


@pytest.mark.parametrize("case", ["missing_token", "expired"])
def test_a_refused_credential_is_audited_as_rejected_with_its_reason(audited, case):
    headers = {} if case == "missing_token" else bearer(audited.minter.token(TENANT_A, exp=int(time.time()) - 3600))
    resp = audited.env.request("GET", "/Patient?family=Zzyzx-Rejected", headers)
    assert resp.status == 401, resp
    (rec,) = audited.new_records(1)
    assert rec["outcome"] == "rejected", rec
    assert rec["reason"] in REJECTION_REASONS, rec
    assert rec["reason"] == case, rec  # the reason the stats use (requests.rejected.<reason>)
    assert (rec["method"], rec["resource_type"]) == ("GET", "Patient"), rec
    assert rec.get("tenant") in (None, ""), "a refused token names no tenant"
    assert_absent(audited.env.log(), "Zzyzx-Rejected")
    if headers:
        assert_absent(audited.env.log(), headers["authorization"][7:])


def test_a_public_request_is_audited_as_public(audited):
    resp = audited.env.request("GET", "/metadata?_format=json&marker=Zzyzx-Public")
    assert resp.status == 200, resp
    (rec,) = audited.new_records(1)
    assert (rec["method"], rec["outcome"], rec["cluster"]) == ("GET", "public", "fhir_metadata"), rec
    assert rec.get("tenant") in (None, "") and rec.get("client_id") in (None, ""), rec
    assert_absent(audited.env.log(), "Zzyzx-Public")


def test_each_request_is_audited_exactly_once(audited):
    tokens = [audited.minter.token(TENANT_A) for _ in range(3)]
    for t in tokens:
        assert audited.env.request("GET", "/Patient", bearer(t)).status == 200
    for t in tokens:
        audited.record(claims_of(t)["jti"])  # asserts exactly one line for that jti
    # Nothing else was audited meanwhile: three requests, three lines.
    assert len(audit_records(audited.env.log_since_mark())) == 3


def test_a_base_path_tenants_audit_line_names_the_requests_own_interaction_and_type(start_envoy, idp, upstreams):
    """The filter rewrites `:path` for a tenant with `base_path`; the audit line (written after that edit) still
    names the request as the client sent it. The dynamic module once read the header bytes after Envoy had
    replaced them (issue 22): null interaction and type."""
    def plugin(doc):
        doc["tenants"][TENANT_A] = {"cluster": "tenant_a", "base_path": "/api/FHIR/R4"}
    env = start_envoy("envoy-audit-base-path", {"idp": idp.port, **upstreams.cluster_ports()}, plugin=plugin)
    try:
        minter = Minter(idp.issuer)
        wait_for_jwks(env, minter, upstreams)
        env.mark_log()
        upstreams.clear()
        cases = [("GET", "/Patient/pat-1", "Patient", "read"), ("GET", "/Observation?code=x", "Observation", "search")]
        for method, path, resource_type, interaction in cases:
            token = minter.token(TENANT_A)
            assert env.request(method, path, bearer(token)).status == 200
            seen = upstreams.tenant_a.requests[-1]
            assert seen.path == "/api/FHIR/R4" + path, "the upstream got the rewritten path"
            found = wait_until(lambda: [r for r in audit_records(env.log_since_mark())
                                        if r.get("jti") == claims_of(token)["jti"]], 10, "the audit line")
            (rec,) = found
            assert (rec["method"], rec["resource_type"], rec["interaction"], rec["outcome"]) == (
                method, resource_type, interaction, "allowed"), rec
    finally:
        stop_envoy(env)


def test_audit_log_false_turns_the_audit_off(start_envoy, idp, upstreams):
    def plugin(doc):
        doc["audit_log"] = False
    env = start_envoy("envoy-audit-off", {"idp": idp.port, **upstreams.cluster_ports()}, plugin=plugin)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    before = _stats(env).get("requests.allowed", 0)
    for _ in range(2):
        assert env.request("GET", "/Patient?family=Zzyzx-Off", bearer(minter.token(TENANT_A))).status == 200
    # The filter's counts are flushed on its timer, after both streams were done: their log calls happened.
    wait_until(lambda: _stats(env).get("requests.allowed", 0) >= before + 2, 10, "the two requests to be counted")
    assert AUDIT_START not in env.log()
    assert "Zzyzx-Off" not in env.log()
    stop_envoy(env)


AUDIT_LINE_STATE = "wasm.fhir_tenant_router.audit_line"


@pytest.fixture(scope="module")
def audited_by_access_log(start_envoy, idp, upstreams, workdir):
    """`audit_log: "filter_state"`, and Envoy's file access log writing that filter state (docs/operations.md's
    block): the audit line reaches the file through Envoy's own access logger, not through a log call."""
    cfg = load_yaml(SHIPPED_CONFIG)
    path = workdir / "access-audit-line.log"
    access_logs(cfg)[:] = [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": FILE_LOGGER, "path": str(path),
        "log_format": {"text_format_source": {"inline_string": f"%FILTER_STATE({AUDIT_LINE_STATE}:PLAIN)%\n"}}}}]

    def plugin(doc):
        doc["audit_log"] = "filter_state"
    env = start_envoy("envoy-audit-filter-state", {"idp": idp.port, **upstreams.cluster_ports()}, base=cfg,
                      plugin=plugin)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    yield env, path
    stop_envoy(env)


def test_audit_log_filter_state_writes_the_same_line_through_envoys_file_access_log(audited, audited_by_access_log):
    """The same requests (the same tokens) to an Envoy with the log line (the default) and to one with
    `audit_log: "filter_state"`: each request's line in the access log file is the log line, field for field
    and in the same order (the time aside), and Envoy's own log carries no audit line."""
    env, path = audited_by_access_log
    minter = audited.minter
    expired = int(time.time()) - 3600
    cases = [  # (method, path, token, body, status)
        ("GET", "/Patient?family=Zzyzx-Access-Log&birthdate=1902-03-04", minter.token(TENANT_A), None, 200),
        ("POST", "/Patient", minter.token(TENANT_A), b'{"resourceType":"Patient"}', 403),
        ("GET", "/Observation/obs-1", minter.token(TENANT_B, client_id="patients-app-b", sub="patients-app-b"), None,
         200),
        ("GET", "/Patient?family=Zzyzx-Expired", minter.token(TENANT_A, exp=expired), None, 401),
    ]
    for target in (audited.env, env):
        for method, req_path, token, body, status in cases:
            headers = {**bearer(token), **({"content-type": "application/fhir+json"} if body else {})}
            assert target.request(method, req_path, headers, body).status == status
    # A refused credential's line names no token (no jti): the expired one is matched by its reason.
    jtis = [claims_of(token)["jti"] for _, _, token, _, status in cases if status != 401]

    def by_jti(records: list[dict]) -> dict[str, dict]:
        found = {r["jti"]: r for r in records if r.get("jti") in jtis}
        expired = [r for r in records if r.get("reason") == "expired"]
        return {**found, "expired": expired[-1]} if expired else found

    logged = {jti: audited.record(jti) for jti in jtis}
    logged["expired"] = by_jti(audit_records(audited.env.log()))["expired"]
    text = lambda: path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""  # noqa: E731
    written = wait_until(lambda: (lambda r: r if len(r) == len(cases) else None)(by_jti(audit_records(text()))),
                         ACCESS_LOG_FLUSH_S, "the four audit lines in the access log file",
                         on_timeout=lambda: "\n" + text()[-3000:])
    jtis.append("expired")
    for jti in jtis:
        want = [(k, v) for k, v in logged[jti].items() if k != "time"]
        got = [(k, v) for k, v in written[jti].items() if k != "time"]
        assert got == want, f"\nlog line:   {logged[jti]}\naccess log: {written[jti]}"
        assert_time_is_now_in_utc(written[jti]["time"])
    assert [written[j]["outcome"] for j in jtis] == ["allowed", "forbidden", "allowed", "rejected"]
    # One line per request, each a whole line of the file; none in Envoy's log, and no query value anywhere.
    lines = [line for line in text().splitlines() if AUDIT_START in line]
    assert all(line.startswith(AUDIT_START) for line in lines), lines
    assert sum(1 for line in lines if any(j in line for j in jtis[:-1])) == len(jtis) - 1
    assert AUDIT_START not in env.log(), "the filter_state delivery logged an audit line too"
    assert_absent(env.log() + text(), "Zzyzx-Access-Log", "1902-03-04", "Zzyzx-Expired")


# ------------------------------------------- refusals after the token was verified (issue 24, item 3)

T_UPSTREAM_AUTH = "e0000000-0000-4000-8000-00000000000a"   # its token endpoint is down: 503
T_QUOTA = "e0000000-0000-4000-8000-00000000000b"           # one request a long while: the second is 429
T_SCOPES = "e0000000-0000-4000-8000-00000000000c"          # SMART scopes required, the token has none: 403
T_CLIENTS = "e0000000-0000-4000-8000-00000000000d"         # another client only: refused
DEAD_AS = "dead_token_endpoint"


@pytest.fixture(scope="module")
def verified_refusals(start_envoy, idp, upstreams):
    from harness import free_port
    from test_tenant_registry import static_cluster
    cfg = load_yaml(SHIPPED_CONFIG)
    cfg["static_resources"]["clusters"].append(static_cluster(DEAD_AS, free_port()))  # nothing listens there
    from harness import wasm_plugin_config
    wasm_plugin_config(cfg)["vm_config"]["environment_variables"] = {"key_values": {"DEAD_SECRET": "x-dead"}}

    def plugin(doc):
        doc["tenants"][T_UPSTREAM_AUTH] = {"cluster": "tenant_a", "upstream_auth": {
            "method": "client_secret_post", "token_url": "http://127.0.0.1:9/token", "cluster": DEAD_AS,
            "client_id": "c", "client_secret": {"env": "DEAD_SECRET"}, "timeout_ms": 500}}
        doc["tenants"][T_QUOTA] = {"cluster": "tenant_b", "quota": {"rate_per_s": 0.01, "burst": 1}}
        doc["tenants"][T_SCOPES] = {"cluster": "tenant_a", "require_smart_scopes": True}
        doc["tenants"][T_CLIENTS] = {"cluster": "tenant_b", "allowed_clients": ["another-client"]}
        doc.get("discovery", {}).pop("scopes_supported", None)

    env = start_envoy("envoy-audit-verified-refusals", {"idp": idp.port, **upstreams.cluster_ports()}, base=cfg,
                      plugin=plugin)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    yield env, minter
    stop_envoy(env)


def _line_of(env, token: str) -> dict:
    jti = claims_of(token)["jti"]
    found = wait_until(lambda: [r for r in audit_records(env.log()) if r.get("jti") == jti], 10,
                       f"the audit line with jti {jti}", on_timeout=lambda: env.log_tail(20))
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("tenant, status, outcome, reason, cluster", [
    (T_UPSTREAM_AUTH, 503, "rejected", "upstream_auth_unavailable", "tenant_a"),
    (T_QUOTA, 429, "rejected", "quota_rate", "tenant_b"),
    (T_SCOPES, 403, "forbidden", None, "tenant_a"),
    (T_CLIENTS, 403, "rejected", "client_not_allowed", "tenant_b"),
])
def test_a_refusal_after_the_token_was_verified_names_tenant_client_and_cluster(verified_refusals, upstreams, tenant,
                                                                                 status, outcome, reason, cluster):
    env, minter = verified_refusals
    if tenant == T_QUOTA:  # the burst's one request goes through
        assert env.request("GET", "/Patient", bearer(minter.token(tenant))).status == 200
    token = minter.token(tenant)
    resp = env.request("GET", "/Patient", bearer(token))
    assert resp.status == status, resp
    rec = _line_of(env, token)
    assert (rec["tenant"], rec["client_id"], rec["cluster"]) == (tenant, CLIENT_A[0], cluster), rec
    assert rec["outcome"] == outcome, rec
    assert rec["reason"] == reason if reason else rec["reason"], rec
    assert rec["upstream_credential"] is None, "nothing was sent upstream"


# ---------------------------------------------------------------------------------------------- stats

def test_requests_are_counted_per_tenant_as_allowed_or_forbidden(audited):
    a_ok, a_no = f"tenant.{TENANT_A}.allowed", f"tenant.{TENANT_A}.forbidden"
    b_ok, b_no = f"tenant.{TENANT_B}.allowed", f"tenant.{TENANT_B}.forbidden"
    before = _stats(audited.env)
    token_a, token_b = audited.minter.token(TENANT_A), audited.minter.token(TENANT_B)
    assert audited.env.request("GET", "/Patient", bearer(token_a)).status == 200
    assert audited.env.request("GET", "/Observation", bearer(token_a)).status == 200
    assert audited.env.request("DELETE", "/Patient/x", bearer(token_a)).status == 403
    assert audited.env.request("GET", "/Patient", bearer(token_b)).status == 200

    def moved():
        now = _stats(audited.env)
        deltas = {k: now.get(k, 0) - before.get(k, 0) for k in (a_ok, a_no, b_ok, b_no)}
        return deltas if deltas[a_ok] >= 2 and deltas[a_no] >= 1 and deltas[b_ok] >= 1 else None
    deltas = wait_until(moved, 10, "the per-tenant stats to move",
                        on_timeout=lambda: f"\nstats: {_stats(audited.env)}")
    assert deltas == {a_ok: 2, a_no: 1, b_ok: 1, b_no: 0}, deltas
    assert_wasm_vm_never_crashed(audited.env)


# ----------------------------------------------------------------------------------------- access log

def test_the_shipped_config_has_an_access_log_naming_the_tenant_and_the_client_id():
    logs = hcm_settings(load_yaml(SHIPPED_CONFIG)).get("access_log") or []
    assert logs, "envoy/envoy.yaml has no access_log"
    formats = " ".join(log_format_text(e) for e in logs)
    assert f"%FILTER_STATE({TENANT_STATE}:PLAIN)%" in formats, formats
    assert f"%FILTER_STATE({CLIENT_STATE}" in formats, formats


def test_without_access_log_filter_state_the_access_log_has_no_tenant_or_client(start_envoy, idp, upstreams,
                                                                                  workdir):
    cfg = load_yaml(SHIPPED_CONFIG)
    doc = plugin_json(cfg)
    assert doc.get("access_log_filter_state") is True, "the shipped config turns the filter state on"
    del doc["access_log_filter_state"]  # the default: off
    set_plugin_json(cfg, doc)
    path = workdir / "access-no-filter-state.log"
    redirect_access_logs(cfg, path)
    env = start_envoy("envoy-no-filter-state", {"idp": idp.port, **upstreams.cluster_ports()}, base=cfg)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    assert env.request("GET", "/Patient", bearer(minter.token(TENANT_A))).status == 200
    read = lambda: path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""  # noqa: E731
    wait_until(lambda: "upstream=tenant_a" in read(), ACCESS_LOG_FLUSH_S, "the access log line of the request",
               on_timeout=lambda: f"\naccess log:\n{read()[-2000:]}")
    lines = [line for line in read().splitlines() if "upstream=tenant_a" in line]
    assert lines and all("tenant=- " in line and "client_id=- " in line for line in lines), lines
    stop_envoy(env)


def test_the_access_log_line_carries_the_tenant_and_the_client_id_but_never_the_query_or_token(audited):
    # Client ids no other test uses: earlier requests' lines may still be arriving (flushed on a timer).
    client_a, client_b = f"access-log-a-{uuid.uuid4().hex[:8]}", f"access-log-b-{uuid.uuid4().hex[:8]}"
    tokens = []
    for tenant, client in ((TENANT_A, client_a), (TENANT_B, client_b)):
        tokens.append(audited.minter.token(tenant, client_id=client, sub=client))
        resp = audited.env.request("GET", "/Patient?family=Zzyzx-Access", bearer(tokens[-1]))
        assert resp.status == 200, resp

    def lines_with(*needles):
        return [line for line in audited.access_log().splitlines() if all(n in line for n in needles)]
    # Envoy flushes access log files on a timer (--file-flush-interval-msec, 10 s by default).
    wait_until(lambda: lines_with(TENANT_A, client_a) and lines_with(TENANT_B, client_b), ACCESS_LOG_FLUSH_S,
               "access log lines naming each tenant and its client",
               on_timeout=lambda: f"\naccess log:\n{audited.access_log()[-2000:]}")
    assert len(lines_with(client_a)) == 1 and len(lines_with(client_b)) == 1
    assert not lines_with(TENANT_B, client_a) and not lines_with(TENANT_A, client_b)
    # Both requests' lines are in the file: what they would leak is there now.
    assert_absent(audited.access_log(), "Zzyzx-Access", *tokens)
