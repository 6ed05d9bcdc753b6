//! Authorizations and their challenges: what the CA last said of each, who
//! deactivated it, and the reaper's and guard's views of them.

use serde::Serialize;
use sqlx::FromRow;

use super::{Actor, AuthzStatus, ChallengeStatus, Db, Ledger, Result};

/// An authorization as `certd authz list` shows it.
#[derive(Debug, Clone, FromRow, Serialize)]
pub(crate) struct AuthzRow {
    pub(crate) url: String,
    pub(crate) identifier: String,
    pub(crate) status: AuthzStatus,
    pub(crate) order_url: Option<String>,
    pub(crate) challenge_type: Option<String>,
    #[serde(serialize_with = "crate::clock::serialize_opt_rfc3339")]
    pub(crate) created_at: Option<i64>,
    #[serde(serialize_with = "crate::clock::serialize_opt_rfc3339")]
    pub(crate) updated_at: Option<i64>,
}

/// One authorization of an order, as recorded before any challenge is answered.
#[derive(Debug, Clone)]
pub(crate) struct NewAuthz {
    pub(crate) url: String,
    pub(crate) identifier: String,
    pub(crate) status: AuthzStatus,
    pub(crate) expires_at: Option<i64>,
    pub(crate) challenges: Vec<NewChallenge>,
}

/// One challenge of an authorization, as the CA offered it.
#[derive(Debug, Clone)]
pub(crate) struct NewChallenge {
    pub(crate) url: String,
    /// The challenge type as the CA names it (`http-01`, …).
    pub(crate) kind: String,
    pub(crate) status: ChallengeStatus,
}

/// Which page of stale pending authorizations the reaper asks for
/// (`Ledger::stale_pending_authz`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StalePage {
    pub(crate) account_id: i64,
    /// Only authorizations created at or before this, Unix seconds.
    pub(crate) cutoff: i64,
    /// The time now, for the backoff of failed checks.
    pub(crate) now: i64,
    /// Include rows in backoff (an operator's explicit `certd reap`).
    pub(crate) ignore_backoff: bool,
    /// Rows with an id above this one.
    pub(crate) after_id: i64,
    pub(crate) limit: i64,
}

/// A stale pending authorization, as the reaper pages through them.
#[derive(Debug, Clone, FromRow)]
pub(crate) struct PendingAuthz {
    pub(crate) id: i64,
    pub(crate) url: String,
    pub(crate) identifier: String,
    pub(crate) expires_at: Option<i64>,
    pub(crate) order_url: Option<String>,
}

