//! The connections ACME requests travel on, and the fence on them.
//!
//! A connection is TCP (tunnelled with `CONNECT` through the http proxy
//! the environment names, `HTTPS_PROXY` and `NO_PROXY` as curl reads
//! them), then a [`Fenced`] socket, then TLS, then HTTP/1.1.
//!
//! The fence sits under TLS, on the socket itself. A request inside a
//! gated run (a fleet host acting under a lease) puts the run's
//! [`RequestGate`] on the connection it uses, and every write to the
//! socket first asks it: the request's bytes, TLS's own records (a
//! `close_notify` when the connection winds down), a proxy's `CONNECT`.
//! Past the gate the write fails and nothing reaches the wire. Asking once
//! before each request is not enough: a process stopped (SIGSTOP, a
//! paused VM) between that question and the write wakes past its lease
//! and sends anyway; here the question is the last step before the write
//! system call. What no client can close is the few instructions between
//! that step and the system call itself; only a CA checking a fencing
//! token could, and ACME has none.
//!
//! Connections are pooled here rather than in a general HTTP client so
//! that the fence follows the request: a connection is used by one
//! request at a time, takes that request's gate (or none) when it is
//! checked out, and keeps it while idle, so the idle connection of a
//! lease that has ended closes silently past its deadline, and the next
//! request that takes it over puts its own gate on it.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tower_service::Service;

use super::http::{GateClosed, RequestGate, lock};

/// How long a TCP connection (to the CA, or to the proxy) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle connections older than this are closed rather than used: a
/// renewal's requests come in bursts, and the next burst may be days
/// away, when the CA has long closed its end.
const POOL_IDLE: Duration = Duration::from_secs(90);
/// At most this many idle connections are kept per CA host.
const POOL_MAX_IDLE: usize = 16;

/// A request body: ACME bodies are whole JWS documents.
pub(super) type Body = Full<Bytes>;
/// The error hyper-util's connector services speak.
type BoxError = Box<dyn StdError + Send + Sync>;

/// Opens, fences and pools the connections of one
/// [`AcmeHttp`](super::AcmeHttp).
pub(super) struct Transport {
    tls: TlsConnector,
    proxies: Matcher,
    /// Idle connections by the origin (`host:port`) they are open to.
    idle: Mutex<HashMap<String, Vec<Idle>>>,
}

/// A connection no request is using.
struct Idle {
    sender: SendRequest<Body>,
    fence: FenceSlot,
    since: Instant,
}

/// A connection checked out for one request. Dropped, it closes; given
/// back with [`Transport::check_in`] once its answer is read, it is kept.
pub(super) struct Conn {
    origin: String,
    sender: SendRequest<Body>,
    fence: FenceSlot,
}

impl Transport {
    /// A transport speaking TLS with `tls` (HTTP/1.1 is offered by ALPN),
    /// through the proxies the environment names.
    pub(super) fn new(mut tls: rustls::ClientConfig) -> Self {
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            tls: TlsConnector::from(Arc::new(tls)),
            proxies: Matcher::from_env(),
            idle: Mutex::new(HashMap::new()),
        }
    }

    /// Sends `request` (its URI absolute, https) on a connection fenced
    /// by `gate`: an idle one to the same origin, else a new one. The
    /// connection comes back with the answer, to be checked in once the
    /// body is read.
    pub(super) async fn send(
        &self,
        mut request: Request<Body>,
        gate: Option<Arc<dyn RequestGate>>,
    ) -> Result<(Response<Incoming>, Conn), BoxError> {
        let uri = request.uri().clone();
        let origin = origin(&uri)?;
        let mut conn = self.check_out(&uri, origin, gate).await?;
        // The request line takes the origin form; the authority goes in
        // `Host`, without the default port.
        let host = match uri.port_u16() {
            Some(443) | None => uri.host().unwrap_or_default().to_owned(),
            Some(port) => format!("{}:{port}", uri.host().unwrap_or_default()),
        };
        request
            .headers_mut()
            .insert(http::header::HOST, HeaderValue::from_str(&host)?);
        *request.uri_mut() = uri
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
        let response = conn.sender.send_request(request).await?;
        Ok((response, conn))
    }

    /// Keeps `conn` for the next request to its origin.
    pub(super) fn check_in(&self, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        let mut idle = lock(&self.idle);
        let list = idle.entry(conn.origin).or_default();
        if list.len() < POOL_MAX_IDLE {
            list.push(Idle {
                sender: conn.sender,
                fence: conn.fence,
                since: Instant::now(),
            });
        }
    }

    async fn check_out(
        &self,
        uri: &Uri,
        origin: String,
        gate: Option<Arc<dyn RequestGate>>,
    ) -> Result<Conn, BoxError> {
        loop {
            let Some(idle) = lock(&self.idle).get_mut(&origin).and_then(Vec::pop) else {
                break;
            };
            // Too old, or closed by the CA: dropped (and so closed under
            // the gate it last had).
            if idle.since.elapsed() > POOL_IDLE || idle.sender.is_closed() {
                continue;
            }
            idle.fence.set(gate.clone());
            let mut sender = idle.sender;
            if sender.ready().await.is_ok() {
                return Ok(Conn {
                    origin,
                    sender,
                    fence: idle.fence,
                });
            }
        }
        let fence = FenceSlot::new(gate);
        tracing::debug!(origin = %origin, "opening a connection to the CA");
        let io = self.connect(uri, fence.clone()).await?;
        let (sender, connection) = http1::handshake(io).await?;
        // The connection's own task: it ends when the connection does,
        // which its `sender` decides (dropped: the connection closes, under
        // the fence) or the CA (closing its end).
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "a connection to the CA ended with an error");
            }
        });
        Ok(Conn {
            origin,
            sender,
            fence,
        })
    }

    /// A TLS connection to `dst`, through a proxy where the environment
    /// names one, on a socket fenced by `fence`.
    async fn connect(
        &self,
        dst: &Uri,
        fence: FenceSlot,
    ) -> Result<TokioIo<tokio_rustls::client::TlsStream<TokioIo<FencedSocket>>>, BoxError> {
        let host = dst.host().ok_or("the URL names no host")?;
        // An IPv6 literal comes bracketed in a URI, bare in a server name.
        let name = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(name.to_owned())?;
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
        tcp.set_nodelay(true);
        let mut tcp = FencedTcp { tcp, fence };
        let socket = match self.proxies.intercept(dst) {
            Some(proxy) => {
                if proxy.uri().scheme_str() != Some("http") {
                    return Err(format!(
                        "the proxy {} for {dst}: certd tunnels through http:// proxies only",
                        proxy.uri()
                    )
                    .into());
                }
                let mut tunnel = Tunnel::new(proxy.uri().clone(), tcp);
                if let Some(auth) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                tunnel.call(dst.clone()).await?
            }
            None => tcp.call(dst.clone()).await?,
        };
        let tls = self.tls.connect(server_name, TokioIo::new(socket)).await?;
        Ok(TokioIo::new(tls))
    }
}

