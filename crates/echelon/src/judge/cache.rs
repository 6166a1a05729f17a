//! The judgement cache: one SQLite table from a SHA-256 key to a scored judgement, or
//! (issue 15) one Redis string per key, `<key prefix>judge:<key>`, holding the same JSON,
//! shared by every judge process on that Redis.
//!
//! The key is the hex SHA-256 of a JSON document holding the route, every judge
//! parameter that can change a score (rubric, reminder, patterns, score range,
//! `max_reasks`, `temperature`, `max_tokens`) and the item's prompt, response and
//! reference. The reward parameters are not part of it: a cached score is re-rewarded
//! with the current `reward_coefficient` and `target_tokens`.
//!
//! Only scored judgements are stored (never errors or unparsed answers), so a re-run
//! retries exactly what failed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::item::JudgeItem;
use super::options::Preference;
use super::output::JudgeTokens;

/// How long a writer waits for another process holding the database.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the cache keeps of a scored judgement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct CachedJudgement {
    pub(crate) score: f64,
    pub(crate) raw: String,
    pub(crate) model: Option<String>,
    /// What the original calls cost (kept for inspection; a hit reports zero).
    pub(crate) tokens: JudgeTokens,
    pub(crate) cost: f64,
    pub(crate) attempts: u32,
    pub(crate) reasks: u32,
    /// Length re-asks of the original calls.
    #[serde(default)]
    pub(crate) length_reasks: u32,
    /// A pairwise verdict (then `score` is 0 and unused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) preference: Option<Preference>,
}

/// The cache-key parameters of a judge, hashed once.
#[derive(Serialize)]
pub(crate) struct KeyParams<'a> {
    pub(crate) route: &'a str,
    pub(crate) rubric: &'a str,
    pub(crate) reminder: &'a str,
    pub(crate) patterns: &'a [String],
    pub(crate) min_score: f64,
    pub(crate) max_score: f64,
    pub(crate) max_reasks: u32,
    pub(crate) temperature: Option<f64>,
    pub(crate) max_tokens: Option<u32>,
    // The settings below are left out of the document at their defaults, so a judge
    // that uses none of them keeps the keys of earlier versions.
    /// The verdict mode in use (`json_schema` or `regex`).
    #[serde(skip_serializing_if = "is_regex")]
    pub(crate) verdict: &'a str,
    #[serde(skip_serializing_if = "is_false")]
    pub(crate) reasoning_field: bool,
    /// `pointwise` or `pairwise`.
    #[serde(skip_serializing_if = "is_pointwise")]
    pub(crate) mode: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reasoning_effort: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) max_tokens_cap: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) extra_body: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

fn is_regex(v: &&str) -> bool {
    *v == "regex"
}

fn is_pointwise(v: &&str) -> bool {
    *v == "pointwise"
}

fn is_false(v: &bool) -> bool {
    !*v
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// A SHA-256 state that already holds a judge's parameters.
#[derive(Clone)]
pub(crate) struct KeyBase(Sha256);

impl std::fmt::Debug for KeyBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyBase")
    }
}

#[derive(Serialize)]
struct KeyItem<'a> {
    prompt: &'a str,
    response: &'a str,
    reference: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_a: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_b: Option<&'a str>,
    /// The sample's index among the item's judge calls (0 for the only one).
    #[serde(skip_serializing_if = "is_zero")]
    sample: u32,
    /// Pairwise: the responses were shown in the swapped order.
    #[serde(skip_serializing_if = "is_false")]
    swapped: bool,
}

impl KeyBase {
    pub(crate) fn new(params: &KeyParams<'_>) -> KeyBase {
        let mut h = Sha256::new();
        h.update(b"echelon-judge-v1\n");
        // JSON escapes every string, so the fields cannot run into each other.
        h.update(serde_json::to_vec(params).unwrap_or_default());
        h.update(b"\n");
        KeyBase(h)
    }

