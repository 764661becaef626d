//! The hooks Envoy calls (`envoy_dynamic_module_on_*`): each reads its inputs through the ABI, hands them to
//! the core with the stream's state, and applies the effects. Every hook runs inside [`guard`]: a panic is
//! caught, counted, and answered with a 503 `OperationOutcome` for that request, never unwound into Envoy.
//!
//! Threads: the filter config is built on Envoy's main thread and shared by every worker. Each worker has
//! its own [`Router`] (token cache included) in the config's slot for that worker, touched by that worker
//! only: the hot path takes no lock.
//!
//! Memory safety against Envoy's rules (each exercised by a fake-Envoy test in `super::tests`):
//! - What the core reads of the request headers is copied out of Envoy's header map into the worker's
//!   reusable buffer ([`HeaderCopy`]) before any effect is applied: a setter or remover invalidates what a
//!   getter handed out, and the core keeps reading the request after changing headers.
//! - Envoy re-enters a stream's hooks from a local reply and from `continue_decoding` (the stream completes
//!   inside the call), and may answer a callout inline. So those three effects are deferred ([`Deferred`])
//!   and made only once the core has returned and no borrow of the worker or the stream is held. The
//!   worker's and the stream's state sit in `RefCell`s: a hook reaches them only through a checked borrow,
//!   never by a second `&mut`. A stream-complete hook entered while a hook of the same stream is on the
//!   stack (counted in [`StreamObject::depth`], a `Cell`) only marks the completion, which the outermost
//!   hook does when it ends.
//! - Envoy <= 1.39 calls the destroy hook right after such an inline completion, still inside the call
//!   (`DynamicModuleHttpFilter::onDestroy` before envoy PR #46548). A destroy with a hook of the stream on
//!   the stack only takes the stream off its queue and marks it ([`StreamObject::destroyed`]); no call is
//!   made to Envoy for the stream after that, and [`on_stream`] frees the object once the outermost hook
//!   has returned, when no reference to it is left.

// The hooks' safety contract is the ABI's, stated once above the hooks rather than on each of them.
#![allow(clippy::missing_safety_doc)]

use std::cell::{Cell, RefCell, RefMut};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::config::Config;
use crate::effect::{CounterSlot, Effect, Effects, Flow, Gauge, Level, Metric, TokenEvent};
use crate::router::{Router, Stream};

use super::abi::*;
use super::counts::{TenantCounts, UnlabelledCounts};
use super::crypto::Ring;
use super::envoy::Envoy;
use super::host::{now_ms, MetricIds};
use super::inbox::{Inbox, Offered};
use super::relay::ConfigStats;
use super::upkeep::{park, unpark, want_token, Awaited, Main, Parked, Published, Quiet, SendPtr, Upkeep};

/// Most worker slots a config keeps (Envoy's `--concurrency`); a worker beyond them gets 503s.
const MAX_WORKERS: usize = 256;

/// One worker's router, and the generation of published fetch answers it has installed.
struct Worker {
    router: Router,
    seen: u64,
    /// This worker's share of the `cache.entries` gauge last added to it: the gauge is the sum over workers.
    cache_entries: u64,
}

/// One worker's state, touched only by that worker's thread, reached through a checked borrow.
struct Slot(RefCell<Option<Worker>>);

// SAFETY: slot `i` is only ever accessed on Envoy worker `i` (ABI: every hook of a stream runs on its
// worker's thread, and a stream uses the slot of the worker that created it), so its `RefCell` is never
// touched by two threads; it is dropped with the config on the main thread after every stream (each holding
// the config alive) is gone.
unsafe impl Sync for Slot {}
unsafe impl Send for Slot {}

/// The module's filter config: shared by every worker.
pub struct FilterConfig<E: Envoy> {
    config: Config,
    metrics: MetricIds,
    /// How the main thread's stats reach Envoy: directly, or (Envoy 1.38) through the workers' requests.
    stats: ConfigStats,
    slots: Vec<Slot>,
    /// The main thread's part: fetching (with a remote JWKS or a registry) and handing the configured
    /// tenants' counts to Envoy; `None` only without either.
    upkeep: Option<Mutex<Upkeep<E>>>,
    tenant_counts: TenantCounts,
    /// The configured tenants' quota counts (allowed, limited), handed to Envoy on the main thread's tick.
    quota_counts: TenantCounts,
    /// The unlabelled counters' counts, handed to Envoy on the main thread's tick.
    unlabelled: UnlabelledCounts,
    /// Whether the workers keep the unlabelled counts for the tick: the main thread ticks and publishes
    /// them itself (not on Envoy 1.38, and not without a tick: there they go to Envoy with each request).
    batch_unlabelled: bool,
    published: Published,
    parked: Mutex<Parked>,
    /// The workers' AuditEvents for the main thread's audit sink (`audit_sink`).
    audit_inbox: Option<Inbox>,
}

// What every worker reads or locks at the same time must be `Send + Sync`: checked here by the compiler,
// since the config reaches the workers through Envoy's raw pointer, which the compiler cannot follow. Not
// in this list: the worker slots (each touched by its own worker only: see `Slot`) and the upkeep (locked on
// the main thread only); their routers hold the process quota store, itself asserted below, behind the
// core's `Box<dyn QuotaStore>` (the proxy-wasm shell's stores are single-threaded, so that box is not `Send`).
const _: () = {
    const fn shared_across_workers<T: Send + Sync + ?Sized>() {}
    shared_across_workers::<Config>();
    shared_across_workers::<MetricIds>();
    shared_across_workers::<ConfigStats>();
    shared_across_workers::<TenantCounts>();
    shared_across_workers::<UnlabelledCounts>();
    shared_across_workers::<Published>();
    shared_across_workers::<Mutex<Parked>>();
    shared_across_workers::<Inbox>();
    shared_across_workers::<crate::quota::ProcessStore>();
};

impl<E: Envoy> FilterConfig<E> {
    /// The sink for one hook's effects on stream `filter`; the re-entrant ones go into `deferred`.
    fn apply<'a>(&'a self, env: &'a E, filter: FilterEnvoyPtr, deferred: &'a mut Deferred) -> Apply<'a, E> {
        Apply {
            env,
            filter,
            metrics: &self.metrics,
            tenant_counts: &self.tenant_counts,
            quota_counts: &self.quota_counts,
            batch_tenants: self.stats.direct(),
            unlabelled: self.batch_unlabelled.then_some(&self.unlabelled),
            deferred,
            inbox: self.audit_inbox.as_ref(),
        }
    }

    fn main<'a>(&'a self, env: &'a E, envoy_config: ConfigEnvoyPtr) -> Main<'a, E> {
        Main {
            env,
            envoy_config: SendPtr(envoy_config),
            metrics: &self.metrics,
            stats: &self.stats,
            parked: &self.parked,
            published: &self.published,
            tenant_counts: &self.tenant_counts,
            quota_counts: &self.quota_counts,
            inbox: self.audit_inbox.as_ref(),
            unlabelled: &self.unlabelled,
        }
    }

    /// The upkeep, its lock recovered if a panic poisoned it: said loudly (an error line and the
    /// `upkeep.recovered` counter, once per panic), and the background work goes on. Main thread only.
    fn upkeep(&self, env: &E, envoy_config: ConfigEnvoyPtr) -> Option<MutexGuard<'_, Upkeep<E>>> {
        let upkeep = self.upkeep.as_ref()?;
        Some(upkeep.lock().unwrap_or_else(|poisoned| {
            upkeep.clear_poison();
            env.log(
                Level::Error,
                "fhir_tenant_router: a panic interrupted the background work (key sets, registry, tokens, counts); \
                 its lock was recovered and the work goes on",
            );
            if let Some(id) = self.metrics.upkeep_recovered {
                self.stats.count(env, envoy_config, id, None, 1);
            }
            poisoned.into_inner()
        }))
    }
}

/// One stream's object (what `module` points to). Only shared references to it are ever made while it
/// lives: hooks of the same stream may be on the stack at once (Envoy re-enters them).
pub struct StreamObject<E: Envoy> {
    config: *const FilterConfig<E>,
    slot: usize,
    /// How many of this stream's hooks are on the stack.
    depth: Cell<u32>,
    /// The stream completed while one of its hooks was on the stack: the outermost hook completes it.
    complete_pending: Cell<bool>,
    /// Envoy destroyed the stream while one of its hooks was on the stack (Envoy <= 1.39, right after
    /// completing it inside a local reply or a continue): nothing calls Envoy for the stream any more, and
    /// [`on_stream`] frees the object once the outermost hook returns.
    destroyed: Cell<bool>,
    state: RefCell<StreamState>,
}

