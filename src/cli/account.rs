//! `certd account`: show the account from its credentials file, or roll
//! its key over; and the account session other commands open.

use std::fmt;
use std::process::ExitCode;

use anyhow::Context as _;

use crate::acme::{AcmeAccount, AcmeHttp, credentials_path};
use crate::app::dirs::ensure_dirs;
use crate::app::ops;
use crate::app::sink::Sink;
use crate::config::Config;
use crate::hygiene::Reaper;
use crate::ledger::Ledger;

/// Opens the ledger and loads the existing account, or explains why not.
pub(super) async fn account_session(cfg: &Config) -> anyhow::Result<Option<(Ledger, AcmeAccount)>> {
    ensure_dirs(cfg)?;
    let store = Ledger::open(&cfg.db_path(), crate::clock::Clock::system()).await?;
    match existing_account(cfg, &store).await? {
        Some(reaper) => Ok(Some((store, reaper.account().clone()))),
        None => {
            errln!(
                "certd: no ACME account for {} in {} yet (`certd renew` creates it)",
                cfg.primary_ca().acme.directory,
                cfg.storage.state_dir.display()
            );
            store.close().await;
            Ok(None)
        }
    }
}

/// Loads the account and its reaper for commands that act on the ledger's
/// authorizations; `None` when certd has no account yet (nothing to act on).
pub(super) async fn existing_account(
    cfg: &Config,
    store: &Ledger,
) -> anyhow::Result<Option<Reaper>> {
    let acme = &cfg.primary_ca().acme;
    let directory = acme.directory.to_string();
    if !credentials_path(&cfg.storage.state_dir, &directory).exists() {
        return Ok(None);
    }
    let http = AcmeHttp::new(acme.ca_bundle.as_deref(), crate::clock::Clock::system())?;
    let account = AcmeAccount::load_or_create(acme, &cfg.storage.state_dir, store, http).await?;
    Ok(Some(Reaper::new(
        store.clone(),
        account,
        cfg.reaper.clone(),
    )))
}

/// Reads the account from its credentials file only: no ledger, no CA, and
/// nothing created (a reading command, see the module's doc).
pub(super) fn account_show(cfg: &Config) -> anyhow::Result<ExitCode> {
    let acme = &cfg.primary_ca().acme;
    let directory = acme.directory.to_string();
    let path = credentials_path(&cfg.storage.state_dir, &directory);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            errln!(
                "certd: no ACME account for {directory} in {} yet (`certd renew` creates it)",
                cfg.storage.state_dir.display()
            );
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let not_credentials = |e: &dyn fmt::Display| {
        anyhow::anyhow!("{}: not valid account credentials: {e}", path.display())
    };
    let creds: instant_acme::AccountCredentials =
        serde_json::from_slice(&bytes).map_err(|e| not_credentials(&e))?;
    #[derive(serde::Deserialize)]
    struct Id {
        id: String,
    }
    let Id { id } = serde_json::from_slice(&bytes).map_err(|e| not_credentials(&e))?;
    let signer = crate::acme::raw::RawSigner::new(creds.private_key().secret_pkcs8_der(), &id)
        .map_err(|e| not_credentials(&e))?;
    outln!("directory:   {directory}");
    outln!("account:     {id}");
    outln!("thumbprint:  {}", signer.thumbprint());
    outln!(
        "credentials: {} (0600; holds the private key)",
        path.display()
    );
    outln!(
        "contact:     {}",
        if acme.contact.is_empty() {
            "(none)".to_owned()
        } else {
            acme.contact.join(", ")
        }
    );
    if let Some(eab) = &acme.eab {
        outln!("eab kid:     {}", eab.kid);
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn account_rollover(cfg: &Config) -> anyhow::Result<ExitCode> {
    let Some((store, account)) = account_session(cfg).await? else {
        return Ok(ExitCode::FAILURE);
    };
    let code = ops::rollover(&account, cfg, &Sink::Terminal).await;
    store.close().await;
    Ok(ExitCode::from(code))
}
