//! The filter's brain, host-independent: one [`Router`] per VM (or per filter config) holds the compiled
//! configuration, the key sets and tenant map in force with their fetch schedules, and the token cache;
//! one [`Stream`] per request holds what that request still needs. Every host event is a method here that
//! takes its inputs as data and pushes the [`Effect`]s to apply, in order, into a sink; a shell only reads
//! inputs and applies effects.
//!
//! Request events are in this file; timer ticks and fetch results are in [`crate::upkeep`].

use std::borrow::Cow;
use std::sync::Arc;

use crate::audit::{Outcome, Record};
use crate::cache::TokenCache;
use crate::config::{AuditLog, Config, JwksSource, AUDIT_LINE_FILTER_STATE};
use crate::crypto::{CheckLog, SignatureCheck};
use crate::cursor::{self, CursorError, Mint, PagingRequest};
use crate::decision::{decide, Decision, KeyLookup, Known, Request};
use crate::effect::{
    Effect, Effects, Fetch, FetchTarget, Flow, Level, Metric, Post, Reply, Resend, TenantRefusal, TokenEvent, FORM,
};
use crate::fhir::{Policy, Refusal};
use crate::identity::Identity;
use crate::jwks::KeySet;
use crate::links;
use crate::refresh::Schedule;
use crate::rejection::{operation_outcome, Rejection, REALM};
use crate::response_check::{self, Readable, Unreadable, Verdict};
use crate::scopes::Scopes;
use crate::tenant::{Tenant, TenantMap};
use crate::upstream_auth::{Access, TokenSlot, TokenSlots};

/// One provider's keys so far, when its next fetch is due, and the requests waiting for that fetch.
#[derive(Debug, Default)]
pub struct KeyState {
    pub keys: Option<Arc<KeySet>>,
    pub schedule: Option<Schedule>,
    /// Context ids of the requests parked until the next fetch answers.
    pub waiting: Vec<u32>,
    /// Configuration from discovery: the key set's `:authority` and `:path`, from the last good document.
    pub jwks_at: Option<(String, String)>,
}

/// The key states of every provider, by index: what a decision looks keys up in.
#[derive(Debug, Default)]
pub struct KeyStates(pub Vec<KeyState>);

impl KeyLookup for KeyStates {
    fn key_set(&self, provider: usize) -> Option<&KeySet> {
        self.0.get(provider).and_then(|s| s.keys.as_deref())
    }
}

/// The tenant map in force and, with a registry, when its next fetch is due.
#[derive(Debug)]
pub struct TenantState {
    /// `None` while a registry is configured, the configuration names no tenant, and no document came yet.
    pub map: Option<Arc<TenantMap>>,
    pub schedule: Option<Schedule>,
    /// What the registry's map in force was compiled from (an unchanged document is not compiled again).
    pub source: Option<crate::refresh::RegistrySource>,
}

/// Everything one VM (or one filter config) knows, built once per configuration.
#[derive(Debug)]
pub struct Router {
    pub config: Config,
    pub keys: KeyStates,
    pub tenants: TenantState,
    pub cache: TokenCache,
    /// When the cache was last swept of expired tokens, seconds since the epoch.
    pub(crate) last_purge_s: i64,
    /// Whether this VM has served a request. Only such VMs (Envoy's workers, not its main thread) publish
    /// the per-VM gauges, which every VM would otherwise overwrite.
    pub(crate) served: bool,
    /// When [`Router::housekeep_if_due`] next does something, ms since the epoch.
    pub(crate) next_housekeeping_ms: u64,
    /// Each tenant's upstream access token (tenants with `upstream_auth`).
    pub(crate) upstream: TokenSlots,
    /// Whether the host keeps delivering a request's body while its headers are held (a proxy-wasm host
    /// does only with `allow_on_headers_stop_iteration`); see [`Router::overdue_holds`].
    holds: Holds,
    /// Where the tenants' quota buckets live ([`crate::quota`]).
    pub quotas: crate::quota::Quotas,
}

/// Requests held whole (headers too) for their body's verdict, watched until the host proves that it
/// delivers the body of such a request: the first body chunk of a held request does.
#[derive(Debug, Default)]
struct Holds {
    /// Context ids and when their headers were held, until the host is proven.
    watched: Vec<(u32, u64)>,
    proven: bool,
    warned: bool,
}

/// How long a held request may see no body before its host is taken not to deliver one (well beyond a
/// client's gap between headers and body on loopback or a LAN; a slow client only loses the hold).
pub const HOLD_PROBE_MS: u64 = 1_000;

/// The request data a decision needs, borrowed from the host's header map (owned when a request waits).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpRequest<'a> {
    pub method: Cow<'a, str>,
    pub path: Cow<'a, str>,
    pub authorization: Option<Cow<'a, str>>,
    pub duplicate_authorization: bool,
    /// A conditional create's `If-None-Exist` header.
    pub if_none_exist: Option<Cow<'a, str>>,
    /// The method a method override header names ([`METHOD_OVERRIDES`]).
    pub method_override: Option<Cow<'a, str>>,
    /// Override headers that disagree came.
    pub override_conflict: bool,
    /// Its body is not plain text this filter can read as a server would: `Content-Encoding` (other than
    /// `identity`), or a `Content-Type` charset other than UTF-8, US-ASCII or ISO-8859-1.
    pub opaque_body: bool,
}

/// Whether a `Content-Type` value names a charset a form decoder would read differently from UTF-8 bytes.
fn foreign_charset(content_type: &str) -> bool {
    content_type.split(';').skip(1).filter_map(|p| p.split_once('=')).any(|(k, v)| {
        k.trim().eq_ignore_ascii_case("charset") && {
            let v = v.trim().trim_matches('"');
            !["utf-8", "utf8", "us-ascii", "ascii", "iso-8859-1", "latin1"].iter().any(|c| c.eq_ignore_ascii_case(v))
        }
    })
}

/// The method override headers some servers (and frameworks under them) honour: the request is judged as
/// the method it has and as the one they name (both must be allowed), and goes on unchanged, so that
/// whichever the server performs was judged. Several that disagree, or a name that is no HTTP method FHIR
/// uses, are refused (403).
pub const METHOD_OVERRIDES: [&str; 3] = ["x-http-method-override", "x-http-method", "x-method-override"];

/// A request kept beyond its header event.
pub type OwnedRequest = HttpRequest<'static>;

fn owned(v: &str) -> Cow<'static, str> {
    Cow::Owned(v.to_owned())
}

impl HttpRequest<'_> {
    /// A copy that outlives the header map.
    pub fn to_owned_request(&self) -> OwnedRequest {
        HttpRequest {
            method: owned(&self.method),
            path: owned(&self.path),
            authorization: self.authorization.as_deref().map(owned),
            duplicate_authorization: self.duplicate_authorization,
            if_none_exist: self.if_none_exist.as_deref().map(owned),
            method_override: self.method_override.as_deref().map(owned),
            override_conflict: self.override_conflict,
            opaque_body: self.opaque_body,
        }
    }

    fn as_request(&self) -> Request<'_> {
        Request {
            method: &self.method,
            path: &self.path,
            authorization: self.authorization.as_deref(),
            duplicate_authorization: self.duplicate_authorization,
            if_none_exist: self.if_none_exist.as_deref(),
            method_override: self.method_override.as_deref(),
            override_conflict: self.override_conflict,
        }
    }
}

/// What happens to a response on its way back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResponseEdit {
    /// Patch the CapabilityStatement with the IdP's endpoints.
    PatchCapability,
    /// Rewrite links under `from` (the upstream's base) to `to` (the public base).
    RewriteLinks { from: String, to: String },
}

/// The audit record of a request whose verdict waits for its body (a Bundle judged by the allowlist).
#[derive(Clone, Debug)]
struct PendingAudit {
    request: OwnedRequest,
    identity: Identity,
    cluster: String,
    credential: Option<&'static str>,
}

/// A body the tenant's allowlist (and the token's SMART scopes) must judge before it may go on: a Bundle,
/// or the form of a `POST _search`.
#[derive(Clone, Debug)]
struct Inspection {
    /// `Some(path)`: a `POST _search` on `path` (its form is judged with it); `None`: a Bundle.
    search: Option<String>,
    /// What the request reaches is judged (a narrowed token, or a tenant that lists types).
    narrowed: bool,
    /// The body cannot be read as the server would ([`HttpRequest::opaque_body`]).
    opaque: bool,
    policy: Policy,
    tenant: String,
    audit: Option<PendingAudit>,
    scopes: Scopes,
    /// The tenant's `require_smart_scopes`.
    require_scopes: bool,
    /// The tenant's quota: the Bundle is charged one unit per entry once it is allowed.
    quota: Option<Arc<crate::quota::Quota>>,
}

/// Where a request stands.
#[derive(Clone, Debug, Default)]
enum Phase {
    /// Its headers have not been decided yet.
    #[default]
    New,
    /// Parked until `provider`'s key set is fetched again (its token names an unknown `kid`).
    WaitingForKeys { provider: usize, request: Box<OwnedRequest> },
    /// Parked until its tenant's upstream token (token slot `slot`) is fetched.
    WaitingForToken { slot: u32, request: Box<OwnedRequest> },
    /// Its upstream refused the token (401): the response waits for a new token (slot `slot`) to send the
    /// request again with.
    WaitingToResend { slot: u32 },
    /// Sent again; the response waits for that answer.
    Resent,
    /// Routed; its body is held until the allowlist has judged the Bundle.
    Inspecting(Box<Inspection>),
    /// Decided: nothing more to judge on the request side.
    Decided,
}

/// One request's state, owned by the host's per-request context.
#[derive(Clone, Debug, Default)]
pub struct Stream {
    context_id: u32,
    phase: Phase,
    /// The request body arrived whole while the request was waiting (the host buffered it).
    body_complete: bool,
    /// What its response needs.
    response: Option<ResponseEdit>,
    /// The response body is being buffered for `response`'s edit.
    editing_response: bool,
    /// The request is a `HEAD` whose response would be edited: no body comes back, but its
    /// `content-length` is the unedited body's.
    head: bool,
    /// The upstream token it was sent with, if its tenant has `upstream_auth`.
    upstream_token: Option<Box<UpstreamTokenUse>>,
    /// The quota key whose in-flight slot it holds, given back once when the stream ends.
    quota_slot: Option<String>,
    /// Its quota was charged (a request woken after a wait is not charged twice).
    charged: bool,
    /// What its answer may hold, for a narrowed request ([`crate::response_check`]).
    check: Option<Box<AnswerCheck>>,
    /// The response (headers and body) is held for the check's verdict.
    checking: bool,
    /// The held answer's headers went on to the client (`hold_bundle_headers: false`): only its body is held,
    /// and a refusal can no longer change the status (Envoy resets the stream instead).
    headers_gone: bool,
    /// The paging links of its answer become cursors continuing this search.
    mint: Option<Box<Mint>>,
    /// The client's IP address, for the BALP AuditEvent (`audit_event`, `audit_sink`: see
    /// [`Router::wants_client_address`]).
    client_address: Option<Box<str>>,
    /// An allowed request's BALP AuditEvent, held until its answer is checked: a withheld answer is not a
    /// success (the issue-27 attack's finding 5). Written at the verdict, else when the stream ends.
    deferred_event: Option<Box<DeferredEvent>>,
}

