//! dns-01 end to end: dynamic update (RFC 2136, TSIG) into a real BIND 9
//! that Pebble resolves through, and the propagation check that runs
//! before the CA is asked, in hook mode against challtestsrv.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use base64::Engine;
use base64::prelude::BASE64_STANDARD;

use crate::util::{
    Bind, PebbleOpts, TestEnv, assert_ca_status, assert_installed, ledger_authz, ledger_authz_urls,
    ledger_events,
};
use certd::ledger::EventKind;

/// A BIND, a Pebble resolving through it, and a 0600 secret file holding
/// `secret` (BIND's own unless a test wants a wrong one).
fn rfc2136_env(secret: Option<&str>) -> (Bind, TestEnv) {
    let bind = Bind::start();
    let env = TestEnv::with_pebble_opts(PebbleOpts {
        dns_server: Some(bind.addr()),
        ..PebbleOpts::default()
    });
    write_secret(&env, secret.unwrap_or(bind.secret()));
    (bind, env)
}

/// Like `rfc2136_env`, with Pebble asking a resolving BIND in front of the
/// authoritative one, as a CA does: only a resolver follows a CNAME into
/// another zone. The resolver is returned to live as long as the test.
fn rfc2136_resolved_env() -> (Bind, Bind, TestEnv) {
    let bind = Bind::start();
    let resolver = Bind::resolver(&bind);
    let env = TestEnv::with_pebble_opts(PebbleOpts {
        dns_server: Some(resolver.addr()),
        // Every order validates afresh, through the records under test.
        authz_reuse: Some(0),
        ..PebbleOpts::default()
    });
    write_secret(&env, bind.secret());
    (bind, resolver, env)
}

fn write_secret(env: &TestEnv, secret: &str) {
    let path = env.dir().join("tsig.key");
    fs::write(&path, format!("{secret}\n")).expect("write secret");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod secret");
}

/// The `[dns01]` tables for `bind`; `zone` is extra `[dns01.rfc2136]` TOML.
fn rfc2136_toml(bind: &Bind, env: &TestEnv, zone: &str) -> String {
    format!(
        r#"[dns01]
# BIND is the zone's only server; its NS record names port 53.
nameservers = ["{addr}"]
propagation_timeout = "20s"

[dns01.rfc2136]
server = "{addr}"
{zone}
key_name = "{key}"
algorithm = "hmac-sha256"
secret_file = "{secret}"
"#,
        addr = bind.addr(),
        key = Bind::KEY_NAME,
        secret = env.dir().join("tsig.key").display(),
    )
}

fn assert_all_valid_dns01(env: &TestEnv, count: usize) {
    let authz = ledger_authz(env);
    assert_eq!(authz.len(), count, "{authz:#?}");
    assert!(
        authz
            .iter()
            .all(|a| a["challenge_type"] == "dns-01" && a["status"] == "valid"),
        "{authz:#?}"
    );
    assert_ca_status(env, &ledger_authz_urls(&authz), "valid");
}

#[test]
fn rfc2136_issues_a_certificate_and_removes_its_record() {
    let (bind, env) = rfc2136_env(None);
    // No zone configured: certd finds it through the server's SOA.
    env.write_config_with_dns01(
        &rfc2136_toml(&bind, &env, ""),
        r#"
[[certificate]]
name = "rfc"
domains = ["rfc.example.test"]
challenges = ["dns-01"]
"#,
    );
    env.certd(&["renew"]).assert_success();
    assert_installed(&env, "rfc", &["rfc.example.test"]);
    assert_all_valid_dns01(&env, 1);

    let log = bind.log();
    assert!(
        log.contains("adding an RR at '_acme-challenge.rfc.example.test' TXT"),
        "{log}"
    );
    assert!(
        bind.txt("_acme-challenge.rfc.example.test").is_empty(),
        "record left behind"
    );
    // The check-config and status paths never print the secret.
    let check = env.certd(&["check-config"]);
    check.assert_success();
    assert!(!format!("{check:?}").contains(bind.secret()));
}

