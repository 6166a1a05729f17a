//! Where the bindings' finished requests go: the ledger writer (as `echelon serve`) and a
//! per-route tally that `llm.get_usage_summary()` reads, built from the same records, so
//! the summary and the ledger's rows agree.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use echelon::usage::RecordSink;
use echelon::usage::ledger::LedgerSender;
use echelon::usage::record::RequestRecord;
use serde_json::{Value, json};

/// Token and cost totals of a set of requests.
#[derive(Debug, Clone, Default)]
struct Totals {
    requests: u64,
    failed: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    cached_tokens: u64,
    cost_usd: f64,
}

impl Totals {
    fn add(&mut self, r: &RequestRecord) {
        self.requests += 1;
        if r.status >= 400 {
            self.failed += 1;
        }
        self.prompt_tokens += r.prompt_tokens;
        self.completion_tokens += r.completion_tokens;
        self.cached_tokens += r.cached_tokens;
        self.cost_usd += r.cost_usd;
    }
}

/// One route's totals, overall and by answering model.
#[derive(Debug, Clone, Default)]
struct RouteUsage {
    all: Totals,
    by_model: BTreeMap<String, Totals>,
}

/// The record sink of a Python gateway: tallies each record by route, then hands it to
/// the ledger writer (when the config keeps a ledger).
#[derive(Debug, Default)]
pub(crate) struct TeeSink {
    /// Taken out by `Gateway.close()`: the writer then flushes and exits.
    ledger: Mutex<Option<LedgerSender>>,
    tally: Mutex<HashMap<String, RouteUsage>>,
}

impl TeeSink {
    /// A sink over the ledger's sender (`None`: no ledger, the tally only).
    pub(crate) fn new(ledger: Option<LedgerSender>) -> TeeSink {
        TeeSink {
            ledger: Mutex::new(ledger),
            tally: Mutex::new(HashMap::new()),
        }
    }

    /// Stops forwarding to the ledger (records after this are tallied only).
    pub(crate) fn close_ledger(&self) {
        if let Ok(mut g) = self.ledger.lock() {
            g.take();
        }
    }

    /// The usage summary of `route` (seed 000's `get_usage_summary`): `total_cost` (USD),
    /// `total_tokens`, `prompt_tokens`, `completion_tokens`, `cached_tokens`, `requests`
    /// (answered or not), `failed_requests`, and `by_model` (the same per answering model).
    pub(crate) fn summary(&self, route: &str) -> Value {
        let usage = self
            .tally
            .lock()
            .ok()
            .and_then(|t| t.get(route).cloned())
            .unwrap_or_default();
        let totals = |t: &Totals| {
            json!({
                "total_cost": t.cost_usd,
                "total_tokens": t.prompt_tokens + t.completion_tokens,
                "prompt_tokens": t.prompt_tokens,
                "completion_tokens": t.completion_tokens,
                "cached_tokens": t.cached_tokens,
                "requests": t.requests,
                "failed_requests": t.failed,
            })
        };
        let mut out = totals(&usage.all);
        let by_model: serde_json::Map<String, Value> = usage
            .by_model
            .iter()
            .map(|(m, t)| (m.clone(), totals(t)))
            .collect();
        if let Value::Object(map) = &mut out {
            map.insert("by_model".to_owned(), Value::Object(by_model));
        }
        out
    }
}

impl RecordSink for TeeSink {
    fn send(&self, record: RequestRecord) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        if let Ok(mut tally) = self.tally.lock() {
            let usage = tally.entry(record.route.clone()).or_default();
            usage.all.add(&record);
            if let Some(model) = &record.model {
                usage
                    .by_model
                    .entry(model.clone())
                    .or_default()
                    .add(&record);
            }
        }
        let sender = self.ledger.lock().ok().and_then(|g| g.clone());
        Box::pin(async move {
            if let Some(sender) = sender {
                sender.send(record).await;
            }
        })
    }

    fn queue_depth(&self) -> usize {
        self.ledger
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(LedgerSender::queue_depth))
            .unwrap_or(0)
    }
}
