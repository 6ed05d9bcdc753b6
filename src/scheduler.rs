//! When each certificate is due, and the daemon's loop that acts on it.
//!
//! A certificate is due now when no complete copy is installed, when its
//! configured domains differ from the installed certificate's, or when it
//! expired; otherwise at its renewal time: a uniformly random instant in
//! the CA's ARI window (RFC 9773) where the CA offers one, else when the
//! configured fraction of its lifetime remains, less a little jitter so
//! certificates issued together do not renew together.
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
use std::time::Duration;

use ring::rand::SecureRandom;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::acme::Disposition;
use crate::clock::UnixTime;
use crate::config::{CertificateConfig, Config};
use crate::driver::{self, Context, DriveError, Issued};
use crate::install::{self, CertInfo, renewal_time};

/// Why a certificate needs a new issuance, or when it will.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    Now(Reason),
    At(UnixTime),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    NotInstalled,
    DomainsChanged,
    RenewalWindow,
    Expired,
    Revoked,
    Forced,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotInstalled => "not installed",
            Self::DomainsChanged => "domains changed",
            Self::RenewalWindow => "in its renewal window",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::Forced => "forced",
        })
    }
}

/// Decides whether `cert` needs an order, given what is installed and the
/// serial certd revoked (if any).
pub fn due(
    cert: &CertificateConfig,
    installed: Option<&CertInfo>,
    revoked: Option<&str>,
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
    if want != info.dns_names {
        return Due::Now(Reason::DomainsChanged);
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

/// A uniform random number in [0, 1), from ring's system RNG.
pub fn random_fraction() -> f64 {
    let mut b = [0u8; 8];
    // The system RNG failing is not recoverable in any useful way here;
    // zero jitter is a safe fallback.
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// The delay before retry number `failures` (1-based): `min` doubling up to
/// `max`, drawn uniformly from the upper half so retries of many
/// certificates spread out.
pub fn failure_backoff(failures: u32, min: Duration, max: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    let d = min.saturating_mul(1 << doublings).min(max);
    d.mul_f64(0.5 + 0.5 * random_fraction())
}

/// The renewal time of `info` without ARI: `remaining` of the lifetime left,
/// minus up to 2 % of the lifetime of jitter.
pub fn planned_renewal(info: &CertInfo, remaining: f64) -> UnixTime {
    let lifetime = (info.not_after - info.not_before).max(0) as f64;
    let at = renewal_time(info.not_before, info.not_after, remaining);
    UnixTime::from_secs(at.secs() - (lifetime * 0.02 * random_fraction()) as i64)
}

/// The renewal time planned before (the ledger's), when it still fits
/// `info` and `remaining`: a time `planned_renewal` could have drawn. A
/// new draw at each daemon start moved NEXT RENEWAL by up to 2 % of the
/// lifetime (days for a 90-day certificate) for no reason; a new
/// certificate or a new `renew_remaining` plans afresh.
pub fn kept_renewal(info: &CertInfo, remaining: f64, planned: Option<i64>) -> Option<UnixTime> {
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
/// How long a CA `rateLimited` without `Retry-After` pauses new orders.
const DEFAULT_PAUSE: Duration = Duration::from_secs(15 * 60);

struct Entry {
    cert: CertificateConfig,
    next: UnixTime,
    why: String,
    failures: u32,
    /// Cancels the running order, if one is running.
    running: Option<CancellationToken>,
    /// When to ask the CA for a new ARI window.
    ari_recheck: Option<UnixTime>,
    /// Bumped on every configuration change, so a result from before a
    /// change is not applied to the changed certificate.
    generation: u64,
}

type JobResult = (String, u64, Result<Issued, DriveError>);

/// The daemon's scheduler: owns when every certificate is due and runs
/// at most `max_concurrent` orders.
pub struct Scheduler {
    ctx: Context,
    cfg: Arc<Config>,
    /// Every configured certificate. Changed only through `insert` and
    /// `take`, which keep the two timer sets below in step with it.
    entries: BTreeMap<String, Entry>,
    /// `(next, name)` of every entry without a running order.
    renewals: BTreeSet<(UnixTime, String)>,
    /// `(ari_recheck, name)` of every entry without a running order that
    /// has one.
    ari_rechecks: BTreeSet<(UnixTime, String)>,
    jobs: JoinSet<JobResult>,
    /// A CA rate limit: no new orders before this.
    paused_until: Option<UnixTime>,
    cancel: CancellationToken,
    generation: u64,
}

impl Scheduler {
    pub fn new(ctx: Context, cfg: Arc<Config>, cancel: CancellationToken) -> Self {
        Self {
            ctx,
            cfg,
            entries: BTreeMap::new(),
            renewals: BTreeSet::new(),
            ari_rechecks: BTreeSet::new(),
            jobs: JoinSet::new(),
            paused_until: None,
            cancel,
            generation: 0,
        }
    }

    /// Runs until `cancel` fires, then gives in-flight orders
    /// `shutdown_grace` to finish or abandon (with deactivation) cleanly.
    pub async fn run(mut self, mut reloads: mpsc::Receiver<Arc<Config>>) {
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
                .entries
                .iter()
                .filter(|(name, e)| e.running.is_some() && !ended.contains(*name))
                .map(|(name, _)| name.as_str())
                .collect();
            tracing::warn!(
                grace_secs = grace.as_secs(),
                certificates = ?abandoned,
                "orders still running after the shutdown grace; abandoned (the next start deactivates what they left pending)"
            );
            self.jobs.abort_all();
        }
    }

    /// No order is running: what the last ones left behind goes back to
    /// the system (see `crate::memory`).
    async fn release_memory(&self) {
        self.ctx.account.http.forget_old();
        self.ctx.store.release_memory().await;
        crate::memory::release();
    }

    async fn add(&mut self, cert: CertificateConfig) {
        self.generation += 1;
        let name = cert.name.to_string();
        let mut entry = Entry {
            cert,
            next: UnixTime::now(),
            why: String::new(),
            failures: 0,
            running: None,
            ari_recheck: None,
            generation: self.generation,
        };
        self.plan(&mut entry).await;
        self.insert(name, entry);
    }

    /// Puts `entry` in the table and, unless its order is running, its
    /// deadlines in the timer sets.
    fn insert(&mut self, name: String, entry: Entry) {
        if entry.running.is_none() {
            self.renewals.insert((entry.next, name.clone()));
            if let Some(t) = entry.ari_recheck {
                self.ari_rechecks.insert((t, name.clone()));
            }
        }
        self.entries.insert(name, entry);
    }

    /// Takes `name`'s entry out of the table and its deadlines out of the
    /// timer sets, to change it and `insert` it again.
    fn take(&mut self, name: &str) -> Option<Entry> {
        let entry = self.entries.remove(name)?;
        // The set keys own the name; the lookups below borrow a copy once.
        let name = name.to_owned();
        self.renewals.remove(&(entry.next, name.clone()));
        if let Some(t) = entry.ari_recheck {
            self.ari_rechecks.remove(&(t, name));
        }
        Some(entry)
    }

    /// Sets `entry.next` from what is installed (and the CA's ARI window).
    async fn plan(&self, entry: &mut Entry) {
        let now = UnixTime::now();
        let name = entry.cert.name.as_str();
        let installed = install::installed(&self.ctx.cert_dir, name);
        let revoked = self.ctx.store.revoked_serial(name).await.ok().flatten();
        match due(
            &entry.cert,
            installed.as_ref(),
            revoked.as_deref(),
            now,
            self.cfg.daemon.renew_remaining,
        ) {
            Due::Now(reason) => {
                entry.next = now;
                entry.why = reason.to_string();
                entry.ari_recheck = None;
            }
            Due::At(_) => {
                // `due` returned At, so a certificate is installed.
                let Some(info) = installed else { return };
                self.plan_installed(entry, &info).await;
            }
        }
        tracing::debug!(cert = %entry.cert.name, next = %entry.next.rfc3339(), why = %entry.why, "scheduled");
        let _ = self
            .ctx
            .store
            .set_next_renewal(entry.cert.name.as_str(), entry.next.secs())
            .await;
    }

    async fn plan_installed(&self, entry: &mut Entry, info: &CertInfo) {
        // What was planned before: kept while it still fits, so NEXT
        // RENEWAL does not move at each start (see `kept_renewal`).
        let planned = match self.ctx.store.certificate(entry.cert.name.as_str()).await {
            Ok(row) => row.and_then(|r| r.next_renewal_at),
            Err(e) => {
                tracing::debug!(cert = %entry.cert.name, error = %e, "cannot read the planned renewal");
                None
            }
        };
        if let Some((at, recheck)) = driver::ari_window(&self.ctx, info, planned).await {
            entry.next = at;
            entry.why = "in the CA's ARI renewal window".into();
            entry.ari_recheck = Some(recheck);
        } else {
            let remaining = self.cfg.daemon.renew_remaining;
            entry.next = kept_renewal(info, remaining, planned)
                .unwrap_or_else(|| planned_renewal(info, remaining));
            entry.why = "renewal time".into();
            entry.ari_recheck = None;
        }
    }

    /// Re-asks the CA for ARI windows whose `Retry-After` has passed.
    async fn refresh_ari(&mut self) {
        let now = UnixTime::now();
        // Collected first, so an answer that asks to look again at once is
        // not looked at again in this pass.
        let due: Vec<String> = self
            .ari_rechecks
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, name)| name.clone())
            .collect();
        for name in due {
            if let Some(mut entry) = self.take(&name) {
                self.plan(&mut entry).await;
                self.insert(name, entry);
            }
        }
    }

    fn start_due(&mut self) {
        let now = UnixTime::now();
        if self.paused_until.is_some_and(|t| t > now) {
            return;
        }
        self.paused_until = None;
        // Most overdue first: the set is ordered by deadline.
        while self.jobs.len() < self.cfg.daemon.max_concurrent
            && let Some((next, name)) = self.renewals.first().cloned()
            && next <= now
        {
            let Some(mut entry) = self.take(&name) else {
                self.renewals.remove(&(next, name));
                continue;
            };
            let token = self.cancel.child_token();
            entry.running = Some(token.clone());
            let ctx = self.ctx.clone();
            let cert = entry.cert.clone();
            let generation = entry.generation;
            tracing::info!(cert = %name, why = %entry.why, "renewing");
            self.insert(name.clone(), entry);
            self.jobs.spawn(async move {
                let result = driver::obtain(&ctx, &cert, &token).await;
                (name, generation, result)
            });
        }
    }

    /// How long the loop may sleep: until the next deadline it can act on.
    fn next_wake(&self) -> Duration {
        let deadline = wake_deadline(
            self.renewals.first().map(|(t, _)| *t),
            self.ari_rechecks.first().map(|(t, _)| *t),
            self.jobs.len() < self.cfg.daemon.max_concurrent,
            self.paused_until,
        );
        match deadline {
            Some(t) if t <= UnixTime::now() => Duration::from_millis(0),
            Some(t) => t.until().min(MAX_SLEEP),
            None => MAX_SLEEP,
        }
    }

    async fn finished(&mut self, (name, generation, result): JobResult) {
        let Some(mut entry) = self.take(&name) else {
            return; // removed from the configuration meanwhile
        };
        entry.running = None;
        if entry.generation != generation {
            // Changed meanwhile: plan the new configuration afresh.
            self.plan(&mut entry).await;
            self.insert(name, entry);
            return;
        }
        match result {
            Ok(issued) => {
                let previous_failures = std::mem::take(&mut entry.failures);
                let outcome = crate::alerts::Outcome::Succeeded {
                    previous_failures,
                    not_after: issued.info.not_after,
                };
                crate::alerts::after_renewal(
                    self.cfg.notify.as_ref(),
                    &self.ctx.store,
                    &name,
                    &entry.cert.domain_strings(),
                    outcome,
                )
                .await;
                tracing::info!(cert = %name, serial = %issued.info.serial, "renewed");
                self.plan_installed(&mut entry, &issued.info).await;
                let _ = self
                    .ctx
                    .store
                    .set_next_renewal(&name, entry.next.secs())
                    .await;
            }
            Err(DriveError::Cancelled) if self.cancel.is_cancelled() => {}
            Err(e) => {
                entry.failures += 1;
                let now = UnixTime::now();
                let (next, why) = match e.disposition() {
                    Disposition::RateLimited { until } => {
                        let until = until
                            .map(UnixTime::from_system)
                            .unwrap_or_else(|| now.plus(DEFAULT_PAUSE));
                        self.paused_until = Some(until);
                        let detail = format!("no new orders before {}", until.rfc3339());
                        let _ = self
                            .ctx
                            .store
                            .event("rate-limited", Some(&name), None, None, Some(&detail))
                            .await;
                        tracing::warn!(cert = %name, until = %until.rfc3339(), "CA rate limit: pausing new orders");
                        (until, "the CA asked to wait (rate limit)".to_owned())
                    }
                    _ => {
                        let d = &self.cfg.daemon;
                        let delay = failure_backoff(entry.failures, d.backoff_min, d.backoff_max);
                        (
                            now.plus(delay),
                            format!("retry {} after failure", entry.failures),
                        )
                    }
                };
                entry.next = next;
                entry.why = why;
                let msg = crate::acme::error_chain(&e);
                tracing::warn!(cert = %name, error = %msg, next = %next.rfc3339(), "renewal failed");
                let domains = entry.cert.domain_strings();
                let _ = self
                    .ctx
                    .store
                    .record_failure(&name, &domains, &msg, Some(next.secs()))
                    .await;
                let outcome = crate::alerts::Outcome::Failed {
                    failures: entry.failures,
                    error: &msg,
                };
                crate::alerts::after_renewal(
                    self.cfg.notify.as_ref(),
                    &self.ctx.store,
                    &name,
                    &domains,
                    outcome,
                )
                .await;
            }
        }
        self.insert(name, entry);
    }

    /// Applies a new, already validated configuration: new certificates
    /// are scheduled, removed ones stop (their order abandoned, installed
    /// files kept), changed ones are planned afresh (due now if their
    /// names changed).
    async fn apply(&mut self, cfg: Arc<Config>) {
        let wanted: BTreeMap<String, CertificateConfig> = cfg
            .certificates
            .iter()
            .map(|c| (c.name.to_string(), c.clone()))
            .collect();
        let removed: Vec<String> = self
            .entries
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        for name in removed {
            if let Some(entry) = self.take(&name)
                && let Some(token) = entry.running
            {
                token.cancel();
            }
            tracing::info!(cert = %name, "certificate removed from the configuration; installed files kept");
        }
        for (name, cert) in wanted {
            match self.entries.get_mut(&name) {
                Some(entry) if entry.cert == cert => {}
                Some(entry) => {
                    self.generation += 1;
                    entry.generation = self.generation;
                    let names_changed = entry.cert.domains != cert.domains;
                    entry.cert = cert;
                    if names_changed && let Some(token) = &entry.running {
                        // Its result carries the old generation and is
                        // replanned when it arrives.
                        token.cancel();
                    }
                    if entry.running.is_none() {
                        // get_mut just found it, and nothing ran in between.
                        let mut e = self.take(&name).expect("entry was just found");
                        e.failures = 0;
                        self.plan(&mut e).await;
                        self.insert(name.clone(), e);
                    }
                    tracing::info!(cert = %name, "certificate changed");
                }
                None => {
                    tracing::info!(cert = %name, "certificate added");
                    self.add(cert).await;
                }
            }
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
            serial: "01".into(),
            not_before,
            not_after,
            spki: Vec::new(),
            ari_id: None,
        }
    }

    fn due_third(c: &CertificateConfig, i: Option<&CertInfo>, now: UnixTime) -> Due {
        due(c, i, None, now, 1.0 / 3.0)
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
        let c = cert("[\"b.example\", \"a.example\"]");
        let now = UnixTime::from_secs(100);
        assert_eq!(due_third(&c, None, now), Due::Now(Reason::NotInstalled));
        let i = info(&["a.example"], 0, 900);
        assert_eq!(
            due_third(&c, Some(&i), now),
            Due::Now(Reason::DomainsChanged)
        );
        let i = info(&["a.example", "b.example"], 0, 900);
        assert_eq!(
            due_third(&c, Some(&i), now),
            Due::At(UnixTime::from_secs(600))
        );
        assert_eq!(
            due_third(&c, Some(&i), UnixTime::from_secs(600)),
            Due::Now(Reason::RenewalWindow)
        );
        assert_eq!(
            due_third(&c, Some(&i), UnixTime::from_secs(901)),
            Due::Now(Reason::Expired)
        );
        assert_eq!(
            due(&c, Some(&i), Some("01"), now, 1.0 / 3.0),
            Due::Now(Reason::Revoked)
        );
        assert_eq!(
            due(&c, Some(&i), Some("02"), now, 1.0 / 3.0),
            Due::At(UnixTime::from_secs(600))
        );
    }
}