#[test]
fn rfc2136_wildcard_and_base_share_one_record_name() {
    let (bind, env) = rfc2136_env(None);
    env.write_config_with_dns01(
        &rfc2136_toml(&bind, &env, "zone = \"example.test\""),
        r#"
[[certificate]]
name = "wild"
domains = ["*.w.example.test", "w.example.test"]
challenges = ["dns-01"]
"#,
    );
    env.certd(&["renew"]).assert_success();
    assert_installed(&env, "wild", &["*.w.example.test", "w.example.test"]);
    assert_all_valid_dns01(&env, 2);

    // Two values were added under the one name (so both were there when
    // the CA looked), and each was deleted by its value, never the RRset.
    let log = bind.log();
    let added = "adding an RR at '_acme-challenge.w.example.test' TXT";
    assert_eq!(log.matches(added).count(), 2, "{log}");
    let deleted = "deleting an RR at _acme-challenge.w.example.test TXT";
    assert_eq!(log.matches(deleted).count(), 2, "{log}");
    assert!(!log.contains("deleting rrset"), "{log}");
    assert!(bind.txt("_acme-challenge.w.example.test").is_empty());
}

#[test]
fn rfc2136_wrong_secret_fails_clearly_and_leaves_nothing_pending() {
    let wrong = BASE64_STANDARD.encode([7u8; 32]);
    let (bind, env) = rfc2136_env(Some(&wrong));
    env.write_config_with_dns01(
        &rfc2136_toml(&bind, &env, "zone = \"example.test\""),
        r#"
[[certificate]]
name = "bad"
domains = ["bad.example.test"]
challenges = ["dns-01"]
"#,
    );
    let out = env.certd(&["renew"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    for needle in [
        "BADSIG",
        "secret does not match",
        "_acme-challenge.bad.example.test",
        "zone example.test",
        &bind.addr().to_string(),
    ] {
        assert!(
            out.stdout.contains(needle),
            "{needle:?} not in {}",
            out.stdout
        );
    }
    assert!(!format!("{out:?}").contains(&wrong), "secret printed");
    assert!(!env.cert_dir().join("bad/cert.pem").exists());

    // Nothing was answered; the authorization was deactivated, not left
    // pending.
    let authz = ledger_authz(&env);
    assert_eq!(authz.len(), 1, "{authz:#?}");
    assert_eq!(authz[0]["status"], "deactivated", "{authz:#?}");
    assert_ca_status(&env, &ledger_authz_urls(&authz), "deactivated");
}

#[test]
fn propagation_check_waits_for_the_hook_record_and_keeps_the_authorization() {
    let env = TestEnv::new();
    let dns01 = format!(
        "[dns01]\nhook = \"{hook}\"\nnameservers = [\"{dns}\"]\npropagation_timeout = \"2s\"\n",
        hook = env.dns_hook_path().display(),
        dns = env.pebble.dns_addr(),
    );
    env.write_config_with_dns01(
        &dns01,
        r#"
[[certificate]]
name = "slow"
domains = ["slow.example.test"]
challenges = ["dns-01"]
"#,
    );
    // A provider that accepts the change but does not publish it (yet):
    // while `unpublished` exists, present succeeds without touching DNS.
    let real = env.dir().join("real-hook.sh");
    fs::rename(env.dns_hook_path(), &real).expect("move hook");
    let flag = env.dir().join("unpublished");
    fs::write(
        env.dns_hook_path(),
        format!(
            "#!/bin/sh\nif [ \"$1\" = present ] && [ -e '{}' ]; then exit 0; fi\nexec '{}' \"$@\"\n",
            flag.display(),
            real.display()
        ),
    )
    .expect("write hook");
    fs::set_permissions(env.dns_hook_path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::write(&flag, "").expect("flag");

    let out = env.certd(&["renew"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stdout
            .contains("dns-01 propagation check for _acme-challenge.slow.example.test")
            && out.stdout.contains("not visible after 2s")
            && out.stdout.contains(&env.pebble.dns_addr().to_string()),
        "{}",
        out.stdout
    );
    // The CA was never asked: the authorization is pending there, kept
    // for the next attempt.
    let authz = ledger_authz(&env);
    assert_eq!(authz.len(), 1, "{authz:#?}");
    assert_eq!(authz[0]["status"], "pending");
    assert_ca_status(&env, &ledger_authz_urls(&authz), "pending");

    // Published now: the next attempt resumes the same authorization.
    fs::remove_file(&flag).expect("clear flag");
    env.certd(&["renew"]).assert_success();
    assert_installed(&env, "slow", &["slow.example.test"]);
    assert_all_valid_dns01(&env, 1);
    assert_eq!(ledger_events(&env, EventKind::OrderResumed), 1);
}

#[test]
fn rfc2136_follows_the_challenge_cname_into_another_zone() {
    let (bind, _resolver, env) = rfc2136_resolved_env();
    // No zone configured: the target's zone is found through its SOA.
    env.write_config_with_dns01(
        &rfc2136_toml(&bind, &env, ""),
        r#"
[[certificate]]
name = "cname"
domains = ["cname.example.test", "*.cname.example.test"]
challenges = ["dns-01"]
"#,
    );
    env.certd(&["renew"]).assert_success();
    assert_installed(
        &env,
        "cname",
        &["cname.example.test", "*.cname.example.test"],
    );
    assert_all_valid_dns01(&env, 2);

    // Both values went to the CNAME's target in the other zone, none next
    // to the CNAME (where BIND would ignore them), and both were removed.
    let log = bind.log();
    let added = format!("adding an RR at '{}' TXT", Bind::CNAME_TARGET);
    assert_eq!(log.matches(&added).count(), 2, "{log}");
    assert!(
        !log.contains("'_acme-challenge.cname.example.test' TXT"),
        "{log}"
    );
    assert!(!log.contains("alongside CNAME"), "{log}");
    assert!(
        bind.txt(Bind::CNAME_TARGET).is_empty(),
        "record left behind"
    );
}

#[test]
fn rfc2136_dns_alias_writes_into_the_alias_zone() {
    let (bind, _resolver, env) = rfc2136_resolved_env();
    env.write_config_with_dns01(
        &rfc2136_toml(&bind, &env, ""),
        &format!(
            r#"
[[certificate]]
name = "alias"
domains = ["alias.example.test"]
challenges = ["dns-01"]
dns_alias = "{}"
"#,
            Bind::ALIAS_ZONE
        ),
    );
    env.certd(&["renew"]).assert_success();
    assert_installed(&env, "alias", &["alias.example.test"]);
    assert_all_valid_dns01(&env, 1);
    let log = bind.log();
    let added = format!("adding an RR at '{}' TXT", Bind::ALIAS_TARGET);
    assert_eq!(log.matches(&added).count(), 1, "{log}");
    assert!(
        bind.txt(Bind::ALIAS_TARGET).is_empty(),
        "record left behind"
    );
}

#[test]
fn dns_alias_outside_any_zone_fails_clearly_and_touches_nothing() {
    let (bind, _resolver, env) = rfc2136_resolved_env();
    let certs = |alias: &str| {
        format!(
            r#"
[[certificate]]
name = "lost"
domains = ["lost.example.test"]
challenges = ["dns-01"]
{alias}
"#
        )
    };
    // A first certificate, installed through the zone itself.
    env.write_config_with_dns01(&rfc2136_toml(&bind, &env, ""), &certs(""));
    env.certd(&["renew"]).assert_success();
    let installed = fs::read(env.cert_dir().join("lost/cert.pem")).expect("installed");

    // Not a DNS name: a config error naming the file, line and key.
    env.write_config_with_dns01(
        &rfc2136_toml(&bind, &env, ""),
        &certs("dns_alias = \"not a zone\""),
    );
    let out = env.certd(&["check-config"]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        text.contains(&env.config_path().display().to_string())
            && text.contains("certificate[0].dns_alias")
            && text.contains("not a valid DNS name"),
        "{text}"
    );

    // A zone the server does not serve: the renewal fails naming the
    // record and why; the installed certificate stays as it was.
    env.write_config_with_dns01(
        &rfc2136_toml(&bind, &env, ""),
        &certs("dns_alias = \"elsewhere.test\""),
    );
    let out = env.certd(&["renew", "--force", "lost"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stdout
            .contains("_acme-challenge.lost.example.test.elsewhere.test")
            && out.stdout.contains("in no zone this server serves"),
        "{}",
        out.stdout
    );
    assert_eq!(
        fs::read(env.cert_dir().join("lost/cert.pem")).expect("still installed"),
        installed
    );
}

#[test]
fn hook_follows_the_challenge_cname_and_names_both_records() {
    let env = TestEnv::new();
    env.write_config(
        r#"
[[certificate]]
name = "hooked"
domains = ["hooked.example.test"]
challenges = ["dns-01"]
"#,
    );
    // challtestsrv answers for `_acme-challenge.hooked.example.test` with
    // a CNAME into a zone the hook may write (and follows it for Pebble).
    let target = "hooked.acme-dns.test";
    challtestsrv(
        &env,
        "set-cname",
        &serde_json::json!({ "host": "_acme-challenge.hooked.example.test.", "target": format!("{target}.") }),
    );
    // The hook records what it was given besides writing the record.
    let real = env.dir().join("real-hook.sh");
    fs::rename(env.dns_hook_path(), &real).expect("move hook");
    let seen = env.dir().join("original.log");
    fs::write(
        env.dns_hook_path(),
        format!(
            "#!/bin/sh\necho \"$1 $CERTD_DNS_RECORD $CERTD_DNS_ORIGINAL\" >> '{}'\nexec '{}' \"$@\"\n",
            seen.display(),
            real.display()
        ),
    )
    .expect("write hook");
    fs::set_permissions(env.dns_hook_path(), fs::Permissions::from_mode(0o755)).expect("chmod");

    env.certd(&["renew"]).assert_success();
    assert_installed(&env, "hooked", &["hooked.example.test"]);
    assert_all_valid_dns01(&env, 1);
    let seen = fs::read_to_string(&seen).expect("hook ran");
    assert_eq!(
        seen.lines().collect::<Vec<_>>(),
        [
            format!("present {target} _acme-challenge.hooked.example.test"),
            format!("cleanup {target} _acme-challenge.hooked.example.test"),
        ],
        "{seen}"
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

#[test]
fn dns_alias_without_its_cname_is_refused_before_the_ca_is_asked() {
    let (bind, _resolver, env) = rfc2136_resolved_env();
    env.write_config_with_dns01(
        &rfc2136_toml(&bind, &env, ""),
        &format!(
            r#"
[[certificate]]
name = "nocname"
domains = ["nocname.example.test"]
challenges = ["dns-01"]
dns_alias = "{}"
"#,
            Bind::ALIAS_ZONE
        ),
    );
    // `_acme-challenge.nocname.example.test` is no CNAME: the CA would
    // find no record there.
    let out = env.certd(&["renew"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    let target = "_acme-challenge.nocname.example.test.validation.test";
    assert!(
        out.stdout.contains("not to the dns_alias target")
            && out.stdout.contains(&format!(
                "_acme-challenge.nocname.example.test. CNAME {target}."
            )),
        "{}",
        out.stdout
    );
    // Not answered: pending at the CA, kept for the next attempt; the
    // record written to the alias zone was removed again.
    let authz = ledger_authz(&env);
    assert_eq!(authz.len(), 1, "{authz:#?}");
    assert_ca_status(&env, &ledger_authz_urls(&authz), "pending");
    assert!(bind.txt(target).is_empty(), "record left behind");
    assert!(!env.cert_dir().join("nocname/cert.pem").exists());
}
