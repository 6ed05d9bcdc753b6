//! Fleet mode end to end, the order path: two `certd run` processes
//! ("hosts") sharing one PostgreSQL and one Pebble, each with its own
//! state and certificate directories, the same fleet key and distinct
//! `host_id`s. What is asserted is what the CA and the shared database
//! saw: one `newOrder` per certificate per renewal, fleet-wide; a holder
//! killed mid-order is replaced by its peer under the next epoch, which
//! finishes the same order; a holder stopped by SIGTERM hands its order
//! over instead of deactivating it; http-01 validated at the host that
//! did not order; a host that defines a certificate differently never
//! gets its lease, and a rolling update of the definition does not wedge.
//!
//! Challenges are dns-01 through the environment's hook (challtestsrv is
//! shared, so whichever host holds the lease can answer), except in the
//! http-01 test; each host's http-01 listener is on a port of its own, as
//! two hosts' would be, and Pebble validates http-01 at one host's port
//! only.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::util::postgres::Postgres;
use crate::util::{
    Daemon, TestCommand, TestEnv, flag, free_port, install_hook_wrapper, parse_leaf,
    private_key_spki, read_pem_certs,
};

/// How long a condition may take on a loaded machine: an issuance, or a
/// lease (6 s, the shortest allowed) running out and being claimed.
const PATIENCE: Duration = Duration::from_secs(90);

/// The fleet's shared parts (one CA, one database, one fleet key) and the
/// directory each host lives in.
struct Fleet {
    env: TestEnv,
    pg: Postgres,
    key_file: PathBuf,
}

/// One host: its config file, state and certificate directories.
struct Host {
    id: &'static str,
    config: PathBuf,
    cert_dir: PathBuf,
}

impl Fleet {
    fn new() -> Fleet {
        let env = TestEnv::new();
        let pg = Postgres::launch();
        let key_file = env.dir().join("fleet.key");
        let key: Vec<u8> = (0..32u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(11))
            .collect();
        fs::write(&key_file, key).expect("write the fleet key");
        fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).expect("chmod 0600");
        Fleet { env, pg, key_file }
    }

    /// Makes the dns-01 hook controllable (`flag(.., "block", ..)`), after
    /// every host's config is written: writing one rewrites the hook.
    fn controllable_hook(&self) {
        install_hook_wrapper(&self.env);
    }

    /// Writes host `id`'s config: the environment's (its CA, dns-01 hook)
    /// with its own directories and http-01 port, and `[fleet]`.
    fn host(&self, id: &'static str, certificates: &str) -> Host {
        self.host_on(id, certificates, free_port())
    }

    /// [`Fleet::host`] with its http-01 listener on `http01_port` (the
    /// Pebble's validation port: then this host is the one Pebble asks).
    fn host_on(&self, id: &'static str, certificates: &str, http01_port: u16) -> Host {
        self.env
            .write_config(&format!("{}{certificates}", crate::util::DAEMON_RETRY_2S));
        let base = fs::read_to_string(self.env.config_path()).expect("read config");
        let dir = self.env.dir().join(id);
        let (state_dir, cert_dir) = (dir.join("state"), dir.join("certs"));
        fs::create_dir_all(&dir).expect("host dir");
        let text = base
            .replace(&toml_str(&self.env.state_dir()), &toml_str(&state_dir))
            .replace(&toml_str(&self.env.cert_dir()), &toml_str(&cert_dir))
            .replace(
                &format!("127.0.0.1:{}", self.env.pebble.http01_port()),
                &format!("127.0.0.1:{http01_port}"),
            );
        let config = dir.join("certd.toml");
        // `[fleet]` goes before the first `[[certificate]]`, after the
        // tables it must not be read into.
        let (head, certs) = text
            .split_once("[[certificate]]")
            .expect("the config has certificates");
        let fleet = format!(
            "\n[fleet]\ndatabase_url = \"{url}\"\nkey_file = {key}\nlease_ttl = \"6s\"\nhost_id = \"{id}\"\n\n",
            url = self.pg.url(),
            key = toml_str(&self.key_file),
        );
        fs::write(&config, format!("{head}{fleet}[[certificate]]{certs}")).expect("write config");
        Host {
            id,
            config,
            cert_dir,
        }
    }

    /// Orders Pebble created, for any account.
    fn new_orders(&self) -> usize {
        self.env.pebble.orders_created()
    }

    /// Runs a query on the shared database.
    fn query<T>(&self, sql: &'static str, bind: &str) -> Vec<T>
    where
        T: Send + Unpin + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        self.pg.query(sql, bind)
    }

    /// The lease row of certificate `name`: holder and epoch.
    fn lease(&self, name: &str) -> Option<(Option<String>, i64)> {
        self.query(
            "SELECT holder, epoch FROM leases WHERE name = $1",
            &format!("cert:{name}"),
        )
        .into_iter()
        .next()
    }

    /// Authorization URLs and statuses the shared ledger holds for the
    /// orders of certificate `name`.
    fn authz_of(&self, name: &str) -> Vec<(String, String)> {
        self.query(
            "SELECT a.url, a.status FROM authorizations a
               JOIN order_authorizations oa ON oa.authz_id = a.id
               JOIN orders o ON o.id = oa.order_id
              WHERE o.cert_name = $1",
            name,
        )
    }
}

