//! The router's background work, host-independent: on every timer tick, the gauges, the cache sweep and the
//! fetches that are due; on every fetch result, the new key set or tenant map installed (or the last good
//! one kept, with backoff), and the requests that waited for it named for waking.

use std::sync::Arc;

use crate::config::{
    beyond_pure_rust_message, normalise_placeholder, DiscoveredJwks, JwksSource, SignatureVerifier, MAX_DISCOVERY_BYTES,
};
use crate::effect::{Effect, Effects, Fetch, FetchTarget, Gauge, Level, Metric, TokenEvent};
use crate::jwks::{KeySet, MAX_JWKS_BYTES};
use crate::refresh::{RegistrySource, Schedule, Streak};
use crate::router::Stream;
use crate::router::{quota_of, token_fetch, Router};
use crate::upstream_auth::{
    parse_token_response, Settled, TokenAnswer, TokenError, TokenNews, MAX_TOKEN_RESPONSE_BYTES,
};
use crate::url::split_http_url;

/// How often a shell should deliver a timer tick, in milliseconds.
pub const TICK_MS: u64 = 500;

/// Largest tenant registry document accepted, in bytes.
pub const MAX_REGISTRY_BYTES: usize = 16 * 1024 * 1024;

/// How often expired tokens are swept from the cache (an O(capacity) pass, kept off the per-request path).
const PURGE_EVERY_S: i64 = 10;

