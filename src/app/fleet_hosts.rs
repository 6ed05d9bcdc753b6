//! What every host does in fleet mode, leaseholder or not: it beats its
//! heartbeat into `fleet_members`, keeps the fleet's http-01 answers in
//! memory (its responder answers other hosts' tokens from them), and
//! installs what any host publishes: reconciling at start, on each
//! announcement, after a lost LISTEN connection and every few minutes,
//! through the atomic installer and its own reload commands.
//!
//! The leaseholder's side, called by the order path after issuance:
//!
//! ```text
//! pub(crate) async fn publish(services: &Services, lease: &Lease, issuance: &Issuance)
//!     -> Result<String /* serial */, FleetPublishError>
//! pub async fn record_own_install(services: &Services, cert: &str, serial: &str,
//!     reloads: &[ReloadOutcome]) -> Result<(), FleetPublishError>
//! ```
//!
//! `publish` stores the chain and the key sealed under the fleet key (the
//! certificate's name and serial as associated data) through the lease's
//! fence, and the announcement is delivered when that commits. The
//! certificate is the lease's (`cert:<name>`). `record_own_install` records
//! the publisher's own install and reloads in `installs`, as every other
//! host records its own.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use ring::rand::SystemRandom;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Services;
use super::fleet::Fleet;
use crate::config::Config;
use crate::fleet::{
    AnswerCounts, CertTarget, DistributeOptions, DistributeStatus, FleetAnswers, FleetHost,
    FleetKey, FleetTask, HeartbeatStatus, InstallRecord, Lease, LeaseError, ListenOptions,
    ListenStatus, Member, PublishError, keep_heartbeat,
};
use crate::install::{Issuance, ReloadOutcome};

/// How often a host says it is alive: three times a lease length, as a
/// leaseholder renews (a member silent for three of these is no longer
/// live: `fleet_answers::live_window`).
pub fn heartbeat_every(lease_ttl: Duration) -> Duration {
    lease_ttl / 3
}
/// How often a host compares its installs with the newest issuances,
/// besides at start, on announcements and after a lost LISTEN.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(300);
/// How soon a LISTEN connection or reconcile the database failed is retried.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// How often expired answers leave memory.
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// This host's fleet tasks: heartbeat, the answers' listener, distribution.
/// Each is a child of the token given to [`HostTasks::start`]; stopping
/// (or dropping) this stops them.
#[derive(Debug)]
pub struct HostTasks {
    /// The answers this host's responder falls back to, for their counts.
    fleet_answers: Arc<FleetAnswers>,
    heartbeat: FleetTask<HeartbeatStatus>,
    answers: FleetTask<ListenStatus>,
    distribute: FleetTask<DistributeStatus>,
}

