//! The order driver: one ACME order from `newOrder` to an installed
//! certificate.
//!
//! The steps, each persisted in the ledger before the next begins:
//!
//! 1. `newOrder`; the order URL is recorded at once.
//! 2. Every authorization is fetched and recorded with its challenge URLs
//!    (write-ahead: all of it is committed before any challenge is answered).
//! 3. Already-`valid` authorizations are skipped (CAs reuse them); for each
//!    `pending` one a challenge type is picked by preference, its response
//!    presented, the choice recorded, and the challenge answered.
//! 4. The **authorizations** (not the challenges) are polled until final,
//!    honouring `Retry-After`, else starting short and backing off.
//! 5. Finalize with a CSR for a fresh key, only once every authorization is
//!    valid; the key is written (0600, fsynced) beside the ledger before
//!    `finalize` is sent. Poll a `processing` order the same way; download
//!    the chain.
//! 6. Check the chain against the order and record it durably (chain and
//!    key, 0600, under the state directory) before installing it
//!    atomically; then reload. An install that fails is retried from that
//!    record, never by ordering again. A failed reload is retried with
//!    backoff by the daemon.
//!
//! Before step 1 (and before a resumed order is validated) everything the
//! order will need is checked locally: `cert_dir` writable, the webroot a
//! directory, the listeners bound, the hooks executable. An order that
//! cannot complete is never placed: it would cost the CA's budget for
//! nothing.
//!
//! Before step 1 the ledger records the intent to order, so an order the CA
//! created just before a crash is found and adopted by recovery. An order
//! interrupted after `finalize` is taken up again with its stored key: the
//! certificate is downloaded, not issued a second time.
//!
//! Every path that gives up deactivates the authorizations it leaves
//! pending, so none is left to count against the CA's limits.
//!
//! The files: this one drives an order through its steps; `plan` places it
//! (`newOrder`, profile, `replaces`), `validate` answers its
//! authorizations, `finalize` signs, downloads and installs, `keys` keeps
//! finalized orders' keys, `resume` takes up an unfinished order, and
//! `recovery` resumes or settles what a stopped process left.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use instant_acme::{Order, OrderStatus};
use rcgen::{CertificateParams, DistinguishedName};
use tokio_util::sync::CancellationToken;

use crate::acme::{
    AcmeAccount, AcmeError, Disposition, NONCE_ATTEMPTS, ProblemRecord, ari, is_bad_nonce,
};
use crate::clock::Clock;
use crate::config::{CaName, TrustedRoots};
use crate::config::{CertificateConfig, ChallengeKind};
use crate::fleet::LeaseError;
use crate::hygiene::{Admission, GuardError, Policy, Reaper};
use crate::install::{self, CertInfo, InstallError, ReloadOutcome};
use crate::ledger::{self, Actor, EventKind, Identifiers, Ledger, LedgerError, OrderStep};
use crate::solver::{SolverError, Solvers, Unready};

/// Evaluates an instant-acme call, again while it fails on a bad nonce
/// (see `acme::NONCE_ATTEMPTS`).
macro_rules! nonce_retry {
    ($call:expr) => {{
        let mut attempt = 1;
        loop {
            match $call {
                Err(e) if attempt < NONCE_ATTEMPTS && is_bad_nonce(&e) => attempt += 1,
                other => break other,
            }
        }
    }};
}

mod finalize;
mod hooks;
mod keys;
mod plan;
mod recovery;
mod resume;
mod validate;

use finalize::{certificate_key, complete, install_from_disk};
use keys::{find_order_key, forget_order_key, has_order_key, keep_order_key, order_key_dir};
use plan::new_order;
use resume::{Resumed, resume};
use validate::{plan_challenges, record_authorizations, validate};

pub(crate) use hooks::{FleetHooks, SharedAnswer};
pub(crate) use keys::FleetOrderKeys;
pub(crate) use recovery::{recover, recover_certificate};

