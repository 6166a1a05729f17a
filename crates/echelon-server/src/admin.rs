//! The operator's endpoints besides `GET /admin/state`: `GET /admin` (the admin page,
//! one self-contained HTML file compiled into the binary), `POST /admin/reload` (a hot
//! reload, its outcome as JSON) and `GET /admin/reload` (the reload status: the config's
//! source and the last reload's result).
//!
//! # Keys
//! Behind the gateway keys like `/admin/state`, taken as `Authorization: Bearer <key>`
//! or, so that a browser can open the page, `Authorization: Basic` with the key as the
//! password (or the user name): a 401 from `/admin*` carries `WWW-Authenticate: Basic`,
//! so the browser asks for it once and sends it again with the page's own polling.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use http::{HeaderValue, StatusCode, header};
use serde_json::json;

use crate::AppState;
use crate::error::ApiError;
use crate::reload::{ReloadResult, Trigger};

/// The admin page (HTML, its CSS and script inline; no request leaves the gateway).
pub(crate) const PAGE: &str = include_str!("../assets/admin.html");

/// The challenge sent with a 401 from `/admin*`.
const CHALLENGE: &str = "Basic realm=\"echelon admin\", charset=\"UTF-8\"";

/// The key presented in an `Authorization` header: a bearer token, or the password (else
/// the user name) of Basic credentials.
fn presented(authorization: &str) -> Vec<String> {
    let Some((scheme, rest)) = authorization.trim_start().split_once(' ') else {
        return Vec::new();
    };
    let rest = rest.trim();
    if rest.is_empty() {
        return Vec::new();
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        return vec![rest.to_owned()];
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return Vec::new();
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(rest) else {
        return Vec::new();
    };
    let Ok(text) = String::from_utf8(decoded) else {
        return Vec::new();
    };
    match text.split_once(':') {
        Some((user, password)) => vec![password.to_owned(), user.to_owned()],
        None => vec![text],
    }
}

/// Middleware of `/admin*`: through when gateway keys are off or the request presents
/// one (bearer or Basic).
///
/// # Errors
/// 401 (with `WWW-Authenticate: Basic`) when no gateway key is presented.
pub(crate) async fn require_admin_key(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if !state.keys.is_enabled() {
        return next.run(req).await;
    }
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let ok = auth.is_some_and(|a| {
        presented(a)
            .iter()
            .any(|k| !k.is_empty() && state.keys.accepts(k))
    });
    if ok {
        return next.run(req).await;
    }
    let mut resp = if auth.is_some() {
        ApiError::invalid_gateway_key()
    } else {
        ApiError::missing_gateway_key()
    }
    .into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(CHALLENGE),
    );
    resp
}

/// `GET /admin`: the admin page.
pub(crate) async fn page() -> Response {
    let mut resp = PAGE.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Only its own inline script and style, and requests to this gateway.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ),
    );
    resp
}

/// `POST /admin/reload`: reloads the config from its file. 200 with the outcome (what
/// changed, which state was kept) when the new config serves; 422 with the errors
/// (`file:line:col: …`) in the OpenAI error body plus the outcome when it was refused;
/// 409 when the server was started without a config file.
pub(crate) async fn reload(State(state): State<AppState>) -> Response {
    let Some(reloader) = state.reloader.clone() else {
        return ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "reload_unavailable",
            "this server was not started from a config file: nothing to reload",
        )
        .into_response();
    };
    let outcome = reloader.reload(Trigger::Endpoint).await;
    match outcome.result {
        ReloadResult::Ok => axum::Json(outcome).into_response(),
        ReloadResult::Error => {
            let message = format!(
                "the new config was refused, the old one keeps serving: {}",
                outcome.errors.join("; ")
            );
            let body = json!({
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": null,
                    "code": "invalid_config",
                },
                "reload": outcome,
            });
            (StatusCode::UNPROCESSABLE_ENTITY, axum::Json(body)).into_response()
        }
    }
}

/// `GET /admin/reload`: the config's source, the reload counts and the last outcome
/// (`null` fields when the server was started without a config file).
pub(crate) async fn reload_status(State(state): State<AppState>) -> Response {
    match &state.reloader {
        Some(r) => axum::Json(r.status()).into_response(),
        None => {
            axum::Json(json!({"source": null, "watching": false, "last": null})).into_response()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_taken_from_bearer_and_basic() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(presented("Bearer k1"), ["k1"]);
        assert_eq!(
            presented(&format!("Basic {}", b64("admin:k1"))),
            ["k1", "admin"]
        );
        assert_eq!(presented(&format!("basic {}", b64("k1:"))), ["", "k1"]);
        assert!(presented("Basic !!!").is_empty());
        assert!(presented("Digest k1").is_empty());
        assert!(presented("Bearer ").is_empty());
    }

    #[test]
    fn the_page_is_self_contained() {
        assert!(PAGE.starts_with("<!doctype html>"));
        for external in ["http://", "https://", "src=\"//", "@import"] {
            assert!(
                !PAGE.contains(external),
                "the page loads nothing from elsewhere: {external}"
            );
        }
    }
}
