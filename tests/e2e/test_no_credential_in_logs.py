"""No credential reaches Envoy's log through the filter (issue 24, item 2), in both builds.

A fake token endpoint (fake: no real authorization server answers with a token under an error status, or
echoes the posted form; these are the answers an operator's log must survive) answers each tenant's token
request its own bad way, every answer carrying a canary where a credential would be: the posted
client_secret, an access token, a description quoting the secret, an `error` that is a sentence. One tenant
gets a good token (a canary too) and is served. The filter logs at debug level for this test, and every line
of Envoy's log is searched for every canary; the OAuth `error` code that is well formed does appear (the lines
are there to read). A configuration with a secret written literally is refused naming the field, and its value
is not in Envoy's output."""
from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import _running_envoys, wait_for_jwks
from harness import (SHIPPED_CONFIG, TENANT_A, Envoy, bearer, envoy_validate, free_port, load_yaml, render_config,
                     wait_until, wasm_plugin_config, write_config)
from test_tenant_registry import static_cluster
from tokens import Minter

SECRET = "CANARY-client-secret-71c4e0"
TOKEN_IN_ERROR = "CANARY-access-token-in-a-502-9a0b"
TOKEN_TYPE = "CANARY-token-type-3f1d"
GOOD_TOKEN = "CANARY-upstream-token-5e6f"
LITERAL = "CANARY-literal-secret-2b8c"
AS_CLUSTER = "canary_as"

# tenant id -> (what the fake token endpoint answers, a text the log line must show)
SCENARIOS = {
    "a0000000-0000-4000-8000-000000000001": ("token_under_502", "HTTP status 502 (not an OAuth error answer"),
    "a0000000-0000-4000-8000-000000000002": ("form_echo_page", "HTTP status 400 (not an OAuth error answer"),
    "a0000000-0000-4000-8000-000000000003": ("description_quotes_secret", "HTTP status 401: invalid_client"),
    "a0000000-0000-4000-8000-000000000004": ("error_is_a_sentence", "not an RFC 6749 error code"),
    "a0000000-0000-4000-8000-000000000005": ("token_type_canary", "token_type is not Bearer"),
}
GOOD_TENANT = "a0000000-0000-4000-8000-000000000006"