/// A stream's mutable state.
struct StreamState {
    stream: Stream,
    signatures: Ring,
    /// Once parked (for a key set or an upstream token): the scheduler the main thread commits to wake it.
    scheduler: Option<SchedulerPtr>,
}

/// The effects Envoy may answer by re-entering this stream's hooks (a local reply and a continue end the
/// stream inside the call; a callout may fail inline): kept (in the worker's reusable buffers) until the
/// core has returned and no borrow of worker or stream state is held, then made by [`Deferred::apply`].
#[derive(Default)]
struct Deferred {
    reply: Option<u32>,
    /// The reply's header names and values, end to end, and where each ends.
    reply_text: String,
    reply_headers: Vec<(usize, usize)>,
    reply_body: Vec<u8>,
    resume: bool,
    /// Requests to send again after a 401 (rare: owned copies).
    resends: Vec<OwnedResend>,
}

/// A request to send again after a 401, kept until it can be sent.
struct OwnedResend {
    cluster: String,
    headers: Vec<(String, String)>,
    timeout_ms: u64,
}

/// Most headers a local reply carries (the core's carry at most four).
const REPLY_HEADERS: usize = 8;

impl Deferred {
    fn reply(&mut self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        self.reply = Some(status);
        self.reply_text.clear();
        self.reply_headers.clear();
        for (name, value) in headers.iter().take(REPLY_HEADERS) {
            self.reply_text.push_str(name);
            let name_end = self.reply_text.len();
            self.reply_text.push_str(value);
            self.reply_headers.push((name_end, self.reply_text.len()));
        }
        self.reply_body.clear();
        self.reply_body.extend_from_slice(body);
    }

    /// Makes the deferred calls (callouts, then the reply, then the continue); why a request to send again
    /// could not be sent, if one could not.
    /// Once Envoy destroyed the stream (`destroyed`, inside one of these calls), the rest is dropped.
    fn apply(&mut self, env: &impl Envoy, filter: FilterEnvoyPtr, destroyed: &Cell<bool>) -> Option<String> {
        let mut failed = None;
        for OwnedResend { cluster, headers, timeout_ms } in std::mem::take(&mut self.resends) {
            if destroyed.get() {
                break;
            }
            let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            // A request sent again after a 401, from its own stream: answered in `http_callout_done`.
            if let Err(status) = env.http_callout(filter, &cluster, &pairs, &[], timeout_ms) {
                failed = Some(format!("could not be sent through cluster {cluster} (callout status {status})"));
            }
        }
        if let Some(status) = self.reply.take().filter(|_| !destroyed.get()) {
            let mut headers = [("", ""); REPLY_HEADERS];
            let mut start = 0;
            for (slot, &(name_end, end)) in headers.iter_mut().zip(&self.reply_headers) {
                let text = &self.reply_text;
                *slot = (text.get(start..name_end).unwrap_or_default(), text.get(name_end..end).unwrap_or_default());
                start = end;
            }
            let n = self.reply_headers.len().min(REPLY_HEADERS);
            env.send_response(filter, status, headers.get(..n).unwrap_or_default(), &self.reply_body);
        }
        if std::mem::take(&mut self.resume) && !destroyed.get() {
            env.continue_decoding(filter);
        }
        failed
    }
}

/// A copy of the request headers, taken before any effect is applied (the core reads it afterwards):
/// reusable, so a worker allocates nothing for it once warm.
#[derive(Default)]
struct HeaderCopy {
    bytes: Vec<u8>,
    /// Per header: where its name ends and its value starts, and where its value ends.
    spans: Vec<(usize, usize)>,
}

impl HeaderCopy {
    fn fill(&mut self, views: &[EnvoyHeader]) {
        self.bytes.clear();
        self.spans.clear();
        for h in views.iter().filter(|h| !h.key_ptr.is_null()) {
            // SAFETY: ABI: a header getter's bytes are valid during the hook until that map changes; they are
            // copied here, right after the getter, before anything else calls Envoy
            // (`a_base_path_tenants_audit_line_names_the_requests_own_interaction_and_type`).
            unsafe {
                self.bytes.extend_from_slice(std::slice::from_raw_parts(h.key_ptr, h.key_length));
                let name_end = self.bytes.len();
                if !h.value_ptr.is_null() {
                    self.bytes.extend_from_slice(std::slice::from_raw_parts(h.value_ptr, h.value_length));
                }
                self.spans.push((name_end, self.bytes.len()));
            }
        }
    }

    fn pairs(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut start = 0;
        self.spans.iter().map(move |&(name_end, end)| {
            let pair = (
                self.bytes.get(start..name_end).unwrap_or_default(),
                self.bytes.get(name_end..end).unwrap_or_default(),
            );
            start = end;
            pair
        })
    }
}

/// A worker's reusable buffers for one hook (taken from the thread during the hook, put back after).
struct Scratch {
    views: Vec<EnvoyHeader>,
    headers: HeaderCopy,
    deferred: Deferred,
}

impl Scratch {
    /// No buffers yet (a constant: the thread-local starts from it without a lazy initialisation).
    const EMPTY: Scratch = Scratch {
        views: Vec::new(),
        headers: HeaderCopy { bytes: Vec::new(), spans: Vec::new() },
        deferred: Deferred {
            reply: None,
            reply_text: String::new(),
            reply_headers: Vec::new(),
            reply_body: Vec::new(),
            resume: false,
            resends: Vec::new(),
        },
    };
}

/// Applies the core's effects to one stream through the ABI: at once, but for the re-entrant ones
/// (deferred).
struct Apply<'a, E> {
    env: &'a E,
    filter: FilterEnvoyPtr,
    metrics: &'a MetricIds,
    tenant_counts: &'a TenantCounts,
    quota_counts: &'a TenantCounts,
    /// The configured tenants' counts wait for the main thread's tick (not on Envoy 1.38, whose main thread
    /// cannot publish them: there they go to Envoy at once, as a registry tenant's do).
    batch_tenants: bool,
    /// Where the unlabelled counts wait for the tick (`None`: they go to Envoy at once).
    unlabelled: Option<&'a UnlabelledCounts>,
    deferred: &'a mut Deferred,
    /// Where a request's AuditEvent goes for the main thread's audit sink.
    inbox: Option<&'a Inbox>,
}

fn count(env: &impl Envoy, filter: FilterEnvoyPtr, counter: Option<(usize, Option<&str>)>) {
    let Some((id, label)) = counter else { return };
    env.increment_counter(filter, id, label, 1);
}

/// A body as one buffer: what the filter buffered so far, then the frame of this hook (`body_types`:
/// those two, for the request or the response).
fn read_body(env: &impl Envoy, filter: FilterEnvoyPtr, body_types: [u32; 2]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunks = Vec::new();
    for body_type in body_types {
        env.body_chunks(filter, body_type, &mut chunks);
        for c in chunks.iter().filter(|c| !c.ptr.is_null()) {
            // SAFETY: ABI: a body chunk's bytes are valid during the hook until the body changes; they are
            // copied here before anything else is called.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(c.ptr, c.length) });
        }
    }
    out
}

/// Replaces the response body (buffered, plus this hook's frame) with `body`.
fn replace_response_body(env: &impl Envoy, filter: FilterEnvoyPtr, body: &[u8]) {
    let buffered = env.body_size(filter, BUFFERED_RESPONSE_BODY);
    let received = env.body_size(filter, RECEIVED_RESPONSE_BODY);
    env.drain_body(filter, RECEIVED_RESPONSE_BODY, received);
    let target = if buffered > 0 {
        env.drain_body(filter, BUFFERED_RESPONSE_BODY, buffered);
        BUFFERED_RESPONSE_BODY
    } else {
        RECEIVED_RESPONSE_BODY
    };
    env.append_body(filter, target, body);
}

fn response_header(env: &impl Envoy, filter: FilterEnvoyPtr, name: &str) -> Option<String> {
    let value = env.header(filter, RESPONSE_HEADER, name)?;
    // SAFETY: ABI: a getter's bytes are valid during the hook until that map changes; copied at once
    // (`a_response_header_read_after_a_response_edit_is_read_afresh`).
    Some(String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(value.ptr, value.length) }).into_owned())
}

