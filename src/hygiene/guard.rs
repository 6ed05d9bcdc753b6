//! The guard in front of every `newOrder`: the CA's limits the ledger can
//! count (new orders, duplicate certificates), and the account's pending
//! authorizations kept under `max_pending`.
//!
//! One host reserves its admitted orders in memory until their
//! authorizations are in the ledger. A fleet shares the account, so there
//! the count is the shared ledger's and the reservation is the order's
//! intent, written in the transaction that counts (`Ledger::admit_intent`).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::acme::AcmeError;
use crate::clock::UnixTime;
use crate::ledger::{AdmitLimits, Admitted, EventKind, Identifiers, LedgerError};

use super::Reaper;

/// How long a guarded order waits for pending authorizations to clear
/// before it gives up (and the scheduler tries again later).
const GUARD_WAIT: Duration = Duration::from_secs(120);

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

/// How often a guard waiting on the shared ledger (fleet mode) counts
/// again: peers' orders that finish release nothing this host hears of.
const SHARED_RECOUNT: Duration = Duration::from_secs(2);

/// An admitted order's reservation; released when dropped.
pub(crate) struct Admission {
    reaper: Reaper,
    count: i64,
    /// Fleet mode: the intent written as the reservation, which the
    /// order's driver clears once the order is recorded.
    intent: Option<i64>,
}

impl Admission {
    /// The intent the admission wrote (fleet mode), for the driver to use
    /// as the order's intent rather than write another.
    pub(crate) fn intent(&self) -> Option<i64> {
        self.intent
    }
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
    /// The CA limits the ledger can count: new orders per account in three
    /// hours, certificates for the same names in a week. An ARI renewal
    /// (the order names the installed certificate, `replaces` its ARI id,
    /// inside the CA's suggested window) is exempt from both at the CA
    /// (Boulder's `limitsExempt`), so the guard does not hold it back;
    /// the window is asked only once a limit would.
    async fn within_limits(
        &self,
        cert_name: &str,
        identifiers: &Identifiers,
        replaces: Option<&str>,
    ) -> Result<bool, GuardError> {
        let s = self.store();
        let cfg = self.config();
        let account = self.inner.account.ledger_id;
        let now = self.now();
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
                        s.event(
                            EventKind::AriExempt,
                            Some(cert_name),
                            None,
                            None,
                            Some(&detail),
                        )
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
                return Err(self.refuse(cert_name, e).await);
            }
        }
        Ok(exempt == Some(true))
    }

    /// Records that a CA limit defers the order, and returns the error.
    async fn refuse(&self, cert_name: &str, e: GuardError) -> GuardError {
        let recorded = self
            .store()
            .event(
                EventKind::CaLimitGuard,
                Some(cert_name),
                None,
                None,
                Some(&e.to_string()),
            )
            .await;
        tracing::warn!(cert = cert_name, error = %e, "order deferred: it would exceed a CA limit");
        match recorded {
            Ok(()) => e,
            Err(l) => GuardError::Ledger(l),
        }
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
                let now = self.now();
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
    pub(crate) async fn admit(
        &self,
        cert_name: &str,
        identifiers: &Identifiers,
        replaces: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<Admission, GuardError> {
        let exempt = self.within_limits(cert_name, identifiers, replaces).await?;
        if self.store().is_shared() {
            return self
                .admit_shared(cert_name, identifiers, replaces, exempt, cancel)
                .await;
        }
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
                        intent: None,
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
                self.deferred(cert_name, pending, max).await?;
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

    /// Fleet mode's admission: the hosts share the account, so what is
    /// counted is the shared ledger, and the reservation is the intent,
    /// written in the same locked transaction as the count
    /// ([`Ledger::admit_intent`](crate::ledger::Ledger)). The CA's
    /// new-order limit is counted there again with the intents of
    /// peers' orders about to be sent.
    async fn admit_shared(
        &self,
        cert_name: &str,
        identifiers: &Identifiers,
        replaces: Option<&str>,
        mut exempt: bool,
        cancel: &CancellationToken,
    ) -> Result<Admission, GuardError> {
        const WINDOW: i64 = 3 * 3600;
        let deadline = tokio::time::Instant::now() + GUARD_WAIT;
        let mut reaped = false;
        let mut recorded = false;
        loop {
            let cfg = self.config();
            let limits = AdmitLimits {
                max_pending: cfg.max_pending,
                new_orders: (!exempt).then(|| (self.now() - WINDOW, cfg.new_orders_per_3h)),
            };
            let released = self.inner.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let admitted = self
                .store()
                .admit_intent(self.inner.account.ledger_id, cert_name, identifiers, limits)
                .await?;
            let pending = match admitted {
                Admitted::Intent(id) => {
                    return Ok(Admission {
                        reaper: self.clone(),
                        count: 0,
                        intent: Some(id),
                    });
                }
                Admitted::NewOrders { count, oldest } => {
                    if let Some(ari_id) = replaces
                        && self.in_ari_window(ari_id).await
                    {
                        exempt = true;
                        continue;
                    }
                    let e = GuardError::Limit {
                        what: "new orders in three hours",
                        count,
                        limit: cfg.new_orders_per_3h,
                        until: UnixTime::from_secs(oldest.unwrap_or_else(|| self.now()) + WINDOW),
                        account_wide: true,
                    };
                    return Err(self.refuse(cert_name, e).await);
                }
                Admitted::Full { pending } => pending,
            };
            if !reaped {
                reaped = true;
                self.pass(cfg.pending_max_age, false, false, |_, _| {})
                    .await?;
                continue;
            }
            if !recorded {
                recorded = true;
                self.deferred(cert_name, pending, cfg.max_pending).await?;
            }
            tokio::select! {
                () = &mut released => {}
                () = tokio::time::sleep(SHARED_RECOUNT) => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Err(GuardError::Full { pending, max: cfg.max_pending });
                }
                () = cancel.cancelled() => return Err(GuardError::Cancelled),
            }
        }
    }

    /// Records that `max_pending` defers the order.
    async fn deferred(&self, cert_name: &str, pending: i64, max: u32) -> Result<(), GuardError> {
        let detail = format!("{pending} pending authorizations, max_pending {max}: order deferred");
        self.store()
            .event(
                EventKind::PendingAuthzGuard,
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
        Ok(())
    }
}