/// What the driver needs; shared by concurrent orders.
#[derive(Clone)]
pub struct Context {
    /// The CA the orders of this context go to.
    pub(crate) ca: CaName,
    /// Whether a `replaces` names the installed certificate: only towards
    /// the CA that issued it (RFC 9773 identifiers are per CA).
    pub(crate) replaces_installed: bool,
    pub(crate) store: Ledger,
    pub(crate) account: AcmeAccount,
    pub(crate) solvers: Solvers,
    pub(crate) reaper: Reaper,
    pub(crate) cert_dir: Arc<Path>,
    /// Renew when this fraction of the lifetime remains.
    pub(crate) renew_remaining: f64,
    /// `[acme] trusted_roots`: issued chains must lead to one of them.
    pub(crate) trusted_roots: Option<TrustedRoots>,
    pub(crate) mode: RunMode,
    /// Fleet mode, under the certificate's lease: the answers shared and
    /// the issuance handed to every host. `None` otherwise.
    pub(crate) fleet: Option<Arc<dyn FleetHooks>>,
}

/// The kind of run an order belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunMode {
    /// `certd renew`: a failed reload is reported.
    Once,
    /// `certd run`: a failed reload is retried with backoff until it
    /// succeeds or certd stops.
    Daemon,
    /// `certd renew --dry-run`: the whole flow, then the certificate is
    /// discarded; nothing is installed or reloaded.
    DryRun,
}

/// A certificate the driver installed.
#[derive(Debug)]
pub(crate) struct Issued {
    pub(crate) info: CertInfo,
    pub(crate) reloads: Vec<ReloadOutcome>,
    /// Where the certificate came from.
    pub(crate) source: Source,
}

/// Where an installed certificate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// This host's order.
    Ordered,
    /// Fleet mode: another host's issuance, still current, installed from
    /// the fleet instead of ordering again.
    Fleet,
}

#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error(transparent)]
    Acme(#[from] AcmeError),
    #[error("{identifier}: {kind} validation failed: {problem}")]
    Validation {
        identifier: String,
        kind: ChallengeKind,
        problem: ProblemRecord,
    },
    /// A validation failed at a certificate's CA while it lists others:
    /// they were not asked, since they would validate the same way.
    #[error(
        "{source}; not tried at another CA ({next}): a failed validation is the operator's to fix, and another CA would fail it the same way"
    )]
    NoFallback {
        source: Box<DriveError>,
        next: String,
    },
    #[error("{identifier}: the authorization is {status}, so the order cannot complete")]
    AuthzUnusable {
        identifier: String,
        status: ledger::AuthzStatus,
    },
    /// The CA's authorization names something the order did not ask for:
    /// certd validates only the names it asked for, so the order is refused.
    #[error(
        "the CA's authorization {url} is for {identifier:?}, a name this order did not ask for ({asked}); the order is refused"
    )]
    ForeignAuthz {
        url: String,
        /// The CA's text, quoted with its control characters escaped.
        identifier: String,
        asked: String,
    },
    #[error(
        "{identifier}: the CA offers {offered}; none of the configured challenge types ({wanted})"
    )]
    NoChallenge {
        identifier: String,
        offered: String,
        wanted: String,
    },
    #[error(transparent)]
    Guard(#[from] GuardError),
    #[error(transparent)]
    Solver(#[from] SolverError),
    /// The self-check failed before the CA was asked: the authorizations
    /// stay pending for the next attempt to resume.
    #[error(transparent)]
    Preflight(SolverError),
    #[error(transparent)]
    Install(#[from] InstallError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("cannot create the private key or CSR: {0}")]
    Key(String),
    #[error("{}: {source}", path.display())]
    KeyFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Something the order needs is unusable: no order was placed.
    #[error("not ordering, the order could not complete: {0}")]
    NotReady(Unready),
    #[error("{0}")]
    Profile(String),
    #[error("the order is {0} after finalization")]
    OrderState(ledger::OrderStatus),
    #[error("shutting down")]
    Cancelled,
    /// Fleet mode: another live host holds the certificate's lease, so
    /// this host does not order it now.
    #[error("{lease} is held by another host of the fleet; not ordering it here")]
    LeasedElsewhere {
        lease: String,
        /// When the holder's lease runs out unless renewed (the database
        /// said), so the host looks again as soon as it could claim it.
        retry_after: Option<std::time::Duration>,
    },
    /// Fleet mode: the fleet's last attempt at the certificate failed (on
    /// any host), and its backoff runs until `until`: no host orders it
    /// before then.
    #[error(
        "the fleet's last attempt failed (on {host}: {error}); no host of the fleet orders it again before {}",
        until.rfc3339()
    )]
    HeldBack {
        until: crate::clock::UnixTime,
        /// The host whose attempt failed.
        host: String,
        error: String,
    },
    /// Fleet mode: the certificate's lease could not be claimed, or was
    /// lost while the order ran (this host then stopped sending).
    #[error("fleet lease: {0}")]
    Lease(#[from] LeaseError),
    /// Fleet mode: the fleet's database could not take or give what the
    /// order shares with the other hosts (an answer, the issuance).
    #[error("fleet: {0}")]
    Fleet(String),
    /// Fleet mode: this host defines the certificate differently from the
    /// fleet's hosts that hold its definition, so it does not claim the
    /// lease: it would order something else.
    #[error(
        "certificate {cert}: this host's definition differs from the fleet's in {fields} (held by {hosts}); not taking its lease"
    )]
    DefinitionDiffers {
        cert: String,
        /// The differing fields, comma-separated.
        fields: String,
        /// The live hosts holding the fleet's definition.
        hosts: String,
    },
}

