//! Fleet mode's order path: a certificate is renewed only by the host that
//! holds its lease (`cert:<name>`), and only while it holds it.
//!
//! [`under_lease`] claims the lease (another live holder: the host does
//! not order, [`DriveError::LeasedElsewhere`]), keeps it renewed from a
//! task of its own at ttl/3, and runs the work with
//!
//! - the ledger fenced by the lease (`Ledger::fenced`): a write after a
//!   takeover is refused by the database;
//! - a request gate on the ACME client ([`gated`]): before each request
//!   the lease's local deadline is checked, and past it nothing is sent;
//! - a cancellation token that the renewal task's end cancels, so an order
//!   whose lease was lost stops at its next step.
//!
//! The lease is released when the work ends, however it ends (at
//! shutdown too: the order stays for a peer to resume, see `order`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::acme::{GateClosed, RequestGate, gated};
use crate::fleet::{Fenced, Lease, LeaseError, LeaseName, RenewEnd, RenewStatus, Renewer};
use crate::hygiene::{PassCounts, Reaper};
use crate::ledger::{Fence, Ledger, LedgerError};
use crate::metrics::{LeaseCounters, LeaseLoss};
use crate::order::DriveError;

use super::Services;
use super::fleet::Fleet;

/// This host's leases: the counters the metrics page shows, and the epoch
/// it last released each lease at, which tells a takeover (another
/// holder had the lease since) from this host claiming its own again.
/// Cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct Leases {
    pub(crate) counters: LeaseCounters,
    released: Arc<Mutex<HashMap<LeaseName, i64>>>,
}

impl Leases {
    /// Claims `name` and runs `work` under it, its requests to the CA
    /// gated by the lease's deadline, then releases it: what needs one
    /// host of the fleet at a time (a reaper pass over an account's
    /// authorizations). `work` gets the lease's [`Fence`], for its ledger
    /// writes. `None`: another host holds it, and `work` did not run.
    pub(crate) async fn with_lease<T, Fut>(
        &self,
        fleet: &Fleet,
        name: LeaseName,
        work: impl FnOnce(Fence) -> Fut,
    ) -> Result<Option<T>, LeaseError>
    where
        Fut: Future<Output = T>,
    {
        let Some(lease) =
            Lease::claim(&fleet.db, name.clone(), fleet.holder.clone(), fleet.timing).await?
        else {
            tracing::debug!(lease = %name, "held by another host");
            return Ok(None);
        };
        let _held = self.counters.held();
        let renewer = lease.keep_renewed(fleet.db.clone(), &CancellationToken::new());
        let fence = Fence {
            lease: name.key(),
            holder: fleet.holder.as_str().to_owned(),
            epoch: lease.epoch().get(),
        };
        let out = gated(Arc::new(LeaseGate(lease.clone())), work(fence)).await;
        self.end(fleet, &lease, renewer).await;
        Ok(Some(out))
    }

    /// Stops renewing `lease`, counts it lost if it was, and releases it.
    /// Returns how it was lost, if it was.
    async fn end(&self, fleet: &Fleet, lease: &Lease, renewer: Renewer) -> Option<LeaseLoss> {
        let lost = match renewer.stop().await.ended {
            Some(RenewEnd::Lost) => Some(LeaseLoss::Fenced),
            Some(RenewEnd::PastDeadline) => Some(LeaseLoss::Deadline),
            // The work saw the lease end (a request its gate refused, a
            // write its fence did) before the renewal task's next tick:
            // lost all the same, and said so the same way.
            Some(RenewEnd::Stopped) | None => match lease.check_deadline() {
                Ok(_) | Err(LeaseError::Released { .. }) => None,
                Err(e) => {
                    tracing::warn!(lease = %lease.name(), epoch = %lease.epoch(), reason = %e, "lease lost; this host stops acting under it");
                    Some(match e {
                        LeaseError::Fenced(_) => LeaseLoss::Fenced,
                        _ => LeaseLoss::Deadline,
                    })
                }
            },
        };
        if let Some(why) = lost {
            self.counters.lost(why);
        }
        match lease.release(&fleet.db).await {
            Ok(true) => {
                lock(&self.released).insert(lease.name().clone(), lease.epoch().get());
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(lease = %lease.name(), error = %e, "cannot release the lease; it expires on its own");
            }
        }
        lost
    }
}

