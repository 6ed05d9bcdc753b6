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
mod ari;
mod authorizations;
mod ca_state;
mod certificates;
mod definitions;
mod events;
pub mod fleet;
mod holds;
mod intents;
mod issued;
mod order_keys;
mod orders;
mod pauses;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sqlx::{PgPool, Postgres, Transaction};

use super::{LedgerError, Result};

pub use definitions::{Definition, FleetDefinition, HostDefinition};
pub use holds::Hold;

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
        if let Some(fence) = &self.fence
            && !holds(&mut tx, fence).await?
        {
            // Dropping the transaction rolls it back.
            return Err(LedgerError::Fenced {
                lease: fence.lease.clone(),
                epoch: fence.epoch,
            });
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

/// The fence check every fenced write starts with: `fence`'s lease row is
/// still the holder's at that epoch and unexpired by the database's clock.
/// `FOR SHARE` conflicts with a claimer's `UPDATE`, so a takeover waits for
/// the write in flight, and a write that waited on a takeover re-reads the
/// row and is refused.
pub(super) async fn holds(
    tx: &mut Transaction<'static, Postgres>,
    fence: &Fence,
) -> sqlx::Result<bool> {
    let held: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM leases
         WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > now()
         FOR SHARE",
    )
    .bind(&fence.lease)
    .bind(&fence.holder)
    .bind(fence.epoch)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(held.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_util::fence::{Lease, set_lease};
    use crate::ledger::test_util::pg_ledger;
    use crate::ledger::{EventKind, Identifiers, Ledger};

    const LEASE: &str = "cert:www";

    fn fence(holder: &str, epoch: i64) -> Fence {
        Fence {
            lease: LEASE.to_owned(),
            holder: holder.to_owned(),
            epoch,
        }
    }

    /// One write of each kind through `s`, all about `tag`: the results,
    /// in order.
    async fn writes(s: &Ledger, tag: &str) -> Vec<Result<()>> {
        let names = Identifiers::new([format!("{tag}.example")]);
        let domains = [format!("{tag}.example")];
        vec![
            s.ca_failed(tag, "refused").await,
            s.event(EventKind::CaUnreachable, Some(tag), None, None, None)
                .await,
            s.record_failure(tag, &domains, "boom", None).await,
            s.set_profile_warning(tag, &domains, Some("fell back"))
                .await,
            s.record_issued(&format!("https://ca/order/{tag}"), tag, &names, "01", 9)
                .await,
        ]
    }

    /// Whether anything `writes(.., tag)` writes is in the ledger.
    async fn written(s: &Ledger, tag: &str) -> [bool; 5] {
        [
            s.ca_states()
                .await
                .expect("ca_states")
                .iter()
                .any(|r| r.ca == tag),
            !s.cert_events(tag, 10).await.expect("events").is_empty(),
            s.certificate(tag)
                .await
                .expect("certificate")
                .is_some_and(|r| r.consecutive_failures > 0),
            s.certificate(tag)
                .await
                .expect("certificate")
                .is_some_and(|r| r.profile_warning.is_some()),
            s.issued_waiting(&format!("https://ca/order/{tag}"))
                .await
                .expect("issued"),
        ]
    }

    #[tokio::test]
    async fn the_holder_of_the_lease_at_its_epoch_writes() {
        let (_dir, s) = pg_ledger().await;
        set_lease(
            &s,
            LEASE,
            Lease::Held {
                holder: "a",
                epoch: 2,
                secs: 3600,
            },
        )
        .await;
        let held = s.fenced(fence("a", 2));
        for r in writes(&held, "held").await {
            r.expect("a write under the lease held");
        }
        assert_eq!(written(&s, "held").await, [true; 5]);
    }

    #[tokio::test]
    async fn a_stale_epoch_another_holder_an_expired_or_released_lease_write_nothing() {
        let (_dir, s) = pg_ledger().await;
        let live = Lease::Held {
            holder: "a",
            epoch: 2,
            secs: 3600,
        };
        let cases = [
            ("epoch1", live, fence("a", 1)),
            ("holder_b", live, fence("b", 2)),
            (
                "expired",
                Lease::Held {
                    holder: "a",
                    epoch: 2,
                    secs: -60,
                },
                fence("a", 2),
            ),
            ("released", Lease::Released { epoch: 2 }, fence("a", 2)),
        ];
        for (tag, lease, f) in cases {
            set_lease(&s, LEASE, lease).await;
            for r in writes(&s.fenced(f.clone()), tag).await {
                match r {
                    Err(LedgerError::Fenced { lease, epoch }) => {
                        assert_eq!((lease, epoch), (f.lease.clone(), f.epoch), "{tag}");
                    }
                    other => panic!("{tag}: expected Fenced, got {other:?}"),
                }
            }
            assert_eq!(written(&s, tag).await, [false; 5], "{tag}");
        }
    }
}
