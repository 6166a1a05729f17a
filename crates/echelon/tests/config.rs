//! Integration tests of `echelon::config`: fixture files under
//! `tests/fixtures/config/`, loaded through the public API.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use echelon::config::{
    CircuitBreakerConfig, Config, ConfigError, ConfigErrors, FallbackConfig, FallbackStrategy,
    HealthCheckKind, MigrateError, MigrateOptions, MigrationReport, PollingPoolConfig,
    PoolFallbackConfig, PoolFallbackStrategy, PricingConfig, ProviderApi, RetryOn,
    RotationStrategy, TokenEncoding, UsageConfig, WrapperConfig, migrate_with_env,
};
use echelon_types::ErrorKind;
use secrecy::{ExposeSecret, SecretString};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(name)
}

fn file(name: &str) -> String {
    fixture(name).display().to_string()
}

fn keys(keys: &[SecretString]) -> Vec<&str> {
    keys.iter().map(|k| k.expose_secret()).collect()
}

/// An environment with exactly these variables.
fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    }
}

fn no_env(_: &str) -> Option<String> {
    None
}

/// `s` seconds: durations are written in seconds and read as `Duration`s.
fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn errors_of(result: Result<Config, ConfigErrors>) -> Vec<ConfigError> {
    match result {
        Ok(config) => panic!(
            "expected errors, got a config with models {:?}",
            config.models.keys()
        ),
        Err(errors) => errors.0,
    }
}

/// (file, line, column, key path) of each error.
fn where_(errors: &[ConfigError]) -> Vec<(String, Option<u64>, Option<u64>, String)> {
    errors
        .iter()
        .map(|e| (e.file.clone(), e.line, e.column, e.key_path.clone()))
        .collect()
}

#[test]
fn good_yaml_loads_every_field() {
    let env = env_of(&[("GOOD_PORT", "4100"), ("GOOD_LOCAL_A_KEY", "secret-a1")]);
    let config = Config::load_with_env(fixture("good.yaml"), &env).unwrap();

    assert_eq!(config.server.host, "0.0.0.0");
    assert_eq!(config.server.port, 4100);
    // `${GOOD_GATEWAY_KEY:-}` is empty, so dropped.
    assert_eq!(keys(&config.server.api_keys), ["literal-gateway-key"]);
    assert_eq!(config.server.body_limit_bytes, 1_048_576);

    assert_eq!(config.providers.len(), 2);
    let a = &config.providers["local_a"];
    assert_eq!(a.base_url, "http://127.0.0.1:8082/v1");
    assert_eq!(keys(&a.api_keys), ["secret-a1", "inline-a2"]);
    assert_eq!(a.api, ProviderApi::OpenAi);
    let b = &config.providers["local_b"];
    assert_eq!(b.base_url, "http://127.0.0.1:8083/v1");
    assert!(b.api_keys.is_empty());

    let m = &config.models["smollm-a"];
    assert_eq!(m.provider, "local_a");
    assert_eq!(m.model, "smollm2");
    assert_eq!(m.base_url, None);
    assert!(m.api_keys.is_none());
    assert_eq!(m.timeout, secs(30.0));
    assert_eq!(m.connect_timeout, secs(2.5));
    assert_eq!(m.first_token_timeout, Some(secs(10.0)));
    assert_eq!(m.effective_first_token_timeout(), secs(10.0));
    assert_eq!(m.chunk_timeout, secs(15.0));
    assert_eq!(m.max_retries, 1);
    assert_eq!(
        m.retry_on,
        RetryOn {
            rate_limited: Some(3),
            timeout: Some(1),
            ..RetryOn::default()
        }
    );
    assert_eq!(m.retries_on(ErrorKind::RateLimited), Some(3));
    assert_eq!(m.retries_on(ErrorKind::Timeout), Some(1));
    assert_eq!(m.retries_on(ErrorKind::ServerError), Some(1), "max_retries");
    assert_eq!(m.retries_on(ErrorKind::FirstTokenTimeout), Some(0));
    assert_eq!(m.retries_on(ErrorKind::BadRequest), None, "never retried");
    assert_eq!(m.rate_limit_wait, secs(2.5));
    assert_eq!(m.retry_delay, secs(0.5));
    assert_eq!(m.context_window, Some(2048));
    assert_eq!(m.rpm_limit, Some(600));
    assert_eq!(m.tpm_limit, Some(100_000));
    assert_eq!(m.concurrency_limit, Some(8));
    assert_eq!(m.rate_limit_capacity, None);

    let m = &config.models["smollm-b"];
    assert_eq!(m.model, "smollm-b", "upstream name defaults to the id");
    assert_eq!(m.base_url.as_deref(), Some("https://b.example/v1"));
    assert_eq!(keys(m.api_keys.as_deref().unwrap()), ["key-b1"]);
    assert_eq!(m.timeout, secs(60.0));
    assert_eq!(m.connect_timeout, secs(5.0));
    assert_eq!(m.first_token_timeout, None);
    assert_eq!(
        m.effective_first_token_timeout(),
        secs(20.0),
        "the default first-token deadline"
    );
    assert_eq!(m.chunk_timeout, secs(30.0));
    assert_eq!(m.max_retries, 2);
    assert_eq!(m.retry_on, RetryOn::default());
    // Defaults: the timeouts 0, every other retryable kind max_retries.
    assert_eq!(m.retries_on(ErrorKind::Timeout), Some(0));
    assert_eq!(m.retries_on(ErrorKind::FirstTokenTimeout), Some(0));
    for kind in [
        ErrorKind::Connect,
        ErrorKind::RateLimited,
        ErrorKind::ServerError,
        ErrorKind::Malformed,
        ErrorKind::StreamCut,
    ] {
        assert_eq!(m.retries_on(kind), Some(2), "{kind}");
    }
    assert_eq!(m.rate_limit_wait, Duration::ZERO);
    assert_eq!(m.retry_delay, secs(1.0));
    assert_eq!(m.rate_limit_capacity, Some(20.0));
    assert_eq!(m.rate_limit_refill_rate, Some(3.0));

    let g = &config.task_groups["demo_group"];
    assert_eq!(g.description.as_deref(), Some("Demo: two echelons"));
    let names: Vec<&str> = g.echelons.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        ["echelon1", "echelon2"],
        "ordered by number, not by file order"
    );
    let e1 = &g.echelons[0];
    assert_eq!(e1.models, ["smollm-a", "smollm-b"]);
    assert_eq!(e1.concurrency_limit, Some(10));
    assert_eq!(e1.rpm_limit, Some(100));
    assert_eq!(e1.priority, Some(1));
    assert_eq!(e1.timeout, None);
    assert_eq!(e1.max_retries, Some(3));
    assert_eq!(
        e1.retry_on,
        RetryOn {
            server_error: Some(0),
            ..RetryOn::default()
        }
    );
    assert_eq!(e1.rate_limit_wait, Some(secs(1.0)));
    assert_eq!(g.echelons[1].retry_on, RetryOn::default());
    assert_eq!(g.echelons[1].rate_limit_wait, None);
    assert_eq!(e1.temperature, Some(0.7));
    assert_eq!(e1.max_tokens, Some(2000));
    assert_eq!(g.echelons[1].models, ["smollm-b"]);
    assert_eq!(g.echelons[1].timeout, Some(secs(20.0)));
    let f = g.fallback_config.as_ref().unwrap();
    assert_eq!(f.strategy, FallbackStrategy::TaskGroupSwitch);
    assert_eq!(f.fallback_groups, ["backup_group", "demo_group.echelon2"]);
    assert_eq!(f.max_attempts, Some(3));
    assert_eq!(f.retry_delay, Some(secs(1.0)));
    assert_eq!(
        f.circuit_breaker,
        Some(CircuitBreakerConfig {
            failure_threshold: 5,
            recovery_time: secs(60.0),
            half_open_requests: 1,
            ..CircuitBreakerConfig::default()
        })
    );
    let backup = &config.task_groups["backup_group"];
    assert_eq!(backup.echelons.len(), 1);
    assert!(backup.fallback_config.is_none());
}

#[test]
fn debug_output_never_shows_keys() {
    let env = env_of(&[("GOOD_PORT", "4100"), ("GOOD_LOCAL_A_KEY", "secret-a1")]);
    let config = Config::load_with_env(fixture("good.yaml"), &env).unwrap();
    let debug = format!("{config:?}");
    for secret in ["secret-a1", "inline-a2", "literal-gateway-key", "key-b1"] {
        assert!(!debug.contains(secret), "{secret} leaked into Debug output");
    }
    assert!(debug.contains("smollm2"), "the rest is shown");
}

#[test]
fn good_json_loads() {
    let config = Config::load_with_env(fixture("good.json"), &no_env).unwrap();
    assert_eq!(config.server.port, 0, "port 0 (any free port) is allowed");
    assert_eq!(config.server.host, "127.0.0.1");
    assert!(config.server.api_keys.is_empty());
    assert_eq!(config.server.body_limit_bytes, 8 * 1024 * 1024);
    assert_eq!(
        keys(&config.providers["local"].api_keys),
        ["json-default-key"]
    );
    let tiny = &config.models["tiny"];
    assert_eq!(tiny.model, "qwen2.5-0.5b");
    assert_eq!(tiny.timeout, secs(12.5));
    assert_eq!(tiny.context_window, Some(4096));
    let g = &config.task_groups["json_group"];
    assert_eq!(g.echelons[0].max_tokens, Some(64));
    assert_eq!(
        g.fallback_config.as_ref().unwrap().strategy,
        FallbackStrategy::EchelonDown
    );

    let env = env_of(&[("JSON_LOCAL_KEY", "from-env")]);
    let config = Config::load_with_env(fixture("good.json"), &env).unwrap();
    assert_eq!(keys(&config.providers["local"].api_keys), ["from-env"]);
}

#[test]
fn seed_provider_json_loads_as_it_is() {
    let config = Config::load_with_env(fixture("provider.json"), &no_env).unwrap();
    let ids: Vec<&str> = config.models.keys().map(String::as_str).collect();
    assert_eq!(
        ids,
        [
            "deepseek/r1",
            "deepseek/v3-turbo",
            "openai/gpt-3.5-turbo",
            "openai/gpt-4"
        ]
    );

    // openai: the models' keys differ, so each model keeps its own.
    let openai = &config.providers["openai"];
    assert_eq!(openai.base_url, "https://api.openai.com/v1");
    assert!(openai.api_keys.is_empty());
    let gpt35 = &config.models["openai/gpt-3.5-turbo"];
    assert_eq!(gpt35.provider, "openai");
    assert_eq!(gpt35.model, "gpt-3.5-turbo");
    assert_eq!(gpt35.base_url, None);
    assert_eq!(
        keys(gpt35.api_keys.as_deref().unwrap()),
        ["sk-key1", "sk-key2"]
    );
    assert_eq!(gpt35.max_retries, 5);
    assert_eq!(gpt35.retry_delay, secs(1.0));
    assert_eq!(gpt35.rate_limit_capacity, Some(20.0));
    assert_eq!(gpt35.rate_limit_refill_rate, Some(3.0));
    let gpt4 = &config.models["openai/gpt-4"];
    assert_eq!(keys(gpt4.api_keys.as_deref().unwrap()), ["sk-key3"]);
    assert_eq!(gpt4.max_retries, 2);

    // deepseek: same keys → on the provider; r1 has its own base_url.
    let deepseek = &config.providers["deepseek"];
    assert_eq!(deepseek.base_url, "https://api.deepseek.com/v1");
    assert_eq!(keys(&deepseek.api_keys), ["your-deepseek-key"]);
    let v3 = &config.models["deepseek/v3-turbo"];
    assert_eq!(v3.model, "deepseek-chat");
    assert!(v3.api_keys.is_none());
    assert_eq!(v3.base_url, None);
    let r1 = &config.models["deepseek/r1"];
    assert_eq!(
        r1.base_url.as_deref(),
        Some("https://api.deepseek.com/beta")
    );
    assert!(config.task_groups.is_empty());
}

