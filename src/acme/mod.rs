//! The ACME side: one HTTP stack, the account, and what a CA's errors mean.
//!
//! `AcmeHttp` is the only HTTP client in certd (reqwest on rustls with the
//! ring provider). instant-acme drives the protocol through it, and it adds
//! what instant-acme leaves to its caller:
//!
//! - a **nonce pool**: every `Replay-Nonce` the CA sends is kept until a
//!   request spends it, and instant-acme's `HEAD newNonce` is answered from
//!   the pool when it can be, so a running daemon's next order costs no
//!   extra round trip;
//! - **observations** per URL of what instant-acme does not surface:
//!   `Retry-After`, `Link: rel="up"`, and an object's `expires`;
//! - request **counts** per endpoint, for the benchmarks and metrics;
//! - **limits** on what the CA can make it read. The CA is untrusted input
//!   (RFC 8555 lets a client check everything it uses): requests go to
//!   https URLs only and redirects are not followed; bodies are read up to
//!   a cap while they stream; the headers certd and instant-acme read are
//!   bounded, and `Retry-After` is clamped before anyone sees it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use base64::prelude::BASE64_URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, LINK, RETRY_AFTER};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use instant_acme::{
    Account, AccountCredentials, BodyWrapper, BytesResponse, ExternalAccountKey, HttpClient,
    NewAccount,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

use crate::config::AcmeConfig;
use crate::ledger::Ledger;

pub mod ari;
pub mod raw;
mod trust;

const USER_AGENT: &str = concat!("certd/", env!("CARGO_PKG_VERSION"));

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
/// A problem's `detail` (and any text from the CA kept in the ledger, the
/// log or the notify command's environment) is cut to this many bytes.
pub const MAX_DETAIL: usize = 1024;
/// At most this many subproblems are kept.
const MAX_SUBPROBLEMS: usize = 32;

/// instant-acme retries a request whose nonce the CA rejected three times;
/// CAs under load reject more (Pebble's `PEBBLE_WFE_NONCEREJECT=50` rejects
/// half). A request rejected for its nonce was not processed, so repeating
/// it is safe: callers repeat each instant-acme call up to this many times.
pub const NONCE_ATTEMPTS: usize = 6;

/// Whether the CA rejected a request for its nonce (after instant-acme's
/// own retries).
pub fn is_bad_nonce(e: &instant_acme::Error) -> bool {
    matches!(e, instant_acme::Error::Api(p)
        if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:badNonce"))
}

/// Calls `f` again while it fails on a rejected nonce, up to
/// `NONCE_ATTEMPTS` times.
pub async fn with_nonce_retry<T, F, Fut>(mut f: F) -> Result<T, instant_acme::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, instant_acme::Error>>,
{
    let mut attempt = 1;
    loop {
        match f().await {
            Err(e) if attempt < NONCE_ATTEMPTS && is_bad_nonce(&e) => attempt += 1,
            other => return other,
        }
    }
}

/// Pooled nonces older than this are dropped: CAs expire them, and a
/// rejected nonce costs a round trip, the very thing the pool saves.
const NONCE_MAX_AGE: Duration = Duration::from_secs(300);
const NONCE_POOL_MAX: usize = 32;
const OBSERVATIONS_MAX: usize = 4096;
/// How long what a response said about an object is kept once the daemon
/// idles (`forget_old`): the driver and the reaper read it within
/// milliseconds of their own request.
const OBSERVATION_TTL: Duration = Duration::from_secs(5);
/// Endpoints learned from the directory, which outlive any order.
const DIRECTORY_ROLES: [&str; 5] = [
    "newNonce",
    "newAccount",
    "newOrder",
    "revokeCert",
    "keyChange",
];

/// Errors that stop certd from talking to the CA at all.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot read the CA bundle {path}: {detail}")]
    CaBundle { path: PathBuf, detail: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("account credentials {path}: {detail}")]
    Credentials { path: PathBuf, detail: String },
    /// The CA's words alone: "ACME account: …" put a wrapper before the
    /// cause.
    #[error("{0}")]
    Acme(#[from] AcmeError),
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
}

/// The one HTTP client; cheap to clone.
#[derive(Clone)]
pub struct AcmeHttp {
    inner: Arc<HttpInner>,
}

struct HttpInner {
    client: reqwest::Client,
    nonces: Mutex<VecDeque<(String, Instant)>>,
    /// With when it was recorded, for `forget_old`.
    observations: Mutex<HashMap<String, (Observation, Instant)>>,
    stats: Mutex<Stats>,
    /// The directory's newNonce URL, once a directory has been seen.
    new_nonce: Mutex<Option<String>>,
    /// The directory's keyChange URL, likewise.
    key_change: Mutex<Option<String>>,
    /// Recently created orders: (sorted identifiers, order URL). Lets the
    /// driver find an order instant-acme refused to hand over (a CA that
    /// ignored `replaces`).
    created_orders: Mutex<VecDeque<(String, String)>>,
}

/// What the last response from one URL said beyond its body.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    pub status: u16,
    pub retry_after: Option<SystemTime>,
    /// `Link: <…>;rel="up"`: a challenge's parent authorization at some CAs.
    pub link_up: Option<String>,
    /// The object's `expires` field, Unix seconds.
    pub expires: Option<i64>,
}

