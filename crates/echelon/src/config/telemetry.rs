//! The `telemetry:` section: traces exported over OTLP/HTTP (issue 18).
//!
//! ```yaml
//! telemetry:
//!   otlp_endpoint: "http://127.0.0.1:4318"  # the collector's OTLP/HTTP base URL; `${VAR}` works
//!   service_name: echelon                   # `service.name` of every span (default echelon)
//!   sample_ratio: 1.0                       # share of new traces kept, 0 to 1 (default 1)
//! ```
//!
//! Without `otlp_endpoint` (the default) nothing is exported and no span is built for
//! it. Spans go to `{otlp_endpoint}/v1/traces` (protobuf); an endpoint that already
//! ends in `/v1/traces` is used as it is. A request arriving with a sampled W3C
//! `traceparent` is traced whatever `sample_ratio` says (parent-based sampling).

use serde::{Deserialize, Deserializer};

use super::de::with_hint;
use super::value::{check_url, non_negative, show};

/// The `telemetry:` section (issue 18): where spans go, under which service name, and
/// which share of traces is kept.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The OTLP/HTTP collector's base URL (`http://` or `https://` plus a host, e.g.
    /// `http://127.0.0.1:4318`), trailing slashes removed; `None` (the default) turns
    /// telemetry off.
    #[serde(deserialize_with = "endpoint")]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` resource attribute of every span (default
    /// [`TelemetryConfig::DEFAULT_SERVICE_NAME`]); not empty.
    #[serde(deserialize_with = "service_name")]
    pub service_name: String,
    /// The share of new traces sampled, 0 to 1 (default 1: every request). A request
    /// whose incoming `traceparent` is sampled is always traced, one whose parent is
    /// not sampled never is.
    #[serde(deserialize_with = "ratio")]
    pub sample_ratio: f64,
}

impl TelemetryConfig {
    /// Default [`service_name`](Self::service_name).
    pub const DEFAULT_SERVICE_NAME: &'static str = "echelon";

    /// Whether spans are exported (an [`otlp_endpoint`](Self::otlp_endpoint) is set).
    pub fn enabled(&self) -> bool {
        self.otlp_endpoint.is_some()
    }

    /// Where the spans are posted: `{otlp_endpoint}/v1/traces`, or the endpoint itself
    /// when it already ends in `/v1/traces`; `None` when telemetry is off.
    pub fn traces_url(&self) -> Option<String> {
        self.otlp_endpoint.as_deref().map(|e| {
            if e.ends_with("/v1/traces") {
                e.to_owned()
            } else {
                format!("{e}/v1/traces")
            }
        })
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: Self::DEFAULT_SERVICE_NAME.to_owned(),
            sample_ratio: 1.0,
        }
    }
}

/// `telemetry.otlp_endpoint`: an `http(s)://` URL ([`check_url`]).
fn endpoint<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|url| {
            check_url(&url).map_err(|_| {
                serde::de::Error::custom(with_hint(
                    format!("`{}` is not an OTLP/HTTP endpoint", url.trim()),
                    "the collector's base URL, e.g. `http://127.0.0.1:4318`",
                ))
            })
        })
        .transpose()
}

/// `telemetry.service_name`: not empty.
fn service_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?.trim().to_owned();
    if name.is_empty() {
        return Err(serde::de::Error::custom(with_hint(
            "must not be empty",
            "the name your tracing backend lists the gateway under, e.g. `echelon`",
        )));
    }
    Ok(name)
}

/// `telemetry.sample_ratio`: a share in 0–1.
fn ratio<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let value = non_negative(d)?;
    if value > 1.0 {
        return Err(serde::de::Error::custom(with_hint(
            format!("must be between 0 and 1, got {}", show(value)),
            "the share of traces kept: 0.1 keeps one request in ten",
        )));
    }
    Ok(value)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_url_appends_the_signal_path_once() {
        let with = |e: &str| TelemetryConfig {
            otlp_endpoint: Some(e.to_owned()),
            ..TelemetryConfig::default()
        };
        assert_eq!(
            with("http://c:4318").traces_url().unwrap(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            with("http://c:4318/v1/traces").traces_url().unwrap(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(TelemetryConfig::default().traces_url(), None);
        assert!(!TelemetryConfig::default().enabled());
    }
}
