//! The seed `provider.json` format (seed 004): provider → model → settings.
//!
//! ```json
//! { "openai": { "gpt-4": { "api_keys": ["sk-…"], "base_url": "https://api.openai.com/v1",
//!                          "model": "gpt-4", "max_retries": 5, "retry_delay": 1.0,
//!                          "rate_limit_capacity": 20, "rate_limit_refill_rate": 3.0 } } }
//! ```
//!
//! Each seed provider becomes a provider whose `base_url` is that of its first model
//! (a model with another URL keeps it as an override). Each model becomes the model
//! id `provider/model`, e.g. `openai/gpt-4`. The keys go to the provider when all its
//! models list the same keys, else each model keeps its own as an override. Every
//! model key of the native format except `provider` is accepted; anything else is an
//! error.

use secrecy::{ExposeSecret, SecretString};

use super::load::{Fragment, Item};
use super::model::{ProviderApi, ProviderConfig};
use super::node::join;
use super::read::{Ctx, MapView, map};
use super::sections::model;

fn same_keys(a: &[SecretString], b: &[SecretString]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.expose_secret() == y.expose_secret())
}

/// Reads a whole seed `provider.json` into `fragment`.
pub(crate) fn read(ctx: &mut Ctx, root: &MapView<'_>, fragment: &mut Fragment) {
    let file = ctx.file.clone();
    for provider_entry in root.entries {
        let provider_id = provider_entry.key.as_str();
        let Some(models_view) = map(ctx, &provider_entry.value, provider_id) else {
            continue;
        };
        let mut models = Vec::new();
        let mut url_key_seen = false;
        for model_entry in models_view.entries {
            let path = join(provider_id, &model_entry.key);
            let Some(view) = map(ctx, &model_entry.value, &path) else {
                continue;
            };
            url_key_seen |= view.value("base_url").is_some();
            let (model, _) = model(
                ctx,
                &model_entry.value,
                &model_entry.key,
                &path,
                Some(provider_id),
            );
            models.push(Item {
                id: format!("{provider_id}/{}", model_entry.key),
                file: file.clone(),
                pos: model_entry.key_pos,
                path,
                value: model,
                refs: None,
            });
        }

        let base_url = models.iter().find_map(|m| m.value.base_url.clone());
        if base_url.is_none() && !url_key_seen {
            ctx.error(
                provider_entry.key_pos,
                provider_id,
                format!("no model of provider `{provider_id}` has a `base_url`"),
                Some(
                    "give its first model a `base_url`, e.g. `https://api.openai.com/v1`"
                        .to_owned(),
                ),
            );
        }
        let base_url = base_url.unwrap_or_default();
        for m in &mut models {
            if m.value.base_url.as_deref() == Some(base_url.as_str()) {
                m.value.base_url = None;
            }
        }

        let no_keys: Vec<SecretString> = Vec::new();
        let first_keys = models
            .first()
            .map(|m| m.value.api_keys.clone().unwrap_or_default())
            .unwrap_or_default();
        let shared = models
            .iter()
            .all(|m| same_keys(m.value.api_keys.as_deref().unwrap_or(&no_keys), &first_keys));
        let mut provider_keys = Vec::new();
        if shared {
            provider_keys = first_keys;
            for m in &mut models {
                m.value.api_keys = None;
            }
        }

        fragment.providers.push(Item {
            id: provider_id.to_owned(),
            file: file.clone(),
            pos: provider_entry.key_pos,
            path: provider_id.to_owned(),
            value: ProviderConfig {
                base_url,
                api_keys: provider_keys,
                api: ProviderApi::OpenAi,
                key_cooldown: ProviderConfig::DEFAULT_KEY_COOLDOWN,
                headers: Default::default(),
                responses: false,
            },
            refs: (),
        });
        fragment.models.extend(models);
    }
}