#[derive(Default)]
struct Stats {
    /// URL → endpoint name, learned from the directory and from objects,
    /// and when it was learned.
    roles: HashMap<String, (&'static str, Instant)>,
    /// (endpoint, outcome) → count
    counts: BTreeMap<(&'static str, String), u64>,
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
    pub fn new(ca_bundle: Option<&Path>) -> Result<Self, SetupError> {
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
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
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
                client,
                nonces: Mutex::new(VecDeque::new()),
                observations: Mutex::new(HashMap::new()),
                stats: Mutex::new(Stats::default()),
                new_nonce: Mutex::new(None),
                key_change: Mutex::new(None),
                created_orders: Mutex::new(VecDeque::new()),
            }),
        })
    }

    /// Drops what responses said about orders, authorizations and
    /// challenges more than a few seconds ago, for a daemon about to idle:
    /// 1,000 orders leave some 7,000 URLs behind, and none is read again.
    pub fn forget_old(&self) {
        self.forget_before(Instant::now());
    }

    fn forget_before(&self, now: Instant) {
        let fresh = |at: &Instant| now.duration_since(*at) < OBSERVATION_TTL;
        let mut map = lock(&self.inner.observations);
        map.retain(|_, (_, at)| fresh(at));
        map.shrink_to_fit();
        drop(map);
        let mut stats = lock(&self.inner.stats);
        stats
            .roles
            .retain(|_, (role, at)| DIRECTORY_ROLES.contains(role) || fresh(at));
        stats.roles.shrink_to_fit();
    }

    /// The plain reqwest client, for non-ACME requests (pre-flight checks).
    pub fn plain(&self) -> &reqwest::Client {
        &self.inner.client
    }

    /// What the last response from `url` said in its headers.
    pub fn observed(&self, url: &str) -> Option<Observation> {
        lock(&self.inner.observations)
            .get(url)
            .map(|(o, _)| o.clone())
    }

    /// The CA's newNonce URL, known once instant-acme fetched the directory.
    pub fn new_nonce_url(&self) -> Option<String> {
        lock(&self.inner.new_nonce).clone()
    }

    /// The CA's keyChange URL, known once the directory was fetched.
    pub fn key_change_url(&self) -> Option<String> {
        lock(&self.inner.key_change).clone()
    }

    /// The URL of the order the CA last created for exactly `identifiers`
    /// (sorted), taken out of the record.
    pub fn take_created_order(&self, identifiers: &[String]) -> Option<String> {
        let key = identifiers.join(",");
        let mut created = lock(&self.inner.created_orders);
        let i = created.iter().rposition(|(k, _)| *k == key)?;
        created.remove(i).map(|(_, url)| url)
    }

    /// Requests sent so far, per (endpoint, outcome).
    pub fn request_counts(&self) -> BTreeMap<(&'static str, String), u64> {
        lock(&self.inner.stats).counts.clone()
    }
}

tokio::task_local! {
    /// The latest nonce a CA sent to the current order's task.
    static LAST_NONCE: std::cell::RefCell<Option<String>>;
    /// The `Retry-After` of the latest answer the current task received
    /// (`None` when it had none). instant-acme's `Problem` drops the
    /// header, and the observation per URL is shared by every task that
    /// posts to the same URL (all `newOrder`s): this is how the problem an
    /// instant-acme call returns gets the `Retry-After` of its own answer.
    static LAST_RETRY_AFTER: std::cell::Cell<Option<SystemTime>>;
}

/// The `Retry-After` of the answer the current task received last, inside
/// a `nonce_scope`.
fn last_retry_after() -> Option<SystemTime> {
    LAST_RETRY_AFTER
        .try_with(std::cell::Cell::get)
        .ok()
        .flatten()
}

impl AcmeHttp {
    /// Runs one order (or any sequence of requests) so that its last unspent
    /// nonce goes to the pool when it ends. Every response's nonce is spent
    /// by the next request of the same task (instant-acme keeps it in the
    /// order), so only the last one is ever free; pooling nonces any earlier
    /// would let a concurrent order spend the same nonce and both would
    /// need a retry. The next order's `newNonce` is then answered from the
    /// pool without a round trip.
    pub async fn nonce_scope<F: Future>(&self, fut: F) -> F::Output {
        let slot = std::cell::RefCell::new(None);
        let retry_after = LAST_RETRY_AFTER.scope(std::cell::Cell::new(None), fut);
        LAST_NONCE
            .scope(slot, async {
                let out = retry_after.await;
                if let Some(nonce) = LAST_NONCE.with(|slot| slot.take()) {
                    self.inner.put_nonce(&nonce);
                }
                out
            })
            .await
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
            && let Some(nonce) = self.take_nonce()
        {
            self.count("newNonce", "pooled");
            return Ok(synthetic_nonce_response(&nonce));
        }
        let result = self
            .client
            .request(parts.method.clone(), &url)
            .headers(parts.headers)
            .body(body)
            .send()
            .await;
        let endpoint = self.endpoint(&parts.method, &url);
        let rsp = match result {
            Ok(rsp) => rsp,
            Err(e) => {
                self.count(endpoint, "transport-error");
                return Err(instant_acme::Error::Other(Box::new(e)));
            }
        };
        let status = rsp.status();
        let version = rsp.version();
        let mut headers = rsp.headers().clone();
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
            sanitize_headers(&mut headers)
                .map_err(|e| format!("{}: {e}", bounded(&url, MAX_URL_LEN)))
        };
        if let Err(e) = checked {
            self.count(endpoint, status.as_str());
            return Err(instant_acme::Error::Other(e.into()));
        }
        let bytes = match read_capped(rsp, body_limit(&headers)).await {
            Ok(b) => b,
            Err(e) => {
                self.count(endpoint, "transport-error");
                return Err(instant_acme::Error::Other(
                    format!(
                        "reading the answer from {}: {e}",
                        bounded(&url, MAX_URL_LEN)
                    )
                    .into(),
                ));
            }
        };
        self.count(endpoint, status.as_str());
        if endpoint == "newOrder" && status == StatusCode::CREATED {
            self.remember_created_order(&headers, &bytes);
        }
        if let Some(nonce) = headers.get("replay-nonce").and_then(|v| v.to_str().ok()) {
            // Only the task's latest nonce is kept (see `nonce_scope`): the
            // caller spends this one in its next request.
            let _ = LAST_NONCE.try_with(|slot| slot.replace(Some(nonce.to_owned())));
        }
        self.observe(&url, status, &headers, &bytes);
        let retry_after = headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let _ = LAST_RETRY_AFTER.try_with(|slot| slot.set(retry_after));
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

    fn remember_created_order(&self, headers: &HeaderMap, body: &Bytes) {
        #[derive(Deserialize)]
        struct Created {
            identifiers: Vec<CreatedIdentifier>,
        }
        #[derive(Deserialize)]
        struct CreatedIdentifier {
            value: String,
        }
        let Some(location) = headers
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
        else {
            return;
        };
        let Ok(created) = serde_json::from_slice::<Created>(body) else {
            return;
        };
        let mut names: Vec<String> = created.identifiers.into_iter().map(|i| i.value).collect();
        names.sort();
        let mut list = lock(&self.created_orders);
        if list.len() >= 64 {
            list.pop_front();
        }
        list.push_back((names.join(","), location.to_owned()));
    }

    fn take_nonce(&self) -> Option<String> {
        let mut pool = lock(&self.nonces);
        while let Some((nonce, at)) = pool.pop_front() {
            if at.elapsed() < NONCE_MAX_AGE {
                return Some(nonce);
            }
        }
        None
    }

    fn put_nonce(&self, nonce: &str) {
        let mut pool = lock(&self.nonces);
        if pool.len() >= NONCE_POOL_MAX {
            pool.pop_front();
        }
        pool.push_back((nonce.to_owned(), Instant::now()));
    }

