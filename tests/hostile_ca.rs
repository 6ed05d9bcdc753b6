//! A malicious CA: what a security review sent certd through a front before
//! Pebble, and what certd must do with it. No real server here is
//! malicious, so the front (`util::front`) is a test double that answers
//! selected requests the way an attacker controlling the CA would.
//!
//! For every attack: no panic, a clear error, nothing outside the webroot
//! touched, the installed certificate and key byte for byte as they were.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::util::{Fault, FaultyFront, TestEnv};

const DAEMON: &str = "[daemon]\nbackoff_min = \"1s\"\nbackoff_max = \"4s\"\n";

/// An environment whose config talks to the CA through a front, with one
/// certificate `h` issued through it (so there is something to lose).
fn issued_behind_front(env: &TestEnv, extra: &str) -> FaultyFront {
    env.write_config(&format!(
        "{extra}\n[[certificate]]\nname = \"h\"\ndomains = [\"h.example.test\"]\n"
    ));
    let front = FaultyFront::start(&env.pebble);
    let config = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&config.replace(&env.pebble.directory_url(), &front.directory_url()));
    env.certd(&["renew"]).assert_success();
    front
}

/// Every file below `dir`, by path, with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                todo.push(path);
            } else {
                files.insert(path.clone(), fs::read(&path).expect("read"));
            }
        }
    }
    files
}

/// Runs `renew --force` against the attack and checks it failed cleanly
/// with `expected` in its output, leaving the installed files as they were.
fn attack_fails_cleanly(env: &TestEnv, what: &str, expected: &str) -> String {
    let before = snapshot(&env.cert_dir());
    let out = env.certd(&["renew", "--force"]);
    assert_eq!(out.code(), Some(1), "{what}: {out}");
    assert!(!out.stderr.contains("panicked"), "{what}: {out}");
    assert!(
        out.stdout.contains(expected) || out.stderr.contains(expected),
        "{what}: expected {expected:?} in {out}"
    );
    assert!(
        snapshot(&env.cert_dir()) == before,
        "{what}: the installed files changed"
    );
    out.stdout
}

#[test]
fn traversal_tokens_touch_nothing_outside_the_webroot() {
    let env = TestEnv::without_authz_reuse();
    let www = env.dir().join("www");
    fs::create_dir_all(&www).expect("webroot");
    let front = issued_behind_front(&env, DAEMON);
    // Add a webroot next to the responder: the token now names a file.
    let config = fs::read_to_string(env.config_path()).expect("config");
    let webroot = format!("[http01]\nwebroot = {:?}\n", www.display().to_string());
    env.write_raw_config(&config.replacen("[http01]\n", &webroot, 1));
    let victim = env.dir().join("victim");
    fs::write(&victim, "precious").expect("victim");
    let key = env.cert_dir().join("h/privkey.pem");
    let tokens = [
        // From www/.well-known/acme-challenge, three levels up is env.dir().
        "../../../victim".to_owned(),
        key.display().to_string(),
        victim.display().to_string(),
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/../../../../victim".to_owned(),
    ];
    for token in tokens {
        front.clear();
        front.inject("/authZ/", Fault::Token(token.clone()), 1000);
        attack_fails_cleanly(&env, &token, "refusing to use it");
        assert_eq!(fs::read(&victim).expect("victim"), b"precious", "{token}");
        let stray: Vec<_> = fs::read_dir(env.dir())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert!(
            !stray
                .iter()
                .any(|n| n.to_string_lossy().contains("aaaaaaaa")),
            "{token}: {stray:?}"
        );
    }
    // The CA behaves again: the webroot works as before.
    front.clear();
    env.certd(&["renew", "--force"]).assert_success();
    assert_eq!(fs::read(&victim).expect("victim"), b"precious");
}

