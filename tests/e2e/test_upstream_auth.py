"""Per-tenant OAuth toward the upstream (issue 12), through the real Envoy and the built module: the router
gets an access token from each tenant upstream's OWN authorization server (a second, separate, real
oidc-provider: tests/upstream-as) and sends it to that tenant's FHIR server, which sits behind our fake token
guard (tests/upstream-as/fake_token_guard.py: serves only requests bearing that server's valid token for its
audience). Envoy runs with one worker (`--concurrency 1`): one token per tenant per VM, so counts are exact.

Failure modes tried, and what the client and the upstream saw, are asserted test by test."""
from __future__ import annotations

import re
import time

import pytest

from checks import assert_wasm_vm_never_crashed
from conftest import stop_envoy, wait_for_jwks
from harness import SHIPPED_CONFIG, TENANT_A, TENANT_B, bearer, load_yaml, wait_until, wasm_plugin_config
from test_tenant_registry import REGISTRY_CLUSTER, Registry, static_cluster
from tokens import Minter
from upstream_auth import (BASIC_CLIENT, FHIR_A_AUDIENCE, FHIR_B_AUDIENCE, PKJWT_CLIENT, POST_CLIENT,
                           SERVICE_ACCOUNT)


AS_CLUSTER = "upstream_as"
UNAVAILABLE = "upstream_auth_unavailable"


def _base(as_port: int, env: dict[str, str], registry_port: int | None = None) -> dict:
    cfg = load_yaml(SHIPPED_CONFIG)
    cfg["static_resources"]["clusters"].append(static_cluster(AS_CLUSTER, as_port))
    if registry_port is not None:
        cfg["static_resources"]["clusters"].append(static_cluster(REGISTRY_CLUSTER, registry_port))
    wasm_plugin_config(cfg)["vm_config"]["environment_variables"] = {"key_values": env}
    return cfg


def _auth(as_, method: str, **extra) -> dict:
    auth = {"method": method, "token_url": as_.token_url, "cluster": AS_CLUSTER, "timeout_ms": 2000}
    auth.update(extra)
    return auth


def basic_a(as_) -> dict:
    return _auth(as_, "client_secret_basic", client_id=BASIC_CLIENT, client_secret={"env": "A_SECRET"},
                 resource=FHIR_A_AUDIENCE, scope="system/*.read")


def pkjwt_b(as_, keys) -> dict:
    return _auth(as_, "private_key_jwt", client_id=PKJWT_CLIENT, private_key={"env": "B_KEY"},
                 key_id=keys.rs384.kid, resource=FHIR_B_AUDIENCE, scope="system/*.rs")


def _start(start_envoy, idp, upstreams, ua, name, tenants: dict, env: dict, registry=None, concurrency: int = 1):
    def plugin(doc):
        for tenant, auth in tenants.items():
            doc["tenants"][tenant]["upstream_auth"] = auth
        if registry is not None:
            # A registry document may name only what the operator scoped for it (here FTR_REGISTRY_*).
            doc["tenant_registry"] = {"uri": registry.uri, "cluster": REGISTRY_CLUSTER, "refresh_s": 1,
                                      "timeout_ms": 1000, "secret_scope": {"env_prefixes": ["FTR_REGISTRY_"]}}
    envoy = start_envoy(name, {"idp": idp.port, **upstreams.cluster_ports(), **ua.cluster_ports()},
                        base=_base(ua.as_.port, env, registry.port if registry else None), plugin=plugin,
                        concurrency=concurrency)
    return envoy


def _ok(env, minter, tenant, path="/Patient"):
    resp = env.request("GET", path, bearer(minter.token(tenant)))
    assert resp.status == 200, (resp, env.log_tail(30))
    return resp


def _stat_at_least(env, name: str, n: int = 1) -> int:
    """A router stat once it reaches `n` (stats are flushed on the VM's 500 ms tick)."""
    return wait_until(lambda: (lambda v: v if v >= n else None)(env.router_stat(name)), 10, f"{name} >= {n}",
                      on_timeout=lambda: f"\nstats: {env.router_stats()}")


def _unavailable(resp):
    assert resp.status == 503, resp
    assert resp.header("retry-after") and int(resp.header("retry-after")) >= 1, resp
    assert resp.json()["resourceType"] == "OperationOutcome"
    assert resp.json()["issue"][0]["code"] == "transient"


