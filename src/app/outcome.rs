//! What happens after an order ends, the same for `certd renew` and the
//! daemon: the ledger records it (a failure with when to try again, a CA
//! rate limit as a pause), the notify command hears what deserves it, and
//! a CA limit that is over is cleared.
//!
//! The callers differ only in what they pass: how many failures in a row
//! they count, and how a failure is retried ([`Retry`]): the daemon backs
//! off and tries again itself; a one-shot run leaves a due certificate due
//! for the next run. Every ledger write is attempted; each that fails is
//! logged and counted (`certd_ledger_write_errors_total`), and the first
//! is returned, which a one-shot run turns into its exit code and the
//! daemon, having logged it, goes on from.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::acme::{Disposition, LimitScope, RateLimit, error_chain};
use crate::alerts;
use crate::clock::{Clock, UnixTime};
use crate::config::{CertificateConfig, NotifyConfig};
use crate::hygiene::GuardError;
use crate::install;
use crate::ledger::{ACCOUNT_SCOPE, EventKind, Ledger, LedgerError, NewPause};
use crate::metrics::LedgerWriteErrors;
use crate::order::DriveError;

use super::backoff::capped_backoff;

/// Records outcomes in one ledger, with one clock and one error counter.
#[derive(Clone)]
pub(crate) struct Outcomes {
    pub(crate) store: Ledger,
    pub(crate) clock: Clock,
    pub(crate) errors: LedgerWriteErrors,
}

/// How a failed renewal is tried again.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Retry<'a> {
    /// The daemon: after the failure backoff, capped by the time the
    /// installed certificate (in `cert_dir`) has left.
    Backoff {
        min: Duration,
        max: Duration,
        cert_dir: &'a Path,
    },
    /// A one-shot run schedules no retry: a certificate that was due is
    /// due again now; a forced one keeps its renewal time.
    NextRun { forced: bool },
}

/// Why an order failed, as the ledger and the notify command hear it.
pub(crate) struct Failure {
    pub(crate) message: String,
    /// The CA rate limit it met, and the CA's `Retry-After`.
    pub(crate) limit: Option<(RateLimit, Option<SystemTime>)>,
}

impl Failure {
    pub(crate) fn of(e: &DriveError) -> Self {
        Self {
            message: error_chain(e),
            limit: rate_limit_of(e),
        }
    }

    /// A failure before any order (no account, no solver).
    pub(crate) fn setup(message: String) -> Self {
        Self {
            message,
            limit: None,
        }
    }
}

/// What was decided about a failure.
pub(crate) struct Failed {
    /// When the certificate is tried again; `None`: at its renewal time.
    pub(crate) next: Option<UnixTime>,
    /// Why then, for the log and the scheduler.
    pub(crate) why: String,
    /// The rate limit met, as recorded.
    pub(crate) held: Option<HeldBack>,
}

impl Outcomes {
    /// A certificate was issued and installed after `previous_failures`
    /// failures: the CA took an order of this certificate (and of the
    /// account, unless `account_pause_over` is false because another
    /// limit still holds it), so the limits recorded for them are over.
    pub(crate) async fn succeeded(
        &self,
        notify: Option<&NotifyConfig>,
        cert: &CertificateConfig,
        not_after: i64,
        previous_failures: u32,
        account_pause_over: bool,
    ) -> Result<(), LedgerError> {
        let name = cert.name.as_str();
        let mut first = self.note(
            "clear the certificate's pause",
            self.store.clear_pause(name).await,
        );
        if account_pause_over {
            let cleared = self.note(
                "clear the account's pause",
                self.store.clear_pause(ACCOUNT_SCOPE).await,
            );
            first = first.and(cleared);
        }
        let outcome = alerts::Outcome::Succeeded {
            previous_failures,
            not_after,
        };
        let told =
            alerts::after_renewal(notify, &self.store, name, &cert.domain_strings(), outcome).await;
        first.and(self.note("record the notification", told))
    }

