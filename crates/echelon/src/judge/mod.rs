//! LLM-as-judge scoring with a length-penalised reward (seed 003's reward manager).
//!
//! A [`Judge`] asks a route of the [`Gateway`] to rate responses, reads the score out of
//! the judge's reply, and turns it into a reward:
//!
//! ```text
//! length_penalty = -reward_coefficient * max(0, response_tokens - target_tokens) / target_tokens
//! reward         = score + length_penalty
//! ```
//!
//! where `response_tokens` counts the judged RESPONSE (not the judge's reply) with
//! `cl100k_base`, `reward_coefficient` defaults to 0.1 and `target_tokens` to 512; with
//! `target_tokens = 0` the penalty is 0. (A 1024-token response with score 7 gets
//! `7 - 0.1 * 512 / 512 = 6.9`.)
//!
//! # Items
//! Input lines are JSON objects `{"id", "prompt", "response", "reference"?, ...}`
//! ([`JudgeItem::from_json_line`]): `id` is a string or a number (written back as given),
//! every other field is copied to the output line.
//!
//! # Asking the judge
//! The rubric ([`DEFAULT_RUBRIC`], or your own) is a template with `{prompt}`,
//! `{response}` and `{reference}` (empty when absent), sent as one user message with
//! `temperature` (default 0; 0.7 with `samples > 1`) and `max_tokens`, plus `seed`,
//! `reasoning_effort` and `extra_body` when set. The score is read from a JSON verdict
//! `{"score": X}` if the reply holds one, else with an ordered list of regexes
//! ([`ScoreParser`], [`DEFAULT_PATTERNS`]): the first pattern that matches decides, and of
//! its matches the last one counts. A score outside `[min_score, max_score]` (default
//! 1..=10), or no score at all, makes the judge be asked again up to `max_reasks` times
//! (default 2): its answer and a reminder of the format ([`DEFAULT_REMINDER`]) are
//! appended as a follow-up turn. If no ask gives a score, the item gets
//! `"error": "unparsed"` and the judge's last reply in `raw`, never a made-up score. A
//! judge call that fails gets `"error": "<status>: <message>"` (the
//! [`GatewayError`](crate::GatewayError) status and message) and no score.
//!
//! ## Structured verdicts
//! With [`VerdictMode::JsonSchema`] (or [`VerdictMode::Auto`] on a route whose every model
//! declares `structured_output: true`) each ask carries OpenAI `response_format:
//! {type: json_schema, json_schema: {name: "verdict", strict: true, schema}}` with the
//! schema of `{"score": <integer in range>}` ([`score_schema`]; `{"winner": "A" | "B" |
//! "tie"}` pairwise, [`pairwise_schema`]), a `"reasoning"` string first with
//! `reasoning_field`. llama-server and vLLM constrain the output to it. The default
//! rubric and reminder become their JSON forms ([`DEFAULT_JSON_RUBRIC`]); the re-asks stay.
//!
//! ## Length re-asks
//! An answer cut by `finish_reason: length` before a verdict is asked again once (the
//! same messages, not a follow-up turn) with `min(2 × max_tokens, max_tokens_cap)`
//! tokens, counted in `length_reasks`; later re-asks keep that budget.
//!
//! ## Voting
//! With `samples = K > 1` each item is judged K times, each call its own cache entry and
//! `seed + i`; the scores are combined by `aggregate` (mean, median, majority) and the
//! line gains `samples`, `aggregate`, `stdev`. Fewer than `quorum` (default `K / 2 + 1`)
//! parsed samples is `"error": "no_quorum"`, never a partial guess. Each sample takes
//! one of the `concurrency` slots, so at most `concurrency` judge calls are in flight.
//!
//! ## Pairwise
//! With [`JudgeMode::Pairwise`] items have `response_a` and `response_b` instead of
//! `response` ([`JudgeItem::from_json_line_pairwise`]); the rubric
//! ([`DEFAULT_PAIRWISE_RUBRIC`]) has `{prompt}`, `{reference}`, `{response_a}` and
//! `{response_b}`, and the judge answers A, B or tie. With `swap` each pair is also asked
//! as B then A (read back to the input's order); `position_consistent` says whether the
//! orders agree, and an inconsistent pair is a tie or `"error": "inconsistent"`
//! (`inconsistent`). The line has `preference`, `p_a` (share of parsed samples preferring
//! A) and `samples`; `score` and `reward` are null.
//!
//! # Output lines
//! One JSON object per item ([`Judgement`]): `id`, `score`, `reward`, `length_penalty`,
//! (pairwise: `preference`, `p_a`, `position_consistent`; votes: `samples`,
//! `aggregate`, `stdev`), `response_tokens`, `raw`, `route`, `model`, `attempts`,
//! `reasks`, `length_reasks`, `tokens: {prompt, completion}`, `cost` (USD), `cached`,
//! `latency_ms`, `error` and `sample_errors` (when there are), `prompt`/`response`/
//! `reference` with `keep_inputs`, then the extra input fields.
//!
//! # Concurrency, cache, resume
//! At most `concurrency` items are judged at once (default 64), whatever the entry point:
//! [`Judge::judge_one`] waits for a slot. [`Judge::run_file`] streams: it reads the input
//! lazily and appends each result as it completes (one write of the full line and its
//! newline, then a flush), so a `kill -9` loses only in-flight items. Memory stays flat:
//! the ids the run has met (for resume and duplicate detection) are kept in memory up to
//! 16,384, then in a temporary SQLite database (the `seen` module).
//! Re-run on the same output, it truncates a trailing partial line and skips every id
//! already written. With `cache_path`, scored judgements are kept in SQLite and a re-run
//! of the same items is served from it (`cached: true`, no upstream call, and zero
//! `attempts`, `tokens` and `cost`: those count what this run spent); see [Cache
//! key](#cache-key). With `cache_url` (`redis://…`, `rediss://…`) the entries are kept
//! in Redis instead, under `<state.key_prefix>judge:<key>` (the same JSON as in the
//! file, expiring after `cache_ttl` if set), so parallel judge processes on one Redis
//! never pay twice for an item; a Redis that fails or is slower than 2 s never fails an
//! item: the outage is logged once and items are judged uncached until it answers.
//!
//! ## Cache key
//! Hex SHA-256 of the route, the rubric, the reminder, the patterns, the score range,
//! `max_reasks`, `temperature`, `max_tokens`, the verdict mode, `reasoning_field`, the
//! mode, `seed`, `reasoning_effort`, `max_tokens_cap` and `extra_body` (each left out at
//! its default, so older keys stay valid), and the item's prompt, response (or
//! `response_a` and `response_b`) and reference, the sample's index and whether the pair
//! was swapped. One entry per sample. The reward parameters are not in it: a cached score is re-rewarded with the
//! current ones. Errors and unparsed answers are never cached.

