"""Every TLS cluster the project ships verifies its peer (issue 24, item 1).

The upstream-auth recipe's clusters (examples/upstream-auth/envoy.yaml) are copied as they are, only re-pointed
at 127.0.0.1, into the demo config; real HTTPS servers (Python's ssl, certificates from a throwaway CA minted
here with `cryptography`) stand in for Entra's token endpoint and the Azure FHIR service. Envoy's BoringSSL
makes the verdict: a server whose certificate names ANOTHER host gets no TLS session, so no form (no
client_secret) and no FHIR request; a server with a certificate from a CA the cluster does not trust, likewise.
The control tenant, whose servers present the expected name, gets its token and its data through the same
cluster shape, so the refusals are the name check's and not a broken harness.

scripts/check-tls.py (run by `make validate`) is checked here too: it refuses the recipe's old clusters
(`sni` only) and an opt-out that does not point at a loopback address."""
from __future__ import annotations

import copy
import datetime
import json
import ssl
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import stop_envoy, wait_for_jwks
from harness import REPO, SHIPPED_CONFIG, TENANT_A, TENANT_B, bearer, free_port, load_yaml, wasm_plugin_config
from tokens import Minter

RECIPES = REPO / "examples" / "upstream-auth" / "envoy.yaml"
CHECK_TLS = REPO / "scripts" / "check-tls.py"
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
TOKEN_HOST = "login.microsoftonline.com"                      # the recipe's entra cluster's name
FHIR_HOST = "contoso-fhir.fhir.azurehealthcareapis.com"       # the recipe's azure_fhir cluster's name
OTHER_HOST = "attacker.example.net"                            # a name the CA also vouches for
TENANT_C = "c0ffee00-0000-4000-8000-000000000c0c"              # control: every server presents its own name
TENANT_D = "d0ffee00-0000-4000-8000-000000000d0d"              # the recipe's system-bundle cluster, our CA
SECRET = "tls-canary-client-secret-5d1e"


# ---------------------------------------------------------------------------------------- certificates

