//! Leases with fencing: which host may act for a certificate, a reaper or
//! account creation, and proof of it on every write.
//!
//! A lease is a row in `leases`. Claiming it succeeds only when it is free
//! or expired by the database's clock (`now()`), and raises its epoch; the
//! epoch is the fencing token. Host clocks are never compared.
//!
//! The holder keeps a lease by renewing it every ttl/3 from a task of its
//! own ([`Lease::keep_renewed`]), so a slow step of the work itself cannot
//! starve it. Two guards stop a holder that lost its lease without knowing:
//!
//! - **The fence.** Every write is one transaction that first locks the
//!   lease row (`FOR SHARE`) and checks holder, epoch and expiry
//!   ([`Lease::begin_fenced`]); otherwise it rolls back with [`Fenced`].
//!   `FOR SHARE` conflicts with a claimer's `UPDATE`, so a takeover waits for
//!   a fenced write in flight, and a fenced write that waited on a takeover
//!   re-reads the row and is refused.
//! - **The local deadline.** Requests to the CA do not go through the
//!   database, so the holder also stops itself: its deadline is the time it
//!   sent its last successful renewal plus ttl minus a margin, on
//!   `CLOCK_BOOTTIME` (monotonic, and unlike `CLOCK_MONOTONIC` it counts
//!   time the machine was suspended). The database ends the lease no
//!   earlier than the sending time plus ttl, so a holder that checks
//!   [`Lease::check_deadline`] before each request stops before any peer
//!   can claim. The margin covers clock rate drift and the time between
//!   the check and the send. Once the deadline has passed, the lease stays
//!   dead for this holder: it must claim again, under a new epoch.
//!
//! Release (on handover, e.g. SIGTERM) clears the holder and keeps the
//! epoch. No session advisory locks: they never expire, carry no token,
//! and break behind connection poolers.
//!
//! The statements (claim, renew, release, the fence's check) are the
//! ledger's (`crate::ledger::fleet`); this module keeps what they mean.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::db::{DbError, FleetDb};
use crate::ledger::Fence;
use crate::ledger::fleet::{Expired, FencedWrite};

/// What a lease is for; its row's name is `cert:<name>`,
/// `reaper:<account>` or `account:<directory>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LeaseName {
    /// Ordering and renewing one certificate.
    Cert(String),
    /// The reaper pass over one account's authorizations.
    Reaper(String),
    /// Creating the ACME account at one directory URL.
    Account(String),
}

/// Who holds a lease: a host of the fleet (its `host_id`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HolderId(String);

/// A lease's fencing token: raised by every claim, never lowered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(i64);

/// A lease's length and the local safety margin, checked together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    ttl: Duration,
    margin: Duration,
}

/// A claimed lease. Clones share one state, so the renewal task and the
/// work see the same deadline.
#[derive(Debug, Clone)]
pub struct Lease {
    inner: Arc<Inner>,
}

/// A transaction whose first statement found the lease still held; see
/// [`Lease::begin_fenced`]. Dropping it rolls back.
pub struct FencedTx {
    write: FencedWrite,
    lease: Lease,
}

/// Keeps a lease renewed until stopped, dropped, or the lease is lost.
#[derive(Debug)]
pub struct Renewer {
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
    status: watch::Receiver<RenewStatus>,
}

/// What the renewal task has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RenewStatus {
    /// Renewals the database confirmed.
    pub renewals: u64,
    /// Attempts that failed (database down, timeout), retried.
    pub failures: u64,
    /// The last failure's message.
    pub last_error: Option<String>,
    /// Whether the task has stopped, and why.
    pub ended: Option<RenewEnd>,
}

/// Why a renewal task stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewEnd {
    /// Its owner stopped it.
    Stopped,
    /// The database said the lease is no longer ours.
    Lost,
    /// The local deadline passed before a renewal got through.
    PastDeadline,
}

