//! The command line: argument parsing, the one-shot commands, and exit
//! codes. This is the edge of the program, so `anyhow` is used here and
//! nowhere below.
//!
//! Exit codes: 0 success, 1 a certificate (or authorization) operation
//! failed, 2 the configuration, the command line or `RUST_LOG` is wrong, or
//! the ledger cannot be used (corrupt, unwritable, locked by another certd,
//! deleted under the daemon). `status --check` is a Nagios plugin instead:
//! 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (it could not judge), and always
//! one line on stdout.
//!
//! Commands that write the ledger (`renew`, `reap`, `revoke`,
//! `authz deactivate`, `account rollover`) hand their work to a running
//! daemon through its control socket (`crate::daemon::control`) and print its
//! output; without a daemon they take the state directory's lock, check
//! the ledger's integrity and run themselves. Reading commands (`status`,
//! `authz list`, `account show`, `check-config`) open the ledger read-only
//! and create nothing, so running them as another user (`sudo`) leaves no
//! file certd's own user cannot write. Run as root against a state
//! directory another user owns, a writing command refuses and says how to
//! run it as that user.
//!
//! Every human-readable output (tables, messages, log lines) passes text
//! through `escape_control`: much of it comes from the CA (problem details,
//! identifiers, URLs), and a CA must not be able to forge a line of
//! `status --check` or of the log, or drive the terminal with escape
//! sequences. JSON outputs are exact; serde escapes them.

use std::borrow::Cow;
use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use rustls_pki_types::pem::PemObject;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod man;
mod persist;
mod polkit;
mod status;

use crate::acme::ari::{self, AriError, Window};
use crate::acme::raw::{Fetched, fetch_authz, fetch_unknown};
use crate::acme::{AcmeAccount, AcmeError, AcmeHttp, credentials_path, error_chain};
use crate::clock::{UnixTime, rfc3339};
use crate::config::{CertificateConfig, ChallengeKind, Config, DEFAULT_CONFIG_PATH};
use crate::daemon::control::Sink;
use crate::daemon::schedule::{self, Due, Reason};
use crate::hygiene::{Policy, Reaper, Settled};
use crate::install;
use crate::ledger::{EventKind, FileIdentity, Ledger, LedgerError, OrderRow, StateLock};
use crate::order::{self, Context};
use crate::solver::Solvers;

/// `println!` that ends the process quietly when standard output is a
/// closed pipe (`certd status | head -1`), as Unix tools do, and escapes
/// control characters: one call, one line.
macro_rules! outln {
    ($($arg:tt)*) => {
        write_stdout(&format!($($arg)*))
    };
}

/// `eprintln!` with control characters escaped: one call, one line.
macro_rules! errln {
    ($($arg:tt)*) => {
        eprintln!("{}", escape_control(&format!($($arg)*)))
    };
}

fn write_stdout(line: &str) {
    write_stdout_all(&format!("{}\n", escape_control(line)));
}

/// One line to standard output, escaped (for `control::Sink`).
pub(crate) fn print_line(line: &str) {
    write_stdout(line);
}

/// `s` with its control characters escaped (`\n`, `\x1b`, `\u{202e}`),
/// for terminals and line-based logs; borrowed when there are none.
pub(crate) fn escape_control(s: &str) -> Cow<'_, str> {
    // Printable ASCII, nearly always: a byte scan (`status` runs this on
    // every cell of 10,000 rows).
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) || !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    // Writing to a String cannot fail.
    let _ = fmt::Write::write_str(&mut EscapeControl(&mut out), s);
    Cow::Owned(out)
}

/// C0 and C1 controls and DEL (a terminal acts on them; a newline forges a
/// line), and the bidirectional overrides that make text read other than
/// it is.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A `fmt::Write` that escapes control characters on their way to `W`.
struct EscapeControl<W>(W);

impl<W: fmt::Write> fmt::Write for EscapeControl<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some((i, c)) = rest.char_indices().find(|(_, c)| needs_escape(*c)) {
            self.0.write_str(&rest[..i])?;
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c if u32::from(c) < 0x100 => write!(self.0, "\\x{:02x}", u32::from(c))?,
                c => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
            }
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// The text log's field formatter: the default's layout (`message`, then
/// `name=value`), with control characters escaped. Values logged with `%`
/// are written with their `Display`, raw, by the default formatter; a CA's
/// problem detail with a newline would forge a second log line.
struct EscapedFields;

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for EscapedFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> fmt::Result {
        let mut visitor = EscapedVisitor {
            out: EscapeControl(writer),
            separate: false,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapedVisitor<W> {
    out: EscapeControl<W>,
    separate: bool,
    result: fmt::Result,
}

impl<W: fmt::Write> tracing::field::Visit for EscapedVisitor<W> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        // As the default: a message as written, other strings quoted.
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        use fmt::Write as _;
        if self.result.is_err() {
            return;
        }
        let sep = if self.separate { " " } else { "" };
        self.separate = true;
        self.result = match field.name() {
            "message" => write!(self.out, "{sep}{value:?}"),
            name => write!(
                self.out,
                "{sep}{}={value:?}",
                name.strip_prefix("r#").unwrap_or(name)
            ),
        };
    }
}

/// Writes `text` to stdout in one go. A closed pipe (`certd status | head`)
/// ends the process quietly, as it does for other Unix tools.
fn write_stdout_all(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush())
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

/// How many orders a one-shot `renew` runs at once.
const RENEW_CONCURRENCY: usize = 4;

#[derive(Debug, Parser)]
#[command(
    name = "certd",
    version,
    about = "Certificate renewal daemon for ACME CAs"
)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, short = 'c', env = "CERTD_CONFIG", default_value = DEFAULT_CONFIG_PATH, global = true)]
    pub config: PathBuf,

    /// Log line format (logs go to standard error).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run as a daemon: renew on schedule, reap, reload on change (systemd).
    Run,
    /// Obtain or renew the certificates that are due, then exit.
    Renew {
        /// Only these certificates (default: all configured).
        names: Vec<String>,
        /// Renew even if not due.
        #[arg(long)]
        force: bool,
        /// Test the setup: run the whole flow against the CA's staging
        /// directory where one is known (Let's Encrypt), else against the
        /// configured CA, and discard the certificate. Nothing is
        /// installed or reloaded.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show every configured certificate and its ledger state; with NAMEs
    /// or -v, everything about each.
    Status {
        /// Only these certificates, each as a block (files, issuer, last
        /// error in full, events).
        names: Vec<String>,
        /// Every certificate as a block, as for NAMEs.
        #[arg(long, short = 'v')]
        verbose: bool,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// Monitoring check (Nagios plugin convention): one line; exit 0 OK,
        /// 1 WARNING (a renewal failing in its window, none configured),
        /// 2 CRITICAL (expired, missing, or failing with a sixth of the
        /// lifetime left), 3 UNKNOWN (bad configuration, unreadable ledger).
        #[arg(long, conflicts_with_all = ["json", "verbose"])]
        check: bool,
    },
    /// Inspect the authorization ledger.
    Authz {
        #[command(subcommand)]
        command: AuthzCommand,
    },
    /// Validate the configuration file and summarize it.
    CheckConfig,
    /// The ACME account: show it, or roll its key over.
    Account {
        #[command(subcommand)]
        command: AccountCommand,
    },
    /// dns-persist-01: the standing TXT records to publish once.
    DnsPersist {
        #[command(subcommand)]
        command: DnsPersistCommand,
    },
    /// Revoke a certificate's installed copy, then obtain a new one.
    Revoke {
        /// The certificate's name.
        name: String,
        /// The reason given to the CA (RFC 5280).
        #[arg(long, value_enum, default_value_t = RevokeReason::Unspecified)]
        reason: RevokeReason,
        /// Do not obtain a replacement now (the daemon does at its next look).
        #[arg(long)]
        no_renew: bool,
    },
    /// Print the polkit rule that lets the certd user reload UNITs (default:
    /// the units of the reload commands' `systemctl reload` and
    /// `systemctl reload-or-try-restart`), and nothing else.
    PolkitRule {
        /// Units to allow (`nginx` means `nginx.service`).
        units: Vec<String>,
        /// The user certd runs as.
        #[arg(long, default_value = "certd")]
        user: String,
    },
    /// Write the man pages and shell completions into DIR (packaging).
    #[command(hide = true)]
    GenerateAssets {
        /// Output directory; `man/` and `completions/` are created in it.
        dir: PathBuf,
    },
    /// Run one reaper pass now: settle stale pending authorizations.
    Reap {
        /// Treat pending authorizations older than this as stale
        /// (default: reaper.pending_max_age), e.g. "0s", "30m".
        #[arg(long, value_parser = parse_duration_arg)]
        older_than: Option<Duration>,
        /// Ask the CA and print what would be done; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s)
}

#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Print the account: directory, URL, key thumbprint, credentials file.
    Show,
    /// Replace the account key (RFC 8555 §7.3.5); the old key stays in use
    /// until the CA confirms the change.
    Rollover,
}

