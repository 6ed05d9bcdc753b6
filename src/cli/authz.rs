//! `certd authz`: list the authorizations the ledger holds, or deactivate
//! some at the CA.

use std::process::ExitCode;

use crate::app::dirs::ensure_dirs;
use crate::app::lease::one_shot_under;
use crate::app::ops;
use crate::app::sink::Sink;
use crate::clock::rfc3339;
use crate::config::Config;
use crate::fleet::LeaseName;
use crate::hygiene::Policy;
use crate::ledger::Ledger;

use super::account::{existing_account, fleet_session};
use super::output::print_table;

pub(super) async fn authz_list(
    cfg: &Config,
    pending_only: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let path = cfg.db_path();
    let existing = if path.exists() {
        Some(Ledger::open_read_only(&path, crate::clock::Clock::system()).await?)
    } else {
        None
    };
    let rows = match existing {
        Some(s) => {
            let rows = s.authz_list(pending_only).await?;
            s.close().await;
            rows
        }
        None => Vec::new(),
    };
    if json {
        // Exact: serde escapes what needs it, and the lines are JSON's own.
        crate::app::sink::write_stdout_all(&format!("{}\n", serde_json::to_string_pretty(&rows)?));
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = vec![
        [
            "URL",
            "IDENTIFIER",
            "STATUS",
            "CHALLENGE",
            "CREATED",
            "UPDATED",
            "ORDER",
        ]
        .map(String::from),
    ];
    for r in rows {
        let t = |v: Option<i64>| v.map(rfc3339).unwrap_or_default();
        table.push([
            r.url,
            r.identifier,
            r.status.to_string(),
            r.challenge_type.unwrap_or_else(|| "-".into()),
            t(r.created_at),
            t(r.updated_at),
            r.order_url.unwrap_or_else(|| "-".into()),
        ]);
    }
    print_table(&table);
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn authz_deactivate(
    cfg: &Config,
    urls: Vec<String>,
    all_pending: bool,
    include_valid: bool,
    ignore_budget: bool,
) -> anyhow::Result<ExitCode> {
    if urls.is_empty() && !all_pending {
        errln!("certd: name authorization or challenge URLs, or use --all-pending");
        return Ok(ExitCode::from(2));
    }
    let policy = Policy {
        include_valid,
        ignore_budget,
        ..Policy::by(crate::ledger::Actor::Cli)
    };
    if cfg.fleet.is_some() {
        return deactivate_in_fleet(cfg, urls, all_pending, policy).await;
    }
    ensure_dirs(cfg)?;
    let store = Ledger::open(&cfg.db_path(), crate::clock::Clock::system()).await?;
    let Some(reaper) = existing_account(cfg, &store).await? else {
        errln!(
            "certd: no ACME account for {} in {}: certd created no authorizations there",
            cfg.primary_ca().acme.directory,
            cfg.storage.state_dir.display()
        );
        return Ok(ExitCode::FAILURE);
    };
    let code = ops::deactivate(&store, &reaper, urls, all_pending, policy, &Sink::Terminal).await;
    store.close().await;
    Ok(ExitCode::from(code?))
}

/// `certd authz deactivate` in fleet mode: under the account's reaper
/// lease, as the reaper's own deactivations, its writes through the
/// lease's fence.
async fn deactivate_in_fleet(
    cfg: &Config,
    urls: Vec<String>,
    all_pending: bool,
    policy: Policy,
) -> anyhow::Result<ExitCode> {
    let Some((services, fleet, reaper)) = fleet_session(cfg, cfg.primary_ca()).await? else {
        return Ok(ExitCode::FAILURE);
    };
    let name = LeaseName::Reaper(reaper.account().ledger_id.to_string());
    let held = one_shot_under(&services, &fleet, name.clone(), |fenced| {
        let reaper = reaper.writing_to(fenced.clone());
        async move {
            ops::deactivate(&fenced, &reaper, urls, all_pending, policy, &Sink::Terminal).await
        }
    })
    .await;
    services.close().await;
    super::reap::reaper_lease_exit(held, &name)
}
