//! `issued`: the certificates issued through the fleet, each with its
//! private key sealed (the sealing is the fleet module's; here it is bytes),
//! written under the certificate's lease and announced on
//! [`ISSUED_CHANNEL`].

use super::{DbError, FencedWrite, FleetStore, notify};

/// The channel a new issuance is announced on; the payload is the
/// certificate's name.
pub const ISSUED_CHANNEL: &str = "certd_issued";

/// A row of `issued`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedRow {
    pub cert_name: String,
    pub serial: String,
    pub fullchain_pem: String,
    pub sealed_key: Vec<u8>,
    /// The epoch of the lease it was written under.
    pub epoch: i64,
}

impl FleetStore {
    /// The certificate `cert_name` with `serial`, if the fleet issued it.
    pub async fn issued(
        &self,
        cert_name: &str,
        serial: &str,
    ) -> Result<Option<IssuedRow>, DbError> {
        let row: Option<(String, Vec<u8>, i64)> = sqlx::query_as(
            "SELECT fullchain_pem, sealed_key, epoch FROM issued
              WHERE cert_name = $1 AND serial = $2",
        )
        .bind(cert_name)
        .bind(serial)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(row.map(|(fullchain_pem, sealed_key, epoch)| IssuedRow {
            cert_name: cert_name.to_owned(),
            serial: serial.to_owned(),
            fullchain_pem,
            sealed_key,
            epoch,
        }))
    }

    /// The newest issuance of each of `cert_names` that has one.
    pub async fn newest_issued(&self, cert_names: &[String]) -> Result<Vec<IssuedRow>, DbError> {
        let rows: Vec<(String, String, String, Vec<u8>, i64)> = sqlx::query_as(
            "SELECT DISTINCT ON (cert_name) cert_name, serial, fullchain_pem, sealed_key, epoch
               FROM issued WHERE cert_name = ANY($1)
              ORDER BY cert_name, id DESC",
        )
        .bind(cert_names)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(rows
            .into_iter()
            .map(
                |(cert_name, serial, fullchain_pem, sealed_key, epoch)| IssuedRow {
                    cert_name,
                    serial,
                    fullchain_pem,
                    sealed_key,
                    epoch,
                },
            )
            .collect())
    }
}

impl FencedWrite {
    /// Stores a certificate issued under this transaction's lease, with
    /// the lease's epoch.
    pub async fn insert_issued(
        &mut self,
        cert_name: &str,
        serial: &str,
        fullchain_pem: &str,
        sealed_key: &[u8],
    ) -> Result<(), DbError> {
        let epoch = self.fence().epoch;
        sqlx::query(
            "INSERT INTO issued (cert_name, serial, fullchain_pem, sealed_key, epoch)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(cert_name)
        .bind(serial)
        .bind(fullchain_pem)
        .bind(sealed_key)
        .bind(epoch)
        .execute(&mut *self.tx)
        .await
        .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Announces on [`ISSUED_CHANNEL`] that `cert_name` has a new
    /// issuance, delivered only if (and when) this transaction commits.
    pub async fn notify_issued(&mut self, cert_name: &str) -> Result<(), DbError> {
        notify(&mut *self.tx, ISSUED_CHANNEL, cert_name)
            .await
            .map_err(|e| self.error(e))
    }
}
