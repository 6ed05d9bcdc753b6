//! The fleet's PostgreSQL as the fleet sees it: [`FleetDb`], a handle on
//! the ledger's [`FleetStore`] (where the connection, the version check,
//! `migrations/postgres/` and every statement live) that speaks the
//! fleet's types: issuances with their keys [`Sealed`], account keys by
//! directory.
//!
//! Errors name the server as `host:port` (or the socket path) and never
//! the URL, which may carry the password.

use std::fmt;
use std::time::Duration;

use sqlx::PgPool;

use super::lease::{FencedTx, LeaseError, LeaseName};
use super::seal::{SealContext, Sealed};
pub use crate::ledger::fleet::{
    CHALLENGE_CHANNEL, ChallengeAnswer, ChallengeKind, DbError, DbOptions, ISSUED_CHANNEL,
    InstallLag, InstallRecord, InstallRow, LeaseRow, LiveAnswer, MIN_SERVER_VERSION, Member,
    ServerVersion, Target,
};
use crate::ledger::fleet::{FleetListener, FleetStore, IssuedRow};

/// A connection pool to the fleet's database.
#[derive(Clone)]
pub struct FleetDb {
    store: FleetStore,
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

impl FleetDb {
    /// Connects, refuses a server older than PostgreSQL 15, applies the
    /// migrations, and returns a pool.
    pub async fn open(url: &str, opts: &DbOptions) -> Result<Self, DbError> {
        Ok(Self {
            store: FleetStore::open(url, opts).await?,
        })
    }

    /// The pool, for the PostgreSQL ledger on the same database.
    pub fn pool(&self) -> &PgPool {
        self.store.pool()
    }

    pub fn target(&self) -> &Target {
        self.store.target()
    }

    /// The statements, for the rest of the fleet module.
    pub(super) fn store(&self) -> &FleetStore {
        &self.store
    }

    /// The server's version, asked now.
    pub async fn server_version(&self) -> Result<ServerVersion, DbError> {
        self.store.server_version().await
    }

    /// Whether the database answers a query now.
    pub async fn ping(&self) -> Result<(), DbError> {
        self.store.ping().await
    }

    /// Opens a LISTEN connection on `channel`.
    pub(super) async fn listen(&self, channel: &str) -> Result<FleetListener, DbError> {
        self.store.listen(channel).await
    }

    /// Records that `member` is alive now (by the database's clock).
    pub async fn heartbeat(&self, member: &Member) -> Result<(), DbError> {
        self.store.heartbeat(member).await
    }

    /// The members heard from within `window`, by host id.
    pub async fn live_members(&self, window: Duration) -> Result<Vec<Member>, DbError> {
        self.store.live_members(window).await
    }

    /// The certificate `cert_name` with `serial`, if the fleet issued it.
    pub async fn issued(&self, cert_name: &str, serial: &str) -> Result<Option<Issued>, DbError> {
        Ok(self
            .store
            .issued(cert_name, serial)
            .await?
            .map(Issued::from))
    }

    /// The newest issuance of each of `cert_names` that has one.
    pub async fn newest_issued(&self, cert_names: &[String]) -> Result<Vec<Issued>, DbError> {
        let rows = self.store.newest_issued(cert_names).await?;
        Ok(rows.into_iter().map(Issued::from).collect())
    }

    /// The sealed ACME account key for `directory`, if a host stored one.
    pub async fn account_key(&self, directory: &str) -> Result<Option<Sealed>, DbError> {
        let name = LeaseName::Account(directory.to_owned()).key();
        Ok(self.store.secret(&name).await?.map(Sealed::from_bytes))
    }

    /// The key authorization for an http-01 `token`, if a host stored one
    /// that has not expired.
    pub async fn key_authorization(&self, token: &str) -> Result<Option<String>, DbError> {
        self.store.key_authorization(token).await
    }

    /// The key authorization of the newest unexpired tls-alpn-01 answer
    /// for `identifier`, if a host stored one.
    pub async fn tls_alpn_key_authorization(
        &self,
        identifier: &str,
    ) -> Result<Option<String>, DbError> {
        self.store.tls_alpn_key_authorization(identifier).await
    }

