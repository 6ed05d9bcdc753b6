//! Membership: each host's heartbeat into `fleet_members`, from a task of
//! its own, so `status` and the http-01 pre-flight can ask
//! [`FleetDb::live_members`] which hosts are alive (by the database's
//! clock, never a host's).

use std::time::Duration;

use super::db::{FleetDb, Member};
use super::task::{FleetTask, cancelled_within};

/// What the heartbeat task has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeartbeatStatus {
    pub beats: u64,
    pub failures: u64,
    pub last_error: Option<String>,
}

/// Records `member` as alive now and then every `every` until `cancel`
/// fires or the returned task is stopped. A failed beat (database down) is
/// logged and retried at the next one; each is cut off after `every`, so a
/// hung connection cannot delay the ones after it.
pub fn keep_heartbeat(
    db: FleetDb,
    member: Member,
    every: Duration,
    cancel: &tokio_util::sync::CancellationToken,
) -> FleetTask<HeartbeatStatus> {
    FleetTask::spawn(cancel, move |cancel, status| async move {
        loop {
            let beat = tokio::select! {
                () = cancel.cancelled() => return,
                r = tokio::time::timeout(every, db.heartbeat(&member)) => r,
            };
            match beat {
                Ok(Ok(())) => status.send_modify(|s: &mut HeartbeatStatus| s.beats += 1),
                Ok(Err(e)) => failed(&status, e.to_string()),
                Err(_) => failed(
                    &status,
                    format!("no answer from the database within {every:?}"),
                ),
            }
            if cancelled_within(&cancel, every).await {
                return;
            }
        }
    })
}

fn failed(status: &tokio::sync::watch::Sender<HeartbeatStatus>, error: String) {
    tracing::warn!(%error, "fleet heartbeat failed; retrying");
    status.send_modify(|s| {
        s.failures += 1;
        s.last_error = Some(error);
    });
}
