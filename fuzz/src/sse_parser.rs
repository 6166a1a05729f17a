//! `sse_parser`: any bytes as the body of a streamed chat completion, split into
//! pieces at arbitrary points, through [`ChunkStream::from_sse_bytes`] (eventsource-stream,
//! the chunk JSON parsing and its checks) and then the usage accounting a finished stream
//! does (the provider's `usage` priced, or the text counted with tiktoken).
//!
//! Properties: no panic; a stream ends once (after `None` or an error, `next` is `None`);
//! for a valid UTF-8 body, the chunks and the way the stream ends do not depend on
//! where the body was split; a priced usage is a finite, non-negative amount.

use std::time::Duration;

use bytes::Bytes;
use echelon::provider::{ChunkStream, ErrorKind, Timeouts};
use echelon::tokens::Encoding;
use echelon::usage::pricing::Price;
use echelon_types::ChatCompletionChunk;

/// Long enough never to fire: every piece is ready at once.
const PATIENCE: Duration = Duration::from_secs(3600);

const TIMEOUTS: Timeouts = Timeouts {
    connect: PATIENCE,
    total: PATIENCE,
    first_token: PATIENCE,
    chunk_gap: PATIENCE,
};

/// What a stream body decodes to.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The chunks, in order.
    pub chunks: Vec<ChatCompletionChunk>,
    /// How the stream ended: `None` complete (`[DONE]` or a clean end after a finish
    /// reason), else the kind of error that ended it.
    pub error: Option<ErrorKind>,
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("no Tokio runtime: {e}"),
    };
}

/// Decodes a body that arrives as `pieces`, in order.
///
/// # Panics
/// When decoding panics, or a stream yields anything after its end.
pub fn decode(pieces: Vec<Vec<u8>>) -> Decoded {
    RUNTIME.with(|rt| {
        rt.block_on(async move {
            let bytes = futures::stream::iter(pieces.into_iter().map(|p| Ok(Bytes::from(p))));
            let mut stream = ChunkStream::from_sse_bytes(bytes, TIMEOUTS);
            let mut chunks = Vec::new();
            let error = loop {
                match stream.next().await {
                    None => break None,
                    Some(Ok(chunk)) => chunks.push(chunk),
                    Some(Err(e)) => break Some(e.kind),
                }
            };
            assert!(
                stream.next().await.is_none(),
                "a chunk stream went on after its end"
            );
            Decoded { chunks, error }
        })
    })
}

/// `data` cut before each offset in `cuts` (offsets past the end or out of order are
/// skipped; empty pieces are kept, as a transport may deliver them).
pub fn split_at(data: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut pieces = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for &cut in cuts {
        if cut >= start && cut <= data.len() {
            pieces.push(data[start..cut].to_vec());
            start = cut;
        }
    }
    pieces.push(data[start..].to_vec());
    pieces
}

/// Cut points drawn from `data` itself (FNV-1a seeding an xorshift), so that a fuzzer
/// mutating the body also moves them, and a replayed input is cut the same way.
fn cuts_for(data: &[u8]) -> Vec<usize> {
    let mut state = data.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) | 1;
    let mut cuts = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        at += 1 + (state % 24) as usize;
        cuts.push(at.min(data.len()));
    }
    cuts
}

/// What a finished stream is accounted as, the way the gateway does it: the last
/// `usage` the provider sent, priced (cached prompt tokens from
/// `prompt_tokens_details.cached_tokens`), or else the streamed text counted.
fn account(decoded: &Decoded) {
    let mut text = String::new();
    let mut usage = None;
    for chunk in &decoded.chunks {
        for choice in &chunk.choices {
            if let Some(t) = &choice.delta.content {
                text.push_str(t);
            }
        }
        if let Some(u) = &chunk.usage {
            usage = Some(u);
        }
    }
    let Some(usage) = usage else {
        Encoding::Cl100kBase.count(&text);
        return;
    };
    let cached = usage
        .extra
        .get("prompt_tokens_details")
        .and_then(|d| d.get("cached_tokens"))
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let price = Price {
        input_per_1m: 2.5,
        output_per_1m: 10.0,
        cached_input_per_1m: Some(1.25),
        cache_write_per_1m: None,
    };
    let usd = price.cost_usd(usage.prompt_tokens, usage.completion_tokens, cached);
    assert!(
        usd.is_finite() && usd >= 0.0,
        "usage {usage:?} priced at {usd} USD"
    );
}

/// Decodes `data` whole, one byte at a time, and cut at points drawn from it; checks
/// the three agree (for a valid UTF-8 body) and accounts for the result.
///
/// # Panics
/// When a property in the module documentation fails.
pub fn check(data: &[u8]) {
    let whole = decode(vec![data.to_vec()]);
    let cut = decode(split_at(data, &cuts_for(data)));
    let bytewise = decode(data.iter().map(|&b| vec![b]).collect());
    if std::str::from_utf8(data).is_ok() {
        assert_eq!(cut, whole, "cutting the body changed what it decodes to");
        assert_eq!(
            bytewise, whole,
            "feeding the body byte by byte changed what it decodes to"
        );
    }
    account(&whole);
}
