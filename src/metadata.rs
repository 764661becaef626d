//! The decision as data Envoy's own filters can read (`decision_metadata`): who asked (tenant, client,
//! issuer, the SMART scopes the filter enforces), what for (interaction, resource type) and what became of
//! it (outcome, reason). Envoy's RBAC (a `filter_state` principal or a CEL condition), its access log
//! (`%FILTER_STATE(...)%`, `%DYNAMIC_METADATA(...)%`), `ext_authz`, rate-limit descriptors and tracing read
//! them.
//!
//! The same filter-state names in both builds: `wasm.fhir_tenant_router.<key>` (a proxy-wasm host puts
//! the `wasm.` in front of every property a module sets; the dynamic module names it so itself). The
//! dynamic module also sets the same keys as dynamic metadata under the namespace `fhir_tenant_router`,
//! in one host call; Envoy 1.40's proxy-wasm host has no way to set dynamic metadata (no ABI call and
//! no foreign function does), so the wasm build sets filter state only.
//!
//! Each key is set at most once per request: the dynamic module's filter state is read-only once set
//! (Envoy refuses a second write). A key with nothing to say is left unset, so a policy that needs it
//! fails closed.

use crate::effect::{Effect, Effects};
use crate::fhir::classify;

/// The dynamic-metadata namespace (dynamic module).
pub const NAMESPACE: &str = "fhir_tenant_router";
/// What every filter-state name starts with, in both builds.
pub const FILTER_STATE_PREFIX: &str = "wasm.fhir_tenant_router.";

/// The keys, by filter-state name: `wasm.fhir_tenant_router.` then the dynamic-metadata key.
pub const TENANT: &str = "wasm.fhir_tenant_router.tenant";
pub const CLIENT_ID: &str = "wasm.fhir_tenant_router.client_id";
pub const ISSUER: &str = "wasm.fhir_tenant_router.issuer";
pub const SCOPES: &str = "wasm.fhir_tenant_router.scopes";
pub const INTERACTION: &str = "wasm.fhir_tenant_router.interaction";
pub const RESOURCE_TYPE: &str = "wasm.fhir_tenant_router.resource_type";
pub const OUTCOME: &str = "wasm.fhir_tenant_router.outcome";
pub const REASON: &str = "wasm.fhir_tenant_router.reason";

/// Every key, in the order they are set.
pub const KEYS: [&str; 8] = [TENANT, CLIENT_ID, ISSUER, SCOPES, INTERACTION, RESOURCE_TYPE, OUTCOME, REASON];

/// The span tag (`span_tags` only) of the nanoseconds the filter took to check the token and decide: the
/// other span tags are the keys above without the `wasm.` (`fhir_tenant_router.tenant`).
pub const VERIFY_NS: &str = "wasm.fhir_tenant_router.verify_ns";

/// The span tag of a filter-state name (`fhir_tenant_router.tenant`): the wasm shell sets it as filter
/// state, to which the proxy-wasm host adds the `wasm.` back.
pub fn tag(name: &str) -> &str {
    name.strip_prefix("wasm.").unwrap_or(name)
}

/// The dynamic-metadata key of a filter-state name (`tenant` for `wasm.fhir_tenant_router.tenant`).
pub fn short(name: &str) -> &str {
    name.strip_prefix(FILTER_STATE_PREFIX).unwrap_or(name)
}

/// The interaction(s) a request may be, from its method and path, and from a method override it carries
/// (an `X-HTTP-Method-Override` header or a `_method` query parameter: `override_method` is the method it
/// names). A server may or may not honour an override, so when the override is another interaction both
/// are named, space-separated (`create search`): a policy that allows only exact values (`read`, `search`)
/// then allows neither, and a policy that denies a value must match it as a word. `None` when neither
/// is a FHIR REST interaction (an escaped path, an unknown method): such a request has no interaction key.
pub fn interaction(method: &str, path: &str, override_method: Option<&str>) -> Option<String> {
    let own = classify(method, path).map(|c| c.interaction.name());
    let other = override_method.filter(|m| *m != method).and_then(|m| classify(m, path)).map(|c| c.interaction.name());
    match (own, other) {
        (Some(a), Some(b)) if a != b => Some(format!("{a} {b}")),
        (Some(a), _) => Some(a.to_string()),
        (None, Some(b)) => Some(b.to_string()),
        (None, None) => None,
    }
}

