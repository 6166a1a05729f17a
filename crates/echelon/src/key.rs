//! API keys, their short public ids, and the [`Redactor`] that replaces them (and
//! anything shaped like a key) in upstream text.

use std::sync::{Arc, Mutex, PoisonError};
use tokio::time::Instant;

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// An upstream API key with the short id that stands for it in logs, errors and metrics.
///
/// The id is the first 4 bytes of the key's SHA-256, in hex (DESIGN.md §4 "Secrets"):
/// stable across restarts and replicas, and useless for recovering the key.
#[derive(Clone)]
pub struct ApiKey {
    secret: SecretString,
    id: String,
    /// What the provider's rate-limit headers last said about this key (shared by the
    /// clones of the key: the pool's and the leases').
    limits: Arc<Mutex<Option<(RateLimits, Instant)>>>,
}

impl ApiKey {
    /// Wraps a key and computes its id.
    pub fn new(secret: SecretString) -> Self {
        let id = key_id(secret.expose_secret());
        ApiKey {
            secret,
            id,
            limits: Arc::default(),
        }
    }

    /// Records the rate-limit headers of a provider's response to a request made with
    /// this key ([`RateLimits::from_headers`]); a response without any keeps what an
    /// earlier one said.
    pub fn observe(&self, headers: &http::HeaderMap) {
        if let Some(limits) = RateLimits::from_headers(headers) {
            *self.limits.lock().unwrap_or_else(PoisonError::into_inner) =
                Some((limits, Instant::now()));
        }
    }

    /// What the provider's rate-limit headers last said about this key, and when.
    pub fn rate_limits(&self) -> Option<(RateLimits, Instant)> {
        self.limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The short id, e.g. `9f86d081`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        self.secret.expose_secret()
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey({})", self.id)
    }
}

/// What a provider's rate-limit response headers say about the key a request used:
/// OpenAI's (and most OpenAI-compatible servers') `x-ratelimit-{limit,remaining,reset}-
/// {requests,tokens}` and Anthropic's `anthropic-ratelimit-{requests,tokens,input-tokens,
/// output-tokens}-{limit,remaining,reset}`. Counts are requests or tokens in the
/// provider's current window; resets are kept as the provider wrote them (OpenAI a
/// duration such as `6m0s`, Anthropic an RFC 3339 time). A header that is not a number
/// where one is expected is left out. Shown per key by `/admin/state`; Echelon's own
/// limits do not act on them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RateLimits {
    /// Requests allowed per window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_limit: Option<u64>,
    /// Requests left in the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_remaining: Option<u64>,
    /// When the request window resets, as sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_reset: Option<String>,
    /// Tokens allowed per window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_limit: Option<u64>,
    /// Tokens left in the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_remaining: Option<u64>,
    /// When the token window resets, as sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_reset: Option<String>,
    /// Input tokens left in the window (Anthropic).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_tokens_remaining: Option<u64>,
    /// Output tokens left in the window (Anthropic).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_tokens_remaining: Option<u64>,
}

impl RateLimits {
    /// The rate-limit headers of a response, or `None` when it has none.
    pub fn from_headers(headers: &http::HeaderMap) -> Option<RateLimits> {
        let text = |names: [&str; 2]| {
            names.iter().find_map(|n| {
                let v = headers.get(*n)?.to_str().ok()?.trim();
                // A reset is a short duration or timestamp: anything longer is not one.
                (!v.is_empty() && v.len() <= 64).then(|| v.to_owned())
            })
        };
        let count = |names: [&str; 2]| text(names).and_then(|v| v.parse::<u64>().ok());
        let limits = RateLimits {
            requests_limit: count([
                "x-ratelimit-limit-requests",
                "anthropic-ratelimit-requests-limit",
            ]),
            requests_remaining: count([
                "x-ratelimit-remaining-requests",
                "anthropic-ratelimit-requests-remaining",
            ]),
            requests_reset: text([
                "x-ratelimit-reset-requests",
                "anthropic-ratelimit-requests-reset",
            ]),
            tokens_limit: count([
                "x-ratelimit-limit-tokens",
                "anthropic-ratelimit-tokens-limit",
            ]),
            tokens_remaining: count([
                "x-ratelimit-remaining-tokens",
                "anthropic-ratelimit-tokens-remaining",
            ]),
            tokens_reset: text([
                "x-ratelimit-reset-tokens",
                "anthropic-ratelimit-tokens-reset",
            ]),
            input_tokens_remaining: count([
                "anthropic-ratelimit-input-tokens-remaining",
                "x-ratelimit-remaining-input-tokens",
            ]),
            output_tokens_remaining: count([
                "anthropic-ratelimit-output-tokens-remaining",
                "x-ratelimit-remaining-output-tokens",
            ]),
        };
        (limits != RateLimits::default()).then_some(limits)
    }
}

