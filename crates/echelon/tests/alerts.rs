//! `alerts/echelon.rules.yml`: well-formed Prometheus alerting rules that use only metrics
//! the gateway exports. When `promtool` is on the PATH it also checks the rules and runs
//! their unit tests (`alerts/echelon.rules.test.yml`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

use echelon::usage::metrics::{LATENCY_HISTOGRAMS, METRIC_NAMES};
use serde_json::Value;

fn alerts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../alerts")
}

fn rules() -> Vec<Value> {
    let path = alerts_dir().join("echelon.rules.yml");
    let text = std::fs::read_to_string(&path).expect("alerts/echelon.rules.yml");
    let doc: Value = serde_saphyr::from_str(&text).expect("the rules file is YAML");
    let groups = doc["groups"].as_array().expect("`groups:` is a list");
    assert!(!groups.is_empty());
    groups
        .iter()
        .flat_map(|g| {
            assert!(g["name"].as_str().is_some_and(|n| !n.is_empty()));
            g["rules"].as_array().expect("`rules:` is a list").clone()
        })
        .collect()
}

/// Every `echelon_*` identifier in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("echelon_") {
        let boundary = rest[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'));
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        if boundary {
            out.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    out
}

/// Whether `name` is an exported series name: a metric, or a histogram's
/// `_bucket`/`_sum`/`_count`.
fn is_exported(name: &str) -> bool {
    METRIC_NAMES.contains(&name)
        || ["_bucket", "_sum", "_count"].iter().any(|s| {
            name.strip_suffix(s)
                .is_some_and(|h| LATENCY_HISTOGRAMS.contains(&h))
        })
}

#[test]
fn every_rule_is_complete() {
    let rules = rules();
    assert!(rules.len() >= 4, "{} rules", rules.len());
    let mut names: Vec<&str> = Vec::new();
    for r in &rules {
        let alert = r["alert"].as_str().expect("every rule is an alert");
        names.push(alert);
        assert!(
            r["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
            "{alert}: expr"
        );
        assert!(r["for"].as_str().is_some(), "{alert}: for");
        assert!(
            ["critical", "warning", "info"]
                .contains(&r["labels"]["severity"].as_str().unwrap_or("")),
            "{alert}: labels.severity"
        );
        for a in ["summary", "description"] {
            assert!(
                r["annotations"][a].as_str().is_some_and(|s| !s.is_empty()),
                "{alert}: annotations.{a}"
            );
        }
    }
    for wanted in [
        "EchelonCircuitBreakerOpen",
        "EchelonHighFallbackRate",
        "EchelonPoolDegraded",
        "EchelonHighErrorRate",
    ] {
        assert!(names.contains(&wanted), "missing alert {wanted}");
    }
    let mut unique = names.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "alert names repeat: {names:?}");
}

#[test]
fn every_metric_an_alert_names_is_exported() {
    let mut seen = 0;
    for r in rules() {
        let alert = r["alert"].as_str().unwrap();
        let texts = [
            r["expr"].as_str().unwrap_or_default(),
            r["annotations"]["summary"].as_str().unwrap_or_default(),
            r["annotations"]["description"].as_str().unwrap_or_default(),
        ];
        for name in texts.iter().flat_map(|t| metric_names(t)) {
            assert!(
                is_exported(&name),
                "{alert} uses `{name}`, which echelon::usage::metrics does not export"
            );
            seen += 1;
        }
        assert!(
            !metric_names(texts[0]).is_empty(),
            "{alert}: its expr names no echelon_* metric"
        );
    }
    assert!(seen > 0);
    assert_eq!(
        metric_names("rate(echelon_requests_total[5m]) / x_echelon_y + echelon_a:b"),
        vec!["echelon_requests_total", "echelon_a:b"]
    );
}

/// `promtool check rules` and `promtool test rules`, when promtool is installed
/// (Debian: `apt-get install prometheus`); skipped otherwise.
#[test]
fn promtool_accepts_the_rules_and_their_tests_pass() {
    let dir = alerts_dir();
    let run = |args: &[&str]| {
        Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
    };
    let Ok(version) = run(&["--version"]) else {
        eprintln!("promtool not found: skipping `promtool check rules` / `test rules`");
        return;
    };
    assert!(version.status.success());
    for args in [
        ["check", "rules", "echelon.rules.yml"],
        ["test", "rules", "echelon.rules.test.yml"],
    ] {
        let out = run(&args).unwrap();
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
