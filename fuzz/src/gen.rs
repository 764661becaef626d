//! Input generators of the deterministic runner, one per parser: each runs `n` inputs made from `rng`.

use std::cell::RefCell;
use std::collections::HashSet;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use fhir_tenant_router::cache::TokenCache;
use fhir_tenant_router::crypto::PureRust;
use fhir_tenant_router::decision::{decide, Decision, Known, Request};
use fhir_tenant_router::jwks::KeySet;
use fhir_tenant_router::tenant::TenantError;
use fhir_tenant_router::{Config, Rejection};
use serde_json::{json, Value};

use crate::checks;
use crate::fixtures::{self, Signers, AUDIENCE, ES_KID, ISSUER, NOW, RS_KID, TENANT_A, TENANT_B};
use crate::mutate::{b64_blob, edge_value, json_document, mutate_bytes, mutate_json, splice};
use crate::rng::Rng;

/// What one generator did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub inputs: u64,
    /// Inputs the parser accepted (a token verified, a document compiled, a tenant found …), to show that the
    /// inputs reach past the first checks.
    pub accepted: u64,
}

impl Stats {
    fn add(&mut self, accepted: bool) {
        self.inputs += 1;
        self.accepted += u64::from(accepted);
    }
}

thread_local! {
    static CURRENT: RefCell<(&'static str, Vec<u8>)> = const { RefCell::new(("", Vec::new())) };
}

/// Remembers the input about to be parsed, for the panic report.
pub fn note(parser: &'static str, input: &[u8]) {
    CURRENT.with(|c| {
        let mut c = c.borrow_mut();
        c.0 = parser;
        c.1.clear();
        c.1.extend_from_slice(input);
    });
}

/// The input being parsed on this thread, escaped.
pub fn current() -> (String, String) {
    CURRENT.with(|c| {
        let c = c.borrow();
        (c.0.to_string(), c.1.escape_ascii().to_string())
    })
}

pub fn bearer(rng: &mut Rng, n: usize) -> Stats {
    const SEEDS: &[&str] = &[
        "Bearer eyJhbGciOiJFUzI1NiJ9.eyJzY29wZSI6ImEifQ.c2ln",
        "bearer abc",
        "BEARER  abc==",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "",
        " ",
        "Bearer a b",
        "Bearer\tabc",
        "Bearer ===",
        "Bearer a=b",
        "Bearer ~+/-._",
        "Bearer \u{e9}",
        "B\u{e9}arer x",
        "Bearer\u{a0}x",
        "Bearer  \u{0}",
        "bEaReR x.y.z=",
    ];
    let mut stats = Stats::default();
    for _ in 0..n {
        let mut bytes = rng.pick(SEEDS).as_bytes().to_vec();
        match rng.below(4) {
            0 => mutate_bytes(rng, &mut bytes),
            1 => {
                let len = rng.len(40);
                bytes = (0..len).map(|_| *rng.pick(b"Bearer bB =~+/-._.\t\xc3\xa9aZ09")).collect();
            }
            2 => {
                let other = rng.pick(SEEDS).as_bytes();
                bytes = splice(rng, &bytes, other);
            }
            _ => {
                let len = rng.len(64);
                bytes = rng.bytes(len);
            }
        }
        note("bearer", &bytes);
        let header = String::from_utf8_lossy(&bytes);
        if rng.percent(1) {
            checks::bearer(None);
        } else {
            checks::bearer(Some(&header));
        }
        stats.add(matches!(
            fhir_tenant_router::bearer::extract_bearer(Some(&header)),
            fhir_tenant_router::bearer::Credentials::Bearer(_)
        ));
    }
    stats
}

pub fn der(rng: &mut Rng, n: usize) -> Stats {
    let mut stats = Stats::default();
    for _ in 0..n {
        let scalar_len = match rng.below(10) {
            0..=5 => 32,
            6 | 7 => 48,
            8 => rng.below(200),
            _ => *rng.pick(&[0usize, 1, usize::MAX, usize::MAX / 2, usize::MAX / 2 + 1, 1 << 31]),
        };
        let len = match rng.below(10) {
            0 => rng.below(130),
            _ => scalar_len.saturating_mul(2).min(4096),
        };
        // Bias towards leading zeros, high bits and all-zero or all-0xff halves.
        let mut raw: Vec<u8> = (0..len)
            .map(|_| match rng.below(6) {
                0 => 0,
                1 => 0xff,
                2 => 0x80,
                3 => 0x7f,
                _ => rng.byte(),
            })
            .collect();
        if rng.percent(30) {
            let zeros = rng.below(len + 1);
            let start = if rng.percent(50) { 0 } else { len / 2 };
            for b in raw.iter_mut().skip(start).take(zeros) {
                *b = 0;
            }
        }
        note("der", &raw);
        stats.add(checks::der(&raw, scalar_len));
    }
    stats
}

pub fn host_proto(rng: &mut Rng, n: usize) -> Stats {
    const SEEDS: &[&[u8]] = &[
        &[0x08, 0x01],
        &[0x08, 0x00, 0x12, 0x03, b'b', b'a', b'd'],
        &[0x08, 0x81, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01],
        &[0x12, 0xff, 0xff, 0xff, 0xff, 0x0f],
        &[0x12, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01],
        &[0x0d, 0, 0, 0, 0],
        &[0x09, 0, 0, 0, 0, 0, 0, 0, 0],
        &[],
    ];
    let mut stats = Stats::default();
    for _ in 0..n {
        let mut bytes = rng.pick(SEEDS).to_vec();
        match rng.below(3) {
            0 => mutate_bytes(rng, &mut bytes),
            1 => {
                let len = rng.len(32);
                bytes = (0..len).map(|_| *rng.pick(&[0x08, 0x10, 0x12, 0x1a, 0x80, 0xff, 0x00, 0x01, 0x7f])).collect();
            }
            _ => {
                let len = rng.len(48);
                bytes = rng.bytes(len);
            }
        }
        note("host_proto", &bytes);
        stats.add(checks::host_proto(&bytes) == Some(true));
    }
    stats
}

/// JWKS seeds: the test JWKS, and documents mixing usable, unusable and borderline keys.
fn jwks_seeds(rng: &mut Rng) -> Vec<Value> {
    let public = fixtures::public_jwks();
    let rs = public["keys"][0].clone();
    let es = public["keys"][1].clone();
    let mut many = Vec::new();
    for i in 0..70 {
        let mut k = if i % 2 == 0 { rs.clone() } else { es.clone() };
        k["kid"] = json!(format!("k{i}"));
        many.push(k);
    }
    let n2047 = {
        let mut b = rng.bytes(256);
        b[0] = 0x7f;
        b[255] |= 1;
        URL_SAFE_NO_PAD.encode(b)
    };
    vec![
        public.clone(),
        json!({"keys": [rs.clone()]}),
        json!({"keys": [es.clone()]}),
        json!({"keys": many}),
        json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}, {"kty": "OKP", "crv": "Ed25519", "x": "AA"}, es.clone()]}),
        json!({"keys": [{"kty": "RSA", "n": n2047, "e": "AQAB"}, {"kty": "EC", "crv": "P-384",
            "x": b64_blob(rng), "y": b64_blob(rng)}, rs.clone()]}),
        json!({"keys": [{"kty": "RSA", "alg": "PS256", "use": "sig", "n": rs["n"], "e": "Aw"},
            {"kty": "EC", "alg": "ES384", "crv": "P-256", "x": es["x"], "y": es["y"]}]}),
        json!({"keys": [], "extra": 1}),
    ]
}