/// What came back from a fetch.
#[derive(Debug)]
pub enum FetchResult<'a> {
    /// An HTTP answer: its `:status` (`None`: no answer, i.e. connection failure or timeout) and its body's
    /// size (the body is read only within the target's size limit).
    Answer { status: Option<&'a str>, body_size: usize },
    /// The request could not be sent.
    NotSent(&'a str),
}

impl<'a> FetchResult<'a> {
    /// The answer's status and body, or why there is none. The body is read only within `limit`, and only
    /// for a 200 unless `error_bodies` (another status then comes with an empty body).
    fn read(
        self,
        limit: usize,
        error_bodies: bool,
        body: &mut dyn FnMut() -> Vec<u8>,
    ) -> Result<(&'a str, Vec<u8>), String> {
        match self {
            FetchResult::NotSent(why) => Err(why.to_string()),
            FetchResult::Answer { status: None, .. } => Err("no response: connection failure or timeout".to_string()),
            FetchResult::Answer { status: Some(status), .. } if status != "200" && !error_bodies => {
                Ok((status, Vec::new()))
            }
            FetchResult::Answer { body_size, .. } if body_size > limit => {
                Err(format!("body larger than {limit} bytes"))
            }
            FetchResult::Answer { status: Some(status), .. } => Ok((status, body())),
        }
    }
}

impl Router {
    /// The per-router part of a tick, for a host whose request-serving routers have no timer of their own
    /// (the dynamic module's workers: their fetches are the main thread's): at most once per [`TICK_MS`],
    /// the cache gauge and sweep. Call it after a request, not before one.
    pub fn housekeep_if_due(&mut self, now_ms: u64, out: &mut dyn Effects) {
        if now_ms >= self.next_housekeeping_ms {
            self.next_housekeeping_ms = now_ms.saturating_add(TICK_MS);
            self.housekeep(now_ms, None, out);
        }
    }

    /// Gauges (`memory_bytes`: the VM's memory, from the host, if it has one) and the cache sweep.
    fn housekeep(&mut self, now_ms: u64, memory_bytes: Option<u64>, out: &mut dyn Effects) {
        if self.served {
            if let Some(memory_bytes) = memory_bytes {
                out.push(Effect::Gauge(Gauge::VmMemoryBytes, memory_bytes));
            }
            out.push(Effect::Gauge(Gauge::CacheEntries, self.cache.len() as u64));
        }
        // In-flight slots leased for tenants idle here go back to their shared buckets.
        self.quotas.expire(now_ms);
        let now_s = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
        if now_s.saturating_sub(self.last_purge_s) >= PURGE_EVERY_S {
            self.last_purge_s = now_s;
            self.cache.purge_expired(now_s);
        }
    }

    /// A timer tick: gauges (`memory_bytes`: the VM's memory, from the host), the cache sweep, and a fetch
    /// for every schedule that is due.
    pub fn on_tick(&mut self, now_ms: u64, memory_bytes: u64, out: &mut dyn Effects) {
        self.housekeep(now_ms, Some(memory_bytes), out);
        for (i, p) in self.config.providers.iter().enumerate() {
            let JwksSource::Remote(remote) = &p.jwks else { continue };
            if self.keys.0.get_mut(i).and_then(|s| s.schedule.as_mut()).is_some_and(|s| s.lost(now_ms)) {
                lost(&format!("JWKS fetch for {}", p.provider.issuer), out);
            }
            let due = self.keys.0.get_mut(i).and_then(|s| s.schedule.as_mut()).is_some_and(|s| s.due(now_ms));
            if due {
                // With discovery, the document first; its answer sends the key set's fetch.
                let target = if remote.discovery.is_some() { FetchTarget::Discovery(i) } else { FetchTarget::Jwks(i) };
                out.push(Effect::Fetch(Fetch {
                    target,
                    cluster: &remote.cluster,
                    authority: &remote.authority,
                    path: &remote.path,
                    timeout_ms: remote.timeout_ms,
                    post: None,
                }));
            }
        }
        for (id, slot) in self.upstream.iter_mut() {
            if slot.due(now_ms) {
                token_fetch(id, slot, now_ms, out);
            }
        }
        if let Some(r) = &self.config.registry {
            if self.tenants.schedule.as_mut().is_some_and(|s| s.lost(now_ms)) {
                lost("tenant registry fetch", out);
            }
            if self.tenants.schedule.as_mut().is_some_and(|s| s.due(now_ms)) {
                out.push(Effect::Fetch(Fetch {
                    target: FetchTarget::Registry,
                    cluster: &r.cluster,
                    authority: &r.authority,
                    path: &r.path,
                    timeout_ms: r.timeout_ms,
                    post: None,
                }));
            }
        }
    }

    /// Makes `provider`'s key-set fetch due now (a request elsewhere waits for a refetch: the dynamic
    /// module's workers park requests, its main thread fetches).
    pub fn refetch_keys(&mut self, provider: usize, now_ms: u64) {
        if let Some(schedule) = self.keys.0.get_mut(provider).and_then(|s| s.schedule.as_mut()) {
            schedule.fetch_now(now_ms);
        }
    }

    /// A fetch for `target` ended. `body` reads the answer's body. `env` reads the VM's environment (for
    /// a registry's upstream headers). Returns what the host does next: see [`Fetched`].
    pub fn on_fetch_result(
        &mut self,
        target: FetchTarget,
        result: FetchResult<'_>,
        now_ms: u64,
        body: &mut dyn FnMut() -> Vec<u8>,
        env: &dyn Fn(&str) -> Option<String>,
        out: &mut dyn Effects,
    ) -> Fetched {
        let limit = match target {
            FetchTarget::Jwks(_) => MAX_JWKS_BYTES,
            FetchTarget::Discovery(_) => MAX_DISCOVERY_BYTES,
            FetchTarget::Registry => MAX_REGISTRY_BYTES,
            FetchTarget::UpstreamToken { slot, fetch } => {
                return self.on_token_result(slot, fetch, result, now_ms, body, out);
            }
            // A request's own answer: the shell hands it to `Router::on_resend_response`; a batch's answer
            // goes to the shell's audit sink (`crate::audit_sink::Sink::on_result`).
            FetchTarget::Resend(_) | FetchTarget::AuditSink(_) => return Fetched::default(),
        };
        let fetched = result.read(limit, false, body).and_then(|(status, body)| match status {
            "200" => Ok(body),
            other => Err(format!("HTTP status {other}")),
        });
        match target {
            FetchTarget::Jwks(provider) => {
                let outcome = fetched.and_then(|b| KeySet::from_jwks(&b).map_err(|e| e.to_string()));
                let installed = self.install_keys(provider, outcome, now_ms, out);
                // Requests that waited for this fetch are decided again with whatever keys there are now,
                // whether it succeeded or not (they may not wait twice).
                let wake = self.keys.0.get_mut(provider).map(|s| std::mem::take(&mut s.waiting)).unwrap_or_default();
                Fetched { installed, waiting_for: Some(provider), wake, token: None }
            }
            FetchTarget::Discovery(provider) => self.on_discovery(provider, fetched, now_ms, out),
            FetchTarget::Registry => {
                let installed = self.install_registry(fetched, now_ms, env, out);
                Fetched { installed, waiting_for: None, wake: Vec::new(), token: None }
            }
            FetchTarget::UpstreamToken { .. } | FetchTarget::Resend(_) | FetchTarget::AuditSink(_) => {
                Fetched::default()
            }
        }
    }

    /// A provider's discovery document came (or failed): a good one sends the key set's fetch to the
    /// `jwks_uri` it names; a bad one fails the refresh as a failed key-set fetch would (counted, logged once
    /// per failure streak, retried with backoff, the key set in force kept), and wakes the waiting requests.
    fn on_discovery(
        &mut self,
        provider: usize,
        fetched: Result<Vec<u8>, String>,
        now_ms: u64,
        out: &mut dyn Effects,
    ) -> Fetched {
        let remote = match self.config.providers.get(provider).map(|p| &p.jwks) {
            Some(JwksSource::Remote(r)) => r,
            _ => return Fetched::default(),
        };
        let located = fetched
            .and_then(|body| {
                let Some(expected) = &remote.discovery else { return Err("no discovery configured".to_string()) };
                jwks_location(&body, expected, &remote.authority)
            })
            .map_err(|why| format!("discovery document {}: {why}", remote.uri));
        match located {
            Ok(at) => {
                let Some(state) = self.keys.0.get_mut(provider) else { return Fetched::default() };
                let (authority, path) = state.jwks_at.insert(at);
                out.push(Effect::Fetch(Fetch {
                    target: FetchTarget::Jwks(provider),
                    cluster: &remote.cluster,
                    authority,
                    path,
                    timeout_ms: remote.timeout_ms,
                    post: None,
                }));
                Fetched::default()
            }
            Err(why) => {
                self.install_keys(provider, Err(why), now_ms, out);
                let wake = self.keys.0.get_mut(provider).map(|s| std::mem::take(&mut s.waiting)).unwrap_or_default();
                Fetched { installed: false, waiting_for: Some(provider), wake, token: None }
            }
        }
    }

    /// A tenant's upstream token request ended: the token installed (or the failure logged, the token in
    /// hand kept while it is usable), and the requests that waited for it named for waking.
    fn on_token_result(
        &mut self,
        slot_id: u32,
        fetch: u32,
        result: FetchResult<'_>,
        now_ms: u64,
        body: &mut dyn FnMut() -> Vec<u8>,
        out: &mut dyn Effects,
    ) -> Fetched {
        let Some(slot) = self.upstream.get_mut(slot_id) else { return Fetched::default() };
        // A refusal's body says why (`invalid_client`): read for every status.
        let outcome = match result.read(MAX_TOKEN_RESPONSE_BYTES, true, body) {
            Ok((status, body)) => match status.parse::<u32>() {
                Ok(status) => parse_token_response(status, &body, now_ms),
                Err(_) => Err(TokenError("no HTTP status".to_string())),
            },
            Err(why) => Err(TokenError(why)),
        };
        let failures_before = slot.failures();
        let why = outcome.as_ref().err().cloned();
        let settled = slot.settle(fetch, outcome, now_ms);
        let tenant = slot.tenant.clone();
        let url = slot.client.token_url.clone();
        match settled {
            Settled::Installed { refreshed } => {
                if refreshed {
                    out.push(Effect::Count(Metric::UpstreamToken(&tenant, TokenEvent::Refresh)));
                }
                if failures_before > 0 {
                    let line = format!(
                        "upstream token for tenant {tenant} from {url}: recovered after {failures_before} failed requests"
                    );
                    out.push(Effect::Log(Level::Info, &line));
                }
            }
            Settled::Failed { kept, first, retry_in_ms } => {
                out.push(Effect::Count(Metric::UpstreamToken(&tenant, TokenEvent::Failure)));
                let why = why.map(|w| w.0).unwrap_or_default();
                let kept = if kept {
                    "keeping the current token while it is usable"
                } else {
                    "no usable token: the tenant's requests get 503"
                };
                let line = format!(
                    "upstream token for tenant {tenant} from {url} failed ({why}); {kept}; next attempt in {} s{}",
                    retry_in_ms / 1000,
                    if first { "" } else { " (a failure streak: logged at debug level from now on)" }
                );
                let level = if first || failures_before == 1 { Level::Error } else { Level::Debug };
                out.push(Effect::Log(level, &line));
            }
            // Not the fetch under way: ignored (whoever waits is asked for by the timer, or by that fetch).
            Settled::Stale => return Fetched::default(),
        }
        let installed = matches!(settled, Settled::Installed { .. });
        Fetched { installed, waiting_for: None, wake: slot.take_waiting(), token: Some(slot.answer(installed)) }
    }

    /// The requests whose tenant's token fetch was lost (no answer within its timeout: a host dropped it),
    /// to wake through [`Router::wake`]: they are answered 503 (a usable token goes on being used).
    /// Also returns, per such tenant, the failure to hand to other routers (see [`Fetched::token`]).
    pub fn lost_token_fetches(&mut self, now_ms: u64, out: &mut dyn Effects) -> (Vec<u32>, Vec<TokenAnswer>) {
        let mut wake = Vec::new();
        let mut answers = Vec::new();
        for (_, slot) in self.upstream.iter_mut() {
            if slot.check_lost(now_ms) {
                out.push(Effect::Count(Metric::UpstreamToken(&slot.tenant, TokenEvent::Failure)));
                let line = format!(
                    "upstream token for tenant {} from {}: no answer within {} ms",
                    slot.tenant, slot.client.token_url, slot.client.timeout_ms
                );
                out.push(Effect::Log(Level::Error, &line));
                wake.append(&mut slot.take_waiting());
                answers.push(slot.answer(false));
            }
        }
        (wake, answers)
    }

    /// For a host whose fetches are another router's (the dynamic module's workers, whose main thread
    /// fetches): the tenant whose new token `stream` asks for after its last event, if any. It waits for
    /// one, or it was sent with a token now due for renewal (asked once per renewal: this router then counts
    /// a fetch as under way until an answer is installed, or its timeout).
    ///
    /// With the tenant comes the number of the token this router has from the fetching one
    /// ([`TokenSlot::origin`]), to hand to [`Router::want_token`].
    pub fn token_wanted(&mut self, stream: &Stream, now_ms: u64) -> Option<(&str, u64)> {
        let (slot_id, waits) = stream.token_slot()?;
        let slot = self.upstream.get_mut(slot_id)?;
        (waits || slot.due(now_ms)).then_some((slot.tenant.as_str(), slot.origin()))
    }

    /// The fetching router (the dynamic module's main thread): another router, which has the token
    /// numbered `have` from this one (0: none), wants a new token of `tenant`. `None`: a fetch will answer
    /// it (one is under way, or the next [`Router::on_tick`] sends it); else the answer to hand on at once:
    /// a token fetched since that router's (asked for late, by a router that had not installed it yet: one
    /// fetch per renewal however many routers ask), or a failure (the tenant has no `upstream_auth` here,
    /// or its server is not to be asked again yet).
    pub fn want_token(&mut self, tenant: &str, have: u64, now_ms: u64) -> Option<TokenAnswer> {
        let client = self.tenants.map.as_deref().and_then(|m| m.get(tenant)).and_then(|t| t.upstream_auth());
        let Some(client) = client else {
            let news = TokenNews::Failed { retry_at_ms: 0 };
            return Some(TokenAnswer { tenant: tenant.to_string(), fingerprint: 0, news, serial: 0 });
        };
        let client = Arc::clone(client);
        let (_, slot) = self.upstream.slot(tenant, &client)?;
        slot.want(have, now_ms)
    }

    /// Installs a token fetched by another router (see [`Fetched::token`]): into this tenant's slot,
    /// made now if this router has none yet and the tenant's configuration here is the one it was fetched
    /// for.
    pub fn install_token(&mut self, answer: &TokenAnswer) {
        if let Some((_, slot)) = self.upstream.of(&answer.tenant) {
            slot.install(answer);
            return;
        }
        if !matches!(answer.news, TokenNews::Token(_)) {
            return;
        }
        let client = self.tenants.map.as_deref().and_then(|m| m.get(&answer.tenant)).and_then(|t| t.upstream_auth());
        if let Some(client) = client.map(Arc::clone) {
            if let Some((_, slot)) = self.upstream.slot(&answer.tenant, &client) {
                slot.install(answer);
            }
        }
    }

    /// Returns whether the key set was installed.
    fn install_keys(
        &mut self,
        provider: usize,
        outcome: Result<KeySet, String>,
        now_ms: u64,
        out: &mut dyn Effects,
    ) -> bool {
        let issuer = self.config.providers.get(provider).map_or("", |p| p.provider.issuer.as_str());
        let Some(state) = self.keys.0.get_mut(provider) else { return false };
        let kept = match &state.keys {
            Some(k) => format!("keeping the last {} keys", k.keys().len()),
            None => "no keys yet: token requests get 503".to_string(),
        };
        let what = format!("JWKS fetch for {issuer}");
        let counters = (Metric::JwksFetchOk, Metric::JwksFetchFailed);
        let Some(keys) = settle(counters, state.schedule.as_mut(), now_ms, &what, &kept, outcome, out) else {
            return false;
        };
        if keys.skipped() > 0 {
            let (usable, skipped) = (keys.keys().len(), keys.skipped());
            let line =
                format!("JWKS of {issuer}: {usable} usable keys, {skipped} skipped (wrong type, use, alg or size)");
            out.push(Effect::Log(Level::Info, &line));
        }
        if self.config.signature_verifier == SignatureVerifier::PureRust {
            // An inline key like this is refused at configuration time; a fetched one can only be reported.
            for key in keys.beyond_pure_rust(self.config.pure_rust_checks_p384) {
                let line = format!("JWKS of {issuer}: {}", beyond_pure_rust_message(&key));
                out.push(Effect::Log(Level::Error, &line));
                out.push(Effect::Count(Metric::JwksUncheckableKey));
            }
        }
        self.install_key_set(provider, Arc::new(keys), out);
        true
    }

    /// Installs `provider`'s key set (this router's own fetch, or another router's: the dynamic module's
    /// workers install what its main thread compiled), dropping the cached tokens whose key left every set.
    pub fn install_key_set(&mut self, provider: usize, keys: Arc<KeySet>, out: &mut dyn Effects) {
        let Some(state) = self.keys.0.get_mut(provider) else { return };
        state.keys = Some(keys);
        // Cached tokens whose key left their own provider's set are dropped (another provider listing the
        // same key keeps none of them).
        let sets = || self.keys.0.iter().filter_map(|s| s.keys.as_ref());
        let total: usize = sets().map(|k| k.keys().len()).sum();
        out.push(Effect::Gauge(Gauge::JwksKeys, total as u64));
        let fingerprints: Vec<Vec<u64>> =
            self.keys.0.iter().map(|s| s.keys.as_ref().map(|k| k.fingerprints()).unwrap_or_default()).collect();
        let dropped = self
            .cache
            .retain_provider_keys(|provider, key| fingerprints.get(provider).is_some_and(|keys| keys.contains(&key)));
        if dropped > 0 {
            let line = format!("JWKS: dropped {dropped} cached tokens whose key left the key set");
            out.push(Effect::Log(Level::Info, &line));
        }
    }

    /// Returns whether a new tenant map was installed: a document that compiles to what is in force (the
    /// same bytes, and every variable and file it names reads the same, see [`RegistrySource`]) is counted
    /// as a good fetch and neither compiled again nor installed.
    fn install_registry(
        &mut self,
        fetched: Result<Vec<u8>, String>,
        now_ms: u64,
        env: &dyn Fn(&str) -> Option<String>,
        out: &mut dyn Effects,
    ) -> bool {
        let unchanged = |body: &[u8]| {
            self.tenants.map.is_some() && self.tenants.source.as_ref().is_some_and(|s| s.unchanged(body, env))
        };
        let compiled = fetched.and_then(|body| {
            if unchanged(&body) {
                return Ok(None);
            }
            let (compiled, source) =
                RegistrySource::compile(&body, env, |env| self.config.compile_registry(&body, env));
            compiled.map(|map| Some((map, source))).map_err(|e| e.to_string())
        });
        let state = &mut self.tenants;
        let kept = match &state.map {
            Some(m) => format!("keeping the last {} tenants", m.len()),
            None => "no tenants yet: token requests get 503".to_string(),
        };
        let counters = (Metric::RegistryFetchOk, Metric::RegistryFetchFailed);
        let schedule = state.schedule.as_mut();
        let Some(Some((map, source))) =
            settle(counters, schedule, now_ms, "tenant registry fetch", &kept, compiled, out)
        else {
            return false;
        };
        self.tenants.source = Some(source);
        self.install_tenant_map(Arc::new(map), now_ms, out);
        true
    }

    /// Installs a compiled tenant map (this router's own compile, or another router's: the dynamic module's
    /// workers install what its main thread compiled), creating the buckets of the tenants new to this
    /// router before their first request ([`crate::quota::ensure`]).
    pub fn install_tenant_map(&mut self, map: Arc<crate::tenant::TenantMap>, now_ms: u64, out: &mut dyn Effects) {
        out.push(Effect::Gauge(Gauge::RegistryTenants, map.len() as u64));
        let before = self.tenants.map.replace(map);
        let Router { config, tenants, quotas, .. } = self;
        let is_new = |id: &str| before.as_ref().map_or(true, |b| b.get(id).is_none());
        let new = tenants.map.iter().flat_map(|m| m.iter()).filter(|t| is_new(&t.id));
        prepare_buckets(config, quotas, new, now_ms, out);
    }

    /// Creates the quota buckets of every tenant this router knows (configured, and the registry's) that the
    /// store does not hold yet ([`crate::quota::ensure`]). The proxy-wasm root context calls it once its
    /// shared-data store is installed, before any request.
    pub fn prepare_quotas(&mut self, now_ms: u64, out: &mut dyn Effects) {
        let Router { config, tenants, quotas, .. } = self;
        let known = config.tenants.iter().chain(tenants.map.iter().flat_map(|m| m.iter()));
        prepare_buckets(config, quotas, known, now_ms, out);
    }
}

/// Creates the buckets of those of `tenants` that have a quota ([`crate::quota::Quotas::prepare`]).
fn prepare_buckets<'a>(
    config: &'a crate::config::Config,
    quotas: &mut crate::quota::Quotas,
    tenants: impl Iterator<Item = &'a crate::tenant::Tenant>,
    now_ms: u64,
    out: &mut dyn Effects,
) {
    quotas.prepare(tenants.filter_map(|t| quota_of(config, t).map(|q| (t.id.as_str(), &**q))), now_ms, out);
}