    fn observe(&self, url: &str, status: StatusCode, headers: &HeaderMap, body: &Bytes) {
        let retry_after = headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let link_up = headers
            .get_all(LINK)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| link_with_rel(v, "up"))
            .filter(|u| https_url(u).is_ok());
        let is_json = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.contains("json"));
        let mut expires = None;
        if is_json && let Ok(shape) = serde_json::from_slice::<ObjectShape>(body) {
            expires = shape
                .expires
                .as_deref()
                .and_then(crate::clock::parse_rfc3339);
            self.learn_roles(&shape);
        }
        let observation = Observation {
            status: status.as_u16(),
            retry_after,
            link_up,
            expires,
        };
        let now = Instant::now();
        let mut map = lock(&self.observations);
        if map.len() >= OBSERVATIONS_MAX {
            map.clear();
        }
        // A created object (newOrder's answer) is filed under its own URL
        // too, so its `expires` can be looked up by the order URL.
        if let Some(location) = headers
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
        {
            map.insert(location.to_owned(), (observation.clone(), now));
        }
        map.insert(url.to_owned(), (observation, now));
    }

    fn learn_roles(&self, shape: &ObjectShape) {
        if let Some(url) = &shape.new_nonce {
            *lock(&self.new_nonce) = Some(url.clone());
        }
        if let Some(url) = &shape.key_change {
            *lock(&self.key_change) = Some(url.clone());
        }
        let now = Instant::now();
        let mut stats = lock(&self.stats);
        let roles = &mut stats.roles;
        if roles.len() >= OBSERVATIONS_MAX {
            roles.retain(|_, (role, _)| DIRECTORY_ROLES.contains(role));
        }
        for (url, role) in [
            (&shape.new_nonce, "newNonce"),
            (&shape.new_account, "newAccount"),
            (&shape.new_order, "newOrder"),
            (&shape.revoke_cert, "revokeCert"),
            (&shape.key_change, "keyChange"),
            (&shape.finalize, "finalize"),
            (&shape.certificate, "certificate"),
        ] {
            if let Some(url) = url {
                roles.insert(url.clone(), (role, now));
            }
        }
        for url in &shape.authorizations {
            roles.insert(url.clone(), ("authz", now));
        }
        for c in &shape.challenges {
            roles.insert(c.url.clone(), ("challenge", now));
        }
    }

    fn endpoint(&self, method: &Method, url: &str) -> &'static str {
        if *method == Method::GET {
            return if url.contains("renewal") {
                "renewalInfo"
            } else {
                "directory"
            };
        }
        if *method == Method::HEAD {
            return "newNonce";
        }
        lock(&self.stats)
            .roles
            .get(url)
            .map_or("order", |(role, _)| role)
    }

    fn count(&self, endpoint: &'static str, outcome: &str) {
        *lock(&self.stats)
            .counts
            .entry((endpoint, outcome.to_owned()))
            .or_insert(0) += 1;
    }
}

/// The fields of directory, order, authorization and challenge objects that
/// the HTTP layer learns from; serde ignores the rest.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ObjectShape {
    expires: Option<String>,
    new_nonce: Option<String>,
    new_account: Option<String>,
    new_order: Option<String>,
    revoke_cert: Option<String>,
    key_change: Option<String>,
    finalize: Option<String>,
    certificate: Option<String>,
    authorizations: Vec<String>,
    challenges: Vec<ChallengeShape>,
}

#[derive(Deserialize)]
struct ChallengeShape {
    url: String,
}

/// Poisoning only means another thread panicked mid-update of a cache; the
/// data is still usable, so recover it rather than cascade the panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
    Transport(#[from] reqwest::Error),
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
async fn read_capped(mut rsp: reqwest::Response, limit: usize) -> Result<Bytes, BodyError> {
    let too_large = BodyError::TooLarge { limit };
    if rsp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large);
    }
    let mut body = Vec::new();
    while let Some(chunk) = rsp.chunk().await? {
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
fn sanitize_headers(headers: &mut HeaderMap) -> Result<(), String> {
    let retry_after = headers
        .get(RETRY_AFTER)
        .map(|v| v.to_str().ok().and_then(parse_retry_after));
    if let Some(parsed) = retry_after {
        headers.remove(RETRY_AFTER);
        if let Some(at) = parsed {
            let secs = at
                .duration_since(SystemTime::now())
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
fn https_url(url: &str) -> Result<(), &'static str> {
    if url.len() > MAX_URL_LEN {
        return Err("longer than 2048 bytes");
    }
    match url.parse::<http::Uri>() {
        Ok(u) if u.scheme_str() == Some("https") && u.host().is_some() => Ok(()),
        Ok(_) => Err("not an https URL; certd talks to a CA over https only"),
        Err(_) => Err("not a URL"),
    }
}

/// `text`, cut at a character boundary to at most `max` bytes plus a
/// marker saying how long it was: whatever the CA sent, what certd logs,
/// stores or passes to a command stays bounded, and says it was cut.
pub fn bounded(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [truncated, {} bytes in all]", &text[..end], text.len()).into()
}

fn synthetic_nonce_response(nonce: &str) -> BytesResponse {
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = StatusCode::OK;
    if let Ok(v) = http::HeaderValue::from_str(nonce) {
        parts.headers.insert("replay-nonce", v);
    }
    BytesResponse {
        parts,
        body: Box::new(Bytes::new()),
    }
}

/// `Retry-After`: delay-seconds or an HTTP date, as an instant between
/// `RETRY_AFTER_MIN` and `RETRY_AFTER_MAX` from now (clamping is logged).
/// Values longer than any legitimate one are ignored unparsed.
pub fn parse_retry_after(v: &str) -> Option<SystemTime> {
    let v = v.trim();
    if v.is_empty() || v.len() > MAX_RETRY_AFTER_LEN {
        return None;
    }
    let now = SystemTime::now();
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

/// Extracts the target of a `Link` header entry with the given relation.
fn link_with_rel(header: &str, rel: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .any(|p| {
                let p = p.trim();
                p == format!("rel=\"{rel}\"") || p == format!("rel={rel}")
            })
            .then(|| target.to_owned())
    })
}

// ---- account -------------------------------------------------------------

/// A loaded ACME account and its ledger id.
#[derive(Clone)]
pub struct AcmeAccount {
    key: AccountKey,
    pub http: AcmeHttp,
    pub ledger_id: i64,
    pub directory_url: String,
}

/// The account's key, shared by every clone of an [`AcmeAccount`]: a key
/// rollover in the daemon switches its orders, its reaper and its ARI
/// checks at once, and no request after the CA's confirmation is signed
/// with the old key.
#[derive(Clone)]
struct AccountKey {
    current: Arc<std::sync::RwLock<KeyPair>>,
    /// One rollover at a time (they share the `.next` file).
    rolling: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Clone)]
struct KeyPair {
    account: Account,
    /// The same key, for the requests certd signs itself (`raw`).
    signer: Arc<raw::RawSigner>,
}

impl AccountKey {
    fn new(account: Account, signer: raw::RawSigner) -> Self {
        Self {
            current: Arc::new(std::sync::RwLock::new(KeyPair {
                account,
                signer: Arc::new(signer),
            })),
            rolling: Arc::default(),
        }
    }

    fn get(&self) -> KeyPair {
        // A poisoned lock only means a panic elsewhere; the pair is whole.
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set(&self, pair: KeyPair) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = pair;
    }
}

impl fmt::Debug for AcmeAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcmeAccount")
            .field("id", &self.key.get().account.id())
            .field("directory_url", &self.directory_url)
            .finish_non_exhaustive()
    }
}

