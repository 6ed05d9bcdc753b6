//! The command line: argument parsing, the one-shot commands, and exit
//! codes. This is the edge of the program, so `anyhow` is used here and
//! nowhere below.
//!
//! Exit codes: 0 success, 1 a certificate (or authorization) operation
//! failed, 2 the configuration, the command line or `RUST_LOG` is wrong, or
//! the ledger cannot be used (corrupt, unwritable, locked by another certd,
//! deleted under the daemon), or fleet mode cannot start (its key file or
//! database). `status --check` is a Nagios plugin instead:
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
//!
//! This file holds the clap definitions and the dispatch; each command
//! lives in its own file, and what the daemon shares with them lives
//! below, in `crate::app`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// `println!` that ends the process quietly when standard output is a
/// closed pipe (`certd status | head -1`), as Unix tools do, and escapes
/// control characters: one call, one line.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::app::sink::write_stdout(&format!($($arg)*))
    };
}

/// `eprintln!` with control characters escaped: one call, one line.
macro_rules! errln {
    ($($arg:tt)*) => {
        eprintln!("{}", $crate::text::escape_control(&format!($($arg)*)))
    };
}

mod account;
mod assets;
mod authz;
mod check;
mod fleet;
mod hint;
mod lock;
mod man;
mod output;
mod persist;
mod polkit;
mod reap;
mod renew;
mod revoke;
mod run;
mod status;

use crate::acme::error_chain;
use crate::app::dirs::{UnsafeDir, WrongUser};
use crate::app::fleet::FleetUnusable;
use crate::app::ops::RevokeReason;
use crate::clock::Clock;
use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::ledger::LedgerError;

use self::lock::ForeignFile;

#[derive(Debug, Parser)]
#[command(
    name = "certd",
    version,
    about = "Certificate renewal daemon for ACME CAs"
)]
pub(crate) struct Cli {
    /// Configuration file.
    #[arg(long, short = 'c', env = "CERTD_CONFIG", default_value = DEFAULT_CONFIG_PATH, global = true)]
    pub(crate) config: PathBuf,

    /// Log line format (logs go to standard error).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub(crate) log_format: LogFormat,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
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
    /// Fleet mode (several hosts, one PostgreSQL ledger).
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
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
pub(crate) enum AccountCommand {
    /// Print the account: directory, URL, key thumbprint, credentials file.
    Show {
        /// The CA whose account to show (default: each CA that has one).
        #[arg(long, value_name = "NAME")]
        ca: Option<String>,
    },
    /// Replace the account key (RFC 8555 §7.3.5); the old key stays in use
    /// until the CA confirms the change.
    Rollover {
        /// The CA whose account key to replace (default: each CA that has
        /// an account).
        #[arg(long, value_name = "NAME")]
        ca: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum FleetCommand {
    /// Copy this host's SQLite ledger (state_dir/certd.db) into the
    /// fleet's database, once: refused if the fleet's ledger holds rows.
    Import,
}

#[derive(Debug, Subcommand)]
pub(crate) enum DnsPersistCommand {
    /// Print the `_validation-persist` TXT records a certificate needs.
    Show {
        /// The certificate's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuthzCommand {
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
                || e.downcast_ref::<FleetUnusable>().is_some()
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
                command: AccountCommand::Rollover { .. },
            }
            // Held so that no certd writes the SQLite file while it is
            // copied.
            | Command::Fleet {
                command: FleetCommand::Import,
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
                command: AccountCommand::Show { .. },
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
                command: AccountCommand::Rollover { ca: None },
            } => Request::Rollover,
            Command::Account {
                command: AccountCommand::Rollover { ca: Some(ca) },
            } => Request::RolloverAt { ca: ca.clone() },
            _ => return None,
        })
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // The one wall clock of this run, handed to whatever reads the time.
    let clock = Clock::system();
    if let Command::GenerateAssets { dir } = &cli.command {
        assets::generate_assets(dir)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::PolkitRule { units, user } = &cli.command
        && !units.is_empty()
    {
        return Ok(polkit::print_rule(
            user,
            units.iter().map(|u| polkit::UnitName::parse(u)),
        ));
    }
    let (cfg, prefetched) = match cli.command {
        Command::Status { .. } => status::load(&cli.config, &clock).await,
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
            if let Some(hint) = hint::unreadable_config(&cli.config) {
                errln!("certd: {hint}");
            }
            return Ok(ExitCode::from(2));
        }
    };
    if let Err(e) = output::init_logging(cli.log_format, &cfg.daemon.log_level) {
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
        Some(lock::claim_ledger(&cfg, create).await?)
    } else {
        None
    };
    let db_path = cfg.db_path();
    run_command(cli.command, cfg, clock, prefetched)
        .await
        .map_err(|e| crate::ledger::explain(&db_path, e))
}

/// Runs `command` with its configuration, the ledger's lock held;
/// `prefetched` is the ledger `status` read while the file was parsed.
async fn run_command(
    command: Command,
    cfg: Config,
    clock: Clock,
    prefetched: Option<status::Prefetched>,
) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run => run::run_daemon(cfg, clock).await,
        // Handled above, before a configuration is needed.
        Command::GenerateAssets { .. } => Ok(ExitCode::SUCCESS),
        Command::PolkitRule { user, .. } => Ok(polkit::print_rule(
            &user,
            polkit::units_from_config(&cfg).into_iter().map(Ok),
        )),
        Command::CheckConfig => Ok(check::check_config(&cfg)),
        Command::Renew {
            names,
            force,
            dry_run,
        } => renew::renew(cfg, clock, &names, force, dry_run).await,
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
            status::run(cfg, &clock, mode, &names, prefetched).await
        }
        Command::Authz {
            command: AuthzCommand::List { pending, json },
        } => authz::authz_list(&cfg, pending, json).await,
        Command::Authz {
            command:
                AuthzCommand::Deactivate {
                    urls,
                    all_pending,
                    include_valid,
                    ignore_budget,
                },
        } => authz::authz_deactivate(&cfg, urls, all_pending, include_valid, ignore_budget).await,
        Command::Reap {
            older_than,
            dry_run,
        } => reap::reap(&cfg, older_than, dry_run).await,
        Command::Account {
            command: AccountCommand::Show { ca },
        } => account::account_show(&cfg, ca.as_deref()),
        Command::Account {
            command: AccountCommand::Rollover { ca },
        } => account::account_rollover(&cfg, ca.as_deref()).await,
        Command::DnsPersist {
            command: DnsPersistCommand::Show { name },
        } => persist::show(&cfg, &name).await,
        Command::Fleet {
            command: FleetCommand::Import,
        } => fleet::import(&cfg, clock).await,
        Command::Revoke {
            name,
            reason,
            no_renew,
        } => revoke::revoke(cfg, clock, &name, reason, no_renew).await,
    }
}
