//! Token counting with tiktoken, used where the gateway must know a prompt's size before
//! sending it (the `tpm_limit` reservation, context windows) and where a provider sends
//! no usage (the figure is then marked estimated). `cl100k_base` is the encoding of
//! OpenAI's GPT-3.5/4 family, `o200k_base` that of GPT-4o and later.
//!
//! Counts follow OpenAI's cookbook recipe ("How to count tokens with tiktoken"): each
//! message costs its content's tokens plus 3 for its framing, and every reply is primed
//! with 3 more. For non-OpenAI models the figure is an estimate.
//!
//! Counting is CPU work in proportion to the text (seconds for megabytes), so the
//! request path never does it on an async worker for more than a small text: the
//! `*_async` counts run larger texts on tokio's blocking pool, at most one per CPU at
//! once ([`count_off_runtime`]), and [`Encoding::prompt_bounds`] gives cheap bounds that
//! often make a count unnecessary (a context-window check). A text longer than
//! [`CHUNK_BYTES`] is counted piece by piece, which bounds the tokenizer's memory (a
//! 20 MB one-word answer took 1 GB counted whole).

use std::sync::{Arc, OnceLock};

use echelon_types::{ChatMessage, EmbeddingInput, InputItem};
use tokio::sync::Semaphore;

/// Tokens of framing per message (`<|start|>{role}\n … <|end|>`).
const PER_MESSAGE: u64 = 3;
/// Tokens priming the reply (`<|start|>assistant<|message|>`).
const REPLY_PRIMING: u64 = 3;

/// Texts up to this many bytes are counted where they are asked for, even on an async
/// worker: a few KiB take tens of microseconds, less than handing them to another
/// thread and back.
pub const INLINE_BYTES: usize = 4 * 1024;

/// Longer texts are counted in pieces of at most this many bytes, cut before a
/// whitespace when there is one near the end (so words stay whole): the count may then
/// differ from a whole-text count by about one token per piece.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// A tiktoken encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// `cl100k_base` (GPT-3.5, GPT-4; the default for unknown models).
    #[default]
    Cl100kBase,
    /// `o200k_base` (GPT-4o, GPT-4.1, o-series, GPT-5).
    O200kBase,
}

impl Encoding {
    /// The encoding OpenAI uses for `upstream_model`, `cl100k_base` when unknown.
    pub fn for_model(upstream_model: &str) -> Encoding {
        let m = upstream_model.to_ascii_lowercase();
        let o200k = [
            "gpt-4o",
            "gpt-4.1",
            "gpt-4.5",
            "gpt-5",
            "o1",
            "o3",
            "o4",
            "chatgpt-4o",
        ];
        if o200k.iter().any(|p| m.starts_with(p)) {
            Encoding::O200kBase
        } else {
            Encoding::Cl100kBase
        }
    }

