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
//! Programs certd runs (reload and notify commands, dns-01 hooks) go through
//! [`run_program`]: a process group of their own, a minimal environment, and
//! a timeout that kills the whole group.
//!
//! The CA's answer is untrusted input: before anything is written, the chain
//! is checked as a TLS client would check it (`verify_chain`), so a CA that
//! sends an expired, misissued or unchained certificate cannot replace a
//! working one.

use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::{ChildStderr, ChildStdout};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use webpki::{EndEntityCert, KeyUsage, VerifiedPath, anchor_from_trusted_cert};
use x509_parser::certificate::X509Certificate;

use crate::clock::{UnixTime, rfc3339};
use crate::config::TrustedRoots;

pub const FILES: [&str; 4] = ["cert.pem", "chain.pem", "fullchain.pem", "privkey.pem"];
const KEEP_VERSIONS: usize = 2;
/// How far the CA's clock may run ahead of ours: a certificate valid from
/// a moment from now is taken (CAs rarely backdate). It also refuses one
/// that expires within this margin, which would be useless anyway.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

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

/// Facts about a certificate, parsed from its DER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// DNS names from the subjectAltName extension, sorted.
    pub dns_names: Vec<String>,
    /// iPAddress entries of the subjectAltName extension (RFC 8738), in
    /// canonical text form (RFC 5952 for IPv6), sorted.
    pub ip_addresses: Vec<String>,
    /// Serial number, lower-case hex.
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    /// DER of the SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
    /// The RFC 9773 certificate identifier (base64url AKI keyIdentifier "."
    /// base64url serial), when the certificate has an AKI.
    pub ari_id: Option<String>,
}

impl CertInfo {
    pub fn parse(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("cannot parse certificate: {e}"))?;
        let mut dns_names: Vec<String> = Vec::new();
        let mut ip_addresses: Vec<String> = Vec::new();
        let sans = cert.subject_alternative_name().ok().flatten();
        for n in sans.iter().flat_map(|san| san.value.general_names.iter()) {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => {
                    dns_names.push(d.to_ascii_lowercase());
                }
                x509_parser::extensions::GeneralName::IPAddress(raw) => {
                    ip_addresses.push(ip_from_san(raw)?.to_string());
                }
                _ => {}
            }
        }
        dns_names.sort();
        ip_addresses.sort();
        let aki = cert
            .extensions()
            .iter()
            .find_map(|ext| match ext.parsed_extension() {
                x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    aki.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            });
        let b64 = |b: &[u8]| {
            use base64::Engine;
            base64::prelude::BASE64_URL_SAFE_NO_PAD.encode(b)
        };
        let ari_id = aki.map(|k| format!("{}.{}", b64(&k), b64(cert.tbs_certificate.raw_serial())));
        Ok(Self {
            ari_id,
            dns_names,
            ip_addresses,
            // Lower-case hex without leading zero bytes, as CAs and
            // `openssl x509 -serial` print it.
            serial: cert
                .raw_serial()
                .iter()
                .skip_while(|b| **b == 0)
                .map(|b| format!("{b:02x}"))
                .collect(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            spki: cert.public_key().raw.to_vec(),
        })
    }

    /// Every name on the certificate, DNS names and addresses, sorted as
    /// text: comparable with a certificate's sorted `domain_strings`.
    pub fn names(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .dns_names
            .iter()
            .chain(&self.ip_addresses)
            .cloned()
            .collect();
        all.sort();
        all
    }
}

/// An iPAddress SAN's octets: 4 for IPv4, 16 for IPv6 (RFC 5280 section
/// 4.2.1.6); any other length is a malformed certificate.
fn ip_from_san(raw: &[u8]) -> Result<std::net::IpAddr, String> {
    if let Ok(v4) = <[u8; 4]>::try_from(raw) {
        return Ok(std::net::Ipv4Addr::from(v4).into());
    }
    <[u8; 16]>::try_from(raw)
        .map(|v6| std::net::Ipv6Addr::from(v6).into())
        .map_err(|_| format!("an iPAddress SAN of {} bytes", raw.len()))
}

