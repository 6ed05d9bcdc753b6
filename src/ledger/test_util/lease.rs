//! Lease rows for the tests of fenced writes: a lease this host holds, and
//! one it held until another host claimed it. The fleet's own lease code
//! lives elsewhere; these write the `leases` table directly, as its
//! claims would, so the ledger's tests need not depend on it.

use crate::ledger::{Db, Fence, Ledger};

/// The holder id of the host a test plays.
const THIS_HOST: &str = "test-host-a";
/// The holder id of the other host.
const OTHER_HOST: &str = "test-host-b";

/// Claims the lease `name` for this host for an hour (raising its epoch,
/// as every claim does) and returns the fence to write under. On SQLite,
/// which has no leases, a fence that is never checked.
pub(crate) async fn held(s: &Ledger, name: &str) -> Fence {
    claim(s, name, THIS_HOST).await
}

/// A fence for the lease `name` that is no longer held: this host claimed
/// it, then the other host claimed it at a higher epoch.
pub(crate) async fn lost(s: &Ledger, name: &str) -> Fence {
    let mine = claim(s, name, THIS_HOST).await;
    let theirs = claim(s, name, OTHER_HOST).await;
    assert!(theirs.epoch > mine.epoch || !s.is_shared());
    mine
}

async fn claim(s: &Ledger, name: &str, holder: &str) -> Fence {
    let epoch = match &s.db {
        Db::Sqlite(_) => 1,
        Db::Postgres(pg) => {
            let (epoch,): (i64,) = sqlx::query_as(
                "INSERT INTO leases (name, holder, epoch, expires_at, acquired_at)
                 VALUES ($1, $2, 1, now() + interval '1 hour', now())
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,
                     epoch = leases.epoch + 1, expires_at = excluded.expires_at,
                     acquired_at = excluded.acquired_at
                 RETURNING epoch",
            )
            .bind(name)
            .bind(holder)
            .fetch_one(pg.pool())
            .await
            .expect("claim a test lease");
            epoch
        }
    };
    Fence {
        lease: name.to_owned(),
        holder: holder.to_owned(),
        epoch,
    }
}
