//! Per-tenant quotas: a token bucket (rate and burst) and a cap on requests in flight, with FHIR-aware
//! costs (a `batch`/`transaction` Bundle costs one unit per entry; a search may cost more with a large
//! `_count`).
//!
//! The arithmetic is a pure function over a small per-tenant state, [`Bucket`] (tokens, last refill time,
//! requests in flight): [`admit`] and [`release`] take the state and `now` and return the verdict and the
//! new state. Where that state lives is the shell's: a [`QuotaStore`] loads it with a version and stores it
//! back only if the version is unchanged (compare-and-swap), so that every Envoy worker of a process charges
//! one bucket per tenant. The proxy-wasm shell keeps it in Envoy's shared data (`get_shared_data` /
//! `set_shared_data` with their CAS token); the dynamic module (every worker in one process) in
//! [`ProcessStore`], a process-wide map. [`charge`] runs the bounded CAS loop.
//!
//! **Contention** (another worker stored the same tenant's state between our load and our store) is
//! retried [`ADMIT_ATTEMPTS`] times; if every attempt loses, the request is let through *uncharged* (fail
//! open) and counted in `quota.unchecked`. A lost CAS means other workers are making progress on that very
//! bucket, so the tenant is being charged by them; refusing with 429 would punish the tenant for the
//! proxy's own concurrency, not for its traffic. The same holds when the store is unavailable (a host
//! without shared data): the quota then does not apply, and that is logged once and counted. Such an
//! uncharged request takes no in-flight slot either, so it never needs a release.
//!
//! A release (the stream ended) retries until it lands ([`RELEASE_ATTEMPTS`]): each lost CAS means another
//! worker's write succeeded, so the loop always progresses.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use serde::Deserialize;

use crate::effect::{Effect, Effects, Level, Metric, Reply};
use crate::fhir::{classify, Interaction};
use crate::rejection::operation_outcome;
use crate::rejection::Rejection;

/// Fixed point: one unit of cost is this many micro-units in [`Bucket::tokens`].
pub const SCALE: u64 = 1_000_000;
/// Attempts to charge a bucket before letting the request through uncharged (contention).
pub const ADMIT_ATTEMPTS: usize = 8;
/// Attempts to release an in-flight slot (each lost attempt means another worker progressed).
pub const RELEASE_ATTEMPTS: usize = 1_000;
/// How long units leased to a router beyond a request's cost may be used ([`Quotas::admit`]).
pub const LEASE_MS: u64 = 100;
/// Most units leased at once: `min(burst, rate_per_s) / 20`, at most this.
pub const MAX_LEASE: u64 = 63;
/// Smallest `rate_per_s` (one micro-unit a millisecond is the bucket's resolution).
pub const MIN_RATE: f64 = 0.001;
/// Largest `rate_per_s`.
pub const MAX_RATE: f64 = 1_000_000.0;
/// Largest `burst`, `max_in_flight` and `search_count_per_unit`.
pub const MAX_UNITS: u64 = 1_000_000;
/// Prefix of a tenant's key in the store (Envoy's shared data is one namespace per `vm_id`).
pub const KEY_PREFIX: &str = "ftr.quota.";

/// A quota as written (top-level `quota`, the default of every tenant, or `tenants.<id>.quota`, which
/// replaces it for that tenant).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuota {
    /// Units per second added to the bucket.
    #[serde(default)]
    pub rate_per_s: Option<f64>,
    /// The bucket's size: the most units a tenant may spend at once (default: the rate, at least 1).
    #[serde(default)]
    pub burst: Option<u64>,
    /// Most requests of the tenant between admission and the end of their stream.
    #[serde(default)]
    pub max_in_flight: Option<u64>,
    /// A search costs `ceil(_count / search_count_per_unit)` units (at least 1); unset: 1.
    #[serde(default)]
    pub search_count_per_unit: Option<u64>,
    /// `true`: this tenant has no quota (only meaningful under `tenants.<id>`, to exempt it from the default).
    #[serde(default)]
    pub unlimited: bool,
}

/// The token bucket's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Micro-units added per millisecond (`rate_per_s` × 1000).
    pub micro_per_ms: u64,
    /// The bucket's size, in units.
    pub burst: u64,
    /// Units a router takes beyond a request's cost when it charges the shared bucket, to spend locally on
    /// its next requests of the tenant within [`LEASE_MS`] (no host call): `min(burst, rate_per_s) / 20`,
    /// at most [`MAX_LEASE`]; 0 (no lease) for small quotas. With `max_in_flight`, only where in-flight
    /// slots are leased too ([`Quota::slot_lease`], [`Quotas::lease_slots`]).
    pub lease: u64,
}

/// A compiled quota. The refusal bodies are built once here: a refusal costs no formatting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quota {
    pub rate: Option<Rate>,
    pub max_in_flight: Option<u32>,
    /// In-flight slots a router may claim beyond its request's when it charges the shared bucket, to admit
    /// its next requests of the tenant without a host call and to take their slots back on release:
    /// `max_in_flight / 20`, at most [`MAX_LEASE`]; 0 for caps under 20 (each slot then goes through the
    /// shared bucket). Used only where [`Quotas::lease_slots`] (the proxy-wasm shell).
    pub slot_lease: u32,
    pub search_count_per_unit: Option<u64>,
    /// The 429 body when the bucket is short (names the limit).
    rate_body: Box<str>,
    /// The 429 body when `max_in_flight` requests are in flight.
    in_flight_body: Box<str>,
}

/// A tenant's quota setting: none configured here (the default applies), or an explicit choice.
pub type TenantQuota = Option<Option<Arc<Quota>>>;

fn format_rate(rate_per_s: f64) -> String {
    let s = format!("{rate_per_s:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A quota that cannot be used: the field (dotted path) and why. The configuration turns it into its
/// `ConfigError`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaError {
    pub field: String,
    pub message: String,
}

fn error(field: impl Into<String>, message: impl Into<String>) -> QuotaError {
    QuotaError { field: field.into(), message: message.into() }
}

/// Compiles a quota; `field` names it in errors. `Ok(None)`: `unlimited`.
pub fn compile(field: &str, raw: &RawQuota) -> Result<Option<Arc<Quota>>, QuotaError> {
    if raw.unlimited {
        if raw.rate_per_s.is_some() || raw.burst.is_some() || raw.max_in_flight.is_some() {
            return Err(error(format!("{field}.unlimited"), "give either unlimited or limits"));
        }
        return Ok(None);
    }
    let rate = match raw.rate_per_s {
        Some(r) if r.is_finite() && (MIN_RATE..=MAX_RATE).contains(&r) => {
            // At least one micro-unit per ms: 0.001 units per second.
            let micro_per_ms = ((r * 1_000.0).round() as u64).max(1);
            let burst = raw.burst.unwrap_or_else(|| (r.ceil() as u64).max(1));
            if !(1..=MAX_UNITS).contains(&burst) {
                return Err(error(format!("{field}.burst"), "must be between 1 and 1000000"));
            }
            let lease = (((burst as f64).min(r) / 20.0).floor() as u64).min(MAX_LEASE);
            Some((Rate { micro_per_ms, burst, lease }, r))
        }
        Some(_) => return Err(error(format!("{field}.rate_per_s"), "must be a number between 0.001 and 1000000")),
        None if raw.burst.is_some() => {
            return Err(error(format!("{field}.burst"), "needs rate_per_s"));
        }
        None => None,
    };
    let max_in_flight = match raw.max_in_flight {
        Some(n) if (1..=MAX_UNITS).contains(&n) => Some(u32::try_from(n).unwrap_or(u32::MAX)),
        Some(_) => return Err(error(format!("{field}.max_in_flight"), "must be between 1 and 1000000")),
        None => None,
    };
    if rate.is_none() && max_in_flight.is_none() {
        return Err(error(
            field,
            "give rate_per_s (with burst) or max_in_flight, or both (or unlimited: true for a tenant)",
        ));
    }
    let search_count_per_unit = match raw.search_count_per_unit {
        Some(n) if (1..=MAX_UNITS).contains(&n) => Some(n),
        Some(_) => return Err(error(format!("{field}.search_count_per_unit"), "must be between 1 and 1000000")),
        None => None,
    };
    let rate_body = match rate {
        Some((r, per_s)) => operation_outcome(
            "throttled",
            &format!(
                "Tenant quota exceeded: rate {}/s, burst {}. Retry after the time in Retry-After.",
                format_rate(per_s),
                r.burst
            ),
        ),
        None => String::new(),
    };
    let in_flight_body = match max_in_flight {
        Some(n) => operation_outcome(
            "throttled",
            &format!("Tenant quota exceeded: at most {n} requests in flight. Retry after the time in Retry-After."),
        ),
        None => String::new(),
    };
    Ok(Some(Arc::new(Quota {
        rate: rate.map(|(r, _)| r),
        max_in_flight,
        slot_lease: max_in_flight.map_or(0, |n| (n / 20).min(MAX_LEASE as u32)),
        search_count_per_unit,
        rate_body: rate_body.into(),
        in_flight_body: in_flight_body.into(),
    })))
}

/// A tenant's state: tokens (micro-units), when they were last refilled (ms since the epoch), and how many
/// of its requests are in flight. Stored as [`Bucket::ENCODED_LEN`] little-endian bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub tokens: u64,
    pub last_ms: u64,
    pub in_flight: u32,
}

