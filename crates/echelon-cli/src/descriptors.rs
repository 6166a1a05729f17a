//! How many descriptors each command reserves before its runtime starts threads; the
//! reservation and why it matters are `echelon_socket::reserve_descriptors`.

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
}
