//! End-to-end issuance against a real Pebble: certificates are parsed, the
//! ledger is read, and the CA is asked what became of every authorization.

use std::fs;

use serde_json::Value;

use crate::util::{
    TestEnv, assert_installed, ca_authz_statuses, free_port, ledger_authz, ledger_authz_urls,
};

fn status_json(env: &TestEnv) -> Vec<Value> {
    let out = env.certd(&["status", "--json"]);
    out.assert_success();
    serde_json::from_str(&out.stdout).expect("status JSON")
}

/// Counts Pebble's request log lines: one per ACME request it handled.
fn ca_requests(env: &TestEnv) -> usize {
    env.pebble.pebble_log().matches("calling handler").count()
}

#[test]
fn one_and_three_names_are_issued_installed_and_not_renewed_twice() {
    let env = TestEnv::new();
    env.write_config(
        r#"
[[certificate]]
name = "single"
domains = ["single.example.test"]
reload = ["touch \"$CERTD_CERT_DIR/reloaded\""]

[[certificate]]
name = "multi"
domains = ["a.example.test", "b.example.test", "c.example.test"]
key_type = "ecdsa-p384"
"#,
    );
    let out = env.certd(&["renew"]);
    out.assert_success();

    let single = assert_installed(&env, "single", &["single.example.test"]);
    let multi = assert_installed(
        &env,
        "multi",
        &["a.example.test", "b.example.test", "c.example.test"],
    );
    assert!(
        env.cert_dir().join("single/reloaded").exists(),
        "reload command ran"
    );

    // status --json: exactly the documented keys, with the installed facts.
    let status = status_json(&env);
    assert_eq!(status.len(), 2);
    let keys = [
        "ari_checked_at",
        "ari_error",
        "ari_explanation_url",
        "ari_next_check",
        "ari_window_end",
        "ari_window_start",
        "domains",
        "issuer_ca",
        "last_attempt_at",
        "last_error",
        "last_result",
        "name",
        "next_ca",
        "next_renewal_at",
        "not_after",
        "pending_authz",
        "profile",
        "profile_warning",
        "serial",
    ];
    for row in &status {
        let mut got: Vec<&str> = row
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        got.sort_unstable();
        assert_eq!(got, keys);
        assert_eq!(row["last_result"], "ok");
        assert_eq!(row["last_error"], Value::Null);
        assert_eq!(row["pending_authz"], 0);
        // One CA, `[acme]`: it is the CA named `default`.
        assert_eq!(row["issuer_ca"], "default");
        assert_eq!(row["next_ca"], "default");
        assert!(row["not_after"].is_string() && row["next_renewal_at"].is_string());
    }
    let by_name = |n: &str| status.iter().find(|r| r["name"] == n).expect("row");
    assert_eq!(by_name("single")["serial"], single.as_str());
    assert_eq!(by_name("multi")["serial"], multi.as_str());
    assert_eq!(
        by_name("multi")["domains"],
        serde_json::json!(["a.example.test", "b.example.test", "c.example.test"])
    );

    // Every authorization in the ledger is final, and the CA agrees.
    let authz = ledger_authz(&env);
    assert_eq!(authz.len(), 4, "one authorization per name: {authz:#?}");
    for a in &authz {
        assert_eq!(a["status"], "valid", "{a}");
        assert_eq!(a["challenge_type"], "http-01");
    }
    let at_ca = ca_authz_statuses(&env, &ledger_authz_urls(&authz));
    assert_eq!(at_ca.len(), 4);
    assert!(at_ca.values().all(|s| s == "valid"), "{at_ca:?}");

    // Nothing is due. The second run asks the CA only for each
    // certificate's ARI window (RFC 9773): the directory once and
    // renewalInfo per certificate, no order, nothing signed.
    let log_before = env.pebble.pebble_log().len();
    let again = env.certd(&["renew"]);
    again.assert_success();
    assert!(again.stdout.contains("not due until"), "{}", again.stdout);
    let log = env.pebble.pebble_log();
    let asked: Vec<&str> = log[log_before..]
        .lines()
        .filter(|l| l.contains("calling handler"))
        .collect();
    let ari = asked
        .iter()
        .filter(|l| l.contains("GET /draft-ietf-acme-ari-03/renewalInfo/"))
        .count();
    let directory = asked.iter().filter(|l| l.contains("GET /dir ")).count();
    assert_eq!((ari, directory, asked.len()), (2, 1, 3), "{asked:#?}");
    // The CA's answers hold until their re-check time: a third run makes
    // no request at all.
    let before = ca_requests(&env);
    let again = env.certd(&["renew"]);
    again.assert_success();
    assert!(again.stdout.contains("not due until"), "{}", again.stdout);
    assert_eq!(ca_requests(&env), before, "third renew talked to the CA");

    // --force renews one named certificate, and only that one.
    env.certd(&["renew", "--force", "single"]).assert_success();
    let renewed = assert_installed(&env, "single", &["single.example.test"]);
    assert_ne!(renewed, single, "a new serial after --force");
    assert_eq!(
        assert_installed(
            &env,
            "multi",
            &["a.example.test", "b.example.test", "c.example.test"]
        ),
        multi
    );
}

