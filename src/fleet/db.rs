//! The fleet's PostgreSQL: connecting, refusing servers older than 15,
//! applying `migrations/postgres/`, and the reads and fenced writes of the
//! shared tables (issued certificates, account keys, challenge answers,
//! members).
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
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};

use super::lease::{FencedTx, LeaseError, LeaseName};
use super::seal::{SealContext, Sealed};

/// `migrations/postgres/`, built into the binary.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// The oldest PostgreSQL fleet mode runs on: 15, the release the lease
/// protocol was checked against (and the one Debian bookworm ships).
pub const MIN_SERVER_VERSION: ServerVersion = ServerVersion(150_000);

/// A connection pool to the fleet's database.
#[derive(Clone)]
pub struct FleetDb {
    pool: PgPool,
    target: Target,
}

/// How to reach the database beyond its URL.
#[derive(Debug, Clone)]
pub struct DbOptions {
    /// How long one connection attempt (and one wait for a pooled
    /// connection) may take.
    pub connect_timeout: Duration,
    /// Connections this host keeps at most.
    pub max_connections: u32,
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

/// One host's entry in `fleet_members`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub host_id: String,
    pub version: String,
    pub http01_addr: Option<String>,
    pub config_hash: String,
}

/// A certificate as issued through the fleet, its key sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub cert_name: String,
    pub serial: String,
    pub fullchain_pem: String,
    pub sealed_key: Sealed,
    /// The epoch of the lease it was written under.
    pub epoch: i64,
}

/// A challenge's answer, for whichever host the CA asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChallengeAnswer {
    pub token: String,
    pub kind: ChallengeKind,
    pub identifier: String,
    pub key_authorization: String,
    pub authz_url: String,
    /// How long the answer is kept (the authorization's own expiry).
    pub valid_for: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    Http01,
    TlsAlpn01,
}

impl FleetDb {
    /// Connects, refuses a server older than PostgreSQL 15, applies the
    /// migrations, and returns a pool.
    pub async fn open(url: &str, opts: &DbOptions) -> Result<Self, DbError> {
        let connect = PgConnectOptions::from_str(url).map_err(|e| DbError::Url {
            cause: url_cause(e),
        })?;
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

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The server's version, asked now.
    pub async fn server_version(&self) -> Result<ServerVersion, DbError> {
        let mut conn = self.pool.acquire().await.map_err(|e| self.error(e))?;
        server_version(&mut conn).await.map_err(|e| self.error(e))
    }

    /// Wraps a query's error with where the database is.
    pub(super) fn error(&self, source: sqlx::Error) -> DbError {
        DbError::Query {
            target: self.target.clone(),
            source,
        }
    }

    /// Records that `member` is alive now (by the database's clock).
    pub async fn heartbeat(&self, member: &Member) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO fleet_members (host_id, version, http01_addr, config_hash)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (host_id) DO UPDATE
                SET version = excluded.version, http01_addr = excluded.http01_addr,
                    config_hash = excluded.config_hash, last_seen = now()",
        )
        .bind(&member.host_id)
        .bind(&member.version)
        .bind(&member.http01_addr)
        .bind(&member.config_hash)
        .execute(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// The members heard from within `window`, by host id.
    pub async fn live_members(&self, window: Duration) -> Result<Vec<Member>, DbError> {
        let rows: Vec<(String, String, Option<String>, String)> = sqlx::query_as(
            "SELECT host_id, version, http01_addr, config_hash FROM fleet_members
              WHERE last_seen > now() - $1 * interval '1 microsecond'
              ORDER BY host_id",
        )
        .bind(micros(window))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(rows
            .into_iter()
            .map(|(host_id, version, http01_addr, config_hash)| Member {
                host_id,
                version,
                http01_addr,
                config_hash,
            })
            .collect())
    }

    /// The certificate `cert_name` with `serial`, if the fleet issued it.
    pub async fn issued(&self, cert_name: &str, serial: &str) -> Result<Option<Issued>, DbError> {
        let row: Option<(String, Vec<u8>, i64)> = sqlx::query_as(
            "SELECT fullchain_pem, sealed_key, epoch FROM issued
              WHERE cert_name = $1 AND serial = $2",
        )
        .bind(cert_name)
        .bind(serial)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(row.map(|(fullchain_pem, sealed_key, epoch)| Issued {
            cert_name: cert_name.to_owned(),
            serial: serial.to_owned(),
            fullchain_pem,
            sealed_key: Sealed::from_bytes(sealed_key),
            epoch,
        }))
    }

    /// The key authorization for an http-01 `token`, if a host stored one
    /// that has not expired.
    pub async fn key_authorization(&self, token: &str) -> Result<Option<String>, DbError> {
        sqlx::query_scalar(
            "SELECT key_authorization FROM challenge_responses
              WHERE token = $1 AND kind = 'http-01' AND expires_at > now()",
        )
        .bind(token)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.error(e))
    }
}

