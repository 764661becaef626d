//! The protobuf messages of Envoy's `verify_signature` foreign function, encoded and decoded by hand (two tiny
//! messages do not justify a protobuf runtime in the module):
//!
//! ```proto
//! message VerifySignatureArguments {
//!   string hash_function = 1; bytes public_key = 2; bytes signature = 3; bytes text = 4;
//! }
//! message VerifySignatureResult { bool result = 1; string error = 2; }
//! ```

const WIRE_VARINT: u8 = 0;
const WIRE_LEN: u8 = 2;

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn push_bytes_field(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    out.push((field << 3) | WIRE_LEN);
    push_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Encodes `VerifySignatureArguments` with a DER SubjectPublicKeyInfo key.
pub fn encode_verify_arguments(hash_function: &str, public_key_der: &[u8], signature: &[u8], text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + hash_function.len() + public_key_der.len() + signature.len() + text.len());
    push_bytes_field(&mut out, 1, hash_function.as_bytes());
    push_bytes_field(&mut out, 2, public_key_der);
    push_bytes_field(&mut out, 3, signature);
    push_bytes_field(&mut out, 4, text);
    out
}

fn read_varint(input: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Decodes `VerifySignatureResult` and returns its `result`. Anything unparsable is `None`.
pub fn decode_verify_result(mut input: &[u8]) -> Option<bool> {
    let mut result = false;
    while !input.is_empty() {
        let key = read_varint(&mut input)?;
        let (field, wire) = (key >> 3, (key & 7) as u8);
        match wire {
            WIRE_VARINT => {
                let v = read_varint(&mut input)?;
                if field == 1 {
                    result = v != 0;
                }
            }
            WIRE_LEN => {
                let len = usize::try_from(read_varint(&mut input)?).ok()?;
                input = input.get(len..)?;
            }
            _ => return None,
        }
    }
    Some(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_encode_as_protobuf_fields_in_order() {
        let out = encode_verify_arguments("sha256", &[1, 2], &[3], &[]);
        assert_eq!(out, [0x0a, 6, b's', b'h', b'a', b'2', b'5', b'6', 0x12, 2, 1, 2, 0x1a, 1, 3, 0x22, 0]);
    }

    #[test]
    fn long_fields_use_multi_byte_lengths() {
        let text = vec![7u8; 300];
        let out = encode_verify_arguments("sha256", &[], &[], &text);
        let at = out.iter().position(|b| *b == 0x22).unwrap();
        assert_eq!(&out[at..at + 3], &[0x22, 0xac, 0x02]);
    }

    #[test]
    fn results_decode() {
        assert_eq!(decode_verify_result(&[0x08, 0x01, 0x12, 0x00]), Some(true));
        assert_eq!(decode_verify_result(&[0x12, 0x03, b'b', b'a', b'd']), Some(false));
        assert_eq!(decode_verify_result(&[]), Some(false));
        assert_eq!(decode_verify_result(&[0x08]), None);
        assert_eq!(decode_verify_result(&[0x12, 0x05, b'x']), None);
        assert_eq!(decode_verify_result(&[0x0d, 0, 0, 0, 0]), None);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_results_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = decode_verify_result(&bytes);
        }
    }
}
