//! Socket and descriptor set-up that Echelon's server, CLI and test upstream share.
//!
//! # A listen backlog that takes a burst
//! [`bind`] listens with a backlog of [`LISTEN_BACKLOG`], not the 128 of
//! `tokio::net::TcpListener::bind`.
//!
//! # A descriptor table sized before threads start
//! [`reserve_descriptors`] grows the process's file-descriptor table in `main`.
//!
//! Linux keeps a process's open descriptors in a table that starts at 64 entries and
//! doubles when a descriptor beyond it is opened. When the table is shared by several
//! threads, growing it waits for an RCU grace period before the old table may go
//! (`expand_fdtable` in the kernel's `fs/file.c`), and every other thread that opens a
//! socket meanwhile waits too. On our 2-vCPU VM one grace period took 8–20 ms: the
//! judge's first 256 connections stopped for about 20 ms, with both cores idle, while
//! the table grew from 64 to 128 to 256 to 512 entries (seen with
//! `perf record -g -e sched:sched_switch`: `synchronize_rcu` under `alloc_fd` under
//! `socket`). Every later wave of a batch inherits that delay.
//!
//! Grown while `main` still has one thread, the table needs no grace period at all.

use tokio::net::{TcpListener, ToSocketAddrs};

/// The backlog [`bind`] asks for: how many connections the kernel completes and queues
/// for the accept loop. Linux caps it at `net.core.somaxconn` (4,096 by default since
/// Linux 5.4).
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `addr` (the first of its addresses that binds), with
/// `SO_REUSEADDR` on Unix and a backlog of [`LISTEN_BACKLOG`].
///
/// Not `tokio::net::TcpListener::bind`: that listens with a backlog of 128 (the value
/// mio copies from the standard library). When more clients connect at once than the
/// accept loop has taken, Linux drops their SYNs, or the ACKs that complete their
/// handshakes, and counts `ListenOverflows` (`nstat`); the clients try again only after
/// a second. A batch client opening 256 connections at once hit that.
///
/// # Errors
/// `addr` does not resolve, or no address of it can be bound.
pub async fn bind(addr: impl ToSocketAddrs) -> std::io::Result<TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As mio does: on Windows the option would let another socket take the port.
        #[cfg(unix)]
        socket.set_reuseaddr(true)?;
        match socket
            .bind(addr)
            .and_then(|()| socket.listen(LISTEN_BACKLOG))
        {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the address resolved to nothing",
        )
    }))
}

/// Raises the soft limit on open files to the hard limit, then grows the descriptor
/// table to hold `descriptors` (capped by that limit).
///
/// Call it from `main` before any thread is started. Everything here is best effort:
/// if a limit cannot be read or raised, or the table cannot be grown, the table grows
/// on demand as it did before, and the program works the same, only with the pauses
/// described in the crate docs.
///
/// The raised limit is what Go's runtime does for every program since Go 1.19: the
/// soft limit (often 1,024) is a compatibility default for `select(2)`, which nothing
/// here uses, and a judge at `--concurrency 2000` needs more than that.
#[cfg(target_os = "linux")]
pub fn reserve_descriptors(descriptors: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};

    let mut limit = getrlimit(Resource::Nofile);
    if let (Some(current), Some(maximum)) = (limit.current, limit.maximum)
        && maximum > current
    {
        limit.current = Some(maximum);
        if setrlimit(Resource::Nofile, limit).is_err() {
            limit.current = Some(current);
        }
    }
    let cap = limit.current.unwrap_or(u64::MAX);
    // The highest descriptor the table must hold; `F_DUPFD` gives the lowest free one
    // at or above it, which grows the table to fit, and dropping it closes it again.
    let highest = descriptors.min(cap).saturating_sub(1);
    if let Ok(highest) = i32::try_from(highest) {
        let _ = rustix::io::fcntl_dupfd_cloexec(std::io::stderr(), highest);
    }
}

/// Elsewhere, nothing: the pause described in the crate docs is Linux's.
#[cfg(not(target_os = "linux"))]
pub fn reserve_descriptors(_descriptors: u64) {}

/// The process's soft limit on open files (`RLIMIT_NOFILE`), when it can be read and
/// is not unlimited. The server sizes its default connection cap from it.
#[cfg(target_os = "linux")]
pub fn open_files_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Elsewhere, unknown.
#[cfg(not(target_os = "linux"))]
pub fn open_files_limit() -> Option<u64> {
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpStream;

    /// 300 clients connect to a listener that accepts none of them. With the backlog of
    /// 128 that `TcpListener::bind` gives, the kernel drops every SYN after the 129th and
    /// those connects hang; with [`super::bind`]'s they all complete.
    #[tokio::test]
    async fn bind_queues_hundreds_of_connections_before_any_accept() {
        const CLIENTS: usize = 300;
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if somaxconn < CLIENTS {
            eprintln!("skipped: net.core.somaxconn is {somaxconn}, below {CLIENTS}");
            return;
        }
        let listener = super::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        for i in 0..CLIENTS {
            // A liveness bound, not a speed figure: a dropped SYN is retried after 1 s,
            // then 3 s, and never gets in while nothing is accepted.
            let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
                .await
                .unwrap_or_else(|_| panic!("connection {i} was not queued"))
                .unwrap();
            held.push(stream);
        }
        assert_eq!(held.len(), CLIENTS);
        drop(listener);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_table_then_holds_the_reserved_descriptors() {
        use super::reserve_descriptors;
        use rustix::process::{Resource, getrlimit};
        reserve_descriptors(4096);
        let cap = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        let want = i32::try_from(4096u64.min(cap) - 1).unwrap_or(i32::MAX);
        // /proc/self/status reports the table's size as FDSize.
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let size: i64 = status
            .lines()
            .find_map(|l| l.strip_prefix("FDSize:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        assert!(
            size > i64::from(want),
            "FDSize {size} after reserving {} descriptors",
            want + 1
        );
    }
}
