//! The ledger: the only module that speaks SQL.
//!
//! One SQLite file in WAL mode, opened once per process, migrations from
//! `migrations/` applied at open. WAL lets `certd status` read while the
//! daemon writes. Each public method is one short transaction at most, so no
//! caller ever holds the write lock across network I/O.
//!
//! The ledger's own storage can fail. Opening maps SQLite's errors to what
//! an operator acts on: a corrupt file ([`LedgerError::Corrupt`], with the
//! way out), a file system that refuses writes ([`LedgerError::Unwritable`],
//! with the system's own words for why). Processes that write take the
//! state directory's lock ([`StateLock`]) first, so two of them never
//! write one ledger, and a daemon checks with [`FileIdentity`] that the file
//! it writes is still the one at the path.

use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection as _, FromRow, SqlitePool};

use crate::clock::UnixTime;

/// Errors from the ledger. They are never retried blindly: a full disk or a
/// corrupt file needs an operator.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("ledger migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("ledger query failed: {0}")]
    Query(#[from] sqlx::Error),
    /// SQLite says the file is not a database, or finds it damaged.
    #[error(
        "ledger {path} is corrupt ({detail}); certd will not use it. The way out: stop certd and \
         move the file aside (mv {path} {path}.corrupt); certd then starts with an empty ledger. \
         The installed certificates and the account key files are untouched; lost are the \
         renewal history and the tracking of pending authorizations, which the reaper then \
         cannot settle (the CA expires them on its own)"
    )]
    Corrupt { path: String, detail: String },
    /// The file system under the ledger refuses to write: `cause` is the
    /// system's own error, found by trying (SQLite's messages do not say).
    #[error("ledger {path}: cannot write: {cause} (SQLite: {detail})")]
    Unwritable {
        path: String,
        cause: io::Error,
        detail: String,
    },
    /// Another process holds the state directory's lock.
    #[error(
        "state directory {dir} is in use by another certd (PID {pid}, lock {lock}): one process \
         at a time writes its ledger. Stop that process first; `certd status` and \
         `certd authz list` work alongside it"
    )]
    Locked {
        dir: String,
        lock: String,
        pid: String,
    },
    /// The lock file cannot be created or locked at all.
    #[error("cannot lock the state directory: {path}: {source}")]
    Lock {
        path: String,
        #[source]
        source: io::Error,
    },
    /// The ledger's file was deleted or replaced under the running process.
    #[error(
        "ledger {path} was deleted or replaced while certd was running; stopping rather than \
         writing to a file nobody can read. The installed certificates are untouched; start \
         certd again to use (or create) the ledger at that path"
    )]
    Gone { path: String },
}

impl LedgerError {
    /// Whether this error means certd cannot go on with the ledger at all
    /// (exit 2), as against one query failing (an order that fails and is
    /// retried).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, LedgerError::Query(_))
    }
}

/// SQLite's primary result codes that open distinguishes: a damaged file,
/// and the ones a file system refusing writes shows up as.
const SQLITE_PERM: i32 = 3;
const SQLITE_READONLY: i32 = 8;
const SQLITE_IOERR: i32 = 10;
const SQLITE_CORRUPT: i32 = 11;
const SQLITE_FULL: i32 = 13;
const SQLITE_CANTOPEN: i32 = 14;
const SQLITE_NOTADB: i32 = 26;

/// The lock file in the state directory.
pub const LOCK_FILE: &str = "certd.lock";

/// How much a write probe writes: SQLite's WAL index alone takes 32 KiB,
/// so a disk with less free space than this cannot hold an open ledger.
const PROBE_BYTES: usize = 64 * 1024;

/// Maps an error met while opening the ledger at `path` to what the
/// operator needs to know; `fallback` builds the error for anything else.
fn diagnose<E: std::error::Error + 'static>(
    path: &Path,
    error: E,
    fallback: impl FnOnce(E) -> LedgerError,
) -> LedgerError {
    match sqlite_code(&error).and_then(|(code, detail)| diagnose_code(path, code, detail)) {
        Some(known) => known,
        None => fallback(error),
    }
}

/// What SQLite's result `code` (with its message `detail`) means for the
/// ledger at `path`, where it is about the file or its file system.
fn diagnose_code(path: &Path, code: i32, detail: String) -> Option<LedgerError> {
    let display = path.display().to_string();
    match code & 0xff {
        SQLITE_CORRUPT | SQLITE_NOTADB => Some(LedgerError::Corrupt {
            path: display,
            detail,
        }),
        SQLITE_FULL => Some(LedgerError::Unwritable {
            path: display,
            cause: io::Error::from_raw_os_error(libc::ENOSPC),
            detail,
        }),
        SQLITE_PERM | SQLITE_READONLY | SQLITE_IOERR | SQLITE_CANTOPEN => {
            probe_write(path.parent().unwrap_or(Path::new(".")))
                .err()
                .map(|cause| LedgerError::Unwritable {
                    path: display,
                    cause,
                    detail,
                })
        }
        _ => None,
    }
}

/// A ledger write that failed mid-run because the file system refuses it
/// (full, read-only, an I/O error) or the file is damaged, found anywhere in
/// `error`'s chain: the same clear error naming the file and the system's
/// cause as at open, which makes the command exit 2. Anything else is
/// `error` as it was.
pub fn explain(path: &Path, error: anyhow::Error) -> anyhow::Error {
    let known = error
        .chain()
        .find_map(sqlite_code)
        .and_then(|(code, detail)| diagnose_code(path, code, detail));
    match known {
        Some(known) => anyhow::Error::new(known),
        None => error,
    }
}

/// The SQLite result code and message of the first database error in
/// `error`'s chain.
fn sqlite_code(error: &(dyn std::error::Error + 'static)) -> Option<(i32, String)> {
    let mut cur = Some(error);
    while let Some(e) = cur {
        if let Some(sqlx::Error::Database(db)) = e.downcast_ref::<sqlx::Error>() {
            let code = db.code()?.parse().ok()?;
            return Some((code, db.message().to_owned()));
        }
        cur = e.source();
    }
    None
}

/// Writes and removes a scratch file in `dir`: the system's own error
/// (read-only file system, no space left, permission denied) when SQLite
/// only says it could not open or write.
fn probe_write(dir: &Path) -> io::Result<()> {
    let path = dir.join(".certd-write-probe");
    let result = File::create(&path).and_then(|mut f| f.write_all(&[0; PROBE_BYTES]));
    let _ = std::fs::remove_file(&path);
    result
}

/// The state directory's lock: `certd.lock`, locked with `flock` for the
/// holder's lifetime and holding its PID, so a second process can say who
/// holds it. The kernel drops the lock when the process ends, however it
/// ends, so a stale file never blocks anyone.
#[derive(Debug)]
pub struct StateLock {
    // Held only to keep the lock: closing the file releases it.
    _file: File,
}

impl StateLock {
    /// Takes the lock of `state_dir`, or says who holds it.
    pub fn acquire(state_dir: &Path) -> Result<StateLock> {
        let path = state_dir.join(LOCK_FILE);
        let lock_err = |source| LedgerError::Lock {
            path: path.display().to_string(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(lock_err)?;
        // SAFETY: flock takes a file descriptor, which `file` owns and keeps
        // open for the call; it touches no memory of ours.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                return Err(lock_err(e));
            }
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(LedgerError::Locked {
                dir: state_dir.display().to_string(),
                lock: path.display().to_string(),
                pid: if pid.is_empty() {
                    "not yet written".to_owned()
                } else {
                    pid.to_owned()
                },
            });
        }
        file.set_len(0)
            .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .map_err(lock_err)?;
        Ok(StateLock { _file: file })
    }
}

/// Which file a path named when the ledger was opened (device and inode),
/// to notice the file being deleted or replaced under a running daemon:
/// SQLite would go on writing to the unlinked file, and every write would
/// be lost at the next start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
}

