//! The body of a Gemini `generateContent` / `streamGenerateContent` request, built
//! from a [`ProviderRequest`] (the neutral OpenAI chat shape).
//!
//! Mapping (Gemini API reference, `models.generateContent`, `Content`, `Part`, `Tool`,
//! `GenerationConfig`):
//! - `system` / `developer` messages → `systemInstruction.parts` (text only);
//! - `user` → role `user`; `assistant` → role `model` (text, then one `functionCall`
//!   part per tool call, its `thoughtSignature` restored from the tool call's
//!   `extra_content.google.thought_signature`); `tool` / `function` → role `user`
//!   `functionResponse` parts (consecutive results in one turn, the function name
//!   found from the assistant's tool call of that `tool_call_id`);
//! - content parts: `text`; `image_url` / `file` / `input_audio` with a `data:` URL or
//!   base64 data → `inlineData`; an `http(s)` image URL → `fileData` (`fileUri`, the
//!   MIME type guessed from the extension when it can be);
//! - `temperature`, `top_p`, `top_k`, `max_completion_tokens` / `max_tokens`, `stop`,
//!   `seed`, `presence_penalty`, `frequency_penalty`, `n` → `generationConfig`;
//!   `response_format` `json_object` → `responseMimeType: application/json`,
//!   `json_schema` → that plus `responseJsonSchema` (full JSON Schema, as OpenAI
//!   clients write it; `responseSchema` accepts only an OpenAPI subset);
//! - `tools` (functions) → `tools[0].functionDeclarations` (`parametersJsonSchema`);
//!   `tool_choice` → `toolConfig.functionCallingConfig` (`none` → `NONE`, `auto` →
//!   `AUTO`, `required` → `ANY`, a named function → `ANY` with `allowedFunctionNames`).
//!
//! Everything else the client sent (`logprobs`, `logit_bias`, `user`, vendor fields,
//! `stream_options`) is not sent: Gemini refuses unknown fields.

use echelon_types::{ChatMessage, Role};
use serde_json::{Map, Value, json};

use crate::provider::ProviderRequest;
use crate::provider::error::{ErrorKind, ProviderError};

/// Why a request cannot be said in Gemini's wire: the request's fault
/// ([`ErrorKind::BadRequest`]), so no other model is tried on its account.
fn unsupported(message: impl Into<String>) -> ProviderError {
    ProviderError::new(ErrorKind::BadRequest, message)
}

/// The JSON body for `req` (the model goes in the URL, the stream choice in the
/// method).
///
/// # Errors
/// [`ErrorKind::BadRequest`] for what the wire cannot carry: a content part of an
/// unknown type, an image URL that is neither `data:` nor `http(s)`, tool-call
/// arguments that are not a JSON object, a role-`tool` message whose call is unknown
/// and that names no function, a non-text system message part.
pub(crate) fn body(req: &ProviderRequest<'_>) -> Result<Value, ProviderError> {
    let body = req.body;
    let mut system: Vec<Value> = Vec::new();
    let mut contents: Vec<Value> = Vec::new();
    // tool_call_id → function name, from the assistant turns seen so far.
    let mut call_names: Vec<(String, String)> = Vec::new();
    for (i, message) in body.messages.iter().enumerate() {
        match message.role {
            Role::System | Role::Developer => {
                for part in parts(&message.content, i)? {
                    if part.get("text").is_none() {
                        return Err(unsupported(format!(
                            "messages[{i}]: a system message may hold only text for Gemini"
                        )));
                    }
                    system.push(part);
                }
            }
            Role::User => {
                contents.push(json!({"role": "user", "parts": parts(&message.content, i)?}))
            }
            Role::Assistant => {
                let mut model_parts = match &message.content {
                    Value::Null => Vec::new(),
                    Value::String(s) if s.is_empty() => Vec::new(),
                    content => parts(content, i)?,
                };
                if let Some(calls) = message.extra.get("tool_calls").and_then(Value::as_array) {
                    for (j, call) in calls.iter().enumerate() {
                        let (part, id, name) = function_call(call, i, j)?;
                        if let Some(id) = id {
                            call_names.push((id, name));
                        }
                        model_parts.push(part);
                    }
                }
                if model_parts.is_empty() {
                    // Gemini refuses a turn without parts; an empty assistant turn says nothing.
                    continue;
                }
                contents.push(json!({"role": "model", "parts": model_parts}));
            }
            Role::Tool | Role::Function => {
                let part = function_response(message, &call_names, i)?;
                // The results of one turn's parallel calls go back in one turn.
                match contents.last_mut() {
                    Some(last) if is_function_responses(last) => {
                        if let Some(p) = last.get_mut("parts").and_then(Value::as_array_mut) {
                            p.push(part);
                        }
                    }
                    _ => contents.push(json!({"role": "user", "parts": [part]})),
                }
            }
        }
    }

    let mut out = Map::new();
    out.insert("contents".into(), Value::Array(contents));
    if !system.is_empty() {
        out.insert("systemInstruction".into(), json!({"parts": system}));
    }
    let config = generation_config(req)?;
    if !config.is_empty() {
        out.insert("generationConfig".into(), Value::Object(config));
    }
    if let Some(tools) = tools(body.extra.get("tools"))? {
        out.insert("tools".into(), tools);
    }
    if let Some(choice) = tool_config(body.extra.get("tool_choice"))? {
        out.insert("toolConfig".into(), choice);
    }
    Ok(Value::Object(out))
}

