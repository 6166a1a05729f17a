//! What the fake upstream does with a chat-completion request, and the
//! seeded fault plan used by chaos runs.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// How the upstream answers one `POST /v1/chat/completions` request.
///
/// Authentication and the context-window check happen before a behaviour is
/// chosen, so a request rejected by either never consumes one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Behavior {
    /// Answer normally (stream or not, as the request asks).
    Normal,
    /// Reply with this HTTP status and an OpenAI error body; `retry_after`
    /// (seconds) adds a `Retry-After` header.
    Status {
        /// The HTTP status code (an invalid code is answered as 500).
        status: u16,
        /// Seconds for the `Retry-After` header, if any.
        retry_after: Option<u64>,
        /// `error.message` of the body.
        message: String,
    },
    /// Accept the request and never answer (hold the connection until the
    /// client gives up or the upstream shuts down).
    Stall,
    /// Close the TCP connection without sending any response.
    CutConnection,
    /// Reset the TCP connection (an RST, by closing it with `SO_LINGER` 0)
    /// without sending any response.
    Reset,
    /// For streams: send the role chunk and `chunks` content chunks, then
    /// close the connection abruptly (no finish chunk, no `[DONE]`, the
    /// chunked body is not terminated). For non-streams: send the headers
    /// (with the full `Content-Length`) and part of the body, then close.
    StreamCut {
        /// Content chunks sent before the cut.
        chunks: usize,
    },
    /// For streams: send the role chunk and `chunks` content chunks, then
    /// stall forever. For non-streams: headers and part of the body, then
    /// stall.
    StreamStall {
        /// Content chunks sent before the stall.
        chunks: usize,
    },
    /// 200 with a body that is not valid JSON (non-stream), or a
    /// `data: {not json` SSE event right after the role chunk (stream; the
    /// rest of the stream, `[DONE]` included, follows normally).
    Malformed,
    /// For streams: the role chunk and `chunks` content chunks, then a
    /// `data: {not json` SSE event, then the rest of the stream (`[DONE]`
    /// included) as normal. For non-streams: as [`Behavior::Malformed`].
    /// With `chunks: 0` a stream gets exactly what `Malformed` sends.
    MalformedSse {
        /// Content chunks sent before the malformed event.
        chunks: usize,
    },
    /// As [`Behavior::MalformedSse`] with `count` `data: {not json` events in a row
    /// (none between them) after the `chunks` content chunks, then the rest of the
    /// stream as normal: more than the gateway's limit of malformed events in a row
    /// is a stream that never recovers. For non-streams: as [`Behavior::Malformed`].
    MalformedSseRun {
        /// Content chunks sent before the malformed events.
        chunks: usize,
        /// Malformed events sent in a row.
        count: usize,
    },
    /// Sleep this long, then behave normally.
    Delay(Duration),
    /// An empty answer: 200 with the body `{}` (non-stream), or the role chunk then
    /// `[DONE]` with no content, finish reason or usage (stream).
    EmptyAnswer,
    /// No choices: 200 with `{"id":…,"object":"chat.completion","choices":[]}`
    /// (non-stream), or a lone `[DONE]` (stream).
    NoChoices,
    /// The answer without a finish reason: non-streams get `finish_reason: null`;
    /// streams get the role chunk, every content chunk and `[DONE]` but no finish
    /// chunk (the usage chunk too, when asked for).
    NoFinishReason,
    /// A huge answer: content of exactly `bytes` bytes (`"lorem "` repeated, cut to
    /// length) and no `usage`, in one body (non-stream) or in content chunks of at most
    /// 64 KiB (stream, then the finish chunk and `[DONE]`).
    HugeAnswer {
        /// Bytes of content.
        bytes: usize,
    },
    /// For streams: the role chunk and `chunks` content chunks, then an in-band error
    /// event (OpenAI: `data: {"error": {…, "type": "server_error"}}`; Gemini:
    /// `data: {"error": {"code": 503, "status": "UNAVAILABLE", …}}`), then the body
    /// ends. For non-streams: HTTP 500 with the same error body.
    StreamError {
        /// Content chunks sent before the error event.
        chunks: usize,
    },
}

