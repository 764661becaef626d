//! The IdP's signing keys: a JWK Set (RFC 7517) compiled once into keys ready to verify with.
//!
//! Each usable key keeps its `kid`, the algorithm it is bound to (the JWK's `alg`, or the family its type
//! allows), the parsed key for the pure-Rust verifier and its DER SubjectPublicKeyInfo for the host's.
//! Keys this filter cannot or must not use (encryption keys, symmetric keys, unknown types, RSA under 2048
//! bits) are skipped; a set left with no usable key is an error.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rsa::traits::PublicKeyParts as _;
use serde::Deserialize;

use crate::der;

/// Largest JWKS document accepted, in bytes.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Most keys kept from one JWKS.
pub const MAX_KEYS: usize = 64;
/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// A JWS signature algorithm this filter accepts. `none` and every HMAC algorithm are deliberately absent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
}

impl Algorithm {
    /// Parses a JWS `alg` value, case-sensitively (`none`, `None`, `HS256` … are all refused).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "RS256" => Self::RS256,
            "RS384" => Self::RS384,
            "RS512" => Self::RS512,
            "PS256" => Self::PS256,
            "PS384" => Self::PS384,
            "PS512" => Self::PS512,
            "ES256" => Self::ES256,
            "ES384" => Self::ES384,
            _ => return None,
        })
    }

    /// The name of its hash, as Envoy's `verify_signature` spells it.
    pub fn hash_name(self) -> &'static str {
        match self {
            Self::RS256 | Self::PS256 | Self::ES256 => "sha256",
            Self::RS384 | Self::PS384 | Self::ES384 => "sha384",
            Self::RS512 | Self::PS512 => "sha512",
        }
    }

    fn is_rsa(self) -> bool {
        matches!(self, Self::RS256 | Self::RS384 | Self::RS512 | Self::PS256 | Self::PS384 | Self::PS512)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The public key itself, parsed for the pure-Rust verifier.
#[derive(Clone, Debug)]
pub enum KeyMaterial {
    Rsa(rsa::RsaPublicKey),
    P256(p256::ecdsa::VerifyingKey),
    #[cfg(feature = "p384-pure-rust")]
    P384(p384::ecdsa::VerifyingKey),
    /// A P-384 key in a build without pure-Rust P-384: only the host can verify with it (its SPKI).
    #[cfg(not(feature = "p384-pure-rust"))]
    P384,
}

/// One verification key from the JWKS.
#[derive(Clone, Debug)]
pub struct Key {
    kid: Option<String>,
    alg: Option<Algorithm>,
    material: KeyMaterial,
    spki_der: Vec<u8>,
    fingerprint: u64,
}

impl Key {
    /// The key's `kid`, if the JWK had one.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The parsed key.
    pub fn material(&self) -> &KeyMaterial {
        &self.material
    }

    /// A short identity of the key material (the first 8 bytes of the SHA-256 of its SubjectPublicKeyInfo),
    /// to tell whether a key is still in a refreshed JWKS whatever its `kid`.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// DER SubjectPublicKeyInfo, for hosts that import keys in that form.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// Whether a token signed with `alg` may be checked with this key: the JWK's own `alg` when it has one,
    /// otherwise the algorithms its type and curve allow.
    pub fn allows(&self, alg: Algorithm) -> bool {
        if let Some(bound) = self.alg {
            return bound == alg;
        }
        match self.material {
            KeyMaterial::Rsa(_) => alg.is_rsa(),
            KeyMaterial::P256(_) => alg == Algorithm::ES256,
            #[cfg(feature = "p384-pure-rust")]
            KeyMaterial::P384(_) => alg == Algorithm::ES384,
            #[cfg(not(feature = "p384-pure-rust"))]
            KeyMaterial::P384 => alg == Algorithm::ES384,
        }
    }
}

/// Whether `signature_verifier: "pure_rust"` checks ES384 (P-384) signatures in this build. The wasm module
/// `make build` ships leaves pure-Rust P-384 out (Envoy's BoringSSL checks ES384 there under `auto` and
/// `host`); the dynamic module checks every signature with ring, whatever `signature_verifier` says.
pub const PURE_RUST_CHECKS_P384: bool = cfg!(any(feature = "p384-pure-rust", feature = "dynamic-module"));

/// A compiled JWK Set.
#[derive(Clone, Debug, Default)]
pub struct KeySet {
    keys: Vec<Key>,
    skipped: usize,
}

/// Why a JWKS document could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum JwksError {
    /// Larger than [`MAX_JWKS_BYTES`].
    TooLarge,
    /// Not a JSON object with a `keys` array.
    NotAJwks(String),
    /// Parsed, but not one key in it can verify a signature.
    NoUsableKey { skipped: usize },
}