mod cache;
mod item;
mod options;
mod output;
mod parse;
mod reward;
mod run;
mod seen;
mod verdict;
mod vote;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use echelon_types::{ChatCompletionRequest, ChatMessage, Role};
use futures::{FutureExt, Stream, StreamExt};
use tokio::runtime::{Handle, Runtime, RuntimeFlavor};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::Gateway;
use crate::routing::DEFAULT_ROUTE_ALIAS;
use crate::tokens::Encoding;
use crate::usage::TokenCount;

pub use item::{ItemId, JudgeItem, ResponsePair};
pub use options::{Aggregate, Inconsistent, JudgeMode, ParseModeError, Preference, VerdictMode};
pub use output::{
    INCONSISTENT, JudgeTokens, Judgement, KeptInputs, NO_QUORUM, PairVerdict, UNPARSED, Votes,
};
pub use parse::{
    DEFAULT_PATTERNS, DEFAULT_REMINDER, DEFAULT_RUBRIC, ScoreParse, ScoreParser, default_patterns,
    render_pairwise, render_rubric,
};
pub use reward::{length_penalty, reward};
pub use run::{
    BadLine, ErrorTally, MAX_BAD_LINES_KEPT, MAX_ERROR_IDS_KEPT, Progress, RunSummary, count_lines,
};
pub use verdict::{
    DEFAULT_JSON_REMINDER, DEFAULT_JSON_RUBRIC, DEFAULT_PAIRWISE_PATTERNS,
    DEFAULT_PAIRWISE_REMINDER, DEFAULT_PAIRWISE_RUBRIC, PreferenceParser,
    default_pairwise_patterns, pairwise_schema, response_format, score_schema,
};
pub use vote::{aggregate, majority, stdev};

/// Default [`JudgeConfig::max_tokens_cap`]: 4096 tokens.
pub const DEFAULT_MAX_TOKENS_CAP: u32 = 4096;

/// Default sampling temperature of a judge with `samples > 1` (0 with one sample).
pub const DEFAULT_SAMPLE_TEMPERATURE: f64 = 0.7;

/// Most samples per item ([`JudgeConfig::samples`]).
pub const MAX_SAMPLES: u32 = 100;

use cache::{Cache, CachedJudgement, FileCache, KeyBase, KeyParams, RedisCache};

/// Whether a cache target (`echelon judge --cache`, the Python `cache=`) names a Redis
/// ([`JudgeConfig::cache_url`]: `redis://`, `rediss://`, `valkey://`, `valkeys://`,
/// `redis+unix://`, `unix://`) rather than a file ([`JudgeConfig::cache_path`]).
pub fn is_cache_url(target: &str) -> bool {
    let t = target.trim_start();
    crate::config::REDIS_SCHEMES
        .iter()
        .any(|s| t.starts_with(s))
}

/// What a [`Judge`] does; build with `..JudgeConfig::default()`.
#[derive(Debug, Clone, PartialEq)]
pub struct JudgeConfig {
    /// The gateway route the judge is asked on (a model id or a task group). Default
    /// `"default"`: the configured `default_route`, resolved by [`Judge::new`] (so
    /// [`Judge::config`], the output lines and the cache key name the real route).
    pub route: String,
    /// The rubric template (`{prompt}`, `{response}`, `{reference}`); must contain
    /// `{response}`. Default [`DEFAULT_RUBRIC`].
    pub rubric: String,
    /// The re-ask reminder (`{min}`, `{max}`). Default [`DEFAULT_REMINDER`].
    pub reminder: String,
    /// Score regexes, tried in order ([`ScoreParser`]). Default [`DEFAULT_PATTERNS`].
    pub patterns: Vec<String>,
    /// Lowest valid score (inclusive). Default 1.
    pub min_score: f64,
    /// Highest valid score (inclusive). Default 10.
    pub max_score: f64,
    /// Re-asks after an unreadable or out-of-range answer. Default 2 (3 asks at most).
    pub max_reasks: u32,
    /// Weight of the length penalty. Default 0.1.
    pub reward_coefficient: f64,
    /// Response length (cl100k tokens) above which the penalty starts; 0 disables it.
    /// Default 512.
    pub target_tokens: u64,
    /// Sampling temperature of the judge. Default `None`: 0 with one sample,
    /// [`DEFAULT_SAMPLE_TEMPERATURE`] (0.7) with `samples > 1`; [`Judge::new`] resolves
    /// it, so [`Judge::config`] gives the temperature sent.
    pub temperature: Option<f64>,
    /// `max_tokens` of the judge. Default `None`.
    pub max_tokens: Option<u32>,
    /// An answer cut by `finish_reason: length` before a verdict is asked again once
    /// with `min(2 × max_tokens, max_tokens_cap)` tokens (with `max_tokens` unset:
    /// `max_tokens_cap`), counted in [`Judgement::length_reasks`]; no re-ask when that is
    /// not more than the first. `None`: no cap on the doubling (and no length re-ask
    /// without `max_tokens`). Default `Some(`[`DEFAULT_MAX_TOKENS_CAP`]`)`.
    pub max_tokens_cap: Option<u32>,
    /// How the verdict is asked for and read. Default [`VerdictMode::Auto`].
    pub verdict: VerdictMode,
    /// With the JSON verdict: the schema asks for a `"reasoning"` string before the
    /// verdict (a small judge reasons before it decides). Default `false`.
    pub reasoning_field: bool,
    /// Independent judgements per item (1 to [`MAX_SAMPLES`]), each its own call and
    /// cache entry, combined by [`aggregate`](Self::aggregate). Default 1.
    pub samples: u32,
    /// How the samples' scores are combined. Default [`Aggregate::Mean`].
    pub aggregate: Aggregate,
    /// Parsed samples an item needs (per order, pairwise), 1 to `samples`; fewer is an
    /// error line `"error": "no_quorum"` (with `samples > 1`), never a partial guess.
    /// `None`: a majority, `samples / 2 + 1`; [`Judge::new`] resolves it.
    pub quorum: Option<u32>,
    /// The `seed` sent to the judge: sample `i` (counted over both orders with `swap`)
    /// gets `seed + i`, so samples differ yet a run can be repeated. Default `None` (no
    /// seed sent).
    pub seed: Option<u64>,
    /// `reasoning_effort` sent as is (`low`, `medium`, `high` for reasoning models).
    /// Default `None`.
    pub reasoning_effort: Option<String>,
    /// Extra fields merged into every judge request body (`top_k`, vendor options); the
    /// judge's own fields win (`model`, `messages`, `temperature`, `max_tokens`, `stream`,
    /// `seed`, `reasoning_effort`, `response_format` are never taken from here when the
    /// judge sets them). Default empty.
    pub extra_body: serde_json::Map<String, serde_json::Value>,
    /// Pointwise scores or pairwise preferences. Default [`JudgeMode::Pointwise`].
    pub mode: JudgeMode,
    /// Pairwise: judge each pair in both orders (A then B, B then A) and report
    /// `position_consistent`. Default `false`.
    pub swap: bool,
    /// Pairwise with `swap`: what a pair whose orders disagree becomes. Default
    /// [`Inconsistent::Tie`].
    pub inconsistent: Inconsistent,
    /// Judge calls in flight at once, at most (one per sample; [`Judge::run_file`] also
    /// keeps at most this many items open). Default 64.
    pub concurrency: usize,
    /// The SQLite cache file; `None` (the default) disables the cache (unless
    /// [`cache_url`](Self::cache_url) is set).
    pub cache_path: Option<PathBuf>,
    /// The Redis the cache lives in instead of a file (issue 15): a `redis://` or
    /// `rediss://` (TLS) URL, checked by [`Judge::new`]; every judge on it shares the
    /// entries (`<state.key_prefix>judge:<key>`: the gateway's `state.key_prefix` when its
    /// `state.backend` is `redis`, else `echelon:`). Redis failing never fails an item (it is logged
    /// once, and the items are judged uncached until Redis answers). Setting it and
    /// `cache_path` is an error. Default `None`; [`is_cache_url`] tells a URL from a path.
    pub cache_url: Option<String>,
    /// With [`cache_url`](Self::cache_url): entries expire this long after they are
    /// written (`None`, the default: never; must be at least 1 ms).
    pub cache_ttl: Option<Duration>,
    /// Copy `prompt`, `response` and `reference` to the output lines. Default `false`.
    pub keep_inputs: bool,
    /// [`Judge::run_file`]: judge at most this many new items in this run (items
    /// already in the output do not count). `None` (default) = all.
    pub max_items: Option<u64>,
}

