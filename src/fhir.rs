//! The FHIR REST API as the allowlist sees it: which interaction a request is, on which resource type, and
//! whether a tenant's policy allows it. A `batch` or `transaction` Bundle is judged entry by entry.

use std::collections::BTreeSet;
use std::fmt;

use serde_json::Value;

/// A FHIR RESTful interaction (the names of the FHIR `TypeRestfulInteraction` / `SystemRestfulInteraction`
/// value sets, with `search` covering search-type and search-system, GET and `POST _search`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Interaction {
    Read,
    Vread,
    Search,
    History,
    Create,
    Update,
    Patch,
    Delete,
    /// An extended operation (`$name`).
    Operation,
    /// `POST /` with a Bundle: judged by its entries, never allowed as such.
    Batch,
}

impl Interaction {
    /// Parses a configured name.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "read" => Self::Read,
            "vread" => Self::Vread,
            "search" => Self::Search,
            "history" => Self::History,
            "create" => Self::Create,
            "update" => Self::Update,
            "patch" => Self::Patch,
            "delete" => Self::Delete,
            "operation" => Self::Operation,
            _ => return None,
        })
    }

    /// Its configured name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Vread => "vread",
            Self::Search => "search",
            Self::History => "history",
            Self::Create => "create",
            Self::Update => "update",
            Self::Patch => "patch",
            Self::Delete => "delete",
            Self::Operation => "operation",
            Self::Batch => "batch",
        }
    }

    /// The read-only default.
    pub const READ_ONLY: [Interaction; 4] = [Self::Read, Self::Vread, Self::Search, Self::History];
}

impl fmt::Display for Interaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One classified request (or Bundle entry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Classified<'a> {
    pub interaction: Interaction,
    /// The resource type, when the URL names one.
    pub resource_type: Option<&'a str>,
    /// Whether the URL names one resource (`Patient/1/_history` is an instance's history, `Patient/_history`
    /// the type's): SMART v2 grants the one with `r`, the other with `s`.
    pub instance: bool,
    /// A conditional update, patch or delete (`PUT|PATCH|DELETE /Type?criteria`): also a search on its type.
    pub conditional: bool,
}

fn is_resource_type(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase()) && chars.all(|c| c.is_ascii_alphanumeric())
}

/// Classifies `method` on a FHIR-relative `path` (the part after the base, with or without a query). `None`
/// for anything that is not a FHIR REST interaction.
/// `HEAD` is classified (and judged) as `GET`: FHIR allows it wherever GET is allowed.
pub fn classify<'a>(method: &str, path: &'a str) -> Option<Classified<'a>> {
    let method = if method == "HEAD" { "GET" } else { method };
    let (path, criteria) = match path.split('#').next().unwrap_or_default().split_once('?') {
        Some((path, query)) => (path, !query.is_empty()),
        None => (path.split('#').next().unwrap_or_default(), false),
    };
    // At most four segments name an interaction (`Patient/1/_history/2`); no allocation on the hot path.
    let mut parts = [""; 4];
    let mut count = 0;
    for part in path.trim_start_matches('/').split('/') {
        // No FHIR type, id, version, `_history`, `_search` or `$operation` holds a `%`; a server decodes an
        // escape before routing (`%24everything` is `$everything`): a path with one is no interaction we judge.
        if part.contains('%') {
            return None;
        }
        *parts.get_mut(count)? = part;
        count += 1;
    }
    let segments = parts.get(..count)?;
    let seg = |i: usize| segments.get(i).copied();
    let is_op = |s: Option<&str>| s.is_some_and(|s| s.starts_with('$'));
    let (interaction, resource_type) = match (method, segments) {
        ("GET", [""]) => (Interaction::Search, None),
        ("GET", ["_history"]) => (Interaction::History, None),
        ("POST", [""]) => (Interaction::Batch, None),
        ("POST", ["_search"]) => (Interaction::Search, None),
        ("GET" | "POST", [op]) if is_op(Some(*op)) => (Interaction::Operation, None),
        (_, [t, ..]) if !is_resource_type(t) => return None,
        ("GET", [_]) => (Interaction::Search, seg(0)),
        ("POST", [_]) => (Interaction::Create, seg(0)),
        // Conditional update, patch and delete: the query names the resource(s).
        ("PUT", [_]) if criteria => (Interaction::Update, seg(0)),
        ("PATCH", [_]) if criteria => (Interaction::Patch, seg(0)),
        ("DELETE", [_]) if criteria => (Interaction::Delete, seg(0)),
        ("POST", [_, "_search"]) => (Interaction::Search, seg(0)),
        ("GET" | "POST", [_, op]) if is_op(Some(*op)) => (Interaction::Operation, seg(0)),
        ("GET", [_, "_history"]) => (Interaction::History, seg(0)),
        ("GET", [_, id]) if !id.is_empty() => (Interaction::Read, seg(0)),
        ("PUT", [_, id]) if !id.is_empty() => (Interaction::Update, seg(0)),
        ("PATCH", [_, id]) if !id.is_empty() => (Interaction::Patch, seg(0)),
        ("DELETE", [_, id]) if !id.is_empty() => (Interaction::Delete, seg(0)),
        ("GET" | "POST", [_, _, op]) if is_op(Some(*op)) => (Interaction::Operation, seg(0)),
        ("GET", [_, _, "_history"]) => (Interaction::History, seg(0)),
        ("GET", [_, _, "_history", v]) if !v.is_empty() => (Interaction::Vread, seg(0)),
        // Compartment search: Patient/123/Observation
        ("GET", [_, _, t]) if is_resource_type(t) => (Interaction::Search, seg(2)),
        // Every type of a compartment (`Patient/1/*`): a search that names no one type.
        ("GET", [_, _, "*"]) => (Interaction::Search, None),
        _ => return None,
    };
    let conditional = criteria && matches!(segments, [_]) && matches!(method, "PUT" | "PATCH" | "DELETE");
    // `Type/id...`: the second segment is an id (`_search`, `_history` and `$op` are not).
    let instance = matches!(segments, [_, id, ..] if !id.starts_with(['_', '$']) && resource_type == seg(0));
    Some(Classified { interaction, resource_type, instance, conditional })
}

