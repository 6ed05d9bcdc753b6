//! The event log (`certd status` reads it), and the figures derived from
//! it: the reaper's summary, a restart waiting, the CA's reachability.

use super::{Actor, AuthzStatus, Db, EventKind, Ledger, Result};

/// Per-account figures of the reaper for `certd status`.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReaperSummary {
    pub(crate) pending: i64,
    pub(crate) deactivated_total: i64,
    pub(crate) deactivated_24h: i64,
    pub(crate) held_back: i64,
    pub(crate) last_pass_at: Option<i64>,
    pub(crate) last_pass: Option<String>,
    pub(crate) last_guard_at: Option<i64>,
    /// When the CA last said `rateLimited`, and until when it asked to wait.
    pub(crate) last_rate_limit: Option<(i64, String)>,
}

/// The latest event of a kind: when, and its detail.
pub(in crate::ledger) type Latest = Option<(i64, Option<String>)>;

impl ReaperSummary {
    /// The figures from the four counts (pending, deactivated in all and
    /// since a day ago, held back) and the latest reaper pass, guard and
    /// rate limit, as both backends read them.
    pub(in crate::ledger) fn from_parts(
        (pending, deactivated_total, deactivated_24h, held_back): (i64, i64, i64, i64),
        last_pass: Latest,
        last_guard_at: Option<i64>,
        rate_limited: Latest,
    ) -> Self {
        Self {
            pending,
            deactivated_total,
            deactivated_24h,
            held_back,
            last_pass_at: last_pass.as_ref().map(|l| l.0),
            last_pass: last_pass.and_then(|l| l.1),
            last_guard_at,
            last_rate_limit: rate_limited.map(|(at, detail)| (at, detail.unwrap_or_default())),
        }
    }
}

impl Ledger {
    pub(crate) async fn event(
        &self,
        kind: EventKind,
        cert_name: Option<&str>,
        order_url: Option<&str>,
        authz_url: Option<&str>,
        detail: Option<&str>,
    ) -> Result<()> {
        let now = self.now();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => {
                return pg
                    .event(now, kind, cert_name, order_url, authz_url, detail)
                    .await;
            }
        };
        sqlx::query(
            "INSERT INTO events (at, kind, cert_name, order_url, authz_url, detail) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(now)
        .bind(kind)
        .bind(cert_name)
        .bind(order_url)
        .bind(authz_url)
        .bind(detail)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// The configuration keys that changed since the daemon last started
    /// and wait for a restart (`certd status`), from the latest
    /// `restart-needed` event after the latest `daemon-started` one.
    pub(crate) async fn restart_needed(&self) -> Result<Option<String>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.restart_needed().await,
        };
        let row: Option<(EventKind, Option<String>)> = sqlx::query_as(
            "SELECT kind, detail FROM events WHERE kind IN (?, ?) ORDER BY id DESC LIMIT 1",
        )
        .bind(EventKind::DaemonStarted)
        .bind(EventKind::RestartNeeded)
        .fetch_optional(pool)
        .await?;
        Ok(row.and_then(|(kind, detail)| {
            detail.filter(|d| kind == EventKind::RestartNeeded && !d.is_empty())
        }))
    }

    /// One certificate's latest events, newest first: (at, kind, detail),
    /// for `certd status NAME`.
    pub(crate) async fn cert_events(
        &self,
        name: &str,
        limit: i64,
    ) -> Result<Vec<(i64, EventKind, Option<String>)>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.cert_events(name, limit).await,
        };
        Ok(sqlx::query_as(
            "SELECT at, kind, detail FROM events WHERE cert_name = ? ORDER BY id DESC LIMIT ?",
        )
        .bind(name)
        .bind(limit)
        .fetch_all(pool)
        .await?)
    }

    /// When the daemon found the CA unreachable and why, while it has not
    /// reached it since: the latest `ca-unreachable` event after the latest
    /// `ca-reachable` and `daemon-started` ones.
    pub(crate) async fn ca_unreachable(&self) -> Result<Option<(i64, String)>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.ca_unreachable().await,
        };
        let row: Option<(i64, EventKind, Option<String>)> = sqlx::query_as(
            "SELECT at, kind, detail FROM events WHERE kind IN (?, ?, ?) ORDER BY id DESC LIMIT 1",
        )
        .bind(EventKind::DaemonStarted)
        .bind(EventKind::CaUnreachable)
        .bind(EventKind::CaReachable)
        .fetch_optional(pool)
        .await?;
        Ok(row.and_then(|(at, kind, detail)| {
            (kind == EventKind::CaUnreachable).then(|| (at, detail.unwrap_or_default()))
        }))
    }

    /// How many events of `kind` exist (tests and status).
    pub async fn count_events(&self, kind: EventKind) -> Result<i64> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.count_events(kind).await,
        };
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM events WHERE kind = ?")
            .bind(kind)
            .fetch_one(pool)
            .await?;
        Ok(n)
    }

    /// The reaper's figures for `certd status`.
    pub(crate) async fn reaper_summary(&self, account_id: i64, now: i64) -> Result<ReaperSummary> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.reaper_summary(account_id, now).await,
        };
        // The status and actor are literals in the text, not parameters:
        // SQLite uses the partial indexes `authz_pending` and
        // `authz_reaped` only for a query that names their literal.
        let sql = format!(
            "SELECT
                (SELECT COUNT(*) FROM authorizations WHERE account_id = ?1 AND status = '{pending}'),
                (SELECT COUNT(*) FROM authorizations WHERE account_id = ?1 AND deactivated_by = '{reaper}'),
                (SELECT COUNT(*) FROM authorizations WHERE account_id = ?1 AND deactivated_by = '{reaper}'
                    AND deactivated_at >= ?2),
                (SELECT COUNT(DISTINCT a.id) FROM authorizations a JOIN events e ON e.authz_url = a.url
                    WHERE a.account_id = ?1 AND a.status = '{pending}' AND e.kind = ?3)",
            pending = AuthzStatus::Pending,
            reaper = Actor::Reaper,
        );
        let (pending, deactivated_total, deactivated_24h, held_back): (i64, i64, i64, i64) =
            sqlx::query_as(&sql)
                .bind(account_id)
                .bind(now - 86_400)
                .bind(EventKind::HeldBack)
                .fetch_one(pool)
                .await?;
        // Newest by `at`, then by id: that order is the index
        // `events_by_kind`'s, so each is one index step however long the
        // history.
        let last: Latest = sqlx::query_as(
            "SELECT at, detail FROM events WHERE kind = ? ORDER BY at DESC, id DESC LIMIT 1",
        )
        .bind(EventKind::ReaperPass)
        .fetch_optional(pool)
        .await?;
        let guard: Option<(i64,)> = sqlx::query_as(
            "SELECT at FROM events WHERE kind = ? ORDER BY at DESC, id DESC LIMIT 1",
        )
        .bind(EventKind::PendingAuthzGuard)
        .fetch_optional(pool)
        .await?;
        let rate_limited: Latest = sqlx::query_as(
            "SELECT at, detail FROM events WHERE kind = ? ORDER BY at DESC, id DESC LIMIT 1",
        )
        .bind(EventKind::RateLimited)
        .fetch_optional(pool)
        .await?;
        Ok(ReaperSummary::from_parts(
            (pending, deactivated_total, deactivated_24h, held_back),
            last,
            guard.map(|g| g.0),
            rate_limited,
        ))
    }
}