    fn bpe(self) -> &'static tiktoken_rs::CoreBPE {
        match self {
            Encoding::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
            Encoding::O200kBase => tiktoken_rs::o200k_base_singleton(),
        }
    }

    /// The most bytes one token of this encoding stands for (its longest vocabulary
    /// entry; checked against the vocabularies by a test). A text of `b` bytes therefore
    /// has at least `ceil(b / max_token_bytes)` tokens: every token covers a run of the
    /// text's bytes, the runs do not overlap, and together they cover the text.
    pub fn max_token_bytes(self) -> u64 {
        match self {
            Encoding::Cl100kBase => CL100K_MAX_TOKEN_BYTES,
            Encoding::O200kBase => O200K_MAX_TOKEN_BYTES,
        }
    }

    /// Tokens of a plain text (in pieces of [`CHUNK_BYTES`] when longer). Runs on the
    /// calling thread: see [`count_async`](Self::count_async) in async code.
    pub fn count(self, text: &str) -> u64 {
        let bpe = self.bpe();
        pieces(text)
            .map(|p| bpe.encode_ordinary(p).len() as u64)
            .sum()
    }

    /// Prompt tokens of `messages`, framing included. Runs on the calling thread: see
    /// [`prompt_tokens_async`](Self::prompt_tokens_async) in async code.
    pub fn prompt_tokens(self, messages: &[ChatMessage]) -> u64 {
        Self::framed(messages.iter().map(|m| self.count(&m.text())))
    }

    /// The prompt's per-message counts, framed as the cookbook says.
    fn framed(counts: impl Iterator<Item = u64>) -> u64 {
        counts
            .map(|n| n.saturating_add(PER_MESSAGE))
            .fold(REPLY_PRIMING, u64::saturating_add)
    }

    /// Bounds on [`prompt_tokens`](Self::prompt_tokens) without tokenizing: `lower` from
    /// each message's bytes divided by [`max_token_bytes`](Self::max_token_bytes)
    /// (rounded up), `upper` from its bytes (a token is at least one byte), both with
    /// the framing. (The pieces of a long text are counted apart, which never merges
    /// bytes across a cut, so the bounds hold for them too.)
    pub fn prompt_bounds(self, messages: &[ChatMessage]) -> PromptBounds {
        let max = self.max_token_bytes();
        let (lower, upper) = messages.iter().fold((0u64, 0u64), |(lo, up), m| {
            let bytes = text_bytes(m);
            (
                lo.saturating_add(bytes.div_ceil(max)),
                up.saturating_add(bytes),
            )
        });
        let framing =
            REPLY_PRIMING.saturating_add(PER_MESSAGE.saturating_mul(messages.len() as u64));
        PromptBounds {
            lower: lower.saturating_add(framing),
            upper: upper.saturating_add(framing),
        }
    }

    /// [`count`](Self::count) off the async workers when `text` is longer than
    /// [`INLINE_BYTES`] ([`count_off_runtime`]; the text is copied for the worker only
    /// then).
    pub async fn count_async(self, text: &str) -> u64 {
        if text.len() <= INLINE_BYTES {
            return self.count(text);
        }
        let upper = text.len() as u64;
        let text = text.to_owned();
        count_off_runtime(move || self.count(&text))
            .await
            .unwrap_or(upper)
    }

    /// [`prompt_tokens`](Self::prompt_tokens) off the async workers when the prompt is
    /// longer than [`INLINE_BYTES`] ([`count_off_runtime`]); the texts are copied for
    /// the worker only then.
    pub async fn prompt_tokens_async(self, messages: &[ChatMessage]) -> u64 {
        let bounds = self.prompt_bounds(messages);
        if bounds.upper <= INLINE_BYTES as u64 {
            return self.prompt_tokens(messages);
        }
        let texts: Vec<String> = messages.iter().map(ChatMessage::text).collect();
        count_off_runtime(move || Self::framed(texts.iter().map(|t| self.count(t))))
            .await
            .unwrap_or(bounds.upper)
    }
}

/// The longest `cl100k_base` token, bytes.
const CL100K_MAX_TOKEN_BYTES: u64 = 128;
/// The longest `o200k_base` token, bytes.
const O200K_MAX_TOKEN_BYTES: u64 = 128;

/// Bounds on a prompt's token count ([`Encoding::prompt_bounds`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptBounds {
    /// The count is at least this.
    pub lower: u64,
    /// The count is at most this.
    pub upper: u64,
}

/// The bytes of a message's text, as [`ChatMessage::text`] builds it, without building it.
fn text_bytes(m: &ChatMessage) -> u64 {
    match &m.content {
        serde_json::Value::String(s) => s.len() as u64,
        serde_json::Value::Array(parts) => {
            let texts = parts
                .iter()
                .filter_map(|p| p.get("text").and_then(serde_json::Value::as_str));
            let (n, bytes) = texts.fold((0u64, 0u64), |(n, b), t| (n + 1, b + t.len() as u64));
            // Joined with "\n".
            bytes + n.saturating_sub(1)
        }
        _ => 0,
    }
}

/// `text` in pieces of at most [`CHUNK_BYTES`] (one piece when shorter), each cut at a
/// character boundary, before the last whitespace of its last KiB when there is one.
fn pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() <= CHUNK_BYTES {
            return Some(std::mem::take(&mut rest));
        }
        let mut cut = CHUNK_BYTES;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut window = cut.saturating_sub(1024);
        while !rest.is_char_boundary(window) {
            window -= 1;
        }
        if let Some(ws) = rest[window..cut].rfind(char::is_whitespace)
            && window + ws > 0
        {
            cut = window + ws;
        }
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

