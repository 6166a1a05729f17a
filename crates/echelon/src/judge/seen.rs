//! The ids a [`Judge::run_file`](super::Judge::run_file) has met, and where: in the old
//! output (resume skips them) or on an earlier input line (a duplicate is a bad line).
//!
//! A run must remember every id it has met, which a hash map in memory does at about
//! 150 bytes per id: a million-line batch took 197 MB of RSS against 47 MB for a
//! thousand lines. The ids live instead in a temporary SQLite database with an 8 MiB
//! page cache, so memory stays flat however long the input is; SQLite deletes the file
//! when the run ends. If no temporary database can be made (no writable temporary
//! directory), the run falls back to memory and says so in a warning.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use rusqlite::{Connection, OptionalExtension, params};

use super::JudgeError;

/// Where an id was met first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seen {
    /// In the output file when the run started.
    Output,
    /// On this 1-based input line.
    Line(u64),
}

impl Seen {
    /// As stored: 0 for the output, else the line number.
    fn to_column(self) -> i64 {
        match self {
            Seen::Output => 0,
            Seen::Line(n) => i64::try_from(n).unwrap_or(i64::MAX),
        }
    }

    fn from_column(n: i64) -> Seen {
        match u64::try_from(n) {
            Ok(0) | Err(_) => Seen::Output,
            Ok(n) => Seen::Line(n),
        }
    }
}

/// The ids met so far; see the module docs.
pub(super) struct SeenIds {
    store: Store,
}

enum Store {
    Disk(Connection),
    Memory(HashMap<String, Seen>),
}

/// Page cache of the temporary database (SQLite's `cache_size`, negative = KiB).
const CACHE_KIB: i64 = 8 * 1024;

impl SeenIds {
    /// An empty set, on disk if SQLite can make a temporary database.
    pub(super) fn new() -> SeenIds {
        match open_disk() {
            Ok(conn) => SeenIds {
                store: Store::Disk(conn),
            },
            Err(error) => {
                tracing::warn!(
                    %error,
                    "judge: no temporary database for the run's ids; keeping them in memory"
                );
                SeenIds::in_memory()
            }
        }
    }

    /// An empty set in memory (for tests, and when no temporary database can be made).
    pub(super) fn in_memory() -> SeenIds {
        SeenIds {
            store: Store::Memory(HashMap::new()),
        }
    }

    /// Records that `key` was met at `at`, unless it was met before: then returns where it
    /// was met first and records nothing.
    ///
    /// # Errors
    /// The temporary database failed (a full disk, say).
    pub(super) fn insert(&mut self, key: &str, at: Seen) -> Result<Option<Seen>, JudgeError> {
        match &mut self.store {
            Store::Memory(map) => Ok(match map.entry(key.to_owned()) {
                Entry::Occupied(e) => Some(*e.get()),
                Entry::Vacant(e) => {
                    e.insert(at);
                    None
                }
            }),
            Store::Disk(conn) => insert_disk(conn, key, at).map_err(JudgeError::SeenIds),
        }
    }
}

fn open_disk() -> rusqlite::Result<Connection> {
    // An empty file name is SQLite's private temporary database: on disk once it
    // outgrows the page cache, deleted when the connection closes.
    let conn = Connection::open("")?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
    // Nothing here needs to survive a crash: no journal, no syncs, one transaction that
    // is never committed (SQLite writes pages out when the cache is full).
    conn.pragma_update(None, "journal_mode", "OFF")?;
    conn.pragma_update(None, "synchronous", "OFF")?;
    conn.execute_batch(
        "CREATE TABLE seen (id TEXT PRIMARY KEY, at INTEGER NOT NULL) WITHOUT ROWID;
         BEGIN;",
    )?;
    Ok(conn)
}

fn insert_disk(conn: &Connection, key: &str, at: Seen) -> rusqlite::Result<Option<Seen>> {
    let added = conn
        .prepare_cached("INSERT INTO seen (id, at) VALUES (?1, ?2) ON CONFLICT (id) DO NOTHING")?
        .execute(params![key, at.to_column()])?;
    if added == 1 {
        return Ok(None);
    }
    let first: Option<i64> = conn
        .prepare_cached("SELECT at FROM seen WHERE id = ?1")?
        .query_row(params![key], |row| row.get(0))
        .optional()?;
    Ok(Some(first.map_or(at, Seen::from_column)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn check(mut ids: SeenIds) {
        assert_eq!(ids.insert("a", Seen::Output).unwrap(), None);
        assert_eq!(ids.insert("b", Seen::Line(3)).unwrap(), None);
        assert_eq!(
            ids.insert("b", Seen::Line(9)).unwrap(),
            Some(Seen::Line(3)),
            "a duplicate names the line it was first on"
        );
        assert_eq!(ids.insert("a", Seen::Line(10)).unwrap(), Some(Seen::Output));
        assert_eq!(ids.insert("", Seen::Line(11)).unwrap(), None);
        assert_eq!(ids.insert("é 1", Seen::Line(12)).unwrap(), None);
        assert_eq!(
            ids.insert("é 1", Seen::Line(13)).unwrap(),
            Some(Seen::Line(12))
        );
    }

    #[test]
    fn on_disk_and_in_memory_agree() {
        let disk = SeenIds::new();
        assert!(matches!(disk.store, Store::Disk(_)), "a temporary database");
        check(disk);
        check(SeenIds::in_memory());
    }

    #[test]
    fn many_ids_on_disk_stay_exact() {
        let mut ids = SeenIds::new();
        for i in 0..50_000u64 {
            assert_eq!(
                ids.insert(&format!("id-{i}"), Seen::Line(i + 1)).unwrap(),
                None
            );
        }
        for i in (0..50_000u64).step_by(997) {
            assert_eq!(
                ids.insert(&format!("id-{i}"), Seen::Line(0)).unwrap(),
                Some(Seen::Line(i + 1))
            );
        }
    }
}
