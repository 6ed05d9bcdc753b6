//! Port allocation for the servers a test starts.
//!
//! Tests run in parallel threads, and several test binaries (or several
//! checkouts) may run at once on one machine, so ports come from a
//! process-wide counter whose starting point depends on the process id.
//! A port that cannot be bound right now is skipped. All of them lie below
//! the kernel's ephemeral range (32768 and up on Linux): a port there can
//! be taken between our check and the server's bind by any outgoing
//! connection on the machine, which made servers fail to start at random.

use std::net::{TcpListener, UdpSocket};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU16, Ordering};

/// Ports from here on are the kernel's (ephemeral range).
const LAST_PORT: u16 = 32_700;

static NEXT_PORT: OnceLock<AtomicU16> = OnceLock::new();

/// Returns a port on 127.0.0.1 that is free for both TCP and UDP (the DNS
/// server needs both) and that no other test in this process has been given.
pub fn free_port() -> u16 {
    let next = NEXT_PORT.get_or_init(|| {
        // 22 blocks of 1000 ports between 10000 and 32000: two processes
        // collide only if their pids are equal modulo 22, and then the
        // bind check below still skips ports in use.
        let block = u16::try_from(std::process::id() % 22).expect("pid % 22 fits in u16");
        AtomicU16::new(10_000 + block * 1000)
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
