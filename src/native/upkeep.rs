//! Key sets, the tenant registry and upstream tokens in the dynamic module: fetched once per process on
//! Envoy's main thread (a ticker thread commits the config-level scheduler every [`TICK_MS`], and a
//! worker's token wish commits it at once; the tick and the config-level callout both run on the main
//! thread), compiled there once, then published for the workers, which install the compiled answers into
//! their own routers at their next request (one atomic load on the request path when nothing changed; see
//! [`super::published`]). Requests parked for a key set or a token hold a per-stream scheduler; the answer
//! commits them all, and each is decided again on its worker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::effect::{Effect, Effects, FetchTarget, Metric};
use crate::router::Router;
use crate::upkeep::{FetchResult, TICK_MS};
use crate::upstream_auth::TokenAnswer;

use super::abi::*;
use super::counts::TenantCounts;
use super::host::{log, now_ms, MetricIds};

use super::published::{answer_wishes, token_answered as hand_on};
pub use super::published::{Awaited, Parked, Published, Quiet, SendPtr};

/// The event id of a config-level scheduler commit for a worker's token wish (the ticker's are 0).
const WISH_EVENT: u64 = 1;

/// Commits a parked stream's scheduler.
fn commit_stream(scheduler: SendPtr) {
    // SAFETY: a listed scheduler is alive: its stream deletes it only after unlisting it under the lock
    // that guards the list it was taken from (this is called under that lock).
    unsafe { envoy_dynamic_module_callback_http_filter_scheduler_commit(scheduler.0, 1) };
}

/// Parks a stream: its scheduler is committed (under this lock) when what it waits for comes (or fails).
/// A stream waiting for a token asks for it with [`want_token`] too.
pub fn park(parked: &Mutex<Parked>, stream_id: u32, scheduler: SchedulerPtr, awaited: Awaited) {
    if let Ok(mut p) = parked.lock() {
        p.park(stream_id, SendPtr(scheduler), awaited);
    }
}

/// Asks the main thread for a new upstream token of `tenant`, this worker having the one numbered `have`
/// (see [`Router::token_wanted`]): the first such wish since the main thread last looked wakes it at once.
pub fn want_token(parked: &Mutex<Parked>, tenant: &str, have: u64) {
    let waker = parked.lock().ok().and_then(|mut p| p.wish(tenant, have));
    if let Some(scheduler) = waker {
        // SAFETY: the config-level scheduler may be committed from any thread; it is deleted in
        // config_destroy, after every stream (each holding the config alive) is gone.
        unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_commit(scheduler.0, WISH_EVENT) };
    }
}

/// Takes a stream off the list (before its scheduler is deleted: the main thread commits only listed ones).
pub fn unpark(parked: &Mutex<Parked>, stream_id: u32) {
    if let Ok(mut p) = parked.lock() {
        p.unpark(stream_id);
    }
}

/// What the main thread's events reach besides the upkeep itself.
pub struct Main<'a> {
    /// Envoy's filter config (main thread only).
    pub envoy_config: SendPtr,
    pub metrics: &'a MetricIds,
    pub parked: &'a Mutex<Parked>,
    pub published: &'a Published,
    pub tenant_counts: &'a TenantCounts,
    /// The configured tenants' quota counts (allowed, limited).
    pub quota_counts: &'a TenantCounts,
}

/// The main thread's part: its own router (schedules, the one log line and count per fetch), the callouts
/// in flight, the ticker.
pub struct Upkeep {
    router: Router,
    calls: HashMap<u64, FetchTarget>,
    scheduler: SendPtr,
    stop: Arc<AtomicBool>,
    ticker: Option<JoinHandle<()>>,
}