impl Behavior {
    /// `Status` with this code, no `Retry-After`, and a message naming the code.
    pub fn status(status: u16) -> Behavior {
        Behavior::Status {
            status,
            retry_after: None,
            message: status_message(status),
        }
    }
}

fn status_message(status: u16) -> String {
    format!("injected fault: HTTP {status}")
}

/// Error of [`Behavior::from_str`]: the text that could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseBehaviorError(pub String);

impl fmt::Display for ParseBehaviorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown fault `{}` (expected normal, stall, cut, reset, malformed, malformed-sse[:N], \
             malformed-sse-run:N:COUNT, stream-cut[:N], stream-stall[:N], stream-error[:N], delay:MS, empty, \
             no-choices, no-finish, \
             huge:BYTES, or an HTTP status like 429 or 429:RETRY_AFTER_SECS)",
            self.0
        )
    }
}

impl std::error::Error for ParseBehaviorError {}

/// Chunks sent before a `stream-cut` / `stream-stall` / `malformed-sse` given
/// without `:N`.
const DEFAULT_CHUNKS: usize = 2;

impl FromStr for Behavior {
    type Err = ParseBehaviorError;

    /// Parses the names used by the binary's `--faults` list:
    /// `normal`, `stall`, `cut`, `reset`, `malformed`, `malformed-sse[:N]`,
    /// `malformed-sse-run:N:COUNT`, `stream-cut[:N]`, `stream-stall[:N]`, `stream-error[:N]`, `delay:MS`, `empty`, `no-choices`,
    /// `no-finish`, `huge:BYTES`, `STATUS` or
    /// `STATUS:RETRY_AFTER_SECS` (the names [`Behavior`]'s `Display` writes).
    fn from_str(s: &str) -> Result<Behavior, ParseBehaviorError> {
        let err = || ParseBehaviorError(s.to_owned());
        let s = s.trim();
        let (name, arg) = match s.split_once(':') {
            Some((name, arg)) => (name, Some(arg)),
            None => (s, None),
        };
        let number = |arg: Option<&str>| -> Result<Option<u64>, ParseBehaviorError> {
            arg.map(|a| a.trim().parse::<u64>().map_err(|_| err()))
                .transpose()
        };
        let chunks = |arg| -> Result<usize, ParseBehaviorError> {
            match number(arg)? {
                Some(n) => usize::try_from(n).map_err(|_| err()),
                None => Ok(DEFAULT_CHUNKS),
            }
        };
        match name {
            "normal" if arg.is_none() => Ok(Behavior::Normal),
            "stall" if arg.is_none() => Ok(Behavior::Stall),
            "cut" if arg.is_none() => Ok(Behavior::CutConnection),
            "reset" if arg.is_none() => Ok(Behavior::Reset),
            "malformed" if arg.is_none() => Ok(Behavior::Malformed),
            "malformed-sse" => Ok(Behavior::MalformedSse {
                chunks: chunks(arg)?,
            }),
            "malformed-sse-run" => {
                let (n, count) = arg.and_then(|a| a.split_once(':')).ok_or_else(err)?;
                Ok(Behavior::MalformedSseRun {
                    chunks: chunks(Some(n))?,
                    count: chunks(Some(count))?,
                })
            }
            "stream-cut" => Ok(Behavior::StreamCut {
                chunks: chunks(arg)?,
            }),
            "stream-stall" => Ok(Behavior::StreamStall {
                chunks: chunks(arg)?,
            }),
            "stream-error" => Ok(Behavior::StreamError {
                chunks: chunks(arg)?,
            }),
            "delay" => match number(arg)? {
                Some(ms) => Ok(Behavior::Delay(Duration::from_millis(ms))),
                None => Err(err()),
            },
            "empty" if arg.is_none() => Ok(Behavior::EmptyAnswer),
            "no-choices" if arg.is_none() => Ok(Behavior::NoChoices),
            "no-finish" if arg.is_none() => Ok(Behavior::NoFinishReason),
            "huge" => match number(arg)? {
                Some(n) => Ok(Behavior::HugeAnswer {
                    bytes: usize::try_from(n).map_err(|_| err())?,
                }),
                None => Err(err()),
            },
            code => match code.parse::<u16>() {
                Ok(status) if (100..=599).contains(&status) => Ok(Behavior::Status {
                    status,
                    retry_after: number(arg)?,
                    message: status_message(status),
                }),
                _ => Err(err()),
            },
        }
    }
}

