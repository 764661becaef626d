//! Credentials toward a tenant's FHIR server, when that server wants an OAuth access token of its own
//! authorization server (the commercial FHIR clouds): the configuration of one OAuth client per tenant, the
//! token request it sends (client credentials with a secret or a signed client assertion, or the RFC 7523
//! JWT-bearer grant), the token response it reads, and the per-tenant token state: cached, refreshed ahead
//! of expiry, one fetch in flight, requests waiting for the first token bounded in number.
//!
//! Sans-I/O like the rest of the core: time is an argument, the fetch is an effect the shell sends through
//! an Envoy cluster. Secrets and private keys live only in [`OAuthClient`]: never in `Debug`, logs or
//! answers; a token only in the request header it is sent in.

use std::fmt;
use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde::Deserialize;
use sha2::Digest;
use siphasher::sip::SipHasher13;

/// A bad `upstream_auth`: the field (full path) and what is wrong. Never holds a secret.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field `{}`: {}", self.field, self.message)
    }
}

/// Where a secret comes from, as written: an environment variable of the VM, or a file the host can read.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecret {
    #[serde(default)]
    pub env: Option<String>,
    #[serde(default)]
    pub file: Option<String>,
}

/// A tenant's `upstream_auth`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamAuth {
    pub method: String,
    pub token_url: String,
    pub cluster: String,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub client_secret: Option<RawSecret>,
    #[serde(default)]
    pub private_key: Option<RawSecret>,
    #[serde(default)]
    pub key_id: Option<String>,
    #[serde(default)]
    pub signing_alg: Option<String>,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub resource: Option<String>,
    #[serde(default)]
    pub audience: Option<String>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub max_waiting: Option<usize>,
}

/// How the client authenticates (and which grant it uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Client credentials; `client_id:secret` in HTTP Basic (RFC 6749 §2.3.1).
    ClientSecretBasic,
    /// Client credentials; `client_id` and `client_secret` in the form.
    ClientSecretPost,
    /// Client credentials with an RFC 7523 client assertion (SMART Backend Services).
    PrivateKeyJwt,
    /// The RFC 7523 JWT-bearer grant: the signed assertion is the grant (service-account style).
    JwtBearer,
}

impl Method {
    /// The configuration's name, also the audit line's credential kind.
    pub fn name(self) -> &'static str {
        match self {
            Self::ClientSecretBasic => "client_secret_basic",
            Self::ClientSecretPost => "client_secret_post",
            Self::PrivateKeyJwt => "private_key_jwt",
            Self::JwtBearer => "jwt_bearer",
        }
    }
}

/// A JWS algorithm an assertion is signed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SigningAlg {
    Rs256,
    Rs384,
    Es384,
}

impl SigningAlg {
    fn name(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Rs384 => "RS384",
            Self::Es384 => "ES384",
        }
    }
}

/// A private key an assertion is signed with.
enum SigningKey {
    Rsa(Box<rsa::RsaPrivateKey>),
    #[cfg(feature = "p384-pure-rust")]
    P384(Box<p384::ecdsa::SigningKey>),
}

/// Default time a token request may take.
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;
/// Default number of requests of one tenant that may wait for its first token (per VM).
pub const DEFAULT_MAX_WAITING: usize = 256;
/// Longest access token accepted, in bytes.
pub const MAX_ACCESS_TOKEN_BYTES: usize = 16 * 1024;
/// Largest token response read, in bytes.
pub const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;
/// How long a client assertion is valid (SMART Backend Services: at most five minutes).
const ASSERTION_LIFETIME_S: i64 = 300;
/// A token is refreshed once this share of the time it is used has passed (per mille).
const REFRESH_AT_PER_MILLE: u64 = 800;
/// Lifetime assumed when the answer has no `expires_in`.
const DEFAULT_EXPIRES_IN_S: u64 = 300;

/// One tenant's OAuth client toward its FHIR server's authorization server. Holds the secret or key: its
/// `Debug` shows neither.
pub struct OAuthClient {
    pub method: Method,
    pub token_url: String,
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub client_id: String,
    secret: Option<String>,
    key: Option<SigningKey>,
    key_id: Option<String>,
    alg: SigningAlg,
    subject: Option<String>,
    scope: Option<String>,
    resource: Option<String>,
    audience: Option<String>,
    pub timeout_ms: u64,
    pub max_waiting: usize,
    /// A hash of everything above (secrets included): a change means the cached token is dropped.
    fingerprint: u64,
}

impl fmt::Debug for OAuthClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuthClient")
            .field("method", &self.method)
            .field("token_url", &self.token_url)
            .field("cluster", &self.cluster)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl PartialEq for OAuthClient {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

impl Eq for OAuthClient {}

impl OAuthClient {
    /// The audit line's name for the credential.
    pub fn kind(&self) -> &'static str {
        self.method.name()
    }
}

/// Reads a secret: `lookup(name)` gives an environment variable; a file is asked for as
/// [`FILE_PREFIX`]`path` (a name no environment variable has), which only a host that reads files answers.
pub const FILE_PREFIX: &str = "\0file:";

/// An environment variable's name for an error message: `NAME` in backticks when it looks like one
/// (`[A-Za-z_][A-Za-z0-9_]*`, at most 128 bytes); otherwise not shown, since a value that is no variable name
/// may be the secret itself, written where its variable's name belongs.
pub fn env_name(name: &str) -> String {
    let mut bytes = name.bytes();
    let looks_like_a_name = name.len() <= 128
        && bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if looks_like_a_name {
        format!("`{name}`")
    } else {
        "(its name is not shown: it is not a variable name, maybe a secret written in its place)".to_string()
    }
}

pub(crate) fn read_secret(
    field: &str,
    raw: Option<&RawSecret>,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let Some(raw) = raw else { return Err(ConfigError::new(field, "is required for this method")) };
    let value = match (&raw.env, &raw.file) {
        (Some(name), None) => lookup(name).filter(|v| !v.is_empty()).ok_or_else(|| {
            ConfigError::new(
                format!("{field}.env"),
                format!(
                    "environment variable {} is not set for the VM (vm_config.environment_variables)",
                    env_name(name)
                ),
            )
        })?,
        (None, Some(path)) => lookup(&format!("{FILE_PREFIX}{path}")).filter(|v| !v.is_empty()).ok_or_else(|| {
            ConfigError::new(
                format!("{field}.file"),
                format!(
                    "file `{path}` could not be read (the proxy-wasm build cannot read files: use `env`, which \
                     Envoy fills from vm_config.environment_variables; the dynamic module reads files)"
                ),
            )
        })?,
        _ => return Err(ConfigError::new(field, "give exactly one of env and file")),
    };
    Ok(value)
}

/// A private key from PEM: PKCS#8 (`BEGIN PRIVATE KEY`: RSA, or P-384 in a build with pure-Rust P-384) or
/// PKCS#1 (`BEGIN RSA PRIVATE KEY`). A Google service-account JSON file's `private_key` is such a PEM; the
/// file itself is accepted too. (Read with the crate's own small DER reader: the `pkcs8`/`pem` crates would
/// add about 60 KB to the module.)
/// The key, and from a service-account JSON file its `private_key_id` (the `kid` Google's token endpoint
/// looks the public key up by), when that is printable text.
fn parse_key_file(field: &str, text: &str) -> Result<(SigningKey, Option<String>), ConfigError> {
    let text = text.trim();
    if !text.starts_with('{') {
        return Ok((parse_key(field, text)?, None));
    }
    let value: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    let pem = value.get("private_key").and_then(serde_json::Value::as_str).ok_or_else(|| {
        ConfigError::new(field, "is JSON without a `private_key` (a service-account key file has one)")
    })?;
    let key_id = value
        .get("private_key_id")
        .and_then(serde_json::Value::as_str)
        .filter(|id| !id.is_empty() && id.len() <= 256 && id.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string);
    Ok((parse_key(field, pem)?, key_id))
}

fn parse_key(field: &str, pem: &str) -> Result<SigningKey, ConfigError> {
    use crate::der::{pem_decode, pkcs8_rsa_private_key, rsa_private_key_parts};
    let pem = pem.trim();
    let pkcs1 = pem_decode(pem, "RSA PRIVATE KEY");
    let pkcs8 = pem_decode(pem, "PRIVATE KEY");
    let rsa_der = match (&pkcs1, &pkcs8) {
        (Some(der), _) => Some(der.as_slice()),
        (None, Some(der)) => pkcs8_rsa_private_key(der),
        (None, None) => {
            return Err(ConfigError::new(
                field,
                "must be a PEM private key (`BEGIN PRIVATE KEY`, PKCS#8; or `BEGIN RSA PRIVATE KEY`)",
            ))
        }
    };
    if let Some([n, e, d, p, q]) = rsa_der.and_then(rsa_private_key_parts) {
        let int = rsa::BigUint::from_bytes_be;
        let key = rsa::RsaPrivateKey::from_components(int(n), int(e), int(d), vec![int(p), int(q)])
            .map_err(|_| ConfigError::new(field, "is not a valid RSA private key"))?;
        return rsa_key(field, key);
    }
    #[cfg(feature = "p384-pure-rust")]
    if let Some(key) = pkcs8.as_deref().and_then(|der| {
        use p384::pkcs8::DecodePrivateKey as _;
        p384::ecdsa::SigningKey::from_pkcs8_der(der).ok()
    }) {
        return Ok(SigningKey::P384(Box::new(key)));
    }
    let what = if cfg!(feature = "p384-pure-rust") {
        "is neither an RSA nor a P-384 private key"
    } else {
        "is not an RSA private key (this module has no P-384: build with the p384-pure-rust feature for ES384)"
    };
    Err(ConfigError::new(field, what))
}