/// A tenant's allowlist. Small and allocation-free by default, since every tenant has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// One bit per [`Interaction`].
    interactions: u16,
    /// `None`: every resource type.
    resource_types: Option<BTreeSet<String>>,
}

fn bit(i: Interaction) -> u16 {
    1 << (i as u16)
}

impl Default for Policy {
    /// Read-only, every resource type.
    fn default() -> Self {
        Self { interactions: Interaction::READ_ONLY.iter().fold(0, |acc, i| acc | bit(*i)), resource_types: None }
    }
}

/// Why a request is refused by the allowlist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a FHIR REST interaction this filter can classify.
    Unrecognised,
    /// The interaction or the resource type is not allowed; `entry` is the Bundle entry index, if any;
    /// `reached`: the request reaches the type beyond its path (see [`crate::reach`]; `None`: every type).
    NotAllowed { interaction: Interaction, resource_type: Option<String>, entry: Option<usize>, reached: bool },
    /// The allowlist allows it, but the token's SMART scopes do not grant it: `scope` is the scope it needs
    /// (for `WWW-Authenticate`'s `scope`); `entry` is the Bundle entry index, if any; `reached` as above.
    MissingScope {
        scope: String,
        interaction: Interaction,
        resource_type: Option<String>,
        entry: Option<usize>,
        reached: bool,
    },
    /// The request carries method override headers (`X-HTTP-Method-Override`, `X-HTTP-Method`,
    /// `X-Method-Override`) that disagree, or name no HTTP method FHIR uses.
    BadMethodOverride,
    /// A `POST _search` form body this filter cannot read as the server would (content-encoded, or in a
    /// charset other than UTF-8, US-ASCII or ISO-8859-1), for a request whose reach is judged.
    OpaqueForm,
    /// A Bundle entry that is not a well-formed request.
    BadEntry { entry: usize },
    /// The body of `POST /` is not a batch or transaction Bundle.
    NotABundle,
    /// A Bundle entry whose `request.url` is absolute and not under `base` (this server's public base URL;
    /// `None`: none is configured, so no absolute url can be told to be ours).
    OtherOrigin { entry: usize, base: Option<String> },
}

impl Refusal {
    /// The token's scopes do not grant `c` (Bundle entry `entry`, if any): `scope` is the one it needs.
    fn missing_scope(scope: String, c: &Classified<'_>, entry: Option<usize>, reached: bool) -> Self {
        Refusal::MissingScope {
            scope,
            interaction: c.interaction,
            resource_type: c.resource_type.map(str::to_string),
            entry,
            reached,
        }
    }

    /// The same refusal, for a type the request reaches beyond its path.
    fn reached(self) -> Self {
        match self {
            Self::NotAllowed { interaction, resource_type, entry, .. } => {
                Self::NotAllowed { interaction, resource_type, entry, reached: true }
            }
            Self::MissingScope { scope, interaction, resource_type, entry, .. } => {
                Self::MissingScope { scope, interaction, resource_type, entry, reached: true }
            }
            other => other,
        }
    }

    fn not_allowed(c: &Classified<'_>, entry: Option<usize>, reached: bool) -> Self {
        Refusal::NotAllowed {
            interaction: c.interaction,
            resource_type: c.resource_type.map(str::to_string),
            entry,
            reached,
        }
    }
}

/// The words for what a refused request reaches beyond its path.
const REACHED: &str = "this request reaches it through _include, _revinclude, a chained or _has parameter, \
                       _filter, _type, a conditional interaction's or reference's search or an operation";
impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unrecognised => f.write_str("This request is not a FHIR interaction this server allows."),
            Self::NotAllowed { interaction, resource_type, entry, reached } => {
                if let Some(i) = entry {
                    write!(f, "Bundle entry {i}: ")?;
                }
                match (resource_type, reached) {
                    (Some(t), false) => {
                        write!(f, "the {interaction} interaction on {t} is not allowed for this tenant.")
                    }
                    (None, false) => write!(f, "the {interaction} interaction is not allowed for this tenant."),
                    (Some(t), true) => {
                        write!(f, "the {interaction} interaction on {t} is not allowed for this tenant ({REACHED}).")
                    }
                    (None, true) => write!(
                        f,
                        "the {interaction} interaction on every resource type is not allowed for this tenant \
                         ({REACHED})."
                    ),
                }
            }
            Self::MissingScope { scope, interaction, resource_type, entry, reached } => {
                if let Some(i) = entry {
                    write!(f, "Bundle entry {i}: ")?;
                }
                match (resource_type, reached) {
                    (Some(t), _) => {
                        write!(f, "the access token's scopes do not grant the {interaction} interaction on {t}")?
                    }
                    (None, false) => {
                        write!(f, "the access token's scopes do not grant the system-level {interaction} interaction")?
                    }
                    (None, true) => write!(
                        f,
                        "the access token's scopes do not grant the {interaction} interaction on every resource type"
                    )?,
                }
                if *reached {
                    write!(f, " ({REACHED})")?;
                }
                write!(f, " (it needs the scope {scope}).")
            }
            Self::OpaqueForm => f.write_str(
                "A POST _search form body must be sent without Content-Encoding, in UTF-8: its parameters are \
                 judged before it goes on.",
            ),
            Self::BadMethodOverride => f.write_str(
                "The method override headers (X-HTTP-Method-Override, X-HTTP-Method, X-Method-Override) \
                 disagree or name no FHIR method.",
            ),
            Self::BadEntry { entry } => write!(f, "Bundle entry {entry} has no valid request method and url."),
            Self::NotABundle => f.write_str("POST to the base must carry a batch or transaction Bundle."),
            Self::OtherOrigin { entry, base: Some(base) } => write!(
                f,
                "Bundle entry {entry}: request.url is an absolute URL outside this server's base {base}; \
                 entries may only name this server (a URL under {base}, or one relative to it such as Patient/1)."
            ),
            Self::OtherOrigin { entry, base: None } => write!(
                f,
                "Bundle entry {entry}: request.url is an absolute URL; this server takes entry URLs relative to \
                 its base (such as Patient/1)."
            ),
        }
    }
}

impl Policy {
    /// A policy from configured names; the error names the unknown interaction.
    pub fn new(interactions: &[String], resource_types: Option<&[String]>) -> Result<Self, String> {
        let mut bits = 0;
        for name in interactions {
            bits |= bit(Interaction::parse(name).ok_or_else(|| format!("unknown interaction `{name}`"))?);
        }
        let resource_types = match resource_types {
            None => None,
            Some(list) if list.iter().any(|t| t == "*") => None,
            Some(list) => {
                if let Some(bad) = list.iter().find(|t| !is_resource_type(t)) {
                    return Err(format!("`{bad}` is not a FHIR resource type name"));
                }
                Some(list.iter().cloned().collect())
            }
        };
        Ok(Self { interactions: bits, resource_types })
    }

    /// The allowlist's resource types; `None`: every type.
    pub fn resource_types(&self) -> Option<&BTreeSet<String>> {
        self.resource_types.as_ref()
    }

    fn allows(&self, c: &Classified<'_>) -> bool {
        self.interactions & bit(c.interaction) != 0
            && match (&self.resource_types, c.resource_type) {
                (None, _) => true,
                (Some(types), Some(t)) => types.contains(t),
                // System-level search/history/operations name no type: allowed only without a type list.
                (Some(_), None) => false,
            }
    }

    /// Whether it limits the resource types (and so must judge what a request reaches).
    pub fn limits_types(&self) -> bool {
        self.resource_types.is_some()
    }

    /// Judges a request line. `Ok(true)`: allowed, but the body must be judged too (`POST /`).
    pub fn check_request(&self, method: &str, path: &str) -> Result<bool, Refusal> {
        let judged = self.check_request_with(method, path, &Judge::default(), &|_, _| Ok(()))?;
        Ok(judged == Body::Bundle)
    }

