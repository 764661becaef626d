#!/usr/bin/env python3
"""The operator's guide says only what the filter accepts.

    scripts/check-docs.py              # both checks below, on README.md and docs/**/*.md
    scripts/check-docs.py blocks       # only the config blocks
    scripts/check-docs.py fields       # only the field names
    scripts/check-docs.py links        # only the relative links and their anchors
    scripts/check-docs.py --self-test  # show that each check fails on a broken block and a renamed field

**blocks**: every ```json and ```yaml block of README.md and docs/**/*.md (docs/idp/ included) is one of:
  - a plugin configuration (a JSON object): validated against docs/config.schema.json AND compiled by the filter's
    own compiler, natively (`cargo run --example compile-config`, scripts/compile-config.rs: the same
    `Config::from_json` that Envoy's plugin runs);
  - an Envoy bootstrap (YAML with `static_resources`): every plugin configuration in it (the wasm filter's
    `configuration`, the dynamic module's `filter_config`) checked as above, then the whole file through
    `envoy --mode validate` (.venv/bin/envoy) with our module's `filename` pointed at the built .wasm / .so;
  - a Kubernetes object (YAML with `apiVersion` and `kind`): parsed, and the plugin configuration of a WasmPlugin
    (`spec.pluginConfig`) or an EnvoyExtensionPolicy (`spec.wasm[].config`, `spec.dynamicModule[].config`) checked
    as above;
  - a fragment, marked by a `<!-- fragment -->` (or `<!-- fragment: why -->`) line right before its fence: counted,
    not validated. Anything else is an error that says to mark it.
Secrets a configuration names (`{"env": …}`, `{"file": …}`, `upstream_header.env`) get placeholders: a generated
RSA key for a `private_key`, 48 characters for anything else.

**fields**: the field names of docs/config.schema.json, of docs/configuration.md and of the Raw* structs that serde
reads (`#[serde(deny_unknown_fields)]`, src/**/*.rs, walked from `RawConfig`) are the same set. A documented field
is the backticked full path in the first cell of a row of a table whose header's first cell is "Field"
(`provider.issuer`, `tenants.<id>.allow.interactions`). `providers` items and `tenants.<id>.quota` are compared as
`provider.*` and `quota.*` (the same structs). Beneath a field that Rust reads as a `serde_json::Value` (`jwks`,
`secret_scope`), a name counts as read when it is a string literal in src/. The provider fields of issue 25
(PENDING_ISSUE_25, idp-spec) may be documented before they reach the schema and the Raw* structs: until then they
are reported, not failed; once either has one, it is compared like every other field.

**links**: every relative link of README.md and docs/**/*.md names a file that exists and, with `#anchor`, one of
its headings (GitHub's anchors). The IdP pages of issue 25 (PENDING_PAGES) may be linked before they exist.

Exit 1 naming each block, field or link that fails."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO / "docs" / "config.schema.json"
CONFIG_DOC = REPO / "docs" / "configuration.md"
WASM = REPO / "target" / "wasm32-wasip1" / "release" / "fhir_tenant_router.wasm"
SO = REPO / "target" / "dynamic-module" / "libfhir_tenant_router.so"
ENVOY = REPO / ".venv" / "bin" / "envoy"
COMPILER = REPO / "target" / "debug" / "examples" / "compile-config"
WASM_FILTER = "envoy.filters.http.wasm"
DM_FILTER = "envoy.filters.http.dynamic_modules"
FRAGMENT = re.compile(r"^\s*<!--\s*fragment\b[^>]*-->\s*$")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>json|yaml|yml)[ \t]*$")
# The provider fields of issue 25 (idp-spec.md), documented before the branch that adds them is merged.
PENDING_ISSUE_25 = {"provider.tenant", "provider.claims", "provider.claims.tenant", "provider.claims.tenant_prefixes",
                    "provider.claims.scopes", "provider.claims.scope_map", "provider.claims.client",
                    "provider.audience_claim", "provider.token_typ", "provider.required_claims",
                    "provider.discovery_uri"}
# Paths compared as one: a `providers` item is a `provider`, a tenant's quota is the default quota's struct.
ALIASES = (("providers.", "provider."), ("tenants.<id>.quota.", "quota."))


def docs() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def rel(p: Path) -> str:
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


# ------------------------------------------------------------------------------------------------- blocks

@dataclass
class Block:
    where: str   # file:line
    lang: str    # json | yaml
    text: str
    fragment: bool


def blocks(path: Path, text: str | None = None) -> list[Block]:
    lines = (text if text is not None else path.read_text(encoding="utf-8")).splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start = m["indent"], i
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        body = [l[len(indent):] if l.startswith(indent) else l.lstrip() for l in lines[start + 1:j]]
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        fragment = k >= 0 and bool(FRAGMENT.match(lines[k]))
        lang = "yaml" if m["lang"] in ("yaml", "yml") else "json"
        out.append(Block(f"{rel(path)}:{start + 1}", lang, "\n".join(body) + "\n", fragment))
        i = j + 1
    return out


_RSA_PEM: str | None = None


def _rsa_pem() -> str:
    global _RSA_PEM
    if _RSA_PEM is None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _RSA_PEM = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode()
    return _RSA_PEM


def placeholders(config) -> dict[str, str]:
    """A value for every variable and file the configuration names."""
    out: dict[str, str] = {}

    def walk(node, path):
        if isinstance(node, dict):
            for src in ("env", "file"):
                if isinstance(node.get(src), str):
                    out[node[src]] = _rsa_pem() if "private_key" in path else "placeholder-" + "x" * 36
            for k, v in node.items():
                walk(v, path + (str(k),))
        elif isinstance(node, list):
            for v in node:
                walk(v, path)
    walk(config, ())
    return out


def ensure_compiler() -> None:
    proc = subprocess.run(["cargo", "build", "--quiet", "--example", "compile-config"], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not COMPILER.exists():
        sys.exit(f"check-docs: cargo build --example compile-config failed:\n{proc.stderr[-3000:]}")


def compile_natively(configs: list[tuple[str, dict]]) -> dict[str, str]:
    """where -> the filter's error ('' when it compiles)."""
    if not configs:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        files, secrets = {}, {}
        for n, (where, cfg) in enumerate(configs):
            f = Path(tmp) / f"{n}.json"
            f.write_text(json.dumps(cfg), encoding="utf-8")
            files[str(f)] = where
            secrets.update(placeholders(cfg))
        env = dict(os.environ, COMPILE_CONFIG_SECRETS=json.dumps(secrets))
        proc = subprocess.run([str(COMPILER), *files], capture_output=True, text=True, env=env)
        out = {}
        for line in proc.stdout.splitlines():
            status, _, rest = line.partition(" ")
            f, _, err = rest.partition(": ")
            out[files[f.rstrip(":")]] = "" if status == "ok" else err or line
        missing = set(files.values()) - set(out)
        if missing:
            sys.exit(f"check-docs: compile-config said nothing about {sorted(missing)}:\n{proc.stderr[-2000:]}")
        return out


