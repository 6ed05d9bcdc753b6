//! Certificates the CA issued that wait to be installed: the chain and key
//! are on disk, so a failed install is retried without a second issuance.

use sqlx::FromRow;

use super::{Db, Identifiers, Ledger, Result};

/// A certificate the CA issued that is not installed yet.
#[derive(Debug, Clone, FromRow)]
pub(crate) struct IssuedRow {
    pub(crate) order_url: String,
    pub(crate) identifiers: Identifiers,
    pub(crate) serial: String,
}

impl Ledger {
    /// Records a certificate the CA issued for `order_url`, before it is
    /// installed (its chain and key are on disk by then).
    pub(crate) async fn record_issued(
        &self,
        order_url: &str,
        cert_name: &str,
        identifiers: &Identifiers,
        serial: &str,
        not_after: i64,
    ) -> Result<()> {
        let now = self.now();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => {
                return pg
                    .record_issued(now, order_url, cert_name, identifiers, serial, not_after)
                    .await;
            }
        };
        sqlx::query(
            "INSERT INTO issued (order_url, cert_name, identifiers, serial, not_after, issued_at)
             VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT(order_url) DO UPDATE SET serial = excluded.serial,
                 not_after = excluded.not_after, installed_at = NULL",
        )
        .bind(order_url)
        .bind(cert_name)
        .bind(identifiers)
        .bind(serial)
        .bind(not_after)
        .bind(now)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// The newest issued certificate of `cert_name` still waiting to be
    /// installed.
    pub(crate) async fn waiting_issued(&self, cert_name: &str) -> Result<Option<IssuedRow>> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.waiting_issued(cert_name).await,
        };
        Ok(sqlx::query_as(
            "SELECT order_url, identifiers, serial FROM issued
             WHERE cert_name = ? AND installed_at IS NULL ORDER BY issued_at DESC, rowid DESC LIMIT 1",
        )
        .bind(cert_name)
        .fetch_optional(pool)
        .await?)
    }

    /// Whether the certificate of `order_url` is issued and not installed.
    pub(crate) async fn issued_waiting(&self, order_url: &str) -> Result<bool> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.issued_waiting(order_url).await,
        };
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT 1 FROM issued WHERE order_url = ? AND installed_at IS NULL")
                .bind(order_url)
                .fetch_optional(pool)
                .await?;
        Ok(row.is_some())
    }

    /// The issued certificate of `order_url` waits no longer: installed, or
    /// dropped as unusable.
    pub(crate) async fn issued_done(&self, order_url: &str) -> Result<()> {
        let now = self.now();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.issued_done(now, order_url).await,
        };
        sqlx::query("UPDATE issued SET installed_at = ? WHERE order_url = ?")
            .bind(now)
            .bind(order_url)
            .execute(pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_util::conformance;

    conformance! {
        /// An issued certificate waits until done; of several waiting, the
        /// newest is the one to install, and of two issued in the same
        /// second, the one recorded later.
        async fn the_newest_issued_certificate_waits_until_done(s: Ledger) {
            let names = Identifiers::new(["b.example", "a.example"]);
            let url = |n: u32| format!("https://ca/order/{n}");
            assert!(s.waiting_issued("www").await.expect("read").is_none());
            assert!(!s.issued_waiting(&url(1)).await.expect("read"));
            s.record_issued(&url(1), "www", &names, "01", 10).await.expect("record");
            s.clock().advance(std::time::Duration::from_secs(1));
            s.record_issued(&url(3), "www", &names, "03", 10).await.expect("record");
            s.record_issued(&url(2), "www", &names, "02", 10).await.expect("record");
            s.record_issued(&url(9), "other", &names, "09", 10).await.expect("record");
            let row = s.waiting_issued("www").await.expect("read").expect("row");
            assert_eq!((row.order_url, row.serial), (url(2), "02".to_owned()));
            assert_eq!(row.identifiers, names);
            // Recorded again (issued anew for the same order): its serial
            // changes, its place does not.
            s.record_issued(&url(3), "www", &names, "3b", 20).await.expect("record");
            let row = s.waiting_issued("www").await.expect("read").expect("row");
            assert_eq!(row.order_url, url(2));

            s.issued_done(&url(2)).await.expect("done");
            assert!(!s.issued_waiting(&url(2)).await.expect("read"));
            let row = s.waiting_issued("www").await.expect("read").expect("row");
            assert_eq!((row.order_url, row.serial), (url(3), "3b".to_owned()));
            s.issued_done(&url(3)).await.expect("done");
            let row = s.waiting_issued("www").await.expect("read").expect("row");
            assert_eq!(row.order_url, url(1));
            s.issued_done(&url(1)).await.expect("done");
            assert!(s.waiting_issued("www").await.expect("read").is_none());
            assert!(s.issued_waiting(&url(9)).await.expect("read"));

            // An installed one recorded again waits again.
            s.record_issued(&url(1), "www", &names, "1b", 30).await.expect("record");
            assert!(s.issued_waiting(&url(1)).await.expect("read"));
            let row = s.waiting_issued("www").await.expect("read").expect("row");
            assert_eq!((row.order_url, row.serial), (url(1), "1b".to_owned()));
        }
    }
}
