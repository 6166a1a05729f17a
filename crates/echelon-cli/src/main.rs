//! The `echelon` command: `serve`, `chat`, `config validate`.

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
    /// SIGINT/SIGTERM stop accepting and let in-flight requests finish.
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Config(ConfigCommand::Validate { path }) => validate(&path),
        Command::Config(ConfigCommand::Migrate {
            path,
            no_backup,
            validate_only,
            verbose,
        }) => migrate(&path, !no_backup, validate_only, verbose),
        Command::Serve { config, host, port } => run(serve(config, host, port)),
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

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ECHELON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(fut: impl Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
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
    match rt.block_on(fut) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn validate(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(_) => {
            println!("ok");
            ExitCode::SUCCESS
        }
        Err(errors) => {
            println!("{errors}");
            ExitCode::FAILURE
        }
    }
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
            println!("{e}");
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
    let gateway = Arc::new(Gateway::from_config(&config)?);
    let host = host.unwrap_or_else(|| config.server.host.clone());
    let port = port.unwrap_or(config.server.port);
    let listener = tokio::net::TcpListener::bind((host.as_str(), port))
        .await
        .with_context(|| format!("cannot listen on {host}:{port}"))?;
    let addr = listener.local_addr()?;
    let options = ServerOptions {
        api_keys: config.server.api_keys.clone(),
        body_limit_bytes: config.server.body_limit_bytes,
    };
    let app = echelon_server::router(gateway, &options);
    tracing::info!(
        routes = config.models.len() + config.task_groups.len(),
        auth = !options.api_keys.is_empty(),
        "echelon listening on http://{addr}"
    );
    println!("echelon listening on http://{addr}");
    std::io::stdout().flush()?;
    echelon_server::serve(listener, app, echelon_server::shutdown_signal()).await?;
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
        a.error_kind,
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
