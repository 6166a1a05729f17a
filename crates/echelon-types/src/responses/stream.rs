//! A chat-completion chunk stream translated to Responses stream events.

use serde::Serialize;
use serde_json::{Value, json};

use super::response::{
    OutputContent, OutputItem, ReasoningContent, Response, ResponseUsage, item_id, reasoning_text,
};
use crate::{ChatCompletionChunk, ErrorObject};

/// One server-sent event of a streamed Response: `event: {name}` and its JSON `data`
/// (which repeats the name as `type` and carries the `sequence_number`).
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseEvent {
    /// The event type, e.g. `response.output_text.delta`.
    pub name: &'static str,
    /// The event's JSON object.
    pub data: Value,
}

/// Turns the chunks of one chat-completion stream into the Responses events, in the
/// order the Responses API sends them:
///
/// `response.created`, `response.in_progress`; per output item
/// `response.output_item.added`, then for a message `response.content_part.added`,
/// `response.output_text.delta`…, `response.output_text.done`,
/// `response.content_part.done`, or for a function call
/// `response.function_call_arguments.delta`…, `response.function_call_arguments.done`;
/// `response.output_item.done`; last `response.completed` (or `response.incomplete`
/// when the answer was cut by its token cap or a content filter) with the whole
/// Response, or `response.failed` when the stream failed.
///
/// `sequence_number` counts from 0 over every event. Only the first choice is read
/// (the Responses API has no `n`).
#[derive(Debug)]
pub struct ResponseStreamTranslator {
    response: Response,
    seq: u64,
    /// Output index of the message item being written, if one is.
    open_message: Option<usize>,
    /// Output index of the reasoning item being written, if one is.
    open_reasoning: Option<usize>,
    /// `(chat tool_calls index, output index)` of each function call item still open.
    open_calls: Vec<(u64, usize)>,
    finish_reason: Option<String>,
    /// Function call items so far, for their ids.
    calls: usize,
    /// Message items so far, for their ids.
    messages: usize,
    /// Reasoning items so far, for their ids.
    reasonings: usize,
}

impl ResponseStreamTranslator {
    /// A translator for the stream of `response` (as [`Response::started`] makes it).
    pub fn new(response: Response) -> Self {
        ResponseStreamTranslator {
            response,
            seq: 0,
            open_message: None,
            open_reasoning: None,
            open_calls: Vec::new(),
            finish_reason: None,
            calls: 0,
            messages: 0,
            reasonings: 0,
        }
    }

    /// The Response as it stands.
    pub fn response(&self) -> &Response {
        &self.response
    }

    /// Names the model in the Response (before [`start`](Self::start): the upstream's
    /// name, from the first chunk, as a non-streamed answer names it).
    pub fn set_model(&mut self, model: &str) {
        if !model.is_empty() {
            model.clone_into(&mut self.response.model);
        }
    }

    /// `response.created` and `response.in_progress`.
    pub fn start(&mut self) -> Vec<ResponseEvent> {
        let mut out = Vec::with_capacity(2);
        let snapshot = self.snapshot();
        self.push(&mut out, "response.created", json!({"response": snapshot}));
        self.push(
            &mut out,
            "response.in_progress",
            json!({"response": snapshot}),
        );
        out
    }

    /// The events of one chunk: text deltas, function-call items and argument deltas;
    /// its finish reason and usage are kept for the end.
    pub fn chunk(&mut self, chunk: &ChatCompletionChunk) -> Vec<ResponseEvent> {
        let mut out = Vec::new();
        if let Some(u) = &chunk.usage {
            self.response.usage = Some(ResponseUsage::from_chat(u));
        }
        let Some(choice) = chunk.choices.iter().find(|c| c.index == 0) else {
            return out;
        };
        if let Some(thinking) = reasoning_text(&choice.delta.extra).filter(|t| !t.is_empty()) {
            self.reasoning_delta(&mut out, thinking);
        }
        if let Some(text) = choice.delta.content.as_deref().filter(|t| !t.is_empty()) {
            self.text_delta(&mut out, text);
        }
        if let Some(Value::Array(calls)) = choice.delta.extra.get("tool_calls") {
            for call in calls {
                self.call_delta(&mut out, call);
            }
        }
        if let Some(reason) = &choice.finish_reason {
            self.finish_reason = Some(reason.clone());
        }
        out
    }