/// The key set's `:authority` and `:path` an OpenID Provider Configuration names (OpenID Connect Discovery
/// 1.0 §3-4), if it is `expected`'s: its `issuer` is the provider's (a template's after
/// [`normalise_placeholder`]), and its `jwks_uri` an http(s) URL with the discovery document's own scheme and
/// `authority`. The body is untrusted: any other JSON, or none, is an error, and no error quotes it.
pub fn jwks_location(body: &[u8], expected: &DiscoveredJwks, authority: &str) -> Result<(String, String), String> {
    #[derive(serde::Deserialize)]
    struct Document {
        #[serde(default)]
        issuer: Option<String>,
        #[serde(default)]
        jwks_uri: Option<String>,
    }
    let doc: Document = serde_json::from_slice(body)
        .map_err(|_| "not an OpenID Provider Configuration (a JSON object with issuer and jwks_uri)".to_string())?;
    let issuer = doc.issuer.ok_or("it names no issuer")?;
    let same =
        if expected.template { normalise_placeholder(&issuer) == expected.issuer } else { issuer == expected.issuer };
    if !same {
        return Err("its issuer is not this provider's issuer".to_string());
    }
    let uri = doc.jwks_uri.ok_or("it names no jwks_uri")?;
    let at = uri.strip_prefix(expected.scheme).and_then(|_| split_http_url(&uri));
    match at {
        Some((jwks_authority, path)) if jwks_authority.eq_ignore_ascii_case(authority) => Ok((jwks_authority, path)),
        _ => Err(format!(
            "its jwks_uri is not an {}{authority} URL (the discovery document's own scheme and authority)",
            expected.scheme
        )),
    }
}

