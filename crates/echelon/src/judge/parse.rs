//! The rubric template, the re-ask reminder, and reading a score out of the judge's text.

use regex::Regex;

use super::JudgeError;
use super::item::JudgeItem;

/// The default rubric (placeholders `{prompt}`, `{response}`, `{reference}`): a 1–10
/// score, given on a final line `最终评分: X` as the seed's judge prompt asks.
pub const DEFAULT_RUBRIC: &str = "\
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

Explain your judgement in a few sentences, then end your reply with a final line of \
exactly this form, where X is an integer from 1 to 10:
最终评分: X";

/// The default re-ask reminder (placeholders `{min}`, `{max}`), sent as a user turn after
/// the judge's answer when no score in range could be read from it.
pub const DEFAULT_REMINDER: &str = "\
I could not read a valid final rating in your reply. Answer again and end your reply with \
a final line of exactly this form, where X is a number from {min} to {max}:
最终评分: X";

/// The default score patterns, tried in order (see [`ScoreParser`]):
/// `最终评分 X` / `最终评分: X` / `最终评分：X`, then `评分: X` / `评分：X`, then `Score: X`
/// in any case (Markdown bold allowed), then a reply that is nothing but a number.
pub const DEFAULT_PATTERNS: [&str; 4] = [
    r"最终评分\**\s*[:：]?\s*\**\s*(\d+(?:\.\d+)?)",
    r"评分\**\s*[:：]\s*\**\s*(\d+(?:\.\d+)?)",
    r"(?i)\bscore\**\s*[:：]\s*\**\s*(\d+(?:\.\d+)?)",
    r"^\s*\**\s*(\d+(?:\.\d+)?)\s*\**\s*$",
];

/// The default patterns as owned strings (the default of `JudgeConfig::patterns`).
pub fn default_patterns() -> Vec<String> {
    DEFAULT_PATTERNS.iter().map(|p| (*p).to_owned()).collect()
}