    /// The end of a complete stream: every open item done, then `response.completed`
    /// (or `response.incomplete`) with the whole Response.
    pub fn finish(&mut self) -> Vec<ResponseEvent> {
        let mut out = Vec::new();
        self.close_all(&mut out, "completed");
        self.response.finish(self.finish_reason.as_deref());
        let name = if self.response.status == "incomplete" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        let snapshot = self.snapshot();
        self.push(&mut out, name, json!({"response": snapshot}));
        out
    }

    /// The end of a failed stream: `response.failed`, the Response with `status:
    /// failed`, the output so far (open items `incomplete`) and `error` = `{code,
    /// message, attempts}` from `error` (`code` its code, else its type).
    pub fn fail(&mut self, error: &ErrorObject) -> Vec<ResponseEvent> {
        let mut out = Vec::new();
        for item in &mut self.response.output {
            if let OutputItem::Message { status, .. }
            | OutputItem::Reasoning { status, .. }
            | OutputItem::FunctionCall { status, .. } = item
                && *status == "in_progress"
            {
                *status = "incomplete";
            }
        }
        self.open_message = None;
        self.open_reasoning = None;
        self.open_calls.clear();
        self.response.status = "failed";
        self.response.error = Some(json!({
            "code": error.code.as_deref().unwrap_or(&error.kind),
            "message": error.message,
            "attempts": error.attempts,
        }));
        let snapshot = self.snapshot();
        self.push(&mut out, "response.failed", json!({"response": snapshot}));
        out
    }

    fn reasoning_delta(&mut self, out: &mut Vec<ResponseEvent>, text: &str) {
        let index = match self.open_reasoning {
            Some(i) => i,
            None => {
                // Reasoning comes first; were it to follow text, the text is complete.
                self.close_message(out, "completed");
                let i = self.response.output.len();
                let id = item_id("rs", &self.response.id, self.reasonings);
                self.reasonings += 1;
                self.response.output.push(OutputItem::Reasoning {
                    id: id.clone(),
                    summary: Vec::new(),
                    content: Vec::new(),
                    status: "in_progress",
                });
                let item = self.item_json(i);
                self.push(
                    out,
                    "response.output_item.added",
                    json!({"output_index": i, "item": item}),
                );
                let part = ReasoningContent::ReasoningText {
                    text: String::new(),
                };
                self.push(
                    out,
                    "response.content_part.added",
                    json!({"item_id": id, "output_index": i, "content_index": 0, "part": part}),
                );
                if let Some(OutputItem::Reasoning { content, .. }) = self.response.output.get_mut(i)
                {
                    content.push(part);
                }
                self.open_reasoning = Some(i);
                i
            }
        };
        let Some(OutputItem::Reasoning { id, content, .. }) = self.response.output.get_mut(index)
        else {
            return;
        };
        if let Some(ReasoningContent::ReasoningText { text: t }) = content.first_mut() {
            t.push_str(text);
        }
        let id = id.clone();
        self.push(
            out,
            "response.reasoning_text.delta",
            json!({"item_id": id, "output_index": index, "content_index": 0, "delta": text}),
        );
    }