/// Where the account's credentials (its private key) live: one 0600 file
/// per directory URL in the state directory.
pub fn credentials_path(state_dir: &Path, directory_url: &str) -> PathBuf {
    let digest = ring::digest::digest(&ring::digest::SHA256, directory_url.as_bytes());
    let hex: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    state_dir.join(format!("account-{hex}.json"))
}

impl AcmeAccount {
    /// The account, with its current key.
    pub fn account(&self) -> Account {
        self.key.get().account
    }

    /// The current key, for the requests certd signs itself (`raw`).
    pub fn signer(&self) -> Arc<raw::RawSigner> {
        self.key.get().signer
    }

    /// Loads the account for the configured directory, creating and
    /// persisting it on first use.
    pub async fn load_or_create(
        cfg: &AcmeConfig,
        state_dir: &Path,
        store: &Ledger,
        http: AcmeHttp,
    ) -> Result<Self, SetupError> {
        let directory_url = cfg.directory.to_string();
        let path = credentials_path(state_dir, &directory_url);
        let builder = || Account::builder_with_http(Box::new(http.clone()));
        let next = path.with_extension("json.next");
        if next.exists() {
            tracing::warn!(
                pending = %next.display(),
                "a key rollover was interrupted; if the CA now rejects the account key, the new key is in this file (move it over the credentials file)"
            );
        }
        let (account, key) = match std::fs::read(&path) {
            Ok(bytes) => {
                let creds: AccountCredentials =
                    serde_json::from_slice(&bytes).map_err(|e| SetupError::Credentials {
                        path: path.clone(),
                        detail: format!("not valid account credentials: {e}"),
                    })?;
                let key = creds.private_key().secret_pkcs8_der().to_vec();
                let account = http
                    .nonce_scope(builder().from_credentials(creds))
                    .await
                    .map_err(AcmeError::from)?;
                (account, key)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let contact: Vec<&str> = cfg.contact.iter().map(String::as_str).collect();
                let eab = cfg
                    .eab
                    .as_ref()
                    .map(|e| ExternalAccountKey::new(e.kid.clone(), e.hmac_key.expose()));
                let new_account = NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                };
                let (account, creds) = with_nonce_retry(|| {
                    http.nonce_scope(builder().create(
                        &new_account,
                        directory_url.clone(),
                        eab.as_ref(),
                    ))
                })
                .await
                .map_err(AcmeError::from)?;
                let json = serde_json::to_vec(&creds).map_err(|e| SetupError::Credentials {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
                crate::safefs::write_secret_file(&path, &json).map_err(|e| {
                    SetupError::Credentials {
                        path: path.clone(),
                        detail: format!("cannot write: {e}"),
                    }
                })?;
                tracing::info!(account = account.id(), "created ACME account");
                (account, creds.private_key().secret_pkcs8_der().to_vec())
            }
            Err(e) => {
                return Err(SetupError::Credentials {
                    path,
                    detail: format!("cannot read: {e}"),
                });
            }
        };
        let signer =
            raw::RawSigner::new(&key, account.id()).map_err(|detail| SetupError::Credentials {
                path: path.clone(),
                detail,
            })?;
        let ledger_id = store.upsert_account(&directory_url, account.id()).await?;
        Ok(Self {
            key: AccountKey::new(account, signer),
            http,
            ledger_id,
            directory_url,
        })
    }
}

/// Rolls the account key over (RFC 8555 §7.3.5) and returns the new key's
/// thumbprint. The new credentials are written to `<file>.next` (0600)
/// before the CA is asked, so a crash after the CA's confirmation cannot
/// lose the key the account now has; they replace the old file only after
/// the CA confirmed. Until then the old key is the account's key.
pub async fn roll_over_account(
    account: &AcmeAccount,
    state_dir: &Path,
) -> Result<String, SetupError> {
    let _one_at_a_time = account.key.rolling.lock().await;
    let KeyPair {
        account: acme,
        signer,
    } = account.key.get();
    let path = credentials_path(state_dir, &account.directory_url);
    let next = path.with_extension("json.next");
    let cred_err = |detail: String| SetupError::Credentials {
        path: path.clone(),
        detail,
    };
    let key_change = account
        .http
        .key_change_url()
        .ok_or_else(|| cred_err("the CA's directory has no keyChange URL".into()))?;
    let (pkcs8, new_signer) = raw::generate_account_key(acme.id())?;
    let creds = serde_json::json!({
        "id": acme.id(),
        "key_pkcs8": BASE64_URL_SAFE_NO_PAD.encode(&pkcs8),
        "directory": account.directory_url,
    });
    crate::safefs::write_secret_file(&next, creds.to_string().as_bytes())
        .map_err(|e| cred_err(format!("cannot write {}: {e}", next.display())))?;
    // The new key's `Account`, built before the CA is asked: after its
    // confirmation nothing may fail before the switch.
    let new_account = account
        .http
        .nonce_scope(
            Account::builder_with_http(Box::new(account.http.clone())).from_parts(
                acme.id().to_owned(),
                rustls_pki_types::PrivatePkcs8KeyDer::from(pkcs8.as_slice()),
                account.directory_url.clone(),
            ),
        )
        .await
        .map_err(AcmeError::from)?;
    if let Err(e) = raw::roll_over(&account.http, &signer, &new_signer, &key_change).await {
        let _ = std::fs::remove_file(&next);
        return Err(e.into());
    }
    std::fs::rename(&next, &path).map_err(|e| {
        cred_err(format!(
            "the CA took the new key, but it is still in {}: {e}",
            next.display()
        ))
    })?;
    let thumbprint = new_signer.thumbprint();
    account.key.set(KeyPair {
        account: new_account,
        signer: Arc::new(new_signer),
    });
    tracing::info!(account = acme.id(), "account key rolled over");
    Ok(thumbprint)
}

// ---- errors --------------------------------------------------------------

/// An RFC 7807 problem document, as the ledger stores it and `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProblemRecord {
    #[serde(
        rename = "type",
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "deserialize_bounded"
    )]
    pub kind: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "deserialize_bounded"
    )]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subproblems: Vec<SubproblemRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SubproblemRecord {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identifier: Option<String>,
    #[serde(
        rename = "type",
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "deserialize_bounded"
    )]
    pub kind: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "deserialize_bounded"
    )]
    pub detail: Option<String>,
}