pub fn jwks(rng: &mut Rng, n: usize) -> Stats {
    let seeds = jwks_seeds(rng);
    let mut stats = Stats::default();
    for i in 0..n {
        let seed = rng.pick(&seeds);
        let bytes = match rng.below(20) {
            0 => serde_json::to_vec(seed).unwrap_or_default(),
            1 => {
                let a = serde_json::to_vec(seed).unwrap_or_default();
                let b = serde_json::to_vec(rng.pick(&seeds)).unwrap_or_default();
                splice(rng, &a, &b)
            }
            2 if i % 1000 == 0 => {
                // Around the size limit.
                let pad = fhir_tenant_router::jwks::MAX_JWKS_BYTES - 20 + rng.below(40);
                let mut doc = serde_json::to_vec(seed).unwrap_or_default();
                doc.resize(pad.max(doc.len()), b' ');
                doc
            }
            _ => json_document(rng, seed),
        };
        note("jwks", &bytes);
        stats.add(checks::jwks(&bytes));
    }
    stats
}

pub fn config(rng: &mut Rng, n: usize) -> Stats {
    let seeds = [fixtures::config_json(), fixtures::remote_config_json()];
    let mut stats = Stats::default();
    for _ in 0..n {
        let seed = rng.pick(&seeds);
        let bytes = match rng.below(20) {
            0 => serde_json::to_vec(seed).unwrap_or_default(),
            1 => {
                let a = serde_json::to_vec(&seeds[0]).unwrap_or_default();
                let b = serde_json::to_vec(&seeds[1]).unwrap_or_default();
                splice(rng, &a, &b)
            }
            _ => json_document(rng, seed),
        };
        note("config", &bytes);
        stats.add(checks::config(&bytes));
    }
    stats
}

/// One scope value: a configured id in any case, under a prefix or not, or something close to one.
fn scope_value(rng: &mut Rng, ids: &[&str]) -> String {
    let id = rng.pick(ids).to_string();
    let id = match rng.below(4) {
        0 => id.to_ascii_uppercase(),
        1 => id.chars().map(|c| if rng.percent(50) { c.to_ascii_uppercase() } else { c }).collect(),
        _ => id,
    };
    match rng.below(14) {
        0..=3 => id,
        4 | 5 => format!("tenant/{id}"),
        6 => format!("a{id}"),
        7 => rng.pick(&["openid", "system/*.read", "tenant/", "tenant", "a", "", "profile"]).to_string(),
        8 => id.replacen('e', "\u{435}", 1), // a Cyrillic look-alike
        9 => format!("{id}\u{0}"),
        10 => format!("../{id}"),
        11 => "x".repeat(*rng.pick(&[127usize, 128, 129, 300])),
        12 => {
            let mut b = id.into_bytes();
            mutate_bytes(rng, &mut b);
            String::from_utf8_lossy(&b).into_owned()
        }
        _ => format!("tenant/tenant/{id}"),
    }
}

/// A tenant claim value: usually a space-delimited string, sometimes an array or another JSON type.
fn tenant_claim(rng: &mut Rng, ids: &[&str]) -> Option<Value> {
    let count = rng.below(5);
    let values: Vec<String> = (0..count).map(|_| scope_value(rng, ids)).collect();
    Some(match rng.below(10) {
        0..=5 => {
            let mut s = String::new();
            for v in &values {
                s.push_str(v);
                let sep: &str = *rng.pick(&[" ", " ", " ", "  ", "\t", "\u{a0}", ",", "+"]);
                s.push_str(sep);
            }
            if rng.percent(50) {
                s = s.trim_end().to_string();
            }
            Value::String(s)
        }
        6 | 7 => Value::Array(
            values.into_iter().map(|v| if rng.percent(90) { Value::String(v) } else { edge_value(rng, 2) }).collect(),
        ),
        8 => return None,
        _ => edge_value(rng, 0),
    })
}

