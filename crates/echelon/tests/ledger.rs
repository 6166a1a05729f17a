//! Integration tests of the usage ledger (`echelon::usage`): the writer thread, the
//! schema and its migrations, the reports and their rendering, time bounds, pricing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use echelon_types::{ErrorKind, Outcome};

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use echelon::usage::ledger::{Ledger, LedgerError, SCHEMA_VERSION};
use echelon::usage::pricing::{Price, builtin_price, price_for};
use echelon::usage::record::{AttemptRecord, RequestRecord};
use echelon::usage::report::{
    GroupBy, ReportFormat, UsageFilter, UsageReport, UsageRow, parse_time_bound, render, report,
    report_many, summary, usage_summary,
};

/// 2025-01-30T00:00:00Z, Unix ms.
const BASE_MS: u64 = 1_738_195_200_000;
const DAY_MS: u64 = 86_400_000;
const HOUR_MS: u64 = 3_600_000;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

/// Request `i`: varied routes, models, keys, providers, days, failures and fallbacks.
fn record(i: u64) -> RequestRecord {
    let route = ["fast_group", "slow_group", "m-a"][(i % 3) as usize];
    let failed = i % 7 == 3;
    let n_attempts = 1 + i % 3;
    let mut attempts = Vec::new();
    for seq in 0..n_attempts {
        let last = seq == n_attempts - 1;
        let ok = last && !failed;
        let model = if seq % 2 == 0 { "m-a" } else { "m-b" };
        let provider = if seq % 2 == 0 { "p1" } else { "p2" };
        let prompt = if ok { 100 + i } else { 0 };
        let completion = if ok { 10 + 2 * i } else { 0 };
        attempts.push(AttemptRecord {
            model: model.to_owned(),
            provider: provider.to_owned(),
            key_id: if seq == 2 {
                None
            } else {
                Some(format!("k{}", (i + seq) % 2))
            },
            status: if ok {
                Some(200)
            } else if seq == 2 {
                None
            } else {
                Some(503)
            },
            outcome: if ok {
                Outcome::Ok
            } else if seq == 2 {
                Outcome::Failed(ErrorKind::Timeout)
            } else {
                Outcome::Failed(ErrorKind::ServerError)
            },
            latency_ms: 5 + seq,
            prompt_tokens: prompt,
            completion_tokens: completion,
            cost_usd: (prompt as f64) * 1e-6 + (completion as f64) * 2e-6,
            estimated: ok && i.is_multiple_of(5),
        });
    }
    let answered = attempts.last().filter(|a| a.outcome == Outcome::Ok);
    RequestRecord {
        request_id: format!("req-{i}"),
        started_at_unix_ms: BASE_MS + (i % 3) * DAY_MS + i * 1000,
        route: route.to_owned(),
        model: answered.map(|a| a.model.clone()),
        provider: answered.map(|a| a.provider.clone()),
        status: if failed { 503 } else { 200 },
        stream: i.is_multiple_of(2),
        endpoint: Default::default(),
        latency_ms: 20 + i,
        ttft_ms: i.is_multiple_of(2).then_some(7),
        prompt_tokens: attempts.iter().map(|a| a.prompt_tokens).sum(),
        completion_tokens: attempts.iter().map(|a| a.completion_tokens).sum(),
        cost_usd: attempts.iter().map(|a| a.cost_usd).sum(),
        estimated: attempts.iter().any(|a| a.estimated),
        fallback: n_attempts > 1,
        no_finish_reason: false,
        stream_anomalies: 0,
        cached_tokens: 0,
        cache_write_tokens: 0,
        attempts,
    }
}

fn day_of(ms: u64) -> String {
    ["2025-01-30", "2025-01-31", "2025-02-01", "2025-02-02"][((ms - BASE_MS) / DAY_MS) as usize]
        .to_owned()
}

