//! The per-tenant counters of the dynamic module (`tenant.allowed` / `tenant.forbidden`, labelled by tenant),
//! off Envoy's labelled-stats path. Envoy resolves a labelled increment by building the stat's name from its
//! tags on every call: measured here at ~14 µs of CPU per request, more than the rest of a cache hit. So a
//! worker adds 1 to an atomic of the configured tenant (no lock, no allocation), and the main thread's tick
//! (every 500 ms) hands each tenant's count to Envoy in one labelled increment, as the wasm build hands its
//! counts over. Tenants that come from a registry are not known when the config is created and are counted
//! through Envoy directly.
//!
//! The unlabelled counters (`requests.allowed`, `cache.hits`, `requests.rejected.<reason>`, …) go the same
//! way ([`UnlabelledCounts`]): Envoy's increment is cheaper there (no name to build), but it is still a call
//! into Envoy per counter per request (two on every cache hit); an atomic add here and one increment per
//! counter that moved on the tick take them off the request path.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::effect::{CounterSlot, COUNTERS};
use crate::rejection::Rejection;
use crate::tenant::FxHasher;

/// Counts of the unlabelled counters ([`COUNTERS`], then [`Rejection::ALL`]), shared by every worker of a
/// config, since the last drain.
pub struct UnlabelledCounts {
    counts: Vec<AtomicU64>,
}

impl Default for UnlabelledCounts {
    fn default() -> Self {
        Self { counts: (0..COUNTERS.len() + Rejection::ALL.len()).map(|_| AtomicU64::new(0)).collect() }
    }
}

impl UnlabelledCounts {
    /// Where an unlabelled counter's count is kept (`None`: a labelled one).
    pub fn index(slot: CounterSlot<'_>) -> Option<usize> {
        match slot {
            CounterSlot::Fixed(i) => Some(i),
            CounterSlot::Rejected(i) => Some(COUNTERS.len() + i),
            _ => None,
        }
    }

    /// The slot kept at `index` (the inverse of [`UnlabelledCounts::index`]).
    pub fn slot(index: usize) -> CounterSlot<'static> {
        match index.checked_sub(COUNTERS.len()) {
            None => CounterSlot::Fixed(index),
            Some(i) => CounterSlot::Rejected(i),
        }
    }

    /// Counts one of `slot`; `false` if it is not an unlabelled counter (count it another way).
    pub fn add(&self, slot: CounterSlot<'_>) -> bool {
        let Some(counter) = Self::index(slot).and_then(|i| self.counts.get(i)) else { return false };
        counter.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Takes every count since the last drain: `f(slot, n)` for each that is not zero.
    pub fn drain(&self, mut f: impl FnMut(CounterSlot<'static>, u64)) {
        for (i, counter) in self.counts.iter().enumerate() {
            let n = counter.swap(0, Ordering::Relaxed);
            if n > 0 {
                f(Self::slot(i), n);
            }
        }
    }
}

/// Counts of the configured tenants, shared by every worker of a config.
#[derive(Default)]
pub struct TenantCounts {
    index: HashMap<Box<str>, usize, BuildHasherDefault<FxHasher>>,
    ids: Vec<Box<str>>,
    /// Per tenant: allowed, forbidden, since the last drain.
    counts: Vec<[AtomicU64; 2]>,
}

impl TenantCounts {
    /// Slots for these tenants (the configuration's).
    pub fn new<'a>(tenants: impl IntoIterator<Item = &'a str>) -> Self {
        let mut c = Self::default();
        for id in tenants {
            if !c.index.contains_key(id) {
                c.index.insert(id.into(), c.ids.len());
                c.ids.push(id.into());
                c.counts.push([AtomicU64::new(0), AtomicU64::new(0)]);
            }
        }
        c
    }

    /// Counts one request of `tenant`; `false` if it is not a configured tenant (count it another way).
    pub fn add(&self, tenant: &str, allowed: bool) -> bool {
        let Some(slot) = self.index.get(tenant).and_then(|&i| self.counts.get(i)) else { return false };
        let [a, f] = slot;
        if allowed { a } else { f }.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Takes every count since the last drain: `f(tenant, allowed, n)` for each that is not zero.
    pub fn drain(&self, mut f: impl FnMut(&str, bool, u64)) {
        for (id, [a, fb]) in self.ids.iter().zip(&self.counts) {
            for (counter, allowed) in [(a, true), (fb, false)] {
                let n = counter.swap(0, Ordering::Relaxed);
                if n > 0 {
                    f(id, allowed, n);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effect::Metric;

    #[test]
    fn unlabelled_counts_are_kept_by_slot_until_drained_and_labelled_ones_are_refused() {
        let c = UnlabelledCounts::default();
        let last_rejection = Rejection::ALL[Rejection::ALL.len() - 1];
        for m in [Metric::CacheHits, Metric::Allowed, Metric::CacheHits, Metric::Rejected(last_rejection)] {
            assert!(c.add(m.slot()));
        }
        assert!(!c.add(Metric::TenantAllowed("t").slot()));
        let mut out = Vec::new();
        c.drain(|slot, n| out.push((slot, n)));
        assert_eq!(
            out,
            [(Metric::Allowed.slot(), 1), (Metric::CacheHits.slot(), 2), (Metric::Rejected(last_rejection).slot(), 1)]
        );
        c.drain(|_, _| panic!("a drain takes the counts"));
        for (i, m) in COUNTERS.iter().enumerate() {
            assert_eq!(UnlabelledCounts::index(m.slot()), Some(i));
            assert_eq!(UnlabelledCounts::slot(i), m.slot());
        }
        for r in Rejection::ALL {
            let i = UnlabelledCounts::index(Metric::Rejected(r).slot());
            assert_eq!(i.map(UnlabelledCounts::slot), Some(Metric::Rejected(r).slot()));
        }
    }

    fn drained(c: &TenantCounts) -> Vec<(String, bool, u64)> {
        let mut out = Vec::new();
        c.drain(|t, a, n| out.push((t.to_string(), a, n)));
        out
    }

    #[test]
    fn counts_of_configured_tenants_are_kept_until_drained_and_others_are_refused() {
        let c = TenantCounts::new(["a", "b", "a"]);
        assert!(c.add("a", true) && c.add("a", true) && c.add("b", false));
        assert!(!c.add("registry-tenant", true));
        assert_eq!(drained(&c), vec![("a".into(), true, 2), ("b".into(), false, 1)]);
        assert!(drained(&c).is_empty(), "a drain takes the counts");
    }

    #[test]
    fn counts_from_many_threads_add_up() {
        let c = std::sync::Arc::new(TenantCounts::new(["t"]));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = std::sync::Arc::clone(&c);
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        c.add("t", true);
                    }
                })
            })
            .collect();
        let mut total = 0;
        for t in threads {
            t.join().unwrap();
            c.drain(|_, _, n| total += n);
        }
        c.drain(|_, _, n| total += n);
        assert_eq!(total, 40_000);
    }
}
