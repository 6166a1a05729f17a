//! Echelon, a resilient LLM gateway: one OpenAI-compatible interface in front of many
//! providers, with tiered failover that never answers with a placeholder.
//!
//! The modules follow the request path (DESIGN.md §3):
//! - [`config`]: the YAML/JSON configuration, validated with file:line:col errors;
//! - [`routing`]: route names → models, task groups, echelons, polling pools and wrappers,
//!   the fallback strategies, and handles ([`Gateway::llm`]) that act like one model;
//! - [`tokens`]: prompt token counts (tiktoken) for TPM limits and context windows;
//! - [`resilience`]: circuit breaker, token buckets, concurrency limits, key pools, retry budget;
//! - [`state`]: the state registry: the resilience units' live state by stable id
//!   (in memory; a shared backend implements the same trait);
//! - [`provider`]: one HTTP call to one OpenAI-compatible endpoint, classified errors;
//! - [`key`]: API keys and the short ids that stand for them;
//! - [`error`]: the typed error a caller gets when every attempt failed.

pub mod config;
pub mod error;
pub mod judge;
pub mod key;
pub mod provider;
pub mod resilience;
pub mod routing;
pub mod state;
pub mod telemetry;
pub mod tokens;
pub mod usage;

pub use error::GatewayError;
pub use routing::{
    CallOptions, Completion, Embeddings, Gateway, GatewayStream, LlmHandle, NodeRoutes, RouteInfo,
    StatsSnapshot,
};
