//! dns-persist-01 end to end on Pebble 2.10: the operator publishes the one
//! record `certd dns-persist show` prints (here in challtestsrv, which
//! Pebble resolves through), and certd issues with no DNS write of its
//! own. Before the record is right, certd never asks the CA to validate.

use crate::util::{TestEnv, assert_ca_status, assert_installed, ledger_authz, ledger_authz_urls};

const CERTS: &str = r#"
[[certificate]]
name = "persist"
domains = ["persist.example.test", "*.persist.example.test"]
challenges = ["dns-persist-01"]
"#;

const RECORD: &str = "_validation-persist.persist.example.test";

#[test]
fn dns_persist_issues_once_the_shown_record_is_published() {
    let env = TestEnv::new();
    // [dns01] only says where to look (challtestsrv) and how long; its
    // hook must never run for dns-persist-01.
    env.write_config_with_dns01(
        &format!(
            "[dns01]\nhook = \"{hook}\"\nnameservers = [\"{dns}\"]\npropagation_timeout = \"3s\"\n",
            hook = env.dns_hook_path().display(),
            dns = env.pebble.dns_addr(),
        ),
        CERTS,
    );

    // No record yet: the check fails, naming the record and the value to
    // publish; the CA was not asked (both authorizations stay pending).
    let out = env.certd(&["renew"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stdout
            .contains(&format!("dns-persist-01 record {RECORD}"))
            && out.stdout.contains("accounturi=")
            && out.stdout.contains("no TXT record"),
        "{}",
        out.stdout
    );
    let authz = ledger_authz(&env);
    assert_eq!(authz.len(), 2, "{authz:#?}");
    assert_ca_status(&env, &ledger_authz_urls(&authz), "pending");

    // The record to publish: one for the name and its wildcard.
    let show = env.certd(&["dns-persist", "show", "persist"]);
    show.assert_success();
    let lines: Vec<&str> = show.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", show.stdout);
    let prefix = format!("{RECORD}. IN TXT \"");
    let value = lines[0]
        .strip_prefix(&prefix)
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or_else(|| panic!("{}", show.stdout));
    let account = account_url(&env);
    assert_eq!(
        value,
        format!("pebble.letsencrypt.org; accounturi={account}; policy=wildcard")
    );

    // Another account's record is refused by certd, not by the CA.
    set_txt(
        &env,
        &value.replace(&account, "https://elsewhere.example/acct/1"),
    );
    let out = env.certd(&["renew"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stdout.contains("accounturi is"), "{}", out.stdout);
    assert_ca_status(&env, &ledger_authz_urls(&ledger_authz(&env)), "pending");

    // The record as shown: issued, through dns-persist-01, no hook run.
    clear_txt(&env);
    set_txt(&env, value);
    env.certd(&["renew"]).assert_success();
    assert_installed(
        &env,
        "persist",
        &["persist.example.test", "*.persist.example.test"],
    );
    let authz = ledger_authz(&env);
    assert!(
        authz
            .iter()
            .all(|a| a["challenge_type"] == "dns-persist-01" && a["status"] == "valid"),
        "{authz:#?}"
    );
    assert_ca_status(&env, &ledger_authz_urls(&authz), "valid");
    assert_eq!(env.dns_hook_log(), "", "the dns-01 hook ran");
}

#[test]
fn dns_persist_offered_alongside_does_not_disturb_dns01() {
    // Pebble 2.10 offers dns-persist-01 (no token) in every authorization;
    // a certificate that prefers dns-01 gets it.
    let env = TestEnv::new();
    env.write_config(
        r#"
[[certificate]]
name = "plain"
domains = ["plain.example.test"]
challenges = ["dns-01", "dns-persist-01"]
"#,
    );
    env.certd(&["renew"]).assert_success();
    assert_installed(&env, "plain", &["plain.example.test"]);
    let authz = ledger_authz(&env);
    assert_eq!(authz[0]["challenge_type"], "dns-01", "{authz:#?}");
}

fn account_url(env: &TestEnv) -> String {
    let out = env.certd(&["account", "show"]);
    out.assert_success();
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("account:"))
        .map_or_else(|| panic!("{}", out.stdout), |u| u.trim().to_owned())
}

fn set_txt(env: &TestEnv, value: &str) {
    challtestsrv(
        env,
        "set-txt",
        &serde_json::json!({ "host": format!("{RECORD}."), "value": value }),
    );
}

fn clear_txt(env: &TestEnv) {
    challtestsrv(
        env,
        "clear-txt",
        &serde_json::json!({ "host": format!("{RECORD}.") }),
    );
}

/// A POST to challtestsrv's management API; panics unless it succeeds.
fn challtestsrv(env: &TestEnv, path: &str, body: &serde_json::Value) {
    let out = std::process::Command::new("curl")
        .args(["-fsS", "--max-time", "10", "-X", "POST", "-d"])
        .arg(body.to_string())
        .arg(format!("{}/{path}", env.pebble.challtestsrv_url()))
        .output()
        .expect("run curl");
    assert!(out.status.success(), "{path}: {out:?}");
}
