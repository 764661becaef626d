//! The Envoy dynamic-module shell (cargo feature `dynamic-module`; `make build-so`): the same core as the
//! proxy-wasm filter, loaded natively by Envoy's `DynamicModuleFilter` with the same plugin JSON. It reads
//! each hook's inputs through Envoy's C ABI, hands them to the core, and applies the effects; signatures are
//! checked with ring.
//!
//! Key sets and the tenant registry are fetched once per process on Envoy's main thread and installed by
//! each worker ([`upkeep`]); a request whose token names an unknown `kid` waits on a per-stream scheduler.

pub mod counts;
pub mod crypto;
// The ABI's callbacks link against Envoy's exported symbols: only `envoy::Abi` calls them, and only in the
// `.so` (the extern block and `Abi` are not compiled into a test executable). The hook logic is generic over
// `envoy::Envoy` and runs in the unit tests against `fake`, a fake Envoy that enforces Envoy's rules.
pub mod abi;
pub mod envoy;
#[cfg(test)]
mod fake;
#[cfg(all(feature = "bench-floor", not(test)))]
pub mod floor;
pub mod host;
pub mod inbox;
#[cfg(test)]
mod metadata_tests;
pub mod module;
#[cfg(feature = "panic-probe")]
pub mod probe;
pub mod published;
pub mod relay;
#[cfg(test)]
mod tests;
pub mod upkeep;
