//! [`Judge::run_file`]: JSONL in, JSONL out, streamed, resumable.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::fs::{File, OpenOptions};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::task::JoinSet;

use super::item::{ItemId, JudgeItem};
use super::options::{JudgeMode, Preference};
use super::output::{Judgement, NO_QUORUM, UNPARSED};
use super::seen::{Seen, SeenIds};
use super::{Judge, JudgeError};

/// [`RunSummary::bad_lines`] keeps this many bad lines (all are counted).
pub const MAX_BAD_LINES_KEPT: usize = 1000;

/// [`ErrorTally::ids`] keeps this many ids per kind (all are counted).
pub const MAX_ERROR_IDS_KEPT: usize = 1000;

/// The items of one kind of error ([`RunSummary::errors`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ErrorTally {
    /// Items with it.
    pub count: u64,
    /// Their ids (string form), the first [`MAX_ERROR_IDS_KEPT`].
    pub ids: Vec<String>,
    /// The first full error text of the kind (a failed call's message).
    pub example: String,
}

/// An input line that is not an item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    /// 1-based line number in the input.
    pub line: u64,
    /// Why it was skipped (invalid JSON, a missing or mistyped field, a duplicate id).
    pub reason: String,
}

/// Where a run is, passed to the progress callback after every input line that is not
/// sent to the judge (bad, blank or already done) and every item that completes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// Input lines read so far (blank and bad lines included).
    pub lines: u64,
    /// Items judged and written in this run.
    pub done: u64,
    /// Of `done`: with an error (`unparsed` included).
    pub errors: u64,
    /// Of `done`: served from the cache.
    pub cached: u64,
    /// Bad input lines so far.
    pub bad_lines: u64,
    /// Items skipped because the output already had their id (resume).
    pub skipped: u64,
    /// Items being judged now.
    pub in_flight: usize,
    /// USD spent on judge calls in this run (cache hits cost nothing).
    pub cost_usd: f64,
    /// Time since the run started.
    pub elapsed: Duration,
    /// The bad line that triggered this call, if that is why it was called.
    pub last_bad_line: Option<BadLine>,
}

/// What a finished [`Judge::run_file`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunSummary {
    /// Input lines read (blank and bad lines included).
    pub lines: u64,
    /// Lines already in the output when the run started.
    pub resumed: u64,
    /// Whether a trailing partial line (an interrupted write) was cut off the output.
    pub truncated_partial_line: bool,
    /// Input items skipped because their id was already in the output.
    pub skipped: u64,
    /// Items judged and written in this run.
    pub judged: u64,
    /// Of `judged`: with a score.
    pub scored: u64,
    /// Of `scored`: served from the cache.
    pub cached: u64,
    /// Of `judged`: the judge answered, but no verdict could be read (`unparsed`), or
    /// too few samples gave one (`no_quorum`).
    pub unparsed: u64,
    /// Of `judged`: a judge call failed, an internal error, or an inconsistent pair
    /// (`inconsistent: error`).
    pub failed: u64,
    /// Of `judged`: items that needed a length re-ask.
    pub length_reasked: u64,
    /// Every error line by kind ([`Judgement::error_kind`]: `unparsed`, `no_quorum`,
    /// `inconsistent`, `internal`, or a failed call's status), sorted by kind.
    pub errors: std::collections::BTreeMap<String, ErrorTally>,
    /// Standard deviation (population) of the scores of `scored`.
    pub score_stdev: Option<f64>,
    /// Pairwise: decided items preferring A, B, and ties.
    pub preferences: [u64; 3],
    /// Ideal wall time over the real one: the judge calls' summed time divided by the
    /// concurrency, over the wall time (1.0 = the concurrency was kept full all along).
    pub efficiency: Option<f64>,
    /// The concurrency of the run.
    pub concurrency: usize,
    /// Of `judged`: items that needed at least one re-ask.
    pub reasked: u64,
    /// Bad input lines, counted.
    pub bad_line_count: u64,
    /// Bad input lines, the first [`MAX_BAD_LINES_KEPT`].
    pub bad_lines: Vec<BadLine>,
    /// `unparsed / (scored + unparsed)`; 0 when both are 0.
    pub parse_failure_rate: f64,
    /// Mean score of `scored`.
    pub mean_score: Option<f64>,
    /// Mean reward of `scored`.
    pub mean_reward: Option<f64>,
    /// USD spent on judge calls in this run.
    pub total_cost: f64,
    /// Wall time of the run.
    pub wall_time: Duration,
}

