//! A misbehaving front for Pebble: an HTTPS server that forwards ACME
//! requests to the real Pebble, except those it was told to answer badly.
//!
//! Test double, and why: Pebble always answers well-formed JSON. To see
//! what certd does with truncated JSON, an HTML error page from a proxy, a
//! 500, or a wrong content type, this front answers selected requests
//! itself (without forwarding them, so the CA never saw them) and passes
//! everything else through. Pebble builds its URLs from the Host header,
//! so every URL it hands out points back at the front.
//!
//! It can also hold a request: pass it to Pebble (which acts on it) and
//! never answer, so a test can kill certd exactly while it waits for that
//! answer. Pebble 2.4 has no setting that keeps an order `processing`
//! (finalization runs in a goroutine that ends within milliseconds), so
//! this is how a kill lands in that window.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::{Pebble, free_port};

/// A bad answer.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// 200 with JSON cut off in the middle.
    TruncatedJson,
    /// 502 with an HTML page, as a load balancer sends.
    HtmlBadGateway,
    /// 500 with an empty body.
    ServerError,
    /// 200 with a body of the wrong kind (text/plain, not JSON).
    WrongContentType,
}

/// A request to pass on and then leave unanswered.
struct Hold {
    /// Part of the request path.
    path: String,
    /// Only once a request whose path contains this was passed on.
    after: Option<String>,
    left: usize,
}

/// What the front's connection threads share.
#[derive(Default)]
struct Shared {
    /// (part of the request path, fault, times left)
    faults: Mutex<Vec<(String, Fault, usize)>>,
    holds: Mutex<Vec<Hold>>,
    /// Paths of the requests passed on to Pebble so far.
    forwarded: Mutex<Vec<String>>,
    /// Requests held so far.
    held: AtomicUsize,
    stop: AtomicBool,
}