/// The short id of a key: hex of the first 4 bytes of its SHA-256.
pub fn key_id(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Scrubs secrets out of upstream text (error bodies, error events, transport errors)
/// before it becomes a [`ProviderError`](crate::provider::ProviderError) message, and so
/// before it is logged, stored in `/admin/state` or returned to a client (issue 14 item 6:
/// an upstream may echo the `Authorization` header in its 401 body).
///
/// Two passes, both without regular expressions, run only on error paths:
/// 1. every configured key of the model (exact bytes, longest first) becomes
///    `key#<id>` (its [`key_id`]);
/// 2. whatever still looks like a credential becomes `[redacted]`: the token after
///    `Bearer` (any case, then spaces or tabs, then `token68` characters, RFC 7235), and
///    `sk-` followed by 8 or more of `[A-Za-z0-9_-]` (OpenAI-style keys) when not
///    preceded by such a character.
///
/// Built once per model from its key pool ([`KeyPool::redactor`](crate::resilience::key_pool::KeyPool::redactor));
/// cheap to clone (the keys are shared). [`Redactor::default`] knows no keys and runs
/// the second pass only.
#[derive(Clone, Default)]
pub struct Redactor {
    /// The keys, longest first: a key that contains another is replaced whole.
    keys: Arc<[ApiKey]>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(ApiKey::id))
            .finish()
    }
}

/// What a `Bearer` token or an `sk-…` shape is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Shortest run after `sk-` that counts as a key shape.
const SK_MIN_TAIL: usize = 8;

impl Redactor {
    /// A redactor of `keys` (empty keys are ignored) plus the generic shapes.
    pub fn new(keys: impl IntoIterator<Item = ApiKey>) -> Self {
        let mut keys: Vec<ApiKey> = keys
            .into_iter()
            .filter(|k| !k.expose().is_empty())
            .collect();
        keys.sort_by_key(|k| std::cmp::Reverse(k.expose().len()));
        Redactor { keys: keys.into() }
    }

    /// `text` with every configured key replaced by `key#<id>` and every `Bearer`
    /// token or `sk-…` shape left by [`REDACTED`].
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for key in self.keys.iter() {
            if out.contains(key.expose()) {
                out = out.replace(key.expose(), &format!("key#{}", key.id()));
            }
        }
        scrub_sk_shapes(&scrub_bearer_tokens(&out))
    }
}

/// A character of RFC 7235's `token68` (`=` padding included).
fn is_token68(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=')
}

/// Replaces the token after each `Bearer` (any case) with [`REDACTED`], unless it is
/// already a `key#<id>` left by the first pass.
fn scrub_bearer_tokens(text: &str) -> String {
    const WORD: &[u8] = b"bearer";
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i + WORD.len() <= bytes.len() {
        if !bytes[i..i + WORD.len()].eq_ignore_ascii_case(WORD) {
            i += 1;
            continue;
        }
        let mut start = i + WORD.len();
        while start < bytes.len() && matches!(bytes[start], b' ' | b'\t') {
            start += 1;
        }
        let mut end = start;
        while end < bytes.len() && is_token68(bytes[end]) {
            end += 1;
        }
        // `start` and `end` sit on ASCII bytes (or the end): both are char boundaries.
        let spaced = start > i + WORD.len();
        if spaced && end > start && !text[start..].starts_with("key#") {
            out.push_str(&text[copied..start]);
            out.push_str(REDACTED);
            copied = end;
        }
        i = end.max(i + WORD.len());
    }
    out.push_str(&text[copied..]);
    out
}

/// A character an `sk-` key is made of.
fn is_sk_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-')
}

