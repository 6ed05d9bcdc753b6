//! The reaper and the guard: certd never leaves a pending authorization
//! behind and never trips a CA limit.
//!
//! Since late 2024 Let's Encrypt counts the deactivation of a *pending*
//! authorization as a failed validation ("5 failed authorizations per
//! identifier per account per hour", and a long run of failures pauses the
//! account for that name), while other CAs still limit pending
//! authorizations. So every way certd gets rid of an authorization goes
//! through [`Reaper::settle`], which
//!
//! 1. asks the CA first (the authorization may have become valid, or gone),
//! 2. deactivates a still-pending one only while the identifier's failure
//!    budget for the last hour, counted from the ledger, allows it, and
//!    otherwise holds it back for a later pass,
//! 3. records the CA's answer, whatever it is, or on failure a backoff for
//!    the next try. A deactivation counts as done only when the CA's
//!    answer says `deactivated` (RFC 8555 §7.5.2); a 200 alone does not.
//!
//! [`Reaper::pass`] walks the ledger's stale pending authorizations in
//! pages; [`Reaper::recover`] deals with the orders a crash interrupted;
//! [`Reaper::admit`] is the guard in front of every `newOrder`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::acme::raw::{account_orders, deactivate_authz, fetch_authz, fetch_order};
use crate::acme::{AcmeAccount, AcmeError};
use crate::clock::UnixTime;
use crate::config::ReaperConfig;
use crate::ledger::{Ledger, LedgerError, NewAuthz, OrderRow, PendingAuthz};

/// Rows fetched from the ledger per page of a pass.
const PAGE: i64 = 100;
/// How long a guarded order waits for pending authorizations to clear
/// before it gives up (and the scheduler tries again later).
const GUARD_WAIT: Duration = Duration::from_secs(120);

/// The certificate name an adopted order gets when the ledger cannot tell
/// whose it is; no configured certificate can have it (names are plain).
const UNKNOWN_CERT: &str = "(unknown)";

/// Why an order could not be adopted.
#[derive(Debug, thiserror::Error)]
enum AdoptError {
    #[error(transparent)]
    Acme(#[from] AcmeError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// The order URLs being driven right now; the reaper leaves their
/// authorizations alone.
#[derive(Clone, Default)]
pub struct ActiveOrders(Arc<Mutex<HashSet<String>>>);

impl ActiveOrders {
    /// Marks `url` active until the returned guard is dropped.
    pub fn claim(&self, url: &str) -> ActiveClaim {
        lock(&self.0).insert(url.to_owned());
        ActiveClaim {
            set: self.clone(),
            url: url.to_owned(),
        }
    }

    pub fn contains(&self, url: &str) -> bool {
        lock(&self.0).contains(url)
    }
}

pub struct ActiveClaim {
    set: ActiveOrders,
    url: String,
}

impl Drop for ActiveClaim {
    fn drop(&mut self) {
        lock(&self.set.0).remove(&self.url);
    }
}

/// A set of strings stays consistent whatever panicked while holding it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What became of one authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    Deactivated {
        from: String,
    },
    WouldDeactivate {
        from: String,
    },
    /// Deactivating now would exceed the identifier's failure budget.
    HeldBack {
        failures: i64,
        limit: u32,
    },
    /// The CA says it is no longer pending (valid, invalid, deactivated…).
    NotPending(String),
    /// The CA accepted the deactivation request, but its answer shows the
    /// authorization in another status (pending, valid…): not deactivated.
    Refused {
        status: String,
    },
    /// Valid, and the caller did not ask to deactivate valid ones.
    SkippedValid,
    /// Past its `expires`: marked without asking the CA.
    Expired,
    /// The CA no longer knows it.
    Gone,
    /// The CA could not be asked; retried on a later pass.
    Failed(String),
}

