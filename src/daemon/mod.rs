//! `certd run`: the long-running daemon's wiring.
//!
//! [`run`] has the shape of mini-redis's server: the caller builds the
//! [`Services`], binds the sockets it owns ([`Listeners`]) and chooses the
//! shutdown (the CLI: SIGTERM and SIGINT cancel the token, SIGHUP sends a
//! reload request; a test: whatever it likes). `run` registers no signal
//! itself.
//!
//! Tasks, all owned by one `TaskTracker` (`tasks`, named, so a shutdown
//! that waits can say for what) and stopped by one `CancellationToken`:
//! the scheduler (orders, `schedule`), the reaper (a pass every
//! `reaper.interval`, `reaping`), the challenge responders, the metrics
//! listener, the control socket (one-shot commands hand their work to the
//! scheduler and the reaper through it, see `control` and `clients`), the
//! systemd notifier and the configuration watcher (`watch`, applied by
//! `reloader`). systemd hears READY=1 once local start-up is done
//! (configuration, ledger, challenge listeners), before the CA is asked
//! for the account (`account`): with the CA down at boot,
//! `systemctl start` would otherwise hang and fail. RELOADING=1/READY=1
//! around a reload, STOPPING=1 at shutdown (see `systemd`). What a reload
//! changes, and what waits for a restart, is `config::diff`'s typed comparison.

mod account;
mod clients;
pub(crate) mod control;
mod reaping;
mod reloader;
pub(crate) mod schedule;
mod systemd;
mod tasks;
mod timetable;
mod watch;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch as channel};
use tokio_util::sync::CancellationToken;

use crate::acme::credentials_path;
use crate::app::Services;
use crate::app::cas::Cas;
use crate::app::fleet_answers::{http01_fallback, tls_alpn_fallback};
use crate::app::fleet_hosts::HostTasks;
use crate::config::{CaName, ChallengeKind, Config};
use crate::ledger::EventKind;
use crate::order::RunMode;
use crate::solver::{ChallengeSettings, Fallbacks, Solvers};

use self::reaping::{ReaperTimes, reaper_loop};
use self::reloader::{MetricsListener, Reloader};
use self::schedule::Scheduler;
use self::systemd::{Notifier, State};
use self::tasks::{Tasks, lock};

/// What the caller hands the daemon besides its services: the sockets it
/// bound and the reload requests it sends.
pub struct Listeners {
    /// The metrics listener for `[metrics] listen`, bound by the caller
    /// (a test binds port 0); `None`: no metrics until a reload changes
    /// the address.
    pub metrics: Option<TcpListener>,
    /// One message per reload request (the CLI sends one per SIGHUP).
    pub reload: mpsc::Receiver<()>,
}

