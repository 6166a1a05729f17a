//! Textual edits that keep everything else of a file (comments, order, quoting):
//! rendering a mapping as YAML (block or flow) or JSON, and finding where to insert
//! one more key into a block or flow mapping.

use super::super::node::{Entry, Kind, Node, Pos};

/// Byte offset of a 1-based line and column (column in characters) in `text`.
pub(crate) fn offset_of(text: &str, pos: Pos) -> Option<usize> {
    let line = usize::try_from(pos.line).ok()?.checked_sub(1)?;
    let column = usize::try_from(pos.column).ok()?.checked_sub(1)?;
    let start = if line == 0 {
        0
    } else {
        text.match_indices('\n').nth(line - 1)?.0 + 1
    };
    let rest = text.get(start..)?;
    match rest.char_indices().nth(column) {
        Some((i, _)) => Some(start + i),
        None if rest.chars().count() == column => Some(text.len()),
        None => None,
    }
}

/// The line ending `text` uses (`\r\n` when it has any, else `\n`).
pub(crate) fn line_ending(text: &str) -> &'static str {
    if text.contains("\r\n") { "\r\n" } else { "\n" }
}

/// Whether `s` can be written as a plain YAML scalar and read back as the same string.
fn plain_ok(s: &str) -> bool {
    const SPECIAL: &[&str] = &[
        "true", "false", "null", "yes", "no", "on", "off", "y", "n", "~",
    ];
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
        && !SPECIAL.contains(&s.to_ascii_lowercase().as_str())
}

/// A string as a YAML scalar: plain when that reads back the same, else double-quoted
/// (JSON quoting is valid YAML).
fn string(s: &str, json: bool) -> String {
    if !json && plain_ok(s) {
        s.to_owned()
    } else {
        serde_json::Value::String(s.to_owned()).to_string()
    }
}

/// A key.
fn key(k: &str, json: bool) -> String {
    string(k, json)
}

/// A scalar or collection in flow style (`[a, b]`, `{k: v}`); in JSON when `json`.
pub(crate) fn flow(node: &Node, json: bool) -> String {
    match &node.kind {
        Kind::Null => "null".to_owned(),
        Kind::Bool { text } => {
            if json {
                text.to_ascii_lowercase()
            } else {
                text.clone()
            }
        }
        Kind::Int { value, text } => {
            if json {
                value.to_string()
            } else {
                text.clone()
            }
        }
        Kind::Float { value, text } => {
            if json {
                serde_json::Number::from_f64(*value)
                    .map_or_else(|| "null".to_owned(), |n| n.to_string())
            } else {
                text.clone()
            }
        }
        Kind::Str { value, .. } => string(value, json),
        Kind::Seq(items) => {
            let items: Vec<String> = items.iter().map(|i| flow(i, json)).collect();
            format!("[{}]", items.join(", "))
        }
        Kind::Map(entries) => flow_map(entries, json),
    }
}

/// Entries in flow style: `{k: v, …}`.
pub(crate) fn flow_map(entries: &[Entry], json: bool) -> String {
    let items: Vec<String> = entries
        .iter()
        .map(|e| format!("{}: {}", key(&e.key, json), flow(&e.value, json)))
        .collect();
    if json {
        format!("{{{}}}", items.join(", "))
    } else {
        format!("{{ {} }}", items.join(", "))
    }
}

/// Entries in block style, each line starting with `indent`; nested mappings are
/// indented two more spaces, lists are written in flow style.
pub(crate) fn block(entries: &[Entry], indent: &str, nl: &str, out: &mut String) {
    for e in entries {
        match &e.value.kind {
            Kind::Map(inner) if !inner.is_empty() => {
                out.push_str(&format!("{indent}{}:{nl}", key(&e.key, false)));
                block(inner, &format!("{indent}  "), nl, out);
            }
            _ => out.push_str(&format!(
                "{indent}{}: {}{nl}",
                key(&e.key, false),
                flow(&e.value, false)
            )),
        }
    }
}

/// Where to add `, key: value` inside the flow mapping whose `{` is at byte `open`:
/// the offset just after its last significant character, and whether a `,` must be
/// written first (no when the mapping is empty or already ends with a comma).
pub(crate) fn flow_insert_point(text: &str, open: usize) -> Option<(usize, bool)> {
    let bytes = text.as_bytes();
    if bytes.get(open) != Some(&b'{') {
        return None;
    }
    let mut depth = 0usize;
    let mut last_end = open + 1;
    let mut last_char = b'{';
    let mut i = open;
    while i < bytes.len() {
        let c = bytes[i];
        let prev = if i > open { bytes[i - 1] } else { b' ' };
        match c {
            b'"' | b'\''
                if matches!(
                    prev,
                    b' ' | b'\t' | b'\n' | b'\r' | b'{' | b'[' | b',' | b':'
                ) =>
            {
                // A quoted scalar: skip to its closing quote.
                let mut j = i + 1;
                while j < bytes.len() {
                    if c == b'"' && bytes[j] == b'\\' {
                        j += 2;
                        continue;
                    }
                    if bytes[j] == c {
                        if c == b'\'' && bytes.get(j + 1) == Some(&b'\'') {
                            j += 2;
                            continue;
                        }
                        break;
                    }
                    j += 1;
                }
                i = j + 1;
                last_end = i;
                last_char = c;
                continue;
            }
            b'#' if matches!(prev, b' ' | b'\t' | b'\n' | b'\r') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some((last_end, !matches!(last_char, b',' | b'{')));
                }
            }
            b' ' | b'\t' | b'\n' | b'\r' => {
                i += 1;
                continue;
            }
            _ => {}
        }
        i += 1;
        last_end = i;
        last_char = c;
    }
    None
}

