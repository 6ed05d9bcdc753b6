//! Running the programs certd starts (reload and notify commands, dns-01
//! hooks): a process group of their own, a minimal environment, a timeout
//! that kills the whole group, and the tail of what they wrote.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::{ChildStderr, ChildStdout};

/// The last `max` characters of `text`, trimmed.
pub(crate) fn tail(text: &str, max: usize) -> &str {
    let text = text.trim();
    let skip = text.chars().count().saturating_sub(max);
    text.char_indices()
        .nth(skip)
        .map_or("", |(i, _)| &text[i..])
}

/// `PATH` of every program certd runs: the system's directories, not
/// whatever certd itself was started with.
pub(crate) const PROGRAM_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How much of each output stream is kept (the end of it).
const OUTPUT_KEEP: usize = 64 * 1024;

/// How a program certd ran ended.
#[derive(Debug)]
pub(crate) enum ProgramEnd {
    Exited(ExitStatus),
    /// It ran past its timeout; its whole process group was killed.
    TimedOut,
    CannotRun(io::Error),
}

/// A program's end and the tail of what it wrote.
#[derive(Debug)]
pub(crate) struct ProgramRun {
    pub end: ProgramEnd,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs `program` with `args` in a process group of its own and a minimal
/// environment: `PATH` ([`PROGRAM_PATH`]), `LANG=C.UTF-8` and `env` (the
/// `CERTD_*` variables), nothing of certd's own. Past `timeout`, or if
/// this future is dropped (certd stops), the whole group is killed, so a
/// program's children do not outlive it. Once the program itself exits,
/// what its pipes hold is read and it is done: a child it left running in
/// the background may keep them open for as long as it likes.
pub(crate) async fn run_program(
    program: &Path,
    args: &[&OsStr],
    env: &[(&str, &OsStr)],
    timeout: Duration,
) -> ProgramRun {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", PROGRAM_PATH)
        .env("LANG", "C.UTF-8")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            return ProgramRun {
                end: ProgramEnd::CannotRun(e),
                stdout: Vec::new(),
                stderr: Vec::new(),
            };
        }
    };
    let mut group = GroupKiller(child.id());
    let mut out = Output::new(child.stdout.take().map(Pipe::Out));
    let mut err = Output::new(child.stderr.take().map(Pipe::Err));
    let deadline = tokio::time::Instant::now() + timeout;
    let end = loop {
        tokio::select! {
            status = child.wait() => break match status {
                Ok(status) => ProgramEnd::Exited(status),
                Err(e) => ProgramEnd::CannotRun(e),
            },
            () = out.read_some() => {}
            () = err.read_some() => {}
            () = tokio::time::sleep_until(deadline) => {
                group.kill();
                // SIGKILL cannot be ignored: the leader is gone at once.
                let _ = child.wait().await;
                break ProgramEnd::TimedOut;
            }
        }
    };
    // The leader is reaped; what is left of the group (a command's own
    // background job) is the operator's business, unless we timed out.
    group.0 = None;
    ProgramRun {
        end,
        stdout: out.finish(),
        stderr: err.finish(),
    }
}

/// Kills a program's process group when dropped, unless disarmed (`None`).
struct GroupKiller(Option<u32>);

impl GroupKiller {
    fn kill(&mut self) {
        if let Some(pid) = self.0.take().and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill takes no pointers. The leader is not reaped yet,
            // so its pid still names this group and no other.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

enum Pipe {
    Out(ChildStdout),
    Err(ChildStderr),
}

/// One output stream of a program, read while it runs.
struct Output {
    pipe: Option<Pipe>,
    data: Vec<u8>,
}

impl Output {
    fn new(pipe: Option<Pipe>) -> Self {
        Self {
            pipe,
            data: Vec::new(),
        }
    }

    /// Reads what is there; never completes once the pipe is at its end.
    async fn read_some(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = match &mut self.pipe {
            Some(Pipe::Out(p)) => p.read(&mut chunk).await,
            Some(Pipe::Err(p)) => p.read(&mut chunk).await,
            None => std::future::pending().await,
        };
        match n {
            Ok(n) if n > 0 => self.keep(&chunk[..n]),
            _ => self.pipe = None,
        }
    }

    fn keep(&mut self, bytes: &[u8]) {
        self.data.extend_from_slice(bytes);
        let excess = self.data.len().saturating_sub(OUTPUT_KEEP);
        self.data.drain(..excess);
    }

    /// Takes what the pipe holds right now without waiting for its end.
    /// A duplicate descriptor shares the pipe's non-blocking mode (tokio's
    /// own conversion to a `File` would make it blocking), so `WouldBlock`
    /// means nothing more yet.
    fn finish(mut self) -> Vec<u8> {
        let fd: Option<io::Result<OwnedFd>> = match &self.pipe {
            Some(Pipe::Out(p)) => Some(p.as_fd().try_clone_to_owned()),
            Some(Pipe::Err(p)) => Some(p.as_fd().try_clone_to_owned()),
            None => None,
        };
        if let Some(Ok(fd)) = fd {
            let mut file = File::from(fd);
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = file.read(&mut chunk) {
                self.keep(&chunk[..n]);
            }
        }
        self.data
    }
}