impl DriveError {
    pub(crate) fn disposition(&self) -> Disposition {
        match self {
            Self::Acme(e) => e.disposition(),
            Self::NoFallback { source, .. } => source.disposition(),
            // The CA validates once (seed 001): a new order is needed, and
            // the scheduler decides when.
            Self::Validation { .. } | Self::AuthzUnusable { .. } => Disposition::Final,
            // A CA that answers so will likely do it again: the next order
            // waits for the backoff like any failed one.
            Self::ForeignAuthz { .. } => Disposition::Final,
            Self::NoChallenge { .. } | Self::Key(_) | Self::Profile(_) => Disposition::Final,
            Self::Solver(_) | Self::Install(_) | Self::Ledger(_) | Self::KeyFile { .. } => {
                Disposition::Retryable
            }
            // An account-wide limit pauses all new orders until the window
            // moves on, as a CA's own rate limit would.
            Self::Guard(GuardError::Limit {
                until,
                account_wide: true,
                ..
            }) => Disposition::RateLimited {
                until: Some(until.system_time()),
            },
            // Nothing was ordered; once the operator fixes it, the next
            // attempt goes ahead.
            Self::Guard(_) | Self::Preflight(_) | Self::NotReady(_) => Disposition::Retryable,
            Self::OrderState(_) | Self::Cancelled => Disposition::Retryable,
            Self::LeasedElsewhere { .. }
            | Self::HeldBack { .. }
            | Self::Lease(_)
            | Self::Fleet(_)
            | Self::DefinitionDiffers { .. } => Disposition::Retryable,
        }
    }

    /// Whether this host stopped because the certificate is another
    /// host's to renew (fleet mode): its lease is held elsewhere or was
    /// lost, the fleet's hosts define it differently, or the fleet's
    /// backoff after another host's failure holds it back. Not a failure
    /// of the certificate here; the host looks again later.
    pub(crate) fn is_elsewhere(&self) -> bool {
        matches!(
            self,
            Self::LeasedElsewhere { .. }
                | Self::HeldBack { .. }
                | Self::Lease(_)
                | Self::DefinitionDiffers { .. }
                // A write the fence refused, or a request the lease's
                // deadline did: the lease went, or may have gone, to
                // another host (this one was stopped or cut off past its
                // end).
                | Self::Ledger(LedgerError::Fenced { .. })
                | Self::Acme(AcmeError::Gated(_))
        )
    }

    /// Whether the order stopped because this host may no longer act for
    /// it: a request refused by the lease's deadline, or a write refused
    /// by its fence. Nothing more may be sent or written for it.
    pub(crate) fn is_self_fenced(&self) -> bool {
        matches!(
            self,
            Self::Acme(AcmeError::Gated(_))
                | Self::Ledger(LedgerError::Fenced { .. })
                | Self::Lease(_)
        )
    }