def schema_errors(schema: dict, cfg) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in jsonschema.Draft202012Validator(schema).iter_errors(cfg)]


def _hcms(bootstrap: dict):
    for listener in (bootstrap.get("static_resources") or {}).get("listeners") or []:
        for chain in listener.get("filter_chains") or []:
            for f in chain.get("filters") or []:
                if f.get("name") == "envoy.filters.network.http_connection_manager":
                    yield f.get("typed_config") or {}


def envoy_plugins(bootstrap: dict) -> list[tuple[str, str]]:
    """(which filter, plugin JSON text) of every filter of ours in an Envoy bootstrap."""
    out = []
    for hcm in _hcms(bootstrap):
        for hf in hcm.get("http_filters") or []:
            tc = hf.get("typed_config") or {}
            if hf.get("name") == WASM_FILTER:
                out.append(("wasm", ((tc.get("config") or {}).get("configuration") or {}).get("value")))
            elif hf.get("name") == DM_FILTER:
                out.append(("dynamic module", (tc.get("filter_config") or {}).get("value")))
    return out


def kubernetes_plugins(obj: dict) -> list[tuple[str, object]]:
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind == "WasmPlugin":
        return [("WasmPlugin", spec.get("pluginConfig"))]
    if kind == "EnvoyExtensionPolicy":
        return [(f"EnvoyExtensionPolicy {k}", x.get("config")) for k in ("wasm", "dynamicModule")
                for x in spec.get(k) or []]
    if kind == "EnvoyFilter":
        out = []
        for patch in spec.get("configPatches") or []:
            hf = (patch.get("patch") or {}).get("value") or {}
            tc = hf.get("typed_config") or {}
            if hf.get("name") == WASM_FILTER:
                out.append(("EnvoyFilter wasm", ((tc.get("config") or {}).get("configuration") or {}).get("value")))
            elif hf.get("name") == DM_FILTER:
                out.append(("EnvoyFilter dynamic module", (tc.get("filter_config") or {}).get("value")))
        return out
    return []