/// What `summary` should say, computed from the records themselves.
fn expected(records: &[RequestRecord], by: GroupBy) -> Vec<UsageRow> {
    let mut rows: BTreeMap<String, UsageRow> = BTreeMap::new();
    match by {
        GroupBy::Model | GroupBy::Route | GroupBy::Day => {
            for r in records {
                let key = match by {
                    GroupBy::Model => r.model.clone().unwrap_or_else(|| "-".to_owned()),
                    GroupBy::Route => r.route.clone(),
                    _ => day_of(r.started_at_unix_ms),
                };
                let row = rows
                    .entry(key.clone())
                    .or_insert_with(|| UsageRow::empty(key));
                row.requests += 1;
                row.failures += u64::from(r.status >= 400);
                row.fallbacks += u64::from(r.fallback);
                row.attempts += r.attempts.len() as u64;
                row.prompt_tokens += r.prompt_tokens;
                row.completion_tokens += r.completion_tokens;
                row.cost_usd += r.cost_usd;
                row.estimated_requests += u64::from(r.estimated);
            }
        }
        GroupBy::Key | GroupBy::Provider => {
            for r in records {
                let mut seen: BTreeMap<String, (bool, bool)> = BTreeMap::new();
                for a in &r.attempts {
                    let key = if by == GroupBy::Key {
                        a.key_id.clone().unwrap_or_else(|| "-".to_owned())
                    } else {
                        a.provider.clone()
                    };
                    let row = rows
                        .entry(key.clone())
                        .or_insert_with(|| UsageRow::empty(key.clone()));
                    row.attempts += 1;
                    row.failures += u64::from(a.outcome != Outcome::Ok);
                    row.prompt_tokens += a.prompt_tokens;
                    row.completion_tokens += a.completion_tokens;
                    row.cost_usd += a.cost_usd;
                    seen.entry(key).or_default().1 |= a.estimated;
                }
                for (key, (_, estimated)) in seen {
                    let row = rows.get_mut(&key).unwrap();
                    row.requests += 1;
                    row.fallbacks += u64::from(r.fallback);
                    row.estimated_requests += u64::from(estimated);
                }
            }
        }
    }
    rows.into_values().collect()
}

fn assert_rows(actual: &[UsageRow], expected: &[UsageRow]) {
    assert_eq!(
        actual.iter().map(|r| &r.key).collect::<Vec<_>>(),
        expected.iter().map(|r| &r.key).collect::<Vec<_>>()
    );
    for (a, e) in actual.iter().zip(expected) {
        assert!(close(a.cost_usd, e.cost_usd), "{a:?} vs {e:?}");
        let strip = |r: &UsageRow| UsageRow {
            cost_usd: 0.0,
            ..r.clone()
        };
        assert_eq!(strip(a), strip(e));
    }
}

fn count(path: &Path, table: &str) -> i64 {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}

/// Writes `records` through a writer with the given queue and batch sizes; returns
/// what `join` said.
async fn write_all(path: &Path, records: &[RequestRecord], capacity: usize, batch: usize) -> u64 {
    let ledger = Ledger::open(path).unwrap();
    let (sender, writer) = ledger.spawn_writer(capacity, batch, Duration::from_millis(5));
    let clone = sender.clone();
    for (i, r) in records.iter().enumerate() {
        let s = if i % 2 == 0 { &sender } else { &clone };
        s.send(r.clone()).await;
    }
    drop(sender);
    drop(clone);
    writer.finish().await.unwrap()
}

