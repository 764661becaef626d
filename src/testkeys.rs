//! Test fixtures: the committed TEST-ONLY signing keys (tests/keys/test-only-private-jwks.json, the same keys
//! the test IdP signs with) and tokens minted from them with jwt-simple, independently of our own code.
//! Time is pinned at [`NOW`].

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rsa::pkcs1::EncodeRsaPrivateKey as _;
use serde_json::{json, Value};

use crate::config::Provider;

/// The fixed "now" of every core test: 2026-01-01T00:00:00Z.
pub const NOW: i64 = 1_767_225_600;
pub const ISSUER: &str = "http://127.0.0.1:9000";
pub const AUDIENCE: &str = "http://127.0.0.1:10000";
pub const RS_KID: &str = "test-rs256-1";
pub const ES_KID: &str = "test-es256-1";
pub const TENANT_A: &str = "6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f";
pub const TENANT_B: &str = "3b9a7c55-1d2e-4f60-8a7b-9c0d1e2f3a4b";

const PRIVATE_JWKS: &str = include_str!("../tests/keys/test-only-private-jwks.json");

fn private_jwk(kid: &str) -> Value {
    let doc: Value = serde_json::from_str(PRIVATE_JWKS).unwrap();
    doc["keys"].as_array().unwrap().iter().find(|k| k["kid"] == kid).unwrap().clone()
}

fn b64(v: &Value) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(v.as_str().unwrap()).unwrap()
}

/// The public JWKS the IdP publishes (private members removed).
pub fn public_jwks() -> String {
    let mut rs = private_jwk(RS_KID);
    for m in ["d", "p", "q", "dp", "dq", "qi"] {
        rs.as_object_mut().unwrap().remove(m);
    }
    json!({"keys": [rs, serde_json::from_str::<Value>(&es_public_jwk()).unwrap()]}).to_string()
}

/// The public JWK of the ES256 test key.
pub fn es_public_jwk() -> String {
    let mut es = private_jwk(ES_KID);
    es.as_object_mut().unwrap().remove("d");
    es.to_string()
}

/// The provider these tokens are minted for, with the default skew.
pub fn provider() -> Provider {
    Provider::new(ISSUER, vec![AUDIENCE.into()], 60, 8192)
}

/// Signs `claims` as the IdP does (RS256, the test key), with exactly `header` as the JOSE header (its
/// `alg` and `kid` included).
pub fn sign_with_exact_header(claims: &Value, header: Value) -> String {
    compact(&header, claims, rs256_signer(rsa_private(&private_jwk(RS_KID))))
}

/// Claims of a valid token for tenant A at [`NOW`]:
/// `{"iss": ISSUER, "aud": AUDIENCE, "iat": NOW, "exp": NOW + 3600, "scope": TENANT_A, "client_id": "patients-app-a"}`
pub fn claims_now() -> Value {
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "iat": NOW, "exp": NOW + 3600,
        "scope": TENANT_A, "client_id": "patients-app-a", "jti": "test-jti-1"
    })
}

fn rsa_private(jwk: &Value) -> rsa::RsaPrivateKey {
    let n = rsa::BigUint::from_bytes_be(&b64(&jwk["n"]));
    let e = rsa::BigUint::from_bytes_be(&b64(&jwk["e"]));
    let d = rsa::BigUint::from_bytes_be(&b64(&jwk["d"]));
    let p = rsa::BigUint::from_bytes_be(&b64(&jwk["p"]));
    let q = rsa::BigUint::from_bytes_be(&b64(&jwk["q"]));
    rsa::RsaPrivateKey::from_components(n, e, d, vec![p, q]).unwrap()
}