impl Default for JudgeConfig {
    fn default() -> JudgeConfig {
        JudgeConfig {
            route: DEFAULT_ROUTE_ALIAS.to_owned(),
            rubric: DEFAULT_RUBRIC.to_owned(),
            reminder: DEFAULT_REMINDER.to_owned(),
            patterns: default_patterns(),
            min_score: 1.0,
            max_score: 10.0,
            max_reasks: 2,
            reward_coefficient: 0.1,
            target_tokens: 512,
            temperature: None,
            max_tokens: None,
            max_tokens_cap: Some(DEFAULT_MAX_TOKENS_CAP),
            verdict: VerdictMode::Auto,
            reasoning_field: false,
            samples: 1,
            aggregate: Aggregate::Mean,
            quorum: None,
            seed: None,
            reasoning_effort: None,
            extra_body: serde_json::Map::new(),
            mode: JudgeMode::Pointwise,
            swap: false,
            inconsistent: Inconsistent::Tie,
            concurrency: 64,
            cache_path: None,
            cache_url: None,
            cache_ttl: None,
            keep_inputs: false,
            max_items: None,
        }
    }
}

/// Why a [`Judge`] cannot be built or a run cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    /// A setting is invalid.
    #[error("invalid judge setting: {0}")]
    Config(String),
    /// The route is not a route of the gateway.
    #[error("route `{route}` is not a route of this gateway (known: {known})")]
    UnknownRoute {
        /// The route asked for.
        route: String,
        /// Some known routes, comma-separated.
        known: String,
    },
    /// A score pattern does not compile.
    #[error("score pattern {index} `{pattern}` is not a valid regex: {source}")]
    Pattern {
        /// Its position in `patterns` (0-based).
        index: usize,
        /// The pattern.
        pattern: String,
        /// The regex error.
        source: regex::Error,
    },
    /// The directory of the cache file does not exist and cannot be created.
    #[error("judge cache: cannot create the directory {}: {source}", path.display())]
    CacheDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The Redis URL of the cache ([`JudgeConfig::cache_url`]) is not one.
    #[error("judge cache: {0}")]
    CacheUrl(String),
    /// The cache file cannot be opened.
    #[error("{}", cache_message(path, source))]
    Cache {
        /// The cache file.
        path: PathBuf,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// The temporary database of the run's ids (resume and duplicate detection) failed,
    /// e.g. its disk is full. Lines written so far stay; a re-run resumes after them.
    #[error("the run's id index (a temporary SQLite database) failed: {0}")]
    SeenIds(rusqlite::Error),
    /// Reading the input or reading/writing the output failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The existing output file has a complete line that is not a judgement line, so it
    /// is not appended to.
    #[error("{}:{line}: cannot resume: {reason}", path.display())]
    Resume {
        /// The output file.
        path: PathBuf,
        /// The 1-based line number.
        line: u64,
        /// What is wrong with it.
        reason: String,
    },
}

/// `judge cache <path>: <SQLite error>`, the path said once: SQLite's "unable to open
/// database file" message already ends with it (rusqlite adds `: <path>`).
fn cache_message(path: &Path, source: &rusqlite::Error) -> String {
    let path = path.display().to_string();
    let text = source.to_string();
    let text = text
        .strip_suffix(path.as_str())
        .and_then(|t| t.strip_suffix(": "))
        .unwrap_or(&text);
    format!("judge cache {path}: {text}")
}

/// Scores responses with an LLM judge through a [`Gateway`]; see the [module docs](self).
///
/// Cheap to share behind an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct Judge {
    inner: Arc<Inner>,
    /// The runtime of [`score_batch`](Self::score_batch), made on first use.
    runtime: OnceLock<Result<Runtime, String>>,
}

