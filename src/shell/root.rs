//! The root context: compiles the configuration in `on_configure` (refusing the plugin on error), and keeps
//! each provider's JWKS and the tenant registry fresh: fetched through Envoy clusters on a timer, retried
//! with backoff, the last good version kept.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, MapType};

use crate::cache::TokenCache;
use crate::config::{Config, JwksSource};
use crate::decision::KeyLookup;
use crate::jwks::{KeySet, MAX_JWKS_BYTES};
use crate::refresh::{Schedule, Streak};
use crate::tenant::TenantMap;

use super::host_crypto::HostSignatures;
use super::http::{handle, judge_bundle, After, Filter, OwnedRequest};
use super::metrics::Metrics;
use super::millis;

/// How often the root context looks at the fetch schedules.
const TICK: Duration = Duration::from_millis(500);

/// Most of a waiting request's buffered Bundle read back for judging (Envoy's buffer limit is lower).
const MAX_BUNDLE_BYTES: usize = 64 * 1024 * 1024;

/// Largest tenant registry document accepted, in bytes.
const MAX_REGISTRY_BYTES: usize = 16 * 1024 * 1024;

/// How often expired tokens are swept from the cache (an O(capacity) pass, kept off the per-request path).
const PURGE_EVERY_S: i64 = 10;

/// A request parked until a JWKS refetch answers, because its token names a `kid` the keys lack.
pub struct Waiter {
    pub context_id: u32,
    pub request: OwnedRequest,
}

/// One provider's keys so far and when its next fetch is due.
#[derive(Default)]
pub struct KeyState {
    pub keys: Option<Rc<KeySet>>,
    pub schedule: Option<Schedule>,
    pub waiting: Vec<Waiter>,
}

/// The key states of every provider, by index: what the core's decision looks keys up in.
pub struct KeyStates(pub Vec<KeyState>);

impl KeyLookup for KeyStates {
    fn key_set(&self, provider: usize) -> Option<&KeySet> {
        self.0.get(provider).and_then(|s| s.keys.as_deref())
    }
}

/// The tenant map in force and, with a registry, when its next fetch is due.
pub struct TenantState {
    /// `None` while a registry is configured, the configuration names no tenant, and no document came yet.
    pub map: Option<Rc<TenantMap>>,
    pub schedule: Option<Schedule>,
}

/// Everything an HTTP context needs, built once per configuration.
pub struct Shared {
    pub config: Config,
    pub keys: RefCell<KeyStates>,
    pub tenants: RefCell<TenantState>,
    pub cache: RefCell<TokenCache>,
    /// Per-request work left after the headers (body inspection, response edits), by context id.
    pub after: RefCell<HashMap<u32, After>>,
    /// Requests that waited for a refetch and whose body is already complete (buffered by the host).
    pub body_complete: RefCell<HashSet<u32>>,
    pub signatures: HostSignatures,
    pub metrics: Rc<Metrics>,
    /// Whether this VM has served a request. Only such VMs (Envoy's workers, not its main thread) publish
    /// the per-VM gauges, which every VM would otherwise overwrite.
    pub served: Cell<bool>,
}

impl Shared {
    /// Whether the request is parked waiting for a JWKS refetch.
    pub fn is_waiting(&self, context_id: u32) -> bool {
        self.keys.borrow().0.iter().any(|s| s.waiting.iter().any(|w| w.context_id == context_id))
    }
}

/// What an outgoing call of the root context was for.
#[derive(Clone, Copy, Debug)]
enum Fetch {
    Jwks(usize),
    Registry,
}

#[derive(Default)]
pub struct Root {
    shared: Option<Rc<Shared>>,
    last_purge_s: i64,
    calls: HashMap<u32, Fetch>,
}

impl Root {
    fn now_ms(&self) -> u64 {
        millis(self.get_current_time())
    }

    fn jwks_fetched(&self, shared: &Shared, provider: usize, outcome: Result<KeySet, String>) {
        let now = self.now_ms();
        self.install_keys(shared, provider, outcome, now);
        // Requests that waited for this fetch are decided again with whatever keys there are now.
        let waiters = shared.keys.borrow_mut().0.get_mut(provider).map(|s| std::mem::take(&mut s.waiting));
        for waiter in waiters.unwrap_or_default() {
            if hostcalls::set_effective_context(waiter.context_id).is_err() {
                continue; // the client went away
            }
            let id = waiter.context_id;
            let mut action = handle(shared, id, &waiter.request, now, false);
            // A Bundle that must be judged: if its body already arrived while waiting, judge it now.
            let inspect = shared.after.borrow().get(&id).filter(|a| a.inspect_body.is_some()).cloned();
            if let Some(after) = inspect {
                if shared.body_complete.borrow_mut().remove(&id) {
                    let body = super::buffered_request_body(MAX_BUNDLE_BYTES);
                    action = judge_bundle(shared, id, after, &body, now);
                }
            }
            if action == Action::Continue {
                let _ = hostcalls::resume_http_request();
            }
        }
    }

