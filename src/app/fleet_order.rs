//! Fleet mode's order path, under a certificate's lease: the hooks the
//! order calls to share its challenges' answers and its issuance
//! ([`LeaseHooks`]), and the look at the fleet's state that comes before
//! any order ([`install_current`]).
//!
//! A host's scheduler decides a certificate is due from what it knows:
//! its own disk and its last look. Another host may have renewed it
//! since (this host waited while that one held the lease). So, once the
//! lease is claimed, the fleet's newest issuance of the certificate is
//! checked against the renewal rules: if it is not due, this host
//! installs it from the fleet and orders nothing. That is what makes one
//! `newOrder` per certificate per renewal hold fleet-wide.
//!
//! Hosts whose definitions of a certificate differ (names, key type,
//! profile, challenges, CAs: what is ordered) would order different
//! things under one lease, so only a host whose definition is the
//! fleet's claims it ([`may_claim`]). Each host records its own
//! definition of each certificate at start, after a reload, and before
//! it would claim; the first holder records the fleet's. The rule that keeps a rolling update from
//! wedging: a host whose definition differs claims nonetheless once no
//! live host (heartbeat within `live_window`) other than itself still
//! defines it the fleet's way (each has restarted with the new
//! configuration, or is gone), and its definition becomes the fleet's.
//! Until then the hosts with the fleet's definition keep renewing it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;

use async_trait::async_trait;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::Services;
use super::backoff::capped_backoff;
use super::fleet_answers::{self, AnswerError, PreflightError};
use super::fleet_hosts::{self, FleetPublishError};
use crate::acme::error_chain;
use crate::clock::UnixTime;
use crate::config::{self, CertificateConfig, Config};
use crate::fleet::{
    ChallengeAnswer, ChallengeKind, FleetHost, Lease, LeaseError, PublishError, Pulled,
};
use crate::install::{self, CertInfo, ReloadOutcome};
use crate::ledger::{CertificateRow, Definition, Hold, Ledger};
use crate::order::{DriveError, FleetHooks, Issued, SharedAnswer, Source};
use crate::solver::SolverError;

/// The fleet's side of an order held under `lease`.
pub(crate) struct LeaseHooks {
    services: Services,
    lease: Lease,
}

impl LeaseHooks {
    pub(crate) fn shared(services: &Services, lease: Lease) -> Arc<dyn FleetHooks> {
        Arc::new(Self {
            services: services.clone(),
            lease,
        })
    }
}

#[async_trait]
impl FleetHooks for LeaseHooks {
    async fn commit_answer(&self, answer: &SharedAnswer) -> Result<(), DriveError> {
        let Some(answer) = fleet_answer(answer) else {
            return Ok(());
        };
        fleet_answers::commit_answer(&self.services, &self.lease, &answer)
            .await
            .map_err(|e| match e {
                AnswerError::Lease(e) => lease_error(e),
                other @ AnswerError::NotFleet => DriveError::Fleet(other.to_string()),
            })
    }

    async fn preflight(&self, answer: &SharedAnswer) -> Result<(), DriveError> {
        let Some(answer) = fleet_answer(answer) else {
            return Ok(());
        };
        fleet_answers::preflight_members(&self.services, &answer)
            .await
            .map_err(|e| {
                // Like the local pre-flight's failure: nothing was asked of
                // the CA, and the authorization stays for the next attempt.
                let detail = match &e {
                    PreflightError::Unserved { failed, .. } => failed
                        .iter()
                        .map(|(host, why)| format!("host {host}: {why}"))
                        .collect::<Vec<_>>()
                        .join("; "),
                    other => other.to_string(),
                };
                DriveError::Preflight(SolverError::Preflight {
                    identifier: answer.identifier.clone(),
                    target: "the fleet's hosts".into(),
                    detail,
                })
            })
    }

