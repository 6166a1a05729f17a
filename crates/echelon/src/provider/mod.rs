//! Provider clients: one HTTP call to one OpenAI-compatible endpoint with one key.
//!
//! The client knows nothing of retries or failover; it makes the call, enforces the
//! attempt's timeouts, and classifies what went wrong ([`ProviderError`]) so the layers
//! above can decide (DESIGN.md §4 "Which errors move on").

mod client;
mod error;
mod sse;

pub use client::{ChunkStream, HttpClients, OpenAiClient, Timeouts};
pub use error::{ErrorKind, ProviderError};
