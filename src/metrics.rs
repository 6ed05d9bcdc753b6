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
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acme::AcmeHttp;
use crate::clock::Clock;
use crate::fleet::{FleetAnswers, FleetDb};
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
    /// Fleet mode: the shared database and this host's part in it.
    pub(crate) fleet: Option<FleetSources>,
}

/// What the fleet's metrics are read from.
#[derive(Clone)]
pub(crate) struct FleetSources {
    pub(crate) db: FleetDb,
    pub(crate) answers: Arc<FleetAnswers>,
    /// This host's id in the fleet.
    pub(crate) host_id: String,
    /// The certificates this host installs.
    pub(crate) certs: Vec<String>,
}

/// How long the fleet's database may take to answer a scrape's queries.
const FLEET_DB_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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
    /// Failovers (claims of a lease whose holder had let it run out):
    /// their count and the sum of their seconds, in milliseconds.
    failovers: AtomicU64,
    failover_ms: AtomicU64,
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

    /// A failover this host made: `after` from the previous holder's last
    /// renewal to this host's claim.
    pub(crate) fn failover(&self, after: Duration) {
        self.0.failovers.fetch_add(1, Ordering::Relaxed);
        let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        self.0.failover_ms.fetch_add(ms, Ordering::Relaxed);
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
        header(
            out,
            "certd_fleet_failover_seconds",
            "summary",
            "Leases this host took from a holder that had let them run out (died, hung, lost the database): seconds from that holder's last renewal to the claim.",
        );
        #[allow(clippy::cast_precision_loss)] // milliseconds: exact below 2^53
        let secs = c.failover_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        let _ = writeln!(out, "certd_fleet_failover_seconds_sum {secs:.3}");
        let _ = writeln!(
            out,
            "certd_fleet_failover_seconds_count {}",
            c.failovers.load(Ordering::Relaxed)
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

/// The metrics page. In fleet mode, with the fleet's database down, the
/// page still says so (the ledger lives there too, so its part is left
/// out rather than the whole page failing).
pub(crate) async fn render(sources: &Sources) -> Result<String, LedgerError> {
    let mut out = String::new();
    let db_up = match &sources.fleet {
        Some(fleet) => render_fleet(&mut out, fleet).await,
        None => true,
    };
    match render_ledger(&mut out, sources).await {
        Ok(()) => Ok(out),
        Err(e) if !db_up => {
            tracing::debug!(error = %e, "metrics: the ledger is unreadable with the fleet's database down");
            Ok(out)
        }
        Err(e) => Err(e),
    }
}

/// The fleet's part: whether its database answers, how far this host's
/// installs trail the newest issuances, and where this host's http-01
/// answers came from. Returns whether the database answered.
async fn render_fleet(out: &mut String, fleet: &FleetSources) -> bool {
    let up = matches!(
        tokio::time::timeout(FLEET_DB_TIMEOUT, fleet.db.ping()).await,
        Ok(Ok(()))
    );
    header(
        out,
        "certd_fleet_database_up",
        "gauge",
        "1 if the fleet's PostgreSQL answered this scrape.",
    );
    let _ = writeln!(out, "certd_fleet_database_up {}", u8::from(up));
    header(
        out,
        "certd_fleet_install_lag_seconds",
        "gauge",
        "Seconds from the newest issuance's publication to this host's install of it; growing while not installed.",
    );
    if up {
        let lag = fleet.db.install_lag(&fleet.host_id, &fleet.certs);
        match tokio::time::timeout(FLEET_DB_TIMEOUT, lag).await {
            Ok(Ok(rows)) => {
                for r in rows {
                    let _ = writeln!(
                        out,
                        "certd_fleet_install_lag_seconds{{name=\"{}\",serial=\"{}\",installed=\"{}\"}} {:.3}",
                        label(&r.cert_name),
                        label(&r.serial),
                        r.installed,
                        r.seconds
                    );
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "metrics: cannot read the fleet's install lag");
            }
            Err(_) => {
                tracing::warn!("metrics: the fleet's database did not answer for the install lag");
            }
        }
    }
    header(
        out,
        "certd_fleet_http01_answers_total",
        "counter",
        "http-01 requests for tokens this host did not present, by where the answer was found (unknown: nowhere; error: the database failed).",
    );
    let counts = fleet.answers.counts();
    for (source, n) in [
        ("memory", counts.memory),
        ("database", counts.database),
        ("unknown", counts.unknown),
        ("error", counts.db_errors),
    ] {
        let _ = writeln!(
            out,
            "certd_fleet_http01_answers_total{{source=\"{source}\"}} {n}"
        );
    }
    up
}

/// The ledger's part of the page.
async fn render_ledger(out: &mut String, sources: &Sources) -> Result<(), LedgerError> {
    let Sources {
        store,
        http,
        clock,
        ledger_errors,
        leases,
        fleet: _,
    } = sources;
    let certs = store.certificates().await?;
    header(
        out,
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
        out,
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
        out,
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
        out,
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
        out,
        "certd_reaper_deactivations_total",
        "counter",
        "Authorizations the reaper deactivated.",
    );
    out.push_str(&reaped);
    header(
        out,
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
        out,
        "certd_ledger_write_errors_total",
        "counter",
        "Ledger writes that failed since start (each is logged).",
    );
    let _ = writeln!(
        out,
        "certd_ledger_write_errors_total {}",
        ledger_errors.count()
    );
    leases.render(out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::UnixTime;
    use crate::fleet::{
        ChallengeAnswer, ChallengeKind, DbOptions, FleetKey, HolderId, InstallRecord, Lease,
        LeaseName, LeaseTiming,
    };
    use crate::ledger::test_util::cluster;

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
            fleet: None,
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

    /// In fleet mode the page says whether the fleet's database answers
    /// (and still renders when it does not), how long this host has been
    /// installing the newest issuance, and where http-01 answers came from.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_page_shows_the_fleet_database_install_lag_and_answers_by_source() {
        let mut pg = cluster::Postgres::launch();
        let opts = DbOptions {
            connect_timeout: std::time::Duration::from_secs(5),
            ..DbOptions::default()
        };
        let db = FleetDb::open(&pg.url(), &opts)
            .await
            .expect("fleet database");
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Ledger::open(&dir.path().join("certd.db"), Clock::system())
            .await
            .expect("ledger");
        let answers = FleetAnswers::new(db.clone());
        let sources = Sources {
            store: store.clone(),
            http: AcmeHttp::new(None, Clock::system()).expect("HTTP client"),
            clock: Clock::system(),
            ledger_errors: LedgerWriteErrors::default(),
            leases: LeaseCounters::default(),
            fleet: Some(FleetSources {
                db: db.clone(),
                answers: answers.clone(),
                host_id: "host-a".into(),
                certs: vec!["www".into()],
            }),
        };

        // Another host publishes an issuance and an answer.
        let key_file = dir.path().join("fleet.key");
        std::fs::write(&key_file, [7u8; 32]).expect("key file");
        std::fs::set_permissions(
            &key_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("chmod");
        let key = FleetKey::load(&key_file).expect("fleet key");
        let timing = LeaseTiming::new(
            std::time::Duration::from_secs(30),
            std::time::Duration::from_secs(2),
        )
        .expect("timing");
        let lease = Lease::claim(
            &db,
            LeaseName::Cert("www".into()),
            HolderId::new("host-b").expect("holder"),
            timing,
        )
        .await
        .expect("claim")
        .expect("free");
        let cert_key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["www.example.test".to_owned()])
            .expect("params")
            .self_signed(&cert_key)
            .expect("certificate");
        let token = "tok_aaaaaaaaaaaaaaaaaaaaaa";
        let mut tx = lease.begin_fenced(&db).await.expect("fenced");
        let serial = tx
            .publish_issuance(
                &key,
                &ring::rand::SystemRandom::new(),
                &cert.pem(),
                &cert_key.serialize_pem(),
            )
            .await
            .expect("publish");
        tx.put_challenge(&ChallengeAnswer {
            token: token.into(),
            kind: ChallengeKind::Http01,
            identifier: "www.example.test".into(),
            key_authorization: format!("{token}.thumb"),
            authz_url: "https://ca.example/authz/1".into(),
            valid_for: std::time::Duration::from_secs(600),
        })
        .await
        .expect("answer");
        tx.commit().await.expect("commit");
        assert!(answers.answer(token).await.is_some());
        assert!(answers.answer("nobody_aaaaaaaaaaaaaaaaaa").await.is_none());

        let page = render(&sources).await.expect("render");
        assert!(page.contains("\ncertd_fleet_database_up 1\n"), "{page}");
        let waiting = format!(
            "certd_fleet_install_lag_seconds{{name=\"www\",serial=\"{serial}\",installed=\"false\"}} "
        );
        assert!(page.contains(&waiting), "{page}");
        for (source, n) in [("memory", 0), ("database", 1), ("unknown", 1), ("error", 0)] {
            let line = format!("certd_fleet_http01_answers_total{{source=\"{source}\"}} {n}\n");
            assert!(page.contains(&line), "{line}: {page}");
        }

        db.record_install(&InstallRecord {
            host_id: "host-a".into(),
            cert_name: "www".into(),
            serial: serial.clone(),
            result: Ok("no reload commands".into()),
        })
        .await
        .expect("record the install");
        let page = render(&sources).await.expect("render");
        assert!(
            page.contains(&waiting.replace("\"false\"", "\"true\"")),
            "{page}"
        );

        pg.stop_immediate();
        let page = render(&sources)
            .await
            .expect("the page renders without the database");
        assert!(page.contains("\ncertd_fleet_database_up 0\n"), "{page}");
        assert!(!page.contains("certd_fleet_install_lag_seconds{"), "{page}");
        store.close().await;
    }
}
