//! The router's background work, host-independent: on every timer tick, the gauges, the cache sweep and the
//! fetches that are due; on every fetch result, the new key set or tenant map installed (or the last good
//! one kept, with backoff), and the requests that waited for it named for waking.

use std::sync::Arc;

use crate::config::{beyond_pure_rust_message, JwksSource, SignatureVerifier};
use crate::effect::{Effect, Effects, Fetch, FetchTarget, Gauge, Level, Metric, TokenEvent};
use crate::jwks::{KeySet, MAX_JWKS_BYTES};
use crate::refresh::{RegistrySource, Schedule, Streak};
use crate::router::Stream;
use crate::router::{quota_of, token_fetch, Router};
use crate::upstream_auth::{
    parse_token_response, Settled, TokenAnswer, TokenError, TokenNews, MAX_TOKEN_RESPONSE_BYTES,
};

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
                out.push(Effect::Fetch(Fetch {
                    target: FetchTarget::Jwks(i),
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
            FetchTarget::Registry => MAX_REGISTRY_BYTES,
            FetchTarget::UpstreamToken { slot, fetch } => {
                return self.on_token_result(slot, fetch, result, now_ms, body, out);
            }
            // A request's own answer: the shell hands it to `Router::on_resend_response`.
            FetchTarget::Resend(_) => return Fetched::default(),
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
            FetchTarget::Registry => {
                let installed = self.install_registry(fetched, now_ms, env, out);
                Fetched { installed, waiting_for: None, wake: Vec::new(), token: None }
            }
            FetchTarget::UpstreamToken { .. } | FetchTarget::Resend(_) => Fetched::default(),
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
        // Cached tokens whose key left every provider's set are dropped.
        let sets = || self.keys.0.iter().filter_map(|s| s.keys.as_ref());
        let fingerprints: Vec<u64> = sets().flat_map(|k| k.fingerprints()).collect();
        let total: usize = sets().map(|k| k.keys().len()).sum();
        out.push(Effect::Gauge(Gauge::JwksKeys, total as u64));
        let dropped = self.cache.retain_keys(&fingerprints);
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
}
