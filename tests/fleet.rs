//! Fleet mode's foundations against a real PostgreSQL (a throwaway cluster
//! per test): leases claimed by exactly one holder, fenced writes refused
//! after a takeover, renewal, release and handover, self-fencing through a
//! database outage and through one host's partition (before a peer can
//! take over), sealed keys through the database, and the connection's
//! version check and errors.
//!
//! Two "hosts" here are two `FleetDb` pools in one process: the database
//! sees two sets of sessions, which is all the protocol depends on.
//! Waits are on conditions (a claim that succeeds, a renewal count, a
//! deadline that refuses) with generous deadlines, never on a guessed sleep.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use certd::fleet::{
    ChallengeAnswer, ChallengeKind, DbError, DbOptions, FleetDb, FleetKey, HolderId, Lease,
    LeaseError, LeaseName, LeaseTiming, MIN_SERVER_VERSION, Member, RenewEnd, SealContext,
    SealError, account_key_context,
};
use ring::rand::SystemRandom;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::util::postgres::{Postgres, SUPERUSER};
use crate::util::{TcpProxy, free_port};

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