impl<E: Envoy> Effects for Apply<'_, E> {
    fn push(&mut self, effect: Effect<'_>) {
        let filter = self.filter;
        let env = self.env;
        match effect {
            Effect::SetRequestHeader(name, value) => env.set_header(filter, REQUEST_HEADER, name, Some(value)),
            Effect::RemoveRequestHeader(name) => env.set_header(filter, REQUEST_HEADER, name, None),
            Effect::ClearRouteCache => env.clear_route_cache(filter),
            // Envoy completes the stream inside a local reply: made once the core has returned.
            Effect::Reply(reply) => self.deferred.reply(reply.status, reply.headers, reply.body),
            Effect::FilterState(key, value) => env.set_filter_state(filter, key, value),
            // One call where Envoy has the batch setter (1.39 and later), one per entry on 1.38.
            Effect::DynamicMetadata(namespace, entries) if env.dynamic_metadata_batch() => {
                env.set_dynamic_metadata(filter, namespace, entries)
            }
            Effect::DynamicMetadata(namespace, entries) => {
                for (key, value) in entries {
                    env.set_dynamic_metadata_entry(filter, namespace, key, value);
                }
            }
            Effect::SpanTags(tags) => env.span_tags(filter, tags),
            // A worker's token request is the main thread's to send and count (see `upkeep`).
            Effect::Count(Metric::UpstreamToken(_, TokenEvent::Fetch)) => {}
            Effect::Count(metric) => {
                // A configured tenant's count goes to Envoy with the main thread's next tick (see `counts`).
                match metric.slot() {
                    CounterSlot::Tenant { tenant, allowed }
                        if self.batch_tenants && self.tenant_counts.add(tenant, allowed) =>
                    {
                        return
                    }
                    CounterSlot::TenantQuota { tenant, allowed }
                        if self.batch_tenants && self.quota_counts.add(tenant, allowed) =>
                    {
                        return
                    }
                    // An unlabelled one (`requests.allowed`, `cache.hits`, a refusal's reason) too.
                    slot if self.unlabelled.is_some_and(|counts| counts.add(slot)) => return,
                    _ => {}
                }
                count(env, filter, self.metrics.counter(metric))
            }
            Effect::Gauge(gauge, value) => {
                if let Some(id) = self.metrics.gauge(gauge) {
                    env.set_gauge(filter, id, value);
                }
            }
            Effect::Log(level, line) => env.log(level, line),
            Effect::SetResponseHeader(name, value) => env.set_header(filter, RESPONSE_HEADER, name, Some(value)),
            Effect::RemoveResponseHeader(name) => env.set_header(filter, RESPONSE_HEADER, name, None),
            Effect::ReplaceResponseBody(body) => replace_response_body(env, filter, body),
            // Envoy may complete the stream inside a continue: made once the core has returned.
            Effect::ResumeRequest => self.deferred.resume = true,
            // Into the bounded inbox: one atomic update and a free shard's lock, never a wait.
            Effect::SinkEvent { tenant, event, time_ms } => {
                if let Some(Offered::Counted(metric)) = self.inbox.map(|i| i.offer(tenant, event, time_ms)) {
                    count(env, filter, self.metrics.counter(metric));
                }
            }
            // Fetches are the main thread's (see `upkeep`): a worker asks it for a tenant's token instead
            // (see `token_followup`).
            Effect::Fetch(_) => {}
            Effect::Resend(resend) => self.deferred.resends.push(OwnedResend {
                cluster: resend.cluster.to_string(),
                headers: resend.headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
                timeout_ms: resend.timeout_ms,
            }),
        }
    }
}

/// Copies of the stream's request headers as they are now (after this hook's edits).
fn request_header_copies(env: &impl Envoy, filter: FilterEnvoyPtr) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut views = Vec::new();
    env.headers(filter, REQUEST_HEADER, &mut views);
    let mut copy = HeaderCopy::default();
    copy.fill(&views);
    copy.pairs().map(|(n, v)| (n.to_vec(), v.to_vec())).collect()
}

/// After an event of a stream whose tenant has `upstream_auth`: keeps its request headers if it may be
/// sent again after a 401, answers it if it could not be sent again (`resend_failed`), parks it if it
/// waits for its tenant's token, and asks the main thread for a new token when one is wanted (for it, or
/// a renewal). Makes its own deferred effects before it returns.
fn token_followup<E: Envoy>(
    env: &E,
    cfg: &FilterConfig<E>,
    object: &StreamObject<E>,
    filter: FilterEnvoyPtr,
    resend_failed: Option<String>,
    deferred: &mut Deferred,
) {
    if object.destroyed.get() {
        // Envoy destroyed the stream inside the hook's reply or continue: nothing more is done for it.
        return;
    }
    {
        let (Some(mut worker), Ok(mut state)) = (worker(cfg, object.slot), object.state.try_borrow_mut()) else {
            return;
        };
        let state = &mut *state;
        if state.stream.token_slot().is_none() {
            return;
        }
        if state.stream.wants_headers() {
            let headers = request_header_copies(env, filter);
            state.stream.keep_header_pairs(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        }
        let router = &mut worker.router;
        if let Some(why) = resend_failed {
            let mut apply = cfg.apply(env, filter, deferred);
            router.on_resend_response(&mut state.stream, Err(&why), &[], &[], &mut apply);
        }
        if let Some((tenant, have)) = router.token_wanted(&state.stream, now_ms()) {
            if state.stream.waits_for_token() {
                // The scheduler is deleted in `destroy`, after it is unlisted.
                let scheduler = *state.scheduler.get_or_insert_with(|| env.scheduler_new(filter));
                park(&cfg.parked, state.stream.context_id(), scheduler, Awaited::Token(tenant.to_string()));
            }
            // After `park` in both cases: a parked request's wish is what gets its token fetched.
            want_token(env, &cfg.parked, tenant, have);
        }
    }
    // An answer to a request that could not be sent again does not send anything again.
    deferred.apply(env, filter, &object.destroyed);
}

/// The body of the 503 that answers a request whose hook panicked.
const PANIC_OUTCOME: &str = r#"{"issue":[{"code":"exception","diagnostics":"The request could not be processed; retry shortly.","severity":"error"}],"resourceType":"OperationOutcome"}"#;

/// A 503 with an `OperationOutcome` body (no config needed).
fn unavailable(env: &impl Envoy, filter: FilterEnvoyPtr, body: &[u8]) {
    env.send_response(filter, 503, &[("content-type", "application/fhir+json"), ("cache-control", "no-store")], body);
}

/// Runs a hook, catching a panic: counted, logged, and (for request-path hooks with a stream) answered
/// with a 503 `OperationOutcome`. `fallback` is what the hook returns then. For a stream's hook,
/// `destroyed` is its object's flag: once Envoy destroyed the stream, neither answer nor count goes through
/// its filter (the log line still says it).
#[allow(clippy::too_many_arguments)]
fn guard<E: Envoy, T>(
    env: &E,
    hook: &'static str,
    filter: FilterEnvoyPtr,
    config: Option<&FilterConfig<E>>,
    destroyed: Option<&Cell<bool>>,
    answer: bool,
    fallback: T,
    f: impl FnOnce() -> T,
) -> T {
    let f = || {
        #[cfg(feature = "panic-probe")]
        super::probe::fire(hook);
        f()
    };
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => value,
        Err(_) => {
            let filter = if destroyed.is_some_and(Cell::get) { std::ptr::null_mut() } else { filter };
            let answer = answer && !filter.is_null();
            let line = if answer {
                format!("fhir_tenant_router: the {hook} hook panicked; the request was answered 503")
            } else {
                format!("fhir_tenant_router: the {hook} hook panicked; caught")
            };
            env.log(Level::Error, &line);
            if let (Some(config), false) = (config, filter.is_null()) {
                count(env, filter, config.metrics.panics.map(|id| (id, None)));
            }
            // The closure has unwound: no borrow of worker or stream state is held across this reply.
            if answer {
                let _ = catch_unwind(AssertUnwindSafe(|| unavailable(env, filter, PANIC_OUTCOME.as_bytes())));
            }
            fallback
        }
    }
}

