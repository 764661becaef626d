//! The verified-token cache: a token that verified once is not verified again until it expires.
//!
//! Keyed by the token itself, as Envoy's `jwt_authn` cache is: a hit is a slot whose stored token equals the
//! presented one byte for byte, so no hash collision, accidental or crafted, can ever serve one token's
//! verdict for another. The slot is found through a 128-bit SipHash of the token under a secret random key
//! per VM (a keyed pseudo-random function: an attacker who does not know the key cannot aim tokens at one
//! index bucket), several times cheaper than SHA-256 inside V8; the comparison that follows is one `memcmp`
//! of the token (about 1 KB). An entry holds the token and what the per-request rules still need (the
//! tenant claim, `exp`, the key that verified it, and the identity claims, in one shared allocation; the
//! tenant claim is capped like the other claims, see [`crate::identity`]). So an entry takes at most the
//! provider's `max_token_bytes` plus about 4.5 KB, and the cache at most `capacity` times that. Entries are
//! served until the token's `exp`, never later; entries whose key has left the JWKS are dropped when the new
//! key set is installed.
//!
//! Memory is fixed by the capacity: the entries live in a slab of at most `capacity` slots, reused in ring
//! order (at capacity, the oldest insertion goes), and the index from digest to slot is sized once for
//! twice the capacity (up to 65,536 entries; a larger cache's index grows with use), so churn never grows
//! it (a hash table that fills with tombstones is rehashed in place, not enlarged, while it is at most half
//! full).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use siphasher::sip128::{Hasher128, SipHasher13};

use crate::config::ClaimNames;
use crate::identity::Identity;
use crate::scopes::Scopes;
use crate::verify::Claims;

/// A keyed 128-bit hash of the compact token: where its entry is looked for.
pub type TokenDigest = u128;

/// What a lookup or an insert names: the token, with its digest (computed once per request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheKey<'t> {
    digest: TokenDigest,
    token: &'t str,
}

/// The secret key of a VM's cache hash.
#[derive(Clone, Copy, Debug, Default)]
pub struct HashKey(pub u64, pub u64);

impl HashKey {
    /// A key from the platform's randomness (std's `RandomState`: the WASI random source inside Envoy).
    pub fn random() -> Self {
        use std::hash::BuildHasher;
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
    let mut h = SipHasher13::new_with_keys(key.0, key.1);
    h.write(token.as_bytes());
    h.finish128().as_u128()
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
    /// The tenant claim, the identity claims and what the token's SMART scopes grant.
    pub identity: Identity,
}

impl Verified {
    /// Keeps what the per-request rules need from freshly verified claims, read as the provider's claim
    /// mapping says. A provider with a fixed tenant keeps no tenant claim (the token never names one).
    pub fn from_claims(claims: &Claims, names: &ClaimNames, fixed_tenant: bool, provider: usize) -> Self {
        // The first client claim the token carries names the client. RFC 9068 §2.2: `client_id` is a
        // string; a claim of another kind (a list, a number) names no client, and the next claim does not
        // stand in for it, so a tenant bound to clients refuses it.
        let client_id =
            names.client.iter().find_map(|name| claims.payload.get(name.as_str())).and_then(serde_json::Value::as_str);
        let scopes = Scopes::from_claim_mapped(claims.payload.get(names.scopes.as_str()), &names.scope_map);
        let tenant_claim = if fixed_tenant { None } else { claims.payload.get(names.tenant.as_str()) };
        let identity = Identity::new(tenant_claim, client_id, claims.str("sub"), claims.str("jti"))
            .with_scopes(scopes)
            .with_provider(provider);
        Self { exp: claims.exp, key: claims.key, provider, identity }
    }
}

/// Up to this capacity the index is allocated at the first insert for twice the capacity.
const MAX_UPFRONT_ENTRIES: usize = 1 << 16;

/// Hashes a digest by taking 64 of its bits: a digest is already the output of a keyed PRF.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

struct Slot {
    digest: TokenDigest,
    /// The token itself: a hit must be this very token, not merely one with the same digest.
    token: Box<str>,
    verified: Verified,
}

/// A bounded cache of verified tokens for one VM.
#[derive(Default)]
pub struct TokenCache {
    capacity: usize,
    key: HashKey,
    /// 64 bits of the digest → slot; the slot holds the whole digest, compared on every lookup.
    index: HashMap<u64, u32, BuildHasherDefault<DigestHasher>>,
    slots: Vec<Option<Slot>>,
    /// Emptied slots (expired, key removed), used before the ring evicts anything.
    free: Vec<u32>,
    /// The ring position of the next eviction once the slab is full.
    next: usize,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache").field("capacity", &self.capacity).field("len", &self.len()).finish()
    }
}

