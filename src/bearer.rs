//! The access token from an `Authorization` header value, per RFC 6750 §2.1:
//! `credentials = "Bearer" 1*SP b64token`, the scheme case-insensitive (RFC 9110 §11.1).

/// What the `Authorization` header holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credentials<'a> {
    /// No header, or credentials of another scheme (`Basic …`): the request carries no bearer token.
    Missing,
    /// A `Bearer` header whose token is empty or has characters outside `b64token`.
    Malformed,
    /// A syntactically valid bearer token (not yet verified).
    Bearer(&'a str),
}

/// The token of a `Bearer` header as presented: the scheme is checked, the token's characters not yet.
/// [`Presented::checked`] checks them; a token equal byte for byte to one that passed that check once (a
/// verified-token cache hit: only checked tokens are verified and cached) needs no second scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Presented<'a>(&'a str);

impl<'a> Presented<'a> {
    /// The token if it is a `b64token` (RFC 6750 §2.1).
    pub fn checked(self) -> Option<&'a str> {
        is_b64token(self.0).then_some(self.0)
    }

    /// The bytes as presented, unchecked: only for finding a token that was checked before (a lookup by
    /// equality, which cannot turn an unchecked token into a checked one).
    pub fn unchecked(self) -> &'a str {
        self.0
    }
}

/// The `Bearer` token of an `Authorization` header value, its characters not yet checked; `None` without a
/// header or with credentials of another scheme ([`Credentials::Missing`]).
pub fn presented_bearer(header: Option<&str>) -> Option<Presented<'_>> {
    let value = header?;
    let (scheme, rest) = match value.split_once(' ') {
        Some((scheme, rest)) => (scheme, rest),
        None => (value, ""),
    };
    if !scheme.eq_ignore_ascii_case("Bearer") {
        return None;
    }
    Some(Presented(rest.trim_start_matches(' ')))
}

/// Extracts the bearer token from an `Authorization` header value.
pub fn extract_bearer(header: Option<&str>) -> Credentials<'_> {
    match presented_bearer(header).map(Presented::checked) {
        None => Credentials::Missing,
        Some(None) => Credentials::Malformed,
        Some(Some(token)) => Credentials::Bearer(token),
    }
}

/// `b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`
fn is_b64token(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    // One table load per byte (a token is ~700 bytes; the per-byte comparisons cost ~1 µs of a cache hit).
    !body.is_empty() && body.bytes().all(|b| B64TOKEN.get(usize::from(b)).copied().unwrap_or(false))
}

/// Which bytes a `b64token` is made of (before its trailing `=`).
#[allow(clippy::indexing_slicing)] // evaluated at compile time: an index out of range fails the build
static B64TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'+' | b'/');
        b += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;

    /// `extract_bearer` as it was before it was split in two (the reference).
    fn extract_bearer_before(header: Option<&str>) -> Credentials<'_> {
        let Some(value) = header else {
            return Credentials::Missing;
        };
        let (scheme, rest) = match value.split_once(' ') {
            Some((scheme, rest)) => (scheme, rest),
            None => (value, ""),
        };
        if !scheme.eq_ignore_ascii_case("Bearer") {
            return Credentials::Missing;
        }
        let token = rest.trim_start_matches(' ');
        let body = token.trim_end_matches('=');
        if !body.is_empty() && body.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b)) {
            Credentials::Bearer(token)
        } else {
            Credentials::Malformed
        }
    }

    proptest::proptest! {
        #[test]
        fn the_split_extraction_accepts_exactly_what_the_whole_one_did(
            header in proptest::option::of(proptest::prop_oneof![
                r"(Bearer|bearer|BeArEr|Basic|Bearerx|)( {0,3})[A-Za-z0-9._~+/= \t\-]{0,12}",
                "(Bearer|bearer) {1,2}.{0,12}",
                ".{0,20}",
            ])
        ) {
            let h = header.as_deref();
            proptest::prop_assert_eq!(extract_bearer(h), extract_bearer_before(h));
            let presented = presented_bearer(h);
            proptest::prop_assert_eq!(presented.is_none(), extract_bearer_before(h) == Credentials::Missing);
            if let Some(p) = presented {
                // What a cache is looked up with is the token the checked path would have returned.
                if let Credentials::Bearer(t) = extract_bearer_before(h) {
                    proptest::prop_assert_eq!(p.unchecked(), t);
                }
            }
        }
    }

    #[test]
    fn the_b64token_table_is_the_grammar() {
        for b in 0..=255u8 {
            let grammar = b.is_ascii_alphanumeric() || b"-._~+/".contains(&b);
            assert_eq!(B64TOKEN[usize::from(b)], grammar, "byte {b}");
        }
    }

    #[test]
    fn bearer_token_is_extracted_whatever_the_scheme_case() {
        assert_eq!(extract_bearer(Some("Bearer abc.def.ghi")), Credentials::Bearer("abc.def.ghi"));
        assert_eq!(extract_bearer(Some("bearer abc")), Credentials::Bearer("abc"));
        assert_eq!(extract_bearer(Some("BEARER abc")), Credentials::Bearer("abc"));
    }

    #[test]
    fn several_spaces_after_the_scheme_are_allowed() {
        assert_eq!(extract_bearer(Some("Bearer   abc")), Credentials::Bearer("abc"));
    }

    #[test]
    fn no_header_or_another_scheme_is_missing() {
        assert_eq!(extract_bearer(None), Credentials::Missing);
        assert_eq!(extract_bearer(Some("Basic dXNlcjpwYXNz")), Credentials::Missing);
        assert_eq!(extract_bearer(Some("Bearerabc")), Credentials::Missing);
        assert_eq!(extract_bearer(Some("")), Credentials::Missing);
    }

    #[test]
    fn empty_or_odd_tokens_are_malformed() {
        for v in [
            "Bearer",
            "Bearer ",
            "Bearer a b",
            "Bearer a\tb",
            "Bearer \u{e9}",
            "Bearer ===",
            "Bearer a=b",
            "Bearer\tabc",
        ] {
            assert!(matches!(extract_bearer(Some(v)), Credentials::Malformed | Credentials::Missing), "{v:?}");
            assert!(!matches!(extract_bearer(Some(v)), Credentials::Bearer(_)), "{v:?}");
        }
        assert_eq!(extract_bearer(Some("Bearer abc==")), Credentials::Bearer("abc=="));
    }
}