    /// The CA's problem document, if the failure carries one.
    pub(crate) fn problem(&self) -> Option<&ProblemRecord> {
        match self {
            Self::Acme(e) => e.problem(),
            Self::Validation { problem, .. } => Some(problem),
            Self::NoFallback { source, .. } => source.problem(),
            _ => None,
        }
    }
}

/// Obtains and installs the certificate `cert`.
pub(crate) async fn obtain(
    ctx: &Context,
    cert: &CertificateConfig,
    cancel: &CancellationToken,
) -> Result<Issued, DriveError> {
    let result = ctx
        .account
        .http
        .nonce_scope(obtain_inner(ctx, cert, cancel))
        .await;
    // Whatever happened, pending authorizations may have cleared.
    ctx.reaper.order_finished();
    result
}

async fn obtain_inner(
    ctx: &Context,
    cert: &CertificateConfig,
    cancel: &CancellationToken,
) -> Result<Issued, DriveError> {
    let name = cert.name.as_str();
    let sorted = Identifiers::new(cert.domain_strings());
    let key_dir = order_key_dir(&ctx.store).await?;
    if ctx.mode != RunMode::DryRun
        && let Some(issued) = install_from_disk(ctx, cert, &sorted, cancel).await?
    {
        return Ok(issued);
    }
    check_cert_dir(ctx, name).await?;
    // A dry run never takes up a real run's order: it would discard a
    // certificate that run is owed.
    let resumed = match ctx.mode {
        RunMode::DryRun => None,
        RunMode::Once | RunMode::Daemon => resume(ctx, name, &sorted, &key_dir).await?,
    };
    let (mut order, admission, intent, finalized) = match resumed {
        Some(Resumed::Open(order)) => {
            ctx.solvers
                .check(&cert.challenges)
                .map_err(DriveError::NotReady)?;
            (order, None, None, None)
        }
        Some(Resumed::Finalized(order, stored)) => (order, None, None, Some(*stored)),
        None => {
            ctx.solvers
                .check(&cert.challenges)
                .map_err(DriveError::NotReady)?;
            // The guard counts this order before it exists, so concurrent
            // orders cannot all slip under max_pending.
            let replaces = install::installed(&ctx.cert_dir, name)
                .and_then(|i| i.ari_id)
                .filter(|_| ctx.replaces_installed);
            let admission = ctx
                .reaper
                .admit(name, &sorted, replaces.as_deref(), cancel)
                .await?;
            // Write-ahead: should the process die before the order's URL
            // is recorded, recovery finds the order in the CA's list and
            // knows which certificate it is for. In fleet mode the
            // admission wrote it already, as the reservation.
            let intent = match admission.intent() {
                Some(intent) => intent,
                None => {
                    ctx.store
                        .record_intent(ctx.account.ledger_id, name, &sorted)
                        .await?
                }
            };
            let order = match new_order(ctx, cert, &sorted).await {
                Ok(order) => order,
                Err(e) => {
                    // A CA that answered with a problem created no
                    // order. After a lost answer it may have: the
                    // intent stays for the next recovery to look.
                    // Nor did a profile refused before sending.
                    if e.problem().is_some() || matches!(e, DriveError::Profile(_)) {
                        ctx.store.clear_intent(intent).await?;
                    }
                    return Err(e);
                }
            };
            tracing::info!(cert = name, ca = %ctx.ca, order = %order.url(), "order created");
            (order, Some(admission), Some(intent), None)
        }
    };
    let order_url = order.url().to_owned();
    let _claim = ctx.reaper.active().claim(&order_url);
    let status = order_status(order.state().status);
    ctx.store
        .record_order(
            ctx.account.ledger_id,
            name,
            &order_url,
            &sorted,
            status,
            &[],
        )
        .await?;
    if let Some(intent) = intent {
        ctx.store.clear_intent(intent).await?;
    }
    if let Some(expires) = ctx
        .account
        .http
        .observed(&order_url)
        .and_then(|o| o.expires)
    {
        ctx.store.set_order_expires(&order_url, expires).await?;
    }

    let result = match finalized {
        Some((key, key_pem)) => {
            complete(
                ctx, cert, &mut order, &sorted, &key, key_pem, &key_dir, cancel,
            )
            .await
        }
        None => run_order(ctx, cert, &mut order, &sorted, admission, &key_dir, cancel).await,
    };
    match result {
        Ok(issued) => Ok(issued),
        // Fleet mode: past the lease, nothing more is sent or written; the
        // next holder's recovery takes the order up.
        Err(e) if e.is_self_fenced() => Err(e),
        // Fleet mode, a read or write of the shared ledger failed (the
        // database gone, a connection cut): whether this host still holds
        // the lease is unknown, and a ledger out of reach is no reason to
        // give the order up. It stays as recorded, its authorizations
        // pending and nothing more sent for it, for the lease's next
        // holder (a peer, or this host again) to resume rather than order
        // a second time.
        Err(e @ DriveError::Ledger(_)) if ctx.store.is_shared() => Err(e),
        // Fleet mode, shutting down: the order is handed over, not given
        // up. Its authorizations stay pending and the lease is released,
        // so a peer claims it and resumes this order.
        Err(DriveError::Cancelled) if ctx.store.is_shared() => {
            ctx.store
                .set_order_state(
                    &order_url,
                    order_status(order.state().status),
                    OrderStep::Resumable,
                    Some("handed over at shutdown"),
                )
                .await?;
            Err(DriveError::Cancelled)
        }
        Err(e) => {
            let detail = e
                .problem()
                .map_or_else(|| e.to_string(), ProblemRecord::to_json);
            let status = order_status(order.state().status);
            // Issued and recorded on disk: the next attempt installs it
            // from there.
            if ctx.store.issued_waiting(&order_url).await? {
                ctx.store
                    .set_order_state(
                        &order_url,
                        ledger::OrderStatus::Valid,
                        OrderStep::Issued,
                        Some(&detail),
                    )
                    .await?;
                return Err(e);
            }
            // Finalized, and the key is stored: the next attempt downloads
            // this certificate rather than ordering another.
            let finalized = matches!(
                order.state().status,
                OrderStatus::Processing | OrderStatus::Valid
            ) && !matches!(e.disposition(), Disposition::Final)
                && has_order_key(&ctx.store, &key_dir, &order_url).await?;
            if matches!(e, DriveError::Preflight(_)) || finalized {
                // After a failed self-check nothing was answered: keep the
                // pending authorizations for the next attempt; the reaper
                // settles them if they go stale first.
                ctx.store
                    .set_order_state(&order_url, status, OrderStep::Resumable, Some(&detail))
                    .await?;
                return Err(e);
            }
            ctx.store
                .set_order_state(&order_url, status, OrderStep::Failed, Some(&detail))
                .await?;
            forget_order_key(&ctx.store, &key_dir, &order_url).await;
            for (url, identifier) in ctx.store.pending_authz_of_order(&order_url).await? {
                ctx.reaper
                    .settle(&url, &identifier, Policy::by(Actor::Driver))
                    .await?;
            }
            Err(e)
        }
    }
}

