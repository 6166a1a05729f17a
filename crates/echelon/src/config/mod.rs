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
//!     echelon1: { models: [smollm-a] }
//!     fallback_config: { strategy: echelon_down, max_attempts: 3 }
//! ```
//!
//! - Every section is optional, but a configuration needs at least one model.
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
//!
//!   Seed polling pool files (`rotation_strategy`, `task_groups: [..]`) are rejected
//!   with an error for now.
//! - Every error carries file, line, column and key path ([`ConfigError`]); a load
//!   reports all the errors it finds ([`ConfigErrors`]).

mod env;
mod error;
mod load;
mod model;
mod node;
mod read;
mod sections;
mod seed_provider;

use std::path::Path;

pub use error::{ConfigError, ConfigErrors};
pub use model::{
    CircuitBreakerConfig, Config, EchelonConfig, FallbackConfig, FallbackStrategy, ModelConfig,
    ProviderApi, ProviderConfig, ServerConfig, TaskGroupConfig,
};

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
    /// assert_eq!(config.models["smollm"].timeout, 30.0);
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
