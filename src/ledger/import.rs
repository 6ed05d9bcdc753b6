//! `certd fleet import`: copies a host's SQLite ledger into the fleet's
//! empty PostgreSQL ledger, once.
//!
//! The copy is one PostgreSQL transaction: the ledger's tables are locked
//! against writers first (`SHARE ROW EXCLUSIVE`, which also excludes a
//! second import), found empty, filled table by table in the order their
//! foreign keys need, and their identity sequences moved past the copied
//! ids. A failure anywhere leaves the fleet's ledger as it was. The source
//! is read inside one SQLite transaction, so it is one consistent state.
//!
//! Each table goes in as one statement per batch, its columns bound as
//! arrays and `unnest`ed: a ledger of years holds many events, and a
//! statement per row would be one round trip each.

use sqlx::sqlite::SqliteRow;
use sqlx::{Row as _, Sqlite, Transaction};

use super::{Db, Ledger, LedgerError};

use self::Kind::{Bool, Int, Text};

/// What a column holds, as PostgreSQL types it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Text,
    /// An SQLite integer (0 or 1) that is `boolean` on PostgreSQL.
    Bool,
}

/// One table of the ledger: its name on each engine, its columns, and
/// whether its `id` is an identity whose sequence must follow the copy.
struct Table {
    sqlite: &'static str,
    postgres: &'static str,
    columns: &'static [(&'static str, Kind)],
    identity: bool,
}

/// Every table of the ledger (as after `migrations/sqlite/0011`), parents
/// before the tables that refer to them.
const TABLES: &[Table] = &[
    Table {
        sqlite: "accounts",
        postgres: "accounts",
        columns: &[
            ("id", Int),
            ("directory_url", Text),
            ("account_url", Text),
            ("created_at", Int),
        ],
        identity: true,
    },
    Table {
        sqlite: "certificates",
        postgres: "certificates",
        columns: &[
            ("name", Text),
            ("domains", Text),
            ("serial", Text),
            ("not_before", Int),
            ("not_after", Int),
            ("installed_at", Int),
            ("version", Text),
            ("last_attempt_at", Int),
            ("last_result", Text),
            ("last_error", Text),
            ("next_renewal_at", Int),
            ("consecutive_failures", Int),
            ("updated_at", Int),
            ("revoked_serial", Text),
            ("revoked_at", Int),
            ("revoked_reason", Text),
            ("profile", Text),
            ("profile_wanted", Text),
            ("profile_warning", Text),
            ("ari_serial", Text),
            ("ari_window_start", Int),
            ("ari_window_end", Int),
            ("ari_explanation_url", Text),
            ("ari_checked_at", Int),
            ("ari_next_check", Int),
            ("ari_error", Text),
            ("issuer_ca", Text),
        ],
        identity: false,
    },
    Table {
        sqlite: "orders",
        postgres: "orders",
        columns: &[
            ("id", Int),
            ("url", Text),
            ("account_id", Int),
            ("cert_name", Text),
            ("identifiers", Text),
            ("status", Text),
            ("step", Text),
            ("error", Text),
            ("expires_at", Int),
            ("created_at", Int),
            ("updated_at", Int),
        ],
        identity: true,
    },
    Table {
        sqlite: "authorizations",
        postgres: "authorizations",
        columns: &[
            ("id", Int),
            ("url", Text),
            ("account_id", Int),
            ("identifier", Text),
            ("status", Text),
            ("challenge_type", Text),
            ("challenge_url", Text),
            ("error", Text),
            ("expires_at", Int),
            ("created_at", Int),
            ("updated_at", Int),
            ("deactivated_at", Int),
            ("deactivated_by", Text),
            ("deactivated_from", Text),
            ("check_attempts", Int),
            ("check_after", Int),
            ("check_error", Text),
        ],
        identity: true,
    },
    Table {
        sqlite: "order_authorizations",
        postgres: "order_authorizations",
        columns: &[("order_id", Int), ("authz_id", Int)],
        identity: false,
    },
    Table {
        sqlite: "challenges",
        postgres: "challenges",
        columns: &[
            ("url", Text),
            ("authz_id", Int),
            ("type", Text),
            ("status", Text),
        ],
        identity: false,
    },
    Table {
        sqlite: "events",
        postgres: "events",
        columns: &[
            ("id", Int),
            ("at", Int),
            ("kind", Text),
            ("cert_name", Text),
            ("order_url", Text),
            ("authz_url", Text),
            ("detail", Text),
        ],
        identity: true,
    },
    Table {
        sqlite: "order_intents",
        postgres: "order_intents",
        columns: &[
            ("id", Int),
            ("account_id", Int),
            ("cert_name", Text),
            ("identifiers", Text),
            ("created_at", Int),
        ],
        identity: true,
    },
    Table {
        sqlite: "issued",
        postgres: "issued_orders",
        columns: &[
            ("order_url", Text),
            ("cert_name", Text),
            ("identifiers", Text),
            ("serial", Text),
            ("not_after", Int),
            ("issued_at", Int),
            ("installed_at", Int),
        ],
        identity: false,
    },
    Table {
        sqlite: "ca_pauses",
        postgres: "ca_pauses",
        columns: &[
            ("scope", Text),
            ("until_at", Int),
            ("paused", Bool),
            ("unpause_url", Text),
            ("detail", Text),
            ("since", Int),
        ],
        identity: false,
    },
    Table {
        sqlite: "ca_state",
        postgres: "ca_state",
        columns: &[("ca", Text), ("failing_since", Int), ("last_error", Text)],
        identity: false,
    },
];

