//! `config_loader`: any bytes, read as a YAML and as a JSON configuration, load to a
//! [`Config`] or to errors that name where they are; never a panic.

use echelon::config::Config;

/// The environment the fuzzed configurations see: a few of the examples' variables are
/// set, names containing `MISSING` are unset, and any other name is set to itself in
/// lower case (so `${VAR}` substitution, defaults and missing variables are all reached).
fn fuzz_env(name: &str) -> Option<String> {
    match name {
        "ECHELON_KEY" => Some(String::new()),
        "PORT" => Some("4000".to_owned()),
        "LOCAL_A_URL" => Some("http://127.0.0.1:8082/v1".to_owned()),
        _ if name.contains("MISSING") => None,
        _ => Some(name.to_ascii_lowercase()),
    }
}

/// Loads `data` (lossily decoded as UTF-8) as `fuzz.yaml` and as `fuzz.json`.
///
/// # Panics
/// When the loader panics, or when it fails without naming a single error.
pub fn check(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for origin in ["fuzz.yaml", "fuzz.json"] {
        match Config::from_str_with_env(&text, origin, &fuzz_env) {
            Ok(config) => assert!(
                !config.models.is_empty(),
                "{origin}: a configuration loaded without a model"
            ),
            Err(errors) => assert!(
                !errors.0.is_empty() && !errors.to_string().is_empty(),
                "{origin}: a load failed without naming an error"
            ),
        }
    }
}
