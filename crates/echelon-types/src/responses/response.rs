//! The Response object, and a chat completion translated to one.

use serde::Serialize;
use serde_json::{Map, Value, json};

use super::Echo;
use crate::{ChatCompletion, Usage};

/// A Response object (`object: "response"`), as `POST /v1/responses` answers it and
/// as the `response.*` stream events carry it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Response {
    /// `resp_…`.
    pub id: String,
    /// Always `response`.
    pub object: &'static str,
    /// Unix time (s) of creation.
    pub created_at: u64,
    /// `in_progress`, `completed`, `incomplete` or `failed`.
    pub status: &'static str,
    /// Always `false`: Echelon runs no background responses.
    pub background: bool,
    /// Set when `status` is `failed`: `{code, message, attempts}`.
    pub error: Option<Value>,
    /// Set when `status` is `incomplete`: `{reason}` (`max_output_tokens`,
    /// `content_filter`).
    pub incomplete_details: Option<Value>,
    /// The request's `instructions`.
    pub instructions: Value,
    /// The request's `max_output_tokens`.
    pub max_output_tokens: Option<u32>,
    /// The request's `metadata`.
    pub metadata: Map<String, Value>,
    /// The model that answered, as the upstream names it (the route when it names none).
    pub model: String,
    /// The output items: a `message`, `function_call`s.
    pub output: Vec<OutputItem>,
    /// The request's `parallel_tool_calls`.
    pub parallel_tool_calls: bool,
    /// Always null: nothing is stored to continue from.
    pub previous_response_id: Option<String>,
    /// The request's `reasoning`.
    pub reasoning: Value,
    /// Always `false`: Echelon stores no responses.
    pub store: bool,
    /// The request's `temperature`.
    pub temperature: Value,
    /// The request's `text`.
    pub text: Value,
    /// The request's `tool_choice`.
    pub tool_choice: Value,
    /// The request's `tools`, in the Responses shape.
    pub tools: Vec<Value>,
    /// The request's `top_p`.
    pub top_p: Value,
    /// Always `disabled`.
    pub truncation: &'static str,
    /// Token counts, when the upstream reported them.
    pub usage: Option<ResponseUsage>,
    /// The request's `user`.
    pub user: Value,
}

impl Response {
    /// A response with no output yet (`status: in_progress`), echoing `echo`.
    pub fn started(id: String, created_at: u64, model: String, echo: &Echo) -> Self {
        Response {
            id,
            object: "response",
            created_at,
            status: "in_progress",
            background: false,
            error: None,
            incomplete_details: None,
            instructions: echo.instructions.clone(),
            max_output_tokens: echo.max_output_tokens,
            metadata: echo.metadata.clone(),
            model,
            output: Vec::new(),
            parallel_tool_calls: echo.parallel_tool_calls,
            previous_response_id: None,
            reasoning: echo.reasoning.clone(),
            store: false,
            temperature: echo.temperature.clone(),
            text: echo.text.clone(),
            tool_choice: echo.tool_choice.clone(),
            tools: echo.tools.clone(),
            top_p: echo.top_p.clone(),
            truncation: "disabled",
            usage: None,
            user: echo.user.clone(),
        }
    }

    /// `status` and `incomplete_details` from the chat `finish_reason`: `length` →
    /// incomplete (`max_output_tokens`), `content_filter` → incomplete
    /// (`content_filter`), anything else → completed.
    pub fn finish(&mut self, finish_reason: Option<&str>) {
        let reason = match finish_reason {
            Some("length") => Some("max_output_tokens"),
            Some("content_filter") => Some("content_filter"),
            _ => None,
        };
        match reason {
            Some(r) => {
                self.status = "incomplete";
                self.incomplete_details = Some(json!({"reason": r}));
            }
            None => self.status = "completed",
        }
    }