/// Runs hook `hook` of a stream inside [`guard`], counting it on the stream's stack; a completion Envoy
/// signalled meanwhile (re-entering) is done once the outermost hook of the stream ends.
fn stream_hook<E: Envoy, T>(
    env: &E,
    hook: &'static str,
    filter: FilterEnvoyPtr,
    (cfg, object): (&FilterConfig<E>, &StreamObject<E>),
    answer: bool,
    fallback: T,
    f: impl FnOnce() -> T,
) -> T {
    object.depth.set(object.depth.get().saturating_add(1));
    let out = guard(env, hook, filter, Some(cfg), Some(&object.destroyed), answer, fallback, f);
    object.depth.set(object.depth.get().saturating_sub(1));
    if object.depth.get() == 0 && object.complete_pending.replace(false) {
        // The completion Envoy signalled while this hook was on the stack, now that it is over.
        object.depth.set(1);
        guard(env, "stream_complete", filter, Some(cfg), Some(&object.destroyed), false, (), || {
            complete(env, cfg, object, filter)
        });
        object.depth.set(0);
    }
    out
}

/// The stream is over: it leaves its queues, and the worker's housekeeping runs if due.
fn complete<E: Envoy>(env: &E, cfg: &FilterConfig<E>, object: &StreamObject<E>, filter: FilterEnvoyPtr) {
    let (Some(mut worker), Ok(mut state)) = (worker(cfg, object.slot), object.state.try_borrow_mut()) else {
        return;
    };
    let worker = &mut *worker;
    worker.router.on_stream_done(&mut state.stream);
    // Envoy 1.38: what the main thread counted meanwhile (a fetch that woke this stream, say), while the
    // stream is still Envoy's to call.
    if !object.destroyed.get() {
        cfg.stats.relay(env, filter);
    }
    // Gauge calls do not re-enter the stream's hooks. Once Envoy destroyed the stream, its filter is no longer
    // Envoy's to call: the worker's next report carries the change.
    let mut gauges = WorkerGauges {
        env,
        filter,
        metrics: &cfg.metrics,
        cache_entries: &mut worker.cache_entries,
        destroyed: object.destroyed.get(),
    };
    worker.router.housekeep_if_due(now_ms(), &mut gauges);
}

/// A worker's housekeeping effects: its cache size goes into the process-wide `cache.entries` gauge as the
/// change since its last report (each worker has its own cache; a plain set would keep only the last one's).
struct WorkerGauges<'a, E> {
    env: &'a E,
    filter: FilterEnvoyPtr,
    metrics: &'a MetricIds,
    cache_entries: &'a mut u64,
    /// The stream's filter was destroyed: no gauge call (the next report carries the change).
    destroyed: bool,
}

impl<E: Envoy> Effects for WorkerGauges<'_, E> {
    fn push(&mut self, effect: Effect<'_>) {
        match effect {
            Effect::Gauge(Gauge::CacheEntries, now) => {
                let Some(id) = self.metrics.gauge(Gauge::CacheEntries).filter(|_| !self.destroyed) else { return };
                let before = std::mem::replace(self.cache_entries, now);
                if now > before {
                    self.env.increment_gauge(self.filter, id, now - before);
                } else if now < before {
                    self.env.decrement_gauge(self.filter, id, before - now);
                }
            }
            Effect::Log(level, line) => self.env.log(level, line),
            _ => {}
        }
    }
}

/// Applies only the log lines of a series of effects.
struct LogsOnly<'a, E>(&'a E);

impl<E: Envoy> Effects for LogsOnly<'_, E> {
    fn push(&mut self, effect: Effect<'_>) {
        if let Effect::Log(level, line) = effect {
            self.0.log(level, line);
        }
    }
}

thread_local! {
    /// A worker's reusable buffers (taken during a hook, put back after; a hook that finds them taken,
    /// re-entered, starts from empty ones). Borrowed only inside the helpers below, never across a call to
    /// Envoy or the core.
    static SCRATCH: RefCell<Scratch> = const { RefCell::new(Scratch::EMPTY) };
}

/// Takes the worker's buffers for a hook (empty ones for a hook that finds them taken).
fn take_scratch() -> Scratch {
    SCRATCH
        .with(|cell| cell.try_borrow_mut().map_or(Scratch::EMPTY, |mut s| std::mem::replace(&mut *s, Scratch::EMPTY)))
}

/// Puts a hook's buffers back for the worker's next hook.
fn put_scratch(scratch: Scratch) {
    SCRATCH.with(|cell| {
        if let Ok(mut s) = cell.try_borrow_mut() {
            *s = scratch;
        }
    });
}

#[cfg(test)]
thread_local! {
    /// Stream objects alive on this thread (a test checks that a destroyed one is freed).
    static LIVE_STREAMS: Cell<usize> = const { Cell::new(0) };
}

/// The stream objects alive on this thread (tests).
#[cfg(test)]
pub(crate) fn live_streams() -> usize {
    LIVE_STREAMS.with(Cell::get)
}

/// Context ids for the core's streams (unique per process).
static NEXT_STREAM_ID: AtomicU32 = AtomicU32::new(1);

/// The config's worker state for worker `slot` (created on its first stream), borrowed for the caller's
/// scope; `None` beyond [`MAX_WORKERS`] or if already borrowed (never, by design: no re-entrant call is made
/// while it is). Call only on worker `slot`'s thread (see [`Slot`]).
fn worker<E: Envoy>(config: &FilterConfig<E>, slot: usize) -> Option<RefMut<'_, Worker>> {
    let cell = config.slots.get(slot)?;
    let mut worker = cell.0.try_borrow_mut().ok()?;
    if worker.is_none() {
        *worker = Some(Worker {
            router: Router::new(config.config.clone(), now_ms(), &mut Quiet),
            seen: 0,
            cache_entries: 0,
        });
    }
    RefMut::filter_map(worker, Option::as_mut).ok()
}

/// The worker, with the latest published key sets and tenant map installed: for the hooks that decide a
/// request (its headers, and its wake-up after a key set).
fn deciding_worker<E: Envoy>(config: &FilterConfig<E>, slot: usize) -> Option<RefMut<'_, Worker>> {
    let mut worker = worker(config, slot)?;
    let worker_ref = &mut *worker;
    config.published.sync(&mut worker_ref.router, &mut worker_ref.seen);
    Some(worker)
}

fn headers_status(flow: Flow) -> u32 {
    if flow.proceeds() {
        HEADERS_CONTINUE
    } else {
        HEADERS_STOP_ITERATION
    }
}

fn trailers_status(flow: Flow) -> u32 {
    if flow.proceeds() {
        TRAILERS_CONTINUE
    } else {
        TRAILERS_STOP_ITERATION
    }
}

fn body_status(flow: Flow) -> u32 {
    if flow.proceeds() {
        BODY_CONTINUE
    } else {
        BODY_STOP_AND_BUFFER
    }
}

/// The stream object and its config behind a hook's module pointer: shared references only.
///
/// # Safety
/// `module` must be a pointer returned by [`filter_new`], not yet freed; the references must not outlive
/// the hook (see [`on_stream`]).
unsafe fn stream<'a, E: Envoy>(module: FilterModulePtr) -> Option<(&'a FilterConfig<E>, &'a StreamObject<E>)> {
    // SAFETY: ABI: `module` is what filter_new returned for this stream, alive until its destroy hook; a
    // destroy inside one of its hooks (Envoy <= 1.39) only marks it, and `on_stream` frees it after the
    // outermost hook returns. Only shared references to it exist.
    let object = unsafe { (module as *const StreamObject<E>).as_ref()? };
    // SAFETY: ABI: Envoy keeps the config alive while any of its streams exists.
    let config = unsafe { object.config.as_ref()? };
    Some((config, object))
}

// ---- hooks ----
//
// Each hook's logic is generic over [`Envoy`] (the unit tests run it against a fake Envoy); the
// `#[no_mangle]` functions in `exports` are thin wrappers that hand it `Abi`. They are `unsafe` because
// their safety rests on Envoy keeping the ABI's contract (live pointers, a stream's hooks on its worker).

