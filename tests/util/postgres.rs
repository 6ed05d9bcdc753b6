//! A throwaway PostgreSQL cluster for one test: `initdb` into a temporary
//! directory, `pg_ctl start` on a free loopback port, stopped (immediately)
//! and removed when dropped.
//!
//! One cluster per test rather than one per test run: the outage test
//! stops and restarts its server, the lease tests count epochs from 1, and
//! a static shared cluster would never be dropped, so it would outlive the
//! test binary. `initdb` takes about a second, which the isolation is
//! worth.
//!
//! Host connections need a password (scram-sha-256), as a fleet's database
//! would, so a wrong password can be tested; the superuser is `certd`.
//!
//! initdb and postgres refuse to run as root. As root (CI), both run as the
//! `postgres` user if there is one (the Debian package creates it), else
//! `nobody`, through `runuser`, with the temporary directory given to that
//! user. The binaries come from `CERTD_TEST_PG_BIN` (scripts/test sets it),
//! else the newest `/usr/lib/postgresql/<version>/bin`.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

use super::free_port;

/// The cluster's superuser.
pub const SUPERUSER: &str = "certd";

/// A running (or stopped, between `stop_immediate` and `start`) cluster.
#[derive(Debug)]
pub struct Postgres {
    dir: TempDir,
    bin: PathBuf,
    /// Who runs initdb and postgres when we are root.
    run_as: Option<String>,
    port: u16,
    password: String,
    running: bool,
}

impl Postgres {
    /// Creates a cluster and starts it. Panics with initdb's or the
    /// server's log if that fails.
    pub fn launch() -> Postgres {
        let dir = tempfile::Builder::new()
            .prefix("certd-pg-")
            .tempdir()
            .expect("create PostgreSQL temp dir");
        let mut pg = Postgres {
            dir,
            bin: bin_dir(),
            run_as: unprivileged_user(),
            port: 0,
            password: random_hex(16),
            running: false,
        };
        pg.init();
        // A port free when chosen may be taken before the server binds it
        // (another test's server); try a few.
        for _ in 0..5 {
            pg.port = free_port();
            if pg.try_start() {
                return pg;
            }
        }
        panic!("PostgreSQL did not start:\n{}", pg.log());
    }

    /// `postgres://certd:<password>@127.0.0.1:<port>/postgres`
    pub fn url(&self) -> String {
        self.url_with_password(&self.password)
    }