/// Replaces each `sk-` + at least [`SK_MIN_TAIL`] key characters, not preceded by a key
/// character, with `sk-[redacted]`.
fn scrub_sk_shapes(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut from = 0;
    while let Some(found) = text[from..].find("sk-") {
        let at = from + found;
        let tail = at + 3;
        let mut end = tail;
        while end < bytes.len() && is_sk_char(bytes[end]) {
            end += 1;
        }
        let bounded = at == 0 || !is_sk_char(bytes[at - 1]);
        if bounded && end - tail >= SK_MIN_TAIL {
            out.push_str(&text[copied..tail]);
            out.push_str(REDACTED);
            copied = end;
        }
        from = end.max(tail);
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    http::HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn openai_and_anthropic_rate_limit_headers_are_read() {
        let openai = RateLimits::from_headers(&headers(&[
            ("x-ratelimit-limit-requests", "500"),
            ("x-ratelimit-remaining-requests", "499"),
            ("x-ratelimit-reset-requests", "120ms"),
            ("x-ratelimit-limit-tokens", "30000"),
            ("x-ratelimit-remaining-tokens", "29000"),
            ("x-ratelimit-reset-tokens", "2s"),
        ]))
        .unwrap();
        assert_eq!(openai.requests_remaining, Some(499));
        assert_eq!(openai.tokens_limit, Some(30000));
        assert_eq!(openai.tokens_reset.as_deref(), Some("2s"));
        let anthropic = RateLimits::from_headers(&headers(&[
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-tokens-remaining", "not-a-number"),
            ("anthropic-ratelimit-input-tokens-remaining", "7000"),
            ("anthropic-ratelimit-requests-reset", "2026-12-03T06:00:00Z"),
        ]))
        .unwrap();
        assert_eq!(anthropic.requests_remaining, Some(49));
        assert_eq!(anthropic.tokens_remaining, None, "not a number: left out");
        assert_eq!(anthropic.input_tokens_remaining, Some(7000));
        assert_eq!(
            anthropic.requests_reset.as_deref(),
            Some("2026-12-03T06:00:00Z")
        );
        assert_eq!(
            RateLimits::from_headers(&headers(&[("x-other", "1")])),
            None
        );
    }

    #[test]
    fn a_key_remembers_the_last_headers_across_its_clones() {
        let k = ApiKey::new(SecretString::from("sk-test"));
        let lease = k.clone();
        lease.observe(&headers(&[("x-ratelimit-remaining-requests", "9")]));
        lease.observe(&headers(&[("content-type", "application/json")]));
        let (seen, _) = k.rate_limits().unwrap();
        assert_eq!(seen.requests_remaining, Some(9));
    }

    #[test]
    fn id_is_sha256_prefix_and_debug_hides_the_key() {
        // sha256("test") = 9f86d081884c7d65...
        let k = ApiKey::new(SecretString::from("test"));
        assert_eq!(k.id(), "9f86d081");
        assert_eq!(format!("{k:?}"), "ApiKey(9f86d081)");
    }

    #[test]
    fn configured_keys_become_their_ids() {
        let key = ApiKey::new(SecretString::from("my-provider-key-123"));
        let r = Redactor::new([key.clone()]);
        let text = "invalid key my-provider-key-123 (Authorization: Bearer my-provider-key-123)";
        let out = r.scrub(text);
        assert!(!out.contains("my-provider-key-123"), "{out}");
        assert_eq!(
            out,
            format!(
                "invalid key key#{id} (Authorization: Bearer key#{id})",
                id = key.id()
            )
        );
    }

    #[test]
    fn the_longest_key_is_replaced_first() {
        let short = ApiKey::new(SecretString::from("abc123"));
        let long = ApiKey::new(SecretString::from("abc123-and-more"));
        let r = Redactor::new([short.clone(), long.clone()]);
        let out = r.scrub("got abc123-and-more and abc123");
        assert_eq!(out, format!("got key#{} and key#{}", long.id(), short.id()));
        // Empty keys are ignored, not an endless replacement.
        let r = Redactor::new([ApiKey::new(SecretString::from(""))]);
        assert_eq!(r.scrub("text"), "text");
    }

    #[test]
    fn bearer_tokens_and_sk_shapes_are_redacted_without_configured_keys() {
        let r = Redactor::default();
        assert_eq!(
            r.scrub("header was 'Authorization: Bearer abc.DEF_123+/=='"),
            "header was 'Authorization: Bearer [redacted]'"
        );
        assert_eq!(
            r.scrub("BEARER\tzzz, bearer  yyy"),
            "BEARER\t[redacted], bearer  [redacted]"
        );
        assert_eq!(
            r.scrub("key sk-proj-ABCdef123456_-x in use"),
            "key sk-[redacted] in use"
        );
        assert_eq!(r.scrub("sk-12345678"), "sk-[redacted]");
        // Not credentials: too short, inside a word, `Bearer` without a token.
        for text in [
            "sk-1234567",
            "risk-assessment-module",
            "task-abcdefghijk",
            "Bearer",
            "use a Bearer: token",
            "bearers",
            "plain message",
            "é sk-",
        ] {
            assert_eq!(r.scrub(text), text);
        }
        // Multi-byte text around a shape stays intact.
        assert_eq!(r.scrub("clé: sk-abcdefgh1234 ✓"), "clé: sk-[redacted] ✓");
        assert_eq!(r.scrub("ключ Bearer tok ✓"), "ключ Bearer [redacted] ✓");
    }

    #[test]
    fn a_configured_key_after_bearer_keeps_its_id() {
        let key = ApiKey::new(SecretString::from("sk-live-0123456789abcdef"));
        let r = Redactor::new([key.clone()]);
        let out = r.scrub("Bearer sk-live-0123456789abcdef");
        assert_eq!(out, format!("Bearer key#{}", key.id()));
        assert_eq!(format!("{r:?}"), format!("[\"{}\"]", key.id()));
    }
}
