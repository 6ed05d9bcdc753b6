//! The sealed keys of finalized orders, fleet mode only: what lets a peer
//! take a finalized order over from a host that died. The ledger keeps the
//! blob as it is given, sealed by the layer that holds the fleet key
//! ([`OrderKeySeal`]): it stores blobs and opens none. SQLite has one
//! host, whose key file beside the ledger is the record (`order/keys.rs`),
//! so there these keep nothing.

use std::fmt;
use std::sync::Arc;

use super::{Db, Ledger, Result};

/// Seals and opens a finalized order's private key for the shared
/// ledger, bound to the order's URL: the fleet key, given by the layer
/// that has it ([`Ledger::with_order_key_seal`]).
pub trait OrderKeySeal: Send + Sync + fmt::Debug {
    fn seal(&self, order_url: &str, key_pem: &[u8]) -> std::result::Result<Vec<u8>, String>;
    fn open(&self, order_url: &str, sealed: &[u8]) -> std::result::Result<Vec<u8>, String>;
}

impl Ledger {
    /// This handle with `seal`, for the callers that keep finalized
    /// orders' keys in the shared ledger. Carried, not used, by the ledger.
    #[must_use]
    pub fn with_order_key_seal(&self, seal: Arc<dyn OrderKeySeal>) -> Self {
        let mut this = self.clone();
        this.order_key_seal = Some(seal);
        this
    }

    /// The seal for finalized orders' keys, when this is a fleet's ledger
    /// that keeps them.
    pub(crate) fn order_key_seal(&self) -> Option<&dyn OrderKeySeal> {
        self.order_key_seal.as_deref()
    }

    /// Stores the sealed key of `order_url` (replacing one stored before).
    pub(crate) async fn put_order_key(&self, order_url: &str, sealed: &[u8]) -> Result<()> {
        let now = self.now();
        match &self.db {
            Db::Sqlite(_) => Ok(()),
            Db::Postgres(pg) => pg.put_order_key(now, order_url, sealed).await,
        }
    }

    /// The sealed key of `order_url`, if one is stored.
    pub(crate) async fn order_key(&self, order_url: &str) -> Result<Option<Vec<u8>>> {
        match &self.db {
            Db::Sqlite(_) => Ok(None),
            Db::Postgres(pg) => pg.order_key(order_url).await,
        }
    }

    /// Forgets the sealed key of `order_url`: its certificate is
    /// installed, or the order abandoned.
    pub(crate) async fn delete_order_key(&self, order_url: &str) -> Result<()> {
        match &self.db {
            Db::Sqlite(_) => Ok(()),
            Db::Postgres(pg) => pg.delete_order_key(order_url).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::ledger::test_util::{fence, pg_ledger};
    use crate::ledger::{Fence, LedgerError};

    /// Kept as given until forgotten, replaced by a later one; only the
    /// holder of the certificate's lease writes it.
    #[tokio::test]
    async fn an_order_key_blob_is_kept_until_forgotten_and_written_under_the_fence() {
        let (_dir, s) = pg_ledger().await;
        let url = "https://ca/order/1";
        assert_eq!(s.order_key(url).await.expect("read"), None);
        s.put_order_key(url, b"first blob").await.expect("put");
        assert_eq!(
            s.order_key(url).await.expect("read").as_deref(),
            Some(&b"first blob"[..])
        );
        s.put_order_key(url, b"second blob").await.expect("put");
        assert_eq!(
            s.order_key(url).await.expect("read").as_deref(),
            Some(&b"second blob"[..])
        );
        assert_eq!(s.order_key("https://ca/order/2").await.expect("read"), None);

        fence::set_lease(
            &s,
            "cert:www",
            fence::Lease::Held {
                holder: "a",
                epoch: 2,
                secs: 3600,
            },
        )
        .await;
        let stale = s.fenced(Fence {
            lease: "cert:www".into(),
            holder: "a".into(),
            epoch: 1,
        });
        assert!(matches!(
            stale.put_order_key(url, b"stale").await,
            Err(LedgerError::Fenced { .. })
        ));
        assert!(matches!(
            stale.delete_order_key(url).await,
            Err(LedgerError::Fenced { .. })
        ));
        assert_eq!(
            s.order_key(url).await.expect("read").as_deref(),
            Some(&b"second blob"[..])
        );
        let held = s.fenced(Fence {
            lease: "cert:www".into(),
            holder: "a".into(),
            epoch: 2,
        });
        held.delete_order_key(url).await.expect("delete");
        assert_eq!(s.order_key(url).await.expect("read"), None);
    }
}