pub fn tenant(rng: &mut Rng, n: usize) -> Stats {
    let cases = checks::tenant_maps();
    let mut stats = Stats::default();
    for _ in 0..n {
        let case = rng.pick(cases);
        let claim = tenant_claim(rng, &case.ids);
        note("tenant", claim.as_ref().map(|c| c.to_string()).unwrap_or_default().as_bytes());
        stats.add(checks::tenant(case, claim.as_ref()));
    }
    stats
}

/// Fragments SMART scope values are built of (contexts, types, permissions, parameters) and others.
const SCOPE_PARTS: [&str; 24] = [
    "system/",
    "user/",
    "patient/",
    "launch/",
    "Patient",
    "Observation",
    "*",
    "patient",
    ".",
    ".read",
    ".write",
    ".*",
    ".rs",
    ".cruds",
    ".c",
    ".sr",
    ".rr",
    "?category=laboratory",
    "?",
    "openid",
    "6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f",
    "\u{0}",
    "é",
    "/",
];

/// A scope claim: SMART-looking values glued from fragments, as a string or a list, sometimes oversized.
fn scope_claim(rng: &mut Rng) -> Option<Value> {
    let count = rng.below(6);
    let values: Vec<String> = (0..count)
        .map(|_| match rng.below(4) {
            0 => format!(
                "system/{}{}",
                rng.pick(&["Patient", "Observation", "*", "X1"]),
                rng.pick(&[".read", ".rs", ".cruds", ".write", ".*", ".u"])
            ),
            _ => (0..1 + rng.below(5)).map(|_| *rng.pick(&SCOPE_PARTS)).collect(),
        })
        .collect();
    Some(match rng.below(10) {
        0..=5 => Value::String(values.join(*rng.pick(&[" ", "  ", "\t"]))),
        6 | 7 => Value::Array(values.into_iter().map(Value::String).collect()),
        8 => Value::String(format!("system/Patient.read {}", "x".repeat(4000 + rng.below(200)))),
        _ => return if rng.percent(50) { None } else { Some(edge_value(rng, 0)) },
    })
}

pub fn scopes(rng: &mut Rng, n: usize) -> Stats {
    let mut stats = Stats::default();
    for _ in 0..n {
        let claim = scope_claim(rng);
        note("scopes", claim.as_ref().map(|c| c.to_string()).unwrap_or_default().as_bytes());
        stats.add(checks::scopes(claim.as_ref()));
    }
    stats
}

/// The token generator: valid tokens signed with the test keys, mutated at byte level, in their JSON, in
/// their signature, spliced, or replaced by garbage.
pub struct Tokens {
    signers: Signers,
    pool: Vec<String>,
    /// Every signing input signed by a test key: only these may verify.
    pub signed: HashSet<String>,
}

impl Tokens {
    pub fn new() -> Self {
        let signers = Signers::new();
        let mut signed = HashSet::new();
        let mut pool = Vec::new();
        let mut claims = fixtures::claims_now();
        for (i, rsa) in [(0, true), (1, false), (2, false), (3, true)] {
            claims["jti"] = json!(format!("seed-{i}"));
            let (token, input) = if rsa { signers.rs256_token(&claims) } else { signers.es256_token(&claims) };
            signed.insert(input);
            pool.push(token);
        }
        // Without `kid`, with an array `aud`, with fractional times.
        let header = json!({"alg": "ES256"});
        let claims = json!({"iss": ISSUER, "aud": ["x", AUDIENCE], "exp": NOW as f64 + 0.5, "nbf": NOW - 10,
                            "scope": format!("openid tenant/{TENANT_B}")});
        let (token, input) = signers.sign(header.to_string().as_bytes(), claims.to_string().as_bytes(), false);
        signed.insert(input);
        pool.push(token);
        Self { signers, pool, signed }
    }

    fn split(token: &str) -> (Value, Value, Vec<u8>) {
        let mut parts = token.split('.');
        let mut next_json = || {
            parts
                .next()
                .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(Value::Null)
        };
        let header = next_json();
        let payload = next_json();
        let sig = token.rsplit('.').next().and_then(|s| URL_SAFE_NO_PAD.decode(s).ok()).unwrap_or_default();
        (header, payload, sig)
    }