#[derive(Debug, Subcommand)]
pub enum DnsPersistCommand {
    /// Print the `_validation-persist` TXT records a certificate needs.
    Show {
        /// The certificate's name.
        name: String,
    },
}

/// Revocation reasons (RFC 5280 §5.3.1) an ACME CA accepts.
#[derive(Debug, Clone, Copy, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevokeReason {
    Unspecified,
    KeyCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
}

impl RevokeReason {
    fn acme(self) -> instant_acme::RevocationReason {
        use instant_acme::RevocationReason as R;
        match self {
            Self::Unspecified => R::Unspecified,
            Self::KeyCompromise => R::KeyCompromise,
            Self::AffiliationChanged => R::AffiliationChanged,
            Self::Superseded => R::Superseded,
            Self::CessationOfOperation => R::CessationOfOperation,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum AuthzCommand {
    /// List the authorizations certd has created.
    List {
        /// Only those still pending.
        #[arg(long)]
        pending: bool,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Deactivate authorizations, named by authorization or challenge URL.
    Deactivate {
        /// Authorization URLs, or challenge URLs (resolved to their authorization).
        #[arg(required_unless_present = "all_pending")]
        urls: Vec<String>,
        /// Every authorization the ledger holds as pending.
        #[arg(long, conflicts_with = "urls")]
        all_pending: bool,
        /// Also deactivate valid authorizations (free at the CA).
        #[arg(long)]
        include_valid: bool,
        /// Deactivate even beyond the per-name failure budget (Let's Encrypt
        /// counts a pending deactivation as a failed validation).
        #[arg(long)]
        ignore_budget: bool,
    },
}

/// Entry point for `main`: parses arguments, runs the command, and maps the
/// outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before anything opens a file: the listeners size their connection
    // limits from what is in force.
    crate::tinyhttp::raise_fd_limit();
    // Whatever umask certd was started with (`umask 000`), nothing it or
    // SQLite creates is writable by group or others; certd's own files get
    // their exact modes on their descriptors besides.
    // SAFETY: umask takes no pointers and cannot fail.
    unsafe {
        let old = libc::umask(0o022);
        libc::umask(old | 0o022);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("certd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            errln!("certd: {}", error_chain(e.as_ref()));
            // Like a configuration error: nothing will work until fixed.
            let ledger_unusable = e.chain().any(|cause| {
                cause
                    .downcast_ref::<LedgerError>()
                    .is_some_and(LedgerError::is_fatal)
            });
            if ledger_unusable
                || e.downcast_ref::<UnsafeDir>().is_some()
                || e.downcast_ref::<WrongUser>().is_some()
                || e.downcast_ref::<ForeignFile>().is_some()
            {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

impl Command {
    /// Whether the command writes the ledger (or the account key), and so
    /// must hold the state directory's lock.
    fn writes_ledger(&self) -> bool {
        match self {
            Command::Run
            | Command::Renew { .. }
            | Command::Revoke { .. }
            | Command::Authz {
                command: AuthzCommand::Deactivate { .. },
            }
            | Command::Account {
                command: AccountCommand::Rollover,
            } => true,
            Command::Reap { dry_run, .. } => !dry_run,
            Command::GenerateAssets { .. }
            | Command::PolkitRule { .. }
            | Command::CheckConfig
            | Command::Status { .. }
            | Command::Authz {
                command: AuthzCommand::List { .. },
            }
            | Command::Account {
                command: AccountCommand::Show,
            }
            | Command::DnsPersist { .. } => false,
        }
    }
}

impl Command {
    /// The request that hands this command to a running daemon, for the
    /// commands a daemon runs for its clients.
    fn control_request(&self) -> Option<crate::daemon::control::Request> {
        use crate::daemon::control::Request;
        Some(match self {
            // A dry run discards what it obtains; the daemon's scheduler has
            // no such mode, so it runs in its own process.
            Command::Renew {
                names,
                force,
                dry_run: false,
            } => Request::Renew {
                names: names.clone(),
                force: *force,
            },
            Command::Revoke {
                name,
                reason,
                no_renew,
            } => Request::Revoke {
                name: name.clone(),
                reason: *reason,
                no_renew: *no_renew,
            },
            Command::Reap {
                older_than,
                dry_run: false,
            } => Request::Reap {
                older_than_secs: older_than.map(|d| d.as_secs()),
            },
            Command::Authz {
                command:
                    AuthzCommand::Deactivate {
                        urls,
                        all_pending,
                        include_valid,
                        ignore_budget,
                    },
            } => Request::Deactivate {
                urls: urls.clone(),
                all_pending: *all_pending,
                include_valid: *include_valid,
                ignore_budget: *ignore_budget,
            },
            Command::Account {
                command: AccountCommand::Rollover,
            } => Request::Rollover,
            _ => return None,
        })
    }
}

/// Runs a command a client handed to the daemon over its control socket,
/// with the daemon's own parts; returns the exit code.
pub(crate) async fn run_for_client(
    request: crate::daemon::control::Request,
    handles: &crate::daemon::control::Handles,
    sink: &Sink,
) -> u8 {
    use crate::daemon::control::Request;
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
            reap_pass(reaper, older_than, false, sink).await
        }
        Request::Deactivate {
            urls,
            all_pending,
            include_valid,
            ignore_budget,
        } => {
            deactivate(
                &handles.ctx.store,
                reaper,
                urls,
                all_pending,
                Policy {
                    include_valid,
                    ignore_budget,
                    ..Policy::by(crate::ledger::Actor::Cli)
                },
                sink,
            )
            .await
        }
        Request::Rollover => Ok(rollover(&handles.ctx.account, &cfg, sink).await),
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
    handles: &crate::daemon::control::Handles,
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

/// `certd revoke` in the daemon: revoked with the daemon's account, then
/// replaced at once by its scheduler.
async fn revoke_in_daemon(
    handles: &crate::daemon::control::Handles,
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
    let ctx = &handles.ctx;
    if !revoke_installed(&ctx.cert_dir, name, reason, &ctx.store, &ctx.account, sink).await? {
        return Ok(1);
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

/// Logs go to standard error, one line per event; `RUST_LOG` overrides the
/// configured level.
///
/// `RUST_LOG` takes `target=level` directives (`certd=debug,warn`), read by
/// `Targets`: the same syntax as `EnvFilter` without span and field
/// filters, and without the regex engine those need, a quarter of a MiB
/// of code in every running daemon. A `RUST_LOG` that does not parse, or
/// names a level that does not exist, is an error: a daemon that silently
/// logs less than asked for hides what the operator is looking for.
fn init_logging(format: LogFormat, level: &str) -> Result<(), String> {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => parse_rust_log(&spec)?,
        _ => format!("certd={level},warn")
            .parse::<Targets>()
            // The configuration only admits the five level names.
            .unwrap_or_default(),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // journald stamps every line itself.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let registry = tracing_subscriber::registry().with(filter);
    match (format, journald) {
        (LogFormat::Json, _) => registry.with(fmt.json()).init(),
        (LogFormat::Text, true) => registry
            .with(fmt.fmt_fields(EscapedFields).without_time())
            .init(),
        (LogFormat::Text, false) => registry.with(fmt.fmt_fields(EscapedFields)).init(),
    }
    Ok(())
}

/// The levels `RUST_LOG` may name.
const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// `RUST_LOG` as `Targets`. `Targets` takes a bare word that is no level
/// (`RUST_LOG=verbose`) for a target with every level, which turns all of
/// certd's own logging off: only levels, `certd` and module paths
/// (`certd::order`) stand alone here.
fn parse_rust_log(spec: &str) -> Result<tracing_subscriber::filter::Targets, String> {
    let bad = |why: String| {
        format!(
            "RUST_LOG={spec:?}: {why}; use target=level directives, e.g. \
             RUST_LOG=certd=debug,warn (levels: {})",
            LOG_LEVELS.join(", ")
        )
    };
    for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        match directive.split_once('=') {
            Some((_, level))
                if !LOG_LEVELS.contains(&level.trim().to_ascii_lowercase().as_str()) =>
            {
                return Err(bad(format!("{:?} is not a level", level.trim())));
            }
            None if !LOG_LEVELS.contains(&directive.to_ascii_lowercase().as_str())
                && directive != "certd"
                && !directive.contains("::") =>
            {
                return Err(bad(format!(
                    "{directive:?} is neither a level nor target=level"
                )));
            }
            _ => {}
        }
    }
    spec.parse().map_err(|e| bad(format!("{e}")))
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::GenerateAssets { dir } = &cli.command {
        generate_assets(dir)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::PolkitRule { units, user } = &cli.command
        && !units.is_empty()
    {
        return Ok(polkit_rule(
            user,
            units.iter().map(|u| polkit::UnitName::parse(u)),
        ));
    }
    let (cfg, prefetched) = match cli.command {
        Command::Status { .. } => status::load(&cli.config).await,
        _ => (Config::load(&cli.config), None),
    };
    let checking = matches!(cli.command, Command::Status { check: true, .. });
    let cfg = match cfg {
        Ok(cfg) => cfg,
        Err(e) if checking => return Ok(status::unknown(&e.to_string())),
        Err(e) => {
            // The operator's own file: its messages (with a TOML
            // excerpt) keep their lines.
            eprintln!("certd: {e}");
            if let Some(hint) = unreadable_config_hint(&cli.config) {
                errln!("certd: {hint}");
            }
            return Ok(ExitCode::from(2));
        }
    };
    if let Err(e) = init_logging(cli.log_format, &cfg.daemon.log_level) {
        if checking {
            return Ok(status::unknown(&e));
        }
        errln!("certd: {e}");
        return Ok(ExitCode::from(2));
    }
    if let Some(request) = cli.command.control_request()
        && let Some(code) =
            crate::daemon::control::forward(&cfg.storage.state_dir, &request).await?
    {
        return Ok(code);
    }
    // Held until the command ends; the kernel drops it if certd dies.
    let _lock = if cli.command.writes_ledger() {
        let create = matches!(cli.command, Command::Run);
        Some(claim_ledger(&cfg, create).await?)
    } else {
        None
    };
    let db_path = cfg.db_path();
    run_command(cli.command, cfg, prefetched)
        .await
        .map_err(|e| crate::ledger::explain(&db_path, e))
}

/// Runs `command` with its configuration, the ledger's lock held;
/// `prefetched` is the ledger `status` read while the file was parsed.
async fn run_command(
    command: Command,
    cfg: Config,
    prefetched: Option<status::Prefetched>,
) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run => run_daemon(cfg).await,
        // Handled above, before a configuration is needed.
        Command::GenerateAssets { .. } => Ok(ExitCode::SUCCESS),
        Command::PolkitRule { user, .. } => Ok(polkit_rule(
            &user,
            polkit::units_from_config(&cfg).into_iter().map(Ok),
        )),
        Command::CheckConfig => Ok(check_config(&cfg)),
        Command::Renew {
            names,
            force,
            dry_run,
        } => renew(cfg, &names, force, dry_run).await,
        Command::Status {
            names,
            verbose,
            json,
            check,
        } => {
            let mode = match (json, check, verbose || !names.is_empty()) {
                (_, true, _) => status::Mode::Check,
                (true, false, _) => status::Mode::Json,
                (false, false, true) => status::Mode::Detail,
                (false, false, false) => status::Mode::Table,
            };
            status::run(cfg, mode, &names, prefetched).await
        }
        Command::Authz {
            command: AuthzCommand::List { pending, json },
        } => authz_list(&cfg, pending, json).await,
        Command::Authz {
            command:
                AuthzCommand::Deactivate {
                    urls,
                    all_pending,
                    include_valid,
                    ignore_budget,
                },
        } => authz_deactivate(&cfg, urls, all_pending, include_valid, ignore_budget).await,
        Command::Reap {
            older_than,
            dry_run,
        } => reap(&cfg, older_than, dry_run).await,
        Command::Account {
            command: AccountCommand::Show,
        } => account_show(&cfg).await,
        Command::Account {
            command: AccountCommand::Rollover,
        } => account_rollover(&cfg).await,
        Command::DnsPersist {
            command: DnsPersistCommand::Show { name },
        } => persist::show(&cfg, &name).await,
        Command::Revoke {
            name,
            reason,
            no_renew,
        } => revoke(cfg, &name, reason, no_renew).await,
    }
}

/// When the configuration is there but this user may not read it (the
/// packaged file is 0640 root:certd): how to run the command as certd's
/// user instead.
fn unreadable_config_hint(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let e = std::fs::File::open(path).err()?;
    if e.kind() != std::io::ErrorKind::PermissionDenied {
        return None;
    }
    let meta = std::fs::metadata(path).ok()?;
    // The file's group is certd's in the package; its owner is root.
    let user = group_name(meta.gid()).filter(|g| g != "root")?;
    Some(format!(
        "{} is readable only by root and group {user}: run: {}",
        path.display(),
        as_user_suggestion(&user)
    ))
}

/// The name of group `gid`, from the group database.
fn group_name(gid: u32) -> Option<String> {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: an all-zero group is a valid value of this plain C struct
    // (null pointers, zero id); getgrgid_r fills it.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is to a live local of the stated size;
    // getgrgid_r writes only within `buf` and `grp`.
    let rc = unsafe {
        libc::getgrgid_r(
            gid,
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() || grp.gr_name.is_null() {
        return None;
    }
    // SAFETY: on success gr_name points to a NUL-terminated string in `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(grp.gr_name) };
    name.to_str().ok().map(str::to_owned)
}

/// Man pages (one per command, `certd(1)` with exit status, signals and
/// files, and `certd.toml(5)`) and bash, zsh and fish completions, all
/// generated from the clap definitions and the annotated example
/// configuration so they cannot drift from the code.
fn generate_assets(dir: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man).context("writing man pages")?;
    man::write_pages(cmd.clone(), &man).context("writing certd(1) and certd.toml(5)")?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "certd", &completions)
            .with_context(|| format!("writing {shell} completions"))?;
    }
    Ok(())
}

/// Takes the state directory's lock, then checks the ledger (when there is
/// one, or when `create` asks for it): a writer refuses a ledger in use by
/// another certd, a corrupt one, or one it cannot write, before it starts.
async fn claim_ledger(cfg: &Config, create: bool) -> anyhow::Result<StateLock> {
    ensure_dirs(cfg)?;
    check_state_files(&cfg.storage.state_dir)?;
    let lock = StateLock::acquire(&cfg.storage.state_dir)?;
    let db = cfg.db_path();
    if create || db.exists() {
        Ledger::open_checked(&db, crate::clock::Clock::system())
            .await?
            .close()
            .await;
    }
    Ok(lock)
}

async fn run_daemon(cfg: Config) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    let shutdown = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
        trigger.cancel();
    });
    let db = cfg.db_path();
    let identity = FileIdentity::of(&db).with_context(|| format!("ledger {}", db.display()))?;
    let watcher = tokio::spawn(watch_ledger(db, identity, shutdown.clone()));
    let result = crate::daemon::run(cfg, shutdown).await;
    watcher.abort();
    if let Ok(Some(gone)) = watcher.await {
        return Err(gone.into());
    }
    result?;
    Ok(ExitCode::SUCCESS)
}

/// Stops the daemon (by `shutdown`) when its ledger file is deleted or
/// replaced, and returns why: SQLite would otherwise go on writing to an
/// unlinked file, and everything learnt since would be lost at the next
/// start. inotify on the state directory, so an idle daemon never wakes
/// for it.
async fn watch_ledger(
    path: PathBuf,
    identity: FileIdentity,
    shutdown: CancellationToken,
) -> Option<LedgerError> {
    use notify::Watcher as _;
    let dir = path.parent().unwrap_or(Path::new(".")).to_owned();
    let name = path.file_name().map(ToOwned::to_owned);
    let (tx, mut changed) = mpsc::channel::<()>(4);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && event.paths.iter().any(|p| p.file_name() == name.as_deref())
        {
            // A full channel already means "look again".
            let _ = tx.try_send(());
        }
    })
    .and_then(|mut w| {
        w.watch(&dir, notify::RecursiveMode::NonRecursive)
            .map(|()| w)
    });
    let _watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the state directory: a deleted ledger goes unnoticed until the next start");
            return None;
        }
    };
    // The file may have gone before the watch began.
    loop {
        if let Err(gone) = identity.check(&path) {
            tracing::error!(error = %gone, "the ledger is gone; stopping");
            shutdown.cancel();
            return Some(gone);
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            Some(()) = changed.recv() => {}
        }
    }
}

