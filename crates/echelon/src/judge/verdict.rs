//! Structured verdicts: the JSON schema a judge is asked to follow, reading a JSON verdict
//! out of a reply, and the pairwise defaults and parser.

use regex::Regex;
use serde_json::{Map, Value, json};

use super::JudgeError;
use super::options::Preference;
use super::parse::{ScoreParse, ScoreParser};

/// The default rubric of [`VerdictMode::JsonSchema`](super::VerdictMode::JsonSchema) when
/// the rubric is left at [`DEFAULT_RUBRIC`](super::DEFAULT_RUBRIC): the same judgement,
/// answered as JSON.
pub const DEFAULT_JSON_RUBRIC: &str = "\
You are an impartial judge. Rate the quality of the response to the prompt below on a \
scale from 1 to 10: 1 means useless, wrong or off-topic; 10 means correct, complete, \
clear and concise. If a reference answer is given, use it to check correctness; if it is \
empty, judge on your own knowledge. Do not reward length for its own sake.

[Prompt]
{prompt}

[Reference answer]
{reference}

[Response]
{response}

Answer with a JSON object {\"score\": X}, where X is an integer from 1 to 10.";

/// The default re-ask reminder of the JSON verdict mode (`{min}`, `{max}`).
pub const DEFAULT_JSON_REMINDER: &str = "\
I could not read a valid rating in your reply. Answer again with only a JSON object \
{\"score\": X}, where X is an integer from {min} to {max}.";

/// The default pairwise rubric: placeholders `{prompt}`, `{reference}` (empty when
/// absent), `{response_a}` and `{response_b}`; the verdict is a final line
/// `Winner: A`, `Winner: B` or `Winner: tie` (as JSON `{"winner": …}` in the JSON
/// verdict mode, which the schema enforces).
pub const DEFAULT_PAIRWISE_RUBRIC: &str = "\
You are an impartial judge. Compare the two responses to the prompt below and decide \
which one is better: more correct, complete, clear and concise. If a reference answer is \
given, use it to check correctness. Do not let the order of the responses or their \
length sway you. Say tie only when neither is better.

[Prompt]
{prompt}

[Reference answer]
{reference}

[Response A]
{response_a}

[Response B]
{response_b}

Explain your judgement in a few sentences, then end your reply with a final line of \
exactly this form, where X is A, B or tie:
Winner: X";

/// The default pairwise re-ask reminder.
pub const DEFAULT_PAIRWISE_REMINDER: &str = "\
I could not read a verdict in your reply. Answer again and end your reply with a final \
line of exactly this form, where X is A, B or tie:
Winner: X";

/// The default pairwise patterns, tried in order (the first that matches decides, its
/// last match counts): `Winner: X` / `Preference: X` / `Verdict: X` / `Better: X` (any
/// case, Markdown bold allowed), then `[[X]]`, then a reply that is only `A`, `B` or
/// `tie`. Group 1 is read with [`Preference::from_text`].
pub const DEFAULT_PAIRWISE_PATTERNS: [&str; 3] = [
    r"(?i)\b(?:winner|preference|preferred|verdict|better)\**\s*[:：]\s*\**\s*\[*\s*(?:response\s+)?(a|b|tie|draw|neither|equal)\b",
    r"(?i)\[\[\s*(a|b|tie)\s*\]\]",
    r"(?i)^\s*\**\s*\[*\s*(a|b|tie)\s*\]*\s*\**\.?\s*$",
];

/// The default pairwise patterns as owned strings.
pub fn default_pairwise_patterns() -> Vec<String> {
    DEFAULT_PAIRWISE_PATTERNS
        .iter()
        .map(|p| (*p).to_owned())
        .collect()
}

/// The JSON schema of a score verdict: `{"score": integer}` (a `number` when a bound is
/// not whole) within `[min, max]`, with a `"reasoning"` string first when `reasoning`.
pub fn score_schema(min: f64, max: f64, reasoning: bool) -> Value {
    let whole = min.fract() == 0.0 && max.fract() == 0.0;
    let score = if whole {
        json!({"type": "integer", "minimum": min as i64, "maximum": max as i64})
    } else {
        json!({"type": "number", "minimum": min, "maximum": max})
    };
    object_schema("score", score, reasoning)
}

/// The JSON schema of a pairwise verdict: `{"winner": "A" | "B" | "tie"}`, with a
/// `"reasoning"` string first when `reasoning`.
pub fn pairwise_schema(reasoning: bool) -> Value {
    object_schema(
        "winner",
        json!({"type": "string", "enum": ["A", "B", "tie"]}),
        reasoning,
    )
}

fn object_schema(field: &str, schema: Value, reasoning: bool) -> Value {
    // serde_json's map is sorted, and "reasoning" sorts before both "score" and
    // "winner": the grammar llama-server builds follows that order, so the reasoning
    // is written before the verdict.
    let mut properties = Map::new();
    let mut required = Vec::new();
    if reasoning {
        properties.insert("reasoning".into(), json!({"type": "string"}));
        required.push(json!("reasoning"));
    }
    properties.insert(field.into(), schema);
    required.push(json!(field));
    json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    })
}

