//! Server-sent-event chunks of a streamed chat completion.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{Extra, Usage};

/// One `data:` event of a streamed chat completion (`object: chat.completion.chunk`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    /// The completion id, the same on every chunk.
    #[serde(default)]
    pub id: String,
    /// `chat.completion.chunk`.
    #[serde(default)]
    pub object: String,
    /// Unix time (s) of creation.
    #[serde(default)]
    pub created: u64,
    /// The model that answers.
    #[serde(default)]
    pub model: String,
    /// Deltas; empty on the final usage chunk.
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    /// Usage, on the last chunk when `stream_options.include_usage` was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Other fields, passed through.
    #[serde(flatten)]
    pub extra: Extra,
    /// The upstream's own JSON text of this chunk, kept by a decoder of the chat
    /// completions wire while the gateway has not changed the chunk (see [`Verbatim`]).
    #[serde(skip)]
    pub verbatim: Verbatim,
}

/// The JSON text a chunk arrived as, relayed instead of serializing the chunk again when
/// nothing in it changed: bytes the gateway does not need to change are forwarded as
/// they came (issue 16: re-serializing turned an upstream's `"delta":{}` into
/// `"delta":{"content":null}` and cost a serialization per chunk).
///
/// It is a cache of the fields' wire form, not part of the chunk's value: two chunks with
/// the same fields are equal whatever their `verbatim`. Code that changes a chunk's
/// fields must [`clear`](Self::clear) it (the gateway's stream does, for a continuation's
/// rewrites, a usage it drops or adds to, and the `echelon` field of a finish chunk).
#[derive(Debug, Clone, Default)]
pub struct Verbatim(Option<Arc<str>>);

impl Verbatim {
    /// The text `json` (one event's `data`, a JSON object) as a chunk's wire form. A text
    /// with a line break (an event sent over several `data:` lines, joined by the SSE
    /// rules) is not kept: relayed on one `data:` line it would end the line early.
    pub fn new(json: &str) -> Verbatim {
        let json = json.trim();
        if json.contains(['\n', '\r']) {
            return Verbatim(None);
        }
        Verbatim(Some(Arc::from(json)))
    }

    /// The chunk's text as it came, when it is still its wire form.
    pub fn get(&self) -> Option<&str> {
        self.0.as_deref()
    }

    /// Forgets the text: the chunk is serialized from its fields.
    pub fn clear(&mut self) {
        self.0 = None;
    }
}

impl PartialEq for Verbatim {
    fn eq(&self, _: &Verbatim) -> bool {
        true
    }
}

impl ChatCompletionChunk {
    /// Whether this chunk carries generated content (text or a tool-call delta).
    pub fn has_content(&self) -> bool {
        self.choices.iter().any(|c| {
            c.delta.content.as_deref().is_some_and(|s| !s.is_empty())
                || c.delta.extra.contains_key("tool_calls")
        })
    }
}

/// One choice's delta in a chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    /// Position in `choices`.
    #[serde(default)]
    pub index: u32,
    /// What this chunk adds.
    #[serde(default)]
    pub delta: Delta,
    /// Set on the choice's last chunk.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// Other fields (`logprobs`, …), passed through.
    #[serde(flatten)]
    pub extra: Extra,
}

/// The incremental part of a message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    /// Set on the first chunk (`assistant`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Text added by this chunk. llama.cpp sends `null` on its first chunk; kept as is.
    #[serde(default)]
    pub content: Option<String>,
    /// Other fields (`tool_calls`, `reasoning_content`, …), passed through.
    #[serde(flatten)]
    pub extra: Extra,
}

impl Delta {
    /// A delta carrying one field of [`extra`](Self::extra) (`reasoning_content`, …) as
    /// a string, no role, no content.
    pub fn extra_field(name: &str, value: String) -> Delta {
        let mut extra = Extra::new();
        extra.insert(name.to_owned(), serde_json::Value::String(value));
        Delta {
            role: None,
            content: None,
            extra,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn verbatim_keeps_one_line_text_and_not_a_multi_line_event() {
        assert_eq!(Verbatim::new(" {\"a\":1}\n").get(), Some("{\"a\":1}"));
        assert_eq!(Verbatim::new("{\"a\":\n1}").get(), None);
        assert_eq!(Verbatim::new("{\"a\":\r1}").get(), None);
    }

    #[test]
    fn chunks_are_equal_whatever_their_verbatim_text() {
        let text = r#"{"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
        let mut parsed: ChatCompletionChunk = serde_json::from_str(text).unwrap();
        let plain = parsed.clone();
        parsed.verbatim = Verbatim::new(text);
        assert_eq!(parsed, plain);
        // The fields' own serialization is what a cleared chunk is sent as.
        parsed.verbatim.clear();
        assert_eq!(parsed.verbatim.get(), None);
        assert!(
            serde_json::to_string(&parsed)
                .unwrap()
                .contains(r#""content":null"#)
        );
    }
}
