//! Defence in depth on the way back: the answer to a *narrowed* request (a token whose SMART scopes narrow
//! it, or a tenant with a `resource_types` allowlist) may hold only resources of types the client may read.
//!
//! The check walks the whole JSON document once, without building it: every object with a `resourceType`
//! member is a resource, wherever it is (top level, `Bundle.entry[].resource`, `entry[].response.outcome`,
//! Bundles nested in a batch-response, `contained` at any depth, `Parameters.parameter[].resource`, …),
//! and its type must be readable. `Bundle`, `Parameters` and `OperationOutcome` are envelopes and error
//! reports: always allowed themselves, their contents checked as everything else.
//!
//! What cannot be checked fails closed: a body that is not JSON (XML, Turtle, ndjson), is invalid or
//! truncated JSON, nests deeper than serde_json's limit (128), or has a `resourceType` that is not a string.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::fhir::Policy;
use crate::scopes::Scopes;

/// Types every narrowed client may receive: containers (their contents are checked) and error reports.
const ALWAYS: [&str; 3] = ["Bundle", "OperationOutcome", "Parameters"];

/// The resource types a narrowed request's answer may hold (besides [`ALWAYS`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readable {
    /// Sorted, without duplicates.
    types: Box<[Box<str>]>,
}

impl Readable {
    /// What a request may read: the types its token's SMART scopes grant read or search on (`r` or `s`)
    /// that the tenant's `resource_types` allows, plus `own`, the type a write interaction names (the
    /// answer to a create or update shows the resource written). `None`: every type (nothing narrows the
    /// types), and the answer is not checked.
    pub fn of(policy: &Policy, scopes: &Scopes, own: Option<&str>) -> Option<Self> {
        let granted = scopes.readable_types();
        let allowed = policy.resource_types();
        let mut types: Vec<Box<str>> = match (granted, allowed) {
            (None, None) => return None,
            (Some(g), None) => g.into_iter().map(Box::from).collect(),
            (None, Some(a)) => a.iter().map(|t| Box::from(t.as_str())).collect(),
            (Some(g), Some(a)) => g.into_iter().filter(|t| a.contains(*t)).map(Box::from).collect(),
        };
        types.extend(own.map(Box::from));
        types.sort_unstable();
        types.dedup();
        Some(Self { types: types.into_boxed_slice() })
    }

    /// A set of types (tests, fuzzing, benchmarks).
    pub fn from_types<'t>(types: impl IntoIterator<Item = &'t str>) -> Self {
        let mut types: Vec<Box<str>> = types.into_iter().map(Box::from).collect();
        types.sort_unstable();
        types.dedup();
        Self { types: types.into_boxed_slice() }
    }

    /// Adds types (those a Bundle's entries wrote).
    pub fn extend(&mut self, more: Vec<String>) {
        if more.is_empty() {
            return;
        }
        let mut types: Vec<Box<str>> = std::mem::take(&mut self.types).into_vec();
        types.extend(more.into_iter().map(String::into_boxed_str));
        types.sort_unstable();
        types.dedup();
        self.types = types.into_boxed_slice();
    }

    /// Whether a resource of type `t` may be in the answer.
    pub fn allows(&self, t: &str) -> bool {
        ALWAYS.contains(&t) || self.types.binary_search_by(|x| (**x).cmp(t)).is_ok()
    }
}

/// Why an answer could not be checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unreadable {
    /// Not JSON, invalid or truncated JSON, nested too deep, or a `resourceType` that is not a string.
    NotJson,
    /// Not a JSON media type (XML, Turtle, ndjson, …), or compressed.
    Format,
}

impl Unreadable {
    /// A short name for the log line.
    pub fn name(self) -> &'static str {
        match self {
            Self::NotJson => "not valid JSON",
            Self::Format => "not an uncompressed JSON media type",
        }
    }
}

/// The types found in an answer that the client may not read, with how many of each (sorted by name).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Found(pub Vec<(Box<str>, u32)>);

impl Found {
    fn add(&mut self, t: &str) {
        if let Some((_, n)) = self.0.iter_mut().find(|(name, _)| &**name == t) {
            *n = n.saturating_add(1);
        } else if self.0.len() < MAX_NAMES {
            self.0.push((Box::from(t), 1));
        } else if let Some((_, n)) = self.0.last_mut() {
            // Beyond that many distinct names, the rest count under the last one: a hostile answer cannot
            // grow this list.
            *n = n.saturating_add(1);
        }
    }

