//! When each certificate is due, and the daemon's loop that acts on it.
//!
//! A certificate is due now when no complete copy is installed, when its
//! configured domains differ from the installed certificate's, when its
//! configured profile preference differs from the one it was ordered
//! under, or when it expired; otherwise at its renewal time: a uniformly random instant in
//! the CA's ARI window (RFC 9773) where the CA offers one, else when the
//! configured fraction of its lifetime remains (half of it under 10 days,
//! see `install::renewal_time`), less a little jitter so certificates
//! issued together do not renew together.
//!
//! The ARI window is asked for at planning and again every
//! `[daemon] ari_interval` (twice a day by default), sooner when the CA's
//! `Retry-After` says so. A failed check keeps the last good window and
//! asks again later (RFC 9773 §4.3.3); it never turns ARI off. The instant
//! drawn in a window is kept while the window stays the same, and is never
//! later than [`latest_renewal`], so that a window ending at notAfter still
//! leaves the failure backoff several tries.
//!
//! [`Scheduler::run`] has the shape of mini-redis's purge task: one
//! `sleep_until` for the earliest deadline, woken early by finished orders,
//! configuration changes and shutdown. An idle daemon sleeps. Deadlines sit
//! in ordered sets, as mini-redis keeps its expirations, so each wake-up
//! looks only at the certificates it acts on: with 5,000 certificates due,
//! a scan of all of them per finished order made the daemon's cost grow
//! with the square of their number.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::acme::ari::{self, AriError, Window};
use crate::acme::{LimitScope, RateLimit};
use crate::app::backoff::{failure_backoff, random_fraction};
use crate::app::cas::Cas;
use crate::app::outcome::{Failure, HeldBack, Outcomes, Retry};
use crate::clock::UnixTime;
use crate::config::{CertificateConfig, Config};
use crate::install::{self, CertInfo, renewal_time};
use crate::ledger::{ACCOUNT_SCOPE, AriRecord, PauseRow};
use crate::order::{self, Context, DriveError, Issued, Source};

use super::timetable::{AriPlan, Entry, Finished, Timetable};

/// Why a certificate needs a new issuance, or when it will.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Due {
    Now(Reason),
    At(UnixTime),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    NotInstalled,
    DomainsChanged,
    ProfileChanged,
    RenewalWindow,
    AriWindow,
    Expired,
    Revoked,
    Forced,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotInstalled => "not installed",
            Self::DomainsChanged => "domains changed",
            Self::ProfileChanged => "profile changed",
            Self::RenewalWindow => "in its renewal window",
            Self::AriWindow => "in the CA's ARI renewal window",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::Forced => "forced",
        })
    }
}

/// Decides whether `cert` needs an order, given what is installed, the
/// serial certd revoked (if any), and the profile preference the installed
/// certificate was ordered under (`ProfilePreference::ledger_key`; `None`
/// where the ledger does not know, which never makes it due).
pub(crate) fn due(
    cert: &CertificateConfig,
    installed: Option<&CertInfo>,
    revoked: Option<&str>,
    ordered_profile: Option<&str>,
    now: UnixTime,
    remaining: f64,
) -> Due {
    let Some(info) = installed else {
        return Due::Now(Reason::NotInstalled);
    };
    if revoked == Some(info.serial.as_str()) {
        return Due::Now(Reason::Revoked);
    }
    let mut want = cert.domain_strings();
    want.sort();
    if want != info.names() {
        return Due::Now(Reason::DomainsChanged);
    }
    if ordered_profile.is_some_and(|p| p != cert.profile.ledger_key()) {
        return Due::Now(Reason::ProfileChanged);
    }
    if now.secs() >= info.not_after {
        return Due::Now(Reason::Expired);
    }
    let at = renewal_time(info.not_before, info.not_after, remaining);
    if now >= at {
        Due::Now(Reason::RenewalWindow)
    } else {
        Due::At(at)
    }
}

/// The latest instant certd renews at, whatever a CA's window says: with
/// a sixth of the lifetime left. With [`capped_backoff`] that leaves at
/// least eight retries before expiry.
pub(crate) fn latest_renewal(info: &CertInfo) -> UnixTime {
    let lifetime = (info.not_after - info.not_before).max(0);
    UnixTime::from_secs(info.not_after - lifetime / 6)
}

/// A uniformly random instant in `window`, no later than
/// [`latest_renewal`] (and no earlier than the window's start).
pub(crate) fn ari_instant(window: &Window, info: &CertInfo) -> UnixTime {
    let end = window
        .end
        .min(latest_renewal(info).secs())
        .max(window.start);
    let at = window.start + ((end - window.start) as f64 * random_fraction()) as i64;
    UnixTime::from_secs(at)
}

