//! `certd status`: every configured certificate beside its ledger state, as
//! a table, as JSON, or as one monitoring line (`--check`).
//!
//! Built for a host with 10,000 certificates, where parsing the
//! configuration and reading the ledger each take tens of milliseconds: the
//! ledger is read while the configuration is parsed (`load`), SQLite hands
//! over all certificate rows as one JSON value, and the output is built in
//! memory and written once.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use serde::Serialize;

mod fleet;

use self::fleet::{FleetCertStatus, FleetView};
use super::output::shorten;
use crate::app::cas::next_ca;
use crate::app::sink::write_stdout_all;
use crate::clock::{Clock, UnixTime, rfc3339};
use crate::config::{self, CertificateConfig, Config, ConfigError};
use crate::health::{Level, assess};
use crate::ledger::{
    ACCOUNT_SCOPE, CaStateRow, CertificateRow, LastResult, Ledger, PauseRow, ReaperSummary,
};
use crate::text::escape_control;

/// What `certd status` prints.
#[derive(Debug, Clone, Copy)]
pub(super) enum Mode {
    Table,
    Json,
    Check,
    /// One block per certificate (`status NAME`, `status -v`).
    Detail,
}

/// The ledger as read ahead by `load`, with the state directory it was read
/// from.
pub(super) struct Prefetched {
    state_dir: PathBuf,
    ledger: anyhow::Result<LedgerView>,
}

