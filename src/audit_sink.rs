//! The batched FHIR audit sink (`audit_sink`, issue 27): each request's BALP AuditEvent ([`crate::balp`])
//! posted, per tenant, in FHIR `batch` Bundles to an audit server through an Envoy cluster.
//!
//! The request path only offers the event to a bounded in-memory queue ([`Sink::offer`]: no host call, no
//! wait; a full queue drops the event and counts it). On each tick ([`Sink::on_tick`]) a tenant whose queue
//! holds `batch_size` events, or whose oldest event has waited `flush_interval_ms`, gets a batch: a
//! `POST <uri with {tenant}>` of a `batch` Bundle whose entries are `POST AuditEvent`, holding only that
//! tenant's events. One batch per tenant is under way at a time (in order; an outage does not multiply the
//! calls); when it is delivered the next goes at once if one is ready.
//!
//! An answer ([`Sink::on_result`]): 2xx delivered (the batch-response's entries are read: an entry whose
//! status is not 2xx is counted as rejected); 5xx, 429, a timeout or a connection failure retried after a
//! backoff (`backoff_ms` doubled per attempt, capped at `max_backoff_ms`) until `attempts` are spent, then
//! dropped and counted; any other status dropped at once and counted as rejected. Events in a batch still
//! count against `queue_size` until their batch ends: the queue bounds everything the sink holds.
//!
//! Nothing of an event's content or of the server's answer goes into a log line: a dropped batch's line
//! names its tenant, its size and the status only.

use std::collections::{BTreeMap, VecDeque};

use crate::effect::{Effect, Effects, Fetch, FetchTarget, Level, Metric, Post, SinkDrop};

/// Largest batch-response read to check its entries; a larger 2xx answer is taken as delivered unread.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// How long after its timeout a batch Envoy never answered is given up (Envoy answers every call, at worst
/// with a failure at its timeout: this only guards against a lost answer).
const LOST_AFTER_MS: u64 = 2_000;

/// The compiled `audit_sink` configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkConfig {
    pub cluster: String,
    pub authority: String,
    /// The path of a tenant's FHIR base; `{tenant}` (if present) is replaced by the tenant id.
    pub path: String,
    /// Where events without a tenant go (same cluster and authority); `None`: they are not sent.
    pub untenanted_path: Option<String>,
    pub batch_size: usize,
    pub queue_size: usize,
    pub flush_interval_ms: u64,
    pub timeout_ms: u64,
    pub attempts: u32,
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
}

impl SinkConfig {
    /// The wait before attempt `attempt + 1` (the first retry after attempt 1 waits `backoff_ms`).
    pub fn backoff(&self, attempt: u32) -> u64 {
        let doublings = attempt.saturating_sub(1).min(32);
        self.backoff_ms.saturating_mul(1u64 << doublings).min(self.max_backoff_ms)
    }

    /// The path a tenant's batch is posted to (`None`: an event without a tenant, and no `untenanted_uri`).
    fn path_for(&self, tenant: Option<&str>) -> Option<String> {
        match tenant {
            Some(t) => Some(self.path.replace("{tenant}", &percent_encode(t))),
            None => self.untenanted_path.clone(),
        }
    }
}

/// A tenant id as one path segment: unreserved characters as they are, the rest percent-encoded.
fn percent_encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One tenant's waiting events.
#[derive(Debug, Default)]
struct Queue {
    events: VecDeque<String>,
    /// When the oldest waiting event came.
    oldest_ms: u64,
    /// Whether a batch of this tenant is under way (sent, or waiting to be sent again).
    busy: bool,
}

#[derive(Debug)]
enum State {
    /// Sent; given up if no answer comes by this time.
    InFlight { lost_at_ms: u64 },
    /// Waiting to be sent again at this time.
    Waiting { until_ms: u64 },
}

#[derive(Debug)]
struct Batch {
    tenant: Option<String>,
    path: String,
    body: String,
    events: usize,
    /// Attempts made so far.
    attempt: u32,
    state: State,
}

/// What a batch's end released, for a holder that bounds the queue itself (the dynamic module).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Released(pub usize);

