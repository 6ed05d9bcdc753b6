//! `certd fleet import`: moves a host's SQLite ledger into the fleet's
//! PostgreSQL database, once, when the operator asks. Fleet mode never
//! does it by itself: which host's history becomes the fleet's is the
//! operator's choice.

use std::process::ExitCode;

use anyhow::Context as _;

use crate::app::fleet::Fleet;
use crate::clock::Clock;
use crate::config::Config;
use crate::ledger::Ledger;
use crate::ledger::import::ImportError;

/// Copies the configuration's `state_dir/certd.db` into the fleet's
/// database, which must hold no ledger rows yet. The state directory's
/// lock is held (by the caller), so no certd writes the file meanwhile.
pub(super) async fn import(cfg: &Config, clock: Clock) -> anyhow::Result<ExitCode> {
    if cfg.fleet.is_none() {
        errln!(
            "certd: fleet import: {} has no [fleet] section; configure the fleet's database and key first",
            cfg.path.display()
        );
        return Ok(ExitCode::from(2));
    }
    let path = cfg.db_path();
    if !path.exists() {
        errln!(
            "certd: fleet import: there is no SQLite ledger at {}; nothing to import",
            path.display()
        );
        return Ok(ExitCode::from(2));
    }
    // Opening applies this certd's migrations, so an older ledger's
    // tables have every column the copy reads.
    let sqlite = Ledger::open(&path, clock.clone())
        .await
        .with_context(|| format!("ledger {}", path.display()))?;
    let fleet = Fleet::open(cfg)
        .await?
        .context("fleet mode is configured")?;
    let shared = Ledger::postgres(
        fleet.db.pool().clone(),
        cfg.storage.state_dir.clone(),
        clock,
    );
    let result = sqlite.import_into(&shared).await;
    sqlite.close().await;
    match result {
        Ok(report) => {
            outln!(
                "copied the ledger {} into the fleet database at {}:",
                path.display(),
                fleet.db.target()
            );
            for (table, rows) in &report.tables {
                outln!("  {table}: {rows}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ ImportError::NotEmpty { .. }) => {
            errln!("certd: fleet import: {e}");
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(e).with_context(|| {
            format!(
                "cannot copy {} into the fleet database at {}; nothing was copied",
                path.display(),
                fleet.db.target()
            )
        }),
    }
}
