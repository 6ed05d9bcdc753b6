//! `certd run`: the daemon's process. Here the signals are wired (SIGTERM
//! and SIGINT stop it, SIGHUP reloads), the sockets bound and the ledger
//! watched; `crate::daemon::run` does the rest.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::app::Services;
use crate::clock::Clock;
use crate::config::Config;
use crate::daemon::Listeners;
use crate::ledger::{FileIdentity, LedgerError};

pub(super) async fn run_daemon(cfg: Config, clock: Clock) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    let reload = wire_signals(&shutdown)?;
    let metrics = match cfg.metrics_listen {
        Some(addr) => Some(
            crate::tinyhttp::bind(addr)
                .await
                .map(|(listener, _)| listener)
                .with_context(|| format!("cannot serve metrics on {addr}"))?,
        ),
        None => None,
    };
    let services = Services::open(cfg, clock).await?;
    let db = services.cfg.db_path();
    let identity = FileIdentity::of(&db).with_context(|| format!("ledger {}", db.display()))?;
    let watcher = tokio::spawn(watch_ledger(db, identity, shutdown.clone()));
    let listeners = Listeners { metrics, reload };
    let result = crate::daemon::run(services, listeners, shutdown).await;
    watcher.abort();
    if let Ok(Some(gone)) = watcher.await {
        return Err(gone.into());
    }
    result?;
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM and SIGINT cancel `shutdown`; each SIGHUP becomes a reload
/// request on the returned channel. Registered before the daemon starts:
/// until a handler exists SIGHUP kills the process, and systemd (or a
/// test) may send it the moment it hears READY=1. A SIGHUP that arrives
/// while the daemon still loads its account waits for the watcher.
fn wire_signals(shutdown: &CancellationToken) -> anyhow::Result<mpsc::Receiver<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
        trigger.cancel();
    });
    let (tx, rx) = mpsc::channel(4);
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            let stop = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        Some(()) = hup.recv() => {
                            // A full channel already means "reload pending".
                            let _ = tx.try_send(());
                        }
                    }
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP"),
    }
    Ok(rx)
}

/// Stops the daemon (by `shutdown`) when its ledger file is deleted or
/// replaced, and returns why: SQLite would otherwise go on writing to an
/// unlinked file, and everything learnt since would be lost at the next
/// start. inotify on the state directory, so an idle daemon never wakes
/// for it.
async fn watch_ledger(
    path: PathBuf,
    identity: FileIdentity,
    shutdown: CancellationToken,
) -> Option<LedgerError> {
    use notify::Watcher as _;
    let dir = path.parent().unwrap_or(Path::new(".")).to_owned();
    let name = path.file_name().map(ToOwned::to_owned);
    let (tx, mut changed) = mpsc::channel::<()>(4);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && event.paths.iter().any(|p| p.file_name() == name.as_deref())
        {
            // A full channel already means "look again".
            let _ = tx.try_send(());
        }
    })
    .and_then(|mut w| {
        w.watch(&dir, notify::RecursiveMode::NonRecursive)
            .map(|()| w)
    });
    let _watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the state directory: a deleted ledger goes unnoticed until the next start");
            return None;
        }
    };
    // The file may have gone before the watch began.
    loop {
        if let Err(gone) = identity.check(&path) {
            tracing::error!(error = %gone, "the ledger is gone; stopping");
            shutdown.cancel();
            return Some(gone);
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            Some(()) = changed.recv() => {}
        }
    }
}
