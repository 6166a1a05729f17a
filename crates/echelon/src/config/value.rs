//! What a configuration field may hold, as serde helpers the section structs name in
//! `#[serde(deserialize_with = …)]`: durations in seconds ([`Seconds`]), bounded
//! numbers ([`Int`]), API keys, URLs, enum names, the ledger path. The limits are here
//! too, in one place ([`limits`]).
//!
//! Every check's message becomes a `file:line:col` error of the value (see
//! [`de`](super::de)); a hint follows [`HINT`](super::de::HINT).

use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::de::{self, Deserialize, Deserializer, Visitor};

use super::de::with_hint;

/// Upper (and lower) bounds of configuration values: each a sane maximum, far above
/// real use, low enough that no arithmetic on it can overflow (issue 14: `timeout:
/// 1e30` was accepted and then panicked at start).
pub(crate) mod limits {
    use std::time::Duration;

    /// One day: the longest timeout, delay, cooldown, interval or window.
    pub(crate) const DAY: Duration = Duration::from_secs(24 * 3600);
    /// One week: the longest duration anywhere in the configuration.
    pub(crate) const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);
    /// Retries of one model, or per model through an echelon.
    pub(crate) const MAX_RETRIES: i128 = 100;
    /// Calls in total for one request (`max_attempts`), or on one pool instance.
    pub(crate) const MAX_ATTEMPTS: i128 = 1_000;
    /// Requests (or tokens) per minute.
    pub(crate) const MAX_PER_MINUTE: i128 = 1_000_000_000;
    /// Requests in flight at once.
    pub(crate) const MAX_CONCURRENCY: i128 = 1_000_000;
    /// Tokens of a context window, or of `max_tokens`.
    pub(crate) const MAX_TOKENS: i128 = 100_000_000;
    /// Capacity (requests) or refill rate (requests/s) of a seed 004 token bucket.
    pub(crate) const MAX_RATE: f64 = 1e9;
    /// Failures, probes or requests counted by a breaker or a pool.
    pub(crate) const MAX_COUNT: i128 = 1_000_000;
    /// A pool instance's weight.
    pub(crate) const MAX_WEIGHT: i128 = 1_000_000;
    /// An echelon's `priority`.
    pub(crate) const MAX_PRIORITY: i128 = 1_000_000;
    /// A request body, in bytes (1 GiB).
    pub(crate) const MAX_BODY_BYTES: i128 = 1 << 30;
    /// Records queued for, or written at once by, the ledger writer.
    pub(crate) const MAX_RECORDS: i128 = 10_000_000;
    /// The ledger writer's flush interval, in milliseconds (one hour).
    pub(crate) const MAX_FLUSH_MS: i128 = 3_600_000;
    /// Client connections the server holds open at once (`server.max_connections`).
    pub(crate) const MAX_CONNECTIONS: i128 = 1_000_000;
    /// Above this many seconds a `queue_timeout` looks like milliseconds (its old unit).
    pub(crate) const QUEUE_TIMEOUT_WARN: Duration = Duration::from_secs(10);
    /// The longest `rate_limit_wait`: the longest wait the gateway spends on a live
    /// request for a rate-limited model ([`MAX_RETRY_WAIT`](crate::routing::MAX_RETRY_WAIT)).
    pub(crate) const MAX_RATE_LIMIT_WAIT: Duration = crate::routing::MAX_RETRY_WAIT;
}

use limits::{DAY, MAX_RATE, WEEK};

/// A number as shown in a message: `1e30`, not thirty-one digits.
pub(crate) fn show(value: f64) -> String {
    if value.abs() >= 1e15 {
        format!("{value:e}")
    } else {
        format!("{value}")
    }
}

/// The lower end of a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Min {
    /// > 0.
    Positive,
    /// ≥ 0.
    NonNegative,
}

