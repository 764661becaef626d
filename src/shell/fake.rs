//! A fake host for the shell's tests: it serves the inputs a test sets and records every host call as one
//! line, so that a test can assert the exact sequence of host calls an event makes.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use crate::effect::Level;
use crate::headers::tests::serialize;

use super::host::{ForeignCall, Host, MetricKind, SharedWrite};

/// What the fake host serves and what it saw.
#[derive(Default)]
pub struct State {
    pub now_ms: Cell<u64>,
    /// The nanosecond clock: each read is 1,500 ns after the one before.
    pub now_ns: Cell<u64>,
    /// The downstream peer's address (`source.address`; `None` until a test sets it: then the fake says
    /// `127.0.0.1:50102`).
    pub source_address: RefCell<Option<String>>,
    pub plugin_configuration: RefCell<Vec<u8>>,
    pub env: RefCell<HashMap<String, String>>,
    pub request_headers: RefCell<Vec<(String, Vec<u8>)>>,
    pub request_body: RefCell<Vec<u8>>,
    pub response_headers: RefCell<HashMap<String, String>>,
    pub response_body: RefCell<Vec<u8>>,
    /// The `:status` and body of the next HTTP call response delivered.
    pub call_status: RefCell<Option<String>>,
    pub call_headers: RefCell<Vec<(String, String)>>,
    pub call_body: RefCell<Vec<u8>>,
    /// When set, `dispatch` fails with this.
    pub dispatch_error: RefCell<Option<String>>,
    /// What `verify_signature` answers (`None`: the host has no such function).
    pub verify_signature: RefCell<Option<Vec<u8>>>,
    /// Context ids that no longer exist.
    pub gone: RefCell<Vec<u32>>,
    next_token: Cell<u32>,
    metric_names: RefCell<Vec<String>>,
    /// Counter and gauge values by name.
    pub metrics: RefCell<HashMap<String, i64>>,
    /// Every call, in order.
    pub calls: RefCell<Vec<String>>,
    /// The shared data: value and CAS token by key.
    pub shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    /// The next this many shared-data writes lose, as if another worker wrote first (its token moves on).
    pub shared_conflicts: Cell<u32>,
    /// When set, the host has no shared data.
    pub no_shared_data: Cell<bool>,
}

/// The fake host: cheap to clone (every clone shares one [`State`]).
#[derive(Clone, Default)]
pub struct FakeHost(pub Rc<State>);

impl FakeHost {
    fn record(&self, call: String) {
        self.0.calls.borrow_mut().push(call);
    }

    /// The calls recorded since the last `take_calls`.
    pub fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.calls.borrow_mut())
    }

    /// Sets the request headers (pseudo-headers included) for the next request.
    pub fn request(&self, headers: &[(&str, &str)]) {
        *self.0.request_headers.borrow_mut() =
            headers.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect();
    }

    /// A metric's value by its full name.
    pub fn metric(&self, name: &str) -> i64 {
        self.0.metrics.borrow().get(&format!("fhir_tenant_router.{name}")).copied().unwrap_or(0)
    }
}

/// The first `n` bytes of `body` (all of it if shorter).
fn prefix(body: &[u8], n: usize) -> Vec<u8> {
    body.get(..n.min(body.len())).unwrap_or_default().to_vec()
}

impl Host for FakeHost {
    fn now_ms(&self) -> u64 {
        self.0.now_ms.get()
    }

    fn source_address(&self) -> Option<String> {
        self.record("get_property source.address".into());
        Some(self.0.source_address.borrow().clone().unwrap_or_else(|| "127.0.0.1:50102".into()))
    }

    fn now_ns(&self) -> u64 {
        self.record("now_ns".into());
        self.0.now_ns.set(self.0.now_ns.get() + 1500);
        self.0.now_ns.get()
    }

    fn log(&self, level: Level, message: &str) {
        self.record(format!("log {level:?} {message}"));
    }

    fn plugin_configuration(&self) -> Vec<u8> {
        self.0.plugin_configuration.borrow().clone()
    }

    fn set_tick_period_ms(&self, period_ms: u64) {
        self.record(format!("set_tick_period {period_ms}"));
    }

    fn memory_bytes(&self) -> u64 {
        1 << 20
    }

    fn env(&self, name: &str) -> Option<String> {
        self.0.env.borrow().get(name).cloned()
    }

    fn request_header_pairs(&self) -> Vec<u8> {
        self.record("get_request_headers".into());
        let headers = self.0.request_headers.borrow();
        serialize(&headers.iter().map(|(n, v)| (n.as_bytes(), v.as_slice())).collect::<Vec<_>>())
    }