impl Ledger {
    /// Notes which challenge certd is about to answer for an authorization.
    pub(crate) async fn set_authz_challenge(
        &self,
        authz_url: &str,
        kind: &str,
        challenge_url: &str,
    ) -> Result<()> {
        let now = self.now();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => {
                return pg
                    .set_authz_challenge(now, authz_url, kind, challenge_url)
                    .await;
            }
        };
        sqlx::query("UPDATE authorizations SET challenge_type = ?, challenge_url = ?, updated_at = ? WHERE url = ?")
            .bind(kind)
            .bind(challenge_url)
            .bind(now)
            .bind(authz_url)
            .execute(pool)
            .await?;
        Ok(())
    }

    /// Records the CA's latest word on an authorization.
    pub(crate) async fn set_authz_status(
        &self,
        authz_url: &str,
        status: AuthzStatus,
        error: Option<&str>,
    ) -> Result<()> {
        let now = self.now();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.set_authz_status(now, authz_url, status, error).await,
        };
        let mut tx = pool.begin().await?;
        sqlx::query(
            "UPDATE authorizations SET status = ?, error = COALESCE(?, error), updated_at = ? WHERE url = ?",
        )
        .bind(status)
        .bind(error)
        .bind(now)
        .bind(authz_url)
        .execute(&mut *tx)
        .await?;
        // The answered challenge follows its authorization to a final state.
        sqlx::query(
            "UPDATE challenges SET status = ? WHERE url = (SELECT challenge_url FROM authorizations WHERE url = ?)",
        )
        .bind(ChallengeStatus::from(status))
        .bind(authz_url)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a deactivation: `from` is the status the CA reported just
    /// before (a pending one costs failure budget at some CAs).
    pub(crate) async fn set_authz_deactivated(
        &self,
        authz_url: &str,
        by: Actor,
        from: AuthzStatus,
    ) -> Result<()> {
        let now = self.now();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.set_authz_deactivated(now, authz_url, by, from).await,
        };
        sqlx::query(
            "UPDATE authorizations SET status = ?, deactivated_at = ?, deactivated_by = ?,
                 deactivated_from = ?, updated_at = ?, check_error = NULL WHERE url = ?",
        )
        .bind(AuthzStatus::Deactivated)
        .bind(now)
        .bind(by)
        .bind(from)
        .bind(now)
        .bind(authz_url)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// The authorizations of `order_url` the ledger still believes pending:
    /// (URL, identifier).
    pub(crate) async fn pending_authz_of_order(
        &self,
        order_url: &str,
    ) -> Result<Vec<(String, String)>> {
        self.authz_of_order(order_url, AuthzStatus::Pending).await
    }

    /// The authorizations of `order_url` with `status`: (URL, identifier).
    pub(crate) async fn authz_of_order(
        &self,
        order_url: &str,
        status: AuthzStatus,
    ) -> Result<Vec<(String, String)>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.authz_of_order(order_url, status).await,
        };
        Ok(sqlx::query_as(
            "SELECT a.url, a.identifier FROM authorizations a
             JOIN order_authorizations oa ON oa.authz_id = a.id
             JOIN orders o ON o.id = oa.order_id
             WHERE o.url = ? AND a.status = ? ORDER BY a.id",
        )
        .bind(order_url)
        .bind(status)
        .fetch_all(pool)
        .await?)
    }

    /// The ledger's authorizations, newest first, each with the latest order
    /// that referenced it.
    pub(crate) async fn authz_list(&self, pending_only: bool) -> Result<Vec<AuthzRow>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.authz_list(pending_only).await,
        };
        Ok(sqlx::query_as(&authz_list_sql(pending_only))
            .fetch_all(pool)
            .await?)
    }

    /// Final outcomes of the challenges certd answered for `identifier`:
    /// (type, status), newest first; the input of challenge fallback.
    pub(crate) async fn challenge_history(
        &self,
        identifier: &str,
    ) -> Result<Vec<(String, AuthzStatus)>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.challenge_history(identifier).await,
        };
        Ok(sqlx::query_as(
            "SELECT challenge_type, status FROM authorizations
             WHERE identifier = ? AND challenge_type IS NOT NULL AND status IN ('valid', 'invalid')
             ORDER BY updated_at DESC, id DESC LIMIT 20",
        )
        .bind(identifier)
        .fetch_all(pool)
        .await?)
    }

    /// Pending authorizations per certificate name, counted once each.
    pub(crate) async fn pending_authz_by_cert(&self) -> Result<Vec<(String, i64)>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.pending_authz_by_cert().await,
        };
        Ok(sqlx::query_as(
            "SELECT o.cert_name, COUNT(DISTINCT a.id) FROM authorizations a
             JOIN order_authorizations oa ON oa.authz_id = a.id
             JOIN orders o ON o.id = oa.order_id
             WHERE a.status = 'pending' GROUP BY o.cert_name",
        )
        .fetch_all(pool)
        .await?)
    }

    /// One certificate's pending authorizations: (identifier, URL,
    /// created at), oldest first, for `certd status NAME`.
    pub(crate) async fn pending_authz_of(
        &self,
        cert_name: &str,
    ) -> Result<Vec<(String, String, i64)>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.pending_authz_of(cert_name).await,
        };
        Ok(sqlx::query_as(
            "SELECT DISTINCT a.identifier, a.url, a.created_at FROM authorizations a
             JOIN order_authorizations oa ON oa.authz_id = a.id
             JOIN orders o ON o.id = oa.order_id
             WHERE a.status = 'pending' AND o.cert_name = ? ORDER BY a.created_at, a.id",
        )
        .bind(cert_name)
        .fetch_all(pool)
        .await?)
    }

    /// Pending authorizations created at or before `cutoff` whose backoff has
    /// passed, in id order after `after_id`: the reaper walks the ledger in
    /// pages so a pass over 10,000 stale rows holds neither all of them in
    /// memory nor a lock between pages.
    ///
    /// Rows in backoff (a failed CA call) are skipped until `check_after`
    /// unless `ignore_backoff` (an operator's explicit `certd reap`).
    pub(crate) async fn stale_pending_authz(&self, page: StalePage) -> Result<Vec<PendingAuthz>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.stale_pending_authz(page).await,
        };
        Ok(sqlx::query_as(
            "SELECT a.id, a.url, a.identifier, a.expires_at,
                    (SELECT o.url FROM order_authorizations oa JOIN orders o ON o.id = oa.order_id
                      WHERE oa.authz_id = a.id ORDER BY o.id DESC LIMIT 1) AS order_url
             FROM authorizations a
             WHERE a.account_id = ? AND a.status = 'pending' AND a.created_at <= ?
               AND (a.check_after IS NULL OR a.check_after <= ?) AND a.id > ?
             ORDER BY a.id LIMIT ?",
        )
        .bind(page.account_id)
        .bind(page.cutoff)
        .bind(if page.ignore_backoff {
            i64::MAX
        } else {
            page.now
        })
        .bind(page.after_id)
        .bind(page.limit)
        .fetch_all(pool)
        .await?)
    }

    /// Failed validations plus deactivations of pending authorizations for
    /// `identifier` (and its wildcard) since `since`: what Let's Encrypt
    /// counts against "failed authorizations per identifier per hour".
    pub(crate) async fn failures_since(
        &self,
        account_id: i64,
        identifier: &str,
        since: i64,
    ) -> Result<i64> {
        let base = identifier.trim_start_matches("*.");
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.failures_since(account_id, base, since).await,
        };
        let (n,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM authorizations
             WHERE account_id = ? AND identifier IN (?, '*.' || ?)
               AND ((status = 'invalid' AND updated_at >= ?)
                 OR (deactivated_from = 'pending' AND deactivated_at >= ?))",
        )
        .bind(account_id)
        .bind(base)
        .bind(base)
        .bind(since)
        .bind(since)
        .fetch_one(pool)
        .await?;
        Ok(n)
    }

    /// Records a failed attempt to ask the CA about an authorization. The
    /// next try waits a minute, doubling per failure up to an hour.
    pub(crate) async fn authz_check_failed(&self, url: &str, now: i64, error: &str) -> Result<()> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.authz_check_failed(url, now, error).await,
        };
        sqlx::query(
            "UPDATE authorizations SET check_after = ? + MIN(3600, 60 << MIN(check_attempts, 6)),
                 check_attempts = check_attempts + 1, check_error = ? WHERE url = ?",
        )
        .bind(now)
        .bind(error)
        .bind(url)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// Clears the reaper's backoff once the CA answered.
    pub(crate) async fn authz_check_ok(&self, url: &str) -> Result<()> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.authz_check_ok(url).await,
        };
        sqlx::query(
            "UPDATE authorizations SET check_attempts = 0, check_after = NULL, check_error = NULL
             WHERE url = ?",
        )
        .bind(url)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// The ledger's record of an authorization.
    pub(crate) async fn authz(&self, url: &str) -> Result<Option<AuthzRow>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.authz(url).await,
        };
        Ok(sqlx::query_as(
            "SELECT a.url, a.identifier, a.status,
                    (SELECT o.url FROM order_authorizations oa JOIN orders o ON o.id = oa.order_id
                      WHERE oa.authz_id = a.id ORDER BY o.id DESC LIMIT 1) AS order_url,
                    a.challenge_type, a.created_at, a.updated_at
             FROM authorizations a WHERE a.url = ?",
        )
        .bind(url)
        .fetch_optional(pool)
        .await?)
    }

    /// The authorization a challenge URL belongs to (seed 000).
    pub(crate) async fn authz_of_challenge(&self, challenge_url: &str) -> Result<Option<String>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.authz_of_challenge(challenge_url).await,
        };
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT a.url FROM challenges c JOIN authorizations a ON a.id = c.authz_id WHERE c.url = ?",
        )
        .bind(challenge_url)
        .fetch_optional(pool)
        .await?;
        Ok(row.map(|r| r.0))
    }

    /// Records an authorization certd learned of outside an order (an
    /// operator handed its URL to `certd authz deactivate`).
    pub(crate) async fn record_foreign_authz(
        &self,
        account_id: i64,
        url: &str,
        identifier: &str,
        status: AuthzStatus,
    ) -> Result<()> {
        let now = self.now();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => {
                return pg
                    .record_foreign_authz(now, account_id, url, identifier, status)
                    .await;
            }
        };
        sqlx::query(
            "INSERT INTO authorizations (url, account_id, identifier, status, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(url) DO NOTHING",
        )
        .bind(url)
        .bind(account_id)
        .bind(identifier)
        .bind(status)
        .bind(now)
        .bind(now)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// Pending authorizations of the account, per the ledger: the guard's count.
    pub(crate) async fn pending_count(&self, account_id: i64) -> Result<i64> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.pending_count(account_id).await,
        };
        let (n,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM authorizations WHERE account_id = ? AND status = 'pending'",
        )
        .bind(account_id)
        .fetch_one(pool)
        .await?;
        Ok(n)
    }

    /// Every pending authorization URL of the account (`authz deactivate --all-pending`).
    pub(crate) async fn pending_urls(&self, account_id: i64) -> Result<Vec<String>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.pending_urls(account_id).await,
        };
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT url FROM authorizations WHERE account_id = ? AND status = 'pending' ORDER BY id",
        )
        .bind(account_id)
        .fetch_all(pool)
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }
}