def _point_at_built_modules(bootstrap: dict) -> dict:
    cfg = copy.deepcopy(bootstrap)

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "filename" and isinstance(v, str) and v.endswith(".wasm"):
                    node[k] = str(WASM)
                elif k == "filename" and isinstance(v, str) and v.endswith(".so"):
                    node[k] = str(SO)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(cfg)
    return cfg


def envoy_validate(where: str, bootstrap: dict, secrets: dict[str, str]) -> str:
    """'' when `envoy --mode validate` accepts it, else the end of its output."""
    for needed, how in ((ENVOY, "make deps"), (WASM, "make build"), (SO, "make build-so")):
        if not needed.exists():
            return f"{rel(needed)} is missing ({how})"
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "envoy.yaml"
        f.write_text(yaml.safe_dump(_point_at_built_modules(bootstrap), sort_keys=False), encoding="utf-8")
        env = dict(os.environ, **{k: v for k, v in secrets.items() if not k.startswith("/")})
        proc = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(f), "-l", "error",
                               "--use-dynamic-base-id"], cwd=REPO, capture_output=True, text=True, env=env,
                              timeout=180)
        return "" if proc.returncode == 0 else (proc.stdout + proc.stderr)[-1500:]


def check_blocks(files: list[Path], texts: dict[Path, str] | None = None, quiet: bool = False) -> int:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    problems: list[str] = []
    plugin_configs: list[tuple[str, dict]] = []
    bootstraps: list[tuple[str, dict]] = []
    counts = {"plugin configurations": 0, "Envoy bootstraps": 0, "Kubernetes objects": 0, "fragments": 0}
    all_blocks = [b for f in files for b in blocks(f, (texts or {}).get(f))]
    for b in all_blocks:
        if b.fragment:
            counts["fragments"] += 1
            continue
        if b.lang == "json":
            try:
                cfg = json.loads(b.text)
            except json.JSONDecodeError as e:
                problems.append(f"{b.where}: not JSON ({e}); a fragment needs <!-- fragment --> before it")
                continue
            if not isinstance(cfg, dict):
                problems.append(f"{b.where}: a JSON block that is not a plugin configuration; mark it <!-- fragment -->")
                continue
            counts["plugin configurations"] += 1
            plugin_configs.append((b.where, cfg))
            continue
        try:
            objs = [d for d in yaml.safe_load_all(b.text) if d is not None]
        except yaml.YAMLError as e:
            problems.append(f"{b.where}: not YAML ({str(e).splitlines()[0]}); a fragment needs <!-- fragment -->")
            continue
        for n, obj in enumerate(objs):
            where = b.where + (f" (document {n + 1})" if len(objs) > 1 else "")
            if isinstance(obj, dict) and "static_resources" in obj:
                counts["Envoy bootstraps"] += 1
                bootstraps.append((where, obj))
                found = envoy_plugins(obj)
                if not found:
                    problems.append(f"{where}: an Envoy bootstrap without our filter (wasm or dynamic module)")
                for which, value in found:
                    try:
                        plugin_configs.append((f"{where} [{which} filter]", json.loads(value)))
                    except (TypeError, json.JSONDecodeError) as e:
                        problems.append(f"{where} [{which} filter]: its plugin configuration is not JSON ({e})")
            elif isinstance(obj, dict) and "apiVersion" in obj and "kind" in obj:
                counts["Kubernetes objects"] += 1
                for which, value in kubernetes_plugins(obj):
                    if isinstance(value, str):
                        try:
                            value = json.loads(value)
                        except json.JSONDecodeError as e:
                            problems.append(f"{where} [{which}]: its plugin configuration is not JSON ({e})")
                            continue
                    plugin_configs.append((f"{where} [{which}]", value))
            else:
                problems.append(f"{where}: neither an Envoy bootstrap nor a Kubernetes object; mark it "
                                "<!-- fragment --> if it is part of one")
    if plugin_configs:
        ensure_compiler()
    for where, cfg in plugin_configs:
        problems += [f"{where}: schema: {e}" for e in schema_errors(schema, cfg)]
    for where, err in compile_natively([(w, c) for w, c in plugin_configs if isinstance(c, dict)]).items():
        if err:
            problems.append(f"{where}: the filter refuses it: {err}")
    for where, boot in bootstraps:
        secrets = {}
        for _, value in envoy_plugins(boot):
            try:
                secrets.update(placeholders(json.loads(value)))
            except (TypeError, json.JSONDecodeError):
                pass
        err = envoy_validate(where, boot, secrets)
        if err:
            problems.append(f"{where}: envoy --mode validate refuses it:\n{err}")
    for p in problems if not quiet else []:
        print(f"check-docs: {p}")
    if not quiet:
        print(f"check-docs blocks: {len(all_blocks)} json/yaml blocks in {len(files)} files: "
              + ", ".join(f"{v} {k}" for k, v in counts.items())
              + f"; {len(plugin_configs)} plugin configurations checked against the schema and the filter, "
              f"{len(bootstraps)} bootstraps by envoy --mode validate; {len(problems)} problems")
    return 1 if problems else 0


