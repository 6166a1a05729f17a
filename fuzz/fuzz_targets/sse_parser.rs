//! Fuzz target `sse_parser`: see [`echelon_fuzz::sse_parser`].

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| echelon_fuzz::sse_parser::check(data));