fn compact(header: &Value, claims: &Value, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
    let input =
        format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
    let sig = sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

/// An RS256 token (test key, `typ` JWT) over `payload` exactly as given: JSON a serializer would never write
/// (duplicate members, odd number forms), as a sloppy or hostile IdP might sign it.
pub fn sign_raw_payload(payload: &str) -> String {
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": RS_KID});
    let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(payload));
    let sig = rs256_signer(rsa_private(&private_jwk(RS_KID)))(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

fn rs256_signer(key: rsa::RsaPrivateKey) -> impl FnOnce(&[u8]) -> Vec<u8> {
    move |msg| {
        use rsa::signature::{SignatureEncoding, Signer};
        let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(key);
        signer.sign(msg).to_vec()
    }
}

/// A compact token's signing input and its decoded signature (what a `SignatureCheck` takes).
pub fn signing_parts(token: &str) -> (String, Vec<u8>) {
    use base64::Engine as _;
    let (input, sig) = token.rsplit_once('.').unwrap();
    (input.to_string(), base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig).unwrap())
}

/// An RS256 token over `claims`, minted by jwt-simple with the test RSA key.
pub fn sign_rs256(claims: &Value) -> String {
    use jwt_simple::prelude::*;
    let der = rsa_private(&private_jwk(RS_KID)).to_pkcs1_der().unwrap();
    let key = RS256KeyPair::from_der(der.as_bytes()).unwrap().with_key_id(RS_KID);
    sign_jwt_simple(claims, |c| key.sign(c))
}

/// An ES256 token over `claims`, minted by jwt-simple with the test EC key.
pub fn sign_es256(claims: &Value) -> String {
    use jwt_simple::prelude::*;
    let d = b64(&private_jwk(ES_KID)["d"]);
    let key = ES256KeyPair::from_bytes(&d).unwrap().with_key_id(ES_KID);
    sign_jwt_simple(claims, |c| key.sign(c))
}

/// jwt-simple wants its own claims type: lift ours into it (standard claims plus the rest as custom claims).
fn sign_jwt_simple(
    claims: &Value,
    sign: impl FnOnce(jwt_simple::claims::JWTClaims<Value>) -> Result<String, jwt_simple::Error>,
) -> String {
    use jwt_simple::prelude::*;
    let mut custom = claims.clone();
    let obj = custom.as_object_mut().unwrap();
    let mut c = JWTClaims {
        issued_at: None,
        expires_at: None,
        invalid_before: None,
        issuer: None,
        subject: None,
        audiences: None,
        jwt_id: None,
        nonce: None,
        custom: Value::Null,
    };
    // Numeric dates that are integers go through jwt-simple's own fields; anything odd stays custom.
    if let Some(v) = obj.get("exp").and_then(Value::as_u64) {
        c.expires_at = Some(UnixTimeStamp::from_secs(v));
        obj.remove("exp");
    }
    if let Some(v) = obj.get("nbf").and_then(Value::as_u64) {
        c.invalid_before = Some(UnixTimeStamp::from_secs(v));
        obj.remove("nbf");
    }
    if let Some(v) = obj.get("iat").and_then(Value::as_u64) {
        c.issued_at = Some(UnixTimeStamp::from_secs(v));
        obj.remove("iat");
    }
    c.custom = custom;
    sign(c).unwrap()
}

/// An RS256 token signed with the test key, with extra header members.
pub fn sign_with_header(claims: &Value, extra: Value) -> String {
    let mut header = json!({"alg": "RS256", "typ": "JWT", "kid": RS_KID});
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            header.as_object_mut().unwrap().remove(k);
        } else {
            header[k] = v.clone();
        }
    }
    compact(&header, claims, rs256_signer(rsa_private(&private_jwk(RS_KID))))
}

fn fresh_rsa() -> rsa::RsaPrivateKey {
    rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap()
}

/// An RS256 token signed with a freshly generated key (not in the JWKS) under `kid`.
pub fn sign_rs256_with_fresh_key(claims: &Value, kid: &str) -> String {
    compact(&json!({"alg": "RS256", "typ": "JWT", "kid": kid}), claims, rs256_signer(fresh_rsa()))
}

/// An RS256 token signed with a fresh key, with the given header members.
pub fn sign_rs256_with_fresh_key_and_header(claims: &Value, extra: Value) -> String {
    let mut header = json!({"alg": "RS256", "typ": "JWT"});
    for (k, v) in extra.as_object().unwrap() {
        header[k] = v.clone();
    }
    compact(&header, claims, rs256_signer(fresh_rsa()))
}

/// The test RSA key as a PKCS#8 PEM private key (what an operator puts in a file or variable).
pub fn rsa_private_pem() -> String {
    use rsa::pkcs8::EncodePrivateKey as _;
    rsa_private(&private_jwk(RS_KID)).to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).unwrap().to_string()
}

/// The test RSA key's public half as a PEM (SPKI).
pub fn rsa_public_pem() -> String {
    use rsa::pkcs8::EncodePublicKey as _;
    rsa_private(&private_jwk(RS_KID)).to_public_key().to_public_key_pem(rsa::pkcs8::LineEnding::LF).unwrap()
}
