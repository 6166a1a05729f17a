//! Reading the sections of a configuration file: `server`, `providers.<id>`,
//! `models.<id>`, task groups (`task_groups.<name>` or a seed group file) and `usage`.

use std::path::{Path, PathBuf};

use super::env::EnvLookup;
use super::error::{did_you_mean, reference_hint};
use super::model::{
    CircuitBreakerConfig, EchelonConfig, FallbackConfig, FallbackStrategy, ModelConfig,
    PricingConfig, ProviderApi, ProviderConfig, ServerConfig, TaskGroupConfig, TokenEncoding,
    UsageConfig,
};
use super::node::{Kind, Node, Pos};
use super::read::{At, Bound, Ctx, MapView, bool_value, map};

/// Keys of the `server:` section.
pub(crate) const SERVER_KEYS: &[&str] = &[
    "host",
    "port",
    "api_keys",
    "body_limit_bytes",
    "log_bodies",
    "metrics",
];
/// Keys of a provider.
pub(crate) const PROVIDER_KEYS: &[&str] = &["base_url", "api_keys", "api", "key_cooldown"];
/// Keys of a model.
pub(crate) const MODEL_KEYS: &[&str] = &[
    "provider",
    "model",
    "base_url",
    "api_keys",
    "timeout",
    "connect_timeout",
    "first_token_timeout",
    "chunk_timeout",
    "max_retries",
    "retry_delay",
    "context_window",
    "rate_limit_capacity",
    "rate_limit_refill_rate",
    "rpm_limit",
    "tpm_limit",
    "concurrency_limit",
    "queue_timeout",
    "key_cooldown",
    "retry_budget",
    "circuit_breaker",
    "pricing",
    "encoding",
];
/// Keys of a model's `pricing:`.
pub(crate) const PRICING_KEYS: &[&str] = &["input_per_1m", "output_per_1m", "cached_input_per_1m"];
/// Keys of the `usage:` section.
pub(crate) const USAGE_KEYS: &[&str] = &[
    "ledger",
    "queue_capacity",
    "batch_size",
    "flush_interval_ms",
];
/// Keys of an echelon.
pub(crate) const ECHELON_KEYS: &[&str] = &[
    "models",
    "concurrency_limit",
    "rpm_limit",
    "priority",
    "timeout",
    "max_retries",
    "temperature",
    "max_tokens",
];
/// Keys of a task group besides `echelon<N>`.
pub(crate) const GROUP_KEYS: &[&str] = &["description", "name", "fallback_config"];
/// Keys of `fallback_config:`.
pub(crate) const FALLBACK_KEYS: &[&str] = &[
    "strategy",
    "fallback_groups",
    "max_attempts",
    "retry_delay",
    "circuit_breaker",
];
/// Keys of `circuit_breaker:`.
pub(crate) const BREAKER_KEYS: &[&str] = &[
    "failure_threshold",
    "recovery_time",
    "half_open_requests",
    "failure_rate",
    "window",
    "min_requests",
];

/// A reference to something defined elsewhere (a provider, a model, a route).
pub(crate) type Ref = At<String>;

/// The references of a task group, checked once every file is read.
#[derive(Default)]
pub(crate) struct GroupRefs {
    /// Every model named by an echelon.
    pub(crate) models: Vec<Ref>,
    /// Every `fallback_groups` entry.
    pub(crate) fallback_groups: Vec<Ref>,
}

/// Reads `server:`.
pub(crate) fn server(ctx: &mut Ctx, node: &Node, path: &str) -> ServerConfig {
    let mut server = ServerConfig::default();
    let Some(view) = map(ctx, node, path) else {
        return server;
    };
    view.check_keys(ctx, SERVER_KEYS);
    if let Some(host) = view.string(ctx, "host") {
        server.host = host;
    }
    if let Some(port) = view
        .int(ctx, "port", 0, i128::from(u16::MAX))
        .and_then(|p| u16::try_from(p).ok())
    {
        server.port = port;
    }
    if let Some(keys) = view.secret_list(ctx, "api_keys") {
        server.api_keys = keys;
    }
    if let Some(limit) = view
        .int(ctx, "body_limit_bytes", 1, i128::from(u64::MAX))
        .and_then(|l| usize::try_from(l).ok())
    {
        server.body_limit_bytes = limit;
    }
    if let Some(metrics) = view.bool(ctx, "metrics") {
        server.metrics = metrics;
    }
    if let Some(log_bodies) = view.bool(ctx, "log_bodies") {
        server.log_bodies = log_bodies;
    }
    server
}