/// Refuses requests once the lease's local deadline has passed.
struct LeaseGate(Lease);

impl RequestGate for LeaseGate {
    fn check(&self) -> Result<(), GateClosed> {
        self.0
            .check_deadline()
            .map(|_| ())
            .map_err(|e| gate_closed(&e))
    }

    /// The local deadline passing, or the renewal task finding the lease
    /// gone (looked at every [`GATE_LOOK`]).
    fn closed(&self) -> Pin<Box<dyn Future<Output = GateClosed> + Send + '_>> {
        Box::pin(async move {
            loop {
                match self.0.check_deadline() {
                    Ok(left) => tokio::time::sleep(left.min(GATE_LOOK)).await,
                    Err(e) => return gate_closed(&e),
                }
            }
        })
    }
}

/// How often a request under way looks whether its lease is still held.
const GATE_LOOK: Duration = Duration::from_millis(250);

fn gate_closed(e: &LeaseError) -> GateClosed {
    GateClosed(format!("lease lost: self-fenced, nothing sent ({e})"))
}

/// Runs `work` for the certificate `name` under its lease: with the
/// ledger fenced by it, the lease itself (for the fleet's own fenced
/// writes) and a token cancelled when `cancel` fires or the
/// lease is lost. Another holder: [`DriveError::LeasedElsewhere`], and
/// `work` does not run.
pub(crate) async fn under_lease<T, F, Fut>(
    fleet: &Fleet,
    leases: &Leases,
    store: &Ledger,
    name: &str,
    cancel: &CancellationToken,
    work: F,
) -> Result<T, DriveError>
where
    F: FnOnce(Ledger, Lease, CancellationToken) -> Fut,
    Fut: Future<Output = Result<T, DriveError>>,
{
    let lease_name = LeaseName::Cert(name.to_owned());
    let Some(lease) = claim_promptly(fleet, &lease_name, cancel).await? else {
        tracing::debug!(cert = name, lease = %lease_name, "held by another host; not ordering it now");
        // A failed read only costs the prompt retry.
        let retry_after = Lease::remaining(&fleet.db, &lease_name)
            .await
            .ok()
            .flatten();
        return Err(DriveError::LeasedElsewhere {
            lease: lease_name.key(),
            retry_after,
        });
    };
    let _held = leases.counters.held();
    let epoch = lease.epoch().get();
    let ours_before = lock(&leases.released).get(&lease_name) == Some(&(epoch - 1));
    if epoch > 1 && !ours_before {
        leases.counters.takeover();
        tracing::info!(cert = name, lease = %lease_name, epoch, "took the lease over");
    }
    if let Some(previous) = lease.took_over_from()
        && previous.holder != fleet.holder.as_str()
    {
        // Its last renewal was a ttl before its lease ran out (hosts of a
        // fleet share `lease_ttl`).
        let after = previous.expired_for + fleet.timing.ttl();
        leases.counters.failover(after);
        tracing::info!(cert = name, lease = %lease_name, from = %previous.holder, seconds = after.as_secs_f64(), "failover");
    }
    let fenced = store.fenced(Fence {
        lease: lease_name.key(),
        holder: fleet.holder.as_str().to_owned(),
        epoch,
    });
    // Its own token: at shutdown the lease stays renewed while the order
    // winds down and hands over, until it is released below.
    let renewer = lease.keep_renewed(fleet.db.clone(), &CancellationToken::new());
    let token = cancel.child_token();
    let order = gated(
        Arc::new(LeaseGate(lease.clone())),
        work(fenced, lease.clone(), token.clone()),
    );
    let result = run_until_lost(order, renewer.status(), &token).await;
    if matches!(result, Err(DriveError::Ledger(LedgerError::Fenced { .. }))) {
        leases.counters.fenced_write();
    }
    let lost = leases.end(fleet, &lease, renewer).await;
    match (result, lost) {
        // An order stopped while the lease was lost says so, whatever
        // stopped it: cancelled by the loss, a request its gate refused,
        // or a ledger write that failed meanwhile (a host stopped in the
        // middle of one wakes to find the database ended its
        // transaction). It is another host's turn, not a failure to retry.
        (Err(e), Some(why)) if !matches!(e, DriveError::Lease(_)) => {
            tracing::debug!(cert = name, error = %e, "the order stopped once its lease was lost");
            Err(DriveError::Lease(match why {
                LeaseLoss::Deadline => LeaseError::PastDeadline {
                    name: lease_name,
                    epoch: lease.epoch(),
                },
                LeaseLoss::Fenced => LeaseError::Fenced(Fenced {
                    name: lease_name,
                    holder: fleet.holder.clone(),
                    epoch: lease.epoch(),
                }),
            }))
        }
        (result, _) => result,
    }
}