impl fmt::Debug for FleetDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The pool's options hold the password; show where it points only.
        f.debug_struct("FleetDb")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// The fenced writes to the shared tables. Each runs inside a transaction
/// that [`super::Lease::begin_fenced`] opened after checking the lease, so
/// it commits only if the lease was still this holder's.
impl FencedTx {
    /// Stores a certificate issued under this certificate's lease. The
    /// name is the lease's, so a lease cannot write another certificate.
    pub async fn insert_issued(
        &mut self,
        serial: &str,
        fullchain_pem: &str,
        sealed_key: &Sealed,
    ) -> Result<(), LeaseError> {
        let (cert_name, epoch) = (self.cert_name()?.to_owned(), self.epoch().get());
        sqlx::query(
            "INSERT INTO issued (cert_name, serial, fullchain_pem, sealed_key, epoch)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(cert_name)
        .bind(serial)
        .bind(fullchain_pem)
        .bind(sealed_key.as_bytes())
        .bind(epoch)
        .execute(self.conn())
        .await
        .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Stores (or replaces) a challenge's answer for this lease's
    /// certificate.
    pub async fn put_challenge(&mut self, answer: &ChallengeAnswer) -> Result<(), LeaseError> {
        let (cert_name, epoch) = (self.cert_name()?.to_owned(), self.epoch().get());
        sqlx::query(
            "INSERT INTO challenge_responses
                 (token, kind, identifier, key_authorization, cert_name, authz_url, epoch, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, now() + $8 * interval '1 microsecond')
             ON CONFLICT (token) DO UPDATE
                SET kind = excluded.kind, identifier = excluded.identifier,
                    key_authorization = excluded.key_authorization,
                    cert_name = excluded.cert_name, authz_url = excluded.authz_url,
                    epoch = excluded.epoch, expires_at = excluded.expires_at",
        )
        .bind(&answer.token)
        .bind(answer.kind.as_str())
        .bind(&answer.identifier)
        .bind(&answer.key_authorization)
        .bind(cert_name)
        .bind(&answer.authz_url)
        .bind(epoch)
        .bind(micros(answer.valid_for))
        .execute(self.conn())
        .await
        .map_err(|e| self.error(e))?;
        Ok(())
    }
}

impl FencedTx {
    /// Stores the ACME account key for this `account:` lease's directory,
    /// sealed (context [`account_key_context`]). Created once, by the host
    /// holding the lease, so hosts starting together make one account.
    pub async fn put_account_key(&mut self, sealed_key: &Sealed) -> Result<(), LeaseError> {
        let name = self.lease().name().key();
        self.account_directory()?;
        let epoch = self.epoch().get();
        sqlx::query(
            "INSERT INTO fleet_secrets (name, sealed, epoch) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE
                SET sealed = excluded.sealed, epoch = excluded.epoch, updated_at = now()",
        )
        .bind(name)
        .bind(sealed_key.as_bytes())
        .bind(epoch)
        .execute(self.conn())
        .await
        .map_err(|e| self.error(e))?;
        Ok(())
    }
}

impl FleetDb {
    /// The sealed ACME account key for `directory`, if a host stored one.
    pub async fn account_key(&self, directory: &str) -> Result<Option<Sealed>, DbError> {
        let name = LeaseName::Account(directory.to_owned()).key();
        let sealed: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT sealed FROM fleet_secrets WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| self.error(e))?;
        Ok(sealed.map(Sealed::from_bytes))
    }
}

/// What an account key is sealed for: its directory's lease name, so a key
/// stored for one CA does not open as another's.
pub fn account_key_context(directory: &str) -> SealContext {
    SealContext::Secret {
        name: LeaseName::Account(directory.to_owned()).key(),
    }
}

/// The channel a new issuance is announced on; the payload is the
/// certificate's name.
pub const ISSUED_CHANNEL: &str = "certd_issued";
/// The channel a new challenge answer is announced on; the payload is the
/// token.
pub const CHALLENGE_CHANNEL: &str = "certd_challenge";

/// What one host did with one issuance, for the `installs` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallRecord {
    pub host_id: String,
    pub cert_name: String,
    pub serial: String,
    /// `Ok(reload commands' outcomes)` when installed, `Err(why not)`.
    pub result: Result<String, String>,
}

