//! The reaper, the guard and `certd authz deactivate`: no authorization is
//! left pending at the CA, whatever happens, and no CA limit is tripped.
//! Every outcome is checked at the CA itself.

use std::fs;
use std::time::Duration;

use crate::util::{
    TcpProxy, TestEnv, assert_ca_status, assert_nothing_pending_at_ca, ca_authz_objects,
    ca_authz_statuses, flag, install_hook_wrapper, ledger_authz, ledger_authz_urls, ledger_events,
    wait_for,
};

/// Starts `certd renew`, waits until it is presenting a challenge (its order
/// and authorizations are in the ledger, nothing is answered), then kills
/// it with SIGKILL. Returns the authorization URLs it left pending.
fn kill_mid_order(env: &TestEnv) -> Vec<String> {
    flag(env, "block", true);
    let _ = fs::remove_file(env.dir().join("presenting"));
    let run = env.command().arg("renew").spawn();
    wait_for(&env.dir().join("presenting"), Duration::from_secs(30));
    run.signal("KILL");
    let _ = run.wait();
    flag(env, "block", false);
    let pending: Vec<String> = ledger_authz(env)
        .iter()
        .filter(|a| a["status"] == "pending")
        .filter_map(|a| a["url"].as_str().map(str::to_owned))
        .collect();
    assert!(
        !pending.is_empty(),
        "write-ahead: the ledger holds the authorizations before any answer"
    );
    let at_ca = ca_authz_statuses(env, &pending);
    assert!(at_ca.values().all(|s| s == "pending"), "{at_ca:?}");
    pending
}

const ONE_DNS_CERT: &str = r#"
[[certificate]]
name = "k"
domains = ["k.example.test", "www.k.example.test"]
challenges = ["dns-01"]
"#;

#[test]
fn killed_run_is_resumed_by_the_next_start() {
    let env = TestEnv::new();
    env.write_config(ONE_DNS_CERT);
    install_hook_wrapper(&env);
    let pending = kill_mid_order(&env);
    assert_eq!(pending.len(), 2);

    // A dry run asks the CA and changes nothing, here or there.
    let dry = env.certd(&["reap", "--older-than", "0s", "--dry-run"]);
    dry.assert_success();
    assert_eq!(
        dry.stdout.matches("would deactivate (is pending)").count(),
        2,
        "{}",
        dry.stdout
    );
    assert!(ledger_authz(&env).iter().all(|a| a["status"] == "pending"));
    assert_ca_status(&env, &pending, "pending");

    // The next start resumes the same order instead of abandoning it.
    let out = env.certd(&["renew"]);
    out.assert_success();
    assert_eq!(ledger_events(&env, "order-resumed"), 1);
    let authz = ledger_authz(&env);
    assert_eq!(authz.len(), 2, "no second order was needed: {authz:#?}");
    assert_ca_status(&env, &ledger_authz_urls(&authz), "valid");
    assert!(env.cert_dir().join("k/cert.pem").exists());
    assert_nothing_pending_at_ca(&env);
}

#[test]
fn reaper_deactivates_what_a_killed_run_left() {
    let env = TestEnv::new();
    env.write_config(ONE_DNS_CERT);
    install_hook_wrapper(&env);
    let pending = kill_mid_order(&env);

    let out = env.certd(&["reap", "--older-than", "0s"]);
    out.assert_success();
    assert_eq!(
        out.stdout.matches("deactivated (was pending)").count(),
        2,
        "{}",
        out.stdout
    );
    assert_ca_status(&env, &pending, "deactivated");
    assert!(
        ledger_authz(&env)
            .iter()
            .all(|a| a["status"] == "deactivated")
    );

    let status = env.certd(&["status"]);
    assert!(
        status.stdout.contains("pending authorizations: 0"),
        "{}",
        status.stdout
    );
    assert!(
        status
            .stdout
            .contains("reaper: deactivated 2 (last 24 h: 2)"),
        "{}",
        status.stdout
    );
    assert_nothing_pending_at_ca(&env);
}

#[test]
fn guard_defers_the_third_order_and_issues_it_later() {
    let env = TestEnv::new();
    env.write_config(
        r#"
[reaper]
max_pending = 2

[[certificate]]
name = "g1"
domains = ["g1.example.test"]
challenges = ["dns-01"]

[[certificate]]
name = "g2"
domains = ["g2.example.test"]
challenges = ["dns-01"]

[[certificate]]
name = "g3"
domains = ["g3.example.test"]
challenges = ["dns-01"]
"#,
    );
    install_hook_wrapper(&env);
    // Slow presentations keep two orders' authorizations pending while
    // the third asks to start.
    flag(&env, "slow", true);
    let out = env.certd(&["renew"]);
    out.assert_success();
    for name in ["g1", "g2", "g3"] {
        assert!(
            env.cert_dir().join(name).join("cert.pem").exists(),
            "{name} issued"
        );
    }
    assert!(
        ledger_events(&env, "pending-authz-guard") >= 1,
        "the guard deferred an order"
    );
    let status = env.certd(&["status"]);
    assert!(
        status
            .stdout
            .contains("pending-authz guard last deferred an order"),
        "{}",
        status.stdout
    );
    assert!(
        status.stdout.contains("pending authorizations: 0"),
        "{}",
        status.stdout
    );
}

