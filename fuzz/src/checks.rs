//! One parser, one input: run it, and assert what must hold whatever the input. A failure is a panic.

use std::collections::HashSet;
use std::sync::OnceLock;

use fhir_tenant_router::bearer::{extract_bearer, presented_bearer, Credentials};
use fhir_tenant_router::config::Provider;
use fhir_tenant_router::crypto::PureRust;
use fhir_tenant_router::der::ecdsa_raw_to_der;
use fhir_tenant_router::host_proto::decode_verify_result;
use fhir_tenant_router::jwks::{JwksError, KeyMaterial, KeySet, MAX_JWKS_BYTES, MAX_KEYS, MIN_RSA_BITS};
use fhir_tenant_router::tenant::{TenantError, TenantMap};
use fhir_tenant_router::verify::{verify, Claims};
use fhir_tenant_router::{Config, Rejection};
use serde_json::Value;

/// Verifies `token` with the pure-Rust verifier. When `signed` is given it holds every signing input the
/// generator signed with a test key: an accepted token must be one of them (anything else is a forgery).
pub fn token(
    token: &str,
    keys: Option<&KeySet>,
    provider: &Provider,
    now: i64,
    signed: Option<&HashSet<String>>,
) -> Result<Claims, Rejection> {
    let result = verify(token, keys, provider, now, &PureRust);
    if token.len() > provider.max_token_bytes {
        assert_eq!(result, Err(Rejection::TokenTooLarge), "an oversized token was parsed");
    }
    if let Ok(claims) = &result {
        assert!(keys.is_some(), "accepted without keys");
        if let Some(signed) = signed {
            let input = token.rsplit_once('.').map(|(input, _)| input).unwrap_or_default();
            assert!(signed.contains(input), "accepted a token whose signing input no test key signed: {token}");
        }
        assert_eq!(claims.str("iss"), Some(provider.issuer.as_str()), "accepted a foreign issuer");
        assert!(now <= claims.exp.saturating_add(provider.clock_skew_s), "accepted an expired token");
    }
    result
}

/// Compiles a JWKS document. `true` when it gave a key set.
pub fn jwks(bytes: &[u8]) -> bool {
    match KeySet::from_jwks(bytes) {
        Ok(set) => {
            assert!(!set.keys().is_empty() && set.keys().len() <= MAX_KEYS, "key count {}", set.keys().len());
            for key in set.keys() {
                assert!(!key.spki_der().is_empty());
                if let KeyMaterial::Rsa(public) = key.material() {
                    use rsa::traits::PublicKeyParts as _;
                    assert!(public.size() * 8 >= MIN_RSA_BITS, "a small RSA key was kept");
                }
            }
            true
        }
        Err(e) => {
            if bytes.len() > MAX_JWKS_BYTES {
                assert_eq!(e, JwksError::TooLarge);
            }
            assert!(!e.to_string().is_empty());
            false
        }
    }
}

/// Parses and compiles a plugin configuration. `true` when it compiled.
pub fn config(bytes: &[u8]) -> bool {
    match Config::from_json(bytes) {
        Ok(c) => {
            assert!(!c.tenants.is_empty() || c.registry.is_some());
            assert!(!c.providers.is_empty());
            for p in &c.providers {
                assert!((256..=65_536).contains(&p.provider.max_token_bytes));
                assert!(!p.provider.issuer.is_empty() && !p.provider.audiences.is_empty());
            }
            assert_ne!(c.route_header, c.tenant_header);
            true
        }
        Err(e) => {
            assert!(e.to_string().starts_with("invalid plugin configuration: "));
            false
        }
    }
}

/// A tenant map with the ids and prefixes it was built from, for the reference resolution.
pub struct TenantCase {
    pub map: TenantMap,
    pub ids: Vec<&'static str>,
    pub prefixes: Vec<&'static str>,
}

