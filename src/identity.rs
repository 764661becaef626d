//! What a verified token says about who is asking: the tenant claim as signed, and the claims that identify
//! the client and the token (for the audit line). One shared allocation, so a cache hit hands it on without
//! copying.

use std::sync::Arc;

use serde_json::Value;

use crate::scopes::Scopes;

/// The tenant claim as signed: a space-delimited string (RFC 6749 §3.3), a list of strings, or neither.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim<'a> {
    None,
    /// Values separated by spaces.
    Text(&'a str),
    /// Values separated by NUL (a NUL inside a value was replaced by a space: no tenant id or prefix holds
    /// either, so such a value names no tenant before or after).
    List(&'a str),
}

impl<'a> Claim<'a> {
    /// The non-empty values of the claim.
    pub fn values(self) -> impl Iterator<Item = &'a str> {
        let (text, sep) = match self {
            Claim::None => ("", ' '),
            Claim::Text(t) => (t, ' '),
            Claim::List(t) => (t, '\0'),
        };
        text.split(sep).filter(|v| !v.is_empty())
    }
}

/// What a verified token says that later requests still need: the tenant claim, for routing, and the
/// claims that identify the client and the token, for the audit log. One shared allocation: a cache hit
/// hands it on without copying.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// The tenant claim, then client_id, sub and jti, back to back.
    text: Arc<str>,
    /// Where each of the four parts ends in `text`.
    ends: [u32; 4],
    /// Bit i: part i is present (the claim: bit 0; bit 4: the claim is a list; bit 5: the client id is cut).
    present: u8,
    /// What the token's SMART scopes grant (parsed once, when the token is verified).
    scopes: Scopes,
    /// The index of the provider whose keys verified the token (`Config::providers`).
    provider: u32,
}

/// Identity claims longer than this are cut (they go into log lines).
const MAX_IDENTITY_CHARS: usize = 128;
/// The longest tenant claim kept, in bytes (as stored: list items joined by one byte each). A longer claim
/// is kept as if it were absent, and so names no tenant: it cannot be cut like the identity claims, since
/// the values beyond the cut could name a second tenant (and cutting inside a value could make it name
/// another tenant). A scope of a few dozen SMART scopes takes well under 1 KB.
pub const MAX_TENANT_CLAIM_BYTES: usize = 4096;
const LIST: u8 = 1 << 4;
/// Bit 5: the client id was longer than [`MAX_IDENTITY_CHARS`] and is kept cut (for the audit line only).
const CLIENT_CUT: u8 = 1 << 5;

impl Identity {
    /// From the parts: the tenant claim's JSON value, then client_id, sub and jti.
    pub fn new(claim: Option<&Value>, client_id: Option<&str>, sub: Option<&str>, jti: Option<&str>) -> Self {
        let mut text = String::new();
        let mut ends = [0u32; 4];
        let mut present = 0u8;
        match claim {
            Some(Value::String(s)) if s.len() <= MAX_TENANT_CLAIM_BYTES => {
                text.push_str(s);
                present |= 1;
            }
            Some(Value::Array(items)) => {
                for item in items.iter().filter_map(Value::as_str) {
                    if !text.is_empty() {
                        text.push('\0');
                    }
                    text.extend(item.chars().map(|c| if c == '\0' { ' ' } else { c }));
                    if text.len() > MAX_TENANT_CLAIM_BYTES {
                        break;
                    }
                }
                if text.len() > MAX_TENANT_CLAIM_BYTES {
                    text.clear();
                } else {
                    present |= 1 | LIST;
                }
            }
            _ => {}
        }
        ends[0] = u32::try_from(text.len()).unwrap_or(u32::MAX);
        for (i, part) in [client_id, sub, jti].into_iter().enumerate() {
            if let Some(v) = part {
                text.extend(v.chars().take(MAX_IDENTITY_CHARS));
                present |= 1 << (i + 1);
                if i == 0 && v.chars().nth(MAX_IDENTITY_CHARS).is_some() {
                    present |= CLIENT_CUT;
                }
            }
            if let Some(end) = ends.get_mut(i + 1) {
                *end = u32::try_from(text.len()).unwrap_or(u32::MAX);
            }
        }
        Self { text: Arc::from(text), ends, present, scopes: Scopes::default(), provider: 0 }
    }

    /// Verified by the provider at `index` (`Config::providers`).
    pub fn with_provider(mut self, index: usize) -> Self {
        self.provider = u32::try_from(index).unwrap_or(u32::MAX);
        self
    }

