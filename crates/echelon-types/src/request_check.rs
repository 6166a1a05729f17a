//! Parsing a client's request body with errors that name the JSON path at fault.
//!
//! A body is deserialized once, straight into the typed request, and the rules the types
//! do not enforce (a non-empty model and conversation, content shapes) are checked on
//! it. serde's derive loses the path inside `#[serde(flatten)]` structs, so only a body
//! that does not deserialize is read again as a JSON value, its modelled fields checked
//! by hand with their paths: the error names the field at fault.

use serde_json::Value;

use crate::{ChatCompletionRequest, Role};

/// A request body the gateway refuses, with the JSON path at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    /// JSON path of the offending field (`messages[0].role`), or `None` when the body
    /// as a whole is at fault (not JSON, not an object).
    pub path: Option<String>,
    /// What is wrong, naming the path.
    pub message: String,
}

impl RequestError {
    pub(crate) fn at(path: impl Into<String>, what: impl std::fmt::Display) -> Self {
        let path = path.into();
        RequestError {
            message: format!("{path}: {what}"),
            path: Some(path),
        }
    }
}

/// Parses and checks a `POST /v1/chat/completions` body.
///
/// # Errors
/// [`RequestError`] when the body is not JSON (message with line and column), or when a
/// modelled field is missing or has the wrong type or value (message and `path` name it).
pub fn parse_request(body: &[u8]) -> Result<ChatCompletionRequest, RequestError> {
    // The way every valid request takes: one pass (issue 16 measured the value-then-
    // convert path at twice the parse).
    match serde_json::from_slice::<ChatCompletionRequest>(body) {
        Ok(req) => {
            check_typed(&req)?;
            Ok(req)
        }
        Err(_) => parse_slowly(body),
    }
}

/// The body of a request that did not deserialize: read as any JSON, checked with
/// paths ([`check`]), then converted (an error the checks do not name is reported as
/// serde's).
fn parse_slowly(body: &[u8]) -> Result<ChatCompletionRequest, RequestError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| RequestError {
        path: None,
        message: format!(
            "request body is not valid JSON: {e} (line {}, column {})",
            e.line(),
            e.column()
        ),
    })?;
    check(&value)?;
    serde_json::from_value(value).map_err(|e| RequestError {
        path: None,
        message: format!("invalid request: {e}"),
    })
}