fn check_config(cfg: &Config) -> ExitCode {
    outln!(
        "{}: OK, {} certificate(s)",
        cfg.path.display(),
        cfg.certificates.len()
    );
    for c in &cfg.certificates {
        outln!("{}", describe(c));
    }
    ExitCode::SUCCESS
}

fn describe(c: &CertificateConfig) -> String {
    let challenges: Vec<&str> = c.challenges.iter().map(|k| k.as_str()).collect();
    format!(
        "{}: {} ({}, {})",
        c.name,
        c.domain_strings().join(", "),
        c.key_type.as_str(),
        challenges.join(" > ")
    )
}

fn polkit_rule(
    user: &str,
    units: impl Iterator<Item = Result<polkit::UnitName, String>>,
) -> ExitCode {
    match units.collect::<Result<Vec<_>, _>>() {
        Ok(units) => {
            if units.is_empty() {
                eprintln!(
                    "certd: no `systemctl reload UNIT` in the reload commands: the rule allows nothing"
                );
            }
            write_stdout_all(&polkit::rule(user, &units));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("certd: {e}");
            ExitCode::from(2)
        }
    }
}

/// A state or certificate directory certd must not use: another user owns
/// it, or others can write to it and so plant or swap files in it (a key
/// for `reuse_key`, a symlink where a certificate goes).
#[derive(Debug, thiserror::Error)]
#[error("{key} {path} {problem}; certd refuses to run until this is fixed")]
pub struct UnsafeDir {
    key: &'static str,
    path: PathBuf,
    problem: String,
}

