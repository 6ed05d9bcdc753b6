//! The one HTTP client through which instant-acme drives the protocol:
//! HTTP/1.1 on rustls with the ring provider, over the connections of
//! [`transport`](super::transport). Requests go to https URLs only and
//! redirects are not followed; bodies are read up to a cap while they
//! stream; the headers certd and instant-acme read are bounded, and
//! `Retry-After` is clamped before anyone sees it.
//!
//! A caller may also put a [`RequestGate`] around a run of requests
//! ([`gated`]), so that nothing is sent once the caller may no longer
//! speak to the CA (a fleet host past its lease's deadline). It is asked
//! before each request, and again by the run's sockets before every write
//! (see `transport`). The gate is a scoped value of the task, like the
//! nonce scope, so every request the run makes (instant-acme's and
//! certd's own) passes it without being handed it.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderValue;
use http::header::{CONTENT_TYPE, LINK, RETRY_AFTER};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::error::{ProblemRecord, SetupError, bounded};
use super::nonce::{LAST_NONCE, LAST_RETRY_AFTER, NoncePool, synthetic_nonce_response};
use super::observe::Observer;
use super::transport::{Transport, gate_refusal};
use super::trust;
use crate::clock::Clock;

pub(super) const USER_AGENT: &str = concat!("certd/", env!("CARGO_PKG_VERSION"));
/// The largest JSON or problem body read from the CA. ACME objects are a
/// few kB; an order for 100 names (the usual CA limit) with its
/// authorization URLs is some 10 kB. 1 MiB leaves a hundredfold margin.
pub const MAX_JSON_BODY: usize = 1 << 20;
/// The largest certificate chain read from the CA: a PEM chain with
/// alternates is a few kB per certificate; 4 MiB bounds memory while
/// no real chain comes near it.
pub const MAX_CHAIN_BODY: usize = 4 << 20;
/// Longer `Retry-After` values are ignored: an HTTP date is 29 characters,
/// delay-seconds for a week 6.
const MAX_RETRY_AFTER_LEN: usize = 64;
/// `Retry-After` is clamped to this range (a CA asking for 0 s would get
/// a request storm, one asking for years would silence renewals).
pub const RETRY_AFTER_MIN: Duration = Duration::from_secs(1);
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longer URLs (Location, Link targets) are refused: CA URLs are short.
const MAX_URL_LEN: usize = 2048;
/// Other headers certd or instant-acme read (Content-Type, Link lists,
/// Replay-Nonce) longer than this are dropped.
const MAX_HEADER_LEN: usize = 4096;
/// How long one request may take, from opening a connection to the last
/// byte of the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The one HTTP client; cheap to clone.
#[derive(Clone)]
pub struct AcmeHttp {
    pub(super) inner: Arc<HttpInner>,
}

pub(super) struct HttpInner {
    /// ACME requests' connections.
    transport: Transport,
    /// Requests that are not ACME's protocol (see [`AcmeHttp::plain`]).
    plain: reqwest::Client,
    /// The wall clock `Retry-After` is read against.
    pub(super) clock: Clock,
    pub(super) nonces: NoncePool,
    pub(super) observer: Observer,
}

/// Asked before each request inside a [`gated`] run: `Err` and the request
/// is not sent. The layer that knows why requests must stop implements it
/// (fleet mode: the lease's local deadline).
pub trait RequestGate: Send + Sync {
    fn check(&self) -> Result<(), GateClosed>;

    /// Resolves, with why, once the gate has closed for good: a request
    /// under way then is dropped rather than waited on (it can send
    /// nothing more, and its answer would be acted on by nobody). The
    /// default never resolves: such a gate only refuses new writes.
    fn closed(&self) -> Pin<Box<dyn Future<Output = GateClosed> + Send + '_>> {
        Box::pin(std::future::pending())
    }
}

/// A request the gate refused: nothing was sent. The text says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GateClosed(pub String);

tokio::task_local! {
    /// The gate of the current run, if it has one.
    static GATE: Arc<dyn RequestGate>;
}

/// Runs `fut` with every request it sends through [`AcmeHttp`] first
/// asked of `gate`, and every write to the connection the request uses
/// asked again (see [`transport`](super::transport)).
pub async fn gated<F: Future>(gate: Arc<dyn RequestGate>, fut: F) -> F::Output {
    GATE.scope(gate, fut).await
}

/// The current run's gate; `None` outside a [`gated`] run.
fn current_gate() -> Option<Arc<dyn RequestGate>> {
    GATE.try_with(Arc::clone).ok()
}

