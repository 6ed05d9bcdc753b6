//! An ARI (RFC 9773) front for Pebble.
//!
//! Test double, and why: Pebble 2.4 has no `renewalInfo` endpoint. This
//! small HTTPS server serves Pebble's own directory with a `renewalInfo`
//! URL added, and answers renewal-info requests with windows the test
//! chooses. Every other ACME request goes straight to the real Pebble (its
//! directory names its own URLs).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::{Pebble, free_port};

/// The window the server suggests: (start, end) as offsets from now in
/// seconds, and the Retry-After it sends (none for 0: RFC 9773 lets a
/// CA leave it out, and the window still holds).
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub start: i64,
    pub end: i64,
    pub retry_after: u64,
}

pub struct AriServer {
    port: u16,
    /// Windows to hand out in turn; the last one repeats.
    windows: Arc<Mutex<Vec<Window>>>,
    /// Certificate identifiers asked about, in order.
    pub asked: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AriServer {
    pub fn start(pebble: &Pebble, windows: Vec<Window>) -> AriServer {
        let directory = fetch_directory(pebble);
        let port = free_port();
        let mut dir: serde_json::Value = serde_json::from_str(&directory).expect("directory JSON");
        dir["renewalInfo"] = format!("https://127.0.0.1:{port}/renewal-info").into();
        let dir = dir.to_string();

        let config = pebble.tls_server_config();

        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind ARI server");
        listener.set_nonblocking(true).expect("nonblocking");
        let windows = Arc::new(Mutex::new(windows));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (w, a, s) = (windows.clone(), asked.clone(), stop.clone());
        let thread = thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((tcp, _)) => {
                        let (config, dir, w, a) =
                            (config.clone(), dir.clone(), w.clone(), a.clone());
                        thread::spawn(move || serve(tcp, config, &dir, &w, &a));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        AriServer {
            port,
            windows,
            asked,
            stop,
            thread: Some(thread),
        }
    }

    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    pub fn asked(&self) -> Vec<String> {
        self.asked.lock().expect("asked").clone()
    }

    pub fn set_windows(&self, windows: Vec<Window>) {
        *self.windows.lock().expect("windows") = windows;
    }
}

impl Drop for AriServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn fetch_directory(pebble: &Pebble) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let http =
            certd::acme::AcmeHttp::new(Some(&pebble.ca_bundle()), certd::clock::Clock::system())
                .expect("client");
        http.plain()
            .get(pebble.directory_url())
            .send()
            .await
            .expect("GET directory")
            .text()
            .await
            .expect("directory body")
    })
}

fn serve(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    dir: &str,
    windows: &Mutex<Vec<Window>>,
    asked: &Mutex<Vec<String>>,
) {
    let _ = tcp.set_nonblocking(false);
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(conn) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tls.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let (body, extra) = if path == "/dir" {
        (dir.to_owned(), String::new())
    } else if let Some(id) = path.strip_prefix("/renewal-info/") {
        let window = {
            let mut w = windows.lock().expect("windows");
            if w.len() > 1 { w.remove(0) } else { w[0] }
        };
        asked.lock().expect("asked").push(id.to_owned());
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let fmt = |t: i64| {
            time::OffsetDateTime::from_unix_timestamp(t)
                .expect("time")
                .format(&time::format_description::well_known::Rfc3339)
                .expect("format")
        };
        let body = serde_json::json!({
            "suggestedWindow": { "start": fmt(now + window.start), "end": fmt(now + window.end) }
        });
        (
            body.to_string(),
            match window.retry_after {
                0 => String::new(),
                secs => format!("Retry-After: {secs}\r\n"),
            },
        )
    } else {
        let _ = write!(
            tls,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return;
    };
    let _ = write!(
        tls,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tls.flush();
    tls.conn.send_close_notify();
    let _ = tls.flush();
}
