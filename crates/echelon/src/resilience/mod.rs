//! Resilience units composed per model, in the order DESIGN.md §3 draws:
//! circuit breaker → token buckets → concurrency limit → key pool → retry.
//!
//! Each unit has one job and is usable and testable alone.

pub mod admission;
pub mod breaker;
pub mod concurrency;
pub mod key_pool;
pub mod retry_budget;
pub mod token_bucket;
mod window;
