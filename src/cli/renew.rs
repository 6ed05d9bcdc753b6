//! `certd renew`: the certificates that are due (the daemon's rules,
//! `crate::daemon::schedule::due`, and the CA's ARI window), ordered a few
//! at a time, then a reaper pass. Outcomes go through the same handler as
//! the daemon's (`crate::app::outcome`); a one-shot run schedules no retry.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acme::ari::{self, AriError, Window};
use crate::acme::{AcmeHttp, error_chain};
use crate::app::Services;
use crate::app::cas::Cas;
use crate::app::outcome::{Failure, Retry};
use crate::clock::{Clock, UnixTime, rfc3339};
use crate::config::{CertificateConfig, ChallengeKind, Config};
use crate::daemon::schedule::{self, Due, Reason};
use crate::install;
use crate::ledger::Ledger;
use crate::order::{self, Source};
use crate::solver::Solvers;
use crate::text::escape_control;

use super::reap::open_existing;

/// How many orders a one-shot `renew` runs at once.
const RENEW_CONCURRENCY: usize = 4;

pub(super) async fn renew(
    mut cfg: Config,
    clock: Clock,
    names: &[String],
    force: bool,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    if let Some(unknown) = names.iter().find(|n| cfg.certificate(n).is_none()) {
        errln!(
            "certd: no certificate named {unknown:?} in {}",
            cfg.path.display()
        );
        return Ok(ExitCode::from(2));
    }
    let now = clock.now();
    let existing = open_existing(&cfg).await?;
    let mut due = Vec::new();
    // Made on the first ARI question: nothing installed, nothing to ask.
    let mut http: Option<AcmeHttp> = None;
    for c in cfg
        .certificates
        .iter()
        .filter(|c| names.is_empty() || names.iter().any(|n| n == c.name.as_str()))
    {
        let installed = install::installed(&cfg.storage.cert_dir, c.name.as_str());
        let (revoked, ordered_profile) = match &existing {
            Some(s) => (
                s.revoked_serial(c.name.as_str()).await?,
                s.profile_wanted(c.name.as_str()).await?,
            ),
            None => (None, None),
        };
        let mut verdict = schedule::due(
            c,
            installed.as_ref(),
            revoked.as_deref(),
            ordered_profile.as_deref(),
            now,
            cfg.daemon.renew_remaining,
        );
        // Where the CA offers an ARI window, the window decides, as in
        // the daemon: due once it has started. A forced run need not ask.
        if let (Due::Now(Reason::RenewalWindow) | Due::At(_), Some(info), false) =
            (&verdict, &installed, force)
        {
            if http.is_none() {
                http = Some(AcmeHttp::new(
                    cfg.primary_ca().acme.ca_bundle.as_deref(),
                    clock.clone(),
                )?);
            }
            if let Some(http) = &http
                && let Some(window) =
                    ari_window(&cfg, &clock, http, existing.as_ref(), c, info).await
            {
                verdict = if now.secs() >= window.start {
                    tracing::info!(
                        cert = %c.name,
                        window_start = %UnixTime::from_secs(window.start).rfc3339(),
                        explanation = window.explanation_url.as_deref().unwrap_or("none given"),
                        "the CA's ARI window has started"
                    );
                    Due::Now(Reason::AriWindow)
                } else {
                    Due::At(UnixTime::from_secs(window.start))
                };
            }
        }
        match verdict {
            Due::Now(reason) => due.push((c.clone(), reason)),
            Due::At(_) if force || dry_run => due.push((c.clone(), Reason::Forced)),
            // An operator who names a certificate the CA paused (after
            // unpausing it) wants it tried now, not at the daemon's daily look.
            Due::At(_) if !names.is_empty() && paused(existing.as_ref(), c).await? => {
                due.push((c.clone(), Reason::Forced));
            }
            Due::At(at) => outln!("{}: valid, not due until {}", c.name, at.rfc3339()),
        }
    }
    if due.is_empty() {
        if let Some(s) = existing {
            s.close().await;
        }
        return Ok(ExitCode::SUCCESS);
    }

    crate::app::dirs::ensure_dirs(&cfg)?;
    let mode = if dry_run {
        // Every CA: whichever a certificate falls back to, a dry run
        // must not order from production.
        for ca in &mut cfg.cas {
            if let Some(staging) = staging_directory(&ca.acme.directory) {
                ca.acme.directory = staging;
            }
        }
        // Every CA with a staging twin is asked there instead.
        for ca in &mut cfg.cas {
            if let Some(staging) = staging_directory(&ca.acme.directory) {
                ca.acme.directory = staging;
            }
        }
        outln!(
            "dry run against {}: certificates are issued and discarded; nothing is installed, nothing reloaded",
            cfg.primary_ca().acme.directory
        );
        order::RunMode::DryRun
    } else {
        order::RunMode::Once
    };
    let store = match existing {
        Some(s) => s,
        None => Ledger::open(&cfg.db_path(), clock.clone()).await?,
    };
    let services = Services::with_ledger(Arc::new(cfg), clock, store);
    let result = renew_due(&services, due, mode).await;
    services.close().await;
    result
}

