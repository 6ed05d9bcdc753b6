//! `ca_state` on PostgreSQL: see `ledger/ca_state.rs`.

use crate::ledger::{CaStateRow, Result};

use super::PgLedger;

impl PgLedger {
    pub(in crate::ledger) async fn ca_failed(&self, now: i64, ca: &str, error: &str) -> Result<()> {
        let mut tx = self.write().await?;
        // ON CONFLICT: two hosts failing at the same CA at once make one
        // row, whose streak starts at the first of them to insert it.
        sqlx::query(
            "INSERT INTO ca_state (ca, failing_since, last_error) VALUES ($1, $2, $3)
             ON CONFLICT (ca) DO UPDATE SET last_error = excluded.last_error",
        )
        .bind(ca)
        .bind(now)
        .bind(error)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn ca_answered(&self, ca: &str) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM ca_state WHERE ca = $1")
            .bind(ca)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn ca_states(&self) -> Result<Vec<CaStateRow>> {
        // "C": SQLite's order, by bytes, whatever the database's locale.
        Ok(sqlx::query_as(
            r#"SELECT ca, failing_since, last_error FROM ca_state ORDER BY ca COLLATE "C""#,
        )
        .fetch_all(self.pool())
        .await?)
    }
}