impl fmt::Display for Behavior {
    /// The `--faults` name that parses back to this behaviour (a `Status`'s
    /// message is not part of it).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Behavior::Normal => f.write_str("normal"),
            Behavior::Status {
                status,
                retry_after: Some(secs),
                ..
            } => write!(f, "{status}:{secs}"),
            Behavior::Status { status, .. } => write!(f, "{status}"),
            Behavior::Stall => f.write_str("stall"),
            Behavior::CutConnection => f.write_str("cut"),
            Behavior::Reset => f.write_str("reset"),
            Behavior::StreamCut { chunks } => write!(f, "stream-cut:{chunks}"),
            Behavior::StreamStall { chunks } => write!(f, "stream-stall:{chunks}"),
            Behavior::StreamError { chunks } => write!(f, "stream-error:{chunks}"),
            Behavior::Malformed => f.write_str("malformed"),
            Behavior::MalformedSse { chunks } => write!(f, "malformed-sse:{chunks}"),
            Behavior::MalformedSseRun { chunks, count } => {
                write!(f, "malformed-sse-run:{chunks}:{count}")
            }
            Behavior::Delay(d) => write!(f, "delay:{}", d.as_millis()),
            Behavior::EmptyAnswer => f.write_str("empty"),
            Behavior::NoChoices => f.write_str("no-choices"),
            Behavior::NoFinishReason => f.write_str("no-finish"),
            Behavior::HugeAnswer { bytes } => write!(f, "huge:{bytes}"),
        }
    }
}

/// Probabilistic faults (for chaos runs): with probability `rate`, a request
/// gets one of `faults` chosen uniformly; otherwise the default behaviour
/// (see [`crate::TestUpstream::set_behavior`], `Normal` unless changed).
/// The sequence of draws is deterministic given `seed`.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultPlan {
    /// Probability in `[0, 1]` that a request gets a fault.
    pub rate: f64,
    /// The faults to choose from, uniformly. Empty means no faults.
    pub faults: Vec<Behavior>,
    /// Seed of the pseudo-random sequence.
    pub seed: u64,
}

/// The running state of a [`FaultPlan`]: a splitmix64 generator.
#[derive(Debug)]
pub(crate) struct FaultDraws {
    plan: FaultPlan,
    state: u64,
}