impl RunSummary {
    /// The summary as JSON (`--summary-json`): every field, durations in milliseconds
    /// (`wall_ms`), `errors` as `{kind: {count, ids, example}}`, `preferences` as
    /// `{A, B, tie}`.
    pub fn to_json(&self) -> serde_json::Value {
        let errors: serde_json::Map<String, serde_json::Value> = self
            .errors
            .iter()
            .map(|(k, e)| {
                (
                    k.clone(),
                    serde_json::json!({"count": e.count, "ids": e.ids, "example": e.example}),
                )
            })
            .collect();
        let bad: Vec<serde_json::Value> = self
            .bad_lines
            .iter()
            .map(|b| serde_json::json!({"line": b.line, "reason": b.reason}))
            .collect();
        let finite = |x: Option<f64>| x.filter(|v| v.is_finite());
        serde_json::json!({
            "lines": self.lines,
            "resumed": self.resumed,
            "truncated_partial_line": self.truncated_partial_line,
            "skipped": self.skipped,
            "judged": self.judged,
            "scored": self.scored,
            "cached": self.cached,
            "unparsed": self.unparsed,
            "failed": self.failed,
            "reasked": self.reasked,
            "length_reasked": self.length_reasked,
            "errors": errors,
            "bad_line_count": self.bad_line_count,
            "bad_lines": bad,
            "parse_failure_rate": self.parse_failure_rate,
            "mean_score": finite(self.mean_score),
            "score_stdev": finite(self.score_stdev),
            "mean_reward": finite(self.mean_reward),
            "preferences": {"A": self.preferences[0], "B": self.preferences[1], "tie": self.preferences[2]},
            "total_cost": self.total_cost,
            "concurrency": self.concurrency,
            "efficiency": finite(self.efficiency),
            "wall_ms": u64::try_from(self.wall_time.as_millis()).unwrap_or(u64::MAX),
        })
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> JudgeError + '_ {
    move |source| JudgeError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Deserialize)]
struct IdOnly {
    id: serde_json::Value,
}

/// The ids of an existing output file; cuts off a trailing partial line.
async fn resume(path: &Path, seen: &mut SeenIds) -> Result<(u64, bool), JudgeError> {
    let file = match OpenOptions::new().read(true).write(true).open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok((0, false)),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut buf = Vec::new();
    let mut complete_end: u64 = 0;
    let mut line_no: u64 = 0;
    let mut count: u64 = 0;
    let mut partial = false;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .await
            .map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        if buf.last() != Some(&b'\n') {
            partial = true;
            break;
        }
        line_no += 1;
        complete_end += n as u64;
        let text = String::from_utf8_lossy(&buf);
        if text.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| JudgeError::Resume {
            path: path.to_owned(),
            line: line_no,
            reason,
        };
        let line: IdOnly =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a judgement line ({e})")))?;
        let id = ItemId::from_json(line.id)
            .ok_or_else(|| bad("its `id` is not a string or a number".to_owned()))?;
        seen.insert(&id.key(), Seen::Output)?;
        count += 1;
    }
    if partial {
        let file = reader.into_inner();
        file.set_len(complete_end).await.map_err(io_err(path))?;
        file.sync_all().await.map_err(io_err(path))?;
        tracing::info!(path = %path.display(), "cut off a partial last line of the output");
    }
    Ok((count, partial))
}

/// Appends the lines of completed items (each ends with `\n`) in one `write_all` to the
/// file (no user-space buffer, so nothing is held back), then flushes. A kill can leave at
/// most the last line partial, which [`resume`] cuts off and redoes.
///
/// A plain blocking write on purpose: writing to the page cache takes microseconds, while
/// handing each write to tokio's blocking pool (as `tokio::fs` does) cost a thread
/// hand-off per item and a tenth of the batch's wall time.
fn append(
    out: &mut std::fs::File,
    lines: &[(Judgement, String)],
    path: &Path,
) -> Result<(), JudgeError> {
    use std::io::Write;
    if let [(_, line)] = lines {
        out.write_all(line.as_bytes()).map_err(io_err(path))?;
    } else {
        let joined: String = lines.iter().map(|(_, line)| line.as_str()).collect();
        out.write_all(joined.as_bytes()).map_err(io_err(path))?;
    }
    out.flush().map_err(io_err(path))
}

/// Running totals of a run.
struct Tally {
    progress: Progress,
    summary: RunSummary,
    score_sum: f64,
    score_sq_sum: f64,
    reward_sum: f64,
    busy_ms: u64,
    started: Instant,
}

impl Tally {
    fn bad_line(&mut self, line: u64, reason: String) {
        tracing::warn!(line, %reason, "judge: bad input line");
        let bad = BadLine { line, reason };
        self.summary.bad_line_count += 1;
        if self.summary.bad_lines.len() < MAX_BAD_LINES_KEPT {
            self.summary.bad_lines.push(bad.clone());
        }
        self.progress.bad_lines += 1;
        self.progress.last_bad_line = Some(bad);
    }

