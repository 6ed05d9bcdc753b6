//! The handle every fleet background task is owned through: a child of
//! the caller's cancellation token, the join handle, and a status the task
//! publishes on a watch channel (for tests to wait on, and for status and
//! metrics to read). Stopping cancels and waits; dropping cancels.

use std::future::Future;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running fleet task and what it last reported.
#[derive(Debug)]
pub struct FleetTask<S> {
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
    status: watch::Receiver<S>,
}

impl<S: Clone + Default + Send + Sync + 'static> FleetTask<S> {
    /// Spawns `run` with a child of `cancel` and the sender of its status.
    pub(super) fn spawn<F, Fut>(cancel: &CancellationToken, run: F) -> Self
    where
        F: FnOnce(CancellationToken, watch::Sender<S>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let cancel = cancel.child_token();
        let (tx, status) = watch::channel(S::default());
        let task = tokio::spawn(run(cancel.clone(), tx));
        Self {
            cancel,
            task: Some(task),
            status,
        }
    }

    /// The task's progress, to watch (`wait_for`) or read.
    pub fn status(&self) -> watch::Receiver<S> {
        self.status.clone()
    }

    /// Stops the task and waits for it; returns its last status.
    pub async fn stop(mut self) -> S {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            // The task only fails by panicking, and its status says the
            // rest.
            let _ = task.await;
        }
        self.status.borrow().clone()
    }
}

impl<S> Drop for FleetTask<S> {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Sleeps for `d`, or less if `cancel` fires; true if it fired.
pub(super) async fn cancelled_within(cancel: &CancellationToken, d: std::time::Duration) -> bool {
    tokio::select! {
        () = cancel.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}
