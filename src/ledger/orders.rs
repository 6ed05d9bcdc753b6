//! Orders, and the intents written ahead of `newOrder`: the driver's
//! state machine (`OrderStep`) beside the CA's status of each order.

use sqlx::FromRow;

use super::{Db, Identifiers, Ledger, NewAuthz, OrderStatus, OrderStep, Result};

/// An order as recovery and reuse see it.
#[derive(Debug, Clone, FromRow)]
pub(crate) struct OrderRow {
    pub(crate) url: String,
    pub(crate) cert_name: String,
    pub(crate) identifiers: Identifiers,
    pub(crate) status: OrderStatus,
    pub(crate) step: OrderStep,
}

impl Ledger {
    /// Records a new (or CA-reused) order with all its authorizations and
    /// their challenges in one transaction: the write-ahead step that must
    /// complete before any challenge is answered.
    pub(crate) async fn record_order(
        &self,
        account_id: i64,
        cert_name: &str,
        order_url: &str,
        identifiers: &Identifiers,
        status: OrderStatus,
        authzs: &[NewAuthz],
    ) -> Result<i64> {
        let now = self.now();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => {
                return pg
                    .record_order(
                        now,
                        account_id,
                        cert_name,
                        order_url,
                        identifiers,
                        status,
                        authzs,
                    )
                    .await;
            }
        };
        let mut tx = pool.begin().await?;
        let (order_id,): (i64,) = sqlx::query_as(
            "INSERT INTO orders (url, account_id, cert_name, identifiers, status, step, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT(url) DO UPDATE SET status = excluded.status, step = excluded.step,
                 error = NULL, updated_at = excluded.updated_at
             RETURNING id",
        )
        .bind(order_url)
        .bind(account_id)
        .bind(cert_name)
        .bind(identifiers)
        .bind(status)
        .bind(OrderStep::Authorizing)
        .bind(now)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        for a in authzs {
            let (authz_id,): (i64,) = sqlx::query_as(
                "INSERT INTO authorizations (url, account_id, identifier, status, expires_at, created_at, updated_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT(url) DO UPDATE SET status = excluded.status,
                     expires_at = COALESCE(excluded.expires_at, expires_at),
                     updated_at = excluded.updated_at
                 RETURNING id",
            )
            .bind(&a.url)
            .bind(account_id)
            .bind(&a.identifier)
            .bind(a.status)
            .bind(a.expires_at)
            .bind(now)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT OR IGNORE INTO order_authorizations (order_id, authz_id) VALUES (?, ?)",
            )
            .bind(order_id)
            .bind(authz_id)
            .execute(&mut *tx)
            .await?;
            for c in &a.challenges {
                sqlx::query(
                    "INSERT INTO challenges (url, authz_id, type, status) VALUES (?, ?, ?, ?)
                     ON CONFLICT(url) DO UPDATE SET status = excluded.status",
                )
                .bind(&c.url)
                .bind(authz_id)
                .bind(&c.kind)
                .bind(c.status)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(order_id)
    }