/// The rules of [`check`] that a deserialized request can still break, with the same
/// paths and messages.
fn check_typed(req: &ChatCompletionRequest) -> Result<(), RequestError> {
    if req.model.is_empty() {
        return Err(RequestError::at("model", "must not be empty"));
    }
    if req.messages.is_empty() {
        return Err(RequestError::at(
            "messages",
            "must contain at least one message",
        ));
    }
    for (i, m) in req.messages.iter().enumerate() {
        check_content(i, &m.content)?;
    }
    Ok(())
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn check(value: &Value) -> Result<(), RequestError> {
    let Some(obj) = value.as_object() else {
        return Err(RequestError {
            path: None,
            message: format!(
                "request body must be a JSON object, found {}",
                type_name(value)
            ),
        });
    };
    match obj.get("model") {
        Some(Value::String(s)) if !s.is_empty() => {}
        Some(Value::String(_)) => return Err(RequestError::at("model", "must not be empty")),
        Some(v) => {
            return Err(RequestError::at(
                "model",
                format!("expected a string, found {}", type_name(v)),
            ));
        }
        None => return Err(RequestError::at("model", "missing required field")),
    }
    let messages = match obj.get("messages") {
        Some(Value::Array(m)) => m,
        Some(v) => {
            return Err(RequestError::at(
                "messages",
                format!("expected an array, found {}", type_name(v)),
            ));
        }
        None => return Err(RequestError::at("messages", "missing required field")),
    };
    if messages.is_empty() {
        return Err(RequestError::at(
            "messages",
            "must contain at least one message",
        ));
    }
    for (i, m) in messages.iter().enumerate() {
        check_message(i, m)?;
    }
    check_optional(obj, "stream", Value::is_boolean, "a boolean")?;
    check_optional(obj, "max_tokens", Value::is_u64, "a non-negative integer")?;
    check_optional(
        obj,
        "max_completion_tokens",
        Value::is_u64,
        "a non-negative integer",
    )?;
    check_optional(obj, "temperature", Value::is_number, "a number")?;
    check_optional(obj, "user", Value::is_string, "a string")?;
    if let Some(opts) = obj.get("stream_options").filter(|v| !v.is_null()) {
        let Some(o) = opts.as_object() else {
            return Err(RequestError::at(
                "stream_options",
                format!("expected an object, found {}", type_name(opts)),
            ));
        };
        if let Some(v) = o.get("include_usage").filter(|v| !v.is_null())
            && !v.is_boolean()
        {
            return Err(RequestError::at(
                "stream_options.include_usage",
                format!("expected a boolean, found {}", type_name(v)),
            ));
        }
    }
    Ok(())
}

fn check_optional(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    ok: fn(&Value) -> bool,
    expected: &str,
) -> Result<(), RequestError> {
    match obj.get(key) {
        Some(v) if !v.is_null() && !ok(v) => Err(RequestError::at(
            key,
            format!("expected {expected}, found {}", type_name(v)),
        )),
        _ => Ok(()),
    }
}

fn check_message(i: usize, m: &Value) -> Result<(), RequestError> {
    let Some(obj) = m.as_object() else {
        return Err(RequestError::at(
            format!("messages[{i}]"),
            format!("expected an object, found {}", type_name(m)),
        ));
    };
    let path = format!("messages[{i}].role");
    match obj.get("role") {
        Some(Value::String(r)) if Role::NAMES.contains(&r.as_str()) => {}
        Some(Value::String(r)) => {
            return Err(RequestError::at(
                path,
                format!(
                    "unknown role `{r}`, expected one of {}",
                    Role::NAMES.join(", ")
                ),
            ));
        }
        Some(v) => {
            return Err(RequestError::at(
                path,
                format!("expected a string, found {}", type_name(v)),
            ));
        }
        None => return Err(RequestError::at(path, "missing required field")),
    }
    check_content(i, obj.get("content").unwrap_or(&Value::Null))
}

/// A message's content: absent or null, a string, or an array of part objects.
fn check_content(i: usize, content: &Value) -> Result<(), RequestError> {
    match content {
        Value::Null | Value::String(_) => Ok(()),
        Value::Array(parts) => {
            for (j, p) in parts.iter().enumerate() {
                if !p.is_object() {
                    return Err(RequestError::at(
                        format!("messages[{i}].content[{j}]"),
                        format!("expected a content part object, found {}", type_name(p)),
                    ));
                }
            }
            Ok(())
        }
        v => Err(RequestError::at(
            format!("messages[{i}].content"),
            format!(
                "expected a string or an array of parts, found {}",
                type_name(v)
            ),
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn err(body: &str) -> RequestError {
        parse_request(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn accepts_a_minimal_request() {
        let r =
            parse_request(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(r.model, "m");
        assert!(!r.is_stream());
    }

    #[test]
    fn names_the_path_of_a_bad_role() {
        let e = err(
            r#"{"model":"m","messages":[{"role":"user","content":"a"},{"role":"robot","content":"b"}]}"#,
        );
        assert_eq!(e.path.as_deref(), Some("messages[1].role"));
        assert!(
            e.message
                .starts_with("messages[1].role: unknown role `robot`")
        );
    }

    #[test]
    fn names_missing_and_mistyped_fields() {
        assert_eq!(err(r#"{"messages":[]}"#).path.as_deref(), Some("model"));
        assert_eq!(err(r#"{"model":"m"}"#).path.as_deref(), Some("messages"));
        assert_eq!(
            err(r#"{"model":"m","messages":[{"content":"x"}]}"#)
                .path
                .as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(
            err(r#"{"model":"m","messages":[{"role":"user","content":5}]}"#)
                .path
                .as_deref(),
            Some("messages[0].content")
        );
        assert_eq!(
            err(r#"{"model":"m","messages":[{"role":"user"}],"stream":"yes"}"#)
                .path
                .as_deref(),
            Some("stream")
        );
        assert_eq!(
            err(r#"{"model":"m","messages":[{"role":"user"}],"max_tokens":-1}"#)
                .path
                .as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            err(
                r#"{"model":"m","messages":[{"role":"user"}],"stream_options":{"include_usage":1}}"#
            )
            .path
            .as_deref(),
            Some("stream_options.include_usage")
        );
    }

    #[test]
    fn one_pass_and_the_checked_path_agree() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"s"},
            {"role":"user","content":[{"type":"text","text":"a"}],"name":"n"}],
            "stream":true,"stream_options":{"include_usage":true,"x":1},"max_tokens":5,
            "temperature":0.5,"user":"u","tools":[{"type":"function"}],"seed":3}"#;
        let fast = parse_request(body).unwrap();
        let slow = parse_slowly(body).unwrap();
        assert_eq!(fast, slow);
        assert_eq!(fast.extra.get("seed"), Some(&Value::from(3)));
    }

    #[test]
    fn reports_syntax_errors_with_position() {
        let e = err("{\"model\": \"m\",\n  \"messages\": [,]}");
        assert_eq!(e.path, None);
        assert!(e.message.contains("line 2"), "{}", e.message);
    }
}