/// Where a block mapping that starts on 1-based line `key_line` (the line of its key,
/// indented `key_indent` characters) ends: the byte offset just after its last line
/// with content (blank and comment-only lines after it are left to what follows), and
/// whether that line lacks a final newline.
pub(crate) fn block_end(text: &str, key_line: u64, key_indent: usize) -> (usize, bool) {
    let mut offset = 0usize;
    let mut end = None;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let line_start = offset;
        offset += line.len();
        let number = n as u64 + 1;
        if number < key_line {
            continue;
        }
        if number == key_line {
            end = Some((offset, !line.ends_with('\n')));
            continue;
        }
        let content = line.trim_start_matches([' ', '\t']);
        let trimmed = content.trim_end();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = text[line_start..].len() - text[line_start..].trim_start_matches(' ').len();
        if indent <= key_indent {
            break;
        }
        end = Some((offset, !line.ends_with('\n')));
    }
    end.unwrap_or((text.len(), !text.ends_with('\n')))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::super::node::{Format, parse_verbatim};
    use super::*;

    #[test]
    fn offsets_count_characters() {
        let text = "a: 1\nbé: x\n";
        assert_eq!(offset_of(text, Pos { line: 1, column: 1 }), Some(0));
        assert_eq!(offset_of(text, Pos { line: 2, column: 1 }), Some(5));
        // `é` is two bytes.
        assert_eq!(offset_of(text, Pos { line: 2, column: 5 }), Some(10));
        assert_eq!(offset_of(text, Pos { line: 9, column: 1 }), None);
    }

    #[test]
    fn flow_insert_points() {
        let at = |t: &str| flow_insert_point(t, t.find('{').unwrap());
        assert_eq!(at("g: { a: 1 }"), Some((9, true)));
        assert_eq!(at("g: {}"), Some((4, false)));
        assert_eq!(at("g: { a: 1, }"), Some((10, false)));
        assert_eq!(at("g: { a: \"}\", b: [1, {c: 2}] }"), Some((27, true)));
        assert_eq!(at("g: { a: 'it''s' }"), Some((15, true)));
        assert_eq!(at("g: { a: don't }"), Some((13, true)));
        assert_eq!(at("g: { a: 1 # }\n }"), Some((9, true)));
        assert_eq!(at("g: { a: 1"), None);
    }

    #[test]
    fn block_ends_before_trailing_comments_and_the_next_key() {
        let text = "top:\n  a:\n    x: 1\n\n    y: 2\n  # about b\n  b:\n    x: 1\n";
        // `a` is on line 2, indented 2: its block ends after `    y: 2\n`.
        let (end, no_newline) = block_end(text, 2, 2);
        assert_eq!(&text[..end], "top:\n  a:\n    x: 1\n\n    y: 2\n");
        assert!(!no_newline);
        let (end, _) = block_end(text, 7, 2);
        assert_eq!(end, text.len());
        let (end, no_newline) = block_end("a:\n  x: 1", 1, 0);
        assert_eq!(end, 9);
        assert!(no_newline);
    }

    #[test]
    fn rendering_keeps_references_and_quotes_what_needs_it() {
        let (node, errors) = parse_verbatim(
            "strategy: echelon_down\nfallback_groups: [a.echelon2, \"${G}\", \"yes\", \"1x\"]\nretry_delay: 1.0\ncircuit_breaker: { failure_threshold: 5 }\n",
            "t.yaml",
            Format::Yaml,
        );
        assert!(errors.is_empty());
        let node = node.unwrap();
        let mut out = String::new();
        block(node.entries().unwrap(), "  ", "\n", &mut out);
        assert_eq!(
            out,
            "  strategy: echelon_down\n  fallback_groups: [a.echelon2, \"${G}\", \"yes\", \"1x\"]\n  retry_delay: 1.0\n  circuit_breaker:\n    failure_threshold: 5\n"
        );
        assert_eq!(
            flow_map(node.entries().unwrap(), true),
            "{\"strategy\": \"echelon_down\", \"fallback_groups\": [\"a.echelon2\", \"${G}\", \"yes\", \"1x\"], \"retry_delay\": 1.0, \"circuit_breaker\": {\"failure_threshold\": 5}}"
        );
    }
}
