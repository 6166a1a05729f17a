//! Reading the ledger back: usage grouped by model, route, key, provider or day
//! ([`summary`]), seed 000's totals ([`usage_summary`]), rendered as a table, JSON or
//! CSV ([`render`]), and the time bounds a report takes ([`parse_time_bound`]).
//!
//! Reports open the ledger file read-only, on their own connection, so they can run
//! while a gateway writes it (SQLite WAL).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::str::FromStr;

use rusqlite::params;
use serde::Serialize;

use super::ledger::{LedgerError, open_read_only};

/// Milliseconds in a day.
const DAY_MS: u64 = 86_400_000;

/// Which requests a report covers, by arrival time (`requests.started_at_ms`, Unix
/// milliseconds). Both bounds are optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageFilter {
    /// Only requests that arrived at or after this time, Unix ms.
    pub since_ms: Option<u64>,
    /// Only requests that arrived before this time, Unix ms (exclusive).
    pub until_ms: Option<u64>,
}

/// How a report groups usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupBy {
    /// By the model that answered (`-` when none did); per request.
    Model,
    /// By the route the request named; per request.
    Route,
    /// By the API key's short id (`-` for attempts without a key, e.g. skips); per
    /// attempt.
    Key,
    /// By the provider of each attempt; per attempt.
    Provider,
    /// By the UTC day the request arrived (`YYYY-MM-DD`); per request.
    Day,
}

impl GroupBy {
    /// Every accepted name.
    pub const NAMES: &'static [&'static str] = &["model", "route", "key", "provider", "day"];

    /// The name (`model`, `route`, `key`, `provider`, `day`).
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Model => "model",
            GroupBy::Route => "route",
            GroupBy::Key => "key",
            GroupBy::Provider => "provider",
            GroupBy::Day => "day",
        }
    }

    /// The grouping called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "model" => Some(GroupBy::Model),
            "route" => Some(GroupBy::Route),
            "key" => Some(GroupBy::Key),
            "provider" => Some(GroupBy::Provider),
            "day" => Some(GroupBy::Day),
            _ => None,
        }
    }
}

impl FromStr for GroupBy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        GroupBy::from_name(s).ok_or_else(|| {
            format!(
                "unknown grouping `{s}`; expected one of: {}",
                GroupBy::NAMES.join(", ")
            )
        })
    }
}

/// How [`render`] writes a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ReportFormat {
    /// Aligned columns with a totals line, for people.
    #[default]
    Table,
    /// `{"by": …, "rows": […], "total": {…}}`.
    Json,
    /// A header line then one line per row (RFC 4180 quoting); no totals line.
    Csv,
}

impl ReportFormat {
    /// Every accepted name.
    pub const NAMES: &'static [&'static str] = &["table", "json", "csv"];

    /// The name (`table`, `json`, `csv`).
    pub fn as_str(self) -> &'static str {
        match self {
            ReportFormat::Table => "table",
            ReportFormat::Json => "json",
            ReportFormat::Csv => "csv",
        }
    }

    /// The format called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "table" => Some(ReportFormat::Table),
            "json" => Some(ReportFormat::Json),
            "csv" => Some(ReportFormat::Csv),
            _ => None,
        }
    }
}

impl FromStr for ReportFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        ReportFormat::from_name(s).ok_or_else(|| {
            format!(
                "unknown format `{s}`; expected one of: {}",
                ReportFormat::NAMES.join(", ")
            )
        })
    }
}

