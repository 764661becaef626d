//! The dynamic module's audit-sink inbox (`audit_sink`): where a worker leaves a request's AuditEvent for
//! the main thread, whose tick hands it to the sink ([`crate::audit_sink::Sink`]) that batches and posts
//! it. A worker never waits: room is reserved with one atomic update (the bound, `queue_size`, covers every
//! event the sink holds, in the inbox or in a batch under way: the main thread gives the room back when a
//! batch ends), and the event goes into the first shard whose lock is free (`try_lock`, from a rotating
//! start); if every shard is locked at that instant the event is dropped and counted (`contended`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

use crate::effect::{Metric, SinkDrop};

/// Shards of the inbox: a worker finds a free one unless this many threads hold one at once.
const SHARDS: usize = 16;

/// One event on its way to the main thread.
#[derive(Debug, PartialEq, Eq)]
pub struct Queued {
    pub tenant: Option<Box<str>>,
    pub event: String,
    pub time_ms: u64,
}

/// What became of an offered event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offered {
    Queued,
    /// Not queued: count this.
    Counted(Metric<'static>),
}

/// The workers' events for the main thread, bounded.
#[derive(Debug)]
pub struct Inbox {
    bound: usize,
    /// Whether events without a tenant are sent (`untenanted_uri`).
    untenanted: bool,
    /// Events in the inbox or held by the main thread's sink.
    held: AtomicUsize,
    next: AtomicUsize,
    shards: Vec<Mutex<Vec<Queued>>>,
}

impl Inbox {
    pub fn new(bound: usize, untenanted: bool) -> Self {
        Self {
            bound,
            untenanted,
            held: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            shards: (0..SHARDS).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    /// A worker's part: queues the event, or says what to count instead. Never waits.
    pub fn offer(&self, tenant: Option<&str>, event: &str, time_ms: u64) -> Offered {
        if tenant.is_none() && !self.untenanted {
            return Offered::Counted(Metric::AuditSinkUntenantedSkipped);
        }
        let reserved = self.held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| (h < self.bound).then(|| h + 1));
        if reserved.is_err() {
            return Offered::Counted(Metric::AuditSinkDropped(SinkDrop::QueueFull));
        }
        // Copied before any lock is taken: a shard is held only for the push.
        let mut queued = Some(Queued { tenant: tenant.map(Box::from), event: event.to_string(), time_ms });
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..SHARDS {
            let Some(shard) = self.shards.get(start.wrapping_add(i) % SHARDS) else { continue };
            let mut queue = match shard.try_lock() {
                Ok(q) => q,
                // A panic while holding it left nothing half-done (a push or a take): carry on.
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => continue,
            };
            queue.extend(queued.take());
            return Offered::Queued;
        }
        self.release(1);
        Offered::Counted(Metric::AuditSinkDropped(SinkDrop::Contended))
    }

    /// The main thread's part: takes every queued event (each shard locked only to swap its list out).
    pub fn drain(&self, mut f: impl FnMut(Queued)) {
        for shard in &self.shards {
            let taken = std::mem::take(&mut *lock(shard));
            taken.into_iter().for_each(&mut f);
        }
    }

    /// Gives back the room of `n` events that ended (delivered or dropped).
    pub fn release(&self, n: usize) {
        let _ = self.held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| Some(h.saturating_sub(n)));
    }

    /// Events held (in the inbox or by the sink).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

fn lock(shard: &Mutex<Vec<Queued>>) -> MutexGuard<'_, Vec<Queued>> {
    shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(inbox: &Inbox) -> Vec<Queued> {
        let mut out = Vec::new();
        inbox.drain(|q| out.push(q));
        out
    }

    #[test]
    fn the_bound_covers_what_the_sink_holds_until_it_is_released() {
        let inbox = Inbox::new(2, false);
        assert_eq!(inbox.offer(Some("a"), "e1", 1), Offered::Queued);
        assert_eq!(inbox.offer(Some("b"), "e2", 2), Offered::Queued);
        assert_eq!(inbox.offer(Some("a"), "e3", 3), Offered::Counted(Metric::AuditSinkDropped(SinkDrop::QueueFull)));
        let mut got = drained(&inbox);
        got.sort_by_key(|q| q.time_ms);
        assert_eq!(got.iter().map(|q| q.event.as_str()).collect::<Vec<_>>(), ["e1", "e2"]);
        assert_eq!(got[0].tenant.as_deref(), Some("a"));
        assert_eq!(inbox.offer(Some("a"), "e4", 4), Offered::Counted(Metric::AuditSinkDropped(SinkDrop::QueueFull)));
        inbox.release(1);
        assert_eq!(inbox.offer(Some("a"), "e5", 5), Offered::Queued);
        assert_eq!(inbox.held(), 2);
    }

    #[test]
    fn events_without_a_tenant_are_skipped_unless_they_have_somewhere_to_go() {
        assert_eq!(Inbox::new(5, false).offer(None, "e", 0), Offered::Counted(Metric::AuditSinkUntenantedSkipped));
        assert_eq!(Inbox::new(5, true).offer(None, "e", 0), Offered::Queued);
    }

    #[test]
    fn a_worker_never_waits_for_a_locked_shard() {
        let inbox = Inbox::new(100, false);
        {
            // Every shard held (by the main thread, say): the offer is dropped and counted, not blocked.
            let guards: Vec<_> = inbox.shards.iter().map(|s| s.lock().unwrap()).collect();
            let offered = std::thread::scope(|s| s.spawn(|| inbox.offer(Some("a"), "e", 0)).join().unwrap());
            assert_eq!(offered, Offered::Counted(Metric::AuditSinkDropped(SinkDrop::Contended)));
            assert_eq!(inbox.held(), 0, "its room is given back");
            // One free shard is enough.
            drop(guards);
            let _some: Vec<_> = inbox.shards.iter().skip(1).map(|s| s.lock().unwrap()).collect();
            let offered = std::thread::scope(|s| s.spawn(|| inbox.offer(Some("a"), "e", 0)).join().unwrap());
            assert_eq!(offered, Offered::Queued);
        }
        assert_eq!(drained(&inbox).len(), 1);
    }

    #[test]
    fn offers_from_many_threads_never_exceed_the_bound() {
        let inbox = Inbox::new(1_000, false);
        let queued = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1_000 {
                        if inbox.offer(Some("t"), "e", 0) == Offered::Queued {
                            queued.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            s.spawn(|| {
                for _ in 0..100 {
                    let n = drained(&inbox).len();
                    inbox.release(n);
                }
            });
        });
        let left = drained(&inbox).len();
        assert!(inbox.held() <= 1_000 && left == inbox.held(), "{left} {}", inbox.held());
        assert!(queued.load(Ordering::Relaxed) >= 1_000);
    }
}
