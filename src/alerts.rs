//! Telling an operator when renewals keep failing, and when they recover:
//! the `[notify] command`, run with the details in environment variables:
//! `CERTD_EVENT`, `CERTD_NAME`, `CERTD_DOMAINS`, `CERTD_FAILURES`, and
//! `CERTD_ERROR` or `CERTD_NOT_AFTER`, and `CERTD_EXPLANATION_URL` when the
//! CA's last ARI answer (RFC 9773) for the certificate gave one. Besides
//! these it sees only `PATH` and `LANG`, and runs in its own process group
//! (`install::run_program`).

use std::ffi::OsStr;

use crate::config::NotifyConfig;
use crate::install::run_command;
use crate::store::Store;

/// The most bytes of one value passed in the notify command's
/// environment; longer values are cut with a marker.
const MAX_ENV_VALUE: usize = 16 * 1024;

/// What happened to one certificate's renewal.
pub enum Outcome<'a> {
    /// The renewal failed; `failures` counts consecutive failures, this one
    /// included.
    Failed { failures: u32, error: &'a str },
    /// The renewal succeeded after `previous_failures` failures.
    Succeeded {
        previous_failures: u32,
        not_after: i64,
    },
}

/// Runs the notify command if `outcome` deserves it: from the
/// `after_failures`-th consecutive failure on, and on the first success
/// after such a run. Its result goes to the ledger and the log; it never
/// fails the renewal.
pub async fn after_renewal(
    cfg: Option<&NotifyConfig>,
    store: &Store,
    name: &str,
    domains: &[String],
    outcome: Outcome<'_>,
) {
    let Some(cfg) = cfg else { return };
    let domains = domains.join(",");
    let (event, failures, detail) = match outcome {
        // The error often quotes the CA: no control character of it
        // reaches the command (a mail header, a shell script's line).
        Outcome::Failed { failures, error } if failures >= cfg.after_failures => (
            "renewal-failed",
            failures,
            crate::cli::escape_control(error).into_owned(),
        ),
        Outcome::Succeeded {
            previous_failures,
            not_after,
        } if previous_failures >= cfg.after_failures => (
            "renewal-recovered",
            previous_failures,
            crate::clock::rfc3339(not_after),
        ),
        _ => return,
    };
    let failures = failures.to_string();
    // The error may quote the CA; one environment string over 128 KiB
    // (MAX_ARG_STRLEN) makes exec fail with E2BIG and the alert is lost.
    let detail = crate::acme::bounded(&detail, MAX_ENV_VALUE);
    let domains = crate::acme::bounded(&domains, MAX_ENV_VALUE);
    let detail_key = if event == "renewal-failed" {
        "CERTD_ERROR"
    } else {
        "CERTD_NOT_AFTER"
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
    if let Some(url) = &explanation {
        env.push(("CERTD_EXPLANATION_URL", url.as_ref()));
    }
    let result = run_command(&cfg.command, &env, cfg.timeout).await;
    let kind = if result.ok {
        "notified"
    } else {
        "notify-failed"
    };
    if !result.ok {
        tracing::warn!(cert = name, detail = %result.detail, "notify command failed");
    }
    let _ = store
        .event(
            kind,
            Some(name),
            None,
            None,
            Some(&format!("{event}: {}", result.detail)),
        )
        .await;
}
