// TEST-ONLY upstream authorization server for fhir-tenant-router's upstream-token tests (issue 12).
//
// The FHIR cloud behind a tenant has its own OAuth server; the router gets tokens there (never forwarding the
// client's token). This is that server: oidc-provider (panva) 9.13.3, the same package as tests/idp, configured
// as a second, separate issuer with
//   * client credentials with client_secret_basic or client_secret_post (each client held to its registered
//     method: oidc-provider alone treats the two as interchangeable),
//   * private_key_jwt (RFC 7523 client assertion, SMART Backend Services: RS384 / ES384, aud = token URL,
//     exp at most 300 s ahead, jti used once: oidc-provider checks signature, iss = sub = client_id, aud, exp
//     and jti replay; this file adds the exact-aud and lifetime rules),
//   * the RFC 7523 JWT-bearer authorization grant (urn:ietf:params:oauth:grant-type:jwt-bearer, Google style:
//     a service account signs an assertion, no client authentication), registered with registerGrantType and
//     issuing the token through oidc-provider's own client_credentials handler,
//   * JWT access tokens (typ at+jwt) whose aud is the resource indicator (RFC 8707 `resource`, or an
//     Auth0-style `audience` parameter when no `resource` is sent), per client allowed resources and scopes.
//
// A second listener (the control port, not OAuth) lets tests cause an outage, rotate a client's secret,
// change the token lifetime, and read counters and the token requests received (secrets redacted).
//
//   node server.mjs config.json          (or UPSTREAM_AS_CONFIG=config.json node server.mjs)
//
// stdout: one line "UPSTREAM-AS READY <issuer> port=<p> control=<c>" once both listeners are up.
// stderr: configuration errors (exit 2) and server errors; never a secret, assertion or token.
// See README.md for the configuration file, the control API and what is real here and what is not.

import { memoryAdapter } from '../lib/memory-adapter.mjs';
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import * as http from 'node:http';
import * as querystring from 'node:querystring';

import * as jose from 'jose';

const JWT_BEARER = 'urn:ietf:params:oauth:grant-type:jwt-bearer';
const SECRET_METHODS = new Set(['client_secret_basic', 'client_secret_post']);
const AUTH_METHODS = new Set([...SECRET_METHODS, 'private_key_jwt', 'jwt_bearer']);
const OUTAGE_MODES = new Set(['off', '503', 'drop', 'hang', 'refuse']);
const MAX_BODY = 56 * 1024; // oidc-provider's own limit for a form body
const MAX_RECORDS = 1000;

function die(msg) {
  process.stderr.write(`upstream-as: ${msg}\n`);
  process.exit(2);
}

// ------------------------------------------------------------------------------------------ configuration

const configFile = process.argv[2] ?? process.env.UPSTREAM_AS_CONFIG;
if (!configFile) die('usage: node server.mjs <config.json> (or UPSTREAM_AS_CONFIG)');
let config;
try {
  config = JSON.parse(readFileSync(configFile, 'utf8'));
} catch (err) {
  die(`cannot read the configuration ${configFile}: ${err.message}`);
}

function positiveInt(value, field, fallback) {
  if (value === undefined || value === null) return fallback;
  if (!Number.isSafeInteger(value) || value <= 0) {
    die(`${field} must be a positive integer, got ${JSON.stringify(value)}`);
  }
  return value;
}

function portNumber(value, field) {
  if (value === undefined || value === null) return 0;
  if (!Number.isSafeInteger(value) || value < 0 || value > 65535) {
    die(`${field} must be a port (0 = any), got ${JSON.stringify(value)}`);
  }
  return value;
}

function stringList(value, field) {
  if (!Array.isArray(value) || value.some((v) => typeof v !== 'string' || v === '')) {
    die(`${field} must be an array of non-empty strings`);
  }
  return value;
}

