//! Checks one access token, in a fixed order: shape, algorithm, `typ` (if configured), issuer, time, audience,
//! required claims, key, signature.
//!
//! Nothing the token says about *how* to check it is trusted: `kid` only picks a key from the configured JWKS,
//! `alg` must be one we accept and the one that key allows, and header-carried keys or URLs (`jwk`, `jku`,
//! `x5u`, `x5c`) are never read. Time is an argument.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::Provider;
use crate::crypto::SignatureCheck;
use crate::jwks::{Algorithm, KeySet};
use crate::rejection::Rejection;

/// The verified token's claims.
#[derive(Clone, Debug, PartialEq)]
pub struct Claims {
    /// `exp`, in seconds since the epoch.
    pub exp: i64,
    /// Fingerprint of the key whose signature verified.
    pub key: u64,
    /// Every claim, as the IdP signed them.
    pub payload: Map<String, Value>,
}

impl Claims {
    /// A string claim, if present and a string.
    pub fn str(&self, name: &str) -> Option<&str> {
        self.payload.get(name).and_then(Value::as_str)
    }
}

/// The JOSE header members this filter reads. Unknown members are ignored; duplicated ones make the token
/// malformed (serde refuses duplicate fields).
#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
    /// RFC 7515 §4.1.9; any JSON type is read (and then is not the required string).
    #[serde(default)]
    typ: Option<Value>,
}

/// A compact JWS split into its parts, not yet trusted.
struct Jws<'a> {
    header: Header,
    payload: Map<String, Value>,
    signing_input: &'a str,
    signature: Vec<u8>,
}

fn parse(token: &str, max_bytes: usize) -> Result<Jws<'_>, Rejection> {
    if token.len() > max_bytes {
        return Err(Rejection::TokenTooLarge);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(Rejection::Malformed);
    };
    if h.is_empty() || p.is_empty() || s.is_empty() {
        return Err(Rejection::Malformed);
    }
    let header_json = URL_SAFE_NO_PAD.decode(h).map_err(|_| Rejection::Malformed)?;
    let header: Header = serde_json::from_slice(&header_json).map_err(|_| Rejection::Malformed)?;
    let payload_json = URL_SAFE_NO_PAD.decode(p).map_err(|_| Rejection::Malformed)?;
    let payload = match serde_json::from_slice(&payload_json) {
        Ok(Value::Object(map)) => map,
        _ => return Err(Rejection::Malformed),
    };
    let signature = URL_SAFE_NO_PAD.decode(s).map_err(|_| Rejection::Malformed)?;
    let signing_input = token.get(..h.len() + 1 + p.len()).ok_or(Rejection::Malformed)?;
    Ok(Jws { header, payload, signing_input, signature })
}

/// A NumericDate claim (RFC 7519 §2): a JSON number of seconds, possibly fractional, truncated here.
fn numeric_date(payload: &Map<String, Value>, name: &str) -> Result<Option<i64>, Rejection> {
    match payload.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i))
            } else {
                match n.as_f64() {
                    Some(f) if f.is_finite() && f.abs() < 1e15 => Ok(Some(f.trunc() as i64)),
                    _ => Err(Rejection::Malformed),
                }
            }
        }
        Some(_) => Err(Rejection::Malformed),
    }
}

/// Whether the header's `typ` is `want` (normalised: lowercase, no `application/`), compared as RFC 7515
/// §4.1.9 asks: case-insensitively, with an optional `application/` prefix.
fn typ_matches(typ: Option<&Value>, want: &str) -> bool {
    let Some(Value::String(t)) = typ else { return false };
    let t = match t.get(..12) {
        Some(p) if p.eq_ignore_ascii_case("application/") && !t.get(12..).unwrap_or_default().contains('/') => {
            t.get(12..).unwrap_or_default()
        }
        _ => t.as_str(),
    };
    t.eq_ignore_ascii_case(want)
}

/// Whether the claim equals `want`, or is an array holding it.
fn claim_holds(claim: Option<&Value>, want: &str) -> bool {
    match claim {
        Some(Value::String(s)) => s == want,
        Some(Value::Array(list)) => list.iter().any(|v| v.as_str() == Some(want)),
        _ => false,
    }
}