/// Checks and normalises a URL: `http://` or `https://` plus a host, no spaces;
/// trailing slashes removed.
pub(crate) fn base_url(ctx: &mut Ctx, url: At<String>) -> Option<String> {
    let trimmed = url.value.trim();
    let rest = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"));
    match rest {
        Some(rest)
            if !rest.is_empty()
                && !rest.starts_with('/')
                && !trimmed.contains(char::is_whitespace) =>
        {
            Some(trimmed.trim_end_matches('/').to_owned())
        }
        Some(_) => {
            ctx.error(
                url.pos,
                &url.path,
                "`base_url` needs a host after the scheme and no spaces",
                Some("e.g. `http://127.0.0.1:8082/v1`".to_owned()),
            );
            None
        }
        None => {
            ctx.error(
                url.pos,
                &url.path,
                "`base_url` must start with `http://` or `https://`",
                Some("e.g. `https://api.openai.com/v1`".to_owned()),
            );
            None
        }
    }
}

/// Reads one provider (`providers.<id>:`).
pub(crate) fn provider(ctx: &mut Ctx, node: &Node, path: &str) -> ProviderConfig {
    let mut provider = ProviderConfig {
        base_url: String::new(),
        api_keys: Vec::new(),
        api: ProviderApi::default(),
        key_cooldown: ProviderConfig::DEFAULT_KEY_COOLDOWN,
    };
    let Some(view) = map(ctx, node, path) else {
        return provider;
    };
    view.check_keys(ctx, PROVIDER_KEYS);
    match view.string_at(ctx, "base_url") {
        Some(url) => {
            if let Some(url) = base_url(ctx, url) {
                provider.base_url = url;
            }
        }
        None if view.value("base_url").is_none() => view.missing(
            ctx,
            "base_url",
            Some("e.g. `base_url: \"http://127.0.0.1:8082/v1\"`".to_owned()),
        ),
        None => {}
    }
    if let Some(keys) = view.secret_list(ctx, "api_keys") {
        provider.api_keys = keys;
    }
    if let Some(v) = view.f64(ctx, "key_cooldown", Bound::NonNegative) {
        provider.key_cooldown = v;
    }
    if let Some(api) = view.string_at(ctx, "api") {
        match api.value.as_str() {
            "openai" => provider.api = ProviderApi::OpenAi,
            other => ctx.error(
                api.pos,
                &api.path,
                format!("unknown provider api `{other}`"),
                Some(
                    did_you_mean(other, ProviderApi::NAMES.iter().copied())
                        .unwrap_or_else(|| format!("supported: {}", ProviderApi::NAMES.join(", "))),
                ),
            ),
        }
    }
    provider
}

