//! [`SignatureCheck`] with ring (BoringSSL-derived assembly, natively): what the dynamic module verifies
//! with, since it has no `verify_signature` host function. Its checks count as `signature.host` (the fast
//! path), not as the pure-Rust fallback.

use std::cell::Cell;

use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};

use crate::crypto::{CheckLog, SignatureCheck};
use crate::der::spki_public_key;
use crate::jwks::{Algorithm, Key};

/// ring's verifiers.
#[derive(Debug, Default)]
pub struct Ring {
    checks: Cell<u32>,
}

fn ring_algorithm(alg: Algorithm) -> &'static dyn VerificationAlgorithm {
    match alg {
        Algorithm::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &signature::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &signature::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &signature::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &signature::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &signature::RSA_PSS_2048_8192_SHA512,
        Algorithm::ES256 => &signature::ECDSA_P256_SHA256_FIXED,
        Algorithm::ES384 => &signature::ECDSA_P384_SHA384_FIXED,
    }
}

impl SignatureCheck for Ring {
    fn check(&self, alg: Algorithm, key: &Key, signing_input: &[u8], signature: &[u8]) -> bool {
        if !key.allows(alg) {
            return false;
        }
        let Some(public) = spki_public_key(key.spki_der()) else { return false };
        self.checks.set(self.checks.get().saturating_add(1));
        UnparsedPublicKey::new(ring_algorithm(alg), public).verify(signing_input, signature).is_ok()
    }

    fn drain(&self) -> CheckLog {
        CheckLog { host: self.checks.take(), pure_rust: 0, note: None }
    }

    fn now_ns(&self) -> Option<u64> {
        Some(super::host::now_ns())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::PureRust;
    use crate::jwks::KeySet;
    use crate::testkeys;

    #[test]
    fn ring_agrees_with_the_pure_rust_verifier_on_good_and_altered_signatures() {
        let set = KeySet::from_jwks(testkeys::public_jwks().as_bytes()).unwrap();
        for (alg, token) in [
            (Algorithm::RS256, testkeys::sign_rs256(&testkeys::claims_now())),
            (Algorithm::ES256, testkeys::sign_es256(&testkeys::claims_now())),
        ] {
            let (input, sig) = testkeys::signing_parts(&token);
            let key = set.candidates(None, alg).next().unwrap();
            let ring = Ring::default();
            assert!(ring.check(alg, key, input.as_bytes(), &sig), "{alg}");
            let mut bad = sig.clone();
            bad[3] ^= 1;
            assert_eq!(ring.check(alg, key, input.as_bytes(), &bad), PureRust.check(alg, key, input.as_bytes(), &bad));
            assert!(!ring.check(alg, key, b"other input", &sig));
            assert_eq!(ring.drain().host, 3);
            assert_eq!(ring.drain().host, 0);
        }
    }
}