#[test]
fn failure_budget_holds_back_the_sixth_deactivation() {
    // No authorization reuse: each attempt gets a fresh pending one.
    let env = TestEnv::without_authz_reuse();
    env.write_config(
        r#"
[[certificate]]
name = "b"
domains = ["b.example.test"]
challenges = ["dns-01"]
"#,
    );
    install_hook_wrapper(&env);
    flag(&env, "fail", true);
    for _ in 0..6 {
        let out = env.certd(&["renew"]);
        assert_eq!(out.code(), Some(1), "{out}");
    }
    let authz = ledger_authz(&env);
    assert_eq!(authz.len(), 6, "{authz:#?}");
    let deactivated = authz
        .iter()
        .filter(|a| a["status"] == "deactivated")
        .count();
    let pending: Vec<String> = authz
        .iter()
        .filter(|a| a["status"] == "pending")
        .filter_map(|a| a["url"].as_str().map(str::to_owned))
        .collect();
    assert_eq!((deactivated, pending.len()), (5, 1), "{authz:#?}");
    assert_eq!(
        ca_authz_statuses(&env, &pending)
            .values()
            .next()
            .map(String::as_str),
        Some("pending")
    );
    assert!(ledger_events(&env, "held-back") >= 1);

    // The reaper respects the same budget.
    let out = env.certd(&["reap", "--older-than", "0s"]);
    out.assert_success();
    assert!(
        out.stdout.contains("held back (5 failed authorizations"),
        "{}",
        out.stdout
    );
    assert_eq!(
        ca_authz_statuses(&env, &pending)
            .values()
            .next()
            .map(String::as_str),
        Some("pending")
    );
    let status = env.certd(&["status"]);
    assert!(
        status.stdout.contains("held back for failure budget: 1"),
        "{}",
        status.stdout
    );
}

#[test]
fn authz_deactivate_takes_a_challenge_url() {
    let env = TestEnv::new();
    env.write_config(ONE_DNS_CERT);
    install_hook_wrapper(&env);
    let pending = kill_mid_order(&env);
    let objects = ca_authz_objects(&env, &pending[..1]);
    let authz_url = &pending[0];
    let challenge_url = &objects[authz_url].challenges[0].url;
    assert_ne!(challenge_url, authz_url);

    let out = env.certd(&["authz", "deactivate", challenge_url]);
    out.assert_success();
    assert!(
        out.stdout.contains(&format!("(authorization {authz_url})")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("deactivated (was pending)"),
        "{}",
        out.stdout
    );
    assert_eq!(
        ca_authz_statuses(&env, &pending[..1])[authz_url],
        "deactivated"
    );

    // A URL nobody knows is a clear error, and the exit status says so.
    let bogus = format!(
        "{}/authZ/no-such-thing",
        env.directory_url().trim_end_matches("/dir")
    );
    let out = env.certd(&["authz", "deactivate", &bogus]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stdout.contains(&format!("{bogus}: cannot resolve")),
        "{}",
        out.stdout
    );

    // --all-pending takes care of the rest.
    let out = env.certd(&["authz", "deactivate", "--all-pending"]);
    out.assert_success();
    assert_ca_status(&env, &pending, "deactivated");
    assert_nothing_pending_at_ca(&env);
}

#[test]
fn reaper_pass_during_a_ca_outage_fails_and_later_succeeds() {
    let env = TestEnv::new();
    env.write_config(ONE_DNS_CERT);
    let proxy = TcpProxy::for_pebble(&env);
    proxy.route(&env);
    install_hook_wrapper(&env);
    let pending = kill_mid_order(&env);

    proxy.set_up(false);
    let out = env.certd(&["reap", "--older-than", "0s"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("reaper pass failed"), "{}", out.stderr);
    assert!(ledger_events(&env, "reaper-error") >= 1);
    let status = env.certd(&["status"]);
    assert!(status.stdout.contains("failed: "), "{}", status.stdout);

    proxy.set_up(true);
    let out = env.certd(&["reap", "--older-than", "0s"]);
    out.assert_success();
    assert_ca_status(&env, &pending, "deactivated");
    assert_nothing_pending_at_ca(&env);
}

#[test]
fn valid_authorizations_can_be_deactivated_after_issue() {
    let env = TestEnv::new();
    env.write_config(
        r#"
[reaper]
deactivate_valid_after_issue = true

[[certificate]]
name = "v"
domains = ["v.example.test"]
"#,
    );
    env.certd(&["renew"]).assert_success();
    let authz = ledger_authz(&env);
    assert_eq!(authz.len(), 1);
    assert_eq!(authz[0]["status"], "deactivated");
    assert_ca_status(&env, &ledger_authz_urls(&authz), "deactivated");
    // Free at the CA, so it spends no failure budget: nothing is held back
    // and the reaper did not do it.
    let status = env.certd(&["status"]);
    assert!(
        status
            .stdout
            .contains("reaper: deactivated 0 (last 24 h: 0), held back for failure budget: 0"),
        "{}",
        status.stdout
    );
}

#[test]
fn ledger_keeps_certd_under_the_duplicate_certificate_limit() {
    let env = TestEnv::new();
    env.write_config(
        r#"
[reaper]
duplicate_certificates_per_week = 2

[[certificate]]
name = "dup"
domains = ["dup.example.test"]
"#,
    );
    env.certd(&["renew"]).assert_success();
    env.certd(&["renew", "--force"]).assert_success();
    let new_orders = |env: &TestEnv| env.pebble.pebble_log().matches("/order-plz").count();
    let before = new_orders(&env);
    let out = env.certd(&["renew", "--force"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stdout
            .contains("certificates for these names in a week: 2 in the window (limit 2)"),
        "{}",
        out.stdout
    );
    assert_eq!(new_orders(&env), before, "no newOrder was sent");
    assert_eq!(ledger_events(&env, "ca-limit-guard"), 1);
}