/// One group of a report.
///
/// Grouped by model, route or day the figures are the requests' own. Grouped by key or
/// provider they are the attempts': `attempts` and `failures` count the group's
/// attempts, the tokens and cost are summed over them, and `requests`, `fallbacks`
/// and `estimated_requests` count the distinct requests with an attempt in the group
/// (so a request that used two keys counts under both).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageRow {
    /// The group: a model id, route, key id, provider id or `YYYY-MM-DD`.
    pub key: String,
    /// Requests.
    pub requests: u64,
    /// By model, route, day: requests answered with HTTP status ≥ 400 (499 = client
    /// went away). By key, provider: attempts that did not succeed (`error_kind` other
    /// than `ok`, which includes every status ≥ 400, timeouts and skips).
    pub failures: u64,
    /// Requests that moved past their first candidate.
    pub fallbacks: u64,
    /// Attempts (HTTP calls and skips).
    pub attempts: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Cost, USD (0 for models of unknown price).
    pub cost_usd: f64,
    /// Requests with a token figure counted locally (tiktoken) rather than reported by
    /// the provider.
    pub estimated_requests: u64,
}

impl UsageRow {
    /// A row of zeros named `key`.
    pub fn empty(key: impl Into<String>) -> Self {
        UsageRow {
            key: key.into(),
            requests: 0,
            failures: 0,
            fallbacks: 0,
            attempts: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_usd: 0.0,
            estimated_requests: 0,
        }
    }

    /// The sum of `rows`, named `TOTAL`. (By key or provider, `requests` sums the
    /// per-group counts, so a request seen in two groups counts twice: [`report`]
    /// counts the total in the ledger instead.)
    pub fn total(rows: &[UsageRow]) -> UsageRow {
        rows.iter().fold(UsageRow::empty("TOTAL"), |mut t, r| {
            t.requests += r.requests;
            t.failures += r.failures;
            t.fallbacks += r.fallbacks;
            t.attempts += r.attempts;
            t.prompt_tokens += r.prompt_tokens;
            t.completion_tokens += r.completion_tokens;
            t.cost_usd += r.cost_usd;
            t.estimated_requests += r.estimated_requests;
            t
        })
    }