/// Fills a template: each `{name}` of `values` is replaced in one left-to-right pass, so
/// text substituted in (a response containing `{reference}`, say) is never expanded
/// again. Other braces are kept as they are.
pub(crate) fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out =
        String::with_capacity(template.len() + values.iter().map(|v| v.1.len()).sum::<usize>());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let hit = values
            .iter()
            .find(|(name, _)| after.starts_with(name) && after[name.len()..].starts_with('}'));
        match hit {
            Some((name, value)) => {
                out.push_str(value);
                rest = &after[name.len() + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The rubric with an item's `{prompt}`, `{response}` and `{reference}` (empty when absent).
pub fn render_rubric(rubric: &str, item: &JudgeItem) -> String {
    fill(
        rubric,
        &[
            ("prompt", &item.prompt),
            ("response", &item.response),
            ("reference", item.reference.as_deref().unwrap_or("")),
        ],
    )
}

/// The pairwise rubric with an item's `{prompt}`, `{reference}` (empty when absent),
/// `{response_a}` and `{response_b}`; `swapped` exchanges the two responses (the
/// second order of `swap`).
pub fn render_pairwise(rubric: &str, item: &JudgeItem, swapped: bool) -> String {
    let (a, b) = match &item.pair {
        Some(pair) => (pair.a.as_str(), pair.b.as_str()),
        None => (item.response.as_str(), ""),
    };
    let (a, b) = if swapped { (b, a) } else { (a, b) };
    fill(
        rubric,
        &[
            ("prompt", &item.prompt),
            ("response_a", a),
            ("response_b", b),
            ("reference", item.reference.as_deref().unwrap_or("")),
        ],
    )
}

/// A score bound as a person writes it: `1`, not `1.0`; `7.5` stays `7.5`.
pub(crate) fn number_text(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// What [`ScoreParser::parse`] read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScoreParse {
    /// A score within `[min_score, max_score]`.
    Score(f64),
    /// A score was read, but it is outside the range.
    OutOfRange(f64),
    /// No pattern matched (or the matched text is not a number).
    Unparsed,
}

/// Reads a score out of the judge's reply with an ordered list of regexes.
///
/// The first pattern that matches anywhere in the reply decides; of its matches the LAST
/// one counts (a judge that quotes the format before its verdict is read by its verdict).
/// The score is the capture group named `score` if the pattern has one, else group 1,
/// else the whole match, parsed as a decimal number. Later patterns are not tried once
/// one matched, even when its score is out of range.
#[derive(Debug, Clone)]
pub struct ScoreParser {
    patterns: Vec<Regex>,
    min: f64,
    max: f64,
}

impl ScoreParser {
    /// Compiles the patterns; `min` and `max` bound a valid score (inclusive).
    ///
    /// # Errors
    /// [`JudgeError::Pattern`] for the first pattern that does not compile.
    pub fn new(patterns: &[String], min: f64, max: f64) -> Result<ScoreParser, JudgeError> {
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
        Ok(ScoreParser { patterns, min, max })
    }

    /// Whether `score` is in range: [`ScoreParse::Score`] or [`ScoreParse::OutOfRange`]
    /// (a non-finite number is [`ScoreParse::Unparsed`]).
    pub fn check(&self, score: f64) -> ScoreParse {
        if !score.is_finite() {
            ScoreParse::Unparsed
        } else if score >= self.min && score <= self.max {
            ScoreParse::Score(score)
        } else {
            ScoreParse::OutOfRange(score)
        }
    }

    /// Reads the score of `text`: a JSON verdict `{"score": X}` (the whole reply, or
    /// from its first `{` to its last `}`) first, then the patterns.
    pub fn parse(&self, text: &str) -> ScoreParse {
        if let Some(parsed) = super::verdict::json_score(text, self) {
            return parsed;
        }
        for re in &self.patterns {
            let Some(caps) = re.captures_iter(text).last() else {
                continue;
            };
            let m = caps
                .name("score")
                .or_else(|| caps.get(1))
                .or_else(|| caps.get(0));
            let Some(score) = m.and_then(|m| m.as_str().trim().parse::<f64>().ok()) else {
                return ScoreParse::Unparsed;
            };
            if !score.is_finite() {
                return ScoreParse::Unparsed;
            }
            return if score >= self.min && score <= self.max {
                ScoreParse::Score(score)
            } else {
                ScoreParse::OutOfRange(score)
            };
        }
        ScoreParse::Unparsed
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parser() -> ScoreParser {
        ScoreParser::new(&default_patterns(), 1.0, 10.0).unwrap()
    }

    #[test]
    fn every_seed_format_parses() {
        let p = parser();
        let cases = [
            ("很好。\n最终评分 8", 8.0),
            ("最终评分: 7", 7.0),
            ("分析……\n最终评分：6", 6.0),
            ("最终评分:9", 9.0),
            ("最终评分 **5**", 5.0),
            ("评分: 4", 4.0),
            ("评分：3", 3.0),
            ("Score: 7", 7.0),
            ("score: 7", 7.0),
            ("FINAL SCORE: 2", 2.0),
            ("**Score:** 9/10", 9.0),
            ("8", 8.0),
            ("  10 \n", 10.0),
            ("Score: 7.5", 7.5),
        ];
        for (text, want) in cases {
            assert_eq!(p.parse(text), ScoreParse::Score(want), "{text:?}");
        }
    }

    #[test]
    fn the_last_match_of_the_first_matching_pattern_wins() {
        let p = parser();
        // The format is quoted first, the verdict comes last.
        assert_eq!(
            p.parse("Use 最终评分: 1 for bad answers.\n...\n最终评分: 9"),
            ScoreParse::Score(9.0)
        );
        // 最终评分 is tried before Score even when Score comes later in the text.
        assert_eq!(p.parse("最终评分: 6\nScore: 2"), ScoreParse::Score(6.0));
        // A lone number only counts when it is the whole reply.
        assert_eq!(p.parse("I'd say 8 out of 10"), ScoreParse::Unparsed);
        assert_eq!(p.parse("no idea"), ScoreParse::Unparsed);
        assert_eq!(p.parse(""), ScoreParse::Unparsed);
    }

    #[test]
    fn out_of_range_is_not_a_score() {
        let p = parser();
        assert_eq!(p.parse("Score: 11"), ScoreParse::OutOfRange(11.0));
        assert_eq!(p.parse("最终评分: 0"), ScoreParse::OutOfRange(0.0));
        assert_eq!(p.parse("11"), ScoreParse::OutOfRange(11.0));
        // The out-of-range verdict is final: later patterns are not consulted.
        assert_eq!(
            p.parse("最终评分: 12\nScore: 5"),
            ScoreParse::OutOfRange(12.0)
        );
    }

    #[test]
    fn named_groups_and_bad_patterns() {
        let p = ScoreParser::new(&[r"(x)=(?<score>\d+)".to_owned()], 0.0, 100.0).unwrap();
        assert_eq!(p.parse("x=55"), ScoreParse::Score(55.0));
        let p = ScoreParser::new(&[r"grade ([A-F])".to_owned()], 0.0, 100.0).unwrap();
        assert_eq!(p.parse("grade B"), ScoreParse::Unparsed);
        let err = ScoreParser::new(&["ok".to_owned(), "(".to_owned()], 0.0, 1.0).unwrap_err();
        assert!(matches!(err, JudgeError::Pattern { index: 1, .. }), "{err}");
    }

    #[test]
    fn the_reminder_itself_never_parses() {
        let text = fill(DEFAULT_REMINDER, &[("min", "1"), ("max", "10")]);
        assert_eq!(parser().parse(&text), ScoreParse::Unparsed);
        assert_eq!(parser().parse(DEFAULT_RUBRIC), ScoreParse::Unparsed);
    }

    #[test]
    fn templates_fill_in_one_pass() {
        let mut item = JudgeItem::new("1", "P {response}", "R {reference}");
        assert_eq!(
            render_rubric("<{prompt}|{response}|{reference}|{other}>", &item),
            "<P {response}|R {reference}||{other}>"
        );
        item.reference = Some("ref".into());
        assert_eq!(render_rubric("{reference}{", &item), "ref{");
        assert_eq!(number_text(1.0), "1");
        assert_eq!(number_text(7.5), "7.5");
    }
}
