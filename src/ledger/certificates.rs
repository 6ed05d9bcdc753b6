//! Each configured certificate's row: what is installed, the last attempt
//! and its result, the next renewal, revocation and profile notes.

use sqlx::FromRow;

use super::{Db, LastResult, Ledger, LedgerError, Result};

/// A row of `certificates`.
#[derive(Debug, Clone, Default, FromRow, serde::Deserialize)]
pub struct CertificateRow {
    pub name: String,
    pub domains: String,
    pub serial: Option<String>,
    pub not_before: Option<i64>,
    pub not_after: Option<i64>,
    pub installed_at: Option<i64>,
    pub version: Option<String>,
    pub last_attempt_at: Option<i64>,
    pub last_result: Option<LastResult>,
    pub last_error: Option<String>,
    pub next_renewal_at: Option<i64>,
    pub consecutive_failures: i64,
    /// The serial certd last revoked for this name: while it equals
    /// `serial`, the installed certificate is revoked.
    pub revoked_serial: Option<String>,
    /// The profile the installed certificate was ordered with.
    pub profile: Option<String>,
    /// Why the last order fell back from the first configured profile.
    pub profile_warning: Option<String>,
    /// The CA's last ARI answer, for the certificate `ari_serial`.
    pub ari_serial: Option<String>,
    pub ari_window_start: Option<i64>,
    pub ari_window_end: Option<i64>,
    pub ari_explanation_url: Option<String>,
    pub ari_checked_at: Option<i64>,
    pub ari_next_check: Option<i64>,
    pub ari_error: Option<String>,
    /// The CA (its configured name) that issued the installed
    /// certificate; `None` from before several CAs were known.
    pub issuer_ca: Option<String>,
}

impl CertificateRow {
    pub(crate) fn domain_list(&self) -> Vec<String> {
        serde_json::from_str(&self.domains).unwrap_or_default()
    }
}

/// What an installed certificate looks like to the ledger.
#[derive(Debug, Clone)]
pub(crate) struct Installed {
    pub(crate) domains: Vec<String>,
    pub(crate) serial: String,
    pub(crate) not_before: i64,
    pub(crate) not_after: i64,
    pub(crate) version: String,
    /// The profile the order named, as the CA's order echoes it.
    pub(crate) profile: Option<String>,
    /// The configured preference it was ordered under
    /// (`ProfilePreference::ledger_key`).
    pub(crate) profile_wanted: String,
}

// Keeps the column list of `CertificateRow` in one place for every select
// of it, on both backends (`pg/certificates.rs` uses it too).
macro_rules! cert_select {
    ($tail:literal) => {
        concat!(
            "SELECT name, domains, serial, not_before, not_after, installed_at, version,
                last_attempt_at, last_result, last_error, next_renewal_at, consecutive_failures,
                revoked_serial, profile, profile_warning,
                ari_serial, ari_window_start, ari_window_end, ari_explanation_url,
                ari_checked_at, ari_next_check, ari_error, issuer_ca
             FROM certificates ",
            $tail
        )
    };
}
pub(in crate::ledger) use cert_select;

const CERT_SELECT_ONE: &str = cert_select!("WHERE name = ?");

