//! `fleet_members`: each host's heartbeat, so `status` and the http-01
//! pre-flight know which hosts are alive (by the database's clock).

use std::time::Duration;

use super::{DbError, FleetStore, micros};

/// One host's entry in `fleet_members`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub host_id: String,
    pub version: String,
    pub http01_addr: Option<String>,
    pub config_hash: String,
}

impl FleetStore {
    /// Records that `member` is alive now (by the database's clock).
    pub async fn heartbeat(&self, member: &Member) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO fleet_members (host_id, version, http01_addr, config_hash)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (host_id) DO UPDATE
                SET version = excluded.version, http01_addr = excluded.http01_addr,
                    config_hash = excluded.config_hash, last_seen = now()",
        )
        .bind(&member.host_id)
        .bind(&member.version)
        .bind(&member.http01_addr)
        .bind(&member.config_hash)
        .execute(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// The members heard from within `window`, by host id.
    pub async fn live_members(&self, window: Duration) -> Result<Vec<Member>, DbError> {
        let rows: Vec<(String, String, Option<String>, String)> = sqlx::query_as(
            "SELECT host_id, version, http01_addr, config_hash FROM fleet_members
              WHERE last_seen > now() - $1 * interval '1 microsecond'
              ORDER BY host_id",
        )
        .bind(micros(window))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(rows
            .into_iter()
            .map(|(host_id, version, http01_addr, config_hash)| Member {
                host_id,
                version,
                http01_addr,
                config_hash,
            })
            .collect())
    }
}
