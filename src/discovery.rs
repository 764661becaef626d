//! What the FHIR endpoint tells clients about its security: the CapabilityStatement (or DSTU2 Conformance)
//! from `/metadata`, patched on its way back so that it names the IdP's token URL through the SMART
//! `oauth-uris` extension, and the SMART configuration document, answered from the configuration.

use serde_json::{json, Map, Value};

/// The SMART extension that carries the OAuth endpoints in `rest.security`.
pub const OAUTH_URIS: &str = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris";

/// How the IdP is advertised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovery {
    pub token_endpoint: String,
    pub authorization_endpoint: Option<String>,
    pub scopes_supported: Vec<String>,
    pub token_endpoint_auth_methods: Vec<String>,
    pub capabilities: Vec<String>,
}

/// The `restful-security-service` code system, as each FHIR version names it.
fn security_service_system(resource_type: &str, fhir_version: Option<&str>) -> &'static str {
    let r4_or_later = fhir_version.is_some_and(|v| v.starts_with('4') || v.starts_with('5'));
    if resource_type == "Conformance" || !r4_or_later {
        // DSTU2 and STU3
        "http://hl7.org/fhir/restful-security-service"
    } else {
        "http://terminology.hl7.org/CodeSystem/restful-security-service"
    }
}

impl Discovery {
    /// The `rest.security` element this endpoint advertises.
    fn security(&self, system: &str) -> Value {
        let mut uris = vec![json!({"url": "token", "valueUri": self.token_endpoint})];
        if let Some(authorize) = &self.authorization_endpoint {
            uris.push(json!({"url": "authorize", "valueUri": authorize}));
        }
        json!({
            "extension": [{"url": OAUTH_URIS, "extension": uris}],
            "service": [{
                "coding": [
                    {"system": system, "code": "OAuth", "display": "OAuth"},
                    {"system": system, "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"}
                ],
                "text": "OAuth 2.0 client credentials (SMART Backend Services)"
            }],
            "description": "Access tokens from the IdP's token endpoint (client credentials); the tenant id goes in the scope."
        })
    }

    /// Patches a CapabilityStatement or Conformance (JSON) so that every `rest` entry in server mode carries
    /// our security element instead of the upstream's; everything else is kept. `None` when the body is not
    /// one of those resources (it is then passed through unchanged).
    pub fn patch_capability_statement(&self, body: &[u8]) -> Option<Vec<u8>> {
        let mut doc: Map<String, Value> = match serde_json::from_slice(body) {
            Ok(Value::Object(map)) => map,
            _ => return None,
        };
        let resource_type = doc.get("resourceType")?.as_str()?.to_string();
        if resource_type != "CapabilityStatement" && resource_type != "Conformance" {
            return None;
        }
        let system = security_service_system(&resource_type, doc.get("fhirVersion").and_then(Value::as_str));
        let security = self.security(system);
        let rest = doc.entry("rest").or_insert_with(|| json!([{"mode": "server"}]));
        let Value::Array(entries) = rest else {
            return None;
        };
        if !entries.iter().any(|r| r.get("mode").and_then(Value::as_str) == Some("server")) {
            entries.push(json!({"mode": "server"}));
        }
        for entry in entries.iter_mut() {
            if entry.get("mode").and_then(Value::as_str) == Some("server") {
                if let Value::Object(e) = entry {
                    e.insert("security".into(), security.clone());
                }
            }
        }
        serde_json::to_vec(&Value::Object(doc)).ok()
    }