/// Whether a content is a turn of function responses (to which another joins).
fn is_function_responses(content: &Value) -> bool {
    content["role"] == "user"
        && content["parts"]
            .as_array()
            .is_some_and(|p| !p.is_empty() && p.iter().all(|p| p.get("functionResponse").is_some()))
}

/// The parts of a message `content`: a string is one text part; an array maps part by
/// part; null is no part.
fn parts(content: &Value, i: usize) -> Result<Vec<Value>, ProviderError> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => Ok(vec![json!({"text": s})]),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(j, p)| part(p, i, j))
            .collect(),
        _ => Err(unsupported(format!(
            "messages[{i}].content must be a string, an array of parts or null"
        ))),
    }
}

/// One OpenAI content part as a Gemini part.
fn part(p: &Value, i: usize, j: usize) -> Result<Value, ProviderError> {
    let at = || format!("messages[{i}].content[{j}]");
    let kind = p.get("type").and_then(Value::as_str).unwrap_or("text");
    match kind {
        "text" => Ok(json!({"text": p.get("text").and_then(Value::as_str).unwrap_or("")})),
        "image_url" => {
            let url = p
                .pointer("/image_url/url")
                .or_else(|| p.get("image_url"))
                .and_then(Value::as_str)
                .ok_or_else(|| unsupported(format!("{}: image_url without a url", at())))?;
            url_part(url).ok_or_else(|| {
                unsupported(format!(
                    "{}: Gemini takes an image as a `data:` URL (inline) or an http(s) URL",
                    at()
                ))
            })
        }
        "input_audio" => {
            let data = p.pointer("/input_audio/data").and_then(Value::as_str);
            let format = p
                .pointer("/input_audio/format")
                .and_then(Value::as_str)
                .unwrap_or("wav");
            match data {
                Some(data) => {
                    Ok(json!({"inlineData": {"mimeType": format!("audio/{format}"), "data": data}}))
                }
                None => Err(unsupported(format!("{}: input_audio without data", at()))),
            }
        }
        "file" => {
            let data = p.pointer("/file/file_data").and_then(Value::as_str);
            match data.and_then(url_part) {
                Some(part) => Ok(part),
                None => Err(unsupported(format!(
                    "{}: Gemini takes a file as a `data:` URL in `file.file_data` (a `file_id` is not known to it)",
                    at()
                ))),
            }
        }
        other => Err(unsupported(format!(
            "{}: content part type `{other}` has no Gemini equivalent",
            at()
        ))),
    }
}

/// A `data:<mime>;base64,<data>` URL as `inlineData`, an `http(s)` URL as `fileData`;
/// `None` for anything else.
fn url_part(url: &str) -> Option<Value> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest.split_once(',')?;
        let mime = meta.strip_suffix(";base64")?;
        let mime = if mime.is_empty() {
            "application/octet-stream"
        } else {
            mime
        };
        return Some(json!({"inlineData": {"mimeType": mime, "data": data}}));
    }
    if url.starts_with("https://") || url.starts_with("http://") || url.starts_with("gs://") {
        let mut file = Map::new();
        if let Some(mime) = mime_of(url) {
            file.insert("mimeType".into(), json!(mime));
        }
        file.insert("fileUri".into(), json!(url));
        return Some(json!({ "fileData": file }));
    }
    None
}

/// The MIME type an URL's extension names (images, PDF), if it names one.
fn mime_of(url: &str) -> Option<&'static str> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let ext = path.rsplit_once('.')?.1.to_ascii_lowercase();
    Some(match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "heif" => "image/heif",
        "pdf" => "application/pdf",
        _ => return None,
    })
}