async fn run_order(
    ctx: &Context,
    cert: &CertificateConfig,
    order: &mut Order,
    domains: &Identifiers,
    admission: Option<Admission>,
    key_dir: &Path,
    cancel: &CancellationToken,
) -> Result<Issued, DriveError> {
    let name = cert.name.as_str();
    let order_url = order.url().to_owned();
    record_authorizations(ctx, name, order, domains).await?;
    // The new authorizations are in the ledger now; the guard counts them there.
    drop(admission);

    let plan = plan_challenges(ctx, cert, order, domains).await?;
    if !plan.is_empty() {
        let mut presented = Vec::with_capacity(plan.len());
        let result = validate(ctx, order, &plan, &mut presented, cancel).await;
        for p in presented {
            if let Err(e) = p.solver.cleanup(&p.spec).await {
                tracing::warn!(cert = name, error = %e, "challenge cleanup failed");
                let _ = ctx
                    .store
                    .event(
                        EventKind::CleanupFailed,
                        Some(name),
                        Some(&order_url),
                        Some(&p.authz_url),
                        Some(&e.to_string()),
                    )
                    .await;
            }
        }
        result?;
    }

    // A resumed order finalized with the key stored last time (the CA may
    // have seen that CSR already).
    let (key, key_pem) = match find_order_key(&ctx.store, key_dir, &order_url).await? {
        Some(stored) => stored,
        None => {
            let (key, pem) = certificate_key(ctx, cert).await?;
            // An unreadable leftover never signed a CSR the CA accepted
            // (the key is fsynced before `finalize`): replace it.
            forget_order_key(&ctx.store, key_dir, &order_url).await;
            // Before `finalize`: should the process die once the CA has the
            // CSR, the next run (in fleet mode, a peer's) downloads the
            // certificate for this key instead of ordering a second one.
            keep_order_key(&ctx.store, key_dir, &order_url, &pem).await?;
            (key, pem)
        }
    };
    let mut params =
        CertificateParams::new(domains.to_vec()).map_err(|e| DriveError::Key(e.to_string()))?;
    params.distinguished_name = DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| DriveError::Key(e.to_string()))?;
    ctx.store
        .set_order_state(
            &order_url,
            ledger::OrderStatus::Ready,
            OrderStep::Finalizing,
            None,
        )
        .await?;
    nonce_retry!(order.finalize_csr(csr.der()).await)
        .map_err(|e| acme_error(ctx, &order_url, e))?;
    complete(ctx, cert, order, domains, &key, key_pem, key_dir, cancel).await
}

