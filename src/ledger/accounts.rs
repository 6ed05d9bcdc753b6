//! The ACME accounts certd uses, one per directory URL.

use super::{Ledger, Result};

impl Ledger {
    pub async fn account_id(&self, directory_url: &str) -> Result<Option<i64>> {
        let row: Option<(i64,)> = sqlx::query_as("SELECT id FROM accounts WHERE directory_url = ?")
            .bind(directory_url)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.0))
    }

    pub async fn upsert_account(&self, directory_url: &str, account_url: &str) -> Result<i64> {
        let (id,): (i64,) = sqlx::query_as(
            "INSERT INTO accounts (directory_url, account_url, created_at) VALUES (?, ?, ?)
             ON CONFLICT(directory_url) DO UPDATE SET account_url = excluded.account_url
             RETURNING id",
        )
        .bind(directory_url)
        .bind(account_url)
        .bind(self.now())
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    /// The accounts in the ledger: (id, directory URL, account URL).
    pub async fn accounts(&self) -> Result<Vec<(i64, String, String)>> {
        Ok(
            sqlx::query_as("SELECT id, directory_url, account_url FROM accounts ORDER BY id")
                .fetch_all(&self.pool)
                .await?,
        )
    }
}
