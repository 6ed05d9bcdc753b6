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
    use super::*;
    use crate::ledger::test_util::{START, conformance};

    conformance! {
        /// A streak starts at the first failure and keeps that start
        /// through later ones, until the CA answers; the next failure
        /// starts a new one.
        async fn a_streak_keeps_its_start_until_the_ca_answers(s: Ledger) {
            let minute = std::time::Duration::from_secs(60);
            s.ca_failed("le", "connection refused").await.expect("failed");
            s.clock().advance(minute);
            s.ca_failed("le", "503").await.expect("failed");
            s.ca_failed("other", "timeout").await.expect("failed");
            let row = |ca: &str, failing_since, last_error: &str| CaStateRow {
                ca: ca.to_owned(),
                failing_since,
                last_error: last_error.to_owned(),
            };
            assert_eq!(
                s.ca_states().await.expect("read"),
                [row("le", START, "503"), row("other", START + 60, "timeout")]
            );
            s.ca_answered("le").await.expect("answered");
            assert_eq!(
                s.ca_states().await.expect("read"),
                [row("other", START + 60, "timeout")]
            );
            s.ca_answered("none").await.expect("answered");
            s.clock().advance(minute);
            s.ca_failed("le", "refused").await.expect("failed");
            assert_eq!(
                s.ca_states().await.expect("read"),
                [row("le", START + 120, "refused"), row("other", START + 60, "timeout")]
            );
        }

        /// The failing CAs come in name order, by bytes.
        async fn the_failing_cas_are_listed_by_name(s: Ledger) {
            for ca in ["b", "a_b", "B", "a-b", "a"] {
                s.ca_failed(ca, "503").await.expect("failed");
            }
            let states = s.ca_states().await.expect("read");
            let cas: Vec<&str> = states.iter().map(|r| r.ca.as_str()).collect();
            assert_eq!(cas, ["B", "a", "a-b", "a_b", "b"]);
        }
    }
}
