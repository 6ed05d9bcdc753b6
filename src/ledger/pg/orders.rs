//! `orders` and `order_intents` on PostgreSQL: see `ledger/orders.rs`.

use crate::ledger::orders::{in_flight_steps, live_statuses, resumable_steps};
use crate::ledger::{Identifiers, NewAuthz, OrderRow, OrderStatus, OrderStep, Result};

use super::PgLedger;

impl PgLedger {
    #[allow(clippy::too_many_arguments)]
    pub(in crate::ledger) async fn record_order(
        &self,
        now: i64,
        account_id: i64,
        cert_name: &str,
        order_url: &str,
        identifiers: &Identifiers,
        status: OrderStatus,
        authzs: &[NewAuthz],
    ) -> Result<i64> {
        let mut tx = self.write().await?;
        // Two hosts may record orders of one account at once that share
        // authorizations (the CA hands the same pending authorization to
        // every order of the account for a name). Every statement is an
        // upsert, so the unique indexes settle which insert wins; but two
        // transactions inserting overlapping new rows in different orders
        // would deadlock. A transaction-scoped advisory lock per account
        // (authorizations belong to one account) records them one at a
        // time, in the order given, so the rows' ids follow the CA's order
        // as on SQLite; it is released at commit or rollback, never held
        // across the CA's answer.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('certd:record_order', $1))")
            .bind(account_id)
            .execute(&mut *tx)
            .await?;
        let (order_id,): (i64,) = sqlx::query_as(
            "INSERT INTO orders (url, account_id, cert_name, identifiers, status, step, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (url) DO UPDATE SET status = excluded.status, step = excluded.step,
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
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (url) DO UPDATE SET status = excluded.status,
                     expires_at = COALESCE(excluded.expires_at, authorizations.expires_at),
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
                "INSERT INTO order_authorizations (order_id, authz_id) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING",
            )
            .bind(order_id)
            .bind(authz_id)
            .execute(&mut *tx)
            .await?;
            for c in &a.challenges {
                sqlx::query(
                    "INSERT INTO challenges (url, authz_id, type, status) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (url) DO UPDATE SET status = excluded.status",
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

    pub(in crate::ledger) async fn set_order_state(
        &self,
        now: i64,
        order_url: &str,
        status: OrderStatus,
        step: OrderStep,
        error: Option<&str>,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE orders SET status = $1, step = $2, error = COALESCE($3, error), updated_at = $4
             WHERE url = $5",
        )
        .bind(status)
        .bind(step)
        .bind(error)
        .bind(now)
        .bind(order_url)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn orders_since(
        &self,
        account_id: i64,
        since: i64,
    ) -> Result<(i64, Option<i64>)> {
        Ok(sqlx::query_as(
            "SELECT COUNT(*), MIN(created_at) FROM orders WHERE account_id = $1 AND created_at >= $2",
        )
        .bind(account_id)
        .bind(since)
        .fetch_one(self.pool())
        .await?)
    }

    pub(in crate::ledger) async fn issued_since(
        &self,
        account_id: i64,
        identifiers: &Identifiers,
        since: i64,
    ) -> Result<(i64, Option<i64>)> {
        Ok(sqlx::query_as(
            "SELECT COUNT(*), MIN(updated_at) FROM orders
             WHERE account_id = $1 AND identifiers = $2 AND (status = $3 OR step = $4)
               AND updated_at >= $5",
        )
        .bind(account_id)
        .bind(identifiers)
        .bind(OrderStatus::Valid)
        .bind(OrderStep::Done)
        .bind(since)
        .fetch_one(self.pool())
        .await?)
    }

    pub(in crate::ledger) async fn in_flight_orders(
        &self,
        account_id: i64,
    ) -> Result<Vec<OrderRow>> {
        let sql = format!(
            "SELECT url, cert_name, identifiers, status, step FROM orders
             WHERE account_id = $1 AND step IN ({}) ORDER BY id",
            in_flight_steps()
        );
        Ok(sqlx::query_as(&sql)
            .bind(account_id)
            .fetch_all(self.pool())
            .await?)
    }

    pub(in crate::ledger) async fn resumable_order(
        &self,
        account_id: i64,
        identifiers: &Identifiers,
        now: i64,
    ) -> Result<Option<OrderRow>> {
        let sql = format!(
            "SELECT url, cert_name, identifiers, status, step FROM orders
             WHERE account_id = $1 AND identifiers = $2 AND step IN ({}) AND status IN ({})
               AND (expires_at IS NULL OR expires_at > $3)
             ORDER BY id DESC LIMIT 1",
            resumable_steps(),
            live_statuses(),
        );
        Ok(sqlx::query_as(&sql)
            .bind(account_id)
            .bind(identifiers)
            .bind(now)
            .fetch_optional(self.pool())
            .await?)
    }

    pub(in crate::ledger) async fn set_order_expires(
        &self,
        order_url: &str,
        expires_at: i64,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("UPDATE orders SET expires_at = $1 WHERE url = $2")
            .bind(expires_at)
            .bind(order_url)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn record_intent(
        &self,
        now: i64,
        account_id: i64,
        cert_name: &str,
        identifiers: &Identifiers,
    ) -> Result<i64> {
        let mut tx = self.write().await?;
        // Each intent is its own row (an identity id), so hosts writing
        // intents for one account at once never touch each other's.
        let (id,): (i64,) = sqlx::query_as(
            "INSERT INTO order_intents (account_id, cert_name, identifiers, created_at)
             VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(account_id)
        .bind(cert_name)
        .bind(identifiers)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    pub(in crate::ledger) async fn clear_intent(&self, id: i64) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM order_intents WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn has_intents(&self, account_id: i64) -> Result<bool> {
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT id FROM order_intents WHERE account_id = $1 LIMIT 1")
                .bind(account_id)
                .fetch_optional(self.pool())
                .await?;
        Ok(row.is_some())
    }

    pub(in crate::ledger) async fn clear_intents(&self, account_id: i64) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM order_intents WHERE account_id = $1")
            .bind(account_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn cert_name_for(
        &self,
        account_id: i64,
        identifiers: &Identifiers,
    ) -> Result<Option<String>> {
        // PostgreSQL 15 wants the subquery named.
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT cert_name FROM (
                 SELECT cert_name, 1 AS rank, id FROM order_intents WHERE account_id = $1 AND identifiers = $2
                 UNION ALL
                 SELECT cert_name, 2 AS rank, id FROM orders WHERE account_id = $1 AND identifiers = $2
             ) AS known ORDER BY rank, id DESC LIMIT 1",
        )
        .bind(account_id)
        .bind(identifiers)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|r| r.0))
    }

    pub(in crate::ledger) async fn order_known(&self, order_url: &str) -> Result<bool> {
        let row: Option<(i64,)> = sqlx::query_as("SELECT id FROM orders WHERE url = $1")
            .bind(order_url)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.is_some())
    }
}
