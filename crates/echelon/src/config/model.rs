//! The configuration as plain data (DESIGN.md §2 and §5). No behaviour here beyond
//! defaults and the `#[derive(Deserialize)]` of each section: each field's key,
//! default and bounds are written once, on the field (the helpers are in
//! [`value`](super::value)); loading and the checks across sections live in the
//! sibling modules.
//!
//! Every duration is written in seconds (integer or decimal) and read into a
//! [`Duration`]; none may be negative or longer than a day.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use echelon_types::ErrorKind;
use secrecy::SecretString;
use serde::{Deserialize, Deserializer};

use super::error::{did_you_mean, reference_hint};
use super::value::limits::{
    MAX_ATTEMPTS, MAX_BODY_BYTES, MAX_CONCURRENCY, MAX_CONNECTIONS, MAX_COUNT, MAX_FLUSH_MS,
    MAX_PER_MINUTE, MAX_PRIORITY, MAX_RECORDS, MAX_RETRIES, MAX_TOKENS,
};
use super::value::{self, int, named, opt_int, secs};

/// Loaded, validated configuration.
///
/// Every reference in it resolves: each model's `provider` names an entry of
/// [`providers`](Self::providers), each echelon's models name entries of
/// [`models`](Self::models), each pool's task group is one of
/// [`task_groups`](Self::task_groups), and every route named (fallback groups,
/// wrapper targets, [`default_route`](Self::default_route)) exists. Model ids, task
/// groups, polling pools and wrappers share one namespace: no name is two of them.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// The gateway's own HTTP server.
    pub server: ServerConfig,
    /// Providers by id (e.g. `local_a`).
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Models by id (e.g. `smollm-a`, or `openai/gpt-4` from a seed `provider.json`).
    pub models: BTreeMap<String, ModelConfig>,
    /// Task groups by name (e.g. `fast_group`).
    pub task_groups: BTreeMap<String, TaskGroupConfig>,
    /// Polling pools by name (e.g. `fast_pool`).
    pub polling_pools: BTreeMap<String, PollingPoolConfig>,
    /// Wrappers by name (e.g. `fast_wrapper`).
    pub wrappers: BTreeMap<String, WrapperConfig>,
    /// The route used when a request names none the gateway knows (`default_route:`);
    /// `None` means such a request is an unknown route.
    pub default_route: Option<String>,
    /// The usage ledger and its writer (`usage:` section).
    pub usage: UsageConfig,
    /// Where the resilience state lives and how a replica behaves without it
    /// (`state:` section, issue 15); default: in memory.
    pub state: super::state::StateConfig,
    /// Traces over OTLP/HTTP (`telemetry:` section, issue 18); default: off.
    pub telemetry: super::telemetry::TelemetryConfig,
    /// What loaded but looks wrong (e.g. a `queue_timeout` that looks like
    /// milliseconds), each with where it is written; each is also logged at `warn`
    /// level when the configuration is loaded.
    pub warnings: Vec<super::ConfigError>,
    /// Where each provider's keys came from, by provider id (every provider has an
    /// entry): for the startup log, which names keys by id only.
    pub key_sources: BTreeMap<String, KeySource>,
}

/// Where a provider's [`api_keys`](ProviderConfig::api_keys) came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The configuration file (`api_keys:`, literal or `${VAR}` references).
    File,
    /// The implicit environment variable `<ID>_API_KEY` (named here, never its value):
    /// the file listed no keys for the provider.
    Env(String),
    /// Neither: the provider is called without an `Authorization` header.
    None,
}

impl std::fmt::Display for KeySource {
    /// `file`, `env OPENAI_API_KEY` or `none`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::File => f.write_str("file"),
            KeySource::Env(var) => write!(f, "env {var}"),
            KeySource::None => f.write_str("none"),
        }
    }
}

/// The gateway's HTTP server (`server:` section).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on. Default [`ServerConfig::DEFAULT_HOST`] (`127.0.0.1`).
    pub host: String,
    /// TCP port; 0 means any free port. Default [`ServerConfig::DEFAULT_PORT`] (4000).
    #[serde(deserialize_with = "int::<_, _, 0, 65535>")]
    pub port: u16,
    /// Keys a client must present (`Authorization: Bearer …`) to use the gateway.
    /// Entries that are empty after `${VAR}` substitution are dropped; an empty list
    /// means no gateway authentication.
    #[serde(deserialize_with = "value::secrets")]
    pub api_keys: Vec<SecretString>,
    /// Largest accepted request body, in bytes (1 to 1 GiB). Default
    /// [`ServerConfig::DEFAULT_BODY_LIMIT_BYTES`] (8 MiB).
    #[serde(deserialize_with = "int::<_, _, 1, MAX_BODY_BYTES>")]
    pub body_limit_bytes: usize,
    /// Whether request and response bodies are written to the debug log
    /// (`log_bodies:`). Default `false`: bodies may hold personal data.
    pub log_bodies: bool,
    /// Serve Prometheus metrics at `GET /metrics` (`metrics:`). Default `true`.
    pub metrics: bool,
    /// Put `GET /metrics` behind the gateway keys, like `/v1` and `/admin`
    /// (`metrics_auth:`). Default `false`: scrapers often carry no key, and nothing in
    /// the metrics is secret.
    pub metrics_auth: bool,
    /// `Host` values accepted besides the listening address itself (`allowed_hosts:`),
    /// each `host` (any port) or `host:port`, lower-cased; `"*"` turns the check off.
    /// Default empty: only the address a connection came in on (and, on loopback,
    /// `localhost`, `127.0.0.1` and `[::1]`, with the listening port). The check keeps
    /// a web page from reaching the gateway by DNS rebinding.
    #[serde(deserialize_with = "value::hosts")]
    pub allowed_hosts: Vec<String>,
    /// Browser origins (`scheme://host[:port]`, lower-cased) allowed to call the gateway
    /// (`cors_origins:`); `"*"` allows any. Default empty: no CORS headers, and a
    /// request carrying an `Origin` header is refused (403).
    #[serde(deserialize_with = "value::origins")]
    pub cors_origins: Vec<String>,
    /// How long a client may take to send a request head (and how long a kept-alive
    /// connection may sit idle before its next one), written in seconds, > 0, at most
    /// a day (`header_read_timeout:`). Default
    /// [`ServerConfig::DEFAULT_HEADER_READ_TIMEOUT`] (10 s).
    #[serde(deserialize_with = "secs::positive")]
    pub header_read_timeout: Duration,
    /// Client connections held open at once (`max_connections:`, 1 to 1,000,000);
    /// further connections wait in the listen backlog until one closes. Default `None`:
    /// the server picks 4,096, or half the open-files limit when that is lower.
    #[serde(deserialize_with = "opt_int::<_, _, 1, MAX_CONNECTIONS>")]
    pub max_connections: Option<usize>,
    /// After SIGTERM/SIGINT, how long in-flight requests may take to finish before they
    /// are ended and the server exits, written in seconds, 0 to a day
    /// (`shutdown_timeout:`). Default [`ServerConfig::DEFAULT_SHUTDOWN_TIMEOUT`] (30 s).
    #[serde(deserialize_with = "secs::non_negative")]
    pub shutdown_timeout: Duration,
    /// Reload the configuration when its file (or a file of its directory) changes
    /// (`watch_config:`), after a quiet period of half a second; SIGHUP and
    /// `POST /admin/reload` reload it whatever this says. Default `false`.
    pub watch_config: bool,
}