@pytest.fixture(scope="module")
def keyed(upstream_auth):
    """The AS's secrets and keys as the VM's environment."""
    ua = upstream_auth
    return {"A_SECRET": ua.as_.secrets[BASIC_CLIENT], "B_KEY": ua.keys.rs384.pem(),
            "POST_SECRET": ua.as_.secrets[POST_CLIENT], "SA_KEY": ua.as_.service_account_key_file.read_text()}


@pytest.fixture(scope="module")
def stack(start_envoy, idp, upstreams, upstream_auth, keyed):
    ua = upstream_auth
    env = _start(start_envoy, idp, upstreams, ua, "envoy-upstream-auth",
                 {TENANT_A: basic_a(ua.as_), TENANT_B: pkjwt_b(ua.as_, ua.keys)}, keyed)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    yield env, ua, minter
    stop_envoy(env)


def test_the_first_request_gets_a_token_which_the_upstream_sees_instead_of_the_clients(stack, upstreams):
    env, ua, minter = stack
    guard_a, guard_b = ua.guards["tenant_a"], ua.guards["tenant_b"]
    issued = {c: ua.as_.issued(c) for c in (BASIC_CLIENT, PKJWT_CLIENT)}
    client_token = minter.token(TENANT_A)
    for _ in range(3):
        resp = env.request("GET", "/Patient", bearer(client_token))
        assert resp.status == 200, (resp, env.log_tail(30))
    # The guard admitted them with the AS's token for tenant A's audience, from client_secret_basic.
    allowed = guard_a.allowed()
    assert len(allowed) >= 3 and {(r.client_id, r.aud) for r in allowed} == {(BASIC_CLIENT, FHIR_A_AUDIENCE)}
    assert not guard_a.refused(), guard_a.records
    # The FHIR server behind it got the AS's token, never the client's.
    seen = [h for r in upstreams.tenant_a.requests for h in r.headers.get("authorization", [])]
    assert seen and all(h.startswith("Bearer ") and client_token not in h for h in seen), seen
    # One token, cached: the AS issued exactly one for the basic client, with the configured parameters.
    _ok(env, minter, TENANT_B)
    assert {c: ua.as_.issued(c) - issued[c] for c in issued} in ({BASIC_CLIENT: 1, PKJWT_CLIENT: 1},
                                                                 {BASIC_CLIENT: 0, PKJWT_CLIENT: 1})
    reqs = ua.as_.requests()
    basic = [r for r in reqs if r.get("client_id") == BASIC_CLIENT]
    if basic:
        assert basic[-1]["auth_method"] == "client_secret_basic"
        assert basic[-1]["params"]["resource"] == FHIR_A_AUDIENCE and basic[-1]["params"]["scope"] == "system/*.read"
    # Tenant B: a private_key_jwt assertion as SMART Backend Services require.
    assert {(r.client_id, r.aud) for r in guard_b.allowed()} == {(PKJWT_CLIENT, FHIR_B_AUDIENCE)}
    assertion = ua.as_.client_assertions()[-1]
    assert assertion["header"]["alg"] == "RS384" and assertion["header"]["kid"] == ua.keys.rs384.kid
    claims = assertion["claims"]
    assert claims["aud"] == ua.as_.token_url and claims["iss"] == claims["sub"] == PKJWT_CLIENT
    assert 0 < claims["exp"] - claims["iat"] <= 300 and claims["jti"]
    # Stats and audit: the kind, never the token or the secret.
    _stat_at_least(env, f"tenant.{TENANT_B}.upstream_token.fetches")
    log = env.log()
    assert ua.as_.secrets[BASIC_CLIENT] not in log
    assert '"upstream_credential":"private_key_jwt"' in log and '"upstream_credential":"client_secret_basic"' in log
    for r in guard_a.allowed():
        assert r.jti not in log
    assert_wasm_vm_never_crashed(env)