    /// The hex key of one sample of an item: `sample` is its index (0 for the only
    /// one), `swapped` whether a pair is shown as B then A.
    pub(crate) fn key(&self, item: &JudgeItem, sample: u32, swapped: bool) -> String {
        let mut h = self.0.clone();
        let doc = KeyItem {
            prompt: &item.prompt,
            response: &item.response,
            reference: item.reference.as_deref().unwrap_or(""),
            response_a: item.pair.as_ref().map(|p| p.a.as_str()),
            response_b: item.pair.as_ref().map(|p| p.b.as_str()),
            sample,
            swapped,
        };
        h.update(serde_json::to_vec(&doc).unwrap_or_default());
        let digest = h.finalize();
        let mut hex = String::with_capacity(64);
        for b in digest {
            hex.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
            hex.push(char::from_digit(u32::from(b & 15), 16).unwrap_or('0'));
        }
        hex
    }
}

/// The open cache, shared by every in-flight item: a SQLite file or a Redis.
#[derive(Debug, Clone)]
pub(crate) enum Cache {
    /// A SQLite file ([`JudgeConfig::cache_path`](super::JudgeConfig::cache_path)).
    File(FileCache),
    /// A Redis ([`JudgeConfig::cache_url`](super::JudgeConfig::cache_url)).
    Redis(RedisCache),
}

impl Cache {
    /// The entry of `key`; a failed read is logged and counts as a miss.
    pub(crate) async fn get(&self, key: String) -> Option<CachedJudgement> {
        match self {
            Cache::File(c) => c.get(key).await,
            Cache::Redis(c) => c.get(&key).await,
        }
    }

    /// Stores an entry; a failed write is logged and otherwise ignored.
    pub(crate) async fn put(&self, key: String, value: CachedJudgement) {
        match self {
            Cache::File(c) => c.put(key, value).await,
            Cache::Redis(c) => c.put(&key, &value).await,
        }
    }
}

