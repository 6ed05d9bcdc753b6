//! Fleet mode's foundations against a real PostgreSQL (a throwaway cluster
//! per test): leases claimed by exactly one holder, fenced writes refused
//! after a takeover, renewal, release and handover, self-fencing through a
//! database outage and through one host's partition (before a peer can
//! take over), sealed keys through the database, and the connection's
//! version check and errors.
//!
//! Distribution, http-01 answers and heartbeats run against the same real
//! PostgreSQL, with certificates from an rcgen test CA (so the chain check
//! is real) installed into real directories.
//!
//! Two "hosts" here are two `FleetDb` pools in one process: the database
//! sees two sets of sessions, which is all the protocol depends on.
//! Waits are on conditions (a claim that succeeds, a renewal count, a
//! deadline that refuses) with generous deadlines, never on a guessed sleep.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use certd::fleet::{
    AnswerCounts, AnswerSource, CertTarget, ChallengeAnswer, ChallengeKind, DbError, DbOptions,
    DistributeOptions, DistributeStatus, FleetAnswers, FleetDb, FleetHost, FleetKey, FleetTask,
    HolderId, Lease, LeaseError, LeaseName, LeaseTiming, ListenOptions, MIN_SERVER_VERSION, Member,
    PullError, RenewEnd, SealContext, SealError, account_key_context, keep_heartbeat,
};
use ring::rand::SystemRandom;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::util::postgres::{Postgres, SUPERUSER};
use crate::util::{TcpProxy, free_port, parse_leaf, private_key_spki, read_pem_certs, snapshot};

/// How long any one condition may take to come true, on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(10);

async fn open(pg: &Postgres) -> FleetDb {
    let opts = DbOptions {
        connect_timeout: Duration::from_secs(5),
        ..DbOptions::default()
    };
    FleetDb::open(&pg.url(), &opts)
        .await
        .unwrap_or_else(|e| panic!("open fleet database: {e}\n{}", pg.log()))
}

fn holder(id: &str) -> HolderId {
    HolderId::new(id).expect("holder id")
}

fn cert(name: &str) -> LeaseName {
    LeaseName::Cert(name.to_owned())
}

fn timing(ttl_ms: u64, margin_ms: u64) -> LeaseTiming {
    LeaseTiming::new(
        Duration::from_millis(ttl_ms),
        Duration::from_millis(margin_ms),
    )
    .expect("lease timing")
}

/// The lease row as the database has it: holder, epoch, unexpired.
async fn lease_row(db: &FleetDb, name: &LeaseName) -> (Option<String>, i64, bool) {
    sqlx::query_as("SELECT holder, epoch, expires_at > now() FROM leases WHERE name = $1")
        .bind(name.key())
        .fetch_one(db.pool())
        .await
        .expect("read lease row")
}

/// Polls `f` until it yields `Some`, for at most `PATIENCE`.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "{what}: not within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Claims `name` for `who`, waiting until the current holder's lease runs
/// out by the database's clock.
async fn claim_when_free(db: &FleetDb, name: &LeaseName, who: &str, t: LeaseTiming) -> Lease {
    eventually(&format!("{who} claims {name}"), || async {
        match Lease::claim(db, name.clone(), holder(who), t).await {
            Ok(lease) => lease,
            // Right after a restart the pool may hand out a connection
            // that died with the server; the next try gets a fresh one.
            Err(LeaseError::Db(e)) => {
                eprintln!("claim {name}: {e}");
                None
            }
            Err(e) => panic!("claim {name}: {e}"),
        }
    })
    .await
}