/// The tenant maps fuzzed: the demo's (bare ids and `tenant/`), and one whose prefixes overlap its ids.
pub fn tenant_maps() -> &'static [TenantCase] {
    static MAPS: OnceLock<Vec<TenantCase>> = OnceLock::new();
    MAPS.get_or_init(|| {
        let build = |ids: Vec<&'static str>, prefixes: Vec<&'static str>| {
            let mut map = TenantMap::new(prefixes.iter().map(|p| p.to_string()).collect());
            for (i, id) in ids.iter().enumerate() {
                map.insert(id, format!("cluster_{i}")).expect("valid test tenant id");
            }
            TenantCase { map, ids, prefixes }
        };
        vec![
            build(vec![crate::fixtures::TENANT_A, crate::fixtures::TENANT_B], vec!["", "tenant/"]),
            build(vec!["abc", "bc", "X.y_Z-9", "tenant"], vec!["a", "", "tenant/", "tenant"]),
        ]
    })
}

/// What the claim should resolve to, computed from the rules as documented (RFC 6749 §3.3 space-delimited
/// values, or an array of strings; a value `<prefix><id>` names `<id>`, ids compared ASCII-case-insensitively;
/// exactly one tenant must be named, by one value or several; a claim of more than
/// `MAX_TENANT_CLAIM_BYTES`, list items counted with one separator byte between them, names none).
pub fn reference_tenant(case: &TenantCase, claim: Option<&Value>) -> Result<String, TenantError> {
    let cap = fhir_tenant_router::identity::MAX_TENANT_CLAIM_BYTES;
    let values: Vec<&str> = match claim {
        Some(Value::String(s)) if s.len() <= cap => s.split(' ').filter(|v| !v.is_empty()).collect(),
        Some(Value::Array(list)) => {
            let items: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
            let stored = items.iter().fold(0, |len, v| len + usize::from(len > 0) + v.len());
            if stored <= cap {
                items
            } else {
                Vec::new()
            }
        }
        _ => Vec::new(),
    };
    let mut found = Vec::new();
    for value in values {
        let named = case.prefixes.iter().find_map(|p| {
            let rest = value.strip_prefix(p)?;
            case.ids.iter().find(|id| id.eq_ignore_ascii_case(rest))
        });
        if let Some(id) = named.map(|id| id.to_ascii_lowercase()) {
            if !found.contains(&id) {
                found.push(id);
            }
        }
    }
    match found.len() {
        0 => Err(TenantError::None),
        1 => Ok(found.remove(0)),
        _ => Err(TenantError::Several),
    }
}

/// Resolves the tenant claim and compares with [`reference_tenant`]. `true` when a tenant was found.
pub fn tenant(case: &TenantCase, claim: Option<&Value>) -> bool {
    let got = case.map.resolve_value(claim).map(|t| t.id.clone());
    let want = reference_tenant(case, claim);
    assert_eq!(got, want, "tenant resolution differs from the reference for claim {claim:?}");
    got.is_ok()
}

fn is_b64token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
}

/// Extracts the bearer token and checks it against RFC 6750 §2.1.
pub fn bearer(header: Option<&str>) {
    let result = extract_bearer(header);
    // The two halves the decision uses (the cache is looked up before the characters are checked): a header
    // is a Bearer one exactly when it is not missing, and what is looked up is the token extracted.
    let presented = presented_bearer(header);
    assert_eq!(presented.is_none(), result == Credentials::Missing, "{header:?}");
    assert_eq!(presented.and_then(|p| p.checked()), if let Credentials::Bearer(t) = result { Some(t) } else { None });
    if let (Some(p), Credentials::Bearer(t)) = (presented, result) {
        assert_eq!(p.unchecked(), t, "{header:?}");
    }
    let Some(h) = header else {
        assert_eq!(result, Credentials::Missing);
        return;
    };
    let scheme = h.split_once(' ').map_or(h, |(s, _)| s);
    let is_bearer = scheme.eq_ignore_ascii_case("bearer");
    match result {
        Credentials::Missing => assert!(!is_bearer, "a Bearer header was reported missing: {h:?}"),
        Credentials::Malformed => assert!(is_bearer),
        Credentials::Bearer(t) => {
            assert!(is_bearer && h.ends_with(t) && h.len() > t.len() + 6, "{h:?} gave {t:?}");
            let body = t.trim_end_matches('=');
            assert!(!body.is_empty() && body.bytes().all(is_b64token_char), "{h:?} gave {t:?}");
            assert!(h.get(6..h.len() - t.len()).is_some_and(|gap| !gap.is_empty() && gap.bytes().all(|b| b == b' ')));
        }
    }
}

