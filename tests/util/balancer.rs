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
    rotation: Arc<Rotation>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The backends and what the balancer does with the next connection.
struct Rotation {
    backends: Vec<SocketAddr>,
    state: Mutex<RotationState>,
}

#[derive(Default)]
struct RotationState {
    /// The backend to try first for the next connection.
    next: usize,
    /// Connections relayed so far, per backend (in the order given).
    relayed: Vec<usize>,
    /// Backends out of the rotation, as a health check takes out a host
    /// that stopped answering.
    down: Vec<bool>,
    /// How long a new connection waits before a backend is chosen for
    /// it: a slow path to the web servers, so the CA's validation is
    /// still under way when something else happens.
    delay: Duration,
}

impl Rotation {
    /// The next backend in the rotation that is up; counts the connection.
    fn pick(&self) -> Option<SocketAddr> {
        let mut state = self.state.lock().expect("rotation");
        let n = self.backends.len();
        let i = (0..n)
            .map(|k| (state.next + k) % n)
            .find(|i| !state.down[*i])?;
        state.next = i + 1;
        state.relayed[i] += 1;
        Some(self.backends[i])
    }
}

impl Balancer {
    /// Balances a fresh loopback port over `backends`.
    pub fn start(backends: Vec<SocketAddr>) -> Balancer {
        assert!(!backends.is_empty(), "a balancer needs backends");
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind balancer");
        listener.set_nonblocking(true).expect("nonblocking");
        let rotation = Arc::new(Rotation {
            state: Mutex::new(RotationState {
                relayed: vec![0; backends.len()],
                down: vec![false; backends.len()],
                ..RotationState::default()
            }),
            backends,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (r, halt) = (rotation.clone(), stop.clone());
        let thread = thread::spawn(move || {
            while !halt.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let delay = r.state.lock().expect("rotation").delay;
                        if delay.is_zero() {
                            if let Some(backend) = r.pick() {
                                relay(client, backend);
                            }
                        } else {
                            // The backend is chosen once the delay is
                            // over, by the rotation as it is then.
                            let r = r.clone();
                            thread::spawn(move || {
                                thread::sleep(delay);
                                if let Some(backend) = r.pick() {
                                    relay(client, backend);
                                }
                            });
                        }
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
            rotation,
            stop,
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Takes backend `i` out of the rotation, or puts it back.
    pub fn set_down(&self, i: usize, down: bool) {
        self.rotation.state.lock().expect("rotation").down[i] = down;
    }

    /// Holds each connection accepted from now on for `delay` before it
    /// is relayed (zero: at once).
    pub fn set_delay(&self, delay: Duration) {
        self.rotation.state.lock().expect("rotation").delay = delay;
    }

    /// Connections relayed to each backend so far.
    pub fn relayed(&self) -> Vec<usize> {
        self.rotation
            .state
            .lock()
            .expect("rotation")
            .relayed
            .clone()
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
