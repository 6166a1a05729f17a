//! API keys and their short public ids.

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// An upstream API key with the short id that stands for it in logs, errors and metrics.
///
/// The id is the first 4 bytes of the key's SHA-256, in hex (DESIGN.md §4 "Secrets"):
/// stable across restarts and replicas, and useless for recovering the key.
#[derive(Clone)]
pub struct ApiKey {
    secret: SecretString,
    id: String,
}

impl ApiKey {
    /// Wraps a key and computes its id.
    pub fn new(secret: SecretString) -> Self {
        let id = key_id(secret.expose_secret());
        ApiKey { secret, id }
    }

    /// The short id, e.g. `9f86d081`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        self.secret.expose_secret()
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey({})", self.id)
    }
}

/// The short id of a key: hex of the first 4 bytes of its SHA-256.
pub fn key_id(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_sha256_prefix_and_debug_hides_the_key() {
        // sha256("test") = 9f86d081884c7d65...
        let k = ApiKey::new(SecretString::from("test"));
        assert_eq!(k.id(), "9f86d081");
        assert_eq!(format!("{k:?}"), "ApiKey(9f86d081)");
    }
}
