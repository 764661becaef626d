//! Why a request was refused, and how each refusal is answered: status, `WWW-Authenticate` and a FHIR
//! `OperationOutcome` body. The answers are constants: a refusal costs no formatting.

use std::fmt;

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// No `Authorization: Bearer` header.
    MissingToken,
    /// A `Bearer` header whose value is not a token.
    MalformedCredentials,
    /// Longer than the configured maximum.
    TokenTooLarge,
    /// Not a compact JWS with JSON header and claims.
    Malformed,
    /// `alg` is not one we accept (`none`, HMAC, unknown).
    UnsupportedAlgorithm,
    /// The header lists `crit` extensions.
    CriticalHeader,
    IssuerMismatch,
    MissingExpiry,
    Expired,
    /// `nbf` or `iat` lies in the future beyond the clock skew.
    NotYetValid,
    AudienceMismatch,
    /// No key in the JWKS has the token's `kid`.
    UnknownKey,
    /// The key named by `kid` does not allow the token's `alg`.
    KeyAlgorithmMismatch,
    BadSignature,
    /// The JWKS has not been fetched yet.
    KeysUnavailable,
    /// The token's scope names no configured tenant.
    NoTenant,
    /// The token's scope names several tenants.
    SeveralTenants,
    /// The tenant the token names is bound to other issuers.
    IssuerNotAllowed,
    /// The tenant registry has not been fetched yet.
    TenantsUnavailable,
    /// The token names an unknown `kid` and too many requests already wait for its issuer's keys.
    WaitQueueFull,
    /// The token's client (`client_id`, else `azp`) is not one of the tenant's `allowed_clients`.
    ClientNotAllowed,
    /// The tenant's FHIR server needs an access token of its own authorization server, and there is none
    /// usable (that server failed, or too many requests already wait for it).
    UpstreamAuthUnavailable,
    /// The tenant's token bucket is short of the request's cost ([`crate::quota`]): 429.
    QuotaRate,
    /// The tenant has `max_in_flight` requests in flight: 429.
    QuotaInFlight,
    /// The JOSE header `typ` is not the provider's `token_typ` (an ID token, say, where an RFC 9068 access
    /// token is required).
    WrongTokenType,
    /// A claim of the provider's `required_claims` is missing or has another value.
    MissingRequiredClaim,
}

/// The RFC 6750 realm in `WWW-Authenticate`.
pub const REALM: &str = "fhir-tenant-router";

/// A one-issue `OperationOutcome` as a string constant. `code` and `diagnostics` must need no JSON escaping
/// (a unit test parses every one).
macro_rules! outcome {
    ($code:literal, $diagnostics:literal) => {
        concat!(
            r#"{"issue":[{"code":""#,
            $code,
            r#"","diagnostics":""#,
            $diagnostics,
            r#"","severity":"error"}],"resourceType":"OperationOutcome"}"#
        )
    };
}

const BEARER: &str = "Bearer realm=\"fhir-tenant-router\"";
const INVALID_TOKEN: &str = "Bearer realm=\"fhir-tenant-router\", error=\"invalid_token\"";
const INSUFFICIENT_SCOPE: &str = "Bearer realm=\"fhir-tenant-router\", error=\"insufficient_scope\"";

impl Rejection {
    /// The HTTP status.
    pub fn status(self) -> u32 {
        match self {
            Self::NoTenant | Self::SeveralTenants | Self::IssuerNotAllowed | Self::ClientNotAllowed => 403,
            Self::QuotaRate | Self::QuotaInFlight => 429,
            Self::KeysUnavailable | Self::TenantsUnavailable | Self::WaitQueueFull | Self::UpstreamAuthUnavailable => {
                503
            }
            _ => 401,
        }
    }

