//! `leases`: one row per lease (`cert:<name>`, `reaper:<account>`,
//! `account:<directory>`), its holder, its epoch (the fencing token) and
//! its expiry on the database's clock.
//!
//! A claim succeeds only when the row is free or expired by `now()`, and
//! raises the epoch in the same statement (`ON CONFLICT` re-checks the
//! newest row version, so of concurrent claimers exactly one wins). A
//! fenced write is one transaction whose first statement locks the row
//! `FOR SHARE` and checks holder, epoch and expiry: the lock conflicts with
//! a claimer's `UPDATE`, so a takeover waits for a fenced write in flight,
//! and a fenced write that waited on a takeover re-reads the row and is
//! refused.

use std::fmt;
use std::time::Duration;

use sqlx::{Postgres, Transaction};

use super::{DbError, FleetStore, Target, micros, notify};
use crate::ledger::Fence;

/// The channel a released lease's name is announced on.
pub const LEASE_CHANNEL: &str = "certd_lease";

/// A successful claim: the new epoch, and the holder whose lease had run
/// out, if the claim took it from one (not after a release, which clears
/// the holder).
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub epoch: i64,
    pub previous: Option<Expired>,
}

/// The holder a claim replaced, and how long its lease had been expired
/// by the database's clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Expired {
    pub holder: String,
    pub expired_for: Duration,
}

/// A lease as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    /// The row's name: `cert:www`.
    pub name: String,
    /// `None` once released (or never claimed).
    pub holder: Option<String>,
    pub epoch: i64,
    /// Unexpired by the database's clock.
    pub live: bool,
}

/// A transaction whose first statement found its [`Fence`] still held
/// (see [`FleetStore::begin_fenced`]): the writes made through it commit
/// only if the lease stayed the holder's. Dropping it rolls back.
pub struct FencedWrite {
    pub(super) tx: Transaction<'static, Postgres>,
    fence: Fence,
    target: Target,
}

impl FleetStore {
    /// Claims lease `name` for `holder` for `ttl` if it is free or expired
    /// by the database's clock; the new epoch and who held it before, or
    /// `None` if another holder has it.
    pub async fn claim_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Claimed>, DbError> {
        // The subqueries in RETURNING read the row as the statement's
        // snapshot saw it (a command does not see its own changes): what
        // the claim replaced, for the failover figure.
        let row: Option<(i64, Option<String>, Option<f64>)> = sqlx::query_as(
            "INSERT INTO leases AS l (name, holder, epoch, expires_at, acquired_at)
             VALUES ($1, $2, 1, now() + $3 * interval '1 microsecond', now())
             ON CONFLICT (name) DO UPDATE
                SET holder = excluded.holder, epoch = l.epoch + 1,
                    expires_at = excluded.expires_at, acquired_at = now()
              WHERE l.holder IS NULL OR l.expires_at <= now()
             RETURNING l.epoch,
                 (SELECT holder FROM leases WHERE name = $1),
                 (SELECT EXTRACT(EPOCH FROM now() - expires_at)::float8
                    FROM leases WHERE name = $1)",
        )
        .bind(name)
        .bind(holder)
        .bind(micros(ttl))
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(row.map(|(epoch, previous, expired_secs)| Claimed {
            epoch,
            previous: previous.map(|holder| Expired {
                holder,
                // Negative only if the clock read differs within the
                // statement, which `now()` does not.
                expired_for: Duration::from_secs_f64(expired_secs.unwrap_or(0.0).max(0.0)),
            }),
        }))
    }

    /// How long until the held lease `name` runs out by the database's
    /// clock (zero if it has); `None` if nobody holds it.
    pub async fn lease_remaining(&self, name: &str) -> Result<Option<Duration>, DbError> {
        let secs: Option<f64> = sqlx::query_scalar(
            "SELECT GREATEST(EXTRACT(EPOCH FROM expires_at - now()), 0)::float8
               FROM leases WHERE name = $1 AND holder IS NOT NULL",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(secs.map(Duration::from_secs_f64))
    }

    /// Extends `fence`'s lease to `ttl` from the database's now, if it is
    /// still that holder's at that epoch and unexpired; whether it was.
    pub async fn renew_lease(&self, fence: &Fence, ttl: Duration) -> Result<bool, DbError> {
        let done = sqlx::query(
            "UPDATE leases SET expires_at = now() + $4 * interval '1 microsecond'
              WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > now()",
        )
        .bind(&fence.lease)
        .bind(&fence.holder)
        .bind(fence.epoch)
        .bind(micros(ttl))
        .execute(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(done.rows_affected() == 1)
    }

    /// Clears `fence`'s holder (keeping the epoch, so the next claim gets
    /// epoch + 1 at once) and announces the lease's name on
    /// [`LEASE_CHANNEL`], delivered when the release commits; whether the
    /// lease was still the holder's to release.
    pub async fn release_lease(&self, fence: &Fence) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.error(e))?;
        let released = sqlx::query(
            "UPDATE leases SET holder = NULL, expires_at = now()
              WHERE name = $1 AND holder = $2 AND epoch = $3",
        )
        .bind(&fence.lease)
        .bind(&fence.holder)
        .bind(fence.epoch)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.error(e))?
        .rows_affected()
            == 1;
        if released {
            notify(&mut *tx, LEASE_CHANNEL, &fence.lease)
                .await
                .map_err(|e| self.error(e))?;
        }
        tx.commit().await.map_err(|e| self.error(e))?;
        Ok(released)
    }

    /// Opens a transaction whose first statement locks `fence`'s lease row
    /// and checks that it is still the holder's at that epoch and
    /// unexpired by the database's clock; `None` (rolled back) if not.
    pub async fn begin_fenced(&self, fence: Fence) -> Result<Option<FencedWrite>, DbError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.error(e))?;
        let held = crate::ledger::pg::holds(&mut tx, &fence)
            .await
            .map_err(|e| self.error(e))?;
        if !held {
            // Dropping would roll back too, but only when the connection
            // is next used; say so now.
            let _ = tx.rollback().await;
            return Ok(None);
        }
        Ok(Some(FencedWrite {
            tx,
            fence,
            target: self.target.clone(),
        }))
    }

    /// Every lease row, by name.
    pub async fn leases(&self) -> Result<Vec<LeaseRow>, DbError> {
        let rows: Vec<(String, Option<String>, i64, bool)> = sqlx::query_as(
            "SELECT name, holder, epoch, expires_at > now() FROM leases ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(rows
            .into_iter()
            .map(|(name, holder, epoch, live)| LeaseRow {
                name,
                holder,
                epoch,
                live,
            })
            .collect())
    }
}

impl FencedWrite {
    /// The lease this transaction's writes are made under.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Commits the writes. The lease row stayed locked since the check, so
    /// no takeover came in between.
    pub async fn commit(self) -> Result<(), DbError> {
        let target = self.target;
        self.tx
            .commit()
            .await
            .map_err(|source| DbError::Query { target, source })
    }

    /// Wraps a write's error with where the database is.
    pub(super) fn error(&self, source: sqlx::Error) -> DbError {
        DbError::Query {
            target: self.target.clone(),
            source,
        }
    }
}

impl fmt::Debug for FencedWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FencedWrite")
            .field("fence", &self.fence)
            .finish_non_exhaustive()
    }
}
