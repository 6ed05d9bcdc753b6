//! Fleet mode under crashes and concurrency: a holder killed right after
//! `finalize` is replaced by a peer that downloads the same certificate
//! with the order's key, sealed in the shared database, instead of
//! ordering again; an order the dead holder never recorded is adopted by
//! its peer, also by one that got the certificate from a reload; a
//! failed write to the shared ledger leaves the order to be resumed, not
//! given up and placed again; one-shot commands (`revoke`, `reap`) take
//! the lease a daemon would, and do nothing while another host holds it;
//! a rolled-over account key reaches every host, running daemons too.
//!
//! Each host is a `certd` process with its own state and certificate
//! directories, sharing one PostgreSQL, one Pebble (behind a
//! [`FaultyFront`] where a request must be held) and one fleet key.
//! Challenges are dns-01 through the environment's hook (challtestsrv is
//! shared, so whichever host holds the lease can answer). The admission
//! of orders by two hosts at once is tested on the ledger itself
//! (`ledger::intents`), where the two hosts are two connection pools.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::util::postgres::Postgres;
use crate::util::{
    Daemon, FaultyFront, TestCommand, TestEnv, free_port, parse_leaf, private_key_spki,
    read_pem_certs,
};

/// How long a condition may take on a loaded machine: an issuance, or a
/// lease (6 s, the shortest allowed) running out and being claimed.
const PATIENCE: Duration = Duration::from_secs(90);

/// The fleet's shared parts: one CA, one database, one fleet key.
struct Fleet {
    env: TestEnv,
    pg: Postgres,
    key_file: PathBuf,
}

/// One host: its config file, state and certificate directories.
struct Host {
    config: PathBuf,
    state_dir: PathBuf,
    cert_dir: PathBuf,
}

impl Fleet {
    fn new() -> Fleet {
        let env = TestEnv::new();
        let pg = Postgres::launch();
        let key_file = env.dir().join("fleet.key");
        let key: Vec<u8> = (0..32u8)
            .map(|i| i.wrapping_mul(29).wrapping_add(5))
            .collect();
        fs::write(&key_file, key).expect("write the fleet key");
        fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).expect("chmod 0600");
        Fleet { env, pg, key_file }
    }

    /// Writes host `id`'s config: the environment's (its CA, or `front`
    /// before it; its dns-01 hook) with its own directories and http-01
    /// port, and `[fleet]`.
    fn host(&self, id: &str, certificates: &str, front: Option<&FaultyFront>) -> Host {
        self.env
            .write_config(&format!("{}{certificates}", crate::util::DAEMON_RETRY_2S));
        let mut text = fs::read_to_string(self.env.config_path()).expect("read config");
        let dir = self.env.dir().join(id);
        let (state_dir, cert_dir) = (dir.join("state"), dir.join("certs"));
        fs::create_dir_all(&dir).expect("host dir");
        text = text
            .replace(&toml_str(&self.env.state_dir()), &toml_str(&state_dir))
            .replace(&toml_str(&self.env.cert_dir()), &toml_str(&cert_dir))
            .replace(
                &format!("127.0.0.1:{}", self.env.pebble.http01_port()),
                &format!("127.0.0.1:{}", free_port()),
            );
        if let Some(front) = front {
            text = text.replace(&self.env.pebble.directory_url(), &front.directory_url());
        }
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
        let config = dir.join("certd.toml");
        fs::write(&config, format!("{head}{fleet}[[certificate]]{certs}")).expect("write config");
        Host {
            config,
            state_dir,
            cert_dir,
        }
    }

    /// Orders Pebble created, for any account.
    fn new_orders(&self) -> usize {
        self.env.pebble.orders_created()
    }

    /// Certificates Pebble issued (one per finalize it acted on).
    fn issued(&self) -> usize {
        self.env
            .pebble
            .pebble_log()
            .matches("Issued certificate serial")
            .count()
    }

    /// Runs `sql` on the shared database with `bind` as `$1`.
    fn query<T>(&self, sql: &'static str, bind: &str) -> Vec<T>
    where
        T: Send + Unpin + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        self.pg.query(sql, bind)
    }

    /// Makes lease `name` held by a live host that is not one of the
    /// test's (as a peer renewing it would), or, with `None`, released.
    fn set_lease(&self, name: &str, holder: Option<&str>) {
        let _: Vec<(i64,)> = match holder {
            Some(_) => self.query(
                "INSERT INTO leases (name, holder, epoch, expires_at, acquired_at)
                 VALUES ($1, 'host-elsewhere', 100, now() + interval '1 hour', now())
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,
                     epoch = leases.epoch + 1, expires_at = excluded.expires_at
                 RETURNING epoch",
                name,
            ),
            None => self.query(
                "UPDATE leases SET holder = NULL WHERE name = $1 RETURNING epoch",
                name,
            ),
        };
    }

    /// The lease row `name`: holder and epoch.
    fn lease(&self, name: &str) -> Option<(Option<String>, i64)> {
        self.query("SELECT holder, epoch FROM leases WHERE name = $1", name)
            .into_iter()
            .next()
    }

    /// How many events of `kind` the shared ledger holds.
    fn events(&self, kind: &str) -> i64 {
        let rows: Vec<(i64,)> = self.query("SELECT COUNT(*) FROM events WHERE kind = $1", kind);
        rows[0].0
    }
}