impl ServerConfig {
    /// Default listen address.
    pub const DEFAULT_HOST: &'static str = "127.0.0.1";
    /// Default TCP port.
    pub const DEFAULT_PORT: u16 = 4000;
    /// Default body limit, in bytes (8 MiB).
    pub const DEFAULT_BODY_LIMIT_BYTES: usize = 8 * 1024 * 1024;
    /// Default [`header_read_timeout`](Self::header_read_timeout) (10 s).
    pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default [`shutdown_timeout`](Self::shutdown_timeout) (30 s).
    pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: Self::DEFAULT_HOST.to_owned(),
            port: Self::DEFAULT_PORT,
            api_keys: Vec::new(),
            body_limit_bytes: Self::DEFAULT_BODY_LIMIT_BYTES,
            log_bodies: false,
            metrics: true,
            metrics_auth: false,
            allowed_hosts: Vec::new(),
            cors_origins: Vec::new(),
            header_read_timeout: Self::DEFAULT_HEADER_READ_TIMEOUT,
            max_connections: None,
            shutdown_timeout: Self::DEFAULT_SHUTDOWN_TIMEOUT,
            watch_config: false,
        }
    }
}

/// A provider: an API family and endpoint (`providers.<id>:`).
///
/// # API keys
/// The keys are resolved in this order:
/// 1. the file's entries, where `${VAR}`, `$VAR` and `${VAR:-default}` references
///    have been replaced from the environment, and inline literal keys as written;
/// 2. only when that leaves the provider **no** key: the implicit environment variable
///    `<ID>_API_KEY`, where `<ID>` is the provider id upper-cased with every
///    non-alphanumeric character replaced by `_` (provider `local-a` →
///    `LOCAL_A_API_KEY`), one key or several separated by commas. When the file lists
///    keys, the variable is ignored with a warning ([`Config::warnings`], naming the
///    variable, never its value): a provider merely *named* `openai` but pointed at
///    another `base_url` must not be sent the real `OPENAI_API_KEY` (issue 14 item 7).
///    A model's own `api_keys` override the provider's, wherever those came from.
///
/// Surrounding whitespace is trimmed and keys that are then empty (after
/// substitution, or between commas) are dropped. An empty list is allowed: the
/// upstream then gets no `Authorization` header. [`Config::key_sources`] records
/// which rule gave each provider its keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// `http://` or `https://` URL of the API root, without trailing slash, e.g.
    /// `http://127.0.0.1:8082/v1`. Required.
    #[serde(deserialize_with = "value::base_url")]
    pub base_url: String,
    /// The provider's key pool (see the type's docs for the resolution order).
    #[serde(default, deserialize_with = "value::secrets")]
    pub api_keys: Vec<SecretString>,
    /// The wire format. Default [`ProviderApi::OpenAi`].
    #[serde(default)]
    pub api: ProviderApi,
    /// How long a key cools down after a 429 without `Retry-After` (written in
    /// seconds, 0 to 1 day). Default 30 s. Either way the cooldown is capped at 300 s.
    #[serde(
        default = "ProviderConfig::default_key_cooldown",
        deserialize_with = "secs::non_negative"
    )]
    pub key_cooldown: Duration,
    /// Extra HTTP headers sent on every call to this provider's models, whatever the
    /// wire (`headers: { x-team: rl, x-portkey-key: "${PORTKEY_KEY}" }`). Names and
    /// values are checked at load (a `file:line:col` error: a name must be an HTTP
    /// token, a value visible ASCII without line breaks); `host`, `content-length`,
    /// `transfer-encoding` and `connection` are refused. A header the wire sets itself
    /// (its key header, `content-type`) wins over one of the same name here. Default
    /// none.
    #[serde(default, deserialize_with = "value::headers")]
    pub headers: ExtraHeaders,
    /// Whether the provider serves the OpenAI Responses API at `{base_url}/responses`
    /// (`api: openai` only): a request that came to `/v1/responses` is then sent there
    /// as the client wrote it, instead of being bridged to chat completions. Default
    /// `false`.
    #[serde(default)]
    pub responses: bool,
}

/// The extra headers of a provider ([`ProviderConfig::headers`]): checked names and
/// values, in the file's order. Values count as sensitive (they may hold a token): its
/// `Debug` shows names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ExtraHeaders(Vec<(http::HeaderName, http::HeaderValue)>);

impl ExtraHeaders {
    /// Headers from checked pairs (each value marked sensitive).
    pub fn new(pairs: impl IntoIterator<Item = (http::HeaderName, http::HeaderValue)>) -> Self {
        ExtraHeaders(
            pairs
                .into_iter()
                .map(|(name, mut value)| {
                    value.set_sensitive(true);
                    (name, value)
                })
                .collect(),
        )
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The headers, in the file's order.
    pub fn iter(&self) -> impl Iterator<Item = (&http::HeaderName, &http::HeaderValue)> {
        self.0.iter().map(|(n, v)| (n, v))
    }

    /// As a header map (for a client's default headers).
    pub fn to_header_map(&self) -> http::HeaderMap {
        self.iter().map(|(n, v)| (n.clone(), v.clone())).collect()
    }
}

impl std::fmt::Debug for ExtraHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(n, _)| n.as_str()))
            .finish()
    }
}

impl ProviderConfig {
    /// Default [`key_cooldown`](Self::key_cooldown).
    pub const DEFAULT_KEY_COOLDOWN: Duration = Duration::from_secs(30);

    fn default_key_cooldown() -> Duration {
        Self::DEFAULT_KEY_COOLDOWN
    }
}

/// The wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProviderApi {
    /// OpenAI chat completions (`api: openai`); also llama.cpp, vLLM, DeepSeek, ….
    #[default]
    OpenAi,
    /// The Anthropic Messages API (`api: anthropic`): `POST {base_url}/v1/messages`,
    /// the key as `x-api-key`.
    Anthropic,
    /// The Gemini API (`api: gemini`): `generateContent` / `streamGenerateContent`
    /// under `{base_url}/v1beta/models/`, the key in `x-goog-api-key`.
    Gemini,
}

impl ProviderApi {
    /// Every accepted value, as written in the file.
    pub const NAMES: &'static [&'static str] = &["openai", "anthropic", "gemini"];

    /// The name as written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderApi::OpenAi => "openai",
            ProviderApi::Anthropic => "anthropic",
            ProviderApi::Gemini => "gemini",
        }
    }

    /// The API written `name` in the file.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "openai" => Some(ProviderApi::OpenAi),
            "anthropic" => Some(ProviderApi::Anthropic),
            "gemini" => Some(ProviderApi::Gemini),
            _ => None,
        }
    }
}

/// "did you mean", else the names, unquoted (`supported: a, b`).
fn supported(word: &str, names: &[&str]) -> String {
    did_you_mean(word, names.iter().copied())
        .unwrap_or_else(|| format!("supported: {}", names.join(", ")))
}

impl<'de> Deserialize<'de> for ProviderApi {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        named(d, "provider api", Self::from_name, |v| {
            supported(v, Self::NAMES)
        })
    }
}

