//! The plugin configuration: JSON read by serde for shape ([`RawConfig`], unknown fields refused), then
//! compiled once for meaning into a [`Config`] that the hot path uses as is. Every error names its field.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use crate::discovery::Discovery;
use crate::fhir::Policy;
use crate::jwks::{KeySet, PURE_RUST_CHECKS_P384};
use crate::secret_scope::{Place, SecretScope};
use crate::tenant::{TenantMap, TenantSettings};
use crate::url::split_http_url;

/// Default header the filter sets for Envoy's `cluster_header` route.
pub const DEFAULT_ROUTE_HEADER: &str = "x-fhir-tenant-router-cluster";
/// Default header that tells the upstream which tenant the request is for.
pub const DEFAULT_TENANT_HEADER: &str = "x-fhir-tenant-id";

/// The configuration as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub provider: Option<RawProvider>,
    #[serde(default)]
    pub providers: Option<Vec<RawProvider>>,
    #[serde(default)]
    pub tenants: BTreeMap<String, RawTenant>,
    #[serde(default)]
    pub tenant_registry: Option<RawRegistry>,
    #[serde(default)]
    pub dynamic_forward_proxy_cluster: Option<String>,
    /// `true`, `false`, `"log"` or `"filter_state"` (read as a JSON value: an untagged enum would pull serde's
    /// buffering of unknown content into the module, 8 KB of wasm).
    #[serde(default)]
    pub audit_log: Option<serde_json::Value>,
    #[serde(default)]
    pub access_log_filter_state: Option<bool>,
    #[serde(default)]
    pub decision_metadata: Option<bool>,
    #[serde(default)]
    pub span_tags: Option<bool>,
    #[serde(default)]
    pub audit_event: Option<bool>,
    #[serde(default)]
    pub audit_sink: Option<RawAuditSink>,
    #[serde(default)]
    pub tenant_claim: Option<String>,
    #[serde(default)]
    pub tenant_scope_prefixes: Option<Vec<String>>,
    pub metadata_cluster: String,
    #[serde(default)]
    pub route_header: Option<String>,
    #[serde(default)]
    pub tenant_header: Option<String>,
    #[serde(default)]
    pub forward_authorization: bool,
    #[serde(default)]
    pub signature_verifier: SignatureVerifier,
    #[serde(default)]
    pub token_cache_entries: Option<usize>,
    #[serde(default)]
    pub hold_bundle_headers: Option<bool>,
    #[serde(default)]
    pub discovery: Option<RawDiscovery>,
    #[serde(default)]
    pub public_base_url: Option<String>,
    #[serde(default)]
    pub quota: Option<crate::quota::RawQuota>,
    #[serde(default)]
    pub rate_limit_descriptor_header: Option<String>,
    #[serde(default)]
    pub paging_cursors: Option<RawPagingCursors>,
}

/// `paging_cursors`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPagingCursors {
    /// The HMAC key: at least 32 bytes, from the VM's environment or a file.
    pub key: Option<crate::upstream_auth::RawSecret>,
    #[serde(default)]
    pub ttl_s: Option<u64>,
}

/// The token issuer, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub issuer: String,
    pub audiences: Vec<String>,
    #[serde(default)]
    pub jwks_uri: Option<String>,
    #[serde(default)]
    pub jwks_cluster: Option<String>,
    #[serde(default)]
    pub jwks: Option<serde_json::Value>,
    #[serde(default)]
    pub jwks_refresh_s: Option<u64>,
    #[serde(default)]
    pub jwks_timeout_ms: Option<u64>,
    #[serde(default)]
    pub clock_skew_s: Option<u64>,
    #[serde(default)]
    pub max_token_bytes: Option<usize>,
    #[serde(default)]
    pub jwks_min_refetch_s: Option<u64>,
    #[serde(default)]
    pub jwks_max_waiting: Option<usize>,
    /// Every token of this provider names this one tenant (an issuer per tenant).
    #[serde(default)]
    pub tenant: Option<String>,
    /// Which claims name the tenant, the SMART scopes and the client.
    #[serde(default)]
    pub claims: Option<RawClaims>,
    /// The claim compared with `audiences` (`aud` unless configured).
    #[serde(default)]
    pub audience_claim: Option<String>,
    /// The JOSE header `typ` a token must carry (`at+jwt`); absent: not checked.
    #[serde(default)]
    pub token_typ: Option<String>,
    /// Claims that must equal a string (or be an array containing it).
    #[serde(default)]
    pub required_claims: Option<serde_json::Map<String, serde_json::Value>>,
    /// Where the OpenID Provider Configuration is fetched (through `jwks_cluster`) to find `jwks_uri`.
    #[serde(default)]
    pub discovery_uri: Option<String>,
}

/// A provider's claim mapping, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClaims {
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub tenant_prefixes: Option<Vec<String>>,
    #[serde(default)]
    pub scopes: Option<String>,
    #[serde(default)]
    pub scope_map: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub client: Option<Vec<String>>,
}

/// One tenant, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub issuers: Option<Vec<String>>,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub base_path: Option<String>,
    #[serde(default)]
    pub links_base_url: Option<String>,
    #[serde(default)]
    pub upstream_header: Option<RawUpstreamHeader>,
    #[serde(default)]
    pub upstream_auth: Option<crate::upstream_auth::RawUpstreamAuth>,
    #[serde(default)]
    pub allow: Option<RawAllow>,
    #[serde(default)]
    pub allowed_clients: Option<Vec<String>>,
    #[serde(default)]
    pub require_smart_scopes: Option<bool>,
    pub quota: Option<crate::quota::RawQuota>,
}

/// Where the tenant map is fetched from, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegistry {
    pub uri: String,
    pub cluster: String,
    #[serde(default)]
    pub refresh_s: Option<u64>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// What a registry document may name (environment variables, files); absent: nothing.
    #[serde(default)]
    pub secret_scope: Option<serde_json::Value>,
}

/// `audit_sink`, as written: where each tenant's BALP AuditEvents are posted, in batches.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuditSink {
    pub cluster: String,
    /// The tenant's FHIR base (`{tenant}` replaced by the tenant id), through `cluster`.
    pub uri: String,
    /// Where events without a tenant go (same authority); absent: they are not sent.
    #[serde(default)]
    pub untenanted_uri: Option<String>,
    #[serde(default)]
    pub batch_size: Option<usize>,
    #[serde(default)]
    pub queue_size: Option<usize>,
    #[serde(default)]
    pub flush_interval_ms: Option<u64>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    pub backoff_ms: Option<u64>,
    #[serde(default)]
    pub max_backoff_ms: Option<u64>,
}

/// The registry document: the same tenant objects as the configuration's `tenants`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistryDocument {
    tenants: BTreeMap<String, RawTenant>,
}

/// A header for the tenant's upstream whose value comes from an environment variable of the VM.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamHeader {
    pub name: String,
    pub env: String,
}

/// A tenant's allowlist, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAllow {
    pub interactions: Vec<String>,
    #[serde(default)]
    pub resource_types: Option<Vec<String>>,
}

/// How the IdP is advertised to clients, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiscovery {
    pub token_endpoint: String,
    #[serde(default)]
    pub authorization_endpoint: Option<String>,
    #[serde(default)]
    pub scopes_supported: Option<Vec<String>>,
    #[serde(default)]
    pub token_endpoint_auth_methods_supported: Option<Vec<String>>,
    #[serde(default)]
    pub capabilities: Option<Vec<String>>,
}

/// Where the audit line goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuditLog {
    /// No audit line.
    Off,
    /// One line per request in Envoy's log, at info level (`true`, `"log"`: the default).
    #[default]
    Log,
    /// The same line as one filter state value, [`AUDIT_LINE_FILTER_STATE`], for Envoy's access log to
    /// write (`"filter_state"`): no log call per request, and it reaches the access log's sinks.
    FilterState,
}

impl AuditLog {
    /// Whether an audit line is written at all.
    pub fn on(self) -> bool {
        self != Self::Off
    }
}

/// The filter state key of the audit line with `audit_log: "filter_state"` (the same in both builds;
/// `%FILTER_STATE(wasm.fhir_tenant_router.audit_line:PLAIN)%` writes it).
pub const AUDIT_LINE_FILTER_STATE: &str = "wasm.fhir_tenant_router.audit_line";

fn compile_audit_log(raw: Option<&serde_json::Value>) -> Result<AuditLog, ConfigError> {
    use serde_json::Value;
    match raw {
        None | Some(Value::Null | Value::Bool(true)) => Ok(AuditLog::Log),
        Some(Value::Bool(false)) => Ok(AuditLog::Off),
        Some(Value::String(name)) if name == "log" => Ok(AuditLog::Log),
        Some(Value::String(name)) if name == "filter_state" => Ok(AuditLog::FilterState),
        Some(_) => Err(ConfigError::new("audit_log", "must be true, false, \"log\" or \"filter_state\"")),
    }
}

/// Which signature implementation checks tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignatureVerifier {
    /// Envoy's `verify_signature` (BoringSSL) where the host has it, pure Rust otherwise and for PS*.
    #[default]
    Auto,
    /// Envoy's `verify_signature` only (PS* still needs pure Rust, since the host uses PKCS#1 v1.5 padding).
    Host,
    /// Pure Rust only: portable, about ten times slower for RSA inside V8.
    PureRust,
}

/// The issuer's rules for a token, ready to apply.
#[derive(Clone, Debug)]
pub struct Provider {
    /// The issuer as configured (a template included): what a tenant's `issuers` binding names.
    pub issuer: String,
    pub audiences: Vec<String>,
    /// Leeway for `exp`, `nbf` and `iat`, in seconds.
    pub clock_skew_s: i64,
    /// Tokens longer than this are refused unparsed.
    pub max_token_bytes: usize,
    /// The issuer is a template (`https://login.microsoftonline.com/{tid}/v2.0`): `iss` must be it filled
    /// with the token's own claim value, which then names the tenant.
    pub template: Option<IssuerTemplate>,
    /// Which claims name the tenant, the SMART scopes and the client.
    pub claims: ClaimNames,
    /// Every token of this provider names this tenant (lowercased id); the token's claims never do.
    pub tenant: Option<String>,
    /// The claim compared with `audiences`.
    pub audience_claim: String,
    /// The JOSE `typ` a token must carry, normalised (lowercase, without `application/`); `None`: any.
    pub token_typ: Option<String>,
    /// Claims that must equal the string, or be an array containing it.
    pub required_claims: Vec<(String, String)>,
}

impl Provider {
    /// A provider with the default claim mapping and no further checks (tests, fuzzing).
    pub fn new(issuer: &str, audiences: Vec<String>, clock_skew_s: i64, max_token_bytes: usize) -> Self {
        Self {
            issuer: issuer.into(),
            audiences,
            clock_skew_s,
            max_token_bytes,
            template: None,
            claims: ClaimNames::default(),
            tenant: None,
            audience_claim: "aud".into(),
            token_typ: None,
            required_claims: Vec::new(),
        }
    }
}

/// An issuer with one placeholder: `prefix{claim}suffix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuerTemplate {
    pub prefix: String,
    pub claim: String,
    pub suffix: String,
}

/// Longest value a template's placeholder takes.
pub const MAX_TEMPLATE_VALUE: usize = 128;

impl IssuerTemplate {
    /// Parses `issuer`: `None` when it has no `{`/`}`; `Err` when it is not a usable template.
    fn parse(issuer: &str) -> Result<Option<Self>, &'static str> {
        if !issuer.contains(['{', '}']) {
            return Ok(None);
        }
        let bad = "must hold exactly one placeholder {claim} in the path of an http(s) URL";
        let (prefix, rest) = issuer.split_once('{').ok_or(bad)?;
        let (claim, suffix) = rest.split_once('}').ok_or(bad)?;
        if prefix.contains('}') || suffix.contains(['{', '}']) || claim.is_empty() {
            return Err(bad);
        }
        if !claim.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')) {
            return Err("the placeholder must name a claim (letters, digits, '_', '-', '.')");
        }
        // The placeholder lies in the path: the scheme and authority are fixed, whatever the token says.
        split_http_url(&format!("{prefix}x{suffix}")).ok_or(bad)?;
        let after_scheme = prefix.strip_prefix("https://").or_else(|| prefix.strip_prefix("http://")).ok_or(bad)?;
        if !after_scheme.contains('/') || prefix.contains('?') {
            return Err(bad);
        }
        Ok(Some(Self { prefix: prefix.into(), claim: claim.into(), suffix: suffix.into() }))
    }

    /// [`IssuerTemplate::parse`] of a template known to be good (tests).
    #[cfg(test)]
    pub fn parse_for_tests(issuer: &str) -> Option<Self> {
        Self::parse(issuer).ok().flatten()
    }

    /// The placeholder's value if `iss` has this template's shape (structure only: [`IssuerTemplate::value_of`]
    /// must then equal the token's own claim).
    pub fn value_in<'a>(&self, iss: &'a str) -> Option<&'a str> {
        let value = iss.strip_prefix(self.prefix.as_str())?.strip_suffix(self.suffix.as_str())?;
        is_template_value(value).then_some(value)
    }

    /// Whether some `iss` fits both templates: one prefix begins the other and one suffix ends the other, and
    /// what one has beyond the other, on each side, could be part of a placeholder value.
    fn overlaps(&self, other: &Self) -> bool {
        let value_chars = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        let (a, b) = (self.prefix.as_str(), other.prefix.as_str());
        let head = a.strip_prefix(b).or_else(|| b.strip_prefix(a));
        let (a, b) = (self.suffix.as_str(), other.suffix.as_str());
        let tail = a.strip_suffix(b).or_else(|| b.strip_suffix(a));
        head.is_some_and(value_chars) && tail.is_some_and(value_chars)
    }

    /// Whether `iss` is this template filled with `value` (a valid placeholder value).
    pub fn matches(&self, iss: &str, value: &str) -> bool {
        is_template_value(value)
            && iss.len() == self.prefix.len() + value.len() + self.suffix.len()
            && self.value_in(iss) == Some(value)
    }
}