/// Parses the configuration on a blocking thread while this one reads the
/// ledger named by the configuration's head (`config::peek_state_dir`).
/// `run` uses the ledger only if the parsed configuration names the same
/// state directory, and reads it again otherwise.
pub(super) async fn load(
    path: &Path,
    clock: &Clock,
) -> (Result<Config, ConfigError>, Option<Prefetched>) {
    let text = match Config::read(path) {
        Ok(text) => text,
        Err(e) => return (Err(e), None),
    };
    let Some(state_dir) = config::peek_state_dir(path, &text) else {
        return (Config::parse(path, &text), None);
    };
    let owned = path.to_owned();
    let parse = tokio::task::spawn_blocking(move || Config::parse(&owned, &text));
    let ledger = LedgerView::read(&state_dir, clock.now()).await;
    let cfg = match parse.await {
        Ok(cfg) => cfg,
        // Config::parse does not panic (the fuzz tests hold it to that);
        // should it, the panic belongs to the user, not to a lost error.
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    (cfg, Some(Prefetched { state_dir, ledger }))
}

/// Prints the status of the `names` certificates (all when empty). Takes
/// the configuration because the process ends next (see the end).
pub(super) async fn run(
    cfg: Config,
    clock: &Clock,
    mode: Mode,
    names: &[String],
    prefetched: Option<Prefetched>,
) -> anyhow::Result<ExitCode> {
    let now = clock.now();
    let ledger = match prefetched {
        Some(p) if p.state_dir == cfg.storage.state_dir => p.ledger,
        _ => LedgerView::read(&cfg.storage.state_dir, now).await,
    };
    let ledger = match (ledger, mode) {
        (Ok(ledger), _) => ledger,
        // Monitoring reads one line and the exit code, whatever happened.
        (Err(e), Mode::Check) => {
            return Ok(unknown(&format!(
                "cannot read the ledger: {}",
                crate::acme::error_chain(e.as_ref())
            )));
        }
        (Err(e), _) => return Err(e),
    };
    let selected: Vec<&CertificateConfig> = if names.is_empty() {
        cfg.certificates.iter().collect()
    } else {
        let mut selected = Vec::with_capacity(names.len());
        for name in names {
            match cfg.certificate(name) {
                Some(c) => selected.push(c),
                None => {
                    let why = format!("no certificate named {name:?} in {}", cfg.path.display());
                    if matches!(mode, Mode::Check) {
                        return Ok(unknown(&why));
                    }
                    eprintln!("certd: {}", escape_control(&why));
                    return Ok(ExitCode::from(2));
                }
            }
        }
        selected
    };
    // Fleet mode: who holds each lease, what each host installed.
    let fleet = match (&cfg.fleet, mode) {
        (Some(f), Mode::Table | Mode::Json | Mode::Detail) => {
            let names: Vec<String> = selected.iter().map(|c| c.name.to_string()).collect();
            Some(FleetView::read(&cfg, f, &names).await)
        }
        _ => None,
    };
    let rows: Vec<StatusRow> = selected
        .iter()
        .map(|c| StatusRow {
            fleet: fleet.as_ref().map(|f| f.cert(c.name.as_str())),
            ..status_row(c, &ledger, now)
        })
        .collect();
    let text = match mode {
        Mode::Json => {
            let mut text = serde_json::to_string_pretty(&rows)?;
            text.push('\n');
            text
        }
        Mode::Table => {
            let width = output_width();
            let mut text = String::new();
            push_ca_unreachable(&mut text, ledger.ca_unreachable.as_ref(), width);
            push_status_table(&mut text, &rows, now, width);
            if cfg.cas.len() > 1 {
                push_cas(&mut text, &rows, &ledger.ca_states);
            }
            push_pauses(&mut text, &ledger.pauses, &cfg);
            push_ari(&mut text, &rows);
            push_accounts(&mut text, &ledger.accounts, width);
            push_restart_needed(&mut text, ledger.restart_needed.as_deref());
            if let Some(fleet) = &fleet {
                let names: Vec<&str> = selected.iter().map(|c| c.name.as_str()).collect();
                fleet.push_table(&mut text, &names);
            }
            text
        }
        Mode::Detail => {
            let mut text = String::new();
            push_ca_unreachable(&mut text, ledger.ca_unreachable.as_ref(), usize::MAX);
            let events = recent_events(&cfg, &rows).await?;
            for ((c, r), events) in selected.iter().zip(&rows).zip(&events) {
                if !text.is_empty() {
                    text.push('\n');
                }
                push_detail_block(&mut text, &cfg, c, r, events, now);
            }
            if let Some(fleet) = &fleet {
                let names: Vec<&str> = selected.iter().map(|c| c.name.as_str()).collect();
                fleet.push_table(&mut text, &names);
            }
            text
        }
        Mode::Check => return Ok(check(&cfg, &selected, &ledger, now)),
    };
    write_stdout_all(&text);
    // The process exits after this. Handing 10,000 certificates' worth of
    // small allocations back to the allocator one by one took a quarter of
    // the command's time; the kernel takes the memory back at once.
    std::mem::forget(rows);
    std::mem::forget((cfg, ledger, text, fleet));
    Ok(ExitCode::SUCCESS)
}

/// `status --check` when it cannot judge (a bad configuration, an
/// unreadable ledger): Nagios's UNKNOWN, still one line.
pub(super) fn unknown(why: &str) -> ExitCode {
    write_stdout_all(&format!(
        "CERTD {}: {}\n",
        Level::Unknown,
        escape_control(why)
    ));
    ExitCode::from(Level::Unknown as u8)
}

/// The width `status` fits its table to: `COLUMNS` when set, else the
/// terminal's when standard output is one, else 80 (a pipe, a file, a
/// mail from cron), the width of the terminals and mails it ends up in.
fn output_width() -> usize {
    // NAME at 8 columns and the fixed columns.
    const NARROWEST: usize = 62;
    if let Some(n) = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
    {
        return n.max(NARROWEST);
    }
    if std::io::stdout().is_terminal() {
        // SAFETY: TIOCGWINSZ writes one `winsize` into the struct passed,
        // which lives across the call; the descriptor is stdout's.
        let mut size: libc::winsize = unsafe { std::mem::zeroed() };
        let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
        if ok && size.ws_col > 0 {
            return usize::from(size.ws_col).max(NARROWEST);
        }
    }
    80
}

/// What `status` reads from the ledger: every certificate row, the pending
/// authorizations per certificate, and each account's reaper figures.
/// Empty when certd has never run.
pub(super) struct LedgerView {
    certificates: HashMap<String, LedgerCert>,
    pending: HashMap<String, i64>,
    accounts: Vec<AccountStatus>,
    /// The edited settings the running daemon waits to restart for.
    restart_needed: Option<String>,
    /// The CA's rate limits in force, and its pauses, by scope.
    pauses: Vec<PauseRow>,
    /// Since when the daemon has not reached the CA, and why.
    ca_unreachable: Option<(i64, String)>,
    /// The CAs failing now, since when (fallback is measured from it).
    ca_states: Vec<CaStateRow>,
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

impl LedgerView {
    async fn read(state_dir: &Path, now: UnixTime) -> anyhow::Result<Self> {
        let path = state_dir.join(config::DB_FILE);
        if !path.exists() {
            return Ok(Self {
                certificates: HashMap::new(),
                pending: HashMap::new(),
                accounts: Vec::new(),
                restart_needed: None,
                pauses: Vec::new(),
                ca_unreachable: None,
                ca_states: Vec::new(),
            });
        }
        // Read-only: `sudo certd status` must not leave root's files.
        let store = Ledger::open_read_only(&path, crate::clock::Clock::system()).await?;
        // The store has two connections: the big read and the small ones
        // run side by side.
        let read = tokio::try_join!(
            store.certificates(),
            store.pending_authz_by_cert(),
            accounts(&store, now),
            store.restart_needed(),
            store.pauses(),
            store.ca_unreachable(),
            store.ca_states()
        );
        store.close().await;
        let (rows, pending, accounts, restart_needed, pauses, ca_unreachable, ca_states) =
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
            ca_unreachable,
            ca_states,
        })
    }

    fn row(&self, name: &str) -> Option<&CertificateRow> {
        self.certificates.get(name).map(|c| &c.row)
    }
}