    /// The unexpired http-01 answer for `token`, or with `None` every
    /// unexpired http-01 answer.
    pub async fn live_answers(&self, token: Option<&str>) -> Result<Vec<LiveAnswer>, DbError> {
        self.store.live_answers(token).await
    }

    /// Announces on [`CHALLENGE_CHANNEL`] that `token`'s answer is stored,
    /// so every host's listener loads it into memory. A hint only: a host
    /// that misses it answers from the table.
    pub async fn announce_challenge(&self, token: &str) -> Result<(), DbError> {
        self.store.announce_challenge(token).await
    }

    /// Records what a host did with an issuance; a second attempt at the
    /// same issuance replaces the first's row.
    pub async fn record_install(&self, record: &InstallRecord) -> Result<(), DbError> {
        self.store.record_install(record).await
    }

    /// The `(certificate, serial)` pairs `host_id` has recorded as installed.
    pub async fn installed_by(&self, host_id: &str) -> Result<Vec<(String, String)>, DbError> {
        self.store.installed_by(host_id).await
    }

    /// Every host's record for `cert_name`, by host, then serial.
    pub async fn installs(&self, cert_name: &str) -> Result<Vec<InstallRow>, DbError> {
        self.store.installs(cert_name).await
    }

    /// Each host's latest record (by attempt) for each of `cert_names`, by
    /// certificate, then host.
    pub async fn latest_installs(&self, cert_names: &[String]) -> Result<Vec<InstallRow>, DbError> {
        self.store.latest_installs(cert_names).await
    }

    /// For each of `cert_names` that has an issuance: how long `host_id`
    /// took (or has been taking) to install the newest one, by the
    /// database's clock.
    pub async fn install_lag(
        &self,
        host_id: &str,
        cert_names: &[String],
    ) -> Result<Vec<InstallLag>, DbError> {
        self.store.install_lag(host_id, cert_names).await
    }

    /// Every lease row, by name.
    pub async fn leases(&self) -> Result<Vec<LeaseRow>, DbError> {
        self.store.leases().await
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
        let cert_name = self.cert_name()?.to_owned();
        self.write()
            .insert_issued(&cert_name, serial, fullchain_pem, sealed_key.as_bytes())
            .await?;
        Ok(())
    }

    /// Announces on [`ISSUED_CHANNEL`] that this lease's certificate has a
    /// new issuance. Sent inside the transaction, so PostgreSQL delivers
    /// it only if (and when) the issuance commits.
    pub async fn notify_issued(&mut self) -> Result<(), LeaseError> {
        let cert_name = self.cert_name()?.to_owned();
        self.write().notify_issued(&cert_name).await?;
        Ok(())
    }

    /// Stores (or replaces) a challenge's answer for this lease's
    /// certificate.
    pub async fn put_challenge(&mut self, answer: &ChallengeAnswer) -> Result<(), LeaseError> {
        let cert_name = self.cert_name()?.to_owned();
        self.write().put_challenge(&cert_name, answer).await?;
        Ok(())
    }

    /// Stores the ACME account key for this `account:` lease's directory,
    /// sealed (context [`account_key_context`]). Created once, by the host
    /// holding the lease, so hosts starting together make one account.
    pub async fn put_account_key(&mut self, sealed_key: &Sealed) -> Result<(), LeaseError> {
        // The secret is named after the lease, which must be an account's.
        self.account_directory()?;
        self.write().put_secret(sealed_key.as_bytes()).await?;
        Ok(())
    }
}

impl fmt::Debug for FleetDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The store's Debug shows where it points only, never the password.
        f.debug_struct("FleetDb")
            .field("target", self.target())
            .finish_non_exhaustive()
    }
}

impl From<IssuedRow> for Issued {
    fn from(row: IssuedRow) -> Self {
        Self {
            cert_name: row.cert_name,
            serial: row.serial,
            fullchain_pem: row.fullchain_pem,
            sealed_key: Sealed::from_bytes(row.sealed_key),
            epoch: row.epoch,
        }
    }
}

/// What an account key is sealed for: its directory's lease name, so a key
/// stored for one CA does not open as another's.
pub fn account_key_context(directory: &str) -> SealContext {
    SealContext::Secret {
        name: LeaseName::Account(directory.to_owned()).key(),
    }
}
