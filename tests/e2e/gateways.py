"""The Envoy configuration that Istio and Envoy Gateway give their Envoy for our Kubernetes examples, rendered
here from the example files themselves so that a real Envoy can run the examples' routes with our module.

Only what decides where a request goes and what path and Host the FHIR server receives is rendered, and it is
rendered the way each gateway renders it (read in the gateways' source, cited below); anything else an
example uses that this file does not model raises `Unmodelled`, so a changed example cannot pass by being
misread. Not rendered: TLS (the listener is plain HTTP on 127.0.0.1; the route is the same), how the module
is fetched (a local file here; istio-agent and Envoy Gateway both hand Envoy the .wasm), and filters the
gateways add that do not route (stats, CORS, Istio's authn/authz).

Istio (pilot/pkg/networking/core/route/route.go, 1.24 to 1.30): a VirtualService `http` entry becomes one route
per match, in order; `uri.prefix` stays a `prefix` match (path_separated_prefix is only for Gateway API
semantics), header matches become `string_match`, sorted by name; `rewrite.uri` becomes `prefix_rewrite`
unchanged; the destination is cluster `outbound|<port>||<host>`. The WasmPlugin (pilot/pkg/model/extensions.go)
becomes a wasm filter named `<namespace>.<name>`, root_id `pluginName`, the pluginConfig as JSON, and
`failStrategy` as `failure_policy` (FAIL_RELOAD from 1.27); it arrives through ECDS and never carries
allow_on_headers_stop_iteration. The gateway's HCM uses Istio's default path normalisation (BASE:
normalize_path only, escaped slashes kept: listener_builder.go).

Envoy Gateway v1.9.0 (internal/xds/translator/route.go, wasm.go; internal/gatewayapi/sort.go, filters.go): each
HTTPRoute rule and match is one route; routes are sorted by path match type, path length, then number of
header matches, most specific first; `PathPrefix /` is a `prefix: /` match; a URLRewrite `ReplacePrefixMatch`
becomes `prefix_rewrite` with its trailing `/` trimmed (route.go buildXdsURLRewriteAction, "remove trailing /
to fix #3989"; a replacement of "" or "/" becomes a regex instead); an HTTPRouteFilter `urlRewrite.path`
`ReplaceRegexMatch` becomes `regex_rewrite`; `directResponse` a direct response; a rule's backends are cluster
`httproute/<ns>/<name>/rule/<n>`. The wasm filter of an EnvoyExtensionPolicy sits in the HCM `disabled: true`
under `envoy.filters.http.wasm/envoyextensionpolicy/<ns>/<name>/wasm/<i>` and each route of the targeted
HTTPRoute enables it with a FilterConfig; `failOpen` becomes the PluginConfig's `fail_open`. The listener
buffers at most 32768 bytes per connection (Envoy Gateway's default), the HCM normalises paths, merges slashes
and redirects escaped slashes, and the router suppresses x-envoy headers. An EnvoyPatchPolicy's JSONPatch `add`
of a Cluster adds that cluster.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
FILTER_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
STRING_VALUE_TYPE = "type.googleapis.com/google.protobuf.StringValue"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EG_LISTENER_BUFFER_LIMIT = 32768
SVC_SUFFIX = ".svc.cluster.local"

# A Kubernetes Service port -> the 127.0.0.1 port that stands in for it: {(namespace, name, port): local_port}.
Services = dict[tuple[str, str, int], int]


class Unmodelled(ValueError):
    """The example uses something this renderer does not reproduce; extend the renderer (from the gateway's
    source) rather than let the test guess."""


def _only(obj: dict, allowed: set[str], where: str) -> None:
    extra = set(obj) - allowed
    if extra:
        raise Unmodelled(f"{where}: {sorted(extra)} not modelled")


def _static_cluster(name: str, port: int) -> dict:
    return {"name": name, "type": "STATIC", "connect_timeout": "2s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


def _service_port(services: Services, host: str, port: int) -> int:
    """`name.namespace.svc.cluster.local:port` -> the local port standing in for it."""
    if not host.endswith(SVC_SUFFIX):
        raise Unmodelled(f"{host}: only in-cluster Services are modelled")
    name, ns = host[: -len(SVC_SUFFIX)].split(".")
    try:
        return services[(ns, name, port)]
    except KeyError:
        raise Unmodelled(f"no stand-in for Service {ns}/{name}:{port}") from None


def _bootstrap(admin_port: int, listener: dict, clusters: list[dict]) -> dict:
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
            "static_resources": {"listeners": [listener], "clusters": clusters}}


def _wasm_typed_config(plugin_config: dict) -> dict:
    return {"@type": WASM_TYPE, "config": plugin_config}


def _plugin_config(name: str, root_id: str, configuration: dict, wasm: Path, **policy) -> dict:
    return {"name": name, "root_id": root_id,
            "vm_config": {"runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": str(wasm)}}},
            "configuration": {"@type": STRING_VALUE_TYPE, "value": json.dumps(configuration)}, **policy}


# ------------------------------------------------------------------------------------------------ Istio

ISTIO_FAILURE_POLICY = {"FAIL_CLOSE": "FAIL_CLOSED", "FAIL_OPEN": "FAIL_OPEN", "FAIL_RELOAD": "FAIL_RELOAD"}


def _istio_string_match(m: dict, where: str) -> dict:
    _only(m, {"exact", "prefix", "regex"}, where)
    ((kind, value),) = m.items()
    return {"safe_regex": {"regex": value}} if kind == "regex" else {kind: value}


def istio_routes(vs: dict) -> list[dict]:
    """The routes of a VirtualService bound to a gateway, in Envoy's terms."""
    out = []
    for http in vs["spec"]["http"]:
        _only(http, {"name", "match", "rewrite", "route"}, f"VirtualService http {http.get('name')}")
        (dest,) = http["route"]  # one destination, no weights
        _only(dest, {"destination"}, "route")
        d = dest["destination"]
        cluster = f"outbound|{d['port']['number']}||{d['host']}"
        action: dict = {"cluster": cluster}
        rewrite = http.get("rewrite", {})
        _only(rewrite, {"uri", "uriRegexRewrite", "authority"}, "rewrite")
        if "uriRegexRewrite" in rewrite:
            action["regex_rewrite"] = {"pattern": {"regex": rewrite["uriRegexRewrite"]["match"]},
                                       "substitution": rewrite["uriRegexRewrite"]["rewrite"]}
        elif rewrite.get("uri"):
            action["prefix_rewrite"] = rewrite["uri"]
        if rewrite.get("authority"):
            action["host_rewrite_literal"] = rewrite["authority"]
        for m in http["match"]:
            _only(m, {"uri", "headers"}, "match")
            match: dict = {"case_sensitive": True}
            uri = m.get("uri", {"prefix": "/"})
            _only(uri, {"exact", "prefix", "regex"}, "uri")
            if "exact" in uri:
                match["path"] = uri["exact"]
            elif "prefix" in uri:
                match["prefix"] = uri["prefix"]
            else:
                match["safe_regex"] = {"regex": uri["regex"]}
            headers = [{"name": name, "string_match": _istio_string_match(sm, f"header {name}")}
                       for name, sm in m.get("headers", {}).items()]
            if headers:
                match["headers"] = sorted(headers, key=lambda h: h["name"])
            out.append({"name": http.get("name", ""), "match": match, "route": dict(action)})
    return out