    /// "Observation x2, Practitioner x1": type names (or `(not a type name)`) and counts, no data.
    pub fn summary(&self) -> String {
        let mut sorted: Vec<_> = self.0.iter().collect();
        sorted.sort();
        sorted.iter().map(|(t, n)| format!("{} x{n}", loggable(t))).collect::<Vec<_>>().join(", ")
    }
}

/// Distinct forbidden type names kept (the count goes on).
const MAX_NAMES: usize = 16;

/// A type name as it may be logged: a FHIR type name (ASCII letter then letters and digits, 64 at most),
/// else a placeholder (a misbehaving upstream's `resourceType` could hold anything).
fn loggable(t: &str) -> &str {
    let mut chars = t.chars();
    let ok = t.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_alphanumeric());
    if ok {
        t
    } else {
        "(not a type name)"
    }
}

/// The verdict on one answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every resource in it is readable.
    Clean,
    /// It holds resources of types the client may not read.
    Forbidden(Found),
    /// It could not be checked.
    Unreadable(Unreadable),
}

/// Checks a JSON answer (the whole body). An empty (or all-whitespace) body holds nothing.
pub fn check(body: &[u8], readable: &Readable) -> Verdict {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Verdict::Clean;
    }
    let mut found = Found::default();
    let mut de = serde_json::Deserializer::from_slice(body);
    let walked = Walk { readable, found: &mut found }.deserialize(&mut de).and_then(|()| de.end());
    match walked {
        Err(_) => Verdict::Unreadable(Unreadable::NotJson),
        Ok(()) if found.0.is_empty() => Verdict::Clean,
        Ok(()) => Verdict::Forbidden(found),
    }
}

/// Walks one JSON value, noting every forbidden `resourceType`.
struct Walk<'a> {
    readable: &'a Readable,
    found: &'a mut Found,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Walk { readable: self.readable, found: &mut *self.found })?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(is_type) = map.next_key_seed(IsResourceType)? {
            if is_type {
                map.next_value_seed(TypeName { readable: self.readable, found: &mut *self.found })?;
            } else {
                map.next_value_seed(Walk { readable: self.readable, found: &mut *self.found })?;
            }
        }
        Ok(())
    }
}

/// A key: whether it is `resourceType`.
struct IsResourceType;

impl<'de> DeserializeSeed<'de> for IsResourceType {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for IsResourceType {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E>(self, v: &str) -> Result<bool, E> {
        Ok(v == "resourceType")
    }
}

/// A `resourceType` value: a string, noted if forbidden; anything else makes the answer unreadable.
struct TypeName<'a> {
    readable: &'a Readable,
    found: &'a mut Found,
}

impl<'de> DeserializeSeed<'de> for TypeName<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Visitor<'_> for TypeName<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a resource type name")
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        if !self.readable.allows(v) {
            self.found.add(v);
        }
        Ok(())
    }
}

/// Whether a `content-type` is a JSON media type the check reads (`application/fhir+json`,
/// `application/json`, `…+json`): not ndjson, not XML, not anything else.
pub fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Whether a request asks, by `_format`, for a format the check cannot read: any `_format` value other
/// than JSON's (`json`, `application/json`, `application/fhir+json`, with parameters).
pub fn asks_unreadable_format(path: &str) -> bool {
    let Some((_, query)) = path.split_once('?') else { return false };
    query.split('&').filter_map(|p| p.split_once('=').or(Some((p, "")))).any(|(name, value)| {
        let name_is_format = percent_decode(name).is_some_and(|n| n == "_format");
        if !name_is_format {
            return false;
        }
        // `+` is a space in a form-encoded query, and servers read `application/fhir json` as `+json`.
        let value = percent_decode(value).unwrap_or_default();
        let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase().replace(' ', "+");
        !matches!(essence.as_str(), "json" | "application/json" | "application/fhir+json")
    })
}