async fn accounts(store: &Ledger, now: UnixTime) -> crate::ledger::Result<Vec<AccountStatus>> {
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
#[derive(Debug, Default, Serialize)]
struct StatusRow<'a> {
    name: &'a str,
    domains: Vec<&'a str>,
    #[serde(serialize_with = "crate::clock::serialize_opt_rfc3339")]
    not_after: Option<i64>,
    serial: Option<&'a str>,
    #[serde(serialize_with = "crate::clock::serialize_opt_rfc3339")]
    last_attempt_at: Option<i64>,
    last_result: Option<LastResult>,
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
    /// The CA (its configured name) that issued the installed certificate;
    /// null when none is installed, or certd does not know which.
    issuer_ca: Option<&'a str>,
    /// The CA the next renewal will try first.
    next_ca: Option<String>,
    /// Fleet mode: the lease and every host's install.
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet: Option<FleetCertStatus<'a>>,
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
fn status_row<'a>(
    c: &'a CertificateConfig,
    ledger: &'a LedgerView,
    now: UnixTime,
) -> StatusRow<'a> {
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
    let failing = row.is_some_and(|r| r.last_result == Some(LastResult::Error));
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
        last_result: row.and_then(|r| r.last_result),
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
        issuer_ca: row
            .filter(|_| installed)
            .and_then(|r| r.issuer_ca.as_deref()),
        next_ca: next_ca(
            c,
            row.and_then(|r| r.issuer_ca.as_deref()),
            row.and_then(|r| r.not_before.zip(r.not_after)),
            now,
        )
        .map(|n| n.to_string()),
        fleet: None,
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
    let mut first = true;
    for r in rows {
        let (window, error) = match (r.ari_window_start, r.ari_window_end, r.ari_error) {
            (Some(start), Some(end), error) => (
                format!("window {} to {}", rfc3339(start), rfc3339(end)),
                error,
            ),
            (_, _, Some(error)) => ("no window".to_owned(), Some(error)),
            _ => continue,
        };
        if std::mem::take(&mut first) {
            // One blank line before the block, as before each block.
            out.push('\n');
        }
        out.push_str(&format!("ARI {}: {window}", escape_control(r.name)));
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

/// The columns after NAME: (header, width). Times are UTC, to the minute.
const COLUMNS: [(&str, usize); 4] = [
    ("EXPIRES (UTC)", 16),
    ("NEXT RENEWAL (UTC)", 18),
    ("PENDING", 7),
    ("LAST", 5),
];
/// Blanks between columns.
const GAP: usize = 2;

/// The table: one line per certificate, fitted to `width`, and below a
/// certificate's line its details (`push_detail`), each on its own
/// indented line: the cause of a failure first, so a cut keeps it.
/// Written straight into `out`: 10,000 lines, no allocation per cell.
fn push_status_table(out: &mut String, rows: &[StatusRow], now: UnixTime, width: usize) {
    use std::fmt::Write as _;
    let fixed: usize = COLUMNS.iter().map(|(_, w)| w + GAP).sum();
    let longest = rows
        .iter()
        .map(|r| escape_control(r.name).chars().count())
        .max()
        .unwrap_or(0);
    let name_w = longest
        .max("NAME".len())
        .min(width.saturating_sub(fixed).max(8));
    let mut cell = String::with_capacity(64);
    let push_row = |out: &mut String, name: &str, cells: [&str; 4]| {
        let start = out.len();
        push_cell(out, name, name_w + GAP);
        for ((_, w), c) in COLUMNS.iter().zip(cells) {
            push_cell(out, c, w + GAP);
        }
        let kept = out[start..].trim_end().len();
        out.truncate(start + kept);
        out.push('\n');
    };
    push_row(out, "NAME", COLUMNS.map(|(h, _)| h));
    for r in rows {
        cell.clear();
        let expires = match r.not_after {
            Some(t) => {
                push_minute(&mut cell, t, false);
                // Writing to a String cannot fail.
                let _ = write!(cell, " ({}d)", (t - now.secs()).div_euclid(86_400));
                cell.len()
            }
            None => {
                cell.push_str("not installed");
                cell.len()
            }
        };
        match r.next_renewal_at {
            Some(t) if t > now.secs() => push_minute(&mut cell, t, true),
            _ => cell.push_str("due now"),
        }
        let next = cell.len();
        let _ = write!(cell, "{}", r.pending_authz);
        let pending = cell.len();
        let last = match (r.last_attempt_at, r.last_result) {
            (None, _) => "never",
            (Some(_), Some(LastResult::Ok)) => "ok",
            (Some(_), _) => "error",
        };
        push_row(
            out,
            &escape_control(r.name),
            [
                &cell[..expires],
                &cell[expires..next],
                &cell[next..pending],
                last,
            ],
        );
        if r.last_result == Some(LastResult::Error) {
            push_detail(out, "error", r.last_error.unwrap_or("unknown"), width);
        } else if let Some(w) = r.profile_warning {
            push_detail(out, "warning", w, width);
        }
    }
}

/// With several CAs: per certificate, the CA that issued it and the one
/// its next renewal tries first; then each CA failing to answer, since
/// when (after `ca_fallback_after` of it, renewals fall back).
fn push_cas(out: &mut String, rows: &[StatusRow], failing: &[CaStateRow]) {
    use std::fmt::Write as _;
    out.push_str("\nCA (issued by -> next renewal):\n");
    for r in rows {
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "  {}: {} -> {}",
            escape_control(r.name),
            escape_control(r.issuer_ca.unwrap_or("-")),
            escape_control(r.next_ca.as_deref().unwrap_or("-")),
        );
    }
    for s in failing {
        let _ = writeln!(
            out,
            "  CA {} failing since {}: {}",
            escape_control(&s.ca),
            rfc3339(s.failing_since),
            escape_control(&s.last_error),
        );
    }
}