/// Compiles the plugin JSON (the same as the wasm filter's); a bad one is refused with a log line naming the
/// field (Envoy then rejects the filter config), and so is a config whose background work cannot start.
pub(crate) fn config_new<E: Envoy>(env: &E, envoy_config: ConfigEnvoyPtr, bytes: &[u8]) -> ConfigModulePtr {
    guard(env, "config_new", std::ptr::null_mut(), None, None, false, std::ptr::null(), || {
        let compiled = match Config::from_json(bytes) {
            Ok(c) => c,
            Err(e) => {
                env.log(Level::Error, &e.to_string());
                return std::ptr::null();
            }
        };
        // The start-up line, once (each worker's router is built quietly from the same config); with anything
        // to fetch, this router stays on the main thread to fetch it.
        let main = Router::new(compiled.clone(), now_ms(), &mut LogsOnly(env));
        let tenant_counts = TenantCounts::new(compiled.tenants.ids());
        let quota_counts = TenantCounts::new(compiled.tenants.ids());
        let ticks = compiled.fetches() || !compiled.tenants.is_empty();
        let audit_inbox = compiled.audit_sink.as_ref().map(|s| Inbox::new(s.queue_size, s.untenanted_path.is_some()));
        let upkeep = match ticks.then(|| Upkeep::start(env, main, envoy_config)).transpose() {
            Ok(upkeep) => upkeep,
            Err(why) => {
                env.log(
                    Level::Error,
                    &format!(
                        "fhir_tenant_router: configuration refused: {why} (key sets, registry, tokens and counts \
                         would never be fetched or handed over)"
                    ),
                );
                return std::ptr::null();
            }
        };
        // A worker's token wish wakes the main thread at once.
        let parked = Mutex::new(Parked::waking(upkeep.as_ref().map(Upkeep::waker)));
        let upkeep = upkeep.map(Mutex::new);
        let slots = (0..MAX_WORKERS).map(|_| Slot(RefCell::new(None))).collect();
        let stats = ConfigStats::new(env.config_metrics());
        let batch_unlabelled = stats.direct() && upkeep.is_some();
        if !stats.direct() {
            env.log(
                Level::Info,
                "fhir_tenant_router: this Envoy has no config-level stats callbacks (Envoy 1.38): the main \
                 thread's counts (fetches, upstream tokens, per-tenant requests and quotas) and gauges reach \
                 Envoy's stats at the next request on any worker instead of within 500 ms",
            );
        }
        let filter_config = FilterConfig {
            config: compiled,
            metrics: MetricIds::define(env, envoy_config),
            stats,
            slots,
            upkeep,
            tenant_counts,
            quota_counts,
            unlabelled: UnlabelledCounts::default(),
            batch_unlabelled,
            published: Published::default(),
            parked,
            audit_inbox,
        };
        Box::into_raw(Box::new(filter_config)) as ConfigModulePtr
    })
}

/// # Safety
/// `config` is null or came from [`config_new`] with the same `E`, and is destroyed once.
pub(crate) unsafe fn config_destroy<E: Envoy>(env: &E, config: ConfigModulePtr) {
    guard(env, "config_destroy", std::ptr::null_mut(), None, None, false, (), || {
        if !config.is_null() {
            // SAFETY: ABI: `config` came from `Box::into_raw` in config_new, and Envoy destroys it once, after
            // every stream of it.
            drop(unsafe { Box::from_raw(config as *mut FilterConfig<E>) });
        }
    })
}

/// # Safety
/// `config` came from [`config_new`] and is alive; `filter` is the stream being created.
pub(crate) unsafe fn filter_new<E: Envoy>(env: &E, config: ConfigModulePtr, filter: FilterEnvoyPtr) -> FilterModulePtr {
    // SAFETY: ABI: Envoy keeps the config alive while any of its filters exist.
    let Some(cfg) = (unsafe { (config as *const FilterConfig<E>).as_ref() }) else { return std::ptr::null() };
    guard(env, "filter_new", filter, Some(cfg), None, false, std::ptr::null(), || {
        let slot = env.worker_index(filter) as usize;
        let stream = match worker(cfg, slot) {
            Some(mut worker) => worker.router.open_stream(NEXT_STREAM_ID.fetch_add(1, Ordering::Relaxed)),
            None => Stream::new(0),
        };
        let state = StreamState { stream, signatures: Ring::default(), scheduler: None };
        let object = StreamObject {
            config: cfg,
            slot,
            depth: Cell::new(0),
            complete_pending: Cell::new(false),
            destroyed: Cell::new(false),
            state: RefCell::new(state),
        };
        #[cfg(test)]
        LIVE_STREAMS.with(|n| n.set(n.get() + 1));
        Box::into_raw(Box::new(object)) as FilterModulePtr
    })
}

/// # Safety
/// `module` came from [`filter_new`] and is alive; `filter` is its stream; on its worker's thread.
pub(crate) unsafe fn request_headers<E: Envoy>(
    env: &E,
    filter: FilterEnvoyPtr,
    module: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    // No stream object (`filter_new` failed): an undecided request never goes on. Fail closed.
    let absent = || {
        if !filter.is_null() {
            let _ = catch_unwind(AssertUnwindSafe(|| unavailable(env, filter, PANIC_OUTCOME.as_bytes())));
        }
        HEADERS_STOP_ITERATION
    };
    let hook = |cfg: &FilterConfig<E>, object: &StreamObject<E>| {
        stream_hook(env, "request_headers", filter, (cfg, object), true, HEADERS_STOP_ITERATION, || {
            #[cfg(all(feature = "bench-floor", not(test)))]
            if let Some(status) = super::floor::request_headers(env, filter, &cfg.config) {
                return status;
            }
            // Envoy 1.38: the main thread's stats since the last request (one atomic load elsewhere).
            cfg.stats.relay(env, filter);
            let mut scratch = take_scratch();
            // Everything the core reads of the headers is copied before any effect changes the map.
            env.headers(filter, REQUEST_HEADER, &mut scratch.views);
            scratch.headers.fill(&scratch.views);
            let Scratch { headers, deferred, .. } = &mut scratch;
            let flow = {
                let (Some(mut worker), Ok(mut state)) =
                    (deciding_worker(cfg, object.slot), object.state.try_borrow_mut())
                else {
                    put_scratch(scratch);
                    unavailable(env, filter, PANIC_OUTCOME.as_bytes());
                    return HEADERS_STOP_ITERATION;
                };
                let state = &mut *state;
                if worker.router.wants_client_address() {
                    state.stream.set_client_address(env.source_address(filter).as_deref());
                }
                let mut apply = cfg.apply(env, filter, deferred);
                let flow = worker.router.on_request_headers(
                    &mut state.stream,
                    headers.pairs(),
                    end_of_stream,
                    now_ms(),
                    &state.signatures,
                    &mut apply,
                );
                if let Some(provider) = state.stream.waiting_for() {
                    // The scheduler is deleted in `destroy`, after it is unlisted.
                    let scheduler = env.scheduler_new(filter);
                    state.scheduler = Some(scheduler);
                    park(&cfg.parked, state.stream.context_id(), scheduler, Awaited::Keys(provider));
                }
                flow
            };
            let resend_failed = deferred.apply(env, filter, &object.destroyed);
            token_followup(env, cfg, object, filter, resend_failed, deferred);
            put_scratch(scratch);
            headers_status(flow)
        })
    };
    // SAFETY: ABI: `module` is the object filter_new returned for this stream, not yet destroyed (a destroy
    // inside this hook defers the free to `on_stream`); a stream's hooks run on its worker's thread.
    unsafe { on_stream(env, module, absent, hook) }
}

