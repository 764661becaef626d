//! The committed TEST-ONLY keys (tests/keys/), the demo's issuer, audience and tenants, and token minting.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use fhir_tenant_router::jwks::KeySet;
use fhir_tenant_router::Config;
use serde_json::{json, Value};

/// The fixed "now": 2026-01-01T00:00:00Z.
pub const NOW: i64 = 1_767_225_600;
pub const ISSUER: &str = "http://127.0.0.1:9000";
pub const AUDIENCE: &str = "http://127.0.0.1:10000";
pub const RS_KID: &str = "test-rs256-1";
pub const ES_KID: &str = "test-es256-1";
pub const TENANT_A: &str = "6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f";
pub const TENANT_B: &str = "3b9a7c55-1d2e-4f60-8a7b-9c0d1e2f3a4b";

const PRIVATE_JWKS: &str = include_str!("../../tests/keys/test-only-private-jwks.json");

fn private_jwk(kid: &str) -> Value {
    let doc: Value = serde_json::from_str(PRIVATE_JWKS).expect("test JWKS is JSON");
    doc["keys"].as_array().expect("keys").iter().find(|k| k["kid"] == kid).expect("kid present").clone()
}

fn b64_field(v: &Value) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(v.as_str().expect("string")).expect("base64url")
}

/// The public JWKS the IdP publishes.
pub fn public_jwks() -> Value {
    let mut rs = private_jwk(RS_KID);
    let mut es = private_jwk(ES_KID);
    for m in ["d", "p", "q", "dp", "dq", "qi"] {
        rs.as_object_mut().expect("object").remove(m);
        es.as_object_mut().expect("object").remove(m);
    }
    json!({ "keys": [rs, es] })
}

pub fn keys() -> KeySet {
    KeySet::from_jwks(public_jwks().to_string().as_bytes()).expect("test JWKS compiles")
}

/// A complete configuration with the keys inline, two tenants and the default prefixes.
pub fn config_json() -> Value {
    json!({
        "provider": { "issuer": ISSUER, "audiences": [AUDIENCE], "jwks": public_jwks(), "clock_skew_s": 60 },
        "tenants": { TENANT_A: { "cluster": "tenant_a" }, TENANT_B: { "cluster": "tenant_b" } },
        "metadata_cluster": "fhir_metadata"
    })
}

/// The same with a remote JWKS and every optional field set.
pub fn remote_config_json() -> Value {
    json!({
        "provider": {
            "issuer": ISSUER, "audiences": [AUDIENCE, "api://fhir"],
            "jwks_uri": "http://127.0.0.1:9000/jwks?x=1", "jwks_cluster": "idp",
            "jwks_refresh_s": 300, "jwks_timeout_ms": 5000, "clock_skew_s": 0, "max_token_bytes": 8192,
            "jwks_min_refetch_s": 30
        },
        "tenants": { TENANT_A: { "cluster": "tenant_a" }, "Tenant.B_2": { "cluster": "tenant_b" } },
        "tenant_claim": "scp",
        "tenant_scope_prefixes": ["", "tenant/", "patient/"],
        "metadata_cluster": "fhir_metadata",
        "route_header": "x-route", "tenant_header": "x-tenant",
        "forward_authorization": true, "signature_verifier": "pure_rust", "token_cache_entries": 10
    })
}

pub fn config() -> Config {
    Config::from_json(config_json().to_string().as_bytes()).expect("test config compiles")
}

/// Claims of a valid token for tenant A at [`NOW`].
pub fn claims_now() -> Value {
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "iat": NOW, "exp": NOW + 3600,
        "scope": TENANT_A, "client_id": "patients-app-a", "jti": "fuzz-jti-1"
    })
}

/// `BASE64URL(h).BASE64URL(p).BASE64URL(s)`.
pub fn compact_raw(h: &[u8], p: &[u8], s: &[u8]) -> String {
    format!("{}.{}.{}", URL_SAFE_NO_PAD.encode(h), URL_SAFE_NO_PAD.encode(p), URL_SAFE_NO_PAD.encode(s))
}

/// The test private keys, ready to sign.
pub struct Signers {
    rsa: rsa::pkcs1v15::SigningKey<sha2::Sha256>,
    es: p256::ecdsa::SigningKey,
}

impl Default for Signers {
    fn default() -> Self {
        Self::new()
    }
}

impl Signers {
    pub fn new() -> Self {
        let jwk = private_jwk(RS_KID);
        let big = |m: &str| rsa::BigUint::from_bytes_be(&b64_field(&jwk[m]));
        let private = rsa::RsaPrivateKey::from_components(big("n"), big("e"), big("d"), vec![big("p"), big("q")])
            .expect("RSA test key");
        let d = b64_field(&private_jwk(ES_KID)["d"]);
        let es = p256::ecdsa::SigningKey::from_slice(&d).expect("EC test key");
        Self { rsa: rsa::pkcs1v15::SigningKey::new(private), es }
    }

    /// RS256 signature of `input` (slow: about a millisecond).
    pub fn rs256(&self, input: &[u8]) -> Vec<u8> {
        use rsa::signature::{SignatureEncoding as _, Signer as _};
        self.rsa.sign(input).to_vec()
    }

    /// ES256 signature of `input`, raw `r || s`.
    pub fn es256(&self, input: &[u8]) -> Vec<u8> {
        use p256::ecdsa::signature::Signer as _;
        let sig: p256::ecdsa::Signature = self.es.sign(input);
        sig.to_bytes().to_vec()
    }

    /// A compact JWS over the given header and claims JSON bytes; `rsa` picks the key.
    pub fn sign(&self, header: &[u8], claims: &[u8], rsa: bool) -> (String, String) {
        let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
        let sig = if rsa { self.rs256(input.as_bytes()) } else { self.es256(input.as_bytes()) };
        let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig));
        (token, input)
    }

    /// A valid ES256 token with the `kid` of the test key.
    pub fn es256_token(&self, claims: &Value) -> (String, String) {
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": ES_KID});
        self.sign(header.to_string().as_bytes(), claims.to_string().as_bytes(), false)
    }

    /// A valid RS256 token with the `kid` of the test key.
    pub fn rs256_token(&self, claims: &Value) -> (String, String) {
        let header = json!({"alg": "RS256", "typ": "at+jwt", "kid": RS_KID});
        self.sign(header.to_string().as_bytes(), claims.to_string().as_bytes(), true)
    }
}
