//! Prometheus text-format metrics for `certd run` (`[metrics] listen`).
//!
//! Everything is read at scrape time from the ledger and the HTTP layer's
//! counters, so the numbers are those `certd status` shows; besides them,
//! the daemon's own count of ledger writes that failed, and in fleet mode
//! its leases ([`LeaseCounters`]).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acme::AcmeHttp;
use crate::clock::Clock;
use crate::ledger::{Ledger, LedgerError};
use crate::tinyhttp::{self, Response};

/// What the metrics are read from.
#[derive(Clone)]
pub(crate) struct Sources {
    pub(crate) store: Ledger,
    pub(crate) http: AcmeHttp,
    pub(crate) clock: Clock,
    pub(crate) ledger_errors: LedgerWriteErrors,
    pub(crate) leases: LeaseCounters,
}

/// Ledger writes that failed (a full disk, an I/O error): each is logged
/// where it happens, and counted here, since a daemon that goes on
/// running must not lose them silently. Cheap to clone; clones count
/// together.
#[derive(Debug, Clone, Default)]
pub(crate) struct LedgerWriteErrors(Arc<AtomicU64>);

impl LedgerWriteErrors {
    /// Logs and counts `result`'s error, naming `what` was written;
    /// returns `result`.
    pub(crate) fn note<E: std::fmt::Display>(
        &self,
        what: &'static str,
        result: Result<(), E>,
    ) -> Result<(), E> {
        if let Err(e) = &result {
            self.0.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, write = what, "cannot write the ledger");
        }
        result
    }

    pub(crate) fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Fleet mode's leases as this host saw them: held now, lost (by
/// reason), writes the fence refused, and takeovers (claims of a lease
/// another holder had before). Cheap to clone; clones count together.
/// Without `[fleet]` they stay zero and are not shown.
#[derive(Debug, Clone, Default)]
pub(crate) struct LeaseCounters(Arc<LeaseCounts>);

#[derive(Debug, Default)]
struct LeaseCounts {
    held: AtomicI64,
    lost_fenced: AtomicU64,
    lost_deadline: AtomicU64,
    fenced_writes: AtomicU64,
    takeovers: AtomicU64,
    /// Whether this host is in a fleet: the page then shows them.
    fleet: std::sync::atomic::AtomicBool,
}

/// Why a held lease was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseLoss {
    /// The database refused a renewal: the lease expired or was taken.
    Fenced,
    /// The local deadline passed before a renewal got through.
    Deadline,
}

/// One lease counted as held until dropped.
#[derive(Debug)]
pub(crate) struct HeldLease(LeaseCounters);

impl LeaseCounters {
    /// Counts a lease as held until the guard is dropped.
    pub(crate) fn held(&self) -> HeldLease {
        self.0.fleet.store(true, Ordering::Relaxed);
        self.0.held.fetch_add(1, Ordering::Relaxed);
        HeldLease(self.clone())
    }

