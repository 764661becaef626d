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
    Pairs::new(bytes).map(Iterator::collect)
}

/// The pairs of a serialized map, without collecting them: the whole map is checked first, so a malformed
/// one yields nothing rather than a prefix.
#[derive(Clone, Debug)]
pub struct Pairs<'a> {
    bytes: &'a [u8],
    /// Index of the next pair, and where its name starts.
    next: usize,
    count: usize,
    data: usize,
}

impl<'a> Pairs<'a> {
    /// `None` if the map is malformed (a count or a length that runs past the end).
    pub fn new(bytes: &'a [u8]) -> Option<Self> {
        if bytes.is_empty() {
            return Some(Self { bytes, next: 0, count: 0, data: 0 });
        }
        let count = read_u32(bytes, 0)?;
        let data = count.checked_mul(8)?.checked_add(4)?;
        if data > bytes.len() {
            return None;
        }
        let pairs = Self { bytes, next: 0, count, data };
        let mut check = pairs.clone();
        for _ in 0..count {
            check.step()?;
        }
        Some(pairs)
    }

    fn step(&mut self) -> Option<(&'a [u8], &'a [u8])> {
        let sizes = self.next.checked_mul(8)?.checked_add(4)?;
        let name_len = read_u32(self.bytes, sizes)?;
        let value_len = read_u32(self.bytes, sizes.checked_add(4)?)?;
        let name = self.bytes.get(self.data..self.data.checked_add(name_len)?)?;
        let value_at = self.data.checked_add(name_len)?.checked_add(1)?;
        let value = self.bytes.get(value_at..value_at.checked_add(value_len)?)?;
        self.data = value_at.checked_add(value_len)?.checked_add(1)?;
        self.next += 1;
        Some((name, value))
    }
}

impl<'a> Iterator for Pairs<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.count {
            return None;
        }
        self.step()
    }
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
