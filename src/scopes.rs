//! SMART on FHIR resource scopes: what a token's `system/` scopes grant, parsed once when the token is
//! verified (a cache hit reuses the parsed form), and whether they grant one request or Bundle entry.
//!
//! Both syntaxes of SMART App Launch are read: v1 (`system/Patient.read`, `.write`, `.*`) and v2
//! (`system/Observation.rs`: `c` create, `r` read, `u` update, `d` delete, `s` search, in that order). A
//! token with at least one SMART resource scope (`system/`, `user/` or `patient/`) is *narrowed*: each
//! request needs the tenant's allowlist and a scope that grants it. A token with none gets the allowlist
//! alone (the Patients app's tokens carry only the tenant id), unless the tenant requires SMART scopes.
//!
//! What grants nothing here (but still narrows the token, so it fails closed):
//! - `user/` and `patient/` scopes: they are bound to a user or a patient in context, which a
//!   client-credentials token does not carry and this filter cannot enforce; a backend gets `system/`.
//! - a v2 scope with parameters (`system/Observation.rs?category=laboratory`): the filter would have to
//!   prove that every request (and every search) stays within the parameters, which it cannot in general.
//! - anything malformed: an unknown permission (`.rw`, `.sr`), a resource type that is not a type name.
//!
//! What a request needs (v2 letters; v1 `read` is `rs`, `write` is `cud`, `*` is `cruds`):
//! read, vread, an instance's history: `r`; search (GET, `POST _search`, compartment search), a type's or
//! the system's history: `s`; create: `c`; update, patch: `u`; delete: `d`; an operation (`$everything`)
//! with GET, which FHIR reserves for operations that change nothing: `rs`; with POST: `cruds`. A request
//! that names no resource type (system search, `/$op`) needs the scope on `*`.

use std::sync::Arc;

use serde_json::Value;

use crate::fhir::{Classified, Interaction};

/// The claim the scopes are read from (RFC 8693 §4.2, RFC 9068 §2.2.3).
pub const SCOPE_CLAIM: &str = "scope";

/// SMART v2 permissions, one bit each.
const C: u8 = 1;
const R: u8 = 1 << 1;
const U: u8 = 1 << 2;
const D: u8 = 1 << 3;
const S: u8 = 1 << 4;
const CRUDS: u8 = C | R | U | D | S;
/// The v2 letters, in the order SMART requires them.
const LETTERS: [(u8, char); 5] = [(C, 'c'), (R, 'r'), (U, 'u'), (D, 'd'), (S, 's')];

/// The longest scope claim read, in bytes (as the tenant claim's, [`crate::identity::MAX_TENANT_CLAIM_BYTES`]).
pub const MAX_SCOPE_CLAIM_BYTES: usize = 4096;

/// Most distinct resource types kept per token; a token with more grants nothing (fails closed).
const MAX_GRANTS: usize = 64;

/// What one scope value is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeValue<'a> {
    /// Not a SMART resource scope (a tenant id, `openid`, `launch`, `fhirUser`): ignored.
    Other,
    /// A SMART resource scope that grants nothing here (`user/`, `patient/`, a v2 scope with parameters,
    /// a malformed one); it narrows the token all the same. `v2`: it is written in v2 syntax.
    Nothing { v2: bool },
    /// A `system/` scope: `perms` on `resource_type` (`None`: `*`, every type).
    Grant { resource_type: Option<&'a str>, perms: u8, v2: bool },
}

fn is_resource_type(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase()) && chars.all(|c| c.is_ascii_alphanumeric())
}

/// The permissions of a v2 permission string (`rs`, `cruds`): each letter at most once, in order.
fn v2_perms(text: &str) -> Option<u8> {
    let mut perms = 0u8;
    let mut next = 0usize;
    for ch in text.chars() {
        let at = LETTERS.iter().skip(next).position(|(_, l)| *l == ch)? + next;
        perms |= LETTERS.get(at)?.0;
        next = at + 1;
    }
    (perms != 0).then_some(perms)
}

