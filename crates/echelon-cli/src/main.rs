//! The `echelon` command: `serve`, `chat`, `judge`, `usage`, `probe`, `config`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use echelon::config::Config;
use echelon::{Gateway, GatewayError};
use echelon_server::ServerOptions;
use echelon_types::{Attempt, ChatCompletionRequest, ChatMessage, Role};

mod descriptors;
mod probe;

/// jemalloc instead of glibc malloc: cheaper allocation on the request path and no
/// per-thread arena growth under concurrency (figures in BENCHMARKS.md; mimalloc, tried
/// outside the alternation, was faster but held 54–57 MiB of RSS against 47).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Echelon: a resilient, OpenAI-compatible LLM gateway with tiered failover.
#[derive(Debug, Parser)]
#[command(name = "echelon", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models, GET /health).
    ///
    /// Example:
    ///   echelon serve --config examples/demo.yaml --port 4000
    ///   curl http://127.0.0.1:4000/v1/chat/completions -H 'content-type: application/json' \
    ///     -d '{"model":"demo_group","messages":[{"role":"user","content":"Hi"}]}'
    ///
    /// Prints `echelon listening on http://HOST:PORT` once bound (port 0 picks a free one).
    /// SIGINT/SIGTERM stop accepting and let in-flight requests finish. SIGHUP (and
    /// POST /admin/reload, and a file change with server.watch_config: true) reloads the
    /// config, keeping the state of what did not change; a bad config is refused.
    #[command(verbatim_doc_comment)]
    Serve {
        /// Config file (YAML or JSON) or directory of them.
        #[arg(long, short)]
        config: PathBuf,
        /// Listen address; overrides `server.host`.
        #[arg(long)]
        host: Option<String>,
        /// Listen port; overrides `server.port` (0 = any free port).
        #[arg(long)]
        port: Option<u16>,
    },
    /// Send one chat completion through a route and print the answer.
    ///
    /// Example:
    ///   echelon chat --config examples/demo.yaml --route demo_group "Name a colour."
    ///   echelon chat --config examples/demo.yaml --route demo_group --stream "Count to five."
    ///
    /// The answer goes to stdout; which model answered, and every failed attempt, to stderr.
    /// Exits 1 with the error and its attempts when every candidate failed.
    #[command(verbatim_doc_comment)]
    Chat {
        /// Config file (YAML or JSON) or directory of them.
        #[arg(long, short)]
        config: PathBuf,
        /// A model id, a task group, or `group.echelonN`.
        #[arg(long, short)]
        route: String,
        /// Print tokens as they arrive.
        #[arg(long)]
        stream: bool,
        /// Cap on generated tokens.
        #[arg(long)]
        max_tokens: Option<u32>,
        /// Sampling temperature.
        #[arg(long)]
        temperature: Option<f64>,
        /// A system message to put first.
        #[arg(long)]
        system: Option<String>,
        /// The user message.
        prompt: String,
    },
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Score a JSONL batch of responses with an LLM judge (seed 003), fast and resumable.
    ///
    /// Each input line: {"id", "prompt", "response", "reference"?, ...}; extra fields are
    /// carried to the output. Each output line: id, score, reward, raw (the judge's text),
    /// route, model, attempts, tokens, cost, cached, latency_ms, and error when there is
    /// one — never a made-up score: an answer with no score in range is re-asked up to
    /// --max-reasks times, then written with "error": "unparsed".
    ///
    /// Reward (seed 003):
    ///   length_penalty = -reward_coefficient * max(0, response_tokens - target_tokens) / target_tokens
    ///   reward         = score + length_penalty
    /// where response_tokens counts the judged response with tiktoken cl100k_base
    /// (target_tokens 0 = no penalty).
    ///
    /// Structured verdicts: --verdict json_schema sends response_format with a JSON schema
    /// ({"score": integer}) that llama-server and vLLM enforce; auto does so when every
    /// model of the route declares structured_output: true. Voting: --samples K
    /// --aggregate mean|median|majority --quorum Q (fewer than Q parsed samples is
    /// "error": "no_quorum"). Pairwise: --mode pairwise on items with response_a and
    /// response_b, --swap to ask both orders (position_consistent). --summary-json PATH
    /// writes the summary (errors by kind with their ids, parse-failure rate, efficiency).
    ///
    /// Output lines are appended and flushed as they complete; re-running the same command
    /// skips ids already in the output (a line cut by a kill is redone). Results are cached
    /// in SQLite by route, judge settings, rubric, prompt and response (--no-cache to skip).
    ///
    /// Example:
    ///   echelon judge --config examples/demo.yaml --route demo_group \
    ///     --input examples/judge_sample.jsonl --output scores.jsonl --concurrency 8
    #[command(verbatim_doc_comment)]
    Judge {
        /// Config file or directory.
        #[arg(long, short)]
        config: PathBuf,
        #[command(flatten)]
        args: Box<JudgeArgs>,
    },
    /// Totals from the usage ledger: requests, failures, fallbacks, tokens and cost.
    ///
    /// Examples:
    ///   echelon usage --config echelon.yaml --since yesterday --until today --by model
    ///   echelon usage --config echelon.yaml --since 7d --by day --format csv
    ///
    /// --since/--until take a duration ago (30m, 24h, 7d), a date (2026-11-20, UTC), an
    /// RFC 3339 time, or `today` / `yesterday`.
    #[command(verbatim_doc_comment)]
    Usage {
        /// Config file or directory (for the ledger path).
        #[arg(long, short)]
        config: PathBuf,
        /// Read this ledger instead of the config's; repeat it to report the ledgers of
        /// several replicas together (`--ledger a.db --ledger b.db`).
        #[arg(long)]
        ledger: Vec<PathBuf>,
        /// Start of the period (inclusive).
        #[arg(long)]
        since: Option<String>,
        /// End of the period (exclusive).
        #[arg(long)]
        until: Option<String>,
        /// Rows per model, route, key, provider or day.
        #[arg(long, value_enum, default_value_t = By::Model)]
        by: By,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Measure an OpenAI-compatible endpoint's latency as a client sees it: total latency
    /// and, with --stream, time to first token (first non-empty `delta.content`).
    ///
    /// Example (the gateway against its upstream, same load):
    ///   echelon probe --url http://127.0.0.1:4000/v1 --model demo_group --stream -n 500
    ///   echelon probe --url http://127.0.0.1:8080/v1 --model smollm --stream -n 500
    ///
    /// Prints p50/p90/p99 in milliseconds (--json for one JSON object). A stream that ends
    /// without `data: [DONE]` counts as an error; the exit code is 1 when any request failed.
    #[command(verbatim_doc_comment)]
    Probe(probe::ProbeArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum By {
    Model,
    Route,
    Key,
    Provider,
    Day,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Turn a seed-style global fallback file (`global_fallback.yaml`) into per-group
    /// `fallback_config` sections (seed 001/002: each task group carries its own fallback).
    ///
    /// Every task group without a `fallback_config` gets one made of the global values
    /// (overlaid with the file's `groups.<name>` overrides); the global file is renamed
    /// `*.migrated`. Comments in the edited files are kept.
    ///
    /// Example:
    ///   echelon config migrate configs/llms --verbose
    ///   echelon config migrate configs/llms --validate-only
    #[command(verbatim_doc_comment)]
    Migrate {
        /// The config directory holding the global fallback file and the group files.
        path: PathBuf,
        /// Do not write `<file>.bak` copies of the changed files.
        #[arg(long)]
        no_backup: bool,
        /// Check and report the changes without writing anything.
        #[arg(long)]
        validate_only: bool,
        /// Print each change.
        #[arg(long)]
        verbose: bool,
    },
    /// Check a config: prints `ok`, or every error as file:line:col: key.path: message
    /// (with a hint), and exits 1.
    ///
    /// Example:
    ///   echelon config validate examples/demo.yaml
    #[command(verbatim_doc_comment)]
    Validate {
        /// Config file (YAML or JSON) or directory of them.
        path: PathBuf,
    },
    /// What changes from one config to another, as a hot reload (SIGHUP,
    /// POST /admin/reload) would apply it: models, routes and providers added (+),
    /// removed (-) and changed (~); keys added or removed, by id only; which state is
    /// kept, rescaled (a bucket whose limit changed) or reset; settings that need a restart.
    ///
    /// Example:
    ///   echelon config diff echelon.yaml echelon.new.yaml
    ///   echelon config diff echelon.yaml echelon.new.yaml --json
    ///
    /// Exits 1 when either config does not load (its errors as file:line:col).
    #[command(verbatim_doc_comment)]
    Diff {
        /// The config serving now.
        old: PathBuf,
        /// The config to reload.
        new: PathBuf,
        /// One JSON object (the body `POST /admin/reload` returns as `diff`).
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any thread exists (`echelon_socket::reserve_descriptors` says why): the
    // judge's and the probe's connections, a server's clients and upstreams.
    let connections = match &cli.command {
        Command::Judge { args, .. } => args.concurrency,
        Command::Probe(args) => args.concurrency,
        _ => 0,
    };
    echelon_socket::reserve_descriptors(descriptors::for_connections(connections));
    // `echelon serve` with `telemetry:` exports traces: the section is read before the
    // subscriber exists (a config that does not load is reported by `serve` itself).
    let telemetry = match &cli.command {
        Command::Serve { config, .. } => Config::load(config)
            .ok()
            .map(|c| c.telemetry)
            .filter(|t| t.enabled()),
        _ => None,
    };
    let exporter = init_tracing(cli.log_format, telemetry.as_ref());
    let code = dispatch(cli.command);
    // After the runtime is gone: the last spans are sent (a blocking call).
    if let Some(exporter) = exporter
        && let Err(e) = exporter.shutdown()
    {
        eprintln!("warning: the last spans were not exported: {e}");
    }
    code
}

/// Runs the command.
fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::Config(ConfigCommand::Validate { path }) => validate(&path),
        Command::Config(ConfigCommand::Diff { old, new, json }) => config_diff(&old, &new, json),
        Command::Config(ConfigCommand::Migrate {
            path,
            no_backup,
            validate_only,
            verbose,
        }) => migrate(&path, !no_backup, validate_only, verbose),
        Command::Serve { config, host, port } => run(serve(config, host, port)),
        Command::Judge { config, args } => run(judge(config, *args)),
        Command::Probe(args) => run(probe::probe(args)),
        Command::Usage {
            config,
            ledger,
            since,
            until,
            by,
            format,
        } => usage(&config, ledger, since, until, by, format),
        Command::Chat {
            config,
            route,
            stream,
            max_tokens,
            temperature,
            system,
            prompt,
        } => {
            let mut messages = Vec::new();
            if let Some(s) = system {
                messages.push(ChatMessage::new(Role::System, s));
            }
            messages.push(ChatMessage::new(Role::User, prompt));
            let mut req = ChatCompletionRequest::new(route, messages);
            req.max_tokens = max_tokens;
            req.temperature = temperature;
            run(chat(config, req, stream))
        }
    }
}

/// The process's subscriber: log lines (text or JSON) filtered by `ECHELON_LOG` (default
/// `info`); with `telemetry`, the OTLP exporter of the request and attempt spans (issue
/// 18, built with the OpenTelemetry API, not through this subscriber), returned to shut
/// down at exit.
fn init_tracing(
    format: LogFormat,
    telemetry: Option<&echelon::config::TelemetryConfig>,
) -> Option<echelon_server::telemetry::Telemetry> {
    use tracing_subscriber::prelude::*;
    type Boxed = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;
    let filter = tracing_subscriber::EnvFilter::try_from_env("ECHELON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a terminal: in a log file or a pipe they are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt: Boxed = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    };
    tracing_subscriber::registry().with(fmt).init();
    let mut exporter = None;
    if let Some(config) = telemetry {
        match echelon_server::telemetry::Telemetry::start(config) {
            Ok(handle) => exporter = handle,
            Err(e) => tracing::warn!("telemetry off: {e}"),
        }
    }
    if let (Some(config), Some(_)) = (telemetry, &exporter) {
        tracing::info!(
            endpoint = config.traces_url().as_deref().unwrap_or_default(),
            service = %config.service_name,
            sample_ratio = config.sample_ratio,
            "exporting traces over OTLP/HTTP"
        );
    }
    exporter
}

/// Runs a command on a multi-thread runtime.
///
/// The command runs as a spawned task on a worker thread, not on the main thread in
/// `block_on`: tasks it spawns (one per judged item, one per accepted connection) then go
/// to that worker's own queue instead of being handed across threads with a wake-up
/// each. With the judge's loop on the main thread, starting 256 items took 45 ms on
/// this 2-core machine (the main thread competing with both workers).
fn run(fut: impl Future<Output = anyhow::Result<ExitCode>> + Send + 'static) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = rt.block_on(async {
        match tokio::spawn(fut).await {
            Ok(outcome) => outcome,
            Err(e) => Err(anyhow::anyhow!("the command's task failed: {e}")),
        }
    });
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes, `: `-separated, each said once: the library's errors
/// already print their source (`judge cache …: <SQLite error>`), so a cause whose text
/// is already in the line is not repeated.
fn error_chain(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

fn validate(path: &std::path::Path) -> ExitCode {
    // The verdict on stdout, what is wrong on stderr, as `serve` does (warnings are
    // logged there by the load itself).
    match Config::load(path) {
        Ok(_) => {
            println!("ok");
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::FAILURE
        }
    }
}

fn config_diff(old: &std::path::Path, new: &std::path::Path, json: bool) -> ExitCode {
    let (a, b) = match (Config::load(old), Config::load(new)) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => {
            for e in [a.err(), b.err()].into_iter().flatten() {
                eprintln!("{e}");
            }
            return ExitCode::FAILURE;
        }
    };
    let diff = echelon::config::ConfigDiff::between(&a, &b);
    if json {
        match serde_json::to_string_pretty(&diff) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{diff}");
    }
    ExitCode::SUCCESS
}

fn migrate(path: &std::path::Path, backup: bool, validate_only: bool, verbose: bool) -> ExitCode {
    let options = echelon::config::MigrateOptions {
        backup,
        validate_only,
        verbose,
    };
    match echelon::config::migrate(path, &options) {
        Ok(report) => {
            if report.changes.is_empty() {
                println!("nothing to migrate");
                return ExitCode::SUCCESS;
            }
            if verbose || validate_only {
                for c in &report.changes {
                    println!("{c}");
                }
            }
            if validate_only {
                println!(
                    "ok: {} change(s) would be made; nothing written",
                    report.changes.len()
                );
            } else {
                println!(
                    "migrated: {} file(s) written, {} backup(s){}",
                    report.written.len(),
                    report.backups.len(),
                    report
                        .removed_global
                        .as_ref()
                        .map(|p| format!(", global file moved aside ({})", p.display()))
                        .unwrap_or_default()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// The `judge` flags, past the config path.
#[derive(Debug, clap::Args)]
struct JudgeArgs {
    /// The judge route: a model, task group, pool or wrapper.
    #[arg(long, short)]
    route: String,
    /// Input JSONL.
    #[arg(long, short)]
    input: PathBuf,
    /// Output JSONL (appended; existing ids are skipped).
    #[arg(long, short)]
    output: PathBuf,
    /// Rubric template with {prompt}, {response}, {reference}; default: a 1–10 score
    /// ending with a line `最终评分: X`.
    #[arg(long)]
    rubric: Option<PathBuf>,
    /// Items in flight at once (the route's own limits still apply).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Judge at most this many new items.
    #[arg(long)]
    max_items: Option<u64>,
    /// Cap on the judge's answer, tokens (short answers are faster and parse better).
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Re-asks when the judge's answer has no score in range.
    #[arg(long, default_value_t = 2)]
    max_reasks: u32,
    /// Length penalty coefficient (seed 003 `reward_coefficient`).
    #[arg(long, default_value_t = 0.1)]
    reward_coefficient: f64,
    /// Response length in tokens above which the penalty starts.
    #[arg(long, default_value_t = 512)]
    target_tokens: u64,
    /// Score pattern (regex with one capture group), tried in order; repeat for
    /// several. Default: the seed's formats (最终评分 X, 评分: X, Score: X, a lone 1–10).
    #[arg(long = "pattern")]
    patterns: Vec<String>,
    /// Cache file, or a Redis URL (redis://host:6379/0, rediss:// for TLS) shared by
    /// parallel judge processes (keys <state.key_prefix>judge:<key>; Redis failing never
    /// fails an item); default judge_cache.db next to the usage ledger.
    #[arg(long)]
    cache: Option<String>,
    /// With a Redis --cache: entries expire after this many seconds (default never).
    #[arg(long)]
    cache_ttl: Option<u64>,
    /// Do not read or write the cache.
    #[arg(long)]
    no_cache: bool,
    /// Copy prompt, response and reference into the output lines.
    #[arg(long)]
    keep_inputs: bool,
    /// How the verdict is asked for: json_schema sends OpenAI response_format with a
    /// JSON schema ({"score": integer}; llama-server and vLLM constrain the output to
    /// it), regex reads the reply with the patterns, auto uses json_schema when every
    /// model of the route declares structured_output: true. A JSON verdict is read
    /// first in every mode.
    #[arg(long, default_value = "auto", value_parser = parse_mode::<echelon::judge::VerdictMode>)]
    verdict: echelon::judge::VerdictMode,
    /// With the JSON verdict: ask for a "reasoning" string before the verdict.
    #[arg(long)]
    reasoning_field: bool,
    /// Independent judgements per item (each its own call and cache entry).
    #[arg(long, default_value_t = 1)]
    samples: u32,
    /// How the samples' scores are combined: mean, median or majority.
    #[arg(long, default_value = "mean", value_parser = parse_mode::<echelon::judge::Aggregate>)]
    aggregate: echelon::judge::Aggregate,
    /// Parsed samples an item needs (default samples/2 + 1); fewer is
    /// "error": "no_quorum".
    #[arg(long)]
    quorum: Option<u32>,
    /// Judge temperature (default 0, or 0.7 with --samples above 1).
    #[arg(long)]
    temperature: Option<f64>,
    /// Seed sent to the judge; sample i gets seed + i.
    #[arg(long)]
    seed: Option<u64>,
    /// An answer cut by finish_reason length is re-asked once with twice --max-tokens,
    /// at most this many.
    #[arg(long, default_value_t = echelon::judge::DEFAULT_MAX_TOKENS_CAP)]
    max_tokens_cap: u32,
    /// reasoning_effort sent to the judge as is (low, medium, high).
    #[arg(long)]
    reasoning_effort: Option<String>,
    /// pointwise (a score per response) or pairwise (items with response_a and
    /// response_b: A, B or tie).
    #[arg(long, default_value = "pointwise", value_parser = parse_mode::<echelon::judge::JudgeMode>)]
    mode: echelon::judge::JudgeMode,
    /// Pairwise: judge both orders and report position_consistent.
    #[arg(long)]
    swap: bool,
    /// Pairwise with --swap: an inconsistent pair is a tie or an error.
    #[arg(long, default_value = "tie", value_parser = parse_mode::<echelon::judge::Inconsistent>)]
    inconsistent: echelon::judge::Inconsistent,
    /// Also write the run summary as JSON to this file.
    #[arg(long)]
    summary_json: Option<PathBuf>,
}

/// A judge mode name (`--verdict`, `--aggregate`, `--mode`, `--inconsistent`).
fn parse_mode<T: std::str::FromStr<Err = echelon::judge::ParseModeError>>(
    s: &str,
) -> Result<T, String> {
    s.parse::<T>().map_err(|e| e.to_string())
}

async fn judge(config_path: PathBuf, args: JudgeArgs) -> anyhow::Result<ExitCode> {
    use echelon::judge::{Judge, JudgeConfig, count_lines};
    let config = load(&config_path)?;
    let gateway = Arc::new(Gateway::from_config(&config)?);
    gateway.start()?;
    let mut jc = JudgeConfig {
        route: args.route,
        concurrency: args.concurrency.max(1),
        max_reasks: args.max_reasks,
        reward_coefficient: args.reward_coefficient,
        target_tokens: args.target_tokens,
        keep_inputs: args.keep_inputs,
        max_items: args.max_items,
        max_tokens: args.max_tokens,
        max_tokens_cap: Some(args.max_tokens_cap),
        verdict: args.verdict,
        reasoning_field: args.reasoning_field,
        samples: args.samples,
        aggregate: args.aggregate,
        quorum: args.quorum,
        temperature: args.temperature,
        seed: args.seed,
        reasoning_effort: args.reasoning_effort,
        mode: args.mode,
        swap: args.swap,
        inconsistent: args.inconsistent,
        ..JudgeConfig::default()
    };
    if let Some(path) = &args.rubric {
        jc.rubric = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the rubric {}", path.display()))?;
    }
    if !args.patterns.is_empty() {
        jc.patterns = args.patterns;
    }
    jc.cache_ttl = args.cache_ttl.map(std::time::Duration::from_secs);
    jc.cache_path = if args.no_cache {
        None
    } else if let Some(target) = args.cache {
        if echelon::judge::is_cache_url(&target) {
            jc.cache_url = Some(target);
            None
        } else {
            Some(PathBuf::from(target))
        }
    } else {
        config
            .usage
            .ledger_path
            .clone()
            .or_else(echelon::config::UsageConfig::default_ledger_path)
            .and_then(|p| p.parent().map(|d| d.join("judge_cache.db")))
    };
    let judge = Judge::new(gateway, jc)?;
    let total = count_lines(&args.input).await?;
    let bar = progress_bar(total, args.max_items);
    let report = |p: &echelon::judge::Progress| {
        let processed = p.done + p.skipped + p.bad_lines;
        bar.set_position(processed);
        bar.set_message(format!(
            "errors {} · cached {} · bad lines {} · ${:.4}",
            p.errors, p.cached, p.bad_lines, p.cost_usd
        ));
        if let Some(bad) = &p.last_bad_line {
            bar.suspend(|| eprintln!("line {}: {}", bad.line, bad.reason));
        }
        if bar.is_hidden() && p.done > 0 && p.done.is_multiple_of(500) {
            eprintln!(
                "judged {} (errors {}, cached {}, ${:.4}) in {:.1}s",
                p.done,
                p.errors,
                p.cached,
                p.cost_usd,
                p.elapsed.as_secs_f64()
            );
        }
    };
    let summary = judge.run_file(&args.input, &args.output, &report).await?;
    bar.finish_and_clear();
    eprintln!(
        "judged {} items in {:.2}s ({} scored, {} cached, {} unparsed, {} failed; {} skipped as already done; {} bad lines)",
        summary.judged,
        summary.wall_time.as_secs_f64(),
        summary.scored,
        summary.cached,
        summary.unparsed,
        summary.failed,
        summary.skipped,
        summary.bad_line_count
    );
    eprintln!(
        "parse failures {:.1}% · mean score {} · mean reward {} · cost ${:.6} · wall_ms {}",
        summary.parse_failure_rate * 100.0,
        summary
            .mean_score
            .map_or("-".to_owned(), |m| format!("{m:.2}")),
        summary
            .mean_reward
            .map_or("-".to_owned(), |m| format!("{m:.3}")),
        summary.total_cost,
        summary.wall_time.as_millis()
    );
    eprintln!(
        "score stdev {} · length re-asks {} · efficiency vs ideal {}{}",
        summary
            .score_stdev
            .map_or("-".to_owned(), |m| format!("{m:.3}")),
        summary.length_reasked,
        summary
            .efficiency
            .map_or("-".to_owned(), |e| format!("{:.1}%", e * 100.0)),
        if judge.config().mode == echelon::judge::JudgeMode::Pairwise {
            format!(
                " · preferences A {} B {} tie {}",
                summary.preferences[0], summary.preferences[1], summary.preferences[2]
            )
        } else {
            String::new()
        }
    );
    for (kind, e) in &summary.errors {
        let kept = e.ids.len() as u64;
        let more = if e.count > kept {
            format!(", … {} more", e.count - kept)
        } else {
            String::new()
        };
        let shown: Vec<&str> = e.ids.iter().take(20).map(String::as_str).collect();
        let cut = if e.ids.len() > 20 { ", …" } else { "" };
        eprintln!(
            "error {kind}: {} items ({}{cut}{more})",
            e.count,
            shown.join(", ")
        );
    }
    for bad in &summary.bad_lines {
        eprintln!("bad line {}: {}", bad.line, bad.reason);
    }
    if let Some(path) = &args.summary_json {
        let text = serde_json::to_string_pretty(&summary.to_json())?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write the summary {}", path.display()))?;
    }
    Ok(
        if summary.failed > 0 || summary.unparsed > 0 || summary.bad_line_count > 0 {
            // Partial success: the output holds every item, errors included.
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        },
    )
}

/// An indicatif bar on a terminal; hidden (plain periodic lines instead) otherwise.
fn progress_bar(total: u64, max_items: Option<u64>) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    let len = max_items.map_or(total, |m| m.min(total));
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {per_sec} ETA {eta} · {msg}")
    {
        bar.set_style(style);
    }
    bar
}

fn usage(
    config_path: &std::path::Path,
    ledger: Vec<PathBuf>,
    since: Option<String>,
    until: Option<String>,
    by: By,
    format: Format,
) -> ExitCode {
    use echelon::usage::report::{self, GroupBy, ReportFormat, UsageFilter};
    let paths = match ledger {
        l if !l.is_empty() => l,
        _ => match load(config_path) {
            Ok(c) => match c.usage.ledger_path {
                Some(p) => vec![p],
                None => {
                    eprintln!("error: the config disables the ledger (usage.ledger: false)");
                    return ExitCode::FAILURE;
                }
            },
            Err(e) => {
                eprintln!("error: {}", error_chain(&e));
                return ExitCode::FAILURE;
            }
        },
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let bound = |s: Option<String>, what: &str| -> Result<Option<u64>, String> {
        s.map(|s| report::parse_time_bound(&s, now_ms).map_err(|e| format!("--{what}: {e}")))
            .transpose()
    };
    let filter = match (bound(since, "since"), bound(until, "until")) {
        (Ok(since_ms), Ok(until_ms)) => UsageFilter { since_ms, until_ms },
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let by = match by {
        By::Model => GroupBy::Model,
        By::Route => GroupBy::Route,
        By::Key => GroupBy::Key,
        By::Provider => GroupBy::Provider,
        By::Day => GroupBy::Day,
    };
    let format = match format {
        Format::Table => ReportFormat::Table,
        Format::Json => ReportFormat::Json,
        Format::Csv => ReportFormat::Csv,
    };
    match report::report_many(&paths, &filter, by) {
        Ok(usage) => {
            print!("{}", report::render(&usage, format));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))
}

async fn serve(
    config_path: PathBuf,
    host: Option<String>,
    port: Option<u16>,
) -> anyhow::Result<ExitCode> {
    let config = load(&config_path)?;
    // Where each provider's keys came from, by id (issue 14 item 7).
    for (provider, source) in &config.key_sources {
        let key_ids = config.provider_key_ids(provider);
        tracing::info!(provider = %provider, source = %source, ?key_ids, "provider keys");
    }
    // The ledger writer runs on its own thread; requests hand it their records.
    let ledger = match &config.usage.ledger_path {
        Some(path) => {
            let ledger = echelon::usage::ledger::Ledger::open(path)
                .with_context(|| format!("cannot open the usage ledger {}", path.display()))?;
            tracing::info!(path = %path.display(), "usage ledger open");
            Some(ledger.spawn_writer(
                config.usage.queue_capacity,
                config.usage.batch_size,
                std::time::Duration::from_millis(config.usage.flush_interval_ms),
            ))
        }
        None => None,
    };
    let mut gateway = Gateway::from_config(&config)?;
    if let Some((sender, _)) = &ledger {
        gateway = gateway.with_record_sink(Arc::new(sender.clone()));
    }
    let gateway = Arc::new(gateway);
    gateway.start()?;
    let host = host.unwrap_or_else(|| config.server.host.clone());
    let port = port.unwrap_or(config.server.port);
    let listener = echelon_server::bind((host.as_str(), port))
        .await
        .with_context(|| format!("cannot listen on {host}:{port}"))?;
    let addr = listener.local_addr()?;
    let options = ServerOptions {
        api_keys: config.server.api_keys.clone(),
        body_limit_bytes: config.server.body_limit_bytes,
        log_bodies: config.server.log_bodies,
        metrics: config.server.metrics,
        metrics_auth: config.server.metrics_auth,
        allowed_hosts: config.server.allowed_hosts.clone(),
        cors_origins: config.server.cors_origins.clone(),
        header_read_timeout: config.server.header_read_timeout,
        max_connections: config
            .server
            .max_connections
            .unwrap_or_else(echelon_server::default_max_connections),
        shutdown_timeout: config.server.shutdown_timeout,
    };
    // Hot reload: SIGHUP, POST /admin/reload and, with server.watch_config, file changes.
    let watch = config.server.watch_config;
    let reloader = Arc::new(echelon_server::Reloader::new(
        gateway.clone(),
        config_path.clone(),
        config,
    ));
    if let Err(e) = reloader.spawn_sighup() {
        tracing::warn!("SIGHUP will not reload the config: {e}");
    }
    if watch {
        reloader
            .spawn_watch(echelon_server::reload::WATCH_DEBOUNCE)
            .with_context(|| format!("cannot watch {}", config_path.display()))?;
        tracing::info!(path = %config_path.display(), "watching the config for changes");
    }
    let app = echelon_server::router_with_reloader(reloader, &options);
    tracing::info!(
        routes = gateway.routes().len(),
        auth = !options.api_keys.is_empty(),
        "echelon listening on http://{addr}"
    );
    println!("echelon listening on http://{addr}");
    std::io::stdout().flush()?;
    // A second SIGTERM/SIGINT exits at once (`shutdown_signal`); otherwise in-flight
    // requests get `server.shutdown_timeout`, then are ended.
    echelon_server::serve(listener, app, &options, echelon_server::shutdown_signal()).await?;
    // In-flight requests are done or ended: stop the health checks and wait until abandoned
    // streams' last records have reached the sink, then close it and wait for the
    // writer to flush everything.
    gateway.shutdown().await;
    drop(gateway);
    if let Some((sender, writer)) = ledger {
        drop(sender);
        let rows = tokio::task::spawn_blocking(move || writer.join())
            .await
            .context("ledger writer")??;
        tracing::info!(rows, "usage ledger flushed");
    }
    tracing::info!("echelon stopped");
    Ok(ExitCode::SUCCESS)
}

async fn chat(
    config_path: PathBuf,
    req: ChatCompletionRequest,
    stream: bool,
) -> anyhow::Result<ExitCode> {
    let config = load(&config_path)?;
    let gateway = Gateway::from_config(&config)?;
    if !stream {
        return match gateway.chat(req).await {
            Ok(done) => {
                println!("{}", done.response.first_text().unwrap_or_default());
                report_attempts(&done.model, &done.attempts);
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => Ok(report_error(&e)),
        };
    }
    let mut s = match gateway.chat_stream(req).await {
        Ok(s) => s,
        Err(e) => return Ok(report_error(&e)),
    };
    let mut out = std::io::stdout();
    while let Some(chunk) = s.next().await {
        match chunk {
            Ok(chunk) => {
                for c in &chunk.choices {
                    if let Some(text) = &c.delta.content {
                        write!(out, "{text}")?;
                        out.flush()?;
                    }
                }
            }
            Err(e) => {
                writeln!(out)?;
                return Ok(report_error(&e));
            }
        }
    }
    writeln!(out)?;
    report_attempts(s.model(), s.attempts());
    Ok(ExitCode::SUCCESS)
}

fn attempt_line(a: &Attempt) -> String {
    format!(
        "  {} (provider {}, key {}) → {}{} in {} ms{}",
        a.model,
        a.provider,
        a.key_id.as_deref().unwrap_or("-"),
        a.outcome,
        a.status.map(|s| format!(" HTTP {s}")).unwrap_or_default(),
        a.latency_ms,
        if a.message.is_empty() {
            String::new()
        } else {
            format!(": {}", a.message)
        }
    )
}

fn report_attempts(model: &str, attempts: &[Attempt]) {
    eprintln!("answered by {model} after {} attempt(s):", attempts.len());
    for a in attempts {
        eprintln!("{}", attempt_line(a));
    }
}

fn report_error(e: &GatewayError) -> ExitCode {
    eprintln!("error (HTTP {}): {}", e.status(), e.message());
    for a in e.attempts() {
        eprintln!("{}", attempt_line(a));
    }
    ExitCode::FAILURE
}
