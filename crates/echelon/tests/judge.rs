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
