//! The audit line: one JSON object per request for Envoy's log. It says who asked for what kind of thing on
//! which tenant and what became of it, and never carries the query string, the body or the token (they
//! hold names, birth dates and credentials): the path appears only as its FHIR resource type and
//! interaction.

use crate::fhir::classify;
use crate::identity::Identity;

/// What became of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Public,
    Forbidden,
    Rejected,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Public => "public",
            Self::Forbidden => "forbidden",
            Self::Rejected => "rejected",
        }
    }
}

/// One request's audit record.
#[derive(Clone, Copy, Debug)]
pub struct Record<'a> {
    pub time_ms: u64,
    pub method: &'a str,
    /// The request path; only its FHIR resource type and interaction are written.
    pub path: &'a str,
    pub outcome: Outcome,
    pub reason: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub identity: Option<&'a Identity>,
    pub cluster: Option<&'a str>,
    /// The kind of credential sent to the tenant's FHIR server (`client_secret_basic`, …, `header`),
    /// never the credential.
    pub credential: Option<&'a str>,
}

/// `2026-11-26T07:12:03.123Z` for milliseconds since the epoch.
pub fn rfc3339(time_ms: u64) -> String {
    let mut out = String::with_capacity(24);
    push_rfc3339(&mut out, time_ms);
    out
}

/// The civil date (year, month, day) and the second of that day of `time_ms` milliseconds since the epoch
/// (Howard Hinnant's `civil_from_days`).
fn civil(time_ms: u64) -> (i64, i64, i64, u64) {
    let secs = time_ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day, secs % 86_400)
}

