//! `authorizations` and `challenges` on PostgreSQL: see
//! `ledger/authorizations.rs`.

use crate::ledger::authorizations::{AuthzRow, authz_list_sql};
use crate::ledger::{Actor, AuthzStatus, ChallengeStatus, PendingAuthz, Result, StalePage};

use super::PgLedger;

impl PgLedger {
    pub(in crate::ledger) async fn set_authz_challenge(
        &self,
        now: i64,
        authz_url: &str,
        kind: &str,
        challenge_url: &str,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE authorizations SET challenge_type = $1, challenge_url = $2, updated_at = $3
             WHERE url = $4",
        )
        .bind(kind)
        .bind(challenge_url)
        .bind(now)
        .bind(authz_url)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn set_authz_status(
        &self,
        now: i64,
        authz_url: &str,
        status: AuthzStatus,
        error: Option<&str>,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        // The update locks the authorization's row until commit, so the
        // challenge below follows the status this transaction wrote.
        sqlx::query(
            "UPDATE authorizations SET status = $1, error = COALESCE($2, error), updated_at = $3
             WHERE url = $4",
        )
        .bind(status)
        .bind(error)
        .bind(now)
        .bind(authz_url)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE challenges SET status = $1
             WHERE url = (SELECT challenge_url FROM authorizations WHERE url = $2)",
        )
        .bind(ChallengeStatus::from(status))
        .bind(authz_url)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn set_authz_deactivated(
        &self,
        now: i64,
        authz_url: &str,
        by: Actor,
        from: AuthzStatus,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE authorizations SET status = $1, deactivated_at = $2, deactivated_by = $3,
                 deactivated_from = $4, updated_at = $5, check_error = NULL WHERE url = $6",
        )
        .bind(AuthzStatus::Deactivated)
        .bind(now)
        .bind(by)
        .bind(from)
        .bind(now)
        .bind(authz_url)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn authz_of_order(
        &self,
        order_url: &str,
        status: AuthzStatus,
    ) -> Result<Vec<(String, String)>> {
        Ok(sqlx::query_as(
            "SELECT a.url, a.identifier FROM authorizations a
             JOIN order_authorizations oa ON oa.authz_id = a.id
             JOIN orders o ON o.id = oa.order_id
             WHERE o.url = $1 AND a.status = $2 ORDER BY a.id",
        )
        .bind(order_url)
        .bind(status)
        .fetch_all(self.pool())
        .await?)
    }

    pub(in crate::ledger) async fn authz_list(&self, pending_only: bool) -> Result<Vec<AuthzRow>> {
        Ok(sqlx::query_as(&authz_list_sql(pending_only))
            .fetch_all(self.pool())
            .await?)
    }

    pub(in crate::ledger) async fn challenge_history(
        &self,
        identifier: &str,
    ) -> Result<Vec<(String, AuthzStatus)>> {
        Ok(sqlx::query_as(
            "SELECT challenge_type, status FROM authorizations
             WHERE identifier = $1 AND challenge_type IS NOT NULL AND status IN ('valid', 'invalid')
             ORDER BY updated_at DESC, id DESC LIMIT 20",
        )
        .bind(identifier)
        .fetch_all(self.pool())
        .await?)
    }

    pub(in crate::ledger) async fn pending_authz_by_cert(&self) -> Result<Vec<(String, i64)>> {
        // SQLite hands groups back in key order, byte-wise; PostgreSQL
        // promises no order without ORDER BY, and "C" compares bytes as
        // SQLite does.
        Ok(sqlx::query_as(
            "SELECT o.cert_name, COUNT(DISTINCT a.id) FROM authorizations a
             JOIN order_authorizations oa ON oa.authz_id = a.id
             JOIN orders o ON o.id = oa.order_id
             WHERE a.status = 'pending' GROUP BY o.cert_name ORDER BY o.cert_name COLLATE \"C\"",
        )
        .fetch_all(self.pool())
        .await?)
    }

