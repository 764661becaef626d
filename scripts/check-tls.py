#!/usr/bin/env python3
"""Every TLS connection a shipped config or example opens verifies its peer.

    scripts/check-tls.py [FILE...]     (default: envoy/*.yaml, examples/**/*.y*ml, and the ```yaml blocks of
                                        README.md, docs/**/*.md and examples/**/*.md)

An Envoy `UpstreamTlsContext` passes when its `common_tls_context` has a validation context that
  - trusts a CA: `trusted_ca` (the system bundle /etc/ssl/certs/ca-certificates.crt or a named CA file, inline
    PEM, or an environment variable) or a `ca_certificate_provider_instance`, and does not set
    `trust_chain_verification: ACCEPT_UNTRUSTED`; and
  - checks the expected name: non-empty `match_typed_subject_alt_names` (or the deprecated
    `match_subject_alt_names`), or the enclosing cluster's `auto_san_validation: true`.
An Istio `DestinationRule` with `tls.mode: SIMPLE` or `MUTUAL` passes with `caCertificates` or `credentialName`,
`subjectAltNames`, and no `insecureSkipVerify: true`.

Opt-out, for a loopback test config only: the cluster carries, with a comment saying why,
    metadata: { filter_metadata: { fhir_tenant_router.check_tls: { unverified_loopback: "<why>" } } }
and every endpoint of that cluster is 127.0.0.1, ::1 or localhost; anywhere else the opt-out is itself an error.

Exit 1 naming each file, cluster and missing piece; 0 when every TLS context verifies its peer."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
OPT_OUT_KEY = "fhir_tenant_router.check_tls"
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def default_files() -> list[Path]:
    files = sorted(REPO.glob("envoy/*.yaml")) + sorted(REPO.glob("examples/**/*.yaml")) \
        + sorted(REPO.glob("examples/**/*.yml"))
    files += [REPO / "README.md"] + sorted(REPO.glob("docs/**/*.md")) + sorted(REPO.glob("examples/**/*.md"))
    return [f for f in files if f.is_file()]


def documents(path: Path) -> list[tuple[str, object]]:
    """(where, parsed YAML document) for a YAML file, or for each ```yaml block of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    if path.suffix == ".md":
        out = []
        for m in re.finditer(r"^```ya?ml\n(.*?)^```", text, re.S | re.M):
            line = text.count("\n", 0, m.start()) + 1
            try:
                out += [(f"{rel}:{line}", d) for d in yaml.safe_load_all(m.group(1))]
            except yaml.YAMLError:
                if "UpstreamTlsContext" in m.group(1) or "DestinationRule" in m.group(1):
                    out.append((f"{rel}:{line}", {"__unparsable__": True}))
        return out
    return [(str(rel), d) for d in yaml.safe_load_all(text)]


def walk(node, parents=()):
    """Every dict in a document, with the chain of dicts above it."""
    if isinstance(node, dict):
        yield node, parents
        for v in node.values():
            yield from walk(v, parents + (node,))
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, parents)


def _endpoints(cluster: dict) -> list[str]:
    out = []
    for d, _ in walk(cluster.get("load_assignment", {})):
        sa = d.get("socket_address")
        if isinstance(sa, dict):
            out.append(str(sa.get("address", "")))
    return out


def _auto_san(cluster: dict) -> bool:
    for d, _ in walk(cluster.get("typed_extension_protocol_options", {})):
        if d.get("auto_san_validation") is True:
            return True
    return False


def check_tls_context(ctx: dict, cluster: dict | None) -> list[str]:
    problems = []
    common = ctx.get("common_tls_context") or {}
    vc = common.get("validation_context")
    if vc is None:
        vc = (common.get("combined_validation_context") or {}).get("default_validation_context")
    if not isinstance(vc, dict):
        return ["no common_tls_context.validation_context: the peer's certificate is not verified"]
    trusted = vc.get("trusted_ca")
    if not (isinstance(trusted, dict) and any(trusted.get(k) for k in
                                              ("filename", "inline_string", "inline_bytes", "environment_variable"))) \
            and not vc.get("ca_certificate_provider_instance"):
        problems.append("validation_context has no trusted_ca (the system bundle "
                        "/etc/ssl/certs/ca-certificates.crt or a named CA)")
    if vc.get("trust_chain_verification") == "ACCEPT_UNTRUSTED":
        problems.append("trust_chain_verification: ACCEPT_UNTRUSTED")
    names = vc.get("match_typed_subject_alt_names") or vc.get("match_subject_alt_names")
    if not names and not (cluster is not None and _auto_san(cluster)):
        problems.append("no match_typed_subject_alt_names (nor the cluster's auto_san_validation): any "
                        "certificate the CA signed, for any name, is accepted")
    return problems


def check_destination_rule(doc: dict) -> list[str]:
    problems = []
    spec = doc.get("spec") or {}
    settings = [spec.get("trafficPolicy") or {}] + [
        p for p in (spec.get("trafficPolicy") or {}).get("portLevelSettings") or [] if isinstance(p, dict)]
    for s in settings:
        tls = s.get("tls") or {}
        if tls.get("mode") in ("SIMPLE", "MUTUAL"):
            if tls.get("insecureSkipVerify") is True:
                problems.append("tls.insecureSkipVerify: true")
            if not (tls.get("caCertificates") or tls.get("credentialName")):
                problems.append("tls without caCertificates (e.g. /etc/ssl/certs/ca-certificates.crt) or "
                                "credentialName")
            if not tls.get("subjectAltNames"):
                problems.append("tls without subjectAltNames")
    return problems


def check_document(where: str, doc) -> list[str]:
    errors = []
    if isinstance(doc, dict) and doc.get("__unparsable__"):
        return [f"{where}: a YAML block with a TLS setting that does not parse"]
    if isinstance(doc, dict) and doc.get("kind") == "DestinationRule":
        errors += [f"{where}: DestinationRule {doc.get('metadata', {}).get('name')}: {p}"
                   for p in check_destination_rule(doc)]
    for node, parents in walk(doc):
        if node.get("@type") != UPSTREAM_TLS:
            continue
        cluster = next((p for p in reversed(parents) if "load_assignment" in p or "cluster_type" in p
                        or ("name" in p and "transport_socket" in p)), None)
        name = cluster.get("name") if cluster else "?"
        opt_out = ((cluster or {}).get("metadata") or {}).get("filter_metadata", {}).get(OPT_OUT_KEY)
        if opt_out is not None:
            eps = _endpoints(cluster or {})
            if not (isinstance(opt_out, dict) and opt_out.get("unverified_loopback")):
                errors.append(f"{where}: cluster {name}: {OPT_OUT_KEY} needs unverified_loopback: \"<why>\"")
            elif not eps or any(e not in LOOPBACK for e in eps):
                errors.append(f"{where}: cluster {name}: the unverified-TLS opt-out is for loopback test configs "
                              f"only, and this cluster reaches {eps}")
            continue
        errors += [f"{where}: cluster {name}: {p}" for p in check_tls_context(node, cluster)]
    return errors


def main(argv: list[str]) -> int:
    files = [Path(a).resolve() for a in argv] or default_files()
    errors, contexts = [], 0
    for f in files:
        try:
            docs = documents(f)
        except yaml.YAMLError as exc:
            if "UpstreamTlsContext" in f.read_text(encoding="utf-8"):
                errors.append(f"{f}: does not parse as YAML: {exc}")
            continue
        for where, doc in docs:
            contexts += sum(1 for n, _ in walk(doc) if n.get("@type") == UPSTREAM_TLS)
            errors += check_document(where, doc)
    for e in errors:
        print(f"check-tls: {e}", file=sys.stderr)
    print(f"check-tls: {len(files)} files, {contexts} UpstreamTlsContext, {len(errors)} without peer verification")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