impl Bucket {
    /// A tenant's bucket before its first request: full, nothing in flight.
    pub fn fresh(quota: &Quota, now_ms: u64) -> Self {
        Self { tokens: quota.rate.map_or(0, |r| r.burst.saturating_mul(SCALE)), last_ms: now_ms, in_flight: 0 }
    }

    /// The length of [`Bucket::encode`]'s bytes.
    pub const ENCODED_LEN: usize = 20;

    /// The stored form.
    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        for (dst, src) in out.iter_mut().zip(
            self.tokens.to_le_bytes().into_iter().chain(self.last_ms.to_le_bytes()).chain(self.in_flight.to_le_bytes()),
        ) {
            *dst = src;
        }
        out
    }

    /// Reads the stored form; `None` for anything else (the state is then taken as fresh).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let tokens = u64::from_le_bytes(bytes.get(0..8)?.try_into().ok()?);
        let last_ms = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
        let in_flight = u32::from_le_bytes(bytes.get(16..20)?.try_into().ok()?);
        (bytes.len() == Self::ENCODED_LEN).then_some(Self { tokens, last_ms, in_flight })
    }
}

/// What [`admit`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Admitted,
    /// The bucket is short of the cost; enough will be there in `retry_after_s` (at least 1; a cost above
    /// the burst never fits, and gets the time to a full bucket).
    RateLimited {
        retry_after_s: u64,
    },
    /// `max_in_flight` requests are in flight.
    InFlightFull,
}

/// Refills `state` (or a full bucket, for a tenant seen first) to `now_ms` and charges `cost` units if
/// they are there and an in-flight slot is free. Returns the verdict and the state to store (refilled, and
/// charged when admitted). Pure: the same inputs give the same answer.
pub fn admit(quota: &Quota, state: Option<Bucket>, cost: u64, now_ms: u64) -> (Verdict, Bucket) {
    let mut b = state.unwrap_or_else(|| Bucket::fresh(quota, now_ms));
    if let Some(rate) = quota.rate {
        let full = rate.burst.saturating_mul(SCALE);
        // Another worker's clock may be a little ahead: time never runs backwards for the bucket.
        let elapsed = now_ms.saturating_sub(b.last_ms);
        b.tokens = b.tokens.saturating_add(elapsed.saturating_mul(rate.micro_per_ms)).min(full);
        b.last_ms = b.last_ms.max(now_ms);
    } else {
        b.last_ms = b.last_ms.max(now_ms);
    }
    if quota.max_in_flight.is_some_and(|max| b.in_flight >= max) {
        return (Verdict::InFlightFull, b);
    }
    if let Some(rate) = quota.rate {
        let need = cost.max(1).saturating_mul(SCALE);
        if b.tokens < need {
            let target = need.min(rate.burst.saturating_mul(SCALE));
            let short = target.saturating_sub(b.tokens).max(1);
            let wait_ms = short.div_ceil(rate.micro_per_ms);
            return (Verdict::RateLimited { retry_after_s: wait_ms.div_ceil(1_000).max(1) }, b);
        }
        b.tokens -= need;
    }
    if quota.max_in_flight.is_some() {
        b.in_flight = b.in_flight.saturating_add(1);
    }
    (Verdict::Admitted, b)
}

/// Takes up to `units` more whole units from an admitted bucket (a lease): how many, and the bucket after.
pub fn lease(b: Bucket, units: u64) -> (u64, Bucket) {
    let n = units.min(b.tokens / SCALE);
    (n, Bucket { tokens: b.tokens - n * SCALE, ..b })
}

/// The state after one admitted request of a quota with `max_in_flight` ended.
pub fn release(state: Option<Bucket>) -> Option<Bucket> {
    release_n(state, 1)
}

/// The state after `n` in-flight slots were given back.
pub fn release_n(state: Option<Bucket>, n: u32) -> Option<Bucket> {
    let mut b = state?;
    b.in_flight = b.in_flight.saturating_sub(n);
    Some(b)
}

/// Claims up to `slots` more in-flight slots of an admitted bucket (a lease), never beyond `max`: how many,
/// and the bucket after.
pub fn lease_slots(b: Bucket, slots: u32, max: u32) -> (u32, Bucket) {
    let n = slots.min(max.saturating_sub(b.in_flight));
    (n, Bucket { in_flight: b.in_flight + n, ..b })
}

/// Why a store could not do what was asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// Another writer changed the state since it was loaded.
    Conflict,
    /// The store cannot be used (the host has no shared data).
    Unavailable,
}

/// Where the buckets live: loaded with a version, stored only if that version is still current.
pub trait QuotaStore {
    /// The state under `key` (`None`: none yet) and its version.
    fn load(&self, key: &str) -> Result<(Option<Bucket>, u32), StoreError>;
    /// Stores `bucket` under `key` if its version is still `version` (a key never stored has version 0).
    fn store(&self, key: &str, bucket: &Bucket, version: u32) -> Result<(), StoreError>;
}

/// What became of a charge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Charge {
    /// Charged; `in_flight`: it holds an in-flight slot, released when its stream ends; `leased`: units
    /// taken beyond the cost for the caller's next requests (see [`Rate::lease`]); `slots`: in-flight slots
    /// claimed beyond its own (see [`Quota::slot_lease`]).
    Admitted { in_flight: bool, leased: u64, slots: u32 },
    /// Refused; the bucket as the refusal found it (refilled to now).
    Refused(Verdict, Bucket),
    /// Let through uncharged: every attempt lost to another worker, or the store is unavailable.
    Unchecked(StoreError),
}

/// Charges `cost` to the bucket under `key` at `now_ms`, through the store's compare-and-swap, leasing what
/// a router that does not lease slots leases ([`lease_of`]).
pub fn charge(store: &dyn QuotaStore, key: &str, quota: &Quota, cost: u64, now_ms: u64) -> Charge {
    charge_leasing(store, key, quota, cost, now_ms, lease_of(quota, false))
}