impl Settled {
    /// Whether the authorization is no longer pending (or would not be).
    pub fn is_done(&self) -> bool {
        !matches!(
            self,
            Self::HeldBack { .. } | Self::Failed(_) | Self::Refused { .. } | Self::SkippedValid
        )
    }
}

/// How `settle` may act.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Who asks, for the ledger: "driver", "reaper", "cli".
    pub by: &'static str,
    pub dry_run: bool,
    /// Deactivate valid authorizations too (free at the CA).
    pub include_valid: bool,
    /// Deactivate even past the failure budget (an operator's explicit wish).
    pub ignore_budget: bool,
}

impl Policy {
    pub fn by(by: &'static str) -> Self {
        Self {
            by,
            dry_run: false,
            include_valid: false,
            ignore_budget: false,
        }
    }
}

/// Totals of one pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassCounts {
    pub examined: u64,
    pub deactivated: u64,
    pub held_back: u64,
    pub resolved: u64,
    pub failed: u64,
    pub skipped_active: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// The ledger shows that a new order would exceed one of the CA's
    /// limits: no request is made until the window moves on.
    #[error("{what}: {count} in the window (limit {limit}); next possible at {}", until.rfc3339())]
    Limit {
        what: &'static str,
        count: i64,
        limit: u32,
        until: UnixTime,
        /// The limit counts the whole account, not one certificate.
        account_wide: bool,
    },
    #[error(
        "pending-authorization guard: {pending} pending authorizations for the account, max_pending is {max}; not creating another order"
    )]
    Full { pending: i64, max: u32 },
    #[error("shutting down")]
    Cancelled,
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// The reaper of one account; cheap to clone.
#[derive(Clone)]
pub struct Reaper {
    inner: Arc<Inner>,
}

struct Inner {
    store: Ledger,
    account: AcmeAccount,
    /// Swapped whole by a configuration reload (`set_config`).
    cfg: std::sync::RwLock<ReaperConfig>,
    active: ActiveOrders,
    /// Identifiers of admitted orders whose authorizations are not in the
    /// ledger yet: counted by the guard so concurrent orders cannot all
    /// slip under `max_pending` at once.
    reserved: tokio::sync::Mutex<i64>,
    /// Signalled whenever pending authorizations may have decreased.
    released: Notify,
}

/// An admitted order's reservation; released when dropped.
pub struct Admission {
    reaper: Reaper,
    count: i64,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let count = self.count;
        // `try_lock` succeeds unless another task holds the guard this very
        // moment; then release from a task instead of blocking a drop.
        if let Ok(mut reserved) = self.reaper.inner.reserved.try_lock() {
            *reserved -= count;
            drop(reserved);
            self.reaper.inner.released.notify_waiters();
            return;
        }
        let reaper = self.reaper.clone();
        tokio::spawn(async move {
            *reaper.inner.reserved.lock().await -= count;
            reaper.inner.released.notify_waiters();
        });
    }
}