/// Runs `f` (a core event with the worker and the stream's state) with the hook's deferred effects, then
/// makes them once both borrows are released; `None` if the worker or the state could not be had.
fn with_core<E: Envoy, T>(
    env: &E,
    cfg: &FilterConfig<E>,
    object: &StreamObject<E>,
    filter: FilterEnvoyPtr,
    deciding: bool,
    f: impl FnOnce(&mut Worker, &mut StreamState, &mut Apply<'_, E>) -> T,
) -> Option<(T, Option<String>, Deferred)> {
    if object.destroyed.get() {
        // Envoy destroyed the stream inside an earlier part of this hook: nothing more is done for it.
        return None;
    }
    // Only the deferred-effect buffers, taken in place (the rest stays for the worker's next hook).
    let mut deferred =
        SCRATCH.with(|cell| cell.try_borrow_mut().map(|mut s| std::mem::take(&mut s.deferred)).unwrap_or_default());
    let out = {
        let worker = if deciding { deciding_worker(cfg, object.slot) } else { worker(cfg, object.slot) };
        let (Some(mut worker), Ok(mut state)) = (worker, object.state.try_borrow_mut()) else { return None };
        let mut apply = cfg.apply(env, filter, &mut deferred);
        f(&mut worker, &mut state, &mut apply)
    };
    let resend_failed = deferred.apply(env, filter, &object.destroyed);
    Some((out, resend_failed, deferred))
}

/// Puts a hook's deferred-effect buffers back for the worker's next hook.
fn done_with(deferred: Deferred) {
    SCRATCH.with(|cell| {
        if let Ok(mut s) = cell.try_borrow_mut() {
            s.deferred = deferred;
        }
    });
}

/// # Safety
/// As for [`request_headers`].
pub(crate) unsafe fn request_body<E: Envoy>(
    env: &E,
    filter: FilterEnvoyPtr,
    module: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    let hook = |cfg: &FilterConfig<E>, object: &StreamObject<E>| {
        stream_hook(env, "request_body", filter, (cfg, object), true, BODY_STOP_AND_BUFFER, || {
            let event = with_core(env, cfg, object, filter, false, |worker, state, apply| {
                let mut body = || read_body(env, filter, [BUFFERED_REQUEST_BODY, RECEIVED_REQUEST_BODY]);
                worker.router.on_request_body(&mut state.stream, end_of_stream, now_ms(), &mut body, apply)
            });
            let Some((flow, _, deferred)) = event else { return BODY_CONTINUE };
            done_with(deferred);
            body_status(flow)
        })
    };
    // SAFETY: ABI: `module` is the object filter_new returned for this stream, not yet destroyed (a destroy
    // inside this hook defers the free to `on_stream`); a stream's hooks run on its worker's thread.
    unsafe { on_stream(env, module, || BODY_CONTINUE, hook) }
}

/// The request ended with trailers: its body is complete (`Router::on_request_trailers`). A held body is
/// judged now, and the trailers stop unless the request may go on: Envoy continues a stopped stream whose
/// trailers hook says continue.
///
/// # Safety
/// As for [`request_headers`].
pub(crate) unsafe fn request_trailers<E: Envoy>(env: &E, filter: FilterEnvoyPtr, module: FilterModulePtr) -> u32 {
    let hook = |cfg: &FilterConfig<E>, object: &StreamObject<E>| {
        stream_hook(env, "request_trailers", filter, (cfg, object), true, TRAILERS_STOP_ITERATION, || {
            let event = with_core(env, cfg, object, filter, false, |worker, state, apply| {
                let mut body = || read_body(env, filter, [BUFFERED_REQUEST_BODY, RECEIVED_REQUEST_BODY]);
                worker.router.on_request_trailers(&mut state.stream, now_ms(), &mut body, apply)
            });
            // Not judged (the stream destroyed, or its state unavailable): never let it go on unjudged.
            let Some((flow, _, deferred)) = event else { return TRAILERS_STOP_ITERATION };
            done_with(deferred);
            trailers_status(flow)
        })
    };
    // SAFETY: ABI: `module` is the object filter_new returned for this stream, not yet destroyed (a destroy
    // inside this hook defers the free to `on_stream`); a stream's hooks run on its worker's thread.
    unsafe { on_stream(env, module, || TRAILERS_CONTINUE, hook) }
}

/// The answer ended with trailers while its body was held (`Router::on_response_trailers`).
///
/// # Safety
/// As for [`request_headers`].
pub(crate) unsafe fn response_trailers<E: Envoy>(env: &E, filter: FilterEnvoyPtr, module: FilterModulePtr) -> u32 {
    let hook = |cfg: &FilterConfig<E>, object: &StreamObject<E>| {
        stream_hook(env, "response_trailers", filter, (cfg, object), false, TRAILERS_CONTINUE, || {
            let event = with_core(env, cfg, object, filter, false, |worker, state, apply| {
                worker.router.on_response_trailers(&mut state.stream, apply)
            });
            let Some((flow, _, deferred)) = event else { return TRAILERS_CONTINUE };
            done_with(deferred);
            trailers_status(flow)
        })
    };
    // SAFETY: ABI: `module` is the object filter_new returned for this stream, not yet destroyed (a destroy
    // inside this hook defers the free to `on_stream`); a stream's hooks run on its worker's thread.
    unsafe { on_stream(env, module, || TRAILERS_CONTINUE, hook) }
}

/// # Safety
/// As for [`request_headers`].
pub(crate) unsafe fn response_headers<E: Envoy>(
    env: &E,
    filter: FilterEnvoyPtr,
    module: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    let hook = |cfg: &FilterConfig<E>, object: &StreamObject<E>| {
        stream_hook(env, "response_headers", filter, (cfg, object), false, HEADERS_CONTINUE, || {
            let may_resend = object.state.try_borrow().is_ok_and(|s| s.stream.may_resend());
            if may_resend {
                // Sent with an upstream token: a 401 sends it again with a new one (the response held meanwhile).
                let status = response_header(env, filter, ":status");
                let event = with_core(env, cfg, object, filter, true, |worker, state, apply| {
                    worker.router.on_upstream_response(&mut state.stream, status.as_deref(), now_ms(), apply)
                });
                let Some((resent, resend_failed, mut deferred)) = event else { return HEADERS_CONTINUE };
                if let Some(flow) = resent {
                    token_followup(env, cfg, object, filter, resend_failed, &mut deferred);
                    done_with(deferred);
                    return headers_status(flow);
                }
                done_with(deferred);
            }
            let event = with_core(env, cfg, object, filter, false, |worker, state, apply| {
                // Each header is read afresh (and copied) when the core asks for it.
                let header = |name: &str| response_header(env, filter, name);
                worker.router.on_response_headers(&mut state.stream, end_of_stream, &header, apply)
            });
            let Some((flow, _, deferred)) = event else { return HEADERS_CONTINUE };
            done_with(deferred);
            headers_status(flow)
        })
    };
    // SAFETY: ABI: `module` is the object filter_new returned for this stream, not yet destroyed (a destroy
    // inside this hook defers the free to `on_stream`); a stream's hooks run on its worker's thread.
    unsafe { on_stream(env, module, || HEADERS_CONTINUE, hook) }
}

/// # Safety
/// As for [`request_headers`].
pub(crate) unsafe fn response_body<E: Envoy>(
    env: &E,
    filter: FilterEnvoyPtr,
    module: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    let hook = |cfg: &FilterConfig<E>, object: &StreamObject<E>| {
        stream_hook(env, "response_body", filter, (cfg, object), false, BODY_CONTINUE, || {
            let event = with_core(env, cfg, object, filter, false, |worker, state, apply| {
                let mut body = || read_body(env, filter, [BUFFERED_RESPONSE_BODY, RECEIVED_RESPONSE_BODY]);
                worker.router.on_response_body(&mut state.stream, end_of_stream, &mut body, apply)
            });
            let Some((flow, _, deferred)) = event else { return BODY_CONTINUE };
            done_with(deferred);
            body_status(flow)
        })
    };
    // SAFETY: ABI: `module` is the object filter_new returned for this stream, not yet destroyed (a destroy
    // inside this hook defers the free to `on_stream`); a stream's hooks run on its worker's thread.
    unsafe { on_stream(env, module, || BODY_CONTINUE, hook) }
}

/// # Safety
/// As for [`request_headers`].
pub(crate) unsafe fn stream_complete<E: Envoy>(env: &E, filter: FilterEnvoyPtr, module: FilterModulePtr) {
    let hook = |cfg: &FilterConfig<E>, object: &StreamObject<E>| {
        if object.depth.get() > 0 {
            // Envoy completes the stream inside a call one of its hooks made (a local reply, a continue): that
            // hook's work is not over, so the outermost hook completes the stream when it ends.
            object.complete_pending.set(true);
            return;
        }
        stream_hook(env, "stream_complete", filter, (cfg, object), false, (), || complete(env, cfg, object, filter))
    };
    // SAFETY: ABI: `module` is the object filter_new returned for this stream, not yet destroyed; a stream's
    // hooks run on its worker's thread.
    unsafe { on_stream(env, module, || (), hook) }
}

/// # Safety
/// `module` is null or came from [`filter_new`], destroyed once, on its worker's thread.
pub(crate) unsafe fn filter_destroy<E: Envoy>(env: &E, module: FilterModulePtr) {
    if module.is_null() {
        return;
    }
    let object = module as *mut StreamObject<E>;
    let _ = catch_unwind(AssertUnwindSafe(|| {
        {
            // SAFETY: ABI: `module` came from filter_new and Envoy destroys it once; it is freed only below or,
            // destroyed inside a hook, by `on_stream` once that hook is over: it is alive here. Shared
            // references only (a hook of the stream may be on the stack, holding its own).
            let shared = unsafe { &*object };
            if shared.depth.get() > 0 {
                // Envoy <= 1.39 destroys the stream right after completing it inside a local reply or a continue
                // one of its hooks made: the hook still holds the object, so `on_stream` frees it once the
                // outermost hook of the stream returns, and nothing calls Envoy for the stream from here on.
                shared.destroyed.set(true);
                leave(env, shared);
                return;
            }
        }
        // SAFETY: ABI: `module` came from `Box::into_raw` in filter_new; destroyed once, with no hook of the
        // stream on the stack (depth 0): no reference to it is left.
        unsafe { free(env, object) };
    }));
}

/// A destroyed stream leaves its queue: unlisted (the main thread commits only listed schedulers), then its
/// scheduler deleted, now, while Envoy's destroy hook runs.
fn leave<E: Envoy>(env: &E, object: &StreamObject<E>) {
    let Ok(mut state) = object.state.try_borrow_mut() else { return };
    let Some(scheduler) = state.scheduler.take() else { return };
    // SAFETY: ABI: the config outlives its streams.
    if let Some(cfg) = unsafe { object.config.as_ref() } {
        unpark(&cfg.parked, state.stream.context_id());
    }
    drop(state);
    // Unlisted above, so the main thread will not commit it any more.
    env.scheduler_delete(scheduler);
}

/// Frees a stream object (after it left its queue, if it had not yet).
///
/// # Safety
/// `object` came from `Box::into_raw` in [`filter_new`], is freed once, and no reference to it is alive.
unsafe fn free<E: Envoy>(env: &E, object: *mut StreamObject<E>) {
    {
        // SAFETY: as the caller promises, alive.
        leave(env, unsafe { &*object });
    }
    // SAFETY: as the caller promises.
    drop(unsafe { Box::from_raw(object) });
    #[cfg(test)]
    LIVE_STREAMS.with(|n| n.set(n.get().saturating_sub(1)));
}

/// Runs a stream's hook (`hook`, given its config and its object, shared references that end with it),
/// then, if Envoy destroyed the stream while the hook was on the stack and no hook of it is left on the
/// stack, frees the object: after the hook has returned, so no reference to the object is alive when it is
/// freed, and nothing touches it afterwards. `absent`: what to do without a stream object.
///
/// # Safety
/// `module` is null or came from [`filter_new`] and was not freed yet (Envoy has not destroyed it, or it
/// destroyed it inside a hook of the stream that is still on the stack); on the stream's worker's thread.
unsafe fn on_stream<E: Envoy, T>(
    env: &E,
    module: FilterModulePtr,
    absent: impl FnOnce() -> T,
    hook: impl FnOnce(&FilterConfig<E>, &StreamObject<E>) -> T,
) -> T {
    // SAFETY: as the caller promises.
    let Some((cfg, object)) = (unsafe { stream::<E>(module) }) else { return absent() };
    let out = hook(cfg, object);
    let object = module as *mut StreamObject<E>;
    // SAFETY: not freed yet (only `filter_destroy` at depth 0 and this function free it, and the hook has
    // just returned); the references `hook` had ended with it.
    let due = unsafe { (*object).depth.get() == 0 && (*object).destroyed.get() };
    if due {
        // SAFETY: from `Box::into_raw` in filter_new; destroyed by Envoy (once), and with the outermost hook
        // returned no hook of the stream holds a reference to it; this is the only free of a destroyed one
        // (a later hook cannot come: Envoy calls none after destroy).
        unsafe { free(env, object) };
    }
    out
}

/// The answer to a request sent again after a 401 (its stream's only callout): the client gets it.
///
/// # Safety
/// As for [`request_headers`]; the arrays (or nulls) are Envoy's, valid during the hook.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn http_callout_done<E: Envoy>(
    env: &E,
    filter: FilterEnvoyPtr,
    module: FilterModulePtr,
    result: u32,
    headers: *mut EnvoyHeader,
    headers_size: usize,
    body_chunks: *mut EnvoyBuffer,
    body_chunks_size: usize,
) {
    let hook = |cfg: &FilterConfig<E>, object: &StreamObject<E>| {
        stream_hook(env, "http_callout_done", filter, (cfg, object), true, (), || {
            // SAFETY: ABI: Envoy's arrays (or null on failure) are valid during this hook; copied here.
            let (status, headers, body) =
                unsafe { callout_answer(result, headers, headers_size, body_chunks, body_chunks_size) };
            let status = status.as_deref().ok_or("connection failure or timeout");
            let event = with_core(env, cfg, object, filter, false, |worker, state, apply| {
                worker.router.on_resend_response(&mut state.stream, status, &headers, &body, apply)
            });
            if let Some((_, _, deferred)) = event {
                done_with(deferred);
            }
        })
    };
    // SAFETY: ABI: `module` is the object filter_new returned for this stream, not yet destroyed (a destroy
    // inside this hook defers the free to `on_stream`); a stream's hooks run on its worker's thread.
    unsafe { on_stream(env, module, || (), hook) }
}

