//! Links in responses that point at the upstream's own base (paging links, `fullUrl`, `Location`) are
//! rewritten to the public base, so that a client can follow them through the proxy with the same token.

use serde_json::Value;

/// Rewrites one URL: `from` (the upstream's base) becomes `to` (the public base) when `url` starts with it at
/// a path boundary. `None` when the URL is not under `from`.
pub fn rewrite_url(url: &str, from: &str, to: &str) -> Option<String> {
    let rest = url.strip_prefix(from)?;
    if !(rest.is_empty() || rest.starts_with(['/', '?', '#'])) {
        return None; // "http://h/fhir2/x" is not under "http://h/fhir"
    }
    Some(format!("{to}{rest}"))
}

fn rewrite_in_place(value: Option<&mut Value>, from: &str, to: &str) -> bool {
    let Some(Value::String(url)) = value else {
        return false;
    };
    match rewrite_url(url, from, to) {
        Some(new) => {
            *url = new;
            true
        }
        None => false,
    }
}

/// Rewrites a FHIR JSON response: a Bundle's `link[].url`, `entry[].fullUrl` and `entry[].response.location`,
/// and the same in Bundles nested as entries (a batch response carries one searchset per search). `None` when
/// the body is not JSON or nothing changed (the original is then passed on as is).
pub fn rewrite_body(body: &[u8], from: &str, to: &str) -> Option<Vec<u8>> {
    let mut doc: Value = serde_json::from_slice(body).ok()?;
    if rewrite_bundle(&mut doc, from, to, 0) {
        serde_json::to_vec(&doc).ok()
    } else {
        None
    }
}

/// How deep Bundles nest in a batch-response (one level in practice; the bound keeps recursion finite).
const MAX_NESTING: usize = 4;

fn rewrite_bundle(doc: &mut Value, from: &str, to: &str, depth: usize) -> bool {
    if depth > MAX_NESTING || doc.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return false;
    }
    let mut changed = false;
    if let Some(Value::Array(links)) = doc.get_mut("link") {
        for link in links.iter_mut() {
            changed |= rewrite_in_place(link.get_mut("url"), from, to);
        }
    }
    if let Some(Value::Array(entries)) = doc.get_mut("entry") {
        for entry in entries.iter_mut() {
            changed |= rewrite_in_place(entry.get_mut("fullUrl"), from, to);
            changed |= rewrite_in_place(entry.get_mut("response").and_then(|r| r.get_mut("location")), from, to);
            if let Some(resource) = entry.get_mut("resource") {
                changed |= rewrite_bundle(resource, from, to, depth + 1);
            }
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FROM: &str = "http://127.0.0.1:9101/api/FHIR/R4";
    const TO: &str = "https://fhir.example.org";

    #[test]
    fn urls_under_the_upstream_base_move_to_the_public_base() {
        assert_eq!(rewrite_url(&format!("{FROM}/Patient?_page=2"), FROM, TO).unwrap(), format!("{TO}/Patient?_page=2"));
        assert_eq!(rewrite_url(&format!("{FROM}?_getpages=x"), FROM, TO).unwrap(), format!("{TO}?_getpages=x"));
        assert_eq!(rewrite_url(FROM, FROM, TO).unwrap(), TO);
        assert!(rewrite_url("http://127.0.0.1:9101/api/FHIR/R4x/Patient", FROM, TO).is_none());
        assert!(rewrite_url("http://elsewhere/Patient", FROM, TO).is_none());
    }

    #[test]
    fn bundle_links_full_urls_and_locations_are_rewritten() {
        let body = json!({
            "resourceType": "Bundle", "type": "searchset",
            "link": [{"relation": "self", "url": format!("{FROM}/Patient?family=x")},
                     {"relation": "next", "url": format!("{FROM}/Patient?family=x&_offset=20")}],
            "entry": [{"fullUrl": format!("{FROM}/Patient/1"), "resource": {"resourceType": "Patient", "id": "1",
                       "text": format!("mentions {FROM} but is data")}},
                      {"response": {"status": "201", "location": format!("{FROM}/Patient/2/_history/1")}}]
        });
        let out: Value = serde_json::from_slice(&rewrite_body(body.to_string().as_bytes(), FROM, TO).unwrap()).unwrap();
        assert_eq!(out["link"][1]["url"], format!("{TO}/Patient?family=x&_offset=20"));
        assert_eq!(out["entry"][0]["fullUrl"], format!("{TO}/Patient/1"));
        assert_eq!(out["entry"][1]["response"]["location"], format!("{TO}/Patient/2/_history/1"));
        assert_eq!(out["entry"][0]["resource"]["text"], format!("mentions {FROM} but is data"), "data is not touched");
    }

    #[test]
    fn bundles_nested_in_a_batch_response_are_rewritten_too() {
        let inner = json!({"resourceType": "Bundle", "type": "searchset", "link": [{"relation": "self", "url": format!("{FROM}/Condition?patient=1")}]});
        let body = json!({"resourceType": "Bundle", "type": "batch-response", "entry": [{"resource": inner, "response": {"status": "200 OK"}}]});
        let out: Value = serde_json::from_slice(&rewrite_body(body.to_string().as_bytes(), FROM, TO).unwrap()).unwrap();
        assert_eq!(out["entry"][0]["resource"]["link"][0]["url"], format!("{TO}/Condition?patient=1"));
    }

    #[test]
    fn other_bodies_are_left_alone() {
        assert!(rewrite_body(br#"{"resourceType":"Patient","id":"1"}"#, FROM, TO).is_none());
        assert!(rewrite_body(b"not json", FROM, TO).is_none());
        assert!(rewrite_body(br#"{"resourceType":"Bundle","link":[{"url":"http://other/x"}]}"#, FROM, TO).is_none());
    }
}