    fn judged(&mut self, j: &Judgement) {
        let s = &mut self.summary;
        s.judged += 1;
        s.total_cost += j.cost;
        if j.reasks > 0 {
            s.reasked += 1;
        }
        if j.length_reasks > 0 {
            s.length_reasked += 1;
        }
        self.busy_ms = self.busy_ms.saturating_add(j.busy_ms);
        if j.is_scored() {
            s.scored += 1;
            if let Some(score) = j.score {
                self.score_sum += score;
                self.score_sq_sum += score * score;
                self.reward_sum += j.reward.unwrap_or(score);
            }
            if let Some(p) = j.pairwise.as_ref().and_then(|p| p.preference) {
                let slot = match p {
                    Preference::A => 0,
                    Preference::B => 1,
                    Preference::Tie => 2,
                };
                s.preferences[slot] += 1;
            }
            if j.cached {
                s.cached += 1;
            }
        } else if matches!(j.error.as_deref(), Some(UNPARSED | NO_QUORUM)) {
            s.unparsed += 1;
        } else {
            s.failed += 1;
        }
        if let Some(kind) = j.error_kind() {
            let e = s.errors.entry(kind.to_owned()).or_default();
            e.count += 1;
            if e.ids.len() < MAX_ERROR_IDS_KEPT {
                e.ids.push(j.id.key());
            }
            if e.example.is_empty() {
                e.example = j.error.clone().unwrap_or_default();
            }
        }
        let p = &mut self.progress;
        p.done += 1;
        p.cost_usd += j.cost;
        if j.error.is_some() {
            p.errors += 1;
        }
        if j.cached {
            p.cached += 1;
        }
    }

    fn report(&mut self, in_flight: usize, progress: &(dyn Fn(&Progress) + Sync)) {
        self.progress.in_flight = in_flight;
        self.progress.elapsed = self.started.elapsed();
        progress(&self.progress);
        self.progress.last_bad_line = None;
    }

    fn finish(mut self) -> RunSummary {
        let s = &mut self.summary;
        s.lines = self.progress.lines;
        s.skipped = self.progress.skipped;
        let read = s.scored + s.unparsed;
        s.parse_failure_rate = if read == 0 {
            0.0
        } else {
            s.unparsed as f64 / read as f64
        };
        let with_score = s.scored - s.preferences.iter().sum::<u64>();
        if with_score > 0 {
            let n = with_score as f64;
            let mean = self.score_sum / n;
            s.mean_score = Some(mean);
            s.mean_reward = Some(self.reward_sum / n);
            s.score_stdev = Some((self.score_sq_sum / n - mean * mean).max(0.0).sqrt());
        }
        s.wall_time = self.started.elapsed();
        let wall_ms = s.wall_time.as_secs_f64() * 1000.0;
        if s.judged > 0 && wall_ms > 0.0 && s.concurrency > 0 {
            s.efficiency = Some(self.busy_ms as f64 / s.concurrency as f64 / wall_ms);
        }
        self.summary
    }
}

/// An input line, classified.
enum Line {
    Blank,
    Bad(String),
    Item(JudgeItem),
}

fn classify(bytes: &[u8], mode: JudgeMode) -> Line {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Line::Bad("not valid UTF-8".to_owned());
    };
    let text = text.trim_end_matches(['\n', '\r']);
    if text.trim().is_empty() {
        return Line::Blank;
    }
    let parsed = match mode {
        JudgeMode::Pointwise => JudgeItem::from_json_line(text),
        JudgeMode::Pairwise => JudgeItem::from_json_line_pairwise(text),
    };
    match parsed {
        Ok(item) => Line::Item(item),
        Err(reason) => Line::Bad(reason),
    }
}