    /// Prompt plus completion tokens.
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Bound as SQLite INTEGER.
fn bound(v: Option<u64>) -> Option<i64> {
    v.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// Usage in the ledger at `path` that `filter` selects, grouped `by`, sorted by group
/// (days in order). The file is opened read-only; it must exist and be a ledger of
/// this build's schema.
///
/// # Errors
/// [`LedgerError`] when the file is missing, not a ledger of this schema, or unreadable.
pub fn summary(
    path: &Path,
    filter: &UsageFilter,
    by: GroupBy,
) -> Result<Vec<UsageRow>, LedgerError> {
    let conn = open_read_only(path)?;
    query(&conn, path, filter, by, true)
}

/// The groups of [`summary`] and their `TOTAL` row, read from one connection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageReport {
    /// What the rows are grouped by.
    #[serde(serialize_with = "group_name")]
    pub by: GroupBy,
    /// One row per group, as [`summary`] gives them.
    pub rows: Vec<UsageRow>,
    /// The whole selection as one row, counted by the ledger itself: grouped by key or
    /// provider, a request that used two keys is one request here, not two (so
    /// `requests` is never more than the requests in the ledger, unlike the sum of the
    /// rows).
    pub total: UsageRow,
}

fn group_name<S: serde::Serializer>(by: &GroupBy, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(by.as_str())
}

impl UsageReport {
    /// A report of `rows` whose total is their sum ([`UsageRow::total`]): right by
    /// model, route and day, where each request is in one row; by key or provider use
    /// [`report`], which counts distinct requests.
    pub fn from_rows(rows: Vec<UsageRow>, by: GroupBy) -> UsageReport {
        let total = UsageRow::total(&rows);
        UsageReport { by, rows, total }
    }
}

/// [`summary`] with its `TOTAL` row (what `echelon usage` prints).
///
/// # Errors
/// As [`summary`].
pub fn report(path: &Path, filter: &UsageFilter, by: GroupBy) -> Result<UsageReport, LedgerError> {
    let conn = open_read_only(path)?;
    let rows = query(&conn, path, filter, by, true)?;
    let total = query(&conn, path, filter, by, false)?
        .pop()
        .unwrap_or_else(|| UsageRow::empty("TOTAL"));
    Ok(UsageReport { by, rows, total })
}

/// [`report`] over several ledgers (one per replica, issue 15), reported together: rows
/// of the same group are added up, and so are the totals (a request is written to the
/// ledger of the one replica that served it, so none counts twice).
///
/// # Errors
/// As [`report`], for the first ledger that cannot be read.
pub fn report_many(
    paths: &[impl AsRef<Path>],
    filter: &UsageFilter,
    by: GroupBy,
) -> Result<UsageReport, LedgerError> {
    let mut rows: std::collections::BTreeMap<String, UsageRow> = std::collections::BTreeMap::new();
    let mut totals = Vec::new();
    for path in paths {
        let one = report(path.as_ref(), filter, by)?;
        for r in one.rows {
            let sum = rows
                .entry(r.key.clone())
                .or_insert_with(|| UsageRow::empty(r.key.clone()));
            *sum = UsageRow {
                key: r.key.clone(),
                ..UsageRow::total(&[sum.clone(), r])
            };
        }
        totals.push(one.total);
    }
    Ok(UsageReport {
        by,
        rows: rows.into_values().collect(),
        total: UsageRow::total(&totals),
    })
}

/// The SQL of one report: one row per group when `grouped`, else one row named `TOTAL`
/// over the whole selection (the same aggregates, so by key a request counts once).
fn report_sql(by: GroupBy, grouped: bool) -> String {
    let (key, tail) = if grouped {
        let key = match by {
            GroupBy::Model => "COALESCE(r.model, '-')",
            GroupBy::Route => "r.route",
            GroupBy::Day => "strftime('%Y-%m-%d', r.started_at_ms / 1000, 'unixepoch')",
            GroupBy::Key => "COALESCE(a.key_id, '-')",
            GroupBy::Provider => "a.provider",
        };
        (key, " GROUP BY k ORDER BY k")
    } else {
        ("'TOTAL'", "")
    };
    let filter = "WHERE (?1 IS NULL OR r.started_at_ms >= ?1)
                   AND (?2 IS NULL OR r.started_at_ms < ?2)";
    match by {
        GroupBy::Model | GroupBy::Route | GroupBy::Day => format!(
            "SELECT {key} AS k, COUNT(*), SUM(r.status >= 400), SUM(r.fallback),
                SUM((SELECT COUNT(*) FROM attempts a WHERE a.request_rowid = r.id)),
                SUM(r.prompt_tokens), SUM(r.completion_tokens), SUM(r.cost_usd),
                SUM(r.estimated)
             FROM requests r {filter}{tail}"
        ),
        GroupBy::Key | GroupBy::Provider => format!(
            "SELECT {key} AS k, COUNT(DISTINCT a.request_rowid),
                SUM(a.error_kind <> 'ok'),
                COUNT(DISTINCT CASE WHEN r.fallback THEN a.request_rowid END),
                COUNT(*), SUM(a.prompt_tokens), SUM(a.completion_tokens),
                SUM(a.cost_usd),
                COUNT(DISTINCT CASE WHEN a.estimated THEN a.request_rowid END)
             FROM attempts a JOIN requests r ON r.id = a.request_rowid {filter}{tail}"
        ),
    }
}

fn query(
    conn: &rusqlite::Connection,
    path: &Path,
    filter: &UsageFilter,
    by: GroupBy,
    grouped: bool,
) -> Result<Vec<UsageRow>, LedgerError> {
    let err = |source| LedgerError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let mut stmt = conn.prepare(&report_sql(by, grouped)).map_err(err)?;
    let rows = stmt
        .query_map(
            params![bound(filter.since_ms), bound(filter.until_ms)],
            |row| {
                Ok(UsageRow {
                    key: row.get::<_, Option<String>>(0)?.unwrap_or_default(),
                    requests: count(row.get(1)?),
                    failures: count(row.get::<_, Option<i64>>(2)?.unwrap_or(0)),
                    fallbacks: count(row.get::<_, Option<i64>>(3)?.unwrap_or(0)),
                    attempts: count(row.get::<_, Option<i64>>(4)?.unwrap_or(0)),
                    prompt_tokens: count(row.get::<_, Option<i64>>(5)?.unwrap_or(0)),
                    completion_tokens: count(row.get::<_, Option<i64>>(6)?.unwrap_or(0)),
                    cost_usd: row.get::<_, Option<f64>>(7)?.unwrap_or(0.0),
                    estimated_requests: count(row.get::<_, Option<i64>>(8)?.unwrap_or(0)),
                })
            },
        )
        .map_err(err)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(err)
}

/// One model's share of a [`UsageSummary`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelUsage {
    /// Requests it answered (or, under `-`, that no model answered).
    pub requests: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Cost, USD.
    pub cost_usd: f64,
}