/// `host:port` of an https URI, the key idle connections are kept under.
fn origin(uri: &Uri) -> Result<String, BoxError> {
    let host = uri.host().ok_or("the URL names no host")?;
    Ok(format!("{host}:{}", uri.port_u16().unwrap_or(443)))
}

/// The gate of the request a connection serves, or served last: asked
/// by its socket before every write. `None`: no gate, every write goes.
#[derive(Clone)]
struct FenceSlot(Arc<Mutex<Option<Arc<dyn RequestGate>>>>);

impl FenceSlot {
    fn new(gate: Option<Arc<dyn RequestGate>>) -> Self {
        Self(Arc::new(Mutex::new(gate)))
    }

    fn set(&self, gate: Option<Arc<dyn RequestGate>>) {
        *lock(&self.0) = gate;
    }

    fn check(&self) -> io::Result<()> {
        match &*lock(&self.0) {
            Some(gate) => gate
                .check()
                .map_err(|closed| io::Error::new(io::ErrorKind::PermissionDenied, closed)),
            None => Ok(()),
        }
    }
}

/// The gate's refusal in a failed request's chain of causes: the fence
/// refused a write (or a connection) because the request's gate closed.
pub(super) fn gate_refusal<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a GateClosed> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(closed) = c.downcast_ref::<GateClosed>() {
            return Some(closed);
        }
        // `io::Error::source` skips the error it wraps.
        if let Some(closed) = c
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<GateClosed>())
        {
            return Some(closed);
        }
        cur = c.source();
    }
    None
}

/// Opens TCP connections whose sockets are [`Fenced`]; refuses to open
/// one past the gate.
#[derive(Clone)]
struct FencedTcp {
    tcp: HttpConnector,
    fence: FenceSlot,
}

/// A fenced TCP socket.
type FencedSocket = Fenced<TokioIo<tokio::net::TcpStream>>;

impl Service<Uri> for FencedTcp {
    type Response = FencedSocket;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let fence = self.fence.clone();
        let connecting = self.tcp.call(dst);
        Box::pin(async move {
            // Not even a SYN past the gate: opening a connection already
            // tells the CA (or the proxy) something.
            fence.check()?;
            Ok(Fenced {
                io: connecting.await?,
                fence,
            })
        })
    }
}

/// A socket that asks its connection's gate before every write.
struct Fenced<T> {
    io: T,
    fence: FenceSlot,
}

impl<T> Fenced<T> {
    fn open(&self) -> io::Result<()> {
        self.fence.check()
    }
}

impl<T: Read + Unpin> Read for Fenced<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for Fenced<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.open()?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.open()?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A FIN carries no bytes, but past the gate the socket is only
        // dropped: closing it is the same to the CA, and one rule is
        // easier to trust than two.
        let this = self.get_mut();
        this.open()?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