/// `text` and the blanks that fill `width` columns; cut with an ellipsis
/// when longer, keeping a blank after it.
fn push_cell(out: &mut String, text: &str, width: usize) {
    let chars = text.chars().count();
    if chars + 1 > width && width > 1 {
        out.push_str(&shorten(text, width - 2));
        out.push(' ');
        if width > 2 {
            out.push(' ');
        }
        return;
    }
    out.push_str(text);
    out.extend(std::iter::repeat_n(' ', width.saturating_sub(chars)));
}

/// One detail line under a certificate's row, `  label: text`, escaped and
/// cut to `width`. Details that need more (a window, a pause) are lines
/// like this one.
///
/// A long text loses its middle: certd's own messages put the cause first,
/// but a hook's or a CA's may end with it ("dns-01 hook … present for …:
/// exited with status 1: DNS provider API unreachable"), and the start
/// says what failed.
pub(super) fn push_detail(out: &mut String, label: &str, text: &str, width: usize) {
    let head = format!("  {label}: ");
    let room = width.saturating_sub(head.chars().count());
    out.push_str(&head);
    out.push_str(&shorten_middle(&escape_control(text), room));
    out.push('\n');
}

/// `s` in at most `max` characters: its start and its end, with an
/// ellipsis for what was cut between them.
fn shorten_middle(s: &str, max: usize) -> Cow<'_, str> {
    let len = s.chars().count();
    if len <= max {
        return Cow::Borrowed(s);
    }
    let keep = max.saturating_sub(1);
    let head = keep / 2;
    let tail = keep - head;
    let mut out: String = s.chars().take(head).collect();
    out.push('…');
    out.extend(s.chars().skip(len - tail));
    Cow::Owned(out)
}