#[derive(Debug)]
struct Inner {
    gateway: Arc<Gateway>,
    config: JudgeConfig,
    parser: ScoreParser,
    /// Pairwise: the preference parser (from `patterns`).
    pref_parser: Option<PreferenceParser>,
    /// The reminder with `{min}` and `{max}` filled in.
    reminder: String,
    /// The JSON verdict mode: the `response_format` sent with every ask.
    response_format: Option<serde_json::Value>,
    /// The resolved quorum.
    quorum: u32,
    key_base: KeyBase,
    cache: Option<Cache>,
    /// `concurrency` permits: one per judge call (sample) in flight.
    slots: Semaphore,
}

impl Judge {
    /// Checks the config, fills in the defaults that depend on other settings, compiles
    /// the patterns and opens the cache.
    ///
    /// Resolved here (and so seen in [`config`](Self::config)): the `"default"` route;
    /// [`VerdictMode::Auto`] (the JSON schema when every model behind the route declares
    /// `structured_output: true`, else the patterns); `temperature` (0, or 0.7 with
    /// `samples > 1`); `quorum` (`samples / 2 + 1`); and, when left at their defaults,
    /// the rubric, reminder and patterns of the mode ([`DEFAULT_JSON_RUBRIC`] and
    /// [`DEFAULT_JSON_REMINDER`] with the JSON verdict; [`DEFAULT_PAIRWISE_RUBRIC`],
    /// [`DEFAULT_PAIRWISE_REMINDER`] and [`DEFAULT_PAIRWISE_PATTERNS`] pairwise).
    ///
    /// # Errors
    /// An invalid setting (`min_score > max_score`, a non-finite number, `concurrency` 0,
    /// a rubric without `{response}` (pairwise: `{response_a}` and `{response_b}`), no
    /// patterns, `samples` 0 or above [`MAX_SAMPLES`], a quorum of 0 or above `samples`),
    /// an unknown route, a pattern that does not compile, or a cache file that cannot be
    /// opened.
    pub fn new(gateway: Arc<Gateway>, mut config: JudgeConfig) -> Result<Judge, JudgeError> {
        validate(&config)?;
        check_route(&gateway, &config.route)?;
        // Load the tokenizer for response lengths now (tens of ms, once per process)
        // rather than inside the first item's judgement.
        crate::tokens::Encoding::Cl100kBase.count("");
        if config.route == DEFAULT_ROUTE_ALIAS
            && !gateway.routes().iter().any(|r| r.id == DEFAULT_ROUTE_ALIAS)
            && let Some(default) = gateway.default_route()
        {
            config.route = default.to_owned();
        }
        if config.verdict == VerdictMode::Auto {
            config.verdict = if route_is_structured(&gateway, &config.route) {
                VerdictMode::JsonSchema
            } else {
                VerdictMode::Regex
            };
        }
        let json = config.verdict == VerdictMode::JsonSchema;
        let pairwise = config.mode == JudgeMode::Pairwise;
        if pairwise {
            if config.rubric == DEFAULT_RUBRIC {
                config.rubric = DEFAULT_PAIRWISE_RUBRIC.to_owned();
            }
            if config.reminder == DEFAULT_REMINDER {
                config.reminder = DEFAULT_PAIRWISE_REMINDER.to_owned();
            }
            if config.patterns == default_patterns() {
                config.patterns = default_pairwise_patterns();
            }
            if !config.rubric.contains("{response_a}") || !config.rubric.contains("{response_b}") {
                return Err(JudgeError::Config(
                    "a pairwise rubric needs both `{response_a}` and `{response_b}`".into(),
                ));
            }
        } else if json {
            if config.rubric == DEFAULT_RUBRIC {
                config.rubric = DEFAULT_JSON_RUBRIC.to_owned();
            }
            if config.reminder == DEFAULT_REMINDER {
                config.reminder = DEFAULT_JSON_REMINDER.to_owned();
            }
        }
        config.temperature = Some(config.temperature.unwrap_or(if config.samples > 1 {
            DEFAULT_SAMPLE_TEMPERATURE
        } else {
            0.0
        }));
        let quorum = config.quorum.unwrap_or(config.samples / 2 + 1);
        config.quorum = Some(quorum);
        let parser = ScoreParser::new(&config.patterns, config.min_score, config.max_score)?;
        let pref_parser = if pairwise {
            Some(PreferenceParser::new(&config.patterns)?)
        } else {
            None
        };
        let response_format = json.then(|| {
            response_format(if pairwise {
                pairwise_schema(config.reasoning_field)
            } else {
                score_schema(config.min_score, config.max_score, config.reasoning_field)
            })
        });
        let reminder = parse::fill(
            &config.reminder,
            &[
                ("min", &parse::number_text(config.min_score)),
                ("max", &parse::number_text(config.max_score)),
            ],
        );
        let key_base = KeyBase::new(&KeyParams {
            route: &config.route,
            rubric: &config.rubric,
            reminder: &config.reminder,
            patterns: &config.patterns,
            min_score: config.min_score,
            max_score: config.max_score,
            max_reasks: config.max_reasks,
            temperature: config.temperature,
            max_tokens: config.max_tokens,
            verdict: config.verdict.name(),
            reasoning_field: config.reasoning_field,
            mode: config.mode.name(),
            seed: config.seed,
            reasoning_effort: config.reasoning_effort.as_deref(),
            max_tokens_cap: config
                .max_tokens_cap
                .filter(|c| *c != DEFAULT_MAX_TOKENS_CAP),
            extra_body: (!config.extra_body.is_empty()).then_some(&config.extra_body),
        });
        let cache = match (&config.cache_path, &config.cache_url) {
            (None, None) => None,
            (_, Some(url)) => {
                let prefix = gateway.registry().shared_state().map_or_else(
                    || crate::config::StateConfig::DEFAULT_KEY_PREFIX.to_owned(),
                    |s| s.key(""),
                );
                Some(Cache::Redis(
                    RedisCache::new(url, &prefix, config.cache_ttl)
                        .map_err(|e| JudgeError::CacheUrl(e.to_string()))?,
                ))
            }
            (Some(path), None) => {
                // A fresh machine has no data directory yet: create it, as the ledger does.
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|source| JudgeError::CacheDir {
                        path: dir.to_owned(),
                        source,
                    })?;
                }
                Some(Cache::File(FileCache::open(path).map_err(|source| {
                    JudgeError::Cache {
                        path: path.clone(),
                        source,
                    }
                })?))
            }
        };
        let slots = Semaphore::new(config.concurrency);
        Ok(Judge {
            inner: Arc::new(Inner {
                gateway,
                config,
                parser,
                pref_parser,
                reminder,
                response_format,
                quorum,
                key_base,
                cache,
                slots,
            }),
            runtime: OnceLock::new(),
        })
    }

    /// The config (with `"default"` resolved to the route it stands for).
    pub fn config(&self) -> &JudgeConfig {
        &self.inner.config
    }

    /// The score parser built from the config.
    pub fn parser(&self) -> &ScoreParser {
        &self.inner.parser
    }

    /// Judges one item: the cache, else the judge (with re-asks). Never fails: errors are
    /// in [`Judgement::error`]. Each sample waits for one of the `concurrency` slots.
    pub async fn judge_one(&self, item: &JudgeItem) -> Judgement {
        self.inner.judge_one(item).await
    }

    /// Judges a stream of items, at most `concurrency` at once; results come out as they
    /// complete (not in input order). Dropping the stream cancels the items in flight.
    pub fn judge_stream<'a>(
        &'a self,
        items: impl Stream<Item = JudgeItem> + 'a,
    ) -> impl Stream<Item = Judgement> + 'a {
        let inner = &*self.inner;
        items
            .map(move |item| async move { inner.judge_one(&item).await })
            .buffer_unordered(inner.config.concurrency)
    }

    /// Judges `items` from synchronous code and returns their judgements in input order.
    ///
    /// It runs on a multi-thread tokio runtime owned by this `Judge`, made on first use and
    /// reused by every later call (shut down when the `Judge` is dropped).
    ///
    /// Meant for callers outside any async runtime (an RL reward manager's
    /// `__call__`). Called from inside a runtime anyway:
    /// - a multi-thread runtime: the call is wrapped in `tokio::task::block_in_place`, which
    ///   is safe but blocks that worker thread until the batch is done;
    /// - a current-thread runtime: blocking there could deadlock, so nothing is judged and
    ///   every item gets `"error": "internal: score_batch called inside a current-thread
    ///   tokio runtime; use judge_one or judge_stream"`.
    pub fn score_batch(&self, items: Vec<JudgeItem>) -> Vec<Judgement> {
        let current = Handle::try_current().ok();
        if current
            .as_ref()
            .is_some_and(|h| h.runtime_flavor() != RuntimeFlavor::MultiThread)
        {
            let why = "internal: score_batch called inside a current-thread tokio runtime; \
                       use judge_one or judge_stream";
            return items
                .iter()
                .map(|item| self.inner.failed(item, Instant::now(), why.to_owned()))
                .collect();
        }
        let runtime = self.runtime.get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("echelon-judge")
                .build()
                .map_err(|e| format!("internal: cannot start the judge runtime: {e}"))
        });
        let runtime = match runtime {
            Ok(rt) => rt,
            Err(why) => {
                return items
                    .iter()
                    .map(|item| self.inner.failed(item, Instant::now(), why.clone()))
                    .collect();
            }
        };
        let batch = Arc::clone(&self.inner).judge_all(items);
        if current.is_some() {
            tokio::task::block_in_place(|| runtime.block_on(batch))
        } else {
            runtime.block_on(batch)
        }
    }
}