/// Reads the fields of one model from `view` (whose keys the caller has checked).
/// `provider` is given by the seed format; otherwise the `provider` key is required.
/// Returns the model and the reference to its provider.
pub(crate) fn model_fields(
    ctx: &mut Ctx,
    view: &MapView<'_>,
    id: &str,
    provider: Option<&str>,
) -> (ModelConfig, Option<Ref>) {
    let mut provider_ref = None;
    let provider_id = match provider {
        Some(p) => p.to_owned(),
        None => match view.string_at(ctx, "provider") {
            Some(p) => {
                let id = p.value.clone();
                provider_ref = Some(p);
                id
            }
            None => {
                if view.value("provider").is_none() {
                    view.missing(
                        ctx,
                        "provider",
                        Some("name one of the `providers:` entries".to_owned()),
                    );
                }
                String::new()
            }
        },
    };
    let upstream = view.string(ctx, "model").unwrap_or_else(|| id.to_owned());
    let mut model = ModelConfig::new(provider_id, upstream);
    model.base_url = view
        .string_at(ctx, "base_url")
        .and_then(|url| base_url(ctx, url));
    model.api_keys = view
        .secret_list(ctx, "api_keys")
        .filter(|keys| !keys.is_empty());
    if let Some(v) = view.f64(ctx, "timeout", Bound::Positive) {
        model.timeout = v;
    }
    if let Some(v) = view.f64(ctx, "connect_timeout", Bound::Positive) {
        model.connect_timeout = v;
    }
    model.first_token_timeout = view.f64(ctx, "first_token_timeout", Bound::Positive);
    if let Some(v) = view.f64(ctx, "chunk_timeout", Bound::Positive) {
        model.chunk_timeout = v;
    }
    if let Some(v) = view.u32(ctx, "max_retries", 0) {
        model.max_retries = v;
    }
    if let Some(v) = view.f64(ctx, "retry_delay", Bound::NonNegative) {
        model.retry_delay = v;
    }
    model.context_window = view.u32(ctx, "context_window", 1);
    model.rate_limit_capacity = view.f64(ctx, "rate_limit_capacity", Bound::Positive);
    model.rate_limit_refill_rate = view.f64(ctx, "rate_limit_refill_rate", Bound::Positive);
    model.rpm_limit = view.u32(ctx, "rpm_limit", 1);
    model.tpm_limit = view.u32(ctx, "tpm_limit", 1);
    model.concurrency_limit = view.u32(ctx, "concurrency_limit", 1);
    if let Some(v) = view.u32(ctx, "queue_timeout", 0) {
        model.queue_timeout_ms = u64::from(v);
    }
    model.key_cooldown = view.f64(ctx, "key_cooldown", Bound::NonNegative);
    if let Some(v) = view.f64(ctx, "retry_budget", Bound::NonNegative) {
        if v > 1.0 {
            ctx.error(
                view.pos_of("retry_budget"),
                &view.path_of("retry_budget"),
                format!("must be between 0 and 1, got {v}"),
                Some("a share of extra load: 0.2 means retries add at most 20%".to_owned()),
            );
        }
        model.retry_budget = v;
    }
    if let Some(b) = breaker(ctx, view) {
        model.circuit_breaker = b;
    }
    model.pricing = pricing(ctx, view);
    if let Some(encoding) = view.string_at(ctx, "encoding") {
        match TokenEncoding::from_name(&encoding.value) {
            Some(e) => model.encoding = Some(e),
            None => ctx.error(
                encoding.pos,
                &encoding.path,
                format!("unknown encoding `{}`", encoding.value),
                Some(
                    did_you_mean(&encoding.value, TokenEncoding::NAMES.iter().copied())
                        .unwrap_or_else(|| {
                            format!("supported: {}", TokenEncoding::NAMES.join(", "))
                        }),
                ),
            ),
        }
    }
    (model, provider_ref)
}

/// Reads a model's `pricing:` (USD per 1M tokens); `None` when absent or wrong.
fn pricing(ctx: &mut Ctx, view: &MapView<'_>) -> Option<PricingConfig> {
    let node = view.value("pricing")?;
    let path = view.path_of("pricing");
    let p = map(ctx, node, &path)?;
    p.check_keys(ctx, PRICING_KEYS);
    let hint =
        || Some("e.g. `pricing: { input_per_1m: 0.15, output_per_1m: 0.60 }` (USD)".to_owned());
    let input = p.f64(ctx, "input_per_1m", Bound::NonNegative);
    if p.value("input_per_1m").is_none() {
        p.missing(ctx, "input_per_1m", hint());
    }
    let output = p.f64(ctx, "output_per_1m", Bound::NonNegative);
    if p.value("output_per_1m").is_none() {
        p.missing(ctx, "output_per_1m", hint());
    }
    let cached_input_per_1m = p.f64(ctx, "cached_input_per_1m", Bound::NonNegative);
    Some(PricingConfig {
        input_per_1m: input?,
        output_per_1m: output?,
        cached_input_per_1m,
    })
}

