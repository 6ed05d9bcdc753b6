//! Telling an operator when renewals keep failing, and when they recover:
//! the `[notify] command`, run with the details in environment variables:
//! `CERTD_EVENT`, `CERTD_NAME`, `CERTD_DOMAINS`, `CERTD_FAILURES`, and
//! `CERTD_ERROR` or `CERTD_NOT_AFTER`, for a pause `CERTD_UNPAUSE_URL`, and
//! `CERTD_EXPLANATION_URL` when the CA's last ARI answer (RFC 9773) for the
//! certificate gave one. Besides these it sees only `PATH` and `LANG`, and
//! runs in its own process group (`process::run_program`).

use std::ffi::OsStr;

use crate::config::NotifyConfig;
use crate::install::run_command;
use crate::ledger::{EventKind, Ledger, LedgerError};

/// The most bytes of one value passed in the notify command's
/// environment; longer values are cut with a marker.
const MAX_ENV_VALUE: usize = 16 * 1024;

/// What happened to one certificate's renewal.
pub(crate) enum Outcome<'a> {
    /// The renewal failed; `failures` counts consecutive failures, this one
    /// included.
    Failed { failures: u32, error: &'a str },
    /// The renewal succeeded after `previous_failures` failures.
    Succeeded {
        previous_failures: u32,
        not_after: i64,
    },
    /// The CA paused the certificate's names until an operator unpauses
    /// them. The caller reports a pause once (`Ledger::set_pause` says
    /// whether it is news), not at every daily retry.
    Paused {
        failures: u32,
        error: &'a str,
        unpause_url: Option<&'a str>,
    },
}

/// What a failed renewal tells the notify command: a pause once, when it
/// is `news`, and nothing at the retries while it lasts (an operator acts
/// on it, once); any other failure as `Failed`.
pub(crate) fn failure_outcome<'a>(
    failures: u32,
    error: &'a str,
    limit: Option<&'a crate::acme::RateLimit>,
    news: bool,
) -> Option<Outcome<'a>> {
    match limit {
        Some(l) if l.paused => news.then_some(Outcome::Paused {
            failures,
            error,
            unpause_url: l.unpause_url.as_deref(),
        }),
        _ => Some(Outcome::Failed { failures, error }),
    }
}

/// Runs the notify command if `outcome` deserves it: from the
/// `after_failures`-th consecutive failure on, and on the first success
/// after such a run, and at once when the CA pauses the names. Its result goes to the ledger and the log; it never
/// fails the renewal. The ledger's error, if recording the result failed,
/// is the caller's to log and count.
pub(crate) async fn after_renewal(
    cfg: Option<&NotifyConfig>,
    store: &Ledger,
    name: &str,
    domains: &[String],
    outcome: Outcome<'_>,
) -> Result<(), LedgerError> {
    let Some(cfg) = cfg else { return Ok(()) };
    let domains = domains.join(",");
    let mut unpause_url = None;
    let (event, failures, detail) = match outcome {
        // The error often quotes the CA: no control character of it
        // reaches the command (a mail header, a shell script's line).
        Outcome::Failed { failures, error } if failures >= cfg.after_failures => (
            "renewal-failed",
            failures,
            crate::text::escape_control(error).into_owned(),
        ),
        Outcome::Succeeded {
            previous_failures,
            not_after,
        } if previous_failures >= cfg.after_failures => (
            "renewal-recovered",
            previous_failures,
            crate::clock::rfc3339(not_after),
        ),
        Outcome::Paused {
            failures,
            error,
            unpause_url: url,
        } => {
            unpause_url = url.map(|u| crate::text::escape_control(u).into_owned());
            (
                "renewal-paused",
                failures,
                crate::text::escape_control(error).into_owned(),
            )
        }
        _ => return Ok(()),
    };
    let failures = failures.to_string();
    // The error may quote the CA; one environment string over 128 KiB
    // (MAX_ARG_STRLEN) makes exec fail with E2BIG and the alert is lost.
    let detail = crate::acme::bounded(&detail, MAX_ENV_VALUE);
    let domains = crate::acme::bounded(&domains, MAX_ENV_VALUE);
    let detail_key = if event == "renewal-recovered" {
        "CERTD_NOT_AFTER"
    } else {
        "CERTD_ERROR"
    };
    // The window that made certd renew: recorded at the last ARI check,
    // which a renewal's success has not replaced yet.
    let explanation = store
        .certificate(name)
        .await
        .ok()
        .flatten()
        .and_then(|r| r.ari_explanation_url);
    let mut env: Vec<(&str, &OsStr)> = vec![
        ("CERTD_EVENT", event.as_ref()),
        ("CERTD_NAME", name.as_ref()),
        ("CERTD_DOMAINS", domains.as_ref().as_ref()),
        ("CERTD_FAILURES", failures.as_ref()),
        (detail_key, detail.as_ref().as_ref()),
    ];
    if let Some(url) = &unpause_url {
        env.push(("CERTD_UNPAUSE_URL", url.as_ref()));
    }
    if let Some(url) = &explanation {
        env.push(("CERTD_EXPLANATION_URL", url.as_ref()));
    }
    let result = run_command(&cfg.command, &env, cfg.timeout).await;
    let kind = if result.ok {
        EventKind::Notified
    } else {
        EventKind::NotifyFailed
    };
    if !result.ok {
        tracing::warn!(cert = name, detail = %result.detail, "notify command failed");
    }
    store
        .event(
            kind,
            Some(name),
            None,
            None,
            Some(&format!("{event}: {}", result.detail)),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acme::{LimitScope, RateLimit};

    #[test]
    fn a_pause_is_told_once_and_a_limit_like_any_failure() {
        let limit = |paused| RateLimit {
            scope: LimitScope::Names(Vec::new()),
            paused,
            unpause_url: paused.then(|| "https://ca/unpause".to_owned()),
        };
        let paused = limit(true);
        let Some(Outcome::Paused { unpause_url, .. }) =
            failure_outcome(1, "paused", Some(&paused), true)
        else {
            panic!("a new pause is told");
        };
        assert_eq!(unpause_url, Some("https://ca/unpause"));
        assert!(failure_outcome(2, "paused", Some(&paused), false).is_none());
        let limited = limit(false);
        assert!(matches!(
            failure_outcome(3, "limit", Some(&limited), false),
            Some(Outcome::Failed { failures: 3, .. })
        ));
        assert!(matches!(
            failure_outcome(1, "x", None, false),
            Some(Outcome::Failed { .. })
        ));
    }
}
