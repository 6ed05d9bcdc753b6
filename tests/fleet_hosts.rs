//! What every host does in fleet mode, against a real PostgreSQL (a
//! throwaway cluster per test) and a real Pebble: a host that did not
//! order answers the CA's http-01 validation; every host installs what the
//! leaseholder publishes, with its own reload commands, and records it;
//! a host whose fleet key differs installs nothing and says which key; and
//! `certd status` shows each host's install.
//!
//! Each "host" is a `Services` opened from its own configuration file
//! (its own state and certificate directories, http-01 port and host id)
//! in this process, with its fleet tasks (`HostTasks`) and its http-01
//! responder falling back to the fleet's answers, as the daemon wires
//! them. The leaseholder's order is driven here with instant-acme (the
//! order path's fleet wiring is separate): it claims the certificate's
//! lease, commits each answer through the fence, pre-flights every live
//! member and only then asks Pebble to validate. Pebble validates at its
//! http-01 port, where host B listens; host A's responder is elsewhere.
//!
//! Waits are on conditions with generous deadlines, never a guessed sleep.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use certd::acme::AcmeHttp;
use certd::app::Services;
use certd::app::fleet_answers::{
    commit_answer, http01_fallback, preflight_members, tls_alpn_fallback,
};
use certd::app::fleet_hosts::{HostTasks, publish_pem};
use certd::clock::Clock;
use certd::config::Config;
use certd::fleet::{
    ChallengeAnswer, ChallengeKind, DbOptions, FleetDb, FleetKey, HolderId, InstallRow, Lease,
    LeaseName, LeaseTiming, Member, Renewer,
};
use certd::solver::{Http01Responder, TlsAlpnSolver};
use instant_acme::{
    Account, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::util::postgres::Postgres;
use crate::util::{Pebble, TestCommand, free_port, parse_leaf, private_key_spki, read_pem_certs};

/// How long any one condition may take to come true, on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(60);
/// The certificate every host serves.
const CERT: &str = "www";
const DOMAIN: &str = "www.fleet.test";

/// One host of the fleet, as the daemon runs it.
struct Host {
    id: &'static str,
    dir: PathBuf,
    config: PathBuf,
    services: Services,
    tasks: HostTasks,
    responder: Http01Responder,
}

impl Host {
    /// Writes `id`'s configuration (fleet key `key`, http-01 responder on
    /// `http01_port`) below `root`, opens its services and starts its
    /// fleet tasks and responder.
    async fn start(
        root: &Path,
        id: &'static str,
        pebble: &Pebble,
        pg: &Postgres,
        key: &[u8; 32],
        http01_port: u16,
        stop: (&TaskTracker, &CancellationToken),
    ) -> Host {
        let (dir, config) = write_config(root, id, pebble, pg, key, http01_port);
        let cfg = Config::load(&config).expect("configuration");
        let services = Services::open(cfg.clone(), Clock::system())
            .await
            .unwrap_or_else(|e| panic!("open {id}'s services: {e:#}\n{}", pg.log()));
        let (tracker, cancel) = stop;
        let tasks = HostTasks::start(&services, &cfg, cancel)
            .expect("fleet tasks")
            .expect("fleet mode");
        let responder = Http01Responder::start(
            format!("127.0.0.1:{http01_port}").parse().expect("address"),
            http01_fallback(&services),
            tracker,
            cancel,
        )
        .await
        .unwrap_or_else(|e| panic!("{id}'s http-01 responder: {e}"));
        Host {
            id,
            dir,
            config,
            services,
            tasks,
            responder,
        }
    }

    fn cert_file(&self, file: &str) -> PathBuf {
        self.dir.join("certs").join(CERT).join(file)
    }

    /// The serial installed on this host's disk, if any.
    fn installed_serial(&self) -> Option<String> {
        let pem = self.cert_file("cert.pem");
        pem.exists().then(|| parse_leaf(&read_pem_certs(&pem)[0]).1)
    }

    /// Waits until this host's heartbeat reached the database.
    async fn wait_heartbeat(&self) {
        let mut beats = self.tasks.heartbeat();
        tokio::time::timeout(PATIENCE, beats.wait_for(|s| s.beats > 0))
            .await
            .unwrap_or_else(|_| panic!("{}: no heartbeat within {PATIENCE:?}", self.id))
            .expect("heartbeat task");
    }
}

/// Writes host `id`'s directory below `root`: its fleet key file (0600)
/// and its configuration (its own state and certificate directories, its
/// http-01 responder on `http01_port`, the one certificate with a reload
/// command that appends the host's id to `<dir>/reloads`). Returns the
/// directory and the configuration's path.
fn write_config(
    root: &Path,
    id: &str,
    pebble: &Pebble,
    pg: &Postgres,
    key: &[u8; 32],
    http01_port: u16,
) -> (PathBuf, PathBuf) {
    let dir = root.join(id);
    std::fs::create_dir_all(&dir).expect("host dir");
    let key_file = dir.join("fleet.key");
    std::fs::write(&key_file, key).expect("write fleet key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))
        .expect("chmod fleet key");
    let reloads = dir.join("reloads");
    let config = dir.join("certd.toml");
    let text = format!(
        r#"[acme]
directory = {directory}
contact = ["mailto:test@example.com"]
ca_bundle = {ca_bundle}

[storage]
state_dir = {state}
cert_dir = {certs}

[http01]
listen = "127.0.0.1:{http01_port}"

[fleet]
database_url = {url}
key_file = {key_file}
host_id = "{id}"

[[certificate]]
name = "{CERT}"
domains = ["{DOMAIN}"]
reload = [{reload}]
"#,
        directory = toml(&pebble.directory_url()),
        ca_bundle = toml(&pebble.ca_bundle().display().to_string()),
        state = toml(&dir.join("state").display().to_string()),
        certs = toml(&dir.join("certs").display().to_string()),
        url = toml(&pg.url()),
        key_file = toml(&key_file.display().to_string()),
        reload = toml(&format!("echo {id} >> '{}'", reloads.display())),
    );
    std::fs::write(&config, text).expect("write config");
    (dir, config)
}

/// A TOML basic string.
fn toml(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes to JSON")
}

fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key).expect("random key");
    key
}