    fn install_keys(&self, shared: &Shared, provider: usize, outcome: Result<KeySet, String>, now: u64) {
        let issuer = shared.config.providers.get(provider).map_or("", |p| p.provider.issuer.as_str());
        let mut states = shared.keys.borrow_mut();
        let Some(state) = states.0.get_mut(provider) else { return };
        let counters = (shared.metrics.jwks_fetch_ok, shared.metrics.jwks_fetch_failed);
        let kept = match &state.keys {
            Some(k) => format!("keeping the last {} keys", k.keys().len()),
            None => "no keys yet: token requests get 503".to_string(),
        };
        let what = format!("JWKS fetch for {issuer}");
        let Some(keys) = settle(&shared.metrics, counters, state.schedule.as_mut(), now, &what, &kept, outcome) else {
            return;
        };
        if keys.skipped() > 0 {
            let (usable, skipped) = (keys.keys().len(), keys.skipped());
            log::info!("JWKS of {issuer}: {usable} usable keys, {skipped} skipped (wrong type, use, alg or size)");
        }
        state.keys = Some(Rc::new(keys));
        // Cached tokens whose key left every provider's set are dropped.
        let fingerprints: Vec<u64> =
            states.0.iter().filter_map(|s| s.keys.as_ref()).flat_map(|k| k.fingerprints()).collect();
        let total: usize = states.0.iter().filter_map(|s| s.keys.as_ref()).map(|k| k.keys().len()).sum();
        Metrics::set(shared.metrics.jwks_keys, total as u64);
        let dropped = shared.cache.borrow_mut().retain_keys(&fingerprints);
        if dropped > 0 {
            log::info!("JWKS: dropped {dropped} cached tokens whose key left the key set");
        }
    }

    fn registry_fetched(&self, shared: &Shared, outcome: Result<Vec<u8>, String>) {
        let now = self.now_ms();
        let compiled = outcome.and_then(|body| {
            shared.config.compile_registry(&body, &|name| std::env::var(name).ok()).map_err(|e| e.to_string())
        });
        let mut state = shared.tenants.borrow_mut();
        let counters = (shared.metrics.registry_fetch_ok, shared.metrics.registry_fetch_failed);
        let kept = match &state.map {
            Some(m) => format!("keeping the last {} tenants", m.len()),
            None => "no tenants yet: token requests get 503".to_string(),
        };
        let schedule = state.schedule.as_mut();
        if let Some(map) = settle(&shared.metrics, counters, schedule, now, "tenant registry fetch", &kept, compiled) {
            Metrics::set(shared.metrics.registry_tenants, map.len() as u64);
            state.map = Some(Rc::new(map));
        }
    }