impl Host {
    fn spawn(&self) -> Daemon {
        TestCommand::new(&self.config).arg("run").spawn()
    }

    fn installed(&self, name: &str) -> PathBuf {
        self.cert_dir.join(name).join("cert.pem")
    }

    /// The installed leaf of `name`: (DNS names, serial, SPKI), its
    /// private key checked to match it.
    fn leaf(&self, name: &str) -> (Vec<String>, String, Vec<u8>) {
        let dir = self.cert_dir.join(name);
        let certs = read_pem_certs(dir.join("cert.pem"));
        assert_eq!(
            certs.len(),
            1,
            "{}: {name}'s cert.pem holds the leaf",
            self.id
        );
        let (names, serial, _, spki) = parse_leaf(&certs[0]);
        assert_eq!(
            spki,
            private_key_spki(dir.join("privkey.pem")),
            "{}: {name}'s key matches its certificate",
            self.id
        );
        (names, serial, spki)
    }
}

fn toml_str(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

fn dns_cert(name: &str) -> String {
    format!(
        "\n[[certificate]]\nname = \"{name}\"\ndomains = [\"{name}.fleet.test\"]\nchallenges = [\"dns-01\"]\n"
    )
}

fn http_cert(name: &str) -> String {
    format!(
        "\n[[certificate]]\nname = \"{name}\"\ndomains = [\"{name}.fleet.test\"]\nchallenges = [\"http-01\"]\n"
    )
}

/// A dns-01 certificate `name` for `domains`, with `extra` TOML keys.
fn dns_cert_with(name: &str, domains: &[&str], extra: &str) -> String {
    format!(
        "\n[[certificate]]\nname = \"{name}\"\ndomains = {domains:?}\nchallenges = [\"dns-01\"]\n{extra}"
    )
}

/// The lines of `log` saying this host does not take a lease because it
/// defines the certificate differently.
fn refusals(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("defines the certificate differently"))
        .collect()
}

