//! Connecting to the fleet's database: the first connection alone, the
//! version check, `migrations/postgres/`, the pool, and LISTEN.
//!
//! The first connection is made alone, not through the pool, so a wrong
//! URL, host or password fails once with the database's own reason (a pool
//! would retry until its timeout and report only that it timed out). The
//! same connection checks the version and runs the migrations: sqlx's
//! migrator takes a session advisory lock for the duration, which is safe
//! on a direct connection that is closed right after (and only there: not
//! behind a transaction-pooling proxy).
//!
//! Errors name the server as `host:port` (or the socket path) and never
//! the URL, which may carry the password.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};

use super::FleetStore;

/// `migrations/postgres/`, built into the binary.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// The oldest PostgreSQL fleet mode runs on: 15, the release the lease
/// protocol was checked against (and the one Debian bookworm ships).
pub const MIN_SERVER_VERSION: ServerVersion = ServerVersion(150_000);

/// How to reach the database beyond its URL.
#[derive(Debug, Clone)]
pub struct DbOptions {
    /// How long one connection attempt (and one wait for a pooled
    /// connection) may take.
    pub connect_timeout: Duration,
    /// Connections this host keeps at most.
    pub max_connections: u32,
    /// How long the server lets one of this host's transactions sit idle
    /// before it ends the session (`idle_in_transaction_session_timeout`).
    /// A host stopped or cut off mid-transaction would otherwise hold its
    /// locks (the lease row it checked `FOR SHARE`, an admission lock) for
    /// as long as its connection lives, and every peer's claim would wait
    /// on them: the fleet would stall behind one stopped process.
    pub idle_in_transaction: Duration,
}

/// Where the database is, as errors name it: `host:port`, or the socket
/// path. Never the URL, which may hold the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target(String);

/// PostgreSQL's `server_version_num`, e.g. 150018 for 15.18.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion(u32);

/// Why the fleet database cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("fleet database_url is not a valid PostgreSQL URL: {cause}")]
    Url { cause: String },
    #[error("cannot connect to the fleet database at {user}@{target}: {source}")]
    Connect {
        /// The role it logs in as: a refused password is that role's.
        user: String,
        target: Target,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot connect to the fleet database at {target}: no answer within {after:?}")]
    ConnectTimeout { target: Target, after: Duration },
    #[error(
        "the fleet database at {target} runs PostgreSQL {version}; fleet mode needs {MIN_SERVER_VERSION} or newer"
    )]
    TooOld {
        target: Target,
        version: ServerVersion,
    },
    #[error("fleet database at {target}: cannot apply migrations/postgres: {source}")]
    Migrate {
        target: Target,
        #[source]
        source: MigrateError,
    },
    #[error("fleet database at {target}: {source}")]
    Query {
        target: Target,
        #[source]
        source: sqlx::Error,
    },
}

/// A LISTEN connection on one channel, apart from the pool.
pub struct FleetListener {
    listener: PgListener,
}

impl FleetStore {
    /// Connects, refuses a server older than PostgreSQL 15, applies the
    /// migrations, and returns a pool.
    pub async fn open(url: &str, opts: &DbOptions) -> Result<Self, DbError> {
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| DbError::Url {
                cause: url_cause(e),
            })?
            .options([(
                "idle_in_transaction_session_timeout",
                format!("{}ms", opts.idle_in_transaction.as_millis().max(1)),
            )]);
        let target = Target::of(&connect);
        let mut conn = tokio::time::timeout(opts.connect_timeout, connect.connect())
            .await
            .map_err(|_| DbError::ConnectTimeout {
                target: target.clone(),
                after: opts.connect_timeout,
            })?
            .map_err(|source| DbError::Connect {
                user: connect.get_username().to_owned(),
                target: target.clone(),
                source,
            })?;
        let version = server_version(&mut conn)
            .await
            .map_err(|source| DbError::Query {
                target: target.clone(),
                source,
            })?;
        version.require_supported(&target)?;
        MIGRATOR
            .run_direct(&mut conn)
            .await
            .map_err(|source| DbError::Migrate {
                target: target.clone(),
                source,
            })?;
        // Closing politely releases the migrator's session lock at once; if
        // it fails, the server drops the session (and the lock) anyway.
        let _ = conn.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(opts.max_connections)
            .acquire_timeout(opts.connect_timeout)
            .connect_lazy_with(connect);
        Ok(Self { pool, target })
    }

    /// The server's version, asked now.
    pub async fn server_version(&self) -> Result<ServerVersion, DbError> {
        let mut conn = self.pool.acquire().await.map_err(|e| self.error(e))?;
        server_version(&mut conn).await.map_err(|e| self.error(e))
    }

    /// Whether the database answers a query now.
    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Opens a LISTEN connection on `channel`, from the pool's options.
    pub async fn listen(&self, channel: &str) -> Result<FleetListener, DbError> {
        let mut listener = PgListener::connect_with(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        // A lost connection must surface at once (`try_recv` gives `None`)
        // so the caller knows notifications were lost and catches up after
        // its own reconnect; reconnecting inside `try_recv` would hide the
        // loss and hold the caller for a whole connect timeout.
        listener.eager_reconnect(false);
        listener.listen(channel).await.map_err(|e| self.error(e))?;
        Ok(FleetListener { listener })
    }
}

