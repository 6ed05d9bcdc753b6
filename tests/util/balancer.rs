//! A round-robin TCP balancer: each connection goes to the next backend
//! in turn, as a load balancer before a fleet's web servers sends the
//! CA's validation requests to whichever host comes next.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::free_port;

pub struct Balancer {
    port: u16,
    /// Connections relayed so far, per backend (in the order given).
    relayed: Arc<Mutex<Vec<usize>>>,
    /// Backends out of the rotation, as a health check takes out a host
    /// that stopped answering.
    down: Arc<Mutex<Vec<bool>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Balancer {
    /// Balances a fresh loopback port over `backends`.
    pub fn start(backends: Vec<SocketAddr>) -> Balancer {
        assert!(!backends.is_empty(), "a balancer needs backends");
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind balancer");
        listener.set_nonblocking(true).expect("nonblocking");
        let relayed = Arc::new(Mutex::new(vec![0; backends.len()]));
        let down = Arc::new(Mutex::new(vec![false; backends.len()]));
        let stop = Arc::new(AtomicBool::new(false));
        let (counts, out, halt) = (relayed.clone(), down.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let mut next = 0;
            while !halt.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let out = out.lock().expect("down").clone();
                        let Some(i) = (0..backends.len())
                            .map(|k| (next + k) % backends.len())
                            .find(|i| !out[*i])
                        else {
                            continue;
                        };
                        next = i + 1;
                        counts.lock().expect("counts")[i] += 1;
                        relay(client, backends[i]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("balancer accept: {e}"),
                }
            }
        });
        Balancer {
            port,
            relayed,
            down,
            stop,
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Takes backend `i` out of the rotation, or puts it back.
    pub fn set_down(&self, i: usize, down: bool) {
        self.down.lock().expect("down")[i] = down;
    }

    /// Connections relayed to each backend so far.
    pub fn relayed(&self) -> Vec<usize> {
        self.relayed.lock().expect("counts").clone()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Pipes `client` to `backend` both ways on threads of their own; a
/// backend that is down closes the client's connection.
fn relay(client: TcpStream, backend: SocketAddr) {
    let _ = client.set_nonblocking(false);
    let Ok(server) = TcpStream::connect_timeout(&backend, Duration::from_secs(2)) else {
        return;
    };
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        thread::spawn(move || {
            let _ = io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        });
    };
    pipe(client, server);
    pipe(s2, c2);
}
