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

use std::collections::HashSet;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use instant_acme::{
    AuthorizationStatus, AuthorizedIdentifier, ChallengeStatus, ChallengeType, Identifier,
    NewOrder, Order, OrderStatus,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData};
use tokio_util::sync::CancellationToken;

use crate::acme::{
    AcmeAccount, AcmeError, Disposition, NONCE_ATTEMPTS, ProblemRecord, ari, is_bad_nonce,
};
use crate::clock::UnixTime;
use crate::config::{
    self, CertificateConfig, ChallengeKind, KeyType, ProfilePreference, TrustedRoots,
};
use crate::dns::persist::PersistExpect;
use crate::hygiene::reaper::{Admission, GuardError, Policy, Reaper};
use crate::install::{self, CertInfo, InstallError, Issuance, ReloadOutcome};
use crate::ledger::{Ledger, LedgerError, NewAuthz};
use crate::solver::{ChallengeSpec, Solver, SolverError, Solvers, Unready};

/// How long certd waits for the CA to validate all challenges of an order.
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(180);
/// How long certd waits for a `processing` order to become `valid`.
const ISSUANCE_TIMEOUT: Duration = Duration::from_secs(180);
/// The first wait before a failed reload command runs again; it doubles
/// up to `RELOAD_RETRY_CAP`.
const RELOAD_RETRY_FIRST: Duration = Duration::from_secs(2);
const RELOAD_RETRY_CAP: Duration = Duration::from_secs(300);
/// How long to wait for the CA's validation request to reach the
/// standalone responder before polling anyway.
const FETCH_WAIT: Duration = Duration::from_secs(2);

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

/// What the driver needs; shared by concurrent orders.
#[derive(Clone)]
pub struct Context {
    pub store: Ledger,
    pub account: AcmeAccount,
    pub solvers: Solvers,
    pub reaper: Reaper,
    pub cert_dir: Arc<Path>,
    /// Renew when this fraction of the lifetime remains.
    pub renew_remaining: f64,
    /// `[acme] trusted_roots`: issued chains must lead to one of them.
    pub trusted_roots: Option<TrustedRoots>,
    pub mode: RunMode,
}

/// The kind of run an order belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
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
pub struct Issued {
    pub order_url: String,
    pub info: CertInfo,
    pub version: String,
    pub reloads: Vec<ReloadOutcome>,
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
    #[error("{identifier}: the authorization is {status}, so the order cannot complete")]
    AuthzUnusable { identifier: String, status: String },
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
    OrderState(String),
    #[error("shutting down")]
    Cancelled,
}

impl DriveError {
    pub fn disposition(&self) -> Disposition {
        match self {
            Self::Acme(e) => e.disposition(),
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
        }
    }

    /// The CA's problem document, if the failure carries one.
    pub fn problem(&self) -> Option<&ProblemRecord> {
        match self {
            Self::Acme(e) => e.problem(),
            Self::Validation { problem, .. } => Some(problem),
            _ => None,
        }
    }
}

/// An unfinished order taken up again.
enum Resumed {
    /// Not finalized yet: what is left of validation, then finalization.
    Open(Order),
    /// Finalized before the last run stopped: downloaded with the key that
    /// was stored before `finalize` was sent.
    Finalized(Order, Box<(KeyPair, String)>),
}

/// One challenge certd decided to answer.
struct Planned {
    authz_url: String,
    challenge_url: String,
    kind: ChallengeKind,
    solver: Arc<dyn Solver>,
    spec: ChallengeSpec,
}

/// Obtains and installs the certificate `cert`.
pub async fn obtain(
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
    let mut sorted = cert.domain_strings();
    sorted.sort();
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
            let replaces = install::installed(&ctx.cert_dir, name).and_then(|i| i.ari_id);
            let admission = ctx
                .reaper
                .admit(name, &sorted, replaces.as_deref(), cancel)
                .await?;
            // Write-ahead: should the process die before the order's URL
            // is recorded, recovery finds the order in the CA's list and
            // knows which certificate it is for.
            let intent = ctx
                .store
                .record_intent(ctx.account.ledger_id, name, &sorted)
                .await?;
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
            tracing::info!(cert = name, order = %order.url(), "order created");
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
        Err(e) => {
            let detail = e
                .problem()
                .map(ProblemRecord::to_json)
                .unwrap_or_else(|| e.to_string());
            let status = order_status(order.state().status);
            // Issued and recorded on disk: the next attempt installs it
            // from there.
            if ctx.store.issued_waiting(&order_url).await? {
                ctx.store
                    .set_order_state(&order_url, "valid", "issued", Some(&detail))
                    .await?;
                return Err(e);
            }
            // Finalized, and the key is stored: the next attempt downloads
            // this certificate rather than ordering another.
            let finalized = matches!(
                order.state().status,
                OrderStatus::Processing | OrderStatus::Valid
            ) && !matches!(e.disposition(), Disposition::Final)
                && order_key_path(&key_dir, &order_url).exists();
            if matches!(e, DriveError::Preflight(_)) || finalized {
                // After a failed self-check nothing was answered: keep the
                // pending authorizations for the next attempt; the reaper
                // settles them if they go stale first.
                ctx.store
                    .set_order_state(&order_url, status, "resumable", Some(&detail))
                    .await?;
                return Err(e);
            }
            ctx.store
                .set_order_state(&order_url, status, "failed", Some(&detail))
                .await?;
            remove_order_key(&key_dir, &order_url).await;
            for (url, identifier) in ctx.store.pending_authz_of_order(&order_url).await? {
                ctx.reaper
                    .settle(&url, &identifier, Policy::by("driver"))
                    .await?;
            }
            Err(e)
        }
    }
}

