//! Time and heap allocations of one small chat request through [`echelon::Gateway`]
//! against an in-process [`TestUpstream`] at 0 ms (issue 13, "Measure": the per-request
//! allocations of a small chat request go down).
//!
//! Scenarios, each a one-message request with `max_tokens: 16`:
//! - `plain_*`: one model, no limits, `max_retries: 0`; routed by the model id.
//! - `full_*`: every layer on, as in `bench/run.sh`: a key pool of 3 keys, `rpm_limit`,
//!   `tpm_limit` (so a tiktoken count per request), the request bucket, `concurrency_limit`
//!   and a circuit breaker, on a task group of two echelons (the first answers).
//! - `*_chat`: [`Gateway::chat`]; `*_stream`: [`Gateway::chat_stream`] drained to its end.
//!
//! Two runtimes, because divan's [`divan::AllocProfiler`] counts only the allocations of
//! the thread that runs the benchmark (thread-local tallies):
//! - `multi_thread` (2 workers, like a server): the request future runs on the bench
//!   thread (`block_on`), the connection tasks of both ends (hyper's client connection
//!   inside reqwest, the upstream's server connection) on the workers. The counts are the
//!   gateway's own request path plus reqwest's front end (building the request,
//!   reading and parsing the body); neither the upstream nor hyper's connection tasks.
//! - `current_thread`: every task runs on the bench thread, so the counts are the whole
//!   request at both ends: the gateway, reqwest and hyper, and the in-process test
//!   upstream's own allocations. The upstream's code is the same before and after issue
//!   13, so a difference between two trees is the gateway's (or a dependency's) doing.
//!
//! Allocation counts are per request (divan's `alloc` row: count and bytes; its
//! `dealloc`/`grow` rows as well); the request's clone (an input) and the answer's drop
//! happen outside the measurement. Times include the loopback round trip and the test
//! upstream's work, so they move with the machine's load; the counts do not.
//!
//! The source uses only API that exists before and after the issue-13 refactor
//! (`Config::from_str`, `Gateway::from_config`, `chat`, `chat_stream`,
//! `GatewayStream::next`) and config keys whose meaning did not change (no
//! `queue_timeout`), so `bench/ab_core.sh` can run it in both trees.
//!
//! Run: `cargo bench -p echelon --bench request`
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use divan::Bencher;
use echelon::Gateway;
use echelon::config::Config;
use echelon_testkit::{TestUpstream, UpstreamOptions};
use echelon_types::ChatCompletionRequest;
use tokio::runtime::Runtime;

#[global_allocator]
static ALLOC: divan::AllocProfiler = divan::AllocProfiler::system();

fn main() {
    divan::main();
}

/// One model, no limits, no retries.
const PLAIN: &str = r#"
providers:
  up: { base_url: "BASE_URL" }
models:
  m: { provider: up, max_retries: 0, timeout: 30 }
usage: { ledger: false }
"#;

/// Every layer on, with limits high enough never to bind (the point is to pay for
/// checking them), as in bench/run.sh.
const FULL: &str = r#"
providers:
  up: { base_url: "BASE_URL", api_keys: ["bench-k1", "bench-k2", "bench-k3"] }
models:
  a: &limits
    provider: up
    max_retries: 1
    timeout: 30
    rpm_limit: 100000000
    tpm_limit: 1000000000
    rate_limit_capacity: 1000000
    rate_limit_refill_rate: 1000000
    concurrency_limit: 1000
    circuit_breaker: { failure_threshold: 5, recovery_time: 30, half_open_requests: 1 }
  b: { <<: *limits, provider: up }
task_groups:
  g: { echelon1: { models: [a] }, echelon2: { models: [b] } }
usage: { ledger: false }
"#;

