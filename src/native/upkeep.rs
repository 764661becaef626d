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

use crate::audit_sink::{Sink, MAX_RESPONSE_BYTES};
use crate::effect::{Effect, Effects, FetchTarget, Level, Metric};
use crate::router::Router;
use crate::upkeep::{FetchResult, TICK_MS};
use crate::upstream_auth::TokenAnswer;

use super::abi::{ConfigEnvoyPtr, SchedulerPtr};
use super::counts::{TenantCounts, UnlabelledCounts};
use super::envoy::Envoy;
use super::host::{now_ms, MetricIds};
use super::inbox::Inbox;
use super::relay::ConfigStats;

use super::published::{answer_wishes, lock_parked, token_answered as hand_on};
pub use super::published::{Awaited, Parked, Published, Quiet, SendPtr};

/// The event id of a config-level scheduler commit for a worker's token wish (the ticker's are 0).
const WISH_EVENT: u64 = 1;

/// Commits a parked stream's scheduler through `env`.
fn commit_stream(env: &impl Envoy) -> impl FnMut(SendPtr) + '_ {
    // A listed scheduler is alive: its stream deletes it only after unlisting it under the lock that guards
    // the list it was taken from (this is called under that lock).
    move |scheduler: SendPtr| env.scheduler_commit(scheduler.0, 1)
}

/// Parks a stream: its scheduler is committed (under this lock) when what it waits for comes (or fails).
/// A stream waiting for a token asks for it with [`want_token`] too.
pub fn park(parked: &Mutex<Parked>, stream_id: u32, scheduler: SchedulerPtr, awaited: Awaited) {
    lock_parked(parked).park(stream_id, SendPtr(scheduler), awaited);
}

/// Asks the main thread for a new upstream token of `tenant`, this worker having the one numbered `have`
/// (see [`Router::token_wanted`]): the first such wish since the main thread last looked wakes it at once.
pub fn want_token(env: &impl Envoy, parked: &Mutex<Parked>, tenant: &str, have: u64) {
    let waker = lock_parked(parked).wish(tenant, have);
    if let Some(scheduler) = waker {
        // The config-level scheduler may be committed from any thread; it is deleted in config_destroy,
        // after every stream (each holding the config alive) is gone.
        env.config_scheduler_commit(scheduler.0, WISH_EVENT);
    }
}

/// Takes a stream off the list (before its scheduler is deleted: the main thread commits only listed ones).
pub fn unpark(parked: &Mutex<Parked>, stream_id: u32) {
    lock_parked(parked).unpark(stream_id);
}

/// What the main thread's events reach besides the upkeep itself.
pub struct Main<'a, E> {
    pub env: &'a E,
    /// Envoy's filter config (main thread only).
    pub envoy_config: SendPtr,
    pub metrics: &'a MetricIds,
    /// How the main thread's stats reach Envoy (directly, or through a worker on Envoy 1.38).
    pub stats: &'a ConfigStats,
    pub parked: &'a Mutex<Parked>,
    pub published: &'a Published,
    pub tenant_counts: &'a TenantCounts,
    /// The configured tenants' quota counts (allowed, limited).
    pub quota_counts: &'a TenantCounts,
    /// The workers' AuditEvents for the audit sink.
    pub inbox: Option<&'a Inbox>,
    /// The workers' unlabelled counts (`requests.allowed`, `cache.hits`, …).
    pub unlabelled: &'a UnlabelledCounts,
}

/// The main thread's part: its own router (schedules, the one log line and count per fetch), the callouts
/// in flight, the ticker.
pub struct Upkeep<E: Envoy> {
    env: E,
    router: Router,
    calls: HashMap<u64, FetchTarget>,
    /// The audit sink (`audit_sink`): the workers' events, batched and posted from here.
    sink: Option<Sink>,
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
                sink: router.config.audit_sink.clone().map(Sink::new),
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

    /// The config-level scheduler, for the workers' token wishes to wake the main thread ([`Parked::waking`]).
    pub fn waker(&self) -> SendPtr {
        self.scheduler
    }

    /// A tick on the main thread: hands the configured tenants' counts and the unlabelled ones to Envoy, refetches the parked
    /// requests asked for, then the fetches that are due.
    pub fn tick(&mut self, main: &Main<'_, E>) {
        let now = now_ms();
        let envoy_config = main.envoy_config.0;
        hand_over(main, main.tenant_counts, |tenant, allowed| {
            if allowed {
                Metric::TenantAllowed(tenant)
            } else {
                Metric::TenantForbidden(tenant)
            }
        });
        hand_over(main, main.quota_counts, |tenant, allowed| Metric::TenantQuota(tenant, allowed));
        main.unlabelled.drain(|slot, n| {
            if let Some(id) = main.metrics.unlabelled(slot) {
                main.stats.count(main.env, envoy_config, id, None, n);
            }
        });
        let ((wanted, tokens), recovered) = {
            let mut parked = lock_parked(main.parked);
            (parked.take(), u64::from(parked.take_recovered()))
        };
        // A lock of the parked list or of the published answers that a panic poisoned was recovered (on any
        // thread): said here, loudly, once per recovery.
        let recovered = recovered.saturating_add(main.published.take_recovered());
        if recovered > 0 {
            main.env.log(
                Level::Error,
                &format!(
                    "fhir_tenant_router: a panic poisoned the lock of the parked requests or of the published \
                     answers; it was recovered ({recovered} since the last tick) and the work goes on"
                ),
            );
            if let Some(id) = main.metrics.upkeep_recovered {
                main.stats.count(main.env, envoy_config, id, None, recovered);
            }
        }
        for provider in wanted {
            self.router.refetch_keys(provider, now);
        }
        // Answered at once (a token fetched since, or no fetch to wait for), or by the fetch the tick below
        // sends (or one under way).
        answer_wishes(&mut self.router, tokens, now, main.published, main.parked, &mut commit_stream(main.env));
        let mut sink =
            MainSink { env: main.env, envoy_config, metrics: main.metrics, stats: main.stats, fetches: Vec::new() };
        self.router.on_tick(now, 0, &mut sink);
        // A token fetch Envoy never answered (it answers every callout, with a failure at its timeout).
        let (_, lost) = self.router.lost_token_fetches(now, &mut sink);
        for answer in lost {
            token_answered(main, answer);
        }
        // The workers' AuditEvents into the sink, and its batches that are due.
        if let (Some(audit), Some(inbox)) = (self.sink.as_mut(), main.inbox) {
            inbox.drain(|q| audit.accept(q.tenant.as_deref(), q.event, q.time_ms));
            inbox.release(audit.on_tick(now, &mut sink).0);
        }
        let fetches = std::mem::take(&mut sink.fetches);
        self.send(main, fetches);
    }

