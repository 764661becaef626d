//! What the dynamic module's main thread hands its workers, and what the workers ask of it, without Envoy:
//! [`super::upkeep`] applies it through the ABI (its scheduler commits are the `commit` arguments here), and
//! the unit tests below run it with the core's routers and no Envoy.
//!
//! - **Published**: the main thread compiles each fetched key set and tenant registry document once and
//!   publishes the compiled result (an `Arc`); a worker installs what was published since it last looked,
//!   at its next request (one atomic load when nothing changed). A registry document that did not change is
//!   not compiled again, nor published (see [`crate::upkeep::RegistrySource`]).
//! - **Parked**: requests waiting on their worker for a key set or an upstream token (woken by committing
//!   their per-stream scheduler), and the workers' wishes for a tenant's new token. The first wish since
//!   the main thread last looked wakes it at once (its config-level scheduler); the main thread then asks
//!   its own router once per tenant, naming the newest token any asker had, so that one token request
//!   serves every worker, and a wish for a token fetched meanwhile is answered with it (no second fetch).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::effect::{Effect, Effects, FetchTarget};
use crate::jwks::KeySet;
use crate::router::Router;
use crate::tenant::TenantMap;
use crate::upstream_auth::TokenAnswer;

/// A raw pointer handed between threads; what it points to is guarded by how it is used (see each use).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendPtr(pub *mut std::ffi::c_void);

// SAFETY: the pointers wrapped are Envoy schedulers and the config's Envoy pointer, whose calls the ABI
// allows from any thread (commits) or which are only used on the main thread (callouts, config stats).
unsafe impl Send for SendPtr {}

/// Locks `mutex`, recovering it if a panic poisoned it (a panic while it was held, such as one in a
/// scheduler commit under the parked list's lock): what it guards stays usable, as every change made under
/// these locks adds or removes whole entries. Returns whether it was poisoned, for the main thread to say it.
fn lock_recovering<T>(mutex: &Mutex<T>) -> (MutexGuard<'_, T>, bool) {
    match mutex.lock() {
        Ok(guard) => (guard, false),
        Err(poisoned) => {
            mutex.clear_poison();
            (poisoned.into_inner(), true)
        }
    }
}

/// The parked list, its lock recovered if a panic poisoned it; a recovery is counted in the list, and the
/// main thread's next tick says it ([`Parked::take_recovered`]).
pub fn lock_parked(parked: &Mutex<Parked>) -> MutexGuard<'_, Parked> {
    let (mut guard, poisoned) = lock_recovering(parked);
    if poisoned {
        guard.recovered = guard.recovered.saturating_add(1);
    }
    guard
}

/// One published answer, compiled: a provider's key set, the registry's tenant map, or a tenant's upstream
/// token news.
#[derive(Clone)]
enum News {
    Keys(usize, Arc<KeySet>),
    Tenants(Arc<TenantMap>),
    Token(Arc<TokenAnswer>),
}

impl News {
    fn replaces(&self, other: &News) -> bool {
        match (self, other) {
            (News::Keys(a, _), News::Keys(b, _)) => a == b,
            (News::Tenants(_), News::Tenants(_)) => true,
            (News::Token(a), News::Token(b)) => a.tenant == b.tenant,
            _ => false,
        }
    }
}

/// The latest answers, for the workers: the latest good key set of each provider, the registry's latest
/// tenant map, and the latest token news of each tenant with `upstream_auth`, each numbered by the
/// generation that published it.
#[derive(Default)]
pub struct Published {
    /// The newest entry's generation; a worker that has seen it has installed everything.
    pub generation: AtomicU64,
    entries: Mutex<Vec<(u64, News)>>,
    /// How often its lock was found poisoned and recovered since the main thread last said it.
    recovered: AtomicU64,
}

