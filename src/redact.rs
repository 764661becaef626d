//! Error messages without the values they would quote: a parser's message names what was wrong, the field
//! is named by its path, and the value (which may be a secret written in the wrong place, or any text of an
//! untrusted answer) is never repeated (issue 24). A leaf module: anything may use it.

/// A configuration parser's message without the value it quotes: serde says `invalid type: string "…",
/// expected struct RawSecret` for a secret written literally where `{"env": …}` belongs, and the same for
/// numbers (`integer \`…\``), wrong values and unknown variants. The field is named by the error's path; the
/// value, which may be the secret itself, is never repeated (issue 24).
pub fn serde_message(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: ", "unknown variant "] {
        let Some(rest) = message.strip_prefix(prefix) else { continue };
        // serde's own tail (", expected …" and serde_json's " at line L column C") is the last one: a
        // quoted value may contain the same words, never after them.
        let (what, tail) = match rest.rfind(", expected") {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let kind = what.split(['`', '"', '\'']).next().unwrap_or_default().trim_end();
        let kind = if kind.is_empty() { "a value" } else { kind };
        return format!("{}: {kind} (not shown){tail}", prefix.trim_end_matches([' ', ':']));
    }
    message.to_string()
}