/// The SQLite cache file.
#[derive(Debug, Clone)]
pub(crate) struct FileCache {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl FileCache {
    /// Opens (creating if needed) the cache file.
    pub(crate) fn open(path: &Path) -> Result<FileCache, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS judgements (
                 key        TEXT PRIMARY KEY,
                 value      TEXT NOT NULL,
                 created_at INTEGER NOT NULL DEFAULT (unixepoch())
             )",
        )?;
        Ok(FileCache {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_owned(),
        })
    }

    fn get_blocking(&self, key: &str) -> Result<Option<CachedJudgement>, String> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let text: Option<String> = conn
            .query_row(
                "SELECT value FROM judgements WHERE key = ?1",
                params![key],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| e.to_string())?;
        match text {
            None => Ok(None),
            Some(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(|e| format!("unreadable entry {key}: {e}")),
        }
    }

    fn put_blocking(&self, key: &str, value: &CachedJudgement) -> Result<(), String> {
        let text = serde_json::to_string(value).map_err(|e| e.to_string())?;
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        conn.execute(
            "INSERT OR REPLACE INTO judgements (key, value) VALUES (?1, ?2)",
            params![key, text],
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    /// The entry of `key`; a read failure is logged and counts as a miss.
    pub(crate) async fn get(&self, key: String) -> Option<CachedJudgement> {
        let this = self.clone();
        let result = tokio::task::spawn_blocking(move || this.get_blocking(&key))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        result.unwrap_or_else(|error| {
            tracing::warn!(path = %self.path.display(), %error, "judge cache: read failed");
            None
        })
    }

    /// Stores an entry; a write failure is logged and otherwise ignored.
    pub(crate) async fn put(&self, key: String, value: CachedJudgement) {
        let this = self.clone();
        let result = tokio::task::spawn_blocking(move || this.put_blocking(&key, &value))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(error) = result {
            tracing::warn!(path = %self.path.display(), %error, "judge cache: write failed");
        }
    }
}

/// How long one Redis operation of the judge cache may take (connecting included).
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the judge cache leaves a Redis that failed alone before it tries again.
const REDIS_RETRY_AFTER: Duration = Duration::from_secs(5);

/// The judge cache on Redis: `GET` and `SET [EX ttl]` of `<prefix>judge:<key>`, the
/// value the JSON of [`CachedJudgement`] (as in the SQLite file).
///
/// Never fails an item: an error or a timeout ([`REDIS_TIMEOUT`]) is a miss (or a lost
/// write), logged once per outage; for [`REDIS_RETRY_AFTER`] after it the items skip
/// Redis (judged uncached), then the next one tries again and the first answer ends the
/// outage.
#[derive(Debug, Clone)]
pub(crate) struct RedisCache(Arc<RedisInner>);

struct RedisInner {
    client: redis::Client,
    /// Made on first use, inside the runtime that runs the judge; dropped after a
    /// failure so the next try connects afresh (from the runtime it runs in then).
    conn: Mutex<Option<ConnectionManager>>,
    /// `<key prefix>judge:`.
    prefix: String,
    ttl: Option<Duration>,
    /// Whether the last operation failed (an outage is logged once).
    down: AtomicBool,
    /// During an outage: when the next operation may try Redis again.
    retry_at: Mutex<Option<Instant>>,
    /// The URL without its password, for the logs.
    shown: String,
}

impl std::fmt::Debug for RedisInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCache")
            .field("url", &self.shown)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisCache {
    /// A cache on the Redis at `url` (checked by the caller), its keys under `prefix`
    /// (`<prefix>judge:<key>`), entries expiring after `ttl` (`None`: never). Nothing is
    /// connected until the first item.
    pub(crate) fn new(
        url: &str,
        prefix: &str,
        ttl: Option<Duration>,
    ) -> Result<RedisCache, redis::RedisError> {
        let client = redis::Client::open(url)?;
        Ok(RedisCache(Arc::new(RedisInner {
            client,
            conn: Mutex::new(None),
            prefix: format!("{prefix}judge:"),
            ttl,
            down: AtomicBool::new(false),
            retry_at: Mutex::new(None),
            shown: scrub(url),
        })))
    }

    /// The Redis key of a cache key.
    pub(crate) fn redis_key(&self, key: &str) -> String {
        format!("{}{key}", self.0.prefix)
    }

    fn connection(&self) -> Result<ConnectionManager, redis::RedisError> {
        let mut held = self.0.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = held.as_ref() {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(0);
        let made = ConnectionManager::new_lazy_with_config(self.0.client.clone(), config)?;
        *held = Some(made.clone());
        Ok(made)
    }

    /// Whether an operation may try Redis now (not within an outage's pause).
    fn may_try(&self) -> bool {
        let retry_at = self
            .0
            .retry_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        retry_at.is_none_or(|at| Instant::now() >= at)
    }

    /// Runs `cmd` within [`REDIS_TIMEOUT`]; `None` after a failure (logged once per
    /// outage) or while Redis is left alone.
    async fn query<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Option<T> {
        if !self.may_try() {
            return None;
        }
        let result = match self.connection() {
            Ok(mut conn) => {
                match tokio::time::timeout(REDIS_TIMEOUT, cmd.query_async::<T>(&mut conn)).await {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {} ms", REDIS_TIMEOUT.as_millis())),
                }
            }
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(v) => {
                if self.0.down.swap(false, Ordering::Relaxed) {
                    tracing::info!(url = %self.0.shown, "judge cache: redis is back");
                }
                *self
                    .0
                    .retry_at
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
                Some(v)
            }
            Err(error) => {
                *self.0.conn.lock().unwrap_or_else(PoisonError::into_inner) = None;
                *self
                    .0
                    .retry_at
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) =
                    Some(Instant::now() + REDIS_RETRY_AFTER);
                if !self.0.down.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        url = %self.0.shown,
                        %error,
                        "judge cache: redis unavailable; judging uncached until it answers"
                    );
                }
                None
            }
        }
    }

    /// The entry of `key`; a miss when Redis fails or the entry is unreadable.
    pub(crate) async fn get(&self, key: &str) -> Option<CachedJudgement> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.redis_key(key));
        let text: Option<String> = self.query(cmd).await?;
        let text = text?;
        serde_json::from_str(&text)
            .inspect_err(|error| {
                tracing::warn!(key, %error, "judge cache: unreadable redis entry");
            })
            .ok()
    }

    /// Stores `value` under `key` (with the TTL); a failure is logged once per outage.
    pub(crate) async fn put(&self, key: &str, value: &CachedJudgement) {
        let Ok(text) = serde_json::to_string(value) else {
            return;
        };
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.redis_key(key)).arg(text);
        if let Some(ttl) = self.0.ttl {
            cmd.arg("PX")
                .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1));
        }
        let _: Option<redis::Value> = self.query(cmd).await;
    }
}