/// The certificates of `[acme] ca_bundle`, as trust anchors.
fn read_ca_bundle(path: &Path) -> Result<rustls::RootCertStore, SetupError> {
    let bundle_err = |detail: String| SetupError::CaBundle {
        path: path.to_owned(),
        detail,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bundle_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bundle_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(bundle_err("no certificates in the file".into()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| bundle_err(e.to_string()))?;
    }
    Ok(roots)
}

impl AcmeHttp {
    /// Builds the client: system roots plus the optional extra bundle.
    pub fn new(ca_bundle: Option<&Path>, clock: Clock) -> Result<Self, SetupError> {
        // reqwest and rustls share the process-wide provider; installing it
        // twice is harmless, so the error is ignored.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let bundle = match ca_bundle {
            Some(path) => Some(read_ca_bundle(path)?),
            None => None,
        };
        let setup_err = |detail: String| SetupError::CaBundle {
            path: ca_bundle.map(Path::to_owned).unwrap_or_default(),
            detail,
        };
        let roots = trust::Roots::new(provider.clone(), bundle).map_err(setup_err)?;
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| setup_err(e.to_string()))?
            // Not a lesser check: rustls's WebPKI verification against the
            // bundle, then the system's roots (see `trust`).
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(roots))
            .with_no_client_auth();
        let plain = reqwest::Client::builder()
            .tls_backend_preconfigured(tls.clone())
            .user_agent(USER_AGENT)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            // ACME needs no redirects; following one would re-send a
            // signed request wherever the CA points, plain http included.
            // (`send` refuses plain http URLs for ACME requests; `plain`
            // stays usable for a local http endpoint.)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            inner: Arc::new(HttpInner {
                transport: Transport::new(tls),
                plain,
                clock,
                nonces: NoncePool::default(),
                observer: Observer::default(),
            }),
        })
    }

    /// The clock this client reads `Retry-After` against, for callers that
    /// turn its answers into times.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// A plain client with the same trust, for requests that are not
    /// ACME's protocol: pre-flight checks of this host's own responders,
    /// unsigned ARI queries, dns-persist-01 lookups.
    pub fn plain(&self) -> &reqwest::Client {
        &self.inner.plain
    }
}

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.send(req).await })
    }
}

