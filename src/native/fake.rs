//! A fake Envoy for the dynamic-module shell's unit tests. It drives the hooks the way Envoy does, records
//! every callback as one line (so a test asserts the exact sequence), and enforces Envoy's rules, so that
//! breaking one cannot go unnoticed:
//!
//! - Header memory: the bytes a header getter hands out are Envoy's and valid only until the next setter or
//!   remover on that map. Here every such change overwrites all bytes handed out for that map with `X`s
//!   (they stay allocated, so a test process that reads them stays sound, but reads garbage).
//! - Re-entry: a local reply (`send_response`) ends the stream inside the call, as Envoy does: the
//!   stream-complete hook runs before `send_response` returns. `continue_decoding` does the same when the
//!   test says the upstream answers locally (`no healthy upstream`). Every hook entered while a hook of the
//!   same stream is on the stack is recorded as `re-entered <hook> (inside <outer>)`, and every callback a
//!   re-entered hook makes is recorded with a `!! ` prefix and listed in [`FakeEnvoy::violations`]: work
//!   done there would run while the outer hook's state is still in use.
//! - Filter state: Envoy 1.40 stores a dynamic module's filter state read-only
//!   (`set_filter_state_bytes` sets `StateType::ReadOnly`), so a second write of one key on a stream is
//!   an Envoy bug report, not an update: it is recorded as `!! set_filter_state twice <key>` (a violation).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::effect::Level;

use super::abi::*;
use super::envoy::Envoy;
use super::module;

