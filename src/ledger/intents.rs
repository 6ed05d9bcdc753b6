//! Intents as reservations: fleet mode's admission of a `newOrder`
//! against the account's limits, counted over the shared ledger and
//! reserved atomically, and the intents of one certificate, which
//! per-lease recovery adopts and clears without touching a peer's.

use super::{Db, Identifiers, Ledger, Result};

/// How long an intent counts as a reservation. A live intent lasts from
/// admission to the order's recording, seconds; an older one was left by
/// a process that died, and recovery of its certificate clears it. Past
/// this age it no longer holds back the account's other orders (the
/// certificate may be gone from every host's configuration).
pub(crate) const INTENT_RESERVES_SECS: i64 = 3600;

/// What an admission is checked against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdmitLimits {
    /// `max_pending`: pending authorizations plus the identifiers of the
    /// intents in flight stay under it.
    pub(crate) max_pending: u32,
    /// The CA's new-order limit, `(since, limit)`: orders created since
    /// plus intents in flight stay under it. `None`: the order is exempt
    /// (an ARI renewal inside the CA's window).
    pub(crate) new_orders: Option<(i64, u32)>,
}

/// The answer of [`Ledger::admit_intent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admitted {
    /// Admitted: the intent written, its id (the reservation, which
    /// becomes the order's authorizations once the order is recorded).
    Intent(i64),
    /// `max_pending` reached: pending authorizations plus identifiers in
    /// flight.
    Full { pending: i64 },
    /// The new-order limit reached: orders plus intents in the window,
    /// and the oldest order's time.
    NewOrders { count: i64, oldest: Option<i64> },
}

/// An intent of one certificate: a `newOrder` written ahead.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct IntentRow {
    pub(crate) id: i64,
    pub(crate) identifiers: Identifiers,
    pub(crate) created_at: i64,
}

impl Ledger {
    /// Admits a `newOrder` for `identifiers` of `cert_name`: counts the
    /// account's pending authorizations and the identifiers of its
    /// intents in flight (and, unless exempt, its orders and intents in
    /// the CA's new-order window) and, under the limits, writes the
    /// intent, all in one transaction. On PostgreSQL the transaction holds
    /// an advisory lock keyed by the account, so two hosts admitting at
    /// once are counted one after the other and never pass the limits
    /// together.
    pub(crate) async fn admit_intent(
        &self,
        account_id: i64,
        cert_name: &str,
        identifiers: &Identifiers,
        limits: AdmitLimits,
    ) -> Result<Admitted> {
        let now = self.now();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => {
                return pg
                    .admit_intent(now, account_id, cert_name, identifiers, limits)
                    .await;
            }
        };
        // One writer at a time on SQLite: BEGIN IMMEDIATE takes the write
        // lock before counting.
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        let (pending,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM authorizations WHERE account_id = ? AND status = 'pending'",
        )
        .bind(account_id)
        .fetch_one(&mut *tx)
        .await?;
        let intents: Vec<(Identifiers,)> = sqlx::query_as(
            "SELECT identifiers FROM order_intents WHERE account_id = ? AND created_at > ?",
        )
        .bind(account_id)
        .bind(now - INTENT_RESERVES_SECS)
        .fetch_all(&mut *tx)
        .await?;
        let orders = match limits.new_orders {
            Some((since, _)) => Some(
                sqlx::query_as::<_, (i64, Option<i64>)>(
                    "SELECT COUNT(*), MIN(created_at) FROM orders
                     WHERE account_id = ? AND created_at >= ?",
                )
                .bind(account_id)
                .bind(since)
                .fetch_one(&mut *tx)
                .await?,
            ),
            None => None,
        };
        if let Some(refused) = judge(&limits, pending, &intents, orders) {
            return Ok(refused);
        }
        let (id,): (i64,) = sqlx::query_as(
            "INSERT INTO order_intents (account_id, cert_name, identifiers, created_at)
             VALUES (?, ?, ?, ?) RETURNING id",
        )
        .bind(account_id)
        .bind(cert_name)
        .bind(identifiers)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Admitted::Intent(id))
    }

    /// The intents of `cert_name` in the account, oldest first: what a
    /// new holder of the certificate's lease looks for at the CA.
    pub(crate) async fn intents_of(
        &self,
        account_id: i64,
        cert_name: &str,
    ) -> Result<Vec<IntentRow>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.intents_of(account_id, cert_name).await,
        };
        Ok(sqlx::query_as(
            "SELECT id, identifiers, created_at FROM order_intents
             WHERE account_id = ? AND cert_name = ? ORDER BY id",
        )
        .bind(account_id)
        .bind(cert_name)
        .fetch_all(pool)
        .await?)
    }

    /// Forgets the intents of `cert_name` up to `up_to` (the newest id
    /// recovery saw), once recovery has matched them; an intent written
    /// after that, by the holder itself, stays.
    pub(crate) async fn clear_intents_of(
        &self,
        account_id: i64,
        cert_name: &str,
        up_to: i64,
    ) -> Result<()> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.clear_intents_of(account_id, cert_name, up_to).await,
        };
        sqlx::query("DELETE FROM order_intents WHERE account_id = ? AND cert_name = ? AND id <= ?")
            .bind(account_id)
            .bind(cert_name)
            .bind(up_to)
            .execute(pool)
            .await?;
        Ok(())
    }
}

