//! The `state:` section: where the live state of the resilience units is kept (issue 15).
//!
//! ```yaml
//! state:
//!   backend: redis                 # memory (default) | redis
//!   url: "redis://127.0.0.1:6379/0"  # redis://, or rediss:// (TLS); `${VAR}` works
//!   key_prefix: "echelon:"         # every key the gateway writes starts with it
//!   timeout_ms: 50                 # longest round trip before Redis counts as down
//!   lease_ttl: 10                  # s: a dead replica's concurrency slots come back after it
//!   on_unavailable: local          # local (limits ÷ replicas) | reject (503)
//!   replicas: 1                    # replicas sharing the limits, for the local fallback
//! ```

use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::de::with_hint;
use super::error::did_you_mean;
use super::value::{int, named, secs};

/// Where the resilience state lives (`state.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StateBackend {
    /// In this process (`memory`, the default): one replica, nothing shared.
    #[default]
    Memory,
    /// In Redis (or Valkey) at [`StateConfig::url`], shared by every replica using it.
    Redis,
}

impl StateBackend {
    /// Every accepted value, as written in the file.
    pub const NAMES: &'static [&'static str] = &["memory", "redis"];

    /// The backend written `name` in the file.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "memory" => Some(StateBackend::Memory),
            "redis" => Some(StateBackend::Redis),
            _ => None,
        }
    }

    /// The name as written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            StateBackend::Memory => "memory",
            StateBackend::Redis => "redis",
        }
    }
}

impl<'de> Deserialize<'de> for StateBackend {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        named(d, "state backend", Self::from_name, |v| {
            supported(v, Self::NAMES)
        })
    }
}

/// What a replica does while Redis is down or slower than `timeout_ms`
/// (`state.on_unavailable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnUnavailable {
    /// Keep serving on in-process state, each limit divided by `replicas` (default).
    #[default]
    Local,
    /// Refuse the attempts that need shared state: the request gets a 503 naming the
    /// state backend.
    Reject,
}

impl OnUnavailable {
    /// Every accepted value, as written in the file.
    pub const NAMES: &'static [&'static str] = &["local", "reject"];

    /// The value written `name` in the file.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "local" => Some(OnUnavailable::Local),
            "reject" => Some(OnUnavailable::Reject),
            _ => None,
        }
    }

    /// The name as written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            OnUnavailable::Local => "local",
            OnUnavailable::Reject => "reject",
        }
    }
}

impl<'de> Deserialize<'de> for OnUnavailable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        named(d, "on_unavailable value", Self::from_name, |v| {
            supported(v, Self::NAMES)
        })
    }
}

/// "did you mean", else the names.
fn supported(word: &str, names: &[&str]) -> String {
    did_you_mean(word, names.iter().copied())
        .unwrap_or_else(|| format!("supported: {}", names.join(", ")))
}

/// The `state:` section (issue 15): the state backend and how it behaves when down.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// `memory` (default) or `redis`.
    pub backend: StateBackend,
    /// The Redis URL (`redis://[user:pass@]host[:port][/db]`, or `rediss://` for TLS,
    /// verified against the system's root certificates), checked at load. Default [`StateConfig::DEFAULT_URL`]. Only used with `backend: redis`.
    #[serde(deserialize_with = "redis_url")]
    pub url: String,
    /// Prefix of every key written (default `echelon:`): replicas sharing limits use the
    /// same prefix, unrelated gateways on one Redis different ones.
    pub key_prefix: String,
    /// Longest round trip to Redis, in milliseconds (1 to 60 000; default 50); slower
    /// counts as unavailable, so a request never hangs on the state backend.
    #[serde(deserialize_with = "int::<_, _, 1, 60000>")]
    pub timeout_ms: u64,
    /// How long a concurrency lease lives without renewal, in seconds (> 0, at most a
    /// day; default 10). A running request renews its leases every third of it, so the
    /// slots of a replica killed with `kill -9` come back within this time.
    #[serde(deserialize_with = "secs::positive")]
    pub lease_ttl: Duration,
    /// `local` (default) or `reject`.
    pub on_unavailable: OnUnavailable,
    /// How many replicas share the limits (1 to 10 000; default 1): while Redis is
    /// down, each replica enforces its limits divided by this (at least 1 each).
    #[serde(deserialize_with = "int::<_, _, 1, 10000>")]
    pub replicas: u32,
}

impl StateConfig {
    /// Default [`url`](Self::url).
    pub const DEFAULT_URL: &'static str = "redis://127.0.0.1:6379/0";
    /// Default [`key_prefix`](Self::key_prefix).
    pub const DEFAULT_KEY_PREFIX: &'static str = "echelon:";
    /// Default [`timeout_ms`](Self::timeout_ms).
    pub const DEFAULT_TIMEOUT_MS: u64 = 50;
    /// Default [`lease_ttl`](Self::lease_ttl) (10 s).
    pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

    /// [`timeout_ms`](Self::timeout_ms) as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            backend: StateBackend::Memory,
            url: Self::DEFAULT_URL.to_owned(),
            key_prefix: Self::DEFAULT_KEY_PREFIX.to_owned(),
            timeout_ms: Self::DEFAULT_TIMEOUT_MS,
            lease_ttl: Self::DEFAULT_LEASE_TTL,
            on_unavailable: OnUnavailable::Local,
            replicas: 1,
        }
    }
}

/// Checks a Redis URL: `redis://`, `rediss://` (TLS, verified against the system's
/// root certificates; `#insecure` at the end skips the verification), `valkey://`,
/// `valkeys://`, `redis+unix://` or `unix://`, parsed by the Redis client itself.
/// The URL schemes of a Redis (or Valkey) server the Redis client connects to.
pub(crate) const REDIS_SCHEMES: [&str; 6] = [
    "redis://",
    "rediss://",
    "valkey://",
    "valkeys://",
    "redis+unix://",
    "unix://",
];

pub(crate) fn check_redis_url(url: &str) -> Result<String, String> {
    let trimmed = url.trim();
    let scheme_ok = REDIS_SCHEMES.iter().any(|s| trimmed.starts_with(s));
    if !scheme_ok {
        return Err(with_hint(
            format!("`{}` is not a Redis URL", scrub(trimmed)),
            "e.g. `redis://127.0.0.1:6379/0`",
        ));
    }
    match redis::Client::open(trimmed) {
        Ok(_) => Ok(trimmed.to_owned()),
        Err(e) => Err(with_hint(
            format!(
                "`{}` is not a valid Redis URL: {}",
                scrub(trimmed),
                e.detail().unwrap_or("unparsable")
            ),
            "e.g. `redis://127.0.0.1:6379/0`; a database number after the slash",
        )),
    }
}

/// `url` without its password, for messages.
fn scrub(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// `state.url` ([`check_redis_url`]).
fn redis_url<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    check_redis_url(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_passwords_never_shown() {
        assert!(check_redis_url("redis://127.0.0.1:6379/0").is_ok());
        assert!(check_redis_url("redis://u:p@h:6380").is_ok());
        // TLS (rustls, issue 15): accepted and parsed, no server needed.
        assert_eq!(
            check_redis_url(" rediss://u:p@cache.example.com:6380/2 ").unwrap(),
            "rediss://u:p@cache.example.com:6380/2"
        );
        assert!(check_redis_url("valkeys://h:6380").is_ok());
        let e = check_redis_url("http://127.0.0.1:6379").unwrap_err();
        assert!(e.contains("not a Redis URL"), "{e}");
        let e = check_redis_url("redis://:secret@h:6379/notadb").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }
}