/// What an AuditEvent written after the answer's check says of its request (owned: the request is gone).
#[derive(Clone, Debug)]
struct DeferredEvent {
    time_ms: u64,
    method: String,
    path: String,
    tenant: String,
    client_id: Option<String>,
    issuer: Option<String>,
    cluster: Option<String>,
    client_address: Option<Box<str>>,
}

/// The check a narrowed request's answer must pass before it reaches the client.
#[derive(Clone, Debug)]
struct AnswerCheck {
    readable: Readable,
    tenant: String,
    /// A read of a `Binary`: its raw content (not JSON) may come back as it is.
    raw_ok: bool,
}

/// Which upstream token a request was sent with, and what sending it again needs.
#[derive(Clone, Debug)]
struct UpstreamTokenUse {
    slot: u32,
    serial: u64,
    cluster: String,
    /// `GET` or `HEAD`: it may be sent again once, after a 401.
    safe: bool,
    resent: bool,
    /// The request's headers as they left, as they are sent again (no old token, nothing hop-by-hop): kept
    /// when the shell hands them over, since a host may not show them once the response has begun.
    headers: Vec<(String, String)>,
}

/// Request headers not sent again with a request sent again (hop-by-hop, or the old token); of the
/// pseudo-headers only `:method`, `:path` and `:authority` are.
const NOT_RESENT: [&str; 9] = [
    "authorization",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "upgrade",
    "proxy-connection",
    "expect",
];

/// The response headers that carry links (rewritten with the body's).
const LINK_HEADERS: [&str; 2] = ["location", "content-location"];

/// How long a request sent again may take (Envoy's default route timeout).
pub const RESEND_TIMEOUT_MS: u64 = 15_000;

/// Response headers not copied from an answer to a request sent again into the local reply (hop-by-hop, or
/// set by Envoy for the reply).
const NOT_COPIED: [&str; 6] = ["content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"];

impl Stream {
    /// The state of the request with this host context id.
    pub fn new(context_id: u32) -> Self {
        Self { context_id, ..Self::default() }
    }

    /// The host's id of this request.
    pub fn context_id(&self) -> u32 {
        self.context_id
    }

    /// The downstream peer's address as the host gives it (`ip:port`): its IP goes into the request's BALP
    /// AuditEvent. Read by the shell only where [`Router::wants_client_address`].
    pub fn set_client_address(&mut self, address: Option<&str>) {
        self.client_address = address.and_then(crate::balp::ip_of).map(String::into_boxed_str);
    }

    /// Whether the request is parked, waiting for a key set or an upstream token.
    pub fn is_waiting(&self) -> bool {
        matches!(
            self.phase,
            Phase::WaitingForKeys { .. }
                | Phase::WaitingForToken { .. }
                | Phase::WaitingToResend { .. }
                | Phase::Resent
        )
    }

    /// Whether it was sent with an upstream token that it may send again after a 401 (the shell then
    /// hands the response status to [`Router::on_upstream_response`]).
    pub fn may_resend(&self) -> bool {
        self.upstream_token.as_ref().is_some_and(|u| u.safe && !u.resent)
    }

    /// Whether the shell should keep the request's headers as they leave ([`Stream::keep_headers`]): it may
    /// be sent again, and they are not kept yet.
    pub fn wants_headers(&self) -> bool {
        self.upstream_token.as_ref().is_some_and(|u| u.safe && !u.resent && u.headers.is_empty())
    }

    /// Keeps the request's headers as they leave (the host's serialized header map).
    pub fn keep_headers(&mut self, serialized: &[u8]) {
        self.keep_header_pairs(crate::headers::Pairs::new(serialized).into_iter().flatten());
    }

    /// Keeps the request's headers as they leave (name and value pairs).
    pub fn keep_header_pairs<'h>(&mut self, pairs: impl Iterator<Item = (&'h [u8], &'h [u8])>) {
        let Some(u) = self.upstream_token.as_mut() else { return };
        u.headers = pairs
            .filter_map(|(name, value)| Some((std::str::from_utf8(name).ok()?, std::str::from_utf8(value).ok()?)))
            .filter(|(name, _)| {
                let pseudo = name.starts_with(':') && !matches!(*name, ":method" | ":path" | ":authority");
                !pseudo && !NOT_RESENT.contains(name)
            })
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
    }

    /// The token slot of its tenant's upstream token, and whether it waits for a new one (parked), if its
    /// tenant has `upstream_auth`.
    pub fn token_slot(&self) -> Option<(u32, bool)> {
        match (&self.phase, &self.upstream_token) {
            (Phase::WaitingForToken { slot, .. } | Phase::WaitingToResend { slot }, _) => Some((*slot, true)),
            (_, Some(u)) => Some((u.slot, false)),
            _ => None,
        }
    }

    /// Whether it is parked for its tenant's upstream token.
    pub fn waits_for_token(&self) -> bool {
        matches!(self.phase, Phase::WaitingForToken { .. } | Phase::WaitingToResend { .. })
    }

    /// The provider whose key set the request waits for, if it is parked.
    pub fn waiting_for(&self) -> Option<usize> {
        match self.phase {
            Phase::WaitingForKeys { provider, .. } => Some(provider),
            _ => None,
        }
    }
}

/// Most of a waiting request's buffered Bundle read back for judging (Envoy's buffer limit is lower).
pub const MAX_BUNDLE_BYTES: usize = 64 * 1024 * 1024;

/// The forwarding headers, which servers build their links from: a client's `X-Forwarded-Host`, `-Prefix`,
/// `-Port` and `Forwarded` never reach an upstream. `X-Forwarded-Proto` is Envoy's: it sets one on every request (the
/// client's is kept unless `use_remote_address`) and finds no route for a request without one, so the filter
/// overwrites it (from `public_base_url`) rather than removing it. `X-Forwarded-For` is Envoy's too
/// (`use_remote_address`, `xff_num_trusted_hops`).
const FORWARDED_HOST: &str = "x-forwarded-host";
const FORWARDED_PROTO: &str = "x-forwarded-proto";
const FORWARDED_PREFIX: &str = "x-forwarded-prefix";
const FORWARDED_PORT: &str = "x-forwarded-port";
const FORWARDED: &str = "forwarded";

/// The outcome of one decision, for the audit line and the filter state.
#[derive(Default)]
struct Detail<'a> {
    reason: Option<&'a str>,
    tenant: Option<&'a str>,
    identity: Option<&'a Identity>,
    cluster: Option<&'a str>,
    credential: Option<&'a str>,
}

impl<'a> Detail<'a> {
    /// A verified token's refusal: its line names the tenant, the client and the cluster (whose request it
    /// was, and where it was going), whatever refused it.
    fn refused(reason: &'a str, tenant: &'a Tenant, identity: &'a Identity) -> Self {
        let (tenant_id, cluster) = (Some(tenant.id.as_str()), Some(tenant.cluster.as_str()));
        Self { reason: Some(reason), tenant: tenant_id, identity: Some(identity), cluster, credential: None }
    }
}

impl Router {
    /// A router for `config` at `now_ms`: inline key sets installed, remote ones and the registry due at
    /// once. Pushes the start-up log line and the key gauge.
    pub fn new(config: Config, now_ms: u64, out: &mut dyn Effects) -> Self {
        let mut states = Vec::with_capacity(config.providers.len());
        let mut sources = Vec::new();
        for p in &config.providers {
            let mut state = KeyState::default();
            match &p.jwks {
                JwksSource::Inline(keys) => {
                    state.keys = Some(Arc::new(keys.clone()));
                    sources.push(format!("{} (inline JWKS)", p.provider.issuer));
                }
                JwksSource::Remote(r) => {
                    // With discovery, a refresh is two fetches one after the other.
                    let timeout_ms = if r.discovery.is_some() { r.timeout_ms.saturating_mul(2) } else { r.timeout_ms };
                    state.schedule = Some(Schedule::new(r.refresh_ms, now_ms).with_timeout(timeout_ms));
                    let how = if r.discovery.is_some() { "JWKS found by discovery" } else { "JWKS" };
                    sources.push(format!(
                        "{} ({how} from cluster {} every {} s)",
                        p.provider.issuer,
                        r.cluster,
                        r.refresh_ms / 1000
                    ));
                }
            }
            states.push(state);
        }
        let inline_keys: usize = states.iter().filter_map(|s| s.keys.as_ref()).map(|k| k.keys().len()).sum();
        out.push(Effect::Gauge(crate::effect::Gauge::JwksKeys, inline_keys as u64));
        let tenants = TenantState {
            map: (!config.tenants.is_empty() || config.registry.is_none()).then(|| Arc::new(config.tenants.clone())),
            schedule: config.registry.as_ref().map(|r| Schedule::new(r.refresh_ms, now_ms).with_timeout(r.timeout_ms)),
            source: None,
        };
        let line = format!(
            "configured: {} tenants{}, issuers {}, signature verifier {:?}",
            config.tenants.len(),
            if config.registry.is_some() { " (and a tenant registry)" } else { "" },
            sources.join(", "),
            config.signature_verifier
        );
        out.push(Effect::Log(Level::Info, &line));
        let cache = TokenCache::new(config.token_cache_entries);
        Self {
            config,
            keys: KeyStates(states),
            tenants,
            cache,
            last_purge_s: 0,
            served: false,
            next_housekeeping_ms: 0,
            upstream: TokenSlots::default(),
            holds: Holds::default(),
            quotas: crate::quota::Quotas::default(),
        }
    }

    /// A new request: its state, for the host's per-request context.
    pub fn open_stream(&mut self, context_id: u32) -> Stream {
        self.served = true;
        Stream::new(context_id)
    }