impl Fleet {
    /// The account's credentials file on `host`.
    fn credentials(&self, host: &Host) -> Vec<u8> {
        let directory = self.env.pebble.directory_url();
        fs::read(certd::acme::credentials_path(&host.state_dir, &directory))
            .expect("the account's credentials")
    }
}

impl Host {
    fn spawn(&self) -> Daemon {
        TestCommand::new(&self.config).arg("run").spawn()
    }

    fn command(&self, args: &[&str]) -> crate::util::CmdOutput {
        TestCommand::new(&self.config).args(args).output()
    }

    fn installed(&self, name: &str) -> PathBuf {
        self.cert_dir.join(name).join("cert.pem")
    }

    /// The serial and SPKI of the certificate installed for `name`.
    fn installed_leaf(&self, name: &str) -> (String, Vec<u8>) {
        let leaf = read_pem_certs(self.installed(name));
        let (_, serial, _, spki) = parse_leaf(&leaf[0]);
        (serial, spki)
    }

    /// The keys of finalized orders this host keeps on its disk.
    fn order_keys(&self) -> Vec<PathBuf> {
        let Ok(dir) = fs::read_dir(self.state_dir.join("order-keys")) else {
            return Vec::new();
        };
        dir.map(|e| e.expect("directory entry").path()).collect()
    }
}

