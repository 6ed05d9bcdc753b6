//! Running the `certd` binary under test, in the style of ripgrep's
//! `TestCommand`: a builder over `std::process::Command` that always passes
//! `--config`, captures both streams, and never lets a hung certd hang the
//! test run.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long one certd run may take before it is killed and the test fails.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long to wait for output still buffered in the pipes after certd has
/// exited. Only a grandchild that inherited the pipes (e.g. a reload command
/// left running in the background) can hold them open longer.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A `certd --config <path> ...` invocation being built.
#[derive(Debug)]
pub struct TestCommand {
    cmd: Command,
    timeout: Duration,
}

impl TestCommand {
    /// `certd --config <config>`, with `RUST_LOG=certd=debug` unless the
    /// test run sets `RUST_LOG`, and without any `CERTD_*` variables of the
    /// caller's environment, which could otherwise change certd's settings.
    pub fn new(config: &Path) -> TestCommand {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_certd"));
        cmd.arg("--config").arg(config);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CERTD_") {
                cmd.env_remove(key);
            }
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "certd=debug");
        }
        // Escape codes in the logs would break substring assertions.
        cmd.env("NO_COLOR", "1");
        TestCommand {
            cmd,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn arg(&mut self, arg: impl AsRef<std::ffi::OsStr>) -> &mut TestCommand {
        self.cmd.arg(arg);
        self
    }

    pub fn args<I, S>(&mut self, args: I) -> &mut TestCommand
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.cmd.args(args);
        self
    }

    pub fn env(
        &mut self,
        key: impl AsRef<std::ffi::OsStr>,
        value: impl AsRef<std::ffi::OsStr>,
    ) -> &mut TestCommand {
        self.cmd.env(key, value);
        self
    }

    pub fn env_remove(&mut self, key: impl AsRef<std::ffi::OsStr>) -> &mut TestCommand {
        self.cmd.env_remove(key);
        self
    }

    pub fn current_dir(&mut self, dir: impl AsRef<Path>) -> &mut TestCommand {
        self.cmd.current_dir(dir);
        self
    }

    /// Starts certd with `RLIMIT_NOFILE` at `n`, soft and hard, as
    /// `ulimit -n n` before `exec` would.
    pub fn fd_limit(&mut self, n: u64) -> &mut TestCommand {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs between fork and exec and only calls
        // setrlimit, which is async-signal-safe, on a stack value.
        unsafe {
            self.cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self
    }

    /// Starts certd with `mask` as its umask.
    pub fn umask(&mut self, mask: u32) -> &mut TestCommand {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs between fork and exec and only calls
        // umask, which is async-signal-safe and cannot fail.
        unsafe {
            self.cmd.pre_exec(move || {
                libc::umask(mask);
                Ok(())
            });
        }
        self
    }

    /// Overrides the 120 s limit after which certd is killed and the test
    /// fails (for `output()`, `Daemon::wait` and `Daemon::terminate`).
    pub fn timeout(&mut self, timeout: Duration) -> &mut TestCommand {
        self.timeout = timeout;
        self
    }

    /// Runs certd to completion and returns its status and output. Panics
    /// if it does not exit within the timeout.
    pub fn output(&mut self) -> CmdOutput {
        self.spawn().wait()
    }

    /// Starts certd in the background (e.g. `run`, the daemon mode). It is
    /// killed when the returned `Daemon` is dropped.
    pub fn spawn(&mut self) -> Daemon {
        let mut child = self
            .cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the certd binary under test");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take(), Arc::clone(&stdout)),
            collect(child.stderr.take(), Arc::clone(&stderr)),
        ];
        Daemon {
            child: Some(child),
            stdout,
            stderr,
            readers,
            timeout: self.timeout,
        }
    }
}

/// Reads `pipe` to its end into `buf` on a thread of its own, so the child
/// never blocks on a full pipe and the test can look at output as it comes.
fn collect(pipe: Option<impl Read + Send + 'static>, buf: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let Some(mut pipe) = pipe else { return };
        let mut chunk = [0u8; 8192];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => lock(&buf).extend_from_slice(&chunk[..n]),
            }
        }
    })
}

/// Locks an output buffer. A reader thread cannot panic while holding the
/// lock (it only appends), so a poisoned lock still holds valid data.
fn lock(buf: &Mutex<Vec<u8>>) -> std::sync::MutexGuard<'_, Vec<u8>> {
    buf.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A certd process running in the background.
