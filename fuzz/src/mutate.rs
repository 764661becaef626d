//! Mutations: byte-level (flip, insert, delete, duplicate, splice, truncate, dictionary tokens) and
//! JSON-structure-aware (replace any node with an edge value, add or drop members, change types).

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde_json::{json, Map, Number, Value};

use crate::rng::Rng;

/// Byte strings worth inserting into JSON and tokens.
pub const JSON_TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\\",
    "\\u0000",
    "\\ud800",
    "\\udc00",
    "\\uffff",
    "null",
    "true",
    "false",
    "0",
    "-0",
    "1e999",
    "-1e999",
    "1e-999",
    "18446744073709551616",
    "-9223372036854775809",
    "0.5",
    "1E2",
    "\"alg\":",
    "\"kid\":",
    "\"kty\":",
    "\"keys\":",
    "\"exp\":",
    "\"scope\":",
    "\"iss\":",
    "\"aud\":",
    "\"crit\":[]",
    "\"alg\":\"none\"",
    "\"alg\":\"HS256\"",
    "[[[[[[[[[[[[[[[[",
    "}}}}}}}}",
    "\u{feff}",
    "\u{0}",
    "\u{e9}",
    "\u{10ffff}",
    "\u{2028}",
    " ",
    "\t",
    "\r\n",
    ".",
    "..",
    "=",
    "==",
    "+",
    "/",
    "-",
    "_",
];

/// Strings worth putting where JSON strings are.
pub const STRINGS: &[&str] = &[
    "",
    " ",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
    "HS256",
    "none",
    "None",
    "NONE",
    "rs256",
    "RSA",
    "EC",
    "oct",
    "OKP",
    "rsa",
    "P-256",
    "P-384",
    "P-521",
    "secp256k1",
    "sig",
    "enc",
    "Sig",
    "test-rs256-1",
    "test-es256-1",
    "AQAB",
    "AA",
    "AQ",
    "_w",
    "AQAB=",
    "!!",
    "+/+/",
    "http://127.0.0.1:9000",
    "http://127.0.0.1:9000/",
    "http://127.0.0.1:10000",
    "https://127.0.0.1:9000",
    "http://",
    "https://",
    "http://h",
    "http://[::1]:9000/jwks",
    "http://a b/",
    "http://h/\u{0}",
    "ftp://x/",
    "6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f",
    "6F1C2D0E-8A3B-4C5D-9E7F-0A1B2C3D4E5F",
    "3b9a7c55-1d2e-4f60-8a7b-9c0d1e2f3a4b",
    "tenant/6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f",
    "openid",
    "system/*.read",
    "tenant_a",
    "fhir_metadata",
    "idp",
    "x-fhir-tenant-id",
    "authorization",
    ":path",
    "host",
    "auto",
    "host",
    "pure_rust",
    "Auto",
    "scope",
    "scp",
    "tenant/",
    "a b",
    "\u{0}",
    "\u{e9}",
    "\u{41f}",
    "\u{202e}",
    "\u{ff21}",
];

/// Object keys worth adding.
pub const KEYS: &[&str] = &[
    "alg",
    "kid",
    "typ",
    "crit",
    "jwk",
    "jku",
    "x5u",
    "x5c",
    "b64",
    "kty",
    "use",
    "key_ops",
    "n",
    "e",
    "crv",
    "x",
    "y",
    "d",
    "k",
    "keys",
    "iss",
    "aud",
    "exp",
    "nbf",
    "iat",
    "scope",
    "scp",
    "sub",
    "client_id",
    "provider",
    "tenants",
    "cluster",
    "issuer",
    "audiences",
    "jwks",
    "jwks_uri",
    "jwks_cluster",
    "jwks_refresh_s",
    "jwks_timeout_ms",
    "clock_skew_s",
    "max_token_bytes",
    "jwks_min_refetch_s",
    "tenant_claim",
    "tenant_scope_prefixes",
    "metadata_cluster",
    "route_header",
    "tenant_header",
    "forward_authorization",
    "signature_verifier",
    "token_cache_entries",
    "",
    "__proto__",
];

/// Numbers at the edges of every integer and float type a parser might use.
pub fn edge_number(rng: &mut Rng) -> Value {
    let n: Number = match rng.below(16) {
        0 => 0.into(),
        1 => (-1).into(),
        2 => 1.into(),
        3 => u64::MAX.into(),
        4 => i64::MIN.into(),
        5 => i64::MAX.into(),
        6 => (u32::MAX as u64 + 1).into(),
        7 => 255.into(),
        8 => 65_537.into(),
        9 => (crate::fixtures::NOW + rng.below(7200) as i64 - 3600).into(),
        10 => Number::from_f64(1e300).unwrap_or_else(|| 0.into()),
        11 => Number::from_f64(-1e300).unwrap_or_else(|| 0.into()),
        12 => Number::from_f64(0.5 + crate::fixtures::NOW as f64).unwrap_or_else(|| 0.into()),
        13 => Number::from_f64(9.99e14).unwrap_or_else(|| 0.into()),
        14 => Number::from_f64(f64::MIN_POSITIVE).unwrap_or_else(|| 0.into()),
        _ => (rng.next_u64() as i64 >> rng.below(64)).into(),
    };
    Value::Number(n)
}

/// base64url of random bytes of an interesting length (key sizes, scalar sizes and their neighbours).
pub fn b64_blob(rng: &mut Rng) -> String {
    let len = *rng.pick(&[0usize, 1, 2, 3, 31, 32, 33, 47, 48, 49, 64, 96, 127, 128, 255, 256, 257, 384, 512, 513]);
    let mut bytes = rng.bytes(len);
    match rng.below(5) {
        0 => {
            if let Some(b) = bytes.first_mut() {
                *b = 0;
            }
        }
        1 => {
            if let Some(b) = bytes.first_mut() {
                *b |= 0x80;
            }
        }
        _ => {}
    }
    match rng.below(8) {
        0 => STANDARD.encode(&bytes),
        1 => format!("{}=", URL_SAFE_NO_PAD.encode(&bytes)),
        _ => URL_SAFE_NO_PAD.encode(&bytes),
    }
}

