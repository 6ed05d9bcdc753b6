//! The fleet's failure backoff (`fleet_holds`, migration 0006): when an
//! order of a certificate failed, until when no host of the fleet orders
//! it again.
//!
//! Fleet mode only: on a SQLite ledger one daemon's own backoff is the
//! whole story, so there recording is a no-op and nothing is held.

use crate::ledger::{Db, Ledger, Result};

use super::PgLedger;

/// What the fleet's last failed attempt at a certificate holds back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// The names the failed order was for.
    pub domains: Vec<String>,
    /// Unix seconds: no order before then.
    pub until: i64,
    /// Why the attempt failed.
    pub error: String,
    /// The host that failed.
    pub host_id: String,
}

impl Ledger {
    /// Records `hold` for `cert`, replacing the one before. Written
    /// through the certificate's lease: a host that lost it holds nothing
    /// back.
    pub(crate) async fn hold_renewal(&self, cert: &str, hold: &Hold) -> Result<()> {
        match &self.db {
            Db::Sqlite(_) => Ok(()),
            Db::Postgres(pg) => pg.hold_renewal(self.now(), cert, hold).await,
        }
    }

    /// The hold recorded for `cert`, if any (it may have run out).
    pub(crate) async fn renewal_hold(&self, cert: &str) -> Result<Option<Hold>> {
        match &self.db {
            Db::Sqlite(_) => Ok(None),
            Db::Postgres(pg) => pg.renewal_hold(cert).await,
        }
    }
}

impl PgLedger {
    async fn hold_renewal(&self, now: i64, cert: &str, hold: &Hold) -> Result<()> {
        let domains = serde_json::to_string(&hold.domains).unwrap_or_default();
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO fleet_holds (cert_name, domains, until, error, host_id, recorded_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (cert_name) DO UPDATE SET domains = excluded.domains,
                 until = excluded.until, error = excluded.error,
                 host_id = excluded.host_id, recorded_at = excluded.recorded_at",
        )
        .bind(cert)
        .bind(domains)
        .bind(hold.until)
        .bind(&hold.error)
        .bind(&hold.host_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn renewal_hold(&self, cert: &str) -> Result<Option<Hold>> {
        let row: Option<(String, i64, String, String)> = sqlx::query_as(
            "SELECT domains, until, error, host_id FROM fleet_holds WHERE cert_name = $1",
        )
        .bind(cert)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|(domains, until, error, host_id)| Hold {
            domains: serde_json::from_str(&domains).unwrap_or_default(),
            until,
            error,
            host_id,
        }))
    }
}

#[cfg(test)]
mod tests {
    use crate::ledger::test_util::conformance;

    use super::Hold;

    conformance! {
        /// The fleet's hold reads back as recorded, the newest replacing
        /// the one before; a SQLite ledger (one host) holds nothing.
        async fn a_hold_reads_back_on_the_fleets_ledger_only(s: Ledger) {
            let hold = |until: i64, error: &str| Hold {
                domains: vec!["a.example".to_owned()],
                until,
                error: error.to_owned(),
                host_id: "host-a".to_owned(),
            };
            s.hold_renewal("www", &hold(500, "boom")).await.expect("hold");
            s.hold_renewal("www", &hold(900, "again")).await.expect("hold");
            let read = s.renewal_hold("www").await.expect("read");
            if s.is_shared() {
                assert_eq!(read, Some(hold(900, "again")));
            } else {
                assert_eq!(read, None);
            }
            assert_eq!(s.renewal_hold("other").await.expect("read"), None);
        }
    }
}
