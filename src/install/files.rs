//! Installing certificates where web servers read them, atomically.
//!
//! Layout of `cert_dir/<name>/`:
//!
//! ```text
//! versions/<version>/{cert,chain,fullchain,privkey}.pem   one directory per issuance
//! current -> versions/<version>                           swapped with one rename(2)
//! cert.pem -> current/cert.pem                            stable paths for web servers
//! chain.pem, fullchain.pem, privkey.pem -> current/…
//! ```
//!
//! A new issuance is written and fsynced in full in its own directory before
//! `current` moves, so any path resolution sees one issuance's key and
//! certificate together, never a mix, and a failure (full disk, read-only
//! file system) before the swap leaves the installed set untouched.
//! `privkey.pem` is 0600. The two newest versions are kept so a broken
//! certificate can be rolled back by hand.
//!
//! Every file and directory gets its final mode on an open descriptor
//! (`fchmod`), never by path afterwards and never from the umask, and every
//! directory certd writes into must be its own and writable by nobody else:
//! a path-based `chmod` after creation races with whoever else can rename
//! entries in the parent. The same checks guard reading a key back for
//! `reuse_key`.
//!
//! What is installed is an [`Issuance`]: the CA's chain, checked
//! (`x509::verify_chain`) against the order before anything is written.

use std::collections::HashMap;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::x509::{CertInfo, verify_chain};
use crate::clock::Clock;
use crate::config::TrustedRoots;
use crate::safefs::{ensure_own_dir, euid, open_own_dir, open_private_dir, write_new_file};

pub(crate) const FILES: [&str; 4] = ["cert.pem", "chain.pem", "fullchain.pem", "privkey.pem"];
const KEEP_VERSIONS: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot install into {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the CA's certificate chain is unusable: {0}")]
    BadChain(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}
#[derive(Debug)]
pub(crate) struct Issuance {
    pub info: CertInfo,
    cert_pem: String,
    chain_pem: String,
    fullchain_pem: String,
    key_pem: String,
}

impl Issuance {
    /// Parses the CA's PEM chain and checks it against the order: the leaf
    /// must carry exactly `domains` and the public half of `key_pem`, and
    /// the chain must pass `verify_chain` (against `roots` where the
    /// operator names them).
    pub(crate) fn new(
        fullchain_pem: &str,
        key_pem: String,
        key_spki: &[u8],
        domains: &[String],
        roots: Option<&TrustedRoots>,
        clock: &Clock,
    ) -> Result<Self, InstallError> {
        let bad = |m: String| InstallError::BadChain(m);
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(fullchain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| bad(format!("not PEM: {e}")))?;
        let leaf = certs
            .first()
            .ok_or_else(|| bad("no certificate in the response".into()))?;
        let info = CertInfo::parse(leaf).map_err(bad)?;
        let mut want: Vec<String> = domains.to_vec();
        want.sort();
        let names = info.names();
        if names != want {
            return Err(bad(format!(
                "the certificate names {names:?}, the order asked for {want:?}"
            )));
        }
        if info.spki != key_spki {
            return Err(bad("the certificate does not match the private key".into()));
        }
        verify_chain(&certs, roots, clock.now()).map_err(bad)?;
        let pem = |der: &CertificateDer<'_>| pem_encode("CERTIFICATE", der);
        let cert_pem = pem(leaf);
        let chain_pem: String = certs[1..].iter().map(pem).collect();
        Ok(Self {
            info,
            fullchain_pem: format!("{cert_pem}{chain_pem}"),
            cert_pem,
            chain_pem,
            key_pem,
        })
    }

    /// The leaf then its chain, as installed in `fullchain.pem`.
    pub(crate) fn fullchain_pem(&self) -> &str {
        &self.fullchain_pem
    }

    /// The private key, PEM.
    pub(crate) fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The durable record of this issuance, kept until it is installed:
    /// the private key, then the full chain, as PEM.
    pub(crate) fn record(&self) -> String {
        format!("{}{}", self.key_pem, self.fullchain_pem)
    }

    /// Reads a [`Issuance::record`] back and checks it as [`Issuance::new`]
    /// checks the CA's answer: a record that no longer verifies (expired,
    /// say) is refused.
    pub(crate) fn from_record(
        record: &str,
        domains: &[String],
        roots: Option<&TrustedRoots>,
        clock: &Clock,
    ) -> Result<Self, InstallError> {
        let bad = |m: String| InstallError::BadChain(format!("the stored issuance: {m}"));
        let at = record
            .find("-----BEGIN CERTIFICATE-----")
            .ok_or_else(|| bad("holds no certificate".into()))?;
        let (key_pem, chain) = record.split_at(at);
        use rcgen::PublicKeyData as _;
        let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| bad(e.to_string()))?;
        Self::new(
            chain,
            key_pem.to_owned(),
            &key.subject_public_key_info(),
            domains,
            roots,
            clock,
        )
    }
}

