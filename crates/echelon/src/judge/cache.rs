//! The judgement cache: one SQLite table from a SHA-256 key to a scored judgement.
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
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::item::JudgeItem;
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

    /// The hex key of one item.
    pub(crate) fn key(&self, item: &JudgeItem) -> String {
        let mut h = self.0.clone();
        let doc = KeyItem {
            prompt: &item.prompt,
            response: &item.response,
            reference: item.reference.as_deref().unwrap_or(""),
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

/// The open cache, shared by every in-flight item.
#[derive(Debug, Clone)]
pub(crate) struct Cache {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl Cache {
    /// Opens (creating if needed) the cache file.
    pub(crate) fn open(path: &Path) -> Result<Cache, rusqlite::Error> {
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
        Ok(Cache {
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
        }
    }

    #[test]
    fn keys_depend_on_params_and_item() {
        let a = KeyBase::new(&params("judge"));
        let b = KeyBase::new(&params("other"));
        let item = JudgeItem::new("1", "p", "r");
        let k = a.key(&item);
        assert_eq!(k.len(), 64);
        assert!(k.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(k, a.key(&JudgeItem::new("different id", "p", "r")));
        assert_ne!(k, b.key(&item));
        assert_ne!(k, a.key(&JudgeItem::new("1", "p", "r2")));
        assert_ne!(k, a.key(&item.clone().with_reference("x")));
        // Field boundaries cannot shift.
        assert_ne!(
            a.key(&JudgeItem::new("1", "ab", "c")),
            a.key(&JudgeItem::new("1", "a", "bc"))
        );
    }

    #[test]
    fn entries_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("c.sqlite")).unwrap();
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
        };
        assert_eq!(cache.get_blocking("k").unwrap(), None);
        cache.put_blocking("k", &v).unwrap();
        assert_eq!(cache.get_blocking("k").unwrap(), Some(v));
    }
}
