//! `events` on PostgreSQL: see `ledger/events.rs`. Events are only ever
//! inserted, each with its own id from the identity column, so hosts
//! writing at once never touch the same row.

use crate::ledger::events::{Latest, ReaperSummary};
use crate::ledger::{Actor, AuthzStatus, EventKind, Result};

use super::PgLedger;

impl PgLedger {
    pub(in crate::ledger) async fn event(
        &self,
        now: i64,
        kind: EventKind,
        cert_name: Option<&str>,
        order_url: Option<&str>,
        authz_url: Option<&str>,
        detail: Option<&str>,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO events (at, kind, cert_name, order_url, authz_url, detail)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(now)
        .bind(kind)
        .bind(cert_name)
        .bind(order_url)
        .bind(authz_url)
        .bind(detail)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn restart_needed(&self) -> Result<Option<String>> {
        let row: Option<(EventKind, Option<String>)> = sqlx::query_as(
            "SELECT kind, detail FROM events WHERE kind IN ($1, $2) ORDER BY id DESC LIMIT 1",
        )
        .bind(EventKind::DaemonStarted)
        .bind(EventKind::RestartNeeded)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.and_then(|(kind, detail)| {
            detail.filter(|d| kind == EventKind::RestartNeeded && !d.is_empty())
        }))
    }

    pub(in crate::ledger) async fn cert_events(
        &self,
        name: &str,
        limit: i64,
    ) -> Result<Vec<(i64, EventKind, Option<String>)>> {
        Ok(sqlx::query_as(
            "SELECT at, kind, detail FROM events WHERE cert_name = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(name)
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    pub(in crate::ledger) async fn ca_unreachable(&self) -> Result<Option<(i64, String)>> {
        let row: Option<(i64, EventKind, Option<String>)> = sqlx::query_as(
            "SELECT at, kind, detail FROM events WHERE kind IN ($1, $2, $3) ORDER BY id DESC LIMIT 1",
        )
        .bind(EventKind::DaemonStarted)
        .bind(EventKind::CaUnreachable)
        .bind(EventKind::CaReachable)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.and_then(|(at, kind, detail)| {
            (kind == EventKind::CaUnreachable).then(|| (at, detail.unwrap_or_default()))
        }))
    }

    pub(in crate::ledger) async fn count_events(&self, kind: EventKind) -> Result<i64> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM events WHERE kind = $1")
            .bind(kind)
            .fetch_one(self.pool())
            .await?;
        Ok(n)
    }

    pub(in crate::ledger) async fn reaper_summary(
        &self,
        account_id: i64,
        now: i64,
    ) -> Result<ReaperSummary> {
        // Literals, as on SQLite: the partial indexes `authz_pending` and
        // `authz_reaped` serve a query whose predicate names their literal.
        let sql = format!(
            "SELECT
                (SELECT COUNT(*) FROM authorizations WHERE account_id = $1 AND status = '{pending}'),
                (SELECT COUNT(*) FROM authorizations WHERE account_id = $1 AND deactivated_by = '{reaper}'),
                (SELECT COUNT(*) FROM authorizations WHERE account_id = $1 AND deactivated_by = '{reaper}'
                    AND deactivated_at >= $2),
                (SELECT COUNT(DISTINCT a.id) FROM authorizations a JOIN events e ON e.authz_url = a.url
                    WHERE a.account_id = $1 AND a.status = '{pending}' AND e.kind = $3)",
            pending = AuthzStatus::Pending,
            reaper = Actor::Reaper,
        );
        let counts: (i64, i64, i64, i64) = sqlx::query_as(&sql)
            .bind(account_id)
            .bind(now - 86_400)
            .bind(EventKind::HeldBack)
            .fetch_one(self.pool())
            .await?;
        let last = self.latest(EventKind::ReaperPass).await?;
        let guard = self.latest(EventKind::PendingAuthzGuard).await?;
        let rate_limited = self.latest(EventKind::RateLimited).await?;
        Ok(ReaperSummary::from_parts(
            counts,
            last,
            guard.map(|g| g.0),
            rate_limited,
        ))
    }

    /// The newest event of `kind`, by `at` then id: the order of the index
    /// `events_by_kind` (then the heap for the tie), as on SQLite.
    async fn latest(&self, kind: EventKind) -> Result<Latest> {
        Ok(sqlx::query_as(
            "SELECT at, detail FROM events WHERE kind = $1 ORDER BY at DESC, id DESC LIMIT 1",
        )
        .bind(kind)
        .fetch_optional(self.pool())
        .await?)
    }
}
