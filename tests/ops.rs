//! What an operator watches: `status --check`, metrics, notifications.

use std::fs;
use std::time::Duration;

use crate::util::{TestEnv, flag, free_port, install_hook_wrapper};

#[test]
fn status_check_exit_codes_follow_certificate_health() {
    // No authorization reuse: a forced renewal must validate again. Pebble
    // still reuses 1 % of the time at PEBBLE_AUTHZREUSE=0 (its check is
    // `rand.Intn(100) > percent`), so certd also deactivates the valid
    // authorizations after each install: none is left to reuse.
    let env = TestEnv::without_authz_reuse();
    env.write_config(
        r#"
[reaper]
deactivate_valid_after_issue = true

[[certificate]]
name = "ok"
domains = ["ok.example.test"]

[[certificate]]
name = "broken"
domains = ["broken.example.test"]
challenges = ["dns-01"]
"#,
    );
    install_hook_wrapper(&env);

    // Nothing issued yet: critical.
    let out = env.certd(&["status", "--check"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stdout.starts_with("CERTD CRITICAL: "), "{}", out.stdout);

    // One issued, one failing without a certificate: still critical, and
    // the line names the broken one.
    flag(&env, "fail", true);
    assert_eq!(env.certd(&["renew"]).code(), Some(1));
    let out = env.certd(&["status", "--check"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stdout.contains("broken has no certificate: "),
        "{}",
        out.stdout
    );
    assert!(
        !out.stdout.contains("ok has no certificate"),
        "{}",
        out.stdout
    );

    // Both valid: OK.
    flag(&env, "fail", false);
    env.certd(&["renew"]).assert_success();
    let out = env.certd(&["status", "--check"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(out.stdout.trim(), "CERTD OK: 2 certificate(s) valid");

    // A later failure outside the renewal window is a warning, not an outage.
    flag(&env, "fail", true);
    assert_eq!(env.certd(&["renew", "--force", "broken"]).code(), Some(1));
    let out = env.certd(&["status", "--check"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stdout
            .starts_with("CERTD WARNING: broken: last attempt failed"),
        "{}",
        out.stdout
    );
}

#[test]
fn notify_command_hears_repeated_failures_and_the_recovery() {
    let env = TestEnv::new();
    let log = env.dir().join("notify.log");
    env.write_config(&format!(
        r#"
[notify]
command = "echo \"$CERTD_EVENT $CERTD_NAME $CERTD_FAILURES $CERTD_DOMAINS\" >> {}"
after_failures = 2

[[certificate]]
name = "n"
domains = ["n.example.test"]
challenges = ["dns-01"]
"#,
        log.display()
    ));
    install_hook_wrapper(&env);
    flag(&env, "fail", true);
    assert_eq!(env.certd(&["renew"]).code(), Some(1));
    assert!(!log.exists(), "one failure is not worth a page");
    assert_eq!(env.certd(&["renew"]).code(), Some(1));
    assert_eq!(
        fs::read_to_string(&log).expect("log"),
        "renewal-failed n 2 n.example.test\n"
    );
    flag(&env, "fail", false);
    env.certd(&["renew"]).assert_success();
    assert_eq!(
        fs::read_to_string(&log).expect("log"),
        "renewal-failed n 2 n.example.test\nrenewal-recovered n 2 n.example.test\n"
    );
}

#[test]
fn metrics_endpoint_serves_prometheus_text() {
    let env = TestEnv::new();
    let port = free_port();
    env.write_config(&format!(
        "\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n[[certificate]]\nname = \"m\"\ndomains = [\"m.example.test\"]\n"
    ));
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_file(&env.cert_dir().join("m/cert.pem"), Duration::from_secs(60));
    let fetch = || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let http =
                certd::acme::AcmeHttp::new(None, certd::clock::Clock::system()).expect("client");
            http.plain()
                .get(format!("http://127.0.0.1:{port}/metrics"))
                .send()
                .await
                .expect("GET /metrics")
                .text()
                .await
                .expect("body")
        })
    };
    // The ledger write after install may trail the file by a moment.
    let mut body = fetch();
    for _ in 0..50 {
        if body.contains("certd_certificate_expiry_timestamp_seconds{name=\"m\"}") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        body = fetch();
    }
    for needle in [
        "# TYPE certd_certificate_expiry_timestamp_seconds gauge",
        "certd_certificate_expiry_timestamp_seconds{name=\"m\"} ",
        "certd_certificate_consecutive_failures{name=\"m\"} 0",
        "certd_pending_authorizations{account=\"",
        "certd_reaper_deactivations_total{account=\"",
        "certd_acme_requests_total{endpoint=\"newOrder\",outcome=\"201\"} 1",
        "certd_acme_requests_total{endpoint=\"finalize\",outcome=\"200\"} 1",
    ] {
        assert!(body.contains(needle), "missing {needle:?} in\n{body}");
    }
    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
}
