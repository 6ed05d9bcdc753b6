//! `certd status`: every configured certificate beside its ledger state, as
//! a table, as JSON, or as one monitoring line (`--check`).
//!
//! Built for a host with 10,000 certificates, where parsing the
//! configuration and reading the ledger each take tens of milliseconds: the
//! ledger is read while the configuration is parsed (`load`), SQLite hands
//! over all certificate rows as one JSON value, and the output is built in
//! memory and written once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use serde::Serialize;

use super::{escape_control, push_table, shorten, write_stdout_all};
use crate::clock::{UnixTime, push_rfc3339, rfc3339};
use crate::config::{self, CertificateConfig, Config, ConfigError};
use crate::health::{Level, assess};
use crate::store::{ACCOUNT_SCOPE, CertificateRow, PauseRow, ReaperSummary, Store};

/// What `certd status` prints.
#[derive(Debug, Clone, Copy)]
pub(super) enum Mode {
    Table,
    Json,
    Check,
}

/// The ledger as read ahead by `load`, with the state directory it was read
/// from.
pub(super) struct Prefetched {
    state_dir: PathBuf,
    ledger: anyhow::Result<Ledger>,
}

/// Parses the configuration on a blocking thread while this one reads the
/// ledger named by the configuration's head (`config::peek_state_dir`).
/// `run` uses the ledger only if the parsed configuration names the same
/// state directory, and reads it again otherwise.
pub(super) async fn load(path: &Path) -> (Result<Config, ConfigError>, Option<Prefetched>) {
    let text = match Config::read(path) {
        Ok(text) => text,
        Err(e) => return (Err(e), None),
    };
    let Some(state_dir) = config::peek_state_dir(path, &text) else {
        return (Config::parse(path, &text), None);
    };
    let owned = path.to_owned();
    let parse = tokio::task::spawn_blocking(move || Config::parse(&owned, &text));
    let ledger = Ledger::read(&state_dir, UnixTime::now()).await;
    let cfg = match parse.await {
        Ok(cfg) => cfg,
        // Config::parse does not panic (the fuzz tests hold it to that);
        // should it, the panic belongs to the user, not to a lost error.
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    (cfg, Some(Prefetched { state_dir, ledger }))
}

/// Prints the status. Takes the configuration because the process ends
/// next (see the end).
pub(super) async fn run(
    cfg: Config,
    mode: Mode,
    prefetched: Option<Prefetched>,
) -> anyhow::Result<ExitCode> {
    let now = UnixTime::now();
    let ledger = match prefetched {
        Some(p) if p.state_dir == cfg.storage.state_dir => p.ledger?,
        _ => Ledger::read(&cfg.storage.state_dir, now).await?,
    };
    let rows: Vec<StatusRow> = cfg
        .certificates
        .iter()
        .map(|c| status_row(c, &ledger, now))
        .collect();
    let text = match mode {
        Mode::Json => {
            let mut text = serde_json::to_string_pretty(&rows)?;
            text.push('\n');
            text
        }
        Mode::Table => {
            let mut text = String::new();
            push_status_table(&mut text, &rows, now);
            push_pauses(&mut text, &ledger.pauses, &cfg);
            push_ari(&mut text, &rows);
            push_accounts(&mut text, &ledger.accounts);
            push_restart_needed(&mut text, ledger.restart_needed.as_deref());
            text
        }
        Mode::Check => return Ok(check(&cfg, &ledger, now)),
    };
    write_stdout_all(&text);
    // The process exits after this. Handing 10,000 certificates' worth of
    // small allocations back to the allocator one by one took a quarter of
    // the command's time; the kernel takes the memory back at once.
    std::mem::forget(rows);
    std::mem::forget((cfg, ledger, text));
    Ok(ExitCode::SUCCESS)
}

/// What `status` reads from the ledger: every certificate row, the pending
/// authorizations per certificate, and each account's reaper figures.
/// Empty when certd has never run.
pub(super) struct Ledger {
    certificates: HashMap<String, LedgerCert>,
    pending: HashMap<String, i64>,
    accounts: Vec<AccountStatus>,
    /// The edited settings the running daemon waits to restart for.
    restart_needed: Option<String>,
    /// The CA's rate limits in force, and its pauses, by scope.
    pauses: Vec<PauseRow>,
}

struct LedgerCert {
    row: CertificateRow,
    /// The names last installed or attempted, sorted, to compare with the
    /// configuration.
    domains: Vec<String>,
}

struct AccountStatus {
    url: String,
    directory: String,
    reaper: ReaperSummary,
}

impl Ledger {
    async fn read(state_dir: &Path, now: UnixTime) -> anyhow::Result<Self> {
        let path = state_dir.join(config::DB_FILE);
        if !path.exists() {
            return Ok(Self {
                certificates: HashMap::new(),
                pending: HashMap::new(),
                accounts: Vec::new(),
                restart_needed: None,
                pauses: Vec::new(),
            });
        }
        // Read-only: `sudo certd status` must not leave root's files.
        let store = Store::open_read_only(&path).await?;
        // The store has two connections: the big read and the small ones
        // run side by side.
        let read = tokio::try_join!(
            store.certificates(),
            store.pending_authz_by_cert(),
            accounts(&store, now),
            store.restart_needed(),
            store.pauses()
        );
        store.close().await;
        let (rows, pending, accounts, restart_needed, pauses) =
            read.with_context(|| format!("cannot read the ledger {}", path.display()))?;
        let certificates = rows
            .into_iter()
            .map(|row| {
                let mut domains = row.domain_list();
                domains.sort_unstable();
                (row.name.clone(), LedgerCert { row, domains })
            })
            .collect();
        Ok(Self {
            certificates,
            pending: pending.into_iter().collect(),
            accounts,
            restart_needed,
            // A limit that ran out holds nothing back; a pause holds until
            // an operator acts.
            pauses: pauses
                .into_iter()
                .filter(|p| p.paused || p.until_at > now.secs())
                .collect(),
        })
    }

    fn row(&self, name: &str) -> Option<&CertificateRow> {
        self.certificates.get(name).map(|c| &c.row)
    }
}

async fn accounts(store: &Store, now: UnixTime) -> crate::store::Result<Vec<AccountStatus>> {
    let mut out = Vec::new();
    for (id, directory, url) in store.accounts().await? {
        out.push(AccountStatus {
            url,
            directory,
            reaper: store.reaper_summary(id, now.secs()).await?,
        });
    }
    Ok(out)
}

/// One row of `certd status --json`; the keys are a public interface.
#[derive(Debug, Serialize)]
struct StatusRow<'a> {
    name: &'a str,
    domains: Vec<&'a str>,
    #[serde(serialize_with = "crate::clock::serialize_opt_rfc3339")]
    not_after: Option<i64>,
    serial: Option<&'a str>,
    #[serde(serialize_with = "crate::clock::serialize_opt_rfc3339")]
    last_attempt_at: Option<i64>,
    last_result: Option<&'a str>,
    last_error: Option<&'a str>,
    #[serde(serialize_with = "crate::clock::serialize_opt_rfc3339")]
    next_renewal_at: Option<i64>,
    pending_authz: i64,
    /// The ACME profile the installed certificate was ordered with.
    profile: Option<&'a str>,
    /// Why the last order did not get the first configured profile.
    profile_warning: Option<&'a str>,
    /// The CA's rate limit or pause holding this certificate back.
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_pause: Option<PauseStatus<'a>>,
    /// The CA's ARI window (RFC 9773) for the installed certificate.
    #[serde(serialize_with = "crate::clock::serialize_opt_rfc3339")]
    ari_window_start: Option<i64>,
    #[serde(serialize_with = "crate::clock::serialize_opt_rfc3339")]
    ari_window_end: Option<i64>,
    ari_explanation_url: Option<&'a str>,
    #[serde(serialize_with = "crate::clock::serialize_opt_rfc3339")]
    ari_checked_at: Option<i64>,
    #[serde(serialize_with = "crate::clock::serialize_opt_rfc3339")]
    ari_next_check: Option<i64>,
    /// Why the last ARI check failed; the window above still holds.
    ari_error: Option<&'a str>,
}

