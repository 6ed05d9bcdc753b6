//! Sealing secrets for the shared database: AES-256-GCM under the fleet key.
//!
//! Private keys travel between hosts through PostgreSQL, so the database
//! (its backups, replicas, anyone who can read a dump) must not be enough
//! to read them. Every host holds the same 32-byte fleet key in a file only
//! its owner can read; a key is sealed on the host that ordered the
//! certificate and unsealed on every host that installs it.
//!
//! A sealed blob is self-describing, so a later key rotation can tell which
//! key sealed which row:
//!
//! ```text
//! version (1 byte, 1) | key id (8 bytes) | nonce (12 bytes) | ciphertext | tag (16 bytes)
//! ```
//!
//! The associated data binds the blob to what it belongs to (for a
//! certificate's key: the certificate's name and serial), so someone who can
//! write to the database cannot move one certificate's key under another
//! name: the tag no longer verifies. Nonces are 96 random bits from the
//! system's generator; at the rate certd seals (a few blobs per certificate
//! lifetime) that stays far below the 2^32 messages per key that random
//! GCM nonces allow.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};

/// Length of the fleet key, in bytes.
pub const KEY_LEN: usize = 32;

/// The format byte every blob starts with.
const VERSION: u8 = 1;
const KEY_ID_LEN: usize = 8;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;
/// The shortest blob that can be valid: a header and the tag of an empty
/// plaintext.
pub const MIN_SEALED_LEN: usize = HEADER_LEN + TAG_LEN;

/// Separates certd's associated data from any other use of the same key.
const AAD_DOMAIN: &[u8] = b"certd-fleet-seal-v1";

/// The fleet key: AES-256-GCM, identical on every host of a fleet.
///
/// Its `Debug` shows the key id only, so the key cannot reach a log by a
/// stray `{:?}`.
pub struct FleetKey {
    key: LessSafeKey,
    id: KeyId,
}

/// Names a fleet key without revealing it: the first 8 bytes of the key's
/// SHA-256, in hex, so `sha256sum <key_file> | cut -c1-16` shows the same.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId([u8; KEY_ID_LEN]);

/// What a sealed blob belongs to; it becomes the associated data, so a
/// blob unseals only in the context it was sealed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealContext {
    /// A certificate's private key: its certificate's name and serial.
    CertificateKey { cert_name: String, serial: String },
    /// A fleet-wide secret (an ACME account key), by name.
    Secret { name: String },
    /// The private key of a finalized order, by the order's URL.
    OrderKey { order_url: String },
}

/// A sealed blob, as stored in the database.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed(Vec<u8>);

/// Why the fleet key file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("fleet key file {path}: {problem}")]
pub struct KeyFileError {
    pub path: PathBuf,
    pub problem: KeyFileProblem,
}

/// The problem with a fleet key file; callers branch on it (a wrong mode
/// is fixed with chmod, a wrong size by generating a new key).
#[derive(Debug, thiserror::Error)]
pub enum KeyFileProblem {
    #[error("cannot read it: {0}")]
    Io(#[source] io::Error),
    #[error("is not a regular file")]
    NotAFile,
    #[error(
        "mode {mode:04o} lets group or others access it; the key must be readable by its owner only (chmod 600)"
    )]
    Mode { mode: u32 },
    #[error(
        "is {len} bytes long; a fleet key is exactly 32 random bytes (e.g. `head -c 32 /dev/urandom`)"
    )]
    Size { len: u64 },
}

/// Why a blob did not seal or unseal.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error(
        "sealed blob is {len} bytes long, shorter than the {MIN_SEALED_LEN} bytes of any sealed value (truncated?)"
    )]
    Truncated { len: usize },
    #[error("sealed blob has format version {0}, this certd reads version 1")]
    Version(u8),
    #[error("sealed with fleet key {blob}, but this host's fleet key is {ours}")]
    WrongKey { blob: KeyId, ours: KeyId },
    #[error(
        "sealed blob for {context} does not verify under fleet key {key}: tampered with, or sealed for something else"
    )]
    Verify { context: SealContext, key: KeyId },
    #[error("a {len}-byte value is too long to seal")]
    TooLong { len: usize },
    #[error("the system's random generator failed")]
    Random,
}

