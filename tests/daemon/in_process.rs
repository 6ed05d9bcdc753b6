//! The daemon run inside the test process, as a library: the test builds
//! its services, binds its sockets on port 0 and holds the shutdown token
//! (`certd::daemon::run`'s contract), against a real Pebble.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use certd::app::Services;
use certd::clock::Clock;
use certd::config::Config;
use certd::daemon::Listeners;
use certd::ledger::{EventKind, Ledger};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::util::{TestEnv, cert_table as cert, parse_leaf, read_pem_certs};

/// Waits (without blocking the runtime) until `done` holds, at most
/// `timeout`.
async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET /metrics` from the daemon's listener.
fn scrape(addr: SocketAddr) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("response");
    text
}

async fn ledger_serial(db: &Path, name: &str) -> Option<String> {
    let store = Ledger::open_read_only(db, Clock::system())
        .await
        .expect("open ledger");
    let row = store.certificate(name).await.expect("read certificate row");
    store.close().await;
    row.and_then(|r| r.serial)
}

#[test]
fn in_process_daemon_issues_records_and_stops_on_its_token() {
    let env = TestEnv::new();
    env.write_config(&format!(
        "{}{}",
        crate::util::DAEMON_RETRY_2S,
        cert("one", "one.example.test")
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let cfg = Config::load(&env.config_path()).expect("configuration");
        let db = cfg.db_path();
        let services = Services::open(cfg, Clock::system())
            .await
            .expect("services");
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind metrics");
        let metrics_addr = metrics.local_addr().expect("metrics address");
        let (_reload_tx, reload) = mpsc::channel(1);
        let shutdown = CancellationToken::new();
        let listeners = Listeners {
            metrics: Some(metrics),
            reload,
        };
        let daemon = tokio::spawn(certd::daemon::run(services, listeners, shutdown.clone()));

        let pem = env.cert_dir().join("one/cert.pem");
        wait_until(
            "the certificate is installed",
            Duration::from_secs(60),
            || pem.exists(),
        )
        .await;
        let chain = read_pem_certs(&pem);
        let (names, serial, not_after, _) = parse_leaf(&chain[0]);
        assert_eq!(names, ["one.example.test"]);

        // The ledger's row may trail the installed file by a moment.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if ledger_serial(&db, "one").await.as_deref() == Some(serial.as_str()) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the ledger never recorded serial {serial}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // The listener the test bound serves the daemon's metrics.
        let page = tokio::task::spawn_blocking(move || scrape(metrics_addr))
            .await
            .expect("scrape");
        assert!(
            page.contains(&format!(
                "certd_certificate_expiry_timestamp_seconds{{name=\"one\"}} {not_after}"
            )),
            "{page}"
        );
        assert!(page.contains("certd_ledger_write_errors_total 0"), "{page}");

        // The token the test holds stops it, within the grace.
        shutdown.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(30), daemon)
            .await
            .expect("the daemon stops on its token");
        stopped.expect("daemon task").expect("a clean shutdown");
    });
    // Stopped means closed: the ledger opens for writing again.
    runtime.block_on(async {
        let store = Ledger::open(&env.state_dir().join("certd.db"), Clock::system())
            .await
            .expect("reopen the ledger");
        store.close().await;
    });
}

#[test]
fn in_process_daemon_waits_for_its_ca_and_takes_the_fix_from_the_file() {
    let env = TestEnv::new();
    env.write_config(&format!(
        "{}{}",
        crate::util::DAEMON_RETRY_2S,
        cert("one", "one.example.test")
    ));
    // The CA's directory at a port nothing listens on: unreachable.
    let good = std::fs::read_to_string(env.config_path()).expect("read config");
    let dead = format!("https://127.0.0.1:{}/dir", crate::util::free_port());
    let bad = good.replace(&env.directory_url(), &dead);
    assert_ne!(bad, good, "the directory URL is in the file");
    env.write_raw_config(&bad);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let cfg = Config::load(&env.config_path()).expect("configuration");
        let db = cfg.db_path();
        let services = Services::open(cfg, Clock::system())
            .await
            .expect("services");
        let (_reload_tx, reload) = mpsc::channel(1);
        let shutdown = CancellationToken::new();
        let listeners = Listeners {
            metrics: None,
            reload,
        };
        let daemon = tokio::spawn(certd::daemon::run(services, listeners, shutdown.clone()));

        // For `certd status`: the CA unreachable since the first failure.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let store = Ledger::open_read_only(&db, Clock::system())
                .await
                .expect("open ledger");
            let n = store
                .count_events(EventKind::CaUnreachable)
                .await
                .expect("count");
            store.close().await;
            if n == 1 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no ca-unreachable event"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!daemon.is_finished(), "the daemon waits for its CA");

        // The fix is an edit; the next attempt reads it (the watcher does
        // not run yet) and the certificate is issued.
        env.write_raw_config(&good);
        let pem = env.cert_dir().join("one/cert.pem");
        wait_until(
            "the certificate is installed",
            Duration::from_secs(60),
            || pem.exists(),
        )
        .await;
        let (names, _, _, _) = parse_leaf(&read_pem_certs(&pem)[0]);
        assert_eq!(names, ["one.example.test"]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let store = Ledger::open_read_only(&db, Clock::system())
                .await
                .expect("open ledger");
            let n = store
                .count_events(EventKind::CaReachable)
                .await
                .expect("count");
            store.close().await;
            if n == 1 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no ca-reachable event"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        shutdown.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(30), daemon)
            .await
            .expect("the daemon stops on its token");
        stopped.expect("daemon task").expect("a clean shutdown");
    });
}
