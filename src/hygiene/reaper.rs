//! The reaper: the handle every component shares for one account, and its
//! periodic pass over the ledger's stale pending authorizations.
//!
//! [`Reaper::pass`] walks them in pages, leaves alone those of orders being
//! driven ([`ActiveOrders`]), marks expired ones without asking the CA, and
//! settles the rest ([`Reaper::settle`], in `settle.rs`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::acme::AcmeAccount;
use crate::config::ReaperConfig;
use crate::ledger::{Actor, AuthzStatus, EventKind, Ledger, LedgerError, PendingAuthz, StalePage};

use super::settle::{Policy, Settled};

/// Rows fetched from the ledger per page of a pass.
const PAGE: i64 = 100;

/// The reaper of one account; cheap to clone.
#[derive(Clone)]
pub(crate) struct Reaper {
    pub(super) inner: Arc<Inner>,
    /// The ledger this handle writes: the account's, or in fleet mode the
    /// same ledger fenced by the lease the caller holds ([`Reaper::fenced`]).
    writes: Ledger,
}

pub(super) struct Inner {
    pub(super) store: Ledger,
    pub(super) account: AcmeAccount,
    /// Swapped whole by a configuration reload (`set_config`).
    pub(super) cfg: std::sync::RwLock<ReaperConfig>,
    pub(super) active: ActiveOrders,
    /// Identifiers of admitted orders whose authorizations are not in the
    /// ledger yet: counted by the guard so concurrent orders cannot all
    /// slip under `max_pending` at once.
    pub(super) reserved: tokio::sync::Mutex<i64>,
    /// Signalled whenever pending authorizations may have decreased.
    pub(super) released: Notify,
}

impl Reaper {
    pub(crate) fn new(store: Ledger, account: AcmeAccount, cfg: ReaperConfig) -> Self {
        Self {
            writes: store.clone(),
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

    /// The ledger the reaper writes, for recovery.
    pub(crate) fn store(&self) -> &Ledger {
        &self.writes
    }

    /// The same reaper (its guard, its active orders, its settings) with
    /// its writes made through `store`: in fleet mode, the ledger fenced
    /// by the lease the caller holds, so a host that lost it writes
    /// nothing more.
    pub(crate) fn writing_to(&self, store: Ledger) -> Self {
        Self {
            inner: self.inner.clone(),
            writes: store,
        }
    }

    /// The time now, Unix seconds, from the ledger's clock.
    pub(super) fn now(&self) -> i64 {
        self.inner.store.clock().now().secs()
    }

    pub(crate) fn active(&self) -> &ActiveOrders {
        &self.inner.active
    }

    pub(crate) fn account(&self) -> &AcmeAccount {
        &self.inner.account
    }

    /// The settings in force (a copy: a reload may replace them).
    pub(crate) fn config(&self) -> ReaperConfig {
        self.inner
            .cfg
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Takes new settings from a configuration reload; passes and guards
    /// that start afterwards use them.
    pub(crate) fn set_config(&self, cfg: ReaperConfig) {
        *self
            .inner
            .cfg
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = cfg;
    }

    /// Tells waiting guards that pending authorizations may have cleared.
    pub(crate) fn order_finished(&self) {
        self.inner.released.notify_waiters();
    }

    /// One pass over the ledger: every authorization still pending and
    /// created at least `older_than` ago, not part of an order being driven,
    /// is settled (or, past its `expires`, marked expired without asking).
    /// `report` sees each row and its outcome as it happens. `explicit`
    /// (an operator's `certd reap`) also retries rows still in backoff.
    pub(crate) async fn pass(
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
        let s = &self.writes;
        let now = self.now();
        let cutoff = now - i64::try_from(older_than.as_secs()).unwrap_or(i64::MAX / 2);
        let policy = Policy {
            dry_run,
            ..Policy::by(Actor::Reaper)
        };
        let mut counts = PassCounts::default();
        let mut after = 0;
        loop {
            let page = s
                .stale_pending_authz(StalePage {
                    account_id: self.inner.account.ledger_id,
                    cutoff,
                    now,
                    ignore_backoff: explicit,
                    after_id: after,
                    limit: PAGE,
                })
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
                        s.set_authz_status(&row.url, AuthzStatus::Expired, None)
                            .await?;
                    }
                    Settled::Expired
                } else {
                    self.settle(&row.url, &row.identifier, policy).await?
                };
                match &outcome {
                    Settled::Deactivated { .. } | Settled::WouldDeactivate { .. } => {
                        counts.deactivated += 1;
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
            s.event(EventKind::ReaperPass, None, None, None, Some(&detail))
                .await?;
        }
        Ok(counts)
    }
}

/// Totals of one pass.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PassCounts {
    pub(crate) examined: u64,
    pub(crate) deactivated: u64,
    pub(crate) held_back: u64,
    pub(crate) resolved: u64,
    pub(crate) failed: u64,
    pub(crate) skipped_active: u64,
}

/// The order URLs being driven right now; the reaper leaves their
/// authorizations alone.
#[derive(Clone, Default)]
pub(crate) struct ActiveOrders(Arc<Mutex<HashSet<String>>>);

impl ActiveOrders {
    /// Marks `url` active until the returned guard is dropped.
    pub(crate) fn claim(&self, url: &str) -> ActiveClaim {
        lock(&self.0).insert(url.to_owned());
        ActiveClaim {
            set: self.clone(),
            url: url.to_owned(),
        }
    }

    pub(crate) fn contains(&self, url: &str) -> bool {
        lock(&self.0).contains(url)
    }
}

pub(crate) struct ActiveClaim {
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