/// A text field of a problem, cut to `MAX_DETAIL`.
fn bounded_field(text: &Option<String>) -> Option<String> {
    text.as_deref().map(|t| bounded(t, MAX_DETAIL).into_owned())
}

/// Deserializes a text field of a problem cut to `MAX_DETAIL`, for problem
/// documents read straight from a body.
fn deserialize_bounded<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(bounded_field(&Option::<String>::deserialize(d)?))
}

impl ProblemRecord {
    /// The CA's problem, with its text bounded (`MAX_DETAIL` per field,
    /// `MAX_SUBPROBLEMS` subproblems) before it reaches the ledger, the
    /// log or the notify command.
    pub fn from_problem(p: &instant_acme::Problem) -> Self {
        Self {
            kind: bounded_field(&p.r#type),
            detail: bounded_field(&p.detail),
            status: p.status,
            subproblems: p
                .subproblems
                .iter()
                .take(MAX_SUBPROBLEMS)
                .map(|s| SubproblemRecord {
                    identifier: s
                        .identifier
                        .as_ref()
                        .map(|i| bounded(&identifier_string(i), MAX_DETAIL).into_owned()),
                    kind: bounded_field(&s.r#type),
                    detail: bounded_field(&s.detail),
                })
                .collect(),
        }
    }

    /// The problem type without the `urn:ietf:params:acme:error:` prefix.
    pub fn short_type(&self) -> &str {
        let t = self.kind.as_deref().unwrap_or("unknown");
        t.strip_prefix("urn:ietf:params:acme:error:").unwrap_or(t)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl fmt::Display for ProblemRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.short_type())?;
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        for s in &self.subproblems {
            write!(
                f,
                "; {}: {} {}",
                s.identifier.as_deref().unwrap_or("?"),
                s.kind
                    .as_deref()
                    .map(|t| t.strip_prefix("urn:ietf:params:acme:error:").unwrap_or(t))
                    .unwrap_or(""),
                s.detail.as_deref().unwrap_or("")
            )?;
        }
        Ok(())
    }
}

pub fn identifier_string(id: &instant_acme::Identifier) -> String {
    match id {
        instant_acme::Identifier::Dns(d) => d.clone(),
        instant_acme::Identifier::Ip(ip) => ip.to_string(),
        other => format!("{other:?}"),
    }
}

/// How a caller should react to a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Transient (network, 5xx, bad nonce): try again after a backoff.
    Retryable,
    /// The CA asked us to wait; no new requests to it before `until`.
    RateLimited { until: Option<SystemTime> },
    /// Retrying the same request will not help (unauthorized, malformed,
    /// rejected identifier, failed validation).
    Final,
}

/// The shortest pause a rate limit imposes on new orders, whatever the
/// CA's `Retry-After` says: `Retry-After: 0` on a rate limit would
/// otherwise be a loop of orders as fast as the CA answers.
pub const RATE_LIMIT_MIN_PAUSE: Duration = Duration::from_secs(60);

impl Disposition {
    /// A rate limit until `until`, at least `RATE_LIMIT_MIN_PAUSE` from now.
    pub fn rate_limited(until: Option<SystemTime>) -> Self {
        let floor = SystemTime::now().checked_add(RATE_LIMIT_MIN_PAUSE);
        Self::RateLimited {
            until: until.map(|t| floor.map_or(t, |f| t.max(f))),
        }
    }
}

/// Which orders a CA's rate limit holds back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitScope {
    /// Every new order of the account: Boulder's new orders per account
    /// and new registrations, or an overloaded CA (503 with `Retry-After`).
    Account,
    /// Orders naming any of these identifiers; none named: the names of
    /// the order that was refused (its exact set, or a limit the CA did
    /// not say more of, which is safer than pausing the account).
    Names(Vec<String>),
    /// Orders naming this registered domain or any name under it.
    Domain(String),
}

impl LimitScope {
    /// Whether an order for `names` is held back by this limit, besides
    /// the order that met it.
    pub fn touches(&self, names: &[String]) -> bool {
        match self {
            Self::Account => true,
            Self::Names(ids) => names.iter().any(|n| ids.contains(n)),
            Self::Domain(d) => names.iter().any(|n| {
                let n = n.strip_prefix("*.").unwrap_or(n);
                n == d || n.strip_suffix(d.as_str()).is_some_and(|h| h.ends_with('.'))
            }),
        }
    }
}

/// A CA's rate limit, as certd reacts to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    pub scope: LimitScope,
    /// The CA paused the identifiers after too many failures: no
    /// `Retry-After`, an operator unpauses them at this URL.
    pub paused: bool,
    pub unpause_url: Option<String>,
}

/// What Boulder's pause answer says before the identifiers and the URL
/// (wfe2 `NewOrder`): "Your account is temporarily prevented from
/// requesting certificates for a.example, b.example and possibly others.
/// Please visit: https://…".
const BOULDER_PAUSED: &str = "temporarily prevented from requesting certificates for ";

