//! Paging cursors: the upstream's paging links (`Bundle.link` `self`, `next`, `previous`, `first`, `last`)
//! rewritten into opaque, signed cursors bound to the tenant, the client and the original search, so that
//! a client pages through its own search only, judged as that search was.
//!
//! HAPI-style servers page with links that name no type (`<base>?_getpages=<id>&_getpagesoffset=20`), out of
//! a paging cache that one server may share between tenants (partitions) and clients. As such a link names
//! no type, a narrowed token could not follow it; and a client holding another's paging id could read that
//! search. With cursors on, the client sees `<public base>/?_cursor=<cursor>` instead, and:
//! - a cursor is `BASE64URL(payload) "." BASE64URL(HMAC-SHA256(key, payload))`; the payload is the JSON
//!   array `[1, expiry (s since the epoch), tenant id, client id or null, method, original path, upstream
//!   path]`: the original search (method and path relative to the base, query included) and the link it
//!   stands for (relative to the base). It is signed, not encrypted: it tells its client only what that
//!   client asked and the server answered.
//! - a request `GET /?_cursor=<cursor>` (nothing else in its query) is verified (signature, expiry, version);
//!   its token must name the cursor's tenant and client; it is then judged *as the original search was*
//!   (allowlist, scopes) with the token it comes with, and sent upstream as the link's path.
//! - a request with `_getpages` in its query is refused: paging goes through cursors only.
//! - only links under `public_base_url` (where the tenant's links are, after `links_base_url` rewriting,
//!   or as the upstream built them from `X-Forwarded-*`) become cursors; a link to any other origin is left
//!   as it is (the filter would not send a cursor there).
//!
//! The key is configured (`paging_cursors.key`, from the VM's environment or a file), never made per
//! process: in the proxy-wasm build every worker has its own VM, and a cursor minted by one must verify on
//! the others (and on other Envoys behind the same load balancer).

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// The query parameter that carries a cursor.
pub const PARAM: &str = "_cursor";
/// HAPI's paging parameter: refused on a request when cursors are on.
const RAW_PAGING: &str = "_getpages";
/// The payload's version.
const VERSION: u64 = 1;
/// The longest cursor minted or read, in characters (a link beyond it is left as it is).
pub const MAX_CURSOR_CHARS: usize = 6 * 1024;
/// The shortest key, in bytes.
pub const MIN_KEY_BYTES: usize = 32;
/// Default and greatest lifetime of a cursor, seconds.
pub const DEFAULT_TTL_S: u64 = 3600;
pub const MAX_TTL_S: u64 = 86_400;

/// The link relations that become cursors.
const RELATIONS: [&str; 6] = ["self", "next", "previous", "prev", "first", "last"];

/// The compiled `paging_cursors` setting.
#[derive(Clone, PartialEq, Eq)]
pub struct Paging {
    key: Vec<u8>,
    pub ttl_s: u64,
}

impl fmt::Debug for Paging {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Paging").field("key", &"(not shown)").field("ttl_s", &self.ttl_s).finish()
    }
}

impl Paging {
    /// `None` if the key is shorter than [`MIN_KEY_BYTES`] or the lifetime is 0 or beyond [`MAX_TTL_S`].
    pub fn new(key: &[u8], ttl_s: u64) -> Option<Self> {
        (key.len() >= MIN_KEY_BYTES && (1..=MAX_TTL_S).contains(&ttl_s)).then(|| Self { key: key.to_vec(), ttl_s })
    }

    fn mac(&self, payload: &[u8]) -> Option<Hmac<Sha256>> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).ok()?;
        mac.update(payload);
        Some(mac)
    }
}

/// What a cursor stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub expires_s: u64,
    pub tenant: String,
    pub client: Option<String>,
    /// The original search: its method and path (relative to the base, with its query).
    pub method: String,
    pub path: String,
    /// The upstream's link, relative to the base: the `:path` the request is sent with.
    pub upstream_path: String,
}

/// Why a cursor request is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CursorError {
    /// Not a cursor this filter signed (tampered, truncated, another key), or a cursor request with more
    /// in it than the cursor.
    Invalid,
    /// Signed here, but expired.
    Expired,
    /// A request with HAPI's `_getpages`: paging goes through cursors.
    RawPaging,
    /// Signed here for another tenant or client.
    NotYours,
}