/// The sink's state: the per-tenant queues and the batches under way (one per VM in the wasm build; the
/// main thread's in the dynamic module).
#[derive(Debug)]
pub struct Sink {
    config: SinkConfig,
    /// By tenant; `None`: events without a tenant.
    queues: BTreeMap<Option<String>, Queue>,
    batches: BTreeMap<u32, Batch>,
    next_id: u32,
    /// Events in the queues and in batches under way.
    held: usize,
}

impl Sink {
    pub fn new(config: SinkConfig) -> Self {
        Self { config, queues: BTreeMap::new(), batches: BTreeMap::new(), next_id: 0, held: 0 }
    }

    pub fn config(&self) -> &SinkConfig {
        &self.config
    }

    /// Events held: waiting, or in a batch under way.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Whether an event of `tenant` would be sent at all (an event without a tenant needs
    /// `untenanted_uri`); one that would not is counted as `audit_sink.untenanted_skipped`.
    pub fn sends(&self, tenant: Option<&str>, out: &mut dyn Effects) -> bool {
        let sends = tenant.is_some() || self.config.untenanted_path.is_some();
        if !sends {
            out.push(Effect::Count(Metric::AuditSinkUntenantedSkipped));
        }
        sends
    }

    /// The request path's part: queues one event of `tenant`, or drops it (counted) when the sink holds
    /// `queue_size` events. No host call, no allocation beyond the event's copy.
    pub fn offer(&mut self, tenant: Option<&str>, event: &str, now_ms: u64, out: &mut dyn Effects) {
        if !self.sends(tenant, out) {
            return;
        }
        if self.held >= self.config.queue_size {
            out.push(Effect::Count(Metric::AuditSinkDropped(SinkDrop::QueueFull)));
            return;
        }
        self.accept(tenant, event.to_string(), now_ms);
    }

    /// Queues an event whose room was reserved elsewhere (the dynamic module's workers bound the queue with
    /// an atomic count, and hand their events to the main thread's sink).
    pub fn accept(&mut self, tenant: Option<&str>, event: String, now_ms: u64) {
        let queue = self.queues.entry(tenant.map(str::to_string)).or_default();
        if queue.events.is_empty() {
            queue.oldest_ms = now_ms;
        }
        queue.events.push_back(event);
        self.held = self.held.saturating_add(1);
    }

