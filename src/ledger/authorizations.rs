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
    use std::time::Duration;

    use super::*;
    use crate::ledger::test_util::{conformance, lease};
    use crate::ledger::{Identifiers, LedgerError, NewChallenge, OrderStatus};

    /// A pending authorization of `identifier`, with no challenges.
    fn pending(i: u32, identifier: &str) -> NewAuthz {
        NewAuthz {
            url: format!("https://ca/authz/{i}"),
            identifier: identifier.into(),
            status: AuthzStatus::Pending,
            expires_at: None,
            challenges: Vec::new(),
        }
    }

    /// A page of the account's stale authorizations as of `now`: their URLs.
    async fn stale_urls(
        s: &Ledger,
        account_id: i64,
        now: i64,
        ignore_backoff: bool,
    ) -> Vec<String> {
        s.stale_pending_authz(StalePage {
            account_id,
            cutoff: now,
            now,
            ignore_backoff,
            after_id: 0,
            limit: 100,
        })
        .await
        .expect("page")
        .into_iter()
        .map(|a| a.url)
        .collect()
    }

    conformance! {

    async fn stale_pending_authz_pages_through_ten_thousand_rows(s: Ledger) {
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

    async fn failure_budget_counts_invalid_and_pending_deactivations_only(s: Ledger) {
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

    /// The backoff of failed checks: a minute, doubling per failure, at
    /// most an hour; a check that worked clears it.
    async fn a_failed_check_backs_off_doubling_up_to_an_hour(s: Ledger) {
        let acct = s
            .upsert_account("https://ca/dir", "https://ca/acct/1")
            .await
            .expect("account");
        s.record_order(
            acct,
            "x",
            "https://ca/order/1",
            &Identifiers::default(),
            OrderStatus::Pending,
            &[pending(1, "a.example"), pending(2, "b.example")],
        )
        .await
        .expect("order");
        let now = s.clock().now().secs();
        let mut wait = 0;
        for expected in [60, 120, 240, 480, 960, 1920, 3600, 3600] {
            s.authz_check_failed("https://ca/authz/1", now, "CA down")
                .await
                .expect("failed");
            wait = expected;
            assert_eq!(
                stale_urls(&s, acct, now + wait - 1, false).await,
                ["https://ca/authz/2"],
                "{wait}"
            );
            assert_eq!(
                stale_urls(&s, acct, now + wait, false).await,
                ["https://ca/authz/1", "https://ca/authz/2"],
                "{wait}"
            );
        }
        assert_eq!(wait, 3600);
        assert_eq!(stale_urls(&s, acct, now, true).await.len(), 2);
        s.authz_check_ok("https://ca/authz/1").await.expect("ok");
        assert_eq!(stale_urls(&s, acct, now, false).await.len(), 2);
        // After a clear, the next failure starts again at a minute.
        s.authz_check_failed("https://ca/authz/1", now, "CA down")
            .await
            .expect("failed");
        assert_eq!(stale_urls(&s, acct, now + 60, false).await.len(), 2);
        assert_eq!(stale_urls(&s, acct, now + 59, false).await.len(), 1);
        // Only pending rows created by the cutoff are stale.
        s.clock().advance(Duration::from_secs(100));
        s.record_order(
            acct,
            "x",
            "https://ca/order/2",
            &Identifiers::default(),
            OrderStatus::Pending,
            &[pending(3, "c.example")],
        )
        .await
        .expect("order");
        s.set_authz_status("https://ca/authz/2", AuthzStatus::Valid, None)
            .await
            .expect("status");
        assert_eq!(stale_urls(&s, acct, now + 60, false).await, ["https://ca/authz/1"]);
    }

    /// What the ledger shows of an authorization as certd works it: the
    /// challenge chosen, the CA's verdict (which the challenge follows),
    /// and the history challenge fallback reads, newest first.
    async fn an_authorization_records_its_challenge_and_outcome(s: Ledger) {
        let acct = s
            .upsert_account("https://ca/dir", "https://ca/acct/1")
            .await
            .expect("account");
        let with_challenges = |i: u32| NewAuthz {
            challenges: ["http-01", "dns-01"]
                .iter()
                .map(|kind| NewChallenge {
                    url: format!("https://ca/chal/{i}/{kind}"),
                    kind: (*kind).into(),
                    status: ChallengeStatus::Pending,
                })
                .collect(),
            ..pending(i, "a.example")
        };
        s.record_order(
            acct,
            "www",
            "https://ca/order/1",
            &Identifiers::new(["a.example"]),
            OrderStatus::Pending,
            &[with_challenges(1), with_challenges(2), with_challenges(3)],
        )
        .await
        .expect("order");
        let start = s.clock().now().secs();
        for (i, kind, status) in [
            (1, "http-01", AuthzStatus::Invalid),
            (2, "dns-01", AuthzStatus::Valid),
        ] {
            s.clock().advance(Duration::from_secs(10));
            let authz_url = format!("https://ca/authz/{i}");
            s.set_authz_challenge(&authz_url, kind, &format!("https://ca/chal/{i}/{kind}"))
                .await
                .expect("challenge");
            s.set_authz_status(&authz_url, status, (status == AuthzStatus::Invalid).then_some("refused"))
                .await
                .expect("status");
        }
        // Chosen, not yet answered: not history.
        s.set_authz_challenge("https://ca/authz/3", "http-01", "https://ca/chal/3/http-01")
            .await
            .expect("challenge");
        assert_eq!(
            s.challenge_history("a.example").await.expect("history"),
            [
                ("dns-01".to_owned(), AuthzStatus::Valid),
                ("http-01".to_owned(), AuthzStatus::Invalid),
            ]
        );
        assert!(s.challenge_history("b.example").await.expect("history").is_empty());
        let row = s.authz("https://ca/authz/2").await.expect("authz").expect("row");
        assert_eq!(row.status, AuthzStatus::Valid);
        assert_eq!(row.challenge_type.as_deref(), Some("dns-01"));
        assert_eq!(row.order_url.as_deref(), Some("https://ca/order/1"));
        assert_eq!((row.created_at, row.updated_at), (Some(start), Some(start + 20)));
        assert!(s.authz("https://ca/authz/9").await.expect("authz").is_none());
        assert_eq!(
            s.authz_of_order("https://ca/order/1", AuthzStatus::Valid)
                .await
                .expect("of order"),
            [("https://ca/authz/2".to_owned(), "a.example".to_owned())]
        );
        assert_eq!(
            s.pending_authz_of_order("https://ca/order/1")
                .await
                .expect("of order"),
            [("https://ca/authz/3".to_owned(), "a.example".to_owned())]
        );
        assert_eq!(
            s.authz_of_challenge("https://ca/chal/2/dns-01").await.expect("of challenge"),
            Some("https://ca/authz/2".to_owned())
        );
        assert_eq!(s.authz_of_challenge("https://ca/chal/9").await.expect("none"), None);
    }

    /// The pending authorizations as the guard, `status` and `authz
    /// deactivate --all-pending` see them, including one learned outside
    /// an order, and a deactivation's record.
    async fn pending_authorizations_per_account_and_certificate(s: Ledger) {
        let acct = s
            .upsert_account("https://ca/dir", "https://ca/acct/1")
            .await
            .expect("account");
        let other = s
            .upsert_account("https://other/dir", "https://other/acct/1")
            .await
            .expect("account");
        let start = s.clock().now().secs();
        s.record_order(
            acct,
            "www",
            "https://ca/order/1",
            &Identifiers::default(),
            OrderStatus::Pending,
            &[pending(2, "b.example"), pending(1, "a.example")],
        )
        .await
        .expect("order");
        s.clock().advance(Duration::from_secs(5));
        s.record_order(
            acct,
            "api",
            "https://ca/order/2",
            &Identifiers::default(),
            OrderStatus::Pending,
            &[pending(3, "c.example"), pending(1, "a.example")],
        )
        .await
        .expect("order");
        s.record_order(
            other,
            "www",
            "https://other/order/1",
            &Identifiers::default(),
            OrderStatus::Pending,
            &[NewAuthz {
                url: "https://other/authz/1".into(),
                ..pending(0, "z.example")
            }],
        )
        .await
        .expect("order");
        // Learned outside an order; recording it again changes nothing.
        s.record_foreign_authz(acct, "https://ca/authz/9", "d.example", AuthzStatus::Pending)
            .await
            .expect("foreign");
        s.record_foreign_authz(acct, "https://ca/authz/9", "e.example", AuthzStatus::Valid)
            .await
            .expect("foreign again");
        let foreign = s.authz("https://ca/authz/9").await.expect("authz").expect("row");
        assert_eq!((foreign.identifier.as_str(), foreign.status), ("d.example", AuthzStatus::Pending));
        assert_eq!(foreign.order_url, None);
        assert_eq!(s.pending_count(acct).await.expect("count"), 4);
        assert_eq!(s.pending_count(other).await.expect("count"), 1);
        assert_eq!(
            s.pending_urls(acct).await.expect("urls"),
            ["https://ca/authz/2", "https://ca/authz/1", "https://ca/authz/3", "https://ca/authz/9"]
        );
        assert_eq!(
            s.pending_authz_by_cert().await.expect("by cert"),
            [("api".to_owned(), 2), ("www".to_owned(), 3)]
        );
        assert_eq!(
            s.pending_authz_of("www").await.expect("of www"),
            [
                ("b.example".to_owned(), "https://ca/authz/2".to_owned(), start),
                ("a.example".to_owned(), "https://ca/authz/1".to_owned(), start),
                ("z.example".to_owned(), "https://other/authz/1".to_owned(), start + 5),
            ]
        );
        assert_eq!(
            s.pending_authz_of("api").await.expect("of api"),
            [
                ("a.example".to_owned(), "https://ca/authz/1".to_owned(), start),
                ("c.example".to_owned(), "https://ca/authz/3".to_owned(), start + 5),
            ]
        );
        // A deactivation by the reaper leaves the pending lists.
        s.authz_check_failed("https://ca/authz/1", start, "CA down")
            .await
            .expect("failed");
        s.set_authz_deactivated("https://ca/authz/1", Actor::Reaper, AuthzStatus::Pending)
            .await
            .expect("deactivate");
        let row = s.authz("https://ca/authz/1").await.expect("authz").expect("row");
        assert_eq!(row.status, AuthzStatus::Deactivated);
        assert_eq!(row.updated_at, Some(start + 5));
        assert_eq!(s.pending_count(acct).await.expect("count"), 3);
        assert_eq!(
            s.pending_authz_by_cert().await.expect("by cert"),
            [("api".to_owned(), 1), ("www".to_owned(), 2)]
        );
        assert_eq!(
            s.authz_of_order("https://ca/order/2", AuthzStatus::Deactivated)
                .await
                .expect("of order"),
            [("https://ca/authz/1".to_owned(), "a.example".to_owned())]
        );
        // It counts against the failure budget, as of its deactivation.
        assert_eq!(s.failures_since(acct, "a.example", start + 5).await.expect("budget"), 1);
        assert_eq!(s.failures_since(acct, "a.example", start + 6).await.expect("budget"), 0);
        assert_eq!(s.failures_since(other, "a.example", 0).await.expect("budget"), 0);
    }

    /// A handle fenced by a lease another host now holds changes no
    /// authorization on PostgreSQL; SQLite has one writer and no fences.
    async fn a_lost_lease_changes_no_authorization(s: Ledger) {
        let acct = s
            .upsert_account("https://ca/dir", "https://ca/acct/1")
            .await
            .expect("account");
        s.record_order(
            acct,
            "www",
            "https://ca/order/1",
            &Identifiers::default(),
            OrderStatus::Pending,
            &[pending(1, "a.example")],
        )
        .await
        .expect("order");
        let stale = s.fenced(lease::lost(&s, &format!("reaper:{acct}")).await);
        let results = [
            stale
                .set_authz_deactivated("https://ca/authz/1", Actor::Reaper, AuthzStatus::Pending)
                .await,
            stale
                .record_foreign_authz(acct, "https://ca/authz/2", "b.example", AuthzStatus::Pending)
                .await,
        ];
        let row = s.authz("https://ca/authz/1").await.expect("authz").expect("row");
        let foreign = s.authz("https://ca/authz/2").await.expect("authz");
        if s.is_shared() {
            for result in results {
                assert!(matches!(result, Err(LedgerError::Fenced { .. })), "{result:?}");
            }
            assert_eq!(row.status, AuthzStatus::Pending);
            assert!(foreign.is_none());
            assert_eq!(s.failures_since(acct, "a.example", 0).await.expect("budget"), 0);
        } else {
            for result in results {
                result.expect("SQLite ignores fences");
            }
            assert_eq!(row.status, AuthzStatus::Deactivated);
            assert!(foreign.is_some());
        }
        // The holder's own fence writes.
        let held = s.fenced(lease::held(&s, &format!("reaper:{acct}")).await);
        held.set_authz_status("https://ca/authz/1", AuthzStatus::Valid, None)
            .await
            .expect("a held lease writes");
        let row = s.authz("https://ca/authz/1").await.expect("authz").expect("row");
        assert_eq!(row.status, AuthzStatus::Valid);
    }
    }
}