    fn close_reasoning(&mut self, out: &mut Vec<ResponseEvent>, status: &'static str) {
        let Some(index) = self.open_reasoning.take() else {
            return;
        };
        let Some(OutputItem::Reasoning {
            id,
            content,
            status: s,
            ..
        }) = self.response.output.get_mut(index)
        else {
            return;
        };
        *s = status;
        let id = id.clone();
        let part = content.first().cloned();
        let text = match &part {
            Some(ReasoningContent::ReasoningText { text }) => text.clone(),
            None => String::new(),
        };
        self.push(
            out,
            "response.reasoning_text.done",
            json!({"item_id": id, "output_index": index, "content_index": 0, "text": text}),
        );
        self.push(
            out,
            "response.content_part.done",
            json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
        );
        let item = self.item_json(index);
        self.push(
            out,
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
    }

    fn text_delta(&mut self, out: &mut Vec<ResponseEvent>, text: &str) {
        let index = match self.open_message {
            Some(i) => i,
            None => {
                self.close_reasoning(out, "completed");
                let i = self.response.output.len();
                let id = item_id("msg", &self.response.id, self.messages);
                self.messages += 1;
                self.response.output.push(OutputItem::Message {
                    id: id.clone(),
                    status: "in_progress",
                    role: "assistant",
                    content: Vec::new(),
                });
                let item = self.item_json(i);
                self.push(
                    out,
                    "response.output_item.added",
                    json!({"output_index": i, "item": item}),
                );
                if let Some(OutputItem::Message { content, .. }) = self.response.output.get_mut(i) {
                    content.push(OutputContent::text(String::new()));
                }
                self.push(
                    out,
                    "response.content_part.added",
                    json!({"item_id": id, "output_index": i, "content_index": 0,
                           "part": OutputContent::text(String::new())}),
                );
                self.open_message = Some(i);
                i
            }
        };
        let Some(OutputItem::Message { id, content, .. }) = self.response.output.get_mut(index)
        else {
            return;
        };
        if let Some(OutputContent::OutputText { text: t, .. }) = content.first_mut() {
            t.push_str(text);
        }
        let id = id.clone();
        self.push(
            out,
            "response.output_text.delta",
            json!({"item_id": id, "output_index": index, "content_index": 0,
                   "delta": text, "logprobs": []}),
        );
    }

    fn call_delta(&mut self, out: &mut Vec<ResponseEvent>, call: &Value) {
        let chat_index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        let function = call.get("function");
        let name = function
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let arguments = function
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let index = match self.open_calls.iter().find(|(c, _)| *c == chat_index) {
            Some(&(_, i)) => i,
            None => {
                // Output items are written one after another: the text before a call
                // is complete when the call starts.
                self.close_reasoning(out, "completed");
                self.close_message(out, "completed");
                let i = self.response.output.len();
                let n = self.calls;
                self.calls += 1;
                let call_id = call
                    .get("id")
                    .and_then(Value::as_str)
                    .map_or_else(|| item_id("call", &self.response.id, n), str::to_owned);
                self.response.output.push(OutputItem::FunctionCall {
                    id: item_id("fc", &self.response.id, n),
                    call_id,
                    name: name.to_owned(),
                    arguments: String::new(),
                    status: "in_progress",
                });
                let item = self.item_json(i);
                self.push(
                    out,
                    "response.output_item.added",
                    json!({"output_index": i, "item": item}),
                );
                self.open_calls.push((chat_index, i));
                i
            }
        };
        if arguments.is_empty() {
            return;
        }
        let Some(OutputItem::FunctionCall {
            id, arguments: a, ..
        }) = self.response.output.get_mut(index)
        else {
            return;
        };
        a.push_str(arguments);
        let id = id.clone();
        self.push(
            out,
            "response.function_call_arguments.delta",
            json!({"item_id": id, "output_index": index, "delta": arguments}),
        );
    }

    fn close_all(&mut self, out: &mut Vec<ResponseEvent>, status: &'static str) {
        self.close_reasoning(out, status);
        self.close_message(out, status);
        for (_, index) in std::mem::take(&mut self.open_calls) {
            let Some(OutputItem::FunctionCall {
                id,
                name,
                arguments,
                status: s,
                ..
            }) = self.response.output.get_mut(index)
            else {
                continue;
            };
            *s = status;
            let data = json!({"item_id": id, "output_index": index, "name": name,
                              "arguments": arguments});
            self.push(out, "response.function_call_arguments.done", data);
            let item = self.item_json(index);
            self.push(
                out,
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            );
        }
    }

    fn close_message(&mut self, out: &mut Vec<ResponseEvent>, status: &'static str) {
        let Some(index) = self.open_message.take() else {
            return;
        };
        let Some(OutputItem::Message {
            id,
            content,
            status: s,
            ..
        }) = self.response.output.get_mut(index)
        else {
            return;
        };
        *s = status;
        let id = id.clone();
        let part = content.first().cloned();
        let text = match &part {
            Some(OutputContent::OutputText { text, .. }) => text.clone(),
            _ => String::new(),
        };
        self.push(
            out,
            "response.output_text.done",
            json!({"item_id": id, "output_index": index, "content_index": 0,
                   "text": text, "logprobs": []}),
        );
        self.push(
            out,
            "response.content_part.done",
            json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
        );
        let item = self.item_json(index);
        self.push(
            out,
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
    }

    fn item_json(&self, index: usize) -> Value {
        to_json(&self.response.output.get(index))
    }

    fn snapshot(&self) -> Value {
        to_json(&self.response)
    }

    /// Appends event `name` with `data`'s fields, `type` and the next sequence number.
    fn push(&mut self, out: &mut Vec<ResponseEvent>, name: &'static str, mut data: Value) {
        if let Value::Object(map) = &mut data {
            map.insert("type".into(), json!(name));
            map.insert("sequence_number".into(), json!(self.seq));
        }
        self.seq += 1;
        out.push(ResponseEvent { name, data });
    }
}

/// The types here (strings, numbers, JSON values) always serialise.
fn to_json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::responses::Echo;

    fn chunk(v: Value) -> ChatCompletionChunk {
        serde_json::from_value(v).unwrap()
    }

    fn translator() -> ResponseStreamTranslator {
        ResponseStreamTranslator::new(Response::started(
            "resp_x".into(),
            1,
            "m".into(),
            &Echo::default(),
        ))
    }

    #[test]
    fn text_then_a_tool_call_in_order_with_sequence_numbers() {
        let mut t = translator();
        let mut events = t.start();
        for c in [
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": null}}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "he"}}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "llo"}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_9",
                   "type": "function", "function": {"name": "f", "arguments": ""}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0,
                   "function": {"arguments": "{\"a\":"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0,
                   "function": {"arguments": "1}"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}}),
        ] {
            events.extend(t.chunk(&chunk(c)));
        }
        events.extend(t.finish());
        let names: Vec<_> = events.iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.data["sequence_number"], i as u64);
            assert_eq!(e.data["type"], e.name);
        }
        assert_eq!(events[0].data["response"]["status"], "in_progress");
        assert_eq!(events[6].data["text"], "hello");
        assert_eq!(events[12].data["arguments"], "{\"a\":1}");
        let done = &events[14].data["response"];
        assert_eq!(done["status"], "completed");
        assert_eq!(done["output"][0]["content"][0]["text"], "hello");
        assert_eq!(done["output"][1]["call_id"], "call_9");
        assert_eq!(done["output"][1]["status"], "completed");
        assert_eq!(done["usage"]["total_tokens"], 10);
    }

    #[test]
    fn a_failure_is_response_failed_with_the_error_and_never_completed() {
        let mut t = translator();
        let mut events = t.start();
        events.extend(t.chunk(&chunk(
            json!({"choices": [{"index": 0, "delta": {"content": "par"}}]}),
        )));
        let error: ErrorObject = serde_json::from_value(json!({
            "message": "stream cut", "type": "upstream_error", "code": "stream_cut",
        }))
        .unwrap();
        events.extend(t.fail(&error));
        let last = events.last().unwrap();
        assert_eq!(last.name, "response.failed");
        assert!(events.iter().all(|e| e.name != "response.completed"));
        assert_eq!(last.data["response"]["status"], "failed");
        assert_eq!(last.data["response"]["error"]["code"], "stream_cut");
        assert_eq!(last.data["response"]["output"][0]["status"], "incomplete");
    }

    #[test]
    fn reasoning_deltas_are_a_reasoning_item_before_the_message() {
        let mut t = translator();
        let mut events = t.start();
        for c in [
            json!({"choices": [{"index": 0, "delta": {"reasoning_content": "think"}}]}),
            json!({"choices": [{"index": 0, "delta": {"reasoning_content": "ing"}}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "4"}, "finish_reason": "stop"}]}),
        ] {
            events.extend(t.chunk(&chunk(c)));
        }
        events.extend(t.finish());
        let names: Vec<_> = events.iter().map(|e| e.name).collect();
        assert_eq!(
            &names[2..9],
            [
                "response.output_item.added",
                "response.content_part.added",
                "response.reasoning_text.delta",
                "response.reasoning_text.delta",
                "response.reasoning_text.done",
                "response.content_part.done",
                "response.output_item.done",
            ]
        );
        assert_eq!(events[6].data["text"], "thinking");
        let done = &events.last().unwrap().data["response"];
        assert_eq!(done["output"][0]["type"], "reasoning");
        assert_eq!(done["output"][0]["content"][0]["text"], "thinking");
        assert_eq!(done["output"][1]["content"][0]["text"], "4");
    }

    #[test]
    fn a_length_cut_ends_incomplete() {
        let mut t = translator();
        t.start();
        t.chunk(&chunk(json!({"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": "length"}]})));
        let end = t.finish();
        let last = end.last().unwrap();
        assert_eq!(last.name, "response.incomplete");
        assert_eq!(
            last.data["response"]["incomplete_details"]["reason"],
            "max_output_tokens"
        );
    }
}