/// `newOrder`, with `replaces` (RFC 9773) naming the installed certificate
/// where there is one and the CA offers ARI.
async fn new_order(
    ctx: &Context,
    cert: &CertificateConfig,
    sorted: &[String],
) -> Result<Order, DriveError> {
    let name = cert.name.as_str();
    let account = &ctx.account.account();
    let mut ids: Vec<&config::Identifier> = cert.domains.iter().collect();
    ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let identifiers: Vec<Identifier> = ids
        .into_iter()
        .map(|d| match d {
            config::Identifier::Dns(name) => Identifier::Dns(name.as_str().to_owned()),
            config::Identifier::Ip(ip) => Identifier::Ip(ip.addr()),
        })
        .collect();
    let offered: Vec<&str> = account.profiles().map(|p| p.name).collect();
    let choice =
        choose_profile(&cert.profile, cert.has_ip(), &offered).map_err(DriveError::Profile)?;
    if let Some(w) = &choice.warning {
        tracing::warn!(cert = name, "{w}");
    } else if let Some(p) = &choice.profile
        && cert.profile.names.is_empty()
    {
        tracing::info!(cert = name, profile = %p, "the certificate has IP addresses; asking for the CA's {p:?} profile");
    }
    // Kept until the next order, so `status` shows what this one fell back to.
    ctx.store
        .set_profile_warning(name, sorted, choice.warning.as_deref())
        .await?;
    let base = || {
        let order = NewOrder::new(&identifiers);
        match &choice.profile {
            Some(p) => order.profile(p),
            None => order,
        }
    };
    let installed = install::installed(&ctx.cert_dir, name).and_then(|i| i.ari_id);
    if let Some((aki, serial)) = installed.as_deref().and_then(|id| id.split_once('.')) {
        let replaces = instant_acme::CertificateIdentifier {
            authority_key_identifier: aki.into(),
            serial: serial.into(),
        };
        match nonce_retry!(account.new_order(&base().replaces(replaces.clone())).await) {
            Ok(order) => return Ok(order),
            // No ARI at this CA: nothing was sent.
            Err(instant_acme::Error::Unsupported(_)) => {}
            // The CA created the order but did not echo `replaces`, and
            // instant-acme refused it. The order is real and its
            // authorizations pending: take it as an order without ARI.
            Err(instant_acme::Error::Other(e)) if e.to_string().contains("replaces") => {
                let url = ctx.account.http.take_created_order(sorted).ok_or_else(|| {
                    AcmeError::Protocol(format!(
                        "the CA ignored `replaces` and its order cannot be found: {e}"
                    ))
                })?;
                tracing::info!(cert = name, order = %url, "the CA ignored `replaces`; using the order as is");
                return account
                    .order(url)
                    .await
                    .map_err(|e| AcmeError::from(e).into());
            }
            // `replaces` is a hint; see `refuses_replaces`.
            Err(instant_acme::Error::Api(p)) if refuses_replaces(&p) => {
                tracing::info!(cert = name, problem = %ProblemRecord::from_problem(&p), "order with `replaces` refused; ordering without");
            }
            Err(e) => return Err(AcmeError::from(e).into()),
        }
    }
    nonce_retry!(account.new_order(&base()).await).map_err(|e| AcmeError::from(e).into())
}

/// Whether a CA's answer to a `newOrder` with `replaces` refuses the hint
/// rather than the order, so that the same order without `replaces` is
/// worth sending: `alreadyReplaced` and other 4xx problems, and an ACME
/// problem document with a 5xx status from a CA that cannot find the
/// installed certificate (one from another CA, or from before a move;
/// Pebble answers that with `serverInternal`). A rate limit stands, and so
/// does a 5xx without a problem document (a proxy's error page: the CA is
/// down, and the same order would fail the same way).
fn refuses_replaces(p: &instant_acme::Problem) -> bool {
    let acme_type = p
        .r#type
        .as_deref()
        .and_then(|t| t.strip_prefix("urn:ietf:params:acme:error:"));
    match (p.status, acme_type) {
        (Some(429), _) | (_, Some("rateLimited")) => false,
        (Some(s), _) if s < 500 => true,
        (_, Some(_)) => true,
        (_, None) => false,
    }
}

/// Reuse before abandoning (seed 003): the newest unfinished order for the
/// same names, if the CA still has it pending or ready, or has finalized it
/// and its key is stored.
async fn resume(
    ctx: &Context,
    name: &str,
    identifiers: &[String],
    key_dir: &Path,
) -> Result<Option<Resumed>, DriveError> {
    let now = UnixTime::now().secs();
    let Some(row) = ctx
        .store
        .resumable_order(ctx.account.ledger_id, identifiers, now)
        .await?
    else {
        return Ok(None);
    };
    if ctx.reaper.active().contains(&row.url) {
        return Ok(None);
    }
    let why = match nonce_retry!(ctx.account.account().order(row.url.clone()).await) {
        Ok(mut order) => match order.state().status {
            OrderStatus::Pending | OrderStatus::Ready => {
                tracing::info!(cert = name, order = %row.url, "resuming order");
                ctx.store
                    .event("order-resumed", Some(name), Some(&row.url), None, None)
                    .await?;
                return Ok(Some(Resumed::Open(order)));
            }
            status @ (OrderStatus::Processing | OrderStatus::Valid) => {
                match load_order_key(key_dir, &row.url).await {
                    Some((key, pem)) => {
                        tracing::info!(cert = name, order = %row.url, "resuming a finalized order with its stored key");
                        let detail = format!(
                            "finalized ({}); downloading with the stored key",
                            order_status(status)
                        );
                        ctx.store
                            .event(
                                "order-resumed",
                                Some(name),
                                Some(&row.url),
                                None,
                                Some(&detail),
                            )
                            .await?;
                        return Ok(Some(Resumed::Finalized(order, Box::new((key, pem)))));
                    }
                    None => "not resumable: finalized, but its key is not stored".to_owned(),
                }
            }
            other => format!("not resumable: the CA says {}", order_status(other)),
        },
        Err(e) => format!("not resumable: {}", AcmeError::from(e)),
    };
    ctx.reaper.abandon_order(&row.url, name, &why).await?;
    Ok(None)
}