impl FleetKey {
    /// Reads the key from `path`: a regular file that only its owner may
    /// access, exactly 32 bytes long.
    ///
    /// The checks run on the opened file (not the path), so the file that
    /// was checked is the file that is read.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let fail = |problem| KeyFileError {
            path: path.to_owned(),
            problem,
        };
        let mut file = File::options()
            .read(true)
            // A symlink could point the check at one file and a later
            // reader at another; the key is a plain file.
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| fail(KeyFileProblem::Io(e)))?;
        let meta = file.metadata().map_err(|e| fail(KeyFileProblem::Io(e)))?;
        if !meta.is_file() {
            return Err(fail(KeyFileProblem::NotAFile));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(fail(KeyFileProblem::Mode { mode }));
        }
        if meta.len() != KEY_LEN as u64 {
            return Err(fail(KeyFileProblem::Size { len: meta.len() }));
        }
        let mut bytes = [0u8; KEY_LEN];
        // The file may have grown since the size check: read one byte past
        // the key to be sure the key read is the whole file.
        let read = file
            .read_exact(&mut bytes)
            .and_then(|()| file.read(&mut [0u8; 1]));
        let key = match read {
            Ok(0) => Ok(Self::from_bytes(&bytes)),
            Ok(_) => Err(fail(KeyFileProblem::Size {
                len: file.metadata().map_or(KEY_LEN as u64 + 1, |m| m.len()),
            })),
            Err(e) => Err(fail(KeyFileProblem::Io(e))),
        };
        bytes.fill(0);
        key
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Self {
        let digest = digest(&SHA256, bytes);
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest.as_ref()[..KEY_ID_LEN]);
        // Invariant: AES-256-GCM takes exactly KEY_LEN (32) bytes, which
        // the array type guarantees.
        let unbound = UnboundKey::new(&AES_256_GCM, bytes).expect("AES-256 key is 32 bytes");
        Self {
            key: LessSafeKey::new(unbound),
            id: KeyId(id),
        }
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    /// Seals `plaintext` for `context` under a fresh random nonce.
    pub fn seal(
        &self,
        rng: &SystemRandom,
        context: &SealContext,
        plaintext: &[u8],
    ) -> Result<Sealed, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut blob = Vec::with_capacity(MIN_SEALED_LEN + plaintext.len());
        blob.push(VERSION);
        blob.extend_from_slice(&self.id.0);
        blob.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.aad()),
                &mut body,
            )
            // ring fails only for a plaintext longer than GCM's limit (64 GiB).
            .map_err(|_| SealError::TooLong {
                len: plaintext.len(),
            })?;
        blob.extend_from_slice(&body);
        Ok(Sealed(blob))
    }

    /// Opens a blob sealed for `context`. A blob sealed under another key
    /// fails with both key ids, so an operator sees which key the host is
    /// missing.
    pub fn unseal(&self, context: &SealContext, sealed: &Sealed) -> Result<Vec<u8>, SealError> {
        let header = sealed.header()?;
        if header.key_id != self.id {
            return Err(SealError::WrongKey {
                blob: header.key_id,
                ours: self.id,
            });
        }
        let mut body = sealed.0[HEADER_LEN..].to_vec();
        let plain_len = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(header.nonce),
                Aad::from(context.aad()),
                &mut body,
            )
            .map_err(|_| SealError::Verify {
                context: context.clone(),
                key: self.id,
            })?
            .len();
        body.truncate(plain_len);
        Ok(body)
    }
}

impl fmt::Debug for FleetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl SealContext {
    /// The associated data: a domain tag, then each field with its length
    /// in front, so no two contexts share an encoding (`a|bc` vs `ab|c`).
    fn aad(&self) -> Vec<u8> {
        let fields: [&[u8]; 3] = match self {
            Self::CertificateKey { cert_name, serial } => {
                [b"certificate-key", cert_name.as_bytes(), serial.as_bytes()]
            }
            Self::Secret { name } => [b"secret", name.as_bytes(), b""],
            Self::OrderKey { order_url } => [b"order-key", order_url.as_bytes(), b""],
        };
        let mut aad = AAD_DOMAIN.to_vec();
        for field in fields {
            // Names and serials are short; a field over 4 GiB cannot
            // reach here from a certificate or a config.
            let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
            aad.extend_from_slice(&len.to_be_bytes());
            aad.extend_from_slice(field);
        }
        aad
    }
}

