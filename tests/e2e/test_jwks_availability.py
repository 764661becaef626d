"""Before the remote JWKS could be fetched, tokens get 503 + retry-after; once the IdP is up, 200."""
import time

import pytest

from checks import assert_no_upstream_saw_anything, assert_operation_outcome, assert_served_only_by
from conftest import stop_envoy
from harness import TENANT_A, Idp, bearer, free_port, wait_until
from tokens import Minter


@pytest.fixture(scope="module")
def late_idp_stack(start_envoy, upstreams, workdir):
    idp_port = free_port()  # nothing listens here yet
    env = start_envoy("envoy-idp-down", {"idp": idp_port, **upstreams.cluster_ports()})
    idp = Idp(idp_port, workdir, name="idp-late")
    yield env, idp
    stop_envoy(env)
    idp.stop()


def test_a_valid_token_gets_503_with_retry_after_while_the_idp_is_down(late_idp_stack, upstreams):
    env, idp = late_idp_stack
    token = Minter(idp.issuer).token(TENANT_A)
    resp = env.request("GET", "/Patient", bearer(token))
    assert_operation_outcome(resp, 503)
    retry_after = resp.header("retry-after")
    assert retry_after is not None and retry_after.strip().isdigit(), resp
    assert_no_upstream_saw_anything(upstreams)


def test_metadata_stays_public_while_the_idp_is_down(late_idp_stack, upstreams):
    env, _ = late_idp_stack
    resp = env.request("GET", "/metadata")
    assert resp.status == 200, resp
    assert list(upstreams.hits()) == ["metadata"]


def test_the_same_token_succeeds_once_the_idp_has_started(late_idp_stack, upstreams):
    env, idp = late_idp_stack
    token = Minter(idp.issuer).token(TENANT_A)
    assert env.request("GET", "/Patient", bearer(token)).status == 503  # still down: precondition
    idp.start()
    t0 = time.monotonic()
    statuses = []

    def ok():
        r = env.request("GET", "/Patient", bearer(token))
        statuses.append(r.status)
        return r if r.status == 200 else None

    wait_until(ok, 30, "the filter to fetch the JWKS after the IdP came up", interval=0.25,
               on_timeout=lambda: f" statuses seen: {sorted(set(statuses))}\n" + env.log_tail())
    assert set(statuses) <= {503, 200}, statuses
    print(f"JWKS recovered {time.monotonic() - t0:.1f}s after the IdP started")
    upstreams.clear()
    assert_served_only_by(upstreams, env.request("GET", "/Patient", bearer(token)), "tenant-a", TENANT_A)