fn request(route: &str, stream: bool) -> ChatCompletionRequest {
    let body = format!(
        r#"{{"model":"{route}","messages":[{{"role":"user","content":"hello there, how are you"}}],"max_tokens":16,"stream":{stream}}}"#
    );
    serde_json::from_str(&body).unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Flavor {
    MultiThread,
    CurrentThread,
}

/// A runtime, an upstream on it, and a gateway in front of it (`yaml` with `BASE_URL`
/// replaced by the upstream's `/v1` URL), warmed up with 20 requests of each kind
/// (connections open, tiktoken's encoder built) outside the measurement.
struct Setup {
    rt: Runtime,
    gateway: Gateway,
    _upstream: TestUpstream,
}

impl Setup {
    fn new(flavor: Flavor, yaml: &str, route: &str) -> Setup {
        let rt = match flavor {
            Flavor::MultiThread => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
            Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        };
        let upstream = rt
            .block_on(TestUpstream::start_with(UpstreamOptions {
                record_requests: false,
                ..UpstreamOptions::default()
            }))
            .unwrap();
        let yaml = yaml.replace("BASE_URL", &upstream.base_url());
        let config = Config::from_str(&yaml, "b.yaml").unwrap();
        let gateway = {
            let _guard = rt.enter();
            Gateway::from_config(&config).unwrap()
        };
        let setup = Setup {
            rt,
            gateway,
            _upstream: upstream,
        };
        for _ in 0..20 {
            setup.chat(request(route, false));
            setup.stream(request(route, true));
        }
        setup
    }

    fn chat(&self, req: ChatCompletionRequest) -> echelon::Completion {
        self.rt.block_on(self.gateway.chat(req)).unwrap()
    }

    /// Drains the stream; returns the number of chunks.
    fn stream(&self, req: ChatCompletionRequest) -> usize {
        self.rt.block_on(async {
            let mut stream = self.gateway.chat_stream(req).await.unwrap();
            let mut chunks = 0;
            while let Some(chunk) = stream.next().await {
                chunk.unwrap();
                chunks += 1;
            }
            chunks
        })
    }
}

fn bench_chat(b: Bencher, flavor: Flavor, yaml: &str, route: &str) {
    let setup = Setup::new(flavor, yaml, route);
    let req = request(route, false);
    b.with_inputs(|| req.clone())
        .bench_local_values(|req| setup.chat(req));
}

fn bench_stream(b: Bencher, flavor: Flavor, yaml: &str, route: &str) {
    let setup = Setup::new(flavor, yaml, route);
    let req = request(route, true);
    b.with_inputs(|| req.clone())
        .bench_local_values(|req| setup.stream(req));
}

/// 1,000 samples of 10 requests: 10,000 requests a scenario, about 1 s each.
#[divan::bench_group(sample_count = 1000, sample_size = 10)]
mod multi_thread {
    use super::*;

    #[divan::bench]
    fn plain_chat(b: Bencher) {
        bench_chat(b, Flavor::MultiThread, PLAIN, "m");
    }

    #[divan::bench]
    fn plain_stream(b: Bencher) {
        bench_stream(b, Flavor::MultiThread, PLAIN, "m");
    }

    #[divan::bench]
    fn full_chat(b: Bencher) {
        bench_chat(b, Flavor::MultiThread, FULL, "g");
    }

    #[divan::bench]
    fn full_stream(b: Bencher) {
        bench_stream(b, Flavor::MultiThread, FULL, "g");
    }
}

/// As [`multi_thread`].
#[divan::bench_group(sample_count = 1000, sample_size = 10)]
mod current_thread {
    use super::*;

    #[divan::bench]
    fn plain_chat(b: Bencher) {
        bench_chat(b, Flavor::CurrentThread, PLAIN, "m");
    }

    #[divan::bench]
    fn plain_stream(b: Bencher) {
        bench_stream(b, Flavor::CurrentThread, PLAIN, "m");
    }

    #[divan::bench]
    fn full_chat(b: Bencher) {
        bench_chat(b, Flavor::CurrentThread, FULL, "g");
    }

    #[divan::bench]
    fn full_stream(b: Bencher) {
        bench_stream(b, Flavor::CurrentThread, FULL, "g");
    }
}
