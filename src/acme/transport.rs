//! The connections ACME requests travel on, and the fence on them.
//!
//! A connection is TCP (tunnelled with `CONNECT` through the http proxy
//! the environment names, `HTTPS_PROXY` and `NO_PROXY` as curl reads
//! them), then a [`Fenced`] socket, then TLS, then HTTP/1.1.
//!
//! The fence sits under TLS, on the socket itself. Inside a gated run (a
//! fleet host acting under a lease), every write to the socket first asks
//! the run's [`RequestGate`]: a request's bytes, TLS's own records (a
//! `close_notify` when a connection winds down), a proxy's `CONNECT`.
//! Past the gate the write fails and nothing reaches the wire. Asking once
//! before each request is not enough: a process stopped (SIGSTOP, a paused
//! VM) between that question and the write wakes past its lease and
//! sends anyway; here the question is the last step before the write
//! system call. What no client can close is the few instructions between
//! that step and the system call itself; only a CA checking a fencing
//! token could, and ACME has none.
//!
//! A gated run's connections are its own ([`GateScope`]): a pooled
//! connection carries requests of one gate only, so a socket fenced by
//! one lease never carries another's request, and the run's connections
//! close when it ends.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::Full;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tower_service::Service;

use super::http::{GateClosed, RequestGate, lock};

/// How long a TCP connection (to the CA, or to the proxy) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle pooled connections are closed after this long; a renewal's
/// requests come in bursts, and the next burst may be days away.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// A request body: ACME bodies are whole JWS documents.
pub(super) type Body = Full<Bytes>;
/// A pool of connections, all fenced by one gate (or by none).
pub(super) type Pool = Client<Connector, Body>;
/// The error hyper-util's connector services speak.
type BoxError = Box<dyn StdError + Send + Sync>;

/// What every connection of one [`AcmeHttp`](super::AcmeHttp) is built
/// from, and the pool of connections outside any gated run.
pub(super) struct Transport {
    /// Tells this transport's pools apart in a [`GateScope`].
    id: u64,
    tls: TlsConnector,
    proxies: Arc<Matcher>,
    shared: Pool,
}

impl Transport {
    /// A transport speaking TLS with `tls` (HTTP/1.1 is offered by ALPN),
    /// through the proxies the environment names.
    pub(super) fn new(mut tls: rustls::ClientConfig) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tls = TlsConnector::from(Arc::new(tls));
        let proxies = Arc::new(Matcher::from_env());
        let shared = pool(Connector {
            tls: tls.clone(),
            proxies: proxies.clone(),
            gate: None,
        });
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            tls,
            proxies,
            shared,
        }
    }

    /// The pool a request goes out on: inside a gated run, the run's own
    /// (created at its first request), whose sockets ask the gate before
    /// every write; outside one, the shared pool.
    pub(super) fn pool(&self, scope: Option<&GateScope>) -> Pool {
        let Some(scope) = scope else {
            return self.shared.clone();
        };
        let mut pools = lock(&scope.pools);
        if let Some((_, pool)) = pools.iter().find(|(id, _)| *id == self.id) {
            return pool.clone();
        }
        let fenced = pool(Connector {
            tls: self.tls.clone(),
            proxies: self.proxies.clone(),
            gate: Some(scope.gate.clone()),
        });
        pools.push((self.id, fenced.clone()));
        fenced
    }
}

/// One gated run: its gate, and the pools of connections it opened (one
/// per transport it used). Dropped when the run ends, and with it the
/// run's connections.
pub(crate) struct GateScope {
    pub(super) gate: Arc<dyn RequestGate>,
    pools: Mutex<Vec<(u64, Pool)>>,
}

impl GateScope {
    pub(super) fn new(gate: Arc<dyn RequestGate>) -> Self {
        Self {
            gate,
            pools: Mutex::new(Vec::new()),
        }
    }
}

/// The gate's refusal in a failed request's chain of causes: the fence
/// refused a write (or a connection) because the run's gate closed.
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

fn pool(connector: Connector) -> Pool {
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE)
        .build(connector)
}

/// Opens TLS connections to the CA, through a proxy where the environment
/// names one, on fenced sockets.
#[derive(Clone)]
pub(super) struct Connector {
    tls: TlsConnector,
    proxies: Arc<Matcher>,
    gate: Option<Arc<dyn RequestGate>>,
}

impl Service<Uri> for Connector {
    type Response = TlsConn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsConn, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        Box::pin(self.clone().connect(dst))
    }
}

impl Connector {
    async fn connect(self, dst: Uri) -> Result<TlsConn, BoxError> {
        let host = dst.host().ok_or("the URL names no host")?;
        // An IPv6 literal comes bracketed in a URI, bare in a server name.
        let name = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(name.to_owned())?;
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
        tcp.set_nodelay(true);
        let mut tcp = FencedTcp {
            tcp,
            gate: self.gate.clone(),
        };
        let socket = match self.proxies.intercept(&dst) {
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
                tunnel.call(dst).await?
            }
            None => tcp.call(dst).await?,
        };
        let tls = self.tls.connect(server_name, TokioIo::new(socket)).await?;
        Ok(TlsConn(TokioIo::new(tls)))
    }
}

/// Opens TCP connections whose sockets are [`Fenced`]; refuses to open
/// one past the gate.
#[derive(Clone)]
struct FencedTcp {
    tcp: HttpConnector,
    gate: Option<Arc<dyn RequestGate>>,
}

impl Service<Uri> for FencedTcp {
    type Response = Fenced<TokioIo<tokio::net::TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let gate = self.gate.clone();
        let connecting = self.tcp.call(dst);
        Box::pin(async move {
            // Not even a SYN past the gate: opening a connection already
            // tells the CA (or the proxy) something.
            if let Some(gate) = &gate {
                gate.check()?;
            }
            Ok(Fenced {
                io: connecting.await?,
                gate,
            })
        })
    }
}

/// A socket that asks its gate before every write.
struct Fenced<T> {
    io: T,
    gate: Option<Arc<dyn RequestGate>>,
}

impl<T> Fenced<T> {
    fn open(&self) -> io::Result<()> {
        match &self.gate {
            Some(gate) => gate
                .check()
                .map_err(|closed| io::Error::new(io::ErrorKind::PermissionDenied, closed)),
            None => Ok(()),
        }
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

/// A TLS connection, as hyper's client drives it.
pub(super) struct TlsConn(TokioIo<TlsStream<TokioIo<Fenced<TokioIo<tokio::net::TcpStream>>>>>);

impl Connection for TlsConn {
    fn connected(&self) -> Connected {
        // Through a proxy it is a tunnel: requests keep the origin form.
        Connected::new()
    }
}

impl Read for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl Write for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
