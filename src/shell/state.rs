//! The shell's state, in one place: what the root context builds in `on_configure` and every HTTP
//! context of that VM shares.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::crypto::Signatures;
use crate::effect::FetchTarget;
use crate::router::{Router, Stream};

use super::apply::Apply;
use super::host::Host;
use super::host_crypto::HostCrypto;
use super::metrics::Metrics;

/// Everything the contexts of one VM share.
pub struct Shared<H> {
    pub host: H,
    pub router: RefCell<Router>,
    pub signatures: Signatures<HostCrypto<H>>,
    pub metrics: Metrics,
    /// The root context's calls in flight, by token.
    pub calls: RefCell<HashMap<u32, FetchTarget>>,
    /// Requests parked until a key set arrives, by context id, and woken ones not yet taken back by their
    /// context: the root context cannot reach an HTTP context, so a parked stream is kept here meanwhile.
    pub parked: RefCell<HashMap<u32, Stream>>,
}

impl<H: Host> Shared<H> {
    /// An effect interpreter over this VM's host.
    pub fn apply(&self) -> Apply<'_, H> {
        Apply::new(&self.host, &self.metrics, &self.calls)
    }
}
