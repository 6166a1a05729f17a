//! The LLM-judge library against the fake upstream.
//!
//! The test upstream answers `"echo: " + last user message`, so with the rubric
//! `"{response}"` the judge's reply is the judged response itself: a response
//! `"Score: 7"` is judged `"echo: Score: 7"`, which reads as 7.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use echelon::Gateway;
use echelon::config::Config;
use echelon::judge::{
    Judge, JudgeConfig, JudgeError, JudgeItem, Judgement, Progress, ScoreParse, UNPARSED,
    length_penalty,
};
use echelon::tokens::Encoding;
use echelon_testkit::{Behavior, TestUpstream, UpstreamOptions};
use futures::StreamExt;
use serde_json::{Value, json};

/// A gateway with one priced model `judge` (no retries) on `up`.
fn gateway(up: &TestUpstream) -> Arc<Gateway> {
    gateway_with(up, "")
}

/// [`gateway`] with `top` (YAML) added at the top level.
fn gateway_with(up: &TestUpstream, top: &str) -> Arc<Gateway> {
    let yaml = format!(
        r#"
{top}
providers:
  p: {{ base_url: "{}", api_keys: ["k"] }}
models:
  judge:
    provider: p
    model: up-judge
    max_retries: 0
    retry_delay: 0.01
    pricing: {{ input_per_1m: 1.0, output_per_1m: 2.0 }}
"#,
        up.base_url()
    );
    let config = Config::from_str(&yaml, "judge.yaml").unwrap();
    Arc::new(Gateway::from_config(&config).unwrap())
}

/// The judge sees only the response, so the upstream echoes it back.
fn echo_config() -> JudgeConfig {
    JudgeConfig {
        route: "judge".into(),
        rubric: "{response}".into(),
        ..JudgeConfig::default()
    }
}

fn judge(up: &TestUpstream, config: JudgeConfig) -> Judge {
    Judge::new(gateway(up), config).unwrap()
}