/// Issue 14 item 7: the env var only fills in keys the file does not list (before, it
/// replaced the provider's keys and its models' own).
#[test]
fn provider_env_var_fills_in_only_keys_the_file_does_not_list() {
    let env = env_of(&[
        ("OPENAI_API_KEY", "env-1, env-2"),
        ("DEEPSEEK_API_KEY", "env-deepseek"),
    ]);
    let config = Config::load_with_env(fixture("provider.json"), &env).unwrap();
    // The openai provider lists no keys (its models list different ones): filled in …
    assert_eq!(
        keys(&config.providers["openai"].api_keys),
        ["env-1", "env-2"]
    );
    assert_eq!(
        config.key_sources["openai"],
        echelon::config::KeySource::Env("OPENAI_API_KEY".into())
    );
    // … but the models keep the keys the file gives them.
    assert_eq!(
        keys(
            config.models["openai/gpt-3.5-turbo"]
                .api_keys
                .as_deref()
                .unwrap()
        ),
        ["sk-key1", "sk-key2"]
    );
    assert_eq!(
        keys(config.models["openai/gpt-4"].api_keys.as_deref().unwrap()),
        ["sk-key3"]
    );
    // deepseek lists its keys: the variable is ignored, with a warning naming it.
    assert_eq!(
        keys(&config.providers["deepseek"].api_keys),
        ["your-deepseek-key"]
    );
    assert_eq!(
        config.key_sources["deepseek"],
        echelon::config::KeySource::File
    );
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.message.contains("`DEEPSEEK_API_KEY` is ignored")),
        "{:?}",
        config.warnings
    );

    // An empty variable does not override.
    let env = env_of(&[("OPENAI_API_KEY", "")]);
    let config = Config::load_with_env(fixture("provider.json"), &env).unwrap();
    assert!(config.providers["openai"].api_keys.is_empty());
    assert_eq!(
        keys(config.models["openai/gpt-4"].api_keys.as_deref().unwrap()),
        ["sk-key3"]
    );
}

#[test]
fn seed_style_directory_merges_files_and_group_files() {
    let env = env_of(&[("SEED_DIR_OPENAI_KEY", "sk-dir")]);
    let config = Config::load_with_env(fixture("seed_dir"), &env).unwrap();
    let ids: Vec<&str> = config.models.keys().map(String::as_str).collect();
    assert_eq!(
        ids,
        [
            "anthropic-claude-3-opus",
            "openai-gpt4",
            "openai-gpt4o-mini"
        ]
    );
    assert_eq!(keys(&config.providers["openai"].api_keys), ["sk-dir"]);
    assert_eq!(config.models["openai-gpt4o-mini"].model, "gpt-4o-mini");

    let groups: Vec<&str> = config.task_groups.keys().map(String::as_str).collect();
    assert_eq!(groups, ["fast_group", "thinking_group"]);
    let fast = &config.task_groups["fast_group"];
    assert_eq!(fast.description.as_deref(), Some("快速响应任务组"));
    assert_eq!(fast.echelons.len(), 2);
    let e1 = &fast.echelons[0];
    assert_eq!(e1.name, "echelon1");
    assert_eq!(e1.models, ["openai-gpt4", "anthropic-claude-3-opus"]);
    assert_eq!(e1.timeout, Some(secs(30.0)));
    assert_eq!(e1.temperature, Some(0.7));
    assert_eq!(fast.echelons[1].models, ["openai-gpt4o-mini"]);
    let f = fast.fallback_config.as_ref().unwrap();
    assert_eq!(f.strategy, FallbackStrategy::EchelonDown);
    assert_eq!(f.fallback_groups, ["fast_group.echelon2", "thinking_group"]);
    assert_eq!(f.circuit_breaker.as_ref().unwrap().failure_threshold, 5);
    assert_eq!(
        config.task_groups["thinking_group"].echelons[0].models,
        ["anthropic-claude-3-opus"]
    );
}

#[test]
fn typo_key_names_the_closest_key() {
    let errors = errors_of(Config::load_with_env(fixture("typo_key.yaml"), &no_env));
    let f = file("typo_key.yaml");
    assert_eq!(
        where_(&errors),
        [
            (
                f.clone(),
                Some(6),
                Some(5),
                "models.smollm-a.timout".to_owned()
            ),
            (
                f.clone(),
                Some(10),
                Some(5),
                "task_groups.g.echelom2".to_owned()
            ),
        ]
    );
    assert_eq!(errors[0].message, "unknown key `timout`");
    assert_eq!(errors[0].hint.as_deref(), Some("did you mean `timeout`?"));
    assert_eq!(errors[1].hint.as_deref(), Some("did you mean `echelon2`?"));
    assert_eq!(
        errors[0].to_string(),
        format!(
            "{f}:6:5: models.smollm-a.timout: unknown key `timout`\n  hint: did you mean `timeout`?"
        )
    );
}

#[test]
fn wrong_types_are_errors() {
    let errors = errors_of(Config::load_with_env(fixture("wrong_type.yaml"), &no_env));
    let f = file("wrong_type.yaml");
    assert_eq!(
        where_(&errors),
        [
            (
                f.clone(),
                Some(6),
                Some(14),
                "models.smollm-a.timeout".to_owned()
            ),
            (
                f.clone(),
                Some(7),
                Some(18),
                "models.smollm-a.max_retries".to_owned()
            ),
        ]
    );
    assert_eq!(errors[0].message, "expected a number, found a string");
    assert_eq!(errors[1].message, "must be 0 or more, found -1");
}

#[test]
fn missing_env_var_names_it_with_its_position() {
    let errors = errors_of(Config::load_with_env(fixture("missing_env.yaml"), &no_env));
    assert_eq!(
        where_(&errors),
        [(
            file("missing_env.yaml"),
            Some(4),
            Some(17),
            "providers.local.api_keys[0]".to_owned()
        )]
    );
    assert_eq!(
        errors[0].message,
        "environment variable `MISSING_ENV_FIXTURE_KEY` is not set"
    );
    // With the variable set, the same file loads.
    let env = env_of(&[("MISSING_ENV_FIXTURE_KEY", "k")]);
    let config = Config::load_with_env(fixture("missing_env.yaml"), &env).unwrap();
    assert_eq!(keys(&config.providers["local"].api_keys), ["k"]);
}

#[test]
fn dangling_references_are_errors_with_hints() {
    let errors = errors_of(Config::load_with_env(fixture("dangling_ref.yaml"), &no_env));
    let f = file("dangling_ref.yaml");
    assert_eq!(
        where_(&errors),
        [
            (
                f.clone(),
                Some(5),
                Some(25),
                "models.smollm-b.provider".to_owned()
            ),
            (
                f.clone(),
                Some(9),
                Some(26),
                "task_groups.demo_group.echelon1.models[1]".to_owned()
            ),
        ]
    );
    assert_eq!(
        errors[0].message,
        "model `smollm-b` names provider `local_x`, which is not defined"
    );
    assert_eq!(errors[0].hint.as_deref(), Some("did you mean `local_a`?"));
    assert_eq!(errors[1].message, "model `smollm-c` is not defined");
    assert_eq!(errors[1].hint.as_deref(), Some("did you mean `smollm-a`?"));
}

#[test]
fn same_id_in_two_files_names_both() {
    let errors = errors_of(Config::load_with_env(fixture("dup_dir"), &no_env));
    let a = file("dup_dir/a.yaml");
    let b = file("dup_dir/b.yaml");
    assert_eq!(
        where_(&errors),
        [(b.clone(), Some(3), Some(3), "models.m1".to_owned())]
    );
    assert_eq!(
        errors[0].message,
        format!("model `m1` is already defined at {a}:4:3")
    );
    let hint = errors[0].hint.as_deref().unwrap();
    assert!(hint.contains(&a) && hint.contains(&b), "{hint}");
}

#[test]
fn missing_path_is_an_error() {
    let errors = errors_of(Config::load_with_env(fixture("nope.yaml"), &no_env));
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].file, file("nope.yaml"));
    assert!(
        errors[0].message.starts_with("cannot read: "),
        "{}",
        errors[0].message
    );
}

#[test]
fn directory_without_config_files_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not config").unwrap();
    let errors = errors_of(Config::load_with_env(dir.path(), &no_env));
    assert_eq!(
        errors[0].message,
        "no *.yaml, *.yml or *.json files in this directory"
    );
}