/// `YYYY-MM-DD` or `YYYY-MM-DD HH:MM` (UTC): the table's times.
fn push_minute(out: &mut String, secs: i64, with_time: bool) {
    let full = rfc3339(secs);
    match (full.get(..10), full.get(11..16)) {
        (Some(date), Some(time)) => {
            out.push_str(date);
            if with_time {
                out.push(' ');
                out.push_str(time);
            }
        }
        _ => out.push_str(&full),
    }
}

/// The line that says the daemon cannot reach the CA, above the table.
fn push_ca_unreachable(out: &mut String, since: Option<&(i64, String)>, width: usize) {
    if let Some((at, why)) = since {
        let line = format!(
            "CA unreachable since {}: {}",
            rfc3339(*at),
            escape_control(why)
        );
        out.push_str(&shorten(&line, width));
        out.push_str("\n\n");
    }
}

/// The events `status NAME` shows per certificate.
const DETAIL_EVENTS: i64 = 5;

/// What `status NAME` reads for one certificate beyond its row.
#[derive(Default)]
struct Recent {
    /// (at, kind, detail), newest first.
    events: Vec<(i64, crate::ledger::EventKind, Option<String>)>,
    /// (identifier, URL, created at), oldest first.
    pending: Vec<(String, String, i64)>,
}