    /// The Response of a non-streamed chat completion: its first choice's text as a
    /// `message` item (a refusal as a `refusal` part), its tool calls as
    /// `function_call` items, status from its finish reason, usage translated. The
    /// model is the completion's (`fallback_model`, the route, when it names none).
    pub fn from_completion(
        id: String,
        completion: &ChatCompletion,
        fallback_model: &str,
        echo: &Echo,
    ) -> Self {
        let model = if completion.model.is_empty() {
            fallback_model.to_owned()
        } else {
            completion.model.clone()
        };
        let mut r = Response::started(id, completion.created, model, echo);
        let choice = completion.choices.first();
        if let Some(message) = choice.map(|c| &c.message) {
            if let Some(thinking) = reasoning_text(message).filter(|t| !t.is_empty()) {
                r.output.push(OutputItem::reasoning(
                    item_id("rs", &r.id, 0),
                    thinking.to_owned(),
                    "completed",
                ));
            }
            let mut content = Vec::new();
            if let Some(text) = message_text(message.get("content")).filter(|t| !t.is_empty()) {
                content.push(OutputContent::text(text));
            }
            if let Some(refusal) = message
                .get("refusal")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                content.push(OutputContent::Refusal {
                    refusal: refusal.to_owned(),
                });
            }
            if !content.is_empty() {
                r.output.push(OutputItem::Message {
                    id: item_id("msg", &r.id, 0),
                    status: "completed",
                    role: "assistant",
                    content,
                });
            }
            let calls = message.get("tool_calls").and_then(Value::as_array);
            for (n, call) in calls.into_iter().flatten().enumerate() {
                let f = call.get("function");
                let field = |k: &str| {
                    f.and_then(|f| f.get(k))
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                r.output.push(OutputItem::FunctionCall {
                    id: item_id("fc", &r.id, n),
                    call_id: call
                        .get("id")
                        .and_then(Value::as_str)
                        .map_or_else(|| item_id("call", &r.id, n), str::to_owned),
                    name: field("name"),
                    arguments: field("arguments"),
                    status: "completed",
                });
            }
        }
        r.finish(choice.and_then(|c| c.finish_reason.as_deref()));
        r.usage = completion.usage.as_ref().map(ResponseUsage::from_chat);
        r
    }
}

/// `{prefix}_{the response id without resp_}_{n}`: item ids unique in the response and
/// tied to it.
pub(crate) fn item_id(prefix: &str, response_id: &str, n: usize) -> String {
    let base = response_id.strip_prefix("resp_").unwrap_or(response_id);
    format!("{prefix}_{base}_{n}")
}

/// The model's reasoning in a chat message or delta: `reasoning_content` (llama-server,
/// vLLM, DeepSeek) or a string `reasoning` (newer vLLM, OpenRouter).
pub(crate) fn reasoning_text(fields: &serde_json::Map<String, Value>) -> Option<&str> {
    fields
        .get("reasoning_content")
        .and_then(Value::as_str)
        .or_else(|| fields.get("reasoning").and_then(Value::as_str))
}

/// A chat message's content as text: the string, or its text parts joined.
fn message_text(content: Option<&Value>) -> Option<String> {
    match content? {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect(),
        ),
        _ => None,
    }
}

/// One output item of a Response.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputItem {
    /// The assistant's answer.
    Message {
        /// `msg_…`.
        id: String,
        /// `in_progress` while streaming, then `completed` (or `incomplete`).
        status: &'static str,
        /// Always `assistant`.
        role: &'static str,
        /// Its parts.
        content: Vec<OutputContent>,
    },
    /// The model's reasoning, from the chat answer's `reasoning_content`.
    Reasoning {
        /// `rs_…`.
        id: String,
        /// Always empty: chat completions give the reasoning itself, not a summary.
        summary: Vec<Value>,
        /// One `reasoning_text` part.
        content: Vec<ReasoningContent>,
        /// `in_progress` while streaming, then `completed` (or `incomplete`).
        status: &'static str,
    },
    /// A call of one of the request's function tools.
    FunctionCall {
        /// `fc_…`.
        id: String,
        /// The id the `function_call_output` answering it names (the chat tool call id).
        call_id: String,
        /// The function.
        name: String,
        /// Its arguments, a JSON text.
        arguments: String,
        /// `in_progress` while streaming, then `completed` (or `incomplete`).
        status: &'static str,
    },
}

impl OutputItem {
    /// A `reasoning` item with `text` as its one `reasoning_text` part.
    pub fn reasoning(id: String, text: String, status: &'static str) -> Self {
        OutputItem::Reasoning {
            id,
            summary: Vec::new(),
            content: vec![ReasoningContent::ReasoningText { text }],
            status,
        }
    }
}

/// One content part of a `reasoning` output item.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ReasoningContent {
    /// The reasoning as text.
    ReasoningText {
        /// The text.
        text: String,
    },
}

/// One content part of a `message` output item.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputContent {
    /// Text.
    OutputText {
        /// The text.
        text: String,
        /// Always empty: chat completions report no citations.
        annotations: Vec<Value>,
        /// Always empty: log-probabilities are not bridged.
        logprobs: Vec<Value>,
    },
    /// The model declined.
    Refusal {
        /// Its explanation.
        refusal: String,
    },
}

