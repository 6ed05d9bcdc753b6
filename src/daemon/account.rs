//! The ACME account at the daemon's start: retried with backoff while the
//! CA is unreachable or refuses, since a daemon must not die because the
//! CA is down at boot.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::acme::{AcmeAccount, error_chain};
use crate::app::Services;
use crate::app::backoff::failure_backoff;
use crate::config::{CaName, Config};
use crate::ledger::EventKind;

/// Loads the account, retrying with backoff while the CA is unreachable
/// or refuses: a daemon must not die because the CA is down at boot.
/// Before each retry the configuration is read again, since the fix may be
/// an edit (a corrected EAB key file, CA bundle or directory URL) and the
/// watcher does not run yet; the one that worked is returned. A new
/// `state_dir` is not taken: the ledger is open already.
pub(crate) async fn load_account(
    mut cfg: Arc<Config>,
    services: &Services,
    shutdown: &CancellationToken,
) -> Option<(AcmeAccount, CaName, Arc<Config>)> {
    let mut failures = 0;
    loop {
        match services.first_account(&cfg).await {
            Ok((account, ca)) => {
                if failures > 0 {
                    record(services, EventKind::CaReachable, None).await;
                }
                return Some((account, ca, cfg));
            }
            Err(e) => {
                failures += 1;
                // For `certd status`: "CA unreachable since" the first
                // failure, and why.
                if failures == 1 {
                    record(services, EventKind::CaUnreachable, Some(&error_chain(&e))).await;
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

/// Records a daemon event; the ledger is for `status`, so a failed write
/// is logged and counted, not fatal.
async fn record(services: &Services, kind: EventKind, detail: Option<&str>) {
    let written = services.store.event(kind, None, None, None, detail).await;
    let _logged = services.ledger_errors.note(kind.as_str(), written);
}