    /// An audit batch's answer (`status` `None`: none came, or it was not sent): the room of the events it
    /// ended goes back to the workers; a next batch it starts is sent.
    fn sink_answer(&mut self, main: &Main<'_, E>, batch: u32, status: Option<&str>, body: &[u8]) {
        let Some(audit) = self.sink.as_mut() else { return };
        let mut sink = MainSink {
            env: main.env,
            envoy_config: main.envoy_config.0,
            metrics: main.metrics,
            stats: main.stats,
            fetches: Vec::new(),
        };
        let body = if body.len() <= MAX_RESPONSE_BYTES { body } else { &[] };
        let released = audit.on_result(batch, status, body, now_ms(), &mut sink);
        if let Some(inbox) = main.inbox {
            inbox.release(released.0);
        }
        let fetches = std::mem::take(&mut sink.fetches);
        self.send(main, fetches);
    }

    /// Sends the fetches the core asked for (on a tick, or after a fetch's answer: a discovery document's
    /// sends the key set's). One that cannot be sent ends at once, as failed.
    fn send(&mut self, main: &Main<'_, E>, fetches: Vec<OwnedFetch>) {
        for fetch in fetches {
            let headers: Vec<(&str, &str)> = fetch.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            let sent = main.env.config_http_callout(
                main.envoy_config.0,
                &fetch.cluster,
                &headers,
                &fetch.body,
                fetch.timeout_ms,
            );
            match sent {
                Ok(id) => {
                    self.calls.insert(id, fetch.target);
                }
                Err(_) if matches!(fetch.target, FetchTarget::AuditSink(_)) => {
                    if let FetchTarget::AuditSink(batch) = fetch.target {
                        self.sink_answer(main, batch, None, &[]);
                    }
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
        if let FetchTarget::AuditSink(batch) = target {
            return self.sink_answer(main, batch, status, &body);
        }
        let result = FetchResult::Answer { status, body_size: body.len() };
        self.answer(main, target, result, body);
    }

    /// Applies what the core says of a fetch's end: the fetches it starts are sent, an installed answer goes
    /// to the workers; the requests parked for that provider's keys (on any worker) are decided again.
    fn answer(&mut self, main: &Main<'_, E>, target: FetchTarget, result: FetchResult<'_>, body: Vec<u8>) {
        let env = crate::config::process_lookup;
        let mut sink = MainSink {
            env: main.env,
            envoy_config: main.envoy_config.0,
            metrics: main.metrics,
            stats: main.stats,
            fetches: Vec::new(),
        };
        let fetched = self.router.on_fetch_result(target, result, now_ms(), &mut || body.clone(), &env, &mut sink);
        // The fetches the answer starts (a discovery document's key-set fetch).
        let fetches = std::mem::take(&mut sink.fetches);
        self.send(main, fetches);
        if let Some(answer) = fetched.token {
            token_answered(main, answer);
            return;
        }
        if fetched.installed {
            main.published.publish_installed(&self.router, target);
        }
        let Some(provider) = fetched.waiting_for else { return };
        lock_parked(main.parked).wake(&Awaited::Keys(provider), commit_stream(main.env));
    }
}

/// A tenant's token fetch ended (or was not sent): the workers install the news, and the requests parked
/// for that tenant's token are decided again.
fn token_answered<E: Envoy>(main: &Main<'_, E>, answer: TokenAnswer) {
    hand_on(main.published, main.parked, answer, &mut commit_stream(main.env));
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
fn hand_over<E: Envoy>(main: &Main<'_, E>, counts: &TenantCounts, metric: fn(&str, bool) -> Metric<'_>) {
    counts.drain(|tenant, allowed, n| {
        if let Some((id, Some(label))) = main.metrics.counter(metric(tenant, allowed)) {
            main.stats.count(main.env, main.envoy_config.0, id, Some(label), n);
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
    stats: &'a ConfigStats,
    fetches: Vec<OwnedFetch>,
}

impl<E: Envoy> Effects for MainSink<'_, E> {
    fn push(&mut self, effect: Effect<'_>) {
        match effect {
            Effect::Log(level, line) => self.env.log(level, line),
            // Fetch outcomes, and a tenant's upstream token fetches (labelled by tenant).
            Effect::Count(metric) => {
                if let Some((id, label)) = self.metrics.counter(metric) {
                    self.stats.count(self.env, self.envoy_config, id, label, 1);
                }
            }
            Effect::Gauge(gauge, value) => {
                if let Some(id) = self.metrics.gauge(gauge) {
                    self.stats.gauge(self.env, self.envoy_config, id, value);
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
