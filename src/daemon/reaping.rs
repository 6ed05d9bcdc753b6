//! The reaper's loop in the daemon: a pass every `reaper.interval`, with
//! the settings a reload may change. In fleet mode a pass runs only under
//! the account's reaper lease (`reaper:<account>`), so one host of the
//! fleet reaps an account at a time.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::app::Services;
use crate::app::lease::reaper_pass;
use crate::config::Config;
use crate::hygiene::Reaper;

/// The reaper loop's settings that a reload may change.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ReaperTimes {
    interval: Duration,
    max_age: Duration,
}

impl ReaperTimes {
    pub(crate) fn of(cfg: &Config) -> Self {
        Self {
            interval: cfg.reaper.interval,
            max_age: cfg.reaper.pending_max_age,
        }
    }
}

/// A reaper pass every `reaper.interval`; sleeps in between. A reload that
/// changes the interval restarts the wait.
pub(crate) async fn reaper_loop(
    reaper: Reaper,
    services: Services,
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
        match reaper_pass(&services, &reaper, max_age).await {
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
