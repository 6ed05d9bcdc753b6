//! `fleet_secrets`: sealed values the fleet shares (the ACME account key),
//! by name, written under the lease of the same name.

use super::{DbError, FencedWrite, FleetStore};

impl FleetStore {
    /// The sealed secret `name`, if a host stored one.
    pub async fn secret(&self, name: &str) -> Result<Option<Vec<u8>>, DbError> {
        sqlx::query_scalar("SELECT sealed FROM fleet_secrets WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.error(e))
    }
}

impl FencedWrite {
    /// Stores (or replaces) the secret named after this transaction's
    /// lease (`account:<directory>`), with the lease's epoch: only the
    /// lease's holder writes it, so hosts starting together store one.
    pub async fn put_secret(&mut self, sealed: &[u8]) -> Result<(), DbError> {
        let (name, epoch) = (self.fence().lease.clone(), self.fence().epoch);
        sqlx::query(
            "INSERT INTO fleet_secrets (name, sealed, epoch) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE
                SET sealed = excluded.sealed, epoch = excluded.epoch, updated_at = now()",
        )
        .bind(name)
        .bind(sealed)
        .bind(epoch)
        .execute(&mut *self.tx)
        .await
        .map_err(|e| self.error(e))?;
        Ok(())
    }
}
