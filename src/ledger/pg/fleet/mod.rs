//! The fleet's own tables in its PostgreSQL (`migrations/postgres/`
//! 0001–0002): leases, members, issuances, installs, challenge answers and
//! secrets, and the connection they share. The fleet module keeps the
//! protocol (what a lease means, sealing, distribution) and calls these
//! typed statements; the SQL stays here.
//!
//! Every time that decides anything (lease expiry, member liveness, answer
//! expiry, install lag) is the database's `now()`, never a host's clock:
//! the hosts' clocks are never compared.
//!
//! One file per table family: [`connection`] (connecting, the version
//! check, migrations, LISTEN), [`leases`] (claim, renew, release, and the
//! fenced transaction [`FencedWrite`]), [`members`], [`issued`],
//! [`installs`], [`challenges`], [`secrets`].

mod challenges;
mod connection;
mod installs;
mod issued;
mod leases;
mod members;
mod secrets;

use std::time::Duration;

use sqlx::{PgExecutor, PgPool};

pub use challenges::{CHALLENGE_CHANNEL, ChallengeAnswer, ChallengeKind, LiveAnswer};
pub use connection::{
    DbError, DbOptions, FleetListener, MIN_SERVER_VERSION, ServerVersion, Target,
};
pub use installs::{InstallLag, InstallRecord, InstallRow};
pub use issued::{ISSUED_CHANNEL, IssuedRow};
pub use leases::{Claimed, Expired, FencedWrite, LEASE_CHANNEL, LeaseRow};
pub use members::Member;

/// A connection pool to the fleet's database, and where it points (for
/// errors). Cheap to clone.
#[derive(Clone)]
pub struct FleetStore {
    pool: PgPool,
    target: Target,
}

impl FleetStore {
    /// The pool, for the ledger's own PostgreSQL backend
    /// ([`Ledger::postgres`](crate::ledger::Ledger::postgres)) and for
    /// closing it.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Wraps a query's error with where the database is.
    fn error(&self, source: sqlx::Error) -> DbError {
        DbError::Query {
            target: self.target.clone(),
            source,
        }
    }
}

/// A duration as whole microseconds (PostgreSQL's interval resolution).
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Announces `payload` on `channel`. Sent inside a transaction, PostgreSQL
/// delivers it only if (and when) that transaction commits.
async fn notify<'c>(
    conn: impl PgExecutor<'c>,
    channel: &str,
    payload: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(payload)
        .execute(conn)
        .await?;
    Ok(())
}