fn mutate_string(rng: &mut Rng, s: &str) -> String {
    match rng.below(8) {
        0 => rng.pick(STRINGS).to_string(),
        1 => b64_blob(rng),
        2 => s.to_ascii_uppercase(),
        3 => {
            let cut = rng.below(s.len() + 1);
            String::from_utf8_lossy(&s.as_bytes()[..cut]).into_owned()
        }
        4 => format!("{s}{}", rng.pick(STRINGS)),
        5 => {
            let mut b = s.as_bytes().to_vec();
            mutate_bytes(rng, &mut b);
            String::from_utf8_lossy(&b).into_owned()
        }
        6 => "a".repeat(*rng.pick(&[127usize, 128, 129, 1000, 9000])),
        _ => String::new(),
    }
}

/// A value of any JSON type, often an edge one.
pub fn edge_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(12) {
        0 => Value::Null,
        1 => Value::Bool(rng.percent(50)),
        2 | 3 => edge_number(rng),
        4 | 5 => Value::String(rng.pick(STRINGS).to_string()),
        6 => Value::String(b64_blob(rng)),
        7 if depth < 4 => Value::Array((0..rng.below(4)).map(|_| edge_value(rng, depth + 1)).collect()),
        8 if depth < 4 => {
            let mut m = Map::new();
            for _ in 0..rng.below(3) {
                m.insert(rng.pick(KEYS).to_string(), edge_value(rng, depth + 1));
            }
            Value::Object(m)
        }
        9 => {
            let depth = rng.below(200);
            let mut v = json!([]);
            for _ in 0..depth {
                v = json!([v]);
            }
            v
        }
        _ => Value::String(String::new()),
    }
}

/// Applies one structure-aware mutation somewhere in `value`: at each container, mutate it or go down into
/// a random child.
pub fn mutate_json(rng: &mut Rng, node: &mut Value) {
    let stop = rng.percent(30);
    let len = match node {
        Value::Object(m) => m.len(),
        Value::Array(a) => a.len(),
        _ => 0,
    };
    if !stop && len > 0 {
        let i = rng.below(len);
        let child = match node {
            Value::Object(m) => m.values_mut().nth(i),
            Value::Array(a) => a.get_mut(i),
            _ => None,
        };
        if let Some(child) = child {
            mutate_json(rng, child);
            return;
        }
    }
    match node {
        Value::Object(m) => match rng.below(4) {
            0 if !m.is_empty() => {
                let k = m.keys().nth(rng.below(m.len())).cloned().unwrap_or_default();
                m.remove(&k);
            }
            1 | 2 => {
                m.insert(rng.pick(KEYS).to_string(), edge_value(rng, 0));
            }
            _ => *node = edge_value(rng, 0),
        },
        Value::Array(a) => match rng.below(4) {
            0 if !a.is_empty() => {
                a.remove(rng.below(a.len()));
            }
            1 if !a.is_empty() => {
                let v = a[rng.below(a.len())].clone();
                a.push(v);
            }
            2 => a.push(edge_value(rng, 0)),
            _ => *node = edge_value(rng, 0),
        },
        Value::String(s) => {
            if rng.percent(80) {
                *s = mutate_string(rng, s);
            } else {
                *node = edge_value(rng, 0);
            }
        }
        _ => *node = edge_value(rng, 0),
    }
}

/// Applies one to four byte-level mutations.
pub fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = *rng.pick(&[0u8, 0x7f, 0x80, 0xff, b'.', b'"', b'\\', b' ', b'{', b'}', b'=', b'A', b'-']);
            }
            2 if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(16)).min(len);
                data.drain(start..end);
            }
            3 => {
                let at = rng.below(len + 1);
                let count = 1 + rng.below(8);
                let extra = rng.bytes(count);
                data.splice(at..at, extra);
            }
            4 => {
                let at = rng.below(len + 1);
                let token = rng.pick(JSON_TOKENS).as_bytes().to_vec();
                data.splice(at..at, token);
            }
            5 if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(64)).min(len);
                let copy = data[start..end].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, copy);
            }
            6 => data.truncate(rng.below(len + 1)),
            7 if len > 1 => {
                let (i, j) = (rng.below(len), rng.below(len));
                data.swap(i, j);
            }
            _ => {
                let at = rng.below(len + 1);
                let token = rng.pick(STRINGS).as_bytes().to_vec();
                data.splice(at..at, token);
            }
        }
    }
}

/// The start of `a` followed by the end of `b`.
pub fn splice(rng: &mut Rng, a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = a[..rng.below(a.len() + 1)].to_vec();
    out.extend_from_slice(&b[rng.below(b.len() + 1)..]);
    out
}

/// A JSON document from a seed: 1–4 structural mutations, and sometimes byte-level ones on the text.
pub fn json_document(rng: &mut Rng, seed: &Value) -> Vec<u8> {
    let mut v = seed.clone();
    for _ in 0..1 + rng.below(4) {
        mutate_json(rng, &mut v);
    }
    let mut bytes = if rng.percent(10) {
        serde_json::to_vec_pretty(&v).unwrap_or_default()
    } else {
        serde_json::to_vec(&v).unwrap_or_default()
    };
    if rng.percent(25) {
        mutate_bytes(rng, &mut bytes);
    }
    bytes
}