    /// One token to verify.
    pub fn next(&mut self, rng: &mut Rng) -> String {
        let base = rng.pick(&self.pool).clone();
        match rng.below(20) {
            // Byte-level mutation of the compact form.
            0..=4 => {
                let mut b = base.into_bytes();
                mutate_bytes(rng, &mut b);
                String::from_utf8_lossy(&b).into_owned()
            }
            // JSON mutation of header or claims, then signed again (ES256, rarely RS256) or not.
            5..=11 => {
                let (mut header, mut payload, sig) = Self::split(&base);
                for _ in 0..1 + rng.below(3) {
                    if rng.percent(35) {
                        mutate_json(rng, &mut header);
                    } else {
                        mutate_json(rng, &mut payload);
                    }
                }
                if rng.percent(15) && header.is_object() {
                    header["alg"] = json!(rng.pick(&["RS256", "ES256", "PS256", "RS512", "ES384", "none"]));
                    header["kid"] = json!(rng.pick(&[RS_KID, ES_KID, "other"]));
                }
                let h = header.to_string().into_bytes();
                let p = payload.to_string().into_bytes();
                if rng.percent(75) {
                    let (token, input) = self.signers.sign(&h, &p, rng.percent(2));
                    self.signed.insert(input);
                    token
                } else {
                    fixtures::compact_raw(&h, &p, &sig)
                }
            }
            // Signature mutation only.
            12..=14 => {
                let (input, sig) = base.rsplit_once('.').unwrap_or((&base, ""));
                let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap_or_default();
                match rng.below(5) {
                    0 => mutate_bytes(rng, &mut sig),
                    1 => sig.truncate(rng.below(sig.len() + 1)),
                    2 => sig.iter_mut().for_each(|b| *b = 0),
                    3 => {
                        let half = sig.len() / 2;
                        sig.rotate_left(half); // s || r
                    }
                    _ => {
                        let extra = 1 + rng.below(64);
                        sig.extend(rng.bytes(extra));
                    }
                }
                format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
            }
            // Parts shuffled, doubled, dropped, or from different tokens.
            15 | 16 => {
                let other = rng.pick(&self.pool).clone();
                let parts: Vec<&str> = base.split('.').chain(other.split('.')).collect();
                let count = rng.below(6);
                let picked: Vec<&str> = (0..count).map(|_| *rng.pick(&parts)).collect();
                let joined = picked.join(*rng.pick(&[".", ".", "..", ""][..]));
                if rng.percent(30) {
                    String::from_utf8_lossy(&splice(rng, base.as_bytes(), other.as_bytes())).into_owned()
                } else {
                    joined
                }
            }
            // Raw parts the generator writes itself.
            17 => {
                let h = json_document(rng, &json!({"alg": "ES256", "kid": ES_KID}));
                let p = json_document(rng, &fixtures::claims_now());
                let len = *rng.pick(&[0usize, 1, 63, 64, 65, 96, 256]);
                let s = rng.bytes(len);
                fixtures::compact_raw(&h, &p, &s)
            }
            // Long tokens around the size limit, and garbage.
            18 => {
                let len = 8192 - 4 + rng.below(8);
                let mut b = base.into_bytes();
                b.resize(len, b'A');
                String::from_utf8_lossy(&b).into_owned()
            }
            _ => {
                let len = rng.len(300);
                String::from_utf8_lossy(&rng.bytes(len)).into_owned()
            }
        }
    }
}

impl Default for Tokens {
    fn default() -> Self {
        Self::new()
    }
}

fn any_now(rng: &mut Rng) -> i64 {
    if rng.percent(95) {
        NOW
    } else {
        *rng.pick(&[i64::MIN, i64::MAX, 0, -1, NOW + 3600 + 60, NOW + 3600 + 61, NOW - 61, i64::MAX - 30])
    }
}

pub fn token(rng: &mut Rng, n: usize) -> Stats {
    let keys = fixtures::keys();
    let config = fixtures::config();
    let mut small = config.providers[0].provider.clone();
    small.max_token_bytes = 256;
    small.clock_skew_s = 0;
    let mut tokens = Tokens::new();
    let mut stats = Stats::default();
    for _ in 0..n {
        let token = tokens.next(rng);
        let now = any_now(rng);
        note("token", token.as_bytes());
        let provider = if rng.percent(5) { &small } else { &config.providers[0].provider };
        let keys = if rng.percent(2) { None } else { Some(&keys) };
        let result = checks::token(&token, keys, provider, now, Some(&tokens.signed));
        stats.add(result.is_ok());
    }
    stats
}