    /// The SMART configuration document (`/.well-known/smart-configuration`, SMART App Launch 2.x §2.1.2),
    /// for a server that takes client-credentials tokens (SMART Backend Services).
    ///
    /// `response_types_supported` (RECOMMENDED in SMART 2.x, after RFC 8414) lists what the *authorization*
    /// endpoint answers; the client-credentials grant never goes there, so without an
    /// `authorization_endpoint` the field is left out (SMART's own Backend Services example has none), and
    /// with one it says `code`, the only response type SMART App Launch uses. It never says `token` (the
    /// implicit grant, which SMART does not use and OAuth 2.0 Security BCP forbids).
    /// `code_challenge_methods_supported: ["S256"]` stays: SMART 2.x makes it REQUIRED.
    pub fn smart_configuration(&self, issuer: &str, jwks_uri: Option<&str>) -> String {
        let mut doc = json!({
            "issuer": issuer,
            "token_endpoint": self.token_endpoint,
            "token_endpoint_auth_methods_supported": self.token_endpoint_auth_methods,
            "grant_types_supported": ["client_credentials"],
            "scopes_supported": self.scopes_supported,
            "capabilities": self.capabilities,
            "code_challenge_methods_supported": ["S256"]
        });
        if let Some(obj) = doc.as_object_mut() {
            if let Some(authorize) = &self.authorization_endpoint {
                obj.insert("authorization_endpoint".into(), json!(authorize));
                obj.insert("response_types_supported".into(), json!(["code"]));
            }
            if let Some(uri) = jwks_uri {
                obj.insert("jwks_uri".into(), json!(uri));
            }
        }
        doc.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn discovery() -> Discovery {
        Discovery {
            token_endpoint: "https://login.example/t/oauth2/token".into(),
            authorization_endpoint: None,
            scopes_supported: vec!["system/*.read".into()],
            token_endpoint_auth_methods: vec!["client_secret_post".into(), "client_secret_basic".into()],
            capabilities: vec!["client-confidential-symmetric".into()],
        }
    }

    fn patched(doc: Value) -> Value {
        serde_json::from_slice(&discovery().patch_capability_statement(doc.to_string().as_bytes()).unwrap()).unwrap()
    }

    fn token_uri(doc: &Value) -> &str {
        let ext = &doc["rest"][0]["security"]["extension"][0];
        assert_eq!(ext["url"], OAUTH_URIS);
        ext["extension"][0]["valueUri"].as_str().unwrap()
    }

    #[test]
    fn r4_capability_statement_gets_the_token_url_and_keeps_everything_else() {
        let doc = json!({
            "resourceType": "CapabilityStatement", "fhirVersion": "4.0.1", "status": "active",
            "rest": [{"mode": "server", "resource": [{"type": "Patient"}],
                      "security": {"service": [{"coding": [{"code": "Basic"}]}]}}]
        });
        let p = patched(doc);
        assert_eq!(token_uri(&p), "https://login.example/t/oauth2/token");
        assert_eq!(p["fhirVersion"], "4.0.1");
        assert_eq!(p["rest"][0]["resource"][0]["type"], "Patient");
        let codings = &p["rest"][0]["security"]["service"][0]["coding"];
        assert_eq!(codings[0]["code"], "OAuth");
        assert_eq!(codings[1]["code"], "SMART-on-FHIR");
        assert_eq!(codings[0]["system"], "http://terminology.hl7.org/CodeSystem/restful-security-service");
        assert!(!p.to_string().contains("Basic"), "the upstream's security is replaced");
    }

    #[test]
    fn dstu2_conformance_and_stu3_use_the_older_code_system() {
        for (rt, v) in [("Conformance", "1.0.2"), ("CapabilityStatement", "3.0.2")] {
            let p = patched(json!({"resourceType": rt, "fhirVersion": v, "rest": [{"mode": "server"}]}));
            assert_eq!(token_uri(&p), "https://login.example/t/oauth2/token");
            assert_eq!(
                p["rest"][0]["security"]["service"][0]["coding"][0]["system"],
                "http://hl7.org/fhir/restful-security-service"
            );
            assert_eq!(p["fhirVersion"], v);
        }
    }

    #[test]
    fn the_authorize_url_is_added_when_configured() {
        let mut d = discovery();
        d.authorization_endpoint = Some("https://login.example/authorize".into());
        let body =
            d.patch_capability_statement(br#"{"resourceType":"CapabilityStatement","rest":[{"mode":"server"}]}"#);
        let p: Value = serde_json::from_slice(&body.unwrap()).unwrap();
        assert_eq!(p["rest"][0]["security"]["extension"][0]["extension"][1]["url"], "authorize");
    }

    #[test]
    fn a_statement_without_a_server_rest_entry_gets_one() {
        let p = patched(json!({"resourceType": "CapabilityStatement", "rest": [{"mode": "client"}]}));
        assert_eq!(p["rest"][0]["mode"], "client");
        assert!(p["rest"][0].get("security").is_none());
        assert_eq!(p["rest"][1]["mode"], "server");
        let p = patched(json!({"resourceType": "CapabilityStatement"}));
        assert_eq!(p["rest"][0]["mode"], "server");
    }

    #[test]
    fn other_bodies_are_left_alone() {
        for body in [
            &b"<CapabilityStatement xmlns=\"http://hl7.org/fhir\"/>"[..],
            b"{}",
            br#"{"resourceType":"Patient"}"#,
            b"[]",
        ] {
            assert!(discovery().patch_capability_statement(body).is_none());
        }
    }

    #[test]
    fn smart_configuration_advertises_client_credentials() {
        let doc: Value =
            serde_json::from_str(&discovery().smart_configuration("https://login.example/t", None)).unwrap();
        assert_eq!(doc["token_endpoint"], "https://login.example/t/oauth2/token");
        assert_eq!(doc["grant_types_supported"], json!(["client_credentials"]));
        assert_eq!(doc["capabilities"], json!(["client-confidential-symmetric"]));
        assert!(doc.get("authorization_endpoint").is_none());
        assert_eq!(doc["code_challenge_methods_supported"], json!(["S256"]), "REQUIRED by SMART 2.x");
    }

    #[test]
    fn smart_configuration_advertises_no_implicit_grant_response_type() {
        let doc: Value =
            serde_json::from_str(&discovery().smart_configuration("https://login.example/t", None)).unwrap();
        assert!(doc.get("response_types_supported").is_none(), "no authorization endpoint: {doc}");
        let mut d = discovery();
        d.authorization_endpoint = Some("https://login.example/authorize".into());
        let doc: Value = serde_json::from_str(&d.smart_configuration("https://login.example/t", None)).unwrap();
        assert_eq!(doc["response_types_supported"], json!(["code"]));
    }
}