impl Min {
    /// The message when `value` is below it, or `None` when it is not.
    fn check(self, value: f64) -> Option<String> {
        match self {
            Min::Positive if value <= 0.0 => {
                Some(format!("must be greater than 0, found {}", show(value)))
            }
            Min::NonNegative if value < 0.0 => {
                Some(format!("must be 0 or more, found {}", show(value)))
            }
            _ => None,
        }
    }
}

/// A duration written as a number of seconds, integer or decimal (`30`, `0.25`).
///
/// Deserializes into a [`Duration`] of at most [`limits::WEEK`]; negative, NaN,
/// infinite or longer values are errors. The fields use the stricter helpers of
/// [`secs`] (at most [`limits::DAY`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seconds(pub(crate) Duration);

impl Seconds {
    /// `secs` seconds as a [`Duration`], if it is at least `min` and at most `max`
    /// (itself capped at [`limits::WEEK`]); else the message saying why not.
    pub(crate) fn parse(secs: f64, min: Min, max: Duration) -> Result<Duration, String> {
        if !secs.is_finite() {
            return Err(with_hint(
                "expected a finite number of seconds",
                "durations are written in seconds, e.g. `30` or `0.25`",
            ));
        }
        if let Some(message) = min.check(secs) {
            return Err(message);
        }
        let max = max.min(WEEK);
        if secs > max.as_secs_f64() {
            return Err(with_hint(
                format!(
                    "must be at most {} seconds ({}), found {}",
                    max.as_secs(),
                    human(max),
                    show(secs)
                ),
                "durations are written in seconds",
            ));
        }
        // In range, so this cannot fail; −0 is 0.
        Duration::try_from_secs_f64(secs.max(0.0)).map_err(|e| e.to_string())
    }
}

/// `1 day`, `1 week`, or seconds.
fn human(d: Duration) -> String {
    match d.as_secs() {
        s if s == WEEK.as_secs() => "1 week".to_owned(),
        s if s == DAY.as_secs() => "1 day".to_owned(),
        s => format!("{s} s"),
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let secs = f64::deserialize(d)?;
        Seconds::parse(secs, Min::NonNegative, WEEK)
            .map(Seconds)
            .map_err(de::Error::custom)
    }
}

/// Durations of at most [`limits::DAY`], written in seconds.
pub(crate) mod secs {
    use std::time::Duration;

    use serde::de::{self, Deserialize, Deserializer};

    use super::limits::{DAY, MAX_RATE_LIMIT_WAIT};
    use super::{Min, Seconds};

    fn one<'de, D: Deserializer<'de>>(d: D, min: Min) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Seconds::parse(secs, min, DAY).map_err(de::Error::custom)
    }

    fn maybe<'de, D: Deserializer<'de>>(d: D, min: Min) -> Result<Option<Duration>, D::Error> {
        Option::<f64>::deserialize(d)?
            .map(|secs| Seconds::parse(secs, min, DAY))
            .transpose()
            .map_err(de::Error::custom)
    }

    /// A timeout, interval or window: > 0 s.
    pub(crate) fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        one(d, Min::Positive)
    }

    /// A delay or cooldown: ≥ 0 s.
    pub(crate) fn non_negative<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        one(d, Min::NonNegative)
    }

    /// An optional [`positive`].
    pub(crate) fn opt_positive<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        maybe(d, Min::Positive)
    }

    /// An optional [`non_negative`].
    pub(crate) fn opt_non_negative<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        maybe(d, Min::NonNegative)
    }

    /// A wait for a rate-limited model (`rate_limit_wait`): 0 to
    /// [`MAX_RATE_LIMIT_WAIT`](super::limits::MAX_RATE_LIMIT_WAIT) (10 s).
    pub(crate) fn rate_limit_wait<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Seconds::parse(secs, Min::NonNegative, MAX_RATE_LIMIT_WAIT).map_err(de::Error::custom)
    }

    /// An optional [`rate_limit_wait`].
    pub(crate) fn opt_rate_limit_wait<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Option::<f64>::deserialize(d)?
            .map(|secs| Seconds::parse(secs, Min::NonNegative, MAX_RATE_LIMIT_WAIT))
            .transpose()
            .map_err(de::Error::custom)
    }
}