def render_istio(wasmplugin: dict, gateway: dict, vs: dict, wasm: Path, *, listener_port: int,
                 admin_port: int, services: Services) -> dict:
    """What the ingress gateway selected by `wasmplugin` runs for `gateway` + `vs`."""
    spec = wasmplugin["spec"]
    _only(spec, {"selector", "url", "imagePullPolicy", "pluginName", "type", "phase", "failStrategy",
                 "pluginConfig", "sha256", "imagePullSecret"}, "WasmPlugin spec")
    if spec.get("type", "HTTP") != "HTTP":
        raise Unmodelled("only HTTP WasmPlugins are modelled")
    hosts = vs["spec"]["hosts"]
    gw_name = f"{gateway['metadata']['namespace']}/{gateway['metadata']['name']}"
    if gw_name not in vs["spec"]["gateways"]:
        raise Unmodelled(f"the VirtualService is not bound to {gw_name}")
    policy = {}
    if "failStrategy" in spec:
        policy["failure_policy"] = ISTIO_FAILURE_POLICY[spec["failStrategy"]]
    plugin = _plugin_config(f"{wasmplugin['metadata']['namespace']}.{wasmplugin['metadata']['name']}",
                            spec.get("pluginName", ""), spec.get("pluginConfig", {}), wasm, **policy)
    hcm = {"@type": HCM_TYPE, "stat_prefix": "outbound_0.0.0.0_443", "use_remote_address": True,
           "normalize_path": True, "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
           "route_config": {"name": "https.443.fhir", "virtual_hosts": [{
               "name": f"{hosts[0]}:443", "domains": [h for host in hosts for h in (host, f"{host}:*")],
               "routes": istio_routes(vs)}]},
           "http_filters": [{"name": plugin["name"], "typed_config": _wasm_typed_config(plugin)},
                            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}]}
    listener = {"name": "0.0.0.0_443",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener_port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}]}
    # Istio generates a cluster for every Service port the gateway can see.
    clusters = [_static_cluster(f"outbound|{port}||{name}.{ns}{SVC_SUFFIX}", local)
                for (ns, name, port), local in services.items()]
    return _bootstrap(admin_port, listener, clusters)


