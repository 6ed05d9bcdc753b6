//! What a CA's errors mean: its problem documents as certd keeps them
//! (bounded), what the caller does next (`Disposition`), which orders a
//! rate limit holds back (`RateLimit`), and error text for people.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::http::{GateClosed, RequestFailed, https_url};
use super::nonce::last_retry_after;
use super::trust;

/// A problem's `detail` (and any text from the CA kept in the ledger, the
/// log or the notify command's environment) is cut to this many bytes.
pub const MAX_DETAIL: usize = 1024;
/// At most this many subproblems are kept.
const MAX_SUBPROBLEMS: usize = 32;

/// Errors that stop certd from talking to the CA at all.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot read the CA bundle {path}: {detail}")]
    CaBundle { path: PathBuf, detail: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("account credentials {path}: {detail}")]
    Credentials { path: PathBuf, detail: String },
    /// Fleet mode's one account per CA: its sealed key in the fleet's
    /// database, or the lease under which one host creates it.
    #[error("the fleet's ACME account at {directory}: {detail}")]
    Fleet { directory: String, detail: String },
    /// The CA's words alone: "ACME account: …" put a wrapper before the
    /// cause.
    #[error("{0}")]
    Acme(#[from] AcmeError),
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
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
fn bounded_field(text: Option<&String>) -> Option<String> {
    text.map(String::as_str)
        .map(|t| bounded(t, MAX_DETAIL).into_owned())
}

/// Deserializes a text field of a problem cut to `MAX_DETAIL`, for problem
/// documents read straight from a body.
fn deserialize_bounded<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(bounded_field(Option::<String>::deserialize(d)?.as_ref()))
}

impl ProblemRecord {
    /// The CA's problem, with its text bounded (`MAX_DETAIL` per field,
    /// `MAX_SUBPROBLEMS` subproblems) before it reaches the ledger, the
    /// log or the notify command.
    pub fn from_problem(p: &instant_acme::Problem) -> Self {
        Self {
            kind: bounded_field(p.r#type.as_ref()),
            detail: bounded_field(p.detail.as_ref()),
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
                    kind: bounded_field(s.r#type.as_ref()),
                    detail: bounded_field(s.detail.as_ref()),
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
                s.kind.as_deref().map_or("", |t| t
                    .strip_prefix("urn:ietf:params:acme:error:")
                    .unwrap_or(t)),
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
    pub fn rate_limited(until: Option<SystemTime>, now: SystemTime) -> Self {
        let floor = now.checked_add(RATE_LIMIT_MIN_PAUSE);
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
    /// The run's [`RequestGate`](super::http::RequestGate) refused the
    /// request: nothing was sent.
    #[error("not sent: {0}")]
    Gated(GateClosed),
}

impl AcmeError {
    pub fn disposition(&self) -> Disposition {
        match self {
            Self::Problem { disposition, .. } => *disposition,
            Self::Transport(_) | Self::Timeout(_) | Self::Gated(_) => Disposition::Retryable,
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
    /// The CA's problem, with the `Retry-After` of its answer and the time
    /// `now` that answer came.
    pub fn from_problem(
        p: &instant_acme::Problem,
        retry_after: Option<SystemTime>,
        now: SystemTime,
    ) -> Self {
        let problem = ProblemRecord::from_problem(p);
        let disposition = match problem.short_type() {
            "rateLimited" => Disposition::rate_limited(retry_after, now),
            "badNonce" | "serverInternal" => Disposition::Retryable,
            _ if p.status.is_some_and(|s| s == 429) => Disposition::rate_limited(retry_after, now),
            _ if p.status.is_some_and(|s| s >= 500) => match retry_after {
                Some(_) => Disposition::rate_limited(retry_after, now),
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
            instant_acme::Error::Api(p) => match last_retry_after() {
                Some((until, answered)) => Self::from_problem(&p, Some(until), answered),
                // Without a `Retry-After` no time is read: a pause has no
                // end to put a floor under.
                None => Self::from_problem(&p, None, SystemTime::UNIX_EPOCH),
            },
            instant_acme::Error::Other(inner) => match inner.downcast::<GateClosed>() {
                Ok(closed) => Self::Gated(*closed),
                Err(inner) => Self::Transport(transport_message(inner.as_ref())),
            },
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
        if let Some(r) = c.downcast_ref::<RequestFailed>() {
            url = url.or_else(|| Some(r.url.clone()));
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
    use crate::acme::http::parse_retry_after;

    #[test]
    fn a_rate_limit_of_zero_still_pauses() {
        let Disposition::RateLimited { until: Some(until) } =
            Disposition::rate_limited(parse_retry_after("0", SystemTime::now()), SystemTime::now())
        else {
            panic!("a rate limit with a time");
        };
        assert!(until >= SystemTime::now() + RATE_LIMIT_MIN_PAUSE - Duration::from_secs(5));
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
            AcmeError::from_problem(&p, None, SystemTime::now()).disposition(),
            Disposition::RateLimited { .. }
        ));
        let p: instant_acme::Problem = serde_json::from_str(
            r#"{"type":"urn:ietf:params:acme:error:unauthorized","detail":"no","status":403}"#,
        )
        .expect("problem");
        let e = AcmeError::from_problem(&p, None, SystemTime::now());
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
            AcmeError::from_problem(
                &p,
                parse_retry_after("3600", SystemTime::now()),
                SystemTime::now(),
            )
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
        let e = AcmeError::from_problem(
            &p,
            parse_retry_after("60", SystemTime::now()),
            SystemTime::now(),
        );
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
        let e = AcmeError::from_problem(&p, None, SystemTime::now());
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
}
