//! IHE Basic Audit Log Patterns (BALP 1.1.3, <https://profiles.ihe.net/ITI/BALP/>) `AuditEvent`s (FHIR R4)
//! for each decided request (`audit_event`): the RESTful-interaction patterns (Create, Read, Update,
//! Delete, Query), one JSON object each, handed to Envoy's access log as the filter state
//! `wasm.fhir_tenant_router.audit_event` (one host call; `%FILTER_STATE(...:PLAIN)%` writes it).
//!
//! What the profile asks and what is written:
//! - `type` `rest`, `subtype` the `restful-interaction` code, `action` C/R/U/D/E, `recorded`, `outcome`
//!   (`0` forwarded; `4` refused: 400/401/403/429; `8` unavailable: 503) with `outcomeDesc` the status and
//!   the refusal's reason.
//! - `agent` client (the verified token's `client_id` under its issuer), server (the tenant's cluster, or
//!   this proxy when it answered itself), in DICOM's roles (110153 Source, 110152 Destination: the server
//!   is the source of a read, the client of the rest), and the tenant as the organization that receives
//!   the information (ParticipationType IRCP, the requestor). Not `agent[client].network` (BALP requires
//!   it): the filter does not read the client's address; the access log's `%DOWNSTREAM_REMOTE_ADDRESS%`
//!   next to the event has it.
//! - `meta.profile`: the BALP profile (Create, Read, Update, Delete, Query) of a forwarded request; a
//!   refused one follows the pattern without claiming it (the profiles are of successful interactions).
//! - `source.observer`: this proxy (security-source-type 4, Application Server).
//! - `entity`: for a search, the Query entity (audit-entity-type 2, object-role 24) whose `query` is the
//!   base64 of the query with every value replaced by `*`, and whose `description` is that text; else the
//!   data entity (object-role 4) naming only the resource type. BALP asks for the raw query and the
//!   resource's id: both are left out (values and ids can be PHI, and nothing of the kind goes into a log
//!   line here). Never the token, the body or a patient.

use base64::Engine as _;

use crate::audit::{rfc3339, Outcome};
use crate::fhir::{classify, Interaction};

/// The profiles' canonical base.
pub const PROFILE_BASE: &str = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.";
/// The filter state the access log reads the event from (both builds).
pub const FILTER_STATE: &str = "wasm.fhir_tenant_router.audit_event";
/// Who observes and, when it answers itself, serves.
pub const OBSERVER: &str = "fhir-tenant-router";

/// What one event says.
#[derive(Clone, Copy, Debug)]
pub struct Event<'a> {
    pub time_ms: u64,
    pub method: &'a str,
    pub path: &'a str,
    pub outcome: Outcome,
    pub reason: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub client_id: Option<&'a str>,
    pub issuer: Option<&'a str>,
    pub cluster: Option<&'a str>,
}

/// The HTTP status of a refusal, by its reason (the filter's own answers).
fn status(outcome: Outcome, reason: Option<&str>) -> Option<u32> {
    let reason = reason?;
    if let Some(r) = crate::rejection::Rejection::ALL.iter().find(|r| r.reason() == reason) {
        return Some(r.status());
    }
    Some(match reason {
        "quota_rate" | "quota_in_flight" => 429,
        "quota_too_costly" => 400,
        _ if outcome == Outcome::Forbidden => 403,
        _ => 400,
    })
}

/// The query with every value replaced by `*` (names kept, in order): no value of a search reaches a log.
pub fn redacted_query(query: &str) -> String {
    let parts: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let name = p.split('=').next().unwrap_or_default();
            // Names are the client's too: keep only what a FHIR parameter name holds.
            let name: String = name
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.' | '%'))
                .collect();
            format!("{name}=*")
        })
        .collect();
    parts.join("&")
}

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";

/// `value` as a JSON string.
fn q(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    crate::audit::push_json(&mut out, Some(value));
    out
}