async fn open_db(pg: &Postgres) -> FleetDb {
    let opts = DbOptions {
        connect_timeout: Duration::from_secs(5),
        ..DbOptions::default()
    };
    FleetDb::open(&pg.url(), &opts)
        .await
        .unwrap_or_else(|e| panic!("open fleet database: {e}\n{}", pg.log()))
}

/// Polls `f` until it yields `Some`, for at most `PATIENCE`.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "{what}: not within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Claims the certificate's lease for `host` and keeps it renewed.
async fn claim(db: &FleetDb, host: &Host, cancel: &CancellationToken) -> (Lease, Renewer) {
    let timing =
        LeaseTiming::new(Duration::from_secs(30), Duration::from_secs(2)).expect("lease timing");
    let lease = Lease::claim(
        db,
        LeaseName::Cert(CERT.to_owned()),
        HolderId::new(host.id).expect("holder id"),
        timing,
    )
    .await
    .expect("claim")
    .expect("the lease is free");
    let renewer = lease.keep_renewed(db.clone(), cancel);
    (lease, renewer)
}

/// The leaseholder's order, as the order path drives it in fleet mode:
/// each http-01 answer is committed through the fence and pre-flighted at
/// every live member before the CA is asked to validate. Returns the
/// chain and the private key, PEM.
async fn order_as_leaseholder(pebble: &Pebble, holder: &Host, lease: &Lease) -> (String, String) {
    order_with(pebble, holder, lease, ChallengeType::Http01).await
}

