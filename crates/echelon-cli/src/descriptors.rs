//! The process's file-descriptor table, sized before the runtime starts its threads.
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

/// Raises the soft limit on open files to the hard limit, then grows the descriptor
/// table to hold `descriptors` (capped by that limit).
///
/// Call it from `main` before any thread is started. Everything here is best effort:
/// if a limit cannot be read or raised, or the table cannot be grown, the table grows
/// on demand as it did before, and the program works the same, only with the pauses
/// described in the module docs.
///
/// The raised limit is what Go's runtime does for every program since Go 1.19: the
/// soft limit (often 1,024) is a compatibility default for `select(2)`, which nothing
/// here uses, and a judge at `--concurrency 2000` needs more than that.
#[cfg(target_os = "linux")]
pub(crate) fn reserve(descriptors: u64) {
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

/// Elsewhere, nothing: the pause described in the module docs is Linux's.
#[cfg(not(target_os = "linux"))]
pub(crate) fn reserve(_descriptors: u64) {}

/// How many descriptors to reserve for a command that keeps up to `connections`
/// sockets open at once: each connection, plus as many again for the connections an
/// HTTP client opens while an idle one is on its way back to the pool (the judge opened
/// 271 for 256 slots), plus the runtime's, the log's, the ledger's and the input and
/// output files. At least 4,096 (a 32 KiB table), enough for a gateway under load.
pub(crate) fn for_connections(connections: usize) -> u64 {
    let connections = u64::try_from(connections).unwrap_or(u64::MAX);
    connections.saturating_mul(2).saturating_add(64).max(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserves_room_for_every_connection_and_a_floor() {
        assert_eq!(for_connections(0), 4096);
        assert_eq!(for_connections(256), 4096);
        assert_eq!(for_connections(5000), 10_064);
        assert_eq!(for_connections(usize::MAX), u64::MAX);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_table_then_holds_the_reserved_descriptors() {
        use rustix::process::{Resource, getrlimit};
        reserve(for_connections(0));
        let cap = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        let want = i32::try_from(for_connections(0).min(cap) - 1).unwrap_or(i32::MAX);
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
