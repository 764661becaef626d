#!/usr/bin/env python3
"""What the answer check (issue 23) costs per answer size: bench/hostcall-probe inside Envoy's V8 (the wasm
build), and the same check natively (an ignored unit test run in release, the dynamic module's code), written to
BENCHMARKS.md between its markers. About 3 minutes (it builds the probe); runs no load, so it is fair to run on a
shared machine.

    .venv/bin/python bench/answer_check.py [--no-write]
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as R  # noqa: E402  the benchmark's Envoy, upstream, token and probe helpers

BEGIN, END = "<!-- answer-check:begin -->", "<!-- answer-check:end -->"
NATIVE = ["cargo", "test", "--release", "--quiet", "--lib", "--", "--ignored", "--nocapture", "--test-threads=1"]


def wasm_rows(workdir: Path, pinning: R.Pinning) -> list[tuple[str, float]]:
    private, public = R.load_keys()
    token = R.mint(private["RS256"], "RS256", R.tenant_id(1), "answer-check", int(__import__("time").time()))
    upstream = R.Envoy("upstream", R.upstream_config(), workdir, wasm=False).start().wait_ready()
    try:
        wasm = R.build_probe()
        doc = R.ours_plugin(public, 1, R.CACHE_ENTRIES)
        cfg = R.tested_config(upstream.port, {"route": {"cluster": "upstream"}}, [R.probe_filter(doc, wasm)])
        envoy = R.Envoy("answer-check-probe", cfg, workdir, wasm=True).start().wait_ready()
        try:
            envoy.pin(pinning.tested)
            R.get(envoy.port, R.PATH, {"authorization": f"Bearer {token}"}, timeout=R.PROBE_TIMEOUT)
            R.wait_until(lambda: envoy.check_alive() or "PROBE done" in envoy.log_path.read_text(errors="replace"),
                         R.PROBE_TIMEOUT, "hostcall-probe: `PROBE done`", interval=0.2)
            costs, notes = R.parse_probe(envoy.log_path.read_text(errors="replace"))
        finally:
            envoy.stop()
    finally:
        upstream.stop()
    verdicts = [n for n in notes if n.startswith("answer check on")]
    if len(verdicts) != 4 or not all(n.endswith("is clean: true") for n in verdicts):
        raise R.BenchError(f"the probe's answers were not all read whole and clean: {verdicts}")
    return [(n.removeprefix("answer check: "), ns) for n, ns in costs if n.startswith("answer check:")]


def native_rows(pinning: R.Pinning, test: str) -> list[str]:
    pin = ["taskset", "-c", R.cpu_list(pinning.tested)] if pinning.on else []
    r = subprocess.run(pin + NATIVE + [test], cwd=R.REPO, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise R.BenchError(f"native timing loops failed:\n{(r.stdout + r.stderr)[-2000:]}")
    return [line[line.index("|"):] for line in r.stdout.splitlines() if "|" in line]


def section(wasm: list[tuple[str, float]], native: list[str], cursors: list[str]) -> str:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [BEGIN, "## Answer check and paging cursors (issue 23)", "",
             f"`bench/answer_check.py`, {when}, {platform.node()} ({os.cpu_count()} CPUs, shared), pinned to the "
             "tested CPU. What a narrowed request's answer costs to check (the whole body walked once, no tree), "
             "per answer size: a searchset of Patients with a contained Organization each, all readable. Unnarrowed "
             "requests pay none of it (their answers are not held).", "",
             "In V8 (the wasm build, bench/hostcall-probe, warm-loop means):", "",
             "| answer | µs per check | µs per KB |", "|---|---:|---:|"]
    for name, ns in wasm:
        size = int(m["b"]) if (m := re.search(r"\((?P<b>\d+) bytes\)", name)) else 0
        lines.append(f"| {name} | {ns / 1000:,.1f} | {ns / 1000 / max(size / 1024, 1e-9):,.2f} |")
    lines += ["", "Natively (the dynamic module's code; release build, medians; beside it serde_json building the same "
              "body as a tree, which link rewriting pays, for scale):", ""]
    lines += native
    lines += ["", "| a paging cursor (natively) | median |", "|---|---:|"] + cursors
    lines += ["", "The held answer costs its size in memory until it is checked; one beyond Envoy's buffer limit gets "
              "Envoy's 500 (docs/security.md, \"What a narrowed client's answers may hold\").", END]
    return "\n".join(lines) + "\n"


def write(out: Path, text: str) -> None:
    body = out.read_text(encoding="utf-8") if out.exists() else ""
    i, j = body.find(BEGIN), body.find(END)
    if 0 <= i < j:
        body = body[:i] + text.rstrip("\n") + body[j + len(END):]
    else:
        body = body.rstrip("\n") + "\n\n" + text
    out.write_text(body, encoding="utf-8")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--out", type=Path, default=R.OUT_DEFAULT)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    pinning = R.plan_pinning(not args.no_pin)
    workdir = Path(tempfile.mkdtemp(prefix="bench-answer-check-"))
    try:
        text = section(wasm_rows(workdir, pinning), native_rows(pinning, "response_check::tests::cost"),
                       native_rows(pinning, "cursor::tests::cost"))
    finally:
        R.stop_all()
    print(text)
    if not args.no_write:
        write(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
