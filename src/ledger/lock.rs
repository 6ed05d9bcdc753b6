//! The state directory's lock, and the identity of the ledger's file, so
//! that one process at a time writes a ledger and a daemon notices its file
//! being deleted or replaced under it.

use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::Path;

use super::{LedgerError, Result};

/// The lock file in the state directory.
const LOCK_FILE: &str = "certd.lock";

/// The state directory's lock: `certd.lock`, locked with `flock` for the
/// holder's lifetime and holding its PID, so a second process can say who
/// holds it. The kernel drops the lock when the process ends, however it
/// ends, so a stale file never blocks anyone.
#[derive(Debug)]
pub(crate) struct StateLock {
    // Held only to keep the lock: closing the file releases it.
    _file: File,
}

impl StateLock {
    /// Takes the lock of `state_dir`, or says who holds it.
    pub(crate) fn acquire(state_dir: &Path) -> Result<StateLock> {
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
pub(crate) struct FileIdentity {
    dev: u64,
    ino: u64,
}

impl FileIdentity {
    /// The identity of the file at `path` now.
    pub(crate) fn of(path: &Path) -> io::Result<FileIdentity> {
        let meta = std::fs::metadata(path)?;
        Ok(FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// `Ok` while `path` still names this file; [`LedgerError::Gone`] once
    /// it is deleted or replaced. Other errors (a permission change) are
    /// not taken as deletion.
    pub(crate) fn check(&self, path: &Path) -> Result<()> {
        match FileIdentity::of(path) {
            Ok(now) if now == *self => Ok(()),
            Err(e) if e.kind() != io::ErrorKind::NotFound => Ok(()),
            _ => Err(LedgerError::Gone {
                path: path.display().to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
