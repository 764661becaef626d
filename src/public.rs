//! The requests that pass without a token: reading the server's discovery documents.
//!
//! The match is exact on the path (the part before `?`): `/metadata/`, `/Metadata`, `/metadata;x` or
//! `/metadata%2F..` are protected like any other path. The shipped Envoy configs normalise paths before the
//! filter runs, so `..` and `//` spellings have already been resolved or refused.

/// The discovery paths that are open to anyone.
pub const PUBLIC_PATHS: [&str; 2] = ["/metadata", "/.well-known/smart-configuration"];

/// Whether `method` on `path` may pass without a token: `GET` or `HEAD` of a discovery document, with any
/// query string (`/metadata?_format=json`).
pub fn is_public(method: &str, path: &str) -> bool {
    if method != "GET" && method != "HEAD" {
        return false;
    }
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    PUBLIC_PATHS.contains(&path)
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
