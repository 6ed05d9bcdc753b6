//! How certd reacts to the CA's rate limits: a limit holds back only what
//! it names, for as long as the CA's `Retry-After` says, and a pause is
//! shown to the operator, notified once, and retried daily.
//!
//! Test double, and why: Pebble has no rate limits. A front before it
//! (`FaultyFront`) answers chosen newOrders with the problem documents
//! Boulder (Let's Encrypt) sends, in its words: a rate limit with
//! `Retry-After`, and a pause without it. Everything else is real Pebble.

use std::fs;
use std::time::Duration;

use crate::util::{
    AriServer, Fault, FaultyFront, PebbleOpts, Release, TestEnv, Window, ledger_events, wait_for,
};
use certd::ledger::EventKind;

const DAEMON: &str = crate::util::DAEMON_RETRY_4S;

/// How many faults of one kind the front serves at most: more newOrders
/// than any test here may see.
const PLENTY: usize = 1000;

fn cert(name: &str) -> String {
    format!("\n[[certificate]]\nname = \"{name}\"\ndomains = [\"{name}.example.test\"]\n")
}

/// `env`'s configuration text with `extra` appended, pointed at `front`
/// (the account is created through it, so every URL names the front).
fn config_behind(env: &TestEnv, front: &FaultyFront, extra: &str) -> String {
    env.write_config(extra);
    fs::read_to_string(env.config_path())
        .expect("config")
        .replace(&env.pebble.directory_url(), &front.directory_url())
}

/// `certd status --json`'s row for `name`.
fn status_of(env: &TestEnv, name: &str) -> serde_json::Value {
    let out = env.certd(&["status", "--json"]);
    out.assert_success();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).expect("status JSON");
    rows.into_iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {}", out.stdout))
}

/// Seconds from now to the RFC 3339 time `v`.
fn secs_until(v: &serde_json::Value) -> i64 {
    let t = certd::clock::parse_rfc3339(v.as_str().expect("a time")).expect("RFC 3339");
    t - certd::clock::Clock::system().now().secs()
}

/// A per-set limit (Boulder's "exact set of identifiers", `Retry-After:
/// 3600`) was retried after 15 minutes, and it paused every other
/// certificate of the account: one added meanwhile was not issued.
#[test]
fn a_limit_on_one_set_of_names_holds_back_that_certificate_alone() {
    let env = TestEnv::new();
    let front = FaultyFront::start(&env.pebble);
    let base = config_behind(&env, &front, DAEMON);
    env.write_raw_config(&format!("{base}{}", cert("a")));
    front.inject(
        "/order-plz",
        Fault::BoulderRateLimit {
            names: vec!["a.example.test".into()],
            detail: "Error creating new order :: too many certificates (5) already issued for this exact set of identifiers in the last 168h0m0s, retry after 2026-11-30 12:00:00 UTC".into(),
            retry_after: 3600,
        },
        PLENTY,
    );
    let seen_by_ca = || PLENTY - front.left();

    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_output("CA rate limit", Duration::from_secs(60));
    assert_eq!(seen_by_ca(), 1);

    // Another certificate, added while `a` waits: issued at once.
    env.write_raw_config(&format!("{base}{}{}", cert("a"), cert("b")));
    daemon.wait_for_file(&env.cert_dir().join("b/cert.pem"), Duration::from_secs(120));
    let a = status_of(&env, "a");
    let wait = secs_until(&a["next_renewal_at"]);
    assert!(
        (3000..=3700).contains(&wait),
        "a is retried in {wait} s, not after the CA's Retry-After of 3600 s: {a}"
    );
    assert_eq!(a["ca_pause"]["account"], false, "{a}");
    assert!(status_of(&env, "b")["ca_pause"].is_null());
    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");

    // A restart remembers the limit: a third certificate is issued, `a`
    // is still not asked for.
    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_output("certd running", Duration::from_secs(30));
    env.write_raw_config(&format!("{base}{}{}{}", cert("a"), cert("b"), cert("c")));
    daemon.wait_for_file(&env.cert_dir().join("c/cert.pem"), Duration::from_secs(120));
    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
    // One newOrder for `a` over the whole window: one per Retry-After.
    assert_eq!(seen_by_ca(), 1, "newOrders for a.example.test");
    let table = env.certd(&["status"]).stdout;
    assert!(table.contains("a: rate limited by the CA until"), "{table}");
}