/// An integer in `MIN..=MAX`, as a `T` (the range fits `T`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Int<const MIN: i128, const MAX: i128, T = u32>(pub(crate) T);

/// `value` as a `T` when in `min..=max`; else the message saying why not.
fn bounded<T: TryFrom<i128>>(value: i128, min: i128, max: i128) -> Result<T, String> {
    let out_of_range = || format!("must be between {min} and {max}, found {value}");
    if value < min {
        return Err(format!("must be {min} or more, found {value}"));
    }
    if value > max {
        return Err(out_of_range());
    }
    T::try_from(value).map_err(|_| out_of_range())
}

impl<'de, const MIN: i128, const MAX: i128, T: TryFrom<i128>> Deserialize<'de>
    for Int<MIN, MAX, T>
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = i128::deserialize(d)?;
        bounded(value, MIN, MAX).map(Int).map_err(de::Error::custom)
    }
}

/// An integer field in `MIN..=MAX`.
pub(crate) fn int<'de, D, T, const MIN: i128, const MAX: i128>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i128>,
{
    Int::<MIN, MAX, T>::deserialize(d).map(|i| i.0)
}

/// An optional integer field in `MIN..=MAX`.
pub(crate) fn opt_int<'de, D, T, const MIN: i128, const MAX: i128>(
    d: D,
) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i128>,
{
    Ok(Option::<Int<MIN, MAX, T>>::deserialize(d)?.map(|i| i.0))
}

/// Pool weights: model id → weight in `1..=MAX_WEIGHT`.
pub(crate) fn weights<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<std::collections::BTreeMap<String, u32>, D::Error> {
    type Weight = Int<1, { limits::MAX_WEIGHT }>;
    let weights = std::collections::BTreeMap::<String, Weight>::deserialize(d)?;
    Ok(weights.into_iter().map(|(k, w)| (k, w.0)).collect())
}

/// A number ≥ 0 (prices, temperatures).
pub(crate) fn non_negative<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let value = f64::deserialize(d)?;
    match Min::NonNegative.check(value) {
        Some(message) => Err(de::Error::custom(message)),
        None => Ok(value),
    }
}

/// An optional [`non_negative`].
pub(crate) fn opt_non_negative<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Option::<f64>::deserialize(d)?
        .map(|v| match Min::NonNegative.check(v) {
            Some(message) => Err(de::Error::custom(message)),
            None => Ok(v),
        })
        .transpose()
}

/// An optional rate or capacity of a seed 004 token bucket: > 0, at most
/// [`limits::MAX_RATE`].
pub(crate) fn opt_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Option::<f64>::deserialize(d)?
        .map(|v| {
            if let Some(message) = Min::Positive.check(v) {
                Err(de::Error::custom(message))
            } else if v > MAX_RATE {
                Err(de::Error::custom(format!(
                    "must be at most {}, found {}",
                    show(MAX_RATE),
                    show(v)
                )))
            } else {
                Ok(v)
            }
        })
        .transpose()
}

/// `retry_budget`: a share of extra load in 0–1.
pub(crate) fn retry_budget<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let value = non_negative(d)?;
    if value > 1.0 {
        return Err(de::Error::custom(with_hint(
            format!("must be between 0 and 1, got {}", show(value)),
            "a share of extra load: 0.2 means retries add at most 20%",
        )));
    }
    Ok(value)
}

/// `failure_rate`: a share of failed requests, > 0 and ≤ 1.
pub(crate) fn failure_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let Some(value) = Option::<f64>::deserialize(d)? else {
        return Ok(None);
    };
    if let Some(message) = Min::Positive.check(value) {
        return Err(de::Error::custom(message));
    }
    if value > 1.0 {
        return Err(de::Error::custom(with_hint(
            format!("must be a share between 0 and 1, got {}", show(value)),
            "0.5 opens the breaker when half the requests fail",
        )));
    }
    Ok(Some(value))
}

