//! The proxy-wasm serialized header map, parsed without trusting it: the host hands header values over as
//! bytes, and a client can put any byte in a header value (the SDK's own parser panics on non-UTF-8).
//!
//! Layout: `u32 count`, then `count` pairs of `u32 name_len, u32 value_len` (little-endian), then for each
//! pair `name \0 value \0`.

fn read_u32(bytes: &[u8], at: usize) -> Option<usize> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    let word = [*b.first()?, *b.get(1)?, *b.get(2)?, *b.get(3)?];
    usize::try_from(u32::from_le_bytes(word)).ok()
}

/// The (name, value) pairs of a serialized map; `None` if it is malformed.
pub fn parse_pairs(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = read_u32(bytes, 0)?;
    let mut data = count.checked_mul(8)?.checked_add(4)?;
    if data > bytes.len() {
        return None;
    }
    let mut pairs = Vec::with_capacity(count);
    for i in 0..count {
        let sizes = 4 + i * 8;
        let name_len = read_u32(bytes, sizes)?;
        let value_len = read_u32(bytes, sizes + 4)?;
        let name = bytes.get(data..data.checked_add(name_len)?)?;
        data = data.checked_add(name_len)?.checked_add(1)?;
        let value = bytes.get(data..data.checked_add(value_len)?)?;
        data = data.checked_add(value_len)?.checked_add(1)?;
        pairs.push((name, value));
    }
    Some(pairs)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The serialized form of `pairs`, as the host hands it over.
    pub(crate) fn serialize(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
        for (k, v) in pairs {
            out.extend((k.len() as u32).to_le_bytes());
            out.extend((v.len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            out.extend(*k);
            out.push(0);
            out.extend(*v);
            out.push(0);
        }
        out
    }

    #[test]
    fn pairs_round_trip_including_non_utf8_values() {
        let pairs: Vec<(&[u8], &[u8])> =
            vec![(b":path", b"/Patient"), (b"authorization", b"Bearer \xff\xfe"), (b"x", b"")];
        assert_eq!(parse_pairs(&serialize(&pairs)).unwrap(), pairs);
        assert_eq!(parse_pairs(&[]).unwrap(), vec![]);
    }

    #[test]
    fn truncated_or_lying_maps_are_refused() {
        let full = serialize(&[(b"a", b"b")]);
        for cut in 1..full.len() - 1 {
            assert!(parse_pairs(&full[..cut]).is_none(), "{cut}");
        }
        assert!(parse_pairs(&[0xff, 0xff, 0xff, 0xff]).is_none());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_maps_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..128)) {
            let _ = parse_pairs(&bytes);
        }
    }
}
