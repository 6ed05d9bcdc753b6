//! What certd verifies in the CA's answers, tested against a hostile CA.
//!
//! Test double, and why: no real CA here lies. The CA is Pebble behind
//! `FaultyFront`, which rewrites Pebble's real answers as a malicious or
//! compromised CA could: authorizations for names certd never asked for
//! (one with a newline and an escape sequence in it), certificates that
//! are expired, unchained, CA certificates, not for TLS servers, or from
//! another CA, and problem documents with terminal control sequences.
//! Everything else (orders, validation, deactivation) is Pebble's own.

use std::collections::BTreeMap;
use std::fs;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::util::{
    FaultyFront, ForgedCert, Forgery, TestEnv, ca_authz_statuses, installed, ledger_authz,
    ledger_authz_urls,
};

const DAEMON: &str = crate::util::DAEMON_RETRY_4S;

/// An identifier a hostile CA could put in an authorization: the name
/// certd asked for, a newline, an nsupdate command, and an escape sequence.
const INJECTED: &str = "h.example.test\nupdate add evil.example.test. 60 TXT \x1b[31mpwned";

/// Points the config at `front` instead of Pebble.
fn route_through(env: &TestEnv, front: &FaultyFront) {
    let config = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&config.replace(&env.pebble.directory_url(), &front.directory_url()));
}

/// Wraps the dns-01 hook so that every run's action and environment are
/// appended to `hook-env.log`, one NUL-terminated record per run (a
/// newline in a value cannot split a record).
fn record_hook_environment(env: &TestEnv) -> std::path::PathBuf {
    let hook = env.dns_hook_path();
    let real = env.dir().join("real-hook.sh");
    fs::rename(&hook, &real).expect("move hook");
    let log = env.dir().join("hook-env.log");
    let script = format!(
        "#!/bin/sh\n\
         printf '%s DOMAIN=%s RECORD=%s VALUE=%s\\0' \"$1\" \"$CERTD_DOMAIN\" \"$CERTD_DNS_RECORD\" \"$CERTD_DNS_VALUE\" >> '{log}'\n\
         exec '{real}' \"$@\"\n",
        log = log.display(),
        real = real.display()
    );
    fs::write(&hook, script).expect("write hook");
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).expect("chmod hook");
    log
}

fn hook_runs(log: &Path) -> Vec<String> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .split('\0')
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `certd status --json`'s row for `name`.
fn status_json(env: &TestEnv, name: &str) -> serde_json::Value {
    let out = env.certd(&["status", "--json"]);
    out.assert_success();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).expect("status JSON");
    rows.into_iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no status row for {name}"))
}

/// Every installed file of `name`, read through the links, and where
/// `current` points.
fn snapshot(env: &TestEnv, name: &str) -> BTreeMap<String, Vec<u8>> {
    let dir = env.cert_dir().join(name);
    let mut files: BTreeMap<String, Vec<u8>> =
        ["cert.pem", "chain.pem", "fullchain.pem", "privkey.pem"]
            .iter()
            .map(|f| {
                (
                    f.to_string(),
                    fs::read(dir.join(f)).expect("installed file"),
                )
            })
            .collect();
    let current = fs::read_link(dir.join("current")).expect("current link");
    files.insert(
        "current ->".into(),
        current.display().to_string().into_bytes(),
    );
    files
}