/// An assistant tool call as a `functionCall` part, with its id and name.
fn function_call(
    call: &Value,
    i: usize,
    j: usize,
) -> Result<(Value, Option<String>, String), ProviderError> {
    let at = || format!("messages[{i}].tool_calls[{j}]");
    let name = call
        .pointer("/function/name")
        .and_then(Value::as_str)
        .ok_or_else(|| unsupported(format!("{}: a tool call without a function name", at())))?;
    let args = match call.pointer("/function/arguments") {
        None | Some(Value::Null) => json!({}),
        Some(Value::String(s)) if s.trim().is_empty() => json!({}),
        Some(Value::String(s)) => serde_json::from_str::<Value>(s)
            .ok()
            .filter(Value::is_object)
            .ok_or_else(|| {
                unsupported(format!(
                    "{}: function arguments must be a JSON object for Gemini",
                    at()
                ))
            })?,
        Some(v @ Value::Object(_)) => v.clone(),
        Some(_) => {
            return Err(unsupported(format!(
                "{}: function arguments must be a JSON object for Gemini",
                at()
            )));
        }
    };
    let mut part = Map::new();
    part.insert("functionCall".into(), json!({"name": name, "args": args}));
    if let Some(sig) = call
        .pointer("/extra_content/google/thought_signature")
        .and_then(Value::as_str)
    {
        part.insert("thoughtSignature".into(), json!(sig));
    }
    let id = call.get("id").and_then(Value::as_str).map(str::to_owned);
    Ok((Value::Object(part), id, name.to_owned()))
}

/// A role-`tool` (or `function`) message as a `functionResponse` part: a content that
/// is a JSON object is the response as it is; anything else is `{"result": text}`.
fn function_response(
    message: &ChatMessage,
    call_names: &[(String, String)],
    i: usize,
) -> Result<Value, ProviderError> {
    let by_id = message
        .extra
        .get("tool_call_id")
        .and_then(Value::as_str)
        .and_then(|id| call_names.iter().rev().find(|(c, _)| c == id))
        .map(|(_, name)| name.as_str());
    let name = by_id
        .or_else(|| message.extra.get("name").and_then(Value::as_str))
        .ok_or_else(|| {
            unsupported(format!(
                "messages[{i}]: a tool result whose tool_call_id matches no earlier tool call \
                 and that names no function (Gemini needs the function's name)"
            ))
        })?;
    let text = message.text();
    let response = match serde_json::from_str::<Value>(&text) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({ "result": text }),
    };
    Ok(json!({"functionResponse": {"name": name, "response": response}}))
}

/// `generationConfig` from the request's sampling and output settings.
fn generation_config(req: &ProviderRequest<'_>) -> Result<Map<String, Value>, ProviderError> {
    let extra = &req.body.extra;
    let mut config = Map::new();
    if let Some(t) = req.effective_temperature() {
        config.insert("temperature".into(), json!(t));
    }
    for (from, to) in [
        ("top_p", "topP"),
        ("top_k", "topK"),
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ] {
        if let Some(v) = extra.get(from).filter(|v| v.is_number()) {
            config.insert(to.into(), v.clone());
        }
    }
    if let Some(n) = extra.get("n").and_then(Value::as_u64).filter(|n| *n > 1) {
        config.insert("candidateCount".into(), json!(n));
    }
    if let Some(max) = req.effective_max_tokens() {
        config.insert("maxOutputTokens".into(), json!(max));
    }
    match extra.get("stop") {
        Some(Value::String(s)) => {
            config.insert("stopSequences".into(), json!([s]));
        }
        Some(Value::Array(stops)) if !stops.is_empty() => {
            config.insert("stopSequences".into(), Value::Array(stops.clone()));
        }
        _ => {}
    }
    if let Some(format) = extra.get("response_format") {
        match format.get("type").and_then(Value::as_str) {
            Some("json_object") => {
                config.insert("responseMimeType".into(), json!("application/json"));
            }
            Some("json_schema") => {
                config.insert("responseMimeType".into(), json!("application/json"));
                if let Some(schema) = format.pointer("/json_schema/schema") {
                    config.insert("responseJsonSchema".into(), schema.clone());
                }
            }
            Some("text") | None => {}
            Some(other) => {
                return Err(unsupported(format!(
                    "response_format type `{other}` has no Gemini equivalent"
                )));
            }
        }
    }
    Ok(config)
}

/// `tools`: the function tools as one tool of `functionDeclarations`.
fn tools(tools: Option<&Value>) -> Result<Option<Value>, ProviderError> {
    let Some(tools) = tools.and_then(Value::as_array).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    let mut declarations = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let kind = tool
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("function");
        if kind != "function" {
            return Err(unsupported(format!(
                "tools[{i}]: tool type `{kind}` has no Gemini equivalent (only functions)"
            )));
        }
        let f = tool.get("function").unwrap_or(&Value::Null);
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| unsupported(format!("tools[{i}]: a function without a name")))?;
        let mut d = Map::new();
        d.insert("name".into(), json!(name));
        if let Some(desc) = f.get("description").and_then(Value::as_str) {
            d.insert("description".into(), json!(desc));
        }
        if let Some(params) = f.get("parameters").filter(|p| p.is_object()) {
            d.insert("parametersJsonSchema".into(), params.clone());
        }
        declarations.push(Value::Object(d));
    }
    Ok(Some(json!([{ "functionDeclarations": declarations }])))
}

