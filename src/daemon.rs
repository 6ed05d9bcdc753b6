//! `certd run`: the long-running daemon's wiring.
//!
//! Tasks, all owned by one `TaskTracker` and stopped by one
//! `CancellationToken`: the scheduler (orders), the reaper (a pass every
//! `reaper.interval`), the http-01 responder, and the configuration
//! watcher (inotify on the file's directory, since editors replace files,
//! plus SIGHUP). systemd hears READY=1 once the account is loaded and work
//! is scheduled, RELOADING=1/READY=1 around a reload, STOPPING=1 at
//! shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acme::{AcmeAccount, AcmeHttp, error_chain};
use crate::config::{ChallengeKind, Config};
use crate::driver::Context;
use crate::reaper::Reaper;
use crate::scheduler::{Scheduler, failure_backoff};
use crate::solver::Solvers;
use crate::store::Store;

/// How long file events are collected before the config is re-read (an
/// editor's save is several events).
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(200);

/// Runs the daemon until `shutdown` fires.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    crate::cli::ensure_dirs(&cfg)?;
    let store = Store::open(&cfg.db_path()).await?;
    let tracker = TaskTracker::new();
    let cfg = Arc::new(cfg);

    let Some(account) = load_account(&cfg, &store, &shutdown).await else {
        store.close().await;
        return Ok(());
    };
    // Certificates may be added by a reload: serve every configured kind.
    let needed = [
        ChallengeKind::Http01,
        ChallengeKind::Dns01,
        ChallengeKind::TlsAlpn01,
    ];
    let solvers = Solvers::from_config(&cfg, &needed, &tracker, &shutdown)
        .await
        .context("cannot start the challenge solvers")?;
    let reaper = Reaper::new(store.clone(), account.clone(), cfg.reaper.clone());
    let (resumable, abandoned) = reaper
        .recover(|o| crate::cli::wants_same_names(&cfg, o))
        .await?;
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
    };

    if let Some(addr) = cfg.metrics_listen {
        crate::metrics::start(
            addr,
            store.clone(),
            ctx.account.http.clone(),
            &tracker,
            &shutdown,
        )
        .await
        .with_context(|| format!("cannot serve metrics on {addr}"))?;
    }
    let (reload_tx, reload_rx) = mpsc::channel(4);
    let scheduler = Scheduler::new(ctx, cfg.clone(), shutdown.clone());
    tracker.spawn(scheduler.run(reload_rx));
    tracker.spawn(reaper_loop(
        reaper,
        cfg.reaper.interval,
        cfg.reaper.pending_max_age,
        shutdown.clone(),
    ));
    // Registered before READY=1: until a handler exists SIGHUP kills the
    // process, and systemd (or a test) may send it the moment it hears READY.
    let hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP");
            None
        }
    };
    tracker.spawn(watch_config(
        cfg.path.clone(),
        cfg.clone(),
        reload_tx,
        hup,
        shutdown.clone(),
    ));

    sd_notify("READY=1");
    tracing::info!(certificates = cfg.certificates.len(), "certd running");
    shutdown.cancelled().await;
    sd_notify("STOPPING=1");
    tracing::info!("shutting down");
    tracker.close();
    tracker.wait().await;
    store.close().await;
    Ok(())
}

/// Loads the account, retrying with backoff while the CA is unreachable:
/// a daemon must not die because the CA is down at boot.
async fn load_account(
    cfg: &Config,
    store: &Store,
    shutdown: &CancellationToken,
) -> Option<AcmeAccount> {
    let mut failures = 0;
    loop {
        let attempt = async {
            let http = AcmeHttp::new(cfg.acme.ca_bundle.as_deref())?;
            AcmeAccount::load_or_create(&cfg.acme, &cfg.storage.state_dir, store, http).await
        };
        match attempt.await {
            Ok(account) => return Some(account),
            Err(e) => {
                failures += 1;
                let delay =
                    failure_backoff(failures, Duration::from_secs(5), cfg.daemon.backoff_max);
                tracing::error!(error = %error_chain(&e), retry_in_secs = delay.as_secs(), "cannot load the ACME account");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return None,
                }
            }
        }
    }
}

/// A reaper pass every `interval`; sleeps in between.
async fn reaper_loop(
    reaper: Reaper,
    interval: Duration,
    max_age: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
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

/// Re-reads the configuration when its file changes or on SIGHUP. An
/// invalid file is logged (with its line numbers) and the running
/// configuration kept.
async fn watch_config(
    path: PathBuf,
    mut current: Arc<Config>,
    reloads: mpsc::Sender<Arc<Config>>,
    mut hup: Option<tokio::signal::unix::Signal>,
    shutdown: CancellationToken,
) {
    let (tx, mut changed) = mpsc::channel::<()>(16);
    let _watcher = match watch_dir(&path, tx) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the configuration file; reload with SIGHUP");
            None
        }
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            Some(()) = changed.recv() => {
                tokio::time::sleep(RELOAD_DEBOUNCE).await;
                while changed.try_recv().is_ok() {}
            }
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reloading the configuration");
            }
        }
        sd_notify("RELOADING=1");
        match Config::load(&path) {
            Ok(new) if same_config_text(&current, &new) => {}
            Ok(new) => {
                if restart_needed(&current, &new) {
                    tracing::warn!(
                        "[acme], [storage], [http01] and [dns01] changes take effect at the next restart"
                    );
                }
                let new = Arc::new(new);
                tracing::info!(
                    certificates = new.certificates.len(),
                    "configuration reloaded"
                );
                current = new.clone();
                if reloads.send(new).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "the new configuration is invalid; keeping the running one")
            }
        }
        sd_notify("READY=1");
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
            && event.paths.iter().any(|p| p.file_name() == name.as_deref())
        {
            // A full channel already means "reload pending".
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// Whether a reload changes nothing the scheduler sees.
fn same_config_text(a: &Config, b: &Config) -> bool {
    a.certificates == b.certificates && a.daemon == b.daemon
}

/// Settings the running daemon cannot swap in place.
fn restart_needed(a: &Config, b: &Config) -> bool {
    a.acme.directory != b.acme.directory
        || a.storage.state_dir != b.storage.state_dir
        || a.storage.cert_dir != b.storage.cert_dir
        || a.http01.as_ref().map(|h| (h.listen, &h.webroot))
            != b.http01.as_ref().map(|h| (h.listen, &h.webroot))
        || a.dns01 != b.dns01
}

/// Sends a state line to systemd's notification socket, if there is one
/// (Type=notify). Failure is not fatal: systemd would time out and say so.
pub fn sd_notify(state: &str) {
    use std::os::unix::net::UnixDatagram;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), Path::new(&path))
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, state, "sd_notify failed");
    }
}
