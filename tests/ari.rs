//! ACME Renewal Information (RFC 9773) against Pebble 2.10's own ARI:
//! its `renewalInfo`, its check of `replaces`, and its management API's
//! `/set-renewal-info/`, which replaces the answer for one certificate
//! with any text (a window in the past, or garbage). Also renewal timing
//! for short lifetimes (Pebble's `shortlived` profile, 6 days).
//!
//! The one test against an older CA without ARI is in `daemon.rs`
//! (`ari_window_decides_when_to_renew`, Pebble 2.4 behind a test double).

use std::fs;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use crate::util::{PebbleOpts, TestEnv, ca_certificate, ca_orders, parse_leaf, read_pem_certs};

const EXPLANATION: &str = "https://ca.example.test/incident/42";

/// Fast failure retries and ARI checks every two seconds, so the daemon's
/// next check comes within a test's patience.
const DAEMON: &str = r#"
[daemon]
backoff_min = "1s"
backoff_max = "2s"
shutdown_grace = "10s"
ari_interval = "2s"
"#;

fn cert(name: &str, domain: &str, profile: &str) -> String {
    format!(
        "\n[[certificate]]\nname = \"{name}\"\ndomains = [\"{domain}\"]\nprofile = \"{profile}\"\n"
    )
}

/// The installed leaf: its PEM, serial, and RFC 9773 identifier.
fn installed_leaf(env: &TestEnv, name: &str) -> (String, String, String) {
    let path = env.cert_dir().join(name).join("cert.pem");
    let der = &read_pem_certs(&path)[0];
    let info = certd::install::CertInfo::parse(der).expect("installed certificate parses");
    let pem = fs::read_to_string(&path).expect("cert.pem");
    let id = info.ari_id.expect("Pebble's certificates carry an AKI");
    (pem, parse_leaf(der).1, id)
}

