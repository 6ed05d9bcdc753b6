//! `certd run`: the long-running daemon's wiring.
//!
//! Tasks, all owned by one `TaskTracker` (named, so a shutdown that waits
//! can say for what) and stopped by one `CancellationToken`: the scheduler
//! (orders), the reaper (a pass every `reaper.interval`), the challenge
//! responders, the metrics listener, the control socket (one-shot commands
//! hand their work to the scheduler and the reaper through it, see
//! `crate::daemon::control`), the systemd notifier and the configuration watcher
//! (inotify on the file's directory, since editors replace files, plus
//! SIGHUP). systemd hears READY=1 once local start-up is done
//! (configuration, ledger, challenge listeners), before the CA is asked for
//! the account: with the CA down at boot, `systemctl start` would otherwise
//! hang and fail. RELOADING=1/READY=1 around a reload,
//! STOPPING=1 at shutdown (see `systemd`). What a reload changes, and what
//! waits for a restart, is `reload`'s typed comparison.

pub mod control;
mod reload;
pub mod schedule;
mod systemd;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acme::{AcmeAccount, AcmeHttp, error_chain};
use crate::config::{ChallengeKind, Config};
use crate::daemon::schedule::{Scheduler, failure_backoff};
use crate::hygiene::Reaper;
use crate::ledger::{EventKind, Ledger};
use crate::order::Context;
use crate::solver::{ChallengeSettings, Solvers};

use self::systemd::{Notifier, State};

/// How long file events are collected before the config is re-read (an
/// editor's save is several events).
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(200);

/// Runs the daemon until `shutdown` fires.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    crate::cli::ensure_dirs(&cfg)?;
    let store = Ledger::open(&cfg.db_path(), crate::clock::Clock::system()).await?;
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
    let solvers = Solvers::from_config(&cfg, &ALL_KINDS, &tasks.tracker, &shutdown)
        .await
        .context("cannot start the challenge solvers")?;
    // Registered before READY=1: until a handler exists SIGHUP kills the
    // process, and systemd (or a test) may send it the moment it hears READY.
    // Signals that arrive while the account loads wait for the watcher.
    let hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP");
            None
        }
    };
    notifier.notify(State::Ready);
    let started = Arc::new(cfg);
    let Some((account, cfg)) = load_account(started.clone(), &store, &shutdown).await else {
        notifier.notify(State::Stopping);
        tasks.stop(grace).await;
        store.close().await;
        return Ok(());
    };
    // The listeners started before the account; an edit read while the CA
    // was unreachable reaches them here.
    let cfg = if Arc::ptr_eq(&started, &cfg) {
        cfg
    } else {
        let failed = solvers
            .reconfigure(
                ChallengeSettings::of(&started),
                ChallengeSettings::of(&cfg),
                &ALL_KINDS,
                &tasks.tracker,
                &shutdown,
            )
            .await;
        if failed.is_empty() {
            cfg
        } else {
            // What runs is what the configuration in force says, as after
            // a reload that could not apply a section.
            let mut kept = (*cfg).clone();
            for (kind, e) in failed {
                tracing::error!(error = %e, "cannot apply the new {kind} settings; the running ones stay");
                keep_running(&mut kept, &started, kind);
            }
            Arc::new(kept)
        }
    };
    drop(started);
    let reaper = Reaper::new(store.clone(), account.clone(), cfg.reaper.clone());
    let (resumable, abandoned) =
        crate::order::recover(&reaper, |o| crate::cli::wants_same_names(&cfg, o)).await?;
    if resumable + abandoned > 0 {
        tracing::info!(resumable, abandoned, "recovered unfinished orders");
    }
    let ctx = Context {
        store: store.clone(),
        account,
        solvers,
        reaper: reaper.clone(),
        cert_dir: Arc::from(cfg.storage.cert_dir.as_path()),
        renew_remaining: cfg.daemon.renew_remaining,
        trusted_roots: cfg.acme.trusted_roots.clone(),
        mode: crate::order::RunMode::Daemon,
    };

    let metrics = match cfg.metrics_listen {
        Some(addr) => Some(
            Metrics::start(addr, &ctx, &tasks, &shutdown)
                .await
                .with_context(|| format!("cannot serve metrics on {addr}"))?,
        ),
        None => None,
    };
    let (reload_tx, reload_rx) = mpsc::channel(4);
    let (reaper_tx, reaper_rx) = watch::channel(ReaperTimes::of(&cfg));
    let (config_tx, config_rx) = watch::channel(cfg.clone());
    let (request_tx, request_rx) = mpsc::channel(16);
    let control = crate::daemon::control::Handles {
        ctx: ctx.clone(),
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
        tasks: tasks.clone(),
        shutdown: shutdown.clone(),
        notifier: notifier.clone(),
        restart_keys: Vec::new(),
    };
    let scheduler = Scheduler::new(ctx, cfg.clone(), shutdown.clone());
    tasks.spawn("scheduler", scheduler.run(reload_rx, request_rx));
    // Without it the daemon still works; one-shot commands then refuse,
    // naming the daemon's PID, as the state directory's lock makes them.
    if let Err(e) =
        crate::daemon::control::start(&cfg.storage.state_dir, control, &tasks.tracker, &shutdown)
    {
        tracing::error!(error = %e, "cannot serve the control socket; certd renew, revoke and reap cannot reach this daemon");
    }
    tasks.spawn("reaper", reaper_loop(reaper, reaper_rx, shutdown.clone()));
    tasks.spawn("config watcher", watch_config(reloader, hup));
    tracing::info!(certificates = cfg.certificates.len(), "certd running");
    shutdown.cancelled().await;
    notifier.notify(State::Stopping);
    tracing::info!("shutting down");
    // The scheduler is the one that takes the grace (its orders); later
    // reloads may have changed it.
    let grace = *tasks.grace.lock().unwrap_or_else(PoisonError::into_inner);
    tasks.stop(grace.unwrap_or(cfg.daemon.shutdown_grace)).await;
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