/// One API key as written: a string (trimmed); `None` when empty (after
/// substitution) or `null`.
struct Key(Option<SecretString>);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&with_hint(
                    "a string (an API key)",
                    "quote the key: \"...\"",
                ))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                let v = v.trim();
                Ok(Key((!v.is_empty()).then(|| SecretString::from(v))))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Key, E> {
                Ok(Key(None))
            }
        }
        d.deserialize_any(KeyVisitor)
    }
}

/// A list of API keys; entries empty after substitution are dropped. Error messages
/// never show the values.
pub(crate) fn secrets<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SecretString>, D::Error> {
    Ok(Vec::<Key>::deserialize(d)?
        .into_iter()
        .filter_map(|k| k.0)
        .collect())
}

/// [`secrets`] that may be absent; a list that is empty once empties are dropped is
/// `None`.
pub(crate) fn opt_secrets<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<SecretString>>, D::Error> {
    Ok(Some(secrets(d)?).filter(|keys| !keys.is_empty()))
}

/// `server.allowed_hosts`: each entry a host name or IP, optionally with `:port`
/// (`localhost`, `gw.internal:4000`, `[::1]:4000`), or `"*"` (no `Host` check); kept
/// lower-cased.
pub(crate) fn hosts<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Vec::<String>::deserialize(d)?
        .into_iter()
        .map(|h| check_host(&h).map_err(de::Error::custom))
        .collect()
}

/// One `allowed_hosts` entry, trimmed and lower-cased, or why it is not one.
pub(crate) fn check_host(entry: &str) -> Result<String, String> {
    let h = entry.trim().to_ascii_lowercase();
    if h.contains("://") || h.contains('/') {
        return Err(with_hint(
            format!("`{h}` is not a host: an `allowed_hosts` entry has no scheme or path"),
            "write `gw.example.com` or `gw.example.com:4000`",
        ));
    }
    if h.is_empty() || h.contains(|c: char| c.is_whitespace() || c == ',') {
        return Err(with_hint(
            "an `allowed_hosts` entry must be a non-empty host, without spaces or commas",
            "one host per list item, e.g. `[localhost, \"gw.internal:4000\"]`",
        ));
    }
    Ok(h)
}

/// `server.cors_origins`: each entry an origin as browsers send it,
/// `scheme://host[:port]` without a path (`http://localhost:5173`), or `"*"` (any
/// origin); kept lower-cased.
pub(crate) fn origins<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Vec::<String>::deserialize(d)?
        .into_iter()
        .map(|o| check_origin(&o).map_err(de::Error::custom))
        .collect()
}

/// One `cors_origins` entry, trimmed and lower-cased, or why it is not one.
pub(crate) fn check_origin(entry: &str) -> Result<String, String> {
    let o = entry.trim().to_ascii_lowercase();
    if o == "*" {
        return Ok(o);
    }
    let rest = o
        .strip_prefix("http://")
        .or_else(|| o.strip_prefix("https://"));
    match rest {
        Some(rest) if !rest.is_empty() && !rest.contains(['/', ' ']) => Ok(o),
        _ => Err(with_hint(
            format!("`{o}` is not an origin"),
            "an origin is `scheme://host[:port]` with no path or trailing slash, e.g. \
             `http://localhost:5173`, or `*` for any",
        )),
    }
}

/// Checks and normalises a URL: `http://` or `https://` plus a host, no spaces;
/// trailing slashes removed.
pub(crate) fn check_url(url: &str) -> Result<String, String> {
    let trimmed = url.trim();
    let rest = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"));
    match rest {
        Some(rest)
            if !rest.is_empty()
                && !rest.starts_with('/')
                && !trimmed.contains(char::is_whitespace) =>
        {
            Ok(trimmed.trim_end_matches('/').to_owned())
        }
        Some(_) => Err(with_hint(
            "`base_url` needs a host after the scheme and no spaces",
            "e.g. `http://127.0.0.1:8082/v1`",
        )),
        None => Err(with_hint(
            "`base_url` must start with `http://` or `https://`",
            "e.g. `https://api.openai.com/v1`",
        )),
    }
}

