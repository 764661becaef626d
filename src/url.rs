//! URLs as the configuration gives them.

/// Splits `http(s)://authority/path?query` into the `:authority` and `:path` of an HTTP/2-style request.
pub fn split_http_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"))?;
    if !url.bytes().all(|b| b.is_ascii_graphic()) || url.contains('#') {
        return None;
    }
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (rest.get(..i)?, rest.get(i..)?),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let path = if path.starts_with('?') { format!("/{path}") } else { path.to_string() };
    Some((authority.to_string(), path))
}
