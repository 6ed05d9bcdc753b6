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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_util::{START, conformance};

    /// Runs one statement (`$n` parameters, which both engines read) on
    /// whichever engine `s` is.
    macro_rules! execute {
        ($s:expr, $sql:expr $(, $arg:expr)*) => {
            match &$s.db {
                Db::Sqlite(pool) => {
                    sqlx::query($sql)$(.bind($arg))*.execute(pool).await.map(|_| ())
                }
                Db::Postgres(pg) => {
                    sqlx::query($sql)$(.bind($arg))*.execute(pg.pool()).await.map(|_| ())
                }
            }
            .expect($sql)
        };
    }

    /// Writes an authorization of account `account` straight into its
    /// table, so that the reaper's figures are tested on rows alone,
    /// whatever writes them. `reaped_at`: deactivated by the reaper then.
    async fn authz(
        s: &Ledger,
        account: i64,
        url: &str,
        status: AuthzStatus,
        reaped_at: Option<i64>,
    ) {
        execute!(
            s,
            "INSERT INTO authorizations (url, account_id, identifier, status, created_at, updated_at,
                 deactivated_at, deactivated_by)
             VALUES ($1, $2, 'a.example', $3, 0, 0, $4, $5)",
            url,
            account,
            status,
            reaped_at,
            reaped_at.map(|_| Actor::Reaper)
        );
    }

    conformance! {
        /// A restart is waited for from a `restart-needed` event with keys
        /// until the daemon starts again.
        async fn a_restart_is_needed_until_the_daemon_starts(s: Ledger) {
            assert_eq!(s.restart_needed().await.expect("read"), None);
            s.event(EventKind::DaemonStarted, None, None, None, None).await.expect("event");
            s.event(EventKind::RestartNeeded, None, None, None, Some("account_key"))
                .await
                .expect("event");
            s.event(EventKind::Installed, Some("www"), None, None, None).await.expect("event");
            assert_eq!(s.restart_needed().await.expect("read").as_deref(), Some("account_key"));
            s.event(EventKind::RestartNeeded, None, None, None, Some("ca, storage"))
                .await
                .expect("event");
            assert_eq!(s.restart_needed().await.expect("read").as_deref(), Some("ca, storage"));
            s.event(EventKind::DaemonStarted, None, None, None, None).await.expect("event");
            assert_eq!(s.restart_needed().await.expect("read"), None);
            s.event(EventKind::RestartNeeded, None, None, None, Some("")).await.expect("event");
            assert_eq!(s.restart_needed().await.expect("read"), None);
        }

        /// A certificate's events come newest first, as many as asked,
        /// and only its own; counts are per kind.
        async fn a_certificates_events_newest_first(s: Ledger) {
            for (i, kind) in [EventKind::Installed, EventKind::ReloadFailed, EventKind::Revoked]
                .into_iter()
                .enumerate()
            {
                s.event(kind, Some("www"), Some("https://ca/order/1"), None, Some(&format!("e{i}")))
                    .await
                    .expect("event");
                s.clock().advance(std::time::Duration::from_secs(1));
            }
            s.event(EventKind::Installed, Some("other"), None, None, None).await.expect("event");
            let events = s.cert_events("www", 2).await.expect("read");
            assert_eq!(
                events,
                [
                    (START + 2, EventKind::Revoked, Some("e2".to_owned())),
                    (START + 1, EventKind::ReloadFailed, Some("e1".to_owned())),
                ]
            );
            assert_eq!(s.cert_events("www", 10).await.expect("read").len(), 3);
            assert!(s.cert_events("none", 10).await.expect("read").is_empty());
            assert_eq!(s.count_events(EventKind::Installed).await.expect("count"), 2);
            assert_eq!(s.count_events(EventKind::Revoked).await.expect("count"), 1);
            assert_eq!(s.count_events(EventKind::DryRun).await.expect("count"), 0);
        }

        /// The CA is unreachable from the event that says so until one
        /// says it answered, or the daemon starts again.
        async fn the_ca_is_unreachable_until_reached_or_restarted(s: Ledger) {
            assert_eq!(s.ca_unreachable().await.expect("read"), None);
            s.event(EventKind::CaUnreachable, None, None, None, Some("connection refused"))
                .await
                .expect("event");
            assert_eq!(
                s.ca_unreachable().await.expect("read"),
                Some((START, "connection refused".to_owned()))
            );
            s.event(EventKind::CaReachable, None, None, None, None).await.expect("event");
            assert_eq!(s.ca_unreachable().await.expect("read"), None);
            s.event(EventKind::CaUnreachable, None, None, None, None).await.expect("event");
            assert_eq!(s.ca_unreachable().await.expect("read"), Some((START, String::new())));
            s.event(EventKind::DaemonStarted, None, None, None, None).await.expect("event");
            assert_eq!(s.ca_unreachable().await.expect("read"), None);
        }

        /// The reaper's figures: its account's pending authorizations,
        /// those it deactivated (in all, and in the last day), the pending
        /// ones held back (once each however many events), and the latest
        /// pass, guard and rate limit.
        async fn the_reaper_summary_counts_its_account_only(s: Ledger) {
            let empty = s.reaper_summary(1, START).await.expect("summary");
            assert_eq!(
                (empty.pending, empty.deactivated_total, empty.held_back, empty.last_pass_at),
                (0, 0, 0, None)
            );
            for (id, dir) in [(1_i64, "https://ca/dir"), (2, "https://other/dir")] {
                execute!(
                    s,
                    "INSERT INTO accounts (id, directory_url, account_url, created_at)
                     VALUES ($1, $2, $3, 0)",
                    id,
                    dir,
                    format!("{dir}/acct")
                );
            }
            let day = 86_400;
            authz(&s, 1, "https://ca/authz/p1", AuthzStatus::Pending, None).await;
            authz(&s, 1, "https://ca/authz/p2", AuthzStatus::Pending, None).await;
            authz(&s, 1, "https://ca/authz/p3", AuthzStatus::Pending, None).await;
            authz(&s, 1, "https://ca/authz/v", AuthzStatus::Valid, None).await;
            let reaped = AuthzStatus::Deactivated;
            authz(&s, 1, "https://ca/authz/old", reaped, Some(START - day - 1)).await;
            authz(&s, 1, "https://ca/authz/new", reaped, Some(START - day)).await;
            authz(&s, 2, "https://other/authz/p", AuthzStatus::Pending, None).await;
            authz(&s, 2, "https://other/authz/d", reaped, Some(START)).await;
            // p1 twice, and a valid one that counts no more.
            for url in [
                "https://ca/authz/p1",
                "https://ca/authz/p1",
                "https://ca/authz/p2",
                "https://ca/authz/v",
                "https://other/authz/p",
            ] {
                s.event(EventKind::HeldBack, None, None, Some(url), None).await.expect("event");
            }
            s.event(EventKind::ReaperPass, None, None, None, Some("pass 1")).await.expect("event");
            s.event(EventKind::RateLimited, None, None, None, None).await.expect("event");
            // Two in the same second: the later written is the latest.
            s.event(EventKind::RateLimited, None, None, None, Some("until 12:00"))
                .await
                .expect("event");
            s.clock().advance(std::time::Duration::from_secs(10));
            s.event(EventKind::ReaperPass, None, None, None, Some("pass 2")).await.expect("event");
            s.event(EventKind::PendingAuthzGuard, None, None, None, None).await.expect("event");

            let r = s.reaper_summary(1, START).await.expect("summary");
            assert_eq!(
                (r.pending, r.deactivated_total, r.deactivated_24h, r.held_back),
                (3, 2, 1, 2)
            );
            assert_eq!(
                (r.last_pass_at, r.last_pass.as_deref()),
                (Some(START + 10), Some("pass 2"))
            );
            assert_eq!(r.last_guard_at, Some(START + 10));
            assert_eq!(r.last_rate_limit, Some((START, "until 12:00".to_owned())));
            let other = s.reaper_summary(2, START).await.expect("summary");
            assert_eq!(
                (other.pending, other.deactivated_total, other.deactivated_24h, other.held_back),
                (1, 1, 1, 1)
            );
        }
    }
}