/// A command run as root against directories certd's own user owns: what
/// it created would be root's, and the daemon, running as that user, could
/// no longer write it ("attempt to write a readonly database").
#[derive(Debug, thiserror::Error)]
#[error(
    "{key} {path} belongs to {who}, and this command runs as root: files it created there would be root's, and certd running as {who} could not write them. run: {suggestion}",
    who = user_label(*owner),
    suggestion = as_owner_suggestion(*owner)
)]
pub struct WrongUser {
    key: &'static str,
    path: PathBuf,
    owner: u32,
}

/// `certd`'s user by name and uid, `uid 65534` when it has no name.
fn user_label(uid: u32) -> String {
    match user_name(uid) {
        Some(name) => format!("user {name} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// The login name of `uid`, from the password database.
fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: an all-zero passwd is a valid value of this plain C struct
    // (null pointers, zero ids); getpwuid_r fills it.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is to a live local of the stated size;
    // getpwuid_r writes only within `buf` and `pwd`.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() || pwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points to a NUL-terminated string in `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    name.to_str().ok().map(str::to_owned)
}

/// This command line, run as `uid`: `sudo -u certd certd …` (`#65534` for
/// a user without a name, as sudo takes it).
pub(crate) fn as_owner_suggestion(uid: u32) -> String {
    as_user_suggestion(&user_name(uid).unwrap_or_else(|| format!("'#{uid}'")))
}

/// This command line, run as `user` through sudo.
fn as_user_suggestion(user: &str) -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+".contains(c))
            {
                a
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect();
    format!("sudo -u {user} certd {}", args.join(" "))
}

/// A file in the state directory certd's user does not own, left by a
/// command run as another user: SQLite would only say "attempt to write a
/// readonly database", naming neither the file nor its owner.
#[derive(Debug, thiserror::Error)]
#[error(
    "{path} is owned by {owner}, not by the user certd runs as ({me}): certd cannot write it. \
     Fix: chown {me_name} {path}",
    owner = user_label(*owner),
    me = user_label(*me),
    path = path.display()
)]
pub struct ForeignFile {
    path: PathBuf,
    owner: u32,
    me: u32,
    me_name: String,
}

/// Refuses a state directory holding a file of certd's that another user
/// owns (root reads and writes them all, so only other users are checked).
fn check_state_files(state_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let me = install::euid();
    if me == 0 {
        return Ok(());
    }
    let entries = std::fs::read_dir(state_dir)
        .with_context(|| format!("state_dir {}", state_dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("state_dir {}", state_dir.display()))?;
        // certd's own files only: the ledger and its companions, the lock,
        // the account keys, the control socket.
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with("certd.")
            || name.starts_with("account-")
            || name == crate::daemon::control::SOCKET_FILE)
        {
            continue;
        }
        let meta = entry
            .metadata()
            .with_context(|| format!("{}", entry.path().display()))?;
        if meta.uid() != me {
            return Err(ForeignFile {
                path: entry.path(),
                owner: meta.uid(),
                me,
                me_name: user_name(me).unwrap_or_else(|| me.to_string()),
            }
            .into());
        }
    }
    Ok(())
}