impl FaultDraws {
    pub(crate) fn new(plan: FaultPlan) -> FaultDraws {
        let state = plan.seed;
        FaultDraws { plan, state }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The fault for the next request, or `None` for "no fault".
    pub(crate) fn draw(&mut self) -> Option<Behavior> {
        // 53 random bits -> uniform f64 in [0, 1).
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        if self.plan.faults.is_empty() || unit >= self.plan.rate {
            return None;
        }
        let len = self.plan.faults.len() as u64;
        let index = usize::try_from(self.next_u64() % len).unwrap_or(0);
        self.plan.faults.get(index).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fault_names() {
        let parse = |s: &str| s.parse::<Behavior>();
        assert_eq!(parse("normal"), Ok(Behavior::Normal));
        assert_eq!(parse("stall"), Ok(Behavior::Stall));
        assert_eq!(parse("cut"), Ok(Behavior::CutConnection));
        assert_eq!(parse("reset"), Ok(Behavior::Reset));
        assert_eq!(parse("malformed"), Ok(Behavior::Malformed));
        assert_eq!(
            parse("malformed-sse"),
            Ok(Behavior::MalformedSse { chunks: 2 })
        );
        assert_eq!(
            parse("malformed-sse:0"),
            Ok(Behavior::MalformedSse { chunks: 0 })
        );
        assert_eq!(
            parse("stream-error"),
            Ok(Behavior::StreamError { chunks: 2 })
        );
        assert_eq!(
            Behavior::StreamError { chunks: 1 }.to_string(),
            "stream-error:1"
        );
        assert_eq!(
            parse("malformed-sse-run:1:9"),
            Ok(Behavior::MalformedSseRun {
                chunks: 1,
                count: 9
            })
        );
        assert_eq!(parse("stream-cut"), Ok(Behavior::StreamCut { chunks: 2 }));
        assert_eq!(parse("stream-cut:5"), Ok(Behavior::StreamCut { chunks: 5 }));
        assert_eq!(
            parse("stream-stall:0"),
            Ok(Behavior::StreamStall { chunks: 0 })
        );
        assert_eq!(
            parse("delay:250"),
            Ok(Behavior::Delay(Duration::from_millis(250)))
        );
        assert_eq!(parse(" 503 "), Ok(Behavior::status(503)));
        assert_eq!(parse("empty"), Ok(Behavior::EmptyAnswer));
        assert_eq!(parse("no-choices"), Ok(Behavior::NoChoices));
        assert_eq!(parse("no-finish"), Ok(Behavior::NoFinishReason));
        assert_eq!(parse("huge:100"), Ok(Behavior::HugeAnswer { bytes: 100 }));
        assert!(parse("huge").is_err());
        assert!(parse("empty:1").is_err());
        assert_eq!(
            parse("429:3"),
            Ok(Behavior::Status {
                status: 429,
                retry_after: Some(3),
                message: "injected fault: HTTP 429".into(),
            })
        );
        for bad in [
            "",
            "boom",
            "42",
            "700",
            "delay",
            "stall:1",
            "reset:1",
            "stream-cut:x",
            "429:y",
            "malformed-sse:z",
            "malformed-sse-run",
            "malformed-sse-run:1",
            "malformed-sse-run:1:x",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn display_round_trips_through_parse() {
        for b in [
            Behavior::Normal,
            Behavior::Stall,
            Behavior::CutConnection,
            Behavior::Reset,
            Behavior::Malformed,
            Behavior::MalformedSse { chunks: 3 },
            Behavior::MalformedSseRun {
                chunks: 1,
                count: 9,
            },
            Behavior::StreamCut { chunks: 0 },
            Behavior::StreamStall { chunks: 4 },
            Behavior::Delay(Duration::from_millis(250)),
            Behavior::EmptyAnswer,
            Behavior::NoChoices,
            Behavior::NoFinishReason,
            Behavior::HugeAnswer { bytes: 1 << 20 },
            Behavior::StreamError { chunks: 2 },
            Behavior::status(503),
            Behavior::Status {
                status: 429,
                retry_after: Some(1),
                message: status_message(429),
            },
        ] {
            assert_eq!(b.to_string().parse::<Behavior>(), Ok(b.clone()), "{b}");
        }
    }

    fn draws(seed: u64, n: usize) -> Vec<Option<Behavior>> {
        let mut d = FaultDraws::new(FaultPlan {
            rate: 0.5,
            faults: vec![
                Behavior::status(429),
                Behavior::status(500),
                Behavior::Stall,
            ],
            seed,
        });
        (0..n).map(|_| d.draw()).collect()
    }

    #[test]
    fn draws_are_deterministic_and_roughly_at_rate() {
        let a = draws(7, 1000);
        assert_eq!(a, draws(7, 1000));
        assert_ne!(a, draws(8, 1000));
        let faults = a.iter().filter(|d| d.is_some()).count();
        assert!(
            (400..600).contains(&faults),
            "{faults} faults of 1000 at rate 0.5"
        );
        for kind in [
            Behavior::status(429),
            Behavior::status(500),
            Behavior::Stall,
        ] {
            assert!(a.contains(&Some(kind.clone())), "{kind:?} never drawn");
        }
    }

    #[test]
    fn rate_bounds_and_empty_faults() {
        let mut never = FaultDraws::new(FaultPlan {
            rate: 0.0,
            faults: vec![Behavior::Stall],
            seed: 1,
        });
        let mut always = FaultDraws::new(FaultPlan {
            rate: 1.0,
            faults: vec![Behavior::Stall],
            seed: 1,
        });
        let mut empty = FaultDraws::new(FaultPlan {
            rate: 1.0,
            faults: vec![],
            seed: 1,
        });
        for _ in 0..100 {
            assert_eq!(never.draw(), None);
            assert_eq!(always.draw(), Some(Behavior::Stall));
            assert_eq!(empty.draw(), None);
        }
    }
}
