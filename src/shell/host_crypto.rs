//! [`SignatureCheck`] over Envoy's `verify_signature` foreign function (BoringSSL), with the pure-Rust
//! verifier as the fallback: for hosts without the function, and for RSA-PSS, which the host cannot do
//! (it verifies RSA with PKCS#1 v1.5 padding only).

use std::cell::Cell;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

use crate::config::SignatureVerifier;
use crate::crypto::{PureRust, SignatureCheck};
use crate::der::ecdsa_raw_to_der;
use crate::host_proto::{decode_verify_result, encode_verify_arguments};
use crate::jwks::{Algorithm, Key};

use super::metrics::Metrics;

/// Checks signatures with the host where it can.
pub struct HostSignatures {
    mode: SignatureVerifier,
    host_available: Cell<bool>,
    metrics: Rc<Metrics>,
}

impl HostSignatures {
    pub fn new(mode: SignatureVerifier, metrics: Rc<Metrics>) -> Self {
        Self { mode, host_available: Cell::new(true), metrics }
    }

    fn pure(&self, alg: Algorithm, key: &Key, input: &[u8], signature: &[u8]) -> bool {
        self.metrics.count(self.metrics.signature_pure_rust);
        PureRust.check(alg, key, input, signature)
    }
}

impl SignatureCheck for HostSignatures {
    fn check(&self, alg: Algorithm, key: &Key, input: &[u8], raw_signature: &[u8]) -> bool {
        let host_can = !matches!(alg, Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512);
        if self.mode == SignatureVerifier::PureRust || !host_can {
            return self.pure(alg, key, input, raw_signature);
        }
        if !self.host_available.get() {
            // A host without the function: `auto` falls back, `host` fails closed.
            return self.mode == SignatureVerifier::Auto && self.pure(alg, key, input, raw_signature);
        }
        if !key.allows(alg) {
            return false;
        }
        let der;
        let signature = match alg {
            Algorithm::ES256 | Algorithm::ES384 => {
                let scalar = if alg == Algorithm::ES256 { 32 } else { 48 };
                match ecdsa_raw_to_der(raw_signature, scalar) {
                    Some(d) => {
                        der = d;
                        der.as_slice()
                    }
                    None => return false,
                }
            }
            _ => raw_signature,
        };
        let args = encode_verify_arguments(alg.hash_name(), key.spki_der(), signature, input);
        self.metrics.count(self.metrics.signature_host);
        match hostcalls::call_foreign_function("verify_signature", Some(&args)) {
            Ok(Some(result)) => decode_verify_result(&result).unwrap_or(false),
            Ok(None) => false,
            Err(Status::NotFound) => {
                self.host_available.set(false);
                if self.mode == SignatureVerifier::Host {
                    log::error!(
                        "the host has no verify_signature function and signature_verifier is \"host\": refusing tokens"
                    );
                    false
                } else {
                    log::warn!("the host has no verify_signature function: using the pure-Rust verifier");
                    self.pure(alg, key, input, raw_signature)
                }
            }
            // BadArgument: the host could not import the key. Fail closed; the key set is ours, so this is a bug.
            Err(_) => false,
        }
    }
}
