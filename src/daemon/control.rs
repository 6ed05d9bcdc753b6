//! The control socket: how one-shot commands hand their work to a running
//! daemon instead of fighting it for the ledger's lock and the challenge
//! ports.
//!
//! `state_dir/control.sock`, a Unix socket of mode 0600 owned by certd's
//! user. Only a peer whose uid (`SO_PEERCRED`) is root's or the daemon's
//! own is served: the mode keeps others from connecting, the credential
//! check holds even where a file system ignores socket modes.
//!
//! Protocol: one connection per command. The client writes one JSON
//! [`Request`] and a newline; the daemon answers with JSON [`Reply`]
//! lines, output as it happens, the last one the command's exit code.
//! The daemon runs the work through its own parts: renewals through its
//! scheduler (its order slots, its challenge listeners), authorizations
//! through its reaper.

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::cas::Cas;
use crate::app::sink::{Reply, Sink};
use crate::config::Config;
use crate::daemon::schedule;
use crate::order::Context;

/// The socket's file name in the state directory.
pub(crate) const SOCKET_FILE: &str = "control.sock";

/// The longest request line the daemon reads: requests are small (a list
/// of URLs at most).
const MAX_REQUEST: u64 = 1 << 20;

/// How long the daemon waits for a client's request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The socket of `state_dir`.
pub(crate) fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_FILE)
}

/// A command handed to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub(crate) enum Request {
    Renew {
        names: Vec<String>,
        force: bool,
    },
    Revoke {
        name: String,
        /// RFC 5280 reason, as `certd revoke --reason` spells it.
        reason: crate::app::ops::RevokeReason,
        no_renew: bool,
    },
    Reap {
        older_than_secs: Option<u64>,
    },
    Deactivate {
        urls: Vec<String>,
        all_pending: bool,
        include_valid: bool,
        ignore_budget: bool,
    },
    /// Every CA's account that exists (the one CA's, with one).
    Rollover,
    /// The account at the CA of this name.
    RolloverAt {
        ca: String,
    },
}

/// What the daemon's command handlers work with.
#[derive(Clone)]
pub(crate) struct Handles {
    /// The first CA's context.
    pub(crate) ctx: Context,
    /// Every CA's (revocation goes to the issuer).
    pub(crate) cas: Cas,
    pub(crate) scheduler: mpsc::Sender<schedule::Request>,
    /// The configuration last applied (reloads change it).
    pub(crate) config: watch::Receiver<Arc<Config>>,
}

/// Binds the socket (replacing one a dead daemon left: the caller holds
/// the state directory's lock, so no live daemon owns it) and serves it on
/// `tracker` until `shutdown`. The file is removed at shutdown.
pub(crate) fn start(
    state_dir: &Path,
    handles: Handles,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> io::Result<()> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    let path = socket_path(state_dir);
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(&path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    // Under the umask certd sets (022) the socket would be 0755 for a
    // moment; the state directory (0700) already keeps others out.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let tracker_inner = tracker.clone();
    let shutdown = shutdown.clone();
    tracker.spawn(async move {
        loop {
            let stream = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let handles = handles.clone();
            let shutdown = shutdown.clone();
            tracker_inner.spawn(async move {
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = serve(stream, handles) => {}
                }
            });
        }
        let _ = std::fs::remove_file(&path);
    });
    Ok(())
}

/// Whether `uid` may give the daemon commands: root, or certd's own user.
fn authorized(uid: u32) -> bool {
    uid == 0 || uid == crate::safefs::euid()
}

async fn serve(stream: UnixStream, handles: Handles) {
    let uid = match stream.peer_cred() {
        Ok(cred) => cred.uid(),
        Err(e) => {
            tracing::warn!(error = %e, "control socket: no peer credentials; refused");
            return;
        }
    };
    let (read, mut write) = stream.into_split();
    if !authorized(uid) {
        tracing::warn!(
            uid,
            "control socket: a connection from an unauthorized user; refused"
        );
        let _ = write_reply(
            &mut write,
            &Reply::Err(format!(
                "certd: uid {uid} may not control the daemon: only root and uid {} may",
                crate::safefs::euid()
            )),
        )
        .await;
        let _ = write_reply(&mut write, &Reply::Exit(2)).await;
        return;
    }
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => serde_json::from_str::<Request>(&line),
        _ => return,
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sink = Sink::Socket(tx.clone());
    let work = async move {
        let code = match request {
            Ok(request) => {
                tracing::info!(uid, ?request, "control socket: running a command");
                crate::daemon::clients::run_for_client(request, &handles, &sink).await
            }
            Err(e) => {
                sink.err(&format!("certd: the daemon cannot read the request: {e}"));
                2
            }
        };
        let _ = tx.send(Reply::Exit(code));
    };
    let relay = async move {
        while let Some(reply) = rx.recv().await {
            let last = matches!(reply, Reply::Exit(_));
            if write_reply(&mut write, &reply).await.is_err() || last {
                break;
            }
        }
    };
    // The work goes on when the client leaves (a revocation half done is
    // worse than one finished unheard).
    tokio::join!(work, relay);
}

