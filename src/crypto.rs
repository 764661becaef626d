//! Signature checking behind a small trait, so that the core runs natively with pure Rust in tests and with
//! Envoy's BoringSSL (`verify_signature`) inside Envoy.

use std::cell::Cell;

use rsa::signature::Verifier as _;

use crate::config::SignatureVerifier;
use crate::der::ecdsa_raw_to_der;
use crate::jwks::{Algorithm, Key, KeyMaterial};

/// Checks one JWS signature. `signing_input` is `BASE64URL(header) || '.' || BASE64URL(payload)`, and
/// `signature` the decoded third part, in its JWS form (raw `r || s` for ECDSA).
pub trait SignatureCheck {
    /// `true` only when `signature` is a valid `alg` signature of `signing_input` under `key`.
    fn check(&self, alg: Algorithm, key: &Key, signing_input: &[u8], signature: &[u8]) -> bool;

    /// What the checker did since it was last asked, for the stats and the log (and resets it).
    fn drain(&self) -> CheckLog {
        CheckLog::default()
    }

    /// A clock for the verify time (`span_tags`), in nanoseconds from any fixed point; read only when that
    /// option is on (it may be a host call). `None`: no clock, no verify time.
    fn now_ns(&self) -> Option<u64> {
        None
    }
}

/// Signature checks done by a [`Signatures`] since it was last drained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckLog {
    /// Checks done by the host (`verify_signature`).
    pub host: u32,
    /// Checks done in pure Rust.
    pub pure_rust: u32,
    /// A line to log once, with its severity (`true`: an error): the host turned out to lack the function.
    pub note: Option<(bool, &'static str)>,
}

/// What the host's signature function answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostVerdict {
    /// It checked: valid or not.
    Checked(bool),
    /// The host has no such function.
    Unavailable,
    /// It could not check (e.g. the key was not importable): fail closed.
    Failed,
}

/// A host's signature function (Envoy's `verify_signature`, BoringSSL): SHA-`hash` over `input`, a DER
/// `SubjectPublicKeyInfo`, and the signature in DER (ECDSA) or raw (RSA PKCS#1 v1.5) form.
pub trait HostVerify {
    fn verify(&self, hash: &str, spki_der: &[u8], signature: &[u8], input: &[u8]) -> HostVerdict;

    /// The host's clock in nanoseconds, for [`SignatureCheck::now_ns`].
    fn now_ns(&self) -> Option<u64> {
        None
    }
}

/// The policy for checking signatures with a host: the host where it can (RSA PKCS#1 v1.5 and ECDSA), pure
/// Rust for RSA-PSS (the host pads PKCS#1 v1.5 only), and for everything when the host lacks the function
/// and the mode is `auto` (`host` then fails closed; `pure_rust` never asks the host).
pub struct Signatures<H> {
    mode: SignatureVerifier,
    host: H,
    host_available: Cell<bool>,
    log: Cell<CheckLog>,
}

impl<H: HostVerify> Signatures<H> {
    pub fn new(mode: SignatureVerifier, host: H) -> Self {
        Self { mode, host, host_available: Cell::new(true), log: Cell::new(CheckLog::default()) }
    }

    fn note(&self, f: impl FnOnce(&mut CheckLog)) {
        let mut log = self.log.get();
        f(&mut log);
        self.log.set(log);
    }

    fn pure(&self, alg: Algorithm, key: &Key, input: &[u8], signature: &[u8]) -> bool {
        self.note(|l| l.pure_rust = l.pure_rust.saturating_add(1));
        PureRust.check(alg, key, input, signature)
    }
}

impl<H: HostVerify> SignatureCheck for Signatures<H> {
    fn check(&self, alg: Algorithm, key: &Key, input: &[u8], raw_signature: &[u8]) -> bool {
        let host_can = !matches!(alg, Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512);
        if self.mode == SignatureVerifier::PureRust || !host_can {
            return self.pure(alg, key, input, raw_signature);
        }
        if !self.host_available.get() {
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
        self.note(|l| l.host = l.host.saturating_add(1));
        match self.host.verify(alg.hash_name(), key.spki_der(), signature, input) {
            HostVerdict::Checked(valid) => valid,
            HostVerdict::Failed => false,
            HostVerdict::Unavailable => {
                self.host_available.set(false);
                if self.mode == SignatureVerifier::Host {
                    self.note(|l| {
                        l.note = Some((
                            true,
                            "the host has no verify_signature function and signature_verifier is \"host\": refusing tokens",
                        ))
                    });
                    false
                } else {
                    self.note(|l| {
                        l.note =
                            Some((false, "the host has no verify_signature function: using the pure-Rust verifier"))
                    });
                    self.pure(alg, key, input, raw_signature)
                }
            }
        }
    }

    fn drain(&self) -> CheckLog {
        self.log.take()
    }

    fn now_ns(&self) -> Option<u64> {
        self.host.now_ns()
    }
}

/// Pure-Rust verification (RustCrypto `rsa`, `p256`, `p384`): portable, and about 1 ms per RSA check in V8.
#[derive(Clone, Copy, Debug, Default)]
pub struct PureRust;

impl SignatureCheck for PureRust {
    fn check(&self, alg: Algorithm, key: &Key, signing_input: &[u8], signature: &[u8]) -> bool {
        if !key.allows(alg) {
            return false;
        }
        match key.material() {
            KeyMaterial::Rsa(public) => verify_rsa(alg, public, signing_input, signature),
            KeyMaterial::P256(public) => p256::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|sig| public.verify(signing_input, &sig).is_ok()),
            #[cfg(not(feature = "p384-pure-rust"))]
            KeyMaterial::P384 => false,
            #[cfg(feature = "p384-pure-rust")]
            KeyMaterial::P384(public) => p384::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|sig| public.verify(signing_input, &sig).is_ok()),
        }
    }
}

