//! The few DER encodings the host signature check needs: a SubjectPublicKeyInfo for RSA and EC keys, and the
//! conversion of a JWS ECDSA signature (raw `r || s`, RFC 7518 §3.4) into the DER `Ecdsa-Sig-Value` that
//! BoringSSL's `EVP_DigestVerify` expects.

/// OID 1.2.840.113549.1.1.1 (rsaEncryption), DER-encoded with its tag.
const OID_RSA_ENCRYPTION: &[u8] = &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// OID 1.2.840.10045.2.1 (id-ecPublicKey).
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// OID 1.2.840.10045.3.1.7 (prime256v1 / P-256).
pub(crate) const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// OID 1.3.132.0.34 (secp384r1 / P-384).
pub(crate) const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_NULL: u8 = 0x05;
const TAG_SEQUENCE: u8 = 0x30;

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        let significant = bytes.get(skip..).unwrap_or_default();
        out.push(0x80 | significant.len() as u8);
        out.extend_from_slice(significant);
    }
}

fn push_tlv(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    push_len(out, content.len());
    out.extend_from_slice(content);
}

/// An unsigned big-endian integer as a DER INTEGER: leading zeros dropped, one zero added back when the high
/// bit is set so that the value stays positive.
fn push_unsigned_integer(out: &mut Vec<u8>, be: &[u8]) {
    let skip = be.iter().take_while(|b| **b == 0).count();
    let digits = be.get(skip..).unwrap_or_default();
    let mut content = Vec::with_capacity(digits.len() + 1);
    match digits.first() {
        None => content.push(0),
        Some(first) if *first >= 0x80 => {
            content.push(0);
            content.extend_from_slice(digits);
        }
        Some(_) => content.extend_from_slice(digits),
    }
    push_tlv(out, TAG_INTEGER, &content);
}

fn spki(algorithm: &[u8], subject_public_key: &[u8]) -> Vec<u8> {
    let mut algorithm_seq = Vec::new();
    push_tlv(&mut algorithm_seq, TAG_SEQUENCE, algorithm);
    let mut bits = Vec::with_capacity(subject_public_key.len() + 1);
    bits.push(0); // no unused bits
    bits.extend_from_slice(subject_public_key);
    let mut body = algorithm_seq;
    push_tlv(&mut body, TAG_BIT_STRING, &bits);
    let mut out = Vec::with_capacity(body.len() + 4);
    push_tlv(&mut out, TAG_SEQUENCE, &body);
    out
}

/// One TLV at the start of `der` with tag `tag`: its content and what follows it.
fn read_tlv(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = der.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let bytes = rest.get(..n)?;
        (bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b)), rest.get(n..)?)
    };
    Some((rest.get(..len)?, rest.get(len..)?))
}

/// The `subjectPublicKey` bits of a SubjectPublicKeyInfo (the DER `RSAPublicKey`, or the uncompressed EC
/// point): what native verifiers such as ring take. `None` if `spki` is not one.
pub fn spki_public_key(spki: &[u8]) -> Option<&[u8]> {
    let (body, _) = read_tlv(spki, TAG_SEQUENCE)?;
    let (_, rest) = read_tlv(body, TAG_SEQUENCE)?;
    let (bits, _) = read_tlv(rest, TAG_BIT_STRING)?;
    match bits.split_first()? {
        (0, key) => Some(key),
        _ => None,
    }
}

const TAG_OCTET_STRING: u8 = 0x04;