    /// Reads the request out of its header pairs (raw bytes, as the host has them) and pushes the removal
    /// of client-sent copies of the headers this filter owns: the route and tenant headers, and every
    /// forwarding header but `X-Forwarded-Proto` (links are built from the configuration only, never from
    /// what the client sent). Each removal is pushed only if that header came.
    pub fn read_request<'h>(
        &self,
        pairs: impl IntoIterator<Item = (&'h [u8], &'h [u8])>,
        out: &mut dyn Effects,
    ) -> HttpRequest<'h> {
        let config = &self.config;
        let mut request = HttpRequest::default();
        // One bit per owned header that came, in the order of `owned` below.
        let mut spoofed = 0u8;
        // A non-UTF-8 byte (lossily decoded, copied) becomes U+FFFD, which no token, path or cluster holds.
        // (`from_utf8` first: its ASCII fast path is several times quicker than the lossy decoder on the
        // ~700-byte token.)
        let text = |v: &'h [u8]| match std::str::from_utf8(v) {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => String::from_utf8_lossy(v),
        };
        for (name, value) in pairs {
            match name {
                b":method" => request.method = text(value),
                b":path" => request.path = text(value),
                b"authorization" => {
                    request.duplicate_authorization |= request.authorization.is_some();
                    request.authorization = Some(text(value));
                }
                b"if-none-exist" => {
                    // Two of them: a server may read either, so both searches are judged.
                    request.if_none_exist = Some(match request.if_none_exist.take() {
                        None => text(value),
                        Some(first) => Cow::Owned(format!("{first}&{}", text(value))),
                    });
                }
                b"content-encoding" => {
                    request.opaque_body |= !text(value).trim().eq_ignore_ascii_case("identity");
                }
                b"content-type" => request.opaque_body |= foreign_charset(&text(value)),
                n if is_override_header(n) => {
                    let named = text(value);
                    if request.method_override.as_deref().is_some_and(|m| !m.eq_ignore_ascii_case(&named)) {
                        request.override_conflict = true;
                    }
                    request.method_override = Some(named);
                }
                n if n == config.route_header.as_bytes() => spoofed |= 1,
                n if n == config.tenant_header.as_bytes() => spoofed |= 1 << 1,
                b"x-forwarded-host" => spoofed |= 1 << 2,
                b"x-forwarded-prefix" => spoofed |= 1 << 3,
                b"x-forwarded-port" => spoofed |= 1 << 4,
                b"forwarded" => spoofed |= 1 << 5,
                n if config.rate_limit_descriptor_header.as_deref().is_some_and(|h| h.as_bytes() == n) => {
                    spoofed |= 1 << 6
                }
                _ => {}
            }
        }
        if spoofed != 0 {
            let owned = [
                config.route_header.as_str(),
                &config.tenant_header,
                FORWARDED_HOST,
                FORWARDED_PREFIX,
                FORWARDED_PORT,
                FORWARDED,
                config.rate_limit_descriptor_header.as_deref().unwrap_or_default(),
            ];
            for (bit, name) in owned.into_iter().enumerate() {
                if spoofed & (1 << bit) != 0 {
                    out.push(Effect::RemoveRequestHeader(name));
                }
            }
        }
        request
    }

    /// Whether the shell should read the client's address ([`Stream::set_client_address`]) before the
    /// request's headers go in: only where AuditEvents are built, `audit_event` or `audit_sink` (one more
    /// host call; BALP requires the client's network address).
    pub fn wants_client_address(&self) -> bool {
        self.config.audit_event || self.config.audit_sink.is_some()
    }

    /// The request's headers arrived (`pairs`: every header, as the host has them).
    pub fn on_request_headers<'h>(
        &mut self,
        stream: &mut Stream,
        pairs: impl IntoIterator<Item = (&'h [u8], &'h [u8])>,
        end_of_stream: bool,
        now_ms: u64,
        signatures: &dyn SignatureCheck,
        out: &mut dyn Effects,
    ) -> Flow {
        let request = self.read_request(pairs, out);
        let flow = self.handle(stream, &request, now_ms, true, signatures, out);
        if end_of_stream && matches!(stream.phase, Phase::Inspecting(_)) {
            // POST to the base without a body: not a Bundle.
            return self.judge_bundle(stream, &[], now_ms, out);
        }
        self.watch_hold(stream, flow, now_ms);
        flow
    }

    /// Watches a request held whole for its body, until the host is proven to deliver held bodies.
    fn watch_hold(&mut self, stream: &Stream, flow: Flow, now_ms: u64) {
        if flow == Flow::Buffer && !self.holds.proven {
            self.holds.watched.push((stream.context_id, now_ms));
        }
    }

    /// The requests held whole for longer than [`HOLD_PROBE_MS`] without a body chunk: the host does not
    /// deliver a held request's body (a proxy-wasm host without `allow_on_headers_stop_iteration`), and
    /// they would wait until a timeout. The shell resumes each (its headers go on; its body is still
    /// judged before it leaves). Warns once. A shell whose host is known to deliver (the dynamic module)
    /// need not call this.
    pub fn overdue_holds(&mut self, now_ms: u64, out: &mut dyn Effects) -> Vec<u32> {
        if self.holds.watched.is_empty() {
            return Vec::new();
        }
        let mut overdue = Vec::new();
        self.holds.watched.retain(|&(id, since)| {
            let late = now_ms.saturating_sub(since) >= HOLD_PROBE_MS;
            if late {
                overdue.push(id);
            }
            !late
        });
        if !overdue.is_empty() && !std::mem::replace(&mut self.holds.warned, true) {
            out.push(Effect::Log(
                Level::Warn,
                "a Bundle held for the allowlist got no body from the host: set allow_on_headers_stop_iteration: \
                 true in the wasm PluginConfig (Envoy >= 1.35), or hold_bundle_headers: false. Such requests \
                 now go on after 1 s with their headers; their body is still judged before it leaves",
            ));
        }
        overdue
    }

    /// A chunk of the request body arrived. `body` reads the whole buffered body (called at most once, and
    /// only when the core must judge it).
    pub fn on_request_body(
        &mut self,
        stream: &mut Stream,
        end_of_stream: bool,
        now_ms: u64,
        body: &mut dyn FnMut() -> Vec<u8>,
        out: &mut dyn Effects,
    ) -> Flow {
        if !self.holds.watched.is_empty() && self.holds.watched.iter().any(|&(id, _)| id == stream.context_id) {
            // A body while the headers are held: the host delivers held bodies; stop watching.
            self.holds.proven = true;
            self.holds.watched = Vec::new();
        }
        match &stream.phase {
            Phase::WaitingForKeys { .. } | Phase::WaitingForToken { .. } => {
                // Nothing may go on yet; note a complete body, so that it is judged when the request is.
                stream.body_complete |= end_of_stream;
                Flow::WaitForKeys
            }
            Phase::Inspecting(_) if !end_of_stream => Flow::Buffer,
            Phase::Inspecting(_) => self.judge_bundle(stream, &body(), now_ms, out),
            Phase::New | Phase::Decided | Phase::WaitingToResend { .. } | Phase::Resent => Flow::Continue,
        }
    }

    /// The request ended with trailers (an HTTP/2 client may end its body with a trailers frame instead of a
    /// data frame with end-of-stream): its body is complete, exactly as at a body's end. A body held for
    /// judgement is judged now; a request still waiting notes it, and stays stopped. The host must stop the
    /// trailers unless the flow proceeds: Envoy continues a stopped stream whose trailers hook says continue
    /// (headers, held body and trailers all go on), so a "continue" here would let a held Bundle, or a request
    /// still waiting for keys, reach the upstream unjudged.
    pub fn on_request_trailers(
        &mut self,
        stream: &mut Stream,
        now_ms: u64,
        body: &mut dyn FnMut() -> Vec<u8>,
        out: &mut dyn Effects,
    ) -> Flow {
        self.on_request_body(stream, true, now_ms, body, out)
    }

    /// A waiting request's key set was fetched (or the fetch failed): decide it again with the keys there
    /// are now (it may not wait twice), judge its body if it arrived whole meanwhile, and resume it if it
    /// may go on.
    pub fn wake(
        &mut self,
        stream: &mut Stream,
        now_ms: u64,
        signatures: &dyn SignatureCheck,
        body: &mut dyn FnMut() -> Vec<u8>,
        out: &mut dyn Effects,
    ) {
        let request = match std::mem::take(&mut stream.phase) {
            Phase::WaitingForKeys { provider, request } => {
                // Out of the queue (a host whose fetch answers reach this router took the queue already; the
                // dynamic module's workers are woken by their main thread, and leave it here).
                if let Some(state) = self.keys.0.get_mut(provider) {
                    state.waiting.retain(|&id| id != stream.context_id);
                }
                request
            }
            Phase::WaitingForToken { slot, request } => {
                if let Some(slot) = self.upstream.get_mut(slot) {
                    slot.waiting.retain(|&id| id != stream.context_id);
                }
                request
            }
            Phase::WaitingToResend { slot } => {
                self.resend(stream, slot, now_ms, false, out);
                return;
            }
            other => {
                stream.phase = other;
                return;
            }
        };
        let mut flow = self.handle(stream, &request, now_ms, false, signatures, out);
        if matches!(stream.phase, Phase::Inspecting(_)) && std::mem::take(&mut stream.body_complete) {
            flow = self.judge_bundle(stream, &body(), now_ms, out);
        }
        if flow.proceeds() {
            out.push(Effect::ResumeRequest);
        }
        self.watch_hold(stream, flow, now_ms);
    }

    /// The request is over (answered, reset or complete): a waiting request leaves its queue at once.
    pub fn on_stream_done(&mut self, stream: &mut Stream) {
        if let Some(key) = stream.quota_slot.take() {
            self.quotas.release(&key);
        }
        if !self.holds.watched.is_empty() {
            self.holds.watched.retain(|&(id, _)| id != stream.context_id);
        }
        match stream.phase {
            Phase::WaitingForKeys { provider, .. } => {
                if let Some(state) = self.keys.0.get_mut(provider) {
                    state.waiting.retain(|&id| id != stream.context_id);
                }
            }
            Phase::WaitingForToken { slot, .. } | Phase::WaitingToResend { slot } => {
                if let Some(slot) = self.upstream.get_mut(slot) {
                    slot.gone(stream.context_id);
                }
            }
            _ => {}
        }
        stream.phase = Phase::Decided;
    }

    /// The response headers arrived. `header` reads one response header (only when the response is
    /// edited).
    pub fn on_response_headers(
        &self,
        stream: &mut Stream,
        end_of_stream: bool,
        header: &dyn Fn(&str) -> Option<String>,
        out: &mut dyn Effects,
    ) -> Flow {
        let edits = stream.response.is_some() || stream.mint.is_some();
        if !edits && stream.check.is_none() {
            return Flow::Continue;
        }
        if let Some(ResponseEdit::RewriteLinks { from, to }) = &stream.response {
            for name in LINK_HEADERS {
                if let Some(new) = header(name).and_then(|v| links::rewrite_url(&v, from, to)) {
                    out.push(Effect::SetResponseHeader(name, &new));
                }
            }
        }
        let encoded = header("content-encoding").is_some_and(|e| e != "identity");
        let content_type = header("content-type");
        let json = content_type.as_deref().is_some_and(|t| t.to_ascii_lowercase().contains("json"));
        if let Some(check) = stream.check.as_deref().filter(|_| !end_of_stream && !stream.head) {
            // A narrowed request's answer: held whole (headers too) until it is checked, or refused at once
            // if it cannot be checked.
            let checkable = !encoded && content_type.as_deref().is_some_and(response_check::is_json_media_type);
            if !checkable {
                if check.raw_ok && !encoded {
                    self.finish_event(stream, None, out);
                    return Flow::Continue;
                }
                withhold(check, &Verdict::Unreadable(Unreadable::Format), false, out);
                self.finish_event(stream, Some(&Verdict::Unreadable(Unreadable::Format)), out);
                return Flow::Stop;
            }
            stream.checking = true;
            if edits {
                out.push(Effect::RemoveResponseHeader("content-length")); // the body changes length
                stream.editing_response = true;
            }
            return self.hold_answer(stream);
        }
        // Not held for the check (no body, a HEAD, a raw Binary): it goes on as it is.
        self.finish_event(stream, None, out);
        if !edits {
            return Flow::Continue;
        }
        if stream.head && !encoded && json {
            // RFC 9110 §8.6: a HEAD answer's content-length must be what GET would send, or absent. GET sends
            // the edited body, whose length the upstream's HEAD answer cannot know (nor can we, with no body).
            out.push(Effect::RemoveResponseHeader("content-length"));
            return Flow::Continue;
        }
        if end_of_stream || encoded || !json {
            return Flow::Continue;
        }
        out.push(Effect::RemoveResponseHeader("content-length")); // the body changes length
        stream.editing_response = true;
        if stream.mint.is_some() {
            // Held whole, headers too: an answer beyond Envoy's buffer limit then gets Envoy's 500, not a
            // reset after its headers.
            return self.hold_answer(stream);
        }
        Flow::Continue
    }

    /// Writes an allowed request's AuditEvent held for its answer's check (`deferred_event`), once: a
    /// success if the answer went on (`withheld` none), else the refusal the client got instead (403 for
    /// types it may not read, 406 for a format that cannot be checked, 502 for an answer that could not).
    fn finish_event(&self, stream: &mut Stream, withheld: Option<&Verdict>, out: &mut dyn Effects) {
        let Some(d) = stream.deferred_event.take() else { return };
        let (outcome, reason) = match withheld {
            None | Some(Verdict::Clean) => (Outcome::Allowed, None),
            Some(Verdict::Forbidden(_)) => (Outcome::Forbidden, Some("answer_withheld")),
            Some(Verdict::Unreadable(Unreadable::Format)) => (Outcome::Forbidden, Some("answer_unreadable_format")),
            Some(Verdict::Unreadable(_)) => (Outcome::Rejected, Some("answer_unchecked")),
        };
        let event = crate::balp::Event {
            time_ms: d.time_ms,
            method: &d.method,
            path: &d.path,
            outcome,
            reason,
            tenant: Some(&d.tenant),
            client_id: d.client_id.as_deref(),
            issuer: d.issuer.as_deref(),
            cluster: d.cluster.as_deref(),
            client_address: d.client_address.as_deref(),
        }
        .to_json();
        emit_event(&self.config, &event, Some(&d.tenant), d.time_ms, out);
    }

    /// How an answer that must be checked or edited whole is held: headers too by default; with
    /// `hold_bundle_headers: false` (a host that cannot stop on headers: Envoy's wasm host without
    /// `allow_on_headers_stop_iteration` never delivers the body of an answer whose headers a filter holds)
    /// its headers go on and only its body is held.
    fn hold_answer(&self, stream: &mut Stream) -> Flow {
        if self.config.hold_bundle_headers {
            return Flow::Buffer;
        }
        stream.headers_gone = true;
        Flow::Continue
    }

    /// A chunk of the response body arrived. `body` reads the whole buffered body (called at most once).
    pub fn on_response_body(
        &self,
        stream: &mut Stream,
        end_of_stream: bool,
        body: &mut dyn FnMut() -> Vec<u8>,
        out: &mut dyn Effects,
    ) -> Flow {
        if matches!(stream.phase, Phase::WaitingToResend { .. } | Phase::Resent) {
            // The refused answer's body: held, never sent (the client gets the answer to the request sent again).
            return Flow::Buffer;
        }
        if !stream.editing_response && !stream.checking {
            return Flow::Continue;
        }
        if !end_of_stream {
            return Flow::Buffer;
        }
        let body = body();
        if let Some(check) = stream.check.as_deref().filter(|_| stream.checking) {
            let verdict = response_check::check(&body, &check.readable);
            if verdict != Verdict::Clean {
                // Headers already sent: the local reply cannot change the status, and Envoy resets the stream
                // instead (a local reply after the response headers went); the held body never leaves.
                withhold(check, &verdict, stream.headers_gone, out);
                self.finish_event(stream, Some(&verdict), out);
                return Flow::Stop;
            }
        }
        self.finish_event(stream, None, out);
        if let Some(new) = self.finished_body(stream, &body).filter(|_| stream.editing_response) {
            out.push(Effect::ReplaceResponseBody(&new));
        }
        Flow::Continue
    }

    /// The answer ended with trailers while its body was held (for the answer check or an edit). The body is
    /// complete, but a trailers hook cannot replace it: an answer held for the answer check is withheld (it
    /// cannot be judged and edited here: fail closed), an answer held only for an edit goes on unedited.
    /// The host stops the trailers unless the flow proceeds.
    pub fn on_response_trailers(&self, stream: &mut Stream, out: &mut dyn Effects) -> Flow {
        if matches!(stream.phase, Phase::WaitingToResend { .. } | Phase::Resent) {
            return Flow::Buffer;
        }
        if let Some(check) = stream.check.as_deref().filter(|_| stream.checking) {
            withhold(check, &Verdict::Unreadable(Unreadable::Format), stream.headers_gone, out);
            self.finish_event(stream, Some(&Verdict::Unreadable(Unreadable::Format)), out);
            return Flow::Stop;
        }
        Flow::Continue
    }

    /// The answer's body as its edits change it (links to the public base, paging links to cursors);
    /// `None`: unchanged.
    fn finished_body(&self, stream: &Stream, body: &[u8]) -> Option<Vec<u8>> {
        let mut changed = stream.response.as_ref().and_then(|edit| self.edited_body(edit, body));
        if let (Some(mint), Some(paging), Some(base)) =
            (stream.mint.as_deref(), self.config.paging.as_ref(), self.config.public_base_url.as_deref())
        {
            let source = changed.as_deref().unwrap_or(body);
            if let Some(new) = cursor::rewrite_body(source, base, paging, mint) {
                changed = Some(new);
            }
        }
        changed
    }

    /// The status of the answer to a request sent with an upstream token that it may send again (see
    /// [`Stream::may_resend`]). A 401 means the tenant's server refused the token: it is dropped, and the
    /// request (safe: `GET`, `HEAD`) is sent again once with a new one, when there is one; the client gets
    /// that answer. `Some(flow)`: the response is held (or answered); `None`: it goes on as usual.
    pub fn on_upstream_response(
        &mut self,
        stream: &mut Stream,
        status: Option<&str>,
        now_ms: u64,
        out: &mut dyn Effects,
    ) -> Option<Flow> {
        if status != Some("401") || !stream.may_resend() {
            return None;
        }
        let upstream = stream.upstream_token.as_mut()?;
        upstream.resent = true;
        let (slot_id, serial) = (upstream.slot, upstream.serial);
        let slot = self.upstream.get_mut(slot_id)?;
        slot.refused(serial);
        out.push(Effect::Count(Metric::UpstreamToken(&slot.tenant, TokenEvent::Retry)));
        let line = format!(
            "upstream token for tenant {}: its server answered 401; sending the request again with a new token",
            slot.tenant
        );
        out.push(Effect::Log(Level::Info, &line));
        self.resend(stream, slot_id, now_ms, true, out);
        Some(if matches!(stream.phase, Phase::Decided) { Flow::Stop } else { Flow::WaitForKeys })
    }

    /// Sends the request again with the slot's token, or waits for one (`may_wait`), or answers 503.
    fn resend(&mut self, stream: &mut Stream, slot_id: u32, now_ms: u64, may_wait: bool, out: &mut dyn Effects) {
        stream.phase = Phase::Decided;
        let Some(slot) = self.upstream.get_mut(slot_id) else { return };
        slot.waiting.retain(|&id| id != stream.context_id);
        match slot.access(stream.context_id, now_ms, may_wait) {
            Access::Use => {
                if let (Some(header), Some(upstream)) = (slot.header(), stream.upstream_token.as_mut()) {
                    upstream.serial = slot.serial();
                    let cluster = &upstream.cluster;
                    let context_id = stream.context_id;
                    let timeout_ms = RESEND_TIMEOUT_MS;
                    let mut headers: Vec<(&str, &str)> =
                        upstream.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                    headers.push(("authorization", header));
                    out.push(Effect::Resend(Resend { context_id, cluster, headers: &headers, timeout_ms }));
                    stream.phase = Phase::Resent;
                }
            }
            Access::Wait { fetch } => {
                if fetch {
                    token_fetch(slot_id, slot, now_ms, out);
                }
                stream.phase = Phase::WaitingToResend { slot: slot_id };
            }
            Access::Full => reject(Rejection::UpstreamAuthUnavailable, Some(1), out),
            Access::Unavailable { retry_after_s } => {
                reject(Rejection::UpstreamAuthUnavailable, Some(retry_after_s), out)
            }
        }
    }

    /// The answer to a request sent again (`status`: `Err(why)` if none came): the client gets it, its links
    /// rewritten as the tenant's answers are; a second 401 (or none) is a 503.
    pub fn on_resend_response(
        &mut self,
        stream: &mut Stream,
        status: Result<&str, &str>,
        headers: &[(String, String)],
        body: &[u8],
        out: &mut dyn Effects,
    ) {
        if !matches!(std::mem::replace(&mut stream.phase, Phase::Decided), Phase::Resent) {
            return;
        }
        let tenant = stream
            .upstream_token
            .as_ref()
            .and_then(|u| self.upstream.get_mut(u.slot))
            .map_or(String::new(), |s| s.tenant.clone());
        let status = match status.map(|s| s.parse::<u32>()) {
            Ok(Ok(status)) if status != 401 => status,
            failed => {
                let why = match failed {
                    Ok(Ok(_)) => "its server refused a new token too (401)".to_string(),
                    Ok(Err(_)) => "its server's answer had no status".to_string(),
                    Err(why) => format!("no answer ({why})"),
                };
                let line = format!("upstream token for tenant {tenant}: {why} when the request was sent again");
                out.push(Effect::Log(Level::Error, &line));
                reject(Rejection::UpstreamAuthUnavailable, Some(1), out);
                return;
            }
        };
        let mut copied: Vec<(&str, String)> = Vec::with_capacity(headers.len());
        for (name, value) in headers {
            if name.starts_with(':') || NOT_COPIED.contains(&name.as_str()) {
                continue;
            }
            let value = match &stream.response {
                Some(ResponseEdit::RewriteLinks { from, to }) if LINK_HEADERS.contains(&name.as_str()) => {
                    links::rewrite_url(value, from, to).unwrap_or_else(|| value.clone())
                }
                _ => value.clone(),
            };
            copied.push((name.as_str(), value));
        }
        if let Some(check) = stream.check.as_deref() {
            let content_type = headers.iter().find(|(n, _)| n == "content-type").map(|(_, v)| v.as_str());
            let encoded = headers.iter().any(|(n, v)| n == "content-encoding" && v != "identity");
            let checkable = !encoded && content_type.is_some_and(response_check::is_json_media_type);
            let verdict = if checkable {
                response_check::check(body, &check.readable)
            } else if body.is_empty() || (check.raw_ok && !encoded) {
                Verdict::Clean
            } else {
                Verdict::Unreadable(Unreadable::Format)
            };
            if verdict != Verdict::Clean {
                withhold(check, &verdict, false, out);
                self.finish_event(stream, Some(&verdict), out);
                return;
            }
        }
        self.finish_event(stream, None, out);
        let json = headers.iter().any(|(n, v)| n == "content-type" && v.to_ascii_lowercase().contains("json"));
        let edited = if json { self.finished_body(stream, body) } else { None };
        let headers: Vec<(&str, &str)> = copied.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let body = edited.as_deref().unwrap_or(body);
        out.push(Effect::Reply(Reply { status, headers: &headers, body }));
    }

    /// The body as `edit` changes it (`None`: unchanged).
    fn edited_body(&self, edit: &ResponseEdit, body: &[u8]) -> Option<Vec<u8>> {
        match edit {
            ResponseEdit::PatchCapability => {
                self.config.discovery.as_ref().and_then(|d| d.patch_capability_statement(body))
            }
            ResponseEdit::RewriteLinks { from, to } => links::rewrite_body(body, from, to),
        }
    }

    /// Decides `request` and pushes what follows. `may_wait`: an unknown `kid` may park the request until
    /// a key-set refetch (not for a request that already waited).
    fn handle(
        &mut self,
        stream: &mut Stream,
        request: &HttpRequest<'_>,
        now_ms: u64,
        may_wait: bool,
        signatures: &dyn SignatureCheck,
        out: &mut dyn Effects,
    ) -> Flow {
        let Router { config, keys, tenants, cache, upstream, quotas, .. } = self;
        let now_s = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
        let known = Known { config, tenants: tenants.map.as_deref(), keys, signatures };
        // A paging cursor is judged as the search it continues; a bad one (or a raw `_getpages`) is refused
        // once the token is known good.
        // Without `paging` nothing is opened or refused here, so the request is not classified for it.
        let opened = config.paging.as_ref().and_then(|paging| match cursor::classify(&request.method, &request.path) {
            PagingRequest::None => None,
            PagingRequest::Cursor(token) => Some(cursor::open(paging, token, u64::try_from(now_s).unwrap_or_default())),
            PagingRequest::Refused(e) => Some(Err(e)),
        });
        let continued = match &opened {
            Some(Ok(c)) => Some(HttpRequest {
                method: Cow::Borrowed(c.method.as_str()),
                path: Cow::Borrowed(c.path.as_str()),
                authorization: request.authorization.clone(),
                duplicate_authorization: request.duplicate_authorization,
                // The continued search is a GET without a body; an override header on the cursor request is
                // still judged.
                if_none_exist: None,
                method_override: request.method_override.clone(),
                override_conflict: request.override_conflict,
                opaque_body: false,
            }),
            _ => None,
        };
        let judged = continued.as_ref().unwrap_or(request);
        // The verify time is a span tag: the clock is read only for `span_tags`.
        let started = if config.span_tags { signatures.now_ns() } else { None };
        let decision = decide(&known, &judged.as_request(), cache, now_s);
        let verify_ns = started.and_then(|start| Some(signatures.now_ns()?.saturating_sub(start)));
        count_checks(signatures.drain(), out);
        stream.phase = Phase::Decided;
        let client_address = stream.client_address.clone();
        let audit = Audit { config, request, now_ms, verify_ns, client_address: client_address.as_deref() };
        match decision {
            Decision::Public { cluster, patch } => pass_public(&audit, stream, cluster, patch, out),
            Decision::SmartConfiguration { body } => {
                out.push(Effect::Count(Metric::Public));
                let headers = [("content-type", "application/json"), ("cache-control", "max-age=3600")];
                out.push(Effect::Reply(Reply { status: 200, headers: &headers, body: body.as_bytes() }));
                audit.record(Outcome::Public, Detail::default(), out);
                Flow::Stop
            }
            Decision::Route { tenant, identity, cached, inspect_body, search_form } => {
                let refusal = match &opened {
                    Some(Err(e)) => Some(*e),
                    Some(Ok(c)) if !cursor_is_theirs(c, &tenant.id, &identity) => Some(CursorError::NotYours),
                    _ => None,
                };
                if let Some(e) = refusal {
                    return refuse_cursor(&audit, e, tenant, &identity, out);
                }
                let check = answer_check(tenant, &identity, judged);
                if check.is_some() && response_check::asks_unreadable_format(&judged.path) {
                    // Its answer could not be checked: refused before it reaches the upstream.
                    let reason = unreadable_format(&tenant.id, out);
                    let detail = Detail::refused(reason, tenant, &identity);
                    audit.record(Outcome::Forbidden, detail, out);
                    return Flow::Stop;
                }
                stream.check = check;
                // A Bundle or a search form is charged once its body is judged (`judge_bundle`).
                if !inspect_body && !stream.charged {
                    if let Some(quota) = quota_of(config, tenant) {
                        stream.charged = true;
                        let cost = crate::quota::request_cost(quota, &request.method, &request.path, None);
                        if let Some(reason) = crate::quota::never_fits(quota, &tenant.id, cost, out) {
                            let detail = Detail::refused(reason, tenant, &identity);
                            audit.record(Outcome::Rejected, detail, out);
                            return Flow::Stop;
                        }
                        match quotas.admit(quota, &tenant.id, cost, now_ms, out) {
                            Ok(slot) => stream.quota_slot = slot,
                            Err(verdict) => return limited(&audit, quota, verdict, tenant, &identity, out),
                        }
                    }
                }
                let mut credential = None;
                if let Some(client) = tenant.upstream_auth() {
                    let Some((slot_id, slot)) = upstream.slot(&tenant.id, client) else {
                        return unavailable(&audit, tenant, &identity, 1, out);
                    };
                    match slot.access(stream.context_id, now_ms, may_wait) {
                        Access::Use => {
                            credential = slot.header();
                            stream.upstream_token = Some(Box::new(UpstreamTokenUse {
                                slot: slot_id,
                                serial: slot.serial(),
                                cluster: tenant.cluster.clone(),
                                safe: matches!(&*request.method, "GET" | "HEAD"),
                                resent: false,
                                headers: Vec::new(),
                            }));
                        }
                        Access::Wait { fetch } => {
                            if fetch {
                                token_fetch(slot_id, slot, now_ms, out);
                            }
                            out.push(Effect::Count(Metric::UpstreamToken(&tenant.id, TokenEvent::Wait)));
                            let request = Box::new(request.to_owned_request());
                            stream.phase = Phase::WaitingForToken { slot: slot_id, request };
                            return Flow::WaitForKeys;
                        }
                        Access::Full => return unavailable(&audit, tenant, &identity, 1, out),
                        Access::Unavailable { retry_after_s } => {
                            return unavailable(&audit, tenant, &identity, retry_after_s, out)
                        }
                    }
                }
                out.push(Effect::Count(if cached { Metric::CacheHits } else { Metric::CacheMisses }));
                let upstream_path = match &opened {
                    Some(Ok(c)) => Some(c.upstream_path.as_str()),
                    _ => None,
                };
                stream.mint = mint_for(config, tenant, &identity, judged, now_s);
                let upstream = Upstream { authorization: credential, path: upstream_path };
                // A cursor's page is a GET with no body: never held for a search form (its search was judged).
                let inspect = (inspect_body && opened.is_none()).then_some(search_form);
                route(&audit, stream, tenant, &identity, inspect, upstream, out)
            }
            Decision::Forbidden { tenant, identity, refusal } => {
                if let Some(Err(e)) = &opened {
                    return refuse_cursor(&audit, *e, tenant, &identity, out);
                }
                let reason = forbid(&refusal, &tenant.id, out);
                let detail = Detail::refused(reason, tenant, &identity);
                audit.record(Outcome::Forbidden, detail, out);
                Flow::Stop
            }
            Decision::IssuerNotAllowed { tenant, identity } => {
                let rejection = Rejection::IssuerNotAllowed;
                reject(rejection, None, out);
                out.push(Effect::Count(Metric::TenantForbidden(&tenant.id)));
                let detail = Detail::refused(rejection.reason(), tenant, &identity);
                audit.record(Outcome::Rejected, detail, out);
                Flow::Stop
            }
            Decision::ClientNotAllowed { tenant, identity } => {
                let rejection = Rejection::ClientNotAllowed;
                reject(rejection, None, out);
                out.push(Effect::Count(Metric::TenantForbidden(&tenant.id)));
                out.push(Effect::Count(Metric::TenantRefused(&tenant.id, TenantRefusal::ClientNotAllowed)));
                let detail = Detail::refused(rejection.reason(), tenant, &identity);
                audit.record(Outcome::Rejected, detail, out);
                Flow::Stop
            }
            Decision::UnknownKey { provider } => {
                match park(config, keys, stream, request, provider, now_ms, may_wait) {
                    Parking::Parked => {
                        out.push(Effect::Count(Metric::JwksUnknownKidWaits));
                        Flow::WaitForKeys
                    }
                    Parking::Full => {
                        let retry_after = retry_after_s(keys, tenants, Rejection::WaitQueueFull, now_ms);
                        refuse(&audit, Rejection::WaitQueueFull, Some(retry_after), out)
                    }
                    Parking::Refused => refuse(&audit, Rejection::UnknownKey, None, out),
                }
            }
            Decision::Reject(rejection) => {
                let retry_after = rejection.is_transient().then(|| retry_after_s(keys, tenants, rejection, now_ms));
                refuse(&audit, rejection, retry_after, out)
            }
        }
    }

    /// The allowlist's verdict on a Bundle posted to the base (the request's audit line waited for it).
    fn judge_bundle(&mut self, stream: &mut Stream, body: &[u8], now_ms: u64, out: &mut dyn Effects) -> Flow {
        let Phase::Inspecting(inspection) = std::mem::replace(&mut stream.phase, Phase::Decided) else {
            return Flow::Continue;
        };
        let Inspection { search, narrowed, opaque, policy, tenant, audit, scopes, require_scopes, quota } = *inspection;
        let base = self.config.public_base_url.as_deref();
        // The types its entries create, update or patch: the batch-response may show what they wrote.
        let written = std::cell::RefCell::new(Vec::new());
        let also = |method: &str, c: &crate::fhir::Classified<'_>| {
            use crate::fhir::Interaction;
            scopes.check(require_scopes, method, c)?;
            if matches!(c.interaction, Interaction::Create | Interaction::Update | Interaction::Patch) {
                if let Some(t) = c.resource_type {
                    written.borrow_mut().push(t.to_string());
                }
            }
            Ok(())
        };
        let verdict = match &search {
            // A form it cannot read as the server would: its reach (or its `_count`) is unknown.
            Some(_) if opaque => Err(Refusal::OpaqueForm),
            Some(path) => {
                let judge = crate::fhir::Judge { narrowed, form: Some(body), if_none_exist: None };
                policy.check_request_with("POST", path, &judge, &also).map(|_| ())
            }
            None => policy.check_bundle_with(body, base, narrowed, &also),
        };
        if let Some(check) = stream.check.as_deref_mut() {
            check.readable.extend(written.into_inner());
        }
        // Refused (its outcome and reason), by the allowlist or scopes, else by the quota, charged its entries
        // (a search form: its `_count`).
        let mut refused = verdict.err().map(|refusal| (Outcome::Forbidden, forbid(&refusal, &tenant, out)));
        if let (None, Some(quota)) = (&refused, quota.filter(|_| !stream.charged)) {
            stream.charged = true;
            let cost = match &search {
                Some(path) => crate::quota::request_cost(&quota, "POST", path, Some(body)),
                None => crate::quota::bundle_cost(&quota, body),
            };
            if let Some(reason) = crate::quota::never_fits(&quota, &tenant, cost, out) {
                refused = Some((Outcome::Rejected, reason));
            } else {
                match self.quotas.admit(&quota, &tenant, cost, now_ms, out) {
                    Ok(slot) => stream.quota_slot = slot,
                    Err(verdict) => refused = Some((Outcome::Rejected, crate::quota::reply(&quota, verdict, out))),
                }
            }
        }
        let allowed = refused.is_none();
        if allowed {
            out.push(Effect::Count(Metric::TenantAllowed(&tenant)));
        }
        if self.config.decision_metadata || self.config.span_tags {
            let outcome = refused.map_or(Outcome::Allowed, |(outcome, _)| outcome);
            let reason = refused.map(|(_, reason)| reason);
            let decision = crate::metadata::Decision { outcome: Some(outcome.name()), reason, ..Default::default() };
            if self.config.decision_metadata {
                decision.push(out);
            }
            if self.config.span_tags {
                decision.push_span_tags(None, out);
            }
        }
        if let Some(pending) = audit {
            let detail = Detail {
                reason: refused.map(|(_, reason)| reason),
                tenant: Some(&tenant),
                identity: Some(&pending.identity),
                // The cluster it was for, whatever the verdict (issue 24: whose requests failed, and where to).
                cluster: Some(pending.cluster.as_str()),
                credential: allowed.then_some(pending.credential).flatten(),
            };
            let outcome = refused.map_or(Outcome::Allowed, |(outcome, _)| outcome);
            let client_address = stream.client_address.as_deref();
            let audit =
                Audit { config: &self.config, request: &pending.request, now_ms, verify_ns: None, client_address };
            if allowed && stream.check.is_some() && audit.builds_events() {
                // Written once its answer is checked (`finish_event`).
                stream.deferred_event = Some(audit.deferred(&detail));
            } else {
                audit.audit_event(outcome, &detail, out);
            }
            audit.write_line(outcome, &detail, out);
        }
        if allowed {
            Flow::Continue
        } else {
            Flow::Stop
        }
    }
}