# ---------------------------------------------------------------------------------------- Envoy Gateway

def eg_wasm_filter_name(policy: dict, index: int) -> str:
    return f"envoy.filters.http.wasm/envoyextensionpolicy/{policy['metadata']['namespace']}/" \
           f"{policy['metadata']['name']}/wasm/{index}"


def _eg_path_match(match: dict) -> tuple[dict, tuple[int, int]]:
    """The Envoy path match and its sort key (type rank, length): Exact > RegularExpression > PathPrefix."""
    path = match.get("path", {"type": "PathPrefix", "value": "/"})
    kind, value = path.get("type", "PathPrefix"), path["value"]
    if kind == "Exact":
        return {"path": value}, (3, len(value))
    if kind == "RegularExpression":
        return {"safe_regex": {"regex": value}}, (2, len(value))
    if kind != "PathPrefix":
        raise Unmodelled(f"path match {kind}")
    if value == "/":
        return {"prefix": "/"}, (1, 1)
    return {"path_separated_prefix": value.rstrip("/")}, (1, len(value.rstrip("/")))


def eg_url_rewrite(path_match: dict, rewrite: dict) -> dict:
    """A Gateway API URLRewrite filter's path, as route.go buildXdsURLRewriteAction renders it."""
    _only(rewrite, {"path"}, "URLRewrite")
    path = rewrite["path"]
    if path["type"] == "ReplaceFullPath":
        return {"regex_rewrite": {"pattern": {"regex": "^/.*$"}, "substitution": path["replaceFullPath"]}}
    if path["type"] != "ReplacePrefixMatch":
        raise Unmodelled(f"URLRewrite path {path['type']}")
    replace = path["replacePrefixMatch"]
    prefix = path_match.get("prefix", path_match.get("path_separated_prefix"))
    if prefix is not None and replace in ("", "/"):
        return {"regex_rewrite": {"pattern": {"regex": "^" + re.escape(prefix) + r"\/*"}, "substitution": "/"}}
    return {"prefix_rewrite": replace.removesuffix("/")}