/// The issuance the CA returned, checked and split into its parts.
#[derive(Debug)]
pub struct Issuance {
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
    pub fn new(
        fullchain_pem: &str,
        key_pem: String,
        key_spki: &[u8],
        domains: &[String],
        roots: Option<&TrustedRoots>,
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
        verify_chain(&certs, roots, UnixTime::now()).map_err(bad)?;
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

    /// The durable record of this issuance, kept until it is installed:
    /// the private key, then the full chain, as PEM.
    pub fn record(&self) -> String {
        format!("{}{}", self.key_pem, self.fullchain_pem)
    }

    /// Reads a [`Issuance::record`] back and checks it as [`Issuance::new`]
    /// checks the CA's answer: a record that no longer verifies (expired,
    /// say) is refused.
    pub fn from_record(
        record: &str,
        domains: &[String],
        roots: Option<&TrustedRoots>,
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
        )
    }
}

/// Checks the chain the CA issued (`certs`, leaf first) as a TLS client
/// would, before it may replace a working certificate:
///
/// - the leaf is valid at `now` (give or take `CLOCK_SKEW`), is not a CA,
///   and carries the serverAuth extended key usage;
/// - every certificate is issued by the one after it (RFC 8555 section 9.1),
///   each of those is a CA, and each signature verifies (rustls-webpki's
///   RFC 5280 path validation: validity, basic constraints, EKU and name
///   constraints along the path);
/// - with `roots`, the chain ends at one of them; without, at the last
///   certificate the CA sent, so a leaf without a chain is refused.
pub fn verify_chain(
    certs: &[CertificateDer<'_>],
    roots: Option<&TrustedRoots>,
    now: UnixTime,
) -> Result<(), String> {
    let parsed = certs
        .iter()
        .enumerate()
        .map(|(i, der)| {
            x509_parser::parse_x509_certificate(der)
                .map(|(_, cert)| cert)
                .map_err(|e| format!("certificate {} of the chain cannot be parsed: {e}", i + 1))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ([leaf, issuers @ ..], [leaf_der, issuer_ders @ ..]) = (parsed.as_slice(), certs) else {
        return Err("no certificate in the response".into());
    };
    let now = now.plus(CLOCK_SKEW);
    check_leaf(leaf, now)?;
    if issuer_ders.is_empty() && roots.is_none() {
        return Err(
            "the CA sent the certificate without its chain, so nothing shows who issued it".into(),
        );
    }
    for (i, pair) in parsed.windows(2).enumerate() {
        if pair[0].issuer().as_raw() != pair[1].subject().as_raw() {
            return Err(format!(
                "certificate {} of the chain ({}) is not issued by the next one ({})",
                i + 1,
                pair[0].subject(),
                pair[1].subject()
            ));
        }
    }
    for (i, cert) in issuers.iter().enumerate() {
        if !is_ca(cert)? {
            return Err(format!(
                "certificate {} of the chain ({}) issues the one before it but is not a CA",
                i + 2,
                cert.subject()
            ));
        }
    }

    let leaf = EndEntityCert::try_from(leaf_der)
        .map_err(|e| format!("the certificate is not usable for TLS: {e}"))?;
    let time = rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
        u64::try_from(now.secs()).unwrap_or(0),
    ));
    let algs = webpki::ALL_VERIFICATION_ALGS;
    // serverAuth where an intermediate has EKUs at all; the leaf's own was
    // required above.
    let usage = KeyUsage::server_auth();
    match (roots, issuer_ders.split_last()) {
        (Some(roots), _) => {
            let anchors = roots.anchors();
            leaf.verify_for_usage(algs, &anchors, issuer_ders, time, usage, None, None)
                .map_err(|e| {
                    format!(
                        "the chain does not lead to a root in trusted_roots ({}): {e}",
                        roots.path().display()
                    )
                })?;
        }
        (None, Some((top, between))) => {
            let anchor = anchor_from_trusted_cert(top)
                .map_err(|e| format!("the chain's last certificate is unusable: {e}"))?;
            // Every certificate the CA sent must be on the path, not just
            // some that happen to link up.
            let uses_all = |path: &VerifiedPath<'_>| {
                if path.intermediate_certificates().count() == between.len() {
                    Ok(())
                } else {
                    Err(webpki::Error::UnknownIssuer)
                }
            };
            leaf.verify_for_usage(algs, &[anchor], between, time, usage, None, Some(&uses_all))
                .map_err(|e| format!("the chain does not verify: {e}"))?;
        }
        // Refused above: no roots and no chain.
        (None, None) => return Err("the CA sent no chain".into()),
    }
    Ok(())
}

