//! Certificate definitions across the fleet (`cert_definitions`,
//! `fleet_cert_definitions`, migration 0005): each host's definition of
//! each certificate, and the fleet's, which the leaseholders order.
//!
//! Fleet mode only: a SQLite ledger serves one host, whose definition is
//! the only one, so there these are no-ops (nothing recorded, nothing
//! read).

use std::collections::BTreeMap;

use crate::ledger::{Db, Ledger, Result};

use super::PgLedger;

/// What a certificate is as a host defines it: the hash of the whole,
/// and one hash per field (`domains`, `key_type`, ...), to name what
/// differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    pub hash: String,
    pub fields: BTreeMap<String, String>,
}

/// A host's definition of a certificate, as it last said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDefinition {
    pub host_id: String,
    pub definition: Definition,
    /// Unix seconds.
    pub seen_at: i64,
}

/// The fleet's definition of a certificate and the host that recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetDefinition {
    pub host_id: String,
    pub definition: Definition,
    /// Unix seconds.
    pub recorded_at: i64,
}

impl Definition {
    /// The fields whose hashes differ from `other`'s (or that only one
    /// of them has), by name.
    pub fn differing<'a>(&'a self, other: &'a Definition) -> Vec<&'a str> {
        let mut names: Vec<&str> = self
            .fields
            .iter()
            .filter(|(k, v)| other.fields.get(*k) != Some(v))
            .map(|(k, _)| k.as_str())
            .chain(
                other
                    .fields
                    .keys()
                    .filter(|k| !self.fields.contains_key(*k))
                    .map(String::as_str),
            )
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The stored form of the fields: one `field=hash` line each.
    fn fields_text(&self) -> String {
        self.fields
            .iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect()
    }

    fn from_row(hash: String, fields: &str) -> Self {
        let fields = fields
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Self { hash, fields }
    }
}

impl Ledger {
    /// Records `host_id`'s definition of `cert` (replacing what it said
    /// before). A host's own statement, written without a fence.
    pub async fn declare_definition(
        &self,
        cert: &str,
        host_id: &str,
        definition: &Definition,
    ) -> Result<()> {
        match &self.db {
            Db::Sqlite(_) => Ok(()),
            Db::Postgres(pg) => {
                pg.declare_definition(self.clock.now().secs(), cert, host_id, definition)
                    .await
            }
        }
    }

    /// Every host's definition of `cert`, by host id.
    pub async fn host_definitions(&self, cert: &str) -> Result<Vec<HostDefinition>> {
        match &self.db {
            Db::Sqlite(_) => Ok(Vec::new()),
            Db::Postgres(pg) => pg.host_definitions(cert).await,
        }
    }

    /// The fleet's definition of `cert`, if a leaseholder recorded one.
    pub async fn fleet_definition(&self, cert: &str) -> Result<Option<FleetDefinition>> {
        match &self.db {
            Db::Sqlite(_) => Ok(None),
            Db::Postgres(pg) => pg.fleet_definition(cert).await,
        }
    }

