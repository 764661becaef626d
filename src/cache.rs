//! The verified-token cache: a token that verified once is not verified again until it expires.
//!
//! Keyed by a 128-bit SipHash of the token under a secret random key per VM: memory per entry is bounded
//! whatever the token's size, and since SipHash is a keyed pseudo-random function an attacker who does not
//! know the key cannot craft a token that collides with a cached one (and 128 bits make accidental
//! collisions negligible). It is several times cheaper than SHA-256 inside V8. An entry holds only what the per-request rules still need (the
//! tenant claim, `exp`, the key that verified it, and the identity claims), never the token itself. Entries
//! are served until the token's `exp`, never later; entries whose key has left the JWKS are dropped when the
//! new key set is installed; at capacity the oldest insertion is evicted.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use serde_json::Value;
use siphasher::sip128::{Hasher128, SipHasher13};

use crate::verify::Claims;

/// The cache key: a keyed 128-bit hash of the compact token.
pub type TokenDigest = u128;

/// The secret key of a VM's cache hash.
#[derive(Clone, Copy, Debug, Default)]
pub struct HashKey(pub u64, pub u64);

impl HashKey {
    /// A key from the platform's randomness (std's `RandomState`: the WASI random source inside Envoy).
    pub fn random() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let state = std::collections::hash_map::RandomState::new();
        let word = |i: u8| {
            let mut h = state.build_hasher();
            h.write_u8(i);
            h.finish()
        };
        Self(word(0), word(1))
    }
}

/// Digest of a token under `key`, for [`TokenCache`] lookups.
pub fn digest(key: HashKey, token: &str) -> TokenDigest {
    use std::hash::Hasher;
    let mut h = SipHasher13::new_with_keys(key.0, key.1);
    h.write(token.as_bytes());
    h.finish128().as_u128()
}

/// Who the token says the caller is, for the audit log: the claims that identify a client and a token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub client_id: Option<String>,
    pub sub: Option<String>,
    pub jti: Option<String>,
}

/// What a cache hit gives back.
#[derive(Clone, Debug, PartialEq)]
pub struct Verified {
    /// `exp` of the token, seconds since the epoch.
    pub exp: i64,
    /// Fingerprint of the key that verified the signature.
    pub key: u64,
    /// Index of the provider (issuer) that verified it.
    pub provider: usize,
    /// The configured tenant claim's value, as signed.
    pub tenant_claim: Option<Value>,
    /// Shared, so that a hit hands it on without copying.
    pub identity: Rc<Identity>,
}

/// Identity claims longer than this are cut (they go into log lines).
const MAX_IDENTITY_CHARS: usize = 128;

impl Verified {
    /// Keeps what the per-request rules need from freshly verified claims.
    pub fn from_claims(claims: &Claims, tenant_claim: &str, provider: usize) -> Self {
        let text = |name: &str| claims.str(name).map(|v| v.chars().take(MAX_IDENTITY_CHARS).collect());
        let client_id = text("client_id").or_else(|| text("azp")).or_else(|| text("appid"));
        let identity = Identity { client_id, sub: text("sub"), jti: text("jti") };
        Self {
            exp: claims.exp,
            key: claims.key,
            provider,
            tenant_claim: claims.payload.get(tenant_claim).cloned(),
            identity: Rc::new(identity),
        }
    }
}

/// A bounded cache of verified tokens for one VM.
#[derive(Debug, Default)]
pub struct TokenCache {
    capacity: usize,
    key: HashKey,
    entries: HashMap<TokenDigest, Verified>,
    /// Insertion order, for eviction; may hold digests already removed (skipped when popped).
    order: VecDeque<TokenDigest>,
}

impl TokenCache {
    /// A cache of at most `capacity` tokens (0 disables it), with a random hash key.
    pub fn new(capacity: usize) -> Self {
        Self::with_key(capacity, HashKey::random())
    }

    /// A cache with a given hash key (tests).
    pub fn with_key(capacity: usize, key: HashKey) -> Self {
        Self { capacity, key, entries: HashMap::new(), order: VecDeque::new() }
    }

    /// The key of `token` in this cache.
    pub fn digest(&self, token: &str) -> TokenDigest {
        digest(self.key, token)
    }

    /// Whether the cache was configured off (capacity 0).
    pub fn is_disabled(&self) -> bool {
        self.capacity == 0
    }

    /// The number of cached tokens.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry for `digest` if it has not expired at `now`; an expired one is removed.
    pub fn get(&mut self, digest: &TokenDigest, now: i64) -> Option<&Verified> {
        let expired = now >= self.entries.get(digest)?.exp;
        if expired {
            self.entries.remove(digest);
            return None;
        }
        self.entries.get(digest)
    }

    /// Caches a freshly verified token (unless it is already expired at `now`).
    pub fn insert(&mut self, digest: TokenDigest, verified: Verified, now: i64) {
        if self.capacity == 0 || now >= verified.exp {
            return;
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&digest) {
            self.evict_one();
        }
        if self.entries.insert(digest, verified).is_none() {
            self.order.push_back(digest);
        }
        // Digests of entries removed by expiry or key rotation linger in `order`; keep it bounded.
        if self.order.len() > self.capacity.saturating_mul(2) {
            let entries = &self.entries;
            self.order.retain(|d| entries.contains_key(d));
        }
    }