fn short(digest: &TokenDigest) -> u64 {
    *digest as u64
}

impl TokenCache {
    /// A cache of at most `capacity` tokens (0 disables it), with a random hash key.
    pub fn new(capacity: usize) -> Self {
        Self::with_key(capacity, HashKey::random())
    }

    /// A cache with a given hash key (tests).
    pub fn with_key(capacity: usize, key: HashKey) -> Self {
        Self { capacity, key, ..Default::default() }
    }

    /// The key of `token` in this cache.
    pub fn key<'t>(&self, token: &'t str) -> CacheKey<'t> {
        CacheKey { digest: digest(self.key, token), token }
    }

    /// Whether the cache was configured off (capacity 0).
    pub fn is_disabled(&self) -> bool {
        self.capacity == 0
    }

    /// The number of cached tokens.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The slot holding this very token (same digest, then the same bytes).
    fn slot_of(&self, key: &CacheKey<'_>) -> Option<usize> {
        let i = *self.index.get(&short(&key.digest))? as usize;
        match self.slots.get(i) {
            Some(Some(slot)) if slot.digest == key.digest && *slot.token == *key.token => Some(i),
            _ => None,
        }
    }

    /// Empties slot `i` (and its index entry, if the index still points there); whether it held an entry.
    fn take(&mut self, i: usize) -> bool {
        let Some(slot) = self.slots.get_mut(i).and_then(Option::take) else {
            return false;
        };
        if self.index.get(&short(&slot.digest)).is_some_and(|&j| j as usize == i) {
            self.index.remove(&short(&slot.digest));
        }
        true
    }

    /// Empties slot `i` for reuse.
    fn clear(&mut self, i: usize) {
        if self.take(i) {
            self.free.push(u32::try_from(i).unwrap_or(u32::MAX));
        }
    }

    /// The entry for the token of `key` if it has not expired at `now`; an expired one is removed.
    pub fn get(&mut self, key: &CacheKey<'_>, now: i64) -> Option<&Verified> {
        let i = self.slot_of(key)?;
        let expired = self.slots.get(i)?.as_ref().map_or(true, |s| now >= s.verified.exp);
        if expired {
            self.clear(i);
            return None;
        }
        self.slots.get(i)?.as_ref().map(|s| &s.verified)
    }

    /// Caches a freshly verified token (unless it is already expired at `now`).
    pub fn insert(&mut self, key: CacheKey<'_>, verified: Verified, now: i64) {
        if self.capacity == 0 || now >= verified.exp {
            return;
        }
        if self.index.capacity() == 0 {
            // Sized up front (see the module documentation); a very large cache grows into its size with use.
            self.index.reserve(self.capacity.min(MAX_UPFRONT_ENTRIES).saturating_mul(2));
        }
        let i = if let Some(i) = self.slot_of(&key) {
            i
        } else if let Some(i) = self.free.pop() {
            i as usize
        } else if self.slots.len() < self.capacity {
            self.slots.push(None);
            self.slots.len() - 1
        } else {
            // Full, no free slot: evict in ring order (the oldest insertion, short of reused slots).
            let i = self.next;
            self.next = (self.next + 1) % self.capacity;
            self.take(i);
            i
        };
        if let Some(slot) = self.slots.get_mut(i) {
            *slot = Some(Slot { digest: key.digest, token: key.token.into(), verified });
            self.index.insert(short(&key.digest), u32::try_from(i).unwrap_or(u32::MAX));
        }
    }

    /// Drops every entry `keep` refuses; O(capacity). Returns how many went.
    fn retain(&mut self, keep: impl Fn(&Verified) -> bool) -> usize {
        let mut dropped = 0;
        for i in 0..self.slots.len() {
            if self.slots.get(i).and_then(Option::as_ref).is_some_and(|s| !keep(&s.verified)) {
                self.clear(i);
                dropped += 1;
            }
        }
        dropped
    }

    /// Drops every expired entry; O(capacity), meant for a timer. Returns how many went.
    pub fn purge_expired(&mut self, now: i64) -> usize {
        self.retain(|v| now < v.exp)
    }

    /// Drops every entry whose provider no longer has its key (`has(provider, key)` false) after a JWKS
    /// refresh: a key one provider dropped serves none of that provider's tokens, whoever else lists it.
    pub fn retain_provider_keys(&mut self, has: impl Fn(usize, u64) -> bool) -> usize {
        self.retain(|v| has(v.provider, v.key))
    }

    /// Drops every entry verified by a key not in `keys` (after a JWKS refresh). Returns how many.
    pub fn retain_keys(&mut self, keys: &[u64]) -> usize {
        self.retain(|v| keys.contains(&v.key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_767_225_600;

    fn entry(exp: i64, key: u64) -> Verified {
        Verified { exp, key, provider: 0, identity: Identity::new(Some(&json!("t")), None, None, None) }
    }

    fn key(token: &str) -> CacheKey<'_> {
        CacheKey { digest: super::digest(HashKey(1, 2), token), token }
    }

    #[test]
    fn the_hash_depends_on_the_secret_key() {
        assert_ne!(super::digest(HashKey(1, 2), "t"), super::digest(HashKey(1, 3), "t"));
        assert_ne!(TokenCache::new(1).key("t"), TokenCache::new(1).key("t"), "random keys per cache");
    }

    #[test]
    fn a_cached_token_is_a_hit_until_its_exp() {
        let mut c = TokenCache::new(10);
        let d = key("token");
        c.insert(d, entry(NOW + 10, 1), NOW);
        assert_eq!(c.get(&d, NOW + 9).map(|v| v.exp), Some(NOW + 10));
        assert!(c.get(&d, NOW + 10).is_none(), "served at exp");
        assert!(c.is_empty(), "expired entry removed");
    }

    #[test]
    fn an_expired_token_is_never_cached() {
        let mut c = TokenCache::new(10);
        c.insert(key("old"), entry(NOW, 1), NOW);
        assert!(c.is_empty());
    }

    #[test]
    fn different_tokens_do_not_share_an_entry() {
        let mut c = TokenCache::new(10);
        c.insert(key("a"), entry(NOW + 10, 1), NOW);
        assert!(c.get(&key("b"), NOW).is_none());
    }

    #[test]
    fn capacity_zero_disables_the_cache() {
        let mut c = TokenCache::new(0);
        c.insert(key("a"), entry(NOW + 10, 1), NOW);
        assert!(c.get(&key("a"), NOW).is_none());
    }

    #[test]
    fn at_capacity_the_oldest_entry_is_evicted() {
        let mut c = TokenCache::new(3);
        for i in 0..3 {
            c.insert(key(&i.to_string()), entry(NOW + 100, 1), NOW);
        }
        c.insert(key("3"), entry(NOW + 100, 1), NOW);
        assert_eq!(c.len(), 3);
        assert!(c.get(&key("0"), NOW).is_none());
        for i in 1..4 {
            assert!(c.get(&key(&i.to_string()), NOW).is_some(), "{i}");
        }
    }

    #[test]
    fn expired_entries_are_purged_on_the_timer() {
        let mut c = TokenCache::new(3);
        c.insert(key("live"), entry(NOW + 100, 1), NOW);
        c.insert(key("short"), entry(NOW + 5, 1), NOW);
        assert_eq!(c.purge_expired(NOW + 10), 1);
        assert_eq!(c.len(), 1);
        assert_eq!(c.free.len(), 1, "the purged slot is reused first");
        c.insert(key("a"), entry(NOW + 100, 1), NOW + 10);
        c.insert(key("b"), entry(NOW + 100, 1), NOW + 10);
        assert!(c.get(&key("live"), NOW + 10).is_some(), "room was made by the purge, not by evicting");
    }

    #[test]
    fn entries_of_a_removed_key_are_dropped() {
        let mut c = TokenCache::new(10);
        c.insert(key("old-key"), entry(NOW + 100, 1), NOW);
        c.insert(key("new-key"), entry(NOW + 100, 2), NOW);
        assert_eq!(c.retain_keys(&[2, 3]), 1);
        assert!(c.get(&key("old-key"), NOW).is_none());
        assert!(c.get(&key("new-key"), NOW).is_some());
    }

    #[test]
    fn memory_stays_bounded_under_churn() {
        let mut c = TokenCache::new(100);
        for i in 0..10_000i64 {
            c.insert(key(&i.to_string()), entry(NOW + 1 + (i % 7), 1), NOW);
            if i % 50 == 0 {
                c.retain_keys(&[1]);
            }
        }
        assert!(c.len() <= 100);
        assert!(c.slots.len() <= 100);
        assert!(c.free.len() <= 100);
        assert!(c.index.capacity() <= 256, "the index never grows: {}", c.index.capacity());
    }

    #[test]
    fn a_colliding_short_index_key_is_a_miss_not_a_wrong_hit() {
        let mut c = TokenCache::new(10);
        let a = CacheKey { digest: (1u128 << 64) | 7, token: "a" };
        let b = CacheKey { digest: (2u128 << 64) | 7, token: "b" }; // same 64 index bits
        c.insert(a, entry(NOW + 100, 1), NOW);
        assert!(c.get(&b, NOW).is_none());
        c.insert(b, entry(NOW + 100, 2), NOW);
        assert_eq!(c.get(&b, NOW).map(|v| v.key), Some(2));
        assert!(c.get(&a, NOW).is_none(), "the index points at b now; a is a miss (verified again)");
        // Evicting a's orphaned slot (slot 0, the ring's first victim) must not drop b's index entry (b is in
        // slot 1): eight inserts fill slots 2..9, the ninth evicts slot 0 and only it.
        for i in 0..9u128 {
            c.insert(CacheKey { digest: i + 1000, token: "other" }, entry(NOW + 100, 3), NOW);
            assert_eq!(c.get(&b, NOW).map(|v| v.key), Some(2), "b lost after {} inserts", i + 1);
        }
        assert_eq!(c.len(), 10, "b and the nine others");
        assert!(c.len() <= 10);
    }

    #[test]
    fn a_hit_is_the_same_token_not_merely_the_same_digest() {
        let mut c = TokenCache::new(10);
        let cached = CacheKey { digest: 42, token: "header.claims-of-tenant-a.signature" };
        c.insert(cached, entry(NOW + 100, 1), NOW);
        assert!(c.get(&cached, NOW).is_some());
        // A full 128-bit collision (astronomically unlikely under the secret key, but not impossible): the
        // stored token tells them apart, and the other token is verified afresh.
        let forged = CacheKey { digest: 42, token: "header.claims-of-tenant-b.signature" };
        assert!(c.get(&forged, NOW).is_none());
        let prefix = CacheKey { digest: 42, token: "header.claims-of-tenant-a.signatur" };
        assert!(c.get(&prefix, NOW).is_none(), "a prefix of the cached token is another token");
        assert!(c.get(&cached, NOW).is_some(), "a miss on the colliding token leaves the cached one alone");
    }
}