/// Whether a cursor was minted for this tenant and client (a client id cut at 128 characters is no one's).
fn cursor_is_theirs(c: &cursor::Cursor, tenant: &str, identity: &Identity) -> bool {
    let cut = identity.whole_client_id().is_none() && identity.client_id().is_some();
    !cut && c.tenant == tenant && c.client.as_deref() == identity.whole_client_id()
}

/// What the cursors of a search's answer need (with `paging_cursors` on): the search (`request`: as the
/// client sent it, or the one a cursor continues), its tenant and client, and the cursors' expiry. `None`
/// for what is not a search, a history or an operation (no paging links), or a client id cut at 128.
fn mint_for(
    config: &Config,
    tenant: &Tenant,
    identity: &Identity,
    request: &HttpRequest<'_>,
    now_s: i64,
) -> Option<Box<Mint>> {
    use crate::fhir::Interaction;
    let paging = config.paging.as_ref()?;
    config.public_base_url.as_ref()?;
    let c = crate::fhir::classify(&request.method, &request.path)?;
    if !matches!(c.interaction, Interaction::Search | Interaction::History | Interaction::Operation) {
        return None;
    }
    if identity.whole_client_id().is_none() && identity.client_id().is_some() {
        return None;
    }
    Some(Box::new(Mint {
        tenant: tenant.id.clone(),
        client: identity.whole_client_id().map(str::to_string),
        method: request.method.to_string(),
        path: request.path.to_string(),
        expires_s: u64::try_from(now_s).unwrap_or_default().saturating_add(paging.ttl_s),
    }))
}

