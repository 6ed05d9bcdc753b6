//! Starting in fleet mode: each wrong setting (database URL, password,
//! an unreachable or silent server, the fleet key file's presence, size
//! and mode) stops certd at once with exit 2 and one line naming the
//! problem, never the password; the fleet's one ACME account, created once
//! for hosts that start together; and `certd fleet import`, which copies a
//! real SQLite ledger (from an issuance against Pebble) into the fleet's
//! database once.
//!
//! Every test runs the certd binary against a throwaway PostgreSQL cluster
//! of its own (`util::postgres`).

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::{Connection as _, PgConnection, SqliteConnection};

use crate::util::postgres::Postgres;
use crate::util::{CmdOutput, TestEnv, cert_table, free_port};

/// The ledger's tables, SQLite's name then PostgreSQL's, in the order
/// `certd fleet import` copies and prints them.
const TABLES: [(&str, &str); 11] = [
    ("accounts", "accounts"),
    ("certificates", "certificates"),
    ("orders", "orders"),
    ("authorizations", "authorizations"),
    ("order_authorizations", "order_authorizations"),
    ("challenges", "challenges"),
    ("events", "events"),
    ("order_intents", "order_intents"),
    ("issued", "issued_orders"),
    ("ca_pauses", "ca_pauses"),
    ("ca_state", "ca_state"),
];

/// Writes a fleet key of `len` random bytes with `mode`.
fn write_key(path: &Path, len: usize, mode: u32) {
    let mut bytes = vec![0u8; len];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("system random");
    fs::write(path, bytes).expect("write fleet key");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod fleet key");
}

/// `[fleet]` for `url` and `key`, this host named `host`.
fn fleet_table(url: &str, key: &Path, host: &str) -> String {
    format!(
        "\n[fleet]\ndatabase_url = \"{url}\"\nkey_file = \"{}\"\nhost_id = \"{host}\"\nlease_ttl = \"6s\"\n",
        key.display()
    )
}

/// The config file of `env` with `[fleet]` added (and no certificate).
fn write_fleet_config(env: &TestEnv, url: &str, key: &Path) {
    env.write_config("");
    let text = fs::read_to_string(env.config_path()).expect("read config");
    env.write_raw_config(&format!("{text}{}", fleet_table(url, key, "a")));
}

/// Asserts that certd exited with 2 and that its error line is exactly
/// `certd: fleet mode cannot start: <expected>`, and that the password
/// appears nowhere.
#[track_caller]
fn assert_refused(out: &CmdOutput, expected: &str, password: &str) {
    out.assert_code(2);
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("certd: "))
        .unwrap_or_else(|| panic!("no error line\n{out}"));
    assert_eq!(
        line,
        format!("certd: fleet mode cannot start: {expected}"),
        "\n{out}"
    );
    assert!(
        !out.stderr.contains(password) && !out.stdout.contains(password),
        "the password leaked\n{out}"
    );
    assert!(!out.stderr.contains("panicked"), "{out}");
}

#[test]
fn each_wrong_fleet_setting_stops_certd_with_exit_2_naming_the_problem() {
    let pg = Postgres::launch();
    let env = TestEnv::new();
    let key = env.dir().join("fleet.key");
    let run = |url: &str| {
        write_fleet_config(&env, url, &key);
        env.command()
            .arg("run")
            .timeout(Duration::from_secs(60))
            .output()
    };
    let password = pg.password().to_owned();

    // The key file: missing, then 31 bytes, then readable by the group.
    let out = run(&pg.url());
    assert_refused(
        &out,
        &format!(
            "fleet.key_file: fleet key file {}: cannot read it: No such file or directory (os error 2)",
            key.display()
        ),
        &password,
    );
    write_key(&key, 31, 0o600);
    assert_refused(
        &run(&pg.url()),
        &format!(
            "fleet.key_file: fleet key file {}: is 31 bytes long; a fleet key is exactly 32 random bytes (e.g. `head -c 32 /dev/urandom`)",
            key.display()
        ),
        &password,
    );
    write_key(&key, 32, 0o640);
    assert_refused(
        &run(&pg.url()),
        &format!(
            "fleet.key_file: fleet key file {}: mode 0640 lets group or others access it; the key must be readable by its owner only (chmod 600)",
            key.display()
        ),
        &password,
    );
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod");

    // A wrong password names the role and the server, not the password.
    let wrong = "not-the-Password-4c1d";
    let out = run(&pg.url_with_password(wrong));
    assert_refused(
        &out,
        &format!(
            "fleet.database_url: cannot connect to the fleet database at certd@127.0.0.1:{}: error returned from database: password authentication failed for user \"certd\"",
            pg.port()
        ),
        &password,
    );
    assert!(!out.stderr.contains(wrong), "{out}");

    // A URL that does not parse: the reason, without the URL.
    let out = run(&format!(
        "postgres://certd:{password}@127.0.0.1:notaport/postgres"
    ));
    assert_refused(
        &out,
        "fleet.database_url: fleet database_url is not a valid PostgreSQL URL: invalid port number",
        &password,
    );

    // Nothing listens there.
    let closed = free_port();
    assert_refused(
        &run(&format!(
            "postgres://certd:{password}@127.0.0.1:{closed}/postgres"
        )),
        &format!(
            "fleet.database_url: cannot connect to the fleet database at certd@127.0.0.1:{closed}: error communicating with database: Connection refused (os error 111)"
        ),
        &password,
    );

    // A server that accepts the connection and never answers (a hung
    // host, a firewall that swallows packets): the connect timeout.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    assert_refused(
        &run(&format!(
            "postgres://certd:{password}@127.0.0.1:{port}/postgres"
        )),
        &format!(
            "fleet.database_url: cannot connect to the fleet database at 127.0.0.1:{port}: no answer within 10s"
        ),
        &password,
    );
    drop(silent);
}

