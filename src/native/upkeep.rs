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

use crate::effect::{Effect, Effects, FetchTarget, Metric};
use crate::router::Router;
use crate::upkeep::{FetchResult, TICK_MS};
use crate::upstream_auth::TokenAnswer;

use super::abi::{ConfigEnvoyPtr, SchedulerPtr};
use super::counts::TenantCounts;
use super::envoy::Envoy;
use super::host::{now_ms, MetricIds};

/// A raw pointer handed between threads; what it points to is guarded by how it is used (see each use).
#[derive(Clone, Copy, Debug)]
pub struct SendPtr(pub *mut std::ffi::c_void);

// SAFETY: the pointers wrapped are Envoy schedulers and the config's Envoy pointer, whose calls the ABI
// allows from any thread (commits) or which are only used on the main thread (callouts, config stats).
unsafe impl Send for SendPtr {}

/// One published answer: a key set's or the registry's body, or a tenant's upstream token news.
#[derive(Clone)]
enum News {
    Body(FetchTarget, Arc<[u8]>),
    Token(Arc<TokenAnswer>),
}

impl News {
    fn replaces(&self, other: &News) -> bool {
        match (self, other) {
            (News::Body(a, _), News::Body(b, _)) => a == b,
            (News::Token(a), News::Token(b)) => a.tenant == b.tenant,
            _ => false,
        }
    }
}

/// The latest fetch answers, for the workers: the latest good body of each key set and of the registry,
/// and the latest token news of each tenant with `upstream_auth`, each numbered by the generation that
/// published it.
#[derive(Default)]
pub struct Published {
    /// The newest entry's generation; a worker that has seen it has installed everything.
    pub generation: AtomicU64,
    entries: Mutex<Vec<(u64, News)>>,
}

impl Published {
    fn publish(&self, news: News) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|(_, n)| !news.replaces(n));
            // Bumped under the lock: entries are numbered in the order they are listed.
            let generation = self.generation.load(Ordering::Relaxed) + 1;
            entries.push((generation, news));
            self.generation.store(generation, Ordering::Release);
        }
    }

    fn publish_body(&self, target: FetchTarget, body: Vec<u8>) {
        self.publish(News::Body(target, body.into()));
    }

    fn publish_token(&self, answer: TokenAnswer) {
        self.publish(News::Token(Arc::new(answer)));
    }

    /// Installs into a worker's `router` whatever was published after generation `*seen`, in order.
    pub fn sync(&self, router: &mut Router, seen: &mut u64) {
        if self.generation.load(Ordering::Acquire) == *seen {
            return;
        }
        let (newest, news): (u64, Vec<News>) = match self.entries.lock() {
            Ok(entries) => (
                entries.last().map_or(*seen, |(g, _)| *g),
                entries.iter().filter(|(g, _)| *g > *seen).map(|(_, n)| n.clone()).collect(),
            ),
            Err(_) => return,
        };
        let env = crate::config::process_lookup;
        for news in news {
            match news {
                News::Body(target, body) => {
                    let answer = FetchResult::Answer { status: Some("200"), body_size: body.len() };
                    // The main thread logged and counted this answer; the workers install it quietly.
                    router.on_fetch_result(target, answer, now_ms(), &mut || body.to_vec(), &env, &mut Quiet);
                }
                News::Token(answer) => router.install_token(&answer),
            }
        }
        *seen = newest;
    }
}

/// Discards effects (a worker replaying what the main thread already reported, or building its router).
pub struct Quiet;