fn toml_str(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

fn dns_cert(name: &str) -> String {
    format!(
        "\n[[certificate]]\nname = \"{name}\"\ndomains = [\"{name}.fleet.test\", \"www.{name}.fleet.test\"]\nchallenges = [\"dns-01\"]\n"
    )
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

/// The holder is killed once Pebble has acted on its `finalize` (the
/// front holds the answer): the order's key is only on the dead host's
/// disk and, sealed, in the database. The peer takes the lease over and
/// downloads the certificate the CA issued for that key: one newOrder,
/// one issuance, the installed certificate is the finalized order's.
#[test]
fn durable_a_holder_killed_after_finalize_is_finished_by_its_peer_with_the_sealed_key() {
    let fleet = Fleet::new();
    let front = FaultyFront::start(&fleet.env.pebble);
    let certs = dns_cert("z");
    let a = fleet.host("host-a", &certs, Some(&front));
    let b = fleet.host("host-b", &certs, Some(&front));
    front.hold("/finalize-order/", None);
    let da = a.spawn();
    wait_until("finalize held", || front.held() > 0, &[&da]);
    da.signal("KILL");
    let _ = da.wait();
    assert_eq!(fleet.issued(), 1, "Pebble issued on the held finalize");

    let local = a.order_keys();
    assert_eq!(local.len(), 1, "host-a kept the key on its disk: {local:?}");
    let pem = fs::read_to_string(&local[0]).expect("host-a's order key");
    let sealed: Vec<(Vec<u8>,)> = fleet.query("SELECT sealed FROM order_keys WHERE $1 = $1", "");
    assert_eq!(sealed.len(), 1, "the key is in the database");
    // Sealed: no line of the PEM (base64 of the key) is in the blob.
    for line in pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(
            !sealed[0]
                .0
                .windows(line.len())
                .any(|w| w == line.as_bytes()),
            "the stored key is not sealed"
        );
    }

    let db = b.spawn();
    wait_until(
        "z installed by host-b",
        || b.installed("z").exists(),
        &[&db],
    );
    let (_, spki) = b.installed_leaf("z");
    assert_eq!(
        spki,
        private_key_spki(&local[0]),
        "host-b installed the certificate of host-a's finalized order"
    );
    assert_eq!(fleet.new_orders(), 1, "no second newOrder");
    assert_eq!(fleet.issued(), 1, "no second certificate");
    assert!(
        front.forwarded("/finalize-order/") >= 1,
        "finalize reached the CA"
    );
    assert_eq!(fleet.events("order-resumed"), 1);
    let (_, epoch) = fleet.lease("cert:z").expect("the lease");
    assert!(epoch >= 2, "taken over under a new epoch: {epoch}");
    // The sealed key is deleted just after the files are in place.
    wait_until(
        "the sealed key gone once installed",
        || {
            fleet
                .query::<(String,)>("SELECT order_url FROM order_keys WHERE $1 = $1", "")
                .is_empty()
        },
        &[&db],
    );
    let out = db.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
}

/// `certd revoke` and `certd reap` in fleet mode: while another host
/// holds the lease they would need, they say so and do nothing; once it
/// is free they take it (a new epoch), write the shared ledger through
/// its fence, and release it. `certd account rollover` stores the new
/// key for the fleet.
#[test]
fn durable_one_shot_revoke_reap_and_rollover_take_part_in_the_fleet() {
    let fleet = Fleet::new();
    let a = fleet.host("host-a", &dns_cert("r"), None);
    let da = a.spawn();
    wait_until("r installed", || a.installed("r").exists(), &[&da]);
    let out = da.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
    let (serial, _) = a.installed_leaf("r");
    let revoked = || -> Option<String> {
        let rows: Vec<(Option<String>,)> = fleet.query(
            "SELECT revoked_serial FROM certificates WHERE name = $1",
            "r",
        );
        rows.into_iter().next().and_then(|r| r.0)
    };

    fleet.set_lease("cert:r", Some("host-elsewhere"));
    let out = a.command(&["revoke", "r", "--no-renew"]);
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("cert:r"), "names the lease: {out}");
    assert_eq!(revoked(), None, "nothing revoked while a peer holds it");

    fleet.set_lease("cert:r", None);
    let (_, before) = fleet.lease("cert:r").expect("the lease");
    a.command(&["revoke", "r", "--no-renew"]).assert_success();
    assert_eq!(revoked(), Some(serial), "recorded in the shared ledger");
    let (holder, epoch) = fleet.lease("cert:r").expect("the lease");
    assert_eq!(
        (holder, epoch),
        (None, before + 1),
        "claimed, then released"
    );

    let accounts: Vec<(i64,)> = fleet.query("SELECT id FROM accounts WHERE $1 = $1", "");
    let reaper = format!("reaper:{}", accounts[0].0);
    fleet.set_lease(&reaper, Some("host-elsewhere"));
    let passes = fleet.events("reaper-pass");
    let out = a.command(&["reap", "--older-than", "0s"]);
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains(&reaper), "names the lease: {out}");
    assert_eq!(fleet.events("reaper-pass"), passes, "no pass recorded");

    fleet.set_lease(&reaper, None);
    a.command(&["reap", "--older-than", "0s"]).assert_success();
    assert_eq!(fleet.events("reaper-pass"), passes + 1);
    let (holder, _) = fleet.lease(&reaper).expect("the lease");
    assert_eq!(holder, None, "released");

    // The key rolled over under the account lease is stored, sealed, for
    // the fleet: a host that never had the old key's file uses the new
    // one (the CA refuses the old).
    let sealed = || -> Vec<u8> {
        let rows: Vec<(Vec<u8>,)> = fleet.query(
            "SELECT sealed FROM fleet_secrets WHERE name LIKE $1",
            "account:%",
        );
        assert_eq!(rows.len(), 1, "one account key");
        rows[0].0.clone()
    };
    let before = sealed();
    a.command(&["account", "rollover"]).assert_success();
    assert_ne!(sealed(), before, "the new key is stored");
    let b = fleet.host("host-b", &dns_cert("r"), None);
    b.command(&["reap", "--older-than", "0s"]).assert_success();
    assert_eq!(fleet.events("reaper-pass"), passes + 2);
    assert_eq!(
        fleet.credentials(&b),
        fleet.credentials(&a),
        "host-b uses the new key"
    );
}