#[tokio::test]
async fn writer_lands_every_record_and_reports_sum_up() {
    let dir = tempfile::tempdir().unwrap();
    // A parent directory that does not exist yet: `open` creates it.
    let path = dir.path().join("nested/dir/ledger.db");
    let records: Vec<RequestRecord> = (0..60).map(record).collect();
    let written = write_all(&path, &records, 8, 7).await;
    assert_eq!(written, 60);

    assert_eq!(count(&path, "requests"), 60);
    let attempts: usize = records.iter().map(|r| r.attempts.len()).sum();
    assert_eq!(count(&path, "attempts"), attempts as i64);

    for by in [
        GroupBy::Model,
        GroupBy::Route,
        GroupBy::Key,
        GroupBy::Provider,
        GroupBy::Day,
    ] {
        let rows = summary(&path, &UsageFilter::default(), by).unwrap();
        assert_rows(&rows, &expected(&records, by));
    }
    // Spot checks that do not depend on the reference implementation above.
    let by_day = summary(&path, &UsageFilter::default(), GroupBy::Day).unwrap();
    assert_eq!(
        by_day.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        ["2025-01-30", "2025-01-31", "2025-02-01"]
    );
    assert_eq!(by_day.iter().map(|r| r.requests).sum::<u64>(), 60);
    let by_model = summary(&path, &UsageFilter::default(), GroupBy::Model).unwrap();
    let failed = by_model.iter().find(|r| r.key == "-").unwrap();
    assert_eq!(
        failed.requests,
        records.iter().filter(|r| r.model.is_none()).count() as u64
    );
    assert_eq!(failed.failures, failed.requests);
    assert_eq!(failed.prompt_tokens, 0);
    let total = UsageRow::total(&by_model);
    assert_eq!(total.requests, 60);
    assert_eq!(
        total.prompt_tokens,
        records.iter().map(|r| r.prompt_tokens).sum::<u64>()
    );
    let by_key = summary(&path, &UsageFilter::default(), GroupBy::Key).unwrap();
    assert_eq!(
        by_key.iter().map(|r| r.attempts).sum::<u64>(),
        attempts as u64
    );
    assert_eq!(
        by_key.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        ["-", "k0", "k1"]
    );
    // The TOTAL row counts requests, not request-key pairs: a request that used two
    // keys is one request (issue 14: `usage --by key` said more requests than there
    // were).
    for by in [GroupBy::Key, GroupBy::Provider, GroupBy::Model] {
        let r = report(&path, &UsageFilter::default(), by).unwrap();
        assert_eq!(r.total.requests, 60, "{by:?}");
        assert_eq!(r.total.attempts, attempts as u64, "{by:?}");
        assert_eq!(r.rows, summary(&path, &UsageFilter::default(), by).unwrap());
    }
    let multi_key = records
        .iter()
        .filter(|r| {
            let keys: std::collections::HashSet<_> =
                r.attempts.iter().map(|a| a.key_id.clone()).collect();
            keys.len() > 1
        })
        .count();
    assert!(multi_key > 0, "the fixture has requests that used two keys");
    assert!(by_key.iter().map(|r| r.requests).sum::<u64>() > 60);

    // Attempts keep their order and fields.
    let conn = rusqlite::Connection::open(&path).unwrap();
    let (seq, status, kind, key): (i64, Option<i64>, String, Option<String>) = conn
        .query_row(
            "SELECT a.seq, a.status, a.error_kind, a.key_id FROM attempts a
             JOIN requests r ON r.id = a.request_rowid
             WHERE r.request_id = 'req-2' ORDER BY a.seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(
        (seq, status, kind.as_str(), key),
        (2, Some(200), "ok", None)
    );
}

#[tokio::test]
async fn several_ledgers_one_per_replica_are_reported_together() {
    let dir = tempfile::tempdir().unwrap();
    let records: Vec<RequestRecord> = (0..60).map(record).collect();
    let (one, all) = (
        dir.path().join("all.db"),
        [
            dir.path().join("a.db"),
            dir.path().join("b.db"),
            dir.path().join("c.db"),
        ],
    );
    write_all(&one, &records, 8, 4).await;
    for (i, path) in all.iter().enumerate() {
        let mine: Vec<RequestRecord> = records.iter().skip(i).step_by(3).cloned().collect();
        write_all(path, &mine, 8, 4).await;
    }
    for by in [
        GroupBy::Model,
        GroupBy::Key,
        GroupBy::Provider,
        GroupBy::Day,
    ] {
        let together = report_many(&all, &UsageFilter::default(), by).unwrap();
        let reference = report(&one, &UsageFilter::default(), by).unwrap();
        assert_rows(&together.rows, &reference.rows);
        assert_rows(
            std::slice::from_ref(&together.total),
            std::slice::from_ref(&reference.total),
        );
    }
    assert!(
        report_many(
            &[dir.path().join("missing.db")],
            &UsageFilter::default(),
            GroupBy::Model
        )
        .is_err()
    );
}

#[tokio::test]
async fn filters_select_by_arrival_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let records: Vec<RequestRecord> = (0..30).map(record).collect();
    write_all(&path, &records, 4, 3).await;

    let cases = [
        (Some(BASE_MS + DAY_MS), None),
        (None, Some(BASE_MS + DAY_MS)),
        (Some(BASE_MS + DAY_MS), Some(BASE_MS + 2 * DAY_MS)),
        (Some(BASE_MS + 10 * DAY_MS), None),
        // Since is inclusive, until exclusive: request 0 arrived at exactly BASE_MS.
        (Some(BASE_MS), Some(BASE_MS + 1)),
        (None, Some(BASE_MS)),
    ];
    for (since_ms, until_ms) in cases {
        let filter = UsageFilter { since_ms, until_ms };
        let selected: Vec<RequestRecord> = records
            .iter()
            .filter(|r| since_ms.is_none_or(|s| r.started_at_unix_ms >= s))
            .filter(|r| until_ms.is_none_or(|u| r.started_at_unix_ms < u))
            .cloned()
            .collect();
        for by in [GroupBy::Model, GroupBy::Provider, GroupBy::Day] {
            let rows = summary(&path, &filter, by).unwrap();
            assert_rows(&rows, &expected(&selected, by));
        }
    }
    let only_first = UsageFilter {
        since_ms: Some(BASE_MS),
        until_ms: Some(BASE_MS + 1),
    };
    let rows = summary(&path, &only_first, GroupBy::Route).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].key.as_str(), rows[0].requests), ("fast_group", 1));
    let before_first = UsageFilter {
        since_ms: None,
        until_ms: Some(BASE_MS),
    };
    assert!(
        summary(&path, &before_first, GroupBy::Route)
            .unwrap()
            .is_empty()
    );
    // The middle day alone.
    let filter = UsageFilter {
        since_ms: Some(BASE_MS + DAY_MS),
        until_ms: Some(BASE_MS + 2 * DAY_MS),
    };
    let rows = summary(&path, &filter, GroupBy::Day).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].key, "2025-01-31");
    assert_eq!(rows[0].requests, 10);
    // Nothing after the data.
    let filter = UsageFilter {
        since_ms: Some(BASE_MS + 10 * DAY_MS),
        until_ms: None,
    };
    assert!(summary(&path, &filter, GroupBy::Route).unwrap().is_empty());
}