/// A model: one callable target (`models.<id>:`).
///
/// Durations are written in seconds (integer or decimal) and may not exceed a day.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default = "ModelConfig::unnamed")]
pub struct ModelConfig {
    /// Id of the provider serving it (a key of [`Config::providers`]). Required in the
    /// native format; a seed `provider.json` gives it by nesting instead.
    pub provider: String,
    /// Upstream model name sent in requests; defaults to the model id (also when
    /// written empty).
    pub model: String,
    /// Overrides the provider's `base_url` (same form: no trailing slash).
    #[serde(deserialize_with = "value::opt_base_url")]
    pub base_url: Option<String>,
    /// Overrides the provider's keys; `None` uses the provider's. A list that is empty
    /// after dropping empty entries counts as `None`. See [`ProviderConfig`] for the
    /// resolution order.
    #[serde(deserialize_with = "value::opt_secrets")]
    pub api_keys: Option<Vec<SecretString>>,
    /// Total time allowed for one attempt (> 0). Default 60 s.
    #[serde(deserialize_with = "secs::positive")]
    pub timeout: Duration,
    /// Time allowed to open the connection (> 0). Default 5 s.
    #[serde(deserialize_with = "secs::positive")]
    pub connect_timeout: Duration,
    /// Streaming: time allowed from sending the request until the first content chunk
    /// (> 0, at most a day); it covers the response head too, so a silent upstream is
    /// abandoned at it. Missing it fails the attempt as `first_token_timeout`, which
    /// counts against the model's health and by default is not retried on the same
    /// model ([`retry_on`](Self::retry_on)). `None` means
    /// [`DEFAULT_FIRST_TOKEN_TIMEOUT`](Self::DEFAULT_FIRST_TOKEN_TIMEOUT) (20 s); either
    /// way it is capped at [`timeout`](Self::timeout)
    /// ([`effective_first_token_timeout`](Self::effective_first_token_timeout)). Keep it
    /// well below `timeout` for non-reasoning models (a healthy one starts streaming
    /// within a few seconds); raise it for reasoning models, which may think for
    /// minutes before their first content token.
    #[serde(deserialize_with = "secs::opt_positive")]
    pub first_token_timeout: Option<Duration>,
    /// Streaming: largest gap allowed between two chunks (> 0). Default 30 s.
    #[serde(deserialize_with = "secs::positive")]
    pub chunk_timeout: Duration,
    /// Retries of the same model after a retryable failure, the simple form of
    /// [`retry_on`](Self::retry_on) (0 to 100): the limit of every kind `retry_on`
    /// does not name, except the timeouts (`timeout`, `first_token_timeout`), whose
    /// default is 0. Also how many other keys a 401/403 may move on to. Default 2.
    #[serde(deserialize_with = "int::<_, _, 0, MAX_RETRIES>")]
    pub max_retries: u32,
    /// Retries of the same model per kind of failure (`retry_on: { rate_limited: 2,
    /// timeout: 0, … }`); see [`RetryOn`] for the keys, the rule and the defaults.
    pub retry_on: RetryOn,
    /// How long a request may wait for this model when it is rate-limited, in seconds
    /// (0 to 10; `rate_limit_wait:`). When a 429's `Retry-After`, a keyless model's
    /// backoff after a 429, or the cooldown of all its keys ends at most this far away,
    /// the request sleeps until then and retries the same model (within
    /// `retry_on.rate_limited`); a longer wait sets the model aside and the next
    /// candidate is tried at once. Default 0: a rate-limited model is always set aside
    /// (lowest latency; a fallback answers instead). Raise it to prefer this model's
    /// tier over latency when its Retry-After values are short.
    #[serde(deserialize_with = "secs::rate_limit_wait")]
    pub rate_limit_wait: Duration,
    /// Base delay between retries (≥ 0). Default 1 s.
    #[serde(deserialize_with = "secs::non_negative")]
    pub retry_delay: Duration,
    /// Context window, in tokens (1 to 10⁸).
    #[serde(deserialize_with = "opt_int::<_, _, 1, MAX_TOKENS>")]
    pub context_window: Option<u32>,
    /// Token-bucket capacity, in requests (seed 004 `rate_limit_capacity`, > 0, at
    /// most 10⁹).
    #[serde(deserialize_with = "value::opt_rate")]
    pub rate_limit_capacity: Option<f64>,
    /// Token-bucket refill rate, in requests per second (seed 004
    /// `rate_limit_refill_rate`, > 0, at most 10⁹).
    #[serde(deserialize_with = "value::opt_rate")]
    pub rate_limit_refill_rate: Option<f64>,
    /// Requests per minute (1 to 10⁹).
    #[serde(deserialize_with = "opt_int::<_, _, 1, MAX_PER_MINUTE>")]
    pub rpm_limit: Option<u32>,
    /// Tokens per minute (1 to 10⁹).
    #[serde(deserialize_with = "opt_int::<_, _, 1, MAX_PER_MINUTE>")]
    pub tpm_limit: Option<u32>,
    /// Requests in flight at once (1 to 10⁶).
    #[serde(deserialize_with = "opt_int::<_, _, 1, MAX_CONCURRENCY>")]
    pub concurrency_limit: Option<u32>,
    /// Longest wait for a token bucket or a concurrency slot before this model is
    /// skipped for the next candidate (`queue_timeout`, in seconds like every other
    /// duration; it was milliseconds before, so a value above 10 s gets a warning).
    /// Default 0.1 s.
    #[serde(deserialize_with = "secs::non_negative")]
    pub queue_timeout: Duration,
    /// Overrides the provider's `key_cooldown` for the model's own keys.
    #[serde(deserialize_with = "secs::opt_non_negative")]
    pub key_cooldown: Option<Duration>,
    /// Retries may add at most this share of extra load on the model (0–1, e.g. 0.2 =
    /// 20%), over a 10 s window, plus one retry per second always. Default 0.2.
    #[serde(deserialize_with = "value::retry_budget")]
    pub retry_budget: f64,
    /// The model's circuit breaker (`circuit_breaker:`); the defaults when absent.
    pub circuit_breaker: CircuitBreakerConfig,
    /// What the model costs (`pricing:`); `None` uses the built-in price of the
    /// upstream model name, when there is one (`usage::pricing::price_for`).
    pub pricing: Option<PricingConfig>,
    /// The tiktoken encoding for local token counts (`encoding:`); `None` picks one by
    /// the upstream model name ([`TokenEncoding::for_model`]).
    pub encoding: Option<TokenEncoding>,
    /// The largest answer the gateway reads from this model, in bytes (1 to 1 GiB): a
    /// non-streamed body, or a stream's whole body. A longer answer fails the attempt
    /// as `malformed` (the next candidate is tried) and is not buffered further.
    /// Default [`ModelConfig::DEFAULT_MAX_RESPONSE_BYTES`] (32 MiB).
    #[serde(deserialize_with = "int::<_, _, 1, MAX_BODY_BYTES>")]
    pub max_response_bytes: usize,
    /// Whether the model continues an answer given as a last assistant message (an
    /// assistant prefill). A stream continued on this model (`stream_failure: continue`)
    /// is sent the partial answer that way; otherwise as the partial answer and an
    /// instruction to go on. Default `false`: some providers refuse a prefill (Anthropic's
    /// newest models answer 400).
    pub prefill: bool,
    /// Whether the model constrains its output to a JSON schema given as OpenAI
    /// `response_format: {type: json_schema, json_schema: {…}}` (OpenAI, llama.cpp's
    /// llama-server, vLLM). `echelon judge --verdict auto` asks such a model for a JSON
    /// verdict. Default `false`.
    pub structured_output: bool,
    /// Streams: what an SSE event whose `data:` is not a chunk does (`malformed_event:
    /// skip | fail`). Default [`MalformedEvent::Skip`]: it is skipped and counted, and
    /// the stream goes on (a stream that never recovers still fails, see
    /// [`crate::provider::MAX_MALFORMED_IN_A_ROW`]). An in-band `{"error": …}` event
    /// ends the stream either way.
    pub malformed_event: MalformedEvent,
}