const HOST = config.host ?? '127.0.0.1';
const PORT = portNumber(config.port, 'port');
const CONTROL_PORT = portNumber(config.control_port, 'control_port');
const SIGNING_ALG = config.signing_alg ?? 'RS256';
if (!['RS256', 'ES256'].includes(SIGNING_ALG)) die(`signing_alg must be RS256 or ES256, got ${SIGNING_ALG}`);
const CLIENT_AUTH_ALGS = stringList(config.client_auth_signing_algs ?? ['RS384', 'ES384'], 'client_auth_signing_algs');
const CLIENT_ASSERTION_MAX_LIFETIME = positiveInt(
  config.client_assertion_max_lifetime, 'client_assertion_max_lifetime', 300,
);
let tokenTtl = positiveInt(config.token_ttl, 'token_ttl', 300);

if (!Array.isArray(config.clients) || config.clients.length === 0) die('clients must be a non-empty array');

// client_id -> what oidc-provider is given (its client metadata) and what this file checks itself.
const clients = new Map();
for (const [i, c] of config.clients.entries()) {
  const at = `clients[${i}]`;
  if (typeof c?.client_id !== 'string' || c.client_id === '') die(`${at}.client_id must be a non-empty string`);
  if (clients.has(c.client_id)) die(`${at}.client_id ${c.client_id} appears twice`);
  if (!AUTH_METHODS.has(c.auth_method)) die(`${at}.auth_method must be one of ${[...AUTH_METHODS].join(', ')}`);
  const resources = stringList(c.resources ?? [], `${at}.resources`);
  const scope = typeof c.scope === 'string' ? c.scope : '';
  const defaultResource = c.default_resource === undefined ? resources[0] : c.default_resource;
  if (defaultResource !== null && defaultResource !== undefined && !resources.includes(defaultResource)) {
    die(`${at}.default_resource must be one of ${at}.resources (or null)`);
  }
  const metadata = {
    client_id: c.client_id,
    grant_types: [c.auth_method === 'jwt_bearer' ? JWT_BEARER : 'client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope: scope || undefined,
  };
  const entry = {
    clientId: c.client_id,
    authMethod: c.auth_method,
    resources,
    defaultResource: defaultResource ?? undefined,
    scope,
    tokenTtl: positiveInt(c.token_ttl, `${at}.token_ttl`, undefined),
    secretVersion: 0,
    metadata,
  };
  if (SECRET_METHODS.has(c.auth_method)) {
    if (typeof c.client_secret !== 'string' || !/^[\x20-\x7e]+$/.test(c.client_secret)) {
      die(`${at}.client_secret must be a non-empty string of VSCHAR (%x20-7E)`);
    }
    metadata.token_endpoint_auth_method = c.auth_method;
    metadata.client_secret = c.client_secret;
    entry.secretVersion = 1;
  } else if (c.auth_method === 'private_key_jwt') {
    if (!Array.isArray(c.jwks?.keys) || c.jwks.keys.length === 0) die(`${at}.jwks must be a JWKS with public keys`);
    if (c.jwks.keys.some((k) => k.d !== undefined)) die(`${at}.jwks must hold public keys only`);
    metadata.token_endpoint_auth_method = 'private_key_jwt';
    metadata.jwks = c.jwks;
    if (c.token_endpoint_auth_signing_alg) metadata.token_endpoint_auth_signing_alg = c.token_endpoint_auth_signing_alg;
  } else {
    // jwt_bearer: a service account. No client authentication (the assertion is the credential), so
    // oidc-provider sees a client with token_endpoint_auth_method "none" allowed only the JWT-bearer grant.
    if (typeof c.public_jwk !== 'object' || c.public_jwk === null || c.public_jwk.d !== undefined) {
      die(`${at}.public_jwk must be the service account's public JWK`);
    }
    metadata.token_endpoint_auth_method = 'none';
    entry.assertionAlgs = stringList(c.assertion_algs ?? ['RS256'], `${at}.assertion_algs`);
    entry.assertionMaxLifetime = positiveInt(c.assertion_max_lifetime, `${at}.assertion_max_lifetime`, 3600);
    entry.publicJwk = c.public_jwk;
    try {
      entry.publicKey = await jose.importJWK(c.public_jwk, entry.assertionAlgs[0]);
    } catch (err) {
      die(`${at}.public_jwk: ${err.message}`);
    }
  }
  clients.set(c.client_id, entry);
}
const allScopes = new Set([...clients.values()].flatMap((c) => c.scope.split(' ').filter(Boolean)));

// ------------------------------------------------------------------------- listeners first (port 0 = any)

let app = null; // the provider's request handler, once built
const oauthServer = http.createServer((req, res) => {
  if (app) return app(req, res);
  res.writeHead(503).end();
  return undefined;
});
const controlServer = http.createServer((req, res) => control(req, res));

function listen(server, port) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, HOST, () => {
      server.off('error', reject);
      resolve(server.address().port);
    });
  });
}