/// An independent protobuf reader for `VerifySignatureResult { bool result = 1; string error = 2; }`: every
/// wire type the protobuf encoding defines is skipped when it is not field 1, and the last field 1 wins.
pub fn reference_verify_result(bytes: &[u8]) -> Option<bool> {
    fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
        let mut value = 0u64;
        for i in 0..10 {
            let b = *bytes.get(*at)?;
            *at += 1;
            value |= u64::from(b & 0x7f).checked_shl(7 * i).unwrap_or(0);
            if b < 0x80 {
                return Some(value);
            }
        }
        None
    }
    let mut at = 0;
    let mut result = false;
    while at < bytes.len() {
        let key = varint(bytes, &mut at)?;
        let skip = match key & 7 {
            0 => {
                let v = varint(bytes, &mut at)?;
                if key >> 3 == 1 {
                    result = v != 0;
                }
                0
            }
            1 => 8,
            2 => usize::try_from(varint(bytes, &mut at)?).ok()?,
            5 => 4,
            _ => return None,
        };
        at = at.checked_add(skip).filter(|end| *end <= bytes.len())?;
    }
    Some(result)
}

/// Decodes Envoy's `VerifySignatureResult`: whatever it decodes must agree with the reference reader (it may
/// refuse more, e.g. fixed-width fields the message never has: refusing means "not verified").
pub fn host_proto(bytes: &[u8]) -> Option<bool> {
    let result = decode_verify_result(bytes);
    if let Some(r) = result {
        assert_eq!(reference_verify_result(bytes), Some(r), "disagrees with the reference protobuf reader");
    }
    result
}

/// Strips leading zero bytes.
fn magnitude(be: &[u8]) -> &[u8] {
    let skip = be.iter().take_while(|b| **b == 0).count();
    &be[skip..]
}

fn der_len(input: &mut &[u8]) -> Option<usize> {
    let (&first, rest) = input.split_first()?;
    *input = rest;
    if first < 0x80 {
        return Some(usize::from(first));
    }
    let count = usize::from(first & 0x7f);
    if count == 0 || count > 4 || input.len() < count {
        return None;
    }
    let (digits, rest) = input.split_at(count);
    *input = rest;
    if digits[0] == 0 {
        return None; // not minimal
    }
    let len = digits.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
    (len >= 0x80).then_some(len) // the short form was possible
}

fn der_positive_integer<'a>(input: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (&tag, rest) = input.split_first()?;
    *input = rest;
    if tag != 0x02 {
        return None;
    }
    let len = der_len(input)?;
    if len == 0 || input.len() < len {
        return None;
    }
    let (content, rest) = input.split_at(len);
    *input = rest;
    if content[0] >= 0x80 || (content.len() > 1 && content[0] == 0 && content[1] < 0x80) {
        return None; // negative, or not minimal
    }
    Some(magnitude(content))
}

/// Parses a strict DER `Ecdsa-Sig-Value` into the magnitudes of `r` and `s`.
pub fn parse_der_signature(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut input = der;
    let (&tag, rest) = input.split_first()?;
    input = rest;
    if tag != 0x30 || der_len(&mut input)? != input.len() {
        return None;
    }
    let r = der_positive_integer(&mut input)?;
    let s = der_positive_integer(&mut input)?;
    input.is_empty().then_some((r, s))
}

