//! The configuration: one YAML or JSON file, or a directory of them, validated at
//! load (DESIGN.md §5).
//!
//! ```yaml
//! server: { host: 127.0.0.1, port: 4000, api_keys: ["${ECHELON_KEY:-}"] }
//! providers:
//!   local_a: { base_url: "http://127.0.0.1:8082/v1", api_keys: ["${LOCAL_A_KEY}"] }
//! models:
//!   smollm-a: { provider: local_a, model: smollm2, timeout: 30, context_window: 2048 }
//! task_groups:
//!   demo_group:
//!     echelon1: { models: [smollm-a] }  # tried in number order, or by `priority:` (lower first)
//!     fallback_config: { strategy: echelon_down, max_attempts: 3 }
//! polling_pools:
//!   demo_pool:
//!     task_groups: [demo_group]       # exactly one (or `task_group: demo_group`)
//!     rotation_strategy: round_robin  # | least_busy | weighted (+ `weights: {model: n}`)
//!     health_check_interval: 30       # s; `health_check: models` (GET /models) | completion
//!     failure_threshold: 3
//!     recovery_time: 60
//!     fallback_config: { strategy: instance_rotation, max_instance_attempts: 2 }
//! wrappers:
//!   demo_wrapper: { target: demo_group.echelon1, fallback_groups: [demo_pool] }
//! default_route: demo_group
//! usage:
//!   ledger: ledger.db                 # relative to this file; `false` = no ledger
//!   queue_capacity: 10000             # records queued before senders wait
//!   batch_size: 256                   # records per transaction
//!   flush_interval_ms: 200
//! ```
//!
//! `telemetry:` exports traces over OTLP/HTTP ([`TelemetryConfig`]; off by default).
//!
//! A model may also set `pricing: { input_per_1m: 0.15, output_per_1m: 0.60,
//! cached_input_per_1m: 0.075 }` (USD per 1M tokens) and `encoding: o200k_base`
//! (or `cl100k_base`), and `malformed_event: fail` (default `skip`: a stream's SSE
//! event that is not a chunk is skipped and counted, see [`MalformedEvent`]);
//! `server:` takes `log_bodies: true`, and the access and connection settings of
//! [`ServerConfig`] (`allowed_hosts`, `cors_origins`,
//! `metrics_auth`, `header_read_timeout`, `max_connections`, `shutdown_timeout`).
//! Without `usage.ledger` the ledger is at [`UsageConfig::default_ledger_path`].
//!
//! - Every section is optional, but a configuration needs at least one model.
//! - Every duration is a number of **seconds** (`timeout: 30`, `queue_timeout: 0.25`),
//!   read into a [`Duration`](std::time::Duration): negative, not finite, or longer
//!   than a day is an error (only `usage.flush_interval_ms` says another unit in its
//!   name). `queue_timeout` was in milliseconds before: a value above 10 s loads with a
//!   warning ([`Config::warnings`]). Counts and limits have upper bounds too (e.g.
//!   `max_retries` ≤ 100), so no value can overflow the arithmetic done on it.
//! - The echelons of a task group are tried by ascending `priority` (lower first),
//!   echelons without one after those with one, ties in number order
//!   ([`TaskGroupConfig::echelons`]).
//! - A *route* is what a request names: a model id, a task group, `group.echelonN`, a
//!   polling pool or a wrapper. Model ids, task groups, pools and wrappers share one
//!   namespace (a name defined as two of them is an error naming both places); only
//!   model ids may contain `.`. Fallback groups, wrapper targets and `default_route`
//!   must name routes, and no wrapper may reach itself.
//! - A polling pool serves exactly one task group (seed 002, task isolation); its
//!   `weights` keys must be models of that group.
//! - An unknown key anywhere is an error, with a hint naming the closest valid key.
//! - `${VAR}`, `$VAR` and `${VAR:-default}` in values are replaced from the
//!   environment (`$$` is a literal `$`); a missing variable is an error. A number
//!   field accepts a value that came from such a substitution (`port: ${PORT}`).
//! - API keys: see [`ProviderConfig`] for the resolution order.
//! - A directory is read recursively (`*.yaml`, `*.yml`, `*.json`, sorted by path,
//!   names starting with `.` skipped) and its files merged; an id defined twice is an
//!   error naming both files.
//! - The seeds' formats load as they are:
//!   - a task group file: top-level `name` and `echelon<N>` keys (plus `description`,
//!     `fallback_config`); the group is named by `name`, or by the file stem without one;
//!   - `provider.json` (seed 004), recognised when no top-level key is a section and
//!     every value is a map of maps: provider → model → `api_keys`, `base_url`, `model`,
//!     `max_retries`, `retry_delay`, `rate_limit_capacity`, `rate_limit_refill_rate`
//!     (or any other model key but `provider`). Each model becomes the model id
//!     `provider/model` (e.g. `openai/gpt-4`); the provider's `base_url` is its first
//!     model's (a model with another one keeps it as an override); the keys go to the
//!     provider when all its models list the same ones, else to each model.
//!   - a polling pool file: top-level `name` plus `task_groups: [one_group]` (or
//!     `task_group`), `rotation_strategy`, …, named by `name` or the file stem. Seed
//!     002's `fallback_strategy` and `max_instance_attempts` at the pool's top level are
//!     accepted instead of `fallback_config` (not both).
//!
//!   A seed global fallback file (`global_fallback.yaml`, or top-level `strategy` /
//!   `fallback_groups`) is an error whose hint says to run `echelon config migrate`;
//!   see [`migrate`](mod@migrate).
//! - Every error carries file, line, column and key path ([`ConfigError`]); a load
//!   reports all the errors it finds ([`ConfigErrors`]), every bad field of an entry
//!   included.
//!
//! Each section is a `#[derive(serde::Deserialize)]` struct with
//! `deny_unknown_fields`, read from the parsed tree (which remembers positions) by the
//! deserializer of `de.rs`; the field helpers (seconds, bounds, keys) are in
//! `value.rs`.