/// Checks, without leaving anything behind, that certd can write where
/// the certificate of `name` goes: the nearest existing directory of
/// `cert_dir/<name>` takes a new file.
async fn check_cert_dir(ctx: &Context, name: &str) -> Result<(), DriveError> {
    let target = ctx.cert_dir.join(name);
    tokio::task::spawn_blocking(move || probe_writable(&target))
        .await
        .map_err(|e| DriveError::Key(format!("check task failed: {e}")))?
        .map_err(DriveError::NotReady)
}

fn probe_writable(target: &Path) -> Result<(), Unready> {
    let unready = |dir: &Path, e: &io::Error| {
        let fix = match e.raw_os_error() {
            Some(libc::EROFS) => format!(
                "remount the file system of {} read-write, or set storage.cert_dir to a writable directory",
                dir.display()
            ),
            Some(libc::ENOTDIR) => format!(
                "replace the file {} with a directory, or set storage.cert_dir elsewhere",
                dir.display()
            ),
            _ => format!(
                "give certd's user (uid {uid}) write access (`chown {uid} {}`), or set storage.cert_dir to a writable directory",
                dir.display(),
                uid = crate::safefs::euid()
            ),
        };
        Unready {
            what: format!("storage.cert_dir {}", dir.display()),
            problem: format!("certd cannot write there ({e})"),
            fix,
        }
    };
    let mut dir = target;
    let existing = loop {
        match std::fs::symlink_metadata(dir) {
            Ok(meta) if meta.is_dir() => break dir,
            Ok(_) => {
                return Err(unready(dir, &io::Error::from_raw_os_error(libc::ENOTDIR)));
            }
            // Missing, or below a file: look further up.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                match dir.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => dir = parent,
                    _ => return Err(unready(dir, &e)),
                }
            }
            Err(e) => return Err(unready(dir, &e)),
        }
    };
    // Unique per check: concurrent orders of one process probe the same
    // directory when their certificates' own do not exist yet.
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = existing.join(format!(".certd-write-check.{}.{n}", std::process::id()));
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&probe);
    match created {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(unready(existing, &e)),
    }
}

/// The CA's ARI answer for an installed certificate (RFC 9773), from
/// certd's own request (see `acme::ari`).
pub(crate) async fn ari_window(
    ctx: &Context,
    info: &CertInfo,
) -> Result<ari::Answer, ari::AriError> {
    ari::renewal_info(
        &ctx.account.http,
        &ctx.account.directory_url,
        info.ari_id.as_deref(),
    )
    .await
}