/// A `base_url` ([`check_url`]).
pub(crate) fn base_url<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    check_url(&String::deserialize(d)?).map_err(de::Error::custom)
}

/// An optional [`base_url`].
pub(crate) fn opt_base_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|url| check_url(&url).map_err(de::Error::custom))
        .transpose()
}

/// Header names an upstream call sets from the request itself: not configurable.
const RESERVED_HEADERS: &[&str] = &["host", "content-length", "transfer-encoding", "connection"];

/// One `headers:` name, checked as an HTTP field name (RFC 9110 §5.1: a token).
struct HeaderNameText(http::HeaderName);

impl<'de> Deserialize<'de> for HeaderNameText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        let parsed = http::HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
            de::Error::custom(with_hint(
                format!("`{name}` is not an HTTP header name"),
                "letters, digits and `-` (a token of RFC 9110), e.g. `x-team`",
            ))
        })?;
        if RESERVED_HEADERS.contains(&parsed.as_str()) {
            return Err(de::Error::custom(with_hint(
                format!("header `{parsed}` cannot be configured"),
                "the gateway sets it for each call",
            )));
        }
        Ok(HeaderNameText(parsed))
    }
}

/// One `headers:` value, checked as an HTTP field value (visible ASCII, spaces and
/// tabs; no line breaks). Its text is never shown in an error (it may be a token).
struct HeaderValueText(http::HeaderValue);

impl<'de> Deserialize<'de> for HeaderValueText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HeaderValueText;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a header value (a string)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HeaderValueText, E> {
                http::HeaderValue::from_str(v.trim())
                    .map(HeaderValueText)
                    .map_err(|_| {
                        E::custom(with_hint(
                            "not a valid HTTP header value",
                            "visible ASCII characters, spaces and tabs only, no line breaks",
                        ))
                    })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HeaderValueText, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HeaderValueText, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<HeaderValueText, E> {
                self.visit_str(if v { "true" } else { "false" })
            }
        }
        d.deserialize_any(V)
    }
}

/// `providers.<id>.headers`: a mapping of header names to values, each checked
/// ([`HeaderNameText`], [`HeaderValueText`]); two names that differ only in case are
/// one header, refused.
pub(crate) fn headers<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<super::model::ExtraHeaders, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = super::model::ExtraHeaders;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&with_hint(
                "a mapping of header names to values",
                "e.g. `headers: { x-team: rl }`",
            ))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(super::model::ExtraHeaders::default())
        }
        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut pairs: Vec<(http::HeaderName, http::HeaderValue)> = Vec::new();
            while let Some(HeaderNameText(name)) = map.next_key()? {
                let HeaderValueText(value) = map.next_value()?;
                if pairs.iter().any(|(n, _)| *n == name) {
                    return Err(de::Error::custom(with_hint(
                        format!("header `{name}` is given twice"),
                        "header names are case-insensitive: keep one",
                    )));
                }
                pairs.push((name, value));
            }
            Ok(super::model::ExtraHeaders::new(pairs))
        }
    }
    d.deserialize_any(V)
}

/// A value named in the file (`strategy: echelon_down`): `from_name` of the text, or
/// "unknown {what} `x`" with `hint(x)`.
pub(crate) fn named<'de, D, T>(
    d: D,
    what: &str,
    from_name: fn(&str) -> Option<T>,
    hint: impl FnOnce(&str) -> String,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    let name = String::deserialize(d)?;
    from_name(&name).ok_or_else(|| {
        de::Error::custom(with_hint(format!("unknown {what} `{name}`"), hint(&name)))
    })
}

