//! `certd account`: show the account from its credentials file, or roll
//! its key over; and the account session other commands open.

use std::fmt;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;

use crate::acme::{AcmeAccount, AcmeHttp, credentials_path};
use crate::app::Services;
use crate::app::dirs::ensure_dirs;
use crate::app::fleet::Fleet;
use crate::app::ops;
use crate::app::sink::Sink;
use crate::config::{CaConfig, CaName, Config};
use crate::hygiene::Reaper;
use crate::ledger::Ledger;

/// Opens the ledger and loads the first CA's existing account, or
/// explains why not.
pub(super) async fn account_session(cfg: &Config) -> anyhow::Result<Option<(Ledger, AcmeAccount)>> {
    account_session_for(cfg, None).await
}

/// Opens the ledger and loads the existing account at the CA that issued
/// the certificate `issued` (the first CA when it is `None` or the ledger
/// does not know), or explains why not.
pub(super) async fn account_session_for(
    cfg: &Config,
    issued: Option<&str>,
) -> anyhow::Result<Option<(Ledger, AcmeAccount)>> {
    let issuer = match issued {
        Some(name) => {
            ensure_dirs(cfg)?;
            let store = Ledger::open(&cfg.db_path(), crate::clock::Clock::system()).await?;
            let issuer = store.issuer_ca(name).await;
            store.close().await;
            issuer?.and_then(|s| s.parse().ok())
        }
        None => None,
    };
    let ca = issuer
        .as_ref()
        .and_then(|n| cfg.ca(n))
        .unwrap_or_else(|| cfg.primary_ca());
    account_session_at(cfg, ca).await
}

/// Opens the ledger and loads the existing account at `ca`, or explains
/// why not.
async fn account_session_at(
    cfg: &Config,
    ca: &CaConfig,
) -> anyhow::Result<Option<(Ledger, AcmeAccount)>> {
    ensure_dirs(cfg)?;
    let store = Ledger::open(&cfg.db_path(), crate::clock::Clock::system()).await?;
    match existing_account_at(cfg, ca, &store).await? {
        Some(reaper) => Ok(Some((store, reaper.account().clone()))),
        None => {
            errln!(
                "certd: no ACME account for {} in {} yet (`certd renew` creates it)",
                ca.acme.directory,
                cfg.storage.state_dir.display()
            );
            store.close().await;
            Ok(None)
        }
    }
}

/// A one-shot command in fleet mode: the services over the shared ledger
/// (`Services::open`, as a daemon opens them) and the fleet's account at
/// `ca` with its reaper. `None` (and said why) while the fleet has no
/// account there: a one-shot command that acts on an account does not
/// create one.
pub(super) async fn fleet_session(
    cfg: &Config,
    ca: &CaConfig,
) -> anyhow::Result<Option<(Services, Arc<Fleet>, Reaper)>> {
    let (services, fleet) = fleet_services(cfg).await?;
    match fleet_reaper(&services, &fleet, cfg, ca).await? {
        Some(reaper) => Ok(Some((services, fleet, reaper))),
        None => {
            services.close().await;
            Ok(None)
        }
    }
}

/// The services of a one-shot command in fleet mode, over the shared
/// ledger.
pub(super) async fn fleet_services(cfg: &Config) -> anyhow::Result<(Services, Arc<Fleet>)> {
    let services = Services::open(cfg.clone(), crate::clock::Clock::system()).await?;
    let Some(fleet) = services.fleet.clone() else {
        anyhow::bail!("[fleet] is configured, yet the fleet's database was not opened");
    };
    Ok((services, fleet))
}

/// The fleet's existing account at `ca` and its reaper; `None` (said why)
/// while there is none.
pub(super) async fn fleet_reaper(
    services: &Services,
    fleet: &Fleet,
    cfg: &Config,
    ca: &CaConfig,
) -> anyhow::Result<Option<Reaper>> {
    let directory = ca.acme.directory.to_string();
    if fleet.db.account_key(&directory).await?.is_none() {
        errln!(
            "certd: the fleet has no ACME account for {directory} yet (a host's `certd run` or `certd renew` creates it)"
        );
        return Ok(None);
    }
    let account = services.account_at(cfg, ca).await?;
    Ok(Some(Reaper::new(
        services.store.clone(),
        account,
        ca.reaper_config(&cfg.reaper),
    )))
}

