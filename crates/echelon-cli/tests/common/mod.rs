//! Helpers shared by the CLI's integration tests (`cli.rs`, `chaos.rs`): the binary,
//! config files, and `echelon serve` as a child process.
// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The `echelon` binary Cargo built for these tests.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_echelon");

/// Writes `text` to `dir/name` and returns the path.
pub(crate) fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Starts `echelon serve --port 0` on `config` (ledger under `data_dir`) and returns the
/// child and its URL, read from the line it prints once bound. Its logs are discarded.
pub(crate) fn spawn_serve(config: &Path, data_dir: &Path) -> (Child, String) {
    spawn_serve_with(config, data_dir, Stdio::null(), &[], &[])
}

/// [`spawn_serve`] with the child's stderr (its logs) going to `stderr`, and extra
/// arguments and environment variables (`--log-format json`, `ECHELON_LOG`, …).
pub(crate) fn spawn_serve_with(
    config: &Path,
    data_dir: &Path,
    stderr: impl Into<Stdio>,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--port", "0", "--config"])
        .arg(config)
        .args(args)
        .env("ECHELON_DATA_DIR", data_dir)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("echelon listening on ")
        .unwrap_or_else(|| panic!("unexpected first line from serve: {line:?}"))
        .to_owned();
    (child, url)
}

/// Sends SIGTERM to `child` (with `kill`, so the tests need no libc binding).
pub(crate) fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -TERM {} failed", child.id());
}