thread_local! {
    /// Whether control is in the module (inside a hook, outside the fake's own callbacks).
    static IN_MODULE: Cell<bool> = const { Cell::new(false) };
    /// Heap allocations the module made on this thread.
    static MODULE_ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

/// Counts the allocations the module makes (the fake's own are not counted).
struct Counting;

#[global_allocator]
static COUNTING: Counting = Counting;

fn count_allocation() {
    let _ = IN_MODULE.try_with(|m| {
        if m.get() {
            let _ = MODULE_ALLOCATIONS.try_with(|a| a.set(a.get() + 1));
        }
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; counting touches only const-initialised
// thread-locals (no allocation, no reentry).
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        count_allocation();
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        count_allocation();
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        count_allocation();
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

/// The allocations the module has made on this thread so far.
pub fn module_allocations() -> u64 {
    MODULE_ALLOCATIONS.with(Cell::get)
}

/// While alive, control is in the fake (its allocations are not the module's).
struct InFake(bool);

fn in_fake() -> InFake {
    InFake(IN_MODULE.with(|m| m.replace(false)))
}

impl Drop for InFake {
    fn drop(&mut self) {
        IN_MODULE.with(|m| m.set(self.0));
    }
}

/// A header's name and value, in Envoy's memory.
type Header = (Box<[u8]>, Box<[u8]>);

/// A header map whose handed-out bytes are poisoned by any change.
#[derive(Default)]
struct HeaderMap {
    live: Vec<Header>,
    /// Poisoned bytes of earlier versions, kept allocated.
    graveyard: Vec<Box<[u8]>>,
}

impl HeaderMap {
    fn set_all(&mut self, headers: &[(&str, &str)]) {
        self.poison();
        self.live = headers.iter().map(|(k, v)| (k.as_bytes().into(), v.as_bytes().into())).collect();
    }

    /// A change: every byte handed out so far becomes garbage; the map lives on in fresh memory.
    fn poison(&mut self) {
        let fresh: Vec<Header> = self.live.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (mut k, mut v) in std::mem::replace(&mut self.live, fresh) {
            k.fill(b'X');
            v.fill(b'X');
            self.graveyard.push(k);
            self.graveyard.push(v);
        }
    }

    fn set(&mut self, name: &str, value: Option<&str>) {
        self.poison();
        self.live.retain(|(k, _)| &**k != name.as_bytes());
        if let Some(v) = value {
            self.live.push((name.as_bytes().into(), v.as_bytes().into()));
        }
    }

    fn get(&self, name: &str) -> Option<String> {
        self.live.iter().find(|(k, _)| &**k == name.as_bytes()).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// One stream Envoy runs through the module.
struct FakeStream {
    /// What the stream's `filter` pointer points to (never read: only compared).
    marker: Box<u8>,
    module: FilterModulePtr,
    worker: u32,
    headers: [HeaderMap; 2],
    /// Request body (buffered), response body (buffered).
    request_body: Vec<u8>,
    response_body: Vec<u8>,
    /// The hooks of this stream on the stack, outermost first.
    hooks: Vec<&'static str>,
    completed: bool,
    /// `continue_decoding` ends the stream with a local reply further down the chain.
    upstream_answers_locally: bool,
    scheduler: Option<Box<u8>>,
    local_reply: Option<u32>,
    /// The response headers went on towards the client (this filter's `response_headers` returned continue).
    response_headers_sent: bool,
    /// Filter state set on the stream (read-only once set, as Envoy stores it).
    filter_state: Vec<(String, String)>,
    /// Dynamic metadata set on the stream: (namespace, key, value), later writes overwriting.
    dynamic_metadata: Vec<(String, String, String)>,
}

/// What the fake serves and what it saw.
pub struct State {
    /// Every callback, in order.
    pub calls: RefCell<Vec<String>>,
    streams: RefCell<Vec<FakeStream>>,
    config_marker: Box<u8>,
    config_scheduler: Box<u8>,
    pub config: Cell<ConfigModulePtr>,
    metric_names: RefCell<Vec<String>>,
    /// Counter and gauge values by name (`name{label}` for a labelled one).
    pub metrics: RefCell<HashMap<String, i64>>,
    next_callout: Cell<u64>,
    /// Streams whose scheduler was committed, in order (delivered by [`FakeEnvoy::run_scheduled`]).
    committed: RefCell<Vec<usize>>,
    pub fail_config_scheduler: Cell<bool>,
    pub fail_ticker: Cell<bool>,
    /// The next callback whose line starts with this panics (as a bug in the module would).
    pub panic_on: RefCell<Option<String>>,
    /// Callouts refuse to start with this status.
    pub callout_error: Cell<Option<u32>>,
    /// Envoy <= 1.39: the destroy hook runs right after an inline stream_complete, inside the call that
    /// completed the stream (a local reply, a continue); recorded as `destroy (with N hooks of the stream on
    /// the stack)` then `destroyed`.
    pub destroy_inline: Cell<bool>,
    /// A stream's callout is answered inside `send` (Envoy's AsyncClient calls onSuccess with a 503 when no
    /// healthy upstream is there), and `send` then fails.
    pub callout_answers_inline: Cell<bool>,
    /// A local reply from further down the chain inside `continue_decoding` runs this filter's response
    /// hooks (headers, then body) before the stream completes, as Envoy encodes it through the chain.
    pub local_reply_encoded_through_module: Cell<bool>,
    /// Envoy 1.38: none of the callbacks it lacks (config-level metrics `config_increment_counter` and
    /// `config_set_gauge`; `set_dynamic_metadata_string_batch`). The module must not call them there (the real
    /// one would find no such symbol); the fake panics if it does.
    pub no_config_metrics: Cell<bool>,
    /// Envoy traces nothing (its active span is a `NullSpan`: `get_active_span` answers null).
    pub no_tracing: Cell<bool>,
    /// The downstream peer's address (`source.address`).
    pub source_address: RefCell<Option<String>>,
}

/// The fake Envoy (cheap to clone: every clone shares one [`State`]).
#[derive(Clone)]
pub struct FakeEnvoy(pub Rc<State>);

impl Default for FakeEnvoy {
    fn default() -> Self {
        Self(Rc::new(State {
            calls: RefCell::default(),
            streams: RefCell::default(),
            config_marker: Box::new(0),
            config_scheduler: Box::new(0),
            config: Cell::new(std::ptr::null()),
            metric_names: RefCell::default(),
            metrics: RefCell::default(),
            next_callout: Cell::new(0),
            committed: RefCell::default(),
            fail_config_scheduler: Cell::new(false),
            fail_ticker: Cell::new(false),
            callout_error: Cell::new(None),
            panic_on: RefCell::new(None),
            destroy_inline: Cell::new(false),
            callout_answers_inline: Cell::new(false),
            local_reply_encoded_through_module: Cell::new(false),
            no_config_metrics: Cell::new(false),
            no_tracing: Cell::new(false),
            source_address: RefCell::new(Some("127.0.0.1:50102".into())),
        }))
    }
}

/// A stream of the fake (an index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Id(pub usize);

fn ptr_of(marker: &u8) -> *mut std::ffi::c_void {
    (marker as *const u8).cast_mut().cast()
}

impl FakeEnvoy {
    pub fn set_now_ms(&self, now_ms: u64) {
        super::host::TEST_NOW_MS.with(|c| c.set(now_ms));
    }

    fn record(&self, _filter: Option<FilterEnvoyPtr>, call: String) {
        let reentered = self.0.streams.borrow().iter().any(|s| s.hooks.len() > 1);
        let armed = self.0.panic_on.borrow().as_deref().is_some_and(|p| call.starts_with(p));
        if armed {
            self.0.panic_on.borrow_mut().take();
            panic!("fake Envoy: a panic in the module while it calls {call}");
        }
        let line = if reentered { format!("!! {call}") } else { call };
        self.0.calls.borrow_mut().push(line);
    }

    /// The `filter` pointer Envoy hands stream `id`'s hooks.
    pub fn filter_ptr(&self, id: Id) -> FilterEnvoyPtr {
        self.filter(id)
    }

    /// The filter state set on stream `id`, by key.
    pub fn filter_state(&self, id: Id, key: &str) -> Option<String> {
        let streams = self.0.streams.borrow();
        streams.get(id.0)?.filter_state.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    /// The dynamic metadata of stream `id` under `namespace`, by key.
    pub fn dynamic_metadata(&self, id: Id, namespace: &str, key: &str) -> Option<String> {
        let streams = self.0.streams.borrow();
        let entries = &streams.get(id.0)?.dynamic_metadata;
        entries.iter().find(|(n, k, _)| n == namespace && k == key).map(|(_, _, v)| v.clone())
    }

    /// The calls recorded since the last `take_calls`.
    pub fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.calls.borrow_mut())
    }

    pub fn metric(&self, name: &str) -> i64 {
        self.0.metrics.borrow().get(&format!("fhir_tenant_router.{name}")).copied().unwrap_or(0)
    }

    fn envoy_config(&self) -> ConfigEnvoyPtr {
        ptr_of(&self.0.config_marker)
    }

    fn find(&self, filter: FilterEnvoyPtr) -> Option<usize> {
        self.0.streams.borrow().iter().position(|s| ptr_of(&s.marker) == filter)
    }

    pub fn filter(&self, id: Id) -> FilterEnvoyPtr {
        ptr_of(&self.0.streams.borrow()[id.0].marker)
    }

    fn stream_mut<T>(&self, filter: FilterEnvoyPtr, f: impl FnOnce(&mut FakeStream) -> T) -> Option<T> {
        let id = self.find(filter)?;
        self.0.streams.borrow_mut().get_mut(id).map(f)
    }

    /// Runs hook `name` of stream `id` as Envoy does: with the stream's pointers, tracking what is on the stack.
    fn enter<T>(&self, id: Id, name: &'static str, hook: impl FnOnce(FilterEnvoyPtr, FilterModulePtr) -> T) -> T {
        let (filter, module, outer) = {
            let mut streams = self.0.streams.borrow_mut();
            let s = &mut streams[id.0];
            let outer = s.hooks.last().copied();
            s.hooks.push(name);
            (ptr_of(&s.marker), s.module, outer)
        };
        if let Some(outer) = outer {
            self.0.calls.borrow_mut().push(format!("re-entered {name} (inside {outer})"));
        }
        let was = IN_MODULE.with(|m| m.replace(true));
        let out = hook(filter, module);
        IN_MODULE.with(|m| m.set(was));
        self.0.streams.borrow_mut()[id.0].hooks.pop();
        out
    }

    // ---- driving the module, as Envoy does ----

    /// `config_new` with this plugin JSON: whether the module accepted it.
    pub fn configure(&self, json: &str) -> bool {
        let config = module::config_new(self, self.envoy_config(), json.as_bytes());
        self.0.config.set(config);
        !config.is_null()
    }

    /// A new stream on `worker` (`filter_new`).
    pub fn new_stream(&self, worker: u32) -> Id {
        let stream = FakeStream {
            marker: Box::new(0),
            module: std::ptr::null(),
            worker,
            headers: Default::default(),
            request_body: Vec::new(),
            response_body: Vec::new(),
            hooks: Vec::new(),
            completed: false,
            upstream_answers_locally: false,
            scheduler: None,
            local_reply: None,
            response_headers_sent: false,
            filter_state: Vec::new(),
            dynamic_metadata: Vec::new(),
        };
        let id = {
            let mut streams = self.0.streams.borrow_mut();
            streams.push(stream);
            Id(streams.len() - 1)
        };
        let filter = self.filter(id);
        // SAFETY: the config came from config_new and is alive; `filter` is this stream.
        let module = unsafe { module::filter_new(self, self.0.config.get(), filter) };
        self.0.streams.borrow_mut()[id.0].module = module;
        id
    }

    /// The request's headers arrive (`request_headers`).
    pub fn request_headers(&self, id: Id, headers: &[(&str, &str)], end_of_stream: bool) -> u32 {
        self.0.streams.borrow_mut()[id.0].headers[0].set_all(headers);
        // SAFETY: the stream's own pointers, on this (its worker's) thread.
        self.enter(id, "request_headers", |f, m| unsafe { module::request_headers(self, f, m, end_of_stream) })
    }

    /// The whole request body arrives in one frame (`request_body`, end of stream).
    pub fn request_body(&self, id: Id, body: &[u8]) -> u32 {
        self.0.streams.borrow_mut()[id.0].request_body = body.to_vec();
        // SAFETY: as in `request_headers`.
        self.enter(id, "request_body", |f, m| unsafe { module::request_body(self, f, m, true) })
    }

    /// The request's body so far is `body` (not ended), then its trailers arrive (`request_body` with
    /// end_of_stream false, then `request_trailers`): the trailers hook's status.
    pub fn request_body_then_trailers(&self, id: Id, body: &[u8]) -> (u32, u32) {
        self.0.streams.borrow_mut()[id.0].request_body = body.to_vec();
        // SAFETY: as in `request_headers`.
        let body_status = self.enter(id, "request_body", |f, m| unsafe { module::request_body(self, f, m, false) });
        // SAFETY: as in `request_headers`.
        let trailers = self.enter(id, "request_trailers", |f, m| unsafe { module::request_trailers(self, f, m) });
        (body_status, trailers)
    }

    /// The upstream's response headers arrive (`response_headers`).
    pub fn response_headers(&self, id: Id, headers: &[(&str, &str)], end_of_stream: bool) -> u32 {
        self.0.streams.borrow_mut()[id.0].headers[1].set_all(headers);
        // SAFETY: as in `request_headers`.
        let status =
            self.enter(id, "response_headers", |f, m| unsafe { module::response_headers(self, f, m, end_of_stream) });
        if status == HEADERS_CONTINUE {
            self.0.streams.borrow_mut()[id.0].response_headers_sent = true;
        }
        status
    }

    /// The whole response body arrives in one frame (`response_body`, end of stream).
    pub fn response_body(&self, id: Id, body: &[u8]) -> u32 {
        self.0.streams.borrow_mut()[id.0].response_body = body.to_vec();
        // SAFETY: as in `request_headers`.
        self.enter(id, "response_body", |f, m| unsafe { module::response_body(self, f, m, true) })
    }

    /// The stream ends (`stream_complete`, once), unless it already has.
    pub fn complete(&self, id: Id) {
        if std::mem::replace(&mut self.0.streams.borrow_mut()[id.0].completed, true) {
            return;
        }
        // SAFETY: as in `request_headers`.
        self.enter(id, "stream_complete", |f, m| unsafe { module::stream_complete(self, f, m) });
        if self.0.destroy_inline.get() {
            let on_stack = self.0.streams.borrow()[id.0].hooks.len();
            self.0.calls.borrow_mut().push(format!("destroy (with {on_stack} hooks of the stream on the stack)"));
            self.destroy(id);
            self.0.calls.borrow_mut().push("destroyed".into());
        }
    }

    /// Envoy destroys the stream's filter (`destroy`).
    pub fn destroy(&self, id: Id) {
        let module = std::mem::replace(&mut self.0.streams.borrow_mut()[id.0].module, std::ptr::null());
        // SAFETY: created by filter_new, destroyed once.
        unsafe { module::filter_destroy(self, module) };
    }

    /// The upstream answers a continued request of `id` locally (no healthy upstream): `continue_decoding`
    /// ends the stream inside the call.
    pub fn upstream_answers_locally(&self, id: Id) {
        self.0.streams.borrow_mut()[id.0].upstream_answers_locally = true;
    }

    /// The local reply sent on stream `id`, if any.
    pub fn local_reply(&self, id: Id) -> Option<u32> {
        self.0.streams.borrow()[id.0].local_reply
    }

    /// A request header of stream `id` as Envoy has it now.
    pub fn request_header(&self, id: Id, name: &str) -> Option<String> {
        self.0.streams.borrow()[id.0].headers[0].get(name)
    }

    /// Delivers every committed stream scheduler's event (`scheduled`), in order.
    pub fn run_scheduled(&self) {
        let committed = std::mem::take(&mut *self.0.committed.borrow_mut());
        for id in committed {
            let id = Id(id);
            // SAFETY: as in `request_headers`.
            self.enter(id, "scheduled", |f, m| unsafe { module::scheduled(self, f, m) });
        }
    }

    /// A config-level tick on the main thread (`config_scheduled`).
    pub fn tick(&self) {
        // SAFETY: the config from config_new, alive; this thread is the main thread.
        unsafe { module::config_scheduled(self, self.envoy_config(), self.0.config.get()) }
    }

    /// Answers the config-level callout `callout_id` with `status` and `body` (`config_http_callout_done`).
    pub fn config_callout_done(&self, callout_id: u64, status: &str, body: &[u8]) {
        let mut headers = [EnvoyHeader {
            key_ptr: b":status".as_ptr(),
            key_length: 7,
            value_ptr: status.as_ptr(),
            value_length: status.len(),
        }];
        let mut chunks = [EnvoyBuffer { ptr: body.as_ptr(), length: body.len() }];
        // SAFETY: the arrays are valid during the call; the config is alive; main thread.
        unsafe {
            module::config_http_callout_done(
                self,
                self.envoy_config(),
                self.0.config.get(),
                callout_id,
                CALLOUT_SUCCESS,
                headers.as_mut_ptr(),
                1,
                chunks.as_mut_ptr(),
                1,
            )
        }
    }

    /// Answers stream `id`'s callout with `status` (`None`: it failed), these headers and `body`
    /// (`http_callout_done`).
    pub fn callout_done(&self, id: Id, status: Option<&str>, headers: &[(&str, &str)], body: &[u8]) {
        let mut all: Vec<(&str, &str)> = status.map(|s| (":status", s)).into_iter().collect();
        all.extend_from_slice(headers);
        let mut views: Vec<EnvoyHeader> = all
            .iter()
            .map(|(k, v)| EnvoyHeader {
                key_ptr: k.as_ptr(),
                key_length: k.len(),
                value_ptr: v.as_ptr(),
                value_length: v.len(),
            })
            .collect();
        let mut chunks = [EnvoyBuffer { ptr: body.as_ptr(), length: body.len() }];
        let result = if status.is_some() { CALLOUT_SUCCESS } else { 1 };
        // SAFETY: the arrays are valid during the call; the stream's own pointers, on its worker's thread.
        self.enter(id, "http_callout_done", |f, m| unsafe {
            module::http_callout_done(self, f, m, result, views.as_mut_ptr(), views.len(), chunks.as_mut_ptr(), 1)
        });
    }

    /// Destroys the config (`config_destroy`).
    pub fn destroy_config(&self) {
        // SAFETY: created by config_new, destroyed once, after its streams.
        unsafe { module::config_destroy(self, self.0.config.replace(std::ptr::null())) }
    }
}

fn map_name(header_type: u32) -> &'static str {
    if header_type == REQUEST_HEADER {
        "request"
    } else {
        "response"
    }
}

impl Envoy for FakeEnvoy {
    fn log(&self, level: Level, message: &str) {
        let _fake = in_fake();
        self.record(None, format!("log {level:?} {message}"));
    }

    fn worker_index(&self, filter: FilterEnvoyPtr) -> u32 {
        let _fake = in_fake();
        self.stream_mut(filter, |s| s.worker).unwrap_or(0)
    }

    fn headers(&self, filter: FilterEnvoyPtr, header_type: u32, out: &mut Vec<EnvoyHeader>) {
        let _fake = in_fake();
        self.record(Some(filter), format!("get_headers {}", map_name(header_type)));
        out.clear();
        self.stream_mut(filter, |s| {
            let map = &s.headers[usize::from(header_type != REQUEST_HEADER)];
            out.extend(map.live.iter().map(|(k, v)| EnvoyHeader {
                key_ptr: k.as_ptr(),
                key_length: k.len(),
                value_ptr: v.as_ptr(),
                value_length: v.len(),
            }));
        });
    }

    fn header(&self, filter: FilterEnvoyPtr, header_type: u32, name: &str) -> Option<EnvoyBuffer> {
        let _fake = in_fake();
        self.record(Some(filter), format!("get_header {} {name}", map_name(header_type)));
        self.stream_mut(filter, |s| {
            let map = &s.headers[usize::from(header_type != REQUEST_HEADER)];
            map.live
                .iter()
                .find(|(k, _)| &**k == name.as_bytes())
                .map(|(_, v)| EnvoyBuffer { ptr: v.as_ptr(), length: v.len() })
        })
        .flatten()
    }

    fn set_header(&self, filter: FilterEnvoyPtr, header_type: u32, name: &str, value: Option<&str>) {
        let _fake = in_fake();
        let map = map_name(header_type);
        match value {
            Some(v) => self.record(Some(filter), format!("set_{map}_header {name}: {v}")),
            None => self.record(Some(filter), format!("remove_{map}_header {name}")),
        }
        self.stream_mut(filter, |s| s.headers[usize::from(header_type != REQUEST_HEADER)].set(name, value));
    }

    fn send_response(&self, filter: FilterEnvoyPtr, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        let _fake = in_fake();
        self.record(Some(filter), format!("send_response {status} {headers:?} {}", String::from_utf8_lossy(body)));
        self.stream_mut(filter, |s| s.local_reply = Some(status));
        if self.stream_mut(filter, |s| s.response_headers_sent) == Some(true) {
            // Envoy's FilterManager::sendLocalReply once the response headers went: "Prior headers have
            // already been sent", it resets the stream; nothing of the reply (or of a held body) follows.
            self.record(Some(filter), "reset_stream (a local reply after the response headers)".into());
        }
        // The local reply ends the stream inside this call, as Envoy does.
        if let Some(id) = self.find(filter) {
            self.complete(Id(id));
        }
    }

    fn clear_route_cache(&self, filter: FilterEnvoyPtr) {
        let _fake = in_fake();
        self.record(Some(filter), "clear_route_cache".into());
    }

    fn set_filter_state(&self, filter: FilterEnvoyPtr, key: &str, value: &str) {
        let _fake = in_fake();
        self.record(Some(filter), format!("set_filter_state {key}={value}"));
        let again = self.stream_mut(filter, |s| {
            let again = s.filter_state.iter().any(|(k, _)| k == key);
            if !again {
                s.filter_state.push((key.to_string(), value.to_string()));
            }
            again
        });
        if again == Some(true) {
            // Envoy keeps the first value and reports a bug (ReadOnly state written twice).
            self.0.calls.borrow_mut().push(format!("!! set_filter_state twice {key}"));
        }
    }

    fn span_tags(&self, filter: FilterEnvoyPtr, tags: &[(&str, &str)]) {
        let _fake = in_fake();
        let tracing = !self.0.no_tracing.get();
        self.record(Some(filter), format!("get_active_span{}", if tracing { "" } else { " (none)" }));
        if tracing {
            for (key, value) in tags {
                self.record(Some(filter), format!("span_set_tag {key}={value}"));
            }
        }
    }

    fn source_address(&self, filter: FilterEnvoyPtr) -> Option<String> {
        let _fake = in_fake();
        self.record(Some(filter), "get_attribute_string source.address".into());
        self.0.source_address.borrow().clone()
    }

    fn dynamic_metadata_batch(&self) -> bool {
        !self.0.no_config_metrics.get()
    }

    fn set_dynamic_metadata_entry(&self, filter: FilterEnvoyPtr, namespace: &str, key: &str, value: &str) {
        let _fake = in_fake();
        self.record(Some(filter), format!("set_dynamic_metadata_entry {namespace} {key}={value}"));
        self.stream_mut(filter, |s| {
            s.dynamic_metadata.retain(|(n, k, _)| !(n == namespace && k == key));
            s.dynamic_metadata.push((namespace.to_string(), key.to_string(), value.to_string()));
        });
    }

    fn set_dynamic_metadata(&self, filter: FilterEnvoyPtr, namespace: &str, entries: &[(&str, &str)]) {
        let _fake = in_fake();
        assert!(
            !self.0.no_config_metrics.get(),
            "fake Envoy 1.38: set_dynamic_metadata_string_batch does not exist here"
        );
        let shown: Vec<String> = entries.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.record(Some(filter), format!("set_dynamic_metadata {namespace} {}", shown.join(" ")));
        self.stream_mut(filter, |s| {
            for (k, v) in entries {
                s.dynamic_metadata.retain(|(n, key, _)| !(n == namespace && key == k));
                s.dynamic_metadata.push((namespace.to_string(), k.to_string(), v.to_string()));
            }
        });
    }

    fn continue_decoding(&self, filter: FilterEnvoyPtr) {
        let _fake = in_fake();
        self.record(Some(filter), "continue_decoding".into());
        if self.stream_mut(filter, |s| s.upstream_answers_locally).unwrap_or(false) {
            self.record(Some(filter), "(upstream: 503 no healthy upstream, a local reply)".into());
            if let (true, Some(id)) = (self.0.local_reply_encoded_through_module.get(), self.find(filter)) {
                self.response_headers(Id(id), &[(":status", "503"), ("content-type", "text/plain")], false);
                self.response_body(Id(id), b"no healthy upstream");
            }
            if let Some(id) = self.find(filter) {
                self.complete(Id(id));
            }
        }
    }

    fn body_chunks(&self, filter: FilterEnvoyPtr, body_type: u32, out: &mut Vec<EnvoyBuffer>) {
        let _fake = in_fake();
        out.clear();
        self.stream_mut(filter, |s| {
            let body = match body_type {
                BUFFERED_REQUEST_BODY => &s.request_body,
                BUFFERED_RESPONSE_BODY => &s.response_body,
                _ => return,
            };
            if !body.is_empty() {
                out.push(EnvoyBuffer { ptr: body.as_ptr(), length: body.len() });
            }
        });
        self.record(Some(filter), format!("get_body_chunks {body_type}"));
    }

    fn body_size(&self, filter: FilterEnvoyPtr, body_type: u32) -> usize {
        let _fake = in_fake();
        self.stream_mut(filter, |s| match body_type {
            BUFFERED_REQUEST_BODY => s.request_body.len(),
            BUFFERED_RESPONSE_BODY => s.response_body.len(),
            _ => 0,
        })
        .unwrap_or(0)
    }

    fn drain_body(&self, filter: FilterEnvoyPtr, body_type: u32, bytes: usize) {
        let _fake = in_fake();
        self.record(Some(filter), format!("drain_body {body_type} {bytes}"));
    }

    fn append_body(&self, filter: FilterEnvoyPtr, body_type: u32, data: &[u8]) {
        let _fake = in_fake();
        self.record(Some(filter), format!("append_body {body_type} {}", String::from_utf8_lossy(data)));
    }

    fn increment_counter(&self, filter: FilterEnvoyPtr, id: usize, label: Option<&str>, by: u64) {
        let _fake = in_fake();
        let name = self.0.metric_names.borrow().get(id).cloned().unwrap_or_default();
        let key = label.map_or(name.clone(), |l| format!("{name}{{{l}}}"));
        self.record(Some(filter), format!("increment_counter {key} {by}"));
        *self.0.metrics.borrow_mut().entry(key).or_default() += by as i64;
    }

    fn set_gauge(&self, filter: FilterEnvoyPtr, id: usize, value: u64) {
        let _fake = in_fake();
        let name = self.0.metric_names.borrow().get(id).cloned().unwrap_or_default();
        self.record(Some(filter), format!("set_gauge {name} {value}"));
        self.0.metrics.borrow_mut().insert(name, value as i64);
    }

    fn increment_gauge(&self, filter: FilterEnvoyPtr, id: usize, by: u64) {
        let _fake = in_fake();
        let name = self.0.metric_names.borrow().get(id).cloned().unwrap_or_default();
        self.record(Some(filter), format!("increment_gauge {name} {by}"));
        *self.0.metrics.borrow_mut().entry(name).or_default() += by as i64;
    }

    fn decrement_gauge(&self, filter: FilterEnvoyPtr, id: usize, by: u64) {
        let _fake = in_fake();
        let name = self.0.metric_names.borrow().get(id).cloned().unwrap_or_default();
        self.record(Some(filter), format!("decrement_gauge {name} {by}"));
        *self.0.metrics.borrow_mut().entry(name).or_default() -= by as i64;
    }

    fn scheduler_new(&self, filter: FilterEnvoyPtr) -> SchedulerPtr {
        let _fake = in_fake();
        self.record(Some(filter), "scheduler_new".into());
        self.stream_mut(filter, |s| ptr_of(s.scheduler.get_or_insert_with(|| Box::new(0))))
            .unwrap_or(std::ptr::null_mut())
    }

    fn scheduler_commit(&self, scheduler: SchedulerPtr, _event_id: u64) {
        let _fake = in_fake();
        let id = self.0.streams.borrow().iter().position(|s| s.scheduler.as_deref().map(ptr_of) == Some(scheduler));
        self.record(None, format!("scheduler_commit stream {id:?}"));
        if let Some(id) = id {
            self.0.committed.borrow_mut().push(id);
        }
    }

    fn scheduler_delete(&self, scheduler: SchedulerPtr) {
        let _fake = in_fake();
        let id = self.0.streams.borrow().iter().position(|s| s.scheduler.as_deref().map(ptr_of) == Some(scheduler));
        self.record(None, format!("scheduler_delete stream {id:?}"));
    }

    fn http_callout(
        &self,
        filter: FilterEnvoyPtr,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u64, u32> {
        let _fake = in_fake();
        self.record(Some(filter), format!("http_callout {cluster} {headers:?} {} {timeout_ms}", body.len()));
        if let Some(status) = self.0.callout_error.get() {
            return Err(status);
        }
        if self.0.callout_answers_inline.get() {
            if let Some(id) = self.find(filter) {
                self.callout_done(Id(id), Some("503"), &[("content-type", "text/plain")], b"no healthy upstream");
            }
            return Err(2);
        }
        self.0.next_callout.set(self.0.next_callout.get() + 1);
        Ok(self.0.next_callout.get())
    }

    fn define_metric(&self, _config: ConfigEnvoyPtr, name: &str, _gauge: bool, _labels: &[&str]) -> Option<usize> {
        let _fake = in_fake();
        let mut names = self.0.metric_names.borrow_mut();
        names.push(format!("fhir_tenant_router.{name}"));
        Some(names.len() - 1)
    }

    fn config_metrics(&self) -> bool {
        !self.0.no_config_metrics.get()
    }

    fn config_increment_counter(&self, _config: ConfigEnvoyPtr, id: usize, label: Option<&str>, by: u64) {
        let _fake = in_fake();
        assert!(!self.0.no_config_metrics.get(), "fake Envoy 1.38: config_increment_counter does not exist here");
        let name = self.0.metric_names.borrow().get(id).cloned().unwrap_or_default();
        let key = label.map_or(name.clone(), |l| format!("{name}{{{l}}}"));
        self.record(None, format!("config_increment_counter {key} {by}"));
        *self.0.metrics.borrow_mut().entry(key).or_default() += by as i64;
    }

    fn config_set_gauge(&self, _config: ConfigEnvoyPtr, id: usize, value: u64) {
        let _fake = in_fake();
        assert!(!self.0.no_config_metrics.get(), "fake Envoy 1.38: config_set_gauge does not exist here");
        let name = self.0.metric_names.borrow().get(id).cloned().unwrap_or_default();
        self.record(None, format!("config_set_gauge {name} {value}"));
        self.0.metrics.borrow_mut().insert(name, value as i64);
    }

    fn config_scheduler_new(&self, _config: ConfigEnvoyPtr) -> SchedulerPtr {
        let _fake = in_fake();
        self.record(None, "config_scheduler_new".into());
        if self.0.fail_config_scheduler.get() {
            return std::ptr::null_mut();
        }
        ptr_of(&self.0.config_scheduler)
    }

    fn config_scheduler_delete(&self, _scheduler: SchedulerPtr) {
        let _fake = in_fake();
        self.record(None, "config_scheduler_delete".into());
    }

    fn config_scheduler_commit(&self, _scheduler: SchedulerPtr, event_id: u64) {
        let _fake = in_fake();
        self.record(None, format!("config_scheduler_commit {event_id}"));
    }

    fn start_ticker(
        &self,
        _scheduler: SchedulerPtr,
        period_ms: u64,
        _stop: Arc<AtomicBool>,
    ) -> std::io::Result<JoinHandle<()>> {
        let _fake = in_fake();
        self.record(None, format!("start_ticker {period_ms}"));
        if self.0.fail_ticker.get() {
            return Err(std::io::Error::other("fake: no thread for you"));
        }
        // The test ticks by hand (`tick`): the ticker thread does nothing.
        Ok(std::thread::spawn(|| {}))
    }

    fn config_http_callout(
        &self,
        _config: ConfigEnvoyPtr,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u64, u32> {
        let _fake = in_fake();
        self.record(None, format!("config_http_callout {cluster} {headers:?} {} {timeout_ms}", body.len()));
        if let Some(status) = self.0.callout_error.get() {
            return Err(status);
        }
        self.0.next_callout.set(self.0.next_callout.get() + 1);
        Ok(self.0.next_callout.get())
    }
}