#[derive(Debug)]
pub struct Daemon {
    /// `None` once the process has been reaped.
    child: Option<Child>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    timeout: Duration,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&lock(&self.stdout)).into_owned()
    }

    /// Stderr (where the logs go) so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&lock(&self.stderr)).into_owned()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits until stdout or stderr contains `needle`; panics with both
    /// streams if that does not happen within `timeout` or certd exits
    /// without printing it.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) || self.stderr().contains(needle) {
                return;
            }
            let running = self.is_running();
            if !running || Instant::now() > deadline {
                // Give the readers a moment to catch up before giving up.
                std::thread::sleep(Duration::from_millis(100));
                if self.stdout().contains(needle) || self.stderr().contains(needle) {
                    return;
                }
                panic!(
                    "certd {} without printing {needle:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    if running { "timed out" } else { "exited" },
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `path` exists; panics with certd's output if it does not
    /// appear within `timeout`.
    pub fn wait_for_file(&mut self, path: &Path, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !path.exists() {
            assert!(
                Instant::now() <= deadline,
                "{} did not appear within {timeout:?} (certd {})\n--- stdout ---\n{}\n--- stderr ---\n{}",
                path.display(),
                if self.is_running() {
                    "still running"
                } else {
                    "exited"
                },
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal by name (e.g. "TERM", "HUP") with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.pid().to_string()])
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -s {signal} {} failed", self.pid());
    }

    /// Sends SIGTERM and waits for certd to exit (a graceful shutdown).
    pub fn terminate(self) -> CmdOutput {
        self.signal("TERM");
        self.wait()
    }

    /// Sends SIGTERM and waits at most `limit` for certd to exit; returns
    /// how it ended and how long that took. Past `limit` it panics with
    /// what each of certd's threads was blocked in (the kernel's stack and
    /// wait channel, from /proc) and the log, then kills it.
    pub fn terminate_within(mut self, limit: Duration) -> (CmdOutput, Duration) {
        let start = Instant::now();
        self.signal("TERM");
        let pid = self.pid();
        loop {
            if !self.is_running() {
                break;
            }
            if start.elapsed() > limit {
                let blocked = kernel_stacks(pid);
                if let Some(mut child) = self.child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                self.drain();
                panic!(
                    "certd did not exit within {limit:?} of SIGTERM; killed\n--- threads ---\n{blocked}\n--- stderr ---\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let took = start.elapsed();
        (self.wait(), took)
    }

    /// Waits for certd to exit on its own. Panics, after killing it, if it
    /// does not within the command's timeout.
    pub fn wait(mut self) -> CmdOutput {
        let deadline = Instant::now() + self.timeout;
        let mut child = self
            .child
            .take()
            .expect("a Daemon's child is reaped only once");
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    self.drain();
                    panic!(
                        "certd did not exit within {:?}; killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
                        self.timeout,
                        self.stdout(),
                        self.stderr()
                    );
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("wait for certd: {e}"),
            }
        };
        self.drain();
        CmdOutput {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }

    /// Waits (bounded) for the reader threads to reach end of file.
    fn drain(&mut self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while Instant::now() < deadline && !self.readers.iter().all(JoinHandle::is_finished) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Every thread of `pid` with its kernel wait channel and stack (the stack
/// needs root; without it the wait channel alone still names the call).
fn kernel_stacks(pid: u32) -> String {
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        out.push_str(&format!(
            "thread {} ({}): wchan {}\n{}",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan"),
            read("stack")
        ));
    }
    out
}

/// How a certd run ended and what it printed.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    /// The exit code; `None` if certd was killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics, printing both streams, unless certd exited with 0.
    #[track_caller]
    pub fn assert_success(&self) -> &CmdOutput {
        assert!(self.success(), "certd failed\n{self}");
        self
    }

    /// Panics, printing both streams, if certd exited with 0.
    #[track_caller]
    pub fn assert_failure(&self) -> &CmdOutput {
        assert!(!self.success(), "certd unexpectedly succeeded\n{self}");
        self
    }

    /// Panics, printing both streams, unless certd exited with `code`.
    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &CmdOutput {
        assert_eq!(self.code(), Some(code), "unexpected exit code\n{self}");
        self
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}