impl ModelConfig {
    /// Default [`queue_timeout`](Self::queue_timeout).
    pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_millis(100);
    /// Default [`retry_budget`](Self::retry_budget).
    pub const DEFAULT_RETRY_BUDGET: f64 = 0.2;
    /// Default [`timeout`](Self::timeout).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
    /// Default [`connect_timeout`](Self::connect_timeout).
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default [`chunk_timeout`](Self::chunk_timeout).
    pub const DEFAULT_CHUNK_TIMEOUT: Duration = Duration::from_secs(30);
    /// Default [`max_retries`](Self::max_retries).
    pub const DEFAULT_MAX_RETRIES: u32 = 2;
    /// Default [`first_token_timeout`](Self::first_token_timeout) (20 s), capped at
    /// [`timeout`](Self::timeout).
    pub const DEFAULT_FIRST_TOKEN_TIMEOUT: Duration = Duration::from_secs(20);
    /// Default [`rate_limit_wait`](Self::rate_limit_wait): 0, never wait in place.
    pub const DEFAULT_RATE_LIMIT_WAIT: Duration = Duration::ZERO;
    /// Default [`retry_delay`](Self::retry_delay).
    pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(1);
    /// Default [`max_response_bytes`](Self::max_response_bytes): 32 MiB.
    pub const DEFAULT_MAX_RESPONSE_BYTES: usize = crate::provider::DEFAULT_MAX_RESPONSE_BYTES;

    /// The defaults before a file names the provider and the model.
    fn unnamed() -> Self {
        Self::new(String::new(), String::new())
    }

    /// A model of `provider` named `model` upstream, every other field at its default.
    pub fn new(provider: impl Into<String>, model: impl Into<String>) -> Self {
        ModelConfig {
            provider: provider.into(),
            model: model.into(),
            base_url: None,
            api_keys: None,
            timeout: Self::DEFAULT_TIMEOUT,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            first_token_timeout: None,
            chunk_timeout: Self::DEFAULT_CHUNK_TIMEOUT,
            max_retries: Self::DEFAULT_MAX_RETRIES,
            retry_on: RetryOn::default(),
            rate_limit_wait: Self::DEFAULT_RATE_LIMIT_WAIT,
            retry_delay: Self::DEFAULT_RETRY_DELAY,
            context_window: None,
            rate_limit_capacity: None,
            rate_limit_refill_rate: None,
            rpm_limit: None,
            tpm_limit: None,
            concurrency_limit: None,
            queue_timeout: Self::DEFAULT_QUEUE_TIMEOUT,
            key_cooldown: None,
            retry_budget: Self::DEFAULT_RETRY_BUDGET,
            circuit_breaker: CircuitBreakerConfig::default(),
            pricing: None,
            encoding: None,
            max_response_bytes: Self::DEFAULT_MAX_RESPONSE_BYTES,
            prefill: false,
            structured_output: false,
            malformed_event: MalformedEvent::default(),
        }
    }

    /// The encoding for local token counts: [`encoding`](Self::encoding), or the one
    /// [`TokenEncoding::for_model`] picks for the upstream model name.
    pub fn token_encoding(&self) -> TokenEncoding {
        self.encoding
            .unwrap_or_else(|| TokenEncoding::for_model(&self.model))
    }

    /// The first-token deadline streams get: [`first_token_timeout`](Self::first_token_timeout),
    /// else [`DEFAULT_FIRST_TOKEN_TIMEOUT`](Self::DEFAULT_FIRST_TOKEN_TIMEOUT) (20 s),
    /// at most [`timeout`](Self::timeout).
    pub fn effective_first_token_timeout(&self) -> Duration {
        self.first_token_timeout
            .unwrap_or(Self::DEFAULT_FIRST_TOKEN_TIMEOUT)
            .min(self.timeout)
    }

    /// How many times the same model is retried for one request after failures of
    /// `kind`, by this model's own settings: [`retry_on`](Self::retry_on)'s entry,
    /// else its default ([`RetryOn::default_for`] with [`max_retries`](Self::max_retries)).
    /// `None` for a kind that is never retried (see [`RetryOn::KINDS`]).
    pub fn retries_on(&self, kind: ErrorKind) -> Option<u32> {
        self.retry_on.limit(kind, self.max_retries)
    }
}

/// Retries of the same model per kind of failure (`retry_on:` of a model or of an
/// echelon), e.g. `retry_on: { rate_limited: 2, server_error: 2, connect: 1, timeout: 0,
/// first_token_timeout: 0 }`.
///
/// The keys are the retryable attempt outcomes by their names: `timeout`,
/// `first_token_timeout`, `connect`, `rate_limited`, `server_error`, `malformed`,
/// `stream_cut`; each value is 0 to 100. Any other key is an error (with a "did you
/// mean").
///
/// **The rule.** After a failure of kind K, the same model is retried only while the
/// retries already made after kind-K failures, for this request, are fewer than
/// `retry_on[K]`; else the request moves on to its next candidate. The kinds count
/// apart: with `{ server_error: 1, connect: 1 }` a 500, a retry, a reset, a retry, a
/// 500 moves on (two retries in all). Retries still wait their backoff (`retry_delay`),
/// draw on the model's `retry_budget`, and count against the request's
/// `max_attempts`.
///
/// **Defaults** (a key not written): `timeout: 0` and `first_token_timeout: 0` — a
/// model that timed out or stayed silent is abandoned for the next candidate at once,
/// instead of holding the request for another whole deadline — and every other kind
/// the model's `max_retries` (default 2), so a 429, a 5xx or a reset still gets its
/// same-model retries with backoff.
///
/// **Echelon over model, key by key.** An echelon's `retry_on` entry wins over its
/// models' for calls through that echelon; a kind the echelon does not name falls back
/// to the echelon's `max_retries` when it sets one (not for the two timeouts), else
/// to the model's entry, else to the model's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryOn {
    /// After the whole attempt's `timeout` (or a stream's chunk gap before content).
    #[serde(deserialize_with = "opt_int::<_, _, 0, MAX_RETRIES>")]
    pub timeout: Option<u32>,
    /// After a stream's `first_token_timeout`.
    #[serde(deserialize_with = "opt_int::<_, _, 0, MAX_RETRIES>")]
    pub first_token_timeout: Option<u32>,
    /// After a connection failure or reset.
    #[serde(deserialize_with = "opt_int::<_, _, 0, MAX_RETRIES>")]
    pub connect: Option<u32>,
    /// After a 429 (another key at once; a keyless model after its Retry-After, see
    /// [`ModelConfig::rate_limit_wait`]). Also bounds the waits for its keys' cooldown.
    #[serde(deserialize_with = "opt_int::<_, _, 0, MAX_RETRIES>")]
    pub rate_limited: Option<u32>,
    /// After a 5xx.
    #[serde(deserialize_with = "opt_int::<_, _, 0, MAX_RETRIES>")]
    pub server_error: Option<u32>,
    /// After an answer that does not parse or is empty.
    #[serde(deserialize_with = "opt_int::<_, _, 0, MAX_RETRIES>")]
    pub malformed: Option<u32>,
    /// After a stream that ended before its end (before its first content chunk).
    #[serde(deserialize_with = "opt_int::<_, _, 0, MAX_RETRIES>")]
    pub stream_cut: Option<u32>,
}