/// Everything in a ledger, as seed 000's `get_usage_summary()` reports it
/// (`total_cost`, `total_tokens`), plus per-model figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageSummary {
    /// Total cost, USD.
    pub total_cost_usd: f64,
    /// Prompt plus completion tokens.
    pub total_tokens: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Requests.
    pub requests: u64,
    /// By the model that answered (`-` for requests none answered).
    pub models: BTreeMap<String, ModelUsage>,
}

/// The totals of the whole ledger at `path` (seed 000's `get_usage_summary()`).
pub fn usage_summary(path: &Path) -> Result<UsageSummary, LedgerError> {
    let rows = summary(path, &UsageFilter::default(), GroupBy::Model)?;
    let total = UsageRow::total(&rows);
    Ok(UsageSummary {
        total_cost_usd: total.cost_usd,
        total_tokens: total.total_tokens(),
        prompt_tokens: total.prompt_tokens,
        completion_tokens: total.completion_tokens,
        requests: total.requests,
        models: rows
            .into_iter()
            .map(|r| {
                (
                    r.key,
                    ModelUsage {
                        requests: r.requests,
                        prompt_tokens: r.prompt_tokens,
                        completion_tokens: r.completion_tokens,
                        cost_usd: r.cost_usd,
                    },
                )
            })
            .collect(),
    })
}

/// The column names after the group's, as in CSV.
const COLUMNS: [&str; 8] = [
    "requests",
    "failures",
    "fallbacks",
    "attempts",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "estimated_requests",
];