/// Reads one scope value.
pub fn parse_scope(value: &str) -> ScopeValue<'_> {
    let Some((context, rest)) = value.split_once('/') else { return ScopeValue::Other };
    if !matches!(context, "system" | "user" | "patient") {
        return ScopeValue::Other;
    }
    let Some((resource, permission)) = rest.split_once('.') else { return ScopeValue::Nothing { v2: false } };
    let (permission, params) = match permission.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (permission, None),
    };
    let (perms, v2) = match permission {
        "read" => (R | S, false),
        "write" => (C | U | D, false),
        "*" => (CRUDS, false),
        p => match v2_perms(p) {
            Some(perms) => (perms, true),
            None => return ScopeValue::Nothing { v2: false },
        },
    };
    let resource_type = match resource {
        "*" => None,
        t if is_resource_type(t) => Some(t),
        _ => return ScopeValue::Nothing { v2 },
    };
    if context != "system" || params.is_some() {
        return ScopeValue::Nothing { v2: v2 || params.is_some() };
    }
    ScopeValue::Grant { resource_type, perms, v2 }
}

/// One resource type's (or `*`'s) permissions, merged over the token's scopes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Grant {
    resource_type: Option<Box<str>>,
    perms: u8,
}

/// A narrowed token's grants.
#[derive(Debug, PartialEq, Eq)]
struct Granted {
    grants: Box<[Grant]>,
    /// The token writes scopes in v2 syntax: a refusal names the missing scope that way too.
    v2: bool,
}

/// What a token's SMART scopes grant. The default (no SMART resource scope at all) narrows nothing. One
/// shared allocation: a cache hit hands it on without copying.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scopes(Option<Arc<Granted>>);

impl Scopes {
    /// From the `scope` claim's JSON value: a space-delimited string (RFC 6749 §3.3) or a list of strings.
    /// A claim longer than 4096 bytes, or with more than 64 resource types, narrows the token to nothing.
    pub fn from_claim(claim: Option<&Value>) -> Self {
        Self::from_claim_mapped(claim, &[])
    }

    /// [`Scopes::from_claim`], reading each value that begins with a key of `map` (the longest such key) as
    /// the key's value followed by the rest (a Cognito `https://fhir.example.com/system.Patient.read` as
    /// `system/Patient.read`). Values matching no key are read as they are.
    pub fn from_claim_mapped(claim: Option<&Value>, map: &[(String, String)]) -> Self {
        let mut grants: Vec<Grant> = Vec::new();
        let mut smart = false;
        let mut v2 = false;
        let mut too_many = false;
        let mut add = |value: &str| match parse_scope(value) {
            ScopeValue::Other => {}
            ScopeValue::Nothing { v2: is_v2 } => {
                smart = true;
                v2 |= is_v2;
            }
            ScopeValue::Grant { resource_type, perms, v2: is_v2 } => {
                smart = true;
                v2 |= is_v2;
                if let Some(g) = grants.iter_mut().find(|g| g.resource_type.as_deref() == resource_type) {
                    g.perms |= perms;
                } else if grants.len() < MAX_GRANTS {
                    grants.push(Grant { resource_type: resource_type.map(Box::from), perms });
                } else {
                    too_many = true;
                }
            }
        };
        // Only a provider with a `scope_map` pays for the rewritten value.
        let mut read = |value: &str| match map
            .iter()
            .filter(|(k, _)| value.starts_with(k.as_str()))
            .max_by_key(|(k, _)| k.len())
        {
            Some((k, smart)) => add(&format!("{smart}{}", value.get(k.len()..).unwrap_or_default())),
            None => add(value),
        };
        let oversized = match claim {
            Some(Value::String(s)) if s.len() > MAX_SCOPE_CLAIM_BYTES => true,
            Some(Value::String(s)) => {
                s.split(' ').filter(|v| !v.is_empty()).for_each(&mut read);
                false
            }
            Some(Value::Array(items)) => {
                let bytes: usize = items.iter().filter_map(Value::as_str).map(|v| v.len().saturating_add(1)).sum();
                if bytes > MAX_SCOPE_CLAIM_BYTES {
                    true
                } else {
                    items.iter().filter_map(Value::as_str).filter(|v| !v.is_empty()).for_each(&mut read);
                    false
                }
            }
            _ => false,
        };
        if oversized || too_many {
            return Self(Some(Arc::new(Granted { grants: Box::new([]), v2 })));
        }
        Self(smart.then(|| Arc::new(Granted { grants: grants.into_boxed_slice(), v2 })))
    }