def _eg_route_filter(hrf: dict) -> dict:
    """An Envoy Gateway HTTPRouteFilter (ExtensionRef): its path rewrite or direct response."""
    spec = hrf["spec"]
    _only(spec, {"urlRewrite", "directResponse"}, f"HTTPRouteFilter {hrf['metadata']['name']}")
    if "urlRewrite" in spec:
        _only(spec["urlRewrite"], {"path"}, "HTTPRouteFilter urlRewrite")
        path = spec["urlRewrite"]["path"]
        if path["type"] != "ReplaceRegexMatch":
            raise Unmodelled(f"HTTPRouteFilter path {path['type']}")
        r = path["replaceRegexMatch"]
        return {"regex_rewrite": {"pattern": {"regex": r["pattern"]}, "substitution": r["substitution"]}}
    d = spec["directResponse"]
    _only(d, {"statusCode", "contentType", "body"}, "directResponse")
    out: dict = {"direct_response": {"status": d.get("statusCode", 200)}}
    if "body" in d:
        if d["body"].get("type", "Inline") != "Inline":
            raise Unmodelled("directResponse body from a ConfigMap")
        out["direct_response"]["body"] = {"inline_string": d["body"]["inline"]}
    if "contentType" in d:
        out["response_headers_to_add"] = [{"header": {"key": "content-type", "value": d["contentType"]},
                                           "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
    return out


def eg_routes(route: dict, route_filters: dict[str, dict], services: Services,
              enable: list[str]) -> tuple[list[dict], list[dict]]:
    """An HTTPRoute's Envoy routes (sorted as Envoy Gateway sorts them) and the clusters of its rules.
    `enable`: the per-route wasm filter names that policies attached to this route switch on."""
    ns, name = route["metadata"]["namespace"], route["metadata"]["name"]
    routes, clusters = [], []
    for i, rule in enumerate(route["spec"]["rules"]):
        _only(rule, {"matches", "filters", "backendRefs"}, f"rule {i}")
        action: dict = {}
        for f in rule.get("filters", []):
            if f["type"] == "ExtensionRef":
                ref = f["extensionRef"]
                if (ref["group"], ref["kind"]) != ("gateway.envoyproxy.io", "HTTPRouteFilter"):
                    raise Unmodelled(f"extensionRef {ref}")
                action.update(_eg_route_filter(route_filters[ref["name"]]))
            elif f["type"] != "URLRewrite":
                raise Unmodelled(f"filter {f['type']}")
        backends = rule.get("backendRefs", [])
        cluster = f"httproute/{ns}/{name}/rule/{i}"
        if backends:
            (b,) = backends  # one backend, no weights
            _only(b, {"name", "port"}, "backendRef")
            local = _service_port(services, f"{b['name']}.{ns}{SVC_SUFFIX}", b["port"])
            clusters.append(_static_cluster(cluster, local))
        elif "direct_response" not in action:
            raise Unmodelled(f"rule {i} has neither backends nor a direct response")
        for j, m in enumerate(rule.get("matches", [{}])):
            _only(m, {"path", "headers"}, f"rule {i} match {j}")
            path_match, key = _eg_path_match(m)
            headers = []
            for h in m.get("headers", []):
                kind = h.get("type", "Exact")
                if kind not in ("Exact", "RegularExpression"):
                    raise Unmodelled(f"header match {kind}")
                sm = {"exact": h["value"]} if kind == "Exact" else {"safe_regex": {"regex": h["value"]}}
                headers.append({"name": h["name"], "string_match": sm})
            r_action = dict(action)
            for f in rule.get("filters", []):
                if f["type"] == "URLRewrite":
                    r_action.update(eg_url_rewrite(path_match, f["urlRewrite"]))
            r: dict = {"name": f"httproute/{ns}/{name}/rule/{i}/match/{j}", "match": dict(path_match)}
            if headers:
                r["match"]["headers"] = headers
            if "direct_response" in r_action:
                r["direct_response"] = r_action.pop("direct_response")
                r.update(r_action)
            else:
                headers_to_add = r_action.pop("response_headers_to_add", None)
                r["route"] = {"cluster": cluster, **r_action}
                if headers_to_add:
                    r["response_headers_to_add"] = headers_to_add
            if enable:
                r["typed_per_filter_config"] = {n: {"@type": FILTER_CONFIG_TYPE, "config": {}} for n in enable}
            n_exact = sum(1 for h in headers if "exact" in h["string_match"])
            routes.append((key + (len(headers), n_exact), r))
    # sort.Stable(sort.Reverse(...)): most specific first, equal keys in their written order.
    ordered = [r for _, r in sorted(routes, key=lambda kr: kr[0], reverse=True)]
    return ordered, clusters


def eg_patch_clusters(patch: dict, services: Services) -> list[dict]:
    """The clusters an EnvoyPatchPolicy adds (JSONPatch `add` at the root of a Cluster), re-pointed at the
    local stand-ins of the Services they name."""
    out = []
    for p in patch["spec"]["jsonPatches"]:
        if p["type"] != CLUSTER_TYPE or p["operation"]["op"] != "add" or p["operation"]["path"] != "":
            raise Unmodelled(f"JSON patch {p['type']} {p['operation']['op']} {p['operation']['path']!r}")
        c = copy.deepcopy(p["operation"]["value"])
        for ep in c["load_assignment"]["endpoints"]:
            for lb in ep["lb_endpoints"]:
                sa = lb["endpoint"]["address"]["socket_address"]
                sa.update(address="127.0.0.1", port_value=_service_port(services, sa["address"], sa["port_value"]))
        out.append(c)
    return out


def render_envoy_gateway(policy: dict, gateway: dict, route: dict, route_filters: dict[str, dict],
                         patches: list[dict], wasm: Path, *, listener_port: int, admin_port: int,
                         services: Services) -> dict:
    """What Envoy Gateway gives the Envoy of `gateway` for `route` with `policy` attached to it."""
    spec = policy["spec"]
    _only(spec, {"targetRefs", "wasm"}, "EnvoyExtensionPolicy spec")
    targets = {(t["kind"], t["name"]) for t in spec["targetRefs"]}
    if ("HTTPRoute", route["metadata"]["name"]) not in targets:
        raise Unmodelled("the policy is not attached to this HTTPRoute")
    filters, names = [], []
    for i, w in enumerate(spec["wasm"]):
        _only(w, {"name", "rootID", "code", "failOpen", "config"}, f"wasm {i}")
        name = eg_wasm_filter_name(policy, i)
        plugin = _plugin_config(w.get("name", name.split("/", 1)[1]), w.get("rootID", ""), w.get("config", {}),
                                wasm, fail_open=bool(w.get("failOpen", False)))
        plugin["vm_config"]["vm_id"] = name.split("/", 1)[1]
        filters.append({"name": name, "disabled": True, "typed_config": _wasm_typed_config(plugin)})
        names.append(name)
    (listener_spec,) = gateway["spec"]["listeners"]
    hostnames = route["spec"].get("hostnames") or [listener_spec["hostname"]]
    if listener_spec.get("hostname") and any(h != listener_spec["hostname"] for h in hostnames):
        raise Unmodelled("hostname intersection beyond equality")
    routes, clusters = eg_routes(route, route_filters, services, names)
    hcm = {"@type": HCM_TYPE, "stat_prefix": f"https-{listener_spec['port']}", "use_remote_address": True,
           "normalize_path": True, "merge_slashes": True,
           "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
           "route_config": {"name": f"{gateway['metadata']['namespace']}/{gateway['metadata']['name']}/"
                                    f"{listener_spec['name']}",
                            "ignore_port_in_host_matching": True,
                            "virtual_hosts": [{"name": hostnames[0].replace(".", "_"), "domains": hostnames,
                                               "routes": routes}]},
           "http_filters": filters + [{"name": "envoy.filters.http.router",
                                       "typed_config": {"@type": ROUTER_TYPE, "suppress_envoy_headers": True}}]}
    listener = {"name": "eg", "per_connection_buffer_limit_bytes": EG_LISTENER_BUFFER_LIMIT,
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener_port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}]}
    for patch in patches:
        clusters += eg_patch_clusters(patch, services)
    return _bootstrap(admin_port, listener, clusters)