impl Upkeep {
    /// Starts the ticker for `envoy_config`'s config-level scheduler.
    ///
    /// # Safety
    /// Call in `config_new`, on the main thread, with the config being created.
    pub unsafe fn start(router: Router, envoy_config: ConfigEnvoyPtr) -> Self {
        // SAFETY: called in config_new, on the main thread, with the config being created.
        let scheduler =
            SendPtr(unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_new(envoy_config) });
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let (stop, scheduler) = (Arc::clone(&stop), scheduler);
            std::thread::Builder::new()
                .name("fhir-tenant-router-tick".into())
                .spawn(move || {
                    let scheduler = scheduler;
                    while !stop.load(Ordering::Acquire) {
                        std::thread::park_timeout(Duration::from_millis(TICK_MS));
                        if !stop.load(Ordering::Acquire) {
                            // SAFETY: the scheduler is deleted only after this thread has been joined.
                            unsafe {
                                envoy_dynamic_module_callback_http_filter_config_scheduler_commit(scheduler.0, 0)
                            };
                        }
                    }
                })
                .ok()
        };
        Self { router, calls: HashMap::new(), scheduler, stop, ticker }
    }

    /// The config-level scheduler, for the workers' token wishes to wake the main thread ([`Parked::waking`]).
    pub fn waker(&self) -> SendPtr {
        self.scheduler
    }

    /// A tick on the main thread: hands the configured tenants' counts to Envoy, refetches the parked
    /// requests asked for, then the fetches that are due.
    pub fn tick(&mut self, main: &Main<'_>) {
        let now = now_ms();
        let envoy_config = main.envoy_config.0;
        hand_over(envoy_config, main.metrics, main.tenant_counts, |tenant, allowed| {
            if allowed {
                Metric::TenantAllowed(tenant)
            } else {
                Metric::TenantForbidden(tenant)
            }
        });
        hand_over(envoy_config, main.metrics, main.quota_counts, |tenant, allowed| {
            Metric::TenantQuota(tenant, allowed)
        });
        let (wanted, tokens) = main.parked.lock().map(|mut p| p.take()).unwrap_or_default();
        for provider in wanted {
            self.router.refetch_keys(provider, now);
        }
        // Answered at once (a token fetched since, or no fetch to wait for), or by the fetch the tick below
        // sends (or one under way).
        answer_wishes(&mut self.router, tokens, now, main.published, main.parked, &mut commit_stream);
        let mut sink = MainSink { envoy_config, metrics: main.metrics, fetches: Vec::new() };
        self.router.on_tick(now, 0, &mut sink);
        // A token fetch Envoy never answered (it answers every callout, with a failure at its timeout).
        let (_, lost) = self.router.lost_token_fetches(now, &mut sink);
        for answer in lost {
            token_answered(main, answer);
        }
        for fetch in std::mem::take(&mut sink.fetches) {
            let mut headers = ModuleHeader::callout_views(fetch.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())));
            let mut id = 0u64;
            // SAFETY: main thread, live config; every buffer outlives the call.
            let status = unsafe {
                envoy_dynamic_module_callback_http_filter_config_http_callout(
                    envoy_config,
                    &mut id,
                    ModuleBuffer::of(fetch.cluster.as_bytes()),
                    headers.as_mut_ptr(),
                    headers.len(),
                    if fetch.body.is_empty() { ModuleBuffer::null() } else { ModuleBuffer::of(&fetch.body) },
                    fetch.timeout_ms,
                )
            };
            if status == CALLOUT_SUCCESS {
                self.calls.insert(id, fetch.target);
            } else {
                let why = format!("could not be sent through cluster {} (callout status {status})", fetch.cluster);
                self.answer(main, fetch.target, FetchResult::NotSent(&why), Vec::new());
            }
        }
    }

    /// A callout's answer (`status`: its `:status`, `None` when it failed).
    pub fn called_back(&mut self, main: &Main<'_>, id: u64, status: Option<&str>, body: Vec<u8>) {
        let Some(target) = self.calls.remove(&id) else { return };
        let result = FetchResult::Answer { status, body_size: body.len() };
        self.answer(main, target, result, body);
    }

    /// Applies what the core says of a fetch's end: an installed answer goes to the workers; the requests
    /// parked for that provider's keys (on any worker) are decided again.
    fn answer(&mut self, main: &Main<'_>, target: FetchTarget, result: FetchResult<'_>, body: Vec<u8>) {
        let env = crate::config::process_lookup;
        let mut sink = MainSink { envoy_config: main.envoy_config.0, metrics: main.metrics, fetches: Vec::new() };
        let fetched = self.router.on_fetch_result(target, result, now_ms(), &mut || body.clone(), &env, &mut sink);
        if let Some(answer) = fetched.token {
            token_answered(main, answer);
            return;
        }
        if fetched.installed {
            main.published.publish_installed(&self.router, target);
        }
        let Some(provider) = fetched.waiting_for else { return };
        if let Ok(mut p) = main.parked.lock() {
            p.wake(&Awaited::Keys(provider), commit_stream);
        }
    }
}