class FakeTokenEndpoint:
    """Answers POST /<scenario> as the scenario says; records the forms it was sent."""

    def __init__(self):
        self.forms: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length") or 0)).decode()
                form = dict(urllib.parse.parse_qsl(raw))
                owner.forms.append(form)
                secret = form.get("client_secret", "")
                status, body, kind = {
                    "/token_under_502": (502, {"access_token": TOKEN_IN_ERROR, "token_type": "Bearer"}, "json"),
                    "/form_echo_page": (400, f"<p>bad request: {raw}</p>\nclient_secret={secret}", "html"),
                    "/description_quotes_secret": (401, {"error": "invalid_client",
                                                         "error_description": f"secret {secret} is wrong"}, "json"),
                    "/error_is_a_sentence": (401, {"error": f"client_secret {secret} is wrong"}, "json"),
                    "/token_type_canary": (200, {"access_token": "x", "token_type": TOKEN_TYPE}, "json"),
                    "/good": (200, {"access_token": GOOD_TOKEN, "token_type": "Bearer", "expires_in": 300}, "json"),
                }.get(self.path, (404, "no such scenario", "html"))
                data = (json.dumps(body) if kind == "json" else body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json" if kind == "json" else "text/html")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class DebugEnvoy(Envoy):
    """The filter's own log components at debug: a failure streak's later lines are debug lines."""

    def command(self) -> list[str]:
        return [a.replace("wasm:info,dynamic_modules:info", "wasm:debug,dynamic_modules:debug")
                for a in super().command()]


def _auth(port: int, scenario: str) -> dict:
    return {"method": "client_secret_post", "token_url": f"http://127.0.0.1:{port}/{scenario}",
            "cluster": AS_CLUSTER, "client_id": "canary-client", "client_secret": {"env": "CANARY_SECRET"},
            "timeout_ms": 2000}


@pytest.fixture(scope="module")
def canary_stack(workdir, wasm, idp, upstreams):
    fake = FakeTokenEndpoint()
    base = load_yaml(SHIPPED_CONFIG)
    base["static_resources"]["clusters"].append(static_cluster(AS_CLUSTER, fake.port))
    wasm_plugin_config(base)["vm_config"]["environment_variables"] = {"key_values": {"CANARY_SECRET": SECRET}}

    def plugin(doc):
        for tenant, (scenario, _) in SCENARIOS.items():
            doc["tenants"][tenant] = {"cluster": "tenant_a", "upstream_auth": _auth(fake.port, scenario)}
        doc["tenants"][GOOD_TENANT] = {"cluster": "tenant_a", "upstream_auth": _auth(fake.port, "good")}
        doc.get("discovery", {}).pop("scopes_supported", None)

    port, admin = free_port(), free_port()
    cfg = render_config(base, listener_port=port, admin_port=admin,
                        cluster_ports={"idp": idp.port, **upstreams.cluster_ports()}, wasm_path=wasm, plugin=plugin)
    env = DebugEnvoy(cfg, workdir, "envoy-canary-logs", port, admin)
    _running_envoys.append(env)
    env.start()
    minter = Minter(idp.issuer)
    wait_for_jwks(env, minter, upstreams)
    yield env, minter, fake
    env.stop()
    _running_envoys.remove(env)
    fake.stop()


def test_no_answer_of_a_fake_token_endpoint_puts_a_credential_in_any_log_line(canary_stack, upstreams):
    env, minter, fake = canary_stack
    client_tokens = []
    for tenant in SCENARIOS:
        client_tokens.append(minter.token(tenant))
        resp = env.request("GET", "/Patient", bearer(client_tokens[-1]))
        assert resp.status == 503, (tenant, resp)
    client_tokens.append(minter.token(GOOD_TENANT))
    upstreams.clear()
    resp = env.request("GET", "/Patient", bearer(client_tokens[-1]))
    assert resp.status == 200, resp
    assert upstreams.tenant_a.requests[-1].headers.get("authorization") == [f"Bearer {GOOD_TOKEN}"]
    # The endpoint was sent the secret every time (so every answer could echo it).
    assert len(fake.forms) >= len(SCENARIOS) + 1 and all(f.get("client_secret") == SECRET for f in fake.forms)
    # Each refusal was logged (the lines exist and say what went wrong), naming the tenant.
    for tenant, (_, shown) in SCENARIOS.items():
        wait_until(lambda: any(tenant in line and shown in line for line in env.log().splitlines()), 10,
                   f"the log line for {tenant} showing {shown!r}", on_timeout=lambda: env.log_tail(40))
    log = env.log()
    for canary in [SECRET, TOKEN_IN_ERROR, TOKEN_TYPE, GOOD_TOKEN, "CANARY", *client_tokens]:
        hits = [line for line in log.splitlines() if canary in line]
        assert not hits, f"{canary[:40]}… is in Envoy's log:\n" + "\n".join(hits[:5])


def test_a_secret_written_literally_in_the_plugin_json_is_refused_naming_the_field_not_echoed(workdir, wasm):
    def plugin(doc):
        doc["tenants"][TENANT_A]["upstream_auth"] = {
            "method": "client_secret_post", "token_url": "https://as.example/token", "cluster": "tenant_a",
            "client_id": "c", "client_secret": LITERAL}

    cfg = render_config(SHIPPED_CONFIG, listener_port=1, admin_port=2, cluster_ports={}, wasm_path=wasm,
                        plugin=plugin)
    proc = envoy_validate(write_config(cfg, workdir / "literal-secret.yaml"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"tenants.{TENANT_A}.upstream_auth.client_secret" in out, out[-3000:]
    assert LITERAL not in out, [line for line in out.splitlines() if LITERAL in line]
