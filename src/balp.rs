//! IHE Basic Audit Log Patterns (BALP 1.1.3, <https://profiles.ihe.net/ITI/BALP/>) `AuditEvent`s (FHIR R4)
//! for each decided request (`audit_event`): the RESTful-interaction patterns (Create, Read, Update,
//! Delete, Query), one JSON object each, handed to Envoy's access log as the filter state
//! `wasm.fhir_tenant_router.audit_event` (one host call; `%FILTER_STATE(...:PLAIN)%` writes it).
//!
//! What the profile asks and what is written:
//! - `type` `rest`, `subtype` the `restful-interaction` code, `action` C/R/U/D/E, `recorded`, `outcome`
//!   (`0` forwarded; `4` refused: 400/401/403/406/429; `8` failed: 502/503) with `outcomeDesc` the status and
//!   the refusal's reason.
//! - `agent` client (the verified token's `client_id` under its issuer), server (the tenant's cluster, or
//!   this proxy when it answered itself), in DICOM's roles (110153 Source, 110152 Destination: the server
//!   is the source of a read, the client of the rest), and the tenant as the organization that receives
//!   the information (ParticipationType IRCP, the requestor). The client's `network` (BALP requires it:
//!   `agent:client.network` 1..1 in every RESTful profile) is the downstream peer's IP address without its
//!   port, `type` `2` (R4 network-type "IP Address"), as BALP's examples write it
//!   (`2001:0db8:85a3:0000:0000:8a2e:0370:7334`, IP Address); Envoy's peer, which is a proxy in front of it
//!   when there is one.
//! - `meta.profile`: the BALP profile (Create, Read, Update, Delete, Query) of a forwarded request; a
//!   refused one follows the pattern without claiming it (the profiles are of successful interactions).
//! - `source.observer`: this proxy (security-source-type 4, Application Server).
//! - `entity`: for a search, the Query entity (audit-entity-type 2, object-role 24) whose `query` is the
//!   base64 of the query with every value (and every name that is no FHIR search name) replaced by `*`,
//!   and whose `description` is that text; else the data entity (object-role 4) naming only the resource
//!   type. BALP asks for the raw query and the resource's id: both are left out (values and ids can be
//!   PHI, and nothing of the kind goes into a log line here). Never the token, the body or a patient.

use base64::Engine as _;

use crate::audit::Outcome;
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
    /// The downstream peer's IP address ([`ip_of`]).
    pub client_address: Option<&'a str>,
}

/// The IP address of a peer address as Envoy writes it (`127.0.0.1:50102`, `[::1]:50102`, or a bare IP):
/// `None` for anything else (a pipe, an internal listener), which then has no `network`. Only its shape is
/// checked (Envoy writes addresses canonically): IPv4 is four numbers up to 255, IPv6 hex digits and two to
/// seven colons (and dots, for an embedded IPv4). No `std::net` parser: it would add kilobytes to the wasm module.
pub fn ip_of(address: &str) -> Option<String> {
    let v4 = |s: &str| {
        let parts: Vec<&str> = s.split('.').collect();
        parts.len() == 4
            && parts.iter().all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
            && parts.iter().all(|p| p.parse::<u16>().is_ok_and(|n| n <= 255))
    };
    let v6 = |s: &str| {
        s.matches(':').count() >= 2
            && s.len() <= 45
            && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            && s.matches(':').count() <= 7
    };
    let port = |p: &str| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    let ip = if let Some(rest) = address.strip_prefix('[') {
        let (ip, tail) = rest.split_once(']')?;
        tail.strip_prefix(':').filter(|p| port(p))?;
        v6(ip).then_some(ip)?
    } else if v4(address) || v6(address) {
        address
    } else {
        let (ip, p) = address.rsplit_once(':')?;
        (port(p) && v4(ip)).then_some(ip)?
    };
    Some(ip.to_ascii_lowercase())
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
        // An answer withheld by the answer check (the client got this instead of it).
        "answer_withheld" => 403,
        "answer_unreadable_format" => 406,
        "answer_unchecked" => 502,
        _ if outcome == Outcome::Forbidden => 403,
        _ => 400,
    })
}