    pub(crate) async fn set_order_state(
        &self,
        order_url: &str,
        status: OrderStatus,
        step: OrderStep,
        error: Option<&str>,
    ) -> Result<()> {
        let now = self.now();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => {
                return pg
                    .set_order_state(now, order_url, status, step, error)
                    .await;
            }
        };
        sqlx::query("UPDATE orders SET status = ?, step = ?, error = COALESCE(?, error), updated_at = ? WHERE url = ?")
            .bind(status)
            .bind(step)
            .bind(error)
            .bind(now)
            .bind(order_url)
            .execute(pool)
            .await?;
        Ok(())
    }

    /// Orders the account created since `since`, and the oldest of them:
    /// the guard's view of the CA's new-orders limit.
    pub(crate) async fn orders_since(
        &self,
        account_id: i64,
        since: i64,
    ) -> Result<(i64, Option<i64>)> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.orders_since(account_id, since).await,
        };
        Ok(sqlx::query_as(
            "SELECT COUNT(*), MIN(created_at) FROM orders WHERE account_id = ? AND created_at >= ?",
        )
        .bind(account_id)
        .bind(since)
        .fetch_one(pool)
        .await?)
    }

    /// Certificates issued for exactly `identifiers` since `since`, and the
    /// oldest: the guard's view of the CA's duplicate-certificate limit.
    pub(crate) async fn issued_since(
        &self,
        account_id: i64,
        identifiers: &Identifiers,
        since: i64,
    ) -> Result<(i64, Option<i64>)> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.issued_since(account_id, identifiers, since).await,
        };
        // Every order the CA issued counts, installed or not: a certificate
        // thrown away at install still used up the CA's duplicate limit.
        Ok(sqlx::query_as(
            "SELECT COUNT(*), MIN(updated_at) FROM orders
             WHERE account_id = ? AND identifiers = ? AND (status = ? OR step = ?)
               AND updated_at >= ?",
        )
        .bind(account_id)
        .bind(identifiers)
        .bind(OrderStatus::Valid)
        .bind(OrderStep::Done)
        .bind(since)
        .fetch_one(pool)
        .await?)
    }

    /// Orders the driver had not finished when the process last stopped.
    pub(crate) async fn in_flight_orders(&self, account_id: i64) -> Result<Vec<OrderRow>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.in_flight_orders(account_id).await,
        };
        let sql = format!(
            "SELECT url, cert_name, identifiers, status, step FROM orders
             WHERE account_id = ? AND step IN ({}) ORDER BY id",
            in_flight_steps()
        );
        Ok(sqlx::query_as(&sql)
            .bind(account_id)
            .fetch_all(pool)
            .await?)
    }

    /// The newest unfinished order for exactly these identifiers that has not
    /// expired: reused before a new order leaves its authorizations to rot,
    /// and a finalized one (`processing`, `valid`) downloaded with its stored
    /// key instead of issuing the certificate twice.
    pub(crate) async fn resumable_order(
        &self,
        account_id: i64,
        identifiers: &Identifiers,
        now: i64,
    ) -> Result<Option<OrderRow>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.resumable_order(account_id, identifiers, now).await,
        };
        let sql = format!(
            "SELECT url, cert_name, identifiers, status, step FROM orders
             WHERE account_id = ? AND identifiers = ? AND step IN ({}) AND status IN ({})
               AND (expires_at IS NULL OR expires_at > ?)
             ORDER BY id DESC LIMIT 1",
            resumable_steps(),
            live_statuses(),
        );
        Ok(sqlx::query_as(&sql)
            .bind(account_id)
            .bind(identifiers)
            .bind(now)
            .fetch_optional(pool)
            .await?)
    }

    pub(crate) async fn set_order_expires(&self, order_url: &str, expires_at: i64) -> Result<()> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.set_order_expires(order_url, expires_at).await,
        };
        sqlx::query("UPDATE orders SET expires_at = ? WHERE url = ?")
            .bind(expires_at)
            .bind(order_url)
            .execute(pool)
            .await?;
        Ok(())
    }

    /// Write-ahead for `newOrder`: notes that an order for `identifiers`
    /// (sorted) of `cert_name` is about to be created. Returns the intent's id
    /// for [`Ledger::clear_intent`] once the order itself is recorded.
    pub(crate) async fn record_intent(
        &self,
        account_id: i64,
        cert_name: &str,
        identifiers: &Identifiers,
    ) -> Result<i64> {
        let now = self.now();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => {
                return pg
                    .record_intent(now, account_id, cert_name, identifiers)
                    .await;
            }
        };
        let (id,): (i64,) = sqlx::query_as(
            "INSERT INTO order_intents (account_id, cert_name, identifiers, created_at)
             VALUES (?, ?, ?, ?) RETURNING id",
        )
        .bind(account_id)
        .bind(cert_name)
        .bind(identifiers)
        .bind(now)
        .fetch_one(pool)
        .await?;
        Ok(id)
    }

    pub(crate) async fn clear_intent(&self, id: i64) -> Result<()> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.clear_intent(id).await,
        };
        sqlx::query("DELETE FROM order_intents WHERE id = ?")
            .bind(id)
            .execute(pool)
            .await?;
        Ok(())
    }

    /// Whether a `newOrder` of the account was interrupted: an intent is
    /// left only when the process died between writing it and recording
    /// the order.
    pub async fn has_intents(&self, account_id: i64) -> Result<bool> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.has_intents(account_id).await,
        };
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT id FROM order_intents WHERE account_id = ? LIMIT 1")
                .bind(account_id)
                .fetch_optional(pool)
                .await?;
        Ok(row.is_some())
    }

    /// Forgets every intent of the account, once recovery has matched them.
    pub(crate) async fn clear_intents(&self, account_id: i64) -> Result<()> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.clear_intents(account_id).await,
        };
        sqlx::query("DELETE FROM order_intents WHERE account_id = ?")
            .bind(account_id)
            .execute(pool)
            .await?;
        Ok(())
    }

    /// Which certificate an order for exactly `identifiers` (sorted) that
    /// the ledger does not know was most likely for: the newest intent for
    /// those names, else the newest recorded order for them.
    pub(crate) async fn cert_name_for(
        &self,
        account_id: i64,
        identifiers: &Identifiers,
    ) -> Result<Option<String>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.cert_name_for(account_id, identifiers).await,
        };
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT cert_name FROM (
                 SELECT cert_name, 1 AS rank, id FROM order_intents WHERE account_id = ?1 AND identifiers = ?2
                 UNION ALL
                 SELECT cert_name, 2 AS rank, id FROM orders WHERE account_id = ?1 AND identifiers = ?2
             ) ORDER BY rank, id DESC LIMIT 1",
        )
        .bind(account_id)
        .bind(identifiers)
        .fetch_optional(pool)
        .await?;
        Ok(row.map(|r| r.0))
    }

    /// Whether the ledger has an order with this URL.
    pub(crate) async fn order_known(&self, order_url: &str) -> Result<bool> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.order_known(order_url).await,
        };
        let row: Option<(i64,)> = sqlx::query_as("SELECT id FROM orders WHERE url = ?")
            .bind(order_url)
            .fetch_optional(pool)
            .await?;
        Ok(row.is_some())
    }
}

