//! Configuration errors: where (file, line, column, key path), what, and a hint.

use std::fmt;

/// One problem found in the configuration.
///
/// Displays as `{file}:{line}:{column}: {key_path}: {message}`, followed by
/// `\n  hint: {hint}` when a hint exists. The line and column are left out when
/// unknown, and the key path when empty. Never contains an API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or the `origin` given to [`Config::from_str`](super::Config::from_str)).
    pub file: String,
    /// 1-based line of the offending key or value, when known.
    pub line: Option<u64>,
    /// 1-based column (in characters) of the offending key or value, when known.
    pub column: Option<u64>,
    /// Dotted path of the offending key inside the file, e.g. `models.smollm-a.timeout`;
    /// list items are written `[i]`, e.g. `task_groups.demo.echelon1.models[0]`.
    /// Empty for whole-file problems.
    pub key_path: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it, e.g. "did you mean `timeout`?".
    pub hint: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        f.write_str(": ")?;
        if !self.key_path.is_empty() {
            write!(f, "{}: ", self.key_path)?;
        }
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found while loading a configuration (not just the first, where
/// practical), in file, line and column order.
///
/// Displays one [`ConfigError`] per line block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", display_all(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

fn display_all(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigErrors {
    /// The errors, in order.
    pub fn errors(&self) -> &[ConfigError] {
        &self.0
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        ConfigErrors(vec![error])
    }
}

/// Levenshtein distance between two strings, in characters.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = substitution.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// The candidate closest to `word` when it is within edit distance 2 (ties go to
/// the earlier candidate), compared case-insensitively.
pub(crate) fn closest<'a, I>(word: &str, candidates: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    let word = word.to_lowercase();
    let mut best: Option<(usize, &'a str)> = None;
    for candidate in candidates {
        let distance = edit_distance(&word, &candidate.to_lowercase());
        if distance <= 2 && best.is_none_or(|(d, _)| distance < d) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, c)| c)
}

/// "did you mean `x`?" when a candidate is close to `word`.
pub(crate) fn did_you_mean<'a, I>(word: &str, candidates: I) -> Option<String>
where
    I: IntoIterator<Item = &'a str>,
{
    closest(word, candidates).map(|c| format!("did you mean `{c}`?"))
}

/// A hint for a dangling reference: "did you mean `x`?" when one is close, else the
/// list of the defined names (or a note that there are none).
pub(crate) fn reference_hint<'a, I>(word: &str, kind_plural: &str, defined: I) -> String
where
    I: IntoIterator<Item = &'a str> + Clone,
{
    if let Some(hint) = did_you_mean(word, defined.clone()) {
        return hint;
    }
    let names: Vec<String> = defined.into_iter().map(|n| format!("`{n}`")).collect();
    if names.is_empty() {
        format!("no {kind_plural} are defined")
    } else {
        format!("defined {kind_plural}: {}", names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_insertions_deletions_substitutions() {
        assert_eq!(edit_distance("timeout", "timeout"), 0);
        assert_eq!(edit_distance("timout", "timeout"), 1);
        assert_eq!(edit_distance("timeuot", "timeout"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn closest_only_within_two_edits() {
        let keys = ["timeout", "connect_timeout", "max_retries"];
        assert_eq!(closest("timout", keys), Some("timeout"));
        assert_eq!(closest("Max_Retris", keys), Some("max_retries"));
        assert_eq!(closest("banana", keys), None);
        assert_eq!(
            did_you_mean("max_retris", keys).as_deref(),
            Some("did you mean `max_retries`?")
        );
    }

    #[test]
    fn reference_hint_lists_defined_names_when_nothing_is_close() {
        assert_eq!(
            reference_hint("local_x", "providers", ["local_a", "remote"]),
            "did you mean `local_a`?"
        );
        assert_eq!(
            reference_hint("zzz", "providers", ["local_a", "remote"]),
            "defined providers: `local_a`, `remote`"
        );
        assert_eq!(
            reference_hint("zzz", "providers", [] as [&str; 0]),
            "no providers are defined"
        );
    }

    #[test]
    fn display_has_location_path_message_and_hint() {
        let e = ConfigError {
            file: "a.yaml".into(),
            line: Some(3),
            column: Some(5),
            key_path: "models.m.timout".into(),
            message: "unknown key `timout`".into(),
            hint: Some("did you mean `timeout`?".into()),
        };
        assert_eq!(
            e.to_string(),
            "a.yaml:3:5: models.m.timout: unknown key `timout`\n  hint: did you mean `timeout`?"
        );
        let e2 = ConfigError {
            file: "dir".into(),
            line: None,
            column: None,
            key_path: String::new(),
            message: "no models are defined".into(),
            hint: None,
        };
        assert_eq!(e2.to_string(), "dir: no models are defined");
        let all = ConfigErrors(vec![e, e2]);
        assert_eq!(all.to_string().lines().count(), 3);
    }
}