async fn write_reply(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    reply: &Reply,
) -> io::Result<()> {
    let mut line = serde_json::to_string(reply).map_err(io::Error::other)?;
    line.push('\n');
    w.write_all(line.as_bytes()).await
}

/// Why a command could not be handed to the daemon.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardError {
    #[error(
        "cannot use the daemon's control socket {path}: {source}. The daemon runs as uid {owner}; run: {suggestion}"
    )]
    Denied {
        path: String,
        owner: u32,
        suggestion: String,
        #[source]
        source: io::Error,
    },
    #[error("the daemon's control socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("the daemon ended the connection without an exit code ({path})")]
    Truncated { path: String },
}

/// Hands `request` to the daemon of `state_dir` and prints its output as
/// it comes. `None` when no daemon listens (no socket, or one a stopped
/// daemon left): the command then runs itself.
pub(crate) async fn forward(
    state_dir: &Path,
    request: &Request,
) -> Result<Option<ExitCode>, ForwardError> {
    let path = socket_path(state_dir);
    let display = path.display().to_string();
    let io_err = |source| ForwardError::Io {
        path: display.clone(),
        source,
    };
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            use std::os::unix::fs::MetadataExt as _;
            let owner = std::fs::metadata(state_dir).map_or(0, |m| m.uid());
            return Err(ForwardError::Denied {
                path: display.clone(),
                owner,
                suggestion: crate::app::dirs::as_owner_suggestion(owner),
                source: e,
            });
        }
        Err(e) => return Err(io_err(e)),
    };
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request).map_err(|e| io_err(io::Error::other(e)))?;
    line.push('\n');
    write.write_all(line.as_bytes()).await.map_err(io_err)?;
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await.map_err(io_err)? {
        match serde_json::from_str::<Reply>(&line) {
            Ok(Reply::Out(text)) => Sink::Terminal.out(&text),
            Ok(Reply::Err(text)) => Sink::Terminal.err(&text),
            Ok(Reply::Exit(code)) => return Ok(Some(ExitCode::from(code))),
            Err(e) => {
                return Err(io_err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("not a reply line: {e}"),
                )));
            }
        }
    }
    Err(ForwardError::Truncated { path: display })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire format is what a client of another certd version sends:
    /// it changes only on purpose.
    #[test]
    fn requests_and_replies_have_a_stable_wire_format() {
        let renew = Request::Renew {
            names: vec!["api".into()],
            force: true,
        };
        assert_eq!(
            serde_json::to_string(&renew).expect("JSON"),
            r#"{"command":"renew","names":["api"],"force":true}"#
        );
        let revoke: Request = serde_json::from_str(
            r#"{"command":"revoke","name":"blog","reason":"key-compromise","no_renew":false}"#,
        )
        .expect("a revoke request");
        assert!(matches!(
            revoke,
            Request::Revoke {
                reason: crate::app::ops::RevokeReason::KeyCompromise,
                ..
            }
        ));
        assert_eq!(
            serde_json::to_string(&Reply::Exit(1)).expect("JSON"),
            r#"{"exit":1}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"command":"format-disk"}"#).is_err());
    }

    #[test]
    fn only_root_and_the_daemons_user_are_served() {
        assert!(authorized(0));
        assert!(authorized(crate::safefs::euid()));
        let other = crate::safefs::euid().wrapping_add(1).max(1);
        assert!(!authorized(other));
    }

    #[tokio::test]
    async fn no_daemon_means_the_command_runs_itself() {
        let dir = tempfile::tempdir().expect("temp dir");
        let request = Request::Rollover;
        assert!(matches!(forward(dir.path(), &request).await, Ok(None)));
        // A socket a killed daemon left behind: nobody listens.
        let path = socket_path(dir.path());
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        assert!(matches!(forward(dir.path(), &request).await, Ok(None)));
    }
}