fn write(path: &Path, lines: &[Value]) {
    let mut text = String::new();
    for l in lines {
        text.push_str(&l.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

fn read_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'), "{text:?}");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Output lines by id key.
fn by_id(lines: &[Value]) -> HashMap<String, Value> {
    let mut map = HashMap::new();
    for l in lines {
        let key = match &l["id"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        assert!(
            map.insert(key.clone(), l.clone()).is_none(),
            "id {key} twice"
        );
    }
    map
}

fn item(id: &str, response: &str) -> JudgeItem {
    JudgeItem::new(id, "the prompt", response)
}

fn no_progress(_: &Progress) {}

// ---------------------------------------------------------------------------
// parsing

#[test]
fn every_seed_format_parses_with_the_default_patterns() {
    let parser =
        echelon::judge::ScoreParser::new(&echelon::judge::default_patterns(), 1.0, 10.0).unwrap();
    for (text, want) in [
        ("最终评分 8", ScoreParse::Score(8.0)),
        ("最终评分: 7", ScoreParse::Score(7.0)),
        ("最终评分：6", ScoreParse::Score(6.0)),
        ("评分: 5", ScoreParse::Score(5.0)),
        ("评分：4", ScoreParse::Score(4.0)),
        ("Score: 3", ScoreParse::Score(3.0)),
        ("score: 7", ScoreParse::Score(7.0)),
        ("SCORE: 2", ScoreParse::Score(2.0)),
        ("8", ScoreParse::Score(8.0)),
        (" 9\n", ScoreParse::Score(9.0)),
        ("最终评分: 2 ... 最终评分: 9", ScoreParse::Score(9.0)),
        ("Score: 11", ScoreParse::OutOfRange(11.0)),
        ("11", ScoreParse::OutOfRange(11.0)),
        ("about 8 I think", ScoreParse::Unparsed),
        ("no score", ScoreParse::Unparsed),
    ] {
        assert_eq!(parser.parse(text), want, "{text:?}");
    }
}

// ---------------------------------------------------------------------------
// judging one item

#[tokio::test]
async fn a_scored_item_has_its_reward_cost_and_output_line() {
    let up = TestUpstream::start().await.unwrap();
    let coef = 0.5;
    let target = 4;
    let j = judge(
        &up,
        JudgeConfig {
            reward_coefficient: coef,
            target_tokens: target,
            ..echo_config()
        },
    );
    let response = "Score: 7. The answer is right, complete and well explained overall.";
    let mut it = JudgeItem::from_json_line(
        &json!({"id": 17, "prompt": "2+2?", "response": response, "split": "train"}).to_string(),
    )
    .unwrap();
    it.reference = Some("4".into());
    let out = j.judge_one(&it).await;

    let n = Encoding::Cl100kBase.count(response);
    assert!(n > target, "the response must be longer than the target");
    let penalty = -coef * (n - target) as f64 / target as f64;
    assert_eq!(out.score, Some(7.0));
    assert_eq!(out.response_tokens, n);
    assert_eq!(out.length_penalty, Some(penalty));
    assert_eq!(out.reward, Some(7.0 + penalty));
    assert_eq!(
        out.raw.as_deref(),
        Some(format!("echo: {response}").as_str())
    );
    assert_eq!(out.model.as_deref(), Some("judge"));
    assert_eq!((out.attempts, out.reasks, out.cached), (1, 0, false));
    assert!(out.tokens.prompt > 0 && out.tokens.completion > 0);
    let model = j.config().route.clone();
    let expected_cost =
        gateway(&up)
            .model(&model)
            .unwrap()
            .cost_usd(out.tokens.prompt, out.tokens.completion, 0);
    assert!(expected_cost > 0.0);
    assert_eq!(out.cost, expected_cost);
    assert_eq!(out.error, None);

    // The request: one user message, temperature 0.
    let sent = up.recorded();
    let body = sent[0].body.as_ref().unwrap();
    assert_eq!(body["model"], "up-judge");
    assert_eq!(body["temperature"], 0.0);
    assert_eq!(
        body["messages"],
        json!([{"role": "user", "content": response}])
    );

    // The output line: the id stays a number, extras are carried, inputs are not.
    let line: Value = serde_json::from_str(&out.to_line()).unwrap();
    assert_eq!(line["id"], json!(17));
    assert_eq!(line["score"], json!(7.0));
    assert_eq!(line["reward"], json!(7.0 + penalty));
    assert_eq!(line["route"], "judge");
    assert_eq!(line["model"], "judge");
    assert_eq!(line["attempts"], 1);
    assert_eq!(line["cached"], false);
    assert_eq!(line["split"], "train");
    assert_eq!(line["tokens"]["prompt"], json!(out.tokens.prompt));
    assert!(line["latency_ms"].is_u64());
    for absent in ["error", "prompt", "response", "reference"] {
        assert!(line.get(absent).is_none(), "{absent} in {line}");
    }
}

#[tokio::test]
async fn rewards_follow_the_documented_formula() {
    let up = TestUpstream::start().await.unwrap();
    // About 2000 tokens of " a" after the score.
    let long = format!("Score: 8{}", " a".repeat(2000));
    let n = Encoding::Cl100kBase.count(&long);
    let cases = [
        // (coefficient, target, expected reward)
        (0.1, 0, 8.0),
        (0.1, n, 8.0),
        (0.1, n + 100, 8.0),
        (0.5, n / 2, 8.0 - 0.5 * (n - n / 2) as f64 / (n / 2) as f64),
        (1.0, 1000, 8.0 - (n - 1000) as f64 / 1000.0),
    ];
    for (coef, target, want) in cases {
        let j = judge(
            &up,
            JudgeConfig {
                reward_coefficient: coef,
                target_tokens: target,
                ..echo_config()
            },
        );
        let out = j.judge_one(&item("x", &long)).await;
        assert_eq!(out.score, Some(8.0));
        assert_eq!(out.reward, Some(want), "coef {coef} target {target} n {n}");
        assert_eq!(out.reward, Some(8.0 + length_penalty(n, target, coef)));
    }
    // The exact numbers of the formula.
    assert_eq!(length_penalty(1024, 512, 0.1), -0.1);
    assert_eq!(length_penalty(1536, 512, 0.5), -1.0);
    assert_eq!(length_penalty(500, 512, 0.5), 0.0);
    assert_eq!(length_penalty(5000, 0, 0.5), 0.0);
}

#[tokio::test]
async fn unparsable_answers_are_re_asked_then_marked_unparsed() {
    let up = TestUpstream::start().await.unwrap();
    let j = judge(&up, echo_config());
    let out = j.judge_one(&item("a", "I refuse to give a number")).await;
    assert_eq!(up.chat_requests(), 3, "1 ask + max_reasks (2)");
    assert_eq!(out.score, None);
    assert_eq!(out.reward, None);
    assert_eq!(out.error.as_deref(), Some(UNPARSED));
    assert!(out.is_unparsed());
    assert_eq!((out.attempts, out.reasks), (3, 2));
    // The raw text is the judge's last reply (the echo of the reminder).
    let raw = out.raw.clone().unwrap();
    assert!(raw.starts_with("echo: I could not read"), "{raw}");
    let line: Value = serde_json::from_str(&out.to_line()).unwrap();
    assert_eq!(line["score"], Value::Null);
    assert_eq!(line["error"], "unparsed");

    // The follow-up turn: the judge's answer, then the reminder.
    let sent = up.recorded();
    let msgs = sent[1].body.as_ref().unwrap()["messages"].clone();
    assert_eq!(msgs.as_array().unwrap().len(), 3);
    assert_eq!(msgs[1]["role"], "assistant");
    assert_eq!(msgs[1]["content"], "echo: I refuse to give a number");
    assert_eq!(msgs[2]["role"], "user");
    assert!(
        msgs[2]["content"]
            .as_str()
            .unwrap()
            .contains("from 1 to 10:\n最终评分: X")
    );
    assert_eq!(
        sent[2].body.as_ref().unwrap()["messages"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
}

#[tokio::test]
async fn out_of_range_scores_are_re_asked_then_marked_unparsed() {
    let up = TestUpstream::start().await.unwrap();
    let j = judge(
        &up,
        JudgeConfig {
            max_reasks: 3,
            ..echo_config()
        },
    );
    let out = j.judge_one(&item("a", "Score: 11")).await;
    assert_eq!(up.chat_requests(), 4, "1 ask + max_reasks (3)");
    assert_eq!(out.score, None);
    assert_eq!(out.error.as_deref(), Some(UNPARSED));

    let up0 = TestUpstream::start().await.unwrap();
    let j = judge(
        &up0,
        JudgeConfig {
            max_reasks: 0,
            ..echo_config()
        },
    );
    let out = j.judge_one(&item("a", "最终评分: 0")).await;
    assert_eq!(up0.chat_requests(), 1);
    assert_eq!(out.error.as_deref(), Some(UNPARSED));
    assert_eq!(out.raw.as_deref(), Some("echo: 最终评分: 0"));
}

#[tokio::test]
async fn a_re_ask_that_gets_a_score_is_scored() {
    let up = TestUpstream::start().await.unwrap();
    // The reminder is echoed back: make it hold a score.
    let j = judge(
        &up,
        JudgeConfig {
            reminder: "Again, Score: {max}".into(),
            ..echo_config()
        },
    );
    let out = j.judge_one(&item("a", "Score: 42")).await;
    assert_eq!(up.chat_requests(), 2);
    assert_eq!(out.score, Some(10.0));
    assert_eq!((out.attempts, out.reasks), (2, 1));
    assert_eq!(out.raw.as_deref(), Some("echo: Again, Score: 10"));
    assert_eq!(out.error, None);
}

#[tokio::test]
async fn a_failed_judge_call_is_an_error_with_its_attempts() {
    let up = TestUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let j = judge(
        &up,
        JudgeConfig {
            cache_path: Some(dir.path().join("cache.sqlite")),
            ..echo_config()
        },
    );
    up.push_behavior(Behavior::Status {
        status: 400,
        retry_after: None,
        message: "nope".into(),
    });
    let out = j.judge_one(&item("a", "Score: 5")).await;
    assert_eq!(out.score, None);
    assert_eq!(out.reward, None);
    assert_eq!(out.raw, None);
    assert_eq!(out.attempts, 1);
    let error = out.error.clone().unwrap();
    assert!(error.starts_with("400: "), "{error}");
    assert!(error.contains("nope"), "{error}");
    // Errors are not cached: the next try asks again and succeeds.
    let out = j.judge_one(&item("a", "Score: 5")).await;
    assert_eq!(up.chat_requests(), 2);
    assert_eq!((out.score, out.cached), (Some(5.0), false));
}

#[tokio::test]
async fn keep_inputs_copies_the_inputs() {
    let up = TestUpstream::start().await.unwrap();
    let j = judge(
        &up,
        JudgeConfig {
            keep_inputs: true,
            ..echo_config()
        },
    );
    let out = j
        .judge_one(&item("a", "Score: 6").with_reference("ref"))
        .await;
    let line = out.to_value();
    assert_eq!(line["prompt"], "the prompt");
    assert_eq!(line["response"], "Score: 6");
    assert_eq!(line["reference"], "ref");
}

#[tokio::test]
async fn the_rubric_is_filled_in() {
    let up = TestUpstream::start().await.unwrap();
    let j = judge(
        &up,
        JudgeConfig {
            rubric: "Q={prompt} R={response} REF={reference}".into(),
            ..echo_config()
        },
    );
    j.judge_one(&item("a", "Score: 6")).await;
    j.judge_one(&item("b", "Score: 6").with_reference("four"))
        .await;
    let sent = up.recorded();
    let text = |i: usize| {
        sent[i].body.as_ref().unwrap()["messages"][0]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(text(0), "Q=the prompt R=Score: 6 REF=");
    assert_eq!(text(1), "Q=the prompt R=Score: 6 REF=four");
    // The default rubric asks for the seed's final line.
    assert!(echelon::judge::DEFAULT_RUBRIC.ends_with("最终评分: X"));
}

#[tokio::test]
async fn bad_configs_are_refused() {
    let up = TestUpstream::start().await.unwrap();
    let gw = gateway(&up);
    let err = |c: JudgeConfig| Judge::new(Arc::clone(&gw), c).unwrap_err();
    assert!(matches!(
        err(JudgeConfig {
            route: "nope".into(),
            ..echo_config()
        }),
        JudgeError::UnknownRoute { .. }
    ));
    // No `default_route` configured.
    assert!(matches!(
        err(JudgeConfig {
            rubric: "{response}".into(),
            ..JudgeConfig::default()
        }),
        JudgeError::UnknownRoute { .. }
    ));
    assert!(matches!(
        err(JudgeConfig {
            patterns: vec!["(".into()],
            ..echo_config()
        }),
        JudgeError::Pattern { index: 0, .. }
    ));
    assert!(matches!(
        err(JudgeConfig {
            min_score: 5.0,
            max_score: 1.0,
            ..echo_config()
        }),
        JudgeError::Config(_)
    ));
    assert!(matches!(
        err(JudgeConfig {
            rubric: "no placeholder".into(),
            ..echo_config()
        }),
        JudgeError::Config(_)
    ));
    assert!(matches!(
        err(JudgeConfig {
            concurrency: 0,
            ..echo_config()
        }),
        JudgeError::Config(_)
    ));
}

#[tokio::test]
async fn the_default_route_is_resolved_and_the_judge_can_be_shared() {
    let up = TestUpstream::start().await.unwrap();
    let j = Judge::new(
        gateway_with(&up, "default_route: judge"),
        JudgeConfig {
            rubric: "{response}".into(),
            ..JudgeConfig::default()
        },
    )
    .unwrap();
    assert_eq!(j.config().route, "judge");
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    send_sync(&j);
    let it = item("a", "Score: 4");
    let fut = j.judge_one(&it);
    send(&fut);
    let out = fut.await;
    assert_eq!(out.route, "judge");
    assert_eq!(out.score, Some(4.0));
}

// ---------------------------------------------------------------------------
// files: cache, resume, bad lines

#[tokio::test]
async fn a_cached_re_run_makes_no_upstream_call() {
    let up = TestUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let lines: Vec<Value> = (1..=6)
        .map(|i| json!({"id": i, "prompt": "p", "response": format!("Score: {i}")}))
        .collect();
    write(&input, &lines);
    let config = JudgeConfig {
        cache_path: Some(dir.path().join("cache.sqlite")),
        concurrency: 3,
        ..echo_config()
    };

    let first = judge(&up, config.clone());
    let out1 = dir.path().join("out1.jsonl");
    let s1 = first.run_file(&input, &out1, &no_progress).await.unwrap();
    assert_eq!((s1.judged, s1.scored, s1.cached), (6, 6, 0));
    let calls = up.chat_requests();
    assert_eq!(calls, 6);
    drop(first);

    // A new judge on the same cache file, a fresh output.
    let second = judge(&up, config.clone());
    let out2 = dir.path().join("out2.jsonl");
    let s2 = second.run_file(&input, &out2, &no_progress).await.unwrap();
    assert_eq!(up.chat_requests(), calls, "no upstream call");
    assert_eq!((s2.judged, s2.scored, s2.cached), (6, 6, 6));
    assert_eq!(s2.total_cost, 0.0);
    let (a, b) = (by_id(&read_lines(&out1)), by_id(&read_lines(&out2)));
    for (id, l2) in &b {
        let l1 = &a[id];
        assert_eq!(l2["cached"], true);
        assert_eq!(l1["cached"], false);
        assert_eq!(l2["score"], l1["score"]);
        assert_eq!(l2["reward"], l1["reward"]);
        assert_eq!(l2["raw"], l1["raw"]);
        assert_eq!(l2["model"], "judge");
        assert_eq!(l2["attempts"], 0);
    }

    // Another rubric is another key.
    let third = judge(
        &up,
        JudgeConfig {
            rubric: "Judge: {response}".into(),
            ..config
        },
    );
    let out = third.judge_one(&item("x", "Score: 3")).await;
    assert!(!out.cached);
    assert_eq!(up.chat_requests(), calls + 1);
}

/// A fresh machine has no data directory: the judge creates the cache's directory
/// instead of failing before its first item (issue 14).
#[tokio::test]
async fn the_cache_directory_is_created_on_a_fresh_machine() {
    let up = TestUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("fresh").join("data").join("judge_cache.db");
    let input = dir.path().join("in.jsonl");
    write(
        &input,
        &[json!({"id": 1, "prompt": "p", "response": "Score: 5"})],
    );
    let config = JudgeConfig {
        cache_path: Some(cache.clone()),
        ..echo_config()
    };
    let out = dir.path().join("out.jsonl");
    let s = judge(&up, config)
        .run_file(&input, &out, &no_progress)
        .await
        .unwrap();
    assert_eq!((s.judged, s.scored), (1, 1));
    assert!(cache.is_file(), "the cache file was created");
}

#[tokio::test]
async fn unparsed_answers_are_not_cached() {
    let up = TestUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let j = judge(
        &up,
        JudgeConfig {
            cache_path: Some(dir.path().join("c.sqlite")),
            max_reasks: 1,
            ..echo_config()
        },
    );
    let it = item("u", "nothing to read");
    assert!(j.judge_one(&it).await.is_unparsed());
    assert!(j.judge_one(&it).await.is_unparsed());
    assert_eq!(up.chat_requests(), 4);
}

#[tokio::test]
async fn resume_after_a_kill_judges_each_id_exactly_once() {
    let up = TestUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    let lines: Vec<Value> = (1..=6)
        .map(|i| json!({"id": format!("q{i}"), "prompt": "p", "response": format!("Score: {i}")}))
        .collect();
    write(&input, &lines);
    // What a kill -9 leaves: two complete lines and a cut one.
    let done = "{\"id\":\"q1\",\"score\":1.0,\"note\":\"old\"}\n{\"id\":\"q2\",\"score\":2.0,\"note\":\"old\"}\n";
    std::fs::write(&output, format!("{done}{{\"id\":\"q3\",\"score\":3.0,\"ra")).unwrap();

    let j = judge(&up, echo_config());
    let s = j.run_file(&input, &output, &no_progress).await.unwrap();
    assert!(s.truncated_partial_line);
    assert_eq!((s.resumed, s.skipped, s.judged), (2, 2, 4));
    assert_eq!(up.chat_requests(), 4);

    let text = std::fs::read_to_string(&output).unwrap();
    assert!(text.starts_with(done), "old lines kept as they were");
    let out = by_id(&read_lines(&output));
    assert_eq!(out.len(), 6);
    assert_eq!(out["q1"]["note"], "old");
    assert_eq!(out["q3"]["score"], 3.0);
    assert_eq!(out["q3"]["raw"], "echo: Score: 3");
    assert_eq!(out["q6"]["score"], 6.0);

    // Run again: nothing left to do, nothing duplicated.
    let s = j.run_file(&input, &output, &no_progress).await.unwrap();
    assert_eq!(
        (s.skipped, s.judged, s.truncated_partial_line),
        (6, 0, false)
    );
    assert_eq!(up.chat_requests(), 4);
    assert_eq!(by_id(&read_lines(&output)).len(), 6);
}

#[tokio::test]
async fn an_output_that_is_not_ours_is_left_alone() {
    let up = TestUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    write(
        &input,
        &[json!({"id": 1, "prompt": "p", "response": "Score: 1"})],
    );
    std::fs::write(&output, "some notes\n").unwrap();
    let j = judge(&up, echo_config());
    let err = j.run_file(&input, &output, &no_progress).await.unwrap_err();
    assert!(matches!(err, JudgeError::Resume { line: 1, .. }), "{err}");
    assert_eq!(std::fs::read_to_string(&output).unwrap(), "some notes\n");
    assert_eq!(up.chat_requests(), 0);
}

#[tokio::test]
async fn bad_lines_are_reported_and_the_batch_goes_on() {
    let up = TestUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    let text = [
        r#"{"id": 1, "prompt": "p", "response": "Score: 1"}"#,
        r#"{"id": 2, "prompt": "p", "response": "#,
        r#"{"id": 3, "prompt": "p", "response": "Score: 3", "extra": {"k": [1, 2]}}"#,
        r#"{"id": 4, "prompt": "p"}"#,
        r#"{"id": true, "prompt": "p", "response": "Score: 5"}"#,
        "",
        r#"{"id": 1, "prompt": "p", "response": "Score: 9"}"#,
        r#"["not", "an", "object"]"#,
        r#"{"id": "8", "prompt": "p", "response": "Score: 8"}"#,
    ]
    .join("\n"); // no newline after the last line
    std::fs::write(&input, text).unwrap();

    let seen = Mutex::new(Vec::new());
    let last = Mutex::new(Progress::default());
    let progress = |p: &Progress| {
        if let Some(b) = &p.last_bad_line {
            seen.lock().unwrap().push(b.line);
        }
        *last.lock().unwrap() = p.clone();
    };
    let j = judge(&up, echo_config());
    let s = j.run_file(&input, &output, &progress).await.unwrap();

    let bad: Vec<(u64, &str)> = s
        .bad_lines
        .iter()
        .map(|b| (b.line, b.reason.as_str()))
        .collect();
    assert_eq!(bad.len(), 5, "{bad:?}");
    assert_eq!(bad[0].0, 2);
    assert!(bad[0].1.starts_with("invalid JSON"), "{}", bad[0].1);
    assert_eq!(bad[1], (4, "missing `response`"));
    assert_eq!(bad[2], (5, "`id` must be a string or a number"));
    assert_eq!(bad[3], (7, "duplicate id `1` (first on line 1)"));
    assert_eq!(bad[4], (8, "not a JSON object"));
    assert_eq!(s.bad_line_count, 5);
    assert_eq!(*seen.lock().unwrap(), vec![2, 4, 5, 7, 8]);
    assert_eq!(s.lines, 9);
    assert_eq!((s.judged, s.scored), (3, 3));
    assert_eq!(s.mean_score, Some(4.0));
    assert_eq!(s.parse_failure_rate, 0.0);
    let p = last.lock().unwrap().clone();
    assert_eq!((p.lines, p.done, p.bad_lines, p.in_flight), (9, 3, 5, 0));

    let out = by_id(&read_lines(&output));
    assert_eq!(out.len(), 3);
    assert_eq!(
        out["1"]["score"], 1.0,
        "the first id 1 is judged, not the duplicate"
    );
    assert_eq!(out["3"]["extra"], json!({"k": [1, 2]}));
    assert_eq!(out["8"]["id"], "8");
    assert_eq!(out["1"]["id"], 1);
}

#[tokio::test]
async fn a_run_summary_counts_failures() {
    let up = TestUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    write(
        &input,
        &[
            json!({"id": "a", "prompt": "p", "response": "Score: 4"}),
            json!({"id": "b", "prompt": "p", "response": "no idea"}),
            json!({"id": "c", "prompt": "p", "response": "Score: 8"}),
        ],
    );
    let j = judge(
        &up,
        JudgeConfig {
            concurrency: 1,
            max_reasks: 1,
            ..echo_config()
        },
    );
    let s = j.run_file(&input, &output, &no_progress).await.unwrap();
    assert_eq!((s.judged, s.scored, s.unparsed, s.failed), (3, 2, 1, 0));
    assert_eq!(s.reasked, 1);
    assert_eq!(s.parse_failure_rate, 1.0 / 3.0);
    assert_eq!(s.mean_score, Some(6.0));
    assert!(s.total_cost > 0.0);
    let out = by_id(&read_lines(&output));
    assert_eq!(out["b"]["error"], "unparsed");
    assert_eq!(out["b"]["score"], Value::Null);
}

// ---------------------------------------------------------------------------
// concurrency

/// With a 100 ms upstream and at most `limit` requests in flight, any `limit + 1`
/// consecutive arrivals span at least 100 ms (the last one waited for an answer).
fn assert_at_most_in_flight(up: &TestUpstream, limit: usize) {
    let mut at: Vec<_> = up.recorded().iter().map(|r| r.at).collect();
    at.sort();
    for w in at.windows(limit + 1) {
        let span = w[limit] - w[0];
        assert!(
            span >= Duration::from_millis(99),
            "{} requests within {span:?}",
            limit + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_file_keeps_at_most_concurrency_items_in_flight() {
    let up = TestUpstream::start_with(UpstreamOptions {
        latency: Duration::from_millis(100),
        ..UpstreamOptions::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    let lines: Vec<Value> = (0..12)
        .map(|i| json!({"id": i, "prompt": "p", "response": "Score: 5"}))
        .collect();
    write(&input, &lines);
    let max_in_flight = Mutex::new(0usize);
    let progress = |p: &Progress| {
        let mut m = max_in_flight.lock().unwrap();
        *m = (*m).max(p.in_flight);
    };
    let j = judge(
        &up,
        JudgeConfig {
            concurrency: 4,
            ..echo_config()
        },
    );
    let s = j.run_file(&input, &output, &progress).await.unwrap();
    assert_eq!(s.scored, 12);
    assert_eq!(up.chat_requests(), 12);
    assert!(*max_in_flight.lock().unwrap() <= 4);
    assert_at_most_in_flight(&up, 4);
}

#[tokio::test]
async fn judge_stream_keeps_at_most_concurrency_items_in_flight() {
    let up = TestUpstream::start_with(UpstreamOptions {
        latency: Duration::from_millis(100),
        ..UpstreamOptions::default()
    })
    .await
    .unwrap();
    let j = judge(
        &up,
        JudgeConfig {
            concurrency: 3,
            ..echo_config()
        },
    );
    let items = futures::stream::iter((0..9).map(|i| item(&i.to_string(), "Score: 2")));
    let out: Vec<Judgement> = j.judge_stream(items).collect().await;
    assert_eq!(out.len(), 9);
    assert!(out.iter().all(|o| o.score == Some(2.0)));
    assert_at_most_in_flight(&up, 3);

    // judge_one shares the limit: 9 concurrent calls still go 3 at a time.
    let before = up.recorded().len();
    let calls: Vec<_> = (0..9)
        .map(|i| item(&format!("one-{i}"), "Score: 2"))
        .collect();
    let outs = futures::future::join_all(calls.iter().map(|it| j.judge_one(it))).await;
    assert!(outs.iter().all(|o| o.score == Some(2.0)));
    let mut at: Vec<_> = up.recorded()[before..].iter().map(|r| r.at).collect();
    at.sort();
    for w in at.windows(4) {
        assert!(w[3] - w[0] >= Duration::from_millis(99));
    }
}

// ---------------------------------------------------------------------------
// score_batch

#[test]
fn score_batch_works_without_a_runtime_and_keeps_the_order() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(TestUpstream::start()).unwrap();
    let j = judge(
        &up,
        JudgeConfig {
            concurrency: 4,
            ..echo_config()
        },
    );
    let items: Vec<JudgeItem> = (1..=10)
        .map(|i| item(&format!("i{i}"), &format!("Score: {i}")))
        .collect();
    let out = j.score_batch(items);
    let scores: Vec<Option<f64>> = out.iter().map(|o| o.score).collect();
    assert_eq!(
        scores,
        (1..=10).map(|i| Some(f64::from(i))).collect::<Vec<_>>()
    );
    assert_eq!(out[3].id.key(), "i4");
    // The runtime is reused.
    let again = j.score_batch(vec![item("z", "最终评分: 9")]);
    assert_eq!(again[0].score, Some(9.0));
    assert_eq!(up.chat_requests(), 11);
    drop(j);
    rt.block_on(up.shutdown());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_batch_inside_a_multi_thread_runtime_works() {
    let up = TestUpstream::start().await.unwrap();
    let j = judge(&up, echo_config());
    let out = j.score_batch(vec![item("a", "Score: 3"), item("b", "Score: 4")]);
    assert_eq!(out[0].score, Some(3.0));
    assert_eq!(out[1].score, Some(4.0));
    // Dropping the judge (and its runtime) here must not panic.
    drop(j);
}

#[tokio::test]
async fn score_batch_inside_a_current_thread_runtime_refuses_safely() {
    let up = TestUpstream::start().await.unwrap();
    let j = judge(&up, echo_config());
    let out = j.score_batch(vec![item("a", "Score: 3")]);
    assert_eq!(out[0].score, None);
    assert!(
        out[0].error.as_deref().unwrap().contains("current-thread"),
        "{:?}",
        out[0].error
    );
    assert_eq!(up.chat_requests(), 0);
}

// ---------------------------------------------------------------------------
// structured verdicts, voting, length re-asks, pairwise (issue 17)

use echelon::judge::{Aggregate, Inconsistent, JudgeMode, NO_QUORUM, VerdictMode};

/// A gateway with `judge` (no `structured_output`) and `sjudge` (`structured_output:
/// true`) on `up`.
fn gateway_structured(up: &TestUpstream) -> Arc<Gateway> {
    let yaml = format!(
        r#"
providers:
  p: {{ base_url: "{}", api_keys: ["k"] }}
models:
  judge: {{ provider: p, model: up-judge, max_retries: 0, retry_delay: 0.01 }}
  sjudge: {{ provider: p, model: up-sjudge, max_retries: 0, retry_delay: 0.01, structured_output: true }}
task_groups:
  mixed: {{ echelon1: {{ models: [sjudge] }}, echelon2: {{ models: [judge] }} }}
"#,
        up.base_url()
    );
    Arc::new(Gateway::from_config(&Config::from_str(&yaml, "s.yaml").unwrap()).unwrap())
}

/// Scripted answers: the testkit answers sample `i` (sent with seed `i`) with
/// `answers[i % len]`.
fn scripted(answers: &[&str]) -> serde_json::Map<String, Value> {
    let mut extra = serde_json::Map::new();
    extra.insert("x_answers".into(), json!(answers));
    extra
}

fn bodies(up: &TestUpstream) -> Vec<Value> {
    up.recorded().into_iter().map(|r| r.body.unwrap()).collect()
}

#[tokio::test]
async fn the_json_verdict_sends_the_schema_and_reads_the_json_answer() {
    let up = TestUpstream::start().await.unwrap();
    let j = judge(
        &up,
        JudgeConfig {
            verdict: VerdictMode::JsonSchema,
            reasoning_field: true,
            reasoning_effort: Some("high".into()),
            ..echo_config()
        },
    );
    let out = j
        .judge_one(&item("1", r#"{"reasoning": "fine", "score": 8}"#))
        .await;
    assert_eq!(out.score, Some(8.0), "{out:?}");
    let body = &bodies(&up)[0];
    assert_eq!(
        body["response_format"],
        json!({
            "type": "json_schema",
            "json_schema": {"name": "verdict", "strict": true, "schema": {
                "type": "object",
                "properties": {
                    "reasoning": {"type": "string"},
                    "score": {"type": "integer", "minimum": 1, "maximum": 10}
                },
                "required": ["reasoning", "score"],
                "additionalProperties": false
            }}
        })
    );
    assert_eq!(body["reasoning_effort"], "high");

    // A JSON answer out of range is re-asked, as any other.
    let out = j.judge_one(&item("2", r#"{"score": 11}"#)).await;
    assert_eq!(out.error.as_deref(), Some(UNPARSED));
    assert_eq!(out.reasks, 2);
}

#[tokio::test]
async fn an_anthropic_judge_gets_its_json_verdict_through_a_forced_tool() {
    let up = TestUpstream::start_with(UpstreamOptions {
        record_requests: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let yaml = format!(
        r#"
providers:
  a: {{ base_url: "{}", api: anthropic, api_keys: ["k"] }}
models:
  claude: {{ provider: a, model: claude-judge, max_retries: 0, retry_delay: 0.01 }}
"#,
        up.base_url().trim_end_matches("/v1")
    );
    let gw = Arc::new(Gateway::from_config(&Config::from_str(&yaml, "a.yaml").unwrap()).unwrap());
    let j = Judge::new(
        gw,
        JudgeConfig {
            route: "claude".into(),
            verdict: VerdictMode::JsonSchema,
            reasoning_field: true,
            ..echo_config()
        },
    )
    .unwrap();
    let out = j
        .judge_one(&item("1", r#"{"reasoning": "fine", "score": 8}"#))
        .await;
    assert_eq!(out.score, Some(8.0), "{out:?}");
    assert_eq!(out.reasks, 0);
    let body = &bodies(&up)[0];
    assert_eq!(
        body["tool_choice"],
        json!({"type": "tool", "name": "verdict"})
    );
    assert_eq!(
        body["tools"][0]["input_schema"]["required"],
        json!(["reasoning", "score"])
    );
    // Out of range through the tool: re-asked, then unparsed, never a made-up score.
    let out = j.judge_one(&item("2", r#"{"score": 11}"#)).await;
    assert_eq!(out.error.as_deref(), Some(UNPARSED));
}

#[tokio::test]
async fn auto_asks_for_the_schema_only_when_every_model_declares_structured_output() {
    let up = TestUpstream::start().await.unwrap();
    let gw = gateway_structured(&up);
    let cases = [
        ("sjudge", VerdictMode::JsonSchema),
        ("judge", VerdictMode::Regex),
        ("mixed", VerdictMode::Regex),
    ];
    for (route, want) in cases {
        let j = Judge::new(
            gw.clone(),
            JudgeConfig {
                route: route.into(),
                ..echo_config()
            },
        )
        .unwrap();
        assert_eq!(j.config().verdict, want, "{route}");
        let out = j.judge_one(&item(route, r#"{"score": 6}"#)).await;
        // A JSON verdict is read in either mode.
        assert_eq!(out.score, Some(6.0), "{route}");
        let body = bodies(&up).pop().unwrap();
        assert_eq!(
            body.get("response_format").is_some(),
            want == VerdictMode::JsonSchema,
            "{route}: {body}"
        );
    }
    // Forced regex on a structured model: no schema.
    let j = Judge::new(
        gw,
        JudgeConfig {
            route: "sjudge".into(),
            verdict: VerdictMode::Regex,
            ..echo_config()
        },
    )
    .unwrap();
    j.judge_one(&item("r", "Score: 3")).await;
    assert!(bodies(&up).pop().unwrap().get("response_format").is_none());
}

#[tokio::test]
async fn samples_are_aggregated_with_their_stdev() {
    let up = TestUpstream::start().await.unwrap();
    let answers = ["Score: 2", "Score: 9", "Score: 9", "Score: 4"];
    for (how, want) in [
        (Aggregate::Mean, 6.0),
        (Aggregate::Median, 6.5),
        (Aggregate::Majority, 9.0),
    ] {
        let j = judge(
            &up,
            JudgeConfig {
                samples: 4,
                aggregate: how,
                seed: Some(0),
                extra_body: scripted(&answers),
                ..echo_config()
            },
        );
        let out = j.judge_one(&item("v", "ignored")).await;
        assert_eq!(out.score, Some(want), "{how:?}");
        let line = out.to_value();
        assert_eq!(line["samples"], json!([2.0, 9.0, 9.0, 4.0]));
        assert_eq!(line["aggregate"], how.name());
        let stdev = line["stdev"].as_f64().unwrap();
        assert!((stdev - 9.5f64.sqrt()).abs() < 1e-9, "{stdev}");
        assert_eq!(out.attempts, 4);
    }
    // Every sample is its own call: seeds 0..4, temperature 0.7 by default.
    let sent = bodies(&up);
    assert_eq!(sent.len(), 12);
    let mut seeds: Vec<u64> = sent[..4]
        .iter()
        .map(|b| b["seed"].as_u64().unwrap())
        .collect();
    seeds.sort_unstable();
    assert_eq!(seeds, vec![0, 1, 2, 3]);
    assert!(sent.iter().all(|b| b["temperature"] == 0.7));
    // One sample keeps temperature 0 and sends no seed by default.
    let j = judge(&up, echo_config());
    assert_eq!(j.config().temperature, Some(0.0));
    j.judge_one(&item("one", "Score: 5")).await;
    let body = bodies(&up).pop().unwrap();
    assert_eq!(body["temperature"], 0.0);
    assert!(body.get("seed").is_none());
}

#[tokio::test]
async fn fewer_parsed_samples_than_the_quorum_is_an_error_not_a_guess() {
    let up = TestUpstream::start().await.unwrap();
    let config = JudgeConfig {
        samples: 3,
        seed: Some(0),
        max_reasks: 0,
        extra_body: scripted(&["Score: 5", "no idea", "nothing"]),
        ..echo_config()
    };
    let j = judge(&up, config.clone());
    assert_eq!(j.config().quorum, Some(2));
    let out = j.judge_one(&item("q", "x")).await;
    assert_eq!(out.error.as_deref(), Some(NO_QUORUM));
    assert_eq!(out.score, None);
    assert_eq!(out.reward, None);
    let line = out.to_value();
    assert_eq!(line["samples"], json!([5.0, null, null]));
    assert_eq!(line["error"], "no_quorum");
    assert_eq!(line["sample_errors"], json!(["unparsed"]));

    // Quorum 1: the one parsed sample decides.
    let j = judge(
        &up,
        JudgeConfig {
            quorum: Some(1),
            ..config.clone()
        },
    );
    assert_eq!(j.judge_one(&item("q", "x")).await.score, Some(5.0));

    // A failed call counts as a missing sample.
    up.push_behavior(Behavior::status(500));
    let j = judge(
        &up,
        JudgeConfig {
            samples: 2,
            quorum: Some(2),
            extra_body: scripted(&["Score: 5"]),
            ..config
        },
    );
    let out = j.judge_one(&item("f", "x")).await;
    assert_eq!(out.error.as_deref(), Some(NO_QUORUM));
    assert!(
        out.sample_errors[0].contains("HTTP 500"),
        "{:?}",
        out.sample_errors
    );

    // Bad quorums are refused.
    for (samples, quorum) in [(3, 0), (3, 4)] {
        let err = Judge::new(
            gateway(&up),
            JudgeConfig {
                samples,
                quorum: Some(quorum),
                ..echo_config()
            },
        )
        .unwrap_err();
        assert!(matches!(err, JudgeError::Config(_)), "{err}");
    }
}

#[tokio::test]
async fn each_sample_and_each_mode_has_its_own_cache_entry() {
    let up = TestUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = JudgeConfig {
        samples: 3,
        seed: Some(0),
        cache_path: Some(dir.path().join("c.sqlite")),
        extra_body: scripted(&["Score: 1", "Score: 2", "Score: 3", "Score: 4"]),
        ..echo_config()
    };
    let first = judge(&up, config.clone()).judge_one(&item("c", "x")).await;
    assert_eq!(first.score, Some(2.0));
    assert_eq!(up.chat_requests(), 3);
    let again = judge(&up, config.clone()).judge_one(&item("c", "x")).await;
    assert!(again.cached);
    assert_eq!(again.score, Some(2.0));
    assert_eq!(again.to_value()["samples"], json!([1.0, 2.0, 3.0]));
    assert_eq!(up.chat_requests(), 3, "served from the cache");
    // A fourth sample: the first three are hits, only sample 3 is asked.
    let four = judge(
        &up,
        JudgeConfig {
            samples: 4,
            ..config.clone()
        },
    )
    .judge_one(&item("c", "x"))
    .await;
    assert_eq!(four.score, Some(2.5));
    assert!(!four.cached);
    assert_eq!(up.chat_requests(), 4);
    // The JSON verdict is another entry.
    judge(
        &up,
        JudgeConfig {
            verdict: VerdictMode::JsonSchema,
            ..config
        },
    )
    .judge_one(&item("c", "x"))
    .await;
    assert_eq!(up.chat_requests(), 7);
}

#[tokio::test]
async fn an_answer_cut_by_length_is_re_asked_once_with_twice_the_tokens() {
    let up = TestUpstream::start().await.unwrap();
    // "echo: one two three four five Score: 7" is 8 words; the testkit cuts at max_tokens.
    let response = "one two three four five Score: 7";
    let j = judge(
        &up,
        JudgeConfig {
            max_tokens: Some(4),
            max_reasks: 0,
            ..echo_config()
        },
    );
    let out = j.judge_one(&item("l", response)).await;
    assert_eq!(out.score, Some(7.0), "{out:?}");
    assert_eq!((out.length_reasks, out.reasks, out.attempts), (1, 0, 2));
    assert_eq!(out.to_value()["length_reasks"], 1);
    let sent = bodies(&up);
    assert_eq!(sent[0]["max_tokens"], 4);
    assert_eq!(sent[1]["max_tokens"], 8);
    // The re-ask is the same question, not a follow-up turn.
    assert_eq!(sent[1]["messages"], sent[0]["messages"]);

    // Capped at 6: still cut, and asked with more room only once.
    let j = judge(
        &up,
        JudgeConfig {
            max_tokens: Some(4),
            max_tokens_cap: Some(6),
            max_reasks: 1,
            ..echo_config()
        },
    );
    let out = j.judge_one(&item("l2", response)).await;
    assert_eq!(out.error.as_deref(), Some(UNPARSED));
    assert_eq!((out.length_reasks, out.reasks), (1, 1));
    let sent = bodies(&up);
    let max: Vec<u64> = sent[2..]
        .iter()
        .map(|b| b["max_tokens"].as_u64().unwrap())
        .collect();
    assert_eq!(max, vec![4, 6, 6]);

    // A cut answer that already holds a verdict is not re-asked.
    let j = judge(
        &up,
        JudgeConfig {
            max_tokens: Some(3),
            ..echo_config()
        },
    );
    let out = j.judge_one(&item("l3", "Score: 6 and more words")).await;
    assert_eq!((out.score, out.length_reasks), (Some(6.0), 0));
}

fn pair(id: &str) -> JudgeItem {
    JudgeItem::pair(id, "the prompt", "first answer", "second answer")
}

fn pairwise(answers: &[&str]) -> JudgeConfig {
    JudgeConfig {
        route: "judge".into(),
        mode: JudgeMode::Pairwise,
        seed: Some(0),
        max_reasks: 0,
        extra_body: scripted(answers),
        ..JudgeConfig::default()
    }
}

#[tokio::test]
async fn pairwise_with_swap_reads_both_orders_back_to_the_input_order() {
    let up = TestUpstream::start().await.unwrap();
    // Seed 0 is A-then-B, seed 1 is B-then-A: "B" there is the input's A.
    let j = judge(
        &up,
        JudgeConfig {
            swap: true,
            ..pairwise(&["A", "Winner: B"])
        },
    );
    assert_eq!(j.config().rubric, echelon::judge::DEFAULT_PAIRWISE_RUBRIC);
    let out = j.judge_one(&pair("p")).await;
    let line = out.to_value();
    assert_eq!(line["preference"], "A", "{line}");
    assert_eq!(line["p_a"], 1.0);
    assert_eq!(line["position_consistent"], true);
    assert_eq!(line["samples"], json!(["A", "A"]));
    assert_eq!(line["score"], Value::Null);
    assert!(line.get("error").is_none());
    assert!(out.is_scored());
    let sent = bodies(&up);
    let text = |b: &Value| b["messages"][0]["content"].as_str().unwrap().to_owned();
    let (ab, ba) = match sent[0]["seed"].as_u64() {
        Some(0) => (text(&sent[0]), text(&sent[1])),
        _ => (text(&sent[1]), text(&sent[0])),
    };
    assert!(ab.find("first answer") < ab.find("second answer"), "{ab}");
    assert!(ba.find("second answer") < ba.find("first answer"), "{ba}");

    // Without swap: one call, no position_consistent.
    let out = judge(&up, pairwise(&["[[B]]"])).judge_one(&pair("n")).await;
    let line = out.to_value();
    assert_eq!(line["preference"], "B");
    assert_eq!(line["p_a"], 0.0);
    assert!(line.get("position_consistent").is_none());
}

#[tokio::test]
async fn an_inconsistent_pair_is_a_tie_or_an_error() {
    let up = TestUpstream::start().await.unwrap();
    // A in both orders: the judge prefers whatever comes first.
    let answers = ["A", "A"];
    let tie = judge(
        &up,
        JudgeConfig {
            swap: true,
            ..pairwise(&answers)
        },
    )
    .judge_one(&pair("t"))
    .await;
    let line = tie.to_value();
    assert_eq!(line["preference"], "tie");
    assert_eq!(line["position_consistent"], false);
    assert_eq!(line["p_a"], 0.5);
    assert_eq!(line["samples"], json!(["A", "B"]));
    let err = judge(
        &up,
        JudgeConfig {
            swap: true,
            inconsistent: Inconsistent::Error,
            ..pairwise(&answers)
        },
    )
    .judge_one(&pair("e"))
    .await;
    assert_eq!(err.error.as_deref(), Some("inconsistent"));
    assert_eq!(err.pairwise.as_ref().unwrap().preference, None);
    assert!(!err.is_scored());

    // An unreadable verdict is unparsed; a pairwise rubric needs both responses.
    let out = judge(&up, pairwise(&["I cannot decide"]))
        .judge_one(&pair("u"))
        .await;
    assert_eq!(out.error.as_deref(), Some(UNPARSED));
    let bad = Judge::new(
        gateway(&up),
        JudgeConfig {
            rubric: "{response_a} only".into(),
            ..pairwise(&answers)
        },
    )
    .unwrap_err();
    assert!(matches!(bad, JudgeError::Config(_)), "{bad}");
}

#[tokio::test]
async fn pairwise_files_and_the_summary_by_error_kind() {
    let up = TestUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("pairs.jsonl");
    let output = dir.path().join("out.jsonl");
    write(
        &input,
        &[
            json!({"id": 1, "prompt": "p", "response_a": "a", "response_b": "b", "tag": "x"}),
            json!({"id": 2, "prompt": "p", "response": "not a pair"}),
        ],
    );
    let j = judge(&up, pairwise(&["Winner: A"]));
    let s = j.run_file(&input, &output, &no_progress).await.unwrap();
    assert_eq!((s.judged, s.scored, s.bad_line_count), (1, 1, 1));
    assert_eq!(s.preferences, [1, 0, 0]);
    let out = read_lines(&output);
    assert_eq!(out[0]["preference"], "A");
    assert_eq!(out[0]["tag"], "x");

    // Pointwise: errors by kind, with their ids.
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out2.jsonl");
    write(
        &input,
        &[
            json!({"id": "a", "prompt": "p", "response": "Score: 4"}),
            json!({"id": "b", "prompt": "p", "response": "no idea"}),
            json!({"id": "c", "prompt": "p", "response": "Score: 8"}),
            json!({"id": "d", "prompt": "p", "response": "nope"}),
        ],
    );
    let j = judge(
        &up,
        JudgeConfig {
            concurrency: 1,
            max_reasks: 0,
            ..echo_config()
        },
    );
    let s = j.run_file(&input, &output, &no_progress).await.unwrap();
    assert_eq!(s.errors.len(), 1);
    let mut ids = s.errors["unparsed"].ids.clone();
    ids.sort();
    assert_eq!(ids, vec!["b", "d"]);
    assert_eq!(s.errors["unparsed"].count, 2);
    assert_eq!(s.mean_score, Some(6.0));
    assert_eq!(s.score_stdev, Some(2.0));
    assert!(s.efficiency.is_some_and(|e| e > 0.0));
    let v = s.to_json();
    assert_eq!(v["errors"]["unparsed"]["count"], 2);
    assert_eq!(v["parse_failure_rate"], 0.5);
    assert_eq!(v["score_stdev"], 2.0);
}
