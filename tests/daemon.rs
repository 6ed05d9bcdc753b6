//! `certd run` as systemd runs it: a real daemon process against a real
//! Pebble, driven by file edits and signals.

use std::fs;
use std::time::{Duration, Instant};

use crate::util::{
    TestEnv, assert_ca_status, flag, free_port, install_hook_wrapper, ledger_authz,
    ledger_authz_urls, wait_for,
};

/// Fast retries so failure paths finish within a test.
const DAEMON: &str = r#"
[daemon]
backoff_min = "1s"
backoff_max = "2s"
shutdown_grace = "10s"
"#;

fn ca_requests(env: &TestEnv) -> usize {
    env.pebble.pebble_log().matches("calling handler").count()
}

fn wait_installed(env: &TestEnv, name: &str) {
    wait_for(&env.cert_dir().join(name).join("cert.pem"), Duration::from_secs(60));
}

fn cert(name: &str, domain: &str) -> String {
    format!("\n[[certificate]]\nname = \"{name}\"\ndomains = [\"{domain}\"]\n")
}

#[test]
fn daemon_issues_idles_and_follows_config_edits() {
    let env = TestEnv::new();
    env.write_config(&format!("{DAEMON}{}", cert("one", "one.example.test")));
    let mut daemon = env.command().arg("run").spawn();
    wait_installed(&env, "one");

    // Idle: no ACME request while nothing is due.
    daemon.wait_for_output("scheduled", Duration::from_secs(10));
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
    wait_installed(&env, "two");

    // A broken edit is logged with its line and the old config keeps running.
    let good = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&good.replace("name = \"two\"", "name = \"two\"\nkeytype = 1"));
    daemon.wait_for_output("keeping the running one", Duration::from_secs(10));
    assert!(daemon.stderr().contains("certificate[1].keytype"), "{}", daemon.stderr());
    assert!(daemon.is_running());

    // Fixed again, with a third certificate: issued.
    env.write_config(&format!(
        "{DAEMON}{}{}{}",
        cert("one", "one.example.test"),
        cert("two", "two.example.test"),
        cert("three", "three.example.test")
    ));
    wait_installed(&env, "three");
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
    let daemon = env.command().arg("run").spawn();
    wait_for(&env.dir().join("presenting"), Duration::from_secs(30));

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
    let daemon = env.command().arg("run").spawn();
    wait_for(&env.dir().join("presenting"), Duration::from_secs(30));
    daemon.signal("KILL");
    let _ = daemon.wait();
    flag(&env, "block", false);

    let daemon = env.command().arg("run").spawn();
    wait_installed(&env, "r");
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
    let env = TestEnv::new();
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
    let daemon = env.command().arg("run").spawn();
    wait_installed(&env, "f");
    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");

    // The next order for the name leads with dns-01.
    env.certd(&["renew", "--force"]).assert_success();
    let mut authz = ledger_authz(&env);
    authz.reverse(); // oldest first
    let tried: Vec<(&str, &str)> = authz
        .iter()
        .map(|a| (a["challenge_type"].as_str().unwrap_or("-"), a["status"].as_str().unwrap_or("-")))
        .collect();
    assert_eq!(tried[0], ("http-01", "invalid"), "{tried:?}");
    assert!(tried[1..].iter().all(|t| *t == ("dns-01", "valid")), "{tried:?}");
    assert!(tried.len() >= 3, "{tried:?}");
}