#[tokio::test]
async fn a_full_queue_makes_senders_wait_and_drops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let ledger = Ledger::open(&path).unwrap();
    let (sender, writer) = ledger.spawn_writer(1, 1, Duration::from_millis(1));
    assert_eq!(sender.queue_capacity(), 1);

    // Another connection holds the write lock: the writer blocks on its first batch.
    let blocker = rusqlite::Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();

    sender.send(record(0)).await; // taken by the writer, which then blocks
    sender.send(record(1)).await; // fills the queue (capacity 1)
    assert_eq!(sender.queue_depth(), 1);
    {
        let third = sender.send(record(2));
        tokio::pin!(third);
        // The writer cannot make progress while the lock is held, so the send waits.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut third)
                .await
                .is_err(),
            "send returned while the queue was full"
        );
        assert_eq!(sender.queue_depth(), 1);

        blocker.execute_batch("COMMIT").unwrap();
        third.await;
    }
    for i in 3..200 {
        sender.send(record(i)).await;
        assert!(sender.queue_depth() <= 1);
    }
    drop(sender);
    assert_eq!(writer.finish().await.unwrap(), 200);
    assert_eq!(count(&path, "requests"), 200);
}

#[test]
fn join_flushes_everything_after_the_senders_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let ledger = Ledger::open(&path).unwrap();
    // A long flush interval and a large batch: only shutdown can flush these.
    let (sender, writer) = ledger.spawn_writer(1000, 1000, Duration::from_secs(3600));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let clones: Vec<_> = (0..3).map(|_| sender.clone()).collect();
    runtime.block_on(async {
        for i in 0..25 {
            clones[(i % 3) as usize].send(record(i)).await;
        }
    });
    drop(sender);
    drop(clones);
    assert_eq!(writer.join().unwrap(), 25);
    assert_eq!(count(&path, "requests"), 25);
    let summary = usage_summary(&path).unwrap();
    assert_eq!(summary.requests, 25);
}

#[test]
fn an_idle_writer_exits_with_zero_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let (sender, writer) =
        Ledger::open(&path)
            .unwrap()
            .spawn_writer(10, 10, Duration::from_millis(10));
    assert_eq!(sender.queue_depth(), 0);
    drop(sender);
    assert_eq!(writer.join().unwrap(), 0);
    assert!(
        summary(&path, &UsageFilter::default(), GroupBy::Model)
            .unwrap()
            .is_empty()
    );
    let s = usage_summary(&path).unwrap();
    assert_eq!((s.total_tokens, s.requests), (0, 0));
    assert!(close(s.total_cost_usd, 0.0));
}