/// How long after `shutdown_grace` the daemon waits for its tasks before
/// it names the ones still running and exits without them. Below the 5 s
/// the unit's `TimeoutStopSec` leaves on top of the largest grace the
/// README recommends.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(3);

/// The daemon's tasks, by name: one `TaskTracker` owns them all (the
/// solvers and the metrics listener spawn theirs on it too), and the names
/// say which ones a shutdown still waits for.
#[derive(Clone, Default)]
struct Tasks {
    tracker: TaskTracker,
    running: Arc<Mutex<BTreeMap<u64, &'static str>>>,
    next_id: Arc<AtomicU64>,
    /// The `shutdown_grace` of the configuration last applied.
    grace: Arc<Mutex<Option<Duration>>>,
}

impl Tasks {
    fn spawn(&self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.running).insert(id, name);
        let done = Done {
            running: self.running.clone(),
            id,
        };
        self.tracker.spawn(async move {
            let _done = done;
            task.await;
        });
    }

    /// Waits for every task to end, at most `grace` plus
    /// [`SHUTDOWN_MARGIN`]; past that, logs which are still running and
    /// returns their names (the runtime drops them).
    async fn stop(&self, grace: Duration) -> Vec<&'static str> {
        self.tracker.close();
        if tokio::time::timeout(grace + SHUTDOWN_MARGIN, self.tracker.wait())
            .await
            .is_ok()
        {
            return Vec::new();
        }
        let named: Vec<&'static str> = lock(&self.running).values().copied().collect();
        let unnamed = self.tracker.len().saturating_sub(named.len());
        tracing::error!(
            tasks = ?named,
            listener_tasks = unnamed,
            grace_secs = grace.as_secs(),
            "tasks still running after the shutdown grace; exiting without them"
        );
        named
    }
}