impl Judge {
    /// Judges a JSONL file into a JSONL file; see the [module docs](super).
    ///
    /// - Resume: the output file is read first; a trailing partial line (an interrupted
    ///   write) is cut off, and every id it holds is skipped. New lines are appended.
    /// - Input lines are read lazily; a bad line (invalid JSON or UTF-8, a missing or
    ///   mistyped `id`/`prompt`/`response`, an id seen earlier in the input) is reported
    ///   with its 1-based number and skipped; blank lines are ignored.
    /// - At most `concurrency` items are in flight; each result is appended (one write of
    ///   the line and its newline, then a flush) as soon as it completes, so output order
    ///   may differ from input order.
    /// - `progress` is called after every completed item and every input line that is not
    ///   judged.
    ///
    /// Must be called within a tokio runtime (items are judged on spawned tasks). Dropping
    /// the future cancels the items in flight; their lines are not written, so a re-run
    /// judges them.
    ///
    /// # Errors
    /// The input cannot be read, the output cannot be read or written, or the output
    /// has a complete line that is not a judgement line (it is then left untouched).
    pub async fn run_file(
        &self,
        input: &Path,
        output: &Path,
        progress: &(dyn Fn(&Progress) + Sync),
    ) -> Result<RunSummary, JudgeError> {
        let started = Instant::now();
        let mut seen = SeenIds::new();
        let input_file = File::open(input).await.map_err(io_err(input))?;
        let (resumed, truncated) = resume(output, &mut seen).await?;
        let mut reader = BufReader::with_capacity(1 << 16, input_file);
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(output)
            .map_err(io_err(output))?;
        let output: PathBuf = output.to_owned();

        let mut tally = Tally {
            progress: Progress::default(),
            summary: RunSummary {
                resumed,
                truncated_partial_line: truncated,
                concurrency: self.inner.config.concurrency,
                ..RunSummary::default()
            },
            score_sum: 0.0,
            score_sq_sum: 0.0,
            reward_sum: 0.0,
            busy_ms: 0,
            started,
        };
        let concurrency = self.inner.config.concurrency;
        // Each task also renders its output line, so that work is spread over the
        // runtime's workers instead of queueing on this loop.
        let mut tasks: JoinSet<(Judgement, String)> = JoinSet::new();
        let mut completed: Vec<(Judgement, String)> = Vec::new();
        let mut buf = Vec::new();
        let mut line_no: u64 = 0;
        let mut eof = false;
        let mut started_items: u64 = 0;
        let max_items = self.inner.config.max_items.unwrap_or(u64::MAX);
        loop {
            while !eof && tasks.len() < concurrency {
                if started_items >= max_items {
                    eof = true;
                    break;
                }
                buf.clear();
                let n = reader
                    .read_until(b'\n', &mut buf)
                    .await
                    .map_err(io_err(input))?;
                if n == 0 {
                    eof = true;
                    break;
                }
                line_no += 1;
                tally.progress.lines += 1;
                let item = match classify(&buf, self.inner.config.mode) {
                    Line::Blank => continue,
                    Line::Bad(reason) => {
                        tally.bad_line(line_no, reason);
                        tally.report(tasks.len(), progress);
                        continue;
                    }
                    Line::Item(item) => item,
                };
                match seen.insert(&item.id.key(), Seen::Line(line_no))? {
                    None => {}
                    Some(Seen::Output) => {
                        tally.progress.skipped += 1;
                        tally.report(tasks.len(), progress);
                        continue;
                    }
                    Some(Seen::Line(first)) => {
                        let reason = format!("duplicate id `{}` (first on line {first})", item.id);
                        tally.bad_line(line_no, reason);
                        tally.report(tasks.len(), progress);
                        continue;
                    }
                }
                let inner = Arc::clone(&self.inner);
                started_items += 1;
                tasks.spawn(async move {
                    let j = inner.judge_owned(item).await;
                    let mut line = j.to_line();
                    line.push('\n');
                    (j, line)
                });
            }
            // Lines of the items that completed are written after the refill above, so
            // the next items are already on their way while this thread writes.
            if !completed.is_empty() {
                append(&mut out, &completed, &output)?;
                for (j, _) in completed.drain(..) {
                    tally.judged(&j);
                    tally.report(tasks.len(), progress);
                }
            }
            let Some(joined) = tasks.join_next().await else {
                break;
            };
            let mut take = |joined: Result<(Judgement, String), tokio::task::JoinError>| {
                match joined {
                    Ok(done) => completed.push(done),
                    // Only a runtime shutting down gets here (panics become error lines);
                    // the item is not written, so a re-run judges it.
                    Err(e) => tracing::error!(error = %e, "judge task lost"),
                }
            };
            take(joined);
            // Everything else that has completed too: one write for the lot.
            while let Some(joined) = tasks.try_join_next() {
                take(joined);
            }
        }
        Ok(tally.finish())
    }
}

/// Counts the non-blank lines of a file (for a progress bar's total), reading it once.
///
/// # Errors
/// The file cannot be read.
pub async fn count_lines(path: &Path) -> Result<u64, JudgeError> {
    let file = File::open(path).await.map_err(io_err(path))?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut buf = Vec::new();
    let mut count = 0;
    loop {
        buf.clear();
        if reader
            .read_until(b'\n', &mut buf)
            .await
            .map_err(io_err(path))?
            == 0
        {
            return Ok(count);
        }
        if !buf.iter().all(u8::is_ascii_whitespace) {
            count += 1;
        }
    }
}