/// Whether `iss` is the provider's issuer: equal to it, or, for a template, equal to it filled with the
/// token's own value of the placeholder's claim (so the tenant that claim names is the issuer's).
fn issuer_matches(payload: &Map<String, Value>, provider: &Provider) -> bool {
    let Some(iss) = payload.get("iss").and_then(Value::as_str) else { return false };
    match &provider.template {
        None => iss == provider.issuer,
        Some(t) => payload.get(&t.claim).and_then(Value::as_str).is_some_and(|value| t.matches(iss, value)),
    }
}

fn audience_matches(aud: Option<&Value>, accepted: &[String]) -> bool {
    match aud {
        Some(Value::String(a)) => accepted.iter().any(|x| x == a),
        Some(Value::Array(list)) => list.iter().any(|v| v.as_str().is_some_and(|a| accepted.iter().any(|x| x == a))),
        _ => false,
    }
}

/// The `iss` a token claims, unverified: only to pick which provider verifies it.
pub fn peek_issuer(token: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Issuer {
        iss: Option<String>,
    }
    let payload = token.split('.').nth(1)?;
    let json = URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice::<Issuer>(&json).ok()?.iss
}

/// Verifies `token` for `provider` at time `now` (seconds since the epoch).
///
/// `keys` is `None` until the JWKS has been fetched: a token that passes every other check then gets
/// [`Rejection::KeysUnavailable`] rather than a verdict.
pub fn verify(
    token: &str,
    keys: Option<&KeySet>,
    provider: &Provider,
    now: i64,
    signatures: &dyn SignatureCheck,
) -> Result<Claims, Rejection> {
    let jws = parse(token, provider.max_token_bytes)?;
    let alg = Algorithm::parse(&jws.header.alg).ok_or(Rejection::UnsupportedAlgorithm)?;
    if jws.header.crit.is_some() {
        // RFC 7515 §4.1.11: we understand no extension, so any `crit` makes the token unusable.
        return Err(Rejection::CriticalHeader);
    }

    if let Some(want) = &provider.token_typ {
        if !typ_matches(jws.header.typ.as_ref(), want) {
            return Err(Rejection::WrongTokenType);
        }
    }

    if !issuer_matches(&jws.payload, provider) {
        return Err(Rejection::IssuerMismatch);
    }

    let skew = provider.clock_skew_s;
    let exp = numeric_date(&jws.payload, "exp")?.ok_or(Rejection::MissingExpiry)?;
    if now > exp.saturating_add(skew) {
        return Err(Rejection::Expired);
    }
    if let Some(nbf) = numeric_date(&jws.payload, "nbf")? {
        if now.saturating_add(skew) < nbf {
            return Err(Rejection::NotYetValid);
        }
    }
    if let Some(iat) = numeric_date(&jws.payload, "iat")? {
        if now.saturating_add(skew) < iat {
            return Err(Rejection::NotYetValid);
        }
    }

    if !audience_matches(jws.payload.get(&provider.audience_claim), &provider.audiences) {
        return Err(Rejection::AudienceMismatch);
    }
    if !provider.required_claims.iter().all(|(name, want)| claim_holds(jws.payload.get(name), want)) {
        return Err(Rejection::MissingRequiredClaim);
    }

    let keys = keys.ok_or(Rejection::KeysUnavailable)?;
    let kid = jws.header.kid.as_deref();
    let mut candidates = keys.candidates(kid, alg).peekable();
    if candidates.peek().is_none() {
        return Err(match kid {
            Some(k) if keys.has_kid(k) => Rejection::KeyAlgorithmMismatch,
            _ => Rejection::UnknownKey,
        });
    }
    let signing_input = jws.signing_input.as_bytes();
    let key = candidates
        .find(|key| signatures.check(alg, key, signing_input, &jws.signature))
        .ok_or(Rejection::BadSignature)?;
    Ok(Claims { exp, key: key.fingerprint(), payload: jws.payload })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::PureRust;
    use crate::testkeys::{self, NOW};
    use serde_json::json;

    fn provider() -> Provider {
        testkeys::provider()
    }

    fn keys() -> KeySet {
        KeySet::from_jwks(testkeys::public_jwks().as_bytes()).unwrap()
    }

    fn check(token: &str) -> Result<Claims, Rejection> {
        verify(token, Some(&keys()), &provider(), NOW, &PureRust)
    }

    fn with(claims: serde_json::Value) -> serde_json::Value {
        let mut base = testkeys::claims_now();
        for (k, v) in claims.as_object().unwrap() {
            if v.is_null() {
                base.as_object_mut().unwrap().remove(k);
            } else {
                base[k] = v.clone();
            }
        }
        base
    }

    #[test]
    fn valid_rs256_and_es256_tokens_are_accepted() {
        let claims = check(&testkeys::sign_rs256(&testkeys::claims_now())).unwrap();
        assert_eq!(claims.str("scope"), Some(testkeys::TENANT_A));
        check(&testkeys::sign_es256(&testkeys::claims_now())).unwrap();
    }

    #[test]
    fn expired_token_is_rejected_after_the_skew() {
        let t = testkeys::sign_rs256(&with(json!({"exp": NOW - 61})));
        assert_eq!(check(&t), Err(Rejection::Expired));
        let t = testkeys::sign_rs256(&with(json!({"exp": NOW - 59})));
        assert!(check(&t).is_ok());
    }

    #[test]
    fn token_without_exp_is_rejected() {
        let t = testkeys::sign_rs256(&with(json!({"exp": null})));
        assert_eq!(check(&t), Err(Rejection::MissingExpiry));
        let t = testkeys::sign_rs256(&with(json!({"exp": "soon"})));
        assert_eq!(check(&t), Err(Rejection::Malformed));
    }

    #[test]
    fn fractional_exp_is_a_numeric_date() {
        let t = testkeys::sign_rs256(&with(json!({"exp": (NOW + 100) as f64 + 0.5})));
        assert_eq!(check(&t).unwrap().exp, NOW + 100);
    }

    #[test]
    fn not_yet_valid_token_is_rejected() {
        let t = testkeys::sign_rs256(&with(json!({"nbf": NOW + 61})));
        assert_eq!(check(&t), Err(Rejection::NotYetValid));
        let t = testkeys::sign_rs256(&with(json!({"nbf": NOW + 59})));
        assert!(check(&t).is_ok());
        let t = testkeys::sign_rs256(&with(json!({"iat": NOW + 3600})));
        assert_eq!(check(&t), Err(Rejection::NotYetValid));
    }

    #[test]
    fn wrong_issuer_is_rejected() {
        let t = testkeys::sign_rs256(&with(json!({"iss": "https://evil.example"})));
        assert_eq!(check(&t), Err(Rejection::IssuerMismatch));
        let t = testkeys::sign_rs256(&with(json!({"iss": null})));
        assert_eq!(check(&t), Err(Rejection::IssuerMismatch));
    }

    #[test]
    fn audience_may_be_a_string_or_an_array_and_must_contain_ours() {
        let t = testkeys::sign_rs256(&with(json!({"aud": ["x", testkeys::AUDIENCE]})));
        assert!(check(&t).is_ok());
        let t = testkeys::sign_rs256(&with(json!({"aud": ["x", "y"]})));
        assert_eq!(check(&t), Err(Rejection::AudienceMismatch));
        let t = testkeys::sign_rs256(&with(json!({"aud": null})));
        assert_eq!(check(&t), Err(Rejection::AudienceMismatch));
        let t = testkeys::sign_rs256(&with(json!({"aud": 7})));
        assert_eq!(check(&t), Err(Rejection::AudienceMismatch));
    }

    #[test]
    fn alg_none_and_hmac_are_refused() {
        let payload = URL_SAFE_NO_PAD.encode(testkeys::claims_now().to_string());
        for alg in ["none", "None", "NONE", "HS256", "HS512", ""] {
            let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}","kid":"{}"}}"#, testkeys::RS_KID));
            let t = format!("{header}.{payload}.c2ln");
            assert_eq!(check(&t), Err(Rejection::UnsupportedAlgorithm), "{alg}");
            let t = format!("{header}.{payload}.");
            assert_eq!(check(&t), Err(Rejection::Malformed), "{alg} empty signature");
        }
    }

    #[test]
    fn token_signed_by_another_key_with_our_kid_is_rejected() {
        let t = testkeys::sign_rs256_with_fresh_key(&testkeys::claims_now(), testkeys::RS_KID);
        assert_eq!(check(&t), Err(Rejection::BadSignature));
    }

    #[test]
    fn unknown_kid_and_mismatched_alg_are_rejected() {
        let t = testkeys::sign_rs256_with_fresh_key(&testkeys::claims_now(), "someone-else");
        assert_eq!(check(&t), Err(Rejection::UnknownKey));
        // An RS256 header naming the EC key.
        let t = testkeys::sign_rs256_with_fresh_key(&testkeys::claims_now(), testkeys::ES_KID);
        assert_eq!(check(&t), Err(Rejection::KeyAlgorithmMismatch));
    }

    #[test]
    fn crit_header_is_refused() {
        let t = testkeys::sign_with_header(&testkeys::claims_now(), json!({"crit": ["exp"]}));
        assert_eq!(check(&t), Err(Rejection::CriticalHeader));
    }

    #[test]
    fn header_carried_keys_are_ignored() {
        // A forged token carrying the attacker's key inline still has to verify against our JWKS.
        let t = testkeys::sign_rs256_with_fresh_key_and_header(
            &testkeys::claims_now(),
            json!({"kid": testkeys::RS_KID, "jku": "https://evil.example/jwks", "jwk": {"kty": "RSA"}, "x5u": "https://evil.example/c"}),
        );
        assert_eq!(check(&t), Err(Rejection::BadSignature));
        // Our own token with such members is still fine: they are simply not read.
        let t = testkeys::sign_with_header(&testkeys::claims_now(), json!({"jku": "https://evil.example/jwks"}));
        assert!(check(&t).is_ok());
    }

    #[test]
    fn structurally_broken_tokens_are_malformed() {
        let good = testkeys::sign_rs256(&testkeys::claims_now());
        let cases = [
            String::new(),
            "a".into(),
            "a.b".into(),
            "a.b.c.d".into(),
            "a.b.c.d.e".into(),
            format!("{good}."),
            format!("{good}x"),
            good.replacen('.', ".!", 1),
            format!("e30.{}", good.split_once('.').unwrap().1),
            format!("bnVsbA.{}", good.split_once('.').unwrap().1),
        ];
        for t in cases {
            assert!(matches!(check(&t), Err(Rejection::Malformed | Rejection::BadSignature)), "{t:?}");
        }
    }

    #[test]
    fn oversized_token_is_refused_before_parsing() {
        let t = "a".repeat(provider().max_token_bytes + 1);
        assert_eq!(check(&t), Err(Rejection::TokenTooLarge));
    }

    #[test]
    fn without_keys_a_plausible_token_waits_but_a_bad_one_is_refused() {
        let ok = testkeys::sign_rs256(&testkeys::claims_now());
        assert_eq!(verify(&ok, None, &provider(), NOW, &PureRust), Err(Rejection::KeysUnavailable));
        let expired = testkeys::sign_rs256(&with(json!({"exp": NOW - 3600})));
        assert_eq!(verify(&expired, None, &provider(), NOW, &PureRust), Err(Rejection::Expired));
    }

    // --- Per-provider checks (issue 25). Token shapes follow each IdP's documentation: Entra ID
    // (learn.microsoft.com/entra/identity-platform/access-token-claims-reference: v1 `iss`
    // https://sts.windows.net/{tid}/, v2 https://login.microsoftonline.com/{tid}/v2.0, `tid`, `roles`,
    // `appid`/`azp`, `ver`), Amazon Cognito (docs.aws.amazon.com/cognito/latest/developerguide/
    // amazon-cognito-user-pools-using-the-access-token.html: no `aud`, `client_id`, `token_use`), RFC 9068.

    const DIR_A: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    const DIR_B: &str = "f8cdef31-a31e-4b4a-93e4-5f571e91255a";

    fn entra_v2() -> Provider {
        let mut p = provider();
        p.issuer = "https://login.microsoftonline.com/{tid}/v2.0".into();
        p.template = crate::config::IssuerTemplate::parse_for_tests(&p.issuer);
        p
    }

    fn entra_v2_claims(iss_dir: &str, tid: serde_json::Value) -> serde_json::Value {
        json!({
            "aud": testkeys::AUDIENCE, "iss": format!("https://login.microsoftonline.com/{iss_dir}/v2.0"),
            "iat": NOW, "nbf": NOW, "exp": NOW + 3600, "azp": "00000000-0000-0000-0000-0000000000bb", "azpacr": "1",
            "oid": "11111111-0000-0000-0000-000000000001", "roles": ["system/Patient.rs"],
            "sub": "11111111-0000-0000-0000-000000000001", "tid": tid, "uti": "AbCdEf", "ver": "2.0"
        })
    }

    fn check_with(p: &Provider, token: &str) -> Result<Claims, Rejection> {
        verify(token, Some(&keys()), p, NOW, &PureRust)
    }

    #[test]
    fn an_entra_template_issuer_binds_iss_to_the_tokens_own_tid() {
        let p = entra_v2();
        let ok = testkeys::sign_rs256(&entra_v2_claims(DIR_A, json!(DIR_A)));
        assert_eq!(check_with(&p, &ok).unwrap().str("tid"), Some(DIR_A));
        // `iss` names directory A, `tid` names B (and the other way round): refused.
        for (iss, tid) in [(DIR_A, DIR_B), (DIR_B, DIR_A)] {
            let t = testkeys::sign_rs256(&entra_v2_claims(iss, json!(tid)));
            assert_eq!(check_with(&p, &t), Err(Rejection::IssuerMismatch), "iss {iss} tid {tid}");
        }
        // A `tid` that is no placeholder value, even when `iss` is built from it.
        let long = "a".repeat(129);
        for bad in ["", "..", ".", "a/b", "../x", "x?y", "x#y", "a b", "%2e%2e", "ä", long.as_str()] {
            let t = testkeys::sign_rs256(&entra_v2_claims(bad, json!(bad)));
            assert_eq!(check_with(&p, &t), Err(Rejection::IssuerMismatch), "tid {bad:?}");
        }
        let max = "a".repeat(128);
        assert!(check_with(&p, &testkeys::sign_rs256(&entra_v2_claims(&max, json!(max)))).is_ok());
        // A `tid` of another type, absent, or the placeholder left as written.
        for tid in [json!(null), json!([DIR_A]), json!(7)] {
            let t = testkeys::sign_rs256(&entra_v2_claims(DIR_A, tid.clone()));
            assert_eq!(check_with(&p, &t), Err(Rejection::IssuerMismatch), "tid {tid}");
        }
        let mut c = entra_v2_claims(DIR_A, json!(DIR_A));
        c["iss"] = json!("https://login.microsoftonline.com/{tid}/v2.0");
        assert_eq!(check_with(&p, &testkeys::sign_rs256(&c)), Err(Rejection::IssuerMismatch));
        // Case matters in `iss` as in the template (Entra writes the GUID lowercase in both).
        let mut c = entra_v2_claims(DIR_A, json!(DIR_A));
        c["iss"] = json!(format!("https://login.microsoftonline.com/{}/v2.0", DIR_A.to_uppercase()));
        assert_eq!(check_with(&p, &testkeys::sign_rs256(&c)), Err(Rejection::IssuerMismatch));
    }

    #[test]
    fn token_typ_accepts_at_jwt_in_any_case_with_or_without_application_and_refuses_the_rest() {
        let mut p = provider();
        p.token_typ = Some("at+jwt".into());
        let claims = testkeys::claims_now();
        for typ in ["at+jwt", "AT+JWT", "application/at+jwt", "Application/AT+JWT"] {
            let t = testkeys::sign_with_header(&claims, json!({"typ": typ}));
            assert!(check_with(&p, &t).is_ok(), "{typ}");
        }
        for typ in [
            json!("JWT"),
            json!(null),
            json!("jwt"),
            json!("application/jwt"),
            json!("at+jwt "),
            json!("application/application/at+jwt"),
            json!("x/at+jwt"),
            json!(["at+jwt"]),
            json!(1),
        ] {
            let t = testkeys::sign_with_header(&claims, json!({"typ": typ}));
            assert_eq!(check_with(&p, &t), Err(Rejection::WrongTokenType), "{typ}");
        }
        // Without token_typ, `typ` is not read (Entra, Okta and Keycloak send `JWT`).
        let t = testkeys::sign_with_header(&claims, json!({"typ": "JWT"}));
        assert!(check(&t).is_ok());
        let t = testkeys::sign_with_header(&claims, json!({"typ": null}));
        assert!(check(&t).is_ok());
    }

    #[test]
    fn audience_claim_client_id_checks_cognitos_client_id_as_aud_would_be() {
        let mut p = provider();
        p.audience_claim = "client_id".into();
        p.audiences = vec!["1example23456789".into()];
        // A Cognito access token: no `aud`; the app client in `client_id`.
        let cognito = json!({
            "sub": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "iss": testkeys::ISSUER, "client_id": "1example23456789",
            "origin_jti": "x", "token_use": "access", "scope": "https://fhir.example.com/system.Patient.read",
            "auth_time": NOW, "exp": NOW + 3600, "iat": NOW, "jti": "j", "version": 2
        });
        assert!(check_with(&p, &testkeys::sign_with_header(&cognito, json!({"typ": null}))).is_ok());
        for other in [json!("another-client"), json!(["x", "1example23456789"]), json!(["x"]), json!(12), json!(null)] {
            let mut c = cognito.clone();
            c["client_id"] = other.clone();
            let verdict = check_with(&p, &testkeys::sign_rs256(&c));
            if other == json!(["x", "1example23456789"]) {
                assert!(verdict.is_ok(), "an array holding an audience passes, as `aud` does");
            } else {
                assert_eq!(verdict, Err(Rejection::AudienceMismatch), "{other}");
            }
        }
        // `aud` itself is no longer what is compared, nor a stand-in when `client_id` is missing.
        let mut c = cognito.clone();
        c.as_object_mut().unwrap().remove("client_id");
        c["aud"] = json!("1example23456789");
        assert_eq!(check_with(&p, &testkeys::sign_rs256(&c)), Err(Rejection::AudienceMismatch));
        let mut c = cognito.clone();
        c["client_id"] = json!("another-client");
        c["aud"] = json!("1example23456789");
        assert_eq!(check_with(&p, &testkeys::sign_rs256(&c)), Err(Rejection::AudienceMismatch));
    }

    #[test]
    fn required_claims_must_equal_the_string_or_be_an_array_holding_it() {
        let mut p = provider();
        p.required_claims = vec![("token_use".into(), "access".into()), ("gty".into(), "client-credentials".into())];
        let ok = with(json!({"token_use": "access", "gty": "client-credentials"}));
        assert!(check_with(&p, &testkeys::sign_rs256(&ok)).is_ok());
        let ok = with(json!({"token_use": ["id", "access"], "gty": ["client-credentials"]}));
        assert!(check_with(&p, &testkeys::sign_rs256(&ok)).is_ok());
        for bad in [
            json!({"token_use": "id", "gty": "client-credentials"}),
            json!({"token_use": "access"}),
            json!({"token_use": "Access", "gty": "client-credentials"}),
            json!({"token_use": ["id"], "gty": "client-credentials"}),
            json!({"token_use": [["access"]], "gty": "client-credentials"}),
            json!({"token_use": {"access": true}, "gty": "client-credentials"}),
            json!({"token_use": "access ", "gty": "client-credentials"}),
            json!({"token_use": "access", "gty": "client-credentials password"}),
            json!({"token_use": true, "gty": "client-credentials"}),
        ] {
            assert_eq!(
                check_with(&p, &testkeys::sign_rs256(&with(bad.clone()))),
                Err(Rejection::MissingRequiredClaim),
                "{bad}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_tokens_never_panic(s in "\\PC{0,300}") {
            let _ = check(&s);
        }

        #[test]
        fn arbitrary_three_part_tokens_never_panic(a in "[A-Za-z0-9_-]{0,80}", b in "[A-Za-z0-9_-]{0,80}", c in "[A-Za-z0-9_-]{0,80}") {
            let _ = check(&format!("{a}.{b}.{c}"));
        }
    }
}
