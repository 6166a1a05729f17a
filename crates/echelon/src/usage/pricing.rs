//! What tokens cost: a [`Price`] per model, from the model's `pricing:` in the
//! configuration or a small built-in table of common models ([`builtin_price`]).
//!
//! A model whose price is unknown costs 0 USD: the ledger still records its tokens,
//! so the cost can be worked out later, but the `cost_usd` columns read 0.

use crate::config::PricingConfig;

/// Tokens per pricing unit: prices are quoted in USD per 1 million tokens.
const PER: f64 = 1_000_000.0;

/// A model's price, in USD per 1 million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    /// Prompt (input) tokens, USD per 1M tokens.
    pub input_per_1m: f64,
    /// Completion (output) tokens, USD per 1M tokens.
    pub output_per_1m: f64,
    /// Prompt tokens served from the provider's prompt cache, USD per 1M tokens; `None`
    /// prices them at [`input_per_1m`](Self::input_per_1m).
    pub cached_input_per_1m: Option<f64>,
    /// Prompt tokens written to the provider's prompt cache, USD per 1M tokens; `None`
    /// prices them at [`input_per_1m`](Self::input_per_1m).
    pub cache_write_per_1m: Option<f64>,
}

impl Price {
    /// The cost in USD of `prompt_tokens` in and `completion_tokens` out, of which
    /// `cached_prompt_tokens` came from the provider's prompt cache.
    ///
    /// As in OpenAI's `usage` object (`prompt_tokens_details.cached_tokens`), cached
    /// tokens are *part of* `prompt_tokens`: they are priced at the cached rate when
    /// one is set and the rest at the input rate. Cached tokens beyond
    /// `prompt_tokens` are capped at it.
    ///
    /// ```
    /// use echelon::usage::pricing::builtin_price;
    ///
    /// let price = builtin_price("gpt-4o-mini").unwrap();
    /// let usd = price.cost_usd(1_000_000, 1_000_000, 0);
    /// assert!((usd - 0.75).abs() < 1e-12); // 0.15 in + 0.60 out
    /// ```
    pub fn cost_usd(
        &self,
        prompt_tokens: u64,
        completion_tokens: u64,
        cached_prompt_tokens: u64,
    ) -> f64 {
        self.cost_usd_with_cache_write(prompt_tokens, completion_tokens, cached_prompt_tokens, 0)
    }

    /// As [`cost_usd`](Self::cost_usd), `cache_write_tokens` of the prompt written to the
    /// provider's cache (Anthropic's `cache_creation_input_tokens`) priced at
    /// [`cache_write_per_1m`](Self::cache_write_per_1m) (the input rate when unset).
    /// Like cached tokens they are part of `prompt_tokens` (capped at what is left of it
    /// after the cached ones).
    pub fn cost_usd_with_cache_write(
        &self,
        prompt_tokens: u64,
        completion_tokens: u64,
        cached_prompt_tokens: u64,
        cache_write_tokens: u64,
    ) -> f64 {
        let cached = cached_prompt_tokens.min(prompt_tokens);
        let written = cache_write_tokens.min(prompt_tokens - cached);
        let uncached = prompt_tokens - cached - written;
        let cached_rate = self.cached_input_per_1m.unwrap_or(self.input_per_1m);
        let write_rate = self.cache_write_per_1m.unwrap_or(self.input_per_1m);
        (uncached as f64 * self.input_per_1m
            + cached as f64 * cached_rate
            + written as f64 * write_rate
            + completion_tokens as f64 * self.output_per_1m)
            / PER
    }
}

impl From<&PricingConfig> for Price {
    fn from(p: &PricingConfig) -> Self {
        Price {
            input_per_1m: p.input_per_1m,
            output_per_1m: p.output_per_1m,
            cached_input_per_1m: p.cached_input_per_1m,
            cache_write_per_1m: p.cache_write_per_1m,
        }
    }
}