impl HttpInner {
    async fn send(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Result<BytesResponse, instant_acme::Error> {
        let Some(gate) = current_gate() else {
            return self.exchange(req, None).await;
        };
        // First of all: past the gate nothing is sent, not even a nonce
        // from the pool is spent.
        gate.check().map_err(gated_error)?;
        // A request waiting on its answer when the gate closes (a stalled
        // CA, a host that was stopped) ends then, not at its timeout: the
        // order under a lost lease stops at once.
        tokio::select! {
            out = self.exchange(req, Some(gate.clone())) => out,
            why = gate.closed() => Err(gated_error(why)),
        }
    }

    /// Sends `req` and reads its answer, on a connection fenced by `gate`.
    async fn exchange(
        &self,
        req: Request<BodyWrapper<Bytes>>,
        gate: Option<Arc<dyn RequestGate>>,
    ) -> Result<BytesResponse, instant_acme::Error> {
        let (parts, body) = req.into_parts();
        // The body type's error is `Infallible`.
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(never) => match never {},
        };
        let url = parts.uri.to_string();
        if parts.uri.scheme_str() != Some("https") {
            return Err(instant_acme::Error::Other(
                format!(
                    "refusing to send a request to {}: certd talks to a CA over https only",
                    bounded(&url, MAX_URL_LEN)
                )
                .into(),
            ));
        }

        // instant-acme only sends HEAD to fetch a fresh nonce.
        if parts.method == Method::HEAD
            && let Some(nonce) = self.nonces.take()
        {
            self.observer.count("newNonce", "pooled");
            return Ok(synthetic_nonce_response(&nonce));
        }
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        let mut request = Request::builder()
            .method(parts.method.clone())
            .uri(parts.uri)
            .body(Full::new(body))
            .map_err(instant_acme::Error::Http)?;
        *request.headers_mut() = parts.headers;
        request
            .headers_mut()
            .entry(http::header::USER_AGENT)
            .or_insert(HeaderValue::from_static(USER_AGENT));
        let sent = self.transport.send(request, gate.clone());
        let result = tokio::time::timeout_at(deadline, sent).await;
        let endpoint = self.observer.endpoint(&parts.method, &url);
        let failed = |e: Box<dyn std::error::Error + Send + Sync>| {
            self.observer.count(endpoint, "transport-error");
            transport_error(gate.as_deref(), &url, e)
        };
        let (rsp, conn) = match result {
            Ok(Ok(answered)) => answered,
            Ok(Err(e)) => return Err(failed(e)),
            Err(_) => return Err(failed(timed_out())),
        };
        let (head, body) = rsp.into_parts();
        let status = head.status;
        let now = self.clock.system_time();
        let version = head.version;
        let mut headers = head.headers;
        let checked = if status.is_redirection() {
            let to = headers
                .get(http::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map_or_else(
                    || "nowhere".to_owned(),
                    |v| format!("{:?}", bounded(v, MAX_URL_LEN)),
                );
            Err(format!(
                "{} answered {status}, a redirect to {to}; ACME needs no redirects and certd follows none",
                bounded(&url, MAX_URL_LEN)
            ))
        } else {
            sanitize_headers(&mut headers, now)
                .map_err(|e| format!("{}: {e}", bounded(&url, MAX_URL_LEN)))
        };
        if let Err(e) = checked {
            self.observer.count(endpoint, status.as_str());
            return Err(instant_acme::Error::Other(e.into()));
        }
        let read = tokio::time::timeout_at(deadline, read_capped(body, body_limit(&headers)));
        let bytes = match read.await {
            Ok(Ok(b)) => {
                // Read to its end: the connection can carry the next one.
                self.transport.check_in(conn);
                b
            }
            Ok(Err(BodyError::Transport(e))) => return Err(failed(Box::new(e))),
            Ok(Err(e)) => {
                self.observer.count(endpoint, "transport-error");
                return Err(instant_acme::Error::Other(
                    format!(
                        "reading the answer from {}: {e}",
                        bounded(&url, MAX_URL_LEN)
                    )
                    .into(),
                ));
            }
            Err(_) => return Err(failed(timed_out())),
        };
        self.observer.count(endpoint, status.as_str());
        if endpoint == "newOrder" && status == StatusCode::CREATED {
            self.observer.remember_created_order(&headers, &bytes);
        }
        if let Some(nonce) = headers.get("replay-nonce").and_then(|v| v.to_str().ok()) {
            // Only the task's latest nonce is kept (see `nonce_scope`): the
            // caller spends this one in its next request.
            let _ = LAST_NONCE.try_with(|slot| slot.replace(Some(nonce.to_owned())));
        }
        self.observer.observe(&url, status, &headers, &bytes, now);
        let retry_after = headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, now));
        let _ = LAST_RETRY_AFTER.try_with(|slot| slot.set(retry_after.map(|at| (at, now))));
        // instant-acme reads the directory without looking at the status.
        if endpoint == "directory" && !status.is_success() {
            let problem = problem_for_error_page(status, &headers, bytes);
            let detail = serde_json::from_slice::<ProblemRecord>(&problem)
                .ok()
                .and_then(|p| p.detail)
                .unwrap_or_else(|| format!("HTTP {status}"));
            // Said as it is: the CA answered, so it is reachable; the URL
            // in the configuration is what to check.
            let hint = if status == StatusCode::NOT_FOUND {
                format!(
                    "the directory URL {} answers {status}: is `[acme] directory` right?",
                    bounded(&url, MAX_URL_LEN)
                )
            } else {
                format!(
                    "the directory URL {} answers {detail}",
                    bounded(&url, MAX_URL_LEN)
                )
            };
            return Err(instant_acme::Error::Other(hint.into()));
        }
        let bytes = problem_for_error_page(status, &headers, bytes);

        let mut builder = http::Response::builder().status(status).version(version);
        if let Some(h) = builder.headers_mut() {
            *h = headers;
        }
        let (parts, ()) = builder
            .body(())
            .map_err(instant_acme::Error::Http)?
            .into_parts();
        Ok(BytesResponse {
            parts,
            body: Box::new(bytes),
        })
    }
}

/// The gate's refusal, as instant-acme carries it to certd.
fn gated_error(closed: GateClosed) -> instant_acme::Error {
    instant_acme::Error::Other(Box::new(closed))
}

/// A request that failed on its way: inside a gated run whose gate has
/// closed meanwhile, the gate's refusal (its fence cut the request off,
/// or the connection failed while the host was past its lease: either
/// way the caller must stop); otherwise the failure, with the URL.
fn transport_error(
    gate: Option<&dyn RequestGate>,
    url: &str,
    e: Box<dyn std::error::Error + Send + Sync>,
) -> instant_acme::Error {
    if let Some(closed) = gate_refusal(e.as_ref()) {
        return gated_error(closed.clone());
    }
    if let Some(Err(closed)) = gate.map(RequestGate::check) {
        return gated_error(closed);
    }
    instant_acme::Error::Other(Box::new(RequestFailed {
        url: bounded(url, MAX_URL_LEN).into_owned(),
        source: e,
    }))
}

fn timed_out() -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()),
    ))
}

