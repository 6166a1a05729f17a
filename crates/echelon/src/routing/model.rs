//! A model: one callable target (provider endpoint + upstream model name + keys + limits).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::config::{ModelConfig, ProviderConfig};
use crate::key::ApiKey;
use crate::provider::{OpenAiClient, ProviderError, Timeouts};

/// One model of the configuration, ready to call (DESIGN.md §2 "model").
#[derive(Debug)]
pub struct Model {
    id: String,
    provider: String,
    upstream_model: String,
    client: OpenAiClient,
    keys: Vec<ApiKey>,
    next_key: AtomicUsize,
    max_retries: u32,
    retry_delay: Duration,
    context_window: Option<u32>,
}

impl Model {
    /// Builds model `id` from its config and its provider's.
    ///
    /// Keys: the model's own `api_keys` when it names some, else the provider's.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn from_config(
        id: &str,
        config: &ModelConfig,
        provider: &ProviderConfig,
    ) -> Result<Model, ProviderError> {
        let secs = |s: f64| Duration::from_secs_f64(s.max(0.001));
        let total = secs(config.timeout);
        let timeouts = Timeouts {
            connect: secs(config.connect_timeout),
            total,
            first_token: config.first_token_timeout.map(secs).unwrap_or(total),
            chunk_gap: secs(config.chunk_timeout),
        };
        let base_url = config.base_url.as_deref().unwrap_or(&provider.base_url);
        let keys = config
            .api_keys
            .as_ref()
            .unwrap_or(&provider.api_keys)
            .iter()
            .cloned()
            .map(ApiKey::new)
            .collect();
        Ok(Model {
            id: id.to_owned(),
            provider: config.provider.clone(),
            upstream_model: config.model.clone(),
            client: OpenAiClient::new(base_url, timeouts)?,
            keys,
            next_key: AtomicUsize::new(0),
            max_retries: config.max_retries,
            retry_delay: Duration::from_secs_f64(config.retry_delay.max(0.0)),
            context_window: config.context_window,
        })
    }

    /// The model id of the config.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The provider id.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// The name the provider knows the model by (sent as the request's `model`).
    pub fn upstream_model(&self) -> &str {
        &self.upstream_model
    }

    /// The provider client.
    pub fn client(&self) -> &OpenAiClient {
        &self.client
    }

    /// Retries of the same model after a retryable error (seed 004 `max_retries`).
    pub fn max_retries(&self) -> u32 {
        self.max_retries
    }

    /// Base delay before a retry; doubled on each further retry (seed 004 `retry_delay`).
    pub fn retry_delay(&self) -> Duration {
        self.retry_delay
    }

    /// The declared context window, tokens.
    pub fn context_window(&self) -> Option<u32> {
        self.context_window
    }

    /// Number of keys; 0 means the provider needs none.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// The next key in round-robin order that is not in `refused` (indices of keys the
    /// provider refused during this request). `Ok(None)` when the model uses no key;
    /// `Err(())` when every key was refused.
    pub(crate) fn pick_key(&self, refused: &[usize]) -> Result<Option<(usize, &ApiKey)>, ()> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        let start = self.next_key.fetch_add(1, Ordering::Relaxed);
        (0..self.keys.len())
            .map(|i| (start + i) % self.keys.len())
            .find(|i| !refused.contains(i))
            .map(|i| Some((i, &self.keys[i])))
            .ok_or(())
    }
}