let oauthPort;
let controlPort;
try {
  oauthPort = await listen(oauthServer, PORT);
  controlPort = await listen(controlServer, CONTROL_PORT);
} catch (err) {
  die(`listen on ${HOST}: ${err.message}`);
}
const ISSUER = config.issuer ?? `http://${HOST}:${oauthPort}`;
const issuerUrl = URL.parse(ISSUER);
if (!issuerUrl || !['http:', 'https:'].includes(issuerUrl.protocol) || issuerUrl.pathname !== '/' || issuerUrl.search) {
  die(`issuer must be an http(s) origin without a path, got ${ISSUER}`);
}

// ----------------------------------------------------------------------------------------- oidc-provider

// oidc-provider warns on import when not on Node >= 22 LTS; Node 20 works (as for tests/idp). It also warns
// once that the request body was read before it: that is this file's token middleware, on purpose.
const origWarn = console.warn;
console.warn = (...args) => {
  if (typeof args[0] === 'string' && /Unsupported runtime|already parsed request body/.test(args[0])) return;
  origWarn(...args);
};
const { default: Provider, errors } = await import('oidc-provider');
// Internal modules of the pinned oidc-provider 9.13.3 (the package has no "exports" map): the JWT-bearer grant
// reuses the client_credentials handler and its helpers so its tokens are issued exactly the same way.
const { handler: clientCredentialsHandler } = await import('oidc-provider/lib/actions/grants/client_credentials.js');
const grantHelpers = await import('oidc-provider/lib/helpers/grants.js');

const signingKey = await (async () => {
  const { privateKey } = await jose.generateKeyPair(SIGNING_ALG, { extractable: true });
  const jwk = await jose.exportJWK(privateKey);
  const kid = `upstream-as-${SIGNING_ALG.toLowerCase()}-${randomUUID().slice(0, 8)}`;
  return { ...jwk, kid, alg: SIGNING_ALG, use: 'sig' };
})();

// In-memory adapter. Clients come from `clients` (so a secret can be rotated while running: oidc-provider
// caches a dynamic client by the hash of its metadata); everything else (replay detection of client assertion
// jti values, opaque tokens) lives in the adapter's store.
const MemoryAdapter = memoryAdapter((id) => {
  const c = clients.get(id);
  return c ? structuredClone(c.metadata) : undefined;
});

const entryOf = (client) => clients.get(client?.clientId);
const ttlOf = (client) => entryOf(client)?.tokenTtl ?? tokenTtl;
// The token endpoint URL: the issuer's origin + /token (see provider.proxy below), as in discovery.
const tokenUrlOf = (ctx) => ctx.oidc.urlFor('token');
const nowSeconds = () => Math.floor(Date.now() / 1000);