impl RetryOn {
    /// The kinds `retry_on` names, in key order: the retryable ones.
    pub const KINDS: [ErrorKind; 7] = [
        ErrorKind::Timeout,
        ErrorKind::FirstTokenTimeout,
        ErrorKind::Connect,
        ErrorKind::RateLimited,
        ErrorKind::ServerError,
        ErrorKind::Malformed,
        ErrorKind::StreamCut,
    ];

    /// The default retries after `kind` for a model with `max_retries`: 0 for the
    /// timeouts (`timeout`, `first_token_timeout`), else `max_retries`.
    pub fn default_for(kind: ErrorKind, max_retries: u32) -> u32 {
        if kind.is_timeout() { 0 } else { max_retries }
    }

    /// The retries after `kind` by these entries over a `max_retries`: the entry, else
    /// [`default_for`](Self::default_for); `None` for a kind that is never retried
    /// (not one of [`KINDS`](Self::KINDS)).
    pub fn limit(&self, kind: ErrorKind, max_retries: u32) -> Option<u32> {
        Self::KINDS.contains(&kind).then(|| {
            self.get(kind)
                .unwrap_or_else(|| Self::default_for(kind, max_retries))
        })
    }

    /// The entry written for `kind`, if any (`None` for a kind it has no key for).
    pub fn get(&self, kind: ErrorKind) -> Option<u32> {
        match kind {
            ErrorKind::Timeout => self.timeout,
            ErrorKind::FirstTokenTimeout => self.first_token_timeout,
            ErrorKind::Connect => self.connect,
            ErrorKind::RateLimited => self.rate_limited,
            ErrorKind::ServerError => self.server_error,
            ErrorKind::Malformed => self.malformed,
            ErrorKind::StreamCut => self.stream_cut,
            _ => None,
        }
    }

    /// Every entry set to `n` (a polling pool's instances: `RetryOn::all(0)`, the pool
    /// does its own retrying).
    pub fn all(n: u32) -> RetryOn {
        RetryOn {
            timeout: Some(n),
            first_token_timeout: Some(n),
            connect: Some(n),
            rate_limited: Some(n),
            server_error: Some(n),
            malformed: Some(n),
            stream_cut: Some(n),
        }
    }
}

/// What a stream does with an SSE event whose `data:` does not parse as a chunk
/// (`malformed_event:` of a model; issue 19: one malformed event is not the end of a
/// stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MalformedEvent {
    /// `skip`: the event is not passed on, it is counted (the stream's anomalies, the
    /// ledger's `stream_anomalies`, `echelon_stream_anomalies_total`) and the stream
    /// goes on; more than [`crate::provider::MAX_MALFORMED_IN_A_ROW`] in a row end it
    /// as `malformed`.
    #[default]
    Skip,
    /// `fail`: the first one ends the stream as `malformed` (before the first content
    /// chunk the next candidate is tried; after it the client gets the error event).
    Fail,
}

impl MalformedEvent {
    /// Every accepted value, as written in the file.
    pub const NAMES: &'static [&'static str] = &["skip", "fail"];

    /// The name as written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            MalformedEvent::Skip => "skip",
            MalformedEvent::Fail => "fail",
        }
    }

    /// The setting written `name` in the file.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "skip" => Some(MalformedEvent::Skip),
            "fail" => Some(MalformedEvent::Fail),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for MalformedEvent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        named(d, "malformed_event value", Self::from_name, |v| {
            values_hint(v, Self::NAMES)
        })
    }
}

/// What a model costs (`pricing:` of a model), in USD per 1 million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingConfig {
    /// Prompt (input) tokens, USD per 1M tokens (≥ 0). Required.
    #[serde(deserialize_with = "value::non_negative")]
    pub input_per_1m: f64,
    /// Completion (output) tokens, USD per 1M tokens (≥ 0). Required.
    #[serde(deserialize_with = "value::non_negative")]
    pub output_per_1m: f64,
    /// Prompt tokens served from the provider's prompt cache, USD per 1M tokens (≥ 0);
    /// `None` prices them at [`input_per_1m`](Self::input_per_1m).
    #[serde(default, deserialize_with = "value::opt_non_negative")]
    pub cached_input_per_1m: Option<f64>,
    /// Prompt tokens written to the provider's prompt cache (Anthropic's
    /// `cache_creation_input_tokens`), USD per 1M tokens (≥ 0); `None` prices them at
    /// [`input_per_1m`](Self::input_per_1m).
    #[serde(default, deserialize_with = "value::opt_non_negative")]
    pub cache_write_per_1m: Option<f64>,
}

/// A tiktoken encoding, for counting tokens locally (`encoding:` of a model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenEncoding {
    /// `cl100k_base`: GPT-3.5, GPT-4 and (as an estimate) most other models.
    Cl100kBase,
    /// `o200k_base`: GPT-4o, GPT-4.1, GPT-5 and the o-series.
    O200kBase,
}

impl TokenEncoding {
    /// Every accepted value, as written in the file.
    pub const NAMES: &'static [&'static str] = &["cl100k_base", "o200k_base"];

    /// The name as written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenEncoding::Cl100kBase => "cl100k_base",
            TokenEncoding::O200kBase => "o200k_base",
        }
    }

    /// The encoding written `name` in the file.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "cl100k_base" => Some(TokenEncoding::Cl100kBase),
            "o200k_base" => Some(TokenEncoding::O200kBase),
            _ => None,
        }
    }

    /// The encoding OpenAI uses for the upstream model name `model`: `o200k_base` for
    /// `gpt-4o*`, `chatgpt-4o*`, `gpt-4.1*`, `gpt-5*`, `o1*`, `o3*` and `o4*`, else
    /// `cl100k_base` (exact for GPT-3.5/4, an estimate for other families). A
    /// `vendor/` prefix (`openai/gpt-4o`) is ignored; case is ignored.
    pub fn for_model(model: &str) -> Self {
        /// Families named by prefix (`gpt-4o-mini`, `gpt-4.1-nano`, …).
        const PREFIXES: &[&str] = &["gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-5"];
        /// The o-series: the name alone or followed by `-…` (`o3-mini`, not `o1x`).
        const O_SERIES: &[&str] = &["o1", "o3", "o4"];
        let name = model
            .rsplit('/')
            .next()
            .unwrap_or(model)
            .to_ascii_lowercase();
        let o_series = O_SERIES.iter().any(|o| {
            name.strip_prefix(o)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
        });
        if o_series || PREFIXES.iter().any(|p| name.starts_with(p)) {
            TokenEncoding::O200kBase
        } else {
            TokenEncoding::Cl100kBase
        }
    }
}

