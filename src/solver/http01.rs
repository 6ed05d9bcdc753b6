//! http-01: the standalone responder, a webroot, or both.
//!
//! In fleet mode the CA may ask any host for a token only the ordering host
//! presented: the responder then asks its [`Http01Fallback`] (the fleet's
//! shared answers, wired in above this layer) for tokens it does not hold.

use std::collections::HashMap;
use std::ffi::CString;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ChallengeSpec, Solver, SolverError, Token, Unready};
use crate::config::{Http01Config, Preflight};
use crate::tinyhttp::{self, Response};

const WELL_KNOWN: &str = "/.well-known/acme-challenge/";

/// Where http-01 files go below a webroot.
const CHALLENGE_DIR: [&str; 2] = [".well-known", "acme-challenge"];

/// http-01 through the standalone responder, a webroot, or both.
pub(crate) struct Http01Solver {
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
    pub(super) fn new(cfg: &Http01Config, responder: Option<Http01Responder>) -> Self {
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
    use super::{AsRawFd, CHALLENGE_DIR, CString, FromRawFd, OwnedFd, Path, Token};

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

/// Where the responder looks for a token it was not given itself: another
/// host's order (fleet mode). Defined here, implemented where the fleet is
/// known, so this layer does not depend on it.
#[async_trait]
pub trait Http01Fallback: Send + Sync {
    /// The key authorization for `token` (already checked to be a
    /// base64url token), or `None` for a 404.
    async fn key_authorization(&self, token: &str) -> Option<String>;
}

/// One small HTTP server shared by all orders, answering
/// `GET /.well-known/acme-challenge/<token>` from an in-memory map, then
/// from its fallback.
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
    /// connection task belong to `tracker`. Tokens not presented here are
    /// asked of `fallback`.
    pub async fn start(
        addr: SocketAddr,
        fallback: Option<Arc<dyn Http01Fallback>>,
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
            let fallback = fallback.clone();
            async move {
                match (reply, fallback) {
                    (Answer::Local(reply), _) => reply,
                    (Answer::Unknown(token), Some(fallback)) => {
                        match fallback.key_authorization(token.as_str()).await {
                            Some(body) => Response::text(200, body),
                            None => Response::text(404, ""),
                        }
                    }
                    (Answer::Unknown(_) | Answer::NotAToken, _) => Response::text(404, ""),
                }
            }
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

/// What this host's own map says about a request.
enum Answer {
    /// A token presented here: its key authorization.
    Local(Response),
    /// A well-formed token this host did not present.
    Unknown(Token),
    /// Not a challenge path, or not a token.
    NotAToken,
}

/// The answer to a request for `target` from the tokens in flight here.
fn answer(tokens: &Mutex<HashMap<Token, TokenEntry>>, target: &str) -> Answer {
    let Some(token) = target.strip_prefix(WELL_KNOWN) else {
        return Answer::NotAToken;
    };
    let entry = lock(tokens).get(token).cloned();
    match entry {
        Some(e) => {
            e.seen.notify_waiters();
            // notify_waiters only wakes current waiters; also leave a
            // permit for a waiter that arrives just after.
            e.seen.notify_one();
            Answer::Local(Response::text(200, e.key_authorization))
        }
        // Tokens are base64url (RFC 8555 section 8.1); anything else is
        // not worth asking the fallback (a database) about.
        None => match Token::parse(token) {
            Ok(token) => Answer::Unknown(token),
            Err(_) => Answer::NotAToken,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::solver::tests::spec;

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
        let r = Http01Responder::start(
            "127.0.0.1:0".parse().expect("addr"),
            None,
            &tracker,
            &cancel,
        )
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

    /// The fleet's answers as a map: the responder's side of the contract
    /// (the fleet's own is tested against PostgreSQL in tests/fleet_hosts.rs).
    struct MapFallback(HashMap<String, String>);

    #[async_trait]
    impl Http01Fallback for MapFallback {
        async fn key_authorization(&self, token: &str) -> Option<String> {
            self.0.get(token).cloned()
        }
    }

    /// A token this host did not present is answered from the fallback;
    /// its own tokens first; paths that are not tokens never reach it.
    #[tokio::test]
    async fn responder_asks_its_fallback_for_tokens_it_does_not_hold() {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let peer = "peer_aaaaaaaaaaaaaaaaaaaaaa";
        let fallback = MapFallback(HashMap::from([
            (peer.to_owned(), format!("{peer}.fleet")),
            ("tok3_aaaaaaaaaaaaaaaaaaaa".to_owned(), "stale".to_owned()),
        ]));
        let r = Http01Responder::start(
            "127.0.0.1:0".parse().expect("addr"),
            Some(Arc::new(fallback)),
            &tracker,
            &cancel,
        )
        .await
        .expect("bind");
        let rsp = get(r.local_addr(), &format!("{WELL_KNOWN}{peer}")).await;
        assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
        assert!(rsp.ends_with(&format!("{peer}.fleet")), "{rsp}");
        let own = spec("tok3_aaaaaaaaaaaaaaaaaaaa");
        r.add(own.token().expect("token"), &own.key_authorization);
        let rsp = get(
            r.local_addr(),
            &format!("{WELL_KNOWN}tok3_aaaaaaaaaaaaaaaaaaaa"),
        )
        .await;
        assert!(rsp.ends_with("tok3_aaaaaaaaaaaaaaaaaaaa.thumb"), "{rsp}");
        for path in [
            format!("{WELL_KNOWN}unknown_aaaaaaaaaaaaaaaaaaa"),
            format!("{WELL_KNOWN}../{peer}"),
            format!("/{peer}"),
        ] {
            let rsp = get(r.local_addr(), &path).await;
            assert!(rsp.starts_with("HTTP/1.1 404"), "{path}: {rsp}");
        }
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
        let r = Http01Responder::start(
            "127.0.0.1:0".parse().expect("addr"),
            None,
            &tracker,
            &cancel,
        )
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