/// [`order_as_leaseholder`] with the challenge type `kind`; tls-alpn-01
/// answers are committed the same way, and not pre-flighted.
async fn order_with(
    pebble: &Pebble,
    holder: &Host,
    lease: &Lease,
    kind: ChallengeType,
) -> (String, String) {
    let http = AcmeHttp::new(Some(&pebble.ca_bundle()), Clock::system()).expect("HTTP client");
    let (account, _) = Account::builder_with_http(Box::new(http))
        .create(
            &NewAccount {
                contact: &[],
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            pebble.directory_url(),
            None,
        )
        .await
        .expect("create the account");
    let ids = [Identifier::Dns(DOMAIN.to_owned())];
    let mut order = account
        .new_order(&NewOrder::new(&ids).profile("shortlived"))
        .await
        .expect("new order");
    let mut authzs = order.authorizations();
    while let Some(authz) = authzs.next().await {
        let mut authz = authz.expect("authorization");
        let authz_url = authz.url().to_owned();
        let mut challenge = authz
            .challenge(kind.clone())
            .unwrap_or_else(|| panic!("a {kind:?} challenge"));
        let http01 = kind == ChallengeType::Http01;
        let answer = ChallengeAnswer {
            token: challenge.token.clone(),
            kind: if http01 {
                ChallengeKind::Http01
            } else {
                ChallengeKind::TlsAlpn01
            },
            identifier: DOMAIN.to_owned(),
            key_authorization: challenge.key_authorization().as_str().to_owned(),
            authz_url,
            valid_for: Duration::from_secs(3600),
        };
        commit_answer(&holder.services, lease, &answer)
            .await
            .expect("commit the answer through the fence");
        if http01 {
            preflight_members(&holder.services, &answer)
                .await
                .expect("every live member serves the answer");
        }
        challenge.set_ready().await.expect("answer the challenge");
    }
    let retries = RetryPolicy::default().timeout(PATIENCE);
    let status = order.poll_ready(&retries).await.expect("poll the order");
    assert_eq!(status, OrderStatus::Ready, "{:?}", order.state());
    let key = rcgen::KeyPair::generate().expect("certificate key");
    let csr = rcgen::CertificateParams::new(vec![DOMAIN.to_owned()])
        .expect("CSR parameters")
        .serialize_request(&key)
        .expect("CSR");
    order.finalize_csr(csr.der()).await.expect("finalize");
    let chain = order
        .poll_certificate(&retries)
        .await
        .expect("the certificate");
    (chain, key.serialize_pem())
}

/// Each host's latest `installs` row for the certificate, by host.
async fn installs(db: &FleetDb) -> Vec<InstallRow> {
    db.latest_installs(&[CERT.to_owned()])
        .await
        .expect("read installs")
}

/// Host A orders; Pebble validates at host B's responder, which answers
/// from the fleet's answers (A's responder is on another port). A
/// publishes; both hosts install the same serial with the matching key,
/// run their own reload commands and record it; `certd status` (table and
/// `--json`) shows the lease and each host's install.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_did_not_order_answers_the_ca_and_every_host_installs() {
    let pg = Postgres::launch();
    let pebble = Pebble::start();
    let root = tempfile::tempdir().expect("temp dir");
    let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
    let key = random_key();
    let a = Host::start(
        root.path(),
        "host-a",
        &pebble,
        &pg,
        &key,
        free_port(),
        (&tracker, &cancel),
    )
    .await;
    let b = Host::start(
        root.path(),
        "host-b",
        &pebble,
        &pg,
        &key,
        pebble.http01_port(),
        (&tracker, &cancel),
    )
    .await;
    assert_ne!(a.responder.local_addr(), b.responder.local_addr());
    a.wait_heartbeat().await;
    b.wait_heartbeat().await;
    let db = open_db(&pg).await;
    let (lease, renewer) = claim(&db, &a, &cancel).await;

    let before = b.tasks.answer_counts();
    let (chain, key_pem) = order_as_leaseholder(&pebble, &a, &lease).await;
    // B never presented a token: what it served came from the fleet.
    let after = b.tasks.answer_counts();
    let served = (after.memory + after.database) - (before.memory + before.database);
    assert!(
        served >= 2,
        "B answered the pre-flight and the CA: {before:?} -> {after:?}"
    );

    let serial = publish_pem(&a.services, &lease, &chain, &key_pem)
        .await
        .expect("publish the issuance");
    assert_eq!(serial, parse_leaf(&pem_der(&chain)).1);
    for host in [&a, &b] {
        eventually(&format!("{} installs {serial}", host.id), || async {
            (host.installed_serial().as_deref() == Some(serial.as_str())).then_some(())
        })
        .await;
        let leaf = parse_leaf(&read_pem_certs(host.cert_file("fullchain.pem"))[0]);
        assert_eq!(leaf.0, [DOMAIN]);
        assert_eq!(
            leaf.3,
            private_key_spki(host.cert_file("privkey.pem")),
            "{}: the installed key matches the certificate",
            host.id
        );
        let mode = std::fs::metadata(host.cert_file("privkey.pem"))
            .expect("privkey.pem")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{}: privkey.pem is private", host.id);
    }
    // Each host ran its own reload command, and recorded it.
    let rows = eventually("both hosts record their install", || async {
        let rows = installs(&db).await;
        (rows.len() == 2 && rows.iter().all(|r| r.installed)).then_some(rows)
    })
    .await;
    for (row, host) in rows.iter().zip([&a, &b]) {
        assert_eq!(
            (row.host_id.as_str(), row.serial.as_str()),
            (host.id, serial.as_str())
        );
        let reload = row.reload_result.as_deref().unwrap_or_default();
        assert!(reload.contains(": ok:"), "{}: {reload}", host.id);
        let ran = std::fs::read_to_string(host.dir.join("reloads")).expect("reload ran");
        assert_eq!(ran.trim(), host.id);
    }

    // `certd status`: the lease, each host's serial and reload.
    let config = a.config.clone();
    let json = tokio::task::spawn_blocking(move || {
        TestCommand::new(&config)
            .args(["status", "--json"])
            .output()
    })
    .await
    .expect("status");
    json.assert_success();
    let parsed: serde_json::Value = serde_json::from_str(&json.stdout).expect("status JSON");
    let fleet = &parsed[0]["fleet"];
    assert_eq!(fleet["leaseholder"], "host-a", "{}", json.stdout);
    assert_eq!(fleet["epoch"], lease.epoch().get(), "{}", json.stdout);
    let hosts = fleet["hosts"].as_array().expect("hosts");
    assert_eq!(hosts.len(), 2, "{}", json.stdout);
    for (h, id) in hosts.iter().zip(["host-a", "host-b"]) {
        assert_eq!(h["host"], id);
        assert_eq!(h["serial"], serial.as_str());
        assert_eq!(h["installed"], true);
    }
    assert_eq!(fleet["live_hosts"], serde_json::json!(["host-a", "host-b"]));
    assert_eq!(fleet["hosts_listing_differently"], serde_json::json!([]));
    let config = b.config.clone();
    let table =
        tokio::task::spawn_blocking(move || TestCommand::new(&config).arg("status").output())
            .await
            .expect("status");
    table.assert_success();
    assert!(
        table.stdout.contains(&format!(
            "www: leaseholder host-a, epoch {}",
            lease.epoch().get()
        )),
        "{}",
        table.stdout
    );
    for id in ["host-a", "host-b"] {
        assert!(
            table.stdout.contains(&format!(
                "    {id}: serial {serial} installed; reload: echo {id}"
            )),
            "{}",
            table.stdout
        );
    }

    // `certd status NAME` (one block per certificate) ends with the same.
    let config = b.config.clone();
    let detail = tokio::task::spawn_blocking(move || {
        TestCommand::new(&config).args(["status", CERT]).output()
    })
    .await
    .expect("status");
    detail.assert_success();
    assert!(
        detail
            .stdout
            .contains(&format!("    host-b: serial {serial} installed")),
        "{}",
        detail.stdout
    );

    renewer.stop().await;
    a.tasks.stop().await;
    b.tasks.stop().await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
}

