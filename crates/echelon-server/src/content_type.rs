//! `Content-Type: application/json` on the POST endpoints.
//!
//! A browser page may send a cross-origin POST without a preflight only as a CORS
//! "simple" request, whose `Content-Type` is `text/plain`, `multipart/form-data` or
//! `application/x-www-form-urlencoded`. Requiring `application/json` (parameters such as
//! `; charset=utf-8` allowed, any case) turns every such request away before its body is
//! read, whatever its `Origin`.

use axum::extract::{FromRequest, Request};
use bytes::Bytes;
use http::HeaderValue;

use crate::error::ApiError;

/// Whether `value` is `application/json`, with or without parameters, in any case.
fn is_json(value: &HeaderValue) -> bool {
    value
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// A POST endpoint's body, read only when the request's `Content-Type` is JSON. An
/// extractor rather than a middleware: it runs after method routing and the key check
/// (a wrong method is still 405, a missing key still 401) and costs nothing more than
/// the header lookup.
pub(crate) struct JsonBody(pub(crate) Bytes);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    /// # Errors
    /// 415 `unsupported_media_type` when `Content-Type` is not JSON (or absent), before
    /// the body is read; the body's own errors (too large, cut) as `ApiError`.
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match req.headers().get(http::header::CONTENT_TYPE) {
            Some(v) if is_json(v) => {}
            found => {
                return Err(ApiError::unsupported_media_type(
                    found
                        .map(|v| String::from_utf8_lossy(v.as_bytes()))
                        .as_deref(),
                ));
            }
        }
        Bytes::from_request(req, state)
            .await
            .map(JsonBody)
            .map_err(|rejection| ApiError::body_rejected(&rejection))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_with_parameters_in_any_case() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON;charset=UTF-8",
            " application/json ",
        ] {
            assert!(is_json(&HeaderValue::from_static(ok)), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/json-seq",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "",
            "application/jsonx; charset=utf-8",
        ] {
            assert!(!is_json(&HeaderValue::from_static(bad)), "{bad}");
        }
    }
}