fn answer(token: &str, key_authorization: &str) -> ChallengeAnswer {
    ChallengeAnswer {
        token: token.to_owned(),
        kind: ChallengeKind::Http01,
        identifier: "www.example.test".to_owned(),
        key_authorization: key_authorization.to_owned(),
        authz_url: "https://ca.example/authz/1".to_owned(),
        valid_for: Duration::from_secs(3600),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_holders_race_and_exactly_one_wins_epoch_1() {
    let pg = Postgres::launch();
    let (a, b) = (open(&pg).await, open(&pg).await);
    let t = LeaseTiming::DEFAULT;
    for round in 0..10 {
        let name = cert(&format!("race{round}"));
        // Both claims are in flight at once, each on its own pool.
        let (ca, cb) = tokio::join!(
            Lease::claim(&a, name.clone(), holder("host-a"), t),
            Lease::claim(&b, name.clone(), holder("host-b"), t),
        );
        let winners: Vec<Lease> = [ca.expect("claim a"), cb.expect("claim b")]
            .into_iter()
            .flatten()
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: exactly one holder wins");
        let winner = &winners[0];
        assert_eq!(winner.epoch().get(), 1, "round {round}");
        let (row_holder, epoch, live) = lease_row(&a, &name).await;
        assert_eq!(row_holder.as_deref(), Some(winner.holder().as_str()));
        assert_eq!((epoch, live), (1, true));
        // The loser cannot claim it either while it is held.
        for db in [&a, &b] {
            let again = Lease::claim(db, name.clone(), holder("host-c"), t)
                .await
                .expect("claim");
            assert!(again.is_none(), "round {round}: a held lease is not free");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_holder_is_fenced_after_a_takeover_and_the_row_is_unchanged() {
    let pg = Postgres::launch();
    let (a, b) = (open(&pg).await, open(&pg).await);
    let name = cert("www");
    // A short lease that host A does not renew: it runs out.
    let lease_a = Lease::claim(&a, name.clone(), holder("host-a"), timing(1000, 300))
        .await
        .expect("claim")
        .expect("free lease");
    let mut tx = lease_a.begin_fenced(&a).await.expect("fenced while held");
    tx.put_challenge(&answer("tok1", "tok1.from-a"))
        .await
        .expect("write");
    tx.commit().await.expect("commit");

    let lease_b = claim_when_free(&b, &name, "host-b", LeaseTiming::DEFAULT).await;
    assert_eq!(lease_b.epoch().get(), 2);

    // A's late write: refused by the fence, rolled back, typed.
    let err = lease_a.begin_fenced(&a).await.unwrap_err();
    let LeaseError::Fenced(fenced) = &err else {
        panic!("expected Fenced, got {err:?}");
    };
    assert_eq!((fenced.epoch.get(), fenced.holder.as_str()), (1, "host-a"));
    assert!(err.to_string().contains("cert:www"), "{err}");
    // Nothing A tried reached the table.
    let row: (String, i64) = sqlx::query_as(
        "SELECT key_authorization, epoch FROM challenge_responses WHERE token = 'tok1'",
    )
    .fetch_one(b.pool())
    .await
    .expect("read challenge");
    assert_eq!(row, ("tok1.from-a".to_owned(), 1));
    // A knows it is done: no more sends, no renewals.
    assert!(matches!(
        lease_a.check_deadline(),
        Err(LeaseError::Fenced(_))
    ));
    assert!(matches!(
        lease_a.renew(&a).await,
        Err(LeaseError::Fenced(_))
    ));

    // The new holder writes under epoch 2, and the row shows it.
    let mut tx = lease_b.begin_fenced(&b).await.expect("fenced for b");
    tx.put_challenge(&answer("tok1", "tok1.from-b"))
        .await
        .expect("write");
    tx.commit().await.expect("commit");
    assert_eq!(
        b.key_authorization("tok1").await.expect("read").as_deref(),
        Some("tok1.from-b")
    );
    assert_eq!(
        lease_row(&a, &name).await,
        (Some("host-b".to_owned()), 2, true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_write_in_flight_holds_off_a_takeover_until_it_commits() {
    let pg = Postgres::launch();
    let (a, b) = (open(&pg).await, open(&pg).await);
    let name = cert("www");
    let lease_a = Lease::claim(&a, name.clone(), holder("host-a"), timing(1000, 300))
        .await
        .expect("claim")
        .expect("free lease");
    // A's transaction passed the fence while the lease was valid; it holds
    // the row lock, so B's claim (even once the lease has run out by the
    // clock) waits for A's commit rather than overlapping it.
    let mut tx = lease_a.begin_fenced(&a).await.expect("fenced while held");
    tx.put_challenge(&answer("tok2", "tok2.from-a"))
        .await
        .expect("write");
    let until_expired = Duration::from_millis(1100);
    let claim = tokio::spawn({
        let (b, name) = (b.clone(), name.clone());
        async move {
            tokio::time::sleep(until_expired).await;
            let started = Instant::now();
            let lease = Lease::claim(&b, name, holder("host-b"), LeaseTiming::DEFAULT).await;
            (lease, started)
        }
    });
    // Wait until B's claim is blocked on A's row lock, as the database
    // reports it, then commit.
    eventually("B's claim waits on the lease row", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO leases%'",
        )
        .fetch_one(a.pool())
        .await
        .expect("pg_stat_activity");
        (waiting > 0).then_some(())
    })
    .await;
    let committed_at = Instant::now();
    tx.commit().await.expect("A's write commits");
    let (lease_b, started) = claim.await.expect("claim task");
    assert!(started < committed_at, "B's claim began before A committed");
    let lease_b = lease_b.expect("claim").expect("B wins once A committed");
    assert_eq!(lease_b.epoch().get(), 2);
    assert_eq!(
        a.key_authorization("tok2").await.expect("read").as_deref(),
        Some("tok2.from-a")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_the_lease_past_several_ttls() {
    let pg = Postgres::launch();
    let (a, b) = (open(&pg).await, open(&pg).await);
    let name = cert("www");
    // Renewals every 0.8 s; a stall of over 1.2 s between two of them
    // would end the lease, which a loaded machine does not reach.
    let t = timing(2400, 400);
    let lease = Lease::claim(&a, name.clone(), holder("host-a"), t)
        .await
        .expect("claim")
        .expect("free lease");
    let cancel = CancellationToken::new();
    let renewer = lease.keep_renewed(a.clone(), &cancel);
    let mut status = renewer.status();
    let start = Instant::now();
    // Through three ttls, after every renewal: the peer cannot claim, the
    // holder may send, and the database agrees it is held.
    while start.elapsed() < 3 * t.ttl() {
        tokio::time::timeout(PATIENCE, status.changed())
            .await
            .expect("a renewal within the patience")
            .expect("renewer alive");
        let s = status.borrow_and_update().clone();
        assert_eq!((s.failures, s.ended), (0, None), "{s:?}");
        let peer = Lease::claim(&b, name.clone(), holder("host-b"), t)
            .await
            .expect("claim");
        assert!(peer.is_none(), "peer claimed a renewed lease");
        lease.check_deadline().expect("holder may send");
    }
    assert_eq!(
        lease_row(&b, &name).await,
        (Some("host-a".to_owned()), 1, true)
    );
    let mut tx = lease.begin_fenced(&a).await.expect("still fenced in");
    tx.put_challenge(&answer("tok3", "tok3.ka"))
        .await
        .expect("write");
    tx.commit().await.expect("commit");
    let done = renewer.stop().await;
    // A renewal every ttl/3 for 3 ttls is 9; allow for a loaded machine.
    assert!(done.renewals >= 6, "{done:?}");
    assert_eq!(done.ended, Some(RenewEnd::Stopped));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_lease_goes_to_a_peer_at_once_with_the_next_epoch() {
    let pg = Postgres::launch();
    let (a, b) = (open(&pg).await, open(&pg).await);
    let name = cert("www");
    let lease_a = Lease::claim(&a, name.clone(), holder("host-a"), LeaseTiming::DEFAULT)
        .await
        .expect("claim")
        .expect("free lease");
    let mut listener = PgListener::connect_with(b.pool()).await.expect("listen");
    listener.listen("certd_lease").await.expect("listen");

    assert!(lease_a.release(&a).await.expect("release"), "was ours");
    let note = tokio::time::timeout(PATIENCE, listener.recv())
        .await
        .expect("notification within the patience")
        .expect("notification");
    assert_eq!(note.payload(), "cert:www");
    // Held for 30 s, but released: the peer need not wait.
    assert_eq!(lease_row(&b, &name).await, (None, 1, false));
    let lease_b = Lease::claim(&b, name.clone(), holder("host-b"), LeaseTiming::DEFAULT)
        .await
        .expect("claim")
        .expect("a released lease is free");
    assert_eq!(lease_b.epoch().get(), 2);

    // The old holder is out: locally, and at the database.
    assert!(matches!(
        lease_a.check_deadline(),
        Err(LeaseError::Released { .. })
    ));
    assert!(matches!(
        lease_a.begin_fenced(&a).await,
        Err(LeaseError::Released { .. })
    ));
    assert!(!lease_a.release(&a).await.expect("release"), "not ours now");
    assert_eq!(
        lease_row(&a, &name).await,
        (Some("host-b".to_owned()), 2, true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_self_fences_the_holder_and_claims_work_after_restart() {
    let mut pg = Postgres::launch();
    let (a, b) = (open(&pg).await, open(&pg).await);
    let name = cert("www");
    let t = timing(2000, 500);
    let lease = Lease::claim(&a, name.clone(), holder("host-a"), t)
        .await
        .expect("claim")
        .expect("free lease");
    let cancel = CancellationToken::new();
    let renewer = lease.keep_renewed(a.clone(), &cancel);
    let mut status = renewer.status();
    tokio::time::timeout(PATIENCE, status.wait_for(|s| s.renewals >= 1))
        .await
        .expect("first renewal")
        .expect("renewer alive");

    // The deadline is at most ttl − margin after the last renewal was
    // sent, so the holder stops before the database could end its lease.
    let left = lease.check_deadline().expect("held before the outage");
    assert!(left <= t.ttl().checked_sub(t.margin()).unwrap(), "{left:?}");
    pg.stop_immediate();
    let failed = tokio::time::timeout(PATIENCE, status.wait_for(|s| s.failures >= 1))
        .await
        .expect("a renewal fails while the database is down")
        .expect("renewer alive")
        .clone();
    assert!(failed.last_error.is_some(), "{failed:?}");
    // The deadline passes with no renewal getting through; from then on
    // the holder may send nothing.
    eventually("the local deadline passes", || async {
        lease.check_deadline().is_err().then_some(())
    })
    .await;
    assert!(matches!(
        lease.check_deadline(),
        Err(LeaseError::PastDeadline { .. })
    ));
    let ended = tokio::time::timeout(PATIENCE, status.wait_for(|s| s.ended.is_some()))
        .await
        .expect("renewer ends at the deadline")
        .expect("renewer status")
        .clone();
    assert_eq!(ended.ended, Some(RenewEnd::PastDeadline), "{ended:?}");

    pg.start();
    // Even with the database back, the self-fenced holder stays out.
    assert!(matches!(
        lease.renew(&a).await,
        Err(LeaseError::PastDeadline { .. })
    ));
    assert!(matches!(
        lease.begin_fenced(&a).await,
        Err(LeaseError::PastDeadline { .. })
    ));
    // The pools reconnect, and the lease is claimed again: epoch 2.
    let lease_b = claim_when_free(&b, &name, "host-b", LeaseTiming::DEFAULT).await;
    assert_eq!(lease_b.epoch().get(), 2);
    let mut tx = lease_b.begin_fenced(&b).await.expect("fenced for b");
    tx.put_challenge(&answer("tok4", "tok4.ka"))
        .await
        .expect("write");
    tx.commit().await.expect("commit");
    drop(renewer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_cut_off_from_the_database_stops_before_a_peer_can_take_over() {
    let pg = Postgres::launch();
    // Host A reaches the database through a forwarder that can cut it off
    // (a test double for a network partition: the database behind it is
    // the real one, and host B still reaches it directly).
    let proxy = TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], pg.port())));
    let via_proxy = format!(
        "postgres://{SUPERUSER}:{}@127.0.0.1:{}/postgres",
        pg.password(),
        proxy.port()
    );
    let opts = DbOptions {
        connect_timeout: Duration::from_secs(5),
        ..DbOptions::default()
    };
    let a = FleetDb::open(&via_proxy, &opts)
        .await
        .expect("open via proxy");
    let b = open(&pg).await;
    let name = cert("www");
    let t = timing(2000, 500);
    let lease = Lease::claim(&a, name.clone(), holder("host-a"), t)
        .await
        .expect("claim")
        .expect("free lease");
    let cancel = CancellationToken::new();
    let renewer = lease.keep_renewed(a.clone(), &cancel);
    let mut status = renewer.status();
    tokio::time::timeout(PATIENCE, status.wait_for(|s| s.renewals >= 1))
        .await
        .expect("first renewal")
        .expect("renewer alive");

    proxy.set_up(false);
    // No renewal gets through from here on, so A's deadline is fixed; this
    // bounds it from above.
    let a_stops_by = Instant::now() + lease.check_deadline().expect("held when cut off");
    // B takes the lease as soon as the database lets it: never before A's
    // deadline, by at least most of the margin.
    let b_claimed_from = eventually("B claims the lease", || async {
        let started = Instant::now();
        match Lease::claim(&b, name.clone(), holder("host-b"), LeaseTiming::DEFAULT).await {
            Ok(Some(lease)) => Some((started, lease)),
            Ok(None) => None,
            Err(e) => panic!("claim: {e}"),
        }
    })
    .await;
    let (started, lease_b) = b_claimed_from;
    assert!(
        started >= a_stops_by,
        "B claimed {:?} before A's deadline",
        a_stops_by - started
    );
    assert_eq!(lease_b.epoch().get(), 2);
    assert!(matches!(
        lease.check_deadline(),
        Err(LeaseError::PastDeadline { .. })
    ));
    let ended = tokio::time::timeout(PATIENCE, status.wait_for(|s| s.ended.is_some()))
        .await
        .expect("renewer ends")
        .expect("renewer status")
        .clone();
    assert_eq!(ended.ended, Some(RenewEnd::PastDeadline), "{ended:?}");
    assert!(ended.failures >= 1, "{ended:?}");

    // Reconnected, A neither renews nor writes under the old epoch.
    proxy.set_up(true);
    assert!(matches!(
        lease.renew(&a).await,
        Err(LeaseError::PastDeadline { .. })
    ));
    assert!(matches!(
        lease.begin_fenced(&a).await,
        Err(LeaseError::PastDeadline { .. })
    ));
    assert_eq!(
        lease_row(&a, &name).await,
        (Some("host-b".to_owned()), 2, true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_keys_round_trip_through_the_database_and_open_only_in_their_context() {
    let pg = Postgres::launch();
    let (a, b) = (open(&pg).await, open(&pg).await);
    // Both hosts read the same fleet key from their own 0600 file.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut raw = [0u8; 32];
    ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut raw).expect("random key");
    let key_file = |host: &str| {
        let path = dir.path().join(format!("{host}.key"));
        std::fs::write(&path, raw).expect("write key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        FleetKey::load(&path).expect("load key")
    };
    let (key_a, key_b) = (key_file("a"), key_file("b"));
    assert_eq!(key_a.id(), key_b.id());

    let pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIH1x\n-----END PRIVATE KEY-----\n";
    let context = SealContext::CertificateKey {
        cert_name: "www".into(),
        serial: "04a1b2".into(),
    };
    let sealed = key_a
        .seal(&SystemRandom::new(), &context, pem.as_bytes())
        .expect("seal");
    let lease = Lease::claim(&a, cert("www"), holder("host-a"), LeaseTiming::DEFAULT)
        .await
        .expect("claim")
        .expect("free lease");
    let mut tx = lease.begin_fenced(&a).await.expect("fenced");
    tx.insert_issued("04a1b2", "-----BEGIN CERTIFICATE-----\n", &sealed)
        .await
        .expect("insert issued");
    tx.commit().await.expect("commit");

    // Only a certificate's lease writes certificate data.
    let reaper = Lease::claim(
        &a,
        LeaseName::Reaper("1".into()),
        holder("host-a"),
        LeaseTiming::DEFAULT,
    )
    .await
    .expect("claim")
    .expect("free lease");
    let mut tx = reaper.begin_fenced(&a).await.expect("fenced");
    assert!(matches!(
        tx.insert_issued("04a1b2", "-----BEGIN CERTIFICATE-----\n", &sealed)
            .await,
        Err(LeaseError::NotACertificate { .. })
    ));
    drop(tx);

    // Host B reads it and opens it with its copy of the key.
    let issued = b.issued("www", "04a1b2").await.expect("read").expect("row");
    assert_eq!(issued.epoch, 1);
    assert_eq!(
        key_b.unseal(&context, &issued.sealed_key).expect("unseal"),
        pem.as_bytes()
    );
    // What the database holds is not the key, and names the key that
    // sealed it.
    let (stored, key_id): (Vec<u8>, String) =
        sqlx::query_as("SELECT sealed_key, key_id FROM issued WHERE serial = '04a1b2'")
            .fetch_one(b.pool())
            .await
            .expect("read raw");
    assert!(!String::from_utf8_lossy(&stored).contains("PRIVATE KEY"));
    assert_eq!(key_id, key_a.id().to_string());
    // Moved under another serial, it does not open.
    let other = SealContext::CertificateKey {
        cert_name: "www".into(),
        serial: "04a1b3".into(),
    };
    assert!(matches!(
        key_b.unseal(&other, &issued.sealed_key),
        Err(SealError::Verify { .. })
    ));
    // A host with another fleet key is told which key it lacks.
    let wrong = FleetKey::from_bytes(&[0x5a; 32]);
    let err = wrong.unseal(&context, &issued.sealed_key).unwrap_err();
    assert!(err.to_string().contains(&key_id), "{err}");

    // The ACME account key, stored once under the account's lease.
    let directory = "https://ca.example/dir";
    let account_pem = b"-----BEGIN PRIVATE KEY-----\naccount\n-----END PRIVATE KEY-----\n";
    let sealed = key_a
        .seal(
            &SystemRandom::new(),
            &account_key_context(directory),
            account_pem,
        )
        .expect("seal");
    let mut tx = lease.begin_fenced(&a).await.expect("fenced");
    assert!(matches!(
        tx.put_account_key(&sealed).await,
        Err(LeaseError::NotAnAccount { .. })
    ));
    drop(tx);
    let account = Lease::claim(
        &a,
        LeaseName::Account(directory.into()),
        holder("host-a"),
        LeaseTiming::DEFAULT,
    )
    .await
    .expect("claim")
    .expect("free lease");
    let mut tx = account.begin_fenced(&a).await.expect("fenced");
    tx.put_account_key(&sealed)
        .await
        .expect("store account key");
    tx.commit().await.expect("commit");
    let stored = b
        .account_key(directory)
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(
        key_b
            .unseal(&account_key_context(directory), &stored)
            .expect("unseal"),
        account_pem
    );
    assert!(
        b.account_key("https://other.example/dir")
            .await
            .expect("read")
            .is_none()
    );
    // Sealed for one CA's directory, it does not open as another's.
    assert!(matches!(
        key_b.unseal(&account_key_context("https://other.example/dir"), &stored),
        Err(SealError::Verify { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_15_passes_the_version_check_and_members_are_seen() {
    let pg = Postgres::launch();
    let db = open(&pg).await;
    let version = db.server_version().await.expect("version");
    assert!(version >= MIN_SERVER_VERSION, "{version}");
    assert_eq!(version.num(), pg.binary_version_num(), "{version}");
    // Opening again (a second host, or a restart) finds the schema applied.
    let again = open(&pg).await;
    let member = Member {
        host_id: "host-a".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        http01_addr: Some("127.0.0.11:80".into()),
        config_hash: "3f2a".into(),
    };
    again.heartbeat(&member).await.expect("heartbeat");
    assert_eq!(
        db.live_members(Duration::from_secs(60))
            .await
            .expect("members"),
        vec![member]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_or_port_names_the_server_and_not_the_password() {
    let pg = Postgres::launch();
    let opts = DbOptions {
        connect_timeout: Duration::from_secs(5),
        ..DbOptions::default()
    };
    let wrong = "not-the-Password-9f3e";
    let err = FleetDb::open(&pg.url_with_password(wrong), &opts)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DbError::Connect { .. }), "{err:?}");
    assert!(
        msg.contains(&format!("127.0.0.1:{}", pg.port())),
        "names host:port: {msg}"
    );
    assert!(msg.contains("password authentication failed"), "{msg}");
    assert!(!msg.contains(wrong) && !format!("{err:?}").contains(wrong));

    // Nothing listens on this port.
    let closed = free_port();
    let url = format!(
        "postgres://certd:{}@127.0.0.1:{closed}/postgres",
        pg.password()
    );
    let err = FleetDb::open(&url, &opts).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&format!("127.0.0.1:{closed}")), "{msg}");
    assert!(msg.to_lowercase().contains("refused"), "{msg}");
    assert!(!msg.contains(pg.password()));

    let err = FleetDb::open(
        &format!("postgres://certd:{wrong}@127.0.0.1:99999/x"),
        &opts,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, DbError::Url { .. }), "{err:?}");
    assert!(!err.to_string().contains(wrong), "{err}");
}

// ---- distribution, http-01 answers, heartbeats ----

/// The certificate every distribution test publishes, and its one name.
const WEB: &str = "web";
const WEB_NAME: &str = "www.fleet.test";

/// A test CA: a root and an intermediate under it. Chains are leaf plus
/// intermediate, and the verification ends at the intermediate as it does
/// for a CA's chain when no `trusted_roots` are configured.
struct TestCa {
    intermediate_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    fn new() -> Self {
        let ca_params = |name: &str| {
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p
        };
        let root_key = rcgen::KeyPair::generate().expect("key");
        let root_params = ca_params("fleet test root");
        root_params.self_signed(&root_key).expect("root");
        let root = rcgen::Issuer::new(root_params, root_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let params = ca_params("fleet test intermediate");
        let cert = params.signed_by(&key, &root).expect("intermediate");
        Self {
            intermediate_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A fresh key and its certificate for `names`: (full chain, key PEM).
    fn issue(&self, names: &[&str]) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(30);
        let mut serial = [0u8; 16];
        ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut serial).expect("random");
        serial[0] &= 0x7f;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let key = rcgen::KeyPair::generate().expect("key");
        let leaf = params.signed_by(&key, &self.issuer).expect("leaf");
        (
            format!("{}{}", leaf.pem(), self.intermediate_pem),
            key.serialize_pem(),
        )
    }
}

/// One in-process "host": its own pool, cert dir and fleet key.
struct Host {
    db: FleetDb,
    dir: tempfile::TempDir,
    host: Arc<FleetHost>,
}

impl Host {
    async fn new(pg: &Postgres, id: &str, key: [u8; 32]) -> Self {
        Self::with_db(open(pg).await, id, key)
    }

    fn with_db(db: FleetDb, id: &str, key: [u8; 32]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        std::fs::create_dir(&certs).expect("cert dir");
        // The reload command leaves proof that it ran, with the
        // environment certd gives it.
        let reload = format!(
            "printf '%s' \"$CERTD_NAME\" > '{}'",
            dir.path().join("reloaded").display()
        );
        let host = FleetHost::new(holder(id), certs, FleetKey::from_bytes(&key)).with_cert(
            WEB,
            CertTarget {
                domains: vec![WEB_NAME.to_owned()],
                reload: vec![reload],
            },
        );
        Self {
            db,
            dir,
            host: Arc::new(host),
        }
    }

    fn cert_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("certs")
    }

    /// The serial of the certificate installed for `WEB`, if any.
    fn serial_on_disk(&self) -> Option<String> {
        let path = self.cert_dir().join(WEB).join("cert.pem");
        path.exists()
            .then(|| parse_leaf(&read_pem_certs(&path)[0]).1)
    }

    fn distribute(&self, every: Duration, retry: Duration) -> FleetTask<DistributeStatus> {
        let opts = DistributeOptions {
            reconcile_every: every,
            retry_after: retry,
        };
        Arc::clone(&self.host).distribute(self.db.clone(), opts, &CancellationToken::new())
    }
}

const KEY_A: [u8; 32] = [7; 32];
const KEY_B: [u8; 32] = [8; 32];

/// Publishes `chain` and `key_pem` for `WEB` as the leaseholder does: in a
/// fenced transaction of a fresh lease, released after. Retries while the
/// database is just back from a restart. Returns the serial.
async fn publish(db: &FleetDb, fleet_key: [u8; 32], chain: &str, key_pem: &str) -> String {
    let key = FleetKey::from_bytes(&fleet_key);
    let lease = claim_when_free(db, &cert(WEB), "publisher", LeaseTiming::DEFAULT).await;
    let mut tx = lease.begin_fenced(db).await.expect("begin fenced");
    let serial = tx
        .publish_issuance(&key, &SystemRandom::new(), chain, key_pem)
        .await
        .expect("publish");
    tx.commit().await.expect("commit");
    lease.release(db).await.expect("release");
    serial
}

/// Waits until `task`'s status satisfies `cond`.
async fn status_until<S: Clone + Default + Send + Sync + std::fmt::Debug + 'static>(
    task: &FleetTask<S>,
    what: &str,
    cond: impl Fn(&S) -> bool,
) -> S {
    let mut rx = task.status();
    let waited = match tokio::time::timeout(PATIENCE, rx.wait_for(|s| cond(s))).await {
        Ok(Ok(s)) => Some(s.clone()),
        _ => None,
    };
    waited.unwrap_or_else(|| {
        panic!(
            "{what}: not within {PATIENCE:?}; status {:?}",
            task.status().borrow()
        )
    })
}

/// Asserts what is on `host`'s disk for `WEB`: `serial`, with the key that
/// matches the certificate, and the reload command having run.
fn assert_installed_here(host: &Host, serial: &str) {
    let base = host.cert_dir().join(WEB);
    let (names, on_disk, _, spki) = parse_leaf(&read_pem_certs(base.join("fullchain.pem"))[0]);
    assert_eq!(names, vec![WEB_NAME.to_owned()]);
    assert_eq!(on_disk, serial);
    assert_eq!(
        private_key_spki(base.join("privkey.pem")),
        spki,
        "key matches"
    );
    let mode = std::fs::metadata(base.join("privkey.pem"))
        .expect("privkey")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let reloaded = std::fs::read_to_string(host.dir.path().join("reloaded")).expect("reloaded");
    assert_eq!(reloaded, WEB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_install_the_same_published_issuance() {
    let pg = Postgres::launch();
    let ca = TestCa::new();
    let mut hosts = Vec::new();
    let mut tasks = Vec::new();
    for id in ["host-a", "host-b", "host-c"] {
        let host = Host::new(&pg, id, KEY_A).await;
        let task = host.distribute(Duration::from_secs(60), Duration::from_secs(1));
        // Listening, and the start-up reconcile found nothing to do.
        status_until(&task, id, |s| s.listening && s.reconciles >= 1).await;
        hosts.push(host);
        tasks.push(task);
    }
    let (chain, key_pem) = ca.issue(&[WEB_NAME]);
    let serial = publish(&hosts[0].db, KEY_A, &chain, &key_pem).await;

    for (host, task) in hosts.iter().zip(&tasks) {
        let s = status_until(task, "installed on the notification", |s| {
            s.installed_on_notify >= 1
        })
        .await;
        assert_eq!((s.installed_by_reconcile, s.failures), (0, 0), "{s:?}");
        assert_installed_here(host, &serial);
    }
    let rows = hosts[0].db.installs(WEB).await.expect("installs");
    assert_eq!(rows.len(), 3, "{rows:?}");
    for (row, id) in rows.iter().zip(["host-a", "host-b", "host-c"]) {
        assert_eq!(
            (row.host_id.as_str(), row.serial.as_str()),
            (id, serial.as_str())
        );
        assert!(row.installed && row.error.is_none(), "{row:?}");
        let reload = row.reload_result.as_deref().unwrap_or_default();
        assert!(reload.contains(": ok: "), "{reload}");
    }
    for task in tasks {
        task.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_another_fleet_key_installs_nothing_and_records_why() {
    let pg = Postgres::launch();
    let ca = TestCa::new();
    let other = Host::new(&pg, "host-b", KEY_B).await;
    let (chain, key_pem) = ca.issue(&[WEB_NAME]);
    let serial = publish(&other.db, KEY_A, &chain, &key_pem).await;

    let err = other.host.pull(&other.db, WEB).await.unwrap_err();
    let (ours, theirs) = (
        FleetKey::from_bytes(&KEY_B).id().to_string(),
        FleetKey::from_bytes(&KEY_A).id().to_string(),
    );
    assert!(
        matches!(
            err,
            PullError::Unseal {
                source: SealError::WrongKey { .. },
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&ours) && msg.contains(&theirs), "{msg}");
    assert!(!other.cert_dir().join(WEB).exists(), "nothing installed");
    assert!(
        !other.dir.path().join("reloaded").exists(),
        "nothing reloaded"
    );

    let rows = other.db.installs(WEB).await.expect("installs");
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(
        (row.host_id.as_str(), row.serial.as_str()),
        ("host-b", serial.as_str())
    );
    assert!(!row.installed && row.reload_result.is_none(), "{row:?}");
    let error = row.error.as_deref().unwrap_or_default();
    assert!(error.contains(&ours) && error.contains(&theirs), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_started_after_the_publication_reconciles_at_start() {
    let pg = Postgres::launch();
    let ca = TestCa::new();
    let late = Host::new(&pg, "host-late", KEY_A).await;
    let (chain, key_pem) = ca.issue(&[WEB_NAME]);
    let serial = publish(&late.db, KEY_A, &chain, &key_pem).await;
    assert_eq!(late.serial_on_disk(), None);

    let task = late.distribute(Duration::from_secs(60), Duration::from_secs(1));
    let s = status_until(&task, "installed at start", |s| {
        s.installed_by_reconcile >= 1
    })
    .await;
    assert_eq!((s.installed_on_notify, s.failures), (0, 0), "{s:?}");
    assert_installed_here(&late, &serial);
    let rows = late.db.installs(WEB).await.expect("installs");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].installed, "{rows:?}");
    task.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_database_restart_the_host_reconciles_and_files_hold_while_it_is_down() {
    let mut pg = Postgres::launch();
    let ca = TestCa::new();
    // A failed connect gives up after 2 s (sqlx's pool retries until its
    // acquire timeout).
    let opts = DbOptions {
        connect_timeout: Duration::from_secs(2),
        ..DbOptions::default()
    };
    let db = FleetDb::open(&pg.url(), &opts).await.expect("open");
    let host = Host::with_db(db, "host-a", KEY_A);
    let publisher = open(&pg).await;
    // Reconnect attempts every 4 s: the second publication goes in before
    // the host can listen again, so only the reconcile after reconnecting
    // can bring it. Periodic reconciles are out of the picture.
    let task = host.distribute(Duration::from_secs(600), Duration::from_secs(4));
    status_until(&task, "listening", |s| s.listening && s.reconciles >= 1).await;
    let (chain, key_pem) = ca.issue(&[WEB_NAME]);
    let first = publish(&publisher, KEY_A, &chain, &key_pem).await;
    status_until(&task, "first install", |s| s.installed_on_notify >= 1).await;
    assert_installed_here(&host, &first);

    let before = snapshot(&host.cert_dir());
    let current = std::fs::read_link(host.cert_dir().join(WEB).join("current")).expect("current");
    pg.stop_immediate();
    let down = status_until(&task, "the lost LISTEN noticed, a reconnect failed", |s| {
        !s.listening && s.connect_failures >= 1
    })
    .await;
    assert_eq!(down.connects, 1, "{down:?}");
    assert_eq!(
        snapshot(&host.cert_dir()),
        before,
        "files changed while the database was down"
    );
    assert_eq!(
        std::fs::read_link(host.cert_dir().join(WEB).join("current")).expect("current"),
        current
    );

    pg.start();
    let (chain, key_pem) = ca.issue(&[WEB_NAME]);
    let second = publish(&publisher, KEY_A, &chain, &key_pem).await;
    assert_ne!(first, second);
    assert_eq!(
        task.status().borrow().connects,
        1,
        "published before the host listened again"
    );
    let s = status_until(&task, "reconciled after reconnecting", |s| {
        s.installed_by_reconcile >= 1
    })
    .await;
    assert_eq!(
        (s.connects, s.installed_on_notify, s.failures),
        (2, 1, 0),
        "{s:?}"
    );
    assert_installed_here(&host, &second);
    let rows = publisher.installs(WEB).await.expect("installs");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r.installed), "{rows:?}");
    task.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http01_answer_is_served_by_another_host_from_the_database_then_from_memory() {
    let pg = Postgres::launch();
    let (a, b) = (open(&pg).await, open(&pg).await);
    let answers = FleetAnswers::new(b.clone());
    let opts = ListenOptions {
        retry_after: Duration::from_secs(1),
        purge_every: Duration::from_secs(60),
    };
    let listener = answers.listen(opts, &CancellationToken::new());
    status_until(&listener, "listening", |s| s.listening).await;

    // Host a holds the lease and stores the answer; the announcement comes
    // after, as the leaseholder sends it.
    let (token, key_authorization) = ("tok-EN_123", "tok-EN_123.thumbprint");
    let lease = claim_when_free(&a, &cert(WEB), "host-a", LeaseTiming::DEFAULT).await;
    let mut tx = lease.begin_fenced(&a).await.expect("begin");
    tx.put_challenge(&answer(token, key_authorization))
        .await
        .expect("put challenge");
    tx.commit().await.expect("commit");

    let path = format!("/.well-known/acme-challenge/{token}");
    assert_eq!(
        answers.answer(token).await,
        Some((key_authorization.to_owned(), AnswerSource::Database))
    );
    a.announce_challenge(token).await.expect("notify");
    status_until(&listener, "the announced answer loaded", |s| s.loaded >= 1).await;
    assert_eq!(
        answers.answer(token).await,
        Some((key_authorization.to_owned(), AnswerSource::Memory))
    );
    assert_eq!(
        answers.respond(&path).await.as_deref(),
        Some(key_authorization)
    );

    // Unknown tokens and other paths get nothing.
    assert_eq!(
        answers.respond("/.well-known/acme-challenge/nope").await,
        None
    );
    assert_eq!(
        answers.respond("/.well-known/acme-challenge/a/../b").await,
        None
    );
    assert_eq!(answers.respond("/index.html").await, None);
    assert_eq!(
        answers.counts(),
        AnswerCounts {
            memory: 2,
            database: 1,
            unknown: 1,
            db_errors: 0
        }
    );
    listener.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeat_task_keeps_a_member_live_until_stopped() {
    let pg = Postgres::launch();
    let db = open(&pg).await;
    let member = Member {
        host_id: "host-a".into(),
        version: "test".into(),
        http01_addr: Some("127.0.0.11:80".into()),
        config_hash: "abc".into(),
    };
    let task = keep_heartbeat(
        db.clone(),
        member.clone(),
        Duration::from_millis(200),
        &CancellationToken::new(),
    );
    status_until(&task, "two beats", |s| s.beats >= 2).await;
    let live = db
        .live_members(Duration::from_secs(30))
        .await
        .expect("live");
    assert_eq!(live, vec![member]);
    let last: (i64,) = sqlx::query_as(
        "SELECT (extract(epoch FROM now() - last_seen) * 1000)::bigint FROM fleet_members",
    )
    .fetch_one(db.pool())
    .await
    .expect("last_seen");
    assert!(last.0 < 5_000, "last_seen {} ms ago", last.0);
    let end = task.stop().await;
    assert_eq!(end.failures, 0, "{end:?}");
    // Stopped, it no longer beats: the member drops out of a short window.
    eventually("the stopped member is no longer live", || async {
        let live = db
            .live_members(Duration::from_millis(500))
            .await
            .expect("live");
        live.is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_serving_other_names_refuses_the_issuance_and_keeps_its_files() {
    let pg = Postgres::launch();
    let ca = TestCa::new();
    let db = open(&pg).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Configured for another name than the one the publisher's order had.
    let host = FleetHost::new(
        holder("host-x"),
        dir.path().to_owned(),
        FleetKey::from_bytes(&KEY_A),
    )
    .with_cert(
        WEB,
        CertTarget {
            domains: vec!["other.fleet.test".to_owned()],
            reload: vec![format!("touch '{}'", dir.path().join("reloaded").display())],
        },
    );
    let (chain, key_pem) = ca.issue(&[WEB_NAME]);
    let serial = publish(&db, KEY_A, &chain, &key_pem).await;

    let err = host.pull(&db, WEB).await.unwrap_err();
    assert!(matches!(err, PullError::Verify { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(WEB_NAME) && msg.contains("other.fleet.test"),
        "{msg}"
    );
    assert!(!dir.path().join(WEB).exists(), "nothing installed");
    assert!(!dir.path().join("reloaded").exists(), "nothing reloaded");
    let rows = db.installs(WEB).await.expect("installs");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].serial, serial);
    assert!(!rows[0].installed, "{rows:?}");
    assert!(
        rows[0]
            .error
            .as_deref()
            .unwrap_or_default()
            .contains(WEB_NAME)
    );
}