/// Base64 PEM armour, 64 columns.
fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::prelude::BASE64_STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Installs `issuance` as the current version of `name`; returns the version
/// directory's name. Blocking: call from `spawn_blocking`.
pub(crate) fn install(
    cert_dir: &Path,
    name: &str,
    issuance: &Issuance,
    clock: &Clock,
) -> Result<String, InstallError> {
    let stamp = time::OffsetDateTime::from(clock.system_time());
    let version = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z-{}",
        stamp.year(),
        u8::from(stamp.month()),
        stamp.day(),
        stamp.hour(),
        stamp.minute(),
        stamp.second(),
        &issuance.info.serial[..issuance.info.serial.len().min(16)]
    );
    // One install at a time per certificate in this process: in fleet
    // mode the distribution task and the order path can both install the
    // same issuance at once, and two installers sharing a version's
    // temporary directory would each undo the other's files.
    let lock = install_lock(&cert_dir.join(name));
    let _one_at_a_time = lock.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(current) = already_current(cert_dir, name, issuance) {
        return Ok(current);
    }
    install_version(cert_dir, name, &version, issuance)?;
    Ok(version)
}

/// The lock of one certificate's directory (one process writes a
/// certificate directory: the state directory's lock sees to that).
fn install_lock(base: &Path) -> Arc<Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> = OnceLock::new();
    let mut locks = LOCKS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    Arc::clone(locks.entry(base.to_owned()).or_default())
}

/// The current version's name if it already holds exactly `issuance`
/// (the same chain and key): installing it again would only add a
/// version.
fn already_current(cert_dir: &Path, name: &str, issuance: &Issuance) -> Option<String> {
    let base = cert_dir.join(name);
    let link = fs::read_link(base.join("current")).ok()?;
    let version = link.file_name()?.to_str()?.to_owned();
    let dir = base.join(&link);
    let same = |file: &str, contents: &str| {
        fs::read_to_string(dir.join(file)).is_ok_and(|c| c == contents)
    };
    (same("fullchain.pem", &issuance.fullchain_pem) && same("privkey.pem", &issuance.key_pem))
        .then_some(version)
}

fn install_version(
    cert_dir: &Path,
    name: &str,
    version: &str,
    issuance: &Issuance,
) -> Result<(), InstallError> {
    let base = cert_dir.join(name);
    let versions = base.join("versions");
    for dir in [&base, &versions] {
        ensure_own_dir(dir, 0o755).map_err(io_err(dir))?;
    }
    let final_dir = versions.join(version);
    let tmp_dir = versions.join(format!(".{version}.tmp"));
    // Left by a process killed while writing it (installs of one
    // certificate are one at a time): garbage.
    let _ = fs::remove_dir_all(&tmp_dir);
    let result = write_version(&tmp_dir, issuance)
        .and_then(|()| fs::rename(&tmp_dir, &final_dir).map_err(io_err(&final_dir)))
        .and_then(|()| sync_dir(&versions));
    if let Err(e) = result {
        // Best effort: the half-written version is garbage either way.
        let _ = fs::remove_dir_all(&tmp_dir);
        return Err(e);
    }

    // The stable names (cert.pem -> current/cert.pem, …) exist before
    // `current` does, so that once `current` appears a reader finds every
    // file, and a process killed between the two steps leaves either no
    // installed certificate (the links dangle) or a complete one; never a
    // `current` without its links, which nothing would repair.
    for file in FILES {
        ensure_link(&base, file)?;
    }
    sync_dir(&base)?;

    // The atomic step: `current` now names the new version.
    let current = base.join("current");
    let tmp_link = base.join(".current.tmp");
    let _ = fs::remove_file(&tmp_link);
    let swap = symlink(Path::new("versions").join(version), &tmp_link)
        .and_then(|()| fs::rename(&tmp_link, &current));
    if let Err(e) = swap {
        let _ = fs::remove_file(&tmp_link);
        let _ = fs::remove_dir_all(&final_dir);
        return Err(io_err(&current)(e));
    }
    sync_dir(&base)?;
    prune(&versions, version);
    Ok(())
}

