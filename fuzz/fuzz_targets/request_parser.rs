//! Fuzz target `request_parser`: see [`echelon_fuzz::request_parser`].

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| echelon_fuzz::request_parser::check(data));