#[test]
fn hostile_retry_after_neither_crashes_nor_storms() {
    let env = TestEnv::new();
    let front = issued_behind_front(&env, DAEMON);
    // u64::MAX seconds overflowed the clock; 300 kB of `(` overflowed the
    // stack in the date parser.
    for value in ["18446744073709551615".to_owned(), "(".repeat(300_000)] {
        front.clear();
        front.inject("/order-plz", Fault::RetryAfter(value.clone()), 10);
        attack_fails_cleanly(&env, &value[..20.min(value.len())], "rateLimited");
    }

    // `Retry-After: 0` on a rate limit: the daemon must pause, not loop.
    front.clear();
    front.inject("/order-plz", Fault::RetryAfter("0".into()), 1000);
    add_certificate(&env, "z");
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_output("CA rate limit", Duration::from_secs(60));
    // An upper bound over a window: load can only make the count smaller.
    // Before the fix the daemon ordered again as fast as the CA answered
    // (hundreds a minute).
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let orders = 1000 - front.left();
    assert!(orders <= 2, "{orders} orders within 10 s of a rate limit");
    let out = daemon.terminate();
    assert!(!out.stderr.contains("panicked"), "{out}");
}

/// Adds a certificate with nothing installed yet, due at once.
fn add_certificate(env: &TestEnv, name: &str) {
    let config = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&format!(
        "{config}\n[[certificate]]\nname = \"{name}\"\ndomains = [\"{name}.example.test\"]\n"
    ));
}

/// The daemon's peak resident memory, from /proc.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[test]
fn an_endless_body_is_cut_off_and_memory_stays_bounded() {
    let env = TestEnv::new();
    let front = issued_behind_front(&env, DAEMON);
    let before = snapshot(&env.cert_dir());
    front.inject("/order-plz", Fault::EndlessBody(1_500_000_000), 1);
    add_certificate(&env, "e");
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_output("larger than 1048576 bytes", Duration::from_secs(120));
    let peak = peak_rss_kib(daemon.pid());
    eprintln!("certd's peak RSS after refusing a 1.5 GB body: {peak} kB");
    // Before the fix the daemon held the whole body: 1.5 GB.
    assert!(peak < 200 * 1024, "peak RSS {peak} kB");
    // The answer was refused, not the CA: the next attempt issues.
    daemon.wait_for_file(&env.cert_dir().join("e/cert.pem"), Duration::from_secs(120));
    let out = daemon.terminate();
    let after = snapshot(&env.cert_dir());
    assert!(
        before.iter().all(|(p, b)| after.get(p) == Some(b)),
        "h changed"
    );
    assert!(!out.stderr.contains("panicked"), "{out}");
}

#[test]
fn a_huge_problem_detail_still_reaches_the_notify_command_cut() {
    let env = TestEnv::new();
    let seen = env.dir().join("notify.env");
    let notify = format!(
        "{DAEMON}\n[notify]\ncommand = \"printf '%s' \\\"$CERTD_ERROR\\\" > {}\"\nafter_failures = 1\n",
        seen.display()
    );
    let front = issued_behind_front(&env, &notify);
    // 5 MB: more than certd reads of a body. 900 kB: read, and cut.
    for (len, expected) in [
        (5_000_000, "larger than 1048576 bytes"),
        (900_000, "[truncated, 900000 bytes in all]"),
    ] {
        let _ = fs::remove_file(&seen);
        front.clear();
        front.inject("/order-plz", Fault::LongDetail(len), 10);
        let stdout = attack_fails_cleanly(&env, &len.to_string(), "");
        assert!(
            stdout.len() < 64 * 1024,
            "{len}: {} bytes of output",
            stdout.len()
        );
        let error = fs::read_to_string(&seen)
            .unwrap_or_else(|e| panic!("{len}: the notify command did not run: {e}"));
        assert!(error.contains(expected), "{len}: {error}");
        assert!(
            error.len() <= 16 * 1024 + 100,
            "{len}: {} bytes",
            error.len()
        );
        let status = env.certd(&["status", "--json"]);
        assert!(
            status.stdout.len() < 64 * 1024,
            "{len}: {}",
            status.stdout.len()
        );
    }
}

#[test]
fn a_redirect_to_plain_http_is_not_followed() {
    let env = TestEnv::new();
    let front = issued_behind_front(&env, DAEMON);
    // Where the redirect points: nothing may connect here.
    let trap = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = trap.local_addr().expect("addr").port();
    for path in ["/order-plz", "/dir"] {
        front.clear();
        front.inject(path, Fault::RedirectToHttp(port), 10);
        attack_fails_cleanly(&env, path, "certd follows none");
    }
    trap.set_nonblocking(true).expect("nonblocking");
    assert!(
        trap.accept().is_err(),
        "certd sent a request to the http URL"
    );
}