/// Whole requests through `decide`: public paths, headers, properly signed tokens whose scope comes from the
/// tenant generator, and a token cache that persists across requests. For an unaltered `Bearer <token>` the
/// tenant chosen must be the one the reference resolution names.
pub fn decide_requests(rng: &mut Rng, n: usize) -> Stats {
    let keys: KeySet = fixtures::keys();
    let config: Config = fixtures::config();
    let reference = &checks::tenant_maps()[0]; // same ids and prefixes as the config
    let signers = Signers::new();
    let mut cache = TokenCache::new(*rng.pick(&[0usize, 1, 8, 64]));
    let mut recent: Vec<(String, Option<Value>, bool)> = Vec::new();
    let mut stats = Stats::default();
    for _ in 0..n {
        let (token, claim, mutated) = if !recent.is_empty() && rng.percent(30) {
            rng.pick(&recent).clone() // a repeat: served from the cache when enabled
        } else {
            let claim = if rng.percent(50) {
                // What clients really send: one tenant, alone or beside other scopes.
                let v = *rng.pick(&[
                    TENANT_A,
                    TENANT_B,
                    "tenant/3b9a7c55-1d2e-4f60-8a7b-9c0d1e2f3a4b",
                    "openid 6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f",
                    "6F1C2D0E-8A3B-4C5D-9E7F-0A1B2C3D4E5F system/*.read",
                ]);
                Some(Value::String(v.to_string()))
            } else {
                tenant_claim(rng, &[TENANT_A, TENANT_B])
            };
            let mut claims = json!({"iss": ISSUER, "aud": AUDIENCE, "iat": NOW, "exp": NOW + 600});
            if let Some(c) = &claim {
                claims["scope"] = c.clone();
            }
            let mutated = rng.percent(10);
            if mutated {
                mutate_json(rng, &mut claims);
            }
            let (token, _) = signers.es256_token(&claims);
            let claim = claims.get("scope").cloned();
            let entry = (token, claim, mutated);
            if recent.len() < 64 {
                recent.push(entry.clone());
            } else {
                let i = rng.below(recent.len());
                recent[i] = entry.clone();
            }
            entry
        };
        let method = *rng.pick(&["GET", "GET", "POST", "HEAD", "get", "", "PUT"]);
        let path = *rng.pick(&[
            "/Patient",
            "/metadata",
            "/metadata?x=1",
            "/.well-known/smart-configuration",
            "/Patient/_search",
            "/metadata/",
            "//metadata",
            "/",
            "",
        ]);
        let exact = rng.percent(80);
        let auth = if exact {
            format!("Bearer {token}")
        } else {
            let mut b = format!("{} {token}", rng.pick(&["Bearer", "bearer", "Basic", "Bearer "])).into_bytes();
            if rng.percent(50) {
                mutate_bytes(rng, &mut b);
            }
            String::from_utf8_lossy(&b).into_owned()
        };
        let duplicate = rng.percent(3);
        let now = if rng.percent(90) { NOW } else { NOW + 600 + 60 + rng.below(3) as i64 - 1 };
        note("decide", auth.as_bytes());
        let request = Request {
            method,
            path,
            authorization: Some(&auth),
            duplicate_authorization: duplicate,
            ..Request::default()
        };
        let decision = decide(
            &Known { config: &config, tenants: Some(&config.tenants), keys: &Some(&keys), signatures: &PureRust },
            &request,
            &mut cache,
            now,
        );
        let public = fhir_tenant_router::public::is_public(method, path);
        if matches!(decision, Decision::Route { .. } | Decision::Reject(_)) {
            assert!(!public, "a public document went through the token check");
        }
        if exact && !duplicate && !public && now <= NOW + 600 + 60 {
            let want = checks::reference_tenant(reference, claim.as_ref());
            match (&decision, want) {
                (Decision::Route { tenant, .. }, Ok(id)) => assert_eq!(tenant.id, id),
                (Decision::Reject(Rejection::NoTenant), Err(TenantError::None)) => {}
                (Decision::Reject(Rejection::SeveralTenants), Err(TenantError::Several)) => {}
                // A mutated claim set may fail verification (issuer, audience, times) before the tenant.
                (Decision::Reject(r), _) if !matches!(r, Rejection::NoTenant | Rejection::SeveralTenants) => {}
                // The tenant was found, then its FHIR allowlist refused the interaction.
                (Decision::Forbidden { .. }, Ok(_)) => {}
                (d, want) => panic!("decide gave {d:?}, the reference resolution {want:?}"),
            }
        }
        if now > NOW + 600 + 60 && !public && !mutated {
            assert!(!matches!(decision, Decision::Route { .. }), "an expired token was routed (cache?)");
        }
        stats.add(matches!(decision, Decision::Route { .. } | Decision::Forbidden { .. }));
    }
    stats
}

