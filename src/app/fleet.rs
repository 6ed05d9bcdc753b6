//! Fleet mode's services: the fleet's database, the key that seals what
//! leaves the host, and this host's identity in the fleet, opened once
//! from `[fleet]` and shared by the ledger, the leases and distribution.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::config::{Config, FleetConfig};
use crate::fleet::{DbOptions, FleetAnswers, FleetDb, FleetKey, HolderId, LeaseTiming};

/// How long before its lease could end a holder stops sending: a third
/// of the renewal interval, at most 2 s, so that a host that has not
/// renewed in time is silent before any peer can claim.
fn margin(ttl: Duration) -> Duration {
    (ttl / 9).min(Duration::from_secs(2))
}

/// What fleet mode adds to [`Services`](super::Services).
#[derive(Debug)]
pub(crate) struct Fleet {
    pub(crate) db: FleetDb,
    pub(crate) key: FleetKey,
    /// This host's name in the fleet: the holder of the leases it takes.
    pub(crate) holder: HolderId,
    // Read by the order path's leases (fleet mode), wired in separately.
    #[allow(dead_code)]
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
    pub(crate) async fn open(cfg: &Config) -> anyhow::Result<Option<Arc<Self>>> {
        let Some(fleet) = &cfg.fleet else {
            return Ok(None);
        };
        let key = FleetKey::load(&fleet.key_file).context("fleet.key_file")?;
        let host_id = host_id(fleet)?;
        let holder = HolderId::new(&host_id)
            .with_context(|| format!("fleet.host_id {host_id:?} is not a usable host id"))?;
        let timing = LeaseTiming::new(fleet.lease_ttl, margin(fleet.lease_ttl))
            .context("fleet.lease_ttl")?;
        let db = FleetDb::open(&fleet.database_url, &DbOptions::default())
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
