//! Token counting with tiktoken, used where the gateway must know a prompt's size before
//! sending it (the `tpm_limit` reservation, context windows) and where a provider sends
//! no usage (the figure is then marked estimated). `cl100k_base` is the encoding of
//! OpenAI's GPT-3.5/4 family, `o200k_base` that of GPT-4o and later.
//!
//! Counts follow OpenAI's cookbook recipe ("How to count tokens with tiktoken"): each
//! message costs its content's tokens plus 3 for its framing, and every reply is primed
//! with 3 more. For non-OpenAI models the figure is an estimate.

use echelon_types::ChatMessage;

/// Tokens of framing per message (`<|start|>{role}\n … <|end|>`).
const PER_MESSAGE: u64 = 3;
/// Tokens priming the reply (`<|start|>assistant<|message|>`).
const REPLY_PRIMING: u64 = 3;

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

    /// Tokens of a plain text.
    pub fn count(self, text: &str) -> u64 {
        self.bpe().encode_ordinary(text).len() as u64
    }

    /// Prompt tokens of `messages`, framing included.
    pub fn prompt_tokens(self, messages: &[ChatMessage]) -> u64 {
        let bpe = self.bpe();
        messages
            .iter()
            .map(|m| bpe.encode_ordinary(&m.text()).len() as u64 + PER_MESSAGE)
            .sum::<u64>()
            + REPLY_PRIMING
    }
}

/// The prompt tokens of `messages` (cl100k_base).
pub fn prompt_tokens(messages: &[ChatMessage]) -> u64 {
    Encoding::Cl100kBase.prompt_tokens(messages)
}

/// The prompt tokens of `messages` in `model`'s encoding.
pub(crate) fn prompt_tokens_for(model: &crate::routing::Model, messages: &[ChatMessage]) -> u64 {
    model.encoding().prompt_tokens(messages)
}

/// The tokens of an answer's text in `model`'s encoding.
pub(crate) fn text_tokens_for(model: &crate::routing::Model, text: &str) -> u64 {
    model.encoding().count(text)
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