/// A row's figures as text, in [`COLUMNS`] order (cost with 6 decimals, USD).
fn cells(r: &UsageRow) -> [String; 8] {
    [
        r.requests.to_string(),
        r.failures.to_string(),
        r.fallbacks.to_string(),
        r.attempts.to_string(),
        r.prompt_tokens.to_string(),
        r.completion_tokens.to_string(),
        format!("{:.6}", r.cost_usd),
        r.estimated_requests.to_string(),
    ]
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Writes `report` as `format`:
/// - [`ReportFormat::Table`]: a header (the group's name upper-cased, then
///   `REQUESTS FAILURES FALLBACKS ATTEMPTS PROMPT_TOKENS COMPLETION_TOKENS COST_USD
///   ESTIMATED_REQUESTS`), one line per row, a rule, and a `TOTAL` line; numbers
///   right-aligned, cost in USD with 6 decimals;
/// - [`ReportFormat::Json`]: `{"by": "model", "rows": [UsageRow…], "total": UsageRow}`
///   (the report itself);
/// - [`ReportFormat::Csv`]: a header line (`model,requests,…`) and one line per row.
///
/// Every format ends with a newline.
pub fn render(report: &UsageReport, format: ReportFormat) -> String {
    let (rows, by) = (report.rows.as_slice(), report.by);
    match format {
        ReportFormat::Table => table(rows, &report.total, by),
        ReportFormat::Json => {
            let mut out = serde_json::to_string_pretty(report).unwrap_or_default();
            out.push('\n');
            out
        }
        ReportFormat::Csv => {
            let mut out = String::new();
            out.push_str(by.as_str());
            for c in COLUMNS {
                out.push(',');
                out.push_str(c);
            }
            out.push('\n');
            for r in rows {
                out.push_str(&csv_field(&r.key));
                for c in cells(r) {
                    out.push(',');
                    out.push_str(&c);
                }
                out.push('\n');
            }
            out
        }
    }
}

fn table(rows: &[UsageRow], total: &UsageRow, by: GroupBy) -> String {
    let header: Vec<String> = std::iter::once(by.as_str().to_uppercase())
        .chain(COLUMNS.iter().map(|c| c.to_uppercase()))
        .collect();
    let line =
        |r: &UsageRow| -> Vec<String> { std::iter::once(r.key.clone()).chain(cells(r)).collect() };
    let body: Vec<Vec<String>> = rows.iter().map(line).collect();
    let total_line = line(total);
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for l in body.iter().chain(std::iter::once(&total_line)) {
        for (w, cell) in widths.iter_mut().zip(l) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut write_line = |cells: &[String]| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == 0 {
                let _ = write!(text, "{cell:<w$}");
            } else {
                let _ = write!(text, "  {cell:>w$}");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    write_line(&header);
    for l in &body {
        write_line(l);
    }
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    write_line(&rule);
    write_line(&total_line);
    out
}

// ---------------------------------------------------------------------------
// time bounds

/// Days since 1970-01-01 of the proleptic Gregorian date `y-m-d` (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// `n` ASCII digits at the start of `s`, as a number, and the rest.
fn digits(s: &str, n: usize) -> Option<(u32, &str)> {
    let head = s.get(..n)?;
    if !head.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((head.parse().ok()?, &s[n..]))
}

/// `YYYY-MM-DD` at the start of `s` → (days since the epoch, rest).
fn date_prefix(s: &str) -> Option<(i64, &str)> {
    let (y, rest) = digits(s, 4)?;
    let (m, rest) = digits(rest.strip_prefix('-')?, 2)?;
    let (d, rest) = digits(rest.strip_prefix('-')?, 2)?;
    let y = i64::from(y);
    if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
        return None;
    }
    Some((days_from_civil(y, m, d), rest))
}

/// `HH:MM[:SS[.fff]](Z|±HH:MM)` → milliseconds since midnight UTC (may be negative
/// or past a day, with the offset applied). `Err` names what is wrong.
fn time_of_day(s: &str) -> Result<i64, &'static str> {
    let bad = "expected HH:MM:SS after the date";
    let (h, rest) = digits(s, 2).ok_or(bad)?;
    let (min, mut rest) = digits(rest.strip_prefix(':').ok_or(bad)?, 2).ok_or(bad)?;
    let mut sec = 0;
    let mut ms = 0i64;
    if let Some(r) = rest.strip_prefix(':') {
        let (s, r) = digits(r, 2).ok_or(bad)?;
        sec = s;
        rest = r;
        if let Some(r) = rest.strip_prefix(['.', ',']) {
            let n = r.bytes().take_while(u8::is_ascii_digit).count();
            if n == 0 {
                return Err("expected digits after the decimal point");
            }
            let frac = &r[..n];
            // Milliseconds: the first three digits, padded.
            let mut first3: String = frac.chars().take(3).collect();
            while first3.len() < 3 {
                first3.push('0');
            }
            ms = first3.parse::<i64>().map_err(|_| bad)?;
            rest = &r[n..];
        }
    }
    if h > 23 || min > 59 || sec > 60 {
        return Err("hour, minute or second out of range");
    }
    let sec = sec.min(59); // a leap second counts as :59
    let offset_ms = match rest {
        "Z" | "z" => 0,
        "" => return Err("add `Z` (UTC) or an offset such as `+02:00`"),
        _ => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return Err("expected `Z` or an offset such as `+02:00`"),
            };
            let r = &rest[1..];
            let (oh, r) = digits(r, 2).ok_or("expected an offset such as `+02:00`")?;
            let (om, r) = digits(r.strip_prefix(':').unwrap_or(r), 2)
                .ok_or("expected an offset such as `+02:00`")?;
            if !r.is_empty() || oh > 23 || om > 59 {
                return Err("expected an offset such as `+02:00`");
            }
            sign * (i64::from(oh) * 3_600_000 + i64::from(om) * 60_000)
        }
    };
    Ok(i64::from(h) * 3_600_000 + i64::from(min) * 60_000 + i64::from(sec) * 1000 + ms - offset_ms)
}

