//! Request and response bodies of `POST /v1/embeddings` (OpenAI's shape:
//! <https://platform.openai.com/docs/api-reference/embeddings>), and the parse of a
//! client's body with errors that name the field at fault.
//!
//! As for chat, only the fields the gateway acts on are typed; the rest stay in `extra`
//! and pass through both ways.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Extra, RequestError};

/// An embeddings request as a client sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingRequest {
    /// The route: a model id or a task group, as for chat completions.
    pub model: String,
    /// What to embed: one text, several, or token ids.
    pub input: EmbeddingInput,
    /// `float` (default) or `base64` (each vector as little-endian `f32`s in base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_format: Option<EncodingFormat>,
    /// The vectors' length, for models that can shorten them (OpenAI's `text-embedding-3-*`);
    /// passed to the provider, which may ignore it (llama-server does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
    /// An end-user id; the gateway may use it as a session key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Every other field, passed to the provider untouched.
    #[serde(flatten)]
    pub extra: Extra,
}

impl EmbeddingRequest {
    /// A request for `model` (a route) embedding `input`, nothing else set.
    pub fn new(model: impl Into<String>, input: impl Into<EmbeddingInput>) -> Self {
        EmbeddingRequest {
            model: model.into(),
            input: input.into(),
            encoding_format: None,
            dimensions: None,
            user: None,
            extra: Extra::new(),
        }
    }

    /// The encoding the client asked for (`float` when it named none).
    pub fn format(&self) -> EncodingFormat {
        self.encoding_format.unwrap_or_default()
    }
}

/// The `input` of an embeddings request, in each of the forms OpenAI accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// One text.
    Text(String),
    /// Several texts, one vector each.
    Texts(Vec<String>),
    /// One input given as token ids.
    Tokens(Vec<u32>),
    /// Several inputs given as token ids.
    TokenBatches(Vec<Vec<u32>>),
}

impl EmbeddingInput {
    /// How many vectors the input asks for.
    pub fn len(&self) -> usize {
        match self {
            EmbeddingInput::Text(_) | EmbeddingInput::Tokens(_) => 1,
            EmbeddingInput::Texts(t) => t.len(),
            EmbeddingInput::TokenBatches(b) => b.len(),
        }
    }

    /// Whether it asks for no vector at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each input, as text or as token ids.
    pub fn items(&self) -> impl Iterator<Item = InputItem<'_>> {
        let (texts, batches, single): (&[String], &[Vec<u32>], Option<&[u32]>) = match self {
            EmbeddingInput::Text(t) => (std::slice::from_ref(t), &[], None),
            EmbeddingInput::Texts(t) => (t, &[], None),
            EmbeddingInput::Tokens(t) => (&[], &[], Some(t)),
            EmbeddingInput::TokenBatches(b) => (&[], b, None),
        };
        texts
            .iter()
            .map(|t| InputItem::Text(t))
            .chain(batches.iter().map(|b| InputItem::Tokens(b)))
            .chain(single.map(InputItem::Tokens))
    }
}

impl From<&str> for EmbeddingInput {
    fn from(s: &str) -> Self {
        EmbeddingInput::Text(s.to_owned())
    }
}

impl From<String> for EmbeddingInput {
    fn from(s: String) -> Self {
        EmbeddingInput::Text(s)
    }
}

impl From<Vec<String>> for EmbeddingInput {
    fn from(v: Vec<String>) -> Self {
        EmbeddingInput::Texts(v)
    }
}

impl From<Vec<&str>> for EmbeddingInput {
    fn from(v: Vec<&str>) -> Self {
        EmbeddingInput::Texts(v.into_iter().map(str::to_owned).collect())
    }
}

/// One input of an [`EmbeddingInput`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputItem<'a> {
    /// A text.
    Text(&'a str),
    /// Token ids.
    Tokens(&'a [u32]),
}

/// How the vectors of a response are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    /// JSON arrays of numbers.
    #[default]
    Float,
    /// Base64 of the little-endian `f32`s.
    Base64,
}

/// The answer to an embeddings request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingResponse {
    /// `"list"`.
    #[serde(default = "list")]
    pub object: String,
    /// One vector per input, in the input's order (`index`).
    #[serde(default)]
    pub data: Vec<Embedding>,
    /// The model as the provider names it.
    #[serde(default)]
    pub model: String,
    /// Tokens read; embeddings have no completion tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<EmbeddingUsage>,
    /// Other fields the provider sent, passed through.
    #[serde(flatten)]
    pub extra: Extra,
}

fn list() -> String {
    "list".to_owned()
}

fn embedding() -> String {
    "embedding".to_owned()
}

