//! The state directory's lock a writing command takes, and the checks
//! made before it: the directories, the files in them that another user
//! may own, and the ledger's integrity.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::app::dirs::{ensure_dirs, user_label, user_name};
use crate::config::Config;
use crate::ledger::{Ledger, StateLock};

/// Takes the state directory's lock, then checks the ledger (when there is
/// one, or when `create` asks for it): a writer refuses a ledger in use by
/// another certd, a corrupt one, or one it cannot write, before it starts.
pub(super) async fn claim_ledger(cfg: &Config, create: bool) -> anyhow::Result<StateLock> {
    ensure_dirs(cfg)?;
    check_state_files(&cfg.storage.state_dir)?;
    let lock = StateLock::acquire(&cfg.storage.state_dir)?;
    let db = cfg.db_path();
    if create || db.exists() {
        Ledger::open_checked(&db, crate::clock::Clock::system())
            .await?
            .close()
            .await;
    }
    Ok(lock)
}

/// A file in the state directory certd's user does not own, left by a
/// command run as another user: SQLite would only say "attempt to write a
/// readonly database", naming neither the file nor its owner.
#[derive(Debug, thiserror::Error)]
#[error(
    "{path} is owned by {owner}, not by the user certd runs as ({me}): certd cannot write it. \
     Fix: chown {me_name} {path}",
    owner = user_label(*owner),
    me = user_label(*me),
    path = path.display()
)]
pub(crate) struct ForeignFile {
    path: PathBuf,
    owner: u32,
    me: u32,
    me_name: String,
}

/// Refuses a state directory holding a file of certd's that another user
/// owns (root reads and writes them all, so only other users are checked).
fn check_state_files(state_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let me = crate::safefs::euid();
    if me == 0 {
        return Ok(());
    }
    let entries = std::fs::read_dir(state_dir)
        .with_context(|| format!("state_dir {}", state_dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("state_dir {}", state_dir.display()))?;
        // certd's own files only: the ledger and its companions, the lock,
        // the account keys, the control socket.
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with("certd.")
            || name.starts_with("account-")
            || name == crate::daemon::control::SOCKET_FILE)
        {
            continue;
        }
        let meta = entry
            .metadata()
            .with_context(|| format!("{}", entry.path().display()))?;
        if meta.uid() != me {
            return Err(ForeignFile {
                path: entry.path(),
                owner: meta.uid(),
                me,
                me_name: user_name(me).unwrap_or_else(|| me.to_string()),
            }
            .into());
        }
    }
    Ok(())
}
