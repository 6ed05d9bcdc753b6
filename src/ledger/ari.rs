//! The CA's latest ARI answer for each installed certificate.

use super::{AriRecord, Db, Ledger, Result};

impl Ledger {
    /// Records the CA's ARI answer for the installed certificate `serial`
    /// of `name`. An error keeps the window of an earlier good answer about
    /// the same certificate: that window still holds.
    pub(crate) async fn record_ari(
        &self,
        name: &str,
        serial: &str,
        ari: &AriRecord<'_>,
    ) -> Result<()> {
        let now = self.now();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.record_ari(now, name, serial, ari).await,
        };
        sqlx::query(
            "UPDATE certificates SET
                 ari_window_start = CASE WHEN ?2 IS NOT NULL THEN ?2
                     WHEN ari_serial = ?1 THEN ari_window_start END,
                 ari_window_end = CASE WHEN ?2 IS NOT NULL THEN ?3
                     WHEN ari_serial = ?1 THEN ari_window_end END,
                 ari_explanation_url = CASE WHEN ?2 IS NOT NULL THEN ?4
                     WHEN ari_serial = ?1 THEN ari_explanation_url END,
                 ari_serial = ?1, ari_checked_at = ?5, ari_next_check = ?6, ari_error = ?7,
                 updated_at = ?5
             WHERE name = ?8",
        )
        .bind(serial)
        .bind(ari.window.map(|w| w.start))
        .bind(ari.window.map(|w| w.end))
        .bind(ari.window.and_then(|w| w.explanation_url))
        .bind(now)
        .bind(ari.next_check)
        .bind(ari.error)
        .bind(name)
        .execute(pool)
        .await?;
        Ok(())
    }
}