/// A CA rate limit in `status --json`.
#[derive(Debug, Serialize)]
struct PauseStatus<'a> {
    /// The CA paused the names: an operator unpauses them at `unpause_url`.
    paused: bool,
    /// Account-wide: every certificate waits.
    account: bool,
    #[serde(serialize_with = "crate::clock::serialize_opt_rfc3339")]
    retry_at: Option<i64>,
    unpause_url: Option<&'a str>,
    detail: &'a str,
}

/// What `status` shows for one configured certificate.
fn status_row<'a>(c: &'a CertificateConfig, ledger: &'a Ledger, now: UnixTime) -> StatusRow<'a> {
    let entry = ledger.certificates.get(c.name.as_str());
    let row = entry.map(|e| &e.row);
    let installed = row.and_then(|r| r.not_after).is_some();
    let domains_changed = entry.is_some_and(|e| {
        installed && {
            let mut configured: Vec<&str> = c.domains.iter().map(|d| d.as_str()).collect();
            configured.sort_unstable();
            !configured.iter().eq(e.domains.iter())
        }
    });
    // The ledger's next time holds while the installed certificate fits the
    // configuration, or while a failed attempt waits for its retry;
    // otherwise the certificate is due now.
    let failing = row.is_some_and(|r| r.last_result.as_deref() == Some("error"));
    // An ARI answer about a certificate no longer installed says nothing.
    let ari = row.filter(|r| r.ari_serial.is_some() && r.ari_serial == r.serial);
    let next = match row.and_then(|r| r.next_renewal_at) {
        Some(t) if installed && !domains_changed => t,
        Some(t) if failing && t > now.secs() => t,
        _ => now.secs(),
    };
    StatusRow {
        name: c.name.as_str(),
        domains: c.domains.iter().map(|d| d.as_str()).collect(),
        not_after: row.and_then(|r| r.not_after),
        serial: row.and_then(|r| r.serial.as_deref()),
        last_attempt_at: row.and_then(|r| r.last_attempt_at),
        last_result: row.and_then(|r| r.last_result.as_deref()),
        last_error: row.and_then(|r| r.last_error.as_deref()),
        next_renewal_at: Some(next),
        pending_authz: ledger.pending.get(c.name.as_str()).copied().unwrap_or(0),
        profile: row.and_then(|r| r.profile.as_deref()),
        profile_warning: row.and_then(|r| r.profile_warning.as_deref()),
        ca_pause: ledger
            .pauses
            .iter()
            .find(|p| p.scope == c.name.as_str())
            .or_else(|| ledger.pauses.iter().find(|p| p.scope == ACCOUNT_SCOPE))
            .map(|p| PauseStatus {
                paused: p.paused,
                account: p.scope == ACCOUNT_SCOPE,
                retry_at: Some(p.until_at),
                unpause_url: p.unpause_url.as_deref(),
                detail: &p.detail,
            }),
        ari_window_start: ari.and_then(|r| r.ari_window_start),
        ari_window_end: ari.and_then(|r| r.ari_window_end),
        ari_explanation_url: ari.and_then(|r| r.ari_explanation_url.as_deref()),
        ari_checked_at: ari.and_then(|r| r.ari_checked_at),
        ari_next_check: ari.and_then(|r| r.ari_next_check),
        ari_error: ari.and_then(|r| r.ari_error.as_deref()),
    }
}