/// A placeholder value: 1 to 128 characters of `a-z0-9._-`, not a dot segment (`.`, `..`). Lowercase only:
/// tenant ids are compared without regard to case but `iss` exactly, so `…/ACME` and `…/acme` would be two
/// issuers naming one tenant; a value in another case fills no template (Entra's `tid` is a lowercase GUID).
pub fn is_template_value(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_TEMPLATE_VALUE
        && v != "."
        && v != ".."
        && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
}

/// Which claims of a provider's tokens name the tenant, the SMART scopes and the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimNames {
    /// The claim naming the tenant (string, space-delimited, or array).
    pub tenant: String,
    /// Prefixes a tenant value may carry.
    pub tenant_prefixes: Vec<String>,
    /// The claim holding SMART scopes.
    pub scopes: String,
    /// IdP scope prefix → SMART prefix (the longest key a value begins with applies).
    pub scope_map: Vec<(String, String)>,
    /// Claims tried in order for the client id.
    pub client: Vec<String>,
}

impl Default for ClaimNames {
    fn default() -> Self {
        Self {
            tenant: "scope".into(),
            tenant_prefixes: default_prefixes(),
            scopes: crate::scopes::SCOPE_CLAIM.into(),
            scope_map: Vec::new(),
            client: ["client_id", "azp", "appid"].map(String::from).to_vec(),
        }
    }
}

fn default_prefixes() -> Vec<String> {
    vec![String::new(), "tenant/".into()]
}

/// Where the signing keys come from.
#[derive(Clone, Debug)]
pub enum JwksSource {
    /// Keys given in the configuration.
    Inline(KeySet),
    /// Keys fetched from the IdP through an Envoy cluster, and refreshed.
    Remote(RemoteJwks),
}

/// A JWKS fetched over HTTP through an Envoy cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteJwks {
    /// The URL as configured.
    pub uri: String,
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub refresh_ms: u64,
    pub timeout_ms: u64,
    /// Least time between two fetches triggered by an unknown `kid`.
    pub min_refetch_ms: u64,
    /// Most requests (per VM) parked at once until this key set is fetched again; more are refused (503).
    pub max_waiting: usize,
    /// Configuration from discovery: then `uri`, `authority` and `path` are the OpenID Provider
    /// Configuration's, and the key set's URL is read from it at every refresh.
    pub discovery: Option<DiscoveredJwks>,
}

/// What a discovery document must say for its `jwks_uri` to be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveredJwks {
    /// The `issuer` it must name: the provider's, with a template's placeholder written `{}` (see
    /// [`normalise_placeholder`]).
    pub issuer: String,
    /// Whether the issuer is a template (the document's `issuer` is then compared after
    /// [`normalise_placeholder`]: Entra's common document says `{tenantid}`).
    pub template: bool,
    /// `https://` or `http://`: the document's `jwks_uri` must have the same scheme and `authority`.
    pub scheme: &'static str,
}

/// Longest OpenID Provider Configuration read, in bytes (Entra's, Okta's and Keycloak's take a few KB).
pub const MAX_DISCOVERY_BYTES: usize = 64 * 1024;

/// `s` with its first `{...}` written `{}`: an issuer template compared whatever its placeholder's name.
pub fn normalise_placeholder(s: &str) -> std::borrow::Cow<'_, str> {
    match s.split_once('{').and_then(|(head, rest)| Some((head, rest.split_once('}')?.1))) {
        Some((head, tail)) => std::borrow::Cow::Owned(format!("{head}{{}}{tail}")),
        None => std::borrow::Cow::Borrowed(s),
    }
}

/// One token issuer and where its keys come from.
#[derive(Clone, Debug)]
pub struct ProviderConfig {
    pub provider: Provider,
    pub jwks: JwksSource,
}

/// Where the tenant map is fetched from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registry {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub refresh_ms: u64,
    pub timeout_ms: u64,
    /// The environment variables and files a registry document may name ([`crate::secret_scope`]).
    pub secret_scope: SecretScope,
}

/// The compiled configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The token issuers (at least one); a token's `iss` picks one.
    pub providers: Vec<ProviderConfig>,
    /// The tenants from the configuration (the initial map when a registry is configured; may be empty then).
    /// Requests are decided on the live map (this one, or the registry's latest), never on this field.
    pub tenants: TenantMap,
    /// The top-level `tenant_claim` (`scope` unless configured): the default of every provider's
    /// `claims.tenant`. Requests read the provider's ([`Provider::claims`]), never this field.
    pub tenant_claim: String,
    pub registry: Option<Registry>,
    /// The cluster for tenants given by `url` (Envoy's dynamic forward proxy).
    pub dynamic_forward_proxy_cluster: Option<String>,
    /// One JSON audit line per request: in Envoy's log, as filter state, or none.
    pub audit_log: AuditLog,
    /// Tenant and client id as filter state for Envoy's access log (two host calls a request: opt-in).
    pub access_log_filter_state: bool,
    /// The decision (tenant, client, issuer, scopes, interaction, resource type, outcome) as filter state
    /// in both builds and, in the dynamic module, dynamic metadata: for Envoy's RBAC, access log, tracing.
    pub decision_metadata: bool,
    /// The decision (and the time the token check took) as tags of the request's trace span: set on the
    /// active span by the dynamic module, as filter state for Envoy's tracing `custom_tags` by the wasm build.
    pub span_tags: bool,
    /// An IHE BALP AuditEvent per request, as filter state for Envoy's access log.
    pub audit_event: bool,
    /// Each request's BALP AuditEvent also posted, per tenant in batches, to a FHIR audit server.
    pub audit_sink: Option<crate::audit_sink::SinkConfig>,
    pub metadata_cluster: String,
    pub route_header: String,
    pub tenant_header: String,
    pub forward_authorization: bool,
    pub signature_verifier: SignatureVerifier,
    /// Whether `signature_verifier: "pure_rust"` checks ES384 in this build ([`PURE_RUST_CHECKS_P384`]; not
    /// configurable: tests clear it to act as the shipped wasm module).
    pub pure_rust_checks_p384: bool,
    /// Capacity of each VM's verified-token cache; 0 disables it.
    pub token_cache_entries: usize,
    /// A Bundle posted to the base keeps its headers from the upstream until its body is judged (`true`,
    /// the default: needs the wasm `PluginConfig`'s `allow_on_headers_stop_iteration`), or lets them go
    /// first and holds only the body (`false`: for hosts that cannot set that flag).
    pub hold_bundle_headers: bool,
    /// How the IdP is advertised (`/metadata` patching, `/.well-known/smart-configuration`); `None`: not at all.
    pub discovery: Option<Discovery>,
    /// How clients reach this endpoint (`https://fhir.example.org`), without a trailing slash: links are
    /// rewritten to it and `X-Forwarded-*` are set from it. Required when a tenant rewrites links; never
    /// taken from the request.
    pub public_base_url: Option<String>,
    /// The SMART configuration document, built once when `discovery` is configured.
    pub smart_configuration: Option<String>,
    /// Every tenant's quota unless it has its own ([`crate::quota`]); `None`: no quota.
    pub quota: Option<std::sync::Arc<crate::quota::Quota>>,
    /// A request header set to the tenant id of every routed request, for Envoy's global rate limit
    /// filter (`request_headers` descriptor); a client-sent copy is always removed. `None`: not set.
    pub rate_limit_descriptor_header: Option<String>,
    /// Paging links become signed cursors ([`crate::cursor`]); `None`: links pass as the upstream wrote them.
    pub paging: Option<crate::cursor::Paging>,
}

/// A configuration that cannot be used: which field, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the offending field, e.g. `provider.jwks_uri`; empty when the document itself is bad.
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "invalid plugin configuration: {}", self.message)
        } else {
            write!(f, "invalid plugin configuration: field `{}`: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

const DEFAULT_REFRESH_S: u64 = 300;
const DEFAULT_TIMEOUT_MS: u64 = 5_000;
const DEFAULT_SKEW_S: u64 = 60;
const DEFAULT_MAX_TOKEN_BYTES: usize = 8 * 1024;
const DEFAULT_MIN_REFETCH_S: u64 = 30;
/// Requests parked per provider and VM while a key set is refetched for an unknown `kid`: enough for a
/// burst at a key rotation, small enough that a flood of made-up `kid`s during an IdP outage stays a few MB.
const DEFAULT_MAX_WAITING: usize = 256;
const DEFAULT_TOKEN_CACHE_ENTRIES: usize = 10_000;

/// The process's environment and files: `name`, or a file as [`crate::upstream_auth::FILE_PREFIX`]`path`,
/// or a registry document's file as [`crate::secret_scope::FILE_BENEATH_PREFIX`]`directory` NUL `path` (read
/// only if it lies beneath the directory: [`crate::secret_scope::read_file_beneath`]).
pub fn process_lookup(name: &str) -> Option<String> {
    if let Some(key) = name.strip_prefix(crate::secret_scope::FILE_BENEATH_PREFIX) {
        let (dir, path) = key.split_once('\0')?;
        return crate::secret_scope::read_file_beneath(dir, path);
    }
    match name.strip_prefix(crate::upstream_auth::FILE_PREFIX) {
        Some(path) => std::fs::read_to_string(path).ok(),
        None => std::env::var(name).ok(),
    }
}

impl Config {
    /// Parses and compiles the plugin configuration, reading `upstream_header` values and secrets from the
    /// process environment (inside Envoy: the VM's `environment_variables`) and files (where the process
    /// can read them: the dynamic module).
    pub fn from_json(bytes: &[u8]) -> Result<Config, ConfigError> {
        Self::from_json_with_env(bytes, &process_lookup)
    }

    /// Like [`Config::from_json`], with the environment given.
    pub fn from_json_with_env(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { String::new() } else { path };
            ConfigError::new(field, crate::redact::serde_message(&e.into_inner().to_string()))
        })?;
        raw.compile(env)
    }
}

/// A base URL as configured: absolute http(s), no query or fragment; returned without a trailing slash.
fn base_url(field: &str, url: &str) -> Result<String, ConfigError> {
    match split_http_url(url) {
        Some((_, path)) if !path.contains('?') => Ok(url.trim_end_matches('/').to_string()),
        _ => Err(ConfigError::new(field, "must be an absolute http(s) URL without query or fragment")),
    }
}

fn compile_upstream(
    field: &str,
    t: &RawTenant,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Box<TenantSettings>>, ConfigError> {
    if t.authority.is_none()
        && t.base_path.is_none()
        && t.links_base_url.is_none()
        && t.upstream_header.is_none()
        && t.upstream_auth.is_none()
        && t.allow.is_none()
        && t.issuers.is_none()
        && t.allowed_clients.is_none()
        && t.require_smart_scopes.is_none()
        && t.quota.is_none()
    {
        return Ok(None);
    }
    let mut u = TenantSettings::default();
    if let Some(a) = &t.authority {
        if a.is_empty() || !is_header_value(a) || a.contains('/') {
            return Err(ConfigError::new(format!("{field}.authority"), "must be a host or host:port"));
        }
        u.authority = Some(a.clone());
    }
    if let Some(p) = &t.base_path {
        let ok = p.starts_with('/') && is_header_value(p) && !p.contains(['?', '#']) && !p.contains("..");
        if !ok {
            return Err(ConfigError::new(format!("{field}.base_path"), "must be a path like /api/FHIR/R4"));
        }
        u.base_path = p.trim_end_matches('/').to_string();
    }
    if let Some(l) = &t.links_base_url {
        u.links_base_url = Some(base_url(&format!("{field}.links_base_url"), l)?);
    }
    if let Some(h) = &t.upstream_header {
        let name = header_name(&format!("{field}.upstream_header.name"), Some(h.name.to_ascii_lowercase()), "")
            .or_else(
                |e| if h.name.eq_ignore_ascii_case("authorization") { Ok("authorization".into()) } else { Err(e) },
            )?;
        let value = env(&h.env).filter(|v| !v.is_empty()).ok_or_else(|| {
            ConfigError::new(
                format!("{field}.upstream_header.env"),
                format!(
                    "environment variable {} is not set for the VM (vm_config.environment_variables)",
                    crate::upstream_auth::env_name(&h.env)
                ),
            )
        })?;
        if !value.bytes().all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic()) {
            return Err(ConfigError::new(
                format!("{field}.upstream_header.env"),
                "the variable's value is not a valid header value",
            ));
        }
        u.header = Some((name, value));
    }
    if let Some(raw) = &t.upstream_auth {
        if u.header.as_ref().is_some_and(|(name, _)| name == "authorization") {
            return Err(ConfigError::new(
                format!("{field}.upstream_header.name"),
                "is Authorization, which upstream_auth sets: give one of the two",
            ));
        }
        let client = crate::upstream_auth::compile(&format!("{field}.upstream_auth"), raw, env)
            .map_err(|e| ConfigError::new(e.field, e.message))?;
        u.upstream_auth = Some(std::sync::Arc::new(client));
    }
    u.issuers = t.issuers.clone();
    if let Some(clients) = &t.allowed_clients {
        // Client ids are compared exactly as signed; the identity keeps at most 128 characters of one.
        let ok = !clients.is_empty() && clients.iter().all(|c| !c.is_empty() && c.chars().count() <= 128);
        if !ok {
            return Err(ConfigError::new(
                format!("{field}.allowed_clients"),
                "must list at least one client id, each of 1 to 128 characters (omit the field to allow any client)",
            ));
        }
        u.allowed_clients = Some(clients.clone());
    }
    u.require_smart_scopes = t.require_smart_scopes.unwrap_or(false);
    if let Some(a) = &t.allow {
        u.policy = Policy::new(&a.interactions, a.resource_types.as_deref())
            .map_err(|why| ConfigError::new(format!("{field}.allow"), why))?;
    }
    if let Some(q) = &t.quota {
        u.quota = Some(compile_quota(&format!("{field}.quota"), q)?);
    }
    Ok(Some(Box::new(u)))
}

