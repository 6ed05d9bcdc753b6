//! `certificates` on PostgreSQL: see `ledger/certificates.rs`.
//!
//! Each write is one statement on one row, so PostgreSQL's row lock makes
//! it atomic against another host's: an upsert's `ON CONFLICT` takes the
//! row two hosts insert at once, and an update that reads the old row
//! (`consecutive_failures + 1`) reads it under that lock.

use crate::ledger::Result;
use crate::ledger::certificates::{CertificateRow, Installed, cert_select};

use super::PgLedger;

impl PgLedger {
    pub(in crate::ledger) async fn certificate(
        &self,
        name: &str,
    ) -> Result<Option<CertificateRow>> {
        Ok(sqlx::query_as(cert_select!("WHERE name = $1"))
            .bind(name)
            .fetch_optional(self.pool())
            .await?)
    }

    pub(in crate::ledger) async fn certificates(&self) -> Result<Vec<CertificateRow>> {
        // "C": SQLite's order, by bytes, whatever the database's locale.
        Ok(sqlx::query_as(cert_select!(r#"ORDER BY name COLLATE "C""#))
            .fetch_all(self.pool())
            .await?)
    }

    pub(in crate::ledger) async fn record_installed(
        &self,
        now: i64,
        name: &str,
        cert: &Installed,
        next_renewal_at: i64,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO certificates (name, domains, serial, not_before, not_after, installed_at, version,
                 last_attempt_at, last_result, last_error, next_renewal_at, consecutive_failures, updated_at,
                 profile, profile_wanted)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $6, 'ok', NULL, $8, 0, $6, $9, $10)
             ON CONFLICT (name) DO UPDATE SET domains = excluded.domains, serial = excluded.serial,
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
        .bind(next_renewal_at)
        .bind(&cert.profile)
        .bind(&cert.profile_wanted)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn set_issuer_ca(&self, name: &str, ca: &str) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("UPDATE certificates SET issuer_ca = $1 WHERE name = $2")
            .bind(ca)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn issuer_ca(&self, name: &str) -> Result<Option<String>> {
        self.text_column("SELECT issuer_ca FROM certificates WHERE name = $1", name)
            .await
    }

    pub(in crate::ledger) async fn profile_wanted(&self, name: &str) -> Result<Option<String>> {
        self.text_column(
            "SELECT profile_wanted FROM certificates WHERE name = $1",
            name,
        )
        .await
    }

    pub(in crate::ledger) async fn set_profile_warning(
        &self,
        now: i64,
        name: &str,
        domains: &str,
        warning: Option<&str>,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO certificates (name, domains, profile_warning, updated_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET profile_warning = excluded.profile_warning,
                 updated_at = excluded.updated_at",
        )
        .bind(name)
        .bind(domains)
        .bind(warning)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn record_failure(
        &self,
        now: i64,
        name: &str,
        domains: &str,
        error: &str,
        next_attempt_at: Option<i64>,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        // The old row's columns are named by the table: `excluded` is the
        // row that failed to go in.
        sqlx::query(
            "INSERT INTO certificates (name, domains, last_attempt_at, last_result, last_error,
                 next_renewal_at, consecutive_failures, updated_at)
             VALUES ($1, $2, $3, 'error', $4, $5, 1, $3)
             ON CONFLICT (name) DO UPDATE SET last_attempt_at = excluded.last_attempt_at,
                 last_result = 'error', last_error = excluded.last_error,
                 next_renewal_at = COALESCE(excluded.next_renewal_at, certificates.next_renewal_at),
                 consecutive_failures = certificates.consecutive_failures + 1,
                 updated_at = excluded.updated_at",
        )
        .bind(name)
        .bind(domains)
        .bind(now)
        .bind(error)
        .bind(next_attempt_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn set_next_renewal(
        &self,
        now: i64,
        name: &str,
        at: i64,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE certificates SET next_renewal_at = $1, updated_at = $2 WHERE name = $3",
        )
        .bind(at)
        .bind(now)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn record_revoked(
        &self,
        now: i64,
        name: &str,
        serial: &str,
        reason: &str,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE certificates SET revoked_serial = $1, revoked_at = $2, revoked_reason = $3,
                 next_renewal_at = $2, updated_at = $2 WHERE name = $4",
        )
        .bind(serial)
        .bind(now)
        .bind(reason)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn revoked_serial(&self, name: &str) -> Result<Option<String>> {
        self.text_column(
            "SELECT revoked_serial FROM certificates WHERE name = $1",
            name,
        )
        .await
    }

    pub(in crate::ledger) async fn record_reload_failure(
        &self,
        now: i64,
        name: &str,
        error: &str,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE certificates SET last_result = 'error', last_error = $1, updated_at = $2 WHERE name = $3",
        )
        .bind(error)
        .bind(now)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::ledger) async fn clear_reload_failure(&self, now: i64, name: &str) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE certificates SET last_result = 'ok', last_error = NULL, updated_at = $1
             WHERE name = $2 AND last_result = 'error' AND last_error LIKE 'installed, but reload %'",
        )
        .bind(now)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// One nullable text column of the row of `name`: `None` for no row
    /// as for a NULL.
    async fn text_column(&self, sql: &'static str, name: &str) -> Result<Option<String>> {
        let row: Option<(Option<String>,)> = sqlx::query_as(sql)
            .bind(name)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.and_then(|(v,)| v))
    }
}