fn verify_rsa(alg: Algorithm, public: &rsa::RsaPublicKey, msg: &[u8], signature: &[u8]) -> bool {
    use rsa::{pkcs1v15, pss};
    use sha2::{Sha256, Sha384, Sha512};
    macro_rules! check {
        ($scheme:ident, $hash:ty) => {
            $scheme::Signature::try_from(signature)
                .is_ok_and(|sig| $scheme::VerifyingKey::<$hash>::new(public.clone()).verify(msg, &sig).is_ok())
        };
    }
    match alg {
        Algorithm::RS256 => check!(pkcs1v15, Sha256),
        Algorithm::RS384 => check!(pkcs1v15, Sha384),
        Algorithm::RS512 => check!(pkcs1v15, Sha512),
        Algorithm::PS256 => check!(pss, Sha256),
        Algorithm::PS384 => check!(pss, Sha384),
        Algorithm::PS512 => check!(pss, Sha512),
        Algorithm::ES256 | Algorithm::ES384 => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwks::KeySet;
    use crate::testkeys::{self, signing_parts as parts};

    #[test]
    fn pure_rust_accepts_good_signatures_and_refuses_altered_ones() {
        let set = KeySet::from_jwks(testkeys::public_jwks().as_bytes()).unwrap();
        for (alg, token) in [
            (Algorithm::RS256, testkeys::sign_rs256(&testkeys::claims_now())),
            (Algorithm::ES256, testkeys::sign_es256(&testkeys::claims_now())),
        ] {
            let (input, sig) = parts(&token);
            let key = set.candidates(None, alg).next().unwrap();
            assert!(PureRust.check(alg, key, input.as_bytes(), &sig), "{alg}");
            let mut altered = input.clone().into_bytes();
            altered[5] ^= 1;
            assert!(!PureRust.check(alg, key, &altered, &sig), "{alg} altered input");
            let mut bad_sig = sig.clone();
            bad_sig[0] ^= 1;
            assert!(!PureRust.check(alg, key, input.as_bytes(), &bad_sig), "{alg} altered signature");
            assert!(!PureRust.check(alg, key, input.as_bytes(), &sig[1..]), "{alg} short signature");
        }
    }

    /// A host that answers every check with one verdict, and counts the calls.
    struct FixedHost(HostVerdict, Cell<u32>);

    impl HostVerify for FixedHost {
        fn verify(&self, _: &str, _: &[u8], _: &[u8], _: &[u8]) -> HostVerdict {
            self.1.set(self.1.get() + 1);
            self.0
        }
    }

    #[test]
    fn the_host_checks_where_it_can_and_pure_rust_covers_the_rest_by_mode() {
        let set = KeySet::from_jwks(testkeys::public_jwks().as_bytes()).unwrap();
        let (input, sig) = parts(&testkeys::sign_rs256(&testkeys::claims_now()));
        let key = set.candidates(None, Algorithm::RS256).next().unwrap();
        // The host says "invalid": its verdict stands (pure Rust would have said valid).
        let s = Signatures::new(SignatureVerifier::Auto, FixedHost(HostVerdict::Checked(false), Cell::new(0)));
        assert!(!s.check(Algorithm::RS256, key, input.as_bytes(), &sig));
        assert_eq!(s.drain(), CheckLog { host: 1, pure_rust: 0, note: None });
        assert_eq!(s.drain(), CheckLog::default(), "drained");
        // No function: auto falls back (once noted, never asked again); host fails closed.
        let s = Signatures::new(SignatureVerifier::Auto, FixedHost(HostVerdict::Unavailable, Cell::new(0)));
        assert!(s.check(Algorithm::RS256, key, input.as_bytes(), &sig));
        assert!(s.check(Algorithm::RS256, key, input.as_bytes(), &sig));
        assert_eq!(s.host.1.get(), 1);
        let log = s.drain();
        assert_eq!((log.host, log.pure_rust, log.note.map(|n| n.0)), (1, 2, Some(false)));
        let s = Signatures::new(SignatureVerifier::Host, FixedHost(HostVerdict::Unavailable, Cell::new(0)));
        assert!(!s.check(Algorithm::RS256, key, input.as_bytes(), &sig));
        assert!(!s.check(Algorithm::RS256, key, input.as_bytes(), &sig));
        assert_eq!(s.drain().note.map(|n| n.0), Some(true));
        // A failed host call fails closed; pure_rust mode never asks the host.
        let s = Signatures::new(SignatureVerifier::Auto, FixedHost(HostVerdict::Failed, Cell::new(0)));
        assert!(!s.check(Algorithm::RS256, key, input.as_bytes(), &sig));
        let s = Signatures::new(SignatureVerifier::PureRust, FixedHost(HostVerdict::Failed, Cell::new(0)));
        assert!(s.check(Algorithm::RS256, key, input.as_bytes(), &sig));
        assert_eq!(s.host.1.get(), 0);
    }

    #[test]
    fn a_key_never_checks_another_algorithm_family() {
        let set = KeySet::from_jwks(testkeys::public_jwks().as_bytes()).unwrap();
        let token = testkeys::sign_rs256(&testkeys::claims_now());
        let (input, sig) = parts(&token);
        let rsa_key = set.candidates(None, Algorithm::RS256).next().unwrap();
        assert!(!PureRust.check(Algorithm::ES256, rsa_key, input.as_bytes(), &sig));
        assert!(!PureRust.check(Algorithm::PS256, rsa_key, input.as_bytes(), &sig));
    }
}
