//! A misbehaving front for Pebble: an HTTPS server that forwards ACME
//! requests to the real Pebble, except those it was told to answer badly.
//!
//! Test double, and why: Pebble always answers well-formed JSON. To see
//! what certd does with truncated JSON, an HTML error page from a proxy, a
//! 500, a wrong content type, or a server that answers a deactivation with
//! 200 and leaves the authorization as it was, this front answers selected
//! requests itself (without forwarding them, so the CA never saw them) and
//! passes everything else through. Pebble builds its URLs from the Host header,
//! so every URL it hands out points back at the front.
//!
//! It also plays a malicious CA (no real server here is malicious, so this
//! too is a test double): path-traversal challenge tokens, absurd
//! `Retry-After` values, endless bodies, megabyte problem details and
//! redirects to plain http, each what a security review sent certd.
//! It also plays a hostile CA (`Forgery`): it rewrites Pebble's real
//! answers the way a malicious or compromised CA could, which no real CA
//! here does, to test what certd verifies in the CA's answers.
//!
//! It can also hold a request: pass it to Pebble (which acts on it) and
//! never answer, so a test can kill certd exactly while it waits for that
//! answer. Pebble has no setting that keeps an order `processing`
//! (finalization runs in a goroutine that ends within milliseconds), so
//! this is how a kill lands in that window.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::{Pebble, free_port};

/// A bad answer.
#[derive(Clone, Debug)]
pub enum Fault {
    /// 200 with JSON cut off in the middle.
    TruncatedJson,
    /// 502 with an HTML page, as a load balancer sends.
    HtmlBadGateway,
    /// 500 with an empty body.
    ServerError,
    /// 200 with a body of the wrong kind (text/plain, not JSON).
    WrongContentType,
    /// Only for an update (a POST whose JWS payload is not empty, such as a
    /// deactivation): 200 with the object as Pebble last sent it for that
    /// path, as a server does that accepts the request and ignores it.
    IgnoreUpdate,
    /// Forwarded, with every challenge token in the answer replaced.
    Token(String),
    /// 429 `rateLimited` with this `Retry-After`.
    RetryAfter(String),
    /// 200 with a JSON content type and this many bytes of body, streamed
    /// without a Content-Length until the reader hangs up.
    EndlessBody(u64),
    /// 400 `malformed` with a `detail` this many bytes long.
    LongDetail(usize),
    /// 307 to the same path over plain http on this port.
    RedirectToHttp(u16),
    /// Only for a newOrder for exactly `names` (sorted): 429 `rateLimited`
    /// with Boulder's `detail` and `Retry-After: retry_after` seconds, as
    /// Let's Encrypt answers an order over one of its limits.
    BoulderRateLimit {
        names: Vec<String>,
        detail: String,
        retry_after: u64,
    },
    /// Only for a newOrder for exactly `names` (sorted): Boulder's answer
    /// for paused identifiers, 429 `rateLimited` **without** `Retry-After`,
    /// the unpause URL inside its `detail` (wfe2 `NewOrder`).
    BoulderPaused {
        names: Vec<String>,
        unpause_url: String,
    },
}