impl<'de> Deserialize<'de> for TokenEncoding {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        named(d, "encoding", Self::from_name, |v| {
            supported(v, Self::NAMES)
        })
    }
}

/// The usage ledger and its writer (`usage:` section).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default = "UsageConfig::unresolved")]
pub struct UsageConfig {
    /// The SQLite ledger file (`ledger: PATH`; a relative path is relative to the
    /// directory of the configuration file that sets it, `~/…` is under `$HOME`;
    /// `ledger: true` or no `ledger` key means [`UsageConfig::default_ledger_path`]).
    /// `None` when the ledger is off (`ledger: false`), or when the key is absent and
    /// no data directory could be determined.
    #[serde(rename = "ledger", deserialize_with = "value::ledger")]
    pub ledger_path: Option<PathBuf>,
    /// Records queued for the writer before senders wait (1 to 10⁷). Default
    /// [`UsageConfig::DEFAULT_QUEUE_CAPACITY`] (10 000).
    #[serde(deserialize_with = "int::<_, _, 1, MAX_RECORDS>")]
    pub queue_capacity: usize,
    /// Most records written in one transaction (1 to 10⁷). Default
    /// [`UsageConfig::DEFAULT_BATCH_SIZE`] (256).
    #[serde(deserialize_with = "int::<_, _, 1, MAX_RECORDS>")]
    pub batch_size: usize,
    /// Longest time a record waits in a partial batch, in milliseconds (1 to one
    /// hour; the one duration not in seconds, as its name says). Default
    /// [`UsageConfig::DEFAULT_FLUSH_INTERVAL_MS`] (200).
    #[serde(deserialize_with = "int::<_, _, 1, MAX_FLUSH_MS>")]
    pub flush_interval_ms: u64,
}

impl UsageConfig {
    /// Default [`queue_capacity`](Self::queue_capacity), in records.
    pub const DEFAULT_QUEUE_CAPACITY: usize = 10_000;
    /// Default [`batch_size`](Self::batch_size), in records.
    pub const DEFAULT_BATCH_SIZE: usize = 256;
    /// Default [`flush_interval_ms`](Self::flush_interval_ms), in milliseconds.
    pub const DEFAULT_FLUSH_INTERVAL_MS: u64 = 200;
    /// The ledger's file name inside the data directory.
    pub const LEDGER_FILE: &'static str = "ledger.db";

    /// The ledger path used when `usage.ledger` is absent, from the process
    /// environment: `$ECHELON_DATA_DIR/ledger.db`, else
    /// `$XDG_DATA_HOME/echelon/ledger.db`, else `$HOME/.local/share/echelon/ledger.db`.
    /// Empty variables count as unset, and so does a relative `XDG_DATA_HOME` (the XDG
    /// spec says to ignore it). `None` when none of them is set.
    pub fn default_ledger_path() -> Option<PathBuf> {
        Self::default_ledger_path_with_env(&|name| {
            std::env::var_os(name).and_then(|v| v.into_string().ok())
        })
    }

    /// [`UsageConfig::default_ledger_path`] with variables taken from `env` (`None` =
    /// unset) instead of the process environment.
    pub fn default_ledger_path_with_env(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
        let var = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        if let Some(dir) = var("ECHELON_DATA_DIR") {
            return Some(dir.join(Self::LEDGER_FILE));
        }
        if let Some(dir) = var("XDG_DATA_HOME").filter(|d| d.is_absolute()) {
            return Some(dir.join("echelon").join(Self::LEDGER_FILE));
        }
        var("HOME").map(|home| {
            home.join(".local")
                .join("share")
                .join("echelon")
                .join(Self::LEDGER_FILE)
        })
    }

    /// The defaults as read, before the loader resolves the ledger path: an empty path
    /// stands for "the default path" (see [`value::ledger`]).
    fn unresolved() -> Self {
        Self::with_ledger_path(Some(PathBuf::new()))
    }

    /// The defaults, with the ledger at `ledger_path`.
    pub fn with_ledger_path(ledger_path: Option<PathBuf>) -> Self {
        UsageConfig {
            ledger_path,
            queue_capacity: Self::DEFAULT_QUEUE_CAPACITY,
            batch_size: Self::DEFAULT_BATCH_SIZE,
            flush_interval_ms: Self::DEFAULT_FLUSH_INTERVAL_MS,
        }
    }
}

impl Default for UsageConfig {
    /// The defaults, the ledger at [`UsageConfig::default_ledger_path`].
    fn default() -> Self {
        Self::with_ledger_path(Self::default_ledger_path())
    }
}

/// A task group: a named, ordered set of echelons plus its fallback
/// (`task_groups.<name>:`, or a seed group file). Besides these fields a group has
/// its `echelon<N>` keys and may repeat its `name`, both read by the loader.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskGroupConfig {
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// The echelons in the order they are tried: by ascending
    /// [`priority`](EchelonConfig::priority), the echelons without one after those
    /// with one, ties in number order (`echelon1`, `echelon2`, …). Numbers are
    /// contiguous from 1; at least one echelon, each with at least one model.
    #[serde(skip)]
    pub echelons: Vec<EchelonConfig>,
    /// How the group fails over; `None` means the defaults of [`FallbackConfig`].
    #[serde(default)]
    pub fallback_config: Option<FallbackConfig>,
    /// What a stream that fails after its first content chunk does
    /// (`stream_failure:`); `None` means [`StreamFailureConfig::default`] (end with the
    /// error event).
    #[serde(default)]
    pub stream_failure: Option<StreamFailureConfig>,
}

/// What a stream that fails after its first content chunk does (`stream_failure:` of a
/// task group or a wrapper; issue 19).
///
/// Before the first content chunk every failure fails over transparently. After it, the
/// client has part of one model's answer, and by default (`mode: error`) the stream ends
/// with an explicit error event — never a normal end. With `mode: continue` the gateway
/// asks the route's next candidate (not the model whose stream failed) to continue the
/// same answer and streams the rest as one response: as an assistant prefill to a model
/// declared [`prefill: true`](ModelConfig::prefill), otherwise as the partial answer
/// followed by an instruction to go on; a restated prefix is dropped. RL rollouts
/// should keep `error`: a sample mixed from two models is not a sample of the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamFailureConfig {
    /// `error` (default) or `continue`.
    pub mode: StreamFailureMode,
    /// Most continuations of one stream (1 to 10). Default 1. A continuation that also
    /// fails beyond this ends the stream with the error event.
    #[serde(deserialize_with = "int::<_, _, 1, MAX_CONTINUATIONS>")]
    pub max_continuations: u32,
}

/// Most continuations a [`StreamFailureConfig`] may allow.
const MAX_CONTINUATIONS: i128 = 10;

impl Default for StreamFailureConfig {
    fn default() -> Self {
        StreamFailureConfig {
            mode: StreamFailureMode::Error,
            max_continuations: 1,
        }
    }
}

/// A [`StreamFailureConfig::mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamFailureMode {
    /// `error`: end the stream with the error event (DESIGN.md §4 "Streams").
    #[default]
    Error,
    /// `continue`: have the next candidate continue the answer.
    Continue,
}