/// The resource type the request's path names (`Observation` for `Patient/1/Observation`); `None` for a
/// system-level request or a path that is no FHIR interaction. Only the path's: what a search reaches
/// through `_include`, `_has` or chains is not in it (the filter's allowlist and scopes judge that).
pub fn resource_type<'p>(method: &str, path: &'p str) -> Option<&'p str> {
    classify(method, path).and_then(|c| c.resource_type)
}

/// One request's decision, as far as it is known when it is set.
#[derive(Clone, Copy, Debug, Default)]
pub struct Decision<'a> {
    pub tenant: Option<&'a str>,
    pub client_id: Option<&'a str>,
    pub issuer: Option<&'a str>,
    pub scopes: Option<&'a str>,
    pub interaction: Option<&'a str>,
    pub resource_type: Option<&'a str>,
    pub outcome: Option<&'a str>,
    pub reason: Option<&'a str>,
}

impl Decision<'_> {
    /// Sets each key that has a value: one filter state each (both builds), then one dynamic-metadata
    /// batch (applied by the dynamic module only).
    pub fn push(&self, out: &mut dyn Effects) {
        let values = [
            self.tenant,
            self.client_id,
            self.issuer,
            self.scopes,
            self.interaction,
            self.resource_type,
            self.outcome,
            self.reason,
        ];
        let mut entries = [("", ""); 8];
        let mut n = 0;
        for (name, value) in KEYS.iter().zip(values) {
            let Some(value) = value else { continue };
            out.push(Effect::FilterState(name, value));
            if let Some(slot) = entries.get_mut(n) {
                *slot = (short(name), value);
                n += 1;
            }
        }
        if let Some(entries) = entries.get(..n).filter(|e| !e.is_empty()) {
            out.push(Effect::DynamicMetadata(NAMESPACE, entries));
        }
    }

    /// The keys that have a value, and the verify time when it was measured, as span tags: one effect.
    pub fn push_span_tags(&self, verify_ns: Option<&str>, out: &mut dyn Effects) {
        let values = [
            self.tenant,
            self.client_id,
            self.issuer,
            self.scopes,
            self.interaction,
            self.resource_type,
            self.outcome,
            self.reason,
            verify_ns,
        ];
        let mut tags = [("", ""); 9];
        let mut n = 0;
        for (name, value) in KEYS.iter().chain([&VERIFY_NS]).zip(values) {
            let Some(value) = value else { continue };
            if let Some(slot) = tags.get_mut(n) {
                *slot = (tag(name), value);
                n += 1;
            }
        }
        if let Some(tags) = tags.get(..n).filter(|t| !t.is_empty()) {
            out.push(Effect::SpanTags(tags));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorded(Vec<String>);

    impl Effects for Recorded {
        fn push(&mut self, effect: Effect<'_>) {
            self.0.push(format!("{effect:?}"));
        }
    }

    #[test]
    fn every_key_is_under_one_prefix_and_the_metadata_keys_are_the_rest() {
        for key in KEYS {
            assert!(key.starts_with(FILTER_STATE_PREFIX), "{key}");
            assert!(!short(key).contains('.'), "{key}");
        }
        assert_eq!(short(TENANT), "tenant");
        assert_eq!(short(RESOURCE_TYPE), "resource_type");
    }

    #[test]
    fn only_keys_with_a_value_are_set_then_one_metadata_batch() {
        let mut out = Recorded::default();
        let d =
            Decision { tenant: Some("t1"), outcome: Some("allowed"), interaction: Some("read"), ..Decision::default() };
        d.push(&mut out);
        assert_eq!(
            out.0,
            [
                r#"FilterState("wasm.fhir_tenant_router.tenant", "t1")"#,
                r#"FilterState("wasm.fhir_tenant_router.interaction", "read")"#,
                r#"FilterState("wasm.fhir_tenant_router.outcome", "allowed")"#,
                r#"DynamicMetadata("fhir_tenant_router", [("tenant", "t1"), ("interaction", "read"), ("outcome", "allowed")])"#,
            ]
        );
        let mut none = Recorded::default();
        Decision::default().push(&mut none);
        assert!(none.0.is_empty(), "no empty batch: {:?}", none.0);
    }

    #[test]
    fn span_tags_are_the_keys_with_a_value_without_the_wasm_prefix_plus_the_verify_time() {
        let mut out = Recorded::default();
        let d =
            Decision { tenant: Some("t1"), client_id: Some("app"), outcome: Some("allowed"), ..Decision::default() };
        d.push_span_tags(Some("8400"), &mut out);
        assert_eq!(
            out.0,
            [
                r#"SpanTags([("fhir_tenant_router.tenant", "t1"), ("fhir_tenant_router.client_id", "app"), ("fhir_tenant_router.outcome", "allowed"), ("fhir_tenant_router.verify_ns", "8400")])"#
            ]
        );
        let mut none = Recorded::default();
        Decision::default().push_span_tags(None, &mut none);
        assert!(none.0.is_empty(), "no empty tag set: {:?}", none.0);
    }

    #[test]
    fn an_override_that_is_another_interaction_names_both() {
        assert_eq!(interaction("GET", "/Patient/1", None).as_deref(), Some("read"));
        assert_eq!(interaction("POST", "/Patient", Some("GET")).as_deref(), Some("create search"));
        assert_eq!(interaction("GET", "/Patient?_method=DELETE", Some("DELETE")).as_deref(), Some("search delete"));
        assert_eq!(interaction("POST", "/Patient/1", Some("DELETE")).as_deref(), Some("delete"));
        assert_eq!(interaction("GET", "/Patient/1", Some("GET")).as_deref(), Some("read"));
        assert_eq!(interaction("HEAD", "/Patient/1", None).as_deref(), Some("read"));
        assert_eq!(interaction("POST", "/", None).as_deref(), Some("batch"));
        assert_eq!(interaction("post", "/Patient", None), None, "methods are case-sensitive");
        assert_eq!(interaction("GET", "/Patient%2F1", None), None, "an escaped path names no interaction");
        assert_eq!(resource_type("GET", "/Patient/1/Observation?code=x"), Some("Observation"));
        assert_eq!(resource_type("GET", "/?_type=Patient"), None);
    }
}

#[cfg(test)]
mod config_tests {
    use crate::config::Config;
    use serde_json::json;

    #[test]
    fn decision_metadata_is_opt_in_and_a_wrong_type_is_refused_by_name() {
        let mut v = json!({
            "provider": {"issuer": "https://idp", "audiences": ["a"],
                         "jwks": serde_json::from_str::<serde_json::Value>(&crate::testkeys::public_jwks()).unwrap()},
            "tenants": {"t1": {"cluster": "c1"}},
            "metadata_cluster": "m"
        });
        let compile = |v: &serde_json::Value| Config::from_json(v.to_string().as_bytes());
        assert!(!compile(&v).unwrap().decision_metadata);
        v["decision_metadata"] = json!(true);
        assert!(compile(&v).unwrap().decision_metadata);
        v["decision_metadata"] = json!("yes");
        assert!(compile(&v).unwrap_err().to_string().contains("decision_metadata"));
    }

    #[test]
    fn audit_event_is_opt_in_and_a_wrong_type_is_refused_by_name() {
        let mut v = json!({
            "provider": {"issuer": "https://idp", "audiences": ["a"],
                         "jwks": serde_json::from_str::<serde_json::Value>(&crate::testkeys::public_jwks()).unwrap()},
            "tenants": {"t1": {"cluster": "c1"}},
            "metadata_cluster": "m"
        });
        let compile = |v: &serde_json::Value| Config::from_json(v.to_string().as_bytes());
        assert!(!compile(&v).unwrap().audit_event);
        v["audit_event"] = json!(true);
        assert!(compile(&v).unwrap().audit_event);
        v["audit_event"] = json!(1);
        assert!(compile(&v).unwrap_err().to_string().contains("audit_event"));
    }
}