/// Takes a finished task off [`Tasks::running`], however it ended.
struct Done {
    running: Arc<Mutex<BTreeMap<u64, &'static str>>>,
    id: u64,
}

impl Drop for Done {
    fn drop(&mut self) {
        lock(&self.running).remove(&self.id);
    }
}

/// A poisoned lock only means a panic elsewhere; the data is still valid.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The metrics listener, restartable on its own token when
/// `[metrics] listen` changes.
struct Metrics {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Metrics {
    async fn start(
        addr: SocketAddr,
        ctx: &Context,
        tasks: &Tasks,
        shutdown: &CancellationToken,
    ) -> std::io::Result<Self> {
        let stop = shutdown.child_token();
        crate::metrics::start(
            addr,
            ctx.store.clone(),
            ctx.account.http.clone(),
            &tasks.tracker,
            &stop,
        )
        .await?;
        Ok(Self { addr, stop })
    }
}

/// The reaper loop's settings that a reload may change.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ReaperTimes {
    interval: Duration,
    max_age: Duration,
}

impl ReaperTimes {
    fn of(cfg: &Config) -> Self {
        Self {
            interval: cfg.reaper.interval,
            max_age: cfg.reaper.pending_max_age,
        }
    }
}

/// Loads the account, retrying with backoff while the CA is unreachable
/// or refuses: a daemon must not die because the CA is down at boot.
/// Before each retry the configuration is read again, since the fix may be
/// an edit (a corrected EAB key file, CA bundle or directory URL) and the
/// watcher does not run yet; the one that worked is returned. A new
/// `state_dir` is not taken: the ledger is open already.
async fn load_account(
    mut cfg: Arc<Config>,
    store: &Ledger,
    shutdown: &CancellationToken,
) -> Option<(AcmeAccount, Arc<Config>)> {
    let mut failures = 0;
    loop {
        let attempt = async {
            let http = AcmeHttp::new(cfg.acme.ca_bundle.as_deref())?;
            AcmeAccount::load_or_create(&cfg.acme, &cfg.storage.state_dir, store, http).await
        };
        match attempt.await {
            Ok(account) => {
                if failures > 0 {
                    record(store, EventKind::CaReachable, None).await;
                }
                return Some((account, cfg));
            }
            Err(e) => {
                failures += 1;
                // For `certd status`: "CA unreachable since" the first
                // failure, and why.
                if failures == 1 {
                    record(store, EventKind::CaUnreachable, Some(&error_chain(&e))).await;
                }
                let delay =
                    failure_backoff(failures, Duration::from_secs(5), cfg.daemon.backoff_max);
                tracing::error!(error = %error_chain(&e), retry_in_secs = delay.as_secs(), "cannot load the ACME account");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return None,
                }
            }
        }
        match Config::load(&cfg.path) {
            Ok(new) if new == *cfg => {}
            Ok(new) if new.storage.state_dir != cfg.storage.state_dir => {
                tracing::warn!("storage.state_dir changed; it takes effect at the next restart");
            }
            Ok(new) => {
                tracing::info!("configuration re-read before the next attempt");
                cfg = Arc::new(new);
            }
            Err(e) => {
                tracing::error!(error = %e, "the new configuration is invalid; keeping the running one");
            }
        }
    }
}

/// Puts `running`'s `kind` section back into `new`, for a section whose
/// new settings the solvers could not take: the configuration in force
/// says what runs.
fn keep_running(new: &mut Config, running: &Config, kind: ChallengeKind) {
    match kind {
        ChallengeKind::Http01 => new.http01.clone_from(&running.http01),
        ChallengeKind::Dns01 | ChallengeKind::DnsPersist01 => {
            new.dns01.clone_from(&running.dns01);
        }
        ChallengeKind::TlsAlpn01 => new.tls_alpn01.clone_from(&running.tls_alpn01),
    }
}