/// The steps of an order the driver has not finished, as an SQL list.
pub(in crate::ledger) fn in_flight_steps() -> String {
    text_list(
        OrderStep::ALL
            .iter()
            .filter(|s| s.in_flight())
            .map(|s| s.as_str()),
    )
}

/// The steps a new order for the same names takes up, as an SQL list.
pub(in crate::ledger) fn resumable_steps() -> String {
    text_list(
        OrderStep::ALL
            .iter()
            .filter(|s| s.resumable())
            .map(|s| s.as_str()),
    )
}

/// The CA's statuses of an order that can still be taken up, as an SQL list.
pub(in crate::ledger) fn live_statuses() -> String {
    text_list(
        OrderStatus::ALL
            .iter()
            .filter(|s| s.live())
            .map(|s| s.as_str()),
    )
}

/// `texts` as an SQL list of literals (`'a', 'b'`). The texts are the
/// ledger's own constants, never a caller's input; literals rather than
/// parameters let either engine match them against its partial indexes.
fn text_list<'a>(texts: impl Iterator<Item = &'a str>) -> String {
    texts
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_util::ledger;
    use crate::ledger::{Actor, AuthzStatus, ChallengeStatus, NewChallenge};

    /// The duplicate guard counts what the CA issued: an order whose
    /// certificate failed to install, or waits on disk, counts as much as
    /// one that was installed.
    #[tokio::test]
    async fn the_guard_counts_issuances_not_installs() {
        let (_dir, s) = ledger().await;
        let acct = s
            .upsert_account("https://ca/dir", "https://ca/acct/1")
            .await
            .expect("account");
        let names = Identifiers::new(["a.example"]);
        for (i, (status, step)) in [
            (OrderStatus::Valid, OrderStep::Done),
            (OrderStatus::Valid, OrderStep::Failed),
            (OrderStatus::Valid, OrderStep::Issued),
            (OrderStatus::Invalid, OrderStep::Failed),
            (OrderStatus::Pending, OrderStep::Resumable),
        ]
        .into_iter()
        .enumerate()
        {
            let url = format!("https://ca/order/{i}");
            s.record_order(acct, "www", &url, &names, status, &[])
                .await
                .expect("order");
            s.set_order_state(&url, status, step, None)
                .await
                .expect("state");
        }
        let (count, _) = s.issued_since(acct, &names, 0).await.expect("count");
        assert_eq!(count, 3);

        // The issued record: waiting until installed, then not.
        s.record_issued("https://ca/order/2", "www", &names, "0a", 1)
            .await
            .expect("record");
        assert!(s.issued_waiting("https://ca/order/2").await.expect("query"));
        let row = s.waiting_issued("www").await.expect("query").expect("row");
        assert_eq!(row.order_url, "https://ca/order/2");
        assert_eq!(row.identifiers, names);
        s.issued_done("https://ca/order/2").await.expect("done");
        assert!(s.waiting_issued("www").await.expect("query").is_none());
    }

    #[tokio::test]
    async fn order_with_reused_authz_is_recorded_once() {
        let (_dir, s) = ledger().await;
        let acct = s
            .upsert_account("https://ca/dir", "https://ca/acct/1")
            .await
            .unwrap();
        let authz = NewAuthz {
            url: "https://ca/authz/1".into(),
            identifier: "a.example".into(),
            status: AuthzStatus::Pending,
            expires_at: None,
            challenges: vec![NewChallenge {
                url: "https://ca/chal/1".into(),
                kind: "http-01".into(),
                status: ChallengeStatus::Pending,
            }],
        };
        let names = Identifiers::new(["a.example"]);
        s.record_order(
            acct,
            "www",
            "https://ca/order/1",
            &names,
            OrderStatus::Pending,
            std::slice::from_ref(&authz),
        )
        .await
        .unwrap();
        // A CA that hands back the same order and authz must not duplicate rows.
        s.record_order(
            acct,
            "www",
            "https://ca/order/1",
            &names,
            OrderStatus::Pending,
            std::slice::from_ref(&authz),
        )
        .await
        .unwrap();
        s.record_order(
            acct,
            "www",
            "https://ca/order/2",
            &names,
            OrderStatus::Pending,
            &[authz],
        )
        .await
        .unwrap();
        let list = s.authz_list(true).await.unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].order_url.as_deref(), Some("https://ca/order/2"));
        assert_eq!(
            s.pending_authz_by_cert().await.unwrap(),
            vec![("www".to_owned(), 1)]
        );

        s.set_authz_deactivated("https://ca/authz/1", Actor::Driver, AuthzStatus::Pending)
            .await
            .unwrap();
        assert!(s.authz_list(true).await.unwrap().is_empty());
        assert_eq!(s.integrity_check().await.unwrap(), "ok");
    }

    /// A new order for the same names takes up exactly the orders at a
    /// resumable step whose CA status is still live and that have not
    /// expired; every step certd writes is covered, so a step added later
    /// is decided here too. (The query once also named a `created` step
    /// that nothing writes.)
    #[tokio::test]
    async fn resumable_orders_are_the_live_ones_at_a_resumable_step() {
        let (_dir, s) = ledger().await;
        let acct = s
            .upsert_account("https://ca/dir", "https://ca/acct/1")
            .await
            .expect("account");
        let names = Identifiers::new(["a.example"]);
        let now = s.clock().now().secs();
        for step in OrderStep::ALL {
            for status in OrderStatus::ALL {
                let url = format!("https://ca/order/{step}/{status}");
                s.record_order(acct, "www", &url, &names, *status, &[])
                    .await
                    .expect("order");
                s.set_order_state(&url, *status, *step, None)
                    .await
                    .expect("state");
                let found = s
                    .resumable_order(acct, &names, now)
                    .await
                    .expect("query")
                    .map(|o| (o.step, o.status));
                let expected = (step.resumable() && status.live()).then_some((*step, *status));
                assert_eq!(found, expected, "{step} {status}");
                // Out of the way of the next combination.
                s.set_order_state(&url, OrderStatus::Abandoned, OrderStep::Abandoned, None)
                    .await
                    .expect("abandon");
            }
        }
        // Expired orders are not taken up, whatever their step.
        s.record_order(
            acct,
            "www",
            "https://ca/order/old",
            &names,
            OrderStatus::Pending,
            &[],
        )
        .await
        .expect("order");
        s.set_order_expires("https://ca/order/old", now)
            .await
            .expect("expires");
        assert!(
            s.resumable_order(acct, &names, now)
                .await
                .expect("query")
                .is_none()
        );
        // Other names are other orders.
        let other = Identifiers::new(["b.example"]);
        assert!(
            s.resumable_order(acct, &other, 0)
                .await
                .expect("query")
                .is_none()
        );
        // In flight: the steps recovery looks at.
        let in_flight: Vec<OrderStep> = s
            .in_flight_orders(acct)
            .await
            .expect("query")
            .into_iter()
            .map(|o| o.step)
            .collect();
        assert_eq!(in_flight, [OrderStep::Authorizing]);
    }
}
