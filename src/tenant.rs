//! Tenants: the token's scope names exactly one configured tenant, and the tenant names its Envoy cluster.
//!
//! Tenant ids are ASCII (`A-Z a-z 0-9 . _ -`) and compared case-insensitively, since an AAD tenant GUID may
//! be written in either case. A scope value with any other character (a Unicode look-alike, `../`) names no
//! tenant. Lookup is one hash probe per scope value, however many tenants are configured.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use serde_json::Value;

use crate::fhir::Policy;
use crate::identity::{Claim, Identity};

/// A configured tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant {
    /// The id as configured (lowercased).
    pub id: String,
    /// The Envoy cluster its requests go to.
    pub cluster: String,
    /// Everything beyond a read-only tenant at its cluster's root (boxed: most tenants have none).
    pub settings: Option<Box<TenantSettings>>,
}

/// A tenant's settings beyond its cluster: how its FHIR server differs from a plain one at the cluster's
/// root (authority, base path, links, a header), what the tenant may do, and which issuers may name it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantSettings {
    /// `:authority` (Host) to send instead of the client's.
    pub authority: Option<String>,
    /// The FHIR base path on that server (`/api/FHIR/R4`), without a trailing slash; `""` for the root.
    pub base_path: String,
    /// The base URL the server puts into its own links, to rewrite to the public base.
    pub links_base_url: Option<String>,
    /// A header sent with every request to it (name, value), e.g. the partner's API key.
    pub header: Option<(String, String)>,
    /// What the tenant may do.
    pub policy: Policy,
    /// The issuers allowed to name this tenant; `None`: any configured issuer.
    pub issuers: Option<Vec<String>>,
    /// The clients (`client_id`, else `azp`) whose tokens may name this tenant; `None`: any client.
    pub allowed_clients: Option<Vec<String>>,
    /// Whether a token without SMART resource scopes is refused (rather than given the allowlist alone).
    pub require_smart_scopes: bool,
    /// The OAuth client whose access token its FHIR server wants (`upstream_auth`).
    pub upstream_auth: Option<std::sync::Arc<crate::upstream_auth::OAuthClient>>,
    /// Its own quota (`Some(None)`: none, whatever the default), instead of the configuration's default.
    pub quota: crate::quota::TenantQuota,
}

static READ_ONLY: std::sync::OnceLock<Policy> = std::sync::OnceLock::new();

impl Tenant {
    /// Whether a token from `issuer` may name this tenant.
    pub fn allows_issuer(&self, issuer: &str) -> bool {
        match self.settings.as_deref().and_then(|u| u.issuers.as_ref()) {
            Some(list) => list.iter().any(|i| i == issuer),
            None => true,
        }
    }

    /// Whether a token from `client` (its whole `client_id`, else `azp`) may name this tenant: always,
    /// unless the tenant lists `allowed_clients`; then only a listed client (compared exactly).
    pub fn allows_client(&self, client: Option<&str>) -> bool {
        match self.settings.as_deref().and_then(|u| u.allowed_clients.as_ref()) {
            Some(list) => client.is_some_and(|c| list.iter().any(|a| a == c)),
            None => true,
        }
    }

    /// Whether tokens must carry SMART scopes for this tenant (`require_smart_scopes`).
    pub fn requires_smart_scopes(&self) -> bool {
        self.settings.as_deref().is_some_and(|u| u.require_smart_scopes)
    }

    /// The OAuth client toward its FHIR server, if it has one.
    pub fn upstream_auth(&self) -> Option<&std::sync::Arc<crate::upstream_auth::OAuthClient>> {
        self.settings.as_deref().and_then(|u| u.upstream_auth.as_ref())
    }

    /// The audit line's name for the credential sent to its FHIR server: the OAuth method, `header` for a
    /// static header, none otherwise.
    pub fn credential_kind(&self) -> Option<&'static str> {
        let settings = self.settings.as_deref()?;
        match (&settings.upstream_auth, &settings.header) {
            (Some(client), _) => Some(client.kind()),
            (None, Some(_)) => Some("header"),
            (None, None) => None,
        }
    }

    /// The tenant's allowlist (read-only unless configured).
    pub fn policy(&self) -> &Policy {
        match &self.settings {
            Some(u) => &u.policy,
            None => READ_ONLY.get_or_init(Policy::default),
        }
    }
}

/// Why no single tenant could be taken from the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TenantError {
    /// No scope value names a configured tenant (or the claim is missing or not text).
    None,
    /// Several scope values name configured tenants.
    Several,
}