/// A tenant's token fetch ended (or was not sent): the workers install the news, and the requests parked
/// for that tenant's token are decided again.
fn token_answered(main: &Main<'_>, answer: TokenAnswer) {
    hand_on(main.published, main.parked, answer, &mut commit_stream);
}

impl Drop for Upkeep {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(ticker) = self.ticker.take() {
            ticker.thread().unpark();
            let _ = ticker.join();
        }
        // SAFETY: the ticker, the only other user, has ended; Envoy's config is still alive (we are in
        // config_destroy).
        unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.scheduler.0) };
    }
}

/// Hands the per-tenant counts kept by the workers since the last tick to Envoy (see `counts`): one labelled
/// increment per tenant and counter that moved, `metric` naming it. Main thread only.
fn hand_over(
    envoy_config: ConfigEnvoyPtr,
    metrics: &MetricIds,
    counts: &TenantCounts,
    metric: fn(&str, bool) -> Metric<'_>,
) {
    counts.drain(|tenant, allowed, n| {
        if let Some((id, Some(label))) = metrics.counter(metric(tenant, allowed)) {
            let mut labels = [ModuleBuffer::of(label.as_bytes())];
            // SAFETY: main thread, live config; the label outlives the call.
            unsafe {
                envoy_dynamic_module_callback_http_filter_config_increment_counter(
                    envoy_config,
                    id,
                    labels.as_mut_ptr(),
                    1,
                    n,
                )
            };
        }
    });
}

/// A fetch to send once the tick's effects are applied.
struct OwnedFetch {
    target: FetchTarget,
    cluster: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout_ms: u64,
}

/// Applies the main thread's effects: log lines, config-level stats, fetches to send.
struct MainSink<'a> {
    envoy_config: ConfigEnvoyPtr,
    metrics: &'a MetricIds,
    fetches: Vec<OwnedFetch>,
}

impl Effects for MainSink<'_> {
    fn push(&mut self, effect: Effect<'_>) {
        match effect {
            Effect::Log(level, line) => log(level, line),
            // Fetch outcomes, and a tenant's upstream token fetches (labelled by tenant).
            Effect::Count(metric) => {
                if let Some((id, label)) = self.metrics.counter(metric) {
                    let mut labels = [ModuleBuffer::of(label.unwrap_or_default().as_bytes())];
                    // SAFETY: main thread, live config; the label outlives the call.
                    unsafe {
                        envoy_dynamic_module_callback_http_filter_config_increment_counter(
                            self.envoy_config,
                            id,
                            labels.as_mut_ptr(),
                            usize::from(label.is_some()),
                            1,
                        )
                    };
                }
            }
            Effect::Gauge(gauge, value) => {
                if let Some(id) = self.metrics.gauge(gauge) {
                    // SAFETY: main thread, live config.
                    unsafe {
                        envoy_dynamic_module_callback_http_filter_config_set_gauge(
                            self.envoy_config,
                            id,
                            std::ptr::null_mut(),
                            0,
                            value,
                        )
                    };
                }
            }
            Effect::Fetch(f) => self.fetches.push(OwnedFetch {
                target: f.target,
                cluster: f.cluster.to_string(),
                headers: f.headers().into_iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
                body: f.body().to_vec(),
                timeout_ms: f.timeout_ms,
            }),
            _ => {}
        }
    }
}