impl EmbeddingResponse {
    /// Writes every vector in `format`: floats become base64 of their little-endian
    /// `f32`s, base64 becomes floats. Whatever the provider sent, the client gets what
    /// it asked for.
    ///
    /// # Errors
    /// A message when a base64 vector is not valid base64 of whole `f32`s.
    pub fn convert_to(&mut self, format: EncodingFormat) -> Result<(), String> {
        for (i, d) in self.data.iter_mut().enumerate() {
            match (format, &d.embedding) {
                (EncodingFormat::Base64, EmbeddingVector::Float(v)) => {
                    let mut bytes = Vec::with_capacity(v.len() * 4);
                    for x in v {
                        bytes.extend_from_slice(&(*x as f32).to_le_bytes());
                    }
                    d.embedding = EmbeddingVector::Base64(base64_encode(&bytes));
                }
                (EncodingFormat::Float, EmbeddingVector::Base64(s)) => {
                    let bytes = base64_decode(s)
                        .filter(|b| b.len() % 4 == 0)
                        .ok_or_else(|| format!("data[{i}].embedding is not base64 of f32s"))?;
                    let v = bytes
                        .chunks_exact(4)
                        .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                        .collect();
                    d.embedding = EmbeddingVector::Float(v);
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// One vector of an [`EmbeddingResponse`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    /// `"embedding"`.
    #[serde(default = "embedding")]
    pub object: String,
    /// The vector.
    pub embedding: EmbeddingVector,
    /// Which input it embeds (0-based).
    #[serde(default)]
    pub index: u32,
    /// Other fields the provider sent, passed through.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A vector as numbers or as base64 ([`EncodingFormat`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    /// The numbers (kept as `f64` so that they pass through as the provider wrote them).
    Float(Vec<f64>),
    /// Base64 of the little-endian `f32`s.
    Base64(String),
}

impl EmbeddingVector {
    /// The vector's length (for base64, its `f32`s; 0 when it does not decode).
    pub fn dimensions(&self) -> usize {
        match self {
            EmbeddingVector::Float(v) => v.len(),
            EmbeddingVector::Base64(s) => base64_decode(s).map_or(0, |b| b.len() / 4),
        }
    }
}

/// The `usage` of an embeddings response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingUsage {
    /// Tokens read.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// The same, as OpenAI reports it.
    #[serde(default)]
    pub total_tokens: u64,
    /// Other fields, passed through.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Parses and checks a `POST /v1/embeddings` body: `model` a non-empty string, `input`
/// a non-empty string, array of strings, array of token ids or array of such arrays
/// (none of them empty), `encoding_format` `float` or `base64`, `dimensions` a positive
/// integer.
///
/// # Errors
/// [`RequestError`] naming the field at fault (`input[2]`), or the body when it is not
/// a JSON object.
pub fn parse_embedding_request(body: &[u8]) -> Result<EmbeddingRequest, RequestError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| RequestError {
        path: None,
        message: format!(
            "request body is not valid JSON: {e} (line {}, column {})",
            e.line(),
            e.column()
        ),
    })?;
    let Some(obj) = value.as_object() else {
        return Err(RequestError {
            path: None,
            message: "request body must be a JSON object".to_owned(),
        });
    };
    match obj.get("model") {
        Some(Value::String(s)) if !s.is_empty() => {}
        Some(Value::String(_)) => return Err(RequestError::at("model", "must not be empty")),
        Some(_) => return Err(RequestError::at("model", "expected a string")),
        None => return Err(RequestError::at("model", "is required")),
    }
    check_input(obj.get("input"))?;
    match obj.get("encoding_format") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "float" || s == "base64" => {}
        Some(_) => {
            return Err(RequestError::at(
                "encoding_format",
                "expected \"float\" or \"base64\"",
            ));
        }
    }
    match obj.get("dimensions") {
        None | Some(Value::Null) => {}
        Some(v)
            if v.as_u64()
                .is_some_and(|n| n > 0 && n <= u64::from(u32::MAX)) => {}
        Some(_) => {
            return Err(RequestError::at(
                "dimensions",
                "expected a positive integer",
            ));
        }
    }
    if let Some(u) = obj.get("user")
        && !u.is_string()
        && !u.is_null()
    {
        return Err(RequestError::at("user", "expected a string"));
    }
    serde_json::from_value(value).map_err(|e| RequestError {
        path: None,
        message: format!("invalid request: {e}"),
    })
}

fn check_input(input: Option<&Value>) -> Result<(), RequestError> {
    const WHAT: &str =
        "expected a string, an array of strings, an array of token ids or an array of such arrays";
    let is_token = |v: &Value| v.as_u64().is_some_and(|n| n <= u64::from(u32::MAX));
    match input {
        None | Some(Value::Null) => Err(RequestError::at("input", "is required")),
        Some(Value::String(s)) if s.is_empty() => {
            Err(RequestError::at("input", "must not be empty"))
        }
        Some(Value::String(_)) => Ok(()),
        Some(Value::Array(items)) if items.is_empty() => {
            Err(RequestError::at("input", "must not be empty"))
        }
        Some(Value::Array(items)) => {
            let kind = |v: &Value| match v {
                Value::String(_) => 0,
                Value::Number(_) => 1,
                Value::Array(_) => 2,
                _ => 3,
            };
            let first = kind(&items[0]);
            for (i, item) in items.iter().enumerate() {
                let at = format!("input[{i}]");
                if kind(item) != first || first == 3 {
                    return Err(RequestError::at(at, WHAT));
                }
                match item {
                    Value::String(s) if s.is_empty() => {
                        return Err(RequestError::at(at, "must not be empty"));
                    }
                    Value::Number(_) if !is_token(item) => {
                        return Err(RequestError::at(at, "expected a token id (an integer ≥ 0)"));
                    }
                    Value::Array(t) if t.is_empty() => {
                        return Err(RequestError::at(at, "must not be empty"));
                    }
                    Value::Array(t) => {
                        if let Some(j) = t.iter().position(|v| !is_token(v)) {
                            return Err(RequestError::at(
                                format!("{at}[{j}]"),
                                "expected a token id (an integer ≥ 0)",
                            ));
                        }
                    }
                    _ => {}
                }
            }
            Ok(())
        }
        Some(_) => Err(RequestError::at("input", WHAT)),
    }
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 (RFC 4648 §4) with padding.
fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64 with optional padding; `None` when it is not base64.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for c in text.bytes() {
        let v = ALPHABET.iter().position(|a| *a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    (bits < 6).then_some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_input_form_parses() {
        for (input, n) in [
            (json!("one"), 1),
            (json!(["a", "b", "c"]), 3),
            (json!([1, 2, 3]), 1),
            (json!([[1, 2], [3]]), 2),
        ] {
            let body = json!({"model": "m", "input": input, "future": {"x": 1}});
            let req = parse_embedding_request(body.to_string().as_bytes()).unwrap();
            assert_eq!(req.input.len(), n, "{input}");
            assert_eq!(req.input.items().count(), n);
            assert_eq!(req.extra["future"], json!({"x": 1}), "unknown fields kept");
            assert_eq!(serde_json::to_value(&req).unwrap(), body, "round trip");
        }
    }

    #[test]
    fn bad_bodies_name_the_field() {
        for (body, path) in [
            (json!({"input": "x"}), "model"),
            (json!({"model": "m"}), "input"),
            (json!({"model": "m", "input": ""}), "input"),
            (json!({"model": "m", "input": []}), "input"),
            (json!({"model": "m", "input": ["a", ""]}), "input[1]"),
            (json!({"model": "m", "input": ["a", 1]}), "input[1]"),
            (json!({"model": "m", "input": [[1], [-1]]}), "input[1][0]"),
            (json!({"model": "m", "input": [1.5]}), "input[0]"),
            (json!({"model": "m", "input": {"a": 1}}), "input"),
            (
                json!({"model": "m", "input": "x", "encoding_format": "int8"}),
                "encoding_format",
            ),
            (
                json!({"model": "m", "input": "x", "dimensions": 0}),
                "dimensions",
            ),
            (json!({"model": "m", "input": "x", "user": 3}), "user"),
        ] {
            let e = parse_embedding_request(body.to_string().as_bytes()).unwrap_err();
            assert_eq!(e.path.as_deref(), Some(path), "{body}: {e}");
        }
        assert!(parse_embedding_request(b"[1]").unwrap_err().path.is_none());
    }

    #[test]
    fn base64_round_trips_and_matches_the_standard() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        for s in ["", "f", "fo", "foo", "foob", "fooba", "foobar"] {
            assert_eq!(
                base64_decode(&base64_encode(s.as_bytes())).unwrap(),
                s.as_bytes()
            );
        }
        assert!(base64_decode("Zm9v!").is_none());
        assert!(base64_decode("Z").is_none(), "a lone sextet is no byte");
    }

    #[test]
    fn vectors_convert_both_ways() {
        let body = json!({"object": "list", "model": "m", "data": [
            {"object": "embedding", "index": 0, "embedding": [0.5, -1.0, 0.25]}
        ], "usage": {"prompt_tokens": 2, "total_tokens": 2}});
        let mut r: EmbeddingResponse = serde_json::from_value(body.clone()).unwrap();
        r.convert_to(EncodingFormat::Base64).unwrap();
        let EmbeddingVector::Base64(b) = &r.data[0].embedding else {
            panic!("not base64")
        };
        // 0.5, -1.0, 0.25 as little-endian f32s.
        assert_eq!(b, "AAAAPwAAgL8AAIA+");
        assert_eq!(r.data[0].embedding.dimensions(), 3);
        r.convert_to(EncodingFormat::Float).unwrap();
        assert_eq!(serde_json::to_value(&r).unwrap(), body);
        r.data[0].embedding = EmbeddingVector::Base64("AAA".into());
        assert!(r.convert_to(EncodingFormat::Float).is_err());
    }
}
