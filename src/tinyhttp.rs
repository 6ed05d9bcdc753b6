//! Just enough of an HTTP/1.1 server for certd's own two listeners: the
//! http-01 responder and the metrics endpoint. One request per connection,
//! bounded size and time, `Connection: close`; every task owned by the
//! caller's `TaskTracker` and stopped by its `CancellationToken`.
//!
//! The accept loop ([`accept_loop`], shared with the tls-alpn-01 listener)
//! is open to anyone on the network, so it must never take the file
//! descriptors certd needs for its own work (the CA, the ledger, the
//! configuration). Each listener admits at most a fraction of the
//! process's descriptor limit in total ([`Limits`]), and at most a quarter
//! of that per source address (per /64 for IPv6). When a limit is reached
//! the *oldest connection that has not yet sent its request* is closed to
//! make room: a flood of idle connections only ever evicts itself, while a
//! real client (the CA's validation, a scrape) sends its request right after
//! connecting and is then no longer evictable. Refusing new connections
//! instead would let whoever holds the slots lock everyone else out, and
//! the CA's validation comes from the same kind of address as the flood
//! (on one machine, from the same one). Requests must arrive within
//! `HEADER_TIMEOUT` and `MAX_REQUEST` bytes.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Requests larger than this are not for certd.
const MAX_REQUEST: usize = 8192;
/// The whole request head must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The whole exchange, answer included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one "accept failed" warning per listener in this long.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(60);

/// The request line, which is all certd's listeners look at.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub method: String,
    pub target: String,
}

#[derive(Debug, Clone)]
pub(crate) struct Response {
    pub code: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub(crate) fn text(code: u16, body: impl Into<String>) -> Self {
        Self {
            code,
            content_type: "text/plain",
            body: body.into(),
        }
    }
}

/// Serves `listener` until `cancel` fires, answering each request with
/// `handler`.
pub(crate) fn serve<H, F>(
    listener: TcpListener,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
    handler: H,
) where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let handler = Arc::new(handler);
    accept_loop(listener, "http", tracker, cancel, move |stream, ticket| {
        let handler = handler.clone();
        async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, one(stream, &ticket, &*handler)).await;
        }
    });
}

/// How many connections one listener holds at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub total: usize,
    pub per_source: usize,
}

impl Limits {
    /// An eighth of the descriptor limit per listener (certd has at most
    /// three: http-01, tls-alpn-01, metrics), so well over half is always
    /// left for certd's own work; a quarter of that per source.
    pub(crate) fn for_fd_limit(nofile: u64) -> Self {
        let total = usize::try_from(nofile / 8)
            .unwrap_or(usize::MAX)
            .clamp(16, 1024);
        Self {
            total,
            per_source: (total / 4).max(4),
        }
    }
}

/// Raises the soft limit on open files to the hard limit (systemd's
/// `LimitNOFILE` sets both) and returns the soft limit now in force.
pub(crate) fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the call's duration.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; setrlimit only reads it.
        // A sandbox may forbid it (EPERM): the old limit stays.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    lim.rlim_cur
}

fn fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 1024,
        rlim_max: 1024,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the call's duration.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) };
    lim.rlim_cur
}

/// The connections one listener holds, oldest first (ids only grow).
#[derive(Debug)]
struct Admission {
    limits: Limits,
    conns: Mutex<BTreeMap<u64, Conn>>,
    next: AtomicU64,
}

#[derive(Debug)]
struct Conn {
    source: IpAddr,
    /// Still waiting for the request: may be closed to make room.
    idle: bool,
    evict: CancellationToken,
}

/// One admitted connection's place; given back when dropped.
pub(crate) struct Ticket {
    admission: Arc<Admission>,
    id: u64,
}

impl Ticket {
    /// The request has arrived: the connection is no longer evictable.
    pub(crate) fn busy(&self) {
        if let Some(c) = self.admission.lock().get_mut(&self.id) {
            c.idle = false;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.lock().remove(&self.id);
    }
}

impl Admission {
    fn new(limits: Limits) -> Self {
        Self {
            limits,
            conns: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
        }
    }

    /// Entries are inserted and removed whole: a poisoned map is intact.
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Conn>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a connection from `peer`, closing the oldest idle one
    /// (from the same source if that source is at its limit) to make room;
    /// `None` if every place is taken by a connection being answered.
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<(Ticket, CancellationToken)> {
        let source = source_of(peer);
        let mut conns = self.lock();
        let from_source = conns.values().filter(|c| c.source == source).count();
        if from_source >= self.limits.per_source {
            evict_oldest(&mut conns, |c| c.source == source)?;
        } else if conns.len() >= self.limits.total {
            evict_oldest(&mut conns, |_| true)?;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evict = CancellationToken::new();
        conns.insert(
            id,
            Conn {
                source,
                idle: true,
                evict: evict.clone(),
            },
        );
        let ticket = Ticket {
            admission: self.clone(),
            id,
        };
        Some((ticket, evict))
    }
}

/// Closes the oldest idle connection `matching`; `None` if there is none.
fn evict_oldest(conns: &mut BTreeMap<u64, Conn>, matching: impl Fn(&Conn) -> bool) -> Option<()> {
    let id = conns
        .iter()
        .find(|(_, c)| c.idle && matching(c))
        .map(|(id, _)| *id)?;
    if let Some(c) = conns.remove(&id) {
        c.evict.cancel();
    }
    Some(())
}

/// What counts as one source: an IPv4 address, or an IPv6 /64 (one host's
/// usual allocation).
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// Accepts connections on `listener` until `cancel` fires, within
/// [`Limits`] for the current descriptor limit, and runs `conn` for each
/// in a task of `tracker`, ended early if the connection is evicted.
/// `what` names the listener in the log.
pub(crate) fn accept_loop<C, F>(
    listener: TcpListener,
    what: &'static str,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
    conn: C,
) where
    C: Fn(TcpStream, Ticket) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let admission = Arc::new(Admission::new(Limits::for_fd_limit(fd_limit())));
    let cancel = cancel.clone();
    let conns = tracker.clone();
    tracker.spawn(async move {
        let mut backoff = Backoff::default();
        loop {
            let (stream, peer) = tokio::select! {
                () = cancel.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        backoff.failed(what, &e).await;
                        continue;
                    }
                },
            };
            backoff.succeeded();
            let Some((ticket, evicted)) = admission.admit(peer.ip()) else {
                // Every place is answering a request: this one waits for
                // nothing, so close it now.
                continue;
            };
            let cancel = cancel.clone();
            let task = conn(stream, ticket);
            conns.spawn(async move {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = evicted.cancelled() => {}
                    () = task => {}
                }
            });
            // Let the new connection read its request before the next
            // accept can count it as idle.
            tokio::task::yield_now().await;
        }
    });
}

