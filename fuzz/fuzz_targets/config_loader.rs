//! Fuzz target `config_loader`: see [`echelon_fuzz::config_loader`].

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| echelon_fuzz::config_loader::check(data));
