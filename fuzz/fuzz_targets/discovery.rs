#![no_main]
//! libFuzzer target: see fhir_tenant_router_fuzz::fuzz_discovery.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fhir_tenant_router_fuzz::fuzz_discovery(data));