    async fn publish(
        &self,
        _cert: &str,
        fullchain_pem: &str,
        key_pem: &str,
    ) -> Result<String, DriveError> {
        // The certificate is the lease's; `publish_pem` writes under it.
        fleet_hosts::publish_pem(&self.services, &self.lease, fullchain_pem, key_pem)
            .await
            .map_err(|e| match e {
                FleetPublishError::Publish(PublishError::Lease(e)) => lease_error(e),
                other => DriveError::Fleet(other.to_string()),
            })
    }

    async fn installed(
        &self,
        cert: &str,
        serial: &str,
        reloads: &[ReloadOutcome],
    ) -> Result<(), DriveError> {
        // The certificate is installed and published; a record that does
        // not reach the database is written by this host's distribution
        // at its next reconcile ("installed earlier").
        if let Err(e) = fleet_hosts::record_own_install(&self.services, cert, serial, reloads).await
        {
            tracing::warn!(cert, serial, error = %e, "fleet: cannot record this host's install");
        }
        Ok(())
    }
}

/// Under the lease of `cert`: if the fleet's newest issuance of it is not
/// due under the renewal rules, installs it here (unless it is already)
/// and returns it; `None` when this host is to order. A `forced` renewal
/// always orders.
pub(crate) async fn install_current(
    services: &Services,
    host: &FleetHost,
    cert: &CertificateConfig,
    store: &Ledger,
    forced: bool,
) -> Result<Option<Issued>, DriveError> {
    let Some(fleet) = &services.fleet else {
        return Ok(None);
    };
    if forced {
        return Ok(None);
    }
    let name = cert.name.as_str();
    let newest = fleet
        .db
        .newest_issued(&[name.to_owned()])
        .await
        .map_err(|e| DriveError::Fleet(e.to_string()))?
        .pop();
    let Some(newest) = newest else {
        return Ok(None);
    };
    let info = match leaf_info(&newest.fullchain_pem) {
        Some(info) if names_of(&info) == sorted(cert.domain_strings()) => info,
        // For other names than the certificate's now: a new order.
        _ => return Ok(None),
    };
    let row = store.certificate(name).await?;
    let due_at = due_at(row.as_ref(), &info, services.cfg.daemon.renew_remaining);
    let now = services.clock.now();
    if due_at <= now {
        return Ok(None);
    }
    let reloads = match host.pull(&fleet.db, name).await {
        Ok(Pulled::Installed { reloads, .. }) => reloads,
        Ok(Pulled::UpToDate { .. }) => Vec::new(),
        Ok(Pulled::NothingPublished) => return Ok(None),
        Err(e) => return Err(DriveError::Fleet(e.to_string())),
    };
    tracing::info!(cert = name, serial = %info.serial, renew_at = %due_at.rfc3339(), "installed from the fleet: another host renewed it; not ordering");
    Ok(Some(Issued {
        info,
        reloads,
        source: Source::Fleet,
    }))
}

/// The fleet's failure backoff, before a daemon orders `cert` under its
/// lease: while the hold the fleet's last failed attempt at it recorded
/// (on any host) runs, no host orders it. A host's own backoff alone
/// would let a peer claim the lease and try again the moment the failing
/// host released it: with three hosts, three times the failed
/// validations the CA counts against the names. A certificate that names
/// other domains since is not held back.
pub(crate) async fn check_held_back(
    services: &Services,
    store: &Ledger,
    cert: &CertificateConfig,
) -> Result<(), DriveError> {
    let hold = store.renewal_hold(cert.name.as_str()).await?;
    match hold.filter(|h| holds(h, cert, services.clock.now())) {
        Some(h) => Err(DriveError::HeldBack {
            until: UnixTime::from_secs(h.until),
            host: h.host_id,
            error: h.error,
        }),
        None => Ok(()),
    }
}

/// Whether `hold` holds `cert` back at `now`.
fn holds(hold: &Hold, cert: &CertificateConfig, now: UnixTime) -> bool {
    hold.until > now.secs() && sorted(hold.domains.clone()) == sorted(cert.domain_strings())
}