/// Creates the state and certificate directories (0700 and 0755, whatever
/// the umask) and checks that certd's user owns them and that neither
/// group nor others can write to them.
pub(crate) fn ensure_dirs(cfg: &Config) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    for (key, dir, mode) in [
        ("state_dir", &cfg.storage.state_dir, 0o700),
        ("cert_dir", &cfg.storage.cert_dir, 0o755),
    ] {
        if !dir.exists() {
            install::ensure_own_dir(dir, mode)
                .with_context(|| format!("cannot create {key} {}", dir.display()))?;
        }
        let meta = std::fs::metadata(dir).with_context(|| format!("{key} {}", dir.display()))?;
        let unsafe_dir = |problem: String| UnsafeDir {
            key,
            path: dir.clone(),
            problem,
        };
        let me = install::euid();
        if me == 0 && meta.uid() != 0 {
            return Err(WrongUser {
                key,
                path: dir.clone(),
                owner: meta.uid(),
            }
            .into());
        }
        if meta.uid() != me {
            return Err(unsafe_dir(format!(
                "is owned by uid {}, not by certd's user (uid {me}): fix with `chown {me} {}`",
                meta.uid(),
                dir.display()
            ))
            .into());
        }
        if meta.mode() & 0o022 != 0 {
            return Err(unsafe_dir(format!(
                "is writable by group or others (mode {:04o}): fix with `chmod go-w {}`",
                meta.mode() & 0o7777,
                dir.display()
            ))
            .into());
        }
    }
    Ok(())
}

async fn renew(
    mut cfg: Config,
    names: &[String],
    force: bool,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    if let Some(unknown) = names.iter().find(|n| cfg.certificate(n).is_none()) {
        errln!(
            "certd: no certificate named {unknown:?} in {}",
            cfg.path.display()
        );
        return Ok(ExitCode::from(2));
    }
    let now = UnixTime::now();
    let existing = open_existing(&cfg).await?;
    let mut due = Vec::new();
    // Made on the first ARI question: nothing installed, nothing to ask.
    let mut http: Option<AcmeHttp> = None;
    for c in cfg
        .certificates
        .iter()
        .filter(|c| names.is_empty() || names.iter().any(|n| n == c.name.as_str()))
    {
        let installed = install::installed(&cfg.storage.cert_dir, c.name.as_str());
        let (revoked, ordered_profile) = match &existing {
            Some(s) => (
                s.revoked_serial(c.name.as_str()).await?,
                s.profile_wanted(c.name.as_str()).await?,
            ),
            None => (None, None),
        };
        let mut verdict = schedule::due(
            c,
            installed.as_ref(),
            revoked.as_deref(),
            ordered_profile.as_deref(),
            now,
            cfg.daemon.renew_remaining,
        );
        // Where the CA offers an ARI window, the window decides, as in
        // the daemon: due once it has started. A forced run need not ask.
        if let (Due::Now(Reason::RenewalWindow) | Due::At(_), Some(info), false) =
            (&verdict, &installed, force)
        {
            if http.is_none() {
                http = Some(AcmeHttp::new(cfg.acme.ca_bundle.as_deref())?);
            }
            if let Some(http) = &http
                && let Some(window) = ari_window(&cfg, http, existing.as_ref(), c, info).await
            {
                verdict = if now.secs() >= window.start {
                    tracing::info!(
                        cert = %c.name,
                        window_start = %UnixTime::from_secs(window.start).rfc3339(),
                        explanation = window.explanation_url.as_deref().unwrap_or("none given"),
                        "the CA's ARI window has started"
                    );
                    Due::Now(Reason::AriWindow)
                } else {
                    Due::At(UnixTime::from_secs(window.start))
                };
            }
        }
        match verdict {
            Due::Now(reason) => due.push((c.clone(), reason)),
            Due::At(_) if force || dry_run => due.push((c.clone(), Reason::Forced)),
            // An operator who names a certificate the CA paused (after
            // unpausing it) wants it tried now, not at the daemon's daily look.
            Due::At(_) if !names.is_empty() && paused(existing.as_ref(), c).await? => {
                due.push((c.clone(), Reason::Forced))
            }
            Due::At(at) => outln!("{}: valid, not due until {}", c.name, at.rfc3339()),
        }
    }
    if due.is_empty() {
        if let Some(s) = existing {
            s.close().await;
        }
        return Ok(ExitCode::SUCCESS);
    }

    ensure_dirs(&cfg)?;
    let mode = if dry_run {
        if let Some(staging) = staging_directory(&cfg.acme.directory) {
            cfg.acme.directory = staging;
        }
        outln!(
            "dry run against {}: certificates are issued and discarded; nothing is installed, nothing reloaded",
            cfg.acme.directory
        );
        order::RunMode::DryRun
    } else {
        order::RunMode::Once
    };
    let store = match existing {
        Some(s) => s,
        None => Ledger::open(&cfg.db_path(), crate::clock::Clock::system()).await?,
    };
    let result = renew_due(&cfg, &store, due, mode).await;
    store.close().await;
    result
}

/// The staging directory of a CA whose production directory is `url`, for
/// `renew --dry-run`: staging has its own limits and its own account (the
/// credentials are per directory URL).
fn staging_directory(url: &reqwest::Url) -> Option<reqwest::Url> {
    const KNOWN: [(&str, &str); 1] = [(
        "https://acme-v02.api.letsencrypt.org/directory",
        "https://acme-staging-v02.api.letsencrypt.org/directory",
    )];
    let (_, staging) = KNOWN.iter().find(|(prod, _)| *prod == url.as_str())?;
    reqwest::Url::parse(staging).ok()
}

/// The CA's ARI window for `info` (RFC 9773). The ledger's answer for
/// the same certificate stands until its re-check time (the CA's
/// `Retry-After`, at most `[daemon] ari_interval`), so a timer running
/// `certd renew` often does not ask more often than the daemon would.
/// A new answer is recorded; a failed check is reported and recorded, and
/// leaves the last good window (if any) in charge.
async fn ari_window(
    cfg: &Config,
    http: &AcmeHttp,
    store: Option<&Ledger>,
    c: &CertificateConfig,
    info: &crate::install::CertInfo,
) -> Option<Window> {
    let now = UnixTime::now();
    let name = c.name.as_str();
    let row = match store {
        Some(s) => s.certificate(name).await.ok().flatten(),
        None => None,
    };
    let recorded = row.filter(|r| r.ari_serial.as_deref() == Some(info.serial.as_str()));
    let recorded_window = recorded.as_ref().and_then(|r| {
        Some(Window {
            start: r.ari_window_start?,
            end: r.ari_window_end?,
            explanation_url: r.ari_explanation_url.clone(),
        })
    });
    if recorded
        .as_ref()
        .and_then(|r| r.ari_next_check)
        .is_some_and(|t| t > now.secs())
    {
        return recorded_window;
    }
    let answer = ari::renewal_info(
        http.plain(),
        cfg.acme.directory.as_str(),
        info.ari_id.as_deref(),
    )
    .await;
    let interval = cfg.daemon.ari_interval;
    let (window, next_check, error) = match answer {
        Ok(a) => {
            let next = now.plus(schedule::ari_recheck_delay(a.retry_after, interval));
            (Some(a.window), next, None)
        }
        Err(AriError::Unsupported) => return None,
        Err(e) => {
            errln!("certd: {name}: {e}");
            let next = now.plus(schedule::ari_error_delay(&e, 1, interval));
            (None, next, Some(e.to_string()))
        }
    };
    if let Some(store) = store {
        let record = crate::ledger::AriRecord {
            window: window.as_ref().map(|w| crate::ledger::AriWindow {
                start: w.start,
                end: w.end,
                explanation_url: w.explanation_url.as_deref(),
            }),
            next_check: Some(next_check.secs()),
            error: error.as_deref(),
        };
        let _ = store.record_ari(name, &info.serial, &record).await;
    }
    window.or(recorded_window)
}