/// `toolConfig` from `tool_choice`.
fn tool_config(choice: Option<&Value>) -> Result<Option<Value>, ProviderError> {
    let config = |mode: &str| json!({"functionCallingConfig": {"mode": mode}});
    Ok(match choice {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match s.as_str() {
            "none" => Some(config("NONE")),
            "auto" => Some(config("AUTO")),
            "required" => Some(config("ANY")),
            other => return Err(unsupported(format!("tool_choice `{other}` is not known"))),
        },
        Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
            Some(name) => Some(json!({"functionCallingConfig": {
                "mode": "ANY", "allowedFunctionNames": [name]
            }})),
            None => return Err(unsupported("tool_choice names no function")),
        },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use echelon_types::ChatCompletionRequest;

    fn wire(client: Value) -> Result<Value, ProviderError> {
        let client: ChatCompletionRequest = serde_json::from_value(client).unwrap();
        body(&ProviderRequest::new(&client, "gemini-x", false))
    }

    #[test]
    fn maps_roles_system_and_generation_config() {
        let v = wire(json!({
            "model": "route",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": [{"type": "text", "text": "again"}]}
            ],
            "temperature": 0.2, "top_p": 0.9, "max_completion_tokens": 50, "stop": "END",
            "seed": 7, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
            "logprobs": true, "user": "u"
        }))
        .unwrap();
        assert_eq!(
            v["systemInstruction"],
            json!({"parts": [{"text": "be brief"}]})
        );
        assert_eq!(
            v["contents"],
            json!([
                {"role": "user", "parts": [{"text": "hi"}]},
                {"role": "model", "parts": [{"text": "hello"}]},
                {"role": "user", "parts": [{"text": "again"}]}
            ])
        );
        assert_eq!(
            v["generationConfig"],
            json!({"temperature": 0.2, "topP": 0.9, "seed": 7, "maxOutputTokens": 50,
                   "stopSequences": ["END"], "responseMimeType": "application/json",
                   "responseJsonSchema": {"type": "object"}})
        );
        assert!(v.get("logprobs").is_none() && v.get("user").is_none());
    }

    #[test]
    fn maps_a_tool_call_round_trip() {
        let v = wire(json!({
            "model": "route",
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                     "extra_content": {"google": {"thought_signature": "sig"}}},
                    {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}}
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\":21}"},
                {"role": "tool", "tool_call_id": "call_2", "content": "noon"}
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "d",
                       "parameters": {"type": "object", "additionalProperties": false}}}],
            "tool_choice": "required"
        }))
        .unwrap();
        assert_eq!(
            v["contents"][1],
            json!({"role": "model", "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "sig"},
                {"functionCall": {"name": "get_time", "args": {}}}
            ]})
        );
        assert_eq!(
            v["contents"][2],
            json!({"role": "user", "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}},
                {"functionResponse": {"name": "get_time", "response": {"result": "noon"}}}
            ]})
        );
        assert_eq!(v["contents"].as_array().unwrap().len(), 3);
        assert_eq!(
            v["tools"],
            json!([{"functionDeclarations": [{"name": "get_weather", "description": "d",
                    "parametersJsonSchema": {"type": "object", "additionalProperties": false}}]}])
        );
        assert_eq!(
            v["toolConfig"],
            json!({"functionCallingConfig": {"mode": "ANY"}})
        );
    }

    #[test]
    fn maps_images_and_refuses_what_it_cannot_carry() {
        let v = wire(
            json!({"model": "r", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                {"type": "image_url", "image_url": {"url": "https://x.test/cat.JPG?s=1"}}
            ]}]}),
        )
        .unwrap();
        assert_eq!(
            v["contents"][0]["parts"],
            json!([{"inlineData": {"mimeType": "image/png", "data": "iVBO"}},
                   {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://x.test/cat.JPG?s=1"}}])
        );
        for bad in [
            json!({"model": "r", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}]}),
            json!({"model": "r", "messages": [{"role": "user", "content": [{"type": "video", "video": {}}]}]}),
            json!({"model": "r", "messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]}),
            json!({"model": "r", "messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}]}]}),
        ] {
            let e = wire(bad.clone()).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest, "{bad}: {e}");
        }
    }

    #[test]
    fn the_echelon_defaults_apply_only_when_unset() {
        let client: ChatCompletionRequest = serde_json::from_value(
            json!({"model": "r", "messages": [{"role": "user", "content": "x"}]}),
        )
        .unwrap();
        let req = ProviderRequest {
            temperature: Some(0.5),
            max_tokens: Some(9),
            ..ProviderRequest::new(&client, "g", true)
        };
        let v = body(&req).unwrap();
        assert_eq!(
            v["generationConfig"],
            json!({"temperature": 0.5, "maxOutputTokens": 9})
        );
    }
}
