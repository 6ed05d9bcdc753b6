//! The reaper, the guard and `certd authz deactivate`: no authorization is
//! left pending at the CA, whatever happens, and no CA limit is tripped.
//! Every outcome is checked at the CA itself.

use std::fs;
use std::time::Duration;

use crate::util::{
    Fault, FaultyFront, PebbleOpts, TcpProxy, TestEnv, assert_ca_status,
    assert_nothing_pending_at_ca, ca_authz_objects, ca_authz_statuses, flag, install_hook_wrapper,
    ledger_authz, ledger_authz_urls, ledger_events, validate_outside_certd, wait_for,
};
use certd::ledger::EventKind;

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

/// The ledger's status for authorization `url`.
fn ledger_status(env: &TestEnv, url: &str) -> String {
    ledger_authz(env)
        .iter()
        .find(|a| a["url"] == url)
        .and_then(|a| a["status"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("{url} is not in the ledger"))
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
    assert_eq!(ledger_events(&env, EventKind::OrderResumed), 1);
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
        ledger_events(&env, EventKind::PendingAuthzGuard) >= 1,
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
    assert!(ledger_events(&env, EventKind::HeldBack) >= 1);

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
    assert!(ledger_events(&env, EventKind::ReaperError) >= 1);
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
    assert_eq!(ledger_events(&env, EventKind::CaLimitGuard), 1);
}

#[test]
fn deactivation_the_ca_ignored_is_not_recorded() {
    let env = TestEnv::new();
    env.write_config(ONE_DNS_CERT);
    install_hook_wrapper(&env);
    // Test double, and why: Pebble always deactivates what it is asked to.
    // The front forwards everything to Pebble except the one deactivation
    // it answers with 200 and the authorization as it was, as a server
    // that accepts the request and ignores it does. Pebble never sees that
    // request, so its status is the truth the ledger must match.
    let front = FaultyFront::start(&env.pebble);
    let config = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&config.replace(&env.pebble.directory_url(), &front.directory_url()));
    let pending = kill_mid_order(&env);
    let url = &pending[0];

    front.inject("/authZ/", Fault::IgnoreUpdate, 1);
    let out = env.certd(&["authz", "deactivate", url]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stdout
            .contains("not deactivated: the CA's answer says pending"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("deactivated (was"), "{}", out.stdout);
    assert_ca_status(&env, std::slice::from_ref(url), "pending");
    assert_eq!(ledger_status(&env, url), "pending");
    assert_eq!(ledger_events(&env, EventKind::DeactivateRefused), 1);
    // The ledger spent no failure budget on it: nothing was deactivated.
    let status = env.certd(&["status"]);
    assert!(
        status.stdout.contains("pending authorizations: 2"),
        "{}",
        status.stdout
    );

    // The CA answers honestly again: the same authorization is deactivated.
    let out = env.certd(&["authz", "deactivate", url]);
    out.assert_success();
    assert!(
        out.stdout.contains("deactivated (was pending)"),
        "{}",
        out.stdout
    );
    assert_ca_status(&env, std::slice::from_ref(url), "deactivated");
    assert_eq!(ledger_status(&env, url), "deactivated");
}

#[test]
fn authorization_valid_at_the_ca_is_recorded_and_does_not_hold_the_guard() {
    let env = TestEnv::new();
    env.write_config(&format!("[reaper]\nmax_pending = 1\n{ONE_DNS_CERT}"));
    install_hook_wrapper(&env);
    let pending = kill_mid_order(&env);
    // Deterministically what unequal validation times produce: the CA has
    // validated one name while the ledger, never told, still says pending.
    let (valid, other) = (&pending[0], &pending[1]);
    validate_outside_certd(&env, valid);
    assert_eq!(ledger_status(&env, valid), "pending");

    let out = env.certd(&["reap", "--older-than", "0s"]);
    out.assert_success();
    assert_ca_status(&env, std::slice::from_ref(valid), "valid");
    assert_ca_status(&env, std::slice::from_ref(other), "deactivated");
    assert_eq!(ledger_status(&env, valid), "valid");
    assert_eq!(ledger_status(&env, other), "deactivated");
    let listed = env.certd(&["authz", "list", "--pending", "--json"]);
    listed.assert_success();
    assert_eq!(listed.stdout.trim(), "[]", "{}", listed.stdout);

    // With max_pending = 1 an unrelated certificate is admitted at once:
    // no row counts an authorization the CA has validated as pending.
    let config = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&format!(
        "{config}\n[[certificate]]\nname = \"u\"\ndomains = [\"u.example.test\"]\nchallenges = [\"dns-01\"]\n"
    ));
    let out = env.certd(&["renew", "u"]);
    out.assert_success();
    assert!(env.cert_dir().join("u/cert.pem").exists());
    assert_eq!(
        ledger_events(&env, EventKind::PendingAuthzGuard),
        0,
        "{out}"
    );
}

#[test]
fn unknown_challenge_url_is_fetched_once() {
    // Pebble logs each request's path; with no nonce rejected, a request
    // certd makes shows up exactly once (a `badNonce` retry would not).
    let env = TestEnv::with_pebble_opts(PebbleOpts {
        nonce_reject: Some(0),
        ..PebbleOpts::default()
    });
    env.write_config(ONE_DNS_CERT);
    install_hook_wrapper(&env);
    let pending = kill_mid_order(&env);
    let authz_url = &pending[0];
    let challenge_url = ca_authz_objects(&env, &pending[..1])[authz_url].challenges[0]
        .url
        .clone();
    // The ledger is lost (the account credentials are not): certd knows
    // neither the authorization nor its challenge any more.
    for file in ["certd.db", "certd.db-wal", "certd.db-shm"] {
        let _ = fs::remove_file(env.state_dir().join(file));
    }
    // Pebble logs the path without the id; certd fetches no other
    // challenge, so every `/chalZ/` line is this one.
    let fetched = |env: &TestEnv| env.pebble.pebble_log().matches("POST /chalZ/").count();
    let before = fetched(&env);

    let out = env.certd(&["authz", "deactivate", &challenge_url]);
    // Pebble answers a challenge's POST-as-GET without the `Link: rel="up"`
    // that would name its authorization, so certd cannot resolve it and
    // says so; a CA that sends one gets it deactivated.
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stdout
            .contains(&format!("{challenge_url}: cannot resolve")),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("rel=\"up\""), "{}", out.stdout);
    // Some servers start a validation when a challenge is fetched: once.
    assert_eq!(fetched(&env) - before, 1, "{}", env.pebble.pebble_log());
    assert_ca_status(&env, std::slice::from_ref(authz_url), "pending");
}
