//! The commands the daemon runs for a client of its control socket
//! (`certd renew`, `revoke`, `reap`, `authz deactivate`,
//! `account rollover` while it runs), with its own parts: renewals go to
//! its scheduler, the rest to the operations one-shot commands run too
//! (`crate::app::ops`). In fleet mode those take the lease a one-shot
//! command would (the reaper's, the certificate's, the account's) and
//! write through its fence.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::acme::{AcmeAccount, error_chain};
use crate::app::lease::one_shot_under;
use crate::app::ops::{self, RevokeReason};
use crate::app::sink::Sink;
use crate::clock::rfc3339;
use crate::config::{CaConfig, CaName, Config};
use crate::daemon::control::{self, Request};
use crate::daemon::schedule;
use crate::fleet::LeaseName;
use crate::hygiene::Policy;
use crate::ledger::Ledger;

/// Runs a command a client handed to the daemon over its control socket,
/// with the daemon's own parts; returns the exit code.
pub(crate) async fn run_for_client(
    request: control::Request,
    handles: &control::Handles,
    sink: &Sink,
) -> u8 {
    let cfg = handles.config.borrow().clone();
    let reaper = &handles.ctx.reaper;
    let result = match request {
        Request::Renew { names, force } => {
            Ok(renew_in_daemon(handles, &cfg, names, force, sink).await)
        }
        Request::Revoke {
            name,
            reason,
            no_renew,
        } => revoke_in_daemon(handles, &cfg, &name, reason, no_renew, sink).await,
        Request::Reap { older_than_secs } => {
            let older_than =
                older_than_secs.map_or(cfg.reaper.pending_max_age, Duration::from_secs);
            let lease = LeaseName::Reaper(reaper.account().ledger_id.to_string());
            under_fleet_lease(handles, lease, sink, |store| {
                let reaper = reaper.writing_to(store);
                async move { ops::reap_pass(&reaper, older_than, false, sink).await }
            })
            .await
        }
        Request::Deactivate {
            urls,
            all_pending,
            include_valid,
            ignore_budget,
        } => {
            let policy = Policy {
                include_valid,
                ignore_budget,
                ..Policy::by(crate::ledger::Actor::Cli)
            };
            let lease = LeaseName::Reaper(reaper.account().ledger_id.to_string());
            under_fleet_lease(handles, lease, sink, |store| {
                let reaper = reaper.writing_to(store.clone());
                async move {
                    ops::deactivate(&store, &reaper, urls, all_pending, policy, sink).await
                }
            })
            .await
        }
        Request::Rollover if cfg.cas.len() == 1 => {
            Ok(rollover_with(handles, &handles.ctx.account, &cfg, sink).await)
        }
        Request::Rollover => {
            let mut code = 0;
            for ca in cfg.cas.iter().filter(|c| has_account(&cfg, c)) {
                sink.out(&format!("ca {}:", ca.name));
                code = code.max(rollover_at(handles, &cfg, &ca.name, sink).await);
            }
            Ok(code)
        }
        Request::RolloverAt { ca } => {
            // A name that does not parse names no configured CA either.
            let Some(name) = ca.parse::<CaName>().ok().filter(|n| cfg.ca(n).is_some()) else {
                sink.err(&format!(
                    "certd: no CA named {ca:?} in {}",
                    cfg.path.display()
                ));
                return 2;
            };
            Ok(rollover_at(handles, &cfg, &name, sink).await)
        }
    };
    result.unwrap_or_else(|e| {
        sink.err(&format!("certd: {}", error_chain(e.as_ref())));
        1
    })
}

/// `certd renew` in the daemon: each certificate goes to the scheduler,
/// which orders it in its own slots, with its own listeners; the lines
/// come as the orders end.
async fn renew_in_daemon(
    handles: &control::Handles,
    cfg: &Config,
    names: Vec<String>,
    force: bool,
    sink: &Sink,
) -> u8 {
    if let Some(unknown) = names.iter().find(|n| cfg.certificate(n).is_none()) {
        sink.err(&format!(
            "certd: no certificate named {unknown:?} in {}",
            cfg.path.display()
        ));
        return 2;
    }
    let names: Vec<String> = if names.is_empty() {
        cfg.certificates
            .iter()
            .map(|c| c.name.to_string())
            .collect()
    } else {
        names
    };
    let mut waiting = JoinSet::new();
    for name in names {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let request = schedule::Request {
            name: name.clone(),
            force,
            reply,
        };
        if handles.scheduler.send(request).await.is_err() {
            sink.err("certd: the daemon is shutting down");
            return 1;
        }
        waiting.spawn(async move { (name, outcome.await) });
    }
    let mut failed = false;
    while let Some(joined) = waiting.join_next().await {
        let Ok((name, outcome)) = joined else {
            failed = true;
            continue;
        };
        failed |= !report_outcome(&name, outcome.ok(), sink);
    }
    u8::from(failed)
}

