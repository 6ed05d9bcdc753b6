//! `order_keys` on PostgreSQL: see `ledger/order_keys.rs`.

use crate::ledger::Result;

use super::PgLedger;

impl PgLedger {
    pub(in crate::ledger) async fn put_order_key(
        &self,
        now: i64,
        order_url: &str,
        sealed: &[u8],
    ) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO order_keys (order_url, sealed, created_at) VALUES ($1, $2, $3)
             ON CONFLICT (order_url) DO UPDATE
                SET sealed = excluded.sealed, created_at = excluded.created_at",
        )
        .bind(order_url)
        .bind(sealed)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn order_key(&self, order_url: &str) -> Result<Option<Vec<u8>>> {
        let row: Option<(Vec<u8>,)> =
            sqlx::query_as("SELECT sealed FROM order_keys WHERE order_url = $1")
                .bind(order_url)
                .fetch_optional(self.pool())
                .await?;
        Ok(row.map(|(bytes,)| bytes))
    }

    pub(in crate::ledger) async fn delete_order_key(&self, order_url: &str) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM order_keys WHERE order_url = $1")
            .bind(order_url)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}