impl CursorError {
    /// Status, `OperationOutcome` issue code and text.
    pub fn answer(self) -> (u32, &'static str, &'static str) {
        match self {
            Self::Invalid => (400, "invalid", "This paging cursor is not valid here."),
            Self::Expired => (400, "invalid", "This paging cursor has expired: run the search again."),
            Self::RawPaging => (
                400,
                "not-supported",
                "Paging links of this server are cursors: follow the links of the answer (_cursor), not _getpages.",
            ),
            Self::NotYours => (403, "forbidden", "This paging cursor was issued to another client."),
        }
    }

    /// The audit line's reason.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Invalid => "cursor_invalid",
            Self::Expired => "cursor_expired",
            Self::RawPaging => "raw_paging",
            Self::NotYours => "cursor_not_yours",
        }
    }
}

/// Mints the cursor for `cursor`.
pub fn mint(paging: &Paging, cursor: &Cursor) -> Option<String> {
    let payload = serde_json::to_vec(&serde_json::json!([
        VERSION,
        cursor.expires_s,
        cursor.tenant,
        cursor.client,
        cursor.method,
        cursor.path,
        cursor.upstream_path
    ]))
    .ok()?;
    let tag = paging.mac(&payload)?.finalize().into_bytes();
    let token = format!("{}.{}", URL_SAFE_NO_PAD.encode(&payload), URL_SAFE_NO_PAD.encode(tag));
    (token.len() <= MAX_CURSOR_CHARS).then_some(token)
}

/// Reads and verifies a cursor at `now_s` (signature first: nothing of an unsigned payload is looked at).
pub fn open(paging: &Paging, token: &str, now_s: u64) -> Result<Cursor, CursorError> {
    if token.len() > MAX_CURSOR_CHARS {
        return Err(CursorError::Invalid);
    }
    let (payload, tag) = token.split_once('.').ok_or(CursorError::Invalid)?;
    let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| CursorError::Invalid)?;
    let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| CursorError::Invalid)?;
    paging.mac(&payload).ok_or(CursorError::Invalid)?.verify_slice(&tag).map_err(|_| CursorError::Invalid)?;
    let fields: Vec<Value> = serde_json::from_slice(&payload).map_err(|_| CursorError::Invalid)?;
    let text = |i: usize| fields.get(i).and_then(Value::as_str).map(str::to_string).ok_or(CursorError::Invalid);
    let (Some(VERSION), Some(expires_s), 7) =
        (fields.first().and_then(Value::as_u64), fields.get(1).and_then(Value::as_u64), fields.len())
    else {
        return Err(CursorError::Invalid);
    };
    let client = match fields.get(3) {
        Some(Value::Null) => None,
        Some(Value::String(c)) => Some(c.clone()),
        _ => return Err(CursorError::Invalid),
    };
    let cursor =
        Cursor { expires_s, tenant: text(2)?, client, method: text(4)?, path: text(5)?, upstream_path: text(6)? };
    // Signed by us, so well-formed; checked all the same: both paths stay on this server.
    if !is_local_path(&cursor.path) || !is_local_path(&cursor.upstream_path) {
        return Err(CursorError::Invalid);
    }
    if now_s >= expires_s {
        return Err(CursorError::Expired);
    }
    Ok(cursor)
}

/// A path relative to the base: `/` then not `/` or `\` (no network-path reference), visible ASCII only.
fn is_local_path(path: &str) -> bool {
    path.starts_with('/')
        && !path.starts_with("//")
        && !path.starts_with("/\\")
        && path.bytes().all(|b| b.is_ascii_graphic())
}

/// What a request is, as far as paging goes.
#[derive(Debug, PartialEq, Eq)]
pub enum PagingRequest<'a> {
    /// Not about paging.
    None,
    /// `GET /?_cursor=<cursor>`: the cursor, still to be opened.
    Cursor(&'a str),
    /// Refused before anything else is looked at (a raw `_getpages`, a cursor request with more in it).
    Refused(CursorError),
}

/// Sorts out a request's paging: its `_cursor` or a raw `_getpages` (parameter names compared after
/// percent-decoding, as a server reads them).
pub fn classify<'a>(method: &str, path: &'a str) -> PagingRequest<'a> {
    let Some((route, query)) = path.split_once('?') else { return PagingRequest::None };
    let mut cursor = None;
    let mut others = false;
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        let name = decode(name);
        if name.as_deref() == Some(RAW_PAGING) {
            return PagingRequest::Refused(CursorError::RawPaging);
        }
        if name.as_deref() == Some(PARAM) && cursor.is_none() {
            cursor = Some(value);
        } else {
            others = true;
        }
    }
    match cursor {
        None => PagingRequest::None,
        Some(token) if route == "/" && !others && matches!(method, "GET" | "HEAD") => PagingRequest::Cursor(token),
        Some(_) => PagingRequest::Refused(CursorError::Invalid),
    }
}