const provider = new Provider(ISSUER, {
  adapter: MemoryAdapter,
  jwks: { keys: [signingKey] },
  scopes: [...allScopes],
  responseTypes: ['none'],
  clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt', 'none'],
  enabledJWA: { clientAuthSigningAlgValues: CLIENT_AUTH_ALGS },
  clientDefaults: {
    grant_types: ['client_credentials'],
    response_types: [],
    token_endpoint_auth_method: 'client_secret_basic',
    id_token_signed_response_alg: SIGNING_ALG,
  },
  clockTolerance: 5,
  cookies: { keys: ['test-only-cookie-key-not-secret'] },
  ttl: { ClientCredentials: (_ctx, _token, client) => ttlOf(client) },
  // SMART Backend Services on top of oidc-provider's own checks (signature, iss = sub = client_id, aud among
  // issuer/token URL, exp present and not passed, jti present and unused): aud must be exactly the token URL,
  // and exp at most CLIENT_ASSERTION_MAX_LIFETIME seconds ahead.
  async assertJwtClientAuthClaimsAndHeader(ctx, claims) {
    const tokenUrl = tokenUrlOf(ctx);
    if (claims.aud !== tokenUrl) {
      throw new errors.InvalidClientAuth(`aud must be the token endpoint URL ${tokenUrl} (a single string)`);
    }
    if (claims.exp - nowSeconds() > CLIENT_ASSERTION_MAX_LIFETIME) {
      throw new errors.InvalidClientAuth(`exp must be at most ${CLIENT_ASSERTION_MAX_LIFETIME} s ahead`);
    }
  },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    dPoP: { enabled: false },
    pushedAuthorizationRequests: { enabled: false },
    rpInitiatedLogout: { enabled: false },
    userinfo: { enabled: false },
    introspection: { enabled: false },
    revocation: { enabled: false },
    registration: { enabled: false },
    resourceIndicators: {
      enabled: true,
      // No `resource`: an Auth0-style `audience` parameter names it, else the client's default (if any; with
      // none the token is opaque, which no guard accepts).
      defaultResource: async (ctx, client) => {
        const audience = ctx.state.form?.audience;
        if (audience !== undefined) {
          if (typeof audience !== 'string' || audience === '') {
            throw new errors.InvalidRequest('audience must be one non-empty value');
          }
          return audience;
        }
        return entryOf(client)?.defaultResource;
      },
      getResourceServerInfo: async (ctx, resource, client) => {
        const entry = entryOf(client);
        if (!entry?.resources.includes(resource)) {
          throw new errors.InvalidTarget(`resource ${resource} is not allowed for client ${client?.clientId}`);
        }
        // oidc-provider refuses another client's registered scope but silently drops unknown values:
        // refuse those too, a client gets a subset of its own scopes or an error.
        const allowed = new Set(entry.scope.split(' ').filter(Boolean));
        for (const s of String(ctx.oidc.params.scope ?? '').split(' ').filter(Boolean)) {
          if (!allowed.has(s)) throw new errors.InvalidScope('requested scope is not allowed', s);
        }
        return {
          scope: entry.scope,
          audience: resource,
          accessTokenTTL: ttlOf(client),
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: SIGNING_ALG } },
        };
      },
    },
  },
});

// ------------------------------------------------------------------------ the RFC 7523 JWT-bearer grant

const boundHelpers = Object.fromEntries(
  Object.entries(grantHelpers).map(([name, helper]) => [name, helper.bind(undefined, provider)]),
);

async function jwtBearerGrant(ctx) {
  const { client, params } = ctx.oidc;
  const entry = entryOf(client);
  if (entry?.authMethod !== 'jwt_bearer') throw new errors.UnauthorizedClient('not a service account');
  if (typeof params.assertion !== 'string' || params.assertion === '') {
    throw new errors.InvalidRequest("missing required parameter 'assertion'");
  }
  const tokenUrl = tokenUrlOf(ctx);
  let claims;
  let header;
  try {
    ({ payload: claims, protectedHeader: header } = await jose.jwtVerify(params.assertion, entry.publicKey, {
      algorithms: entry.assertionAlgs,
      issuer: entry.clientId,
      audience: tokenUrl,
      requiredClaims: ['iss', 'aud', 'exp', 'iat'],
      clockTolerance: 5,
    }));
  } catch (err) {
    throw new errors.InvalidGrant(`assertion: ${err.code ?? 'ERR'}: ${err.message}`);
  }
  if (claims.aud !== tokenUrl) {
    throw new errors.InvalidGrant(`assertion: aud must be exactly ${tokenUrl} (a single string)`);
  }
  if (claims.sub !== undefined && claims.sub !== entry.clientId) {
    throw new errors.InvalidGrant('assertion: sub must be the service account (or absent)');
  }
  if (claims.exp - nowSeconds() > entry.assertionMaxLifetime) {
    throw new errors.InvalidGrant(`assertion: exp must be at most ${entry.assertionMaxLifetime} s ahead`);
  }
  if (header.kid !== undefined && header.kid !== entry.publicJwk.kid) {
    throw new errors.InvalidGrant(`assertion: unknown kid ${header.kid}`);
  }
  // Google puts the scope in the assertion; RFC 7523 allows the form parameter. The form wins.
  if (params.scope === undefined && typeof claims.scope === 'string') params.scope = claims.scope;
  await clientCredentialsHandler(provider, boundHelpers, ctx);
}