    /// Envoy's `replaceHeaderMapValue` (`setCopy`: every entry of the name removed, one added at the end)
    /// and `removeHeaderMapValue` (every entry removed), on the map later reads see.
    fn set_request_header(&self, name: &str, value: Option<&str>) {
        match value {
            Some(v) => self.record(format!("set_request_header {name}: {v}")),
            None => self.record(format!("remove_request_header {name}")),
        }
        let mut headers = self.0.request_headers.borrow_mut();
        headers.retain(|(n, _)| n != name);
        if let Some(v) = value {
            headers.push((name.to_string(), v.as_bytes().to_vec()));
        }
    }

    fn request_body(&self, max: usize) -> Vec<u8> {
        self.record("get_request_body".into());
        prefix(&self.0.request_body.borrow(), max)
    }

    fn response_header(&self, name: &str) -> Option<String> {
        self.0.response_headers.borrow().get(name).cloned()
    }

    fn set_response_header(&self, name: &str, value: Option<&str>) {
        match value {
            Some(v) => self.record(format!("set_response_header {name}: {v}")),
            None => self.record(format!("remove_response_header {name}")),
        }
    }

    fn response_body(&self, size: usize) -> Vec<u8> {
        self.record("get_response_body".into());
        prefix(&self.0.response_body.borrow(), size)
    }

    fn set_response_body(&self, size: usize, body: &[u8]) {
        self.record(format!("set_response_body {size} {}", String::from_utf8_lossy(body)));
    }

    fn send_reply(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        self.record(format!("send_reply {status} {headers:?} {}", String::from_utf8_lossy(body)));
    }

    fn resume_request(&self) {
        self.record("resume_request".into());
    }

    fn set_effective_context(&self, context_id: u32) -> bool {
        self.record(format!("set_effective_context {context_id}"));
        !self.0.gone.borrow().contains(&context_id)
    }

    fn clear_route_cache(&self) {
        self.record("clear_route_cache".into());
    }

    fn set_filter_state(&self, key: &str, value: &str) {
        self.record(format!("set_filter_state {key}={value}"));
    }

    fn define_metric(&self, _kind: MetricKind, name: &str) -> Option<u32> {
        let mut names = self.0.metric_names.borrow_mut();
        names.push(name.to_string());
        u32::try_from(names.len() - 1).ok()
    }

    fn increment_metric(&self, id: u32, by: i64) {
        let name = self.0.metric_names.borrow()[id as usize].clone();
        *self.0.metrics.borrow_mut().entry(name).or_default() += by;
    }

    fn record_metric(&self, id: u32, value: u64) {
        let name = self.0.metric_names.borrow()[id as usize].clone();
        self.0.metrics.borrow_mut().insert(name, value as i64);
    }

    fn dispatch(&self, cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout_ms: u64) -> Result<u32, String> {
        if body.is_empty() {
            self.record(format!("dispatch {cluster} {headers:?} {timeout_ms}"));
        } else {
            self.record(format!("dispatch {cluster} {headers:?} {timeout_ms} body={}", String::from_utf8_lossy(body)));
        }
        if let Some(e) = self.0.dispatch_error.borrow().clone() {
            return Err(e);
        }
        let token = self.0.next_token.get() + 1;
        self.0.next_token.set(token);
        Ok(token)
    }

    fn call_response_status(&self) -> Option<String> {
        self.0.call_status.borrow().clone()
    }

    fn call_response_headers(&self) -> Vec<(String, String)> {
        self.0.call_headers.borrow().clone()
    }

    fn call_response_body(&self, size: usize) -> Vec<u8> {
        prefix(&self.0.call_body.borrow(), size)
    }

    fn shared_data(&self, key: &str) -> Option<(Option<Vec<u8>>, u32)> {
        self.record(format!("get_shared_data {key}"));
        if self.0.no_shared_data.get() {
            return None;
        }
        Some(match self.0.shared.borrow().get(key) {
            Some((value, cas)) => (Some(value.clone()), *cas),
            None => (None, 0),
        })
    }

    fn set_shared_data(&self, key: &str, value: &[u8], cas: u32) -> SharedWrite {
        self.record(format!("set_shared_data {key} cas={cas}"));
        if self.0.no_shared_data.get() {
            return SharedWrite::Failed;
        }
        let mut shared = self.0.shared.borrow_mut();
        let entry = shared.entry(key.to_string()).or_insert_with(|| (Vec::new(), 0));
        if self.0.shared_conflicts.get() > 0 {
            self.0.shared_conflicts.set(self.0.shared_conflicts.get() - 1);
            entry.1 += 1;
            return SharedWrite::CasMismatch;
        }
        // Envoy's rule: a CAS of 0 writes unconditionally; any other must match.
        if cas != 0 && cas != entry.1 {
            return SharedWrite::CasMismatch;
        }
        *entry = (value.to_vec(), entry.1 + 1);
        SharedWrite::Stored
    }

    fn verify_signature(&self, _arguments: &[u8]) -> ForeignCall {
        self.record("call_foreign_function verify_signature".into());
        match self.0.verify_signature.borrow().clone() {
            Some(answer) => ForeignCall::Answered(answer),
            None => ForeignCall::NotFound,
        }
    }
}
