// TEST-ONLY OpenID Provider for fhir-tenant-router tests.
//
// Built on oidc-provider (panva) 9.x. Only the client_credentials grant is
// enabled; access tokens are RS256 (or ES256) signed JWTs whose audience is
// IDP_AUDIENCE and whose scope is the tenant GUID the client asked for.
// Keys come from tests/keys/test-only-private-jwks.json (TEST-ONLY keys).
//
// Environment (see README.md):
//   IDP_PORT          default 9000
//   IDP_HOST          default 127.0.0.1
//   IDP_ISSUER        default http://127.0.0.1:$IDP_PORT
//   IDP_AUDIENCE      default http://127.0.0.1:10000
//   IDP_SIGNING_ALG   RS256 (default) | ES256
//   IDP_KEYS          default <repo>/tests/keys/test-only-private-jwks.json
//   IDP_CLIENTS       default <repo>/tests/idp/demo-clients.json
//   IDP_TOKEN_TTL     seconds, default 3600
//
// stdout: exactly one line "IDP READY <issuer>" once listening.
// stderr: only startup/config errors and server errors (never token contents).

import { memoryAdapter } from '../lib/memory-adapter.mjs';
import { readFileSync } from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const repoRoot = path.resolve(here, '..', '..');

function die(msg) {
  process.stderr.write(`test-idp: ${msg}\n`);
  process.exit(2);
}

function positiveInt(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  if (!/^\d+$/.test(raw) || Number(raw) <= 0 || !Number.isSafeInteger(Number(raw))) {
    die(`${name} must be a positive integer, got ${JSON.stringify(raw)}`);
  }
  return Number(raw);
}

function env(name, fallback) {
  const v = process.env[name];
  return v === undefined || v === '' ? fallback : v;
}

function readJson(file, what) {
  try {
    return JSON.parse(readFileSync(file, 'utf8'));
  } catch (err) {
    return die(`cannot read ${what} ${file}: ${err.message}`);
  }
}

// Relative paths in IDP_KEYS / IDP_CLIENTS are resolved against the current
// directory (like any CLI), defaults are resolved against the repository.
const PORT = positiveInt('IDP_PORT', 9000);
const HOST = env('IDP_HOST', '127.0.0.1');
const ISSUER = env('IDP_ISSUER', `http://127.0.0.1:${PORT}`);
const AUDIENCE = env('IDP_AUDIENCE', 'http://127.0.0.1:10000');
const SIGNING_ALG = env('IDP_SIGNING_ALG', 'RS256');
const KEYS_FILE = path.resolve(env('IDP_KEYS', path.join(repoRoot, 'tests', 'keys', 'test-only-private-jwks.json')));
const CLIENTS_FILE = path.resolve(env('IDP_CLIENTS', path.join(here, 'demo-clients.json')));
const TOKEN_TTL = positiveInt('IDP_TOKEN_TTL', 3600);

if (!['RS256', 'ES256'].includes(SIGNING_ALG)) die(`IDP_SIGNING_ALG must be RS256 or ES256, got ${SIGNING_ALG}`);

const jwks = readJson(KEYS_FILE, 'IDP_KEYS');
if (!Array.isArray(jwks?.keys) || !jwks.keys.some((k) => k.alg === SIGNING_ALG && k.d)) {
  die(`${KEYS_FILE} has no private key with alg ${SIGNING_ALG}`);
}

const clientList = readJson(CLIENTS_FILE, 'IDP_CLIENTS');
if (!Array.isArray(clientList) || clientList.length === 0) die(`${CLIENTS_FILE} must be a non-empty JSON array`);
const allScopes = new Set();
const clients = clientList.map((c, i) => {
  for (const f of ['client_id', 'client_secret', 'scope']) {
    if (typeof c?.[f] !== 'string' || c[f] === '') die(`${CLIENTS_FILE}[${i}].${f} must be a non-empty string`);
  }
  c.scope.split(' ').filter(Boolean).forEach((s) => allScopes.add(s));
  return {
    client_id: c.client_id,
    client_secret: c.client_secret,
    scope: c.scope,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    // client_secret_post and client_secret_basic are interchangeable in
    // oidc-provider: a client registered with either may use both.
    token_endpoint_auth_method: 'client_secret_post',
  };
});

// oidc-provider warns on import when not running on Node >= 22 LTS. Node 20
// works for this test IdP; drop just that one line to keep the output quiet.
const origWarn = console.warn;
console.warn = (...args) => {
  if (typeof args[0] === 'string' && args[0].includes('Unsupported runtime')) return;
  origWarn(...args);
};
const { default: Provider, errors } = await import('oidc-provider');
console.warn = origWarn;

// Minimal in-memory adapter (avoids the "development-only adapter" warning).
const MemoryAdapter = memoryAdapter();

const resourceServer = (client) => ({
  // Only the scopes registered for this client can end up in its token.
  scope: client?.scope ?? '',
  audience: AUDIENCE,
  accessTokenTTL: TOKEN_TTL,
  accessTokenFormat: 'jwt',
  jwt: { sign: { alg: SIGNING_ALG } },
});

const provider = new Provider(ISSUER, {
  adapter: MemoryAdapter,
  jwks,
  clients,
  scopes: [...allScopes],
  responseTypes: ['none'],
  clientAuthMethods: ['client_secret_basic', 'client_secret_post'],
  clientDefaults: {
    grant_types: ['client_credentials'],
    response_types: [],
    token_endpoint_auth_method: 'client_secret_post',
    id_token_signed_response_alg: SIGNING_ALG,
  },
  cookies: { keys: ['test-only-cookie-key-not-secret'] },
  ttl: {
    ClientCredentials: TOKEN_TTL,
    AccessToken: TOKEN_TTL,
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
      // No `resource` parameter => the token is for IDP_AUDIENCE anyway.
      defaultResource: async () => AUDIENCE,
      getResourceServerInfo: async (ctx, resourceIndicator, client) => {
        if (resourceIndicator !== AUDIENCE) throw new errors.InvalidTarget();
        // oidc-provider refuses scopes registered for *another* client with
        // invalid_scope, but would silently drop values nobody registered.
        // Refuse those too: a client gets exactly a subset of its own scopes.
        const allowed = new Set((client?.scope ?? '').split(' ').filter(Boolean));
        for (const s of String(ctx?.oidc?.params?.scope ?? '').split(' ').filter(Boolean)) {
          if (!allowed.has(s)) throw new errors.InvalidScope('requested scope is not allowed', s);
        }
        return resourceServer(client);
      },
    },
  },
});

provider.on('server_error', (_ctx, err) => {
  process.stderr.write(`test-idp: server_error: ${err?.message}\n`);
});

const server = http.createServer(provider.callback());

server.on('error', (err) => die(`listen ${HOST}:${PORT}: ${err.message}`));
server.listen(PORT, HOST, () => {
  process.stdout.write(`IDP READY ${ISSUER}\n`);
});

let stopping = false;
function stop() {
  if (stopping) return;
  stopping = true;
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
