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
    use std::time::Duration;

    use super::*;
    use crate::ledger::test_util::{conformance, lease, ledger};
    use crate::ledger::{Actor, AuthzStatus, ChallengeStatus, LedgerError, NewChallenge};

    /// A pending authorization with one http-01 challenge.
    fn authz(i: u32, identifier: &str, expires_at: Option<i64>) -> NewAuthz {
        NewAuthz {
            url: format!("https://ca/authz/{i}"),
            identifier: identifier.into(),
            status: AuthzStatus::Pending,
            expires_at,
            challenges: vec![NewChallenge {
                url: format!("https://ca/chal/{i}"),
                kind: "http-01".into(),
                status: ChallengeStatus::Pending,
            }],
        }
    }

    conformance! {
        /// The duplicate guard counts what the CA issued: an order whose
        /// certificate failed to install, or waits on disk, counts as much
        /// as one that was installed. The new-orders guard counts every
        /// order of the account created in its window, and both give the
        /// oldest time counted, when the window frees up.
        async fn the_guard_counts_issuances_not_installs(s: Ledger) {
            let acct = s
                .upsert_account("https://ca/dir", "https://ca/acct/1")
                .await
                .expect("account");
            let other_acct = s
                .upsert_account("https://other/dir", "https://other/acct/1")
                .await
                .expect("account");
            let names = Identifiers::new(["a.example"]);
            let start = s.clock().now().secs();
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
                s.clock().advance(Duration::from_secs(10));
            }
            // Other names, and another account's orders, are not counted
            // for these names.
            let other = Identifiers::new(["b.example", "a.example"]);
            for (account, url, names) in [
                (acct, "https://ca/order/other", &other),
                (other_acct, "https://other/order/1", &names),
            ] {
                s.record_order(account, "www", url, names, OrderStatus::Valid, &[])
                    .await
                    .expect("order");
                s.set_order_state(url, OrderStatus::Valid, OrderStep::Done, None)
                    .await
                    .expect("state");
            }
            assert_eq!(
                s.issued_since(acct, &names, 0).await.expect("count"),
                (3, Some(start))
            );
            // Only what was updated inside the window.
            assert_eq!(
                s.issued_since(acct, &names, start + 1).await.expect("count"),
                (2, Some(start + 10))
            );
            assert_eq!(
                s.issued_since(acct, &names, start + 1000).await.expect("count"),
                (0, None)
            );
            assert_eq!(
                s.orders_since(acct, start).await.expect("count"),
                (6, Some(start))
            );
            assert_eq!(
                s.orders_since(acct, start + 5).await.expect("count"),
                (5, Some(start + 10))
            );
            assert_eq!(s.orders_since(other_acct, 0).await.expect("count").0, 1);
            assert_eq!(
                s.orders_since(acct, start + 1000).await.expect("count"),
                (0, None)
            );
        }

        /// The CA hands the same authorization to every order for a name
        /// until it is used: each row is recorded once, linked to every
        /// order, and what the CA said last is what the ledger holds.
        async fn order_with_reused_authz_is_recorded_once(s: Ledger) {
            let acct = s
                .upsert_account("https://ca/dir", "https://ca/acct/1")
                .await
                .expect("account");
            let names = Identifiers::new(["a.example"]);
            let first = authz(1, "a.example", Some(5_000_000));
            let id1 = s
                .record_order(
                    acct,
                    "www",
                    "https://ca/order/1",
                    &names,
                    OrderStatus::Pending,
                    std::slice::from_ref(&first),
                )
                .await
                .expect("order");
            // A CA that hands back the same order and authz must not
            // duplicate rows.
            let again = s
                .record_order(
                    acct,
                    "www",
                    "https://ca/order/1",
                    &names,
                    OrderStatus::Pending,
                    std::slice::from_ref(&first),
                )
                .await
                .expect("order again");
            assert_eq!(again, id1);
            // The second order shares the first authorization (its
            // expiry unknown this time, so the known one stays) and has
            // one of its own.
            let shared = authz(1, "a.example", None);
            let id2 = s
                .record_order(
                    acct,
                    "api",
                    "https://ca/order/2",
                    &names,
                    OrderStatus::Pending,
                    &[authz(2, "b.example", None), shared],
                )
                .await
                .expect("second order");
            assert_ne!(id1, id2);
            assert!(s.order_known("https://ca/order/2").await.expect("known"));
            let list = s.authz_list(true).await.expect("list");
            let urls: Vec<_> = list
                .iter()
                .map(|a| (a.url.as_str(), a.order_url.as_deref()))
                .collect();
            assert_eq!(
                urls,
                [
                    ("https://ca/authz/2", Some("https://ca/order/2")),
                    ("https://ca/authz/1", Some("https://ca/order/2")),
                ]
            );
            for order in ["https://ca/order/1", "https://ca/order/2"] {
                let of_order = s.pending_authz_of_order(order).await.expect("of order");
                assert!(
                    of_order.contains(&("https://ca/authz/1".to_owned(), "a.example".to_owned())),
                    "{order}: {of_order:?}"
                );
            }
            assert_eq!(
                s.authz_of_challenge("https://ca/chal/1").await.expect("challenge"),
                Some("https://ca/authz/1".to_owned())
            );
            let now = s.clock().now().secs();
            let page = s
                .stale_pending_authz(crate::ledger::StalePage {
                    account_id: acct,
                    cutoff: now,
                    now,
                    ignore_backoff: false,
                    after_id: 0,
                    limit: 10,
                })
                .await
                .expect("page");
            assert_eq!(page.len(), 2);
            assert_eq!(page[0].url, "https://ca/authz/1");
            assert_eq!(page[0].expires_at, Some(5_000_000));
            // Counted once per certificate, and once for the account.
            assert_eq!(
                s.pending_authz_by_cert().await.expect("by cert"),
                [("api".to_owned(), 2), ("www".to_owned(), 1)]
            );
            assert_eq!(s.pending_count(acct).await.expect("count"), 2);

            s.set_authz_deactivated("https://ca/authz/1", Actor::Driver, AuthzStatus::Pending)
                .await
                .expect("deactivate");
            s.set_authz_deactivated("https://ca/authz/2", Actor::Driver, AuthzStatus::Pending)
                .await
                .expect("deactivate");
            assert!(s.authz_list(true).await.expect("list").is_empty());
            assert_eq!(s.authz_list(false).await.expect("list").len(), 2);
            assert_eq!(s.integrity_check().await.expect("check"), "ok");
        }

        /// Two hosts recording orders at once whose authorizations overlap,
        /// listed in opposite orders: each row is recorded once, linked to
        /// both orders, and neither write fails (on PostgreSQL, without
        /// the account's lock, such pairs deadlock).
        async fn concurrent_orders_sharing_authorizations_record_each_once(s: Ledger) {
            let acct = s
                .upsert_account("https://ca/dir", "https://ca/acct/1")
                .await
                .expect("account");
            let names = Identifiers::new(["a.example", "b.example"]);
            let mut tasks = Vec::new();
            for host in 0..2_u32 {
                let s = s.clone();
                let names = names.clone();
                tasks.push(tokio::spawn(async move {
                    for i in 0..20_u32 {
                        let mut authzs = vec![
                            authz(2 * i, "a.example", None),
                            authz(2 * i + 1, "b.example", None),
                        ];
                        if host == 1 {
                            authzs.reverse();
                        }
                        let url = format!("https://ca/order/{host}/{i}");
                        s.record_order(acct, "www", &url, &names, OrderStatus::Pending, &authzs)
                            .await
                            .expect("record");
                    }
                }));
            }
            for task in tasks {
                task.await.expect("task");
            }
            assert_eq!(s.pending_count(acct).await.expect("count"), 40);
            assert_eq!(s.authz_list(false).await.expect("list").len(), 40);
            for i in 0..20 {
                for host in 0..2 {
                    let of_order = s
                        .pending_authz_of_order(&format!("https://ca/order/{host}/{i}"))
                        .await
                        .expect("of order");
                    assert_eq!(of_order.len(), 2, "{host}/{i}");
                }
            }
        }

        /// A new order for the same names takes up exactly the orders at a
        /// resumable step whose CA status is still live and that have not
        /// expired; every step certd writes is covered, so a step added later
        /// is decided here too. (The query once also named a `created` step
        /// that nothing writes.)
        async fn resumable_orders_are_the_live_ones_at_a_resumable_step(s: Ledger) {
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
            // Not yet expired, it is; of two, the newest.
            s.set_order_expires("https://ca/order/old", now + 1)
                .await
                .expect("expires");
            let found = s
                .resumable_order(acct, &names, now)
                .await
                .expect("query")
                .expect("the order");
            assert_eq!(found.url, "https://ca/order/old");
            assert_eq!(found.cert_name, "www");
            assert_eq!(found.identifiers, names);
            s.record_order(
                acct,
                "www",
                "https://ca/order/new",
                &names,
                OrderStatus::Ready,
                &[],
            )
            .await
            .expect("order");
            assert_eq!(
                s.resumable_order(acct, &names, now)
                    .await
                    .expect("query")
                    .map(|o| o.url),
                Some("https://ca/order/new".to_owned())
            );
            // Other names are other orders.
            let other = Identifiers::new(["b.example"]);
            assert!(
                s.resumable_order(acct, &other, 0)
                    .await
                    .expect("query")
                    .is_none()
            );
            // In flight: the steps recovery looks at, in the order recorded.
            s.set_order_state(
                "https://ca/order/old",
                OrderStatus::Processing,
                OrderStep::Finalizing,
                None,
            )
            .await
            .expect("state");
            let in_flight: Vec<(String, OrderStep)> = s
                .in_flight_orders(acct)
                .await
                .expect("query")
                .into_iter()
                .map(|o| (o.url, o.step))
                .collect();
            assert_eq!(
                in_flight,
                [
                    ("https://ca/order/old".to_owned(), OrderStep::Finalizing),
                    ("https://ca/order/new".to_owned(), OrderStep::Authorizing),
                ]
            );
        }

        /// Intents stand for `newOrder` calls whose order is not recorded:
        /// they name the certificate of an order recovery finds at the CA,
        /// ahead of earlier orders for the same names, newest first.
        async fn intents_name_the_certificate_of_an_unknown_order(s: Ledger) {
            let acct = s
                .upsert_account("https://ca/dir", "https://ca/acct/1")
                .await
                .expect("account");
            let other_acct = s
                .upsert_account("https://other/dir", "https://other/acct/1")
                .await
                .expect("account");
            let names = Identifiers::new(["a.example", "b.example"]);
            assert!(!s.has_intents(acct).await.expect("intents"));
            assert_eq!(s.cert_name_for(acct, &names).await.expect("name"), None);
            s.record_order(acct, "old", "https://ca/order/1", &names, OrderStatus::Valid, &[])
                .await
                .expect("order");
            assert_eq!(
                s.cert_name_for(acct, &names).await.expect("name").as_deref(),
                Some("old")
            );
            let first = s.record_intent(acct, "first", &names).await.expect("intent");
            let second = s.record_intent(acct, "second", &names).await.expect("intent");
            assert_ne!(first, second);
            assert!(s.has_intents(acct).await.expect("intents"));
            assert!(!s.has_intents(other_acct).await.expect("intents"));
            assert_eq!(
                s.cert_name_for(acct, &names).await.expect("name").as_deref(),
                Some("second")
            );
            // Another account's intents, and other names, are not these.
            assert_eq!(
                s.cert_name_for(other_acct, &names).await.expect("name"),
                None
            );
            assert_eq!(
                s.cert_name_for(acct, &Identifiers::new(["a.example"]))
                    .await
                    .expect("name"),
                None
            );
            s.clear_intent(second).await.expect("clear");
            assert_eq!(
                s.cert_name_for(acct, &names).await.expect("name").as_deref(),
                Some("first")
            );
            let kept = s.record_intent(other_acct, "theirs", &names).await.expect("intent");
            s.clear_intents(acct).await.expect("clear all");
            assert!(!s.has_intents(acct).await.expect("intents"));
            assert_eq!(
                s.cert_name_for(acct, &names).await.expect("name").as_deref(),
                Some("old")
            );
            assert!(s.has_intents(other_acct).await.expect("intents"));
            s.clear_intent(kept).await.expect("clear");
            assert!(!s.has_intents(other_acct).await.expect("intents"));
            assert!(!s.order_known("https://ca/order/2").await.expect("known"));
        }

        /// A handle fenced by a lease another host now holds records no
        /// order, intent or state on PostgreSQL; SQLite has one writer and
        /// no fences.
        async fn a_lost_lease_records_no_order(s: Ledger) {
            let acct = s
                .upsert_account("https://ca/dir", "https://ca/acct/1")
                .await
                .expect("account");
            let names = Identifiers::new(["a.example"]);
            s.record_order(acct, "www", "https://ca/order/1", &names, OrderStatus::Pending, &[])
                .await
                .expect("order");
            let stale = s.fenced(lease::lost(&s, "cert:www").await);
            let order = stale
                .record_order(
                    acct,
                    "www",
                    "https://ca/order/2",
                    &names,
                    OrderStatus::Pending,
                    &[authz(1, "a.example", None)],
                )
                .await;
            let intent = stale.record_intent(acct, "www", &names).await;
            let state = stale
                .set_order_state(
                    "https://ca/order/1",
                    OrderStatus::Invalid,
                    OrderStep::Failed,
                    Some("lost"),
                )
                .await;
            let in_flight = s.in_flight_orders(acct).await.expect("in flight");
            if s.is_shared() {
                for result in [order.map(drop), intent.map(drop), state] {
                    assert!(
                        matches!(result, Err(LedgerError::Fenced { ref lease, .. }) if lease == "cert:www"),
                        "{result:?}"
                    );
                }
                assert!(!s.order_known("https://ca/order/2").await.expect("known"));
                assert!(s.authz("https://ca/authz/1").await.expect("authz").is_none());
                assert!(!s.has_intents(acct).await.expect("intents"));
                assert_eq!(in_flight.len(), 1);
                assert_eq!(in_flight[0].step, OrderStep::Authorizing);
            } else {
                order.expect("SQLite ignores fences");
                intent.expect("SQLite ignores fences");
                state.expect("SQLite ignores fences");
                assert!(s.order_known("https://ca/order/2").await.expect("known"));
                assert!(s.has_intents(acct).await.expect("intents"));
                assert_eq!(in_flight.len(), 1);
                assert_eq!(in_flight[0].url, "https://ca/order/2");
            }
            // The holder's own fence writes.
            let held = s.fenced(lease::held(&s, "cert:www").await);
            held.set_order_expires("https://ca/order/1", 1)
                .await
                .expect("a held lease writes");
            assert!(
                s.resumable_order(acct, &names, 2)
                    .await
                    .expect("query")
                    .is_none_or(|o| o.url != "https://ca/order/1")
            );
        }
    }

    /// The issued record: waiting until installed, then not. (`issued`
    /// is SQLite-only until its own PostgreSQL port; this then becomes a
    /// conformance test.)
    #[tokio::test]
    async fn the_issued_record_waits_until_installed() {
        let (_dir, s) = ledger().await;
        let acct = s
            .upsert_account("https://ca/dir", "https://ca/acct/1")
            .await
            .expect("account");
        let names = Identifiers::new(["a.example"]);
        s.record_order(
            acct,
            "www",
            "https://ca/order/2",
            &names,
            OrderStatus::Valid,
            &[],
        )
        .await
        .expect("order");
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
}