fn rsa_key(field: &str, key: rsa::RsaPrivateKey) -> Result<SigningKey, ConfigError> {
    use rsa::traits::PublicKeyParts;
    if key.size() < 256 {
        return Err(ConfigError::new(field, "is an RSA key under 2048 bits"));
    }
    Ok(SigningKey::Rsa(Box::new(key)))
}

fn text_field(field: &str, value: &Option<String>) -> Result<Option<String>, ConfigError> {
    match value {
        Some(v) if v.is_empty() || v.len() > 4096 || v.chars().any(char::is_control) => {
            Err(ConfigError::new(field, "must be non-empty printable text (at most 4096 bytes)"))
        }
        other => Ok(other.clone()),
    }
}

/// Compiles a tenant's `upstream_auth` (`field` names it in errors). `lookup` reads the VM's environment
/// (and, as [`FILE_PREFIX`]`path`, files, where the host can).
pub fn compile(
    field: &str,
    raw: &RawUpstreamAuth,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<OAuthClient, ConfigError> {
    let f = |name: &str| format!("{field}.{name}");
    let method = match raw.method.as_str() {
        "client_secret_basic" => Method::ClientSecretBasic,
        "client_secret_post" => Method::ClientSecretPost,
        "private_key_jwt" => Method::PrivateKeyJwt,
        "jwt_bearer" => Method::JwtBearer,
        _ => {
            return Err(ConfigError::new(
                f("method"),
                "must be client_secret_basic, client_secret_post, private_key_jwt or jwt_bearer",
            ))
        }
    };
    let (authority, path) = crate::url::split_http_url(&raw.token_url)
        .filter(|_| !raw.token_url.contains('#'))
        .ok_or_else(|| ConfigError::new(f("token_url"), "must be an absolute http(s) URL"))?;
    if raw.cluster.is_empty() || !raw.cluster.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(f("cluster"), "must be an Envoy cluster name (the token endpoint's)"));
    }
    let client_id = text_field(&f("client_id"), &raw.client_id)?
        .ok_or_else(|| ConfigError::new(f("client_id"), "is required (for jwt_bearer: the assertion's issuer)"))?;
    let (secret, key, file_key_id) = match method {
        Method::ClientSecretBasic | Method::ClientSecretPost => {
            if raw.private_key.is_some() {
                return Err(ConfigError::new(f("private_key"), "is for private_key_jwt and jwt_bearer"));
            }
            let secret = read_secret(&f("client_secret"), raw.client_secret.as_ref(), lookup)?;
            if secret.chars().any(char::is_control) {
                return Err(ConfigError::new(f("client_secret"), "holds control characters"));
            }
            (Some(secret), None, None)
        }
        Method::PrivateKeyJwt | Method::JwtBearer => {
            if raw.client_secret.is_some() {
                return Err(ConfigError::new(f("client_secret"), "is for client_secret_basic and client_secret_post"));
            }
            let pem = read_secret(&f("private_key"), raw.private_key.as_ref(), lookup)?;
            let (key, file_key_id) = parse_key_file(&f("private_key"), &pem)?;
            (None, Some(key), file_key_id)
        }
    };
    let alg = match (raw.signing_alg.as_deref(), &key) {
        (_, None) => {
            if raw.signing_alg.is_some() || raw.key_id.is_some() || raw.subject.is_some() {
                let which = if raw.signing_alg.is_some() {
                    "signing_alg"
                } else if raw.key_id.is_some() {
                    "key_id"
                } else {
                    "subject"
                };
                return Err(ConfigError::new(f(which), "is for private_key_jwt and jwt_bearer"));
            }
            SigningAlg::Rs384
        }
        (None, Some(SigningKey::Rsa(_))) if method == Method::JwtBearer => SigningAlg::Rs256,
        (None, Some(SigningKey::Rsa(_))) => SigningAlg::Rs384,
        (Some("RS256"), Some(SigningKey::Rsa(_))) => SigningAlg::Rs256,
        (Some("RS384"), Some(SigningKey::Rsa(_))) => SigningAlg::Rs384,
        #[cfg(feature = "p384-pure-rust")]
        (None | Some("ES384"), Some(SigningKey::P384(_))) => SigningAlg::Es384,
        (Some(other), Some(_)) => {
            let what = format!("`{other}` does not fit the key (an RSA key signs RS384 or RS256, a P-384 key ES384)");
            return Err(ConfigError::new(f("signing_alg"), what));
        }
    };
    if method != Method::JwtBearer && raw.subject.is_some() {
        return Err(ConfigError::new(f("subject"), "is for jwt_bearer (a client assertion's subject is client_id)"));
    }
    // `key_id` as configured, else the service-account file's `private_key_id`.
    let key_id = text_field(&f("key_id"), &raw.key_id)?.or(file_key_id);
    let subject = text_field(&f("subject"), &raw.subject)?;
    let scope = text_field(&f("scope"), &raw.scope)?;
    let resource = text_field(&f("resource"), &raw.resource)?;
    let audience = text_field(&f("audience"), &raw.audience)?;
    let timeout_ms = raw.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if !(100..=60_000).contains(&timeout_ms) {
        return Err(ConfigError::new(f("timeout_ms"), "must be between 100 and 60000"));
    }
    let max_waiting = raw.max_waiting.unwrap_or(DEFAULT_MAX_WAITING);
    if max_waiting > 100_000 {
        return Err(ConfigError::new(f("max_waiting"), "must be at most 100000"));
    }
    let fingerprint = {
        use std::hash::{Hash, Hasher};
        let mut h = SipHasher13::new_with_keys(0x6f61_7574_685f_636c, 0x6965_6e74_5f66_7072);
        (method.name(), &raw.token_url, &raw.cluster, &client_id, &secret).hash(&mut h);
        (&key_id, alg.name(), &subject, &scope, &resource, &audience, timeout_ms, max_waiting).hash(&mut h);
        if let Some(pem) = raw.private_key.as_ref().and_then(|_| secret_fingerprint_source(&key)) {
            pem.hash(&mut h);
        }
        h.finish()
    };
    Ok(OAuthClient {
        method,
        token_url: raw.token_url.clone(),
        cluster: raw.cluster.clone(),
        authority,
        path,
        client_id,
        secret,
        key,
        key_id,
        alg,
        subject,
        scope,
        resource,
        audience,
        timeout_ms,
        max_waiting,
        fingerprint,
    })
}

/// Bytes that identify a private key (its public half), for the fingerprint.
fn secret_fingerprint_source(key: &Option<SigningKey>) -> Option<Vec<u8>> {
    match key.as_ref()? {
        SigningKey::Rsa(k) => {
            use rsa::traits::PublicKeyParts;
            Some(k.n().to_bytes_be())
        }
        #[cfg(feature = "p384-pure-rust")]
        SigningKey::P384(k) => Some(k.verifying_key().to_encoded_point(false).as_bytes().to_vec()),
    }
}

/// `application/x-www-form-urlencoded` encoding of one value (RFC 6749 appendix B).
fn form_encode(value: &str, out: &mut String) {
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => out.push(char::from(b)),
            b' ' => out.push('+'),
            _ => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(char::from(HEX.get(usize::from(b >> 4)).copied().unwrap_or(b'0')));
                out.push(char::from(HEX.get(usize::from(b & 15)).copied().unwrap_or(b'0')));
            }
        }
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        form_encode(name, &mut out);
        out.push('=');
        form_encode(value, &mut out);
    }
    out
}

/// A token request ready to send: extra headers and the form body. Holds secrets: never log it.
pub struct TokenRequest {
    pub authorization: Option<String>,
    pub body: String,
}

