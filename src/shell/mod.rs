//! The proxy-wasm shell: the only code that talks to Envoy's proxy-wasm ABI. Each callback reads its inputs
//! from the host, hands them to the core ([`crate::router::Router`]), and applies the effects the core
//! returns; it holds no policy of its own.
//!
//! Everything but [`proxy`] is generic over a small [`host::Host`] trait, so `cargo test` drives the
//! shell's event handlers natively against a fake host that records every host call (`fake`, tests only).
//!
//! Files, each importing only those listed after it: `proxy` (wasm32: the SDK's traits and the real host)
//! → `root` → `filter` → `state` → `apply` → `metrics`, `host_crypto`, `quota_store` → `host`.

pub mod apply;
pub mod filter;
#[cfg(all(target_arch = "wasm32", feature = "bench-floor-wasm"))]
pub mod floor;
pub mod host;
pub mod host_crypto;
pub mod metrics;
#[cfg(target_arch = "wasm32")]
pub mod proxy;
pub mod quota_store;
pub mod root;
pub mod state;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;
