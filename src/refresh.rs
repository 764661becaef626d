//! When to fetch the JWKS: a sans-I/O schedule. The shell asks [`Schedule::due`] on every tick and reports
//! each fetch's outcome; time is always an argument (milliseconds since the epoch).
//!
//! The first fetch is due at once. After a success the next is due one refresh interval later; after a
//! failure, after a backoff that doubles from [`FIRST_BACKOFF_MS`] up to [`MAX_BACKOFF_MS`] (never beyond
//! the refresh interval). A failure streak is reported once when it starts and once when it ends, so that
//! an IdP outage logs two lines, not one per attempt.

/// Backoff after the first failure.
pub const FIRST_BACKOFF_MS: u64 = 1_000;
/// Longest backoff between retries.
pub const MAX_BACKOFF_MS: u64 = 30_000;
/// How long past its timeout a fetch may stay unanswered before it counts as lost (the host answers every
/// fetch by its timeout; only a bug, such as a panic while its answer was installed, loses one).
pub const LOST_FETCH_GRACE_MS: u64 = 2_000;
/// The longest fetch timeout the config allows: a schedule not told its fetch's timeout assumes it.
const LONGEST_TIMEOUT_MS: u64 = 60_000;

/// The fetch schedule of one VM.
#[derive(Clone, Debug)]
pub struct Schedule {
    refresh_ms: u64,
    next_at_ms: u64,
    backoff_ms: u64,
    /// The fetch under way, if any: when it counts as lost if still unanswered.
    in_flight: Option<u64>,
    /// How long a fetch may stay unanswered: its timeout plus [`LOST_FETCH_GRACE_MS`].
    lost_after_ms: u64,
    failures: u32,
    last_on_demand_ms: Option<u64>,
}

/// What a finished fetch means for logging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Streak {
    /// Nothing to report.
    Quiet,
    /// The first failure after a success (or at start): warn once.
    Started,
    /// The first success after `failures` failures: say it recovered.
    Ended { failures: u32 },
}

impl Schedule {
    /// A schedule whose first fetch is due at `now_ms`.
    pub fn new(refresh_ms: u64, now_ms: u64) -> Self {
        Self {
            refresh_ms,
            next_at_ms: now_ms,
            backoff_ms: FIRST_BACKOFF_MS,
            in_flight: None,
            lost_after_ms: LONGEST_TIMEOUT_MS + LOST_FETCH_GRACE_MS,
            failures: 0,
            last_on_demand_ms: None,
        }
    }

    /// The same schedule for fetches that time out after `timeout_ms`.
    pub fn with_timeout(mut self, timeout_ms: u64) -> Self {
        self.lost_after_ms = timeout_ms.saturating_add(LOST_FETCH_GRACE_MS);
        self
    }

    /// Whether a fetch should start now. Returns `true` at most once until the outcome is reported (or the
    /// fetch is given up as lost, see [`Schedule::lost`]).
    pub fn due(&mut self, now_ms: u64) -> bool {
        if self.in_flight.is_some() || now_ms < self.next_at_ms {
            return false;
        }
        self.in_flight = Some(now_ms.saturating_add(self.lost_after_ms));
        true
    }

    /// Whether the fetch under way went unanswered past its timeout plus [`LOST_FETCH_GRACE_MS`]: then it is
    /// given up as a failure (once), so that the schedule goes on (ask before [`Schedule::due`]).
    pub fn lost(&mut self, now_ms: u64) -> bool {
        if self.in_flight.is_some_and(|until| now_ms >= until) {
            self.failed(now_ms);
            return true;
        }
        false
    }