/// Reads `usage:`. `env` resolves the default ledger path (and `~/` in a path);
/// a relative path is taken relative to the directory of the file being read.
pub(crate) fn usage(ctx: &mut Ctx, node: &Node, path: &str, env: EnvLookup<'_>) -> UsageConfig {
    let mut usage = UsageConfig::with_ledger_path(UsageConfig::default_ledger_path_with_env(env));
    let Some(view) = map(ctx, node, path) else {
        return usage;
    };
    view.check_keys(ctx, USAGE_KEYS);
    if let Some(ledger) = view.value("ledger") {
        let ledger_path = view.path_of("ledger");
        let hint = || {
            Some(
                "a file path (`ledger: /var/lib/echelon/ledger.db`), or `false` to turn \
                 the ledger off"
                    .to_owned(),
            )
        };
        match (&ledger.kind, bool_value(ledger)) {
            (_, Some(false)) => usage.ledger_path = None,
            (_, Some(true)) => {}
            (Kind::Str { value, .. }, None) if !value.trim().is_empty() => {
                usage.ledger_path = Some(ledger_file(value.trim(), &ctx.file, env));
            }
            (Kind::Str { .. }, None) => {
                ctx.error(ledger.pos, &ledger_path, "`ledger` is empty", hint());
            }
            _ => ctx.error(
                ledger.pos,
                &ledger_path,
                format!("expected a path or `false`, found {}", ledger.type_name()),
                hint(),
            ),
        }
    }
    let max = i128::from(u32::MAX);
    if let Some(v) = view
        .int(ctx, "queue_capacity", 1, max)
        .and_then(|v| usize::try_from(v).ok())
    {
        usage.queue_capacity = v;
    }
    if let Some(v) = view
        .int(ctx, "batch_size", 1, max)
        .and_then(|v| usize::try_from(v).ok())
    {
        usage.batch_size = v;
    }
    if let Some(v) = view
        .int(ctx, "flush_interval_ms", 1, max)
        .and_then(|v| u64::try_from(v).ok())
    {
        usage.flush_interval_ms = v;
    }
    usage
}

/// The ledger file `written` in the file `config_file`: `~/…` is under `$HOME`, a
/// relative path is relative to the configuration file's directory.
fn ledger_file(written: &str, config_file: &str, env: EnvLookup<'_>) -> PathBuf {
    if let Some(rest) = written.strip_prefix("~/")
        && let Some(home) = env("HOME").filter(|h| !h.is_empty())
    {
        return Path::new(&home).join(rest);
    }
    let path = Path::new(written);
    if path.is_absolute() {
        return path.to_path_buf();
    }
    match Path::new(config_file).parent() {
        Some(dir) => dir.join(path),
        None => path.to_path_buf(),
    }
}

/// Reads one model (`models.<id>:`).
pub(crate) fn model(
    ctx: &mut Ctx,
    node: &Node,
    id: &str,
    path: &str,
) -> (ModelConfig, Option<Ref>) {
    match map(ctx, node, path) {
        Some(view) => {
            view.check_keys(ctx, MODEL_KEYS);
            model_fields(ctx, &view, id, None)
        }
        None => (ModelConfig::new(String::new(), id), None),
    }
}

