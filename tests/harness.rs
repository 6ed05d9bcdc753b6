//! Smoke tests of the test harness itself, so that a broken Pebble setup
//! fails here, plainly, rather than as confusing certd failures elsewhere.

use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

use crate::util::{Pebble, TestEnv, parse_leaf, private_key_spki, read_pem_certs};

/// Fetches `url` with curl, trusting only `ca` when given. Returns the body,
/// or `None` if curl failed (connection refused, untrusted certificate...).
fn curl(url: &str, ca: Option<&std::path::Path>) -> Option<String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-fsS", "--max-time", "10"]);
    if let Some(ca) = ca {
        cmd.arg("--cacert").arg(ca);
    }
    let out = cmd.arg(url).output().expect("run curl");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn pebble_serves_directory_over_tls_trusted_by_ca_bundle() {
    let pebble = Pebble::start();

    let dir = curl(&pebble.directory_url(), Some(&pebble.ca_bundle()))
        .expect("directory reachable with the generated CA");
    assert!(dir.contains("newNonce"), "unexpected directory: {dir}");

    // The generated CA is what makes the connection trusted: the system
    // store alone must not accept Pebble's certificate.
    assert!(curl(&pebble.directory_url(), None).is_none());

    let root = curl(
        &format!("{}/roots/0", pebble.management_url()),
        Some(&pebble.ca_bundle()),
    )
    .expect("management interface reachable");
    assert!(
        root.contains("BEGIN CERTIFICATE"),
        "unexpected root: {root}"
    );
    assert!(pebble.pebble_log().contains("Listening on"));
}

#[test]
fn pebble_restarts_on_the_same_ports() {
    let mut pebble = Pebble::start();
    let url = pebble.directory_url();

    pebble.stop();
    assert!(!pebble.is_running());
    assert!(curl(&url, Some(&pebble.ca_bundle())).is_none());

    pebble.restart();
    assert!(pebble.is_running());
    assert_eq!(pebble.directory_url(), url);
    let dir = curl(&url, Some(&pebble.ca_bundle())).expect("directory after restart");
    assert!(dir.contains("newNonce"), "unexpected directory: {dir}");
    // The log is kept across restarts.
    assert_eq!(pebble.pebble_log().matches("Listening on").count(), 2);
}

#[test]
fn config_and_dns_hook_work_against_challtestsrv() {
    let env = TestEnv::new();
    env.write_config(
        r#"
[[certificate]]
name = "a"
domains = ["a.test"]
"#,
    );

    let text = std::fs::read_to_string(env.config_path()).expect("read config");
    let config: toml::Table = toml::from_str(&text).expect("config is valid TOML");
    assert_eq!(
        config["acme"]["directory"].as_str(),
        Some(env.pebble.directory_url().as_str())
    );
    assert_eq!(
        config["http01"]["listen"].as_str(),
        Some(format!("127.0.0.1:{}", env.pebble.http01_port()).as_str())
    );
    assert_eq!(
        config["certificate"][0]["domains"][0].as_str(),
        Some("a.test")
    );

    let record = "_acme-challenge.a.test";
    let value = "harness-smoke-test-value";
    let hook = |action: &str| {
        Command::new(env.dns_hook_path())
            .arg(action)
            .env("CERTD_DNS_RECORD", record)
            .env("CERTD_DNS_VALUE", value)
            .env("CERTD_DOMAIN", "a.test")
            .output()
            .expect("run dns hook")
    };

    let out = hook("present");
    assert!(out.status.success(), "present failed: {out:?}");
    let answer = query_txt(&env.pebble, record);
    assert!(contains(&answer, value.as_bytes()), "TXT record not served");

    let out = hook("cleanup");
    assert!(out.status.success(), "cleanup failed: {out:?}");
    let answer = query_txt(&env.pebble, record);
    assert!(
        !contains(&answer, value.as_bytes()),
        "TXT record not removed"
    );

    assert!(!hook("bogus").status.success());
    assert_eq!(
        env.dns_hook_log(),
        format!("present {record} {value}\ncleanup {record} {value}\n")
    );
}

#[test]
fn cert_helpers_read_names_and_match_keys() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = rcgen::KeyPair::generate().expect("generate key");
    let cert = rcgen::CertificateParams::new(vec!["b.test".to_string(), "a.test".to_string()])
        .expect("valid names")
        .self_signed(&key)
        .expect("self-sign");
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    // Two blocks, as in an installed chain.
    std::fs::write(&cert_path, cert.pem() + &cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");

    let certs = read_pem_certs(&cert_path);
    assert_eq!(certs.len(), 2);
    let (names, serial, not_after, spki) = parse_leaf(&certs[0]);
    assert_eq!(names, ["a.test", "b.test"]);
    assert!(!serial.is_empty() && serial.chars().all(|c| c.is_ascii_hexdigit()));
    assert!(not_after > 0);
    assert_eq!(spki, private_key_spki(&key_path));
}

/// Asks challtestsrv's DNS server for the TXT records of `name` and returns
/// the raw response. A hand-built query keeps the test free of dig(1).
fn query_txt(pebble: &Pebble, name: &str) -> Vec<u8> {
    let mut query = vec![
        0x12, 0x34, // id
        0x01, 0x00, // flags: recursion desired
        0x00, 0x01, // one question
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // no answer, authority, additional
    ];
    for label in name.split('.') {
        query.push(u8::try_from(label.len()).expect("label under 64 bytes"));
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0x00, 0x00, 0x10, 0x00, 0x01]); // root, TXT, IN

    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind UDP socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set timeout");
    socket
        .send_to(&query, pebble.dns_addr())
        .expect("send DNS query");
    let mut buf = [0u8; 4096];
    let (len, _) = socket.recv_from(&mut buf).expect("DNS response");
    assert_eq!(buf[..2], [0x12, 0x34], "response to another query");
    buf[..len].to_vec()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