/// Refuses a paging request: a cursor that is not valid here, expired, or another's (400/403), or a raw
/// `_getpages`; the audit line names why.
fn refuse_cursor(
    audit: &Audit<'_>,
    error: CursorError,
    tenant: &Tenant,
    identity: &Identity,
    out: &mut dyn Effects,
) -> Flow {
    let (status, code, text) = error.answer();
    out.push(Effect::Count(Metric::CursorRefused));
    out.push(Effect::Count(Metric::TenantForbidden(&tenant.id)));
    let body = operation_outcome(code, text);
    let headers = [("content-type", "application/fhir+json"), ("cache-control", "no-store")];
    out.push(Effect::Reply(Reply { status, headers: &headers, body: body.as_bytes() }));
    let detail = Detail::refused(error.reason(), tenant, identity);
    audit.record(Outcome::Forbidden, detail, out);
    Flow::Stop
}

/// The check a request's answer needs: `None` unless its token's SMART scopes or its tenant's
/// `resource_types` narrow the types it may read.
fn answer_check(tenant: &Tenant, identity: &Identity, request: &HttpRequest<'_>) -> Option<Box<AnswerCheck>> {
    use crate::fhir::Interaction;
    // Most requests are not narrowed (`Readable::of` is `None` exactly when neither the token's scopes nor the
    // tenant's allowlist name types): they skip classifying the request a second time (issue 26's profile).
    if identity.scopes().readable_types().is_none() && tenant.policy().resource_types().is_none() {
        return None;
    }
    let classified = crate::fhir::classify(&request.method, &request.path);
    let own = classified
        .as_ref()
        .filter(|c| matches!(c.interaction, Interaction::Create | Interaction::Update | Interaction::Patch))
        .and_then(|c| c.resource_type);
    let readable = Readable::of(tenant.policy(), identity.scopes(), own)?;
    let raw_ok = classified.is_some_and(|c| {
        c.resource_type == Some("Binary")
            && matches!(c.interaction, Interaction::Read | Interaction::Vread)
            && readable.allows("Binary")
    });
    Some(Box::new(AnswerCheck { readable, tenant: tenant.id.clone(), raw_ok }))
}