impl fmt::Display for SealContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CertificateKey { cert_name, serial } => {
                write!(f, "the key of certificate {cert_name} (serial {serial})")
            }
            Self::Secret { name } => write!(f, "fleet secret {name}"),
            Self::OrderKey { order_url } => write!(f, "the key of order {order_url}"),
        }
    }
}

/// The parts of a blob's header.
struct Header {
    key_id: KeyId,
    nonce: [u8; NONCE_LEN],
}

impl Sealed {
    /// A blob as read from the database; checked when unsealed.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// The key that sealed this blob, as its header says.
    pub fn key_id(&self) -> Result<KeyId, SealError> {
        Ok(self.header()?.key_id)
    }

    fn header(&self) -> Result<Header, SealError> {
        let blob = &self.0;
        if blob.len() < MIN_SEALED_LEN {
            return Err(SealError::Truncated { len: blob.len() });
        }
        if blob[0] != VERSION {
            return Err(SealError::Version(blob[0]));
        }
        let mut key_id = [0u8; KEY_ID_LEN];
        key_id.copy_from_slice(&blob[1..=KEY_ID_LEN]);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&blob[1 + KEY_ID_LEN..HEADER_LEN]);
        Ok(Header {
            key_id: KeyId(key_id),
            nonce,
        })
    }
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = self.key_id().map(|k| k.to_string());
        f.debug_struct("Sealed")
            .field("len", &self.0.len())
            .field("key_id", &key.unwrap_or_else(|e| e.to_string()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn key(byte: u8) -> FleetKey {
        FleetKey::from_bytes(&[byte; KEY_LEN])
    }

    fn www(serial: &str) -> SealContext {
        SealContext::CertificateKey {
            cert_name: "www".into(),
            serial: serial.into(),
        }
    }

    const PEM: &[u8] = b"-----BEGIN PRIVATE KEY-----\nnot a real key\n-----END PRIVATE KEY-----\n";

    #[test]
    fn round_trip() {
        let rng = SystemRandom::new();
        let k = key(7);
        let sealed = k.seal(&rng, &www("01ab"), PEM).unwrap();
        assert_eq!(sealed.as_bytes().len(), MIN_SEALED_LEN + PEM.len());
        assert_eq!(sealed.key_id().unwrap(), k.id());
        assert!(
            !sealed.as_bytes().windows(10).any(|w| w == &PEM[..10]),
            "the plaintext does not show in the blob"
        );
        assert_eq!(k.unseal(&www("01ab"), &sealed).unwrap(), PEM);
        // Nonces are fresh: sealing the same value twice differs.
        let again = k.seal(&rng, &www("01ab"), PEM).unwrap();
        assert_ne!(sealed, again);
        // An empty secret round-trips too.
        let empty = k.seal(&rng, &www("01ab"), b"").unwrap();
        assert_eq!(k.unseal(&www("01ab"), &empty).unwrap(), b"");
    }

    #[test]
    fn another_context_does_not_verify() {
        let rng = SystemRandom::new();
        let k = key(7);
        let sealed = k.seal(&rng, &www("01ab"), PEM).unwrap();
        for other in [
            www("01ac"),
            SealContext::CertificateKey {
                cert_name: "mail".into(),
                serial: "01ab".into(),
            },
            // The length prefixes keep "www"+"01ab" apart from "ww"+"w01ab".
            SealContext::CertificateKey {
                cert_name: "ww".into(),
                serial: "w01ab".into(),
            },
            SealContext::Secret { name: "www".into() },
        ] {
            let err = k.unseal(&other, &sealed).unwrap_err();
            assert!(
                matches!(&err, SealError::Verify { context, key } if *context == other && *key == k.id()),
                "{other:?}: {err:?}"
            );
        }
    }

    #[test]
    fn a_flipped_bit_does_not_verify() {
        let rng = SystemRandom::new();
        let k = key(7);
        let sealed = k.seal(&rng, &www("01ab"), PEM).unwrap();
        // Every byte after the version and key id is checked: nonce,
        // ciphertext and tag.
        for at in 1 + KEY_ID_LEN..sealed.as_bytes().len() {
            let mut bytes = sealed.as_bytes().to_vec();
            bytes[at] ^= 0x01;
            let err = k
                .unseal(&www("01ab"), &Sealed::from_bytes(bytes))
                .unwrap_err();
            assert!(matches!(err, SealError::Verify { .. }), "byte {at}: {err}");
        }
    }

    #[test]
    fn wrong_key_names_both_key_ids() {
        let rng = SystemRandom::new();
        let (sealer, other) = (key(7), key(8));
        let sealed = sealer.seal(&rng, &www("01ab"), PEM).unwrap();
        let err = other.unseal(&www("01ab"), &sealed).unwrap_err();
        let SealError::WrongKey { blob, ours } = err else {
            panic!("expected WrongKey, got {err:?}");
        };
        assert_eq!((blob, ours), (sealer.id(), other.id()));
        let msg = err_text(other.unseal(&www("01ab"), &sealed));
        assert!(msg.contains(&sealer.id().to_string()), "{msg}");
        assert!(msg.contains(&other.id().to_string()), "{msg}");
    }

    #[test]
    fn key_id_is_the_start_of_the_keys_sha256() {
        // sha256 of 32 zero bytes: 66687aadf862bd776c8fc18b8e9f8e20...
        assert_eq!(key(0).id().to_string(), "66687aadf862bd77");
        assert_eq!(
            format!("{:?}", key(0)),
            "FleetKey { id: KeyId(66687aadf862bd77), .. }"
        );
    }

    #[test]
    fn truncated_and_unknown_blobs_are_refused() {
        let rng = SystemRandom::new();
        let k = key(7);
        let sealed = k.seal(&rng, &www("01ab"), PEM).unwrap();
        for len in [0, 1, HEADER_LEN, MIN_SEALED_LEN - 1] {
            let short = Sealed::from_bytes(sealed.as_bytes()[..len].to_vec());
            let err = k.unseal(&www("01ab"), &short).unwrap_err();
            assert!(
                matches!(err, SealError::Truncated { len: l } if l == len),
                "{len}: {err}"
            );
        }
        // Cut inside the ciphertext: long enough for a header and a tag,
        // so only the tag catches it.
        let cut = Sealed::from_bytes(sealed.as_bytes()[..sealed.as_bytes().len() - 5].to_vec());
        assert!(matches!(
            k.unseal(&www("01ab"), &cut),
            Err(SealError::Verify { .. })
        ));
        let mut v2 = sealed.into_bytes();
        v2[0] = 2;
        assert!(matches!(
            k.unseal(&www("01ab"), &Sealed::from_bytes(v2)),
            Err(SealError::Version(2))
        ));
    }

    #[test]
    fn key_file_must_be_32_bytes_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.key");
        let write = |bytes: &[u8], mode: u32| {
            fs::write(&path, bytes).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        };

        write(&[7; KEY_LEN], 0o600);
        assert_eq!(FleetKey::load(&path).unwrap().id(), key(7).id());
        write(&[7; KEY_LEN], 0o400);
        assert_eq!(FleetKey::load(&path).unwrap().id(), key(7).id());

        for mode in [0o644, 0o640, 0o604, 0o660] {
            write(&[7; KEY_LEN], mode);
            let err = FleetKey::load(&path).unwrap_err();
            assert!(
                matches!(err.problem, KeyFileProblem::Mode { mode: m } if m == mode),
                "{mode:o}: {err}"
            );
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
        }

        for len in [0, 31, 33, 44] {
            write(&vec![7; len], 0o600);
            let err = FleetKey::load(&path).unwrap_err();
            assert!(
                matches!(err.problem, KeyFileProblem::Size { len: l } if l == len as u64),
                "{len}: {err}"
            );
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains(&format!("is {len} bytes long")), "{msg}");
        }

        let missing = dir.path().join("missing.key");
        let err = FleetKey::load(&missing).unwrap_err();
        assert!(
            matches!(err.problem, KeyFileProblem::Io(ref e) if e.kind() == io::ErrorKind::NotFound)
        );
        assert!(err.to_string().contains("missing.key"), "{err}");

        let err = FleetKey::load(dir.path()).unwrap_err();
        assert!(
            matches!(
                err.problem,
                KeyFileProblem::NotAFile | KeyFileProblem::Mode { .. }
            ),
            "{err}"
        );

        // A symlink to a good key is refused: the key is a plain file.
        write(&[7; KEY_LEN], 0o600);
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(matches!(
            FleetKey::load(&link).unwrap_err().problem,
            KeyFileProblem::Io(_)
        ));
    }

    fn err_text<T: fmt::Debug>(r: Result<T, SealError>) -> String {
        r.unwrap_err().to_string()
    }
}
