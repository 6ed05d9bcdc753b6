//! Several CAs for one certificate (`[ca.<name>]`, `ca = [...]`): certd
//! falls back to the next CA in the list when the current one cannot issue
//! soon, never on a validation failure, and returns to the first for the
//! next renewal unless the certificate is `sticky`.
//!
//! Two real Pebbles with roots of their own (`TestEnv::second_ca`): both
//! validate at the same http-01 port, so one certd answers both, and every
//! certificate is traced to its CA by verifying its chain to that
//! Pebble's root. The orders are read at both CAs, through certd's
//! account at each.

use std::fs;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{
    CaAccount, CaTable, Fault, FaultyFront, Pebble, PebbleOpts, TestEnv, assert_nothing_pending_at,
    ca_orders_at, free_port, installed, issuing_roots, ledger_authz, ledger_authz_urls,
    read_pem_certs,
};

/// Retries 1 s to 2 s apart, so a fallback after 2 s of failures comes
/// within a few attempts.
const DAEMON: &str = crate::util::DAEMON_RETRY_2S;

/// The smallest `ca_fallback_after` that still lets certd see a streak of
/// failures (two attempts at least, with `DAEMON`'s backoff) before it
/// falls back.
const FALLBACK_AFTER: Duration = Duration::from_secs(2);

/// How long anything here may take on a loaded machine: an order and a
/// fallback, many times over.
const PATIENCE: Duration = Duration::from_secs(90);

/// Pebble's `shortlived` profile (6 days).
const SHORTLIVED_SECS: i64 = 518_400;

/// A `[[certificate]]` for `<name>.example.test` that may use the CAs
/// `first` and `second`, in that order, with `extra` keys.
fn cert(name: &str, extra: &str) -> String {
    format!(
        "\n[[certificate]]\nname = \"{name}\"\ndomains = [\"{name}.example.test\"]\nca = [\"first\", \"second\"]\nca_fallback_after = \"{}s\"\n{extra}",
        FALLBACK_AFTER.as_secs()
    )
}

/// The two CAs of a test as certd's configuration names them.
fn two_cas(env: &TestEnv, second: &Pebble) -> [CaTable; 2] {
    [
        CaTable::of("first", &env.pebble),
        CaTable::of("second", second),
    ]
}

/// `certd status --json`'s row for `name`.
fn status_row(env: &TestEnv, name: &str) -> Value {
    let out = env.certd(&["status", "--json"]);
    out.assert_success();
    let rows: Vec<Value> = serde_json::from_str(&out.stdout).expect("status JSON");
    rows.into_iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {}", out.stdout))
}

/// Panics unless `status --json` says `name` was issued by `issuer` and
/// its next renewal tries `next` first.
#[track_caller]
fn assert_cas_in_status(env: &TestEnv, name: &str, issuer: &str, next: &str) {
    let row = status_row(env, name);
    assert_eq!(row["issuer_ca"], issuer, "{name}: issuer_ca in {row}");
    assert_eq!(row["next_ca"], next, "{name}: next_ca in {row}");
}

/// Panics unless the installed chain of `name` verifies to the root of
/// `ca`, one of the named Pebbles (roots as they are now: a restarted
/// Pebble has a new one).
#[track_caller]
fn assert_issued_by(env: &TestEnv, name: &str, ca: &str, cas: &[(&str, &Pebble)]) {
    // A stopped Pebble serves no root; what it issued before it stopped
    // chains to one that is gone with it anyway.
    let roots: Vec<(&str, Vec<u8>)> = cas
        .iter()
        .filter_map(|(n, p)| p.try_root().ok().map(|r| (*n, r)))
        .collect();
    assert_eq!(
        issuing_roots(env, name, &roots),
        [ca],
        "{name}: the installed chain verifies to the root of CA {ca} alone"
    );
}

/// How many newOrder requests `pebble` has received, from its log (one
/// line per request, across restarts). Pebble leaves `invalid` orders out
/// of an account's orders list; its log misses none.
fn new_orders(pebble: &Pebble) -> usize {
    pebble.pebble_log().matches("/order-plz").count()
}