/// Serializes header pairs as the proxy-wasm host hands them over.
fn serialize_pairs(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        out.extend((k.len() as u32).to_le_bytes());
        out.extend((v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend(k);
        out.push(0);
        out.extend(v);
        out.push(0);
    }
    out
}

/// Whole host event sequences through the core's [`Router`]: raw header maps (some malformed, some with
/// duplicate or spoofed headers), request bodies, responses to edit, ticks, fetch results with mutated
/// JWKS and registry documents, and streams that end at any point. Checks: no panic, and no effect ever
/// carries the token (answers and log lines included).
pub fn router_events(rng: &mut Rng, n: usize) -> Stats {
    use fhir_tenant_router::effect::{FetchTarget, Recorded};
    use fhir_tenant_router::router::{Router, Stream};
    use fhir_tenant_router::upkeep::FetchResult;

    let mut json = if rng.percent(50) { fixtures::config_json() } else { fixtures::remote_config_json() };
    json["audit_log"] = json!(true);
    json["access_log_filter_state"] = json!(true);
    json["discovery"] = json!({"token_endpoint": "http://127.0.0.1:9000/token"});
    json["public_base_url"] = json!("https://fhir.example/r4");
    if rng.percent(30) {
        json["tenant_registry"] = json!({"uri": "http://127.0.0.1:9100/tenants", "cluster": "registry",
            "secret_scope": {"env_prefixes": ["FTR_REG_"], "file_directory": "/etc/ftr"}});
    }
    json["tenants"][TENANT_A] = json!({"cluster": "tenant_a", "base_path": "/fhir", "links_base_url": "http://up/fhir",
        "allow": {"interactions": ["read", "search", "create"]}});
    if rng.percent(50) {
        // Paging cursors (issue 23): links under the public base become cursors, cursors and raw paging requests
        // are read.
        json["paging_cursors"] = json!({"key": {"env": "FUZZ_CURSOR_KEY"}, "ttl_s": 60});
    }
    let env = |name: &str| (name == "FUZZ_CURSOR_KEY").then(|| "k".repeat(40));
    let config = Config::from_json_with_env(json.to_string().as_bytes(), &env).expect("fuzz config compiles");
    let now_ms = NOW as u64 * 1000;
    let mut sink = Recorded::default();
    let mut router = Router::new(config, now_ms, &mut sink);
    // A cursor this router minted, once a response gave one (then replayed, mutated, by later requests).
    let mut cursor_path: Option<String> = None;
    let signers = Signers::new();
    let jwks_doc = fixtures::public_jwks();
    let registry_doc = json!({"tenants": {TENANT_A: {"cluster": "tenant_a"}, TENANT_B: {"url": "http://b/fhir"}}});
    let registry_doc_with_secret = json!({"tenants": {TENANT_A: {"cluster": "tenant_a",
        "upstream_header": {"name": "x-api-key", "env": "FTR_REG_KEY"}}, TENANT_B: {"url": "http://b/fhir"}}});
    // A registry document is asked only for what tenant_registry.secret_scope allows, however it is mutated.
    let asked = std::cell::RefCell::new(Vec::<String>::new());
    let env = |name: &str| {
        asked.borrow_mut().push(name.to_string());
        Some("key-value".to_string())
    };
    let mut stats = Stats::default();
    let mut next_id = 1u32;
    let mut open: Vec<Stream> = Vec::new();
    for _ in 0..n {
        let mut out = Recorded::default();
        // Narrowed tokens (SMART scopes) make answers checked (issue 23).
        let scope = *rng.pick(&[TENANT_A, "6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f system/Patient.rs"]);
        let scope = if scope.starts_with("6f1c") {
            scope.replace("6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f", TENANT_A)
        } else {
            scope.to_string()
        };
        let client = *rng.pick(&["app-a", "app-b"]);
        let mut claims = json!({"iss": ISSUER, "aud": [AUDIENCE], "iat": NOW, "exp": NOW + 600, "scope": scope,
                                "client_id": client});
        if rng.percent(40) {
            mutate_json(rng, &mut claims);
        }
        let (token, _) = signers.es256_token(&claims);
        let signature = token.rsplit('.').next().unwrap_or_default().to_string();
        let now = now_ms + rng.below(700_000) as u64;
        match rng.below(10) {
            0 => {
                let target = if rng.percent(70) { FetchTarget::Jwks(0) } else { FetchTarget::Registry };
                let seed = match target {
                    FetchTarget::Registry if rng.percent(50) => &registry_doc_with_secret,
                    FetchTarget::Registry => &registry_doc,
                    _ => &jwks_doc,
                };
                let body = if rng.percent(50) { seed.to_string().into_bytes() } else { json_document(rng, seed) };
                let status = *rng.pick(&[Some("200"), Some("200"), Some("503"), None]);
                let result = if rng.percent(5) {
                    FetchResult::NotSent("could not be sent")
                } else {
                    FetchResult::Answer { status, body_size: body.len() }
                };
                note("router", &body);
                let woken = router.on_fetch_result(target, result, now, &mut || body.clone(), &env, &mut out).wake;
                for name in asked.borrow_mut().drain(..) {
                    let file = name.strip_prefix("\0file-beneath:/etc/ftr\0/etc/ftr/");
                    let ok = (name.starts_with("FTR_REG_") && name.len() > 8) || file.is_some_and(|f| !f.is_empty());
                    assert!(ok, "a registry document was looked up outside its secret scope: {name:?}");
                }
                for stream in open.iter_mut().filter(|s| woken.contains(&s.context_id())) {
                    router.wake(stream, now, &PureRust, &mut || b"{}".to_vec(), &mut out);
                }
                stats.add(false);
            }
            1 => {
                router.on_tick(now, 1 << 20, &mut out);
                stats.add(false);
            }
            2 if !open.is_empty() => {
                let i = rng.below(open.len());
                let mut stream = open.swap_remove(i);
                router.on_stream_done(&mut stream);
                stats.add(false);
            }
            _ => {
                let mut path = rng
                    .pick(&[
                        "/Patient?name=x",
                        "/metadata",
                        "/",
                        "/Patient/1",
                        "/.well-known/smart-configuration",
                        "/?_getpages=abc&_getpagesoffset=2",
                        "/?_cursor=abc.def",
                        "/Patient?_format=xml",
                        "/cursor",
                    ])
                    .to_string();
                if path == "/cursor" {
                    path = cursor_path.clone().unwrap_or_else(|| "/?_cursor=".into());
                    if rng.percent(50) {
                        let mut b = path.into_bytes();
                        mutate_bytes(rng, &mut b);
                        path = String::from_utf8_lossy(&b).into_owned();
                    }
                }
                let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = vec![
                    (b":method".to_vec(), rng.pick(&["GET", "POST", "DELETE", "HEAD", ""]).as_bytes().to_vec()),
                    (b":path".to_vec(), path.into_bytes()),
                    (b":authority".to_vec(), b"fhir.example".to_vec()),
                ];
                for _ in 0..rng.below(4) {
                    let name = *rng.pick(&[
                        "authorization",
                        "x-fhir-tenant-router-cluster",
                        "x-route",
                        "x-forwarded-host",
                        "x-forwarded-prefix",
                        "x-forwarded-proto",
                        "forwarded",
                        ":scheme",
                        "x-other",
                    ]);
                    let value = if name == "authorization" { format!("Bearer {token}") } else { "https".to_string() };
                    pairs.push((name.as_bytes().to_vec(), value.into_bytes()));
                }
                let mut raw = serialize_pairs(&pairs);
                if rng.percent(10) {
                    mutate_bytes(rng, &mut raw);
                }
                note("router", &raw);
                let mut stream = router.open_stream(next_id);
                next_id += 1;
                let headers = fhir_tenant_router::headers::Pairs::new(&raw).into_iter().flatten();
                let eos = rng.percent(50);
                let flow = router.on_request_headers(&mut stream, headers, eos, now, &PureRust, &mut out);
                stats.add(flow.proceeds());
                let body = if rng.percent(50) {
                    json!({"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET", "url": "Patient"}}]}).to_string().into_bytes()
                } else {
                    let mut b = b"{\"resourceType\":\"Bundle\"}".to_vec();
                    mutate_bytes(rng, &mut b);
                    b
                };
                router.on_request_body(&mut stream, true, now, &mut || body.clone(), &mut out);
                let content_type =
                    rng.pick(&["application/fhir+json", "text/html", "application/fhir+xml"]).to_string();
                let location = rng.pick(&["http://up/fhir/Patient/1", "http://other/x"]).to_string();
                let header = |name: &str| match name {
                    "content-type" => Some(content_type.clone()),
                    "location" => Some(location.clone()),
                    _ => None,
                };
                router.on_response_headers(&mut stream, rng.percent(10), &header, &mut out);
                let mut response = if rng.percent(50) {
                    json!({"resourceType": "CapabilityStatement", "rest": [{"mode": "server"}], "link": [{"url": "http://up/fhir/Patient?page=2"}]})
                } else {
                    // A HAPI-style page: a paging link under the upstream's base (and under the public base), and
                    // sometimes a type a narrowed token may not read.
                    json!({"resourceType": "Bundle", "type": "searchset", "link": [
                        {"relation": "next", "url": "http://up/fhir?_getpages=abc&_getpagesoffset=2"},
                        {"relation": "previous", "url": "https://fhir.example/r4?_getpages=abc"}],
                        "entry": [{"resource": {"resourceType": *rng.pick(&["Patient", "Observation"]),
                                                "contained": [{"resourceType": "Patient"}]}}]})
                }
                .to_string()
                .into_bytes();
                if rng.percent(30) {
                    mutate_bytes(rng, &mut response);
                }
                router.on_response_body(&mut stream, true, &mut || response.clone(), &mut out);
                if let Some(found) = out.0.iter().find_map(|e| e.find("?_cursor=").map(|i| e[i..].to_string())) {
                    let token: String = found["?_cursor=".len()..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                        .collect();
                    cursor_path = Some(format!("/?_cursor={token}"));
                }
                if stream.is_waiting() && open.len() < 32 {
                    open.push(stream);
                } else {
                    router.on_stream_done(&mut stream);
                }
            }
        }
        if signature.len() > 16 {
            for effect in &out.0 {
                assert!(!effect.contains(&signature), "an effect carries the token: {effect}");
            }
        }
    }
    stats
}