/// Runs `count` on tokio's blocking pool, at most one count per CPU at once (a flood of
/// huge prompts queues here rather than taking every blocking thread), and waits for it
/// without holding an async worker. `None` when it could not run to the end (it
/// panicked, or the runtime is shutting down): the caller then uses a bound.
///
/// Needs a tokio runtime (any flavour: a current-thread runtime keeps serving its other
/// tasks meanwhile).
pub async fn count_off_runtime<F, T>(count: F) -> Option<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    static PERMITS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    let permits = PERMITS.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        Arc::new(Semaphore::new(cpus))
    });
    // Never closed, so never an error.
    let permit = permits.clone().acquire_owned().await.ok()?;
    let counted = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        count()
    })
    .await;
    match counted {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!("token count did not finish: {e}");
            None
        }
    }
}

/// Bounds on the tokens of the largest input of an embeddings request, without
/// tokenizing: token ids count exactly, a text `ceil(bytes / max_token_bytes)` to
/// `bytes` (no framing: an input is embedded as it is).
pub fn largest_input_bounds(encoding: Encoding, input: &EmbeddingInput) -> PromptBounds {
    let max = encoding.max_token_bytes();
    input
        .items()
        .map(|item| match item {
            InputItem::Text(t) => PromptBounds {
                lower: (t.len() as u64).div_ceil(max),
                upper: t.len() as u64,
            },
            InputItem::Tokens(ids) => PromptBounds {
                lower: ids.len() as u64,
                upper: ids.len() as u64,
            },
        })
        .fold(PromptBounds { lower: 0, upper: 0 }, |a, b| PromptBounds {
            lower: a.lower.max(b.lower),
            upper: a.upper.max(b.upper),
        })
}

/// The tokens of an embeddings request's inputs: their sum and the largest one's. Token
/// ids count as given; texts are counted with `encoding`, off the async workers when
/// they are longer than [`INLINE_BYTES`] together (copied for the worker only then).
pub async fn input_tokens_async(encoding: Encoding, input: &EmbeddingInput) -> (u64, u64) {
    let add = |(total, largest): (u64, u64), n: u64| (total.saturating_add(n), largest.max(n));
    let text_bytes: usize = input
        .items()
        .map(|i| match i {
            InputItem::Text(t) => t.len(),
            InputItem::Tokens(_) => 0,
        })
        .sum();
    if text_bytes <= INLINE_BYTES {
        return input.items().fold((0, 0), |acc, i| match i {
            InputItem::Text(t) => add(acc, encoding.count(t)),
            InputItem::Tokens(ids) => add(acc, ids.len() as u64),
        });
    }
    let owned = input.clone();
    let upper = input.items().fold((0, 0), |acc, i| match i {
        InputItem::Text(t) => add(acc, t.len() as u64),
        InputItem::Tokens(ids) => add(acc, ids.len() as u64),
    });
    count_off_runtime(move || {
        owned.items().fold((0, 0), |acc, i| match i {
            InputItem::Text(t) => add(acc, encoding.count(t)),
            InputItem::Tokens(ids) => add(acc, ids.len() as u64),
        })
    })
    .await
    .unwrap_or(upper)
}

/// The prompt tokens of `messages` (cl100k_base).
pub fn prompt_tokens(messages: &[ChatMessage]) -> u64 {
    Encoding::Cl100kBase.prompt_tokens(messages)
}

/// The prompt tokens of `messages` in `model`'s encoding, off the async workers when
/// large.
pub(crate) async fn prompt_tokens_for(
    model: &crate::routing::Model,
    messages: &[ChatMessage],
) -> u64 {
    model.encoding().prompt_tokens_async(messages).await
}