provider.registerGrantType(JWT_BEARER, jwtBearerGrant, ['assertion', 'scope', 'resource'], ['resource']);

// ---------------------------------------------------------------------- recording and outage (token only)

const state = {
  outage: 'off',
  hung: new Set(), // responses held open in "hang" mode
  records: [],
  seq: 0,
  counters: { total: 0, issued: 0, rejected: 0, outage: {}, clients: {} },
};

function decodeJwt(value) {
  if (typeof value !== 'string') return null;
  try {
    return { header: jose.decodeProtectedHeader(value), claims: jose.decodeJwt(value) };
  } catch {
    return { undecodable: true };
  }
}

function basicCredentials(authorization) {
  if (typeof authorization !== 'string') return null;
  const m = /^basic\s+(\S+)$/i.exec(authorization);
  if (!m) return { malformed: true };
  const text = Buffer.from(m[1], 'base64').toString('utf8');
  const i = text.indexOf(':');
  if (i < 0) return { malformed: true };
  const dec = (s) => { try { return decodeURIComponent(s.replace(/\+/g, '%20')); } catch { return s; } };
  return { clientId: dec(text.slice(0, i)), secret: dec(text.slice(i + 1)) };
}

function one(v) {
  return Array.isArray(v) ? v[0] : v;
}

// What a test may see of a token request: every form parameter, secrets and signatures replaced.
function describeRequest(form, headers) {
  const params = {};
  for (const [k, v] of Object.entries(form)) {
    if (k === 'client_secret') params[k] = '[redacted]';
    else if (k === 'client_assertion' || k === 'assertion') params[k] = '[jwt]';
    else params[k] = v;
  }
  const basic = basicCredentials(headers.authorization);
  const clientAssertion = form.client_assertion !== undefined ? decodeJwt(one(form.client_assertion)) : null;
  const assertion = form.assertion !== undefined ? decodeJwt(one(form.assertion)) : null;
  let authMethod = 'none';
  let clientId = one(form.client_id);
  if (basic) {
    authMethod = 'client_secret_basic';
    clientId = basic.clientId ?? clientId;
  } else if (form.client_secret !== undefined) {
    authMethod = 'client_secret_post';
  } else if (clientAssertion) {
    authMethod = 'private_key_jwt';
    clientId = clientId ?? clientAssertion.claims?.sub;
  } else if (one(form.grant_type) === JWT_BEARER) {
    authMethod = 'jwt_bearer';
    clientId = clientId ?? assertion?.claims?.iss;
  }
  return {
    seq: ++state.seq,
    time: Date.now() / 1000,
    host: headers.host,
    client_id: typeof clientId === 'string' ? clientId : null,
    auth_method: authMethod,
    grant_type: one(form.grant_type) ?? null,
    params,
    basic_auth: basic ? (basic.malformed ? 'malformed' : 'present') : null,
    client_assertion: clientAssertion,
    assertion,
  };
}

function count(record) {
  const c = state.counters;
  c.total += 1;
  const key = record.client_id ?? '(none)';
  const pc = (c.clients[key] ??= { issued: 0, rejected: 0, outage: 0, errors: {} });
  if (record.outcome === 'outage') {
    c.outage[record.outage] = (c.outage[record.outage] ?? 0) + 1;
    pc.outage += 1;
  } else if (record.outcome === 'issued') {
    c.issued += 1;
    pc.issued += 1;
  } else {
    c.rejected += 1;
    pc.rejected += 1;
    pc.errors[record.error] = (pc.errors[record.error] ?? 0) + 1;
  }
}