/// Loads the account and its reaper for commands that act on the ledger's
/// authorizations; `None` when certd has no account yet (nothing to act on).
pub(super) async fn existing_account(
    cfg: &Config,
    store: &Ledger,
) -> anyhow::Result<Option<Reaper>> {
    existing_account_at(cfg, cfg.primary_ca(), store).await
}

/// The existing account at `ca` and its reaper (that CA's limits).
async fn existing_account_at(
    cfg: &Config,
    ca: &CaConfig,
    store: &Ledger,
) -> anyhow::Result<Option<Reaper>> {
    let directory = ca.acme.directory.to_string();
    if !credentials_path(&cfg.storage.state_dir, &directory).exists() {
        return Ok(None);
    }
    let http = AcmeHttp::new(ca.acme.ca_bundle.as_deref(), crate::clock::Clock::system())?;
    let account =
        AcmeAccount::load_or_create(&ca.acme, &cfg.storage.state_dir, store, http).await?;
    Ok(Some(Reaper::new(
        store.clone(),
        account,
        ca.reaper_config(&cfg.reaper),
    )))
}

/// `account show`: the account at `ca`, or, with one CA, its account as
/// before; with several, each CA that has one, in configuration order.
pub(super) fn account_show(cfg: &Config, ca: Option<&str>) -> anyhow::Result<ExitCode> {
    if let Some(name) = ca {
        let Some(ca) = name.parse::<CaName>().ok().and_then(|n| cfg.ca(&n)) else {
            errln!("certd: no CA named {name:?} in {}", cfg.path.display());
            return Ok(ExitCode::from(2));
        };
        return show_one(cfg, ca);
    }
    if cfg.cas.len() == 1 {
        return show_one(cfg, cfg.primary_ca());
    }
    let with_account: Vec<&CaConfig> = cfg
        .cas
        .iter()
        .filter(|c| credentials_path(&cfg.storage.state_dir, c.acme.directory.as_str()).exists())
        .collect();
    if with_account.is_empty() {
        errln!(
            "certd: no ACME account at any configured CA in {} yet (`certd renew` creates them)",
            cfg.storage.state_dir.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    for (i, ca) in with_account.into_iter().enumerate() {
        if i > 0 {
            outln!("");
        }
        outln!("ca:          {}", ca.name);
        let code = show_one(cfg, ca)?;
        if code != ExitCode::SUCCESS {
            return Ok(code);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads the account at `ca` from its credentials file only: no ledger, no
/// CA, and nothing created (a reading command, see the module's doc).
fn show_one(cfg: &Config, ca: &CaConfig) -> anyhow::Result<ExitCode> {
    let directory = ca.acme.directory.to_string();
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
        if ca.acme.contact.is_empty() {
            "(none)".to_owned()
        } else {
            ca.acme.contact.join(", ")
        }
    );
    if let Some(eab) = &ca.acme.eab {
        outln!("eab kid:     {}", eab.kid);
    }
    Ok(ExitCode::SUCCESS)
}

/// `account rollover`: the account at `ca`; by default the one CA's as
/// before, or with several each CA that has an account.
pub(super) async fn account_rollover(cfg: &Config, ca: Option<&str>) -> anyhow::Result<ExitCode> {
    let cas: Vec<&CaConfig> = match ca {
        Some(name) => match name.parse::<CaName>().ok().and_then(|n| cfg.ca(&n)) {
            Some(ca) => vec![ca],
            None => {
                errln!("certd: no CA named {name:?} in {}", cfg.path.display());
                return Ok(ExitCode::from(2));
            }
        },
        None if cfg.cas.len() == 1 => vec![cfg.primary_ca()],
        None => cfg
            .cas
            .iter()
            .filter(|c| {
                credentials_path(&cfg.storage.state_dir, c.acme.directory.as_str()).exists()
            })
            .collect(),
    };
    let several = cas.len() > 1;
    let mut code = 0;
    for ca in cas {
        if several {
            outln!("ca {}:", ca.name);
        }
        if cfg.fleet.is_some() {
            let Some((services, fleet, reaper)) = fleet_session(cfg, ca).await? else {
                return Ok(ExitCode::FAILURE);
            };
            let rolled =
                ops::rollover_in_fleet(&fleet, reaper.account(), cfg, &Sink::Terminal).await;
            code = code.max(rolled);
            services.close().await;
            continue;
        }
        let Some((store, account)) = account_session_at(cfg, ca).await? else {
            return Ok(ExitCode::FAILURE);
        };
        code = code.max(ops::rollover(&account, cfg, &Sink::Terminal).await);
        store.close().await;
    }
    Ok(ExitCode::from(code))
}