/// The admission's verdict on what the ledger counted: `None` admits.
/// `orders` is the new-order window's count and oldest, when checked.
pub(in crate::ledger) fn judge(
    limits: &AdmitLimits,
    pending: i64,
    intents: &[(Identifiers,)],
    orders: Option<(i64, Option<i64>)>,
) -> Option<Admitted> {
    let in_flight: i64 = intents
        .iter()
        .map(|(names,)| i64::try_from(names.len()).unwrap_or(i64::MAX))
        .sum();
    let pending = pending.saturating_add(in_flight);
    if pending >= i64::from(limits.max_pending) {
        return Some(Admitted::Full { pending });
    }
    if let (Some((_, limit)), Some((count, oldest))) = (limits.new_orders, orders) {
        let count = count.saturating_add(i64::try_from(intents.len()).unwrap_or(i64::MAX));
        if count >= i64::from(limit) {
            return Some(Admitted::NewOrders { count, oldest });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use sqlx::postgres::PgPoolOptions;

    use super::*;
    use crate::ledger::test_util::{START, conformance, pg_ledger};
    use crate::ledger::{AuthzStatus, NewAuthz, OrderStatus};

    fn pending(i: u32, identifier: &str) -> NewAuthz {
        NewAuthz {
            url: format!("https://ca/authz/{i}"),
            identifier: identifier.into(),
            status: AuthzStatus::Pending,
            expires_at: None,
            challenges: Vec::new(),
        }
    }

    fn limits(max_pending: u32, new_orders: Option<u32>) -> AdmitLimits {
        AdmitLimits {
            max_pending,
            new_orders: new_orders.map(|limit| (START - 3 * 3600, limit)),
        }
    }

    conformance! {
        /// Pending authorizations and the identifiers of intents in
        /// flight count against `max_pending`; the intent written is the
        /// reservation, and once cleared it no longer counts.
        async fn admission_counts_pending_authorizations_and_intents(s: Ledger) {
            let acct = s.upsert_account("https://ca/dir", "https://ca/acct/1").await.expect("account");
            let other = s.upsert_account("https://other/dir", "https://other/acct/1").await.expect("account");
            let two = Identifiers::new(["a.example", "b.example"]);
            s.record_order(acct, "old", "https://ca/order/1", &two, OrderStatus::Pending,
                &[pending(1, "a.example"), pending(2, "b.example")]).await.expect("order");
            // Another account's pending authorizations are not counted.
            s.record_order(other, "x", "https://other/order/1", &two, OrderStatus::Pending,
                &[pending(3, "a.example"), pending(4, "b.example")]).await.expect("order");
            let first = match s.admit_intent(acct, "www", &two, limits(5, None)).await.expect("admit") {
                Admitted::Intent(id) => id,
                other => panic!("expected an intent, got {other:?}"),
            };
            // 2 pending + 2 in flight: one more identifier fits, not two.
            assert_eq!(
                s.admit_intent(acct, "api", &two, limits(4, None)).await.expect("admit"),
                Admitted::Full { pending: 4 }
            );
            assert_eq!(s.intents_of(acct, "api").await.expect("intents"), []);
            let one = Identifiers::new(["c.example"]);
            assert!(matches!(
                s.admit_intent(acct, "api", &one, limits(5, None)).await.expect("admit"),
                Admitted::Intent(_)
            ));
            assert_eq!(
                s.admit_intent(acct, "api", &one, limits(5, None)).await.expect("admit"),
                Admitted::Full { pending: 5 }
            );
            s.clear_intent(first).await.expect("clear");
            assert!(matches!(
                s.admit_intent(acct, "mail", &one, limits(5, None)).await.expect("admit"),
                Admitted::Intent(_)
            ));
        }

        /// The CA's new-order window counts recorded orders and intents
        /// about to be sent; an exempt order is not held to it.
        async fn admission_counts_intents_in_the_new_order_window(s: Ledger) {
            let acct = s.upsert_account("https://ca/dir", "https://ca/acct/1").await.expect("account");
            let names = Identifiers::new(["a.example"]);
            s.record_order(acct, "old", "https://ca/order/1", &names, OrderStatus::Valid, &[])
                .await.expect("order");
            assert!(matches!(
                s.admit_intent(acct, "www", &names, limits(100, Some(3))).await.expect("admit"),
                Admitted::Intent(_)
            ));
            assert_eq!(
                s.admit_intent(acct, "api", &names, limits(100, Some(2))).await.expect("admit"),
                Admitted::NewOrders { count: 2, oldest: Some(START) }
            );
            assert!(matches!(
                s.admit_intent(acct, "api", &names, limits(100, None)).await.expect("admit"),
                Admitted::Intent(_)
            ));
        }

        /// A certificate's intents are listed and cleared alone, up to the
        /// newest recovery saw.
        async fn intents_of_one_certificate(s: Ledger) {
            let acct = s.upsert_account("https://ca/dir", "https://ca/acct/1").await.expect("account");
            let a = Identifiers::new(["a.example"]);
            let b = Identifiers::new(["b.example"]);
            let first = s.record_intent(acct, "www", &a).await.expect("intent");
            let peer = s.record_intent(acct, "api", &b).await.expect("intent");
            let later = s.record_intent(acct, "www", &b).await.expect("intent");
            let rows = s.intents_of(acct, "www").await.expect("intents");
            assert_eq!(
                rows,
                [
                    IntentRow { id: first, identifiers: a.clone(), created_at: START },
                    IntentRow { id: later, identifiers: b.clone(), created_at: START },
                ]
            );
            s.clear_intents_of(acct, "www", first).await.expect("clear");
            let ids = |rows: Vec<IntentRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
            assert_eq!(ids(s.intents_of(acct, "www").await.expect("intents")), [later]);
            assert_eq!(ids(s.intents_of(acct, "api").await.expect("intents")), [peer]);
        }
    }

    /// Two hosts (two pools on one database) admitting orders for one
    /// account at once: the advisory lock makes each count see the
    /// other's intents, so never more than `max_pending` identifiers are
    /// admitted in total.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_hosts_admitting_at_once_stay_under_max_pending() {
        let (dir, a) = pg_ledger().await;
        let Db::Postgres(pg) = &a.db else {
            unreachable!("pg_ledger is PostgreSQL")
        };
        let options = (*pg.pool().connect_options()).clone();
        let pool_b = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .expect("second host's pool");
        let b = Ledger::postgres(pool_b, dir.path().to_owned(), a.clock().clone());
        let acct = a
            .upsert_account("https://ca/dir", "https://ca/acct/1")
            .await
            .expect("account");
        const MAX: u32 = 7;
        // Four tasks per host, each admitting three single-name orders.
        let mut tasks = tokio::task::JoinSet::new();
        for (s, host) in [(&a, "a"), (&b, "b")] {
            for task in 0..4 {
                let s = s.clone();
                tasks.spawn(async move {
                    let mut admitted = 0;
                    for i in 0..3 {
                        let cert = format!("{host}{task}-{i}");
                        let names = Identifiers::new([format!("{cert}.example")]);
                        match s
                            .admit_intent(acct, &cert, &names, limits(MAX, None))
                            .await
                            .expect("admit")
                        {
                            Admitted::Intent(_) => admitted += 1,
                            Admitted::Full { pending } => assert_eq!(pending, i64::from(MAX)),
                            other => panic!("{other:?}"),
                        }
                    }
                    admitted
                });
            }
        }
        let mut total = 0;
        while let Some(admitted) = tasks.join_next().await {
            total += admitted.expect("a host's task");
        }
        assert_eq!(total, MAX, "admitted in total");
        let mut intents = 0;
        for host in ["a", "b"] {
            for task in 0..4 {
                for i in 0..3 {
                    let cert = format!("{host}{task}-{i}");
                    intents += a.intents_of(acct, &cert).await.expect("intents").len();
                }
            }
        }
        assert_eq!(intents, MAX as usize);
    }
}
