//! What an operator reads: `status` fitted to the terminal with the cause
//! first, `status NAME`, `status --check` by the Nagios convention, and
//! errors that say what is wrong and which setting fixes it.

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

use crate::util::{CmdOutput, TestEnv, free_port};

const DAEMON: &str = crate::util::DAEMON_RETRY_2S;

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
  error: Connection refused (os error 999): …e CA at https://999.9.9.9:<port>/dir
a-rather-long-certificate…  9999-99-99 (99d)  9999-99-99 99:99    9        ok

account https://999.9.9.9:<ca>/my-account/<id>
  directory: https://999.9.9.9:<ca>/dir
  pending authorizations: 9
  reaper: deactivated 9 (last 99 h: 9), held back for failure budget: 9
  last reaper pass: 9999-99-99T99:99:99Z
    examined 9, deactivated 9, held back 9, resolved 9, failed 9
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

/// `status --check` by the Nagios plugin convention: exactly one line, and
/// 3 (UNKNOWN) when it cannot judge.
#[test]
fn status_check_is_one_line_and_unknown_when_it_cannot_judge() {
    let env = TestEnv::new();
    let one_line = |out: &CmdOutput, code: i32, expected: &str| {
        assert_eq!(out.code(), Some(code), "{out}");
        assert_eq!(out.stdout, format!("{expected}\n"), "{out}");
    };
    // No certificates: not "OK: 0 certificate(s)".
    env.write_config("");
    let path = env.config_path().display().to_string();
    one_line(
        &env.certd(&["status", "--check"]),
        1,
        &format!("CERTD WARNING: no certificates configured in {path}"),
    );
    // A configuration that does not parse.
    env.write_config("[[certificate]]\nname = \"www\"\n");
    let out = env.certd(&["status", "--check"]);
    assert_eq!(out.code(), Some(3), "{out}");
    assert_eq!(out.stdout.lines().count(), 1, "{out}");
    assert!(
        out.stdout.starts_with(&format!("CERTD UNKNOWN: {path}:")),
        "{out}"
    );
    assert!(out.stdout.contains("missing field `domains`"), "{out}");
    // A ledger that cannot be read.
    env.write_config(&cert("www", "www.example.test"));
    fs::create_dir_all(env.state_dir()).expect("state dir");
    fs::write(
        env.state_dir().join("certd.db"),
        "not a database, a file of text\n".repeat(200),
    )
    .expect("garbage ledger");
    let out = env.certd(&["status", "--check"]);
    assert_eq!(out.code(), Some(3), "{out}");
    assert_eq!(out.stdout.lines().count(), 1, "{out}");
    assert!(
        out.stdout
            .starts_with("CERTD UNKNOWN: cannot read the ledger: ledger "),
        "{out}"
    );
    fs::remove_file(env.state_dir().join("certd.db")).expect("remove");
    // A certificate that is not configured cannot be judged either.
    one_line(
        &env.certd(&["status", "--check", "nope"]),
        3,
        &format!("CERTD UNKNOWN: no certificate named \"nope\" in {path}"),
    );
    one_line(
        &env.certd(&["status", "--check", "www"]),
        2,
        "CERTD CRITICAL: www has no certificate yet",
    );

    // An unknown RUST_LOG is an error, not ignored: UNKNOWN for the check,
    // a usage error (2) for the other commands.
    let with_log = |args: &[&str]| env.command().args(args).env("RUST_LOG", "verbose").output();
    let out = with_log(&["status", "--check"]);
    assert_eq!(out.code(), Some(3), "{out}");
    assert_eq!(
        out.stdout,
        "CERTD UNKNOWN: RUST_LOG=\"verbose\": \"verbose\" is neither a level nor target=level; \
         use target=level directives, e.g. RUST_LOG=certd=debug,warn \
         (levels: off, error, warn, info, debug, trace)\n"
    );
    let out = with_log(&["renew"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("RUST_LOG=\"verbose\""), "{out}");
    let out = env
        .command()
        .args(["status"])
        .env("RUST_LOG", "certd=loud")
        .output();
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("\"loud\" is not a level"), "{out}");
    let out = env
        .command()
        .args(["status"])
        .env("RUST_LOG", "certd::order=debug,warn")
        .output();
    out.assert_success();
}