    /// Whether a fetch is under way.
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// A token names a `kid` the current key set lacks: perhaps the IdP rotated its keys. Returns `true` when
    /// the request should wait for a fetch (one is under way, or one is made due now); `false` when the last
    /// on-demand fetch was less than `min_interval_ms` ago, so that a flood of made-up `kid`s cannot hammer
    /// the IdP.
    pub fn unknown_kid(&mut self, now_ms: u64, min_interval_ms: u64) -> bool {
        if self.in_flight.is_some() {
            return true;
        }
        if self.last_on_demand_ms.is_some_and(|last| now_ms.saturating_sub(last) < min_interval_ms) {
            return false;
        }
        self.last_on_demand_ms = Some(now_ms);
        self.next_at_ms = now_ms;
        true
    }

    /// Makes a fetch due now unless one is under way (another component already rate-limited the
    /// on-demand refetch this stands for).
    pub fn fetch_now(&mut self, now_ms: u64) {
        if self.in_flight.is_none() {
            self.next_at_ms = self.next_at_ms.min(now_ms);
        }
    }

    /// The fetch succeeded and its keys were installed.
    pub fn succeeded(&mut self, now_ms: u64) -> Streak {
        self.in_flight = None;
        self.next_at_ms = now_ms.saturating_add(self.refresh_ms);
        self.backoff_ms = FIRST_BACKOFF_MS;
        let failures = std::mem::take(&mut self.failures);
        if failures > 0 {
            Streak::Ended { failures }
        } else {
            Streak::Quiet
        }
    }

    /// The fetch failed (could not be sent, timed out, non-200, or not a usable JWKS).
    pub fn failed(&mut self, now_ms: u64) -> Streak {
        self.in_flight = None;
        self.next_at_ms = now_ms.saturating_add(self.backoff_ms);
        self.backoff_ms =
            self.backoff_ms.saturating_mul(2).min(MAX_BACKOFF_MS).min(self.refresh_ms.max(FIRST_BACKOFF_MS));
        self.failures = self.failures.saturating_add(1);
        if self.failures == 1 {
            Streak::Started
        } else {
            Streak::Quiet
        }
    }

    /// Seconds until the next attempt, at least 1: the `Retry-After` of a 503 while no keys are known.
    pub fn retry_after_s(&self, now_ms: u64) -> u64 {
        (self.next_at_ms.saturating_sub(now_ms).div_ceil(1_000)).max(1)
    }
}

/// What the tenant map in force was compiled from: a hash of the registry document, and each environment
/// variable and file the compile read (by name) with a hash of what it read then. The same document whose
/// variables and files still read the same compiles to the same map (a secret rotated on disk does not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrySource {
    document: u64,
    lookups: Vec<(String, Option<u64>)>,
}