impl FileIdentity {
    /// The identity of the file at `path` now.
    pub fn of(path: &Path) -> io::Result<FileIdentity> {
        let meta = std::fs::metadata(path)?;
        Ok(FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// `Ok` while `path` still names this file; [`LedgerError::Gone`] once
    /// it is deleted or replaced. Other errors (a permission change) are
    /// not taken as deletion.
    pub fn check(&self, path: &Path) -> Result<()> {
        match FileIdentity::of(path) {
            Ok(now) if now == *self => Ok(()),
            Err(e) if e.kind() != io::ErrorKind::NotFound => Ok(()),
            _ => Err(LedgerError::Gone {
                path: path.display().to_string(),
            }),
        }
    }
}

pub type Result<T> = std::result::Result<T, LedgerError>;

/// Handle to the ledger; cheap to clone.
#[derive(Clone, Debug)]
pub struct Ledger {
    pool: SqlitePool,
}

/// One ARI check's outcome, as `record_ari` stores it: the window on
/// success, the error otherwise.
#[derive(Debug, Clone, Copy)]
pub struct AriRecord<'a> {
    pub window: Option<&'a crate::acme::ari::Window>,
    pub next_check: Option<i64>,
    pub error: Option<&'a str>,
}

/// A row of `certificates`.
#[derive(Debug, Clone, Default, FromRow, serde::Deserialize)]
pub struct CertificateRow {
    pub name: String,
    pub domains: String,
    pub serial: Option<String>,
    pub not_before: Option<i64>,
    pub not_after: Option<i64>,
    pub installed_at: Option<i64>,
    pub version: Option<String>,
    pub last_attempt_at: Option<i64>,
    pub last_result: Option<String>,
    pub last_error: Option<String>,
    pub next_renewal_at: Option<i64>,
    pub consecutive_failures: i64,
    /// The serial certd last revoked for this name: while it equals
    /// `serial`, the installed certificate is revoked.
    pub revoked_serial: Option<String>,
    /// The profile the installed certificate was ordered with.
    pub profile: Option<String>,
    /// Why the last order fell back from the first configured profile.
    pub profile_warning: Option<String>,
    /// The CA's last ARI answer, for the certificate `ari_serial`.
    pub ari_serial: Option<String>,
    pub ari_window_start: Option<i64>,
    pub ari_window_end: Option<i64>,
    pub ari_explanation_url: Option<String>,
    pub ari_checked_at: Option<i64>,
    pub ari_next_check: Option<i64>,
    pub ari_error: Option<String>,
}

impl CertificateRow {
    pub fn domain_list(&self) -> Vec<String> {
        serde_json::from_str(&self.domains).unwrap_or_default()
    }
}

/// The scope of a pause that holds back every order of the account.
pub const ACCOUNT_SCOPE: &str = "";

/// A CA rate limit to record (`Ledger::set_pause`).
#[derive(Debug, Clone, Copy)]
pub struct NewPause<'a> {
    /// No new order before this, Unix seconds.
    pub until: i64,
    /// The CA paused the names (until an operator unpauses them).
    pub paused: bool,
    pub unpause_url: Option<&'a str>,
    /// The CA's words.
    pub detail: &'a str,
}

/// A row of `ca_pauses`.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct PauseRow {
    pub scope: String,
    pub until_at: i64,
    pub paused: bool,
    pub unpause_url: Option<String>,
    pub detail: String,
    pub since: i64,
}

/// An authorization as `certd authz list` shows it.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct AuthzRow {
    pub url: String,
    pub identifier: String,
    pub status: String,
    pub order_url: Option<String>,
    pub challenge_type: Option<String>,
    #[serde(serialize_with = "crate::clock::serialize_opt_rfc3339")]
    pub created_at: Option<i64>,
    #[serde(serialize_with = "crate::clock::serialize_opt_rfc3339")]
    pub updated_at: Option<i64>,
}

/// One authorization of an order, as recorded before any challenge is answered.
#[derive(Debug, Clone)]
pub struct NewAuthz {
    pub url: String,
    pub identifier: String,
    pub status: String,
    pub expires_at: Option<i64>,
    /// (challenge URL, type, status)
    pub challenges: Vec<(String, String, String)>,
}

/// A stale pending authorization, as the reaper pages through them.
#[derive(Debug, Clone, FromRow)]
pub struct PendingAuthz {
    pub id: i64,
    pub url: String,
    pub identifier: String,
    pub expires_at: Option<i64>,
    pub check_attempts: i64,
    pub order_url: Option<String>,
}

/// An order as recovery and reuse see it.
#[derive(Debug, Clone, FromRow)]
pub struct OrderRow {
    pub url: String,
    pub cert_name: String,
    pub identifiers: String,
    pub status: String,
    pub step: String,
    pub expires_at: Option<i64>,
}

impl OrderRow {
    pub fn identifier_list(&self) -> Vec<String> {
        serde_json::from_str(&self.identifiers).unwrap_or_default()
    }
}

/// A certificate the CA issued that is not installed yet.
#[derive(Debug, Clone, FromRow)]
pub struct IssuedRow {
    pub order_url: String,
    pub identifiers: String,
    pub serial: String,
}

impl IssuedRow {
    pub fn identifier_list(&self) -> Vec<String> {
        serde_json::from_str(&self.identifiers).unwrap_or_default()
    }
}

/// Per-account figures of the reaper for `certd status`.
#[derive(Debug, Clone, Default)]
pub struct ReaperSummary {
    pub pending: i64,
    pub deactivated_total: i64,
    pub deactivated_24h: i64,
    pub held_back: i64,
    pub last_pass_at: Option<i64>,
    pub last_pass: Option<String>,
    pub last_guard_at: Option<i64>,
    /// When the CA last said `rateLimited`, and until when it asked to wait.
    pub last_rate_limit: Option<(i64, String)>,
}

/// What an installed certificate looks like to the ledger.
#[derive(Debug, Clone)]
pub struct Installed {
    pub domains: Vec<String>,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    pub version: String,
    /// The profile the order named, as the CA's order echoes it.
    pub profile: Option<String>,
    /// The configured preference it was ordered under
    /// (`ProfilePreference::ledger_key`).
    pub profile_wanted: String,
}

impl Ledger {
    /// Opens (creating if needed) the ledger at `path` and applies
    /// migrations. A corrupt file or a file system that refuses writes is
    /// a [`LedgerError::Corrupt`] or [`LedgerError::Unwritable`] naming it.
    pub async fn open(path: &Path) -> Result<Self> {
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
        if let Err(e) = sqlx::migrate!("./migrations").run(&pool).await {
            pool.close().await;
            return Err(diagnose(path, e, LedgerError::Migrate));
        }
        Ok(Self { pool })
    }

    /// Opens an existing ledger for reading only: nothing is created,
    /// migrated or written, so a reading command run by another user
    /// (`sudo certd status`) leaves no file behind that certd's own user
    /// cannot write. SQLite may still create the `-wal`/`-shm` companions
    /// of a ledger in WAL mode; run as root, it gives them the ledger's
    /// owner.
    pub async fn open_read_only(path: &Path) -> Result<Self> {
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
        Ok(Self { pool })
    }

