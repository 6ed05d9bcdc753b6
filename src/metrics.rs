//! Prometheus text-format metrics for `certd run` (`[metrics] listen`).
//!
//! Everything is read at scrape time from the ledger and the HTTP layer's
//! counters, so the numbers are those `certd status` shows.

use std::fmt::Write as _;
use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acme::AcmeHttp;
use crate::clock::UnixTime;
use crate::ledger::{Ledger, LedgerError};
use crate::tinyhttp::{self, Response};

/// Serves `GET /metrics` on `addr` until `cancel` fires.
pub async fn start(
    addr: SocketAddr,
    store: Ledger,
    http: AcmeHttp,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> std::io::Result<SocketAddr> {
    let (listener, local) = tinyhttp::bind(addr).await?;
    tinyhttp::serve(listener, tracker, cancel, move |req| {
        let (store, http) = (store.clone(), http.clone());
        async move {
            if req.target != "/metrics" {
                return Response::text(404, "");
            }
            match render(&store, &http).await {
                Ok(body) => Response {
                    code: 200,
                    content_type: "text/plain; version=0.0.4",
                    body,
                },
                Err(e) => Response::text(500, e.to_string()),
            }
        }
    });
    tracing::info!(addr = %local, "metrics listening");
    Ok(local)
}

/// A label value, escaped as the text format requires.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The metrics page.
pub async fn render(store: &Ledger, http: &AcmeHttp) -> Result<String, LedgerError> {
    let mut out = String::new();
    let certs = store.certificates().await?;
    header(
        &mut out,
        "certd_certificate_expiry_timestamp_seconds",
        "gauge",
        "notAfter of the installed certificate.",
    );
    for c in certs.iter().filter(|c| c.not_after.is_some()) {
        let _ = writeln!(
            out,
            "certd_certificate_expiry_timestamp_seconds{{name=\"{}\"}} {}",
            label(&c.name),
            c.not_after.unwrap_or_default()
        );
    }
    header(
        &mut out,
        "certd_certificate_last_success_timestamp_seconds",
        "gauge",
        "When the installed certificate was installed.",
    );
    for c in certs.iter().filter(|c| c.installed_at.is_some()) {
        let _ = writeln!(
            out,
            "certd_certificate_last_success_timestamp_seconds{{name=\"{}\"}} {}",
            label(&c.name),
            c.installed_at.unwrap_or_default()
        );
    }
    header(
        &mut out,
        "certd_certificate_consecutive_failures",
        "gauge",
        "Failed renewal attempts since the last success.",
    );
    for c in &certs {
        let _ = writeln!(
            out,
            "certd_certificate_consecutive_failures{{name=\"{}\"}} {}",
            label(&c.name),
            c.consecutive_failures
        );
    }
    header(
        &mut out,
        "certd_pending_authorizations",
        "gauge",
        "Authorizations the ledger holds as pending, per account.",
    );
    let mut reaped = String::new();
    let now = UnixTime::now().secs();
    for (id, _, url) in store.accounts().await? {
        let r = store.reaper_summary(id, now).await?;
        let _ = writeln!(
            out,
            "certd_pending_authorizations{{account=\"{}\"}} {}",
            label(&url),
            r.pending
        );
        let _ = writeln!(
            reaped,
            "certd_reaper_deactivations_total{{account=\"{}\"}} {}",
            label(&url),
            r.deactivated_total
        );
    }
    header(
        &mut out,
        "certd_reaper_deactivations_total",
        "counter",
        "Authorizations the reaper deactivated.",
    );
    out.push_str(&reaped);
    header(
        &mut out,
        "certd_acme_requests_total",
        "counter",
        "ACME requests by endpoint and outcome (HTTP status) since start.",
    );
    for ((endpoint, outcome), n) in http.request_counts() {
        let _ = writeln!(
            out,
            "certd_acme_requests_total{{endpoint=\"{endpoint}\",outcome=\"{}\"}} {n}",
            label(&outcome)
        );
    }
    Ok(out)
}
