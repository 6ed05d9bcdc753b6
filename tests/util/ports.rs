//! Port allocation for the servers a test starts.
//!
//! Tests run in parallel threads, and several test binaries (or several
//! checkouts) may run at once on one machine, so ports come from a
//! process-wide counter whose starting point depends on the process id.
//! A port that cannot be bound right now is skipped.

use std::net::{TcpListener, UdpSocket};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU16, Ordering};

/// Ports above this are left to the kernel's ephemeral range.
const LAST_PORT: u16 = 60_000;

static NEXT_PORT: OnceLock<AtomicU16> = OnceLock::new();

/// Returns a port on 127.0.0.1 that is free for both TCP and UDP (the DNS
/// server needs both) and that no other test in this process has been given.
pub fn free_port() -> u16 {
    let next = NEXT_PORT.get_or_init(|| {
        // 300 blocks of 100 ports between 20000 and 50000: two processes
        // collide only if their pids are equal modulo 300.
        let block = u16::try_from(std::process::id() % 300).expect("pid % 300 fits in u16");
        AtomicU16::new(20_000 + block * 100)
    });
    loop {
        let port = next.fetch_add(1, Ordering::Relaxed);
        assert!(
            port < LAST_PORT,
            "test harness ran out of ports (reached {port})"
        );
        if is_free(port) {
            return port;
        }
    }
}

fn is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok() && UdpSocket::bind(("127.0.0.1", port)).is_ok()
}