fn compile_quota(
    field: &str,
    raw: &crate::quota::RawQuota,
) -> Result<Option<std::sync::Arc<crate::quota::Quota>>, ConfigError> {
    crate::quota::compile(field, raw).map_err(|e| ConfigError::new(e.field, e.message))
}

fn compile_discovery(d: RawDiscovery) -> Result<Discovery, ConfigError> {
    split_http_url(&d.token_endpoint)
        .ok_or_else(|| ConfigError::new("discovery.token_endpoint", "must be an absolute http(s) URL"))?;
    if let Some(a) = &d.authorization_endpoint {
        split_http_url(a)
            .ok_or_else(|| ConfigError::new("discovery.authorization_endpoint", "must be an absolute http(s) URL"))?;
    }
    Ok(Discovery {
        token_endpoint: d.token_endpoint,
        authorization_endpoint: d.authorization_endpoint,
        scopes_supported: d.scopes_supported.unwrap_or_default(),
        token_endpoint_auth_methods: d
            .token_endpoint_auth_methods_supported
            .unwrap_or_else(|| vec!["client_secret_post".into(), "client_secret_basic".into()]),
        capabilities: d.capabilities.unwrap_or_else(|| vec!["client-confidential-symmetric".into()]),
    })
}

/// A claim name as configured: not empty, visible ASCII.
fn claim_name(field: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || !is_header_value(name) {
        return Err(ConfigError::new(field, "must be a claim name (visible ASCII, not empty)"));
    }
    Ok(())
}

/// Checks tenant prefixes as written.
fn tenant_prefixes(field: &str, prefixes: Vec<String>) -> Result<Vec<String>, ConfigError> {
    if prefixes.is_empty() {
        return Err(ConfigError::new(field, "must list at least one prefix (\"\" for bare ids)"));
    }
    if prefixes.iter().any(|p| p.contains(' ')) {
        return Err(ConfigError::new(field, "a prefix must not contain spaces"));
    }
    Ok(prefixes)
}

/// A provider's claim mapping: each field given, or the configuration-wide default.
fn compile_claims(field: &str, raw: Option<RawClaims>, defaults: &ClaimNames) -> Result<ClaimNames, ConfigError> {
    let f = |name: &str| format!("{field}.claims.{name}");
    let raw = raw.unwrap_or_default();
    let mut out = defaults.clone();
    if let Some(t) = raw.tenant {
        claim_name(&f("tenant"), &t)?;
        out.tenant = t;
    }
    if let Some(p) = raw.tenant_prefixes {
        out.tenant_prefixes = tenant_prefixes(&f("tenant_prefixes"), p)?;
    }
    if let Some(s) = raw.scopes {
        claim_name(&f("scopes"), &s)?;
        out.scopes = s;
    }
    if let Some(map) = raw.scope_map {
        // Visible ASCII (so no spaces): a key or value with a space could never match a scope value.
        let ok = |s: &str| s.bytes().all(|b| b.is_ascii_graphic());
        for (k, v) in map {
            match v {
                serde_json::Value::String(v) if !k.is_empty() && ok(&k) && ok(&v) => out.scope_map.push((k, v)),
                _ => {
                    return Err(ConfigError::new(
                        f("scope_map"),
                        "maps IdP prefixes to SMART prefixes: keys non-empty, keys and values strings of visible \
                         ASCII without spaces",
                    ))
                }
            }
        }
    }
    if let Some(c) = raw.client {
        if c.is_empty() {
            return Err(ConfigError::new(f("client"), "must list at least one claim name"));
        }
        for name in &c {
            claim_name(&f("client"), name)?;
        }
        out.client = c;
    }
    Ok(out)
}

/// `token_typ`, normalised as compared (RFC 7515 §4.1.9): lowercase, without `application/`.
pub fn normalise_typ(typ: &str) -> String {
    let lower = typ.to_ascii_lowercase();
    match lower.strip_prefix("application/") {
        Some(rest) if !rest.contains('/') => rest.to_string(),
        _ => lower,
    }
}

fn compile_provider(field: &str, p: RawProvider, defaults: &ClaimNames) -> Result<ProviderConfig, ConfigError> {
    let f = |name: &str| format!("{field}.{name}");
    if p.issuer.is_empty() {
        return Err(ConfigError::new(f("issuer"), "must not be empty"));
    }
    let template = IssuerTemplate::parse(&p.issuer).map_err(|why| ConfigError::new(f("issuer"), why))?;
    let claims_given = p.claims.as_ref().map(|c| (c.tenant.is_some(), c.tenant_prefixes.is_some()));
    let mut claims = compile_claims(field, p.claims, defaults)?;
    if let Some(t) = &template {
        match claims_given {
            Some((true, _)) => {
                return Err(ConfigError::new(
                    f("claims.tenant"),
                    "is set by the issuer template's placeholder: leave it out",
                ))
            }
            Some((_, true)) => {
                return Err(ConfigError::new(
                    f("claims.tenant_prefixes"),
                    "does not apply to an issuer template (the tenant is the placeholder's value)",
                ))
            }
            _ => {}
        }
        claims.tenant = t.claim.clone();
        claims.tenant_prefixes = vec![String::new()];
    }
    let tenant = match p.tenant {
        None => None,
        Some(id) => {
            if template.is_some() {
                return Err(ConfigError::new(f("tenant"), "cannot be combined with an issuer template"));
            }
            if claims_given.is_some_and(|(t, p)| t || p) {
                return Err(ConfigError::new(
                    f("tenant"),
                    "names the tenant of every token: leave out claims.tenant and claims.tenant_prefixes",
                ));
            }
            if !crate::tenant::is_tenant_id(&id) {
                return Err(ConfigError::new(
                    f("tenant"),
                    "a tenant id is 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' or '-'",
                ));
            }
            Some(id.to_ascii_lowercase())
        }
    };
    let audience_claim = p.audience_claim.unwrap_or_else(|| "aud".into());
    claim_name(&f("audience_claim"), &audience_claim)?;
    let token_typ = match p.token_typ {
        None => None,
        Some(t) => {
            let n = normalise_typ(&t);
            if n.is_empty() || !is_header_value(&n) {
                return Err(ConfigError::new(f("token_typ"), "must be a media type such as at+jwt"));
            }
            Some(n)
        }
    };
    let mut required_claims = Vec::new();
    for (name, value) in p.required_claims.unwrap_or_default() {
        claim_name(&f("required_claims"), &name)?;
        let serde_json::Value::String(value) = value else {
            return Err(ConfigError::new(f(&format!("required_claims.{name}")), "must be a string"));
        };
        required_claims.push((name, value));
    }
    if p.audiences.is_empty() || p.audiences.iter().any(String::is_empty) {
        return Err(ConfigError::new(f("audiences"), "must list at least one non-empty audience"));
    }
    let clock_skew_s = p.clock_skew_s.unwrap_or(DEFAULT_SKEW_S);
    if clock_skew_s > 3_600 {
        return Err(ConfigError::new(f("clock_skew_s"), "must be at most 3600"));
    }
    let max_token_bytes = p.max_token_bytes.unwrap_or(DEFAULT_MAX_TOKEN_BYTES);
    if !(256..=65_536).contains(&max_token_bytes) {
        return Err(ConfigError::new(f("max_token_bytes"), "must be between 256 and 65536"));
    }
    if p.discovery_uri.is_some() && (p.jwks.is_some() || p.jwks_uri.is_some() || p.jwks_cluster.is_none()) {
        return Err(ConfigError::new(
            f("discovery_uri"),
            "applies to a provider with jwks_cluster and neither jwks_uri nor jwks",
        ));
    }
    let default_discovery_uri = p.discovery_uri.is_none();
    let jwks = match (p.jwks, p.jwks_uri, p.jwks_cluster) {
        (Some(inline), None, None) => {
            if p.jwks_refresh_s.is_some()
                || p.jwks_timeout_ms.is_some()
                || p.jwks_min_refetch_s.is_some()
                || p.jwks_max_waiting.is_some()
            {
                return Err(ConfigError::new(f("jwks_refresh_s"), "only applies to a remote JWKS (jwks_uri)"));
            }
            JwksSource::Inline(KeySet::from_value(&inline).map_err(|e| ConfigError::new(f("jwks"), e.to_string()))?)
        }
        (None, uri, Some(cluster)) => {
            let (uri, discovery) = match uri {
                Some(uri) => (uri, None),
                None => {
                    let uri = match p.discovery_uri {
                        Some(uri) => uri,
                        None if template.is_some() => {
                            return Err(ConfigError::new(
                                f("discovery_uri"),
                                "is required with an issuer template (or give jwks_uri)",
                            ))
                        }
                        // OpenID Connect Discovery 1.0 §4: the issuer without a trailing `/`, then the path.
                        None => format!("{}/.well-known/openid-configuration", p.issuer.trim_end_matches('/')),
                    };
                    let scheme = if uri.starts_with("https://") { "https://" } else { "http://" };
                    let issuer = match &template {
                        Some(_) => normalise_placeholder(&p.issuer).into_owned(),
                        None => p.issuer.clone(),
                    };
                    (uri, Some(DiscoveredJwks { issuer, template: template.is_some(), scheme }))
                }
            };
            let uri_field = if discovery.is_some() { "discovery_uri" } else { "jwks_uri" };
            let (authority, path) = split_http_url(&uri).ok_or_else(|| {
                let why = if discovery.is_some() && default_discovery_uri {
                    "give discovery_uri (the issuer is not an http(s) URL to find the discovery document under), \
                     or jwks_uri"
                } else {
                    "must be an absolute http(s) URL"
                };
                ConfigError::new(f(uri_field), why)
            })?;
            if !is_header_value(&cluster) || cluster.is_empty() {
                return Err(ConfigError::new(f("jwks_cluster"), "must be an Envoy cluster name"));
            }
            let refresh_s = p.jwks_refresh_s.unwrap_or(DEFAULT_REFRESH_S);
            if !(10..=86_400).contains(&refresh_s) {
                return Err(ConfigError::new(f("jwks_refresh_s"), "must be between 10 and 86400"));
            }
            let timeout_ms = p.jwks_timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
            if !(100..=60_000).contains(&timeout_ms) {
                return Err(ConfigError::new(f("jwks_timeout_ms"), "must be between 100 and 60000"));
            }
            let min_refetch_s = p.jwks_min_refetch_s.unwrap_or(DEFAULT_MIN_REFETCH_S);
            if !(1..=3_600).contains(&min_refetch_s) {
                return Err(ConfigError::new(f("jwks_min_refetch_s"), "must be between 1 and 3600"));
            }
            let max_waiting = p.jwks_max_waiting.unwrap_or(DEFAULT_MAX_WAITING);
            if max_waiting > 100_000 {
                return Err(ConfigError::new(f("jwks_max_waiting"), "must be at most 100000 (0: never wait)"));
            }
            JwksSource::Remote(RemoteJwks {
                uri,
                cluster,
                authority,
                path,
                refresh_ms: refresh_s * 1_000,
                timeout_ms,
                min_refetch_ms: min_refetch_s * 1_000,
                max_waiting,
                discovery,
            })
        }
        (None, Some(_), None) => return Err(ConfigError::new(f("jwks_cluster"), "is required with jwks_uri")),
        (None, None, None) => {
            return Err(ConfigError::new(
                f("jwks_uri"),
                "give jwks_uri with jwks_cluster, jwks_cluster alone (keys found by discovery), or jwks",
            ));
        }
        (Some(_), _, _) => {
            return Err(ConfigError::new(f("jwks"), "give either jwks_uri with jwks_cluster, or jwks, not both"));
        }
    };
    Ok(ProviderConfig {
        provider: Provider {
            issuer: p.issuer,
            audiences: p.audiences,
            clock_skew_s: clock_skew_s as i64,
            max_token_bytes,
            template,
            claims,
            tenant,
            audience_claim,
            token_typ,
            required_claims,
        },
        jwks,
    })
}

/// What compiling a tenant needs besides the tenant itself.
struct TenantContext<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
    dynamic_forward_proxy_cluster: Option<&'a str>,
    issuers: Vec<&'a str>,
    /// Whether `public_base_url` is configured: links are rewritten to it, so a tenant needs it to have any.
    public_base_url: bool,
    /// What a tenant may name as a secret's source: `None` for the plugin JSON's own tenants (anything).
    scope: Option<&'a SecretScope>,
}

fn compile_tenants(
    field: &str,
    raw: BTreeMap<String, RawTenant>,
    ctx: &TenantContext<'_>,
    mut map: TenantMap,
) -> Result<TenantMap, ConfigError> {
    for (id, mut tenant) in raw {
        let field = format!("{field}.{id}");
        if let Some(scope) = ctx.scope {
            check_places(scope, &tenant).map_err(|(f, why)| ConfigError::new(format!("{field}.{f}"), why))?;
        }
        let links_field = if tenant.links_base_url.is_some() { "links_base_url" } else { "url" };
        let cluster = match (tenant.cluster.take(), tenant.url.take()) {
            (Some(cluster), None) => {
                if cluster.is_empty() || !is_header_value(&cluster) {
                    return Err(ConfigError::new(format!("{field}.cluster"), "must be an Envoy cluster name"));
                }
                cluster
            }
            (None, Some(url)) => {
                let dfp = ctx.dynamic_forward_proxy_cluster.ok_or_else(|| {
                    ConfigError::new(
                        format!("{field}.url"),
                        "needs the top-level dynamic_forward_proxy_cluster (Envoy's dynamic forward proxy)",
                    )
                })?;
                let base = base_url(&format!("{field}.url"), &url)?;
                let (authority, path) = split_http_url(&base)
                    .ok_or_else(|| ConfigError::new(format!("{field}.url"), "must be an absolute http(s) URL"))?;
                if tenant.authority.is_some() || tenant.base_path.is_some() {
                    return Err(ConfigError::new(
                        format!("{field}.url"),
                        "gives the authority and base path itself: drop authority and base_path",
                    ));
                }
                tenant.authority = Some(authority);
                tenant.base_path = Some(path);
                tenant.links_base_url.get_or_insert(base);
                dfp.to_string()
            }
            _ => return Err(ConfigError::new(format!("{field}.cluster"), "give exactly one of cluster and url")),
        };
        if let Some(issuers) = &tenant.issuers {
            if let Some(bad) = issuers.iter().find(|i| !ctx.issuers.contains(&i.as_str())) {
                return Err(ConfigError::new(
                    format!("{field}.issuers"),
                    format!("`{bad}` is not a configured issuer"),
                ));
            }
        }
        let upstream = compile_upstream(&field, &tenant, ctx.env)?;
        if !ctx.public_base_url && upstream.as_ref().is_some_and(|u| u.links_base_url.is_some()) {
            return Err(ConfigError::new(
                format!("{field}.{links_field}"),
                "rewrites links, which needs the top-level public_base_url (links are never built from the \
                 client's Host)",
            ));
        }
        map.insert_with(&id, cluster, upstream).map_err(|why| ConfigError::new(field, why))?;
    }
    Ok(map)
}