impl Published {
    /// The entries, their lock recovered (and the recovery counted) if a panic poisoned it.
    fn entries(&self) -> MutexGuard<'_, Vec<(u64, News)>> {
        let (guard, poisoned) = lock_recovering(&self.entries);
        if poisoned {
            self.recovered.fetch_add(1, Ordering::Relaxed);
        }
        guard
    }

    /// How often the lock was recovered since the last call (the main thread says it).
    pub fn take_recovered(&self) -> u64 {
        self.recovered.swap(0, Ordering::Relaxed)
    }

    fn publish(&self, news: News) {
        let mut entries = self.entries();
        entries.retain(|(_, n)| !news.replaces(n));
        // Bumped under the lock: entries are numbered in the order they are listed.
        let generation = self.generation.load(Ordering::Relaxed) + 1;
        entries.push((generation, news));
        self.generation.store(generation, Ordering::Release);
    }

    /// A key set the main thread installed.
    pub fn publish_keys(&self, provider: usize, keys: Arc<KeySet>) {
        self.publish(News::Keys(provider, keys));
    }

    /// A tenant map the main thread compiled and installed.
    pub fn publish_tenants(&self, map: Arc<TenantMap>) {
        self.publish(News::Tenants(map));
    }

    /// After the main thread's `router` installed a fetch of `target` (compiling it): publishes the compiled
    /// key set or tenant map for the workers. (A fetch that installed nothing, such as a registry document
    /// that did not change, is not handed on.)
    pub fn publish_installed(&self, router: &Router, target: FetchTarget) {
        match target {
            FetchTarget::Jwks(provider) => {
                if let Some(keys) = router.keys.0.get(provider).and_then(|s| s.keys.clone()) {
                    self.publish_keys(provider, keys);
                }
            }
            FetchTarget::Registry => {
                if let Some(map) = router.tenants.map.clone() {
                    self.publish_tenants(map);
                }
            }
            // A discovery document installs nothing: the key-set fetch it sends does.
            FetchTarget::Discovery(_)
            | FetchTarget::UpstreamToken { .. }
            | FetchTarget::Resend(_)
            | FetchTarget::AuditSink(_) => {}
        }
    }

    pub fn publish_token(&self, answer: TokenAnswer) {
        self.publish(News::Token(Arc::new(answer)));
    }

    /// Installs into a worker's `router` whatever was published after generation `*seen`, in order.
    pub fn sync(&self, router: &mut Router, seen: &mut u64) {
        if self.generation.load(Ordering::Acquire) == *seen {
            return;
        }
        let (newest, news): (u64, Vec<News>) = {
            let entries = self.entries();
            (
                entries.last().map_or(*seen, |(g, _)| *g),
                entries.iter().filter(|(g, _)| *g > *seen).map(|(_, n)| n.clone()).collect(),
            )
        };
        let now_ms = now_ms();
        for news in news {
            // The main thread logged and counted each answer; the workers install it quietly, compiled.
            match news {
                News::Keys(provider, keys) => {
                    if let Some(state) = router.keys.0.get_mut(provider) {
                        // The requests that waited for it are woken by the main thread (see `Parked`).
                        state.waiting.clear();
                    }
                    router.install_key_set(provider, keys, &mut Quiet);
                }
                News::Tenants(map) => router.install_tenant_map(map, now_ms, &mut Quiet),
                News::Token(answer) => router.install_token(&answer),
            }
        }
        *seen = newest;
    }
}

/// Milliseconds since the epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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
/// after a 401), each with the number of the token the asker has (see [`Router::want_token`]).
#[derive(Default)]
pub struct Parked {
    streams: Vec<(u32, Awaited, SendPtr)>,
    refetch: Vec<usize>,
    tokens: Vec<(String, u64)>,
    /// The main thread's config-level scheduler, committed by the first token wish it has not seen yet.
    waker: Option<SendPtr>,
    /// How often this list's lock was found poisoned and recovered since the main thread last said it.
    recovered: u32,
}

impl Parked {
    /// Token wishes wake the main thread through `waker` (its config-level scheduler).
    pub fn waking(waker: Option<SendPtr>) -> Self {
        Self { waker, ..Self::default() }
    }

    /// Unlists the schedulers of the requests waiting for `awaited`, handing each to `commit`.
    pub fn wake(&mut self, awaited: &Awaited, mut commit: impl FnMut(SendPtr)) {
        self.streams.retain(|(_, waits_for, scheduler)| {
            if waits_for != awaited {
                return true;
            }
            commit(*scheduler);
            false
        });
    }

