//! Token counting with tiktoken (the `cl100k_base` encoding of OpenAI's GPT-3.5/4
//! family), used where the gateway must know a prompt's size before sending it: the
//! `tpm_limit` reservation.
//!
//! Counts follow OpenAI's cookbook recipe ("How to count tokens with tiktoken"): each
//! message costs its content's tokens plus 3 for its framing, and every reply is primed
//! with 3 more. For non-OpenAI models the figure is an estimate.

use echelon_types::ChatMessage;

/// Tokens of framing per message (`<|start|>{role}\n … <|end|>`).
const PER_MESSAGE: u64 = 3;
/// Tokens priming the reply (`<|start|>assistant<|message|>`).
const REPLY_PRIMING: u64 = 3;

/// The prompt tokens of `messages` (cl100k_base).
pub fn prompt_tokens(messages: &[ChatMessage]) -> u64 {
    let bpe = tiktoken_rs::cl100k_base_singleton();
    messages
        .iter()
        .map(|m| bpe.encode_ordinary(&m.text()).len() as u64 + PER_MESSAGE)
        .sum::<u64>()
        + REPLY_PRIMING
}

#[cfg(test)]
mod tests {
    use super::*;
    use echelon_types::Role;

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
