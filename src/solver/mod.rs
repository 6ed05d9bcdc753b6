//! Challenge solvers: make a challenge's response visible to the CA, then
//! take it away again.
//!
//! One trait, one implementation per way of answering. `present` and
//! `cleanup` are symmetric and the driver calls `cleanup` on every path,
//! including errors, so nothing is left behind in a webroot or a DNS zone.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::config::{
    ChallengeKind, Config, Dns01Config, Dns01Mode, DnsAlias, Http01Config, TlsAlpn01Config,
};
use crate::dns::persist::PersistExpect;
use crate::dns::propagation::PropagationCheck;

mod dns_hook;
mod dns_persist;
mod http01;
mod rfc2136;
mod tls_alpn;

pub(crate) use dns_hook::Dns01Hook;
pub(crate) use dns_persist::DnsPersistSolver;
pub(crate) use http01::Http01Solver;
pub use http01::{Http01Fallback, Http01Responder};
pub(crate) use rfc2136::Rfc2136Solver;
pub use tls_alpn::{TlsAlpnFallback, TlsAlpnSolver};

/// A challenge token from the CA, checked once where it enters certd.
///
/// The token names a file in a webroot and a key in the responder's map, so
/// it must be a plain name: RFC 8555 §8.1 makes it base64url (`[A-Za-z0-9_-]`)
/// with at least 128 bits of entropy (22 characters). Anything else (`..`,
/// `/`, an absolute path, a NUL) is a CA attacking the file system.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Token(String);

impl Token {
    /// 128 bits of entropy in base64url, rounded up.
    const MIN_LEN: usize = 22;
    /// Well under a file name's 255 bytes; CAs send 43.
    const MAX_LEN: usize = 128;

    pub(crate) fn parse(token: &str) -> Result<Self, SolverError> {
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

    pub(crate) fn as_str(&self) -> &str {
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
pub(crate) struct ChallengeSpec {
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
    pub(crate) fn token(&self) -> Result<&Token, SolverError> {
        self.token.as_ref().ok_or_else(|| SolverError::BadToken {
            token: "(none)".into(),
            reason: "missing",
        })
    }

    /// Where dns-01 puts the TXT record before CNAMEs are followed:
    /// `_acme-challenge.<name>`, or the certificate's alias.
    pub(crate) fn dns_record(&self) -> String {
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
pub(crate) trait Solver: Send + Sync {
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
    /// Handed to the dns-01 solvers (TSIG times, `persistUntil`).
    clock: Clock,
    /// Where the responders look for challenges they do not hold (fleet
    /// mode: another host's orders).
    fallbacks: Fallbacks,
}

/// Where each responder looks for a challenge it does not hold; none by
/// default.
#[derive(Clone, Default)]
pub(crate) struct Fallbacks {
    pub(crate) http01: Option<Arc<dyn Http01Fallback>>,
    pub(crate) tls_alpn01: Option<Arc<dyn TlsAlpnFallback>>,
}

/// The sections of a configuration the solvers are built from.
#[derive(Clone, Copy, Default, PartialEq)]
pub(crate) struct ChallengeSettings<'a> {
    pub http01: Option<&'a Http01Config>,
    pub dns01: Option<&'a Dns01Config>,
    pub tls_alpn01: Option<&'a TlsAlpn01Config>,
}

impl<'a> ChallengeSettings<'a> {
    pub(crate) fn of(cfg: &'a Config) -> Self {
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
    pub(crate) async fn from_config(
        cfg: &Config,
        needed: &[ChallengeKind],
        tracker: &TaskTracker,
        cancel: &CancellationToken,
        clock: Clock,
    ) -> Result<Self, SolverError> {
        Self::with_fallbacks(cfg, needed, tracker, cancel, clock, Fallbacks::default()).await
    }

    /// As [`Solvers::from_config`], the responders (these and those a
    /// reload starts) answering challenges they do not hold from
    /// `fallbacks`.
    pub(crate) async fn with_fallbacks(
        cfg: &Config,
        needed: &[ChallengeKind],
        tracker: &TaskTracker,
        cancel: &CancellationToken,
        clock: Clock,
        fallbacks: Fallbacks,
    ) -> Result<Self, SolverError> {
        let solvers = Self {
            clock,
            fallbacks,
            ..Self::default()
        };
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
    pub(crate) async fn reconfigure(
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
                    Dns01Mode::Hook(hook) => {
                        Ok(Some(Arc::new(Dns01Hook::new(hook, d, self.clock.clone()))))
                    }
                    Dns01Mode::Rfc2136(r) => Rfc2136Solver::new(r, d, self.clock.clone())
                        .map(|s| Some(Arc::new(s) as Arc<dyn Solver>)),
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
                Some(Arc::new(DnsPersistSolver::new(
                    &propagation,
                    self.clock.clone(),
                ))),
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
    pub(crate) fn check(&self, kinds: &[ChallengeKind]) -> Result<(), Unready> {
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

    pub(crate) fn get(&self, kind: ChallengeKind) -> Result<Arc<dyn Solver>, SolverError> {
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
                let fallback = self.fallbacks.http01.clone();
                let handle = Http01Responder::start(addr, fallback, tracker, &stop).await?;
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
        let fallback = self.fallbacks.tls_alpn01.clone();
        let handle = Arc::new(TlsAlpnSolver::start(addr, fallback, tracker, &stop).await?);
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

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn spec(token: &str) -> ChallengeSpec {
        ChallengeSpec {
            identifier: "a.example".into(),
            token: Some(Token::parse(token).expect("a valid token")),
            key_authorization: format!("{token}.thumb"),
            dns_value: "v".into(),
            dns_alias: None,
            persist: None,
        }
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
}