/// A key rolled over on one host reaches the other hosts' running
/// daemons: host-b's daemon, which loaded the old key at start, takes up
/// the new one from the fleet's database before its next order (the CA
/// refuses the old key now), and that order succeeds.
#[test]
fn durable_a_key_rolled_over_on_one_host_reaches_the_others_running_daemons() {
    let fleet = Fleet::new();
    let certs = dns_cert("k");
    let (a, b) = (
        fleet.host("host-a", &certs, None),
        fleet.host("host-b", &certs, None),
    );
    let (da, db) = (a.spawn(), b.spawn());
    // Both daemons up (their control sockets too), k installed on both.
    wait_until(
        "k installed on both running hosts",
        || {
            [&da, &db]
                .iter()
                .all(|d| d.stderr().contains("certd running"))
                && a.installed("k").exists()
                && b.installed("k").exists()
        },
        &[&da, &db],
    );
    let (before, _) = b.installed_leaf("k");
    // Through host-a's daemon (its control socket), under the account's
    // lease.
    let out = a.command(&["account", "rollover"]);
    assert!(out.success(), "{out}\n{}", da.stderr());
    let orders = fleet.new_orders();
    // Through host-b's daemon: ordered there, with whatever key it signs
    // with.
    let out = b.command(&["renew", "k", "--force"]);
    assert!(
        out.success(),
        "host-b's order after the rollover: {out}\n{}",
        db.stderr()
    );
    wait_until(
        "host-b installed the new certificate",
        || b.installed_leaf("k").0 != before,
        &[&da, &db],
    );
    assert_eq!(fleet.new_orders(), orders + 1);
    assert!(
        db.stderr()
            .contains("took up the account key another host of the fleet rolled over"),
        "{}",
        db.stderr()
    );
    assert_eq!(
        fleet.credentials(&b),
        fleet.credentials(&a),
        "host-b keeps the new key"
    );
    for d in [da, db] {
        let out = d.terminate();
        assert_eq!(out.code(), Some(0), "{out}");
    }
}

/// The holder is killed once the CA created its order but before it
/// heard of it (the front holds the `newOrder` answer): the ledger has
/// only the intent. The peer that takes the lease adopts that order
/// for the certificate, from the CA's list, and finishes it: one
/// newOrder, and the intent is gone.
#[test]
fn durable_an_order_the_dead_holder_never_recorded_is_adopted_by_its_peer() {
    let fleet = Fleet::new();
    let front = FaultyFront::start(&fleet.env.pebble);
    let certs = dns_cert("n");
    let a = fleet.host("host-a", &certs, Some(&front));
    let b = fleet.host("host-b", &certs, Some(&front));
    front.hold("/order-plz", None);
    let da = a.spawn();
    wait_until("newOrder held", || front.held() > 0, &[&da]);
    da.signal("KILL");
    let _ = da.wait();
    let orders: Vec<(i64,)> = fleet.query("SELECT COUNT(*) FROM orders WHERE cert_name = $1", "n");
    assert_eq!(orders[0].0, 0, "the ledger never saw the order");
    let intents: Vec<(i64,)> = fleet.query(
        "SELECT COUNT(*) FROM order_intents WHERE cert_name = $1",
        "n",
    );
    assert_eq!(intents[0].0, 1, "the admission's intent is left");

    let db = b.spawn();
    wait_until(
        "n installed by host-b",
        || b.installed("n").exists(),
        &[&db],
    );
    assert_eq!(fleet.new_orders(), 1, "the adopted order was used");
    assert_eq!(fleet.events("order-adopted"), 1);
    let intents: Vec<(i64,)> = fleet.query(
        "SELECT COUNT(*) FROM order_intents WHERE cert_name = $1",
        "n",
    );
    assert_eq!(intents[0].0, 0, "recovery cleared the certificate's intent");
    let out = db.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
}