/// The number of an `echelon<N>` key: `Some(N)` for `echelon1`, `echelon2`, … (no
/// sign, no leading zero; `echelon0` gives `Some(0)`, which the caller rejects).
pub(crate) fn echelon_number(key: &str) -> Option<u32> {
    let digits = key.strip_prefix("echelon")?;
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

/// Reads the `name:` key of a task group or polling pool (`what`); when `check` holds,
/// reports one that differs from `name`, the name it is known by (its map key, or its
/// file's stem).
pub(crate) fn check_name_key(
    ctx: &mut Ctx,
    view: &MapView<'_>,
    name: &str,
    what: &str,
    check: bool,
) {
    if let Some(given) = view.string_at(ctx, "name")
        && check
        && given.value != name
    {
        ctx.error(
            given.pos,
            &given.path,
            format!("`name` is `{}` but the {what} is `{name}`", given.value),
            Some(format!("remove `name` or make it `{name}`")),
        );
    }
}

/// Reads a task group from the mapping `view`. `name` is the group's name (the map
/// key, or the file's `name:`); `key_pos` is where it is written. When `check_name`
/// holds, a `name:` key must equal `name`.
pub(crate) fn task_group(
    ctx: &mut Ctx,
    view: &MapView<'_>,
    name: &str,
    key_pos: Pos,
    check_name: bool,
) -> (TaskGroupConfig, GroupRefs) {
    let mut refs = GroupRefs::default();
    let mut numbered: Vec<(u32, Pos, String)> = view
        .entries
        .iter()
        .filter_map(|e| echelon_number(&e.key).map(|n| (n, e.key_pos, e.key.clone())))
        .collect();
    let next = numbered
        .iter()
        .map(|(n, _, _)| *n)
        .max()
        .unwrap_or(0)
        .saturating_add(1);
    let candidates: Vec<String> = GROUP_KEYS
        .iter()
        .map(|k| (*k).to_owned())
        .chain((1..=next).map(|n| format!("echelon{n}")))
        .collect();
    for entry in view.entries {
        let key = entry.key.as_str();
        if GROUP_KEYS.contains(&key) {
            continue;
        }
        match echelon_number(key) {
            Some(0) => ctx.error(
                entry.key_pos,
                &view.path_of(key),
                "echelon numbers start at 1",
                Some("rename it `echelon1`".to_owned()),
            ),
            Some(_) => {}
            None => ctx.error(
                entry.key_pos,
                &view.path_of(key),
                format!("unknown key `{key}`"),
                Some(
                    did_you_mean(key, candidates.iter().map(String::as_str)).unwrap_or_else(|| {
                        "a task group has `echelon1`, `echelon2`, …, `description`, `name` \
                         and `fallback_config`"
                            .to_owned()
                    }),
                ),
            ),
        }
    }
    numbered.retain(|(n, _, _)| *n > 0);
    numbered.sort_by_key(|(n, _, _)| *n);
    let mut expected = 1u32;
    for (n, pos, key) in &numbered {
        if *n != expected {
            ctx.error(
                *pos,
                &view.path_of(key),
                format!(
                    "echelon numbers must be contiguous from 1: `{key}` comes after {}",
                    if expected == 1 {
                        "nothing".to_owned()
                    } else {
                        format!("`echelon{}`", expected - 1)
                    }
                ),
                Some(format!("rename it `echelon{expected}`")),
            );
        }
        expected = n.saturating_add(1);
    }

    check_name_key(ctx, view, name, "group", check_name);
    let description = view.string(ctx, "description");

    let mut echelons = Vec::new();
    for (_, _, key) in &numbered {
        let Some(entry) = view.get(key) else { continue };
        let (echelon, models) = echelon(ctx, &entry.value, key, &view.path_of(key));
        refs.models.extend(models);
        echelons.push(echelon);
    }
    if numbered.is_empty() {
        ctx.error(
            key_pos,
            &view.path,
            format!("task group `{name}` has no echelons"),
            Some("add `echelon1: { models: [some-model] }`".to_owned()),
        );
    }

    let fallback_config = view.value("fallback_config").and_then(|node| {
        let path = view.path_of("fallback_config");
        fallback(ctx, node, &path, &mut refs)
    });

    (
        TaskGroupConfig {
            description,
            echelons,
            fallback_config,
        },
        refs,
    )
}

fn echelon(ctx: &mut Ctx, node: &Node, name: &str, path: &str) -> (EchelonConfig, Vec<Ref>) {
    let mut echelon = EchelonConfig {
        name: name.to_owned(),
        models: Vec::new(),
        concurrency_limit: None,
        rpm_limit: None,
        priority: None,
        timeout: None,
        max_retries: None,
        temperature: None,
        max_tokens: None,
    };
    let Some(view) = map(ctx, node, path) else {
        return (echelon, Vec::new());
    };
    view.check_keys(ctx, ECHELON_KEYS);
    let models = view.string_list(ctx, "models");
    let models_failed = models.is_none() && view.value("models").is_some();
    let models = models.unwrap_or_default();
    if models.is_empty() && !models_failed {
        let (pos, path) = match view.get("models") {
            Some(entry) => (entry.key_pos, view.path_of("models")),
            None => (view.pos, view.path.clone()),
        };
        ctx.error(
            pos,
            &path,
            format!("echelon `{name}` has no models"),
            Some("add `models: [some-model]`".to_owned()),
        );
    }
    echelon.models = models.iter().map(|m| m.value.clone()).collect();
    echelon.concurrency_limit = view.u32(ctx, "concurrency_limit", 1);
    echelon.rpm_limit = view.u32(ctx, "rpm_limit", 1);
    echelon.priority = view.u32(ctx, "priority", 0);
    echelon.timeout = view.f64(ctx, "timeout", Bound::Positive);
    echelon.max_retries = view.u32(ctx, "max_retries", 0);
    echelon.temperature = view.f64(ctx, "temperature", Bound::NonNegative);
    echelon.max_tokens = view.u32(ctx, "max_tokens", 1);
    (echelon, models)
}

/// Reads a task group's `fallback_config:` (also the top level of a seed global
/// fallback file), adding its `fallback_groups` to `refs`.
pub(crate) fn fallback(
    ctx: &mut Ctx,
    node: &Node,
    path: &str,
    refs: &mut GroupRefs,
) -> Option<FallbackConfig> {
    let view = map(ctx, node, path)?;
    view.check_keys(ctx, FALLBACK_KEYS);
    let mut config = FallbackConfig::default();
    if let Some(strategy) = view.string_at(ctx, "strategy") {
        match FallbackStrategy::from_name(&strategy.value) {
            Some(s) => config.strategy = s,
            None => ctx.error(
                strategy.pos,
                &strategy.path,
                format!("unknown fallback strategy `{}`", strategy.value),
                Some(reference_hint(
                    &strategy.value,
                    "strategies",
                    FallbackStrategy::NAMES.iter().copied(),
                )),
            ),
        }
    }
    let groups = view.string_list(ctx, "fallback_groups").unwrap_or_default();
    config.fallback_groups = groups.iter().map(|g| g.value.clone()).collect();
    refs.fallback_groups.extend(groups);
    config.max_attempts = view.u32(ctx, "max_attempts", 1);
    config.retry_delay = view.f64(ctx, "retry_delay", Bound::NonNegative);
    config.circuit_breaker = breaker(ctx, &view);
    Some(config)
}

/// Reads `circuit_breaker:` of `view`, when present (seed 001).
fn breaker(ctx: &mut Ctx, view: &MapView<'_>) -> Option<CircuitBreakerConfig> {
    let node = view.value("circuit_breaker")?;
    let path = view.path_of("circuit_breaker");
    let b = map(ctx, node, &path)?;
    b.check_keys(ctx, BREAKER_KEYS);
    let mut breaker = CircuitBreakerConfig::default();
    if let Some(v) = b.u32(ctx, "failure_threshold", 1) {
        breaker.failure_threshold = v;
    }
    if let Some(v) = b.f64(ctx, "recovery_time", Bound::NonNegative) {
        breaker.recovery_time = v;
    }
    if let Some(v) = b.u32(ctx, "half_open_requests", 1) {
        breaker.half_open_requests = v;
    }
    if let Some(v) = b.f64(ctx, "failure_rate", Bound::Positive) {
        if v > 1.0 {
            ctx.error(
                b.pos_of("failure_rate"),
                &b.path_of("failure_rate"),
                format!("must be a share between 0 and 1, got {v}"),
                Some("0.5 opens the breaker when half the requests fail".to_owned()),
            );
        }
        breaker.failure_rate = Some(v);
    }
    if let Some(v) = b.f64(ctx, "window", Bound::Positive) {
        breaker.window = v;
    }
    if let Some(v) = b.u32(ctx, "min_requests", 1) {
        breaker.min_requests = v;
    }
    Some(breaker)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echelon_numbers() {
        assert_eq!(echelon_number("echelon1"), Some(1));
        assert_eq!(echelon_number("echelon12"), Some(12));
        assert_eq!(echelon_number("echelon0"), Some(0));
        assert_eq!(echelon_number("echelon01"), None);
        assert_eq!(echelon_number("echelon"), None);
        assert_eq!(echelon_number("echelon_1"), None);
        assert_eq!(echelon_number("echelon+1"), None);
    }
}
