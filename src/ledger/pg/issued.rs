//! `issued_orders` (SQLite's `issued`) on PostgreSQL: see
//! `ledger/issued.rs`.

use crate::ledger::issued::IssuedRow;
use crate::ledger::{Identifiers, Result};

use super::PgLedger;

impl PgLedger {
    pub(in crate::ledger) async fn record_issued(
        &self,
        now: i64,
        order_url: &str,
        cert_name: &str,
        identifiers: &Identifiers,
        serial: &str,
        not_after: i64,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        // ON CONFLICT: the row of an order is one row, whichever host
        // records it first.
        sqlx::query(
            "INSERT INTO issued_orders (order_url, cert_name, identifiers, serial, not_after, issued_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (order_url) DO UPDATE SET serial = excluded.serial,
                 not_after = excluded.not_after, installed_at = NULL",
        )
        .bind(order_url)
        .bind(cert_name)
        .bind(identifiers)
        .bind(serial)
        .bind(not_after)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn waiting_issued(
        &self,
        cert_name: &str,
    ) -> Result<Option<IssuedRow>> {
        // `seq` is SQLite's rowid here: the order the rows went in.
        Ok(sqlx::query_as(
            "SELECT order_url, identifiers, serial FROM issued_orders
             WHERE cert_name = $1 AND installed_at IS NULL ORDER BY issued_at DESC, seq DESC LIMIT 1",
        )
        .bind(cert_name)
        .fetch_optional(self.pool())
        .await?)
    }

    pub(in crate::ledger) async fn issued_waiting(&self, order_url: &str) -> Result<bool> {
        let row: Option<(i32,)> = sqlx::query_as(
            "SELECT 1 FROM issued_orders WHERE order_url = $1 AND installed_at IS NULL",
        )
        .bind(order_url)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.is_some())
    }

    pub(in crate::ledger) async fn issued_done(&self, now: i64, order_url: &str) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("UPDATE issued_orders SET installed_at = $1 WHERE order_url = $2")
            .bind(now)
            .bind(order_url)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}