fn write_version(dir: &Path, issuance: &Issuance) -> Result<(), InstallError> {
    // Private while it is filled; 0755 (on the descriptor) once complete.
    DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    let handle = open_own_dir(dir).map_err(io_err(dir))?;
    for (file, contents, mode) in [
        ("cert.pem", &issuance.cert_pem, 0o644),
        ("chain.pem", &issuance.chain_pem, 0o644),
        ("fullchain.pem", &issuance.fullchain_pem, 0o644),
        ("privkey.pem", &issuance.key_pem, 0o600),
    ] {
        let path = dir.join(file);
        write_new_file(&path, contents.as_bytes(), mode).map_err(io_err(&path))?;
    }
    handle
        .set_permissions(fs::Permissions::from_mode(0o755))
        .and_then(|()| handle.sync_all())
        .map_err(io_err(dir))
}

/// The installed private key of `name`, for `reuse_key`; `None` if there
/// is none. Read only through directories certd owns and nobody else can
/// write, without following a symlink at the file, and only if the key
/// file is certd's own and private: a key someone else could plant must
/// never be certified. Blocking.
pub(crate) fn read_reusable_key(cert_dir: &Path, name: &str) -> io::Result<Option<String>> {
    let base = cert_dir.join(name);
    let current = match fs::read_link(base.join("current")) {
        Ok(target) => target,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // certd writes `current` as `versions/<version>`; anything else is not
    // its own doing.
    let parts: Vec<Component<'_>> = current.components().collect();
    let version = match parts.as_slice() {
        [Component::Normal(v), Component::Normal(ver)] if *v == "versions" => *ver,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} points to {}, not into versions/",
                    base.join("current").display(),
                    current.display()
                ),
            ));
        }
    };
    for dir in [
        cert_dir.to_owned(),
        base.clone(),
        base.join("versions"),
        base.join("versions").join(version),
    ] {
        open_private_dir(&dir).map_err(|e| annotate(&dir, &e))?;
    }
    let path = base.join("versions").join(version).join("privkey.pem");
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| annotate(&path, &e))?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.uid() != euid() || meta.mode() & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a private (0600) file of certd's user",
                path.display()
            ),
        ));
    }
    let mut pem = String::new();
    file.read_to_string(&mut pem)?;
    Ok(Some(pem))
}

