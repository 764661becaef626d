//! A request's reach: the resource types a FHIR request (or Bundle entry) can read or search beyond the type
//! its path names, from its path, its query and (for `POST _search`) its form body.
//!
//! FHIR lets one request reach other types in many ways; each is read here from the spec's data (the R4
//! SearchParameter registry, generated into [`crate::search_params`]), never from a hand-typed list:
//! - `_include` (`Source:param[:Target]`, `Source:*`, `*`, with `:iterate`/`:recurse`): the resources the
//!   reference can target are **read** (every target the registry lists, or `Target` alone).
//! - `_revinclude` (`Source:param[:Target]`, `*`): `Source` resources are **read**.
//! - forward chains (`subject.name=`, `subject:Patient.name=`, multi-level): each target of each link is
//!   **searched** (a yes/no oracle on its data).
//! - reverse chains (`_has:Observation:patient:code=`, nested): each named type is **searched**.
//! - `_filter` (whose grammar can chain anywhere): every type is searched (`*`): not parsed.
//! - `_type`: each listed type is searched; `_list`: List is searched.
//! - `_query` (a named query the server defines) and `_contained` (other than `false`): every type is read.
//! - operations: from [`OPERATIONS`]: `$everything`, `$export`, `$graphql`, `$document`, ... read `*`; those
//!   that answer about their own type only (`$validate`, `$meta`, terminology, `$match`, `$lastn`) reach
//!   nothing more; an operation not in the table reads `*`.
//! - conditional create (`If-None-Exist`), update, patch and delete (`PUT|PATCH|DELETE /Type?query`) search
//!   their own type, and their query reaches what a search's would.
//!
//! Parameter names and values are percent-decoded (`+` is a space) as a server decodes them, the special
//! `_` names compared without regard to case; `&` and `;` both separate parameters. Whatever cannot be
//! told (a type name that is not an R4 resource type, a chain through a parameter that is not a reference
//! parameter of its type, a reference without listed targets, a chain deeper than [`MAX_DEPTH`] or costing
//! more than [`MAX_STEPS`] lookups) reaches `*`: it fails closed.
//!
//! A [`Reach`] is plain data (two sets of type names, each possibly `*`), so it can be kept (in a paging
//! cursor) and compared later.

use std::borrow::Cow;
use std::collections::BTreeSet;

use crate::search_params::{Targets, REFERENCE_PARAMS, RESOURCE_TYPES};

/// Deepest chain followed (`a.b.c...` and nested `_has`); deeper reaches `*`.
pub const MAX_DEPTH: usize = 8;

/// Most registry lookups for one request; more reaches `*` (a chain through many-target references grows
/// quickly).
pub const MAX_STEPS: usize = 4096;

/// Resource types: some R4 types, or every one (`*`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct TypeSet {
    all: bool,
    types: BTreeSet<&'static str>,
}

impl TypeSet {
    /// Every type.
    pub fn all() -> Self {
        Self { all: true, types: BTreeSet::new() }
    }

    /// Whether it is every type (`*`).
    pub fn is_all(&self) -> bool {
        self.all
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        !self.all && self.types.is_empty()
    }

    /// The types it names (empty when it is `*`).
    pub fn types(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.types.iter().copied()
    }

    /// Whether it includes `t` (`*` includes every type).
    pub fn contains(&self, t: &str) -> bool {
        self.all || self.types.contains(t)
    }

    /// Adds the type named `name`; a name that is not an R4 resource type makes it `*`.
    pub fn add(&mut self, name: &str) {
        match resource_type(name) {
            Some(t) => self.add_known(t),
            None => self.set_all(),
        }
    }

    fn add_known(&mut self, t: &'static str) {
        if !self.all {
            self.types.insert(t);
        }
    }

    /// Makes it `*`.
    pub fn set_all(&mut self) {
        self.all = true;
        self.types = BTreeSet::new();
    }

    /// Whether every type it holds is in `other`.
    pub fn within(&self, other: &TypeSet) -> bool {
        other.all || (!self.all && self.types.iter().all(|t| other.types.contains(t)))
    }

    /// Its text: `*`, or the type names in order joined by `,` (empty for none).
    pub fn to_text(&self) -> String {
        if self.all {
            return "*".into();
        }
        self.types.iter().copied().collect::<Vec<_>>().join(",")
    }

    /// From [`TypeSet::to_text`]'s text; `None` for a name that is not an R4 resource type.
    pub fn from_text(text: &str) -> Option<Self> {
        if text == "*" {
            return Some(Self::all());
        }
        let mut set = Self::default();
        for name in text.split(',').filter(|n| !n.is_empty()) {
            set.add_known(resource_type(name)?);
        }
        Some(set)
    }
}

/// What a request reaches beyond the interaction its path names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Reach {
    /// Types whose resources its answer can hold (`_include`, `_revinclude`, operations).
    pub read: TypeSet,
    /// Types whose data it filters on (chains, `_has`, `_filter`, `_type`, a conditional interaction).
    pub search: TypeSet,
}