/// A built AuditEvent: filter state for the access log (`audit_event`), and offered to the sink's queue
/// (`audit_sink`).
fn emit_event(config: &Config, event: &str, tenant: Option<&str>, time_ms: u64, out: &mut dyn Effects) {
    if config.audit_event {
        out.push(Effect::FilterState(crate::balp::FILTER_STATE, event));
    }
    if config.audit_sink.is_some() {
        out.push(Effect::SinkEvent { tenant, event, time_ms });
    }
}

/// 406 for a narrowed request whose `_format` asks for what the answer check cannot read (XML, Turtle):
/// counted as withheld; returns the audit line's reason.
fn unreadable_format(tenant: &str, out: &mut dyn Effects) -> &'static str {
    out.push(Effect::Count(Metric::ResponsesWithheldUnchecked));
    out.push(Effect::Count(Metric::TenantForbidden(tenant)));
    let body = operation_outcome(
        "not-supported",
        "Answers to requests narrowed by SMART scopes or a resource type allowlist are checked, and only JSON \
         can be: leave out _format or ask for json.",
    );
    let headers = [("content-type", "application/fhir+json"), ("cache-control", "no-store")];
    out.push(Effect::Reply(Reply { status: 406, headers: &headers, body: body.as_bytes() }));
    "unreadable_format"
}

/// Replaces a narrowed request's answer that holds types its client may not read (403 `forbidden`), or
/// that cannot be checked (406 `not-supported` for a format other than uncompressed JSON; 502 `exception`
/// for invalid or truncated JSON), by an `OperationOutcome`; counts it and logs the tenant, the types found
/// and their counts (no path, no data). `headers_gone`: the answer's headers already reached the client, so the
/// reply cannot: Envoy resets the stream on a local reply after the response headers (its `FilterManager`:
/// "Prior headers have already been sent"), and the held body never leaves; counted and logged the same.
fn withhold(check: &AnswerCheck, verdict: &Verdict, headers_gone: bool, out: &mut dyn Effects) {
    let (status, code, text, metric, why) = match verdict {
        Verdict::Clean => return,
        Verdict::Forbidden(found) => (
            403,
            "forbidden",
            "The answer holds resources of a type this access token may not read; it was withheld.",
            Metric::ResponsesWithheldForbidden,
            format!("it holds types the token may not read: {}", found.summary()),
        ),
        Verdict::Unreadable(Unreadable::Format) => (
            406,
            "not-supported",
            "Answers to requests narrowed by SMART scopes or a resource type allowlist are checked, and only \
             uncompressed JSON can be: ask for application/fhir+json.",
            Metric::ResponsesWithheldUnchecked,
            format!("it could not be checked: {}", Unreadable::Format.name()),
        ),
        Verdict::Unreadable(why) => (
            502,
            "exception",
            "The FHIR server's answer could not be checked; it was withheld.",
            Metric::ResponsesWithheldUnchecked,
            format!("it could not be checked: {}", why.name()),
        ),
    };
    out.push(Effect::Count(metric));
    out.push(Effect::Count(Metric::TenantForbidden(&check.tenant)));
    let how = if headers_gone { "; its headers had gone on, so the stream is reset" } else { "" };
    let line = format!("tenant {}: the answer to a narrowed request was withheld ({status}{how}): {why}", check.tenant);
    out.push(Effect::Log(Level::Warn, &line));
    let body = operation_outcome(code, text);
    let headers = [("content-type", "application/fhir+json"), ("cache-control", "no-store")];
    out.push(Effect::Reply(Reply { status, headers: &headers, body: body.as_bytes() }));
}

#[cfg(test)]
#[path = "router_answer_tests.rs"]
mod answer_tests;

/// Counts the signature checks of one decision, and logs what the checker noticed (once).
fn count_checks(checks: CheckLog, out: &mut dyn Effects) {
    for _ in 0..checks.host {
        out.push(Effect::Count(Metric::SignatureHost));
    }
    for _ in 0..checks.pure_rust {
        out.push(Effect::Count(Metric::SignaturePureRust));
    }
    if let Some((error, line)) = checks.note {
        out.push(Effect::Log(if error { Level::Error } else { Level::Warn }, line));
    }
}

/// A discovery document: to the metadata cluster, without the client's `Authorization` unless configured;
/// a CapabilityStatement to patch is asked for uncompressed.
fn pass_public(audit: &Audit<'_>, stream: &mut Stream, cluster: &str, patch: bool, out: &mut dyn Effects) -> Flow {
    let config = audit.config;
    if !config.forward_authorization {
        out.push(Effect::RemoveRequestHeader("authorization"));
    }
    if patch {
        out.push(Effect::RemoveRequestHeader("accept-encoding"));
        stream.response = Some(ResponseEdit::PatchCapability);
        stream.head = audit.request.method == "HEAD";
    }
    forward_public_base(config, out);
    out.push(Effect::Count(Metric::Public));
    route_to(config, cluster, out);
    audit.record(Outcome::Public, Detail { cluster: Some(cluster), ..Detail::default() }, out);
    Flow::Continue
}

/// What a routed request carries to its upstream beyond the client's request.
#[derive(Clone, Copy, Default)]
struct Upstream<'a> {
    /// The upstream's own token (`upstream_auth`), replacing the client's `Authorization`.
    authorization: Option<&'a str>,
    /// The path a paging cursor stands for, replacing the client's.
    path: Option<&'a str>,
}

