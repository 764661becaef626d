//! # fhir-tenant-router
//!
//! A proxy-wasm HTTP filter for Envoy that turns several FHIR servers into one secure multi-tenant FHIR
//! endpoint: it verifies the OAuth 2.0 client-credentials access token an IdP issued, finds the tenant the
//! client named in the token's `scope`, and routes the request to that tenant's Envoy cluster. The
//! discovery documents (`/metadata`, `/.well-known/smart-configuration`) pass without a token.
//!
//! The crate is a host-independent core (every module but `shell`), compiled and tested natively, and a
//! thin proxy-wasm shell. The core never calls the host: it answers every host event ([`router`],
//! [`upkeep`]) with data, the [`effect`]s to apply, and time and signature checking are arguments. The
//! shell only reads inputs and applies effects; all of it but its proxy-wasm adapter is tested natively
//! against a fake host.

pub mod audit;
pub mod audit_sink;
pub mod balp;
pub mod bearer;
pub mod cache;
pub mod config;
pub mod crypto;
pub mod cursor;
pub mod decision;
pub mod der;
pub mod discovery;
pub mod effect;
pub mod fhir;
pub mod headers;
pub mod host_proto;
pub mod identity;
pub mod jwks;
pub mod links;
pub mod metadata;
pub mod public;
pub mod quota;
pub mod reach;
pub mod redact;
pub mod refresh;
pub mod rejection;
pub mod response_check;
pub mod router;
pub mod scopes;
pub mod search_params;
pub mod secret_scope;
pub mod tenant;
pub mod upkeep;
pub mod upstream_auth;
pub mod url;
pub mod verify;

#[cfg(test)]
pub(crate) mod testkeys;

pub mod shell;

#[cfg(all(feature = "dynamic-module", not(target_arch = "wasm32")))]
pub mod native;

pub use config::{Config, ConfigError};
pub use decision::{decide, Decision, Known, Request};
pub use rejection::Rejection;

#[cfg(all(target_arch = "wasm32", feature = "plugin"))]
proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(shell::proxy::RootAdapter::default())
    });
}}