/// `authz_list`'s query, which takes no parameters and reads the same on
/// both engines.
pub(in crate::ledger) fn authz_list_sql(pending_only: bool) -> String {
    format!(
        "SELECT a.url, a.identifier, a.status,
                (SELECT o.url FROM order_authorizations oa JOIN orders o ON o.id = oa.order_id
                  WHERE oa.authz_id = a.id ORDER BY o.id DESC LIMIT 1) AS order_url,
                a.challenge_type, a.created_at, a.updated_at
         FROM authorizations a {} ORDER BY a.id DESC",
        if pending_only {
            "WHERE a.status = 'pending'"
        } else {
            ""
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_util::ledger;
    use crate::ledger::{Identifiers, OrderStatus};

    #[tokio::test]
    async fn stale_pending_authz_pages_through_ten_thousand_rows() {
        let (_dir, s) = ledger().await;
        let acct = s
            .upsert_account("https://ca/dir", "https://ca/acct/1")
            .await
            .unwrap();
        let authzs: Vec<NewAuthz> = (0..10_050)
            .map(|i| NewAuthz {
                url: format!("https://ca/authz/{i}"),
                identifier: format!("n{i}.example"),
                status: AuthzStatus::Pending,
                expires_at: None,
                challenges: Vec::new(),
            })
            .collect();
        s.record_order(
            acct,
            "big",
            "https://ca/order/1",
            &Identifiers::default(),
            OrderStatus::Pending,
            &authzs,
        )
        .await
        .unwrap();
        let now = s.clock().now().secs();
        let (mut after, mut seen, mut pages) = (0, 0, 0);
        loop {
            let page = s
                .stale_pending_authz(StalePage {
                    account_id: acct,
                    cutoff: now,
                    now,
                    ignore_backoff: false,
                    after_id: after,
                    limit: 100,
                })
                .await
                .unwrap();
            let Some(last) = page.last() else { break };
            assert!(page.len() <= 100);
            after = last.id;
            seen += page.len();
            pages += 1;
        }
        assert_eq!((seen, pages), (10_050, 101));
        // Rows in backoff are skipped until their time, unless asked.
        s.authz_check_failed("https://ca/authz/0", now, "CA down")
            .await
            .unwrap();
        let first = s
            .stale_pending_authz(StalePage {
                account_id: acct,
                cutoff: now,
                now,
                ignore_backoff: false,
                after_id: 0,
                limit: 1,
            })
            .await
            .unwrap();
        assert_eq!(first[0].url, "https://ca/authz/1");
        let first = s
            .stale_pending_authz(StalePage {
                account_id: acct,
                cutoff: now,
                now,
                ignore_backoff: true,
                after_id: 0,
                limit: 1,
            })
            .await
            .unwrap();
        assert_eq!(first[0].url, "https://ca/authz/0");
    }

    #[tokio::test]
    async fn failure_budget_counts_invalid_and_pending_deactivations_only() {
        let (_dir, s) = ledger().await;
        let acct = s
            .upsert_account("https://ca/dir", "https://ca/acct/1")
            .await
            .unwrap();
        let mk = |i: u32, identifier: &str| NewAuthz {
            url: format!("https://ca/authz/{i}"),
            identifier: identifier.into(),
            status: AuthzStatus::Pending,
            expires_at: None,
            challenges: Vec::new(),
        };
        let list = [
            mk(1, "a.example"),
            mk(2, "*.a.example"),
            mk(3, "a.example"),
            mk(4, "b.example"),
        ];
        s.record_order(
            acct,
            "x",
            "https://ca/order/1",
            &Identifiers::default(),
            OrderStatus::Pending,
            &list,
        )
        .await
        .unwrap();
        s.set_authz_status("https://ca/authz/1", AuthzStatus::Invalid, None)
            .await
            .unwrap();
        s.set_authz_deactivated("https://ca/authz/2", Actor::Reaper, AuthzStatus::Pending)
            .await
            .unwrap();
        // Deactivating a valid authorization is free.
        s.set_authz_deactivated("https://ca/authz/3", Actor::Driver, AuthzStatus::Valid)
            .await
            .unwrap();
        s.set_authz_status("https://ca/authz/4", AuthzStatus::Invalid, None)
            .await
            .unwrap();
        let since = s.clock().now().secs() - 3600;
        assert_eq!(s.failures_since(acct, "a.example", since).await.unwrap(), 2);
        assert_eq!(
            s.failures_since(acct, "*.a.example", since).await.unwrap(),
            2
        );
        assert_eq!(s.failures_since(acct, "b.example", since).await.unwrap(), 1);
        assert_eq!(
            s.failures_since(acct, "a.example", since + 7200)
                .await
                .unwrap(),
            0
        );
    }
}