#[test]
fn all_errors_are_reported_in_order() {
    let text = "\
server: { port: 70000 }
providers:
  p: { base_url: \"ftp://x\" }
models:
  m: { provider: p, timeout: 0, chunk_timeout: -1 }
task_groups:
  g:
    echelon1: { models: [m] }
    echelon3: { models: [m] }
    fallback_config: { strategy: echelon_dwn, fallback_groups: [g.echelon2, nowhere] }
";
    let errors = errors_of(Config::from_str_with_env(text, "all.yaml", &no_env));
    let got: Vec<(u64, u64, &str, &str)> = errors
        .iter()
        .map(|e| {
            (
                e.line.unwrap(),
                e.column.unwrap(),
                e.key_path.as_str(),
                e.message.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                1,
                17,
                "server.port",
                "must be between 0 and 65535, found 70000"
            ),
            (
                3,
                18,
                "providers.p.base_url",
                "`base_url` must start with `http://` or `https://`"
            ),
            (5, 30, "models.m.timeout", "must be greater than 0, found 0"),
            (
                5,
                48,
                "models.m.chunk_timeout",
                "must be greater than 0, found -1"
            ),
            (
                9,
                5,
                "task_groups.g.echelon3",
                "echelon numbers must be contiguous from 1: `echelon3` comes after `echelon1`"
            ),
            (
                10,
                34,
                "task_groups.g.fallback_config.strategy",
                "unknown fallback strategy `echelon_dwn`"
            ),
            (
                10,
                65,
                "task_groups.g.fallback_config.fallback_groups[0]",
                "`g.echelon2`: task group `g` has no `echelon2` (it has echelon1, echelon3)"
            ),
            (
                10,
                77,
                "task_groups.g.fallback_config.fallback_groups[1]",
                "`nowhere` is not a route (a model id, task group, `group.echelonN`, polling pool \
                 or wrapper)"
            ),
        ]
    );
    assert_eq!(errors[4].hint.as_deref(), Some("rename it `echelon2`"));
    assert_eq!(
        errors[5].hint.as_deref(),
        Some("did you mean `echelon_down`?")
    );
    // The Display of the whole set: one block per error.
    let shown = ConfigErrors(errors).to_string();
    assert!(shown.starts_with("all.yaml:1:17: server.port: must be between 0 and 65535"));
    assert_eq!(shown.matches("all.yaml:").count(), 8);
}

#[test]
fn structural_group_errors() {
    let text = "\
providers: { p: { base_url: \"http://h\" } }
models: { m: { provider: p }, both: { provider: p } }
task_groups:
  empty: { description: nothing }
  named: { name: other, echelon1: { models: [] } }
  both: { echelon1: { models: [m] } }
";
    let errors = errors_of(Config::from_str_with_env(text, "g.yaml", &no_env));
    let got: Vec<(Option<u64>, &str, &str)> = errors
        .iter()
        .map(|e| (e.line, e.key_path.as_str(), e.message.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (
                Some(4),
                "task_groups.empty",
                "task group `empty` has no echelons"
            ),
            (
                Some(5),
                "task_groups.named.name",
                "`name` is `other` but the group is `named`"
            ),
            (
                Some(5),
                "task_groups.named.echelon1.models",
                "echelon `echelon1` has no models"
            ),
            (
                Some(6),
                "task_groups.both",
                "`both` is both a task group and a model id"
            ),
        ]
    );
}

#[test]
fn unknown_top_level_key_and_no_models() {
    let errors = errors_of(Config::from_str_with_env(
        "modles:\n  m: { provider: p }\n",
        "top.yaml",
        &no_env,
    ));
    assert_eq!(errors.len(), 2);
    assert_eq!((errors[0].line, errors[0].column), (None, None));
    assert_eq!(errors[0].message, "no models are defined");
    assert_eq!(errors[1].key_path, "modles");
    assert_eq!(errors[1].hint.as_deref(), Some("did you mean `models`?"));
}

#[test]
fn json_syntax_error_has_position() {
    let errors = errors_of(Config::from_str_with_env(
        "{\n  \"models\": {,}\n}",
        "bad.json",
        &no_env,
    ));
    assert_eq!(errors.len(), 1);
    assert_eq!(
        (errors[0].file.as_str(), errors[0].line, errors[0].column),
        ("bad.json", Some(2), Some(14))
    );
    assert!(
        errors[0].message.starts_with("invalid JSON: "),
        "{}",
        errors[0].message
    );
}

#[test]
fn a_lone_polling_pool_file_is_read_and_needs_its_task_group() {
    let text = "name: fast_pool\ntask_groups: [fast_group]\nrotation_strategy: round_robin\n";
    let errors = errors_of(Config::from_str_with_env(text, "pool.yaml", &no_env));
    let got: Vec<(Option<u64>, Option<u64>, &str, &str)> = errors
        .iter()
        .map(|e| (e.line, e.column, e.key_path.as_str(), e.message.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (None, None, "", "no models are defined"),
            (
                Some(2),
                Some(15),
                "task_groups[0]",
                "polling pool `fast_pool` names task group `fast_group`, which is not defined"
            ),
        ]
    );
}

#[test]
fn secrets_never_appear_in_errors() {
    let text = "\
providers: { p: { base_url: \"http://h\", api_keys: [\"sk-visible-secret\", 42] } }
models: { m: { provider: q, api_keys: [\"sk-other-secret\"], timeout: \"sk-in-wrong-field\" } }
";
    let errors = errors_of(Config::from_str_with_env(text, "s.yaml", &no_env));
    assert_eq!(errors.len(), 3, "{errors:?}");
    let shown = ConfigErrors(errors).to_string();
    for secret in ["sk-visible-secret", "sk-other-secret", "sk-in-wrong-field"] {
        assert!(!shown.contains(secret), "{secret} leaked: {shown}");
    }
}

#[test]
fn env_substitution_forms_through_the_public_api() {
    let text = "\
server: { port: \"${SUBST_PORT}\", host: \"$SUBST_HOST\" }
providers: { p: { base_url: \"http://${SUBST_HOST}:${SUBST_UPSTREAM_PORT:-8082}/v1\", api_keys: [\"a$$b\"] } }
models: { m: { provider: p, timeout: $SUBST_TIMEOUT } }
";
    let env = env_of(&[
        ("SUBST_PORT", "4321"),
        ("SUBST_HOST", "10.0.0.1"),
        ("SUBST_TIMEOUT", "7.5"),
    ]);
    let config = Config::from_str_with_env(text, "subst.yaml", &env).unwrap();
    assert_eq!(config.server.port, 4321);
    assert_eq!(config.server.host, "10.0.0.1");
    assert_eq!(config.providers["p"].base_url, "http://10.0.0.1:8082/v1");
    assert_eq!(keys(&config.providers["p"].api_keys), ["a$b"]);
    assert_eq!(config.models["m"].timeout, secs(7.5));
}

#[test]
fn group_file_alone_needs_models_and_uses_its_name() {
    let text = "name: solo\necheon1: { models: [x] }\n";
    let errors = errors_of(Config::from_str_with_env(text, "groups/solo.yaml", &no_env));
    let got: Vec<(Option<u64>, &str, &str)> = errors
        .iter()
        .map(|e| (e.line, e.key_path.as_str(), e.message.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (None, "", "no models are defined"),
            (Some(1), "", "task group `solo` has no echelons"),
            (Some(2), "echeon1", "unknown key `echeon1`"),
        ]
    );
    assert_eq!(errors[2].hint.as_deref(), Some("did you mean `echelon1`?"));
}

// ---------------------------------------------------------------------------
// polling pools, wrappers, default route

/// Copies the fixture directory `name` into a new temporary directory.
fn fixture_copy(name: &str) -> tempfile::TempDir {
    fn copy(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    copy(&fixture(name), dir.path());
    dir
}

#[test]
fn polling_pools_wrappers_and_default_route_load() {
    let config = Config::load_with_env(fixture("pools.yaml"), &no_env).unwrap();

    let pools: Vec<&str> = config.polling_pools.keys().map(String::as_str).collect();
    assert_eq!(pools, ["fast_pool", "plain_pool", "thinking_pool"]);
    let fast = &config.polling_pools["fast_pool"];
    assert_eq!(
        *fast,
        PollingPoolConfig {
            description: Some("fast task only".to_owned()),
            task_group: "fast_group".to_owned(),
            rotation_strategy: RotationStrategy::Weighted,
            weights: [("smollm-a".to_owned(), 3), ("smollm-c".to_owned(), 2)]
                .into_iter()
                .collect(),
            health_check_interval: secs(15.0),
            health_check: HealthCheckKind::Completion,
            failure_threshold: 2,
            recovery_time: secs(120.0),
            fallback_config: PoolFallbackConfig {
                strategy: PoolFallbackStrategy::SimpleRetry,
                max_instance_attempts: 4,
            },
        }
    );
    // `task_group:` (singular) and seed 002's top-level fallback form.
    let thinking = &config.polling_pools["thinking_pool"];
    assert_eq!(thinking.task_group, "thinking_group");
    assert_eq!(thinking.rotation_strategy, RotationStrategy::LeastBusy);
    assert_eq!(
        thinking.fallback_config,
        PoolFallbackConfig {
            strategy: PoolFallbackStrategy::InstanceRotation,
            max_instance_attempts: 3,
        }
    );
    // Every default.
    assert_eq!(
        config.polling_pools["plain_pool"],
        PollingPoolConfig::new("thinking_group")
    );
    let defaults = PollingPoolConfig::default();
    assert_eq!(defaults.rotation_strategy, RotationStrategy::RoundRobin);
    assert_eq!(defaults.health_check_interval, secs(30.0));
    assert_eq!(defaults.health_check, HealthCheckKind::Models);
    assert_eq!(defaults.failure_threshold, 3);
    assert_eq!(defaults.recovery_time, secs(60.0));
    assert_eq!(defaults.fallback_config.max_instance_attempts, 2);

    assert_eq!(
        config.wrappers["fast_wrapper"],
        WrapperConfig {
            description: Some("seed 001 TaskGroupWrapper".to_owned()),
            target: "fast_group.echelon1".to_owned(),
            fallback_groups: vec![
                "fast_group.echelon2".to_owned(),
                "fast_group.echelon3".to_owned()
            ],
            stream_failure: None,
        }
    );
    let outer = &config.wrappers["outer_wrapper"];
    assert_eq!(outer.target, "fast_wrapper", "a wrapper may wrap a wrapper");
    assert_eq!(
        outer.fallback_groups,
        ["thinking_pool", "smollm-c", "thinking_group"]
    );
    assert_eq!(config.default_route.as_deref(), Some("fast_wrapper"));
    // A task group may fall back to a pool or a wrapper.
    assert_eq!(
        config.task_groups["fast_group"]
            .fallback_config
            .as_ref()
            .unwrap()
            .fallback_groups,
        ["fast_pool", "fast_wrapper"]
    );
}

#[test]
fn enum_names_round_trip() {
    for name in RotationStrategy::NAMES {
        assert_eq!(RotationStrategy::from_name(name).unwrap().as_str(), *name);
    }
    for name in HealthCheckKind::NAMES {
        assert_eq!(HealthCheckKind::from_name(name).unwrap().as_str(), *name);
    }
    for name in PoolFallbackStrategy::NAMES {
        assert_eq!(
            PoolFallbackStrategy::from_name(name).unwrap().as_str(),
            *name
        );
    }
}

#[test]
fn seed_pool_files_load_from_a_directory() {
    let config = Config::load_with_env(fixture("pool_dir"), &no_env).unwrap();
    let pools: Vec<&str> = config.polling_pools.keys().map(String::as_str).collect();
    assert_eq!(pools, ["fast_pool", "spare_pool", "thinking_pool"]);

    // Seed 001's pool file, as it is.
    let fast = &config.polling_pools["fast_pool"];
    assert_eq!(fast.description.as_deref(), Some("快速响应任务专用轮询池"));
    assert_eq!(fast.task_group, "fast_group");
    assert_eq!(fast.rotation_strategy, RotationStrategy::RoundRobin);
    assert_eq!(fast.health_check_interval, secs(30.0));
    assert_eq!(fast.failure_threshold, 3);
    assert_eq!(fast.recovery_time, secs(60.0));
    assert_eq!(
        fast.fallback_config,
        PoolFallbackConfig {
            strategy: PoolFallbackStrategy::InstanceRotation,
            max_instance_attempts: 2
        }
    );
    // Seed 002's variant: `fallback_strategy` and `max_instance_attempts` at the top.
    let thinking = &config.polling_pools["thinking_pool"];
    assert_eq!(thinking.task_group, "thinking_group");
    assert_eq!(thinking.health_check_interval, secs(60.0));
    assert_eq!(thinking.failure_threshold, 2);
    assert_eq!(thinking.recovery_time, secs(120.0));
    assert_eq!(
        thinking.fallback_config.strategy,
        PoolFallbackStrategy::InstanceRotation
    );
    assert_eq!(thinking.fallback_config.max_instance_attempts, 2);
    // No `name:`: named by the file stem.
    let spare = &config.polling_pools["spare_pool"];
    assert_eq!(spare.task_group, "thinking_group");
    assert_eq!(spare.rotation_strategy, RotationStrategy::LeastBusy);

    assert_eq!(config.default_route.as_deref(), Some("fast_pool"));
}

#[test]
fn a_pool_naming_two_task_groups_is_an_error_at_the_list() {
    let errors = errors_of(Config::load_with_env(fixture("bad_pool_dir"), &no_env));
    let empty = file("bad_pool_dir/polling_pools/empty_pool.yaml");
    let mixed = file("bad_pool_dir/polling_pools/mixed_pool.yaml");
    assert_eq!(
        where_(&errors),
        [
            (empty.clone(), Some(3), Some(3), "task_groups".to_owned()),
            (
                empty.clone(),
                Some(5),
                Some(1),
                "fallback_strategy".to_owned()
            ),
            (
                empty.clone(),
                Some(6),
                Some(20),
                "rotation_strategy".to_owned()
            ),
            (mixed.clone(), Some(3), Some(14), "task_groups".to_owned()),
        ]
    );
    assert_eq!(
        errors[3].to_string(),
        format!(
            "{mixed}:3:14: task_groups: a polling pool serves exactly one task group, found 2\n  \
             hint: seed 002, task isolation: a pool rotates the models of one task only; make \
             one pool per task group (e.g. `fast_pool` with `task_groups: [fast_group]`)"
        )
    );
    assert_eq!(
        errors[0].message,
        "a polling pool serves exactly one task group, found 0"
    );
    assert_eq!(
        errors[1].message,
        "`fallback_strategy` and `fallback_config` both set the pool's fallback"
    );
    assert_eq!(
        errors[2].hint.as_deref(),
        Some("did you mean `round_robin`?")
    );
}

#[test]
fn pool_key_errors() {
    let text = "\
providers: { p: { base_url: \"http://h\" } }
models: { m: { provider: p } }
task_groups: { g: { echelon1: { models: [m] } } }
polling_pools:
  a: { task_group: g, task_groups: [g] }
  b: { name: c, task_groups: [g], rotation_stratgy: weighted, health_check: ping }
  d: { task_groups: [g], fallback_config: { strategy: echelon_down, max_instance_attempts: 0 } }
  e: { task_groups: [g], rotation_strategy: weighted, weights: { m: 0 } }
  f: { description: no group }
";
    let errors = errors_of(Config::from_str_with_env(text, "p.yaml", &no_env));
    let got: Vec<(u64, u64, &str, &str)> = errors
        .iter()
        .map(|e| {
            (
                e.line.unwrap(),
                e.column.unwrap(),
                e.key_path.as_str(),
                e.message.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                5,
                8,
                "polling_pools.a.task_group",
                "`task_group` and `task_groups` both name the pool's task group"
            ),
            (
                6,
                14,
                "polling_pools.b.name",
                "`name` is `c` but the pool is `b`"
            ),
            (
                6,
                35,
                "polling_pools.b.rotation_stratgy",
                "unknown key `rotation_stratgy`"
            ),
            (
                6,
                77,
                "polling_pools.b.health_check",
                "unknown health check `ping`"
            ),
            (
                7,
                55,
                "polling_pools.d.fallback_config.strategy",
                "unknown pool fallback strategy `echelon_down`"
            ),
            (
                7,
                92,
                "polling_pools.d.fallback_config.max_instance_attempts",
                "must be 1 or more, found 0"
            ),
            (
                8,
                69,
                "polling_pools.e.weights.m",
                "must be 1 or more, found 0"
            ),
            (
                9,
                6,
                "polling_pools.f",
                "missing required key `task_groups`"
            ),
        ]
    );
    assert_eq!(
        errors[2].hint.as_deref(),
        Some("did you mean `rotation_strategy`?")
    );
    assert_eq!(
        errors[3].hint.as_deref(),
        Some("defined values: `models`, `completion`")
    );
    assert_eq!(
        errors[4].hint.as_deref(),
        Some("defined values: `instance_rotation`, `simple_retry`")
    );
}

#[test]
fn names_clash_across_kinds_naming_both_places() {
    let errors = errors_of(Config::load_with_env(fixture("clash_dir"), &no_env));
    let a = file("clash_dir/a.yaml");
    let b = file("clash_dir/b.yaml");
    let got: Vec<(String, Option<u64>, Option<u64>, &str)> = errors
        .iter()
        .map(|e| (e.file.clone(), e.line, e.column, e.message.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (
                b.clone(),
                Some(2),
                Some(3),
                "`fast` is both a polling pool and a model id"
            ),
            (
                b.clone(),
                Some(3),
                Some(3),
                "polling pool name `p.q` contains `.`"
            ),
            (
                b.clone(),
                Some(5),
                Some(3),
                "`g` is both a wrapper and a task group"
            ),
            (
                b.clone(),
                Some(6),
                Some(3),
                "`fast` is both a wrapper and a model id"
            ),
        ]
    );
    assert_eq!(
        errors[0].hint.as_deref(),
        Some(
            format!(
                "the model is defined at {a}:4:3 and the polling pool at {b}:2:3; rename one \
                 so routes are unambiguous"
            )
            .as_str()
        )
    );
    assert_eq!(
        errors[2].hint.as_deref(),
        Some(
            format!(
                "the task group is defined at {a}:7:3 and the wrapper at {b}:5:3; rename one \
                 so routes are unambiguous"
            )
            .as_str()
        )
    );
}

#[test]
fn wrapper_and_route_reference_errors() {
    let errors = errors_of(Config::load_with_env(
        fixture("wrapper_errors.yaml"),
        &no_env,
    ));
    let got: Vec<(u64, u64, &str, &str)> = errors
        .iter()
        .map(|e| {
            (
                e.line.unwrap(),
                e.column.unwrap(),
                e.key_path.as_str(),
                e.message.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                8,
                52,
                "task_groups.g.fallback_config.fallback_groups[1]",
                "`g_pool.echelon1`: `g_pool` is a polling pool, and only task groups have echelons"
            ),
            (
                10,
                28,
                "polling_pools.g_pool.weights",
                "`weights` only apply to `rotation_strategy: weighted`, but this pool uses \
                 `round_robin`"
            ),
            (
                10,
                45,
                "polling_pools.g_pool.weights.n",
                "`n` is not a model of task group `g`, so it has no weight in pool `g_pool`"
            ),
            (
                12,
                25,
                "wrappers.w_dangling.target",
                "`g.echelon2`: task group `g` has no `echelon2` (it has echelon1)"
            ),
            (
                12,
                55,
                "wrappers.w_dangling.fallback_groups[0]",
                "`g_poll` is not a route (a model id, task group, `group.echelonN`, polling pool \
                 or wrapper)"
            ),
            (
                13,
                16,
                "wrappers.w_no_target",
                "missing required key `target`"
            ),
            (
                16,
                23,
                "wrappers.w_loop_c.target",
                "wrapper cycle: w_loop_a → w_loop_b → w_loop_c → w_loop_a"
            ),
            (16, 33, "wrappers.w_loop_c.tagret", "unknown key `tagret`"),
            (
                17,
                21,
                "wrappers.w_self.target",
                "wrapper cycle: w_self → w_self"
            ),
            (
                18,
                16,
                "default_route",
                "`nowhere` is not a route (a model id, task group, `group.echelonN`, polling \
                 pool or wrapper)"
            ),
        ]
    );
    let hints: Vec<Option<&str>> = errors.iter().map(|e| e.hint.as_deref()).collect();
    assert_eq!(hints[0], Some("name `g_pool` itself"));
    assert_eq!(hints[2], Some("did you mean `m`?"));
    assert_eq!(
        hints[3],
        Some("name one of `g.echelon1`, or the whole group `g`")
    );
    assert_eq!(hints[4], Some("did you mean `g_pool`?"));
    assert_eq!(hints[7], Some("did you mean `target`?"));
    assert!(
        hints[9]
            .unwrap()
            .starts_with("defined routes: `g`, `g_pool`, `m`, `w_dangling`"),
        "{:?}",
        hints[9]
    );
}

#[test]
fn default_route_and_pools_defined_twice_name_both_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.yaml"),
        "providers: { p: { base_url: \"http://h\" } }\nmodels: { m: { provider: p } }\n\
         task_groups: { g: { echelon1: { models: [m] } } }\ndefault_route: g\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.yaml"),
        "default_route: m\npolling_pools: { g_pool: { task_group: g } }\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("g_pool.yaml"), "task_groups: [g]\n").unwrap();
    let errors = errors_of(Config::load_with_env(dir.path(), &no_env));
    let a = dir.path().join("a.yaml").display().to_string();
    let b = dir.path().join("b.yaml").display().to_string();
    let got: Vec<(String, Option<u64>, &str)> = errors
        .iter()
        .map(|e| (e.file.clone(), e.line, e.message.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (
                b.clone(),
                Some(1),
                format!("setting `default_route` is already defined at {a}:4:1").as_str()
            ),
            (
                dir.path().join("g_pool.yaml").display().to_string(),
                None,
                format!("polling pool `g_pool` is already defined at {b}:2:18").as_str()
            ),
        ]
    );
}

#[test]
fn global_fallback_file_is_refused_with_a_migrate_hint() {
    let errors = errors_of(Config::load_with_env(fixture("migrate_dir"), &no_env));
    assert_eq!(
        where_(&errors),
        [(
            file("migrate_dir/global_fallback.yaml"),
            Some(2),
            Some(1),
            String::new()
        )]
    );
    assert_eq!(
        errors[0].hint.as_deref(),
        Some(
            format!(
                "run `echelon config migrate {}` to turn it into per-group `fallback_config` \
                 sections",
                file("migrate_dir")
            )
            .as_str()
        )
    );
    // Recognised by its keys under any name, too.
    let errors = errors_of(Config::from_str_with_env(
        "fallback_groups: [a]\nmax_attempts: 2\n",
        "legacy.yaml",
        &no_env,
    ));
    assert!(
        errors
            .iter()
            .any(|e| e.message.starts_with("this is a global fallback file")),
        "{errors:?}"
    );
}

// ---------------------------------------------------------------------------
// migration

/// Every file under `dir` with its contents, sorted by path.
fn snapshot(dir: &std::path::Path) -> Vec<(String, String)> {
    fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                out.push((rel, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

const MIGRATE_CHANGES: &[&str] = &[
    "groups/fast_group.yaml: added fallback_config (strategy echelon_down, max_attempts 3) from \
     global_fallback.yaml",
    "groups/json_group.json: added fallback_config (strategy echelon_down, max_attempts 3) from \
     global_fallback.yaml",
    "groups/thinking_group.yml: kept its own fallback_config (the `groups.thinking_group` entry \
     of global_fallback.yaml is not used)",
    "llms.yaml: task_groups.backup_group: added fallback_config (strategy provider_failover, \
     max_attempts 2) from global_fallback.yaml and its `groups.backup_group` entry; \
     `backup_group` left out of its own fallback_groups",
    "llms.yaml: task_groups.coding_group: added fallback_config (strategy echelon_down, \
     max_attempts 3) from global_fallback.yaml",
    "global_fallback.yaml: renamed to global_fallback.yaml.migrated, so it is no longer loaded",
];

#[test]
fn migrate_moves_the_global_fallback_into_each_group() {
    let dir = fixture_copy("migrate_dir");
    let root = dir.path();
    let before = snapshot(root);
    let report = migrate_with_env(root, &MigrateOptions::default(), &no_env).unwrap();

    assert_eq!(report.changes, MIGRATE_CHANGES);
    let written: Vec<PathBuf> = [
        "groups/fast_group.yaml",
        "groups/json_group.json",
        "llms.yaml",
    ]
    .iter()
    .map(|f| root.join(f))
    .collect();
    assert_eq!(report.written, written);
    let backups: Vec<PathBuf> = written
        .iter()
        .map(|f| PathBuf::from(format!("{}.bak", f.display())))
        .collect();
    assert_eq!(report.backups, backups);
    assert_eq!(
        report.removed_global,
        Some(root.join("global_fallback.yaml.migrated"))
    );

    // Each backup holds the file as it was; the global file is moved, not changed.
    let original = |rel: &str| {
        before
            .iter()
            .find(|(f, _)| f == rel)
            .map(|(_, t)| t.clone())
            .unwrap()
    };
    for rel in [
        "groups/fast_group.yaml",
        "groups/json_group.json",
        "llms.yaml",
    ] {
        let backup = std::fs::read_to_string(root.join(format!("{rel}.bak"))).unwrap();
        assert_eq!(backup, original(rel), "{rel}.bak");
    }
    assert!(!root.join("global_fallback.yaml").exists());
    assert_eq!(
        std::fs::read_to_string(root.join("global_fallback.yaml.migrated")).unwrap(),
        original("global_fallback.yaml")
    );
    // Untouched files are untouched.
    for rel in ["groups/thinking_group.yml", "polling_pools/fast_pool.yaml"] {
        assert_eq!(
            std::fs::read_to_string(root.join(rel)).unwrap(),
            original(rel)
        );
    }

    // A seed group file: the block appended, everything before it (comments too) kept.
    let fast = std::fs::read_to_string(root.join("groups/fast_group.yaml")).unwrap();
    assert_eq!(
        fast,
        format!(
            "{}\n# fallback_config from global_fallback.yaml (echelon config migrate)\n\
             fallback_config:\n  strategy: echelon_down\n  fallback_groups: [backup_group]\n  \
             max_attempts: 3\n  retry_delay: 1.0\n  circuit_breaker:\n    failure_threshold: 5\n    \
             recovery_time: 60\n    half_open_requests: 1\n",
            original("groups/fast_group.yaml")
        )
    );
    // Groups under `task_groups:`: inserted under the group, comments kept in place.
    let llms = std::fs::read_to_string(root.join("llms.yaml")).unwrap();
    assert!(
        llms.contains(
            "      models: [anthropic-claude-3-opus]\n    \
             # fallback_config from global_fallback.yaml (echelon config migrate)\n    \
             fallback_config:\n      strategy: provider_failover\n      fallback_groups: []\n"
        ),
        "{llms}"
    );
    assert!(llms.contains("      models: [openai-gpt4o-mini]   # cheap\n"));
    assert!(llms.contains(
        "  coding_group: { echelon1: { models: [openai-gpt4] }, fallback_config: { strategy: \
         echelon_down, fallback_groups: [backup_group], max_attempts: 3, retry_delay: 1.0, \
         circuit_breaker: { failure_threshold: 5, recovery_time: 60, half_open_requests: 1 } } }\n"
    ));
    assert!(
        llms.ends_with("\n# trailing comment stays last\n"),
        "{llms}"
    );

    // The result loads, with the expected fallback of each group.
    let config = Config::load_with_env(root, &no_env).unwrap();
    let fallback = |g: &str| config.task_groups[g].fallback_config.clone().unwrap();
    let global = FallbackConfig {
        strategy: FallbackStrategy::EchelonDown,
        fallback_groups: vec!["backup_group".to_owned()],
        max_attempts: Some(3),
        retry_delay: Some(secs(1.0)),
        circuit_breaker: Some(CircuitBreakerConfig {
            failure_threshold: 5,
            recovery_time: secs(60.0),
            half_open_requests: 1,
            ..CircuitBreakerConfig::default()
        }),
    };
    for g in ["fast_group", "coding_group", "json_group"] {
        let f = fallback(g);
        assert_eq!(
            (
                f.strategy,
                &f.fallback_groups,
                f.max_attempts,
                f.retry_delay,
                &f.circuit_breaker
            ),
            (
                global.strategy,
                &global.fallback_groups,
                global.max_attempts,
                global.retry_delay,
                &global.circuit_breaker
            ),
            "{g}"
        );
    }
    // The override: key by key, the breaker too; never itself as a fallback.
    let backup = fallback("backup_group");
    assert_eq!(backup.strategy, FallbackStrategy::ProviderFailover);
    assert!(backup.fallback_groups.is_empty());
    assert_eq!(backup.max_attempts, Some(2));
    assert_eq!(backup.retry_delay, Some(secs(1.0)));
    let breaker = backup.circuit_breaker.unwrap();
    assert_eq!(
        (
            breaker.failure_threshold,
            breaker.recovery_time,
            breaker.half_open_requests
        ),
        (5, secs(30.0), 1)
    );
    // Kept its own.
    let thinking = fallback("thinking_group");
    assert_eq!(thinking.strategy, FallbackStrategy::TaskGroupSwitch);
    assert_eq!(thinking.fallback_groups, ["fast_group"]);
    assert_eq!(thinking.max_attempts, Some(4));
    assert_eq!(config.polling_pools["fast_pool"].task_group, "fast_group");

    // Idempotent: the second run finds nothing to migrate and changes nothing.
    let after = snapshot(root);
    let again = migrate_with_env(root, &MigrateOptions::default(), &no_env).unwrap();
    assert!(again.is_empty());
    assert_eq!(again, MigrationReport::default());
    assert_eq!(snapshot(root), after);
}

#[test]
fn migrate_without_backup() {
    let dir = fixture_copy("migrate_dir");
    let options = MigrateOptions {
        backup: false,
        ..MigrateOptions::default()
    };
    let report = migrate_with_env(dir.path(), &options, &no_env).unwrap();
    assert_eq!(report.changes, MIGRATE_CHANGES);
    assert_eq!(report.written.len(), 3);
    assert!(report.backups.is_empty());
    let files: Vec<String> = snapshot(dir.path()).into_iter().map(|(f, _)| f).collect();
    assert!(
        files.iter().all(|f| !f.contains(".bak")),
        "no backups: {files:?}"
    );
    Config::load_with_env(dir.path(), &no_env).unwrap();
}

#[test]
fn migrate_validate_only_writes_nothing() {
    let dir = fixture_copy("migrate_dir");
    let before = snapshot(dir.path());
    let options = MigrateOptions {
        validate_only: true,
        ..MigrateOptions::default()
    };
    let report = migrate_with_env(dir.path(), &options, &no_env).unwrap();
    assert_eq!(report.changes, MIGRATE_CHANGES);
    assert!(report.written.is_empty());
    assert!(report.backups.is_empty());
    assert_eq!(report.removed_global, None);
    assert_eq!(snapshot(dir.path()), before);

    // Verbose: every value, and the backups as change lines.
    let options = MigrateOptions {
        verbose: true,
        ..MigrateOptions::default()
    };
    let report = migrate_with_env(dir.path(), &options, &no_env).unwrap();
    assert_eq!(
        report.changes[0],
        "groups/fast_group.yaml: added fallback_config (strategy echelon_down, fallback_groups \
         [backup_group], max_attempts 3, retry_delay 1.0, circuit_breaker { failure_threshold: \
         5, recovery_time: 60, half_open_requests: 1 }) from global_fallback.yaml"
    );
    assert!(
        report
            .changes
            .contains(&"llms.yaml: backed up to llms.yaml.bak".to_owned()),
        "{:?}",
        report.changes
    );
}

#[test]
fn migrate_fails_and_writes_nothing_when_the_result_would_not_validate() {
    let dir = fixture_copy("migrate_dir");
    let global = dir.path().join("global_fallback.yaml");
    std::fs::write(
        &global,
        "strategy: echelon_dwn\nfallback_groups: [backup_grup]\nmax_atempts: 3\n\
         groups:\n  nope_group: { max_attempts: 2 }\n",
    )
    .unwrap();
    let before = snapshot(dir.path());
    for validate_only in [true, false] {
        let options = MigrateOptions {
            validate_only,
            ..MigrateOptions::default()
        };
        let error = migrate_with_env(dir.path(), &options, &no_env).unwrap_err();
        let errors = error.config_errors().unwrap().errors();
        let g = global.display().to_string();
        let got: Vec<(String, Option<u64>, Option<u64>, &str)> = errors
            .iter()
            .map(|e| (e.file.clone(), e.line, e.column, e.message.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    g.clone(),
                    Some(1),
                    Some(11),
                    "unknown fallback strategy `echelon_dwn`"
                ),
                (
                    g.clone(),
                    Some(2),
                    Some(19),
                    "`backup_grup` is not a route (a model id, task group, `group.echelonN`, \
                     polling pool or wrapper)"
                ),
                (g.clone(), Some(3), Some(1), "unknown key `max_atempts`"),
                (
                    g.clone(),
                    Some(5),
                    Some(3),
                    "task group `nope_group` is not defined"
                ),
            ]
        );
        assert_eq!(snapshot(dir.path()), before, "nothing written");
    }

    // A configuration that is already broken is reported as it is.
    let dir = fixture_copy("migrate_dir");
    let fast = dir.path().join("groups/fast_group.yaml");
    let text = std::fs::read_to_string(&fast)
        .unwrap()
        .replace("concurrency_limit", "concurency_limit");
    std::fs::write(&fast, text).unwrap();
    let error = migrate_with_env(dir.path(), &MigrateOptions::default(), &no_env).unwrap_err();
    let errors = error.config_errors().unwrap().errors();
    assert_eq!(
        where_(errors),
        [(
            fast.display().to_string(),
            Some(7),
            Some(3),
            "echelon1.concurency_limit".to_owned()
        )]
    );
    assert!(!dir.path().join("groups/fast_group.yaml.bak").exists());
}

#[test]
fn migrate_finds_the_global_file_anywhere_by_its_keys() {
    let dir = fixture_copy("migrate_dir");
    std::fs::create_dir(dir.path().join("legacy")).unwrap();
    std::fs::rename(
        dir.path().join("global_fallback.yaml"),
        dir.path().join("legacy/fallback.yml"),
    )
    .unwrap();
    let report = migrate_with_env(dir.path(), &MigrateOptions::default(), &no_env).unwrap();
    assert_eq!(
        report.changes.last().map(String::as_str),
        Some(
            "legacy/fallback.yml: renamed to legacy/fallback.yml.migrated, so it is no longer loaded"
        )
    );
    assert!(report.changes[0].ends_with("from legacy/fallback.yml"));
    assert!(dir.path().join("legacy/fallback.yml.migrated").exists());
    Config::load_with_env(dir.path(), &no_env).unwrap();
}

#[test]
fn migrate_refuses_an_empty_fallback_config_and_a_file_path() {
    let dir = fixture_copy("migrate_dir");
    let fast = dir.path().join("groups/fast_group.yaml");
    let mut text = std::fs::read_to_string(&fast).unwrap();
    text.push_str("fallback_config:\n");
    std::fs::write(&fast, text).unwrap();
    let error = migrate_with_env(dir.path(), &MigrateOptions::default(), &no_env).unwrap_err();
    let errors = error.config_errors().unwrap().errors();
    assert_eq!(
        where_(errors),
        [(
            fast.display().to_string(),
            Some(12),
            Some(1),
            "fallback_config".to_owned()
        )]
    );
    assert!(!dir.path().join("groups/fast_group.yaml.bak").exists());

    let error = migrate_with_env(&fast, &MigrateOptions::default(), &no_env).unwrap_err();
    assert!(matches!(error, MigrateError::NotADirectory(_)), "{error}");
}

#[test]
fn examples_still_validate() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    // The examples read their keys from the environment (scripts/demo.sh sets them).
    let env = |name: &str| name.ends_with("_KEY").then(|| "example-key".to_owned());
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            if let Err(errors) = Config::load_with_env(&path, &env) {
                panic!("{}:\n{errors}", path.display());
            }
            seen += 1;
        }
    }
    assert!(seen > 0, "no examples found in {}", dir.display());
}

// ---------------------------------------------------------------------------
// usage, pricing, encodings, body logging

#[test]
fn usage_pricing_encoding_and_log_bodies_load() {
    let config = Config::load_with_env(fixture("usage.yaml"), &no_env).unwrap();
    assert!(config.server.log_bodies);

    let mini = &config.models["mini"];
    assert_eq!(
        mini.pricing,
        Some(PricingConfig {
            input_per_1m: 0.15,
            output_per_1m: 0.60,
            cached_input_per_1m: Some(0.075),
            cache_write_per_1m: None,
        })
    );
    assert_eq!(mini.encoding, None);
    assert_eq!(
        mini.token_encoding(),
        TokenEncoding::O200kBase,
        "gpt-4o* → o200k"
    );
    let classic = &config.models["classic"];
    assert_eq!(
        classic.pricing,
        Some(PricingConfig {
            input_per_1m: 30.0,
            output_per_1m: 60.0,
            cached_input_per_1m: None,
            cache_write_per_1m: None,
        })
    );
    assert_eq!(
        classic.encoding,
        Some(TokenEncoding::O200kBase),
        "explicit wins"
    );
    let plain = &config.models["plain"];
    assert_eq!(plain.pricing, None);
    assert_eq!(plain.token_encoding(), TokenEncoding::Cl100kBase);

    // Relative to the configuration file's directory.
    assert_eq!(
        config.usage,
        UsageConfig {
            ledger_path: Some(fixture("data/ledger.db")),
            queue_capacity: 500,
            batch_size: 64,
            flush_interval_ms: 50,
        }
    );
}

#[test]
fn usage_defaults_and_the_default_ledger_path() {
    let yaml = "
providers: { local: { base_url: \"http://127.0.0.1:8082/v1\" } }
models: { m: { provider: local } }
";
    let env = env_of(&[("HOME", "/home/u")]);
    let config = Config::from_str_with_env(yaml, "inline.yaml", &env).unwrap();
    assert!(!config.server.log_bodies);
    assert_eq!(config.models["m"].pricing, None);
    assert_eq!(
        config.usage,
        UsageConfig {
            ledger_path: Some(PathBuf::from("/home/u/.local/share/echelon/ledger.db")),
            queue_capacity: 10_000,
            batch_size: 256,
            flush_interval_ms: 200,
        }
    );

    // ECHELON_DATA_DIR, then XDG_DATA_HOME (absolute only), then HOME.
    let path = |vars: &'static [(&'static str, &'static str)]| {
        UsageConfig::default_ledger_path_with_env(&env_of(vars))
    };
    assert_eq!(
        path(&[
            ("ECHELON_DATA_DIR", "/srv/echelon"),
            ("XDG_DATA_HOME", "/xdg"),
            ("HOME", "/home/u")
        ]),
        Some(PathBuf::from("/srv/echelon/ledger.db"))
    );
    assert_eq!(
        path(&[("XDG_DATA_HOME", "/xdg"), ("HOME", "/home/u")]),
        Some(PathBuf::from("/xdg/echelon/ledger.db"))
    );
    assert_eq!(
        path(&[
            ("ECHELON_DATA_DIR", ""),
            ("XDG_DATA_HOME", "rel"),
            ("HOME", "/home/u")
        ]),
        Some(PathBuf::from("/home/u/.local/share/echelon/ledger.db"))
    );
    assert_eq!(path(&[]), None);

    // A `usage:` section without `ledger` keeps the default path; `false` turns it off.
    let env = env_of(&[("ECHELON_DATA_DIR", "/data")]);
    let with = |usage: &str| {
        Config::from_str_with_env(&format!("{yaml}usage: {usage}\n"), "inline.yaml", &env)
            .unwrap()
            .usage
    };
    let u = with("{ batch_size: 3 }");
    assert_eq!(u.ledger_path, Some(PathBuf::from("/data/ledger.db")));
    assert_eq!(u.batch_size, 3);
    assert_eq!(with("{ ledger: false }").ledger_path, None);
    assert_eq!(
        with("{ ledger: true }").ledger_path,
        Some(PathBuf::from("/data/ledger.db"))
    );
    assert_eq!(
        with("{ ledger: /abs/l.db }").ledger_path,
        Some(PathBuf::from("/abs/l.db"))
    );
    // In-memory text without a directory: a relative path stays relative.
    assert_eq!(
        with("{ ledger: rel/l.db }").ledger_path,
        Some(PathBuf::from("rel/l.db"))
    );
}

#[test]
fn usage_in_a_directory_is_relative_to_its_own_file() {
    let config = Config::load_with_env(fixture("usage_dir"), &no_env).unwrap();
    assert_eq!(
        config.usage.ledger_path,
        Some(fixture("usage_dir/sub/../ledger.db"))
    );
    assert_eq!(config.usage.batch_size, 8);
    // `${VAR}` works, and `false` from a variable turns the ledger off.
    let env = env_of(&[("USAGE_DIR_LEDGER", "false")]);
    let config = Config::load_with_env(fixture("usage_dir"), &env).unwrap();
    assert_eq!(config.usage.ledger_path, None);
}

#[test]
fn usage_pricing_and_encoding_errors_are_located() {
    let errors = errors_of(Config::load_with_env(fixture("usage_errors.yaml"), &no_env));
    let f = file("usage_errors.yaml");
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        where_(&errors),
        [
            (f.clone(), Some(2), Some(15), "server.log_bodies".to_owned()),
            (
                f.clone(),
                Some(8),
                Some(30),
                "models.mini.pricing.input_per_1m".to_owned()
            ),
            (
                f.clone(),
                Some(11),
                Some(14),
                "models.other.pricing".to_owned()
            ),
            (
                f.clone(),
                Some(11),
                Some(33),
                "models.other.pricing.ouput_per_1m".to_owned()
            ),
            (
                f.clone(),
                Some(12),
                Some(15),
                "models.other.encoding".to_owned()
            ),
            (f.clone(), Some(14), Some(3), "usage.ledgr".to_owned()),
            (f.clone(), Some(15), Some(11), "usage.ledger".to_owned()),
            (
                f.clone(),
                Some(16),
                Some(19),
                "usage.queue_capacity".to_owned()
            ),
        ],
        "{messages:#?}"
    );
    assert_eq!(
        messages[1],
        format!("{f}:8:30: models.mini.pricing.input_per_1m: must be 0 or more, found -0.15")
    );
    assert!(
        messages[0].contains("expected `true` or `false`"),
        "{}",
        messages[0]
    );
    assert!(
        errors[2]
            .message
            .contains("missing required key `output_per_1m`")
    );
    assert_eq!(
        errors[3].hint.as_deref(),
        Some("did you mean `output_per_1m`?")
    );
    assert_eq!(errors[4].message, "unknown encoding `o200k`");
    assert_eq!(
        errors[4].hint.as_deref(),
        Some("supported: cl100k_base, o200k_base")
    );
    assert_eq!(errors[5].hint.as_deref(), Some("did you mean `ledger`?"));
    assert!(errors[6].message.contains("expected a path or `false`"));
    assert!(errors[7].message.contains("must be 1 or more"));
}

#[test]
fn encoding_by_upstream_model_name() {
    for (model, expected) in [
        ("gpt-4o", TokenEncoding::O200kBase),
        ("gpt-4o-mini-2024-07-18", TokenEncoding::O200kBase),
        ("openai/gpt-4.1-mini", TokenEncoding::O200kBase),
        ("gpt-5-nano", TokenEncoding::O200kBase),
        ("o1", TokenEncoding::O200kBase),
        ("o3-mini", TokenEncoding::O200kBase),
        ("gpt-4", TokenEncoding::Cl100kBase),
        ("gpt-3.5-turbo", TokenEncoding::Cl100kBase),
        ("deepseek-chat", TokenEncoding::Cl100kBase),
        ("o1x", TokenEncoding::Cl100kBase),
        ("smollm2", TokenEncoding::Cl100kBase),
    ] {
        assert_eq!(TokenEncoding::for_model(model), expected, "{model}");
    }
    for name in TokenEncoding::NAMES {
        assert_eq!(TokenEncoding::from_name(name).unwrap().as_str(), *name);
    }
}

#[test]
fn usage_defined_twice_names_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    let b = dir.path().join("b.yaml");
    std::fs::write(
        &a,
        "providers: { p: { base_url: \"http://h/v1\" } }\nmodels: { m: { provider: p } }\nusage: { ledger: false }\n",
    )
    .unwrap();
    std::fs::write(&b, "usage:\n  batch_size: 2\n").unwrap();
    let errors = errors_of(Config::load_with_env(dir.path(), &no_env));
    assert_eq!(
        where_(&errors),
        [(
            b.display().to_string(),
            Some(1),
            Some(1),
            "usage".to_owned()
        )]
    );
    assert!(
        errors[0].message.contains(&format!("{}:3:1", a.display())),
        "{}",
        errors[0]
    );
}

// ---------------------------------------------------------------------------
// durations in seconds, bounds, queue_timeout, priority

/// (line, column, key path, message) of each error.
fn located(errors: &[ConfigError]) -> Vec<(u64, u64, &str, &str)> {
    errors
        .iter()
        .map(|e| {
            (
                e.line.unwrap(),
                e.column.unwrap(),
                e.key_path.as_str(),
                e.message.as_str(),
            )
        })
        .collect()
}

#[test]
fn durations_out_of_range_are_located_errors_not_panics() {
    let env = env_of(&[("INFINITE", "inf"), ("NOT_A_NUMBER", "NaN")]);
    let errors = errors_of(Config::load_with_env(fixture("durations.yaml"), &env));
    let day = "must be at most 86400 seconds (1 day), found";
    let expected: Vec<(u64, u64, &str, String)> = vec![
        (7, 60, "providers.p.key_cooldown", format!("{day} 1e30")),
        (11, 14, "models.m.timeout", format!("{day} 1e30")),
        (12, 22, "models.m.connect_timeout", format!("{day} 1e30")),
        (
            13,
            26,
            "models.m.first_token_timeout",
            "must be greater than 0, found -2".to_owned(),
        ),
        (14, 20, "models.m.chunk_timeout", format!("{day} 1.8e19")),
        (
            15,
            18,
            "models.m.retry_delay",
            format!("{day} 1.8446744073709552e19"),
        ),
        (
            16,
            19,
            "models.m.key_cooldown",
            "expected a finite number".to_owned(),
        ),
        (
            17,
            20,
            "models.m.queue_timeout",
            "expected a finite number".to_owned(),
        ),
        (
            18,
            39,
            "models.m.circuit_breaker.recovery_time",
            format!("{day} 1e30"),
        ),
        (
            18,
            53,
            "models.m.circuit_breaker.window",
            "must be greater than 0, found 0".to_owned(),
        ),
        (
            21,
            39,
            "task_groups.g.echelon1.timeout",
            format!("{day} 86401"),
        ),
        (
            22,
            37,
            "task_groups.g.fallback_config.retry_delay",
            "must be 0 or more, found -0.5".to_owned(),
        ),
        (
            24,
            54,
            "polling_pools.g_pool.health_check_interval",
            format!("{day} 1e30"),
        ),
        (
            24,
            75,
            "polling_pools.g_pool.recovery_time",
            format!("{day} 604801"),
        ),
    ];
    let expected: Vec<(u64, u64, &str, &str)> = expected
        .iter()
        .map(|(l, c, p, m)| (*l, *c, *p, m.as_str()))
        .collect();
    assert_eq!(located(&errors), expected);
    assert_eq!(
        errors[1].hint.as_deref(),
        Some("durations are written in seconds")
    );
    assert!(errors[1].to_string().starts_with(&format!(
        "{}:11:14: models.m.timeout: ",
        file("durations.yaml")
    )));
}

#[test]
fn durations_are_seconds_as_durations() {
    let text = "\
providers: { p: { base_url: \"http://h/v1\", key_cooldown: 0 } }
models:
  m: { provider: p, timeout: 0.5, retry_delay: 0, key_cooldown: 86400, chunk_timeout: 2 }
task_groups:
  g:
    echelon1: { models: [m], timeout: 1.25 }
    fallback_config: { retry_delay: 0.2, circuit_breaker: { recovery_time: 0, window: 30 } }
polling_pools:
  g_pool: { task_group: g, health_check_interval: 0.1, recovery_time: 0 }
";
    let config = Config::from_str_with_env(text, "d.yaml", &no_env).unwrap();
    assert_eq!(config.providers["p"].key_cooldown, Duration::ZERO);
    let m = &config.models["m"];
    assert_eq!(m.timeout, Duration::from_millis(500));
    assert_eq!(m.retry_delay, Duration::ZERO);
    assert_eq!(m.key_cooldown, Some(Duration::from_secs(86_400)));
    assert_eq!(m.chunk_timeout, Duration::from_secs(2));
    let g = &config.task_groups["g"];
    assert_eq!(g.echelons[0].timeout, Some(Duration::from_millis(1250)));
    let f = g.fallback_config.as_ref().unwrap();
    assert_eq!(f.retry_delay, Some(Duration::from_millis(200)));
    let b = f.circuit_breaker.as_ref().unwrap();
    assert_eq!((b.recovery_time, b.window), (Duration::ZERO, secs(30.0)));
    let pool = &config.polling_pools["g_pool"];
    assert_eq!(pool.health_check_interval, Duration::from_millis(100));
    assert_eq!(pool.recovery_time, Duration::ZERO);
}

#[test]
fn counts_and_limits_have_upper_bounds() {
    let errors = errors_of(Config::load_with_env(fixture("bounds.yaml"), &no_env));
    assert_eq!(
        located(&errors),
        [
            (
                2,
                29,
                "server.body_limit_bytes",
                "must be between 1 and 1073741824, found 99999999999"
            ),
            (
                8,
                18,
                "models.m.max_retries",
                "must be between 0 and 100, found 1000000"
            ),
            (
                9,
                16,
                "models.m.rpm_limit",
                "must be between 1 and 1000000000, found 5000000000"
            ),
            (10, 16, "models.m.tpm_limit", "must be 1 or more, found 0"),
            (
                11,
                24,
                "models.m.concurrency_limit",
                "must be between 1 and 1000000, found 10000000"
            ),
            (
                12,
                21,
                "models.m.context_window",
                "must be between 1 and 100000000, found 1000000000000"
            ),
            (
                13,
                26,
                "models.m.rate_limit_capacity",
                "must be at most 1000000000, found 1000000000000"
            ),
            (
                14,
                43,
                "models.m.circuit_breaker.failure_threshold",
                "must be between 1 and 1000000, found 99999999"
            ),
            (
                14,
                67,
                "models.m.circuit_breaker.min_requests",
                "must be 1 or more, found 0"
            ),
            (
                17,
                40,
                "task_groups.g.echelon1.priority",
                "must be 0 or more, found -1"
            ),
            (
                17,
                56,
                "task_groups.g.echelon1.max_tokens",
                "expected an integer, found a number"
            ),
            (
                18,
                38,
                "task_groups.g.fallback_config.max_attempts",
                "must be between 1 and 1000, found 100000"
            ),
            (
                23,
                19,
                "polling_pools.g_pool.weights.m",
                "must be between 1 and 1000000, found 99999999"
            ),
            (
                24,
                47,
                "polling_pools.g_pool.fallback_config.max_instance_attempts",
                "must be between 1 and 1000, found 5000"
            ),
            (
                25,
                41,
                "usage.queue_capacity",
                "must be between 1 and 10000000, found 100000000000"
            ),
            (
                25,
                74,
                "usage.flush_interval_ms",
                "must be between 1 and 3600000, found 99999999999"
            ),
        ]
    );
}

#[test]
fn queue_timeout_is_in_seconds_and_warns_when_it_looks_like_milliseconds() {
    let config = Config::load_with_env(fixture("queue_timeout.yaml"), &no_env).unwrap();
    let timeout = |m: &str| config.models[m].queue_timeout;
    assert_eq!(timeout("old_style"), Duration::from_secs(250));
    assert_eq!(timeout("seconds"), Duration::from_millis(250));
    assert_eq!(timeout("ten"), Duration::from_secs(10));
    assert_eq!(timeout("default"), Duration::from_millis(100));
    // One warning, for the value above 10 s, naming the change; 10 itself is fine.
    let f = file("queue_timeout.yaml");
    let shown: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [format!(
            "{f}:6:44: models.old_style.queue_timeout: `queue_timeout` is in seconds since \
             durations have one unit (it was milliseconds): 250 looks like milliseconds\n  \
             hint: for 250 ms write `queue_timeout: 0.25`"
        )]
    );
    // A warning is not an error, and a clean file has none.
    let env = env_of(&[("GOOD_PORT", "1"), ("GOOD_LOCAL_A_KEY", "k")]);
    let config = Config::load_with_env(fixture("good.yaml"), &env);
    assert!(config.unwrap().warnings.is_empty());
}

#[test]
fn echelons_are_tried_by_priority_then_number() {
    let config = Config::load_with_env(fixture("priority.yaml"), &no_env).unwrap();
    let order = |g: &str| -> Vec<(String, Option<u32>)> {
        config.task_groups[g]
            .echelons
            .iter()
            .map(|e| (e.name.clone(), e.priority))
            .collect()
    };
    let named = |pairs: &[(&str, Option<u32>)]| -> Vec<(String, Option<u32>)> {
        pairs.iter().map(|(n, p)| ((*n).to_owned(), *p)).collect()
    };
    // Lower first, ties (echelon3, echelon4) in number order, no priority last.
    assert_eq!(
        order("by_priority"),
        named(&[
            ("echelon3", Some(1)),
            ("echelon4", Some(1)),
            ("echelon2", Some(2)),
            ("echelon1", None),
        ])
    );
    assert_eq!(
        config.task_groups["by_priority"].echelons[0].models,
        ["c"],
        "each echelon keeps its own models"
    );
    assert_eq!(
        order("by_number"),
        named(&[("echelon1", None), ("echelon2", None)])
    );
    assert_eq!(
        order("seed_style"),
        named(&[("echelon1", Some(1)), ("echelon2", Some(2))])
    );
    // Routes still name echelons by their number.
    assert_eq!(config.wrappers["w"].target, "by_priority.echelon1");
}

#[test]
fn missing_required_keys_name_the_key_with_a_hint() {
    let text = "\
providers: { p: { api: openai } }
models:
  m: { provider: p, pricing: { cached_input_per_1m: 1 } }
  n: { model: x }
  o: { provider: ~ }
wrappers: { w: { fallback_groups: [m] } }
";
    let errors = errors_of(Config::from_str_with_env(text, "r.yaml", &no_env));
    let got: Vec<(u64, &str, &str, Option<&str>)> = errors
        .iter()
        .map(|e| {
            (
                e.line.unwrap(),
                e.key_path.as_str(),
                e.message.as_str(),
                e.hint.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                1,
                "providers.p",
                "missing required key `base_url`",
                Some("e.g. `base_url: \"http://127.0.0.1:8082/v1\"`")
            ),
            (
                3,
                "models.m.pricing",
                "missing required key `input_per_1m`",
                Some("e.g. `pricing: { input_per_1m: 0.15, output_per_1m: 0.60 }` (USD)")
            ),
            (
                4,
                "models.n",
                "missing required key `provider`",
                Some("name one of the `providers:` entries")
            ),
            (
                5,
                "models.o.provider",
                "`provider` needs a value",
                Some("name one of the `providers:` entries")
            ),
            (
                6,
                "wrappers.w",
                "missing required key `target`",
                Some("name the route tried first, e.g. `target: fast_group.echelon1`")
            ),
        ]
    );
}

/// `model_defaults:` is merged under each model of its file; a key the model writes
/// wins (issue 14: `max_retries: 0` had to be repeated on every model).
#[test]
fn model_defaults_apply_to_every_model_of_the_file() {
    let text = "providers:\n  p: { base_url: \"http://127.0.0.1:9/v1\" }\n\
model_defaults:\n  provider: p\n  max_retries: 0\n  timeout: 7\n  queue_timeout: 3000\n\
models:\n  a: {}\n  b: { max_retries: 4 }\n  c: { provider: p, timeout: 2 }\n";
    let config = Config::from_str_with_env(text, "d.yaml", &no_env).unwrap();
    let (a, b, c) = (
        &config.models["a"],
        &config.models["b"],
        &config.models["c"],
    );
    assert_eq!(
        (a.provider.as_str(), a.max_retries, a.timeout),
        ("p", 0, secs(7.0))
    );
    assert_eq!((b.max_retries, b.timeout), (4, secs(7.0)));
    assert_eq!((c.max_retries, c.timeout), (0, secs(2.0)));
    assert_eq!(
        a.model, "a",
        "the upstream name still defaults to the model id"
    );
    // The queue_timeout warning is about one place in the file: said once.
    assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
    assert_eq!(config.warnings[0].line, Some(7));
}

/// An error in `model_defaults:` is reported once, where it is written, not once per
/// model; `model` cannot be a default.
#[test]
fn model_defaults_errors_are_reported_once_where_written() {
    let text = "providers:\n  p: { base_url: \"http://127.0.0.1:9/v1\" }\n\
model_defaults:\n  timout: 7\n  model: x\n\
models:\n  a: { provider: p }\n  b: { provider: p }\n";
    let errors = errors_of(Config::from_str_with_env(text, "d.yaml", &no_env));
    assert_eq!(
        where_(&errors),
        [
            (
                "d.yaml".to_owned(),
                Some(4),
                Some(3),
                "model_defaults.timout".to_owned()
            ),
            (
                "d.yaml".to_owned(),
                Some(5),
                Some(3),
                "model_defaults.model".to_owned()
            ),
        ],
        "{errors:?}"
    );
    assert!(errors[0].hint.as_deref().unwrap_or("").contains("timeout"));
}

/// YAML's `.inf` and `.nan` are errors at their key, with the file's other errors
/// (they were the file's only error, with a position but no key path).
#[test]
fn non_finite_floats_are_errors_at_their_key() {
    let text = "providers:\n  p: { base_url: \"http://127.0.0.1:9/v1\" }\n\
models:\n  a: { provider: p, timeout: .inf, retry_budget: .nan }\n  b: { provider: p, timout: 1 }\n";
    let errors = errors_of(Config::from_str_with_env(text, "f.yaml", &no_env));
    let paths: Vec<&str> = errors.iter().map(|e| e.key_path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "models.a.timeout",
            "models.a.retry_budget",
            "models.b.timout"
        ],
        "{errors:?}"
    );
    assert!(errors[0].message.contains("finite"), "{errors:?}");
    assert_eq!((errors[0].line, errors[0].column), (Some(4), Some(30)));
}

/// A huge echelon number is read like any other: the "did you mean" candidates are the
/// keys written, not every number up to it (`echelon4000000000` ran out of memory).
#[test]
fn a_huge_echelon_number_does_not_build_a_candidate_per_number() {
    let text = "providers:\n  p: { base_url: \"http://127.0.0.1:9/v1\" }\n\
models:\n  m: { provider: p }\n\
task_groups:\n  g:\n    echelon4000000000: { models: [m] }\n    echelom1: { models: [m] }\n";
    let errors = errors_of(Config::from_str_with_env(text, "e.yaml", &no_env));
    let typo = errors
        .iter()
        .find(|e| e.key_path == "task_groups.g.echelom1")
        .unwrap_or_else(|| panic!("{errors:?}"));
    assert!(typo.hint.is_some(), "{typo:?}");
}

/// Issue 19: `stream_failure:` of a task group or wrapper, and a model's `prefill`.
#[test]
fn stream_failure_and_prefill_load_and_bad_values_name_their_place() {
    let yaml = r#"
providers:
  p: { base_url: "http://127.0.0.1:9/v1" }
models:
  a: { provider: p }
  b: { provider: p, prefill: true }
task_groups:
  g:
    echelon1: { models: [a] }
    echelon2: { models: [b] }
    stream_failure: { mode: continue, max_continuations: 2 }
wrappers:
  w: { target: g }
"#;
    let config = Config::from_str(yaml, "sf.yaml").unwrap();
    let sf = config.task_groups["g"].stream_failure.unwrap();
    assert_eq!(sf.mode, echelon::config::StreamFailureMode::Continue);
    assert_eq!(sf.max_continuations, 2);
    assert!(config.models["b"].prefill && !config.models["a"].prefill);
    assert_eq!(
        config.wrappers["w"].stream_failure, None,
        "kept from the target"
    );
    assert_eq!(
        echelon::config::StreamFailureConfig::default().mode,
        echelon::config::StreamFailureMode::Error,
        "the default stays today's contract"
    );

    let bad = yaml
        .replace("mode: continue", "mode: contineu")
        .replace("max_continuations: 2", "max_continuations: 0");
    let errors = errors_of(Config::from_str(&bad, "sf.yaml"));
    let at: Vec<&str> = errors.iter().map(|e| e.key_path.as_str()).collect();
    assert_eq!(
        at,
        [
            "task_groups.g.stream_failure.mode",
            "task_groups.g.stream_failure.max_continuations"
        ]
    );
    assert!(
        errors[0]
            .message
            .contains("unknown stream failure mode `contineu`"),
        "{}",
        errors[0].message
    );
    assert_eq!(errors[0].hint.as_deref(), Some("did you mean `continue`?"));
    assert!(errors[1].message.contains("1"), "{}", errors[1].message);
}

/// `retry_on` takes the retryable outcome names only (an unknown key is an error with a
/// "did you mean"), values 0 to 100; `rate_limit_wait` is 0 to 10 s; both on a model
/// and on an echelon; every bad value is reported in one load.
#[test]
fn retry_on_and_rate_limit_wait_are_checked() {
    let text = "providers:\n  p: { base_url: \"http://127.0.0.1:9/v1\" }\n\
models:\n  a: { provider: p, retry_on: { rate_limted: 1, timeout: 101 }, rate_limit_wait: 11 }\n\
task_groups:\n  g:\n    echelon1: { models: [a], retry_on: { first_token_timout: 0, auth: 1 }, rate_limit_wait: -1 }\n";
    let errors = errors_of(Config::from_str_with_env(text, "r.yaml", &no_env));
    let paths: Vec<&str> = errors.iter().map(|e| e.key_path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "models.a.retry_on.rate_limted",
            "models.a.retry_on.timeout",
            "models.a.rate_limit_wait",
            "task_groups.g.echelon1.retry_on.first_token_timout",
            "task_groups.g.echelon1.retry_on.auth",
            "task_groups.g.echelon1.rate_limit_wait",
        ],
        "{errors:?}"
    );
    assert_eq!(
        errors[0].hint.as_deref(),
        Some("did you mean `rate_limited`?"),
        "{errors:?}"
    );
    assert!(
        errors[1].message.contains("between 0 and 100"),
        "{errors:?}"
    );
    assert!(
        errors[2].message.contains("at most 10 seconds"),
        "{errors:?}"
    );
    assert!(
        errors[3]
            .message
            .contains("unknown key `first_token_timout`"),
        "{errors:?}"
    );
    assert_eq!(
        errors[3].hint.as_deref(),
        Some("did you mean `first_token_timeout`?"),
        "{errors:?}"
    );
    assert!(
        errors[4].message.contains("unknown key `auth`"),
        "{errors:?}"
    );

    // Every key, at its bounds.
    let text = "providers:\n  p: { base_url: \"http://127.0.0.1:9/v1\" }\n\
models:\n  a: { provider: p, timeout: 5, rate_limit_wait: 10, retry_on: { timeout: 0, first_token_timeout: 100, \
connect: 1, rate_limited: 2, server_error: 3, malformed: 4, stream_cut: 5 } }\n";
    let config = Config::from_str_with_env(text, "r.yaml", &no_env).unwrap();
    let a = &config.models["a"];
    assert_eq!(a.rate_limit_wait, secs(10.0));
    assert_eq!(
        a.effective_first_token_timeout(),
        secs(5.0),
        "the 20 s default, capped at timeout"
    );
    let written: Vec<Option<u32>> = RetryOn::KINDS.iter().map(|k| a.retries_on(*k)).collect();
    assert_eq!(
        written,
        [
            Some(0),
            Some(100),
            Some(1),
            Some(2),
            Some(3),
            Some(4),
            Some(5)
        ]
    );
}

