//! The `Host` check: a request is served only when it names this gateway, so that a web
//! page cannot reach it through DNS rebinding (a name of the attacker's that resolves to
//! 127.0.0.1 makes the browser send `Host: evil.example:4000`).
//!
//! Accepted, with the listening port (a `Host` without a port means port 80):
//! - the local address the connection came in on (`192.168.1.5:4000` on a server bound
//!   to `0.0.0.0`, `127.0.0.1:4000` on loopback);
//! - when that address is a loopback one, `localhost`, `127.0.0.1` (any loopback IPv4)
//!   and `[::1]`;
//! - every `server.allowed_hosts` entry: `host` (any port) or `host:port`; `"*"` turns
//!   the check off.
//!
//! The local address comes from the accept loop ([`LocalAddr`], set by
//! [`serve`](crate::serve)). A router served some other way has none: then the loopback
//! names are accepted with any port, besides `allowed_hosts`.

use std::net::{IpAddr, SocketAddr};

use axum::extract::Request;

use crate::error::ApiError;

/// The local address of the connection a request came in on (a request extension).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LocalAddr(pub(crate) SocketAddr);

/// The `Host` values accepted besides the connection's own address.
#[derive(Debug, Default)]
pub(crate) struct AllowedHosts {
    /// `"*"` was listed: no check.
    any: bool,
    /// `(host, port)`, host lower-cased without brackets; no port means any.
    entries: Vec<(String, Option<u16>)>,
}

impl AllowedHosts {
    /// From the `server.allowed_hosts` entries; an entry that is not `host[:port]` is
    /// kept as a host name that will never match a well-formed `Host`.
    pub(crate) fn new(entries: &[String]) -> Self {
        let mut hosts = AllowedHosts::default();
        for e in entries {
            let e = e.trim();
            if e == "*" {
                hosts.any = true;
            } else if let Some((host, port)) = split_host_port(e) {
                hosts.entries.push((host, port));
            } else {
                hosts.entries.push((e.to_ascii_lowercase(), None));
            }
        }
        hosts
    }

    /// Whether a request whose `Host` is `host` may be served on a connection whose local
    /// address is `local` (`None`: unknown).
    pub(crate) fn allows(&self, host: Option<&str>, local: Option<SocketAddr>) -> bool {
        if self.any {
            return true;
        }
        let Some((name, port)) = host.and_then(split_host_port) else {
            return false;
        };
        let listed = self
            .entries
            .iter()
            .any(|(h, p)| *h == name && p.is_none_or(|p| port.unwrap_or(80) == p));
        listed || names_local(&name, port, local)
    }
}

/// Whether `name:port` is the local address itself, or a loopback name when that is
/// loopback; with `local` unknown, whether it is a loopback name (any port).
fn names_local(name: &str, port: Option<u16>, local: Option<SocketAddr>) -> bool {
    let ip = name.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
    let loopback_name = name == "localhost" || ip.is_some_and(|ip| ip.is_loopback());
    let Some(local) = local else {
        return loopback_name;
    };
    if port.unwrap_or(80) != local.port() {
        return false;
    }
    let local_ip = local.ip().to_canonical();
    ip == Some(local_ip) || (local_ip.is_loopback() && loopback_name)
}

/// `host[:port]` (IPv6 in brackets) as the host lower-cased, brackets and one trailing
/// dot removed, and the port; `None` when it is not that shape.
fn split_host_port(value: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (v6, port)
    } else {
        match value.rsplit_once(':') {
            // A bare IPv6 address has colons but no brackets: not a `Host` value.
            Some((h, _)) if h.contains(':') => return None,
            Some((h, p)) => (h, Some(p)),
            None => (value, None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok()?),
        None => None,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/' || c == '@') {
        return None;
    }
    Some((host.to_ascii_lowercase(), port))
}

/// Checks `req`'s `Host` (or HTTP/2 `:authority`) against `hosts` and the local address
/// of its connection (see the module docs).
///
/// # Errors
/// 403 `host_not_allowed`, naming `server.allowed_hosts`.
pub(crate) fn check(hosts: &AllowedHosts, req: &Request) -> Result<(), ApiError> {
    let local = req.extensions().get::<LocalAddr>().map(|l| l.0);
    let host = req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
    });
    if hosts.allows(host, local) {
        Ok(())
    } else {
        Err(ApiError::host_not_allowed(host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Option<SocketAddr> {
        s.parse().ok()
    }

    #[test]
    fn the_listening_address_and_loopback_names_with_its_port() {
        let none = AllowedHosts::new(&[]);
        let lo = at("127.0.0.1:4000");
        for ok in [
            "127.0.0.1:4000",
            "localhost:4000",
            "LOCALHOST:4000",
            "localhost.:4000",
            "[::1]:4000",
        ] {
            assert!(none.allows(Some(ok), lo), "{ok}");
        }
        for bad in [
            "127.0.0.1:4001",
            "localhost",
            "evil.example:4000",
            "evil.example",
            "127.0.0.1:4000@evil",
            "::1",
            "",
        ] {
            assert!(!none.allows(Some(bad), lo), "{bad}");
        }
        assert!(!none.allows(None, lo), "no Host at all");

        // Bound to 0.0.0.0, a connection that came in on 192.168.1.5.
        let lan = at("192.168.1.5:4000");
        assert!(none.allows(Some("192.168.1.5:4000"), lan));
        assert!(!none.allows(Some("localhost:4000"), lan));
        assert!(!none.allows(Some("gw.lan:4000"), lan));
        // An IPv4 connection on a dual-stack `[::]` listener.
        assert!(none.allows(Some("127.0.0.1:4000"), at("[::ffff:127.0.0.1]:4000")));
        // Port 80 may be left out.
        assert!(none.allows(Some("localhost"), at("127.0.0.1:80")));
    }

    #[test]
    fn configured_hosts_with_or_without_port_and_the_wildcard() {
        let hosts = AllowedHosts::new(&["gw.lan".into(), "proxy.internal:8443".into()]);
        let lan = at("10.0.0.2:4000");
        assert!(hosts.allows(Some("gw.lan:4000"), lan));
        assert!(hosts.allows(Some("GW.lan:1234"), lan));
        assert!(hosts.allows(Some("proxy.internal:8443"), lan));
        assert!(!hosts.allows(Some("proxy.internal:4000"), lan));
        assert!(!hosts.allows(Some("other.lan:4000"), lan));
        let any = AllowedHosts::new(&["*".into()]);
        assert!(any.allows(Some("whatever:1"), lan));
        assert!(any.allows(None, lan));
    }

    #[test]
    fn without_a_known_local_address_only_loopback_names() {
        let none = AllowedHosts::new(&[]);
        assert!(none.allows(Some("127.0.0.1:9999"), None));
        assert!(none.allows(Some("localhost:1"), None));
        assert!(!none.allows(Some("evil.example:9999"), None));
    }
}
