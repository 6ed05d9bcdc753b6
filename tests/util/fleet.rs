//! A fleet of three `certd run` hosts on one machine, for the fault
//! tests: one throwaway PostgreSQL, one Pebble, and per host its own
//! state and certificate directories, http-01 responder, metrics
//! listener and `host_id`, the same fleet key, `lease_ttl = 6s`.
//!
//! Every host names the same ACME directory (the fleet shares one
//! account, and Pebble ties its key id and signed URLs to the host and
//! port a request names): a `FaultyFront` before Pebble, which can hold
//! or stall a request by path. Whichever host holds a certificate's
//! lease is the only one sending that certificate's requests, so a hold
//! lands on the leaseholder. Each host reaches it through an egress
//! proxy of its own (`HTTPS_PROXY`, see `egress.rs`) that counts what the
//! host sends and can cut it off, and reaches PostgreSQL through a
//! `TcpProxy` of its own that can be cut. Pebble validates http-01 at a
//! round-robin balancer over the three hosts' responders, so validations
//! land on hosts that did not order.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::postgres::Postgres;
use super::{
    Balancer, CaAccount, Daemon, Egress, FaultyFront, Pebble, PebbleOpts, TcpProxy, TestCommand,
    assert_nothing_pending_among, free_port, parse_leaf, private_key_spki, read_pem_certs,
};

/// The fleet's lease length: the shortest certd allows.
pub const LEASE_TTL: Duration = Duration::from_secs(6);

/// How long a condition may take on a loaded machine: an issuance, or a
/// lease running out and being claimed.
pub const PATIENCE: Duration = Duration::from_secs(90);

/// Host ids, in the order of `FleetEnv::hosts`.
pub const HOST_IDS: [&str; 3] = ["host-a", "host-b", "host-c"];

/// The fleet's shared parts and its hosts.
pub struct FleetEnv {
    pub pebble: Pebble,
    pub pg: Postgres,
    pub front: FaultyFront,
    pub balancer: Balancer,
    pub hosts: Vec<FleetHost>,
    dir: TempDir,
}

/// One host: its files and its two ways out.
pub struct FleetHost {
    pub id: &'static str,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// Its way to the CA.
    pub egress: Egress,
    /// Its way to PostgreSQL.
    pub db: TcpProxy,
    pub http01_port: u16,
    pub metrics_port: u16,
}

/// A `[[certificate]]` for `name.fleet.test`, validated by http-01.
pub fn http_cert(name: &str) -> String {
    format!(
        "\n[[certificate]]\nname = \"{name}\"\ndomains = [\"{name}.fleet.test\"]\nchallenges = [\"http-01\"]\n"
    )
}

impl FleetEnv {
    /// Starts PostgreSQL, the balancer, Pebble and the front, and writes
    /// each host's configuration with `certificates` (`[[certificate]]`
    /// tables) and retries 1 to 2 s apart. No host runs yet.
    pub fn new(certificates: &str) -> FleetEnv {
        Self::with_daemon(certificates, super::DAEMON_RETRY_2S)
    }

