//! What an operator reads: `status` fitted to the terminal with the cause
//! first, `status NAME`, `status --check` by the Nagios convention, and
//! errors that say what is wrong and which setting fixes it.

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

use crate::util::{CmdOutput, TestEnv, free_port};

const DAEMON: &str = r#"
[daemon]
backoff_min = "1s"
backoff_max = "2s"
shutdown_grace = "10s"
"#;

fn cert(name: &str, domain: &str) -> String {
    format!(
        "\n[[certificate]]\nname = \"{name}\"\ndomains = [\"{domain}\"]\nprofile = \"default\"\n"
    )
}

/// `text` with what changes from run to run made constant, as ripgrep's
/// tests compare whole outputs: the test's directory becomes `<dir>`, and
/// every digit (times, ports, serials) a `9`.
/// Hex runs of 6 or more characters (serials, account and issuer ids,
/// versions) become `<hex>` (`<id>` for an account).
fn normalise(text: &str, dir: &Path) -> String {
    let text = text.replace(&dir.display().to_string(), "<dir>");
    let mut out = String::with_capacity(text.len());
    for word in text.split_inclusive(|c: char| !c.is_ascii_hexdigit()) {
        let (hex, tail) = word.split_at(
            word.find(|c: char| !c.is_ascii_hexdigit())
                .unwrap_or(word.len()),
        );
        if hex.len() >= 6 {
            out.push_str(if out.ends_with("my-account/") {
                "<id>"
            } else {
                "<hex>"
            });
        } else {
            out.extend(
                hex.chars()
                    .map(|c| if c.is_ascii_digit() { '9' } else { c }),
            );
        }
        out.push_str(tail);
    }
    out
}

/// The configuration with its `[acme] directory` replaced.
fn point_directory_at(env: &TestEnv, url: &str) {
    let config = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&config.replace(&env.directory_url(), url));
}

fn status(env: &TestEnv, args: &[&str]) -> CmdOutput {
    env.command().args(args).env("COLUMNS", "80").output()
}

#[test]
fn status_fits_80_columns_with_the_cause_first() {
    let env = TestEnv::new();
    env.write_config(&format!(
        "{}{}",
        cert("www", "www.example.test"),
        cert(
            "a-rather-long-certificate-name-for-the-api",
            "api.example.test"
        )
    ));
    env.certd(&["renew"]).assert_success();
    let ca_port = port_of(&env.directory_url());
    // The CA goes away: a renewal fails with reqwest's three wrappers
    // around "connection refused".
    let closed = free_port();
    point_directory_at(&env, &format!("https://127.0.0.1:{closed}/dir"));
    let out = env.certd(&["renew", "--force", "www"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert_eq!(
        out.stdout,
        format!(
            "www: failed: Connection refused (os error 111): cannot reach the CA at https://127.0.0.1:{closed}/dir\n"
        )
    );

    let out = status(&env, &["status"]);
    out.assert_success();
    for line in out.stdout.lines() {
        assert!(
            line.chars().count() <= 80,
            "{} columns: {line}",
            line.chars().count()
        );
    }
    let text = out
        .stdout
        .replace(&closed.to_string(), "<port>")
        .replace(&ca_port, "<ca>");
    assert_eq!(
        normalise(&text, env.dir()),
        "\
NAME                        EXPIRES (UTC)     NEXT RENEWAL (UTC)  PENDING  LAST
www                         9999-99-99 (99d)  9999-99-99 99:99    9        error
  error: Connection refused (os error 999): cannot reach the CA at https://999.…
a-rather-long-certificate…  9999-99-99 (99d)  9999-99-99 99:99    9        ok

account https://999.9.9.9:<ca>/my-account/<id>
  directory: https://999.9.9.9:<ca>/dir
  pending authorizations: 9
  reaper: deactivated 9 (99 h: 9), held back: 9
  last reaper pass: 9999-99-99T99:99:99Z (examined 9, deactivated 9, held back …
"
    );

    // Wider, the whole cause; --json is as it was.
    let out = env
        .command()
        .args(["status"])
        .env("COLUMNS", "120")
        .output();
    assert!(
        out.stdout.contains(&format!(
            "\n  error: Connection refused (os error 111): cannot reach the CA at https://127.0.0.1:{closed}/dir\n"
        )),
        "{}",
        out.stdout
    );
    let out = status(&env, &["status", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(rows[0]["name"], "www");
    assert_eq!(rows[0]["last_result"], "error");
    assert_eq!(
        rows[0]["last_error"],
        format!(
            "Connection refused (os error 111): cannot reach the CA at https://127.0.0.1:{closed}/dir"
        )
    );

    // `status NAME`: everything about one certificate, nothing cut.
    let out = status(&env, &["status", "www"]);
    out.assert_success();
    let text = out.stdout.replace(&closed.to_string(), "<port>");
    assert_eq!(
        normalise(&text, env.dir()),
        "\
Certificate: www
  Domains:                www.example.test
  Expires:                9999-99-99T99:99:99Z (99 days left)
  Serial:                 <hex>
  Issuer:                 CN=Pebble Intermediate CA <hex>
  Key type:               ecdsa-p999
  Profile:                default
  Challenges:             http-99
  Renewal window:         opens with 99% of the lifetime left
  Next renewal:           9999-99-99T99:99:99Z
  Last attempt:           9999-99-99T99:99:99Z error
  Last error:             Connection refused (os error 999): cannot reach the CA at https://999.9.9.9:<port>/dir
  Pending authorizations: 9
  cert:                   <dir>/certs/www/cert.pem
  chain:                  <dir>/certs/www/chain.pem
  fullchain:              <dir>/certs/www/fullchain.pem
  privkey:                <dir>/certs/www/privkey.pem
  Events:
    9999-99-99T99:99:99Z  installed: serial <hex> version <hex>T<hex>Z-<hex>
"
    );
    // -v: every certificate so; an unknown name is a usage error.
    let out = status(&env, &["status", "-v"]);
    assert_eq!(
        out.stdout.matches("\nCertificate: ").count() + 1,
        2,
        "{}",
        out.stdout
    );
    let out = status(&env, &["status", "nope"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("no certificate named \"nope\""),
        "{}",
        out.stderr
    );
}

/// The port of a URL, as text.
fn port_of(url: &str) -> String {
    url.rsplit(':')
        .next()
        .and_then(|tail| tail.split('/').next())
        .expect("a port")
        .to_owned()
}
