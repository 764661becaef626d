//! Runs Wycheproof vectors through `fhir_tenant_router::crypto::Signatures` over the shell's `HostCrypto`,
//! in mode `host`, i.e. through Envoy's `verify_signature` foreign function (BoringSSL), from inside Envoy.
//!
//! All the work happens in the root context's `on_configure`, so `envoy --mode validate` runs it. It logs one
//! line per vector file, one summary line
//! `wycheproof host: rsa <n> vectors <m> agree <d> disagree <a> acceptable, ecdsa ...`, and refuses the
//! configuration (returns false) on any disagreement, or when no "valid" vector verified (which is what a
//! host without `verify_signature` gives: mode `host` then fails closed).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use fhir_tenant_router::config::SignatureVerifier;
use fhir_tenant_router::crypto::{SignatureCheck, Signatures};
use fhir_tenant_router::jwks::{Algorithm, KeySet};
use fhir_tenant_router::shell::host_crypto::HostCrypto;
use fhir_tenant_router::shell::proxy::ProxyWasmHost;
use proxy_wasm::traits::{Context, RootContext};
use proxy_wasm::types::LogLevel;
use serde_json::Value;

const VECTORS: &str = include_str!(concat!(env!("OUT_DIR"), "/vectors.json"));

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Runner) });
}}

struct Runner;

impl Context for Runner {}

impl RootContext for Runner {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        // `{"corrupt_signatures": true}` flips a bit in every signature: the run must then fail, which the
        // end-to-end test checks to prove that this module can fail at all.
        let corrupt = self
            .get_plugin_configuration()
            .and_then(|c| serde_json::from_slice::<Value>(&c).ok())
            .is_some_and(|c| c["corrupt_signatures"] == Value::Bool(true));
        run(corrupt)
    }
}

#[derive(Default)]
struct Tally {
    vectors: usize,
    agree: usize,
    disagree: usize,
    acceptable: usize,
    acceptable_verified: usize,
    valid_verified: usize,
    skipped: usize,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.vectors += other.vectors;
        self.agree += other.agree;
        self.disagree += other.disagree;
        self.acceptable += other.acceptable;
        self.acceptable_verified += other.acceptable_verified;
        self.valid_verified += other.valid_verified;
        self.skipped += other.skipped;
    }

    fn line(&self) -> String {
        format!(
            "{} vectors {} agree {} disagree {} acceptable ({} of them verified; {} valid verified, {} skipped)",
            self.vectors,
            self.agree,
            self.disagree,
            self.acceptable,
            self.acceptable_verified,
            self.valid_verified,
            self.skipped
        )
    }
}

fn b64(v: &Value) -> Vec<u8> {
    v.as_str().and_then(|s| URL_SAFE_NO_PAD.decode(s).ok()).unwrap_or_default()
}

fn run(corrupt: bool) -> bool {
    let doc: Value = match serde_json::from_str(VECTORS) {
        Ok(v) => v,
        Err(e) => {
            log::error!("wycheproof host: vectors unreadable: {e}");
            return false;
        }
    };
    let host = Signatures::new(SignatureVerifier::Host, HostCrypto(ProxyWasmHost));
    let (mut rsa, mut ecdsa) = (Tally::default(), Tally::default());
    let mut every_file_verified_a_valid_vector = true;
    let empty = Vec::new();
    for file in doc["files"].as_array().unwrap_or(&empty) {
        let name = file["file"].as_str().unwrap_or("?");
        let Some(alg) = file["alg"].as_str().and_then(Algorithm::parse) else {
            log::error!("wycheproof host: {name}: unknown alg");
            return false;
        };
        let mut tally = Tally::default();
        for group in file["groups"].as_array().unwrap_or(&empty) {
            let tests = group["tests"].as_array().unwrap_or(&empty);
            let jwks = serde_json::json!({ "keys": [group["jwk"].clone()] }).to_string();
            let Ok(keys) = KeySet::from_jwks(jwks.as_bytes()) else {
                // Policy: RSA keys under 2048 bits are refused.
                tally.skipped += tests.len();
                continue;
            };
            let Some(key) = keys.keys().first() else { continue };
            for t in tests {
                let (id, msg, mut sig, expected) = (&t[0], b64(&t[1]), b64(&t[2]), t[3].as_str().unwrap_or("?"));
                if corrupt {
                    // A bit of r (ECDSA) or near the top of the RSA signature. Not the low bit of s: for
                    // s = (n ± 1) / 2 that gives n - s, which verifies too (ECDSA malleability).
                    if let Some(b) = sig.get_mut(1) {
                        *b ^= 1;
                    }
                }
                let verified = host.check(alg, key, &msg, &sig);
                tally.vectors += 1;
                match (expected, verified) {
                    ("valid", true) => {
                        tally.agree += 1;
                        tally.valid_verified += 1;
                    }
                    ("invalid", false) => tally.agree += 1,
                    ("acceptable", v) => {
                        tally.acceptable += 1;
                        tally.acceptable_verified += usize::from(v);
                    }
                    _ => {
                        tally.disagree += 1;
                        if tally.disagree <= 20 {
                            log::error!("wycheproof host: {name} tcId {id}: expected {expected}, verified {verified}");
                        }
                    }
                }
            }
        }
        log::info!("wycheproof host: {name} ({alg}): {}", tally.line());
        every_file_verified_a_valid_vector &= tally.valid_verified > 0;
        if file["family"] == "rsa" {
            rsa.add(&tally)
        } else {
            ecdsa.add(&tally)
        }
    }
    let ok = rsa.disagree == 0
        && ecdsa.disagree == 0
        && rsa.vectors > 0
        && ecdsa.vectors > 0
        && every_file_verified_a_valid_vector;
    let summary = format!("wycheproof host: rsa {}, ecdsa {}", rsa.line(), ecdsa.line());
    if ok {
        log::info!("{summary}");
    } else {
        log::error!("{summary}: FAILED");
    }
    ok
}