/// A row of `installs` as read back (status, tests).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct InstallRow {
    pub host_id: String,
    pub cert_name: String,
    pub serial: String,
    pub installed: bool,
    pub reload_result: Option<String>,
    pub error: Option<String>,
}

/// An unexpired http-01 answer, with how long it stays valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveAnswer {
    pub token: String,
    pub key_authorization: String,
    pub valid_for: Duration,
}

impl FencedTx {
    /// Announces on [`ISSUED_CHANNEL`] that this lease's certificate has a
    /// new issuance. Sent inside the transaction, so PostgreSQL delivers
    /// it only if (and when) the issuance commits.
    pub async fn notify_issued(&mut self) -> Result<(), LeaseError> {
        let cert_name = self.cert_name()?.to_owned();
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(ISSUED_CHANNEL)
            .bind(cert_name)
            .execute(self.conn())
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }
}

impl FleetDb {
    /// The newest issuance of each of `cert_names` that has one.
    pub async fn newest_issued(&self, cert_names: &[String]) -> Result<Vec<Issued>, DbError> {
        let rows: Vec<(String, String, String, Vec<u8>, i64)> = sqlx::query_as(
            "SELECT DISTINCT ON (cert_name) cert_name, serial, fullchain_pem, sealed_key, epoch
               FROM issued WHERE cert_name = ANY($1)
              ORDER BY cert_name, id DESC",
        )
        .bind(cert_names)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(rows
            .into_iter()
            .map(
                |(cert_name, serial, fullchain_pem, sealed_key, epoch)| Issued {
                    cert_name,
                    serial,
                    fullchain_pem,
                    sealed_key: Sealed::from_bytes(sealed_key),
                    epoch,
                },
            )
            .collect())
    }

    /// Records what a host did with an issuance; a second attempt at the
    /// same issuance replaces the first's row.
    pub async fn record_install(&self, record: &InstallRecord) -> Result<(), DbError> {
        let (reload_result, error) = match &record.result {
            Ok(reloads) => (Some(reloads.as_str()), None),
            Err(why) => (None, Some(why.as_str())),
        };
        sqlx::query(
            "INSERT INTO installs (host_id, cert_name, serial, installed_at, reload_result, error)
             VALUES ($1, $2, $3, CASE WHEN $5::text IS NULL THEN now() END, $4, $5)
             ON CONFLICT (host_id, cert_name, serial) DO UPDATE
                SET installed_at = excluded.installed_at,
                    reload_result = excluded.reload_result, error = excluded.error,
                    attempted_at = now()",
        )
        .bind(&record.host_id)
        .bind(&record.cert_name)
        .bind(&record.serial)
        .bind(reload_result)
        .bind(error)
        .execute(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// The `(certificate, serial)` pairs `host_id` has recorded as installed.
    pub async fn installed_by(&self, host_id: &str) -> Result<Vec<(String, String)>, DbError> {
        sqlx::query_as(
            "SELECT cert_name, serial FROM installs
              WHERE host_id = $1 AND installed_at IS NOT NULL",
        )
        .bind(host_id)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))
    }

    /// Every host's record for `cert_name`, by host, then serial.
    pub async fn installs(&self, cert_name: &str) -> Result<Vec<InstallRow>, DbError> {
        sqlx::query_as(
            "SELECT host_id, cert_name, serial, installed_at IS NOT NULL AS installed,
                    reload_result, error
               FROM installs WHERE cert_name = $1 ORDER BY host_id, serial",
        )
        .bind(cert_name)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))
    }

    /// Announces on [`CHALLENGE_CHANNEL`] that `token`'s answer is stored,
    /// so every host's listener loads it into memory. A hint only: a host
    /// that misses it answers from the table.
    pub async fn announce_challenge(&self, token: &str) -> Result<(), DbError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHALLENGE_CHANNEL)
            .bind(token)
            .execute(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// The unexpired http-01 answer for `token`, or with `None` every
    /// unexpired http-01 answer.
    pub async fn live_answers(&self, token: Option<&str>) -> Result<Vec<LiveAnswer>, DbError> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT token, key_authorization,
                    (extract(epoch FROM expires_at - now()) * 1000000)::bigint
               FROM challenge_responses
              WHERE kind = 'http-01' AND expires_at > now()
                AND ($1::text IS NULL OR token = $1)",
        )
        .bind(token)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(rows
            .into_iter()
            .map(|(token, key_authorization, micros)| LiveAnswer {
                token,
                key_authorization,
                // Unexpired by the query, so positive.
                valid_for: Duration::from_micros(u64::try_from(micros).unwrap_or(0)),
            })
            .collect())
    }
}