impl fmt::Display for JwksError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge => write!(f, "JWKS larger than {MAX_JWKS_BYTES} bytes"),
            Self::NotAJwks(why) => write!(f, "not a JWK Set: {why}"),
            Self::NoUsableKey { skipped } => {
                write!(f, "no usable signing key in the JWK Set ({skipped} skipped: wrong type, use, alg or size)")
            }
        }
    }
}

impl std::error::Error for JwksError {}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

/// The members of a JWK this filter reads; the rest (x5c, x5t, key_ops, …) are ignored.
#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

impl KeySet {
    /// Parses and compiles a JWKS document.
    pub fn from_jwks(bytes: &[u8]) -> Result<Self, JwksError> {
        if bytes.len() > MAX_JWKS_BYTES {
            return Err(JwksError::TooLarge);
        }
        let raw: RawJwks = serde_json::from_slice(bytes)
            .map_err(|e| JwksError::NotAJwks(crate::redact::serde_message(&e.to_string())))?;
        Self::from_raw(raw)
    }

    /// Compiles an already parsed JWKS (the inline form in the plugin configuration).
    pub fn from_value(value: &serde_json::Value) -> Result<Self, JwksError> {
        let raw = RawJwks::deserialize(value)
            .map_err(|e| JwksError::NotAJwks(crate::redact::serde_message(&e.to_string())))?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawJwks) -> Result<Self, JwksError> {
        let mut set = KeySet::default();
        for value in raw.keys {
            match RawJwk::deserialize(&value).ok().and_then(compile_key) {
                Some(key) if set.keys.len() < MAX_KEYS => set.keys.push(key),
                _ => set.skipped += 1,
            }
        }
        if set.keys.is_empty() {
            return Err(JwksError::NoUsableKey { skipped: set.skipped });
        }
        Ok(set)
    }

    /// The usable keys, in document order.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// How many JWKs were skipped as unusable.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// The keys a token may be checked with: the one named by `kid` (when the token has one) that allows
    /// `alg`; without a `kid`, every key that allows `alg`.
    pub fn candidates<'a>(&'a self, kid: Option<&'a str>, alg: Algorithm) -> impl Iterator<Item = &'a Key> + 'a {
        self.keys.iter().filter(move |k| k.allows(alg) && (kid.is_none() || k.kid() == kid))
    }

    /// The fingerprints of every key, for dropping cache entries of keys that have left the set.
    pub fn fingerprints(&self) -> Vec<u64> {
        self.keys.iter().map(Key::fingerprint).collect()
    }

    /// Whether some key carries this `kid`, whatever its algorithm.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid() == Some(kid))
    }

    /// The keys a pure-Rust-only verifier cannot check when it lacks P-384 (`checks_p384` false: see
    /// [`PURE_RUST_CHECKS_P384`]), named for a message: `kid "…"`, or the key's place in the set.
    pub fn beyond_pure_rust(&self, checks_p384: bool) -> impl Iterator<Item = String> + '_ {
        let p384 = |k: &Key| {
            #[cfg(feature = "p384-pure-rust")]
            return matches!(k.material, KeyMaterial::P384(_));
            #[cfg(not(feature = "p384-pure-rust"))]
            return matches!(k.material, KeyMaterial::P384);
        };
        self.keys.iter().enumerate().filter(move |(_, k)| !checks_p384 && p384(k)).map(|(i, k)| match k.kid() {
            Some(kid) => format!("kid {kid:?}"),
            None => format!("key #{i} (no kid)"),
        })
    }
}

fn fingerprint(spki_der: &[u8]) -> u64 {
    use sha2::Digest as _;
    sha2::Sha256::digest(spki_der).iter().take(8).fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

fn b64(field: Option<&String>) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(field?.as_bytes()).ok()
}

