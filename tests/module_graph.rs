//! The module graph of `src/`: no import cycle among modules, and the core never reaches into the shell or
//! the proxy-wasm SDK. Run with `cargo test --test module_graph`; a failure prints the cycle.
//!
//! A module's imports are every `crate::<module>` path (and, in `src/shell/`, every `super::<module>` path)
//! in its non-test code: `use` lines and inline paths alike, comments left out. Test modules (`#[cfg(test)] mod …` at the end
//! of a file, and the shell's `fake` and `tests` files) are left out: they may use anything.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module name → its source with test code cut off.
fn modules() -> BTreeMap<String, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    let mut dirs = vec![(src.clone(), String::new())];
    while let Some((dir, prefix)) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let stem = path.file_stem().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                dirs.push((path, format!("{prefix}{stem}::")));
                continue;
            }
            if !path.extension().is_some_and(|e| e == "rs") || (prefix.is_empty() && stem == "lib") {
                continue;
            }
            let name = match stem.as_str() {
                "mod" => prefix.trim_end_matches("::").to_string(),
                _ => format!("{prefix}{stem}"),
            };
            if name == "testkeys" || name.ends_with("::fake") || name.ends_with("::tests") {
                continue;
            }
            // Comments (doc links included) are not imports.
            let text: String = std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .map(|l| format!("{l}\n"))
                .collect();
            let tests =
                text.find("#[cfg(test)]\nmod tests").or_else(|| text.find("#[cfg(test)]\npub(crate) mod tests"));
            let code = match tests {
                Some(i) => text[..i].to_string(),
                None => text,
            };
            out.insert(name, code);
        }
    }
    out
}

/// The modules `code` (of module `name`) refers to.
fn imports(name: &str, code: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let parent = name.rsplit_once("::").map(|(p, _)| p.to_string());
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + 7..];
        let first = ident(rest);
        let mut target = first.clone();
        if let Some(next) = rest.strip_prefix(&format!("{first}::")) {
            let nested = format!("{first}::{}", ident(next));
            if known.contains(&nested) {
                target = nested;
            }
        }
        found.insert(target);
    }
    if let Some(parent) = parent {
        for (i, _) in code.match_indices("super::") {
            found.insert(format!("{parent}::{}", ident(&code[i + 7..])));
        }
    }
    found.into_iter().filter(|m| known.contains(m) && m != name).collect()
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    modules.iter().map(|(name, code)| (name.clone(), imports(name, code, &known))).collect()
}

/// A cycle through `node`, if any (depth-first search).
fn find_cycle(
    graph: &BTreeMap<String, BTreeSet<String>>,
    node: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(i) = path.iter().position(|n| n == node) {
        let mut cycle = path[i..].to_vec();
        cycle.push(node.to_string());
        return Some(cycle);
    }
    if done.contains(node) {
        return None;
    }
    path.push(node.to_string());
    for next in graph.get(node).into_iter().flatten() {
        if let Some(c) = find_cycle(graph, next, path, done) {
            return Some(c);
        }
    }
    path.pop();
    done.insert(node.to_string());
    None
}

#[test]
fn no_module_of_src_imports_itself_through_others() {
    let graph = graph();
    assert!(graph.len() > 20, "modules found: {:?}", graph.keys());
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = find_cycle(&graph, node, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_core_never_imports_the_shell_or_the_proxy_wasm_sdk() {
    for (name, code) in modules() {
        if name == "shell" || name.starts_with("shell::") {
            continue;
        }
        assert!(!code.contains("crate::shell"), "{name} imports the shell");
        assert!(!code.contains("proxy_wasm"), "{name} uses the proxy-wasm SDK");
    }
}

#[test]
fn the_cycle_finder_finds_a_planted_cycle() {
    let mut graph = graph();
    graph.get_mut("cache").unwrap().insert("router".into());
    let cycle = graph.keys().find_map(|n| find_cycle(&graph, n, &mut Vec::new(), &mut BTreeSet::new()));
    assert!(cycle.is_some_and(|c| c.contains(&"cache".to_string())));
}
