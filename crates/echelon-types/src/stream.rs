//! Server-sent-event chunks of a streamed chat completion.

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
