//! The main thread's stats (fetch outcomes, upstream-token events, the configured tenants' counts, the
//! `upkeep.recovered` counter, the main thread's gauges) on every supported Envoy.
//!
//! Envoy 1.39 and 1.40 let the main thread publish them itself (`..._http_filter_config_increment_counter`
//! and `..._http_filter_config_set_gauge`). Envoy 1.38 has neither callback (its ABI, "v0.1.0" as 1.39's, has
//! only the per-stream ones), so the module resolves those two at load time instead of importing them
//! ([`super::abi::optional`]) and, when they are absent, keeps what the main thread would have published
//! here: a worker publishes it through the per-stream callbacks (`..._http_filter_increment_counter`,
//! `..._http_filter_set_gauge`, which address the same config-level stats by the same ids) at the start of
//! its next request. On 1.38 the numbers are the same; they reach Envoy's stats at the next request on any
//! worker instead of at the main thread's tick.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::abi::{ConfigEnvoyPtr, FilterEnvoyPtr};
use super::envoy::Envoy;

/// What the main thread counted and set since a worker last published it.
#[derive(Default)]
struct Pending {
    /// Increments by metric id and label (the labels are tenant ids: bounded by the tenants).
    counters: HashMap<(usize, Option<Box<str>>), u64>,
    /// The last value set, by gauge id.
    gauges: HashMap<usize, u64>,
}

/// The main thread's stats: published at once where Envoy has the config-level callbacks, else relayed.
pub struct ConfigStats {
    direct: bool,
    /// Something is waiting in `pending` (the workers' only cost when nothing is: one atomic load).
    waiting: AtomicBool,
    pending: Mutex<Pending>,
}

impl ConfigStats {
    /// `direct`: this Envoy has the config-level metric callbacks ([`Envoy::config_metrics`]).
    pub fn new(direct: bool) -> Self {
        Self { direct, waiting: AtomicBool::new(false), pending: Mutex::default() }
    }

    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The lock of what waits. A panic while it was held (none can: the critical sections only add to
    /// maps) would at worst leave one increment half-made; the counts are kept.
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `by` to counter `id` (`label`: its one label's value). Main thread.
    pub fn count(&self, env: &impl Envoy, config: ConfigEnvoyPtr, id: usize, label: Option<&str>, by: u64) {
        if self.direct {
            env.config_increment_counter(config, id, label, by);
            return;
        }
        let mut pending = self.lock();
        let n = pending.counters.entry((id, label.map(Box::from))).or_default();
        *n = n.saturating_add(by);
        self.waiting.store(true, Ordering::Release);
    }

    /// Sets gauge `id` to `value`. Main thread.
    pub fn gauge(&self, env: &impl Envoy, config: ConfigEnvoyPtr, id: usize, value: u64) {
        if self.direct {
            env.config_set_gauge(config, id, value);
            return;
        }
        self.lock().gauges.insert(id, value);
        self.waiting.store(true, Ordering::Release);
    }

    /// Publishes what waits through stream `filter`'s callbacks (a worker, inside one of that stream's
    /// hooks; the metric callbacks never re-enter a hook). Nothing to do where Envoy publishes directly.
    pub fn relay(&self, env: &impl Envoy, filter: FilterEnvoyPtr) {
        if self.direct || !self.waiting.load(Ordering::Acquire) {
            return;
        }
        let taken = {
            let mut pending = self.lock();
            self.waiting.store(false, Ordering::Release);
            std::mem::take(&mut *pending)
        };
        for ((id, label), n) in taken.counters {
            env.increment_counter(filter, id, label.as_deref(), n);
        }
        for (id, value) in taken.gauges {
            env.set_gauge(filter, id, value);
        }
    }
}