/// When to ask for a window again after a good answer: the configured
/// interval, sooner if the CA's `Retry-After` asks (never sooner than a
/// minute, unless the interval itself is shorter).
pub(crate) fn ari_recheck_delay(retry_after: Option<Duration>, interval: Duration) -> Duration {
    let floor = Duration::from_secs(60).min(interval);
    retry_after
        .map_or(interval, |r| r.max(floor).min(interval))
        .max(Duration::from_secs(1))
}

/// When to ask again after a failed check (RFC 9773 §4.3.3): in six hours
/// after a long-term error; after a temporary one, when the CA's
/// `Retry-After` says or after a backoff doubling from a minute. Never
/// later than the configured interval, which an operator may set shorter
/// (the default, twice a day, leaves the RFC's six hours).
pub(crate) fn ari_error_delay(error: &AriError, errors: u32, interval: Duration) -> Duration {
    let delay = match error {
        AriError::Temporary {
            retry_after: Some(r),
            ..
        } => (*r).min(ari::LONG_TERM_RETRY),
        AriError::Temporary { .. } => {
            failure_backoff(errors, Duration::from_secs(60), ari::LONG_TERM_RETRY)
        }
        AriError::LongTerm(_) | AriError::Unsupported => ari::LONG_TERM_RETRY,
    };
    delay.min(interval).max(Duration::from_secs(1))
}

/// The renewal time of `info` without ARI: `remaining` of the lifetime left,
/// minus up to 2 % of the lifetime of jitter.
pub(crate) fn planned_renewal(info: &CertInfo, remaining: f64) -> UnixTime {
    let lifetime = (info.not_after - info.not_before).max(0) as f64;
    let at = renewal_time(info.not_before, info.not_after, remaining);
    UnixTime::from_secs(at.secs() - (lifetime * 0.02 * random_fraction()) as i64)
}

/// The renewal time planned before (the ledger's), when it still fits
/// `info` and `remaining`: a time `planned_renewal` could have drawn. A
/// new draw at each daemon start moved NEXT RENEWAL by up to 2 % of the
/// lifetime (days for a 90-day certificate) for no reason; a new
/// certificate or a new `renew_remaining` plans afresh.
pub(crate) fn kept_renewal(
    info: &CertInfo,
    remaining: f64,
    planned: Option<i64>,
) -> Option<UnixTime> {
    let lifetime = (info.not_after - info.not_before).max(0) as f64;
    let latest = renewal_time(info.not_before, info.not_after, remaining).secs();
    let earliest = latest - (lifetime * 0.02) as i64;
    planned
        .filter(|t| (earliest..=latest).contains(t))
        .map(UnixTime::from_secs)
}

/// The scheduler's next deadline: the earliest renewal it could start and
/// the earliest ARI re-check. A renewal counts only while an order slot is
/// free (a finished order wakes the loop; a zero sleep while every slot is
/// taken would spin) and not before a CA-requested pause ends.
fn wake_deadline(
    first_renewal: Option<UnixTime>,
    first_ari_recheck: Option<UnixTime>,
    slot_free: bool,
    paused_until: Option<UnixTime>,
) -> Option<UnixTime> {
    let renewal = first_renewal
        .filter(|_| slot_free)
        .map(|t| paused_until.map_or(t, |p| t.max(p)));
    match (renewal, first_ari_recheck) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The longest the loop sleeps before looking again (clock changes).
const MAX_SLEEP: Duration = Duration::from_secs(6 * 3600);
type JobResult = (String, u64, Result<Issued, DriveError>);

/// A renewal asked for from outside the loop (`certd renew` and
/// `certd revoke` through the control socket): the certificate is renewed
/// now if due, or if `force`, by the loop's own order slots; `reply` hears
/// how it ended.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) name: String,
    pub(crate) force: bool,
    pub(crate) reply: oneshot::Sender<Outcome>,
}

/// How a [`Request`] ended.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// Not due and not forced: the renewal time.
    NotDue(UnixTime),
    Issued {
        serial: String,
        not_after: i64,
        failed_reloads: usize,
    },
    Failed(String),
    /// No certificate of that name is configured in the running daemon.
    Unknown,
}

/// The daemon's scheduler: owns when every certificate is due and runs
/// at most `max_concurrent` orders.
pub(crate) struct Scheduler {
    /// The first CA's context: the ledger, the certificate directory.
    ctx: Context,
    /// Every CA's: orders go where the certificate's list says.
    cas: Cas,
    /// Records outcomes; holds the clock every deadline is read from.
    outcomes: Outcomes,
    cfg: Arc<Config>,
    /// Every configured certificate and its deadlines.
    table: Timetable,
    jobs: JoinSet<JobResult>,
    /// A CA rate limit on the account: no new orders before this.
    paused_until: Option<UnixTime>,
    /// The CA pauses the ledger recorded before this run, by certificate,
    /// taken by `add` as it plans each one.
    recorded_pauses: BTreeMap<String, PauseRow>,
    cancel: CancellationToken,
}

