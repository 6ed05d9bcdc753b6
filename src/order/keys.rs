//! The keys of finalized orders, kept beside the ledger until their
//! certificate is installed: an order interrupted after `finalize` is
//! downloaded with its stored key rather than issued a second time.
//!
//! In fleet mode the host that finalizes may die, and a peer takes the
//! order over: the key is then also kept sealed by the fleet key (the
//! order's URL as associated data) in the shared ledger, never unsealed
//! there, so the peer can download the certificate with it.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::KeyPair;
use ring::rand::SystemRandom;

use crate::fleet::{FleetKey, SealContext, Sealed};
use crate::ledger::{Ledger, LedgerError, OrderKeySeal};

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

/// The fleet key as the shared ledger's [`OrderKeySeal`]: AES-256-GCM,
/// the order's URL as associated data, so a key stored for one order
/// never opens as another's.
#[derive(Debug)]
pub(crate) struct FleetOrderKeys(pub(crate) FleetKey);

impl OrderKeySeal for FleetOrderKeys {
    fn seal(&self, order_url: &str, key_pem: &[u8]) -> Result<Vec<u8>, String> {
        self.0
            .seal(&SystemRandom::new(), &order_key_context(order_url), key_pem)
            .map(Sealed::into_bytes)
            .map_err(|e| e.to_string())
    }

    fn open(&self, order_url: &str, sealed: &[u8]) -> Result<Vec<u8>, String> {
        self.0
            .unseal(
                &order_key_context(order_url),
                &Sealed::from_bytes(sealed.to_vec()),
            )
            .map_err(|e| e.to_string())
    }
}

/// Keeps the key of `order_url` before `finalize` is sent: the file
/// beside the ledger ([`store_order_key`]) and, in fleet mode, sealed in
/// the shared ledger (through the lease's fence) for a peer to resume
/// the order with.
pub(super) async fn keep_order_key(
    store: &Ledger,
    dir: &Path,
    order_url: &str,
    pem: &str,
) -> Result<(), DriveError> {
    if let Some(seal) = store.order_key_seal() {
        let sealed = seal.seal(order_url, pem.as_bytes()).map_err(|e| {
            DriveError::Key(format!("cannot seal the key of order {order_url}: {e}"))
        })?;
        store.put_order_key(order_url, &sealed).await?;
    }
    store_order_key(dir, order_url, pem).await
}

/// The key of `order_url` as [`keep_order_key`] kept it: the file beside
/// the ledger, else (fleet mode, a peer finalized the order) the sealed
/// copy in the shared ledger. A sealed copy that does not open (another
/// fleet key) is reported and treated as none.
pub(super) async fn find_order_key(
    store: &Ledger,
    dir: &Path,
    order_url: &str,
) -> Result<Option<(KeyPair, String)>, DriveError> {
    if let Some(found) = load_order_key(dir, order_url).await {
        return Ok(Some(found));
    }
    let Some(seal) = store.order_key_seal() else {
        return Ok(None);
    };
    let Some(sealed) = store.order_key(order_url).await? else {
        return Ok(None);
    };
    let opened = seal
        .open(order_url, &sealed)
        .and_then(|plain| String::from_utf8(plain).map_err(|_| "not UTF-8".to_owned()))
        .and_then(|pem| match KeyPair::from_pem(&pem) {
            Ok(key) => Ok((key, pem)),
            Err(e) => Err(format!("not a private key: {e}")),
        });
    match opened {
        Ok(found) => Ok(Some(found)),
        Err(e) => {
            tracing::warn!(order = order_url, error = %e, "the sealed key of the order in the fleet's database is unusable");
            Ok(None)
        }
    }
}

/// Whether a key of `order_url` is kept, here or (fleet mode) sealed in
/// the shared ledger.
pub(crate) async fn has_order_key(
    store: &Ledger,
    dir: &Path,
    order_url: &str,
) -> Result<bool, LedgerError> {
    if order_key_path(dir, order_url).exists() {
        return Ok(true);
    }
    if store.order_key_seal().is_none() {
        return Ok(false);
    }
    Ok(store.order_key(order_url).await?.is_some())
}

/// Forgets the key of `order_url` wherever [`keep_order_key`] kept it:
/// its certificate is installed, or the order is given up.
pub(crate) async fn forget_order_key(store: &Ledger, dir: &Path, order_url: &str) {
    remove_order_key(dir, order_url).await;
    if store.order_key_seal().is_some()
        && let Err(e) = store.delete_order_key(order_url).await
    {
        tracing::warn!(order = order_url, error = %e, "cannot remove the sealed order key from the fleet's database");
    }
}

/// What an order's key is sealed for: its order's URL.
fn order_key_context(order_url: &str) -> SealContext {
    SealContext::OrderKey {
        order_url: order_url.to_owned(),
    }
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

    /// Sealed, the key is not in the blob; it opens for its own order
    /// only, and not under another fleet key.
    #[test]
    fn an_order_key_opens_for_its_order_under_its_fleet_key_only() {
        let seal = FleetOrderKeys(FleetKey::from_bytes(&[5; 32]));
        let pem = b"-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n";
        let sealed = seal.seal("https://ca/order/1", pem).expect("seal");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(seal.open("https://ca/order/1", &sealed).expect("open"), pem);
        assert!(seal.open("https://ca/order/2", &sealed).is_err());
        let other = FleetOrderKeys(FleetKey::from_bytes(&[6; 32]));
        let e = other
            .open("https://ca/order/1", &sealed)
            .expect_err("another key");
        assert!(e.contains(&seal.0.id().to_string()), "names the key: {e}");
    }

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
