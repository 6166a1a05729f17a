//! `POST /v1/embeddings` as the fake upstream answers it: one deterministic vector per
//! input, from a hash of the input, so that a test can check which vector belongs to
//! which input and that the gateway passed them through unchanged.

use serde_json::{Value, json};

/// Vector length when the request names no `dimensions`.
pub const DEFAULT_DIMENSIONS: usize = 8;

/// One input: a text, or token ids.
enum Input<'a> {
    Text(&'a str),
    Tokens(Vec<u64>),
}

impl Input<'_> {
    /// Tokens the fake counts: a text's characters / 4 rounded up (at least 1), or the
    /// number of token ids.
    fn tokens(&self) -> usize {
        match self {
            Input::Text(t) => t.chars().count().div_ceil(4).max(1),
            Input::Tokens(ids) => ids.len(),
        }
    }

    /// FNV-1a of the text's bytes, or of the ids' decimal forms joined by `,`.
    fn hash(&self) -> u64 {
        let bytes: Vec<u8> = match self {
            Input::Text(t) => t.as_bytes().to_vec(),
            Input::Tokens(ids) => ids
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",")
                .into_bytes(),
        };
        bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        })
    }
}

/// The inputs of a request body, or why it is refused (a 400's message).
fn inputs(body: &Value) -> Result<Vec<Input<'_>>, String> {
    let ids = |v: &Value| -> Option<Vec<u64>> { v.as_array()?.iter().map(Value::as_u64).collect() };
    match body.get("input") {
        Some(Value::String(s)) if !s.is_empty() => Ok(vec![Input::Text(s)]),
        Some(Value::Array(items)) if !items.is_empty() => {
            if items.iter().all(Value::is_u64) {
                return Ok(vec![Input::Tokens(ids(&body["input"]).unwrap_or_default())]);
            }
            items
                .iter()
                .map(|item| match item {
                    Value::String(s) if !s.is_empty() => Ok(Input::Text(s)),
                    Value::Array(_) => ids(item)
                        .filter(|v| !v.is_empty())
                        .map(Input::Tokens)
                        .ok_or_else(|| "\"input\" holds an invalid token array".to_owned()),
                    _ => Err("\"input\" must be strings or token arrays".to_owned()),
                })
                .collect()
        }
        _ => Err("\"input\" must not be empty".to_owned()),
    }
}

/// The vector of an input: `dims` numbers from a SplitMix64 sequence seeded by the
/// input's hash, scaled to unit length.
pub fn vector_for(hash: u64, dims: usize) -> Vec<f32> {
    let mut state = hash;
    let mut v: Vec<f32> = (0..dims)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            // The top 24 bits as a number in [-1, 1).
            ((z >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut v {
            *x /= norm;
        }
    }
    v
}

/// The vector the fake upstream answers for the text `input` with `dims` numbers
/// (a test's expected value).
pub fn text_vector(input: &str, dims: usize) -> Vec<f32> {
    vector_for(Input::Text(input).hash(), dims)
}

/// The largest input's tokens, as [`answer`] counts them (for the context check).
pub(crate) fn largest_input_tokens(body: &Value) -> usize {
    inputs(body)
        .map(|i| i.iter().map(Input::tokens).max().unwrap_or(0))
        .unwrap_or(0)
}

/// The answer to an embeddings request body: `{"object":"list","data":[…],"model",
/// "usage":{"prompt_tokens","total_tokens"}}`, each vector a JSON array or, with
/// `encoding_format: base64`, base64 of its little-endian `f32`s. `Err` is a 400's
/// message.
pub(crate) fn answer(body: &Value, model: &str) -> Result<Value, String> {
    let inputs = inputs(body)?;
    let dims = body
        .get("dimensions")
        .and_then(Value::as_u64)
        .map_or(DEFAULT_DIMENSIONS, |d| d as usize)
        .clamp(1, 8192);
    let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let tokens: usize = inputs.iter().map(Input::tokens).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let v = vector_for(input.hash(), dims);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64_encode(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
}

/// Standard base64 (RFC 4648 §4) with padding.
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            out.push(if i <= chunk.len() {
                char::from(ALPHABET[((n >> shift) & 63) as usize])
            } else {
                '='
            });
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn vectors_are_deterministic_unit_vectors_per_input() {
        let a = answer(&json!({"input": ["a", "b", "a"]}), "m").unwrap();
        let data = a["data"].as_array().unwrap();
        assert_eq!(data.len(), 3);
        assert_eq!(data[0]["embedding"], data[2]["embedding"]);
        assert_ne!(data[0]["embedding"], data[1]["embedding"]);
        assert_eq!(data[1]["index"], 1);
        let v = text_vector("a", DEFAULT_DIMENSIONS);
        assert_eq!(data[0]["embedding"], json!(v));
        let norm: f32 = v.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-5);
        assert_eq!(a["usage"]["prompt_tokens"], 3);
    }

    #[test]
    fn dimensions_tokens_and_base64_are_honoured() {
        let a = answer(
            &json!({"input": [[1, 2, 3], [4]], "dimensions": 3, "encoding_format": "base64"}),
            "m",
        )
        .unwrap();
        assert_eq!(a["usage"]["total_tokens"], 4);
        // 3 f32s = 12 bytes = 16 base64 characters.
        assert_eq!(a["data"][0]["embedding"].as_str().unwrap().len(), 16);
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert!(answer(&json!({"input": []}), "m").is_err());
        assert!(answer(&json!({"input": ""}), "m").is_err());
        assert_eq!(
            largest_input_tokens(&json!({"input": ["abcdefghi", "a"]})),
            3
        );
    }
}
