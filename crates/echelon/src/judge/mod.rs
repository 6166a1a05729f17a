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
//! `temperature` (default 0) and `max_tokens`. The score is read with an ordered list of
//! regexes ([`ScoreParser`], [`DEFAULT_PATTERNS`]): the first pattern that matches
//! decides, and of its matches the last one counts. A score outside
//! `[min_score, max_score]` (default 1..=10), or no score at all, makes the judge be asked
//! again up to `max_reasks` times (default 2): its answer and a reminder of the format
//! ([`DEFAULT_REMINDER`]) are appended as a follow-up turn. If no ask gives a score, the
//! item gets `"error": "unparsed"` and the judge's last reply in `raw`, never a made-up
//! score. A judge call that fails gets `"error": "<status>: <message>"` (the
//! [`GatewayError`](crate::GatewayError) status and message) and no score.
//!
//! # Output lines
//! One JSON object per item ([`Judgement`]): `id`, `score`, `reward`, `length_penalty`,
//! `response_tokens`, `raw`, `route`, `model`, `attempts`, `reasks`,
//! `tokens: {prompt, completion}`, `cost` (USD), `cached`, `latency_ms`, `error` (when
//! there is one), `prompt`/`response`/`reference` with `keep_inputs`, then the extra input
//! fields.
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
//! key](#cache-key).
//!
//! ## Cache key
//! Hex SHA-256 of the route, the rubric, the reminder, the patterns, the score range,
//! `max_reasks`, `temperature`, `max_tokens`, and the item's prompt, response and
//! reference. The reward parameters are not in it: a cached score is re-rewarded with the
//! current ones. Errors and unparsed answers are never cached.

mod cache;
mod item;
mod output;
mod parse;
mod reward;
mod run;
mod seen;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use echelon_types::{ChatCompletionRequest, ChatMessage, Role};
use futures::{FutureExt, Stream, StreamExt};
use tokio::runtime::{Handle, Runtime, RuntimeFlavor};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::Gateway;
use crate::routing::DEFAULT_ROUTE_ALIAS;
use crate::tokens::Encoding;
use crate::usage::TokenCount;

pub use item::{ItemId, JudgeItem};
pub use output::{JudgeTokens, Judgement, KeptInputs, UNPARSED};
pub use parse::{
    DEFAULT_PATTERNS, DEFAULT_REMINDER, DEFAULT_RUBRIC, ScoreParse, ScoreParser, default_patterns,
    render_rubric,
};
pub use reward::{length_penalty, reward};
pub use run::{BadLine, MAX_BAD_LINES_KEPT, Progress, RunSummary, count_lines};

use cache::{Cache, CachedJudgement, KeyBase, KeyParams};

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
    /// Sampling temperature of the judge. Default `Some(0.0)`.
    pub temperature: Option<f64>,
    /// `max_tokens` of the judge. Default `None`.
    pub max_tokens: Option<u32>,
    /// Items judged at once, at most. Default 64.
    pub concurrency: usize,
    /// The SQLite cache file; `None` (the default) disables the cache.
    pub cache_path: Option<PathBuf>,
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
            temperature: Some(0.0),
            max_tokens: None,
            concurrency: 64,
            cache_path: None,
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
    /// The reminder with `{min}` and `{max}` filled in.
    reminder: String,
    key_base: KeyBase,
    cache: Option<Cache>,
    /// `concurrency` permits: one per item being judged.
    slots: Semaphore,
}