/// The database refused a fenced write or renewal: the lease expired or
/// another holder claimed it. The transaction was rolled back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("lease {name} (epoch {epoch}) is no longer held by {holder}: it expired or was taken over")]
pub struct Fenced {
    pub name: LeaseName,
    pub holder: HolderId,
    pub epoch: Epoch,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Fenced(#[from] Fenced),
    #[error(
        "lease {name} (epoch {epoch}): the local deadline has passed; nothing more may be sent under it"
    )]
    PastDeadline { name: LeaseName, epoch: Epoch },
    #[error("lease {name} (epoch {epoch}) was released")]
    Released { name: LeaseName, epoch: Epoch },
    #[error("lease {name} is not a certificate's lease; it cannot write certificate data")]
    NotACertificate { name: LeaseName },
    #[error("lease {name} is not an account's lease; it cannot write an account key")]
    NotAnAccount { name: LeaseName },
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Why a lease's timing is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    #[error("lease ttl {0:?} is too short; it must be at least {MIN_TTL:?}")]
    TtlTooShort(Duration),
    #[error("lease margin {margin:?} must be shorter than the ttl {ttl:?}")]
    MarginTooLong { ttl: Duration, margin: Duration },
}

/// The shortest ttl: renewals go every ttl/3, and a database round trip
/// must fit in that with room to spare.
pub const MIN_TTL: Duration = Duration::from_millis(300);

#[derive(Debug)]
struct Inner {
    name: LeaseName,
    holder: HolderId,
    epoch: Epoch,
    /// The holder whose expired lease this claim took, if any.
    previous: Option<Expired>,
    timing: LeaseTiming,
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Held until `deadline` unless renewed.
    Held { deadline: BootInstant },
    /// Gone for good: the deadline passed, the fence refused, or released.
    Dead(Death),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Death {
    PastDeadline,
    Fenced,
    Released,
}

/// A reading of `CLOCK_BOOTTIME`: monotonic, and counting suspend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct BootInstant(Duration);

impl Lease {
    /// Claims `name` for `holder` if it is free or expired by the
    /// database's clock; `None` if another holder has it. Concurrent
    /// claimers are serialized by the row (`ON CONFLICT` re-checks the
    /// newest version), so exactly one wins.
    pub async fn claim(
        db: &FleetDb,
        name: LeaseName,
        holder: HolderId,
        timing: LeaseTiming,
    ) -> Result<Option<Lease>, LeaseError> {
        let sent = BootInstant::now();
        let claimed = db
            .store()
            .claim_lease(&name.key(), holder.as_str(), timing.ttl)
            .await?;
        Ok(claimed.map(|claimed| Lease {
            inner: Arc::new(Inner {
                name,
                holder,
                epoch: Epoch(claimed.epoch),
                previous: claimed.previous,
                timing,
                state: Mutex::new(State::Held {
                    deadline: timing.deadline_after(sent),
                }),
            }),
        }))
    }

    /// How long until another holder's lease `name` runs out by the
    /// database's clock, when this host may claim it; `None` if it is
    /// free.
    pub async fn remaining(db: &FleetDb, name: &LeaseName) -> Result<Option<Duration>, LeaseError> {
        Ok(db.store().lease_remaining(&name.key()).await?)
    }

    pub fn name(&self) -> &LeaseName {
        &self.inner.name
    }

    pub fn holder(&self) -> &HolderId {
        &self.inner.holder
    }

    pub fn epoch(&self) -> Epoch {
        self.inner.epoch
    }

    /// The holder whose lease had run out when this claim took it (it
    /// died, hung or lost the database), and for how long it had been
    /// expired; `None` after a release or for a first claim.
    pub fn took_over_from(&self) -> Option<&Expired> {
        self.inner.previous.as_ref()
    }

    pub fn timing(&self) -> LeaseTiming {
        self.inner.timing
    }

