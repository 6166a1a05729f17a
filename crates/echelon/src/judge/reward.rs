//! The length-penalised reward of seed 003.
//!
//! ```text
//! length_penalty = -reward_coefficient * max(0, response_tokens - target_tokens) / target_tokens
//! reward         = score + length_penalty
//! ```
//!
//! `response_tokens` counts the judged response (not the judge's answer) with `cl100k_base`;
//! with `target_tokens = 0` the penalty is 0.

/// The length penalty (0 or negative for a non-negative coefficient).
///
/// `-reward_coefficient * max(0, response_tokens - target_tokens) / target_tokens`, and 0
/// when `target_tokens` is 0.
pub fn length_penalty(response_tokens: u64, target_tokens: u64, reward_coefficient: f64) -> f64 {
    if target_tokens == 0 {
        return 0.0;
    }
    let excess = response_tokens.saturating_sub(target_tokens);
    if excess == 0 {
        return 0.0;
    }
    -reward_coefficient * excess as f64 / target_tokens as f64
}

/// `score + length_penalty(response_tokens, target_tokens, reward_coefficient)`.
pub fn reward(
    score: f64,
    response_tokens: u64,
    target_tokens: u64,
    reward_coefficient: f64,
) -> f64 {
    score + length_penalty(response_tokens, target_tokens, reward_coefficient)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_formula() {
        assert_eq!(length_penalty(1024, 512, 0.5), -0.5);
        assert_eq!(reward(7.0, 1024, 512, 0.5), 6.5);
        assert_eq!(reward(7.0, 1536, 512, 0.25), 6.5);
        assert_eq!(reward(7.0, 512, 512, 0.1), 7.0);
        assert_eq!(reward(7.0, 10, 512, 0.1), 7.0);
        assert_eq!(reward(7.0, 10_000, 0, 0.1), 7.0);
        assert_eq!(length_penalty(600, 512, 0.1), -0.1 * 88.0 / 512.0);
    }
}