fn annotate(path: &Path, e: &io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn sync_dir(dir: &Path) -> Result<(), InstallError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Makes `base/file` a symlink to `current/file`, replacing whatever is there
/// atomically (a regular file left by another tool, say).
fn ensure_link(base: &Path, file: &str) -> Result<(), InstallError> {
    let path = base.join(file);
    let target = Path::new("current").join(file);
    if fs::read_link(&path).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let tmp = base.join(format!(".{file}.tmp"));
    let _ = fs::remove_file(&tmp);
    symlink(&target, &tmp)
        .and_then(|()| fs::rename(&tmp, &path))
        .map_err(io_err(&path))
}

/// Removes all but the newest `KEEP_VERSIONS` versions; never `keep`.
fn prune(versions: &Path, keep: &str) {
    let Ok(entries) = fs::read_dir(versions) else {
        return;
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    // Version names start with a UTC timestamp, so they sort by age.
    names.sort();
    let excess = names.len().saturating_sub(KEEP_VERSIONS);
    for old in names.iter().take(excess).filter(|n| n.as_str() != keep) {
        if let Err(e) = fs::remove_dir_all(versions.join(old)) {
            tracing::warn!(version = %old, error = %e, "cannot remove an old certificate version");
        }
    }
}

/// The installed certificate of `name`, if a complete one is there.
pub(crate) fn installed(cert_dir: &Path, name: &str) -> Option<CertInfo> {
    let base = cert_dir.join(name);
    // Resolve `current` once so the certificate and key come from one version.
    let current = fs::canonicalize(base.join("current")).ok()?;
    if !current.join("privkey.pem").is_file() {
        return None;
    }
    let der = CertificateDer::pem_file_iter(current.join("cert.pem"))
        .ok()?
        .next()?
        .ok()?;
    CertInfo::parse(&der).ok()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use rcgen::{KeyPair, PublicKeyData};

    use super::*;
    use crate::install::testca::{TestCa, chain_pem};

    fn issuance(names: &[&str]) -> Issuance {
        let ca = TestCa::root("Test Root").intermediate("Test Intermediate");
        let key = KeyPair::generate().expect("key");
        let domains: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        Issuance::new(
            &chain_pem(names, &key, &ca),
            key.serialize_pem(),
            &key.subject_public_key_info(),
            &domains,
            None,
            &Clock::system(),
        )
        .expect("issuance")
    }

    /// What the driver keeps on disk before installing reads back as the
    /// same issuance, and only for the names it was issued for.
    #[test]
    fn the_durable_record_reads_back_as_the_same_issuance() {
        let original = issuance(&["a.example"]);
        let record = original.record();
        let names = ["a.example".to_owned()];
        let back =
            Issuance::from_record(&record, &names, None, &Clock::system()).expect("reads back");
        assert_eq!(back.info, original.info);
        assert_eq!(back.key_pem, original.key_pem);
        assert_eq!(back.fullchain_pem, original.fullchain_pem);
        let other = ["b.example".to_owned()];
        assert!(Issuance::from_record(&record, &other, None, &Clock::system()).is_err());
        assert!(Issuance::from_record(&original.key_pem, &names, None, &Clock::system()).is_err());
    }

    #[test]
    fn install_swaps_versions_and_keeps_two() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Clock::fixed(Clock::system().now());
        let mut serials = Vec::new();
        for _ in 0..3 {
            let i = issuance(&["a.example"]);
            serials.push(i.info.serial.clone());
            install(dir.path(), "www", &i, &clock).expect("install");
            // Version names have one-second resolution.
            clock.advance(std::time::Duration::from_secs(1));
        }
        let now = installed(dir.path(), "www").expect("installed");
        assert_eq!(&now.serial, serials.last().expect("three serials"));
        let base = dir.path().join("www");
        let mode = fs::metadata(base.join("privkey.pem"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let versions = fs::read_dir(base.join("versions"))
            .expect("versions")
            .count();
        assert_eq!(versions, KEEP_VERSIONS);
    }

    /// Two installs of one issuance at once (fleet mode: distribution and
    /// the order path) both succeed and leave it installed whole; before
    /// they were one at a time, each could remove the other's files.
    #[test]
    fn concurrent_installs_of_one_issuance_leave_it_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Clock::system();
        for _ in 0..20 {
            let i = issuance(&["a.example"]);
            std::thread::scope(|s| {
                let installs: Vec<_> = (0..2)
                    .map(|_| s.spawn(|| install(dir.path(), "www", &i, &clock)))
                    .collect();
                for handle in installs {
                    handle.join().expect("no panic").expect("install");
                }
            });
            let now = installed(dir.path(), "www").expect("installed whole");
            assert_eq!(now.serial, i.info.serial);
            let key = fs::read_to_string(dir.path().join("www/privkey.pem")).expect("key");
            assert_eq!(key, i.key_pem);
        }
    }

    #[test]
    fn wrong_names_or_key_are_refused() {
        let ca = TestCa::root("Test Root").intermediate("Test Intermediate");
        let key = KeyPair::generate().expect("key");
        let other = KeyPair::generate().expect("key");
        let pem = chain_pem(&["a.example"], &key, &ca);
        let names = ["b.example".to_owned()];
        assert!(
            Issuance::new(
                &pem,
                String::new(),
                &key.subject_public_key_info(),
                &names,
                None,
                &Clock::system(),
            )
            .is_err()
        );
        let names = ["a.example".to_owned()];
        assert!(
            Issuance::new(
                &pem,
                String::new(),
                &other.subject_public_key_info(),
                &names,
                None,
                &Clock::system(),
            )
            .is_err()
        );
        Issuance::new(
            &pem,
            String::new(),
            &key.subject_public_key_info(),
            &names,
            None,
            &Clock::system(),
        )
        .expect("the right names and key");
    }

    #[test]
    fn failed_install_leaves_installed_set_intact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = issuance(&["a.example"]);
        install_version(dir.path(), "www", "v1", &first).expect("install");
        // Occupy the second version's final name so the rename after all
        // files are written fails, as a full disk would mid-way.
        let blocker = dir.path().join("www/versions/v2/occupied");
        fs::create_dir_all(&blocker).expect("blocker");
        let second = issuance(&["a.example"]);
        assert!(install_version(dir.path(), "www", "v2", &second).is_err());
        let now = installed(dir.path(), "www").expect("still installed");
        assert_eq!(now.serial, first.info.serial);
        assert!(!dir.path().join("www/versions/.v2.tmp").exists());
    }
}