/// An instant-acme error, with the `Retry-After` the CA sent for `url`.
fn acme_error(ctx: &Context, url: &str, e: instant_acme::Error) -> DriveError {
    let retry_after = ctx.account.http.observed(url).and_then(|o| o.retry_after);
    match e {
        instant_acme::Error::Api(p) => {
            AcmeError::from_problem(&p, retry_after, ctx.account.http.clock().system_time()).into()
        }
        other => AcmeError::from(other).into(),
    }
}

async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> Result<(), DriveError> {
    tokio::select! {
        () = tokio::time::sleep(d) => Ok(()),
        () = cancel.cancelled() => Err(DriveError::Cancelled),
    }
}

fn later(a: Option<SystemTime>, b: Option<SystemTime>) -> Option<SystemTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Polling delays: the CA's `Retry-After` when it sends one, else start
/// short and double up to a cap, until a deadline.
struct Poll {
    /// The wall clock a `Retry-After` time is measured against.
    clock: Clock,
    next: Duration,
    cap: Duration,
    deadline: Instant,
}

impl Poll {
    fn new(clock: Clock, initial: Duration, cap: Duration, timeout: Duration) -> Self {
        Self {
            clock,
            next: initial,
            cap,
            deadline: Instant::now() + timeout,
        }
    }

    /// The delay before the next poll, or `None` once past the deadline.
    fn next_delay(&mut self, retry_after: Option<SystemTime>) -> Option<Duration> {
        let now = Instant::now();
        if now >= self.deadline {
            return None;
        }
        let delay = match retry_after.and_then(|t| t.duration_since(self.clock.system_time()).ok())
        {
            Some(d) => d,
            None => {
                let d = self.next;
                self.next = (self.next * 2).min(self.cap);
                d
            }
        };
        Some(delay.min(self.deadline - now))
    }
}

fn order_status(s: OrderStatus) -> ledger::OrderStatus {
    match s {
        OrderStatus::Pending => ledger::OrderStatus::Pending,
        OrderStatus::Ready => ledger::OrderStatus::Ready,
        OrderStatus::Processing => ledger::OrderStatus::Processing,
        OrderStatus::Valid => ledger::OrderStatus::Valid,
        OrderStatus::Invalid => ledger::OrderStatus::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The write check leaves nothing behind and names the directory that
    /// refused, with the fix.
    #[test]
    fn the_cert_dir_check_probes_the_nearest_existing_directory() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let target = tmp.path().join("certs").join("www");
        probe_writable(&target).expect("writable");
        assert_eq!(
            std::fs::read_dir(tmp.path()).expect("list").count(),
            0,
            "nothing created"
        );
        let file = tmp.path().join("certs");
        std::fs::write(&file, "").expect("a file where cert_dir goes");
        let e = probe_writable(&target).expect_err("not a directory");
        assert_eq!(e.what, format!("storage.cert_dir {}", file.display()));
        assert!(e.fix.contains("replace the file"), "{e}");
    }

    #[test]
    fn poll_backs_off_and_honours_retry_after() {
        let clock = Clock::fixed(crate::clock::UnixTime::from_secs(1_000_000));
        let mut p = Poll::new(
            clock.clone(),
            Duration::from_millis(20),
            Duration::from_millis(70),
            Duration::from_secs(60),
        );
        assert_eq!(p.next_delay(None), Some(Duration::from_millis(20)));
        assert_eq!(p.next_delay(None), Some(Duration::from_millis(40)));
        assert_eq!(p.next_delay(None), Some(Duration::from_millis(70)));
        let ra = clock.system_time() + Duration::from_secs(3);
        assert_eq!(p.next_delay(Some(ra)), Some(Duration::from_secs(3)));
        let mut expired = Poll::new(
            clock,
            Duration::from_millis(1),
            Duration::from_millis(1),
            Duration::ZERO,
        );
        assert_eq!(expired.next_delay(None), None);
    }
}
