//! The ACME accounts certd uses, one per directory URL.

use super::{Db, Ledger, Result};

impl Ledger {
    pub(crate) async fn upsert_account(
        &self,
        directory_url: &str,
        account_url: &str,
    ) -> Result<i64> {
        let now = self.now();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.upsert_account(now, directory_url, account_url).await,
        };
        let (id,): (i64,) = sqlx::query_as(
            "INSERT INTO accounts (directory_url, account_url, created_at) VALUES (?, ?, ?)
             ON CONFLICT(directory_url) DO UPDATE SET account_url = excluded.account_url
             RETURNING id",
        )
        .bind(directory_url)
        .bind(account_url)
        .bind(now)
        .fetch_one(pool)
        .await?;
        Ok(id)
    }

    /// The accounts in the ledger: (id, directory URL, account URL).
    pub async fn accounts(&self) -> Result<Vec<(i64, String, String)>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.accounts().await,
        };
        Ok(
            sqlx::query_as("SELECT id, directory_url, account_url FROM accounts ORDER BY id")
                .fetch_all(pool)
                .await?,
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::ledger::LedgerError;
    use crate::ledger::test_util::conformance;
    use crate::ledger::test_util::lease;

    conformance! {
        /// One account per directory: a second upsert for the same
        /// directory keeps its id and takes the new account URL.
        async fn an_account_is_one_row_per_directory(s: Ledger) {
            assert!(s.accounts().await.expect("accounts").is_empty());
            let a = s
                .upsert_account("https://ca/dir", "https://ca/acct/1")
                .await
                .expect("insert");
            let b = s
                .upsert_account("https://other/dir", "https://other/acct/9")
                .await
                .expect("insert");
            assert_ne!(a, b);
            let again = s
                .upsert_account("https://ca/dir", "https://ca/acct/2")
                .await
                .expect("update");
            assert_eq!(again, a);
            assert_eq!(
                s.accounts().await.expect("accounts"),
                [
                    (a, "https://ca/dir".to_owned(), "https://ca/acct/2".to_owned()),
                    (b, "https://other/dir".to_owned(), "https://other/acct/9".to_owned()),
                ]
            );
        }

        /// A handle fenced by a lease another host now holds writes no
        /// account on PostgreSQL; SQLite has one writer and no fences.
        async fn a_lost_lease_writes_no_account(s: Ledger) {
            let stale = lease::lost(&s, "account:https://ca/dir").await;
            let result = s
                .fenced(stale)
                .upsert_account("https://ca/dir", "https://ca/acct/1")
                .await;
            let accounts = s.accounts().await.expect("accounts");
            if s.is_shared() {
                assert!(
                    matches!(result, Err(LedgerError::Fenced { .. })),
                    "{result:?}"
                );
                assert!(accounts.is_empty(), "{accounts:?}");
            } else {
                let id = result.expect("SQLite ignores fences");
                assert_eq!(accounts.len(), 1);
                assert_eq!(accounts[0].0, id);
            }
            // The holder's own fence writes.
            let held = lease::held(&s, "account:https://ca/dir").await;
            s.fenced(held)
                .upsert_account("https://ca/dir", "https://ca/acct/1")
                .await
                .expect("a held lease writes");
            assert_eq!(s.accounts().await.expect("accounts").len(), 1);
        }
    }
}