/// Whether every environment variable and file a registry tenant names lies in `scope`; else the field (below
/// the tenant) that names one outside it, and why.
fn check_places(scope: &SecretScope, t: &RawTenant) -> Result<(), (&'static str, &'static str)> {
    let check = |field: &'static str, place: Place, name: &str| scope.check(place, name).map_err(|why| (field, why));
    if let Some(h) = &t.upstream_header {
        check("upstream_header.env", Place::Env, &h.env)?;
    }
    if let Some(a) = &t.upstream_auth {
        let secrets = [
            (&a.client_secret, "upstream_auth.client_secret.env", "upstream_auth.client_secret.file"),
            (&a.private_key, "upstream_auth.private_key.env", "upstream_auth.private_key.file"),
        ];
        for (secret, env_field, file_field) in secrets {
            let Some(s) = secret else { continue };
            if let Some(env) = &s.env {
                check(env_field, Place::Env, env)?;
            }
            if let Some(file) = &s.file {
                check(file_field, Place::File, file)?;
            }
        }
    }
    Ok(())
}

/// A number of `field` within `range`, `default` when absent.
fn within<T: PartialOrd + Copy + fmt::Display>(
    field: &str,
    value: Option<T>,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError> {
    let v = value.unwrap_or(default);
    if range.contains(&v) {
        Ok(v)
    } else {
        Err(ConfigError::new(field, format!("must be between {} and {}", range.start(), range.end())))
    }
}

fn compile_audit_sink(r: RawAuditSink) -> Result<crate::audit_sink::SinkConfig, ConfigError> {
    if r.cluster.is_empty() || !is_header_value(&r.cluster) {
        return Err(ConfigError::new("audit_sink.cluster", "must be an Envoy cluster name"));
    }
    let url = |field: &str, uri: &str| {
        let (authority, path) =
            split_http_url(uri).ok_or_else(|| ConfigError::new(field, "must be an absolute http(s) URL"))?;
        if authority.contains(['{', '}']) || path.contains('?') {
            return Err(ConfigError::new(field, "may hold {tenant} only in its path, and no query"));
        }
        Ok((authority, path))
    };
    let (authority, path) = url("audit_sink.uri", &r.uri)?;
    if path.replace("{tenant}", "").contains(['{', '}']) {
        return Err(ConfigError::new("audit_sink.uri", "knows no placeholder but {tenant}"));
    }
    let untenanted_path = match &r.untenanted_uri {
        Some(uri) => {
            let (a, p) = url("audit_sink.untenanted_uri", uri)?;
            if a != authority {
                return Err(ConfigError::new("audit_sink.untenanted_uri", "must have the authority of audit_sink.uri"));
            }
            if p.contains(['{', '}']) {
                return Err(ConfigError::new("audit_sink.untenanted_uri", "has no tenant to fill a placeholder"));
            }
            Some(p)
        }
        None => None,
    };
    let batch_size = within("audit_sink.batch_size", r.batch_size, 100, 1..=1_000)?;
    let queue_size = within("audit_sink.queue_size", r.queue_size, 10_000, 1..=1_000_000)?;
    if queue_size < batch_size {
        return Err(ConfigError::new("audit_sink.queue_size", "must be at least audit_sink.batch_size"));
    }
    let backoff_ms = within("audit_sink.backoff_ms", r.backoff_ms, 1_000, 100..=600_000)?;
    let max_backoff_ms =
        within("audit_sink.max_backoff_ms", r.max_backoff_ms, 60_000.max(backoff_ms), 100..=3_600_000)?;
    if max_backoff_ms < backoff_ms {
        return Err(ConfigError::new("audit_sink.max_backoff_ms", "must be at least audit_sink.backoff_ms"));
    }
    Ok(crate::audit_sink::SinkConfig {
        cluster: r.cluster,
        authority,
        path,
        untenanted_path,
        batch_size,
        queue_size,
        flush_interval_ms: within("audit_sink.flush_interval_ms", r.flush_interval_ms, 1_000, 100..=60_000)?,
        timeout_ms: within("audit_sink.timeout_ms", r.timeout_ms, 5_000, 100..=60_000)?,
        attempts: within("audit_sink.attempts", r.attempts, 5, 1..=20)?,
        backoff_ms,
        max_backoff_ms,
    })
}

fn compile_registry(r: RawRegistry) -> Result<Registry, ConfigError> {
    let (authority, path) = split_http_url(&r.uri)
        .ok_or_else(|| ConfigError::new("tenant_registry.uri", "must be an absolute http(s) URL"))?;
    if r.cluster.is_empty() || !is_header_value(&r.cluster) {
        return Err(ConfigError::new("tenant_registry.cluster", "must be an Envoy cluster name"));
    }
    let refresh_s = r.refresh_s.unwrap_or(60);
    if !(1..=86_400).contains(&refresh_s) {
        return Err(ConfigError::new("tenant_registry.refresh_s", "must be between 1 and 86400"));
    }
    let timeout_ms = r.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if !(100..=60_000).contains(&timeout_ms) {
        return Err(ConfigError::new("tenant_registry.timeout_ms", "must be between 100 and 60000"));
    }
    let secret_scope = match &r.secret_scope {
        Some(raw) => SecretScope::compile(raw).map_err(|(field, why)| ConfigError::new(field, why))?,
        None => SecretScope::default(),
    };
    Ok(Registry { cluster: r.cluster, authority, path, refresh_ms: refresh_s * 1_000, timeout_ms, secret_scope })
}

impl Config {
    /// Compiles a tenant registry document (`{"tenants": {...}}`, the same tenant objects as the
    /// configuration's) into a new tenant map; the error names the offending field. The environment
    /// variables and files the document names must lie in `tenant_registry.secret_scope` (else the whole
    /// document is refused, and nothing of that tenant is read), and `env` is asked only for those.
    pub fn compile_registry(
        &self,
        bytes: &[u8],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<TenantMap, ConfigError> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let raw: RawRegistryDocument = serde_path_to_error::deserialize(de).map_err(|e| {
            ConfigError::new(e.path().to_string(), crate::redact::serde_message(&e.into_inner().to_string()))
        })?;
        // The operator's scope of what a document may name: checked for each tenant before anything of it is
        // read, and the lookup itself limited to it.
        let nothing = SecretScope::default();
        let scope = self.registry.as_ref().map_or(&nothing, |r| &r.secret_scope);
        let scoped = scope.lookup(env);
        let ctx = TenantContext {
            env: &scoped,
            scope: Some(scope),
            dynamic_forward_proxy_cluster: self.dynamic_forward_proxy_cluster.as_deref(),
            issuers: self.providers.iter().map(|p| p.provider.issuer.as_str()).collect(),
            public_base_url: self.public_base_url.is_some(),
        };
        compile_tenants("tenants", raw.tenants, &ctx, self.tenants.empty_like())
    }

    /// Whether anything is fetched or sent at run time (a remote JWKS, a tenant registry, an audit sink).
    pub fn fetches(&self) -> bool {
        self.registry.is_some()
            || self.audit_sink.is_some()
            || self.providers.iter().any(|p| matches!(p.jwks, JwksSource::Remote(_)))
    }

    /// The provider of a token issued by `issuer`, by index: the one with exactly this issuer, else the
    /// first whose issuer template `issuer` fits (the token's own claim must then fill it: [`crate::verify`]).
    pub fn provider_index(&self, issuer: &str) -> Option<usize> {
        self.providers.iter().position(|p| p.provider.template.is_none() && p.provider.issuer == issuer).or_else(|| {
            self.providers
                .iter()
                .position(|p| p.provider.template.as_ref().is_some_and(|t| t.value_in(issuer).is_some()))
        })
    }
}

impl RawConfig {
    /// Validates and compiles; `env` gives the VM's environment variables.
    pub fn compile(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let single_provider = self.provider.is_some();
        let claim = self.tenant_claim.unwrap_or_else(|| "scope".into());
        if claim.is_empty() {
            return Err(ConfigError::new("tenant_claim", "must not be empty"));
        }
        let prefixes =
            tenant_prefixes("tenant_scope_prefixes", self.tenant_scope_prefixes.unwrap_or_else(default_prefixes))?;
        let defaults = ClaimNames { tenant: claim.clone(), tenant_prefixes: prefixes.clone(), ..ClaimNames::default() };
        let providers = match (self.provider, self.providers) {
            (Some(p), None) => vec![compile_provider("provider", p, &defaults)?],
            (None, Some(list)) if !list.is_empty() => list
                .into_iter()
                .enumerate()
                .map(|(i, p)| compile_provider(&format!("providers[{i}]"), p, &defaults))
                .collect::<Result<Vec<_>, _>>()?,
            (None, Some(_)) => return Err(ConfigError::new("providers", "must list at least one provider")),
            (None, None) => return Err(ConfigError::new("provider", "missing field `provider` (or `providers`)")),
            (Some(_), Some(_)) => return Err(ConfigError::new("providers", "give either provider or providers")),
        };
        for (i, p) in providers.iter().enumerate() {
            if providers.iter().skip(i + 1).any(|q| q.provider.issuer == p.provider.issuer) {
                return Err(ConfigError::new(format!("providers[{i}].issuer"), "two providers have this issuer"));
            }
        }
        // Two templates one `iss` could fill (`https://h/t-{tid}` and `https://h/{org}` both fit
        // `https://h/t-b`): the first would take every such token, and its own claim name the tenant.
        for (i, p) in providers.iter().enumerate() {
            let Some(t) = &p.provider.template else { continue };
            if providers.iter().take(i).filter_map(|q| q.provider.template.as_ref()).any(|q| q.overlaps(t)) {
                return Err(ConfigError::new(
                    format!("providers[{i}].issuer"),
                    "an issuer another provider's template also fits (a placeholder value may hold '.', '_', '-')",
                ));
            }
        }
        let provider_field =
            |i: usize| if single_provider { "provider".to_string() } else { format!("providers[{i}]") };
        refuse_keys_beyond_pure_rust(&providers, &provider_field, self.signature_verifier, PURE_RUST_CHECKS_P384)?;

        let registry = self.tenant_registry.map(compile_registry).transpose()?;
        if self.tenants.is_empty() && registry.is_none() {
            return Err(ConfigError::new("tenants", "must name at least one tenant (or configure tenant_registry)"));
        }
        if let Some(dfp) = &self.dynamic_forward_proxy_cluster {
            if dfp.is_empty() || !is_header_value(dfp) {
                return Err(ConfigError::new("dynamic_forward_proxy_cluster", "must be an Envoy cluster name"));
            }
        }
        let public_base_url = self.public_base_url.map(|u| base_url("public_base_url", &u)).transpose()?;
        let tenants = {
            let ctx = TenantContext {
                env,
                dynamic_forward_proxy_cluster: self.dynamic_forward_proxy_cluster.as_deref(),
                issuers: providers.iter().map(|p| p.provider.issuer.as_str()).collect(),
                public_base_url: public_base_url.is_some(),
                scope: None,
            };
            compile_tenants("tenants", self.tenants, &ctx, TenantMap::new(prefixes))?
        };
        // A fixed tenant must be one of the configuration's (a registry's tenants arrive later).
        if registry.is_none() {
            for (i, p) in providers.iter().enumerate() {
                if p.provider.tenant.as_deref().is_some_and(|t| tenants.get(t).is_none()) {
                    return Err(ConfigError::new(
                        format!("{}.tenant", provider_field(i)),
                        "names no configured tenant",
                    ));
                }
            }
        }

        if self.metadata_cluster.is_empty() || !is_header_value(&self.metadata_cluster) {
            return Err(ConfigError::new("metadata_cluster", "must be an Envoy cluster name"));
        }
        let route_header = header_name("route_header", self.route_header, DEFAULT_ROUTE_HEADER)?;
        let tenant_header = header_name("tenant_header", self.tenant_header, DEFAULT_TENANT_HEADER)?;
        if route_header == tenant_header {
            return Err(ConfigError::new("tenant_header", "must differ from route_header"));
        }

        let discovery = self.discovery.map(compile_discovery).transpose()?;
        // SMART names one issuer: the first provider's.
        let smart_configuration = discovery.as_ref().and_then(|d| {
            let first = providers.first()?;
            let jwks_uri = match &first.jwks {
                JwksSource::Remote(r) if r.discovery.is_none() => Some(r.uri.as_str()),
                JwksSource::Remote(_) | JwksSource::Inline(_) => None,
            };
            Some(d.smart_configuration(&first.provider.issuer, jwks_uri))
        });
        let quota = match &self.quota {
            Some(raw) if raw.unlimited => {
                return Err(ConfigError::new("quota.unlimited", "is for a tenant's own quota: leave quota out instead"))
            }
            Some(raw) => compile_quota("quota", raw)?,
            None => None,
        };
        let rate_limit_descriptor_header = self
            .rate_limit_descriptor_header
            .map(|h| header_name("rate_limit_descriptor_header", Some(h), ""))
            .transpose()?;
        if rate_limit_descriptor_header.as_ref().is_some_and(|h| *h == route_header || *h == tenant_header) {
            return Err(ConfigError::new(
                "rate_limit_descriptor_header",
                "must differ from route_header and tenant_header",
            ));
        }
        let paging = self.paging_cursors.map(|raw| compile_paging(&raw, env, public_base_url.is_some())).transpose()?;
        let audit_sink = self.audit_sink.map(compile_audit_sink).transpose()?;
        let audit_log = compile_audit_log(self.audit_log.as_ref())?;
        let token_cache_entries = self.token_cache_entries.unwrap_or(DEFAULT_TOKEN_CACHE_ENTRIES);
        if token_cache_entries > 1_000_000 {
            return Err(ConfigError::new("token_cache_entries", "must be at most 1000000 (0 disables the cache)"));
        }

        Ok(Config {
            providers,
            tenants,
            tenant_claim: claim,
            registry,
            dynamic_forward_proxy_cluster: self.dynamic_forward_proxy_cluster,
            audit_log,
            access_log_filter_state: self.access_log_filter_state.unwrap_or(false),
            decision_metadata: self.decision_metadata.unwrap_or(false),
            span_tags: self.span_tags.unwrap_or(false),
            audit_event: self.audit_event.unwrap_or(false),
            audit_sink,
            metadata_cluster: self.metadata_cluster,
            route_header,
            tenant_header,
            forward_authorization: self.forward_authorization,
            signature_verifier: self.signature_verifier,
            pure_rust_checks_p384: PURE_RUST_CHECKS_P384,
            token_cache_entries,
            hold_bundle_headers: self.hold_bundle_headers.unwrap_or(true),
            smart_configuration,
            discovery,
            public_base_url,
            quota,
            rate_limit_descriptor_header,
            paging,
        })
    }
}

/// `paging_cursors`: a key of at least 32 bytes (never made per process: every wasm worker VM and every
/// Envoy must verify the others' cursors), a lifetime, and `public_base_url` to write the cursor links under.
fn compile_paging(
    raw: &RawPagingCursors,
    env: &dyn Fn(&str) -> Option<String>,
    public_base_url: bool,
) -> Result<crate::cursor::Paging, ConfigError> {
    use crate::cursor::{Paging, DEFAULT_TTL_S, MAX_TTL_S, MIN_KEY_BYTES};
    if !public_base_url {
        return Err(ConfigError::new("paging_cursors", "needs public_base_url (cursor links are written under it)"));
    }
    if raw.key.is_none() {
        return Err(ConfigError::new("paging_cursors.key", "is required: {\"env\": NAME} or {\"file\": PATH}"));
    }
    let key = crate::upstream_auth::read_secret("paging_cursors.key", raw.key.as_ref(), env)
        .map_err(|e| ConfigError::new(e.field, e.message))?;
    let key = key.trim_end_matches(['\r', '\n']);
    if key.len() < MIN_KEY_BYTES {
        return Err(ConfigError::new(
            "paging_cursors.key",
            format!("must be at least {MIN_KEY_BYTES} bytes (e.g. `openssl rand -base64 48`)"),
        ));
    }
    let ttl_s = raw.ttl_s.unwrap_or(DEFAULT_TTL_S);
    Paging::new(key.as_bytes(), ttl_s)
        .ok_or_else(|| ConfigError::new("paging_cursors.ttl_s", format!("must be between 1 and {MAX_TTL_S}")))
}

/// Refuses an inline key that `verifier` could never check: a P-384 key under `"pure_rust"` in a build
/// whose pure-Rust verifier lacks P-384 (`checks_p384` false) would reject every ES384 token it signed.
/// A remote key set is fetched later: [`crate::upkeep`] logs and counts such keys when it installs them.
fn refuse_keys_beyond_pure_rust(
    providers: &[ProviderConfig],
    field: &dyn Fn(usize) -> String,
    verifier: SignatureVerifier,
    checks_p384: bool,
) -> Result<(), ConfigError> {
    if verifier != SignatureVerifier::PureRust {
        return Ok(());
    }
    for (i, p) in providers.iter().enumerate() {
        let JwksSource::Inline(keys) = &p.jwks else { continue };
        if let Some(key) = keys.beyond_pure_rust(checks_p384).next() {
            return Err(ConfigError::new(format!("{}.jwks", field(i)), beyond_pure_rust_message(&key)));
        }
    }
    Ok(())
}

/// Why a key cannot be used under `signature_verifier: "pure_rust"` in this build.
pub fn beyond_pure_rust_message(key: &str) -> String {
    format!(
        "{key} is a P-384 (ES384) key, which signature_verifier \"pure_rust\" cannot check in this build (built \
         without the p384-pure-rust feature): every token it signed would be refused. Use \"auto\" or \"host\" \
         (Envoy checks ES384), or build with default features"
    )
}

/// A header name the filter may own: lowercase token characters, not a pseudo-header, not one Envoy or the
/// token check relies on.
fn header_name(field: &str, value: Option<String>, default: &str) -> Result<String, ConfigError> {
    let name = value.unwrap_or_else(|| default.into());
    let token = !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    if !token {
        return Err(ConfigError::new(field, "must be a lowercase HTTP header name"));
    }
    if matches!(name.as_str(), "authorization" | "host" | "content-length" | "transfer-encoding" | "cookie") {
        return Err(ConfigError::new(field, "must not be a standard request header"));
    }
    Ok(name)
}

/// Visible ASCII only, so that it can be sent as a header value.
fn is_header_value(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::{json, Value};

    pub(crate) fn example() -> Value {
        json!({
            "provider": {
                "issuer": "http://127.0.0.1:9000",
                "audiences": ["http://127.0.0.1:10000"],
                "jwks_uri": "http://127.0.0.1:9000/jwks",
                "jwks_cluster": "idp"
            },
            "tenants": {
                "6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f": {"cluster": "tenant_a"},
                "3b9a7c55-1d2e-4f60-8a7b-9c0d1e2f3a4b": {"cluster": "tenant_b"}
            },
            "metadata_cluster": "fhir_metadata"
        })
    }

    fn compile(v: &Value) -> Result<Config, ConfigError> {
        Config::from_json(v.to_string().as_bytes())
    }

    fn field_of(v: &Value) -> String {
        compile(v).unwrap_err().field
    }

    #[test]
    fn an_audit_sink_compiles_with_defaults_and_each_bad_value_is_refused_naming_its_field() {
        let mut v = example();
        v["audit_sink"] = json!({"cluster": "audit", "uri": "http://audit.example/fhir/{tenant}"});
        let c = compile(&v).unwrap();
        let s = c.audit_sink.as_ref().unwrap();
        assert_eq!(
            (s.authority.as_str(), s.path.as_str(), s.untenanted_path.as_deref()),
            ("audit.example", "/fhir/{tenant}", None)
        );
        assert_eq!((s.batch_size, s.queue_size, s.flush_interval_ms, s.timeout_ms), (100, 10_000, 1_000, 5_000));
        assert_eq!((s.attempts, s.backoff_ms, s.max_backoff_ms), (5, 1_000, 60_000));
        assert!(!c.audit_event, "the sink builds its events; the access log's filter state stays off");
        assert!(c.fetches(), "the sink needs the ticks");
        for (field, value, named) in [
            ("cluster", json!(""), "audit_sink.cluster"),
            ("uri", json!("audit.example/fhir"), "audit_sink.uri"),
            ("uri", json!("http://{tenant}.audit/fhir"), "audit_sink.uri"),
            ("uri", json!("http://audit/fhir/{org}"), "audit_sink.uri"),
            ("uri", json!("http://audit/fhir?x={tenant}"), "audit_sink.uri"),
            ("untenanted_uri", json!("http://elsewhere/fhir"), "audit_sink.untenanted_uri"),
            ("untenanted_uri", json!("http://audit.example/{tenant}"), "audit_sink.untenanted_uri"),
            ("batch_size", json!(0), "audit_sink.batch_size"),
            ("batch_size", json!(1001), "audit_sink.batch_size"),
            ("queue_size", json!(50), "audit_sink.queue_size"),
            ("flush_interval_ms", json!(10), "audit_sink.flush_interval_ms"),
            ("timeout_ms", json!(60_001), "audit_sink.timeout_ms"),
            ("attempts", json!(0), "audit_sink.attempts"),
            ("backoff_ms", json!(50), "audit_sink.backoff_ms"),
            ("max_backoff_ms", json!(500), "audit_sink.max_backoff_ms"),
            ("attempts", json!("3"), "audit_sink.attempts"),
            ("unknown", json!(1), "audit_sink"),
        ] {
            let mut bad = v.clone();
            bad["audit_sink"]["batch_size"] = json!(100);
            bad["audit_sink"][field] = value.clone();
            let e = compile(&bad).unwrap_err();
            assert!(e.field.starts_with(named), "{field}={value}: {e}");
        }
        v["audit_sink"]["untenanted_uri"] = json!("http://audit.example/fhir/untenanted");
        assert_eq!(compile(&v).unwrap().audit_sink.unwrap().untenanted_path.as_deref(), Some("/fhir/untenanted"));
    }

    #[test]
    fn example_compiles_with_defaults() {
        let c = compile(&example()).unwrap();
        assert_eq!(c.route_header, DEFAULT_ROUTE_HEADER);
        assert_eq!(c.tenant_header, DEFAULT_TENANT_HEADER);
        assert!(!c.forward_authorization);
        assert_eq!(c.providers[0].provider.clock_skew_s, 60);
        assert_eq!(c.signature_verifier, SignatureVerifier::Auto);
        match &c.providers[0].jwks {
            JwksSource::Remote(r) => {
                assert_eq!(r.authority, "127.0.0.1:9000");
                assert_eq!(r.path, "/jwks");
                assert_eq!(r.refresh_ms, 300_000);
            }
            JwksSource::Inline(_) => panic!("expected a remote JWKS"),
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_their_path() {
        let mut v = example();
        v["provider"]["jwks_urii"] = json!("x");
        let e = compile(&v).unwrap_err();
        assert!(e.message.contains("jwks_urii"), "{e}");
        assert_eq!(e.field, "provider.jwks_urii");
        let mut v = example();
        v["colour"] = json!("blue");
        assert!(compile(&v).unwrap_err().to_string().contains("colour"));
        let mut v = example();
        v["tenants"]["6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f"]["clutser"] = json!("x");
        assert!(field_of(&v).starts_with("tenants."));
    }

    #[test]
    fn missing_fields_are_named() {
        let mut v = example();
        v["provider"].as_object_mut().unwrap().remove("issuer");
        let e = compile(&v).unwrap_err();
        assert!(e.to_string().contains("issuer"), "{e}");
        let mut v = example();
        v.as_object_mut().unwrap().remove("metadata_cluster");
        assert!(compile(&v).unwrap_err().to_string().contains("metadata_cluster"));
    }

    #[test]
    fn bad_values_are_named() {
        type Mutation = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("provider.issuer", Box::new(|v| v["provider"]["issuer"] = json!(""))),
            ("provider.audiences", Box::new(|v| v["provider"]["audiences"] = json!([]))),
            ("provider.jwks_uri", Box::new(|v| v["provider"]["jwks_uri"] = json!("ftp://x/jwks"))),
            ("provider.jwks_uri", Box::new(|v| v["provider"]["jwks_uri"] = json!("not a url"))),
            ("provider.jwks_uri", Box::new(|v| v["provider"]["jwks_uri"] = json!("http:///jwks"))),
            (
                "provider.jwks_cluster",
                Box::new(|v| {
                    v["provider"].as_object_mut().unwrap().remove("jwks_cluster");
                }),
            ),
            ("provider.jwks_refresh_s", Box::new(|v| v["provider"]["jwks_refresh_s"] = json!(1))),
            ("provider.jwks", Box::new(|v| v["provider"]["jwks"] = json!({"keys": []}))),
            ("tenants", Box::new(|v| v["tenants"] = json!({}))),
            ("tenants.bad id", Box::new(|v| v["tenants"] = json!({"bad id": {"cluster": "x"}}))),
            ("metadata_cluster", Box::new(|v| v["metadata_cluster"] = json!(""))),
            ("route_header", Box::new(|v| v["route_header"] = json!("Authorization"))),
            ("route_header", Box::new(|v| v["route_header"] = json!("authorization"))),
            ("tenant_header", Box::new(|v| v["tenant_header"] = json!(DEFAULT_ROUTE_HEADER))),
            ("tenant_scope_prefixes", Box::new(|v| v["tenant_scope_prefixes"] = json!([]))),
            ("signature_verifier", Box::new(|v| v["signature_verifier"] = json!("fast"))),
        ];
        for (field, mutate) in cases {
            let mut v = example();
            mutate(&mut v);
            assert_eq!(field_of(&v), field, "{v}");
        }
    }

    #[test]
    fn inline_jwks_compiles_and_excludes_a_remote_one() {
        let mut v = example();
        let p = v["provider"].as_object_mut().unwrap();
        p.remove("jwks_uri");
        p.remove("jwks_cluster");
        p.insert("jwks".into(), serde_json::from_str(&crate::testkeys::public_jwks()).unwrap());
        let c = compile(&v).unwrap();
        assert!(matches!(&c.providers[0].jwks, JwksSource::Inline(k) if k.keys().len() == 2));
        v["provider"]["jwks_uri"] = json!("http://127.0.0.1:9000/jwks");
        assert_eq!(field_of(&v), "provider.jwks");
    }

    /// A P-384 public key (ES384), with an RS256 key beside it.
    pub(crate) fn jwks_with_p384(kid: Option<&str>) -> Value {
        let mut jwks: Value = serde_json::from_str(&crate::testkeys::public_jwks()).unwrap();
        let mut p384 = json!({
            "kty": "EC", "crv": "P-384", "alg": "ES384", "use": "sig",
            "x": "PfaE90SLmW7Dejg0xSDtz4zPT5aXNSdNSayLf3qTcS5PR4AN4PSGzOp5COFck3pB",
            "y": "nh3KRaX5i8TBx0aEcyVMMF2xRwUeHB-wPffEaa2vRVpc9KaaQJMVNR6qlE9LUaZx"
        });
        if let Some(kid) = kid {
            p384["kid"] = json!(kid);
        }
        jwks["keys"].as_array_mut().unwrap().push(p384);
        jwks
    }

    #[test]
    fn a_p384_key_under_pure_rust_without_pure_rust_p384_is_refused_naming_the_key() {
        let mut v = example();
        let p = v["provider"].as_object_mut().unwrap();
        p.remove("jwks_uri");
        p.remove("jwks_cluster");
        p.insert("jwks".into(), jwks_with_p384(Some("es384-2025")));
        v["signature_verifier"] = json!("pure_rust");
        // `cargo test` builds pure-Rust P-384 in, so the configuration itself compiles here...
        let c = compile(&v).unwrap();
        let field = |_: usize| "provider".to_string();
        // ...and the build `make build` ships, without it, refuses it, naming the key.
        let e = refuse_keys_beyond_pure_rust(&c.providers, &field, SignatureVerifier::PureRust, false).unwrap_err();
        assert_eq!(e.field, "provider.jwks");
        assert!(e.message.contains(r#"kid "es384-2025""#) && e.message.contains("P-384"), "{e}");
        // Only under pure_rust: auto and host check ES384 with Envoy's BoringSSL.
        for verifier in [SignatureVerifier::Auto, SignatureVerifier::Host] {
            assert!(refuse_keys_beyond_pure_rust(&c.providers, &field, verifier, false).is_ok());
        }
        assert!(refuse_keys_beyond_pure_rust(&c.providers, &field, SignatureVerifier::PureRust, true).is_ok());
        // A key without a kid is named by its place in the set; the list form names its provider.
        v["providers"] = json!([v["provider"].take()]);
        v.as_object_mut().unwrap().remove("provider");
        v["providers"][0]["jwks"] = jwks_with_p384(None);
        let c = compile(&v).unwrap();
        let field = |i: usize| format!("providers[{i}]");
        let e = refuse_keys_beyond_pure_rust(&c.providers, &field, SignatureVerifier::PureRust, false).unwrap_err();
        assert_eq!(e.field, "providers[0].jwks");
        assert!(e.message.starts_with("key #2 (no kid) is a P-384"), "{e}");
    }

    #[test]
    fn tenant_upstream_options_compile() {
        let mut v = example();
        v["tenants"]["6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f"] = json!({
            "cluster": "tenant_a", "authority": "fhir.partner.example", "base_path": "/api/FHIR/R4/",
            "links_base_url": "http://fhir.partner.example/api/FHIR/R4/",
            "upstream_header": {"name": "X-Api-Key", "env": "TENANT_A_KEY"},
            "allow": {"interactions": ["read", "search", "create"], "resource_types": ["Patient", "Observation"]}
        });
        v["public_base_url"] = json!("https://fhir.example.org");
        let env = |name: &str| (name == "TENANT_A_KEY").then(|| "s3cret".to_string());
        let c = Config::from_json_with_env(v.to_string().as_bytes(), &env).unwrap();
        let t = c.tenants.get("6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f").unwrap();
        let u = t.settings.as_deref().unwrap();
        assert_eq!(u.authority.as_deref(), Some("fhir.partner.example"));
        assert_eq!(u.base_path, "/api/FHIR/R4");
        assert_eq!(u.links_base_url.as_deref(), Some("http://fhir.partner.example/api/FHIR/R4"));
        assert_eq!(u.header, Some(("x-api-key".into(), "s3cret".into())));
        assert_eq!(t.policy().check_request("POST", "/Patient"), Ok(false));
        assert!(t.policy().check_request("GET", "/Condition").is_err());
        let plain = c.tenants.get("3b9a7c55-1d2e-4f60-8a7b-9c0d1e2f3a4b").unwrap();
        assert!(plain.settings.is_none(), "plain tenants stay small");
        assert!(plain.policy().check_request("POST", "/Patient").is_err(), "read-only by default");
    }

    /// Issue 24: a secret written literally where `{"env": …}` belongs (or any value of a secret field) is
    /// refused naming the field, never echoed: serde's own message quotes the value.
    #[test]
    fn a_literal_secret_is_refused_naming_the_field_without_its_value() {
        const CANARY: &str = "CANARY-5c2d-literal-secret";
        let a = "6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f";
        let auth = |secret_field: &str, value: Value, method: &str| {
            let mut auth = json!({"method": method, "token_url": "https://as.example/token", "cluster": "as",
                                  "client_id": "c"});
            auth[secret_field] = value;
            auth
        };
        let cases: Vec<(Value, &str)> = vec![
            (auth("client_secret", json!(CANARY), "client_secret_post"), "upstream_auth.client_secret"),
            (auth("client_secret", json!(12345678901234u64), "client_secret_post"), "upstream_auth.client_secret"),
            (
                auth("private_key", json!(format!("-----BEGIN PRIVATE KEY-----\n{CANARY}")), "private_key_jwt"),
                "upstream_auth.private_key",
            ),
            (
                auth("client_secret", json!({"env": "X", "value": CANARY}), "client_secret_post"),
                "upstream_auth.client_secret",
            ),
            // A struct may be written as a list: the secret lands in `env`, whose name is then not shown.
            (auth("client_secret", json!([CANARY]), "client_secret_basic"), "upstream_auth.client_secret"),
            (auth("client_secret", json!({"env": CANARY}), "client_secret_basic"), "upstream_auth.client_secret"),
            (auth("method", json!(CANARY), CANARY), "upstream_auth.method"),
        ];
        for (upstream_auth, field) in cases {
            let mut v = example();
            v["tenants"][a]["upstream_auth"] = upstream_auth;
            let e = compile(&v).unwrap_err();
            assert!(e.field.starts_with(&format!("tenants.{a}.{field}")), "{e}");
            assert!(!e.to_string().contains("CANARY") && !e.to_string().contains("12345678901234"), "{e}");
        }
        let mut v = example();
        v["tenants"][a]["upstream_header"] = json!(CANARY);
        let e = compile(&v).unwrap_err();
        assert_eq!(e.field, format!("tenants.{a}.upstream_header"));
        assert!(!e.to_string().contains("CANARY"), "{e}");
        assert!(e.message.starts_with("invalid type: string (not shown), expected"), "{e}");
        // The tenant registry's documents go through the same parser.
        let mut v = example();
        v["tenant_registry"] = json!({"uri": "http://127.0.0.1:9200/tenants", "cluster": "registry"});
        let c = compile(&v).unwrap();
        let doc = json!({"tenants": {"t": {"cluster": "x", "upstream_auth":
                         auth("client_secret", json!(CANARY), "client_secret_post")}}});
        let e = c.compile_registry(doc.to_string().as_bytes(), &|_| None).unwrap_err();
        assert!(e.field.starts_with("tenants.t.upstream_auth.client_secret") && !e.to_string().contains("CANARY"));
        // A value that looks like serde's own tail cannot smuggle itself past the cut.
        let msg = format!(r#"invalid type: string "{CANARY}, expected x", expected struct RawSecret at line 1"#);
        assert_eq!(
            crate::redact::serde_message(&msg),
            "invalid type: string (not shown), expected struct RawSecret at line 1"
        );
        assert_eq!(
            crate::redact::serde_message("unknown field `colour`, expected one of `a`"),
            "unknown field `colour`, expected one of `a`"
        );
    }

    #[test]
    fn a_missing_credential_variable_is_named_but_its_value_never_shown() {
        let mut v = example();
        v["tenants"]["6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f"]["upstream_header"] =
            json!({"name": "x-api-key", "env": "NOPE"});
        let e = Config::from_json_with_env(v.to_string().as_bytes(), &|_| None).unwrap_err();
        assert_eq!(e.field, "tenants.6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f.upstream_header.env");
        assert!(e.message.contains("NOPE"));
        let e = Config::from_json_with_env(v.to_string().as_bytes(), &|_| Some("bad\nvalue".into())).unwrap_err();
        assert!(!e.to_string().contains("bad"), "{e}");
    }

    #[test]
    fn bad_tenant_upstream_options_are_named() {
        for (key, value, field) in [
            ("base_path", json!("api/FHIR"), "base_path"),
            ("base_path", json!("/a/../b"), "base_path"),
            ("authority", json!("host/path"), "authority"),
            ("links_base_url", json!("ftp://x"), "links_base_url"),
            ("allow", json!({"interactions": ["reed"]}), "allow"),
        ] {
            let mut v = example();
            v["tenants"]["6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f"][key] = value;
            assert_eq!(field_of(&v), format!("tenants.6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f.{field}"));
        }
    }

    #[test]
    fn discovery_builds_the_smart_configuration_once() {
        let mut v = example();
        v["discovery"] =
            json!({"token_endpoint": "http://127.0.0.1:9000/token", "scopes_supported": ["system/*.read"]});
        v["public_base_url"] = json!("https://fhir.example.org/");
        let c = compile(&v).unwrap();
        let doc: Value = serde_json::from_str(c.smart_configuration.as_deref().unwrap()).unwrap();
        assert_eq!(doc["token_endpoint"], "http://127.0.0.1:9000/token");
        assert_eq!(doc["issuer"], "http://127.0.0.1:9000");
        assert_eq!(doc["jwks_uri"], "http://127.0.0.1:9000/jwks");
        assert_eq!(c.public_base_url.as_deref(), Some("https://fhir.example.org"));
        v["discovery"]["token_endpoint"] = json!("/token");
        assert_eq!(field_of(&v), "discovery.token_endpoint");
    }

    #[test]
    fn several_providers_and_issuer_bound_tenants_compile() {
        let mut v = example();
        let first = v["provider"].clone();
        let mut second = first.clone();
        second["issuer"] = json!("http://127.0.0.1:9001");
        second["jwks_uri"] = json!("http://127.0.0.1:9001/jwks");
        v.as_object_mut().unwrap().remove("provider");
        v["providers"] = json!([first, second]);
        v["tenants"]["6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f"]["issuers"] = json!(["http://127.0.0.1:9001"]);
        let c = compile(&v).unwrap();
        assert_eq!(c.providers.len(), 2);
        assert_eq!(c.provider_index("http://127.0.0.1:9001"), Some(1));
        let t = c.tenants.get("6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f").unwrap();
        assert!(t.allows_issuer("http://127.0.0.1:9001") && !t.allows_issuer("http://127.0.0.1:9000"));
        v["tenants"]["6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f"]["issuers"] = json!(["http://unknown"]);
        assert_eq!(field_of(&v), "tenants.6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f.issuers");
        v["provider"] = v["providers"][0].clone();
        assert_eq!(field_of(&v), "providers");
    }

    #[test]
    fn a_tenant_by_url_goes_through_the_dynamic_forward_proxy() {
        let mut v = example();
        v["tenants"]["6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f"] =
            json!({"url": "https://fhir.partner.example:8443/api/FHIR/R4/"});
        assert_eq!(field_of(&v), "tenants.6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f.url");
        v["dynamic_forward_proxy_cluster"] = json!("dynamic_forward_proxy_cluster");
        v["public_base_url"] = json!("https://fhir.example.org");
        let c = compile(&v).unwrap();
        let t = c.tenants.get("6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f").unwrap();
        assert_eq!(t.cluster, "dynamic_forward_proxy_cluster");
        let u = t.settings.as_deref().unwrap();
        assert_eq!(u.authority.as_deref(), Some("fhir.partner.example:8443"));
        assert_eq!(u.base_path, "/api/FHIR/R4");
        assert_eq!(u.links_base_url.as_deref(), Some("https://fhir.partner.example:8443/api/FHIR/R4"));
        v["tenants"]["6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f"]["cluster"] = json!("x");
        assert_eq!(field_of(&v), "tenants.6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f.cluster");
    }

    #[test]
    fn waiting_is_bounded_per_provider_and_bundles_hold_their_headers_by_default() {
        let c = compile(&example()).unwrap();
        assert!(c.hold_bundle_headers);
        let Some(JwksSource::Remote(r)) = c.providers.first().map(|p| &p.jwks) else { panic!("remote") };
        assert_eq!(r.max_waiting, DEFAULT_MAX_WAITING);
        let mut v = example();
        v["provider"]["jwks_max_waiting"] = json!(100_001);
        assert_eq!(field_of(&v), "provider.jwks_max_waiting");
        v["provider"]["jwks_max_waiting"] = json!(-1);
        assert_eq!(field_of(&v), "provider.jwks_max_waiting");
        v["hold_bundle_headers"] = json!("no");
        v["provider"]["jwks_max_waiting"] = json!(0);
        assert_eq!(field_of(&v), "hold_bundle_headers");
        v["hold_bundle_headers"] = json!(false);
        assert!(!compile(&v).unwrap().hold_bundle_headers);
    }

    #[test]
    fn a_tenant_that_rewrites_links_needs_public_base_url_in_the_config_and_in_a_registry_document() {
        const A: &str = "6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f";
        let mut v = example();
        v["dynamic_forward_proxy_cluster"] = json!("dfp");
        v["tenant_registry"] = json!({"uri": "http://127.0.0.1:9200/tenants", "cluster": "registry"});
        for (tenant, field) in [
            (json!({"cluster": "tenant_a", "links_base_url": "http://fhir.partner/api"}), "links_base_url"),
            (json!({"url": "https://fhir.partner/api"}), "url"),
            (json!({"url": "https://fhir.partner/api", "links_base_url": "https://fhir.partner/r4"}), "links_base_url"),
        ] {
            v["tenants"][A] = tenant.clone();
            let e = compile(&v).unwrap_err();
            assert_eq!(e.field, format!("tenants.{A}.{field}"), "{tenant}");
            assert!(e.message.contains("public_base_url") && e.message.contains("Host"), "{e}");
            // A registry document is held to the same rule: refused, never linked to the client's Host.
            v["tenants"][A] = json!({"cluster": "tenant_a"});
            let c = compile(&v).unwrap();
            let doc = json!({"tenants": {A: tenant}}).to_string();
            let e = c.compile_registry(doc.as_bytes(), &|_| None).unwrap_err();
            assert_eq!(e.field, format!("tenants.{A}.{field}"));
            assert!(e.to_string().contains("public_base_url"), "{e}");
            v["public_base_url"] = json!("https://fhir.example.org");
            let c = compile(&v).unwrap();
            assert_eq!(c.compile_registry(doc.as_bytes(), &|_| None).unwrap().len(), 1);
            v["tenants"][A] = tenant;
            assert!(compile(&v).is_ok());
            v.as_object_mut().unwrap().remove("public_base_url");
        }
        // Settings that rewrite no links need no public base.
        v["tenants"][A] = json!({"cluster": "tenant_a", "authority": "fhir.partner", "base_path": "/api"});
        assert!(compile(&v).is_ok());
    }

    #[test]
    fn a_registry_document_compiles_into_a_new_tenant_map() {
        let mut v = example();
        v["tenants"] = json!({});
        assert_eq!(field_of(&v), "tenants");
        v["tenant_registry"] = json!({"uri": "http://127.0.0.1:9200/tenants", "cluster": "registry", "refresh_s": 5});
        let c = compile(&v).unwrap();
        assert!(c.tenants.is_empty());
        assert_eq!(c.registry.as_ref().unwrap().path, "/tenants");
        let doc = json!({"tenants": {"tenant-x": {"cluster": "x"}, "tenant-y": {"cluster": "y", "allow": {"interactions": ["read"]}}}});
        let map = c.compile_registry(doc.to_string().as_bytes(), &|_| None).unwrap();
        assert_eq!(map.len(), 2);
        assert_eq!(map.get("tenant-x").unwrap().cluster, "x");
        let bad = json!({"tenants": {"tenant-x": {"cluster": ""}}});
        assert_eq!(
            c.compile_registry(bad.to_string().as_bytes(), &|_| None).unwrap_err().field,
            "tenants.tenant-x.cluster"
        );
        assert!(c.compile_registry(b"garbage", &|_| None).is_err());
        assert!(c.compile_registry(br#"{"tenants": {}, "extra": 1}"#, &|_| None).is_err());
        // The per-tenant client binding and SMART scope switch come with the registry's tenants too.
        let doc = json!({"tenants": {"tenant-x": {"cluster": "x", "allowed_clients": ["app-x"], "require_smart_scopes": true}}});
        let map = c.compile_registry(doc.to_string().as_bytes(), &|_| None).unwrap();
        let x = map.get("tenant-x").unwrap();
        assert!(x.requires_smart_scopes() && x.allows_client(Some("app-x")) && !x.allows_client(Some("app-y")));
        let bad = json!({"tenants": {"tenant-x": {"cluster": "x", "allowed_clients": []}}});
        let e = c.compile_registry(bad.to_string().as_bytes(), &|_| None).unwrap_err();
        assert_eq!(e.field, "tenants.tenant-x.allowed_clients");
        let plain = c.compile_registry(br#"{"tenants": {"tenant-y": {"cluster": "y"}}}"#, &|_| None).unwrap();
        let y = plain.get("tenant-y").unwrap();
        assert!(!y.requires_smart_scopes() && y.allows_client(None), "by default: no scopes needed, any client");
    }

    /// A registry plugin whose documents may name `FTR_REGISTRY_*` variables and files under /etc/ftr/secrets.
    fn scoped_registry(scope: Option<Value>) -> Config {
        let mut v = example();
        v["tenant_registry"] = json!({"uri": "http://127.0.0.1:9200/tenants", "cluster": "registry"});
        if let Some(scope) = scope {
            v["tenant_registry"]["secret_scope"] = scope;
        }
        compile(&v).unwrap()
    }

    const CANARY: &str = "operator-canary-value";

    /// The process as seen by a registry document: one variable and one file in scope, the operator's own
    /// secrets (the canary) outside it. Records every name asked for.
    fn process<'a>(asked: &'a std::cell::RefCell<Vec<String>>) -> impl Fn(&str) -> Option<String> + 'a {
        move |name: &str| {
            asked.borrow_mut().push(name.to_string());
            match name {
                "FTR_REGISTRY_KEY" => Some("in-scope-key".into()),
                "FTR_REGISTRY_RSA" => Some(crate::testkeys::rsa_private_pem()),
                "\0file-beneath:/etc/ftr/secrets\0/etc/ftr/secrets/a" => Some("in-scope-file".into()),
                _ => Some(CANARY.into()),
            }
        }
    }

    fn auth(secret: Value) -> Value {
        json!({"method": "client_secret_post", "token_url": "https://as.example/token", "cluster": "as",
               "client_id": "router", "client_secret": secret})
    }

    fn pkjwt(key: Value) -> Value {
        json!({"method": "private_key_jwt", "token_url": "https://as.example/token", "cluster": "as",
               "client_id": "router", "private_key": key})
    }

    #[test]
    fn a_registry_document_naming_a_secret_outside_the_operators_scope_is_refused_whole_unread() {
        let c = scoped_registry(Some(json!({"env_prefixes": ["FTR_REGISTRY_"], "file_directory": "/etc/ftr/secrets"})));
        let good = json!({"cluster": "x"});
        for (tenant, field) in [
            (json!({"cluster": "x", "upstream_header": {"name": "x-api-key", "env": "HOME"}}), "upstream_header.env"),
            (
                json!({"cluster": "x", "upstream_header": {"name": "x-api-key", "env": "\0file:/etc/passwd"}}),
                "upstream_header.env",
            ),
            (
                json!({"cluster": "x", "upstream_header": {"name": "x-api-key", "env": "FTR_REGISTRY_KEY=X"}}),
                "upstream_header.env",
            ),
            (
                json!({"cluster": "x", "upstream_header": {"name": "x-api-key", "env": "ftr_registry_key"}}),
                "upstream_header.env",
            ),
            (
                json!({"cluster": "x", "upstream_auth": auth(json!({"env": "OPERATOR_SECRET"}))}),
                "upstream_auth.client_secret.env",
            ),
            (
                json!({"cluster": "x", "upstream_auth": auth(json!({"file": "/etc/shadow"}))}),
                "upstream_auth.client_secret.file",
            ),
            (
                json!({"cluster": "x", "upstream_auth": auth(json!({"file": "/etc/ftr/secrets-evil/a"}))}),
                "upstream_auth.client_secret.file",
            ),
            (
                json!({"cluster": "x", "upstream_auth": auth(json!({"file": "/etc/ftr/secrets/../../shadow"}))}),
                "upstream_auth.client_secret.file",
            ),
            (json!({"cluster": "x", "upstream_auth": auth(json!({"file": "a"}))}), "upstream_auth.client_secret.file"),
            (
                json!({"cluster": "x", "upstream_auth": pkjwt(json!({"env": "OPERATOR_KEY"}))}),
                "upstream_auth.private_key.env",
            ),
            (
                json!({"cluster": "x", "upstream_auth": pkjwt(json!({"file": "/var/run/secrets/sa.json"}))}),
                "upstream_auth.private_key.file",
            ),
        ] {
            // The bad tenant sorts last: the good one before it is refused with it, and nothing was read.
            let doc = json!({"tenants": {"a-good": good, "z-bad": tenant}}).to_string();
            let asked = std::cell::RefCell::new(Vec::new());
            let e = c.compile_registry(doc.as_bytes(), &process(&asked)).unwrap_err();
            assert_eq!(e.field, format!("tenants.z-bad.{field}"), "{tenant}");
            assert!(e.message.contains("secret_scope") || e.message.starts_with("must be"), "{e}");
            assert!(!e.to_string().contains(CANARY), "{e}");
            assert!(asked.borrow().is_empty(), "nothing is read for a refused document: {:?}", asked.borrow());
        }
    }

    #[test]
    fn without_a_declared_scope_a_registry_document_may_name_no_variable_and_no_file() {
        for c in [scoped_registry(None), scoped_registry(Some(json!({})))] {
            for (secret, field) in [
                (
                    json!({"cluster": "x", "upstream_header": {"name": "x-api-key", "env": "FTR_REGISTRY_KEY"}}),
                    "upstream_header.env",
                ),
                (
                    json!({"cluster": "x", "upstream_auth": auth(json!({"env": "FTR_REGISTRY_KEY"}))}),
                    "upstream_auth.client_secret.env",
                ),
                (
                    json!({"cluster": "x", "upstream_auth": auth(json!({"file": "/etc/ftr/secrets/a"}))}),
                    "upstream_auth.client_secret.file",
                ),
            ] {
                let doc = json!({"tenants": {"t": secret}}).to_string();
                let asked = std::cell::RefCell::new(Vec::new());
                let e = c.compile_registry(doc.as_bytes(), &process(&asked)).unwrap_err();
                assert_eq!(e.field, format!("tenants.t.{field}"));
                assert!(e.message.contains("allows none"), "{e}");
                assert!(asked.borrow().is_empty());
            }
        }
    }

    #[test]
    fn a_registry_document_naming_secrets_inside_the_scope_compiles_and_reads_only_those() {
        let c =
            scoped_registry(Some(json!({"env_prefixes": ["FTR_REGISTRY_"], "file_directory": "/etc/ftr/secrets/"})));
        let doc = json!({"tenants": {
            "h": {"cluster": "x", "upstream_header": {"name": "x-api-key", "env": "FTR_REGISTRY_KEY"}},
            "e": {"cluster": "x", "upstream_auth": auth(json!({"env": "FTR_REGISTRY_KEY"}))},
            "f": {"cluster": "x", "upstream_auth": auth(json!({"file": "/etc/ftr/secrets/a"}))},
            "k": {"cluster": "x", "upstream_auth": pkjwt(json!({"env": "FTR_REGISTRY_RSA"}))},
        }})
        .to_string();
        let asked = std::cell::RefCell::new(Vec::new());
        let map = c.compile_registry(doc.as_bytes(), &process(&asked)).unwrap();
        let h = map.get("h").unwrap().settings.as_deref().unwrap();
        assert_eq!(h.header, Some(("x-api-key".into(), "in-scope-key".into())));
        assert!(map.get("f").unwrap().upstream_auth().is_some() && map.get("k").unwrap().upstream_auth().is_some());
        let mut asked = asked.take();
        asked.sort();
        // The file is asked for with its directory, for the host to check again on the file it opens.
        assert_eq!(
            asked,
            [
                "\0file-beneath:/etc/ftr/secrets\0/etc/ftr/secrets/a",
                "FTR_REGISTRY_KEY",
                "FTR_REGISTRY_KEY",
                "FTR_REGISTRY_RSA"
            ]
        );
    }

    #[test]
    fn the_operators_plugin_json_keeps_naming_any_variable_or_file() {
        let mut v = example();
        v["tenant_registry"] = json!({"uri": "http://127.0.0.1:9200/tenants", "cluster": "registry",
                                      "secret_scope": {"env_prefixes": ["FTR_REGISTRY_"]}});
        v["tenants"]["6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f"]["upstream_header"] = json!({"name": "x-k", "env": "HOME"});
        v["tenants"]["3b9a7c55-1d2e-4f60-8a7b-9c0d1e2f3a4b"]["upstream_auth"] = auth(json!({"file": "/etc/x"}));
        let asked = std::cell::RefCell::new(Vec::new());
        let c = Config::from_json_with_env(v.to_string().as_bytes(), &process(&asked)).unwrap();
        assert_eq!(*asked.borrow(), ["\0file:/etc/x", "HOME"], "tenant B (3b9a…) compiles first");
        let a = c.tenants.get("6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f").unwrap().settings.as_deref().unwrap();
        assert_eq!(a.header, Some(("x-k".into(), CANARY.into())));
        v["tenant_registry"]["secret_scope"] = json!({"env_prefixes": ["FTR_REG"]});
        assert_eq!(field_of(&v), "tenant_registry.secret_scope.env_prefixes");
        v["tenant_registry"]["secret_scope"] = json!({"file_directory": "/"});
        assert_eq!(field_of(&v), "tenant_registry.secret_scope.file_directory");
        v["tenant_registry"]["secret_scope"] = json!({"env_prefix": "FTR_"});
        assert!(field_of(&v).starts_with("tenant_registry.secret_scope"), "{}", field_of(&v));
    }

    #[test]
    fn access_log_filter_state_is_opt_in() {
        assert!(!compile(&example()).unwrap().access_log_filter_state);
        let mut v = example();
        v["access_log_filter_state"] = json!(true);
        assert!(compile(&v).unwrap().access_log_filter_state);
        v["access_log_filter_state"] = json!("yes");
        assert!(compile(&v).unwrap_err().to_string().contains("access_log_filter_state"));
    }

    #[test]
    fn audit_log_is_on_by_default() {
        assert_eq!(compile(&example()).unwrap().audit_log, AuditLog::Log);
        let mut v = example();
        for (value, want) in [
            (json!(false), AuditLog::Off),
            (json!(true), AuditLog::Log),
            (json!("log"), AuditLog::Log),
            (json!("filter_state"), AuditLog::FilterState),
        ] {
            v["audit_log"] = value.clone();
            assert_eq!(compile(&v).unwrap().audit_log, want, "{value}");
        }
        for bad in [json!("file"), json!("FILTER_STATE"), json!(1), json!({"to": "log"})] {
            v["audit_log"] = bad.clone();
            let e = compile(&v).unwrap_err().to_string();
            assert!(e.contains("audit_log"), "{bad}: {e}");
        }
    }

    #[test]
    fn quotas_are_off_by_default_and_a_tenant_may_replace_the_default_or_drop_it() {
        let c = compile(&example()).unwrap();
        assert!(c.quota.is_none() && c.rate_limit_descriptor_header.is_none());
        let mut v = example();
        v["quota"] = json!({"rate_per_s": 50, "burst": 100});
        v["rate_limit_descriptor_header"] = json!("x-ftr-tenant");
        v["tenants"]["6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f"]["quota"] = json!({"max_in_flight": 4});
        v["tenants"]["3b9a7c55-1d2e-4f60-8a7b-9c0d1e2f3a4b"]["quota"] = json!({"unlimited": true});
        let c = compile(&v).unwrap();
        assert_eq!(c.quota.as_ref().unwrap().rate.unwrap().burst, 100);
        assert_eq!(c.rate_limit_descriptor_header.as_deref(), Some("x-ftr-tenant"));
        let a = c.tenants.get("6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f").unwrap().settings.as_ref().unwrap();
        assert_eq!(a.quota.as_ref().unwrap().as_ref().unwrap().max_in_flight, Some(4));
        let b = c.tenants.get("3b9a7c55-1d2e-4f60-8a7b-9c0d1e2f3a4b").unwrap().settings.as_ref().unwrap();
        assert_eq!(b.quota, Some(None));
    }

    #[test]
    fn a_registry_document_may_give_tenants_their_own_quota() {
        let mut v = example();
        v["quota"] = json!({"rate_per_s": 10});
        let c = compile(&v).unwrap();
        let doc = json!({"tenants": {"tenant-x": {"cluster": "x", "quota": {"rate_per_s": 1, "burst": 2}}}});
        let map = c.compile_registry(doc.to_string().as_bytes(), &|_| None).unwrap();
        let own = map.get("tenant-x").unwrap().settings.as_ref().unwrap().quota.clone().unwrap().unwrap();
        assert_eq!(own.rate.unwrap().burst, 2);
        let bad = json!({"tenants": {"tenant-x": {"cluster": "x", "quota": {"max_in_flight": 0}}}});
        assert_eq!(
            c.compile_registry(bad.to_string().as_bytes(), &|_| None).unwrap_err().field,
            "tenants.tenant-x.quota.max_in_flight"
        );
    }

    #[test]
    fn bad_quotas_and_descriptor_headers_are_named() {
        for (key, value, field) in [
            ("quota", json!({"rate_per_s": 0}), "quota.rate_per_s"),
            ("quota", json!({"unlimited": true}), "quota.unlimited"),
            ("quota", json!({"rate": 5}), "quota"),
            ("rate_limit_descriptor_header", json!("X Bad"), "rate_limit_descriptor_header"),
            ("rate_limit_descriptor_header", json!("x-fhir-tenant-id"), "rate_limit_descriptor_header"),
        ] {
            let mut v = example();
            v[key] = value;
            assert!(field_of(&v).starts_with(field), "{key}: {}", field_of(&v));
        }
        let mut v = example();
        v["tenants"]["6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f"]["quota"] = json!({"burst": 3});
        assert_eq!(field_of(&v), "tenants.6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f.quota.burst");
    }

    #[test]
    fn garbage_documents_are_errors() {
        for doc in ["", "{", "[]", "null", "42", "{\"provider\": 1}"] {
            assert!(Config::from_json(doc.as_bytes()).is_err(), "{doc}");
        }
    }

    #[test]
    fn jwks_url_splits_into_authority_and_path() {
        assert_eq!(
            split_http_url("https://idp.example/a/jwks?x=1"),
            Some(("idp.example".into(), "/a/jwks?x=1".into()))
        );
        assert_eq!(split_http_url("http://h:8080"), Some(("h:8080".into(), "/".into())));
        assert_eq!(split_http_url("http://h?x"), Some(("h".into(), "/?x".into())));
        assert_eq!(split_http_url("http://u@h/"), None);
        assert_eq!(split_http_url("http://h/a b"), None);
        assert_eq!(split_http_url("http://h/#f"), None);
    }

    // --- Per-provider claim mapping and checks (issue 25).

    const TA: &str = "6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f";

    fn with_provider(fields: Value) -> Value {
        let mut v = example();
        for (k, f) in fields.as_object().unwrap() {
            v["provider"][k] = f.clone();
        }
        v
    }

    #[test]
    fn provider_claim_fields_compile_with_top_level_defaults() {
        let c = compile(&example()).unwrap();
        let p = &c.providers[0].provider;
        assert_eq!(p.claims, ClaimNames::default());
        assert_eq!((p.audience_claim.as_str(), &p.token_typ, p.required_claims.len()), ("aud", &None, 0));
        assert!(p.template.is_none() && p.tenant.is_none());
        // The top-level tenant_claim and tenant_scope_prefixes are every provider's defaults.
        let mut v = example();
        v["tenant_claim"] = json!("tid");
        v["tenant_scope_prefixes"] = json!(["Tenant."]);
        let p = compile(&v).unwrap().providers[0].provider.clone();
        assert_eq!((p.claims.tenant.as_str(), p.claims.tenant_prefixes.clone()), ("tid", vec!["Tenant.".to_string()]));
        // A provider's own fields win.
        let v = with_provider(json!({
            "claims": {"tenant": "org_id", "tenant_prefixes": ["org:"], "scopes": "scp",
                       "scope_map": {"https://fhir.example.com/": "", "https://fhir.example.com/system.": "system/"},
                       "client": ["cid"]},
            "audience_claim": "client_id", "token_typ": "Application/AT+JWT",
            "required_claims": {"token_use": "access"}
        }));
        let p = compile(&v).unwrap().providers[0].provider.clone();
        assert_eq!(p.claims.tenant, "org_id");
        assert_eq!(p.claims.tenant_prefixes, ["org:"]);
        assert_eq!(p.claims.scopes, "scp");
        assert_eq!(p.claims.scope_map.len(), 2);
        assert_eq!(p.claims.client, ["cid"]);
        assert_eq!(p.audience_claim, "client_id");
        assert_eq!(p.token_typ.as_deref(), Some("at+jwt"));
        assert_eq!(p.required_claims, [("token_use".to_string(), "access".to_string())]);
    }

    #[test]
    fn bad_provider_claim_fields_are_refused_naming_the_field() {
        for (fields, field) in [
            (json!({"claims": {"tenant": ""}}), "provider.claims.tenant"),
            (json!({"claims": {"tenant_prefixes": []}}), "provider.claims.tenant_prefixes"),
            (json!({"claims": {"tenant_prefixes": ["a b"]}}), "provider.claims.tenant_prefixes"),
            (json!({"claims": {"scopes": ""}}), "provider.claims.scopes"),
            (json!({"claims": {"scopes": 5}}), "provider.claims.scopes"),
            (json!({"claims": {"scope_map": {"": "system/"}}}), "provider.claims.scope_map"),
            (json!({"claims": {"scope_map": {"a b": "system/"}}}), "provider.claims.scope_map"),
            (json!({"claims": {"scope_map": {"x.": "system/ x"}}}), "provider.claims.scope_map"),
            (json!({"claims": {"client": []}}), "provider.claims.client"),
            (json!({"claims": {"client": ["cid", ""]}}), "provider.claims.client"),
            (json!({"claims": {"tenants": "x"}}), "provider.claims.tenants"),
            (json!({"audience_claim": ""}), "provider.audience_claim"),
            (json!({"token_typ": ""}), "provider.token_typ"),
            (json!({"token_typ": "application/"}), "provider.token_typ"),
            (json!({"required_claims": {"": "x"}}), "provider.required_claims"),
            (json!({"required_claims": {"token_use": 1}}), "provider.required_claims.token_use"),
            (json!({"tenant": "a/b"}), "provider.tenant"),
            (json!({"tenant": "not-configured"}), "provider.tenant"),
            (json!({"tenant": TA, "claims": {"tenant": "tid"}}), "provider.tenant"),
            (json!({"tenant": TA, "claims": {"tenant_prefixes": [""]}}), "provider.tenant"),
            (json!({"issuer": "https://login.microsoftonline.com/{tid}/v2.0", "tenant": TA}), "provider.tenant"),
            (
                json!({"issuer": "https://login.microsoftonline.com/{tid}/v2.0", "claims": {"tenant": "tid"}}),
                "provider.claims.tenant",
            ),
            (
                json!({"issuer": "https://login.microsoftonline.com/{tid}/v2.0", "claims": {"tenant_prefixes": [""]}}),
                "provider.claims.tenant_prefixes",
            ),
        ] {
            assert_eq!(field_of(&with_provider(fields.clone())), field, "{fields}");
        }
    }

    #[test]
    fn issuer_templates_hold_one_placeholder_in_the_path() {
        for good in [
            "https://login.microsoftonline.com/{tid}/v2.0",
            "https://sts.windows.net/{tid}/",
            "http://127.0.0.1:9000/realms/{realm}",
        ] {
            let c = compile(&with_provider(json!({"issuer": good}))).unwrap();
            assert!(c.providers[0].provider.template.is_some(), "{good}");
        }
        for bad in [
            "https://{tid}.example.com/",
            "https://login.microsoftonline.com{tid}/v2.0",
            "https://login.microsoftonline.com/{tid}/{ver}",
            "https://login.microsoftonline.com/{}/v2.0",
            "https://login.microsoftonline.com/{tid/v2.0",
            "https://login.microsoftonline.com/tid}/v2.0",
            "https://login.microsoftonline.com/{t d}/v2.0",
            "https://login.microsoftonline.com/v2.0?t={tid}",
            "urn:{tid}",
            "{tid}",
        ] {
            assert_eq!(field_of(&with_provider(json!({"issuer": bad}))), "provider.issuer", "{bad}");
        }
    }

    #[test]
    fn exact_issuers_are_chosen_before_templates_and_tenants_bind_to_the_template_as_written() {
        let mut v = example();
        let mut exact = v["provider"].take();
        exact["issuer"] = json!("https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0");
        let mut v2 = exact.clone();
        v2["issuer"] = json!("https://login.microsoftonline.com/{tid}/v2.0");
        let mut v1 = exact.clone();
        v1["issuer"] = json!("https://sts.windows.net/{tid}/");
        v["providers"] = json!([v2, v1, exact]);
        v["tenants"][TA]["issuers"] = json!(["https://login.microsoftonline.com/{tid}/v2.0"]);
        let c = compile(&v).unwrap();
        let dir = "72f988bf-86f1-41af-91ab-2d7cd011db47";
        assert_eq!(c.provider_index(&format!("https://login.microsoftonline.com/{dir}/v2.0")), Some(2));
        assert_eq!(
            c.provider_index("https://login.microsoftonline.com/f8cdef31-a31e-4b4a-93e4-5f571e91255a/v2.0"),
            Some(0)
        );
        assert_eq!(c.provider_index("https://sts.windows.net/f8cdef31-a31e-4b4a-93e4-5f571e91255a/"), Some(1));
        for none in [
            "https://login.microsoftonline.com/{tid}/v2.0",
            "https://login.microsoftonline.com//v2.0",
            "https://login.microsoftonline.com/a/b/v2.0",
            "https://sts.windows.net/x",
            "https://login.microsoftonline.com/../v2.0",
        ] {
            assert_eq!(c.provider_index(none), None, "{none}");
        }
        let t = c.tenants.get(TA).unwrap();
        assert!(t.allows_issuer("https://login.microsoftonline.com/{tid}/v2.0"));
        assert!(!t.allows_issuer(&format!("https://login.microsoftonline.com/{dir}/v2.0")));
        v["tenants"][TA]["issuers"] = json!(["https://login.microsoftonline.com/{tenantid}/v2.0"]);
        assert_eq!(field_of(&v), format!("tenants.{TA}.issuers"));
    }

    /// The Entra multi-tenant configuration of the issue's contract (idp-spec), as written there.
    #[test]
    fn the_entra_multi_tenant_example_compiles_as_specified() {
        let v = json!({
          "providers": [
            {"issuer": "https://login.microsoftonline.com/{tid}/v2.0", "audiences": ["api://fhir-router", "00000000-0000-0000-0000-0000000000aa"],
             "discovery_uri": "https://login.microsoftonline.com/common/v2.0/.well-known/openid-configuration",
             "jwks_cluster": "entra", "claims": {"scopes": "roles", "client": ["azp", "appid"]}},
            {"issuer": "https://sts.windows.net/{tid}/", "audiences": ["api://fhir-router", "api://fhir-router/", "00000000-0000-0000-0000-0000000000aa"],
             "jwks_uri": "https://login.microsoftonline.com/common/discovery/keys",
             "jwks_cluster": "entra", "claims": {"scopes": "roles", "client": ["appid", "azp"]}}
          ],
          "tenants": {"72f988bf-86f1-41af-91ab-2d7cd011db47": {"cluster": "tenant_a"},
                      "f8cdef31-a31e-4b4a-93e4-5f571e91255a": {"cluster": "tenant_b"}},
          "metadata_cluster": "tenant_a"
        });
        let c = compile(&v).unwrap();
        let (v2, v1) = (&c.providers[0], &c.providers[1]);
        assert_eq!(v2.provider.claims.tenant, "tid");
        assert_eq!(v2.provider.claims.tenant_prefixes, [""]);
        assert_eq!((v2.provider.claims.scopes.as_str(), v1.provider.claims.client[0].as_str()), ("roles", "appid"));
        let (JwksSource::Remote(r2), JwksSource::Remote(r1)) = (&v2.jwks, &v1.jwks) else { panic!("remote") };
        let d = r2.discovery.as_ref().unwrap();
        assert_eq!(
            (d.issuer.as_str(), d.template, d.scheme),
            ("https://login.microsoftonline.com/{}/v2.0", true, "https://")
        );
        assert_eq!(
            (r2.authority.as_str(), r2.path.as_str()),
            ("login.microsoftonline.com", "/common/v2.0/.well-known/openid-configuration")
        );
        assert!(r1.discovery.is_none() && r1.path == "/common/discovery/keys");
    }

    #[test]
    fn a_fixed_tenant_may_name_a_registry_tenant_not_yet_fetched() {
        let mut v = with_provider(json!({"tenant": "Okta-Tenant-1"}));
        assert_eq!(field_of(&v), "provider.tenant");
        v["tenant_registry"] = json!({"uri": "http://127.0.0.1:9200/tenants", "cluster": "registry"});
        let c = compile(&v).unwrap();
        assert_eq!(c.providers[0].provider.tenant.as_deref(), Some("okta-tenant-1"));
        let c = compile(&with_provider(json!({"tenant": TA.to_uppercase()}))).unwrap();
        assert_eq!(c.providers[0].provider.tenant.as_deref(), Some(TA));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_config_documents_never_panic(s in "\\PC{0,200}") {
            let _ = Config::from_json(s.as_bytes());
        }
    }
}