#[test]
fn dns01_through_a_hook_script() {
    let env = TestEnv::new();
    env.write_config(
        r#"
[[certificate]]
name = "dns"
domains = ["dns.example.test", "www.dns.example.test"]
challenges = ["dns-01"]
key_type = "rsa-2048"
"#,
    );
    env.certd(&["renew"]).assert_success();
    assert_installed(&env, "dns", &["dns.example.test", "www.dns.example.test"]);

    let authz = ledger_authz(&env);
    assert_eq!(authz.len(), 2);
    assert!(
        authz
            .iter()
            .all(|a| a["challenge_type"] == "dns-01" && a["status"] == "valid"),
        "{authz:#?}"
    );
    let log = env.dns_hook_log();
    for record in [
        "_acme-challenge.dns.example.test",
        "_acme-challenge.www.dns.example.test",
    ] {
        assert!(log.contains(&format!("present {record} ")), "{log}");
        assert!(log.contains(&format!("cleanup {record} ")), "{log}");
    }
}

#[test]
fn failed_http01_validation_leaves_nothing_pending() {
    let env = TestEnv::new();
    env.write_config(
        r#"
[[certificate]]
name = "broken"
domains = ["x.example.test", "y.example.test"]
"#,
    );
    // certd's responder listens elsewhere, so the CA's validation request to
    // its http-01 port finds nothing listening.
    let config = fs::read_to_string(env.config_path()).expect("config");
    let port = env.pebble.http01_port();
    let config = config.replace(
        &format!("127.0.0.1:{port}"),
        &format!("127.0.0.1:{}", free_port()),
    );
    env.write_raw_config(&config);

    let out = env.certd(&["renew"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stdout.contains("broken: failed"), "{}", out.stdout);
    assert!(out.stdout.contains("validation failed"), "{}", out.stdout);
    assert!(!env.cert_dir().join("broken/cert.pem").exists());

    let status = status_json(&env);
    assert_eq!(status[0]["last_result"], "error");
    assert!(
        status[0]["last_error"]
            .as_str()
            .expect("error text")
            .contains("connection"),
        "{status:?}"
    );
    assert_eq!(status[0]["pending_authz"], 0);

    let authz = ledger_authz(&env);
    assert_eq!(authz.len(), 2);
    let at_ca = ca_authz_statuses(&env, &ledger_authz_urls(&authz));
    assert_eq!(at_ca.len(), 2);
    assert!(
        at_ca.values().all(|s| s != "pending"),
        "left pending at the CA: {at_ca:?}"
    );
    for a in &authz {
        assert_eq!(
            Some(a["status"].as_str().expect("status")),
            at_ca
                .get(a["url"].as_str().expect("url"))
                .map(String::as_str)
        );
    }
}

#[test]
fn failed_presentation_deactivates_the_pending_authorizations() {
    let env = TestEnv::new();
    env.write_config(
        r#"
[[certificate]]
name = "nodns"
domains = ["p.example.test", "q.example.test"]
challenges = ["dns-01"]
"#,
    );
    // A hook that cannot reach its DNS provider: no challenge is ever
    // answered, so both authorizations would stay pending at the CA.
    fs::write(
        env.dns_hook_path(),
        "#!/bin/sh\necho 'provider API unreachable' >&2\nexit 1\n",
    )
    .expect("hook");

    let out = env.certd(&["renew"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stdout.contains("provider API unreachable"),
        "{}",
        out.stdout
    );

    let authz = ledger_authz(&env);
    assert_eq!(authz.len(), 2, "{authz:#?}");
    assert!(
        authz.iter().all(|a| a["status"] == "deactivated"),
        "{authz:#?}"
    );
    let at_ca = ca_authz_statuses(&env, &ledger_authz_urls(&authz));
    assert_eq!(at_ca.len(), 2);
    assert!(at_ca.values().all(|s| s == "deactivated"), "{at_ca:?}");
    assert!(
        env.certd(&["authz", "list", "--pending"])
            .stdout
            .lines()
            .count()
            <= 1
    );
}

#[test]
fn nonce_storm_still_issues_everything_and_leaves_nothing_pending() {
    // Pebble rejects half of all good nonces as badNonce.
    let env = TestEnv::with_pebble_opts(crate::util::PebbleOpts {
        nonce_reject: Some(50),
        ..crate::util::PebbleOpts::default()
    });
    let certs: String = (0..5)
        .map(|i| format!("\n[[certificate]]\nname = \"s{i}\"\ndomains = [\"s{i}.example.test\", \"www.s{i}.example.test\"]\n"))
        .collect();
    env.write_config(&certs);
    let out = env.certd(&["renew"]);
    out.assert_success();
    for i in 0..5 {
        assert_installed(
            &env,
            &format!("s{i}"),
            &[
                &format!("s{i}.example.test"),
                &format!("www.s{i}.example.test"),
            ],
        );
    }
    let authz = ledger_authz(&env);
    assert!(authz.iter().all(|a| a["status"] == "valid"), "{authz:#?}");
    let at_ca = ca_authz_statuses(&env, &ledger_authz_urls(&authz));
    assert!(at_ca.values().all(|s| s == "valid"), "{at_ca:?}");
}
