//! The root context: compiles the configuration in `on_configure` (refusing the plugin on error), and on
//! every tick and fetch answer hands the event to the core and applies what it says, including waking the
//! requests that waited for a key set.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use crate::config::Config;
use crate::crypto::Signatures;
use crate::effect::Level;
use crate::router::Router;
use crate::upkeep::TICK_MS;

use super::filter::Filter;
use super::host::Host;
use super::host_crypto::HostCrypto;
use super::metrics::Metrics;
use super::quota_store::SharedData;
use super::state::Shared;

/// The root context of one VM.
pub struct Root<H> {
    host: H,
    shared: Option<Rc<Shared<H>>>,
}

impl<H: Host + Clone + 'static> Root<H> {
    pub fn new(host: H) -> Self {
        Self { host, shared: None }
    }

    /// The shared state, once configured.
    pub fn shared(&self) -> Option<&Rc<Shared<H>>> {
        self.shared.as_ref()
    }

    /// Compiles the plugin configuration; `false` (Envoy refuses the plugin) when it is invalid.
    pub fn on_configure(&mut self) -> bool {
        let host = &self.host;
        let config = match Config::from_json_with_env(&host.plugin_configuration(), &|name| host.env(name)) {
            Ok(c) => c,
            Err(e) => {
                host.log(Level::Error, &e.to_string());
                return false;
            }
        };
        let metrics = Metrics::define(host);
        let sink = config.audit_sink.clone().map(|c| RefCell::new(crate::audit_sink::Sink::new(c)));
        let calls = RefCell::new(HashMap::new());
        let signatures = Signatures::new(config.signature_verifier, HostCrypto(host.clone()));
        let router = {
            let mut apply = super::apply::Apply::new(host, &metrics, &calls);
            let mut router = Router::new(config, host.now_ms(), &mut apply);
            // Every worker's VM charges the same buckets, in Envoy's shared data.
            router.quotas = crate::quota::Quotas::new(Box::new(SharedData(host.clone())));
            // A shared-data round trip costs about a microsecond in V8: large in-flight caps are leased.
            router.quotas.lease_slots = true;
            router.prepare_quotas(host.now_ms(), &mut apply);
            router
        };
        self.shared = Some(Rc::new(Shared {
            host: host.clone(),
            router: RefCell::new(router),
            signatures,
            metrics,
            calls,
            parked: RefCell::new(HashMap::new()),
            sink,
        }));
        // Ticks drive the fetch schedules and flush the stats.
        host.set_tick_period_ms(TICK_MS);
        true
    }

    /// A timer tick: stats flushed, then the core's upkeep (gauges, cache sweep, fetches that are due) and
    /// the audit sink's batches.
    pub fn on_tick(&mut self) {
        let Some(shared) = self.shared.clone() else { return };
        shared.metrics.flush(&shared.host);
        let now = shared.host.now_ms();
        // Lost token requests first (their waiters are answered), then the fetches that are due.
        let (lost, _) = shared.router.borrow_mut().lost_token_fetches(now, &mut shared.apply());
        shared.wake(lost, now);
        let unsent = {
            let mut apply = shared.apply();
            shared.router.borrow_mut().on_tick(now, shared.host.memory_bytes(), &mut apply);
            apply.unsent
        };
        shared.unsent(unsent);
        shared.sink_tick(now);
        let overdue = shared.router.borrow_mut().overdue_holds(now, &mut shared.apply());
        for context_id in overdue {
            if shared.host.set_effective_context(context_id) {
                shared.host.resume_request();
            }
        }
    }

    /// The answer to a fetch (`body_size`: its body's length).
    pub fn on_http_call_response(&mut self, token: u32, body_size: usize) {
        if let Some(shared) = &self.shared {
            shared.on_http_call_response(token, body_size);
        }
    }

    /// The HTTP context of a new request.
    pub fn create_filter(&self, context_id: u32) -> Option<Filter<H>> {
        let shared = self.shared.clone()?;
        let stream = shared.router.borrow_mut().open_stream(context_id);
        Some(Filter::new(shared, stream))
    }
}
