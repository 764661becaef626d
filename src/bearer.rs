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

/// Extracts the bearer token from an `Authorization` header value.
pub fn extract_bearer(header: Option<&str>) -> Credentials<'_> {
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
    if is_b64token(token) {
        Credentials::Bearer(token)
    } else {
        Credentials::Malformed
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