fn decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hi = (bytes.next()? as char).to_digit(16)?;
                let lo = (bytes.next()? as char).to_digit(16)?;
                out.push(u8::try_from(hi * 16 + lo).ok()?);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// What minting a page's cursors needs: the search they continue, and whose it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mint {
    pub tenant: String,
    pub client: Option<String>,
    pub method: String,
    pub path: String,
    pub expires_s: u64,
}

/// Rewrites the paging links of a JSON answer (a Bundle, and Bundles nested in its entries) under `base`
/// (the public base URL, no trailing slash) into cursors; `None`: nothing changed.
pub fn rewrite_body(body: &[u8], base: &str, paging: &Paging, mint_for: &Mint) -> Option<Vec<u8>> {
    let mut doc: Value = serde_json::from_slice(body).ok()?;
    if rewrite_bundle(&mut doc, base, paging, mint_for, 0) {
        serde_json::to_vec(&doc).ok()
    } else {
        None
    }
}

/// How deep Bundles nest (as for link rewriting).
const MAX_NESTING: usize = 4;

fn rewrite_bundle(doc: &mut Value, base: &str, paging: &Paging, m: &Mint, depth: usize) -> bool {
    if depth > MAX_NESTING || doc.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return false;
    }
    let mut changed = false;
    if let Some(Value::Array(links)) = doc.get_mut("link") {
        for link in links.iter_mut() {
            let relation = link.get("relation").and_then(Value::as_str).unwrap_or_default();
            if !RELATIONS.contains(&relation) {
                continue;
            }
            let Some(url) = link.get_mut("url") else { continue };
            if let Some(new) = url.as_str().and_then(|u| cursor_url(u, base, paging, m)) {
                *url = Value::String(new);
                changed = true;
            }
        }
    }
    if let Some(Value::Array(entries)) = doc.get_mut("entry") {
        for entry in entries.iter_mut() {
            if let Some(resource) = entry.get_mut("resource") {
                changed |= rewrite_bundle(resource, base, paging, m, depth + 1);
            }
        }
    }
    changed
}

