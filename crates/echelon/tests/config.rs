//! Integration tests of `echelon::config`: fixture files under
//! `tests/fixtures/config/`, loaded through the public API.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use echelon::config::{
    CircuitBreakerConfig, Config, ConfigError, ConfigErrors, FallbackStrategy, ProviderApi,
};
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
    assert_eq!(m.timeout, 30.0);
    assert_eq!(m.connect_timeout, 2.5);
    assert_eq!(m.first_token_timeout, Some(10.0));
    assert_eq!(m.chunk_timeout, 15.0);
    assert_eq!(m.max_retries, 1);
    assert_eq!(m.retry_delay, 0.5);
    assert_eq!(m.context_window, Some(2048));
    assert_eq!(m.rpm_limit, Some(600));
    assert_eq!(m.tpm_limit, Some(100_000));
    assert_eq!(m.concurrency_limit, Some(8));
    assert_eq!(m.rate_limit_capacity, None);

    let m = &config.models["smollm-b"];
    assert_eq!(m.model, "smollm-b", "upstream name defaults to the id");
    assert_eq!(m.base_url.as_deref(), Some("https://b.example/v1"));
    assert_eq!(keys(m.api_keys.as_deref().unwrap()), ["key-b1"]);
    assert_eq!(m.timeout, 60.0);
    assert_eq!(m.connect_timeout, 5.0);
    assert_eq!(m.first_token_timeout, None);
    assert_eq!(m.chunk_timeout, 30.0);
    assert_eq!(m.max_retries, 2);
    assert_eq!(m.retry_delay, 1.0);
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
    assert_eq!(e1.temperature, Some(0.7));
    assert_eq!(e1.max_tokens, Some(2000));
    assert_eq!(g.echelons[1].models, ["smollm-b"]);
    assert_eq!(g.echelons[1].timeout, Some(20.0));
    let f = g.fallback_config.as_ref().unwrap();
    assert_eq!(f.strategy, FallbackStrategy::TaskGroupSwitch);
    assert_eq!(f.fallback_groups, ["backup_group", "demo_group.echelon2"]);
    assert_eq!(f.max_attempts, Some(3));
    assert_eq!(f.retry_delay, Some(1.0));
    assert_eq!(
        f.circuit_breaker,
        Some(CircuitBreakerConfig {
            failure_threshold: 5,
            recovery_time: 60.0,
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
    assert_eq!(tiny.timeout, 12.5);
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
    assert_eq!(gpt35.retry_delay, 1.0);
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

#[test]
fn provider_env_var_overrides_file_keys() {
    let env = env_of(&[("OPENAI_API_KEY", "env-1, env-2")]);
    let config = Config::load_with_env(fixture("provider.json"), &env).unwrap();
    assert_eq!(
        keys(&config.providers["openai"].api_keys),
        ["env-1", "env-2"]
    );
    // The env var beats the per-model keys of that provider too (seed 000 order) …
    assert!(config.models["openai/gpt-3.5-turbo"].api_keys.is_none());
    assert!(config.models["openai/gpt-4"].api_keys.is_none());
    // … and leaves other providers alone.
    assert_eq!(
        keys(&config.providers["deepseek"].api_keys),
        ["your-deepseek-key"]
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
    assert_eq!(e1.timeout, Some(30.0));
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
                "`nowhere` is not a task group, `group.echelonN` or model"
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
fn polling_pool_files_are_rejected_not_ignored() {
    let text = "name: fast_pool\ntask_groups: [fast_group]\nrotation_strategy: round_robin\n";
    let errors = errors_of(Config::from_str_with_env(text, "pool.yaml", &no_env));
    let messages: Vec<&str> = errors.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "polling pool files are not supported yet",
            "no models are defined"
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
    assert_eq!(config.models["m"].timeout, 7.5);
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
