//! One host's way out to the CA: an HTTP `CONNECT` proxy that a certd
//! process is pointed at with `HTTPS_PROXY`, as a host behind an egress
//! proxy would be.
//!
//! Why: the hosts of a fleet share one ACME account, and Pebble ties an
//! account's key id and every signed URL to the host and port the
//! request names, so every host must use the same directory URL. Their
//! traffic still has to be told apart (how much a stopped host sent
//! after it woke) and cut one host at a time; a proxy per host does
//! both. It relays bytes untouched (TLS is end to end), so it is not a
//! double of anything: it only counts and cuts.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::free_port;

/// What the proxy's threads share.
#[derive(Default)]
struct Shared {
    /// Tunnels opened so far (each ACME request opens one: the CA's side
    /// answers `Connection: close`).
    tunnels: AtomicU64,
    /// When the last tunnel was opened.
    last_tunnel: Mutex<Option<Instant>>,
    /// Bytes the host sent through any tunnel so far.
    sent: AtomicU64,
    /// Cut: tunnels are refused and open ones closed.
    down: AtomicBool,
    open: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
}

pub struct Egress {
    port: u16,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Egress {
    pub fn start() -> Egress {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind egress proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = thread::spawn(move || {
            while !s.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let s = s.clone();
                        thread::spawn(move || tunnel(&client, &s));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("egress proxy accept: {e}"),
                }
            }
        });
        Egress {
            port,
            shared,
            thread: Some(thread),
        }
    }

    /// The value of `HTTPS_PROXY` for the host behind this proxy.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Tunnels opened so far.
    pub fn tunnels(&self) -> u64 {
        self.shared.tunnels.load(Ordering::SeqCst)
    }

    /// When the host last opened a tunnel (sent a request), if ever.
    pub fn last_tunnel(&self) -> Option<Instant> {
        *self.shared.last_tunnel.lock().expect("last tunnel")
    }

    /// Bytes sent by the host so far.
    pub fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::SeqCst)
    }

    /// Cuts the host off (closing its open tunnels), or lets it out again.
    pub fn set_up(&self, up: bool) {
        self.shared.down.store(!up, Ordering::SeqCst);
        if !up {
            for conn in self.shared.open.lock().expect("open tunnels").drain(..) {
                let _ = conn.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Drop for Egress {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads a `CONNECT host:port` request and relays the tunnel.
fn tunnel(client: &TcpStream, shared: &Shared) {
    let _ = client.set_nonblocking(false);
    let Ok(read_half) = client.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let target = match line.split_whitespace().collect::<Vec<_>>()[..] {
        ["CONNECT", target, _] => target.to_owned(),
        _ => return,
    };
    loop {
        let mut header = String::new();
        match reader.read_line(&mut header) {
            Ok(0) | Err(_) => return,
            Ok(_) if header == "\r\n" => break,
            Ok(_) => {}
        }
    }
    if shared.down.load(Ordering::SeqCst) {
        return;
    }
    let Ok(server) = TcpStream::connect(&target) else {
        let _ = (&*client).write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
        return;
    };
    shared.tunnels.fetch_add(1, Ordering::SeqCst);
    *shared.last_tunnel.lock().expect("last tunnel") = Some(Instant::now());
    if (&*client)
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .is_err()
    {
        return;
    }
    {
        let mut open = shared.open.lock().expect("open tunnels");
        open.extend(client.try_clone().ok());
        open.extend(server.try_clone().ok());
    }
    let (Ok(mut to_server), Ok(mut from_server), Ok(mut to_client)) =
        (server.try_clone(), server.try_clone(), client.try_clone())
    else {
        return;
    };
    // The host's side: what it sent past the request head already, then
    // the rest, each counted.
    let buffered = reader.buffer().to_vec();
    shared
        .sent
        .fetch_add(buffered.len() as u64, Ordering::SeqCst);
    thread::scope(|scope| {
        scope.spawn(|| {
            let _ = io::copy(&mut from_server, &mut to_client);
            let _ = to_client.shutdown(Shutdown::Write);
        });
        let mut ok = to_server.write_all(&buffered).is_ok();
        let mut chunk = [0u8; 16 * 1024];
        while ok {
            match reader.get_mut().read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    shared.sent.fetch_add(n as u64, Ordering::SeqCst);
                    ok = to_server.write_all(&chunk[..n]).is_ok();
                }
            }
        }
        let _ = to_server.shutdown(Shutdown::Write);
    });
}