/// A verified request for `tenant`: rewritten for its FHIR server and routed to its cluster. A Bundle
/// posted to the base is held (headers too, unless `hold_bundle_headers` is off) until the allowlist has
/// judged its body, and its audit line waits for that verdict.
fn route(
    audit: &Audit<'_>,
    stream: &mut Stream,
    tenant: &Tenant,
    identity: &Identity,
    inspect: Option<bool>,
    upstream: Upstream<'_>,
    out: &mut dyn Effects,
) -> Flow {
    let config = audit.config;
    let Upstream { authorization: upstream_authorization, path: upstream_path } = upstream;
    match upstream_authorization {
        // The upstream's own token replaces the client's, whatever `forward_authorization` says.
        Some(value) => out.push(Effect::SetRequestHeader("authorization", value)),
        None if !config.forward_authorization => out.push(Effect::RemoveRequestHeader("authorization")),
        None => {}
    }
    stream.response = prepare_upstream(config, tenant, audit.request, upstream_path, out);
    if stream.check.is_some() && !matches!(stream.response, Some(ResponseEdit::RewriteLinks { .. })) {
        out.push(Effect::RemoveRequestHeader("accept-encoding")); // a compressed answer could not be checked
    }
    out.push(Effect::SetRequestHeader(&config.tenant_header, &tenant.id));
    if let Some(header) = &config.rate_limit_descriptor_header {
        out.push(Effect::SetRequestHeader(header, &tenant.id));
    }
    out.push(Effect::Count(Metric::Allowed));
    route_to(config, &tenant.cluster, out);
    if let Some(search_form) = inspect {
        let pending =
            (config.audit_log.on() || config.audit_event || config.audit_sink.is_some()).then(|| PendingAudit {
                request: audit.request.to_owned_request(),
                identity: identity.clone(),
                cluster: tenant.cluster.clone(),
                credential: tenant.credential_kind(),
            });
        if config.decision_metadata || config.span_tags {
            // Who and what now; the outcome once the body is judged (`judge_bundle`).
            let detail = Detail { tenant: Some(&tenant.id), identity: Some(identity), ..Detail::default() };
            audit.decision(None, &detail, out);
        }
        if !config.decision_metadata && config.access_log_filter_state {
            filter_state(Some(&tenant.id), Some(identity), out);
        }
        let scopes = identity.scopes();
        let narrowed = tenant.requires_smart_scopes() || scopes.is_narrowed() || tenant.policy().limits_types();
        let inspection = Inspection {
            search: search_form.then(|| audit.request.path.to_string()),
            narrowed,
            opaque: audit.request.opaque_body,
            policy: tenant.policy().clone(),
            tenant: tenant.id.clone(),
            audit: pending,
            scopes: identity.scopes().clone(),
            require_scopes: tenant.requires_smart_scopes(),
            quota: quota_of(config, tenant).cloned(),
        };
        stream.phase = Phase::Inspecting(Box::new(inspection));
        if config.hold_bundle_headers {
            // Nothing of it reaches the upstream before the verdict: not even its headers.
            return Flow::Buffer;
        }
    } else {
        out.push(Effect::Count(Metric::TenantAllowed(&tenant.id)));
        let detail = Detail {
            tenant: Some(&tenant.id),
            identity: Some(identity),
            cluster: Some(&tenant.cluster),
            credential: tenant.credential_kind(),
            ..Detail::default()
        };
        if stream.check.is_some() && audit.builds_events() {
            // Its AuditEvent says how it ended once its answer is checked (`finish_event`).
            stream.deferred_event = Some(audit.deferred(&detail));
            audit.record_with(Outcome::Allowed, detail, false, out);
        } else {
            audit.record(Outcome::Allowed, detail, out);
        }
    }
    Flow::Continue
}

/// Pushes the token request of `slot` (which counts it as under way). One that cannot be built (no
/// randomness for an assertion) is logged; the slot gives it up as lost after its timeout.
pub(crate) fn token_fetch(slot_id: u32, slot: &TokenSlot, now_ms: u64, out: &mut dyn Effects) {
    let client = &slot.client;
    let now_s = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
    match client.token_request(now_s, &mut crate::upstream_auth::fill_random) {
        Ok(request) => {
            out.push(Effect::Count(Metric::UpstreamToken(&slot.tenant, TokenEvent::Fetch)));
            out.push(Effect::Fetch(Fetch {
                target: FetchTarget::UpstreamToken { slot: slot_id, fetch: slot.fetch_number() },
                cluster: &client.cluster,
                authority: &client.authority,
                path: &client.path,
                timeout_ms: client.timeout_ms,
                post: Some(Post {
                    authorization: request.authorization.as_deref(),
                    form: &request.body,
                    content_type: FORM,
                }),
            }));
        }
        Err(e) => {
            let line = format!("upstream token for tenant {}: the request could not be built: {}", slot.tenant, e.0);
            out.push(Effect::Log(Level::Error, &line));
        }
    }
}

/// What became of a request whose token names a `kid` its provider's keys lack.
enum Parking {
    /// It waits for the refetch.
    Parked,
    /// No refetch may happen now (or it already waited, or the keys are inline): the `kid` is unknown.
    Refused,
    /// A refetch is due, but `jwks_max_waiting` requests already wait for it: retry later.
    Full,
}

/// Parks a request whose token names a `kid` that `provider`'s keys lack, if `may_wait`, that provider's
/// keys are fetched and a refetch may happen now (or is under way), and its queue has room.
fn park(
    config: &Config,
    keys: &mut KeyStates,
    stream: &mut Stream,
    request: &HttpRequest<'_>,
    provider: usize,
    now_ms: u64,
    may_wait: bool,
) -> Parking {
    let Some(JwksSource::Remote(remote)) = config.providers.get(provider).map(|p| &p.jwks) else {
        return Parking::Refused;
    };
    let Some(state) = keys.0.get_mut(provider) else { return Parking::Refused };
    if !may_wait {
        return Parking::Refused;
    }
    if state.waiting.len() >= remote.max_waiting {
        // Waiters mean a refetch is still to come (they leave the queue when it ends); with none allowed
        // (`jwks_max_waiting: 0`) the `kid` is simply unknown.
        return if remote.max_waiting == 0 { Parking::Refused } else { Parking::Full };
    }
    // Requests already waiting mean a refetch is pending (this router's, or, in the dynamic module, its
    // main thread's): wait for it too. Otherwise ask the schedule, which rate-limits on-demand refetches.
    let pending = !state.waiting.is_empty();
    if !pending && !state.schedule.as_mut().is_some_and(|s| s.unknown_kid(now_ms, remote.min_refetch_ms)) {
        return Parking::Refused;
    }
    state.waiting.push(stream.context_id);
    stream.phase = Phase::WaitingForKeys { provider, request: Box::new(request.to_owned_request()) };
    Parking::Parked
}

/// Refuses the token: the answer, and the audit line.
fn refuse(audit: &Audit<'_>, rejection: Rejection, retry_after_s: Option<u64>, out: &mut dyn Effects) -> Flow {
    reject(rejection, retry_after_s, out);
    audit.record(Outcome::Rejected, Detail { reason: Some(rejection.reason()), ..Detail::default() }, out);
    Flow::Stop
}

/// The quota that applies to `tenant` (its own, or the default).
pub(crate) fn quota_of<'a>(config: &'a Config, tenant: &'a Tenant) -> Option<&'a Arc<crate::quota::Quota>> {
    crate::quota::effective(tenant.settings.as_deref().map(|s| &s.quota), config.quota.as_ref())
}

/// Refuses a request over its tenant's quota: 429 with `Retry-After` and an `OperationOutcome` naming the
/// limit, and the audit line with the reason.
fn limited(
    audit: &Audit<'_>,
    quota: &crate::quota::Quota,
    verdict: crate::quota::Verdict,
    tenant: &Tenant,
    identity: &Identity,
    out: &mut dyn Effects,
) -> Flow {
    let reason = crate::quota::reply(quota, verdict, out);
    let detail = Detail::refused(reason, tenant, identity);
    audit.record(Outcome::Rejected, detail, out);
    Flow::Stop
}

/// Refuses a verified request whose tenant's upstream token is not to be had (503 with `Retry-After`); its
/// audit line names the tenant, the client and the cluster (the token was verified: whose request failed,
/// and where it was going).
fn unavailable(
    audit: &Audit<'_>,
    tenant: &Tenant,
    identity: &Identity,
    retry_after_s: u64,
    out: &mut dyn Effects,
) -> Flow {
    let rejection = Rejection::UpstreamAuthUnavailable;
    reject(rejection, Some(retry_after_s), out);
    let detail = Detail::refused(rejection.reason(), tenant, identity);
    audit.record(Outcome::Rejected, detail, out);
    Flow::Stop
}

/// Seconds until the next attempt at what is missing (at least 1): the `Retry-After` of a 503.
fn retry_after_s(keys: &KeyStates, tenants: &TenantState, rejection: Rejection, now_ms: u64) -> u64 {
    match rejection {
        Rejection::TenantsUnavailable => tenants.schedule.as_ref().map_or(1, |s| s.retry_after_s(now_ms)),
        _ => keys.0.iter().filter_map(|s| s.schedule.as_ref()).map(|s| s.retry_after_s(now_ms)).min().unwrap_or(1),
    }
}

/// Points Envoy's `cluster_header` route at `cluster`, and makes Envoy pick the route again.
fn route_to(config: &Config, cluster: &str, out: &mut dyn Effects) {
    out.push(Effect::SetRequestHeader(&config.route_header, cluster));
    out.push(Effect::ClearRouteCache);
}

/// The answer to a refused token: constant body and `WWW-Authenticate`; `Retry-After` when transient.
fn reject(rejection: Rejection, retry_after_s: Option<u64>, out: &mut dyn Effects) {
    out.push(Effect::Count(Metric::Rejected(rejection)));
    let retry_after = retry_after_s.map(|s| s.to_string());
    let mut headers = [("content-type", "application/fhir+json"), ("cache-control", "no-store"), ("", "")];
    let mut n = 2;
    if let Some(www) = rejection.www_authenticate() {
        headers[2] = ("www-authenticate", www);
        n = 3;
    } else if let Some(retry) = retry_after.as_deref() {
        headers[2] = ("retry-after", retry);
        n = 3;
    }
    let headers = headers.get(..n).unwrap_or_default();
    out.push(Effect::Reply(Reply {
        status: rejection.status(),
        headers,
        body: rejection.operation_outcome().as_bytes(),
    }));
}

/// 403 for a request of `tenant` that its allowlist, or the token's SMART scopes, refuse; the message names
/// the interaction (and Bundle entry). A missing scope is RFC 6750's `insufficient_scope`, with the scope
/// the request needs in `WWW-Authenticate`. Counts it, and returns the audit line's reason.
fn forbid(refusal: &Refusal, tenant: &str, out: &mut dyn Effects) -> &'static str {
    let body = operation_outcome("forbidden", &refusal.to_string());
    let mut headers = [("content-type", "application/fhir+json"), ("cache-control", "no-store"), ("", "")];
    let www;
    let (n, reason) = if let Refusal::MissingScope { scope, .. } = refusal {
        out.push(Effect::Count(Metric::ForbiddenByScope));
        out.push(Effect::Count(Metric::TenantRefused(tenant, TenantRefusal::InsufficientScope)));
        // The scope is a resource type (ASCII letters and digits) and fixed text: nothing to escape.
        www = format!("Bearer realm=\"{REALM}\", error=\"insufficient_scope\", scope=\"{scope}\"");
        headers[2] = ("www-authenticate", &www);
        (3, TenantRefusal::InsufficientScope.name())
    } else {
        out.push(Effect::Count(Metric::ForbiddenByPolicy));
        (2, "allowlist")
    };
    out.push(Effect::Count(Metric::TenantForbidden(tenant)));
    let headers = headers.get(..n).unwrap_or_default();
    out.push(Effect::Reply(Reply { status: 403, headers, body: body.as_bytes() }));
    reason
}