/// Converts raw `r || s` to DER and checks the result: strict DER holding the same integers, and for P-256
/// exactly the encoding RustCrypto's `p256` produces.
pub fn der(raw: &[u8], scalar_len: usize) -> bool {
    let out = ecdsa_raw_to_der(raw, scalar_len);
    assert_eq!(out.is_some(), scalar_len.checked_mul(2) == Some(raw.len()), "length check, scalar {scalar_len}");
    let Some(der) = out else { return false };
    let (r, s) = parse_der_signature(&der).expect("ecdsa_raw_to_der produced DER that is not strict");
    let (raw_r, raw_s) = raw.split_at(scalar_len);
    assert_eq!(r, magnitude(raw_r), "r changed");
    assert_eq!(s, magnitude(raw_s), "s changed");
    if scalar_len == 32 {
        if let Ok(sig) = p256::ecdsa::Signature::from_slice(raw) {
            assert_eq!(der.as_slice(), sig.to_der().as_bytes(), "differs from p256's DER");
        }
    }
    true
}

/// A token endpoint's answer: a token (one printable header value, renewed before it stops being used) or a
/// printable error (it goes to Envoy's log), never a panic. Returns whether it was a token.
pub fn token_response(status: u32, body: &[u8], now_ms: u64) -> bool {
    match fhir_tenant_router::upstream_auth::parse_token_response(status, body, now_ms) {
        Ok(t) => {
            assert!(t.header.starts_with("Bearer ") && t.header.bytes().all(|b| b.is_ascii_graphic() || b == b' '));
            assert!(t.refresh_at_ms <= t.usable_until_ms, "{t:?}");
            assert_eq!(status, 200);
            true
        }
        Err(e) => {
            assert!(!e.0.chars().any(char::is_control), "{}", e.0);
            false
        }
    }
}

/// The requests each fuzzed scope claim is asked about: (method, path, the resource type it needs a scope on).
const SCOPE_REQUESTS: [(&str, &str, Option<&str>); 9] = [
    ("GET", "/Patient/1", Some("Patient")),
    ("GET", "/Observation?code=x", Some("Observation")),
    ("POST", "/Patient/_search", Some("Patient")),
    ("POST", "/Observation", Some("Observation")),
    ("DELETE", "/Patient/1", Some("Patient")),
    ("GET", "/Patient/1/_history", Some("Patient")),
    ("GET", "/Patient/1/$everything", Some("Patient")),
    ("POST", "/Patient/$match", Some("Patient")),
    ("GET", "/?_type=Patient", None),
];