#[test]
fn authorization_for_an_unrequested_name_is_refused_and_settled() {
    let env = TestEnv::without_authz_reuse();
    env.write_config(&format!(
        "{DAEMON}\n[[certificate]]\nname = \"h\"\ndomains = [\"h.example.test\"]\nchallenges = [\"dns-01\"]\n"
    ));
    let hook_log = record_hook_environment(&env);
    let front = FaultyFront::start(&env.pebble);
    route_through(&env, &front);

    for identifier in ["evil.example.test", INJECTED] {
        // Every answer for the authorization names `identifier`, as does
        // the CA's answer to the deactivation.
        front.forge("/authZ/", Forgery::AuthzIdentifier(identifier.into()), 1000);
        let out = env.certd(&["renew", "--force"]);
        assert_eq!(out.code(), Some(1), "{identifier:?}: {out}");
        assert!(
            out.stdout
                .contains("a name this order did not ask for (h.example.test)"),
            "{out}"
        );
        assert!(!out.stdout.contains('\x1b'), "{out}");
        assert!(
            !out.stdout.lines().any(|l| l.starts_with("update add")),
            "a forged line: {out}"
        );
        // No hook ran, least of all with the CA's identifier.
        assert_eq!(hook_runs(&hook_log), Vec::<String>::new());

        // Recorded as the CA said it (exact in JSON), and deactivated at
        // the CA: the refused order leaves nothing pending.
        let authz = ledger_authz(&env);
        let foreign: Vec<_> = authz
            .iter()
            .filter(|a| a["identifier"] == identifier)
            .collect();
        assert_eq!(foreign.len(), 1, "{authz:#?}");
        assert_eq!(foreign[0]["status"], "deactivated", "{authz:#?}");
        let at_ca = ca_authz_statuses(&env, &ledger_authz_urls(&authz));
        assert!(at_ca.values().all(|s| s == "deactivated"), "{at_ca:?}");

        let row = status_json(&env, "h");
        assert_eq!(row["last_result"], "error", "{row}");
        let error = row["last_error"].as_str().expect("last_error");
        assert!(error.contains("did not ask for"), "{error}");
        front.stop_forging();
    }

    // The table shows the CA's text escaped, on one line.
    let table = env.certd(&["authz", "list"]);
    table.assert_success();
    assert!(!table.stdout.contains('\x1b'), "{table}");
    assert!(
        table
            .stdout
            .contains("h.example.test\\nupdate add evil.example.test. 60 TXT \\x1b[31mpwned"),
        "{table}"
    );
    assert!(
        !table.stdout.lines().any(|l| l.starts_with("update add")),
        "{table}"
    );

    // The same CA answering honestly: the hook runs with the configured name.
    env.certd(&["renew", "--force"]).assert_success();
    installed(&env, "h");
    let runs = hook_runs(&hook_log);
    assert!(!runs.is_empty());
    assert!(
        runs.iter()
            .all(|r| r
                .contains("DOMAIN=h.example.test RECORD=_acme-challenge.h.example.test VALUE=")),
        "{runs:?}"
    );
}

