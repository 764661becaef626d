//! Measures host-call costs from inside the VM: on the first request, each call of the filter's hot path is
//! repeated N times and the mean is logged as `PROBE <name> <ns per call>` (benchmark tooling only).

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType};

const N: u32 = 20_000;
use proxy_wasm::traits::RootContext as _;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(map_type: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_set_property(path: *const u8, path_size: usize, value: *const u8, value_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(out: *mut u64) -> u32;
}

use std::cell::RefCell;
use std::rc::Rc;

use fhir_tenant_router::cache::TokenCache;
use fhir_tenant_router::config::{Config, JwksSource};
use fhir_tenant_router::decision::{decide, Decision, Known, Request};
use fhir_tenant_router::headers::parse_pairs;

#[derive(Default)]
struct Root {
    config: Rc<RefCell<Option<Config>>>,
}
struct Probe {
    done: bool,
    config: Rc<RefCell<Option<Config>>>,
}

struct HostSigs;
impl fhir_tenant_router::crypto::SignatureCheck for HostSigs {
    fn check(&self, alg: fhir_tenant_router::jwks::Algorithm, key: &fhir_tenant_router::jwks::Key, input: &[u8], sig: &[u8]) -> bool {
        fhir_tenant_router::crypto::PureRust.check(alg, key, input, sig)
    }
}

impl Context for Root {}
impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        if let Some(bytes) = self.get_plugin_configuration() {
            match Config::from_json(&bytes) {
                Ok(c) => *self.config.borrow_mut() = Some(c),
                Err(e) => log::warn!("PROBE config error {e}"),
            }
        }
        true
    }
    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Probe { done: false, config: Rc::clone(&self.config) }))
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

fn now_ns() -> u64 {
    let mut t = 0u64;
    unsafe { proxy_get_current_time_nanoseconds(&mut t) };
    t
}

fn time(name: &str, f: impl FnMut()) {
    time_n(name, N, f)
}

fn time_n(name: &str, n: u32, mut f: impl FnMut()) {
    for _ in 0..n / 10 {
        f(); // warm-up
    }
    let t0 = now_ns();
    for _ in 0..n {
        f();
    }
    let t1 = now_ns();
    log::warn!("PROBE {name} {:.0}", (t1 - t0) as f64 / f64::from(n));
}

impl Context for Probe {}
impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        static mut DONE: bool = false;
        if unsafe { DONE } || self.done {
            return Action::Continue;
        }
        unsafe { DONE = true };
        self.done = true;
        time("empty_loop", || {});
        time("get_current_time", || {
            let _ = now_ns();
        });
        time("get_header_map_pairs", || {
            let mut data: *mut u8 = std::ptr::null_mut();
            let mut size = 0usize;
            unsafe {
                proxy_get_header_map_pairs(MapType::HttpRequestHeaders as u32, &mut data, &mut size);
                drop(Vec::from_raw_parts(data, size, size));
            }
        });
        time("get_header_value(authorization)", || {
            let _ = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "authorization");
        });
        time("get_header_value(absent)", || {
            let _ = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-absent");
        });
        time("replace_header", || {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-probe", Some("0b3c4d5e-0000"));
        });
        time("remove_header(absent)", || {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-absent", None);
        });
        time("remove_then_replace", || {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-probe2", None);
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-probe2", Some("v"));
        });
        time("clear_route_cache", || {
            let _ = hostcalls::call_foreign_function("clear_route_cache", None);
        });
        time("set_property(filter state)", || {
            let k = "fhir_probe.tenant";
            let v = "0b3c4d5e-0000-4000-8000-000000000000";
            unsafe { proxy_set_property(k.as_ptr(), k.len(), v.as_ptr(), v.len()) };
        });
        time("log(debug, filtered)", || {
            let _ = hostcalls::log(LogLevel::Debug, "x");
        });
        self.core();
        self.quota();
        self.answer_check();
        let _ = hostcalls::log(LogLevel::Warn, "PROBE done");
        Action::Continue
    }
}