/// The end of every test: at each CA, every authorization of every order
/// the CA lists for certd's account is in the ledger (`certd authz list`),
/// `certd status` shows a block for each account, and no authorization is
/// pending at either CA.
fn assert_ledger_matches_cas(env: &TestEnv, cas: &[CaTable]) {
    let recorded = ledger_authz_urls(&ledger_authz(env));
    let status = env.certd(&["status"]);
    status.assert_success();
    for table in cas {
        let ca = CaAccount::at(env, table);
        if ca.exists() {
            assert!(
                status
                    .stdout
                    .contains(&format!("directory: {}", table.directory)),
                "no account block for CA {}: {}",
                table.name,
                status.stdout
            );
            for order in ca_orders_at(&ca) {
                for authz in order.authz.keys() {
                    assert!(
                        recorded.contains(authz),
                        "CA {}: {authz} of order {} is not in the ledger: {recorded:#?}",
                        table.name,
                        order.url
                    );
                }
            }
        }
        assert_nothing_pending_at(env, &ca);
    }
}

/// The first CA is down: after `ca_fallback_after` of failures the second
/// issues; once the first is back, the next renewal goes to it again.
#[test]
fn a_ca_down_past_the_fallback_delay_hands_over_until_it_is_back() {
    let mut env = TestEnv::new();
    let second = env.second_ca(PebbleOpts::default());
    let cas = two_cas(&env, &second);
    env.write_config_cas(&cas, &format!("{DAEMON}{}", cert("c", "")));
    env.pebble.stop();

    let started = Instant::now();
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_file(&env.cert_dir().join("c/cert.pem"), PATIENCE);
    assert!(
        started.elapsed() >= FALLBACK_AFTER,
        "fell back after {:?}, before ca_fallback_after",
        started.elapsed()
    );
    daemon.wait_for_output("falling back to CA second", PATIENCE);
    assert_issued_by(
        &env,
        "c",
        "second",
        &[("first", &env.pebble), ("second", &second)],
    );
    assert_cas_in_status(&env, "c", "second", "first");
    let table = env.certd(&["status"]);
    table.assert_success();
    // For the record (`--nocapture`): what an operator sees after a fallback.
    println!("{}", table.stdout);

    // The first CA is back: a renewal goes to it, not to the CA that
    // issued the installed certificate.
    env.pebble.restart();
    let (_, before, _) = installed(&env, "c");
    env.certd(&["renew", "--force", "c"]).assert_success();
    let (_, after, _) = installed(&env, "c");
    assert_ne!(after, before, "a new certificate");
    assert_issued_by(
        &env,
        "c",
        "first",
        &[("first", &env.pebble), ("second", &second)],
    );
    assert_cas_in_status(&env, "c", "first", "first");
    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
    assert_ledger_matches_cas(&env, &cas);
}