/// What a charge of `quota` leases beyond the request's own (units, in-flight slots), for a router that
/// leases slots (`slots`) or not.
pub fn lease_of(quota: &Quota, slots: bool) -> (u64, u32) {
    let units = quota.rate.map_or(0, |r| r.lease);
    match quota.max_in_flight {
        None => (units, 0),
        Some(_) if slots && quota.slot_lease > 0 => (units, quota.slot_lease),
        // Every admission takes a slot from the shared bucket: units leased could not be spent alone.
        Some(_) => (0, 0),
    }
}

/// [`charge`], leasing up to `wanted` units and in-flight slots beyond the request's own.
pub fn charge_leasing(
    store: &dyn QuotaStore,
    key: &str,
    quota: &Quota,
    cost: u64,
    now_ms: u64,
    wanted: (u64, u32),
) -> Charge {
    for _ in 0..ADMIT_ATTEMPTS {
        let (state, version) = match store.load(key) {
            Ok(loaded) => loaded,
            Err(e) => return Charge::Unchecked(e),
        };
        let (verdict, next) = admit(quota, state, cost, now_ms);
        if verdict != Verdict::Admitted {
            // Nothing to store: a refusal leaves the bucket as it was (its refill is recomputed next time).
            return Charge::Refused(verdict, next);
        }
        let (leased, next) = lease(next, wanted.0);
        let (slots, next) = match quota.max_in_flight {
            Some(max) => lease_slots(next, wanted.1, max),
            None => (0, next),
        };
        match store.store(key, &next, version) {
            Ok(()) => return Charge::Admitted { in_flight: quota.max_in_flight.is_some(), leased, slots },
            Err(StoreError::Conflict) => continue,
            Err(e) => return Charge::Unchecked(e),
        }
    }
    Charge::Unchecked(StoreError::Conflict)
}

/// Stores a fresh bucket under `key` unless the store has one; `Ok(true)` if it stored it.
///
/// Envoy's shared data cannot create a key only if it is absent (a write with CAS token 0 is
/// unconditional). Left to the first request, the first write could race: two workers that both read
/// "absent" both store, the later one overwriting the other's charge (and in-flight slot). So the shells
/// create every known tenant's bucket before its requests can arrive: the proxy-wasm root context at
/// configuration (Envoy configures a canary VM on its main thread before any worker's VM exists) and at each registry
/// install (for the tenants new to it). [`charge`] still creates a missing bucket as a last resort.
pub fn ensure(store: &dyn QuotaStore, key: &str, quota: &Quota, now_ms: u64) -> Result<bool, StoreError> {
    match store.load(key)? {
        (Some(_), _) => Ok(false),
        (None, version) => store.store(key, &Bucket::fresh(quota, now_ms), version).map(|()| true),
    }
}

/// Gives back the in-flight slot of an admitted request; `false` if it could not be stored.
pub fn give_back(store: &dyn QuotaStore, key: &str) -> bool {
    give_back_n(store, key, 1)
}

/// Gives back `n` in-flight slots; `false` if it could not be stored.
pub fn give_back_n(store: &dyn QuotaStore, key: &str, n: u32) -> bool {
    for _ in 0..RELEASE_ATTEMPTS {
        let Ok((state, version)) = store.load(key) else { return false };
        let Some(next) = release_n(state, n) else { return true };
        match store.store(key, &next, version) {
            Ok(()) => return true,
            Err(StoreError::Conflict) => continue,
            Err(StoreError::Unavailable) => return false,
        }
    }
    false
}

/// The store key of a tenant's bucket.
pub fn key(tenant: &str) -> String {
    let mut k = String::with_capacity(KEY_PREFIX.len() + tenant.len());
    k.push_str(KEY_PREFIX);
    k.push_str(tenant);
    k
}

/// What a request costs: 1, or for a search with `_count` and `search_count_per_unit`,
/// `ceil(_count / search_count_per_unit)` (at least 1). `_count` is read wherever the search has it: its
/// query, and a `POST _search`'s `form` body (percent-decoded as a server reads it; the largest if repeated).
pub fn request_cost(quota: &Quota, method: &str, path: &str, form: Option<&[u8]>) -> u64 {
    let Some(per_unit) = quota.search_count_per_unit else { return 1 };
    if !path.contains('?') && form.is_none() {
        return 1;
    }
    if !classify(method, path).is_some_and(|c| c.interaction == Interaction::Search) {
        return 1;
    }
    crate::reach::search_count(path, form).unwrap_or(0).div_ceil(per_unit).max(1)
}

/// What a Bundle costs: the sum of its entries' costs (each as [`request_cost`] says, so a search entry's
/// `_count` counts), at least 1; the body was judged well-formed already.
pub fn bundle_cost(quota: &Quota, body: &[u8]) -> u64 {
    #[derive(Deserialize)]
    struct Entry {
        #[serde(default)]
        request: Option<EntryRequest>,
    }
    #[derive(Deserialize)]
    struct EntryRequest {
        #[serde(default)]
        method: Option<String>,
        #[serde(default)]
        url: Option<String>,
    }
    #[derive(Deserialize)]
    struct Entries {
        #[serde(default)]
        entry: Option<Vec<Entry>>,
    }
    let Some(entries) = serde_json::from_slice::<Entries>(body).ok().and_then(|b| b.entry) else { return 1 };
    let cost = entries.iter().fold(0u64, |sum, e| {
        let (method, url) = match &e.request {
            Some(EntryRequest { method: Some(m), url: Some(u) }) => (m.as_str(), u.as_str()),
            _ => ("", ""),
        };
        let path = if url.starts_with('/') { Cow::Borrowed(url) } else { Cow::Owned(format!("/{url}")) };
        sum.saturating_add(request_cost(quota, method, &path, None))
    });
    cost.max(1)
}

/// A request costing more than the quota's `burst` can never be admitted (the bucket never holds more): it
/// is refused at once with 400 and an `OperationOutcome` whose code is `too-costly`, without `Retry-After`,
/// so that a client that obeys `Retry-After` does not retry it forever. Counted as a quota refusal of
/// `tenant`. `Some(reason)` (for the audit line) when it was refused.
pub fn never_fits(quota: &Quota, tenant: &str, cost: u64, out: &mut dyn Effects) -> Option<&'static str> {
    let burst = quota.rate.as_ref()?.burst;
    if cost <= burst {
        return None;
    }
    out.push(Effect::Count(Metric::TenantQuota(tenant, false)));
    out.push(Effect::Count(Metric::Rejected(Rejection::QuotaRate)));
    let diagnostics = format!(
        "This request costs {cost} quota units, more than this tenant's burst of {burst}: it can never be \
         admitted. Ask for fewer results (_count) or send fewer Bundle entries."
    );
    let body = operation_outcome("too-costly", &diagnostics);
    let headers = [("content-type", "application/fhir+json"), ("cache-control", "no-store")];
    out.push(Effect::Reply(Reply { status: 400, headers: &headers, body: body.as_bytes() }));
    Some("quota_too_costly")
}

/// The 429 answer of a refusal: its body (naming the limit) and its `Retry-After` in seconds.
pub fn refusal(quota: &Quota, verdict: Verdict) -> (&str, u64, &'static str) {
    match verdict {
        Verdict::RateLimited { retry_after_s } => (&quota.rate_body, retry_after_s, "quota_rate"),
        // A slot frees when a request ends: in about the time a request takes.
        _ => (&quota.in_flight_body, 1, "quota_in_flight"),
    }
}

/// The process-wide store: every worker of a dynamic module (one process) charges the same buckets. One
/// map behind a mutex, held for a lookup and a copy; versions count the writes of each key.
#[derive(Debug, Default)]
pub struct ProcessStore {
    buckets: Mutex<HashMap<Box<str>, (Bucket, u32)>>,
}

impl ProcessStore {
    /// The process's store.
    pub fn global() -> &'static ProcessStore {
        static GLOBAL: OnceLock<ProcessStore> = OnceLock::new();
        GLOBAL.get_or_init(ProcessStore::default)
    }
}

