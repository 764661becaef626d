// A minimal in-memory oidc-provider adapter for the test servers (tests/idp, tests/upstream-as): it avoids
// oidc-provider's "development-only adapter" warning. With JWT access tokens and client credentials little is
// stored: client-assertion `jti`s (replay detection) and the odd opaque artefact, each until it expires.
// `findClient(id)`, if given, answers for the Client model (clients defined, and changed, by the server).
export function memoryAdapter(findClient) {
  const store = new Map();
  return class MemoryAdapter {
    constructor(name) { this.name = name; }

    key(id) { return `${this.name}:${id}`; }

    async upsert(id, payload, expiresIn) {
      store.set(this.key(id), { payload, exp: expiresIn ? Date.now() + expiresIn * 1000 : undefined });
    }

    async find(id) {
      if (findClient && this.name === 'Client') return findClient(id);
      const e = store.get(this.key(id));
      if (!e) return undefined;
      if (e.exp !== undefined && e.exp < Date.now()) { store.delete(this.key(id)); return undefined; }
      return e.payload;
    }

    async findByUserCode() { return undefined; }

    async findByUid() { return undefined; }

    async consume(id) { const e = store.get(this.key(id)); if (e) e.payload.consumed = Math.floor(Date.now() / 1000); }

    async destroy(id) { store.delete(this.key(id)); }

    async revokeByGrantId() {}
  };
}