/// `%XX`-decodes a query component; `None` if a `%` is not followed by two hex digits or the result is
/// not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = (bytes.next()? as char).to_digit(16)?;
            let lo = (bytes.next()? as char).to_digit(16)?;
            out.push(u8::try_from(hi * 16 + lo).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn patient_only() -> Readable {
        Readable::from_types(["Patient"])
    }

    fn verdict(v: serde_json::Value) -> Verdict {
        check(v.to_string().as_bytes(), &patient_only())
    }

    fn forbidden(v: serde_json::Value) -> String {
        match verdict(v) {
            Verdict::Forbidden(found) => found.summary(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_readable_top_level_resource_passes_and_another_type_does_not() {
        assert_eq!(verdict(json!({"resourceType": "Patient", "id": "1", "name": [{"family": "X"}]})), Verdict::Clean);
        assert_eq!(forbidden(json!({"resourceType": "Observation", "id": "1"})), "Observation x1");
        assert_eq!(verdict(json!({"resourceType": "OperationOutcome", "issue": []})), Verdict::Clean);
    }

    #[test]
    fn bundle_entries_outcomes_and_nested_bundles_are_checked() {
        let searchset = json!({"resourceType": "Bundle", "type": "searchset", "entry": [
            {"resource": {"resourceType": "Patient", "id": "1"}, "search": {"mode": "match"}},
            {"resource": {"resourceType": "Observation", "id": "o1"}, "search": {"mode": "include"}},
            {"resource": {"resourceType": "Observation", "id": "o2"}, "search": {"mode": "include"}}
        ]});
        assert_eq!(forbidden(searchset), "Observation x2");
        let nested = json!({"resourceType": "Bundle", "type": "batch-response", "entry": [
            {"resource": {"resourceType": "Bundle", "type": "searchset", "entry": [
                {"resource": {"resourceType": "Bundle", "type": "searchset", "entry": [
                    {"resource": {"resourceType": "Condition", "id": "c"}}]}}]},
             "response": {"status": "200 OK"}}
        ]});
        assert_eq!(forbidden(nested), "Condition x1");
        let outcome = json!({"resourceType": "Bundle", "type": "batch-response", "entry": [
            {"response": {"status": "404", "outcome": {"resourceType": "OperationOutcome", "issue": []}}},
            {"response": {"status": "200", "outcome": {"resourceType": "Encounter"}}}
        ]});
        assert_eq!(forbidden(outcome), "Encounter x1");
        let parameters = json!({"resourceType": "Parameters", "parameter": [
            {"name": "return", "resource": {"resourceType": "Practitioner"}},
            {"name": "p", "part": [{"name": "q", "resource": {"resourceType": "Patient"}}]}
        ]});
        assert_eq!(forbidden(parameters), "Practitioner x1");
    }

    #[test]
    fn contained_resources_are_checked_at_any_depth() {
        let deep = json!({"resourceType": "Patient", "contained": [
            {"resourceType": "Patient", "id": "c1", "contained": [
                {"resourceType": "Patient", "contained": [{"resourceType": "Organization", "id": "org"}]}]}
        ]});
        assert_eq!(forbidden(deep), "Organization x1");
        let in_entry = json!({"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient",
            "contained": [{"resourceType": "Medication"}]}}]});
        assert_eq!(forbidden(in_entry), "Medication x1");
    }

    #[test]
    fn what_cannot_be_read_fails_closed() {
        let unreadable = Verdict::Unreadable(Unreadable::NotJson);
        let p = patient_only();
        let full =
            json!({"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Observation"}}]}).to_string();
        for cut in 1..full.len() {
            let v = check(full.get(..cut).unwrap().as_bytes(), &p);
            assert_eq!(v, unreadable, "truncated at {cut}: {:?}", full.get(..cut));
        }
        for body in [
            &b"<Bundle xmlns=\"http://hl7.org/fhir\"><entry/></Bundle>"[..],
            b"{\"resourceType\":\"Patient\"} {\"resourceType\":\"Observation\"}",
            b"{\"resourceType\":\"Patient\"}\n{\"resourceType\":\"Observation\"}\n",
            b"{\"resourceType\": [\"Observation\"]}",
            b"{\"resourceType\": null}",
            b"\xff\xfe",
            b"{\"a\":\"\\ud800\"}",
        ] {
            assert_eq!(check(body, &p), unreadable, "{}", String::from_utf8_lossy(body));
        }
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert_eq!(check(deep.as_bytes(), &p), unreadable, "beyond serde_json's recursion limit");
        assert_eq!(check(b"", &p), Verdict::Clean);
        assert_eq!(check(b" \r\n", &p), Verdict::Clean);
    }

    #[test]
    fn escaped_keys_and_names_are_read_as_json_reads_them() {
        // `resourceType` spelled with escapes is still the key; so is a type name.
        let body = br#"{"resourceType":"Patient","contained":[{"resourc\u0065Type":"Obs\u0065rvation"}]}"#;
        assert_eq!(check(body, &patient_only()), Verdict::Forbidden(Found(vec![("Observation".into(), 1)])));
        // A duplicate `resourceType` key: every occurrence must be readable.
        let dup = br#"{"resourceType":"Patient","resourceType":"Observation"}"#;
        assert!(matches!(check(dup, &patient_only()), Verdict::Forbidden(_)));
    }

    #[test]
    fn the_log_summary_names_types_and_counts_only() {
        let body = json!({"resourceType": "Bundle", "entry": [
            {"resource": {"resourceType": "John Smith 1970-01-01"}},
            {"resource": {"resourceType": "Observation"}}, {"resource": {"resourceType": "Observation"}}]});
        let s = forbidden(body);
        assert_eq!(s, "(not a type name) x1, Observation x2");
        let many: Vec<_> = (0..100).map(|i| json!({"resourceType": format!("T{i}")})).collect();
        let Verdict::Forbidden(found) = verdict(json!({"resourceType": "Bundle", "contained": many})) else { panic!() };
        assert_eq!(found.0.len(), MAX_NAMES);
        assert_eq!(found.0.iter().map(|(_, n)| n).sum::<u32>(), 100);
    }

    #[test]
    fn readable_types_come_from_scopes_and_the_allowlist() {
        let scopes = |s: &str| Scopes::from_claim(Some(&json!(s)));
        let open = Policy::default();
        let patients = Policy::new(&["read".into()], Some(&["Patient".into(), "Observation".into()])).unwrap();
        assert_eq!(Readable::of(&open, &scopes("tenant"), None), None, "nothing narrows");
        assert_eq!(Readable::of(&open, &scopes("system/*.read"), None), None, "every type");
        assert_eq!(Readable::of(&open, &scopes("system/*.rs system/Patient.c"), None), None);
        let r = Readable::of(&open, &scopes("system/Patient.read system/Observation.c"), None).unwrap();
        assert!(r.allows("Patient") && !r.allows("Observation") && r.allows("Bundle"));
        let r = Readable::of(&open, &scopes("system/Observation.s"), None).unwrap();
        assert!(r.allows("Observation"), "search results are read with s");
        let r = Readable::of(&patients, &scopes("tenant"), None).unwrap();
        assert!(r.allows("Patient") && r.allows("Observation") && !r.allows("Encounter"));
        let r = Readable::of(&patients, &scopes("system/*.read system/Encounter.read"), None).unwrap();
        assert!(r.allows("Patient") && !r.allows("Encounter"), "both must allow");
        let r = Readable::of(&patients, &scopes("system/Patient.rs"), None).unwrap();
        assert!(r.allows("Patient") && !r.allows("Observation"));
        let r = Readable::of(&open, &scopes("system/Observation.c"), Some("Observation")).unwrap();
        assert!(r.allows("Observation"), "a write's answer shows what was written");
    }

    #[test]
    fn media_types_and_format_parameters() {
        for json in
            ["application/fhir+json", "application/json; charset=utf-8", "Application/FHIR+JSON;fhirVersion=4.0"]
        {
            assert!(is_json_media_type(json), "{json}");
        }
        for other in ["application/fhir+xml", "application/fhir+ndjson", "text/html", "application/x-ndjson", "json"] {
            assert!(!is_json_media_type(other), "{other}");
        }
        assert!(!asks_unreadable_format("/Patient?name=x"));
        assert!(!asks_unreadable_format("/Patient?_format=json"));
        assert!(!asks_unreadable_format("/Patient?_format=application%2Ffhir%2Bjson"));
        assert!(asks_unreadable_format("/Patient?_format=xml"));
        assert!(asks_unreadable_format("/Patient?_form%61t=xml"));
        assert!(asks_unreadable_format("/Patient?_format=application/fhir+xml"));
        assert!(asks_unreadable_format("/Patient?_format=ttl&x=1"));
        assert!(asks_unreadable_format("/Patient?_format"));
    }

    /// The check's cost per answer size, natively (BENCHMARKS.md "Answer check"): `cargo test --release --lib
    /// response_check::tests::cost -- --ignored --nocapture`. A searchset of Patients with a contained
    /// resource each, as a narrowed client gets it; beside it, serde_json parsing the same body into a tree
    /// (what link rewriting pays) for scale.
    #[test]
    #[ignore = "a timing loop: run on demand, not in CI"]
    fn cost() {
        use std::time::Instant;
        let readable = Readable::from_types(["Patient", "Organization"]);
        println!("| answer | bytes | check (median) | MB/s | serde_json tree parse (median) |");
        println!("|---|---:|---:|---:|---:|");
        for entries in [1usize, 10, 100, 1000, 5000] {
            let entry = |i: usize| {
                json!({"fullUrl": format!("https://fhir.example.org/Patient/{i}"), "search": {"mode": "match"},
                       "resource": {"resourceType": "Patient", "id": i.to_string(), "active": true,
                                    "name": [{"family": "Example", "given": ["Pat", "Q"]}], "gender": "female",
                                    "birthDate": "1970-01-01", "address": [{"line": ["1 Main St"], "city": "X"}],
                                    "contained": [{"resourceType": "Organization", "id": "o", "name": "Clinic"}],
                                    "managingOrganization": {"reference": "#o"}}})
            };
            let doc = json!({"resourceType": "Bundle", "type": "searchset", "total": entries,
                             "entry": (0..entries).map(entry).collect::<Vec<_>>()});
            let body = doc.to_string().into_bytes();
            let runs = (2_000_000 / body.len()).clamp(5, 2000);
            let median = |f: &dyn Fn()| {
                let mut t: Vec<f64> = (0..runs)
                    .map(|_| {
                        let start = Instant::now();
                        f();
                        start.elapsed().as_secs_f64()
                    })
                    .collect();
                t.sort_by(f64::total_cmp);
                t[t.len() / 2]
            };
            let check_s = median(&|| assert_eq!(check(std::hint::black_box(&body), &readable), Verdict::Clean));
            let tree_s = median(&|| {
                std::hint::black_box(serde_json::from_slice::<serde_json::Value>(&body).unwrap());
            });
            println!(
                "| searchset, {entries} Patients | {} | {:.1} µs | {:.0} | {:.1} µs |",
                body.len(),
                check_s * 1e6,
                body.len() as f64 / check_s / 1e6,
                tree_s * 1e6
            );
        }
    }

    proptest::proptest! {
        /// Never panics on any bytes.
        #[test]
        fn never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = check(&body, &patient_only());
        }

        /// Agrees with a walk over serde_json's own tree.
        #[test]
        fn agrees_with_a_tree_walk_on_json(doc in arb_json()) {
            let body = doc.to_string();
            let expected = tree_walk(&doc);
            let got = match check(body.as_bytes(), &patient_only()) {
                Verdict::Clean => Some(0),
                Verdict::Forbidden(f) => Some(f.0.iter().map(|(_, n)| *n).sum()),
                Verdict::Unreadable(_) => None,
            };
            proptest::prop_assert_eq!(got, expected, "{}", body);
        }
    }

    /// The oracle: serde_json's tree, walked the obvious way (`None`: a `resourceType` that is no string).
    fn tree_walk(v: &serde_json::Value) -> Option<u32> {
        match v {
            serde_json::Value::Array(a) => a.iter().map(tree_walk).sum(),
            serde_json::Value::Object(o) => {
                let own = match o.get("resourceType") {
                    Some(serde_json::Value::String(t)) if !patient_only().allows(t) => 1,
                    Some(serde_json::Value::String(_)) | None => 0,
                    Some(_) => return None,
                };
                let rest: Option<u32> = o.iter().filter(|(k, _)| *k != "resourceType").map(|(_, v)| tree_walk(v)).sum();
                Some(own + rest?)
            }
            _ => Some(0),
        }
    }

    fn arb_json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(json!(null)),
            any::<bool>().prop_map(|b| json!(b)),
            any::<i32>().prop_map(|n| json!(n)),
            prop_oneof![Just("Patient"), Just("Observation"), Just("Bundle"), Just("x\"y"), Just("")]
                .prop_map(|s| json!(s)),
        ];
        leaf.prop_recursive(6, 64, 6, |inner| {
            let key = prop_oneof![Just("resourceType".to_string()), Just("contained".to_string()), "[a-z]{1,3}"];
            let typed = prop_oneof![Just("Patient"), Just("Observation"), Just("Bundle"), Just("Condition")];
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map(key, inner.clone(), 0..5)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                (typed, proptest::collection::vec(inner, 0..4))
                    .prop_map(|(t, c)| json!({"resourceType": t, "contained": c})),
            ]
        })
    }
}