/// The query with every value replaced by `*`, and every name that is not a FHIR search parameter's as well
/// (in order): no value of a search reaches a log, nor anything a client writes where a name goes
/// (`?John%20Smith`, `?name%3DSmith`). A name is kept when each of its parts (split at `:` and `.`: modifiers,
/// type modifiers, chains, `_has`) is a code of the R4 SearchParameter registry, a result or special
/// parameter of the FHIR search page, a search modifier, or a resource type; else it is written `*`.
pub fn redacted_query(query: &str) -> String {
    let parts: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let name = p.split('=').next().unwrap_or_default();
            if is_search_name(name) {
                format!("{name}=*")
            } else {
                "*=*".to_string()
            }
        })
        .collect();
    parts.join("&")
}

/// Result and special parameters of FHIR R4's search page (and the paging links' own) that the registry does
/// not list, sorted.
const SPECIAL_NAMES: [&str; 22] = [
    "_at",
    "_contained",
    "_containedType",
    "_count",
    "_cursor",
    "_elements",
    "_filter",
    "_format",
    "_getpages",
    "_getpagesoffset",
    "_has",
    "_include",
    "_list",
    "_method",
    "_offset",
    "_pretty",
    "_revinclude",
    "_since",
    "_sort",
    "_summary",
    "_total",
    "_type",
];

/// FHIR R4's search modifiers (and `_include`'s), sorted.
const MODIFIERS: [&str; 14] = [
    "above",
    "below",
    "contains",
    "exact",
    "identifier",
    "in",
    "iterate",
    "missing",
    "not",
    "not-in",
    "of-type",
    "recurse",
    "text",
    "type",
];

/// A query parameter name made only of what FHIR search names are made of (see [`redacted_query`]).
fn is_search_name(name: &str) -> bool {
    !name.is_empty()
        && name.split([':', '.']).all(|part| {
            is_search_code(part)
                || SPECIAL_NAMES.binary_search(&part).is_ok()
                || MODIFIERS.binary_search(&part).is_ok()
                || crate::search_params::RESOURCE_TYPES.binary_search(&part).is_ok()
        })
}

/// Whether `code` is one of the registry's search parameter codes: a binary search over the sorted,
/// `|`-joined [`crate::search_params::SEARCH_CODES`], each probe widened to the entry around it.
pub fn is_search_code(code: &str) -> bool {
    let all = crate::search_params::SEARCH_CODES.as_bytes();
    let code = code.as_bytes();
    if code.is_empty() || code.contains(&b'|') {
        return false;
    }
    // [lo, hi): whole entries; lo starts one, hi ends one (the end of the string or a separator).
    let (mut lo, mut hi) = (0, all.len());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let start = all.get(lo..mid).and_then(|b| b.iter().rposition(|&c| c == b'|')).map_or(lo, |p| lo + p + 1);
        let end = all.get(start..hi).and_then(|b| b.iter().position(|&c| c == b'|')).map_or(hi, |p| start + p);
        match all.get(start..end).map(|entry| entry.cmp(code)) {
            Some(std::cmp::Ordering::Equal) => return true,
            Some(std::cmp::Ordering::Less) => lo = end + 1,
            Some(std::cmp::Ordering::Greater) if start > lo => hi = start - 1,
            _ => return false,
        }
    }
    false
}

// The codings, serialized once.
const REST: &str = r#"{"system":"http://terminology.hl7.org/CodeSystem/audit-event-type","code":"rest","display":"Restful Operation"}"#;
const SOURCE_ROLE: &str =
    r#"{"system":"http://dicom.nema.org/resources/ontology/DCM","code":"110153","display":"Source Role ID"}"#;
const DESTINATION_ROLE: &str =
    r#"{"system":"http://dicom.nema.org/resources/ontology/DCM","code":"110152","display":"Destination Role ID"}"#;
const IRCP: &str = r#"{"system":"http://terminology.hl7.org/CodeSystem/v3-ParticipationType","code":"IRCP","display":"information recipient"}"#;
const SYSTEM_OBJECT: &str =
    r#"{"system":"http://terminology.hl7.org/CodeSystem/audit-entity-type","code":"2","display":"System Object"}"#;
const QUERY_ROLE: &str =
    r#"{"system":"http://terminology.hl7.org/CodeSystem/object-role","code":"24","display":"Query"}"#;
const DOMAIN_RESOURCE_ROLE: &str =
    r#"{"system":"http://terminology.hl7.org/CodeSystem/object-role","code":"4","display":"Domain Resource"}"#;