/// Each row's latest events and pending authorizations; none when certd
/// never ran.
async fn recent_events(cfg: &Config, rows: &[StatusRow<'_>]) -> anyhow::Result<Vec<Recent>> {
    let path = cfg.db_path();
    if !path.exists() {
        return Ok(rows.iter().map(|_| Recent::default()).collect());
    }
    let store = Ledger::open(&path, crate::clock::Clock::system()).await?;
    let mut all = Vec::with_capacity(rows.len());
    for r in rows {
        all.push(Recent {
            events: store.cert_events(r.name, DETAIL_EVENTS).await?,
            pending: store.pending_authz_of(r.name).await?,
        });
    }
    store.close().await;
    Ok(all)
}

/// `status NAME`: everything about one certificate, one item a line and
/// nothing cut, as `certbot certificates` shows it.
fn push_detail_block(
    out: &mut String,
    cfg: &Config,
    c: &CertificateConfig,
    r: &StatusRow,
    recent: &Recent,
    now: UnixTime,
) {
    use std::fmt::Write as _;
    // Writing to a String cannot fail.
    let item = |out: &mut String, label: &str, value: &str| {
        let _ = writeln!(out, "  {label:<24}{}", escape_control(value));
    };
    let dir = cfg.storage.cert_dir.join(c.name.as_str());
    let issuer = installed_issuer(&dir.join("cert.pem"));
    let expires = match r.not_after {
        Some(t) => format!(
            "{} ({} days left)",
            rfc3339(t),
            (t - now.secs()).div_euclid(86_400)
        ),
        None => "not installed".into(),
    };
    let _ = writeln!(out, "Certificate: {}", escape_control(r.name));
    item(out, "Domains:", &c.domain_strings().join(", "));
    item(out, "Expires:", &expires);
    item(out, "Serial:", r.serial.unwrap_or("-"));
    item(out, "Issuer:", issuer.as_deref().unwrap_or("-"));
    if cfg.cas.len() > 1 {
        item(out, "Issuing CA:", r.issuer_ca.unwrap_or("-"));
        item(out, "Next CA:", r.next_ca.as_deref().unwrap_or("-"));
    }
    item(out, "Key type:", c.key_type.as_str());
    let profile = if c.profile.names.is_empty() {
        "(the CA's default)".to_owned()
    } else {
        let list = c.profile.names.join(", ");
        if c.profile.required {
            format!("{list} (required)")
        } else {
            list
        }
    };
    // Said only where the CA gave something else than the first choice.
    let profile = match r.profile {
        Some(ordered) if c.profile.names.first().map(String::as_str) != Some(ordered) => {
            format!("{profile}; the installed one was ordered as {ordered}")
        }
        _ => profile,
    };
    item(out, "Profile:", &profile);
    item(
        out,
        "Challenges:",
        &c.challenges
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(" > "),
    );
    item(
        out,
        "Renewal window:",
        &format!(
            "opens with {:.0}% of the lifetime left",
            cfg.daemon.renew_remaining * 100.0
        ),
    );
    item(
        out,
        "Next renewal:",
        &match r.next_renewal_at {
            Some(t) if t > now.secs() => rfc3339(t),
            _ => "due now".into(),
        },
    );
    item(
        out,
        "Last attempt:",
        &match (r.last_attempt_at, r.last_result) {
            (Some(at), Some(result)) => format!("{} {result}", rfc3339(at)),
            (Some(at), None) => rfc3339(at),
            (None, _) => "never".into(),
        },
    );
    if r.last_result == Some(LastResult::Error) {
        item(out, "Last error:", r.last_error.unwrap_or("unknown"));
    }
    item(out, "Pending authorizations:", &r.pending_authz.to_string());
    for (identifier, url, created) in &recent.pending {
        let _ = writeln!(
            out,
            "    {}  {}  {}",
            rfc3339(*created),
            escape_control(identifier),
            escape_control(url)
        );
    }
    for file in crate::install::FILES {
        let label = format!("{}:", file.trim_end_matches(".pem"));
        item(out, &label, &dir.join(file).display().to_string());
    }
    if recent.events.is_empty() {
        item(out, "Events:", "none");
    } else {
        let _ = writeln!(out, "  Events:");
        for (at, kind, detail) in &recent.events {
            let _ = writeln!(
                out,
                "    {}  {}{}",
                rfc3339(*at),
                escape_control(kind.as_str()),
                detail
                    .as_deref()
                    .map(|d| format!(": {}", escape_control(d)))
                    .unwrap_or_default()
            );
        }
    }
}

/// The installed certificate's issuer, as its distinguished name.
fn installed_issuer(pem: &Path) -> Option<String> {
    use rustls_pki_types::pem::PemObject as _;
    let der = rustls_pki_types::CertificateDer::pem_file_iter(pem)
        .ok()?
        .next()?
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(cert.issuer().to_string())
}

/// The line that says a configuration edit waits for a restart.
fn push_restart_needed(out: &mut String, keys: Option<&str>) {
    if let Some(keys) = keys {
        out.push_str(&format!("\nrestart needed: {}\n", escape_control(keys)));
    }
}

/// The per-account part of the table: pending authorizations and what the
/// reaper and the guard did, one item a line, each cut to `width`.
fn push_accounts(out: &mut String, accounts: &[AccountStatus], width: usize) {
    let mut line = |text: String| {
        out.push_str(&shorten(&escape_control(&text), width));
        out.push('\n');
    };
    for a in accounts {
        let r = &a.reaper;
        line(String::new());
        line(format!("account {}", a.url));
        line(format!("  directory: {}", a.directory));
        line(format!("  pending authorizations: {}", r.pending));
        line(format!(
            "  reaper: deactivated {} (last 24 h: {}), held back for failure budget: {}",
            r.deactivated_total, r.deactivated_24h, r.held_back
        ));
        match r.last_pass_at {
            Some(at) => {
                line(format!("  last reaper pass: {}", rfc3339(at)));
                if let Some(pass) = r.last_pass.as_deref() {
                    line(format!("    {pass}"));
                }
            }
            None => line("  last reaper pass: never".into()),
        }
        if let Some((at, detail)) = &r.last_rate_limit {
            line(format!("  CA rate limit at {}: {detail}", rfc3339(*at)));
        }
        if let Some(at) = r.last_guard_at {
            line(format!(
                "  pending-authz guard last deferred an order at {}",
                rfc3339(at)
            ));
        }
    }
}

/// `status --check`: one summary line, worst first; the exit code is the
/// worst level. `selected`: the certificates named, or all.
fn check(
    cfg: &Config,
    selected: &[&CertificateConfig],
    ledger: &LedgerView,
    now: UnixTime,
) -> ExitCode {
    if selected.is_empty() {
        write_stdout_all(&format!(
            "CERTD {}: no certificates configured in {}\n",
            Level::Warning,
            escape_control(&cfg.path.display().to_string())
        ));
        return ExitCode::from(Level::Warning as u8);
    }
    let mut worst = Level::Ok;
    let mut problems = Vec::new();
    if let Some((at, why)) = &ledger.ca_unreachable {
        worst = Level::Warning;
        problems.push((
            Level::Warning,
            format!("CA unreachable since {}: {why}", rfc3339(*at)),
        ));
    }
    for c in selected {
        let (level, why) = assess(c, ledger.row(c.name.as_str()), now);
        worst = worst.max(level);
        problems.extend(why.map(|w| (level, w)));
    }
    // Worst first: the line a pager shows must lead with what matters.
    problems.sort_by_key(|p| std::cmp::Reverse(p.0));
    let summary = if problems.is_empty() {
        format!("{} certificate(s) valid", selected.len())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA's message that ends in a newline, or holds an escape sequence,
    /// stays on its detail line; every line fits the width.
    #[test]
    fn errors_stay_on_one_line_and_fit() {
        let now = UnixTime::from_secs(1_800_000_000);
        let row = |name, error| StatusRow {
            name,
            domains: vec!["a.example"],
            not_after: Some(now.secs() + 10 * 86_400),
            serial: None,
            last_attempt_at: Some(now.secs()),
            last_result: Some(LastResult::Error),
            last_error: Some(error),
            next_renewal_at: Some(now.secs() + 3600),
            pending_authz: 1,
            ..StatusRow::default()
        };
        let rows = [
            row("www", "the CA answered: rateLimited\n"),
            row("name-longer-than-its-column-allows", "\x1b[2Jboom"),
        ];
        let mut out = String::new();
        push_status_table(&mut out, &rows, now, 62);
        assert!(out.lines().all(|l| l.chars().count() <= 62), "{out}");
        assert_eq!(
            out,
            "\
NAME      EXPIRES (UTC)     NEXT RENEWAL (UTC)  PENDING  LAST
www       2027-01-25 (10d)  2027-01-15 09:00    1        error
  error: the CA answered: rateLimited\\n
name-lo…  2027-01-25 (10d)  2027-01-15 09:00    1        error
  error: \\x1b[2Jboom
"
        );
    }
}