impl Reach {
    /// Whether it reaches nothing beyond its path's type.
    pub fn is_empty(&self) -> bool {
        self.read.is_empty() && self.search.is_empty()
    }

    /// Whether it reaches nothing that `other` does not (a later page's reach within the first search's).
    pub fn within(&self, other: &Reach) -> bool {
        self.read.within(&other.read) && self.search.within(&other.search)
    }

    /// Its text, to keep it (in a paging cursor): `<read>|<search>`, each a [`TypeSet::to_text`].
    pub fn to_text(&self) -> String {
        format!("{}|{}", self.read.to_text(), self.search.to_text())
    }

    /// From [`Reach::to_text`]'s text; `None` if it is not one.
    pub fn from_text(text: &str) -> Option<Self> {
        let (read, search) = text.split_once('|')?;
        Some(Self { read: TypeSet::from_text(read)?, search: TypeSet::from_text(search)? })
    }
}

/// The R4 resource type named `name` (as the registry spells it), if it is one.
pub fn resource_type(name: &str) -> Option<&'static str> {
    RESOURCE_TYPES.binary_search(&name).ok().and_then(|i| RESOURCE_TYPES.get(i).copied())
}

/// The targets of the reference search parameter `code` of `base`, if the registry has it.
pub fn reference_targets(base: &str, code: &str) -> Option<Targets> {
    REFERENCE_PARAMS
        .binary_search_by(|(b, c, _)| (*b, *c).cmp(&(base, code)))
        .ok()
        .and_then(|i| REFERENCE_PARAMS.get(i))
        .map(|(_, _, t)| *t)
}

/// What an extended operation's answer can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperationReach {
    /// Its own type only (or nothing of the store): no more than the operation on its type.
    Own,
    /// Resources of any type: it needs `*`.
    Every,
}

/// The operations this filter knows, by name; any other reaches [`OperationReach::Every`].
pub const OPERATIONS: [(&str, OperationReach); 17] = [
    // Every compartment type of a patient (instance and type level), a bulk export, any query, a document's
    // referenced resources, a message's, a plan's results.
    ("everything", OperationReach::Every),
    ("export", OperationReach::Every),
    ("graphql", OperationReach::Every),
    ("document", OperationReach::Every),
    ("process-message", OperationReach::Every),
    ("apply", OperationReach::Every),
    // Answers about the resource (or code system, value set, concept map) it names, or its own type.
    ("validate", OperationReach::Own),
    ("meta", OperationReach::Own),
    ("meta-add", OperationReach::Own),
    ("meta-delete", OperationReach::Own),
    ("expand", OperationReach::Own),
    ("lookup", OperationReach::Own),
    ("validate-code", OperationReach::Own),
    ("translate", OperationReach::Own),
    ("subsumes", OperationReach::Own),
    ("match", OperationReach::Own),
    ("lastn", OperationReach::Own),
];

/// What the operation named `name` (without its `$`) reaches.
pub fn operation_reach(name: &str) -> OperationReach {
    OPERATIONS.iter().find(|(n, _)| *n == name).map_or(OperationReach::Every, |(_, r)| *r)
}

/// Percent-decodes a query component (`+` is a space), as a server's form decoder does. Invalid escapes
/// stay as they are; bytes that are not UTF-8 become U+FFFD.
pub fn decode(s: &[u8]) -> Cow<'_, str> {
    if !s.iter().any(|b| matches!(b, b'%' | b'+')) {
        return String::from_utf8_lossy(s);
    }
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while let Some(&b) = s.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |j: usize| s.get(j).and_then(|c| (*c as char).to_digit(16));
                if let (Some(h), Some(l)) = (hex(i + 1), hex(i + 2)) {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            _ => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// `s` percent-decoded again, at most twice more, while it still holds an escape.
fn again(s: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(s);
    for _ in 0..2 {
        if !out.contains('%') {
            break;
        }
        let next = decode(out.as_bytes()).into_owned();
        if next == out {
            break;
        }
        out = Cow::Owned(next);
    }
    out
}

/// The decoded (name, value) pairs of a query string or form body (`&` and `;` separate pairs).
pub fn pairs(query: &[u8]) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    query.split(|b| matches!(b, b'&' | b';')).filter(|p| !p.is_empty()).map(|pair| {
        let (name, value) = match pair.iter().position(|b| *b == b'=') {
            Some(i) => (pair.get(..i).unwrap_or_default(), pair.get(i + 1..).unwrap_or_default()),
            None => (pair, &[][..]),
        };
        (decode(name), decode(value))
    })
}