/// Why a token request could not be built (nothing secret in it).
#[derive(Debug, PartialEq, Eq)]
pub struct BuildError(pub &'static str);

impl OAuthClient {
    /// The token request at `now_s`; `random` fills the assertion's `jti` (a fresh random value each time).
    pub fn token_request(
        &self,
        now_s: i64,
        random: &mut dyn FnMut(&mut [u8]) -> bool,
    ) -> Result<TokenRequest, BuildError> {
        let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(8);
        let assertion;
        let mut authorization = None;
        match self.method {
            Method::ClientSecretBasic => {
                pairs.push(("grant_type", "client_credentials"));
                let secret = self.secret.as_deref().ok_or(BuildError("no secret"))?;
                // RFC 6749 §2.3.1: each part form-encoded before the Basic encoding.
                let (mut id, mut pw) = (String::new(), String::new());
                form_encode(&self.client_id, &mut id);
                form_encode(secret, &mut pw);
                authorization = Some(format!("Basic {}", STANDARD.encode(format!("{id}:{pw}"))));
            }
            Method::ClientSecretPost => {
                pairs.push(("grant_type", "client_credentials"));
                pairs.push(("client_id", &self.client_id));
                pairs.push(("client_secret", self.secret.as_deref().ok_or(BuildError("no secret"))?));
            }
            Method::PrivateKeyJwt => {
                assertion = self.assertion(now_s, random)?;
                pairs.push(("grant_type", "client_credentials"));
                pairs.push(("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"));
                pairs.push(("client_assertion", &assertion));
            }
            Method::JwtBearer => {
                assertion = self.assertion(now_s, random)?;
                pairs.push(("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"));
                pairs.push(("assertion", &assertion));
            }
        }
        for (name, value) in [("scope", &self.scope), ("resource", &self.resource), ("audience", &self.audience)] {
            if let Some(v) = value {
                pairs.push((name, v));
            }
        }
        Ok(TokenRequest { authorization, body: form(&pairs) })
    }

    /// The signed JWT: a client assertion (`iss` = `sub` = `client_id`) or a JWT-bearer grant (`iss` =
    /// `client_id`, `sub` = `subject` if set, else `client_id`: RFC 7523 §3 item 2 says the JWT MUST contain a
    /// `sub`; `scope` as a claim too, as Google reads it); `aud` is the token URL, `exp` five minutes ahead,
    /// `jti` random; the header's `kid` is `key_id` (or the service-account file's `private_key_id`).
    fn assertion(&self, now_s: i64, random: &mut dyn FnMut(&mut [u8]) -> bool) -> Result<String, BuildError> {
        let mut jti = [0u8; 16];
        if !random(&mut jti) {
            return Err(BuildError("no randomness for the assertion's jti"));
        }
        // JSON by hand (strings escaped by serde_json): smaller code than building a `Map`.
        let quote = |v: &str| serde_json::to_string(v).unwrap_or_default();
        let mut header = format!(r#"{{"alg":"{}","typ":"JWT""#, self.alg.name());
        if let Some(kid) = &self.key_id {
            header.push_str(&format!(r#","kid":{}"#, quote(kid)));
        }
        header.push('}');
        let sub = match self.method {
            Method::JwtBearer => self.subject.as_deref().unwrap_or(&self.client_id),
            _ => self.client_id.as_str(),
        };
        let mut claims = format!(
            r#"{{"iss":{},"aud":{},"iat":{now_s},"exp":{},"jti":"{}""#,
            quote(&self.client_id),
            quote(&self.token_url),
            now_s.saturating_add(ASSERTION_LIFETIME_S),
            URL_SAFE_NO_PAD.encode(jti)
        );
        claims.push_str(&format!(r#","sub":{}"#, quote(sub)));
        if self.method == Method::JwtBearer {
            if let Some(scope) = &self.scope {
                claims.push_str(&format!(r#","scope":{}"#, quote(scope)));
            }
        }
        claims.push('}');
        let encode = |json: String| URL_SAFE_NO_PAD.encode(json);
        let signing_input = format!("{}.{}", encode(header), encode(claims));
        let signature = self.sign(signing_input.as_bytes())?;
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }

    fn sign(&self, input: &[u8]) -> Result<Vec<u8>, BuildError> {
        match (self.key.as_ref().ok_or(BuildError("no key"))?, self.alg) {
            (SigningKey::Rsa(key), SigningAlg::Rs256) => {
                let digest = sha2::Sha256::digest(input);
                key.sign(rsa::Pkcs1v15Sign::new::<sha2::Sha256>(), &digest)
                    .map_err(|_| BuildError("RSA signing failed"))
            }
            (SigningKey::Rsa(key), _) => {
                let digest = sha2::Sha384::digest(input);
                key.sign(rsa::Pkcs1v15Sign::new::<sha2::Sha384>(), &digest)
                    .map_err(|_| BuildError("RSA signing failed"))
            }
            #[cfg(feature = "p384-pure-rust")]
            (SigningKey::P384(key), _) => {
                use p384::ecdsa::signature::Signer;
                let signature: p384::ecdsa::Signature =
                    key.try_sign(input).map_err(|_| BuildError("ECDSA signing failed"))?;
                Ok(signature.to_bytes().to_vec())
            }
        }
    }
}

/// An access token and when it must be renewed, ms since the epoch.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// The whole `Authorization` value (`Bearer <token>`).
    pub header: String,
    /// Used until then (a margin before its expiry).
    pub usable_until_ms: u64,
    /// Renewed from then on.
    pub refresh_at_ms: u64,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("usable_until_ms", &self.usable_until_ms)
            .field("refresh_at_ms", &self.refresh_at_ms)
            .finish_non_exhaustive()
    }
}

/// Why a token response was not a token: safe to log. It holds the HTTP status, the authorization server's
/// `error` code when that is a well-formed OAuth error code (see [`oauth_error_code`]), field names and
/// phrases of our own: never a byte of the body otherwise (no `error_description`, no access token, no echo of
/// the posted form with its `client_secret`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenError(pub String);

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest `error` code logged: RFC 6749's codes are at most 25 characters (`unsupported_grant_type`), and a
/// token or a secret is longer than this.
pub const MAX_ERROR_CODE_CHARS: usize = 40;

/// An OAuth `error` code fit to log: RFC 6749 §5.2 allows only %x20-21 / %x23-5B / %x5D-7E in it, and §8.5
/// registers extension codes as `1*name-char` (`name-char = "-" / "." / "_" / DIGIT / ALPHA`); we accept that
/// stricter grammar (no spaces: a phrase is a description, not a code) up to [`MAX_ERROR_CODE_CHARS`].
/// Anything else is not a code and is not logged.
pub fn oauth_error_code(error: &str) -> Option<&str> {
    let well_formed = !error.is_empty()
        && error.len() <= MAX_ERROR_CODE_CHARS
        && error.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    well_formed.then_some(error)
}

/// Envoy's own answers to a callout whose upstream failed (its local replies): recognised by their fixed
/// first words and logged as those words only, never as the body that came.
const ENVOY_LOCAL_REPLIES: [&str; 4] = [
    "upstream connect error or disconnect/reset before headers",
    "upstream request timeout",
    "no healthy upstream",
    "upstream reset before response started",
];

/// Reads a token endpoint's answer (`status`: its HTTP status) received at `now_ms`.
pub fn parse_token_response(status: u32, body: &[u8], now_ms: u64) -> Result<Token, TokenError> {
    use serde_json::Value;
    // Read as a `Value` (the module already has that code; a derived struct would add its own).
    let answer: Option<Value> = serde_json::from_slice(body).ok();
    let text = |name: &str| answer.as_ref().and_then(|a| a.get(name)).and_then(Value::as_str);
    if status != 200 {
        let detail = match text("error") {
            Some(error) => match oauth_error_code(error) {
                Some(code) => format!(": {code}"),
                None => ": an `error` that is not an RFC 6749 error code (not shown)".to_string(),
            },
            // Not an OAuth error answer: Envoy's own when the server is down ("upstream connect error …",
            // "upstream request timeout"), named by its fixed words; anything else is not shown.
            None => match ENVOY_LOCAL_REPLIES.iter().find(|phrase| body.starts_with(phrase.as_bytes())) {
                Some(phrase) => format!(" ({phrase})"),
                None if body.is_empty() => String::new(),
                None => " (not an OAuth error answer; body not shown)".to_string(),
            },
        };
        return Err(TokenError(format!("HTTP status {status}{detail}")));
    }
    if !answer.as_ref().is_some_and(Value::is_object) {
        return Err(TokenError("the answer is not a JSON token response".into()));
    }
    let token = text("access_token").ok_or_else(|| TokenError("the answer has no access_token".into()))?;
    if token.is_empty() || token.len() > MAX_ACCESS_TOKEN_BYTES || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError(format!(
            "the access_token is empty, longer than {MAX_ACCESS_TOKEN_BYTES} bytes or not printable"
        )));
    }
    match answer.as_ref().and_then(|a| a.get("token_type")) {
        None => {}
        Some(Value::String(kind)) if kind.eq_ignore_ascii_case("bearer") => {}
        Some(_) => return Err(TokenError("token_type is not Bearer".into())),
    }
    let expires_in_s = match answer.as_ref().and_then(|a| a.get("expires_in")) {
        None => DEFAULT_EXPIRES_IN_S,
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| TokenError("expires_in is not a whole number".into()))?,
        // Some servers (Entra's v1 endpoint) send it as a string.
        Some(Value::String(s)) => s.parse().map_err(|_| TokenError("expires_in is not a number".into()))?,
        Some(_) => return Err(TokenError("expires_in is not a number".into())),
    };
    if expires_in_s == 0 {
        return Err(TokenError("expires_in is 0".into()));
    }
    let lifetime_ms = expires_in_s.min(86_400).saturating_mul(1000);
    // Stop using it a little before it expires, so that it does not expire on the way: a tenth of its life
    // plus a second (a JWT's `exp` is in whole seconds, its `iat` rounded down), at most 30 s, and never
    // more than half its life.
    let margin_ms = (lifetime_ms / 10 + 1_000).min(30_000).min(lifetime_ms / 2);
    let usable_ms = lifetime_ms - margin_ms;
    Ok(Token {
        header: format!("Bearer {token}"),
        usable_until_ms: now_ms.saturating_add(usable_ms),
        // Renewed at 80 % of the time it is used, so that the renewal has the rest to come back in.
        refresh_at_ms: now_ms.saturating_add(usable_ms.saturating_mul(REFRESH_AT_PER_MILLE) / 1000),
    })
}

/// First wait after a failed token request; it doubles up to [`MAX_RETRY_MS`].
pub const FIRST_RETRY_MS: u64 = 1_000;
/// Longest wait between token requests after failures.
pub const MAX_RETRY_MS: u64 = 30_000;
// Extra time a fetch may take beyond its timeout before it is given up as lost (a host that drops the
// answer of a call whose request went away): the same grace as a key set's or the registry's fetch.
use crate::refresh::LOST_FETCH_GRACE_MS;

/// One tenant's token state in one VM.
///
/// A token request for requests that wait is sent at once, from the first waiter's own context (fastest);
/// a renewal, and a request whose sender went away while others wait, is left to the timer
/// ([`TokenSlot::due`]): a host may cancel a call when the request that sent it ends, and a renewal's
/// request goes on at once.
#[derive(Debug)]
pub struct TokenSlot {
    /// The tenant's id.
    pub tenant: String,
    pub client: Arc<OAuthClient>,
    token: Option<Token>,
    /// The fetch under way, if one is: its number and when it is given up as lost.
    in_flight: Option<(u32, u64)>,
    /// The request (context id) whose context sent the fetch under way, if a request did.
    owner: Option<u32>,
    /// Numbers the fetches (an answer to any but the one under way is ignored).
    fetches: u32,
    /// The token is due for renewal: the timer sends the request.
    refresh_wanted: bool,
    /// No fetch before then (after failures).
    retry_at_ms: u64,
    failures: u32,
    /// Requests (context ids) waiting for a token.
    pub waiting: Vec<u32>,
    /// Counts the tokens installed: which one a request was sent with.
    serial: u64,
    /// The fetching router's number ([`TokenAnswer::serial`]) of the token last installed from it (0: none).
    origin: u64,
}

/// What a request of this tenant does about its upstream token.
#[derive(Debug, PartialEq, Eq)]
pub enum Access {
    /// Send it with [`TokenSlot::header`] (a renewal, if due, is the timer's to send).
    Use,
    /// Wait for the token; `fetch`: send the token request now (none is under way).
    Wait { fetch: bool },
    /// Too many wait already.
    Full,
    /// No usable token and none to come before `retry_after_s`.
    Unavailable { retry_after_s: u64 },
}

/// What became of a finished token fetch.
#[derive(Debug, PartialEq, Eq)]
pub enum Settled {
    /// A token, installed. `refreshed`: it replaced one still usable.
    Installed { refreshed: bool },
    /// It failed: `kept` the usable token there is; `first`: the first failure of a streak.
    Failed { kept: bool, first: bool, retry_in_ms: u64 },
    /// Not the fetch under way (given up, or for an older client configuration): ignored.
    Stale,
}

impl TokenSlot {
    pub fn new(tenant: &str, client: Arc<OAuthClient>) -> Self {
        Self {
            tenant: tenant.to_string(),
            client,
            token: None,
            in_flight: None,
            owner: None,
            fetches: 0,
            refresh_wanted: false,
            retry_at_ms: 0,
            failures: 0,
            waiting: Vec::new(),
            serial: 0,
            origin: 0,
        }
    }

    /// The tenant's client configuration (it may have changed with a registry reload): a different one
    /// drops the token (it was issued to the old client) and the fetch under way (its answer is ignored;
    /// the timer asks again for whoever waits).
    pub fn update(&mut self, client: &Arc<OAuthClient>) {
        if self.client.fingerprint != client.fingerprint {
            self.client = Arc::clone(client);
            self.token = None;
            self.in_flight = None;
            self.owner = None;
            self.refresh_wanted = false;
            self.retry_at_ms = 0;
            self.failures = 0;
        }
    }

    /// The `Authorization` value to send (after [`Access::Use`]).
    pub fn header(&self) -> Option<&str> {
        self.token.as_ref().map(|t| t.header.as_str())
    }

    /// The number of the fetch under way (for its target), 0 if none.
    pub fn fetch_number(&self) -> u32 {
        self.in_flight.map_or(0, |(n, _)| n)
    }

    fn usable(&self, now_ms: u64) -> Option<&Token> {
        self.token.as_ref().filter(|t| now_ms < t.usable_until_ms)
    }

    fn in_flight(&mut self, now_ms: u64) -> bool {
        match self.in_flight {
            Some((_, until)) if now_ms < until => true,
            Some(_) => {
                // Lost: no answer came (the host dropped it). Counts as a failure.
                self.in_flight = None;
                self.owner = None;
                self.fail(now_ms);
                false
            }
            None => false,
        }
    }

    fn start(&mut self, now_ms: u64, owner: Option<u32>) {
        let until = now_ms.saturating_add(self.client.timeout_ms).saturating_add(LOST_FETCH_GRACE_MS);
        self.fetches = self.fetches.wrapping_add(1).max(1);
        self.in_flight = Some((self.fetches, until));
        self.owner = owner;
        self.refresh_wanted = false;
    }

    /// A request needs the token at `now_ms`. `may_wait`: it may wait for one (not after waiting once).
    /// A returned `fetch` means the caller sends the token request now (the slot counts it as under way).
    pub fn access(&mut self, context_id: u32, now_ms: u64, may_wait: bool) -> Access {
        let in_flight = self.in_flight(now_ms);
        let may_fetch = !in_flight && now_ms >= self.retry_at_ms;
        if self.usable(now_ms).is_some() {
            if !in_flight && self.token.as_ref().is_some_and(|t| now_ms >= t.refresh_at_ms) {
                self.refresh_wanted = true;
            }
            return Access::Use;
        }
        if !in_flight && !may_fetch || !may_wait {
            let retry_after_s = self.retry_at_ms.saturating_sub(now_ms).div_ceil(1000).max(1);
            return Access::Unavailable { retry_after_s };
        }
        if self.waiting.len() >= self.client.max_waiting {
            return Access::Full;
        }
        self.waiting.push(context_id);
        if !in_flight {
            self.start(now_ms, Some(context_id));
        }
        Access::Wait { fetch: !in_flight }
    }

    /// On the timer: whether to send a token request now (the slot then counts it as under way): a renewal
    /// is due, or requests wait and no request is under way (its sender went away, or the client changed).
    pub fn due(&mut self, now_ms: u64) -> bool {
        if self.in_flight(now_ms) || now_ms < self.retry_at_ms || !self.refresh_wanted && self.waiting.is_empty() {
            return false;
        }
        self.start(now_ms, None);
        true
    }

    /// The request `context_id` went away: if its context sent the fetch under way, that fetch is given up
    /// (a host may cancel it), and the timer asks again for the others that wait.
    pub fn gone(&mut self, context_id: u32) {
        self.waiting.retain(|&id| id != context_id);
        if self.owner == Some(context_id) {
            self.owner = None;
            self.in_flight = None;
        }
    }

    /// Whether a fetch was under way and is now given up as lost (no answer within its timeout and grace):
    /// it is settled as failed.
    pub fn check_lost(&mut self, now_ms: u64) -> bool {
        let was = self.in_flight.is_some();
        was && !self.in_flight(now_ms)
    }

    fn fail(&mut self, now_ms: u64) -> Settled {
        self.failures = self.failures.saturating_add(1);
        let exp = self.failures.saturating_sub(1).min(5);
        let retry_in_ms = (FIRST_RETRY_MS << exp).min(MAX_RETRY_MS);
        self.retry_at_ms = now_ms.saturating_add(retry_in_ms);
        Settled::Failed { kept: self.usable(now_ms).is_some(), first: self.failures == 1, retry_in_ms }
    }

    /// The fetch numbered `fetch` ended with `outcome` at `now_ms`.
    pub fn settle(&mut self, fetch: u32, outcome: Result<Token, TokenError>, now_ms: u64) -> Settled {
        if self.in_flight.map(|(n, _)| n) != Some(fetch) {
            return Settled::Stale;
        }
        self.in_flight = None;
        self.owner = None;
        match outcome {
            Ok(token) => {
                let refreshed = self.usable(now_ms).is_some();
                self.token = Some(token);
                self.serial = self.serial.wrapping_add(1);
                self.failures = 0;
                self.retry_at_ms = 0;
                Settled::Installed { refreshed }
            }
            Err(_) => self.fail(now_ms),
        }
    }

    /// Which token [`TokenSlot::header`] is (for [`TokenSlot::refused`]).
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// Drops the token if it is still the one numbered `serial` (the upstream refused it): the next request
    /// fetches anew. Returns whether it was.
    pub fn refused(&mut self, serial: u64) -> bool {
        if self.token.is_some() && self.serial == serial {
            self.token = None;
            return true;
        }
        false
    }

    /// Takes the waiting requests (to be woken).
    pub fn take_waiting(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.waiting)
    }

    /// Number of consecutive failures.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// What a router that fetches a tenant's tokens for other routers (the dynamic module's main thread, for
/// its workers) hands them after a fetch: the new token, or the failure and when to try again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenNews {
    /// A new token (it replaces theirs).
    Token(Token),
    /// The fetch failed: no fetch before `retry_at_ms`; a usable token in hand is kept.
    Failed { retry_at_ms: u64 },
}

/// [`TokenNews`] of one tenant, for the client configuration whose `fingerprint` it was fetched with (a
/// router with another configuration of that tenant ignores it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenAnswer {
    pub tenant: String,
    pub fingerprint: u64,
    pub news: TokenNews,
    /// The fetching router's number of the token (its [`TokenSlot::serial`]; 0 with a failure): a router
    /// asks for a new token naming the one it has ([`TokenSlot::origin`]), and an answer it already
    /// installed changes nothing.
    pub serial: u64,
}

impl TokenSlot {
    /// The answer to publish for this slot's current state: its token if `installed`, else its failure.
    pub fn answer(&self, installed: bool) -> TokenAnswer {
        let (news, serial) = match (&self.token, installed) {
            (Some(token), true) => (TokenNews::Token(token.clone()), self.serial),
            _ => (TokenNews::Failed { retry_at_ms: self.retry_at_ms }, 0),
        };
        TokenAnswer { tenant: self.tenant.clone(), fingerprint: self.client.fingerprint, news, serial }
    }

    /// The fetching router's number of the token this slot last installed from it (0: none), which this
    /// router names when it asks for a new one ([`TokenSlot::want`]).
    pub fn origin(&self) -> u64 {
        self.origin
    }

    /// Installs what another router fetched (see [`TokenNews`]), whatever fetch this slot counts as under
    /// way: that one (this router's own request for it) is over, and so is every wait here: the fetching
    /// router wakes the waiting requests with its answer (each is decided again; none is a reason to ask
    /// again). Ignored if the client configuration differs, or if it is the token installed already (handed
    /// on again for a router that asked late).
    pub fn install(&mut self, answer: &TokenAnswer) {
        if answer.fingerprint != self.client.fingerprint {
            return;
        }
        if answer.serial != 0 && answer.serial == self.origin && self.token.is_some() {
            return;
        }
        self.waiting.clear();
        self.in_flight = None;
        self.owner = None;
        self.refresh_wanted = false;
        match &answer.news {
            TokenNews::Token(token) => {
                self.token = Some(token.clone());
                self.serial = self.serial.wrapping_add(1);
                self.origin = answer.serial;
                self.failures = 0;
                self.retry_at_ms = 0;
            }
            TokenNews::Failed { retry_at_ms } => {
                self.failures = self.failures.saturating_add(1);
                self.retry_at_ms = *retry_at_ms;
            }
        }
    }

    /// Another router asks for a new token at `now_ms` (it has none, it is due for renewal, or its upstream
    /// refused it), naming the one it has (`have`: its [`TokenSlot::origin`]): `None` if a fetch will answer
    /// it (one is under way, or the timer sends one now); else the answer to hand on at once: a token newer
    /// than `have` and not yet due for renewal (fetched since it asked: no second fetch), or the failure (no
    /// fetch before `retry_at_ms`).
    pub fn want(&mut self, have: u64, now_ms: u64) -> Option<TokenAnswer> {
        if self.in_flight(now_ms) {
            return None;
        }
        if self.serial > have && self.token.as_ref().is_some_and(|t| now_ms < t.refresh_at_ms) {
            return Some(self.answer(true));
        }
        if now_ms < self.retry_at_ms {
            return Some(self.answer(false));
        }
        self.refresh_wanted = true;
        None
    }
}

/// The token slots of one VM, one per tenant with `upstream_auth` that has had a request, by a small id
/// (a fetch's target names it).
#[derive(Debug, Default)]
pub struct TokenSlots {
    ids: std::collections::HashMap<String, u32>,
    slots: Vec<TokenSlot>,
}

impl TokenSlots {
    /// The slot of `tenant`, made on its first request, with `client` (the tenant's configuration now).
    /// (Always `Some`: a slot is made for every id.)
    pub fn slot(&mut self, tenant: &str, client: &Arc<OAuthClient>) -> Option<(u32, &mut TokenSlot)> {
        let id = match self.ids.get(tenant) {
            Some(&id) => id,
            None => {
                let id = u32::try_from(self.slots.len()).ok()?;
                self.slots.push(TokenSlot::new(tenant, Arc::clone(client)));
                self.ids.insert(tenant.to_string(), id);
                id
            }
        };
        let slot = self.get_mut(id)?;
        slot.update(client);
        Some((id, slot))
    }

    /// The slot of `tenant`, if it has one.
    pub fn of(&mut self, tenant: &str) -> Option<(u32, &mut TokenSlot)> {
        let id = *self.ids.get(tenant)?;
        Some((id, self.get_mut(id)?))
    }

    /// The slot with this id.
    pub fn get_mut(&mut self, id: u32) -> Option<&mut TokenSlot> {
        self.slots.get_mut(usize::try_from(id).ok()?)
    }

    /// Every slot, with its id.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (u32, &mut TokenSlot)> {
        self.slots.iter_mut().enumerate().map(|(i, s)| (u32::try_from(i).unwrap_or(u32::MAX), s))
    }
}