    /// A renewal failed, the `failures`-th time in a row: records it
    /// (and a rate limit), decides when to try again, and tells the notify
    /// command what deserves it.
    pub(crate) async fn failed(
        &self,
        notify: Option<&NotifyConfig>,
        cert: &CertificateConfig,
        failure: &Failure,
        failures: u32,
        retry: Retry<'_>,
    ) -> (Failed, Result<(), LedgerError>) {
        let name = cert.name.as_str();
        let msg = failure.message.as_str();
        let mut written = Ok(());
        let held = match &failure.limit {
            Some((limit, retry_after)) => {
                let (held, w) = self.record_limit(name, limit, *retry_after, msg).await;
                written = written.and(w);
                Some(held)
            }
            None => None,
        };
        let now = self.clock.now();
        let (next, why) = match (&held, retry) {
            (Some(h), _) => (Some(h.until), h.why.to_owned()),
            (None, Retry::Backoff { min, max, cert_dir }) => {
                let info = install::installed(cert_dir, name);
                let delay = capped_backoff(failures, min, max, info.as_ref(), now);
                (
                    Some(now.plus(delay)),
                    format!("retry {failures} after failure"),
                )
            }
            (None, Retry::NextRun { forced }) => {
                ((!forced).then_some(now), "due at the next run".to_owned())
            }
        };
        let domains = cert.domain_strings();
        written = written.and(
            self.note(
                "record the failure",
                self.store
                    .record_failure(name, &domains, msg, next.map(UnixTime::secs))
                    .await,
            ),
        );
        let news = held.as_ref().is_some_and(|h| h.news);
        let limit = failure.limit.as_ref().map(|(l, _)| l);
        if let Some(outcome) = alerts::failure_outcome(failures, msg, limit, news) {
            let told = alerts::after_renewal(notify, &self.store, name, &domains, outcome).await;
            written = written.and(self.note("record the notification", told));
        }
        (Failed { next, why, held }, written)
    }

    /// Records the rate limit `name`'s order met, for `status`, a restart
    /// and the notify command: in the account's scope for an account-wide
    /// limit, else in the certificate's. A pause (no `Retry-After`) is
    /// tried again after `PAUSED_RETRY`.
    pub(crate) async fn record_limit(
        &self,
        name: &str,
        limit: &RateLimit,
        retry_after: Option<SystemTime>,
        error: &str,
    ) -> (HeldBack, Result<(), LedgerError>) {
        let now = self.clock.now();
        let until = if limit.paused {
            now.plus(PAUSED_RETRY)
        } else {
            retry_after.map_or_else(|| now.plus(DEFAULT_PAUSE), UnixTime::from_system)
        };
        let (scope, why) = match (&limit.scope, limit.paused) {
            (LimitScope::Account, _) => (ACCOUNT_SCOPE, "the CA's rate limit on the account"),
            (_, true) => (name, "paused by the CA"),
            (_, false) => (name, "the CA asked to wait (rate limit)"),
        };
        let pause = NewPause {
            until: until.secs(),
            paused: limit.paused,
            unpause_url: limit.unpause_url.as_deref(),
            detail: error,
        };
        let set = self.store.set_pause(scope, &pause).await;
        // A ledger that cannot record it tells the operator every time
        // rather than never.
        let news = set.as_ref().map_or(true, |news| *news);
        let mut written = self.note("record the CA's rate limit", set.map(drop));
        let detail = format!("{why}: no new orders before {}", until.rfc3339());
        written = written.and(
            self.note(
                "record the rate-limited event",
                self.store
                    .event(
                        EventKind::RateLimited,
                        Some(name),
                        None,
                        None,
                        Some(&detail),
                    )
                    .await,
            ),
        );
        (HeldBack { until, why, news }, written)
    }

    /// Logs and counts a failed ledger write; the result, for the caller
    /// that stops at one.
    pub(crate) fn note(
        &self,
        what: &'static str,
        result: Result<(), LedgerError>,
    ) -> Result<(), LedgerError> {
        self.errors.note(what, result)
    }
}

/// How long a CA `rateLimited` without `Retry-After` pauses new orders.
const DEFAULT_PAUSE: Duration = Duration::from_secs(15 * 60);

/// How often a certificate whose names the CA paused is tried again. The
/// pause lasts until an operator unpauses the names (and `certd renew
/// NAME` tries at once); a daily look finds out without hammering the CA.
pub(crate) const PAUSED_RETRY: Duration = Duration::from_secs(24 * 3600);