/// `(model, input, output, cached input)`, USD per 1M tokens, standard (not batch)
/// tier.
///
/// Sources, as of 2025-09: OpenAI's pricing page (openai.com/api/pricing; gpt-4o-mini
/// 0.15 / 0.60 also in seed 000) and DeepSeek's pricing page
/// (api-docs.deepseek.com/quick_start/pricing, standard hours, before the V3.2 price
/// change). Prices change: set `pricing:` on a model to override an entry.
const BUILTIN: &[(&str, f64, f64, Option<f64>)] = &[
    ("gpt-4o-mini", 0.15, 0.60, Some(0.075)),
    ("gpt-4o", 2.50, 10.00, Some(1.25)),
    ("gpt-4.1", 2.00, 8.00, Some(0.50)),
    ("gpt-4.1-mini", 0.40, 1.60, Some(0.10)),
    ("gpt-4.1-nano", 0.10, 0.40, Some(0.025)),
    ("gpt-5", 1.25, 10.00, Some(0.125)),
    ("gpt-5-mini", 0.25, 2.00, Some(0.025)),
    ("gpt-5-nano", 0.05, 0.40, Some(0.005)),
    ("o1", 15.00, 60.00, Some(7.50)),
    ("o3", 2.00, 8.00, Some(0.50)),
    ("o3-mini", 1.10, 4.40, Some(0.55)),
    ("o4-mini", 1.10, 4.40, Some(0.275)),
    ("gpt-4-turbo", 10.00, 30.00, None),
    ("gpt-4", 30.00, 60.00, None),
    ("gpt-3.5-turbo", 0.50, 1.50, None),
    ("deepseek-chat", 0.27, 1.10, Some(0.07)),
    ("deepseek-reasoner", 0.55, 2.19, Some(0.14)),
];

/// Whether `rest` is a dated snapshot suffix: `-YYYY-MM-DD` (`gpt-4o-2024-08-06`) or
/// `-MMDD` (`gpt-4-0613`, `gpt-3.5-turbo-0125`).
fn is_snapshot_suffix(rest: &str) -> bool {
    let Some(date) = rest.strip_prefix('-') else {
        return false;
    };
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    if digits(date, 4) {
        return true;
    }
    let parts: Vec<&str> = date.split('-').collect();
    matches!(parts.as_slice(), [y, m, d] if digits(y, 4) && digits(m, 2) && digits(d, 2))
}

/// The built-in price of the upstream model name `upstream_model`, when it is in the
/// table: matched by exact name or a dated snapshot of one (`gpt-4o-mini-2024-07-18`
/// → `gpt-4o-mini`), ignoring case and a `vendor/` prefix (`openai/gpt-4o`).
///
/// The table (standard tier, as of 2025-09, from OpenAI's and DeepSeek's pricing pages)
/// covers gpt-4o-mini, gpt-4o, gpt-4.1(-mini, -nano), gpt-5(-mini, -nano), o1, o3,
/// o3-mini, o4-mini, gpt-4-turbo, gpt-4, gpt-3.5-turbo, deepseek-chat and
/// deepseek-reasoner.
pub fn builtin_price(upstream_model: &str) -> Option<Price> {
    let name = upstream_model
        .rsplit('/')
        .next()
        .unwrap_or(upstream_model)
        .to_ascii_lowercase();
    BUILTIN
        .iter()
        .find(|(model, ..)| {
            name == *model || name.strip_prefix(model).is_some_and(is_snapshot_suffix)
        })
        .map(|&(_, input, output, cached)| Price {
            input_per_1m: input,
            output_per_1m: output,
            cached_input_per_1m: cached,
            cache_write_per_1m: None,
        })
}

