//! `installs`: what each host did with each issuance (installed, with its
//! reload commands' outcomes, or why not), for `status`, the metrics'
//! install lag, and a host's own reconciling.

use super::{DbError, FleetStore};

/// What one host did with one issuance, for the `installs` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallRecord {
    pub host_id: String,
    pub cert_name: String,
    pub serial: String,
    /// `Ok(reload commands' outcomes)` when installed, `Err(why not)`.
    pub result: Result<String, String>,
}

/// A row of `installs` as read back (status, tests).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct InstallRow {
    pub host_id: String,
    pub cert_name: String,
    pub serial: String,
    pub installed: bool,
    pub reload_result: Option<String>,
    pub error: Option<String>,
}

/// How far one host is behind the newest issuance of a certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct InstallLag {
    pub cert_name: String,
    pub serial: String,
    /// Seconds from publication to this host's install; while it has not
    /// installed it, from publication to now (growing).
    pub seconds: f64,
    pub installed: bool,
}

impl FleetStore {
    /// Records what a host did with an issuance; a second attempt at the
    /// same issuance replaces the first's row.
    pub async fn record_install(&self, record: &InstallRecord) -> Result<(), DbError> {
        let (reload_result, error) = match &record.result {
            Ok(reloads) => (Some(reloads.as_str()), None),
            Err(why) => (None, Some(why.as_str())),
        };
        sqlx::query(
            "INSERT INTO installs (host_id, cert_name, serial, installed_at, reload_result, error)
             VALUES ($1, $2, $3, CASE WHEN $5::text IS NULL THEN now() END, $4, $5)
             ON CONFLICT (host_id, cert_name, serial) DO UPDATE
                SET installed_at = excluded.installed_at,
                    reload_result = excluded.reload_result, error = excluded.error,
                    attempted_at = now()",
        )
        .bind(&record.host_id)
        .bind(&record.cert_name)
        .bind(&record.serial)
        .bind(reload_result)
        .bind(error)
        .execute(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// The `(certificate, serial)` pairs `host_id` has recorded as installed.
    pub async fn installed_by(&self, host_id: &str) -> Result<Vec<(String, String)>, DbError> {
        sqlx::query_as(
            "SELECT cert_name, serial FROM installs
              WHERE host_id = $1 AND installed_at IS NOT NULL",
        )
        .bind(host_id)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))
    }

    /// Every host's record for `cert_name`, by host, then serial.
    pub async fn installs(&self, cert_name: &str) -> Result<Vec<InstallRow>, DbError> {
        sqlx::query_as(
            "SELECT host_id, cert_name, serial, installed_at IS NOT NULL AS installed,
                    reload_result, error
               FROM installs WHERE cert_name = $1 ORDER BY host_id, serial",
        )
        .bind(cert_name)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))
    }

    /// Each host's latest record (by attempt) for each of `cert_names`, by
    /// certificate, then host.
    pub async fn latest_installs(&self, cert_names: &[String]) -> Result<Vec<InstallRow>, DbError> {
        sqlx::query_as(
            "SELECT DISTINCT ON (cert_name, host_id)
                    host_id, cert_name, serial, installed_at IS NOT NULL AS installed,
                    reload_result, error
               FROM installs WHERE cert_name = ANY($1)
              ORDER BY cert_name, host_id, attempted_at DESC",
        )
        .bind(cert_names)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))
    }

    /// For each of `cert_names` that has an issuance: how long `host_id`
    /// took (or has been taking) to install the newest one, by the
    /// database's clock.
    pub async fn install_lag(
        &self,
        host_id: &str,
        cert_names: &[String],
    ) -> Result<Vec<InstallLag>, DbError> {
        let rows: Vec<(String, String, f64, bool)> = sqlx::query_as(
            "SELECT n.cert_name, n.serial,
                    extract(epoch FROM coalesce(i.installed_at, now()) - n.created_at)::float8,
                    i.installed_at IS NOT NULL
               FROM (SELECT DISTINCT ON (cert_name) cert_name, serial, created_at
                       FROM issued WHERE cert_name = ANY($2)
                      ORDER BY cert_name, id DESC) n
               LEFT JOIN installs i
                 ON i.host_id = $1 AND i.cert_name = n.cert_name AND i.serial = n.serial
              ORDER BY n.cert_name",
        )
        .bind(host_id)
        .bind(cert_names)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(rows
            .into_iter()
            .map(|(cert_name, serial, seconds, installed)| InstallLag {
                cert_name,
                serial,
                // A clock step on the server cannot make it negative here.
                seconds: seconds.max(0.0),
                installed,
            })
            .collect())
    }
}