    /// Whether the holder may still send anything under this lease (a CA
    /// request above all), and for how long at most. Call it right before
    /// each send. Once it refuses, it always will.
    pub fn check_deadline(&self) -> Result<Duration, LeaseError> {
        let mut state = self.state();
        match *state {
            State::Held { deadline } => {
                let now = BootInstant::now();
                if now < deadline {
                    return Ok(deadline.0.checked_sub(now.0).unwrap());
                }
                *state = State::Dead(Death::PastDeadline);
                Err(self.dead(Death::PastDeadline))
            }
            State::Dead(death) => Err(self.dead(death)),
        }
    }

    /// Extends the lease by its ttl from now (the database's now), if it
    /// is still this holder's and unexpired. Renewing after the local
    /// deadline is refused without asking: the holder already stopped.
    pub async fn renew(&self, db: &FleetDb) -> Result<(), LeaseError> {
        self.check_deadline()?;
        let sent = BootInstant::now();
        let renewed = db
            .store()
            .renew_lease(&self.fence(), self.inner.timing.ttl)
            .await?;
        if !renewed {
            return Err(self.kill(Death::Fenced));
        }
        let mut state = self.state();
        // A deadline seen to pass stays passed, even if this renewal was
        // sent just before it: the work already stopped.
        if let State::Held { deadline } = &mut *state {
            *deadline = (*deadline).max(self.inner.timing.deadline_after(sent));
        }
        Ok(())
    }

    /// Hands the lease back (on shutdown, or when the work is done): clears
    /// the holder and keeps the epoch, so the next claim gets epoch + 1 at
    /// once instead of waiting for expiry. Peers listening on
    /// `certd_lease` hear the lease's name. Returns whether the lease was
    /// still ours to release.
    pub async fn release(&self, db: &FleetDb) -> Result<bool, LeaseError> {
        let _ = self.kill(Death::Released);
        Ok(db.store().release_lease(&self.fence()).await?)
    }

    /// Opens a transaction whose first statement locks this lease's row
    /// and checks that it is still ours (holder, epoch, and unexpired by
    /// the database's clock). If not, the transaction is rolled back and
    /// the lease is dead for this holder: [`Fenced`].
    pub async fn begin_fenced(&self, db: &FleetDb) -> Result<FencedTx, LeaseError> {
        if let State::Dead(death) = *self.state() {
            return Err(self.dead(death));
        }
        match db.store().begin_fenced(self.fence()).await? {
            Some(write) => Ok(FencedTx {
                write,
                lease: self.clone(),
            }),
            None => Err(self.kill(Death::Fenced)),
        }
    }

    /// The lease as the ledger checks it on a fenced write: name, holder
    /// and epoch.
    pub fn fence(&self) -> Fence {
        Fence {
            lease: self.inner.name.key(),
            holder: self.inner.holder.0.clone(),
            epoch: self.inner.epoch.0,
        }
    }