/// The staging directory of a CA whose production directory is `url`, for
/// `renew --dry-run`: staging has its own limits and its own account (the
/// credentials are per directory URL).
fn staging_directory(url: &reqwest::Url) -> Option<reqwest::Url> {
    const KNOWN: [(&str, &str); 1] = [(
        "https://acme-v02.api.letsencrypt.org/directory",
        "https://acme-staging-v02.api.letsencrypt.org/directory",
    )];
    let (_, staging) = KNOWN.iter().find(|(prod, _)| *prod == url.as_str())?;
    reqwest::Url::parse(staging).ok()
}

/// The CA's ARI window for `info` (RFC 9773). The ledger's answer for
/// the same certificate stands until its re-check time (the CA's
/// `Retry-After`, at most `[daemon] ari_interval`), so a timer running
/// `certd renew` often does not ask more often than the daemon would.
/// A new answer is recorded; a failed check is reported and recorded, and
/// leaves the last good window (if any) in charge.
async fn ari_window(
    cfg: &Config,
    clock: &Clock,
    http: &AcmeHttp,
    store: Option<&Ledger>,
    c: &CertificateConfig,
    info: &crate::install::CertInfo,
) -> Option<Window> {
    let now = clock.now();
    let name = c.name.as_str();
    let row = match store {
        Some(s) => s.certificate(name).await.ok().flatten(),
        None => None,
    };
    let recorded = row.filter(|r| r.ari_serial.as_deref() == Some(info.serial.as_str()));
    let recorded_window = recorded.as_ref().and_then(|r| {
        Some(Window {
            start: r.ari_window_start?,
            end: r.ari_window_end?,
            explanation_url: r.ari_explanation_url.clone(),
        })
    });
    if recorded
        .as_ref()
        .and_then(|r| r.ari_next_check)
        .is_some_and(|t| t > now.secs())
    {
        return recorded_window;
    }
    let directory = &cfg
        .cas_of(c)
        .next()
        .unwrap_or(cfg.primary_ca())
        .acme
        .directory;
    let answer = ari::renewal_info(http, directory.as_str(), info.ari_id.as_deref()).await;
    let interval = cfg.daemon.ari_interval;
    let (window, next_check, error) = match answer {
        Ok(a) => {
            let next = now.plus(schedule::ari_recheck_delay(a.retry_after, interval));
            (Some(a.window), next, None)
        }
        Err(AriError::Unsupported) => return None,
        Err(e) => {
            errln!("certd: {name}: {e}");
            let next = now.plus(schedule::ari_error_delay(&e, 1, interval));
            (None, next, Some(e.to_string()))
        }
    };
    if let Some(store) = store {
        let record = crate::ledger::AriRecord {
            window: window.as_ref().map(|w| crate::ledger::AriWindow {
                start: w.start,
                end: w.end,
                explanation_url: w.explanation_url.as_deref(),
            }),
            next_check: Some(next_check.secs()),
            error: error.as_deref(),
        };
        // Advice for the next run; this run has its answer.
        if let Err(e) = store.record_ari(name, &info.serial, &record).await {
            tracing::warn!(cert = name, error = %e, "cannot record the ARI window");
        }
    }
    window.or(recorded_window)
}