impl Probe {
    /// The answer check on a narrowed request's answer (issue 23), per answer size, inside V8: a searchset of
    /// Patients with a contained Organization each, all readable (the whole body is walked).
    fn answer_check(&self) {
        use fhir_tenant_router::response_check::{check, Readable, Verdict};
        let readable = Readable::from_types(["Organization", "Patient"]);
        for entries in [1usize, 10, 100, 1000] {
            let entry = |i: usize| {
                format!(
                    r##"{{"fullUrl":"https://fhir.example.org/Patient/{i}","search":{{"mode":"match"}},"resource":{{"resourceType":"Patient","id":"{i}","active":true,"name":[{{"family":"Example","given":["Pat","Q"]}}],"gender":"female","birthDate":"1970-01-01","address":[{{"line":["1 Main St"],"city":"X"}}],"contained":[{{"resourceType":"Organization","id":"o","name":"Clinic"}}],"managingOrganization":{{"reference":"#o"}}}}}}"##
                )
            };
            let body = format!(
                r#"{{"resourceType":"Bundle","type":"searchset","total":{entries},"entry":[{}]}}"#,
                (0..entries).map(entry).collect::<Vec<_>>().join(",")
            );
            let clean = check(body.as_bytes(), &readable) == Verdict::Clean;
            log::warn!("PROBE answer check on {entries} Patients is clean: {clean}");
            let n = (2_000_000 / body.len()).clamp(10, 20_000) as u32;
            time_n(&format!("answer check: searchset of {entries} Patients ({} bytes)", body.len()), n, || {
                let v = check(std::hint::black_box(body.as_bytes()), &readable);
                let _ = std::hint::black_box(v == Verdict::Clean);
            });
        }
    }

