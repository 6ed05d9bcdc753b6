//! Challenge types and CA features beyond the basics: tls-alpn-01, External
//! Account Binding, account key rollover, revocation, key reuse.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use crate::util::{
    PebbleOpts, TestEnv, fetch_authz_as, installed, ledger_authz, ledger_authz_urls,
};

/// Adds lines to the `[acme]` table of the written config.
fn add_to_acme(env: &TestEnv, lines: &str) {
    let config = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&config.replacen("[acme]\n", &format!("[acme]\n{lines}\n"), 1));
}

#[test]
fn tls_alpn01_issues_a_certificate() {
    let env = TestEnv::new();
    env.write_config(&format!(
        r#"
[tls_alpn01]
listen = "127.0.0.1:{}"

[[certificate]]
name = "alpn"
domains = ["alpn.example.test", "www.alpn.example.test"]
challenges = ["tls-alpn-01"]
"#,
        env.pebble.tls_port()
    ));
    env.certd(&["renew"]).assert_success();
    let (names, _, _) = installed(&env, "alpn");
    assert_eq!(names, ["alpn.example.test", "www.alpn.example.test"]);
    let authz = ledger_authz(&env);
    assert!(
        authz
            .iter()
            .all(|a| a["challenge_type"] == "tls-alpn-01" && a["status"] == "valid"),
        "{authz:#?}"
    );
}

const EAB_KID: &str = "kid-1";
const EAB_KEY: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";

#[test]
fn external_account_binding() {
    let env = TestEnv::with_pebble_opts(PebbleOpts {
        eab_keys: vec![(EAB_KID.into(), EAB_KEY.into())],
        ..PebbleOpts::default()
    });
    env.write_config("\n[[certificate]]\nname = \"e\"\ndomains = [\"e.example.test\"]\n");

    // Without a binding the CA refuses the account; nothing is created.
    let out = env.certd(&["renew"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stdout.contains("externalAccountRequired"),
        "{}",
        out.stdout
    );

    // A key file others can read is refused before anything is sent.
    let key_file = env.dir().join("eab.key");
    fs::write(&key_file, EAB_KEY).expect("key file");
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o644)).expect("chmod");
    add_to_acme(
        &env,
        &format!(
            "eab_kid = \"{EAB_KID}\"\neab_hmac_key_file = \"{}\"",
            key_file.display()
        ),
    );
    let out = env.certd(&["check-config"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("acme.eab_hmac_key_file") && out.stderr.contains("chmod 600"),
        "{}",
        out.stderr
    );

    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).expect("chmod");
    env.certd(&["renew"]).assert_success();
    installed(&env, "e");
    let show = env.certd(&["account", "show"]);
    show.assert_success();
    assert!(
        show.stdout.contains("eab kid:     kid-1"),
        "{}",
        show.stdout
    );
    assert!(
        !show.stdout.contains(EAB_KEY),
        "the HMAC key is never printed"
    );
}

#[test]
fn account_key_rollover_then_issuance() {
    let env = TestEnv::new();
    env.write_config("\n[[certificate]]\nname = \"k\"\ndomains = [\"k.example.test\"]\n");
    env.certd(&["renew"]).assert_success();
    let thumbprint = |env: &TestEnv| {
        let out = env.certd(&["account", "show"]);
        out.assert_success();
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix("thumbprint:").map(|t| t.trim().to_owned()))
            .expect("thumbprint line")
    };
    let before = thumbprint(&env);
    let creds = certd::acme::credentials_path(&env.state_dir(), &env.directory_url());
    let old_creds = fs::read(&creds).expect("credentials");

    let out = env.certd(&["account", "rollover"]);
    out.assert_success();
    let after = thumbprint(&env);
    assert_ne!(before, after);
    assert!(out.stdout.contains(&after), "{}", out.stdout);
    assert_ne!(
        fs::read(&creds).expect("credentials"),
        old_creds,
        "new key saved"
    );
    let mode = fs::metadata(&creds)
        .expect("credentials")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // The new key works, the old one no longer does.
    env.certd(&["renew", "--force"]).assert_success();
    let urls = ledger_authz_urls(&ledger_authz(&env));
    assert!(fetch_authz_as(&env, &fs::read(&creds).expect("credentials"), &urls[0]).is_ok());
    let refused = fetch_authz_as(&env, &old_creds, &urls[0]).expect_err("old key refused");
    assert!(
        refused.contains("unauthorized") || refused.contains("malformed"),
        "{refused}"
    );
}

#[test]
fn revocation_is_visible_at_the_ca_and_the_certificate_replaced() {
    let env = TestEnv::new();
    env.write_config("\n[[certificate]]\nname = \"r\"\ndomains = [\"r.example.test\"]\n");
    env.certd(&["renew"]).assert_success();
    let (_, serial, _) = installed(&env, "r");

    let out = env.certd(&["revoke", "r", "--reason", "superseded"]);
    out.assert_success();
    assert!(
        out.stdout.contains(&format!("r: revoked serial {serial}")),
        "{}",
        out.stdout
    );
    let (_, replacement, _) = installed(&env, "r");
    assert_ne!(replacement, serial, "replaced at once");

    let status = cert_status_at_ca(&env, &serial);
    assert!(status.contains("Revoked"), "{status}");
    assert!(cert_status_at_ca(&env, &replacement).contains("Valid"));
}

/// Pebble's management interface reports a certificate's status by serial.
pub(crate) fn cert_status_at_ca(env: &TestEnv, serial: &str) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let http = certd::acme::AcmeHttp::new(
            Some(&env.pebble.ca_bundle()),
            certd::clock::Clock::system(),
        )
        .expect("client");
        http.plain()
            .get(format!(
                "{}/cert-status-by-serial/{serial}",
                env.pebble.management_url()
            ))
            .send()
            .await
            .expect("management request")
            .text()
            .await
            .expect("body")
    })
}

#[test]
fn reuse_key_keeps_the_private_key_across_renewals() {
    let env = TestEnv::new();
    env.write_config(
        r#"
[[certificate]]
name = "pinned"
domains = ["pinned.example.test"]
reuse_key = true

[[certificate]]
name = "fresh"
domains = ["fresh.example.test"]
"#,
    );
    env.certd(&["renew"]).assert_success();
    let (_, pinned_serial, pinned_key) = installed(&env, "pinned");
    let (_, _, fresh_key) = installed(&env, "fresh");
    env.certd(&["renew", "--force"]).assert_success();
    let (_, serial, key) = installed(&env, "pinned");
    assert_ne!(serial, pinned_serial);
    assert_eq!(key, pinned_key, "reuse_key keeps the key");
    assert_ne!(
        installed(&env, "fresh").2,
        fresh_key,
        "a fresh key per issuance by default"
    );
}