function keep(record) {
  state.records.push(record);
  if (state.records.length > MAX_RECORDS) state.records.shift();
  count(record);
}

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY) throw new Error('request entity too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

function refuseClient(ctx, description) {
  ctx.status = 401;
  ctx.body = { error: 'invalid_client', error_description: description };
  if (ctx.headers.authorization) ctx.set('WWW-Authenticate', `Basic realm="${ISSUER}", error="invalid_client"`);
}

provider.on('grant.error', (ctx, err) => {
  ctx.state.errorDetail = err?.error_detail ?? err?.error_description ?? err?.message;
});
provider.on('server_error', (ctx, err) => {
  process.stderr.write(`upstream-as: server_error: ${err?.message}\n`);
  if (ctx?.state) ctx.state.errorDetail = `server_error: ${err?.message}`;
});

const TOKEN_PATH = provider.pathFor('token');

// Like an AS with a configured public URL (not oidc-provider's default of deriving its URLs from each request's
// Host): the token URL, the accepted assertion aud and discovery are the issuer's whatever Host a client sends
// (the Host received is recorded).
provider.proxy = true;
provider.use(async (ctx, next) => {
  ctx.req.headers['x-forwarded-host'] = issuerUrl.host;
  ctx.req.headers['x-forwarded-proto'] = issuerUrl.protocol.slice(0, -1);
  delete ctx.req.headers.forwarded;
  return next();
});

provider.use(async (ctx, next) => {
  if (ctx.path !== TOKEN_PATH || ctx.method !== 'POST') return next();
  let raw;
  try {
    raw = await readBody(ctx.req);
  } catch (err) {
    ctx.status = 400;
    ctx.body = { error: 'invalid_request', error_description: err.message };
    return undefined;
  }
  const form = ctx.is('application/x-www-form-urlencoded') ? querystring.parse(raw) : {};
  const record = describeRequest(form, ctx.headers);
  ctx.state.form = form;

  const mode = state.outage;
  if (mode !== 'off') {
    keep({ ...record, outcome: 'outage', outage: mode });
    if (mode === '503') {
      ctx.status = 503;
      ctx.body = { error: 'temporarily_unavailable', error_description: 'the authorization server is down (test)' };
    } else if (mode === 'drop') {
      ctx.respond = false;
      ctx.req.socket.destroy();
    } else { // hang: held open until the outage ends, then dropped
      ctx.respond = false;
      state.hung.add(ctx.res);
      ctx.res.on('close', () => state.hung.delete(ctx.res));
    }
    return undefined;
  }

  // A client registered for client_secret_basic must use Basic, one for client_secret_post the form (most
  // authorization servers hold a client to its method; oidc-provider accepts either).
  const entry = clients.get(record.client_id);
  if (entry && SECRET_METHODS.has(entry.authMethod) && SECRET_METHODS.has(record.auth_method)
      && entry.authMethod !== record.auth_method) {
    refuseClient(ctx, `client ${entry.clientId} is registered for ${entry.authMethod}, not ${record.auth_method}`);
    ctx.state.errorDetail = ctx.body.error_description;
  } else {
    // The JWT-bearer grant carries no client authentication: name the service account (the assertion's iss,
    // verified by the grant handler) so oidc-provider finds the client.
    if (record.auth_method === 'jwt_bearer' && form.client_id === undefined && record.client_id) {
      form.client_id = record.client_id;
    }
    ctx.req.body = querystring.stringify(form);
    await next();
  }

  record.status = ctx.status;
  const body = ctx.body && typeof ctx.body === 'object' ? ctx.body : {};
  if (ctx.status === 200 && typeof body.access_token === 'string') {
    record.outcome = 'issued';
    const decoded = decodeJwt(body.access_token);
    record.token = {
      format: decoded?.claims ? 'jwt' : 'opaque',
      expires_in: body.expires_in,
      scope: body.scope ?? null,
      ...(decoded?.claims ? {
        jti: decoded.claims.jti, aud: decoded.claims.aud, client_id: decoded.claims.client_id,
        sub: decoded.claims.sub, iat: decoded.claims.iat, exp: decoded.claims.exp, kid: decoded.header.kid,
        alg: decoded.header.alg, typ: decoded.header.typ,
      } : {}),
    };
  } else {
    record.outcome = 'rejected';
    record.error = body.error ?? `http_${ctx.status}`;
    record.error_description = body.error_description ?? null;
    record.error_detail = ctx.state.errorDetail ?? null;
  }
  keep(record);
  return undefined;
});

app = provider.callback();

// ------------------------------------------------------------------------------------------ control port

async function setOutage(mode) {
  const before = state.outage;
  state.outage = mode;
  if (mode !== 'hang') {
    for (const res of state.hung) res.socket?.destroy();
    state.hung.clear();
  }
  if (mode === 'refuse' && before !== 'refuse') {
    await new Promise((resolve) => { oauthServer.close(() => resolve()); oauthServer.closeAllConnections(); });
  } else if (mode !== 'refuse' && before === 'refuse') {
    await listen(oauthServer, oauthPort); // the same port again; fails if something took it meanwhile
  }
}

function clientView(c) {
  return {
    client_id: c.clientId, auth_method: c.authMethod, resources: c.resources,
    default_resource: c.defaultResource ?? null, scope: c.scope, token_ttl: c.tokenTtl ?? null,
    secret_version: c.secretVersion,
  };
}

function stateView() {
  return {
    issuer: ISSUER,
    token_url: `${ISSUER}${TOKEN_PATH}`,
    jwks_url: `${ISSUER}${provider.pathFor('jwks')}`,
    port: oauthPort,
    control_port: controlPort,
    outage: state.outage,
    token_ttl: tokenTtl,
    signing_kid: signingKey.kid,
    clients: [...clients.values()].map(clientView),
  };
}

function reply(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

async function control(req, res) {
  try {
    const url = new URL(req.url, 'http://control');
    const raw = req.method === 'POST' ? await readBody(req) : '';
    const body = raw ? JSON.parse(raw) : {};
    const route = `${req.method} ${url.pathname}`;
    let m;
    if (route === 'GET /state') return reply(res, 200, stateView());
    if (route === 'GET /counters') return reply(res, 200, state.counters);
    if (route === 'GET /requests') return reply(res, 200, state.records);
    if (route === 'POST /reset') {
      state.records = [];
      state.counters = { total: 0, issued: 0, rejected: 0, outage: {}, clients: {} };
      return reply(res, 200, { ok: true });
    }
    if (route === 'POST /outage') {
      if (!OUTAGE_MODES.has(body.mode)) {
        return reply(res, 400, { error: `mode must be one of ${[...OUTAGE_MODES].join(', ')}` });
      }
      await setOutage(body.mode);
      return reply(res, 200, { outage: state.outage });
    }
    if (route === 'POST /ttl') {
      if (!Number.isSafeInteger(body.seconds) || body.seconds <= 0) {
        return reply(res, 400, { error: 'seconds must be a positive integer' });
      }
      const c = body.client_id === undefined ? null : clients.get(body.client_id);
      if (body.client_id !== undefined && !c) return reply(res, 404, { error: `no client ${body.client_id}` });
      if (c) c.tokenTtl = body.seconds; else tokenTtl = body.seconds;
      return reply(res, 200, { token_ttl: tokenTtl, client: c ? clientView(c) : null });
    }
    if (req.method === 'POST' && (m = /^\/clients\/([^/]+)\/secret$/.exec(url.pathname))) {
      const c = clients.get(decodeURIComponent(m[1]));
      if (!c) return reply(res, 404, { error: `no client ${decodeURIComponent(m[1])}` });
      if (!SECRET_METHODS.has(c.authMethod)) return reply(res, 400, { error: `${c.clientId} has no secret` });
      if (typeof body.secret !== 'string' || !/^[\x20-\x7e]+$/.test(body.secret)) {
        return reply(res, 400, { error: 'secret must be a non-empty string of VSCHAR (%x20-7E), as RFC 6749 asks' });
      }
      c.metadata = { ...c.metadata, client_secret: body.secret };
      c.secretVersion += 1;
      return reply(res, 200, clientView(c));
    }
    return reply(res, 404, { error: `no control route ${route}` });
  } catch (err) {
    return reply(res, 500, { error: err.message });
  }
}

process.stdout.write(`UPSTREAM-AS READY ${ISSUER} port=${oauthPort} control=${controlPort}\n`);

let stopping = false;
function stop() {
  if (stopping) return;
  stopping = true;
  for (const res of state.hung) res.socket?.destroy();
  oauthServer.close();
  oauthServer.closeAllConnections();
  controlServer.close();
  controlServer.closeAllConnections();
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
