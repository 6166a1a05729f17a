//! The real upstream: llama.cpp's `llama-server` with SmolLM2-135M-Instruct, as installed
//! by `scripts/real-upstream.sh install` (see that script for the offline install).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Environment variable that turns a missing real upstream from a printed skip into a
/// test failure. `scripts/test.sh` (and so CI) sets it.
pub const REQUIRE_ENV: &str = "ECHELON_REQUIRE_REAL_UPSTREAM";

/// The arguments that make `llama-server` serve OpenAI-style embeddings of SmolLM2
/// ([`LlamaServer::start_embeddings`]).
pub const EMBEDDINGS_ARGS: &[&str] = &["--embeddings", "--pooling", "mean"];

/// A running `llama-server`, killed on drop.
#[derive(Debug)]
pub struct LlamaServer {
    child: Option<Child>,
    port: u16,
    alias: String,
    api_key: String,
}

/// Where the script caches the binary and the model: `$ECHELON_CACHE`, else
/// `~/.cache/echelon`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ECHELON_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("echelon")
}

/// The `llama-server` binary and the GGUF model, or why they cannot be had.
///
/// # Errors
/// A message naming the missing file and the command that installs it.
pub fn locate() -> Result<(PathBuf, PathBuf), String> {
    let dir = cache_dir();
    let bin = dir.join("bin").join("llama-server");
    let model = dir.join("models").join("SmolLM2-135M-Instruct.Q4_1.gguf");
    for p in [&bin, &model] {
        if !p.exists() {
            return Err(format!(
                "{} is missing; run `scripts/real-upstream.sh install`",
                p.display()
            ));
        }
    }
    Ok((bin, model))
}

/// Whether a missing real upstream must fail the test run (see [`REQUIRE_ENV`]).
pub fn required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1")
}

impl LlamaServer {
    /// Starts `llama-server` on a free port with `--alias alias --api-key api_key`,
    /// `-c 2048 -t 1 -np 2`, and waits (up to 30 s) until `GET /health` says ok.
    ///
    /// # Errors
    /// When the binary or model is missing, the process cannot start, or it never
    /// becomes healthy.
    pub async fn start(alias: &str, api_key: &str) -> Result<LlamaServer, String> {
        LlamaServer::start_with_args(alias, api_key, &[]).await
    }

    /// [`start`](Self::start) serving `POST /v1/embeddings` too: with
    /// [`EMBEDDINGS_ARGS`] (`--embeddings --pooling mean`; without `--pooling mean`
    /// llama-server refuses OpenAI-style embedding requests for SmolLM2, whose GGUF
    /// declares no pooling). Chat completions, streamed or not, are still served.
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub async fn start_embeddings(alias: &str, api_key: &str) -> Result<LlamaServer, String> {
        LlamaServer::start_with_args(alias, api_key, EMBEDDINGS_ARGS).await
    }

    /// [`start`](Self::start) with `extra` arguments after the usual ones.
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub async fn start_with_args(
        alias: &str,
        api_key: &str,
        extra: &[&str],
    ) -> Result<LlamaServer, String> {
        let (bin, model) = locate()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let child = Command::new(&bin)
            .arg("-m")
            .arg(&model)
            .args([
                "--alias",
                alias,
                "--api-key",
                api_key,
                "--host",
                "127.0.0.1",
            ])
            .args([
                "--port",
                &port.to_string(),
                "-c",
                "2048",
                "-t",
                "1",
                "-np",
                "2",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut server = LlamaServer {
            child: Some(child),
            port,
            alias: alias.to_owned(),
            api_key: api_key.to_owned(),
        };
        for _ in 0..300 {
            if health_ok(port).await {
                return Ok(server);
            }
            if let Some(c) = server.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Err(format!("llama-server exited early: {status}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server.kill();
        Err("llama-server did not become healthy within 30 s".to_owned())
    }

    /// `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// The alias it answers as.
    pub fn alias(&self) -> &str {
        &self.alias
    }

    /// The key it requires.
    pub fn api_key(&self) -> &str {
        &self.api_key
    }

    /// Kills the process (as a crash would) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn health_ok(port: u16) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let req = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    matches!(read, Ok(Ok(_))) && buf.starts_with(b"HTTP/1.1 200") && {
        let text = String::from_utf8_lossy(&buf);
        text.contains("\"ok\"")
    }
}

/// Starts the servers named by `(alias, key)` pairs, or explains why not: `Ok(None)` after
/// printing the reason when the real upstream is not installed and not [`required`].
///
/// # Errors
/// When it is required and missing, or installed but failing to start.
pub async fn start_or_skip(specs: &[(&str, &str)]) -> Result<Option<Vec<LlamaServer>>, String> {
    if let Err(why) = locate() {
        if required() {
            return Err(format!(
                "{REQUIRE_ENV}=1 but the real upstream is missing: {why}"
            ));
        }
        eprintln!("SKIPPED: real upstream not installed: {why}");
        return Ok(None);
    }
    let mut servers = Vec::new();
    for (alias, key) in specs {
        servers.push(LlamaServer::start(alias, key).await?);
    }
    Ok(Some(servers))
}
