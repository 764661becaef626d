"""The upstream-credential recipes of docs/configuration.md (examples/upstream-auth/envoy.yaml): Azure Health
Data Services, Epic backend services, Google Cloud Healthcare API, AWS HealthLake (Envoy's aws_request_signing
after our filter, on the HealthLake route only) and HAPI with a static header. The clouds cannot be reached here, so
what is proven is what Envoy and the module check at load: `envoy --mode validate` accepts the file with
placeholder secrets in Envoy's environment, and refuses it, naming the field, when one is missing."""
from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harness import REPO, envoy_validate, load_yaml, plugin_json

RECIPES = REPO / "examples" / "upstream-auth" / "envoy.yaml"

def _placeholder_env() -> dict[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    pkcs1 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                              serialization.NoEncryption()).decode()
    service_account = {"type": "service_account", "client_email": "fhir-router@my-project.iam.gserviceaccount.com",
                       "private_key": pem, "token_uri": "https://oauth2.googleapis.com/token"}
    return {"AZURE_FHIR_CLIENT_SECRET": "placeholder-secret", "EPIC_PRIVATE_KEY": pkcs1,
            "GOOGLE_SERVICE_ACCOUNT_KEY": json.dumps(service_account), "HAPI_API_KEY": "placeholder-key"}


def test_the_recipes_load_in_envoy_with_their_secrets_in_the_environment(wasm):
    env = _placeholder_env()
    proc = envoy_validate(RECIPES, extra_env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for value in env.values():
        assert value.splitlines()[0 if len(value.splitlines()) == 1 else 1] not in out, "a secret was printed"


def test_the_recipes_follow_the_config_schema():
    import jsonschema
    schema = json.loads((REPO / "docs" / "config.schema.json").read_text(encoding="utf-8"))
    doc = plugin_json(load_yaml(RECIPES))
    errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]
    assert not errors, errors
    methods = {t.get("upstream_auth", {}).get("method") for t in doc["tenants"].values()}
    assert methods == {"client_secret_post", "private_key_jwt", "jwt_bearer", None}


@pytest.mark.parametrize("missing", ["AZURE_FHIR_CLIENT_SECRET", "EPIC_PRIVATE_KEY", "GOOGLE_SERVICE_ACCOUNT_KEY"])
def test_a_missing_secret_makes_envoy_refuse_the_plugin_naming_the_tenants_field(missing, wasm):
    env = _placeholder_env()
    del env[missing]
    proc = envoy_validate(RECIPES, extra_env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    field = {"AZURE_FHIR_CLIENT_SECRET": "11111111-1111-1111-1111-111111111111.upstream_auth.client_secret.env",
             "EPIC_PRIVATE_KEY": "22222222-2222-2222-2222-222222222222.upstream_auth.private_key.env",
             "GOOGLE_SERVICE_ACCOUNT_KEY": "33333333-3333-3333-3333-333333333333.upstream_auth.private_key.env"}[missing]
    assert f"tenants.{field}" in out and missing in out, out[-3000:]
