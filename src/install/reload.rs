//! Reload commands after an install: run in order through
//! [`crate::process::run_program`], each bounded, a failure reported but
//! never fatal (the certificate is already in place).

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use crate::process::{ProgramEnd, run_program, tail};

/// The outcome of one reload command.
#[derive(Debug, Clone)]
pub struct ReloadOutcome {
    pub command: String,
    pub ok: bool,
    /// Exit status and the tail of the output, for the ledger.
    pub detail: String,
}

/// Runs the reload commands in order, each with `timeout`. A failure is
/// reported, never fatal: the certificate is already installed.
///
/// Dropping this future (certd stopping, and its shutdown grace ran out)
/// kills a command still running, with its process group, and logs why.
pub(crate) async fn run_reloads(
    commands: &[String],
    timeout: Duration,
    name: &str,
    cert_dir: &Path,
) -> Vec<ReloadOutcome> {
    let dir = cert_dir.join(name);
    let env = [
        ("CERTD_NAME", name.as_ref()),
        ("CERTD_CERT_DIR", dir.as_os_str()),
    ];
    let mut out = Vec::with_capacity(commands.len());
    for command in commands {
        let mut running = Running {
            name,
            command,
            ended: false,
        };
        out.push(run_command(command, &env, timeout).await);
        running.ended = true;
    }
    out
}

/// A reload command in progress: dropped before it ends, it says so (the
/// group itself is killed by [`run_program`]'s guard).
struct Running<'a> {
    name: &'a str,
    command: &'a str,
    ended: bool,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        tracing::warn!(
            cert = self.name,
            command = self.command,
            "reload command killed with its process group: certd is stopping and the shutdown grace ran out"
        );
    }
}

/// Runs `command` with `/bin/sh -c` and `env`, bounded by `timeout`;
/// returns the exit status and the tail of its output.
pub(crate) async fn run_command(
    command: &str,
    env: &[(&str, &OsStr)],
    timeout: Duration,
) -> ReloadOutcome {
    let run = run_program(
        Path::new("/bin/sh"),
        &[OsStr::new("-c"), OsStr::new(command)],
        env,
        timeout,
    )
    .await;
    let (ok, detail) = match run.end {
        ProgramEnd::TimedOut => (false, format!("timed out after {}s", timeout.as_secs())),
        ProgramEnd::CannotRun(e) => (false, format!("cannot run: {e}")),
        ProgramEnd::Exited(status) => {
            let mut text = String::from_utf8_lossy(&run.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&run.stderr));
            (status.success(), format!("{status}: {}", tail(&text, 1000)))
        }
    };
    ReloadOutcome {
        command: command.to_owned(),
        ok,
        detail,
    }
}