    /// Renews this lease every ttl/3 from a task of its own, until
    /// `cancel` fires, the returned [`Renewer`] is stopped or dropped, the
    /// database says the lease is gone, or the local deadline passes.
    /// Failed attempts (database unreachable) are retried at the next tick;
    /// each is cut off after ttl/3, so a hung connection cannot hold the
    /// deadline back.
    pub fn keep_renewed(&self, db: FleetDb, cancel: &CancellationToken) -> Renewer {
        let cancel = cancel.child_token();
        let (tx, status) = watch::channel(RenewStatus::default());
        let task = tokio::spawn(renew_loop(self.clone(), db, cancel.clone(), tx));
        Renewer {
            cancel,
            task: Some(task),
            status,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is one enum written whole; a panic elsewhere cannot
        // leave it half-written.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the lease dead (if it was not already) and returns the error
    /// that says why it is.
    fn kill(&self, death: Death) -> LeaseError {
        let mut state = self.state();
        let death = match *state {
            State::Dead(earlier) => earlier,
            State::Held { .. } => {
                *state = State::Dead(death);
                death
            }
        };
        self.dead(death)
    }

    fn dead(&self, death: Death) -> LeaseError {
        let (name, epoch) = (self.inner.name.clone(), self.inner.epoch);
        match death {
            Death::PastDeadline => LeaseError::PastDeadline { name, epoch },
            Death::Released => LeaseError::Released { name, epoch },
            Death::Fenced => LeaseError::Fenced(Fenced {
                name,
                holder: self.inner.holder.clone(),
                epoch,
            }),
        }
    }
}

async fn renew_loop(
    lease: Lease,
    db: FleetDb,
    cancel: CancellationToken,
    status: watch::Sender<RenewStatus>,
) {
    let period = lease.inner.timing.ttl / 3;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let end = loop {
        tokio::select! {
            () = cancel.cancelled() => break RenewEnd::Stopped,
            _ = tick.tick() => {}
        }
        let attempt = tokio::select! {
            () = cancel.cancelled() => break RenewEnd::Stopped,
            r = tokio::time::timeout(period, lease.renew(&db)) => r,
        };
        let failure = match attempt {
            Ok(Ok(())) => {
                status.send_modify(|s| s.renewals += 1);
                continue;
            }
            Ok(Err(LeaseError::Fenced(_))) => break RenewEnd::Lost,
            Ok(Err(LeaseError::PastDeadline { .. })) => break RenewEnd::PastDeadline,
            Ok(Err(LeaseError::Released { .. })) => break RenewEnd::Stopped,
            // renew() returns neither; a failure like any other if it did.
            Ok(Err(
                e @ (LeaseError::Db(_)
                | LeaseError::NotACertificate { .. }
                | LeaseError::NotAnAccount { .. }),
            )) => e.to_string(),
            Err(_) => format!("no answer from the database within {period:?}"),
        };
        tracing::warn!(lease = %lease.name(), epoch = %lease.epoch(), error = %failure, "lease renewal failed; retrying");
        status.send_modify(|s| {
            s.failures += 1;
            s.last_error = Some(failure);
        });
    };
    if end != RenewEnd::Stopped {
        tracing::warn!(lease = %lease.name(), epoch = %lease.epoch(), reason = ?end, "lease lost; this host stops acting under it");
    }
    status.send_modify(|s| s.ended = Some(end));
}

impl Renewer {
    /// The renewal task's progress, to watch (`wait_for`) or read.
    pub fn status(&self) -> watch::Receiver<RenewStatus> {
        self.status.clone()
    }

    /// Stops the task and waits for it; returns what it did.
    pub async fn stop(mut self) -> RenewStatus {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            // The task only fails by panicking, and its status says the
            // rest.
            let _ = task.await;
        }
        self.status.borrow().clone()
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl FencedTx {
    /// The ledger's transaction, for the writes it fences.
    pub(super) fn write(&mut self) -> &mut FencedWrite {
        &mut self.write
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    pub fn epoch(&self) -> Epoch {
        self.lease.epoch()
    }

    /// The certificate this transaction may write for: a `cert:` lease's
    /// name. Other leases cannot write certificate data.
    pub fn cert_name(&self) -> Result<&str, LeaseError> {
        match self.lease.name() {
            LeaseName::Cert(name) => Ok(name),
            other => Err(LeaseError::NotACertificate {
                name: other.clone(),
            }),
        }
    }

    /// The ACME directory this transaction may store the account key of:
    /// an `account:` lease's subject.
    pub fn account_directory(&self) -> Result<&str, LeaseError> {
        match self.lease.name() {
            LeaseName::Account(directory) => Ok(directory),
            other => Err(LeaseError::NotAnAccount {
                name: other.clone(),
            }),
        }
    }

    /// Commits the writes. The lease row stayed locked since the check, so
    /// no takeover came in between.
    pub async fn commit(self) -> Result<(), LeaseError> {
        Ok(self.write.commit().await?)
    }
}

impl fmt::Debug for FencedTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FencedTx")
            .field("lease", &self.lease.name())
            .field("epoch", &self.lease.epoch())
            .finish_non_exhaustive()
    }
}

impl LeaseName {
    /// The row's name: `cert:www`.
    pub fn key(&self) -> String {
        self.to_string()
    }

    /// What the lease is for, without its kind: `www` for `cert:www`.
    pub fn subject(&self) -> &str {
        match self {
            Self::Cert(s) | Self::Reaper(s) | Self::Account(s) => s,
        }
    }
}

impl fmt::Display for LeaseName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cert(name) => write!(f, "cert:{name}"),
            Self::Reaper(account) => write!(f, "reaper:{account}"),
            Self::Account(directory) => write!(f, "account:{directory}"),
        }
    }
}

