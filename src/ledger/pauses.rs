//! CA rate limits in force, per certificate or for the whole account, so
//! that certd holds back instead of asking again too early.

use serde::Serialize;
use sqlx::FromRow;

use super::{Db, Ledger, Result};

/// The scope of a pause that holds back every order of the account.
pub(crate) const ACCOUNT_SCOPE: &str = "";

/// A CA rate limit to record (`Ledger::set_pause`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewPause<'a> {
    /// No new order before this, Unix seconds.
    pub(crate) until: i64,
    /// The CA paused the names (until an operator unpauses them).
    pub(crate) paused: bool,
    pub(crate) unpause_url: Option<&'a str>,
    /// The CA's words.
    pub(crate) detail: &'a str,
}

/// A row of `ca_pauses`.
#[derive(Debug, Clone, FromRow, Serialize)]
pub(crate) struct PauseRow {
    pub(crate) scope: String,
    pub(crate) until_at: i64,
    pub(crate) paused: bool,
    pub(crate) unpause_url: Option<String>,
    pub(crate) detail: String,
    pub(crate) since: i64,
}

impl Ledger {
    /// Records a CA rate limit in force for `scope` (a certificate name,
    /// or `ACCOUNT_SCOPE`). Returns whether it is news: no pause of the
    /// same kind was recorded for the scope since its last success, so an
    /// operator is told once, not on every retry.
    pub(crate) async fn set_pause(&self, scope: &str, pause: &NewPause<'_>) -> Result<bool> {
        let now = self.now();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.set_pause(now, scope, pause).await,
        };
        let mut tx = pool.begin().await?;
        let before: Option<(i64,)> = sqlx::query_as("SELECT paused FROM ca_pauses WHERE scope = ?")
            .bind(scope)
            .fetch_optional(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO ca_pauses (scope, until_at, paused, unpause_url, detail, since)
             VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT(scope) DO UPDATE SET until_at = excluded.until_at,
                 paused = excluded.paused, unpause_url = excluded.unpause_url,
                 detail = excluded.detail,
                 since = CASE WHEN paused = excluded.paused THEN since ELSE excluded.since END",
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
        Ok(before.is_none_or(|(p,)| (p != 0) != pause.paused))
    }

    /// The pause recorded for `scope`, if any (it may have run out).
    pub(crate) async fn pause(&self, scope: &str) -> Result<Option<PauseRow>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.pause(scope).await,
        };
        Ok(sqlx::query_as(
            "SELECT scope, until_at, paused, unpause_url, detail, since FROM ca_pauses WHERE scope = ?",
        )
        .bind(scope)
        .fetch_optional(pool)
        .await?)
    }

    /// Every pause recorded, by scope.
    pub(crate) async fn pauses(&self) -> Result<Vec<PauseRow>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.pauses().await,
        };
        Ok(sqlx::query_as(
            "SELECT scope, until_at, paused, unpause_url, detail, since FROM ca_pauses ORDER BY scope",
        )
        .fetch_all(pool)
        .await?)
    }

    /// Forgets the pause of `scope`: an order of it succeeded.
    pub(crate) async fn clear_pause(&self, scope: &str) -> Result<()> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.clear_pause(scope).await,
        };
        sqlx::query("DELETE FROM ca_pauses WHERE scope = ?")
            .bind(scope)
            .execute(pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_util::conformance;

    conformance! {
        /// A pause is news once: retries while it lasts are not, a rate limit
        /// turning into a pause is, and so is a pause after a success.
        async fn a_pause_is_news_once(s: Ledger) {
            let pause = |until, paused| NewPause {
                until,
                paused,
                unpause_url: paused.then_some("https://ca/unpause"),
                detail: "limit",
            };
            assert!(s.set_pause("a", &pause(10, false)).await.expect("set"));
            assert!(!s.set_pause("a", &pause(20, false)).await.expect("set"));
            assert!(s.set_pause("a", &pause(30, true)).await.expect("set"));
            assert!(!s.set_pause("a", &pause(40, true)).await.expect("set"));
            let row = s.pause("a").await.expect("read").expect("a pause");
            assert_eq!((row.until_at, row.paused), (40, true));
            assert_eq!(row.unpause_url.as_deref(), Some("https://ca/unpause"));
            assert!(
                s.set_pause(ACCOUNT_SCOPE, &pause(5, false))
                    .await
                    .expect("set")
            );
            assert_eq!(s.pauses().await.expect("all").len(), 2);
            s.clear_pause("a").await.expect("clear");
            assert!(s.pause("a").await.expect("read").is_none());
            assert!(s.set_pause("a", &pause(50, true)).await.expect("set"));
        }
    }
}