fn coding(system: &str, code: &str, display: &str) -> String {
    format!(r#"{{"system":{},"code":{},"display":{}}}"#, q(system), q(code), q(display))
}

impl Event<'_> {
    /// The AuditEvent, as one line of JSON.
    pub fn to_json(&self) -> String {
        let classified = classify(self.method, self.path);
        let interaction = classified.as_ref().map(|c| c.interaction);
        let (subtype, action, profile) = match interaction {
            _ if self.outcome == Outcome::Public => ("capabilities", "E", None),
            Some(Interaction::Create) => ("create", "C", Some("Create")),
            Some(Interaction::Read) => ("read", "R", Some("Read")),
            Some(Interaction::Vread) => ("vread", "R", Some("Read")),
            Some(Interaction::Update) => ("update", "U", Some("Update")),
            Some(Interaction::Patch) => ("patch", "U", Some("Update")),
            Some(Interaction::Delete) => ("delete", "D", Some("Delete")),
            Some(Interaction::Search) => ("search", "E", Some("Query")),
            Some(Interaction::History) => ("history", "E", None),
            Some(Interaction::Operation) => ("operation", "E", None),
            Some(Interaction::Batch) => ("batch", "E", None),
            None => ("operation", "E", None),
        };
        let resource_type = classified.as_ref().and_then(|c| c.resource_type);
        let refused = !matches!(self.outcome, Outcome::Allowed | Outcome::Public);
        let status = status(self.outcome, self.reason).filter(|_| refused);
        let reason = self.reason.unwrap_or_default();
        let (outcome, outcome_desc) = match status {
            None => ("0", String::new()),
            Some(503) => ("8", format!(r#""outcomeDesc":{},"#, q(&format!("503 {reason}")))),
            Some(s) => ("4", format!(r#""outcomeDesc":{},"#, q(&format!("{s} {reason}")))),
        };
        // DICOM's roles follow the data: a read's data flows from the server (the source) to the client;
        // a create's, update's, delete's and a query's parameters flow from the client (BALP's Read and
        // Query profiles say so).
        let source = coding(DCM, "110153", "Source Role ID");
        let destination = coding(DCM, "110152", "Destination Role ID");
        let reads = matches!(interaction, Some(Interaction::Read | Interaction::Vread));
        let (client_role, server_role) = if reads { (destination, source) } else { (source, destination) };
        let client = match (self.client_id, self.issuer) {
            (Some(id), Some(iss)) => format!(r#"{{"identifier":{{"system":{},"value":{}}}}}"#, q(iss), q(id)),
            (Some(id), None) => format!(r#"{{"identifier":{{"value":{}}}}}"#, q(id)),
            _ => r#"{"display":"unauthenticated client"}"#.to_string(),
        };
        let server = match self.cluster.filter(|_| !refused) {
            Some(c) => format!(r#"{{"identifier":{{"system":"urn:fhir-tenant-router:cluster","value":{}}}}}"#, q(c)),
            None => format!(r#"{{"display":"{OBSERVER}"}}"#),
        };
        let mut agents = format!(
            r#"{{"type":{{"coding":[{client_role}]}},"who":{client},"requestor":false}},{{"type":{{"coding":[{server_role}]}},"who":{server},"requestor":false}}"#
        );
        if let Some(tenant) = self.tenant {
            let ircp =
                coding("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "IRCP", "information recipient");
            agents.push_str(&format!(
                r#",{{"type":{{"coding":[{ircp}]}},"who":{{"type":"Organization","identifier":{{"system":"urn:fhir-tenant-router:tenant","value":{}}}}},"requestor":true}}"#,
                q(tenant)
            ));
        }
        let system_object = coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "2", "System Object");
        let entity = if interaction == Some(Interaction::Search) {
            let query = self.path.split('#').next().unwrap_or_default().split_once('?').map_or("", |(_, q)| q);
            // A compartment search names its compartment's id (`Patient/123/Observation`): written as `*`.
            let path = self.path.split(['?', '#']).next().unwrap_or_default();
            let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            let path = match segments.as_slice() {
                [compartment, _, rest] => format!("/{compartment}/*/{rest}"),
                _ => path.to_string(),
            };
            let mut text = format!("{} {path}", self.method);
            if !query.is_empty() {
                text.push('?');
                text.push_str(&redacted_query(query));
            }
            let role = coding("http://terminology.hl7.org/CodeSystem/object-role", "24", "Query");
            let query = base64::engine::general_purpose::STANDARD.encode(text.as_bytes());
            format!(r#"{{"type":{system_object},"role":{role},"description":{},"query":"{query}"}}"#, q(&text))
        } else {
            let what = match resource_type {
                Some(t) => format!(r#"{{"type":{}}}"#, q(t)),
                None => r#"{"display":"not recorded"}"#.to_string(),
            };
            let role = coding("http://terminology.hl7.org/CodeSystem/object-role", "4", "Domain Resource");
            format!(r#"{{"what":{what},"type":{system_object},"role":{role}}}"#)
        };
        // The BALP profiles are of successful interactions (their `outcome` is 0); a refusal follows the
        // pattern without claiming the profile.
        let meta = match profile.filter(|_| status.is_none()) {
            Some(p) => format!(r#""meta":{{"profile":["{PROFILE_BASE}{p}"]}},"#),
            None => String::new(),
        };
        let event_type = coding("http://terminology.hl7.org/CodeSystem/audit-event-type", "rest", "Restful Operation");
        let subtype = coding("http://hl7.org/fhir/restful-interaction", subtype, subtype);
        let source_type =
            coding("http://terminology.hl7.org/CodeSystem/security-source-type", "4", "Application Server");
        let recorded = rfc3339(self.time_ms);
        format!(
            r#"{{"resourceType":"AuditEvent",{meta}"type":{event_type},"subtype":[{subtype}],"action":"{action}","recorded":"{recorded}","outcome":"{outcome}",{outcome_desc}"agent":[{agents}],"source":{{"observer":{{"display":"{OBSERVER}"}},"type":[{source_type}]}},"entity":[{entity}]}}"#
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn event(method: &'static str, path: &'static str, outcome: Outcome, reason: Option<&'static str>) -> Value {
        let e = Event {
            time_ms: 1_767_225_600_000,
            method,
            path,
            outcome,
            reason,
            tenant: Some("t1"),
            client_id: Some("patients-app-a"),
            issuer: Some("https://idp.example"),
            cluster: Some("tenant_a"),
        };
        serde_json::from_str(&e.to_json()).unwrap()
    }

    #[test]
    fn each_interaction_has_its_balp_profile_subtype_and_action() {
        for (method, path, subtype, action, profile) in [
            ("POST", "/Patient", "create", "C", Some("Create")),
            ("GET", "/Patient/p1", "read", "R", Some("Read")),
            ("GET", "/Patient/p1/_history/2", "vread", "R", Some("Read")),
            ("PUT", "/Patient/p1", "update", "U", Some("Update")),
            ("PATCH", "/Patient/p1", "patch", "U", Some("Update")),
            ("DELETE", "/Patient/p1", "delete", "D", Some("Delete")),
            ("GET", "/Patient?family=Zzyzx", "search", "E", Some("Query")),
            ("POST", "/", "batch", "E", None),
        ] {
            let v = event(method, path, Outcome::Allowed, None);
            assert_eq!(v["subtype"][0]["code"], subtype, "{v}");
            assert_eq!(v["action"], action, "{v}");
            assert_eq!(v["outcome"], "0");
            let want = profile.map(|p| json!([format!("{PROFILE_BASE}{p}")]));
            assert_eq!(v["meta"]["profile"], want.unwrap_or(Value::Null), "{v}");
        }
    }

    #[test]
    fn a_search_keeps_its_parameter_names_and_no_value_and_no_id_is_written() {
        let v = event("GET", "/Patient?family=Zzyzx&birthdate=1970-01-01&_count=5", Outcome::Allowed, None);
        let text = v.to_string();
        assert!(!text.contains("Zzyzx") && !text.contains("1970"), "{text}");
        assert_eq!(v["entity"][0]["description"], "GET /Patient?family=*&birthdate=*&_count=*");
        let raw = base64::engine::general_purpose::STANDARD.decode(v["entity"][0]["query"].as_str().unwrap()).unwrap();
        assert_eq!(raw, b"GET /Patient?family=*&birthdate=*&_count=*");
        let read = event("GET", "/Patient/mrn-12345", Outcome::Allowed, None).to_string();
        assert!(!read.contains("mrn-12345"), "{read}");
        let compartment = event("GET", "/Patient/mrn-12345/Observation?code=x", Outcome::Allowed, None);
        assert_eq!(compartment["entity"][0]["description"], "GET /Patient/*/Observation?code=*", "{compartment}");
    }

    #[test]
    fn refusals_carry_the_outcome_codes_of_their_status() {
        for (outcome, reason, code, desc) in [
            (Outcome::Rejected, "missing_token", "4", "401 missing_token"),
            (Outcome::Forbidden, "allowlist", "4", "403 allowlist"),
            (Outcome::Rejected, "client_not_allowed", "4", "403 client_not_allowed"),
            (Outcome::Rejected, "quota_rate", "4", "429 quota_rate"),
            (Outcome::Rejected, "jwks_unavailable", "8", "503 jwks_unavailable"),
            (Outcome::Rejected, "upstream_auth_unavailable", "8", "503 upstream_auth_unavailable"),
        ] {
            let v = event("GET", "/Patient/p1", outcome, Some(reason));
            assert_eq!((v["outcome"].as_str(), v["outcomeDesc"].as_str()), (Some(code), Some(desc)), "{v}");
            assert_eq!(v["agent"][1]["who"]["display"], OBSERVER, "the proxy answered: {v}");
        }
    }
}

#[cfg(test)]
mod role_tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn what_a_client_sends_is_escaped_into_valid_json() {
        let e = Event {
            time_ms: 0,
            method: "GET\"x",
            path: "/Patient?na\"me=1&\u{1}=2",
            outcome: Outcome::Allowed,
            reason: None,
            tenant: Some("t\"1"),
            client_id: Some("app\"\n\\"),
            issuer: Some("https://idp\""),
            cluster: Some("c\""),
        };
        let v: Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["agent"][0]["who"]["identifier"]["value"], "app\"\n\\");
    }

    #[test]
    fn a_reads_server_is_the_source_and_a_refusal_claims_no_profile() {
        let e = |method, path, outcome, reason| {
            let e = Event {
                time_ms: 0,
                method,
                path,
                outcome,
                reason,
                tenant: None,
                client_id: None,
                issuer: None,
                cluster: Some("c"),
            };
            serde_json::from_str::<Value>(&e.to_json()).unwrap()
        };
        let read = e("GET", "/Patient/p1", Outcome::Allowed, None);
        assert_eq!(read["agent"][0]["type"]["coding"][0]["code"], "110152", "{read}");
        assert_eq!(read["agent"][1]["type"]["coding"][0]["code"], "110153", "{read}");
        let create = e("POST", "/Patient", Outcome::Allowed, None);
        assert_eq!(create["agent"][0]["type"]["coding"][0]["code"], "110153", "{create}");
        let refused = e("POST", "/Patient", Outcome::Forbidden, Some("allowlist"));
        assert_eq!(refused["meta"], Value::Null, "{refused}");
        assert_eq!(refused["agent"].as_array().map(Vec::len), Some(2), "no tenant, no organization agent");
        let public = e("GET", "/metadata", Outcome::Public, None);
        assert_eq!(public["subtype"][0]["code"], "capabilities", "{public}");
    }
}