/// A paused name's unpause URL appeared only inside an error string, the
/// notify command ran at every retry, and the daemon retried every 15
/// minutes.
#[test]
fn a_pause_is_shown_notified_once_and_retried_daily() {
    let env = TestEnv::new();
    let front = FaultyFront::start(&env.pebble);
    let log = env.dir().join("notify.log");
    let notify = format!(
        "{DAEMON}\n[notify]\ncommand = \"printf '%s %s\\\\n' \\\"$CERTD_EVENT\\\" \\\"$CERTD_UNPAUSE_URL\\\" >> '{}'\"\nafter_failures = 1\n",
        log.display()
    );
    let base = config_behind(&env, &front, &notify);
    env.write_raw_config(&format!("{base}{}", cert("p")));
    let url = "https://portal.example.test/sfe/v1/unpause?jwt=eyJ.p.sig";
    front.inject(
        "/order-plz",
        Fault::BoulderPaused {
            names: vec!["p.example.test".into()],
            unpause_url: url.into(),
        },
        PLENTY,
    );
    let seen_by_ca = || PLENTY - front.left();

    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_output("CA rate limit", Duration::from_secs(60));
    wait_for(&log, Duration::from_secs(30));
    // Another certificate is issued meanwhile: the pause names p alone.
    env.write_raw_config(&format!("{base}{}{}", cert("p"), cert("q")));
    daemon.wait_for_file(&env.cert_dir().join("q/cert.pem"), Duration::from_secs(120));

    let table = env.certd(&["status"]).stdout;
    assert!(
        table.contains("p: paused by the CA since") && table.contains(&format!("unpause at {url}")),
        "{table}"
    );
    let p = status_of(&env, "p");
    assert_eq!(p["ca_pause"]["paused"], true, "{p}");
    assert_eq!(p["ca_pause"]["unpause_url"], url, "{p}");
    let wait = secs_until(&p["next_renewal_at"]);
    assert!(
        wait > 23 * 3600,
        "a paused certificate is retried in {wait} s, not daily: {p}"
    );
    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(seen_by_ca(), 1, "newOrders for p.example.test");

    // An operator retries at once; still paused: told on the terminal, not
    // notified again.
    let out = env.certd(&["renew", "p"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stdout.contains(&format!("unpause at {url}")), "{out}");
    assert_eq!(seen_by_ca(), 2);
    let notified = fs::read_to_string(&log).expect("notify log");
    assert_eq!(notified, format!("renewal-paused {url}\n"));

    // Unpaused at the CA: the next `certd renew p` issues and the pause
    // is gone from `status`.
    front.clear();
    env.certd(&["renew", "p"]).assert_success();
    assert!(status_of(&env, "p")["ca_pause"].is_null());
    let table = env.certd(&["status"]).stdout;
    assert!(!table.contains("p: paused by the CA"), "{table}");
}

/// The guard counted an ARI renewal inside the CA's window against the
/// duplicate-certificate limit, which Let's Encrypt exempts it from
/// (Boulder's `limitsExempt`), and held it back.
#[test]
fn the_guard_lets_an_ari_renewal_inside_its_window_pass() {
    // Pebble 2.4 and a renewalInfo front (a test double: the window must
    // include now, which Pebble 2.10's windows for a new certificate do
    // not).
    let env = TestEnv::with_pebble_opts(PebbleOpts {
        release: Release::Bookworm,
        ..PebbleOpts::default()
    });
    let inside = Window {
        start: -3600,
        end: 3600,
        retry_after: 3600,
    };
    let ari = AriServer::start(&env.pebble, vec![inside]);
    env.write_config(&format!(
        "\n[reaper]\nduplicate_certificates_per_week = 1\n{}",
        cert("ari")
    ));
    let config = fs::read_to_string(env.config_path()).expect("config");
    env.write_raw_config(&config.replace(&env.pebble.directory_url(), &ari.directory_url()));
    env.certd(&["renew"]).assert_success();

    // One certificate for these names this week, limit 1: a renewal that
    // names it in `replaces` inside the window is not held back.
    let out = env.certd(&["renew", "--force"]);
    out.assert_success();
    assert_eq!(ledger_events(&env, EventKind::AriExempt), 1);
    assert_eq!(ledger_events(&env, EventKind::CaLimitGuard), 0);

    // Outside the window the limit counts as before.
    ari.set_windows(vec![Window {
        start: 30 * 86_400,
        end: 31 * 86_400,
        retry_after: 3600,
    }]);
    let out = env.certd(&["renew", "--force"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stdout
            .contains("certificates for these names in a week: 2 in the window (limit 1)"),
        "{out}"
    );
    assert_eq!(ledger_events(&env, EventKind::CaLimitGuard), 1);
}

/// Only an account-wide limit (Boulder's new orders per account) holds
/// back every certificate, and a restart keeps it.
#[test]
fn an_account_wide_limit_holds_back_every_certificate() {
    let env = TestEnv::new();
    let front = FaultyFront::start(&env.pebble);
    let base = config_behind(&env, &front, DAEMON);
    env.write_raw_config(&format!("{base}{}", cert("a")));
    front.inject(
        "/order-plz",
        Fault::BoulderRateLimit {
            names: vec!["a.example.test".into()],
            detail: "Error creating new order :: too many new orders (300) from this account in the last 3h0m0s, retry after 2026-11-29 21:00:00 UTC".into(),
            retry_after: 3600,
        },
        PLENTY,
    );
    // An upper bound over a window: load can only make the count smaller.
    let no_order_within = |what: &str| {
        let window = std::time::Instant::now();
        while window.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(200));
        }
        // The one answered with the limit, none passed on to Pebble.
        let orders = (PLENTY - front.left()) + front.forwarded("/order-plz");
        assert_eq!(orders, 1, "newOrders {what}");
        assert!(
            !env.cert_dir().join("b/cert.pem").exists(),
            "b issued {what}"
        );
    };

    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_output("CA rate limit on the account", Duration::from_secs(60));
    env.write_raw_config(&format!("{base}{}{}", cert("a"), cert("b")));
    daemon.wait_for_output("certificate added", Duration::from_secs(30));
    no_order_within("while the account waits");
    let b = status_of(&env, "b");
    assert_eq!(b["ca_pause"]["account"], true, "{b}");
    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");

    let mut daemon = env.command().arg("run").spawn();
    daemon.wait_for_output("certd running", Duration::from_secs(30));
    no_order_within("after a restart");
    let out = daemon.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
    let table = env.certd(&["status"]).stdout;
    assert!(
        table.contains("the account: rate limited by the CA until"),
        "{table}"
    );
}