async fn renew_due(
    cfg: &Config,
    store: &Ledger,
    due: Vec<(CertificateConfig, Reason)>,
    mode: order::RunMode,
) -> anyhow::Result<ExitCode> {
    let dry_run = mode == order::RunMode::DryRun;
    // Consecutive failures before this run, for notifications.
    let mut failures_before = std::collections::HashMap::new();
    for (c, _) in &due {
        let n = store.certificate(c.name.as_str()).await?.map_or(0, |r| {
            u32::try_from(r.consecutive_failures).unwrap_or(u32::MAX)
        });
        failures_before.insert(c.name.to_string(), n);
    }
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let setup = async {
        let http = AcmeHttp::new(cfg.acme.ca_bundle.as_deref())?;
        let account =
            AcmeAccount::load_or_create(&cfg.acme, &cfg.storage.state_dir, store, http).await?;
        let needed: Vec<ChallengeKind> =
            due.iter().flat_map(|(c, _)| c.challenges.clone()).collect();
        let solvers = Solvers::from_config(cfg, &needed, &tracker, &cancel).await?;
        let reaper = Reaper::new(store.clone(), account.clone(), cfg.reaper.clone());
        // Orders a crashed run left behind: resume those whose certificate
        // still wants the same names, abandon the rest.
        order::recover(&reaper, |o| wants_same_names(cfg, o)).await?;
        anyhow::Ok(Context {
            store: store.clone(),
            account,
            solvers,
            reaper,
            cert_dir: Arc::from(cfg.storage.cert_dir.as_path()),
            renew_remaining: cfg.daemon.renew_remaining,
            trusted_roots: cfg.acme.trusted_roots.clone(),
            mode,
        })
    };
    let ctx = match setup.await {
        Ok(ctx) => ctx,
        Err(e) => {
            // Nothing was ordered; record why for `status` and fail.
            let msg = error_chain(e.as_ref());
            for (c, reason) in &due {
                if dry_run {
                    outln!("{}: dry run failed: {msg}", c.name);
                    continue;
                }
                record_failed(cfg, store, c, *reason, &msg, &failures_before, None).await?;
            }
            return Ok(ExitCode::FAILURE);
        }
    };

    let limit = Arc::new(Semaphore::new(RENEW_CONCURRENCY));
    let mut jobs = JoinSet::new();
    for (c, reason) in due {
        let ctx = ctx.clone();
        let cancel = cancel.clone();
        let limit = limit.clone();
        jobs.spawn(async move {
            // The semaphore is never closed, so acquire cannot fail.
            let _permit = limit.acquire_owned().await;
            tracing::info!(cert = %c.name, reason = %reason, "renewing");
            let result = order::obtain(&ctx, &c, &cancel).await;
            (c, reason, result)
        });
    }

    let mut failed = 0;
    loop {
        let joined = tokio::select! {
            joined = jobs.join_next() => joined,
            // Ctrl-C: let the drivers abandon their orders cleanly.
            _ = tokio::signal::ctrl_c(), if !cancel.is_cancelled() => {
                cancel.cancel();
                continue;
            }
        };
        let Some(joined) = joined else { break };
        let (c, reason, result) = joined.context("a renewal task panicked")?;
        match result {
            Ok(issued) if dry_run => outln!(
                "{}: dry run: issued serial {} valid until {}, discarded; nothing installed, nothing reloaded",
                c.name,
                issued.info.serial,
                rfc3339(issued.info.not_after)
            ),
            Err(e) if dry_run => {
                failed += 1;
                outln!("{}: dry run failed: {}", c.name, error_chain(&e));
            }
            Ok(issued) => {
                store.clear_pause(c.name.as_str()).await?;
                store.clear_pause(crate::ledger::ACCOUNT_SCOPE).await?;
                let outcome = crate::alerts::Outcome::Succeeded {
                    previous_failures: failures_before.get(c.name.as_str()).copied().unwrap_or(0),
                    not_after: issued.info.not_after,
                };
                crate::alerts::after_renewal(
                    cfg.notify.as_ref(),
                    store,
                    c.name.as_str(),
                    &c.domain_strings(),
                    outcome,
                )
                .await;
                let reload_failed = issued.reloads.iter().filter(|r| !r.ok).count();
                outln!(
                    "{}: issued serial {} valid until {}{}",
                    c.name,
                    issued.info.serial,
                    rfc3339(issued.info.not_after),
                    if reload_failed > 0 {
                        format!(", but {reload_failed} reload command(s) failed")
                    } else {
                        String::new()
                    }
                );
                if reload_failed > 0 {
                    failed += 1;
                }
            }
            Err(e) => {
                failed += 1;
                let msg = error_chain(&e);
                let held = match schedule::rate_limit_of(&e) {
                    Some((limit, retry_after)) => {
                        let held = schedule::record_limit(
                            store,
                            c.name.as_str(),
                            &limit,
                            retry_after,
                            &msg,
                        )
                        .await;
                        Some((limit, held))
                    }
                    None => None,
                };
                let held = held.as_ref().map(|(l, h)| (l, h));
                record_failed(cfg, store, &c, reason, &msg, &failures_before, held).await?;
            }
        }
    }
    // Per endpoint and outcome, for benchmarks and curious operators.
    let requests: Vec<String> = ctx
        .account
        .http
        .request_counts()
        .into_iter()
        .map(|((endpoint, outcome), n)| format!("{endpoint}:{outcome}={n}"))
        .collect();
    tracing::debug!(requests = %requests.join(" "), "ACME requests of this run");
    // A one-shot run from cron is the only hygiene some hosts get.
    let counts = ctx
        .reaper
        .pass(cfg.reaper.pending_max_age, false, false, |_, _| {})
        .await?;
    if counts.deactivated + counts.held_back > 0 {
        outln!(
            "reaper: deactivated {} stale pending authorization(s), held back {}",
            counts.deactivated,
            counts.held_back
        );
    }
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    Ok(if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Records a failed renewal of a one-shot run: ledger, notification, output.
async fn record_failed(
    cfg: &Config,
    store: &Ledger,
    c: &CertificateConfig,
    reason: Reason,
    msg: &str,
    failures_before: &std::collections::HashMap<String, u32>,
    limit: Option<(&crate::acme::RateLimit, &schedule::HeldBack)>,
) -> anyhow::Result<()> {
    let name = c.name.as_str();
    // A one-shot run schedules no retry: a certificate that was due is due
    // again now (or when the CA's limit ends); a forced one keeps its
    // renewal time.
    let next = match limit {
        Some((_, held)) => Some(held.until.secs()),
        None => (reason != Reason::Forced).then(|| UnixTime::now().secs()),
    };
    store
        .record_failure(name, &c.domain_strings(), msg, next)
        .await?;
    let failures = failures_before.get(name).copied().unwrap_or(0) + 1;
    let news = limit.is_some_and(|(_, held)| held.news);
    if let Some(outcome) =
        crate::alerts::failure_outcome(failures, msg, limit.map(|(l, _)| l), news)
    {
        crate::alerts::after_renewal(
            cfg.notify.as_ref(),
            store,
            name,
            &c.domain_strings(),
            outcome,
        )
        .await;
    }
    outln!("{name}: failed: {msg}");
    if let Some((l, _)) = limit.filter(|(l, _)| l.paused) {
        match &l.unpause_url {
            Some(url) => outln!(
                "{name}: paused by the CA; unpause at {}, then run `certd renew {name}`",
                escape_control(url)
            ),
            None => outln!("{name}: paused by the CA; once unpaused, run `certd renew {name}`"),
        }
    }
    Ok(())
}

/// Whether the ledger records a CA pause for `c`.
async fn paused(store: Option<&Ledger>, c: &CertificateConfig) -> anyhow::Result<bool> {
    let Some(store) = store else {
        return Ok(false);
    };
    Ok(store
        .pause(c.name.as_str())
        .await?
        .is_some_and(|p| p.paused))
}

/// Whether an unfinished order is still wanted: its certificate is
/// configured with exactly the order's names.
pub(crate) fn wants_same_names(cfg: &Config, order: &OrderRow) -> bool {
    cfg.certificate(&order.cert_name)
        .is_some_and(|c| crate::ledger::Identifiers::new(c.domain_strings()) == order.identifiers)
}

/// Loads the account and its reaper for commands that act on the ledger's
/// authorizations; `None` when certd has no account yet (nothing to act on).
async fn existing_account(cfg: &Config, store: &Ledger) -> anyhow::Result<Option<Reaper>> {
    let directory = cfg.acme.directory.to_string();
    if !credentials_path(&cfg.storage.state_dir, &directory).exists() {
        return Ok(None);
    }
    let http = AcmeHttp::new(cfg.acme.ca_bundle.as_deref())?;
    let account =
        AcmeAccount::load_or_create(&cfg.acme, &cfg.storage.state_dir, store, http).await?;
    Ok(Some(Reaper::new(
        store.clone(),
        account,
        cfg.reaper.clone(),
    )))
}

async fn reap(
    cfg: &Config,
    older_than: Option<Duration>,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
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
        let (resumable, abandoned) = order::recover(&reaper, |o| wants_same_names(cfg, o)).await?;
        if resumable + abandoned > 0 {
            outln!("recovered {resumable} unfinished order(s) to resume, abandoned {abandoned}");
        }
    }
    let older_than = older_than.unwrap_or(cfg.reaper.pending_max_age);
    let code = reap_pass(&reaper, older_than, dry_run, &Sink::Terminal).await;
    store.close().await;
    Ok(ExitCode::from(code?))
}

/// One explicit reaper pass, a line per authorization and a summary; the
/// exit code. The daemon runs it for `certd reap` with its own reaper.
async fn reap_pass(
    reaper: &Reaper,
    older_than: Duration,
    dry_run: bool,
    sink: &Sink,
) -> anyhow::Result<u8> {
    let counts = reaper
        .pass(older_than, dry_run, true, |row, outcome| {
            sink.out(&format!(
                "{}  {}  {}",
                describe_settled(outcome),
                row.url,
                row.identifier
            ));
        })
        .await?;
    sink.out(&format!(
        "{}examined {}, {} {}, held back {}, no longer pending {}, failed {}",
        if dry_run { "dry run: " } else { "" },
        counts.examined,
        if dry_run {
            "would deactivate"
        } else {
            "deactivated"
        },
        counts.deactivated,
        counts.held_back,
        counts.resolved,
        counts.failed
    ));
    Ok(u8::from(counts.failed > 0))
}

fn describe_settled(s: &Settled) -> String {
    match s {
        Settled::Deactivated { from } => format!("deactivated (was {from})"),
        Settled::WouldDeactivate { from } => format!("would deactivate (is {from})"),
        Settled::HeldBack { failures, limit } => format!(
            "held back ({failures} failed authorizations for this name in the last hour, limit {limit})"
        ),
        Settled::NotPending(status) => format!("already {status}"),
        Settled::Refused { status } => format!("not deactivated: the CA's answer says {status}"),
        Settled::SkippedValid => "valid, not deactivated (use --include-valid)".into(),
        Settled::Expired => "expired".into(),
        Settled::Gone => "gone (the CA no longer knows it)".into(),
        Settled::Failed(e) => format!("error: {e}"),
    }
}

async fn authz_deactivate(
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
    ensure_dirs(cfg)?;
    let store = Ledger::open(&cfg.db_path(), crate::clock::Clock::system()).await?;
    let Some(reaper) = existing_account(cfg, &store).await? else {
        errln!(
            "certd: no ACME account for {} in {}: certd created no authorizations there",
            cfg.acme.directory,
            cfg.storage.state_dir.display()
        );
        return Ok(ExitCode::FAILURE);
    };
    let policy = Policy {
        include_valid,
        ignore_budget,
        ..Policy::by(crate::ledger::Actor::Cli)
    };
    let code = deactivate(&store, &reaper, urls, all_pending, policy, &Sink::Terminal).await;
    store.close().await;
    Ok(ExitCode::from(code?))
}

/// Deactivates the authorizations `urls` name (or every pending one), a
/// line each; the exit code. The daemon runs it for
/// `certd authz deactivate` with its own reaper.
async fn deactivate(
    store: &Ledger,
    reaper: &Reaper,
    urls: Vec<String>,
    all_pending: bool,
    policy: Policy,
    sink: &Sink,
) -> anyhow::Result<u8> {
    if urls.is_empty() && !all_pending {
        sink.err("certd: name authorization or challenge URLs, or use --all-pending");
        return Ok(2);
    }
    let account = reaper.account();
    let targets = if all_pending {
        store.pending_urls(account.ledger_id).await?
    } else {
        urls
    };
    let mut failed = 0;
    for url in targets {
        let (authz_url, identifier) = match resolve_authz(store, account, &url).await {
            Ok(found) => found,
            Err(why) => {
                failed += 1;
                sink.out(&format!("{url}: cannot resolve: {why}"));
                continue;
            }
        };
        let outcome = reaper.settle(&authz_url, &identifier, policy).await?;
        let via = if authz_url == url {
            String::new()
        } else {
            format!(" (authorization {authz_url})")
        };
        if !outcome.is_done() {
            failed += 1;
        }
        sink.out(&format!(
            "{url}{via}: {identifier}: {}",
            describe_settled(&outcome)
        ));
    }
    Ok(u8::from(failed > 0))
}

/// Finds the authorization a URL names: an authorization in the ledger, a
/// challenge in the ledger (seed 000: logs often hold only those), or else
/// whatever the CA says the URL is, following a challenge's
/// `Link: rel="up"` to its authorization.
async fn resolve_authz(
    store: &Ledger,
    account: &AcmeAccount,
    url: &str,
) -> Result<(String, String), String> {
    let ledger = |e: crate::ledger::LedgerError| e.to_string();
    if let Some(a) = store.authz(url).await.map_err(ledger)? {
        return Ok((a.url, a.identifier));
    }
    if let Some(parent) = store.authz_of_challenge(url).await.map_err(ledger)? {
        let a = store
            .authz(&parent)
            .await
            .map_err(ledger)?
            .ok_or("the ledger names a parent authorization it does not hold")?;
        return Ok((a.url, a.identifier));
    }
    let (authz_url, a) = match fetch_unknown(&account.http, &account.signer(), url).await {
        Ok(Fetched::Authz(a)) => (url.to_owned(), a),
        Ok(Fetched::Other { up: Some(up) }) => {
            let a = fetch_authz(&account.http, &account.signer(), &up)
                .await
                .map_err(|e| format!("{up}: {e}"))?;
            (up, a)
        }
        Ok(Fetched::Other { up: None }) => {
            return Err(
                "not in the ledger, and the CA answers with something that is neither an authorization nor a challenge with a Link rel=\"up\" to one".into(),
            );
        }
        Err(e) => return Err(format!("not in the ledger, and the CA says: {e}")),
    };
    let identifier = a.identifier();
    let status = a
        .status
        .parse::<crate::ledger::AuthzStatus>()
        .map_err(|e| format!("{authz_url}: {e}"))?;
    store
        .record_foreign_authz(account.ledger_id, &authz_url, &identifier, status)
        .await
        .map_err(ledger)?;
    Ok((authz_url, identifier))
}

/// Opens the ledger and loads the existing account, or explains why not.
async fn account_session(cfg: &Config) -> anyhow::Result<Option<(Ledger, AcmeAccount)>> {
    ensure_dirs(cfg)?;
    let store = Ledger::open(&cfg.db_path(), crate::clock::Clock::system()).await?;
    match existing_account(cfg, &store).await? {
        Some(reaper) => Ok(Some((store, reaper.account().clone()))),
        None => {
            errln!(
                "certd: no ACME account for {} in {} yet (`certd renew` creates it)",
                cfg.acme.directory,
                cfg.storage.state_dir.display()
            );
            store.close().await;
            Ok(None)
        }
    }
}

/// Reads the account from its credentials file only: no ledger, no CA, and
/// nothing created (a reading command, see the module's doc).
async fn account_show(cfg: &Config) -> anyhow::Result<ExitCode> {
    let directory = cfg.acme.directory.to_string();
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
        if cfg.acme.contact.is_empty() {
            "(none)".to_owned()
        } else {
            cfg.acme.contact.join(", ")
        }
    );
    if let Some(eab) = &cfg.acme.eab {
        outln!("eab kid:     {}", eab.kid);
    }
    Ok(ExitCode::SUCCESS)
}

