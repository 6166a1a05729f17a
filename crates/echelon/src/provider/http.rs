//! The HTTP clients the wires share: one reqwest client per connect timeout, and the
//! classification of reqwest's errors.

use std::collections::HashMap;
use std::time::Duration;

use super::error::{ErrorKind, ProviderError};
use crate::config::ExtraHeaders;

/// What tells two clients apart: the connect timeout and the default headers (a
/// provider's `headers`, as name and value bytes).
type ClientKey = (Duration, Vec<(String, Vec<u8>)>);

/// The HTTP clients of one gateway, one per connect timeout and set of extra headers
/// (a provider's `headers`): models share them, so the models of a provider share its
/// connection pool, and the system's root certificates are read once per client rather
/// than once per model (about 6 ms per model at start, measured with 20 models).
#[derive(Debug, Default)]
pub struct HttpClients {
    by_connect_timeout: HashMap<ClientKey, reqwest::Client>,
}

impl HttpClients {
    /// No clients yet; each is built on first use.
    pub fn new() -> Self {
        HttpClients::default()
    }

    /// The client for this connect timeout (built on first use; a clone shares its pool).
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS backend initialisation).
    pub fn get(&mut self, connect: Duration) -> Result<reqwest::Client, ProviderError> {
        self.get_with(connect, &ExtraHeaders::default())
    }

    /// The client for this connect timeout that sends `headers` on every request
    /// (built on first use): a provider's `headers`, whatever its wire. A header a
    /// request sets itself (the wire's key header, `content-type`) wins over one here.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS backend initialisation).
    pub fn get_with(
        &mut self,
        connect: Duration,
        headers: &ExtraHeaders,
    ) -> Result<reqwest::Client, ProviderError> {
        let key: ClientKey = (
            connect,
            headers
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect(),
        );
        if let Some(http) = self.by_connect_timeout.get(&key) {
            return Ok(http.clone());
        }
        let http = build_http(connect, headers)?;
        self.by_connect_timeout.insert(key, http.clone());
        Ok(http)
    }
}

/// A reqwest client (rustls) with Echelon's connection settings: `TCP_NODELAY`, idle
/// connections kept 90 s; `headers` sent on every request.
fn build_http(connect: Duration, headers: &ExtraHeaders) -> Result<reqwest::Client, ProviderError> {
    reqwest::Client::builder()
        .default_headers(headers.to_header_map())
        .connect_timeout(connect)
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
        .map_err(|e| ProviderError::new(ErrorKind::Connect, format!("HTTP client: {e}")))
}

/// Maps a reqwest error to a classified error; the message never contains the URL's
/// credentials or a header (reqwest does not print headers).
pub(crate) fn from_reqwest(e: reqwest::Error) -> ProviderError {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_body() || e.is_decode() {
        ErrorKind::StreamCut
    } else {
        ErrorKind::Connect
    };
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    ProviderError::new(kind, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_with_the_same_connect_timeout_share_one_http_client() {
        let mut clients = HttpClients::new();
        for connect in [1, 1, 2, 1, 2] {
            assert!(clients.get(Duration::from_secs(connect)).is_ok());
        }
        assert_eq!(clients.by_connect_timeout.len(), 2);
    }

    #[test]
    fn providers_with_other_headers_get_their_own_client() {
        let mut clients = HttpClients::new();
        let t = Duration::from_secs(1);
        let team = |v: &'static str| {
            ExtraHeaders::new([(
                http::HeaderName::from_static("x-team"),
                http::HeaderValue::from_static(v),
            )])
        };
        for headers in [team("a"), team("a"), team("b"), ExtraHeaders::default()] {
            assert!(clients.get_with(t, &headers).is_ok());
        }
        assert!(clients.get(t).is_ok());
        assert_eq!(clients.by_connect_timeout.len(), 3);
    }
}