/// Another holder's lease this close to running out is waited for, to
/// the millisecond, rather than left to the scheduler's whole seconds: a
/// failover then comes right after the expiry the database judges.
const PROMPT_CLAIM: Duration = Duration::from_secs(2);

/// Claims `name`; if another holder has it but its lease runs out within
/// [`PROMPT_CLAIM`] (it died, or is about to renew), waits until just
/// after that and claims once more.
async fn claim_promptly(
    fleet: &Fleet,
    name: &LeaseName,
    cancel: &CancellationToken,
) -> Result<Option<Lease>, LeaseError> {
    let claim = || Lease::claim(&fleet.db, name.clone(), fleet.holder.clone(), fleet.timing);
    if let Some(lease) = claim().await? {
        return Ok(Some(lease));
    }
    match Lease::remaining(&fleet.db, name).await? {
        Some(left) if left <= PROMPT_CLAIM => {
            tokio::select! {
                () = tokio::time::sleep(left + Duration::from_millis(50)) => claim().await,
                () = cancel.cancelled() => Ok(None),
            }
        }
        _ => Ok(None),
    }
}

/// Awaits `order`; should the renewal task end first (the lease lost),
/// cancels `token` so the order stops at its next step, and awaits it
/// still.
async fn run_until_lost<T>(
    order: impl Future<Output = T>,
    mut status: watch::Receiver<RenewStatus>,
    token: &CancellationToken,
) -> T {
    let mut order = std::pin::pin!(order);
    let lost = async {
        let ended = status.wait_for(|s| s.ended.is_some_and(|e| e != RenewEnd::Stopped));
        if ended.await.is_err() {
            // The task is gone without a word (it panicked): the
            // deadline gate still stops the order's requests.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        out = &mut order => return out,
        () = lost => {}
    }
    token.cancel();
    order.await
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One reaper pass over `reaper`'s account; in fleet mode under the
/// account's reaper lease (`reaper:<account>`), and none while another
/// host holds it, so one host of the fleet reaps an account at a time.
pub(crate) async fn reaper_pass(
    services: &Services,
    reaper: &Reaper,
    max_age: Duration,
) -> Result<PassCounts, LedgerError> {
    let Some(fleet) = &services.fleet else {
        return reaper.pass(max_age, false, false, |_, _| {}).await;
    };
    let name = LeaseName::Reaper(reaper.account().ledger_id.to_string());
    let held = services
        .leases
        .with_lease(fleet, name, |fence| {
            // Its settle and deactivate writes under the reaper lease's
            // fence: a host that lost the lease mid-pass writes nothing.
            let reaper = reaper.writing_to(reaper.store().fenced(fence));
            async move {
                // Another host may have rolled the account's key over.
                let state_dir = &services.cfg.storage.state_dir;
                if let Err(e) = fleet.refresh_account_key(reaper.account(), state_dir).await {
                    tracing::warn!(error = %e, "fleet: cannot check the account key; no reaper pass now");
                    return Ok(PassCounts::default());
                }
                reaper.pass(max_age, false, false, |_, _| {}).await
            }
        })
        .await;
    match held {
        Ok(Some(counts)) => counts,
        Ok(None) => Ok(PassCounts::default()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot claim the reaper lease; no pass now");
            Ok(PassCounts::default())
        }
    }
}

/// A one-shot command's `work` (`certd reap`, `revoke`, `authz
/// deactivate`) in fleet mode, under the lease `name` as a daemon would
/// hold it: its requests gated by the lease's deadline, its writes made
/// through the shared ledger fenced by it. `None`: another host holds
/// the lease, and `work` did not run.
pub(crate) async fn one_shot_under<T, Fut>(
    services: &Services,
    fleet: &Fleet,
    name: LeaseName,
    work: impl FnOnce(Ledger) -> Fut,
) -> Result<Option<T>, LeaseError>
where
    Fut: Future<Output = T>,
{
    services
        .leases
        .with_lease(fleet, name, |fence| work(services.store.fenced(fence)))
        .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use instant_acme::{BodyWrapper, HttpClient as _};

    use super::*;
    use crate::acme::{AcmeError, AcmeHttp};
    use crate::clock::Clock;
    use crate::config::FleetConfig;
    use crate::fleet::{DbOptions, FleetAnswers, FleetDb, FleetKey, HolderId, LeaseTiming};
    use crate::ledger::test_util::cluster;

    fn host(db: FleetDb, id: &str, url: &str) -> Fleet {
        Fleet {
            answers: FleetAnswers::new(db.clone()),
            db,
            key: FleetKey::from_bytes(&[7; 32]),
            holder: HolderId::new(id).expect("host id"),
            // The shortest ttl, so the lost lease is lost quickly.
            timing: LeaseTiming::new(Duration::from_millis(900), Duration::from_millis(100))
                .expect("timing"),
            cfg: FleetConfig {
                database_url: url.to_owned(),
                key_file: "/dev/null".into(),
                lease_ttl: Duration::from_millis(900),
                host_id: Some(id.to_owned()),
                advertise: None,
            },
        }
    }

    /// A request through the ACME client to a port where nothing
    /// listens: a transport error if it was sent, `Gated` if not.
    async fn send(http: &AcmeHttp) -> AcmeError {
        let req = http::Request::post("https://127.0.0.1:1/acme/new-order")
            .body(BodyWrapper::<Bytes>::from(Vec::new()))
            .expect("request");
        AcmeError::from(http.request(req).await.map(|_| ()).expect_err("refused"))
    }

    /// The holder runs; a peer is refused without running; the fence lets
    /// the holder's writes through. Cut off from the database, the holder
    /// stops at its deadline: its order is cancelled, its requests are
    /// not sent, and once a peer has taken over its writes are refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_order_runs_only_under_its_lease_and_stops_when_it_is_lost() {
        let pg = cluster::Postgres::launch();
        let url = pg.url();
        let open = || async {
            FleetDb::open(&url, &DbOptions::default())
                .await
                .unwrap_or_else(|e| panic!("open: {e}\n{}", pg.log()))
        };
        let shared = open().await;
        let a = host(open().await, "host-a", &url);
        let b = host(shared.clone(), "host-b", &url);
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Ledger::postgres(
            shared.pool().clone(),
            dir.path().to_owned(),
            Clock::system(),
        );
        let (leases_a, leases_b) = (Leases::default(), Leases::default());
        let cancel = CancellationToken::new();
        let http = AcmeHttp::new(None, Clock::system()).expect("client");

        // References, which the `async move` blocks copy.
        let (a, b, store, cancel, http) = (&a, &b, &store, &cancel, &http);
        let (leases_a, leases_b) = (&leases_a, &leases_b);
        let ran = under_lease(a, leases_a, store, "www", cancel, |fenced, _, _| async move {
            let peer: Result<(), _> =
                under_lease(b, leases_b, store, "www", cancel, |_, _, _| async {
                    panic!("the peer ran while the lease was held")
                })
                .await;
            assert!(
                matches!(&peer, Err(DriveError::LeasedElsewhere { lease, retry_after: Some(_) }) if lease == "cert:www"),
                "{peer:?}"
            );
            fenced.clear_pause("www").await?;
            assert!(matches!(send(http).await, AcmeError::Transport(_)));
            Ok("done")
        })
        .await;
        assert_eq!(ran.expect("ran under the lease"), "done");

        // Released: the peer claims it at once.
        let peer = under_lease(b, leases_b, store, "www", cancel, |_, _, _| async {
            Ok(())
        })
        .await;
        assert!(peer.is_ok(), "{peer:?}");

        let lost = under_lease(
            a,
            leases_a,
            store,
            "www",
            cancel,
            |fenced, _, token| async move {
                a.db.pool().close().await;
                // The renewals fail; the deadline stops the order.
                token.cancelled().await;
                assert!(
                    matches!(send(http).await, AcmeError::Gated(_)),
                    "nothing is sent past the deadline"
                );
                let start = std::time::Instant::now();
                loop {
                    match under_lease(b, leases_b, store, "www", cancel, |_, _, _| async {
                        Ok(())
                    })
                    .await
                    {
                        Ok(()) => break,
                        Err(DriveError::LeasedElsewhere { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                    assert!(start.elapsed() < Duration::from_secs(30), "no takeover");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let refused = fenced.clear_pause("www").await;
                assert!(
                    matches!(refused, Err(LedgerError::Fenced { .. })),
                    "{refused:?}"
                );
                Err::<(), _>(DriveError::Cancelled)
            },
        )
        .await;
        assert!(
            matches!(
                lost,
                Err(DriveError::Lease(LeaseError::PastDeadline { .. }))
            ),
            "{lost:?}"
        );
        let page = |leases: &Leases| {
            let mut page = String::new();
            leases.counters.render(&mut page);
            page
        };
        let (page_a, page_b) = (page(leases_a), page(leases_b));
        for line in [
            "certd_fleet_leases_held 0\n",
            "certd_fleet_lease_losses_total{reason=\"deadline\"} 1\n",
            // Epoch 3, after host-b held epoch 2.
            "certd_fleet_takeovers_total 1\n",
            // host-b had released it: a handover, not a failover.
            "certd_fleet_failover_seconds_count 0\n",
        ] {
            assert!(page_a.contains(line), "{line} in {page_a}");
        }
        for line in [
            "certd_fleet_leases_held 0\n",
            "certd_fleet_lease_losses_total{reason=\"deadline\"} 0\n",
            // Epoch 2 after host-a's 1, and the one after host-a's 3.
            "certd_fleet_takeovers_total 2\n",
            // Only the second: host-a's lease had run out, not been released.
            "certd_fleet_failover_seconds_count 1\n",
        ] {
            assert!(page_b.contains(line), "{line} in {page_b}");
        }
        // From host-a's last renewal: at least the ttl, at most the test's
        // 30 s patience on top of it.
        let sum: f64 = page_b
            .lines()
            .find_map(|l| l.strip_prefix("certd_fleet_failover_seconds_sum "))
            .and_then(|v| v.parse().ok())
            .expect("the failover sum");
        assert!((0.9..31.0).contains(&sum), "{sum} in {page_b}");
        shared.pool().close().await;
    }

    /// Whatever stops an order once its lease is lost is the loss, not a
    /// failure to retry: here a ledger write that fails for a reason of
    /// its own (the host's connections are gone, as a host stopped in the
    /// middle of a write finds when it wakes), after the deadline passed.
    /// The scheduler then leaves the certificate to the lease's next
    /// holder instead of retrying at once under a new lease. The loss is
    /// counted even when the work saw it before the renewal task did.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn whatever_stops_an_order_after_its_lease_is_lost_is_the_loss() {
        let pg = cluster::Postgres::launch();
        let url = pg.url();
        let db = FleetDb::open(&url, &DbOptions::default())
            .await
            .unwrap_or_else(|e| panic!("open: {e}\n{}", pg.log()));
        let a = host(db.clone(), "host-a", &url);
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Ledger::postgres(db.pool().clone(), dir.path().to_owned(), Clock::system());
        let leases = Leases::default();
        let cancel = CancellationToken::new();
        let a = &a;
        let lost = under_lease(
            a,
            &leases,
            &store,
            "www",
            &cancel,
            |fenced, lease, _| async move {
                a.db.pool().close().await;
                while lease.check_deadline().is_ok() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let failed = fenced
                    .clear_pause("www")
                    .await
                    .expect_err("the pool is closed");
                assert!(!matches!(failed, LedgerError::Fenced { .. }), "{failed:?}");
                Err::<(), _>(DriveError::Ledger(failed))
            },
        )
        .await;
        assert!(
            matches!(
                &lost,
                Err(DriveError::Lease(LeaseError::PastDeadline { .. }))
            ),
            "{lost:?}"
        );
        assert!(lost.expect_err("lost").is_elsewhere());
        let mut page = String::new();
        leases.counters.render(&mut page);
        assert!(
            page.contains("certd_fleet_lease_losses_total{reason=\"deadline\"} 1\n"),
            "{page}"
        );
    }
}
