//! The disk under certd: a small tmpfs to fill up or make read-only, a
//! byte-for-byte snapshot of installed files, and the ledger's own
//! integrity check.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::TestEnv;

/// A tmpfs mounted over a directory for the test's lifetime.
pub struct TinyDisk {
    path: PathBuf,
}

impl TinyDisk {
    /// Mounts a tmpfs of `size` (mount(8) syntax, e.g. "128k") over `path`.
    /// Panics unless that works: it needs root, which CI has, and a test
    /// of a full disk that quietly ran without one would prove nothing.
    pub fn mount(path: &Path, size: &str) -> TinyDisk {
        fs::create_dir_all(path).expect("mount point");
        let status = Command::new("mount")
            // tmpfs is 1777 by default, which certd refuses as its state
            // or certificate directory (others could write there).
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CI runs as root)"
        );
        TinyDisk {
            path: path.to_owned(),
        }
    }

    /// `mount -o remount,OPTION`, e.g. "ro" or "rw".
    pub fn remount(&self, option: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{option}")])
            .arg(&self.path)
            .status()
            .expect("run mount");
        assert!(status.success(), "remount {option}");
    }

    /// Fills what is left of the disk with a file; returns its path.
    /// The write fails part-way by design (no space left).
    pub fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let _ = fs::write(&filler, vec![0u8; 64 * 1024 * 1024]);
        filler
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Every file under `dir` (recursively) with its bytes, to prove that
/// something left them exactly as they were.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        let entries = fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let bytes =
                    fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
                files.insert(path, bytes);
            }
        }
    }
    files
}

/// `PRAGMA integrity_check` of the environment's ledger ("ok" if sound).
pub fn integrity(env: &TestEnv) -> String {
    with_ledger(env, |store| async move {
        store.integrity_check().await.expect("integrity_check")
    })
}

/// Folds the ledger's write-ahead log into `certd.db`, so that what a test
/// does to that file is what SQLite reads (pages still in the log would
/// otherwise mask it).
pub fn checkpoint(env: &TestEnv) {
    with_ledger(env, |store| async move {
        store.checkpoint().await.expect("checkpoint");
    });
}

fn with_ledger<T, F: std::future::Future<Output = T>>(
    env: &TestEnv,
    f: impl FnOnce(certd::ledger::Ledger) -> F,
) -> T {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let store = certd::ledger::Ledger::open(
            &env.state_dir().join("certd.db"),
            certd::clock::Clock::system(),
        )
        .await
        .expect("ledger");
        let r = f(store.clone()).await;
        store.close().await;
        r
    })
}