    /// Judges a request line, and a request the allowlist allows must pass `also` too (the token's SMART
    /// scopes: `also(method, c)` is `Err(scope)`, the scope it needs, to refuse it). With `judge.narrowed`
    /// what the request reaches beyond its path ([`crate::reach`]) is judged the same way, each type it
    /// reads or searches; a conditional interaction is a search on its type too, always. Says which body
    /// the request has that could still refuse it: a Bundle posted to the base is judged entry by entry
    /// ([`Policy::check_bundle_with`]); a `POST _search` form body (when `judge.form` is not given) adds
    /// to what it reaches.
    pub fn check_request_with(
        &self,
        method: &str,
        path: &str,
        judge: &Judge<'_>,
        also: &dyn Fn(&str, &Classified<'_>) -> Result<(), String>,
    ) -> Result<Body, Refusal> {
        let c = classify(method, path).ok_or(Refusal::Unrecognised)?;
        if c.interaction == Interaction::Batch {
            return Ok(Body::Bundle);
        }
        let method = if method == "HEAD" { "GET" } else { method };
        self.judge(method, path, &c, judge, None, also)?;
        let post_search = method == "POST" && c.interaction == Interaction::Search;
        Ok(if post_search && judge.form.is_none() { Body::SearchForm } else { Body::None })
    }

    /// Judges one classified request or Bundle entry: its interaction, and what it reaches.
    fn judge(
        &self,
        method: &str,
        path: &str,
        c: &Classified<'_>,
        judge: &Judge<'_>,
        entry: Option<usize>,
        also: &dyn Fn(&str, &Classified<'_>) -> Result<(), String>,
    ) -> Result<(), Refusal> {
        if !self.allows(c) {
            return Err(Refusal::not_allowed(c, entry, false));
        }
        also(method, c).map_err(|scope| Refusal::missing_scope(scope, c, entry, false))?;
        let if_none_exist = judge.if_none_exist.filter(|_| c.interaction == Interaction::Create);
        let one = |interaction: Interaction, resource_type: Option<&str>| -> Result<(), Refusal> {
            let r = Classified { interaction, resource_type, instance: false, conditional: false };
            if !self.allows(&r) {
                return Err(Refusal::not_allowed(&r, entry, true));
            }
            also("GET", &r).map_err(|scope| Refusal::missing_scope(scope, &r, entry, true))
        };
        if c.conditional || if_none_exist.is_some() {
            one(Interaction::Search, c.resource_type)?;
        }
        if !judge.narrowed {
            return Ok(());
        }
        let reach = crate::reach::of_request(c.resource_type, path, judge.form, if_none_exist);
        for (set, interaction) in [(&reach.read, Interaction::Read), (&reach.search, Interaction::Search)] {
            if set.is_all() {
                one(interaction, None)?;
            }
            for t in set.types() {
                one(interaction, Some(t))?;
            }
        }
        Ok(())
    }

    /// Judges the Bundle posted to the base, entry by entry; the first refused entry refuses the whole.
    /// `base` is this server's public base URL (`public_base_url`): an entry's absolute `request.url` under
    /// it is judged as the URL relative to it (FHIR allows either form); any other absolute URL is refused.
    pub fn check_bundle(&self, body: &[u8], base: Option<&str>) -> Result<(), Refusal> {
        self.check_bundle_with(body, base, false, &|_, _| Ok(()))
    }

    /// [`Policy::check_bundle`], and each entry the allowlist allows must pass `also` too (as for
    /// [`Policy::check_request_with`]); with `narrowed`, what each entry reaches is judged too (from its
    /// url and its `request.ifNoneExist`).
    pub fn check_bundle_with(
        &self,
        body: &[u8],
        base: Option<&str>,
        narrowed: bool,
        also: &dyn Fn(&str, &Classified<'_>) -> Result<(), String>,
    ) -> Result<(), Refusal> {
        let bundle: Value = serde_json::from_slice(body).map_err(|_| Refusal::NotABundle)?;
        let is_bundle = bundle.get("resourceType").and_then(Value::as_str) == Some("Bundle")
            && matches!(bundle.get("type").and_then(Value::as_str), Some("batch" | "transaction"));
        if !is_bundle {
            return Err(Refusal::NotABundle);
        }
        let entries = match bundle.get("entry") {
            None => return Ok(()),
            Some(Value::Array(entries)) => entries,
            Some(_) => return Err(Refusal::NotABundle),
        };
        for (i, entry) in entries.iter().enumerate() {
            let request = entry.get("request");
            let method = request.and_then(|r| r.get("method")).and_then(Value::as_str);
            let url = request.and_then(|r| r.get("url")).and_then(Value::as_str);
            let (Some(method), Some(url)) = (method, url) else {
                return Err(Refusal::BadEntry { entry: i });
            };
            let if_none_exist = match request.and_then(|r| r.get("ifNoneExist")) {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.as_str()),
                Some(_) => return Err(Refusal::BadEntry { entry: i }),
            };
            // Entry URLs are relative to the base ("Patient/1", "Patient?name=x"), or absolute under it.
            let url = if is_absolute(url) {
                strip_base(url, base)
                    .ok_or_else(|| Refusal::OtherOrigin { entry: i, base: base.map(str::to_string) })?
            } else {
                url
            };
            let relative = if url.starts_with('/') { url.to_string() } else { format!("/{url}") };
            let c = classify(method, &relative).ok_or(Refusal::BadEntry { entry: i })?;
            if c.interaction == Interaction::Batch {
                return Err(Refusal::not_allowed(&c, Some(i), false));
            }
            let method = if method == "HEAD" { "GET" } else { method };
            let judge = Judge { narrowed, form: None, if_none_exist };
            self.judge(method, &relative, &c, &judge, Some(i), also)?;
            if narrowed {
                // A conditional reference in the entry's resource (`"reference": "Patient?identifier=x"`) is
                // resolved by the server with a search: judged as one, with what its criteria reach.
                let mut searches = Vec::new();
                conditional_references(entry.get("resource"), base, &mut searches, 0);
                for search in searches {
                    let c = classify("GET", &search).ok_or(Refusal::BadEntry { entry: i })?;
                    let judge = Judge { narrowed, form: None, if_none_exist: None };
                    self.judge("GET", &search, &c, &judge, Some(i), also).map_err(Refusal::reached)?;
                }
            }
        }
        Ok(())
    }
}

/// The conditional references (`Type?criteria`, relative or under `base`) anywhere in `value`, as the paths of
/// the searches that resolve them (`/Type?criteria`). A `reference` that is not such a search (an id, a
/// fragment, another server's URL) is left alone.
fn conditional_references(value: Option<&Value>, base: Option<&str>, out: &mut Vec<String>, depth: usize) {
    // serde_json refuses documents nested deeper than 128; this bound only keeps the walk obviously finite.
    if depth > 256 {
        return;
    }
    match value {
        Some(Value::Object(map)) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("reference", Value::String(r)) if r.contains('?') => {
                        let r = if is_absolute(r) { strip_base(r, base) } else { Some(r.as_str()) };
                        if let Some(r) = r.map(|r| r.trim_start_matches('/')) {
                            if r.split('?').next().is_some_and(|t| !t.contains('/')) {
                                out.push(format!("/{r}"));
                            }
                        }
                    }
                    _ => conditional_references(Some(v), base, out, depth + 1),
                }
            }
        }
        Some(Value::Array(items)) => {
            items.iter().for_each(|v| conditional_references(Some(v), base, out, depth + 1));
        }
        _ => {}
    }
}

