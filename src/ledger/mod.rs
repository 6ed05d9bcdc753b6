//! The ledger: the only module that speaks SQL.
//!
//! Two backends behind one typed API, each written for its engine:
//!
//! - SQLite (the default, one host): one file in WAL mode, opened once per
//!   process, migrations from `migrations/sqlite/` applied at open. WAL
//!   lets `certd status` read while the daemon writes.
//! - PostgreSQL (fleet mode, several hosts): the same tables in the fleet's
//!   database (`migrations/postgres/`), in [`pg`]. A handle may carry a
//!   [`Fence`], the lease its writes are made under: each write is then one
//!   transaction that first checks, on the database's clock, that the lease
//!   is still this holder's at that epoch, and rolls back otherwise.
//!
//! Each public method is one short transaction at most, so no caller ever
//! holds a write lock across network I/O.
//!
//! The ledger's own storage can fail. Opening maps SQLite's errors to what
//! an operator acts on: a corrupt file ([`LedgerError::Corrupt`], with the
//! way out), a file system that refuses writes ([`LedgerError::Unwritable`],
//! with the system's own words for why). Processes that write take the
//! state directory's lock ([`StateLock`]) first, so two of them never
//! write one ledger, and a daemon checks with [`FileIdentity`] that the file
//! it writes is still the one at the path.
//!
//! The files: `model` (the vocabulary: states, event kinds, actors, name
//! sets), `error` (what a failed open or write means), `lock` (the state
//! directory's lock), and one file per table family with its queries.

mod accounts;
mod ari;
mod authorizations;
mod ca_state;
mod certificates;
mod error;
mod events;
mod intents;
pub mod import;
mod issued;
mod lock;
mod model;
mod order_keys;
mod orders;
mod pauses;
mod pg;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection as _, PgPool, SqlitePool};

use crate::clock::Clock;

use error::diagnose;

pub(crate) use authorizations::{NewAuthz, NewChallenge, PendingAuthz, StalePage};
pub(crate) use ca_state::CaStateRow;
pub use certificates::CertificateRow;
pub(crate) use certificates::Installed;
pub(crate) use error::explain;
pub use error::{LedgerError, Result};
pub(crate) use events::ReaperSummary;
pub(crate) use intents::{AdmitLimits, Admitted};
pub(crate) use lock::{FileIdentity, StateLock};
pub(crate) use model::{Actor, AriRecord, AriWindow, ChallengeStatus, Identifiers, OrderStep};
pub use model::{AuthzStatus, EventKind, LastResult, OrderStatus, UnknownValue};
pub use order_keys::OrderKeySeal;
pub(crate) use orders::OrderRow;
pub(crate) use pauses::{ACCOUNT_SCOPE, NewPause, PauseRow};
pub use pg::fleet;
pub use pg::{Definition, Fence, FleetDefinition, Hold, HostDefinition};

use pg::PgLedger;

/// Handle to the ledger; cheap to clone.
#[derive(Clone, Debug)]
pub struct Ledger {
    db: Db,
    /// The wall clock every row's timestamps come from.
    clock: Clock,
    /// Fleet mode: the seal of finalized orders' keys, for the callers
    /// that keep them here ([`Ledger::with_order_key_seal`]).
    order_key_seal: Option<std::sync::Arc<dyn OrderKeySeal>>,
}

/// The engine behind a [`Ledger`]. Each method of the ledger matches on
/// it once, at its top: the SQLite statements follow in the method, the
/// PostgreSQL ones are in `pg/`.
#[derive(Clone, Debug)]
enum Db {
    Sqlite(SqlitePool),
    Postgres(PgLedger),
}