impl RateLimit {
    /// Classifies a rate-limit problem: the identifiers of its
    /// subproblems where it has them, else the limit its detail names in
    /// Boulder's words (ratelimits/limiter.go `Decision.Result`), else the
    /// refused order's names.
    pub fn classify(problem: &ProblemRecord) -> Self {
        let detail = problem.detail.as_deref().unwrap_or_default();
        let lower = detail.to_ascii_lowercase();
        let named: Vec<String> = problem
            .subproblems
            .iter()
            .filter_map(|s| s.identifier.clone())
            .collect();
        let quoted = || {
            let (_, rest) = detail.split_once('"')?;
            let (value, _) = rest.split_once('"')?;
            Some(value.to_ascii_lowercase())
        };
        if let Some(at) = lower.find(BOULDER_PAUSED) {
            let rest = &detail[at + BOULDER_PAUSED.len()..];
            let listed = rest
                .split_once(" and possibly others")
                .map(|(list, _)| list.split(", ").map(str::to_owned).collect::<Vec<_>>())
                .unwrap_or_default();
            let unpause_url = rest
                .split_whitespace()
                .find(|w| w.starts_with("https://"))
                .map(|w| w.trim_end_matches(['.', ',', ')', '"']).to_owned())
                .filter(|u| https_url(u).is_ok());
            return Self {
                scope: LimitScope::Names(if named.is_empty() { listed } else { named }),
                paused: true,
                unpause_url,
            };
        }
        let account_wide = lower.contains("too many new orders")
            || lower.contains("too many new registrations")
            || (problem.short_type() != "rateLimited" && problem.status.is_some_and(|s| s >= 500));
        let scope = if account_wide {
            LimitScope::Account
        } else if !named.is_empty() {
            LimitScope::Names(named)
        } else if lower.contains("too many failed authorizations") {
            LimitScope::Names(quoted().into_iter().collect())
        } else if lower.contains("too many certificates")
            && !lower.contains("exact set")
            && let Some(domain) = quoted()
        {
            LimitScope::Domain(domain)
        } else {
            LimitScope::Names(Vec::new())
        };
        Self {
            scope,
            paused: false,
            unpause_url: None,
        }
    }
}

/// An error from talking to the CA, classified.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("the CA answered: {problem}")]
    Problem {
        problem: ProblemRecord,
        disposition: Disposition,
    },
    /// Worded cause first (`transport_message`), since a status line
    /// or a monitoring line cut at its end must keep the reason.
    #[error("{0}")]
    Transport(String),
    #[error("unexpected answer from the CA: {0}")]
    Protocol(String),
    #[error("timed out waiting for the CA: {0}")]
    Timeout(String),
}

impl AcmeError {
    pub fn disposition(&self) -> Disposition {
        match self {
            Self::Problem { disposition, .. } => *disposition,
            Self::Transport(_) | Self::Timeout(_) => Disposition::Retryable,
            // A CA that answers garbage may be mid-deploy; try again later.
            Self::Protocol(_) => Disposition::Retryable,
        }
    }

    pub fn problem(&self) -> Option<&ProblemRecord> {
        match self {
            Self::Problem { problem, .. } => Some(problem),
            _ => None,
        }
    }

    /// The rate limit this error is, if it is one, classified.
    pub fn rate_limit(&self) -> Option<RateLimit> {
        match self {
            Self::Problem {
                problem,
                disposition: Disposition::RateLimited { .. },
            } => Some(RateLimit::classify(problem)),
            _ => None,
        }
    }

    /// Classifies a problem document; `retry_after` comes from the response.
    pub fn from_problem(p: &instant_acme::Problem, retry_after: Option<SystemTime>) -> Self {
        let problem = ProblemRecord::from_problem(p);
        let disposition = match problem.short_type() {
            "rateLimited" => Disposition::rate_limited(retry_after),
            "badNonce" | "serverInternal" => Disposition::Retryable,
            _ if p.status.is_some_and(|s| s == 429) => Disposition::rate_limited(retry_after),
            _ if p.status.is_some_and(|s| s >= 500) => match retry_after {
                Some(_) => Disposition::rate_limited(retry_after),
                None => Disposition::Retryable,
            },
            _ => Disposition::Final,
        };
        Self::Problem {
            problem,
            disposition,
        }
    }
}

impl From<instant_acme::Error> for AcmeError {
    fn from(e: instant_acme::Error) -> Self {
        match e {
            // The problem came with the task's latest answer.
            instant_acme::Error::Api(p) => Self::from_problem(&p, last_retry_after()),
            instant_acme::Error::Other(inner) => Self::Transport(transport_message(inner.as_ref())),
            instant_acme::Error::Timeout(_) => Self::Timeout(e.to_string()),
            instant_acme::Error::Json(j) => Self::Protocol(format!("malformed JSON: {j}")),
            other => Self::Protocol(other.to_string()),
        }
    }
}

/// Why a request to the CA failed, in words and cause first: reqwest's
/// message wraps the reason in three layers ("error sending request for url
/// (…): client error (Connect): …"), and a TLS refusal is a Rust debug dump
/// (`Other(OtherError(CaUsedAsEndEntity))`) that never names the key that
/// fixes it. Messages certd wrote itself (a refused redirect, a directory
/// that answers 404) have no sources and are kept as they are.
pub fn transport_message(e: &(dyn std::error::Error + 'static)) -> String {
    let mut url = None;
    let mut innermost = e;
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(r) = c.downcast_ref::<reqwest::Error>() {
            url = url.or_else(|| r.url().map(|u| u.as_str().to_owned()));
        }
        if let Some(tls) = rustls_error(c) {
            let at = url.map(|u| format!(" ({u})")).unwrap_or_default();
            return format!("{}{at}", trust::describe(tls));
        }
        innermost = c;
        cur = c.source();
    }
    match url {
        Some(url) => format!("{innermost}: cannot reach the CA at {url}"),
        None if std::ptr::addr_eq(innermost, e) => e.to_string(),
        None => format!("{innermost}: cannot reach the CA ({e})"),
    }
}

/// The rustls error in `e`, which hyper and tokio-rustls wrap in one
/// `io::Error` inside another; `io::Error::source` skips what it wraps.
fn rustls_error<'a>(mut e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    loop {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        e = e.downcast_ref::<std::io::Error>()?.get_ref()?;
    }
}