/// Asserts Pebble answered `expected` `newOrder`s, with the hosts' logs
/// if not.
fn assert_new_orders(fleet: &Fleet, expected: usize, what: &str, hosts: &[&Daemon]) {
    let seen = fleet.new_orders();
    if seen != expected {
        let logs: Vec<String> = hosts.iter().map(|d| d.stderr()).collect();
        panic!(
            "{what}: {seen} newOrders, expected {expected}\n{}",
            logs.join("\n-----\n")
        );
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool, hosts: &[&Daemon]) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > PATIENCE {
            let logs: Vec<String> = hosts.iter().map(|d| d.stderr()).collect();
            panic!(
                "{what}: not within {PATIENCE:?}\n{}",
                logs.join("\n-----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Two hosts, three certificates: each is ordered once, fleet-wide, and
/// ends up installed on both hosts.
#[test]
fn order_one_new_order_per_certificate_across_two_hosts() {
    let fleet = Fleet::new();
    let names = ["one", "two", "three"];
    let certs: String = names.iter().map(|n| dns_cert(n)).collect();
    let (a, b) = (fleet.host("host-a", &certs), fleet.host("host-b", &certs));
    let (da, db) = (a.spawn(), b.spawn());
    for name in names {
        wait_until(
            &format!("{name} installed on both hosts"),
            || a.installed(name).exists() && b.installed(name).exists(),
            &[&da, &db],
        );
    }
    assert_new_orders(&fleet, names.len(), "one per certificate", &[&da, &db]);
    for name in names {
        let (holder, epoch) = fleet.lease(name).expect("the certificate's lease");
        assert!(epoch >= 1);
        // Released once its renewal ended.
        assert_eq!(holder, None, "{name}");
    }
    let (oa, ob) = (da.terminate(), db.terminate());
    assert_eq!((oa.code(), ob.code()), (Some(0), Some(0)), "{oa}\n{ob}");
    // Nothing ordered meanwhile, at shutdown or after.
    assert_eq!(fleet.new_orders(), names.len());
}

/// The holder is killed after `newOrder`, while it presents the
/// challenge: the peer claims the lease under the next epoch once it
/// lapses, and finishes the same order.
#[test]
fn order_a_killed_holder_is_taken_over_and_its_order_finished() {
    let fleet = Fleet::new();
    let certs = dns_cert("k");
    let (a, b) = (fleet.host("host-a", &certs), fleet.host("host-b", &certs));
    fleet.controllable_hook();
    flag(&fleet.env, "block", true);
    let mut da = a.spawn();
    da.wait_for_file(&fleet.env.dir().join("presenting"), PATIENCE);
    assert_eq!(fleet.new_orders(), 1);
    let (holder, epoch) = fleet.lease("k").expect("the lease");
    assert_eq!((holder.as_deref(), epoch), (Some(a.id), 1));
    // The peer runs meanwhile and keeps away from the held lease.
    let db = b.spawn();
    da.signal("KILL");
    let _ = da.wait();
    flag(&fleet.env, "block", false);

    wait_until(
        "k installed by host-b",
        || b.installed("k").exists(),
        &[&db],
    );
    assert_new_orders(
        &fleet,
        1,
        "host-b finished host-a's order, no second newOrder",
        &[&db],
    );
    let (_, epoch) = fleet.lease("k").expect("the lease");
    assert!(epoch >= 2, "taken over under a new epoch: {epoch}");
    let authz = fleet.authz_of("k");
    assert!(!authz.is_empty());
    assert!(
        authz.iter().all(|(_, status)| status == "valid"),
        "{authz:?}"
    );
    let out = db.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
}

/// SIGTERM while holding: the holder releases the lease and keeps the
/// order (its authorization stays pending, not deactivated); the peer
/// resumes that order.
#[test]
fn order_sigterm_hands_the_order_over() {
    let fleet = Fleet::new();
    let certs = dns_cert("h");
    let (a, b) = (fleet.host("host-a", &certs), fleet.host("host-b", &certs));
    fleet.controllable_hook();
    flag(&fleet.env, "block", true);
    let mut da = a.spawn();
    da.wait_for_file(&fleet.env.dir().join("presenting"), PATIENCE);
    let out = da.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
    let (holder, epoch) = fleet.lease("h").expect("the lease");
    assert_eq!((holder, epoch), (None, 1), "released at shutdown");
    let authz = fleet.authz_of("h");
    assert!(!authz.is_empty());
    assert!(
        authz.iter().all(|(_, status)| status == "pending"),
        "kept for the peer, not deactivated: {authz:?}"
    );
    let steps: Vec<(String,)> = fleet.query("SELECT step FROM orders WHERE cert_name = $1", "h");
    assert_eq!(steps, [("resumable".to_owned(),)]);

    flag(&fleet.env, "block", false);
    let db = b.spawn();
    wait_until(
        "h installed by host-b",
        || b.installed("h").exists(),
        &[&db],
    );
    assert_new_orders(&fleet, 1, "host-b resumed host-a's order", &[&db]);
    let (_, epoch) = fleet.lease("h").expect("the lease");
    assert_eq!(epoch, 2);
    let out = db.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
}

/// http-01 across two hosts: host-b listens where Pebble validates, and
/// host-a orders. host-a commits the answer and pre-flights every live
/// host before it answers the challenge; Pebble's validation reaches
/// host-b, which serves host-a's answer from the fleet. Then host-b
/// starts serving the certificate and installs host-a's issuance: one
/// `newOrder`, the same serial and key on both hosts.
#[test]
fn http01_is_validated_at_the_host_that_did_not_order() {
    let fleet = Fleet::new();
    let at_pebble = fleet.env.pebble.http01_port();
    // host-b first, with another certificate only: it is a live member
    // (its responder advertised) before host-a orders `www`.
    let b = fleet.host_on("host-b", &dns_cert("other"), at_pebble);
    let db = b.spawn();
    wait_until(
        "other installed on host-b",
        || b.installed("other").exists(),
        &[&db],
    );
    let a = fleet.host("host-a", &http_cert("www"));
    let da = a.spawn();
    wait_until(
        "www installed on host-a",
        || a.installed("www").exists(),
        &[&da, &db],
    );
    assert_new_orders(&fleet, 2, "other and www, once each", &[&da, &db]);
    // Only host-b's responder is where Pebble validates: www was
    // validated there, with the answer host-a committed.
    let served: Vec<(String,)> = fleet.query(
        "SELECT identifier FROM challenge_responses WHERE identifier = $1",
        "www.fleet.test",
    );
    assert!(!served.is_empty(), "host-a committed its answer");

    let out = db.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
    let both = format!("{}{}", dns_cert("other"), http_cert("www"));
    let b = fleet.host_on("host-b", &both, at_pebble);
    let db = b.spawn();
    wait_until(
        "www installed on host-b",
        || b.installed("www").exists(),
        &[&da, &db],
    );
    let (leaf_a, leaf_b) = (a.leaf("www"), b.leaf("www"));
    assert_eq!(leaf_a.0, ["www.fleet.test"]);
    assert_eq!(leaf_a, leaf_b, "the same certificate and key on both hosts");
    assert_new_orders(&fleet, 2, "host-b installed it from the fleet", &[&da, &db]);
    let (oa, ob) = (da.terminate(), db.terminate());
    assert_eq!((oa.code(), ob.code()), (Some(0), Some(0)), "{oa}\n{ob}");
}

/// Two hosts that define a certificate differently (key type): only the
/// one whose definition is the fleet's (the first holder's) ever holds
/// its lease; the other says why in its log and `status` names it.
#[test]
fn a_host_defining_a_certificate_differently_never_gets_its_lease() {
    let fleet = Fleet::new();
    let a = fleet.host("host-a", &dns_cert("d"));
    let b = fleet.host(
        "host-b",
        &dns_cert_with("d", &["d.fleet.test"], "key_type = \"ecdsa-p384\"\n"),
    );
    fleet.controllable_hook();
    flag(&fleet.env, "block", true);
    // host-a claims d's lease, records its definition as the fleet's,
    // and orders; it holds the lease while its hook is held.
    let mut da = a.spawn();
    da.wait_for_file(&fleet.env.dir().join("presenting"), PATIENCE);
    let recorded: Vec<(String,)> = fleet.query(
        "SELECT host_id FROM fleet_cert_definitions WHERE cert_name = $1",
        "d",
    );
    assert_eq!(recorded, [("host-a".to_owned(),)], "the first holder's");
    // host-b: d is due (nothing is published yet).
    let db = b.spawn();
    wait_until(
        "host-b refused d's lease",
        || !refusals(&db.stderr()).is_empty(),
        &[&da, &db],
    );
    // The hook's hold ends within its 60 s sleep.
    flag(&fleet.env, "block", false);
    wait_until(
        "d installed on host-a, its lease released",
        || a.installed("d").exists() && fleet.lease("d").is_some_and(|(h, _)| h.is_none()),
        &[&da, &db],
    );
    // host-b looks again once the lease is free, and refuses again.
    let before = refusals(&db.stderr()).len();
    wait_until(
        "host-b refused d's free lease",
        || refusals(&db.stderr()).len() > before,
        &[&da, &db],
    );
    let log = db.stderr();
    let line = refusals(&log)[0];
    assert!(line.contains("key_type") && line.contains('d'), "{line}");
    assert_eq!(fleet.lease("d"), Some((None, 1)), "only host-a held it");
    assert_new_orders(&fleet, 1, "d, by host-a", &[&da, &db]);

    let status = TestCommand::new(&a.config).arg("status").output();
    status.assert_success();
    assert!(
        status
            .stdout
            .contains("host host-b defines it differently (key_type): it does not take the lease"),
        "{status}"
    );
    let (oa, ob) = (da.terminate(), db.terminate());
    assert_eq!((oa.code(), ob.code()), (Some(0), Some(0)), "{oa}\n{ob}");
}

/// A rolling update of a certificate's definition (a name added): the
/// first host updated waits while a live host still defines it the old
/// way; once both are updated, one of them orders the new names, once,
/// and both install it.
#[test]
fn a_rolling_update_of_a_definition_does_not_wedge() {
    let fleet = Fleet::new();
    let old = dns_cert("r");
    let new = dns_cert_with("r", &["r.fleet.test", "r2.fleet.test"], "");
    let (a, b) = (fleet.host("host-a", &old), fleet.host("host-b", &old));
    let (da, db) = (a.spawn(), b.spawn());
    wait_until(
        "r installed on both hosts",
        || a.installed("r").exists() && b.installed("r").exists(),
        &[&da, &db],
    );
    assert_new_orders(&fleet, 1, "r, once", &[&da, &db]);

    // host-b first: host-a, live, still defines r the old way.
    let out = db.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
    let b = fleet.host("host-b", &new);
    let db = b.spawn();
    wait_until(
        "host-b refused r's lease",
        || refusals(&db.stderr()).iter().any(|l| l.contains("domains")),
        &[&da, &db],
    );
    assert_new_orders(
        &fleet,
        1,
        "nothing ordered while host-a has the old definition",
        &[&da, &db],
    );

    // Then host-a: no live host has the old definition any more.
    let out = da.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
    let a = fleet.host("host-a", &new);
    let da = a.spawn();
    let renewed = |h: &Host| h.installed("r").exists() && h.leaf("r").0.len() == 2;
    wait_until(
        "r with both names on both hosts",
        || renewed(&a) && renewed(&b),
        &[&da, &db],
    );
    let (leaf_a, leaf_b) = (a.leaf("r"), b.leaf("r"));
    assert_eq!(leaf_a.0, ["r.fleet.test", "r2.fleet.test"]);
    assert_eq!(leaf_a, leaf_b);
    assert_new_orders(&fleet, 2, "the new names ordered once", &[&da, &db]);
    let (oa, ob) = (da.terminate(), db.terminate());
    assert_eq!((oa.code(), ob.code()), (Some(0), Some(0)), "{oa}\n{ob}");
}