/// The special parameter `name` is (its part before any `:` or `.`, compared without regard to case), or
/// `""` for any other.
fn special(name: &str) -> &'static str {
    const SPECIAL: [&str; 8] = ["_has", "_include", "_revinclude", "_filter", "_type", "_list", "_query", "_contained"];
    if !name.starts_with('_') {
        return "";
    }
    let head = name.split([':', '.']).next().unwrap_or_default();
    SPECIAL.into_iter().find(|s| s.eq_ignore_ascii_case(head)).unwrap_or_default()
}

/// Whether a query (or form) could reach anything: it has a `.` or `:` (chains, `_has`, modifiers), an escape
/// (`%`, `+`: anything may hide behind one), or a `_` followed by the start of a special name. A byte scan that
/// lets a plain search (`name=x&_count=10&_sort=-date`) skip the walk; anything it passes is walked in full.
fn could_reach(query: &[u8]) -> bool {
    const STARTS: [&[u8; 3]; 8] = [b"has", b"inc", b"rev", b"fil", b"typ", b"lis", b"que", b"con"];
    query.iter().enumerate().any(|(i, b)| match b {
        b'.' | b':' | b'%' | b'+' => true,
        b'_' => query.get(i + 1..i + 4).is_some_and(|next| STARTS.iter().any(|s| s.eq_ignore_ascii_case(next))),
        _ => false,
    })
}

/// Computes a reach, one parameter at a time.
struct Walk {
    reach: Reach,
    steps: usize,
}

impl Walk {
    /// Takes a step of the budget; `false` (and the reach is `*`) when it is spent.
    fn step(&mut self) -> bool {
        self.steps += 1;
        if self.steps > MAX_STEPS {
            self.reach.read.set_all();
            self.reach.search.set_all();
            return false;
        }
        true
    }

    /// One parameter of the query or form, as a server may read it: decoded once more while escapes remain
    /// (a server or framework that decodes twice sees more than one that decodes once), the name trimmed.
    fn top(&mut self, base: Option<&'static str>, name: &str, value: &str) {
        let (name, value) = (again(name), again(value));
        self.param(base, name.trim(), &value, 0);
    }

    /// One parameter `name=value` of a search on `base` (`None`: the system level).
    fn param(&mut self, base: Option<&'static str>, name: &str, value: &str, depth: usize) {
        if depth > MAX_DEPTH || !self.step() {
            self.reach.search.set_all();
            return;
        }
        match special(name) {
            "_has" => self.has(name, value, depth),
            "_include" => value.split(',').for_each(|v| self.include(v)),
            "_revinclude" => value.split(',').for_each(|v| self.revinclude(v)),
            "_filter" => self.reach.search.set_all(),
            "_type" => value.split(',').filter(|t| !t.is_empty()).for_each(|t| self.reach.search.add(t.trim())),
            "_list" => self.reach.search.add("List"),
            "_query" => self.reach.read.set_all(),
            "_contained" if !value.eq_ignore_ascii_case("false") => self.reach.read.set_all(),
            _ => self.chain(base, name, value, depth),
        }
    }

    /// `_has:Type:reference:rest` (rest: a parameter of Type, perhaps another `_has`).
    fn has(&mut self, name: &str, value: &str, depth: usize) {
        let mut parts = name.splitn(4, ':');
        let (_, ty, _reference, rest) = (parts.next(), parts.next(), parts.next(), parts.next());
        let (Some(ty), Some(rest)) = (ty, rest) else {
            self.reach.search.set_all();
            return;
        };
        match resource_type(ty) {
            Some(t) => {
                self.reach.search.add_known(t);
                self.param(Some(t), rest, value, depth + 1);
            }
            None => self.reach.search.set_all(),
        }
    }

    /// A plain parameter: a chain (`param[:Type].rest`) searches each type it can go through; a reference
    /// parameter with `:above`/`:below` searches its targets' hierarchy.
    fn chain(&mut self, base: Option<&'static str>, name: &str, value: &str, depth: usize) {
        let (head, rest) = match name.split_once('.') {
            Some((head, rest)) => (head, Some(rest)),
            None => (name, None),
        };
        let (code, modifier) = match head.split_once(':') {
            Some((code, modifier)) => (code, Some(modifier)),
            None => (head, None),
        };
        if rest.is_none() && !matches!(modifier, Some("above" | "below")) {
            return;
        }
        let typed = modifier.filter(|m| m.starts_with(|c: char| c.is_ascii_uppercase()));
        let targets: Vec<&'static str> = match (typed, base.and_then(|b| reference_targets(b, code))) {
            (Some(t), _) => match resource_type(t) {
                Some(t) => vec![t],
                None => return self.reach.search.set_all(),
            },
            (None, Some(Targets::Types(list))) => list.to_vec(),
            (None, Some(Targets::Any) | None) => return self.reach.search.set_all(),
        };
        for t in targets {
            self.reach.search.add_known(t);
            if let Some(rest) = rest {
                if self.reach.search.is_all() {
                    return;
                }
                self.param(Some(t), rest, value, depth + 1);
            }
        }
    }

    /// One `_include` value: `*`, `Source:*`, `Source:param`, `Source:param:Target`.
    fn include(&mut self, value: &str) {
        if !self.step() {
            return;
        }
        let mut parts = value.trim().splitn(3, ':');
        let (source, code, target) = (parts.next(), parts.next(), parts.next());
        match (source.and_then(resource_type), code, target) {
            (Some(_), Some(code), Some(t)) if code != "*" => self.reach.read.add(t),
            (Some(s), Some(code), None) if code != "*" => match reference_targets(s, code) {
                Some(Targets::Types(list)) => list.iter().for_each(|t| self.reach.read.add_known(t)),
                _ => self.reach.read.set_all(),
            },
            _ => self.reach.read.set_all(),
        }
    }

    /// One `_revinclude` value: `*`, or `Source:param[:Target]`: Source's resources.
    fn revinclude(&mut self, value: &str) {
        match value.trim().split(':').next().and_then(resource_type) {
            Some(s) if value.trim() != "*" => self.reach.read.add_known(s),
            _ => self.reach.read.set_all(),
        }
    }
}

