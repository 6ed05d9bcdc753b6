//! `certd run` as systemd runs it: a real daemon process against a real
//! Pebble, driven by file edits and signals.

use std::fs;
use std::time::{Duration, Instant};

use crate::util::{
    AriServer, PebbleOpts, Release, TestEnv, Window, assert_ca_status, cert_table as cert, flag,
    free_port, install_hook_wrapper, ledger_authz, ledger_authz_urls,
};
use certd::ledger::EventKind;

mod in_process;

const DAEMON: &str = crate::util::DAEMON_RETRY_2S;

fn ca_requests(env: &TestEnv) -> usize {
    env.pebble.pebble_log().matches("calling handler").count()
}

#[test]
fn daemon_issues_idles_and_follows_config_edits() {
    let env = TestEnv::new();
    env.write_config(&format!("{DAEMON}{}", cert("one", "one.example.test")));
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_file(
        &env.cert_dir().join("one/cert.pem"),
        Duration::from_secs(60),
    );

    // Idle: no ACME request while nothing is due. The daemon's last
    // request after an install is its ARI question about the new
    // certificate (Pebble 2.10 answers renewalInfo): wait for that, not
    // for a guessed time, which a loaded machine overruns.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !env
        .pebble
        .pebble_log()
        .contains("/renewalInfo/ -> calling handler")
    {
        assert!(
            Instant::now() < deadline,
            "no ARI request after the install:\n{}",
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = ca_requests(&env);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ca_requests(&env), before, "an idle daemon talked to the CA");

    // A certificate added to the file is issued without a restart.
    env.write_config(&format!(
        "{DAEMON}{}{}",
        cert("one", "one.example.test"),
        cert("two", "two.example.test")
    ));
    daemon.wait_for_file(
        &env.cert_dir().join("two/cert.pem"),
        Duration::from_secs(60),
    );

    // A broken edit is logged with its line and the old config keeps running.
    let good = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&good.replace("name = \"two\"", "name = \"two\"\nkeytype = 1"));
    daemon.wait_for_output("keeping the running one", Duration::from_secs(10));
    assert!(
        daemon.stderr().contains("certificate[1].keytype"),
        "{}",
        daemon.stderr()
    );
    assert!(daemon.is_running());

    // Fixed again, with a third certificate: issued.
    env.write_config(&format!(
        "{DAEMON}{}{}{}",
        cert("one", "one.example.test"),
        cert("two", "two.example.test"),
        cert("three", "three.example.test")
    ));
    daemon.wait_for_file(
        &env.cert_dir().join("three/cert.pem"),
        Duration::from_secs(60),
    );
    // SIGHUP re-reads too (nothing changed: nothing happens).
    daemon.signal("HUP");
    daemon.wait_for_output("SIGHUP", Duration::from_secs(10));

    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
    let authz = ledger_authz(&env);
    assert_eq!(authz.len(), 3);
    assert_ca_status(&env, &ledger_authz_urls(&authz), "valid");
}

#[test]
fn sigterm_during_an_order_exits_in_time_with_nothing_pending() {
    let env = TestEnv::new();
    env.write_config(&format!(
        "{DAEMON}\n[[certificate]]\nname = \"t\"\ndomains = [\"t.example.test\", \"u.example.test\"]\nchallenges = [\"dns-01\"]\n"
    ));
    install_hook_wrapper(&env);
    flag(&env, "block", true);
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_file(&env.dir().join("presenting"), Duration::from_secs(30));

    let start = Instant::now();
    let out = daemon.terminate();
    let took = start.elapsed();
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(took < Duration::from_secs(12), "shutdown took {took:?}");
    let authz = ledger_authz(&env);
    assert_eq!(authz.len(), 2, "{authz:#?}");
    assert_ca_status(&env, &ledger_authz_urls(&authz), "deactivated");
}

#[test]
fn sigkill_during_an_order_then_restart_recovers() {
    let env = TestEnv::new();
    env.write_config(&format!(
        "{DAEMON}\n[[certificate]]\nname = \"r\"\ndomains = [\"r.example.test\"]\nchallenges = [\"dns-01\"]\n"
    ));
    install_hook_wrapper(&env);
    flag(&env, "block", true);
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_file(&env.dir().join("presenting"), Duration::from_secs(30));
    daemon.signal("KILL");
    let _ = daemon.wait();
    flag(&env, "block", false);

    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_file(&env.cert_dir().join("r/cert.pem"), Duration::from_secs(60));
    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
    let authz = ledger_authz(&env);
    let pending: Vec<_> = authz.iter().filter(|a| a["status"] == "pending").collect();
    assert!(pending.is_empty(), "{authz:#?}");
    let at_ca = crate::util::ca_authz_statuses(&env, &ledger_authz_urls(&authz));
    assert!(at_ca.values().all(|s| s != "pending"), "{at_ca:?}");
}

