//! The Envoy dynamic-module shell (cargo feature `dynamic-module`; `make build-so`): the same core as the
//! proxy-wasm filter, loaded natively by Envoy's `DynamicModuleFilter` with the same plugin JSON. It reads
//! each hook's inputs through Envoy's C ABI, hands them to the core, and applies the effects; signatures are
//! checked with ring.
//!
//! Where it stands (see README, "Dynamic module"): inline key sets only (a `jwks_uri` or a tenant registry
//! is refused at load, naming the field); no request ever waits for keys.

pub mod crypto;
// The hooks and the ABI they call link against Envoy's exported callbacks: only in the `.so`, not in a
// test executable.
#[cfg(not(test))]
pub mod abi;
#[cfg(not(test))]
pub mod module;
