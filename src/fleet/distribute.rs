//! Every host installs: the leaseholder publishes an issuance (the chain,
//! and the private key sealed under the fleet key) inside its fenced
//! transaction and announces it on [`ISSUED_CHANNEL`]; every host pulls the
//! newest issuance of each certificate it serves, unseals and verifies it
//! as if its own order had produced it, installs it with the atomic
//! installer into its own cert dir, runs its own reload commands, and
//! records the result in `installs`.
//!
//! Notifications are only a hint: one sent while a host's LISTEN
//! connection is down is lost. So a host also reconciles (compares what is
//! on its disk with the newest issuance of each certificate, and pulls
//! what differs) when its listener (re)connects and at a fixed interval.
//! While the database is unreachable nothing is pulled and nothing on
//! disk changes.
//!
//! A host whose fleet key differs from the publisher's installs nothing:
//! the error names both key ids and is recorded for that host.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ring::rand::SystemRandom;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::db::{DbError, FleetDb, ISSUED_CHANNEL, InstallRecord, Issued};
use super::lease::{FencedTx, HolderId, LeaseError};
use super::seal::{FleetKey, SealContext, SealError};
use super::task::{FleetTask, cancelled_within};
use crate::clock::Clock;
use crate::config::TrustedRoots;
use crate::install::{
    CertInfo, InstallError, Issuance, ReloadOutcome, install, installed, run_reloads,
};

/// A certificate this host serves: the names it must carry and the
/// commands that make this host's servers read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertTarget {
    pub domains: Vec<String>,
    pub reload: Vec<String>,
}

/// One host's side of distribution: who it is, where it installs, the
/// fleet key, and the certificates it serves.
#[derive(Debug)]
pub struct FleetHost {
    host_id: HolderId,
    cert_dir: PathBuf,
    key: FleetKey,
    certs: BTreeMap<String, CertTarget>,
    roots: Option<TrustedRoots>,
    reload_timeout: Duration,
    clock: Clock,
}

/// What a pull did.
#[derive(Debug, Clone)]
pub enum Pulled {
    /// No host has published this certificate yet.
    NothingPublished,
    /// The newest issuance is already installed here.
    UpToDate { serial: String },
    /// The newest issuance was installed now.
    Installed {
        serial: String,
        reloads: Vec<ReloadOutcome>,
    },
}

/// Why this host did not install an issuance. Everything but
/// [`PullError::Db`] and [`PullError::NotServed`] is also recorded in
/// `installs` for this host.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("certificate {cert} is not served by this host")]
    NotServed { cert: String },
    #[error("certificate {cert} (serial {serial}): cannot unseal its private key: {source}")]
    Unseal {
        cert: String,
        serial: String,
        #[source]
        source: SealError,
    },
    #[error("certificate {cert} (serial {serial}): the unsealed private key is not PEM text")]
    KeyNotPem { cert: String, serial: String },
    #[error("certificate {cert} (serial {serial}): the published issuance is refused: {source}")]
    Verify {
        cert: String,
        serial: String,
        #[source]
        source: InstallError,
    },
    #[error(
        "certificate {cert}: the issuance is stored as serial {stored}, but its certificate has serial {actual}"
    )]
    SerialMismatch {
        cert: String,
        stored: String,
        actual: String,
    },
    #[error("certificate {cert} (serial {serial}): cannot install it: {source}")]
    Install {
        cert: String,
        serial: String,
        #[source]
        source: InstallError,
    },
    #[error("certificate {cert}: the install was interrupted: {cause}")]
    Interrupted { cert: String, cause: String },
}

/// Why an issuance could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("certificate {cert}: the chain to publish has no usable certificate: {cause}")]
    Chain { cert: String, cause: String },
    #[error("certificate {cert} (serial {serial}): cannot seal its private key: {source}")]
    Seal {
        cert: String,
        serial: String,
        #[source]
        source: SealError,
    },
    #[error(transparent)]
    Lease(#[from] LeaseError),
}

/// How often a host reconciles, and how soon it retries after the
/// database failed it.
#[derive(Debug, Clone, Copy)]
pub struct DistributeOptions {
    pub reconcile_every: Duration,
    pub retry_after: Duration,
}

/// What the distribution task has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DistributeStatus {
    /// The LISTEN connection is up.
    pub listening: bool,
    /// Times the LISTEN connection was established.
    pub connects: u64,
    /// Failed attempts to establish it.
    pub connect_failures: u64,
    /// Reconcile passes that read the database (whatever they installed).
    pub reconciles: u64,
    /// Reconcile passes the database failed.
    pub failed_reconciles: u64,
    /// Issuances installed by a reconcile pass.
    pub installed_by_reconcile: u64,
    /// Issuances installed on a notification.
    pub installed_on_notify: u64,
    /// Issuances this host refused or could not install.
    pub failures: u64,
    pub last_error: Option<String>,
}

