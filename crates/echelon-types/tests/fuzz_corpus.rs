//! The committed `request_parser` fuzz seeds (`fuzz/corpus/request_parser/`) replayed
//! on the stable toolchain through the check the fuzz target runs
//! (`fuzz/src/request_parser.rs`, included here): every seed is refused with a
//! `RequestError` or round-trips (README "Fuzzing").

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../fuzz/src/request_parser.rs"]
#[allow(unreachable_pub)]
mod request_parser;

use std::path::PathBuf;

#[test]
fn every_request_parser_seed_is_refused_or_round_trips() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/request_parser");
    let mut seeds: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    let failed: Vec<String> = seeds
        .iter()
        .filter(|path| {
            let data = std::fs::read(path).unwrap();
            std::panic::catch_unwind(|| request_parser::check(&data)).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(failed.is_empty(), "these seeds fail: {failed:?}");
}

/// The realistic requests among the seeds are accepted.
#[test]
fn realistic_seed_requests_parse() {
    for name in [
        "minimal.json",
        "stream_usage.json",
        "tools.json",
        "content_parts.json",
        "vendor_extras.json",
        "function_role.json",
    ] {
        let data = std::fs::read(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../fuzz/corpus/request_parser")
                .join(name),
        )
        .unwrap();
        let request = echelon_types::parse_request(&data)
            .unwrap_or_else(|e| panic!("{name} is refused: {e}"));
        assert!(!request.messages.is_empty(), "{name}");
    }
}
