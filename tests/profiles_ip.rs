//! ACME profiles and IP address certificates against Pebble 2.10, which
//! offers `default` (90 days) and `shortlived` (518,400 s) and picks one at
//! random for an order that names none: every lifetime asserted here comes
//! from a profile certd named.

use std::fs;

use serde_json::Value;
use x509_parser::extensions::GeneralName;

use crate::util::{TestEnv, parse_leaf, read_pem_certs};

const DEFAULT_SECS: i64 = 7_776_000;
const SHORTLIVED_SECS: i64 = 518_400;

/// The installed leaf of `name`: (DNS names, IP addresses as text, serial,
/// lifetime in seconds), parsed from cert.pem.
fn leaf(env: &TestEnv, name: &str) -> (Vec<String>, Vec<String>, String, i64) {
    let der = read_pem_certs(env.cert_dir().join(name).join("cert.pem"));
    let (_, cert) = x509_parser::parse_x509_certificate(&der[0]).expect("parse the leaf");
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    let san = cert
        .subject_alternative_name()
        .expect("well-formed SAN")
        .expect("a SAN extension");
    for n in &san.value.general_names {
        match n {
            GeneralName::DNSName(d) => dns.push(d.to_string()),
            GeneralName::IPAddress(raw) => {
                let addr: std::net::IpAddr = match raw.len() {
                    4 => <[u8; 4]>::try_from(*raw).expect("4 bytes").into(),
                    16 => <[u8; 16]>::try_from(*raw).expect("16 bytes").into(),
                    n => panic!("an iPAddress SAN of {n} bytes"),
                };
                ips.push(addr.to_string());
            }
            other => panic!("unexpected SAN {other:?}"),
        }
    }
    ips.sort();
    let serial = parse_leaf(&der[0]).1;
    // Pebble's notAfter is notBefore + period - 1 s (RFC 5280 counts both ends).
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    (dns, ips, serial, lifetime)
}

fn assert_lifetime(got: i64, want: i64, what: &str) {
    assert!(
        (want - 1..=want).contains(&got),
        "{what}: lifetime {got} s, the profile gives {want} s"
    );
}

fn status_row(env: &TestEnv, name: &str) -> Value {
    let out = env.certd(&["status", "--json"]);
    out.assert_success();
    let rows: Vec<Value> = serde_json::from_str(&out.stdout).expect("status JSON");
    rows.into_iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("{name} in status"))
}

/// Rewrites the `profile` line of the written config (certd reads the file
/// afresh on every run).
fn set_profile(env: &TestEnv, from: &str, to: &str) {
    let path = env.config_path();
    let text = fs::read_to_string(&path).expect("read config");
    assert!(text.contains(from), "{from} in the config");
    fs::write(&path, text.replace(from, to)).expect("write config");
}

#[test]
fn the_lifetime_follows_the_profile_and_a_changed_profile_renews() {
    let env = TestEnv::new();
    env.write_config(
        r#"
[[certificate]]
name = "www"
domains = ["profile.example.test"]
profile = "default"
"#,
    );
    env.certd(&["renew"]).assert_success();
    let (dns, _, first_serial, lifetime) = leaf(&env, "www");
    assert_eq!(dns, ["profile.example.test"]);
    assert_lifetime(lifetime, DEFAULT_SECS, "default");
    assert_eq!(status_row(&env, "www")["profile"], "default");

    // Unchanged: nothing is due.
    let out = env.certd(&["renew"]);
    out.assert_success();
    assert!(out.stdout.contains("not due until"), "{}", out.stdout);
    assert_eq!(leaf(&env, "www").2, first_serial);

    // A new preference makes the 90-day certificate due at once.
    set_profile(
        &env,
        r#"profile = "default""#,
        r#"profile = ["shortlived", "default"]"#,
    );
    env.certd(&["renew"]).assert_success();
    let (_, _, serial, lifetime) = leaf(&env, "www");
    assert_ne!(serial, first_serial, "a new certificate");
    assert_lifetime(lifetime, SHORTLIVED_SECS, "shortlived");
    let row = status_row(&env, "www");
    assert_eq!(row["profile"], "shortlived");
    assert_eq!(row["profile_warning"], Value::Null);

    let out = env.certd(&["renew"]);
    out.assert_success();
    assert!(out.stdout.contains("not due until"), "{}", out.stdout);
    assert_eq!(leaf(&env, "www").2, serial);

    // A profile of the wrong type: a config error naming file, line and
    // key; the installed certificate and the ledger stay as they are.
    let ledger = fs::read(env.state_dir().join("certd.db")).expect("read the ledger");
    set_profile(
        &env,
        r#"profile = ["shortlived", "default"]"#,
        "profile = 6",
    );
    let out = env.certd(&["renew", "--force"]);
    assert_eq!(out.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("{}:", env.config_path().display()))
            && out.stderr.contains("certificate[0].profile: "),
        "{}",
        out.stderr
    );
    assert_eq!(leaf(&env, "www").2, serial);
    assert_eq!(
        fs::read(env.state_dir().join("certd.db")).expect("read the ledger"),
        ledger
    );
}

