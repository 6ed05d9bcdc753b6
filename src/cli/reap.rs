//! `certd reap`: one reaper pass now, after recovering the orders an
//! earlier run left unfinished.

use std::process::ExitCode;
use std::time::Duration;

use crate::acme::error_chain;
use crate::app::lease::one_shot_under;
use crate::app::ops;
use crate::app::sink::Sink;
use crate::app::wants_same_names;
use crate::config::Config;
use crate::fleet::{LeaseError, LeaseName};
use crate::ledger::{EventKind, Ledger};

use super::account::{existing_account, fleet_session};

pub(super) async fn reap(
    cfg: &Config,
    older_than: Option<Duration>,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    if cfg.fleet.is_some() {
        return reap_in_fleet(cfg, older_than, dry_run).await;
    }
    let Some(store) = open_existing(cfg).await? else {
        outln!("no ledger yet: nothing to reap");
        return Ok(ExitCode::SUCCESS);
    };
    let reaper = match existing_account(cfg, &store).await {
        Ok(Some(reaper)) => reaper,
        Ok(None) => {
            outln!("no ACME account yet: nothing to reap");
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => {
            // The CA is unreachable (or the account unusable): record the
            // failed pass for `status`; nothing in the ledger changed.
            let msg = error_chain(e.as_ref());
            if !dry_run {
                store
                    .event(EventKind::ReaperError, None, None, None, Some(&msg))
                    .await?;
                store
                    .event(
                        EventKind::ReaperPass,
                        None,
                        None,
                        None,
                        Some(&format!("failed: {msg}")),
                    )
                    .await?;
            }
            errln!("certd: reaper pass failed: {msg}");
            store.close().await;
            return Ok(ExitCode::FAILURE);
        }
    };
    if !dry_run {
        let (resumable, abandoned) =
            crate::order::recover(&reaper, |o| wants_same_names(cfg, o)).await?;
        if resumable + abandoned > 0 {
            outln!("recovered {resumable} unfinished order(s) to resume, abandoned {abandoned}");
        }
    }
    let older_than = older_than.unwrap_or(cfg.reaper.pending_max_age);
    let code = ops::reap_pass(&reaper, older_than, dry_run, &Sink::Terminal).await;
    store.close().await;
    Ok(ExitCode::from(code?))
}

/// `certd reap` in fleet mode: one pass under the account's reaper lease,
/// as a daemon's, its writes through the lease's fence. No account-wide
/// recovery: the peers' orders are live, and each certificate's are
/// recovered by the host that claims its lease.
async fn reap_in_fleet(
    cfg: &Config,
    older_than: Option<Duration>,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    let Some((services, fleet, reaper)) = fleet_session(cfg, cfg.primary_ca()).await? else {
        return Ok(ExitCode::SUCCESS);
    };
    let older_than = older_than.unwrap_or(cfg.reaper.pending_max_age);
    let name = LeaseName::Reaper(reaper.account().ledger_id.to_string());
    let held = one_shot_under(&services, &fleet, name.clone(), |fenced| {
        let reaper = reaper.writing_to(fenced);
        async move { ops::reap_pass(&reaper, older_than, dry_run, &Sink::Terminal).await }
    })
    .await;
    services.close().await;
    reaper_lease_exit(held, &name)
}

/// The exit of a one-shot command run under the reaper lease `name`: the
/// command's own code, or a failure naming the lease when another host
/// holds it (it is reaping the account now) or it cannot be claimed.
pub(super) fn reaper_lease_exit(
    held: Result<Option<anyhow::Result<u8>>, LeaseError>,
    name: &LeaseName,
) -> anyhow::Result<ExitCode> {
    match held {
        Ok(Some(code)) => Ok(ExitCode::from(code?)),
        Ok(None) => {
            errln!(
                "certd: another host of the fleet holds lease {name} and is reaping this account now; nothing done, try again shortly"
            );
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            errln!("certd: cannot claim lease {name}: {e}; nothing done");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Opens the ledger for reading commands; `None` if certd never ran.
pub(super) async fn open_existing(cfg: &Config) -> anyhow::Result<Option<Ledger>> {
    let path = cfg.db_path();
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(
        Ledger::open(&path, crate::clock::Clock::system()).await?,
    ))
}
