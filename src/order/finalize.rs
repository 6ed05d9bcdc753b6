//! Finalization and what follows: the key and CSR, `finalize`, the
//! download, the issued chain recorded on disk, the install and reloads.

use std::path::{Path, PathBuf};
use std::time::Duration;

use instant_acme::{Order, OrderStatus};
use rcgen::{KeyPair, PublicKeyData};
use tokio_util::sync::CancellationToken;

use crate::acme::{AcmeError, NONCE_ATTEMPTS, is_bad_nonce};
use crate::config::{CertificateConfig, KeyType};
use crate::hygiene::Policy;
use crate::install::{self, Issuance, ReloadOutcome};
use crate::ledger::{self, Actor, EventKind, Identifiers, Ledger, LedgerError, OrderStep};

use super::keys::{
    forget_order_key, order_key_dir, order_key_path, remove_order_key, store_order_key,
};
use super::{
    Context, DriveError, Issued, Poll, RunMode, Source, acme_error, order_status, sleep_or_cancel,
};

/// How long certd waits for a `processing` order to become `valid`.
pub(super) const ISSUANCE_TIMEOUT: Duration = Duration::from_secs(180);

/// The first wait before a failed reload command runs again; it doubles
/// up to `RELOAD_RETRY_CAP`.
pub(super) const RELOAD_RETRY_FIRST: Duration = Duration::from_secs(2);

pub(super) const RELOAD_RETRY_CAP: Duration = Duration::from_secs(300);

/// A finalized order: download, install, reload; then the stored key goes.
#[allow(clippy::too_many_arguments)]
pub(super) async fn complete(
    ctx: &Context,
    cert: &CertificateConfig,
    order: &mut Order,
    domains: &Identifiers,
    key: &KeyPair,
    key_pem: String,
    key_dir: &Path,
    cancel: &CancellationToken,
) -> Result<Issued, DriveError> {
    let name = cert.name.as_str();
    let order_url = order.url().to_owned();
    let chain = download(ctx, order, cancel).await?;

    let issuance = Issuance::new(
        &chain,
        key_pem,
        &key.subject_public_key_info(),
        domains,
        ctx.trusted_roots.as_ref(),
        ctx.store.clock(),
    )?;
    if ctx.mode == RunMode::DryRun {
        // Issued and checked like any other; then thrown away.
        ctx.store
            .set_order_state(
                &order_url,
                ledger::OrderStatus::Valid,
                OrderStep::Done,
                None,
            )
            .await?;
        forget_order_key(&ctx.store, key_dir, &order_url).await;
        let info = issuance.info;
        ctx.store
            .event(
                EventKind::DryRun,
                Some(name),
                Some(&order_url),
                None,
                Some(&format!(
                    "serial {} issued and discarded: nothing installed, nothing reloaded",
                    info.serial
                )),
            )
            .await?;
        tracing::info!(cert = name, order = %order_url, serial = %info.serial, "dry run: certificate issued and discarded");
        return Ok(Issued {
            info,
            reloads: Vec::new(),
            source: Source::Ordered,
        });
    }
    // Durable before the install: should the install fail, the next
    // attempt installs this record instead of ordering again.
    let issued_dir = issued_dir(&ctx.store).await?;
    remove_order_key(&issued_dir, &order_url).await;
    store_order_key(&issued_dir, &order_url, &issuance.record()).await?;
    ctx.store
        .record_issued(
            &order_url,
            name,
            domains,
            &issuance.info.serial,
            issuance.info.not_after,
        )
        .await?;
    ctx.store
        .set_order_state(
            &order_url,
            ledger::OrderStatus::Valid,
            OrderStep::Issued,
            None,
        )
        .await?;
    // The record holds the key now.
    remove_order_key(key_dir, &order_url).await;
    let profile = order.state().profile.clone();
    finish(ctx, cert, &order_url, domains, issuance, profile, cancel).await
}