impl QuotaStore for ProcessStore {
    fn load(&self, key: &str) -> Result<(Option<Bucket>, u32), StoreError> {
        let map = self.buckets.lock().map_err(|_| StoreError::Unavailable)?;
        Ok(map.get(key).map_or((None, 0), |(b, v)| (Some(*b), *v)))
    }

    fn store(&self, key: &str, bucket: &Bucket, version: u32) -> Result<(), StoreError> {
        let mut map = self.buckets.lock().map_err(|_| StoreError::Unavailable)?;
        match map.get_mut(key) {
            Some((b, v)) if *v == version => {
                *b = *bucket;
                *v = v.wrapping_add(1).max(1);
                Ok(())
            }
            Some(_) => Err(StoreError::Conflict),
            None if version == 0 => {
                map.insert(key.into(), (*bucket, 1));
                Ok(())
            }
            None => Err(StoreError::Conflict),
        }
    }
}

impl QuotaStore for &'static ProcessStore {
    fn load(&self, key: &str) -> Result<(Option<Bucket>, u32), StoreError> {
        (**self).load(key)
    }

    fn store(&self, key: &str, bucket: &Bucket, version: u32) -> Result<(), StoreError> {
        (**self).store(key, bucket, version)
    }
}

/// The router's quota state: the store its buckets live in, the units it leased per tenant, and whether
/// an unusable store was logged.
pub struct Quotas {
    pub store: Box<dyn QuotaStore>,
    /// Per tenant: units taken from its shared bucket beyond a request's cost, and until when (ms) they may
    /// be spent here. Unspent units expire: the tenant is then served a little less, never more.
    leases: HashMap<String, (u64, u64)>,
    /// Per tenant refused for its rate: its bucket as that refusal found it. The shared bucket holds no
    /// more than this one refilled since (other workers only take from it, and time refills both alike),
    /// so a request this one cannot pay for yet is refused here without a host call: a flood over the
    /// quota costs a map lookup per request, not a store round trip.
    short: HashMap<String, Bucket>,
    /// Per tenant whose in-flight slots this router leases: slots it claimed from the shared bucket and holds
    /// free, and when it last admitted a request of the tenant (ms). Freed slots come back here; beyond two
    /// leases' worth, and when unused for [`LEASE_MS`] (at [`Quotas::expire`]), they go back to the bucket.
    slots: HashMap<String, Slots>,
    /// Lease in-flight slots ([`Quota::slot_lease`]): the proxy-wasm shell, where each shared-data round
    /// trip costs about a microsecond; the dynamic module's process store is cheaper than the false refusals
    /// that slots idle in one worker could cause in another.
    pub lease_slots: bool,
    pub(crate) warned: bool,
}

/// In-flight slots a router holds free for a tenant ([`Quotas::slots`]).
#[derive(Clone, Copy, Debug, Default)]
struct Slots {
    free: u32,
    used_ms: u64,
    /// The quota's [`Quota::slot_lease`] when the slots were claimed.
    lease: u32,
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas").finish_non_exhaustive()
    }
}

impl Default for Quotas {
    /// The process-wide store (the dynamic module's; the proxy-wasm shell installs its shared data).
    fn default() -> Self {
        Self::new(Box::new(ProcessStore::global()))
    }
}

/// The quota that applies to a tenant: its own (`own`, from its settings), or the configuration's
/// `default` (`None`: no quota).
pub fn effective<'a>(own: Option<&'a TenantQuota>, default: Option<&'a Arc<Quota>>) -> Option<&'a Arc<Quota>> {
    match own {
        Some(Some(own)) => own.as_ref(),
        _ => default,
    }
}

impl Quotas {
    /// Quotas kept in `store`.
    pub fn new(store: Box<dyn QuotaStore>) -> Self {
        Self {
            store,
            leases: HashMap::new(),
            short: HashMap::new(),
            slots: HashMap::new(),
            lease_slots: false,
            warned: false,
        }
    }

    /// Charges `cost` units to `tenant` under `quota`, pushing its counts. `Ok(Some(key))`: admitted holding
    /// an in-flight slot, to give back under `key` when the stream ends ([`Quotas::release`]); `Ok(None)`:
    /// admitted holding none; `Err`: refused (the caller answers with [`refusal`]).
    pub fn admit(
        &mut self,
        quota: &Quota,
        tenant: &str,
        cost: u64,
        now_ms: u64,
        out: &mut dyn Effects,
    ) -> Result<Option<String>, Verdict> {
        if self.admit_locally(quota, tenant, cost, now_ms) {
            // Units (and a slot) this router took from the shared bucket moments ago: no host call.
            out.push(Effect::Count(Metric::TenantQuota(tenant, true)));
            return Ok(quota.max_in_flight.map(|_| key(tenant)));
        }
        if let Some(bucket) = self.short.get(tenant) {
            // The rate alone is judged here (in-flight slots may have been given back elsewhere).
            match admit(quota, Some(Bucket { in_flight: 0, ..*bucket }), cost, now_ms).0 {
                verdict @ Verdict::RateLimited { .. } => return Err(refused(tenant, verdict, out)),
                _ => {
                    self.short.remove(tenant);
                }
            }
        }
        let key = key(tenant);
        let lease = lease_of(quota, self.lease_slots);
        let mut wanted = lease;
        if let Some(pool) = self.slots.get(tenant) {
            // Short of units, not of slots: claim only what tops the free slots up to one lease.
            wanted.1 = wanted.1.saturating_sub(pool.free);
        }
        match charge_leasing(&*self.store, &key, quota, cost, now_ms, wanted) {
            Charge::Admitted { in_flight, leased, slots } => {
                out.push(Effect::Count(Metric::TenantQuota(tenant, true)));
                let until = now_ms.saturating_add(LEASE_MS);
                match self.leases.get_mut(tenant) {
                    // Units still unspent and unexpired stay, with the new ones, for another LEASE_MS: they
                    // left the shared bucket already, so spending them later only ever admits less.
                    Some((units, expiry)) if *expiry > now_ms => (*units, *expiry) = (*units + leased, until),
                    Some(lease) if leased > 0 => *lease = (leased, until),
                    Some(_) => {
                        self.leases.remove(tenant);
                    }
                    None if leased > 0 => {
                        self.leases.insert(tenant.to_string(), (leased, until));
                    }
                    None => {}
                }
                if lease.1 > 0 {
                    let pool = self.slots.entry(tenant.to_string()).or_default();
                    pool.free += slots;
                    pool.used_ms = now_ms;
                    pool.lease = lease.1;
                }
                Ok(in_flight.then_some(key))
            }
            Charge::Refused(verdict, bucket) => {
                if matches!(verdict, Verdict::RateLimited { .. }) {
                    self.short.insert(tenant.to_string(), bucket);
                }
                Err(refused(tenant, verdict, out))
            }
            Charge::Unchecked(why) => {
                out.push(Effect::Count(Metric::TenantQuota(tenant, true)));
                out.push(Effect::Count(Metric::QuotaUnchecked));
                if why == StoreError::Unavailable && !std::mem::replace(&mut self.warned, true) {
                    out.push(Effect::Log(Level::Warn, UNAVAILABLE));
                }
                Ok(None)
            }
        }
    }

