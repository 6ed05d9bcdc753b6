//! The daemon's tasks, by name: one `TaskTracker` owns them all (the
//! solvers and the metrics listener spawn theirs on it too), and the names
//! say which ones a shutdown still waits for.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::task::TaskTracker;

/// How long after `shutdown_grace` the daemon waits for its tasks before
/// it names the ones still running and exits without them. Below the 5 s
/// the unit's `TimeoutStopSec` leaves on top of the largest grace the
/// README recommends.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(3);

/// The daemon's tasks, by name: one `TaskTracker` owns them all (the
/// solvers and the metrics listener spawn theirs on it too), and the names
/// say which ones a shutdown still waits for.
#[derive(Clone, Default)]
pub(crate) struct Tasks {
    pub(crate) tracker: TaskTracker,
    running: Arc<Mutex<BTreeMap<u64, &'static str>>>,
    next_id: Arc<AtomicU64>,
    /// The `shutdown_grace` of the configuration last applied.
    pub(crate) grace: Arc<Mutex<Option<Duration>>>,
}

impl Tasks {
    pub(crate) fn spawn(
        &self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.running).insert(id, name);
        let done = Done {
            running: self.running.clone(),
            id,
        };
        self.tracker.spawn(async move {
            let _done = done;
            task.await;
        });
    }

    /// Waits for every task to end, at most `grace` plus
    /// [`SHUTDOWN_MARGIN`]; past that, logs which are still running and
    /// returns their names (the runtime drops them).
    pub(crate) async fn stop(&self, grace: Duration) -> Vec<&'static str> {
        self.tracker.close();
        if tokio::time::timeout(grace + SHUTDOWN_MARGIN, self.tracker.wait())
            .await
            .is_ok()
        {
            return Vec::new();
        }
        let named: Vec<&'static str> = lock(&self.running).values().copied().collect();
        let unnamed = self.tracker.len().saturating_sub(named.len());
        tracing::error!(
            tasks = ?named,
            listener_tasks = unnamed,
            grace_secs = grace.as_secs(),
            "tasks still running after the shutdown grace; exiting without them"
        );
        named
    }
}

/// Takes a finished task off [`Tasks::running`], however it ended.
struct Done {
    running: Arc<Mutex<BTreeMap<u64, &'static str>>>,
    id: u64,
}

impl Drop for Done {
    fn drop(&mut self) {
        lock(&self.running).remove(&self.id);
    }
}

/// A poisoned lock only means a panic elsewhere; the data is still valid.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::*;

    // Paused time: the margin passes at once, as the runtime has nothing
    // else to do.
    #[tokio::test(start_paused = true)]
    async fn a_shutdown_names_the_tasks_that_outlive_the_grace() {
        let tasks = Tasks::default();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        tasks.spawn("obedient", async move { token.cancelled().await });
        tasks.spawn("stuck", std::future::pending());
        shutdown.cancel();
        let started = tokio::time::Instant::now();
        assert_eq!(tasks.stop(Duration::ZERO).await, ["stuck"]);
        // Zero grace: it waited SHUTDOWN_MARGIN, no less.
        assert!(started.elapsed() >= SHUTDOWN_MARGIN);
    }

    #[tokio::test]
    async fn a_clean_shutdown_names_none() {
        let tasks = Tasks::default();
        tasks.spawn("quick", async {});
        assert!(tasks.stop(Duration::ZERO).await.is_empty());
    }
}