/// The reach of a request (or Bundle entry) on `path` (FHIR-relative, with its query), searching type
/// `base` (the classified resource type; `None`: the system level), with `form` (a `POST _search` body) and
/// `if_none_exist` (a conditional create's search) when there are.
pub fn of_request(base: Option<&str>, path: &str, form: Option<&[u8]>, if_none_exist: Option<&str>) -> Reach {
    let mut walk = Walk { reach: Reach::default(), steps: 0 };
    // Everything after the first `?` is the query, a `#` included: a lenient server may read past it.
    let (path_only, query) = match path.split_once('?') {
        Some((p, q)) => (p.split('#').next().unwrap_or_default(), q),
        None => (path.split('#').next().unwrap_or_default(), ""),
    };
    if let Some(op) = path_only.rsplit('/').next().and_then(|s| s.strip_prefix('$')) {
        if operation_reach(op) == OperationReach::Every {
            walk.reach.read.set_all();
        }
    }
    // The header holds a query (`identifier=x`); some clients send `Type?identifier=x`.
    let criteria = if_none_exist.map(|c| c.split_once('?').map_or(c, |(_, q)| q));
    let sources = [Some(query.as_bytes()), form, criteria.map(str::as_bytes)];
    let mut base_type = None;
    for source in sources.into_iter().flatten().filter(|s| could_reach(s)) {
        let base = *base_type.get_or_insert_with(|| base.and_then(resource_type));
        for (name, value) in pairs(source) {
            walk.top(base, &name, &value);
        }
    }
    walk.reach
}

