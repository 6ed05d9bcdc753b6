//! The sealed keys of finalized orders, fleet mode only: what lets a peer
//! take a finalized order over from a host that died. The ledger keeps the
//! blob sealed by the fleet key, opaque: it seals and unseals nothing.
//! SQLite has one host, whose key file beside the ledger is the record
//! (`order/keys.rs`), so there these keep nothing.

use std::sync::Arc;

use crate::fleet::{FleetKey, Sealed};

use super::{Db, Ledger, Result};

impl Ledger {
    /// This handle with `key`, the fleet key, to seal what the shared
    /// ledger keeps sealed (finalized orders' keys). Carried, not used,
    /// by the ledger.
    #[must_use]
    pub fn with_fleet_key(&self, key: FleetKey) -> Self {
        let mut this = self.clone();
        this.fleet_key = Some(Arc::new(key));
        this
    }

    /// The fleet key, when this is a fleet's ledger that seals.
    pub(crate) fn fleet_key(&self) -> Option<&FleetKey> {
        self.fleet_key.as_deref()
    }

    /// Stores the sealed key of `order_url` (replacing one stored before).
    pub(crate) async fn put_order_key(&self, order_url: &str, sealed: &Sealed) -> Result<()> {
        let now = self.now();
        match &self.db {
            Db::Sqlite(_) => Ok(()),
            Db::Postgres(pg) => pg.put_order_key(now, order_url, sealed).await,
        }
    }

    /// The sealed key of `order_url`, if one is stored.
    pub(crate) async fn order_key(&self, order_url: &str) -> Result<Option<Sealed>> {
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
    use ring::rand::SystemRandom;

    use super::*;
    use crate::fleet::SealContext;
    use crate::ledger::test_util::{fence, pg_ledger};
    use crate::ledger::{Fence, LedgerError};

    /// Stored sealed, read back as stored, replaced, forgotten; only the
    /// holder of the certificate's lease writes it.
    #[tokio::test]
    async fn a_sealed_order_key_is_kept_until_forgotten_and_written_under_the_fence() {
        let (_dir, s) = pg_ledger().await;
        let key = FleetKey::from_bytes(&[3; 32]);
        let url = "https://ca/order/1";
        let context = SealContext::OrderKey {
            order_url: url.to_owned(),
        };
        let seal = |text: &[u8]| {
            key.seal(&SystemRandom::new(), &context, text)
                .expect("seal")
        };
        assert_eq!(s.order_key(url).await.expect("read"), None);
        let first = seal(b"first key");
        s.put_order_key(url, &first).await.expect("put");
        let stored = s.order_key(url).await.expect("read").expect("stored");
        assert_eq!(stored, first);
        assert!(!stored.as_bytes().windows(9).any(|w| w == b"first key"));
        assert_eq!(key.unseal(&context, &stored).expect("unseal"), b"first key");
        let second = seal(b"second key");
        s.put_order_key(url, &second).await.expect("put");
        assert_eq!(s.order_key(url).await.expect("read"), Some(second));

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
            stale.put_order_key(url, &first).await,
            Err(LedgerError::Fenced { .. })
        ));
        assert!(matches!(
            stale.delete_order_key(url).await,
            Err(LedgerError::Fenced { .. })
        ));
        let held = s.fenced(Fence {
            lease: "cert:www".into(),
            holder: "a".into(),
            epoch: 2,
        });
        held.delete_order_key(url).await.expect("delete");
        assert_eq!(s.order_key(url).await.expect("read"), None);
    }
}
