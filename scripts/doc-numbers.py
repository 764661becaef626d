#!/usr/bin/env python3
"""The numbers the docs quote, measured, and checked against the docs so that they cannot drift.

    scripts/doc-numbers.py            # measure, then check every marked number in README.md and docs/**/*.md
    scripts/doc-numbers.py --write    # measure, then rewrite the marked numbers
    scripts/doc-numbers.py --print    # measure and print, nothing checked

A number in the docs is marked `<!-- num:NAME -->TEXT<!-- /num -->`; TEXT must be what NAME renders to below.
Measured here (after `make build build-so`):
  wasm_size       the module `make build` ships (wasm-opt'd), bytes and KiB; wasm_target its 512 KiB target
  so_size         the dynamic module's `.so`
  abi_callbacks   the `envoy_dynamic_module_callback_*` functions the `.so` imports (nm -D)
  e2e_wasm, e2e_dm                 end-to-end tests collected per build (pytest --collect-only --build …)
  e2e_dm_skipped, e2e_dm_skipped_why  how many the dynamic-module pass skips, and why (grouped by reason)
  vm_memory       the wasm VM's memory with 10,000 tenants and 10,000 cached tokens, from the newest bench report
                  (`make bench` and `make bench-memory` write BENCHMARKS.md, `make bench-quick`
                  target/bench-quick.md): the figure of
                  its "VM memory with 10,000 tenants and 10,000 cached tokens" line
Sizes (wasm_size, so_size, wasm_target) pass within SIZE_SLACK_KIB of what is measured: a commit that moves the
module by a few bytes across a KiB boundary need not rewrite the docs, one that adds a capability's kilobytes must.
Exit 1 naming each number that differs, or that is measured but quoted nowhere."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WASM = REPO / "target" / "wasm32-wasip1" / "release" / "fhir_tenant_router.wasm"
SO = REPO / "target" / "dynamic-module" / "libfhir_tenant_router.so"
PY = REPO / ".venv" / "bin" / "python"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
MARK = re.compile(r"<!-- num:([a-z0-9_]+) -->(.*?)<!-- /num -->", re.S)
MODULE_TARGET = 512 * 1024
# How far a quoted size may be from the measured one (KiB), and the numbers that are sizes.
SIZE_SLACK_KIB = 4
SIZES = {"wasm_size", "so_size", "wasm_target"}


def _kib(n: int) -> str:
    # KiB, not bytes: a change of a few bytes should not make every commit rewrite the docs.
    return f"{n / 1024:,.0f} KiB"


def _collect(build: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = dict(os.environ, DOC_NUMBERS_OUT=out.name,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "scripts"), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run([str(PY if PY.exists() else sys.executable), "-m", "pytest", "tests/e2e",
                               "--collect-only", "-q", "--build", build, "-p", "doc_numbers_collect",
                               "-p", "no:cacheprovider"], cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"doc-numbers: pytest --collect-only --build {build} failed:\n{proc.stdout[-2000:]}{proc.stderr}")
        return json.loads(Path(out.name).read_text(encoding="utf-8"))


def _callbacks() -> int:
    out = subprocess.run(["nm", "-D", "--undefined-only", str(SO)], check=True, capture_output=True, text=True).stdout
    return len({line.split()[-1] for line in out.splitlines()
                if line.split() and line.split()[-1].startswith("envoy_dynamic_module_callback_")})


def _vm_memory() -> str:
    reports = [p for p in (REPO / "BENCHMARKS.md", REPO / "target" / "bench-quick.md") if p.exists()]
    for report in sorted(reports, key=lambda p: p.stat().st_mtime, reverse=True):
        m = re.search(r"VM memory with 10,000 tenants and [0-9,]+ cached tokens: ([0-9.]+ MiB)",
                      report.read_text(encoding="utf-8"))
        if m:
            return m.group(1)
    sys.exit("doc-numbers: no bench report with the VM memory line (make bench-quick)")


def measure() -> dict[str, str]:
    for path, how in ((WASM, "make build"), (SO, "make build-so")):
        if not path.exists():
            sys.exit(f"doc-numbers: {path.relative_to(REPO)} is missing: {how}")
    wasm, dm = _collect("wasm"), _collect("dynamic-module")
    size = WASM.stat().st_size
    reasons = sorted(dm["skipped"].items(), key=lambda kv: (-kv[1], kv[0]))
    why = "; ".join(f"{n}: {r.removeprefix('wasm build only: ')}" for r, n in reasons)
    return {
        "wasm_size": _kib(size),
        "wasm_target": ("within" if size <= MODULE_TARGET else f"{(size - MODULE_TARGET) / 1024:.0f} KiB over")
                       + " the 512 KiB target",
        "so_size": _kib(SO.stat().st_size),
        "abi_callbacks": str(_callbacks()),
        "e2e_wasm": str(wasm["collected"]),
        "e2e_dm": str(dm["collected"]),
        "e2e_dm_skipped": str(sum(dm["skipped"].values())),
        "e2e_dm_skipped_why": why,
        "vm_memory": _vm_memory(),
    }


def _same(name: str, shown: str, measured: str) -> bool:
    """Whether the docs' `shown` still says `measured` (sizes: the same words, within SIZE_SLACK_KIB)."""
    if shown == measured:
        return True
    if name not in SIZES:
        return False
    number = re.compile(r"[0-9][0-9,]*")
    a, b = number.findall(shown), number.findall(measured)
    if len(a) != len(b) or number.sub("#", shown) != number.sub("#", measured):
        return False
    return all(abs(int(x.replace(",", "")) - int(y.replace(",", ""))) <= SIZE_SLACK_KIB for x, y in zip(a, b))


def main(argv: list[str]) -> int:
    numbers = measure()
    if "--print" in argv:
        for k, v in numbers.items():
            print(f"{k:20} {v}")
        return 0
    drift, quoted = [], set()
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")

        def fix(m: re.Match) -> str:
            name, shown = m.group(1), m.group(2)
            quoted.add(name)
            if name not in numbers:
                drift.append(f"{doc.relative_to(REPO)}: <!-- num:{name} --> is not a number this script measures")
                return m.group(0)
            if not _same(name, shown, numbers[name]):
                drift.append(f"{doc.relative_to(REPO)}: {name} says {shown!r}, measured {numbers[name]!r}")
            return f"<!-- num:{name} -->{numbers[name]}<!-- /num -->"

        new = MARK.sub(fix, text)
        if "--write" in argv and new != text:
            doc.write_text(new, encoding="utf-8")
    unquoted = sorted(set(numbers) - quoted)
    if "--write" in argv:
        print(f"doc-numbers: wrote {len(quoted)} numbers" + (f"; quoted nowhere: {unquoted}" if unquoted else ""))
        return 0
    problems = drift + [f"{name} is measured but quoted in no doc" for name in unquoted]
    for p in problems:
        print(f"doc-numbers: {p}", file=sys.stderr)
    print(f"doc-numbers: {len(numbers)} numbers measured, {len(problems)} out of date "
          "(scripts/doc-numbers.py --write updates the docs)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