/// A CA whose TLS certificate certd does not trust: said in words, with
/// the key that fixes it, not as `UnknownIssuer`.
#[test]
fn tls_refusals_name_ca_bundle() {
    let env = TestEnv::new();
    env.write_config(&cert("www", "www.example.test"));
    let config = fs::read_to_string(env.config_path()).expect("config");
    let without_bundle: String = config
        .lines()
        .filter(|l| !l.starts_with("ca_bundle"))
        .map(|l| format!("{l}\n"))
        .collect();
    env.write_raw_config(&without_bundle);
    let out = env.certd(&["renew"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert_eq!(
        out.stdout,
        format!(
            "www: failed: the CA's TLS certificate is not trusted: add its root to `[acme] ca_bundle` ({})\n",
            env.directory_url()
        )
    );
    assert!(!out.stderr.contains("UnknownIssuer"), "{out}");
}

/// A directory URL that answers 404 is a wrong URL, not an unreachable CA.
#[test]
fn a_directory_that_answers_404_says_so() {
    let env = TestEnv::new();
    env.write_config(&cert("www", "www.example.test"));
    let wrong = env.directory_url().replace("/dir", "/directory");
    point_directory_at(&env, &wrong);
    let out = env.certd(&["renew"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert_eq!(
        out.stdout,
        format!(
            "www: failed: the directory URL {wrong} answers 404 Not Found: is `[acme] directory` right?\n"
        )
    );
}

/// Port 80 held by a web server: the message says to use a webroot.
#[test]
fn a_port_in_use_suggests_the_webroot() {
    let env = TestEnv::new();
    env.write_config(&cert("www", "www.example.test"));
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("addr").port();
    let config = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&config.replace(
        &format!("127.0.0.1:{}", env.pebble.http01_port()),
        &format!("127.0.0.1:{port}"),
    ));
    let out = env.certd(&["renew"]);
    assert_ne!(out.code(), Some(0), "{out}");
    let expected = format!(
        "port {port} is in use (a web server?): use `[http01] webroot` instead; \
         the http-01 responder cannot listen on 127.0.0.1:{port}: Address already in use (os error 98)"
    );
    assert!(
        out.stdout.contains(&expected) || out.stderr.contains(&expected),
        "{out}"
    );
}

/// With the CA unreachable at boot, systemd hears READY=1 all the same
/// (else `systemctl start` hangs and fails), and `status` says since when
/// the CA is unreachable.
#[test]
fn ready_before_the_ca_answers_and_status_says_since_when() {
    let env = TestEnv::new();
    env.write_config(&format!("{DAEMON}{}", cert("www", "www.example.test")));
    let closed = free_port();
    point_directory_at(&env, &format!("https://127.0.0.1:{closed}/dir"));
    let socket_path = env.dir().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut daemon = env
        .command()
        .arg("run")
        .env("NOTIFY_SOCKET", &socket_path)
        .spawn();
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("READY=1 while the CA is down");
    assert_eq!(&buf[..n], b"READY=1");
    daemon.wait_for_output("cannot load the ACME account", Duration::from_secs(30));
    let out = status(&env, &["status"]);
    out.assert_success();
    let first = out.stdout.lines().next().unwrap_or_default().to_owned();
    assert!(first.starts_with("CA unreachable since "), "{}", out.stdout);
    assert!(first.contains(": Connection refused"), "{}", out.stdout);
    assert!(first.chars().count() <= 80, "{first}");
    let out = env.certd(&["status", "--check"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stdout.contains("; CA unreachable since "), "{out}");
    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
}

/// NEXT RENEWAL stays where it was planned across daemon restarts: a new
/// random draw at each start moved it by up to two days.
#[test]
fn next_renewal_is_kept_across_restarts() {
    let env = TestEnv::new();
    env.write_config(&format!("{DAEMON}{}", cert("www", "www.example.test")));
    env.certd(&["renew"]).assert_success();
    let next = || {
        let out = env.certd(&["status", "--json"]);
        let rows: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
        rows[0]["next_renewal_at"]
            .as_str()
            .expect("planned")
            .to_owned()
    };
    let mut seen = Vec::new();
    for _ in 0..3 {
        let mut daemon = env
            .command()
            .arg("run")
            .env("RUST_LOG", "certd=debug,warn")
            .spawn();
        daemon.wait_for_output("certd running", Duration::from_secs(30));
        daemon.wait_for_output("scheduled", Duration::from_secs(30));
        let out = daemon.terminate();
        assert_eq!(out.code(), Some(0), "{out}");
        seen.push(next());
    }
    assert!(seen.iter().all(|s| *s == seen[0]), "{seen:?}");
}

/// `status NAME` lists the certificate's pending authorizations, with
/// their URLs, for `certd authz deactivate`.
#[test]
fn status_name_lists_pending_authorizations() {
    let env = TestEnv::new();
    env.write_config(&cert("p", "p.example.test"));
    // A webroot no web server serves, pre-flighted through the name: the
    // order stops before the CA validates, its authorization pending.
    let webroot = env.dir().join("webroot");
    fs::create_dir_all(&webroot).expect("webroot");
    let config = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&config.replace(
        &format!("listen = \"127.0.0.1:{}\"", env.pebble.http01_port()),
        &format!("webroot = \"{}\"\npreflight = true", webroot.display()),
    ));
    assert_eq!(env.certd(&["renew"]).code(), Some(1));
    let authz = crate::util::ledger_authz(&env);
    assert_eq!(authz.len(), 1, "{authz:#?}");
    let url = authz[0]["url"].as_str().expect("url").to_owned();
    let out = status(&env, &["status", "p"]);
    out.assert_success();
    let lines: Vec<&str> = out.stdout.lines().collect();
    let at = lines
        .iter()
        .position(|l| *l == "  Pending authorizations: 1")
        .unwrap_or_else(|| panic!("{}", out.stdout));
    let listed = lines[at + 1];
    assert!(
        listed.starts_with("    20") && listed.ends_with(&format!("  p.example.test  {url}")),
        "{}",
        out.stdout
    );
}