    /// What a per-tenant quota adds to a request (issue 14): the bucket's compare-and-swap round trip through
    /// Envoy's shared data, and the pure arithmetic.
    fn quota(&self) {
        use fhir_tenant_router::quota::{self, RawQuota};
        use fhir_tenant_router::shell::host::Host as _;
        use fhir_tenant_router::shell::proxy::ProxyWasmHost;
        use fhir_tenant_router::shell::quota_store::SharedData;
        let raw = |in_flight: Option<u64>| RawQuota {
            rate_per_s: Some(1_000_000.0),
            burst: Some(1_000_000),
            max_in_flight: in_flight,
            search_count_per_unit: None,
            unlimited: false,
        };
        let (Ok(Some(rate)), Ok(Some(capped))) = (quota::compile("q", &raw(None)), quota::compile("q", &raw(Some(1_000_000))))
        else {
            return;
        };
        let store = SharedData(ProxyWasmHost);
        let host = ProxyWasmHost;
        let now = now_ns() / 1_000_000;
        let key = quota::key("0b3c4d5e-0000-4000-8000-000000000000");
        let _ = quota::charge(&store, &key, &rate, 1, now);
        time("quota: get_shared_data", || {
            let _ = std::hint::black_box(host.shared_data(&key));
        });
        time("quota: get + set_shared_data (CAS round trip)", || {
            if let Some((Some(v), cas)) = host.shared_data(&key) {
                let _ = host.set_shared_data(&key, &v, cas);
            }
        });
        let bucket = quota::Bucket { tokens: 500_000 * quota::SCALE, last_ms: now, in_flight: 0 };
        time("core: quota admit (pure)", || {
            let _ = std::hint::black_box(quota::admit(&rate, std::hint::black_box(Some(bucket)), 1, now));
        });
        time("quota: charge, rate only (key + CAS round trip + admit)", || {
            let k = quota::key("0b3c4d5e-0000-4000-8000-000000000001");
            let _ = std::hint::black_box(quota::charge(&store, &k, &rate, 1, now));
        });
        // What a request of a rate-only tenant costs as the filter runs it: most are served from the units
        // the VM leased with its last charge (up to 63 for this quota, for 100 ms), one in 64 charges the store.
        struct NoEffects;
        impl fhir_tenant_router::effect::Effects for NoEffects {
            fn push(&mut self, _: fhir_tenant_router::effect::Effect<'_>) {}
        }
        let mut quotas = quota::Quotas::new(Box::new(SharedData(ProxyWasmHost)));
        time("quota: admit a request, rate only (lease of 63: one charge in 64)", || {
            let _ = std::hint::black_box(quotas.admit(&rate, "0b3c4d5e-0000-4000-8000-000000000003", 1, now, &mut NoEffects));
        });
        time("quota: charge + release, with max_in_flight (two CAS round trips)", || {
            let k = quota::key("0b3c4d5e-0000-4000-8000-000000000002");
            let _ = std::hint::black_box(quota::charge(&store, &k, &capped, 1, now));
            let _ = quota::give_back(&store, &k);
        });
        // As the filter runs a tenant with a large in-flight cap: the VM leases slots with its units, admits
        // from them and takes them back on release (a charge when the units run out: one in 64 here).
        let mut quotas = quota::Quotas::new(Box::new(SharedData(ProxyWasmHost)));
        quotas.lease_slots = true;
        time("quota: admit + release a request, with max_in_flight (slots leased: one charge in 64)", || {
            if let Ok(Some(slot)) = quotas.admit(&capped, "0b3c4d5e-0000-4000-8000-000000000004", 1, now, &mut NoEffects) {
                quotas.release(&slot);
            }
        });
    }

    /// The core's per-request work on a cache hit, inside V8.
    fn core(&self) {
        let config = self.config.borrow();
        let Some(config) = config.as_ref() else { return };
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut size = 0usize;
        let raw = unsafe {
            proxy_get_header_map_pairs(MapType::HttpRequestHeaders as u32, &mut data, &mut size);
            Vec::from_raw_parts(data, size, size)
        };
        time("core: parse_pairs", || {
            let _ = std::hint::black_box(parse_pairs(std::hint::black_box(&raw)));
        });
        let mut authorization = String::new();
        for (n, v) in parse_pairs(&raw).unwrap_or_default() {
            if n == b"authorization" {
                authorization = String::from_utf8_lossy(v).into_owned();
            }
        }
        time("core: lossy copy of authorization", || {
            let _ = std::hint::black_box(String::from_utf8_lossy(std::hint::black_box(authorization.as_bytes())).into_owned());
        });
        let mut cache = TokenCache::new(10_000);
        let token = authorization.trim_start_matches("Bearer ").to_string();
        time("core: cache digest (SipHash-1-3 128)", || {
            let _ = std::hint::black_box(cache.key(std::hint::black_box(&token)));
        });
        let keys = match &config.providers[0].jwks {
            JwksSource::Inline(k) => k.clone(),
            _ => return,
        };
        let now = (now_ns() / 1_000_000_000) as i64;
        let req = Request { method: "GET", path: "/Patient?family=smith&_count=10", authorization: Some(&authorization), duplicate_authorization: false, ..Request::default() };
        let first = decide(&Known { config: config, tenants: Some(&config.tenants), keys: &Some(&keys), signatures: &HostSigs }, &req, &mut cache, now);
        log::warn!("PROBE first decision {}", match first { Decision::Route { .. } => "route", _ => "other" });
        time("core: decide (cache hit)", || {
            let d = decide(&Known { config: config, tenants: Some(&config.tenants), keys: &Some(&keys), signatures: &HostSigs }, &req, &mut cache, now);
            let _ = std::hint::black_box(matches!(d, Decision::Route { .. }));
        });
        // The miss path with Envoy's verify_signature, as the filter runs it (fewer rounds: ~20-60 µs each).
        let host = fhir_tenant_router::crypto::Signatures::new(
            config.signature_verifier,
            fhir_tenant_router::shell::host_crypto::HostCrypto(fhir_tenant_router::shell::proxy::ProxyWasmHost),
        );
        let mut nocache = TokenCache::new(0);
        let d = decide(&Known { config: config, tenants: Some(&config.tenants), keys: &Some(&keys), signatures: &host }, &req, &mut nocache, now);
        log::warn!("PROBE miss decision {}", match d { Decision::Route { .. } => "route", _ => "other" });
        time_n("core: decide (no cache, host verify_signature)", N / 20, || {
            let d = decide(&Known { config: config, tenants: Some(&config.tenants), keys: &Some(&keys), signatures: &host }, &req, &mut nocache, now);
            let _ = std::hint::black_box(matches!(d, Decision::Route { .. }));
        });
        // The same token's signing input and signature through the foreign function alone.
        if let Some(key) = keys.keys().first() {
            let (input, sig) = token.rsplit_once('.').unwrap_or_default();
            use base64::Engine as _;
            let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig).unwrap_or_default();
            let args = fhir_tenant_router::host_proto::encode_verify_arguments("sha256", key.spki_der(), &sig, input.as_bytes());
            time_n("host: verify_signature (RS256) alone", N / 20, || {
                let _ = hostcalls::call_foreign_function("verify_signature", Some(&args));
            });
            time_n("core: encode_verify_arguments", N / 20, || {
                let _ = std::hint::black_box(fhir_tenant_router::host_proto::encode_verify_arguments("sha256", key.spki_der(), &sig, input.as_bytes()));
            });
        }
        time_n("core: parse token (base64 + JSON)", N / 20, || {
            let _ = std::hint::black_box(fhir_tenant_router::verify::peek_issuer(&token));
        });
    }
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}
