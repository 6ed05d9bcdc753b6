//! `ca_pauses` on PostgreSQL: see `ledger/pauses.rs`.

use crate::ledger::Result;
use crate::ledger::pauses::{NewPause, PauseRow};

use super::PgLedger;

impl PgLedger {
    pub(in crate::ledger) async fn set_pause(
        &self,
        now: i64,
        scope: &str,
        pause: &NewPause<'_>,
    ) -> Result<bool> {
        let mut tx = self.write().await?;
        // FOR UPDATE: two hosts recording the same limit at once agree on
        // which of them tells the operator.
        let before: Option<(bool,)> =
            sqlx::query_as("SELECT paused FROM ca_pauses WHERE scope = $1 FOR UPDATE")
                .bind(scope)
                .fetch_optional(&mut *tx)
                .await?;
        sqlx::query(
            "INSERT INTO ca_pauses (scope, until_at, paused, unpause_url, detail, since)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (scope) DO UPDATE SET until_at = excluded.until_at,
                 paused = excluded.paused, unpause_url = excluded.unpause_url,
                 detail = excluded.detail,
                 since = CASE WHEN ca_pauses.paused = excluded.paused
                              THEN ca_pauses.since ELSE excluded.since END",
        )
        .bind(scope)
        .bind(pause.until)
        .bind(pause.paused)
        .bind(pause.unpause_url)
        .bind(pause.detail)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(before.is_none_or(|(p,)| p != pause.paused))
    }

    pub(in crate::ledger) async fn pause(&self, scope: &str) -> Result<Option<PauseRow>> {
        Ok(sqlx::query_as(
            "SELECT scope, until_at, paused, unpause_url, detail, since FROM ca_pauses WHERE scope = $1",
        )
        .bind(scope)
        .fetch_optional(self.pool())
        .await?)
    }

    pub(in crate::ledger) async fn pauses(&self) -> Result<Vec<PauseRow>> {
        Ok(sqlx::query_as(
            "SELECT scope, until_at, paused, unpause_url, detail, since FROM ca_pauses ORDER BY scope",
        )
        .fetch_all(self.pool())
        .await?)
    }

    pub(in crate::ledger) async fn clear_pause(&self, scope: &str) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM ca_pauses WHERE scope = $1")
            .bind(scope)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}
