//! Fleet mode under faults: three `certd run` hosts on one PostgreSQL and
//! one Pebble (`util::fleet`), one of them killed, stopped, cut off from
//! the database or with its wall clock off, the database itself stopped,
//! or the CA's validations failing. What is asserted is what the CA and
//! the shared database saw:
//! one `newOrder` per certificate per round, fleet-wide; a peer takes the
//! lease over under the next epoch and finishes the same order; every
//! host installs the same serial with a matching key; nothing is left
//! pending at the CA. Failover times are printed (`eprintln!`) so that a
//! run's log holds them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::util::fleet::{FleetEnv, HOST_IDS, LEASE_TTL, http_cert, wait_until};
use crate::util::{Daemon, TestCommand, snapshot};

/// The hosts, running; `None` once killed.
struct Running(Vec<Option<Daemon>>);

impl Running {
    fn start(env: &FleetEnv) -> Running {
        Running(env.hosts.iter().map(|h| Some(h.spawn())).collect())
    }

    fn live(&self) -> Vec<&Daemon> {
        self.0.iter().flatten().collect()
    }

    fn get(&self, id: &str) -> &Daemon {
        self.0[index(id)].as_ref().expect("a running host")
    }

    /// kill -9 of host `id`.
    fn kill(&mut self, id: &str) {
        let daemon = self.0[index(id)].take().expect("a running host");
        daemon.signal("KILL");
        let _ = daemon.wait();
    }

