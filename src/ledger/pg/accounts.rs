//! `accounts` on PostgreSQL: see `ledger/accounts.rs`.

use crate::ledger::Result;

use super::PgLedger;

impl PgLedger {
    pub(in crate::ledger) async fn upsert_account(
        &self,
        now: i64,
        directory_url: &str,
        account_url: &str,
    ) -> Result<i64> {
        let mut tx = self.write().await?;
        // ON CONFLICT makes two hosts creating the account of one
        // directory at once agree on its row.
        let (id,): (i64,) = sqlx::query_as(
            "INSERT INTO accounts (directory_url, account_url, created_at) VALUES ($1, $2, $3)
             ON CONFLICT (directory_url) DO UPDATE SET account_url = excluded.account_url
             RETURNING id",
        )
        .bind(directory_url)
        .bind(account_url)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    pub(in crate::ledger) async fn accounts(&self) -> Result<Vec<(i64, String, String)>> {
        Ok(
            sqlx::query_as("SELECT id, directory_url, account_url FROM accounts ORDER BY id")
                .fetch_all(self.pool())
                .await?,
        )
    }
}
