//! The ids a [`Judge::run_file`](super::Judge::run_file) has met, and where: in the old
//! output (resume skips them) or on an earlier input line (a duplicate is a bad line).
//!
//! A run must remember every id it has met, which a hash map does at about 150 bytes per
//! id: a million-line batch took 197 MB of RSS against 47 MB for a thousand lines. So the
//! ids start in a hash map, and past [`SPILL_AT`] of them move to a temporary SQLite
//! database with an 8 MiB page cache, where memory stays flat however long the input is
//! (SQLite deletes the file when the run ends). Small batches, the usual RL step, never
//! pay for the database (opening it took about 0.4 ms, timed in a one-off build). If no
//! temporary database can be made (no writable temporary directory), the ids stay in
//! memory and a warning says so.

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
    /// Whether to move to disk past [`SPILL_AT`] ids (off once moved, or once that failed).
    spill: bool,
}

enum Store {
    Disk(Connection),
    Memory(HashMap<String, Seen>),
}

/// Ids kept in memory before they move to the temporary database: about 2.5 MB of map.
const SPILL_AT: usize = 16_384;

/// Page cache of the temporary database (SQLite's `cache_size`, negative = KiB).
const CACHE_KIB: i64 = 8 * 1024;

impl SeenIds {
    /// An empty set: in memory, moving to a temporary database past [`SPILL_AT`] ids.
    pub(super) fn new() -> SeenIds {
        SeenIds {
            store: Store::Memory(HashMap::new()),
            spill: true,
        }
    }

    /// An empty set that stays in memory however many ids it holds (for tests).
    #[cfg(test)]
    fn in_memory() -> SeenIds {
        SeenIds {
            store: Store::Memory(HashMap::new()),
            spill: false,
        }
    }

    /// Records that `key` was met at `at`, unless it was met before: then returns where it
    /// was met first and records nothing.
    ///
    /// # Errors
    /// The temporary database failed (a full disk, say).
    pub(super) fn insert(&mut self, key: &str, at: Seen) -> Result<Option<Seen>, JudgeError> {
        match &mut self.store {
            Store::Memory(map) => {
                let first = match map.entry(key.to_owned()) {
                    Entry::Occupied(e) => Some(*e.get()),
                    Entry::Vacant(e) => {
                        e.insert(at);
                        None
                    }
                };
                if self.spill && map.len() >= SPILL_AT {
                    self.move_to_disk();
                }
                Ok(first)
            }
            Store::Disk(conn) => insert_disk(conn, key, at).map_err(JudgeError::SeenIds),
        }
    }

    /// Moves the ids in memory to a new temporary database; on failure keeps them in
    /// memory for the rest of the run, with a warning.
    fn move_to_disk(&mut self) {
        self.spill = false;
        let Store::Memory(map) = &mut self.store else {
            return;
        };
        let moved = open_disk().and_then(|conn| {
            for (key, at) in map.iter() {
                insert_disk(&conn, key, *at)?;
            }
            Ok(conn)
        });
        match moved {
            Ok(conn) => self.store = Store::Disk(conn),
            Err(error) => tracing::warn!(
                %error,
                "judge: no temporary database for the run's ids; keeping them in memory"
            ),
        }
    }

    /// Whether the ids are in the temporary database.
    #[cfg(test)]
    fn on_disk(&self) -> bool {
        matches!(self.store, Store::Disk(_))
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
    fn in_memory_and_on_disk_agree() {
        check(SeenIds::in_memory());
        let mut disk = SeenIds::new();
        disk.move_to_disk();
        assert!(disk.on_disk(), "a temporary database");
        check(disk);
    }

    #[test]
    fn past_the_threshold_ids_move_to_disk_and_stay_exact() {
        let mut ids = SeenIds::new();
        let n = SPILL_AT as u64 * 3;
        for i in 0..n {
            assert!(!ids.on_disk() || i >= SPILL_AT as u64);
            assert_eq!(
                ids.insert(&format!("id-{i}"), Seen::Line(i + 1)).unwrap(),
                None
            );
        }
        assert!(ids.on_disk());
        // Ids from before and after the move are both found, with their first line.
        for i in (0..n).step_by(997) {
            assert_eq!(
                ids.insert(&format!("id-{i}"), Seen::Line(0)).unwrap(),
                Some(Seen::Line(i + 1))
            );
        }
    }
}
