//! What the core asks a shell to do. Every host event goes into the core ([`crate::router::Router`]) as
//! plain data, and comes back as an ordered series of [`Effect`]s pushed into a sink, plus a [`Flow`]: a
//! shell reads its inputs from the host, hands them over, and applies what comes back, in order. It decides
//! nothing itself.
//!
//! Effects borrow what they name (header names and values, bodies) for the duration of the push, so a
//! cache hit allocates nothing to describe what must happen: a sink applies each effect as it arrives.

use crate::rejection::Rejection;

/// Receives the effects of one event, in order. A shell applies each at once; tests record them.
pub trait Effects {
    fn push(&mut self, effect: Effect<'_>);
}

/// One thing for the host to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect<'a> {
    /// Set a request header (replacing any value), before the request goes on.
    SetRequestHeader(&'a str, &'a str),
    /// Remove a request header.
    RemoveRequestHeader(&'a str),
    /// Make Envoy pick the route again (a routing header changed).
    ClearRouteCache,
    /// Answer the request locally; it goes no further.
    Reply(Reply<'a>),
    /// Filter state for the access log (`%FILTER_STATE(<name>:PLAIN)%`).
    FilterState(&'a str, &'a str),
    /// Dynamic metadata: these string entries under this namespace, in one call (the dynamic module; a
    /// proxy-wasm host cannot set dynamic metadata, and the wasm shell drops it).
    DynamicMetadata(&'a str, &'a [(&'a str, &'a str)]),
    /// Tags of the request's trace span (`span_tags`), by full name (`fhir_tenant_router.tenant`): the
    /// dynamic module sets them on Envoy's active span (none when tracing is off); proxy-wasm has no span,
    /// so the wasm shell sets each as filter state of that name (`wasm.` in front, as every property it
    /// sets), which Envoy's tracing `custom_tags` read.
    SpanTags(&'a [(&'a str, &'a str)]),
    /// Add one to a counter.
    Count(Metric<'a>),
    /// Set a gauge.
    Gauge(Gauge, u64),
    /// A line for Envoy's log (the audit line is one, at `Info`).
    Log(Level, &'a str),
    /// Set a response header (replacing any value).
    SetResponseHeader(&'a str, &'a str),
    /// Remove a response header.
    RemoveResponseHeader(&'a str),
    /// Replace the whole (buffered) response body.
    ReplaceResponseBody(&'a [u8]),
    /// Let a request that waited (for keys) go on.
    ResumeRequest,
    /// Start a GET through an Envoy cluster; its outcome comes back as a fetch result for `target`.
    Fetch(Fetch<'a>),
    /// Send a request again (with these headers; it has no body) through `cluster`; the answer comes back as [`FetchTarget::Resend`] of this request.
    Resend(Resend<'a>),
}

/// A safe request sent again with a new upstream token (its `Debug` does not show the token).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Resend<'a> {
    /// The request's context id (its answer comes back as [`FetchTarget::Resend`] of it).
    pub context_id: u32,
    pub cluster: &'a str,
    /// Every header to send, pseudo-headers included: as the request left, with the new `authorization`.
    pub headers: &'a [(&'a str, &'a str)],
    pub timeout_ms: u64,
}

impl std::fmt::Debug for Resend<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resend").field("cluster", &self.cluster).field("timeout_ms", &self.timeout_ms).finish()
    }
}

/// A local answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply<'a> {
    pub status: u32,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// What a fetch is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FetchTarget {
    /// The JWKS of the provider at this index.
    Jwks(usize),
    /// The OpenID Provider Configuration of the provider at this index (configuration from discovery): its
    /// `jwks_uri` is fetched next, as [`FetchTarget::Jwks`].
    Discovery(usize),
    /// The tenant registry.
    Registry,
    /// An upstream access token for the token slot `slot`: its fetch numbered `fetch`.
    UpstreamToken { slot: u32, fetch: u32 },
    /// The answer to a request sent again ([`Effect::Resend`]) by the request with this context id.
    Resend(u32),
}

/// An outgoing request: a GET, or a token request's POST (whose `authorization` and `body` may hold a
/// client secret: its `Debug` shows neither).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fetch<'a> {
    pub target: FetchTarget,
    pub cluster: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub timeout_ms: u64,
    /// A POST of this form body (`application/x-www-form-urlencoded`), with this `Authorization`; `None`: a GET.
    pub post: Option<Post<'a>>,
}

/// The body of a POST fetch.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Post<'a> {
    pub authorization: Option<&'a str>,
    pub form: &'a str,
}

impl std::fmt::Debug for Fetch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetch")
            .field("target", &self.target)
            .field("cluster", &self.cluster)
            .field("authority", &self.authority)
            .field("path", &self.path)
            .field("timeout_ms", &self.timeout_ms)
            .field("post", &self.post.map(|_| "(form not shown)"))
            .finish()
    }
}

impl<'a> Fetch<'a> {
    /// The request headers of this fetch, pseudo-headers first.
    pub fn headers(&self) -> Vec<(&'a str, &'a str)> {
        let method = if self.post.is_some() { "POST" } else { "GET" };
        let mut headers = vec![
            (":method", method),
            (":path", self.path),
            (":authority", self.authority),
            ("accept", "application/json"),
        ];
        if let Some(post) = &self.post {
            headers.push(("content-type", "application/x-www-form-urlencoded"));
            if let Some(authorization) = post.authorization {
                headers.push(("authorization", authorization));
            }
        }
        headers
    }

