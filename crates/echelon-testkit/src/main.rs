//! `echelon-testkit`: the fault-injecting OpenAI-compatible upstream as a
//! process, for benchmarks and chaos runs.
//!
//! Prints exactly one line, `listening on http://HOST:PORT`, once bound, then
//! serves until SIGINT or SIGTERM.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use echelon_testkit::{Behavior, FaultPlan, TestUpstream, UpstreamOptions};

const USAGE: &str = "\
usage: echelon-testkit [--host 127.0.0.1] [--port 0] [--model test-model] [--api-key KEY]
                       [--latency-ms 0] [--chunk-delay-ms 0] [--context-window TOKENS]
                       [--fault-rate 0.3 [--faults LIST] [--seed N]]

faults: normal, stall, cut, reset, malformed, malformed-sse[:N], malformed-sse-run:N:COUNT, stream-cut[:N],
        stream-stall[:N], delay:MS, empty, no-choices, no-finish, huge:BYTES, or an HTTP status (e.g. 503), optionally with Retry-After seconds (e.g. 429:2);
        default LIST: 429:1,500,503,stall,cut,reset,malformed,stream-cut:0,stream-cut:3,malformed-sse:2";

/// Faults used when `--fault-rate` is given without `--faults`.
const DEFAULT_FAULTS: &str =
    "429:1,500,503,stall,cut,reset,malformed,stream-cut:0,stream-cut:3,malformed-sse:2";
/// Seed used when `--seed` is not given, so chaos runs are reproducible.
const DEFAULT_SEED: u64 = 0x5EED;

#[derive(Debug)]
struct Args {
    host: String,
    port: u16,
    options: UpstreamOptions,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut host = "127.0.0.1".to_owned();
    let mut port = 0u16;
    let mut options = UpstreamOptions {
        // A long benchmark must not accumulate every request in memory.
        record_requests: false,
        ..UpstreamOptions::default()
    };
    let mut fault_rate: Option<f64> = None;
    let mut faults: Option<String> = None;
    let mut seed = DEFAULT_SEED;

    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Err(String::new());
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        fn number<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
            v.parse()
                .map_err(|_| format!("{flag}: invalid number `{v}`"))
        }
        match flag.as_str() {
            "--host" => host = value()?,
            "--port" => port = number(&flag, value()?)?,
            "--model" => options.model_alias = value()?,
            "--api-key" => options.api_key = Some(value()?),
            "--latency-ms" => options.latency = Duration::from_millis(number(&flag, value()?)?),
            "--chunk-delay-ms" => {
                options.chunk_delay = Duration::from_millis(number(&flag, value()?)?)
            }
            "--context-window" => options.context_window = Some(number(&flag, value()?)?),
            "--fault-rate" => {
                let rate: f64 = number(&flag, value()?)?;
                if !(0.0..=1.0).contains(&rate) {
                    return Err(format!("--fault-rate must be in [0, 1], got {rate}"));
                }
                fault_rate = Some(rate);
            }
            "--faults" => faults = Some(value()?),
            "--seed" => seed = number(&flag, value()?)?,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }

    match (fault_rate, faults) {
        (None, Some(_)) => return Err("--faults needs --fault-rate".to_owned()),
        (None, None) => {}
        (Some(rate), faults) => {
            let faults = faults
                .as_deref()
                .unwrap_or(DEFAULT_FAULTS)
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.parse::<Behavior>().map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            options.fault_rate = Some(FaultPlan { rate, faults, seed });
        }
    }
    Ok(Args {
        host,
        port,
        options,
    })
}

/// Resolves on SIGINT (ctrl-c) or, on Unix, SIGTERM.
async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn main() -> ExitCode {
    // Before the runtime's threads exist (`echelon_socket::reserve_descriptors`).
    echelon_socket::reserve_descriptors(4096);
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(serve()),
        Err(error) => {
            eprintln!("echelon-testkit: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) if message.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("echelon-testkit: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let upstream = match TestUpstream::start_on((args.host.as_str(), args.port), args.options).await
    {
        Ok(upstream) => upstream,
        Err(error) => {
            eprintln!(
                "echelon-testkit: cannot bind {}:{}: {error}",
                args.host, args.port
            );
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout().lock();
    let printed =
        writeln!(stdout, "listening on http://{}", upstream.addr()).and_then(|()| stdout.flush());
    drop(stdout);
    if let Err(error) = printed {
        eprintln!("echelon-testkit: cannot write to stdout: {error}");
        return ExitCode::FAILURE;
    }
    terminated().await;
    upstream.shutdown().await;
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        parse_args(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn parses_every_flag() {
        let args = parse(&[
            "--host",
            "0.0.0.0",
            "--port=8081",
            "--model",
            "m",
            "--api-key",
            "k",
            "--latency-ms",
            "50",
            "--chunk-delay-ms=5",
            "--context-window",
            "100",
            "--fault-rate",
            "0.3",
            "--faults",
            "429:1,stall,stream-cut:3",
            "--seed",
            "9",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(args.host, "0.0.0.0");
        assert_eq!(args.port, 8081);
        let o = args.options;
        assert_eq!(o.model_alias, "m");
        assert_eq!(o.api_key.as_deref(), Some("k"));
        assert_eq!(o.latency, Duration::from_millis(50));
        assert_eq!(o.chunk_delay, Duration::from_millis(5));
        assert_eq!(o.context_window, Some(100));
        let plan = o.fault_rate.unwrap_or_else(|| panic!("no fault plan"));
        assert_eq!(plan.rate, 0.3);
        assert_eq!(plan.seed, 9);
        assert_eq!(
            plan.faults,
            vec![
                Behavior::Status {
                    status: 429,
                    retry_after: Some(1),
                    message: "injected fault: HTTP 429".into()
                },
                Behavior::Stall,
                Behavior::StreamCut { chunks: 3 },
            ]
        );
    }

    #[test]
    fn defaults_and_errors() {
        let args = parse(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((args.host.as_str(), args.port), ("127.0.0.1", 0));
        assert!(args.options.fault_rate.is_none());
        assert!(!args.options.record_requests);
        let plan = parse(&["--fault-rate", "0.5"])
            .unwrap_or_else(|e| panic!("{e}"))
            .options
            .fault_rate
            .unwrap_or_else(|| panic!("no fault plan"));
        assert_eq!(plan.faults.len(), 10);
        assert!(plan.faults.contains(&Behavior::Reset));
        assert!(plan.faults.contains(&Behavior::StreamCut { chunks: 3 }));
        assert_eq!(plan.seed, DEFAULT_SEED);
        for bad in [
            &["--port"][..],
            &["--port", "x"],
            &["--bogus"],
            &["--faults", "cut"],
            &["--fault-rate", "2"],
            &["--fault-rate", "0.1", "--faults", "explode"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(parse(&["--help"]).err().as_deref(), Some(""));
    }
}
