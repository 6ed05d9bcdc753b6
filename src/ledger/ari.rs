//! The CA's latest ARI answer for each installed certificate.

use super::{AriRecord, Db, Ledger, Result};

impl Ledger {
    /// Records the CA's ARI answer for the installed certificate `serial`
    /// of `name`. An error keeps the window of an earlier good answer about
    /// the same certificate: that window still holds.
    pub(crate) async fn record_ari(
        &self,
        name: &str,
        serial: &str,
        ari: &AriRecord<'_>,
    ) -> Result<()> {
        let now = self.now();
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Postgres(pg) => return pg.record_ari(now, name, serial, ari).await,
        };
        sqlx::query(
            "UPDATE certificates SET
                 ari_window_start = CASE WHEN ?2 IS NOT NULL THEN ?2
                     WHEN ari_serial = ?1 THEN ari_window_start END,
                 ari_window_end = CASE WHEN ?2 IS NOT NULL THEN ?3
                     WHEN ari_serial = ?1 THEN ari_window_end END,
                 ari_explanation_url = CASE WHEN ?2 IS NOT NULL THEN ?4
                     WHEN ari_serial = ?1 THEN ari_explanation_url END,
                 ari_serial = ?1, ari_checked_at = ?5, ari_next_check = ?6, ari_error = ?7,
                 updated_at = ?5
             WHERE name = ?8",
        )
        .bind(serial)
        .bind(ari.window.map(|w| w.start))
        .bind(ari.window.map(|w| w.end))
        .bind(ari.window.and_then(|w| w.explanation_url))
        .bind(now)
        .bind(ari.next_check)
        .bind(ari.error)
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
    use crate::ledger::{AriWindow, CertificateRow, Installed};

    /// The ARI columns of `row`: serial, window (start, end, explanation),
    /// checked, next check, error.
    type AriColumns = (
        Option<String>,
        (Option<i64>, Option<i64>, Option<String>),
        Option<i64>,
        Option<i64>,
        Option<String>,
    );

    fn ari_columns(row: CertificateRow) -> AriColumns {
        (
            row.ari_serial,
            (
                row.ari_window_start,
                row.ari_window_end,
                row.ari_explanation_url,
            ),
            row.ari_checked_at,
            row.ari_next_check,
            row.ari_error,
        )
    }

    async fn read(s: &Ledger) -> AriColumns {
        ari_columns(s.certificate("www").await.expect("read").expect("row"))
    }

    conformance! {
        /// A window is recorded with its serial; an error about the same
        /// certificate keeps it, one about another certificate drops it.
        async fn an_ari_error_keeps_the_window_of_the_same_certificate(s: Ledger) {
            let window = |start, url| AriRecord {
                window: Some(AriWindow {
                    start,
                    end: start + 100,
                    explanation_url: url,
                }),
                next_check: Some(START + 3600),
                error: None,
            };
            let failed = AriRecord {
                window: None,
                next_check: Some(START + 60),
                error: Some("503"),
            };
            // No row, nothing to record on.
            s.record_ari("www", "01", &window(500, None)).await.expect("ari");
            assert!(s.certificate("www").await.expect("read").is_none());
            let installed = Installed {
                domains: vec!["a.example".to_owned()],
                serial: "01".into(),
                not_before: 1,
                not_after: 2,
                version: "v1".into(),
                profile: None,
                profile_wanted: String::new(),
            };
            s.record_installed("www", &installed, 3).await.expect("install");
            assert_eq!(read(&s).await, (None, (None, None, None), None, None, None));

            s.record_ari("www", "01", &window(500, Some("https://ca/why")))
                .await
                .expect("ari");
            let why = Some("https://ca/why".to_owned());
            assert_eq!(
                read(&s).await,
                (
                    Some("01".into()),
                    (Some(500), Some(600), why.clone()),
                    Some(START),
                    Some(START + 3600),
                    None
                )
            );
            s.clock().advance(std::time::Duration::from_secs(60));
            s.record_ari("www", "01", &failed).await.expect("ari");
            assert_eq!(
                read(&s).await,
                (
                    Some("01".into()),
                    (Some(500), Some(600), why),
                    Some(START + 60),
                    Some(START + 60),
                    Some("503".into())
                )
            );
            s.record_ari("www", "01", &window(700, None)).await.expect("ari");
            assert_eq!(read(&s).await.1, (Some(700), Some(800), None));
            assert_eq!(read(&s).await.4, None);
            s.record_ari("www", "02", &failed).await.expect("ari");
            assert_eq!(
                read(&s).await,
                (
                    Some("02".into()),
                    (None, None, None),
                    Some(START + 60),
                    Some(START + 60),
                    Some("503".into())
                )
            );
        }
    }
}
