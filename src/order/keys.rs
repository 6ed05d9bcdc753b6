//! The keys of finalized orders, kept beside the ledger until their
//! certificate is installed: an order interrupted after `finalize` is
//! downloaded with its stored key rather than issued a second time.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::KeyPair;

use crate::ledger::{Ledger, LedgerError};

use super::DriveError;

/// Where the keys of finalized orders wait for their certificate: beside
/// the ledger, which names the orders.
pub(crate) async fn order_key_dir(store: &Ledger) -> Result<PathBuf, LedgerError> {
    Ok(store.ledger_dir().await?.join("order-keys"))
}

/// The stored key of `order_url`: named by a digest of the URL, so the
/// ledger needs no column for it.
pub(crate) fn order_key_path(dir: &Path, order_url: &str) -> PathBuf {
    let digest = ring::digest::digest(&ring::digest::SHA256, order_url.as_bytes());
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    dir.join(format!("{hex}.pem"))
}

/// Writes the key of `order_url`: created 0600 (never widened later),
/// never through a symlink or over an existing file, and fsynced with its
/// directory entry before this returns.
pub(super) async fn store_order_key(
    dir: &Path,
    order_url: &str,
    pem: &str,
) -> Result<(), DriveError> {
    let path = order_key_path(dir, order_url);
    let (dir, pem) = (dir.to_owned(), pem.to_owned());
    let target = path.clone();
    tokio::task::spawn_blocking(move || -> io::Result<()> {
        DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&target)?;
        file.write_all(pem.as_bytes())?;
        file.sync_all()?;
        File::open(&dir)?.sync_all()
    })
    .await
    .map_err(|e| DriveError::Key(format!("key task failed: {e}")))?
    .map_err(|source| DriveError::KeyFile { path, source })
}

/// The stored key of `order_url`, if there is a usable one.
pub(super) async fn load_order_key(dir: &Path, order_url: &str) -> Option<(KeyPair, String)> {
    let path = order_key_path(dir, order_url);
    let pem = tokio::fs::read_to_string(&path).await.ok()?;
    match KeyPair::from_pem(&pem) {
        Ok(key) => Some((key, pem)),
        Err(e) => {
            tracing::warn!(order = order_url, path = %path.display(), error = %e, "the stored order key is unreadable");
            None
        }
    }
}

/// Removes the stored key of `order_url`, if any: once its certificate is
/// installed, or the order is abandoned.
pub(crate) async fn remove_order_key(dir: &Path, order_url: &str) {
    let path = order_key_path(dir, order_url);
    match tokio::fs::remove_file(&path).await {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(order = order_url, path = %path.display(), error = %e, "cannot remove the stored order key");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeyType;
    use crate::order::finalize::generate_key;

    #[tokio::test]
    async fn order_keys_are_created_0600_once_and_never_through_a_link() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("order-keys");
        let url = "https://ca.example/order/1";
        let (_, pem) = generate_key(KeyType::EcdsaP256).await.expect("key");
        store_order_key(&dir, url, &pem).await.expect("store");
        let path = order_key_path(&dir, url);
        let mode = std::fs::metadata(&path)
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (_, loaded) = load_order_key(&dir, url).await.expect("load");
        assert_eq!(loaded, pem);
        // Never over an existing key.
        let again = store_order_key(&dir, url, &pem).await;
        assert!(
            matches!(again, Err(DriveError::KeyFile { .. })),
            "{again:?}"
        );
        // Never through a symlink planted where the key goes.
        remove_order_key(&dir, url).await;
        let elsewhere = tmp.path().join("elsewhere");
        std::os::unix::fs::symlink(&elsewhere, &path).expect("symlink");
        let linked = store_order_key(&dir, url, &pem).await;
        assert!(
            matches!(linked, Err(DriveError::KeyFile { .. })),
            "{linked:?}"
        );
        assert!(!elsewhere.exists());
    }
}
