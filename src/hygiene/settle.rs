//! Settling one authorization, the only way certd gets rid of one.
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

use crate::acme::AcmeError;
use crate::acme::raw::{deactivate_authz, fetch_authz};
use crate::ledger::{Actor, AuthzStatus, EventKind, LedgerError};

use super::Reaper;

/// What became of one authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settled {
    Deactivated {
        from: AuthzStatus,
    },
    WouldDeactivate {
        from: AuthzStatus,
    },
    /// Deactivating now would exceed the identifier's failure budget.
    HeldBack {
        failures: i64,
        limit: u32,
    },
    /// The CA says it is no longer pending (valid, invalid, deactivated…).
    NotPending(AuthzStatus),
    /// The CA accepted the deactivation request, but its answer shows the
    /// authorization in another status (pending, valid…): not deactivated.
    Refused {
        status: AuthzStatus,
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
    pub(crate) fn is_done(&self) -> bool {
        !matches!(
            self,
            Self::HeldBack { .. } | Self::Failed(_) | Self::Refused { .. } | Self::SkippedValid
        )
    }
}

/// How `settle` may act.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// Who asks, for the ledger.
    pub(crate) by: Actor,
    pub(crate) dry_run: bool,
    /// Deactivate valid authorizations too (free at the CA).
    pub(crate) include_valid: bool,
    /// Deactivate even past the failure budget (an operator's explicit wish).
    pub(crate) ignore_budget: bool,
}

impl Policy {
    pub(crate) fn by(by: Actor) -> Self {
        Self {
            by,
            dry_run: false,
            include_valid: false,
            ignore_budget: false,
        }
    }
}

impl Reaper {
    /// Asks the CA about `url` and deactivates it if it is still pending
    /// (or valid, with `include_valid`) and the failure budget allows.
    /// Whatever status the CA reports is written to the ledger (except on a
    /// dry run), so no row stays `pending` for an authorization the CA has
    /// long validated: the guard counts those rows.
    pub(crate) async fn settle(
        &self,
        url: &str,
        identifier: &str,
        policy: Policy,
    ) -> Result<Settled, LedgerError> {
        let s = self.store();
        let account = &self.inner.account;
        let now = self.now();
        let authz = match fetch_authz(&account.http, &account.signer(), url).await {
            Ok(a) => a,
            Err(e) => return self.failed(url, identifier, e, policy).await,
        };
        let from = match ca_status(url, &authz.status) {
            Ok(status) => status,
            Err(e) => return self.failed(url, identifier, e, policy).await,
        };
        if !policy.dry_run {
            s.authz_check_ok(url).await?;
            if from != AuthzStatus::Pending {
                s.set_authz_status(url, from, None).await?;
                self.inner.released.notify_waiters();
            }
        }
        match from {
            AuthzStatus::Pending => {}
            AuthzStatus::Valid if policy.include_valid => {}
            AuthzStatus::Valid => return Ok(Settled::SkippedValid),
            AuthzStatus::Invalid
            | AuthzStatus::Deactivated
            | AuthzStatus::Expired
            | AuthzStatus::Revoked
            | AuthzStatus::Gone => return Ok(Settled::NotPending(from)),
        }
        if from == AuthzStatus::Pending && !policy.ignore_budget {
            let limit = self.config().failed_authz_per_identifier_per_hour;
            let failures = s
                .failures_since(account.ledger_id, identifier, now - 3600)
                .await?;
            if failures >= i64::from(limit) {
                if !policy.dry_run {
                    let detail = format!(
                        "{failures} failed authorizations for {identifier} in the last hour (limit {limit}); deactivation deferred"
                    );
                    s.event(EventKind::HeldBack, None, None, Some(url), Some(&detail))
                        .await?;
                }
                return Ok(Settled::HeldBack { failures, limit });
            }
        }
        if policy.dry_run {
            return Ok(Settled::WouldDeactivate { from });
        }
        match deactivate_authz(&account.http, &account.signer(), url).await {
            Ok(answer) => match ca_status(url, &answer.status) {
                Ok(AuthzStatus::Deactivated) => {
                    self.deactivated(url, identifier, from, policy).await
                }
                Ok(status) => self.refused(url, identifier, from, status).await,
                Err(e) => self.failed(url, identifier, e, policy).await,
            },
            Err(e) => self.failed(url, identifier, e, policy).await,
        }
    }

    /// The CA confirmed a deactivation.
    async fn deactivated(
        &self,
        url: &str,
        identifier: &str,
        from: AuthzStatus,
        policy: Policy,
    ) -> Result<Settled, LedgerError> {
        let s = self.store();
        s.set_authz_deactivated(url, policy.by, from).await?;
        let detail = format!("{identifier} was {from}; deactivated by {}", policy.by);
        s.event(EventKind::Deactivated, None, None, Some(url), Some(&detail))
            .await?;
        tracing::info!(authz = %url, identifier, from = %from, by = %policy.by, "deactivated authorization");
        self.inner.released.notify_waiters();
        Ok(Settled::Deactivated { from })
    }

    /// The CA answered a deactivation with the authorization in another
    /// status: the ledger keeps that status, and the row backs off like a
    /// failed call so a server that ignores deactivations is not asked at
    /// every pass.
    async fn refused(
        &self,
        url: &str,
        identifier: &str,
        from: AuthzStatus,
        status: AuthzStatus,
    ) -> Result<Settled, LedgerError> {
        let s = self.store();
        let detail = format!(
            "{identifier} was {from}; the CA answered the deactivation with status {status}"
        );
        if status != from {
            s.set_authz_status(url, status, None).await?;
            self.inner.released.notify_waiters();
        }
        s.authz_check_failed(url, self.now(), &detail).await?;
        s.event(
            EventKind::DeactivateRefused,
            None,
            None,
            Some(url),
            Some(&detail),
        )
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
        let s = self.store();
        if e.problem().is_some_and(|p| p.status == Some(404)) {
            if !policy.dry_run {
                s.set_authz_status(url, AuthzStatus::Gone, None).await?;
            }
            return Ok(Settled::Gone);
        }
        let msg = e.to_string();
        if !policy.dry_run {
            s.authz_check_failed(url, self.now(), &msg).await?;
            s.event(EventKind::ReaperError, None, None, Some(url), Some(&msg))
                .await?;
        }
        tracing::warn!(authz = %url, identifier, error = %msg, "cannot settle authorization; will retry");
        Ok(Settled::Failed(msg))
    }
}

/// The status a CA's authorization object states, as the ledger's type; a
/// status RFC 8555 does not define is the CA's error, retried like one.
fn ca_status(url: &str, status: &str) -> Result<AuthzStatus, AcmeError> {
    status
        .parse()
        .map_err(|e| AcmeError::Protocol(format!("{url}: {e}")))
}
