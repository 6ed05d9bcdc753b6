//! Challenge solvers: make a challenge's response visible to the CA, then
//! take it away again.
//!
//! One trait, one implementation per way of answering. `present` and
//! `cleanup` are symmetric and the driver calls `cleanup` on every path,
//! including errors, so nothing is left behind in a webroot or a DNS zone.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::ffi::CString;
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::config::{
    ChallengeKind, Config, Dns01Config, Dns01Mode, DnsAlias, Http01Config, Preflight,
    PropagationConfig, TlsAlpn01Config,
};
use crate::dns::persist::{PersistExpect, persist_record};
use crate::dns::propagation::{Expect, PropagationCheck};
use crate::dns::rfc2136::Rfc2136Solver;
use crate::process::{ProgramEnd, run_program, tail};
use crate::tinyhttp::{self, Response};

mod tls_alpn;
pub use tls_alpn::TlsAlpnSolver;

/// A challenge token from the CA, checked once where it enters certd.
///
/// The token names a file in a webroot and a key in the responder's map, so
/// it must be a plain name: RFC 8555 §8.1 makes it base64url (`[A-Za-z0-9_-]`)
/// with at least 128 bits of entropy (22 characters). Anything else (`..`,
/// `/`, an absolute path, a NUL) is a CA attacking the file system.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Token(String);

impl Token {
    /// 128 bits of entropy in base64url, rounded up.
    const MIN_LEN: usize = 22;
    /// Well under a file name's 255 bytes; CAs send 43.
    const MAX_LEN: usize = 128;