/// A loopback address of its own for the test, with port 80 (the pre-flight
/// check's) listening and counting connections.
struct Port80 {
    addr: Ipv4Addr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Port80 {
    fn start() -> Port80 {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let addr = Ipv4Addr::new(127, 80, (nanos >> 8) as u8, (nanos as u8).max(2));
        let listener = TcpListener::bind((addr, 80))
            .unwrap_or_else(|e| panic!("bind {addr}:80 (the test suite runs as root): {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, halt) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            while !halt.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok(_) => {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Port80 {
            addr,
            accepted,
            stop,
        }
    }
}

impl Drop for Port80 {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[test]
fn unrequested_name_gets_no_preflight_connection() {
    let env = TestEnv::without_authz_reuse();
    env.write_config(&format!(
        "{DAEMON}\n[[certificate]]\nname = \"p\"\ndomains = [\"p.example.test\"]\n"
    ));
    let webroot = env.dir().join("webroot");
    // It exists (a missing webroot is refused before any order).
    fs::create_dir(&webroot).expect("webroot");
    let config = fs::read_to_string(env.config_path()).expect("config");
    let port = env.pebble.http01_port();
    env.write_raw_config(&config.replace(
        &format!("listen = \"127.0.0.1:{port}\""),
        &format!("webroot = \"{}\"\npreflight = true", webroot.display()),
    ));
    let front = FaultyFront::start(&env.pebble);
    route_through(&env, &front);
    let target = Port80::start();

    // The CA's authorization names a host of its choosing: with a webroot
    // and the pre-flight check, certd would connect to it on port 80.
    front.forge(
        "/authZ/",
        Forgery::AuthzIdentifier(target.addr.to_string()),
        1000,
    );
    let out = env.certd(&["renew"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stdout.contains("did not ask for"), "{out}");
    assert_eq!(
        target.accepted.load(Ordering::SeqCst),
        0,
        "certd connected to {}",
        target.addr
    );
    assert!(
        !webroot.join(".well-known/acme-challenge").exists(),
        "a challenge was presented"
    );
    let authz = ledger_authz(&env);
    let at_ca = ca_authz_statuses(&env, &ledger_authz_urls(&authz));
    assert!(
        !at_ca.is_empty() && at_ca.values().all(|s| s == "deactivated"),
        "{at_ca:?}"
    );
}

#[test]
fn forged_certificates_are_not_installed() {
    let env = TestEnv::new();
    let reload_log = env.dir().join("reload.log");
    env.write_config(&format!(
        "{DAEMON}\n[[certificate]]\nname = \"f\"\ndomains = [\"f.example.test\", \"www.f.example.test\"]\nreload = [\"echo reloaded >> '{}'\"]\n",
        reload_log.display()
    ));
    let front = FaultyFront::start(&env.pebble);
    route_through(&env, &front);
    env.certd(&["renew"]).assert_success();
    let before = snapshot(&env, "f");
    let (_, serial, _) = installed(&env, "f");
    assert_eq!(
        fs::read_to_string(&reload_log).expect("reloaded"),
        "reloaded\n"
    );

    let cases = [
        (ForgedCert::Expired, "the certificate expired at"),
        (ForgedCert::NoChain, "without its chain"),
        (ForgedCert::CaLeaf, "is a CA certificate"),
        (
            ForgedCert::ClientAuthOnly,
            "lacks the serverAuth extended key usage",
        ),
    ];
    for (forged, expected) in cases {
        front.forge("/certZ/", Forgery::Certificate(forged), 1);
        let out = env.certd(&["renew", "--force"]);
        assert_eq!(out.code(), Some(1), "{forged:?}: {out}");
        assert!(out.stdout.contains(expected), "{forged:?}: {out}");
        assert!(
            out.stdout
                .contains("the CA's certificate chain is unusable"),
            "{forged:?}: {out}"
        );
        // Nothing installed, nothing reloaded, the old certificate stays.
        assert_eq!(snapshot(&env, "f"), before, "{forged:?}");
        assert_eq!(installed(&env, "f").1, serial);
        assert_eq!(
            fs::read_to_string(&reload_log).expect("reload log"),
            "reloaded\n",
            "{forged:?}: a reload ran"
        );
        let row = status_json(&env, "f");
        assert_eq!(row["last_result"], "error", "{row}");
        assert!(
            row["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(expected)),
            "{forged:?}: {row}"
        );
        let table = env.certd(&["status"]);
        assert!(table.stdout.contains("error: "), "{table}");
    }
}

/// Pebble's root, from its management interface.
fn pebble_root(env: &TestEnv) -> String {
    let out = Command::new("curl")
        .args(["-fsS", "--max-time", "10", "--cacert"])
        .arg(env.pebble.ca_bundle())
        .arg(format!("{}/roots/0", env.pebble.management_url()))
        .output()
        .expect("run curl");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).expect("PEM")
}

#[test]
fn trusted_roots_refuse_a_chain_from_another_ca() {
    let env = TestEnv::new();
    env.write_config(&format!(
        "{DAEMON}\n[[certificate]]\nname = \"t\"\ndomains = [\"t.example.test\"]\n"
    ));
    let roots = env.dir().join("roots.pem");
    fs::write(&roots, pebble_root(&env)).expect("write roots");
    let config = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&config.replacen(
        "[acme]\n",
        &format!("[acme]\ntrusted_roots = \"{}\"\n", roots.display()),
        1,
    ));
    let front = FaultyFront::start(&env.pebble);
    route_through(&env, &front);

    // Pebble's own chain leads to its root.
    env.certd(&["renew"]).assert_success();
    let before = snapshot(&env, "t");

    // A well-formed chain, but from a CA the operator does not trust.
    front.forge("/certZ/", Forgery::Certificate(ForgedCert::OtherCa), 1);
    let out = env.certd(&["renew", "--force"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stdout.contains(&format!(
            "does not lead to a root in trusted_roots ({})",
            roots.display()
        )),
        "{out}"
    );
    assert_eq!(snapshot(&env, "t"), before);
}

#[test]
fn daemon_backs_off_after_a_forged_certificate() {
    let env = TestEnv::new();
    env.write_config(&format!(
        "{DAEMON}\n[[certificate]]\nname = \"d\"\ndomains = [\"d.example.test\"]\n"
    ));
    let front = FaultyFront::start(&env.pebble);
    route_through(&env, &front);
    front.forge("/certZ/", Forgery::Certificate(ForgedCert::NoChain), 1000);
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_output("renewal failed", Duration::from_secs(60));
    let first = front.requests("/certZ/");
    std::thread::sleep(Duration::from_secs(8));
    // Backoff 1 s, 2 s, 4 s (halved at most by jitter): a handful of
    // orders in 8 s; a tight loop would be dozens.
    let later = front.requests("/certZ/") - first;
    assert!(later <= 6, "{later} certificate downloads in 8 s");
    let out = daemon.terminate();
    assert!(!env.cert_dir().join("d/cert.pem").exists(), "{out}");
    assert!(out.stderr.contains("without its chain"), "{out}");
}

#[test]
fn ca_text_is_escaped_for_terminals_and_logs() {
    let env = TestEnv::new();
    env.write_config(&format!(
        "{DAEMON}\n[[certificate]]\nname = \"e\"\ndomains = [\"e.example.test\"]\n"
    ));
    // The notify command records the error it is given.
    let notified = env.dir().join("notified");
    let config = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&format!(
        "{config}\n[notify]\ncommand = \"printf '%s' \\\"$CERTD_ERROR\\\" > '{}'\"\nafter_failures = 1\n",
        notified.display()
    ));
    let front = FaultyFront::start(&env.pebble);
    route_through(&env, &front);
    let detail = "\x1b[31mred\nCERTD OK: 1 certificate(s) valid";
    front.forge("/order-plz", Forgery::Problem(detail.into()), 1);
    let out = env.certd(&["renew"]);
    assert_eq!(out.code(), Some(1), "{out}");
    let escaped = "\\x1b[31mred\\nCERTD OK: 1 certificate(s) valid";
    for (what, text) in [("renew", &out.stdout), ("renew log", &out.stderr)] {
        assert!(!text.contains('\x1b'), "{what}: {text}");
        assert!(
            !text.lines().any(|l| l.starts_with("CERTD OK")),
            "{what}: {text}"
        );
    }
    assert!(out.stdout.contains(escaped), "{out}");
    let error = fs::read_to_string(&notified).expect("the notify command ran");
    assert!(error.contains(escaped), "{error:?}");
    assert!(!error.contains(['\x1b', '\n']), "{error:?}");

    // Wide enough for the whole error: the table fits its width.
    let table = env.command().arg("status").env("COLUMNS", "200").output();
    assert!(!table.stdout.contains('\x1b'), "{table}");
    assert!(table.stdout.contains("\\x1b[31mred\\nCERTD OK"), "{table}");
    assert!(
        !table.stdout.lines().any(|l| l.starts_with("CERTD OK")),
        "{table}"
    );

    let check = env.certd(&["status", "--check"]);
    assert_eq!(check.stdout.lines().count(), 1, "{check}");
    assert!(check.stdout.starts_with("CERTD "), "{check}");
    assert!(check.stdout.contains(escaped), "{check}");
    assert!(!check.stdout.contains('\x1b'), "{check}");

    // JSON is exact: the CA's text, as sent.
    let row = status_json(&env, "e");
    assert!(
        row["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(detail)),
        "{row}"
    );

    // The daemon's log: the failure is one line, escaped.
    front.forge("/order-plz", Forgery::Problem(detail.into()), 1);
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_output("renewal failed", Duration::from_secs(60));
    let log = daemon.stderr();
    assert!(log.contains(escaped), "{log}");
    assert!(!log.contains('\x1b'), "{log}");
    assert!(!log.lines().any(|l| l.starts_with("CERTD OK")), "{log}");
    daemon.terminate();
}
