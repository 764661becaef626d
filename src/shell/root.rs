//! The root context: compiles the configuration in `on_configure` (refusing the plugin on error), and keeps
//! the JWKS fresh: fetched through an Envoy cluster on a timer, retried with backoff, the last good set kept.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, MapType};

use crate::cache::TokenCache;
use crate::config::{Config, JwksSource};
use crate::jwks::{KeySet, MAX_JWKS_BYTES};
use crate::refresh::{Schedule, Streak};

use super::host_crypto::HostSignatures;
use super::http::{handle, After, Filter, OwnedRequest};
use super::metrics::Metrics;
use super::millis;

/// How often the root context looks at the JWKS schedule.
const TICK: Duration = Duration::from_millis(500);

/// A request parked until a JWKS refetch answers, because its token names a `kid` the keys lack.
pub struct Waiter {
    pub context_id: u32,
    pub request: OwnedRequest,
}

/// The keys known so far and when the next fetch is due; shared by the root and every HTTP context of a VM.
#[derive(Default)]
pub struct KeyState {
    pub keys: Option<Rc<KeySet>>,
    pub schedule: Option<Schedule>,
    pub waiting: Vec<Waiter>,
}

/// Everything an HTTP context needs, built once per configuration.
pub struct Shared {
    pub config: Config,
    pub keys: RefCell<KeyState>,
    pub cache: RefCell<TokenCache>,
    /// Per-request work left after the headers (body inspection, response edits), by context id.
    pub after: RefCell<HashMap<u32, After>>,
    pub signatures: HostSignatures,
    pub metrics: Rc<Metrics>,
}

#[derive(Default)]
pub struct Root {
    shared: Option<Rc<Shared>>,
    last_purge_s: i64,
}

/// How often expired tokens are swept from the cache (an O(capacity) pass, kept off the per-request path).
const PURGE_EVERY_S: i64 = 10;

impl Root {
    fn now_ms(&self) -> u64 {
        millis(self.get_current_time())
    }

    fn fetch_finished(&self, shared: &Shared, outcome: Result<KeySet, String>) {
        let now = self.now_ms();
        self.install(shared, outcome, now);
        // Requests that waited for this fetch are decided again with whatever keys there are now.
        let waiters = std::mem::take(&mut shared.keys.borrow_mut().waiting);
        for waiter in waiters {
            if hostcalls::set_effective_context(waiter.context_id).is_err() {
                continue; // the client went away
            }
            if handle(shared, waiter.context_id, waiter.request, now, false) == Action::Continue {
                let _ = hostcalls::resume_http_request();
            }
        }
    }

    fn install(&self, shared: &Shared, outcome: Result<KeySet, String>, now: u64) {
        let mut state = shared.keys.borrow_mut();
        let streak = match outcome {
            Ok(keys) => {
                shared.metrics.count(shared.metrics.jwks_fetch_ok);
                Metrics::set(shared.metrics.jwks_keys, keys.keys().len() as u64);
                if keys.skipped() > 0 {
                    log::info!(
                        "JWKS: {} usable keys, {} skipped (wrong type, use, alg or size)",
                        keys.keys().len(),
                        keys.skipped()
                    );
                }
                let dropped = shared.cache.borrow_mut().retain_keys(&keys.fingerprints());
                if dropped > 0 {
                    log::info!("JWKS: dropped {dropped} cached tokens whose key left the key set");
                }
                state.keys = Some(Rc::new(keys));
                state.schedule.as_mut().map(|s| s.succeeded(now))
            }
            Err(why) => {
                shared.metrics.count(shared.metrics.jwks_fetch_failed);
                let streak = state.schedule.as_mut().map(|s| s.failed(now));
                if streak == Some(Streak::Started) {
                    let kept = match &state.keys {
                        Some(k) => format!("keeping the last {} keys", k.keys().len()),
                        None => "no keys yet: token requests get 503".to_string(),
                    };
                    log::warn!(
                        "JWKS fetch failed ({why}); {kept}; retrying with backoff (logged once per failure streak)"
                    );
                }
                streak
            }
        };
        if let Some(Streak::Ended { failures }) = streak {
            log::info!("JWKS fetch recovered after {failures} failed attempts");
        }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, _token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let status = super::header_value(MapType::HttpCallResponseHeaders, ":status");
        let outcome = match status.as_deref() {
            None => Err("no response: connection failure or timeout".to_string()),
            Some("200") if body_size > MAX_JWKS_BYTES => Err(format!("body larger than {MAX_JWKS_BYTES} bytes")),
            Some("200") => {
                let body = self.get_http_call_response_body(0, body_size).unwrap_or_default();
                KeySet::from_jwks(&body).map_err(|e| e.to_string())
            }
            Some(other) => Err(format!("HTTP status {other}")),
        };
        self.fetch_finished(&shared, outcome);
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
        let mut state = KeyState::default();
        let source = match &config.jwks {
            JwksSource::Inline(keys) => {
                Metrics::set(metrics.jwks_keys, keys.keys().len() as u64);
                state.keys = Some(Rc::new(keys.clone()));
                "inline JWKS".to_string()
            }
            JwksSource::Remote(r) => {
                state.schedule = Some(Schedule::new(r.refresh_ms, self.now_ms()));
                format!("JWKS from cluster {} every {} s", r.cluster, r.refresh_ms / 1000)
            }
        };
        log::info!(
            "configured: {} tenants, issuer {}, {source}, signature verifier {:?}",
            config.tenants.len(),
            config.provider.issuer,
            config.signature_verifier
        );
        let signatures = HostSignatures::new(config.signature_verifier, metrics.clone());
        let cache = RefCell::new(TokenCache::new(config.token_cache_entries));
        self.shared = Some(Rc::new(Shared {
            config,
            keys: RefCell::new(state),
            cache,
            after: RefCell::new(HashMap::new()),
            signatures,
            metrics,
        }));
        // Ticks drive the JWKS schedule and refresh the memory gauges.
        self.set_tick_period(TICK);
        true
    }

    fn on_tick(&mut self) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        shared.metrics.flush();
        let now_s = i64::try_from(self.now_ms() / 1000).unwrap_or(i64::MAX);
        if now_s.saturating_sub(self.last_purge_s) >= PURGE_EVERY_S {
            self.last_purge_s = now_s;
            shared.cache.borrow_mut().purge_expired(now_s);
        }
        Metrics::set(shared.metrics.vm_memory_bytes, vm_memory_bytes());
        Metrics::set(shared.metrics.cache_entries, shared.cache.borrow().len() as u64);
        let JwksSource::Remote(remote) = &shared.config.jwks else {
            return;
        };
        let now = self.now_ms();
        let due = shared.keys.borrow_mut().schedule.as_mut().is_some_and(|s| s.due(now));
        if !due {
            return;
        }
        let headers = vec![
            (":method", "GET"),
            (":path", remote.path.as_str()),
            (":authority", remote.authority.as_str()),
            ("accept", "application/json, application/jwk-set+json"),
        ];
        let timeout = Duration::from_millis(remote.timeout_ms);
        if let Err(status) = self.dispatch_http_call(&remote.cluster, headers, None, vec![], timeout) {
            self.fetch_finished(
                &shared,
                Err(format!("could not be sent through cluster {}: {status:?}", remote.cluster)),
            );
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter::new(context_id, self.shared.clone()?)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
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