/// The tokens of an answer's text in `model`'s encoding, off the async workers when
/// large.
pub(crate) async fn text_tokens_for(model: &crate::routing::Model, text: &str) -> u64 {
    model.encoding().count_async(text).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use echelon_types::Role;

    #[test]
    fn picks_the_encoding_by_model_name() {
        assert_eq!(Encoding::for_model("gpt-4o-mini"), Encoding::O200kBase);
        assert_eq!(Encoding::for_model("gpt-4"), Encoding::Cl100kBase);
        assert_eq!(Encoding::for_model("smollm2"), Encoding::Cl100kBase);
        assert_eq!(Encoding::O200kBase.count("hello world"), 2);
    }

    #[test]
    fn max_token_bytes_bound_the_vocabularies() {
        for enc in [Encoding::Cl100kBase, Encoding::O200kBase] {
            let bpe = enc.bpe();
            let longest = (0..300_000u32)
                .filter_map(|rank| bpe.decode_bytes(&[rank]).ok())
                .map(|b| b.len() as u64)
                .max()
                .unwrap_or(0);
            assert!(longest > 0);
            assert_eq!(enc.max_token_bytes(), longest, "{enc:?}");
        }
    }

    #[test]
    fn bounds_hold_and_long_texts_are_counted_in_pieces() {
        let texts = [
            "hello world".to_owned(),
            "a".repeat(CHUNK_BYTES * 2 + 17),
            "word ".repeat(CHUNK_BYTES / 4),
            "é".repeat(CHUNK_BYTES),
            // 3- and 4-byte characters: the whitespace window starts on a boundary too.
            "中".repeat(CHUNK_BYTES),
            "🦀 ".repeat(CHUNK_BYTES / 3),
            " ".repeat(1000),
            String::new(),
        ];
        for enc in [Encoding::Cl100kBase, Encoding::O200kBase] {
            for t in &texts {
                let pieces: Vec<&str> = pieces(t).collect();
                assert_eq!(pieces.concat(), *t);
                assert!(
                    pieces
                        .iter()
                        .all(|p| p.len() <= CHUNK_BYTES && !p.is_empty())
                );
                let msgs = [ChatMessage::new(Role::User, t.as_str())];
                let b = enc.prompt_bounds(&msgs);
                let n = enc.prompt_tokens(&msgs);
                assert!(
                    b.lower <= n && n <= b.upper,
                    "{enc:?} {} bytes: {b:?} {n}",
                    t.len()
                );
            }
        }
        // Words are not cut: the piecewise count of a long text of words is the whole count.
        let words = "word ".repeat(CHUNK_BYTES / 2);
        let whole = Encoding::Cl100kBase.bpe().encode_ordinary(&words).len() as u64;
        assert_eq!(Encoding::Cl100kBase.count(&words), whole);
    }

    #[test]
    fn content_parts_are_measured_as_joined() {
        let msg: ChatMessage = serde_json::from_value(serde_json::json!({
            "role": "user",
            "content": [{"type": "text", "text": "ab"}, {"type": "image_url"}, {"type": "text", "text": "cde"}]
        }))
        .unwrap_or_else(|_| ChatMessage::new(Role::User, ""));
        assert_eq!(text_bytes(&msg), msg.text().len() as u64);
        assert_eq!(msg.text(), "ab\ncde");
    }

    #[test]
    fn async_counts_agree_with_the_blocking_ones_on_a_current_thread_runtime() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let big = "lorem ipsum ".repeat(INLINE_BYTES);
        let msgs = [ChatMessage::new(Role::User, big.as_str())];
        let (a, b) = rt.block_on(async {
            (
                Encoding::Cl100kBase.prompt_tokens_async(&msgs).await,
                Encoding::Cl100kBase.count_async(&big).await,
            )
        });
        assert_eq!(a, prompt_tokens(&msgs));
        assert_eq!(b, Encoding::Cl100kBase.count(&big));
    }

    #[test]
    fn counts_content_plus_framing() {
        // "hello world" is 2 tokens in cl100k_base.
        let one = [ChatMessage::new(Role::User, "hello world")];
        assert_eq!(prompt_tokens(&one), 2 + PER_MESSAGE + REPLY_PRIMING);
        let two = [
            ChatMessage::new(Role::System, "hello world"),
            ChatMessage::new(Role::User, "hello world"),
        ];
        assert_eq!(prompt_tokens(&two), 2 * (2 + PER_MESSAGE) + REPLY_PRIMING);
    }
}