/// A host whose fleet key differs from the publisher's installs nothing:
/// the error names both key ids, is recorded for that host, and `status`
/// shows it; the host with the right key installs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_another_fleet_key_installs_nothing_and_names_the_key() {
    let pg = Postgres::launch();
    let pebble = Pebble::start();
    let root = tempfile::tempdir().expect("temp dir");
    let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
    let (key, other_key) = (random_key(), random_key());
    let a = Host::start(
        root.path(),
        "host-a",
        &pebble,
        &pg,
        &key,
        pebble.http01_port(),
        (&tracker, &cancel),
    )
    .await;
    let c = Host::start(
        root.path(),
        "host-c",
        &pebble,
        &pg,
        &other_key,
        free_port(),
        (&tracker, &cancel),
    )
    .await;
    a.wait_heartbeat().await;
    c.wait_heartbeat().await;
    let db = open_db(&pg).await;
    let (lease, renewer) = claim(&db, &a, &cancel).await;
    // C answers the pre-flight from the database too: answers are not
    // sealed, only keys are.
    let (chain, key_pem) = order_as_leaseholder(&pebble, &a, &lease).await;
    let serial = publish_pem(&a.services, &lease, &chain, &key_pem)
        .await
        .expect("publish the issuance");

    let (ours, theirs) = (key_id(&a, &key), key_id(&c, &other_key));
    assert_ne!(ours, theirs);
    let rows = eventually("both hosts record an outcome", || async {
        let rows = installs(&db).await;
        (rows.len() == 2).then_some(rows)
    })
    .await;
    assert!(rows[0].installed, "{rows:?}");
    let refused = &rows[1];
    assert_eq!(refused.host_id, "host-c");
    assert_eq!(refused.serial, serial);
    assert!(!refused.installed);
    let error = refused.error.as_deref().unwrap_or_default();
    assert!(
        error.contains(&ours) && error.contains(&theirs),
        "the error names both key ids ({ours}, {theirs}): {error}"
    );
    assert_eq!(a.installed_serial().as_deref(), Some(serial.as_str()));
    // Nothing reached C's disk, and its reload command never ran.
    assert!(!c.dir.join("certs").join(CERT).exists());
    assert!(!c.dir.join("reloads").exists());
    let status = c.tasks.distribution().borrow().clone();
    assert!(status.failures >= 1, "{status:?}");
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains(&theirs),
        "{status:?}"
    );

    // A member whose certificate definitions differ is named.
    db.heartbeat(&Member {
        host_id: "host-x".into(),
        version: "0".into(),
        http01_addr: None,
        config_hash: "a hash of other certificates".into(),
    })
    .await
    .expect("host-x's heartbeat");

    let config = c.config.clone();
    let table =
        tokio::task::spawn_blocking(move || TestCommand::new(&config).arg("status").output())
            .await
            .expect("status");
    table.assert_success();
    let line = table
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("host-c: serial"))
        .unwrap_or_else(|| panic!("no line for host-c:\n{}", table.stdout));
    assert!(
        line.contains("NOT installed") && line.contains(&ours) && line.contains(&theirs),
        "{line}"
    );
    assert!(
        table.stdout.contains(
            "  host host-x lists certificates differently: its [[certificate]] sections differ from this host's"
        ),
        "{}",
        table.stdout
    );
    assert!(
        !table.stdout.contains("host host-a lists"),
        "{}",
        table.stdout
    );
    let config = c.config.clone();
    let json = tokio::task::spawn_blocking(move || {
        TestCommand::new(&config)
            .args(["status", "--json"])
            .output()
    })
    .await
    .expect("status");
    let parsed: serde_json::Value = serde_json::from_str(&json.stdout).expect("status JSON");
    assert_eq!(
        parsed[0]["fleet"]["hosts_listing_differently"],
        serde_json::json!(["host-x"]),
        "{}",
        json.stdout
    );

    renewer.stop().await;
    a.tasks.stop().await;
    c.tasks.stop().await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
}