/// The `_count` a search asks for (the largest, if repeated) in its query and form body.
pub fn search_count(path: &str, form: Option<&[u8]>) -> Option<u64> {
    let query = path.split_once('?').map_or("", |(_, q)| q);
    pairs(query.as_bytes())
        .chain(form.into_iter().flat_map(pairs))
        .filter(|(name, _)| name.as_ref() == "_count")
        .filter_map(|(_, value)| value.trim().parse::<u64>().ok())
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy;

    fn reach(base: &str, path: &str) -> Reach {
        of_request(Some(base), path, None, None)
    }

    fn set(types: &[&'static str]) -> TypeSet {
        let mut s = TypeSet::default();
        types.iter().for_each(|t| s.add(t));
        s
    }

    #[test]
    fn the_generated_table_matches_the_r4_registry_on_spot_checks() {
        // From hl7.org/fhir/R4/searchparameter-registry.html (the SearchParameter resources' target lists).
        assert_eq!(
            reference_targets("Observation", "subject"),
            Some(Targets::Types(&["Device", "Group", "Location", "Patient"]))
        );
        assert_eq!(reference_targets("Observation", "patient"), Some(Targets::Types(&["Patient"])));
        assert_eq!(
            reference_targets("Patient", "general-practitioner"),
            Some(Targets::Types(&["Organization", "Practitioner", "PractitionerRole"]))
        );
        assert_eq!(reference_targets("Encounter", "service-provider"), Some(Targets::Types(&["Organization"])));
        assert_eq!(reference_targets("MedicationRequest", "medication"), Some(Targets::Types(&["Medication"])));
        assert_eq!(reference_targets("Patient", "link"), Some(Targets::Types(&["Patient", "RelatedPerson"])));
        assert_eq!(reference_targets("RequestGroup", "instantiates-canonical"), Some(Targets::Any));
        assert!(matches!(reference_targets("Provenance", "target"), Some(Targets::Types(t)) if t.len() == 145));
        assert_eq!(reference_targets("Patient", "name"), None, "a string parameter is not a reference");
        assert_eq!(reference_targets("Observation", "Subject"), None, "codes are case-sensitive");
        assert_eq!(RESOURCE_TYPES.len(), 147);
        assert!(RESOURCE_TYPES.windows(2).all(|w| w[0] < w[1]), "sorted, for binary search");
        assert!(REFERENCE_PARAMS.windows(2).all(|w| (w[0].0, w[0].1) < (w[1].0, w[1].1)), "sorted, no duplicate");
        assert_eq!(resource_type("Observation"), Some("Observation"));
        assert_eq!(resource_type("observation"), None);
        assert_eq!(resource_type("Foo"), None);
        assert!(crate::search_params::SOURCE.contains("4.5.2"));
    }

    #[test]
    fn a_plain_search_reaches_nothing_more() {
        for path in [
            "/Patient",
            "/Patient?name=smith&_count=5&_sort=-_lastUpdated",
            "/Patient?_id=1,2&_lastUpdated=gt2020&_summary=count&_elements=name",
            "/Observation?subject=Patient/1&subject:Patient=1&code:text=x&subject:missing=true",
            "/Observation?subject:identifier=urn:x|1",
            "/Patient/1",
        ] {
            assert!(reach("Patient", path).is_empty(), "{path}");
        }
    }

    #[test]
    fn includes_read_every_target_of_the_reference() {
        let r = reach("Observation", "/Observation?_include=Observation:subject");
        assert_eq!(r.read, set(&["Device", "Group", "Location", "Patient"]));
        assert!(r.search.is_empty());
        let r = reach("Observation", "/Observation?_include=Observation:subject:Patient");
        assert_eq!(r.read, set(&["Patient"]));
        for spelling in [
            "/Observation?_include:iterate=Observation:patient",
            "/Observation?_include:recurse=Observation:patient",
            "/Observation?%5Finclude=Observation%3Apatient",
            "/Observation?_INCLUDE=Observation:patient",
            "/Observation?_include=Observation:patient&_include=Observation:patient",
            "/Observation?a=1;_include=Observation:patient",
            "/Observation?%255Finclude=Observation%253Apatient",
            "/Observation?_include%20=Observation:patient",
            "/Observation?a=1#&_include=Observation:patient",
        ] {
            assert_eq!(reach("Observation", spelling).read, set(&["Patient"]), "{spelling}");
        }
        for wildcard in [
            "/Observation?_include=*",
            "/Observation?_include=Observation:*",
            "/Observation?_include=Observation:nosuch",
            "/Observation?_include=Observation:subject:NotAType",
            "/Observation?_include=Nope:subject",
            "/Observation?_include=",
            "/Observation?_revinclude=*",
            "/Observation?_include=%2A",
        ] {
            assert!(reach("Observation", wildcard).read.is_all(), "{wildcard}");
        }
        let r = reach("Patient", "/Patient?_revinclude=Provenance:target&_revinclude:iterate=Observation:patient");
        assert_eq!(r.read, set(&["Observation", "Provenance"]));
        let r = reach("Patient", "/Patient?_include=Patient:general-practitioner");
        assert_eq!(r.read, set(&["Organization", "Practitioner", "PractitionerRole"]));
    }

    #[test]
    fn chains_search_every_type_they_pass_through() {
        let r = reach("Observation", "/Observation?subject.name=peter");
        assert_eq!(r.search, set(&["Device", "Group", "Location", "Patient"]));
        assert!(r.read.is_empty());
        assert_eq!(reach("Observation", "/Observation?subject:Patient.name=peter").search, set(&["Patient"]));
        assert_eq!(
            reach("Observation", "/Observation?patient.general-practitioner:Organization.name=x").search,
            set(&["Organization", "Patient"])
        );
        assert_eq!(reach("Observation", "/Observation?patient%2Ename=x").search, set(&["Patient"]), "encoded dot");
        assert_eq!(
            reach("Encounter", "/Encounter?patient.organization.partof.name=x").search,
            set(&["Organization", "Patient"])
        );
        for wildcard in [
            "/Observation?code.x=1",
            "/Observation?subject:Nope.name=x",
            "/Observation?nosuch.name=x",
            "/RequestGroup?instantiates-canonical.name=x",
            "/Observation?_filter=subject.name eq x",
            "/Observation?_FILTER=name eq x",
        ] {
            assert!(reach("Observation", wildcard).search.is_all(), "{wildcard}");
        }
        // A chain deeper than the limit, or through too many many-target references, reaches everything.
        let deep = format!("/Patient?{}name=x", "link:Patient.".repeat(MAX_DEPTH + 1));
        assert!(reach("Patient", &deep).search.is_all());
        assert_eq!(reach("Patient", "/Patient?link:Patient.link:Patient.name=x").search, set(&["Patient"]));
        let wide = format!("/Provenance?{}name=x", "target.".repeat(4));
        assert!(reach("Provenance", &wide).search.is_all());
    }

    #[test]
    fn reverse_chains_search_each_type_named() {
        let r = reach("Patient", "/Patient?_has:Observation:patient:code=1234-5");
        assert_eq!(r.search, set(&["Observation"]));
        let r = reach("Patient", "/Patient?_has:Observation:patient:_has:AuditEvent:entity:agent=x");
        assert_eq!(r.search, set(&["AuditEvent", "Observation"]));
        let r = reach("Patient", "/Patient?_has:Observation:patient:performer:Practitioner.name=x");
        assert_eq!(r.search, set(&["Observation", "Practitioner"]));
        assert_eq!(reach("Patient", "/Patient?%5Fhas%3AEncounter%3Apatient%3Astatus=x").search, set(&["Encounter"]));
        for wildcard in ["/Patient?_has:observation:patient:code=1", "/Patient?_has:Observation", "/Patient?_has=x"] {
            assert!(reach("Patient", wildcard).search.is_all(), "{wildcard}");
        }
    }

    #[test]
    fn operations_type_list_and_named_queries() {
        for every in [
            "/Patient/1/$everything",
            "/Patient/$everything",
            "/Patient/$export",
            "/Group/1/$export?_type=Patient",
            "/Patient/$graphql?query=x",
            "/Composition/1/$document",
            "/Patient/$nosuch",
        ] {
            assert!(reach("Patient", every).read.is_all(), "{every}");
        }
        for own in ["/Patient/$validate", "/Patient/1/$meta", "/ValueSet/$expand?url=x", "/Patient/$match"] {
            assert!(reach("Patient", own).is_empty(), "{own}");
        }
        assert_eq!(reach("Observation", "/Observation/$lastn?patient.name=x").search, set(&["Patient"]));
        assert_eq!(
            of_request(None, "/?_type=Patient,Observation", None, None).search,
            set(&["Observation", "Patient"])
        );
        assert!(of_request(None, "/?_type=Patient,nope", None, None).search.is_all());
        assert_eq!(reach("Patient", "/Patient?_list=42").search, set(&["List"]));
        assert!(reach("Patient", "/Patient?_query=mine").read.is_all());
        assert!(reach("Patient", "/Patient?_contained=true").read.is_all());
        assert!(reach("Patient", "/Patient?_contained=false").is_empty());
    }

    #[test]
    fn a_form_body_and_a_conditional_create_reach_what_their_query_would() {
        let r = of_request(
            Some("Observation"),
            "/Observation/_search",
            Some(b"_include=Observation%3Apatient&code=x"),
            None,
        );
        assert_eq!(r.read, set(&["Patient"]));
        let r = of_request(
            Some("Observation"),
            "/Observation/_search?_has:Provenance:target:agent=x",
            Some(b"subject:Group.name=y"),
            None,
        );
        assert_eq!(r.search, set(&["Group", "Provenance"]));
        let r = of_request(Some("Patient"), "/Patient", None, Some("_has:Observation:patient:code=1"));
        assert_eq!(r.search, set(&["Observation"]));
        let r = of_request(Some("Patient"), "/Patient", None, Some("Patient?general-practitioner.name=x"));
        assert_eq!(r.search, set(&["Organization", "Practitioner", "PractitionerRole"]));
    }

    #[test]
    fn count_is_read_from_the_query_and_the_form() {
        assert_eq!(search_count("/Patient?_count=10", None), Some(10));
        assert_eq!(search_count("/Patient/_search", Some(b"name=x&_count=500")), Some(500));
        assert_eq!(search_count("/Patient?_count=10&_count=30", Some(b"_count=20")), Some(30));
        assert_eq!(search_count("/Patient?_count=x", None), None);
        assert_eq!(search_count("/Patient?%5Fcount=70", None), Some(70));
    }

    #[test]
    fn decoding_is_a_form_decoder_s() {
        assert_eq!(decode(b"a%3Ab+c"), "a:b c");
        assert_eq!(decode(b"%zz%4"), "%zz%4");
        assert_eq!(decode(b"%FF"), "\u{FFFD}");
        let p: Vec<(String, String)> = pairs(b"a=1&&b&c=%3D=").map(|(n, v)| (n.into(), v.into())).collect();
        assert_eq!(p, [("a".into(), "1".into()), ("b".into(), "".into()), ("c".into(), "==".into())]);
    }

    #[test]
    fn a_reach_is_plain_data_that_keeps_as_text() {
        let r = reach("Patient", "/Patient?_revinclude=Observation:patient&_has:Encounter:patient:status=x");
        assert_eq!(r.to_text(), "Observation|Encounter");
        assert_eq!(Reach::from_text(&r.to_text()), Some(r.clone()));
        let all = reach("Patient", "/Patient?_include=*&organization.name=x");
        assert_eq!(all.to_text(), "*|Organization");
        assert_eq!(Reach::from_text("|"), Some(Reach::default()));
        for bad in ["", "Observation", "Nope|", "patient|", "Observation|*|x"] {
            assert_eq!(Reach::from_text(bad), None, "{bad}");
        }
        assert!(!r.within(&all) && Reach::default().within(&r) && r.within(&r));
        assert!(Reach::from_text("*|*").is_some_and(|wide| r.within(&wide) && all.within(&wide)));
    }

    proptest::proptest! {
        #[test]
        fn the_byte_scan_skips_only_queries_that_reach_nothing(
            params in proptest::collection::vec((
                proptest::prop_oneof![
                    proptest::sample::select(vec![
                        "_include", "_REVINCLUDE", "_has", "_Filter", "_type", "_list", "_query", "_contained",
                        "_count", "_sort", "name", "organization", "_id", "_include:iterate",
                    ]).prop_map(String::from),
                    "[_a-zA-Z]{1,12}",
                ],
                "[-a-zA-Z0-9_*|:.%+ ]{0,12}",
            ), 0..5)
        ) {
            let q: String = params.iter().map(|(n, v)| format!("{n}={v}&")).collect();
            let mut walk = Walk { reach: Reach::default(), steps: 0 };
            for (name, value) in pairs(q.as_bytes()) {
                walk.top(Some("Patient"), &name, &value);
            }
            if !could_reach(q.as_bytes()) {
                proptest::prop_assert!(walk.reach.is_empty(), "{} reaches {:?}", q, walk.reach);
            }
        }

        #[test]
        fn a_reach_keeps_as_text(path in "/Patient\\?[_a-z:.A-Z=&*%0-9]{0,60}") {
            let r = reach("Patient", &path);
            proptest::prop_assert_eq!(Reach::from_text(&r.to_text()), Some(r));
        }

        #[test]
        fn arbitrary_queries_never_panic(path in "\\PC{0,120}", form in proptest::collection::vec(proptest::num::u8::ANY, 0..120)) {
            let _ = of_request(Some("Patient"), &path, Some(&form), Some(&path));
            let _ = of_request(None, &path, None, None);
            let _ = search_count(&path, Some(&form));
        }
    }
}

/// Generated requests whose expected reach comes from the registry's data (the generated table read
/// directly, as a list of facts), not from the walk above: an `_include` of `Source:code` reads every target
/// the registry lists for it, a chain through `code` searches each, `_revinclude` of `Source:code` reads
/// Source, `_has:Source:code:...` searches Source, in any spelling and in any place a search can be.
#[cfg(test)]
mod oracle {
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    use proptest::prelude::*;
    use serde_json::json;

    use crate::fhir::{Classified, Interaction, Judge, Policy};
    use crate::search_params::{Targets, REFERENCE_PARAMS, RESOURCE_TYPES};

    #[derive(Clone, Debug)]
    enum Clause {
        Include { param: usize, typed: Option<usize> },
        Revinclude { param: usize },
        Chain { param: usize, typed: Option<usize> },
        Has { param: usize },
    }

    fn clause() -> impl Strategy<Value = Clause> {
        let n = REFERENCE_PARAMS.len();
        prop_oneof![
            (0..n, proptest::option::of(0..200usize)).prop_map(|(param, typed)| Clause::Include { param, typed }),
            (0..n).prop_map(|param| Clause::Revinclude { param }),
            (0..n, proptest::option::of(0..200usize)).prop_map(|(param, typed)| Clause::Chain { param, typed }),
            (0..n).prop_map(|param| Clause::Has { param }),
        ]
    }

    /// `s` with the characters whose bit is set in `mask` percent-encoded (and `_name` upper-cased, if asked).
    fn spell(s: &str, mask: u64) -> String {
        s.chars()
            .enumerate()
            .map(|(i, c)| if mask >> (i % 64) & 1 == 1 { format!("%{:02X}", c as u32) } else { c.to_string() })
            .collect()
    }

    type Seen = BTreeSet<(Interaction, Option<String>)>;

    /// One clause's parameter, and what the registry says it reaches (None: every type).
    fn render(c: &Clause, base: &str, upper: bool, mask: u64) -> (String, Seen) {
        let special = |name: &str| if upper { name.to_ascii_uppercase() } else { name.to_string() };
        let (source, code, targets) = match c {
            Clause::Include { param, .. } | Clause::Revinclude { param } | Clause::Has { param } => {
                REFERENCE_PARAMS[*param]
            }
            Clause::Chain { param, .. } => {
                // A chain starts at the search's base: the base's reference parameters only.
                let own: Vec<_> = REFERENCE_PARAMS.iter().filter(|(b, _, _)| *b == base).collect();
                *own[*param % own.len()]
            }
        };
        let types = |targets: Targets, typed: Option<usize>, i: Interaction| -> (Seen, Option<String>) {
            match (targets, typed) {
                (Targets::Types(list), Some(k)) => {
                    let t = list[k % list.len()];
                    ([(i, Some(t.to_string()))].into(), Some(t.to_string()))
                }
                (Targets::Types(list), None) => (list.iter().map(|t| (i, Some(t.to_string()))).collect(), None),
                (Targets::Any, _) => ([(i, None)].into(), None),
            }
        };
        match c {
            Clause::Include { typed, .. } => {
                let (seen, t) = types(targets, *typed, Interaction::Read);
                let value = match t {
                    Some(t) => format!("{source}:{code}:{t}"),
                    None => format!("{source}:{code}"),
                };
                (format!("{}={}", spell(&special("_include"), mask), spell(&value, mask >> 7)), seen)
            }
            Clause::Revinclude { .. } => {
                let value = format!("{source}:{code}");
                let name = spell(&special("_revinclude"), mask);
                (format!("{name}={}", spell(&value, mask >> 3)), [(Interaction::Read, Some(source.to_string()))].into())
            }
            Clause::Chain { typed, .. } => {
                let (seen, t) = types(targets, *typed, Interaction::Search);
                let name = match t {
                    Some(t) => format!("{code}:{t}._id"),
                    None => format!("{code}._id"),
                };
                (format!("{}=1", spell(&name, mask)), seen)
            }
            Clause::Has { .. } => {
                let name = format!("{}:{source}:{code}:_id", special("_has"));
                (format!("{}=x", spell(&name, mask)), [(Interaction::Search, Some(source.to_string()))].into())
            }
        }
    }

    /// Merges reached types as a set of grants: `*` for an interaction stands for every type.
    fn normalise(seen: Seen) -> Seen {
        let all: BTreeSet<Interaction> = seen.iter().filter(|(_, t)| t.is_none()).map(|(i, _)| *i).collect();
        seen.into_iter().filter(|(i, t)| t.is_none() || !all.contains(i)).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn the_reach_judged_is_what_the_registry_says(
            base in 0..RESOURCE_TYPES.len(),
            clauses in proptest::collection::vec(clause(), 1..4),
            place in 0..5usize,
            upper in any::<bool>(),
            masks in proptest::collection::vec(any::<u64>().prop_map(|m| m & 0x0f0f_0f0f_0f0f_0f0f), 4),
            filler in any::<bool>(),
        ) {
            // Chains need the base to have reference parameters: use the first clause's source then.
            let base = match &clauses[0] {
                Clause::Include { param, .. } | Clause::Revinclude { param } | Clause::Has { param }
                | Clause::Chain { param, .. } => if clauses.iter().any(|c| matches!(c, Clause::Chain { .. })) {
                    REFERENCE_PARAMS[*param].0
                } else {
                    RESOURCE_TYPES[base]
                },
            };
            let mut parts = Vec::new();
            let mut expected: Seen = BTreeSet::new();
            for (i, c) in clauses.iter().enumerate() {
                let (text, seen) = render(c, base, upper, masks[i % masks.len()]);
                parts.push(text);
                expected.extend(seen);
            }
            if filler {
                parts.insert(0, "name=x&_count=3".into());
                parts.push(parts[1].clone());
            }
            let query = parts.join("&");
            let create = matches!(place, 2 | 4);
            expected.insert((Interaction::Search, Some(base.to_string())));
            if create {
                expected.insert((Interaction::Create, Some(base.to_string())));
            }
            let expected = normalise(expected);
            let seen = RefCell::new(Seen::new());
            let also = |_: &str, c: &Classified<'_>| {
                seen.borrow_mut().insert((c.interaction, c.resource_type.map(str::to_string)));
                Ok(())
            };
            let every = ["read", "search", "create"].map(String::from);
            let policy = Policy::new(&every, None).unwrap();
            let judge = Judge { narrowed: true, ..Judge::default() };
            let verdict = match place {
                0 => policy.check_request_with("GET", &format!("/{base}?{query}"), &judge, &also).map(|_| ()),
                1 => {
                    let j = Judge { form: Some(query.as_bytes()), ..judge };
                    policy.check_request_with("POST", &format!("/{base}/_search"), &j, &also).map(|_| ())
                }
                2 => {
                    let j = Judge { if_none_exist: Some(&query), ..judge };
                    policy.check_request_with("POST", &format!("/{base}"), &j, &also).map(|_| ())
                }
                3 | 4 => {
                    let request = if place == 3 {
                        json!({"method": "GET", "url": format!("{base}?{query}")})
                    } else {
                        json!({"method": "POST", "url": base, "ifNoneExist": query})
                    };
                    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [{"request": request}]});
                    policy.check_bundle_with(bundle.to_string().as_bytes(), None, true, &also)
                }
                _ => unreachable!(),
            };
            prop_assert!(verdict.is_ok(), "{:?}", verdict);
            let seen = normalise(seen.into_inner());
            // Sound: every (interaction, type) the registry says it reaches is judged (or `*` for it).
            for (i, t) in &expected {
                prop_assert!(seen.contains(&(*i, t.clone())) || seen.contains(&(*i, None)), "{:?} {:?} not judged: {} in place {}", i, t, query, place);
            }
            // And exact, unless the request is so large that the walk gave up (and judged `*`).
            if expected.len() * 3 < super::MAX_STEPS {
                prop_assert_eq!(seen, expected, "{} in place {}", query, place);
            }
        }
    }
}