/// The leaf's own properties, checked first for a clear message.
fn check_leaf(leaf: &X509Certificate<'_>, now: UnixTime) -> Result<(), String> {
    let validity = leaf.validity();
    let (from, until) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    if now.secs() < from {
        return Err(format!(
            "the certificate is not valid before {}",
            rfc3339(from)
        ));
    }
    if now.secs() > until {
        return Err(format!("the certificate expired at {}", rfc3339(until)));
    }
    if is_ca(leaf)? {
        return Err(
            "the certificate is a CA certificate (basicConstraints cA), not a server's".into(),
        );
    }
    let server_auth = leaf
        .extended_key_usage()
        .map_err(|e| format!("the certificate's extended key usage is malformed: {e}"))?
        .is_some_and(|eku| eku.value.server_auth);
    if !server_auth {
        return Err(
            "the certificate lacks the serverAuth extended key usage of a TLS server certificate"
                .into(),
        );
    }
    Ok(())
}

fn is_ca(cert: &X509Certificate<'_>) -> Result<bool, String> {
    cert.basic_constraints()
        .map(|bc| bc.is_some_and(|bc| bc.value.ca))
        .map_err(|e| format!("{}: malformed basic constraints: {e}", cert.subject()))
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
pub fn install(cert_dir: &Path, name: &str, issuance: &Issuance) -> Result<String, InstallError> {
    let stamp = time::OffsetDateTime::now_utc();
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
    install_version(cert_dir, name, &version, issuance)?;
    Ok(version)
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

/// Creates `path` (never following or replacing anything there) with
/// exactly `mode`, whatever the umask: the mode is set on the descriptor.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
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
pub fn euid() -> u32 {
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Opens `dir` without following a symlink and checks that certd owns it
/// and nobody else can write to it, so entries certd creates there cannot
/// be renamed or replaced behind its back.
fn open_own_dir(dir: &Path) -> io::Result<File> {
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
pub fn ensure_own_dir(dir: &Path, mode: u32) -> io::Result<()> {
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
fn open_private_dir(dir: &Path) -> io::Result<File> {
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

/// The installed private key of `name`, for `reuse_key`; `None` if there
/// is none. Read only through directories certd owns and nobody else can
/// write, without following a symlink at the file, and only if the key
/// file is certd's own and private: a key someone else could plant must
/// never be certified. Blocking.
pub fn read_reusable_key(cert_dir: &Path, name: &str) -> io::Result<Option<String>> {
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
        open_private_dir(&dir).map_err(|e| annotate(&dir, e))?;
    }
    let path = base.join("versions").join(version).join("privkey.pem");
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| annotate(&path, e))?;
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

fn annotate(path: &Path, e: io::Error) -> io::Error {
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
pub fn installed(cert_dir: &Path, name: &str) -> Option<CertInfo> {
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

/// Writes a secret (an account key, say) to `path` with mode 0600, atomically.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> io::Result<()> {
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
pub async fn run_reloads(
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
pub async fn run_command(
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

/// The last `max` characters of `text`, trimmed.
pub fn tail(text: &str, max: usize) -> &str {
    let text = text.trim();
    let skip = text.chars().count().saturating_sub(max);
    text.char_indices()
        .nth(skip)
        .map_or("", |(i, _)| &text[i..])
}

/// `PATH` of every program certd runs: the system's directories, not
/// whatever certd itself was started with.
pub const PROGRAM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How much of each output stream is kept (the end of it).
const OUTPUT_KEEP: usize = 64 * 1024;

/// How a program certd ran ended.
#[derive(Debug)]
pub enum ProgramEnd {
    Exited(ExitStatus),
    /// It ran past its timeout; its whole process group was killed.
    TimedOut,
    CannotRun(io::Error),
}

/// A program's end and the tail of what it wrote.
#[derive(Debug)]
pub struct ProgramRun {
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
pub async fn run_program(
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

/// Lifetimes shorter than this renew at half their lifetime.
pub const SHORT_LIFETIME: i64 = 10 * 86_400;

/// When a certificate with this validity should be renewed without ARI:
/// when the `remaining` fraction (`[daemon] renew_remaining`) of its
/// lifetime is left, or half of it for lifetimes under 10 days, where a
/// third (two days of a six-day certificate) leaves too few retries.
pub fn renewal_time(not_before: i64, not_after: i64, remaining: f64) -> UnixTime {
    let lifetime = (not_after - not_before).max(0);
    let remaining = if lifetime < SHORT_LIFETIME {
        remaining.max(0.5)
    } else {
        remaining
    };
    UnixTime::from_secs(not_after - (lifetime as f64 * remaining) as i64)
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, PublicKeyData,
    };
    use time::OffsetDateTime;

    use super::*;

    /// A CA for tests: its certificate and the means to sign with it.
    struct TestCa {
        cert: rcgen::Certificate,
        issuer: Issuer<'static, KeyPair>,
    }

    impl TestCa {
        fn root(name: &str) -> TestCa {
            let key = KeyPair::generate().expect("key");
            let params = ca_params(name);
            let cert = params.self_signed(&key).expect("root");
            TestCa {
                cert,
                issuer: Issuer::new(params, key),
            }
        }

        fn intermediate(&self, name: &str) -> TestCa {
            let key = KeyPair::generate().expect("key");
            let params = ca_params(name);
            let cert = params.signed_by(&key, &self.issuer).expect("intermediate");
            TestCa {
                cert,
                issuer: Issuer::new(params, key),
            }
        }

        fn der(&self) -> CertificateDer<'static> {
            self.cert.der().clone()
        }
    }

    fn ca_params(name: &str) -> CertificateParams {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
    }

    /// A server certificate as a CA issues it: serverAuth, valid now.
    fn leaf_params(names: &[&str]) -> CertificateParams {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = OffsetDateTime::now_utc() + time::Duration::days(30);
        params
    }

    /// Leaf (for a fresh key) and intermediate PEM, issued under `ca`.
    fn chain_pem(names: &[&str], key: &KeyPair, ca: &TestCa) -> String {
        let leaf = leaf_params(names).signed_by(key, &ca.issuer).expect("leaf");
        format!("{}{}", leaf.pem(), ca.cert.pem())
    }

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
        let back = Issuance::from_record(&record, &names, None).expect("reads back");
        assert_eq!(back.info, original.info);
        assert_eq!(back.key_pem, original.key_pem);
        assert_eq!(back.fullchain_pem, original.fullchain_pem);
        let other = ["b.example".to_owned()];
        assert!(Issuance::from_record(&record, &other, None).is_err());
        assert!(Issuance::from_record(&original.key_pem, &names, None).is_err());
    }

    fn verify(certs: &[CertificateDer<'_>], roots: Option<&TrustedRoots>) -> Result<(), String> {
        verify_chain(certs, roots, UnixTime::now())
    }

    fn roots_file(dir: &Path, cas: &[&TestCa]) -> TrustedRoots {
        let path = dir.join("roots.pem");
        let pem: String = cas.iter().map(|ca| ca.cert.pem()).collect();
        fs::write(&path, pem).expect("write roots");
        TrustedRoots::load(&path).expect("roots")
    }

    #[test]
    fn a_proper_chain_verifies() {
        let root = TestCa::root("Test Root");
        let inter = root.intermediate("Test Intermediate");
        let key = KeyPair::generate().expect("key");
        let leaf = leaf_params(&["a.example"])
            .signed_by(&key, &inter.issuer)
            .expect("leaf");
        let leaf = leaf.der().clone();
        verify(&[leaf.clone(), inter.der()], None).expect("leaf and intermediate");
        verify(&[leaf.clone(), inter.der(), root.der()], None).expect("with the root");
        let dir = tempfile::tempdir().expect("tempdir");
        let roots = roots_file(dir.path(), &[&root]);
        verify(&[leaf.clone(), inter.der()], Some(&roots)).expect("to a trusted root");
        verify(&[leaf, inter.der(), root.der()], Some(&roots)).expect("root included");
    }

    #[test]
    fn leaf_properties_are_checked() {
        let ca = TestCa::root("Test Root").intermediate("Test Intermediate");
        let key = KeyPair::generate().expect("key");
        let issue = |params: CertificateParams| {
            let leaf = params.signed_by(&key, &ca.issuer).expect("leaf");
            verify(&[leaf.der().clone(), ca.der()], None).expect_err("refused")
        };
        let mut expired = leaf_params(&["a.example"]);
        expired.not_before = OffsetDateTime::now_utc() - time::Duration::days(90);
        expired.not_after = OffsetDateTime::now_utc() - time::Duration::days(1);
        let e = issue(expired);
        assert!(e.contains("expired at"), "{e}");

        let mut future = leaf_params(&["a.example"]);
        future.not_before = OffsetDateTime::now_utc() + time::Duration::days(1);
        let e = issue(future);
        assert!(e.contains("not valid before"), "{e}");

        let mut ca_leaf = leaf_params(&["a.example"]);
        ca_leaf.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let e = issue(ca_leaf);
        assert!(e.contains("is a CA certificate"), "{e}");

        let mut client = leaf_params(&["a.example"]);
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let e = issue(client);
        assert!(e.contains("serverAuth"), "{e}");

        let mut no_eku = leaf_params(&["a.example"]);
        no_eku.extended_key_usages.clear();
        let e = issue(no_eku);
        assert!(e.contains("serverAuth"), "{e}");
    }

    #[test]
    fn the_chain_must_link_and_verify() {
        let root = TestCa::root("Test Root");
        let inter = root.intermediate("Test Intermediate");
        let key = KeyPair::generate().expect("key");
        let leaf = leaf_params(&["a.example"])
            .signed_by(&key, &inter.issuer)
            .expect("leaf")
            .der()
            .clone();

        let e = verify(std::slice::from_ref(&leaf), None).expect_err("no chain");
        assert!(e.contains("without its chain"), "{e}");
        let e = verify(&[], None).expect_err("nothing");
        assert!(e.contains("no certificate"), "{e}");

        // Out of order: the root before the intermediate.
        let e = verify(&[leaf.clone(), root.der(), inter.der()], None).expect_err("order");
        assert!(e.contains("not issued by the next one"), "{e}");

        // An impostor with the intermediate's name but another key.
        let impostor = root.intermediate("Test Intermediate");
        let e = verify(&[leaf.clone(), impostor.der()], None).expect_err("signature");
        assert!(e.contains("does not verify"), "{e}");

        // A self-signed leaf (the key's own) is no chain either.
        let own = leaf_params(&["a.example"])
            .self_signed(&key)
            .expect("self-signed");
        let e = verify(&[own.der().clone()], None).expect_err("self-signed");
        assert!(e.contains("without its chain"), "{e}");

        // A non-CA certificate as an issuer.
        let other_key = KeyPair::generate().expect("key");
        let server = leaf_params(&["b.example"])
            .self_signed(&other_key)
            .expect("server");
        let server_issuer = Issuer::new(leaf_params(&["b.example"]), other_key);
        let below = leaf_params(&["a.example"])
            .signed_by(&key, &server_issuer)
            .expect("leaf");
        let e = verify(&[below.der().clone(), server.der().clone()], None).expect_err("non-CA");
        assert!(e.contains("is not a CA"), "{e}");
    }

    #[test]
    fn trusted_roots_decide() {
        let root = TestCa::root("Test Root");
        let rogue = TestCa::root("Rogue Root").intermediate("Rogue Intermediate");
        let key = KeyPair::generate().expect("key");
        let rogue_leaf = leaf_params(&["a.example"])
            .signed_by(&key, &rogue.issuer)
            .expect("leaf");
        let dir = tempfile::tempdir().expect("tempdir");
        let roots = roots_file(dir.path(), &[&root]);
        let e =
            verify(&[rogue_leaf.der().clone(), rogue.der()], Some(&roots)).expect_err("another CA");
        assert!(e.contains("trusted_roots"), "{e}");
        // Directly under a trusted root, no intermediate needed.
        let direct = leaf_params(&["a.example"])
            .signed_by(&key, &root.issuer)
            .expect("leaf");
        verify(&[direct.der().clone()], Some(&roots)).expect("issued by the root");
        verify(&[direct.der().clone()], None).expect_err("but not without roots");

        fs::write(dir.path().join("empty.pem"), "nothing").expect("write");
        let e = TrustedRoots::load(&dir.path().join("empty.pem")).expect_err("empty");
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = TrustedRoots::load(&dir.path().join("absent.pem")).expect_err("absent");
        assert!(e.contains("cannot read"), "{e}");
    }

    #[test]
    fn install_swaps_versions_and_keeps_two() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut serials = Vec::new();
        for _ in 0..3 {
            let i = issuance(&["a.example"]);
            serials.push(i.info.serial.clone());
            install(dir.path(), "www", &i).expect("install");
            // Version names have one-second resolution.
            std::thread::sleep(Duration::from_millis(1100));
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
                None
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
                None
            )
            .is_err()
        );
        Issuance::new(
            &pem,
            String::new(),
            &key.subject_public_key_info(),
            &names,
            None,
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

    #[test]
    fn renewal_at_two_thirds() {
        let day = 86_400;
        assert_eq!(renewal_time(0, 90 * day, 1.0 / 3.0).secs(), 60 * day);
        assert_eq!(
            renewal_time(0, 10 * day, 1.0 / 3.0).secs(),
            10 * day - 10 * day / 3
        );
        // Under 10 days: half the lifetime, unless more was asked for.
        assert_eq!(renewal_time(0, 6 * day, 1.0 / 3.0).secs(), 3 * day);
        assert_eq!(renewal_time(0, 6 * day, 0.75).secs(), 6 * day / 4);
    }
}