/// Tells the upstream how clients reach this endpoint, for servers that build their links from
/// `X-Forwarded-Host`/`-Proto`/`-Prefix`: from `public_base_url`, never from the request (whose copies
/// [`Router::read_request`] removed; `-Proto` is overwritten here). Without `public_base_url` the first and
/// last are left unset, and `-Proto` is as Envoy left it.
fn forward_public_base(config: &Config, out: &mut dyn Effects) {
    let Some(public) = &config.public_base_url else { return };
    let (proto, rest) = public.split_once("://").unwrap_or(("http", public.as_str()));
    let (host, prefix) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    out.push(Effect::SetRequestHeader(FORWARDED_HOST, host));
    out.push(Effect::SetRequestHeader(FORWARDED_PROTO, proto));
    if !prefix.is_empty() {
        out.push(Effect::SetRequestHeader(FORWARDED_PREFIX, prefix));
    }
}

/// Rewrites the request for the tenant's FHIR server as it really is, and says what the response needs.
/// Links are rewritten to `public_base_url` only (the configuration refuses a tenant that rewrites links
/// without it).
fn prepare_upstream(
    config: &Config,
    tenant: &Tenant,
    request: &HttpRequest<'_>,
    upstream_path: Option<&str>,
    out: &mut dyn Effects,
) -> Option<ResponseEdit> {
    forward_public_base(config, out);
    let Some(settings) = tenant.settings.as_deref() else {
        if let Some(path) = upstream_path {
            out.push(Effect::SetRequestHeader(":path", path));
        }
        return None;
    };
    if let Some(authority) = &settings.authority {
        out.push(Effect::SetRequestHeader(":authority", authority));
    }
    if !settings.base_path.is_empty() || upstream_path.is_some() {
        let path = format!("{}{}", settings.base_path, upstream_path.unwrap_or(&request.path));
        out.push(Effect::SetRequestHeader(":path", &path));
    }
    if let Some((name, value)) = &settings.header {
        out.push(Effect::SetRequestHeader(name, value));
    }
    let from = settings.links_base_url.clone()?;
    let to = config.public_base_url.clone()?;
    out.push(Effect::RemoveRequestHeader("accept-encoding")); // a compressed body could not be rewritten
    Some(ResponseEdit::RewriteLinks { from, to })
}

/// Tenant and client id as filter state for the access log, named as Envoy's access log formatter reads them
/// (`%FILTER_STATE(wasm.fhir_tenant_router.tenant:PLAIN)%`) whichever build sets them, so one access log
/// format serves both: the proxy-wasm host adds the `wasm.` itself, and the wasm shell leaves it off.
fn filter_state(tenant: Option<&str>, identity: Option<&Identity>, out: &mut dyn Effects) {
    if let Some(tenant) = tenant {
        out.push(Effect::FilterState("wasm.fhir_tenant_router.tenant", tenant));
    }
    if let Some(client_id) = identity.and_then(Identity::client_id) {
        out.push(Effect::FilterState("wasm.fhir_tenant_router.client_id", client_id));
    }
}

/// A method override header (`X-HTTP-Method-Override`, `X-HTTP-Method`, `X-Method-Override`), in any case and
/// with `_` for any `-`: Envoy passes headers with underscores on by default, and a CGI-style server (PHP, WSGI)
/// reads `X_HTTP_METHOD_OVERRIDE` as `X-HTTP-Method-Override` (both are `HTTP_X_HTTP_METHOD_OVERRIDE`).
fn is_override_header(name: &[u8]) -> bool {
    const NAMES: [&[u8]; 3] = [b"x-http-method-override", b"x-http-method", b"x-method-override"];
    // Most headers are none of these lengths: one comparison (this runs for nearly every header).
    if !matches!(name.len(), 13 | 17 | 22) {
        return false;
    }
    NAMES.iter().any(|known| {
        known.len() == name.len()
            && known.iter().zip(name).all(|(k, n)| k.eq_ignore_ascii_case(n) || (*k == b'-' && *n == b'_'))
    })
}

/// The configured issuer of a verified token: that of the provider whose keys verified it (kept with its
/// identity, so the token is not read again).
fn issuer_of<'c>(config: &'c Config, identity: &Identity) -> Option<&'c str> {
    config.providers.get(identity.provider()).map(|p| p.provider.issuer.as_str())
}

/// Writes what the configuration asks for about one decided request: the filter state the access log
/// reads, and the audit line (built only when the audit line is on).
struct Audit<'a> {
    config: &'a Config,
    request: &'a HttpRequest<'a>,
    now_ms: u64,
    /// How long checking the token and deciding took (`span_tags` only).
    verify_ns: Option<u64>,
    /// The client's IP address (`audit_event`, `audit_sink`).
    client_address: Option<&'a str>,
}

impl Audit<'_> {
    fn record(&self, outcome: Outcome, detail: Detail<'_>, out: &mut dyn Effects) {
        self.record_with(outcome, detail, true, out);
    }

    /// As [`Audit::record`]; `event`: false when the AuditEvent waits for the answer's check.
    fn record_with(&self, outcome: Outcome, detail: Detail<'_>, event: bool, out: &mut dyn Effects) {
        // `decision_metadata` sets the access log's two keys too (each key once: see `metadata`).
        if self.config.decision_metadata || self.config.span_tags {
            self.decision(Some(outcome), &detail, out);
        }
        if !self.config.decision_metadata && self.config.access_log_filter_state {
            filter_state(detail.tenant, detail.identity, out);
        }
        if event {
            self.audit_event(outcome, &detail, out);
        }
        self.write_line(outcome, &detail, out);
    }

    /// Whether AuditEvents are built (`audit_event`, `audit_sink`).
    fn builds_events(&self) -> bool {
        self.config.audit_event || self.config.audit_sink.is_some()
    }

    /// An allowed request's AuditEvent, to be written once its answer is checked.
    fn deferred(&self, detail: &Detail<'_>) -> Box<DeferredEvent> {
        Box::new(DeferredEvent {
            time_ms: self.now_ms,
            method: self.request.method.to_string(),
            path: self.request.path.to_string(),
            tenant: detail.tenant.unwrap_or_default().to_string(),
            client_id: detail.identity.and_then(Identity::client_id).map(str::to_string),
            issuer: detail.identity.and_then(|i| issuer_of(self.config, i)).map(str::to_string),
            cluster: detail.cluster.map(str::to_string),
            client_address: self.client_address.map(Into::into),
        })
    }

    /// The BALP AuditEvent ([`crate::balp`]) as filter state for the access log (`audit_event`), and
    /// offered to the audit sink's queue (`audit_sink`).
    fn audit_event(&self, outcome: Outcome, detail: &Detail<'_>, out: &mut dyn Effects) {
        if !self.config.audit_event && self.config.audit_sink.is_none() {
            return;
        }
        let request = self.request;
        let event = crate::balp::Event {
            time_ms: self.now_ms,
            method: &request.method,
            path: &request.path,
            outcome,
            reason: detail.reason,
            tenant: detail.tenant,
            client_id: detail.identity.and_then(Identity::client_id),
            issuer: detail.identity.and_then(|i| issuer_of(self.config, i)),
            cluster: detail.cluster,
            client_address: self.client_address,
        }
        .to_json();
        emit_event(self.config, &event, detail.tenant, self.now_ms, out);
    }

    /// The decision as filter state and dynamic metadata ([`crate::metadata`], `decision_metadata`) and as
    /// span tags (`span_tags`): who asked (from the verified token only), what for, and `outcome` once it is
    /// known.
    fn decision(&self, outcome: Option<Outcome>, detail: &Detail<'_>, out: &mut dyn Effects) {
        use crate::decision::{override_method, query_method_override};
        let request = self.request;
        let named = match request.method_override.as_deref() {
            Some(header) => override_method(header),
            None => query_method_override(&request.path).as_deref().and_then(override_method),
        };
        let interaction = crate::metadata::interaction(&request.method, &request.path, named);
        let identity = detail.identity;
        let scopes = identity.and_then(|i| i.scopes().granted());
        let decision = crate::metadata::Decision {
            tenant: detail.tenant,
            // The whole client id only: a cut one could be another client's too, and a control character
            // would break a text access-log line (`%FILTER_STATE(...:PLAIN)%` writes it raw). Unset, a policy
            // that needs it fails closed.
            client_id: identity.and_then(Identity::whole_client_id).filter(|id| !id.chars().any(char::is_control)),
            issuer: identity.and_then(|i| issuer_of(self.config, i)),
            scopes: scopes.as_deref(),
            interaction: interaction.as_deref(),
            resource_type: crate::metadata::resource_type(&request.method, &request.path),
            outcome: outcome.map(Outcome::name),
            reason: detail.reason,
        };
        if self.config.decision_metadata {
            decision.push(out);
        }
        if self.config.span_tags {
            let verify_ns = self.verify_ns.map(|ns| ns.to_string());
            decision.push_span_tags(verify_ns.as_deref(), out);
        }
    }

    fn write_line(&self, outcome: Outcome, detail: &Detail<'_>, out: &mut dyn Effects) {
        let audit_log = self.config.audit_log;
        if !audit_log.on() {
            return;
        }
        let line = Record {
            time_ms: self.now_ms,
            method: &self.request.method,
            path: &self.request.path,
            outcome,
            reason: detail.reason,
            tenant: detail.tenant,
            identity: detail.identity,
            cluster: detail.cluster,
            credential: detail.credential,
        }
        .to_line();
        if audit_log == AuditLog::FilterState {
            // The same line, for Envoy's access log to write (one host call, no log call).
            out.push(Effect::FilterState(AUDIT_LINE_FILTER_STATE, &line));
        } else {
            out.push(Effect::Log(Level::Info, &line));
        }
    }
}

#[cfg(test)]
mod issuer_tests {
    use serde_json::json;

    use super::answer_tests::{plugin, router_with, send};
    use crate::testkeys::{self, TENANT_A};

    /// The `issuer` key of the decision is the configured issuer of the provider whose keys verified the
    /// token, carried with its identity (a cache hit included), not read from the token again.
    #[test]
    fn the_decisions_issuer_is_the_verifying_providers_on_a_miss_and_on_a_hit() {
        let mut p = plugin();
        let ours = p.as_object_mut().unwrap().remove("provider").unwrap();
        let mut other = ours.clone();
        other["issuer"] = json!("https://other-idp.example");
        p["providers"] = json!([other, ours]);
        p["decision_metadata"] = json!(true);
        let mut router = router_with(&p);
        let auth = format!("Bearer {}", testkeys::sign_rs256(&testkeys::claims_now()));
        let issuer = format!(r#"FilterState("wasm.fhir_tenant_router.issuer", "{}")"#, testkeys::ISSUER);
        for _ in 0..2 {
            let (_, _, effects) = send(&mut router, "GET", "/Patient", &auth);
            assert!(effects.contains(&issuer), "{effects:#?}");
            assert!(effects.iter().any(|e| e.contains(TENANT_A)), "{effects:#?}");
        }
    }
}