/// The cursor URL for a link `url` under `base`; `None` for a link elsewhere (or too long to mint).
pub fn cursor_url(url: &str, base: &str, paging: &Paging, m: &Mint) -> Option<String> {
    let rest = crate::fhir::strip_base(url, Some(base))?;
    let upstream_path = match rest {
        "" => "/".to_string(),
        r if r.starts_with('?') => format!("/{r}"),
        r => r.to_string(),
    };
    let upstream_path = upstream_path.split('#').next().unwrap_or_default().to_string();
    if !is_local_path(&upstream_path) {
        return None;
    }
    let cursor = Cursor {
        expires_s: m.expires_s,
        tenant: m.tenant.clone(),
        client: m.client.clone(),
        method: m.method.clone(),
        path: m.path.clone(),
        upstream_path,
    };
    Some(format!("{base}/?{PARAM}={}", mint(paging, &cursor)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BASE: &str = "https://fhir.example.org/r4";

    fn paging() -> Paging {
        Paging::new(&[7u8; 32], 600).unwrap()
    }

    fn mint_for(tenant: &str, client: Option<&str>) -> Mint {
        Mint {
            tenant: tenant.into(),
            client: client.map(str::to_string),
            method: "GET".into(),
            path: "/Patient?name=x".into(),
            expires_s: 1_000,
        }
    }

    fn cursor_of(url: &str) -> &str {
        url.split_once("?_cursor=").unwrap().1
    }

    #[test]
    fn a_cursor_round_trips_and_nothing_else_opens() {
        let p = paging();
        let url =
            cursor_url(&format!("{BASE}?_getpages=abc&_getpagesoffset=20"), BASE, &p, &mint_for("t", Some("app")))
                .unwrap();
        assert!(url.starts_with(&format!("{BASE}/?_cursor=")), "{url}");
        let c = open(&p, cursor_of(&url), 999).unwrap();
        assert_eq!(c.upstream_path, "/?_getpages=abc&_getpagesoffset=20");
        assert_eq!((c.tenant.as_str(), c.client.as_deref(), c.path.as_str()), ("t", Some("app"), "/Patient?name=x"));
        // Expired at its expiry.
        assert_eq!(open(&p, cursor_of(&url), 1_000), Err(CursorError::Expired));
        // Another key.
        let other = Paging::new(&[8u8; 32], 600).unwrap();
        assert_eq!(open(&other, cursor_of(&url), 0), Err(CursorError::Invalid));
    }

    #[test]
    fn a_tampered_cursor_is_invalid() {
        let p = paging();
        let url = cursor_url(&format!("{BASE}/Patient?page=2"), BASE, &p, &mint_for("t", None)).unwrap();
        let token = cursor_of(&url).to_string();
        let (payload, tag) = token.split_once('.').unwrap();
        // Every single-character change of the token.
        for i in 0..token.len() {
            let mut bytes = token.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let changed = String::from_utf8(bytes).unwrap();
            if changed != token {
                assert!(open(&p, &changed, 0).is_err(), "changed at {i}");
            }
        }
        // A payload of our own (another tenant, a later expiry) under the old tag.
        let forged =
            serde_json::to_vec(&json!([1, 99_999, "other", null, "GET", "/Patient", "/Patient?page=2"])).unwrap();
        assert_eq!(open(&p, &format!("{}.{tag}", URL_SAFE_NO_PAD.encode(forged)), 0), Err(CursorError::Invalid));
        assert_eq!(open(&p, payload, 0), Err(CursorError::Invalid), "no tag");
        assert_eq!(open(&p, &format!("{payload}."), 0), Err(CursorError::Invalid));
        assert_eq!(open(&p, "", 0), Err(CursorError::Invalid));
        assert_eq!(open(&p, &"A".repeat(MAX_CURSOR_CHARS + 1), 0), Err(CursorError::Invalid));
    }

    #[test]
    fn a_signed_cursor_whose_upstream_path_leaves_the_server_is_invalid() {
        let p = paging();
        for upstream in ["//evil.example/x", "http://evil.example/x", "/\\evil", "relative", "/a b"] {
            let c = Cursor {
                expires_s: 10,
                tenant: "t".into(),
                client: None,
                method: "GET".into(),
                path: "/Patient".into(),
                upstream_path: upstream.into(),
            };
            assert_eq!(open(&p, &mint(&p, &c).unwrap(), 0), Err(CursorError::Invalid), "{upstream}");
        }
    }

    #[test]
    fn only_links_under_the_public_base_become_cursors() {
        let p = paging();
        let m = mint_for("t", None);
        for other in [
            "https://evil.example/r4?_getpages=x",
            "https://fhir.example.org/r4x?_getpages=x",
            "https://fhir.example.org/?_getpages=x",
            "http://fhir.example.org/r4?_getpages=x",
            "/r4?_getpages=x",
        ] {
            assert_eq!(cursor_url(other, BASE, &p, &m), None, "{other}");
        }
        assert!(cursor_url("HTTPS://FHIR.example.org/r4/Patient", BASE, &p, &m).is_some());
        let body = json!({"resourceType": "Bundle", "type": "searchset", "link": [
            {"relation": "self", "url": format!("{BASE}/Patient?name=x")},
            {"relation": "next", "url": format!("{BASE}?_getpages=abc")},
            {"relation": "next", "url": "https://evil.example/?_getpages=abc"},
            {"relation": "alternate", "url": format!("{BASE}/Patient?_format=xml")}],
            "entry": [{"resource": {"resourceType": "Bundle", "link": [{"relation": "next", "url": format!("{BASE}?_getpages=in")}]}},
                      {"resource": {"resourceType": "Patient", "link": [{"relation": "next", "url": format!("{BASE}?x")}]}}]});
        let out: Value =
            serde_json::from_slice(&rewrite_body(body.to_string().as_bytes(), BASE, &p, &m).unwrap()).unwrap();
        let url = |v: &Value| v.as_str().unwrap().to_string();
        assert!(url(&out["link"][0]["url"]).contains("?_cursor="));
        assert_eq!(open(&p, cursor_of(&url(&out["link"][1]["url"])), 0).unwrap().upstream_path, "/?_getpages=abc");
        assert_eq!(out["link"][2]["url"], "https://evil.example/?_getpages=abc", "another origin: left alone");
        assert_eq!(out["link"][3]["url"], format!("{BASE}/Patient?_format=xml"), "not a paging relation");
        assert!(url(&out["entry"][0]["resource"]["link"][0]["url"]).contains("?_cursor="), "nested Bundle");
        assert_eq!(out["entry"][1]["resource"]["link"][0]["url"], format!("{BASE}?x"), "a Patient's link is data");
        assert!(rewrite_body(br#"{"resourceType":"Patient"}"#, BASE, &p, &m).is_none());
        assert!(rewrite_body(b"not json", BASE, &p, &m).is_none());
    }

    #[test]
    fn requests_are_sorted_out_by_their_paging_parameters() {
        assert_eq!(classify("GET", "/Patient?name=x"), PagingRequest::None);
        assert_eq!(classify("GET", "/Patient"), PagingRequest::None);
        assert_eq!(classify("GET", "/?_cursor=abc.def"), PagingRequest::Cursor("abc.def"));
        for raw in ["/?_getpages=x", "/Patient?_getpages=x", "/?_get%70ages=x", "/?a=1&_getpages"] {
            assert_eq!(classify("GET", raw), PagingRequest::Refused(CursorError::RawPaging), "{raw}");
        }
        for bad in ["/Patient?_cursor=x", "/?_cursor=x&_count=5", "/?_cursor=x&_cursor=y", "/?_cursor=x&_id=1"] {
            assert_eq!(classify("GET", bad), PagingRequest::Refused(CursorError::Invalid), "{bad}");
        }
        assert_eq!(classify("POST", "/?_cursor=x"), PagingRequest::Refused(CursorError::Invalid));
    }

    #[test]
    fn keys_and_lifetimes_are_bounded() {
        assert!(Paging::new(&[1; 31], 60).is_none());
        assert!(Paging::new(&[1; 32], 0).is_none());
        assert!(Paging::new(&[1; 32], MAX_TTL_S + 1).is_none());
        assert!(!format!("{:?}", paging()).contains('7'), "the key is not shown");
    }

    /// Minting and opening one cursor, and rewriting a page's links, natively (BENCHMARKS.md "Answer check"):
    /// `cargo test --release --lib cursor::tests::cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a timing loop: run on demand, not in CI"]
    fn cost() {
        use std::time::Instant;
        let p = paging();
        let m = mint_for("6f1c2d0e-8a3b-4c5d-9e7f-0a1b2c3d4e5f", Some("patients-app-a"));
        let link = format!("{BASE}?_getpages=4ec3d775-99e4-40a2-b722-b5dcdd568dfa&_getpagesoffset=20&_count=20");
        let page = json!({"resourceType": "Bundle", "type": "searchset", "link": [
            {"relation": "self", "url": link}, {"relation": "next", "url": link}, {"relation": "previous", "url": link}],
            "entry": (0..20).map(|i| json!({"resource": {"resourceType": "Patient", "id": i.to_string(),
                "name": [{"family": "Example"}]}})).collect::<Vec<_>>()})
        .to_string()
        .into_bytes();
        let url = cursor_url(&link, BASE, &p, &m).unwrap();
        let token = cursor_of(&url).to_string();
        let time = |f: &dyn Fn()| {
            let mut t: Vec<f64> = (0..2000)
                .map(|_| {
                    let start = Instant::now();
                    f();
                    start.elapsed().as_secs_f64()
                })
                .collect();
            t.sort_by(f64::total_cmp);
            t[t.len() / 2] * 1e6
        };
        println!("| mint one cursor | {:.1} µs |", time(&|| assert!(cursor_url(&link, BASE, &p, &m).is_some())));
        println!(
            "| open one cursor ({} chars) | {:.1} µs |",
            token.len(),
            time(&|| assert!(open(&p, &token, 0).is_ok()))
        );
        println!(
            "| rewrite a 20-Patient page's 3 links ({} bytes) | {:.1} µs |",
            page.len(),
            time(&|| assert!(rewrite_body(&page, BASE, &p, &m).is_some()))
        );
    }

    proptest::proptest! {
        #[test]
        fn opening_any_string_never_panics(s in ".{0,300}", dot in proptest::prelude::any::<bool>()) {
            let token = if dot { format!("{s}.{s}") } else { s };
            let _ = open(&paging(), &token, 0);
            let _ = classify("GET", &format!("/?{token}"));
            let _ = crate::response_check::asks_unreadable_format(&format!("/Patient?{token}"));
        }
    }
}