/// Runs the daemon until `shutdown` fires.
pub async fn run(
    services: Services,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let cfg = services.cfg.clone();
    let store = services.store.clone();
    // A restart applies every edit: what `status` said waits for one is done.
    // This is also the daemon's first write: a ledger it cannot write (a
    // full or read-only file system that opening did not reveal, since
    // reading still works) stops it here, with the file and the cause
    // (`ledger::explain`, exit 2), rather than run with every write failing.
    if let Err(e) = store
        .event(EventKind::DaemonStarted, None, None, None, None)
        .await
    {
        store.close().await;
        return Err(crate::ledger::explain(&cfg.db_path(), e.into()));
    }
    let tasks = Tasks::default();
    let notifier = Notifier::start(&tasks.tracker, &shutdown);
    let grace = cfg.daemon.shutdown_grace;
    // Fleet mode: this host beats its heartbeat, loads the fleet's http-01
    // answers and installs what any host publishes, leaseholder or not.
    // Shared with the reloader, which restarts them for new certificates.
    let fleet_tasks = Arc::new(tokio::sync::Mutex::new(HostTasks::start(
        &services, &cfg, &shutdown,
    )?));
    crate::app::fleet_order::declare_definitions(&services, &cfg).await;
    let solvers = Solvers::with_fallbacks(
        &cfg,
        &ALL_KINDS,
        &tasks.tracker,
        &shutdown,
        services.clock.clone(),
        Fallbacks {
            http01: http01_fallback(&services),
            tls_alpn01: tls_alpn_fallback(&services),
        },
    )
    .await
    .context("cannot start the challenge solvers")?;
    notifier.notify(State::Ready);
    let Some((account, first_ca, cfg)) =
        account::load_account(cfg.clone(), &services, &shutdown).await
    else {
        notifier.notify(State::Stopping);
        tasks.stop(grace).await;
        store.close().await;
        return Ok(());
    };
    let cfg = catch_up_solvers(&services.cfg, cfg, &solvers, &tasks, &shutdown).await;
    // The CA whose account loaded: the primary, unless it was down.
    let Some(first) = cfg.ca(&first_ca).or_else(|| cfg.cas.first()) else {
        anyhow::bail!("no CA is configured");
    };
    let (reaper, recovered) = services.reaper_at(&cfg, first, account).await?;
    if recovered.resumable + recovered.abandoned > 0 {
        tracing::info!(
            resumable = recovered.resumable,
            abandoned = recovered.abandoned,
            "recovered unfinished orders"
        );
    }
    let ctx = services.order_context_at(&cfg, first, reaper.clone(), solvers, RunMode::Daemon);

    let metrics = match listeners.metrics {
        Some(listener) => Some(
            MetricsListener::start(listener, &ctx, &services, &tasks, &shutdown)
                .context("cannot serve metrics")?,
        ),
        None => None,
    };
    let (reload_tx, reload_rx) = mpsc::channel(4);
    let (reaper_tx, reaper_rx) = channel::channel(ReaperTimes::of(&cfg));
    let (config_tx, config_rx) = channel::channel(cfg.clone());
    let (request_tx, request_rx) = mpsc::channel(16);
    let cas = Cas::new(&services, cfg.clone(), ctx.clone());
    let control = control::Handles {
        ctx: ctx.clone(),
        cas: cas.clone(),
        scheduler: request_tx,
        config: config_rx,
    };
    let reloader = Reloader {
        started: cfg.clone(),
        current: cfg.clone(),
        scheduler: reload_tx,
        reaper_times: reaper_tx,
        config: config_tx,
        metrics,
        ctx: ctx.clone(),
        cas: cas.clone(),
        services: services.clone(),
        tasks: tasks.clone(),
        shutdown: shutdown.clone(),
        notifier: notifier.clone(),
        restart_keys: Vec::new(),
        fleet_tasks: fleet_tasks.clone(),
    };
    let scheduler = Scheduler::new(
        cas.clone(),
        services.outcomes(),
        cfg.clone(),
        shutdown.clone(),
    );
    tasks.spawn("scheduler", scheduler.run(reload_rx, request_rx));
    // Bound here, once the daemon can serve it: a socket nobody answers
    // would make a one-shot command wait for a daemon still looking for
    // its CA. Without it the daemon still works; one-shot commands then
    // refuse, naming the daemon's PID, as the state directory's lock
    // makes them.
    if let Err(e) = control::start(&cfg.storage.state_dir, control, &tasks.tracker, &shutdown) {
        tracing::error!(error = %e, "cannot serve the control socket; certd renew, revoke and reap cannot reach this daemon");
    }
    // A CA first used later gets its passes on the same schedule.
    let (spawner, times, stop) = (tasks.clone(), reaper_rx.clone(), shutdown.clone());
    let for_new = services.clone();
    cas.on_new_reaper(move |reaper| {
        let looped = reaper_loop(reaper, for_new.clone(), times.clone(), stop.clone());
        spawner.spawn("reaper", looped);
    });
    tasks.spawn(
        "reaper",
        reaper_loop(reaper, services.clone(), reaper_rx, shutdown.clone()),
    );
    // The other CAs this state directory has accounts at: their reapers
    // recover what an earlier run left unfinished there and settle stale
    // authorizations, rather than wait for the next order to go there.
    let others: Vec<CaName> = cfg
        .cas
        .iter()
        .filter(|c| c.name != ctx.ca)
        .filter(|c| credentials_path(&cfg.storage.state_dir, c.acme.directory.as_str()).exists())
        .map(|c| c.name.clone())
        .collect();
    if !others.is_empty() {
        let (cas, stop) = (cas.clone(), shutdown.clone());
        tasks.spawn("other CAs", async move {
            for name in others {
                tokio::select! {
                    () = stop.cancelled() => return,
                    built = cas.context(&name) => {
                        if let Err(e) = built {
                            tracing::warn!(ca = %name, error = %e, "cannot load the account at this CA yet; it is loaded when an order goes there");
                        }
                    }
                }
            }
        });
    }
    tasks.spawn(
        "config watcher",
        watch::watch_config(reloader, listeners.reload),
    );
    tracing::info!(certificates = cfg.certificates.len(), "certd running");
    shutdown.cancelled().await;
    notifier.notify(State::Stopping);
    tracing::info!("shutting down");
    // The scheduler is the one that takes the grace (its orders); later
    // reloads may have changed it.
    let grace = *lock(&tasks.grace);
    tasks.stop(grace.unwrap_or(cfg.daemon.shutdown_grace)).await;
    if let Some(fleet_tasks) = fleet_tasks.lock().await.take() {
        fleet_tasks.stop().await;
    }
    store.close().await;
    Ok(())
}

/// Certificates may be added by a reload: the daemon serves every
/// configured kind.
const ALL_KINDS: [ChallengeKind; 3] = [
    ChallengeKind::Http01,
    ChallengeKind::Dns01,
    ChallengeKind::TlsAlpn01,
];

/// The listeners started before the account; an edit read while the CA
/// was unreachable (`cfg`, not `started`) reaches them here. What runs is
/// what the configuration in force says, as after a reload that could not
/// apply a section.
async fn catch_up_solvers(
    started: &Arc<Config>,
    cfg: Arc<Config>,
    solvers: &Solvers,
    tasks: &Tasks,
    shutdown: &CancellationToken,
) -> Arc<Config> {
    if Arc::ptr_eq(started, &cfg) {
        return cfg;
    }
    let failed = solvers
        .reconfigure(
            ChallengeSettings::of(started),
            ChallengeSettings::of(&cfg),
            &ALL_KINDS,
            &tasks.tracker,
            shutdown,
        )
        .await;
    if failed.is_empty() {
        return cfg;
    }
    let mut kept = (*cfg).clone();
    for (kind, e) in failed {
        tracing::error!(error = %e, "cannot apply the new {kind} settings; the running ones stay");
        keep_running(&mut kept, started, kind);
    }
    Arc::new(kept)
}

/// Puts `running`'s `kind` section back into `new`, for a section whose
/// new settings the solvers could not take: the configuration in force
/// says what runs.
pub(crate) fn keep_running(new: &mut Config, running: &Config, kind: ChallengeKind) {
    match kind {
        ChallengeKind::Http01 => new.http01.clone_from(&running.http01),
        ChallengeKind::Dns01 | ChallengeKind::DnsPersist01 => {
            new.dns01.clone_from(&running.dns01);
        }
        ChallengeKind::TlsAlpn01 => new.tls_alpn01.clone_from(&running.tls_alpn01),
    }
}