/// The CA's pauses and rate limits in force, one line each: a pause lasts
/// until an operator unpauses the names (the line says where), and certd
/// looks again daily or at `certd renew NAME`.
fn push_pauses(out: &mut String, pauses: &[PauseRow], cfg: &Config) {
    use std::fmt::Write as _;
    // Writing to a String cannot fail; the results are ignored below.
    // A certificate no longer configured is no longer held back.
    let configured =
        |p: &&PauseRow| p.scope == ACCOUNT_SCOPE || cfg.certificate(&p.scope).is_some();
    for p in pauses.iter().filter(configured) {
        let who = if p.scope == ACCOUNT_SCOPE {
            "the account".to_owned()
        } else {
            escape_control(&p.scope).into_owned()
        };
        if p.paused {
            let _ = write!(out, "\n{who}: paused by the CA since {}", rfc3339(p.since));
            if let Some(url) = &p.unpause_url {
                let _ = write!(out, "; unpause at {}", escape_control(url));
            }
            let _ = writeln!(
                out,
                "\n  then `certd renew {who}`; until then certd retries once a day (next {})",
                rfc3339(p.until_at)
            );
        } else {
            let _ = writeln!(
                out,
                "\n{who}: rate limited by the CA until {}: {}",
                rfc3339(p.until_at),
                shorten(&escape_control(&p.detail), 200)
            );
        }
    }
}

/// Lines under the table for certificates with an ARI answer: the window,
/// the CA's explanation, and why the last check failed.
fn push_ari(out: &mut String, rows: &[StatusRow]) {
    for r in rows {
        let (window, error) = match (r.ari_window_start, r.ari_window_end, r.ari_error) {
            (Some(start), Some(end), error) => (
                format!("window {} to {}", rfc3339(start), rfc3339(end)),
                error,
            ),
            (_, _, Some(error)) => ("no window".to_owned(), Some(error)),
            _ => continue,
        };
        out.push_str(&format!("\nARI {}: {window}", r.name));
        if let Some(url) = r.ari_explanation_url {
            out.push_str(&format!(", explanation {}", escape_control(url)));
        }
        if let Some(at) = r.ari_next_check {
            out.push_str(&format!(", next check {}", rfc3339(at)));
        }
        if let Some(e) = error {
            out.push_str(&format!(
                "\n  last check failed: {}",
                shorten(&escape_control(e), 200)
            ));
        }
        out.push('\n');
    }
}