    /// The URL with another password, for a login that must fail.
    pub fn url_with_password(&self, password: &str) -> String {
        format!(
            "postgres://{SUPERUSER}:{password}@127.0.0.1:{}/postgres",
            self.port
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// The version of the server binary, as `server_version_num` has it
    /// (15.18 → 150018).
    pub fn binary_version_num(&self) -> u32 {
        let out = self.run("postgres", &[OsStr::new("--version")]);
        // "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text.split_whitespace().nth(2).unwrap_or_default();
        let mut parts = version.split('.').map(str::parse::<u32>);
        match (parts.next(), parts.next()) {
            (Some(Ok(major)), Some(Ok(minor))) => major * 10_000 + minor,
            _ => panic!("cannot read the version in {text:?}"),
        }
    }

    /// `pg_ctl stop -m immediate`: the server dies without a checkpoint,
    /// dropping every connection, as in a crash or a power cut.
    pub fn stop_immediate(&mut self) {
        let out = self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        self.running = false;
    }

    /// Starts the stopped server again on the same port (after
    /// `stop_immediate`), running crash recovery.
    pub fn start(&mut self) {
        assert!(!self.running, "PostgreSQL is already running");
        assert!(
            self.try_start(),
            "PostgreSQL did not restart:\n{}",
            self.log()
        );
    }

    /// Leaves the cluster running for the rest of this process, for a
    /// cluster shared by many tests from a static: statics are never
    /// dropped, so a watcher process stops the server and removes its
    /// directory once this process has exited.
    pub fn keep_until_exit(self) {
        let stop = {
            let program = self.bin.join("pg_ctl");
            let prefix = match &self.run_as {
                Some(user) => format!("runuser -u {user} -- "),
                None => String::new(),
            };
            format!(
                "{prefix}{} -D {} -m immediate -w stop",
                program.display(),
                self.data().display()
            )
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            dir = self.dir.path().display(),
        );
        // Never waited for: it must outlive this process.
        #[allow(clippy::zombie_processes)]
        let _watcher = Command::new("sh")
            .args(["-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the cluster's watcher");
        // The watcher owns the server and the directory from here.
        std::mem::forget(self);
    }

    /// Runs `sql` with `bind` as `$1` on the cluster's database, from a
    /// test's own (blocking) thread: what a test reads to check what
    /// certd wrote.
    pub fn try_query<T>(&self, sql: &'static str, bind: &str) -> Result<Vec<T>, sqlx::Error>
    where
        T: Send + Unpin + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        let bind = bind.to_owned();
        self.on_pool(|pool| async move {
            sqlx::query_as::<_, T>(sql)
                .bind(bind)
                .fetch_all(&pool)
                .await
        })
    }

    /// Runs the statements `sql` (no parameters) on the cluster's
    /// database: what a test sets up there before certd runs (a trigger
    /// that makes one of certd's writes fail, say). Panics on an error.
    pub fn execute(&self, sql: &'static str) {
        self.on_pool(|pool| async move { sqlx::raw_sql(sql).execute(&pool).await.map(|_| ()) })
            .unwrap_or_else(|e: sqlx::Error| panic!("{sql}: {e}"));
    }

    /// Runs `work` with a pool of connections to the cluster's database,
    /// from a test's own (blocking) thread, and closes the pool.
    fn on_pool<T, Fut>(&self, work: impl FnOnce(sqlx::PgPool) -> Fut) -> Result<T, sqlx::Error>
    where
        Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        let url = self.url();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async move {
                let pool = sqlx::PgPool::connect(&url).await?;
                let out = work(pool.clone()).await;
                pool.close().await;
                out
            })
    }

    /// As `try_query`; panics on an error.
    pub fn query<T>(&self, sql: &'static str, bind: &str) -> Vec<T>
    where
        T: Send + Unpin + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        self.try_query(sql, bind)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(self.dir.path().join("server.log")) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn init(&self) {
        let pwfile = self.dir.path().join("pwfile");
        fs::write(&pwfile, format!("{}\n", self.password)).expect("write pwfile");
        if let Some(user) = &self.run_as {
            chown_to(self.dir.path(), user);
            chown_to(&pwfile, user);
        }
        let pwfile_arg = format!("--pwfile={}", pwfile.display());
        let data = self.data();
        let out = self.run(
            "initdb",
            &[
                OsStr::new("-D"),
                data.as_os_str(),
                OsStr::new("-U"),
                OsStr::new(SUPERUSER),
                OsStr::new("--auth-local=trust"),
                OsStr::new("--auth-host=scram-sha-256"),
                OsStr::new(&pwfile_arg),
                OsStr::new("--encoding=UTF8"),
                OsStr::new("--no-locale"),
                OsStr::new("--no-sync"),
                OsStr::new("--no-instructions"),
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The password is in the cluster now; the file has no more use.
        let _ = fs::remove_file(&pwfile);
    }

    /// Starts the server and waits until it accepts connections; false if
    /// it did not come up (the log says why).
    fn try_start(&mut self) -> bool {
        // fsync off and small buffers: a test cluster holds nothing worth
        // a disk flush, and several run at once on a small machine.
        let options = format!(
            "-k {} -p {} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c shared_buffers=16MB -c max_connections=40",
            self.dir.path().display(),
            self.port
        );
        let log = format!("--log={}", self.dir.path().join("server.log").display());
        let out = self.pg_ctl(&["-w", "-t", "60", &log, "-o", &options, "start"]);
        self.running = out.status.success();
        self.running
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let data = self.data();
        let mut all = vec![OsStr::new("-D"), data.as_os_str()];
        all.extend(args.iter().map(OsStr::new));
        self.run("pg_ctl", &all)
    }

    /// Runs one of the PostgreSQL binaries, as the unprivileged user when
    /// we are root.
    fn run(&self, program: &str, args: &[&OsStr]) -> Output {
        let program = self.bin.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        cmd.args(args)
            // The server must not inherit the test's standard streams: it
            // outlives pg_ctl, and a test harness waiting for them to close
            // would wait for it.
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", program.display()))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
        }
    }
}

/// Where initdb, pg_ctl and postgres are.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CERTD_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let newest = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max();
    match newest {
        Some((_, bin)) => bin,
        None => panic!(
            "no PostgreSQL: set CERTD_TEST_PG_BIN to its bin directory, or install the \
             `postgresql` package (scripts/test does)"
        ),
    }
}

/// The user initdb and postgres run as when we are root.
fn unprivileged_user() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to this process's effective user.
    if fs::metadata("/proc/self").map_or(true, |m| m.uid() != 0) {
        return None;
    }
    let exists = |user: &str| {
        Command::new("id")
            .args(["-u", user])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    Some(
        if exists("postgres") {
            "postgres"
        } else {
            "nobody"
        }
        .to_owned(),
    )
}

fn chown_to(path: &Path, user: &str) {
    let status = Command::new("chown")
        .arg(user)
        .arg(path)
        .status()
        .expect("run chown");
    assert!(status.success(), "chown {user} {}", path.display());
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
