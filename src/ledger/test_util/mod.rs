//! Test ledgers on both backends, and the conformance suite's macro.

pub(crate) mod fence;
pub(crate) mod lease;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::postgres::PgPoolOptions;

use super::{Clock, Ledger};

/// The throwaway cluster of the integration tests, for the unit tests
/// that need a real PostgreSQL: shared here by every unit test of the
/// PostgreSQL ledger (one database each); the fleet's unit tests start
/// their own.
#[allow(dead_code, clippy::all, clippy::pedantic)]
#[path = "../../../tests/util/postgres.rs"]
pub(crate) mod cluster;

/// What the cluster's module takes from its parent in the test harness.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The time every test ledger's clock is fixed at.
pub(crate) const START: i64 = 1_000_000;

fn fixed_clock() -> Clock {
    Clock::fixed(crate::clock::UnixTime::from_secs(START))
}

/// A fresh SQLite ledger in a temporary directory, on a clock fixed at
/// [`START`].
pub(crate) async fn ledger() -> (tempfile::TempDir, Ledger) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Ledger::open(&dir.path().join("certd.db"), fixed_clock())
        .await
        .expect("open");
    (dir, store)
}

/// A fresh PostgreSQL ledger (a new database in the shared cluster,
/// with `migrations/postgres/`), unfenced, on a clock fixed at
/// [`START`]. The cluster starts on first use and is stopped when the
/// test binary exits.
pub(crate) async fn pg_ledger() -> (tempfile::TempDir, Ledger) {
    static CLUSTER: OnceLock<String> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let url = CLUSTER.get_or_init(|| {
        let pg = cluster::Postgres::launch();
        let url = pg.url();
        pg.keep_until_exit();
        url
    });
    let name = format!("ledger_{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .expect("connect to the test cluster");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("create the test database");
    admin.close().await;
    let db_url = format!("{}/{name}", url.trim_end_matches("/postgres"));
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&db_url)
        .await
        .expect("connect to the test database");
    sqlx::migrate!("./migrations/postgres")
        .run(&pool)
        .await
        .expect("migrations/postgres");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Ledger::postgres(pool, dir.path().to_owned(), fixed_clock());
    (dir, store)
}

/// Declares ledger tests that run against both backends: each
/// `async fn name(s: Ledger) { .. }` becomes a module `name` with a
/// `sqlite` and a `postgres` test, so `cargo test name` runs both.
/// This is the conformance suite: one set of expectations, both
/// engines.
macro_rules! conformance {
    ($( $(#[$meta:meta])* async fn $name:ident($s:ident: Ledger) $body:block )*) => {
        $(
            $(#[$meta])*
            mod $name {
                #[allow(unused_imports)]
                use super::*;

                async fn check($s: $crate::ledger::Ledger) $body

                #[tokio::test]
                async fn sqlite() {
                    let (_dir, s) = $crate::ledger::test_util::ledger().await;
                    check(s).await;
                }

                #[tokio::test]
                async fn postgres() {
                    let (_dir, s) = $crate::ledger::test_util::pg_ledger().await;
                    check(s).await;
                }
            }
        )*
    };
}
pub(crate) use conformance;