/// A hash for telling whether bytes changed (not a secret's protection: the bytes are in memory anyway).
fn digest(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

impl RegistrySource {
    /// Runs `compile` with `env`, noting what it read.
    pub fn compile<T>(
        body: &[u8],
        env: &dyn Fn(&str) -> Option<String>,
        compile: impl FnOnce(&dyn Fn(&str) -> Option<String>) -> T,
    ) -> (T, RegistrySource) {
        let lookups = std::cell::RefCell::new(Vec::new());
        let noting = |name: &str| {
            let value = env(name);
            lookups.borrow_mut().push((name.to_string(), value.as_deref().map(|v| digest(v.as_bytes()))));
            value
        };
        let compiled = compile(&noting);
        let mut lookups = lookups.into_inner();
        lookups.sort_unstable();
        lookups.dedup();
        (compiled, RegistrySource { document: digest(body), lookups })
    }

    /// Whether `body` is the document this was compiled from and everything it read reads the same now.
    pub fn unchanged(&self, body: &[u8], env: &dyn Fn(&str) -> Option<String>) -> bool {
        self.document == digest(body)
            && self.lookups.iter().all(|(name, seen)| env(name).map(|v| digest(v.as_bytes())) == *seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_767_225_600_000;

    #[test]
    fn a_fetch_unanswered_past_its_timeout_is_given_up_once_and_retried_after_the_backoff() {
        let mut s = Schedule::new(300_000, T0).with_timeout(5_000);
        assert!(s.due(T0));
        assert!(!s.lost(T0 + 5_000 + LOST_FETCH_GRACE_MS - 1));
        assert!(!s.due(T0 + 5_000 + LOST_FETCH_GRACE_MS - 1), "still in flight");
        let lost_at = T0 + 5_000 + LOST_FETCH_GRACE_MS;
        assert!(s.lost(lost_at));
        assert!(!s.lost(lost_at), "once");
        assert!(!s.in_flight());
        assert!(!s.due(lost_at + FIRST_BACKOFF_MS - 1), "a failure: the backoff first");
        assert!(s.due(lost_at + FIRST_BACKOFF_MS));
    }

    #[test]
    fn first_fetch_is_due_at_once_and_only_once_in_flight() {
        let mut s = Schedule::new(300_000, T0);
        assert!(s.due(T0));
        assert!(!s.due(T0 + 10_000));
        s.succeeded(T0 + 50);
        assert!(!s.due(T0 + 299_000));
        assert!(s.due(T0 + 300_050));
    }

    #[test]
    fn failures_back_off_exponentially_up_to_the_cap() {
        let mut s = Schedule::new(300_000, T0);
        let mut now = T0;
        let mut gaps = Vec::new();
        for _ in 0..8 {
            assert!(s.due(now));
            s.failed(now);
            let mut t = now;
            while !s.due(t) {
                t += 100;
            }
            gaps.push(t - now);
            s.in_flight = None;
            now = t;
        }
        assert_eq!(gaps, [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000]);
    }

    #[test]
    fn backoff_never_exceeds_the_refresh_interval() {
        let mut s = Schedule::new(10_000, T0);
        for i in 0..10 {
            assert!(s.due(T0 + i * 60_000));
            s.failed(T0 + i * 60_000);
        }
        assert_eq!(s.backoff_ms, 10_000);
    }

    #[test]
    fn a_failure_streak_is_reported_once_at_each_end() {
        let mut s = Schedule::new(300_000, T0);
        assert_eq!(s.failed(T0), Streak::Started);
        assert_eq!(s.failed(T0), Streak::Quiet);
        assert_eq!(s.failed(T0), Streak::Quiet);
        assert_eq!(s.succeeded(T0), Streak::Ended { failures: 3 });
        assert_eq!(s.succeeded(T0), Streak::Quiet);
        assert_eq!(s.failed(T0), Streak::Started);
    }

    #[test]
    fn an_unknown_kid_makes_a_fetch_due_at_once_but_at_most_once_per_interval() {
        let mut s = Schedule::new(300_000, T0);
        assert!(s.due(T0));
        s.succeeded(T0);
        assert!(!s.due(T0 + 1_000));
        assert!(s.unknown_kid(T0 + 1_000, 30_000), "first unknown kid waits for a refetch");
        assert!(s.due(T0 + 1_000), "the refetch is due at once");
        assert!(s.unknown_kid(T0 + 1_100, 30_000), "while it is in flight, others wait for it too");
        s.succeeded(T0 + 1_200);
        assert!(!s.unknown_kid(T0 + 2_000, 30_000), "within the interval: refused, no fetch");
        assert!(!s.due(T0 + 2_000));
        assert!(s.unknown_kid(T0 + 31_000, 30_000), "after the interval: allowed again");
        assert!(s.due(T0 + 31_000));
    }

    #[test]
    fn retry_after_counts_whole_seconds_to_the_next_attempt() {
        let mut s = Schedule::new(300_000, T0);
        assert_eq!(s.retry_after_s(T0), 1);
        s.due(T0);
        s.failed(T0);
        s.due(T0 + 1_000);
        s.failed(T0 + 1_000);
        assert_eq!(s.retry_after_s(T0 + 1_000), 2);
        assert_eq!(s.retry_after_s(T0 + 2_500), 1);
    }
}