impl Reaper {
    pub fn new(store: Ledger, account: AcmeAccount, cfg: ReaperConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                account,
                cfg: std::sync::RwLock::new(cfg),
                active: ActiveOrders::default(),
                reserved: tokio::sync::Mutex::new(0),
                released: Notify::new(),
            }),
        }
    }

    pub fn active(&self) -> &ActiveOrders {
        &self.inner.active
    }

    pub fn account(&self) -> &AcmeAccount {
        &self.inner.account
    }

    /// The settings in force (a copy: a reload may replace them).
    pub fn config(&self) -> ReaperConfig {
        self.inner
            .cfg
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Takes new settings from a configuration reload; passes and guards
    /// that start afterwards use them.
    pub fn set_config(&self, cfg: ReaperConfig) {
        *self
            .inner
            .cfg
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = cfg;
    }

    /// Tells waiting guards that pending authorizations may have cleared.
    pub fn order_finished(&self) {
        self.inner.released.notify_waiters();
    }

    /// Asks the CA about `url` and deactivates it if it is still pending
    /// (or valid, with `include_valid`) and the failure budget allows.
    /// Whatever status the CA reports is written to the ledger (except on a
    /// dry run), so no row stays `pending` for an authorization the CA has
    /// long validated: the guard counts those rows.
    pub async fn settle(
        &self,
        url: &str,
        identifier: &str,
        policy: Policy,
    ) -> Result<Settled, LedgerError> {
        let s = &self.inner.store;
        let account = &self.inner.account;
        let now = UnixTime::now().secs();
        let authz = match fetch_authz(&account.http, &account.signer(), url).await {
            Ok(a) => a,
            Err(e) => return self.failed(url, identifier, e, policy).await,
        };
        let from = authz.status;
        if !policy.dry_run {
            s.authz_check_ok(url).await?;
            if from != "pending" {
                s.set_authz_status(url, &from, None).await?;
                self.inner.released.notify_waiters();
            }
        }
        match from.as_str() {
            "pending" => {}
            "valid" if policy.include_valid => {}
            "valid" => return Ok(Settled::SkippedValid),
            _ => return Ok(Settled::NotPending(from)),
        }
        if from == "pending" && !policy.ignore_budget {
            let limit = self.config().failed_authz_per_identifier_per_hour;
            let failures = s
                .failures_since(account.ledger_id, identifier, now - 3600)
                .await?;
            if failures >= i64::from(limit) {
                if !policy.dry_run {
                    let detail = format!(
                        "{failures} failed authorizations for {identifier} in the last hour (limit {limit}); deactivation deferred"
                    );
                    s.event("held-back", None, None, Some(url), Some(&detail))
                        .await?;
                }
                return Ok(Settled::HeldBack { failures, limit });
            }
        }
        if policy.dry_run {
            return Ok(Settled::WouldDeactivate { from });
        }
        match deactivate_authz(&account.http, &account.signer(), url).await {
            Ok(answer) if answer.status != "deactivated" => {
                self.refused(url, identifier, &from, answer.status).await
            }
            Ok(_) => {
                s.set_authz_deactivated(url, policy.by, &from).await?;
                let detail = format!("{identifier} was {from}; deactivated by {}", policy.by);
                s.event("deactivated", None, None, Some(url), Some(&detail))
                    .await?;
                tracing::info!(authz = %url, identifier, from = %from, by = policy.by, "deactivated authorization");
                self.inner.released.notify_waiters();
                Ok(Settled::Deactivated { from })
            }
            Err(e) => self.failed(url, identifier, e, policy).await,
        }
    }

    /// The CA answered a deactivation with the authorization in another
    /// status: the ledger keeps that status, and the row backs off like a
    /// failed call so a server that ignores deactivations is not asked at
    /// every pass.
    async fn refused(
        &self,
        url: &str,
        identifier: &str,
        from: &str,
        status: String,
    ) -> Result<Settled, LedgerError> {
        let s = &self.inner.store;
        let detail = format!(
            "{identifier} was {from}; the CA answered the deactivation with status {status}"
        );
        if status != from {
            s.set_authz_status(url, &status, None).await?;
            self.inner.released.notify_waiters();
        }
        s.authz_check_failed(url, UnixTime::now().secs(), &detail)
            .await?;
        s.event("deactivate-refused", None, None, Some(url), Some(&detail))
            .await?;
        tracing::warn!(authz = %url, identifier, status = %status, "the CA did not deactivate the authorization");
        Ok(Settled::Refused { status })
    }

    async fn failed(
        &self,
        url: &str,
        identifier: &str,
        e: AcmeError,
        policy: Policy,
    ) -> Result<Settled, LedgerError> {
        let s = &self.inner.store;
        if e.problem().is_some_and(|p| p.status == Some(404)) {
            if !policy.dry_run {
                s.set_authz_status(url, "gone", None).await?;
            }
            return Ok(Settled::Gone);
        }
        let msg = e.to_string();
        if !policy.dry_run {
            s.authz_check_failed(url, UnixTime::now().secs(), &msg)
                .await?;
            s.event("reaper-error", None, None, Some(url), Some(&msg))
                .await?;
        }
        tracing::warn!(authz = %url, identifier, error = %msg, "cannot settle authorization; will retry");
        Ok(Settled::Failed(msg))
    }

    /// One pass over the ledger: every authorization still pending and
    /// created at least `older_than` ago, not part of an order being driven,
    /// is settled (or, past its `expires`, marked expired without asking).
    /// `report` sees each row and its outcome as it happens. `explicit`
    /// (an operator's `certd reap`) also retries rows still in backoff.
    pub async fn pass(
        &self,
        older_than: Duration,
        dry_run: bool,
        explicit: bool,
        report: impl FnMut(&PendingAuthz, &Settled),
    ) -> Result<PassCounts, LedgerError> {
        let http = self.inner.account.http.clone();
        http.nonce_scope(self.pass_inner(older_than, dry_run, explicit, report))
            .await
    }

    async fn pass_inner(
        &self,
        older_than: Duration,
        dry_run: bool,
        explicit: bool,
        mut report: impl FnMut(&PendingAuthz, &Settled),
    ) -> Result<PassCounts, LedgerError> {
        let s = &self.inner.store;
        let now = UnixTime::now().secs();
        let cutoff = now - i64::try_from(older_than.as_secs()).unwrap_or(i64::MAX / 2);
        let policy = Policy {
            dry_run,
            ..Policy::by("reaper")
        };
        let mut counts = PassCounts::default();
        let mut after = 0;
        loop {
            let page = s
                .stale_pending_authz(
                    self.inner.account.ledger_id,
                    cutoff,
                    now,
                    explicit,
                    after,
                    PAGE,
                )
                .await?;
            let Some(last) = page.last() else { break };
            after = last.id;
            for row in &page {
                if row
                    .order_url
                    .as_deref()
                    .is_some_and(|o| self.inner.active.contains(o))
                {
                    counts.skipped_active += 1;
                    continue;
                }
                counts.examined += 1;
                let outcome = if row.expires_at.is_some_and(|e| e <= now) {
                    if !dry_run {
                        s.set_authz_status(&row.url, "expired", None).await?;
                    }
                    Settled::Expired
                } else {
                    self.settle(&row.url, &row.identifier, policy).await?
                };
                match &outcome {
                    Settled::Deactivated { .. } | Settled::WouldDeactivate { .. } => {
                        counts.deactivated += 1
                    }
                    Settled::HeldBack { .. } => counts.held_back += 1,
                    Settled::Failed(_) | Settled::Refused { .. } => counts.failed += 1,
                    _ => counts.resolved += 1,
                }
                report(row, &outcome);
            }
        }
        if !dry_run {
            let detail = format!(
                "examined {}, deactivated {}, held back {}, resolved {}, failed {}",
                counts.examined,
                counts.deactivated,
                counts.held_back,
                counts.resolved,
                counts.failed
            );
            s.event("reaper-pass", None, None, None, Some(&detail))
                .await?;
        }
        Ok(counts)
    }

    /// Crash recovery: orders the ledger shows in flight but that no task is
    /// driving, after adopting those the CA lists for the account that the
    /// ledger never learnt of (see [`Reaper::adopt_unknown`]). Those `keep`
    /// accepts (their certificate is still configured with the same names,
    /// and the driver will resume them) are marked resumable, one per set of
    /// names; the rest are abandoned and their pending authorizations
    /// settled within the budget. An order interrupted after finalization
    /// is resumable only while its key is stored: the driver then downloads
    /// its certificate instead of ordering the same one again.
    pub async fn recover(
        &self,
        keep: impl Fn(&OrderRow) -> bool,
    ) -> Result<(usize, usize), LedgerError> {
        let s = &self.inner.store;
        self.adopt_unknown().await?;
        let key_dir = crate::order::order_key_dir(s).await?;
        let (mut resumable, mut abandoned) = (0, 0);
        let mut orders = s.in_flight_orders(self.inner.account.ledger_id).await?;
        // Newest first: of several unfinished orders for the same names the
        // driver resumes the newest, so the older ones are abandoned now.
        orders.reverse();
        let mut kept = HashSet::new();
        for order in orders {
            if self.inner.active.contains(&order.url) {
                continue;
            }
            let finalized_without_key = order.step == "finalizing"
                && !crate::order::order_key_path(&key_dir, &order.url).exists();
            if !finalized_without_key && keep(&order) && kept.insert(order.identifiers.clone()) {
                s.set_order_state(&order.url, &order.status, "resumable", None)
                    .await?;
                s.event(
                    "order-recovered",
                    Some(&order.cert_name),
                    Some(&order.url),
                    None,
                    Some("left to resume"),
                )
                .await?;
                resumable += 1;
                continue;
            }
            self.abandon_order(&order.url, &order.cert_name, "recovery")
                .await?;
            abandoned += 1;
        }
        Ok((resumable, abandoned))
    }

    /// Orders the CA lists for the account (RFC 8555 §7.1.2.1) that the
    /// ledger does not know: a crash between `newOrder` and recording its
    /// answer leaves one, with pending authorizations. Each still `pending`
    /// or `ready` is recorded with its authorizations (write-ahead, as the
    /// driver records its own), under the certificate the ledger's intent
    /// for those names recorded; [`Reaper::recover`] then resumes or
    /// abandons it like any other. The list is walked only when an intent
    /// shows that a `newOrder` was interrupted: it grows with every order
    /// the account ever made (Pebble pages it three at a time). Where the
    /// CA offers no list (Let's Encrypt), nothing is adopted: the next
    /// `newOrder` for the same names is answered there with the same order.
    /// Returns how many were adopted.
    pub async fn adopt_unknown(&self) -> Result<usize, LedgerError> {
        let s = &self.inner.store;
        let account = &self.inner.account;
        if !s.has_intents(account.ledger_id).await? {
            return Ok(0);
        }
        let orders = match account_orders(&account.http, &account.signer()).await {
            Ok(Some(orders)) => orders,
            Ok(None) => {
                s.clear_intents(account.ledger_id).await?;
                return Ok(0);
            }
            Err(e) => {
                let msg = format!("cannot list the account's orders: {e}");
                s.event("reaper-error", None, None, None, Some(&msg))
                    .await?;
                tracing::warn!(error = %e, "cannot list the account's orders at the CA; orders unknown to the ledger are not adopted");
                return Ok(0);
            }
        };
        let mut adopted = 0;
        for url in orders {
            if s.order_known(&url).await? {
                continue;
            }
            match self.adopt(&url).await {
                Ok(true) => adopted += 1,
                Ok(false) => {}
                Err(AdoptError::Ledger(e)) => return Err(e),
                Err(AdoptError::Acme(e)) => {
                    let msg = format!("cannot adopt: {e}");
                    s.event("reaper-error", None, Some(&url), None, Some(&msg))
                        .await?;
                    tracing::warn!(order = %url, error = %e, "cannot adopt an order unknown to the ledger");
                }
            }
        }
        s.clear_intents(account.ledger_id).await?;
        Ok(adopted)
    }

    /// Records one order the ledger did not know, if it may still have
    /// pending authorizations.
    async fn adopt(&self, url: &str) -> Result<bool, AdoptError> {
        let s = &self.inner.store;
        let account = &self.inner.account;
        let order = fetch_order(&account.http, &account.signer(), url).await?;
        if !matches!(order.status.as_str(), "pending" | "ready") {
            return Ok(false);
        }
        let names = order.sorted_identifiers();
        let mut authzs = Vec::with_capacity(order.authorizations.len());
        for authz_url in &order.authorizations {
            let a = fetch_authz(&account.http, &account.signer(), authz_url).await?;
            authzs.push(NewAuthz {
                url: authz_url.clone(),
                identifier: a.identifier(),
                status: a.status.clone(),
                expires_at: a.expires.as_deref().and_then(crate::clock::parse_rfc3339),
                challenges: a
                    .challenges
                    .iter()
                    .map(|c| (c.url.clone(), c.kind.clone(), c.status.clone()))
                    .collect(),
            });
        }
        // Without an intent or an earlier order for these names, the order
        // is nobody's: recorded under a name no certificate has, so
        // recovery abandons it.
        let cert_name = s
            .cert_name_for(account.ledger_id, &names)
            .await?
            .unwrap_or_else(|| UNKNOWN_CERT.to_owned());
        s.record_order(
            account.ledger_id,
            &cert_name,
            url,
            &names,
            &order.status,
            &authzs,
        )
        .await?;
        if let Some(expires) = order
            .expires
            .as_deref()
            .and_then(crate::clock::parse_rfc3339)
        {
            s.set_order_expires(url, expires).await?;
        }
        let detail = format!(
            "listed by the CA, unknown to the ledger: {}",
            names.join(", ")
        );
        s.event(
            "order-adopted",
            Some(&cert_name),
            Some(url),
            None,
            Some(&detail),
        )
        .await?;
        tracing::info!(cert = %cert_name, order = %url, "adopted an order the ledger did not know");
        Ok(true)
    }

    /// Gives up on an order: settles its pending authorizations and marks it
    /// abandoned.
    pub async fn abandon_order(
        &self,
        order_url: &str,
        cert_name: &str,
        why: &str,
    ) -> Result<(), LedgerError> {
        let s = &self.inner.store;
        for (url, identifier) in s.pending_authz_of_order(order_url).await? {
            self.settle(&url, &identifier, Policy::by("driver")).await?;
        }
        // A finalized order's stored key would only ever sign for it.
        let key_dir = crate::order::order_key_dir(s).await?;
        crate::order::remove_order_key(&key_dir, order_url).await;
        s.set_order_state(order_url, "abandoned", "abandoned", Some(why))
            .await?;
        s.event(
            "order-abandoned",
            Some(cert_name),
            Some(order_url),
            None,
            Some(why),
        )
        .await?;
        Ok(())
    }

    /// The CA limits the ledger can count: new orders per account in three
    /// hours, certificates for the same names in a week. An ARI renewal
    /// (the order names the installed certificate, `replaces` its ARI id,
    /// inside the CA's suggested window) is exempt from both at the CA
    /// (Boulder's `limitsExempt`), so the guard does not hold it back;
    /// the window is asked only once a limit would.
    async fn within_limits(
        &self,
        cert_name: &str,
        identifiers: &[String],
        replaces: Option<&str>,
    ) -> Result<(), GuardError> {
        let s = &self.inner.store;
        let cfg = self.config();
        let account = self.inner.account.ledger_id;
        let now = UnixTime::now().secs();
        let checks = [
            (
                "new orders in three hours",
                3 * 3600,
                cfg.new_orders_per_3h,
                true,
                s.orders_since(account, now - 3 * 3600).await?,
            ),
            (
                "certificates for these names in a week",
                7 * 86_400,
                cfg.duplicate_certificates_per_week,
                false,
                s.issued_since(account, identifiers, now - 7 * 86_400)
                    .await?,
            ),
        ];
        let mut exempt = None;
        for (what, window, limit, account_wide, (count, oldest)) in checks {
            if count >= i64::from(limit) {
                if let Some(ari_id) = replaces {
                    if exempt.is_none() {
                        exempt = Some(self.in_ari_window(ari_id).await);
                    }
                    if exempt == Some(true) {
                        let detail = format!(
                            "{what}: {count} in the window (limit {limit}); an ARI renewal inside the CA's window is exempt"
                        );
                        s.event("ari-exempt", Some(cert_name), None, None, Some(&detail))
                            .await?;
                        tracing::info!(
                            cert = cert_name,
                            limit = what,
                            "ARI renewal inside its window: exempt from the CA's limit"
                        );
                        continue;
                    }
                }
                let e = GuardError::Limit {
                    what,
                    count,
                    limit,
                    until: UnixTime::from_secs(oldest.unwrap_or(now) + window),
                    account_wide,
                };
                s.event(
                    "ca-limit-guard",
                    Some(cert_name),
                    None,
                    None,
                    Some(&e.to_string()),
                )
                .await?;
                tracing::warn!(cert = cert_name, error = %e, "order deferred: it would exceed a CA limit");
                return Err(e);
            }
        }
        Ok(())
    }

    /// Whether the CA's renewal information for the certificate `ari_id`
    /// puts now inside its suggested window (start inclusive, end
    /// exclusive, as Boulder's `SuggestedWindow.IsWithin`). No answer, no
    /// exemption: the guard then counts the order like any other.
    async fn in_ari_window(&self, ari_id: &str) -> bool {
        let Some((aki, serial)) = ari_id.split_once('.') else {
            return false;
        };
        let id = instant_acme::CertificateIdentifier {
            authority_key_identifier: aki.into(),
            serial: serial.into(),
        };
        match self.inner.account.account().renewal_info(&id).await {
            Ok((info, _)) => {
                let now = UnixTime::now().secs();
                let window = &info.suggested_window;
                window.start.unix_timestamp() <= now && now < window.end.unix_timestamp()
            }
            Err(e) => {
                tracing::debug!(error = %AcmeError::from(e), "no ARI window: the guard counts the order");
                false
            }
        }
    }

    /// The guard before `newOrder`: admits an order for `identifiers` names
    /// while the account's pending authorizations (ledger plus admitted
    /// orders not yet recorded) stay under `max_pending`. At the limit it
    /// runs a reaper pass at once; if still full it records a
    /// `pending-authz-guard` event and waits, bounded, for orders in flight
    /// to finish. `replaces` is the ARI id of the installed certificate the
    /// order will name, where it will name one.
    pub async fn admit(
        &self,
        cert_name: &str,
        identifiers: &[String],
        replaces: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<Admission, GuardError> {
        self.within_limits(cert_name, identifiers, replaces).await?;
        let identifiers = identifiers.len();
        let max = self.config().max_pending;
        let deadline = tokio::time::Instant::now() + GUARD_WAIT;
        let mut reaped = false;
        let mut recorded = false;
        loop {
            let released = self.inner.released.notified();
            tokio::pin!(released);
            // Register before checking, so a release between the check and
            // the wait is not missed.
            released.as_mut().enable();
            let pending = {
                let mut reserved = self.inner.reserved.lock().await;
                let pending = self
                    .inner
                    .store
                    .pending_count(self.inner.account.ledger_id)
                    .await?
                    + *reserved;
                if pending < i64::from(max) {
                    let count = i64::try_from(identifiers).unwrap_or(i64::MAX);
                    *reserved += count;
                    return Ok(Admission {
                        reaper: self.clone(),
                        count,
                    });
                }
                pending
            };
            if !reaped {
                reaped = true;
                self.pass(self.config().pending_max_age, false, false, |_, _| {})
                    .await?;
                continue;
            }
            if !recorded {
                recorded = true;
                let detail =
                    format!("{pending} pending authorizations, max_pending {max}: order deferred");
                self.inner
                    .store
                    .event(
                        "pending-authz-guard",
                        Some(cert_name),
                        None,
                        None,
                        Some(&detail),
                    )
                    .await?;
                tracing::warn!(
                    cert = cert_name,
                    pending,
                    max,
                    "pending-authorization guard: order deferred"
                );
            }
            tokio::select! {
                () = &mut released => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Err(GuardError::Full { pending, max });
                }
                () = cancel.cancelled() => return Err(GuardError::Cancelled),
            }
        }
    }
}