mod check;
mod de;
pub mod diff;
mod env;
mod error;
mod load;
pub mod migrate;
mod model;
mod node;
mod pool;
mod read;
mod sections;
mod seed_provider;
mod state;
mod telemetry;
mod value;

use std::path::Path;

pub use diff::ConfigDiff;
pub use error::{ConfigError, ConfigErrors};
pub use migrate::{MigrateError, MigrateOptions, MigrationReport, migrate, migrate_with_env};
pub use model::{
    CircuitBreakerConfig, Config, EchelonConfig, ExtraHeaders, FallbackConfig, FallbackStrategy,
    HealthCheckKind, KeySource, MalformedEvent, ModelConfig, PollingPoolConfig, PoolFallbackConfig,
    PoolFallbackStrategy, PricingConfig, ProviderApi, ProviderConfig, RetryOn, RotationStrategy,
    ServerConfig, StreamFailureConfig, StreamFailureMode, TaskGroupConfig, TokenEncoding,
    UsageConfig, WrapperConfig,
};
pub use state::{OnUnavailable, StateBackend, StateConfig};
pub(crate) use state::{REDIS_SCHEMES, check_redis_url};
pub use telemetry::TelemetryConfig;

impl Config {
    /// Loads a YAML or JSON file (JSON when the name ends in `.json`), or a directory
    /// of them (recursively, `*.yaml|*.yml|*.json`, sorted by path), merged.
    /// Variables are taken from the process environment.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigErrors> {
        load::load_path(path.as_ref(), &env::process_env)
    }

    /// [`Config::load`] with variables taken from `env` (`None` = unset) instead of the
    /// process environment: for tests and embedding.
    pub fn load_with_env(
        path: impl AsRef<Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        load::load_path(path.as_ref(), env)
    }

    /// Parses an in-memory configuration; `origin` names it in errors and picks the
    /// format (a name ending in `.json` → JSON, else YAML). Variables are taken from
    /// the process environment.
    pub fn from_str(text: &str, origin: &str) -> Result<Config, ConfigErrors> {
        load::load_text(text, origin, &env::process_env)
    }

    /// The ids ([`key_id`](crate::key::key_id)) of provider `id`'s keys, in order
    /// (empty for an unknown provider or one without keys): with
    /// [`key_sources`](Config::key_sources), what the startup log says of each
    /// provider's keys, never the keys.
    pub fn provider_key_ids(&self, id: &str) -> Vec<String> {
        use secrecy::ExposeSecret;
        self.providers.get(id).map_or_else(Vec::new, |p| {
            p.api_keys
                .iter()
                .map(|k| crate::key::key_id(k.expose_secret()))
                .collect()
        })
    }

    /// [`Config::from_str`] with variables taken from `env` (`None` = unset) instead
    /// of the process environment: for tests and embedding.
    ///
    /// ```
    /// use echelon::config::Config;
    ///
    /// let yaml = "
    /// providers: { local: { base_url: \"http://127.0.0.1:8082/v1\", api_keys: [\"$KEY\"] } }
    /// models: { smollm: { provider: local, timeout: 30 } }
    /// ";
    /// let env = |name: &str| (name == "KEY").then(|| "sk-test".to_owned());
    /// let config = Config::from_str_with_env(yaml, "inline.yaml", &env)?;
    /// assert_eq!(config.models["smollm"].timeout, std::time::Duration::from_secs(30));
    /// assert_eq!(config.providers["local"].api_keys.len(), 1);
    /// # Ok::<(), echelon::config::ConfigErrors>(())
    /// ```
    pub fn from_str_with_env(
        text: &str,
        origin: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        load::load_text(text, origin, env)
    }
}