/// After an attempt at `cert` failed with `e`, still under its lease:
/// records in the shared ledger when the fleet may try again (the
/// daemon's backoff for the fleet's failures in a row, this one
/// included), before the lease is released and a peer can claim it. A
/// write that fails is logged: peers then only lack the hold.
pub(crate) async fn hold_after_failure(
    services: &Services,
    fenced: &Ledger,
    cert: &CertificateConfig,
    e: &DriveError,
) {
    let Some(fleet) = &services.fleet else {
        return;
    };
    let name = cert.name.as_str();
    let d = &services.cfg.daemon;
    // The failures in a row so far, by every host (each records its own
    // in the shared row once it has decided its backoff).
    let before = fenced
        .certificate(name)
        .await
        .ok()
        .flatten()
        .map_or(0, |r| r.consecutive_failures);
    let failures = u32::try_from(before.saturating_add(1)).unwrap_or(u32::MAX);
    let now = services.clock.now();
    let info = install::installed(&services.cfg.storage.cert_dir, name);
    let until = now.plus(capped_backoff(
        failures,
        d.backoff_min,
        d.backoff_max,
        info.as_ref(),
        now,
    ));
    let hold = Hold {
        domains: cert.domain_strings(),
        until: until.secs(),
        error: error_chain(e),
        host_id: fleet.holder.as_str().to_owned(),
    };
    match fenced.hold_renewal(name, &hold).await {
        Ok(()) => {
            tracing::info!(cert = name, until = %until.rfc3339(), failures, "fleet: held back after a failure; no host orders it before then");
        }
        Err(w) => {
            tracing::warn!(cert = name, error = %w, "fleet: cannot record the failure backoff for the fleet");
        }
    }
}

/// What `cert` is, as hosts compare it: a hash per field of what is
/// ordered, and of the whole. Not the reload commands (each host's own).
pub(crate) fn definition(cert: &CertificateConfig) -> Definition {
    // Debug renders each typed value completely and the same way on
    // every host of one version.
    let fields: BTreeMap<String, String> = [
        ("domains", format!("{:?}", sorted(cert.domain_strings()))),
        ("key_type", format!("{:?}", cert.key_type)),
        ("profile", format!("{:?}", cert.profile)),
        ("challenges", format!("{:?}", cert.challenges)),
        ("ca", format!("{:?}", cert.ca)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), sha256_hex(v.as_bytes())))
    .collect();
    let whole: String = fields.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    Definition {
        hash: sha256_hex(whole.as_bytes()),
        fields,
    }
}

/// Records this host's definition of every certificate of `cfg` (at
/// start and after a reload): a host that restarted with a new
/// definition stops counting as holding the old one at once, not only
/// when it next renews. A failure is logged; the next claim records it.
pub(crate) async fn declare_definitions(services: &Services, cfg: &Config) {
    let Some(fleet) = &services.fleet else {
        return;
    };
    for cert in &cfg.certificates {
        let declared = services
            .store
            .declare_definition(cert.name.as_str(), fleet.holder.as_str(), &definition(cert))
            .await;
        if let Err(e) = declared {
            tracing::warn!(cert = %cert.name, error = %e, "fleet: cannot record this host's definition of the certificate");
        }
    }
}

