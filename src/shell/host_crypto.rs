//! [`HostVerify`] over the host's `verify_signature` foreign function (BoringSSL). Which checks go to the
//! host and what happens when it lacks the function is the core's policy ([`crate::crypto::Signatures`]).

use crate::crypto::{HostVerdict, HostVerify};
use crate::host_proto::{decode_verify_result, encode_verify_arguments};

use super::host::{ForeignCall, Host};

/// The host's signature function, for [`crate::crypto::Signatures`].
#[derive(Clone, Debug)]
pub struct HostCrypto<H>(pub H);

impl<H: Host> HostVerify for HostCrypto<H> {
    fn verify(&self, hash: &str, spki_der: &[u8], signature: &[u8], input: &[u8]) -> HostVerdict {
        let args = encode_verify_arguments(hash, spki_der, signature, input);
        match self.0.verify_signature(&args) {
            ForeignCall::Answered(result) => HostVerdict::Checked(decode_verify_result(&result).unwrap_or(false)),
            ForeignCall::NotFound => HostVerdict::Unavailable,
            ForeignCall::Failed => HostVerdict::Failed,
        }
    }

    fn now_ns(&self) -> Option<u64> {
        Some(self.0.now_ns())
    }
}
