//! Key sets and the tenant registry in the dynamic module: fetched once per process on Envoy's main thread
//! (a ticker thread commits the config-level scheduler every [`TICK_MS`]; the tick and the config-level
//! callout both run on the main thread), then published for the workers, which install the latest answers
//! into their own routers at their next request (one atomic load on the request path when nothing changed).
//! Requests parked for a key set hold a per-stream scheduler; every key-set answer commits them all, and
//! each is decided again on its worker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::effect::{Effect, Effects, FetchTarget, Metric};
use crate::router::Router;
use crate::upkeep::{FetchResult, TICK_MS};

use super::abi::*;
use super::counts::TenantCounts;
use super::host::{log, now_ms, MetricIds};

/// A raw pointer handed between threads; what it points to is guarded by how it is used (see each use).
#[derive(Clone, Copy, Debug)]
pub struct SendPtr(pub *mut std::ffi::c_void);

// SAFETY: the pointers wrapped are Envoy schedulers and the config's Envoy pointer, whose calls the ABI
// allows from any thread (commits) or which are only used on the main thread (callouts, config stats).
unsafe impl Send for SendPtr {}

/// The latest successful fetch answers, for the workers.
#[derive(Default)]
pub struct Published {
    /// Bumped on every new answer; a worker that has seen this generation has installed everything.
    pub generation: AtomicU64,
    bodies: Mutex<Vec<(FetchTarget, Arc<[u8]>)>>,
}

impl Published {
    fn publish(&self, target: FetchTarget, body: Vec<u8>) {
        if let Ok(mut bodies) = self.bodies.lock() {
            bodies.retain(|(t, _)| *t != target);
            bodies.push((target, body.into()));
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Installs into a worker's `router` whatever was published since generation `*seen`.
    pub fn sync(&self, router: &mut Router, seen: &mut u64) {
        let generation = self.generation.load(Ordering::Acquire);
        if generation == *seen {
            return;
        }
        let bodies = self.bodies.lock().map(|b| b.clone()).unwrap_or_default();
        let env = crate::config::process_lookup;
        for (target, body) in bodies {
            let answer = FetchResult::Answer { status: Some("200"), body_size: body.len() };
            // The main thread logged and counted this answer; the workers install it quietly.
            router.on_fetch_result(target, answer, now_ms(), &mut || body.to_vec(), &env, &mut Quiet);
        }
        *seen = generation;
    }
}

/// Discards effects (a worker replaying what the main thread already reported, or building its router).
pub struct Quiet;

impl Effects for Quiet {
    fn push(&mut self, _: Effect<'_>) {}
}

/// Requests parked for a key set (stream id, the provider whose keys it waits for, its scheduler), and the
/// providers whose refetch they ask for.
#[derive(Default)]
pub struct Parked {
    streams: Vec<(u32, usize, SendPtr)>,
    refetch: Vec<usize>,
}

/// Parks a stream: its scheduler is committed (under this lock) at the next key-set answer.
pub fn park(parked: &Mutex<Parked>, stream_id: u32, scheduler: SchedulerPtr, provider: usize) {
    if let Ok(mut p) = parked.lock() {
        p.streams.push((stream_id, provider, SendPtr(scheduler)));
        p.refetch.push(provider);
    }
}

/// Takes a stream off the list (before its scheduler is deleted: the main thread commits only listed ones).
pub fn unpark(parked: &Mutex<Parked>, stream_id: u32) {
    if let Ok(mut p) = parked.lock() {
        p.streams.retain(|(id, _, _)| *id != stream_id);
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

    /// A tick on the main thread: hands the configured tenants' counts to Envoy, refetches the parked
    /// requests asked for, then the fetches that are due.
    pub fn tick(&mut self, main: &Main<'_>) {
        let now = now_ms();
        let envoy_config = main.envoy_config.0;
        main.tenant_counts.drain(|tenant, allowed, n| {
            let metric = if allowed { Metric::TenantAllowed(tenant) } else { Metric::TenantForbidden(tenant) };
            if let Some((id, Some(label))) = main.metrics.counter(metric) {
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
        super::quota::hand_over(envoy_config, main.metrics, main.quota_counts);
        let wanted = main.parked.lock().map(|mut p| std::mem::take(&mut p.refetch)).unwrap_or_default();
        for provider in wanted {
            self.router.refetch_keys(provider, now);
        }
        let mut sink = MainSink { envoy_config, metrics: main.metrics, fetches: Vec::new() };
        self.router.on_tick(now, 0, &mut sink);
        for fetch in std::mem::take(&mut sink.fetches) {
            let headers = [
                (":method", "GET"),
                (":path", fetch.path.as_str()),
                ("host", fetch.authority.as_str()),
                ("accept", "application/json"),
            ];
            let mut headers = ModuleHeader::views(&headers);
            let mut id = 0u64;
            // SAFETY: main thread, live config; every buffer outlives the call.
            let status = unsafe {
                envoy_dynamic_module_callback_http_filter_config_http_callout(
                    envoy_config,
                    &mut id,
                    ModuleBuffer::of(fetch.cluster.as_bytes()),
                    headers.as_mut_ptr(),
                    headers.len(),
                    ModuleBuffer::null(),
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
        if fetched.installed {
            main.published.publish(target, body);
        }
        let Some(provider) = fetched.waiting_for else { return };
        if let Ok(mut p) = main.parked.lock() {
            p.streams.retain(|&(_, waits_for, scheduler)| {
                if waits_for != provider {
                    return true;
                }
                // SAFETY: a listed scheduler is alive: its stream deletes it only after unlisting it under
                // this same lock.
                unsafe { envoy_dynamic_module_callback_http_filter_scheduler_commit(scheduler.0, 1) };
                false
            });
        }
    }
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

/// A fetch to send once the tick's effects are applied.
struct OwnedFetch {
    target: FetchTarget,
    cluster: String,
    authority: String,
    path: String,
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
            // The main thread counts fetch outcomes only: no per-tenant (labelled) counter reaches it.
            Effect::Count(metric) => {
                if let Some((id, None)) = self.metrics.counter(metric) {
                    // SAFETY: main thread, live config.
                    unsafe {
                        envoy_dynamic_module_callback_http_filter_config_increment_counter(
                            self.envoy_config,
                            id,
                            std::ptr::null_mut(),
                            0,
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
                authority: f.authority.to_string(),
                path: f.path.to_string(),
                timeout_ms: f.timeout_ms,
            }),
            _ => {}
        }
    }
}