impl Effects for Quiet {
    fn push(&mut self, _: Effect<'_>) {}
}

/// What a parked request waits for.
#[derive(Debug, PartialEq, Eq)]
pub enum Awaited {
    /// The key set of this provider.
    Keys(usize),
    /// An upstream token of this tenant.
    Token(String),
}

/// Parked requests (stream id, what it waits for, its scheduler), the providers whose refetch they ask
/// for, and the tenants whose new upstream token the workers ask for (for waiting requests, a renewal, or
/// after a 401).
#[derive(Default)]
pub struct Parked {
    streams: Vec<(u32, Awaited, SendPtr)>,
    refetch: Vec<usize>,
    tokens: Vec<String>,
}

impl Parked {
    /// Commits (and unlists) the schedulers of the requests waiting for `awaited`.
    fn wake(&mut self, env: &impl Envoy, awaited: &Awaited) {
        self.streams.retain(|(_, waits_for, scheduler)| {
            if waits_for != awaited {
                return true;
            }
            // A listed scheduler is alive: its stream deletes it only after unlisting it under the lock that
            // guards this list.
            env.scheduler_commit(scheduler.0, 1);
            false
        });
    }
}

/// Parks a stream: its scheduler is committed (under this lock) when what it waits for comes (or fails).
pub fn park(parked: &Mutex<Parked>, stream_id: u32, scheduler: SchedulerPtr, awaited: Awaited) {
    if let Ok(mut p) = parked.lock() {
        match &awaited {
            Awaited::Keys(provider) => p.refetch.push(*provider),
            Awaited::Token(tenant) => p.tokens.push(tenant.clone()),
        }
        p.streams.push((stream_id, awaited, SendPtr(scheduler)));
    }
}

/// Asks the main thread for a new upstream token of `tenant` (a renewal: no request waits).
pub fn want_token(parked: &Mutex<Parked>, tenant: &str) {
    if let Ok(mut p) = parked.lock() {
        p.tokens.push(tenant.to_string());
    }
}

/// Takes a stream off the list (before its scheduler is deleted: the main thread commits only listed ones).
pub fn unpark(parked: &Mutex<Parked>, stream_id: u32) {
    if let Ok(mut p) = parked.lock() {
        p.streams.retain(|(id, _, _)| *id != stream_id);
    }
}

/// What the main thread's events reach besides the upkeep itself.
pub struct Main<'a, E> {
    pub env: &'a E,
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
pub struct Upkeep<E: Envoy> {
    env: E,
    router: Router,
    calls: HashMap<u64, FetchTarget>,
    scheduler: SendPtr,
    stop: Arc<AtomicBool>,
    ticker: Option<JoinHandle<()>>,
}

impl<E: Envoy> Upkeep<E> {
    /// Starts the ticker for `envoy_config`'s config-level scheduler (call in `config_new`, on the main
    /// thread, with the config being created).
    /// Refused (why) if Envoy gives no scheduler or the ticker thread cannot start: the background work
    /// would never run.
    pub fn start(env: &E, router: Router, envoy_config: ConfigEnvoyPtr) -> Result<Self, String> {
        let scheduler = env.config_scheduler_new(envoy_config);
        if scheduler.is_null() {
            return Err("Envoy gave no config scheduler".into());
        }
        let stop = Arc::new(AtomicBool::new(false));
        match env.start_ticker(scheduler, TICK_MS, Arc::clone(&stop)) {
            Ok(ticker) => Ok(Self {
                env: env.clone(),
                router,
                calls: HashMap::new(),
                scheduler: SendPtr(scheduler),
                stop,
                ticker: Some(ticker),
            }),
            Err(e) => {
                env.config_scheduler_delete(scheduler);
                Err(format!("the ticker thread could not start ({e})"))
            }
        }
    }

    /// A tick on the main thread: hands the configured tenants' counts to Envoy, refetches the parked
    /// requests asked for, then the fetches that are due.
    pub fn tick(&mut self, main: &Main<'_, E>) {
        let now = now_ms();
        let envoy_config = main.envoy_config.0;
        hand_over(main.env, envoy_config, main.metrics, main.tenant_counts, |tenant, allowed| {
            if allowed {
                Metric::TenantAllowed(tenant)
            } else {
                Metric::TenantForbidden(tenant)
            }
        });
        hand_over(main.env, envoy_config, main.metrics, main.quota_counts, |tenant, allowed| {
            Metric::TenantQuota(tenant, allowed)
        });
        let (wanted, mut tokens) = main
            .parked
            .lock()
            .map(|mut p| (std::mem::take(&mut p.refetch), std::mem::take(&mut p.tokens)))
            .unwrap_or_default();
        for provider in wanted {
            self.router.refetch_keys(provider, now);
        }
        tokens.sort_unstable();
        tokens.dedup();
        for tenant in tokens {
            // Answered at once (no fetch to wait for), or by the fetch the tick below sends (or one under way).
            if let Some(answer) = self.router.want_token(&tenant, now) {
                token_answered(main, answer);
            }
        }
        let mut sink = MainSink { env: main.env, envoy_config, metrics: main.metrics, fetches: Vec::new() };
        self.router.on_tick(now, 0, &mut sink);
        // A token fetch Envoy never answered (it answers every callout, with a failure at its timeout).
        let (_, lost) = self.router.lost_token_fetches(now, &mut sink);
        for answer in lost {
            token_answered(main, answer);
        }
        for fetch in std::mem::take(&mut sink.fetches) {
            let headers: Vec<(&str, &str)> = fetch.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            match main.env.config_http_callout(envoy_config, &fetch.cluster, &headers, &fetch.body, fetch.timeout_ms) {
                Ok(id) => {
                    self.calls.insert(id, fetch.target);
                }
                Err(status) => {
                    let why = format!("could not be sent through cluster {} (callout status {status})", fetch.cluster);
                    self.answer(main, fetch.target, FetchResult::NotSent(&why), Vec::new());
                }
            }
        }
    }

