//! Usage and cost: what each request consumed, priced, and kept in a ledger and in
//! metrics (seed 000 tracks tokens and cost per model; seed 002 asks for fallback rates).
//!
//! The router builds one [`record::RequestRecord`] per request, with every attempt; the
//! metrics facade observes it and the configured [`RecordSink`] (the SQLite ledger's
//! writer) receives it off the request path.

pub mod ledger;
pub mod metrics;
pub mod pricing;
pub mod record;
pub mod report;

use std::future::Future;
use std::pin::Pin;

use echelon_types::{Attempt, ChatCompletionRequest, Usage};
use tokio::time::Instant;

use self::record::{AttemptRecord, Endpoint, RequestRecord};
use crate::routing::Model;

/// Where finished requests go (the ledger writer). `send` may wait when the sink is
/// full: a full queue slows intake rather than dropping rows.
pub trait RecordSink: Send + Sync + 'static {
    /// Hands one record over.
    fn send(&self, record: RequestRecord) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;

    /// Records waiting to be written (for the `echelon_ledger_queue_depth` metric).
    fn queue_depth(&self) -> usize {
        0
    }
}

impl RecordSink for ledger::LedgerSender {
    fn send(&self, record: RequestRecord) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(ledger::LedgerSender::send(self, record))
    }

    fn queue_depth(&self) -> usize {
        ledger::LedgerSender::queue_depth(self)
    }
}

/// Token counts of the answering attempt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TokenCount {
    pub(crate) prompt: u64,
    pub(crate) completion: u64,
    /// Prompt tokens served from the provider's cache (`prompt_tokens_details.cached_tokens`).
    pub(crate) cached: u64,
    /// Prompt tokens written to the provider's cache (Anthropic's
    /// `cache_creation_input_tokens`, as the Anthropic wire puts it in `usage`).
    pub(crate) cache_write: u64,
    /// Counted locally because the provider sent no usage.
    pub(crate) estimated: bool,
}

impl TokenCount {
    /// From a provider's `usage`.
    pub(crate) fn from_usage(u: &Usage) -> Self {
        let cached = u
            .extra
            .get("prompt_tokens_details")
            .and_then(|d| d.get("cached_tokens"))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        let cache_write = u
            .extra
            .get("cache_creation_input_tokens")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        TokenCount {
            prompt: u.prompt_tokens,
            completion: u.completion_tokens,
            cached,
            cache_write,
            estimated: false,
        }
    }

    /// Counted with tiktoken (off the async workers when large): the request's prompt
    /// and the answer's text.
    pub(crate) async fn estimate(model: &Model, req: &ChatCompletionRequest, answer: &str) -> Self {
        TokenCount {
            prompt: crate::tokens::prompt_tokens_for(model, &req.messages).await,
            completion: crate::tokens::text_tokens_for(model, answer).await,
            cached: 0,
            cache_write: 0,
            estimated: true,
        }
    }
}

/// What is known about a request when it arrives.
#[derive(Debug, Clone)]
pub(crate) struct RequestMeta {
    pub(crate) request_id: String,
    pub(crate) route: String,
    pub(crate) started: Instant,
    pub(crate) started_unix_ms: u64,
    pub(crate) stream: bool,
    pub(crate) endpoint: Endpoint,
}

impl RequestMeta {
    pub(crate) fn new(
        request_id: Option<&str>,
        route: &str,
        stream: bool,
        endpoint: Endpoint,
    ) -> Self {
        RequestMeta {
            request_id: request_id.map_or_else(new_request_id, str::to_owned),
            // An unknown route is the client's `model` as sent: stored bounded.
            route: echelon_types::bounded_name(route).into_owned(),
            started: Instant::now(),
            started_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            stream,
            endpoint,
        }
    }

    /// The record of this request: `model` answered (or none did) with `tokens` on its
    /// last attempt; earlier attempts consumed nothing.
    pub(crate) fn record(
        &self,
        model: Option<&Model>,
        status: u16,
        attempts: &[Attempt],
        tokens: TokenCount,
        ttft_ms: Option<u64>,
    ) -> RequestRecord {
        let cost = model.map_or(0.0, |m| {
            m.cost_usd_with_cache_write(
                tokens.prompt,
                tokens.completion,
                tokens.cached,
                tokens.cache_write,
            )
        });
        let last = attempts.len().saturating_sub(1);
        let attempts: Vec<AttemptRecord> = attempts
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let consumed = model.is_some() && i == last;
                AttemptRecord {
                    model: a.model.clone(),
                    provider: a.provider.clone(),
                    key_id: a.key_id.clone(),
                    status: a.status,
                    outcome: a.outcome,
                    latency_ms: a.latency_ms,
                    prompt_tokens: if consumed { tokens.prompt } else { 0 },
                    completion_tokens: if consumed { tokens.completion } else { 0 },
                    cost_usd: if consumed { cost } else { 0.0 },
                    estimated: consumed && tokens.estimated,
                }
            })
            .collect();
        let fallback = attempts.windows(2).any(|w| w[0].model != w[1].model);
        RequestRecord {
            request_id: self.request_id.clone(),
            started_at_unix_ms: self.started_unix_ms,
            route: self.route.clone(),
            model: model.map(|m| m.id().to_owned()),
            provider: model.map(|m| m.provider().to_owned()),
            status,
            stream: self.stream,
            endpoint: self.endpoint,
            latency_ms: self.started.elapsed().as_millis() as u64,
            ttft_ms,
            prompt_tokens: tokens.prompt,
            completion_tokens: tokens.completion,
            cached_tokens: tokens.cached,
            cache_write_tokens: tokens.cache_write,
            cost_usd: cost,
            estimated: tokens.estimated,
            fallback,
            no_finish_reason: false,
            stream_anomalies: 0,
            attempts,
        }
    }
}

/// A new request id: 16 hex digits from the clock and a process-wide counter, unique
/// within a process and unlikely to repeat across replicas.
pub fn new_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mixed = (t ^ n.rotate_left(40)).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n;
    format!("{mixed:016x}")
}
