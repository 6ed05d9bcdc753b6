//! What the daemon tells systemd through its notification socket
//! (sd_notify(3), `Type=notify`), without ever blocking the runtime.
//!
//! A datagram to a receiver whose queue is full (`net.unix.max_dgram_qlen`,
//! 10 by default) blocks the sender. certd runs on one thread, so a
//! blocking send froze every task, timers included: a shutdown waited
//! forever behind it. Here one task owns a non-blocking socket and sends
//! from a short queue; the other tasks only append to the queue.
//!
//! Which states may be dropped while systemd does not read: RELOADING=1
//! only. READY=1 on an already ready unit is a no-op for systemd, so two in
//! a row are one; a RELOADING=1 whose READY=1 is not yet out would only
//! tell systemd of a reload that is over, so it is not queued behind other
//! states. READY=1 and STOPPING=1 are never dropped while the daemon runs;
//! after shutdown the sender gives systemd [`FLUSH`] to take STOPPING=1
//! (systemd knows it is stopping the unit anyway: it sent SIGTERM).
//! Hence the queue holds at most a few states, and systemd never stays in
//! "reloading" after the daemon's reload is over.

use std::collections::VecDeque;
use std::os::unix::net::UnixDatagram as StdDatagram;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::UnixDatagram;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long after shutdown queued states may still wait for systemd.
const FLUSH: Duration = Duration::from_secs(1);

/// A state line for systemd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Ready,
    Reloading,
    Stopping,
}

impl State {
    fn line(self) -> &'static str {
        match self {
            Self::Ready => "READY=1",
            Self::Reloading => "RELOADING=1",
            Self::Stopping => "STOPPING=1",
        }
    }
}

/// The daemon's handle for telling systemd its state; cheap to clone. Does
/// nothing where there is no `NOTIFY_SOCKET`.
#[derive(Clone, Default)]
pub(crate) struct Notifier {
    shared: Option<Arc<Shared>>,
}

#[derive(Default)]
struct Shared {
    /// States not yet sent; the front one may be on its way.
    queue: Mutex<VecDeque<State>>,
    wake: Notify,
}

impl Notifier {
    /// Connects to `$NOTIFY_SOCKET`, if set, and starts the sending task on
    /// `tracker`; it ends once STOPPING=1 is out, or [`FLUSH`] after
    /// `shutdown`.
    pub(crate) fn start(tracker: &TaskTracker, shutdown: &CancellationToken) -> Self {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Self::default();
        };
        let socket = match connect(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, socket = %path.to_string_lossy(), "cannot reach systemd's notification socket");
                return Self::default();
            }
        };
        let shared = Arc::new(Shared::default());
        tracker.spawn(send_loop(socket, shared.clone(), shutdown.clone()));
        Self {
            shared: Some(shared),
        }
    }

    /// Queues `state` for systemd; returns at once.
    pub(crate) fn notify(&self, state: State) {
        let Some(shared) = &self.shared else { return };
        let queued = enqueue(&mut lock(&shared.queue), state);
        if queued {
            shared.wake.notify_one();
        } else {
            tracing::debug!(
                state = state.line(),
                "systemd is not reading; state not queued"
            );
        }
    }
}

/// A poisoned lock only means a panic elsewhere; the queue is still valid.
fn lock(queue: &Mutex<VecDeque<State>>) -> std::sync::MutexGuard<'_, VecDeque<State>> {
    queue.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Appends `state` unless the module's rules drop it; whether it was queued.
fn enqueue(queue: &mut VecDeque<State>, state: State) -> bool {
    let keep = match state {
        State::Reloading => queue.is_empty(),
        State::Ready => queue.back() != Some(&State::Ready),
        State::Stopping => true,
    };
    if keep {
        queue.push_back(state);
    }
    keep
}

/// A non-blocking datagram socket connected to `path` (`@` names an
/// abstract socket). Connected, so that writability means room in
/// systemd's queue.
fn connect(path: &std::ffi::OsStr) -> std::io::Result<UnixDatagram> {
    let sock = StdDatagram::unbound()?;
    if let Some(name) = path.as_encoded_bytes().strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        sock.connect_addr(&std::os::unix::net::SocketAddr::from_abstract_name(name)?)?;
    } else {
        sock.connect(path)?;
    }
    sock.set_nonblocking(true)?;
    UnixDatagram::from_std(sock)
}

async fn send_loop(socket: UnixDatagram, shared: Arc<Shared>, shutdown: CancellationToken) {
    let give_up = async {
        shutdown.cancelled().await;
        tokio::time::sleep(FLUSH).await;
    };
    tokio::pin!(give_up);
    loop {
        let front = lock(&shared.queue).front().copied();
        let Some(state) = front else {
            tokio::select! {
                () = shared.wake.notified() => continue,
                () = &mut give_up => return,
            }
        };
        tokio::select! {
            sent = socket.send(state.line().as_bytes()) => {
                if let Err(e) = sent {
                    tracing::debug!(error = %e, state = state.line(), "sd_notify failed");
                }
            }
            () = &mut give_up => {
                let left: Vec<&str> = lock(&shared.queue).iter().map(|s| s.line()).collect();
                tracing::warn!(?left, "systemd did not read its notification socket; states not sent");
                return;
            }
        }
        lock(&shared.queue).pop_front();
        if state == State::Stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use State::{Ready, Reloading, Stopping};

    #[test]
    fn the_queue_stays_short_and_never_ends_reloading() {
        // (queue before, state, queued?, queue after)
        let cases: &[(&[State], State, bool, &[State])] = &[
            (&[], Ready, true, &[Ready]),
            (&[], Reloading, true, &[Reloading]),
            (&[Reloading], Ready, true, &[Reloading, Ready]),
            // A backlog: the reload is not announced, its end is.
            (&[Ready], Reloading, false, &[Ready]),
            (&[Ready], Ready, false, &[Ready]),
            (&[Reloading, Ready], Reloading, false, &[Reloading, Ready]),
            (
                &[Reloading, Ready],
                Stopping,
                true,
                &[Reloading, Ready, Stopping],
            ),
            (&[Reloading], Stopping, true, &[Reloading, Stopping]),
        ];
        for (before, state, queued, after) in cases {
            let mut q: VecDeque<State> = before.iter().copied().collect();
            assert_eq!(enqueue(&mut q, *state), *queued, "{before:?} + {state:?}");
            assert_eq!(q, after.to_vec(), "{before:?} + {state:?}");
        }
    }

    #[test]
    fn any_sequence_keeps_the_queue_bounded() {
        // Every sequence of 12 reload states to a reader that never reads.
        for n in 0..2u32.pow(12) {
            let mut q = VecDeque::new();
            let mut k = n;
            for _ in 0..12 {
                let state = [Ready, Reloading][(k % 2) as usize];
                k /= 2;
                enqueue(&mut q, state);
                assert!(q.len() <= 2, "{q:?}");
                assert!(q.len() <= 1 || q.back() != Some(&Reloading), "{q:?}");
            }
        }
    }
}