impl Ledger {
    /// Opens (creating if needed) the ledger at `path` and applies
    /// migrations. A corrupt file or a file system that refuses writes is
    /// a [`LedgerError::Corrupt`] or [`LedgerError::Unwritable`] naming it.
    pub async fn open(path: &Path, clock: Clock) -> Result<Self> {
        let open_err = |source: sqlx::Error| {
            diagnose(path, source, |source| LedgerError::Open {
                path: path.display().to_string(),
                source,
            })
        };
        let options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(open_err)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL is durable across process crashes in WAL mode; only a
            // power loss can drop the last transactions, which the next run
            // re-learns from the CA.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            // 1 MiB of page cache per connection (SQLite's default is 2):
            // the ledger's hot pages are few, and an idle daemon's memory
            // is mostly these caches.
            .pragma("cache_size", "-1024");
        let pool = SqlitePoolOptions::new()
            // SQLite writes one at a time anyway; two connections let the
            // reaper or the metrics read while an order writes. Each
            // connection is a thread with its own cache.
            .max_connections(2)
            // A connection handed back inside a transaction is one whose
            // rollback failed because SQLite had already rolled back on its
            // own (a full disk does that): sqlx's count of open
            // transactions is then stale, the next transaction on it
            // becomes a savepoint, and a failure there leaves a write
            // transaction open for good, locking every other writer out
            // until restart. Closing it (which rolls back whatever is
            // open) lets the pool start afresh. A healthy connection is
            // never back in the pool inside a transaction, bar a dropped
            // transaction whose queued rollback has not run yet: closing
            // that one costs a reconnect, on an error path.
            .after_release(|conn, _| Box::pin(async move { Ok(!conn.is_in_transaction()) }))
            .connect_with(options)
            .await
            .map_err(open_err)?;
        if let Err(e) = sqlx::migrate!("./migrations/sqlite").run(&pool).await {
            pool.close().await;
            return Err(diagnose(path, e, LedgerError::Migrate));
        }
        Ok(Self {
            db: Db::Sqlite(pool),
            clock,
            order_key_seal: None,
        })
    }

    /// The ledger in a fleet's PostgreSQL database, over a pool whose
    /// connections already passed the version check and whose database
    /// holds `migrations/postgres/` (the fleet's connection does both).
    /// `state_dir` is this host's state directory, for what stays on the
    /// host (files named after orders). Writes are not fenced until
    /// [`Ledger::fenced`] gives a handle that is.
    pub fn postgres(pool: PgPool, state_dir: PathBuf, clock: Clock) -> Self {
        Self {
            db: Db::Postgres(PgLedger::new(pool, state_dir)),
            clock,
            order_key_seal: None,
        }
    }

    /// This handle's writes made under `fence`: on PostgreSQL, each write
    /// first checks that the lease is still held at that epoch
    /// ([`LedgerError::Fenced`] otherwise, and nothing written). SQLite has
    /// one writer by the state directory's lock, so it needs no fence and
    /// the handle is the same.
    #[must_use]
    pub fn fenced(&self, fence: Fence) -> Self {
        match &self.db {
            Db::Sqlite(_) => self.clone(),
            Db::Postgres(pg) => Self {
                db: Db::Postgres(pg.with_fence(fence)),
                ..self.clone()
            },
        }
    }

    /// Whether this is the fleet's shared ledger.
    pub fn is_shared(&self) -> bool {
        matches!(self.db, Db::Postgres(_))
    }

    /// Opens an existing ledger for reading only: nothing is created,
    /// migrated or written, so a reading command run by another user
    /// (`sudo certd status`) leaves no file behind that certd's own user
    /// cannot write. SQLite may still create the `-wal`/`-shm` companions
    /// of a ledger in WAL mode; run as root, it gives them the ledger's
    /// owner.
    pub async fn open_read_only(path: &Path, clock: Clock) -> Result<Self> {
        let open_err = |source: sqlx::Error| LedgerError::Open {
            path: path.display().to_string(),
            source,
        };
        let options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(open_err)?
            .filename(path)
            .read_only(true)
            .busy_timeout(Duration::from_secs(10))
            .pragma("cache_size", "-1024");
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .map_err(open_err)?;
        Ok(Self {
            db: Db::Sqlite(pool),
            clock,
            order_key_seal: None,
        })
    }

