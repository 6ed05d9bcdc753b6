//! Files and directories only certd can change: every mode is set on an
//! open descriptor (`fchmod`), never by path afterwards and never from the
//! umask, no symlink is followed, and a directory certd writes into must be
//! its own and writable by nobody else. A path-based `chmod` after creation
//! races with whoever else can rename entries in the parent.
//!
//! The certificate installer and the account credentials both write
//! through these, so they sit below both.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `path` (never following or replacing anything there) with
/// exactly `mode`, whatever the umask: the mode is set on the descriptor.
pub(crate) fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode & 0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(contents)?;
    f.sync_all()
}

/// The effective user id certd runs as.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Opens `dir` without following a symlink and checks that certd owns it
/// and nobody else can write to it, so entries certd creates there cannot
/// be renamed or replaced behind its back.
pub(crate) fn open_own_dir(dir: &Path) -> io::Result<File> {
    let handle = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)?;
    let meta = handle.metadata()?;
    if meta.uid() != euid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "owned by uid {}, not by certd's user (uid {}): fix with `chown {} {}`",
                meta.uid(),
                euid(),
                euid(),
                dir.display()
            ),
        ));
    }
    Ok(handle)
}

/// Creates `dir` (and missing parents) if needed and gives it exactly
/// `mode` through its descriptor; refuses a directory certd does not own
/// or a symlink in its place.
pub(crate) fn ensure_own_dir(dir: &Path, mode: u32) -> io::Result<()> {
    // Parents get `mode` less the umask (a cert_dir's parents must stay
    // traversable for web servers); the directory itself exactly `mode`.
    DirBuilder::new().recursive(true).mode(mode).create(dir)?;
    let handle = open_own_dir(dir)?;
    if handle.metadata()?.mode() & 0o7777 != mode {
        handle.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Like [`open_own_dir`], and also refuses a directory others can write to.
pub(crate) fn open_private_dir(dir: &Path) -> io::Result<File> {
    let handle = open_own_dir(dir)?;
    let mode = handle.metadata()?.mode();
    if mode & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "writable by group or others (mode {:04o}): fix with `chmod go-w {}`",
                mode & 0o7777,
                dir.display()
            ),
        ));
    }
    Ok(handle)
}

/// Writes a secret (an account key, say) to `path` with mode 0600, atomically.
pub(crate) fn write_secret_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.is_dir()
    {
        ensure_own_dir(dir, 0o700)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    write_new_file(&tmp, contents, 0o600)?;
    fs::rename(&tmp, path)
}