fn compile_key(jwk: RawJwk) -> Option<Key> {
    if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
        return None;
    }
    let alg = match jwk.alg.as_deref() {
        None => None,
        Some(name) => Some(Algorithm::parse(name)?),
    };
    let (material, spki_der) = match jwk.kty.as_str() {
        "RSA" => {
            let n = b64(jwk.n.as_ref())?;
            let e = b64(jwk.e.as_ref())?;
            let key = rsa::RsaPublicKey::new(rsa::BigUint::from_bytes_be(&n), rsa::BigUint::from_bytes_be(&e)).ok()?;
            if key.size().checked_mul(8)? < MIN_RSA_BITS {
                return None;
            }
            let spki = der::rsa_spki(&n, &e);
            (KeyMaterial::Rsa(key), spki)
        }
        "EC" => {
            let x = b64(jwk.x.as_ref())?;
            let y = b64(jwk.y.as_ref())?;
            let mut point = Vec::with_capacity(1 + x.len() + y.len());
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            match jwk.crv.as_deref()? {
                "P-256" if x.len() == 32 && y.len() == 32 => {
                    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).ok()?;
                    (KeyMaterial::P256(key), der::ec_spki(der::OID_P256, &point))
                }
                "P-384" if x.len() == 48 && y.len() == 48 => {
                    #[cfg(feature = "p384-pure-rust")]
                    let material = KeyMaterial::P384(p384::ecdsa::VerifyingKey::from_sec1_bytes(&point).ok()?);
                    // Without pure-Rust P-384 the point is checked by the host when it imports the key.
                    #[cfg(not(feature = "p384-pure-rust"))]
                    let material = KeyMaterial::P384;
                    (material, der::ec_spki(der::OID_P384, &point))
                }
                _ => return None,
            }
        }
        _ => return None,
    };
    let fingerprint = fingerprint(&spki_der);
    let key = Key { kid: jwk.kid, alg, material, spki_der, fingerprint };
    // A JWK whose `alg` contradicts its own type (e.g. kty RSA with alg ES256) is unusable.
    match alg {
        Some(a) if !Key { alg: None, ..key.clone() }.allows(a) => None,
        _ => Some(key),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The public half of the committed test-only keys (tests/keys/), as the IdP publishes it.
    pub(crate) fn test_jwks() -> String {
        crate::testkeys::public_jwks()
    }

    /// A JWKS fetch's answer is logged only as why it is not a JWKS: never its text (issue 24: a misdirected
    /// `jwks_uri` may answer with anything, a token endpoint's answer included).
    #[test]
    fn a_body_that_is_not_a_jwks_is_not_quoted_in_the_error() {
        for body in [&br#"{"keys": "CANARY-in-a-jwks"}"#[..], br#"{"access_token": "CANARY-x", "keys": 7}"#] {
            let e = KeySet::from_jwks(body).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(!e.is_empty() && !e.contains("CANARY"), "{e}");
        }
    }

    #[test]
    fn test_jwks_compiles_to_two_keys() {
        let set = KeySet::from_jwks(test_jwks().as_bytes()).unwrap();
        assert_eq!(set.keys().len(), 2);
        assert_eq!(set.skipped(), 0);
    }

    #[test]
    fn kid_picks_the_key_and_alg_must_match_it() {
        let set = KeySet::from_jwks(test_jwks().as_bytes()).unwrap();
        let rs = crate::testkeys::RS_KID;
        let es = crate::testkeys::ES_KID;
        assert_eq!(set.candidates(Some(rs), Algorithm::RS256).count(), 1);
        assert_eq!(set.candidates(Some(rs), Algorithm::ES256).count(), 0);
        assert_eq!(set.candidates(Some(es), Algorithm::RS256).count(), 0);
        assert_eq!(set.candidates(Some(es), Algorithm::ES256).count(), 1);
        assert_eq!(set.candidates(Some("nope"), Algorithm::RS256).count(), 0);
        assert_eq!(set.candidates(None, Algorithm::ES256).count(), 1);
    }

    #[test]
    fn symmetric_encryption_and_unknown_keys_are_skipped() {
        let doc = format!(
            r#"{{"keys":[{{"kty":"oct","k":"c2VjcmV0"}},{{"kty":"OKP","crv":"Ed25519","x":"AA"}},
            {{"kty":"RSA","use":"enc","n":"AQAB","e":"AQAB"}},{{"kty":"RSA","alg":"HS256","n":"AQAB","e":"AQAB"}},
            {}]}}"#,
            crate::testkeys::es_public_jwk()
        );
        let set = KeySet::from_jwks(doc.as_bytes()).unwrap();
        assert_eq!(set.keys().len(), 1);
        assert_eq!(set.skipped(), 4);
    }

    #[test]
    fn small_rsa_keys_are_refused() {
        // 512-bit modulus
        let n = URL_SAFE_NO_PAD.encode([0xc5u8; 64]);
        let doc = format!(r#"{{"keys":[{{"kty":"RSA","n":"{n}","e":"AQAB"}}]}}"#);
        assert_eq!(KeySet::from_jwks(doc.as_bytes()).unwrap_err(), JwksError::NoUsableKey { skipped: 1 });
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for doc in ["", "null", "[]", "{}", r#"{"keys":{}}"#, r#"{"keys":[]}"#, r#"{"keys":[1,"x",null]}"#] {
            assert!(KeySet::from_jwks(doc.as_bytes()).is_err(), "{doc}");
        }
        let big = vec![b' '; MAX_JWKS_BYTES + 1];
        assert_eq!(KeySet::from_jwks(&big).unwrap_err(), JwksError::TooLarge);
    }

    #[test]
    fn ec_point_not_on_the_curve_is_skipped() {
        let x = URL_SAFE_NO_PAD.encode([1u8; 32]);
        let doc = format!(r#"{{"keys":[{{"kty":"EC","crv":"P-256","x":"{x}","y":"{x}"}}]}}"#);
        assert!(KeySet::from_jwks(doc.as_bytes()).is_err());
    }
}