/// OpenAI's `response_format` for a schema: `{type: json_schema, json_schema: {name:
/// "verdict", strict: true, schema}}`.
pub fn response_format(schema: Value) -> Value {
    json!({
        "type": "json_schema",
        "json_schema": {"name": "verdict", "strict": true, "schema": schema},
    })
}

/// The JSON object in a reply: the whole text, else the text from its first `{` to its
/// last `}` (a reply wrapped in prose or a Markdown fence).
fn json_object(text: &str) -> Option<Map<String, Value>> {
    let trimmed = text.trim();
    if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(trimmed) {
        return Some(map);
    }
    let start = trimmed.find('{')?;
    let end = trimmed.rfind('}')?;
    if end <= start {
        return None;
    }
    match serde_json::from_str::<Value>(&trimmed[start..=end]) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// A score out of a JSON verdict `{"score": X}` (a number or a numeric string); `None`
/// when the reply holds no such object (the patterns are tried next).
pub(crate) fn json_score(text: &str, parser: &ScoreParser) -> Option<ScoreParse> {
    let map = json_object(text)?;
    let value = map.get("score")?;
    let score = match value {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    Some(parser.check(score))
}

/// A preference out of a JSON verdict `{"winner": X}` (or `"preference"`, `"verdict"`).
pub(crate) fn json_preference(text: &str) -> Option<Preference> {
    let map = json_object(text)?;
    ["winner", "preference", "verdict"]
        .iter()
        .find_map(|k| map.get(*k).and_then(Value::as_str))
        .and_then(Preference::from_text)
}

/// Reads a preference out of the judge's reply: a JSON verdict first, then an ordered
/// list of regexes (group 1, else the whole match, read with [`Preference::from_text`]);
/// the first pattern that matches decides and its last match counts.
#[derive(Debug, Clone)]
pub struct PreferenceParser {
    patterns: Vec<Regex>,
}

impl PreferenceParser {
    /// Compiles the patterns.
    ///
    /// # Errors
    /// [`JudgeError::Pattern`] for the first pattern that does not compile.
    pub fn new(patterns: &[String]) -> Result<PreferenceParser, JudgeError> {
        let patterns = patterns
            .iter()
            .enumerate()
            .map(|(index, p)| {
                Regex::new(p).map_err(|source| JudgeError::Pattern {
                    index,
                    pattern: p.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PreferenceParser { patterns })
    }

    /// The preference of `text`, if one can be read.
    pub fn parse(&self, text: &str) -> Option<Preference> {
        if let Some(p) = json_preference(text) {
            return Some(p);
        }
        for re in &self.patterns {
            let Some(caps) = re.captures_iter(text).last() else {
                continue;
            };
            let m = caps.get(1).or_else(|| caps.get(0))?;
            return Preference::from_text(m.as_str());
        }
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::judge::default_patterns;

    #[test]
    fn json_verdicts_are_read_first() {
        let p = ScoreParser::new(&default_patterns(), 1.0, 10.0).unwrap();
        assert_eq!(
            json_score("{\n  \"score\": 7\n}", &p),
            Some(ScoreParse::Score(7.0))
        );
        assert_eq!(
            json_score(
                "echo: ```json\n{\"reasoning\": \"ok {x}\", \"score\": \"9\"}\n```",
                &p
            ),
            Some(ScoreParse::Score(9.0))
        );
        assert_eq!(
            json_score("{\"score\": 12}", &p),
            Some(ScoreParse::OutOfRange(12.0))
        );
        assert_eq!(json_score("{\"score\": ", &p), None);
        assert_eq!(json_score("Score: 7", &p), None);
        assert_eq!(json_score("{\"grade\": 7}", &p), None);
    }

    #[test]
    fn schemas_put_the_reasoning_first() {
        let s = score_schema(1.0, 10.0, true);
        assert_eq!(s["properties"]["score"]["type"], "integer");
        assert_eq!(s["properties"]["score"]["maximum"], 10);
        assert_eq!(s["required"], json!(["reasoning", "score"]));
        let text = s.to_string();
        assert!(text.find("reasoning") < text.find("score"), "{text}");
        assert_eq!(
            score_schema(0.0, 1.5, false)["properties"]["score"]["type"],
            "number"
        );
        let p = pairwise_schema(true).to_string();
        assert!(p.find("reasoning") < p.find("winner"), "{p}");
    }

    #[test]
    fn preferences_parse() {
        let p = PreferenceParser::new(&default_pairwise_patterns()).unwrap();
        for (text, want) in [
            ("Both are fine.\nWinner: A", Some(Preference::A)),
            ("**Winner:** B", Some(Preference::B)),
            ("winner: tie", Some(Preference::Tie)),
            ("Preference: Response B", Some(Preference::B)),
            ("[[A]]", Some(Preference::A)),
            ("B", Some(Preference::B)),
            ("{\"winner\": \"tie\"}", Some(Preference::Tie)),
            (
                "echo: {\"reasoning\": \"r\", \"winner\": \"B\"}",
                Some(Preference::B),
            ),
            ("A is better than B", None),
            ("no idea", None),
        ] {
            assert_eq!(p.parse(text), want, "{text:?}");
        }
    }
}
