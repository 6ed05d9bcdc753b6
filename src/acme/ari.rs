//! ACME Renewal Information (RFC 9773): certd's own `renewalInfo` request.
//!
//! instant-acme 0.8.5 looks for `Retry-After` before it looks at the
//! status code, so a CA's 404 surfaced as "missing Retry-After header",
//! and a 200 without `Retry-After` lost a valid window. Here the status
//! comes first, and a missing or invalid `Retry-After` only means "ask
//! again after the default interval" (§4.3.3 does not count it as an
//! error).
//!
//! Errors are sorted as §4.3.3 sorts them: a 5xx answer is temporary (back
//! off and ask again soon); anything else that is not a window (another
//! status, a body that is not a window, a window that ends before it
//! starts, no connection) is long-term: ask again in [`LONG_TERM_RETRY`].
//! Neither turns ARI off for the certificate.
//!
//! `renewalInfo` is an unauthenticated GET, so the one-shot `certd renew`
//! can ask before it loads an account.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use http::StatusCode;
use http::header::RETRY_AFTER;
use serde::Deserialize;

use super::{AcmeHttp, MAX_JSON_BODY, parse_retry_after};

/// How long to wait after a long-term error (RFC 9773 §4.3.3).
pub const LONG_TERM_RETRY: Duration = Duration::from_secs(6 * 3600);

/// A window the CA suggests for renewing one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Unix seconds; `start < end`.
    pub start: i64,
    pub end: i64,
    /// The CA's page explaining why the window is where it is.
    pub explanation_url: Option<String>,
}

/// A `renewalInfo` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub window: Window,
    /// The CA's `Retry-After`, if it sent a valid one.
    pub retry_after: Option<Duration>,
}

/// Why no window came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AriError {
    /// The CA's directory has no `renewalInfo`, or the certificate has no
    /// Authority Key Identifier to name it by.
    Unsupported,
    /// A 5xx answer: ask again after a backoff (or its `Retry-After`).
    Temporary {
        detail: String,
        retry_after: Option<Duration>,
    },
    /// Anything else: ask again in [`LONG_TERM_RETRY`].
    LongTerm(String),
}

impl fmt::Display for AriError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unsupported => f.write_str("the CA offers no renewalInfo for this certificate"),
            Self::Temporary { detail, .. } => write!(f, "temporary ARI error: {detail}"),
            Self::LongTerm(detail) => write!(f, "ARI error: {detail}"),
        }
    }
}

impl std::error::Error for AriError {}

/// The `renewalInfo` URL of each directory seen, so a re-check costs one
/// GET. Process-wide: the daemon and `certd renew` each talk to one CA,
/// and the URL does not change while the directory URL stays the same.
static RENEWAL_INFO_URLS: Mutex<Option<HashMap<String, Option<String>>>> = Mutex::new(None);

/// Asks the CA behind `directory_url` for the window of the certificate
/// `cert_id` (RFC 9773 §4.1 `base64url(AKI) "." base64url(serial)`).
pub async fn renewal_info(
    http: &AcmeHttp,
    directory_url: &str,
    cert_id: Option<&str>,
) -> Result<Answer, AriError> {
    let client = http.plain();
    let cert_id = cert_id.ok_or(AriError::Unsupported)?;
    let base = renewal_info_url(client, directory_url)
        .await?
        .ok_or(AriError::Unsupported)?;
    let url = format!("{}/{cert_id}", base.trim_end_matches('/'));
    let response = client
        .get(&url)
        .send()
        .await
        .map_err(|e| AriError::LongTerm(format!("GET {url}: {}", super::error_chain(&e))))?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let now = http.clock().system_time();
            parse_retry_after(v, now).map(|at| at.duration_since(now).unwrap_or_default())
        });
    let body = read_body(response).await;
    interpret(status, retry_after, &body)
}