/// `url` without its password, for logs.
fn scrub(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn params(route: &str) -> KeyParams<'_> {
        KeyParams {
            route,
            rubric: "{response}",
            reminder: "again",
            patterns: &[],
            min_score: 1.0,
            max_score: 10.0,
            max_reasks: 2,
            temperature: Some(0.0),
            max_tokens: None,
            verdict: "regex",
            reasoning_field: false,
            mode: "pointwise",
            seed: None,
            reasoning_effort: None,
            max_tokens_cap: None,
            extra_body: None,
        }
    }

    #[test]
    fn keys_depend_on_params_and_item() {
        let a = KeyBase::new(&params("judge"));
        let b = KeyBase::new(&params("other"));
        let item = JudgeItem::new("1", "p", "r");
        let k = a.key(&item, 0, false);
        assert_eq!(k.len(), 64);
        assert!(k.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(
            k,
            a.key(&JudgeItem::new("different id", "p", "r"), 0, false)
        );
        assert_ne!(k, b.key(&item, 0, false));
        assert_ne!(k, a.key(&JudgeItem::new("1", "p", "r2"), 0, false));
        assert_ne!(k, a.key(&item.clone().with_reference("x"), 0, false));
        // Each sample, each order and each mode has its own entry; sample 0 keeps the
        // key of a one-sample judge.
        assert_ne!(k, a.key(&item, 1, false));
        assert_ne!(a.key(&item, 1, false), a.key(&item, 2, false));
        assert_ne!(k, a.key(&item, 0, true));
        let mut pairwise = params("judge");
        pairwise.mode = "pairwise";
        assert_ne!(k, KeyBase::new(&pairwise).key(&item, 0, false));
        let mut json = params("judge");
        json.verdict = "json_schema";
        assert_ne!(k, KeyBase::new(&json).key(&item, 0, false));
        let pair = JudgeItem::pair("1", "p", "x", "y");
        assert_ne!(
            a.key(&pair, 0, false),
            a.key(&JudgeItem::pair("1", "p", "y", "x"), 0, false)
        );
        // Field boundaries cannot shift.
        assert_ne!(
            a.key(&JudgeItem::new("1", "ab", "c"), 0, false),
            a.key(&JudgeItem::new("1", "a", "bc"), 0, false)
        );
    }

    #[test]
    fn entries_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FileCache::open(&dir.path().join("c.sqlite")).unwrap();
        let v = CachedJudgement {
            score: 7.0,
            raw: "Score: 7".into(),
            model: Some("m".into()),
            tokens: JudgeTokens {
                prompt: 3,
                completion: 2,
            },
            cost: 0.25,
            attempts: 1,
            reasks: 0,
            length_reasks: 0,
            preference: None,
        };
        assert_eq!(cache.get_blocking("k").unwrap(), None);
        cache.put_blocking("k", &v).unwrap();
        assert_eq!(cache.get_blocking("k").unwrap(), Some(v));
    }
}