/// A duration such as `90s`, `30m`, `24h`, `7d`, `2w` or `1h30m`, in milliseconds.
fn duration_ms(s: &str) -> Option<u64> {
    let mut total: u64 = 0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        let value: u64 = rest[..n].parse().ok()?;
        let unit_ms: u64 = match rest[n..].chars().next()? {
            's' => 1_000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => DAY_MS,
            'w' => 7 * DAY_MS,
            _ => return None,
        };
        total = total.saturating_add(value.saturating_mul(unit_ms));
        rest = &rest[n + 1..];
    }
    Some(total)
}

/// A report's time bound, as Unix milliseconds, given the time now (`now_ms`, Unix
/// ms). Accepted:
/// - a duration meaning "that long ago": `90s`, `30m`, `24h`, `7d`, `2w`, or a sum such
///   as `1h30m`;
/// - `now`, `today` (UTC midnight today), `yesterday` (UTC midnight yesterday);
/// - a date `YYYY-MM-DD` (UTC midnight);
/// - an RFC 3339 timestamp, `2025-01-31T12:00:00Z` or with an offset
///   (`…T12:00:00.250+02:00`); `T` may be a space, the seconds may be left out, and
///   an offset (or `Z`) is required.
///
/// Times before 1970 are refused. `Err` is a message for the user.
pub fn parse_time_bound(s: &str, now_ms: u64) -> Result<u64, String> {
    let s = s.trim();
    let midnight = now_ms - now_ms % DAY_MS;
    match s {
        "now" => return Ok(now_ms),
        "today" => return Ok(midnight),
        "yesterday" => return Ok(midnight.saturating_sub(DAY_MS)),
        _ => {}
    }
    if let Some(ms) = duration_ms(s) {
        return Ok(now_ms.saturating_sub(ms));
    }
    let hint = "expected a duration (`24h`, `7d`, `30m`, `90s`), `today`, `yesterday`, \
                a date (`2025-01-31`) or an RFC 3339 time (`2025-01-31T12:00:00Z`)";
    let Some((days, rest)) = date_prefix(s) else {
        return Err(format!("cannot read `{s}` as a time: {hint}"));
    };
    let ms = if rest.is_empty() {
        days * DAY_MS as i64
    } else {
        let Some(time) = rest.strip_prefix(['T', 't', ' ']) else {
            return Err(format!("cannot read `{s}` as a time: {hint}"));
        };
        let of_day =
            time_of_day(time).map_err(|why| format!("cannot read `{s}` as a time: {why}"))?;
        days * DAY_MS as i64 + of_day
    };
    u64::try_from(ms).map_err(|_| format!("`{s}` is before 1970"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
    }

    #[test]
    fn durations() {
        assert_eq!(duration_ms("90s"), Some(90_000));
        assert_eq!(duration_ms("1h30m"), Some(5_400_000));
        assert_eq!(duration_ms("2w"), Some(14 * DAY_MS));
        assert_eq!(duration_ms("h"), None);
        assert_eq!(duration_ms("10"), None);
        assert_eq!(duration_ms("10x"), None);
        assert_eq!(duration_ms(""), None);
    }

    #[test]
    fn csv_quotes_when_needed() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