/// The id of the key in `host`'s key file, as errors print it.
fn key_id(host: &Host, raw: &[u8; 32]) -> String {
    let key = FleetKey::load(&host.dir.join("fleet.key")).expect("load key");
    let id = key.id().to_string();
    // The id is the key's SHA-256 prefix: `sha256sum key_file | cut -c1-16`.
    let digest = ring::digest::digest(&ring::digest::SHA256, raw);
    let prefix: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(id, prefix);
    id
}

/// The first certificate of a PEM chain, DER.
fn pem_der(chain: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::pem_slice_iter(chain.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM")
        .to_vec()
}

/// tls-alpn-01 too: Pebble validates at host B's tls-alpn-01 responder,
/// which holds no challenge and answers from the fleet's database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_did_not_order_answers_tls_alpn01_from_the_database() {
    let pg = Postgres::launch();
    let pebble = Pebble::start();
    let root = tempfile::tempdir().expect("temp dir");
    let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
    let key = random_key();
    let a = Host::start(
        root.path(),
        "host-a",
        &pebble,
        &pg,
        &key,
        free_port(),
        (&tracker, &cancel),
    )
    .await;
    let b = Host::start(
        root.path(),
        "host-b",
        &pebble,
        &pg,
        &key,
        free_port(),
        (&tracker, &cancel),
    )
    .await;
    let _b_tls = TlsAlpnSolver::start(
        format!("127.0.0.1:{}", pebble.tls_port())
            .parse()
            .expect("address"),
        tls_alpn_fallback(&b.services),
        &tracker,
        &cancel,
    )
    .await
    .expect("host-b's tls-alpn-01 responder");
    let db = open_db(&pg).await;
    let (lease, renewer) = claim(&db, &a, &cancel).await;
    let (chain, _) = order_with(&pebble, &a, &lease, ChallengeType::TlsAlpn01).await;
    assert_eq!(parse_leaf(&pem_der(&chain)).0, [DOMAIN]);

    renewer.stop().await;
    a.tasks.stop().await;
    b.tasks.stop().await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
}