const APPLICATION_SERVER: &str = r#"{"system":"http://terminology.hl7.org/CodeSystem/security-source-type","code":"4","display":"Application Server"}"#;

/// Appends `value` as a JSON string.
fn push_str(out: &mut String, value: &str) {
    crate::audit::push_json(out, Some(value));
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
        let refused = !matches!(self.outcome, Outcome::Allowed | Outcome::Public);
        let status = status(self.outcome, self.reason).filter(|_| refused);
        let mut out = String::with_capacity(1536);
        out.push_str(r#"{"resourceType":"AuditEvent","#);
        // The BALP profiles are of successful interactions (their `outcome` is 0); a refusal follows the
        // pattern without claiming the profile.
        if let Some(p) = profile.filter(|_| status.is_none()) {
            out.push_str(r#""meta":{"profile":[""#);
            out.push_str(PROFILE_BASE);
            out.push_str(p);
            out.push_str(r#""]},"#);
        }
        out.push_str(r#""type":"#);
        out.push_str(REST);
        out.push_str(r#","subtype":[{"system":"http://hl7.org/fhir/restful-interaction","code":""#);
        out.push_str(subtype);
        out.push_str(r#"","display":""#);
        out.push_str(subtype);
        out.push_str(r#""}],"action":""#);
        out.push_str(action);
        out.push_str(r#"","recorded":""#);
        crate::audit::push_rfc3339(&mut out, self.time_ms);
        out.push_str(r#"","outcome":""#);
        match status {
            None => out.push_str(r#"0","#),
            Some(s) => {
                out.push_str(if s >= 500 { r#"8","outcomeDesc":"# } else { r#"4","outcomeDesc":"# });
                push_str(&mut out, &format!("{s} {}", self.reason.unwrap_or_default()));
                out.push(',');
            }
        }
        // DICOM's roles follow the data: a read's data flows from the server (the source) to the client;
        // a create's, update's, delete's and a query's parameters flow from the client (BALP's Read and
        // Query profiles say so).
        let reads = matches!(interaction, Some(Interaction::Read | Interaction::Vread));
        let (client_role, server_role) =
            if reads { (DESTINATION_ROLE, SOURCE_ROLE) } else { (SOURCE_ROLE, DESTINATION_ROLE) };
        out.push_str(r#""agent":[{"type":{"coding":["#);
        out.push_str(client_role);
        out.push_str(r#"]},"who":"#);
        match (self.client_id, self.issuer) {
            (Some(id), issuer) => {
                out.push_str(r#"{"identifier":{"#);
                if let Some(iss) = issuer {
                    out.push_str(r#""system":"#);
                    push_str(&mut out, iss);
                    out.push(',');
                }
                out.push_str(r#""value":"#);
                push_str(&mut out, id);
                out.push_str("}}");
            }
            (None, _) => out.push_str(r#"{"display":"unauthenticated client"}"#),
        }
        if let Some(address) = self.client_address {
            out.push_str(r#","network":{"address":"#);
            push_str(&mut out, address);
            out.push_str(r#","type":"2"}"#);
        }
        out.push_str(r#","requestor":false},{"type":{"coding":["#);
        out.push_str(server_role);
        out.push_str(r#"]},"who":"#);
        match self.cluster.filter(|_| !refused) {
            Some(cluster) => {
                out.push_str(r#"{"identifier":{"system":"urn:fhir-tenant-router:cluster","value":"#);
                push_str(&mut out, cluster);
                out.push_str("}}");
            }
            None => {
                out.push_str(r#"{"display":""#);
                out.push_str(OBSERVER);
                out.push_str(r#""}"#);
            }
        }
        out.push_str(r#","requestor":false}"#);
        if let Some(tenant) = self.tenant {
            out.push_str(r#",{"type":{"coding":["#);
            out.push_str(IRCP);
            out.push_str(
                r#"]},"who":{"type":"Organization","identifier":{"system":"urn:fhir-tenant-router:tenant","value":"#,
            );
            push_str(&mut out, tenant);
            out.push_str(r#"}},"requestor":true}"#);
        }
        out.push_str(r#"],"source":{"observer":{"display":""#);
        out.push_str(OBSERVER);
        out.push_str(r#""},"type":["#);
        out.push_str(APPLICATION_SERVER);
        out.push_str(r#"]},"entity":[{"#);
        if interaction == Some(Interaction::Search) {
            // A compartment search names its compartment's id (`Patient/123/Observation`): written as `*`.
            let path = self.path.split(['?', '#']).next().unwrap_or_default();
            let query = self.path.split('#').next().unwrap_or_default().split_once('?').map_or("", |(_, q)| q);
            let mut text = String::with_capacity(64);
            text.push_str(self.method);
            text.push(' ');
            let mut segments = path.trim_start_matches('/').split('/');
            match (segments.next(), segments.next(), segments.next(), segments.next()) {
                (Some(compartment), Some(_), Some(rest), None) => {
                    text.push('/');
                    text.push_str(compartment);
                    text.push_str("/*/");
                    text.push_str(rest);
                }
                _ => text.push_str(path),
            }
            if !query.is_empty() {
                text.push('?');
                text.push_str(&redacted_query(query));
            }
            out.push_str(r#""type":"#);
            out.push_str(SYSTEM_OBJECT);
            out.push_str(r#","role":"#);
            out.push_str(QUERY_ROLE);
            out.push_str(r#","description":"#);
            push_str(&mut out, &text);
            out.push_str(r#","query":""#);
            base64::engine::general_purpose::STANDARD.encode_string(text.as_bytes(), &mut out);
            out.push('"');
        } else {
            match classified.as_ref().and_then(|c| c.resource_type) {
                Some(t) => {
                    out.push_str(r#""what":{"type":"#);
                    push_str(&mut out, t);
                    out.push('}');
                }
                None => out.push_str(r#""what":{"display":"not recorded"}"#),
            }
            out.push_str(r#","type":"#);
            out.push_str(SYSTEM_OBJECT);
            out.push_str(r#","role":"#);
            out.push_str(DOMAIN_RESOURCE_ROLE);
        }
        out.push_str("}]}");
        out
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
            client_address: Some("127.0.0.1"),
        };
        serde_json::from_str(&e.to_json()).unwrap()
    }

    #[test]
    fn every_registry_code_is_found_and_nothing_else_is() {
        let codes: Vec<&str> = crate::search_params::SEARCH_CODES.split('|').collect();
        assert!(codes.len() > 400 && codes.windows(2).all(|w| w[0] < w[1]), "sorted, unique");
        for code in &codes {
            assert!(is_search_code(code), "{code}");
            for near in
                [format!("{code}x"), format!("a{code}"), code.to_uppercase(), code[..code.len() - 1].to_string()]
            {
                assert_eq!(is_search_code(&near), codes.contains(&near.as_str()), "{near}");
            }
        }
        for absent in ["", "|", "family|given", "Smith", "smith", "John Smith", "zzzz", "_", "-"] {
            assert!(!is_search_code(absent), "{absent}");
        }
        for list in [&SPECIAL_NAMES[..], &MODIFIERS[..], &crate::search_params::RESOURCE_TYPES[..]] {
            assert!(list.windows(2).all(|w| w[0] < w[1]), "binary_search needs sorted lists");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_string_is_a_code_exactly_when_the_registry_lists_it(s in "[a-z_|-]{0,12}|.{0,12}") {
            let listed = crate::search_params::SEARCH_CODES.split('|').any(|c| c == s);
            proptest::prop_assert_eq!(is_search_code(&s), listed);
        }
    }

    /// The attack on issue 27 (finding 4): a value where a name goes never reaches the Query entity; FHIR's
    /// own names (the registry's, with modifiers, chains, `_has`) are kept.
    #[test]
    fn only_fhir_search_names_are_kept_in_the_query() {
        for (query, kept) in [
            ("John%20Smith", "*=*"),
            ("name%3DSmith", "*=*"),
            ("name=x&Smith", "name=*&*=*"),
            ("smith", "*=*"),
            ("family:exact=Smith&birthdate=ge2000", "family:exact=*&birthdate=*"),
            (
                "subject:Patient.name=Smith&_has:Observation:patient:code=1234",
                "subject:Patient.name=*&_has:Observation:patient:code=*",
            ),
            (
                "_lastUpdated=gt2020&_count=10&_sort=-date&_include:iterate=x",
                "_lastUpdated=*&_count=*&_sort=*&_include:iterate=*",
            ),
            (
                "code:not-in=x&identifier:of-type=y&name:Smith=z&name.Smith=w",
                "code:not-in=*&identifier:of-type=*&*=*&*=*",
            ),
            ("=Smith&&_%6Dethod=DELETE", "*=*&*=*"),
        ] {
            assert_eq!(redacted_query(query), kept, "{query}");
        }
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
    fn the_client_agent_has_the_peer_ip_without_its_port_as_an_ip_address() {
        let v = event("GET", "/Patient/p1", Outcome::Allowed, None);
        assert_eq!(v["agent"][0]["network"], json!({"address": "127.0.0.1", "type": "2"}), "{v}");
        assert_eq!(v["agent"][1]["network"], Value::Null, "the server's is not written: {v}");
        assert_eq!(ip_of("127.0.0.1:50102").as_deref(), Some("127.0.0.1"));
        assert_eq!(ip_of("[::1]:50102").as_deref(), Some("::1"));
        assert_eq!(ip_of("[2001:db8::7]:443").as_deref(), Some("2001:db8::7"));
        assert_eq!(ip_of("10.1.2.3").as_deref(), Some("10.1.2.3"));
        assert_eq!(ip_of("::ffff:10.0.0.1").as_deref(), Some("::ffff:10.0.0.1"));
        for other in [
            "/tmp/envoy.sock",
            "envoy://internal_client_address/",
            "",
            "127.0.0.1:",
            "host:80",
            "1.2.3:80",
            "1.2.3.256:80",
            "[::1]",
            "[::1]:x",
            "[g::1]:80",
            "1.2.3.4:123456",
            "\"1.2.3.4\":80",
        ] {
            assert_eq!(ip_of(other), None, "{other}");
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
            client_address: Some("::1"),
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
                client_address: None,
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

#[cfg(test)]
mod properties {
    use super::*;

    proptest::proptest! {
        #[test]
        fn a_peer_address_gives_its_ip_or_nothing(ip in "[0-9a-f.:]{0,20}", port in "[0-9]{0,6}", v6 in proptest::bool::ANY) {
            let address = if v6 { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") };
            if let Some(found) = ip_of(&address) {
                // What it gives is the address's IP part, or the whole of an unbracketed IPv6 address
                // (`::` then reads as one), and reads as an IP.
                proptest::prop_assert!(found == ip || (!v6 && found == address), "{} from {}", found, address);
                proptest::prop_assert!(found.parse::<std::net::IpAddr>().is_ok() || found.matches(':').count() >= 2);
            }
            let _ = ip_of(&ip);
        }

        #[test]
        fn any_request_gives_valid_json_without_its_query_values(
            method in "(GET|POST|PUT|DELETE|HEAD|[A-Za-z\"\\\\]{0,8})",
            path in "/[A-Za-z0-9/_$*%\"\\\\\u{80}-\u{10ffff}]{0,30}",
            names in proptest::collection::vec("[a-z_:.\"&=%\u{1}-\u{1f}]{0,8}", 0..4),
            client in proptest::option::of(".{0,20}"),
            tenant in proptest::option::of(".{0,20}"),
            refused in proptest::bool::ANY,
        ) {
            // Each value is a marker no name or constant holds.
            let query: Vec<String> = names.iter().enumerate().map(|(i, n)| format!("{n}=QVAL{i}ZZ")).collect();
            let full = format!("{path}?{}", query.join("&"));
            let e = Event {
                time_ms: 0,
                method: &method,
                path: &full,
                outcome: if refused { Outcome::Forbidden } else { Outcome::Allowed },
                reason: refused.then_some("allowlist"),
                tenant: tenant.as_deref(),
                client_id: client.as_deref(),
                issuer: Some("https://idp"),
                cluster: Some("c"),
                client_address: Some("10.0.0.7"),
            };
            let text = e.to_json();
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|err| {
                proptest::test_runner::TestCaseError::fail(format!("{err}: {text}"))
            })?;
            proptest::prop_assert_eq!(&v["resourceType"], "AuditEvent");
            proptest::prop_assert!(!text.contains("QVAL"), "{}", text);
            if let Some(q) = v["entity"][0]["query"].as_str() {
                let raw = base64::engine::general_purpose::STANDARD.decode(q).unwrap_or_default();
                proptest::prop_assert!(!String::from_utf8_lossy(&raw).contains("QVAL"));
            }
        }
    }
}