impl StreamFailureMode {
    /// Every accepted value, as written in the file.
    pub const NAMES: &'static [&'static str] = &["error", "continue"];

    /// The mode written `name` in the file.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "error" => Some(StreamFailureMode::Error),
            "continue" => Some(StreamFailureMode::Continue),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for StreamFailureMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        named(d, "stream failure mode", Self::from_name, |v| {
            values_hint(v, Self::NAMES)
        })
    }
}

/// One tier of a task group (`echelon<N>:`). The optional values override the
/// models' own settings for calls made through this echelon.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EchelonConfig {
    /// `echelon1`, `echelon2`, … (its key).
    #[serde(skip)]
    pub name: String,
    /// Model ids (keys of [`Config::models`]), at least one.
    pub models: Vec<String>,
    /// Requests in flight at once through this echelon (1 to 10⁶).
    #[serde(deserialize_with = "opt_int::<_, _, 1, MAX_CONCURRENCY>")]
    pub concurrency_limit: Option<u32>,
    /// Requests per minute through this echelon (1 to 10⁹).
    #[serde(deserialize_with = "opt_int::<_, _, 1, MAX_PER_MINUTE>")]
    pub rpm_limit: Option<u32>,
    /// Where the echelon comes in its group's order (0 to 10⁶; seed field): lower is
    /// tried first, equal ones in number order, and echelons without a priority after
    /// all those with one (see [`TaskGroupConfig::echelons`]).
    #[serde(deserialize_with = "opt_int::<_, _, 0, MAX_PRIORITY>")]
    pub priority: Option<u32>,
    /// Total time per attempt (> 0, at most a day).
    #[serde(deserialize_with = "secs::opt_positive")]
    pub timeout: Option<Duration>,
    /// Retries per model (0 to 100): overrides the models' `max_retries` within this
    /// echelon, and is the limit of every kind but the timeouts that the echelon's
    /// [`retry_on`](Self::retry_on) does not name.
    #[serde(deserialize_with = "opt_int::<_, _, 0, MAX_RETRIES>")]
    pub max_retries: Option<u32>,
    /// Retries per kind of failure for calls through this echelon; each key written
    /// overrides the models' (see [`RetryOn`]).
    pub retry_on: RetryOn,
    /// Overrides the models' [`rate_limit_wait`](ModelConfig::rate_limit_wait) within
    /// this echelon (seconds, 0 to 10).
    #[serde(deserialize_with = "secs::opt_rate_limit_wait")]
    pub rate_limit_wait: Option<Duration>,
    /// Sampling temperature sent when the request has none (≥ 0).
    #[serde(deserialize_with = "value::opt_non_negative")]
    pub temperature: Option<f64>,
    /// `max_tokens` sent when the request has none (1 to 10⁸).
    #[serde(deserialize_with = "opt_int::<_, _, 1, MAX_TOKENS>")]
    pub max_tokens: Option<u32>,
}

/// How a task group fails over (`fallback_config:`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FallbackConfig {
    /// The strategy. Default [`FallbackStrategy::EchelonDown`].
    pub strategy: FallbackStrategy,
    /// Routes to try after this group: a task group, `group.echelonN`, a model id, a
    /// polling pool or a wrapper.
    pub fallback_groups: Vec<String>,
    /// Most attempts in total for one request (1 to 1000).
    #[serde(deserialize_with = "opt_int::<_, _, 1, MAX_ATTEMPTS>")]
    pub max_attempts: Option<u32>,
    /// Delay between fallback steps (≥ 0, at most a day).
    #[serde(deserialize_with = "secs::opt_non_negative")]
    pub retry_delay: Option<Duration>,
    /// Per-model circuit breaker settings.
    pub circuit_breaker: Option<CircuitBreakerConfig>,
}

/// A fallback strategy (seed 001).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FallbackStrategy {
    /// `echelon_down`: the next echelon of the same group.
    #[default]
    EchelonDown,
    /// `task_group_switch`: the groups of `fallback_groups`.
    TaskGroupSwitch,
    /// `provider_failover`: a model of another provider.
    ProviderFailover,
}

impl FallbackStrategy {
    /// Every accepted value, as written in the file.
    pub const NAMES: &'static [&'static str] =
        &["echelon_down", "task_group_switch", "provider_failover"];

    /// The name as written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackStrategy::EchelonDown => "echelon_down",
            FallbackStrategy::TaskGroupSwitch => "task_group_switch",
            FallbackStrategy::ProviderFailover => "provider_failover",
        }
    }

    /// The strategy written `name` in the file.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "echelon_down" => Some(FallbackStrategy::EchelonDown),
            "task_group_switch" => Some(FallbackStrategy::TaskGroupSwitch),
            "provider_failover" => Some(FallbackStrategy::ProviderFailover),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for FallbackStrategy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        named(d, "fallback strategy", Self::from_name, |v| {
            reference_hint(v, "strategies", Self::NAMES.iter().copied())
        })
    }
}

/// Circuit breaker settings (`circuit_breaker:`): closed → open after
/// `failure_threshold` failures → half-open after `recovery_time`, letting
/// `half_open_requests` probes through → closed on success.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    /// Consecutive failures that open the breaker (1 to 10⁶). Default 5.
    #[serde(deserialize_with = "int::<_, _, 1, MAX_COUNT>")]
    pub failure_threshold: u32,
    /// How long the breaker stays open before probing (≥ 0, at most a day). Default
    /// 60 s.
    #[serde(deserialize_with = "secs::non_negative")]
    pub recovery_time: Duration,
    /// Probes let through while half-open (1 to 10⁶). Default 1.
    #[serde(deserialize_with = "int::<_, _, 1, MAX_COUNT>")]
    pub half_open_requests: u32,
    /// Also open when the share of failed requests over `window` reaches this (0–1);
    /// `None` (default) uses consecutive failures only.
    #[serde(deserialize_with = "value::failure_rate")]
    pub failure_rate: Option<f64>,
    /// The failure-rate window (> 0, at most a day). Default 60 s.
    #[serde(deserialize_with = "secs::positive")]
    pub window: Duration,
    /// Fewest requests in the window before the failure rate counts (1 to 10⁶).
    /// Default 20.
    #[serde(deserialize_with = "int::<_, _, 1, MAX_COUNT>")]
    pub min_requests: u32,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            failure_threshold: 5,
            recovery_time: Duration::from_secs(60),
            half_open_requests: 1,
            failure_rate: None,
            window: Duration::from_secs(60),
            min_requests: 20,
        }
    }
}

