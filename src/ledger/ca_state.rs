//! Per CA, the current streak of failures (unreachable, 5xx): when it
//! began, so that falling back to the next CA is measured from it across
//! runs, and what the last failure was.

use super::{Db, Ledger, Result};

/// A row of `ca_state`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct CaStateRow {
    pub(crate) ca: String,
    pub(crate) failing_since: i64,
    pub(crate) last_error: String,
}

impl Ledger {
    /// Records a failure at `ca`; the streak's start stays where it was.
    pub(crate) async fn ca_failed(&self, ca: &str, error: &str) -> Result<()> {
        let now = self.now();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.ca_failed(now, ca, error).await,
        };
        sqlx::query(
            "INSERT INTO ca_state (ca, failing_since, last_error) VALUES (?, ?, ?)
             ON CONFLICT(ca) DO UPDATE SET last_error = excluded.last_error",
        )
        .bind(ca)
        .bind(now)
        .bind(error)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// Ends the streak of failures at `ca`.
    pub(crate) async fn ca_answered(&self, ca: &str) -> Result<()> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.ca_answered(ca).await,
        };
        sqlx::query("DELETE FROM ca_state WHERE ca = ?")
            .bind(ca)
            .execute(pool)
            .await?;
        Ok(())
    }

    /// The CAs failing now.
    pub(crate) async fn ca_states(&self) -> Result<Vec<CaStateRow>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.ca_states().await,
        };
        Ok(
            sqlx::query_as("SELECT ca, failing_since, last_error FROM ca_state ORDER BY ca")
                .fetch_all(pool)
                .await?,
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::ledger::test_util::ledger;

    #[tokio::test]
    async fn a_streak_keeps_its_start_until_the_ca_answers() {
        let (_dir, s) = ledger().await;
        s.ca_failed("le", "connection refused").await.unwrap();
        let first = s.ca_states().await.unwrap();
        s.ca_failed("le", "503").await.unwrap();
        let again = s.ca_states().await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].failing_since, first[0].failing_since);
        assert_eq!(again[0].last_error, "503");
        s.ca_answered("le").await.unwrap();
        assert!(s.ca_states().await.unwrap().is_empty());
    }
}