    /// A short stable name, for stats and logs.
    pub fn reason(self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::MalformedCredentials => "malformed_credentials",
            Self::TokenTooLarge => "token_too_large",
            Self::Malformed => "malformed_token",
            Self::UnsupportedAlgorithm => "unsupported_alg",
            Self::CriticalHeader => "crit_header",
            Self::IssuerMismatch => "issuer_mismatch",
            Self::MissingExpiry => "missing_exp",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::AudienceMismatch => "audience_mismatch",
            Self::UnknownKey => "unknown_kid",
            Self::KeyAlgorithmMismatch => "key_alg_mismatch",
            Self::BadSignature => "bad_signature",
            Self::KeysUnavailable => "jwks_unavailable",
            Self::NoTenant => "no_tenant",
            Self::SeveralTenants => "several_tenants",
            Self::IssuerNotAllowed => "issuer_not_allowed",
            Self::TenantsUnavailable => "tenants_unavailable",
            Self::WaitQueueFull => "wait_queue_full",
            Self::UpstreamAuthUnavailable => "upstream_auth_unavailable",
            Self::ClientNotAllowed => "client_not_allowed",
            Self::QuotaRate => "quota_rate",
            Self::QuotaInFlight => "quota_in_flight",
            Self::WrongTokenType => "wrong_token_type",
            Self::MissingRequiredClaim => "missing_required_claim",
        }
    }

    /// All variants, for defining one stat each.
    pub const ALL: [Rejection; 26] = [
        Self::MissingToken,
        Self::MalformedCredentials,
        Self::TokenTooLarge,
        Self::Malformed,
        Self::UnsupportedAlgorithm,
        Self::CriticalHeader,
        Self::IssuerMismatch,
        Self::MissingExpiry,
        Self::Expired,
        Self::NotYetValid,
        Self::AudienceMismatch,
        Self::UnknownKey,
        Self::KeyAlgorithmMismatch,
        Self::BadSignature,
        Self::KeysUnavailable,
        Self::NoTenant,
        Self::SeveralTenants,
        Self::IssuerNotAllowed,
        Self::TenantsUnavailable,
        Self::WaitQueueFull,
        Self::UpstreamAuthUnavailable,
        Self::ClientNotAllowed,
        Self::QuotaRate,
        Self::QuotaInFlight,
        Self::WrongTokenType,
        Self::MissingRequiredClaim,
    ];

    /// The stat counting this refusal, under the filter's prefix.
    pub fn stat_name(self) -> &'static str {
        match self {
            Self::MissingToken => "requests.rejected.missing_token",
            Self::MalformedCredentials => "requests.rejected.malformed_credentials",
            Self::TokenTooLarge => "requests.rejected.token_too_large",
            Self::Malformed => "requests.rejected.malformed_token",
            Self::UnsupportedAlgorithm => "requests.rejected.unsupported_alg",
            Self::CriticalHeader => "requests.rejected.crit_header",
            Self::IssuerMismatch => "requests.rejected.issuer_mismatch",
            Self::MissingExpiry => "requests.rejected.missing_exp",
            Self::Expired => "requests.rejected.expired",
            Self::NotYetValid => "requests.rejected.not_yet_valid",
            Self::AudienceMismatch => "requests.rejected.audience_mismatch",
            Self::UnknownKey => "requests.rejected.unknown_kid",
            Self::KeyAlgorithmMismatch => "requests.rejected.key_alg_mismatch",
            Self::BadSignature => "requests.rejected.bad_signature",
            Self::KeysUnavailable => "requests.rejected.jwks_unavailable",
            Self::NoTenant => "requests.rejected.no_tenant",
            Self::SeveralTenants => "requests.rejected.several_tenants",
            Self::IssuerNotAllowed => "requests.rejected.issuer_not_allowed",
            Self::TenantsUnavailable => "requests.rejected.tenants_unavailable",
            Self::WaitQueueFull => "requests.rejected.wait_queue_full",
            Self::UpstreamAuthUnavailable => "requests.rejected.upstream_auth_unavailable",
            Self::ClientNotAllowed => "requests.rejected.client_not_allowed",
            Self::QuotaRate => "requests.rejected.quota_rate",
            Self::QuotaInFlight => "requests.rejected.quota_in_flight",
            Self::WrongTokenType => "requests.rejected.wrong_token_type",
            Self::MissingRequiredClaim => "requests.rejected.missing_required_claim",
        }
    }

    /// Position in [`Rejection::ALL`] (a stat's index).
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }

    /// The `WWW-Authenticate` value, when the answer carries one. A request without credentials gets no
    /// error code (RFC 6750 §3.1); every other token problem is `invalid_token`.
    pub fn www_authenticate(self) -> Option<&'static str> {
        match self {
            Self::MissingToken => Some(BEARER),
            Self::KeysUnavailable
            | Self::TenantsUnavailable
            | Self::WaitQueueFull
            | Self::UpstreamAuthUnavailable
            | Self::QuotaRate
            | Self::QuotaInFlight => None,
            Self::NoTenant | Self::SeveralTenants | Self::IssuerNotAllowed | Self::ClientNotAllowed => {
                Some(INSUFFICIENT_SCOPE)
            }
            _ => Some(INVALID_TOKEN),
        }
    }

    /// Whether the answer carries `Retry-After` (the refusal is transient).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::KeysUnavailable
                | Self::TenantsUnavailable
                | Self::WaitQueueFull
                | Self::UpstreamAuthUnavailable
                | Self::QuotaRate
                | Self::QuotaInFlight
        )
    }

    /// The body: a FHIR `OperationOutcome`, as `application/fhir+json`. Deliberately generic: the precise
    /// reason is in the stats, not the answer.
    pub fn operation_outcome(self) -> &'static str {
        match self {
            Self::MissingToken => outcome!("login", "This request needs an OAuth 2.0 bearer access token."),
            Self::NoTenant => outcome!("forbidden", "The access token's scope does not name a tenant served here."),
            Self::SeveralTenants => outcome!("forbidden", "The access token's scope names more than one tenant."),
            Self::KeysUnavailable => {
                outcome!("transient", "The token issuer's signing keys are not available yet; retry shortly.")
            }
            Self::TenantsUnavailable => {
                outcome!("transient", "The tenant registry is not available yet; retry shortly.")
            }
            Self::WaitQueueFull => {
                outcome!("transient", "The token issuer's signing keys are being fetched; retry shortly.")
            }
            Self::IssuerNotAllowed => outcome!("forbidden", "The access token's issuer may not name this tenant."),
            Self::ClientNotAllowed => outcome!("forbidden", "The access token's client may not use this tenant."),
            Self::UpstreamAuthUnavailable => {
                outcome!(
                    "transient",
                    "The tenant's FHIR server cannot be reached with valid credentials right now; retry shortly."
                )
            }
            // The answers a shell sends name the limit (built from the configuration by `crate::quota`).
            Self::QuotaRate | Self::QuotaInFlight => outcome!("throttled", "Tenant quota exceeded; retry later."),
            Self::WrongTokenType => {
                outcome!("login", "The bearer token is not an access token of the type this server requires.")
            }
            Self::MissingRequiredClaim => outcome!("login", "The access token lacks a claim this server requires."),
            _ => outcome!("login", "The access token is invalid, expired or not meant for this server."),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

/// A one-issue FHIR `OperationOutcome` with severity `error`, for answers whose text varies.
pub fn operation_outcome(code: &str, diagnostics: &str) -> String {
    serde_json::json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn every_constant_body_is_the_operation_outcome_serde_would_write() {
        for r in Rejection::ALL {
            let body: Value = serde_json::from_str(r.operation_outcome()).unwrap();
            let issue = &body["issue"][0];
            let rebuilt = operation_outcome(issue["code"].as_str().unwrap(), issue["diagnostics"].as_str().unwrap());
            assert_eq!(r.operation_outcome(), rebuilt, "{r}");
            assert_eq!(body["resourceType"], "OperationOutcome");
        }
    }

    #[test]
    fn status_code_and_www_authenticate_agree() {
        for r in Rejection::ALL {
            let body: Value = serde_json::from_str(r.operation_outcome()).unwrap();
            let code = body["issue"][0]["code"].as_str().unwrap().to_string();
            match r.status() {
                401 => {
                    assert_eq!(code, "login", "{r}");
                    assert!(r.www_authenticate().unwrap().starts_with("Bearer realm=\"fhir-tenant-router\""));
                }
                403 => {
                    assert_eq!(code, "forbidden", "{r}");
                    assert!(r.www_authenticate().unwrap().ends_with("error=\"insufficient_scope\""));
                }
                503 => {
                    assert_eq!(code, "transient", "{r}");
                    assert!(r.www_authenticate().is_none() && r.is_transient());
                }
                429 => {
                    assert_eq!(code, "throttled", "{r}");
                    assert!(r.www_authenticate().is_none() && r.is_transient());
                }
                other => panic!("{r}: {other}"),
            }
            assert_eq!(Rejection::ALL[r.index()], r);
            assert_eq!(r.stat_name(), format!("requests.rejected.{}", r.reason()));
        }
    }
}
