//! Deterministic high-volume fuzzing of every parser of untrusted input, on stable Rust.
//!
//! `cargo run --release --no-default-features --bin fuzz-runner` (from fuzz/). Environment:
//! - `FUZZ_SCALE` (default 1.0): multiplies every parser's input count (defaults below, 1,900,000 in all);
//! - `FUZZ_SEED` (default 1): the seed; the same seed gives the same inputs;
//! - `FUZZ_THREADS` (default 2);
//! - `FUZZ_ONLY`: comma-separated parser names to run.
//!
//! Prints one `fuzz: <parser> <count> inputs, 0 panics` line per parser and a total. A panic (or a failed
//! invariant) prints the parser and the input, then exits with status 101.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fhir_tenant_router_fuzz::gen::{self, Stats};
use fhir_tenant_router_fuzz::rng::Rng;

type Generator = fn(&mut Rng, usize) -> Stats;

/// Parser name, what it parses, default input count, generator.
const PARSERS: &[(&str, &str, usize, Generator)] = &[
    ("token", "verify::verify (PureRust, test JWKS)", 250_000, gen::token),
    ("jwks", "jwks::KeySet::from_jwks", 150_000, gen::jwks),
    ("config", "Config::from_json", 150_000, gen::config),
    ("tenant", "tenant::TenantMap::resolve", 200_000, gen::tenant),
    ("scopes", "scopes::Scopes::from_claim and check (SMART v1/v2 scopes)", 100_000, gen::scopes),
    ("decide", "decision::decide (signed tokens, cache; accepted = tenant found)", 50_000, gen::decide_requests),
    (
        "router",
        "router::Router host events (headers, bodies, responses, ticks, fetch results)",
        50_000,
        gen::router_events,
    ),
    (
        "reach",
        "reach::of_request (queries, form bodies, If-None-Exist) and Policy's judgement of it",
        100_000,
        gen::reach,
    ),
    ("bearer", "bearer::extract_bearer", 200_000, gen::bearer),
    ("cursor", "cursor::open and classify (paging cursors; only minted ones open)", 50_000, gen::cursors),
    (
        "response_check",
        "response_check::check (answers to narrowed requests; oracle: serde_json tree walk)",
        100_000,
        gen::response_bodies,
    ),
    ("host_proto", "host_proto::decode_verify_result", 200_000, gen::host_proto),
    ("der", "der::ecdsa_raw_to_der", 200_000, gen::der),
    ("token_response", "upstream_auth::parse_token_response", 100_000, gen::token_response),
    ("discovery", "upkeep::jwks_location (OpenID Provider Configuration)", 100_000, gen::discovery),
];

const CHUNK: usize = 5_000;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| {
            eprintln!("fuzz: {name}={v:?} is not valid");
            std::process::exit(2)
        }),
        Err(_) => default,
    }
}

fn main() {
    let scale: f64 = env("FUZZ_SCALE", 1.0);
    let seed: u64 = env("FUZZ_SEED", 1);
    let threads: usize = env("FUZZ_THREADS", 2).max(1);
    let only: String = env("FUZZ_ONLY", String::new());
    let selected: Vec<_> = PARSERS
        .iter()
        .enumerate()
        .filter(|(_, p)| only.is_empty() || only.split(',').any(|o| o.trim() == p.0))
        .collect();
    if selected.is_empty() {
        eprintln!("fuzz: FUZZ_ONLY={only:?} names no parser");
        std::process::exit(2);
    }

    std::panic::set_hook(Box::new(|info| {
        let (parser, input) = gen::current();
        eprintln!("fuzz: PANIC in parser {parser}: {info}");
        eprintln!("fuzz: input ({} escaped chars): {}", input.len(), &input[..input.len().min(8192)]);
        std::process::exit(101);
    }));

    // Work items: (parser index, chunk index, inputs). Each chunk has its own RNG stream, so the inputs do
    // not depend on the thread count.
    let mut jobs = Vec::new();
    for (i, p) in &selected {
        let total = (p.2 as f64 * scale).round() as usize;
        let mut done = 0;
        let mut chunk = 0u64;
        while done < total {
            let n = CHUNK.min(total - done);
            jobs.push((*i, chunk, n));
            done += n;
            chunk += 1;
        }
    }
    let next = AtomicUsize::new(0);
    let results = Mutex::new(vec![(Stats::default(), Duration::ZERO); PARSERS.len()]);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(i, chunk, n)) = jobs.get(j) else { break };
                let mut rng = Rng::new(seed ^ ((i as u64) << 48) ^ chunk.wrapping_mul(0x1000_0000_01b3));
                let t = Instant::now();
                let stats = (PARSERS[i].3)(&mut rng, n);
                let elapsed = t.elapsed();
                let mut r = results.lock().unwrap_or_else(|e| e.into_inner());
                r[i].0.inputs += stats.inputs;
                r[i].0.accepted += stats.accepted;
                r[i].1 += elapsed;
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut total = 0;
    for (i, p) in &selected {
        let (stats, time) = results[*i];
        total += stats.inputs;
        println!(
            "fuzz: {:<10} {:>9} inputs, 0 panics ({:>5.1}% accepted, {:>6.1} s cpu) — {}",
            p.0,
            stats.inputs,
            100.0 * stats.accepted as f64 / stats.inputs.max(1) as f64,
            time.as_secs_f64(),
            p.1
        );
    }
    println!(
        "fuzz: total {total} inputs, 0 panics in {:.1} s (seed {seed}, {threads} threads)",
        started.elapsed().as_secs_f64()
    );
}
