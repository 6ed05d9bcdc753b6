//! The ledger on PostgreSQL, for fleet mode: the same tables as SQLite's
//! (`migrations/postgres/`), in the database the fleet's hosts share.
//!
//! Times are Unix seconds from the ledger's [`Clock`](crate::clock::Clock),
//! as on SQLite, so the two backends answer the same questions the same
//! way; only lease expiry is judged by the database's own clock, never a
//! host's. A write made through a fenced handle is one transaction that
//! starts with [`PgLedger::write`]'s check of the lease (`FOR SHARE`, so a
//! concurrent claim waits for the write to commit rather than interleave).
//!
//! One file per table family, beside the SQLite file of the same name.

mod accounts;
mod authorizations;
mod orders;
mod pauses;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sqlx::{PgPool, Postgres, Transaction};

use super::{LedgerError, Result};

/// The lease a handle's writes are made under: its name (`cert:<name>`,
/// `reaper:<account>`), this host's holder id, and the epoch it claimed,
/// which is the fencing token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub lease: String,
    pub holder: String,
    pub epoch: i64,
}

/// The PostgreSQL side of a [`Ledger`](super::Ledger).
#[derive(Clone, Debug)]
pub(super) struct PgLedger {
    pool: PgPool,
    /// This host's state directory: files that stay on the host (named
    /// after orders) live under it, as beside a SQLite ledger.
    state_dir: Arc<Path>,
    fence: Option<Arc<Fence>>,
}

impl PgLedger {
    pub(super) fn new(pool: PgPool, state_dir: PathBuf) -> Self {
        Self {
            pool,
            state_dir: state_dir.into(),
            fence: None,
        }
    }

    pub(super) fn with_fence(&self, fence: Fence) -> Self {
        Self {
            fence: Some(Arc::new(fence)),
            ..self.clone()
        }
    }

    pub(super) fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The pool, for reads (and for writes that belong to no lease).
    pub(super) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Begins a write: a transaction that, on a fenced handle, has
    /// already checked the lease. Dropping it uncommitted rolls back.
    pub(super) async fn write(&self) -> Result<Transaction<'static, Postgres>> {
        let mut tx = self.pool.begin().await?;
        if let Some(fence) = &self.fence {
            let held: Option<(i64,)> = sqlx::query_as(
                "SELECT epoch FROM leases
                 WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > now()
                 FOR SHARE",
            )
            .bind(&fence.lease)
            .bind(&fence.holder)
            .bind(fence.epoch)
            .fetch_optional(&mut *tx)
            .await?;
            if held.is_none() {
                // Dropping the transaction rolls it back.
                return Err(LedgerError::Fenced {
                    lease: fence.lease.clone(),
                    epoch: fence.epoch,
                });
            }
        }
        Ok(tx)
    }

    /// Whether the database answers: what `status --check` can ask of a
    /// server whose storage is not certd's to inspect.
    pub(super) async fn integrity_check(&self) -> Result<String> {
        let (one,): (i32,) = sqlx::query_as("SELECT 1").fetch_one(&self.pool).await?;
        Ok(if one == 1 { "ok" } else { "unexpected answer" }.to_owned())
    }
}
