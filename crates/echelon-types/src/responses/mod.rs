//! The OpenAI Responses API (`POST /v1/responses`), bridged to chat completions.
//!
//! Served stateless: a request carries its whole conversation in `input`, and nothing
//! is stored (`previous_response_id`, `store: true` and the other stateful fields are
//! refused). [`parse_responses_request`] turns a request into a
//! [`ChatCompletionRequest`](crate::ChatCompletionRequest) plus what its answer echoes;
//! [`Response::from_completion`] turns a chat completion into a Response object;
//! [`ResponseStreamTranslator`] turns a chunk stream into the `response.*` events.
//!
//! Shapes follow the OpenAI API reference for `POST /v1/responses` and its streaming
//! events (<https://platform.openai.com/docs/api-reference/responses>).

mod request;
mod response;
mod stream;

pub use request::{Echo, TranslatedRequest, parse_responses_request};
pub use response::{
    InputTokensDetails, OutputContent, OutputItem, OutputTokensDetails, ReasoningContent, Response,
    ResponseUsage,
};
pub use stream::{ResponseEvent, ResponseStreamTranslator};
