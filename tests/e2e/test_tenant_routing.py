"""A valid token's tenant decides the upstream; nothing the client sends can override it."""
import pytest

from checks import (
    assert_forbidden, assert_no_upstream_saw_anything, assert_served_only_by, assert_wasm_vm_never_crashed,
)
from harness import CLIENT_A, CLIENT_B, ROUTE_HEADER, TENANT_A, TENANT_B, TENANT_HEADER

UNCONFIGURED_TENANT = "0c0ffee0-0000-4000-8000-000000000000"


def test_an_idp_token_for_tenant_a_reaches_only_tenant_a_without_the_authorization_header(stack):
    token = stack.idp.access_token(CLIENT_A, TENANT_A)
    resp = stack.get("/Patient", token)
    assert_served_only_by(stack.upstreams, resp, "tenant-a", TENANT_A)


def test_an_idp_token_for_tenant_b_reaches_only_tenant_b(stack):
    token = stack.idp.access_token(CLIENT_B, TENANT_B)
    resp = stack.get("/Patient?name=smith", token)
    assert_served_only_by(stack.upstreams, resp, "tenant-b", TENANT_B, path="/Patient?name=smith")


def test_the_idp_refuses_client_a_asking_for_tenant_b_scope(stack):
    resp = stack.idp.token(CLIENT_A, TENANT_B)
    assert resp.status == 400, resp
    assert resp.json()["error"] == "invalid_scope", resp


def test_a_post_search_body_is_forwarded_unchanged_to_the_tenant(stack):
    token = stack.minter.token(TENANT_A)
    body = b"family=Doe&given=Jane&birthdate=1970-01-01&_count=5"
    resp = stack.get("/Patient/_search", token, {"content-type": "application/x-www-form-urlencoded"}, method="POST",
                     body=body)
    req = assert_served_only_by(stack.upstreams, resp, "tenant-a", TENANT_A, method="POST", path="/Patient/_search")
    assert req.body == body


def test_a_create_is_refused_by_the_default_read_only_allowlist(stack):
    token = stack.minter.token(TENANT_A)
    body = b'{"resourceType":"Patient","name":[{"family":"Doe"}]}'
    resp = stack.get("/Patient", token, {"content-type": "application/fhir+json"}, method="POST", body=body)
    assert resp.status == 403, resp
    doc = resp.json()
    assert doc["resourceType"] == "OperationOutcome" and "create" in doc["issue"][0]["diagnostics"], doc
    assert stack.upstreams.hits() == {}


def test_the_tenant_prefix_form_of_the_scope_routes_to_that_tenant(stack):
    token = stack.minter.token(f"tenant/{TENANT_A}")
    assert_served_only_by(stack.upstreams, stack.get("/Patient", token), "tenant-a", TENANT_A)


def test_one_tenant_named_in_both_forms_is_one_tenant(stack):
    token = stack.minter.token(f"{TENANT_A} tenant/{TENANT_A}")
    assert_served_only_by(stack.upstreams, stack.get("/Patient", token), "tenant-a", TENANT_A)


def test_other_scope_values_next_to_one_tenant_do_not_matter(stack):
    token = stack.minter.token(f"openid system/*.read {TENANT_B}")
    assert_served_only_by(stack.upstreams, stack.get("/Patient", token), "tenant-b", TENANT_B)


@pytest.mark.parametrize("scope", [
    pytest.param(UNCONFIGURED_TENANT, id="an-unconfigured-tenant"),
    pytest.param(f"{TENANT_A} {TENANT_B}", id="both-tenants"),
    pytest.param(f"{TENANT_A} tenant/{TENANT_B}", id="both-tenants-in-mixed-forms"),
    pytest.param("openid system/*.read", id="no-tenant-at-all"),
    pytest.param(f"tenants/{TENANT_A}", id="an-unknown-prefix"),
])
def test_a_token_whose_scope_names_no_single_configured_tenant_is_forbidden(stack, scope):
    resp = stack.get("/Patient", stack.minter.token(scope))
    assert_forbidden(resp)
    assert_no_upstream_saw_anything(stack.upstreams)


def test_a_spoofed_route_header_cannot_send_tenant_a_token_to_tenant_b(stack):
    token = stack.minter.token(TENANT_A)
    resp = stack.get("/Patient", token, {ROUTE_HEADER: "tenant_b"})
    req = assert_served_only_by(stack.upstreams, resp, "tenant-a", TENANT_A)
    assert ROUTE_HEADER not in req.headers or req.headers[ROUTE_HEADER] == ["tenant_a"], req.headers


def test_a_spoofed_tenant_id_header_is_replaced_by_the_token_tenant(stack):
    token = stack.minter.token(TENANT_A)
    resp = stack.get("/Patient", token, {TENANT_HEADER: TENANT_B, ROUTE_HEADER: "tenant_b"})
    assert_served_only_by(stack.upstreams, resp, "tenant-a", TENANT_A)


@pytest.mark.parametrize("cluster", ["tenant_a", "tenant_b", "fhir_metadata", "idp"])
def test_a_spoofed_route_header_without_a_token_reaches_no_cluster(stack, cluster):
    resp = stack.get("/Patient", None, {ROUTE_HEADER: cluster, TENANT_HEADER: TENANT_A})
    assert resp.status == 401, resp
    assert_no_upstream_saw_anything(stack.upstreams)


def test_an_es256_signed_token_is_accepted(stack):
    token = stack.minter.token(TENANT_B, alg="ES256")
    assert_served_only_by(stack.upstreams, stack.get("/Patient", token), "tenant-b", TENANT_B)


def test_no_request_in_this_module_crashed_the_wasm_vm(stack):
    assert_wasm_vm_never_crashed(stack.envoy)
