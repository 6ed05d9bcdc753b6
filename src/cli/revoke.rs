//! `certd revoke`: the installed certificate revoked at the CA, then
//! replaced at once unless `--no-renew`.

use std::process::ExitCode;

use crate::app::lease::one_shot_under;
use crate::app::ops::{self, RevokeReason};
use crate::app::sink::Sink;
use crate::clock::Clock;
use crate::config::{CaName, Config};
use crate::fleet::LeaseName;

use super::account::{account_session_for, fleet_reaper, fleet_services};
use super::renew::renew;

pub(super) async fn revoke(
    cfg: Config,
    clock: Clock,
    name: &str,
    reason: RevokeReason,
    no_renew: bool,
) -> anyhow::Result<ExitCode> {
    if cfg.certificate(name).is_none() {
        errln!(
            "certd: no certificate named {name:?} in {}",
            cfg.path.display()
        );
        return Ok(ExitCode::from(2));
    }
    if !cfg.storage.cert_dir.join(name).join("cert.pem").exists() {
        errln!(
            "certd: {}: no installed certificate to revoke",
            cfg.storage.cert_dir.join(name).join("cert.pem").display()
        );
        return Ok(ExitCode::FAILURE);
    }
    if cfg.fleet.is_some() {
        if !revoke_in_fleet(&cfg, name, reason).await? {
            return Ok(ExitCode::FAILURE);
        }
        if no_renew {
            return Ok(ExitCode::SUCCESS);
        }
        return renew(cfg, clock, &[name.to_owned()], false, false).await;
    }
    // Revocation goes to the CA that issued the certificate.
    let Some((store, account)) = account_session_for(&cfg, Some(name)).await? else {
        return Ok(ExitCode::FAILURE);
    };
    let revoked = ops::revoke_installed(
        &cfg.storage.cert_dir,
        name,
        reason,
        &store,
        &account,
        &Sink::Terminal,
    )
    .await;
    store.close().await;
    if !revoked? {
        return Ok(ExitCode::FAILURE);
    }
    if no_renew {
        return Ok(ExitCode::SUCCESS);
    }
    // A revoked certificate must not stay in service: replace it now.
    renew(cfg, clock, &[name.to_owned()], false, false).await
}

/// `certd revoke` in fleet mode: under the certificate's lease
/// (`cert:<name>`), as an order for it would be, so no host renews or
/// revokes it meanwhile; the revocation recorded in the shared ledger
/// through the lease's fence. Whether it was revoked.
async fn revoke_in_fleet(cfg: &Config, name: &str, reason: RevokeReason) -> anyhow::Result<bool> {
    let (services, fleet) = fleet_services(cfg).await?;
    // Revocation goes to the CA that issued the certificate.
    let issuer: Option<CaName> = services
        .store
        .issuer_ca(name)
        .await?
        .and_then(|s| s.parse().ok());
    let ca = issuer
        .as_ref()
        .and_then(|n| cfg.ca(n))
        .unwrap_or_else(|| cfg.primary_ca());
    let Some(reaper) = fleet_reaper(&services, &fleet, cfg, ca).await? else {
        services.close().await;
        return Ok(false);
    };
    let lease = LeaseName::Cert(name.to_owned());
    let held = one_shot_under(&services, &fleet, lease.clone(), |fenced| async move {
        ops::revoke_installed(
            &cfg.storage.cert_dir,
            name,
            reason,
            &fenced,
            reaper.account(),
            &Sink::Terminal,
        )
        .await
    })
    .await;
    services.close().await;
    match held {
        Ok(Some(revoked)) => revoked,
        Ok(None) => {
            errln!(
                "certd: another host of the fleet holds lease {lease} (it is renewing {name} now); not revoked, try again shortly"
            );
            Ok(false)
        }
        Err(e) => {
            errln!("certd: cannot claim lease {lease}: {e}; not revoked");
            Ok(false)
        }
    }
}
