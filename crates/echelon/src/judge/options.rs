//! The judge's modes: how a verdict is asked for, how samples are combined, what is
//! compared.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How the judge is asked for its verdict (`--verdict`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictMode {
    /// [`JsonSchema`](Self::JsonSchema) when every model behind the route declares
    /// `structured_output: true`, else [`Regex`](Self::Regex); [`Judge::new`] resolves
    /// it, so [`Judge::config`] names the mode in use.
    ///
    /// [`Judge::new`]: super::Judge::new
    /// [`Judge::config`]: super::Judge::config
    #[default]
    Auto,
    /// The request carries OpenAI `response_format: {type: json_schema, json_schema:
    /// {name: "verdict", strict: true, schema}}` (llama-server and vLLM accept it on
    /// `/v1/chat/completions` and constrain the output to it); the schema asks for
    /// `{"score": <integer in range>}` (`{"winner": "A"|"B"|"tie"}` pairwise), with a
    /// `"reasoning"` string first when [`reasoning_field`] is set. The reply is read as
    /// JSON first, then with the regex patterns.
    ///
    /// [`reasoning_field`]: super::JudgeConfig::reasoning_field
    JsonSchema,
    /// No schema: the reply is read with the patterns (a JSON verdict in it still
    /// counts, read first).
    Regex,
}

/// How the scores of an item's samples are combined (`--aggregate`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// The arithmetic mean.
    #[default]
    Mean,
    /// The median (the mean of the two middle scores for an even count).
    Median,
    /// The most frequent score; a tie between several goes to the lowest of them.
    Majority,
}

/// What is judged (`--mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JudgeMode {
    /// One response per item (`response`), scored.
    #[default]
    Pointwise,
    /// Two responses per item (`response_a`, `response_b`); the judge prefers A, B or
    /// neither (a tie).
    Pairwise,
}

/// What an inconsistent pair (the two orders of `--swap` disagree) becomes
/// (`--inconsistent`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Inconsistent {
    /// `"preference": "tie"` (and `position_consistent: false`).
    #[default]
    Tie,
    /// `"error": "inconsistent"`.
    Error,
}

/// A pairwise verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Preference {
    /// The first response (`response_a`) is better.
    #[serde(rename = "A")]
    A,
    /// The second response (`response_b`) is better.
    #[serde(rename = "B")]
    B,
    /// Neither is better.
    #[serde(rename = "tie")]
    Tie,
}

impl Preference {
    /// The verdict with A and B exchanged (read back a judgement of the swapped order).
    pub fn swapped(self) -> Preference {
        match self {
            Preference::A => Preference::B,
            Preference::B => Preference::A,
            Preference::Tie => Preference::Tie,
        }
    }

    /// `"A"`, `"B"` or `"tie"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Preference::A => "A",
            Preference::B => "B",
            Preference::Tie => "tie",
        }
    }

    /// Reads `A`, `B` or `tie` (any case; `draw`, `equal`, `neither`, `both` and `C` are ties).
    pub fn from_text(text: &str) -> Option<Preference> {
        let t = text.trim().trim_matches(|c: char| "[]*\"'`.()".contains(c));
        match t.to_ascii_lowercase().as_str() {
            "a" | "response a" | "response_a" => Some(Preference::A),
            "b" | "response b" | "response_b" => Some(Preference::B),
            "tie" | "draw" | "equal" | "neither" | "both" | "c" => Some(Preference::Tie),
            _ => None,
        }
    }
}

impl fmt::Display for Preference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error of the `FromStr` impls of the judge's modes: the text and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not one of {expected}")]
pub struct ParseModeError {
    /// The text given.
    pub text: String,
    /// The accepted names.
    pub expected: &'static str,
}

macro_rules! named {
    ($ty:ty, $expected:literal, $($name:literal => $value:expr),+) => {
        impl FromStr for $ty {
            type Err = ParseModeError;
            /// Parses the names the CLI takes.
            fn from_str(s: &str) -> Result<$ty, ParseModeError> {
                match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
                    $($name => Ok($value),)+
                    _ => Err(ParseModeError { text: s.to_owned(), expected: $expected }),
                }
            }
        }
        impl $ty {
            /// The name, as the CLI takes it and the output writes it.
            pub fn name(self) -> &'static str {
                match self {
                    $(v if v == $value => $name,)+
                    _ => "",
                }
            }
        }
    };
}

named!(VerdictMode, "auto, json_schema, regex",
    "auto" => VerdictMode::Auto, "json_schema" => VerdictMode::JsonSchema, "regex" => VerdictMode::Regex);
named!(Aggregate, "mean, median, majority",
    "mean" => Aggregate::Mean, "median" => Aggregate::Median, "majority" => Aggregate::Majority);
named!(JudgeMode, "pointwise, pairwise",
    "pointwise" => JudgeMode::Pointwise, "pairwise" => JudgeMode::Pairwise);
named!(Inconsistent, "tie, error",
    "tie" => Inconsistent::Tie, "error" => Inconsistent::Error);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for v in [
            VerdictMode::Auto,
            VerdictMode::JsonSchema,
            VerdictMode::Regex,
        ] {
            assert_eq!(v.name().parse::<VerdictMode>().unwrap(), v);
        }
        assert_eq!(
            "json-schema".parse::<VerdictMode>().unwrap(),
            VerdictMode::JsonSchema
        );
        assert_eq!("Median".parse::<Aggregate>().unwrap(), Aggregate::Median);
        assert!("mode".parse::<Aggregate>().is_err());
        assert_eq!(Preference::from_text(" [[B]] "), Some(Preference::B));
        assert_eq!(Preference::from_text("Tie"), Some(Preference::Tie));
        assert_eq!(Preference::from_text("maybe"), None);
        assert_eq!(Preference::A.swapped(), Preference::B);
    }
}
