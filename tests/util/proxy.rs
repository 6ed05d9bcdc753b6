//! A TCP forwarder in front of Pebble that can be switched off and on.
//!
//! Test double, and why: an outage test needs the CA unreachable and then
//! back *with its state*, but a stopped Pebble forgets every account,
//! order and authorization. The forwarder only cuts the network; the CA
//! behind it is the real Pebble (which builds its URLs from the Host
//! header, so every URL it hands out goes through the forwarder too).

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::free_port;

pub struct TcpProxy {
    port: u16,
    up: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpProxy {
    /// Forwards a fresh loopback port to `upstream`.
    pub fn start(upstream: SocketAddr) -> TcpProxy {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind proxy port");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let up = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let (up2, stop2) = (up.clone(), stop.clone());
        let thread = thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) if up2.load(Ordering::SeqCst) => forward(client, upstream),
                    // Down: accept and close at once, as a dead host's
                    // port would refuse.
                    Ok((client, _)) => drop(client),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("proxy accept: {e}"),
                }
            }
        });
        TcpProxy {
            port,
            up,
            stop,
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }
}

fn forward(client: TcpStream, upstream: SocketAddr) {
    let Ok(server) = TcpStream::connect(upstream) else {
        return;
    };
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        thread::spawn(move || {
            let _ = io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        });
    };
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let _ = client.set_nonblocking(false);
    pipe(client, server);
    pipe(s2, c2);
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