    /// The body: the form of a POST, nothing for a GET.
    pub fn body(&self) -> &'a [u8] {
        self.post.map_or(&[], |p| p.form.as_bytes())
    }
}

/// What happens to the request (or response) after an event's effects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Let it go on.
    Continue,
    /// Stop here: it was answered locally (or ended).
    Stop,
    /// Hold it until a fetch it waits for ends: a key set, or its tenant's upstream token (the stream is
    /// woken by context id).
    WaitForKeys,
    /// Hold it and buffer the body: the core judges (or edits) it whole at its end.
    Buffer,
}

impl Flow {
    /// Whether the host should let the stream go on now.
    pub fn proceeds(self) -> bool {
        self == Flow::Continue
    }
}

/// Log levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// The counters. Names (under `fhir_tenant_router.`) are [`Metric::name`]'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric<'a> {
    Allowed,
    Public,
    Rejected(Rejection),
    ForbiddenByPolicy,
    JwksFetchOk,
    JwksFetchFailed,
    JwksUnknownKidWaits,
    SignatureHost,
    SignaturePureRust,
    CacheHits,
    CacheMisses,
    RegistryFetchOk,
    RegistryFetchFailed,
    /// Refused: the token's SMART scopes do not grant the request (or a Bundle entry).
    ForbiddenByScope,
    /// A key of a fetched key set that the configured verifier cannot check (P-384 under `pure_rust` in a
    /// build without pure-Rust P-384), counted at each fetch that brings it.
    JwksUncheckableKey,
    /// A request of this tenant went on.
    TenantAllowed(&'a str),
    /// A request of this tenant was refused (allowlist, issuer binding).
    TenantForbidden(&'a str),
    /// Something about this tenant's upstream token.
    UpstreamToken(&'a str, TokenEvent),
    /// A request of this tenant was refused for this reason (also counted as [`Metric::TenantForbidden`]).
    TenantRefused(&'a str, TenantRefusal),
    /// A request of this tenant was within its quota (`true`) or refused by it (`false`).
    TenantQuota(&'a str, bool),
    /// A request let through uncharged: its quota's store lost every compare-and-swap, or is unavailable.
    QuotaUnchecked,
    /// The answer to a narrowed request held types its client may not read, and was withheld.
    ResponsesWithheldForbidden,
    /// The answer to a narrowed request could not be checked (not JSON, invalid or truncated), and was
    /// withheld.
    ResponsesWithheldUnchecked,
    /// A paging request was refused: its cursor is not valid here, expired or another's, or it used a raw
    /// `_getpages`.
    CursorRefused,
}

/// A per-tenant refusal counted on its own (`tenant.<id>.<name>`), beyond `tenant.<id>.forbidden`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TenantRefusal {
    /// The token's SMART scopes do not grant the interaction (or a Bundle entry's), or the tenant requires
    /// SMART scopes and the token has none.
    InsufficientScope,
    /// The token's client is not one of the tenant's `allowed_clients`.
    ClientNotAllowed,
}

impl TenantRefusal {
    /// All of them, in the order a shell defines them.
    pub const ALL: [TenantRefusal; 2] = [TenantRefusal::InsufficientScope, TenantRefusal::ClientNotAllowed];

    /// Position in [`TenantRefusal::ALL`].
    pub fn index(self) -> usize {
        match self {
            Self::InsufficientScope => 0,
            Self::ClientNotAllowed => 1,
        }
    }

    /// The stat's name under `tenant.<id>.` (and the audit line's `reason`).
    pub fn name(self) -> &'static str {
        match self {
            Self::InsufficientScope => "insufficient_scope",
            Self::ClientNotAllowed => "client_not_allowed",
        }
    }
}

/// What happened about a tenant's upstream token (`tenant.<id>.upstream_token.<name>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenEvent {
    /// A token request was sent.
    Fetch,
    /// A token request failed (no answer, an error, or not a token).
    Failure,
    /// A token replaced one still usable (refreshed ahead of expiry).
    Refresh,
    /// A request waited for the tenant's token.
    Wait,
    /// The upstream refused a token (401) and a safe request was sent again with a new one.
    Retry,
}

impl TokenEvent {
    /// All events, in the order a shell defines them.
    pub const ALL: [TokenEvent; 5] =
        [TokenEvent::Fetch, TokenEvent::Failure, TokenEvent::Refresh, TokenEvent::Wait, TokenEvent::Retry];

    /// Position in [`TokenEvent::ALL`].
    pub fn index(self) -> usize {
        match self {
            Self::Fetch => 0,
            Self::Failure => 1,
            Self::Refresh => 2,
            Self::Wait => 3,
            Self::Retry => 4,
        }
    }

    /// The stat's name under `tenant.<id>.`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fetch => "upstream_token.fetches",
            Self::Failure => "upstream_token.failures",
            Self::Refresh => "upstream_token.refreshes",
            Self::Wait => "upstream_token.waits",
            Self::Retry => "upstream_token.retries",
        }
    }
}

