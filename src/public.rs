//! The requests that pass without a token: reading the server's discovery documents.
//!
//! The match is exact on the path (the part before `?`): `/metadata/`, `/Metadata`, `/metadata;x` or
//! `/metadata%2F..` are protected like any other path. The shipped Envoy configs normalise paths before the
//! filter runs, so `..` and `//` spellings have already been resolved or refused.

/// The discovery documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublicDocument {
    /// `/metadata`: the CapabilityStatement.
    Metadata,
    /// `/.well-known/smart-configuration`.
    SmartConfiguration,
}

/// Which discovery document `method` on `path` asks for, if it may pass without a token: `GET` or `HEAD`,
/// with any query string (`/metadata?_format=json`).
pub fn public_document(method: &str, path: &str) -> Option<PublicDocument> {
    if method != "GET" && method != "HEAD" {
        return None;
    }
    match path.split_once('?').map_or(path, |(p, _)| p) {
        "/metadata" => Some(PublicDocument::Metadata),
        "/.well-known/smart-configuration" => Some(PublicDocument::SmartConfiguration),
        _ => None,
    }
}

/// Whether `method` on `path` may pass without a token.
pub fn is_public(method: &str, path: &str) -> bool {
    public_document(method, path).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_passes_without_token() {
        assert!(is_public("GET", "/metadata"));
        assert!(is_public("HEAD", "/metadata"));
        assert!(is_public("GET", "/metadata?_format=json"));
        assert!(is_public("GET", "/.well-known/smart-configuration"));
    }

    #[test]
    fn other_methods_on_metadata_need_a_token() {
        for m in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "get", "TRACE"] {
            assert!(!is_public(m, "/metadata"), "{m}");
        }
    }

    #[test]
    fn look_alike_paths_need_a_token() {
        for p in [
            "/metadata/",
            "/metadata/../Patient",
            "/Metadata",
            "/METADATA",
            "/metadata;x",
            "/metadata%2F..%2FPatient",
            "/metadata#x",
            "//metadata",
            "/x/metadata",
            "metadata",
            "",
            "/Patient?x=/metadata",
            "/metadatax",
            "/.well-known/smart-configuration/x",
        ] {
            assert!(!is_public("GET", p), "{p}");
        }
    }
}