/// An error with its sources, `a: b: c`, since reqwest's top-level message
/// alone ("error sending request") does not say what went wrong.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle daemon keeps the directory's endpoints and forgets the
    /// objects of finished orders.
    #[test]
    fn forget_old_keeps_only_the_directory() {
        let http = AcmeHttp::new(None).expect("client");
        let json = |body: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            (headers, Bytes::from_static(body.as_bytes()))
        };
        let (h, b) = json(r#"{"newNonce": "https://ca/nonce", "newOrder": "https://ca/order"}"#);
        http.inner.observe("https://ca/dir", StatusCode::OK, &h, &b);
        let (h, b) = json(r#"{"status": "pending", "authorizations": ["https://ca/authz/1"]}"#);
        http.inner
            .observe("https://ca/order/1", StatusCode::OK, &h, &b);
        assert_eq!(
            http.inner.endpoint(&Method::POST, "https://ca/authz/1"),
            "authz"
        );
        assert!(http.observed("https://ca/order/1").is_some());

        // Just now: everything is still in use.
        http.forget_before(Instant::now());
        assert!(http.observed("https://ca/order/1").is_some());

        http.forget_before(Instant::now() + OBSERVATION_TTL * 2);
        assert!(http.observed("https://ca/order/1").is_none());
        assert!(http.observed("https://ca/dir").is_none());
        let endpoint = |url| http.inner.endpoint(&Method::POST, url);
        assert_eq!(
            endpoint("https://ca/authz/1"),
            "order",
            "an object's role outlived idling"
        );
        assert_eq!(endpoint("https://ca/order"), "newOrder");
        assert_eq!(endpoint("https://ca/nonce"), "newNonce");
    }

    #[test]
    fn link_up_is_found() {
        let h = r#"<https://ca/dir>;rel="index", <https://ca/authz/7>;rel="up""#;
        assert_eq!(
            link_with_rel(h, "up").as_deref(),
            Some("https://ca/authz/7")
        );
        assert_eq!(link_with_rel(h, "next"), None);
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
        let e = AcmeError::from_problem(&p, None);
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
        let t = parse_retry_after("120").expect("seconds");
        assert!(t > SystemTime::now() + Duration::from_secs(100));
        assert!(parse_retry_after("Fri, 31 Dec 1999 23:59:59 GMT").is_some());
        assert!(parse_retry_after("soon").is_none());
    }

    /// What a hostile CA sent: each is bounded, none panics or recurses.
    #[test]
    fn hostile_retry_after_is_clamped_or_ignored() {
        let within = |v: &str, lo: Duration, hi: Duration| {
            let now = SystemTime::now();
            let t = parse_retry_after(v).unwrap_or_else(|| panic!("{v:?} ignored"));
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
        assert!(parse_retry_after(&"(".repeat(300_000)).is_none());
        assert!(parse_retry_after(&"9".repeat(300_000)).is_none());

        // The header itself is rewritten for instant-acme, which adds it to
        // the clock unchecked.
        let mut headers = HeaderMap::new();
        headers.insert(
            RETRY_AFTER,
            http::HeaderValue::from_static("18446744073709551615"),
        );
        sanitize_headers(&mut headers).expect("sane");
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
        sanitize_headers(&mut headers).expect("sane");
        assert!(headers.get(RETRY_AFTER).is_none());
    }

    #[test]
    fn a_rate_limit_of_zero_still_pauses() {
        let Disposition::RateLimited { until: Some(until) } =
            Disposition::rate_limited(parse_retry_after("0"))
        else {
            panic!("a rate limit with a time");
        };
        assert!(until >= SystemTime::now() + RATE_LIMIT_MIN_PAUSE - Duration::from_secs(5));
    }

    #[test]
    fn only_https_locations_and_sane_nonces_pass() {
        let check = |name: &'static str, value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(name, http::HeaderValue::from_str(value).expect("value"));
            sanitize_headers(&mut headers).map(|()| headers.get(name).cloned())
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

    #[test]
    fn problem_text_is_bounded() {
        let huge = "x".repeat(5 << 20);
        let body = serde_json::json!({
            "type": "urn:ietf:params:acme:error:malformed",
            "detail": huge,
            "subproblems": (0..100).map(|_| serde_json::json!({"detail": huge})).collect::<Vec<_>>(),
        });
        let p: instant_acme::Problem = serde_json::from_value(body.clone()).expect("problem");
        let record = ProblemRecord::from_problem(&p);
        let detail = record.detail.as_deref().expect("detail");
        assert!(detail.len() < MAX_DETAIL + 64, "{}", detail.len());
        assert!(detail.ends_with(&format!("[truncated, {} bytes in all]", 5 << 20)));
        assert_eq!(record.subproblems.len(), MAX_SUBPROBLEMS);
        assert!(record.to_string().len() < (MAX_SUBPROBLEMS + 1) * (MAX_DETAIL + 200));
        // Read straight from a body (as `raw` does), the same bound holds.
        let direct: ProblemRecord = serde_json::from_value(body).expect("record");
        assert_eq!(direct.detail, record.detail);
        // Cut at a character boundary.
        assert!(bounded(&"é".repeat(600), 5).starts_with("éé…"));
    }

    #[test]
    fn problems_are_classified() {
        let p: instant_acme::Problem = serde_json::from_str(
            r#"{"type":"urn:ietf:params:acme:error:rateLimited","detail":"slow down","status":429}"#,
        )
        .expect("problem");
        assert!(matches!(
            AcmeError::from_problem(&p, None).disposition(),
            Disposition::RateLimited { .. }
        ));
        let p: instant_acme::Problem = serde_json::from_str(
            r#"{"type":"urn:ietf:params:acme:error:unauthorized","detail":"no","status":403}"#,
        )
        .expect("problem");
        let e = AcmeError::from_problem(&p, None);
        assert_eq!(e.disposition(), Disposition::Final);
        assert_eq!(e.to_string(), "the CA answered: unauthorized: no");
    }

    /// Boulder's own words (ratelimits/limiter.go, wfe2/wfe.go), as its
    /// WFE sends them: "<context> :: <limit>".
    #[test]
    fn boulder_rate_limits_are_scoped() {
        let classify = |detail: &str, status: u16| {
            let p: instant_acme::Problem = serde_json::from_value(serde_json::json!({
                "type": "urn:ietf:params:acme:error:rateLimited",
                "detail": detail,
                "status": status,
            }))
            .expect("problem");
            AcmeError::from_problem(&p, parse_retry_after("3600"))
                .rate_limit()
                .expect("a rate limit")
        };
        let names = |v: &[&str]| LimitScope::Names(v.iter().map(|s| s.to_string()).collect());
        let orders = classify(
            "Error creating new order :: too many new orders (300) from this account in the last 3h0m0s, retry after 2026-11-29 21:00:00 UTC",
            429,
        );
        assert_eq!(orders.scope, LimitScope::Account);
        assert!(!orders.paused);
        let registrations = classify(
            "Error creating new account :: too many new registrations (10) from this IP address in the last 3h0m0s, retry after 2026-11-29 21:00:00 UTC",
            429,
        );
        assert_eq!(registrations.scope, LimitScope::Account);
        let set = classify(
            "Error creating new order :: too many certificates (5) already issued for this exact set of identifiers in the last 168h0m0s, retry after 2026-11-30 12:00:00 UTC",
            429,
        );
        assert_eq!(set.scope, names(&[]));
        let domain = classify(
            "Error creating new order :: too many certificates (50) already issued for \"example.org\" in the last 168h0m0s, retry after 2026-11-30 12:00:00 UTC",
            429,
        );
        assert_eq!(domain.scope, LimitScope::Domain("example.org".into()));
        let failed = classify(
            "Error creating new order :: too many failed authorizations (5) for \"www.example.org\" in the last 1h0m0s, retry after 2026-11-29 19:00:00 UTC",
            429,
        );
        assert_eq!(failed.scope, names(&["www.example.org"]));
        let paused = classify(
            "Your account is temporarily prevented from requesting certificates for a.example.org, b.example.org and possibly others. Please visit: https://portal.letsencrypt.org/sfe/v1/unpause?jwt=eyJ.abc.def",
            429,
        );
        assert!(paused.paused);
        assert_eq!(paused.scope, names(&["a.example.org", "b.example.org"]));
        assert_eq!(
            paused.unpause_url.as_deref(),
            Some("https://portal.letsencrypt.org/sfe/v1/unpause?jwt=eyJ.abc.def")
        );
        // Words certd does not know: the refused order's names, not the account.
        assert_eq!(classify("slow down", 429).scope, names(&[]));
        // A load balancer's 503 with Retry-After holds back every order.
        let p: instant_acme::Problem = serde_json::from_value(serde_json::json!({
            "type": "urn:certd:error:httpError", "detail": "HTTP 503", "status": 503,
        }))
        .expect("problem");
        let e = AcmeError::from_problem(&p, parse_retry_after("60"));
        assert_eq!(e.rate_limit().map(|l| l.scope), Some(LimitScope::Account));
        // Subproblems name the identifiers where the CA sends them.
        let p: instant_acme::Problem = serde_json::from_value(serde_json::json!({
            "type": "urn:ietf:params:acme:error:rateLimited",
            "detail": "too many certificates (50) already issued for \"example.org\"",
            "status": 429,
            "subproblems": [{"type": "urn:ietf:params:acme:error:rateLimited",
                "identifier": {"type": "dns", "value": "x.example.org"}, "detail": "limit"}],
        }))
        .expect("problem");
        let e = AcmeError::from_problem(&p, None);
        assert_eq!(
            e.rate_limit().map(|l| l.scope),
            Some(names(&["x.example.org"]))
        );
    }

    #[test]
    fn a_scope_touches_the_names_it_holds_back() {
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let domain = LimitScope::Domain("example.org".into());
        assert!(domain.touches(&v(&["www.example.org"])));
        assert!(domain.touches(&v(&["*.example.org"])));
        assert!(domain.touches(&v(&["example.org"])));
        assert!(!domain.touches(&v(&["badexample.org", "example.net"])));
        let names = LimitScope::Names(v(&["a.example"]));
        assert!(names.touches(&v(&["b.example", "a.example"])));
        assert!(!names.touches(&v(&["b.example"])));
        assert!(!LimitScope::Names(Vec::new()).touches(&v(&["a.example"])));
        assert!(LimitScope::Account.touches(&v(&["a.example"])));
    }

    /// instant-acme's problem has no `Retry-After`: the answer's header
    /// reaches the error through the task's scope.
    #[tokio::test]
    async fn a_problem_keeps_its_answer_s_retry_after() {
        let http = AcmeHttp::new(None).expect("client");
        let at = http
            .nonce_scope(async {
                LAST_RETRY_AFTER.with(|slot| slot.set(parse_retry_after("3600")));
                let p: instant_acme::Problem = serde_json::from_str(
                    r#"{"type":"urn:ietf:params:acme:error:rateLimited","status":429}"#,
                )
                .expect("problem");
                AcmeError::from(instant_acme::Error::Api(p)).disposition()
            })
            .await;
        let Disposition::RateLimited { until: Some(until) } = at else {
            panic!("{at:?}");
        };
        assert!(until > SystemTime::now() + Duration::from_secs(3500));
        // Outside any scope there is nothing to read.
        assert_eq!(last_retry_after(), None);
    }

    #[tokio::test]
    async fn only_a_scope_s_last_nonce_is_pooled() {
        let http = AcmeHttp::new(None).expect("client");
        http.nonce_scope(async {
            for n in ["a", "b"] {
                LAST_NONCE.with(|slot| slot.replace(Some(n.to_owned())));
            }
        })
        .await;
        // Outside any scope a response's nonce is not kept.
        let _ = LAST_NONCE.try_with(|slot| slot.replace(Some("c".to_owned())));
        assert_eq!(http.inner.take_nonce().as_deref(), Some("b"));
        assert_eq!(http.inner.take_nonce(), None);
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
                let http = AcmeHttp::new(None).expect("client");
                let mut headers = HeaderMap::new();
                if let Ok(v) = http::HeaderValue::from_str(&header) {
                    headers.insert(LINK, v.clone());
                    headers.insert(RETRY_AFTER, v);
                }
                headers.insert(CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                http.inner.observe("https://ca/x", StatusCode::OK, &headers, &Bytes::from(body.clone()));
                http.inner.remember_created_order(&headers, &Bytes::from(body.clone()));
                let _ = serde_json::from_slice::<raw::AuthzObject>(&body);
                let _ = serde_json::from_slice::<ProblemRecord>(&body);
                let _ = parse_retry_after(&header);
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
                let http = AcmeHttp::new(None).expect("client");
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
                let _ = parse_retry_after(&values[5]);
                if sanitize_headers(&mut headers).is_ok() {
                    if let Some(v) = headers.get(RETRY_AFTER) {
                        let secs: u64 = v.to_str().expect("ascii").parse().expect("delay-seconds");
                        prop_assert!((1..=RETRY_AFTER_MAX.as_secs()).contains(&secs));
                    }
                    for v in headers.values() {
                        prop_assert!(v.len() <= MAX_HEADER_LEN);
                    }
                    http.inner.observe("https://ca/x", StatusCode::OK, &headers, &Bytes::new());
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
                let http = AcmeHttp::new(None).expect("client");
                let mut headers = HeaderMap::new();
                headers.insert(CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                let bytes = Bytes::from(body.to_string());
                http.inner.observe("https://ca/x", StatusCode::OK, &headers, &bytes);
                let _ = serde_json::from_slice::<raw::AuthzObject>(&bytes).map(|a| a.identifier());
            }
        }
    }
}