impl FencedTx {
    /// Publishes an issuance of this lease's certificate: stores the chain
    /// and the private key sealed under `key` (associated data: the
    /// certificate's name and serial), and announces it on
    /// [`ISSUED_CHANNEL`], delivered when the transaction commits. The
    /// serial is read from the chain's leaf, so a row cannot name another
    /// certificate's serial. Returns the serial.
    pub async fn publish_issuance(
        &mut self,
        key: &FleetKey,
        rng: &SystemRandom,
        fullchain_pem: &str,
        key_pem: &str,
    ) -> Result<String, PublishError> {
        let cert = self.cert_name()?.to_owned();
        let serial = leaf_info(fullchain_pem)
            .map_err(|cause| PublishError::Chain {
                cert: cert.clone(),
                cause,
            })?
            .serial;
        let context = SealContext::CertificateKey {
            cert_name: cert.clone(),
            serial: serial.clone(),
        };
        let sealed = key
            .seal(rng, &context, key_pem.as_bytes())
            .map_err(|source| PublishError::Seal {
                cert,
                serial: serial.clone(),
                source,
            })?;
        self.insert_issued(&serial, fullchain_pem, &sealed).await?;
        self.notify_issued().await?;
        Ok(serial)
    }
}

impl FleetHost {
    /// A host with no certificates yet; reload commands get 60 s each and
    /// the chain ends at the last certificate the CA sent.
    pub fn new(host_id: HolderId, cert_dir: PathBuf, key: FleetKey) -> Self {
        Self {
            host_id,
            cert_dir,
            key,
            certs: BTreeMap::new(),
            roots: None,
            reload_timeout: Duration::from_secs(60),
            clock: Clock::system(),
        }
    }

    /// Serves certificate `name`.
    pub fn with_cert(mut self, name: &str, target: CertTarget) -> Self {
        self.certs.insert(name.to_owned(), target);
        self
    }

    /// Requires chains to end at one of `roots` (`[acme] trusted_roots`).
    pub fn with_roots(mut self, roots: TrustedRoots) -> Self {
        self.roots = Some(roots);
        self
    }

    pub fn with_reload_timeout(mut self, timeout: Duration) -> Self {
        self.reload_timeout = timeout;
        self
    }

    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    pub fn host_id(&self) -> &HolderId {
        &self.host_id
    }

    /// Pulls the newest issuance of `cert` if this host does not have it
    /// installed; records the outcome.
    pub async fn pull(&self, db: &FleetDb, cert: &str) -> Result<Pulled, PullError> {
        let (name, target) =
            self.certs
                .get_key_value(cert)
                .ok_or_else(|| PullError::NotServed {
                    cert: cert.to_owned(),
                })?;
        let Some(issued) = db.newest_issued(std::slice::from_ref(name)).await?.pop() else {
            return Ok(Pulled::NothingPublished);
        };
        let recorded = self.recorded(db).await?;
        let key = (issued.cert_name.clone(), issued.serial.clone());
        self.sync(db, target, &issued, recorded.contains(&key))
            .await
    }

    /// Compares every served certificate on this host's disk with its
    /// newest issuance and pulls what differs. Fails only if the database
    /// cannot be read; each certificate's own outcome is in the list.
    pub async fn reconcile(
        &self,
        db: &FleetDb,
    ) -> Result<Vec<(String, Result<Pulled, PullError>)>, DbError> {
        let names: Vec<String> = self.certs.keys().cloned().collect();
        let newest = db.newest_issued(&names).await?;
        let recorded = self.recorded(db).await?;
        let mut outcomes = Vec::with_capacity(newest.len());
        for issued in newest {
            // newest_issued returns only the names asked for.
            let Some(target) = self.certs.get(&issued.cert_name) else {
                continue;
            };
            let key = (issued.cert_name.clone(), issued.serial.clone());
            let outcome = self
                .sync(db, target, &issued, recorded.contains(&key))
                .await;
            outcomes.push((issued.cert_name, outcome));
        }
        Ok(outcomes)
    }

    /// Runs distribution for this host until `cancel` fires: LISTEN on
    /// [`ISSUED_CHANNEL`] and pull what is announced; reconcile whenever
    /// the listener (re)connects and every `reconcile_every`.
    pub fn distribute(
        self: Arc<Self>,
        db: FleetDb,
        opts: DistributeOptions,
        cancel: &CancellationToken,
    ) -> FleetTask<DistributeStatus> {
        FleetTask::spawn(cancel, move |cancel, status| async move {
            self.distribute_loop(&db, opts, &cancel, &status).await;
            status.send_modify(|s| s.listening = false);
        })
    }