    /// The index of the provider that verified the token (`Config::providers`): its configured issuer is the
    /// token's, without reading the token again.
    pub fn provider(&self) -> usize {
        self.provider as usize
    }

    /// With what the token's SMART scopes grant.
    pub fn with_scopes(mut self, scopes: Scopes) -> Self {
        self.scopes = scopes;
        self
    }

    /// What the token's SMART scopes grant.
    pub fn scopes(&self) -> &Scopes {
        &self.scopes
    }

    fn part(&self, i: usize) -> Option<&str> {
        if self.present & (1 << i) == 0 {
            return None;
        }
        let start = if i == 0 { 0 } else { *self.ends.get(i - 1)? as usize };
        self.text.get(start..*self.ends.get(i)? as usize)
    }

    /// The tenant claim as signed.
    pub fn tenant_claim(&self) -> Claim<'_> {
        match self.part(0) {
            None => Claim::None,
            Some(t) if self.present & LIST != 0 => Claim::List(t),
            Some(t) => Claim::Text(t),
        }
    }

    /// The client: `client_id`, else `azp`, else `appid` (cut to 128 characters: for log lines).
    pub fn client_id(&self) -> Option<&str> {
        self.part(1)
    }

    /// The client as signed, for comparing with a tenant's `allowed_clients`: `None` when the token names
    /// none or names one longer than the 128 characters kept (which no configured client id is).
    pub fn whole_client_id(&self) -> Option<&str> {
        if self.present & CLIENT_CUT != 0 {
            return None;
        }
        self.part(1)
    }

    pub fn sub(&self) -> Option<&str> {
        self.part(2)
    }

    pub fn jti(&self) -> Option<&str> {
        self.part(3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn identity_parts_and_claim_forms_round_trip() {
        let id = Identity::new(Some(&json!("openid  tenant/x")), Some("app"), None, Some("j1"));
        assert_eq!(id.tenant_claim().values().collect::<Vec<_>>(), ["openid", "tenant/x"]);
        assert_eq!((id.client_id(), id.sub(), id.jti()), (Some("app"), None, Some("j1")));
        let list = Identity::new(Some(&json!(["a b", 3, "c\u{0}d", ""])), None, Some(""), None);
        assert_eq!(list.tenant_claim(), Claim::List("a b\0c d\0"));
        assert_eq!(list.tenant_claim().values().collect::<Vec<_>>(), ["a b", "c d"]);
        assert_eq!(list.sub(), Some(""));
        assert_eq!(Identity::new(Some(&json!(7)), None, None, None).tenant_claim(), Claim::None);
        assert_eq!(Identity::new(None, None, None, None).tenant_claim(), Claim::None);
        let long = "x".repeat(500);
        let cut = Identity::new(None, Some(&long), None, None);
        assert_eq!(cut.client_id().map(str::len), Some(128));
        assert_eq!(cut.whole_client_id(), None, "a cut client id is never compared");
        let exact = "y".repeat(128);
        assert_eq!(Identity::new(None, Some(&exact), None, None).whole_client_id(), Some(exact.as_str()));
    }

    #[test]
    fn an_overlong_tenant_claim_is_kept_as_absent_never_cut() {
        let at_cap = format!("{} tenant/x", "s".repeat(MAX_TENANT_CLAIM_BYTES - 9));
        assert_eq!(at_cap.len(), MAX_TENANT_CLAIM_BYTES);
        let id = Identity::new(Some(&json!(at_cap)), Some("app"), None, None);
        assert_eq!(id.tenant_claim().values().last(), Some("tenant/x"));
        // One byte more: cutting it would keep values and drop others (a second tenant, say); it names none.
        let over = format!("s{at_cap}");
        let id = Identity::new(Some(&json!(over)), Some("app"), Some("sub"), None);
        assert_eq!(id.tenant_claim(), Claim::None);
        assert_eq!((id.client_id(), id.sub()), (Some("app"), Some("sub")), "the other claims are kept");
        let list: Vec<String> = (0..1000).map(|i| format!("scope/{i}")).collect();
        assert_eq!(Identity::new(Some(&json!(list)), None, None, None).tenant_claim(), Claim::None);
        let short: Vec<String> = (0..10).map(|i| format!("scope/{i}")).collect();
        assert_eq!(Identity::new(Some(&json!(short)), None, None, None).tenant_claim().values().count(), 10);
    }
}
