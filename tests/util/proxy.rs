//! A TCP forwarder in front of Pebble that can be switched off and on.
//!
//! Test double, and why: an outage test needs the CA unreachable and then
//! back *with its state*, but a stopped Pebble forgets every account,
//! order and authorization. The forwarder only cuts the network; the CA
//! behind it is the real Pebble (which builds its URLs from the Host
//! header, so every URL it hands out goes through the forwarder too).

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::free_port;

pub struct TcpProxy {
    port: u16,
    up: Arc<AtomicBool>,
    /// Connections refused while down: how hard a client hammered a dead CA.
    refused: Arc<AtomicUsize>,
    /// Open client connections, cut when the proxy goes down (a client's
    /// keep-alive connection must not outlive the outage).
    open: Arc<Mutex<Vec<TcpStream>>>,
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
        let refused = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (up2, stop2, refused2, open2) =
            (up.clone(), stop.clone(), refused.clone(), open.clone());
        let thread = thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) if up2.load(Ordering::SeqCst) => {
                        if let Ok(c) = client.try_clone() {
                            open2.lock().expect("open connections").push(c);
                        }
                        forward(client, upstream);
                    }
                    // Down: accept and close at once, as a dead host's
                    // port would refuse.
                    Ok((client, _)) => {
                        refused2.fetch_add(1, Ordering::SeqCst);
                        drop(client);
                    }
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
            refused,
            open,
            stop,
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            for conn in self.open.lock().expect("open connections").drain(..) {
                let _ = conn.shutdown(Shutdown::Both);
            }
        }
    }

    /// Connections refused while down, so far.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }

    /// Points `env`'s config at this proxy instead of straight at Pebble.
    pub fn route(&self, env: &super::TestEnv) {
        let config = std::fs::read_to_string(env.config_path()).expect("config");
        let direct = env.pebble.directory_url();
        env.write_raw_config(
            &config.replace(&direct, &format!("https://127.0.0.1:{}/dir", self.port)),
        );
    }

    /// A proxy in front of `env`'s Pebble.
    pub fn for_pebble(env: &super::TestEnv) -> TcpProxy {
        let addr = env
            .pebble
            .directory_url()
            .trim_start_matches("https://")
            .trim_end_matches("/dir")
            .parse()
            .expect("Pebble address");
        TcpProxy::start(addr)
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
