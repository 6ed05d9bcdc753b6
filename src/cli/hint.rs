//! The way out when the configuration file is there but this user may
//! not read it: the command line again, run as the file's group.

use std::path::Path;

use crate::app::dirs::as_user_suggestion;

/// When the configuration is there but this user may not read it (the
/// packaged file is 0640 root:certd): how to run the command as certd's
/// user instead.
pub(super) fn unreadable_config(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let e = std::fs::File::open(path).err()?;
    if e.kind() != std::io::ErrorKind::PermissionDenied {
        return None;
    }
    let meta = std::fs::metadata(path).ok()?;
    // The file's group is certd's in the package; its owner is root.
    let user = group_name(meta.gid()).filter(|g| g != "root")?;
    Some(format!(
        "{} is readable only by root and group {user}: run: {}",
        path.display(),
        as_user_suggestion(&user)
    ))
}

/// The name of group `gid`, from the group database.
fn group_name(gid: u32) -> Option<String> {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: an all-zero group is a valid value of this plain C struct
    // (null pointers, zero id); getgrgid_r fills it.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is to a live local of the stated size;
    // getgrgid_r writes only within `buf` and `grp`.
    let rc = unsafe {
        libc::getgrgid_r(
            gid,
            &raw mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &raw mut found,
        )
    };
    if rc != 0 || found.is_null() || grp.gr_name.is_null() {
        return None;
    }
    // SAFETY: on success gr_name points to a NUL-terminated string in `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(grp.gr_name) };
    name.to_str().ok().map(str::to_owned)
}