/// With a daemon running, `certd reap` goes to it over the control
/// socket; in fleet mode the daemon too takes the reaper lease for it,
/// and does nothing while another host holds it.
#[test]
fn durable_reap_through_a_running_daemon_takes_the_reaper_lease() {
    let fleet = Fleet::new();
    let a = fleet.host("host-a", &dns_cert("d"), None);
    let da = a.spawn();
    wait_until("d installed", || a.installed("d").exists(), &[&da]);
    let accounts: Vec<(i64,)> = fleet.query("SELECT id FROM accounts WHERE $1 = $1", "");
    let reaper = format!("reaper:{}", accounts[0].0);
    fleet.set_lease(&reaper, Some("host-elsewhere"));
    let passes = fleet.events("reaper-pass");
    let out = a.command(&["reap", "--older-than", "0s"]);
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains(&reaper), "names the lease: {out}");
    assert_eq!(fleet.events("reaper-pass"), passes, "no pass recorded");

    fleet.set_lease(&reaper, None);
    // The daemon's own periodic pass may hold the lease a moment.
    let start = Instant::now();
    while !a.command(&["reap", "--older-than", "0s"]).success() {
        assert!(start.elapsed() < PATIENCE, "reap never ran");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(fleet.events("reaper-pass") > passes);
    let out = da.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
}

/// The holder of a certificate is killed once the CA created its order
/// (the front holds the `newOrder` answer). The peer that takes the
/// lease over started without that certificate and got it by a reload:
/// it adopts and resumes the dead holder's order all the same (whether
/// the order is still wanted goes by the certificate as configured now,
/// not as at start), and places no second one.
#[test]
fn durable_a_certificate_added_by_reload_resumes_the_order_its_dead_holder_placed() {
    let fleet = Fleet::new();
    let front = FaultyFront::start(&fleet.env.pebble);
    let a = fleet.host("host-a", &dns_cert("n"), Some(&front));
    let b = fleet.host("host-b", &dns_cert("s"), Some(&front));
    front.hold("/order-plz", None);
    let da = a.spawn();
    wait_until("n's newOrder held", || front.held() > 0, &[&da]);
    da.signal("KILL");
    let _ = da.wait();

    let db = b.spawn();
    wait_until(
        "s installed by host-b",
        || b.installed("s").exists(),
        &[&db],
    );
    assert_eq!(fleet.new_orders(), 2, "n's (held) and s's");
    let config = fs::read_to_string(&b.config).expect("host-b's config");
    fs::write(&b.config, format!("{config}{}", dns_cert("n"))).expect("host-b's config");
    db.signal("HUP");
    wait_until(
        "n installed by host-b",
        || b.installed("n").exists(),
        &[&db],
    );
    assert_eq!(
        fleet.new_orders(),
        2,
        "host-b resumed the dead holder's order of n\n{}",
        db.stderr()
    );
    assert_eq!(fleet.events("order-adopted"), 1);
    assert_eq!(fleet.events("order-abandoned"), 0, "{}", db.stderr());
    let out = db.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
}

/// A write to the shared ledger fails mid-order (a trigger refuses the
/// first record of a chosen challenge, as a database that went away for
/// a moment would): the holder gives nothing up, neither deactivates the
/// pending authorizations at the CA nor marks the order failed, and its
/// next attempt under the lease resumes the same order: one newOrder.
#[test]
fn durable_a_failed_ledger_write_leaves_the_order_to_be_resumed() {
    let fleet = Fleet::new();
    let a = fleet.host("host-a", &dns_cert("w"), None);
    // The fleet's tables, before the daemon orders.
    a.command(&["reap", "--older-than", "0s"]).assert_success();
    fleet.pg.execute(
        "CREATE SEQUENCE refused_writes;
         CREATE FUNCTION refuse_first_write() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF nextval('refused_writes') = 1 THEN
                 RAISE EXCEPTION 'the test refuses this write once';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_first_challenge BEFORE UPDATE OF challenge_type ON authorizations
             FOR EACH ROW WHEN (NEW.challenge_type IS NOT NULL)
             EXECUTE FUNCTION refuse_first_write();",
    );
    let da = a.spawn();
    wait_until("w installed", || a.installed("w").exists(), &[&da]);
    let refused: Vec<(i64,)> =
        fleet.query("SELECT last_value FROM refused_writes WHERE $1 = $1", "");
    assert!(
        refused[0].0 >= 2,
        "the write was refused once, then let through"
    );
    let log = da.stderr();
    assert!(
        log.contains("the test refuses this write once"),
        "the order failed on the refused write:\n{log}"
    );
    assert_eq!(fleet.new_orders(), 1, "the order was resumed\n{log}");
    assert_eq!(fleet.events("order-abandoned"), 0, "{log}");
    assert_eq!(fleet.events("deactivated"), 0, "nothing deactivated\n{log}");
    assert_eq!(fleet.events("order-resumed"), 1, "{log}");
    let out = da.terminate();
    assert_eq!(out.code(), Some(0), "{out}");
}