/// What judging a request reads besides its method and path.
#[derive(Clone, Copy, Debug, Default)]
pub struct Judge<'a> {
    /// Judge what the request reaches beyond its path (the token is narrowed by SMART scopes, or the tenant
    /// lists resource types); otherwise only its path's interaction is judged, at no extra cost.
    pub narrowed: bool,
    /// The form body of a `POST _search`, once it is read.
    pub form: Option<&'a [u8]>,
    /// A conditional create's `If-None-Exist` header.
    pub if_none_exist: Option<&'a str>,
}

/// The body a request still needs judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// None.
    None,
    /// A batch or transaction Bundle posted to the base: judged entry by entry.
    Bundle,
    /// A `POST _search` form body: its parameters reach types as the query's do (and its `_count` costs).
    SearchForm,
}

/// Whether `url` is absolute (RFC 3986: a scheme, `scheme:`) or a network-path reference (`//host/...`):
/// either names a server, not a path under the base.
fn is_absolute(url: &str) -> bool {
    if url.starts_with("//") {
        return true;
    }
    let Some((scheme, _)) = url.split_once(':') else { return false };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// `url` relative to `base` (`""` for the base itself), if `url` is under it: scheme and authority
/// compared without regard to case (RFC 3986 §6.2.2.1), the path exactly, ending at a segment boundary.
pub(crate) fn strip_base<'u>(url: &'u str, base: Option<&str>) -> Option<&'u str> {
    fn origin_len(u: &str) -> Option<usize> {
        let start = u.find("://")? + 3;
        Some(u.get(start..)?.find(['/', '?', '#']).map_or(u.len(), |j| start + j))
    }
    let base = base?;
    let (b_origin, b_path) = base.split_at_checked(origin_len(base)?)?;
    let (u_origin, u_rest) = url.split_at_checked(origin_len(url)?)?;
    if !u_origin.eq_ignore_ascii_case(b_origin) {
        return None;
    }
    let rest = u_rest.strip_prefix(b_path.trim_end_matches('/'))?;
    (rest.is_empty() || rest.starts_with(['/', '?', '#'])).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn c(method: &str, path: &str) -> Option<(Interaction, Option<String>)> {
        classify(method, path).map(|c| (c.interaction, c.resource_type.map(str::to_string)))
    }

    #[test]
    fn requests_classify_as_fhir_interactions() {
        use Interaction::*;
        let p = |s: &str| Some(s.to_string());
        assert_eq!(c("GET", "/Patient/123"), Some((Read, p("Patient"))));
        assert_eq!(c("GET", "/Patient?family=smith&_count=5"), Some((Search, p("Patient"))));
        assert_eq!(c("POST", "/Patient/_search"), Some((Search, p("Patient"))));
        assert_eq!(c("GET", "/Patient/1/_history/2"), Some((Vread, p("Patient"))));
        assert_eq!(c("GET", "/Patient/1/_history"), Some((History, p("Patient"))));
        assert_eq!(c("GET", "/Patient/1/Observation"), Some((Search, p("Observation"))));
        assert_eq!(c("POST", "/Patient"), Some((Create, p("Patient"))));
        assert_eq!(c("PUT", "/Patient/1"), Some((Update, p("Patient"))));
        assert_eq!(c("DELETE", "/Patient/1"), Some((Delete, p("Patient"))));
        assert_eq!(c("PATCH", "/Patient/1"), Some((Patch, p("Patient"))));
        assert_eq!(c("POST", "/Patient/$everything"), Some((Operation, p("Patient"))));
        assert_eq!(c("GET", "/Patient/1/$everything"), Some((Operation, p("Patient"))));
        assert_eq!(c("POST", "/"), Some((Batch, None)));
        assert_eq!(c("GET", "/?_type=Patient"), Some((Search, None)));
        assert_eq!(c("GET", "/patient/1"), None);
        assert_eq!(c("GET", "/Patient/1/x/y/z"), None);
        assert_eq!(c("TRACE", "/Patient/1"), None);
        // An escape in a segment: the server decodes it before routing (`/Patient/%24export` is `$export`, not
        // a read of the Patient `%24export`), and no FHIR id or name holds one. Found by tests/oracle.
        for path in [
            "/Patient/%24export",
            "/Patient/%24everything",
            "/Patient/1/%24everything",
            "/%24export",
            "/Patient/%5Fhistory",
            "/Patient/1/%2A",
            "/Patient%2F1",
            "/Patient/1/_history/%32",
        ] {
            for method in ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"] {
                assert_eq!(c(method, path), None, "{method} {path}");
            }
        }
        // The query is not the path: escapes there are the reach's to decode.
        assert_eq!(c("GET", "/Patient?name=%24x"), Some((Search, p("Patient"))));
        let instance = |m: &str, p: &str| classify(m, p).unwrap().instance;
        assert!(
            instance("GET", "/Patient/1/_history") && instance("GET", "/Patient/1") && instance("PUT", "/Patient/1")
        );
        assert!(!instance("GET", "/Patient/_history") && !instance("POST", "/Patient/_search"));
        assert!(!instance("GET", "/Patient/1/Observation") && !instance("GET", "/Patient/$everything"));
        assert!(!instance("GET", "/_history") && !instance("GET", "/Patient"));
    }

    #[test]
    fn head_is_get_and_conditional_interactions_classify_as_what_they_change() {
        use Interaction::*;
        let p = |s: &str| Some(s.to_string());
        assert_eq!(c("HEAD", "/Patient/1"), Some((Read, p("Patient"))));
        assert_eq!(c("HEAD", "/Patient?name=x"), Some((Search, p("Patient"))));
        assert_eq!(c("PUT", "/Patient?identifier=x|1"), Some((Update, p("Patient"))));
        assert_eq!(c("PATCH", "/Patient?identifier=x|1"), Some((Patch, p("Patient"))));
        assert_eq!(c("DELETE", "/Patient?identifier=x|1"), Some((Delete, p("Patient"))));
        assert!(classify("DELETE", "/Patient?identifier=x").unwrap().conditional);
        assert!(!classify("DELETE", "/Patient/1?x=1").unwrap().conditional);
        // Without criteria there is nothing to name the resource: not an interaction.
        for (m, path) in [("PUT", "/Patient"), ("DELETE", "/Patient?"), ("PATCH", "/Patient#x")] {
            assert_eq!(c(m, path), None, "{m} {path}");
        }
        // Every type of a compartment names no one type: the system level's rules.
        assert_eq!(c("GET", "/Patient/1/*"), Some((Search, None)));
    }

    #[test]
    fn with_resource_types_what_a_request_reaches_is_judged_too() {
        let p = Policy::new(&["read".into(), "search".into(), "operation".into()], Some(&["Patient".into()])).unwrap();
        let narrowed = Judge { narrowed: p.limits_types(), ..Judge::default() };
        let check = |path: &str| p.check_request_with("GET", path, &narrowed, &|_, _| Ok(()));
        assert_eq!(check("/Patient?name=x&_count=5"), Ok(Body::None));
        assert_eq!(check("/Patient?_include=Patient:link:Patient"), Ok(Body::None));
        for (path, t) in [
            ("/Patient?_revinclude=Observation:patient", Some("Observation")),
            ("/Patient?_has:Observation:patient:code=1", Some("Observation")),
            ("/Patient?general-practitioner.name=x", Some("Organization")),
            ("/Patient?_include=*", None),
            ("/Patient?_filter=name eq x", None),
            ("/Patient/1/$everything", None),
        ] {
            let refusal = check(path).unwrap_err();
            assert!(
                matches!(&refusal, Refusal::NotAllowed { resource_type, reached: true, .. } if resource_type.as_deref() == t),
                "{path}: {refusal:?}"
            );
            assert!(refusal.to_string().contains("this request reaches it"), "{refusal}");
        }
        // A form body adds to the URL's reach; without it, a POST _search says its form is still to judge.
        let post = |form: Option<&[u8]>| {
            p.check_request_with("POST", "/Patient/_search", &Judge { form, ..narrowed }, &|_, _| Ok(()))
        };
        assert_eq!(post(None), Ok(Body::SearchForm));
        assert_eq!(post(Some(b"name=x")), Ok(Body::None));
        assert!(post(Some(b"_revinclude=Observation%3Apatient")).is_err());
        // Without narrowing nothing more is judged (the hot path).
        let open = Policy::default();
        assert_eq!(
            open.check_request_with("GET", "/Patient?_include=*", &Judge::default(), &|_, _| Ok(())),
            Ok(Body::None)
        );
    }

    #[test]
    fn a_conditional_interaction_is_a_search_on_its_type_too() {
        let p = Policy::new(&["update".into(), "create".into(), "delete".into()], None).unwrap();
        let j = Judge::default();
        let refusal = p.check_request_with("PUT", "/Patient?identifier=x", &j, &|_, _| Ok(())).unwrap_err();
        assert!(matches!(refusal, Refusal::NotAllowed { interaction: Interaction::Search, reached: true, .. }));
        assert_eq!(p.check_request_with("PUT", "/Patient/1", &j, &|_, _| Ok(())), Ok(Body::None));
        let j = Judge { if_none_exist: Some("identifier=x"), ..j };
        assert!(p.check_request_with("POST", "/Patient", &j, &|_, _| Ok(())).is_err(), "If-None-Exist searches");
        let all = Policy::new(&["update".into(), "search".into(), "create".into()], None).unwrap();
        assert_eq!(all.check_request_with("PUT", "/Patient?identifier=x", &j, &|_, _| Ok(())), Ok(Body::None));
        assert_eq!(all.check_request_with("POST", "/Patient", &j, &|_, _| Ok(())), Ok(Body::None));
        // The scopes judge the search as well (it needs `s` on the type).
        let also = |_: &str, c: &Classified<'_>| match c.interaction {
            Interaction::Search => Err("system/Patient.s".to_string()),
            _ => Ok(()),
        };
        let refusal = all.check_request_with("DELETE", "/Patient?identifier=x", &j, &also);
        assert!(matches!(refusal, Err(Refusal::NotAllowed { interaction: Interaction::Delete, .. })));
        let refusal = all.check_request_with("PUT", "/Patient?identifier=x", &j, &also).unwrap_err();
        assert!(matches!(&refusal, Refusal::MissingScope { scope, reached: true, .. } if scope == "system/Patient.s"));
    }

    #[test]
    fn bundle_entries_are_judged_by_their_reach_and_if_none_exist() {
        let interactions = ["read", "search", "create", "operation"].map(String::from);
        let p = Policy::new(&interactions, Some(&["Patient".into()])).unwrap();
        let entry = |request: serde_json::Value| {
            json!({"resourceType": "Bundle", "type": "batch", "entry": [
                {"request": {"method": "GET", "url": "Patient/1"}}, {"request": request}
            ]})
            .to_string()
            .into_bytes()
        };
        let ok = |r: serde_json::Value| p.check_bundle_with(&entry(r), None, true, &|_, _| Ok(()));
        assert_eq!(ok(json!({"method": "GET", "url": "Patient?name=x"})), Ok(()));
        assert_eq!(ok(json!({"method": "HEAD", "url": "Patient/1"})), Ok(()));
        for bad in [
            json!({"method": "GET", "url": "Patient?_revinclude=Observation:patient"}),
            json!({"method": "GET", "url": "Patient?_has:Observation:patient:code=x"}),
            json!({"method": "GET", "url": "Patient?%5Finclude=Patient%3Ageneral-practitioner"}),
            json!({"method": "POST", "url": "Patient", "ifNoneExist": "general-practitioner.name=x"}),
            json!({"method": "GET", "url": "Patient/1/$everything"}),
        ] {
            assert!(matches!(ok(bad.clone()), Err(Refusal::NotAllowed { entry: Some(1), reached: true, .. })), "{bad}");
        }
        assert_eq!(
            ok(json!({"method": "POST", "url": "Patient", "ifNoneExist": 7})),
            Err(Refusal::BadEntry { entry: 1 })
        );
        // A conditional reference in an entry's resource is a search the server runs.
        let with_resource = |resource: serde_json::Value| {
            let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
                {"request": {"method": "POST", "url": "Patient"}, "resource": resource}
            ]});
            p.check_bundle_with(
                bundle.to_string().as_bytes(),
                Some("https://fhir.example.org/r4"),
                true,
                &|_, _| Ok(()),
            )
        };
        let link = |reference: &str| json!({"resourceType": "Patient", "link": [{"other": {"reference": reference}}]});
        assert_eq!(with_resource(link("Patient?identifier=x")), Ok(()));
        assert_eq!(with_resource(link("Patient/1")), Ok(()));
        assert_eq!(with_resource(link("https://other.example.org/Observation?code=1")), Ok(()), "another server's");
        for bad in [
            "RelatedPerson?identifier=x",
            "Patient?_has:Observation:patient:code=1",
            "https://fhir.example.org/r4/RelatedPerson?identifier=x",
        ] {
            let refusal = with_resource(link(bad));
            assert!(
                matches!(refusal, Err(Refusal::NotAllowed { entry: Some(0), reached: true, .. })),
                "{bad}: {refusal:?}"
            );
        }
    }

    #[test]
    fn the_default_is_read_only() {
        let p = Policy::default();
        assert_eq!(p.check_request("GET", "/Patient/1"), Ok(false));
        assert_eq!(p.check_request("POST", "/Patient/_search"), Ok(false));
        assert_eq!(p.check_request("GET", "/Observation?patient=1&category=vital-signs"), Ok(false));
        assert_eq!(p.check_request("POST", "/"), Ok(true));
        for (m, path) in
            [("POST", "/Patient"), ("PUT", "/Patient/1"), ("DELETE", "/Patient/1"), ("GET", "/Patient/1/$x")]
        {
            assert!(matches!(p.check_request(m, path), Err(Refusal::NotAllowed { .. })), "{m} {path}");
        }
    }

    #[test]
    fn resource_types_can_be_limited() {
        let p = Policy::new(&["read".into(), "search".into()], Some(&["Patient".into()])).unwrap();
        assert_eq!(p.check_request("GET", "/Patient/1"), Ok(false));
        assert!(p.check_request("GET", "/Observation").is_err());
        assert!(p.check_request("GET", "/?_type=Observation").is_err(), "system search names no type");
        assert!(Policy::new(&["reed".into()], None).unwrap_err().contains("reed"));
        assert!(Policy::new(&["read".into()], Some(&["patient".into()])).is_err());
    }

    #[test]
    fn a_batch_of_reads_passes_and_one_write_refuses_it_naming_the_entry() {
        let p = Policy::default();
        let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": "Patient/1"}},
            {"request": {"method": "GET", "url": "Observation?patient=1&category=vital-signs"}},
            {"request": {"method": "POST", "url": "Patient/_search"}}
        ]});
        assert_eq!(p.check_bundle(batch.to_string().as_bytes(), None), Ok(()));
        let mut bad = batch.clone();
        bad["entry"].as_array_mut().unwrap().push(json!({"request": {"method": "DELETE", "url": "Patient/1"}}));
        let refusal = p.check_bundle(bad.to_string().as_bytes(), None).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::NotAllowed {
                interaction: Interaction::Delete,
                resource_type: Some("Patient".into()),
                entry: Some(3),
                reached: false
            }
        );
        assert!(refusal.to_string().contains("entry 3"));
    }

    #[test]
    fn odd_bundles_are_refused() {
        let p = Policy::default();
        for body in [
            json!({"resourceType": "Patient"}).to_string(),
            json!({"resourceType": "Bundle", "type": "searchset"}).to_string(),
            json!({"resourceType": "Bundle", "type": "batch", "entry": {}}).to_string(),
            "not json".to_string(),
        ] {
            assert_eq!(p.check_bundle(body.as_bytes(), None), Err(Refusal::NotABundle), "{body}");
        }
        let nested =
            json!({"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "POST", "url": "/"}}]});
        assert!(matches!(
            p.check_bundle(nested.to_string().as_bytes(), None),
            Err(Refusal::NotAllowed { entry: Some(0), .. })
        ));
        let no_url = json!({"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET"}}]});
        assert_eq!(p.check_bundle(no_url.to_string().as_bytes(), None), Err(Refusal::BadEntry { entry: 0 }));
    }

    fn batch_of(url: &str, method: &str) -> Vec<u8> {
        json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": "Patient/1"}},
            {"request": {"method": method, "url": url}}
        ]})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn an_absolute_entry_url_under_the_public_base_is_judged_as_the_relative_one() {
        let p = Policy::default();
        let base = Some("https://fhir.example.org/r4");
        for url in [
            "https://fhir.example.org/r4/Patient/1",
            "HTTPS://FHIR.example.ORG/r4/Observation?patient=1",
            "https://fhir.example.org/r4/Patient/1/_history/2",
        ] {
            assert_eq!(p.check_bundle(&batch_of(url, "GET"), base), Ok(()), "{url}");
        }
        let refusal = p.check_bundle(&batch_of("https://fhir.example.org/r4/Patient/1", "DELETE"), base);
        assert!(matches!(refusal, Err(Refusal::NotAllowed { interaction: Interaction::Delete, entry: Some(1), .. })));
        let nested = p.check_bundle(&batch_of("https://fhir.example.org/r4", "POST"), base);
        assert!(matches!(nested, Err(Refusal::NotAllowed { interaction: Interaction::Batch, .. })), "{nested:?}");
        let root = Some("https://fhir.example.org");
        assert_eq!(p.check_bundle(&batch_of("https://fhir.example.org/Patient/1", "GET"), root), Ok(()));
    }

    #[test]
    fn an_absolute_entry_url_elsewhere_is_refused_saying_so() {
        let p = Policy::default();
        let base = Some("https://fhir.example.org/r4");
        for url in [
            "https://other.example.org/r4/Patient/1",
            "https://fhir.example.org/r5/Patient/1",
            "https://fhir.example.org/r4x/Patient/1",
            "https://fhir.example.org.evil/r4/Patient/1",
            "http://fhir.example.org/r4/Patient/1",
            "//fhir.example.org/r4/Patient/1",
            "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
        ] {
            let refusal = p.check_bundle(&batch_of(url, "GET"), base).unwrap_err();
            assert_eq!(refusal, Refusal::OtherOrigin { entry: 1, base: base.map(str::to_string) }, "{url}");
            let text = refusal.to_string();
            assert!(
                text.contains("entry 1") && text.contains("outside this server's base https://fhir.example.org/r4")
            );
        }
        // Without a configured public base no absolute URL can be told to be ours.
        let refusal = p.check_bundle(&batch_of("https://fhir.example.org/r4/Patient/1", "GET"), None).unwrap_err();
        assert_eq!(refusal, Refusal::OtherOrigin { entry: 1, base: None });
        assert!(refusal.to_string().contains("relative to its base"), "{refusal}");
        // Relative URLs with a colon after the first segment are not absolute.
        assert_eq!(p.check_bundle(&batch_of("Observation?date=2024-01-01T10:00", "GET"), None), Ok(()));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_paths_and_bundles_never_panic(m in "[A-Z]{0,7}", path in "\\PC{0,80}", body in "\\PC{0,200}") {
            let _ = Policy::default().check_request(&m, &path);
            let _ = Policy::default().check_bundle(body.as_bytes(), None);
            let _ = Policy::default().check_bundle(body.as_bytes(), Some("https://fhir.example.org/r4"));
        }
    }
}