/// An authorization server's token answer (upstream_auth): mutated valid and error answers, any status.
pub fn token_response(rng: &mut Rng, n: usize) -> Stats {
    let seeds = [
        json!({"access_token": "eyJhbGciOiJSUzI1NiJ9.e30.c2ln", "token_type": "Bearer", "expires_in": 3599}),
        json!({"access_token": "ya29.a0AfH6SMB", "token_type": "bearer", "expires_in": "3600", "scope": "x"}),
        json!({"access_token": "x", "expires_in": 1}),
        json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."}),
        json!({"error": "temporarily_unavailable"}),
    ];
    let mut stats = Stats::default();
    for _ in 0..n {
        let seed = rng.pick(&seeds).clone();
        let mut body = if rng.percent(70) { json_document(rng, &seed) } else { seed.to_string().into_bytes() };
        if rng.percent(20) {
            mutate_bytes(rng, &mut body);
        }
        let status = *rng.pick(&[200u32, 200, 200, 400, 401, 500, 503, 0, 99, 999]);
        let now = *rng.pick(&[0u64, 1_767_225_600_000, u64::MAX, u64::MAX / 2]);
        note("token_response", &body);
        stats.add(checks::token_response(status, &body, now));
    }
    stats
}

/// OpenID Provider Configurations: Entra's common v2.0 document and others, mutated structurally and at
/// byte level, spliced, or raw bytes.
pub fn discovery(rng: &mut Rng, n: usize) -> Stats {
    let seeds = [
        json!({"token_endpoint": "https://login.microsoftonline.com/common/oauth2/v2.0/token",
               "jwks_uri": "https://login.microsoftonline.com/common/discovery/v2.0/keys",
               "issuer": "https://login.microsoftonline.com/{tenantid}/v2.0",
               "id_token_signing_alg_values_supported": ["RS256"], "tenant_region_scope": null}),
        json!({"issuer": "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0",
               "jwks_uri": "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/discovery/v2.0/keys"}),
        json!({"issuer": "https://login.microsoftonline.com/{tenantid}/v2.0", "jwks_uri": "https://evil.example/keys"}),
        json!({"issuer": "https://login.microsoftonline.com/{tenantid}/v2.0",
               "jwks_uri": "https://login.microsoftonline.com@evil.example/keys"}),
        json!({"issuer": "https://sts.windows.net/{tenantid}/", "jwks_uri": "https://login.microsoftonline.com/common/discovery/keys"}),
    ];
    let mut stats = Stats::default();
    for _ in 0..n {
        let seed = rng.pick(&seeds);
        let mut body = match rng.below(10) {
            0 => seed.to_string().into_bytes(),
            1 => {
                let a = seed.to_string().into_bytes();
                let b = rng.pick(&seeds).to_string().into_bytes();
                splice(rng, &a, &b)
            }
            _ => json_document(rng, seed),
        };
        if rng.percent(15) {
            mutate_bytes(rng, &mut body);
        }
        note("discovery", &body);
        stats.add(checks::discovery(&body));
    }
    stats
}