/// A polling pool: the models of exactly one task group as instances, rotated and
/// health-checked (`polling_pools.<name>:`, or a seed pool file). Besides these
/// fields the loader reads `name`, the task group (`task_groups: [g]` or
/// `task_group: g`) and seed 002's top-level `fallback_strategy` and
/// `max_instance_attempts`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollingPoolConfig {
    /// Free text.
    pub description: Option<String>,
    /// The one task group whose models are the pool's instances (seed 002: one task
    /// per pool).
    #[serde(skip)]
    pub task_group: String,
    /// How the next instance is picked. Default [`RotationStrategy::RoundRobin`].
    pub rotation_strategy: RotationStrategy,
    /// Model id → weight (1 to 10⁶) for [`RotationStrategy::Weighted`]; models not
    /// listed weigh 1. Every key is a model of [`task_group`](Self::task_group).
    #[serde(deserialize_with = "value::weights")]
    pub weights: BTreeMap<String, u32>,
    /// Time between two health probes of an instance (> 0, at most a day). Default
    /// 30 s.
    #[serde(deserialize_with = "secs::positive")]
    pub health_check_interval: Duration,
    /// What a health probe does. Default [`HealthCheckKind::Models`].
    pub health_check: HealthCheckKind,
    /// Failed probes or live failures in a row that mark an instance unhealthy (1 to
    /// 10⁶). Default 3.
    #[serde(deserialize_with = "int::<_, _, 1, MAX_COUNT>")]
    pub failure_threshold: u32,
    /// How long an unhealthy instance is left out before it is probed again (≥ 0, at
    /// most a day). Default 60 s.
    #[serde(deserialize_with = "secs::non_negative")]
    pub recovery_time: Duration,
    /// How a failed request moves on inside the pool.
    pub fallback_config: PoolFallbackConfig,
}

impl PollingPoolConfig {
    /// Default [`health_check_interval`](Self::health_check_interval).
    pub const DEFAULT_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(30);
    /// Default [`failure_threshold`](Self::failure_threshold).
    pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
    /// Default [`recovery_time`](Self::recovery_time).
    pub const DEFAULT_RECOVERY_TIME: Duration = Duration::from_secs(60);

    /// A pool over `task_group`, every other field at its default.
    pub fn new(task_group: impl Into<String>) -> Self {
        PollingPoolConfig {
            description: None,
            task_group: task_group.into(),
            rotation_strategy: RotationStrategy::default(),
            weights: BTreeMap::new(),
            health_check_interval: Self::DEFAULT_HEALTH_CHECK_INTERVAL,
            health_check: HealthCheckKind::default(),
            failure_threshold: Self::DEFAULT_FAILURE_THRESHOLD,
            recovery_time: Self::DEFAULT_RECOVERY_TIME,
            fallback_config: PoolFallbackConfig::default(),
        }
    }
}

impl Default for PollingPoolConfig {
    /// [`PollingPoolConfig::new`] with an empty task group name.
    fn default() -> Self {
        PollingPoolConfig::new(String::new())
    }
}

/// How a polling pool picks the next instance (`rotation_strategy:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RotationStrategy {
    /// `round_robin`: each healthy instance in turn.
    #[default]
    RoundRobin,
    /// `least_busy`: the healthy instance with the fewest requests in flight.
    LeastBusy,
    /// `weighted`: healthy instances in proportion to their `weights`.
    Weighted,
}

impl RotationStrategy {
    /// Every accepted value, as written in the file.
    pub const NAMES: &'static [&'static str] = &["round_robin", "least_busy", "weighted"];

    /// The name as written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            RotationStrategy::RoundRobin => "round_robin",
            RotationStrategy::LeastBusy => "least_busy",
            RotationStrategy::Weighted => "weighted",
        }
    }

    /// The strategy written `name` in the file.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "round_robin" => Some(RotationStrategy::RoundRobin),
            "least_busy" => Some(RotationStrategy::LeastBusy),
            "weighted" => Some(RotationStrategy::Weighted),
            _ => None,
        }
    }
}

/// "did you mean", else the names (`defined values: `a`, `b``).
fn values_hint(word: &str, names: &[&str]) -> String {
    reference_hint(word, "values", names.iter().copied())
}

impl<'de> Deserialize<'de> for RotationStrategy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        named(d, "rotation strategy", Self::from_name, |v| {
            values_hint(v, Self::NAMES)
        })
    }
}

/// What a polling pool's health probe does (`health_check:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HealthCheckKind {
    /// `models`: `GET {base_url}/models`; cheap, no tokens spent.
    #[default]
    Models,
    /// `completion`: a chat completion of one token; proves the model answers.
    Completion,
}

impl HealthCheckKind {
    /// Every accepted value, as written in the file.
    pub const NAMES: &'static [&'static str] = &["models", "completion"];

    /// The name as written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthCheckKind::Models => "models",
            HealthCheckKind::Completion => "completion",
        }
    }

    /// The kind written `name` in the file.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "models" => Some(HealthCheckKind::Models),
            "completion" => Some(HealthCheckKind::Completion),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for HealthCheckKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        named(d, "health check", Self::from_name, |v| {
            values_hint(v, Self::NAMES)
        })
    }
}

/// How a polling pool fails over (`fallback_config:` of a pool, or seed 002's
/// top-level `fallback_strategy` and `max_instance_attempts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolFallbackConfig {
    /// The strategy (`strategy`, or seed 002's `fallback_strategy`). Default
    /// [`PoolFallbackStrategy::InstanceRotation`].
    #[serde(alias = "fallback_strategy")]
    pub strategy: PoolFallbackStrategy,
    /// Most attempts on one instance for one request (1 to 1000). Default 2.
    #[serde(deserialize_with = "int::<_, _, 1, MAX_ATTEMPTS>")]
    pub max_instance_attempts: u32,
}

impl PoolFallbackConfig {
    /// Default [`max_instance_attempts`](Self::max_instance_attempts).
    pub const DEFAULT_MAX_INSTANCE_ATTEMPTS: u32 = 2;
}

impl Default for PoolFallbackConfig {
    fn default() -> Self {
        PoolFallbackConfig {
            strategy: PoolFallbackStrategy::default(),
            max_instance_attempts: Self::DEFAULT_MAX_INSTANCE_ATTEMPTS,
        }
    }
}

/// A polling pool's fallback strategy (seed 002).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoolFallbackStrategy {
    /// `instance_rotation`: take the next instance from the pool.
    #[default]
    InstanceRotation,
    /// `simple_retry`: retry on the same instance.
    SimpleRetry,
}

impl PoolFallbackStrategy {
    /// Every accepted value, as written in the file.
    pub const NAMES: &'static [&'static str] = &["instance_rotation", "simple_retry"];

    /// The name as written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolFallbackStrategy::InstanceRotation => "instance_rotation",
            PoolFallbackStrategy::SimpleRetry => "simple_retry",
        }
    }

    /// The strategy written `name` in the file.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "instance_rotation" => Some(PoolFallbackStrategy::InstanceRotation),
            "simple_retry" => Some(PoolFallbackStrategy::SimpleRetry),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for PoolFallbackStrategy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        named(d, "pool fallback strategy", Self::from_name, |v| {
            values_hint(v, Self::NAMES)
        })
    }
}

/// A wrapper: a named route with its own fallback chain (`wrappers.<name>:`, seed 001
/// `TaskGroupWrapper`): `target` first, then each of `fallback_groups` in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrapperConfig {
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// The route tried first: a model id, task group, `group.echelonN`, polling pool or
    /// another wrapper. Required.
    pub target: String,
    /// Routes tried in order after [`target`](Self::target) fails (same forms).
    #[serde(default)]
    pub fallback_groups: Vec<String>,
    /// What a stream that fails after its first content chunk does; `None` keeps the
    /// target's (see [`StreamFailureConfig`]).
    #[serde(default)]
    pub stream_failure: Option<StreamFailureConfig>,
}
