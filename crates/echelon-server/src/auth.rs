//! Gateway keys: `Authorization: Bearer <key>` on `/v1/*` and `/admin/*` when keys are
//! configured; on the Anthropic endpoints (`/v1/messages*`) also `x-api-key: <key>`, as
//! the anthropic SDK and Claude Code send it.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::error::{ApiError, ErrorDialect};

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

/// The token of an `Authorization: Bearer <token>` value. The scheme is matched
/// case-insensitively and may be followed by more than one space (RFC 7235 §2.1:
/// `credentials = auth-scheme 1*SP token68`); `None` for another scheme or no token.
fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Middleware: lets the request through when gateway keys are off or it presents one of
/// them as a bearer token.
///
/// # Errors
/// 401 `invalid_api_key` when no bearer token is presented or it is not a gateway key.
pub(crate) async fn require_gateway_key(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    check_key(&state, &req, false)?;
    Ok(next.run(req).await)
}

/// Middleware of the Anthropic endpoints: as [`require_gateway_key`], the key also
/// accepted as `x-api-key` (Anthropic's header; the bearer token is looked at first),
/// and the 401 in Anthropic's error shape.
///
/// # Errors
/// 401 `authentication_error` when neither header holds a gateway key.
pub(crate) async fn require_gateway_key_anthropic(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    check_key(&state, &req, true).map_err(|e| e.in_dialect(ErrorDialect::Anthropic))?;
    Ok(next.run(req).await)
}

fn check_key(state: &AppState, req: &Request, x_api_key: bool) -> Result<(), ApiError> {
    if !state.keys.is_enabled() {
        return Ok(());
    }
    let header = |name: http::HeaderName| req.headers().get(name).and_then(|v| v.to_str().ok());
    let bearer = header(http::header::AUTHORIZATION).and_then(bearer_token);
    let presented = bearer
        .or_else(|| {
            x_api_key
                .then(|| header(http::HeaderName::from_static("x-api-key")))
                .flatten()
                .map(str::trim)
                .filter(|k| !k.is_empty())
        })
        .ok_or_else(ApiError::missing_gateway_key)?;
    if state.keys.accepts(presented) {
        Ok(())
    } else {
        Err(ApiError::invalid_gateway_key())
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

    #[test]
    fn the_bearer_scheme_matches_in_any_case() {
        for v in [
            "Bearer k1",
            "bearer k1",
            "BEARER k1",
            "bEaReR   k1 ",
            "Bearer k1\t",
        ] {
            assert_eq!(bearer_token(v), Some("k1"), "{v:?}");
        }
        for v in [
            "Basic k1",
            "Bearerk1",
            "Bearer",
            "Bearer   ",
            "",
            "k1",
            "Bear k1",
        ] {
            assert_eq!(bearer_token(v), None, "{v:?}");
        }
    }
}