/// The same outage seen by one-shot runs (`certd renew` from a timer):
/// the first CA's streak of failures is kept across runs, so a run once
/// it lasted `ca_fallback_after` goes to the second CA, and the renewal
/// after the first CA is back goes to the first again.
#[test]
fn renew_runs_fall_back_once_the_outage_lasted_long_enough() {
    let mut env = TestEnv::new();
    let second = env.second_ca(PebbleOpts::default());
    let cas = two_cas(&env, &second);
    env.write_config_cas(&cas, &cert("o", ""));
    env.pebble.stop();

    let started = Instant::now();
    let out = env.certd(&["renew"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert_eq!(new_orders(&second), 0, "newOrders at the second CA");
    // The ledger counts in whole seconds: a second more than the delay.
    while started.elapsed() < FALLBACK_AFTER + Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = env.certd(&["renew"]);
    out.assert_success();
    assert!(out.stderr.contains("falling back to CA second"), "{out}");
    assert_issued_by(
        &env,
        "o",
        "second",
        &[("first", &env.pebble), ("second", &second)],
    );
    assert_cas_in_status(&env, "o", "second", "first");

    env.pebble.restart();
    env.certd(&["renew", "--force", "o"]).assert_success();
    assert_issued_by(
        &env,
        "o",
        "first",
        &[("first", &env.pebble), ("second", &second)],
    );
    assert_cas_in_status(&env, "o", "first", "first");
    assert_ledger_matches_cas(&env, &cas);
}

/// `sticky = true`: the renewal after a fallback starts at the CA that
/// issued the installed certificate, even with the first one back.
#[test]
fn a_sticky_certificate_stays_with_the_ca_that_issued_it() {
    let mut env = TestEnv::new();
    let second = env.second_ca(PebbleOpts::default());
    let cas = two_cas(&env, &second);
    env.write_config_cas(&cas, &format!("{DAEMON}{}", cert("s", "sticky = true\n")));
    env.pebble.stop();

    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_file(&env.cert_dir().join("s/cert.pem"), PATIENCE);
    assert_issued_by(
        &env,
        "s",
        "second",
        &[("first", &env.pebble), ("second", &second)],
    );
    assert_cas_in_status(&env, "s", "second", "second");

    env.pebble.restart();
    let (_, before, _) = installed(&env, "s");
    env.certd(&["renew", "--force", "s"]).assert_success();
    let (_, after, _) = installed(&env, "s");
    assert_ne!(after, before, "a new certificate");
    assert_issued_by(
        &env,
        "s",
        "second",
        &[("first", &env.pebble), ("second", &second)],
    );
    assert_cas_in_status(&env, "s", "second", "second");
    assert_eq!(new_orders(&env.pebble), 0, "newOrders at the first CA");
    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
    assert_ledger_matches_cas(&env, &cas);
}

/// A rate limit at the first CA: one whose `Retry-After` ends after the
/// certificate must be renewed at the latest hands the order to the
/// second CA; a shorter one waits for the first.
///
/// Test double, and why: Pebble has no rate limits. The only double here
/// is a `FaultyFront` before the first CA, which answers chosen newOrders
/// with Boulder's rate-limit problem and `Retry-After`; everything else,
/// the second CA included, is real Pebble.
#[test]
fn a_rate_limit_past_the_safe_deadline_falls_back_and_a_shorter_one_waits() {
    let env = TestEnv::new();
    let front = FaultyFront::start(&env.pebble);
    let second = env.second_ca(PebbleOpts::default());
    let cas = [
        CaTable::behind("first", front.directory_url(), &env.pebble),
        CaTable::of("second", &second),
    ];
    // Six-day certificates: their safe deadline is days away, within the
    // 7 days certd accepts a Retry-After for.
    let shortlived = "profile = \"shortlived\"\n";
    env.write_config_cas(
        &cas,
        &[
            cert("short", shortlived),
            cert("long", shortlived),
            cert("fresh", shortlived),
        ]
        .concat(),
    );
    let limit = |name: &str, retry_after: u64| {
        front.inject(
            "/order-plz",
            Fault::BoulderRateLimit {
                names: vec![format!("{name}.example.test")],
                detail: "Error creating new order :: too many certificates (5) already issued for this exact set of identifiers in the last 168h0m0s, retry after 2026-12-01 12:00:00 UTC".into(),
                retry_after,
            },
            100,
        );
    };
    let roots = [("first", &env.pebble), ("second", &second)];

    // Nothing installed, so the safe deadline is now: even an hour is
    // too long to wait.
    limit("fresh", 3600);
    env.certd(&["renew"]).assert_success();
    assert_issued_by(&env, "short", "first", &roots);
    assert_issued_by(&env, "long", "first", &roots);
    assert_issued_by(&env, "fresh", "second", &roots);
    assert_cas_in_status(&env, "fresh", "second", "first");
    // newOrder requests, not orders: a `badNonce` (Pebble rejects 5 %)
    // makes certd send one again.
    let at_second = new_orders(&second);
    assert!(at_second >= 1, "newOrders at the second CA: {at_second}");

    // An hour, for a certificate that must be renewed days from now:
    // certd waits for the first CA.
    limit("short", 3600);
    let (_, before, _) = installed(&env, "short");
    let out = env.certd(&["renew", "--force", "short"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stdout.contains("rateLimited"), "{out}");
    assert_eq!(
        installed(&env, "short").1,
        before,
        "short kept its certificate"
    );
    assert_eq!(new_orders(&second), at_second, "newOrders at the second CA");
    assert_cas_in_status(&env, "short", "first", "first");

    // Five days, past the safe deadline of a six-day certificate: the
    // second CA issues.
    limit("long", 5 * 86_400);
    env.certd(&["renew", "--force", "long"]).assert_success();
    assert_issued_by(&env, "long", "second", &roots);
    assert_cas_in_status(&env, "long", "second", "first");
    assert!(
        new_orders(&second) > at_second,
        "no newOrder at the second CA"
    );
    let table = env.certd(&["status"]);
    table.assert_success();
    // For the record (`--nocapture`): what an operator sees after fallbacks.
    println!("{}", table.stdout);
    let leaf = read_pem_certs(env.cert_dir().join("long/cert.pem"));
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf[0]).expect("parse the leaf");
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!(
        (SHORTLIVED_SECS - 1..=SHORTLIVED_SECS).contains(&lifetime),
        "the second CA issued under the configured profile: {lifetime} s"
    );
    assert_ledger_matches_cas(&env, &cas);
}

/// The first CA offers no `shortlived` profile, the only one Let's
/// Encrypt issues IP certificates under: a certificate for 127.0.0.1 is
/// not ordered there, and the second CA issues it under `shortlived`.
#[test]
fn an_ip_certificate_goes_to_the_ca_whose_profile_allows_it() {
    let env = TestEnv::with_pebble_opts(PebbleOpts {
        profiles: Some(vec![("default", 7_776_000)]),
        ..PebbleOpts::default()
    });
    let second = env.second_ca(PebbleOpts::default());
    let cas = two_cas(&env, &second);
    env.write_config_cas(
        &cas,
        "\n[[certificate]]\nname = \"ip\"\ndomains = [\"127.0.0.1\"]\nchallenges = [\"http-01\"]\nca = [\"first\", \"second\"]\n",
    );
    env.certd(&["renew"]).assert_success();
    assert_issued_by(
        &env,
        "ip",
        "second",
        &[("first", &env.pebble), ("second", &second)],
    );
    assert_eq!(new_orders(&env.pebble), 0, "newOrders at the first CA");
    let row = status_row(&env, "ip");
    assert_eq!(row["issuer_ca"], "second", "{row}");
    assert_eq!(row["profile"], "shortlived", "{row}");
    let leaf = read_pem_certs(env.cert_dir().join("ip/cert.pem"));
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf[0]).expect("parse the leaf");
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!(
        (SHORTLIVED_SECS - 1..=SHORTLIVED_SECS).contains(&lifetime),
        "issued under shortlived: {lifetime} s"
    );
    assert_ledger_matches_cas(&env, &cas);
}

/// A validation failure is the operator's to fix: another CA would fail
/// the same way, so certd retries the first CA however long it fails and
/// never asks the second.
#[test]
fn a_validation_failure_never_falls_back() {
    let env = TestEnv::new();
    let second = env.second_ca(PebbleOpts::default());
    let cas = two_cas(&env, &second);
    env.write_config_cas(
        &cas,
        &format!("{DAEMON}{}", cert("v", "challenges = [\"http-01\"]\n")),
    );
    // certd's responder listens where neither CA looks: validation fails.
    let config = fs::read_to_string(env.config_path()).expect("config");
    let right = format!("listen = \"127.0.0.1:{}\"", env.pebble.http01_port());
    assert!(config.contains(&right), "{config}");
    env.write_raw_config(&config.replace(
        &right,
        &format!("listen = \"127.0.0.1:{}\"\npreflight = false", free_port()),
    ));

    // Failed orders at the first CA over more than `ca_fallback_after`.
    let started = Instant::now();
    let mut daemon = env.command().arg("run").spawn();
    let deadline = started + PATIENCE;
    while new_orders(&env.pebble) < 3 || started.elapsed() < 2 * FALLBACK_AFTER {
        assert!(
            Instant::now() < deadline && daemon.is_running(),
            "{} newOrders at the first CA in {PATIENCE:?}\n{}",
            new_orders(&env.pebble),
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(!out.stderr.contains("falling back"), "{}", out.stderr);
    assert_eq!(new_orders(&second), 0, "newOrders at the second CA");
    assert!(!env.cert_dir().join("v/cert.pem").exists());

    let row = status_row(&env, "v");
    assert_eq!(row["last_result"], "error", "{row}");
    assert!(row["issuer_ca"].is_null(), "{row}");
    assert_eq!(row["next_ca"], "first", "{row}");
    let error = row["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("v.example.test: http-01 validation failed"),
        "{row}"
    );
    // The operator is told that this one is theirs to fix: no other CA
    // was asked, and none would do better.
    let table = env.certd(&["status"]).stdout;
    assert!(
        ["operator", "other CA", "another CA", "fall back"]
            .iter()
            .any(|says| table.contains(says) || error.contains(says)),
        "status does not say the validation failure is the operator's:\n{table}\n{row}"
    );
    assert_ledger_matches_cas(&env, &cas);
}