/// A callout's answer: its `:status` (`None` if it failed: `result` not success), its headers (lowercase
/// names, as Envoy keeps them) and its body.
///
/// # Safety
/// The arrays (or nulls) are Envoy's, valid during the hook that reads them.
unsafe fn callout_answer(
    result: u32,
    headers: *mut EnvoyHeader,
    headers_size: usize,
    body_chunks: *mut EnvoyBuffer,
    body_chunks_size: usize,
) -> (Option<String>, Vec<(String, String)>, Vec<u8>) {
    // SAFETY (this and the slices below): ABI: a callout answer's arrays and their bytes are Envoy's, valid
    // during the hook; all of it is copied here.
    let headers: &[EnvoyHeader] =
        if headers.is_null() { &[] } else { unsafe { std::slice::from_raw_parts(headers, headers_size) } };
    let chunks: &[EnvoyBuffer] =
        if body_chunks.is_null() { &[] } else { unsafe { std::slice::from_raw_parts(body_chunks, body_chunks_size) } };
    let bytes = |ptr: *const u8, len: usize| -> &[u8] {
        if ptr.is_null() {
            &[]
        } else {
            unsafe { std::slice::from_raw_parts(ptr, len) }
        }
    };
    let text = |ptr: *const u8, len: usize| String::from_utf8_lossy(bytes(ptr, len)).into_owned();
    let headers: Vec<(String, String)> =
        headers.iter().map(|h| (text(h.key_ptr, h.key_length), text(h.value_ptr, h.value_length))).collect();
    let status =
        headers.iter().find(|(n, _)| n == ":status").map(|(_, v)| v.clone()).filter(|_| result == CALLOUT_SUCCESS);
    let body: Vec<u8> = chunks.iter().flat_map(|c| bytes(c.ptr, c.length).iter().copied()).collect();
    (status, headers, body)
}

/// A key set or an upstream token arrived (or its fetch failed) while this request was parked: decide it
/// again (or send it again, after a 401).
///
/// # Safety
/// As for [`request_headers`].
pub(crate) unsafe fn scheduled<E: Envoy>(env: &E, filter: FilterEnvoyPtr, module: FilterModulePtr) {
    let hook = |cfg: &FilterConfig<E>, object: &StreamObject<E>| {
        stream_hook(env, "scheduled", filter, (cfg, object), true, (), || {
            let event = with_core(env, cfg, object, filter, true, |worker, state, apply| {
                let mut body = || read_body(env, filter, [BUFFERED_REQUEST_BODY, RECEIVED_REQUEST_BODY]);
                worker.router.wake(&mut state.stream, now_ms(), &state.signatures, &mut body, apply)
            });
            let Some(((), resend_failed, mut deferred)) = event else { return };
            token_followup(env, cfg, object, filter, resend_failed, &mut deferred);
            done_with(deferred);
        })
    };
    // SAFETY: ABI: `module` is the object filter_new returned for this stream, not yet destroyed (a destroy
    // inside this hook defers the free to `on_stream`); a stream's hooks run on its worker's thread.
    unsafe { on_stream(env, module, || (), hook) }
}

/// A config-level scheduler event on the main thread: the fetch schedules' tick.
///
/// # Safety
/// `config` is null or came from [`config_new`] and is alive; on the main thread.
pub(crate) unsafe fn config_scheduled<E: Envoy>(env: &E, envoy_config: ConfigEnvoyPtr, config: ConfigModulePtr) {
    // SAFETY: ABI: Envoy passes the config config_new returned, alive until config_destroy.
    let Some(cfg) = (unsafe { (config as *const FilterConfig<E>).as_ref() }) else { return };
    guard(env, "config_scheduled", std::ptr::null_mut(), None, None, false, (), || {
        if let Some(mut upkeep) = cfg.upkeep(env, envoy_config) {
            upkeep.tick(&cfg.main(env, envoy_config));
        }
    })
}

