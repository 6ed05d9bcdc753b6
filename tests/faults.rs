//! The fault suite: what certd does when the world misbehaves. Kills at
//! random points, a CA that goes away, a full or read-only disk. Longer
//! runs of the same tests are in scripts/soak.

use std::fs;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::util::{
    TcpProxy, TestEnv, TinyDisk, ca_authz_statuses, installed, integrity, ledger_authz,
    ledger_authz_urls, wait_for,
};

const DAEMON: &str = r#"
[daemon]
backoff_min = "1s"
backoff_max = "4s"
shutdown_grace = "10s"
"#;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A pseudo-random number from the clock: enough to spread kill points.
fn jitter_ms(max: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    u64::from(nanos.wrapping_mul(2_654_435_761)) % max
}

/// The installed serial of `name`, after checking the key matches.
fn installed_serial(env: &TestEnv, name: &str) -> String {
    installed(env, name).1
}

fn assert_nothing_pending_at_ca(env: &TestEnv) {
    let authz = ledger_authz(env);
    let at_ca = ca_authz_statuses(env, &ledger_authz_urls(&authz));
    let pending: Vec<_> = at_ca.iter().filter(|(_, s)| *s == "pending").collect();
    assert!(pending.is_empty(), "left pending at the CA: {pending:?}");
}

#[test]
fn kill_9_at_random_points_loses_nothing() {
    // scripts/soak raises these to 50 kills over 20 certificates.
    let kills = env_number("CERTD_KILLS", 8);
    let count = env_number("CERTD_KILL_CERTS", 6);
    let env = TestEnv::new();
    let certs: String = (0..count)
        .map(|i| format!("\n[[certificate]]\nname = \"c{i}\"\ndomains = [\"c{i}.example.test\", \"w{i}.example.test\"]\n"))
        .collect();
    env.write_config(&format!("{DAEMON}{certs}"));
    for _ in 0..kills {
        let daemon = env.command().arg("run").spawn();
        std::thread::sleep(Duration::from_millis(50 + jitter_ms(400)));
        daemon.signal("KILL");
        let _ = daemon.wait();
    }
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_output("certd running", Duration::from_secs(30));
    for i in 0..count {
        wait_for(
            &env.cert_dir().join(format!("c{i}/cert.pem")),
            Duration::from_secs(90),
        );
    }
    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
    for i in 0..count {
        installed_serial(&env, &format!("c{i}"));
    }
    assert_eq!(integrity(&env), "ok");
    assert_nothing_pending_at_ca(&env);
}

#[test]
fn ca_outage_backs_off_and_recovers() {
    let env = TestEnv::new();
    env.write_config(&format!(
        "{DAEMON}\n[[certificate]]\nname = \"a\"\ndomains = [\"a.example.test\"]\n"
    ));
    let proxy = TcpProxy::for_pebble(&env);
    proxy.route(&env);
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_file(&env.cert_dir().join("a/cert.pem"), Duration::from_secs(30));
    let first = installed_serial(&env, "a");

    // The CA goes away; a new certificate is added meanwhile.
    proxy.set_up(false);
    let config = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&format!(
        "{config}\n[[certificate]]\nname = \"b\"\ndomains = [\"b.example.test\"]\n"
    ));
    daemon.wait_for_output("renewal failed", Duration::from_secs(15));
    let outage = Instant::now();
    std::thread::sleep(Duration::from_secs(8));
    // Backoff 1 s, 2 s, 4 s (with jitter): a handful of attempts in 8 s,
    // each a connection or two; a tight loop would be thousands.
    let attempts = proxy.refused();
    assert!(
        (1..=12).contains(&attempts),
        "{attempts} connections in {:?}",
        outage.elapsed()
    );

    proxy.set_up(true);
    daemon.wait_for_file(&env.cert_dir().join("b/cert.pem"), Duration::from_secs(30));
    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(
        installed_serial(&env, "a"),
        first,
        "the installed certificate is untouched"
    );
    assert_nothing_pending_at_ca(&env);
}

#[test]
fn full_or_read_only_certificate_directory_keeps_the_installed_certificate() {
    let env = TestEnv::new();
    env.write_config("\n[[certificate]]\nname = \"d\"\ndomains = [\"d.example.test\"]\n");
    let disk = TinyDisk::mount(&env.cert_dir(), "128k");
    env.certd(&["renew"]).assert_success();
    let first = installed_serial(&env, "d");

    // Full: fill what is left.
    let filler = env.cert_dir().join("filler");
    let _ = fs::write(&filler, vec![0u8; 256 * 1024]);
    let out = env.certd(&["renew", "--force"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stdout.contains("No space left on device"),
        "{}",
        out.stdout
    );
    assert_eq!(
        installed_serial(&env, "d"),
        first,
        "the installed certificate is intact"
    );
    let status: serde_json::Value =
        serde_json::from_str(&env.certd(&["status", "--json"]).stdout).expect("status");
    assert!(
        status[0]["last_error"]
            .as_str()
            .expect("error")
            .contains("No space left"),
        "{status}"
    );

    // Read-only: likewise.
    fs::remove_file(&filler).expect("free space");
    disk.remount("ro");
    let out = env.certd(&["renew", "--force"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stdout.contains("Read-only file system"),
        "{}",
        out.stdout
    );
    assert_eq!(installed_serial(&env, "d"), first);

    // Space back: the next attempt succeeds.
    disk.remount("rw");
    env.certd(&["renew", "--force"]).assert_success();
    assert_ne!(installed_serial(&env, "d"), first);
    assert_eq!(integrity(&env), "ok");
}

#[test]
fn bad_ca_answers_are_clear_errors_and_lose_nothing() {
    use crate::util::{Fault, FaultyFront};
    let env = TestEnv::new();
    env.write_config("\n[[certificate]]\nname = \"f\"\ndomains = [\"f.example.test\"]\n");
    let front = FaultyFront::start(&env.pebble);
    let config = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&config.replace(&env.pebble.directory_url(), &front.directory_url()));
    env.certd(&["renew"]).assert_success();
    let first = installed_serial(&env, "f");

    let cases = [
        (
            "/dir",
            Fault::HtmlBadGateway,
            "HTTP 502 Bad Gateway with a text/html body",
        ),
        (
            "/order-plz",
            Fault::ServerError,
            "HTTP 500 Internal Server Error",
        ),
        ("/finalize", Fault::TruncatedJson, "malformed JSON"),
        ("/dir", Fault::WrongContentType, "malformed JSON"),
    ];
    for (path, fault, expected) in cases {
        front.inject(path, fault.clone(), 1);
        let out = env.certd(&["renew", "--force"]);
        assert_eq!(out.code(), Some(1), "{path} {fault:?}: {out}");
        assert!(!out.stderr.contains("panicked"), "{out}");
        assert!(
            out.stdout.contains(expected),
            "{path} {fault:?}: expected {expected:?} in {}",
            out.stdout
        );
        assert_eq!(
            installed_serial(&env, "f"),
            first,
            "{path} {fault:?}: installed certificate intact"
        );
        let status: serde_json::Value =
            serde_json::from_str(&env.certd(&["status", "--json"]).stdout).expect("status");
        assert_eq!(status[0]["last_result"], "error");
    }
    // The CA answers well again: the next attempt succeeds.
    env.certd(&["renew", "--force"]).assert_success();
    assert_ne!(installed_serial(&env, "f"), first);
}
