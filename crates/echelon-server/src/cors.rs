//! Browser origins: a request carrying an `Origin` header comes from a web page, and is
//! served only when `server.cors_origins` lists that origin (or `"*"`); then, and only
//! then, the answer carries CORS headers. Without the list (the default) every request
//! with an `Origin` is refused (403), so a page a user visits cannot spend tokens through
//! a gateway on their machine, even with a CORS "simple" request whose answer it never
//! reads. Requests without `Origin` (curl, SDKs, servers) are not affected.
//!
//! Checked by the [guard](crate::guard) rather than tower-http's `CorsLayer`: that layer
//! only adds or leaves out headers and never refuses a request, which is the part that
//! matters here.

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS,
    ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use crate::error::ApiError;

/// Methods a page may use.
const ALLOW_METHODS: &str = "GET, POST";
/// Request headers a page may send when its preflight names none.
const ALLOW_HEADERS: &str = "authorization, content-type, x-request-id, x-session-id";
/// Response headers a page may read besides the CORS-safelisted ones.
const EXPOSE_HEADERS: &str = "x-echelon-model, x-echelon-attempts, x-request-id";
/// How long a browser may cache a preflight's answer, seconds.
const MAX_AGE_SECS: &str = "600";

/// The configured origins.
#[derive(Debug, Default)]
pub(crate) struct CorsOrigins {
    /// `"*"` was listed.
    any: bool,
    /// Origins as browsers send them (`scheme://host[:port]`), lower-cased.
    origins: Vec<String>,
}

impl CorsOrigins {
    /// From the `server.cors_origins` entries.
    pub(crate) fn new(entries: &[String]) -> Self {
        let mut cors = CorsOrigins::default();
        for e in entries {
            let e = e.trim().trim_end_matches('/').to_ascii_lowercase();
            if e == "*" {
                cors.any = true;
            } else {
                cors.origins.push(e);
            }
        }
        cors
    }

    /// Whether a page of `origin` may call the gateway.
    pub(crate) fn allows(&self, origin: &str) -> bool {
        self.any || self.origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
    }
}

/// What a request's `Origin` asks of the [guard](crate::guard).
pub(crate) enum OriginCheck {
    /// No `Origin`: not from a web page; served as it is.
    Absent,
    /// An origin not configured: this 403 `origin_not_allowed` (without CORS headers).
    Refused(ApiError),
    /// An allowed origin's preflight (`OPTIONS` with `Access-Control-Request-Method`):
    /// this 204, answered here.
    Preflight(Response),
    /// An allowed origin: served, its answer gets [`add_headers`].
    Allowed(HeaderValue),
}

/// Checks `req`'s `Origin` against `cors` (see the module docs).
pub(crate) fn check(cors: &CorsOrigins, req: &Request) -> OriginCheck {
    let Some(origin) = req.headers().get(ORIGIN) else {
        return OriginCheck::Absent;
    };
    if !origin.to_str().is_ok_and(|o| cors.allows(o)) {
        return OriginCheck::Refused(ApiError::origin_not_allowed(&String::from_utf8_lossy(
            origin.as_bytes(),
        )));
    }
    if req.method() == Method::OPTIONS && req.headers().contains_key(ACCESS_CONTROL_REQUEST_METHOD)
    {
        return OriginCheck::Preflight(preflight(origin.clone(), req.headers()));
    }
    OriginCheck::Allowed(origin.clone())
}

/// The CORS headers of an allowed origin's (non-preflight) answer.
pub(crate) fn add_headers(resp: &mut Response, origin: HeaderValue) {
    let h = resp.headers_mut();
    h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSE_HEADERS),
    );
    h.append(VARY, HeaderValue::from_static("origin"));
}

/// 204 with what the page may do: the methods, the headers it asked for (else
/// [`ALLOW_HEADERS`]), for [`MAX_AGE_SECS`].
fn preflight(origin: HeaderValue, request: &HeaderMap) -> Response {
    let mut resp = Body::empty().into_response();
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let allow_headers = request
        .get(ACCESS_CONTROL_REQUEST_HEADERS)
        .filter(|v| v.to_str().is_ok_and(is_header_list))
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static(ALLOW_HEADERS));
    let h = resp.headers_mut();
    h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(ALLOW_METHODS),
    );
    h.insert(ACCESS_CONTROL_ALLOW_HEADERS, allow_headers);
    h.insert(
        ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static(MAX_AGE_SECS),
    );
    h.insert(
        VARY,
        HeaderValue::from_static(
            "origin, access-control-request-method, access-control-request-headers",
        ),
    );
    resp
}

/// Whether `v` is a comma-separated list of header names (what a browser sends in
/// `Access-Control-Request-Headers`), so that it can be echoed.
fn is_header_list(v: &str) -> bool {
    v.len() <= 1024
        && v.split(',').map(str::trim).all(|name| {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_origins_or_any_with_the_wildcard() {
        let none = CorsOrigins::new(&[]);
        assert!(!none.allows("http://localhost:5173"));
        assert!(!none.allows("null"));
        let some = CorsOrigins::new(&["http://localhost:5173/".into()]);
        assert!(some.allows("http://localhost:5173"));
        assert!(some.allows("HTTP://LOCALHOST:5173"));
        assert!(!some.allows("http://localhost:5174"));
        assert!(!some.allows("https://localhost:5173"));
        assert!(CorsOrigins::new(&["*".into()]).allows("https://any.example"));
    }

    #[test]
    fn requested_headers_are_echoed_only_when_they_are_names() {
        assert!(is_header_list("authorization, content-type"));
        assert!(is_header_list("x-session-id"));
        assert!(!is_header_list("a, "));
        assert!(!is_header_list("a\r\nb"));
        assert!(!is_header_list("a b"));
    }
}