/// Whether this host may claim `cert`'s lease, its definition being
/// `ours` (see the module's doc): records it as this host's, then
/// compares it with the fleet's. Refused: a warning naming the
/// certificate and the fields that differ, and
/// [`DriveError::DefinitionDiffers`].
pub(crate) async fn may_claim(
    services: &Services,
    cert: &str,
    ours: &Definition,
) -> Result<(), DriveError> {
    let Some(fleet) = &services.fleet else {
        return Ok(());
    };
    let me = fleet.holder.as_str();
    let store = &services.store;
    store.declare_definition(cert, me, ours).await?;
    let Some(current) = store.fleet_definition(cert).await? else {
        return Ok(());
    };
    if current.definition.hash == ours.hash {
        return Ok(());
    }
    let live: BTreeSet<String> = fleet
        .db
        .live_members(fleet_answers::live_window(fleet.timing.ttl()))
        .await
        .map_err(|e| DriveError::Fleet(e.to_string()))?
        .into_iter()
        .map(|m| m.host_id)
        .collect();
    let holders: Vec<String> = store
        .host_definitions(cert)
        .await?
        .into_iter()
        .filter(|h| h.host_id != me && h.definition.hash == current.definition.hash)
        .filter(|h| live.contains(&h.host_id))
        .map(|h| h.host_id)
        .collect();
    let fields = ours.differing(&current.definition).join(", ");
    if holders.is_empty() {
        tracing::info!(cert, fields = %fields, "fleet: no live host defines this certificate the fleet's way any more; this host's definition replaces it");
        return Ok(());
    }
    let hosts = holders.join(", ");
    tracing::warn!(cert, fields = %fields, hosts = %hosts, "fleet: this host defines the certificate differently from the fleet; not taking its lease");
    Err(DriveError::DefinitionDiffers {
        cert: cert.to_owned(),
        fields,
        hosts,
    })
}

/// Under `cert`'s lease: makes `ours` the fleet's definition unless it
/// is already (the first holder records it; a holder admitted by the
/// rolling-update rule replaces it).
pub(crate) async fn hold_definition(
    services: &Services,
    fenced: &Ledger,
    cert: &str,
    ours: &Definition,
) -> Result<(), DriveError> {
    let Some(fleet) = &services.fleet else {
        return Ok(());
    };
    let current = fenced.fleet_definition(cert).await?;
    if current.is_none_or(|c| c.definition.hash != ours.hash) {
        fenced
            .set_fleet_definition(cert, fleet.holder.as_str(), ours)
            .await?;
    }
    Ok(())
}

/// When the fleet's newest issuance `info` is due: at once if it was
/// revoked; else at the start of the CA's ARI window for it, when the
/// shared ledger holds one for that serial; else the configured fraction
/// of its lifetime before it ends. Only what holds for every host counts:
/// the row's `next_renewal_at` is each host's scheduler's own plan (a
/// host that has not installed the certificate plans it for now).
fn due_at(row: Option<&CertificateRow>, info: &CertInfo, remaining: f64) -> UnixTime {
    let by_lifetime = install::renewal_time(info.not_before, info.not_after, remaining);
    let Some(row) = row else {
        return by_lifetime;
    };
    let this = |serial: &Option<String>| serial.as_deref() == Some(info.serial.as_str());
    if this(&row.revoked_serial) {
        return UnixTime::from_secs(0);
    }
    match row.ari_window_start {
        Some(start) if this(&row.ari_serial) => UnixTime::from_secs(start),
        _ => by_lifetime,
    }
}

/// The leaf of a chain, parsed.
fn leaf_info(fullchain_pem: &str) -> Option<CertInfo> {
    let leaf = CertificateDer::pem_slice_iter(fullchain_pem.as_bytes())
        .next()?
        .ok()?;
    CertInfo::parse(&leaf).ok()
}

/// The names a certificate carries, as the configuration spells them.
fn names_of(info: &CertInfo) -> Vec<String> {
    sorted(
        info.dns_names
            .iter()
            .chain(&info.ip_addresses)
            .cloned()
            .collect(),
    )
}

fn sorted(mut names: Vec<String>) -> Vec<String> {
    for n in &mut names {
        n.make_ascii_lowercase();
    }
    names.sort();
    names.dedup();
    names
}