    /// A tick: batches given up for lost end as failed attempts, batches whose backoff ended are sent again,
    /// and each tenant whose queue is full enough or old enough (and has no batch under way) gets a batch.
    pub fn on_tick(&mut self, now_ms: u64, out: &mut dyn Effects) -> Released {
        let lost: Vec<u32> = self
            .batches
            .iter()
            .filter(|(_, b)| matches!(b.state, State::InFlight { lost_at_ms } if now_ms >= lost_at_ms))
            .map(|(id, _)| *id)
            .collect();
        let mut released = 0;
        for id in lost {
            released += self.failed(id, None, now_ms, out).0;
        }
        let due: Vec<u32> = self
            .batches
            .iter()
            .filter(|(_, b)| matches!(b.state, State::Waiting { until_ms } if now_ms >= until_ms))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.send(id, now_ms, out);
        }
        let ready: Vec<Option<String>> =
            self.queues.iter().filter(|(_, q)| self.ready(q, now_ms)).map(|(tenant, _)| tenant.clone()).collect();
        for tenant in ready {
            self.flush(tenant, now_ms, out);
        }
        // Queues left empty and idle are forgotten (tenants come and go with a registry).
        self.queues.retain(|_, q| q.busy || !q.events.is_empty());
        Released(released)
    }

    fn ready(&self, q: &Queue, now_ms: u64) -> bool {
        !q.busy
            && !q.events.is_empty()
            && (q.events.len() >= self.config.batch_size
                || now_ms.saturating_sub(q.oldest_ms) >= self.config.flush_interval_ms)
    }

    /// Takes up to `batch_size` of `tenant`'s events into a batch and sends it.
    fn flush(&mut self, tenant: Option<String>, now_ms: u64, out: &mut dyn Effects) {
        let Some(path) = self.config.path_for(tenant.as_deref()) else { return };
        let batch_size = self.config.batch_size;
        let Some(queue) = self.queues.get_mut(&tenant) else { return };
        let n = queue.events.len().min(batch_size);
        if n == 0 {
            return;
        }
        let mut body = String::with_capacity(64 + queue.events.iter().take(n).map(|e| e.len() + 64).sum::<usize>());
        body.push_str(r#"{"resourceType":"Bundle","type":"batch","entry":["#);
        for (i, event) in queue.events.drain(..n).enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(r#"{"resource":"#);
            body.push_str(&event);
            body.push_str(r#","request":{"method":"POST","url":"AuditEvent"}}"#);
        }
        body.push_str("]}");
        // The next batch's clock starts now: its events waited behind this one.
        queue.oldest_ms = now_ms;
        queue.busy = true;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.batches.insert(
            id,
            Batch { tenant, path, body, events: n, attempt: 0, state: State::Waiting { until_ms: now_ms } },
        );
        self.send(id, now_ms, out);
    }

    fn send(&mut self, id: u32, now_ms: u64, out: &mut dyn Effects) {
        let config = &self.config;
        let Some(batch) = self.batches.get_mut(&id) else { return };
        batch.attempt = batch.attempt.saturating_add(1);
        batch.state =
            State::InFlight { lost_at_ms: now_ms.saturating_add(config.timeout_ms).saturating_add(LOST_AFTER_MS) };
        out.push(Effect::Count(if batch.attempt > 1 { Metric::AuditSinkRetries } else { Metric::AuditSinkBatches }));
        out.push(Effect::Fetch(Fetch {
            target: FetchTarget::AuditSink(id),
            cluster: &config.cluster,
            authority: &config.authority,
            path: &batch.path,
            timeout_ms: config.timeout_ms,
            post: Some(Post { authorization: None, form: &batch.body, content_type: FHIR_JSON }),
        }));
    }

    /// The answer to batch `id`: `status` its `:status` (`None`: no answer: a timeout, a connection failure,
    /// or not sent), `body` its body (read only for a 2xx within [`MAX_RESPONSE_BYTES`]; empty otherwise).
    /// Returns the events the batch's end released (none while it is retried).
    pub fn on_result(
        &mut self,
        id: u32,
        status: Option<&str>,
        body: &[u8],
        now_ms: u64,
        out: &mut dyn Effects,
    ) -> Released {
        let code = status.and_then(|s| s.parse::<u16>().ok());
        let released = match code {
            Some(200..=299) => {
                let Some(batch) = self.end(id) else { return Released(0) };
                let rejected = match parse_batch_response(body) {
                    Ok(statuses) if statuses.len() == batch.events => statuses.iter().filter(|ok| !**ok).count(),
                    // Not a batch-response of this batch's entries (or not read): the server took the batch.
                    _ => 0,
                };
                for _ in 0..batch.events.saturating_sub(rejected) {
                    out.push(Effect::Count(Metric::AuditSinkDelivered));
                }
                for _ in 0..rejected {
                    out.push(Effect::Count(Metric::AuditSinkDropped(SinkDrop::Rejected)));
                }
                if rejected > 0 {
                    dropped_line(&batch, rejected, "entries refused in the batch-response", status, out);
                }
                self.next_of(batch.tenant, now_ms, out);
                batch.events
            }
            Some(429 | 500..=599) | None => self.failed(id, status, now_ms, out).0,
            Some(_) => {
                let Some(batch) = self.end(id) else { return Released(0) };
                for _ in 0..batch.events {
                    out.push(Effect::Count(Metric::AuditSinkDropped(SinkDrop::Rejected)));
                }
                dropped_line(&batch, batch.events, "refused", status, out);
                batch.events
            }
        };
        Released(released)
    }

    /// A failed attempt: sent again after its backoff, or dropped once every attempt is spent.
    fn failed(&mut self, id: u32, status: Option<&str>, now_ms: u64, out: &mut dyn Effects) -> Released {
        let config = &self.config;
        let Some(batch) = self.batches.get_mut(&id) else { return Released(0) };
        if batch.attempt < config.attempts {
            batch.state = State::Waiting { until_ms: now_ms.saturating_add(config.backoff(batch.attempt)) };
            return Released(0);
        }
        let Some(batch) = self.end(id) else { return Released(0) };
        for _ in 0..batch.events {
            out.push(Effect::Count(Metric::AuditSinkDropped(SinkDrop::RetriesExhausted)));
        }
        dropped_line(&batch, batch.events, "undelivered after every attempt", status, out);
        Released(batch.events)
    }

    /// Takes a batch off (its tenant's queue no longer busy), its events no longer held.
    fn end(&mut self, id: u32) -> Option<Batch> {
        let batch = self.batches.remove(&id)?;
        if let Some(q) = self.queues.get_mut(&batch.tenant) {
            q.busy = false;
        }
        self.held = self.held.saturating_sub(batch.events);
        Some(batch)
    }

    /// After a batch is delivered, its tenant's next batch goes at once if it is ready. Not after a drop:
    /// the next waits for the tick, so a server that refuses everything (or a cluster a post cannot even be
    /// sent to, which fails inside the send) costs one post per tick, never a recursion through the queue.
    fn next_of(&mut self, tenant: Option<String>, now_ms: u64, out: &mut dyn Effects) {
        let ready = self.queues.get(&tenant).is_some_and(|q| self.ready(q, now_ms));
        if ready {
            self.flush(tenant, now_ms, out);
        }
    }
}

/// The content type of a batch.
pub const FHIR_JSON: &str = "application/fhir+json";

/// A warning line about a dropped batch: its tenant, how many events, why, and the status (never an event's
/// content or the answer's body).
fn dropped_line(batch: &Batch, dropped: usize, why: &str, status: Option<&str>, out: &mut dyn Effects) {
    let tenant = batch.tenant.as_deref().unwrap_or("(none)");
    let status = status.unwrap_or("no answer");
    let line = format!(
        "fhir_tenant_router: audit sink: {dropped} AuditEvent(s) of tenant {tenant} dropped: {why} (status {status}, \
         attempt {})",
        batch.attempt
    );
    out.push(Effect::Log(Level::Warn, &line));
}

/// Why an answer is not a batch-response.
#[derive(Debug, PartialEq, Eq)]
pub struct NotABatchResponse;

/// Reads a `batch-response` Bundle (untrusted): per entry, in order, whether its `response.status` is 2xx
/// (FHIR: "an HTTP status code, optionally followed by its phrase"). An entry without a response is not.
pub fn parse_batch_response(body: &[u8]) -> Result<Vec<bool>, NotABatchResponse> {
    if body.len() > MAX_RESPONSE_BYTES {
        return Err(NotABatchResponse);
    }
    // A `Value` (parsed the way the Bundle checks parse theirs): no parser of its own in the module.
    let bundle: serde_json::Value = serde_json::from_slice(body).map_err(|_| NotABatchResponse)?;
    if bundle.get("resourceType").and_then(|v| v.as_str()) != Some("Bundle")
        || bundle.get("type").and_then(|v| v.as_str()) != Some("batch-response")
    {
        return Err(NotABatchResponse);
    }
    let entries = match bundle.get("entry") {
        None => return Ok(Vec::new()),
        Some(serde_json::Value::Array(entries)) => entries,
        Some(_) => return Err(NotABatchResponse),
    };
    Ok(entries
        .iter()
        .map(|e| {
            let status = e.get("response").and_then(|r| r.get("status")).and_then(|s| s.as_str()).unwrap_or_default();
            let code = status.split(' ').next().unwrap_or_default();
            code.len() == 3 && code.starts_with('2') && code.bytes().all(|b| b.is_ascii_digit())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effect::Recorded;

    fn config() -> SinkConfig {
        SinkConfig {
            cluster: "audit".into(),
            authority: "audit.example".into(),
            path: "/fhir/{tenant}".into(),
            untenanted_path: None,
            batch_size: 3,
            queue_size: 5,
            flush_interval_ms: 1_000,
            timeout_ms: 2_000,
            attempts: 3,
            backoff_ms: 100,
            max_backoff_ms: 250,
        }
    }

    fn fetches(r: &Recorded) -> Vec<&String> {
        r.0.iter().filter(|e| e.starts_with("Fetch")).collect()
    }

    fn count(r: &Recorded, metric: Metric<'_>) -> usize {
        let m = format!("Count({metric:?})");
        r.0.iter().filter(|e| **e == m).count()
    }

    /// The bodies of the batches sent, by capturing each fetch.
    struct Captured(Vec<(u32, String, String)>, Recorded);
    impl Effects for Captured {
        fn push(&mut self, effect: Effect<'_>) {
            if let Effect::Fetch(f) = effect {
                if let FetchTarget::AuditSink(id) = f.target {
                    self.0.push((id, f.path.to_string(), String::from_utf8_lossy(f.body()).into_owned()));
                }
                assert_eq!(f.headers().iter().find(|(n, _)| *n == "content-type").map(|h| h.1), Some(FHIR_JSON));
                assert_eq!(f.headers().iter().find(|(n, _)| *n == ":method").map(|h| h.1), Some("POST"));
            }
            self.1.push(effect);
        }
    }

    fn captured() -> Captured {
        Captured(Vec::new(), Recorded::default())
    }

    fn event(n: u32) -> String {
        format!(r#"{{"resourceType":"AuditEvent","id":"e{n}"}}"#)
    }

    #[test]
    fn each_batch_holds_one_tenants_events_and_goes_to_its_base() {
        let mut sink = Sink::new(config());
        let mut out = captured();
        for (i, t) in ["a", "b", "a", "a/x", "b"].iter().enumerate() {
            sink.offer(Some(t), &event(i as u32), 0, &mut out);
        }
        assert!(out.0.is_empty(), "nothing is sent on the request path");
        sink.on_tick(999, &mut out);
        assert!(out.0.is_empty(), "neither full nor old enough");
        sink.on_tick(1_000, &mut out);
        let sent: Vec<(String, Vec<String>)> = out
            .0
            .iter()
            .map(|(_, path, body)| {
                let v: serde_json::Value = serde_json::from_str(body).unwrap();
                assert_eq!(v["type"], "batch");
                let ids = v["entry"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| {
                        assert_eq!(e["request"], serde_json::json!({"method": "POST", "url": "AuditEvent"}));
                        e["resource"]["id"].as_str().unwrap().to_string()
                    })
                    .collect();
                (path.clone(), ids)
            })
            .collect();
        assert_eq!(
            sent,
            vec![
                ("/fhir/a".to_string(), vec!["e0".to_string(), "e2".to_string()]),
                ("/fhir/a%2Fx".to_string(), vec!["e3".to_string()]),
                ("/fhir/b".to_string(), vec!["e1".to_string(), "e4".to_string()]),
            ]
        );
        assert_eq!(count(&out.1, Metric::AuditSinkBatches), 3);
    }

    #[test]
    fn a_full_batch_goes_at_the_next_tick_and_the_next_when_the_first_is_delivered() {
        let mut sink = Sink::new(SinkConfig { queue_size: 10, ..config() });
        let mut out = captured();
        for i in 0..7 {
            sink.offer(Some("a"), &event(i), 0, &mut out);
        }
        sink.on_tick(1, &mut out);
        assert_eq!(out.0.len(), 1, "one batch of a tenant at a time");
        let (id, _, _) = out.0[0].clone();
        sink.on_tick(2, &mut out);
        assert_eq!(out.0.len(), 1);
        let released = sink.on_result(id, Some("200"), b"", 3, &mut out);
        assert_eq!(released, Released(3));
        assert_eq!(out.0.len(), 2, "the next full batch goes at once");
        assert_eq!(count(&out.1, Metric::AuditSinkDelivered), 3);
        assert_eq!(sink.held(), 4);
    }

    #[test]
    fn the_queue_bound_counts_batches_under_way_and_drops_are_counted() {
        let mut sink = Sink::new(config());
        let mut out = captured();
        for i in 0..4 {
            sink.offer(Some("a"), &event(i), 0, &mut out);
        }
        sink.on_tick(1, &mut out); // 3 in flight, 1 waiting
        for i in 4..8 {
            sink.offer(Some("b"), &event(i), 1, &mut out);
        }
        assert_eq!(sink.held(), 5);
        assert_eq!(count(&out.1, Metric::AuditSinkDropped(SinkDrop::QueueFull)), 3);
    }

    #[test]
    fn failures_are_retried_with_a_capped_doubling_backoff_then_dropped_and_counted() {
        let cfg = config();
        assert_eq!((cfg.backoff(1), cfg.backoff(2), cfg.backoff(3), cfg.backoff(40)), (100, 200, 250, 250));
        let mut sink = Sink::new(cfg);
        let mut out = captured();
        sink.offer(Some("a"), &event(0), 0, &mut out);
        sink.on_tick(1_000, &mut out);
        let id = out.0[0].0;
        assert_eq!(sink.on_result(id, Some("503"), b"", 1_010, &mut out), Released(0));
        sink.on_tick(1_109, &mut out);
        assert_eq!(out.0.len(), 1, "not before its backoff");
        sink.on_tick(1_110, &mut out);
        assert_eq!(out.0.len(), 2);
        assert_eq!(out.0[1].0, id, "the same batch again");
        assert_eq!(sink.on_result(id, None, b"", 1_200, &mut out), Released(0)); // a timeout
        sink.on_tick(1_399, &mut out);
        assert_eq!(out.0.len(), 2);
        sink.on_tick(1_400, &mut out);
        assert_eq!(out.0.len(), 3);
        assert_eq!(sink.on_result(id, Some("429"), b"", 1_500, &mut out), Released(1));
        assert_eq!(count(&out.1, Metric::AuditSinkDropped(SinkDrop::RetriesExhausted)), 1);
        assert_eq!(count(&out.1, Metric::AuditSinkRetries), 2);
        assert_eq!(sink.held(), 0);
        let warn = out.1 .0.iter().find(|l| l.starts_with("Log(Warn")).unwrap();
        assert!(!warn.contains("resourceType"), "no content in the line: {warn}");
    }

    #[test]
    fn a_client_error_is_not_retried_and_counts_as_rejected() {
        let mut sink = Sink::new(config());
        let mut out = captured();
        sink.offer(Some("a"), &event(0), 0, &mut out);
        sink.offer(Some("a"), &event(1), 0, &mut out);
        sink.on_tick(1_000, &mut out);
        let id = out.0[0].0;
        assert_eq!(sink.on_result(id, Some("400"), b"secret answer", 1_001, &mut out), Released(2));
        assert_eq!(count(&out.1, Metric::AuditSinkDropped(SinkDrop::Rejected)), 2);
        sink.on_tick(100_000, &mut out);
        assert_eq!(out.0.len(), 1, "never sent again");
        assert!(!out.1 .0.iter().any(|l| l.contains("secret answer")));
    }

    #[test]
    fn a_batch_response_entry_that_failed_counts_as_rejected() {
        let mut sink = Sink::new(config());
        let mut out = captured();
        for i in 0..3 {
            sink.offer(Some("a"), &event(i), 0, &mut out);
        }
        sink.on_tick(1, &mut out);
        let id = out.0[0].0;
        let answer = br#"{"resourceType":"Bundle","type":"batch-response","entry":[
            {"response":{"status":"201 Created"}},{"response":{"status":"400"}},{"response":{"status":"201"}}]}"#;
        sink.on_result(id, Some("200"), answer, 2, &mut out);
        assert_eq!(count(&out.1, Metric::AuditSinkDelivered), 2);
        assert_eq!(count(&out.1, Metric::AuditSinkDropped(SinkDrop::Rejected)), 1);
    }

    #[test]
    fn events_without_a_tenant_go_to_their_own_path_or_are_counted_as_skipped() {
        let mut sink = Sink::new(config());
        let mut out = captured();
        sink.offer(None, &event(0), 0, &mut out);
        assert_eq!((sink.held(), count(&out.1, Metric::AuditSinkUntenantedSkipped)), (0, 1));
        let mut sink = Sink::new(SinkConfig { untenanted_path: Some("/fhir/untenanted".into()), ..config() });
        sink.offer(None, &event(0), 0, &mut out);
        sink.on_tick(1_000, &mut out);
        assert_eq!(out.0.last().map(|f| f.1.as_str()), Some("/fhir/untenanted"));
    }

    #[test]
    fn a_batch_never_answered_is_given_up_as_a_failed_attempt() {
        let mut sink = Sink::new(SinkConfig { attempts: 1, ..config() });
        let mut out = captured();
        sink.offer(Some("a"), &event(0), 0, &mut out);
        sink.on_tick(1_000, &mut out);
        assert_eq!(sink.on_tick(1_000 + 2_000 + LOST_AFTER_MS, &mut out), Released(1));
        assert_eq!(count(&out.1, Metric::AuditSinkDropped(SinkDrop::RetriesExhausted)), 1);
        let id = out.0[0].0;
        assert_eq!(sink.on_result(id, Some("200"), b"", 9_000, &mut out), Released(0), "a late answer is ignored");
        assert_eq!(count(&out.1, Metric::AuditSinkDelivered), 0);
        assert!(fetches(&out.1).len() == 1);
    }

    #[test]
    fn the_batch_response_parser_reads_statuses_and_refuses_the_rest() {
        let ok = br#"{"resourceType":"Bundle","type":"batch-response","entry":[{"response":{"status":"201 Created"}},{"response":{"status":"2xx"}},{},{"response":{"status":"404"}}]}"#;
        assert_eq!(parse_batch_response(ok), Ok(vec![true, false, false, false]));
        for bad in [&b"not json"[..], br#"{"resourceType":"Bundle","type":"batch"}"#, br#"{"type":"batch-response"}"#] {
            assert_eq!(parse_batch_response(bad), Err(NotABatchResponse));
        }
    }

    proptest::proptest! {
        #[test]
        fn any_answer_parses_or_is_refused_without_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_batch_response(&body);
        }

        #[test]
        fn a_batch_response_gives_each_entrys_verdict(statuses in proptest::collection::vec((100u16..600, "[ A-Za-z]{0,8}"), 0..20)) {
            let entries: Vec<serde_json::Value> = statuses
                .iter()
                .map(|(code, phrase)| serde_json::json!({"response": {"status": format!("{code}{phrase}")}}))
                .collect();
            let body = serde_json::json!({"resourceType": "Bundle", "type": "batch-response", "entry": entries});
            let got = parse_batch_response(body.to_string().as_bytes());
            let want: Vec<bool> = statuses
                .iter()
                .map(|(code, phrase)| (200..300).contains(code) && (phrase.is_empty() || phrase.starts_with(' ')))
                .collect();
            proptest::prop_assert_eq!(got, Ok(want));
        }

        #[test]
        fn held_never_exceeds_the_bound_and_every_event_is_accounted_for(
            steps in proptest::collection::vec((0u8..4, 0u8..3, 0u16..600), 0..200)
        ) {
            let mut sink = Sink::new(config());
            let mut out = Captured(Vec::new(), Recorded::default());
            let mut now = 0;
            let mut offered = 0usize;
            for (op, tenant, status) in steps {
                now += 37;
                match op {
                    0 | 1 => {
                        offered += 1;
                        sink.offer(Some(["a", "b", "c"][usize::from(tenant)]), "{}", now, &mut out);
                    }
                    2 => {
                        sink.on_tick(now, &mut out);
                    }
                    _ => {
                        if let Some((id, _, _)) = out.0.last().cloned() {
                            let s = status.to_string();
                            sink.on_result(id, (status >= 100).then_some(s.as_str()), b"", now, &mut out);
                        }
                    }
                }
                proptest::prop_assert!(sink.held() <= 5);
            }
            let ended = count(&out.1, Metric::AuditSinkDelivered)
                + count(&out.1, Metric::AuditSinkDropped(SinkDrop::QueueFull))
                + count(&out.1, Metric::AuditSinkDropped(SinkDrop::Rejected))
                + count(&out.1, Metric::AuditSinkDropped(SinkDrop::RetriesExhausted));
            proptest::prop_assert_eq!(ended + sink.held(), offered);
        }
    }
}
