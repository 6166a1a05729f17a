//! The `echelon` binary's live operations: `config diff`, and `serve` reloading its
//! config on SIGHUP (keeping what did not change, refusing a bad file).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{BIN, sigterm, spawn_serve, write};

fn config(base_url: &str, extra_model: &str, rpm: u32) -> String {
    format!(
        r#"providers:
  local: {{ base_url: "{base_url}", api_keys: ["sk-live-ops-secret"] }}
models:
  m1: {{ provider: local, max_retries: 0, rpm_limit: {rpm} }}
{extra_model}
task_groups:
  grp:
    echelon1: {{ models: [m1] }}
"#
    )
}

#[test]
fn config_diff_lists_changes_and_state_by_key_id_only() {
    let dir = tempfile::tempdir().unwrap();
    let old = write(&dir, "old.yaml", &config("http://127.0.0.1:9/v1", "", 60));
    let new = write(
        &dir,
        "new.yaml",
        &config("http://127.0.0.1:9/v1", "  m2: { provider: local }", 120),
    );
    let out = Command::new(BIN)
        .args(["config", "diff"])
        .args([&old, &new])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("+ model m2"), "{text}");
    assert!(text.contains("~ model m1"), "{text}");
    assert!(
        text.contains("state model m1 rpm_limit: rescaled (rpm_limit 60 → 120)"),
        "{text}"
    );
    assert!(
        text.contains("state keys of provider local: kept"),
        "{text}"
    );
    assert!(!text.contains("sk-live"), "{text}");

    let out = Command::new(BIN)
        .args(["config", "diff", "--json"])
        .args([&old, &new])
        .output()
        .unwrap();
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["models"]["added"][0], "m2");

    let same = Command::new(BIN)
        .args(["config", "diff"])
        .args([&old, &old])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&same.stdout).contains("state model m1: kept"));

    let bad = write(&dir, "bad.yaml", "models:\n  m1: { provder: local }\n");
    let out = Command::new(BIN)
        .args(["config", "diff"])
        .args([&old, &bad])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml:2:"), "file:line:col: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reloads_on_sighup_and_refuses_a_bad_config() {
    let up = echelon_testkit::TestUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "echelon.yaml", &config(&up.base_url(), "", 60));
    let (child, url) = spawn_serve(&path, dir.path());
    let mut child = KillOnDrop(child);
    let http = reqwest::Client::new();
    let status = |http: reqwest::Client, url: String| async move {
        http.get(format!("{url}/admin/reload"))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let hup = |child: &std::process::Child| {
        assert!(
            Command::new("kill")
                .args(["-HUP", &child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    let wait_for = |field: &'static str, n: u64| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let s = status(http.clone(), url.clone()).await;
                if s[field].as_u64() == Some(n) {
                    return s;
                }
                assert!(Instant::now() < deadline, "no reload: {s}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    std::fs::write(
        &path,
        config(&up.base_url(), "  m2: { provider: local }", 60),
    )
    .unwrap();
    hup(&child.0);
    let s = wait_for("reloads_ok", 1).await;
    assert_eq!(s["last"]["trigger"], "signal");
    let r = http
        .post(format!("{url}/v1/chat/completions"))
        .json(&serde_json::json!({"model": "m2", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the added model serves");

    std::fs::write(&path, "models: [not, a, map]\n").unwrap();
    hup(&child.0);
    let s = wait_for("reloads_failed", 1).await;
    assert_eq!(s["last"]["result"], "error");
    assert!(
        s["last"]["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.as_str().unwrap().contains("echelon.yaml:1:9: models")),
        "{s}"
    );
    let r = http
        .post(format!("{url}/v1/chat/completions"))
        .json(&serde_json::json!({"model": "m2", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the old config keeps serving");

    sigterm(&child.0);
    assert!(child.0.wait().unwrap().success(), "exits once drained");
}

/// Kills the server if the test fails before it is stopped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
