//! The body of an OpenAI chat-completions request, serialized from a
//! [`ProviderRequest`] by borrowing: the attempt's changes (model, defaults, stream) are
//! applied as it is written, and the client's request is never cloned.

use echelon_types::{ChatCompletionRequest, ChatMessage, Extra};
use serde::Serialize;

use crate::provider::ProviderRequest;

/// The JSON body sent, field for field the client's [`ChatCompletionRequest`] (in its
/// order, so that the bytes are those a serialized, edited copy would give).
#[derive(Debug, Serialize)]
pub(super) struct WireRequest<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<WireStreamOptions<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(flatten)]
    extra: &'a Extra,
}

/// `stream_options`: the client's, with `include_usage` forced on in a stream.
#[derive(Debug, Serialize)]
struct WireStreamOptions<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    include_usage: Option<bool>,
    #[serde(flatten)]
    extra: Option<&'a Extra>,
}

impl<'a> WireRequest<'a> {
    /// The body for `req`: `model` replaced; the echelon's temperature when the client
    /// set none, its `max_tokens` when the client set neither cap; a stream with a final
    /// usage chunk asked for (the gateway always accounts for usage), or no `stream`
    /// field at all.
    pub(super) fn new(req: &ProviderRequest<'a>) -> Self {
        let body: &'a ChatCompletionRequest = req.body;
        let client_options = body.stream_options.as_ref();
        let stream_options = if req.stream {
            Some(WireStreamOptions {
                include_usage: Some(true),
                extra: client_options.map(|o| &o.extra),
            })
        } else {
            client_options.map(|o| WireStreamOptions {
                include_usage: o.include_usage,
                extra: Some(&o.extra),
            })
        };
        WireRequest {
            model: req.model,
            messages: &body.messages,
            stream: req.stream.then_some(true),
            stream_options,
            max_tokens: match body.max_output_tokens() {
                None => req.max_tokens,
                Some(_) => body.max_tokens,
            },
            max_completion_tokens: body.max_completion_tokens,
            temperature: req.effective_temperature(),
            user: body.user.as_deref(),
            extra: &body.extra,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// What the gateway sent before requests were shared: a clone of the client's
    /// request, edited (router.rs `run_plan`, `EchelonDefaults::apply`,
    /// `Gateway::chat_with` / `chat_stream_with`), then serialized.
    fn cloned_and_mutated(
        client: &ChatCompletionRequest,
        model: &str,
        temperature: Option<f64>,
        max_tokens: Option<u32>,
        stream: bool,
    ) -> Vec<u8> {
        let mut req = client.clone();
        if stream {
            req.stream = Some(true);
            req.stream_options
                .get_or_insert_with(Default::default)
                .include_usage = Some(true);
        } else {
            req.stream = None;
        }
        if req.temperature.is_none() {
            req.temperature = temperature;
        }
        if req.max_output_tokens().is_none() {
            req.max_tokens = max_tokens;
        }
        req.model.clear();
        req.model.push_str(model);
        serde_json::to_vec(&req).unwrap()
    }

    fn borrowed(
        client: &ChatCompletionRequest,
        model: &str,
        temperature: Option<f64>,
        max_tokens: Option<u32>,
        stream: bool,
    ) -> Vec<u8> {
        let req = ProviderRequest {
            body: client,
            model,
            temperature,
            max_tokens,
            stream,
        };
        serde_json::to_vec(&WireRequest::new(&req)).unwrap()
    }

    /// Client requests covering every field the edits touch.
    const CLIENTS: [&str; 9] = [
        r#"{"model":"route","messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"route","messages":[{"role":"user","content":"hi"}],"temperature":0.2,"max_tokens":7}"#,
        r#"{"model":"route","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":9}"#,
        r#"{"model":"route","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"max_completion_tokens":9}"#,
        r#"{"model":"route","messages":[],"stream":true,"stream_options":{"include_usage":false,"chunk_hint":1}}"#,
        r#"{"model":"route","messages":[],"stream":false,"stream_options":{"include_usage":true}}"#,
        r#"{"model":"route","messages":[],"stream_options":{"other":"x"},"user":"u-1"}"#,
        r#"{"model":"route","messages":[{"role":"system","content":"be brief","name":"s"},{"role":"assistant","content":null,"tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"{}"}}]}],"tools":[{"type":"function","function":{"name":"f"}}],"top_p":0.9,"seed":42,"response_format":{"type":"json_object"}}"#,
        r#"{"model":"route","messages":[{"role":"user","content":[{"type":"text","text":"what?"},{"type":"image_url","image_url":{"url":"data:x"}}]}],"logit_bias":{"50256":-100},"n":2,"temperature":0}"#,
    ];

    #[test]
    fn serializes_as_the_cloned_and_mutated_request_did() {
        let defaults = [
            (None, None),
            (Some(0.7), None),
            (None, Some(128)),
            (Some(1.5), Some(64)),
        ];
        for client in CLIENTS {
            let client: ChatCompletionRequest = serde_json::from_str(client).unwrap();
            for (temperature, max_tokens) in defaults {
                for stream in [false, true] {
                    let old = cloned_and_mutated(&client, "up-1", temperature, max_tokens, stream);
                    let new = borrowed(&client, "up-1", temperature, max_tokens, stream);
                    assert_eq!(
                        String::from_utf8(new).unwrap(),
                        String::from_utf8(old).unwrap(),
                        "client {client:?}, defaults {temperature:?}/{max_tokens:?}, stream {stream}"
                    );
                }
            }
        }
    }

    fn wire(
        client: &str,
        temperature: Option<f64>,
        max_tokens: Option<u32>,
        stream: bool,
    ) -> serde_json::Value {
        let client: ChatCompletionRequest = serde_json::from_str(client).unwrap();
        serde_json::from_slice(&borrowed(&client, "up-1", temperature, max_tokens, stream)).unwrap()
    }

    #[test]
    fn replaces_the_model_and_applies_defaults_only_when_unset() {
        let v = wire(CLIENTS[0], Some(0.7), Some(128), false);
        assert_eq!(v["model"], "up-1");
        assert_eq!(v["temperature"], 0.7);
        assert_eq!(v["max_tokens"], 128);
        assert!(v.get("stream").is_none());
        assert!(v.get("stream_options").is_none());

        let v = wire(CLIENTS[1], Some(0.7), Some(128), false);
        assert_eq!(v["temperature"], 0.2);
        assert_eq!(v["max_tokens"], 7);

        // max_completion_tokens is a cap: the default max_tokens is not added beside it.
        let v = wire(CLIENTS[2], None, Some(128), false);
        assert_eq!(v["max_completion_tokens"], 9);
        assert!(v.get("max_tokens").is_none());
    }

    #[test]
    fn a_stream_asks_for_usage_and_keeps_the_clients_other_options() {
        let v = wire(CLIENTS[4], None, None, true);
        assert_eq!(v["stream"], true);
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "chunk_hint": 1})
        );
        let v = wire(CLIENTS[0], None, None, true);
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true})
        );
    }

    #[test]
    fn passes_unknown_fields_through() {
        let v = wire(CLIENTS[7], None, None, false);
        assert_eq!(v["top_p"], 0.9);
        assert_eq!(v["seed"], 42);
        assert_eq!(v["tools"][0]["function"]["name"], "f");
        assert_eq!(v["response_format"]["type"], "json_object");
        assert_eq!(v["messages"][1]["tool_calls"][0]["id"], "t");
    }
}