#[test]
fn http01_failure_falls_back_to_dns01_and_stays_there() {
    // No authorization reuse, so every order validates afresh.
    let env = TestEnv::without_authz_reuse();
    env.write_config(&format!(
        "{DAEMON}\n[[certificate]]\nname = \"f\"\ndomains = [\"f.example.test\"]\nchallenges = [\"http-01\", \"dns-01\"]\n"
    ));
    // certd's responder listens where the CA does not look: http-01 fails.
    let config = fs::read_to_string(env.config_path()).expect("config");
    let port = env.pebble.http01_port();
    env.write_raw_config(&config.replace(
        &format!("listen = \"127.0.0.1:{port}\""),
        &format!("listen = \"127.0.0.1:{}\"\npreflight = false", free_port()),
    ));
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_file(&env.cert_dir().join("f/cert.pem"), Duration::from_secs(60));
    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");

    // The next order for the name leads with dns-01.
    env.certd(&["renew", "--force"]).assert_success();
    let mut authz = ledger_authz(&env);
    authz.reverse(); // oldest first
    let tried: Vec<(&str, &str)> = authz
        .iter()
        .map(|a| {
            (
                a["challenge_type"].as_str().unwrap_or("-"),
                a["status"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(tried[0], ("http-01", "invalid"), "{tried:?}");
    assert!(
        tried[1..].iter().all(|t| *t == ("dns-01", "valid")),
        "{tried:?}"
    );
    assert!(tried.len() >= 3, "{tried:?}");
}

#[test]
fn failed_preflight_does_not_ask_the_ca_and_keeps_the_authorization() {
    let env = TestEnv::new();
    env.write_config(&format!("{DAEMON}{}", cert("p", "p.example.test")));
    // A webroot no web server serves: the self-check over HTTP fails.
    // It exists (a missing webroot is refused before any order).
    let webroot = env.dir().join("webroot");
    fs::create_dir(&webroot).expect("webroot");
    let config = fs::read_to_string(env.config_path()).expect("config");
    let port = env.pebble.http01_port();
    env.write_raw_config(&config.replace(
        &format!("listen = \"127.0.0.1:{port}\""),
        &format!("webroot = \"{}\"\npreflight = true", webroot.display()),
    ));

    for attempt in 0..2 {
        let out = env.certd(&["renew"]);
        assert_eq!(out.code(), Some(1), "{out}");
        assert!(
            out.stdout.contains("http-01 pre-flight for p.example.test"),
            "{}",
            out.stdout
        );
        // Never answered: pending at the CA, not invalid, no budget spent;
        // the second attempt resumed the same order and authorization.
        let authz = ledger_authz(&env);
        assert_eq!(authz.len(), 1, "attempt {attempt}: {authz:#?}");
        assert_eq!(authz[0]["status"], "pending");
        assert_ca_status(&env, &ledger_authz_urls(&authz), "pending");
    }
    assert_eq!(crate::util::ledger_events(&env, EventKind::OrderResumed), 1);
    // The token file was cleaned up.
    assert_eq!(
        fs::read_dir(webroot.join(".well-known/acme-challenge"))
            .expect("dir")
            .count(),
        0
    );
}

/// Against Pebble 2.4, which has no ARI, through a renewalInfo front (a
/// test double): certd still works with a CA from before ARI, and ignores
/// nothing the front suggests. It also shows that certd takes an order
/// whose CA ignored `replaces`, which only an older CA does.
#[test]
fn ari_window_decides_when_to_renew() {
    let env = TestEnv::with_pebble_opts(PebbleOpts {
        release: Release::Bookworm,
        ..PebbleOpts::default()
    });
    env.write_config(&format!("{DAEMON}{}", cert("ari", "ari.example.test")));
    install_first_certificate(&env);
    let first = crate::util::parse_leaf(
        &crate::util::read_pem_certs(env.cert_dir().join("ari/cert.pem"))[0],
    )
    .1;

    // The CA suggests renewing within seconds (for a five-year certificate
    // the lifetime rule would wait years), without a Retry-After (which
    // must not lose the window), then, for the new certificate, a window a
    // month out.
    let ari = AriServer::start(
        &env.pebble,
        vec![
            Window {
                start: 1,
                end: 2,
                retry_after: 0,
            },
            Window {
                start: 30 * 86_400,
                end: 31 * 86_400,
                retry_after: 21_600,
            },
        ],
    );
    let config = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&config.replace(&env.pebble.directory_url(), &ari.directory_url()));
    // A new directory URL is a new account for certd; that is fine here.
    let daemon = env.command().arg("run").spawn();
    let start = Instant::now();
    loop {
        let serial = crate::util::parse_leaf(
            &crate::util::read_pem_certs(env.cert_dir().join("ari/cert.pem"))[0],
        )
        .1;
        if serial != first {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not renewed in the ARI window: {}",
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The new certificate's window is a month out: that is the next renewal.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ari.asked().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "new certificate's window not asked for"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stderr.contains("ARI renewal window"), "{}", out.stderr);
    // The order named the certificate it replaces; Pebble 2.4 ignores the
    // field, and certd took the order it created anyway.
    assert!(
        out.stderr.contains("the CA ignored `replaces`"),
        "{}",
        out.stderr
    );
    let status: serde_json::Value =
        serde_json::from_str(&env.certd(&["status", "--json"]).stdout).expect("status");
    let next = status[0]["next_renewal_at"].as_str().expect("next renewal");
    let next = time::OffsetDateTime::parse(next, &time::format_description::well_known::Rfc3339)
        .expect("RFC 3339")
        .unix_timestamp();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        (now + 29 * 86_400..now + 32 * 86_400).contains(&next),
        "next renewal {next}, now {now}"
    );
    let asked = ari.asked();
    assert_ne!(
        asked[0], asked[1],
        "each certificate is asked about by its own identifier"
    );
}

/// Issues the configured certificates with a one-shot run.
fn install_first_certificate(env: &TestEnv) {
    env.certd(&["renew"]).assert_success();
}

#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let env = TestEnv::new();
    env.write_config(&format!("{DAEMON}{}", cert("n", "n.example.test")));
    let socket_path = env.dir().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let next = || {
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let daemon = env
        .command()
        .arg("run")
        .env("NOTIFY_SOCKET", &socket_path)
        .spawn();
    assert_eq!(next(), "READY=1");
    daemon.signal("HUP");
    assert_eq!(next(), "RELOADING=1");
    assert_eq!(next(), "READY=1");
    let out = daemon.terminate();
    assert_eq!(next(), "STOPPING=1");
    assert_eq!(out.code(), Some(0), "{out}");
}