    /// What the hosts logged about orders and leases, for a failure's
    /// message.
    fn story(&self, env: &FleetEnv) -> String {
        let orders: Vec<(String, i64)> = env.query(
            "SELECT cert_name, COUNT(*) FROM orders WHERE $1 = $1 GROUP BY cert_name ORDER BY 1",
            "",
        );
        let mut text = format!("orders in the ledger per certificate: {orders:?}\n");
        for line in env
            .pebble
            .pebble_log()
            .lines()
            .filter(|l| l.contains("/order-plz") || l.contains("Added order "))
        {
            text.push_str(&format!("pebble: {line}\n"));
        }
        for (id, daemon) in HOST_IDS.iter().zip(&self.0) {
            let Some(daemon) = daemon else { continue };
            text.push_str(&format!("--- {id} ---\n"));
            let (stdout, stderr) = (daemon.stdout(), daemon.stderr());
            for line in stdout.lines().chain(stderr.lines()).filter(|l| {
                ["order", "lease", "failed", "install", "ERROR"]
                    .iter()
                    .any(|w| l.contains(w))
            }) {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }

    /// SIGTERM to every host still running; each exits cleanly.
    fn stop(self) {
        for daemon in self.0.into_iter().flatten() {
            let out = daemon.terminate();
            assert_eq!(out.code(), Some(0), "{out}");
        }
    }
}

fn index(id: &str) -> usize {
    HOST_IDS
        .iter()
        .position(|h| *h == id)
        .unwrap_or_else(|| panic!("no host {id}"))
}

/// Waits until every host in `ids` has installed `name` with the same
/// serial; returns it.
fn wait_installed_everywhere(env: &FleetEnv, name: &str, ids: &[&str], run: &Running) -> String {
    let serials = || -> Option<String> {
        let serials: Vec<Option<String>> = ids
            .iter()
            .map(|id| env.host(id).installed_serial(name))
            .collect();
        let first = serials.first()?.clone()?;
        serials
            .iter()
            .all(|s| s.as_deref() == Some(first.as_str()))
            .then_some(first)
    };
    wait_until(
        &format!("{name} installed with one serial on {ids:?}"),
        || serials().is_some(),
        &run.live(),
    );
    serials().expect("installed")
}

/// Pebble validates at a round-robin balancer over the three hosts'
/// responders: validations land on hosts that did not order, which answer
/// from the fleet's database. Every host installs the same serial with a
/// matching key, and each certificate was ordered once.
#[test]
fn balanced_validations_reach_every_host_and_each_certificate_is_ordered_once() {
    let names = ["one", "two", "three"];
    let env = FleetEnv::new(&names.iter().map(|n| http_cert(n)).collect::<String>());
    let start = Instant::now();
    let run = Running::start(&env);
    let mut serials = BTreeMap::new();
    for name in names {
        serials.insert(name, wait_installed_everywhere(&env, name, &HOST_IDS, &run));
    }
    let relayed = env.balancer.relayed();
    eprintln!(
        "fleet: 3 certificates on 3 hosts in {:?}; validation connections per host \
         {relayed:?}; newOrders {}",
        start.elapsed(),
        env.new_orders()
    );
    assert_eq!(
        env.new_orders(),
        names.len(),
        "one newOrder per certificate\n{}",
        run.story(&env)
    );
    // Each certificate was ordered by one host; the CA's validations
    // reached all three, and every one of them succeeded.
    assert!(
        relayed.iter().all(|n| *n > 0),
        "validations reached every host: {relayed:?}"
    );
    let distinct: std::collections::BTreeSet<&String> = serials.values().collect();
    assert_eq!(distinct.len(), names.len(), "{serials:?}");
    env.assert_nothing_pending_at_ca();
    run.stop();
    assert_eq!(env.new_orders(), names.len(), "nothing ordered at shutdown");
}

/// Where the leaseholder is killed, right after each: the front holds (Pebble acted, the
/// answer never comes) or stalls (Pebble never sees it) the request that
/// follows the stage.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// The CA created the order; the holder never heard.
    NewOrder,
    /// The authorization is in the ledger, its answer committed; the
    /// challenge was never posted.
    AuthzWrite,
    /// The CA was asked to validate; the holder never heard.
    ChallengePost,
    /// The CA was asked to validate and is still at it when the lease
    /// passes on (its requests reach the hosts late): the next holder
    /// waits for that validation rather than answer the challenge again,
    /// which the CA refuses and which would cost the order.
    Validating,
    /// The order key is sealed in the database; finalize never reached
    /// the CA.
    KeySeal,
    /// The CA finalized (issued); the holder never heard.
    Finalize,
}

/// Kills the leaseholder at `stage`; a peer takes the lease over under
/// the next epoch within the lease's ttl and a second, and finishes the
/// same order: one newOrder, every surviving host installs one serial,
/// nothing pending at the CA.
fn killed_holder_is_replaced(stage: Stage) {
    let env = FleetEnv::new(&http_cert("k"));
    match stage {
        Stage::NewOrder => env.front.hold("/order-plz", None),
        Stage::AuthzWrite => env.front.stall("/chalZ/"),
        Stage::ChallengePost => env.front.hold("/chalZ/", None),
        Stage::Validating => {
            env.front.hold("/chalZ/", None);
            // Past the takeover (at most ttl + 1 s after the kill), within
            // Pebble's 15 s validation timeout.
            env.balancer.set_delay(LEASE_TTL + Duration::from_secs(3));
        }
        Stage::KeySeal => env.front.stall("/finalize-order/"),
        Stage::Finalize => env.front.hold("/finalize-order/", None),
    }
    let mut run = Running::start(&env);
    wait_until(
        &format!("{stage:?}: the front holds the holder's request"),
        || env.front.held() > 0,
        &run.live(),
    );
    let (holder, epoch) = env.lease("k").expect("the lease");
    let holder = holder.unwrap_or_else(|| panic!("{stage:?}: nobody holds the lease"));
    let holder: &str = HOST_IDS[index(&holder)];
    let killed = Instant::now();
    run.kill(holder);
    // As a load balancer's health check would: a dead host gets no more
    // validations (the CA's would otherwise land on it and fail).
    env.balancer.set_down(index(holder), true);
    let survivors: Vec<&str> = HOST_IDS.iter().copied().filter(|h| *h != holder).collect();

    let mut taken = None;
    let to_epoch = wait_until(
        &format!("{stage:?}: a peer takes the lease over"),
        || {
            taken = env.lease("k").filter(|(_, e)| *e > epoch);
            taken.is_some()
        },
        &run.live(),
    );
    let (new_holder, new_epoch) = taken.expect("taken over");
    eprintln!(
        "fleet: {stage:?}: killed {holder} (epoch {epoch}); epoch {new_epoch} ({new_holder:?}) \
         after {to_epoch:?}"
    );
    let serial = wait_installed_everywhere(&env, "k", &survivors, &run);
    let to_installed = killed.elapsed();
    eprintln!(
        "fleet: {stage:?}: installed on {survivors:?} {to_installed:?} after the kill \
         (issuance after the takeover {:?}); newOrders {}",
        to_installed.saturating_sub(to_epoch),
        env.new_orders()
    );
    assert_eq!(new_epoch, epoch + 1, "{stage:?}: the next epoch");
    assert!(
        to_epoch <= LEASE_TTL + Duration::from_secs(1),
        "{stage:?}: failover to the new epoch took {to_epoch:?}"
    );
    assert_eq!(
        env.new_orders(),
        1,
        "{stage:?}: the peer finished the order\n{}",
        run.story(&env)
    );
    assert!(!serial.is_empty());
    env.assert_nothing_pending_at_ca();
    run.stop();
}

#[test]
fn kill_9_of_the_holder_after_new_order() {
    killed_holder_is_replaced(Stage::NewOrder);
}

#[test]
fn kill_9_of_the_holder_after_the_authz_write() {
    killed_holder_is_replaced(Stage::AuthzWrite);
}

#[test]
fn kill_9_of_the_holder_after_the_challenge_post() {
    killed_holder_is_replaced(Stage::ChallengePost);
}

#[test]
fn kill_9_of_the_holder_while_the_ca_validates() {
    killed_holder_is_replaced(Stage::Validating);
}

#[test]
fn kill_9_of_the_holder_after_the_key_seal() {
    killed_holder_is_replaced(Stage::KeySeal);
}

#[test]
fn kill_9_of_the_holder_after_finalize() {
    killed_holder_is_replaced(Stage::Finalize);
}

/// Sends `signal` to `daemon`'s process.
fn signal(daemon: &Daemon, signal: &str) {
    daemon.signal(signal);
}

/// The holder is stopped (SIGSTOP) mid-order for twice the lease's ttl; a
/// peer takes over and finishes the same order. Woken (SIGCONT), the old
/// holder sends the CA nothing (not a byte through its egress) and writes
/// nothing to the ledger.
///
/// The holder is stopped as soon as the CA has created its order: wherever
/// it is then, up to its challenge POST, which the front stalls so the CA
/// never validates towards the stopped host. (A validation the CA had
/// started there would hang on the stopped host and fail, and the order
/// with it: a second order is then a retry, not a duplicate.)
#[test]
fn a_holder_stopped_for_two_ttls_sends_and_writes_nothing_when_it_wakes() {
    let env = FleetEnv::new(&http_cert("s"));
    env.front.stall("/chalZ/");
    let run = Running::start(&env);
    wait_until(
        "the CA created the order",
        || env.new_orders() > 0,
        &run.live(),
    );
    let (holder, epoch) = env.lease("s").expect("the lease");
    let holder = HOST_IDS[index(&holder.expect("a holder"))];
    signal(run.get(holder), "STOP");
    let stopped = Instant::now();
    // A health-checking balancer takes the host that stopped answering
    // out of the rotation; the CA's validations go to the others.
    env.balancer.set_down(index(holder), true);
    // A challenge POST the holder wrote before it stopped has reached the
    // front by now; if none did, the peer's passes.
    std::thread::sleep(Duration::from_secs(1));
    env.front.disarm_stalls();
    assert_eq!(
        env.lease("s").and_then(|(h, _)| h).as_deref(),
        Some(holder),
        "stopped while it held the lease, mid-order"
    );
    let survivors: Vec<&str> = HOST_IDS.iter().copied().filter(|h| *h != holder).collect();
    let to_epoch = wait_until(
        "a peer takes the lease over",
        || env.lease("s").is_some_and(|(_, e)| e > epoch),
        &run.live(),
    );
    eprintln!(
        "fleet: SIGSTOP {holder}: epoch {} after {to_epoch:?}",
        epoch + 1
    );
    wait_installed_everywhere(&env, "s", &survivors, &run);
    // The fault's length, not a wait for an outcome.
    if let Some(rest) = (LEASE_TTL * 2).checked_sub(stopped.elapsed()) {
        std::thread::sleep(rest);
    }
    let ledger = env.ledger_snapshot();
    let egress = env.host(holder);
    let (tunnels, sent) = (egress.egress.tunnels(), egress.egress.sent());
    let orders = env.new_orders();
    signal(run.get(holder), "CONT");
    let woke = Instant::now();
    env.balancer.set_down(index(holder), false);

    let woken = run.get(holder);
    wait_until(
        "the woken host sees its lease lost",
        || {
            woken
                .stderr()
                .contains("lease lost; this host stops acting under it")
        },
        &[woken],
    );
    wait_until(
        "the woken host counts the loss",
        || {
            let page = env.host(holder).metrics();
            page.lines()
                .filter(|l| l.starts_with("certd_fleet_lease_losses_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
                >= 1.0
        },
        &[woken],
    );
    let (tunnels_after, sent_after) = (egress.egress.tunnels(), egress.egress.sent());
    eprintln!(
        "fleet: SIGSTOP {holder} for {:?}; epoch {} after {to_epoch:?}; after SIGCONT \
         ({:?} ago) it opened {} connections to the CA and sent {} bytes",
        woke.duration_since(stopped),
        epoch + 1,
        woke.elapsed(),
        tunnels_after - tunnels,
        sent_after - sent
    );
    assert_eq!(
        (tunnels_after - tunnels, sent_after - sent),
        (0, 0),
        "no CA request after waking; the woken host's log:\n{}",
        woken.stderr()
    );
    assert_eq!(
        env.ledger_snapshot(),
        ledger,
        "no ledger write after waking"
    );
    assert_eq!(env.new_orders(), orders);
    assert_eq!(orders, 1, "one newOrder for s\n{}", run.story(&env));
    env.assert_nothing_pending_at_ca();
    run.stop();
}

/// The holder loses PostgreSQL (its connection cut) while it still
/// reaches the CA: it sends nothing after its local deadline, which comes
/// before the lease expires; a peer takes over and finishes.
#[test]
fn a_holder_cut_off_from_the_database_stops_at_its_deadline() {
    let env = FleetEnv::new(&http_cert("d"));
    let run = Running::start(&env);
    wait_until(
        "the CA created the order",
        || env.new_orders() > 0,
        &run.live(),
    );
    let (holder, epoch) = env.lease("d").expect("the lease");
    let holder = HOST_IDS[index(&holder.expect("a holder"))];
    env.host(holder).db.set_up(false);
    let cut = Instant::now();
    // A host without the database cannot answer its peers' tokens; a load
    // balancer's health check on its metrics takes it out of rotation, as
    // the README advises.
    wait_until(
        "the cut-off host reports its database down",
        || {
            env.host(holder)
                .metrics()
                .contains("certd_fleet_database_up 0\n")
        },
        &run.live(),
    );
    env.balancer.set_down(index(holder), true);
    let survivors: Vec<&str> = HOST_IDS.iter().copied().filter(|h| *h != holder).collect();
    let to_epoch = wait_until(
        "a peer takes the lease over",
        || env.lease("d").is_some_and(|(_, e)| e > epoch),
        &run.live(),
    );
    let sent_at_takeover = env.host(holder).egress.tunnels();
    eprintln!(
        "fleet: {holder} cut off from PostgreSQL: epoch {} after {to_epoch:?}",
        epoch + 1
    );
    wait_installed_everywhere(&env, "d", &survivors, &run);
    let last = env
        .host(holder)
        .egress
        .last_tunnel()
        .expect("it sent the newOrder");
    let last_after_cut = last.saturating_duration_since(cut);
    eprintln!(
        "fleet: {holder} cut off from PostgreSQL; its last CA request {last_after_cut:?} after \
         the cut; epoch {} after {to_epoch:?}",
        epoch + 1
    );
    assert!(
        last_after_cut < LEASE_TTL,
        "nothing sent past the deadline: last request {last_after_cut:?} after the cut"
    );
    assert_eq!(
        env.host(holder).egress.tunnels(),
        sent_at_takeover,
        "nothing sent after the peer took over"
    );
    assert_eq!(env.new_orders(), 1);
    env.assert_nothing_pending_at_ca();
    env.host(holder).db.set_up(true);
    run.stop();
}

/// PostgreSQL stops (`pg_ctl stop -m immediate`) while a certificate is
/// being ordered: the installed files never change while it is down, and
/// the fleet finishes the order once it is back, without a second
/// newOrder.
#[test]
fn postgres_stopped_mid_run_then_started() {
    let mut env = FleetEnv::new(&http_cert("p1"));
    let run = Running::start(&env);
    wait_installed_everywhere(&env, "p1", &HOST_IDS, &run);
    let installed = || -> Vec<BTreeMap<PathBuf, Vec<u8>>> {
        env.hosts
            .iter()
            .map(|h| snapshot(&h.dir.join("certs")))
            .collect()
    };
    let before = installed();

    // A second certificate, ordered after a reload.
    for host in &env.hosts {
        let config = std::fs::read_to_string(&host.config).expect("config");
        std::fs::write(&host.config, format!("{config}{}", http_cert("p2"))).expect("config");
    }
    for daemon in run.live() {
        daemon.signal("HUP");
    }
    wait_until(
        "p2's newOrder reached the CA",
        || env.new_orders() >= 2,
        &run.live(),
    );
    // The hosts' ways to it refuse while it is down, as a dead server's
    // port does (the proxies would otherwise accept and hold).
    for host in &env.hosts {
        host.db.set_up(false);
    }
    env.pg.stop_immediate();
    let down = Instant::now();
    // Down for twice the ttl: every lease runs out meanwhile.
    while down.elapsed() < LEASE_TTL * 2 {
        assert_eq!(installed(), before, "installed files changed while down");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(installed(), before);
    env.pg.start();
    for host in &env.hosts {
        host.db.set_up(true);
    }
    let back = Instant::now();
    wait_installed_everywhere(&env, "p2", &HOST_IDS, &run);
    eprintln!(
        "fleet: PostgreSQL down for {:?}; p2 installed everywhere {:?} after it was back",
        back.duration_since(down),
        back.elapsed()
    );
    for (host, files) in env.hosts.iter().zip(&before) {
        let p1 = host.cert_dir("p1");
        let now = snapshot(&p1);
        let then: BTreeMap<&PathBuf, &Vec<u8>> =
            files.iter().filter(|(k, _)| k.starts_with(&p1)).collect();
        let changed: Vec<&PathBuf> = now
            .keys()
            .chain(then.keys().copied())
            .filter(|k| now.get(*k) != then.get(k).copied())
            .collect();
        assert!(
            changed.is_empty(),
            "{}: p1 untouched, but {changed:?} changed (serial now {:?}); newOrders {}\n{}",
            host.id,
            host.installed_serial("p1"),
            env.new_orders(),
            run.story(&env)
        );
    }
    assert_eq!(env.new_orders(), 2, "p2 ordered once\n{}", run.story(&env));
    env.assert_nothing_pending_at_ca();
    run.stop();
}

/// One host's wall clock is five minutes ahead: the lease it holds
/// expires a ttl after the database's now (not its own), it orders, every
/// host installs, and the certificate is ordered once.
#[test]
fn a_host_with_its_clock_five_minutes_off_still_leases_by_the_database() {
    let env = FleetEnv::new(&http_cert("t"));
    let skewed = env.host("host-a");
    // Until the others run, the CA's validations go to host-a alone.
    env.balancer.set_down(1, true);
    env.balancer.set_down(2, true);
    let a = skewed.spawn_with_clock("+5m");
    let mut remaining = None;
    wait_until(
        "host-a holds the lease",
        || {
            remaining = env
                .try_query::<(Option<String>, f64)>(
                    "SELECT holder, EXTRACT(EPOCH FROM expires_at - now())::float8
                       FROM leases WHERE name = $1",
                    "cert:t",
                )
                .unwrap_or_default()
                .into_iter()
                .next()
                .filter(|(h, _)| h.as_deref() == Some("host-a"))
                .map(|(_, r)| r);
            remaining.is_some()
        },
        &[&a],
    );
    let remaining = remaining.expect("held");
    let others: Vec<Daemon> = env.hosts[1..].iter().map(|h| h.spawn()).collect();
    let run = Running(std::iter::once(a).chain(others).map(Some).collect());
    for (i, host) in env.hosts.iter().enumerate().skip(1) {
        wait_until(
            &format!("{}'s responder listens", host.id),
            || std::net::TcpStream::connect(("127.0.0.1", host.http01_port)).is_ok(),
            &run.live(),
        );
        env.balancer.set_down(i, false);
    }
    wait_installed_everywhere(&env, "t", &HOST_IDS, &run);
    let (_, epoch) = env.lease("t").expect("the lease");
    eprintln!(
        "fleet: host-a 5 min ahead held the lease with {remaining:.1} s left by the database's \
         clock; epoch {epoch}; newOrders {}",
        env.new_orders()
    );
    assert!(
        remaining <= (LEASE_TTL + Duration::from_secs(1)).as_secs_f64(),
        "the lease expires by the database's clock: {remaining} s left"
    );
    assert_eq!(env.new_orders(), 1, "one newOrder\n{}", run.story(&env));
    env.assert_nothing_pending_at_ca();
    run.stop();
}

/// Retries a minute or two apart: the backoff outlasts the test's look.
const DAEMON_BACKOFF_1M: &str = r#"
[daemon]
backoff_min = "60s"
backoff_max = "120s"
shutdown_grace = "10s"
"#;

/// A failure backs the whole fleet off, not only the host that failed:
/// the CA's validations fail (no host is in the balancer's rotation), so
/// the holder's order fails; before it releases the lease it records in
/// the shared ledger when the fleet may try again, and every peer that
/// claims the lease meanwhile holds back instead of ordering again.
#[test]
fn a_failed_order_backs_every_host_of_the_fleet_off() {
    let env = FleetEnv::with_daemon(&http_cert("f"), DAEMON_BACKOFF_1M);
    for i in 0..HOST_IDS.len() {
        env.balancer.set_down(i, true);
    }
    let run = Running::start(&env);
    // Before the first host made the tables: nothing held yet.
    let hold = || {
        env.try_query::<(String, i64, String)>(
            "SELECT host_id, until, error FROM fleet_holds WHERE cert_name = $1",
            "f",
        )
        .unwrap_or_default()
        .into_iter()
        .next()
    };
    wait_until(
        "the order failed and held the fleet back",
        || hold().is_some(),
        &run.live(),
    );
    let (failing, until, error) = hold().expect("held");
    let all_held = || {
        HOST_IDS
            .iter()
            .zip(run.live())
            .filter(|(id, _)| **id != failing)
            .all(|(_, d)| d.stderr().contains("the fleet's last attempt failed"))
    };
    wait_until(
        "every other host claimed the lease and held back, or ordered again",
        || all_held() || env.new_orders() > 1,
        &run.live(),
    );
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs(),
    )
    .expect("seconds");
    let failures: Vec<(i64,)> = env.query(
        "SELECT consecutive_failures FROM certificates WHERE name = $1",
        "f",
    );
    eprintln!(
        "fleet: {failing} failed ({failures:?} in a row); the peers held back: {}, for {} s \
         more; newOrders {}",
        all_held(),
        until - now,
        env.new_orders()
    );
    assert!(error.contains("validation failed"), "{error}");
    assert_eq!(failures, [(1,)]);
    assert!(until > now, "the hold still runs: {until} <= {now}");
    assert_eq!(
        env.new_orders(),
        1,
        "one failed order, no retry yet\n{}",
        run.story(&env)
    );
    assert!(all_held());
    // The operator sees the hold, on any host: until when, and why.
    let status = TestCommand::new(&env.host("host-a").config)
        .args(["status", "--json"])
        .output();
    let parsed: serde_json::Value = serde_json::from_str(&status.stdout).expect("status JSON");
    let held = &parsed[0]["fleet"]["held_back"];
    assert_eq!(held["host"], failing.as_str(), "{}", status.stdout);
    assert!(
        held["error"]
            .as_str()
            .is_some_and(|e| e.contains("validation failed")),
        "{held}"
    );
    env.assert_nothing_pending_at_ca();
    run.stop();
}