    /// Lists a stream waiting for `awaited` (its scheduler is committed when that comes or fails); a key
    /// set's refetch is asked for with it (a token is asked for with [`Parked::wish`]).
    pub fn park(&mut self, stream_id: u32, scheduler: SendPtr, awaited: Awaited) {
        if let Awaited::Keys(provider) = &awaited {
            self.refetch.push(*provider);
        }
        self.streams.push((stream_id, awaited, scheduler));
    }

    /// A worker asks for a new token of `tenant`, having the one numbered `have` (0: none). Returns the
    /// main thread's scheduler to commit now if this is the first wish since it last took them.
    pub fn wish(&mut self, tenant: &str, have: u64) -> Option<SendPtr> {
        let first = self.tokens.is_empty();
        self.tokens.push((tenant.to_string(), have));
        if first {
            self.waker
        } else {
            None
        }
    }

    /// Takes a stream off the list (before its scheduler is deleted: the main thread commits only listed ones).
    pub fn unpark(&mut self, stream_id: u32) {
        self.streams.retain(|(id, _, _)| *id != stream_id);
    }

    /// How often the list's lock was recovered since the last call (the main thread says it).
    pub fn take_recovered(&mut self) -> u32 {
        std::mem::take(&mut self.recovered)
    }

    /// The main thread takes the refetches asked for, and the token wishes: one per tenant, naming the
    /// newest token any of its askers had.
    pub fn take(&mut self) -> (Vec<usize>, Vec<(String, u64)>) {
        let mut tokens = std::mem::take(&mut self.tokens);
        // By tenant, the newest token last: the dedup keeps the first of each run.
        tokens.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        tokens.dedup_by(|later, first| later.0 == first.0);
        (std::mem::take(&mut self.refetch), tokens)
    }
}

/// The main thread's answer to the workers' token wishes (`wishes`, from [`Parked::take`]) in `router`
/// (its own): each answered at once is handed on ([`token_answered`]); the others are answered by the
/// fetch under way or the one the next [`Router::on_tick`] sends.
pub fn answer_wishes(
    router: &mut Router,
    wishes: Vec<(String, u64)>,
    now_ms: u64,
    published: &Published,
    parked: &Mutex<Parked>,
    commit: &mut dyn FnMut(SendPtr),
) {
    for (tenant, have) in wishes {
        if let Some(answer) = router.want_token(&tenant, have, now_ms) {
            token_answered(published, parked, answer, commit);
        }
    }
}

