//! Admission and the intents of one certificate on PostgreSQL: see
//! `ledger/intents.rs`.

use crate::ledger::intents::{AdmitLimits, Admitted, INTENT_RESERVES_SECS, IntentRow, judge};
use crate::ledger::{Identifiers, Result};

use super::PgLedger;

impl PgLedger {
    pub(in crate::ledger) async fn admit_intent(
        &self,
        now: i64,
        account_id: i64,
        cert_name: &str,
        identifiers: &Identifiers,
        limits: AdmitLimits,
    ) -> Result<Admitted> {
        let mut tx = self.write().await?;
        // Transaction-scoped: released at commit or rollback, so a host
        // that dies mid-admission holds nothing. Keyed by the account, so
        // admissions for other accounts do not wait.
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtextextended('certd:admit:' || $1::text, 0))",
        )
        .bind(account_id)
        .execute(&mut *tx)
        .await?;
        let (pending,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM authorizations WHERE account_id = $1 AND status = 'pending'",
        )
        .bind(account_id)
        .fetch_one(&mut *tx)
        .await?;
        let intents: Vec<(Identifiers,)> = sqlx::query_as(
            "SELECT identifiers FROM order_intents WHERE account_id = $1 AND created_at > $2",
        )
        .bind(account_id)
        .bind(now - INTENT_RESERVES_SECS)
        .fetch_all(&mut *tx)
        .await?;
        let orders = match limits.new_orders {
            Some((since, _)) => Some(
                sqlx::query_as::<_, (i64, Option<i64>)>(
                    "SELECT COUNT(*), MIN(created_at) FROM orders
                     WHERE account_id = $1 AND created_at >= $2",
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
             VALUES ($1, $2, $3, $4) RETURNING id",
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

    pub(in crate::ledger) async fn intents_of(
        &self,
        account_id: i64,
        cert_name: &str,
    ) -> Result<Vec<IntentRow>> {
        Ok(sqlx::query_as(
            "SELECT id, identifiers, created_at FROM order_intents
             WHERE account_id = $1 AND cert_name = $2 ORDER BY id",
        )
        .bind(account_id)
        .bind(cert_name)
        .fetch_all(self.pool())
        .await?)
    }

    pub(in crate::ledger) async fn clear_intents_of(
        &self,
        account_id: i64,
        cert_name: &str,
        up_to: i64,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "DELETE FROM order_intents WHERE account_id = $1 AND cert_name = $2 AND id <= $3",
        )
        .bind(account_id)
        .bind(cert_name)
        .bind(up_to)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