    async fn distribute_loop(
        &self,
        db: &FleetDb,
        opts: DistributeOptions,
        cancel: &CancellationToken,
        status: &watch::Sender<DistributeStatus>,
    ) {
        loop {
            let connect = tokio::select! {
                () = cancel.cancelled() => return,
                r = db.listen(ISSUED_CHANNEL) => r,
            };
            let mut listener = match connect {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::warn!(error = %e, "fleet: cannot listen for issuances; retrying");
                    status.send_modify(|s| {
                        s.connect_failures += 1;
                        s.last_error = Some(e.to_string());
                    });
                    if cancelled_within(cancel, opts.retry_after).await {
                        return;
                    }
                    continue;
                }
            };
            status.send_modify(|s| {
                s.listening = true;
                s.connects += 1;
            });
            // Whatever was announced while no listener was up is lost:
            // catch up now.
            // Installs and reloads are cut short when cancelled: the
            // installer's swap is atomic, and a dropped reload command is
            // killed with its process group.
            let Some(wait) = until_cancelled(cancel, self.reconcile_pass(db, opts, status)).await
            else {
                return;
            };
            let mut next = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep_until(next) => {
                        let Some(wait) = until_cancelled(cancel, self.reconcile_pass(db, opts, status)).await
                        else {
                            return;
                        };
                        next = tokio::time::Instant::now() + wait;
                    }
                    n = listener.next() => match n {
                        Some(cert) => {
                            let pull = self.pull_announced(db, &cert, status);
                            if until_cancelled(cancel, pull).await.is_none() {
                                return;
                            }
                        }
                        None => break,
                    },
                }
            }
            tracing::warn!("fleet: the LISTEN connection for issuances was lost; reconnecting");
            status.send_modify(|s| s.listening = false);
        }
    }

    /// One reconcile pass; returns when the next one is due (sooner after
    /// the database failed it).
    async fn reconcile_pass(
        &self,
        db: &FleetDb,
        opts: DistributeOptions,
        status: &watch::Sender<DistributeStatus>,
    ) -> Duration {
        match self.reconcile(db).await {
            Ok(outcomes) => {
                status.send_modify(|s| s.reconciles += 1);
                for (_, outcome) in outcomes {
                    count(status, outcome, |s| &mut s.installed_by_reconcile);
                }
                opts.reconcile_every
            }
            Err(e) => {
                tracing::warn!(error = %e, "fleet: reconcile failed; retrying");
                status.send_modify(|s| {
                    s.failed_reconciles += 1;
                    s.last_error = Some(e.to_string());
                });
                opts.retry_after
            }
        }
    }

    async fn pull_announced(
        &self,
        db: &FleetDb,
        cert: &str,
        status: &watch::Sender<DistributeStatus>,
    ) {
        // Another host may serve certificates this one does not.
        if !self.certs.contains_key(cert) {
            return;
        }
        count(status, self.pull(db, cert).await, |s| {
            &mut s.installed_on_notify
        });
    }

    /// The `(certificate, serial)` pairs this host has recorded installing.
    async fn recorded(&self, db: &FleetDb) -> Result<HashSet<(String, String)>, DbError> {
        Ok(db
            .installed_by(self.host_id.as_str())
            .await?
            .into_iter()
            .collect())
    }

    /// Brings `issued` onto this host unless it is there already, and
    /// records the outcome (once, for an issuance already in place).
    async fn sync(
        &self,
        db: &FleetDb,
        target: &CertTarget,
        issued: &Issued,
        recorded: bool,
    ) -> Result<Pulled, PullError> {
        let (cert, serial) = (&issued.cert_name, &issued.serial);
        if self.serial_on_disk(cert).await.as_ref() == Some(serial) {
            if !recorded {
                // Installed earlier, but the record did not reach the
                // database (it went down in between).
                self.record(
                    db,
                    issued,
                    Ok("installed earlier; reload outcome not recorded".into()),
                )
                .await?;
            }
            return Ok(Pulled::UpToDate {
                serial: serial.clone(),
            });
        }
        match self.install(target, issued).await {
            Ok(reloads) => {
                tracing::info!(cert = %cert, serial = %serial, "fleet: installed the published issuance");
                self.record(db, issued, Ok(reload_summary(&reloads)))
                    .await?;
                Ok(Pulled::Installed {
                    serial: serial.clone(),
                    reloads,
                })
            }
            Err(e) => {
                tracing::warn!(cert = %cert, serial = %serial, error = %e, "fleet: not installing the published issuance");
                if let Err(record) = self.record(db, issued, Err(e.to_string())).await {
                    tracing::warn!(cert = %cert, error = %record, "fleet: cannot record the failed install");
                }
                Err(e)
            }
        }
    }

    async fn record(
        &self,
        db: &FleetDb,
        issued: &Issued,
        result: Result<String, String>,
    ) -> Result<(), DbError> {
        db.record_install(&InstallRecord {
            host_id: self.host_id.as_str().to_owned(),
            cert_name: issued.cert_name.clone(),
            serial: issued.serial.clone(),
            result,
        })
        .await
    }

    /// Unseals, verifies, installs and reloads.
    async fn install(
        &self,
        target: &CertTarget,
        issued: &Issued,
    ) -> Result<Vec<ReloadOutcome>, PullError> {
        let (cert, serial) = (issued.cert_name.clone(), issued.serial.clone());
        let context = SealContext::CertificateKey {
            cert_name: cert.clone(),
            serial: serial.clone(),
        };
        let key = self
            .key
            .unseal(&context, &issued.sealed_key)
            .map_err(|source| PullError::Unseal {
                cert: cert.clone(),
                serial: serial.clone(),
                source,
            })?;
        let key_pem = String::from_utf8(key).map_err(|_| PullError::KeyNotPem {
            cert: cert.clone(),
            serial: serial.clone(),
        })?;
        // The same checks as an issuance from this host's own order: the
        // names, the key against the certificate, the chain.
        let record = format!("{key_pem}{}", issued.fullchain_pem);
        let issuance =
            Issuance::from_record(&record, &target.domains, self.roots.as_ref(), &self.clock)
                .map_err(|source| PullError::Verify {
                    cert: cert.clone(),
                    serial: serial.clone(),
                    source,
                })?;
        if issuance.info.serial != serial {
            return Err(PullError::SerialMismatch {
                cert,
                stored: serial,
                actual: issuance.info.serial.clone(),
            });
        }
        let (dir, name, clock) = (self.cert_dir.clone(), cert.clone(), self.clock.clone());
        tokio::task::spawn_blocking(move || install(&dir, &name, &issuance, &clock))
            .await
            .map_err(|e| PullError::Interrupted {
                cert: cert.clone(),
                cause: e.to_string(),
            })?
            .map_err(|source| PullError::Install {
                cert: cert.clone(),
                serial,
                source,
            })?;
        Ok(run_reloads(&target.reload, self.reload_timeout, &cert, &self.cert_dir).await)
    }

    /// The serial of what is installed for `cert` on this host's disk.
    async fn serial_on_disk(&self, cert: &str) -> Option<String> {
        let (dir, name) = (self.cert_dir.clone(), cert.to_owned());
        tokio::task::spawn_blocking(move || installed(&dir, &name))
            .await
            .ok()
            .flatten()
            .map(|info| info.serial)
    }
}

