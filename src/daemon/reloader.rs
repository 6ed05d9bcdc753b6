//! Applying a reloaded configuration to the running daemon: what a reload
//! changes (challenge listeners, the metrics listener, the reaper's
//! settings, the certificates the scheduler plans, in fleet mode the
//! certificates this host installs and announces) and what waits for a
//! restart, which `config::diff`'s typed comparison says.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::app::Services;
use crate::app::cas::Cas;
use crate::app::fleet_hosts::HostTasks;
use crate::config::{Config, diff};
use crate::ledger::EventKind;
use crate::metrics::{FleetSources, Sources};
use crate::order::Context;
use crate::solver::ChallengeSettings;

use super::reaping::ReaperTimes;
use super::systemd::{Notifier, State};
use super::tasks::{Tasks, lock};
use super::{ALL_KINDS, keep_running};

/// What a reload changes and the parts of the running daemon it changes.
pub(crate) struct Reloader {
    /// The configuration the process started with: what restart-needed
    /// settings still run with.
    pub(crate) started: Arc<Config>,
    /// The configuration last applied.
    pub(crate) current: Arc<Config>,
    pub(crate) scheduler: mpsc::Sender<Arc<Config>>,
    pub(crate) reaper_times: watch::Sender<ReaperTimes>,
    /// What the control socket's commands see.
    pub(crate) config: watch::Sender<Arc<Config>>,
    pub(crate) metrics: Option<MetricsListener>,
    pub(crate) ctx: Context,
    /// Every CA's order context: a reload's reaper settings reach each.
    pub(crate) cas: Cas,
    pub(crate) services: Services,
    pub(crate) tasks: Tasks,
    pub(crate) shutdown: CancellationToken,
    pub(crate) notifier: Notifier,
    /// The keys last reported as waiting for a restart.
    pub(crate) restart_keys: Vec<String>,
    /// Fleet mode: this host's heartbeat, answers and distribution, built
    /// for the certificates of `current`.
    pub(crate) fleet_tasks: Arc<tokio::sync::Mutex<Option<HostTasks>>>,
}

impl Reloader {
    pub(crate) fn config_path(&self) -> &Path {
        &self.current.path
    }

    pub(crate) fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    pub(crate) fn notify(&self, state: State) {
        self.notifier.notify(state);
    }

    /// Reads the file and applies what changed; false once the scheduler
    /// is gone (shutdown).
    pub(crate) async fn reload(&mut self) -> bool {
        let mut new = match Config::load(&self.current.path) {
            Ok(new) => new,
            Err(e) => {
                tracing::error!(error = %e, "the new configuration is invalid; keeping the running one");
                return true;
            }
        };
        self.apply_solvers(&mut new).await;
        let new = Arc::new(new);
        let change = diff::Change::between(&self.started, &self.current, &new);
        self.report_restart_keys(change.restart).await;
        let live = change.live;
        if live.is_empty() {
            tracing::info!("configuration reloaded; no setting the daemon applies live changed");
            return true;
        }
        if self.current.metrics_listen != new.metrics_listen {
            self.restart_metrics(new.metrics_listen).await;
        }
        self.cas.apply_reaper_settings(&new);
        self.reaper_times.send_replace(ReaperTimes::of(&new));
        self.config.send_replace(new.clone());
        *lock(&self.tasks.grace) = Some(new.daemon.shutdown_grace);
        tracing::info!(
            changed = ?live,
            certificates = new.certificates.len(),
            "configuration reloaded"
        );
        if self.current.certificates != new.certificates || self.current.http01 != new.http01 {
            self.restart_fleet_tasks(&new).await;
        }
        self.current = new.clone();
        self.scheduler.send(new).await.is_ok()
    }

    /// Fleet mode: restarts this host's fleet tasks for `new`'s
    /// certificates (what distribution installs and reloads, the heartbeat's
    /// config hash and advertised responder). The old ones stop first, so
    /// no two install the same certificate at once.
    async fn restart_fleet_tasks(&mut self, new: &Config) {
        let mut slot = self.fleet_tasks.lock().await;
        let Some(old) = slot.take() else {
            return;
        };
        old.stop().await;
        crate::app::fleet_order::declare_definitions(&self.services, new).await;
        match HostTasks::start(&self.services, new, &self.shutdown) {
            Ok(tasks) => *slot = tasks,
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "fleet: cannot restart this host's fleet tasks; it neither installs published issuances nor beats its heartbeat until a restart"
            ),
        }
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
    async fn report_restart_keys(&mut self, keys: Vec<String>) {
        if keys == self.restart_keys {
            return;
        }
        let joined = keys.join(", ");
        if keys.is_empty() {
            tracing::info!("the settings that needed a restart are back to their running values");
        } else {
            tracing::warn!(keys = %joined, "changed settings take effect at the next restart");
        }
        let written = self
            .ctx
            .store
            .event(EventKind::RestartNeeded, None, None, None, Some(&joined))
            .await;
        let _logged = self
            .services
            .ledger_errors
            .note("record the restart-needed settings", written);
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
        let started = match crate::tinyhttp::bind(addr).await {
            Ok((listener, _)) => MetricsListener::start(
                listener,
                &self.ctx,
                &self.services,
                &self.tasks,
                &self.shutdown,
            ),
            Err(e) => Err(e),
        };
        match started {
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

/// The metrics listener, restartable on its own token when
/// `[metrics] listen` changes.
pub(crate) struct MetricsListener {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl MetricsListener {
    /// Serves `listener`, the caller's (bound at start, or for a new
    /// address at a reload).
    pub(crate) fn start(
        listener: tokio::net::TcpListener,
        ctx: &Context,
        services: &Services,
        tasks: &Tasks,
        shutdown: &CancellationToken,
    ) -> std::io::Result<Self> {
        let stop = shutdown.child_token();
        let sources = Sources {
            store: ctx.store.clone(),
            http: ctx.account.http.clone(),
            clock: services.clock.clone(),
            ledger_errors: services.ledger_errors.clone(),
            leases: services.leases.counters.clone(),
            fleet: services.fleet.as_ref().map(|f| FleetSources {
                db: f.db.clone(),
                answers: f.answers.clone(),
                host_id: f.holder.as_str().to_owned(),
                certs: started_certs(services),
            }),
        };
        let addr = crate::metrics::start(listener, sources, &tasks.tracker, &stop)?;
        Ok(Self { addr, stop })
    }
}

/// The certificates whose install lag the metrics show: those this host
/// started with (distribution installs those until a restart).
fn started_certs(services: &Services) -> Vec<String> {
    services
        .cfg
        .certificates
        .iter()
        .map(|c| c.name.as_str().to_owned())
        .collect()
}