async fn account_rollover(cfg: &Config) -> anyhow::Result<ExitCode> {
    let Some((store, account)) = account_session(cfg).await? else {
        return Ok(ExitCode::FAILURE);
    };
    let code = rollover(&account, cfg, &Sink::Terminal).await;
    store.close().await;
    Ok(ExitCode::from(code))
}

/// Rolls the account key over; the exit code. In the daemon `account` is
/// the one every order and reaper pass uses, and it switches to the new
/// key as the CA confirms it.
async fn rollover(account: &AcmeAccount, cfg: &Config, sink: &Sink) -> u8 {
    match crate::acme::roll_over_account(account, &cfg.storage.state_dir).await {
        Ok(thumbprint) => {
            sink.out(&format!(
                "account key replaced; new thumbprint {thumbprint}"
            ));
            0
        }
        Err(e) => {
            sink.err(&format!(
                "certd: key rollover failed, the old key stays in use: {}",
                error_chain(&e)
            ));
            1
        }
    }
}

async fn revoke(
    cfg: Config,
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
    let Some((store, account)) = account_session(&cfg).await? else {
        return Ok(ExitCode::FAILURE);
    };
    let revoked = revoke_installed(
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
    renew(cfg, &[name.to_owned()], false, false).await
}

/// Revokes the certificate installed for `name` and records it; false
/// (with a line saying why) when there is none or the CA refuses.
async fn revoke_installed(
    cert_dir: &Path,
    name: &str,
    reason: RevokeReason,
    store: &Ledger,
    account: &AcmeAccount,
    sink: &Sink,
) -> anyhow::Result<bool> {
    let pem_path = cert_dir.join(name).join("cert.pem");
    let der = match rustls_pki_types::CertificateDer::pem_file_iter(&pem_path)
        .ok()
        .and_then(|mut certs| certs.next())
    {
        Some(Ok(der)) => der,
        _ => {
            sink.err(&format!(
                "certd: {}: no installed certificate to revoke",
                pem_path.display()
            ));
            return Ok(false);
        }
    };
    let info = install::CertInfo::parse(&der).map_err(anyhow::Error::msg)?;
    let request = instant_acme::RevocationRequest {
        certificate: &der,
        reason: Some(reason.acme()),
    };
    let acme = account.account();
    if let Err(e) = crate::acme::with_nonce_retry(|| acme.revoke(&request)).await {
        let e = AcmeError::from(e);
        sink.err(&format!(
            "certd: {name}: the CA refused the revocation of serial {}: {e}",
            info.serial
        ));
        return Ok(false);
    }
    let reason_name = format!("{reason:?}");
    store
        .record_revoked(name, &info.serial, &reason_name)
        .await?;
    store
        .event(
            EventKind::Revoked,
            Some(name),
            None,
            None,
            Some(&format!("serial {} ({reason_name})", info.serial)),
        )
        .await?;
    sink.out(&format!("{name}: revoked serial {}", info.serial));
    Ok(true)
}

/// Opens the ledger for reading commands; `None` if certd never ran.
async fn open_existing(cfg: &Config) -> anyhow::Result<Option<Ledger>> {
    let path = cfg.db_path();
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(
        Ledger::open(&path, crate::clock::Clock::system()).await?,
    ))
}

