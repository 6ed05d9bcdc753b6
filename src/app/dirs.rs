//! The state and certificate directories: created with their modes, and
//! refused when another user owns them or others may write to them. Both
//! the daemon and every writing command start here.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::config::Config;

/// A state or certificate directory certd must not use: another user owns
/// it, or others can write to it and so plant or swap files in it (a key
/// for `reuse_key`, a symlink where a certificate goes).
#[derive(Debug, thiserror::Error)]
#[error("{key} {path} {problem}; certd refuses to run until this is fixed")]
pub(crate) struct UnsafeDir {
    key: &'static str,
    path: PathBuf,
    problem: String,
}

/// A command run as root against directories certd's own user owns: what
/// it created would be root's, and the daemon, running as that user, could
/// no longer write it ("attempt to write a readonly database").
#[derive(Debug, thiserror::Error)]
#[error(
    "{key} {path} belongs to {who}, and this command runs as root: files it created there would be root's, and certd running as {who} could not write them. run: {suggestion}",
    who = user_label(*owner),
    suggestion = as_owner_suggestion(*owner)
)]
pub(crate) struct WrongUser {
    key: &'static str,
    path: PathBuf,
    owner: u32,
}

/// `certd`'s user by name and uid, `uid 65534` when it has no name.
pub(crate) fn user_label(uid: u32) -> String {
    match user_name(uid) {
        Some(name) => format!("user {name} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// The login name of `uid`, from the password database.
pub(crate) fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: an all-zero passwd is a valid value of this plain C struct
    // (null pointers, zero ids); getpwuid_r fills it.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is to a live local of the stated size;
    // getpwuid_r writes only within `buf` and `pwd`.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &raw mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &raw mut found,
        )
    };
    if rc != 0 || found.is_null() || pwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points to a NUL-terminated string in `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    name.to_str().ok().map(str::to_owned)
}

/// This command line, run as `uid`: `sudo -u certd certd …` (`#65534` for
/// a user without a name, as sudo takes it).
pub(crate) fn as_owner_suggestion(uid: u32) -> String {
    as_user_suggestion(&user_name(uid).unwrap_or_else(|| format!("'#{uid}'")))
}

/// This command line, run as `user` through sudo.
pub(crate) fn as_user_suggestion(user: &str) -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+".contains(c))
            {
                a
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect();
    format!("sudo -u {user} certd {}", args.join(" "))
}

/// Creates the state and certificate directories (0700 and 0755, whatever
/// the umask) and checks that certd's user owns them and that neither
/// group nor others can write to them.
pub(crate) fn ensure_dirs(cfg: &Config) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    for (key, dir, mode) in [
        ("state_dir", &cfg.storage.state_dir, 0o700),
        ("cert_dir", &cfg.storage.cert_dir, 0o755),
    ] {
        if !dir.exists() {
            crate::safefs::ensure_own_dir(dir, mode)
                .with_context(|| format!("cannot create {key} {}", dir.display()))?;
        }
        let meta = std::fs::metadata(dir).with_context(|| format!("{key} {}", dir.display()))?;
        let unsafe_dir = |problem: String| UnsafeDir {
            key,
            path: dir.clone(),
            problem,
        };
        let me = crate::safefs::euid();
        if me == 0 && meta.uid() != 0 {
            return Err(WrongUser {
                key,
                path: dir.clone(),
                owner: meta.uid(),
            }
            .into());
        }
        if meta.uid() != me {
            return Err(unsafe_dir(format!(
                "is owned by uid {}, not by certd's user (uid {me}): fix with `chown {me} {}`",
                meta.uid(),
                dir.display()
            ))
            .into());
        }
        if meta.mode() & 0o022 != 0 {
            return Err(unsafe_dir(format!(
                "is writable by group or others (mode {:04o}): fix with `chmod go-w {}`",
                meta.mode() & 0o7777,
                dir.display()
            ))
            .into());
        }
    }
    Ok(())
}