    pub(in crate::ledger) async fn pending_authz_of(
        &self,
        cert_name: &str,
    ) -> Result<Vec<(String, String, i64)>> {
        // PostgreSQL's DISTINCT cannot order by a column it does not
        // return (a.id): each authorization once, by EXISTS, instead.
        Ok(sqlx::query_as(
            "SELECT a.identifier, a.url, a.created_at FROM authorizations a
             WHERE a.status = 'pending' AND EXISTS (
                 SELECT 1 FROM order_authorizations oa JOIN orders o ON o.id = oa.order_id
                 WHERE oa.authz_id = a.id AND o.cert_name = $1)
             ORDER BY a.created_at, a.id",
        )
        .bind(cert_name)
        .fetch_all(self.pool())
        .await?)
    }

    pub(in crate::ledger) async fn stale_pending_authz(
        &self,
        page: StalePage,
    ) -> Result<Vec<PendingAuthz>> {
        Ok(sqlx::query_as(
            "SELECT a.id, a.url, a.identifier, a.expires_at,
                    (SELECT o.url FROM order_authorizations oa JOIN orders o ON o.id = oa.order_id
                      WHERE oa.authz_id = a.id ORDER BY o.id DESC LIMIT 1) AS order_url
             FROM authorizations a
             WHERE a.account_id = $1 AND a.status = 'pending' AND a.created_at <= $2
               AND (a.check_after IS NULL OR a.check_after <= $3) AND a.id > $4
             ORDER BY a.id LIMIT $5",
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
        .fetch_all(self.pool())
        .await?)
    }

    /// `base` is the identifier without its wildcard label.
    pub(in crate::ledger) async fn failures_since(
        &self,
        account_id: i64,
        base: &str,
        since: i64,
    ) -> Result<i64> {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM authorizations
             WHERE account_id = $1 AND identifier IN ($2, '*.' || $2)
               AND ((status = 'invalid' AND updated_at >= $3)
                 OR (deactivated_from = 'pending' AND deactivated_at >= $3))",
        )
        .bind(account_id)
        .bind(base)
        .bind(since)
        .fetch_one(self.pool())
        .await?;
        Ok(n)
    }

    pub(in crate::ledger) async fn authz_check_failed(
        &self,
        url: &str,
        now: i64,
        error: &str,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        // SQLite's scalar MIN is LEAST here; `<<` shifts by an integer.
        sqlx::query(
            "UPDATE authorizations
             SET check_after = $1 + LEAST(3600, 60 << LEAST(check_attempts, 6)::integer),
                 check_attempts = check_attempts + 1, check_error = $2 WHERE url = $3",
        )
        .bind(now)
        .bind(error)
        .bind(url)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn authz_check_ok(&self, url: &str) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE authorizations SET check_attempts = 0, check_after = NULL, check_error = NULL
             WHERE url = $1",
        )
        .bind(url)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn authz(&self, url: &str) -> Result<Option<AuthzRow>> {
        Ok(sqlx::query_as(
            "SELECT a.url, a.identifier, a.status,
                    (SELECT o.url FROM order_authorizations oa JOIN orders o ON o.id = oa.order_id
                      WHERE oa.authz_id = a.id ORDER BY o.id DESC LIMIT 1) AS order_url,
                    a.challenge_type, a.created_at, a.updated_at
             FROM authorizations a WHERE a.url = $1",
        )
        .bind(url)
        .fetch_optional(self.pool())
        .await?)
    }

    pub(in crate::ledger) async fn authz_of_challenge(
        &self,
        challenge_url: &str,
    ) -> Result<Option<String>> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT a.url FROM challenges c JOIN authorizations a ON a.id = c.authz_id WHERE c.url = $1",
        )
        .bind(challenge_url)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|r| r.0))
    }

    pub(in crate::ledger) async fn record_foreign_authz(
        &self,
        now: i64,
        account_id: i64,
        url: &str,
        identifier: &str,
        status: AuthzStatus,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO authorizations (url, account_id, identifier, status, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (url) DO NOTHING",
        )
        .bind(url)
        .bind(account_id)
        .bind(identifier)
        .bind(status)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn pending_count(&self, account_id: i64) -> Result<i64> {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM authorizations WHERE account_id = $1 AND status = 'pending'",
        )
        .bind(account_id)
        .fetch_one(self.pool())
        .await?;
        Ok(n)
    }

    pub(in crate::ledger) async fn pending_urls(&self, account_id: i64) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT url FROM authorizations WHERE account_id = $1 AND status = 'pending' ORDER BY id",
        )
        .bind(account_id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }
}