impl Ledger {
    pub async fn certificate(&self, name: &str) -> Result<Option<CertificateRow>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.certificate(name).await,
        };
        Ok(sqlx::query_as(CERT_SELECT_ONE)
            .bind(name)
            .fetch_optional(pool)
            .await?)
    }

    /// Every certificate row. SQLite builds one JSON array and hands over
    /// a single value: sqlx passes each row between threads, which for the
    /// 10,000 rows of a large host cost four times the query itself. Each
    /// row is an array in `CertificateRow`'s field order (serde reads a
    /// struct from a sequence), half the text of an object with keys.
    pub(crate) async fn certificates(&self) -> Result<Vec<CertificateRow>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.certificates().await,
        };
        let (json,): (String,) = sqlx::query_as(
            "SELECT json_group_array(json_array(
                 name, domains, serial, not_before, not_after, installed_at, version,
                 last_attempt_at, last_result, last_error, next_renewal_at, consecutive_failures,
                 revoked_serial, profile, profile_warning,
                 ari_serial, ari_window_start, ari_window_end, ari_explanation_url,
                 ari_checked_at, ari_next_check, ari_error, issuer_ca))
             FROM (SELECT * FROM certificates ORDER BY name)",
        )
        .fetch_one(pool)
        .await?;
        serde_json::from_str(&json)
            .map_err(|e| LedgerError::Query(sqlx::Error::Decode(Box::new(e))))
    }

    /// Records a successful install and resets the failure count.
    pub(crate) async fn record_installed(
        &self,
        name: &str,
        cert: &Installed,
        next_renewal_at: i64,
    ) -> Result<()> {
        let now = self.now();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.record_installed(now, name, cert, next_renewal_at).await,
        };
        sqlx::query(
            "INSERT INTO certificates (name, domains, serial, not_before, not_after, installed_at, version,
                 last_attempt_at, last_result, last_error, next_renewal_at, consecutive_failures, updated_at,
                 profile, profile_wanted)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'ok', NULL, ?, 0, ?, ?, ?)
             ON CONFLICT(name) DO UPDATE SET domains = excluded.domains, serial = excluded.serial,
                 profile = excluded.profile, profile_wanted = excluded.profile_wanted,
                 not_before = excluded.not_before, not_after = excluded.not_after,
                 installed_at = excluded.installed_at, version = excluded.version,
                 last_attempt_at = excluded.last_attempt_at, last_result = 'ok', last_error = NULL,
                 next_renewal_at = excluded.next_renewal_at, consecutive_failures = 0,
                 updated_at = excluded.updated_at",
        )
        .bind(name)
        .bind(serde_json::to_string(&cert.domains).unwrap_or_default())
        .bind(&cert.serial)
        .bind(cert.not_before)
        .bind(cert.not_after)
        .bind(now)
        .bind(&cert.version)
        .bind(now)
        .bind(next_renewal_at)
        .bind(now)
        .bind(&cert.profile)
        .bind(&cert.profile_wanted)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// Records the CA that issued the certificate of `name` just installed.
    pub(crate) async fn set_issuer_ca(&self, name: &str, ca: &str) -> Result<()> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.set_issuer_ca(name, ca).await,
        };
        sqlx::query("UPDATE certificates SET issuer_ca = ? WHERE name = ?")
            .bind(ca)
            .bind(name)
            .execute(pool)
            .await?;
        Ok(())
    }

    /// The CA that issued the installed certificate of `name`, if known.
    pub(crate) async fn issuer_ca(&self, name: &str) -> Result<Option<String>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.issuer_ca(name).await,
        };
        let row: Option<(Option<String>,)> =
            sqlx::query_as("SELECT issuer_ca FROM certificates WHERE name = ?")
                .bind(name)
                .fetch_optional(pool)
                .await?;
        Ok(row.and_then(|(ca,)| ca))
    }

    /// The profile preference the installed certificate of `name` was
    /// ordered under (`ProfilePreference::ledger_key`); `None` if unknown.
    pub(crate) async fn profile_wanted(&self, name: &str) -> Result<Option<String>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.profile_wanted(name).await,
        };
        let row: Option<(Option<String>,)> =
            sqlx::query_as("SELECT profile_wanted FROM certificates WHERE name = ?")
                .bind(name)
                .fetch_optional(pool)
                .await?;
        Ok(row.and_then(|r| r.0))
    }

    /// Records why the order being placed for `name` does not name its
    /// first configured profile, or clears that note.
    pub(crate) async fn set_profile_warning(
        &self,
        name: &str,
        domains: &[String],
        warning: Option<&str>,
    ) -> Result<()> {
        let now = self.now();
        let domains = serde_json::to_string(domains).unwrap_or_default();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.set_profile_warning(now, name, &domains, warning).await,
        };
        sqlx::query(
            "INSERT INTO certificates (name, domains, profile_warning, updated_at) VALUES (?, ?, ?, ?)
             ON CONFLICT(name) DO UPDATE SET profile_warning = excluded.profile_warning,
                 updated_at = excluded.updated_at",
        )
        .bind(name)
        .bind(domains)
        .bind(warning)
        .bind(now)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// Records a failed attempt; the installed certificate's columns are untouched.
    pub(crate) async fn record_failure(
        &self,
        name: &str,
        domains: &[String],
        error: &str,
        next_attempt_at: Option<i64>,
    ) -> Result<()> {
        let now = self.now();
        let domains = serde_json::to_string(domains).unwrap_or_default();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => {
                return pg
                    .record_failure(now, name, &domains, error, next_attempt_at)
                    .await;
            }
        };
        sqlx::query(
            "INSERT INTO certificates (name, domains, last_attempt_at, last_result, last_error,
                 next_renewal_at, consecutive_failures, updated_at)
             VALUES (?, ?, ?, 'error', ?, ?, 1, ?)
             ON CONFLICT(name) DO UPDATE SET last_attempt_at = excluded.last_attempt_at,
                 last_result = 'error', last_error = excluded.last_error,
                 next_renewal_at = COALESCE(excluded.next_renewal_at, next_renewal_at),
                 consecutive_failures = consecutive_failures + 1, updated_at = excluded.updated_at",
        )
        .bind(name)
        .bind(domains)
        .bind(now)
        .bind(error)
        .bind(next_attempt_at)
        .bind(now)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// Records when the scheduler will next act on a certificate.
    pub(crate) async fn set_next_renewal(&self, name: &str, at: i64) -> Result<()> {
        let now = self.now();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.set_next_renewal(now, name, at).await,
        };
        sqlx::query("UPDATE certificates SET next_renewal_at = ?, updated_at = ? WHERE name = ?")
            .bind(at)
            .bind(now)
            .bind(name)
            .execute(pool)
            .await?;
        Ok(())
    }

    /// Records that certd revoked the certificate `serial` of `name`.
    pub(crate) async fn record_revoked(
        &self,
        name: &str,
        serial: &str,
        reason: &str,
    ) -> Result<()> {
        let now = self.now();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.record_revoked(now, name, serial, reason).await,
        };
        sqlx::query(
            "UPDATE certificates SET revoked_serial = ?, revoked_at = ?, revoked_reason = ?,
                 next_renewal_at = ?, updated_at = ? WHERE name = ?",
        )
        .bind(serial)
        .bind(now)
        .bind(reason)
        .bind(now)
        .bind(now)
        .bind(name)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// The serial certd revoked for `name`, if any.
    pub(crate) async fn revoked_serial(&self, name: &str) -> Result<Option<String>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.revoked_serial(name).await,
        };
        let row: Option<(Option<String>,)> =
            sqlx::query_as("SELECT revoked_serial FROM certificates WHERE name = ?")
                .bind(name)
                .fetch_optional(pool)
                .await?;
        Ok(row.and_then(|r| r.0))
    }

    /// Records that a reload command failed after an otherwise good install.
    pub(crate) async fn record_reload_failure(&self, name: &str, error: &str) -> Result<()> {
        let now = self.now();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.record_reload_failure(now, name, error).await,
        };
        sqlx::query(
            "UPDATE certificates SET last_result = 'error', last_error = ?, updated_at = ? WHERE name = ?",
        )
        .bind(error)
        .bind(now)
        .bind(name)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// A reload that failed after an install succeeded on a retry: the
    /// certificate's last result is good again.
    pub(crate) async fn clear_reload_failure(&self, name: &str) -> Result<()> {
        let now = self.now();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.clear_reload_failure(now, name).await,
        };
        sqlx::query(
            "UPDATE certificates SET last_result = 'ok', last_error = NULL, updated_at = ?
             WHERE name = ? AND last_result = 'error' AND last_error LIKE 'installed, but reload %'",
        )
        .bind(now)
        .bind(name)
        .execute(pool)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_util::{START, conformance};

    fn installed(serial: &str, domains: &[String]) -> Installed {
        Installed {
            domains: domains.to_vec(),
            serial: serial.into(),
            not_before: 100,
            not_after: 200,
            version: "v1".into(),
            profile: Some("shortlived".into()),
            profile_wanted: "shortlived".into(),
        }
    }

    conformance! {
        async fn failures_count_up_and_success_resets(s: Ledger) {
            let d = vec!["a.example".to_owned()];
            s.record_failure("www", &d, "boom", Some(500)).await.expect("failure");
            // No next attempt given: the one recorded stays.
            s.record_failure("www", &d, "boom again", None)
                .await
                .expect("failure");
            let row = s.certificate("www").await.expect("read").expect("row");
            assert_eq!(row.consecutive_failures, 2);
            assert_eq!(row.last_error.as_deref(), Some("boom again"));
            assert_eq!(row.last_result, Some(LastResult::Error));
            assert_eq!((row.last_attempt_at, row.next_renewal_at), (Some(START), Some(500)));
            assert_eq!(row.serial, None);
            s.record_installed("www", &installed("01", &d), 3)
                .await
                .expect("install");
            assert_eq!(
                s.profile_wanted("www").await.expect("read").as_deref(),
                Some("shortlived")
            );
            let row = s.certificate("www").await.expect("read").expect("row");
            assert_eq!(
                (row.consecutive_failures, row.last_result),
                (0, Some(LastResult::Ok))
            );
            assert_eq!(row.last_error, None);
            assert_eq!(row.domain_list(), d);
            // A failure after an install leaves the installed columns.
            s.record_failure("www", &d, "later", Some(700)).await.expect("failure");
            let row = s.certificate("www").await.expect("read").expect("row");
            assert_eq!((row.consecutive_failures, row.next_renewal_at), (1, Some(700)));
            assert_eq!((row.serial.as_deref(), row.not_after), (Some("01"), Some(200)));
        }

        /// What an install records reads back whole, one row or all of
        /// them (in name order, by bytes), with the CA that issued it.
        async fn an_install_reads_back_whole(s: Ledger) {
            let d = vec!["b.example".to_owned(), "a.example".to_owned()];
            s.clock().advance(std::time::Duration::from_secs(5));
            s.record_installed("www", &installed("0a", &d), 150)
                .await
                .expect("install");
            let row = s.certificate("www").await.expect("read").expect("row");
            assert_eq!(row.name, "www");
            assert_eq!(row.domain_list(), d);
            assert_eq!(row.serial.as_deref(), Some("0a"));
            assert_eq!((row.not_before, row.not_after), (Some(100), Some(200)));
            assert_eq!((row.installed_at, row.last_attempt_at), (Some(START + 5), Some(START + 5)));
            assert_eq!(row.version.as_deref(), Some("v1"));
            assert_eq!(row.next_renewal_at, Some(150));
            assert_eq!(row.profile.as_deref(), Some("shortlived"));
            assert_eq!(row.issuer_ca, None);
            assert_eq!(s.issuer_ca("www").await.expect("read"), None);
            s.set_issuer_ca("www", "le").await.expect("issuer");
            assert_eq!(s.issuer_ca("www").await.expect("read").as_deref(), Some("le"));
            assert_eq!(s.issuer_ca("none").await.expect("read"), None);
            assert_eq!(s.profile_wanted("none").await.expect("read"), None);
            assert!(s.certificate("none").await.expect("read").is_none());

            // A re-install replaces the certificate's columns.
            s.record_installed("www", &installed("0b", &d[..1]), 160)
                .await
                .expect("install");
            let row = s.certificate("www").await.expect("read").expect("row");
            assert_eq!((row.serial.as_deref(), row.next_renewal_at), (Some("0b"), Some(160)));
            assert_eq!(row.domain_list(), d[..1]);

            for name in ["b", "a_b", "B", "a-b", "a"] {
                s.record_failure(name, &d, "boom", None).await.expect("failure");
            }
            let all = s.certificates().await.expect("all");
            let names: Vec<&str> = all.iter().map(|r| r.name.as_str()).collect();
            assert_eq!(names, ["B", "a", "a-b", "a_b", "b", "www"]);
            // Each row of the list is the row read alone, field for field.
            for row in &all {
                let one = s.certificate(&row.name).await.expect("read").expect("row");
                assert_eq!(format!("{row:?}"), format!("{one:?}"));
            }
        }

        async fn the_next_renewal_is_set_on_an_existing_row_only(s: Ledger) {
            let d = vec!["a.example".to_owned()];
            s.set_next_renewal("www", 42).await.expect("set");
            assert!(s.certificate("www").await.expect("read").is_none());
            s.record_failure("www", &d, "boom", Some(500)).await.expect("failure");
            s.set_next_renewal("www", 42).await.expect("set");
            let row = s.certificate("www").await.expect("read").expect("row");
            assert_eq!(row.next_renewal_at, Some(42));
        }

        /// A revocation names the serial revoked and schedules a renewal
        /// now; a new install leaves the old revoked serial behind it.
        async fn a_revocation_is_recorded_by_serial(s: Ledger) {
            let d = vec!["a.example".to_owned()];
            assert_eq!(s.revoked_serial("www").await.expect("read"), None);
            s.record_installed("www", &installed("0a", &d), 150)
                .await
                .expect("install");
            s.record_revoked("www", "0a", "keyCompromise").await.expect("revoke");
            assert_eq!(s.revoked_serial("www").await.expect("read").as_deref(), Some("0a"));
            let row = s.certificate("www").await.expect("read").expect("row");
            assert_eq!(row.revoked_serial, row.serial);
            assert_eq!(row.next_renewal_at, Some(START));
            s.record_installed("www", &installed("0b", &d), 150)
                .await
                .expect("install");
            let row = s.certificate("www").await.expect("read").expect("row");
            assert_eq!(
                (row.serial.as_deref(), row.revoked_serial.as_deref()),
                (Some("0b"), Some("0a"))
            );
            assert_eq!(s.revoked_serial("none").await.expect("read"), None);
        }

        /// A failed reload marks the result an error; a later good install
        /// clears only that kind of error.
        async fn a_reload_failure_is_cleared_by_a_good_retry_only(s: Ledger) {
            let d = vec!["a.example".to_owned()];
            s.record_installed("www", &installed("0a", &d), 150)
                .await
                .expect("install");
            s.record_reload_failure("www", "installed, but reload failed: exit 1")
                .await
                .expect("reload failure");
            let row = s.certificate("www").await.expect("read").expect("row");
            assert_eq!(row.last_result, Some(LastResult::Error));
            assert_eq!(row.last_error.as_deref(), Some("installed, but reload failed: exit 1"));
            assert_eq!(row.serial.as_deref(), Some("0a"));
            s.clear_reload_failure("www").await.expect("clear");
            let row = s.certificate("www").await.expect("read").expect("row");
            assert_eq!((row.last_result, row.last_error), (Some(LastResult::Ok), None));

            s.record_failure("www", &d, "order failed", None).await.expect("failure");
            s.clear_reload_failure("www").await.expect("clear");
            let row = s.certificate("www").await.expect("read").expect("row");
            assert_eq!(row.last_result, Some(LastResult::Error));
            assert_eq!(row.last_error.as_deref(), Some("order failed"));
        }

        /// A profile warning makes a row for a name never seen, and is
        /// replaced or cleared without touching the rest of the row.
        async fn a_profile_warning_is_set_and_cleared(s: Ledger) {
            let d = vec!["a.example".to_owned()];
            s.set_profile_warning("www", &d, Some("no profile shortlived"))
                .await
                .expect("warn");
            let row = s.certificate("www").await.expect("read").expect("row");
            assert_eq!(row.profile_warning.as_deref(), Some("no profile shortlived"));
            assert_eq!((row.domain_list(), row.consecutive_failures), (d.clone(), 0));
            assert_eq!((row.serial, row.last_result), (None, None));
            s.record_installed("www", &installed("0a", &d), 150)
                .await
                .expect("install");
            let row = s.certificate("www").await.expect("read").expect("row");
            assert_eq!(row.profile_warning.as_deref(), Some("no profile shortlived"));
            s.set_profile_warning("www", &["other.example".to_owned()], None)
                .await
                .expect("clear");
            let row = s.certificate("www").await.expect("read").expect("row");
            assert_eq!(row.profile_warning, None);
            assert_eq!((row.domain_list(), row.serial.as_deref()), (d, Some("0a")));
        }
    }
}
