//! The committed fuzz seeds (`fuzz/corpus/config_loader/`, `fuzz/corpus/sse_parser/`)
//! replayed on the stable toolchain through the very checks the fuzz targets run
//! (`fuzz/src/*.rs`, included here), so that `cargo test --workspace` guards every
//! crash the fuzzers ever found (README "Fuzzing").

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../fuzz/src/config_loader.rs"]
#[allow(unreachable_pub)]
mod config_loader;
#[path = "../../../fuzz/src/sse_parser.rs"]
#[allow(unreachable_pub)]
mod sse_parser;

use std::path::PathBuf;

use echelon::provider::ErrorKind;
use sse_parser::Decoded;

/// Every file of `fuzz/corpus/<target>/`, sorted by name.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files
}

/// Runs `check` on every seed of `target`; fails naming each seed that panicked.
fn replay(target: &str, check: fn(&[u8])) {
    let failed: Vec<String> = corpus(target)
        .into_iter()
        .filter(|(_, data)| std::panic::catch_unwind(|| check(data)).is_err())
        .map(|(name, _)| name)
        .collect();
    assert!(
        failed.is_empty(),
        "fuzz/corpus/{target}: these seeds fail: {failed:?}"
    );
}

#[test]
fn every_config_loader_seed_loads_or_fails_cleanly() {
    replay("config_loader", config_loader::check);
}

#[test]
fn every_sse_parser_seed_decodes_the_same_however_split() {
    replay("sse_parser", sse_parser::check);
}

fn decode_seed(name: &str) -> Decoded {
    let (_, data) = corpus("sse_parser")
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no seed {name}"));
    sse_parser::decode(vec![data])
}

fn text(decoded: &Decoded) -> String {
    decoded
        .chunks
        .iter()
        .flat_map(|c| &c.choices)
        .filter_map(|c| c.delta.content.as_deref())
        .collect()
}

/// The realistic transcripts among the seeds decode to what a client would see.
#[test]
fn seed_transcripts_decode_as_providers_meant_them() {
    let openai = decode_seed("openai_usage.sse");
    assert_eq!(openai.error, None);
    assert_eq!(text(&openai), "The sky is blue.");
    let usage = openai.chunks.last().unwrap().usage.as_ref().unwrap();
    assert_eq!((usage.prompt_tokens, usage.total_tokens), (12, 17));

    let llama = decode_seed("llamacpp_usage_timings.sse");
    assert_eq!(llama.error, None);
    assert_eq!(text(&llama), "Red, green and blue");
    assert!(llama.chunks.last().unwrap().extra.contains_key("timings"));

    let crlf = decode_seed("crlf_comments_fields.sse");
    assert_eq!((crlf.chunks.len(), crlf.error), (2, None));

    let cr = decode_seed("cr_multiline_data.sse");
    assert_eq!((text(&cr).as_str(), cr.error), ("ab", None));

    let deepseek = decode_seed("deepseek_reasoning_unicode.sse");
    assert_eq!(text(&deepseek), "天空是蓝色的 🌤️。");

    assert_eq!(
        decode_seed("error_event.sse").error,
        Some(ErrorKind::ServerError)
    );
    let cut = decode_seed("cut_mid_event.sse");
    assert_eq!(
        (cut.chunks.len(), cut.error),
        (2, Some(ErrorKind::StreamCut))
    );
    // One malformed event is skipped (the default `malformed_event: skip`): the
    // stream goes on to its `[DONE]`.
    let malformed = decode_seed("malformed_json.sse");
    assert_eq!((text(&malformed).as_str(), malformed.error), ("hi", None));
    assert_eq!(decode_seed("n2_no_done.sse").error, None);
}