/// Replaces Pebble's `renewalInfo` answer for the certificate `pem` with
/// `answer`, verbatim.
fn set_renewal_info(env: &TestEnv, pem: &str, answer: &str) {
    let body = serde_json::json!({ "Certificate": pem, "ARIResponse": answer });
    let status = block_on(async {
        let http = certd::acme::AcmeHttp::new(
            Some(&env.pebble.ca_bundle()),
            certd::clock::Clock::system(),
        )
        .expect("client");
        http.plain()
            .post(format!("{}/set-renewal-info/", env.pebble.management_url()))
            .body(body.to_string())
            .send()
            .await
            .expect("management request")
            .status()
    });
    assert!(status.is_success(), "set-renewal-info: {status}");
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// A `renewalInfo` body with a window from `start` to `end` seconds from
/// now, and the explanation URL.
fn window(start: i64, end: i64) -> String {
    let at = |offset: i64| {
        let t = time::OffsetDateTime::now_utc() + time::Duration::seconds(offset);
        t.format(&time::format_description::well_known::Rfc3339)
            .expect("format")
    };
    serde_json::json!({
        "suggestedWindow": { "start": at(start), "end": at(end) },
        "explanationURL": EXPLANATION,
    })
    .to_string()
}

fn status_json(env: &TestEnv) -> serde_json::Value {
    let out = env.certd(&["status", "--json"]);
    out.assert_success();
    serde_json::from_str(&out.stdout).expect("status --json")
}

fn unix(v: &serde_json::Value) -> i64 {
    let s = v.as_str().unwrap_or_else(|| panic!("a time, not {v}"));
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .expect("RFC 3339")
        .unix_timestamp()
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Pebble keys issued certificates by their serial's big-endian bytes,
/// without the DER sign byte that certd's `replaces` carries (RFC 9773):
/// for a serial that needs one (1 in 256 of Pebble's), it cannot find the
/// certificate and refuses the hint, and certd rightly orders again without
/// it. A test that asserts `replaces`, or counts requests, first replaces
/// such a certificate.
fn findable_by_pebble(env: &TestEnv, name: &str) {
    for _ in 0..5 {
        let pem = crate::util::read_pem_certs(env.cert_dir().join(name).join("cert.pem"));
        let (_, leaf) = x509_parser::parse_x509_certificate(&pem[0]).expect("X.509");
        if leaf.raw_serial().first() != Some(&0) {
            return;
        }
        env.certd(&["renew", "--force", name]).assert_success();
    }
    panic!("five serials in a row with a sign byte");
}

/// The CA's record of the order that issued the installed certificate:
/// the object whose `certificate` serves it.
fn issuing_order(env: &TestEnv, serial: &str) -> serde_json::Value {
    for order in ca_orders(env) {
        let Some(url) = &order.certificate else {
            continue;
        };
        let chain = ca_certificate(env, url);
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(chain.as_bytes())
            .map(|c: rustls_pki_types::CertificateDer| c.to_vec())
            .expect("a PEM chain");
        if parse_leaf(&der).1 == serial {
            let body = ca_certificate(env, &order.url);
            return serde_json::from_str(&body).expect("order JSON");
        }
    }
    panic!("no order at the CA issued serial {serial}");
}

/// The drill: while `certd run` runs, the CA moves a certificate's window
/// into the past. The daemon renews at its next ARI check, names the
/// certificate it replaces, and logs the CA's explanation. Pebble runs
/// with `-strict`.
#[test]
fn moved_window_renews_at_the_next_check_with_replaces() {
    let env = TestEnv::with_pebble_opts(PebbleOpts {
        strict: true,
        ..PebbleOpts::default()
    });
    env.write_config(&format!(
        "{DAEMON}{}",
        cert("drill", "drill.example.test", "default")
    ));
    env.certd(&["renew"]).assert_success();
    findable_by_pebble(&env, "drill");
    let (pem, first_serial, first_id) = installed_leaf(&env, "drill");

    let mut daemon = env.command().arg("run").spawn();
    // Planned by Pebble's own window (two thirds into 90 days), checked
    // and recorded in the ledger.
    daemon.wait_for_output("scheduled", Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status_json(&env);
        if s[0]["ari_window_start"].is_string() {
            let start = unix(&s[0]["ari_window_start"]);
            assert!(start > now() + 50 * 86_400, "Pebble's window: {s}");
            let next = unix(&s[0]["next_renewal_at"]);
            assert!(
                (start..=unix(&s[0]["ari_window_end"])).contains(&next),
                "{s}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no ARI window recorded: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }

    set_renewal_info(&env, &pem, &window(-7200, -3600));
    let deadline = Instant::now() + Duration::from_secs(90);
    while installed_leaf(&env, "drill").1 == first_serial {
        assert!(
            Instant::now() < deadline,
            "not renewed after the window moved:\n{}",
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, second_serial, _) = installed_leaf(&env, "drill");
    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
    // The renewal's log line names the CA's explanation.
    let renewing = out
        .stderr
        .lines()
        .find(|l| l.contains("renewing") && l.contains("drill"))
        .unwrap_or_else(|| panic!("no renewing line:\n{}", out.stderr));
    assert!(renewing.contains(EXPLANATION), "{renewing}");
    // The CA's own record: the new order replaced the old certificate.
    let order = issuing_order(&env, &second_serial);
    assert_eq!(
        order["replaces"].as_str(),
        Some(first_id.as_str()),
        "{order}"
    );
}

/// Waits until the ledger's ARI answer for the first certificate is due
/// for its re-check, so that the next `certd renew` asks the CA again.
fn wait_for_recheck(env: &TestEnv) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status_json(env);
        let next = unix(&s[0]["ari_next_check"]);
        if now() > next {
            return;
        }
        assert!(Instant::now() < deadline, "re-check time never came: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `certd renew` asks for the window: not due while it lies ahead (and
/// `status` shows it with the CA's explanation), not due and untouched
/// when the CA answers garbage (with a clear line), due once it started.
/// Between two runs it asks no more often than the re-check time the
/// ledger recorded (here `ari_interval`, one second).
#[test]
fn one_shot_renew_follows_the_window_and_survives_garbage() {
    let env = TestEnv::new();
    env.write_config(&format!(
        "\n[daemon]\nari_interval = \"1s\"\n{}",
        cert("once", "once.example.test", "default")
    ));
    env.certd(&["renew"]).assert_success();
    findable_by_pebble(&env, "once");
    let (pem, first_serial, first_id) = installed_leaf(&env, "once");
    let installed_before = fs::read(env.cert_dir().join("once/fullchain.pem")).expect("chain");

    // A window a month out. (The first run recorded no answer: nothing
    // was installed to ask about.)
    set_renewal_info(&env, &pem, &window(30 * 86_400, 31 * 86_400));
    let out = env.certd(&["renew"]);
    out.assert_success();
    assert!(out.stdout.contains("not due until"), "{out}");
    let s = status_json(&env);
    assert_eq!(
        s[0]["ari_explanation_url"].as_str(),
        Some(EXPLANATION),
        "{s}"
    );
    let start = unix(&s[0]["ari_window_start"]);
    assert!(
        (now() + 29 * 86_400..now() + 31 * 86_400).contains(&start),
        "{s}"
    );
    let table = env.certd(&["status"]);
    assert!(
        table.stdout.contains("ARI once: window") && table.stdout.contains(EXPLANATION),
        "{table}"
    );

    // Garbage: a clear error, the earlier window kept, nothing touched.
    set_renewal_info(&env, &pem, "this is not JSON {");
    wait_for_recheck(&env);
    let out = env.certd(&["renew"]);
    out.assert_success();
    assert!(
        out.stderr.contains("once: ARI error") && out.stderr.contains("not a valid window"),
        "{out}"
    );
    assert_eq!(installed_leaf(&env, "once").1, first_serial);
    assert_eq!(
        fs::read(env.cert_dir().join("once/fullchain.pem")).expect("chain"),
        installed_before
    );
    let s = status_json(&env);
    assert!(
        s[0]["ari_error"]
            .as_str()
            .is_some_and(|e| e.contains("not a valid window")),
        "{s}"
    );
    assert_eq!(unix(&s[0]["ari_window_start"]), start, "{s}");
    let table = env.certd(&["status"]);
    assert!(table.stdout.contains("last check failed"), "{table}");

    // An invalid window (end before start) is garbage too.
    set_renewal_info(&env, &pem, &window(-3600, -7200));
    wait_for_recheck(&env);
    let out = env.certd(&["renew"]);
    assert!(out.stderr.contains("ends"), "{out}");
    assert_eq!(installed_leaf(&env, "once").1, first_serial);

    // The window has started: due, and replaced.
    set_renewal_info(&env, &pem, &window(-7200, -3600));
    wait_for_recheck(&env);
    let out = env.certd(&["renew"]);
    out.assert_success();
    let (_, second_serial, _) = installed_leaf(&env, "once");
    assert_ne!(second_serial, first_serial, "{out}");
    // The log names why the CA wanted the renewal.
    assert!(
        out.stderr
            .lines()
            .any(|l| l.contains("ARI window has started") && l.contains(EXPLANATION)),
        "{out}"
    );
    let order = issuing_order(&env, &second_serial);
    assert_eq!(
        order["replaces"].as_str(),
        Some(first_id.as_str()),
        "{order}"
    );
}

/// A 6-day certificate renews at half its lifetime without ARI's help,
/// and one failed renewal is a WARNING, not yet critical.
#[test]
fn shortlived_certificate_renews_at_half_and_warns_on_failure() {
    let env = TestEnv::new();
    env.write_config(&cert("short", "short.example.test", "shortlived"));
    env.certd(&["renew"]).assert_success();
    let s = status_json(&env);
    let not_after = unix(&s[0]["not_after"]);
    let leaf = &read_pem_certs(env.cert_dir().join("short/cert.pem"))[0];
    let info = certd::install::CertInfo::parse(leaf).expect("parse");
    let lifetime = info.not_after - info.not_before;
    assert!(
        (5 * 86_400..7 * 86_400).contains(&lifetime),
        "shortlived lifetime {lifetime}"
    );
    let half = info.not_before + lifetime / 2;
    let next = unix(&s[0]["next_renewal_at"]);
    assert!(
        (half - 60..=half + 60).contains(&next),
        "next {next}, half {half}: {s}"
    );

    // A forced renewal that cannot answer http-01 (the port is taken).
    let blocker = TcpListener::bind(("127.0.0.1", env.pebble.http01_port())).expect("take port");
    let out = env.certd(&["renew", "--force"]);
    out.assert_failure();
    drop(blocker);
    let check = env.certd(&["status", "--check"]);
    assert_eq!(check.code(), Some(1), "{check}");
    assert!(check.stdout.starts_with("CERTD WARNING"), "{check}");
    // The installed certificate and its renewal time are unchanged.
    let s = status_json(&env);
    assert_eq!(unix(&s[0]["not_after"]), not_after);
    assert_eq!(unix(&s[0]["next_renewal_at"]), next, "{s}");
}

/// A renewal the CA's window asked for fails: the notify command is told
/// why the CA wanted it (`CERTD_EXPLANATION_URL`).
#[test]
fn notify_command_hears_the_explanation() {
    let env = TestEnv::new();
    let seen = env.dir().join("notify.env");
    env.write_config(&format!(
        "\n[notify]\ncommand = \"env > '{}'\"\nafter_failures = 1\n{}",
        seen.display(),
        cert("told", "told.example.test", "default")
    ));
    env.certd(&["renew"]).assert_success();
    let (pem, first_serial, _) = installed_leaf(&env, "told");
    set_renewal_info(&env, &pem, &window(-7200, -3600));
    // Due by its window, but http-01 cannot be answered (the port is taken).
    let blocker = TcpListener::bind(("127.0.0.1", env.pebble.http01_port())).expect("take port");
    let out = env.certd(&["renew"]);
    drop(blocker);
    out.assert_failure();
    assert!(out.stdout.contains("told"), "{out}");
    let env_seen = fs::read_to_string(&seen).expect("the notify command ran");
    assert!(
        env_seen.contains(&format!("CERTD_EXPLANATION_URL={EXPLANATION}")),
        "{env_seen}"
    );
    assert!(
        env_seen.contains("CERTD_EVENT=renewal-failed"),
        "{env_seen}"
    );
    assert_eq!(installed_leaf(&env, "told").1, first_serial);
}

/// An operator rolled back to a certificate the CA already saw replaced:
/// the CA's `alreadyReplaced` (409) is an answer. certd orders again
/// without `replaces` and installs the new certificate.
#[test]
fn already_replaced_is_an_answer() {
    let env = TestEnv::new();
    env.write_config(&cert("back", "back.example.test", "default"));
    env.certd(&["renew"]).assert_success();
    let (_, first_serial, _) = installed_leaf(&env, "back");
    let dir = env.cert_dir().join("back");
    let first_version = fs::read_link(dir.join("current")).expect("current link");
    env.certd(&["renew", "--force"]).assert_success();
    let (_, second_serial, _) = installed_leaf(&env, "back");
    assert_ne!(second_serial, first_serial);

    // The rollback `install` keeps the previous version for.
    let tmp = dir.join("current.rollback");
    std::os::unix::fs::symlink(&first_version, &tmp).expect("symlink");
    fs::rename(&tmp, dir.join("current")).expect("roll back");
    assert_eq!(installed_leaf(&env, "back").1, first_serial);

    let out = env.certd(&["renew", "--force"]);
    out.assert_success();
    assert!(out.stderr.contains("alreadyReplaced"), "{out}");
    let (_, third_serial, _) = installed_leaf(&env, "back");
    assert!(
        third_serial != first_serial && third_serial != second_serial,
        "{out}"
    );
    let order = issuing_order(&env, &third_serial);
    assert!(order.get("replaces").is_none(), "{order}");
}

/// Pebble forgets its certificates and issuers when it restarts, and then
/// answers `renewalInfo` with a 400 problem (no Retry-After). That is the
/// CA's answer, reported as such (instant-acme 0.8.5 reported "missing
/// Retry-After header"), a long-term error; the lifetime rule keeps the
/// certificate, which is not due.
#[test]
fn a_certificate_the_ca_does_not_know_is_a_clear_error() {
    let mut env = TestEnv::new();
    env.write_config(&cert("lost", "lost.example.test", "default"));
    env.certd(&["renew"]).assert_success();
    let (_, serial, _) = installed_leaf(&env, "lost");
    env.pebble.restart();
    let out = env.certd(&["renew"]);
    out.assert_success();
    assert!(out.stdout.contains("lost: valid, not due until"), "{out}");
    assert!(
        out.stderr
            .contains("lost: ARI error: the CA answered 400 Bad Request: malformed: "),
        "{out}"
    );
    assert!(!out.stderr.contains("Retry-After"), "{out}");
    assert_eq!(installed_leaf(&env, "lost").1, serial);
    let s = status_json(&env);
    assert!(
        s[0]["ari_error"]
            .as_str()
            .is_some_and(|e| e.contains("400")),
        "{s}"
    );
    assert!(s[0]["ari_next_check"].is_string(), "{s}");
}

/// What an ARI-driven renewal costs: the requests of a forced renewal of
/// the same certificate, plus the renewalInfo GET (and, for a one-shot
/// run, which asks before it loads its account, one more directory GET).
#[test]
fn an_ari_driven_renewal_costs_one_renewal_info_get() {
    let env = TestEnv::with_pebble_opts(PebbleOpts {
        nonce_reject: Some(0),
        authz_reuse: Some(0),
        ..PebbleOpts::default()
    });
    env.write_config(&cert("cost", "cost.example.test", "default"));
    env.certd(&["renew"]).assert_success();
    findable_by_pebble(&env, "cost");
    let requests_of = |args: &[&str]| {
        let before = env.pebble.pebble_log().len();
        env.certd(args).assert_success();
        let log = env.pebble.pebble_log();
        // "Pebble 2026/11/29 17:54:40 GET /dir -> calling handler()"
        let mut handled: Vec<String> = log[before..]
            .lines()
            .filter_map(|l| l.strip_suffix(" -> calling handler()"))
            .map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                words[words.len().saturating_sub(2)..].join(" ")
            })
            .collect();
        handled.sort();
        handled
    };
    // Polls (authorization, order) depend on how fast Pebble validates;
    // every other request is the protocol's own.
    let unpolled = |requests: Vec<String>| -> Vec<String> {
        requests
            .into_iter()
            .filter(|r| r != "POST /authZ/" && r != "POST /my-order/")
            .collect()
    };
    crate::util::forget_valid_authz(&env);
    let forced = requests_of(&["renew", "--force"]);
    assert!(forced.contains(&"POST /authZ/".to_owned()), "{forced:#?}");
    let forced = unpolled(forced);
    // The protocol: the directory, a nonce, newOrder, the challenge,
    // finalize, the certificate. certd's account is known: no newAccount.
    assert_eq!(
        forced,
        [
            "GET /dir",
            "HEAD /nonce-plz",
            "POST /certZ/",
            "POST /chalZ/",
            "POST /finalize-order/",
            "POST /order-plz"
        ],
        "{forced:#?}"
    );
    findable_by_pebble(&env, "cost");
    let (pem, _, _) = installed_leaf(&env, "cost");
    set_renewal_info(&env, &pem, &window(-7200, -3600));
    crate::util::forget_valid_authz(&env);
    let driven = unpolled(requests_of(&["renew"]));
    let mut expected = forced.clone();
    expected.push("GET /dir".to_owned());
    expected.push("GET /draft-ietf-acme-ari-03/renewalInfo/".to_owned());
    expected.sort();
    assert_eq!(driven, expected);
}
