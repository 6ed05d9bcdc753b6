//! Lease rows for the tests of fenced writes on PostgreSQL: what a
//! fleet's claim, expiry and release leave in `leases`, set directly.

use crate::ledger::{Db, Ledger};

/// A `leases` row as a test wants it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Lease<'a> {
    /// Held by `holder` at `epoch` for `secs` more seconds by the
    /// database's clock; a negative `secs` is a lease that ran out.
    Held {
        holder: &'a str,
        epoch: i64,
        secs: i64,
    },
    /// Released at `epoch`: no holder, the epoch kept.
    Released { epoch: i64 },
}

/// Writes the row of the lease `name` in the PostgreSQL ledger `s`, as
/// `lease` says. Expiry is set on the database's clock, the one the fence
/// is checked on.
pub(crate) async fn set_lease(s: &Ledger, name: &str, lease: Lease<'_>) {
    let Db::Postgres(pg) = &s.db else {
        panic!("leases are the shared (PostgreSQL) ledger's")
    };
    let (holder, epoch, secs) = match lease {
        Lease::Held {
            holder,
            epoch,
            secs,
        } => (Some(holder), epoch, secs),
        Lease::Released { epoch } => (None, epoch, 0),
    };
    sqlx::query(
        "INSERT INTO leases (name, holder, epoch, expires_at, acquired_at)
         VALUES ($1, $2, $3, now() + make_interval(secs => $4), now())
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, epoch = excluded.epoch,
             expires_at = excluded.expires_at, acquired_at = excluded.acquired_at",
    )
    .bind(name)
    .bind(holder)
    .bind(epoch)
    .bind(secs as f64)
    .execute(pg.pool())
    .await
    .expect("write the lease row");
}