    /// Opens the ledger for a process that writes it (the daemon, a
    /// one-shot writer): [`Ledger::open`], then `PRAGMA quick_check`, so a
    /// damaged file is refused at the start instead of failing (or being
    /// made worse) half-way through an order. Readers skip the check: it
    /// reads every page, and `certd status` must stay fast.
    pub async fn open_checked(path: &Path) -> Result<Self> {
        let store = Self::open(path).await?;
        let corrupt = |detail| LedgerError::Corrupt {
            path: path.display().to_string(),
            detail,
        };
        let verdict: std::result::Result<Vec<(String,)>, sqlx::Error> =
            sqlx::query_as("PRAGMA quick_check")
                .fetch_all(&store.pool)
                .await;
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
    pub async fn release_memory(&self) {
        // Every connection at once, so each is a different one; a
        // connection busy elsewhere is simply not shrunk this time.
        let mut held = Vec::new();
        while held.len() < usize::try_from(self.pool.size()).unwrap_or(0) {
            match self.pool.try_acquire() {
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
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// `PRAGMA integrity_check`, for tests and `certd status --check`.
    pub async fn integrity_check(&self) -> Result<String> {
        let (r,): (String,) = sqlx::query_as("PRAGMA integrity_check")
            .fetch_one(&self.pool)
            .await?;
        Ok(r)
    }

    // ---- accounts -------------------------------------------------------

    pub async fn account_id(&self, directory_url: &str) -> Result<Option<i64>> {
        let row: Option<(i64,)> = sqlx::query_as("SELECT id FROM accounts WHERE directory_url = ?")
            .bind(directory_url)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.0))
    }

    pub async fn upsert_account(&self, directory_url: &str, account_url: &str) -> Result<i64> {
        let (id,): (i64,) = sqlx::query_as(
            "INSERT INTO accounts (directory_url, account_url, created_at) VALUES (?, ?, ?)
             ON CONFLICT(directory_url) DO UPDATE SET account_url = excluded.account_url
             RETURNING id",
        )
        .bind(directory_url)
        .bind(account_url)
        .bind(UnixTime::now().secs())
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    // ---- orders and authorizations ---------------------------------------

    /// Records a new (or CA-reused) order with all its authorizations and
    /// their challenges in one transaction: the write-ahead step that must
    /// complete before any challenge is answered.
    pub async fn record_order(
        &self,
        account_id: i64,
        cert_name: &str,
        order_url: &str,
        identifiers: &[String],
        status: &str,
        authzs: &[NewAuthz],
    ) -> Result<i64> {
        let now = UnixTime::now().secs();
        let mut tx = self.pool.begin().await?;
        let (order_id,): (i64,) = sqlx::query_as(
            "INSERT INTO orders (url, account_id, cert_name, identifiers, status, step, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, 'authorizing', ?, ?)
             ON CONFLICT(url) DO UPDATE SET status = excluded.status, step = 'authorizing',
                 error = NULL, updated_at = excluded.updated_at
             RETURNING id",
        )
        .bind(order_url)
        .bind(account_id)
        .bind(cert_name)
        .bind(serde_json::to_string(identifiers).unwrap_or_default())
        .bind(status)
        .bind(now)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        for a in authzs {
            let (authz_id,): (i64,) = sqlx::query_as(
                "INSERT INTO authorizations (url, account_id, identifier, status, expires_at, created_at, updated_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT(url) DO UPDATE SET status = excluded.status,
                     expires_at = COALESCE(excluded.expires_at, expires_at),
                     updated_at = excluded.updated_at
                 RETURNING id",
            )
            .bind(&a.url)
            .bind(account_id)
            .bind(&a.identifier)
            .bind(&a.status)
            .bind(a.expires_at)
            .bind(now)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT OR IGNORE INTO order_authorizations (order_id, authz_id) VALUES (?, ?)",
            )
            .bind(order_id)
            .bind(authz_id)
            .execute(&mut *tx)
            .await?;
            for (url, kind, status) in &a.challenges {
                sqlx::query(
                    "INSERT INTO challenges (url, authz_id, type, status) VALUES (?, ?, ?, ?)
                     ON CONFLICT(url) DO UPDATE SET status = excluded.status",
                )
                .bind(url)
                .bind(authz_id)
                .bind(kind)
                .bind(status)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(order_id)
    }

    /// Notes which challenge certd is about to answer for an authorization.
    pub async fn set_authz_challenge(
        &self,
        authz_url: &str,
        kind: &str,
        challenge_url: &str,
    ) -> Result<()> {
        sqlx::query("UPDATE authorizations SET challenge_type = ?, challenge_url = ?, updated_at = ? WHERE url = ?")
            .bind(kind)
            .bind(challenge_url)
            .bind(UnixTime::now().secs())
            .bind(authz_url)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records the CA's latest word on an authorization.
    pub async fn set_authz_status(
        &self,
        authz_url: &str,
        status: &str,
        error: Option<&str>,
    ) -> Result<()> {
        let now = UnixTime::now().secs();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE authorizations SET status = ?, error = COALESCE(?, error), updated_at = ? WHERE url = ?",
        )
        .bind(status)
        .bind(error)
        .bind(now)
        .bind(authz_url)
        .execute(&mut *tx)
        .await?;
        // The answered challenge follows its authorization to a final state.
        sqlx::query(
            "UPDATE challenges SET status = ? WHERE url = (SELECT challenge_url FROM authorizations WHERE url = ?)",
        )
        .bind(status)
        .bind(authz_url)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a deactivation: `from` is the status the CA reported just
    /// before (a pending one costs failure budget at some CAs).
    pub async fn set_authz_deactivated(&self, authz_url: &str, by: &str, from: &str) -> Result<()> {
        let now = UnixTime::now().secs();
        sqlx::query(
            "UPDATE authorizations SET status = 'deactivated', deactivated_at = ?, deactivated_by = ?,
                 deactivated_from = ?, updated_at = ?, check_error = NULL WHERE url = ?",
        )
        .bind(now)
        .bind(by)
        .bind(from)
        .bind(now)
        .bind(authz_url)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn set_order_state(
        &self,
        order_url: &str,
        status: &str,
        step: &str,
        error: Option<&str>,
    ) -> Result<()> {
        sqlx::query("UPDATE orders SET status = ?, step = ?, error = COALESCE(?, error), updated_at = ? WHERE url = ?")
            .bind(status)
            .bind(step)
            .bind(error)
            .bind(UnixTime::now().secs())
            .bind(order_url)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The authorizations of `order_url` the ledger still believes pending:
    /// (URL, identifier).
    pub async fn pending_authz_of_order(&self, order_url: &str) -> Result<Vec<(String, String)>> {
        self.authz_of_order(order_url, "pending").await
    }

    /// The authorizations of `order_url` with `status`: (URL, identifier).
    pub async fn authz_of_order(
        &self,
        order_url: &str,
        status: &str,
    ) -> Result<Vec<(String, String)>> {
        Ok(sqlx::query_as(
            "SELECT a.url, a.identifier FROM authorizations a
             JOIN order_authorizations oa ON oa.authz_id = a.id
             JOIN orders o ON o.id = oa.order_id
             WHERE o.url = ? AND a.status = ? ORDER BY a.id",
        )
        .bind(order_url)
        .bind(status)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The ledger's authorizations, newest first, each with the latest order
    /// that referenced it.
    pub async fn authz_list(&self, pending_only: bool) -> Result<Vec<AuthzRow>> {
        let sql = format!(
            "SELECT a.url, a.identifier, a.status,
                    (SELECT o.url FROM order_authorizations oa JOIN orders o ON o.id = oa.order_id
                      WHERE oa.authz_id = a.id ORDER BY o.id DESC LIMIT 1) AS order_url,
                    a.challenge_type, a.created_at, a.updated_at
             FROM authorizations a {} ORDER BY a.id DESC",
            if pending_only {
                "WHERE a.status = 'pending'"
            } else {
                ""
            }
        );
        Ok(sqlx::query_as(&sql).fetch_all(&self.pool).await?)
    }

    /// Final outcomes of the challenges certd answered for `identifier`:
    /// (type, status), newest first; the input of challenge fallback.
    pub async fn challenge_history(&self, identifier: &str) -> Result<Vec<(String, String)>> {
        Ok(sqlx::query_as(
            "SELECT challenge_type, status FROM authorizations
             WHERE identifier = ? AND challenge_type IS NOT NULL AND status IN ('valid', 'invalid')
             ORDER BY updated_at DESC, id DESC LIMIT 20",
        )
        .bind(identifier)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Pending authorizations per certificate name, counted once each.
    pub async fn pending_authz_by_cert(&self) -> Result<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT o.cert_name, COUNT(DISTINCT a.id) FROM authorizations a
             JOIN order_authorizations oa ON oa.authz_id = a.id
             JOIN orders o ON o.id = oa.order_id
             WHERE a.status = 'pending' GROUP BY o.cert_name",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// One certificate's pending authorizations: (identifier, URL,
    /// created at), oldest first, for `certd status NAME`.
    pub async fn pending_authz_of(&self, cert_name: &str) -> Result<Vec<(String, String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT DISTINCT a.identifier, a.url, a.created_at FROM authorizations a
             JOIN order_authorizations oa ON oa.authz_id = a.id
             JOIN orders o ON o.id = oa.order_id
             WHERE a.status = 'pending' AND o.cert_name = ? ORDER BY a.created_at, a.id",
        )
        .bind(cert_name)
        .fetch_all(&self.pool)
        .await?)
    }

    // ---- reaper, guard, recovery -----------------------------------------

    /// Pending authorizations created at or before `cutoff` whose backoff has
    /// passed, in id order after `after_id`: the reaper walks the ledger in
    /// pages so a pass over 10,000 stale rows holds neither all of them in
    /// memory nor a lock between pages.
    ///
    /// Rows in backoff (a failed CA call) are skipped until `check_after`
    /// unless `ignore_backoff` (an operator's explicit `certd reap`).
    pub async fn stale_pending_authz(
        &self,
        account_id: i64,
        cutoff: i64,
        now: i64,
        ignore_backoff: bool,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<PendingAuthz>> {
        Ok(sqlx::query_as(
            "SELECT a.id, a.url, a.identifier, a.expires_at, a.check_attempts,
                    (SELECT o.url FROM order_authorizations oa JOIN orders o ON o.id = oa.order_id
                      WHERE oa.authz_id = a.id ORDER BY o.id DESC LIMIT 1) AS order_url
             FROM authorizations a
             WHERE a.account_id = ? AND a.status = 'pending' AND a.created_at <= ?
               AND (a.check_after IS NULL OR a.check_after <= ?) AND a.id > ?
             ORDER BY a.id LIMIT ?",
        )
        .bind(account_id)
        .bind(cutoff)
        .bind(if ignore_backoff { i64::MAX } else { now })
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Failed validations plus deactivations of pending authorizations for
    /// `identifier` (and its wildcard) since `since`: what Let's Encrypt
    /// counts against "failed authorizations per identifier per hour".
    pub async fn failures_since(
        &self,
        account_id: i64,
        identifier: &str,
        since: i64,
    ) -> Result<i64> {
        let base = identifier.trim_start_matches("*.");
        let (n,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM authorizations
             WHERE account_id = ? AND identifier IN (?, '*.' || ?)
               AND ((status = 'invalid' AND updated_at >= ?)
                 OR (deactivated_from = 'pending' AND deactivated_at >= ?))",
        )
        .bind(account_id)
        .bind(base)
        .bind(base)
        .bind(since)
        .bind(since)
        .fetch_one(&self.pool)
        .await?;
        Ok(n)
    }

    /// Records a failed attempt to ask the CA about an authorization. The
    /// next try waits a minute, doubling per failure up to an hour.
    pub async fn authz_check_failed(&self, url: &str, now: i64, error: &str) -> Result<()> {
        sqlx::query(
            "UPDATE authorizations SET check_after = ? + MIN(3600, 60 << MIN(check_attempts, 6)),
                 check_attempts = check_attempts + 1, check_error = ? WHERE url = ?",
        )
        .bind(now)
        .bind(error)
        .bind(url)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Clears the reaper's backoff once the CA answered.
    pub async fn authz_check_ok(&self, url: &str) -> Result<()> {
        sqlx::query(
            "UPDATE authorizations SET check_attempts = 0, check_after = NULL, check_error = NULL
             WHERE url = ?",
        )
        .bind(url)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The ledger's record of an authorization.
    pub async fn authz(&self, url: &str) -> Result<Option<AuthzRow>> {
        Ok(sqlx::query_as(
            "SELECT a.url, a.identifier, a.status,
                    (SELECT o.url FROM order_authorizations oa JOIN orders o ON o.id = oa.order_id
                      WHERE oa.authz_id = a.id ORDER BY o.id DESC LIMIT 1) AS order_url,
                    a.challenge_type, a.created_at, a.updated_at
             FROM authorizations a WHERE a.url = ?",
        )
        .bind(url)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The authorization a challenge URL belongs to (seed 000).
    pub async fn authz_of_challenge(&self, challenge_url: &str) -> Result<Option<String>> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT a.url FROM challenges c JOIN authorizations a ON a.id = c.authz_id WHERE c.url = ?",
        )
        .bind(challenge_url)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.0))
    }

    /// Records an authorization certd learned of outside an order (an
    /// operator handed its URL to `certd authz deactivate`).
    pub async fn record_foreign_authz(
        &self,
        account_id: i64,
        url: &str,
        identifier: &str,
        status: &str,
    ) -> Result<()> {
        let now = UnixTime::now().secs();
        sqlx::query(
            "INSERT INTO authorizations (url, account_id, identifier, status, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(url) DO NOTHING",
        )
        .bind(url)
        .bind(account_id)
        .bind(identifier)
        .bind(status)
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Orders the account created since `since`, and the oldest of them:
    /// the guard's view of the CA's new-orders limit.
    pub async fn orders_since(&self, account_id: i64, since: i64) -> Result<(i64, Option<i64>)> {
        Ok(sqlx::query_as(
            "SELECT COUNT(*), MIN(created_at) FROM orders WHERE account_id = ? AND created_at >= ?",
        )
        .bind(account_id)
        .bind(since)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Certificates issued for exactly `identifiers` since `since`, and the
    /// oldest: the guard's view of the CA's duplicate-certificate limit.
    pub async fn issued_since(
        &self,
        account_id: i64,
        identifiers: &[String],
        since: i64,
    ) -> Result<(i64, Option<i64>)> {
        // Every order the CA issued counts, installed or not: a certificate
        // thrown away at install still used up the CA's duplicate limit.
        Ok(sqlx::query_as(
            "SELECT COUNT(*), MIN(updated_at) FROM orders
             WHERE account_id = ? AND identifiers = ? AND (status = 'valid' OR step = 'done')
               AND updated_at >= ?",
        )
        .bind(account_id)
        .bind(serde_json::to_string(identifiers).unwrap_or_default())
        .bind(since)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Pending authorizations of the account, per the ledger: the guard's count.
    pub async fn pending_count(&self, account_id: i64) -> Result<i64> {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM authorizations WHERE account_id = ? AND status = 'pending'",
        )
        .bind(account_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(n)
    }

    /// Every pending authorization URL of the account (`authz deactivate --all-pending`).
    pub async fn pending_urls(&self, account_id: i64) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT url FROM authorizations WHERE account_id = ? AND status = 'pending' ORDER BY id",
        )
        .bind(account_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// Orders the driver had not finished when the process last stopped.
    pub async fn in_flight_orders(&self, account_id: i64) -> Result<Vec<OrderRow>> {
        Ok(sqlx::query_as(
            "SELECT url, cert_name, identifiers, status, step, expires_at FROM orders
             WHERE account_id = ? AND step NOT IN ('done', 'failed', 'abandoned', 'issued') ORDER BY id",
        )
        .bind(account_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The newest unfinished order for exactly these identifiers that has not
    /// expired: reused before a new order leaves its authorizations to rot,
    /// and a finalized one (`processing`, `valid`) downloaded with its stored
    /// key instead of issuing the certificate twice.
    pub async fn resumable_order(
        &self,
        account_id: i64,
        identifiers: &[String],
        now: i64,
    ) -> Result<Option<OrderRow>> {
        Ok(sqlx::query_as(
            "SELECT url, cert_name, identifiers, status, step, expires_at FROM orders
             WHERE account_id = ? AND identifiers = ? AND step IN ('created', 'authorizing', 'resumable')
               AND status IN ('pending', 'ready', 'processing', 'valid')
               AND (expires_at IS NULL OR expires_at > ?)
             ORDER BY id DESC LIMIT 1",
        )
        .bind(account_id)
        .bind(serde_json::to_string(identifiers).unwrap_or_default())
        .bind(now)
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn set_order_expires(&self, order_url: &str, expires_at: i64) -> Result<()> {
        sqlx::query("UPDATE orders SET expires_at = ? WHERE url = ?")
            .bind(expires_at)
            .bind(order_url)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The directory the ledger file lives in (SQLite's own record of the
    /// main database file), where state that belongs beside it is kept.
    pub async fn ledger_dir(&self) -> Result<PathBuf> {
        let rows: Vec<(i64, String, String)> = sqlx::query_as("PRAGMA database_list")
            .fetch_all(&self.pool)
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

    /// Write-ahead for `newOrder`: notes that an order for `identifiers`
    /// (sorted) of `cert_name` is about to be created. Returns the intent's id
    /// for [`Ledger::clear_intent`] once the order itself is recorded.
    pub async fn record_intent(
        &self,
        account_id: i64,
        cert_name: &str,
        identifiers: &[String],
    ) -> Result<i64> {
        let (id,): (i64,) = sqlx::query_as(
            "INSERT INTO order_intents (account_id, cert_name, identifiers, created_at)
             VALUES (?, ?, ?, ?) RETURNING id",
        )
        .bind(account_id)
        .bind(cert_name)
        .bind(serde_json::to_string(identifiers).unwrap_or_default())
        .bind(UnixTime::now().secs())
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    pub async fn clear_intent(&self, id: i64) -> Result<()> {
        sqlx::query("DELETE FROM order_intents WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Whether a `newOrder` of the account was interrupted: an intent is
    /// left only when the process died between writing it and recording
    /// the order.
    pub async fn has_intents(&self, account_id: i64) -> Result<bool> {
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT id FROM order_intents WHERE account_id = ? LIMIT 1")
                .bind(account_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.is_some())
    }

    /// Forgets every intent of the account, once recovery has matched them.
    pub async fn clear_intents(&self, account_id: i64) -> Result<()> {
        sqlx::query("DELETE FROM order_intents WHERE account_id = ?")
            .bind(account_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Which certificate an order for exactly `identifiers` (sorted) that
    /// the ledger does not know was most likely for: the newest intent for
    /// those names, else the newest recorded order for them.
    pub async fn cert_name_for(
        &self,
        account_id: i64,
        identifiers: &[String],
    ) -> Result<Option<String>> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT cert_name FROM (
                 SELECT cert_name, 1 AS rank, id FROM order_intents WHERE account_id = ?1 AND identifiers = ?2
                 UNION ALL
                 SELECT cert_name, 2 AS rank, id FROM orders WHERE account_id = ?1 AND identifiers = ?2
             ) ORDER BY rank, id DESC LIMIT 1",
        )
        .bind(account_id)
        .bind(serde_json::to_string(identifiers).unwrap_or_default())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.0))
    }

    /// Whether the ledger has an order with this URL.
    pub async fn order_known(&self, order_url: &str) -> Result<bool> {
        let row: Option<(i64,)> = sqlx::query_as("SELECT id FROM orders WHERE url = ?")
            .bind(order_url)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// The reaper's figures for `certd status`.
    pub async fn reaper_summary(&self, account_id: i64, now: i64) -> Result<ReaperSummary> {
        let (pending, deactivated_total, deactivated_24h, held_back): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT
                (SELECT COUNT(*) FROM authorizations WHERE account_id = ?1 AND status = 'pending'),
                (SELECT COUNT(*) FROM authorizations WHERE account_id = ?1 AND deactivated_by = 'reaper'),
                (SELECT COUNT(*) FROM authorizations WHERE account_id = ?1 AND deactivated_by = 'reaper'
                    AND deactivated_at >= ?2),
                (SELECT COUNT(DISTINCT a.id) FROM authorizations a JOIN events e ON e.authz_url = a.url
                    WHERE a.account_id = ?1 AND a.status = 'pending' AND e.kind = 'held-back')",
        )
        .bind(account_id)
        .bind(now - 86_400)
        .fetch_one(&self.pool)
        .await?;
        // Newest by `at`, then by id: that order is the index
        // `events_by_kind`'s, so each is one index step however long the
        // history.
        let last: Option<(i64, Option<String>)> = sqlx::query_as(
            "SELECT at, detail FROM events WHERE kind = 'reaper-pass' ORDER BY at DESC, id DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        let guard: Option<(i64,)> = sqlx::query_as(
            "SELECT at FROM events WHERE kind = 'pending-authz-guard' ORDER BY at DESC, id DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        let rate_limited: Option<(i64, Option<String>)> = sqlx::query_as(
            "SELECT at, detail FROM events WHERE kind = 'rate-limited' ORDER BY at DESC, id DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(ReaperSummary {
            pending,
            deactivated_total,
            deactivated_24h,
            held_back,
            last_pass_at: last.as_ref().map(|l| l.0),
            last_pass: last.and_then(|l| l.1),
            last_guard_at: guard.map(|g| g.0),
            last_rate_limit: rate_limited.map(|(at, detail)| (at, detail.unwrap_or_default())),
        })
    }

    /// The accounts in the ledger: (id, directory URL, account URL).
    pub async fn accounts(&self) -> Result<Vec<(i64, String, String)>> {
        Ok(
            sqlx::query_as("SELECT id, directory_url, account_url FROM accounts ORDER BY id")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    // ---- certificates ----------------------------------------------------

    pub async fn certificate(&self, name: &str) -> Result<Option<CertificateRow>> {
        Ok(sqlx::query_as(CERT_SELECT_ONE)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Every certificate row. SQLite builds one JSON array and hands over
    /// a single value: sqlx passes each row between threads, which for the
    /// 10,000 rows of a large host cost four times the query itself. Each
    /// row is an array in `CertificateRow`'s field order (serde reads a
    /// struct from a sequence), half the text of an object with keys.
    pub async fn certificates(&self) -> Result<Vec<CertificateRow>> {
        let (json,): (String,) = sqlx::query_as(
            "SELECT json_group_array(json_array(
                 name, domains, serial, not_before, not_after, installed_at, version,
                 last_attempt_at, last_result, last_error, next_renewal_at, consecutive_failures,
                 revoked_serial, profile, profile_warning,
                 ari_serial, ari_window_start, ari_window_end, ari_explanation_url,
                 ari_checked_at, ari_next_check, ari_error))
             FROM (SELECT * FROM certificates ORDER BY name)",
        )
        .fetch_one(&self.pool)
        .await?;
        serde_json::from_str(&json)
            .map_err(|e| LedgerError::Query(sqlx::Error::Decode(Box::new(e))))
    }

    /// Records a successful install and resets the failure count.
    pub async fn record_installed(
        &self,
        name: &str,
        cert: &Installed,
        next_renewal_at: i64,
    ) -> Result<()> {
        let now = UnixTime::now().secs();
        sqlx::query(
            "INSERT INTO certificates (name, domains, serial, not_before, not_after, installed_at, version,
                 last_attempt_at, last_result, last_error, next_renewal_at, consecutive_failures, updated_at,
                 profile, profile_wanted)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'ok', NULL, ?, 0, ?, ?, ?)
             ON CONFLICT(name) DO UPDATE SET domains = excluded.domains, serial = excluded.serial,
                 profile = excluded.profile, profile_wanted = excluded.profile_wanted,
                 not_before = excluded.not_before, not_after = excluded.not_after,
                 installed_at = excluded.installed_at, version = excluded.version,
                 last_attempt_at = excluded.last_attempt_at, last_result = 'ok', last_error = NULL,
                 next_renewal_at = excluded.next_renewal_at, consecutive_failures = 0,
                 updated_at = excluded.updated_at",
        )
        .bind(name)
        .bind(serde_json::to_string(&cert.domains).unwrap_or_default())
        .bind(&cert.serial)
        .bind(cert.not_before)
        .bind(cert.not_after)
        .bind(now)
        .bind(&cert.version)
        .bind(now)
        .bind(next_renewal_at)
        .bind(now)
        .bind(&cert.profile)
        .bind(&cert.profile_wanted)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The profile preference the installed certificate of `name` was
    /// ordered under (`ProfilePreference::ledger_key`); `None` if unknown.
    pub async fn profile_wanted(&self, name: &str) -> Result<Option<String>> {
        let row: Option<(Option<String>,)> =
            sqlx::query_as("SELECT profile_wanted FROM certificates WHERE name = ?")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.and_then(|r| r.0))
    }

    /// Records why the order being placed for `name` does not name its
    /// first configured profile, or clears that note.
    pub async fn set_profile_warning(
        &self,
        name: &str,
        domains: &[String],
        warning: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO certificates (name, domains, profile_warning, updated_at) VALUES (?, ?, ?, ?)
             ON CONFLICT(name) DO UPDATE SET profile_warning = excluded.profile_warning,
                 updated_at = excluded.updated_at",
        )
        .bind(name)
        .bind(serde_json::to_string(domains).unwrap_or_default())
        .bind(warning)
        .bind(UnixTime::now().secs())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a failed attempt; the installed certificate's columns are untouched.
    pub async fn record_failure(
        &self,
        name: &str,
        domains: &[String],
        error: &str,
        next_attempt_at: Option<i64>,
    ) -> Result<()> {
        let now = UnixTime::now().secs();
        sqlx::query(
            "INSERT INTO certificates (name, domains, last_attempt_at, last_result, last_error,
                 next_renewal_at, consecutive_failures, updated_at)
             VALUES (?, ?, ?, 'error', ?, ?, 1, ?)
             ON CONFLICT(name) DO UPDATE SET last_attempt_at = excluded.last_attempt_at,
                 last_result = 'error', last_error = excluded.last_error,
                 next_renewal_at = COALESCE(excluded.next_renewal_at, next_renewal_at),
                 consecutive_failures = consecutive_failures + 1, updated_at = excluded.updated_at",
        )
        .bind(name)
        .bind(serde_json::to_string(domains).unwrap_or_default())
        .bind(now)
        .bind(error)
        .bind(next_attempt_at)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records when the scheduler will next act on a certificate.
    pub async fn set_next_renewal(&self, name: &str, at: i64) -> Result<()> {
        sqlx::query("UPDATE certificates SET next_renewal_at = ?, updated_at = ? WHERE name = ?")
            .bind(at)
            .bind(UnixTime::now().secs())
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records the CA's ARI answer for the installed certificate `serial`
    /// of `name`. An error keeps the window of an earlier good answer about
    /// the same certificate: that window still holds.
    pub async fn record_ari(&self, name: &str, serial: &str, ari: &AriRecord<'_>) -> Result<()> {
        sqlx::query(
            "UPDATE certificates SET
                 ari_window_start = CASE WHEN ?2 IS NOT NULL THEN ?2
                     WHEN ari_serial = ?1 THEN ari_window_start END,
                 ari_window_end = CASE WHEN ?2 IS NOT NULL THEN ?3
                     WHEN ari_serial = ?1 THEN ari_window_end END,
                 ari_explanation_url = CASE WHEN ?2 IS NOT NULL THEN ?4
                     WHEN ari_serial = ?1 THEN ari_explanation_url END,
                 ari_serial = ?1, ari_checked_at = ?5, ari_next_check = ?6, ari_error = ?7,
                 updated_at = ?5
             WHERE name = ?8",
        )
        .bind(serial)
        .bind(ari.window.map(|w| w.start))
        .bind(ari.window.map(|w| w.end))
        .bind(ari.window.and_then(|w| w.explanation_url.as_deref()))
        .bind(UnixTime::now().secs())
        .bind(ari.next_check)
        .bind(ari.error)
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records that certd revoked the certificate `serial` of `name`.
    pub async fn record_revoked(&self, name: &str, serial: &str, reason: &str) -> Result<()> {
        let now = UnixTime::now().secs();
        sqlx::query(
            "UPDATE certificates SET revoked_serial = ?, revoked_at = ?, revoked_reason = ?,
                 next_renewal_at = ?, updated_at = ? WHERE name = ?",
        )
        .bind(serial)
        .bind(now)
        .bind(reason)
        .bind(now)
        .bind(now)
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The serial certd revoked for `name`, if any.
    pub async fn revoked_serial(&self, name: &str) -> Result<Option<String>> {
        let row: Option<(Option<String>,)> =
            sqlx::query_as("SELECT revoked_serial FROM certificates WHERE name = ?")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.and_then(|r| r.0))
    }

    /// Records a certificate the CA issued for `order_url`, before it is
    /// installed (its chain and key are on disk by then).
    pub async fn record_issued(
        &self,
        order_url: &str,
        cert_name: &str,
        identifiers: &[String],
        serial: &str,
        not_after: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO issued (order_url, cert_name, identifiers, serial, not_after, issued_at)
             VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT(order_url) DO UPDATE SET serial = excluded.serial,
                 not_after = excluded.not_after, installed_at = NULL",
        )
        .bind(order_url)
        .bind(cert_name)
        .bind(serde_json::to_string(identifiers).unwrap_or_default())
        .bind(serial)
        .bind(not_after)
        .bind(UnixTime::now().secs())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The newest issued certificate of `cert_name` still waiting to be
    /// installed.
    pub async fn waiting_issued(&self, cert_name: &str) -> Result<Option<IssuedRow>> {
        Ok(sqlx::query_as(
            "SELECT order_url, identifiers, serial FROM issued
             WHERE cert_name = ? AND installed_at IS NULL ORDER BY issued_at DESC, rowid DESC LIMIT 1",
        )
        .bind(cert_name)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Whether the certificate of `order_url` is issued and not installed.
    pub async fn issued_waiting(&self, order_url: &str) -> Result<bool> {
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT 1 FROM issued WHERE order_url = ? AND installed_at IS NULL")
                .bind(order_url)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.is_some())
    }

    /// The issued certificate of `order_url` waits no longer: installed, or
    /// dropped as unusable.
    pub async fn issued_done(&self, order_url: &str) -> Result<()> {
        sqlx::query("UPDATE issued SET installed_at = ? WHERE order_url = ?")
            .bind(UnixTime::now().secs())
            .bind(order_url)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records that a reload command failed after an otherwise good install.
    pub async fn record_reload_failure(&self, name: &str, error: &str) -> Result<()> {
        sqlx::query(
            "UPDATE certificates SET last_result = 'error', last_error = ?, updated_at = ? WHERE name = ?",
        )
        .bind(error)
        .bind(UnixTime::now().secs())
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A reload that failed after an install succeeded on a retry: the
    /// certificate's last result is good again.
    pub async fn clear_reload_failure(&self, name: &str) -> Result<()> {
        sqlx::query(
            "UPDATE certificates SET last_result = 'ok', last_error = NULL, updated_at = ?
             WHERE name = ? AND last_result = 'error' AND last_error LIKE 'installed, but reload %'",
        )
        .bind(UnixTime::now().secs())
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // ---- events ----------------------------------------------------------

    pub async fn event(
        &self,
        kind: &str,
        cert_name: Option<&str>,
        order_url: Option<&str>,
        authz_url: Option<&str>,
        detail: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO events (at, kind, cert_name, order_url, authz_url, detail) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(UnixTime::now().secs())
        .bind(kind)
        .bind(cert_name)
        .bind(order_url)
        .bind(authz_url)
        .bind(detail)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The configuration keys that changed since the daemon last started
    /// and wait for a restart (`certd status`), from the latest
    /// `restart-needed` event after the latest `daemon-started` one.
    pub async fn restart_needed(&self) -> Result<Option<String>> {
        let row: Option<(String, Option<String>)> = sqlx::query_as(
            "SELECT kind, detail FROM events WHERE kind IN ('daemon-started', 'restart-needed') \
             ORDER BY id DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.and_then(|(kind, detail)| {
            detail.filter(|d| kind == "restart-needed" && !d.is_empty())
        }))
    }

    // ---- CA pauses -------------------------------------------------------

    /// Records a CA rate limit in force for `scope` (a certificate name,
    /// or `ACCOUNT_SCOPE`). Returns whether it is news: no pause of the
    /// same kind was recorded for the scope since its last success, so an
    /// operator is told once, not on every retry.
    pub async fn set_pause(&self, scope: &str, pause: &NewPause<'_>) -> Result<bool> {
        let now = UnixTime::now().secs();
        let mut tx = self.pool.begin().await?;
        let before: Option<(i64,)> = sqlx::query_as("SELECT paused FROM ca_pauses WHERE scope = ?")
            .bind(scope)
            .fetch_optional(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO ca_pauses (scope, until_at, paused, unpause_url, detail, since)
             VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT(scope) DO UPDATE SET until_at = excluded.until_at,
                 paused = excluded.paused, unpause_url = excluded.unpause_url,
                 detail = excluded.detail,
                 since = CASE WHEN paused = excluded.paused THEN since ELSE excluded.since END",
        )
        .bind(scope)
        .bind(pause.until)
        .bind(pause.paused)
        .bind(pause.unpause_url)
        .bind(pause.detail)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(before.is_none_or(|(p,)| (p != 0) != pause.paused))
    }

    /// The pause recorded for `scope`, if any (it may have run out).
    pub async fn pause(&self, scope: &str) -> Result<Option<PauseRow>> {
        Ok(sqlx::query_as(
            "SELECT scope, until_at, paused, unpause_url, detail, since FROM ca_pauses WHERE scope = ?",
        )
        .bind(scope)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Every pause recorded, by scope.
    pub async fn pauses(&self) -> Result<Vec<PauseRow>> {
        Ok(sqlx::query_as(
            "SELECT scope, until_at, paused, unpause_url, detail, since FROM ca_pauses ORDER BY scope",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// One certificate's latest events, newest first: (at, kind, detail),
    /// for `certd status NAME`.
    pub async fn cert_events(
        &self,
        name: &str,
        limit: i64,
    ) -> Result<Vec<(i64, String, Option<String>)>> {
        Ok(sqlx::query_as(
            "SELECT at, kind, detail FROM events WHERE cert_name = ? ORDER BY id DESC LIMIT ?",
        )
        .bind(name)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Forgets the pause of `scope`: an order of it succeeded.
    pub async fn clear_pause(&self, scope: &str) -> Result<()> {
        sqlx::query("DELETE FROM ca_pauses WHERE scope = ?")
            .bind(scope)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// When the daemon found the CA unreachable and why, while it has not
    /// reached it since: the latest `ca-unreachable` event after the latest
    /// `ca-reachable` and `daemon-started` ones.
    pub async fn ca_unreachable(&self) -> Result<Option<(i64, String)>> {
        let row: Option<(i64, String, Option<String>)> = sqlx::query_as(
            "SELECT at, kind, detail FROM events \
             WHERE kind IN ('daemon-started', 'ca-unreachable', 'ca-reachable') \
             ORDER BY id DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.and_then(|(at, kind, detail)| {
            (kind == "ca-unreachable").then(|| (at, detail.unwrap_or_default()))
        }))
    }

    /// How many events of `kind` exist (tests and status).
    pub async fn count_events(&self, kind: &str) -> Result<i64> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM events WHERE kind = ?")
            .bind(kind)
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

// Keeps the column list of `CertificateRow` in one place for both selects.
macro_rules! cert_select {
    ($tail:literal) => {
        concat!(
            "SELECT name, domains, serial, not_before, not_after, installed_at, version,
                last_attempt_at, last_result, last_error, next_renewal_at, consecutive_failures,
                revoked_serial, profile, profile_warning,
                ari_serial, ari_window_start, ari_window_end, ari_explanation_url,
                ari_checked_at, ari_next_check, ari_error
             FROM certificates ",
            $tail
        )
    };
}
const CERT_SELECT_ONE: &str = cert_select!("WHERE name = ?");

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, Ledger) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Ledger::open(&dir.path().join("certd.db"))
            .await
            .expect("open");
        (dir, store)
    }

    /// A pause is news once: retries while it lasts are not, a rate limit
    /// turning into a pause is, and so is a pause after a success.
    #[tokio::test]
    async fn a_pause_is_news_once() {
        let (_dir, s) = store().await;
        let pause = |until, paused| NewPause {
            until,
            paused,
            unpause_url: paused.then_some("https://ca/unpause"),
            detail: "limit",
        };
        assert!(s.set_pause("a", &pause(10, false)).await.expect("set"));
        assert!(!s.set_pause("a", &pause(20, false)).await.expect("set"));
        assert!(s.set_pause("a", &pause(30, true)).await.expect("set"));
        assert!(!s.set_pause("a", &pause(40, true)).await.expect("set"));
        let row = s.pause("a").await.expect("read").expect("a pause");
        assert_eq!((row.until_at, row.paused), (40, true));
        assert_eq!(row.unpause_url.as_deref(), Some("https://ca/unpause"));
        assert!(
            s.set_pause(ACCOUNT_SCOPE, &pause(5, false))
                .await
                .expect("set")
        );
        assert_eq!(s.pauses().await.expect("all").len(), 2);
        s.clear_pause("a").await.expect("clear");
        assert!(s.pause("a").await.expect("read").is_none());
        assert!(s.set_pause("a", &pause(50, true)).await.expect("set"));
    }

    /// The lock is per open file, so a second take in one process meets
    /// the first as another process would, and learns its PID.
    #[test]
    fn the_state_lock_names_its_holder_and_goes_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = StateLock::acquire(dir.path()).expect("first lock");
        match StateLock::acquire(dir.path()) {
            Err(LedgerError::Locked { pid, .. }) => {
                assert_eq!(pid, std::process::id().to_string());
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(held);
        StateLock::acquire(dir.path()).expect("free again");
    }

    #[test]
    fn file_identity_notices_deletion_and_replacement() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("certd.db");
        std::fs::write(&path, b"a").expect("write");
        let identity = FileIdentity::of(&path).expect("identity");
        identity.check(&path).expect("same file");
        // Rewritten in place is still the same file.
        std::fs::write(&path, b"b").expect("rewrite");
        identity.check(&path).expect("same file after a write");
        let other = dir.path().join("other");
        std::fs::write(&other, b"c").expect("write");
        std::fs::rename(&other, &path).expect("replace");
        assert!(matches!(
            identity.check(&path),
            Err(LedgerError::Gone { .. })
        ));
        std::fs::remove_file(&path).expect("delete");
        assert!(matches!(
            identity.check(&path),
            Err(LedgerError::Gone { .. })
        ));
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_database_is_corrupt_not_a_raw_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("certd.db");
        std::fs::write(&path, vec![b'x'; 8192]).expect("write");
        for result in [Ledger::open(&path).await, Ledger::open_checked(&path).await] {
            match result {
                Err(e @ LedgerError::Corrupt { .. }) => {
                    assert!(e.is_fatal());
                    assert!(e.to_string().contains("move the file aside"), "{e}");
                }
                other => panic!("expected Corrupt, got {other:?}"),
            }
        }
    }

    /// The duplicate guard counts what the CA issued: an order whose
    /// certificate failed to install, or waits on disk, counts as much as
    /// one that was installed.
    #[tokio::test]
    async fn the_guard_counts_issuances_not_installs() {
        let (_dir, s) = store().await;
        let acct = s
            .upsert_account("https://ca/dir", "https://ca/acct/1")
            .await
            .expect("account");
        let names = vec!["a.example".to_owned()];
        for (i, (status, step)) in [
            ("valid", "done"),
            ("valid", "failed"),
            ("valid", "issued"),
            ("invalid", "failed"),
            ("pending", "resumable"),
        ]
        .into_iter()
        .enumerate()
        {
            let url = format!("https://ca/order/{i}");
            s.record_order(acct, "www", &url, &names, status, &[])
                .await
                .expect("order");
            s.set_order_state(&url, status, step, None)
                .await
                .expect("state");
        }
        let (count, _) = s.issued_since(acct, &names, 0).await.expect("count");
        assert_eq!(count, 3);

        // The issued record: waiting until installed, then not.
        s.record_issued("https://ca/order/2", "www", &names, "0a", 1)
            .await
            .expect("record");
        assert!(s.issued_waiting("https://ca/order/2").await.expect("query"));
        let row = s.waiting_issued("www").await.expect("query").expect("row");
        assert_eq!(row.order_url, "https://ca/order/2");
        assert_eq!(row.identifier_list(), names);
        s.issued_done("https://ca/order/2").await.expect("done");
        assert!(s.waiting_issued("www").await.expect("query").is_none());
    }

    #[tokio::test]
    async fn order_with_reused_authz_is_recorded_once() {
        let (_dir, s) = store().await;
        let acct = s
            .upsert_account("https://ca/dir", "https://ca/acct/1")
            .await
            .unwrap();
        let authz = NewAuthz {
            url: "https://ca/authz/1".into(),
            identifier: "a.example".into(),
            status: "pending".into(),
            expires_at: None,
            challenges: vec![(
                "https://ca/chal/1".into(),
                "http-01".into(),
                "pending".into(),
            )],
        };
        let names = vec!["a.example".to_owned()];
        s.record_order(
            acct,
            "www",
            "https://ca/order/1",
            &names,
            "pending",
            std::slice::from_ref(&authz),
        )
        .await
        .unwrap();
        // A CA that hands back the same order and authz must not duplicate rows.
        s.record_order(
            acct,
            "www",
            "https://ca/order/1",
            &names,
            "pending",
            std::slice::from_ref(&authz),
        )
        .await
        .unwrap();
        s.record_order(
            acct,
            "www",
            "https://ca/order/2",
            &names,
            "pending",
            &[authz],
        )
        .await
        .unwrap();
        let list = s.authz_list(true).await.unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].order_url.as_deref(), Some("https://ca/order/2"));
        assert_eq!(
            s.pending_authz_by_cert().await.unwrap(),
            vec![("www".to_owned(), 1)]
        );

        s.set_authz_deactivated("https://ca/authz/1", "driver", "pending")
            .await
            .unwrap();
        assert!(s.authz_list(true).await.unwrap().is_empty());
        assert_eq!(s.integrity_check().await.unwrap(), "ok");
    }

    #[tokio::test]
    async fn failures_count_up_and_success_resets() {
        let (_dir, s) = store().await;
        let d = vec!["a.example".to_owned()];
        s.record_failure("www", &d, "boom", None).await.unwrap();
        s.record_failure("www", &d, "boom again", None)
            .await
            .unwrap();
        let row = s.certificate("www").await.unwrap().unwrap();
        assert_eq!(row.consecutive_failures, 2);
        assert_eq!(row.last_error.as_deref(), Some("boom again"));
        let installed = Installed {
            domains: d.clone(),
            serial: "01".into(),
            not_before: 1,
            not_after: 2,
            version: "v1".into(),
            profile: Some("shortlived".into()),
            profile_wanted: "shortlived".into(),
        };
        s.record_installed("www", &installed, 3).await.unwrap();
        assert_eq!(
            s.profile_wanted("www").await.unwrap().as_deref(),
            Some("shortlived")
        );
        let row = s.certificate("www").await.unwrap().unwrap();
        assert_eq!(
            (row.consecutive_failures, row.last_result.as_deref()),
            (0, Some("ok"))
        );
        assert_eq!(row.domain_list(), d);
    }

    #[tokio::test]
    async fn stale_pending_authz_pages_through_ten_thousand_rows() {
        let (_dir, s) = store().await;
        let acct = s
            .upsert_account("https://ca/dir", "https://ca/acct/1")
            .await
            .unwrap();
        let authzs: Vec<NewAuthz> = (0..10_050)
            .map(|i| NewAuthz {
                url: format!("https://ca/authz/{i}"),
                identifier: format!("n{i}.example"),
                status: "pending".into(),
                expires_at: None,
                challenges: Vec::new(),
            })
            .collect();
        s.record_order(acct, "big", "https://ca/order/1", &[], "pending", &authzs)
            .await
            .unwrap();
        let now = UnixTime::now().secs();
        let (mut after, mut seen, mut pages) = (0, 0, 0);
        loop {
            let page = s
                .stale_pending_authz(acct, now, now, false, after, 100)
                .await
                .unwrap();
            let Some(last) = page.last() else { break };
            assert!(page.len() <= 100);
            after = last.id;
            seen += page.len();
            pages += 1;
        }
        assert_eq!((seen, pages), (10_050, 101));
        // Rows in backoff are skipped until their time, unless asked.
        s.authz_check_failed("https://ca/authz/0", now, "CA down")
            .await
            .unwrap();
        let first = s
            .stale_pending_authz(acct, now, now, false, 0, 1)
            .await
            .unwrap();
        assert_eq!(first[0].url, "https://ca/authz/1");
        let first = s
            .stale_pending_authz(acct, now, now, true, 0, 1)
            .await
            .unwrap();
        assert_eq!(first[0].url, "https://ca/authz/0");
    }

    #[tokio::test]
    async fn failure_budget_counts_invalid_and_pending_deactivations_only() {
        let (_dir, s) = store().await;
        let acct = s
            .upsert_account("https://ca/dir", "https://ca/acct/1")
            .await
            .unwrap();
        let mk = |i: u32, identifier: &str| NewAuthz {
            url: format!("https://ca/authz/{i}"),
            identifier: identifier.into(),
            status: "pending".into(),
            expires_at: None,
            challenges: Vec::new(),
        };
        let list = [
            mk(1, "a.example"),
            mk(2, "*.a.example"),
            mk(3, "a.example"),
            mk(4, "b.example"),
        ];
        s.record_order(acct, "x", "https://ca/order/1", &[], "pending", &list)
            .await
            .unwrap();
        s.set_authz_status("https://ca/authz/1", "invalid", None)
            .await
            .unwrap();
        s.set_authz_deactivated("https://ca/authz/2", "reaper", "pending")
            .await
            .unwrap();
        // Deactivating a valid authorization is free.
        s.set_authz_deactivated("https://ca/authz/3", "driver", "valid")
            .await
            .unwrap();
        s.set_authz_status("https://ca/authz/4", "invalid", None)
            .await
            .unwrap();
        let since = UnixTime::now().secs() - 3600;
        assert_eq!(s.failures_since(acct, "a.example", since).await.unwrap(), 2);
        assert_eq!(
            s.failures_since(acct, "*.a.example", since).await.unwrap(),
            2
        );
        assert_eq!(s.failures_since(acct, "b.example", since).await.unwrap(), 1);
        assert_eq!(
            s.failures_since(acct, "a.example", since + 7200)
                .await
                .unwrap(),
            0
        );
    }
}