    /// Creates the buckets of `tenants` (id and quota) that the store does not hold yet ([`ensure`]).
    /// Returns how many it created; an unavailable store is warned about once (as in [`Quotas::admit`]).
    pub fn prepare<'a>(
        &mut self,
        tenants: impl Iterator<Item = (&'a str, &'a Quota)>,
        now_ms: u64,
        out: &mut dyn Effects,
    ) -> usize {
        let mut created = 0;
        for (tenant, quota) in tenants {
            match ensure(&*self.store, &key(tenant), quota, now_ms) {
                Ok(stored) => created += usize::from(stored),
                // Another worker created it between our load and our store: it exists.
                Err(StoreError::Conflict) => {}
                Err(StoreError::Unavailable) => {
                    if !std::mem::replace(&mut self.warned, true) {
                        out.push(Effect::Log(Level::Warn, UNAVAILABLE));
                    }
                    break;
                }
            }
        }
        created
    }

    /// Admits a request from what this router leased (units for its cost, a free slot), if it has both
    /// (what the quota needs of them), taking them.
    fn admit_locally(&mut self, quota: &Quota, tenant: &str, cost: u64, now_ms: u64) -> bool {
        let units = match quota.rate {
            None => None,
            Some(_) => match self.leases.get_mut(tenant) {
                Some((units, until)) if *units >= cost && now_ms < *until => Some(units),
                _ => return false,
            },
        };
        let slot = match quota.max_in_flight {
            None => None,
            Some(_) => match self.slots.get_mut(tenant) {
                Some(pool) if pool.free > 0 => Some(pool),
                _ => return false,
            },
        };
        if let Some(units) = units {
            *units -= cost;
        }
        if let Some(pool) = slot {
            pool.free -= 1;
            pool.used_ms = now_ms;
        }
        true
    }

    /// Gives back the in-flight slot held under `key`: to this router's free slots for the tenant if it
    /// leases them (returning the excess beyond two leases to the shared bucket), else to the bucket.
    pub fn release(&mut self, key: &str) {
        let tenant = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
        if let Some(pool) = self.slots.get_mut(tenant) {
            pool.free += 1;
            if pool.free > pool.lease.saturating_mul(2) {
                let excess = pool.free - pool.lease;
                pool.free = pool.lease;
                let _ = give_back_n(&*self.store, key, excess);
            }
            return;
        }
        let _ = give_back(&*self.store, key);
    }

    /// Gives back the free slots of tenants this router has admitted none of for [`LEASE_MS`] (a tick).
    pub fn expire(&mut self, now_ms: u64) {
        if self.slots.is_empty() {
            return;
        }
        let store = &*self.store;
        self.slots.retain(|tenant, pool| {
            if now_ms.saturating_sub(pool.used_ms) < LEASE_MS {
                return true;
            }
            if pool.free > 0 {
                let _ = give_back_n(store, &key(tenant), pool.free);
            }
            false
        });
    }
}

/// Logged once when the store cannot be used.
const UNAVAILABLE: &str = "quota: the host's shared store is unavailable; requests pass uncharged (quota.unchecked)";

/// Counts a refusal of `tenant`'s request; returns its verdict.
fn refused(tenant: &str, verdict: Verdict, out: &mut dyn Effects) -> Verdict {
    out.push(Effect::Count(Metric::TenantQuota(tenant, false)));
    let rejection = match verdict {
        Verdict::InFlightFull => Rejection::QuotaInFlight,
        _ => Rejection::QuotaRate,
    };
    out.push(Effect::Count(Metric::Rejected(rejection)));
    verdict
}