/// An issuance recorded on disk but not installed (the install failed):
/// installed now, without asking the CA for anything. A record that is
/// for other names than the certificate's now, or that no longer verifies,
/// is dropped and `None` returned, so a new order follows.
pub(super) async fn install_from_disk(
    ctx: &Context,
    cert: &CertificateConfig,
    sorted: &Identifiers,
    cancel: &CancellationToken,
) -> Result<Option<Issued>, DriveError> {
    let name = cert.name.as_str();
    let Some(row) = ctx.store.waiting_issued(name).await? else {
        return Ok(None);
    };
    let dir = issued_dir(&ctx.store).await?;
    let path = order_key_path(&dir, &row.order_url);
    let read = tokio::fs::read_to_string(&path)
        .await
        .map_err(|e| format!("cannot read {}: {e}", path.display()));
    let issuance = read.and_then(|text| {
        if row.identifiers != *sorted {
            return Err(format!(
                "it is for {}, the certificate now names {}",
                row.identifiers.join(", "),
                sorted.join(", ")
            ));
        }
        Issuance::from_record(&text, sorted, ctx.trusted_roots.as_ref(), ctx.store.clock())
            .map_err(|e| e.to_string())
    });
    match issuance {
        Ok(issuance) => {
            tracing::info!(cert = name, order = %row.order_url, serial = %row.serial, "installing the issued certificate recorded on disk");
            ctx.store
                .event(
                    EventKind::InstallFromDisk,
                    Some(name),
                    Some(&row.order_url),
                    None,
                    Some(&format!("serial {}", row.serial)),
                )
                .await?;
            // The profile the CA echoed is not part of the record; the
            // configured preference is, and that is what decides renewal.
            finish(ctx, cert, &row.order_url, sorted, issuance, None, cancel)
                .await
                .map(Some)
        }
        Err(why) => {
            tracing::warn!(cert = name, order = %row.order_url, reason = %why, "the recorded issuance is not installed; ordering anew");
            ctx.store
                .event(
                    EventKind::IssuedDropped,
                    Some(name),
                    Some(&row.order_url),
                    None,
                    Some(&why),
                )
                .await?;
            ctx.store.issued_done(&row.order_url).await?;
            remove_order_key(&dir, &row.order_url).await;
            Ok(None)
        }
    }
}

/// Installs an issuance that is recorded on disk, then reloads; the record
/// goes once the certificate is in place. `profile` is the one the CA's
/// order named, where known.
pub(super) async fn finish(
    ctx: &Context,
    cert: &CertificateConfig,
    order_url: &str,
    domains: &Identifiers,
    issuance: Issuance,
    profile: Option<String>,
    cancel: &CancellationToken,
) -> Result<Issued, DriveError> {
    let name = cert.name.as_str();
    let info = issuance.info.clone();
    // Kept for the fleet: the installer takes the issuance.
    let shared = ctx.fleet.as_ref().map(|_| {
        (
            issuance.fullchain_pem().to_owned(),
            issuance.key_pem().to_owned(),
        )
    });
    let cert_dir = ctx.cert_dir.clone();
    let name_owned = name.to_owned();
    let clock = ctx.store.clock().clone();
    let version = tokio::task::spawn_blocking(move || {
        install::install(&cert_dir, &name_owned, &issuance, &clock)
    })
    .await
    .map_err(|e| DriveError::Key(format!("install task failed: {e}")))??;
    // Fleet mode: every host installs it from now on. Before the reloads,
    // which the daemon may retry for minutes; under the lease, so a
    // holder that lost it publishes nothing.
    if let (Some(fleet), Some((fullchain, key))) = (&ctx.fleet, &shared) {
        fleet.publish(name, fullchain, key).await?;
    }
    let installed = crate::ledger::Installed {
        domains: domains.to_vec(),
        serial: info.serial.clone(),
        not_before: info.not_before,
        not_after: info.not_after,
        version: version.clone(),
        profile,
        profile_wanted: cert.profile.ledger_key(),
    };
    let next = install::renewal_time(info.not_before, info.not_after, ctx.renew_remaining);
    ctx.store
        .record_installed(name, &installed, next.secs())
        .await?;
    ctx.store.issued_done(order_url).await?;
    ctx.store
        .set_order_state(order_url, ledger::OrderStatus::Valid, OrderStep::Done, None)
        .await?;
    // Installed: privkey.pem holds the key now. The sealed copy (fleet
    // mode) stayed until here, so a peer taking over between the record
    // and the install could still download with it.
    remove_order_key(&issued_dir(&ctx.store).await?, order_url).await;
    forget_order_key(&ctx.store, &order_key_dir(&ctx.store).await?, order_url).await;
    ctx.store
        .event(
            EventKind::Installed,
            Some(name),
            Some(order_url),
            None,
            Some(&format!("serial {} version {version}", info.serial)),
        )
        .await?;
    tracing::info!(cert = name, order = %order_url, serial = %info.serial, "certificate installed");
    if ctx.reaper.config().deactivate_valid_after_issue {
        // A lost account key then cannot issue for these names without a
        // new validation. Deactivating a valid authorization is free.
        let policy = Policy {
            include_valid: true,
            ..Policy::by(Actor::Driver)
        };
        for (url, identifier) in ctx
            .store
            .authz_of_order(order_url, ledger::AuthzStatus::Valid)
            .await?
        {
            ctx.reaper.settle(&url, &identifier, policy).await?;
        }
    }
    let reloads = reload(ctx, cert, order_url, cancel).await?;
    if let Some(fleet) = &ctx.fleet {
        fleet.installed(name, &info.serial, &reloads).await?;
    }
    Ok(Issued {
        info,
        reloads,
        source: Source::Ordered,
    })
}