    /// Whether the token carries SMART resource scopes (and is narrowed by them).
    pub fn is_narrowed(&self) -> bool {
        self.0.is_some()
    }

    /// The resource types the scopes let the client read (`r` or `s`: search results are read too), or
    /// `None` for every type (a token without SMART scopes, or one granting `r` or `s` on `*`).
    pub fn readable_types(&self) -> Option<Vec<&str>> {
        let granted = self.0.as_ref()?;
        let reads = |g: &&Grant| g.perms & (R | S) != 0;
        if granted.grants.iter().filter(reads).any(|g| g.resource_type.is_none()) {
            return None;
        }
        Some(granted.grants.iter().filter(reads).filter_map(|g| g.resource_type.as_deref()).collect())
    }

    /// Whether the scopes grant `method` on the classified request (or Bundle entry). A token without SMART
    /// scopes is granted everything unless `required` (the tenant's `require_smart_scopes`). `Err` names
    /// the scope the request needs, in the token's syntax (v1 unless it wrote v2 scopes).
    pub fn check(&self, required: bool, method: &str, c: &Classified<'_>) -> Result<(), String> {
        let Some(need) = needed(method, c) else { return Ok(()) };
        let (granted, v2) = match &self.0 {
            None if !required => return Ok(()),
            None => (0, false),
            Some(g) => {
                let granted = g
                    .grants
                    .iter()
                    .filter(|x| x.resource_type.is_none() || x.resource_type.as_deref() == c.resource_type)
                    .fold(0, |acc, x| acc | x.perms);
                (granted, g.v2)
            }
        };
        if granted & need == need {
            Ok(())
        } else {
            Err(scope_name(c.resource_type, need, v2))
        }
    }
}

/// The v2 permissions an interaction needs; `None` for a Bundle posted to the base (its entries are judged).
fn needed(method: &str, c: &Classified<'_>) -> Option<u8> {
    Some(match c.interaction {
        Interaction::Read | Interaction::Vread => R,
        Interaction::History if c.instance => R,
        Interaction::History | Interaction::Search => S,
        Interaction::Create => C,
        Interaction::Update | Interaction::Patch => U,
        Interaction::Delete => D,
        Interaction::Operation if method == "GET" => R | S,
        Interaction::Operation => CRUDS,
        Interaction::Batch => return None,
    })
}