/// Records a daemon event; the ledger is for `status`, so a failed write
/// is logged, not fatal.
async fn record(store: &Ledger, kind: EventKind, detail: Option<&str>) {
    if let Err(e) = store.event(kind, None, None, None, detail).await {
        tracing::warn!(error = %e, %kind, "cannot record an event in the ledger");
    }
}

/// A reaper pass every `reaper.interval`; sleeps in between. A reload that
/// changes the interval restarts the wait.
async fn reaper_loop(
    reaper: Reaper,
    mut times: watch::Receiver<ReaperTimes>,
    shutdown: CancellationToken,
) {
    loop {
        let ReaperTimes { interval, max_age } = *times.borrow_and_update();
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            changed = times.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            () = shutdown.cancelled() => return,
        }
        match reaper.pass(max_age, false, false, |_, _| {}).await {
            Ok(c) if c.examined > 0 => {
                tracing::info!(
                    examined = c.examined,
                    deactivated = c.deactivated,
                    held_back = c.held_back,
                    failed = c.failed,
                    "reaper pass"
                );
                crate::memory::release();
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "reaper pass failed"),
        }
    }
}

/// Re-reads the configuration when its content changes or on SIGHUP.
async fn watch_config(mut reloader: Reloader, mut hup: Option<tokio::signal::unix::Signal>) {
    let path = reloader.current.path.clone();
    let shutdown = reloader.shutdown.clone();
    let (tx, mut changed) = mpsc::channel::<()>(16);
    let _watcher = match watch_dir(&path, tx) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the configuration file; reload with SIGHUP");
            None
        }
    };
    loop {
        // Biased: once shutdown fires, no reload starts.
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            Some(()) = changed.recv() => {
                tokio::select! {
                    () = tokio::time::sleep(RELOAD_DEBOUNCE) => {}
                    () = shutdown.cancelled() => return,
                }
                while changed.try_recv().is_ok() {}
                tracing::info!("the configuration file changed: reloading");
            }
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reloading the configuration");
            }
        }
        reloader.notifier.notify(State::Reloading);
        let carry_on = tokio::select! {
            biased;
            () = shutdown.cancelled() => false,
            carry_on = reloader.reload() => carry_on,
        };
        if !carry_on {
            // Stopping: STOPPING=1 follows, not READY=1.
            return;
        }
        reloader.notifier.notify(State::Ready);
    }
}

/// What a reload changes and the parts of the running daemon it changes.
struct Reloader {
    /// The configuration the process started with: what restart-needed
    /// settings still run with.
    started: Arc<Config>,
    /// The configuration last applied.
    current: Arc<Config>,
    scheduler: mpsc::Sender<Arc<Config>>,
    reaper_times: watch::Sender<ReaperTimes>,
    /// What the control socket's commands see.
    config: watch::Sender<Arc<Config>>,
    metrics: Option<Metrics>,
    ctx: Context,
    tasks: Tasks,
    shutdown: CancellationToken,
    notifier: Notifier,
    /// The keys last reported as waiting for a restart.
    restart_keys: Vec<&'static str>,
}

impl Reloader {
    /// Reads the file and applies what changed; false once the scheduler
    /// is gone (shutdown).
    async fn reload(&mut self) -> bool {
        let mut new = match Config::load(&self.current.path) {
            Ok(new) => new,
            Err(e) => {
                tracing::error!(error = %e, "the new configuration is invalid; keeping the running one");
                return true;
            }
        };
        self.apply_solvers(&mut new).await;
        let new = Arc::new(new);
        self.report_restart_keys(reload::restart_keys(&self.started, &new))
            .await;
        let live = reload::live_changes(&self.current, &new);
        if live.is_empty() {
            tracing::info!("configuration reloaded; no setting the daemon applies live changed");
            return true;
        }
        if self.current.metrics_listen != new.metrics_listen {
            self.restart_metrics(new.metrics_listen).await;
        }
        self.ctx.reaper.set_config(new.reaper.clone());
        self.reaper_times.send_replace(ReaperTimes::of(&new));
        self.config.send_replace(new.clone());
        *lock(&self.tasks.grace) = Some(new.daemon.shutdown_grace);
        tracing::info!(
            changed = ?live,
            certificates = new.certificates.len(),
            "configuration reloaded"
        );
        self.current = new.clone();
        self.scheduler.send(new).await.is_ok()
    }