impl Judge {
    /// Checks the config, compiles the patterns and opens the cache.
    ///
    /// # Errors
    /// An invalid setting (`min_score > max_score`, a non-finite number, `concurrency` 0,
    /// a rubric without `{response}`, no patterns), an unknown route, a pattern that does
    /// not compile, or a cache file that cannot be opened.
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
        let parser = ScoreParser::new(&config.patterns, config.min_score, config.max_score)?;
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
        });
        let cache = match &config.cache_path {
            None => None,
            Some(path) => {
                // A fresh machine has no data directory yet: create it, as the ledger does.
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|source| JudgeError::CacheDir {
                        path: dir.to_owned(),
                        source,
                    })?;
                }
                Some(Cache::open(path).map_err(|source| JudgeError::Cache {
                    path: path.clone(),
                    source,
                })?)
            }
        };
        let slots = Semaphore::new(config.concurrency);
        Ok(Judge {
            inner: Arc::new(Inner {
                gateway,
                config,
                parser,
                reminder,
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
    /// in [`Judgement::error`]. Waits for one of the `concurrency` slots first.
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
    if c.concurrency > Semaphore::MAX_PERMITS {
        return bad(format!("concurrency {} is too large", c.concurrency));
    }
    if !c.rubric.contains("{response}") {
        return bad(
            "the rubric has no `{response}` placeholder: the judge would never see the response"
                .into(),
        );
    }
    if c.patterns.is_empty() {
        return bad("at least one score pattern is needed".into());
    }
    Ok(())
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
    tokens: JudgeTokens,
    cost: f64,
}

impl Spend {
    /// `j` with this spend (attempts, re-asks, tokens, cost) filled in.
    fn onto(self, j: Judgement) -> Judgement {
        Judgement {
            attempts: self.attempts,
            reasks: self.reasks,
            tokens: self.tokens,
            cost: self.cost,
            ..j
        }
    }
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
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
            tokens: JudgeTokens::default(),
            cost: 0.0,
            cached: false,
            latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            error: None,
            inputs: self.config.keep_inputs.then(|| KeptInputs {
                prompt: item.prompt.clone(),
                response: item.response.clone(),
                reference: item.reference.clone(),
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

    async fn judge_one(&self, item: &JudgeItem) -> Judgement {
        // The semaphore is never closed; should it be, judge without a slot.
        let _slot = self.slots.acquire().await.ok();
        let started = Instant::now();
        let response_tokens = Encoding::Cl100kBase.count_async(&item.response).await;
        let key = self.cache.as_ref().map(|_| self.key_base.key(item));

        if let (Some(cache), Some(key)) = (&self.cache, &key)
            && let Some(hit) = cache.get(key.clone()).await
            && hit.score >= self.config.min_score
            && hit.score <= self.config.max_score
        {
            return Judgement {
                raw: Some(hit.raw),
                model: hit.model,
                cached: true,
                ..self.scored(item, started, hit.score, response_tokens, Spend::default())
            };
        }

        let mut spend = Spend::default();
        let mut raw: Option<String> = None;
        let mut model: Option<String> = None;
        let mut messages = vec![ChatMessage::new(
            Role::User,
            render_rubric(&self.config.rubric, item),
        )];
        for ask in 0..=self.config.max_reasks {
            spend.reasks = ask;
            let mut req = ChatCompletionRequest::new(self.config.route.clone(), messages.clone());
            req.temperature = self.config.temperature;
            req.max_tokens = self.config.max_tokens;
            let done = match self.gateway.chat(req).await {
                Ok(done) => done,
                Err(e) => {
                    spend.attempts += count_u32(e.attempts().len());
                    tracing::debug!(id = %item.id, status = e.status(), error = %e, "judge call failed");
                    let error = format!("{}: {}", e.status(), e.message());
                    return spend.onto(Judgement {
                        response_tokens,
                        raw,
                        model,
                        ..self.failed(item, started, error)
                    });
                }
            };
            spend.attempts += count_u32(done.attempts.len());
            let text = done.response.first_text().unwrap_or_default().to_owned();
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

            let parsed = self.parser.parse(&text);
            tracing::debug!(id = %item.id, ask, ?parsed, "judge answered");
            if let ScoreParse::Score(score) = parsed {
                if let (Some(cache), Some(key)) = (&self.cache, key) {
                    let entry = CachedJudgement {
                        score,
                        raw: text.clone(),
                        model: Some(done.model.clone()),
                        tokens: spend.tokens,
                        cost: spend.cost,
                        attempts: spend.attempts,
                        reasks: spend.reasks,
                    };
                    cache.put(key, entry).await;
                }
                return Judgement {
                    raw: Some(text),
                    model: Some(done.model),
                    ..self.scored(item, started, score, response_tokens, spend)
                };
            }
            if ask < self.config.max_reasks {
                messages.push(ChatMessage::new(Role::Assistant, text.clone()));
                messages.push(ChatMessage::new(Role::User, self.reminder.clone()));
            }
            raw = Some(text);
            model = Some(done.model);
        }
        spend.onto(Judgement {
            response_tokens,
            raw,
            model,
            ..self.failed(item, started, UNPARSED.to_owned())
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
