//! Environment substitution in configuration values: `${VAR}`, `$VAR`,
//! `${VAR:-default}` (default used when VAR is unset or empty; it may be empty) and
//! `$$` for a literal `$`. A `$` not followed by `{`, `$` or a name start is kept.
//!
//! Substitution runs on parsed scalar values (never on keys, never in comments), so
//! line numbers stay those of the file.

/// Looks up an environment variable; `None` when unset.
pub(crate) type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, as an [`EnvLookup`] target (`std::env::var`, non-UTF-8
/// values count as unset).
pub(crate) fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// A problem with one `$` reference inside a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EnvProblem {
    /// Byte offset of the `$` in the value.
    pub(crate) offset: usize,
    /// The reference as written, e.g. `${LOCAL_A_KEY}`.
    pub(crate) reference: String,
    /// What is wrong, e.g. "environment variable `LOCAL_A_KEY` is not set".
    pub(crate) message: String,
    /// How to fix it.
    pub(crate) hint: Option<String>,
}

/// A value after substitution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Substituted {
    /// The new text.
    pub(crate) value: String,
    /// Whether at least one variable reference was replaced.
    pub(crate) replaced: bool,
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(is_name_start) && chars.all(is_name_char)
}

/// Replaces every reference in `value`. Returns all problems found when any.
pub(crate) fn substitute(value: &str, env: EnvLookup<'_>) -> Result<Substituted, Vec<EnvProblem>> {
    let mut out = String::with_capacity(value.len());
    let mut problems = Vec::new();
    let mut replaced = false;
    let mut rest = value;
    let mut consumed = 0usize;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let offset = consumed + pos;
        let after = &rest[pos + 1..];
        let (len, text) = match after.chars().next() {
            Some('$') => (2, Some("$".to_owned())),
            Some('{') => match after.find('}') {
                None => {
                    problems.push(EnvProblem {
                        offset,
                        reference: rest[pos..].to_owned(),
                        message: "unterminated `${`".to_owned(),
                        hint: Some("write `${NAME}`, or `$$` for a literal `$`".to_owned()),
                    });
                    (rest.len() - pos, None)
                }
                Some(close) => {
                    let reference = &rest[pos..pos + 2 + close];
                    let inner = &after[1..close];
                    let (name, default) = match inner.split_once(":-") {
                        Some((name, default)) => (name, Some(default)),
                        None => (inner, None),
                    };
                    let len = reference.len();
                    if !valid_name(name) {
                        problems.push(EnvProblem {
                            offset,
                            reference: reference.to_owned(),
                            message: format!("`{reference}` is not a valid variable reference"),
                            hint: Some(
                                "use `${NAME}`, `$NAME` or `${NAME:-default}` with NAME made of \
                                 letters, digits and `_`; `$$` is a literal `$`"
                                    .to_owned(),
                            ),
                        });
                        (len, None)
                    } else {
                        match (env(name), default) {
                            (Some(v), Some(d)) if v.is_empty() => {
                                replaced = true;
                                (len, Some(d.to_owned()))
                            }
                            (Some(v), _) => {
                                replaced = true;
                                (len, Some(v))
                            }
                            (None, Some(d)) => {
                                replaced = true;
                                (len, Some(d.to_owned()))
                            }
                            (None, None) => {
                                problems.push(missing(offset, reference, name));
                                (len, None)
                            }
                        }
                    }
                }
            },
            Some(c) if is_name_start(c) => {
                let name_len = after
                    .find(|c: char| !is_name_char(c))
                    .unwrap_or(after.len());
                let name = &after[..name_len];
                let reference = &rest[pos..pos + 1 + name_len];
                match env(name) {
                    Some(v) => {
                        replaced = true;
                        (1 + name_len, Some(v))
                    }
                    None => {
                        problems.push(missing(offset, reference, name));
                        (1 + name_len, None)
                    }
                }
            }
            // A lone `$` (end of value, or followed by something else) is kept.
            _ => (1, Some("$".to_owned())),
        };
        if let Some(text) = text {
            out.push_str(&text);
        }
        consumed += pos + len;
        rest = &rest[pos + len..];
    }
    out.push_str(rest);
    if problems.is_empty() {
        Ok(Substituted {
            value: out,
            replaced,
        })
    } else {
        Err(problems)
    }
}

fn missing(offset: usize, reference: &str, name: &str) -> EnvProblem {
    EnvProblem {
        offset,
        reference: reference.to_owned(),
        message: format!("environment variable `{name}` is not set"),
        hint: Some(format!(
            "set `{name}`, or give a default: `${{{name}:-default}}` (the default may be empty)"
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("example.org".to_owned()),
            "PORT" => Some("8080".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn sub(v: &str) -> Result<String, Vec<EnvProblem>> {
        substitute(v, &env).map(|s| s.value)
    }

    #[test]
    fn plain_text_is_unchanged() {
        let s = substitute("http://127.0.0.1/v1", &env).unwrap();
        assert_eq!(s.value, "http://127.0.0.1/v1");
        assert!(!s.replaced);
    }

    #[test]
    fn braced_bare_and_default_forms() {
        assert_eq!(
            sub("http://${HOST}:$PORT/v1").unwrap(),
            "http://example.org:8080/v1"
        );
        assert_eq!(sub("${NOPE:-fallback}").unwrap(), "fallback");
        assert_eq!(sub("${NOPE:-}").unwrap(), "");
        assert_eq!(sub("${EMPTY:-d}").unwrap(), "d");
        assert_eq!(sub("${EMPTY}").unwrap(), "");
        assert_eq!(sub("${HOST:-d}").unwrap(), "example.org");
        assert_eq!(sub("$HOST.x").unwrap(), "example.org.x");
        assert!(substitute("$PORT", &env).unwrap().replaced);
    }

    #[test]
    fn dollar_escapes_and_lone_dollars() {
        assert_eq!(sub("a$$b").unwrap(), "a$b");
        assert_eq!(sub("$${HOST}").unwrap(), "${HOST}");
        assert_eq!(sub("cost $5 $").unwrap(), "cost $5 $");
        assert!(!substitute("a$$b", &env).unwrap().replaced);
    }

    #[test]
    fn missing_variables_are_all_reported_with_offsets() {
        let problems = sub("x ${MISSING_ONE} $MISSING_TWO").unwrap_err();
        assert_eq!(problems.len(), 2);
        assert_eq!(problems[0].offset, 2);
        assert_eq!(problems[0].reference, "${MISSING_ONE}");
        assert_eq!(
            problems[0].message,
            "environment variable `MISSING_ONE` is not set"
        );
        assert_eq!(problems[1].offset, 17);
        assert_eq!(problems[1].reference, "$MISSING_TWO");
    }

    #[test]
    fn malformed_references() {
        let p = sub("${HOST").unwrap_err();
        assert_eq!(p[0].message, "unterminated `${`");
        let p = sub("${}").unwrap_err();
        assert_eq!(p[0].message, "`${}` is not a valid variable reference");
        let p = sub("${A-B}").unwrap_err();
        assert_eq!(p[0].reference, "${A-B}");
    }

    #[test]
    fn non_ascii_text_around_references() {
        assert_eq!(sub("é${HOST}ü").unwrap(), "éexample.orgü");
        let p = sub("é$NOPE").unwrap_err();
        assert_eq!(p[0].offset, 2);
    }
}