    /// Swaps in changed challenge settings. A section that cannot start
    /// (a port taken, a bad TSIG key) is logged and left as it runs in
    /// `new`, so the next reload tries again.
    async fn apply_solvers(&mut self, new: &mut Config) {
        let failed = self
            .ctx
            .solvers
            .reconfigure(
                ChallengeSettings::of(&self.current),
                ChallengeSettings::of(new),
                &ALL_KINDS,
                &self.tasks.tracker,
                &self.shutdown,
            )
            .await;
        for (kind, e) in failed {
            tracing::error!(error = %e, "cannot apply the new {kind} settings; the running ones stay");
            keep_running(new, &self.current, kind);
        }
    }

    /// Logs and records (for `certd status`) the keys that wait for a
    /// restart, when they differ from the last report.
    async fn report_restart_keys(&mut self, keys: Vec<&'static str>) {
        if keys == self.restart_keys {
            return;
        }
        let joined = keys.join(", ");
        if keys.is_empty() {
            tracing::info!("the settings that needed a restart are back to their running values");
        } else {
            tracing::warn!(keys = %joined, "changed settings take effect at the next restart");
        }
        if let Err(e) = self
            .ctx
            .store
            .event(EventKind::RestartNeeded, None, None, None, Some(&joined))
            .await
        {
            tracing::warn!(error = %e, "cannot record the restart-needed settings in the ledger");
        }
        self.restart_keys = keys;
    }

    /// Serves metrics on the new address (or stops); on failure the old
    /// listener keeps running.
    async fn restart_metrics(&mut self, addr: Option<SocketAddr>) {
        let Some(addr) = addr else {
            if let Some(old) = self.metrics.take() {
                old.stop.cancel();
                tracing::info!(addr = %old.addr, "metrics listener stopped");
            }
            return;
        };
        match Metrics::start(addr, &self.ctx, &self.tasks, &self.shutdown).await {
            Ok(new) => {
                if let Some(old) = self.metrics.replace(new) {
                    old.stop.cancel();
                }
                tracing::info!(%addr, "metrics listener moved");
            }
            Err(e) => {
                tracing::error!(%addr, error = %e, "cannot serve metrics on the new address; the old listener keeps running");
            }
        }
    }
}

fn watch_dir(path: &Path, tx: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let name = path.file_name().map(|n| n.to_owned());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && changes_content(&event.kind)
            && event.paths.iter().any(|p| p.file_name() == name.as_deref())
        {
            // A full channel already means "reload pending".
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// Whether a file event can change what the file says: a write, a file
/// created or renamed into place. Opens, reads, closes after reading and
/// metadata changes (`touch`, chmod) cannot; reacting to them made the
/// watcher's own read of the file trigger the next reload, forever.
fn changes_content(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    matches!(
        kind,
        EventKind::Create(_)
            | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Name(_) | ModifyKind::Any)
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_shutdown_names_the_tasks_that_outlive_the_grace() {
        let tasks = Tasks::default();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        tasks.spawn("obedient", async move { token.cancelled().await });
        tasks.spawn("stuck", std::future::pending());
        shutdown.cancel();
        // Zero grace: the wait is SHUTDOWN_MARGIN of real time.
        assert_eq!(tasks.stop(Duration::ZERO).await, ["stuck"]);
    }

    #[tokio::test]
    async fn a_clean_shutdown_names_none() {
        let tasks = Tasks::default();
        tasks.spawn("quick", async {});
        assert!(tasks.stop(Duration::ZERO).await.is_empty());
    }
}
