//! The proxy-wasm shell: the only code that talks to Envoy. It turns host callbacks into core calls and the
//! core's answers into host calls, and holds no policy of its own.

pub mod host_crypto;
pub mod http;
pub mod metrics;
pub mod root;

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the epoch, from the host's clock.
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