/// What an answer means, status first.
fn interpret(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<Answer, AriError> {
    let excerpt = || problem_summary(body);
    if status.is_server_error() {
        return Err(AriError::Temporary {
            detail: format!("the CA answered {status}: {}", excerpt()),
            retry_after,
        });
    }
    if status != StatusCode::OK {
        return Err(AriError::LongTerm(format!(
            "the CA answered {status}: {}",
            excerpt()
        )));
    }
    let window = parse_window(body).map_err(|e| {
        AriError::LongTerm(format!(
            "the CA's renewalInfo is not a valid window ({e}): {}",
            excerpt()
        ))
    })?;
    Ok(Answer {
        window,
        retry_after,
    })
}

/// A problem document as `type: detail`, other bodies as their start: one
/// readable line for `status` and the log.
fn problem_summary(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Problem {
        #[serde(rename = "type")]
        kind: Option<String>,
        detail: Option<String>,
    }
    let text = match serde_json::from_slice::<Problem>(body) {
        Ok(Problem {
            kind: Some(kind),
            detail,
        }) => {
            let kind = kind
                .strip_prefix("urn:ietf:params:acme:error:")
                .unwrap_or(&kind);
            format!("{kind}: {}", detail.unwrap_or_default().trim())
        }
        _ => String::from_utf8_lossy(body).trim().to_owned(),
    };
    super::bounded(&text, 200).into_owned()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawInfo {
    suggested_window: RawWindow,
    #[serde(rename = "explanationURL")]
    explanation_url: Option<String>,
}

#[derive(Deserialize)]
struct RawWindow {
    start: String,
    end: String,
}

fn parse_window(body: &[u8]) -> Result<Window, String> {
    let raw: RawInfo = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let instant = |field: &str, v: &str| {
        time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
            .map(|t| t.unix_timestamp())
            .map_err(|e| format!("{field} {v:?}: {e}"))
    };
    let start = instant("start", &raw.suggested_window.start)?;
    let end = instant("end", &raw.suggested_window.end)?;
    if end <= start {
        return Err(format!(
            "the window ends ({}) at or before it starts ({})",
            raw.suggested_window.end, raw.suggested_window.start
        ));
    }
    // Shown to operators and passed to their notify command: an https
    // URL of sane length, or nothing.
    let explanation_url = raw.explanation_url.filter(|u| {
        u.len() <= 2048
            && reqwest::Url::parse(u).is_ok_and(|p| matches!(p.scheme(), "https" | "http"))
            && !u.chars().any(char::is_control)
    });
    Ok(Window {
        start,
        end,
        explanation_url,
    })
}

/// The directory's `renewalInfo` URL, fetched once per directory. A
/// directory that cannot be read is a long-term error (asked again then),
/// not a directory without ARI.
async fn renewal_info_url(
    client: &reqwest::Client,
    directory_url: &str,
) -> Result<Option<String>, AriError> {
    if let Some(known) = cached(directory_url) {
        return Ok(known);
    }
    let failed =
        |detail: String| AriError::LongTerm(format!("directory {directory_url}: {detail}"));
    let response = client
        .get(directory_url)
        .send()
        .await
        .map_err(|e| failed(super::error_chain(&e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(failed(format!("the CA answered {status}")));
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Directory {
        renewal_info: Option<String>,
    }
    let body = read_body(response).await;
    let dir: Directory = serde_json::from_slice(&body).map_err(|e| failed(e.to_string()))?;
    let mut cache = RENEWAL_INFO_URLS.lock().unwrap_or_else(|p| p.into_inner());
    cache
        .get_or_insert_with(HashMap::new)
        .insert(directory_url.to_owned(), dir.renewal_info.clone());
    Ok(dir.renewal_info)
}

fn cached(directory_url: &str) -> Option<Option<String>> {
    let cache = RENEWAL_INFO_URLS.lock().unwrap_or_else(|p| p.into_inner());
    cache.as_ref()?.get(directory_url).cloned()
}

/// At most `MAX_JSON_BODY` bytes of the body; a body cut short by the
/// connection reads as what arrived (and then fails to parse).
async fn read_body(mut response: reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = MAX_JSON_BODY.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if room <= chunk.len() {
            break;
        }
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: &str = r#"{"suggestedWindow":{"start":"2026-01-01T00:00:00Z","end":"2026-01-02T00:00:00Z"},"explanationURL":"https://ca.example/why"}"#;

    #[test]
    fn status_comes_before_retry_after() {
        // A 404 without Retry-After is the CA not knowing the certificate.
        let e = interpret(StatusCode::NOT_FOUND, None, b"{}").unwrap_err();
        assert!(
            matches!(&e, AriError::LongTerm(d) if d.contains("404")),
            "{e}"
        );
        // A 200 without Retry-After keeps its window.
        let a = interpret(StatusCode::OK, None, WINDOW.as_bytes()).expect("a window");
        assert_eq!(a.retry_after, None);
        assert_eq!(a.window.start, 1_767_225_600);
        assert_eq!(a.window.end, 1_767_312_000);
        assert_eq!(
            a.window.explanation_url.as_deref(),
            Some("https://ca.example/why")
        );
    }

    #[test]
    fn errors_are_sorted_as_the_rfc_sorts_them() {
        let e = interpret(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(Duration::from_secs(60)),
            b"",
        )
        .unwrap_err();
        assert_eq!(
            e,
            AriError::Temporary {
                detail: "the CA answered 503 Service Unavailable: ".into(),
                retry_after: Some(Duration::from_secs(60)),
            }
        );
        for body in [
            &b"garbage"[..],
            br#"{"suggestedWindow":{"start":"2026-01-02T00:00:00Z","end":"2026-01-01T00:00:00Z"}}"#,
            br#"{"suggestedWindow":{"start":"2026-01-01T00:00:00Z","end":"2026-01-01T00:00:00Z"}}"#,
            br#"{"suggestedWindow":{"start":"yesterday","end":"2026-01-01T00:00:00Z"}}"#,
        ] {
            let e = interpret(StatusCode::OK, None, body).unwrap_err();
            assert!(matches!(e, AriError::LongTerm(_)), "{e}");
        }
        let e = interpret(StatusCode::TOO_MANY_REQUESTS, None, b"").unwrap_err();
        assert!(matches!(e, AriError::LongTerm(_)), "{e}");
    }

    #[test]
    fn an_explanation_url_must_be_a_url() {
        let body = WINDOW.replace("https://ca.example/why", "javascript:alert(1)");
        let a = interpret(StatusCode::OK, None, body.as_bytes()).expect("a window");
        assert_eq!(a.window.explanation_url, None);
    }
}