async fn renew_due(
    services: &Services,
    due: Vec<(CertificateConfig, Reason)>,
    mode: order::RunMode,
) -> anyhow::Result<ExitCode> {
    let cfg = &*services.cfg;
    let store = &services.store;
    let dry_run = mode == order::RunMode::DryRun;
    // Consecutive failures before this run, for notifications.
    let mut failures_before = HashMap::new();
    for (c, _) in &due {
        let n = store.certificate(c.name.as_str()).await?.map_or(0, |r| {
            u32::try_from(r.consecutive_failures).unwrap_or(u32::MAX)
        });
        failures_before.insert(c.name.to_string(), n);
    }
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let setup = async {
        let (account, first_ca) = services.first_account(cfg).await?;
        let needed: Vec<ChallengeKind> =
            due.iter().flat_map(|(c, _)| c.challenges.clone()).collect();
        let solvers =
            Solvers::from_config(cfg, &needed, &tracker, &cancel, services.clock.clone()).await?;
        let first = cfg.ca(&first_ca).unwrap_or_else(|| cfg.primary_ca());
        let (reaper, _) = services.reaper_at(cfg, first, account).await?;
        anyhow::Ok(services.order_context_at(cfg, first, reaper, solvers, mode))
    };
    let ctx = match setup.await {
        Ok(ctx) => ctx,
        Err(e) => {
            // Nothing was ordered; record why for `status` and fail.
            let failure = Failure::setup(error_chain(e.as_ref()));
            for (c, reason) in &due {
                if dry_run {
                    outln!("{}: dry run failed: {}", c.name, failure.message);
                    continue;
                }
                record_failed(services, c, *reason, &failure, &failures_before).await?;
            }
            return Ok(ExitCode::FAILURE);
        }
    };

    let limit = Arc::new(Semaphore::new(RENEW_CONCURRENCY));
    let mut jobs = JoinSet::new();
    let cas = Cas::new(services, Arc::new(cfg.clone()), ctx.clone());
    for (c, reason) in due {
        let cas = cas.clone();
        let cancel = cancel.clone();
        let limit = limit.clone();
        jobs.spawn(async move {
            // The semaphore is never closed, so acquire cannot fail.
            let _permit = limit.acquire_owned().await;
            tracing::info!(cert = %c.name, reason = %reason, "renewing");
            let result = cas.obtain(&c, reason == Reason::Forced, &cancel).await;
            (c, reason, result)
        });
    }

    let outcomes = services.outcomes();
    let mut failed = 0;
    loop {
        let joined = tokio::select! {
            joined = jobs.join_next() => joined,
            // Ctrl-C: let the drivers abandon their orders cleanly.
            _ = tokio::signal::ctrl_c(), if !cancel.is_cancelled() => {
                cancel.cancel();
                continue;
            }
        };
        let Some(joined) = joined else { break };
        let (c, reason, result) = joined.context("a renewal task panicked")?;
        match result {
            Ok(issued) if dry_run => outln!(
                "{}: dry run: issued serial {} valid until {}, discarded; nothing installed, nothing reloaded",
                c.name,
                issued.info.serial,
                rfc3339(issued.info.not_after)
            ),
            Err(e) if dry_run => {
                failed += 1;
                outln!("{}: dry run failed: {}", c.name, error_chain(&e));
            }
            Ok(issued) if issued.source == Source::Fleet => outln!(
                "{}: installed from the fleet: serial {} valid until {} (another host renewed it)",
                c.name,
                issued.info.serial,
                rfc3339(issued.info.not_after)
            ),
            Ok(issued) => {
                let previous = failures_before.get(c.name.as_str()).copied().unwrap_or(0);
                outcomes
                    .succeeded(
                        cfg.notify.as_ref(),
                        &c,
                        issued.info.not_after,
                        previous,
                        true,
                    )
                    .await?;
                let reload_failed = issued.reloads.iter().filter(|r| !r.ok).count();
                outln!(
                    "{}: issued serial {} valid until {}{}",
                    c.name,
                    issued.info.serial,
                    rfc3339(issued.info.not_after),
                    if reload_failed > 0 {
                        format!(", but {reload_failed} reload command(s) failed")
                    } else {
                        String::new()
                    }
                );
                if reload_failed > 0 {
                    failed += 1;
                }
            }
            // Fleet mode: another host renews it; not this run's failure.
            Err(e) if e.is_elsewhere() => outln!("{}: {e}; skipped", c.name),
            Err(e) => {
                failed += 1;
                record_failed(services, &c, reason, &Failure::of(&e), &failures_before).await?;
            }
        }
    }
    // Per endpoint and outcome, for benchmarks and curious operators.
    let requests: Vec<String> = ctx
        .account
        .http
        .request_counts()
        .into_iter()
        .map(|((endpoint, outcome), n)| format!("{endpoint}:{outcome}={n}"))
        .collect();
    tracing::debug!(requests = %requests.join(" "), "ACME requests of this run");
    // A one-shot run from cron is the only hygiene some hosts get.
    let counts =
        crate::app::lease::reaper_pass(services, &ctx.reaper, cfg.reaper.pending_max_age).await?;
    if counts.deactivated + counts.held_back > 0 {
        outln!(
            "reaper: deactivated {} stale pending authorization(s), held back {}",
            counts.deactivated,
            counts.held_back
        );
    }
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    Ok(if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Records a failed renewal of a one-shot run through the outcome
/// handler (ledger, notification), and prints it.
async fn record_failed(
    services: &Services,
    c: &CertificateConfig,
    reason: Reason,
    failure: &Failure,
    failures_before: &HashMap<String, u32>,
) -> anyhow::Result<()> {
    let name = c.name.as_str();
    let failures = failures_before.get(name).copied().unwrap_or(0) + 1;
    let retry = Retry::NextRun {
        forced: reason == Reason::Forced,
    };
    let (_, written) = services
        .outcomes()
        .failed(services.cfg.notify.as_ref(), c, failure, failures, retry)
        .await;
    written?;
    outln!("{name}: failed: {}", failure.message);
    if let Some((l, _)) = failure.limit.as_ref().filter(|(l, _)| l.paused) {
        match &l.unpause_url {
            Some(url) => outln!(
                "{name}: paused by the CA; unpause at {}, then run `certd renew {name}`",
                escape_control(url)
            ),
            None => outln!("{name}: paused by the CA; once unpaused, run `certd renew {name}`"),
        }
    }
    Ok(())
}

/// Whether the ledger records a CA pause for `c`.
async fn paused(store: Option<&Ledger>, c: &CertificateConfig) -> anyhow::Result<bool> {
    let Some(store) = store else {
        return Ok(false);
    };
    Ok(store
        .pause(c.name.as_str())
        .await?
        .is_some_and(|p| p.paused))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dry_run_uses_the_staging_directory_of_a_known_ca() {
        let url = |s: &str| reqwest::Url::parse(s).expect("URL");
        assert_eq!(
            staging_directory(&url("https://acme-v02.api.letsencrypt.org/directory")),
            Some(url(
                "https://acme-staging-v02.api.letsencrypt.org/directory"
            ))
        );
        assert_eq!(
            staging_directory(&url("https://ca.example/directory")),
            None
        );
    }
}