/// Why an issuance could not be handed to the fleet.
#[derive(Debug, thiserror::Error)]
pub enum FleetPublishError {
    #[error("not in fleet mode: the configuration has no [fleet] section")]
    NotFleet,
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Db(#[from] crate::fleet::DbError),
}

impl HostTasks {
    /// Starts this host's fleet tasks for the certificates of `cfg`;
    /// `None` outside fleet mode. Fails only if the fleet key cannot be
    /// read again (distribution holds a copy of its own).
    pub fn start(
        services: &Services,
        cfg: &Config,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Option<Self>> {
        let Some(fleet) = &services.fleet else {
            return Ok(None);
        };
        let key = FleetKey::load(&fleet.cfg.key_file).context("fleet.key_file")?;
        let host = Arc::new(fleet_host(services, fleet, cfg, key));
        let member = member(fleet, cfg);
        if member.http01_addr.is_none() {
            tracing::info!(
                "fleet: this host advertises no http-01 responder (no http01.listen, no fleet.advertise); pre-flights skip it"
            );
        }
        let heartbeat = keep_heartbeat(
            fleet.db.clone(),
            member,
            heartbeat_every(fleet.timing.ttl()),
            cancel,
        );
        let answers = fleet.answers.listen(
            ListenOptions {
                retry_after: RETRY_AFTER,
                purge_every: PURGE_EVERY,
            },
            cancel,
        );
        let distribute = host.distribute(
            fleet.db.clone(),
            DistributeOptions {
                reconcile_every: RECONCILE_EVERY,
                retry_after: RETRY_AFTER,
            },
            cancel,
        );
        Ok(Some(Self {
            fleet_answers: Arc::clone(&fleet.answers),
            heartbeat,
            answers,
            distribute,
        }))
    }

    pub fn heartbeat(&self) -> watch::Receiver<HeartbeatStatus> {
        self.heartbeat.status()
    }

    pub fn answers(&self) -> watch::Receiver<ListenStatus> {
        self.answers.status()
    }

    pub fn distribution(&self) -> watch::Receiver<DistributeStatus> {
        self.distribute.status()
    }

    /// How this host's responder found the answers to other hosts' tokens.
    pub fn answer_counts(&self) -> AnswerCounts {
        self.fleet_answers.counts()
    }

    /// Stops the three tasks and waits for them.
    pub async fn stop(self) {
        let Self {
            heartbeat,
            answers,
            distribute,
            ..
        } = self;
        tokio::join!(heartbeat.stop(), answers.stop(), distribute.stop());
    }
}

/// Publishes `issuance` for every host under `lease` (the certificate's);
/// returns its serial. See the module's doc.
// Called by the order path in fleet mode, which is wired in separately.
#[allow(dead_code)]
pub(crate) async fn publish(
    services: &Services,
    lease: &Lease,
    issuance: &Issuance,
) -> Result<String, FleetPublishError> {
    publish_pem(
        services,
        lease,
        issuance.fullchain_pem(),
        issuance.key_pem(),
    )
    .await
}

/// [`publish`] from the PEM texts: the chain (leaf first) and the key.
pub async fn publish_pem(
    services: &Services,
    lease: &Lease,
    fullchain_pem: &str,
    key_pem: &str,
) -> Result<String, FleetPublishError> {
    let fleet = services.fleet.as_ref().ok_or(FleetPublishError::NotFleet)?;
    let mut tx = lease
        .begin_fenced(&fleet.db)
        .await
        .map_err(PublishError::Lease)?;
    let serial = tx
        .publish_issuance(&fleet.key, &SystemRandom::new(), fullchain_pem, key_pem)
        .await?;
    tx.commit().await.map_err(PublishError::Lease)?;
    tracing::info!(lease = %lease.name(), %serial, "fleet: published the issuance for every host");
    Ok(serial)
}

/// Records that this host (the publisher) installed `serial` of `cert`
/// itself, with its reload commands' outcomes.
pub async fn record_own_install(
    services: &Services,
    cert: &str,
    serial: &str,
    reloads: &[ReloadOutcome],
) -> Result<(), FleetPublishError> {
    let fleet = services.fleet.as_ref().ok_or(FleetPublishError::NotFleet)?;
    fleet
        .db
        .record_install(&InstallRecord {
            host_id: fleet.holder.as_str().to_owned(),
            cert_name: cert.to_owned(),
            serial: serial.to_owned(),
            result: Ok(crate::fleet::distribute::reload_summary(reloads)),
        })
        .await?;
    Ok(())
}

/// This host's heartbeat row: its id, version, where peers reach its
/// http-01 responder, and the hash of its certificate definitions.
pub(crate) fn member(fleet: &Fleet, cfg: &Config) -> Member {
    let http01_addr = fleet
        .cfg
        .advertise
        .or_else(|| cfg.http01.as_ref().and_then(|h| h.listen))
        .map(|addr| addr.to_string());
    Member {
        host_id: fleet.holder.as_str().to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        http01_addr,
        config_hash: config_hash(cfg),
    }
}

/// A hash of what `cfg` asks the CA for, certificate by certificate (by
/// name, so file order does not count): hosts whose hashes differ order
/// different things under the same lease, which `status` names. Reload
/// commands and their timeouts are each host's own and left out.
pub fn config_hash(cfg: &Config) -> String {
    let by_name: BTreeMap<&str, String> = cfg
        .certificates
        .iter()
        .map(|c| {
            // Debug renders each typed value completely and the same way
            // on every host of one version; `member.version` says which.
            let text = format!(
                "{:?}|{:?}|{:?}|{:?}|{:?}|{}|{:?}|{:?}|{}",
                c.name,
                c.domains,
                c.key_type,
                c.challenges,
                c.profile,
                c.reuse_key,
                c.dns_alias,
                c.ca,
                c.sticky
            );
            (c.name.as_str(), text)
        })
        .collect();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for text in by_name.values() {
        ctx.update(text.as_bytes());
        ctx.update(b"\n");
    }
    let mut hex = String::with_capacity(64);
    for b in ctx.finish().as_ref() {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// Distribution's view of this host: every configured certificate with its
/// names and reload commands, into `[storage] cert_dir`.
pub(crate) fn fleet_host(
    services: &Services,
    fleet: &Fleet,
    cfg: &Config,
    key: FleetKey,
) -> FleetHost {
    let mut host = FleetHost::new(fleet.holder.clone(), cfg.storage.cert_dir.clone(), key)
        .with_clock(services.clock.clone());
    // One timeout for all: the longest configured, so none is cut short.
    if let Some(longest) = cfg.certificates.iter().map(|c| c.reload_timeout).max() {
        host = host.with_reload_timeout(longest);
    }
    // Chains are checked against the operator's roots only when one CA is
    // configured: with several, an issuance may come from any of them.
    if let [ca] = cfg.cas.as_slice()
        && let Some(roots) = &ca.acme.trusted_roots
    {
        host = host.with_roots(roots.clone());
    }
    for c in &cfg.certificates {
        host = host.with_cert(
            c.name.as_str(),
            CertTarget {
                domains: c.domain_strings(),
                reload: c.reload.clone(),
            },
        );
    }
    host
}

impl From<LeaseError> for FleetPublishError {
    fn from(e: LeaseError) -> Self {
        Self::Publish(PublishError::Lease(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(certs: &str) -> Config {
        let text = format!(
            "[acme]\ndirectory = \"https://ca.example/dir\"\n[storage]\nstate_dir = \"/tmp/s\"\ncert_dir = \"/tmp/c\"\n[http01]\nlisten = \"127.0.0.1:5002\"\n{certs}"
        );
        Config::parse(std::path::Path::new("/etc/certd/certd.toml"), &text).expect("config")
    }

    /// The hash follows what is ordered, not the file's order nor the
    /// host's own reload commands.
    #[test]
    fn config_hash_follows_what_is_ordered() {
        let a = "[[certificate]]\nname = \"a\"\ndomains = [\"a.example\"]\n";
        let b = "[[certificate]]\nname = \"b\"\ndomains = [\"b.example\"]\n";
        let base = config_hash(&cfg(&format!("{a}{b}")));
        assert_eq!(base.len(), 64);
        assert_eq!(base, config_hash(&cfg(&format!("{b}{a}"))));
        let reload = format!("{a}reload = [\"systemctl reload nginx\"]\n{b}");
        assert_eq!(base, config_hash(&cfg(&reload)));
        let more = "[[certificate]]\nname = \"a\"\ndomains = [\"a.example\", \"www.a.example\"]\n";
        assert_ne!(base, config_hash(&cfg(&format!("{more}{b}"))));
        assert_ne!(base, config_hash(&cfg(a)));
    }
}
