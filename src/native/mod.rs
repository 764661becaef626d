//! The Envoy dynamic-module shell (cargo feature `dynamic-module`; `make build-so`): the same core as the
//! proxy-wasm filter, loaded natively by Envoy's `DynamicModuleFilter` with the same plugin JSON. It reads
//! each hook's inputs through Envoy's C ABI, hands them to the core, and applies the effects; signatures are
//! checked with ring.
//!
//! Key sets and the tenant registry are fetched once per process on Envoy's main thread and installed by
//! each worker ([`upkeep`]); a request whose token names an unknown `kid` waits on a per-stream scheduler.

pub mod counts;
pub mod crypto;
// The hooks and the ABI they call link against Envoy's exported callbacks: only in the `.so`, not in a
// test executable.
#[cfg(not(test))]
pub mod abi;
#[cfg(all(feature = "bench-floor", not(test)))]
pub mod floor;
#[cfg(not(test))]
pub mod host;
#[cfg(not(test))]
pub mod module;
#[cfg(feature = "panic-probe")]
pub mod probe;
pub mod published;
#[cfg(not(test))]
pub mod upkeep;