async fn authz_list(cfg: &Config, pending_only: bool, json: bool) -> anyhow::Result<ExitCode> {
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
        write_stdout_all(&format!("{}\n", serde_json::to_string_pretty(&rows)?));
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

/// `s` cut to `max` characters, with an ellipsis when cut.
fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut cut: String = s.chars().take(max - 1).collect();
    cut.push('…');
    cut
}

/// Prints rows as left-aligned columns; the last column is not padded.
fn print_table<const N: usize>(rows: &[[String; N]]) {
    let mut out = String::new();
    push_table(&mut out, rows);
    write_stdout_all(&out);
}

/// Appends rows as left-aligned columns to `out`, one line each, every cell
/// with its control characters escaped.
fn push_table<const N: usize>(out: &mut String, rows: &[[impl AsRef<str>; N]]) {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(escape_control(cell.as_ref()).chars().count());
        }
    }
    out.reserve(rows.len() * (widths.iter().sum::<usize>() + 2 * N + 1));
    for row in rows {
        let line_start = out.len();
        for (i, cell) in row.iter().enumerate() {
            let cell = escape_control(cell.as_ref());
            out.push_str(&cell);
            if i + 1 < N {
                let pad = widths[i] - cell.chars().count() + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        // The last column may be empty: no trailing blanks.
        let kept = out[line_start..].trim_end().len();
        out.truncate(line_start + kept);
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn dry_run_uses_the_staging_directory_of_a_known_ca() {
        let url = |s: &str| reqwest::Url::parse(s).expect("URL");
        assert_eq!(
            staging_directory(&url("https://acme-v02.api.letsencrypt.org/directory")),
            Some(url(
                "https://acme-staging-v02.api.letsencrypt.org/directory"
            ))
        );
        assert_eq!(
            staging_directory(&url("https://ca.example/directory")),
            None
        );
    }

    #[test]
    fn control_characters_are_escaped() {
        assert!(matches!(escape_control("a.example ok"), Cow::Borrowed(_)));
        assert_eq!(
            escape_control("\x1b[31mred\nCERTD OK: forged\r\t\0\x7f\u{9b}\u{202e}é"),
            "\\x1b[31mred\\nCERTD OK: forged\\r\\t\\x00\\x7f\\x9b\\u{202e}é"
        );
    }

    #[test]
    fn tables_escape_every_cell() {
        let mut out = String::new();
        push_table(&mut out, &[["a\nb", "\x1b[2J"], ["c", "d"]]);
        assert_eq!(out, "a\\nb  \\x1b[2J\nc     d\n");
    }

    /// A log writer the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn log_lines_cannot_be_forged() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .fmt_fields(EscapedFields)
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .without_time(),
        );
        let detail = "\x1b[31mbad\nWARN certd: forged";
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(detail = %detail, quoted = detail, n = 3, "renewal failed: {detail}");
        });
        let text = String::from_utf8(captured.0.lock().expect("log").clone()).expect("UTF-8");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\x1b'), "{text}");
        assert!(
            text.contains("renewal failed: \\x1b[31mbad\\nWARN certd: forged"),
            "{text}"
        );
        assert!(
            text.contains("detail=\\x1b[31mbad\\nWARN certd: forged"),
            "{text}"
        );
        assert!(text.contains("quoted=\"\\u{1b}[31mbad\\nWARN"), "{text}");
        assert!(text.contains(" n=3"), "{text}");
    }
}
