//! What a failed open or write of the ledger means to an operator: SQLite's
//! result codes mapped to a corrupt file or a file system that refuses
//! writes, with the system's own words for why.

use std::fs::File;
use std::io::{self, Write as _};
use std::path::Path;

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
    /// A fenced write on the shared ledger found its lease gone: another
    /// host claimed it (a higher epoch), or it expired on the database's
    /// clock. Nothing was written; this host must send nothing more for
    /// what the lease covers.
    #[error(
        "the lease {lease} is no longer this host's at epoch {epoch} (another host took it over,          or it expired); nothing was written"
    )]
    Fenced { lease: String, epoch: i64 },
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
        !matches!(self, LedgerError::Query(_) | LedgerError::Fenced { .. })
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

/// How much a write probe writes: SQLite's WAL index alone takes 32 KiB,
/// so a disk with less free space than this cannot hold an open ledger.
const PROBE_BYTES: usize = 64 * 1024;

/// A ledger write that failed mid-run because the file system refuses it
/// (full, read-only, an I/O error) or the file is damaged, found anywhere in
/// `error`'s chain: the same clear error naming the file and the system's
/// cause as at open, which makes the command exit 2. Anything else is
/// `error` as it was.
pub(crate) fn explain(path: &Path, error: anyhow::Error) -> anyhow::Error {
    let known = error
        .chain()
        .find_map(sqlite_code)
        .and_then(|(code, detail)| diagnose_code(path, code, detail));
    match known {
        Some(known) => anyhow::Error::new(known),
        None => error,
    }
}

/// Maps an error met while opening the ledger at `path` to what the
/// operator needs to know; `fallback` builds the error for anything else.
pub(super) fn diagnose<E: std::error::Error + 'static>(
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
    let result = File::create(&path).and_then(|mut f| f.write_all(&vec![0; PROBE_BYTES]));
    let _ = std::fs::remove_file(&path);
    result
}

pub type Result<T> = std::result::Result<T, LedgerError>;
