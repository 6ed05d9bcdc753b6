//! Fleet mode's services: the fleet's database, the key that seals what
//! leaves the host, and this host's identity in the fleet, opened once
//! from `[fleet]` and shared by the ledger, the leases and distribution.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use ring::rand::SystemRandom;
use tokio_util::sync::CancellationToken;

use crate::acme::{
    AcmeAccount, AcmeHttp, SetupError, credentials_path, parse_credentials, read_credentials,
    register, write_credentials,
};
use crate::config::{AcmeConfig, Config, FleetConfig};
use crate::fleet::{
    DbOptions, FleetAnswers, FleetDb, FleetKey, HolderId, Lease, LeaseName, LeaseTiming,
    account_key_context,
};
use crate::ledger::Ledger;

/// How long before its lease could end a holder stops sending: a third
/// of the renewal interval, at most 2 s, so that a host that has not
/// renewed in time is silent before any peer can claim.
fn margin(ttl: Duration) -> Duration {
    (ttl / 9).min(Duration::from_secs(2))
}

/// Fleet mode cannot start: its key file, host id, lease ttl or database
/// is unusable. Like a configuration error, nothing works until it is
/// fixed, so the command line exits with 2.
#[derive(Debug, thiserror::Error)]
#[error("fleet mode cannot start")]
pub(crate) struct FleetUnusable(#[source] Box<dyn std::error::Error + Send + Sync + 'static>);

/// What fleet mode adds to [`Services`](super::Services).
#[derive(Debug)]
pub(crate) struct Fleet {
    pub(crate) db: FleetDb,
    pub(crate) key: FleetKey,
    /// This host's name in the fleet: the holder of the leases it takes.
    pub(crate) holder: HolderId,
    pub(crate) timing: LeaseTiming,
    pub(crate) cfg: FleetConfig,
    /// The fleet's http-01 answers as this host serves them (its responder
    /// asks them for tokens another host presented; metrics count them).
    pub(crate) answers: Arc<FleetAnswers>,
}

impl Fleet {
    /// Loads the fleet key and connects to the database (which refuses a
    /// PostgreSQL older than 15 and applies `migrations/postgres/`). Each
    /// failure names what is wrong and where; none names the password.
    pub(crate) async fn open(cfg: &Config) -> Result<Option<Arc<Self>>, FleetUnusable> {
        Self::open_inner(cfg)
            .await
            .map_err(|e| FleetUnusable(e.into()))
    }

    async fn open_inner(cfg: &Config) -> anyhow::Result<Option<Arc<Self>>> {
        let Some(fleet) = &cfg.fleet else {
            return Ok(None);
        };
        let key = FleetKey::load(&fleet.key_file).context("fleet.key_file")?;
        let host_id = host_id(fleet)?;
        let holder = HolderId::new(&host_id)
            .with_context(|| format!("fleet.host_id {host_id:?} is not a usable host id"))?;
        let timing = LeaseTiming::new(fleet.lease_ttl, margin(fleet.lease_ttl))
            .context("fleet.lease_ttl")?;
        let opts = DbOptions {
            // A third of a lease (at least 2 s): a transaction of certd's
            // takes milliseconds, and a host stalled inside one must not
            // hold a peer's takeover past the stalled lease's end.
            idle_in_transaction: (fleet.lease_ttl / 3).max(Duration::from_secs(2)),
            ..DbOptions::default()
        };
        let db = FleetDb::open(&fleet.database_url, &opts)
            .await
            .context("fleet.database_url")?;
        Ok(Some(Arc::new(Self {
            answers: FleetAnswers::new(db.clone()),
            db,
            key,
            holder,
            timing,
            cfg: fleet.clone(),
        })))
    }
}

/// How many lease lengths a host waits for the peer that is creating the
/// fleet's account before it gives up for now (the daemon retries).
const ACCOUNT_WAIT_TTLS: u32 = 10;

impl Fleet {
    /// The fleet's ACME account at `cfg.directory`: one for all hosts. The
    /// key sealed in the database if a host stored one; else, under the
    /// `account:<directory>` lease, the key this host already has (it ran
    /// alone before), or a new account created at the CA, sealed and
    /// stored. This host keeps its copy in the usual credentials file
    /// (0600) as well.
    pub(crate) async fn account(
        &self,
        cfg: &AcmeConfig,
        state_dir: &Path,
        store: &Ledger,
        http: AcmeHttp,
    ) -> Result<AcmeAccount, SetupError> {
        let directory = cfg.directory.to_string();
        let path = credentials_path(state_dir, &directory);
        let json = match self.stored_account_key(&directory).await? {
            Some(json) => json,
            None => self.create_account_once(cfg, &path, &http).await?,
        };
        self.keep_local_copy(&path, &json)?;
        AcmeAccount::from_credentials(cfg, &path, &json, store, http).await
    }

    /// Makes `account` sign with the key the fleet's database holds for
    /// it, if another host rolled it over since this host loaded it
    /// (`certd account rollover` there), and keeps this host's copy of
    /// it. Asked before each order and reaper pass under a lease: one
    /// read, and the CA is never sent a request signed with a key it
    /// no longer knows.
    pub(crate) async fn refresh_account_key(
        &self,
        account: &AcmeAccount,
        state_dir: &Path,
    ) -> Result<(), SetupError> {
        let directory = &account.directory_url;
        let Some(json) = self.stored_account_key(directory).await? else {
            return Ok(());
        };
        let path = credentials_path(state_dir, directory);
        if account.adopt_key(&path, &json).await? {
            write_credentials(&path, &json)?;
            tracing::info!(account = %account.account().id(), "took up the account key another host of the fleet rolled over");
        }
        Ok(())
    }

    /// The account key the fleet's database holds for `directory`,
    /// unsealed (credentials JSON), if any.
    async fn stored_account_key(&self, directory: &str) -> Result<Option<Vec<u8>>, SetupError> {
        let fail = |detail: String| SetupError::Fleet {
            directory: directory.to_owned(),
            detail,
        };
        let Some(sealed) = self
            .db
            .account_key(directory)
            .await
            .map_err(|e| fail(e.to_string()))?
        else {
            return Ok(None);
        };
        self.key
            .unseal(&account_key_context(directory), &sealed)
            .map(Some)
            .map_err(|e| fail(format!("cannot unseal the stored account key: {e}")))
    }

    /// Creates the account (or contributes this host's existing one) under
    /// the `account:<directory>` lease, so hosts starting together make one
    /// account; a host that finds the lease taken waits for the key its
    /// holder stores.
    async fn create_account_once(
        &self,
        cfg: &AcmeConfig,
        path: &Path,
        http: &AcmeHttp,
    ) -> Result<Vec<u8>, SetupError> {
        let directory = cfg.directory.to_string();
        let fail = |detail: String| SetupError::Fleet {
            directory: directory.clone(),
            detail,
        };
        let name = LeaseName::Account(directory.clone());
        let give_up = tokio::time::Instant::now() + self.timing.ttl() * ACCOUNT_WAIT_TTLS;
        loop {
            let claimed = Lease::claim(&self.db, name.clone(), self.holder.clone(), self.timing)
                .await
                .map_err(|e| fail(e.to_string()))?;
            if let Some(lease) = claimed {
                let result = self.create_under(&lease, cfg, path, http).await;
                if let Err(e) = lease.release(&self.db).await {
                    // It expires after its ttl anyway.
                    tracing::warn!(lease = %name, error = %e, "cannot release the lease");
                }
                return result;
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(fail(format!(
                    "another host has held lease {name} for {:?} without storing the account key",
                    self.timing.ttl() * ACCOUNT_WAIT_TTLS
                )));
            }
            tokio::time::sleep(self.timing.ttl() / 3).await;
            if let Some(json) = self.stored_account_key(&directory).await? {
                return Ok(json);
            }
        }
    }

    /// The work under the account lease: look again (a peer may have
    /// stored the key between the first look and the claim), else take
    /// this host's key or register one, then seal and store it through the
    /// fence.
    async fn create_under(
        &self,
        lease: &Lease,
        cfg: &AcmeConfig,
        path: &Path,
        http: &AcmeHttp,
    ) -> Result<Vec<u8>, SetupError> {
        let directory = cfg.directory.to_string();
        let fail = |detail: String| SetupError::Fleet {
            directory: directory.clone(),
            detail,
        };
        if let Some(json) = self.stored_account_key(&directory).await? {
            return Ok(json);
        }
        let json = match read_credentials(path)? {
            // An account this host made while it ran alone: the fleet's
            // from now on, rather than a second one.
            Some(json) => {
                let _valid = parse_credentials(path, &json)?;
                json
            }
            None => {
                lease.check_deadline().map_err(|e| fail(e.to_string()))?;
                // The CA may be slow; the lease must outlive the request.
                let renewer = lease.keep_renewed(self.db.clone(), &CancellationToken::new());
                let registered = register(cfg, http, path).await;
                renewer.stop().await;
                let (_, json) = registered?;
                // Kept before it is stored: if the store fails, the next
                // attempt contributes this account instead of making another.
                write_credentials(path, &json)?;
                json
            }
        };
        let sealed = self
            .key
            .seal(
                &SystemRandom::new(),
                &account_key_context(&directory),
                &json,
            )
            .map_err(|e| fail(format!("cannot seal the account key: {e}")))?;
        let stored = async {
            let mut tx = lease.begin_fenced(&self.db).await?;
            tx.put_account_key(&sealed).await?;
            tx.commit().await
        };
        stored
            .await
            .map_err(|e| fail(format!("cannot store the account key: {e}")))?;
        tracing::info!(directory = %directory, key_id = %self.key.id(), "stored the fleet's ACME account key, sealed");
        Ok(json)
    }

    /// Makes this host's credentials file hold the fleet's account. A
    /// different account's key found there is moved aside (`.replaced`),
    /// not lost.
    fn keep_local_copy(&self, path: &Path, json: &[u8]) -> Result<(), SetupError> {
        match read_credentials(path)? {
            Some(local) if local == json => return Ok(()),
            Some(_) => {
                let aside = path.with_extension("json.replaced");
                std::fs::rename(path, &aside).map_err(|e| SetupError::Credentials {
                    path: path.to_owned(),
                    detail: format!("cannot move it aside to {}: {e}", aside.display()),
                })?;
                tracing::warn!(
                    kept = %aside.display(),
                    "this host's account differs from the fleet's; it now uses the fleet's, and its own key is kept aside"
                );
            }
            None => {}
        }
        write_credentials(path, json)
    }
}

/// This host's id in the fleet: `fleet.host_id`, else the host name.
pub(crate) fn host_id(fleet: &FleetConfig) -> anyhow::Result<String> {
    match &fleet.host_id {
        Some(id) => Ok(id.clone()),
        None => host_name().context("fleet.host_id is not set"),
    }
}

/// The system's host name (`/proc/sys/kernel/hostname`), the default
/// host id.
fn host_name() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("cannot read the host name from /proc/sys/kernel/hostname; set it")?;
    Ok(name.trim().to_owned())
}