/// Runs the reload commands once the certificate is installed. The daemon
/// runs a failed one again with backoff until it succeeds (the server
/// still serves the old certificate meanwhile), or until certd stops.
pub(super) async fn reload(
    ctx: &Context,
    cert: &CertificateConfig,
    order_url: &str,
    cancel: &CancellationToken,
) -> Result<Vec<ReloadOutcome>, DriveError> {
    let name = cert.name.as_str();
    let run = |commands: Vec<String>| async move {
        install::run_reloads(&commands, cert.reload_timeout, name, &ctx.cert_dir).await
    };
    let mut outcomes = run(cert.reload.clone()).await;
    record_reloads(ctx, name, order_url, &outcomes).await?;
    if ctx.mode != RunMode::Daemon {
        return Ok(outcomes);
    }
    let mut delay = RELOAD_RETRY_FIRST;
    loop {
        let failed: Vec<String> = outcomes
            .iter()
            .filter(|r| !r.ok)
            .map(|r| r.command.clone())
            .collect();
        if failed.is_empty() {
            break;
        }
        tracing::info!(cert = name, commands = ?failed, retry_in_secs = delay.as_secs(), "reload failed; retrying");
        if sleep_or_cancel(delay, cancel).await.is_err() {
            // Stopping: the failure stays recorded for `status`.
            break;
        }
        delay = (delay * 2).min(RELOAD_RETRY_CAP);
        let again = run(failed).await;
        record_reloads(ctx, name, order_url, &again).await?;
        for r in again {
            if let Some(slot) = outcomes.iter_mut().find(|o| o.command == r.command) {
                *slot = r;
            }
        }
        if outcomes.iter().all(|r| r.ok) {
            ctx.store.clear_reload_failure(name).await?;
        }
    }
    Ok(outcomes)
}

/// Ledger events (and the certificate's error, for a failure) of reloads.
pub(super) async fn record_reloads(
    ctx: &Context,
    name: &str,
    order_url: &str,
    outcomes: &[ReloadOutcome],
) -> Result<(), DriveError> {
    for r in outcomes {
        let kind = if r.ok {
            EventKind::ReloadOk
        } else {
            EventKind::ReloadFailed
        };
        let detail = format!("{}: {}", r.command, r.detail);
        ctx.store
            .event(kind, Some(name), Some(order_url), None, Some(&detail))
            .await?;
        if !r.ok {
            tracing::warn!(cert = name, command = %r.command, detail = %r.detail, "reload failed");
            ctx.store
                .record_reload_failure(
                    name,
                    &format!("installed, but reload `{}` failed: {}", r.command, r.detail),
                )
                .await?;
        }
    }
    Ok(())
}

/// Polls a finalized order until it is valid, then downloads the chain.
pub(super) async fn download(
    ctx: &Context,
    order: &mut Order,
    cancel: &CancellationToken,
) -> Result<String, DriveError> {
    let url = order.url().to_owned();
    let mut poll = Poll::new(
        ctx.store.clock().clone(),
        Duration::from_millis(20),
        Duration::from_secs(10),
        ISSUANCE_TIMEOUT,
    );
    loop {
        match order.state().status {
            OrderStatus::Valid => {}
            OrderStatus::Processing => {
                let retry_after = ctx.account.http.observed(&url).and_then(|o| o.retry_after);
                let Some(delay) = poll.next_delay(retry_after) else {
                    return Err(AcmeError::Timeout(format!(
                        "the order is still processing after {}s",
                        ISSUANCE_TIMEOUT.as_secs()
                    ))
                    .into());
                };
                sleep_or_cancel(delay, cancel).await?;
            }
            other => return Err(DriveError::OrderState(order_status(other))),
        }
        // Refreshes a processing order, downloads once valid.
        if let Some(chain) =
            nonce_retry!(order.certificate().await).map_err(|e| acme_error(ctx, &url, e))?
        {
            return Ok(chain);
        }
    }
}