    /// Makes `definition` (`host_id`'s) the fleet's definition of
    /// `cert`. Through the certificate's lease: call it on the fenced
    /// handle.
    pub async fn set_fleet_definition(
        &self,
        cert: &str,
        host_id: &str,
        definition: &Definition,
    ) -> Result<()> {
        match &self.db {
            Db::Sqlite(_) => Ok(()),
            Db::Postgres(pg) => {
                pg.set_fleet_definition(self.clock.now().secs(), cert, host_id, definition)
                    .await
            }
        }
    }
}

impl PgLedger {
    async fn declare_definition(
        &self,
        now: i64,
        cert: &str,
        host_id: &str,
        definition: &Definition,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO cert_definitions (cert_name, host_id, hash, fields, seen_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (cert_name, host_id) DO UPDATE SET hash = excluded.hash,
                 fields = excluded.fields, seen_at = excluded.seen_at",
        )
        .bind(cert)
        .bind(host_id)
        .bind(&definition.hash)
        .bind(definition.fields_text())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn host_definitions(&self, cert: &str) -> Result<Vec<HostDefinition>> {
        let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
            "SELECT host_id, hash, fields, seen_at FROM cert_definitions
              WHERE cert_name = $1 ORDER BY host_id",
        )
        .bind(cert)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(host_id, hash, fields, seen_at)| HostDefinition {
                host_id,
                definition: Definition::from_row(hash, &fields),
                seen_at,
            })
            .collect())
    }

    async fn fleet_definition(&self, cert: &str) -> Result<Option<FleetDefinition>> {
        let row: Option<(String, String, String, i64)> = sqlx::query_as(
            "SELECT host_id, hash, fields, recorded_at FROM fleet_cert_definitions
              WHERE cert_name = $1",
        )
        .bind(cert)
        .fetch_optional(self.pool())
        .await?;
        Ok(
            row.map(|(host_id, hash, fields, recorded_at)| FleetDefinition {
                host_id,
                definition: Definition::from_row(hash, &fields),
                recorded_at,
            }),
        )
    }

    async fn set_fleet_definition(
        &self,
        now: i64,
        cert: &str,
        host_id: &str,
        definition: &Definition,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO fleet_cert_definitions (cert_name, hash, fields, host_id, recorded_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (cert_name) DO UPDATE SET hash = excluded.hash,
                 fields = excluded.fields, host_id = excluded.host_id,
                 recorded_at = excluded.recorded_at",
        )
        .bind(cert)
        .bind(&definition.hash)
        .bind(definition.fields_text())
        .bind(host_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_util::conformance;

    fn def(domains: &str, key_type: &str) -> Definition {
        let fields: BTreeMap<String, String> = [("domains", domains), ("key_type", key_type)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Definition {
            hash: format!("{domains}/{key_type}"),
            fields,
        }
    }

    #[test]
    fn differing_names_the_fields() {
        let a = def("d1", "k1");
        assert!(a.differing(&a).is_empty());
        assert_eq!(a.differing(&def("d2", "k1")), ["domains"]);
        let mut more = def("d1", "k2");
        more.fields.insert("profile".into(), "p".into());
        assert_eq!(a.differing(&more), ["key_type", "profile"]);
    }

    conformance! {
        /// PostgreSQL keeps each host's definition and the fleet's, and
        /// replaces them; SQLite, one host's ledger, keeps none.
        async fn definitions_are_kept_per_host_and_for_the_fleet(s: Ledger) {
            let (a, b) = (def("d1", "k1"), def("d2", "k1"));
            s.declare_definition("www", "host-a", &a).await.expect("declare");
            s.declare_definition("www", "host-b", &a).await.expect("declare");
            s.declare_definition("www", "host-b", &b).await.expect("declare again");
            s.set_fleet_definition("www", "host-a", &a).await.expect("set");
            let hosts = s.host_definitions("www").await.expect("read");
            let fleet = s.fleet_definition("www").await.expect("read");
            if !s.is_shared() {
                assert!(hosts.is_empty());
                assert_eq!(fleet, None);
                return;
            }
            let by_host: Vec<(&str, &Definition)> =
                hosts.iter().map(|h| (h.host_id.as_str(), &h.definition)).collect();
            assert_eq!(by_host, [("host-a", &a), ("host-b", &b)]);
            assert_eq!(hosts[0].seen_at, crate::ledger::test_util::START);
            let fleet = fleet.expect("the fleet's definition");
            assert_eq!((fleet.host_id.as_str(), &fleet.definition), ("host-a", &a));
            s.set_fleet_definition("www", "host-b", &b).await.expect("replace");
            let fleet = s.fleet_definition("www").await.expect("read").expect("row");
            assert_eq!((fleet.host_id.as_str(), &fleet.definition), ("host-b", &b));
            assert_eq!(s.fleet_definition("other").await.expect("read"), None);
        }
    }
}
