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
    let secs = time_ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        time_ms % 1000
    )
}

/// Appends `value` as a JSON string (RFC 8259 escaping), or `null`.
pub(crate) fn push_json(out: &mut String, value: Option<&str>) {
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

impl Record<'_> {
    /// The JSON line, keys in sorted order, written in one buffer (no intermediate JSON tree).
    pub fn to_line(&self) -> String {
        let classified = classify(self.method, self.path);
        let method = Some(self.method).filter(|m| m.len() <= 16 && m.bytes().all(|b| b.is_ascii_uppercase()));
        let time = rfc3339(self.time_ms);
        let fields: [(&str, Option<&str>); 13] = [
            ("audit", Some("fhir-tenant-router")),
            ("client_id", self.identity.and_then(Identity::client_id)),
            ("cluster", self.cluster),
            ("interaction", classified.as_ref().map(|c| c.interaction.name())),
            ("jti", self.identity.and_then(Identity::jti)),
            ("method", method),
            ("outcome", Some(self.outcome.name())),
            ("reason", self.reason),
            ("resource_type", classified.as_ref().and_then(|c| c.resource_type)),
            ("sub", self.identity.and_then(Identity::sub)),
            ("tenant", self.tenant),
            ("time", Some(&time)),
            ("upstream_credential", self.credential),
        ];
        let mut out = String::with_capacity(384);
        out.push('{');
        for (i, (key, value)) in fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('"');
            out.push_str(key);
            out.push_str("\":");
            push_json(&mut out, *value);
        }
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