/// The key for a new issuance: the installed one with `reuse_key` (if it
/// is still of the configured type), else a fresh one.
pub(super) async fn certificate_key(
    ctx: &Context,
    cert: &CertificateConfig,
) -> Result<(KeyPair, String), DriveError> {
    if cert.reuse_key {
        let (dir, name) = (ctx.cert_dir.clone(), cert.name.as_str().to_owned());
        let read =
            tokio::task::spawn_blocking(move || crate::install::read_reusable_key(&dir, &name))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let pem = read.unwrap_or_else(|e| {
            tracing::warn!(cert = %cert.name, error = %e, "installed key not reused; a new key");
            None
        });
        if let Some(pem) = pem {
            match KeyPair::from_pem(&pem) {
                Ok(key) if key_type_of(&key) == Some(cert.key_type) => return Ok((key, pem)),
                Ok(_) => {
                    tracing::info!(cert = %cert.name, "key_type changed: a new key despite reuse_key");
                }
                Err(e) => {
                    tracing::warn!(cert = %cert.name, error = %e, "cannot read the installed key; a new key");
                }
            }
        }
    }
    generate_key(cert.key_type).await
}

/// Where issued certificates wait to be installed (chain and key, one
/// 0600 file per order, named like the order keys): beside the ledger.
pub(super) async fn issued_dir(store: &Ledger) -> Result<PathBuf, LedgerError> {
    Ok(store.ledger_dir().await?.join("issued"))
}

/// The configured type a key is, if any.
pub(super) fn key_type_of(key: &KeyPair) -> Option<KeyType> {
    use rsa::pkcs8::DecodePublicKey;
    use rsa::traits::PublicKeyParts;
    let alg = key.algorithm();
    if alg == &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Some(KeyType::EcdsaP256);
    }
    if alg == &rcgen::PKCS_ECDSA_P384_SHA384 {
        return Some(KeyType::EcdsaP384);
    }
    let public = rsa::RsaPublicKey::from_public_key_der(&key.subject_public_key_info()).ok()?;
    match public.size() * 8 {
        2048 => Some(KeyType::Rsa2048),
        3072 => Some(KeyType::Rsa3072),
        4096 => Some(KeyType::Rsa4096),
        _ => None,
    }
}

/// Generates a private key of `key_type`; returns it and its PKCS#8 PEM.
pub(super) async fn generate_key(key_type: KeyType) -> Result<(KeyPair, String), DriveError> {
    let key_err = |e: String| DriveError::Key(e);
    // RSA generation takes long enough to block a runtime thread.
    let key = tokio::task::spawn_blocking(move || -> Result<KeyPair, String> {
        match key_type {
            KeyType::EcdsaP256 => {
                KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())
            }
            KeyType::EcdsaP384 => {
                KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).map_err(|e| e.to_string())
            }
            KeyType::Rsa2048 => rsa_key(2048),
            KeyType::Rsa3072 => rsa_key(3072),
            KeyType::Rsa4096 => rsa_key(4096),
        }
    })
    .await
    .map_err(|e| key_err(e.to_string()))?
    .map_err(key_err)?;
    let pem = key.serialize_pem();
    Ok((key, pem))
}

/// ring cannot generate RSA keys, only use them; the `rsa` crate generates
/// and ring signs.
pub(super) fn rsa_key(bits: usize) -> Result<KeyPair, String> {
    use rsa::pkcs8::EncodePrivateKey;
    let mut rng = rsa::rand_core::OsRng;
    let key = rsa::RsaPrivateKey::new(&mut rng, bits).map_err(|e| e.to_string())?;
    let der = key.to_pkcs8_der().map_err(|e| e.to_string())?;
    let pkcs8 = rustls_pki_types::PrivatePkcs8KeyDer::from(der.as_bytes().to_vec());
    KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_RSA_SHA256)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use rcgen::CertificateParams;

    use super::*;

    #[tokio::test]
    async fn keys_of_every_type_sign_csrs() {
        for kt in [
            KeyType::EcdsaP256,
            KeyType::EcdsaP384,
            KeyType::Rsa2048,
            KeyType::Rsa3072,
            KeyType::Rsa4096,
        ] {
            let (key, pem) = generate_key(kt).await.expect("key");
            assert!(pem.contains("PRIVATE KEY"));
            // reuse_key reads it back as the same type.
            assert_eq!(
                key_type_of(&KeyPair::from_pem(&pem).expect("reload")),
                Some(kt)
            );
            let params = CertificateParams::new(vec!["a.example".to_owned()]).expect("params");
            params.serialize_request(&key).expect("csr");
        }
    }
}
