//! The properties Echelon's fuzz targets check, one module per target.
//!
//! Each module has one `check(&[u8])` that panics when a property fails and returns
//! otherwise. The fuzz targets (`fuzz_targets/*.rs`) call it on libFuzzer's inputs;
//! the stable regression tests (`crates/echelon/tests/fuzz_corpus.rs`,
//! `crates/echelon-types/tests/fuzz_corpus.rs`) include the same files with `#[path]`
//! and replay every committed seed of `fuzz/corpus/<target>/` through it.

pub mod config_loader;
pub mod request_parser;
pub mod sse_parser;
