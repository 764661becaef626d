#!/usr/bin/env python3
"""Where a request's CPU goes in the Envoy under test (issue 26): `perf record -e cpu-clock` on the tested Envoy
while wrk drives it (the bench's set-up: pinned Envoy, direct-response upstream, the fixed RS256 token, cache
hit), then each shared object's and symbol's share of the samples, times the run's CPU µs per request.

    .venv/bin/python bench/profile.py [--only REGEX] [--seconds 10] [--so path/to/symbolized.so]

Envoy's PyPI binary is stripped: its time shows as one `envoy` object (plus libc, the kernel, V8's JIT code for
wasm). The module's own symbols need a .so that keeps them: `--so` (see `make bench-profile`, which builds one
with `strip = none` into target/profile/). Profiles stay meaningful on a shared machine (shares, not
wall-clock), the absolute µs do not.
"""
from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as R  # noqa: E402

PERF = "/usr/bin/perf"


def top(report: str, n: int) -> list[tuple[float, str]]:
    rows = []
    for line in report.splitlines():
        m = re.match(r"^\s+(\d+\.\d+)%\s+(.*\S)\s*$", line)
        if m:
            rows.append((float(m.group(1)), re.sub(r"\s+", " ", m.group(2))))
    return rows[:n]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=r"^(passthrough|native-cache|peer-claim|dm-cache-audit|dm-floor|wasm-floor|"
                                      r"ours-cache-audit|wasm-noop)(-RS256)?$")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--so", type=Path, default=None, help="the dynamic module to load (default: make build-so's)")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    args = R.parse_args(["--only", a.only, "--algs", "RS256", "--rounds", "3", "--no-write"])
    if a.so:
        R.SO = a.so.resolve()
    b = R.Bench(args)
    out: list[str] = []
    try:
        b.setup()
        for v in b.variants:
            b.precheck(v)
            b.run_wrk(v, 2)   # warm-up (V8 tier-up, caches)
            s = b.servers[v.server]
            data = b.workdir / f"perf-{v.name}.data"
            rec = subprocess.Popen([PERF, "record", "-e", "cpu-clock", "-F", "4000", "-p", str(s.envoy.pid),
                                    "-o", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)
            res, _ = b.run_wrk(v, a.seconds)
            rec.send_signal(signal.SIGINT)
            rec.wait(timeout=60)
            out.append(f"### {v.label}: {res.rps:,.0f} req/s, {res.cpu_us_per_req:.1f} CPU µs/req")
            reports = [["--sort", "dso"], ["--sort", "dso,sym"]]
            if v.server.startswith("dm"):   # the module's own symbols (shares of all samples)
                reports.append(["--sort", "sym", "--dsos", R.SO.name, "--percentage", "absolute"])
            for opts in reports:
                rep = subprocess.run([PERF, "report", "-i", str(data), "--stdio", "--no-children", *opts],
                                     capture_output=True, text=True).stdout
                out.append(f"perf report {' '.join(opts)} (share of samples; µs/req = share x CPU µs/req):")
                for pct, what in top(rep, 12 if opts[1] == "dso" else a.top):
                    out.append(f"  {pct:6.2f}%  {pct / 100 * res.cpu_us_per_req:6.2f} µs  {what}")
            out.append("")
    finally:
        b.close(keep=False)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