impl HolderId {
    /// A holder named by the host's fleet id; `None` if empty.
    pub fn new(host_id: &str) -> Option<Self> {
        let id = host_id.trim();
        (!id.is_empty() && !id.chars().any(char::is_control)).then(|| Self(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HolderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Epoch {
    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl LeaseTiming {
    /// Fleet mode's default: 30 s leases, renewed every 10 s, and a holder
    /// that stops 2 s before its lease could end.
    pub const DEFAULT: Self = Self {
        ttl: Duration::from_secs(30),
        margin: Duration::from_secs(2),
    };

    pub fn new(ttl: Duration, margin: Duration) -> Result<Self, TimingError> {
        if ttl < MIN_TTL {
            return Err(TimingError::TtlTooShort(ttl));
        }
        if margin >= ttl {
            return Err(TimingError::MarginTooLong { ttl, margin });
        }
        Ok(Self { ttl, margin })
    }

    pub fn ttl(self) -> Duration {
        self.ttl
    }

    pub fn margin(self) -> Duration {
        self.margin
    }

    fn deadline_after(self, sent: BootInstant) -> BootInstant {
        // Saturating: a clock that failed reads as the end of time, and a
        // deadline after it is then as good as passed.
        BootInstant(
            sent.0
                .saturating_add(self.ttl.checked_sub(self.margin).unwrap()),
        )
    }
}

impl BootInstant {
    fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec that outlives the
        // call, which is all clock_gettime writes to.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &raw mut ts) };
        // Invariant: clock_gettime fails only for an unknown clock id
        // (CLOCK_BOOTTIME exists since Linux 2.6.39) or a bad pointer
        // (ours is valid). Should it fail anyway, it reads as the end of
        // time, so every deadline is judged passed: the safe side.
        if rc != 0 {
            return Self(Duration::MAX);
        }
        Self(Duration::new(
            u64::try_from(ts.tv_sec).unwrap_or(0),
            u32::try_from(ts.tv_nsec).unwrap_or(0),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_needs_a_margin_shorter_than_the_ttl() {
        let s = Duration::from_secs;
        assert_eq!(LeaseTiming::new(s(30), s(2)), Ok(LeaseTiming::DEFAULT));
        assert!(matches!(
            LeaseTiming::new(s(2), s(2)),
            Err(TimingError::MarginTooLong { .. })
        ));
        assert!(matches!(
            LeaseTiming::new(Duration::from_millis(299), Duration::ZERO),
            Err(TimingError::TtlTooShort(_))
        ));
    }

    #[test]
    fn boot_clock_moves_forward() {
        let a = BootInstant::now();
        let b = BootInstant::now();
        assert!(a.0 > Duration::ZERO && b >= a, "{a:?} {b:?}");
    }

    #[test]
    fn lease_names_are_kind_and_subject() {
        assert_eq!(LeaseName::Cert("www".into()).key(), "cert:www");
        assert_eq!(LeaseName::Reaper("7".into()).key(), "reaper:7");
        assert_eq!(
            LeaseName::Account("https://ca/dir".into()).key(),
            "account:https://ca/dir"
        );
        assert_eq!(LeaseName::Cert("www".into()).subject(), "www");
        assert_eq!(HolderId::new(" "), None);
        assert_eq!(HolderId::new("a\nb"), None);
        assert_eq!(HolderId::new("web-1").unwrap().as_str(), "web-1");
    }
}