/// What a host does after a fetch ended ([`Router::on_fetch_result`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fetched {
    /// The answer was good and is now installed: a host whose other routers install what one router fetched
    /// (the dynamic module's workers) hands them this body; an answer that was not installed is not handed on.
    pub installed: bool,
    /// A key-set fetch (good or not) for this provider: every request waiting for its keys is to be decided
    /// again, including waiting requests this router does not know (another router's).
    pub waiting_for: Option<usize>,
    /// The context ids of this router's waiting requests, to wake through [`Router::wake`].
    pub wake: Vec<u32>,
    /// A tenant's token fetch ended (not an ignored stale one): what other routers install with
    /// [`Router::install_token`]; every request waiting for that tenant's token, in any router, is to be
    /// decided again.
    pub token: Option<TokenAnswer>,
}

/// A fetch went unanswered past its timeout (a bug lost it, such as a panic while its answer was being
/// installed): said, and it is retried (see [`Schedule::lost`]).
fn lost(what: &str, out: &mut dyn Effects) {
    let line = format!("{what} got no answer within its timeout; it is counted as failed and retried");
    out.push(Effect::Log(Level::Error, &line));
}

/// Advances a fetch schedule with one outcome and counts it (`counters`: ok, failed). A failure streak is
/// logged once when it starts (saying what is `kept`) and once when it ends. Returns the fetched value.
/// The schedule moves on before any effect is pushed, so that nothing the effects do (a panic in the host
/// included) can leave a fetch in flight for ever.
fn settle<T>(
    counters: (Metric<'static>, Metric<'static>),
    schedule: Option<&mut Schedule>,
    now_ms: u64,
    what: &str,
    kept: &str,
    outcome: Result<T, String>,
    out: &mut dyn Effects,
) -> Option<T> {
    match outcome {
        Ok(value) => {
            let streak = schedule.map(|s| s.succeeded(now_ms));
            out.push(Effect::Count(counters.0));
            if let Some(Streak::Ended { failures }) = streak {
                out.push(Effect::Log(Level::Info, &format!("{what} recovered after {failures} failed attempts")));
            }
            Some(value)
        }
        Err(why) => {
            let streak = schedule.map(|s| s.failed(now_ms));
            out.push(Effect::Count(counters.1));
            if streak == Some(Streak::Started) {
                let line =
                    format!("{what} failed ({why}); {kept}; retrying with backoff (logged once per failure streak)");
                out.push(Effect::Log(Level::Warn, &line));
            }
            None
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Config;
    use crate::effect::{Flow, Recorded};
    use crate::testkeys;

    fn router() -> Router {
        let plugin = serde_json::json!({
            "provider": {"issuer": testkeys::ISSUER, "audiences": [testkeys::AUDIENCE],
                         "jwks": serde_json::from_str::<serde_json::Value>(&testkeys::public_jwks()).unwrap()},
            "tenants": {testkeys::TENANT_A: {"cluster": "tenant_a"}},
            "metadata_cluster": "fhir_metadata",
        });
        let config = Config::from_json(plugin.to_string().as_bytes()).unwrap();
        Router::new(config, 0, &mut Recorded::default())
    }

    fn remote_router() -> Router {
        let plugin = serde_json::json!({
            "provider": {"issuer": testkeys::ISSUER, "audiences": [testkeys::AUDIENCE],
                         "jwks_uri": "http://127.0.0.1:9000/jwks", "jwks_cluster": "idp"},
            "tenants": {testkeys::TENANT_A: {"cluster": "tenant_a"}},
            "metadata_cluster": "fhir_metadata",
        });
        let config = Config::from_json(plugin.to_string().as_bytes()).unwrap();
        Router::new(config, 0, &mut Recorded::default())
    }

    fn answer(router: &mut Router, status: Option<&str>, body: &[u8]) -> Fetched {
        let result = FetchResult::Answer { status, body_size: body.len() };
        router.on_fetch_result(
            FetchTarget::Jwks(0),
            result,
            1_000,
            &mut || body.to_vec(),
            &|_| None,
            &mut Recorded::default(),
        )
    }

    /// Request `id`'s headers (whole, no body) through `router`.
    fn request(
        router: &mut Router,
        id: u32,
        headers: &[(&[u8], &[u8])],
        now: u64,
        out: &mut Recorded,
    ) -> (Stream, Flow) {
        let mut stream = router.open_stream(id);
        let flow =
            router.on_request_headers(&mut stream, headers.iter().copied(), true, now, &crate::crypto::PureRust, out);
        (stream, flow)
    }

    /// The dynamic module's way: a worker router parks requests, its main thread fetches and wakes them.
    /// While one waits, later unknown kids wait too (the refetch is pending, though not this router's),
    /// and each woken request leaves this router's queue.
    #[test]
    fn a_worker_router_queues_behind_a_pending_refetch_and_its_woken_requests_leave_the_queue() {
        let mut r = remote_router();
        let es_only = format!("{{\"keys\": [{}]}}", testkeys::es_public_jwk());
        assert!(answer(&mut r, Some("200"), es_only.as_bytes()).installed);
        let token = testkeys::sign_rs256(&testkeys::claims_now());
        let auth = format!("Bearer {token}");
        let headers: Vec<(&[u8], &[u8])> =
            vec![(b":method", b"GET"), (b":path", b"/Patient"), (b"authorization", auth.as_bytes())];
        let now = testkeys::NOW as u64 * 1_000;
        let mut streams = Vec::new();
        for id in 1..=3 {
            let (stream, flow) = request(&mut r, id, &headers, now, &mut Recorded::default());
            assert_eq!(flow, Flow::WaitForKeys, "request {id}");
            streams.push(stream);
        }
        assert_eq!(r.keys.0[0].waiting, [1, 2, 3]);
        // The main thread's answer arrives (published to this worker), and it wakes the requests.
        r.keys.0[0].keys =
            Some(std::sync::Arc::new(crate::jwks::KeySet::from_jwks(testkeys::public_jwks().as_bytes()).unwrap()));
        for stream in &mut streams {
            let mut out = Recorded::default();
            r.wake(stream, now, &crate::crypto::PureRust, &mut Vec::new, &mut out);
            assert!(out.0.iter().any(|e| e == "ResumeRequest"), "{:?}", out.0);
        }
        assert!(r.keys.0[0].waiting.is_empty(), "{:?}", r.keys.0[0].waiting);
    }

    pub(crate) fn upstream_auth_router() -> Router {
        let plugin = serde_json::json!({
            "provider": {"issuer": testkeys::ISSUER, "audiences": [testkeys::AUDIENCE],
                         "jwks": serde_json::from_str::<serde_json::Value>(&testkeys::public_jwks()).unwrap()},
            "tenants": {testkeys::TENANT_A: {"cluster": "tenant_a", "upstream_auth": {
                "method": "client_secret_post", "token_url": "https://login.example/token", "cluster": "entra",
                "client_id": "router", "client_secret": {"env": "SECRET_A"}}}},
            "metadata_cluster": "fhir_metadata",
        });
        let env = |name: &str| (name == "SECRET_A").then(|| "s3cret".to_string());
        let config = Config::from_json_with_env(plugin.to_string().as_bytes(), &env).unwrap();
        Router::new(config, 0, &mut Recorded::default())
    }

    /// The dynamic module's way with upstream tokens: a worker router parks a request and names the tenant
    /// whose token it wants; the main thread's router fetches it once and hands the answer to every worker,
    /// including one that never asked.
    #[test]
    fn a_worker_asks_the_fetching_router_for_a_token_and_every_worker_installs_its_answer() {
        let (mut main, mut worker, mut other) =
            (upstream_auth_router(), upstream_auth_router(), upstream_auth_router());
        let auth = format!("Bearer {}", testkeys::sign_rs256(&testkeys::claims_now()));
        let headers: Vec<(&[u8], &[u8])> =
            vec![(b":method", b"GET"), (b":path", b"/Patient"), (b"authorization", auth.as_bytes())];
        let now = testkeys::NOW as u64 * 1_000;
        let (mut stream, flow) = request(&mut worker, 1, &headers, now, &mut Recorded::default());
        assert_eq!(flow, Flow::WaitForKeys);
        assert!(stream.waits_for_token());
        assert_eq!(worker.token_wanted(&stream, now), Some((testkeys::TENANT_A, 0)));
        // The main thread: asked, its tick sends the one token request (asked twice, still one).
        assert_eq!(main.want_token(testkeys::TENANT_A, 0, now), None);
        assert_eq!(main.want_token(testkeys::TENANT_A, 0, now), None);
        let mut out = Recorded::default();
        main.on_tick(now, 0, &mut out);
        let fetches: Vec<_> = out.0.iter().filter(|e| e.starts_with("Fetch(")).collect();
        assert_eq!(fetches.len(), 1, "{:?}", out.0);
        let mut out = Recorded::default();
        main.on_tick(now + 100, 0, &mut out);
        assert!(!out.0.iter().any(|e| e.starts_with("Fetch(")), "one fetch in flight: {:?}", out.0);
        // An unknown tenant is answered at once (its waiters get 503).
        assert!(main.want_token("no-such-tenant", 0, now).is_some());
        let body = br#"{"access_token":"up-1","token_type":"Bearer","expires_in":3600}"#;
        let result = FetchResult::Answer { status: Some("200"), body_size: body.len() };
        let fetched = main.on_fetch_result(
            FetchTarget::UpstreamToken { slot: 0, fetch: 1 },
            result,
            now + 200,
            &mut || body.to_vec(),
            &|_| None,
            &mut Recorded::default(),
        );
        let answer = fetched.token.expect("a token answer to hand on");
        assert!(fetched.wake.is_empty(), "nothing waits on the main thread");
        // The worker installs it and its parked request goes on with it; the other worker uses it at once.
        worker.install_token(&answer);
        other.install_token(&answer);
        let mut out = Recorded::default();
        worker.wake(&mut stream, now + 300, &crate::crypto::PureRust, &mut Vec::new, &mut out);
        assert!(out.0.iter().any(|e| e.contains("authorization") && e.contains("Bearer up-1")), "{:?}", out.0);
        assert!(out.0.iter().any(|e| e == "ResumeRequest"), "{:?}", out.0);
        let mut out = Recorded::default();
        let (stream, flow) = request(&mut other, 2, &headers, now + 300, &mut out);
        assert_eq!(flow, Flow::Continue, "{:?}", out.0);
        assert!(out.0.iter().any(|e| e.contains("Bearer up-1")), "{:?}", out.0);
        assert_eq!(other.token_wanted(&stream, now + 300), None, "nothing to ask for");
    }

    #[test]
    fn a_fetched_p384_key_that_pure_rust_cannot_check_is_logged_naming_it_and_counted() {
        let mut r = remote_router();
        r.config.signature_verifier = crate::config::SignatureVerifier::PureRust;
        r.config.pure_rust_checks_p384 = false; // as in the wasm module `make build` ships
        let jwks = crate::config::tests::jwks_with_p384(Some("es384-2025")).to_string();
        let mut out = Recorded::default();
        let result = FetchResult::Answer { status: Some("200"), body_size: jwks.len() };
        let fetched = r.on_fetch_result(
            FetchTarget::Jwks(0),
            result,
            1_000,
            &mut || jwks.clone().into_bytes(),
            &|_| None,
            &mut out,
        );
        assert!(fetched.installed, "the other keys still serve");
        let errors: Vec<_> = out.0.iter().filter(|l| l.starts_with("Log(Error")).collect();
        assert_eq!(errors.len(), 1, "{:?}", out.0);
        assert!(errors[0].contains(r#"kid \"es384-2025\""#) && errors[0].contains("pure_rust"), "{errors:?}");
        assert_eq!(out.0.iter().filter(|l| l.as_str() == "Count(JwksUncheckableKey)").count(), 1, "{:?}", out.0);
        // With pure-Rust P-384 built in, or under another verifier, nothing to say.
        for (verifier, p384) in [(SignatureVerifier::PureRust, true), (SignatureVerifier::Auto, false)] {
            r.config.signature_verifier = verifier;
            r.config.pure_rust_checks_p384 = p384;
            let mut out = Recorded::default();
            let result = FetchResult::Answer { status: Some("200"), body_size: jwks.len() };
            r.on_fetch_result(
                FetchTarget::Jwks(0),
                result,
                2_000,
                &mut || jwks.clone().into_bytes(),
                &|_| None,
                &mut out,
            );
            assert!(!out.0.iter().any(|l| l.contains("P-384") || l.contains("Uncheckable")), "{:?}", out.0);
        }
    }

    #[test]
    fn only_a_key_set_that_was_installed_is_handed_on_and_any_answer_wakes_its_waiters() {
        let mut r = remote_router();
        let jwks = testkeys::public_jwks();
        assert_eq!(
            answer(&mut r, Some("200"), jwks.as_bytes()),
            Fetched { installed: true, waiting_for: Some(0), wake: vec![], token: None }
        );
        for (status, body) in [(Some("200"), &b"{\"keys\": 7}"[..]), (Some("503"), &b""[..]), (None, &b""[..])] {
            assert_eq!(
                answer(&mut r, status, body),
                Fetched { installed: false, waiting_for: Some(0), wake: vec![], token: None }
            );
        }
        let not_sent = FetchResult::NotSent("no cluster");
        let fetched = r.on_fetch_result(
            FetchTarget::Jwks(0),
            not_sent,
            1_000,
            &mut Vec::new,
            &|_| None,
            &mut Recorded::default(),
        );
        assert_eq!(fetched, Fetched { installed: false, waiting_for: Some(0), wake: vec![], token: None });
        let registry = r.on_fetch_result(
            FetchTarget::Registry,
            FetchResult::Answer { status: Some("200"), body_size: 2 },
            1_000,
            &mut || b"{}".to_vec(),
            &|_| None,
            &mut Recorded::default(),
        );
        assert_eq!(registry.waiting_for, None);
    }

    pub(crate) fn registry_router() -> Router {
        let plugin = serde_json::json!({
            "provider": {"issuer": testkeys::ISSUER, "audiences": [testkeys::AUDIENCE],
                         "jwks": serde_json::from_str::<serde_json::Value>(&testkeys::public_jwks()).unwrap()},
            "tenants": {},
            "tenant_registry": {"uri": "http://127.0.0.1:9200/tenants", "cluster": "registry", "refresh_s": 5,
                                "secret_scope": {"env_prefixes": ["FTR_REGISTRY_"], "file_directory": "/run"}},
            "metadata_cluster": "fhir_metadata",
        });
        let config = Config::from_json(plugin.to_string().as_bytes()).unwrap();
        Router::new(config, 0, &mut Recorded::default())
    }

    /// A registry document whose tenant's client secret is read from `file` (beneath `/run`, the registry's
    /// `secret_scope`).
    pub(crate) fn registry_document(cluster: &str, file: &str) -> Vec<u8> {
        serde_json::json!({"tenants": {"tenant-x": {"cluster": cluster, "upstream_auth": {
            "method": "client_secret_post", "token_url": "https://login.example/token", "cluster": "entra",
            "client_id": "router", "client_secret": {"file": file}}}}})
        .to_string()
        .into_bytes()
    }

    /// Finding 7 of issue 22: a registry document that did not change (nor any secret it names) is counted
    /// as a good fetch and neither compiled again nor installed; a changed document, or the same document
    /// naming a secret file whose content changed, is.
    #[test]
    fn an_unchanged_registry_document_is_not_compiled_again_and_a_rotated_secret_is() {
        let mut r = registry_router();
        let secret = std::cell::RefCell::new("s3cret-1".to_string());
        let lookups = std::cell::Cell::new(0);
        let env = |name: &str| {
            lookups.set(lookups.get() + 1);
            (name == format!("{}/run\0/run/secret-x", crate::secret_scope::FILE_BENEATH_PREFIX))
                .then(|| secret.borrow().clone())
        };
        let fetch = |r: &mut Router, body: Vec<u8>, now: u64| {
            let mut out = Recorded::default();
            let result = FetchResult::Answer { status: Some("200"), body_size: body.len() };
            let fetched = r.on_fetch_result(FetchTarget::Registry, result, now, &mut || body.clone(), &env, &mut out);
            (fetched.installed, out.0)
        };
        let doc = registry_document("x", "/run/secret-x");
        let (installed, out) = fetch(&mut r, doc.clone(), 1_000);
        assert!(installed, "{out:?}");
        assert_eq!(lookups.get(), 1, "the compile read the secret");
        let first = Arc::clone(r.tenants.map.as_ref().unwrap());
        for now in [6_000, 11_000] {
            let (installed, out) = fetch(&mut r, doc.clone(), now);
            assert!(!installed, "the same document is not installed again: {out:?}");
            assert_eq!(out, ["Count(RegistryFetchOk)"], "counted as a good fetch");
            assert!(Arc::ptr_eq(&first, r.tenants.map.as_ref().unwrap()), "not compiled again");
        }
        // The secret file's content changed: the same document compiles to a new client.
        *secret.borrow_mut() = "s3cret-2".to_string();
        assert!(fetch(&mut r, doc.clone(), 16_000).0);
        let rotated = Arc::clone(r.tenants.map.as_ref().unwrap());
        assert!(!Arc::ptr_eq(&first, &rotated));
        let client = |m: &crate::tenant::TenantMap| Arc::clone(m.get("tenant-x").unwrap().upstream_auth().unwrap());
        assert!(client(&first) != client(&rotated), "a new client, with the new secret");
        assert!(!fetch(&mut r, doc.clone(), 21_000).0);
        // A changed document is compiled and installed; a bad one keeps the last good map.
        assert!(fetch(&mut r, registry_document("y", "/run/secret-x"), 26_000).0);
        assert_eq!(r.tenants.map.as_ref().unwrap().get("tenant-x").unwrap().cluster, "y");
        let (installed, out) = fetch(&mut r, b"{\"tenants\": 7}".to_vec(), 31_000);
        assert!(!installed && out.contains(&"Count(RegistryFetchFailed)".to_string()), "{out:?}");
        assert_eq!(r.tenants.map.as_ref().unwrap().get("tenant-x").unwrap().cluster, "y");
        // The last good document again: unchanged since it was compiled.
        assert!(!fetch(&mut r, registry_document("y", "/run/secret-x"), 36_000).0);
    }

    #[test]
    fn a_router_that_never_served_publishes_no_per_router_gauge() {
        let mut r = router();
        let mut out = Recorded::default();
        r.housekeep_if_due(1_000, &mut out);
        r.on_tick(1_000, 4096, &mut out);
        assert!(out.0.is_empty(), "{:?}", out.0);
    }

    #[test]
    fn housekeeping_without_a_timer_reports_the_cache_at_most_once_per_tick_period_and_no_vm_memory() {
        let mut r = router();
        let _ = r.open_stream(1);
        let mut out = Recorded::default();
        r.housekeep_if_due(1_000, &mut out);
        assert_eq!(out.0, vec!["Gauge(CacheEntries, 0)".to_string()]);
        r.housekeep_if_due(1_000 + TICK_MS - 1, &mut out);
        assert_eq!(out.0.len(), 1, "{:?}", out.0);
        r.housekeep_if_due(1_000 + TICK_MS, &mut out);
        assert_eq!(out.0.len(), 2, "{:?}", out.0);
        let mut ticked = Recorded::default();
        r.on_tick(5_000, 4096, &mut ticked);
        assert_eq!(&ticked.0[..2], &["Gauge(VmMemoryBytes, 4096)".to_string(), "Gauge(CacheEntries, 0)".to_string()]);
    }

    // --- Configuration from discovery (issue 25). Documents shaped as the IdPs publish them (OpenID Connect
    // Discovery 1.0 §3; Entra's common v2.0 document names `{tenantid}` in its issuer and its keys under
    // login.microsoftonline.com/common/discovery/v2.0/keys).

    /// Fetches, logs and counts a router asked for.
    #[derive(Default)]
    struct Seen {
        fetches: Vec<(FetchTarget, String, String, String)>,
        logs: Vec<String>,
        counts: Vec<String>,
    }

    impl Effects for Seen {
        fn push(&mut self, effect: Effect<'_>) {
            match effect {
                Effect::Fetch(f) => {
                    self.fetches.push((f.target, f.cluster.into(), f.authority.into(), f.path.into()));
                }
                Effect::Log(_, line) => self.logs.push(line.into()),
                Effect::Count(m) => self.counts.push(format!("{m:?}")),
                _ => {}
            }
        }
    }

    const ENTRA_V2: &str = "https://login.microsoftonline.com/{tid}/v2.0";
    const ENTRA_DISCOVERY: &str = "https://login.microsoftonline.com/common/v2.0/.well-known/openid-configuration";

    fn discovery_router(provider: serde_json::Value) -> Router {
        let mut p = serde_json::json!({"audiences": [testkeys::AUDIENCE], "jwks_cluster": "idp"});
        for (k, v) in provider.as_object().unwrap() {
            p[k] = v.clone();
        }
        let plugin = serde_json::json!({
            "provider": p, "tenants": {testkeys::TENANT_A: {"cluster": "tenant_a"}}, "metadata_cluster": "m",
        });
        Router::new(Config::from_json(plugin.to_string().as_bytes()).unwrap(), 0, &mut Recorded::default())
    }

    fn entra_router() -> Router {
        discovery_router(serde_json::json!({"issuer": ENTRA_V2, "discovery_uri": ENTRA_DISCOVERY}))
    }

    fn entra_document() -> serde_json::Value {
        serde_json::json!({
            "token_endpoint": "https://login.microsoftonline.com/common/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": "https://login.microsoftonline.com/common/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"], "id_token_signing_alg_values_supported": ["RS256"],
            "issuer": "https://login.microsoftonline.com/{tenantid}/v2.0",
            "request_uri_parameter_supported": false,
            "authorization_endpoint": "https://login.microsoftonline.com/common/oauth2/v2.0/authorize",
            "tenant_region_scope": null, "cloud_instance_name": "microsoftonline.com"
        })
    }

    fn fetched(
        router: &mut Router,
        target: FetchTarget,
        status: Option<&str>,
        body: &[u8],
        now: u64,
    ) -> (Fetched, Seen) {
        let mut seen = Seen::default();
        let result = FetchResult::Answer { status, body_size: body.len() };
        let f = router.on_fetch_result(target, result, now, &mut || body.to_vec(), &|_| None, &mut seen);
        (f, seen)
    }

    fn tick(router: &mut Router, now: u64) -> Seen {
        let mut seen = Seen::default();
        router.on_tick(now, 0, &mut seen);
        seen
    }

    /// Two providers that share a key (Entra's v1 and v2 issuers, or one IdP listed twice): when one
    /// provider's refreshed key set drops it (rotated out, revoked), that provider's cached tokens signed with
    /// it must go, though the other provider still lists the key. They stayed while any provider listed it.
    #[test]
    fn attack_a_key_one_provider_dropped_serves_none_of_its_cached_tokens() {
        let jwks = serde_json::from_str::<serde_json::Value>(&testkeys::public_jwks()).unwrap();
        let plugin = serde_json::json!({
            "providers": [
                {"issuer": "https://idp.example/a", "audiences": [testkeys::AUDIENCE], "jwks": jwks},
                {"issuer": "https://idp.example/b", "audiences": [testkeys::AUDIENCE], "jwks": jwks}
            ],
            "tenants": {testkeys::TENANT_A: {"cluster": "tenant_a"}},
            "metadata_cluster": "fhir_metadata",
        });
        let mut r = Router::new(Config::from_json(plugin.to_string().as_bytes()).unwrap(), 0, &mut Recorded::default());
        let all = KeySet::from_jwks(testkeys::public_jwks().as_bytes()).unwrap();
        let es_only = KeySet::from_jwks(format!("{{\"keys\": [{}]}}", testkeys::es_public_jwk()).as_bytes()).unwrap();
        let rs = *all.fingerprints().iter().find(|f| !es_only.fingerprints().contains(f)).unwrap();
        let now = testkeys::NOW;
        let entry = |provider| crate::cache::Verified {
            exp: now + 100,
            key: rs,
            provider,
            identity: crate::identity::Identity::new(None, None, None, None),
        };
        let (a, b) = ("token-of-provider-a", "token-of-provider-b");
        let (ka, kb) = (r.cache.key(a), r.cache.key(b));
        r.cache.insert(ka, entry(0), now);
        r.cache.insert(kb, entry(1), now);
        r.install_key_set(0, Arc::new(es_only), &mut Recorded::default());
        assert!(r.cache.get(&r.cache.key(a), now).is_none(), "provider a no longer lists the key");
        assert!(r.cache.get(&r.cache.key(b), now).is_some(), "provider b still does");
    }

    /// Attacks on a discovery document's `jwks_uri` and `issuer` (an outside review): spellings of another
    /// authority (trailing dot, port, percent-encoding, backslash, a suffix or prefix of the host) and
    /// `issuer` shapes that only look like the template. The key set is always fetched through the provider's
    /// own cluster, so `:authority` is all a document chooses: an exact match (ASCII case aside) is required.
    #[test]
    fn attack_a_documents_jwks_uri_names_no_other_authority() {
        let expected = DiscoveredJwks {
            issuer: "https://login.microsoftonline.com/{}/v2.0".into(),
            template: true,
            scheme: "https://",
        };
        let authority = "login.microsoftonline.com";
        let doc =
            |issuer: &str, jwks_uri: &str| serde_json::json!({"issuer": issuer, "jwks_uri": jwks_uri}).to_string();
        let issuer = "https://login.microsoftonline.com/{tenantid}/v2.0";
        for uri in [
            "https://login.microsoftonline.com./common/discovery/v2.0/keys",
            "https://login.microsoftonline.com:443/common/discovery/v2.0/keys",
            "https://login%2emicrosoftonline.com/keys",
            "https://login.microsoftonline.com.evil.example/keys",
            "https://evil.login.microsoftonline.com/keys",
            "https://evil.example\\@login.microsoftonline.com/keys",
            "https://login.microsoftonline.com\\.evil.example/keys",
            "https://xn--login-microsoftonline-com.example/keys",
            "https://login.microsoftonline.com\u{3002}evil/keys",
            "HTTPS://login.microsoftonline.com/keys",
            "https:login.microsoftonline.com/keys",
            "//login.microsoftonline.com/keys",
            " https://login.microsoftonline.com/keys",
            "https://login.microsoftonline.com/keys\n",
        ] {
            assert!(jwks_location(doc(issuer, uri).as_bytes(), &expected, authority).is_err(), "{uri}");
        }
        // The same host in another case is the same authority (RFC 3986 §3.2.2), sent as the document wrote it.
        let (at, path) =
            jwks_location(doc(issuer, "https://Login.MicrosoftOnline.com/k?x=1").as_bytes(), &expected, authority)
                .unwrap();
        assert_eq!((at.as_str(), path.as_str()), ("Login.MicrosoftOnline.com", "/k?x=1"));
        // Issuers that only look like the template: another shape, a filled template, two placeholders.
        for other in [
            "https://login.microsoftonline.com/9188040d-6c67-4c5b-b112-36a304b66dad/v2.0",
            "https://login.microsoftonline.com/{tenantid}/v2.0/",
            "https://login.microsoftonline.com/{tenantid}/v2.0{x}",
            "https://login.microsoftonline.com/{tenantid/v2.0",
            "https://LOGIN.microsoftonline.com/{tenantid}/v2.0",
        ] {
            let d = doc(other, "https://login.microsoftonline.com/common/discovery/v2.0/keys");
            assert!(jwks_location(d.as_bytes(), &expected, authority).is_err(), "{other}");
        }
        // An exact issuer's document is compared exactly: a template-shaped issuer is not it.
        let exact =
            DiscoveredJwks { issuer: "https://idp.example/realms/a".into(), template: false, scheme: "https://" };
        let d = doc("https://idp.example/realms/{a}", "https://idp.example/certs");
        assert!(jwks_location(d.as_bytes(), &exact, "idp.example").is_err());
    }

    /// A redirect (to any URL) is not followed and is a failed refresh: the key set in force stays.
    #[test]
    fn attack_a_discovery_redirect_is_a_failed_fetch() {
        let mut r = entra_router();
        tick(&mut r, 0);
        for status in ["301", "302", "307", "308"] {
            let (f, seen) =
                fetched(&mut r, FetchTarget::Discovery(0), Some(status), entra_document().to_string().as_bytes(), 1);
            assert!(seen.fetches.is_empty() && !f.installed, "{status}");
            assert_eq!(seen.counts, ["JwksFetchFailed"], "{status}");
        }
    }

    #[test]
    fn discovery_fetches_the_document_then_the_key_set_it_names_at_every_refresh() {
        let mut r = entra_router();
        let discovery = (
            FetchTarget::Discovery(0),
            "idp".to_string(),
            "login.microsoftonline.com".to_string(),
            "/common/v2.0/.well-known/openid-configuration".to_string(),
        );
        assert_eq!(tick(&mut r, 0).fetches, std::slice::from_ref(&discovery));
        assert!(tick(&mut r, 100).fetches.is_empty(), "one refresh in flight");
        let doc = entra_document().to_string();
        let (f, seen) = fetched(&mut r, FetchTarget::Discovery(0), Some("200"), doc.as_bytes(), 200);
        assert_eq!(f, Fetched::default(), "nothing installed, nobody woken yet");
        assert_eq!(
            seen.fetches,
            [(
                FetchTarget::Jwks(0),
                "idp".into(),
                "login.microsoftonline.com".into(),
                "/common/discovery/v2.0/keys".into()
            )]
        );
        assert!(seen.counts.is_empty() && seen.logs.is_empty(), "{:?} {:?}", seen.counts, seen.logs);
        let (f, seen) = fetched(&mut r, FetchTarget::Jwks(0), Some("200"), testkeys::public_jwks().as_bytes(), 300);
        assert!(f.installed && f.waiting_for == Some(0));
        assert_eq!(seen.counts, ["JwksFetchOk"]);
        assert!(r.keys.0[0].keys.is_some());
        // The next refresh starts with the document again.
        assert!(tick(&mut r, 1_000).fetches.is_empty());
        assert_eq!(tick(&mut r, 300 + 300_000).fetches, [discovery]);
    }

    #[test]
    fn the_default_discovery_uri_is_under_the_issuer() {
        let mut r = discovery_router(serde_json::json!({"issuer": "https://idp.example/realms/acme/"}));
        assert_eq!(
            tick(&mut r, 0).fetches,
            [(
                FetchTarget::Discovery(0),
                "idp".into(),
                "idp.example".into(),
                "/realms/acme/.well-known/openid-configuration".into()
            )]
        );
        // Keycloak's document: its own issuer (exact), keys on the same host.
        let doc = serde_json::json!({"issuer": "https://idp.example/realms/acme/",
            "jwks_uri": "https://idp.example/realms/acme/protocol/openid-connect/certs"});
        let (_, seen) = fetched(&mut r, FetchTarget::Discovery(0), Some("200"), doc.to_string().as_bytes(), 1);
        assert_eq!(seen.fetches[0].3, "/realms/acme/protocol/openid-connect/certs");
        // An exact issuer is compared exactly: the trailing slash matters, placeholders are not normalised.
        for issuer in ["https://idp.example/realms/acme", "https://idp.example/realms/{realm}/"] {
            let mut r = discovery_router(serde_json::json!({"issuer": "https://idp.example/realms/acme/"}));
            tick(&mut r, 0);
            let doc = serde_json::json!({"issuer": issuer, "jwks_uri": "https://idp.example/certs"});
            let (_, seen) = fetched(&mut r, FetchTarget::Discovery(0), Some("200"), doc.to_string().as_bytes(), 1);
            assert!(seen.fetches.is_empty(), "{issuer}");
        }
    }

    #[test]
    fn a_bad_discovery_document_fails_the_refresh_and_never_replaces_a_good_key_set() {
        let good = entra_document();
        let with = |k: &str, v: serde_json::Value| {
            let mut d = good.clone();
            if v.is_null() {
                d.as_object_mut().unwrap().remove(k);
            } else {
                d[k] = v;
            }
            d.to_string().into_bytes()
        };
        let big = format!("{{\"issuer\": \"{}\", \"pad\": \"{}\"}}", ENTRA_V2, "x".repeat(MAX_DISCOVERY_BYTES));
        let cases: Vec<(&str, Option<&str>, Vec<u8>)> = vec![
            ("another issuer", Some("200"), with("issuer", "https://login.microsoftonline.com/common/v2.0".into())),
            ("another host's issuer", Some("200"), with("issuer", "https://evil.example/{tenantid}/v2.0".into())),
            ("a v1 issuer", Some("200"), with("issuer", "https://sts.windows.net/{tenantid}/".into())),
            ("no issuer", Some("200"), with("issuer", serde_json::Value::Null)),
            ("issuer not a string", Some("200"), with("issuer", serde_json::json!(["x"]))),
            ("no jwks_uri", Some("200"), with("jwks_uri", serde_json::Value::Null)),
            ("jwks_uri on another host", Some("200"), with("jwks_uri", "https://evil.example/common/discovery/v2.0/keys".into())),
            ("jwks_uri over http", Some("200"), with("jwks_uri", "http://login.microsoftonline.com/common/discovery/v2.0/keys".into())),
            ("jwks_uri with userinfo", Some("200"), with("jwks_uri", "https://login.microsoftonline.com@evil.example/keys".into())),
            ("jwks_uri on another port", Some("200"), with("jwks_uri", "https://login.microsoftonline.com:8443/keys".into())),
            ("jwks_uri relative", Some("200"), with("jwks_uri", "/common/discovery/v2.0/keys".into())),
            ("jwks_uri another scheme", Some("200"), with("jwks_uri", "file:///etc/passwd".into())),
            ("duplicate issuer", Some("200"), format!("{{\"issuer\": \"{ENTRA_V2}\", \"issuer\": \"x\", \"jwks_uri\": \"https://login.microsoftonline.com/k\"}}").into_bytes()),
            ("not JSON", Some("200"), b"<html>sign in</html>".to_vec()),
            ("an array", Some("200"), b"[]".to_vec()),
            ("too large", Some("200"), big.into_bytes()),
            ("a 404", Some("404"), good.to_string().into_bytes()),
            ("no answer", None, Vec::new()),
        ];
        for (what, status, body) in cases {
            let mut r = entra_router();
            // A good refresh first.
            tick(&mut r, 0);
            fetched(&mut r, FetchTarget::Discovery(0), Some("200"), good.to_string().as_bytes(), 1);
            fetched(&mut r, FetchTarget::Jwks(0), Some("200"), testkeys::public_jwks().as_bytes(), 2);
            let before = r.keys.0[0].keys.clone().unwrap();
            // The next one gets the bad document.
            let now = 2 + 300_000;
            assert_eq!(tick(&mut r, now).fetches.len(), 1, "{what}");
            r.keys.0[0].waiting.push(7);
            let (f, seen) = fetched(&mut r, FetchTarget::Discovery(0), status, &body, now + 1);
            assert!(seen.fetches.is_empty(), "{what}: no key-set fetch");
            assert_eq!(seen.counts, ["JwksFetchFailed"], "{what}");
            assert!(!f.installed && f.waiting_for == Some(0) && f.wake == [7], "{what}: {f:?}");
            assert!(std::sync::Arc::ptr_eq(r.keys.0[0].keys.as_ref().unwrap(), &before), "{what}: keys kept");
            let line = seen.logs.join("\n");
            assert!(line.contains(&format!("discovery document {ENTRA_DISCOVERY}: ")), "{what}: {line}");
            assert!(line.contains("keeping the last 2 keys"), "{what}: {line}");
            assert!(!line.contains("evil") && !line.contains("sign in") && !line.contains("passwd"), "{what}: {line}");
            // Retried with backoff: not at once, then after a second.
            assert!(tick(&mut r, now + 2).fetches.is_empty(), "{what}");
            assert_eq!(tick(&mut r, now + 1 + 1_000).fetches.len(), 1, "{what}");
        }
    }

    #[test]
    fn a_key_set_fetch_that_fails_after_a_good_document_keeps_the_keys_and_refetches_the_document() {
        let mut r = entra_router();
        tick(&mut r, 0);
        let doc = entra_document().to_string();
        fetched(&mut r, FetchTarget::Discovery(0), Some("200"), doc.as_bytes(), 1);
        let (f, seen) = fetched(&mut r, FetchTarget::Jwks(0), Some("500"), b"", 2);
        assert!(!f.installed && seen.counts == ["JwksFetchFailed"]);
        assert!(r.keys.0[0].keys.is_none());
        assert_eq!(tick(&mut r, 2 + 1_000).fetches[0].0, FetchTarget::Discovery(0));
    }

    #[test]
    fn discovery_uri_is_configured_with_jwks_cluster_alone() {
        let base = serde_json::json!({"audiences": ["a"]});
        let field = |p: serde_json::Value| {
            let mut provider = base.clone();
            for (k, v) in p.as_object().unwrap() {
                provider[k] = v.clone();
            }
            let plugin =
                serde_json::json!({"provider": provider, "tenants": {"t": {"cluster": "t"}}, "metadata_cluster": "m"});
            Config::from_json(plugin.to_string().as_bytes()).err().map(|e| e.field)
        };
        let jwks = serde_json::from_str::<serde_json::Value>(&testkeys::public_jwks()).unwrap();
        for (p, want) in [
            (serde_json::json!({"issuer": "https://idp.example", "jwks_cluster": "idp"}), None),
            (serde_json::json!({"issuer": ENTRA_V2, "jwks_cluster": "idp", "discovery_uri": ENTRA_DISCOVERY}), None),
            (serde_json::json!({"issuer": ENTRA_V2, "jwks_cluster": "idp"}), Some("provider.discovery_uri")),
            (serde_json::json!({"issuer": "urn:idp", "jwks_cluster": "idp"}), Some("provider.discovery_uri")),
            (
                serde_json::json!({"issuer": "https://idp.example", "jwks_cluster": "idp", "discovery_uri": "idp.example/x"}),
                Some("provider.discovery_uri"),
            ),
            (
                serde_json::json!({"issuer": "https://idp.example", "jwks_cluster": "idp", "jwks_uri": "https://idp.example/k",
                                "discovery_uri": "https://idp.example/d"}),
                Some("provider.discovery_uri"),
            ),
            (
                serde_json::json!({"issuer": "https://idp.example", "jwks": jwks, "discovery_uri": "https://idp.example/d"}),
                Some("provider.discovery_uri"),
            ),
            (
                serde_json::json!({"issuer": "https://idp.example", "discovery_uri": "https://idp.example/d"}),
                Some("provider.discovery_uri"),
            ),
            (serde_json::json!({"issuer": "https://idp.example"}), Some("provider.jwks_uri")),
        ] {
            assert_eq!(field(p.clone()).as_deref(), want, "{p}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_discovery_document_is_a_location_on_the_same_authority_or_an_error(
            issuer in proptest::prop_oneof![
                proptest::strategy::Just("https://login.microsoftonline.com/{tenantid}/v2.0".to_string()),
                "\\PC{0,40}",
            ],
            uri in proptest::prop_oneof![
                "https://login\\.microsoftonline\\.com[:@/?#a-z0-9.%]{0,30}",
                "\\PC{0,40}",
            ],
            raw in "\\PC{0,120}",
        ) {
            let expected = DiscoveredJwks { issuer: "https://login.microsoftonline.com/{}/v2.0".into(), template: true, scheme: "https://" };
            let doc = serde_json::json!({"issuer": issuer, "jwks_uri": uri}).to_string();
            for body in [doc.as_bytes(), raw.as_bytes()] {
                if let Ok((authority, path)) = jwks_location(body, &expected, "login.microsoftonline.com") {
                    proptest::prop_assert_eq!(authority, "login.microsoftonline.com");
                    proptest::prop_assert!(path.starts_with('/'));
                }
            }
        }
    }
}