// telemetry (issue 18)

/// `telemetry:` loads with its defaults, takes `${VAR}`, and reports a bad value at its
/// file, line and column.
#[test]
fn telemetry_section_loads_expands_and_reports_its_errors() {
    let base = "models:\n  m: { provider: p, model: x }\nproviders:\n  p: { base_url: \"http://127.0.0.1:1/v1\" }\n";
    let none = |_: &str| None;
    let off = Config::from_str_with_env(base, "t.yaml", &none).unwrap();
    assert!(!off.telemetry.enabled(), "off by default");
    assert_eq!(off.telemetry.service_name, "echelon");
    assert_eq!(off.telemetry.sample_ratio, 1.0);

    let env = env_of(&[("OTLP", "http://collector:4318/")]);
    let on = Config::from_str_with_env(
        &format!("{base}telemetry: {{ otlp_endpoint: \"${{OTLP}}\", service_name: gw, sample_ratio: 0.25 }}\n"),
        "t.yaml",
        &env,
    )
    .unwrap();
    assert_eq!(
        on.telemetry.otlp_endpoint.as_deref(),
        Some("http://collector:4318")
    );
    assert_eq!(
        on.telemetry.traces_url().as_deref(),
        Some("http://collector:4318/v1/traces")
    );
    assert_eq!(on.telemetry.service_name, "gw");
    assert_eq!(on.telemetry.sample_ratio, 0.25);

    for (bad, key, says) in [
        (
            "{ sample_ratio: 1.5 }",
            "telemetry.sample_ratio",
            "between 0 and 1",
        ),
        (
            "{ otlp_endpoint: \"grpc://c:4317\" }",
            "telemetry.otlp_endpoint",
            "OTLP/HTTP endpoint",
        ),
        (
            "{ service_name: \"\" }",
            "telemetry.service_name",
            "must not be empty",
        ),
        ("{ sample_rate: 0.5 }", "telemetry", "sample_ratio"),
    ] {
        let errors =
            Config::from_str_with_env(&format!("{base}telemetry: {bad}\n"), "t.yaml", &none)
                .unwrap_err();
        let e = errors.0.first().unwrap();
        assert_eq!(e.file, "t.yaml", "{e}");
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.column.is_some(), "{e}");
        assert!(e.key_path.starts_with(key), "{bad}: {e}");
        assert!(e.to_string().contains(says), "{bad}: {e}");
    }
}