/// The scope that grants `perms` on `resource_type`: `system/Patient.read` (v1) or `system/Patient.rs`
/// (v2). Resource types are ASCII letters and digits: the name needs no quoting in `WWW-Authenticate`.
fn scope_name(resource_type: Option<&str>, perms: u8, v2: bool) -> String {
    let mut name = format!("system/{}.", resource_type.unwrap_or("*"));
    if v2 {
        name.extend(LETTERS.iter().filter(|(bit, _)| perms & bit != 0).map(|(_, l)| l));
    } else if perms & !(R | S) == 0 {
        name.push_str("read");
    } else if perms & !(C | U | D) == 0 {
        name.push_str("write");
    } else {
        name.push('*');
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::classify;
    use serde_json::json;

    fn scopes(claim: &str) -> Scopes {
        Scopes::from_claim(Some(&json!(claim)))
    }

    fn check(s: &Scopes, method: &str, path: &str) -> Result<(), String> {
        s.check(false, method, &classify(method, path).unwrap())
    }

    #[test]
    fn v1_and_v2_scopes_parse_and_others_are_ignored() {
        use ScopeValue::*;
        assert_eq!(
            parse_scope("system/Patient.read"),
            Grant { resource_type: Some("Patient"), perms: R | S, v2: false }
        );
        assert_eq!(parse_scope("system/*.write"), Grant { resource_type: None, perms: C | U | D, v2: false });
        assert_eq!(parse_scope("system/*.*"), Grant { resource_type: None, perms: CRUDS, v2: false });
        assert_eq!(
            parse_scope("system/Observation.rs"),
            Grant { resource_type: Some("Observation"), perms: R | S, v2: true }
        );
        assert_eq!(parse_scope("system/*.cruds"), Grant { resource_type: None, perms: CRUDS, v2: true });
        assert_eq!(parse_scope("system/Patient.c"), Grant { resource_type: Some("Patient"), perms: C, v2: true });
        for other in ["6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f", "openid", "launch/patient", "tenant/x", "fhirUser", ""] {
            assert_eq!(parse_scope(other), Other, "{other}");
        }
        for nothing in [
            "patient/Patient.read",
            "user/*.cruds",
            "system/Patient",
            "system/Patient.sr",
            "system/Patient.rr",
            "system/Patient.rw",
            "system/Patient.",
            "system/patient.read",
            "system/Pat-ient.read",
            "system/.read",
            "system/Observation.rs?category=laboratory",
            "system/Observation.rs?",
        ] {
            assert!(matches!(parse_scope(nothing), Nothing { .. }), "{nothing}");
        }
    }

    #[test]
    fn a_token_without_smart_scopes_is_not_narrowed_unless_the_tenant_requires_them() {
        let plain = scopes("6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f openid");
        assert!(!plain.is_narrowed());
        assert_eq!(check(&plain, "DELETE", "/Patient/1"), Ok(()));
        let c = classify("GET", "/Patient/1").unwrap();
        assert_eq!(plain.check(true, "GET", &c), Err("system/Patient.read".into()));
        assert_eq!(Scopes::from_claim(None).check(true, "GET", &c), Err("system/Patient.read".into()));
    }

    #[test]
    fn v1_read_grants_read_vread_search_and_history_and_names_what_is_missing() {
        let s = scopes("tenant system/Patient.read");
        for (m, p) in [
            ("GET", "/Patient/1"),
            ("GET", "/Patient/1/_history/2"),
            ("GET", "/Patient?name=x"),
            ("POST", "/Patient/_search"),
            ("GET", "/Patient/1/_history"),
            ("GET", "/Patient/_history"),
            ("GET", "/Patient/1/$everything"),
        ] {
            assert_eq!(check(&s, m, p), Ok(()), "{m} {p}");
        }
        assert_eq!(check(&s, "GET", "/Observation?patient=1"), Err("system/Observation.read".into()));
        assert_eq!(check(&s, "GET", "/Patient/1/Observation"), Err("system/Observation.read".into()));
        assert_eq!(check(&s, "POST", "/Patient"), Err("system/Patient.write".into()));
        assert_eq!(check(&s, "DELETE", "/Patient/1"), Err("system/Patient.write".into()));
        assert_eq!(check(&s, "POST", "/Patient/$match"), Err("system/Patient.*".into()));
        assert_eq!(check(&s, "GET", "/?_type=Patient"), Err("system/*.read".into()), "the system level needs *");
        assert_eq!(check(&s, "POST", "/"), Ok(()), "a Bundle is judged by its entries");
        let all = scopes("system/*.read system/Observation.write");
        assert_eq!(check(&all, "GET", "/?_type=Patient"), Ok(()));
        assert_eq!(check(&all, "PUT", "/Observation/1"), Ok(()));
        assert_eq!(check(&all, "PUT", "/Patient/1"), Err("system/Patient.write".into()));
        assert_eq!(check(&scopes("system/*.*"), "POST", "/$reindex"), Ok(()));
    }

    #[test]
    fn v2_letters_grant_their_interactions_and_refusals_are_named_in_v2() {
        let s = scopes("system/Observation.rs system/Patient.r");
        assert_eq!(check(&s, "GET", "/Observation?code=x"), Ok(()));
        assert_eq!(check(&s, "GET", "/Observation/1"), Ok(()));
        assert_eq!(check(&s, "GET", "/Patient/1"), Ok(()));
        assert_eq!(check(&s, "GET", "/Patient/1/_history"), Ok(()), "an instance's history is r");
        assert_eq!(check(&s, "GET", "/Patient?name=x"), Err("system/Patient.s".into()));
        assert_eq!(check(&s, "GET", "/Patient/_history"), Err("system/Patient.s".into()), "a type's history is s");
        assert_eq!(check(&s, "GET", "/Patient/1/$everything"), Err("system/Patient.rs".into()));
        assert_eq!(check(&s, "POST", "/Observation"), Err("system/Observation.c".into()));
        assert_eq!(check(&s, "PATCH", "/Observation/1"), Err("system/Observation.u".into()));
        assert_eq!(check(&s, "DELETE", "/Observation/1"), Err("system/Observation.d".into()));
        assert_eq!(check(&s, "POST", "/Observation/$validate"), Err("system/Observation.cruds".into()));
        let cruds = scopes("system/*.cruds");
        for (m, p) in [("POST", "/Observation"), ("PATCH", "/Observation/1"), ("POST", "/Patient/$match")] {
            assert_eq!(check(&cruds, m, p), Ok(()), "{m} {p}");
        }
        // Scopes for one type add up.
        assert_eq!(check(&scopes("system/Patient.r system/Patient.s"), "GET", "/Patient/1/$everything"), Ok(()));
    }

    #[test]
    fn user_patient_and_parameterised_scopes_narrow_to_nothing() {
        for claim in [
            "tenant patient/Patient.read",
            "user/*.cruds",
            "system/Observation.rs?category=laboratory",
            "system/Patient.bogus",
        ] {
            let s = scopes(claim);
            assert!(s.is_narrowed(), "{claim}");
            assert!(check(&s, "GET", "/Observation?category=laboratory").is_err(), "{claim}");
        }
        assert_eq!(
            check(&scopes("system/Observation.rs?category=laboratory"), "GET", "/Observation/1"),
            Err("system/Observation.r".into())
        );
        // Alongside a plain scope, a parameterised one adds nothing and takes nothing away.
        let both = scopes("system/Observation.rs?category=laboratory system/Patient.rs");
        assert_eq!(check(&both, "GET", "/Patient/1"), Ok(()));
    }

    #[test]
    fn the_claim_may_be_a_list_and_an_oversized_claim_grants_nothing() {
        let list = Scopes::from_claim(Some(&json!(["tenant", "system/Patient.read", 7])));
        assert_eq!(check(&list, "GET", "/Patient/1"), Ok(()));
        let big = format!("system/Patient.read {}", "x".repeat(MAX_SCOPE_CLAIM_BYTES));
        let s = scopes(&big);
        assert!(s.is_narrowed());
        assert!(check(&s, "GET", "/Patient/1").is_err());
        let many: Vec<String> = (0..=MAX_GRANTS).map(|i| format!("system/T{i}.read")).collect();
        let s = Scopes::from_claim(Some(&json!(many.join(" "))));
        assert_eq!(check(&s, "GET", "/T0/1"), Err("system/T0.read".into()), "too many types: nothing");
        let enough: Vec<String> = (0..MAX_GRANTS).map(|i| format!("system/T{i}.read")).collect();
        assert_eq!(check(&Scopes::from_claim(Some(&json!(enough.join(" ")))), "GET", "/T0/1"), Ok(()));
    }

    /// Whether SMART App Launch 2.0 ("Scopes for requesting clinical data", the scope grammar
    /// `system/<resourceType|*>.<read|write|*|[c][r][u][d][s]>`) could let any value of `claim` grant anything
    /// on `resource_type`: the test's own oracle, written from the specification and not from
    /// [`parse_scope`] (issue 24: the test used the code's parser as its oracle).
    fn spec_may_grant(claim: &str, resource_type: Option<&str>) -> bool {
        claim.split(' ').any(|value| {
            let Some(rest) = value.strip_prefix("system/") else { return false };
            let Some((ty, permission)) = rest.rsplit_once('.') else { return false };
            let type_ok = ty == "*" || resource_type.map_or(true, |r| r == ty);
            let v1 = matches!(permission, "read" | "write" | "*");
            let v2 = !permission.is_empty() && permission.chars().all(|c| "cruds".contains(c));
            type_ok && (v1 || v2)
        })
    }

    /// Any claim, method and path: never a panic, and never a grant the specification's grammar does not allow.
    /// Claims are drawn from SMART-shaped values (right and wrong types, v1 and v2 permissions, other
    /// contexts, junk) so that every branch runs; each branch is counted and the test fails if one that it
    /// claims to check ran fewer than 100 times in 5,000 cases.
    #[test]
    fn arbitrary_scopes_never_panic_and_never_grant_what_the_spec_grammar_does_not() {
        use proptest::strategy::Strategy;
        use proptest::test_runner::{Config, TestRunner};
        use std::cell::Cell;
        let value = proptest::prop_oneof![
            // Well-formed system scopes: v1 and v2 permissions; the path's types, another type, every type.
            6 => ("(Patient|Observation|\\*|Encounter)", "(read|write|\\*|rs|cruds|c|u|d|s|r|cud|ud)")
                .prop_map(|(ty, perm)| format!("system/{ty}.{perm}")),
            // Near misses: other contexts, bad case, empty or unknown permissions, stray spaces.
            2 => (
                "(user|patient|System|system |launch)",
                "(Patient|Observation|\\*|patient|)",
                "(read|write|\\*|rs|x|READ|)"
            )
                .prop_map(|(ctx, ty, perm)| format!("{ctx}/{ty}.{perm}")),
            1 => "\\PC{0,20}",
            1 => proptest::strategy::Just("6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f".to_string()),
        ];
        let claim = proptest::collection::vec(value, 0..4).prop_map(|v| v.join(" "));
        let strategy = (claim, "(GET|POST|PUT|PATCH|DELETE)", "/(Patient|Observation)(/1(/_history)?|\\?code=x)?");
        let (granted, refused_with_scope, refused_without) = (Cell::new(0u32), Cell::new(0u32), Cell::new(0u32));
        let mut runner = TestRunner::new(Config { cases: 5_000, ..Config::default() });
        runner
            .run(&strategy, |(claim, method, path)| {
                let s = Scopes::from_claim(Some(&json!(claim)));
                let Some(c) = classify(&method, &path) else { return Ok(()) };
                if c.interaction == Interaction::Batch {
                    return Ok(());
                }
                let may = spec_may_grant(&claim, c.resource_type);
                match s.check(true, &method, &c) {
                    Ok(()) => {
                        granted.set(granted.get() + 1);
                        proptest::prop_assert!(may, "{method} {path} granted by {claim:?}");
                    }
                    Err(_) if may => refused_with_scope.set(refused_with_scope.get() + 1),
                    Err(_) => refused_without.set(refused_without.get() + 1),
                }
                Ok(())
            })
            .unwrap();
        let counts = (granted.get(), refused_with_scope.get(), refused_without.get());
        eprintln!(
            "scopes: {} granted, {} refused (a system scope for the type, not this interaction), {} refused \
                   (no system scope for the type)",
            counts.0, counts.1, counts.2
        );
        assert!(counts.0 >= 100 && counts.1 >= 100 && counts.2 >= 100, "a branch barely ran: {counts:?}");
    }

    #[test]
    fn a_scope_map_rewrites_its_prefixes_longest_first_and_leaves_the_rest() {
        // The shorter key first: the longest matching key applies, whatever the order.
        let map = [
            ("https://fhir.example.com/".to_string(), "nothing/".to_string()),
            ("https://fhir.example.com/system.".to_string(), "system/".to_string()),
        ];
        let s = Scopes::from_claim_mapped(Some(&json!("https://fhir.example.com/system.Patient.read openid")), &map);
        assert_eq!(s.readable_types(), Some(vec!["Patient"]));
        // Another value under the shorter key only: `nothing/` is no SMART context, so no grant.
        let s = Scopes::from_claim_mapped(Some(&json!(["https://fhir.example.com/Patient.read"])), &map);
        assert!(!s.is_narrowed());
        // Unmapped values are read as they are: a SMART scope still counts, anything else is ignored.
        let s = Scopes::from_claim_mapped(
            Some(&json!("system/Observation.rs https://x.example/system.Patient.read")),
            &map,
        );
        assert_eq!(s.readable_types(), Some(vec!["Observation"]));
        let s = Scopes::from_claim_mapped(Some(&json!("https://x.example/system.Patient.read")), &map);
        assert!(!s.is_narrowed());
        // An empty map is from_claim.
        let claim = json!("system/Patient.rs");
        assert_eq!(Scopes::from_claim_mapped(Some(&claim), &[]), Scopes::from_claim(Some(&claim)));
    }
}
