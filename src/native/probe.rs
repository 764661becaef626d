//! A test-only fault: with cargo feature `panic-probe` (never in a shipped build: `make build-so` leaves it
//! off), `FHIR_TENANT_ROUTER_PANIC_PROBE=<hook>:<n>` in Envoy's environment makes the first `n` calls of that
//! hook panic inside its guard, so the end-to-end test can show that a panic in the `.so` is caught, answered
//! and counted, and that Envoy keeps serving (`tests/e2e/test_dynamic_module_panics.py`).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// The hook to panic in, and how many more times.
static PROBE: OnceLock<Option<(String, AtomicU32)>> = OnceLock::new();

fn probe() -> &'static Option<(String, AtomicU32)> {
    PROBE.get_or_init(|| {
        let value = std::env::var("FHIR_TENANT_ROUTER_PANIC_PROBE").ok()?;
        let (hook, n) = value.split_once(':')?;
        Some((hook.to_string(), AtomicU32::new(n.parse().ok()?)))
    })
}

/// Panics if the probe names `hook` and has calls left.
#[allow(clippy::panic)] // a deliberate panic is the probe's whole point
pub fn fire(hook: &str) {
    if let Some((armed, left)) = probe() {
        if armed == hook && left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok() {
            panic!("panic probe: {hook}");
        }
    }
}
