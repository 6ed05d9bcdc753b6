//! The configuration watcher: the file's directory watched with inotify
//! (editors replace files rather than write them), and the reload
//! requests the caller sends (the CLI sends one per SIGHUP). Each change
//! goes to the [`Reloader`], between systemd's RELOADING=1 and READY=1.

use std::path::Path;
use std::time::Duration;

use tokio::sync::mpsc;

use super::reloader::Reloader;
use super::systemd::State;

/// How long file events are collected before the config is re-read (an
/// editor's save is several events).
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(200);

/// Re-reads the configuration when its content changes or a reload is
/// requested (SIGHUP).
pub(crate) async fn watch_config(mut reloader: Reloader, mut requests: mpsc::Receiver<()>) {
    let path = reloader.config_path().to_owned();
    let shutdown = reloader.shutdown().clone();
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
            Some(()) = requests.recv() => {
                tracing::info!("SIGHUP: reloading the configuration");
            }
        }
        reloader.notify(State::Reloading);
        let carry_on = tokio::select! {
            biased;
            () = shutdown.cancelled() => false,
            carry_on = reloader.reload() => carry_on,
        };
        if !carry_on {
            // Stopping: STOPPING=1 follows, not READY=1.
            return;
        }
        reloader.notify(State::Ready);
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
            && changes_content(event.kind)
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
fn changes_content(kind: notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    matches!(
        kind,
        EventKind::Create(_)
            | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Name(_) | ModifyKind::Any)
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    )
}