/// SMART scopes from a `scope` claim: never a panic; narrowed exactly when a value is a SMART resource
/// scope (`system/`, `user/`, `patient/`) or the claim is oversized; and a narrowed token is granted a
/// request only if some value is a parameter-free `system/` scope on that type or on `*`. `true` when the
/// claim narrows the token.
pub fn scopes(claim: Option<&Value>) -> bool {
    use fhir_tenant_router::fhir::classify;
    use fhir_tenant_router::scopes::{Scopes, MAX_SCOPE_CLAIM_BYTES};
    let s = Scopes::from_claim(claim);
    let values: Vec<&str> = match claim {
        Some(Value::String(text)) => text.split(' ').collect(),
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let bytes = match claim {
        Some(Value::String(text)) => text.len(),
        _ => values.iter().map(|v| v.len() + 1).sum(),
    };
    let smart = values.iter().any(|v| ["system/", "user/", "patient/"].iter().any(|p| v.starts_with(p)));
    assert_eq!(s.is_narrowed(), smart || bytes > MAX_SCOPE_CLAIM_BYTES, "narrowed? claim {claim:?}");
    for (method, path, resource_type) in SCOPE_REQUESTS {
        let c = classify(method, path).expect("a FHIR request");
        for required in [false, true] {
            let verdict = s.check(required, method, &c);
            if !s.is_narrowed() && !required {
                assert_eq!(verdict, Ok(()), "{method} {path}: an unnarrowed token is granted");
                continue;
            }
            match verdict {
                Ok(()) => {
                    let granting = values.iter().any(|v| {
                        let on = |t: &str| v.starts_with(&format!("system/{t}."));
                        !v.contains('?') && (on("*") || resource_type.is_some_and(on))
                    });
                    assert!(granting, "{method} {path} granted by {claim:?}");
                }
                Err(scope) => {
                    let t = resource_type.unwrap_or("*");
                    assert!(scope.starts_with(&format!("system/{t}.")), "{method} {path} needs {scope}?");
                }
            }
        }
    }
    s.is_narrowed()
}

/// The answer check on a response body: never panics, and agrees with a walk over serde_json's own tree
/// (every object's string `resourceType` must be readable; a non-string one, or a body serde_json refuses,
/// is unreadable). Returns whether the body was read.
pub fn response_check(body: &[u8]) -> bool {
    use fhir_tenant_router::response_check::{check, Readable, Verdict};
    let readable = Readable::from_types(["Patient", "Observation"]);
    let got = check(body, &readable);
    fn walk(v: &Value, readable: &Readable) -> Option<u32> {
        match v {
            Value::Array(a) => a.iter().map(|v| walk(v, readable)).sum(),
            Value::Object(o) => {
                let own = match o.get("resourceType") {
                    Some(Value::String(t)) => u32::from(!readable.allows(t)),
                    None => 0,
                    Some(_) => return None,
                };
                let rest: Option<u32> =
                    o.iter().filter(|(k, _)| *k != "resourceType").map(|(_, v)| walk(v, readable)).sum();
                Some(own + rest?)
            }
            _ => Some(0),
        }
    }
    let blank = body.iter().all(u8::is_ascii_whitespace);
    let expected =
        if blank { Some(0) } else { serde_json::from_slice::<Value>(body).ok().and_then(|v| walk(&v, &readable)) };
    // Duplicate keys: serde_json's tree keeps the last `resourceType`, the check reads every one; the check
    // may only be stricter there.
    let duplicate = String::from_utf8_lossy(body).matches("resourceType").count() > 1;
    match (&got, expected) {
        (Verdict::Clean, Some(0)) => {}
        (Verdict::Forbidden(f), Some(n)) => {
            let total: u32 = f.0.iter().map(|(_, c)| *c).sum();
            assert!(total == n || (duplicate && total >= n), "forbidden count {total}, oracle {n}");
        }
        (Verdict::Unreadable(_), None) => {}
        // Stricter than the tree (which keeps only the last of duplicate keys) is allowed; laxer never.
        (Verdict::Forbidden(_) | Verdict::Unreadable(_), _) if duplicate => {}
        (got, expected) => panic!("check said {got:?}, the tree walk {expected:?}"),
    }
    !matches!(got, Verdict::Unreadable(_))
}

/// A paging cursor as a request carries it: opening it never panics, and only a cursor minted with the key
/// opens (`minted`: the tokens the generator minted).
pub fn cursor(token: &str, minted: &std::collections::HashSet<String>) -> bool {
    use fhir_tenant_router::cursor::{classify, open, Paging, PagingRequest};
    let paging = Paging::new(&[42u8; 32], 600).expect("a valid key");
    let opened = open(&paging, token, 0);
    assert!(opened.is_err() || minted.contains(token), "a cursor opened that was never minted: {token:?}");
    let path = format!("/?_cursor={token}");
    if let PagingRequest::Cursor(t) = classify("GET", &path) {
        assert_eq!(t, token);
    }
    opened.is_ok()
}

/// A request's reach ([`fhir_tenant_router::reach`]): never a panic; a parameter added (anywhere: the query or
/// the form body) never shrinks it; parameters reach the same from the query as from the form; a tenant
/// that allows only the path's type refuses a narrowed request exactly when it reaches another type.
/// `true` when it reaches something beyond its path.
pub fn reach(path: &str, query: &str, form: &[u8]) -> bool {
    use fhir_tenant_router::fhir::{classify, Judge, Policy};
    use fhir_tenant_router::reach::{of_request, Reach, TypeSet};
    let covers = |wide: &TypeSet, narrow: &TypeSet| {
        wide.is_all() || (!narrow.is_all() && narrow.types().all(|t| wide.contains(t)))
    };
    let within =
        |wide: &Reach, narrow: &Reach| covers(&wide.read, &narrow.read) && covers(&wide.search, &narrow.search);
    let base = classify("GET", path).and_then(|c| c.resource_type);
    let full = format!("{path}?{query}");
    let alone = of_request(base, &full, None, None);
    let with_form = of_request(base, &full, Some(form), None);
    assert!(within(&with_form, &alone), "a form body shrank the reach of {full:?}");
    let _ = of_request(base, path, None, Some(query));
    if !query.contains('#') {
        let form_text = String::from_utf8_lossy(form);
        if !form_text.contains('#') {
            let joined = of_request(base, &format!("{full}&{form_text}"), None, None);
            let placed = of_request(base, &full, Some(form_text.as_bytes()), None);
            assert_eq!(joined, placed, "{full:?} with form {form_text:?}: the form reaches otherwise");
        }
    }
    if let Some(t) = base {
        let policy = Policy::new(&["read".into(), "search".into(), "operation".into()], Some(&[t.to_string()]))
            .expect("a policy");
        let judge = Judge { narrowed: true, ..Judge::default() };
        let verdict = policy.check_request_with("GET", &full, &judge, &|_, _| Ok(()));
        let beyond = alone.read.is_all()
            || alone.search.is_all()
            || alone.read.types().chain(alone.search.types()).any(|r| r != t);
        assert_eq!(verdict.is_err(), beyond, "{full:?}: {verdict:?} but reach {alone:?}");
    }
    !alone.is_empty()
}

/// An OpenID Provider Configuration (configuration from discovery), checked against an Entra-like template
/// issuer on `https://login.microsoftonline.com`. `true` when it named a key set. Oracle: serde_json's own
/// tree of the same body must show the issuer (after its placeholder is normalised) and a `jwks_uri` on the
/// same scheme and authority as the location returned.
pub fn discovery(bytes: &[u8]) -> bool {
    use fhir_tenant_router::config::{normalise_placeholder, DiscoveredJwks};
    const AUTHORITY: &str = "login.microsoftonline.com";
    let expected = DiscoveredJwks {
        issuer: "https://login.microsoftonline.com/{}/v2.0".into(),
        template: true,
        scheme: "https://",
    };
    match fhir_tenant_router::upkeep::jwks_location(bytes, &expected, AUTHORITY) {
        Ok((authority, path)) => {
            // Unknown members are skipped unread (iteratively, whatever their depth, and without checking their
            // text is UTF-8): serde_json's own tree may then refuse the body; such a document is checked no
            // further (the two members read were strings of valid JSON, or it would have been refused).
            let Ok(tree) = serde_json::from_slice::<Value>(bytes) else { return true };
            let issuer = tree["issuer"].as_str().expect("a located document has an issuer");
            assert_eq!(normalise_placeholder(issuer), expected.issuer, "accepted another issuer");
            let uri = tree["jwks_uri"].as_str().expect("a located document has a jwks_uri");
            let rest = uri.strip_prefix("https://").expect("accepted a jwks_uri of another scheme");
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            assert!(rest[..end].eq_ignore_ascii_case(AUTHORITY), "accepted keys on {uri:?}");
            assert!(authority.eq_ignore_ascii_case(AUTHORITY) && path.starts_with('/'), "{authority} {path}");
            true
        }
        Err(why) => {
            assert!(!why.is_empty());
            false
        }
    }
}