/// The daemon in fleet mode wires the same parts: a host running
/// `certd::daemon::run` that did not order beats its heartbeat, answers
/// the CA for the leaseholder's token from its own responder, installs
/// what the leaseholder publishes, and its metrics say so.
///
/// Needs the ledger on PostgreSQL (the daemon's first write is an event),
/// and the scheduler's fleet leases so that B, seeing the certificate's
/// lease held by A, does not order it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_in_fleet_mode_answers_for_the_leaseholder_and_installs_its_issuance() {
    let pg = Postgres::launch();
    let pebble = Pebble::start();
    let root = tempfile::tempdir().expect("temp dir");
    let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
    let key = random_key();
    let a = Host::start(
        root.path(),
        "host-a",
        &pebble,
        &pg,
        &key,
        free_port(),
        (&tracker, &cancel),
    )
    .await;
    a.wait_heartbeat().await;
    let db = open_db(&pg).await;
    // A holds the lease before B starts: B must not order.
    let (lease, renewer) = claim(&db, &a, &cancel).await;

    let (b_dir, b_config) = write_config(
        root.path(),
        "host-b",
        &pebble,
        &pg,
        &key,
        pebble.http01_port(),
    );
    let cfg = Config::load(&b_config).expect("configuration");
    let services = Services::open(cfg, Clock::system())
        .await
        .expect("host-b's services");
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind metrics");
    let metrics_addr = metrics.local_addr().expect("metrics address");
    let (_reload_tx, reload) = tokio::sync::mpsc::channel(1);
    let shutdown = CancellationToken::new();
    let listeners = certd::daemon::Listeners {
        metrics: Some(metrics),
        reload,
    };
    // Its error, should it stop early, for the waits below to report.
    let stopped: Arc<Mutex<Option<String>>> = Arc::default();
    let daemon = tokio::spawn({
        let (stopped, shutdown) = (stopped.clone(), shutdown.clone());
        async move {
            let end = certd::daemon::run(services, listeners, shutdown).await;
            *stopped.lock().expect("lock") = Some(match &end {
                Ok(()) => "stopped without an error".to_owned(),
                Err(e) => format!("{e:#}"),
            });
            end
        }
    });
    let running = || {
        if let Some(end) = stopped.lock().expect("lock").clone() {
            panic!("host-b's daemon stopped early: {end}");
        }
    };
    eventually("host-b's daemon beats its heartbeat", || async {
        running();
        let members = db
            .live_members(Duration::from_secs(180))
            .await
            .expect("members");
        members.iter().any(|m| m.host_id == "host-b").then_some(())
    })
    .await;

    // The CA validates at B's port: B's daemon answers A's token.
    let (chain, key_pem) = order_as_leaseholder(&pebble, &a, &lease).await;
    let serial = publish_pem(&a.services, &lease, &chain, &key_pem)
        .await
        .expect("publish the issuance");
    let cert_pem = b_dir.join("certs").join(CERT).join("cert.pem");
    eventually("host-b's daemon installs the issuance", || async {
        running();
        (cert_pem.exists() && parse_leaf(&read_pem_certs(&cert_pem)[0]).1 == serial).then_some(())
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(b_dir.join("reloads"))
            .expect("reload ran")
            .trim(),
        "host-b"
    );
    let page = tokio::task::spawn_blocking(move || scrape(metrics_addr))
        .await
        .expect("scrape");
    assert!(page.contains("\ncertd_fleet_database_up 1\n"), "{page}");
    assert!(
        page.contains(&format!(
            "certd_fleet_install_lag_seconds{{name=\"{CERT}\",serial=\"{serial}\",installed=\"true\"}}"
        )),
        "{page}"
    );
    let answered: u64 = page
        .lines()
        .filter(|l| {
            l.starts_with("certd_fleet_http01_answers_total{source=\"memory\"}")
                || l.starts_with("certd_fleet_http01_answers_total{source=\"database\"}")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(answered >= 2, "the pre-flight and the CA: {page}");

    shutdown.cancel();
    tokio::time::timeout(PATIENCE, daemon)
        .await
        .expect("the daemon stops on its token")
        .expect("daemon task")
        .expect("a clean shutdown");
    renewer.stop().await;
    a.tasks.stop().await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
}

/// `GET /metrics` from a daemon's listener.
fn scrape(addr: std::net::SocketAddr) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("response");
    text
}