    /// A callout's answer (`status`: its `:status`, `None` when it failed).
    pub fn called_back(&mut self, main: &Main<'_, E>, id: u64, status: Option<&str>, body: Vec<u8>) {
        let Some(target) = self.calls.remove(&id) else { return };
        let result = FetchResult::Answer { status, body_size: body.len() };
        self.answer(main, target, result, body);
    }

    /// Applies what the core says of a fetch's end: an installed answer goes to the workers; the requests
    /// parked for that provider's keys (on any worker) are decided again.
    fn answer(&mut self, main: &Main<'_, E>, target: FetchTarget, result: FetchResult<'_>, body: Vec<u8>) {
        let env = crate::config::process_lookup;
        let mut sink =
            MainSink { env: main.env, envoy_config: main.envoy_config.0, metrics: main.metrics, fetches: Vec::new() };
        let fetched = self.router.on_fetch_result(target, result, now_ms(), &mut || body.clone(), &env, &mut sink);
        if let Some(answer) = fetched.token {
            token_answered(main, answer);
            return;
        }
        if fetched.installed {
            main.published.publish_body(target, body);
        }
        let Some(provider) = fetched.waiting_for else { return };
        if let Ok(mut p) = main.parked.lock() {
            p.wake(main.env, &Awaited::Keys(provider));
        }
    }
}

/// A tenant's token fetch ended (or was not sent): the workers install the news, and the requests parked
/// for that tenant's token are decided again.
fn token_answered<E: Envoy>(main: &Main<'_, E>, answer: TokenAnswer) {
    let awaited = Awaited::Token(answer.tenant.clone());
    main.published.publish_token(answer);
    if let Ok(mut p) = main.parked.lock() {
        p.wake(main.env, &awaited);
    }
}

impl<E: Envoy> Drop for Upkeep<E> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(ticker) = self.ticker.take() {
            ticker.thread().unpark();
            let _ = ticker.join();
        }
        // The ticker, the only other user, has ended; Envoy's config is still alive (we are in config_destroy).
        self.env.config_scheduler_delete(self.scheduler.0);
    }
}

/// Hands the per-tenant counts kept by the workers since the last tick to Envoy (see `counts`): one labelled
/// increment per tenant and counter that moved, `metric` naming it. Main thread only.
fn hand_over(
    env: &impl Envoy,
    envoy_config: ConfigEnvoyPtr,
    metrics: &MetricIds,
    counts: &TenantCounts,
    metric: fn(&str, bool) -> Metric<'_>,
) {
    counts.drain(|tenant, allowed, n| {
        if let Some((id, Some(label))) = metrics.counter(metric(tenant, allowed)) {
            env.config_increment_counter(envoy_config, id, Some(label), n);
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
struct MainSink<'a, E> {
    env: &'a E,
    envoy_config: ConfigEnvoyPtr,
    metrics: &'a MetricIds,
    fetches: Vec<OwnedFetch>,
}

impl<E: Envoy> Effects for MainSink<'_, E> {
    fn push(&mut self, effect: Effect<'_>) {
        match effect {
            Effect::Log(level, line) => self.env.log(level, line),
            // Fetch outcomes, and a tenant's upstream token fetches (labelled by tenant).
            Effect::Count(metric) => {
                if let Some((id, label)) = self.metrics.counter(metric) {
                    self.env.config_increment_counter(self.envoy_config, id, label, 1);
                }
            }
            Effect::Gauge(gauge, value) => {
                if let Some(id) = self.metrics.gauge(gauge) {
                    self.env.config_set_gauge(self.envoy_config, id, value);
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