/// The price of a model: its configured `pricing:` when set (it overrides the table),
/// else [`builtin_price`] of its upstream model name. `None` means the price is
/// unknown: such a model's calls cost 0 USD in the ledger, which still records their
/// tokens.
pub fn price_for(config_pricing: Option<&PricingConfig>, upstream_model: &str) -> Option<Price> {
    config_pricing
        .map(Price::from)
        .or_else(|| builtin_price(upstream_model))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn gpt_4o_mini_one_million_each_way_is_75_cents() {
        let p = builtin_price("gpt-4o-mini").unwrap();
        assert!(close(p.cost_usd(1_000_000, 1_000_000, 0), 0.75));
        assert!(close(p.cost_usd(1_000, 500, 0), 0.00015 + 0.0003));
    }

    #[test]
    fn cached_tokens_are_part_of_the_prompt() {
        let p = Price {
            input_per_1m: 1.0,
            output_per_1m: 2.0,
            cached_input_per_1m: Some(0.25),
            cache_write_per_1m: None,
        };
        // 600k uncached at 1.0 + 400k cached at 0.25 + 100k out at 2.0.
        assert!(close(
            p.cost_usd(1_000_000, 100_000, 400_000),
            0.6 + 0.1 + 0.2
        ));
        // Without a cached rate they cost the input rate.
        let flat = Price {
            cached_input_per_1m: None,
            cache_write_per_1m: None,
            ..p
        };
        assert!(close(flat.cost_usd(1_000_000, 0, 400_000), 1.0));
        // More cached than prompt tokens is capped.
        assert!(close(p.cost_usd(100, 0, 1_000), 100.0 * 0.25 / 1e6));
    }

    #[test]
    fn snapshots_and_prefixes_match_the_base_model() {
        let mini = builtin_price("gpt-4o-mini").unwrap();
        assert_eq!(builtin_price("gpt-4o-mini-2024-07-18"), Some(mini));
        assert_eq!(builtin_price("openai/GPT-4o-mini"), Some(mini));
        let four_o = builtin_price("gpt-4o-2024-08-06").unwrap();
        assert!(close(four_o.input_per_1m, 2.5));
        assert!(close(
            builtin_price("gpt-4-0613").unwrap().input_per_1m,
            30.0
        ));
        assert!(close(builtin_price("gpt-4.1").unwrap().output_per_1m, 8.0));
        assert!(close(
            builtin_price("gpt-4.1-mini").unwrap().input_per_1m,
            0.4
        ));
        assert!(close(
            builtin_price("deepseek-chat").unwrap().output_per_1m,
            1.1
        ));
        // Not a snapshot: a different model.
        assert_eq!(builtin_price("gpt-4o-audio-preview"), None);
        assert_eq!(builtin_price("gpt-4o-mini-x"), None);
        assert_eq!(builtin_price("smollm2"), None);
    }

    #[test]
    fn config_overrides_the_table() {
        let cfg = PricingConfig {
            input_per_1m: 1.0,
            output_per_1m: 1.0,
            cached_input_per_1m: None,
            cache_write_per_1m: None,
        };
        let p = price_for(Some(&cfg), "gpt-4o-mini").unwrap();
        assert!(close(p.input_per_1m, 1.0));
        assert_eq!(price_for(None, "gpt-4o-mini"), builtin_price("gpt-4o-mini"));
        assert_eq!(price_for(None, "unknown-model"), None);
    }

    /// Anthropic's prompt cache: writes and reads are part of the prompt, each at its
    /// own rate (Claude Sonnet 4: 3 in, 15 out, 3.75 write, 0.30 read).
    #[test]
    fn cache_writes_are_part_of_the_prompt_at_their_own_rate() {
        let p = Price {
            input_per_1m: 3.0,
            output_per_1m: 15.0,
            cached_input_per_1m: Some(0.30),
            cache_write_per_1m: Some(3.75),
        };
        // 1M prompt: 200k read, 300k written, 500k plain; 100k out.
        let usd = p.cost_usd_with_cache_write(1_000_000, 100_000, 200_000, 300_000);
        assert!(
            close(usd, 0.5 * 3.0 + 0.2 * 0.30 + 0.3 * 3.75 + 0.1 * 15.0),
            "{usd}"
        );
        // Unset: writes cost the input rate; more than the prompt is capped.
        let flat = Price {
            cache_write_per_1m: None,
            ..p
        };
        assert!(close(
            flat.cost_usd_with_cache_write(1_000_000, 0, 0, 300_000),
            3.0
        ));
        assert!(close(
            p.cost_usd_with_cache_write(100, 0, 60, 1_000),
            (60.0 * 0.30 + 40.0 * 3.75) / 1e6
        ));
    }
}
