//! The quota buckets of a proxy-wasm VM in Envoy's shared data, so that every worker's VM charges the same
//! bucket per tenant: a [`QuotaStore`] over `get_shared_data` / `set_shared_data` and their CAS token. The
//! core runs the compare-and-swap loop and decides what contention means ([`crate::quota`]).
//!
//! Envoy reads a CAS token of 0 as "write unconditionally": the write of a key read as absent is not
//! compared. So the root context creates every known tenant's bucket before its requests can arrive
//! ([`crate::quota::ensure`]); a request's write is then always compared.

use crate::quota::{Bucket, QuotaStore, StoreError};

use super::host::{Host, SharedWrite};

/// The host's shared data as the quota store.
pub struct SharedData<H>(pub H);

impl<H: Host> QuotaStore for SharedData<H> {
    fn load(&self, key: &str) -> Result<(Option<Bucket>, u32), StoreError> {
        let (value, cas) = self.0.shared_data(key).ok_or(StoreError::Unavailable)?;
        Ok((value.as_deref().and_then(Bucket::decode), cas))
    }

    fn store(&self, key: &str, bucket: &Bucket, version: u32) -> Result<(), StoreError> {
        match self.0.set_shared_data(key, &bucket.encode(), version) {
            SharedWrite::Stored => Ok(()),
            SharedWrite::CasMismatch => Err(StoreError::Conflict),
            SharedWrite::Failed => Err(StoreError::Unavailable),
        }
    }
}