/// Fills `buf` with random bytes from the operating system (WASI `random_get` inside Envoy's wasm VM).
pub fn fill_random(buf: &mut [u8]) -> bool {
    getrandom::getrandom(buf).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TOKEN_URL: &str = "https://login.example.com/tenant/oauth2/v2.0/token";

    fn raw(v: serde_json::Value) -> RawUpstreamAuth {
        serde_json::from_value(v).unwrap()
    }

    fn env(name: &str) -> Option<String> {
        match name {
            "SECRET" => Some("s3cr&t =".into()),
            "RSA_KEY" => Some(crate::testkeys::rsa_private_pem()),
            _ => None,
        }
    }

    fn basic() -> serde_json::Value {
        json!({"method": "client_secret_basic", "token_url": TOKEN_URL, "cluster": "entra",
               "client_id": "app id", "client_secret": {"env": "SECRET"},
               "scope": "https://fhir.example.azurehealthcareapis.com/.default"})
    }

    fn form_of(body: &str) -> Vec<(String, String)> {
        body.split('&')
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap();
                let dec = |s: &str| {
                    let s = s.replace('+', " ");
                    let mut out = Vec::new();
                    let b = s.as_bytes();
                    let mut i = 0;
                    while i < b.len() {
                        if b[i] == b'%' {
                            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                            i += 3;
                        } else {
                            out.push(b[i]);
                            i += 1;
                        }
                    }
                    String::from_utf8(out).unwrap()
                };
                (dec(k), dec(v))
            })
            .collect()
    }

    fn value<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
        form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn no_random(_: &mut [u8]) -> bool {
        false
    }

    #[test]
    fn client_secret_basic_sends_the_encoded_pair_in_basic_and_nothing_secret_in_the_form() {
        let c = compile("t.upstream_auth", &raw(basic()), &env).unwrap();
        assert_eq!((c.authority.as_str(), c.path.as_str()), ("login.example.com", "/tenant/oauth2/v2.0/token"));
        let r = c.token_request(1_700_000_000, &mut no_random).unwrap();
        let basic = r.authorization.unwrap();
        let decoded = String::from_utf8(STANDARD.decode(basic.strip_prefix("Basic ").unwrap()).unwrap()).unwrap();
        assert_eq!(decoded, "app+id:s3cr%26t+%3D");
        let f = form_of(&r.body);
        assert_eq!(value(&f, "grant_type"), Some("client_credentials"));
        assert_eq!(value(&f, "scope"), Some("https://fhir.example.azurehealthcareapis.com/.default"));
        assert!(!r.body.contains("s3cr"));
        assert!(!format!("{c:?}").contains("s3cr"));
    }

    #[test]
    fn client_secret_post_puts_id_and_secret_in_the_form_with_resource_and_audience() {
        let mut v = basic();
        v["method"] = json!("client_secret_post");
        v["resource"] = json!("https://fhir.example/");
        v["audience"] = json!("fhir-a");
        let c = compile("t", &raw(v), &env).unwrap();
        let r = c.token_request(0, &mut no_random).unwrap();
        assert!(r.authorization.is_none());
        let f = form_of(&r.body);
        assert_eq!(value(&f, "client_id"), Some("app id"));
        assert_eq!(value(&f, "client_secret"), Some("s3cr&t ="));
        assert_eq!(value(&f, "resource"), Some("https://fhir.example/"));
        assert_eq!(value(&f, "audience"), Some("fhir-a"));
    }

    fn claims_of(jwt: &str) -> (serde_json::Value, serde_json::Value) {
        let mut parts = jwt.split('.');
        let h = URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap();
        let c = URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap();
        (serde_json::from_slice(&h).unwrap(), serde_json::from_slice(&c).unwrap())
    }

    #[test]
    fn private_key_jwt_signs_an_rs384_assertion_for_the_token_url_with_a_fresh_jti() {
        use jwt_simple::prelude::*;
        let v = json!({"method": "private_key_jwt", "token_url": TOKEN_URL, "cluster": "epic",
                       "client_id": "epic-client", "private_key": {"env": "RSA_KEY"}, "key_id": "k1",
                       "scope": "system/Patient.rs"});
        let c = compile("t", &raw(v), &env).unwrap();
        let mut n = 0u8;
        let mut random = |b: &mut [u8]| {
            n += 1;
            b.fill(n);
            true
        };
        let now = i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs())
            .unwrap();
        let r1 = c.token_request(now, &mut random).unwrap();
        let r2 = c.token_request(now, &mut random).unwrap();
        let f1 = form_of(&r1.body);
        assert_eq!(value(&f1, "client_assertion_type"), Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer"));
        assert_eq!(value(&f1, "scope"), Some("system/Patient.rs"));
        let a1 = value(&f1, "client_assertion").unwrap();
        let (h, claims) = claims_of(a1);
        assert_eq!(h, json!({"alg": "RS384", "typ": "JWT", "kid": "k1"}));
        assert_eq!(claims["iss"], "epic-client");
        assert_eq!(claims["sub"], "epic-client");
        assert_eq!(claims["aud"], TOKEN_URL);
        assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 300);
        let a2 = value(&form_of(&r2.body), "client_assertion").unwrap().to_string();
        assert_ne!(claims["jti"], claims_of(&a2).1["jti"]);
        // The signature verifies with the public key (an independent implementation).
        let public = RS384PublicKey::from_pem(&crate::testkeys::rsa_public_pem()).unwrap();
        public.verify_token::<NoCustomClaims>(a1, None).unwrap();
        // No randomness, no assertion.
        assert_eq!(c.token_request(0, &mut no_random).err(), Some(BuildError("no randomness for the assertion's jti")));
    }

    #[test]
    fn jwt_bearer_is_the_grant_with_rs256_by_default_and_scope_in_the_assertion() {
        let v = json!({"method": "jwt_bearer", "token_url": "https://oauth2.googleapis.com/token", "cluster": "google",
                       "client_id": "router@project.iam.gserviceaccount.com", "private_key": {"env": "RSA_KEY"},
                       "scope": "https://www.googleapis.com/auth/cloud-healthcare"});
        let c = compile("t", &raw(v), &env).unwrap();
        let r = c
            .token_request(100, &mut |b: &mut [u8]| {
                b.fill(7);
                true
            })
            .unwrap();
        let f = form_of(&r.body);
        assert_eq!(value(&f, "grant_type"), Some("urn:ietf:params:oauth:grant-type:jwt-bearer"));
        let (h, claims) = claims_of(value(&f, "assertion").unwrap());
        assert_eq!(h["alg"], "RS256");
        assert_eq!(claims["iss"], "router@project.iam.gserviceaccount.com");
        assert_eq!(claims["scope"], "https://www.googleapis.com/auth/cloud-healthcare");
        // RFC 7523 §3, item 2: "The JWT MUST contain a "sub" (subject) claim"; without `subject` configured,
        // the service account itself (as Google's own libraries do: `sub` = `iss` = the account's email).
        assert_eq!(claims["sub"], "router@project.iam.gserviceaccount.com");
        assert_eq!(claims["aud"], "https://oauth2.googleapis.com/token");
        assert!(h.get("kid").is_none(), "no key id known");
        // `subject` set (domain-wide delegation: the user acted for): it is the `sub`.
        let mut v = json!({"method": "jwt_bearer", "token_url": "https://oauth2.googleapis.com/token",
                           "cluster": "google", "client_id": "router@project.iam.gserviceaccount.com",
                           "private_key": {"env": "RSA_KEY"}, "subject": "admin@example.org"});
        let c = compile("t", &raw(v.clone()), &env).unwrap();
        let r = c
            .token_request(100, &mut |b: &mut [u8]| {
                b.fill(7);
                true
            })
            .unwrap();
        let (_, claims) = claims_of(value(&form_of(&r.body), "assertion").unwrap());
        assert_eq!(
            (claims["iss"].as_str(), claims["sub"].as_str()),
            (Some("router@project.iam.gserviceaccount.com"), Some("admin@example.org"))
        );
        // RFC 7515 §4.1.4 / RFC 7523: the `kid` names the key the server should check with; a configured
        // key_id wins over the file's.
        v["key_id"] = json!("configured-kid");
        let c = compile("t", &raw(v), &env).unwrap();
        let r = c
            .token_request(100, &mut |b: &mut [u8]| {
                b.fill(7);
                true
            })
            .unwrap();
        let (h, _) = claims_of(value(&form_of(&r.body), "assertion").unwrap());
        assert_eq!(h["kid"], "configured-kid");
    }

    /// A Google service-account key file's `private_key_id` is the `kid` of the JWT-bearer assertion (the
    /// key Google checks it with, RFC 7515 §4.1.4), and `sub` defaults to the account (RFC 7523 §3).
    #[test]
    fn a_service_account_files_private_key_id_is_the_assertions_kid() {
        let sa = json!({"type": "service_account", "private_key_id": "0123456789abcdef0123456789abcdef01234567",
                        "client_email": "sa@p.iam.gserviceaccount.com",
                        "private_key": crate::testkeys::rsa_private_pem()})
        .to_string();
        let lookup = move |name: &str| (name == "SA_KEY").then(|| sa.clone());
        let v = json!({"method": "jwt_bearer", "token_url": TOKEN_URL, "cluster": "g",
                       "client_id": "sa@p.iam.gserviceaccount.com", "private_key": {"env": "SA_KEY"}});
        let c = compile("t", &raw(v), &lookup).unwrap();
        let r = c
            .token_request(100, &mut |b: &mut [u8]| {
                b.fill(7);
                true
            })
            .unwrap();
        let (h, claims) = claims_of(value(&form_of(&r.body), "assertion").unwrap());
        assert_eq!(h["kid"], "0123456789abcdef0123456789abcdef01234567");
        assert_eq!(claims["sub"], "sa@p.iam.gserviceaccount.com");
        assert_eq!(claims["iss"], "sa@p.iam.gserviceaccount.com");
    }

    #[test]
    fn a_service_account_json_file_gives_its_private_key() {
        let sa = json!({"type": "service_account", "private_key": crate::testkeys::rsa_private_pem()}).to_string();
        let lookup = move |name: &str| (name == "\0file:/etc/sa.json").then(|| sa.clone());
        let v = json!({"method": "jwt_bearer", "token_url": TOKEN_URL, "cluster": "g", "client_id": "sa",
                       "private_key": {"file": "/etc/sa.json"}});
        assert!(compile("t", &raw(v), &lookup).is_ok());
    }

    #[test]
    fn bad_configurations_name_the_field() {
        let field = |v: serde_json::Value| compile("t.upstream_auth", &raw(v), &env).unwrap_err().field;
        let mut v = basic();
        v["method"] = json!("mtls");
        assert_eq!(field(v), "t.upstream_auth.method");
        let mut v = basic();
        v["token_url"] = json!("login.example.com/token");
        assert_eq!(field(v), "t.upstream_auth.token_url");
        let mut v = basic();
        v["client_secret"] = json!({"env": "MISSING"});
        assert_eq!(field(v), "t.upstream_auth.client_secret.env");
        let mut v = basic();
        v["client_secret"] = json!({"file": "/nope"});
        let e = compile("t.upstream_auth", &raw(v), &env).unwrap_err();
        assert_eq!(e.field, "t.upstream_auth.client_secret.file");
        assert!(e.message.contains("proxy-wasm build cannot read files"), "{e}");
        let mut v = basic();
        v["client_secret"] = json!({"env": "SECRET", "file": "/x"});
        assert_eq!(field(v), "t.upstream_auth.client_secret");
        let mut v = basic();
        v.as_object_mut().unwrap().remove("client_secret");
        assert_eq!(field(v), "t.upstream_auth.client_secret");
        let mut v = basic();
        v["signing_alg"] = json!("RS384");
        assert_eq!(field(v), "t.upstream_auth.signing_alg");
        let mut v = basic();
        v["timeout_ms"] = json!(10);
        assert_eq!(field(v), "t.upstream_auth.timeout_ms");
        let v = json!({"method": "private_key_jwt", "token_url": TOKEN_URL, "cluster": "c", "client_id": "x",
                       "private_key": {"env": "SECRET"}});
        assert_eq!(field(v), "t.upstream_auth.private_key");
        let v = json!({"method": "private_key_jwt", "token_url": TOKEN_URL, "cluster": "c", "client_id": "x",
                       "private_key": {"env": "RSA_KEY"}, "signing_alg": "ES384"});
        assert_eq!(field(v), "t.upstream_auth.signing_alg");
        let v = json!({"method": "private_key_jwt", "token_url": TOKEN_URL, "cluster": "c", "client_id": "x",
                       "private_key": {"env": "RSA_KEY"}, "subject": "s"});
        assert_eq!(field(v), "t.upstream_auth.subject");
    }

    /// Issue 24: no byte of a token endpoint's answer reaches a log line but a well-formed OAuth `error` code
    /// (RFC 6749 §5.2: `error` is "a single ASCII error code"; §8.5: `error-name = 1*name-char`). Each path
    /// is fed a canary where a credential would be.
    #[test]
    fn token_errors_never_carry_a_body_a_token_a_form_or_a_description() {
        const CANARY: &str = "CANARY-9f3e7a1c-secret";
        let bodies: Vec<(u32, String)> = vec![
            // An answer carrying an access token, with a non-200 status and no `error`.
            (502, format!(r#"{{"access_token":"{CANARY}","token_type":"Bearer"}}"#)),
            // An error page echoing the posted form.
            (400, format!("grant_type=client_credentials&client_id=x&client_secret={CANARY}")),
            (400, format!("<html>client_secret={CANARY}</html>")),
            // A description echoing the secret.
            (401, format!(r#"{{"error":"invalid_client","error_description":"secret {CANARY} is wrong"}}"#)),
            // An `error` that is not a code: a sentence, a token, a secret longer than any code.
            (401, format!(r#"{{"error":"the secret {CANARY} is wrong"}}"#)),
            (401, format!(r#"{{"error":"{CANARY}{CANARY}"}}"#)),
            (401, format!(r#"{{"error":"{CANARY}\n"}}"#)),
            // Envoy's own local reply, with something appended by a server imitating it.
            (503, format!("upstream connect error or disconnect/reset before headers. {CANARY}")),
            // A 200 whose token_type is not Bearer (the value is the server's, maybe the token).
            (200, format!(r#"{{"access_token":"x","token_type":"{CANARY}"}}"#)),
            (200, format!(r#"{{"access_token":"{CANARY} x"}}"#)),
            (200, format!(r#"{{"access_token":"x","expires_in":"{CANARY}"}}"#)),
        ];
        for (status, body) in &bodies {
            let e = parse_token_response(*status, body.as_bytes(), 0).unwrap_err();
            assert!(!e.0.contains("CANARY") && !e.0.contains("secret"), "{status} {body}: {}", e.0);
        }
        assert_eq!(
            parse_token_response(401, format!(r#"{{"error":"{CANARY}{CANARY}"}}"#).as_bytes(), 0).unwrap_err().0,
            "HTTP status 401: an `error` that is not an RFC 6749 error code (not shown)"
        );
        // RFC 6749's own codes (§5.2) and a registered extension code (§8.5) are logged.
        for code in [
            "invalid_request",
            "invalid_client",
            "invalid_grant",
            "unauthorized_client",
            "unsupported_grant_type",
            "invalid_scope",
            "temporarily_unavailable",
            "invalid_target",
        ] {
            assert_eq!(oauth_error_code(code), Some(code));
        }
        for not_code in ["", "invalid client", "a\"b", "é", "x\u{7f}", &"e".repeat(MAX_ERROR_CODE_CHARS + 1)] {
            assert_eq!(oauth_error_code(not_code), None, "{not_code:?}");
        }
    }

    #[test]
    fn token_responses_are_read_strictly_and_errors_carry_only_the_servers_code() {
        let t =
            parse_token_response(200, br#"{"access_token":"abc.def","token_type":"Bearer","expires_in":3600}"#, 1000)
                .unwrap();
        assert_eq!(t.header, "Bearer abc.def");
        assert_eq!(t.usable_until_ms, 1000 + 3_600_000 - 30_000);
        assert_eq!(t.refresh_at_ms, 1000 + 3_570_000 * 8 / 10);
        let t =
            parse_token_response(200, br#"{"access_token":"x","token_type":"bearer","expires_in":"10"}"#, 0).unwrap();
        assert_eq!((t.refresh_at_ms, t.usable_until_ms), (6_400, 8_000));
        let t = parse_token_response(200, br#"{"access_token":"x","expires_in":1}"#, 0).unwrap();
        assert_eq!((t.refresh_at_ms, t.usable_until_ms), (400, 500));
        let t = parse_token_response(200, br#"{"access_token":"x"}"#, 0).unwrap();
        assert_eq!(t.usable_until_ms, 300_000 - 30_000 - 1_000 + 1_000);
        for bad in [
            &br#"{"token_type":"Bearer"}"#[..],
            br#"{"access_token":"a b"}"#,
            br#"{"access_token":""}"#,
            br#"{"access_token":"x","token_type":"DPoP"}"#,
            br#"{"access_token":"x","expires_in":0}"#,
            br#"{"access_token":"x","expires_in":-5}"#,
            br#"{"access_token":"x","expires_in":[1]}"#,
            b"not json",
        ] {
            assert!(parse_token_response(200, bad, 0).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let e = parse_token_response(401, br#"{"error":"invalid_client","error_description":"bad\nsecret"}"#, 0);
        assert_eq!(e.unwrap_err().0, "HTTP status 401: invalid_client");
        assert_eq!(parse_token_response(503, b"", 0).unwrap_err().0, "HTTP status 503");
        assert_eq!(
            parse_token_response(503, b"<html>", 0).unwrap_err().0,
            "HTTP status 503 (not an OAuth error answer; body not shown)"
        );
        assert_eq!(
            parse_token_response(504, b"upstream request timeout", 0).unwrap_err().0,
            "HTTP status 504 (upstream request timeout)"
        );
    }

    fn slot(max_waiting: usize) -> TokenSlot {
        let mut v = basic();
        v["max_waiting"] = json!(max_waiting);
        TokenSlot::new("t", Arc::new(compile("t", &raw(v), &env).unwrap()))
    }

    fn header(s: &mut TokenSlot, id: u32, now: u64) -> String {
        assert_eq!(s.access(id, now, true), Access::Use);
        s.header().unwrap().to_string()
    }

    fn token(now: u64, lifetime_s: u64) -> Token {
        let body = format!(r#"{{"access_token":"tok{now}","expires_in":{lifetime_s}}}"#);
        parse_token_response(200, body.as_bytes(), now).unwrap()
    }

    /// A slot with a token of `lifetime_s` got at 0.
    fn with_token(lifetime_s: u64) -> TokenSlot {
        let mut s = slot(8);
        assert_eq!(s.access(1, 0, true), Access::Wait { fetch: true });
        assert_eq!(s.settle(s.fetch_number(), Ok(token(0, lifetime_s)), 0), Settled::Installed { refreshed: false });
        assert_eq!(s.take_waiting(), vec![1]);
        s
    }

    /// The dynamic module's split: the main thread's slot fetches, a worker's slot installs what it hands on.
    #[test]
    fn a_worker_installs_the_fetching_routers_token_and_failure_and_asks_again_only_when_due() {
        let (mut main, mut worker) = (slot(8), slot(8));
        // A request on the worker waits (its own fetch is counted as under way until an answer comes).
        assert_eq!(worker.access(1, 0, true), Access::Wait { fetch: true });
        // The main thread is asked: nothing under way there, so its timer sends the request now...
        assert_eq!(main.want(worker.origin(), 0), None);
        assert!(main.due(0));
        // ...and a second ask meanwhile (another worker) is answered by that same fetch.
        assert_eq!(main.want(worker.origin(), 10), None);
        assert!(!main.due(10));
        assert_eq!(main.settle(main.fetch_number(), Ok(token(100, 100)), 100), Settled::Installed { refreshed: false });
        let answer = main.answer(true);
        assert!(matches!(answer.news, TokenNews::Token(_)));
        worker.install(&answer);
        assert_eq!(worker.fetch_number(), 0, "the worker's own request is over");
        assert!(worker.take_waiting().is_empty(), "the main thread wakes it: no wait left to ask again for");
        assert!(!worker.due(150), "nothing to ask for");
        assert_eq!(header(&mut worker, 2, 200), "Bearer tok100");
        assert!(!worker.due(200), "nothing due before 80 % of its life");
        // Renewal due on the worker: asked once, then not again while the main thread fetches.
        assert_eq!(header(&mut worker, 3, 75_000), "Bearer tok100");
        assert!(worker.due(75_000));
        assert!(!worker.due(75_100));
        // The main thread's renewal fails: the worker keeps its usable token and asks no more before the retry.
        assert_eq!(main.want(worker.origin(), 75_000), None);
        assert!(main.due(75_000));
        assert!(matches!(
            main.settle(main.fetch_number(), Err(TokenError("x".into())), 75_100),
            Settled::Failed { kept: true, .. }
        ));
        let failed = main.answer(false);
        let TokenNews::Failed { retry_at_ms } = failed.news else { panic!("{failed:?}") };
        assert!(retry_at_ms > 75_100);
        worker.install(&failed);
        assert_eq!(header(&mut worker, 4, 75_200), "Bearer tok100");
        assert!(!worker.due(75_200), "not before the retry");
        // Asked during the back-off, the main thread answers at once with the failure.
        assert_eq!(main.want(worker.origin(), 75_200), Some(failed.clone()));
        // After expiry, a request that may not wait (woken once already) gets 503.
        assert!(matches!(worker.access(5, 90_000, false), Access::Unavailable { .. }));
        // An answer for another client configuration (a registry reload changed it) is ignored.
        let mut other = main.answer(true);
        other.fingerprint ^= 1;
        other.news = TokenNews::Token(token(200_000, 100));
        worker.install(&other);
        assert_ne!(worker.header(), Some("Bearer tok200000"));
    }

    #[test]
    fn the_first_request_fetches_later_ones_wait_bounded_and_all_are_woken() {
        let mut s = slot(2);
        assert_eq!(s.access(1, 0, true), Access::Wait { fetch: true });
        assert_eq!(s.access(2, 10, true), Access::Wait { fetch: false });
        assert_eq!(s.access(3, 20, true), Access::Full);
        assert!(!s.due(30), "a fetch is under way");
        assert_eq!(s.settle(s.fetch_number(), Ok(token(100, 100)), 100), Settled::Installed { refreshed: false });
        assert_eq!(s.take_waiting(), vec![1, 2]);
        assert_eq!(header(&mut s, 4, 200), "Bearer tok100");
        assert!(!s.due(300));
    }

    #[test]
    fn a_token_is_renewed_by_the_timer_at_80_percent_and_used_meanwhile() {
        let mut s = with_token(100);
        // Used until 89 s (a tenth of its life and a second before expiry), renewed from 80 % of that on.
        assert_eq!(header(&mut s, 2, 71_199), "Bearer tok0");
        assert!(!s.due(71_199));
        assert_eq!(header(&mut s, 3, 71_200), "Bearer tok0");
        assert!(s.due(71_300), "the request found it due: the timer sends the renewal");
        assert!(!s.due(71_400), "once");
        assert_eq!(header(&mut s, 4, 71_500), "Bearer tok0");
        assert_eq!(s.settle(s.fetch_number(), Ok(token(72_000, 100)), 72_000), Settled::Installed { refreshed: true });
        assert_eq!(header(&mut s, 5, 72_001), "Bearer tok72000");
    }

    #[test]
    fn when_the_server_fails_a_usable_token_is_kept_then_requests_get_unavailable_with_retry_after() {
        let mut s = with_token(100);
        assert_eq!(header(&mut s, 2, 80_000), "Bearer tok0");
        assert!(s.due(80_000));
        let failed = s.settle(s.fetch_number(), Err(TokenError("HTTP status 503".into())), 80_100);
        assert_eq!(failed, Settled::Failed { kept: true, first: true, retry_in_ms: 1_000 });
        // Kept, and retried after the backoff only.
        assert_eq!(header(&mut s, 3, 80_500), "Bearer tok0");
        assert!(!s.due(80_500));
        assert!(s.due(81_100));
        let failed = s.settle(s.fetch_number(), Err(TokenError("x".into())), 81_200);
        assert_eq!(failed, Settled::Failed { kept: true, first: false, retry_in_ms: 2_000 });
        assert_eq!(header(&mut s, 4, 88_000), "Bearer tok0");
        assert!(s.due(88_000));
        let failed = s.settle(s.fetch_number(), Err(TokenError("x".into())), 88_100);
        assert_eq!(failed, Settled::Failed { kept: true, first: false, retry_in_ms: 4_000 });
        // Past its usable time (89 s), within the backoff: 503.
        assert_eq!(s.access(6, 90_000, true), Access::Unavailable { retry_after_s: 3 });
        assert!(s.waiting.is_empty());
        // After the backoff a request waits for a new fetch, which fails: it is woken, and may not wait again.
        assert_eq!(s.access(7, 92_100, true), Access::Wait { fetch: true });
        let failed = s.settle(s.fetch_number(), Err(TokenError("x".into())), 92_200);
        assert_eq!(failed, Settled::Failed { kept: false, first: false, retry_in_ms: 8_000 });
        assert_eq!(s.take_waiting(), vec![7]);
        assert_eq!(s.access(7, 92_200, false), Access::Unavailable { retry_after_s: 8 });
    }

    #[test]
    fn a_lost_fetch_counts_as_failed_after_its_timeout() {
        let mut s = slot(8);
        assert_eq!(s.access(1, 0, true), Access::Wait { fetch: true });
        assert!(!s.check_lost(DEFAULT_TIMEOUT_MS));
        assert!(s.check_lost(DEFAULT_TIMEOUT_MS + LOST_FETCH_GRACE_MS));
        assert_eq!(s.failures(), 1);
    }

    #[test]
    fn when_the_request_that_sent_the_fetch_goes_away_the_timer_asks_again_for_the_others() {
        let mut s = slot(8);
        assert_eq!(s.access(1, 0, true), Access::Wait { fetch: true });
        let first = s.fetch_number();
        assert_eq!(s.access(2, 10, true), Access::Wait { fetch: false });
        s.gone(2);
        assert!(!s.due(20), "a waiter that did not send it changes nothing");
        s.gone(1);
        assert!(s.waiting.is_empty());
        assert!(!s.due(30), "nobody waits: nothing to ask for");
        assert_eq!(s.access(3, 40, true), Access::Wait { fetch: true });
        s.gone(3);
        assert_eq!(s.access(4, 50, true), Access::Wait { fetch: true });
        assert_eq!(s.access(5, 60, true), Access::Wait { fetch: false });
        s.gone(4);
        assert!(s.due(70), "5 still waits: the timer sends it");
        assert_eq!(s.settle(first, Ok(token(80, 100)), 80), Settled::Stale, "an answer to a given-up fetch");
        assert_eq!(s.settle(s.fetch_number(), Ok(token(90, 100)), 90), Settled::Installed { refreshed: false });
        assert_eq!(s.take_waiting(), vec![5]);
    }

    #[test]
    fn a_changed_client_drops_the_token_and_ignores_the_old_fetch() {
        let mut s = with_token(100);
        let mut v = basic();
        v["scope"] = json!("other");
        assert_eq!(s.access(2, 10, true), Access::Use);
        assert!(!s.due(10));
        s.update(&Arc::new(compile("t", &raw(v), &env).unwrap()));
        assert_eq!(s.access(2, 10, true), Access::Wait { fetch: true });
        let old = s.fetch_number();
        let mut v = basic();
        v["scope"] = json!("third");
        s.update(&Arc::new(compile("t", &raw(v), &env).unwrap()));
        assert_eq!(s.settle(old, Ok(token(20, 100)), 20), Settled::Stale);
        assert!(s.due(30), "request 2 still waits: the timer asks with the new client");
        assert_eq!(s.settle(s.fetch_number(), Ok(token(40, 100)), 40), Settled::Installed { refreshed: false });
        // The same configuration again changes nothing.
        let same = Arc::clone(&s.client);
        s.update(&same);
        assert_eq!(header(&mut s, 4, 50), "Bearer tok40");
        // The upstream refusing the token drops it (only if it is still the current one).
        let current = s.serial();
        assert!(!s.refused(current - 1));
        assert!(s.refused(current));
        assert_eq!(s.access(5, 60, true), Access::Wait { fetch: true });
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::strategy::Strategy;

    /// An authorization server's answer is untrusted: any bytes, any status, give a token or an error, never
    /// a panic; a token is always one header value, and an error line never holds a control character (it
    /// goes to Envoy's log) nor any run of the body's text but a well-formed error code. Each branch is
    /// counted: the test fails if the generator never reaches one it claims to check (issue 24: the success
    /// branch once ran 0 times in 256 cases, `token_type` being random letters).
    #[test]
    fn any_token_response_is_a_token_or_a_printable_error_and_every_branch_runs() {
        use proptest::test_runner::{Config, TestRunner};
        use std::cell::Cell;
        let token_type = proptest::prop_oneof![
            proptest::strategy::Just(None),
            proptest::strategy::Just(Some("Bearer".to_string())),
            proptest::strategy::Just(Some("bearer".to_string())),
            "[A-Za-z]{0,8}".prop_map(Some),
        ];
        let expires_in = proptest::prop_oneof![
            (0u64..100_000).prop_map(|n| n.to_string()),
            (0u64..1_000).prop_map(|n| format!(r#""{n}""#)),
            "[-0-9a-z\"]{0,12}",
        ];
        let token_body = ("[!-~]{0,40}", token_type, expires_in).prop_map(|(token, kind, expires)| {
            let token = token.replace(['"', '\\'], "");
            let kind = kind.map_or(String::new(), |k| format!(r#","token_type":"{k}""#));
            format!(r#"{{"access_token":"{token}"{kind},"expires_in":{expires}}}"#).into_bytes()
        });
        let strategy = (
            proptest::prop_oneof![proptest::strategy::Just(200u32), 100u32..600],
            proptest::prop_oneof![
                proptest::collection::vec(proptest::num::u8::ANY, 0..200),
                token_body,
                "\\{\"error\":\"[\\PC\\n]{0,80}\",\"error_description\":\"[\\PC\\n\\t]{0,300}\"\\}"
                    .prop_map(String::into_bytes),
                "\\{\"error\":\"[a-z_]{1,30}\"\\}".prop_map(String::into_bytes),
            ],
            0u64..u64::MAX,
        );
        let (tokens, errors_with_code, other_errors) = (Cell::new(0u32), Cell::new(0u32), Cell::new(0u32));
        let mut runner = TestRunner::new(Config { cases: 2_000, ..Config::default() });
        runner
            .run(&strategy, |(status, body, now)| {
                match parse_token_response(status, &body, now) {
                    Ok(t) => {
                        tokens.set(tokens.get() + 1);
                        proptest::prop_assert!(
                            t.header.starts_with("Bearer ")
                                && t.header.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
                        );
                        proptest::prop_assert!(t.refresh_at_ms <= t.usable_until_ms);
                    }
                    Err(e) => {
                        proptest::prop_assert!(!e.0.chars().any(char::is_control), "{}", e.0);
                        // What the line holds beyond our own words is the status and at most the code.
                        let code = serde_json::from_slice::<serde_json::Value>(&body)
                            .ok()
                            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string));
                        match code.as_deref().and_then(oauth_error_code) {
                            Some(code) if status != 200 => {
                                errors_with_code.set(errors_with_code.get() + 1);
                                proptest::prop_assert_eq!(&e.0, &format!("HTTP status {status}: {code}"));
                            }
                            _ => other_errors.set(other_errors.get() + 1),
                        }
                    }
                }
                Ok(())
            })
            .unwrap();
        let counts = (tokens.get(), errors_with_code.get(), other_errors.get());
        eprintln!("token responses: {} tokens, {} errors with a code, {} other errors", counts.0, counts.1, counts.2);
        assert!(counts.0 >= 50 && counts.1 >= 50 && counts.2 >= 50, "a branch barely ran: {counts:?}");
    }

    proptest::proptest! {
        /// Key material read from configuration: any text gives a key or an error naming the field.
        #[test]
        fn any_private_key_text_is_a_key_or_an_error(text in "(-----BEGIN (RSA )?PRIVATE KEY-----\n)?[A-Za-z0-9+/=\n{}\":_ ]{0,400}(\n-----END (RSA )?PRIVATE KEY-----)?") {
            if let Err(e) = parse_key("f", &text) {
                proptest::prop_assert_eq!(e.field, "f");
            }
        }

        #[test]
        fn any_der_is_parts_or_none(der in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = crate::der::pkcs8_rsa_private_key(&der).and_then(crate::der::rsa_private_key_parts);
            let _ = crate::der::rsa_private_key_parts(&der);
        }
    }
}
