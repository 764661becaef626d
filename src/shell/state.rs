//! The shell's state, in one place: what the root context builds in `on_configure` and every HTTP
//! context of that VM shares.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::audit_sink::{Sink, MAX_RESPONSE_BYTES};
use crate::crypto::Signatures;
use crate::effect::FetchTarget;
use crate::router::{Router, Stream, MAX_BUNDLE_BYTES};
use crate::upkeep::FetchResult;

use super::apply::Apply;
use super::host::Host;
use super::host_crypto::HostCrypto;
use super::metrics::Metrics;

/// Everything the contexts of one VM share.
pub struct Shared<H> {
    pub host: H,
    pub router: RefCell<Router>,
    pub signatures: Signatures<HostCrypto<H>>,
    pub metrics: Metrics,
    /// The root context's calls in flight, by token.
    pub calls: RefCell<HashMap<u32, FetchTarget>>,
    /// Requests parked until a key set arrives, by context id, and woken ones not yet taken back by their
    /// context: the root context cannot reach an HTTP context, so a parked stream is kept here meanwhile.
    pub parked: RefCell<HashMap<u32, Stream>>,
    /// This VM's audit sink (`audit_sink`): its requests' AuditEvents, batched and posted from its ticks.
    pub sink: Option<RefCell<Sink>>,
}

impl<H: Host> Shared<H> {
    /// An effect interpreter over this VM's host.
    pub fn apply(&self) -> Apply<'_, H> {
        let mut apply = Apply::new(&self.host, &self.metrics, &self.calls);
        apply.sink = self.sink.as_ref();
        apply
    }

    /// The audit sink's tick: batches due are posted (one that cannot be sent ends at once, as failed).
    pub fn sink_tick(&self, now: u64) {
        let Some(sink) = &self.sink else { return };
        let unsent = {
            let mut apply = self.apply();
            sink.borrow_mut().on_tick(now, &mut apply);
            apply.unsent
        };
        self.unsent(unsent);
    }

    /// The answer to an audit batch (`status` `None`: none came, or it was not sent).
    fn sink_result(&self, batch: u32, status: Option<&str>, body: &[u8]) {
        let Some(sink) = &self.sink else { return };
        let now = self.host.now_ms();
        let unsent = {
            let mut apply = self.apply();
            sink.borrow_mut().on_result(batch, status, body, now, &mut apply);
            apply.unsent
        };
        self.unsent(unsent);
    }

    /// The answer to a fetch (`body_size`: its body's length), delivered to the root context or to the
    /// request context that sent it (an upstream token request).
    pub fn on_http_call_response(&self, token: u32, body_size: usize) {
        let Some(target) = self.calls.borrow_mut().remove(&token) else { return };
        let status = self.host.call_response_status();
        if let FetchTarget::AuditSink(batch) = target {
            // The body is read only to check a 2xx batch-response's entries.
            let ok = status.as_deref().is_some_and(|s| s.starts_with('2'));
            let body = if ok && body_size <= MAX_RESPONSE_BYTES {
                self.host.call_response_body(body_size)
            } else {
                Vec::new()
            };
            self.sink_result(batch, status.as_deref(), &body);
            return;
        }
        if let FetchTarget::Resend(context_id) = target {
            let headers = self.host.call_response_headers();
            let body = self.host.call_response_body(body_size);
            let status = status.as_deref().ok_or("connection failure or timeout");
            self.resent(context_id, status, &headers, &body);
            return;
        }
        self.fetch_ended(target, FetchResult::Answer { status: status.as_deref(), body_size }, body_size);
    }

    /// The answer to a request sent again (`status` `Err(why)`: none came): the client gets it.
    fn resent(&self, context_id: u32, status: Result<&str, &str>, headers: &[(String, String)], body: &[u8]) {
        let Some(mut stream) = self.parked.borrow_mut().remove(&context_id) else { return };
        if self.host.set_effective_context(context_id) {
            let mut apply = self.apply();
            self.router.borrow_mut().on_resend_response(&mut stream, status, headers, body, &mut apply);
        }
        self.parked.borrow_mut().insert(context_id, stream);
    }

    /// A fetch ended: the core installs what came, and the requests that waited for it are woken. A fetch
    /// the core starts meanwhile that cannot be sent ends at once, the same way.
    pub fn fetch_ended(&self, target: FetchTarget, result: FetchResult<'_>, body_size: usize) {
        if let FetchTarget::AuditSink(batch) = target {
            self.sink_result(batch, None, &[]);
            return;
        }
        if let FetchTarget::Resend(context_id) = target {
            let why = match &result {
                FetchResult::NotSent(why) => why,
                FetchResult::Answer { .. } => "no answer",
            };
            self.resent(context_id, Err(why), &[], &[]);
            return;
        }
        let host = &self.host;
        let now = host.now_ms();
        let (woken, unsent) = {
            let mut apply = self.apply();
            let mut body = || host.call_response_body(body_size);
            let env = |name: &str| host.env(name);
            let woken = self.router.borrow_mut().on_fetch_result(target, result, now, &mut body, &env, &mut apply).wake;
            (woken, apply.unsent)
        };
        self.wake(woken, now);
        self.unsent(unsent);
    }

    /// Fetches that could not be sent: each ends at once, as failed.
    pub fn unsent(&self, unsent: Vec<(FetchTarget, String)>) {
        for (target, why) in unsent {
            self.fetch_ended(target, FetchResult::NotSent(&why), 0);
        }
    }

    /// Keeps a request's headers as they leave if it may be sent again after a 401: Envoy shows no request
    /// headers once the response has begun.
    pub fn keep_headers_if_wanted(&self, stream: &mut Stream) {
        if stream.wants_headers() {
            stream.keep_headers(&self.host.request_header_pairs());
        }
    }

    /// Wakes parked requests: each is decided again in its own context.
    pub fn wake(&self, woken: Vec<u32>, now: u64) {
        let host = &self.host;
        for context_id in woken {
            let Some(mut stream) = self.parked.borrow_mut().remove(&context_id) else { continue };
            if !host.set_effective_context(context_id) {
                continue; // the client went away
            }
            let unsent = {
                let mut apply = self.apply();
                let mut body = || host.request_body(MAX_BUNDLE_BYTES);
                self.router.borrow_mut().wake(&mut stream, now, &self.signatures, &mut body, &mut apply);
                apply.unsent
            };
            self.keep_headers_if_wanted(&mut stream);
            // Its context takes the stream back at its next callback.
            self.parked.borrow_mut().insert(context_id, stream);
            self.unsent(unsent);
        }
    }
}