impl fmt::Debug for FleetStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The pool's options hold the password; show where it points only.
        f.debug_struct("FleetStore")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl FleetListener {
    /// The next notification's payload; `None` once the connection is
    /// lost (whatever was sent meanwhile is lost with it). Cancel-safe:
    /// a notification not yet returned stays queued.
    pub async fn next(&mut self) -> Option<String> {
        match self.listener.try_recv().await {
            Ok(Some(n)) => Some(n.payload().to_owned()),
            Ok(None) | Err(_) => None,
        }
    }
}

impl fmt::Debug for FleetListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetListener").finish_non_exhaustive()
    }
}

impl Target {
    fn of(opts: &PgConnectOptions) -> Self {
        match opts.get_socket() {
            // sqlx connects to <dir>/.s.PGSQL.<port> for a socket directory.
            Some(dir) => Self(format!("{}:{}", dir.display(), opts.get_port())),
            None => Self(format!("{}:{}", opts.get_host(), opts.get_port())),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl ServerVersion {
    pub fn from_num(num: u32) -> Self {
        Self(num)
    }

    pub fn num(self) -> u32 {
        self.0
    }

    /// Fails for servers older than [`MIN_SERVER_VERSION`].
    pub fn require_supported(self, target: &Target) -> Result<(), DbError> {
        if self < MIN_SERVER_VERSION {
            return Err(DbError::TooOld {
                target: target.clone(),
                version: self,
            });
        }
        Ok(())
    }
}

impl fmt::Display for ServerVersion {
    /// `15.18` (major.minor since PostgreSQL 10; `9.6.24` before).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n >= 100_000 {
            write!(f, "{}.{}", n / 10_000, n % 10_000)
        } else {
            write!(f, "{}.{}.{}", n / 10_000, n / 100 % 100, n % 100)
        }
    }
}

impl Default for DbOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            max_connections: 4,
            idle_in_transaction: Duration::from_secs(10),
        }
    }
}

async fn server_version(conn: &mut PgConnection) -> Result<ServerVersion, sqlx::Error> {
    let num: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
        .fetch_one(conn)
        .await?;
    // A negative version cannot come from a server; read it as the oldest.
    Ok(ServerVersion(u32::try_from(num).unwrap_or(0)))
}

/// Why a URL did not parse, without the URL (it may hold the password).
fn url_cause(e: sqlx::Error) -> String {
    match e {
        // url's parse errors and sqlx's option errors name the problem
        // ("invalid port number", "unknown query parameter `x`"), not the
        // text around it.
        sqlx::Error::Configuration(cause) => cause.to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_before_15_are_refused() {
        let target = Target("db.example:5432".into());
        for (num, shown) in [(140_012, "14.12"), (90_624, "9.6.24"), (149_999, "14.9999")] {
            let err = ServerVersion(num).require_supported(&target).unwrap_err();
            assert!(matches!(err, DbError::TooOld { .. }));
            let msg = err.to_string();
            assert!(
                msg.contains("db.example:5432") && msg.contains(shown) && msg.contains("15.0"),
                "{msg}"
            );
        }
        for num in [150_000, 150_018, 170_002] {
            ServerVersion(num).require_supported(&target).unwrap();
        }
    }

    #[test]
    fn url_errors_do_not_show_the_password() {
        for url in [
            "postgres://certd:hunter2secret@db.example:notaport/fleet",
            "postgres://certd:hunter2secret@db.example/fleet?sslmode=sometimes",
            "postgres://certd:hunter2secret@db.example:70000/fleet",
        ] {
            let err = PgConnectOptions::from_str(url).unwrap_err();
            let msg = DbError::Url {
                cause: url_cause(err),
            }
            .to_string();
            assert!(!msg.contains("hunter2"), "{msg}");
            assert!(
                msg.starts_with("fleet database_url is not a valid"),
                "{msg}"
            );
        }
    }

    #[test]
    fn target_is_host_and_port_only() {
        let opts =
            PgConnectOptions::from_str("postgres://certd:hunter2secret@db.example:6543/fleet")
                .unwrap();
        assert_eq!(Target::of(&opts).to_string(), "db.example:6543");
        let opts =
            PgConnectOptions::from_str("postgres://certd@%2Frun%2Fpostgresql/fleet").unwrap();
        assert_eq!(Target::of(&opts).to_string(), "/run/postgresql:5432");
    }
}