    pub fn parse(token: &str) -> Result<Self, SolverError> {
        let reason = if token.len() < Self::MIN_LEN {
            Some("shorter than 22 characters (128 bits)")
        } else if token.len() > Self::MAX_LEN {
            Some("longer than 128 characters")
        } else if !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            Some("not base64url")
        } else {
            None
        };
        match reason {
            None => Ok(Self(token.to_owned())),
            Some(reason) => Err(SolverError::BadToken {
                // Quoted and cut short: the value is the CA's, not ours.
                token: format!("{:?}", token.chars().take(64).collect::<String>()),
                reason,
            }),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Lets the responder look a request's path segment up without parsing it.
impl Borrow<str> for Token {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// What a solver needs to know about one challenge.
#[derive(Debug, Clone)]
pub struct ChallengeSpec {
    /// The configured name the authorization is for (`example.com`, or
    /// `*.example.com` for a wildcard's), never the CA's text.
    pub identifier: String,
    /// `None` for a type without one (dns-persist-01 has no token; a
    /// missing or short token there must not stop an order).
    pub token: Option<Token>,
    /// `token.thumbprint`: served as-is for http-01.
    pub key_authorization: String,
    /// base64url(SHA-256(key authorization)): the TXT value for dns-01.
    pub dns_value: String,
    /// The certificate's `dns_alias`: where dns-01 writes instead.
    pub dns_alias: Option<DnsAlias>,
    /// dns-persist-01: what the standing record must say.
    pub persist: Option<PersistExpect>,
}

impl ChallengeSpec {
    /// The token, for the types that have one.
    pub fn token(&self) -> Result<&Token, SolverError> {
        self.token.as_ref().ok_or_else(|| SolverError::BadToken {
            token: "(none)".into(),
            reason: "missing",
        })
    }

    /// Where dns-01 puts the TXT record before CNAMEs are followed:
    /// `_acme-challenge.<name>`, or the certificate's alias.
    pub fn dns_record(&self) -> String {
        match &self.dns_alias {
            Some(alias) => alias.record_for(&self.identifier),
            None => crate::dns::challenge_record(&self.identifier),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SolverError {
    #[error("{}", listen_message(*addr, source))]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("http-01 webroot {path}: {source}")]
    Webroot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("dns-01 hook {hook} {action} for {record}: {detail}")]
    Hook {
        hook: PathBuf,
        action: &'static str,
        record: String,
        detail: String,
    },
    #[error("dns-01 RFC 2136 {action} of {record} in zone {zone} at {server}: {source}")]
    Rfc2136 {
        action: &'static str,
        server: String,
        zone: String,
        record: String,
        #[source]
        source: Box<crate::dns::DnsError>,
    },
    #[error("dns-01 RFC 2136 key {key_name}: {detail}")]
    Rfc2136Key { key_name: String, detail: String },
    #[error("dns-01 record {record}: {source}")]
    DnsTarget {
        record: String,
        #[source]
        source: Box<crate::dns::propagation::PropagationError>,
    },
    #[error("dns-persist-01 record {record}: {source}")]
    Persist {
        record: String,
        #[source]
        source: Box<crate::dns::propagation::PropagationError>,
    },
    #[error("dns-persist-01 for {0}: the CA's challenge names no issuer domain")]
    PersistIssuer(String),
    #[error("dns-01 propagation check for {record}: {source}")]
    Propagation {
        record: String,
        #[source]
        source: Box<crate::dns::propagation::PropagationError>,
    },
    #[error("the CA sent the challenge token {token}, which is {reason}; refusing to use it")]
    BadToken { token: String, reason: &'static str },
    #[error("no solver is configured for {0}")]
    NotConfigured(ChallengeKind),
    #[error("tls-alpn-01: {0}")]
    TlsAlpn(String),
    #[error("http-01 pre-flight for {identifier} at {target}: {detail}")]
    Preflight {
        identifier: String,
        target: String,
        detail: String,
    },
}

#[async_trait]
pub trait Solver: Send + Sync {
    fn kind(&self) -> ChallengeKind;

    /// Makes the response visible to the CA.
    async fn present(&self, c: &ChallengeSpec) -> Result<(), SolverError>;

    /// Removes what `present` added. Safe to call after a failed `present`.
    async fn cleanup(&self, c: &ChallengeSpec) -> Result<(), SolverError>;

    /// Checks, before the CA is asked to validate, that the response is
    /// reachable the way the CA will fetch it, where the solver can tell
    /// (seed 003: a doomed validation costs failure budget, a failed
    /// self-check costs nothing).
    async fn preflight(&self, _c: &ChallengeSpec) -> Result<(), SolverError> {
        Ok(())
    }

    /// Waits (at most `max`) until the CA has probably fetched the response,
    /// so the first poll of the authorization is not wasted. Solvers that
    /// cannot tell return at once.
    async fn wait_fetched(&self, _c: &ChallengeSpec, _max: Duration) -> bool {
        false
    }

    /// Checks, before an order is placed, that what this solver answers
    /// through is usable (a webroot that exists, a hook that can run, a
    /// listener that is bound): an order that cannot complete still costs
    /// the CA's budget. Solvers with nothing local to check are ready.
    fn check(&self) -> Result<(), Unready> {
        Ok(())
    }
}

/// Something a solver needs is not usable: what, why, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {problem}; fix: {fix}")]
pub struct Unready {
    /// The path or address concerned, with the configuration key.
    pub what: String,
    pub problem: String,
    pub fix: String,
}

/// The solvers a configuration asks for, keyed by challenge type. Clones
/// share one table, so a reload's [`Solvers::reconfigure`] reaches every
/// holder; an order keeps the solver it presented with until it is done.
#[derive(Clone, Default)]
pub struct Solvers {
    by_kind: Arc<RwLock<HashMap<ChallengeKind, Arc<dyn Solver>>>>,
    /// The running responders, reused by a reload that keeps their
    /// address (the port is taken).
    listeners: Arc<Mutex<Listeners>>,
}

/// The sections of a configuration the solvers are built from.
#[derive(Clone, Copy, Default, PartialEq)]
pub struct ChallengeSettings<'a> {
    pub http01: Option<&'a Http01Config>,
    pub dns01: Option<&'a Dns01Config>,
    pub tls_alpn01: Option<&'a TlsAlpn01Config>,
}

impl<'a> ChallengeSettings<'a> {
    pub fn of(cfg: &'a Config) -> Self {
        Self {
            http01: cfg.http01.as_ref(),
            dns01: cfg.dns01.as_ref(),
            tls_alpn01: cfg.tls_alpn01.as_ref(),
        }
    }
}

#[derive(Default)]
struct Listeners {
    http01: Option<Listener<Http01Responder>>,
    tls_alpn01: Option<Listener<Arc<TlsAlpnSolver>>>,
}

/// A responder and what stops it: the last solver holding it going away
/// (a reload moved it), or shutdown.
#[derive(Clone)]
struct Listener<T> {
    addr: SocketAddr,
    handle: T,
    stop: Arc<DropGuard>,
}

impl Solvers {
    /// Builds the solvers for `cfg`. Listeners (the standalone http-01
    /// responder, the tls-alpn-01 responder) start only for the kinds in
    /// `needed`: a one-shot run with nothing due should not bind port 80.
    pub async fn from_config(
        cfg: &Config,
        needed: &[ChallengeKind],
        tracker: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Result<Self, SolverError> {
        let solvers = Self::default();
        let failed = solvers
            .reconfigure(
                ChallengeSettings::default(),
                ChallengeSettings::of(cfg),
                needed,
                tracker,
                cancel,
            )
            .await;
        match failed.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(solvers),
        }
    }

    /// Swaps in the solvers of the sections that differ between `old` and
    /// `new`. A section whose new solver cannot start (a port taken, a bad
    /// key) keeps its running one; its error is returned. Orders already
    /// presenting keep the solver (and listener) they started with.
    pub async fn reconfigure(
        &self,
        old: ChallengeSettings<'_>,
        new: ChallengeSettings<'_>,
        needed: &[ChallengeKind],
        tracker: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Vec<(ChallengeKind, SolverError)> {
        let mut failed = Vec::new();
        if old.http01 != new.http01 {
            match self.http01(new.http01, needed, tracker, cancel).await {
                Ok(solver) => self.set(ChallengeKind::Http01, solver),
                Err(e) => failed.push((ChallengeKind::Http01, e)),
            }
        }
        if old.dns01 != new.dns01 {
            let solver: Result<Option<Arc<dyn Solver>>, SolverError> = match new.dns01 {
                None => Ok(None),
                Some(d) => match &d.mode {
                    Dns01Mode::Hook(hook) => Ok(Some(Arc::new(Dns01Hook::new(hook, d)))),
                    Dns01Mode::Rfc2136(r) => {
                        Rfc2136Solver::new(r, d).map(|s| Some(Arc::new(s) as Arc<dyn Solver>))
                    }
                },
            };
            match solver {
                Ok(solver) => self.set(ChallengeKind::Dns01, solver),
                Err(e) => failed.push((ChallengeKind::Dns01, e)),
            }
        }
        // dns-persist-01 needs no section: it checks through [dns01]'s
        // servers where there is one, else through the system's resolvers.
        if old.dns01 != new.dns01 || self.get(ChallengeKind::DnsPersist01).is_err() {
            let propagation = new.dns01.map(|d| d.propagation.clone()).unwrap_or_default();
            self.set(
                ChallengeKind::DnsPersist01,
                Some(Arc::new(DnsPersistSolver::new(&propagation))),
            );
        }
        if old.tls_alpn01 != new.tls_alpn01 {
            let wanted = new
                .tls_alpn01
                .filter(|_| needed.contains(&ChallengeKind::TlsAlpn01));
            match self
                .tls_alpn01(wanted.map(|t| t.listen), tracker, cancel)
                .await
            {
                Ok(solver) => self.set(ChallengeKind::TlsAlpn01, solver),
                Err(e) => failed.push((ChallengeKind::TlsAlpn01, e)),
            }
        }
        failed
    }

    /// Runs every solver's [`Solver::check`] for the challenge types in
    /// `kinds`; a type with no solver is reported by name.
    pub fn check(&self, kinds: &[ChallengeKind]) -> Result<(), Unready> {
        for kind in kinds {
            match self.get(*kind) {
                Ok(solver) => solver.check()?,
                Err(e) => {
                    return Err(Unready {
                        what: kind.as_str().to_owned(),
                        problem: e.to_string(),
                        fix: format!("configure [{}]", kind.as_str().replace('-', "")),
                    });
                }
            }
        }
        Ok(())
    }

    pub fn get(&self, kind: ChallengeKind) -> Result<Arc<dyn Solver>, SolverError> {
        self.by_kind
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&kind)
            .cloned()
            .ok_or(SolverError::NotConfigured(kind))
    }

    fn set(&self, kind: ChallengeKind, solver: Option<Arc<dyn Solver>>) {
        let mut by_kind = self.by_kind.write().unwrap_or_else(PoisonError::into_inner);
        match solver {
            Some(s) => by_kind.insert(kind, s),
            None => by_kind.remove(&kind),
        };
    }

    fn listeners(&self) -> MutexGuard<'_, Listeners> {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    async fn http01(
        &self,
        cfg: Option<&Http01Config>,
        needed: &[ChallengeKind],
        tracker: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Result<Option<Arc<dyn Solver>>, SolverError> {
        let Some(h) = cfg else {
            self.listeners().http01 = None;
            return Ok(None);
        };
        let addr = h.listen.filter(|_| needed.contains(&ChallengeKind::Http01));
        let running = self.listeners().http01.clone();
        let listener = match (addr, running) {
            (None, _) => None,
            (Some(addr), Some(l)) if l.addr == addr => Some(l),
            (Some(addr), _) => {
                let stop = cancel.child_token();
                let handle = Http01Responder::start(addr, tracker, &stop).await?;
                Some(Listener {
                    addr,
                    handle,
                    stop: Arc::new(stop.drop_guard()),
                })
            }
        };
        self.listeners().http01 = listener.clone();
        let solver = Http01Solver::new(h, listener.as_ref().map(|l| l.handle.clone()));
        Ok(Some(Arc::new(Owned {
            solver: Arc::new(solver),
            _stop: listener.map(|l| l.stop),
        })))
    }

    async fn tls_alpn01(
        &self,
        addr: Option<SocketAddr>,
        tracker: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Result<Option<Arc<dyn Solver>>, SolverError> {
        let Some(addr) = addr else {
            self.listeners().tls_alpn01 = None;
            return Ok(None);
        };
        let stop = cancel.child_token();
        let handle = Arc::new(TlsAlpnSolver::start(addr, tracker, &stop).await?);
        let listener = Listener {
            addr,
            handle,
            stop: Arc::new(stop.drop_guard()),
        };
        self.listeners().tls_alpn01 = Some(listener.clone());
        Ok(Some(Arc::new(Owned {
            solver: listener.handle,
            _stop: Some(listener.stop),
        })))
    }
}

/// A solver with the responder it answers through: the responder stops
/// when the last holder of the guard goes away.
struct Owned {
    solver: Arc<dyn Solver>,
    _stop: Option<Arc<DropGuard>>,
}

#[async_trait]
impl Solver for Owned {
    fn kind(&self) -> ChallengeKind {
        self.solver.kind()
    }
    async fn present(&self, c: &ChallengeSpec) -> Result<(), SolverError> {
        self.solver.present(c).await
    }
    async fn cleanup(&self, c: &ChallengeSpec) -> Result<(), SolverError> {
        self.solver.cleanup(c).await
    }
    async fn preflight(&self, c: &ChallengeSpec) -> Result<(), SolverError> {
        self.solver.preflight(c).await
    }
    async fn wait_fetched(&self, c: &ChallengeSpec, max: Duration) -> bool {
        self.solver.wait_fetched(c, max).await
    }
    fn check(&self) -> Result<(), Unready> {
        self.solver.check()
    }
}

// ---- http-01 -------------------------------------------------------------

const WELL_KNOWN: &str = "/.well-known/acme-challenge/";
/// Why the http-01 responder could not listen, cause first; a port in use
/// is nearly always a web server, and the webroot is how certd works beside
/// one.
fn listen_message(addr: SocketAddr, source: &std::io::Error) -> String {
    if source.kind() == std::io::ErrorKind::AddrInUse {
        format!(
            "port {} is in use (a web server?): use `[http01] webroot` instead; \
             the http-01 responder cannot listen on {addr}: {source}",
            addr.port()
        )
    } else {
        format!("the http-01 responder cannot listen on {addr}: {source}")
    }
}

/// Where http-01 files go below a webroot.
const CHALLENGE_DIR: [&str; 2] = [".well-known", "acme-challenge"];

/// http-01 through the standalone responder, a webroot, or both.
pub struct Http01Solver {
    responder: Option<Http01Responder>,
    webroot: Option<PathBuf>,
    preflight: Preflight,
    /// The local web server a webroot is pre-flighted through.
    local_web: SocketAddr,
}

/// Where a webroot's web server is asked for the token: this host's port
/// 80, the name in `Host`.
const LOCAL_WEB: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    80,
));

impl Http01Solver {
    fn new(cfg: &Http01Config, responder: Option<Http01Responder>) -> Self {
        Self {
            responder,
            webroot: cfg.webroot.clone(),
            preflight: cfg.preflight,
            local_web: LOCAL_WEB,
        }
    }

    /// The file's path, for messages; files are reached through `webroot`.
    fn webroot_file(root: &Path, token: &Token) -> PathBuf {
        let mut path = root.to_path_buf();
        path.extend(CHALLENGE_DIR);
        path.push(token.as_str());
        path
    }
}

#[async_trait]
impl Solver for Http01Solver {
    fn kind(&self) -> ChallengeKind {
        ChallengeKind::Http01
    }

    async fn present(&self, c: &ChallengeSpec) -> Result<(), SolverError> {
        let token = c.token()?;
        if let Some(r) = &self.responder {
            r.add(token, &c.key_authorization);
        }
        if let Some(root) = &self.webroot {
            let (dir_root, owned) = (root.clone(), token.clone());
            let content = c.key_authorization.clone().into_bytes();
            blocking(move || webroot::write(&dir_root, &owned, &content))
                .await
                .map_err(|source| SolverError::Webroot {
                    path: Self::webroot_file(root, token),
                    source,
                })?;
        }
        Ok(())
    }

    async fn cleanup(&self, c: &ChallengeSpec) -> Result<(), SolverError> {
        let token = c.token()?;
        if let Some(r) = &self.responder {
            r.remove(token);
        }
        if let Some(root) = &self.webroot {
            let (dir_root, owned) = (root.clone(), token.clone());
            blocking(move || webroot::remove(&dir_root, &owned))
                .await
                .map_err(|source| SolverError::Webroot {
                    path: Self::webroot_file(root, token),
                    source,
                })?;
        }
        Ok(())
    }

    async fn preflight(&self, c: &ChallengeSpec) -> Result<(), SolverError> {
        if self.preflight == Preflight::Off {
            return Ok(());
        }
        // The standalone responder is asked on its own address (the Host
        // header says which name).
        let target = match &self.responder {
            Some(r) => {
                let mut addr = r.local_addr();
                if let Some(ip) = local_ip(&c.identifier) {
                    // The CA connects to the address itself (RFC 8738
                    // section 4): a listener bound to the other family, or
                    // to another address, fails here and not at the CA.
                    addr.set_ip(ip);
                } else if addr.ip().is_unspecified() {
                    addr.set_ip(match addr {
                        SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                        SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                    });
                }
                addr.to_string()
            }
            // By default the local web server, asked for the name: what
            // the CA will fetch, unless a proxy or another host serves it.
            None if self.preflight == Preflight::IfServed => self.local_web.to_string(),
            // Asked for: through the name itself, as the CA will.
            None => format!("{}:80", http_host(&c.identifier)),
        };
        let err = |detail: String| SolverError::Preflight {
            identifier: c.identifier.clone(),
            target: target.clone(),
            detail,
        };
        let fetch = async {
            let mut stream = match TcpStream::connect(&target).await {
                Ok(stream) => stream,
                // No local web server: the name is served elsewhere, and
                // only the CA can tell.
                Err(e)
                    if self.preflight == Preflight::IfServed
                        && e.kind() == std::io::ErrorKind::ConnectionRefused =>
                {
                    tracing::debug!(identifier = %c.identifier, %target, "no local web server; webroot not pre-flighted");
                    return Ok(None);
                }
                Err(e) => return Err(err(format!("cannot connect: {e}"))),
            };
            let request = format!(
                "GET {WELL_KNOWN}{} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: certd-preflight\r\n\r\n",
                c.token()?,
                http_host(&c.identifier)
            );
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| err(e.to_string()))?;
            let mut response = Vec::new();
            stream
                .take(64 * 1024)
                .read_to_end(&mut response)
                .await
                .map_err(|e| err(e.to_string()))?;
            Ok::<_, SolverError>(Some(String::from_utf8_lossy(&response).into_owned()))
        };
        let Some(response) = tokio::time::timeout(Duration::from_secs(10), fetch)
            .await
            .map_err(|_| err("timed out".into()))??
        else {
            return Ok(());
        };
        let status_ok =
            response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200");
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        if status_ok && body.trim() == c.key_authorization {
            Ok(())
        } else {
            let first = response.lines().next().unwrap_or("no response").to_owned();
            Err(err(format!(
                "expected the key authorization, got {first:?}"
            )))
        }
    }

    fn check(&self) -> Result<(), Unready> {
        if let Some(root) = &self.webroot {
            let what = format!("http01.webroot {}", root.display());
            match std::fs::metadata(root) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(Unready {
                        what,
                        problem: "is not a directory".into(),
                        fix: "point webroot at the directory the web server serves".into(),
                    });
                }
                Err(e) => {
                    return Err(Unready {
                        what,
                        problem: e.to_string(),
                        fix: format!(
                            "create it (`mkdir -p {}`) or point webroot at the directory the web server serves",
                            root.display()
                        ),
                    });
                }
            }
        } else if self.responder.is_none() {
            return Err(Unready {
                what: "[http01]".into(),
                problem: "neither a listener nor a webroot answers http-01".into(),
                fix: "set http01.listen or http01.webroot".into(),
            });
        }
        Ok(())
    }

    async fn wait_fetched(&self, c: &ChallengeSpec, max: Duration) -> bool {
        let Some(r) = &self.responder else {
            return false;
        };
        let Ok(token) = c.token() else {
            return false;
        };
        let Some(seen) = r.seen_signal(token) else {
            return false;
        };
        tokio::time::timeout(max, seen.notified()).await.is_ok()
    }
}

/// Runs blocking file-system calls off the runtime's worker threads.
/// The identifier as an address of this host, if it is one. An address
/// that is not local (a NAT's public side) is not connected to: the host
/// may not reach itself through it.
fn local_ip(identifier: &str) -> Option<std::net::IpAddr> {
    let ip = identifier.parse::<std::net::IpAddr>().ok()?;
    std::net::UdpSocket::bind((ip, 0)).ok().map(|_| ip)
}

/// The identifier as an HTTP host: an IPv6 address in brackets (RFC 3986
/// section 3.2.2), as the CA writes it in its request (RFC 8738 section 5).
fn http_host(identifier: &str) -> String {
    match identifier.parse::<std::net::Ipv6Addr>() {
        Ok(v6) => format!("[{v6}]"),
        Err(_) => identifier.to_owned(),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

/// Webroot files, created and removed relative to directories opened
/// without following symbolic links, so neither the token nor a link
/// planted in the webroot can point a write or an unlink elsewhere.
mod webroot {
    use super::*;

    /// Writes `content` to `<root>/.well-known/acme-challenge/<token>`,
    /// a new file (O_EXCL) that is never a link (O_NOFOLLOW).
    pub(super) fn write(root: &Path, token: &Token, content: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let dir = challenge_dir(root, true)?;
        let name = c_name(token.as_str())?;
        let flags =
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        let fd = match openat(&dir, &name, flags, 0o644) {
            // Left by a run that died before its cleanup: the same token
            // is being presented again. unlinkat removes the entry itself,
            // never what a link there points to.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                unlinkat(&dir, &name)?;
                openat(&dir, &name, flags, 0o644)?
            }
            other => other?,
        };
        // The web server, another user, must read it whatever certd's
        // umask (the unit's 0027 would make it 0640).
        fchmod(&fd, 0o644)?;
        // No fsync: the file lives for one validation.
        std::fs::File::from(fd).write_all(content)
    }

    /// Sets `fd`'s mode on the descriptor itself, not by path.
    fn fchmod(fd: &OwnedFd, mode: libc::mode_t) -> std::io::Result<()> {
        // SAFETY: `fd` is an open descriptor owned by the caller for the
        // call's duration; fchmod touches no memory of ours.
        if unsafe { libc::fchmod(fd.as_raw_fd(), mode) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Removes the token's file; a missing file or directory is fine.
    pub(super) fn remove(root: &Path, token: &Token) -> std::io::Result<()> {
        let dir = match challenge_dir(root, false) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            other => other?,
        };
        match unlinkat(&dir, &c_name(token.as_str())?) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Opens `.well-known/acme-challenge` below the operator's webroot
    /// (which may itself be a link: the operator chose it), creating the
    /// two directories if `create`; neither may be a link.
    /// The webroot itself is never created: it is the directory a web
    /// server serves, and one that is missing is a mistake to report.
    fn challenge_dir(root: &Path, create: bool) -> std::io::Result<OwnedFd> {
        let mut dir = OwnedFd::from(std::fs::File::open(root)?);
        for part in CHALLENGE_DIR {
            let name = c_name(part)?;
            let mut made = false;
            if create {
                // SAFETY: `dir` is an open descriptor and `name` a
                // NUL-terminated string that outlives the call.
                let rc = unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o755) };
                if rc != 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::AlreadyExists {
                        return Err(e);
                    }
                }
                made = rc == 0;
            }
            let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
            dir = openat(&dir, &name, flags, 0)?;
            if made {
                // Searchable by the web server whatever the umask.
                fchmod(&dir, 0o755)?;
            }
        }
        Ok(dir)
    }

    fn c_name(name: &str) -> std::io::Result<CString> {
        CString::new(name).map_err(std::io::Error::other)
    }

    fn openat(dir: &OwnedFd, name: &CString, flags: i32, mode: u32) -> std::io::Result<OwnedFd> {
        // SAFETY: `dir` is an open descriptor and `name` a NUL-terminated
        // string that outlives the call; the mode is passed as the
        // variadic argument openat reads when O_CREAT is set.
        let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: openat returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn unlinkat(dir: &OwnedFd, name: &CString) -> std::io::Result<()> {
        // SAFETY: as in `openat`; flag 0 unlinks a non-directory entry.
        if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// One small HTTP server shared by all orders, answering
/// `GET /.well-known/acme-challenge/<token>` from an in-memory map.
#[derive(Clone)]
pub struct Http01Responder {
    tokens: Arc<Mutex<HashMap<Token, TokenEntry>>>,
    addr: SocketAddr,
}

#[derive(Clone)]
struct TokenEntry {
    key_authorization: String,
    /// Notified each time the token is served.
    seen: Arc<Notify>,
}

impl Http01Responder {
    /// Binds `addr` and serves until `cancel` fires; the task and every
    /// connection task belong to `tracker`.
    pub async fn start(
        addr: SocketAddr,
        tracker: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Result<Self, SolverError> {
        let (listener, addr) = tinyhttp::bind(addr)
            .await
            .map_err(|source| SolverError::Listen { addr, source })?;
        let responder = Self {
            tokens: Arc::new(Mutex::new(HashMap::new())),
            addr,
        };
        let tokens = responder.tokens.clone();
        tinyhttp::serve(listener, tracker, cancel, move |req| {
            let reply = answer(&tokens, &req.target);
            async move { reply }
        });
        tracing::debug!(%addr, "http-01 responder listening");
        Ok(responder)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    fn add(&self, token: &Token, key_authorization: &str) {
        lock(&self.tokens).insert(
            token.clone(),
            TokenEntry {
                key_authorization: key_authorization.to_owned(),
                seen: Arc::new(Notify::new()),
            },
        );
    }

    fn remove(&self, token: &Token) {
        lock(&self.tokens).remove(token);
    }

    fn seen_signal(&self, token: &Token) -> Option<Arc<Notify>> {
        lock(&self.tokens).get(token).map(|e| e.seen.clone())
    }
}

/// A poisoned token map is still a consistent map (inserts and removes are
/// single operations), so recover it instead of failing every validation.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The answer to a request for `target`: the key authorization of a
/// token in flight, else 404.
fn answer(tokens: &Mutex<HashMap<Token, TokenEntry>>, target: &str) -> Response {
    let entry = target
        .strip_prefix(WELL_KNOWN)
        .and_then(|token| lock(tokens).get(token).cloned());
    match entry {
        Some(e) => {
            e.seen.notify_waiters();
            // notify_waiters only wakes current waiters; also leave a
            // permit for a waiter that arrives just after.
            e.seen.notify_one();
            Response::text(200, e.key_authorization)
        }
        None => Response::text(404, ""),
    }
}

// ---- dns-01 --------------------------------------------------------------

/// dns-01 through an operator's program: `hook present` and `hook cleanup`,
/// with the record to write in `CERTD_DNS_RECORD` (the end of the CNAME
/// chain at `_acme-challenge.<name>`, or at the certificate's `dns_alias`),
/// the name the CA asks for in `CERTD_DNS_ORIGINAL`, the TXT value in
/// `CERTD_DNS_VALUE` and the domain in `CERTD_DOMAIN` (and only `PATH` and
/// `LANG` besides: `process::run_program`). The hook must add (not
/// replace) the value on present and remove only that value on cleanup: a
/// name and its wildcard share one record name.
pub struct Dns01Hook {
    hook: PathBuf,
    timeout: Duration,
    propagation: PropagationCheck,
}

impl Dns01Hook {
    fn new(hook: &Path, cfg: &Dns01Config) -> Self {
        Self {
            hook: hook.to_owned(),
            timeout: cfg.hook_timeout,
            propagation: PropagationCheck::new(&cfg.propagation),
        }
    }

    /// The record the hook writes: the end of the CNAME chain.
    async fn target(&self, c: &ChallengeSpec) -> Result<String, SolverError> {
        let record = c.dns_record();
        self.propagation
            .follow_cnames(&record, None)
            .await
            .map(|n| crate::dns::display_name(&n))
            .map_err(|source| SolverError::DnsTarget {
                record,
                source: Box::new(source),
            })
    }

    async fn run(&self, action: &'static str, c: &ChallengeSpec) -> Result<(), SolverError> {
        let original = crate::dns::challenge_record(&c.identifier);
        let err = |record: &str, detail: String| SolverError::Hook {
            hook: self.hook.clone(),
            action,
            record: record.to_owned(),
            detail,
        };
        // The driver passes only names from the configuration and the value
        // is a hash; still, nothing that could end a line or a word in a
        // hook's shell or nsupdate script reaches its environment.
        if !hook_safe(&c.identifier) || !hook_safe(&c.dns_value) {
            return Err(err(
                &original,
                format!(
                    "not run: {:?} is not a DNS name or {:?} not a base64url value",
                    c.identifier, c.dns_value
                ),
            ));
        }
        // The target comes from DNS: checked the same way.
        let record = self.target(c).await?;
        if !hook_safe(&record) {
            return Err(err(
                &original,
                format!("not run: the CNAME target {record:?} is not a DNS name"),
            ));
        }
        // Its own process group and a minimal environment, like every
        // program certd runs (`process::run_program`).
        let run = run_program(
            &self.hook,
            &[action.as_ref()],
            &[
                ("CERTD_DNS_RECORD", record.as_ref()),
                ("CERTD_DNS_ORIGINAL", original.as_ref()),
                ("CERTD_DNS_VALUE", c.dns_value.as_ref()),
                ("CERTD_DOMAIN", c.identifier.as_ref()),
            ],
            self.timeout,
        )
        .await;
        match run.end {
            ProgramEnd::Exited(status) if status.success() => Ok(()),
            ProgramEnd::Exited(status) => {
                let stderr = String::from_utf8_lossy(&run.stderr);
                Err(err(
                    &record,
                    format!("exited with {status}: {}", tail(&stderr, 500)),
                ))
            }
            ProgramEnd::TimedOut => Err(err(
                &record,
                format!("timed out after {}s", self.timeout.as_secs()),
            )),
            ProgramEnd::CannotRun(e) => Err(err(&record, format!("cannot run: {e}"))),
        }
    }
}

/// Alias mode only: that `_acme-challenge.<name>` leads to `target`, where
/// the record was written (see `PropagationCheck::check_alias`).
pub(crate) async fn check_alias(
    check: &PropagationCheck,
    c: &ChallengeSpec,
    target: &hickory_proto::rr::Name,
    primary: Option<SocketAddr>,
) -> Result<(), SolverError> {
    if c.dns_alias.is_none() {
        return Ok(());
    }
    let original = crate::dns::challenge_record(&c.identifier);
    check
        .check_alias(&original, target, primary)
        .await
        .map_err(|source| SolverError::DnsTarget {
            record: original,
            source: Box::new(source),
        })
}

/// Whether `s` is made only of what DNS names and base64url values hold.
fn hook_safe(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*'))
}

#[async_trait]
impl Solver for Dns01Hook {
    fn kind(&self) -> ChallengeKind {
        ChallengeKind::Dns01
    }

    async fn present(&self, c: &ChallengeSpec) -> Result<(), SolverError> {
        self.run("present", c).await
    }

    fn check(&self) -> Result<(), Unready> {
        use std::os::unix::fs::PermissionsExt;
        let what = format!("dns01.hook {}", self.hook.display());
        let unready = |problem: String| Unready {
            what: what.clone(),
            problem,
            fix: format!(
                "install the hook there and make it executable (`chmod +x {}`)",
                self.hook.display()
            ),
        };
        let meta = std::fs::metadata(&self.hook).map_err(|e| unready(e.to_string()))?;
        if !meta.is_file() {
            return Err(unready("is not a regular file".into()));
        }
        // `access` asks the kernel as exec would, for certd's user; it
        // says yes to root for any file with one execute bit, so the bits
        // are checked too.
        let path = std::ffi::CString::new(self.hook.as_os_str().as_encoded_bytes())
            .map_err(|e| unready(e.to_string()))?;
        // SAFETY: `path` is a NUL-terminated string that outlives the call.
        let executable = unsafe { libc::access(path.as_ptr(), libc::X_OK) } == 0;
        if !executable || meta.permissions().mode() & 0o111 == 0 {
            return Err(unready("is not executable".into()));
        }
        Ok(())
    }

    async fn cleanup(&self, c: &ChallengeSpec) -> Result<(), SolverError> {
        self.run("cleanup", c).await
    }

    async fn preflight(&self, c: &ChallengeSpec) -> Result<(), SolverError> {
        let record = self.target(c).await?;
        let name = crate::dns::fqdn(&record).map_err(|e| SolverError::DnsTarget {
            record: record.clone(),
            source: Box::new(crate::dns::propagation::PropagationError::Discover(
                e.to_string(),
            )),
        })?;
        check_alias(&self.propagation, c, &name, None).await?;
        self.propagation
            .wait(&record, Expect::Value(&c.dns_value), None)
            .await
            .map_err(|source| SolverError::Propagation {
                record,
                source: Box::new(source),
            })
    }
}

// ---- dns-persist-01 ------------------------------------------------------

/// dns-persist-01: the operator published `_validation-persist.<name>`
/// once (`certd dns-persist show`); certd writes nothing and only checks,
/// before the CA is asked, that the record is visible and names this CA
/// and account, so a missing record costs no failed validation.
pub struct DnsPersistSolver {
    check: PropagationCheck,
}

impl DnsPersistSolver {
    /// The record stands for months: one that is missing now was not
    /// published, rather than being on its way, so the check gives up
    /// sooner than dns-01's (the authorization stays pending for the next
    /// attempt).
    const CHECK_TIMEOUT: Duration = Duration::from_secs(15);

    fn new(cfg: &PropagationConfig) -> Self {
        Self {
            check: PropagationCheck::always(cfg, Self::CHECK_TIMEOUT),
        }
    }
}

#[async_trait]
impl Solver for DnsPersistSolver {
    fn kind(&self) -> ChallengeKind {
        ChallengeKind::DnsPersist01
    }

    async fn present(&self, _c: &ChallengeSpec) -> Result<(), SolverError> {
        Ok(())
    }

    async fn cleanup(&self, _c: &ChallengeSpec) -> Result<(), SolverError> {
        Ok(())
    }

    async fn preflight(&self, c: &ChallengeSpec) -> Result<(), SolverError> {
        let record = persist_record(&c.identifier);
        let Some(expect) = c.persist.as_ref().filter(|p| !p.issuers.is_empty()) else {
            return Err(SolverError::PersistIssuer(c.identifier.clone()));
        };
        let err = |source| SolverError::Persist {
            record: record.clone(),
            source: Box::new(source),
        };
        let target = self.check.follow_cnames(&record, None).await.map_err(err)?;
        self.check
            .wait(
                &crate::dns::display_name(&target),
                Expect::Persist(expect),
                None,
            )
            .await
            .map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(token: &str) -> ChallengeSpec {
        ChallengeSpec {
            identifier: "a.example".into(),
            token: Some(Token::parse(token).expect("a valid token")),
            key_authorization: format!("{token}.thumb"),
            dns_value: "v".into(),
            dns_alias: None,
            persist: None,
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a.example\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn responder_serves_present_tokens_only() {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let r = Http01Responder::start("127.0.0.1:0".parse().expect("addr"), &tracker, &cancel)
            .await
            .expect("bind");
        let solver = Http01Solver {
            responder: Some(r.clone()),
            webroot: None,
            preflight: Preflight::On,
            local_web: LOCAL_WEB,
        };
        let c = spec("tok1_aaaaaaaaaaaaaaaaaaaa");
        assert!(solver.preflight(&c).await.is_err(), "not presented yet");
        solver.present(&c).await.expect("present");
        solver
            .preflight(&c)
            .await
            .expect("pre-flight sees the token");
        let rsp = get(
            r.local_addr(),
            "/.well-known/acme-challenge/tok1_aaaaaaaaaaaaaaaaaaaa",
        )
        .await;
        assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
        assert!(rsp.ends_with("tok1_aaaaaaaaaaaaaaaaaaaa.thumb"), "{rsp}");
        assert!(solver.wait_fetched(&c, Duration::from_millis(10)).await);

        solver.cleanup(&c).await.expect("cleanup");
        let rsp = get(
            r.local_addr(),
            "/.well-known/acme-challenge/tok1_aaaaaaaaaaaaaaaaaaaa",
        )
        .await;
        assert!(rsp.starts_with("HTTP/1.1 404"), "{rsp}");
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }

    /// For an address of this host the pre-flight connects through the
    /// address, as the CA will: a listener on 127.0.0.1 does not answer
    /// for ::1.
    #[tokio::test]
    async fn preflight_for_an_address_connects_to_it() {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let r = Http01Responder::start("127.0.0.1:0".parse().expect("addr"), &tracker, &cancel)
            .await
            .expect("bind");
        let solver = Http01Solver {
            responder: Some(r.clone()),
            webroot: None,
            preflight: Preflight::On,
            local_web: LOCAL_WEB,
        };
        let mut c = spec("tok2_aaaaaaaaaaaaaaaaaaaa");
        solver.present(&c).await.expect("present");
        c.identifier = "127.0.0.1".into();
        solver.preflight(&c).await.expect("reachable on 127.0.0.1");
        c.identifier = "::1".into();
        let e = solver.preflight(&c).await.expect_err("nothing on [::1]");
        assert!(
            e.to_string()
                .contains(&format!("[::1]:{}", r.local_addr().port())),
            "{e}"
        );
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        assert_eq!(http_host("2001:db8::1"), "[2001:db8::1]");
        assert_eq!(http_host("192.0.2.1"), "192.0.2.1");
        assert_eq!(http_host("a.example"), "a.example");
    }

    /// Text that is not a DNS name never reaches a hook's environment.
    #[tokio::test]
    async fn hook_never_runs_with_unsafe_values() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let hook = dir.path().join("hook.sh");
        let ran = dir.path().join("ran");
        std::fs::write(&hook, format!("#!/bin/sh\ntouch '{}'\n", ran.display())).expect("hook");
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        // A closed port: the CNAME lookup is refused at once and the
        // record name used as it is.
        let closed = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("port");
        let solver = Dns01Hook {
            hook,
            timeout: Duration::from_secs(10),
            propagation: PropagationCheck::new(&PropagationConfig {
                nameservers: vec![crate::config::ServerAddr {
                    host: "127.0.0.1".into(),
                    port: closed.port(),
                }],
                ..Default::default()
            }),
        };
        let mut c = spec("tok3_aaaaaaaaaaaaaaaaaaaa");
        c.identifier = "a.example\nupdate add evil.example. 60 TXT x".into();
        let e = solver.present(&c).await.expect_err("refused");
        assert!(e.to_string().contains("not a DNS name"), "{e}");
        c.identifier = "a.example".into();
        c.dns_value = "v\x1b[31m".into();
        solver.present(&c).await.expect_err("refused");
        assert!(!ran.exists(), "the hook ran");
        c.dns_value = "dGVzdA".into();
        solver
            .present(&c)
            .await
            .expect("a safe value runs the hook");
        assert!(ran.exists());
    }

    /// A webroot is pre-flighted through the local web server when one
    /// answers: a server that does not serve the webroot for the name stops
    /// the order; no server at all is not held against it.
    #[tokio::test]
    async fn a_webroot_is_preflighted_through_the_local_web_server() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A web server of a port of its own: it serves the webroot for
        // "a.example" and nothing for other names.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let root = dir.path().to_owned();
        let server = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let path = req.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let served = req.contains("Host: a.example\r\n");
                let body = std::fs::read_to_string(root.join(path.trim_start_matches('/')));
                let rsp = match body {
                    Ok(body) if served => format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    ),
                    _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".into(),
                };
                let _ = s.write_all(rsp.as_bytes()).await;
            }
        });
        let solver = |local_web| Http01Solver {
            responder: None,
            webroot: Some(dir.path().to_owned()),
            preflight: Preflight::IfServed,
            local_web,
        };
        let c = spec("tok5_aaaaaaaaaaaaaaaaaaaa");
        let served = solver(addr);
        let err = served.preflight(&c).await.expect_err("not presented yet");
        assert!(err.to_string().contains("404"), "{err}");
        served.present(&c).await.expect("present");
        served
            .preflight(&c)
            .await
            .expect("the web server serves the webroot");
        let mut other = spec("tok5_aaaaaaaaaaaaaaaaaaaa");
        other.identifier = "b.example".into();
        assert!(
            served.preflight(&other).await.is_err(),
            "another name's server"
        );
        // Nothing listens: the name is served elsewhere; only the CA can tell.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
            .local_addr()
            .expect("addr");
        solver(closed)
            .preflight(&other)
            .await
            .expect("no local web server, no verdict");
        server.abort();
    }

    #[tokio::test]
    async fn webroot_file_is_written_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let solver = Http01Solver {
            responder: None,
            webroot: Some(dir.path().to_owned()),
            preflight: Preflight::Off,
            local_web: LOCAL_WEB,
        };
        let c = spec("tok2_aaaaaaaaaaaaaaaaaaaa");
        solver.present(&c).await.expect("present");
        let file = dir
            .path()
            .join(".well-known/acme-challenge/tok2_aaaaaaaaaaaaaaaaaaaa");
        assert_eq!(
            std::fs::read_to_string(&file).expect("read"),
            "tok2_aaaaaaaaaaaaaaaaaaaa.thumb"
        );
        solver.cleanup(&c).await.expect("cleanup");
        assert!(!file.exists());
        solver.cleanup(&c).await.expect("cleanup is idempotent");
    }

    #[test]
    fn tokens_that_are_not_plain_base64url_are_refused() {
        let ok = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0";
        assert_eq!(Token::parse(ok).expect("Pebble-style token").as_str(), ok);
        for bad in [
            "../../victim",
            "/etc/passwd",
            "aaaaaaaaaaaaaaaaaaaaaaaa/../../../victim",
            "aaaaaaaaaaaaaaaaaaaaaaaa/b",
            "aaaaaaaaaaaaaaaaaaaaaaaa\0",
            "aaaaaaaaaaaaaaaaaaaaaaa.",
            "short",
            "",
            &"a".repeat(129),
        ] {
            let e = Token::parse(bad).expect_err(bad);
            assert!(e.to_string().contains("refusing"), "{e}");
        }
    }

    #[tokio::test]
    async fn webroot_writes_never_follow_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").expect("victim");
        let root = dir.path().join("www");
        let challenges = root.join(".well-known/acme-challenge");
        std::fs::create_dir_all(&challenges).expect("mkdir");
        let solver = Http01Solver {
            responder: None,
            webroot: Some(root.clone()),
            preflight: Preflight::Off,
            local_web: LOCAL_WEB,
        };
        // A link where the token's file goes is replaced, not written through.
        let c = spec("linked_aaaaaaaaaaaaaaaaaaaa");
        let file = challenges.join(c.token().expect("token").as_str());
        std::os::unix::fs::symlink(&victim, &file).expect("symlink");
        solver.present(&c).await.expect("present");
        assert!(!file.is_symlink());
        assert_eq!(
            std::fs::read_to_string(&victim).expect("victim"),
            "precious"
        );
        solver.cleanup(&c).await.expect("cleanup");
        assert_eq!(
            std::fs::read_to_string(&victim).expect("victim"),
            "precious"
        );

        // A link in place of the challenge directory is refused.
        std::fs::remove_dir(&challenges).expect("rmdir");
        std::os::unix::fs::symlink(dir.path(), &challenges).expect("symlink");
        let c = spec("victim_aaaaaaaaaaaaaaaaaaaa");
        let target = dir.path().join(c.token().expect("token").as_str());
        std::fs::write(&target, "precious").expect("second victim");
        assert!(solver.present(&c).await.is_err());
        assert!(solver.cleanup(&c).await.is_err());
        assert_eq!(
            std::fs::read_to_string(&target).expect("victim"),
            "precious"
        );
    }
}