/// The fixed counters, in the order a shell defines them.
pub const COUNTERS: [Metric<'static>; 18] = [
    Metric::Allowed,
    Metric::Public,
    Metric::ForbiddenByPolicy,
    Metric::JwksFetchOk,
    Metric::JwksFetchFailed,
    Metric::JwksUnknownKidWaits,
    Metric::SignatureHost,
    Metric::SignaturePureRust,
    Metric::CacheHits,
    Metric::CacheMisses,
    Metric::RegistryFetchOk,
    Metric::RegistryFetchFailed,
    Metric::JwksUncheckableKey,
    Metric::ForbiddenByScope,
    Metric::QuotaUnchecked,
    Metric::ResponsesWithheldForbidden,
    Metric::ResponsesWithheldUnchecked,
    Metric::CursorRefused,
];

/// Where a shell keeps a counter's id: [`COUNTERS`] position, [`Rejection::ALL`] position, or a
/// per-tenant counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterSlot<'a> {
    Fixed(usize),
    Rejected(usize),
    Tenant { tenant: &'a str, allowed: bool },
    TenantToken { tenant: &'a str, event: TokenEvent },
    TenantRefusal { tenant: &'a str, refusal: TenantRefusal },
    TenantQuota { tenant: &'a str, allowed: bool },
}

impl<'a> Metric<'a> {
    /// Where a shell finds this counter's id.
    pub fn slot(self) -> CounterSlot<'a> {
        match self {
            Self::Allowed => CounterSlot::Fixed(0),
            Self::Public => CounterSlot::Fixed(1),
            Self::ForbiddenByPolicy => CounterSlot::Fixed(2),
            Self::JwksFetchOk => CounterSlot::Fixed(3),
            Self::JwksFetchFailed => CounterSlot::Fixed(4),
            Self::JwksUnknownKidWaits => CounterSlot::Fixed(5),
            Self::SignatureHost => CounterSlot::Fixed(6),
            Self::SignaturePureRust => CounterSlot::Fixed(7),
            Self::CacheHits => CounterSlot::Fixed(8),
            Self::CacheMisses => CounterSlot::Fixed(9),
            Self::RegistryFetchOk => CounterSlot::Fixed(10),
            Self::RegistryFetchFailed => CounterSlot::Fixed(11),
            Self::JwksUncheckableKey => CounterSlot::Fixed(12),
            Self::ForbiddenByScope => CounterSlot::Fixed(13),
            Self::QuotaUnchecked => CounterSlot::Fixed(14),
            Self::ResponsesWithheldForbidden => CounterSlot::Fixed(15),
            Self::ResponsesWithheldUnchecked => CounterSlot::Fixed(16),
            Self::CursorRefused => CounterSlot::Fixed(17),
            Self::Rejected(r) => CounterSlot::Rejected(r.index()),
            Self::TenantAllowed(tenant) => CounterSlot::Tenant { tenant, allowed: true },
            Self::TenantForbidden(tenant) => CounterSlot::Tenant { tenant, allowed: false },
            Self::UpstreamToken(tenant, event) => CounterSlot::TenantToken { tenant, event },
            Self::TenantRefused(tenant, refusal) => CounterSlot::TenantRefusal { tenant, refusal },
            Self::TenantQuota(tenant, allowed) => CounterSlot::TenantQuota { tenant, allowed },
        }
    }
}

impl Metric<'_> {
    /// The stat's name under the filter's prefix (`requests.rejected.<reason>` for a refusal,
    /// `tenant.<id>.allowed` and `tenant.<id>.forbidden` for the per-tenant counters, named by the shell).
    pub fn name(self) -> &'static str {
        match self {
            Self::Allowed => "requests.allowed",
            Self::Public => "requests.public",
            Self::Rejected(r) => r.stat_name(),
            Self::ForbiddenByPolicy => "requests.forbidden_by_policy",
            Self::JwksFetchOk => "jwks.fetch_ok",
            Self::JwksFetchFailed => "jwks.fetch_failed",
            Self::JwksUnknownKidWaits => "jwks.unknown_kid_refetch_waits",
            Self::SignatureHost => "signature.host",
            Self::SignaturePureRust => "signature.pure_rust",
            Self::CacheHits => "cache.hits",
            Self::CacheMisses => "cache.misses",
            Self::RegistryFetchOk => "registry.fetch_ok",
            Self::RegistryFetchFailed => "registry.fetch_failed",
            Self::JwksUncheckableKey => "jwks.uncheckable_keys",
            Self::ForbiddenByScope => "requests.forbidden_by_scope",
            Self::TenantAllowed(_) => "tenant.allowed",
            Self::TenantForbidden(_) => "tenant.forbidden",
            Self::UpstreamToken(_, event) => event.name(),
            Self::TenantRefused(_, refusal) => refusal.name(),
            Self::TenantQuota(_, true) => "quota.allowed",
            Self::TenantQuota(_, false) => "quota.limited",
            Self::QuotaUnchecked => "quota.unchecked",
            Self::ResponsesWithheldForbidden => "responses.withheld.forbidden_type",
            Self::ResponsesWithheldUnchecked => "responses.withheld.unchecked",
            Self::CursorRefused => "requests.cursor_refused",
        }
    }
}

