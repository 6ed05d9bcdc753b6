//! The ARI columns of `certificates` on PostgreSQL: see `ledger/ari.rs`.

use crate::ledger::{AriRecord, Result};

use super::PgLedger;

impl PgLedger {
    pub(in crate::ledger) async fn record_ari(
        &self,
        now: i64,
        name: &str,
        serial: &str,
        ari: &AriRecord<'_>,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        // One UPDATE: the old row's window is read under the row lock it
        // takes, so another host's answer lands wholly before or after.
        sqlx::query(
            "UPDATE certificates SET
                 ari_window_start = CASE WHEN $2::bigint IS NOT NULL THEN $2
                     WHEN ari_serial = $1 THEN ari_window_start END,
                 ari_window_end = CASE WHEN $2::bigint IS NOT NULL THEN $3
                     WHEN ari_serial = $1 THEN ari_window_end END,
                 ari_explanation_url = CASE WHEN $2::bigint IS NOT NULL THEN $4
                     WHEN ari_serial = $1 THEN ari_explanation_url END,
                 ari_serial = $1, ari_checked_at = $5, ari_next_check = $6, ari_error = $7,
                 updated_at = $5
             WHERE name = $8",
        )
        .bind(serial)
        .bind(ari.window.map(|w| w.start))
        .bind(ari.window.map(|w| w.end))
        .bind(ari.window.and_then(|w| w.explanation_url))
        .bind(now)
        .bind(ari.next_check)
        .bind(ari.error)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