/// The identifiers a newOrder's JWS payload asks for, sorted.
fn order_names(jws: &[u8]) -> Option<Vec<String>> {
    use base64::Engine;
    let jws: serde_json::Value = serde_json::from_slice(jws).ok()?;
    let payload = base64::prelude::BASE64_URL_SAFE_NO_PAD
        .decode(jws["payload"].as_str()?)
        .ok()?;
    let order: serde_json::Value = serde_json::from_slice(&payload).ok()?;
    let mut names: Vec<String> = order["identifiers"]
        .as_array()?
        .iter()
        .filter_map(|i| i["value"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    Some(names)
}

impl Fault {
    /// Whether this fault answers a request with JSON body `body`.
    fn applies(&self, body: &[u8]) -> bool {
        match self {
            Fault::IgnoreUpdate => serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|jws| jws["payload"].as_str().map(|p| !p.is_empty()))
                .unwrap_or(false),
            Fault::BoulderRateLimit { names, .. } | Fault::BoulderPaused { names, .. } => {
                order_names(body).as_ref() == Some(names)
            }
            _ => true,
        }
    }
}

/// Path → the body of Pebble's last successful answer for it.
type LastAnswers = Mutex<HashMap<String, Vec<u8>>>;

/// A hostile answer: Pebble's real one, rewritten, or a problem document
/// of the front's own.
#[derive(Clone, Debug)]
pub enum Forgery {
    /// Authorizations name this identifier instead of their own.
    AuthzIdentifier(String),
    /// The certificate download is replaced by a chain the front makes for
    /// the same key and names, signed by a CA of its own.
    Certificate(ForgedCert),
    /// An error answer (not forwarded) with this `detail`.
    Problem(String),
}

/// What is wrong with a forged certificate; otherwise it is well formed.
#[derive(Clone, Copy, Debug)]
pub enum ForgedCert {
    /// Expired yesterday.
    Expired,
    /// The leaf alone, no issuer certificate.
    NoChain,
    /// The leaf claims to be a CA (basicConstraints cA).
    CaLeaf,
    /// The leaf is for clientAuth only.
    ClientAuthOnly,
    /// Nothing but the issuer: a CA other than Pebble.
    OtherCa,
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
    /// (part of the request path, times left): requests never passed on.
    stalls: Mutex<Vec<(String, usize)>>,
    /// Paths of the requests passed on to Pebble so far.
    forwarded: Mutex<Vec<String>>,
    /// Requests held so far.
    held: AtomicUsize,
    /// Pebble's last successful answer per path (for `Fault::IgnoreUpdate`).
    last: LastAnswers,
    /// The hostile CA's forgeries, and every request's path.
    hostile: Hostile,
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
        let client = Arc::new(
            certd::acme::AcmeHttp::new(Some(&pebble.ca_bundle()), certd::clock::Clock::system())
                .expect("client"),
        );
        // One runtime for every forwarded request: the client's pooled
        // connections are driven by the runtime that opened them, and one
        // that a finished request's runtime took down fails the next
        // request that picks it (a 502 from the front, not from Pebble).
        let runtime = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("the front's runtime"),
        );
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind front");
        listener.set_nonblocking(true).expect("nonblocking");
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = thread::spawn(move || {
            while !s.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((tcp, _)) => {
                        let (config, s, client, upstream, runtime) = (
                            config.clone(),
                            s.clone(),
                            client.clone(),
                            upstream.clone(),
                            runtime.clone(),
                        );
                        thread::spawn(move || {
                            let pebble = Upstream {
                                client: &client,
                                runtime: &runtime,
                                url: &upstream,
                                front_port: port,
                            };
                            serve(tcp, config, &s, &pebble);
                        });
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

    /// How many of the injected faults have not been served yet.
    pub fn left(&self) -> usize {
        self.shared
            .faults
            .lock()
            .expect("faults")
            .iter()
            .map(|(_, _, left)| left)
            .sum()
    }

    /// Forgets the faults not served yet: the CA answers well again.
    pub fn clear(&self) {
        self.shared.faults.lock().expect("faults").clear();
    }
}

impl FaultyFront {
    /// Answers the next `times` requests whose path contains `path` with
    /// `forgery`.
    pub fn forge(&self, path: &str, forgery: Forgery, times: usize) {
        self.shared
            .hostile
            .forgeries
            .lock()
            .expect("forgeries")
            .push((path.to_owned(), forgery, times));
    }

    /// Drops the forgeries not yet used up: Pebble answers as itself again.
    pub fn stop_forging(&self) {
        self.shared
            .hostile
            .forgeries
            .lock()
            .expect("forgeries")
            .clear();
    }

    /// How many requests so far had `path` in their path.
    pub fn requests(&self, path: &str) -> usize {
        self.shared
            .hostile
            .seen
            .lock()
            .expect("seen")
            .iter()
            .filter(|p| p.contains(path))
            .count()
    }

    /// Passes the next request whose path contains `path` to Pebble and,
    /// once Pebble has acted on it (a 2xx answer), never answers it; with
    /// `after`, only one that comes once a request whose path contains
    /// `after` was passed on.
    pub fn hold(&self, path: &str, after: Option<&str>) {
        self.shared.holds.lock().expect("holds").push(Hold {
            path: path.to_owned(),
            after: after.map(str::to_owned),
            left: 1,
        });
    }

    /// Never passes the next request whose path contains `path` on to
    /// Pebble, nor answers it: the CA never sees it, and the client waits
    /// (counted by `held` too).
    pub fn stall(&self, path: &str) {
        self.shared
            .stalls
            .lock()
            .expect("stalls")
            .push((path.to_owned(), 1));
    }

    /// Drops the stalls no request has met yet: such requests pass again.
    /// Those stalled already stay stalled.
    pub fn disarm_stalls(&self) {
        self.shared
            .stalls
            .lock()
            .expect("stalls")
            .retain(|(_, left)| *left == 0);
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

/// Where requests are forwarded: Pebble, through certd's own HTTP stack.
#[derive(Clone, Copy)]
struct Upstream<'a> {
    client: &'a certd::acme::AcmeHttp,
    /// The runtime the client's connections live on.
    runtime: &'a tokio::runtime::Runtime,
    url: &'a str,
    /// The front's own port, which Pebble's URLs are rewritten to name.
    front_port: u16,
}

fn serve(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    shared: &Shared,
    pebble: &Upstream<'_>,
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
    let stalled = shared
        .stalls
        .lock()
        .expect("stalls")
        .iter_mut()
        .find(|(p, left)| *left > 0 && path.contains(p.as_str()))
        .map(|(_, left)| *left -= 1)
        .is_some();
    if stalled {
        shared.held.fetch_add(1, Ordering::SeqCst);
        while !shared.stop.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(20));
        }
        return;
    }
    let fault = {
        let mut list = shared.faults.lock().expect("faults");
        list.iter_mut()
            .find(|(p, fault, left)| *left > 0 && path.contains(p.as_str()) && fault.applies(&body))
            .map(|(_, fault, left)| {
                *left -= 1;
                fault.clone()
            })
    };
    let problem = |status: u16, kind: &str, detail: &str, extra: Vec<(String, String)>| {
        let body = serde_json::json!({
            "type": format!("urn:ietf:params:acme:error:{kind}"),
            "detail": detail,
            "status": status,
        });
        let mut headers = vec![(
            "Content-Type".to_owned(),
            "application/problem+json".to_owned(),
        )];
        headers.extend(extra);
        (status, headers, body.to_string().into_bytes())
    };
    let forwarded = fault.is_none();
    let (status, headers, reply) = match fault {
        Some(Fault::TruncatedJson) => (200, vec![("Content-Type".to_owned(), "application/json".to_owned())], b"{\"status\": \"val".to_vec()),
        Some(Fault::HtmlBadGateway) => (
            502,
            vec![("Content-Type".to_owned(), "text/html".to_owned())],
            b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>".to_vec(),
        ),
        Some(Fault::ServerError) => (500, Vec::new(), Vec::new()),
        Some(Fault::WrongContentType) => (200, vec![("Content-Type".to_owned(), "text/plain".to_owned())], b"maintenance window".to_vec()),
        Some(Fault::IgnoreUpdate) => {
            let answer = shared.last.lock().expect("last answers").get(&path).cloned();
            (200, vec![("Content-Type".to_owned(), "application/json".to_owned())], answer.unwrap_or_default())
        }
        Some(Fault::Token(token)) => {
            let (status, headers, reply) =
                forward(pebble, &method, &path, &content_type, body);
            (status, headers, with_token(&reply, &token))
        }
        Some(Fault::RetryAfter(value)) => problem(
            429,
            "rateLimited",
            "slow down",
            vec![("Retry-After".to_owned(), value)],
        ),
        Some(Fault::BoulderRateLimit {
            detail,
            retry_after,
            ..
        }) => problem(
            429,
            "rateLimited",
            &detail,
            vec![("Retry-After".to_owned(), retry_after.to_string())],
        ),
        Some(Fault::BoulderPaused { names, unpause_url }) => problem(
            429,
            "rateLimited",
            &format!(
                "Your account is temporarily prevented from requesting certificates for {} and possibly others. Please visit: {unpause_url}",
                names.join(", ")
            ),
            Vec::new(),
        ),
        Some(Fault::LongDetail(len)) => problem(400, "malformed", &"d".repeat(len), Vec::new()),
        Some(Fault::RedirectToHttp(to)) => (
            307,
            vec![("Location".to_owned(), format!("http://127.0.0.1:{to}{path}"))],
            Vec::new(),
        ),
        Some(Fault::EndlessBody(len)) => {
            endless(tls.get_mut(), len);
            return;
        }
        None => {
            let answer = shared.hostile.answer(
                &path,
                |body| forward(pebble, &method, &path, &content_type, body),
                body,
            );
            if answer.0 == 200 {
                shared.last.lock()
                    .expect("last answers")
                    .insert(path.clone(), answer.2.clone());
            }
            answer
        }
    };
    if forwarded {
        // Only a request Pebble acted on is held: one it refused (a
        // rejected nonce, 5 % of them) changed nothing at the CA, and
        // certd sends it again.
        let acted = (200..300).contains(&status);
        let hold = acted && {
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

/// `json` with the `token` of every challenge in it (an authorization's
/// or a challenge's own) replaced by `token`.
fn with_token(json: &[u8], token: &str) -> Vec<u8> {
    let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(json) else {
        return json.to_vec();
    };
    if let Some(challenges) = value["challenges"].as_array_mut() {
        for c in challenges {
            c["token"] = token.into();
        }
    }
    if value.get("token").is_some() {
        value["token"] = token.into();
    }
    value.to_string().into_bytes()
}

/// Streams `len` bytes of JSON-ish whitespace, 64 KiB at a time, without
/// holding them: stops when the reader hangs up.
fn endless(stream: &mut rustls::StreamOwned<rustls::ServerConnection, TcpStream>, len: u64) {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{";
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    let chunk = vec![b' '; 64 * 1024];
    let mut sent = 0;
    while sent < len {
        if stream.write_all(&chunk).is_err() {
            return;
        }
        sent += chunk.len() as u64;
    }
    let _ = stream.write_all(b"}");
    stream.conn.send_close_notify();
    let _ = stream.flush();
}

/// Passes a request to Pebble as if the front were Pebble.
fn forward(
    pebble: &Upstream<'_>,
    method: &str,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let Upstream {
        client,
        runtime,
        url: upstream,
        front_port: port,
    } = *pebble;
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

/// The hostile CA's part of the front: forgeries to apply, requests seen.
#[derive(Clone, Default)]
struct Hostile {
    forgeries: Arc<Mutex<Vec<(String, Forgery, usize)>>>,
    seen: Arc<Mutex<Vec<String>>>,
}

type Answer = (u16, Vec<(String, String)>, Vec<u8>);

impl Hostile {
    /// The answer to a request for `path`: Pebble's (through `forward`),
    /// rewritten if a forgery applies.
    fn answer(&self, path: &str, forward: impl FnOnce(Vec<u8>) -> Answer, body: Vec<u8>) -> Answer {
        self.seen.lock().expect("seen").push(path.to_owned());
        let forgery = self
            .forgeries
            .lock()
            .expect("forgeries")
            .iter()
            .find(|(p, _, left)| *left > 0 && path.contains(p.as_str()))
            .map(|(_, forgery, _)| forgery.clone());
        let Some(forgery) = forgery else {
            return forward(body);
        };
        if let Forgery::Problem(detail) = &forgery {
            self.used(path);
            let problem = serde_json::json!({
                "type": "urn:ietf:params:acme:error:rejectedIdentifier",
                "detail": detail,
                "status": 400,
            });
            return (
                400,
                vec![("Content-Type".into(), "application/problem+json".into())],
                problem.to_string().into_bytes(),
            );
        }
        let (status, headers, reply) = forward(body);
        // A rejected nonce, say: certd asks again, and gets the forgery.
        if status != 200 {
            return (status, headers, reply);
        }
        self.used(path);
        let reply = match forgery {
            Forgery::AuthzIdentifier(identifier) => {
                let mut authz: serde_json::Value =
                    serde_json::from_slice(&reply).expect("Pebble's authorization JSON");
                authz["identifier"]["value"] = identifier.into();
                authz.to_string().into_bytes()
            }
            Forgery::Certificate(kind) => forge_chain(&reply, kind).into_bytes(),
            Forgery::Problem(_) => reply,
        };
        (status, headers, reply)
    }

    /// Counts one use of the forgery that applies to `path`.
    fn used(&self, path: &str) {
        let mut list = self.forgeries.lock().expect("forgeries");
        if let Some((_, _, left)) = list
            .iter_mut()
            .find(|(p, _, left)| *left > 0 && path.contains(p.as_str()))
        {
            *left -= 1;
        }
    }
}

/// A chain for the key and names of Pebble's leaf in `pem`, issued by a CA
/// of the front's own, wrong in the way `kind` says.
fn forge_chain(pem: &[u8], kind: ForgedCert) -> String {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    use time::{Duration, OffsetDateTime};

    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    let real = CertificateDer::pem_slice_iter(pem)
        .next()
        .expect("Pebble's leaf")
        .expect("Pebble's PEM");
    let (names, _, _, spki) = super::parse_leaf(&real);
    let key = ForeignKey::from_spki(&spki);

    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.distinguished_name
        .push(DnType::CommonName, "Hostile Test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf = CertificateParams::new(names).expect("leaf params");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = OffsetDateTime::now_utc() - Duration::days(1);
    leaf.not_after = OffsetDateTime::now_utc() + Duration::days(90);
    match kind {
        ForgedCert::Expired => {
            leaf.not_before = OffsetDateTime::now_utc() - Duration::days(90);
            leaf.not_after = OffsetDateTime::now_utc() - Duration::days(1);
        }
        ForgedCert::CaLeaf => leaf.is_ca = IsCa::Ca(BasicConstraints::Unconstrained),
        ForgedCert::ClientAuthOnly => {
            leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        ForgedCert::NoChain | ForgedCert::OtherCa => {}
    }
    let leaf = leaf.signed_by(&key, &issuer).expect("forged leaf");
    match kind {
        ForgedCert::NoChain => leaf.pem(),
        _ => format!("{}{}", leaf.pem(), ca_cert.pem()),
    }
}

/// The public key of certd's CSR, taken from Pebble's leaf: the forged
/// leaf must match certd's private key, or certd's older checks alone
/// would refuse it.
struct ForeignKey {
    raw: Vec<u8>,
    alg: &'static rcgen::SignatureAlgorithm,
}

impl ForeignKey {
    fn from_spki(spki: &[u8]) -> ForeignKey {
        use x509_parser::prelude::FromDer;
        let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki).expect("SPKI");
        let raw = info.subject_public_key.data.to_vec();
        // Uncompressed EC points: 65 bytes on P-256, 97 on P-384.
        let alg = match raw.len() {
            65 => &rcgen::PKCS_ECDSA_P256_SHA256,
            97 => &rcgen::PKCS_ECDSA_P384_SHA384,
            n => panic!("forged certificates support ECDSA keys only, not a {n}-byte key"),
        };
        ForeignKey { raw, alg }
    }
}

impl rcgen::PublicKeyData for ForeignKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}