/// The gauges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gauge {
    JwksKeys,
    CacheEntries,
    VmMemoryBytes,
    RegistryTenants,
}

impl Gauge {
    /// All gauges, in the order a shell defines them.
    pub const ALL: [Gauge; 4] = [Gauge::JwksKeys, Gauge::CacheEntries, Gauge::VmMemoryBytes, Gauge::RegistryTenants];

    /// Position in [`Gauge::ALL`].
    pub fn index(self) -> usize {
        match self {
            Self::JwksKeys => 0,
            Self::CacheEntries => 1,
            Self::VmMemoryBytes => 2,
            Self::RegistryTenants => 3,
        }
    }

    /// The stat's name under the filter's prefix.
    pub fn name(self) -> &'static str {
        match self {
            Self::JwksKeys => "jwks.keys",
            Self::CacheEntries => "cache.entries",
            Self::VmMemoryBytes => "vm.memory_bytes",
            Self::RegistryTenants => "registry.tenants",
        }
    }
}

/// Effects recorded as owned values, for tests and fuzzing: `Debug`-formatted, one string each.
#[derive(Debug, Default)]
pub struct Recorded(pub Vec<String>);

impl Effects for Recorded {
    fn push(&mut self, effect: Effect<'_>) {
        let line = match effect {
            Effect::Reply(r) => {
                format!("Reply({}, {:?}, {})", r.status, r.headers, String::from_utf8_lossy(r.body))
            }
            Effect::ReplaceResponseBody(b) => format!("ReplaceResponseBody({})", String::from_utf8_lossy(b)),
            other => format!("{other:?}"),
        };
        self.0.push(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_finds_its_own_slot() {
        for (i, m) in COUNTERS.iter().enumerate() {
            assert_eq!(m.slot(), CounterSlot::Fixed(i), "{m:?}");
        }
        for (i, r) in Rejection::ALL.iter().enumerate() {
            assert_eq!(Metric::Rejected(*r).slot(), CounterSlot::Rejected(i));
        }
        assert_eq!(Metric::TenantForbidden("t").slot(), CounterSlot::Tenant { tenant: "t", allowed: false });
        for (i, g) in Gauge::ALL.iter().enumerate() {
            assert_eq!(g.index(), i);
        }
    }
}