/// A tenant's token fetch ended (or was not sent, or a worker asked for a token it did not have yet): the
/// workers install the news, and the requests parked for that tenant's token are decided again.
pub fn token_answered(
    published: &Published,
    parked: &Mutex<Parked>,
    answer: TokenAnswer,
    commit: &mut dyn FnMut(SendPtr),
) {
    let awaited = Awaited::Token(answer.tenant.clone());
    published.publish_token(answer);
    lock_parked(parked).wake(&awaited, &mut *commit);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effect::{Flow, Recorded};
    use crate::router::Stream;
    use crate::testkeys;
    use crate::upkeep::tests::upstream_auth_router;
    use crate::upkeep::FetchResult;

    /// Collects the fetches a router's effects ask for.
    #[derive(Default)]
    struct Fetches(Vec<FetchTarget>);

    impl Effects for Fetches {
        fn push(&mut self, effect: Effect<'_>) {
            if let Effect::Fetch(f) = effect {
                self.0.push(f.target);
            }
        }
    }

    #[test]
    fn a_lock_a_panic_poisoned_is_recovered_and_counted_for_the_main_thread_to_say() {
        let published = Published::default();
        let parked = Mutex::new(Parked::default());
        let poison = |f: &dyn Fn()| {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        };
        poison(&|| {
            let _held = published.entries.lock();
            panic!("a bug while the published answers' lock is held");
        });
        poison(&|| {
            let _held = parked.lock();
            panic!("a bug while the parked list's lock is held");
        });
        assert!(published.entries.is_poisoned() && parked.is_poisoned());
        // A worker installs (and the main thread publishes) as before; the recovery is kept to be said.
        let mut router = upstream_auth_router();
        let mut seen = 0;
        published.generation.store(1, Ordering::Release);
        published.sync(&mut router, &mut seen);
        lock_parked(&parked).park(1, scheduler(1), Awaited::Keys(0));
        assert!(!published.entries.is_poisoned() && !parked.is_poisoned());
        assert_eq!(published.take_recovered(), 1);
        assert_eq!(published.take_recovered(), 0, "said once");
        let mut p = lock_parked(&parked);
        assert_eq!(p.take_recovered(), 1);
        assert_eq!(p.take_recovered(), 0, "said once");
        assert_eq!(p.take().0, [0], "the refetch asked for after the recovery is listed");
    }

    /// The test's stand-in for Envoy's scheduler pointers: distinct addresses, never dereferenced.
    fn scheduler(n: usize) -> SendPtr {
        SendPtr(n as *mut std::ffi::c_void)
    }

    const MAIN_SCHEDULER: usize = 1_000;

    /// One Envoy worker: its router, the generation it installed, and its request waiting for a token.
    struct Worker {
        router: Router,
        seen: u64,
        streams: Vec<Stream>,
    }

    /// What a worker's request hook does: installs what was published (unless `stale`: a request that was
    /// decided just before the publication), decides the request, and asks for the token its router wants.
    /// Returns the flow and whether the wish woke the main thread.
    fn request(
        w: &mut Worker,
        i: usize,
        published: &Published,
        parked: &Mutex<Parked>,
        now: u64,
        stale: bool,
    ) -> (Flow, bool) {
        if !stale {
            published.sync(&mut w.router, &mut w.seen);
        }
        let auth = format!("Bearer {}", testkeys::sign_rs256(&testkeys::claims_now()));
        let headers: Vec<(&[u8], &[u8])> =
            vec![(b":method", b"GET"), (b":path", b"/Patient"), (b"authorization", auth.as_bytes())];
        let id = u32::try_from(i * 100 + w.streams.len()).unwrap() + 1;
        let mut stream = w.router.open_stream(id);
        let flow = w.router.on_request_headers(
            &mut stream,
            headers.iter().copied(),
            true,
            now,
            &crate::crypto::PureRust,
            &mut Recorded::default(),
        );
        let mut woke = false;
        if let Some((tenant, have)) = w.router.token_wanted(&stream, now) {
            let tenant = tenant.to_string();
            let mut p = parked.lock().unwrap();
            if stream.waits_for_token() {
                p.park(id, scheduler(id as usize), Awaited::Token(tenant.clone()));
            }
            woke = p.wish(&tenant, have) == Some(scheduler(MAIN_SCHEDULER));
        }
        if flow == Flow::WaitForKeys {
            w.streams.push(stream);
        }
        (flow, woke)
    }

    /// The main thread's tick (see `Upkeep::tick`): the wishes answered, then the fetches that are due.
    fn tick(
        main: &mut Router,
        published: &Published,
        parked: &Mutex<Parked>,
        now: u64,
        woken: &mut Vec<SendPtr>,
    ) -> Vec<FetchTarget> {
        let (_, wishes) = parked.lock().unwrap().take();
        answer_wishes(main, wishes, now, published, parked, &mut |s| woken.push(s));
        let mut fetches = Fetches::default();
        main.on_tick(now, 0, &mut fetches);
        fetches.0.into_iter().filter(|t| matches!(t, FetchTarget::UpstreamToken { .. })).collect()
    }

    /// The token endpoint's answer to `fetch`, on the main thread, handed on to the workers.
    fn token_arrives(
        main: &mut Router,
        fetch: FetchTarget,
        token: &str,
        published: &Published,
        parked: &Mutex<Parked>,
        now: u64,
        woken: &mut Vec<SendPtr>,
    ) {
        let body = format!(r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":3600}}"#);
        let result = FetchResult::Answer { status: Some("200"), body_size: body.len() };
        let fetched = main.on_fetch_result(
            fetch,
            result,
            now,
            &mut || body.clone().into_bytes(),
            &|_| None,
            &mut Recorded::default(),
        );
        token_answered(published, parked, fetched.token.expect("a token answer"), &mut |s| woken.push(s));
    }

    /// Finding 6 of issue 22: four workers' first requests at once, a fifth worker's request decided just
    /// before the token was published, then a renewal asked for by workers on either side of its answer:
    /// one token request per renewal, the main thread woken by the first wish (not left to its tick), and
    /// every waiting request woken with the token.
    #[test]
    fn one_token_request_per_renewal_however_many_workers_ask_and_whenever_they_ask() {
        let published = Published::default();
        let parked = Mutex::new(Parked::waking(Some(scheduler(MAIN_SCHEDULER))));
        let mut main = upstream_auth_router();
        let mut workers: Vec<Worker> =
            (0..5).map(|_| Worker { router: upstream_auth_router(), seen: 0, streams: Vec::new() }).collect();
        let now = testkeys::NOW as u64 * 1_000;
        let mut woken = Vec::new();
        // First use: four workers' requests wait (two on the first); only the first wish wakes the main thread.
        let wakes: Vec<bool> = [0, 0, 1, 2, 3]
            .into_iter()
            .map(|i| {
                let (flow, woke) = request(&mut workers[i], i, &published, &parked, now, false);
                assert_eq!(flow, Flow::WaitForKeys, "worker {i} waits for the token");
                woke
            })
            .collect();
        assert_eq!(wakes, [true, false, false, false, false], "the first wish wakes the main thread");
        let fetches = tick(&mut main, &published, &parked, now + 1, &mut woken);
        assert_eq!(fetches.len(), 1, "one token request for four workers: {fetches:?}");
        assert!(tick(&mut main, &published, &parked, now + 2, &mut woken).is_empty(), "none while it is under way");
        // The fifth worker's request was decided before the token was published, and asks after it arrived.
        let (flow, _) = request(&mut workers[4], 4, &published, &parked, now + 3, true);
        assert_eq!(flow, Flow::WaitForKeys);
        token_arrives(&mut main, fetches[0], "up-1", &published, &parked, now + 5, &mut woken);
        assert_eq!(woken.len(), 6, "every parked request is woken: {woken:?}");
        woken.clear();
        // Already parked and woken; its wish, taken now, names no token: answered with the one fetched.
        let fetches = tick(&mut main, &published, &parked, now + 6, &mut woken);
        assert!(fetches.is_empty(), "a wish for a token fetched since is answered with it: {fetches:?}");
        // Each woken request goes on with the token.
        for (i, w) in workers.iter_mut().enumerate() {
            published.sync(&mut w.router, &mut w.seen);
            for mut stream in std::mem::take(&mut w.streams) {
                let mut out = Recorded::default();
                w.router.wake(&mut stream, now + 7, &crate::crypto::PureRust, &mut Vec::new, &mut out);
                assert!(out.0.iter().any(|e| e.contains("Bearer up-1")), "worker {i}: {:?}", out.0);
                assert!(out.0.iter().any(|e| e == "ResumeRequest"), "worker {i}: {:?}", out.0);
                // After its event, the hook asks for whatever token the router still wants: none.
                if let Some((tenant, have)) = w.router.token_wanted(&stream, now + 7) {
                    let tenant = tenant.to_string();
                    parked.lock().unwrap().wish(&tenant, have);
                }
            }
        }
        let fetches = tick(&mut main, &published, &parked, now + 8, &mut woken);
        assert!(fetches.is_empty(), "a woken request asks for no second token: {fetches:?}");
        // Renewal: past 80 % of the token's life, two workers ask before the answer, one after it.
        let later = now + 3_000 * 1_000;
        for (i, w) in workers.iter_mut().enumerate().take(2) {
            assert_eq!(request(w, i, &published, &parked, later, false).0, Flow::Continue);
        }
        let fetches = tick(&mut main, &published, &parked, later + 1, &mut woken);
        assert_eq!(fetches.len(), 1, "one renewal: {fetches:?}");
        assert_eq!(request(&mut workers[2], 2, &published, &parked, later + 2, false).0, Flow::Continue);
        token_arrives(&mut main, fetches[0], "up-2", &published, &parked, later + 3, &mut woken);
        // Worker 3 decided a request just before the renewal was published: it asks for the one it missed.
        assert_eq!(request(&mut workers[3], 3, &published, &parked, later + 4, true).0, Flow::Continue);
        assert!(tick(&mut main, &published, &parked, later + 5, &mut woken).is_empty(), "no second renewal");
        assert!(woken.is_empty(), "no request waited: {woken:?}");
        // Every worker now sends the renewed token and asks for nothing.
        for (i, w) in workers.iter_mut().enumerate() {
            let mut out = Recorded::default();
            published.sync(&mut w.router, &mut w.seen);
            let mut stream = w.router.open_stream(100 + i as u32);
            let auth = format!("Bearer {}", testkeys::sign_rs256(&testkeys::claims_now()));
            let headers: Vec<(&[u8], &[u8])> =
                vec![(b":method", b"GET"), (b":path", b"/Patient"), (b"authorization", auth.as_bytes())];
            let flow = w.router.on_request_headers(
                &mut stream,
                headers.iter().copied(),
                true,
                later + 6,
                &crate::crypto::PureRust,
                &mut out,
            );
            assert_eq!(flow, Flow::Continue, "worker {i}");
            assert!(out.0.iter().any(|e| e.contains("Bearer up-2")), "worker {i}: {:?}", out.0);
            assert_eq!(w.router.token_wanted(&stream, later + 6), None, "worker {i}");
        }
        assert!(tick(&mut main, &published, &parked, later + 7, &mut woken).is_empty());
    }

    /// The main thread's fetch of the registry: the result its router installed (and published, if so).
    fn registry_fetch(main: &mut Router, body: &[u8], published: &Published, now: u64) -> bool {
        let result = FetchResult::Answer { status: Some("200"), body_size: body.len() };
        let env = |name: &str| name.ends_with("secret-x").then(|| "s3cret".to_string());
        let fetched = main.on_fetch_result(
            FetchTarget::Registry,
            result,
            now,
            &mut || body.to_vec(),
            &env,
            &mut Recorded::default(),
        );
        if fetched.installed {
            published.publish_installed(main, FetchTarget::Registry);
        }
        fetched.installed
    }

    /// Finding 7 of issue 22: the main thread compiles a registry document once; the workers install that
    /// very map (no compile on a worker, so none in a request hook); a document that did not change is
    /// neither compiled again nor published, so the workers' next requests install nothing.
    #[test]
    fn a_registry_document_is_compiled_once_on_the_main_thread_and_published_only_when_it_changed() {
        let published = Published::default();
        let mut main = crate::upkeep::tests::registry_router();
        let mut workers: Vec<(Router, u64)> = (0..3).map(|_| (crate::upkeep::tests::registry_router(), 0)).collect();
        let doc = crate::upkeep::tests::registry_document("x", "/run/secret-x");
        assert!(registry_fetch(&mut main, &doc, &published, 1_000));
        assert_eq!(published.generation.load(Ordering::Acquire), 1);
        let compiled = Arc::clone(main.tenants.map.as_ref().unwrap());
        for (router, seen) in &mut workers {
            published.sync(router, seen);
            assert!(Arc::ptr_eq(&compiled, router.tenants.map.as_ref().unwrap()), "the main thread's map itself");
        }
        // Refreshed unchanged, again and again: nothing compiled, nothing published, nothing installed.
        for now in [6_000, 11_000, 16_000] {
            assert!(!registry_fetch(&mut main, &doc, &published, now));
            assert!(Arc::ptr_eq(&compiled, main.tenants.map.as_ref().unwrap()), "not compiled again");
        }
        assert_eq!(published.generation.load(Ordering::Acquire), 1, "not published again");
        for (router, seen) in &mut workers {
            assert_eq!(*seen, 1, "a worker's next request finds nothing new (one atomic load)");
            published.sync(router, seen);
        }
        // A changed document: compiled once more, published once, installed by each worker.
        let changed = crate::upkeep::tests::registry_document("y", "/run/secret-x");
        assert!(registry_fetch(&mut main, &changed, &published, 21_000));
        assert_eq!(published.generation.load(Ordering::Acquire), 2);
        for (router, seen) in &mut workers {
            published.sync(router, seen);
            assert!(Arc::ptr_eq(main.tenants.map.as_ref().unwrap(), router.tenants.map.as_ref().unwrap()));
            assert_eq!(router.tenants.map.as_ref().unwrap().get("tenant-x").unwrap().cluster, "y");
        }
    }

    /// What a worker's request hook spends installing a refreshed registry of 1,000 `private_key_jwt`
    /// tenants: compiling the document itself (before issue 22) or installing the main thread's map.
    #[test]
    #[ignore = "a timing probe: cargo test --release --lib --features dynamic-module native::published::tests::probe_registry_install -- --ignored --nocapture"]
    fn probe_registry_install() {
        let pem = testkeys::rsa_private_pem();
        let tenants: serde_json::Map<String, serde_json::Value> = (0..1_000)
            .map(|i| {
                let auth = serde_json::json!({"method": "private_key_jwt", "token_url": "https://login.example/token",
                    "cluster": "epic", "client_id": format!("client-{i}"), "private_key": {"env": "FTR_REGISTRY_RSA_KEY"}});
                (format!("tenant-{i:04}"), serde_json::json!({"cluster": "x", "upstream_auth": auth}))
            })
            .collect();
        let doc = serde_json::json!({ "tenants": tenants }).to_string().into_bytes();
        let env = |name: &str| (name == "FTR_REGISTRY_RSA_KEY").then(|| pem.clone());
        let fetch = |router: &mut Router, now: u64| {
            let result = FetchResult::Answer { status: Some("200"), body_size: doc.len() };
            let fetched =
                router.on_fetch_result(FetchTarget::Registry, result, now, &mut || doc.clone(), &env, &mut Quiet);
            fetched.installed
        };
        let mut main = crate::upkeep::tests::registry_router();
        let t0 = std::time::Instant::now();
        assert!(fetch(&mut main, 1_000));
        let compile = t0.elapsed();
        let t0 = std::time::Instant::now();
        assert!(!fetch(&mut main, 6_000));
        let unchanged = t0.elapsed();
        let published = Published::default();
        published.publish_installed(&main, FetchTarget::Registry);
        let (mut worker, mut seen) = (crate::upkeep::tests::registry_router(), 0);
        let t0 = std::time::Instant::now();
        published.sync(&mut worker, &mut seen);
        let install = t0.elapsed();
        let t0 = std::time::Instant::now();
        published.sync(&mut worker, &mut seen);
        let nothing = t0.elapsed();
        println!("PROBE registry of 1000 private_key_jwt tenants ({} bytes)", doc.len());
        println!("PROBE compile (the main thread; before issue 22 also every worker's request hook): {compile:?}");
        println!("PROBE unchanged refresh on the main thread (hash + secret reads, no compile): {unchanged:?}");
        println!("PROBE a worker installs the compiled map (its request hook, once per change): {install:?}");
        println!("PROBE a worker's request hook when nothing changed: {nothing:?}");
    }

    #[test]
    fn wishes_are_taken_once_per_tenant_naming_the_newest_token_any_asker_had() {
        let mut p = Parked::waking(Some(scheduler(MAIN_SCHEDULER)));
        assert_eq!(p.wish("b", 0), Some(scheduler(MAIN_SCHEDULER)));
        assert_eq!(p.wish("a", 3), None);
        assert_eq!(p.wish("a", 4), None);
        assert_eq!(p.wish("b", 2), None);
        assert_eq!(p.take().1, [("a".to_string(), 4), ("b".to_string(), 2)]);
        assert_eq!(p.wish("a", 4), Some(scheduler(MAIN_SCHEDULER)), "taken: the next wish wakes it again");
        let mut quiet = Parked::default();
        assert_eq!(quiet.wish("a", 0), None, "no scheduler: left to the tick");
    }
}