pub struct FaultyFront {
    port: u16,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl FaultyFront {
    pub fn start(pebble: &Pebble) -> FaultyFront {
        let upstream = pebble.directory_url().trim_end_matches("/dir").to_owned();
        let port = free_port();
        let config = pebble.tls_server_config();
        let client =
            Arc::new(certd::acme::AcmeHttp::new(Some(&pebble.ca_bundle())).expect("client"));
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind front");
        listener.set_nonblocking(true).expect("nonblocking");
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = thread::spawn(move || {
            while !s.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((tcp, _)) => {
                        let (config, s, client, upstream) =
                            (config.clone(), s.clone(), client.clone(), upstream.clone());
                        thread::spawn(move || serve(tcp, config, &s, &client, &upstream, port));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FaultyFront {
            port,
            shared,
            thread: Some(thread),
        }
    }

    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    /// Answers the next `times` requests whose path contains `path` with `fault`.
    pub fn inject(&self, path: &str, fault: Fault, times: usize) {
        self.shared
            .faults
            .lock()
            .expect("faults")
            .push((path.to_owned(), fault, times));
    }

    /// Passes the next request whose path contains `path` to Pebble and
    /// never answers it; with `after`, only one that comes once a request
    /// whose path contains `after` was passed on.
    pub fn hold(&self, path: &str, after: Option<&str>) {
        self.shared.holds.lock().expect("holds").push(Hold {
            path: path.to_owned(),
            after: after.map(str::to_owned),
            left: 1,
        });
    }

    /// How many requests are held (Pebble has acted on them) so far.
    pub fn held(&self) -> usize {
        self.shared.held.load(Ordering::SeqCst)
    }

    /// How many requests whose path contains `path` were passed on.
    pub fn forwarded(&self, path: &str) -> usize {
        self.shared
            .forwarded
            .lock()
            .expect("forwarded")
            .iter()
            .filter(|p| p.contains(path))
            .count()
    }
}

impl Drop for FaultyFront {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    shared: &Shared,
    client: &certd::acme::AcmeHttp,
    upstream: &str,
    port: u16,
) {
    let _ = tcp.set_nonblocking(false);
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(conn) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = BufReader::new(rustls::StreamOwned::new(conn, tcp));
    // One request per connection keeps this simple; certd reconnects.
    let mut line = String::new();
    if tls.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_owned(),
        parts.next().unwrap_or("/").to_owned(),
    );
    let mut length = 0;
    let mut content_type = String::new();
    loop {
        let mut header = String::new();
        if tls.read_line(&mut header).is_err() || header == "\r\n" || header.is_empty() {
            break;
        }
        let lower = header.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("content-type:") {
            content_type = header["content-type:".len()..].trim().to_owned();
        }
    }
    let mut body = vec![0u8; length];
    if tls.read_exact(&mut body).is_err() {
        return;
    }
    let fault = {
        let mut list = shared.faults.lock().expect("faults");
        list.iter_mut()
            .find(|(p, _, left)| *left > 0 && path.contains(p.as_str()))
            .map(|(_, fault, left)| {
                *left -= 1;
                *fault
            })
    };
    let (status, headers, reply) = match fault {
        Some(Fault::TruncatedJson) => (200, vec![("Content-Type".to_owned(), "application/json".to_owned())], b"{\"status\": \"val".to_vec()),
        Some(Fault::HtmlBadGateway) => (
            502,
            vec![("Content-Type".to_owned(), "text/html".to_owned())],
            b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>".to_vec(),
        ),
        Some(Fault::ServerError) => (500, Vec::new(), Vec::new()),
        Some(Fault::WrongContentType) => (200, vec![("Content-Type".to_owned(), "text/plain".to_owned())], b"maintenance window".to_vec()),
        None => forward(client, upstream, port, &method, &path, &content_type, body),
    };
    if fault.is_none() {
        let hold = {
            let forwarded = shared.forwarded.lock().expect("forwarded");
            let mut holds = shared.holds.lock().expect("holds");
            holds
                .iter_mut()
                .find(|h| {
                    h.left > 0
                        && path.contains(h.path.as_str())
                        && h.after
                            .as_ref()
                            .is_none_or(|a| forwarded.iter().any(|p| p.contains(a.as_str())))
                })
                .map(|h| h.left -= 1)
                .is_some()
        };
        shared
            .forwarded
            .lock()
            .expect("forwarded")
            .push(path.clone());
        if hold {
            shared.held.fetch_add(1, Ordering::SeqCst);
            // Pebble has acted; the client never learns how. The
            // connection stays open until the front goes away.
            while !shared.stop.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(20));
            }
            return;
        }
    }
    let mut out = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.len()
    );
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let stream = tls.get_mut();
    let _ = stream.write_all(out.as_bytes());
    let _ = stream.write_all(&reply);
    let _ = stream.flush();
    stream.conn.send_close_notify();
    let _ = stream.flush();
}

/// Passes a request to Pebble as if the front were Pebble.
fn forward(
    client: &certd::acme::AcmeHttp,
    upstream: &str,
    port: u16,
    method: &str,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut req = client
            .plain()
            .request(method, format!("{upstream}{path}"))
            .header("Host", format!("127.0.0.1:{port}"))
            .body(body);
        if !content_type.is_empty() {
            req = req.header("Content-Type", content_type);
        }
        let Ok(rsp) = req.send().await else {
            return (502, Vec::new(), Vec::new());
        };
        let status = rsp.status().as_u16();
        let headers = [
            "content-type",
            "replay-nonce",
            "location",
            "link",
            "retry-after",
        ]
        .iter()
        .flat_map(|name| {
            rsp.headers()
                .get_all(*name)
                .iter()
                .filter_map(|v| v.to_str().ok().map(|v| (name.to_string(), v.to_owned())))
                .collect::<Vec<_>>()
        })
        .collect();
        let bytes = rsp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
        (status, headers, bytes)
    })
}