impl Drop for Judge {
    fn drop(&mut self) {
        // Dropping a runtime inside an async context panics; this never does.
        if let Some(Ok(runtime)) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn validate(c: &JudgeConfig) -> Result<(), JudgeError> {
    let bad = |m: String| Err(JudgeError::Config(m));
    if !c.min_score.is_finite() || !c.max_score.is_finite() {
        return bad("min_score and max_score must be finite numbers".into());
    }
    if c.min_score > c.max_score {
        return bad(format!(
            "min_score {} is above max_score {}",
            c.min_score, c.max_score
        ));
    }
    if !c.reward_coefficient.is_finite() {
        return bad("reward_coefficient must be a finite number".into());
    }
    if c.temperature.is_some_and(|t| !t.is_finite() || t < 0.0) {
        return bad("temperature must be a number ≥ 0".into());
    }
    if c.concurrency == 0 {
        return bad("concurrency must be at least 1".into());
    }
    if c.cache_path.is_some() && c.cache_url.is_some() {
        return bad("cache_path and cache_url are both set: the cache is a file or a Redis".into());
    }
    if let Some(url) = &c.cache_url {
        crate::config::check_redis_url(url).map_err(JudgeError::CacheUrl)?;
    }
    if c.cache_ttl.is_some_and(|t| t < Duration::from_millis(1)) {
        return bad("cache_ttl must be at least 1 ms".into());
    }
    if c.concurrency > Semaphore::MAX_PERMITS {
        return bad(format!("concurrency {} is too large", c.concurrency));
    }
    if c.mode == JudgeMode::Pointwise && !c.rubric.contains("{response}") {
        return bad(
            "the rubric has no `{response}` placeholder: the judge would never see the response"
                .into(),
        );
    }
    if c.patterns.is_empty() {
        return bad("at least one score pattern is needed".into());
    }
    if c.samples == 0 || c.samples > MAX_SAMPLES {
        return bad(format!(
            "samples must be 1 to {MAX_SAMPLES}, not {}",
            c.samples
        ));
    }
    if let Some(q) = c.quorum
        && (q == 0 || q > c.samples)
    {
        return bad(format!(
            "quorum must be 1 to samples ({}), not {q}",
            c.samples
        ));
    }
    if c.max_tokens_cap == Some(0) {
        return bad("max_tokens_cap must be at least 1".into());
    }
    Ok(())
}

/// Whether every model behind `route` declares `structured_output: true`.
fn route_is_structured(gateway: &Gateway, route: &str) -> bool {
    let routes = gateway.routes();
    let Some(info) = routes.iter().find(|r| r.id == route) else {
        return false;
    };
    !info.models.is_empty()
        && info
            .models
            .iter()
            .all(|m| gateway.model(m).is_some_and(|m| m.structured_output()))
}

fn check_route(gateway: &Gateway, route: &str) -> Result<(), JudgeError> {
    let known = gateway.routes().iter().any(|r| r.id == route)
        || (route == DEFAULT_ROUTE_ALIAS && gateway.default_route().is_some());
    if known {
        return Ok(());
    }
    let routes = gateway.routes();
    let mut names: Vec<&str> = routes.iter().map(|r| r.id.as_str()).collect();
    names.sort_unstable();
    let more = names.len().saturating_sub(10);
    names.truncate(10);
    let mut known = names.join(", ");
    if more > 0 {
        known.push_str(&format!(", … ({more} more)"));
    }
    Err(JudgeError::UnknownRoute {
        route: route.to_owned(),
        known,
    })
}

/// What the calls of one item cost.
#[derive(Debug, Default)]
struct Spend {
    attempts: u32,
    reasks: u32,
    length_reasks: u32,
    tokens: JudgeTokens,
    cost: f64,
}

impl Spend {
    /// `j` with this spend (attempts, re-asks, tokens, cost) filled in.
    fn onto(self, j: Judgement) -> Judgement {
        Judgement {
            attempts: self.attempts,
            reasks: self.reasks,
            length_reasks: self.length_reasks,
            tokens: self.tokens,
            cost: self.cost,
            ..j
        }
    }

    fn add(&mut self, other: &Spend) {
        self.attempts += other.attempts;
        self.reasks += other.reasks;
        self.length_reasks += other.length_reasks;
        self.tokens.prompt += other.tokens.prompt;
        self.tokens.completion += other.tokens.completion;
        self.cost += other.cost;
    }
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What one sample read.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Verdict {
    Score(f64),
    Pref(Preference),
}

/// One judge call of an item (with its re-asks): its verdict or why there is none.
#[derive(Debug)]
struct Sample {
    verdict: Option<Verdict>,
    /// A failed call: `"<status>: <message>"`. `None` with no verdict: unparsed.
    error: Option<String>,
    raw: Option<String>,
    model: Option<String>,
    spend: Spend,
    cached: bool,
    /// When its slot was granted.
    started: Instant,
    busy_ms: u64,
}

impl Sample {
    fn error_text(&self) -> &str {
        self.error.as_deref().unwrap_or(UNPARSED)
    }
}

impl Inner {
    /// A judgement of `item` with nothing set but its id, inputs and extras.
    fn blank(&self, item: &JudgeItem, started: Instant) -> Judgement {
        Judgement {
            id: item.id.clone(),
            score: None,
            reward: None,
            length_penalty: None,
            response_tokens: 0,
            raw: None,
            route: self.config.route.clone(),
            model: None,
            attempts: 0,
            reasks: 0,
            length_reasks: 0,
            votes: None,
            pairwise: None,
            sample_errors: Vec::new(),
            busy_ms: 0,
            tokens: JudgeTokens::default(),
            cost: 0.0,
            cached: false,
            latency_ms: millis(started.elapsed()),
            error: None,
            inputs: self.config.keep_inputs.then(|| KeptInputs {
                prompt: item.prompt.clone(),
                response: item.response.clone(),
                reference: item.reference.clone(),
                pair: item.pair.as_ref().map(|p| (p.a.clone(), p.b.clone())),
            }),
            extra: item.extra.clone(),
        }
    }

    fn failed(&self, item: &JudgeItem, started: Instant, error: String) -> Judgement {
        Judgement {
            error: Some(error),
            ..self.blank(item, started)
        }
    }

    /// `blank` with the score, reward and spend filled in.
    fn scored(
        &self,
        item: &JudgeItem,
        started: Instant,
        score: f64,
        response_tokens: u64,
        spend: Spend,
    ) -> Judgement {
        let penalty = length_penalty(
            response_tokens,
            self.config.target_tokens,
            self.config.reward_coefficient,
        );
        spend.onto(Judgement {
            score: Some(score),
            reward: Some(score + penalty),
            length_penalty: Some(penalty),
            response_tokens,
            ..self.blank(item, started)
        })
    }

    /// The verdict of a reply, as the mode reads it.
    fn read(&self, text: &str) -> (Option<Verdict>, ScoreParse) {
        match &self.pref_parser {
            Some(p) => match p.parse(text) {
                Some(pref) => (Some(Verdict::Pref(pref)), ScoreParse::Unparsed),
                None => (None, ScoreParse::Unparsed),
            },
            None => match self.parser.parse(text) {
                ScoreParse::Score(s) => (Some(Verdict::Score(s)), ScoreParse::Score(s)),
                other => (None, other),
            },
        }
    }

    /// One judge request body.
    fn request(
        &self,
        messages: &[ChatMessage],
        index: u32,
        max_tokens: Option<u32>,
    ) -> ChatCompletionRequest {
        let mut req = ChatCompletionRequest::new(self.config.route.clone(), messages.to_vec());
        req.extra = self.config.extra_body.clone();
        // Fields of the request itself are set below, never twice.
        for own in [
            "model",
            "messages",
            "stream",
            "stream_options",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "user",
        ] {
            req.extra.remove(own);
        }
        req.temperature = self.config.temperature;
        req.max_tokens = max_tokens;
        if let Some(seed) = self.config.seed {
            req.extra
                .insert("seed".into(), seed.saturating_add(u64::from(index)).into());
        }
        if let Some(effort) = &self.config.reasoning_effort {
            req.extra
                .insert("reasoning_effort".into(), effort.clone().into());
        }
        if let Some(format) = &self.response_format {
            req.extra.insert("response_format".into(), format.clone());
        }
        req
    }

    /// `max_tokens` of the length re-ask after an answer cut at `current`: twice it,
    /// capped; `None` when that would not be more.
    fn longer(&self, current: Option<u32>) -> Option<u32> {
        let next = match (current, self.config.max_tokens_cap) {
            (Some(m), Some(cap)) => m.saturating_mul(2).min(cap),
            (Some(m), None) => m.saturating_mul(2),
            (None, cap) => cap?,
        };
        (current.is_none_or(|m| next > m)).then_some(next)
    }

    /// Judges one sample of `item` (`index` among its calls; `swapped` shows a pair as B
    /// then A): the cache, else the judge with re-asks. Holds a concurrency slot.
    async fn sample(&self, item: &JudgeItem, index: u32, swapped: bool) -> Sample {
        // The semaphore is never closed; should it be, judge without a slot.
        let _slot = self.slots.acquire().await.ok();
        let started = Instant::now();
        let pairwise = self.pref_parser.is_some();
        let key = self
            .cache
            .as_ref()
            .map(|_| self.key_base.key(item, index, swapped));
        let done_with = |verdict, error, raw, model, spend, cached| Sample {
            verdict,
            error,
            raw,
            model,
            spend,
            cached,
            started,
            busy_ms: millis(started.elapsed()),
        };

        if let (Some(cache), Some(key)) = (&self.cache, &key)
            && let Some(hit) = cache.get(key.clone()).await
        {
            let verdict = match hit.preference {
                Some(p) if pairwise => Some(Verdict::Pref(p)),
                None if !pairwise
                    && hit.score >= self.config.min_score
                    && hit.score <= self.config.max_score =>
                {
                    Some(Verdict::Score(hit.score))
                }
                _ => None,
            };
            if verdict.is_some() {
                return done_with(
                    verdict,
                    None,
                    Some(hit.raw),
                    hit.model,
                    Spend::default(),
                    true,
                );
            }
        }

        let mut spend = Spend::default();
        let mut raw: Option<String> = None;
        let mut model: Option<String> = None;
        let first = if pairwise {
            render_pairwise(&self.config.rubric, item, swapped)
        } else {
            render_rubric(&self.config.rubric, item)
        };
        let mut messages = vec![ChatMessage::new(Role::User, first)];
        let mut max_tokens = self.config.max_tokens;
        let mut ask = 0;
        loop {
            spend.reasks = ask;
            let req = self.request(&messages, index, max_tokens);
            let done = match self.gateway.chat(req).await {
                Ok(done) => done,
                Err(e) => {
                    spend.attempts += count_u32(e.attempts().len());
                    tracing::debug!(id = %item.id, status = e.status(), error = %e, "judge call failed");
                    let error = format!("{}: {}", e.status(), e.message());
                    return done_with(None, Some(error), raw, model, spend, false);
                }
            };
            spend.attempts += count_u32(done.attempts.len());
            let text = done.response.first_text().unwrap_or_default().to_owned();
            let cut = done
                .response
                .choices
                .first()
                .and_then(|c| c.finish_reason.as_deref())
                == Some("length");
            let answered_by = self.gateway.model(&done.model);
            let count = match (&done.response.usage, &answered_by) {
                (Some(u), _) => TokenCount::from_usage(u),
                (None, Some(m)) => TokenCount {
                    prompt: crate::tokens::prompt_tokens_for(m, &messages).await,
                    completion: crate::tokens::text_tokens_for(m, &text).await,
                    cached: 0,
                    cache_write: 0,
                    estimated: true,
                },
                (None, None) => TokenCount::default(),
            };
            spend.tokens.prompt += count.prompt;
            spend.tokens.completion += count.completion;
            spend.cost += answered_by.map_or(0.0, |m| {
                m.cost_usd_with_cache_write(
                    count.prompt,
                    count.completion,
                    count.cached,
                    count.cache_write,
                )
            });

            let (verdict, parsed) = self.read(&text);
            tracing::debug!(id = %item.id, ask, ?parsed, ?verdict, cut, "judge answered");
            if let Some(verdict) = verdict {
                if let (Some(cache), Some(key)) = (&self.cache, key) {
                    let (score, preference) = match verdict {
                        Verdict::Score(s) => (s, None),
                        Verdict::Pref(p) => (0.0, Some(p)),
                    };
                    let entry = CachedJudgement {
                        score,
                        raw: text.clone(),
                        model: Some(done.model.clone()),
                        tokens: spend.tokens,
                        cost: spend.cost,
                        attempts: spend.attempts,
                        reasks: spend.reasks,
                        length_reasks: spend.length_reasks,
                        preference,
                    };
                    cache.put(key, entry).await;
                }
                return done_with(
                    Some(verdict),
                    None,
                    Some(text),
                    Some(done.model),
                    spend,
                    false,
                );
            }
            raw = Some(text.clone());
            model = Some(done.model);
            // Cut before a verdict: the same question once more with room to finish.
            if cut
                && spend.length_reasks == 0
                && let Some(longer) = self.longer(max_tokens)
            {
                spend.length_reasks += 1;
                max_tokens = Some(longer);
                continue;
            }
            if ask >= self.config.max_reasks {
                break;
            }
            messages.push(ChatMessage::new(Role::Assistant, text));
            messages.push(ChatMessage::new(Role::User, self.reminder.clone()));
            ask += 1;
        }
        done_with(None, None, raw, model, spend, false)
    }

    async fn judge_one(&self, item: &JudgeItem) -> Judgement {
        if self.pref_parser.is_some() {
            return self.judge_pair(item).await;
        }
        let k = self.config.samples;
        let (samples, response_tokens) = futures::join!(
            futures::future::join_all((0..k).map(|i| self.sample(item, i, false))),
            Encoding::Cl100kBase.count_async(&item.response)
        );
        let started = samples
            .iter()
            .map(|s| s.started)
            .min()
            .unwrap_or_else(Instant::now);
        let mut spend = Spend::default();
        for s in &samples {
            spend.add(&s.spend);
        }
        let busy_ms = samples.iter().map(|s| s.busy_ms).sum();
        let cached = samples.iter().all(|s| s.cached);
        let (raw, model) = raw_and_model(&samples);
        let scores: Vec<Option<f64>> = samples
            .iter()
            .map(|s| match s.verdict {
                Some(Verdict::Score(x)) => Some(x),
                _ => None,
            })
            .collect();
        let parsed: Vec<f64> = scores.iter().flatten().copied().collect();
        let with = |j: Judgement| Judgement {
            raw: raw.clone(),
            model: model.clone(),
            cached,
            busy_ms,
            response_tokens,
            ..j
        };
        if k == 1 {
            let s = &samples[0];
            return with(match s.verdict {
                Some(Verdict::Score(score)) => {
                    self.scored(item, started, score, response_tokens, spend)
                }
                _ => spend.onto(self.failed(item, started, s.error_text().to_owned())),
            });
        }
        let votes = Votes {
            samples: scores,
            aggregate: self.config.aggregate,
            stdev: stdev(&parsed),
        };
        let sample_errors = sample_errors(&samples);
        let j = match aggregate(&parsed, self.config.aggregate) {
            Some(score) if count_u32(parsed.len()) >= self.quorum => {
                self.scored(item, started, score, response_tokens, spend)
            }
            _ => spend.onto(self.failed(item, started, NO_QUORUM.to_owned())),
        };
        with(Judgement {
            votes: Some(votes),
            sample_errors,
            ..j
        })
    }

    /// A pairwise item: `samples` calls per order (both orders with `swap`).
    async fn judge_pair(&self, item: &JudgeItem) -> Judgement {
        let k = self.config.samples;
        let orders: &[bool] = if self.config.swap {
            &[false, true]
        } else {
            &[false]
        };
        let calls = orders
            .iter()
            .enumerate()
            .flat_map(|(o, swapped)| (0..k).map(move |i| (count_u32(o) * k + i, *swapped)));
        let samples =
            futures::future::join_all(calls.map(|(i, swapped)| self.sample(item, i, swapped)))
                .await;
        let started = samples
            .iter()
            .map(|s| s.started)
            .min()
            .unwrap_or_else(Instant::now);
        let mut spend = Spend::default();
        for s in &samples {
            spend.add(&s.spend);
        }
        let busy_ms = samples.iter().map(|s| s.busy_ms).sum();
        let cached = samples.iter().all(|s| s.cached);
        let (raw, model) = raw_and_model(&samples);
        // Verdicts in the input's order: a swapped order's A is the input's B.
        let prefs: Vec<Option<Preference>> = samples
            .iter()
            .enumerate()
            .map(|(i, s)| match s.verdict {
                Some(Verdict::Pref(p)) if i >= k as usize => Some(p.swapped()),
                Some(Verdict::Pref(p)) => Some(p),
                _ => None,
            })
            .collect();
        let parsed: Vec<Preference> = prefs.iter().flatten().copied().collect();
        let p_a = (!parsed.is_empty()).then(|| {
            parsed.iter().filter(|p| **p == Preference::A).count() as f64 / parsed.len() as f64
        });
        let per_order: Vec<Vec<Preference>> = prefs
            .chunks(k as usize)
            .map(|c| c.iter().flatten().copied().collect())
            .collect();
        let short = per_order.iter().any(|o| count_u32(o.len()) < self.quorum);
        let order_prefs: Vec<Option<Preference>> = per_order.iter().map(|o| majority(o)).collect();
        let consistent = self
            .config
            .swap
            .then(|| order_prefs.first() == order_prefs.get(1));
        let error = if short {
            Some(if k == 1 {
                samples
                    .iter()
                    .find(|s| s.verdict.is_none())
                    .map_or(UNPARSED, |s| s.error_text())
                    .to_owned()
            } else {
                NO_QUORUM.to_owned()
            })
        } else if consistent == Some(false) && self.config.inconsistent == Inconsistent::Error {
            Some(INCONSISTENT.to_owned())
        } else {
            None
        };
        let preference = match (&error, consistent) {
            (Some(_), _) => None,
            (None, Some(false)) => Some(Preference::Tie),
            (None, _) => order_prefs.first().copied().flatten(),
        };
        let base = match &error {
            Some(e) => self.failed(item, started, e.clone()),
            None => self.blank(item, started),
        };
        let sample_errors = if samples.len() > 1 {
            sample_errors(&samples)
        } else {
            Vec::new()
        };
        spend.onto(Judgement {
            raw,
            model,
            cached,
            busy_ms,
            sample_errors,
            pairwise: Some(PairVerdict {
                preference,
                p_a,
                samples: prefs,
                position_consistent: consistent,
            }),
            ..base
        })
    }

    /// [`judge_one`](Self::judge_one) on an owned item, a panic turned into an error
    /// judgement; for spawned tasks.
    async fn judge_owned(self: Arc<Self>, item: JudgeItem) -> Judgement {
        let started = Instant::now();
        match AssertUnwindSafe(self.judge_one(&item)).catch_unwind().await {
            Ok(j) => j,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown".to_owned());
                self.failed(&item, started, format!("internal: judge panicked: {what}"))
            }
        }
    }

    /// Judges every item on spawned tasks, at most `concurrency` at once; input order.
    async fn judge_all(self: Arc<Self>, items: Vec<JudgeItem>) -> Vec<Judgement> {
        let ids: Vec<JudgeItem> = items
            .iter()
            .map(|i| JudgeItem {
                id: i.id.clone(),
                prompt: String::new(),
                response: String::new(),
                reference: None,
                pair: None,
                extra: i.extra.clone(),
            })
            .collect();
        let mut results: Vec<Option<Judgement>> = vec![None; items.len()];
        let mut pending = items.into_iter().enumerate();
        let mut set = JoinSet::new();
        loop {
            while set.len() < self.config.concurrency {
                let Some((i, item)) = pending.next() else {
                    break;
                };
                let inner = Arc::clone(&self);
                set.spawn(async move { (i, inner.judge_owned(item).await) });
            }
            match set.join_next().await {
                None => break,
                Some(Ok((i, j))) => results[i] = Some(j),
                Some(Err(e)) => tracing::error!(error = %e, "judge task lost"),
            }
        }
        results
            .into_iter()
            .zip(ids)
            .map(|(j, stub)| {
                j.unwrap_or_else(|| {
                    self.failed(
                        &stub,
                        Instant::now(),
                        "internal: judge task lost".to_owned(),
                    )
                })
            })
            .collect()
    }
}

/// The reply and model of the first sample with a verdict, else of the last one that
/// answered.
fn raw_and_model(samples: &[Sample]) -> (Option<String>, Option<String>) {
    let pick = samples
        .iter()
        .find(|s| s.verdict.is_some())
        .or_else(|| samples.iter().rev().find(|s| s.raw.is_some()));
    pick.map_or((None, None), |s| (s.raw.clone(), s.model.clone()))
}

/// The distinct errors of the samples without a verdict, in sample order.
fn sample_errors(samples: &[Sample]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in samples.iter().filter(|s| s.verdict.is_none()) {
        let e = s.error_text();
        if !out.iter().any(|x| x == e) {
            out.push(e.to_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The path is said once (issue 14: a fresh machine's cache error named it three
    /// times: ours, SQLite's suffix, and the chain printing the source again).
    #[test]
    fn a_cache_error_names_its_path_once() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        // A directory where the file should be: SQLite cannot open it.
        let path = dir.path().to_owned();
        let Err(source) = rusqlite::Connection::open(&path) else {
            panic!("a directory opened as a database");
        };
        let text = JudgeError::Cache {
            path: path.clone(),
            source,
        }
        .to_string();
        let shown = path.display().to_string();
        assert_eq!(text.matches(shown.as_str()).count(), 1, "{text}");
        assert!(text.starts_with("judge cache "), "{text}");
    }
}