/// The compiled tenant map.
#[derive(Clone, Debug)]
pub struct TenantMap {
    prefixes: Vec<String>,
    /// Keyed by the tenant's own id (no second copy of it), with a fast non-cryptographic hash: the ids are
    /// the operator's, and a lookup of any other string only probes.
    by_id: HashSet<ById, BuildHasherDefault<FxHasher>>,
}

/// A tenant, hashed and compared by its id.
#[derive(Clone, Debug)]
struct ById(Tenant);

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}
impl Eq for ById {}
impl Hash for ById {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.id.as_str().hash(state);
    }
}
impl Borrow<str> for ById {
    fn borrow(&self) -> &str {
        &self.0.id
    }
}

/// The multiply-rotate hash of rustc's `FxHasher`, eight bytes at a time.
#[derive(Default)]
pub struct FxHasher(u64);

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let mut w = [0u8; 8];
        let rest = chunks.remainder();
        if let Some(dst) = w.get_mut(..rest.len()) {
            dst.copy_from_slice(rest);
        }
        self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 56));
    }
    fn write_u8(&mut self, b: u8) {
        self.add(u64::from(b));
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// Longest tenant id accepted.
pub const MAX_TENANT_ID_LEN: usize = 128;

pub fn is_tenant_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_TENANT_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl TenantMap {
    /// An empty map accepting claim values of the form `<prefix><id>`.
    pub fn new(prefixes: Vec<String>) -> Self {
        Self { prefixes, by_id: HashSet::default() }
    }

    /// Adds a plain tenant (read-only, at its cluster's root); the error says why the id is unusable.
    pub fn insert(&mut self, id: &str, cluster: String) -> Result<(), &'static str> {
        self.insert_with(id, cluster, None)
    }

    /// Adds a tenant; the error says why the id is unusable.
    pub fn insert_with(
        &mut self,
        id: &str,
        cluster: String,
        settings: Option<Box<TenantSettings>>,
    ) -> Result<(), &'static str> {
        if !is_tenant_id(id) {
            return Err("a tenant id is 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' or '-'");
        }
        let key = id.to_ascii_lowercase();
        if self.by_id.contains(key.as_str()) {
            return Err("the same tenant id is listed twice (ids are case-insensitive)");
        }
        self.by_id.insert(ById(Tenant { id: key, cluster, settings }));
        Ok(())
    }

    /// An empty map that reads tenants the same way (for a registry document).
    pub fn empty_like(&self) -> Self {
        Self::new(self.prefixes.clone())
    }

    /// The tenant a provider's fixed `tenant` names (an id as configured, any case).
    pub fn fixed(&self, id: &str) -> Result<&Tenant, TenantError> {
        self.lookup(id).ok_or(TenantError::None)
    }

    /// The tenant with this (configured, lowercased) id.
    pub fn get(&self, id: &str) -> Option<&Tenant> {
        self.by_id.get(id).map(|t| &t.0)
    }

    /// The tenants, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Tenant> {
        self.by_id.iter().map(|t| &t.0)
    }

    /// The tenants' ids, in no particular order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.by_id.iter().map(|t| t.0.id.as_str())
    }

    /// How many tenants are configured.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no tenant is configured.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    fn lookup(&self, id: &str) -> Option<&Tenant> {
        if !is_tenant_id(id) {
            return None;
        }
        if id.bytes().any(|b| b.is_ascii_uppercase()) {
            self.get(&id.to_ascii_lowercase())
        } else {
            self.get(id)
        }
    }

    /// The tenant one scope value names, under any of `prefixes`.
    fn named_by(&self, value: &str, prefixes: &[String]) -> Option<&Tenant> {
        prefixes.iter().find_map(|p| value.strip_prefix(p.as_str()).and_then(|id| self.lookup(id)))
    }

    /// The single tenant the claim names. The claim is a space-delimited string (RFC 6749 §3.3) or an array
    /// of strings; values naming no configured tenant (`openid`, `system/*.read`) are ignored, and so are
    /// further values naming the same tenant (`<id> tenant/<id>`, as some IdPs issue).
    pub fn resolve(&self, claim: Claim<'_>) -> Result<&Tenant, TenantError> {
        self.resolve_with(claim, &self.prefixes)
    }

    /// [`TenantMap::resolve`] with a provider's own prefixes.
    pub fn resolve_with(&self, claim: Claim<'_>, prefixes: &[String]) -> Result<&Tenant, TenantError> {
        let mut found: Option<&Tenant> = None;
        for value in claim.values() {
            if let Some(t) = self.named_by(value, prefixes) {
                match found {
                    // The map holds one entry per (lowercased) id: the same tenant is the same entry.
                    Some(f) if std::ptr::eq(f, t) => {}
                    Some(_) => return Err(TenantError::Several),
                    None => found = Some(t),
                }
            }
        }
        found.ok_or(TenantError::None)
    }

    /// [`TenantMap::resolve`] on the claim's JSON value (tests, fuzzing).
    pub fn resolve_value(&self, claim: Option<&Value>) -> Result<&Tenant, TenantError> {
        let identity = Identity::new(claim, None, None, None);
        self.resolve(identity.tenant_claim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkeys::{TENANT_A, TENANT_B};
    use serde_json::json;

    fn map() -> TenantMap {
        let mut m = TenantMap::new(vec![String::new(), "tenant/".into()]);
        m.insert(TENANT_A, "tenant_a".into()).unwrap();
        m.insert(TENANT_B, "tenant_b".into()).unwrap();
        m
    }

    fn cluster(claim: serde_json::Value) -> Result<String, TenantError> {
        map().resolve_value(Some(&claim)).map(|t| t.cluster.clone())
    }

    #[test]
    fn bare_tenant_guid_in_scope_selects_the_tenant() {
        assert_eq!(cluster(json!(TENANT_A)), Ok("tenant_a".into()));
        assert_eq!(cluster(json!(TENANT_B)), Ok("tenant_b".into()));
    }

    #[test]
    fn prefixed_form_and_other_scopes_are_fine() {
        assert_eq!(cluster(json!(format!("openid tenant/{TENANT_B} system/*.read"))), Ok("tenant_b".into()));
        assert_eq!(cluster(json!(["openid", TENANT_A])), Ok("tenant_a".into()));
    }

    #[test]
    fn tenant_ids_are_case_insensitive() {
        assert_eq!(cluster(json!(TENANT_A.to_uppercase())), Ok("tenant_a".into()));
    }

    #[test]
    fn two_tenants_in_scope_are_refused() {
        assert_eq!(cluster(json!(format!("{TENANT_A} {TENANT_B}"))), Err(TenantError::Several));
        assert_eq!(cluster(json!(format!("{TENANT_A} tenant/{TENANT_B}"))), Err(TenantError::Several));
        assert_eq!(cluster(json!(format!("tenant/{TENANT_A} {TENANT_A} {TENANT_B}"))), Err(TenantError::Several));
        assert_eq!(cluster(json!([TENANT_B, format!("tenant/{TENANT_A}")])), Err(TenantError::Several));
    }

    #[test]
    fn one_tenant_named_twice_is_one_tenant() {
        for claim in [
            json!(format!("{TENANT_A} tenant/{TENANT_A}")),
            json!(format!("tenant/{TENANT_A} openid {}", TENANT_A.to_uppercase())),
            json!(format!("{TENANT_A} {TENANT_A}")),
            json!([format!("tenant/{TENANT_A}"), TENANT_A]),
        ] {
            assert_eq!(cluster(claim.clone()), Ok("tenant_a".into()), "{claim}");
        }
    }

    #[test]
    fn unknown_missing_or_disguised_tenants_name_nothing() {
        let lookalike = TENANT_A.replace('a', "\u{430}"); // Cyrillic a
        for claim in [
            json!("11111111-2222-3333-4444-555555555555"),
            json!(""),
            json!(format!("{TENANT_A}/../x")),
            json!(format!("../{TENANT_A}")),
            json!(lookalike),
            json!(format!("other/{TENANT_A}")),
            json!(42),
            json!({"id": TENANT_A}),
        ] {
            assert_eq!(cluster(claim.clone()), Err(TenantError::None), "{claim}");
        }
        assert_eq!(map().resolve_value(None), Err(TenantError::None));
    }

    #[test]
    fn bad_or_duplicate_ids_are_refused_at_insert() {
        let mut m = map();
        assert!(m.insert("", "x".into()).is_err());
        assert!(m.insert("a b", "x".into()).is_err());
        assert!(m.insert(&TENANT_A.to_uppercase(), "x".into()).is_err());
        assert!(m.insert(&"x".repeat(129), "x".into()).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_scopes_never_panic(s in "\\PC{0,200}") {
            let _ = map().resolve_value(Some(&json!(s)));
        }
    }
}