/// Runs `work` unless `cancel` fires first (`None`).
async fn until_cancelled<T>(
    cancel: &CancellationToken,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        () = cancel.cancelled() => None,
        done = work => Some(done),
    }
}

/// Counts one pull's outcome; `installed` picks the counter by trigger.
fn count(
    status: &watch::Sender<DistributeStatus>,
    outcome: Result<Pulled, PullError>,
    installed: impl FnOnce(&mut DistributeStatus) -> &mut u64,
) {
    match outcome {
        Ok(Pulled::Installed { .. }) => status.send_modify(|s| *installed(s) += 1),
        Ok(Pulled::NothingPublished | Pulled::UpToDate { .. }) => {}
        Err(e) => status.send_modify(|s| {
            s.failures += 1;
            s.last_error = Some(e.to_string());
        }),
    }
}

/// The reload commands' outcomes as `installs.reload_result` keeps them,
/// for every host's install (the leaseholder's own included).
pub(crate) fn reload_summary(outcomes: &[ReloadOutcome]) -> String {
    if outcomes.is_empty() {
        return "no reload commands".into();
    }
    outcomes
        .iter()
        .map(|o| {
            let verdict = if o.ok { "ok" } else { "failed" };
            format!("{}: {verdict}: {}", o.command, o.detail)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The facts of a PEM chain's first certificate.
fn leaf_info(fullchain_pem: &str) -> Result<CertInfo, String> {
    let leaf = CertificateDer::pem_slice_iter(fullchain_pem.as_bytes())
        .next()
        .ok_or("no certificate in it")?
        .map_err(|e| format!("not PEM: {e}"))?;
    CertInfo::parse(&leaf)
}