@pytest.mark.parametrize("method", ["client_secret_post", "private_key_jwt_es384", "jwt_bearer"])
def test_each_credential_kind_gets_a_token_the_upstream_accepts(method, start_envoy, idp, upstreams,
                                                                 upstream_auth, keyed):
    ua = upstream_auth
    auth = {
        "client_secret_post": _auth(ua.as_, "client_secret_post", client_id=POST_CLIENT,
                                    client_secret={"env": "POST_SECRET"}, audience=FHIR_A_AUDIENCE),
        "private_key_jwt_es384": _auth(ua.as_, "private_key_jwt", client_id=PKJWT_CLIENT, signing_alg="ES384",
                                       private_key={"env": "ES_KEY"}, key_id=ua.keys.es384.kid,
                                       resource=FHIR_A_AUDIENCE),
        # The service account's JSON key file, as Google hands it out, given whole as the variable's value.
        "jwt_bearer": _auth(ua.as_, "jwt_bearer", client_id=SERVICE_ACCOUNT, private_key={"env": "SA_KEY"},
                            resource=FHIR_A_AUDIENCE, scope="system/*.read"),
    }[method]
    env_vars = {**keyed, "ES_KEY": ua.keys.es384.pem()}
    if method == "private_key_jwt_es384":
        # The shipped module has no pure-Rust P-384: it refuses the key at start, naming the field.
        from harness import envoy_validate, render_config, write_config
        cfg = render_config(_base(ua.as_.port, env_vars), listener_port=1, admin_port=2, cluster_ports={},
                            plugin=lambda d: d["tenants"][TENANT_A].update(upstream_auth=auth))
        proc = envoy_validate(write_config(cfg, ua.as_.workdir / "es384.yaml"))
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and f"tenants.{TENANT_A}.upstream_auth.private_key" in out, out[-2000:]
        assert "p384-pure-rust" in out
        assert ua.keys.es384.pem().splitlines()[1] not in out, "the key is never printed"
        return
    env = _start(start_envoy, idp, upstreams, ua, f"envoy-upstream-{method}", {TENANT_A: auth}, env_vars)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    ua.guards["tenant_a"].clear()
    _ok(env, minter, TENANT_A)
    allowed = ua.guards["tenant_a"].allowed()
    expected = {"client_secret_post": POST_CLIENT, "jwt_bearer": SERVICE_ACCOUNT}[method]
    assert allowed and {(r.client_id, r.aud) for r in allowed} == {(expected, FHIR_A_AUDIENCE)}, allowed
    last = [r for r in ua.as_.requests() if r.get("client_id") == expected][-1]
    assert last["outcome"] == "issued", last
    if method == "jwt_bearer":
        assert last["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    else:
        assert last["auth_method"] == "client_secret_post"
    stop_envoy(env)


def test_a_token_is_refreshed_before_it_expires_and_no_request_waits_for_it(start_envoy, idp, upstreams,
                                                                             upstream_auth, keyed):
    ua = upstream_auth
    ua.as_.set_ttl(10, BASIC_CLIENT)
    try:
        env = _start(start_envoy, idp, upstreams, ua, "envoy-upstream-refresh", {TENANT_A: basic_a(ua.as_)}, keyed)
        minter = Minter(idp.issuer)
        wait_for_jwks(env, minter, upstreams)
        guard = ua.guards["tenant_a"]
        guard.clear()
        first = ua.as_.issued(BASIC_CLIENT)
        start = time.monotonic()
        # Requests every 0.5 s for 12 s: past 80 % of the first token's life (8 s) and past its expiry (10 s).
        while time.monotonic() - start < 12:
            _ok(env, minter, TENANT_A)
            time.sleep(0.5)  # pacing the load, not synchronisation
        # (The first token came with wait_for_jwks's request, before `first`.)
        assert ua.as_.issued(BASIC_CLIENT) - first >= 1, "a second token was fetched"
        assert not guard.refused(), [r.verdict for r in guard.refused()]  # never an expired token
        jtis = [r.jti for r in guard.allowed()]
        assert len(set(jtis)) >= 2, "the upstream saw the new token"
        _stat_at_least(env, f"tenant.{TENANT_A}.upstream_token.refreshes")
        assert env.router_stat(f"tenant.{TENANT_A}.upstream_token.waits") == 1, "only the very first request waited"
        stop_envoy(env)
    finally:
        ua.as_.set_ttl(300, BASIC_CLIENT)


def _burst(env, token: str, n: int) -> list:
    """`n` concurrent GET /Patient, each on its own connection (Envoy's workers take them as they come)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda _: env.request("GET", "/Patient", bearer(token)), range(n)))


def _serving_threads(env, tenant: str) -> set[str]:
    """The Envoy threads that served `tenant`: the thread id of each of its audit lines in Envoy's log."""
    line = r"\]\[(\d+)\]\[info\]\[(?:wasm|dynamic_modules)\].*\"audit\".*\"tenant\":\"" + re.escape(tenant)
    return {m.group(1) for m in re.finditer(line, env.log())}


def test_with_several_workers_every_request_gets_a_token_and_the_dynamic_module_fetches_once_per_process(
        start_envoy, idp, upstreams, upstream_auth, keyed):
    """Envoy with 4 workers, bursts of concurrent requests on their own connections until at least two workers
    have served the tenant: every one is answered with the AS's token. Each wasm VM (one per worker) fetches its
    own token; the dynamic module's workers ask its main thread, which fetches one for the whole process and
    hands it to every worker."""
    ua = upstream_auth
    workers = 4
    before = ua.as_.issued(BASIC_CLIENT)
    env = _start(start_envoy, idp, upstreams, ua, "envoy-upstream-workers",
                 {TENANT_A: basic_a(ua.as_), TENANT_B: pkjwt_b(ua.as_, ua.keys)}, keyed, concurrency=workers)
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    # Every worker has its key set once bursts of tenant B (its own client at the AS) pass whole.
    b_token = minter.token(TENANT_B)
    wait_until(lambda: all(r.status == 200 for r in _burst(env, b_token, 16)), 30, "every worker has its key set",
               on_timeout=lambda: str([(r.status, r.body[:100]) for r in _burst(env, b_token, 16)]))
    guard = ua.guards["tenant_a"]
    guard.clear()
    a_token = minter.token(TENANT_A)
    sent = []

    def spread() -> bool:
        sent.extend(_burst(env, a_token, 24))
        return len(_serving_threads(env, TENANT_A)) >= 2

    wait_until(spread, 30, "tenant A's requests to reach two workers or more")
    assert [r.status for r in sent] == [200] * len(sent), [(r.status, r.body[:200]) for r in sent if r.status != 200]
    assert not guard.refused() and len(guard.allowed()) == len(sent), [r.verdict for r in guard.refused()]
    issued = ua.as_.issued(BASIC_CLIENT) - before
    if env.build == "dynamic-module":
        assert issued == 1, f"the process fetched {issued} tokens for one tenant"
    else:
        assert 1 <= issued <= workers, f"{issued} tokens for {workers} worker VMs"
    assert_wasm_vm_never_crashed(env)
    stop_envoy(env)


def test_with_four_workers_concurrent_first_requests_and_every_renewal_cost_one_token_request_per_process(
        start_envoy, idp, upstreams, upstream_auth, keyed):
    """Issue 22, finding 6: Envoy with 4 workers, tenant A's first requests all at once on their own connections,
    then bursts across the workers for three renewals of a 6 s token. Counted at the authorization server: the
    dynamic module sends exactly one token request for the first use and one per renewal (a renewal comes ~3.5 s
    after the token before it; a second request for the same renewal came ~0.5 s after the first before the fix).
    Each wasm VM fetches its own. The delay from the first request to the token request is printed (measured,
    not asserted)."""
    ua = upstream_auth
    workers = 4
    ua.as_.set_ttl(6, BASIC_CLIENT)
    env = None
    try:
        env = _start(start_envoy, idp, upstreams, ua, "envoy-upstream-renewals",
                     {TENANT_A: basic_a(ua.as_), TENANT_B: pkjwt_b(ua.as_, ua.keys)}, keyed, concurrency=workers)
        minter = Minter(idp.issuer)
        # Every worker has its key set once bursts of tenant B (its own client at the AS) pass whole; tenant A
        # has had no request yet.
        b_token = minter.token(TENANT_B)
        wait_until(lambda: all(r.status == 200 for r in _burst(env, b_token, 16)), 30, "every worker has its key set")
        guard = ua.guards["tenant_a"]
        guard.clear()
        seq = max((r["seq"] for r in ua.as_.requests()), default=0)
        a_token = minter.token(TENANT_A)
        first_sent = time.time()
        first = _burst(env, a_token, 24)
        assert [r.status for r in first] == [200] * 24, [(r.status, r.body[:200]) for r in first if r.status != 200]
        assert len(_serving_threads(env, TENANT_A)) >= 2, "the first requests reached two workers or more"
        requests = lambda: [r for r in ua.as_.requests()  # noqa: E731
                            if r.get("client_id") == BASIC_CLIENT and r["seq"] > seq]
        print(f"\nfirst request -> token request: {(requests()[0]['time'] - first_sent) * 1000:.1f} ms "
              f"({env.build}, {workers} workers)")
        if env.build == "dynamic-module":
            assert len(requests()) == 1, [round(r["time"] - first_sent, 3) for r in requests()]
        sent = []

        def renewals() -> list[list[float]]:
            """The token requests grouped by renewal: those within 1.5 s of the first of a group (renewals come
            ~3.5 s apart: 80 % of the 4.4 s a 6 s token is used)."""
            groups: list[list[float]] = []
            for t in sorted(r["time"] for r in requests()):
                if groups and t - groups[-1][0] < 1.5:
                    groups[-1].append(t)
                else:
                    groups.append([t])
            return groups

        def traffic_until(n: int):
            def check() -> bool:
                sent.extend(_burst(env, a_token, 8))
                # A group is whole once a request comes 1.5 s after its first.
                return len(renewals()) > n
            return check

        # The first use and three renewals, and requests past the third renewal's group.
        wait_until(traffic_until(4), 30, "three renewals")
        assert [r.status for r in sent] == [200] * len(sent), [(r.status, r.body[:200]) for r in sent
                                                               if r.status != 200]
        assert not guard.refused(), [r.verdict for r in guard.refused()]
        groups = renewals()[:4]
        counts = [len(g) for g in groups]
        print(f"token requests per renewal: {counts}, at {[round(t - groups[0][0], 2) for g in groups for t in g]} s")
        if env.build == "dynamic-module":
            assert counts == [1, 1, 1, 1], counts
        else:
            assert all(1 <= c <= workers for c in counts), counts
        assert_wasm_vm_never_crashed(env)
    finally:
        ua.as_.set_ttl(300, BASIC_CLIENT)
        if env:
            stop_envoy(env)


# How the AS fails: an error answer, no answer at all (the token request times out after timeout_ms), or a
# connection refused; and what the router's log says of it.
OUTAGES = {"503": "temporarily_unavailable", "hang": "HTTP status 504 (upstream request timeout)",
           "refuse": "HTTP status 503 (upstream connect error"}


@pytest.mark.parametrize("mode", list(OUTAGES))
def test_an_authorization_server_outage_keeps_a_usable_token_then_answers_503_never_unauthenticated(
        mode, start_envoy, idp, upstreams, upstream_auth, keyed):
    ua = upstream_auth
    ua.as_.set_ttl(6, BASIC_CLIENT)
    env = None
    try:
        env = _start(start_envoy, idp, upstreams, ua, f"envoy-upstream-outage-{mode}", {TENANT_A: basic_a(ua.as_)},
                     keyed)
        minter = Minter(idp.issuer)
        wait_for_jwks(env, minter, upstreams)
        guard = ua.guards["tenant_a"]
        guard.clear()
        _ok(env, minter, TENANT_A)
        got_token_at = time.monotonic()
        ua.as_.outage(mode)
        # Used until 1.6 s before its expiry (a tenth of its 6 s life and a second): the requests in the first
        # 3 s (well inside that, on a loaded machine too) go on with it.
        statuses = []
        while time.monotonic() - got_token_at < 3.0:
            statuses.append(env.request("GET", "/Patient", bearer(minter.token(TENANT_A))).status)
            time.sleep(0.25)  # pacing
        assert set(statuses) == {200}, statuses
        # Then: 503 with Retry-After and an OperationOutcome; the upstream sees nothing without a token.
        resp = wait_until(lambda: (lambda r: r if r.status == 503 else None)(
            env.request("GET", "/Patient", bearer(minter.token(TENANT_A)))), 10, "503 once the token expired")
        _unavailable(resp)
        assert set(r.verdict for r in guard.records) == {"allowed"}, "never a request without a valid token"
        log = env.log()
        assert f"upstream token for tenant {TENANT_A}" in log and OUTAGES[mode] in log, env.log_tail(20)
        _stat_at_least(env, f"requests.rejected.{UNAVAILABLE}")
        # The server is back: after the backoff, requests are served again.
        ua.as_.outage("off")
        wait_until(lambda: env.request("GET", "/Patient", bearer(minter.token(TENANT_A))).status == 200, 40,
                   "service after the outage")
        assert_wasm_vm_never_crashed(env)
    finally:
        ua.as_.outage("off")
        ua.as_.set_ttl(300, BASIC_CLIENT)
        if env:
            stop_envoy(env)


def test_an_upstream_401_refreshes_the_token_once_and_a_safe_request_is_sent_again(stack):
    env, ua, minter = stack
    guard = ua.guards["tenant_a"]
    _ok(env, minter, TENANT_A)
    guard.clear()
    assert guard.revoke_all_seen(), "the token in use reached the guard"
    before = ua.as_.issued(BASIC_CLIENT)
    resp = _ok(env, minter, TENANT_A, "/Patient?_count=1")
    assert ua.as_.issued(BASIC_CLIENT) == before + 1, "one new token"
    verdicts = [(r.verdict, r.path) for r in guard.records]
    assert verdicts == [("revoked", "/Patient?_count=1"), ("allowed", "/Patient?_count=1")], verdicts
    assert resp.json()  # the client got the second answer
    _stat_at_least(env, f"tenant.{TENANT_A}.upstream_token.retries")
    # A POST is never sent again: the upstream's 401 goes back as it is.
    guard.revoke_all_seen()
    guard.clear()
    resp = env.request("POST", "/Patient/_search", {**bearer(minter.token(TENANT_A)),
                                                    "content-type": "application/x-www-form-urlencoded"}, b"name=x")
    assert resp.status in (200, 401), resp
    assert [r.verdict for r in guard.records].count("allowed") <= 1
    assert len(guard.records) == 1, "sent once"
    guard.unrevoke_all()


def test_a_wrong_secret_is_logged_naming_the_tenant_and_the_client_gets_503(start_envoy, idp, upstreams,
                                                                             upstream_auth, keyed):
    ua = upstream_auth
    env = _start(start_envoy, idp, upstreams, ua, "envoy-upstream-wrong-secret", {TENANT_A: basic_a(ua.as_)},
                 {**keyed, "A_SECRET": "not-the-secret"})
    minter = Minter(idp.issuer)
    # Tenant A cannot succeed: wait for the JWKS with tenant B's token instead.
    # (B has no upstream_auth here: its guard answers 401; anything but 503 means the JWKS is in.)
    wait_until(lambda: env.request("GET", "/Patient", bearer(minter.token(TENANT_B))).status != 503, 30,
               "the JWKS")
    ua.guards["tenant_a"].clear()
    resp = env.request("GET", "/Patient", bearer(minter.token(TENANT_A)))
    _unavailable(resp)
    assert not ua.guards["tenant_a"].records, "nothing reached the upstream"
    line = next(l for l in env.log().splitlines() if f"upstream token for tenant {TENANT_A}" in l)
    assert "invalid_client" in line and "[error]" in line, line
    assert "not-the-secret" not in env.log()
    stop_envoy(env)


def test_a_secret_rotated_at_the_server_is_picked_up_through_a_registry_reload(start_envoy, idp, upstreams,
                                                                              upstream_auth, keyed):
    ua = upstream_auth
    registry = Registry().start()
    old, new = ua.as_.secrets[BASIC_CLIENT], "rotated-" + ua.as_.secrets[BASIC_CLIENT]
    tenant = lambda var: {TENANT_A: {"cluster": "tenant_a", "upstream_auth": {  # noqa: E731
        **basic_a(ua.as_), "client_secret": {"env": var}}}, TENANT_B: {"cluster": "tenant_b"}}
    registry.serve(tenant("FTR_REGISTRY_A_SECRET"))
    env = None
    try:
        env = _start(start_envoy, idp, upstreams, ua, "envoy-upstream-rotation", {},
                     {**keyed, "FTR_REGISTRY_A_SECRET": old, "FTR_REGISTRY_A_SECRET_V2": new}, registry=registry)
        minter = Minter(idp.issuer)
        wait_until(lambda: env.request("GET", "/Patient", bearer(minter.token(TENANT_A))).status == 200, 30,
                   "tenant A from the registry, with its first token")
        ua.as_.rotate_secret(BASIC_CLIENT, new)
        registry.serve(tenant("FTR_REGISTRY_A_SECRET_V2"))
        before = ua.as_.issued(BASIC_CLIENT)

        def served_with_a_new_token():
            # The reload (every 1 s) changes the tenant's client: its token is dropped and a new one fetched
            # with the new secret. (Until the reload, the token in hand still serves.)
            status = env.request("GET", "/Patient", bearer(minter.token(TENANT_A))).status
            return status == 200 and ua.as_.issued(BASIC_CLIENT) > before

        wait_until(served_with_a_new_token, 20, "a token fetched with the rotated secret")
        last = [r for r in ua.as_.requests() if r.get("client_id") == BASIC_CLIENT][-1]
        assert last["outcome"] == "issued", last
        assert new not in env.log() and old not in env.log()
    finally:
        ua.as_.rotate_secret(BASIC_CLIENT, old)
        registry.stop()
        if env:
            stop_envoy(env)