class Ca:
    """A throwaway CA (P-256) that signs server certificates for any name."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fhir-tenant-router test CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.path = directory / "test-ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def server_context(self, dns_name: str) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(self.key, hashes.SHA256()))
        cert_path, key_path = self.dir / f"{dns_name}.crt", self.dir / f"{dns_name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                              + self.cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_path, key_path)
        return ctx


# ------------------------------------------------------------------------------------- HTTPS servers

class HttpsServer:
    """A real HTTPS server (Python's ssl) that records every request it is sent: a token endpoint (POST:
    a bearer token) or a FHIR server (GET: an empty searchset)."""

    def __init__(self, name: str, ctx: ssl.SSLContext):
        self.name = name
        self.requests: list[dict] = []
        self.handshakes_failed = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: dict) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_POST(self):
                form = self.rfile.read(int(self.headers.get("content-length") or 0)).decode()
                owner.requests.append({"method": "POST", "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                       "form": dict(urllib.parse.parse_qsl(form))})
                self._answer(200, {"access_token": f"at-from-{owner.name}", "token_type": "Bearer",
                                   "expires_in": 300})

            def do_GET(self):
                owner.requests.append({"method": "GET", "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}})
                self._answer(200, {"resourceType": "Bundle", "type": "searchset", "total": 0})

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):
                # The listening socket is wrapped: accept() runs the TLS handshake, and a client that refuses
                # the certificate makes it fail here (socketserver drops the connection quietly).
                try:
                    return super().get_request()
                except OSError:
                    owner.handshakes_failed += 1
                    raise

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> "HttpsServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --------------------------------------------------------------------------------------------- config

def _recipe_cluster(name: str, new_name: str, port: int, trusted_ca: str | None) -> dict:
    """The recipe's cluster `name`, verbatim except its address (127.0.0.1:port), its name, and, when given,
    the CA file it trusts (the recipe trusts the system bundle; our throwaway CA is in no bundle)."""
    clusters = {c["name"]: c for c in load_yaml(RECIPES)["static_resources"]["clusters"]}
    c = copy.deepcopy(clusters[name])
    c["name"] = new_name
    c["load_assignment"]["cluster_name"] = new_name
    c["dns_lookup_family"] = "V4_ONLY"
    for ep in c["load_assignment"]["endpoints"]:
        for lb in ep["lb_endpoints"]:
            lb["endpoint"]["address"]["socket_address"].update(address="127.0.0.1", port_value=port)
    vc = c["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
    assert vc["trusted_ca"] == {"filename": SYSTEM_BUNDLE}, "the recipe trusts the system bundle"
    assert vc["match_typed_subject_alt_names"], "the recipe names the peer it expects"
    if trusted_ca is not None:
        vc["trusted_ca"] = {"filename": trusted_ca}
    return c


@pytest.fixture(scope="module")
def tls_stack(workdir, start_envoy, idp, upstreams):
    ca = Ca(workdir)
    servers = {
        "token_other": HttpsServer("token_other", ca.server_context(OTHER_HOST)).start(),
        "token_right": HttpsServer("token_right", ca.server_context(TOKEN_HOST)).start(),
        "fhir_other": HttpsServer("fhir_other", ca.server_context(OTHER_HOST)).start(),
        "fhir_right": HttpsServer("fhir_right", ca.server_context(FHIR_HOST)).start(),
    }
    ports = {k: s.port for k, s in servers.items()}
    named_ca = str(ca.path)
    cfg = load_yaml(SHIPPED_CONFIG)
    cfg["static_resources"]["clusters"] += [
        _recipe_cluster("entra", "entra_other", ports["token_other"], named_ca),
        _recipe_cluster("entra", "entra_right", ports["token_right"], named_ca),
        _recipe_cluster("azure_fhir", "azure_fhir_other", ports["fhir_other"], named_ca),
        _recipe_cluster("azure_fhir", "azure_fhir_right", ports["fhir_right"], named_ca),
        # The recipe's cluster with its system bundle, before a server whose CA is in no bundle.
        _recipe_cluster("azure_fhir", "azure_fhir_system_ca", ports["fhir_right"], None),
    ]
    wasm_plugin_config(cfg)["vm_config"]["environment_variables"] = {"key_values": {"ENTRA_SECRET": SECRET}}
    token_url = f"https://{TOKEN_HOST}/aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa/oauth2/v2.0/token"

    def auth(cluster: str) -> dict:
        return {"method": "client_secret_post", "token_url": token_url, "cluster": cluster,
                "client_id": "bbbbbbbb-bbbb-bbbb-bbbb-bbbbbbbbbbbb", "client_secret": {"env": "ENTRA_SECRET"},
                "scope": f"https://{FHIR_HOST}/.default", "timeout_ms": 2000}

    def plugin(doc):
        doc["tenants"] = {
            TENANT_A: {"cluster": "azure_fhir_right", "authority": FHIR_HOST, "base_path": "/a",
                       "upstream_auth": auth("entra_other")},
            TENANT_B: {"cluster": "azure_fhir_other", "authority": FHIR_HOST, "base_path": "/b",
                       "upstream_auth": auth("entra_right")},
            TENANT_C: {"cluster": "azure_fhir_right", "authority": FHIR_HOST, "base_path": "/c",
                       "upstream_auth": auth("entra_right")},
            TENANT_D: {"cluster": "azure_fhir_system_ca", "authority": FHIR_HOST, "base_path": "/d"},
        }
        doc.get("discovery", {}).pop("scopes_supported", None)

    env = start_envoy("envoy-tls-verification", {"idp": idp.port, **upstreams.cluster_ports()}, base=cfg,
                      plugin=plugin)
    minter = Minter(idp.issuer)
    # The JWKS is loaded once a tenant answers anything but 503 from the JWKS wait: tenant C is the one that
    # can succeed.
    from harness import wait_until
    wait_until(lambda: env.request("GET", "/Patient", bearer(minter.token(TENANT_C))).status == 200, 30,
               "the control tenant served through verified TLS",
               on_timeout=lambda: env.log_tail(40) + f"\n{ {k: s.requests for k, s in servers.items()} }")
    yield env, minter, servers
    stop_envoy(env)
    for s in servers.values():
        s.stop()


def test_the_control_tenant_gets_its_token_and_its_data_from_fake_servers_through_the_recipes_cluster_shape(tls_stack):
    env, minter, servers = tls_stack
    resp = env.request("GET", "/Patient", bearer(minter.token(TENANT_C)))
    assert resp.status == 200, resp
    posts = servers["token_right"].requests
    assert posts and posts[-1]["form"].get("client_secret") == SECRET, posts
    gets = [r for r in servers["fhir_right"].requests if r["path"].startswith("/c/")]
    assert gets and gets[-1]["headers"].get("authorization") == "Bearer at-from-token_right", gets


def test_a_fake_token_endpoint_presenting_a_certificate_for_another_name_gets_no_secret(tls_stack):
    env, minter, servers = tls_stack
    for _ in range(3):
        resp = env.request("GET", "/Patient", bearer(minter.token(TENANT_A)))
        assert resp.status == 503, resp
        assert resp.json()["resourceType"] == "OperationOutcome"
    assert servers["token_other"].requests == [], "a request (and its client_secret) crossed unverified TLS"
    assert servers["token_other"].handshakes_failed >= 1, "Envoy never even tried: the test proves nothing"
    assert not [r for r in servers["fhir_right"].requests if r["path"].startswith("/a/")]
    assert SECRET not in env.log()


def test_a_fake_fhir_server_presenting_a_certificate_for_another_name_gets_no_request(tls_stack):
    env, minter, servers = tls_stack
    for _ in range(3):
        resp = env.request("GET", "/Patient", bearer(minter.token(TENANT_B)))
        assert resp.status == 503, resp
    assert servers["fhir_other"].requests == [], "a FHIR request (and its upstream token) crossed unverified TLS"
    assert servers["fhir_other"].handshakes_failed >= 1, "Envoy never even tried: the test proves nothing"
    # The token endpoint was the right one: the token was got, and never reached the wrong server.
    assert any(r["form"].get("client_secret") == SECRET for r in servers["token_right"].requests)


def test_the_recipes_system_bundle_refuses_a_certificate_from_a_ca_it_does_not_hold(tls_stack):
    env, minter, servers = tls_stack
    before = len(servers["fhir_right"].requests)
    resp = env.request("GET", "/Patient", bearer(minter.token(TENANT_D)))
    assert resp.status == 503, resp
    assert not [r for r in servers["fhir_right"].requests[before:] if r["path"].startswith("/d/")]


# ------------------------------------------------------------------------------------ scripts/check-tls.py

def _check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK_TLS), str(path)], capture_output=True, text=True)


def test_check_tls_passes_every_shipped_config_and_example():
    proc = subprocess.run([sys.executable, str(CHECK_TLS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert " 0 without peer verification" in proc.stdout and "UpstreamTlsContext" in proc.stdout


def _recipe_with(workdir: Path, name: str, edit) -> Path:
    cfg = load_yaml(RECIPES)
    for c in cfg["static_resources"]["clusters"]:
        if c["name"] == "entra":
            edit(c)
    path = workdir / name
    import yaml
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("defect, expected", [
    ("sni_only", "no common_tls_context.validation_context"),
    ("no_ca", "no trusted_ca"),
    ("no_name", "no match_typed_subject_alt_names"),
    ("accept_untrusted", "ACCEPT_UNTRUSTED"),
    ("opt_out_remote", "loopback test configs only"),
])
def test_check_tls_refuses_a_cluster_that_does_not_verify_its_peer(workdir, defect, expected):
    def edit(c):
        tc = c["transport_socket"]["typed_config"]
        vc = tc["common_tls_context"]["validation_context"]
        if defect == "sni_only":          # the recipe as it shipped before issue 24
            del tc["common_tls_context"]
        elif defect == "no_ca":
            del vc["trusted_ca"]
        elif defect == "no_name":
            del vc["match_typed_subject_alt_names"]
        elif defect == "accept_untrusted":
            vc["trust_chain_verification"] = "ACCEPT_UNTRUSTED"
        elif defect == "opt_out_remote":
            del tc["common_tls_context"]
            c["metadata"] = {"filter_metadata": {"fhir_tenant_router.check_tls": {
                "unverified_loopback": "test"}}}
    proc = _check(_recipe_with(workdir, f"check-tls-{defect}.yaml", edit))
    assert proc.returncode == 1 and "cluster entra" in proc.stderr and expected in proc.stderr, proc.stderr


def test_check_tls_accepts_the_commented_opt_out_on_a_loopback_cluster(workdir):
    def edit(c):
        del c["transport_socket"]["typed_config"]["common_tls_context"]
        c["metadata"] = {"filter_metadata": {"fhir_tenant_router.check_tls": {
            "unverified_loopback": "a loopback test server with a throwaway certificate"}}}
        c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
            "address"] = "127.0.0.1"
    proc = _check(_recipe_with(workdir, "check-tls-opt-out.yaml", edit))
    assert proc.returncode == 0, proc.stderr


def test_check_tls_refuses_an_istio_destination_rule_without_ca_or_names(workdir):
    path = workdir / "dr.yaml"
    path.write_text("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: entra}\n"
                    "spec:\n  host: login.microsoftonline.com\n  trafficPolicy:\n    tls: {mode: SIMPLE}\n")
    proc = _check(path)
    assert proc.returncode == 1 and "caCertificates" in proc.stderr and "subjectAltNames" in proc.stderr