    /// As [`FleetEnv::new`], with `daemon` as each host's `[daemon]` table.
    pub fn with_daemon(certificates: &str, daemon: &str) -> FleetEnv {
        let dir = tempfile::Builder::new()
            .prefix("certd-fleet-")
            .tempdir()
            .expect("create fleet temp dir");
        let pg = Postgres::launch();
        let http01_ports: Vec<u16> = HOST_IDS.iter().map(|_| free_port()).collect();
        let balancer = Balancer::start(
            http01_ports
                .iter()
                .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
                .collect(),
        );
        let pebble = Pebble::with_opts(PebbleOpts {
            validation_ports: Some((balancer.port(), free_port())),
            ..PebbleOpts::default()
        });
        let front = FaultyFront::start(&pebble);
        let key_file = dir.path().join("fleet.key");
        let key: Vec<u8> = (0..32u8)
            .map(|i| i.wrapping_mul(41).wrapping_add(7))
            .collect();
        fs::write(&key_file, key).expect("write the fleet key");
        fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).expect("chmod 0600");
        let pg_addr = SocketAddr::from(([127, 0, 0, 1], pg.port()));
        let hosts = HOST_IDS
            .iter()
            .zip(http01_ports)
            .map(|(id, http01_port)| {
                let host = FleetHost {
                    id,
                    dir: dir.path().join(id),
                    config: dir.path().join(id).join("certd.toml"),
                    egress: Egress::start(),
                    db: TcpProxy::start(pg_addr),
                    http01_port,
                    metrics_port: free_port(),
                };
                host.write_config(&pebble, &pg, &front, &key_file, daemon, certificates);
                host
            })
            .collect();
        FleetEnv {
            pebble,
            pg,
            front,
            balancer,
            hosts,
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The host with id `id`.
    pub fn host(&self, id: &str) -> &FleetHost {
        self.hosts
            .iter()
            .find(|h| h.id == id)
            .unwrap_or_else(|| panic!("no host {id}"))
    }

    /// Orders Pebble created, for any account.
    pub fn new_orders(&self) -> usize {
        self.pebble.orders_created()
    }

    /// Runs a query on the shared database (directly, not through any
    /// host's proxy); panics on an error.
    pub fn query<T>(&self, sql: &'static str, bind: &str) -> Vec<T>
    where
        T: Send + Unpin + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        self.try_query(sql, bind)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// As `query`, returning the error: before a host has created the
    /// fleet's tables, say.
    pub fn try_query<T>(&self, sql: &'static str, bind: &str) -> Result<Vec<T>, sqlx::Error>
    where
        T: Send + Unpin + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        self.pg.try_query(sql, bind)
    }

    /// The lease row of certificate `name`: holder and epoch.
    pub fn lease(&self, name: &str) -> Option<(Option<String>, i64)> {
        self.query(
            "SELECT holder, epoch FROM leases WHERE name = $1",
            &format!("cert:{name}"),
        )
        .into_iter()
        .next()
    }

    /// What the ledger holds, as counts and highest ids of its rows, to
    /// compare before and after a host woke: any write shows.
    pub fn ledger_snapshot(&self) -> Vec<(String, i64, i64)> {
        self.query(
            "SELECT 'orders', COUNT(*), COALESCE(MAX(updated_at), 0) FROM orders WHERE $1 = $1
             UNION ALL SELECT 'authorizations', COUNT(*), COALESCE(MAX(updated_at), 0) FROM authorizations
             UNION ALL SELECT 'events', COUNT(*), COALESCE(MAX(id), 0) FROM events
             UNION ALL SELECT 'order_intents', COUNT(*), COALESCE(MAX(id), 0) FROM order_intents
             UNION ALL SELECT 'challenge_responses', COUNT(*), COALESCE(MAX(epoch), 0) FROM challenge_responses
             UNION ALL SELECT 'issued', COUNT(*), COALESCE(MAX(id), 0) FROM issued
             UNION ALL SELECT 'fleet_holds', COUNT(*), COALESCE(MAX(recorded_at), 0) FROM fleet_holds",
            "",
        )
    }

    /// Every authorization URL the shared ledger holds.
    pub fn ledger_authz_urls(&self) -> Vec<String> {
        self.query::<(String,)>("SELECT url FROM authorizations WHERE $1 = $1", "")
            .into_iter()
            .map(|(u,)| u)
            .collect()
    }

    /// Walks every order Pebble lists for the fleet's account, and every
    /// authorization the ledger recorded: none may be pending.
    pub fn assert_nothing_pending_at_ca(&self) {
        let directory = self.front.directory_url();
        let credentials = self
            .hosts
            .iter()
            .map(|h| certd::acme::credentials_path(&h.dir.join("state"), &directory))
            .find(|p| p.exists())
            .expect("some host has the fleet's account");
        let ca = CaAccount::new(directory, self.pebble.ca_bundle(), credentials);
        assert_nothing_pending_among(&ca, self.ledger_authz_urls());
    }
}

impl FleetHost {
    /// `certd run` for this host, its CA traffic through its egress proxy.
    pub fn spawn(&self) -> Daemon {
        self.command().spawn()
    }

    /// `certd run` with its wall clock `offset` off (libfaketime's
    /// `FAKETIME`, e.g. "+5m"): what the host's own clock says, while the
    /// database's is right.
    pub fn spawn_with_clock(&self, offset: &str) -> Daemon {
        self.command()
            .env("LD_PRELOAD", libfaketime())
            .env("FAKETIME", offset)
            // The monotonic clock stays: only the wall clock is off.
            .env("DONT_FAKE_MONOTONIC", "1")
            .spawn()
    }

    fn command(&self) -> TestCommand {
        let mut cmd = TestCommand::new(&self.config);
        cmd.arg("run")
            .env("HTTPS_PROXY", self.egress.url())
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy");
        cmd
    }

    pub fn cert_dir(&self, name: &str) -> PathBuf {
        self.dir.join("certs").join(name)
    }

    /// The serial installed for `name`, once its key matches it.
    pub fn installed_serial(&self, name: &str) -> Option<String> {
        let dir = self.cert_dir(name);
        let (cert, key) = (dir.join("cert.pem"), dir.join("privkey.pem"));
        if !cert.exists() || !key.exists() {
            return None;
        }
        let leaf = parse_leaf(read_pem_certs(&cert).first()?);
        (leaf.3 == private_key_spki(&key)).then_some(leaf.1)
    }

    /// This host's metrics page.
    pub fn metrics(&self) -> String {
        use std::io::{Read as _, Write as _};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)) else {
            return String::new();
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        text
    }

    /// The value of the metric line starting with `prefix`, if shown.
    pub fn metric(&self, prefix: &str) -> Option<f64> {
        self.metrics()
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    fn write_config(
        &self,
        pebble: &Pebble,
        pg: &Postgres,
        front: &FaultyFront,
        key_file: &Path,
        daemon: &str,
        certificates: &str,
    ) {
        fs::create_dir_all(&self.dir).expect("host dir");
        let database_url = pg.url().replace(
            &format!("@127.0.0.1:{}/", pg.port()),
            &format!("@127.0.0.1:{}/", self.db.port()),
        );
        let text = format!(
            r#"[acme]
directory = {directory}
contact = ["mailto:test@example.com"]
ca_bundle = {ca_bundle}

[storage]
state_dir = {state}
cert_dir = {certs}

[http01]
listen = "127.0.0.1:{http01}"

[metrics]
listen = "127.0.0.1:{metrics}"
{daemon}
[fleet]
database_url = {url}
key_file = {key}
lease_ttl = "{ttl}s"
host_id = "{id}"
{certificates}"#,
            directory = toml(&front.directory_url()),
            ca_bundle = toml_path(&pebble.ca_bundle()),
            state = toml_path(&self.dir.join("state")),
            certs = toml_path(&self.dir.join("certs")),
            http01 = self.http01_port,
            metrics = self.metrics_port,
            url = toml(&database_url),
            key = toml_path(key_file),
            ttl = LEASE_TTL.as_secs(),
            id = self.id,
        );
        fs::write(&self.config, text).expect("write config");
    }
}

/// Waits until `cond` holds, for at most `PATIENCE`; panics with the
/// hosts' logs if it does not. Returns how long it took.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool, hosts: &[&Daemon]) -> Duration {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > PATIENCE {
            let logs: Vec<String> = hosts.iter().map(|d| d.stderr()).collect();
            panic!(
                "{what}: not within {PATIENCE:?}\n{}",
                logs.join("\n-----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// libfaketime's preload library, as Debian's `faketime` package installs it.
fn libfaketime() -> PathBuf {
    let found = fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .chain([PathBuf::from("/usr/lib/faketime/libfaketime.so.1")])
        .find(|p| p.exists());
    found.unwrap_or_else(|| {
        panic!("no libfaketime.so.1: install Debian's `faketime` package (scripts/test does)")
    })
}

/// A TOML basic string.
fn toml(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes to JSON")
}

fn toml_path(path: &Path) -> String {
    toml(&path.display().to_string())
}