/// A request to `url` that got no answer: the connection failed, or
/// broke, or the answer did not come in time.
#[derive(Debug, thiserror::Error)]
#[error("the request to {url} failed")]
pub struct RequestFailed {
    pub url: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// Poisoning only means another thread panicked mid-update of a cache; the
/// data is still usable, so recover it rather than cascade the panic.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A CA (or a proxy in front of it) that fails with an HTML page or an
/// empty body would surface as "malformed JSON" and hide the HTTP status.
/// Such an answer is replaced by a problem document that says what came
/// back, so the error names it and is classified by its status (5xx:
/// retry later).
fn problem_for_error_page(status: StatusCode, headers: &HeaderMap, body: Bytes) -> Bytes {
    let is_problem = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("json"))
        && serde_json::from_slice::<serde_json::Value>(&body).is_ok();
    if status.is_success() || status.is_redirection() || is_problem {
        return body;
    }
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("no content type");
    let text = String::from_utf8_lossy(&body);
    let excerpt: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(120)
        .collect();
    let problem = serde_json::json!({
        "type": "urn:certd:error:httpError",
        "detail": format!("HTTP {status} with a {content_type} body instead of a problem document: {excerpt:?}"),
        "status": status.as_u16(),
    });
    Bytes::from(problem.to_string())
}

/// Why a body was not read to its end.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("the body is larger than {limit} bytes, the most certd reads from a CA")]
    TooLarge { limit: usize },
    #[error(transparent)]
    Transport(#[from] hyper::Error),
}

/// How much of a body certd reads: a certificate chain may be larger
/// than any JSON object.
fn body_limit(headers: &HeaderMap) -> usize {
    let is_chain = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/pem-certificate-chain"));
    if is_chain {
        MAX_CHAIN_BODY
    } else {
        MAX_JSON_BODY
    }
}