/// `usage.ledger`: `false` → `None` (no ledger); `true` → `Some("")`, which the
/// loader replaces with the default path; a path → `Some(path)` as written (the loader
/// resolves it against the file's directory).
pub(crate) fn ledger<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    struct LedgerVisitor;
    impl Visitor<'_> for LedgerVisitor {
        type Value = Option<PathBuf>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&with_hint("a path or `false`", LEDGER_HINT))
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok(v.then(PathBuf::new))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            match v.trim() {
                "" => Err(E::custom(with_hint("`ledger` is empty", LEDGER_HINT))),
                t if t.eq_ignore_ascii_case("false") => Ok(None),
                t if t.eq_ignore_ascii_case("true") => Ok(Some(PathBuf::new())),
                t => Ok(Some(PathBuf::from(t))),
            }
        }
    }
    const LEDGER_HINT: &str =
        "a file path (`ledger: /var/lib/echelon/ledger.db`), or `false` to turn the ledger off";
    d.deserialize_any(LedgerVisitor)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn seconds_in_range() {
        assert_eq!(Seconds::parse(30.0, Min::Positive, DAY), Ok(secs(30)));
        assert_eq!(
            Seconds::parse(0.25, Min::Positive, DAY),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(Seconds::parse(0.0, Min::NonNegative, DAY), Ok(secs(0)));
        assert_eq!(Seconds::parse(-0.0, Min::NonNegative, DAY), Ok(secs(0)));
        assert_eq!(Seconds::parse(86_400.0, Min::Positive, DAY), Ok(DAY));
        assert_eq!(Seconds::parse(604_800.0, Min::NonNegative, WEEK), Ok(WEEK));
    }

    #[test]
    fn seconds_out_of_range_are_errors_not_panics() {
        let err = |v: f64, min: Min, max: Duration| Seconds::parse(v, min, max).unwrap_err();
        assert_eq!(
            err(0.0, Min::Positive, DAY),
            "must be greater than 0, found 0"
        );
        assert_eq!(
            err(-1.0, Min::NonNegative, DAY),
            "must be 0 or more, found -1"
        );
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(err(v, Min::NonNegative, DAY).starts_with("expected a finite number"));
        }
        assert_eq!(
            err(1e30, Min::Positive, DAY),
            "must be at most 86400 seconds (1 day), found 1e30\n  hint: durations are written \
             in seconds"
        );
        assert!(err(1.8e19, Min::Positive, DAY).contains("found 1.8e19"));
        assert!(err(86_400.5, Min::Positive, DAY).starts_with("must be at most 86400 seconds"));
        // No bound is above a week, whatever is asked.
        assert!(
            err(700_000.0, Min::NonNegative, Duration::MAX)
                .starts_with("must be at most 604800 seconds (1 week)")
        );
        assert!(
            err(u64::MAX as f64, Min::NonNegative, Duration::MAX)
                .starts_with("must be at most 604800 seconds")
        );
    }

    #[test]
    fn bounded_integers() {
        assert_eq!(bounded::<u32>(5, 1, 10), Ok(5));
        assert_eq!(
            bounded::<u32>(0, 1, 10),
            Err("must be 1 or more, found 0".to_owned())
        );
        assert_eq!(
            bounded::<u16>(70_000, 0, 65_535),
            Err("must be between 0 and 65535, found 70000".to_owned())
        );
        // A range wider than the type still cannot overflow it.
        assert_eq!(
            bounded::<u8>(300, 0, 1000),
            Err("must be between 0 and 1000, found 300".to_owned())
        );
    }

    #[test]
    fn urls() {
        assert_eq!(
            check_url(" http://h:1/v1// "),
            Ok("http://h:1/v1".to_owned())
        );
        assert!(
            check_url("ftp://x")
                .unwrap_err()
                .starts_with("`base_url` must start")
        );
        assert!(
            check_url("http:///v1")
                .unwrap_err()
                .contains("needs a host")
        );
        assert!(
            check_url("http://a b")
                .unwrap_err()
                .contains("needs a host")
        );
    }

    #[test]
    fn numbers_are_shown_short() {
        assert_eq!(show(1.5), "1.5");
        assert_eq!(show(-1.0), "-1");
        assert_eq!(show(1e30), "1e30");
    }
}