# ------------------------------------------------------------------------------------------------- fields

def _norm(path: str) -> str:
    for a, b in ALIASES:
        if path.startswith(a):
            return b + path[len(a):]
        if path == a.rstrip("."):
            return path if a == "providers." else b.rstrip(".")
    return path


def schema_fields(schema: dict) -> set[str]:
    def resolve(n):
        while isinstance(n, dict) and "$ref" in n:
            target = schema
            for part in n["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            n = {**target, **{k: v for k, v in n.items() if k != "$ref"}}
        return n

    out: set[str] = set()

    def walk(n, path):
        n = resolve(n)
        if not isinstance(n, dict):
            return
        for k, v in (n.get("properties") or {}).items():
            p = f"{path}.{k}" if path else k
            out.add(p)
            walk(v, p)
        if isinstance(n.get("items"), dict):
            walk(n["items"], path)
        if isinstance(n.get("additionalProperties"), dict):
            walk(n["additionalProperties"], f"{path}.<id>")
        for pp in (n.get("patternProperties") or {}).values():
            walk(pp, f"{path}.<id>")
        for key in ("oneOf", "anyOf", "allOf"):
            for x in n.get(key) or []:
                walk(x, path)
        for key in ("then", "else"):
            if isinstance(n.get(key), dict):
                walk(n[key], path)
    walk(schema, "")
    return {_norm(p) for p in out}


FIELD = re.compile(r"^\s*(?P<attrs>(?:#\[[^\n]*\]\s*)*)(?:pub(?:\([a-z]+\))?\s+)?(?P<name>[a-z_][a-z0-9_]*)\s*:\s*(?P<ty>[^\n]+?),?[ \t]*$",
                   re.M)


def rust_structs(src: Path) -> dict[str, list[tuple[str, str, bool]]]:
    """Raw* struct -> [(field name as serde reads it, type, flattened)], for the structs that refuse unknown fields."""
    out = {}
    for f in sorted(src.rglob("*.rs")):
        text = f.read_text(encoding="utf-8")
        # Attributes of a struct may span several #[...] lines: find each deny_unknown_fields struct.
        for m in re.finditer(r"((?:#\[[^\n]*\]\s*)+)(?:pub(?:\([a-z]+\))?\s+)?struct\s+(Raw\w+)\s*\{(.*?)\n\}", text,
                             re.S):
            if "deny_unknown_fields" not in m.group(1):
                continue
            body = re.sub(r"//[^\n]*", "", m.group(3))
            fields = []
            for fm in FIELD.finditer(body):
                attrs, name, ty = fm["attrs"], fm["name"], fm["ty"].strip()
                rename = re.search(r'rename\s*=\s*"([^"]+)"', attrs)
                fields.append((rename.group(1) if rename else name, ty, "flatten" in attrs))
            out[m.group(2)] = fields
    return out


def rust_fields(src: Path) -> tuple[set[str], set[str]]:
    """(paths serde reads from RawConfig, paths that are a serde_json::Value)."""
    structs = rust_structs(src)
    paths, values = set(), set()

    def walk(struct: str, path: str, depth: int = 0):
        if depth > 8:
            return
        for name, ty, flat in structs.get(struct, []):
            p = path if flat else (f"{path}.{name}" if path else name)
            nested = re.findall(r"Raw\w+", ty)
            if not flat:
                paths.add(p)
            if "Value" in ty and not nested:
                values.add(p)
            for n in nested:
                if n in structs:
                    walk(n, p + (".<id>" if re.search(r"Map<", ty) else ""), depth + 1)
    if "RawConfig" not in structs:
        sys.exit("check-docs: no RawConfig struct with deny_unknown_fields in src/")
    walk("RawConfig", "")
    return {_norm(p) for p in paths}, {_norm(p) for p in values}


TABLE_ROW = re.compile(r"^\|(.*)\|\s*$")


def documented_fields(text: str) -> set[str]:
    """Backticked paths in the first cell of the rows of every table whose header's first cell is Field."""
    out, in_table = set(), False
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = TABLE_ROW.match(line)
        if not m:
            in_table = False
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", m.group(1))]
        if not in_table:
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            in_table = cells[0] == "Field" and bool(re.match(r"^\|[\s:|-]+\|\s*$", nxt))
            continue
        if re.match(r"^[\s:-]*$", cells[0]):
            continue
        out |= {_norm(f) for f in re.findall(r"`([^`]+)`", cells[0])}
    return out


def check_fields(config_doc: str | None = None, schema: dict | None = None, src: Path = REPO / "src",
                 quiet: bool = False) -> int:
    schema = schema if schema is not None else json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    text = config_doc if config_doc is not None else CONFIG_DOC.read_text(encoding="utf-8")
    in_schema, (in_rust, values), documented = schema_fields(schema), rust_fields(src), documented_fields(text)
    literals = set(re.findall(r'"([a-z_][a-z0-9_]*)"', "\n".join(
        f.read_text(encoding="utf-8") for f in src.rglob("*.rs"))))

    def read_by_rust(p: str) -> bool:
        if p in in_rust:
            return True
        parent = next((v for v in values if p.startswith(v + ".")), None)
        return parent is not None and p.rsplit(".", 1)[-1] in literals

    pending = {p for p in PENDING_ISSUE_25 if p not in in_schema and not read_by_rust(p)}
    problems = []
    problems += [f"{p}: in docs/config.schema.json, not documented in docs/configuration.md's field tables"
                 for p in sorted(in_schema - documented)]
    problems += [f"{p}: documented in docs/configuration.md, not in docs/config.schema.json"
                 for p in sorted(documented - in_schema - pending)]
    problems += [f"{p}: documented in docs/configuration.md, read by no Raw* struct in src/ (serde refuses it)"
                 for p in sorted(documented - pending) if not read_by_rust(p)]
    problems += [f"{p}: read by a Raw* struct in src/, not in docs/config.schema.json"
                 for p in sorted(in_rust - in_schema - pending)]
    for p in problems if not quiet else []:
        print(f"check-docs: {p}")
    if not quiet:
        print(f"check-docs fields: {len(in_schema)} fields in the schema, {len(documented)} documented in "
              f"docs/configuration.md, {len(in_rust)} read by the Raw* structs"
              + (f"; {len(pending)} issue-25 provider fields documented ahead of the schema and src/: "
                 f"{', '.join(sorted(pending))}" if pending else "") + f"; {len(problems)} problems")
    return 1 if problems else 0


# -------------------------------------------------------------------------------------------------- links

# The IdP pages another branch writes (issue 25): linked before they exist, reported until they do.
PENDING_PAGES = {f"docs/idp/{n}.md" for n in ("entra", "okta", "auth0", "keycloak", "cognito")}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slugs(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    out, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-"))
    return out


def check_links(files: list[Path], quiet: bool = False) -> int:
    problems, pending, n = [], set(), 0
    for f in files:
        text = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", f.read_text(encoding="utf-8"), flags=re.S))
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):
                continue
            n += 1
            path, _, anchor = target.partition("#")
            dest = (f.parent / path).resolve() if path else f
            if not dest.exists():
                if rel(dest) in PENDING_PAGES:
                    pending.add(rel(dest))
                else:
                    problems.append(f"{rel(f)}: link to {target}: no such file")
                continue
            if anchor and dest.suffix == ".md" and anchor not in slugs(dest):
                problems.append(f"{rel(f)}: link to {target}: no such heading in {rel(dest)}")
    for p in problems if not quiet else []:
        print(f"check-docs: {p}")
    if not quiet:
        print(f"check-docs links: {n} relative links in {len(files)} files"
              + (f"; pages not written yet (issue 25, idp-e2e): {', '.join(sorted(pending))}" if pending else "")
              + f"; {len(problems)} problems")
    return 1 if problems else 0


# --------------------------------------------------------------------------------------------- self-test

def self_test() -> int:
    """Each check fails on what it guards against: a field renamed in docs/configuration.md, a schema field the
    docs lack, a plugin configuration with a misspelt field, an unmarked fragment, an Envoy configuration Envoy
    refuses, a plugin configuration inside an Envoy configuration that the filter refuses, a link to a missing
    heading; and a marked fragment passes."""
    failures, cases = [], 0

    def expect(ok: bool, what: str):
        nonlocal cases
        cases += 1
        if not ok:
            failures.append(what)

    doc = CONFIG_DOC.read_text(encoding="utf-8")
    expect(check_fields(quiet=True) == 0, "the docs as they are fail the field check")
    renamed = doc.replace("`provider.jwks_refresh_s`", "`provider.jwks_refresh_seconds`", 1)
    expect(renamed != doc and check_fields(config_doc=renamed, quiet=True) != 0,
           "renaming provider.jwks_refresh_s in docs/configuration.md passes the field check")
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    schema["properties"]["undocumented_field"] = {"type": "string"}
    expect(check_fields(schema=schema, quiet=True) != 0,
           "a schema field missing from docs/configuration.md passes the field check")
    fake = REPO / "docs" / "__self_test__.md"
    good = [b for b in blocks(CONFIG_DOC) if b.lang == "json" and not b.fragment]
    boots = [b for b in blocks(REPO / "docs" / "deployment.md") if b.lang == "yaml" and not b.fragment]
    expect(bool(good) and bool(boots), "docs/configuration.md or docs/deployment.md has no block to break")
    if good and boots:
        broken = good[0].text.replace('"metadata_cluster"', '"metadata_clustr"', 1)
        boot = boots[0].text
        envoy_broken = boot.replace("type: LOGICAL_DNS", "type: NO_SUCH_TYPE", 1)
        plugin_broken = boot.replace('"metadata_cluster"', '"metadata_clustr"', 1)
        expect(check_blocks([fake], texts={fake: f"```json\n{good[0].text}```\n"}, quiet=True) == 0,
               "a good plugin configuration fails the block check")
        expect(check_blocks([fake], texts={fake: f"```yaml\n{boot}```\n"}, quiet=True) == 0,
               "a good Envoy configuration fails the block check")
        for name, text in (("a misspelt field", f"```json\n{broken}```\n"),
                           ("an unmarked fragment", '```json\n{ "provider": { ... } }\n```\n'),
                           ("an Envoy configuration Envoy refuses", f"```yaml\n{envoy_broken}```\n"),
                           ("an Envoy configuration whose plugin JSON the filter refuses",
                            f"```yaml\n{plugin_broken}```\n")):
            expect(envoy_broken != boot and plugin_broken != boot
                   and check_blocks([fake], texts={fake: text}, quiet=True) != 0, f"{name} passes the block check")
        expect(check_blocks([fake], texts={fake: f"<!-- fragment -->\n```json\n{broken}```\n"}, quiet=True) == 0,
               "a marked fragment fails the block check")
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.md"
        page.write_text("# A heading\n\n[ok](#a-heading) [bad](#no-such-heading)\n", encoding="utf-8")
        expect(check_links([page], quiet=True) != 0, "a link to a missing heading passes the link check")
    for f in failures:
        print(f"check-docs --self-test: {f}")
    print(f"check-docs --self-test: {cases - len(failures)} of {cases} cases behave as they should")
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    if "--self-test" in argv:
        return self_test()
    what = [a for a in argv if not a.startswith("-")] or ["blocks", "fields", "links"]
    rc = 0
    if "blocks" in what:
        rc |= check_blocks(docs())
    if "fields" in what:
        rc |= check_fields()
    if "links" in what:
        rc |= check_links(docs())
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