    /// Makes room for one entry in O(1) amortised: the oldest insertion goes (expired entries are also
    /// swept by [`TokenCache::purge_expired`] on a timer, not here: a full scan per insert would make every
    /// miss of a full cache cost O(capacity)).
    fn evict_one(&mut self) {
        while let Some(oldest) = self.order.pop_front() {
            if self.entries.remove(&oldest).is_some() {
                return;
            }
        }
    }

    /// Drops every expired entry; O(capacity), meant for a timer. Returns how many went.
    pub fn purge_expired(&mut self, now: i64) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, v| now < v.exp);
        let entries = &self.entries;
        self.order.retain(|d| entries.contains_key(d));
        before - self.entries.len()
    }

    /// Drops every entry verified by a key not in `keys` (after a JWKS refresh). Returns how many.
    pub fn retain_keys(&mut self, keys: &[u64]) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, v| keys.contains(&v.key));
        before - self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_767_225_600;

    fn entry(exp: i64, key: u64) -> Verified {
        Verified { exp, key, provider: 0, tenant_claim: Some(json!("t")), identity: Rc::default() }
    }

    fn digest(token: &str) -> TokenDigest {
        super::digest(HashKey(1, 2), token)
    }

    #[test]
    fn the_hash_depends_on_the_secret_key() {
        assert_ne!(super::digest(HashKey(1, 2), "t"), super::digest(HashKey(1, 3), "t"));
        assert_ne!(TokenCache::new(1).digest("t"), TokenCache::new(1).digest("t"), "random keys per cache");
    }

    #[test]
    fn a_cached_token_is_a_hit_until_its_exp() {
        let mut c = TokenCache::new(10);
        let d = digest("token");
        c.insert(d, entry(NOW + 10, 1), NOW);
        assert_eq!(c.get(&d, NOW + 9).map(|v| v.exp), Some(NOW + 10));
        assert!(c.get(&d, NOW + 10).is_none(), "served at exp");
        assert!(c.is_empty(), "expired entry removed");
    }

    #[test]
    fn an_expired_token_is_never_cached() {
        let mut c = TokenCache::new(10);
        c.insert(digest("old"), entry(NOW, 1), NOW);
        assert!(c.is_empty());
    }

    #[test]
    fn different_tokens_do_not_share_an_entry() {
        let mut c = TokenCache::new(10);
        c.insert(digest("a"), entry(NOW + 10, 1), NOW);
        assert!(c.get(&digest("b"), NOW).is_none());
    }

    #[test]
    fn capacity_zero_disables_the_cache() {
        let mut c = TokenCache::new(0);
        c.insert(digest("a"), entry(NOW + 10, 1), NOW);
        assert!(c.get(&digest("a"), NOW).is_none());
    }

    #[test]
    fn at_capacity_the_oldest_entry_is_evicted() {
        let mut c = TokenCache::new(3);
        for i in 0..3 {
            c.insert(digest(&i.to_string()), entry(NOW + 100, 1), NOW);
        }
        c.insert(digest("3"), entry(NOW + 100, 1), NOW);
        assert_eq!(c.len(), 3);
        assert!(c.get(&digest("0"), NOW).is_none());
        for i in 1..4 {
            assert!(c.get(&digest(&i.to_string()), NOW).is_some(), "{i}");
        }
    }

    #[test]
    fn expired_entries_are_purged_on_the_timer() {
        let mut c = TokenCache::new(3);
        c.insert(digest("live"), entry(NOW + 100, 1), NOW);
        c.insert(digest("short"), entry(NOW + 5, 1), NOW);
        assert_eq!(c.purge_expired(NOW + 10), 1);
        assert_eq!(c.len(), 1);
        assert_eq!(c.order.len(), 1);
        c.insert(digest("a"), entry(NOW + 100, 1), NOW + 10);
        c.insert(digest("b"), entry(NOW + 100, 1), NOW + 10);
        assert!(c.get(&digest("live"), NOW + 10).is_some(), "room was made by the purge, not by evicting");
    }

    #[test]
    fn entries_of_a_removed_key_are_dropped() {
        let mut c = TokenCache::new(10);
        c.insert(digest("old-key"), entry(NOW + 100, 1), NOW);
        c.insert(digest("new-key"), entry(NOW + 100, 2), NOW);
        assert_eq!(c.retain_keys(&[2, 3]), 1);
        assert!(c.get(&digest("old-key"), NOW).is_none());
        assert!(c.get(&digest("new-key"), NOW).is_some());
    }

    #[test]
    fn memory_stays_bounded_under_churn() {
        let mut c = TokenCache::new(100);
        for i in 0..10_000i64 {
            c.insert(digest(&i.to_string()), entry(NOW + 1 + (i % 7), 1), NOW);
            if i % 50 == 0 {
                c.retain_keys(&[1]);
            }
        }
        assert!(c.len() <= 100);
        assert!(c.order.len() <= 200);
    }
}