/// A lease as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    /// The row's name: `cert:www`.
    pub name: String,
    /// `None` once released (or never claimed).
    pub holder: Option<String>,
    pub epoch: i64,
    /// Unexpired by the database's clock.
    pub live: bool,
}

/// How far one host is behind the newest issuance of a certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct InstallLag {
    pub cert_name: String,
    pub serial: String,
    /// Seconds from publication to this host's install; while it has not
    /// installed it, from publication to now (growing).
    pub seconds: f64,
    pub installed: bool,
}

impl FleetDb {
    /// Every lease row, by name.
    pub async fn leases(&self) -> Result<Vec<LeaseRow>, DbError> {
        let rows: Vec<(String, Option<String>, i64, bool)> = sqlx::query_as(
            "SELECT name, holder, epoch, expires_at > now() FROM leases ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(rows
            .into_iter()
            .map(|(name, holder, epoch, live)| LeaseRow {
                name,
                holder,
                epoch,
                live,
            })
            .collect())
    }

    /// Each host's latest record (by attempt) for each of `cert_names`, by
    /// certificate, then host.
    pub async fn latest_installs(&self, cert_names: &[String]) -> Result<Vec<InstallRow>, DbError> {
        sqlx::query_as(
            "SELECT DISTINCT ON (cert_name, host_id)
                    host_id, cert_name, serial, installed_at IS NOT NULL AS installed,
                    reload_result, error
               FROM installs WHERE cert_name = ANY($1)
              ORDER BY cert_name, host_id, attempted_at DESC",
        )
        .bind(cert_names)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))
    }

    /// The key authorization of the newest unexpired tls-alpn-01 answer
    /// for `identifier`, if a host stored one.
    pub async fn tls_alpn_key_authorization(
        &self,
        identifier: &str,
    ) -> Result<Option<String>, DbError> {
        sqlx::query_scalar(
            "SELECT key_authorization FROM challenge_responses
              WHERE kind = 'tls-alpn-01' AND identifier = $1 AND expires_at > now()
              ORDER BY created_at DESC LIMIT 1",
        )
        .bind(identifier)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.error(e))
    }

    /// Whether the database answers a query now.
    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// For each of `cert_names` that has an issuance: how long `host_id`
    /// took (or has been taking) to install the newest one, by the
    /// database's clock.
    pub async fn install_lag(
        &self,
        host_id: &str,
        cert_names: &[String],
    ) -> Result<Vec<InstallLag>, DbError> {
        let rows: Vec<(String, String, f64, bool)> = sqlx::query_as(
            "SELECT n.cert_name, n.serial,
                    extract(epoch FROM coalesce(i.installed_at, now()) - n.created_at)::float8,
                    i.installed_at IS NOT NULL
               FROM (SELECT DISTINCT ON (cert_name) cert_name, serial, created_at
                       FROM issued WHERE cert_name = ANY($2)
                      ORDER BY cert_name, id DESC) n
               LEFT JOIN installs i
                 ON i.host_id = $1 AND i.cert_name = n.cert_name AND i.serial = n.serial
              ORDER BY n.cert_name",
        )
        .bind(host_id)
        .bind(cert_names)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(rows
            .into_iter()
            .map(|(cert_name, serial, seconds, installed)| InstallLag {
                cert_name,
                serial,
                // A clock step on the server cannot make it negative here.
                seconds: seconds.max(0.0),
                installed,
            })
            .collect())
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

impl ChallengeKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Http01 => "http-01",
            Self::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

impl Default for DbOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            max_connections: 4,
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

/// A duration as whole microseconds (PostgreSQL's interval resolution).
pub(super) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
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