/// The table, one line per certificate. Every cell is written into one
/// buffer first, so 10,000 lines cost two allocations rather than 60,000.
fn push_status_table(out: &mut String, rows: &[StatusRow], now: UnixTime) {
    use std::fmt::Write as _;
    const HEADER: [&str; 6] = [
        "NAME",
        "DOMAINS",
        "EXPIRES",
        "LAST ATTEMPT",
        "NEXT RENEWAL",
        "PENDING",
    ];
    let mut cells = String::with_capacity(rows.len() * 128);
    let mut ends: Vec<[usize; 6]> = Vec::with_capacity(rows.len());
    for r in rows {
        let mut end = [0; 6];
        cells.push_str(r.name);
        end[0] = cells.len();
        for (i, d) in r.domains.iter().enumerate() {
            if i > 0 {
                cells.push(',');
            }
            cells.push_str(d);
        }
        end[1] = cells.len();
        match r.not_after {
            Some(t) => {
                push_rfc3339(&mut cells, t);
                // Writing to a String cannot fail.
                let _ = write!(cells, " ({}d)", (t - now.secs()).div_euclid(86_400));
            }
            None => cells.push_str("not installed"),
        }
        end[2] = cells.len();
        match r.last_attempt_at {
            Some(at) => {
                push_rfc3339(&mut cells, at);
                if r.last_result == Some("ok") {
                    cells.push_str(" ok");
                    if let Some(w) = r.profile_warning {
                        cells.push_str(", warning: ");
                        cells.push_str(&shorten(w, 100));
                    }
                } else {
                    // The table keeps errors to one screen line; --json and
                    // `status --check` carry them whole.
                    cells.push_str(" error: ");
                    cells.push_str(&shorten(r.last_error.unwrap_or("unknown"), 100));
                }
            }
            None => cells.push_str("never"),
        }
        end[3] = cells.len();
        match r.next_renewal_at {
            Some(t) if t > now.secs() => push_rfc3339(&mut cells, t),
            _ => cells.push_str("due now"),
        }
        end[4] = cells.len();
        let _ = write!(cells, "{}", r.pending_authz);
        end[5] = cells.len();
        ends.push(end);
    }
    let mut table: Vec<[&str; 6]> = Vec::with_capacity(rows.len() + 1);
    table.push(HEADER);
    let mut start = 0;
    for end in &ends {
        table.push(std::array::from_fn(|i| {
            let from = if i == 0 { start } else { end[i - 1] };
            &cells[from..end[i]]
        }));
        start = end[5];
    }
    push_table(out, &table);
}

/// The per-account part of the table: pending authorizations and what the
/// reaper and the guard did.
/// The line that says a configuration edit waits for a restart.
fn push_restart_needed(out: &mut String, keys: Option<&str>) {
    if let Some(keys) = keys {
        out.push_str(&format!("\nrestart needed: {keys}\n"));
    }
}

fn push_accounts(out: &mut String, accounts: &[AccountStatus]) {
    use std::fmt::Write as _;
    // Writing to a String cannot fail; the results are ignored below.
    for a in accounts {
        let r = &a.reaper;
        let _ = writeln!(
            out,
            "\naccount {} ({})",
            escape_control(&a.url),
            escape_control(&a.directory)
        );
        let _ = writeln!(out, "  pending authorizations: {}", r.pending);
        let _ = writeln!(
            out,
            "  reaper: deactivated {} (last 24 h: {}), held back for failure budget: {}",
            r.deactivated_total, r.deactivated_24h, r.held_back
        );
        let _ = match r.last_pass_at {
            Some(at) => writeln!(
                out,
                "  last reaper pass: {} ({})",
                rfc3339(at),
                escape_control(r.last_pass.as_deref().unwrap_or_default())
            ),
            None => writeln!(out, "  last reaper pass: never"),
        };
        if let Some((at, detail)) = &r.last_rate_limit {
            let _ = writeln!(
                out,
                "  CA rate limit at {}: {}",
                rfc3339(*at),
                escape_control(detail)
            );
        }
        if let Some(at) = r.last_guard_at {
            let _ = writeln!(
                out,
                "  pending-authz guard last deferred an order at {}",
                rfc3339(at)
            );
        }
    }
}

/// `status --check`: one summary line, worst first; the exit code is the
/// worst level.
fn check(cfg: &Config, ledger: &Ledger, now: UnixTime) -> ExitCode {
    let mut worst = Level::Ok;
    let mut problems = Vec::new();
    for c in &cfg.certificates {
        let (level, why) = assess(c, ledger.row(c.name.as_str()), now);
        worst = worst.max(level);
        problems.extend(why.map(|w| (level, w)));
    }
    // Worst first: the line a pager shows must lead with what matters.
    problems.sort_by_key(|p| std::cmp::Reverse(p.0));
    let summary = if problems.is_empty() {
        format!("{} certificate(s) valid", cfg.certificates.len())
    } else {
        problems
            .into_iter()
            .map(|(_, w)| w)
            .collect::<Vec<_>>()
            .join("; ")
    };
    // One line, whatever the CA put in an error: monitoring reads it.
    write_stdout_all(&format!("CERTD {worst}: {}\n", escape_control(&summary)));
    ExitCode::from(worst as u8)
}