/// Prints how a renewal the scheduler ran for a client ended, as a
/// one-shot `renew` prints it; false when it failed.
fn report_outcome(name: &str, outcome: Option<schedule::Outcome>, sink: &Sink) -> bool {
    use schedule::Outcome;
    match outcome {
        Some(Outcome::NotDue(at)) => {
            sink.out(&format!("{name}: valid, not due until {}", at.rfc3339()));
            true
        }
        Some(Outcome::Issued {
            serial,
            not_after,
            failed_reloads,
        }) => {
            sink.out(&format!(
                "{name}: issued serial {serial} valid until {}{}",
                rfc3339(not_after),
                if failed_reloads > 0 {
                    format!(", but {failed_reloads} reload command(s) failed")
                } else {
                    String::new()
                }
            ));
            failed_reloads == 0
        }
        Some(Outcome::Failed(msg)) => {
            sink.out(&format!("{name}: failed: {msg}"));
            false
        }
        Some(Outcome::Unknown) => {
            sink.out(&format!(
                "{name}: not configured in the running daemon (a reload pending?)"
            ));
            false
        }
        None => {
            sink.out(&format!(
                "{name}: the daemon stopped (or dropped the certificate) before the order ended"
            ));
            false
        }
    }
}

/// Whether certd has an account at `ca` (its credentials file exists).
fn has_account(cfg: &Config, ca: &CaConfig) -> bool {
    crate::acme::credentials_path(&cfg.storage.state_dir, ca.acme.directory.as_str()).exists()
}

/// Rolls over the key of the account at `ca`, through the context every
/// order at that CA shares.
async fn rollover_at(handles: &control::Handles, cfg: &Config, ca: &CaName, sink: &Sink) -> u8 {
    match handles.cas.context(ca).await {
        Ok(ctx) => rollover_with(handles, &ctx.account, cfg, sink).await,
        Err(e) => {
            sink.err(&format!(
                "certd: the account at CA {ca}: {}",
                error_chain(&e)
            ));
            1
        }
    }
}

/// `certd revoke` in the daemon: revoked with the daemon's account, then
/// replaced at once by its scheduler.
async fn revoke_in_daemon(
    handles: &control::Handles,
    cfg: &Config,
    name: &str,
    reason: RevokeReason,
    no_renew: bool,
    sink: &Sink,
) -> anyhow::Result<u8> {
    if cfg.certificate(name).is_none() {
        sink.err(&format!(
            "certd: no certificate named {name:?} in {}",
            cfg.path.display()
        ));
        return Ok(2);
    }
    // Revocation goes to the CA that issued the certificate.
    let ctx = match handles.ctx.store.issuer_ca(name).await? {
        Some(ca) if ca != handles.ctx.ca.as_str() => match ca.parse::<CaName>() {
            Ok(issuer) => handles.cas.context(&issuer).await?,
            // Not a name certd writes: the CA it issued through is gone.
            Err(_) => handles.ctx.clone(),
        },
        _ => handles.ctx.clone(),
    };
    let lease = LeaseName::Cert(name.to_owned());
    let revoked = under_fleet_lease(handles, lease, sink, |store| async move {
        let revoked =
            ops::revoke_installed(&ctx.cert_dir, name, reason, &store, &ctx.account, sink).await?;
        Ok(u8::from(!revoked))
    })
    .await?;
    if revoked != 0 {
        return Ok(revoked);
    }
    if no_renew {
        return Ok(0);
    }
    let (reply, outcome) = tokio::sync::oneshot::channel();
    let request = schedule::Request {
        name: name.to_owned(),
        force: false,
        reply,
    };
    if handles.scheduler.send(request).await.is_err() {
        sink.err(
            "certd: the daemon is shutting down; it replaces the certificate at its next start",
        );
        return Ok(1);
    }
    Ok(u8::from(!report_outcome(name, outcome.await.ok(), sink)))
}

/// Runs `work` with the ledger it writes: in fleet mode under the lease
/// `name` (as a one-shot command would take it) and fenced by it, else
/// the daemon's own. Another host holding the lease: said, and exit 1.
async fn under_fleet_lease<Fut>(
    handles: &control::Handles,
    name: LeaseName,
    sink: &Sink,
    work: impl FnOnce(Ledger) -> Fut,
) -> anyhow::Result<u8>
where
    Fut: Future<Output = anyhow::Result<u8>>,
{
    let services = handles.cas.services();
    let Some(fleet) = &services.fleet else {
        return work(handles.ctx.store.clone()).await;
    };
    match one_shot_under(services, fleet, name.clone(), work).await {
        Ok(Some(code)) => code,
        Ok(None) => {
            sink.err(&format!(
                "certd: another host of the fleet holds lease {name}; nothing done, try again shortly"
            ));
            Ok(1)
        }
        Err(e) => {
            sink.err(&format!(
                "certd: cannot claim lease {name}: {e}; nothing done"
            ));
            Ok(1)
        }
    }
}

/// Rolls the key of `account` over; in fleet mode under the account's
/// lease, the new key stored for every host.
async fn rollover_with(
    handles: &control::Handles,
    account: &AcmeAccount,
    cfg: &Config,
    sink: &Sink,
) -> u8 {
    match &handles.cas.services().fleet {
        Some(fleet) => ops::rollover_in_fleet(fleet, account, cfg, sink).await,
        None => ops::rollover(account, cfg, sink).await,
    }
}