/// The fleet's form of an answer; `None` for a type the fleet does not
/// share (the order shares only those its hosts' responders serve).
fn fleet_answer(answer: &SharedAnswer) -> Option<ChallengeAnswer> {
    let kind = match answer.kind {
        config::ChallengeKind::Http01 => ChallengeKind::Http01,
        config::ChallengeKind::TlsAlpn01 => ChallengeKind::TlsAlpn01,
        config::ChallengeKind::Dns01 | config::ChallengeKind::DnsPersist01 => return None,
    };
    Some(ChallengeAnswer {
        token: answer.token.clone(),
        kind,
        identifier: answer.identifier.clone(),
        key_authorization: answer.key_authorization.clone(),
        authz_url: answer.authz_url.clone(),
        valid_for: answer.valid_for,
    })
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut hex = String::with_capacity(64);
    for b in digest.as_ref() {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

fn lease_error(e: LeaseError) -> DriveError {
    DriveError::Lease(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    fn info(serial: &str) -> CertInfo {
        CertInfo {
            dns_names: vec!["www.example".into()],
            ip_addresses: Vec::new(),
            serial: serial.into(),
            not_before: 0,
            not_after: 90 * DAY,
            spki: Vec::new(),
            ari_id: None,
        }
    }

    /// What every host sees decides: not the row's `next_renewal_at`,
    /// which a host that has not installed the certificate sets to now.
    #[test]
    fn due_at_follows_the_issuance_not_a_hosts_plan() {
        let fresh = info("aa");
        let by_lifetime = UnixTime::from_secs(60 * DAY);
        assert_eq!(due_at(None, &fresh, 1.0 / 3.0), by_lifetime);
        let planned_now = CertificateRow {
            serial: Some("aa".into()),
            next_renewal_at: Some(0),
            ..CertificateRow::default()
        };
        assert_eq!(due_at(Some(&planned_now), &fresh, 1.0 / 3.0), by_lifetime);
        let ari = |serial: &str| CertificateRow {
            ari_serial: Some(serial.into()),
            ari_window_start: Some(50 * DAY),
            ari_window_end: Some(52 * DAY),
            ..CertificateRow::default()
        };
        assert_eq!(
            due_at(Some(&ari("aa")), &fresh, 1.0 / 3.0),
            UnixTime::from_secs(50 * DAY)
        );
        // A window for another serial says nothing of this one.
        assert_eq!(due_at(Some(&ari("bb")), &fresh, 1.0 / 3.0), by_lifetime);
        let revoked = CertificateRow {
            revoked_serial: Some("aa".into()),
            ..CertificateRow::default()
        };
        assert_eq!(
            due_at(Some(&revoked), &fresh, 1.0 / 3.0),
            UnixTime::from_secs(0)
        );
    }

    /// Certificate `a` for `a.example`, with `extra` in its table.
    fn cert_with(extra: &str) -> CertificateConfig {
        let text = format!(
            "[acme]\ndirectory = \"https://ca.example/dir\"\n[storage]\nstate_dir = \"/tmp/s\"\ncert_dir = \"/tmp/c\"\n[http01]\nlisten = \"127.0.0.1:5002\"\n[[certificate]]\nname = \"a\"\ndomains = [\"a.example\"]\n{extra}"
        );
        let mut cfg =
            Config::parse(std::path::Path::new("/etc/certd/certd.toml"), &text).expect("config");
        cfg.certificates.swap_remove(0)
    }

    /// The fleet's last failure holds a certificate back until the time
    /// it recorded; not once that has passed, and not once the
    /// certificate names other domains.
    #[test]
    fn a_failure_holds_the_certificate_back_until_its_time() {
        let cert = cert_with("");
        let hold = Hold {
            domains: vec!["a.example".into()],
            until: 500,
            error: "boom".into(),
            host_id: "host-a".into(),
        };
        let at = UnixTime::from_secs;
        assert!(holds(&hold, &cert, at(400)));
        assert!(!holds(&hold, &cert, at(500)));
        let other_names = Hold {
            domains: vec!["b.example".into()],
            ..hold.clone()
        };
        assert!(!holds(&other_names, &cert, at(400)));
    }

    /// The definition follows what is ordered, not the reload commands.
    #[test]
    fn definitions_differ_in_the_ordered_fields_only() {
        let parse = |extra: &str| definition(&cert_with(extra));
        let base = parse("");
        assert_eq!(base, parse("reload = [\"systemctl reload nginx\"]\n"));
        let p384 = parse("key_type = \"ecdsa-p384\"\n");
        assert_eq!(p384.differing(&base), ["key_type"]);
        assert_ne!(p384.hash, base.hash);
    }
}
