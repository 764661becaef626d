#!/usr/bin/env python3
"""Fairness under per-tenant quotas (issue 14): does one tenant flooding at 10x its quota hurt another?

Tenant B sends a steady paced load (wrk with a per-connection delay, so its offered rate is fixed and its
throughput can be compared); it is measured alone, then while tenant A floods at about 10x A's quota from a
second wrk. Rounds alternate the two (the starting one rotates) and medians are reported: B's req/s and p99
both ways and their ratio, A's offered rate, admitted rate and 429s. Both builds (wasm, dynamic module) and a
native yardstick doing the same job with Envoy's own filters (jwt_authn + claim_to_headers + cluster_header,
and the local_ratelimit filter with one token bucket per tenant descriptor), each in its own Envoy 1.40
(`--concurrency 1`, pinned like bench/run.py) in front of one direct-response upstream Envoy. Target: B's
throughput and p99 within 5 % of its unloaded figures.

    .venv/bin/python bench/fairness.py            # writes the fairness section of BENCHMARKS.md
    .venv/bin/python bench/fairness.py --quick    # fewer, shorter rounds

The section sits between <!-- fairness:begin --> and <!-- fairness:end --> and survives a bench/run.py run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as R  # noqa: E402  the benchmark's Envoy, upstream, token and wrk helpers

A_RATE, A_BURST = 100, 100           # tenant A's quota: 100 units/s, burst 100
B_QUOTA = {"rate_per_s": 5000, "burst": 5000}   # B has a quota too (it goes through the same check), never reached
DELAY_MS = 10                         # per-connection pause between requests (wrk's delay())
B_CONNECTIONS = 4                     # ~4 x 1000 / (10 ms + latency): B offers about 380 req/s
A_CONNECTIONS = 12                    # ~1,000-1,150 req/s: about 10x A's quota
BEGIN, END = "<!-- fairness:begin -->", "<!-- fairness:end -->"
PROBE_BEGIN, PROBE_END = "<!-- quota-probe:begin -->", "<!-- quota-probe:end -->"
NATIVE_PROBE = ["cargo", "test", "--release", "--quiet", "--lib", "quota::tests::probe_process_store", "--",
                "--ignored", "--nocapture"]

PACED_LUA = """-- paced: each connection waits DELAY ms after every answer (a fixed offered rate per connection)
local pause = tonumber(os.getenv("BENCH_DELAY_MS") or "10")
function delay() return pause end
""" + R.STATIC_LUA.split("\n", 1)[1]


def tenants() -> tuple[str, str]:
    return R.tenant_id(1), R.tenant_id(2)


def plugin(public_jwks: dict) -> dict:
    a, b = tenants()
    doc = R.ours_plugin(public_jwks, 0, R.CACHE_ENTRIES)
    doc["tenants"] = {a: {"cluster": "upstream", "quota": {"rate_per_s": A_RATE, "burst": A_BURST}},
                      b: {"cluster": "upstream"}}
    doc["quota"] = B_QUOTA
    return doc


def native_config(upstream_port: int, public_jwks: dict) -> dict:
    """The same job with Envoy's own filters: jwt_authn (cached) copies the scope (the tenant id) into a
    header that routes (cluster_header) and is the local_ratelimit descriptor; A's bucket is A's quota, B's
    is B's. Envoy's token buckets refill at most every 50 ms, so the fill is split into 20 steps a second."""
    a, b = tenants()
    bucket = lambda per_s, burst: {"max_tokens": burst, "tokens_per_fill": per_s // 20,  # noqa: E731
                                   "fill_interval": "0.05s"}
    limit = {"name": "envoy.filters.http.local_ratelimit", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "fairness",
        "token_bucket": bucket(1_000_000, 1_000_000),
        "filter_enabled": {"runtime_key": "fairness_enabled",
                           "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        "filter_enforced": {"runtime_key": "fairness_enforced",
                            "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        "descriptors": [
            {"entries": [{"key": "tenant", "value": a}], "token_bucket": bucket(A_RATE, A_BURST)},
            {"entries": [{"key": "tenant", "value": b}],
             "token_bucket": bucket(B_QUOTA["rate_per_s"], B_QUOTA["burst"])},
        ]}}
    route = {"route": {"cluster_header": R.PEER_ROUTE_HEADER, "rate_limits": [{"actions": [
        {"request_headers": {"header_name": R.PEER_ROUTE_HEADER, "descriptor_key": "tenant"}}]}]}}
    cfg = R.tested_config(upstream_port, route, [R.claim_peer_filter(public_jwks), limit])
    base = cfg["static_resources"]["clusters"][0]
    for t in (a, b):
        c = json.loads(json.dumps(base))
        c["name"] = c["load_assignment"]["cluster_name"] = t
        cfg["static_resources"]["clusters"].append(c)
    return cfg


def wrk(wrk_bin: str, pin: list[str], port: int, token: str, connections: int, seconds: int, script: Path):
    cmd = pin + [wrk_bin, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(script),
                 "-H", f"Authorization: Bearer {token}", f"http://127.0.0.1:{port}{R.PATH}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, BENCH_DELAY_MS=str(DELAY_MS)))


def result(p: subprocess.Popen, what: str) -> dict:
    out, err = p.communicate(timeout=120)
    m = re.search(r"^BENCH_JSON (\{.*\})$", out, re.M)
    if p.returncode != 0 or not m:
        raise R.BenchError(f"{what}: wrk failed ({p.returncode}):\n{out}\n{err}")
    j = json.loads(m.group(1))
    j["rps"] = j["requests"] / (j["duration_us"] / 1e6)
    return j


def measure(build: str, envoy: R.Envoy, upstream: R.Envoy, wrk_bin: str, pin: list[str], tokens, args,
            script: Path) -> dict:
    a_token, b_token = tokens
    port = envoy.port
    rows: dict[str, list] = {"alone": [], "flood": []}
    a_rows: list[dict] = []
    for r in range(args.rounds):
        order = ["alone", "flood"] if r % 2 == 0 else ["flood", "alone"]
        for mode in order:
            time.sleep(1.0 + A_BURST / A_RATE)   # A's bucket refills between runs: every flood starts alike
            cpu0 = envoy.cpu_seconds()
            flood = wrk(wrk_bin, pin, port, a_token, A_CONNECTIONS, args.duration, script) if mode == "flood" else None
            b = result(wrk(wrk_bin, pin, port, b_token, B_CONNECTIONS, args.duration, script), f"{build} B {mode}")
            b["cpu_s"] = envoy.cpu_seconds() - cpu0
            if any(b[k] for k in ("connect", "read", "write", "status", "timeout")):
                raise R.InvalidRun(f"{build}: tenant B got errors or non-2xx answers ({mode}): {b}")
            rows[mode].append(b)
            if flood is not None:
                a = result(flood, f"{build} A flood")
                b["cpu_s"] = envoy.cpu_seconds() - cpu0
                a["extra_cpu_s"] = b["cpu_s"]
                a_rows.append(a)
            R.log(f"    {build} round {r + 1} {mode:5}: B {b['rps']:7.1f} req/s p99 {b['p99_us'] / 1000:6.2f} ms"
                  + (f"; A {a_rows[-1]['rps']:7.1f} req/s, {a_rows[-1]['status']} refused" if flood else ""))
    # A alone, B idle: the tested Envoy's CPU per A request (about 9 in 10 refused), a figure far less
    # exposed to scheduling noise than a p99.
    time.sleep(1.0 + A_BURST / A_RATE)
    cpu0 = envoy.cpu_seconds()
    a_alone = result(wrk(wrk_bin, pin, port, a_token, A_CONNECTIONS, args.duration, script), f"{build} A alone")
    a_alone_cpu_us = (envoy.cpu_seconds() - cpu0) * 1e6 / max(a_alone["requests"], 1)
    R.log(f"    {build} A alone: {a_alone['rps']:7.1f} req/s, {a_alone['status']} refused, "
          f"{a_alone_cpu_us:.1f} CPU us per request")
    med = lambda xs: statistics.median(xs)  # noqa: E731
    out = {"build": build, "a_alone_cpu_us": a_alone_cpu_us,
           "b_cpu_us": med([x["cpu_s"] * 1e6 / x["requests"] for x in rows["alone"] if x["requests"]])}
    for mode in rows:
        out[f"{mode}_rps"] = med([x["rps"] for x in rows[mode]])
        out[f"{mode}_p99_ms"] = med([x["p99_us"] / 1000 for x in rows[mode]])
    out["a_offered_rps"] = med([a["rps"] for a in a_rows])
    out["a_admitted_rps"] = med([(a["requests"] - a["status"]) / (a["duration_us"] / 1e6) for a in a_rows])
    out["a_refused"] = med([a["status"] for a in a_rows])
    # The tested Envoy's CPU for A's requests: a flood run's CPU minus its round's run without A, per A request.
    out["a_cpu_us"] = med([(f["cpu_s"] - a["cpu_s"]) * 1e6 / x["requests"]
                           for a, f, x in zip(rows["alone"], rows["flood"], a_rows) if x["requests"]])
    # The noise floor: how far B's p99 alone moves between rounds of the same build (max / min).
    alone_p99 = [x["p99_us"] for x in rows["alone"]]
    out["alone_p99_spread"] = max(alone_p99) / min(alone_p99)
    out["rps_ratio"] = out["flood_rps"] / out["alone_rps"]
    out["p99_ratio"] = out["flood_p99_ms"] / out["alone_p99_ms"]
    # The same, paired within each round (its two runs are adjacent): less exposed to the machine's drift.
    pairs = list(zip(rows["alone"], rows["flood"]))
    out["rps_ratio_paired"] = med([f["rps"] / a["rps"] for a, f in pairs])
    out["p99_ratio_paired"] = med([f["p99_us"] / a["p99_us"] for a, f in pairs])
    return out


def section(results: list[dict], args, pinning: R.Pinning, started: float) -> str:
    lines = [BEGIN, "## Fairness under quotas (issue 14)", ""]
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines += [
        f"`make bench-fairness` ({'QUICK' if args.quick else 'FULL'}), {when}, {platform.node()}: "
        f"{os.cpu_count()} CPUs (shared with other work), Envoy {R.envoy_version()} `--concurrency 1`, "
        f"pinning {pinning.note}; {args.rounds} rounds x 2 modes x {args.duration} s per build, alternated, "
        f"medians; {time.monotonic() - started:.0f} s in all.",
        "",
        f"Tenant A's quota is {A_RATE}/s (burst {A_BURST}); it floods with {A_CONNECTIONS} paced connections "
        f"(about 10x its quota). Tenant B sends {B_CONNECTIONS} paced connections ({DELAY_MS} ms between a "
        "connection's answer and its next request), under a quota it never reaches, measured alone and during "
        "A's flood. Both use one cached token each (the cache-hit path). A's refusals are local 429s.",
        "",
        "| build | B alone req/s | B with A's flood req/s | ratio (paired) | B alone p99 ms | B with flood p99 ms "
        "| ratio (paired) | B alone p99 max/min over rounds | A offered req/s | A admitted req/s "
        "| Envoy CPU µs per A request (during B; A alone) | Envoy CPU µs per B request (alone) | target (±5 %) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ok = r["rps_ratio"] >= 0.95 and r["p99_ratio"] <= 1.05 and r["p99_ratio_paired"] <= 1.05
        lines.append(
            f"| {r['build']} | {r['alone_rps']:.1f} | {r['flood_rps']:.1f} | {r['rps_ratio']:.3f} "
            f"({r['rps_ratio_paired']:.3f}) | {r['alone_p99_ms']:.2f} | {r['flood_p99_ms']:.2f} | {r['p99_ratio']:.3f} "
            f"({r['p99_ratio_paired']:.3f}) | {r['alone_p99_spread']:.2f} "
            f"| {r['a_offered_rps']:.0f} | {r['a_admitted_rps']:.0f} | {r['a_cpu_us']:.1f}; {r['a_alone_cpu_us']:.1f} "
            f"| {r['b_cpu_us']:.1f} "
            f"| {'met' if ok else 'NOT met'}{' (within noise)' if r['alone_p99_spread'] > 1.05 else ''} |")
    lines += [
        "",
        "Ratios are of the medians, and in brackets the median of each round's own ratio (its two runs are "
        "adjacent). B's throughput is its paced offered load, so a ratio near 1.0 says the flood took none of it. "
        "p99 is the sensitive figure: each of A's refused requests still costs the one worker CPU time (Envoy's "
        "own HTTP handling and a local reply, plus the filter; the quota check itself is well under 1 µs: see the "
        "next section), about 1,000 a second here, and B's requests queue behind them. The native row does the "
        "same job with Envoy's own filters (jwt_authn + claim_to_headers + cluster_header, and local_ratelimit "
        "with a token bucket per tenant descriptor, A's being A's quota): its refusals cost the worker alike, so "
        "it is the yardstick for what a flood does to a neighbour's p99 in one Envoy worker, whatever the "
        "limiter. The max/min column is the noise floor: how far B's p99 alone moves between rounds of the same "
        "build on this machine (the load side, both wrk processes and the upstream Envoy, shares one CPU with "
        "other work); where it exceeds 1.05 the verdict says so, since a ±5 % judgement on p99 is then within "
        "noise. The CPU columns: the tested Envoy's CPU in a flood run minus the same round's run without A, per "
        "A request; and from a run of A alone (B idle), which includes a lightly loaded worker's per-event "
        "wakeups. A filter cannot refuse a request it has not received: keeping a flood off the worker takes "
        "limits in front of it (connection limits, Envoy's local rate limit per downstream address, a global "
        "rate limit at the edge) or more workers.",
        END,
    ]
    return "\n".join(lines) + "\n"


def probe(workdir: Path, upstream: R.Envoy, public: dict, token: str, pinning: R.Pinning) -> list[tuple[str, float]]:
    """What a quota check costs per request: bench/hostcall-probe inside Envoy's V8 (the quota rows), and the
    dynamic module's process-wide store natively (an ignored unit test, run in release)."""
    wasm = R.build_probe()
    cfg = R.tested_config(upstream.port, {"route": {"cluster": "upstream"}}, [R.probe_filter(plugin(public), wasm)])
    envoy = R.Envoy("quota-probe", cfg, workdir, wasm=True).start().wait_ready()
    try:
        envoy.pin(pinning.tested)
        R.get(envoy.port, R.PATH, {"authorization": f"Bearer {token}"}, timeout=R.PROBE_TIMEOUT)
        R.wait_until(lambda: envoy.check_alive() or "PROBE done" in envoy.log_path.read_text(errors="replace"),
                     R.PROBE_TIMEOUT, "hostcall-probe: `PROBE done`", interval=0.2)
        costs, _ = R.parse_probe(envoy.log_path.read_text(errors="replace"))
    finally:
        envoy.stop()
    rows = [("wasm " + n, ns) for n, ns in costs if "quota" in n or n == "core: decide (cache hit)"]
    pin = ["taskset", "-c", R.cpu_list(pinning.tested)] if pinning.on else []
    r = subprocess.run(pin + NATIVE_PROBE, cwd=R.REPO, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise R.BenchError(f"native probe failed:\n{(r.stdout + r.stderr)[-2000:]}")
    rows += [("dynamic module " + m["name"], float(m["ns"])) for line in r.stdout.splitlines()
             if (m := R.PROBE_LINE.search(line))]
    return rows


def probe_section(rows: list[tuple[str, float]]) -> str:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [PROBE_BEGIN, "## Quota check cost (issue 14)", "",
             f"`make bench-fairness`, {when}, {platform.node()} ({os.cpu_count()} CPUs, shared): warm-loop means "
             "(each repeated 20,000 times in V8, 200,000 natively, after a warm-up), pinned to the tested CPU. "
             "Target: under 1 µs of CPU per request on the cache-hit path.", "",
             "| what | ns per call |", "|---|---:|"]
    lines += [f"| {name} | {ns:,.0f} |" for name, ns in rows]
    lines += ["", "A request of a tenant with a rate quota is served from the units its worker leased with the last "
              "charge when there are some (the lease row: a map lookup, and one charge in 64 for this quota), "
              "otherwise it costs one charge (the wasm build: one `get_shared_data`, one `set_shared_data`, the key "
              "and the pure arithmetic: 1-2 µs in V8). With `max_in_flight` of 20 or more, the wasm build leases "
              "in-flight slots with the units (the admit + release row: a request and its end, one charge in 64); "
              "caps under 20 and small rates (`min(burst, rate_per_s)` under 20) are exact and charge on every "
              "admitted request, and a cap under 20 gives its slot back with one more round trip (the two-round-trip "
              "row). Their refusals stay local (no host call). Tenants without a quota pay nothing.", PROBE_END]
    return "\n".join(lines) + "\n"


def write(out: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    body = out.read_text(encoding="utf-8") if out.exists() else ""
    i, j = body.find(begin), body.find(end)
    if 0 <= i < j:
        body = body[:i] + text.rstrip("\n") + body[j + len(end):]
    else:
        body = body.rstrip("\n") + "\n\n" + text
    out.write_text(body, encoding="utf-8")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 rounds of 5 s")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--duration", type=int, default=None, help="seconds per run")
    p.add_argument("--builds", default="wasm,dynamic-module,native",
                   help="native: Envoy's jwt_authn + claim_to_headers + local_ratelimit doing the same job")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--out", type=Path, default=R.OUT_DEFAULT)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--probe-only", action="store_true", help="only the quota check's cost (no fairness runs)")
    p.add_argument("--no-probe", action="store_true", help="only the fairness runs")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.duration = args.duration or (5 if args.quick else 10)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="bench-fairness-"))
    wrk_bin = R.ensure_wrk(False)
    pinning = R.plan_pinning(not args.no_pin)
    pin = ["taskset", "-c", R.cpu_list(pinning.load)] if pinning.on else []
    script = workdir / "paced.lua"
    script.write_text(PACED_LUA, encoding="utf-8")
    private, public = R.load_keys()
    now = int(time.time())
    a, b = tenants()
    tokens = (R.mint(private["RS256"], "RS256", a, "fair-a", now), R.mint(private["RS256"], "RS256", b, "fair-b", now))
    R.MODULE.snapshot(workdir)
    upstream = R.Envoy("upstream", R.upstream_config(), workdir, wasm=False).start().wait_ready()
    if pinning.on:
        upstream.pin(pinning.load)
    results = []
    rows: list[tuple[str, float]] = []
    try:
        if not args.no_probe:
            R.log("==> quota probe: hostcall-probe in V8, then the native store (cargo test --release)")
            rows = probe(workdir, upstream, public, tokens[1], pinning)
        for build in ([] if args.probe_only else args.builds.split(",")):
            if build == "native":
                cfg = native_config(upstream.port, public)
            else:
                if build == "wasm":
                    filt = R.ours_filter(plugin(public))
                else:
                    R.MODULE.snapshot_so(workdir)
                    filt = R.dm_filter(plugin(public), R.MODULE.so_path)
                cfg = R.tested_config(upstream.port, {"route": {"cluster_header": R.ROUTE_HEADER}}, [filt])
            envoy = R.Envoy(f"fair-{build}", cfg, workdir, wasm=build == "wasm").start().wait_ready()
            envoy.pin(pinning.tested)
            try:
                for t in tokens:   # warm the token cache; both must be routed
                    r = R.get(envoy.port, R.PATH, {"authorization": f"Bearer {t}"})
                    if r.status != 200:
                        raise R.BenchError(f"{build}: warm-up answered {r.status}: {r.body[:300]!r}")
                R.log(f"==> {build}: {args.rounds} rounds x 2 x {args.duration}s")
                results.append(measure(build, envoy, upstream, wrk_bin, pin, tokens, args, script))
            finally:
                envoy.stop()
    except (R.BenchError, R.InvalidRun) as e:
        print(f"bench-fairness: {e}", file=sys.stderr)
        return 1
    finally:
        upstream.stop()
    if results:
        text = section(results, args, pinning, started)
        print("\n" + text)
        if not args.no_write:
            write(args.out, text)
            R.log(f"==> wrote the fairness section of {args.out}")
    if rows:
        text = probe_section(rows)
        print("\n" + text)
        if not args.no_write:
            write(args.out, text, PROBE_BEGIN, PROBE_END)
            R.log(f"==> wrote the quota probe section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