/// The CA rate limit a failed order met, if it met one, and the CA's
/// `Retry-After`. The guard's own limits count too: its account-wide
/// one holds back the account, its duplicate-certificate one the
/// certificate.
pub(crate) fn rate_limit_of(e: &DriveError) -> Option<(RateLimit, Option<SystemTime>)> {
    let names = || RateLimit {
        scope: LimitScope::Names(Vec::new()),
        paused: false,
        unpause_url: None,
    };
    if let DriveError::Guard(GuardError::Limit {
        until,
        account_wide,
        ..
    }) = e
    {
        let scope = if *account_wide {
            LimitScope::Account
        } else {
            LimitScope::Names(Vec::new())
        };
        return Some((RateLimit { scope, ..names() }, Some(until.system_time())));
    }
    let Disposition::RateLimited { until } = e.disposition() else {
        return None;
    };
    let limit = match e {
        DriveError::Acme(a) => a.rate_limit(),
        _ => None,
    };
    Some((limit.unwrap_or_else(names), until))
}

/// A rate limit as recorded: when `name` (or, account-wide, every
/// certificate) is tried again, why, and whether the pause is news.
pub(crate) struct HeldBack {
    pub(crate) until: UnixTime,
    pub(crate) why: &'static str,
    pub(crate) news: bool,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn cert() -> CertificateConfig {
        let text = "[acme]\ndirectory = \"https://ca/dir\"\n[storage]\nstate_dir = \"s\"\ncert_dir = \"c\"\n[http01]\nlisten = \"127.0.0.1:80\"\n[[certificate]]\nname = \"w\"\ndomains = [\"w.example\"]\n";
        Config::parse(Path::new("/x.toml"), text)
            .expect("valid")
            .certificates
            .remove(0)
    }

    async fn outcomes(dir: &Path, now: i64) -> Outcomes {
        Outcomes {
            store: Ledger::open(&dir.join("certd.db"), crate::clock::Clock::system())
                .await
                .expect("ledger"),
            clock: Clock::fixed(UnixTime::from_secs(now)),
            errors: LedgerWriteErrors::default(),
        }
    }

    #[tokio::test]
    async fn a_failure_is_recorded_with_the_callers_retry() {
        let dir = tempfile::tempdir().expect("temp dir");
        let o = outcomes(dir.path(), 1_000_000).await;
        let c = cert();
        let failure = Failure::setup("the CA is down".into());
        // The daemon: a backoff of 60 to 120 s (nothing installed, so
        // nothing caps it).
        let retry = Retry::Backoff {
            min: Duration::from_secs(60),
            max: Duration::from_secs(3600),
            cert_dir: dir.path(),
        };
        let (failed, written) = o.failed(None, &c, &failure, 1, retry).await;
        written.expect("written");
        let next = failed.next.expect("a retry time").secs();
        assert!((1_000_030..=1_000_060).contains(&next), "{next}");
        let row = o.store.certificate("w").await.expect("read").expect("row");
        assert_eq!(row.consecutive_failures, 1);
        assert_eq!(row.next_renewal_at, Some(next));
        assert_eq!(row.last_error.as_deref(), Some("the CA is down"));
        // A one-shot run: due again now, unless forced.
        let (failed, _) = o
            .failed(None, &c, &failure, 2, Retry::NextRun { forced: false })
            .await;
        assert_eq!(failed.next, Some(UnixTime::from_secs(1_000_000)));
        let (failed, _) = o
            .failed(None, &c, &failure, 3, Retry::NextRun { forced: true })
            .await;
        assert_eq!(failed.next, None);
        let row = o.store.certificate("w").await.expect("read").expect("row");
        assert_eq!(row.consecutive_failures, 3);
        assert_eq!(o.errors.count(), 0);
        o.store.close().await;
    }

    #[tokio::test]
    async fn failed_ledger_writes_are_counted_not_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let o = outcomes(dir.path(), 1_000_000).await;
        let c = cert();
        // A closed pool refuses every write, as a ledger on a failed disk.
        o.store.close().await;
        let failure = Failure {
            message: "rate limited".into(),
            limit: Some((
                RateLimit {
                    scope: LimitScope::Names(Vec::new()),
                    paused: false,
                    unpause_url: None,
                },
                None,
            )),
        };
        let (failed, written) = o
            .failed(None, &c, &failure, 1, Retry::NextRun { forced: false })
            .await;
        assert!(written.is_err(), "the first failed write is returned");
        // Held back by the limit in memory even though the ledger could
        // not record it: the CA's default pause from now.
        assert_eq!(failed.next, Some(UnixTime::from_secs(1_000_000 + 15 * 60)));
        // The pause, the rate-limited event and the failure.
        assert_eq!(o.errors.count(), 3);
        let succeeded = o.succeeded(None, &c, 2_000_000, 1, true).await;
        assert!(succeeded.is_err());
        // Both pauses the success clears.
        assert_eq!(o.errors.count(), 5);
    }
}