    /// Sends a GET through `cluster`; a call that cannot be sent is reported as failed at once.
    fn fetch(
        &mut self,
        what: Fetch,
        cluster: &str,
        authority: &str,
        path: &str,
        timeout_ms: u64,
    ) -> Result<(), String> {
        let headers =
            vec![(":method", "GET"), (":path", path), (":authority", authority), ("accept", "application/json")];
        match self.dispatch_http_call(cluster, headers, None, vec![], Duration::from_millis(timeout_ms)) {
            Ok(token) => {
                self.calls.insert(token, what);
                Ok(())
            }
            Err(status) => Err(format!("could not be sent through cluster {cluster}: {status:?}")),
        }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        let Some(shared) = self.shared.clone() else { return };
        let Some(what) = self.calls.remove(&token_id) else { return };
        let limit = match what {
            Fetch::Jwks(_) => MAX_JWKS_BYTES,
            Fetch::Registry => MAX_REGISTRY_BYTES,
        };
        let status = super::header_value(MapType::HttpCallResponseHeaders, ":status");
        let body = match status.as_deref() {
            None => Err("no response: connection failure or timeout".to_string()),
            Some("200") if body_size > limit => Err(format!("body larger than {limit} bytes")),
            Some("200") => Ok(self.get_http_call_response_body(0, body_size).unwrap_or_default()),
            Some(other) => Err(format!("HTTP status {other}")),
        };
        match what {
            Fetch::Jwks(i) => {
                let outcome = body.and_then(|b| KeySet::from_jwks(&b).map_err(|e| e.to_string()));
                self.jwks_fetched(&shared, i, outcome);
            }
            Fetch::Registry => self.registry_fetched(&shared, body),
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let config = match Config::from_json(&bytes) {
            Ok(c) => c,
            Err(e) => {
                log::error!("{e}");
                return false;
            }
        };
        let metrics = Rc::new(Metrics::define());
        let now = self.now_ms();
        let mut states = Vec::with_capacity(config.providers.len());
        let mut sources = Vec::new();
        for p in &config.providers {
            let mut state = KeyState::default();
            match &p.jwks {
                JwksSource::Inline(keys) => {
                    state.keys = Some(Rc::new(keys.clone()));
                    sources.push(format!("{} (inline JWKS)", p.provider.issuer));
                }
                JwksSource::Remote(r) => {
                    state.schedule = Some(Schedule::new(r.refresh_ms, now));
                    sources.push(format!(
                        "{} (JWKS from cluster {} every {} s)",
                        p.provider.issuer,
                        r.cluster,
                        r.refresh_ms / 1000
                    ));
                }
            }
            states.push(state);
        }
        let inline_keys: usize = states.iter().filter_map(|s| s.keys.as_ref()).map(|k| k.keys().len()).sum();
        Metrics::set(metrics.jwks_keys, inline_keys as u64);
        let tenants = TenantState {
            map: (!config.tenants.is_empty() || config.registry.is_none()).then(|| Rc::new(config.tenants.clone())),
            schedule: config.registry.as_ref().map(|r| Schedule::new(r.refresh_ms, now)),
        };
        log::info!(
            "configured: {} tenants{}, issuers {}, signature verifier {:?}",
            config.tenants.len(),
            if config.registry.is_some() { " (and a tenant registry)" } else { "" },
            sources.join(", "),
            config.signature_verifier
        );
        let signatures = HostSignatures::new(config.signature_verifier, metrics.clone());
        let cache = RefCell::new(TokenCache::new(config.token_cache_entries));
        self.shared = Some(Rc::new(Shared {
            config,
            keys: RefCell::new(KeyStates(states)),
            tenants: RefCell::new(tenants),
            cache,
            after: RefCell::new(HashMap::new()),
            body_complete: RefCell::new(HashSet::new()),
            signatures,
            metrics,
            served: Cell::new(false),
        }));
        // Ticks drive the fetch schedules and flush the stats.
        self.set_tick_period(TICK);
        true
    }

    fn on_tick(&mut self) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        shared.metrics.flush();
        if shared.served.get() {
            Metrics::set(shared.metrics.vm_memory_bytes, vm_memory_bytes());
            Metrics::set(shared.metrics.cache_entries, shared.cache.borrow().len() as u64);
        }
        let now = self.now_ms();
        let now_s = i64::try_from(now / 1000).unwrap_or(i64::MAX);
        if now_s.saturating_sub(self.last_purge_s) >= PURGE_EVERY_S {
            self.last_purge_s = now_s;
            shared.cache.borrow_mut().purge_expired(now_s);
        }
        for (i, p) in shared.config.providers.iter().enumerate() {
            let JwksSource::Remote(remote) = &p.jwks else { continue };
            let due =
                shared.keys.borrow_mut().0.get_mut(i).and_then(|s| s.schedule.as_mut()).is_some_and(|s| s.due(now));
            if due {
                if let Err(why) =
                    self.fetch(Fetch::Jwks(i), &remote.cluster, &remote.authority, &remote.path, remote.timeout_ms)
                {
                    self.jwks_fetched(&shared, i, Err(why));
                }
            }
        }
        if let Some(r) = &shared.config.registry {
            let due = shared.tenants.borrow_mut().schedule.as_mut().is_some_and(|s| s.due(now));
            if due {
                if let Err(why) = self.fetch(Fetch::Registry, &r.cluster, &r.authority, &r.path, r.timeout_ms) {
                    self.registry_fetched(&shared, Err(why));
                }
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        shared.served.set(true);
        Some(Box::new(Filter::new(context_id, shared)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Advances a fetch schedule with one outcome and counts it (`counters`: ok, failed). A failure streak is
/// logged once when it starts (saying what is `kept`) and once when it ends. Returns the fetched value.
fn settle<T>(
    metrics: &Metrics,
    counters: (Option<u32>, Option<u32>),
    schedule: Option<&mut Schedule>,
    now: u64,
    what: &str,
    kept: &str,
    outcome: Result<T, String>,
) -> Option<T> {
    match outcome {
        Ok(value) => {
            metrics.count(counters.0);
            if let Some(Streak::Ended { failures }) = schedule.map(|s| s.succeeded(now)) {
                log::info!("{what} recovered after {failures} failed attempts");
            }
            Some(value)
        }
        Err(why) => {
            metrics.count(counters.1);
            if schedule.map(|s| s.failed(now)) == Some(Streak::Started) {
                log::warn!("{what} failed ({why}); {kept}; retrying with backoff (logged once per failure streak)");
            }
            None
        }
    }
}

/// The VM's linear memory, in bytes: what the module's allocator has taken from the host.
fn vm_memory_bytes() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        (core::arch::wasm32::memory_size(0) as u64).saturating_mul(65_536)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        0
    }
}