/// Let's Encrypt retired `tlsclient` on 2026-07-08: a certificate that
/// still lists it first renews with the next profile, and says so.
#[test]
fn a_profile_the_ca_does_not_list_falls_back_unless_required() {
    let env = TestEnv::new();
    env.write_config(
        r#"
[[certificate]]
name = "fallback"
domains = ["fallback.example.test"]
profile = ["tlsclient", "shortlived"]

[[certificate]]
name = "required"
domains = ["required.example.test"]
profile = ["tlsclient"]
profile_required = true
"#,
    );
    let out = env.certd(&["renew"]);
    assert_eq!(out.code(), Some(1), "required fails: {}", out.stderr);
    let (_, _, _, lifetime) = leaf(&env, "fallback");
    assert_lifetime(lifetime, SHORTLIVED_SECS, "the fallback shortlived");
    assert!(
        out.stderr.contains("tlsclient") && out.stderr.contains("is not offered"),
        "the log warns: {}",
        out.stderr
    );

    let row = status_row(&env, "fallback");
    assert_eq!(row["profile"], "shortlived");
    let warning = row["profile_warning"].as_str().expect("a warning");
    assert!(
        warning.contains("\"tlsclient\" is not offered"),
        "{warning}"
    );
    assert!(warning.contains("default, shortlived"), "{warning}");
    let table = env.certd(&["status"]);
    assert!(
        table.stdout.contains("warning: profile"),
        "{}",
        table.stdout
    );

    // Required: the order is never placed, nothing is installed, and the
    // error lists what the CA offers.
    assert!(!env.cert_dir().join("required/cert.pem").exists());
    let row = status_row(&env, "required");
    assert_eq!(row["last_result"], "error");
    let error = row["last_error"].as_str().expect("an error");
    assert!(error.contains("profile_required"), "{error}");
    assert!(error.contains("default, shortlived"), "{error}");
    // Nothing was sent, so no intent is left for recovery to chase.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let store = certd::ledger::Ledger::open(
            &env.state_dir().join("certd.db"),
            certd::clock::Clock::system(),
        )
        .await
        .expect("open ledger");
        for (id, _, _) in store.accounts().await.expect("accounts") {
            assert!(
                !store.has_intents(id).await.expect("intents"),
                "account {id}"
            );
        }
        store.close().await;
    });
}

/// 127.0.0.1 and ::1 on one certificate over http-01 (Pebble connects to
/// each address on its httpPort, so the listener binds `[::]`, which takes
/// IPv4 as well), and 127.0.0.1 over tls-alpn-01 (Pebble sends the
/// reverse-DNS name as SNI). Neither names a profile: certd asks for
/// `shortlived`, which Pebble lists.
#[test]
fn ip_certificates_are_issued_over_http01_and_tls_alpn01() {
    // Fresh authorizations for the second certificate, so tls-alpn-01 is
    // really used for 127.0.0.1.
    let env = TestEnv::without_authz_reuse();
    env.write_config(&format!(
        r#"
[[certificate]]
name = "ip-http"
domains = ["ip.example.test", "::1", "127.0.0.1"]

[[certificate]]
name = "ip-alpn"
domains = ["127.0.0.1"]
challenges = ["tls-alpn-01"]
# Beside the other certificate's address, as an RSA-beside-ECDSA pair is.
key_type = "ecdsa-p384"

[tls_alpn01]
listen = "[::]:{tls}"
"#,
        tls = env.pebble.tls_port(),
    ));
    let http = env.pebble.http01_port();
    set_profile(
        &env,
        &format!("listen = \"127.0.0.1:{http}\""),
        &format!("listen = \"[::]:{http}\""),
    );
    let out = env.certd(&["renew"]);
    out.assert_success();

    let (dns, ips, _, lifetime) = leaf(&env, "ip-http");
    assert_eq!(dns, ["ip.example.test"]);
    assert_eq!(ips, ["127.0.0.1", "::1"]);
    assert_lifetime(lifetime, SHORTLIVED_SECS, "ip-http");
    let (dns, ips, _, lifetime) = leaf(&env, "ip-alpn");
    assert!(dns.is_empty(), "{dns:?}");
    assert_eq!(ips, ["127.0.0.1"]);
    assert_lifetime(lifetime, SHORTLIVED_SECS, "ip-alpn");
    assert_eq!(status_row(&env, "ip-alpn")["profile"], "shortlived");

    // The installed SANs match the configuration: nothing is due again.
    let out = env.certd(&["renew"]);
    out.assert_success();
    assert_eq!(
        out.stdout.matches("not due until").count(),
        2,
        "{}",
        out.stdout
    );
}
