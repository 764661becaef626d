//! Fuzzing of every parser of untrusted input in `fhir-tenant-router`.
//!
//! Two drivers share this library:
//! - the libFuzzer targets in `fuzz_targets/` (`cargo +nightly fuzz run <target>`), coverage-guided, which
//!   call the `fuzz_*` byte-driven entry points below;
//! - the deterministic runner `src/bin/runner.rs` (stable Rust, `make fuzz`), which generates inputs from a
//!   seeded RNG with structure-aware mutations of valid tokens, JWKS and configurations, and calls the same
//!   `check` functions.
//!
//! A `check` function runs one parser on one input and asserts what must hold whatever the input (no panic,
//! plus a few invariants that compare the result with an independent reference); a failed assertion is a
//! panic, so it fails both drivers.

pub mod checks;
pub mod fixtures;
pub mod gen;
pub mod mutate;
pub mod rng;

use std::sync::OnceLock;

use fhir_tenant_router::jwks::KeySet;
use fhir_tenant_router::Config;

struct Shared {
    keys: KeySet,
    config: Config,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| Shared { keys: fixtures::keys(), config: fixtures::config() })
}

/// Token verification: the first byte picks raw mode (the rest is the token text) or parts mode (the rest is
/// `header 0xff payload 0xff signature`, each base64url-encoded and joined with dots, so that the fuzzer
/// writes the JSON itself).
pub fn fuzz_token(data: &[u8]) {
    let Some((mode, rest)) = data.split_first() else { return };
    let token = if mode & 1 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let mut parts = rest.splitn(3, |b| *b == 0xff);
        let h = parts.next().unwrap_or_default();
        let p = parts.next().unwrap_or_default();
        let s = parts.next().unwrap_or_default();
        fixtures::compact_raw(h, p, s)
    };
    let s = shared();
    let now = if mode & 2 == 0 { fixtures::NOW } else { i64::from_le_bytes([*mode; 8]) };
    let _ = checks::token(&token, Some(&s.keys), &s.config.providers[0].provider, now, None);
}

/// JWKS documents.
pub fn fuzz_jwks(data: &[u8]) {
    checks::jwks(data);
}

/// Plugin configurations.
pub fn fuzz_config(data: &[u8]) {
    checks::config(data);
}

/// Tenant resolution: the bytes are the tenant claim's JSON value, or (when not JSON) a scope string.
pub fn fuzz_tenant(data: &[u8]) {
    let claim = match serde_json::from_slice::<serde_json::Value>(data) {
        Ok(v) => v,
        Err(_) => serde_json::Value::String(String::from_utf8_lossy(data).into_owned()),
    };
    for map in checks::tenant_maps() {
        checks::tenant(map, Some(&claim));
    }
}

/// SMART scopes: the bytes are the `scope` claim's JSON value, or (when not JSON) a scope string.
pub fn fuzz_scopes(data: &[u8]) {
    let claim = match serde_json::from_slice::<serde_json::Value>(data) {
        Ok(v) => v,
        Err(_) => serde_json::Value::String(String::from_utf8_lossy(data).into_owned()),
    };
    checks::scopes(Some(&claim));
}

/// Response bodies for the answer check.
pub fn fuzz_response_check(data: &[u8]) {
    checks::response_check(data);
}

/// A search's query (the bytes before the first NUL) and form body (after it), on a Patient search.
pub fn fuzz_reach(data: &[u8]) {
    let (query, form) = match data.iter().position(|b| *b == 0) {
        Some(i) => (data.get(..i).unwrap_or_default(), data.get(i + 1..).unwrap_or_default()),
        None => (data, &[][..]),
    };
    checks::reach("/Patient", &String::from_utf8_lossy(query), form);
}

/// `Authorization` header values.
pub fn fuzz_bearer(data: &[u8]) {
    match std::str::from_utf8(data) {
        Ok(s) => checks::bearer(Some(s)),
        Err(_) => checks::bearer(Some(&String::from_utf8_lossy(data))),
    }
}

/// Envoy's `VerifySignatureResult` protobuf.
pub fn fuzz_host_proto(data: &[u8]) {
    checks::host_proto(data);
}

/// Raw `r || s` to DER: the first byte picks the scalar length.
pub fn fuzz_der(data: &[u8]) {
    let Some((sel, raw)) = data.split_first() else { return };
    let scalar_len = match sel % 8 {
        0..=2 => 32,
        3 | 4 => 48,
        5 => raw.len() / 2,
        6 => usize::MAX / 2 + 1,
        _ => usize::from(*sel),
    };
    checks::der(raw, scalar_len);
}

/// OpenID Provider Configurations (configuration from discovery).
pub fn fuzz_discovery(data: &[u8]) {
    checks::discovery(data);
}