/// A config-level callout's answer, on the main thread.
///
/// # Safety
/// As for [`config_scheduled`]; the arrays (or nulls) are Envoy's, valid during the hook.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn config_http_callout_done<E: Envoy>(
    env: &E,
    envoy_config: ConfigEnvoyPtr,
    config: ConfigModulePtr,
    callout_id: u64,
    result: u32,
    headers: *mut EnvoyHeader,
    headers_size: usize,
    body_chunks: *mut EnvoyBuffer,
    body_chunks_size: usize,
) {
    // SAFETY: ABI: as in `config_scheduled`.
    let Some(cfg) = (unsafe { (config as *const FilterConfig<E>).as_ref() }) else { return };
    guard(env, "config_http_callout_done", std::ptr::null_mut(), None, None, false, (), || {
        // SAFETY: ABI: Envoy's arrays (or null on failure) are valid during this hook; copied here.
        let (status, _, body) = unsafe { callout_answer(result, headers, headers_size, body_chunks, body_chunks_size) };
        if let Some(mut upkeep) = cfg.upkeep(env, envoy_config) {
            upkeep.called_back(&cfg.main(env, envoy_config), callout_id, status.as_deref(), body);
        }
    })
}

/// The symbols Envoy resolves: thin wrappers that hand each hook [`Abi`](super::envoy::Abi).
#[cfg(not(test))]
mod exports {
    use std::ffi::c_char;

    use super::super::abi::*;
    use super::super::envoy::Abi;

    #[no_mangle]
    pub unsafe extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
        ABI_VERSION.as_ptr().cast()
    }

    #[no_mangle]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
        envoy_config: ConfigEnvoyPtr,
        _name: EnvoyBuffer,
        config: EnvoyBuffer,
    ) -> ConfigModulePtr {
        let bytes = if config.ptr.is_null() {
            &[][..]
        } else {
            // SAFETY: ABI: Envoy's buffer is valid during this call.
            unsafe { std::slice::from_raw_parts(config.ptr, config.length) }
        };
        super::config_new(&Abi, envoy_config, bytes)
    }

    #[no_mangle]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: ConfigModulePtr) {
        // SAFETY: ABI: Envoy passes the pointers it created or was given, valid for this call (the
        // callee's `# Safety`).
        unsafe { super::config_destroy(&Abi, config) }
    }

    #[no_mangle]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(
        config: ConfigModulePtr,
        filter: FilterEnvoyPtr,
    ) -> FilterModulePtr {
        // SAFETY: ABI: Envoy passes the pointers it created or was given, valid for this call (the
        // callee's `# Safety`).
        unsafe { super::filter_new(&Abi, config, filter) }
    }

    #[no_mangle]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
        filter: FilterEnvoyPtr,
        module: FilterModulePtr,
        end_of_stream: bool,
    ) -> u32 {
        // SAFETY: ABI: Envoy passes the pointers it created or was given, valid for this call (the
        // callee's `# Safety`).
        unsafe { super::request_headers(&Abi, filter, module, end_of_stream) }
    }

    #[no_mangle]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
        filter: FilterEnvoyPtr,
        module: FilterModulePtr,
        end_of_stream: bool,
    ) -> u32 {
        // SAFETY: ABI: Envoy passes the pointers it created or was given, valid for this call (the
        // callee's `# Safety`).
        unsafe { super::request_body(&Abi, filter, module, end_of_stream) }
    }

    #[no_mangle]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
        filter: FilterEnvoyPtr,
        module: FilterModulePtr,
    ) -> u32 {
        // SAFETY: ABI: Envoy passes the pointers it created or was given, valid for this call (the
        // callee's `# Safety`).
        unsafe { super::request_trailers(&Abi, filter, module) }
    }

    #[no_mangle]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
        filter: FilterEnvoyPtr,
        module: FilterModulePtr,
        end_of_stream: bool,
    ) -> u32 {
        // SAFETY: ABI: Envoy passes the pointers it created or was given, valid for this call (the
        // callee's `# Safety`).
        unsafe { super::response_headers(&Abi, filter, module, end_of_stream) }
    }

    #[no_mangle]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
        filter: FilterEnvoyPtr,
        module: FilterModulePtr,
        end_of_stream: bool,
    ) -> u32 {
        // SAFETY: ABI: Envoy passes the pointers it created or was given, valid for this call (the
        // callee's `# Safety`).
        unsafe { super::response_body(&Abi, filter, module, end_of_stream) }
    }

    #[no_mangle]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
        filter: FilterEnvoyPtr,
        module: FilterModulePtr,
    ) -> u32 {
        // SAFETY: ABI: Envoy passes the pointers it created or was given, valid for this call (the
        // callee's `# Safety`).
        unsafe { super::response_trailers(&Abi, filter, module) }
    }

    #[no_mangle]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
        filter: FilterEnvoyPtr,
        module: FilterModulePtr,
    ) {
        // SAFETY: ABI: Envoy passes the pointers it created or was given, valid for this call (the
        // callee's `# Safety`).
        unsafe { super::stream_complete(&Abi, filter, module) }
    }

    #[no_mangle]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(module: FilterModulePtr) {
        // SAFETY: ABI: Envoy passes the pointers it created or was given, valid for this call (the
        // callee's `# Safety`).
        unsafe { super::filter_destroy(&Abi, module) }
    }

    #[no_mangle]
    #[allow(clippy::too_many_arguments)]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
        filter: FilterEnvoyPtr,
        module: FilterModulePtr,
        _callout_id: u64,
        result: u32,
        headers: *mut EnvoyHeader,
        headers_size: usize,
        body_chunks: *mut EnvoyBuffer,
        body_chunks_size: usize,
    ) {
        // SAFETY: ABI: Envoy passes the pointers it created or was given, valid for this call (the
        // callee's `# Safety`).
        unsafe {
            super::http_callout_done(&Abi, filter, module, result, headers, headers_size, body_chunks, body_chunks_size)
        }
    }

    // Hooks Envoy requires but this filter does not use (streams, watermarks).

    #[no_mangle]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
        _filter: FilterEnvoyPtr,
        _module: FilterModulePtr,
        _stream_id: u64,
        _headers: *mut EnvoyHeader,
        _headers_size: usize,
        _end_stream: bool,
    ) {
    }

    #[no_mangle]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
        _filter: FilterEnvoyPtr,
        _module: FilterModulePtr,
        _stream_id: u64,
        _data: *const EnvoyBuffer,
        _data_count: usize,
        _end_stream: bool,
    ) {
    }

    #[no_mangle]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
        _filter: FilterEnvoyPtr,
        _module: FilterModulePtr,
        _stream_id: u64,
        _trailers: *mut EnvoyHeader,
        _trailers_size: usize,
    ) {
    }

    #[no_mangle]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
        _filter: FilterEnvoyPtr,
        _module: FilterModulePtr,
        _stream_id: u64,
    ) {
    }

    #[no_mangle]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
        _filter: FilterEnvoyPtr,
        _module: FilterModulePtr,
        _stream_id: u64,
        _reason: u32,
    ) {
    }

    #[no_mangle]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
        filter: FilterEnvoyPtr,
        module: FilterModulePtr,
        _event_id: u64,
    ) {
        // SAFETY: ABI: Envoy passes the pointers it created or was given, valid for this call (the
        // callee's `# Safety`).
        unsafe { super::scheduled(&Abi, filter, module) }
    }

    #[no_mangle]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
        envoy_config: ConfigEnvoyPtr,
        config: ConfigModulePtr,
        _event_id: u64,
    ) {
        // SAFETY: ABI: Envoy passes the pointers it created or was given, valid for this call (the
        // callee's `# Safety`).
        unsafe { super::config_scheduled(&Abi, envoy_config, config) }
    }

    #[no_mangle]
    #[allow(clippy::too_many_arguments)]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
        envoy_config: ConfigEnvoyPtr,
        config: ConfigModulePtr,
        callout_id: u64,
        result: u32,
        headers: *mut EnvoyHeader,
        headers_size: usize,
        body_chunks: *mut EnvoyBuffer,
        body_chunks_size: usize,
    ) {
        // SAFETY: ABI: Envoy passes the pointers it created or was given, valid for this call (the
        // callee's `# Safety`).
        unsafe {
            super::config_http_callout_done(
                &Abi,
                envoy_config,
                config,
                callout_id,
                result,
                headers,
                headers_size,
                body_chunks,
                body_chunks_size,
            )
        }
    }

    #[no_mangle]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
        _filter: FilterEnvoyPtr,
        _module: FilterModulePtr,
    ) {
    }

    #[no_mangle]
    pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
        _filter: FilterEnvoyPtr,
        _module: FilterModulePtr,
    ) {
    }
}