impl Scheduler {
    pub(crate) fn new(
        cas: Cas,
        outcomes: Outcomes,
        cfg: Arc<Config>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            ctx: cas.first().clone(),
            cas,
            outcomes,
            cfg,
            table: Timetable::default(),
            jobs: JoinSet::new(),
            paused_until: None,
            recorded_pauses: BTreeMap::new(),
            cancel,
        }
    }

    /// Runs until `cancel` fires, then gives in-flight orders
    /// `shutdown_grace` to finish or abandon (with deactivation) cleanly.
    pub(crate) async fn run(
        mut self,
        mut reloads: mpsc::Receiver<Arc<Config>>,
        mut requests: mpsc::Receiver<Request>,
    ) {
        // One query, not two per certificate.
        let now = self.now().secs();
        for p in self.ctx.store.pauses().await.unwrap_or_default() {
            if p.until_at <= now {
                continue;
            }
            if p.scope == ACCOUNT_SCOPE {
                self.paused_until = Some(UnixTime::from_secs(p.until_at));
            } else {
                self.recorded_pauses.insert(p.scope.clone(), p);
            }
        }
        let certs = self.cfg.certificates.clone();
        for cert in certs {
            self.add(cert).await;
        }
        // Planning read every installed certificate; most days nothing is
        // due and the daemon goes to sleep next.
        self.release_memory().await;
        loop {
            self.refresh_ari().await;
            self.start_due();
            let wake = self.next_wake();
            tokio::select! {
                () = self.cancel.cancelled() => break,
                Some(cfg) = reloads.recv() => self.apply(cfg).await,
                Some(request) = requests.recv() => self.request(request).await,
                Some(joined) = self.jobs.join_next(), if !self.jobs.is_empty() => {
                    match joined {
                        Ok(result) => self.finished(result).await,
                        Err(e) => tracing::error!(error = %e, "an order task panicked"),
                    }
                    if self.jobs.is_empty() {
                        self.release_memory().await;
                    }
                }
                () = tokio::time::sleep(wake) => {}
            }
        }
        let grace = self.cfg.daemon.shutdown_grace;
        let mut ended = BTreeSet::new();
        let drain = async {
            while let Some(joined) = self.jobs.join_next().await {
                if let Ok((name, _, _)) = joined {
                    ended.insert(name);
                }
            }
        };
        if tokio::time::timeout(grace, drain).await.is_err() {
            let abandoned: Vec<&str> = self
                .table
                .running()
                .filter(|name| !ended.contains(*name))
                .collect();
            tracing::warn!(
                grace_secs = grace.as_secs(),
                certificates = ?abandoned,
                "orders still running after the shutdown grace; abandoned (the next start deactivates what they left pending)"
            );
            self.jobs.abort_all();
        }
    }

    fn now(&self) -> UnixTime {
        self.outcomes.clock.now()
    }

    /// No order is running: what the last ones left behind goes back to
    /// the system (see `crate::memory`).
    async fn release_memory(&self) {
        self.ctx.account.http.forget_old();
        self.ctx.store.release_memory().await;
        crate::memory::release();
    }

    async fn add(&mut self, cert: CertificateConfig) {
        let name = cert.name.to_string();
        let mut entry = self.table.new_entry(cert, self.now());
        self.plan(&mut entry).await;
        self.resume_pause(&mut entry).await;
        self.table.insert(name, entry);
    }

    /// Sets `entry.next` from what is installed (and the CA's ARI window).
    async fn plan(&self, entry: &mut Entry) {
        let now = self.now();
        let name = entry.cert.name.as_str();
        let installed = install::installed(&self.ctx.cert_dir, name);
        let revoked = self.ctx.store.revoked_serial(name).await.ok().flatten();
        let ordered_profile = self.ctx.store.profile_wanted(name).await.ok().flatten();
        match due(
            &entry.cert,
            installed.as_ref(),
            revoked.as_deref(),
            ordered_profile.as_deref(),
            now,
            self.cfg.daemon.renew_remaining,
        ) {
            // The lifetime rule's time has come, but a CA's window
            // decides where it offers one.
            Due::Now(Reason::RenewalWindow) | Due::At(_) => {
                // `due` returns these only with a certificate installed.
                let Some(info) = installed else { return };
                self.plan_installed(entry, &info).await;
            }
            Due::Now(reason) => {
                entry.next = now;
                entry.why = reason.to_string();
                entry.ari_recheck = None;
            }
        }
        tracing::debug!(cert = %entry.cert.name, next = %entry.next.rfc3339(), why = %entry.why, "scheduled");
        self.set_next_renewal(entry.cert.name.as_str(), entry.next)
            .await;
    }

    /// Plans an installed certificate by its ARI window, or by the
    /// lifetime rule where the CA offers none, and records the answer.
    async fn plan_installed(&self, entry: &mut Entry, info: &CertInfo) {
        // What was planned before: kept while it still fits, so NEXT
        // RENEWAL does not move at each start (see `kept_renewal`).
        let row = self.ctx.store.certificate(entry.cert.name.as_str()).await;
        // ARI goes to the CA that issued the certificate, only.
        let issuer = match &row {
            Ok(Some(r)) => r.issuer_ca.as_deref().and_then(|s| s.parse().ok()),
            _ => None,
        };
        let ari_ctx = match issuer {
            Some(ca) if ca != self.ctx.ca => self.cas.context(&ca).await.map_err(|e| e.to_string()),
            _ => Ok(self.ctx.clone()),
        };
        let planned = match row {
            Ok(row) => row.and_then(|r| r.next_renewal_at),
            Err(e) => {
                tracing::debug!(cert = %entry.cert.name, error = %e, "cannot read the planned renewal");
                None
            }
        };
        let now = self.now();
        let name = entry.cert.name.to_string();
        // A window about an earlier certificate says nothing about this one.
        let kept = entry.ari.take().filter(|p| p.serial == info.serial);
        let interval = self.cfg.daemon.ari_interval;
        let answer = match &ari_ctx {
            Ok(ctx) => order::ari_window(ctx, info).await,
            Err(e) => Err(AriError::Temporary {
                detail: format!("the issuing CA's account: {e}"),
                retry_after: None,
            }),
        };
        let (plan, recheck, error) = match answer {
            Ok(answer) => {
                entry.ari_errors = 0;
                let at = match kept {
                    Some(p) if p.window == answer.window => p.at,
                    // After a restart the instant drawn before stands while
                    // it is inside the window.
                    _ => planned
                        .filter(|t| (answer.window.start..=answer.window.end).contains(t))
                        .map_or_else(|| ari_instant(&answer.window, info), UnixTime::from_secs),
                };
                let plan = AriPlan {
                    serial: info.serial.clone(),
                    window: answer.window,
                    at,
                };
                let recheck = now.plus(ari_recheck_delay(answer.retry_after, interval));
                (Some(plan), Some(recheck), None)
            }
            Err(AriError::Unsupported) => (None, None, None),
            Err(e) => {
                entry.ari_errors += 1;
                let recheck = now.plus(ari_error_delay(&e, entry.ari_errors, interval));
                tracing::warn!(cert = %name, serial = %info.serial, error = %e, next_check = %recheck.rfc3339(), "ARI check failed; keeping the last window");
                (kept, Some(recheck), Some(e.to_string()))
            }
        };
        match &plan {
            Some(p) => {
                entry.next = p.at;
                entry.why = match &p.window.explanation_url {
                    Some(url) => format!("in the CA's ARI renewal window (explanation: {url})"),
                    None => "in the CA's ARI renewal window".into(),
                };
            }
            None => {
                let remaining = self.cfg.daemon.renew_remaining;
                entry.next = kept_renewal(info, remaining, planned)
                    .unwrap_or_else(|| planned_renewal(info, remaining));
                entry.why = "renewal time".into();
            }
        }
        entry.ari_recheck = recheck;
        if recheck.is_some() {
            let record = AriRecord {
                window: plan.as_ref().map(|p| crate::ledger::AriWindow {
                    start: p.window.start,
                    end: p.window.end,
                    explanation_url: p.window.explanation_url.as_deref(),
                }),
                next_check: recheck.map(UnixTime::secs),
                error: error.as_deref(),
            };
            let _logged = self.outcomes.note(
                "record the ARI window",
                self.ctx
                    .store
                    .record_ari(&name, &info.serial, &record)
                    .await,
            );
        }
        entry.ari = plan;
    }

    /// Re-asks the CA for ARI windows whose `Retry-After` has passed.
    async fn refresh_ari(&mut self) {
        let now = self.now();
        // Collected first, so an answer that asks to look again at once is
        // not looked at again in this pass.
        let due = self.table.ari_rechecks_due(now);
        for name in due {
            if let Some(mut entry) = self.table.take(&name) {
                self.plan(&mut entry).await;
                self.table.insert(name, entry);
            }
        }
    }

    fn start_due(&mut self) {
        let now = self.now();
        if self.paused_until.is_some_and(|t| t > now) {
            return;
        }
        self.paused_until = None;
        // Most overdue first: the set is ordered by deadline.
        while self.jobs.len() < self.cfg.daemon.max_concurrent
            && let Some((next, name)) = self.table.first_renewal()
            && next <= now
        {
            let name = name.to_owned();
            // The table keeps its deadlines in step with its entries.
            let Some(mut entry) = self.table.take(&name) else {
                break;
            };
            let token = self.cancel.child_token();
            entry.running = Some(token.clone());
            let cas = self.cas.clone();
            let cert = entry.cert.clone();
            let generation = entry.generation;
            let forced = entry.why == Reason::Forced.to_string();
            tracing::info!(cert = %name, why = %entry.why, "renewing");
            self.table.insert(name.clone(), entry);
            self.jobs.spawn(async move {
                let result = cas.obtain(&cert, forced, &token).await;
                (name, generation, result)
            });
        }
    }

    /// Plans `request`'s certificate afresh (a revocation recorded
    /// meanwhile makes it due) and, when due or forced, moves it to the
    /// front; the requester hears the outcome of its next order.
    async fn request(&mut self, request: Request) {
        let Some(mut entry) = self.table.take(&request.name) else {
            let _ = request.reply.send(Outcome::Unknown);
            return;
        };
        if entry.running.is_none() {
            self.plan(&mut entry).await;
            let now = self.now();
            // Naming a certificate the CA paused is the operator saying
            // it was unpaused: try it now, not at the daily look.
            let paused = matches!(
                self.ctx.store.pause(&request.name).await,
                Ok(Some(p)) if p.paused
            );
            if (request.force || paused) && entry.next > now {
                entry.next = now;
                entry.why = Reason::Forced.to_string();
            } else if entry.next > now {
                let _ = request.reply.send(Outcome::NotDue(entry.next));
                self.table.insert(request.name, entry);
                return;
            }
        }
        self.table.wait(request.name.clone(), request.reply);
        self.table.insert(request.name, entry);
    }

    /// How long the loop may sleep: until the next deadline it can act on.
    fn next_wake(&self) -> Duration {
        let deadline = wake_deadline(
            self.table.first_renewal().map(|(t, _)| t),
            self.table.first_ari_recheck(),
            self.jobs.len() < self.cfg.daemon.max_concurrent,
            self.paused_until,
        );
        match deadline {
            Some(t) if t <= self.now() => Duration::from_millis(0),
            Some(t) => self.outcomes.clock.until(t).min(MAX_SLEEP),
            None => MAX_SLEEP,
        }
    }

    async fn finished(&mut self, (name, generation, result): JobResult) {
        let outcome = match &result {
            Ok(issued) => Outcome::Issued {
                serial: issued.info.serial.clone(),
                not_after: issued.info.not_after,
                failed_reloads: issued.reloads.iter().filter(|r| !r.ok).count(),
            },
            Err(e) => Outcome::Failed(crate::acme::error_chain(e)),
        };
        let mut entry = match self.table.finish(&name, generation, &outcome) {
            Finished::Gone => return, // removed from the configuration meanwhile
            Finished::Stale(mut entry) => {
                // Changed meanwhile: plan the new configuration afresh.
                self.plan(&mut entry).await;
                self.table.insert(name, entry);
                return;
            }
            Finished::Current(entry) => entry,
        };
        match result {
            // Fleet mode: another host had renewed it; installed here.
            Ok(issued) if issued.source == Source::Fleet => {
                entry.failures = 0;
                tracing::info!(cert = %name, serial = %issued.info.serial, "installed from the fleet");
                self.plan_installed(&mut entry, &issued.info).await;
            }
            Ok(issued) => {
                let previous_failures = std::mem::take(&mut entry.failures);
                tracing::info!(cert = %name, serial = %issued.info.serial, "renewed");
                // An account-wide limit another order met meanwhile still
                // holds the account.
                let _logged = self
                    .outcomes
                    .succeeded(
                        self.cfg.notify.as_ref(),
                        &entry.cert,
                        issued.info.not_after,
                        previous_failures,
                        self.paused_until.is_none(),
                    )
                    .await;
                self.plan_installed(&mut entry, &issued.info).await;
                self.set_next_renewal(&name, entry.next).await;
            }
            Err(DriveError::Cancelled) if self.cancel.is_cancelled() => {}
            // Fleet mode: another host holds the lease (or took it over).
            // Not this certificate's failure: look again just after the
            // holder's lease would run out (it renews it while alive, so
            // then it has installed fleet-wide or this host may take
            // over), and within a lease's time at the latest.
            Err(e) if e.is_elsewhere() => {
                let ttl = self.cas.lease_ttl().unwrap_or(self.cfg.daemon.backoff_min);
                let now = self.now();
                let (retry, why) = match &e {
                    // Back a second before the expiry (the schedule counts
                    // whole seconds); the claim waits out the rest.
                    DriveError::LeasedElsewhere {
                        retry_after: Some(left),
                        ..
                    } => (
                        Duration::from_secs(left.as_secs().saturating_sub(1).max(1)).min(ttl),
                        "another host of the fleet holds its lease",
                    ),
                    DriveError::HeldBack { until, .. } => (
                        self.outcomes
                            .clock
                            .until(*until)
                            .max(Duration::from_secs(1)),
                        "the fleet's last attempt failed: its backoff",
                    ),
                    _ => (ttl, "another host of the fleet holds its lease"),
                };
                entry.next = now.plus(retry);
                entry.why = why.into();
                tracing::debug!(cert = %name, error = %e, next = %entry.next.rfc3339(), "not renewing here now");
            }
            Err(e) => {
                // Fleet mode: the failures in a row are the fleet's (the
                // shared row counts every host's), so a host that fails
                // after its peers did backs off as long as they would
                // have, and as long as the hold it wrote says.
                let services = self.cas.services();
                if services.fleet.is_some()
                    && let Ok(Some(row)) = services.store.certificate(&name).await
                {
                    let fleet = u32::try_from(row.consecutive_failures).unwrap_or(u32::MAX);
                    entry.failures = entry.failures.max(fleet);
                }
                entry.failures += 1;
                let failure = Failure::of(&e);
                let d = &self.cfg.daemon;
                let retry = Retry::Backoff {
                    min: d.backoff_min,
                    max: d.backoff_max,
                    cert_dir: &self.ctx.cert_dir,
                };
                let (failed, _logged) = self
                    .outcomes
                    .failed(
                        self.cfg.notify.as_ref(),
                        &entry.cert,
                        &failure,
                        entry.failures,
                        retry,
                    )
                    .await;
                if let (Some((limit, retry_after)), Some(held)) = (&failure.limit, &failed.held) {
                    self.hold_back(&name, limit, *retry_after, &failure.message, held)
                        .await;
                }
                // A backoff always gives a time; the fallback is a guard.
                entry.next = failed.next.unwrap_or_else(|| self.outcomes.clock.now());
                entry.why = failed.why;
                tracing::warn!(cert = %name, error = %failure.message, next = %entry.next.rfc3339(), "renewal failed");
            }
        }
        self.table.insert(name, entry);
    }

    /// Holds back what the rate limit `name`'s order met touches: the
    /// account's orders for an account-wide limit; else `name` and the
    /// other certificates naming what the CA named (the CA would refuse
    /// them too). Every other certificate keeps renewing.
    async fn hold_back(
        &mut self,
        name: &str,
        limit: &RateLimit,
        retry_after: Option<SystemTime>,
        error: &str,
        held: &HeldBack,
    ) {
        let until = held.until;
        if limit.scope == LimitScope::Account {
            self.paused_until = Some(self.paused_until.map_or(until, |p| p.max(until)));
            tracing::warn!(cert = %name, until = %until.rfc3339(), "CA rate limit on the account: pausing all new orders");
            return;
        }
        tracing::warn!(cert = %name, until = %until.rfc3339(), paused = limit.paused, unpause_url = limit.unpause_url.as_deref().unwrap_or(""), "CA rate limit on this certificate's names: pausing its orders");
        let touched = self.table.touched_by(&limit.scope, until);
        for other in touched {
            let Some(mut entry) = self.table.take(&other) else {
                continue;
            };
            // The other certificate's own record; it is told when its own
            // order meets the limit.
            let _logged = self
                .outcomes
                .record_limit(&other, limit, retry_after, error)
                .await;
            entry.next = until;
            entry.why = held.why.to_owned();
            self.set_next_renewal(&other, until).await;
            tracing::info!(cert = %other, until = %until.rfc3339(), "held back by the CA's limit on names it shares");
            self.table.insert(other, entry);
        }
    }

    /// Records when `name` is renewed next; a failure is logged and
    /// counted (the schedule in memory stands).
    async fn set_next_renewal(&self, name: &str, at: UnixTime) {
        let _logged = self.outcomes.note(
            "record the next renewal",
            self.ctx.store.set_next_renewal(name, at.secs()).await,
        );
    }

    /// Keeps a recorded CA pause across a restart: `entry` is not tried
    /// before it ends.
    async fn resume_pause(&mut self, entry: &mut Entry) {
        let Some(p) = self.recorded_pauses.remove(entry.cert.name.as_str()) else {
            return;
        };
        if p.until_at <= entry.next.secs() {
            return;
        }
        entry.next = UnixTime::from_secs(p.until_at);
        entry.why = if p.paused {
            "paused by the CA"
        } else {
            "the CA asked to wait (rate limit)"
        }
        .to_owned();
        self.set_next_renewal(entry.cert.name.as_str(), entry.next)
            .await;
    }

    /// Applies a new, already validated configuration: new certificates
    /// are scheduled, removed ones stop (their order abandoned, installed
    /// files kept), changed ones are planned afresh (due now if their
    /// names changed).
    async fn apply(&mut self, cfg: Arc<Config>) {
        let reconciled = self.table.reconcile(cfg.certificates.clone());
        for name in reconciled.removed {
            tracing::info!(cert = %name, "certificate removed from the configuration; installed files kept");
        }
        for name in reconciled.changed_running {
            tracing::info!(cert = %name, "certificate changed");
        }
        for (name, mut entry) in reconciled.replan {
            self.plan(&mut entry).await;
            tracing::info!(cert = %name, "certificate changed");
            self.table.insert(name, entry);
        }
        for cert in reconciled.added {
            tracing::info!(cert = %cert.name, "certificate added");
            self.add(cert).await;
        }
        // Orders started from now on record the new renewal point.
        self.ctx.renew_remaining = cfg.daemon.renew_remaining;
        self.cfg = cfg;
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn cert(domains: &str) -> CertificateConfig {
        let text = format!(
            "[acme]\ndirectory = \"https://ca/dir\"\n[storage]\nstate_dir = \"s\"\ncert_dir = \"c\"\n[http01]\nlisten = \"127.0.0.1:80\"\n[[certificate]]\nname = \"w\"\ndomains = {domains}\n"
        );
        Config::parse(Path::new("/x.toml"), &text)
            .expect("valid")
            .certificates
            .remove(0)
    }

    fn info(names: &[&str], not_before: i64, not_after: i64) -> CertInfo {
        CertInfo {
            dns_names: names.iter().map(|s| s.to_string()).collect(),
            ip_addresses: Vec::new(),
            serial: "01".into(),
            not_before,
            not_after,
            spki: Vec::new(),
            ari_id: None,
        }
    }

    fn due_third(c: &CertificateConfig, i: Option<&CertInfo>, now: UnixTime) -> Due {
        due(c, i, None, None, now, 1.0 / 3.0)
    }

    #[test]
    fn wake_deadline_ignores_renewals_without_a_free_slot() {
        let t = UnixTime::from_secs;
        // Overdue renewals and every slot taken: wait for a finished order.
        assert_eq!(wake_deadline(Some(t(10)), None, false, None), None);
        // ... but an ARI re-check needs no slot.
        assert_eq!(
            wake_deadline(Some(t(10)), Some(t(50)), false, None),
            Some(t(50))
        );
        assert_eq!(
            wake_deadline(Some(t(10)), Some(t(50)), true, None),
            Some(t(10))
        );
        assert_eq!(
            wake_deadline(Some(t(90)), Some(t(50)), true, None),
            Some(t(50))
        );
        // A CA pause holds renewals back, not re-checks.
        assert_eq!(
            wake_deadline(Some(t(10)), None, true, Some(t(70))),
            Some(t(70))
        );
        assert_eq!(
            wake_deadline(Some(t(10)), Some(t(50)), true, Some(t(70))),
            Some(t(50))
        );
        assert_eq!(wake_deadline(None, None, true, Some(t(70))), None);
    }

    /// A planned time inside the jitter range is kept; one from another
    /// certificate or another `renew_remaining` is not.
    #[test]
    fn a_planned_renewal_is_kept_while_it_fits() {
        let info = CertInfo {
            dns_names: vec![],
            serial: "01".into(),
            not_before: 0,
            not_after: 100 * 86_400,
            spki: vec![],
            ari_id: None,
            ip_addresses: vec![],
        };
        let latest = 66 * 86_400 + 86_400 / 3 * 2;
        let at = renewal_time(0, 100 * 86_400, 1.0 / 3.0).secs();
        assert!((at - latest).abs() < 2, "{at} {latest}");
        let inside = at - 86_400;
        assert_eq!(
            kept_renewal(&info, 1.0 / 3.0, Some(inside)),
            Some(UnixTime::from_secs(inside))
        );
        assert_eq!(kept_renewal(&info, 1.0 / 3.0, Some(at + 1)), None);
        assert_eq!(kept_renewal(&info, 1.0 / 3.0, Some(at - 3 * 86_400)), None);
        assert_eq!(kept_renewal(&info, 1.0 / 3.0, None), None);
        // Every fresh draw is one `kept_renewal` keeps.
        for _ in 0..100 {
            let drawn = planned_renewal(&info, 1.0 / 3.0);
            assert_eq!(
                kept_renewal(&info, 1.0 / 3.0, Some(drawn.secs())),
                Some(drawn)
            );
        }
    }

    #[test]
    fn due_reasons() {
        const D: i64 = 86_400;
        let c = cert("[\"b.example\", \"a.example\"]");
        let now = UnixTime::from_secs(100 * D);
        assert_eq!(due_third(&c, None, now), Due::Now(Reason::NotInstalled));
        let i = info(&["a.example"], 0, 900 * D);
        assert_eq!(
            due_third(&c, Some(&i), now),
            Due::Now(Reason::DomainsChanged)
        );
        let i = info(&["a.example", "b.example"], 0, 900 * D);
        assert_eq!(
            due_third(&c, Some(&i), now),
            Due::At(UnixTime::from_secs(600 * D))
        );
        assert_eq!(
            due_third(&c, Some(&i), UnixTime::from_secs(600 * D)),
            Due::Now(Reason::RenewalWindow)
        );
        assert_eq!(
            due_third(&c, Some(&i), UnixTime::from_secs(901 * D)),
            Due::Now(Reason::Expired)
        );
        assert_eq!(
            due(&c, Some(&i), Some("01"), None, now, 1.0 / 3.0),
            Due::Now(Reason::Revoked)
        );
        assert_eq!(
            due(&c, Some(&i), Some("02"), None, now, 1.0 / 3.0),
            Due::At(UnixTime::from_secs(600 * D))
        );
    }

    /// A profile preference other than the one the installed certificate
    /// was ordered under makes it due; an unknown one (a ledger from before
    /// profiles were recorded) does not.
    #[test]
    fn a_changed_profile_is_due() {
        // Long enough (900 days) for the one-third rule.
        const D: i64 = 86_400;
        let now = UnixTime::from_secs(100 * D);
        let with = |profile: &str| {
            let mut c = cert("[\"a.example\"]");
            c.profile.names = profile
                .split(',')
                .filter(|p| !p.is_empty())
                .map(String::from)
                .collect();
            c
        };
        let i = info(&["a.example"], 0, 900 * D);
        let at = Due::At(UnixTime::from_secs(600 * D));
        let check =
            |c: &CertificateConfig, ordered| due(c, Some(&i), None, ordered, now, 1.0 / 3.0);
        assert_eq!(check(&with(""), Some("")), at);
        assert_eq!(check(&with("shortlived"), Some("shortlived")), at);
        assert_eq!(check(&with("shortlived"), None), at);
        assert_eq!(check(&with(""), None), at);
        let changed = Due::Now(Reason::ProfileChanged);
        assert_eq!(check(&with("shortlived"), Some("")), changed);
        assert_eq!(check(&with(""), Some("classic")), changed);
        assert_eq!(check(&with("tlsserver,classic"), Some("classic")), changed);
    }

    /// Addresses count as names: an installed IP certificate matches its
    /// configuration.
    #[test]
    fn ip_names_compare_with_the_installed_sans() {
        const D: i64 = 86_400;
        let c = cert("[\"b.example\", \"::1\", \"127.0.0.1\"]");
        let mut i = info(&["b.example"], 0, 900 * D);
        let now = UnixTime::from_secs(100 * D);
        assert_eq!(
            due_third(&c, Some(&i), now),
            Due::Now(Reason::DomainsChanged)
        );
        i.ip_addresses = vec!["127.0.0.1".into(), "::1".into()];
        assert_eq!(
            due_third(&c, Some(&i), now),
            Due::At(UnixTime::from_secs(600 * D))
        );
    }

    #[test]
    fn ari_instant_leaves_room_for_retries() {
        const D: i64 = 86_400;
        let i = info(&["a.example"], 0, 6 * D);
        // A window that ends at notAfter: the instant is drawn before a
        // sixth of the lifetime remains.
        let w = Window {
            start: 4 * D,
            end: 6 * D,
            explanation_url: None,
        };
        for _ in 0..200 {
            let at = ari_instant(&w, &i).secs();
            assert!((4 * D..=5 * D).contains(&at), "{at}");
        }
        // A window that starts after that: its start.
        let late = Window {
            start: 5 * D + 10,
            end: 6 * D,
            explanation_url: None,
        };
        assert_eq!(ari_instant(&late, &i).secs(), 5 * D + 10);
    }

    #[test]
    fn ari_recheck_follows_retry_after_and_interval() {
        let h = |n: u64| Duration::from_secs(n * 3600);
        assert_eq!(ari_recheck_delay(None, h(12)), h(12));
        assert_eq!(ari_recheck_delay(Some(h(6)), h(12)), h(6));
        assert_eq!(ari_recheck_delay(Some(h(24)), h(12)), h(12));
        assert_eq!(
            ari_recheck_delay(Some(Duration::from_secs(1)), h(12)),
            Duration::from_secs(60)
        );
        assert_eq!(
            ari_recheck_delay(Some(h(6)), Duration::from_secs(2)),
            Duration::from_secs(2)
        );
        let long = AriError::LongTerm("bad JSON".into());
        assert_eq!(ari_error_delay(&long, 1, h(12)), h(6));
        assert_eq!(ari_error_delay(&long, 9, h(12)), h(6));
        assert_eq!(ari_error_delay(&long, 1, h(2)), h(2));
        let temporary = AriError::Temporary {
            detail: "503".into(),
            retry_after: None,
        };
        assert!(ari_error_delay(&temporary, 1, h(12)) <= Duration::from_secs(60));
        assert!(ari_error_delay(&temporary, 30, h(12)) <= h(6));
    }
}