/// Appends [`rfc3339`]'s text, digit by digit (no `format!` on the per-request path).
pub(crate) fn push_rfc3339(out: &mut String, time_ms: u64) {
    let (year, month, day, rem) = civil(time_ms);
    // `days` is at most u64::MAX / 86.4e6, so the year is positive and far from i64's limits.
    let year = u64::try_from(year).unwrap_or(0);
    let (month, day) = (u64::try_from(month).unwrap_or(0), u64::try_from(day).unwrap_or(0));
    if year > 9999 {
        push_digits(out, year, 4);
        out.push('-');
        push_digits(out, month, 2);
        out.push('-');
        push_digits(out, day, 2);
        out.push('T');
        push_digits(out, rem / 3600, 2);
        out.push(':');
        push_digits(out, rem % 3600 / 60, 2);
        out.push(':');
        push_digits(out, rem % 60, 2);
        out.push('.');
        push_digits(out, time_ms % 1000, 3);
        out.push('Z');
        return;
    }
    // A four-digit year (until 9999): the digits go into a fixed template, copied in one piece.
    let mut text = *b"0000-00-00T00:00:00.000Z";
    for (at, width, n) in
        [(0, 4, year), (5, 2, month), (8, 2, day), (11, 2, rem / 3600), (14, 2, rem % 3600 / 60), (17, 2, rem % 60)]
            .into_iter()
            .chain([(20, 3, time_ms % 1000)])
    {
        let mut n = n;
        for d in text.iter_mut().skip(at).take(width).rev() {
            // `n % 10` is below 10: the cast keeps it.
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
    }
    // Only ASCII digits were written into the ASCII template.
    out.push_str(std::str::from_utf8(&text).unwrap_or_default());
}

/// Appends `n` in decimal, zero-padded to at least `width` digits (`{n:0width$}`).
fn push_digits(out: &mut String, mut n: u64, width: usize) {
    let mut buf = [b'0'; 20];
    let mut start = buf.len();
    while n > 0 || buf.len() - start < width.min(buf.len()) {
        start -= 1;
        if let Some(d) = buf.get_mut(start) {
            // `n % 10` is below 10: the cast keeps it.
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
    }
    // Only ASCII digits were written.
    out.push_str(std::str::from_utf8(buf.get(start..).unwrap_or_default()).unwrap_or_default());
}

/// What a byte becomes inside a JSON string (RFC 8259 §7, as serde_json writes it): 0 for itself, `u` for
/// `\u00XX`, else the letter after the backslash.
#[allow(clippy::indexing_slicing)] // evaluated at compile time: an index out of range fails the build
static ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = b'u';
        b += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0a] = b'n';
    t[0x0c] = b'f';
    t[0x0d] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

/// Appends `value` as a JSON string (RFC 8259 escaping), or `null`. Runs of bytes that need no escape (all
/// but `"`, `\` and the controls below U+0020) are copied at once. The callers size `out` for their line.
pub(crate) fn push_json(out: &mut String, value: Option<&str>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let Some(value) = value else {
        out.push_str("null");
        return;
    };
    out.push('"');
    let mut start = 0;
    for (i, &b) in value.as_bytes().iter().enumerate() {
        let escape = ESCAPE.get(usize::from(b)).copied().unwrap_or(0);
        if escape == 0 {
            continue;
        }
        // `start` and `i` are at ASCII bytes (or the ends): both are char boundaries.
        out.push_str(value.get(start..i).unwrap_or_default());
        out.push('\\');
        out.push(char::from(escape));
        if escape == b'u' {
            out.push_str("00");
            out.push(char::from(HEX.get(usize::from(b >> 4)).copied().unwrap_or(b'0')));
            out.push(char::from(HEX.get(usize::from(b & 0xf)).copied().unwrap_or(b'0')));
        }
        start = i + 1;
    }
    out.push_str(value.get(start..).unwrap_or_default());
    out.push('"');
}

impl Record<'_> {
    /// The JSON line, keys in sorted order, written in one buffer (no intermediate JSON tree), sized once.
    pub fn to_line(&self) -> String {
        let classified = classify(self.method, self.path);
        let method = Some(self.method).filter(|m| m.len() <= 16 && m.bytes().all(|b| b.is_ascii_uppercase()));
        // Each key with the separator before it; then the time and the last key.
        let fields: [(&str, Option<&str>); 10] = [
            (r#"{"audit":"fhir-tenant-router","client_id":"#, self.identity.and_then(Identity::client_id)),
            (r#","cluster":"#, self.cluster),
            (r#","interaction":"#, classified.as_ref().map(|c| c.interaction.name())),
            (r#","jti":"#, self.identity.and_then(Identity::jti)),
            (r#","method":"#, method),
            (r#","outcome":"#, Some(self.outcome.name())),
            (r#","reason":"#, self.reason),
            (r#","resource_type":"#, classified.as_ref().and_then(|c| c.resource_type)),
            (r#","sub":"#, self.identity.and_then(Identity::sub)),
            (r#","tenant":"#, self.tenant),
        ];
        // The keys, the values unescaped, the time and the last key: escapes (rare) grow it.
        let size = fields.iter().map(|(key, value)| key.len() + value.map_or(4, |v| v.len() + 2)).sum::<usize>()
            + self.credential.map_or(4, |v| v.len() + 2)
            + 80;
        let mut out = String::with_capacity(size);
        for (key, value) in fields {
            out.push_str(key);
            push_json(&mut out, value);
        }
        out.push_str(r#","time":""#);
        push_rfc3339(&mut out, self.time_ms);
        out.push_str(r#"","upstream_credential":"#);
        push_json(&mut out, self.credential);
        out.push('}');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map, Value};

    /// The line as serde_json writes it from a map (the reference for the hand-written writer).
    fn reference(r: &Record<'_>) -> String {
        let classified = classify(r.method, r.path);
        let mut m = Map::new();
        m.insert("audit".into(), json!("fhir-tenant-router"));
        m.insert("time".into(), json!(rfc3339(r.time_ms)));
        m.insert("outcome".into(), json!(r.outcome.name()));
        let mut put = |k: &str, v: Option<&str>| {
            m.insert(k.into(), v.map_or(Value::Null, |v| json!(v)));
        };
        put("reason", r.reason);
        put("tenant", r.tenant);
        put("client_id", r.identity.and_then(Identity::client_id));
        put("sub", r.identity.and_then(Identity::sub));
        put("jti", r.identity.and_then(Identity::jti));
        put("method", Some(r.method).filter(|m| m.len() <= 16 && m.bytes().all(|b| b.is_ascii_uppercase())));
        put("resource_type", classified.as_ref().and_then(|c| c.resource_type));
        put("interaction", classified.as_ref().map(|c| c.interaction.name()));
        put("cluster", r.cluster);
        put("upstream_credential", r.credential);
        Value::Object(m).to_string()
    }

    proptest::proptest! {
        #[test]
        fn the_line_is_byte_for_byte_what_serde_json_writes(
            client in proptest::option::of(".{0,40}"),
            sub in proptest::option::of("[\\x00-\\x7f\u{80}-\u{10ffff}]{0,20}"),
            tenant in proptest::option::of("[a-z0-9\"\\\\-]{0,20}"),
            path in "/[A-Za-z]{0,10}(/[a-z0-9]{0,5})?(\\?[a-z=&]{0,10})?",
            time in 0u64..4_102_444_800_000,
        ) {
            let identity = Identity::new(None, client.as_deref(), sub.as_deref(), Some("j\u{1}1"));
            let r = Record {
                time_ms: time,
                method: "GET",
                path: &path,
                outcome: Outcome::Allowed,
                reason: None,
                tenant: tenant.as_deref(),
                identity: Some(&identity),
                cluster: Some("tenant_a"),
                credential: Some("client_secret_basic"),
            };
            proptest::prop_assert_eq!(r.to_line(), reference(&r));
        }
    }

    /// The timestamp as it was written before `push_rfc3339` (one `format!`): the reference for the new one.
    fn rfc3339_by_format(time_ms: u64) -> String {
        let (year, month, day, rem) = civil(time_ms);
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            time_ms % 1000
        )
    }

    /// The escaping as it was written before the fast path for plain runs (char by char).
    fn push_json_by_char(out: &mut String, value: Option<&str>) {
        use std::fmt::Write as _;
        let Some(value) = value else {
            out.push_str("null");
            return;
        };
        out.push('"');
        for c in value.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0c}' => out.push_str("\\f"),
                c if c < ' ' => {
                    let _ = write!(out, "\\u{:04x}", u32::from(c));
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }

    proptest::proptest! {
        #[test]
        fn the_timestamp_is_what_format_wrote(time in proptest::prop_oneof![
            0u64..4_102_444_800_000,
            proptest::num::u64::ANY,
        ]) {
            proptest::prop_assert_eq!(rfc3339(time), rfc3339_by_format(time));
        }

        #[test]
        fn a_json_string_is_what_serde_json_and_the_old_writer_write(
            value in proptest::prop_oneof![
                "[\\x00-\\x7f]{0,40}",
                ".{0,40}",
                "[a-z\"\\\\\\x00-\\x1f\\x7f\u{80}-\u{7ff}\u{fffd}\u{10000}-\u{10ffff}]{0,40}",
            ],
            prefix in "[a-z]{0,3}",
        ) {
            let mut new = prefix.clone();
            push_json(&mut new, Some(&value));
            let mut old = prefix.clone();
            push_json_by_char(&mut old, Some(&value));
            proptest::prop_assert_eq!(&new, &old);
            proptest::prop_assert_eq!(&new[prefix.len()..], serde_json::to_string(&value).unwrap());
        }
    }

    #[test]
    fn the_timestamp_at_the_edges_is_what_format_wrote() {
        for time in [0, 999, 1000, 86_399_999, 86_400_000, 253_402_300_799_999, 253_402_300_800_000, u64::MAX] {
            assert_eq!(rfc3339(time), rfc3339_by_format(time), "{time}");
        }
        assert_eq!(rfc3339(253_402_300_800_000), "10000-01-01T00:00:00.000Z");
        let mut none = String::new();
        push_json(&mut none, None);
        assert_eq!(none, "null");
        let mut every = String::new();
        let all: String = (0u8..0x80).map(char::from).collect();
        push_json(&mut every, Some(&all));
        assert_eq!(every, serde_json::to_string(&all).unwrap());
    }

    #[test]
    fn time_is_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_767_225_600_123), "2026-01-01T00:00:00.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_670_000_000), "2026-11-26T05:13:20.000Z");
    }

    #[test]
    fn the_line_names_the_interaction_but_never_the_query_or_the_id() {
        let identity = Identity::new(None, Some("patients-app-a"), None, Some("j1"));
        let line = Record {
            time_ms: 1_767_225_600_000,
            method: "GET",
            path: "/Patient?family=Zzyzx&birthdate=1970-01-01",
            outcome: Outcome::Allowed,
            reason: None,
            tenant: Some("t1"),
            identity: Some(&identity),
            cluster: Some("tenant_a"),
            credential: None,
        }
        .to_line();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["audit"], "fhir-tenant-router");
        assert_eq!(v["resource_type"], "Patient");
        assert_eq!(v["interaction"], "search");
        assert_eq!(v["client_id"], "patients-app-a");
        assert_eq!(v["outcome"], "allowed");
        assert!(!line.contains("Zzyzx") && !line.contains("1970"), "{line}");
        let read = Record { path: "/Patient/some-patient-id", ..Record { identity: None, ..serde_free() } }.to_line();
        assert!(!read.contains("some-patient-id"), "{read}");
    }

    fn serde_free() -> Record<'static> {
        Record {
            time_ms: 0,
            method: "GET",
            path: "/",
            outcome: Outcome::Rejected,
            reason: Some("expired"),
            tenant: None,
            identity: None,
            credential: None,
            cluster: None,
        }
    }
}