async fn run_order(
    ctx: &Context,
    cert: &CertificateConfig,
    order: &mut Order,
    domains: &[String],
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
                        "cleanup-failed",
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
    let (key, key_pem) = match load_order_key(key_dir, &order_url).await {
        Some(stored) => stored,
        None => {
            let (key, pem) = certificate_key(ctx, cert).await?;
            // An unreadable leftover never signed a CSR the CA accepted
            // (the key is fsynced before `finalize`): replace it.
            remove_order_key(key_dir, &order_url).await;
            // Before `finalize`: should the process die once the CA has the
            // CSR, the next run downloads the certificate for this key
            // instead of ordering a second one.
            store_order_key(key_dir, &order_url, &pem).await?;
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
        .set_order_state(&order_url, "ready", "finalizing", None)
        .await?;
    nonce_retry!(order.finalize_csr(csr.der()).await)
        .map_err(|e| acme_error(ctx, &order_url, e))?;
    complete(ctx, cert, order, domains, &key, key_pem, key_dir, cancel).await
}

/// A finalized order: download, install, reload; then the stored key goes.
#[allow(clippy::too_many_arguments)]
async fn complete(
    ctx: &Context,
    cert: &CertificateConfig,
    order: &mut Order,
    domains: &[String],
    key: &KeyPair,
    key_pem: String,
    key_dir: &Path,
    cancel: &CancellationToken,
) -> Result<Issued, DriveError> {
    let name = cert.name.as_str();
    let order_url = order.url().to_owned();
    let chain = download(ctx, order, cancel).await?;

    let issuance = Issuance::new(
        &chain,
        key_pem,
        &key.subject_public_key_info(),
        domains,
        ctx.trusted_roots.as_ref(),
        &crate::clock::Clock::system(),
    )?;
    if ctx.mode == RunMode::DryRun {
        // Issued and checked like any other; then thrown away.
        ctx.store
            .set_order_state(&order_url, "valid", "done", None)
            .await?;
        remove_order_key(key_dir, &order_url).await;
        let info = issuance.info;
        ctx.store
            .event(
                "dry-run",
                Some(name),
                Some(&order_url),
                None,
                Some(&format!(
                    "serial {} issued and discarded: nothing installed, nothing reloaded",
                    info.serial
                )),
            )
            .await?;
        tracing::info!(cert = name, order = %order_url, serial = %info.serial, "dry run: certificate issued and discarded");
        return Ok(Issued {
            order_url,
            info,
            version: String::new(),
            reloads: Vec::new(),
        });
    }
    // Durable before the install: should the install fail, the next
    // attempt installs this record instead of ordering again.
    let issued_dir = issued_dir(&ctx.store).await?;
    remove_order_key(&issued_dir, &order_url).await;
    store_order_key(&issued_dir, &order_url, &issuance.record()).await?;
    ctx.store
        .record_issued(
            &order_url,
            name,
            domains,
            &issuance.info.serial,
            issuance.info.not_after,
        )
        .await?;
    ctx.store
        .set_order_state(&order_url, "valid", "issued", None)
        .await?;
    // The record holds the key now.
    remove_order_key(key_dir, &order_url).await;
    let profile = order.state().profile.clone();
    finish(ctx, cert, &order_url, domains, issuance, profile, cancel).await
}

/// An issuance recorded on disk but not installed (the install failed):
/// installed now, without asking the CA for anything. A record that is
/// for other names than the certificate's now, or that no longer verifies,
/// is dropped and `None` returned, so a new order follows.
async fn install_from_disk(
    ctx: &Context,
    cert: &CertificateConfig,
    sorted: &[String],
    cancel: &CancellationToken,
) -> Result<Option<Issued>, DriveError> {
    let name = cert.name.as_str();
    let Some(row) = ctx.store.waiting_issued(name).await? else {
        return Ok(None);
    };
    let dir = issued_dir(&ctx.store).await?;
    let path = order_key_path(&dir, &row.order_url);
    let read = tokio::fs::read_to_string(&path)
        .await
        .map_err(|e| format!("cannot read {}: {e}", path.display()));
    let issuance = read.and_then(|text| {
        if row.identifier_list() != sorted {
            return Err(format!(
                "it is for {}, the certificate now names {}",
                row.identifier_list().join(", "),
                sorted.join(", ")
            ));
        }
        Issuance::from_record(
            &text,
            sorted,
            ctx.trusted_roots.as_ref(),
            &crate::clock::Clock::system(),
        )
        .map_err(|e| e.to_string())
    });
    match issuance {
        Ok(issuance) => {
            tracing::info!(cert = name, order = %row.order_url, serial = %row.serial, "installing the issued certificate recorded on disk");
            ctx.store
                .event(
                    "install-from-disk",
                    Some(name),
                    Some(&row.order_url),
                    None,
                    Some(&format!("serial {}", row.serial)),
                )
                .await?;
            // The profile the CA echoed is not part of the record; the
            // configured preference is, and that is what decides renewal.
            finish(ctx, cert, &row.order_url, sorted, issuance, None, cancel)
                .await
                .map(Some)
        }
        Err(why) => {
            tracing::warn!(cert = name, order = %row.order_url, reason = %why, "the recorded issuance is not installed; ordering anew");
            ctx.store
                .event(
                    "issued-dropped",
                    Some(name),
                    Some(&row.order_url),
                    None,
                    Some(&why),
                )
                .await?;
            ctx.store.issued_done(&row.order_url).await?;
            remove_order_key(&dir, &row.order_url).await;
            Ok(None)
        }
    }
}

/// Installs an issuance that is recorded on disk, then reloads; the record
/// goes once the certificate is in place. `profile` is the one the CA's
/// order named, where known.
async fn finish(
    ctx: &Context,
    cert: &CertificateConfig,
    order_url: &str,
    domains: &[String],
    issuance: Issuance,
    profile: Option<String>,
    cancel: &CancellationToken,
) -> Result<Issued, DriveError> {
    let name = cert.name.as_str();
    let info = issuance.info.clone();
    let cert_dir = ctx.cert_dir.clone();
    let name_owned = name.to_owned();
    let version = tokio::task::spawn_blocking(move || {
        install::install(
            &cert_dir,
            &name_owned,
            &issuance,
            &crate::clock::Clock::system(),
        )
    })
    .await
    .map_err(|e| DriveError::Key(format!("install task failed: {e}")))??;
    let installed = crate::ledger::Installed {
        domains: domains.to_vec(),
        serial: info.serial.clone(),
        not_before: info.not_before,
        not_after: info.not_after,
        version: version.clone(),
        profile,
        profile_wanted: cert.profile.ledger_key(),
    };
    let next = install::renewal_time(info.not_before, info.not_after, ctx.renew_remaining);
    ctx.store
        .record_installed(name, &installed, next.secs())
        .await?;
    ctx.store.issued_done(order_url).await?;
    ctx.store
        .set_order_state(order_url, "valid", "done", None)
        .await?;
    // Installed: privkey.pem holds the key now.
    remove_order_key(&issued_dir(&ctx.store).await?, order_url).await;
    ctx.store
        .event(
            "installed",
            Some(name),
            Some(order_url),
            None,
            Some(&format!("serial {} version {version}", info.serial)),
        )
        .await?;
    tracing::info!(cert = name, order = %order_url, serial = %info.serial, "certificate installed");
    if ctx.reaper.config().deactivate_valid_after_issue {
        // A lost account key then cannot issue for these names without a
        // new validation. Deactivating a valid authorization is free.
        let policy = Policy {
            include_valid: true,
            ..Policy::by("driver")
        };
        for (url, identifier) in ctx.store.authz_of_order(order_url, "valid").await? {
            ctx.reaper.settle(&url, &identifier, policy).await?;
        }
    }
    let reloads = reload(ctx, cert, order_url, cancel).await?;
    Ok(Issued {
        order_url: order_url.to_owned(),
        info,
        version,
        reloads,
    })
}

/// Runs the reload commands once the certificate is installed. The daemon
/// runs a failed one again with backoff until it succeeds (the server
/// still serves the old certificate meanwhile), or until certd stops.
async fn reload(
    ctx: &Context,
    cert: &CertificateConfig,
    order_url: &str,
    cancel: &CancellationToken,
) -> Result<Vec<ReloadOutcome>, DriveError> {
    let name = cert.name.as_str();
    let run = |commands: Vec<String>| async move {
        install::run_reloads(&commands, cert.reload_timeout, name, &ctx.cert_dir).await
    };
    let mut outcomes = run(cert.reload.clone()).await;
    record_reloads(ctx, name, order_url, &outcomes).await?;
    if ctx.mode != RunMode::Daemon {
        return Ok(outcomes);
    }
    let mut delay = RELOAD_RETRY_FIRST;
    loop {
        let failed: Vec<String> = outcomes
            .iter()
            .filter(|r| !r.ok)
            .map(|r| r.command.clone())
            .collect();
        if failed.is_empty() {
            break;
        }
        tracing::info!(cert = name, commands = ?failed, retry_in_secs = delay.as_secs(), "reload failed; retrying");
        if sleep_or_cancel(delay, cancel).await.is_err() {
            // Stopping: the failure stays recorded for `status`.
            break;
        }
        delay = (delay * 2).min(RELOAD_RETRY_CAP);
        let again = run(failed).await;
        record_reloads(ctx, name, order_url, &again).await?;
        for r in again {
            if let Some(slot) = outcomes.iter_mut().find(|o| o.command == r.command) {
                *slot = r;
            }
        }
        if outcomes.iter().all(|r| r.ok) {
            ctx.store.clear_reload_failure(name).await?;
        }
    }
    Ok(outcomes)
}

/// Ledger events (and the certificate's error, for a failure) of reloads.
async fn record_reloads(
    ctx: &Context,
    name: &str,
    order_url: &str,
    outcomes: &[ReloadOutcome],
) -> Result<(), DriveError> {
    for r in outcomes {
        let kind = if r.ok { "reload-ok" } else { "reload-failed" };
        let detail = format!("{}: {}", r.command, r.detail);
        ctx.store
            .event(kind, Some(name), Some(order_url), None, Some(&detail))
            .await?;
        if !r.ok {
            tracing::warn!(cert = name, command = %r.command, detail = %r.detail, "reload failed");
            ctx.store
                .record_reload_failure(
                    name,
                    &format!("installed, but reload `{}` failed: {}", r.command, r.detail),
                )
                .await?;
        }
    }
    Ok(())
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

/// Fetches every authorization of the order and records them with their
/// challenges in one transaction.
async fn record_authorizations(
    ctx: &Context,
    name: &str,
    order: &mut Order,
    domains: &[String],
) -> Result<(), DriveError> {
    let order_url = order.url().to_owned();
    // instant-acme fetches each authorization once and caches it, so a
    // pass that failed on a rejected nonce is repeated for the rest only.
    let (records, foreign) =
        nonce_retry!(collect_authorizations(ctx, order, domains).await).map_err(AcmeError::from)?;
    let status = order_status(order.state().status);
    ctx.store
        .record_order(
            ctx.account.ledger_id,
            name,
            &order_url,
            domains,
            status,
            &records,
        )
        .await?;
    // Refused only now that every authorization is in the ledger, so the
    // failure path settles them all, the foreign one included.
    match foreign {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The order's authorizations as the ledger records them, and the refusal
/// of the first whose identifier the order did not ask for.
async fn collect_authorizations(
    ctx: &Context,
    order: &mut Order,
    domains: &[String],
) -> Result<(Vec<NewAuthz>, Option<DriveError>), instant_acme::Error> {
    let mut records = Vec::new();
    let mut foreign = None;
    let mut auths = order.authorizations();
    while let Some(a) = auths.next().await {
        let a = a?;
        let identifier = match requested_name(domains, &a.identifier()) {
            Some(name) => name.to_owned(),
            None => {
                // The ledger keeps what the CA said; outputs escape it.
                let said = a.identifier().to_string();
                foreign.get_or_insert_with(|| foreign_authz(a.url(), &said, domains));
                said
            }
        };
        records.push(NewAuthz {
            url: a.url().to_owned(),
            identifier,
            status: authz_status(a.status).to_owned(),
            expires_at: ctx.account.http.observed(a.url()).and_then(|o| o.expires),
            challenges: a
                .challenges
                .iter()
                .map(|c| {
                    (
                        c.url.clone(),
                        challenge_type(&c.r#type),
                        challenge_status(c.status).to_owned(),
                    )
                })
                .collect(),
        });
    }
    Ok((records, foreign))
}

/// The name in `requested` an authorization's identifier stands for, or
/// `None` if the order did not ask for it. A wildcard's authorization names
/// the base domain with `wildcard: true` (RFC 8555 section 7.1.3), which
/// stands for `*.` and the base; a `*` in the value itself is never valid.
/// The name returned is certd's own string, so nothing downstream (a hook's
/// environment, a pre-flight connection, the ledger) ever carries the CA's.
fn requested_name<'r>(requested: &'r [String], id: &AuthorizedIdentifier<'_>) -> Option<&'r str> {
    let value = match id.identifier {
        Identifier::Dns(value) => value,
        // An address compares as an address (`::1` is `0:0::1`), and is
        // never a wildcard.
        Identifier::Ip(addr) if !id.wildcard => {
            return requested
                .iter()
                .map(String::as_str)
                .find(|name| name.parse::<std::net::IpAddr>().is_ok_and(|a| a == *addr));
        }
        _ => return None,
    };
    if value.contains('*') {
        return None;
    }
    requested
        .iter()
        .map(String::as_str)
        // A configured address is asked for as an `ip` identifier only.
        .filter(|name| name.parse::<std::net::IpAddr>().is_err())
        .find(|name| match name.strip_prefix("*.") {
            Some(base) => id.wildcard && base.eq_ignore_ascii_case(value),
            None => !id.wildcard && name.eq_ignore_ascii_case(value),
        })
}

fn foreign_authz(url: &str, identifier: &str, domains: &[String]) -> DriveError {
    DriveError::ForeignAuthz {
        url: url.to_owned(),
        identifier: identifier.to_owned(),
        asked: domains.join(", "),
    }
}

/// Picks a challenge for every pending authorization.
async fn plan_challenges(
    ctx: &Context,
    cert: &CertificateConfig,
    order: &mut Order,
    domains: &[String],
) -> Result<Vec<Planned>, DriveError> {
    let mut plan = Vec::new();
    let mut auths = order.authorizations();
    while let Some(a) = auths.next().await {
        let mut a = a.map_err(AcmeError::from)?;
        // Checked when recorded; checked again because this is where the
        // name starts to be used.
        let identifier = match requested_name(domains, &a.identifier()) {
            Some(name) => name.to_owned(),
            None => return Err(foreign_authz(a.url(), &a.identifier().to_string(), domains)),
        };
        match a.status {
            AuthorizationStatus::Valid => continue,
            AuthorizationStatus::Pending => {}
            other => {
                return Err(DriveError::AuthzUnusable {
                    identifier,
                    status: authz_status(other).to_owned(),
                });
            }
        }
        let offered: Vec<ChallengeType> = a.challenges.iter().map(|c| c.r#type.clone()).collect();
        let history = ctx.store.challenge_history(&identifier).await?;
        // RFC 8738 section 7: never dns-01 for an address, whatever the CA
        // offers (there is no `_acme-challenge` name to publish under).
        let is_ip = matches!(a.identifier().identifier, Identifier::Ip(_));
        let Some(kind) = preference(&cert.challenges, &history)
            .into_iter()
            .filter(|k| !(is_ip && *k == ChallengeKind::Dns01))
            .find(|k| offered.contains(&acme_type(*k)))
        else {
            return Err(DriveError::NoChallenge {
                identifier,
                offered: offered
                    .iter()
                    .map(challenge_type)
                    .collect::<Vec<_>>()
                    .join(", "),
                wanted: cert
                    .challenges
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let solver = ctx.solvers.get(kind)?;
        let authz_url = a.url().to_owned();
        // `find` above proved the CA offers this type.
        let Some(challenge) = a.challenge(acme_type(kind)) else {
            continue;
        };
        let key_auth = challenge.key_authorization();
        let challenge_url = challenge.url.clone();
        // dns-persist-01 has no token (instant-acme leaves it empty); only
        // the types that use one parse it.
        let token = match kind {
            ChallengeKind::DnsPersist01 => None,
            _ => Some(crate::solver::Token::parse(&challenge.token)?),
        };
        let (key_authorization, dns_value) = (key_auth.as_str().to_owned(), key_auth.dns_value());
        let persist = match kind {
            ChallengeKind::DnsPersist01 => {
                Some(persist_expect(ctx, &authz_url, &challenge_url, &identifier).await?)
            }
            _ => None,
        };
        plan.push(Planned {
            authz_url,
            challenge_url,
            kind,
            solver,
            spec: ChallengeSpec {
                identifier,
                token,
                key_authorization,
                dns_value,
                dns_alias: cert.dns_alias.clone(),
                persist,
            },
        });
    }
    Ok(plan)
}

/// What the dns-persist-01 record for `identifier` must say: the issuer
/// domain names come from the challenge object (`issuer-domain-names`,
/// which instant-acme does not keep), so the authorization is fetched
/// once more; the account URL is ours.
async fn persist_expect(
    ctx: &Context,
    authz_url: &str,
    challenge_url: &str,
    identifier: &str,
) -> Result<PersistExpect, DriveError> {
    let rsp = ctx
        .account
        .http
        .signed_post(&ctx.account.signer(), authz_url, None)
        .await?;
    Ok(PersistExpect {
        issuers: crate::dns::persist::issuers_in_authz(&rsp.body, challenge_url),
        account_uri: ctx.account.account().id().to_owned(),
        wildcard: identifier.starts_with("*."),
    })
}

/// Presents every planned challenge, answers them, and polls the
/// authorizations until all are valid. Whatever was presented is pushed to
/// `presented` so the caller cleans it up on every path.
async fn validate<'p>(
    ctx: &Context,
    order: &mut Order,
    plan: &'p [Planned],
    presented: &mut Vec<&'p Planned>,
    cancel: &CancellationToken,
) -> Result<(), DriveError> {
    for p in plan {
        presented.push(p);
        // A hook may hang; shutdown must not wait for it (kill_on_drop
        // ends the process when this future is dropped).
        tokio::select! {
            result = p.solver.present(&p.spec) => result?,
            () = cancel.cancelled() => return Err(DriveError::Cancelled),
        }
    }
    for p in plan {
        // A dns-01 propagation check may poll for minutes; shutdown must
        // not wait for it.
        tokio::select! {
            result = p.solver.preflight(&p.spec) => result.map_err(DriveError::Preflight)?,
            () = cancel.cancelled() => return Err(DriveError::Cancelled),
        }
    }
    for p in plan {
        ctx.store
            .set_authz_challenge(&p.authz_url, p.kind.as_str(), &p.challenge_url)
            .await?;
    }
    // Answer each challenge (instant-acme hands out handles in order).
    let mut auths = order.authorizations();
    while let Some(a) = auths.next().await {
        let mut a = a.map_err(AcmeError::from)?;
        let Some(p) = plan.iter().find(|p| p.authz_url == a.url()) else {
            continue;
        };
        let Some(mut challenge) = a.challenge(acme_type(p.kind)) else {
            continue;
        };
        nonce_retry!(challenge.set_ready().await).map_err(AcmeError::from)?;
        tracing::debug!(authz = %p.authz_url, kind = %p.kind, "challenge answered");
    }

    // Seed 004: do not poll before the CA has looked, when we can tell.
    for p in plan {
        p.solver.wait_fetched(&p.spec, FETCH_WAIT).await;
    }

    let mut waiting: HashSet<&str> = plan.iter().map(|p| p.authz_url.as_str()).collect();
    let mut poll = Poll::new(
        Duration::from_millis(20),
        Duration::from_secs(5),
        VALIDATION_TIMEOUT,
    );
    let mut retry_after = None;
    while !waiting.is_empty() {
        let Some(delay) = poll.next_delay(retry_after) else {
            return Err(AcmeError::Timeout(format!(
                "{} authorization(s) still pending after {}s",
                waiting.len(),
                VALIDATION_TIMEOUT.as_secs()
            ))
            .into());
        };
        sleep_or_cancel(delay, cancel).await?;
        retry_after = None;
        let mut auths = order.authorizations();
        while let Some(a) = auths.next().await {
            let mut a = a.map_err(AcmeError::from)?;
            let url = a.url().to_owned();
            if !waiting.contains(url.as_str()) {
                continue;
            }
            let state = nonce_retry!(a.refresh().await).map_err(AcmeError::from)?;
            let status = state.status;
            // Every authorization waited on is planned; certd's own name
            // for it, not what the refreshed object says.
            let p = plan.iter().find(|p| p.authz_url == url);
            let identifier = p.map(|p| p.spec.identifier.clone()).unwrap_or_default();
            match status {
                AuthorizationStatus::Pending => {
                    retry_after = later(
                        retry_after,
                        ctx.account.http.observed(&url).and_then(|o| o.retry_after),
                    );
                }
                AuthorizationStatus::Valid => {
                    ctx.store.set_authz_status(&url, "valid", None).await?;
                    waiting.remove(url.as_str());
                }
                AuthorizationStatus::Invalid => {
                    // Record the answered challenge's problem document.
                    let problem = state
                        .challenges
                        .iter()
                        .find(|c| p.is_some_and(|p| p.challenge_url == c.url))
                        .or_else(|| state.challenges.iter().find(|c| c.error.is_some()))
                        .and_then(|c| c.error.as_ref())
                        .map(ProblemRecord::from_problem)
                        .unwrap_or(ProblemRecord {
                            kind: None,
                            detail: Some("the CA gave no reason".into()),
                            status: None,
                            subproblems: Vec::new(),
                        });
                    ctx.store
                        .set_authz_status(&url, "invalid", Some(&problem.to_json()))
                        .await?;
                    return Err(DriveError::Validation {
                        identifier,
                        kind: p.map_or(ChallengeKind::Http01, |p| p.kind),
                        problem,
                    });
                }
                other => {
                    let status = authz_status(other);
                    ctx.store.set_authz_status(&url, status, None).await?;
                    return Err(DriveError::AuthzUnusable {
                        identifier,
                        status: status.to_owned(),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Polls a finalized order until it is valid, then downloads the chain.
async fn download(
    ctx: &Context,
    order: &mut Order,
    cancel: &CancellationToken,
) -> Result<String, DriveError> {
    let url = order.url().to_owned();
    let mut poll = Poll::new(
        Duration::from_millis(20),
        Duration::from_secs(10),
        ISSUANCE_TIMEOUT,
    );
    loop {
        match order.state().status {
            OrderStatus::Valid => {}
            OrderStatus::Processing => {
                let retry_after = ctx.account.http.observed(&url).and_then(|o| o.retry_after);
                let Some(delay) = poll.next_delay(retry_after) else {
                    return Err(AcmeError::Timeout(format!(
                        "the order is still processing after {}s",
                        ISSUANCE_TIMEOUT.as_secs()
                    ))
                    .into());
                };
                sleep_or_cancel(delay, cancel).await?;
            }
            other => return Err(DriveError::OrderState(order_status(other).to_owned())),
        }
        // Refreshes a processing order, downloads once valid.
        if let Some(chain) =
            nonce_retry!(order.certificate().await).map_err(|e| acme_error(ctx, &url, e))?
        {
            return Ok(chain);
        }
    }
}

/// The CA's ARI answer for an installed certificate (RFC 9773), from
/// certd's own request (see `acme::ari`).
pub async fn ari_window(ctx: &Context, info: &CertInfo) -> Result<ari::Answer, ari::AriError> {
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

/// The profile a new order names, and why it is not the first configured.
#[derive(Debug, PartialEq, Eq)]
pub struct ProfileChoice {
    pub profile: Option<String>,
    /// For the log and `status`: configured profiles the CA does not list.
    pub warning: Option<String>,
}

/// The CA's profile for IP certificates: Let's Encrypt issues for an IP
/// address only under it.
const IP_PROFILE: &str = "shortlived";

/// Picks the first configured profile the CA's directory lists. One it
/// does not list is skipped with a warning (CAs retire profiles: Let's
/// Encrypt's `tlsclient` went on 2026-07-08), unless the preference says
/// one of them is required. With none configured, or none left, the order
/// names none, except that a certificate with IP addresses asks for
/// `shortlived` where the CA lists it.
pub fn choose_profile(
    pref: &ProfilePreference,
    has_ip: bool,
    offered: &[&str],
) -> Result<ProfileChoice, String> {
    let listed = || {
        // Sorted: the directory's `meta.profiles` is an unordered map.
        let mut names = offered.to_vec();
        names.sort_unstable();
        if names.is_empty() {
            "the CA lists no profiles".to_owned()
        } else {
            format!("the CA lists {}", names.join(", "))
        }
    };
    let quoted = |names: &[String]| {
        names
            .iter()
            .map(|n| format!("{n:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let fallback = || (has_ip && offered.contains(&IP_PROFILE)).then(|| IP_PROFILE.to_owned());
    let Some(pos) = pref
        .names
        .iter()
        .position(|n| offered.contains(&n.as_str()))
    else {
        if pref.names.is_empty() {
            return Ok(ProfileChoice {
                profile: fallback(),
                warning: None,
            });
        }
        if pref.required {
            return Err(format!(
                "profile {} is not offered and profile_required is set; {}",
                quoted(&pref.names),
                listed()
            ));
        }
        let profile = fallback();
        let using = match &profile {
            Some(p) => format!("ordering with {p:?}"),
            None => "ordering without a profile (the CA's default)".to_owned(),
        };
        return Ok(ProfileChoice {
            warning: Some(format!(
                "profile {} is not offered ({}); {using}",
                quoted(&pref.names),
                listed()
            )),
            profile,
        });
    };
    let chosen = pref.names[pos].clone();
    let warning = (pos > 0).then(|| {
        format!(
            "profile {} is not offered ({}); ordering with {chosen:?}",
            quoted(&pref.names[..pos]),
            listed()
        )
    });
    Ok(ProfileChoice {
        profile: Some(chosen),
        warning,
    })
}

/// The key for a new issuance: the installed one with `reuse_key` (if it
/// is still of the configured type), else a fresh one.
async fn certificate_key(
    ctx: &Context,
    cert: &CertificateConfig,
) -> Result<(KeyPair, String), DriveError> {
    if cert.reuse_key {
        let (dir, name) = (ctx.cert_dir.clone(), cert.name.as_str().to_owned());
        let read =
            tokio::task::spawn_blocking(move || crate::install::read_reusable_key(&dir, &name))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let pem = read.unwrap_or_else(|e| {
            tracing::warn!(cert = %cert.name, error = %e, "installed key not reused; a new key");
            None
        });
        if let Some(pem) = pem {
            match KeyPair::from_pem(&pem) {
                Ok(key) if key_type_of(&key) == Some(cert.key_type) => return Ok((key, pem)),
                Ok(_) => {
                    tracing::info!(cert = %cert.name, "key_type changed: a new key despite reuse_key")
                }
                Err(e) => {
                    tracing::warn!(cert = %cert.name, error = %e, "cannot read the installed key; a new key")
                }
            }
        }
    }
    generate_key(cert.key_type).await
}

/// Where issued certificates wait to be installed (chain and key, one
/// 0600 file per order, named like the order keys): beside the ledger.
async fn issued_dir(store: &Ledger) -> Result<PathBuf, LedgerError> {
    Ok(store.ledger_dir().await?.join("issued"))
}

/// Where the keys of finalized orders wait for their certificate: beside
/// the ledger, which names the orders.
pub(crate) async fn order_key_dir(store: &Ledger) -> Result<PathBuf, LedgerError> {
    Ok(store.ledger_dir().await?.join("order-keys"))
}

/// The stored key of `order_url`: named by a digest of the URL, so the
/// ledger needs no column for it.
pub(crate) fn order_key_path(dir: &Path, order_url: &str) -> PathBuf {
    let digest = ring::digest::digest(&ring::digest::SHA256, order_url.as_bytes());
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    dir.join(format!("{hex}.pem"))
}

/// Writes the key of `order_url`: created 0600 (never widened later),
/// never through a symlink or over an existing file, and fsynced with its
/// directory entry before this returns.
async fn store_order_key(dir: &Path, order_url: &str, pem: &str) -> Result<(), DriveError> {
    let path = order_key_path(dir, order_url);
    let (dir, pem) = (dir.to_owned(), pem.to_owned());
    let target = path.clone();
    tokio::task::spawn_blocking(move || -> io::Result<()> {
        DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&target)?;
        file.write_all(pem.as_bytes())?;
        file.sync_all()?;
        File::open(&dir)?.sync_all()
    })
    .await
    .map_err(|e| DriveError::Key(format!("key task failed: {e}")))?
    .map_err(|source| DriveError::KeyFile { path, source })
}

/// The stored key of `order_url`, if there is a usable one.
async fn load_order_key(dir: &Path, order_url: &str) -> Option<(KeyPair, String)> {
    let path = order_key_path(dir, order_url);
    let pem = tokio::fs::read_to_string(&path).await.ok()?;
    match KeyPair::from_pem(&pem) {
        Ok(key) => Some((key, pem)),
        Err(e) => {
            tracing::warn!(order = order_url, path = %path.display(), error = %e, "the stored order key is unreadable");
            None
        }
    }
}

/// Removes the stored key of `order_url`, if any: once its certificate is
/// installed, or the order is abandoned.
pub(crate) async fn remove_order_key(dir: &Path, order_url: &str) {
    let path = order_key_path(dir, order_url);
    match tokio::fs::remove_file(&path).await {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(order = order_url, path = %path.display(), error = %e, "cannot remove the stored order key")
        }
    }
}

/// The configured type a key is, if any.
fn key_type_of(key: &KeyPair) -> Option<KeyType> {
    use rsa::pkcs8::DecodePublicKey;
    use rsa::traits::PublicKeyParts;
    let alg = key.algorithm();
    if alg == &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Some(KeyType::EcdsaP256);
    }
    if alg == &rcgen::PKCS_ECDSA_P384_SHA384 {
        return Some(KeyType::EcdsaP384);
    }
    let public = rsa::RsaPublicKey::from_public_key_der(&key.subject_public_key_info()).ok()?;
    match public.size() * 8 {
        2048 => Some(KeyType::Rsa2048),
        3072 => Some(KeyType::Rsa3072),
        4096 => Some(KeyType::Rsa4096),
        _ => None,
    }
}

/// Generates a private key of `key_type`; returns it and its PKCS#8 PEM.
async fn generate_key(key_type: KeyType) -> Result<(KeyPair, String), DriveError> {
    let key_err = |e: String| DriveError::Key(e);
    // RSA generation takes long enough to block a runtime thread.
    let key = tokio::task::spawn_blocking(move || -> Result<KeyPair, String> {
        match key_type {
            KeyType::EcdsaP256 => {
                KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())
            }
            KeyType::EcdsaP384 => {
                KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).map_err(|e| e.to_string())
            }
            KeyType::Rsa2048 => rsa_key(2048),
            KeyType::Rsa3072 => rsa_key(3072),
            KeyType::Rsa4096 => rsa_key(4096),
        }
    })
    .await
    .map_err(|e| key_err(e.to_string()))?
    .map_err(key_err)?;
    let pem = key.serialize_pem();
    Ok((key, pem))
}

/// ring cannot generate RSA keys, only use them; the `rsa` crate generates
/// and ring signs.
fn rsa_key(bits: usize) -> Result<KeyPair, String> {
    use rsa::pkcs8::EncodePrivateKey;
    let mut rng = rsa::rand_core::OsRng;
    let key = rsa::RsaPrivateKey::new(&mut rng, bits).map_err(|e| e.to_string())?;
    let der = key.to_pkcs8_der().map_err(|e| e.to_string())?;
    let pkcs8 = rustls_pki_types::PrivatePkcs8KeyDer::from(der.as_bytes().to_vec());
    KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_RSA_SHA256)
        .map_err(|e| e.to_string())
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
    next: Duration,
    cap: Duration,
    deadline: Instant,
}

impl Poll {
    fn new(initial: Duration, cap: Duration, timeout: Duration) -> Self {
        Self {
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
        let delay = match retry_after.and_then(|t| t.duration_since(SystemTime::now()).ok()) {
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

/// Challenge fallback (seed 002): the configured types in order, except
/// that a type whose last validation for this identifier failed goes behind
/// those whose last one did not. So after an http-01 failure the next order
/// leads with dns-01, and keeps doing so while dns-01 keeps working.
/// `history` is (type, final status), newest first.
pub fn preference(
    configured: &[ChallengeKind],
    history: &[(String, String)],
) -> Vec<ChallengeKind> {
    let last_failed = |k: &ChallengeKind| {
        history
            .iter()
            .find(|(t, _)| t == k.as_str())
            .is_some_and(|(_, status)| status == "invalid")
    };
    let mut order = configured.to_vec();
    order.sort_by_key(last_failed);
    order
}

fn acme_type(k: ChallengeKind) -> ChallengeType {
    match k {
        ChallengeKind::Http01 => ChallengeType::Http01,
        ChallengeKind::Dns01 => ChallengeType::Dns01,
        ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
        // instant-acme 0.8.5 has no variant for it: unknown types parse
        // as `Unknown` with their name.
        ChallengeKind::DnsPersist01 => ChallengeType::Unknown(k.as_str().to_owned()),
    }
}

fn challenge_type(t: &ChallengeType) -> String {
    match t {
        ChallengeType::Http01 => "http-01".into(),
        ChallengeType::Dns01 => "dns-01".into(),
        ChallengeType::TlsAlpn01 => "tls-alpn-01".into(),
        ChallengeType::DeviceAttest01 => "device-attest-01".into(),
        ChallengeType::Unknown(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

pub fn authz_status(s: AuthorizationStatus) -> &'static str {
    match s {
        AuthorizationStatus::Pending => "pending",
        AuthorizationStatus::Valid => "valid",
        AuthorizationStatus::Invalid => "invalid",
        AuthorizationStatus::Revoked => "revoked",
        AuthorizationStatus::Expired => "expired",
        AuthorizationStatus::Deactivated => "deactivated",
    }
}

fn challenge_status(s: ChallengeStatus) -> &'static str {
    match s {
        ChallengeStatus::Pending => "pending",
        ChallengeStatus::Processing => "processing",
        ChallengeStatus::Valid => "valid",
        ChallengeStatus::Invalid => "invalid",
    }
}

fn order_status(s: OrderStatus) -> &'static str {
    match s {
        OrderStatus::Pending => "pending",
        OrderStatus::Ready => "ready",
        OrderStatus::Processing => "processing",
        OrderStatus::Valid => "valid",
        OrderStatus::Invalid => "invalid",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_is_dropped_only_when_the_ca_refused_the_hint() {
        let problem = |status: u16, kind: &str| -> instant_acme::Problem {
            serde_json::from_value(serde_json::json!({
                "type": kind,
                "status": status,
                "detail": "d",
            }))
            .expect("a problem document")
        };
        let acme = |t: &str| format!("urn:ietf:params:acme:error:{t}");
        assert!(refuses_replaces(&problem(409, &acme("alreadyReplaced"))));
        assert!(refuses_replaces(&problem(500, &acme("serverInternal"))));
        assert!(!refuses_replaces(&problem(429, &acme("rateLimited"))));
        assert!(!refuses_replaces(&problem(503, &acme("rateLimited"))));
        // A proxy's error page, turned into a problem by certd.
        assert!(!refuses_replaces(&problem(
            502,
            "urn:certd:error:httpError"
        )));
    }

    use super::*;

    #[tokio::test]
    async fn order_keys_are_created_0600_once_and_never_through_a_link() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("order-keys");
        let url = "https://ca.example/order/1";
        let (_, pem) = generate_key(KeyType::EcdsaP256).await.expect("key");
        store_order_key(&dir, url, &pem).await.expect("store");
        let path = order_key_path(&dir, url);
        let mode = std::fs::metadata(&path)
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (_, loaded) = load_order_key(&dir, url).await.expect("load");
        assert_eq!(loaded, pem);
        // Never over an existing key.
        let again = store_order_key(&dir, url, &pem).await;
        assert!(
            matches!(again, Err(DriveError::KeyFile { .. })),
            "{again:?}"
        );
        // Never through a symlink planted where the key goes.
        remove_order_key(&dir, url).await;
        let elsewhere = tmp.path().join("elsewhere");
        std::os::unix::fs::symlink(&elsewhere, &path).expect("symlink");
        let linked = store_order_key(&dir, url, &pem).await;
        assert!(
            matches!(linked, Err(DriveError::KeyFile { .. })),
            "{linked:?}"
        );
        assert!(!elsewhere.exists());
    }

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
        let mut p = Poll::new(
            Duration::from_millis(20),
            Duration::from_millis(70),
            Duration::from_secs(60),
        );
        assert_eq!(p.next_delay(None), Some(Duration::from_millis(20)));
        assert_eq!(p.next_delay(None), Some(Duration::from_millis(40)));
        assert_eq!(p.next_delay(None), Some(Duration::from_millis(70)));
        let ra = SystemTime::now() + Duration::from_secs(3);
        let d = p.next_delay(Some(ra)).expect("before deadline");
        assert!(d > Duration::from_secs(2) && d <= Duration::from_secs(3));
        let mut expired = Poll::new(
            Duration::from_millis(1),
            Duration::from_millis(1),
            Duration::ZERO,
        );
        assert_eq!(expired.next_delay(None), None);
    }

    #[test]
    fn failed_types_move_behind() {
        use ChallengeKind::{Dns01, Http01};
        let h = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(preference(&[Http01, Dns01], &[]), [Http01, Dns01]);
        assert_eq!(
            preference(&[Http01, Dns01], &h(&[("http-01", "invalid")])),
            [Dns01, Http01]
        );
        let after = h(&[("dns-01", "valid"), ("http-01", "invalid")]);
        assert_eq!(preference(&[Http01, Dns01], &after), [Dns01, Http01]);
        let both = h(&[("dns-01", "invalid"), ("http-01", "invalid")]);
        assert_eq!(preference(&[Http01, Dns01], &both), [Http01, Dns01]);
        let recovered = h(&[
            ("http-01", "valid"),
            ("dns-01", "invalid"),
            ("http-01", "invalid"),
        ]);
        assert_eq!(preference(&[Http01, Dns01], &recovered), [Http01, Dns01]);
    }

    /// Only the names the order asked for pass, as certd spells them; a
    /// wildcard only as the base name with `wildcard: true`.
    #[test]
    fn authorizations_must_name_what_was_asked() {
        let asked = ["a.example".to_owned(), "*.w.example".to_owned()];
        let check = |value: &str, wildcard: bool| {
            requested_name(&asked, &Identifier::Dns(value.into()).authorized(wildcard))
        };
        assert_eq!(check("a.example", false), Some("a.example"));
        assert_eq!(check("A.Example", false), Some("a.example"));
        assert_eq!(check("w.example", true), Some("*.w.example"));
        // The wildcard's base was not asked for, nor a wildcard of a.example.
        assert_eq!(check("w.example", false), None);
        assert_eq!(check("a.example", true), None);
        // RFC 8555: the value never holds the `*.` itself.
        assert_eq!(check("*.w.example", false), None);
        assert_eq!(check("*.w.example", true), None);
        assert_eq!(check("evil.example", false), None);
        assert_eq!(check("a.example\nupdate add evil.example", false), None);
        assert_eq!(check("", false), None);
        let ip = Identifier::Ip("127.0.0.1".parse().expect("address"));
        assert_eq!(requested_name(&asked, &ip.authorized(false)), None);
    }

    /// An address authorization matches the configured address, whatever
    /// text form the CA writes it in; never as a wildcard.
    #[test]
    fn ip_authorizations_match_as_addresses() {
        let asked = ["127.0.0.1".to_owned(), "2001:db8::1".to_owned()];
        let check = |value: &str, wildcard: bool| {
            let addr = value.parse().expect("address");
            requested_name(&asked, &Identifier::Ip(addr).authorized(wildcard))
        };
        assert_eq!(check("127.0.0.1", false), Some("127.0.0.1"));
        assert_eq!(check("2001:0db8:0:0:0:0:0:1", false), Some("2001:db8::1"));
        assert_eq!(check("127.0.0.2", false), None);
        assert_eq!(check("::1", false), None);
        assert_eq!(check("127.0.0.1", true), None);
        // A DNS identifier spelling an asked address is not that address.
        let dns = Identifier::Dns("127.0.0.1".into());
        assert_eq!(requested_name(&asked, &dns.authorized(false)), None);
    }

    /// The choice among the configured profiles and the directory's list,
    /// including lists no Pebble serves (Let's Encrypt's, with `tlsclient`
    /// retired).
    #[test]
    fn profiles_fall_back_unless_required() {
        let pref = |names: &[&str], required| ProfilePreference {
            names: names.iter().map(|n| n.to_string()).collect(),
            required,
        };
        let le = ["tlsserver", "classic", "shortlived"];
        let chosen = |p: &ProfilePreference, ip, offered: &[&str]| {
            choose_profile(p, ip, offered).expect("a choice")
        };

        let c = chosen(&pref(&["tlsserver", "classic"], false), false, &le);
        assert_eq!((c.profile.as_deref(), c.warning), (Some("tlsserver"), None));

        // Retired: the next one, with a warning naming what was skipped.
        let c = chosen(&pref(&["tlsclient", "classic"], false), false, &le);
        assert_eq!(c.profile.as_deref(), Some("classic"));
        let w = c.warning.expect("a warning");
        assert!(w.contains("\"tlsclient\" is not offered"), "{w}");
        assert!(w.contains("classic, shortlived, tlsserver"), "{w}");

        // None left: the CA's default, or `shortlived` for addresses.
        let c = chosen(&pref(&["tlsclient"], false), false, &le);
        assert_eq!(c.profile, None);
        assert!(c.warning.expect("a warning").contains("CA's default"));
        let c = chosen(&pref(&["tlsclient"], false), true, &le);
        assert_eq!(c.profile.as_deref(), Some("shortlived"));

        // Required: a hard error with what the CA lists.
        let e = choose_profile(&pref(&["tlsclient"], true), false, &le).expect_err("required");
        assert!(e.contains("profile_required"), "{e}");
        assert!(e.contains("classic, shortlived, tlsserver"), "{e}");
        let e = choose_profile(&pref(&["classic"], true), false, &[]).expect_err("none listed");
        assert!(e.contains("lists no profiles"), "{e}");
        // A CA without profiles and no preference: nothing to say.
        let c = chosen(&pref(&[], false), false, &[]);
        assert_eq!((c.profile, c.warning), (None, None));

        // Addresses without a configured profile: `shortlived` where listed.
        let c = chosen(&pref(&[], false), true, &le);
        assert_eq!(
            (c.profile.as_deref(), c.warning),
            (Some("shortlived"), None)
        );
        let c = chosen(&pref(&[], false), true, &["default"]);
        assert_eq!(c.profile, None);
        // ... but a configured one wins.
        let c = chosen(&pref(&["classic"], false), true, &le);
        assert_eq!(c.profile.as_deref(), Some("classic"));
    }

    #[tokio::test]
    async fn keys_of_every_type_sign_csrs() {
        for kt in [
            KeyType::EcdsaP256,
            KeyType::EcdsaP384,
            KeyType::Rsa2048,
            KeyType::Rsa3072,
            KeyType::Rsa4096,
        ] {
            let (key, pem) = generate_key(kt).await.expect("key");
            assert!(pem.contains("PRIVATE KEY"));
            // reuse_key reads it back as the same type.
            assert_eq!(
                key_type_of(&KeyPair::from_pem(&pem).expect("reload")),
                Some(kt)
            );
            let params = CertificateParams::new(vec!["a.example".to_owned()]).expect("params");
            params.serialize_request(&key).expect("csr");
        }
    }
}