/// The document inside a PEM block labelled `label` (`-----BEGIN <label>-----` … `-----END <label>-----`),
/// base64-decoded. `None` if `pem` is not one such block.
pub fn pem_decode(pem: &str, label: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let body = pem.trim().strip_prefix("-----BEGIN ")?.strip_prefix(label)?.strip_prefix("-----")?;
    let end = format!("-----END {label}-----");
    let body = body.trim_end().strip_suffix(end.as_str())?;
    let b64: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

/// The big-endian integers of a PKCS#1 `RSAPrivateKey` (version 0, two primes): n, e, d, p, q.
pub fn rsa_private_key_parts(der: &[u8]) -> Option<[&[u8]; 5]> {
    let (body, _) = read_tlv(der, TAG_SEQUENCE)?;
    let (version, mut rest) = read_tlv(body, TAG_INTEGER)?;
    if version != [0] {
        return None;
    }
    let mut parts: [&[u8]; 5] = [&[]; 5];
    for part in &mut parts {
        let (value, next) = read_tlv(rest, TAG_INTEGER)?;
        *part = value;
        rest = next;
    }
    Some(parts)
}

/// The PKCS#1 `RSAPrivateKey` inside a PKCS#8 `PrivateKeyInfo` for rsaEncryption; `None` for another
/// algorithm.
pub fn pkcs8_rsa_private_key(der: &[u8]) -> Option<&[u8]> {
    let (body, _) = read_tlv(der, TAG_SEQUENCE)?;
    let (version, rest) = read_tlv(body, TAG_INTEGER)?;
    if version != [0] && version != [1] {
        return None;
    }
    let (algorithm, rest) = read_tlv(rest, TAG_SEQUENCE)?;
    if !algorithm.starts_with(OID_RSA_ENCRYPTION) {
        return None;
    }
    let (key, _) = read_tlv(rest, TAG_OCTET_STRING)?;
    Some(key)
}

/// SubjectPublicKeyInfo for an RSA key given its big-endian modulus and exponent.
pub fn rsa_spki(n: &[u8], e: &[u8]) -> Vec<u8> {
    let mut ints = Vec::with_capacity(n.len() + e.len() + 8);
    push_unsigned_integer(&mut ints, n);
    push_unsigned_integer(&mut ints, e);
    let mut rsa_public_key = Vec::with_capacity(ints.len() + 4);
    push_tlv(&mut rsa_public_key, TAG_SEQUENCE, &ints);
    let mut algorithm = OID_RSA_ENCRYPTION.to_vec();
    algorithm.extend_from_slice(&[TAG_NULL, 0x00]);
    spki(&algorithm, &rsa_public_key)
}

/// SubjectPublicKeyInfo for an EC key given the curve OID (with tag) and the uncompressed SEC1 point.
pub fn ec_spki(curve_oid: &[u8], uncompressed_point: &[u8]) -> Vec<u8> {
    let mut algorithm = OID_EC_PUBLIC_KEY.to_vec();
    algorithm.extend_from_slice(curve_oid);
    spki(&algorithm, uncompressed_point)
}

/// Converts a JWS ECDSA signature (`r || s`, each `scalar_len` bytes) into DER. `None` when the length is wrong.
pub fn ecdsa_raw_to_der(raw: &[u8], scalar_len: usize) -> Option<Vec<u8>> {
    if raw.len() != scalar_len.checked_mul(2)? {
        return None;
    }
    let (r, s) = raw.split_at(scalar_len);
    let mut ints = Vec::with_capacity(raw.len() + 6);
    push_unsigned_integer(&mut ints, r);
    push_unsigned_integer(&mut ints, s);
    let mut out = Vec::with_capacity(ints.len() + 3);
    push_tlv(&mut out, TAG_SEQUENCE, &ints);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::pkcs8::EncodePublicKey as _;

    #[test]
    fn the_public_key_bits_come_back_out_of_an_spki() {
        let point: Vec<u8> = std::iter::once(4).chain(1..=64).collect();
        assert_eq!(spki_public_key(&ec_spki(OID_P256, &point)), Some(point.as_slice()));
        let n = [0xc5u8; 256];
        let spki = rsa_spki(&n, &[1, 0, 1]);
        let key = spki_public_key(&spki).unwrap();
        assert_eq!(key.first(), Some(&TAG_SEQUENCE), "the DER RSAPublicKey");
        for cut in 0..spki.len() {
            let _ = spki_public_key(&spki[..cut]);
        }
        assert_eq!(spki_public_key(&[]), None);
        assert_eq!(spki_public_key(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }

    #[test]
    fn rsa_spki_matches_the_rsa_crate() {
        let mut rng = rand::thread_rng();
        let private = rsa::RsaPrivateKey::new(&mut rng, 1024).unwrap();
        let public = private.to_public_key();
        use rsa::traits::PublicKeyParts;
        let ours = rsa_spki(&public.n().to_bytes_be(), &public.e().to_bytes_be());
        assert_eq!(ours, public.to_public_key_der().unwrap().as_bytes());
    }

    #[test]
    fn ec_spki_matches_the_p256_crate() {
        let secret = p256::SecretKey::random(&mut rand::thread_rng());
        let public = secret.public_key();
        let point = p256::EncodedPoint::from(public);
        let ours = ec_spki(OID_P256, point.as_bytes());
        assert_eq!(ours, public.to_public_key_der().unwrap().as_bytes());
    }

    #[test]
    fn raw_ecdsa_signature_converts_to_the_same_der_as_p256() {
        use p256::ecdsa::{signature::Signer, Signature, SigningKey};
        let key = SigningKey::random(&mut rand::thread_rng());
        for i in 0..64u8 {
            let sig: Signature = key.sign(&[i; 10]);
            let der = ecdsa_raw_to_der(&sig.to_bytes(), 32).unwrap();
            assert_eq!(der, sig.to_der().as_bytes());
        }
    }

    #[test]
    fn raw_ecdsa_signature_with_leading_zeros_and_high_bits_is_minimal() {
        let mut raw = [0u8; 64];
        raw[31] = 1; // r = 1
        raw[32] = 0x80; // s has its high bit set
        let der = ecdsa_raw_to_der(&raw, 32).unwrap();
        assert_eq!(&der[..5], &[0x30, 38, 0x02, 0x01, 0x01]);
        assert_eq!(&der[5..8], &[0x02, 33, 0x00]);
    }

    #[test]
    fn raw_ecdsa_signature_of_wrong_length_is_refused() {
        assert!(ecdsa_raw_to_der(&[0u8; 63], 32).is_none());
        assert!(ecdsa_raw_to_der(&[], 32).is_none());
    }

    #[test]
    fn an_rsa_private_key_reads_the_same_from_pkcs8_and_pkcs1_pem_as_the_rsa_crate_wrote_it() {
        use rsa::pkcs1::EncodeRsaPrivateKey as _;
        use rsa::traits::{PrivateKeyParts as _, PublicKeyParts as _};
        let pem = crate::testkeys::rsa_private_pem();
        let der = pem_decode(&pem, "PRIVATE KEY").unwrap();
        let [n, e, d, p, q] = rsa_private_key_parts(pkcs8_rsa_private_key(&der).unwrap()).unwrap();
        let key = rsa::RsaPrivateKey::from_components(
            rsa::BigUint::from_bytes_be(n),
            rsa::BigUint::from_bytes_be(e),
            rsa::BigUint::from_bytes_be(d),
            vec![rsa::BigUint::from_bytes_be(p), rsa::BigUint::from_bytes_be(q)],
        )
        .unwrap();
        let pkcs1 = key.to_pkcs1_pem(rsa::pkcs8::LineEnding::CRLF).unwrap();
        let der1 = pem_decode(&pkcs1, "RSA PRIVATE KEY").unwrap();
        let parts1 = rsa_private_key_parts(&der1).unwrap();
        assert_eq!(rsa::BigUint::from_bytes_be(parts1[0]), *key.n());
        assert_eq!(rsa::BigUint::from_bytes_be(parts1[2]), *key.d());
        assert!(pem_decode(&pem, "RSA PRIVATE KEY").is_none());
        assert!(pkcs8_rsa_private_key(&der1).is_none(), "PKCS#1 is not PKCS#8");
        for cut in [0, 1, 10, der.len() / 2, der.len() - 1] {
            assert!(pkcs8_rsa_private_key(&der[..cut]).and_then(rsa_private_key_parts).is_none(), "{cut}");
        }
    }

    #[test]
    fn long_lengths_use_the_long_form() {
        let mut out = Vec::new();
        push_len(&mut out, 300);
        assert_eq!(out, [0x82, 0x01, 0x2c]);
    }
}
