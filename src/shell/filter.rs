//! The HTTP context: each callback reads its inputs from the host, hands them to the core with this
//! request's [`Stream`], and applies the effects. Nothing from the request (path, query, token, body) is
//! ever logged.

use std::rc::Rc;

use crate::effect::Flow;
use crate::headers::Pairs;
use crate::router::{Stream, MAX_BUNDLE_BYTES};

use super::host::Host;
use super::state::Shared;

/// One request's context.
pub struct Filter<H> {
    shared: Rc<Shared<H>>,
    context_id: u32,
    /// `None` while the stream is parked in [`Shared::parked`] (waiting for a key set, or woken and not yet
    /// taken back).
    stream: Option<Stream>,
}

impl<H: Host> Filter<H> {
    pub fn new(shared: Rc<Shared<H>>, stream: Stream) -> Self {
        Self { context_id: stream.context_id(), shared, stream: Some(stream) }
    }

    /// Takes back a stream that was parked and has been woken (a still waiting one stays parked).
    fn take_back(&mut self) {
        if self.stream.is_none() {
            let mut parked = self.shared.parked.borrow_mut();
            if parked.get(&self.context_id).is_some_and(|s| !s.is_waiting()) {
                self.stream = parked.remove(&self.context_id);
            }
        }
    }

    /// Parks the stream when `flow` says it waits (woken by context id from the shared state).
    fn park_if_waiting(&mut self, flow: Flow) {
        if flow == Flow::WaitForKeys {
            if let Some(stream) = self.stream.take() {
                self.shared.parked.borrow_mut().insert(self.context_id, stream);
            }
        }
    }

    /// Runs `f` on this request's stream, wherever it is: here, or parked (a woken one is taken back).
    fn with_stream<T>(&mut self, f: impl FnOnce(&Shared<H>, &mut Stream) -> T) -> Option<T> {
        self.take_back();
        if self.stream.is_none() {
            let mut parked = self.shared.parked.borrow_mut();
            let stream = parked.get_mut(&self.context_id)?;
            return Some(f(&self.shared, stream));
        }
        let stream = self.stream.as_mut()?;
        Some(f(&self.shared, stream))
    }

    /// The bench floor's headers for `tenant` (cargo feature `bench-floor-wasm`, see `floor`): the tenant
    /// header's name, the route header's name and the tenant's cluster.
    #[cfg(feature = "bench-floor-wasm")]
    pub fn floor_route(&self, tenant: &str) -> (String, String, String) {
        let router = self.shared.router.borrow();
        let config = &router.config;
        let cluster = config.tenants.get(tenant).map_or(String::new(), |t| t.cluster.clone());
        (config.tenant_header.clone(), config.route_header.clone(), cluster)
    }

    pub fn on_request_headers(&mut self, end_of_stream: bool) -> Flow {
        let shared = Rc::clone(&self.shared);
        let Some(stream) = self.stream.as_mut() else { return Flow::Continue };
        let host = &shared.host;
        let raw = host.request_header_pairs();
        // A malformed map reads as no headers at all: the request is then refused for want of a token.
        let pairs = Pairs::new(&raw).into_iter().flatten();
        let now = host.now_ms();
        if shared.router.borrow().wants_client_address() {
            stream.set_client_address(host.source_address().as_deref());
        }
        let mut apply = shared.apply();
        let flow = shared.router.borrow_mut().on_request_headers(
            stream,
            pairs,
            end_of_stream,
            now,
            &shared.signatures,
            &mut apply,
        );
        let unsent = apply.unsent;
        shared.keep_headers_if_wanted(stream);
        self.park_if_waiting(flow);
        // A token request that could not be sent fails at once (and wakes this request, parked for it).
        shared.unsent(unsent);
        flow
    }

    /// The response of a request sent with an upstream token: a 401 sends it again with a new token (the
    /// response is held, and the stream parked, meanwhile).
    fn upstream_refused(&mut self) -> Option<Flow> {
        let shared = Rc::clone(&self.shared);
        let stream = self.stream.as_mut()?;
        let status = shared.host.response_header(":status");
        let now = shared.host.now_ms();
        let mut apply = shared.apply();
        let flow = shared.router.borrow_mut().on_upstream_response(stream, status.as_deref(), now, &mut apply)?;
        let unsent = apply.unsent;
        self.park_if_waiting(flow);
        shared.unsent(unsent);
        Some(flow)
    }

    /// The answer to a call this request's context sent (an upstream token request): the shared handler's.
    pub fn on_http_call_response(&mut self, token: u32, body_size: usize) {
        self.shared.on_http_call_response(token, body_size);
    }

    pub fn on_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Flow {
        self.with_stream(|shared, stream| {
            let host = &shared.host;
            let mut body = || host.request_body(body_size.min(MAX_BUNDLE_BYTES));
            let mut apply = shared.apply();
            shared.router.borrow_mut().on_request_body(stream, end_of_stream, host.now_ms(), &mut body, &mut apply)
        })
        .unwrap_or(Flow::Continue)
    }

    /// The request ended with trailers: its body is complete (see [`Router::on_request_trailers`]). The
    /// body is read as at a wake, whole from Envoy's buffer.
    pub fn on_request_trailers(&mut self) -> Flow {
        self.with_stream(|shared, stream| {
            let host = &shared.host;
            let mut body = || host.request_body(MAX_BUNDLE_BYTES);
            let mut apply = shared.apply();
            shared.router.borrow_mut().on_request_trailers(stream, host.now_ms(), &mut body, &mut apply)
        })
        .unwrap_or(Flow::Continue)
    }

    pub fn on_response_headers(&mut self, end_of_stream: bool) -> Flow {
        self.take_back();
        if self.stream.as_ref().is_some_and(Stream::may_resend) {
            if let Some(flow) = self.upstream_refused() {
                return flow;
            }
        }
        self.with_stream(|shared, stream| {
            let host = &shared.host;
            let header = |name: &str| host.response_header(name);
            let mut apply = shared.apply();
            shared.router.borrow().on_response_headers(stream, end_of_stream, &header, &mut apply)
        })
        .unwrap_or(Flow::Continue)
    }

    pub fn on_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Flow {
        self.with_stream(|shared, stream| {
            let host = &shared.host;
            let mut body = || host.response_body(body_size);
            let mut apply = shared.apply();
            apply.response_body_size = body_size;
            shared.router.borrow().on_response_body(stream, end_of_stream, &mut body, &mut apply)
        })
        .unwrap_or(Flow::Continue)
    }

    /// The answer ended with trailers (see [`Router::on_response_trailers`]).
    pub fn on_response_trailers(&mut self) -> Flow {
        self.with_stream(|shared, stream| {
            let mut apply = shared.apply();
            shared.router.borrow().on_response_trailers(stream, &mut apply)
        })
        .unwrap_or(Flow::Continue)
    }

    /// The request is over: a parked one leaves the queue and the shell at once.
    pub fn on_done(&mut self) {
        let parked = self.shared.parked.borrow_mut().remove(&self.context_id);
        if let Some(mut stream) = parked.or_else(|| self.stream.take()) {
            self.shared.router.borrow_mut().on_stream_done(&mut stream);
        }
    }
}