/// Pushes the 429 of a refusal: `Retry-After`, and the `OperationOutcome` naming the limit.
pub fn reply(quota: &Quota, verdict: Verdict, out: &mut dyn Effects) -> &'static str {
    let (body, retry_after_s, reason) = refusal(quota, verdict);
    let retry_after = retry_after_s.to_string();
    let headers = [
        ("content-type", "application/fhir+json"),
        ("cache-control", "no-store"),
        ("retry-after", retry_after.as_str()),
    ];
    out.push(Effect::Reply(Reply { status: 429, headers: &headers, body: body.as_bytes() }));
    reason
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    fn quota(v: serde_json::Value) -> Arc<Quota> {
        let raw: RawQuota = serde_json::from_value(v).unwrap();
        compile("quota", &raw).unwrap().unwrap()
    }

    const T0: u64 = 1_800_000_000_000;

    #[test]
    fn a_full_bucket_admits_the_burst_then_refuses_until_refilled() {
        let q = quota(serde_json::json!({"rate_per_s": 2, "burst": 3}));
        let mut state = None;
        for _ in 0..3 {
            let (v, next) = admit(&q, state, 1, T0);
            assert_eq!(v, Verdict::Admitted);
            state = Some(next);
        }
        let (v, _) = admit(&q, state, 1, T0);
        assert_eq!(v, Verdict::RateLimited { retry_after_s: 1 });
        // 2/s: one unit after 500 ms.
        let (v, _) = admit(&q, state, 1, T0 + 499);
        assert!(matches!(v, Verdict::RateLimited { .. }));
        let (v, next) = admit(&q, state, 1, T0 + 500);
        assert_eq!(v, Verdict::Admitted);
        assert_eq!(next.tokens, 0);
    }

    #[test]
    fn retry_after_is_the_seconds_until_enough_tokens_rounded_up() {
        let q = quota(serde_json::json!({"rate_per_s": 0.5, "burst": 10}));
        let empty = Bucket { tokens: 0, last_ms: T0, in_flight: 0 };
        assert_eq!(admit(&q, Some(empty), 1, T0).0, Verdict::RateLimited { retry_after_s: 2 });
        assert_eq!(admit(&q, Some(empty), 3, T0).0, Verdict::RateLimited { retry_after_s: 6 });
        // More than the burst never fits: the time to a full bucket.
        assert_eq!(admit(&q, Some(empty), 50, T0).0, Verdict::RateLimited { retry_after_s: 20 });
    }

    #[test]
    fn the_bucket_never_holds_more_than_the_burst_and_time_never_runs_back() {
        let q = quota(serde_json::json!({"rate_per_s": 100, "burst": 5}));
        let (_, b) = admit(&q, Some(Bucket { tokens: 0, last_ms: T0, in_flight: 0 }), 1, T0 + 3_600_000);
        assert_eq!(b.tokens, 4 * SCALE);
        // A worker whose clock is behind: no refill, and last_ms does not move back.
        let (v, b2) = admit(&q, Some(b), 1, T0);
        assert_eq!(v, Verdict::Admitted);
        assert_eq!(b2.last_ms, T0 + 3_600_000);
    }

    #[test]
    fn the_in_flight_cap_refuses_the_next_until_one_is_released() {
        let q = quota(serde_json::json!({"max_in_flight": 2}));
        let (_, b) = admit(&q, None, 1, T0);
        let (_, b) = admit(&q, Some(b), 1, T0);
        assert_eq!(b.in_flight, 2);
        assert_eq!(admit(&q, Some(b), 1, T0).0, Verdict::InFlightFull);
        let b = release(Some(b)).unwrap();
        assert_eq!(admit(&q, Some(b), 1, T0).0, Verdict::Admitted);
        assert_eq!(release(Some(Bucket::default())).unwrap().in_flight, 0, "never below zero");
    }

    #[test]
    fn buckets_round_trip_through_their_bytes_and_garbage_reads_as_fresh() {
        let b = Bucket { tokens: 123_456_789, last_ms: T0, in_flight: 7 };
        assert_eq!(Bucket::decode(&b.encode()), Some(b));
        assert_eq!(Bucket::decode(b"short"), None);
        assert_eq!(Bucket::decode(&[0u8; 21]), None);
    }

    #[test]
    fn costs_follow_the_fhir_request() {
        let q = quota(serde_json::json!({"rate_per_s": 10, "search_count_per_unit": 50}));
        assert_eq!(request_cost(&q, "GET", "/Patient", None), 1);
        assert_eq!(request_cost(&q, "GET", "/Patient?_count=50", None), 1);
        assert_eq!(request_cost(&q, "GET", "/Patient?family=x&_count=51", None), 2);
        assert_eq!(request_cost(&q, "GET", "/Observation?_count=1000", None), 20);
        assert_eq!(request_cost(&q, "GET", "/Patient/1?_count=1000", None), 1, "a read is not a search");
        assert_eq!(request_cost(&q, "GET", "/Patient?_count=abc", None), 1);
        let plain = quota(serde_json::json!({"rate_per_s": 10}));
        assert_eq!(request_cost(&plain, "GET", "/Observation?_count=1000", None), 1);
        let bundle = serde_json::json!({"resourceType": "Bundle", "type": "batch", "entry": [{}, {}, {}]});
        assert_eq!(bundle_cost(&q, bundle.to_string().as_bytes()), 3);
        assert_eq!(bundle_cost(&q, br#"{"resourceType":"Bundle","type":"batch"}"#), 1);
    }

    #[test]
    fn count_is_costed_wherever_the_search_has_it() {
        let q = quota(serde_json::json!({"rate_per_s": 10, "search_count_per_unit": 50}));
        assert_eq!(request_cost(&q, "POST", "/Patient/_search", Some(b"name=x&_count=500")), 10);
        assert_eq!(request_cost(&q, "POST", "/Patient/_search?_count=100", Some(b"name=x")), 2);
        assert_eq!(request_cost(&q, "POST", "/Patient/_search", Some(b"%5Fcount=200")), 4, "decoded");
        assert_eq!(request_cost(&q, "GET", "/Patient?_count=10&_count=1000", None), 20, "the largest");
        assert_eq!(request_cost(&q, "HEAD", "/Patient?_count=100", None), 2);
        let bundle = serde_json::json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": "Observation?_count=500"}},
            {"request": {"method": "GET", "url": "/Patient?_count=100"}},
            {"request": {"method": "GET", "url": "Patient/1"}}
        ]});
        assert_eq!(bundle_cost(&q, bundle.to_string().as_bytes()), 13);
    }

    #[test]
    fn a_cost_above_the_burst_is_refused_as_never_admissible() {
        let q = quota(serde_json::json!({"rate_per_s": 10, "burst": 5}));
        let mut out = crate::effect::Recorded::default();
        assert_eq!(never_fits(&q, "t", 5, &mut out), None);
        assert!(out.0.is_empty());
        assert_eq!(never_fits(&q, "t", 6, &mut out), Some("quota_too_costly"));
        let reply = out.0.iter().find(|e| e.starts_with("Reply")).unwrap();
        assert!(reply.starts_with("Reply(400") && !reply.contains("retry-after"), "{reply}");
        assert!(reply.contains("too-costly") && reply.contains("costs 6") && reply.contains("burst of 5"), "{reply}");
        assert!(out.0.iter().any(|e| e.contains("TenantQuota")), "{out:?}");
        let in_flight_only = quota(serde_json::json!({"max_in_flight": 2}));
        assert_eq!(never_fits(&in_flight_only, "t", 1000, &mut out), None, "no rate: no burst");
    }

    #[test]
    fn bad_quotas_are_named() {
        for (v, field) in [
            (serde_json::json!({}), "quota"),
            (serde_json::json!({"rate_per_s": 0}), "quota.rate_per_s"),
            (serde_json::json!({"rate_per_s": -1}), "quota.rate_per_s"),
            (serde_json::json!({"rate_per_s": 0.0001}), "quota.rate_per_s"),
            (serde_json::json!({"rate_per_s": 1, "burst": 0}), "quota.burst"),
            (serde_json::json!({"burst": 5}), "quota.burst"),
            (serde_json::json!({"max_in_flight": 0}), "quota.max_in_flight"),
            (serde_json::json!({"rate_per_s": 1, "search_count_per_unit": 0}), "quota.search_count_per_unit"),
            (serde_json::json!({"unlimited": true, "rate_per_s": 1}), "quota.unlimited"),
        ] {
            let raw: RawQuota = serde_json::from_value(v.clone()).unwrap();
            assert_eq!(compile("quota", &raw).unwrap_err().field, field, "{v}");
        }
        let raw: RawQuota = serde_json::from_value(serde_json::json!({"unlimited": true})).unwrap();
        assert_eq!(compile("quota", &raw).unwrap(), None);
    }

    #[test]
    fn the_refusal_names_the_limit_and_no_request_data() {
        let q = quota(serde_json::json!({"rate_per_s": 50, "burst": 100, "max_in_flight": 8}));
        let (body, retry, reason) = refusal(&q, Verdict::RateLimited { retry_after_s: 3 });
        assert!(body.contains("rate 50/s, burst 100") && body.contains("\"throttled\""), "{body}");
        assert_eq!((retry, reason), (3, "quota_rate"));
        let (body, _, reason) = refusal(&q, Verdict::InFlightFull);
        assert!(body.contains("at most 8 requests in flight"), "{body}");
        assert_eq!(reason, "quota_in_flight");
        let q = quota(serde_json::json!({"rate_per_s": 0.25}));
        assert!(refusal(&q, Verdict::RateLimited { retry_after_s: 1 }).0.contains("rate 0.25/s, burst 1"));
    }

    /// A store whose next `conflicts` stores lose, as if another worker wrote first.
    #[derive(Default)]
    struct Contended {
        inner: ProcessStore,
        conflicts: Cell<usize>,
        stores: RefCell<usize>,
    }

    impl QuotaStore for Contended {
        fn load(&self, key: &str) -> Result<(Option<Bucket>, u32), StoreError> {
            self.inner.load(key)
        }
        fn store(&self, key: &str, bucket: &Bucket, version: u32) -> Result<(), StoreError> {
            *self.stores.borrow_mut() += 1;
            if self.conflicts.get() > 0 {
                self.conflicts.set(self.conflicts.get() - 1);
                return Err(StoreError::Conflict);
            }
            self.inner.store(key, bucket, version)
        }
    }

    #[test]
    fn a_lost_compare_and_swap_is_retried_and_endless_contention_fails_open() {
        let q = quota(serde_json::json!({"rate_per_s": 1, "burst": 2, "max_in_flight": 5}));
        let store = Contended::default();
        store.conflicts.set(3);
        assert_eq!(charge(&store, "k", &q, 1, T0), Charge::Admitted { in_flight: true, leased: 0, slots: 0 });
        assert_eq!(*store.stores.borrow(), 4);
        assert_eq!(store.load("k").unwrap().0.unwrap().tokens, SCALE);
        store.conflicts.set(ADMIT_ATTEMPTS);
        assert_eq!(charge(&store, "k", &q, 1, T0), Charge::Unchecked(StoreError::Conflict));
        assert_eq!(store.load("k").unwrap().0.unwrap().in_flight, 1, "an uncharged request holds no slot");
        store.conflicts.set(10);
        assert!(give_back(&store, "k"));
        assert_eq!(store.load("k").unwrap().0.unwrap().in_flight, 0);
    }

    #[test]
    fn a_large_rate_quota_leases_units_to_the_router_which_spends_them_without_the_store() {
        let q = quota(serde_json::json!({"rate_per_s": 1000, "burst": 200}));
        assert_eq!(q.rate.unwrap().lease, 10, "min(200, 1000) / 20");
        assert_eq!(quota(serde_json::json!({"rate_per_s": 2, "burst": 3})).rate.unwrap().lease, 0);
        let capped = quota(serde_json::json!({"rate_per_s": 1000, "burst": 200, "max_in_flight": 5}));
        assert_eq!(capped.slot_lease, 0, "a cap under 20 leases no slots");
        let mut quotas = Quotas::new(Box::new(ProcessStore::default()));
        assert_eq!(lease_of(&capped, true), (0, 0), "every in-flight admission needs the shared count");
        let mut out = crate::effect::Recorded::default();
        assert_eq!(quotas.admit(&q, "t", 1, T0, &mut out), Ok(None));
        let stored = quotas.store.load(&key("t")).unwrap().0.unwrap();
        assert_eq!(stored.tokens, (200 - 1 - 10) * SCALE, "the cost and the lease left the shared bucket");
        for _ in 0..10 {
            assert_eq!(quotas.admit(&q, "t", 1, T0 + 50, &mut out), Ok(None));
        }
        assert_eq!(quotas.store.load(&key("t")).unwrap().1, 1, "ten requests served from the lease alone");
        assert_eq!(quotas.admit(&q, "t", 1, T0 + 60, &mut out), Ok(None));
        assert_eq!(quotas.store.load(&key("t")).unwrap().1, 2, "an empty lease charges the store again");
        // A lease expires after LEASE_MS: its units are not spent late.
        assert_eq!(quotas.admit(&q, "t", 1, T0 + 60 + LEASE_MS, &mut out), Ok(None));
        assert_eq!(quotas.store.load(&key("t")).unwrap().1, 3);
        assert_eq!(out.0.len(), 13, "every admission is counted: {:?}", out.0);
    }

    #[test]
    fn a_large_in_flight_cap_leases_slots_to_the_router_which_admits_and_releases_without_the_store() {
        let q = quota(serde_json::json!({"max_in_flight": 100, "rate_per_s": 1000, "burst": 1000}));
        assert_eq!((q.slot_lease, q.rate.unwrap().lease), (5, 50));
        let store = std::rc::Rc::new(Counted::default());
        let mut quotas = Quotas::new(Box::new(SharedCounted(std::rc::Rc::clone(&store))));
        quotas.lease_slots = true;
        let mut out = crate::effect::Recorded::default();
        let in_flight = |store: &Counted| store.inner.load(&key("t")).unwrap().0.unwrap().in_flight;
        let mut held = Vec::new();
        for _ in 0..6 {
            held.push(quotas.admit(&q, "t", 1, T0, &mut out).unwrap().expect("holds a slot"));
        }
        assert_eq!((store.loads.get(), in_flight(&store)), (1, 6), "one charge claimed its slot and 5 more");
        held.push(quotas.admit(&q, "t", 1, T0, &mut out).unwrap().unwrap());
        assert_eq!((store.loads.get(), in_flight(&store)), (2, 12));
        // Releases come back to this router; beyond two leases free, the excess goes back to the bucket.
        for key in held.drain(..) {
            quotas.release(&key);
        }
        assert_eq!(in_flight(&store), 6, "12 claimed, 7 freed: 11 free here > 10, 6 given back, then 1 more freed");
        // Idle for LEASE_MS: the free slots go back at the next tick.
        quotas.expire(T0 + LEASE_MS - 1);
        assert_eq!(in_flight(&store), 6);
        quotas.expire(T0 + LEASE_MS);
        assert_eq!(in_flight(&store), 0);
        assert_eq!(out.0.len(), 7, "every admission is counted: {:?}", out.0);
    }

    #[test]
    fn leased_slots_never_let_more_than_the_cap_in_flight_and_idle_ones_return_at_expiry() {
        let q = quota(serde_json::json!({"max_in_flight": 20}));
        assert_eq!(q.slot_lease, 1);
        let store = std::rc::Rc::new(Counted::default());
        let router = || {
            let mut quotas = Quotas::new(Box::new(SharedCounted(std::rc::Rc::clone(&store))));
            quotas.lease_slots = true;
            quotas
        };
        let (mut a, mut b) = (router(), router());
        let mut out = crate::effect::Recorded::default();
        let mut held_a: Vec<String> = (0..10).map(|_| a.admit(&q, "t", 1, T0, &mut out).unwrap().unwrap()).collect();
        let held_b: Vec<String> = (0..10).map(|_| b.admit(&q, "t", 1, T0, &mut out).unwrap().unwrap()).collect();
        assert_eq!(b.admit(&q, "t", 1, T0, &mut out), Err(Verdict::InFlightFull), "20 in flight, the cap");
        assert_eq!(a.admit(&q, "t", 1, T0, &mut out), Err(Verdict::InFlightFull));
        // A request of A ends: its slot stays free at A (one lease's worth), so B is still refused ...
        a.release(&held_a.pop().unwrap());
        assert_eq!(b.admit(&q, "t", 1, T0 + 10, &mut out), Err(Verdict::InFlightFull));
        assert!(a.admit(&q, "t", 1, T0 + 10, &mut out).unwrap().is_some(), "... while A admits from it");
        a.release(&held_a.pop().unwrap());
        // ... until A has admitted nothing for LEASE_MS and gives it back at its tick.
        a.expire(T0 + 10 + LEASE_MS);
        assert!(b.admit(&q, "t", 1, T0 + 10 + LEASE_MS, &mut out).unwrap().is_some());
        assert_eq!(store.inner.load(&key("t")).unwrap().0.unwrap().in_flight, 20);
        drop(held_b);
    }

    /// A store that counts its loads.    /// A store that counts its loads.
    #[derive(Default)]
    struct Counted {
        inner: ProcessStore,
        loads: Cell<usize>,
    }

    impl QuotaStore for Counted {
        fn load(&self, key: &str) -> Result<(Option<Bucket>, u32), StoreError> {
            self.loads.set(self.loads.get() + 1);
            self.inner.load(key)
        }
        fn store(&self, key: &str, bucket: &Bucket, version: u32) -> Result<(), StoreError> {
            self.inner.store(key, bucket, version)
        }
    }

    /// One [`Counted`] store for several routers.
    struct SharedCounted(std::rc::Rc<Counted>);

    impl QuotaStore for SharedCounted {
        fn load(&self, key: &str) -> Result<(Option<Bucket>, u32), StoreError> {
            self.0.load(key)
        }
        fn store(&self, key: &str, bucket: &Bucket, version: u32) -> Result<(), StoreError> {
            self.0.store(key, bucket, version)
        }
    }

    #[test]
    fn once_refused_for_its_rate_a_tenant_is_refused_without_the_store_until_its_bucket_can_pay() {
        let q = quota(serde_json::json!({"rate_per_s": 2, "burst": 2, "max_in_flight": 10}));
        let store = std::rc::Rc::new(Counted::default());
        let mut quotas = Quotas::new(Box::new(SharedCounted(std::rc::Rc::clone(&store))));
        let mut out = crate::effect::Recorded::default();
        assert!(quotas.admit(&q, "t", 1, T0, &mut out).is_ok());
        assert!(quotas.admit(&q, "t", 1, T0, &mut out).is_ok());
        assert_eq!(quotas.admit(&q, "t", 1, T0 + 100, &mut out), Err(Verdict::RateLimited { retry_after_s: 1 }));
        let loads = store.loads.get();
        // A flood before the refill: refused here, the store untouched, every refusal counted.
        for t in [T0 + 200, T0 + 400, T0 + 499] {
            assert_eq!(quotas.admit(&q, "t", 1, t, &mut out), Err(Verdict::RateLimited { retry_after_s: 1 }));
        }
        assert_eq!(store.loads.get(), loads, "no store call while the bucket cannot pay");
        assert_eq!(out.0.iter().filter(|e| e.contains("QuotaRate")).count(), 4, "{:?}", out.0);
        // A Bundle the refill cannot pay for yet is refused here too, with its own wait.
        assert_eq!(quotas.admit(&q, "t", 2, T0 + 600, &mut out), Err(Verdict::RateLimited { retry_after_s: 1 }));
        assert_eq!(store.loads.get(), loads);
        // Half a second after the refusal found it empty, one unit is there: the store is asked, and admits.
        assert_eq!(quotas.admit(&q, "t", 1, T0 + 600, &mut out), Ok(Some(key("t"))));
        assert_eq!(store.loads.get(), loads + 1);
        // The next finds 0.2 units in the store's bucket: refused there (the local copy never says yes).
        assert!(quotas.admit(&q, "t", 1, T0 + 600, &mut out).is_err());
    }

    #[test]
    fn the_process_store_versions_each_write_and_refuses_a_stale_one() {
        let s = ProcessStore::default();
        let b = Bucket { tokens: 1, last_ms: 2, in_flight: 3 };
        assert_eq!(s.load("a").unwrap(), (None, 0));
        s.store("a", &b, 0).unwrap();
        assert_eq!(s.store("a", &b, 0), Err(StoreError::Conflict));
        let (_, v) = s.load("a").unwrap();
        s.store("a", &b, v).unwrap();
        assert_eq!(s.store("a", &b, v), Err(StoreError::Conflict));
    }

    #[test]
    fn many_threads_charging_one_process_store_never_admit_more_than_the_burst() {
        let q = quota(serde_json::json!({"rate_per_s": 0.001, "burst": 1000}));
        let store = Arc::new(ProcessStore::default());
        let admitted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (store, admitted, q) = (Arc::clone(&store), Arc::clone(&admitted), Arc::clone(&q));
                std::thread::spawn(move || {
                    for _ in 0..600 {
                        // Contention here is real: retry the uncharged ones as a client would.
                        loop {
                            match charge(&*store, "t", &q, 1, T0) {
                                Charge::Admitted { .. } => {
                                    admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    break;
                                }
                                Charge::Refused(..) => break,
                                Charge::Unchecked(_) => continue,
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(admitted.load(std::sync::atomic::Ordering::Relaxed), 1000);
    }

    struct NoEffects;
    impl Effects for NoEffects {
        fn push(&mut self, _: Effect<'_>) {}
    }

    /// The dynamic module's cost of a quota check (bench/fairness.py runs it in release and reports it).
    #[test]
    #[ignore = "a timing probe: cargo test --release --lib quota::tests::probe_process_store -- --ignored --nocapture"]
    fn probe_process_store() {
        const N: u32 = 200_000;
        let rate = quota(serde_json::json!({"rate_per_s": 1_000_000, "burst": 1_000_000}));
        let capped =
            quota(serde_json::json!({"rate_per_s": 1_000_000, "burst": 1_000_000, "max_in_flight": 1_000_000}));
        let store = ProcessStore::global();
        let time = |name: &str, f: &mut dyn FnMut()| {
            for _ in 0..N / 10 {
                f();
            }
            let t0 = std::time::Instant::now();
            for _ in 0..N {
                f();
            }
            println!("PROBE {name} {:.0}", t0.elapsed().as_nanos() as f64 / f64::from(N));
        };
        let now = T0;
        let bucket = Bucket { tokens: 500_000 * SCALE, last_ms: now, in_flight: 0 };
        time("core: quota admit (pure)", &mut || {
            std::hint::black_box(admit(&rate, std::hint::black_box(Some(bucket)), 1, now));
        });
        time("native: charge, rate only (key + mutex map + admit)", &mut || {
            let k = key("0b3c4d5e-0000-4000-8000-000000000001");
            std::hint::black_box(charge(&store, &k, &rate, 1, now));
        });
        let mut quotas = Quotas::new(Box::new(ProcessStore::global()));
        let mut out = NoEffects;
        time("native: admit a request, rate only (lease of 63: one charge in 64)", &mut || {
            std::hint::black_box(quotas.admit(&rate, "0b3c4d5e-0000-4000-8000-000000000003", 1, now, &mut out)).ok();
        });
        time("native: charge + release, with max_in_flight", &mut || {
            let k = key("0b3c4d5e-0000-4000-8000-000000000002");
            std::hint::black_box(charge(&store, &k, &capped, 1, now));
            give_back(&store, &k);
        });
    }

    #[test]
    fn routers_leasing_from_one_store_never_admit_more_than_the_bucket_holds() {
        let q = quota(serde_json::json!({"rate_per_s": 1000, "burst": 1000}));
        assert_eq!(q.rate.unwrap().lease, 50);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let q = Arc::clone(&q);
                std::thread::spawn(move || {
                    let mut quotas = Quotas::new(Box::new(ProcessStore::global()));
                    let (mut admitted, mut unchecked) = (0u64, 0u64);
                    for _ in 0..600 {
                        let mut out = crate::effect::Recorded::default();
                        // `now` never moves: nothing refills.
                        if quotas.admit(&q, "lease-threads", 1, T0, &mut out).is_ok() {
                            admitted += 1;
                            unchecked += out.0.iter().filter(|l| l.contains("QuotaUnchecked")).count() as u64;
                        }
                    }
                    (admitted, unchecked)
                })
            })
            .collect();
        let (admitted, unchecked) =
            threads.into_iter().map(|t| t.join().unwrap()).fold((0, 0), |(a, u), (x, y)| (a + x, u + y));
        assert!(admitted - unchecked <= 1000, "{admitted} admitted, {unchecked} unchecked");
        assert!(admitted >= 1000 - 4 * 50, "at most one unspent lease per router: {admitted}");
    }

    proptest::proptest! {
        #[test]
        fn admitted_units_never_exceed_burst_plus_refill(
            rate in 1u64..1000, burst in 1u64..1000, steps in proptest::collection::vec((0u64..2000, 1u64..20), 1..60)
        ) {
            let q = quota(serde_json::json!({"rate_per_s": rate, "burst": burst}));
            let (mut state, mut now, mut spent) = (None, T0, 0u64);
            for (dt, cost) in steps {
                now += dt;
                let (v, next) = admit(&q, state, cost, now);
                if v == Verdict::Admitted {
                    spent += cost;
                    state = Some(next);
                }
            }
            let allowance = burst + (now - T0) * rate / 1000 + 1;
            proptest::prop_assert!(spent <= allowance, "{spent} > {allowance}");
        }

        /// Three routers leasing slots of one cap, in any order of admissions, releases and ticks: never
        /// more requests in flight than the cap, the shared count is always what requests hold plus what the
        /// routers hold free, and once every request ended and every router ticked idle, it is back to 0.
        #[test]
        fn leased_slots_are_conserved_and_never_exceed_the_cap(
            cap in 1u64..120, steps in proptest::collection::vec((0usize..3, 0u8..3, 0u64..80), 1..200)
        ) {
            let q = quota(serde_json::json!({"max_in_flight": cap}));
            let store = std::rc::Rc::new(Counted::default());
            let mut routers: Vec<Quotas> = (0..3).map(|_| {
                let mut r = Quotas::new(Box::new(SharedCounted(std::rc::Rc::clone(&store))));
                r.lease_slots = true;
                r
            }).collect();
            let mut held: Vec<Vec<String>> = vec![Vec::new(); 3];
            let mut out = crate::effect::Recorded::default();
            let mut now = T0;
            let shared = |store: &Counted| store.inner.load(&key("t")).unwrap().0.map_or(0, |b| b.in_flight);
            for (r, op, dt) in steps {
                now += dt;
                match op {
                    0 => if let Ok(Some(slot)) = routers[r].admit(&q, "t", 1, now, &mut out) { held[r].push(slot) },
                    1 => if let Some(slot) = held[r].pop() { routers[r].release(&slot) },
                    _ => routers[r].expire(now),
                }
                let holding: usize = held.iter().map(Vec::len).sum();
                let free: u32 = routers.iter().map(|r| r.slots.get("t").map_or(0, |p| p.free)).sum();
                proptest::prop_assert!(holding as u64 <= cap, "{holding} in flight over a cap of {cap}");
                proptest::prop_assert_eq!(shared(&store), holding as u32 + free);
            }
            for (router, slots) in routers.iter_mut().zip(&mut held) {
                for slot in slots.drain(..) {
                    router.release(&slot);
                }
                router.expire(now + LEASE_MS);
            }
            proptest::prop_assert_eq!(shared(&store), 0);
        }
    }
}
