//! The fault suite: what certd does when the world misbehaves. Kills at
//! random points, a CA that goes away, a full or read-only disk. Longer
//! runs of the same tests are in scripts/soak.

use std::fs;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::util::{
    FaultyFront, TcpProxy, TestEnv, TinyDisk, assert_nothing_pending_at_ca, ca_authz_statuses,
    ca_certificate, ca_orders, installed, integrity, ledger_authz, ledger_events, parse_leaf,
    wait_for,
};
use certd::ledger::EventKind;

const DAEMON: &str = crate::util::DAEMON_RETRY_4S;

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

/// A front before Pebble that `env`'s config points at, from the first
/// request on (the account's orders-list URL names the host it was
/// created through).
fn front_for(env: &TestEnv) -> FaultyFront {
    let front = FaultyFront::start(&env.pebble);
    let config = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&config.replace(&env.pebble.directory_url(), &front.directory_url()));
    front
}

/// Runs `certd renew` until the front holds a request (Pebble has acted
/// on it, certd waits for the answer), then kills it with SIGKILL.
fn kill_while_held(env: &TestEnv, front: &FaultyFront) {
    let run = env.command().arg("renew").spawn();
    let deadline = Instant::now() + Duration::from_secs(90);
    while front.held() == 0 {
        assert!(Instant::now() < deadline, "no request was held within 90 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    run.signal("KILL");
    let out = run.wait();
    assert_ne!(out.code(), Some(0), "killed: {out}");
}

/// The stored keys of finalized orders (name, mode).
fn order_keys(env: &TestEnv) -> Vec<(String, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(dir) = fs::read_dir(env.state_dir().join("order-keys")) else {
        return Vec::new();
    };
    dir.map(|e| {
        let e = e.expect("directory entry");
        let mode = e.metadata().expect("metadata").permissions().mode() & 0o777;
        (e.file_name().to_string_lossy().into_owned(), mode)
    })
    .collect()
}

const FINALIZE_CERT: &str = r#"
[[certificate]]
name = "z"
domains = ["z.example.test", "www.z.example.test"]
"#;

/// Kills `renew` while the front holds `path` (once `after` passed), then
/// runs it again: the certificate of the finalized order is downloaded
/// and installed, and the CA issued exactly one.
fn killed_after_finalize_issues_once(path: &str, after: Option<&str>) {
    let env = TestEnv::new();
    env.write_config(FINALIZE_CERT);
    let front = front_for(&env);
    front.hold(path, after);
    kill_while_held(&env, &front);
    // At least once: a finalize Pebble refused for its nonce (5 % of
    // requests) was not processed and is sent again. That exactly one
    // certificate came of it is asserted through the CA below.
    assert!(
        front.forwarded("/finalize-order/") >= 1,
        "finalize reached the CA"
    );
    let keys = order_keys(&env);

    env.certd(&["renew"]).assert_success();
    let (_, serial, spki) = installed(&env, "z");
    let orders = ca_orders(&env);
    let valid: Vec<_> = orders.iter().filter(|o| o.status == "valid").collect();
    assert_eq!(valid.len(), 1, "one certificate issued: {orders:#?}");
    assert_eq!(orders.len(), 1, "no second order: {orders:#?}");
    let chain = ca_certificate(
        &env,
        valid[0].certificate.as_deref().expect("certificate URL"),
    );
    use rustls_pki_types::pem::PemObject;
    let leaf = rustls_pki_types::CertificateDer::pem_slice_iter(chain.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM");
    let (_, ca_serial, _, ca_spki) = parse_leaf(&leaf);
    assert_eq!(
        ca_serial, serial,
        "the installed certificate is the order's"
    );
    assert_eq!(ca_spki, spki, "with the key stored before finalize");
    assert_nothing_pending_at_ca(&env);
    assert_eq!(
        keys.len(),
        1,
        "the key was stored before finalize: {keys:?}"
    );
    assert_eq!(keys[0].1, 0o600, "the stored key is 0600");
    assert_eq!(ledger_events(&env, EventKind::OrderResumed), 1);
    assert!(
        order_keys(&env).is_empty(),
        "the stored key is removed once installed"
    );
}

#[test]
fn kill_9_right_after_finalize_downloads_instead_of_issuing_again() {
    killed_after_finalize_issues_once("/finalize-order/", None);
}

/// Pebble 2.4 cannot be made to keep an order `processing` (it finalizes
/// in a goroutine within milliseconds), so "while processing" is certd's
/// view: finalize answered `processing` and certd's poll of the order is
/// held.
#[test]
fn kill_9_while_polling_a_processing_order_downloads_instead_of_issuing_again() {
    killed_after_finalize_issues_once("/my-order/", Some("/finalize-order/"));
}

const ADOPT_CERT: &str = r#"
[[certificate]]
name = "n"
domains = ["n.example.test", "www.n.example.test"]
"#;

/// Kills `renew` once the CA created its order but before certd heard of
/// it: the ledger knows nothing, the CA holds pending authorizations.
/// Returns the front and the authorization URLs of that order.
fn kill_between_new_order_and_ledger(env: &TestEnv) -> (FaultyFront, Vec<String>) {
    let front = front_for(env);
    front.hold("/order-plz", None);
    kill_while_held(env, &front);
    assert!(
        ledger_authz(env).is_empty(),
        "the ledger never saw the order"
    );
    let orders = ca_orders(env);
    assert_eq!(orders.len(), 1, "{orders:#?}");
    assert!(
        orders[0].authz.values().any(|s| s == "pending"),
        "{orders:#?}"
    );
    (front, orders[0].authz.keys().cloned().collect())
}

#[test]
fn kill_9_between_new_order_and_ledger_adopts_and_resumes_the_order() {
    let env = TestEnv::new();
    env.write_config(ADOPT_CERT);
    let (_front, _) = kill_between_new_order_and_ledger(&env);

    env.certd(&["renew"]).assert_success();
    installed(&env, "n");
    assert_nothing_pending_at_ca(&env);
    let orders = ca_orders(&env);
    assert_eq!(orders.len(), 1, "the adopted order was used: {orders:#?}");
    assert_eq!(orders[0].status, "valid", "{orders:#?}");
    assert_eq!(ledger_events(&env, EventKind::OrderAdopted), 1);
    assert_eq!(ledger_events(&env, EventKind::OrderResumed), 1);
}

#[test]
fn kill_9_between_new_order_and_ledger_settles_an_order_nobody_wants() {
    let env = TestEnv::new();
    env.write_config(ADOPT_CERT);
    let (_front, authz) = kill_between_new_order_and_ledger(&env);
    // The certificate is gone from the config before the next start.
    let config = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&config.replace("name = \"n\"", "name = \"other\"").replace(
        "[\"n.example.test\", \"www.n.example.test\"]",
        "[\"other.example.test\"]",
    ));

    let out = env.certd(&["reap", "--older-than", "0s"]);
    out.assert_success();
    assert_nothing_pending_at_ca(&env);
    // Asked one by one: with every authorization deactivated the order is
    // invalid, and Pebble 2.10 leaves invalid orders out of its list.
    let at_ca = ca_authz_statuses(&env, &authz);
    assert_eq!(at_ca.len(), authz.len(), "{at_ca:?}");
    assert!(
        at_ca.values().all(|s| s == "deactivated"),
        "the abandoned order's authorizations: {at_ca:?}"
    );
    assert_eq!(ledger_events(&env, EventKind::OrderAdopted), 1);
    assert_eq!(ledger_events(&env, EventKind::OrderAbandoned), 1);
}