/// Reads a body as it streams, stopping as soon as it passes `limit`
/// (a Content-Length above it is refused before any byte is read), so a
/// CA cannot make certd hold more than `limit` bytes of one answer.
async fn read_capped(mut rsp: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    let too_large = BodyError::TooLarge { limit };
    if rsp.size_hint().lower() > limit as u64 {
        return Err(too_large);
    }
    let mut body = Vec::new();
    while let Some(frame) = rsp.frame().await {
        // Trailers carry nothing certd reads.
        let Ok(chunk) = frame?.into_data() else {
            continue;
        };
        if body.len() + chunk.len() > limit {
            return Err(too_large);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

/// Bounds the headers certd and instant-acme read before either looks at
/// them: `Retry-After` is rewritten as clamped delay-seconds (instant-acme
/// adds an unparsed value to the clock, which panics on overflow) or
/// dropped; an overlong `Content-Type`, `Link` or a `Replay-Nonce` that is
/// not base64url is dropped; a `Location` must be an https URL.
fn sanitize_headers(headers: &mut HeaderMap, now: SystemTime) -> Result<(), String> {
    let retry_after = headers
        .get(RETRY_AFTER)
        .map(|v| v.to_str().ok().and_then(|v| parse_retry_after(v, now)));
    if let Some(parsed) = retry_after {
        headers.remove(RETRY_AFTER);
        if let Some(at) = parsed {
            let secs = at
                .duration_since(now)
                .unwrap_or(RETRY_AFTER_MIN)
                .as_secs()
                .max(RETRY_AFTER_MIN.as_secs());
            headers.insert(RETRY_AFTER, http::HeaderValue::from(secs));
        }
    }
    let nonce_ok = |v: &http::HeaderValue| {
        (1..=256).contains(&v.len())
            && v.as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
    };
    if headers.get_all("replay-nonce").iter().any(|v| !nonce_ok(v)) {
        headers.remove("replay-nonce");
    }
    for name in [CONTENT_TYPE, LINK] {
        if headers
            .get_all(&name)
            .iter()
            .any(|v| v.len() > MAX_HEADER_LEN)
        {
            headers.remove(&name);
        }
    }
    for v in headers.get_all(http::header::LOCATION) {
        let text = v.to_str().unwrap_or_default();
        https_url(text).map_err(|e| format!("Location {:?}: {e}", bounded(text, 200)))?;
    }
    Ok(())
}

/// Checks that a URL from the CA is an absolute https URL of sane length.
pub(super) fn https_url(url: &str) -> Result<(), &'static str> {
    if url.len() > MAX_URL_LEN {
        return Err("longer than 2048 bytes");
    }
    match url.parse::<http::Uri>() {
        Ok(u) if u.scheme_str() == Some("https") && u.host().is_some() => Ok(()),
        Ok(_) => Err("not an https URL; certd talks to a CA over https only"),
        Err(_) => Err("not a URL"),
    }
}

/// `Retry-After`: delay-seconds or an HTTP date, as an instant between
/// `RETRY_AFTER_MIN` and `RETRY_AFTER_MAX` after `now` (clamping is logged).
/// Values longer than any legitimate one are ignored unparsed.
pub fn parse_retry_after(v: &str, now: SystemTime) -> Option<SystemTime> {
    let v = v.trim();
    if v.is_empty() || v.len() > MAX_RETRY_AFTER_LEN {
        return None;
    }
    let delay = if v.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is "a very long time", not garbage.
        Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at =
            time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc2822).ok()?;
        SystemTime::from(at)
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    };
    let clamped = delay.clamp(RETRY_AFTER_MIN, RETRY_AFTER_MAX);
    if clamped != delay {
        tracing::warn!(
            retry_after = v,
            used_secs = clamped.as_secs(),
            "the CA's Retry-After is outside 1 s to 7 days; clamped"
        );
    }
    now.checked_add(clamped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acme::error::{AcmeError, Disposition};
    use crate::acme::observe::link_with_rel;
    use crate::acme::raw;

    /// A gate that counts its checks and is open for the first
    /// `open_for` of them.
    struct Gate {
        open_for: usize,
        checks: std::sync::atomic::AtomicUsize,
    }

    impl Gate {
        fn new(open_for: usize) -> Arc<Self> {
            Arc::new(Self {
                open_for,
                checks: 0.into(),
            })
        }

        fn checks(&self) -> usize {
            self.checks.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    impl RequestGate for Gate {
        fn check(&self) -> Result<(), GateClosed> {
            let before = self
                .checks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if before < self.open_for {
                Ok(())
            } else {
                Err(GateClosed("lease lost".into()))
            }
        }
    }

    /// A newOrder POST to `host:port`.
    fn new_order_at(host: &str, port: u16) -> Request<BodyWrapper<Bytes>> {
        Request::post(format!("https://{host}:{port}/acme/new-order"))
            .body(BodyWrapper::from(Vec::new()))
            .expect("request")
    }

    /// A closed gate stops the request before anything is sent (no
    /// connection, not even a pooled nonce spent) with a typed error; an
    /// open one lets it go (to a port where nothing listens, so it fails
    /// as a transport error, counted).
    #[tokio::test]
    async fn a_closed_gate_sends_nothing() {
        let http = AcmeHttp::new(None, Clock::system()).expect("client");
        let request = || new_order_at("127.0.0.1", 1);
        let closed = Gate::new(0);
        let e = gated(closed.clone(), http.request(request()))
            .await
            .map(|_| ())
            .expect_err("refused");
        let e = AcmeError::from(e);
        assert!(
            matches!(&e, AcmeError::Gated(c) if c.0 == "lease lost"),
            "{e:?}"
        );
        assert_eq!(e.disposition(), Disposition::Retryable);
        assert_eq!(closed.checks(), 1);
        assert!(http.request_counts().is_empty(), "nothing sent");
        let open = Gate::new(usize::MAX);
        let e = gated(open.clone(), http.request(request()))
            .await
            .map(|_| ())
            .expect_err("nothing listens there");
        assert!(matches!(AcmeError::from(e), AcmeError::Transport(_)));
        // Before the request, and again before its connection.
        assert!(open.checks() >= 2, "{}", open.checks());
        assert!(!http.request_counts().is_empty(), "sent");
        // Outside a gated run there is no gate.
        let e = http.request(request()).await.map(|_| ()).expect_err("sent");
        assert!(matches!(AcmeError::from(e), AcmeError::Transport(_)));
    }

    /// What a TLS test server saw from a client after answering it.
    #[derive(Debug, PartialEq, Eq)]
    enum Heard {
        /// A request, answered with 200 and `{}`.
        Request,
        /// TLS's `close_notify`: the client closed the connection with a
        /// write.
        CloseNotify,
        /// The connection ended without a byte more (no `close_notify`).
        Silence,
    }

    /// A TLS server on loopback for `localhost`, answering HTTP/1.1
    /// requests on one connection (or, not `answering`, reading them and
    /// never answering); reports what it hears. Returns its port, the CA
    /// bundle that trusts it, and the reports.
    async fn tls_server(
        dir: &Path,
        answering: bool,
    ) -> (
        u16,
        std::path::PathBuf,
        tokio::sync::mpsc::UnboundedReceiver<Heard>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        let bundle = dir.join("ca.pem");
        std::fs::write(&bundle, cert.pem()).expect("bundle");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("accept");
            let mut tls = acceptor.accept(socket).await.expect("handshake");
            let mut pending = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let heard = match tls.read(&mut buf).await {
                    Ok(0) => Heard::CloseNotify,
                    Ok(n) => {
                        pending.extend_from_slice(&buf[..n]);
                        if !pending.windows(4).any(|w| w == b"\r\n\r\n") {
                            continue;
                        }
                        pending.clear();
                        let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                        if answering {
                            tls.write_all(answer.as_bytes()).await.expect("answer");
                        }
                        Heard::Request
                    }
                    // tokio-rustls: the peer closed TCP without a
                    // close_notify, or reset it.
                    Err(_) => Heard::Silence,
                };
                let end = heard != Heard::Request;
                let _ = tx.send(heard);
                if end {
                    return;
                }
            }
        });
        (port, bundle, rx)
    }

    /// A gate switched by the test.
    struct Switch(std::sync::atomic::AtomicBool);

    impl RequestGate for Switch {
        fn check(&self) -> Result<(), GateClosed> {
            if self.0.load(std::sync::atomic::Ordering::Relaxed) {
                Ok(())
            } else {
                Err(GateClosed("lease lost".into()))
            }
        }

        fn closed(&self) -> Pin<Box<dyn Future<Output = GateClosed> + Send + '_>> {
            Box::pin(async move {
                while self.check().is_ok() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                GateClosed("lease lost".into())
            })
        }
    }

    /// A request waiting for its answer when its gate closes (a stalled
    /// CA, a host stopped mid-request) ends then, as the gate's refusal,
    /// not at its own timeout a minute later: the order under a lost
    /// lease stops at once, and its connection closes without a byte.
    #[tokio::test]
    async fn a_request_waiting_on_its_answer_ends_when_its_gate_closes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (port, bundle, mut heard) = tls_server(dir.path(), false).await;
        let http = AcmeHttp::new(Some(&bundle), Clock::system()).expect("client");
        let gate = Arc::new(Switch(true.into()));
        let request = tokio::spawn(gated(
            gate.clone(),
            http.request(new_order_at("localhost", port)),
        ));
        assert_eq!(heard.recv().await, Some(Heard::Request));
        gate.0.store(false, std::sync::atomic::Ordering::Relaxed);
        let e = tokio::time::timeout(REQUEST_TIMEOUT / 2, request)
            .await
            .expect("ended long before the request's own timeout")
            .expect("the request's task")
            .map(|_| ())
            .expect_err("cut off");
        assert!(matches!(AcmeError::from(e), AcmeError::Gated(_)));
        drop(http);
        assert_eq!(heard.recv().await, Some(Heard::Silence));
    }

    /// A pooled connection keeps the gate of the request it served last:
    /// once that gate closes, the connection closes without a byte (no
    /// `close_notify`) when the pool lets it go; a request that takes it
    /// over puts its own gate on it. With the gate open, the same close
    /// does send `close_notify`, which is what the fence withholds.
    #[tokio::test]
    async fn an_idle_connection_keeps_its_last_gate() {
        let post = |port: u16| new_order_at("localhost", port);
        for closed in [true, false] {
            let dir = tempfile::tempdir().expect("temp dir");
            let (port, bundle, mut heard) = tls_server(dir.path(), true).await;
            let http = AcmeHttp::new(Some(&bundle), Clock::system()).expect("client");
            let gate = Arc::new(Switch(true.into()));
            let rsp = gated(gate.clone(), http.request(post(port)))
                .await
                .expect("answered under the open gate");
            assert_eq!(rsp.parts.status, StatusCode::OK);
            assert_eq!(heard.recv().await, Some(Heard::Request));
            if closed {
                gate.0.store(false, std::sync::atomic::Ordering::Relaxed);
                // Past the gate: refused before the pool is even asked.
                let e = gated(gate.clone(), http.request(post(port)))
                    .await
                    .map(|_| ())
                    .expect_err("refused");
                assert!(matches!(AcmeError::from(e), AcmeError::Gated(_)));
                // Outside the run, the same idle connection serves.
                http.request(post(port)).await.expect("ungated");
                assert_eq!(heard.recv().await, Some(Heard::Request));
                // Under the closed gate again, then let go.
                let _ = gated(gate.clone(), http.request(post(port))).await;
                gate.0.store(true, std::sync::atomic::Ordering::Relaxed);
                gated(gate.clone(), http.request(post(port)))
                    .await
                    .expect("the gate open again");
                assert_eq!(heard.recv().await, Some(Heard::Request));
                gate.0.store(false, std::sync::atomic::Ordering::Relaxed);
            }
            drop(http);
            let end = tokio::time::timeout(Duration::from_secs(10), heard.recv())
                .await
                .expect("the connection ended");
            let expected = if closed {
                Heard::Silence
            } else {
                Heard::CloseNotify
            };
            assert_eq!(end, Some(expected), "gate closed: {closed}");
        }
    }

    /// The fence is on the socket, not only before the request: a gate
    /// that closes once the connection is open (a host stopped between
    /// the request's check and its first write wakes past its deadline)
    /// lets not one byte out, not even TLS's hello, and the request fails
    /// as the gate's refusal.
    #[tokio::test]
    async fn a_gate_closing_mid_request_lets_no_byte_out() {
        use tokio::io::AsyncReadExt;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let received = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut bytes = Vec::new();
            // Until the client closes: a reset is an end too.
            let _ = socket.read_to_end(&mut bytes).await;
            bytes.len()
        });
        let http = AcmeHttp::new(None, Clock::system()).expect("client");
        // Open for the request's check and the connection's; closed by
        // the first write.
        let gate = Gate::new(2);
        let e = gated(gate.clone(), http.request(new_order_at("127.0.0.1", port)))
            .await
            .map(|_| ())
            .expect_err("cut off");
        let e = AcmeError::from(e);
        assert!(
            matches!(&e, AcmeError::Gated(c) if c.0 == "lease lost"),
            "{e:?}"
        );
        assert!(gate.checks() >= 3, "{}", gate.checks());
        let received = tokio::time::timeout(Duration::from_secs(10), received)
            .await
            .expect("the connection closed")
            .expect("listener");
        assert_eq!(received, 0, "not a byte after the gate closed");
    }

    #[test]
    fn error_pages_become_problem_documents() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, http::HeaderValue::from_static("text/html"));
        let body = problem_for_error_page(
            StatusCode::BAD_GATEWAY,
            &headers,
            Bytes::from_static(b"<html><body>502 Bad Gateway</body></html>"),
        );
        let p: instant_acme::Problem = serde_json::from_slice(&body).expect("a problem document");
        let e = AcmeError::from_problem(&p, None, SystemTime::now());
        assert_eq!(e.disposition(), Disposition::Retryable);
        assert!(
            e.to_string()
                .contains("HTTP 502 Bad Gateway with a text/html body"),
            "{e}"
        );
        // A real problem document passes through untouched.
        headers.insert(
            CONTENT_TYPE,
            http::HeaderValue::from_static("application/problem+json"),
        );
        let real = Bytes::from_static(br#"{"type":"urn:ietf:params:acme:error:malformed"}"#);
        assert_eq!(
            problem_for_error_page(StatusCode::BAD_REQUEST, &headers, real.clone()),
            real
        );
    }

    #[test]
    fn retry_after_forms() {
        let t = parse_retry_after("120", SystemTime::now()).expect("seconds");
        assert!(t > SystemTime::now() + Duration::from_secs(100));
        assert!(parse_retry_after("Fri, 31 Dec 1999 23:59:59 GMT", SystemTime::now()).is_some());
        assert!(parse_retry_after("soon", SystemTime::now()).is_none());
    }

    /// What a hostile CA sent: each is bounded, none panics or recurses.
    #[test]
    fn hostile_retry_after_is_clamped_or_ignored() {
        let within = |v: &str, lo: Duration, hi: Duration| {
            let now = SystemTime::now();
            let t =
                parse_retry_after(v, SystemTime::now()).unwrap_or_else(|| panic!("{v:?} ignored"));
            let d = t.duration_since(now).unwrap_or_default();
            let slack = Duration::from_secs(2);
            assert!(d + slack >= lo && d <= hi + slack, "{v:?}: {d:?}");
        };
        within("18446744073709551615", RETRY_AFTER_MAX, RETRY_AFTER_MAX);
        within(
            "99999999999999999999999999",
            RETRY_AFTER_MAX,
            RETRY_AFTER_MAX,
        );
        within("0", RETRY_AFTER_MIN, RETRY_AFTER_MIN);
        within(
            "Fri, 31 Dec 9999 23:59:59 GMT",
            RETRY_AFTER_MAX,
            RETRY_AFTER_MAX,
        );
        assert!(parse_retry_after(&"(".repeat(300_000), SystemTime::now()).is_none());
        assert!(parse_retry_after(&"9".repeat(300_000), SystemTime::now()).is_none());

        // The header itself is rewritten for instant-acme, which adds it to
        // the clock unchecked.
        let mut headers = HeaderMap::new();
        headers.insert(
            RETRY_AFTER,
            http::HeaderValue::from_static("18446744073709551615"),
        );
        sanitize_headers(&mut headers, SystemTime::now()).expect("sane");
        let secs: u64 = headers[RETRY_AFTER]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("delay-seconds");
        assert!((RETRY_AFTER_MAX.as_secs() - 5..=RETRY_AFTER_MAX.as_secs()).contains(&secs));
        let garbage = "(".repeat(300_000);
        headers.insert(
            RETRY_AFTER,
            http::HeaderValue::from_str(&garbage).expect("ascii"),
        );
        sanitize_headers(&mut headers, SystemTime::now()).expect("sane");
        assert!(headers.get(RETRY_AFTER).is_none());
    }

    #[test]
    fn only_https_locations_and_sane_nonces_pass() {
        let check = |name: &'static str, value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(name, http::HeaderValue::from_str(value).expect("value"));
            sanitize_headers(&mut headers, SystemTime::now()).map(|()| headers.get(name).cloned())
        };
        assert!(check("location", "https://ca/order/1").is_ok());
        let e = check("location", "http://ca:8080/order/1").expect_err("plain http");
        assert!(e.contains("https only"), "{e}");
        assert!(check("location", "/relative").is_err());
        assert!(check("location", &format!("https://ca/{}", "a".repeat(3000))).is_err());
        assert!(check("replay-nonce", "abc-_DEF").expect("ok").is_some());
        assert!(check("replay-nonce", "a/b").expect("dropped").is_none());
        assert!(
            check("replay-nonce", &"a".repeat(300))
                .expect("dropped")
                .is_none()
        );
        assert!(
            check("content-type", &"j".repeat(5000))
                .expect("dropped")
                .is_none()
        );
        assert_eq!(
            link_with_rel(r#"<http://ca/authz/7>;rel="up""#, "up").filter(|u| https_url(u).is_ok()),
            None
        );
    }

    // Fuzzing what certd parses of a CA's answers itself (instant-acme
    // parses the rest): never a panic, whatever the bytes.
    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            #[test]
            fn ca_bodies_and_headers_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512), header in "\\PC{0,120}") {
                let http = AcmeHttp::new(None, Clock::system()).expect("client");
                let mut headers = HeaderMap::new();
                if let Ok(v) = http::HeaderValue::from_str(&header) {
                    headers.insert(LINK, v.clone());
                    headers.insert(RETRY_AFTER, v);
                }
                headers.insert(CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                http.inner.observer.observe("https://ca/x", StatusCode::OK, &headers, &Bytes::from(body.clone()), SystemTime::now());
                http.inner.observer.remember_created_order(&headers, &Bytes::from(body.clone()));
                let _ = serde_json::from_slice::<raw::AuthzObject>(&body);
                let _ = serde_json::from_slice::<ProblemRecord>(&body);
                let _ = parse_retry_after(&header, SystemTime::now());
                let _ = link_with_rel(&header, "up");
            }

            /// Every header certd or instant-acme reads, with any value
            /// (long runs of one character included): sanitizing and
            /// observing never panic, and what survives is bounded.
            #[test]
            fn every_header_certd_reads_never_panics(
                values in proptest::collection::vec(
                    prop_oneof![
                        "\\PC{0,80}",
                        "[0-9]{1,40}",
                        "[(<;,\"a-z0-9 ]{0,200}",
                        (any::<char>(), 0..20_000usize).prop_map(|(c, n)| c.to_string().repeat(n)),
                    ],
                    6,
                ),
            ) {
                let http = AcmeHttp::new(None, Clock::system()).expect("client");
                let mut headers = HeaderMap::new();
                let names = [RETRY_AFTER, LINK, http::header::LOCATION, CONTENT_TYPE];
                for (name, v) in names.iter().zip(&values) {
                    if let Ok(v) = http::HeaderValue::from_str(v) {
                        headers.insert(name.clone(), v);
                    }
                }
                if let Ok(v) = http::HeaderValue::from_str(&values[4]) {
                    headers.insert("replay-nonce", v);
                }
                let _ = parse_retry_after(&values[5], SystemTime::now());
                if sanitize_headers(&mut headers, SystemTime::now()).is_ok() {
                    if let Some(v) = headers.get(RETRY_AFTER) {
                        let secs: u64 = v.to_str().expect("ascii").parse().expect("delay-seconds");
                        prop_assert!((1..=RETRY_AFTER_MAX.as_secs()).contains(&secs));
                    }
                    for v in headers.values() {
                        prop_assert!(v.len() <= MAX_HEADER_LEN);
                    }
                    http.inner.observer.observe("https://ca/x", StatusCode::OK, &headers, &Bytes::new(), SystemTime::now());
                    let _ = problem_for_error_page(StatusCode::BAD_GATEWAY, &headers, Bytes::new());
                }
            }

            #[test]
            fn json_shaped_answers_never_panic(status in "\\PC{0,12}", url in "\\PC{0,40}", expires in "\\PC{0,30}") {
                let body = serde_json::json!({
                    "status": status, "expires": expires, "identifier": {"type": "dns", "value": url},
                    "challenges": [{"type": status, "url": url, "status": status}],
                    "authorizations": [url], "finalize": url, "newNonce": url,
                });
                let http = AcmeHttp::new(None, Clock::system()).expect("client");
                let mut headers = HeaderMap::new();
                headers.insert(CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                let bytes = Bytes::from(body.to_string());
                http.inner.observer.observe("https://ca/x", StatusCode::OK, &headers, &bytes, SystemTime::now());
                let _ = serde_json::from_slice::<raw::AuthzObject>(&bytes).map(|a| a.identifier());
            }
        }
    }
}