    /// Opens the ledger for a process that writes it (the daemon, a
    /// one-shot writer): [`Ledger::open`], then `PRAGMA quick_check`, so a
    /// damaged file is refused at the start instead of failing (or being
    /// made worse) half-way through an order. Readers skip the check: it
    /// reads every page, and `certd status` must stay fast.
    pub(crate) async fn open_checked(path: &Path, clock: Clock) -> Result<Self> {
        let store = Self::open(path, clock).await?;
        let corrupt = |detail| LedgerError::Corrupt {
            path: path.display().to_string(),
            detail,
        };
        let Db::Sqlite(pool) = &store.db else {
            unreachable!("Ledger::open opens SQLite")
        };
        let verdict: std::result::Result<Vec<(String,)>, sqlx::Error> =
            sqlx::query_as("PRAGMA quick_check").fetch_all(pool).await;
        let failure = match verdict {
            Ok(rows) if rows.len() == 1 && rows[0].0 == "ok" => return Ok(store),
            Ok(rows) => corrupt(
                rows.into_iter()
                    .map(|r| r.0)
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            Err(e) => diagnose(path, e, LedgerError::Query),
        };
        store.close().await;
        Err(failure)
    }

    /// Lets every open connection give back its page cache
    /// (`PRAGMA shrink_memory`), for a daemon about to idle: the caches
    /// refill from the file on the next order, and until then are the
    /// biggest part of the daemon's heap.
    pub(crate) async fn release_memory(&self) {
        // PostgreSQL's caches are the server's, not this process's.
        let Db::Sqlite(pool) = &self.db else { return };
        // Every connection at once, so each is a different one; a
        // connection busy elsewhere is simply not shrunk this time.
        let mut held = Vec::new();
        while held.len() < usize::try_from(pool.size()).unwrap_or(0) {
            match pool.try_acquire() {
                Some(conn) => held.push(conn),
                None => break,
            }
        }
        for conn in &mut held {
            let _ = sqlx::query("PRAGMA shrink_memory")
                .execute(&mut **conn)
                .await;
        }
    }

    /// Folds the write-ahead log into the main file and empties it
    /// (`PRAGMA wal_checkpoint(TRUNCATE)`), so that `certd.db` alone is the
    /// whole ledger: for tests that damage the file, and tools that copy it.
    pub async fn checkpoint(&self) -> Result<()> {
        // PostgreSQL has no file of certd's to fold.
        let Db::Sqlite(pool) = &self.db else {
            return Ok(());
        };
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(pool)
            .await?;
        Ok(())
    }

    /// `PRAGMA integrity_check`, for tests and `certd status --check`;
    /// on PostgreSQL, whether the database answers.
    pub async fn integrity_check(&self) -> Result<String> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.integrity_check().await,
        };
        let (r,): (String,) = sqlx::query_as("PRAGMA integrity_check")
            .fetch_one(pool)
            .await?;
        Ok(r)
    }

    /// The directory the ledger file lives in (SQLite's own record of the
    /// main database file), where state that belongs beside it is kept.
    pub(crate) async fn ledger_dir(&self) -> Result<PathBuf> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return Ok(pg.state_dir().to_owned()),
        };
        let rows: Vec<(i64, String, String)> = sqlx::query_as("PRAGMA database_list")
            .fetch_all(pool)
            .await?;
        let file = rows
            .into_iter()
            .find(|(_, name, _)| name == "main")
            .map(|(_, _, file)| PathBuf::from(file))
            .unwrap_or_default();
        Ok(file
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf))
    }

    /// The clock the ledger stamps rows with, for its callers to read the
    /// same time.
    pub(crate) fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The time now, Unix seconds, for a row's timestamp.
    fn now(&self) -> i64 {
        self.clock.now().secs()
    }

    pub async fn close(&self) {
        match &self.db {
            Db::Sqlite(pool) => pool.close().await,
            // The pool is the fleet connection's, which closes it.
            Db::Postgres(_) => {}
        }
    }
}

#[cfg(test)]
pub(crate) mod test_util;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_that_is_not_a_database_is_corrupt_not_a_raw_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("certd.db");
        std::fs::write(&path, vec![b'x'; 8192]).expect("write");
        for result in [
            Ledger::open(&path, Clock::system()).await,
            Ledger::open_checked(&path, Clock::system()).await,
        ] {
            match result {
                Err(e @ LedgerError::Corrupt { .. }) => {
                    assert!(e.is_fatal());
                    assert!(e.to_string().contains("move the file aside"), "{e}");
                }
                other => panic!("expected Corrupt, got {other:?}"),
            }
        }
    }
}
