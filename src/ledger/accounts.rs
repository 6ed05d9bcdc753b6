//! The ACME accounts certd uses, one per directory URL.

use super::{Ledger, Result};

impl Ledger {
    pub(crate) async fn upsert_account(
        &self,
        directory_url: &str,
        account_url: &str,
    ) -> Result<i64> {
        let (id,): (i64,) = sqlx::query_as(
            "INSERT INTO accounts (directory_url, account_url, created_at) VALUES (?, ?, ?)
             ON CONFLICT(directory_url) DO UPDATE SET account_url = excluded.account_url
             RETURNING id",
        )
        .bind(directory_url)
        .bind(account_url)
        .bind(self.now())
        .fetch_one(self.sqlite("upsert_account")?)
        .await?;
        Ok(id)
    }

    /// The accounts in the ledger: (id, directory URL, account URL).
    pub async fn accounts(&self) -> Result<Vec<(i64, String, String)>> {
        Ok(
            sqlx::query_as("SELECT id, directory_url, account_url FROM accounts ORDER BY id")
                .fetch_all(self.sqlite("accounts")?)
                .await?,
        )
    }
}