#[test]
fn reopening_keeps_the_version_and_the_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let mut ledger = Ledger::open(&path).unwrap();
    assert_eq!(ledger.schema_version().unwrap(), i64::from(SCHEMA_VERSION));
    assert_eq!(ledger.insert(&[record(1), record(2)]).unwrap(), 2);
    drop(ledger);

    let conn = rusqlite::Connection::open(&path).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    drop(conn);

    let mut ledger = Ledger::open(&path).unwrap();
    assert_eq!(ledger.schema_version().unwrap(), i64::from(SCHEMA_VERSION));
    assert_eq!(ledger.insert(&[record(3)]).unwrap(), 1);
    drop(ledger);
    assert_eq!(count(&path, "requests"), 3);
}

#[test]
fn an_existing_unversioned_database_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE notes (x TEXT); INSERT INTO notes VALUES ('kept');")
            .unwrap();
    }
    let ledger = Ledger::open(&path).unwrap();
    assert_eq!(ledger.schema_version().unwrap(), i64::from(SCHEMA_VERSION));
    drop(ledger);
    assert_eq!(count(&path, "notes"), 1);
    assert_eq!(count(&path, "requests"), 0);
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
    }
    match Ledger::open(&path) {
        Err(LedgerError::TooNew { found, known, .. }) => {
            assert_eq!(found, 99);
            assert_eq!(known, SCHEMA_VERSION);
        }
        other => panic!("expected TooNew, got {other:?}"),
    }
    let err = summary(&path, &UsageFilter::default(), GroupBy::Model).unwrap_err();
    assert!(
        matches!(err, LedgerError::TooNew { found: 99, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("newer than this build"), "{err}");
    // Refusing did not touch the file.
    let conn = rusqlite::Connection::open(&path).unwrap();
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, 99);
}

#[test]
fn reports_need_an_existing_current_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.db");
    let err = summary(&missing, &UsageFilter::default(), GroupBy::Model).unwrap_err();
    assert!(matches!(err, LedgerError::NotFound { .. }), "{err}");
    assert!(!missing.exists(), "a report must not create the file");

    let other = dir.path().join("other.db");
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE t (x)")
        .unwrap();
    let err = usage_summary(&other).unwrap_err();
    assert!(
        matches!(err, LedgerError::NotCurrent { found: 0, .. }),
        "{err}"
    );
}

