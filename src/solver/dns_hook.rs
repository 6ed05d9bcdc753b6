//! dns-01 through an operator's hook program.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

use super::{ChallengeSpec, Solver, SolverError, Unready, check_alias};
use crate::clock::Clock;
use crate::config::Dns01Config;
use crate::dns::propagation::{Expect, PropagationCheck};
use crate::process::{ProgramEnd, run_program, tail};

/// dns-01 through an operator's program: `hook present` and `hook cleanup`,
/// with the record to write in `CERTD_DNS_RECORD` (the end of the CNAME
/// chain at `_acme-challenge.<name>`, or at the certificate's `dns_alias`),
/// the name the CA asks for in `CERTD_DNS_ORIGINAL`, the TXT value in
/// `CERTD_DNS_VALUE` and the domain in `CERTD_DOMAIN` (and only `PATH` and
/// `LANG` besides: `process::run_program`). The hook must add (not
/// replace) the value on present and remove only that value on cleanup: a
/// name and its wildcard share one record name.
pub(crate) struct Dns01Hook {
    hook: PathBuf,
    timeout: Duration,
    propagation: PropagationCheck,
}

impl Dns01Hook {
    pub(super) fn new(hook: &Path, cfg: &Dns01Config, clock: Clock) -> Self {
        Self {
            hook: hook.to_owned(),
            timeout: cfg.hook_timeout,
            propagation: PropagationCheck::new(&cfg.propagation, clock),
        }
    }

    /// The record the hook writes: the end of the CNAME chain.
    async fn target(&self, c: &ChallengeSpec) -> Result<String, SolverError> {
        let record = c.dns_record();
        self.propagation
            .follow_cnames(&record, None)
            .await
            .map(|n| crate::dns::display_name(&n))
            .map_err(|source| SolverError::DnsTarget {
                record,
                source: Box::new(source),
            })
    }

    async fn run(&self, action: &'static str, c: &ChallengeSpec) -> Result<(), SolverError> {
        let original = crate::dns::challenge_record(&c.identifier);
        let err = |record: &str, detail: String| SolverError::Hook {
            hook: self.hook.clone(),
            action,
            record: record.to_owned(),
            detail,
        };
        // The driver passes only names from the configuration and the value
        // is a hash; still, nothing that could end a line or a word in a
        // hook's shell or nsupdate script reaches its environment.
        if !hook_safe(&c.identifier) || !hook_safe(&c.dns_value) {
            return Err(err(
                &original,
                format!(
                    "not run: {:?} is not a DNS name or {:?} not a base64url value",
                    c.identifier, c.dns_value
                ),
            ));
        }
        // The target comes from DNS: checked the same way.
        let record = self.target(c).await?;
        if !hook_safe(&record) {
            return Err(err(
                &original,
                format!("not run: the CNAME target {record:?} is not a DNS name"),
            ));
        }
        // Its own process group and a minimal environment, like every
        // program certd runs (`process::run_program`).
        let run = run_program(
            &self.hook,
            &[action.as_ref()],
            &[
                ("CERTD_DNS_RECORD", record.as_ref()),
                ("CERTD_DNS_ORIGINAL", original.as_ref()),
                ("CERTD_DNS_VALUE", c.dns_value.as_ref()),
                ("CERTD_DOMAIN", c.identifier.as_ref()),
            ],
            self.timeout,
        )
        .await;
        match run.end {
            ProgramEnd::Exited(status) if status.success() => Ok(()),
            ProgramEnd::Exited(status) => {
                let stderr = String::from_utf8_lossy(&run.stderr);
                Err(err(
                    &record,
                    format!("exited with {status}: {}", tail(&stderr, 500)),
                ))
            }
            ProgramEnd::TimedOut => Err(err(
                &record,
                format!("timed out after {}s", self.timeout.as_secs()),
            )),
            ProgramEnd::CannotRun(e) => Err(err(&record, format!("cannot run: {e}"))),
        }
    }
}

/// Whether `s` is made only of what DNS names and base64url values hold.
fn hook_safe(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*'))
}

#[async_trait]
impl Solver for Dns01Hook {
    async fn present(&self, c: &ChallengeSpec) -> Result<(), SolverError> {
        self.run("present", c).await
    }

    fn check(&self) -> Result<(), Unready> {
        use std::os::unix::fs::PermissionsExt;
        let what = format!("dns01.hook {}", self.hook.display());
        let unready = |problem: String| Unready {
            what: what.clone(),
            problem,
            fix: format!(
                "install the hook there and make it executable (`chmod +x {}`)",
                self.hook.display()
            ),
        };
        let meta = std::fs::metadata(&self.hook).map_err(|e| unready(e.to_string()))?;
        if !meta.is_file() {
            return Err(unready("is not a regular file".into()));
        }
        // `access` asks the kernel as exec would, for certd's user; it
        // says yes to root for any file with one execute bit, so the bits
        // are checked too.
        let path = std::ffi::CString::new(self.hook.as_os_str().as_encoded_bytes())
            .map_err(|e| unready(e.to_string()))?;
        // SAFETY: `path` is a NUL-terminated string that outlives the call.
        let executable = unsafe { libc::access(path.as_ptr(), libc::X_OK) } == 0;
        if !executable || meta.permissions().mode() & 0o111 == 0 {
            return Err(unready("is not executable".into()));
        }
        Ok(())
    }

    async fn cleanup(&self, c: &ChallengeSpec) -> Result<(), SolverError> {
        self.run("cleanup", c).await
    }

    async fn preflight(&self, c: &ChallengeSpec) -> Result<(), SolverError> {
        let record = self.target(c).await?;
        let name = crate::dns::fqdn(&record).map_err(|e| SolverError::DnsTarget {
            record: record.clone(),
            source: Box::new(crate::dns::propagation::PropagationError::Discover(
                e.to_string(),
            )),
        })?;
        check_alias(&self.propagation, c, &name, None).await?;
        self.propagation
            .wait(&record, Expect::Value(&c.dns_value), None)
            .await
            .map_err(|source| SolverError::Propagation {
                record,
                source: Box::new(source),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PropagationConfig;
    use crate::solver::tests::spec;

    /// Text that is not a DNS name never reaches a hook's environment.
    #[tokio::test]
    async fn hook_never_runs_with_unsafe_values() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let hook = dir.path().join("hook.sh");
        let ran = dir.path().join("ran");
        std::fs::write(&hook, format!("#!/bin/sh\ntouch '{}'\n", ran.display())).expect("hook");
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        // A closed port: the CNAME lookup is refused at once and the
        // record name used as it is.
        let closed = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("port");
        let solver = Dns01Hook {
            hook,
            timeout: Duration::from_secs(10),
            propagation: PropagationCheck::new(
                &PropagationConfig {
                    nameservers: vec![crate::config::ServerAddr {
                        host: "127.0.0.1".into(),
                        port: closed.port(),
                    }],
                    ..Default::default()
                },
                Clock::system(),
            ),
        };
        let mut c = spec("tok3_aaaaaaaaaaaaaaaaaaaa");
        c.identifier = "a.example\nupdate add evil.example. 60 TXT x".into();
        let e = solver.present(&c).await.expect_err("refused");
        assert!(e.to_string().contains("not a DNS name"), "{e}");
        c.identifier = "a.example".into();
        c.dns_value = "v\x1b[31m".into();
        solver.present(&c).await.expect_err("refused");
        assert!(!ran.exists(), "the hook ran");
        c.dns_value = "dGVzdA".into();
        solver
            .present(&c)
            .await
            .expect("a safe value runs the hook");
        assert!(ran.exists());
    }
}