/// Response bodies for the answer check: FHIR answers (a searchset with includes, contained resources at
/// depth, a batch-response with nested Bundles and outcomes, Parameters) mutated structurally and at byte
/// level, truncated, spliced, deeply nested, or raw bytes.
pub fn response_bodies(rng: &mut Rng, n: usize) -> Stats {
    let seeds = [
        json!({"resourceType": "Bundle", "type": "searchset", "link": [{"relation": "next", "url": "http://x/?_getpages=a"}],
               "entry": [{"resource": {"resourceType": "Patient", "id": "1", "contained": [{"resourceType": "Organization"}]}},
                         {"resource": {"resourceType": "Encounter"}, "search": {"mode": "include"}}]}),
        json!({"resourceType": "Bundle", "type": "batch-response", "entry": [
            {"resource": {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Condition"}}]}},
            {"response": {"status": "404", "outcome": {"resourceType": "OperationOutcome", "issue": []}}}]}),
        json!({"resourceType": "Parameters", "parameter": [{"name": "r", "resource": {"resourceType": "Practitioner"}},
               {"name": "p", "part": [{"resource": {"resourceType": "Patient"}}]}]}),
        json!({"resourceType": "Observation", "valueString": "\u{e9}", "contained": [{"resourceType": "Patient",
               "contained": [{"resourceType": "Medication"}]}]}),
    ];
    let mut stats = Stats::default();
    for _ in 0..n {
        let seed = rng.pick(&seeds).clone();
        let body = match rng.below(10) {
            0 => {
                let full = serde_json::to_vec(&seed).unwrap_or_default();
                full[..rng.below(full.len() + 1)].to_vec()
            }
            1 => {
                let a = json_document(rng, &seed);
                let other = rng.pick(&seeds).clone();
                let b = json_document(rng, &other);
                splice(rng, &a, &b)
            }
            2 => {
                let depth = rng.below(300);
                let open = if rng.percent(50) { "[" } else { "{\"resourceType\":\"Patient\",\"contained\":[" };
                let close = if open == "[" { "]" } else { "]}" };
                (open.repeat(depth) + &close.repeat(depth)).into_bytes()
            }
            3 => (0..rng.len(64)).map(|_| *rng.pick(b"{}[]\":,resourceTypePatient \\u0065")).collect(),
            _ => json_document(rng, &seed),
        };
        note("response_check", &body);
        stats.add(checks::response_check(&body));
    }
    stats
}

/// Paging cursors: minted ones (several searches, tenants, clients), mutated at byte level, spliced,
/// truncated, or with payloads of our own under a real tag.
pub fn cursors(rng: &mut Rng, n: usize) -> Stats {
    use fhir_tenant_router::cursor::{mint, Cursor, Paging};
    let paging = Paging::new(&[42u8; 32], 600).expect("a valid key");
    let mut minted = HashSet::new();
    let mut pool = Vec::new();
    for (i, (tenant, client, path)) in
        [("a", Some("app"), "/?_getpages=x"), ("b", None, "/Patient?page=2"), ("a", Some("\u{e9}"), "/")]
            .iter()
            .enumerate()
    {
        let c = Cursor {
            expires_s: 1_000 + i as u64,
            tenant: tenant.to_string(),
            client: client.map(str::to_string),
            method: "GET".into(),
            path: "/Patient?name=x".into(),
            upstream_path: path.to_string(),
        };
        let token = mint(&paging, &c).expect("mintable");
        minted.insert(token.clone());
        pool.push(token);
    }
    let mut stats = Stats::default();
    for _ in 0..n {
        let seed = rng.pick(&pool).clone();
        let mut bytes = seed.clone().into_bytes();
        match rng.below(5) {
            0 => mutate_bytes(rng, &mut bytes),
            1 => {
                let other = rng.pick(&pool).clone();
                bytes = splice(rng, seed.as_bytes(), other.as_bytes());
            }
            2 => bytes.truncate(rng.below(bytes.len() + 1)),
            3 => {
                let tag = seed.split_once('.').map_or("", |(_, t)| t);
                let doc = json_document(rng, &json!([1, 99, "a", "app", "GET", "/Patient", "/?_getpages=x"]));
                bytes = format!("{}.{tag}", URL_SAFE_NO_PAD.encode(doc)).into_bytes();
            }
            _ => {}
        }
        let token = String::from_utf8_lossy(&bytes).into_owned();
        note("cursor", token.as_bytes());
        stats.add(checks::cursor(&token, &minted));
    }
    stats
}

/// Queries and form bodies of FHIR searches: what [`checks::reach`] reads.
pub fn reach(rng: &mut Rng, n: usize) -> Stats {
    const SEEDS: &[&str] = &[
        "_include=Observation:subject",
        "_include:iterate=Observation:patient:Patient&_revinclude=Provenance:target",
        "%5Finclude=Observation%3Asubject&_count=10",
        "subject.name=x&subject:Patient.general-practitioner.name=y",
        "_has:Observation:patient:_has:AuditEvent:entity:agent=x",
        "_filter=name eq x&_type=Patient,Observation",
        "_list=1;_query=x;_contained=true",
        "patient.organization.partof.partof.partof.name=x",
        "target.target.target.target._id=1",
        "name=a+b&_count=%35%30&code:text=%zz",
        "_revinclude=*&_include=*",
        "",
    ];
    const PATHS: &[&str] =
        &["/Patient", "/Observation/_search", "/Patient/1/$everything", "/", "/Provenance", "/Patient/1/*"];
    let mut stats = Stats::default();
    for _ in 0..n {
        let mut query = rng.pick(SEEDS).as_bytes().to_vec();
        match rng.below(4) {
            0 => mutate_bytes(rng, &mut query),
            1 => {
                let other = rng.pick(SEEDS).as_bytes();
                query = splice(rng, &query, other);
            }
            2 => {
                let len = rng.len(60);
                query = (0..len).map(|_| *rng.pick(b"_:.=&;%2E5F*PatientObservationsubject$#+")).collect();
            }
            _ => {}
        }
        let form_len = rng.len(40);
        let form = if rng.percent(50) { rng.pick(SEEDS).as_bytes().to_vec() } else { rng.bytes(form_len) };
        note("reach", &query);
        let path = rng.pick(PATHS);
        stats.add(checks::reach(path, &String::from_utf8_lossy(&query), &form));
    }
    stats
}