    pub(crate) fn lost(&self, why: LeaseLoss) {
        let counter = match why {
            LeaseLoss::Fenced => &self.0.lost_fenced,
            LeaseLoss::Deadline => &self.0.lost_deadline,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn fenced_write(&self) {
        self.0.fenced_writes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn takeover(&self) {
        self.0.takeovers.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn render(&self, out: &mut String) {
        let c = &*self.0;
        if !c.fleet.load(Ordering::Relaxed) {
            return;
        }
        header(
            out,
            "certd_fleet_leases_held",
            "gauge",
            "Leases this host holds now.",
        );
        let _ = writeln!(
            out,
            "certd_fleet_leases_held {}",
            c.held.load(Ordering::Relaxed)
        );
        header(
            out,
            "certd_fleet_lease_losses_total",
            "counter",
            "Leases lost while held, by reason: fenced (the database refused a renewal), deadline (the local deadline passed first).",
        );
        for (reason, n) in [("fenced", &c.lost_fenced), ("deadline", &c.lost_deadline)] {
            let _ = writeln!(
                out,
                "certd_fleet_lease_losses_total{{reason=\"{reason}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        header(
            out,
            "certd_fleet_fenced_writes_total",
            "counter",
            "Ledger writes the fence refused: the lease was no longer this host's.",
        );
        let _ = writeln!(
            out,
            "certd_fleet_fenced_writes_total {}",
            c.fenced_writes.load(Ordering::Relaxed)
        );
        header(
            out,
            "certd_fleet_takeovers_total",
            "counter",
            "Leases this host claimed after another holder had them.",
        );
        let _ = writeln!(
            out,
            "certd_fleet_takeovers_total {}",
            c.takeovers.load(Ordering::Relaxed)
        );
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        self.0.0.held.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `GET /metrics` on `listener` until `cancel` fires.
pub(crate) fn start(
    listener: tokio::net::TcpListener,
    sources: Sources,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> std::io::Result<SocketAddr> {
    let local = listener.local_addr()?;
    tinyhttp::serve(listener, tracker, cancel, move |req| {
        let sources = sources.clone();
        async move {
            if req.target != "/metrics" {
                return Response::text(404, "");
            }
            match render(&sources).await {
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
pub(crate) async fn render(sources: &Sources) -> Result<String, LedgerError> {
    let Sources {
        store,
        http,
        clock,
        ledger_errors,
        leases,
    } = sources;
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
    let now = clock.now().secs();
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
    header(
        &mut out,
        "certd_ledger_write_errors_total",
        "counter",
        "Ledger writes that failed since start (each is logged).",
    );
    let _ = writeln!(
        out,
        "certd_ledger_write_errors_total {}",
        ledger_errors.count()
    );
    leases.render(&mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::UnixTime;

    #[tokio::test]
    async fn the_page_counts_failed_ledger_writes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Ledger::open(&dir.path().join("certd.db"), crate::clock::Clock::system())
            .await
            .expect("ledger");
        let ledger_errors = LedgerWriteErrors::default();
        let failed: Result<(), &str> = Err("disk I/O error");
        assert!(ledger_errors.note("test write", failed).is_err());
        assert!(
            ledger_errors
                .clone()
                .note("test write", Err("again"))
                .is_err()
        );
        assert!(ledger_errors.note("test write", Ok::<(), &str>(())).is_ok());
        let sources = Sources {
            store: store.clone(),
            http: AcmeHttp::new(None, crate::clock::Clock::system()).expect("HTTP client"),
            clock: Clock::fixed(UnixTime::from_secs(1_000_000)),
            ledger_errors,
            leases: LeaseCounters::default(),
        };
        let page = render(&sources).await.expect("render");
        assert!(
            page.contains("# TYPE certd_ledger_write_errors_total counter\ncertd_ledger_write_errors_total 2\n"),
            "{page}"
        );
        assert!(
            !page.contains("certd_fleet_"),
            "no fleet, no lease metrics: {page}"
        );
        store.close().await;
    }

    #[test]
    fn lease_counters_count_what_is_held_and_lost() {
        let leases = LeaseCounters::default();
        let held = leases.held();
        let other = leases.clone().held();
        drop(other);
        leases.lost(LeaseLoss::Deadline);
        leases.fenced_write();
        leases.takeover();
        leases.takeover();
        let mut page = String::new();
        leases.render(&mut page);
        for line in [
            "certd_fleet_leases_held 1\n",
            "certd_fleet_lease_losses_total{reason=\"fenced\"} 0\n",
            "certd_fleet_lease_losses_total{reason=\"deadline\"} 1\n",
            "certd_fleet_fenced_writes_total 1\n",
            "certd_fleet_takeovers_total 2\n",
        ] {
            assert!(page.contains(line), "{line} in {page}");
        }
        drop(held);
        page.clear();
        leases.render(&mut page);
        assert!(page.contains("certd_fleet_leases_held 0\n"), "{page}");
    }
}
