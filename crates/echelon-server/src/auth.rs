//! Gateway keys: `Authorization: Bearer <key>` on `/v1/*` when keys are configured.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::reply::error_response;

/// The configured gateway keys, kept as SHA-256 digests so that comparing a presented
/// key takes the same time whichever byte differs first.
#[derive(Debug, Default)]
pub struct GatewayKeys {
    digests: Vec<[u8; 32]>,
}

impl GatewayKeys {
    /// From the configured keys; empty keys are ignored.
    pub fn new(keys: &[SecretString]) -> Self {
        GatewayKeys {
            digests: keys
                .iter()
                .map(|k| k.expose_secret())
                .filter(|k| !k.is_empty())
                .map(|k| Sha256::digest(k.as_bytes()).into())
                .collect(),
        }
    }

    /// Whether auth is on.
    pub fn is_enabled(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Whether `presented` is one of the keys.
    pub fn accepts(&self, presented: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.digests.iter().fold(false, |found, k| {
            found
                | (k.iter()
                    .zip(d.iter())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0)
        })
    }
}

pub(crate) async fn require_gateway_key(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if !state.keys.is_enabled() {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(k) if state.keys.accepts(k) => next.run(req).await,
        Some(_) => error_response(
            http::StatusCode::UNAUTHORIZED,
            echelon_types::ErrorBody::new("authentication_error", "invalid gateway API key")
                .with_code("invalid_api_key"),
        ),
        None => error_response(
            http::StatusCode::UNAUTHORIZED,
            echelon_types::ErrorBody::new(
                "authentication_error",
                "missing gateway API key: send `Authorization: Bearer <key>`",
            )
            .with_code("invalid_api_key"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_configured_keys() {
        let keys = GatewayKeys::new(&[SecretString::from("k1"), SecretString::from("")]);
        assert!(keys.is_enabled());
        assert!(keys.accepts("k1"));
        assert!(!keys.accepts("k2"));
        assert!(!keys.accepts(""));
        assert!(!GatewayKeys::new(&[SecretString::from("")]).is_enabled());
    }
}