/// Where a host keeps its copy of the account's credentials: the one file
/// named `account-*.json` in its state directory.
fn credentials_file(state_dir: &Path) -> Option<PathBuf> {
    fs::read_dir(state_dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("account-") && n.ends_with(".json"))
        })
}

/// Waits until `state_dir` holds the credentials file, or panics with the
/// daemon's log.
fn wait_for_credentials(state_dir: &Path, daemon: &crate::util::Daemon) -> PathBuf {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(path) = credentials_file(state_dir) {
            return path;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no account credentials in {}\n{}",
            state_dir.display(),
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Two hosts started together against one fleet database make one ACME
/// account: both end up with the same credentials (account URL and key),
/// the database holds exactly one sealed key for the directory, sealed
/// (the key's text is not in it), and each host's copy is mode 0600.
#[test]
fn hosts_starting_together_share_one_account_stored_sealed() {
    let pg = Postgres::launch();
    let env = TestEnv::new();
    let key = env.dir().join("fleet.key");
    write_key(&key, 32, 0o600);
    write_fleet_config(&env, &pg.url(), &key);
    // Host b: its own state and certificate directories and http-01 port.
    let text = fs::read_to_string(env.config_path()).expect("read config");
    let b_dir = env.dir().join("b");
    fs::create_dir_all(&b_dir).expect("mkdir b");
    let b_text = text
        .replace(
            &env.state_dir().display().to_string(),
            &b_dir.join("state").display().to_string(),
        )
        .replace(
            &env.cert_dir().display().to_string(),
            &b_dir.join("certs").display().to_string(),
        )
        .replace(
            &format!("127.0.0.1:{}", env.pebble.http01_port()),
            &format!("127.0.0.1:{}", free_port()),
        )
        .replace("host_id = \"a\"", "host_id = \"b\"");
    let b_config = b_dir.join("certd.toml");
    fs::write(&b_config, b_text).expect("write b config");

    let a = env.command().arg("run").spawn();
    let b = crate::util::TestCommand::new(&b_config).arg("run").spawn();
    let a_creds = wait_for_credentials(&env.state_dir(), &a);
    let b_creds = wait_for_credentials(&b_dir.join("state"), &b);
    // A file appears whole (written atomically), so equal bytes mean one
    // account: the same URL and the same key.
    let a_bytes = fs::read(&a_creds).expect("read a's credentials");
    assert_eq!(
        a_bytes,
        fs::read(&b_creds).expect("read b's credentials"),
        "both hosts use one account\n--- a ---\n{}\n--- b ---\n{}",
        a.stderr(),
        b.stderr()
    );
    for path in [&a_creds, &b_creds] {
        let mode = fs::metadata(path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }

    let creds: serde_json::Value = serde_json::from_slice(&a_bytes).expect("credentials JSON");
    let pkcs8 = creds["key_pkcs8"].as_str().expect("key_pkcs8").to_owned();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let secrets: Vec<(String, Vec<u8>)> = rt.block_on(async {
        let mut conn = PgConnection::connect(&pg.url()).await.expect("connect");
        sqlx::query_as("SELECT name, sealed FROM fleet_secrets")
            .fetch_all(&mut conn)
            .await
            .expect("fleet_secrets")
    });
    assert_eq!(secrets.len(), 1, "one key stored");
    assert_eq!(
        secrets[0].0,
        format!("account:{}", env.directory_url()),
        "stored under the directory's account lease"
    );
    let sealed = String::from_utf8_lossy(&secrets[0].1);
    assert!(
        !sealed.contains(&pkcs8) && !sealed.contains("key_pkcs8"),
        "the key is stored sealed"
    );
    for daemon in [&a, &b] {
        assert!(!daemon.stderr().contains(&pkcs8), "the key is not logged");
    }
    a.terminate();
    b.terminate();
}

/// Row counts of the ledger's tables in SQLite's file at `db`.
async fn sqlite_counts(db: &Path) -> Vec<i64> {
    let mut conn = SqliteConnection::connect(&format!("sqlite://{}?mode=ro", db.display()))
        .await
        .expect("open the SQLite ledger");
    let mut counts = Vec::new();
    for (table, _) in TABLES {
        let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&mut conn)
            .await
            .expect(table);
        counts.push(n);
    }
    counts
}

/// Row counts of the ledger's tables in the fleet's database.
async fn postgres_counts(url: &str) -> Vec<i64> {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let mut counts = Vec::new();
    for (_, table) in TABLES {
        let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&mut conn)
            .await
            .expect(table);
        counts.push(n);
    }
    counts
}

/// A ledger made by a real issuance (`certd renew` against Pebble) is
/// copied whole: every table's row count is the same in PostgreSQL, the
/// output lists them, and the certificate's row reads back as SQLite has
/// it. A second import is refused, says why, and copies nothing.
#[test]
fn fleet_import_copies_a_real_ledger_once() {
    let pg = Postgres::launch();
    let env = TestEnv::new();
    env.write_config(&cert_table("www", "www.example.test"));
    env.certd(&["renew"]).assert_success();
    let db = env.state_dir().join("certd.db");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let before = rt.block_on(sqlite_counts(&db));
    assert!(
        before[0] == 1 && before[2] >= 1 && before[6] >= 1,
        "the issuance left an account, an order and events: {before:?}"
    );

    let key = env.dir().join("fleet.key");
    write_key(&key, 32, 0o600);
    let text = fs::read_to_string(env.config_path()).expect("read config");
    env.write_raw_config(&format!("{text}{}", fleet_table(&pg.url(), &key, "a")));

    let out = env.certd(&["fleet", "import"]);
    out.assert_success();
    let mut expected = format!(
        "copied the ledger {} into the fleet database at 127.0.0.1:{}:\n",
        db.display(),
        pg.port()
    );
    for ((_, table), n) in TABLES.iter().zip(&before) {
        expected.push_str(&format!("  {table}: {n}\n"));
    }
    assert_eq!(out.stdout, expected, "\n{out}");
    assert_eq!(rt.block_on(postgres_counts(&pg.url())), before);
    let (serial, issuer): (String, Option<String>) = rt.block_on(async {
        let mut conn = PgConnection::connect(&pg.url()).await.expect("connect");
        sqlx::query_as("SELECT serial, issuer_ca FROM certificates WHERE name = 'www'")
            .fetch_one(&mut conn)
            .await
            .expect("the certificate's row")
    });
    let sqlite_serial: String = rt.block_on(async {
        let mut conn = SqliteConnection::connect(&format!("sqlite://{}?mode=ro", db.display()))
            .await
            .expect("open");
        sqlx::query_scalar("SELECT serial FROM certificates WHERE name = 'www'")
            .fetch_one(&mut conn)
            .await
            .expect("serial")
    });
    assert_eq!(serial, sqlite_serial);
    assert!(issuer.is_some(), "issuer_ca copied");

    let again = env.certd(&["fleet", "import"]);
    again.assert_code(1);
    assert_eq!(
        again.stderr.lines().find(|l| l.starts_with("certd: ")),
        Some(
            "certd: fleet import: the fleet's ledger already holds rows (1 in accounts); \
             `certd fleet import` only fills an empty one, and nothing was copied"
        ),
        "\n{again}"
    );
    assert_eq!(
        rt.block_on(postgres_counts(&pg.url())),
        before,
        "nothing copied twice"
    );
}