#[test]
fn usage_summary_matches_seed_000_pricing() {
    // Seed 000: gpt-4o-mini at 0.15 / 0.60 USD per 1M tokens; get_usage_summary()
    // gives total_cost and total_tokens.
    let price = builtin_price("gpt-4o-mini").unwrap();
    let mk = |i: u64, prompt: u64, completion: u64, model: &str| {
        let cost = price.cost_usd(prompt, completion, 0);
        RequestRecord {
            request_id: format!("r{i}"),
            started_at_unix_ms: BASE_MS + i,
            route: "judge".to_owned(),
            model: Some(model.to_owned()),
            provider: Some("openai".to_owned()),
            status: 200,
            stream: false,
            endpoint: Default::default(),
            latency_ms: 10,
            ttft_ms: None,
            prompt_tokens: prompt,
            completion_tokens: completion,
            cost_usd: cost,
            estimated: false,
            fallback: false,
            no_finish_reason: false,
            stream_anomalies: 0,
            cached_tokens: 0,
            cache_write_tokens: 0,
            attempts: vec![AttemptRecord {
                model: model.to_owned(),
                provider: "openai".to_owned(),
                key_id: Some("ab12".to_owned()),
                status: Some(200),
                outcome: Outcome::Ok,
                latency_ms: 10,
                prompt_tokens: prompt,
                completion_tokens: completion,
                cost_usd: cost,
                estimated: false,
            }],
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let mut ledger = Ledger::open(&path).unwrap();
    ledger
        .insert(&[
            mk(1, 1_000_000, 0, "gpt-4o-mini"),
            mk(2, 0, 1_000_000, "gpt-4o-mini"),
            mk(3, 500, 100, "other"),
        ])
        .unwrap();
    let s = usage_summary(&path).unwrap();
    assert_eq!(s.total_tokens, 2_000_600);
    assert_eq!(s.requests, 3);
    let expected_cost = 0.75 + (500.0 * 0.15 + 100.0 * 0.60) / 1e6;
    assert!(
        close(s.total_cost_usd, expected_cost),
        "{}",
        s.total_cost_usd
    );
    let mini = &s.models["gpt-4o-mini"];
    assert_eq!(
        (mini.requests, mini.prompt_tokens, mini.completion_tokens),
        (2, 1_000_000, 1_000_000)
    );
    assert!(close(mini.cost_usd, 0.75));
    assert_eq!(s.models["other"].requests, 1);
}

fn sample_rows() -> Vec<UsageRow> {
    vec![
        UsageRow {
            key: "gpt-4o-mini".to_owned(),
            requests: 3,
            failures: 1,
            fallbacks: 1,
            attempts: 4,
            prompt_tokens: 1200,
            completion_tokens: 300,
            cost_usd: 0.00036,
            estimated_requests: 0,
        },
        UsageRow {
            key: "a,b \"quoted\"".to_owned(),
            requests: 10,
            failures: 0,
            fallbacks: 0,
            attempts: 10,
            prompt_tokens: 5,
            completion_tokens: 7,
            cost_usd: 1.5,
            estimated_requests: 2,
        },
    ]
}

#[test]
fn render_table_has_header_rows_rule_and_total() {
    let text = render(
        &UsageReport::from_rows(sample_rows(), GroupBy::Model),
        ReportFormat::Table,
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "MODEL",
            "REQUESTS",
            "FAILURES",
            "FALLBACKS",
            "ATTEMPTS",
            "PROMPT_TOKENS",
            "COMPLETION_TOKENS",
            "COST_USD",
            "ESTIMATED_REQUESTS"
        ]
    );
    assert!(lines[1].starts_with("gpt-4o-mini "));
    assert!(lines[1].contains(" 0.000360 "), "{}", lines[1]);
    assert!(lines[3].chars().all(|c| c == '-' || c == ' '));
    let total: Vec<&str> = lines[4].split_whitespace().collect();
    assert_eq!(
        total,
        [
            "TOTAL", "13", "1", "1", "14", "1205", "307", "1.500360", "2"
        ]
    );
    // Columns line up: every line's last column ends at the same place.
    assert_eq!(lines[0].len(), lines[4].len());
    assert_eq!(lines[1].len(), lines[4].len());
    // An empty report still has a header and a zero total.
    let empty = render(
        &UsageReport::from_rows(Vec::new(), GroupBy::Day),
        ReportFormat::Table,
    );
    assert!(empty.starts_with("DAY"));
    assert!(empty.lines().last().unwrap().starts_with("TOTAL"));
}

#[test]
fn render_json_and_csv() {
    let rows = sample_rows();
    let json: serde_json::Value = serde_json::from_str(&render(
        &UsageReport::from_rows(rows.clone(), GroupBy::Route),
        ReportFormat::Json,
    ))
    .unwrap();
    assert_eq!(json["by"], "route");
    assert_eq!(json["rows"].as_array().unwrap().len(), 2);
    assert_eq!(json["rows"][0]["key"], "gpt-4o-mini");
    assert_eq!(json["rows"][0]["prompt_tokens"], 1200);
    assert_eq!(json["total"]["requests"], 13);
    assert!(close(json["total"]["cost_usd"].as_f64().unwrap(), 1.50036));

    let csv = render(
        &UsageReport::from_rows(rows, GroupBy::Key),
        ReportFormat::Csv,
    );
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "key,requests,failures,fallbacks,attempts,prompt_tokens,completion_tokens,cost_usd,estimated_requests"
    );
    assert_eq!(lines[1], "gpt-4o-mini,3,1,1,4,1200,300,0.000360,0");
    assert_eq!(lines[2], "\"a,b \"\"quoted\"\"\",10,0,0,10,5,7,1.500000,2");
    assert_eq!(lines.len(), 3, "no totals line in CSV");
}

#[test]
fn group_by_and_format_names_round_trip() {
    for name in GroupBy::NAMES {
        assert_eq!(name.parse::<GroupBy>().unwrap().as_str(), *name);
    }
    for name in ReportFormat::NAMES {
        assert_eq!(name.parse::<ReportFormat>().unwrap().as_str(), *name);
    }
    assert!(
        "models"
            .parse::<GroupBy>()
            .unwrap_err()
            .contains("model, route")
    );
    assert!("xml".parse::<ReportFormat>().is_err());
}

