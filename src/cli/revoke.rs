//! `certd revoke`: the installed certificate revoked at the CA, then
//! replaced at once unless `--no-renew`.

use std::process::ExitCode;

use crate::app::ops::{self, RevokeReason};
use crate::app::sink::Sink;
use crate::clock::Clock;
use crate::config::Config;

use super::account::account_session_for;
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