impl OutputContent {
    /// An `output_text` part.
    pub fn text(text: String) -> Self {
        OutputContent::OutputText {
            text,
            annotations: Vec::new(),
            logprobs: Vec::new(),
        }
    }
}

/// A Response's `usage`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ResponseUsage {
    /// Prompt tokens (chat `prompt_tokens`).
    pub input_tokens: u64,
    /// `{cached_tokens}` (chat `prompt_tokens_details.cached_tokens`, 0 when absent).
    pub input_tokens_details: InputTokensDetails,
    /// Generated tokens (chat `completion_tokens`).
    pub output_tokens: u64,
    /// `{reasoning_tokens}` (chat `completion_tokens_details.reasoning_tokens`).
    pub output_tokens_details: OutputTokensDetails,
    /// Their sum (chat `total_tokens`).
    pub total_tokens: u64,
}

/// `usage.input_tokens_details`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InputTokensDetails {
    /// Prompt tokens served from the provider's cache.
    pub cached_tokens: u64,
}

/// `usage.output_tokens_details`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OutputTokensDetails {
    /// Generated tokens spent reasoning.
    pub reasoning_tokens: u64,
}

impl ResponseUsage {
    /// Chat usage in the Responses names.
    pub fn from_chat(u: &Usage) -> Self {
        let detail = |outer: &str, inner: &str| {
            u.extra
                .get(outer)
                .and_then(|d| d.get(inner))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        ResponseUsage {
            input_tokens: u.prompt_tokens,
            input_tokens_details: InputTokensDetails {
                cached_tokens: detail("prompt_tokens_details", "cached_tokens"),
            },
            output_tokens: u.completion_tokens,
            output_tokens_details: OutputTokensDetails {
                reasoning_tokens: detail("completion_tokens_details", "reasoning_tokens"),
            },
            total_tokens: u.total_tokens,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn completion(v: Value) -> ChatCompletion {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn text_tool_calls_and_usage_are_translated() {
        let c = completion(json!({
            "id": "x", "created": 7, "model": "smol",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": "calling",
                "tool_calls": [{"id": "call_1", "type": "function",
                                "function": {"name": "f", "arguments": "{\"a\":1}"}}],
            }}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                      "prompt_tokens_details": {"cached_tokens": 2}},
        }));
        let r = Response::from_completion("resp_ab".into(), &c, "route", &Echo::default());
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["status"], "completed");
        assert_eq!(v["model"], "smol");
        assert_eq!(v["created_at"], 7);
        assert_eq!(
            v["output"],
            json!([
                {"type": "message", "id": "msg_ab_0", "status": "completed", "role": "assistant",
                 "content": [{"type": "output_text", "text": "calling", "annotations": [], "logprobs": []}]},
                {"type": "function_call", "id": "fc_ab_0", "call_id": "call_1", "name": "f",
                 "arguments": "{\"a\":1}", "status": "completed"},
            ])
        );
        assert_eq!(
            v["usage"],
            json!({"input_tokens": 5, "input_tokens_details": {"cached_tokens": 2},
                   "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0},
                   "total_tokens": 8})
        );
    }

    #[test]
    fn reasoning_content_is_a_reasoning_item_first() {
        let c = completion(json!({"choices": [{"finish_reason": "stop", "message": {
            "role": "assistant", "content": "4", "reasoning_content": "2 + 2 is 4"}}]}));
        let r = Response::from_completion("resp_r".into(), &c, "route", &Echo::default());
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v["output"][0],
            json!({"type": "reasoning", "id": "rs_r_0", "summary": [], "status": "completed",
                   "content": [{"type": "reasoning_text", "text": "2 + 2 is 4"}]})
        );
        assert_eq!(v["output"][1]["content"][0]["text"], "4");
    }

    #[test]
    fn length_and_content_filter_are_incomplete() {
        for (finish, reason) in [
            ("length", "max_output_tokens"),
            ("content_filter", "content_filter"),
        ] {
            let c = completion(json!({"choices": [{"finish_reason": finish,
                "message": {"role": "assistant", "content": "cut"}}]}));
            let r = Response::from_completion("resp_1".into(), &c, "route", &Echo::default());
            assert_eq!(r.status, "incomplete");
            assert_eq!(r.incomplete_details, Some(json!({"reason": reason})));
            assert_eq!(r.model, "route", "no model in the answer: the route");
        }
    }
}