#[test]
fn time_bounds() {
    // 2025-01-31T15:30:00Z.
    let now = BASE_MS + DAY_MS + 15 * HOUR_MS + 30 * 60_000;
    let ok = |s: &str| parse_time_bound(s, now).unwrap();
    assert_eq!(ok("24h"), now - DAY_MS);
    assert_eq!(ok("7d"), now - 7 * DAY_MS);
    assert_eq!(ok("30m"), now - 30 * 60_000);
    assert_eq!(ok("90s"), now - 90_000);
    assert_eq!(ok("1h30m"), now - 90 * 60_000);
    assert_eq!(ok("now"), now);
    assert_eq!(ok("today"), BASE_MS + DAY_MS);
    assert_eq!(ok("yesterday"), BASE_MS);
    assert_eq!(ok("2025-01-30"), BASE_MS);
    assert_eq!(ok("1970-01-01"), 0);
    assert_eq!(ok("2024-02-29"), 1_709_164_800_000);
    assert_eq!(ok("2025-01-30T00:00:00Z"), BASE_MS);
    assert_eq!(ok("2025-01-30T06:00:00.250Z"), BASE_MS + 6 * HOUR_MS + 250);
    assert_eq!(ok("2025-01-30T08:00:00+02:00"), BASE_MS + 6 * HOUR_MS);
    assert_eq!(
        ok("2025-01-30 01:00:00-01:30"),
        BASE_MS + 2 * HOUR_MS + 30 * 60_000
    );
    assert_eq!(ok("2025-01-30T06:00Z"), BASE_MS + 6 * HOUR_MS);
    // Longer than the epoch is old: clamps to 0.
    assert_eq!(parse_time_bound("1000d", 5).unwrap(), 0);

    for bad in [
        "",
        "soon",
        "24",
        "24x",
        "2025-13-01",
        "2025-02-30",
        "2023-02-29",
        "2025-01-30T25:00:00Z",
        "2025-01-30T12:00:00",
        "2025-01-30T12:00:00+2",
        "1969-12-31",
        "2025/01/30",
    ] {
        assert!(parse_time_bound(bad, now).is_err(), "accepted {bad:?}");
    }
    let msg = parse_time_bound("2025-01-30T12:00:00", now).unwrap_err();
    assert!(msg.contains("offset"), "{msg}");
}

#[test]
fn pricing_math() {
    let mini = builtin_price("gpt-4o-mini").unwrap();
    assert!(close(mini.cost_usd(1_000_000, 1_000_000, 0), 0.75));
    assert!(close(
        builtin_price("gpt-4o-mini-2024-07-18")
            .unwrap()
            .cost_usd(1_000_000, 1_000_000, 0),
        0.75
    ));
    assert!(close(
        builtin_price("gpt-4o")
            .unwrap()
            .cost_usd(1_000_000, 1_000_000, 0),
        12.5
    ));
    assert!(close(
        builtin_price("gpt-4.1")
            .unwrap()
            .cost_usd(1_000_000, 1_000_000, 0),
        10.0
    ));
    assert!(close(
        builtin_price("gpt-4.1-mini")
            .unwrap()
            .cost_usd(1_000_000, 1_000_000, 0),
        2.0
    ));
    assert!(close(
        builtin_price("deepseek-chat")
            .unwrap()
            .cost_usd(1_000_000, 1_000_000, 0),
        1.37
    ));

    // Cached tokens are part of the prompt tokens, priced at the cached rate.
    let p = Price {
        input_per_1m: 2.0,
        output_per_1m: 8.0,
        cached_input_per_1m: Some(0.5),
        cache_write_per_1m: None,
    };
    // 750k uncached × 2.0 + 250k cached × 0.5 + 0 out.
    assert!(close(p.cost_usd(1_000_000, 0, 250_000), 1.5 + 0.125));
    let no_cache_rate = Price {
        cached_input_per_1m: None,
        ..p
    };
    assert!(close(no_cache_rate.cost_usd(1_000_000, 0, 250_000), 2.0));

    // Configured pricing wins; an unknown model has no price.
    let cfg = echelon::config::PricingConfig {
        input_per_1m: 0.0,
        output_per_1m: 0.0,
        cached_input_per_1m: None,
        cache_write_per_1m: None,
    };
    assert!(close(
        price_for(Some(&cfg), "gpt-4o").unwrap().cost_usd(10, 10, 0),
        0.0
    ));
    assert!(price_for(None, "smollm2").is_none());
}