/// Backing off after failed accepts (out of file descriptors, above all),
/// with one warning a minute at most instead of one per attempt.
#[derive(Default)]
struct Backoff {
    delay: Duration,
    last_warning: Option<Instant>,
    suppressed: u64,
}

impl Backoff {
    async fn failed(&mut self, what: &'static str, e: &std::io::Error) {
        // A client that gave up before the accept: nothing to wait for.
        if e.kind() == std::io::ErrorKind::ConnectionAborted {
            return;
        }
        if self
            .last_warning
            .is_none_or(|at| at.elapsed() >= ACCEPT_WARN_EVERY)
        {
            tracing::warn!(
                listener = what,
                error = %e,
                suppressed = self.suppressed,
                "accept failed; backing off (further failures are counted, not logged, for a minute)"
            );
            self.last_warning = Some(Instant::now());
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        self.delay = (self.delay * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        tokio::time::sleep(self.delay).await;
    }

    fn succeeded(&mut self) {
        self.delay = Duration::ZERO;
    }
}

/// Binds `addr`; the address actually bound (port 0 picks one).
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr().unwrap_or(addr);
    Ok((listener, local))
}

async fn one<H, F>(mut stream: TcpStream, ticket: &Ticket, handler: &H)
where
    H: Fn(Request) -> F,
    F: Future<Output = Response>,
{
    let mut buf = Vec::with_capacity(1024);
    let head = async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.len() > MAX_REQUEST {
                let _ = stream
                    .write_all(&encode(&Response::text(431, ""), false))
                    .await;
                return false;
            }
        }
        true
    };
    if !matches!(tokio::time::timeout(HEADER_TIMEOUT, head).await, Ok(true)) {
        return;
    }
    ticket.busy();
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let request = Request {
        method: parts.next().unwrap_or("").to_owned(),
        target: parts.next().unwrap_or("").to_owned(),
    };
    let head = request.method == "HEAD";
    let response = if matches!(request.method.as_str(), "GET" | "HEAD") {
        handler(request).await
    } else {
        Response::text(405, "")
    };
    let _ = stream.write_all(&encode(&response, head)).await;
    let _ = stream.shutdown().await;
}

fn encode(r: &Response, head: bool) -> Vec<u8> {
    let reason = match r.code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        _ => "Request Header Fields Too Large",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.code,
        r.content_type,
        r.body.len()
    )
    .into_bytes();
    if !head {
        out.extend_from_slice(r.body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_source_evicts_its_own_oldest_idle_connection() {
        let admission = Arc::new(Admission::new(Limits {
            total: 4,
            per_source: 2,
        }));
        let flood: IpAddr = "192.0.2.1".parse().expect("ip");
        let other: IpAddr = "2001:db8::1".parse().expect("ip");
        let (first, first_evicted) = admission.admit(flood).expect("room");
        let (second, second_evicted) = admission.admit(flood).expect("room");
        second.busy();
        // The source is full: its oldest idle connection makes room.
        let (_third, _) = admission.admit(flood).expect("room");
        assert!(first_evicted.is_cancelled());
        assert!(!second_evicted.is_cancelled(), "busy: never evicted");
        drop(first);
        // The same /64 is one source.
        let (_a, _) = admission.admit(other).expect("room");
        let (_b, b_evicted) = admission
            .admit("2001:db8::2".parse().expect("ip"))
            .expect("room");
        // Total full (4): the oldest idle anywhere goes.
        let (_c, _) = admission
            .admit("198.51.100.7".parse().expect("ip"))
            .expect("room");
        assert!(!b_evicted.is_cancelled());
        assert_eq!(admission.lock().len(), 4);
    }

    #[test]
    fn busy_connections_are_never_evicted() {
        let admission = Arc::new(Admission::new(Limits {
            total: 16,
            per_source: 1,
        }));
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let (answering, _) = admission.admit(ip).expect("room");
        answering.busy();
        assert!(admission.admit(ip).is_none(), "no idle one to evict");
        drop(answering);
        assert!(admission.admit(ip).is_some());
    }

    #[test]
    fn limits_leave_most_descriptors_to_certd() {
        assert_eq!(
            Limits::for_fd_limit(1024),
            Limits {
                total: 128,
                per_source: 32
            }
        );
        assert_eq!(Limits::for_fd_limit(64).total, 16);
        assert_eq!(Limits::for_fd_limit(1 << 20).total, 1024);
    }
}