/// Rows sent per statement: bounded so one statement's arrays stay small.
const BATCH: usize = 5_000;

/// What an import copied: rows per table, by the fleet's table names, in
/// the order they were copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    pub tables: Vec<(&'static str, u64)>,
}

/// Why an import did not happen. Nothing was written in either case.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(
        "the fleet's ledger already holds rows ({rows} in {table}); `certd fleet import` only fills an empty one, and nothing was copied"
    )]
    NotEmpty { table: &'static str, rows: u64 },
    #[error("`certd fleet import` copies a SQLite ledger into a PostgreSQL one; {0}")]
    WrongEngines(&'static str),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl From<sqlx::Error> for ImportError {
    fn from(e: sqlx::Error) -> Self {
        Self::Ledger(e.into())
    }
}

impl Ledger {
    /// Copies every row of this (SQLite) ledger into `fleet`, the fleet's
    /// PostgreSQL ledger, which must be empty. One transaction on each
    /// side: a consistent read of this ledger, and on the fleet's either
    /// everything or nothing.
    pub async fn import_into(&self, fleet: &Ledger) -> Result<ImportReport, ImportError> {
        let Db::Sqlite(source) = &self.db else {
            return Err(ImportError::WrongEngines("the source is not SQLite"));
        };
        let Db::Postgres(target) = &fleet.db else {
            return Err(ImportError::WrongEngines("the target is not PostgreSQL"));
        };
        let mut from = source.begin().await?;
        let mut to = target.write().await?;
        let names: Vec<&str> = TABLES.iter().map(|t| t.postgres).collect();
        // Writers (a host already running in fleet mode) and a second
        // import wait until this one has committed or rolled back.
        sqlx::query(&format!(
            "LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE",
            names.join(", ")
        ))
        .execute(&mut *to)
        .await?;
        for table in TABLES {
            let (rows,): (i64,) =
                sqlx::query_as(&format!("SELECT COUNT(*) FROM {}", table.postgres))
                    .fetch_one(&mut *to)
                    .await?;
            if rows > 0 {
                return Err(ImportError::NotEmpty {
                    table: table.postgres,
                    rows: u64::try_from(rows).unwrap_or(0),
                });
            }
        }
        let mut report = ImportReport { tables: Vec::new() };
        for table in TABLES {
            let copied = copy_table(table, &mut from, &mut to).await?;
            report.tables.push((table.postgres, copied));
        }
        to.commit().await?;
        // The read transaction wrote nothing; ending it is all that's left.
        from.rollback().await?;
        Ok(report)
    }
}

/// Copies one table, in batches of [`BATCH`] rows by the source's order;
/// returns the rows copied.
async fn copy_table(
    table: &Table,
    from: &mut Transaction<'_, Sqlite>,
    to: &mut Transaction<'static, sqlx::Postgres>,
) -> Result<u64, ImportError> {
    let columns: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
    let list = columns
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let select = format!("SELECT {list} FROM {} ORDER BY rowid", table.sqlite);
    // WITHOUT ROWID tables have no rowid; their primary key orders them.
    let select = if matches!(table.sqlite, "order_authorizations" | "challenges") {
        select.replace("ORDER BY rowid", "ORDER BY 1, 2")
    } else {
        select
    };
    let rows: Vec<SqliteRow> = sqlx::query(&select).fetch_all(&mut **from).await?;
    let unnest = table
        .columns
        .iter()
        .enumerate()
        .map(|(i, (_, kind))| format!("${}::{}[]", i + 1, kind.pg_type()))
        .collect::<Vec<_>>()
        .join(", ");
    let insert = format!(
        "INSERT INTO {} ({list}) SELECT * FROM unnest({unnest})",
        table.postgres
    );
    for batch in rows.chunks(BATCH) {
        let mut query = sqlx::query(&insert);
        for (i, (name, kind)) in table.columns.iter().enumerate() {
            query = match kind {
                Int => query.bind(column::<i64>(batch, i, table, name)?),
                Text => query.bind(column::<String>(batch, i, table, name)?),
                Bool => query.bind(
                    column::<i64>(batch, i, table, name)?
                        .into_iter()
                        .map(|v| v.map(|n| n != 0))
                        .collect::<Vec<_>>(),
                ),
            };
        }
        query.execute(&mut **to).await?;
    }
    if table.identity {
        // Ids go on from the largest copied, as they would have in SQLite.
        sqlx::query(&format!(
            "SELECT setval(pg_get_serial_sequence('{0}', 'id'), COALESCE(MAX(id), 0) + 1, false)
               FROM {0}",
            table.postgres
        ))
        .execute(&mut **to)
        .await?;
    }
    Ok(rows.len() as u64)
}

/// Column `i` of every row in `batch`, read as `T`.
fn column<T>(
    batch: &[SqliteRow],
    i: usize,
    table: &Table,
    name: &str,
) -> Result<Vec<Option<T>>, ImportError>
where
    T: for<'r> sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
{
    batch
        .iter()
        .map(|row| row.try_get::<Option<T>, _>(i))
        .collect::<Result<_, _>>()
        .map_err(|e| {
            ImportError::Ledger(LedgerError::Query(sqlx::Error::Decode(
                format!("{}.{name}: {e}", table.sqlite).into(),
            )))
        })
}

impl Kind {
    fn pg_type(self) -> &'static str {
        match self {
            Int => "bigint",
            Text => "text",
            Bool => "boolean",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_util::{ledger, pg_ledger};

    /// A SQLite ledger with a row in every table (an account, an order
    /// with its authorization and challenge, events, a pause), copied into
    /// an empty PostgreSQL ledger: the same rows come out, booleans as
    /// booleans, and ids go on after the copied ones. A second import is
    /// refused and changes nothing.
    #[tokio::test]
    async fn a_sqlite_ledger_is_copied_whole_once() {
        let (_dir, sqlite) = ledger().await;
        let (_pg_dir, pg) = pg_ledger().await;
        let Db::Sqlite(pool) = &sqlite.db else {
            unreachable!("ledger() is SQLite")
        };
        for sql in [
            "INSERT INTO accounts VALUES (7, 'https://ca/dir', 'https://ca/acct/1', 10)",
            "INSERT INTO certificates (name, domains, serial, updated_at, issuer_ca)
             VALUES ('www', '[\"www.example\"]', 'ab', 11, 'le')",
            "INSERT INTO orders VALUES (3, 'https://ca/o/3', 7, 'www', '[\"www.example\"]',
             'valid', 'done', NULL, 99, 12, 13)",
            "INSERT INTO authorizations (id, url, account_id, identifier, status, created_at, updated_at)
             VALUES (5, 'https://ca/a/5', 7, 'www.example', 'valid', 12, 13)",
            "INSERT INTO order_authorizations VALUES (3, 5)",
            "INSERT INTO challenges VALUES ('https://ca/c/1', 5, 'http-01', 'valid')",
            "INSERT INTO events (at, kind, cert_name) VALUES (14, 'issued', 'www'), (15, 'installed', 'www')",
            "INSERT INTO order_intents VALUES (2, 7, 'www', '[\"www.example\"]', 12)",
            "INSERT INTO issued VALUES ('https://ca/o/3', 'www', '[\"www.example\"]', 'ab', 99, 13, 14)",
            "INSERT INTO ca_pauses VALUES ('account', 100, 1, NULL, 'paused', 12)",
            "INSERT INTO ca_state VALUES ('le', 12, 'down')",
        ] {
            sqlx::query(sql).execute(pool).await.expect(sql);
        }
        let report = sqlite.import_into(&pg).await.expect("import");
        let expected: Vec<(&str, u64)> = TABLES
            .iter()
            .map(|t| (t.postgres, if t.sqlite == "events" { 2 } else { 1 }))
            .collect();
        assert_eq!(report.tables, expected);

        let Db::Postgres(target) = &pg.db else {
            unreachable!("pg_ledger() is PostgreSQL")
        };
        let pg_pool = target.pool();
        let paused: bool = sqlx::query_scalar("SELECT paused FROM ca_pauses")
            .fetch_one(pg_pool)
            .await
            .unwrap();
        assert!(paused);
        let (url, issuer): (String, Option<String>) = sqlx::query_as(
            "SELECT o.url, c.issuer_ca FROM orders o JOIN certificates c ON c.name = o.cert_name
              WHERE o.account_id = 7",
        )
        .fetch_one(pg_pool)
        .await
        .unwrap();
        assert_eq!(
            (url.as_str(), issuer.as_deref()),
            ("https://ca/o/3", Some("le"))
        );
        let next: i64 = sqlx::query_scalar(
            "INSERT INTO accounts (directory_url, account_url, created_at)
             VALUES ('https://other/dir', 'u', 1) RETURNING id",
        )
        .fetch_one(pg_pool)
        .await
        .unwrap();
        assert_eq!(next, 8, "ids go on after the copied ones");

        match sqlite.import_into(&pg).await {
            Err(ImportError::NotEmpty {
                table: "accounts",
                rows: 2,
            }) => {}
            other => panic!("expected NotEmpty, got {other:?}"),
        }
        let events: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events")
            .fetch_one(pg_pool)
            .await
            .unwrap();
        assert_eq!(events, 2, "a refused import writes nothing");
    }
}
