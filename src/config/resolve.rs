//! The one step that reads files: the CA bundle, the EAB key, the trusted
//! roots and the TSIG secret that a parsed configuration names. Parsing
//! (`Parsed::parse`, in `validate`) reads nothing, so a configuration can
//! be checked from its text alone; `resolve` then reads each file, and an
//! error still names the line and key that named the file.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::{DecodeError, Engine};

use crate::config::error::{ConfigError, Spot};
use crate::config::model::{Config, Dns01Mode, Eab, Secret, TrustedRoots};

/// A configuration parsed from its text, the files it names not yet read.
#[derive(Debug)]
pub(crate) struct Parsed {
    /// Complete but for the values `files` hold.
    config: Config,
    files: Vec<FileRef>,
}

/// A file the configuration names, and where.
#[derive(Debug)]
pub(super) struct FileRef {
    pub(super) at: Spot,
    pub(super) path: PathBuf,
    pub(super) kind: FileKind,
}

/// What a named file holds, and where its content goes.
#[derive(Debug)]
pub(super) enum FileKind {
    /// A CA's `ca_bundle`: PEM certificates; the path is kept, the file checked.
    CaBundle,
    /// `eab_hmac_key_file` of the CA at `ca` in `Config::cas`, with the
    /// `eab_kid` it belongs to.
    EabKey { ca: usize, kid: String },
    /// `trusted_roots` of the CA at `ca` in `Config::cas`.
    TrustedRoots { ca: usize },
    /// `dns01.rfc2136.secret_file`.
    TsigSecret,
}

impl Parsed {
    pub(super) fn new(config: Config, files: Vec<FileRef>) -> Self {
        Self { config, files }
    }

    /// Reads the files the configuration names, in the order the file
    /// names them; the first that fails is the error.
    pub(crate) fn resolve(self) -> Result<Config, ConfigError> {
        let Self { mut config, files } = self;
        for file in files {
            let path = &file.path;
            match file.kind {
                FileKind::CaBundle => check_ca_bundle(path),
                FileKind::EabKey { ca, kid } => read_secret_file(path)
                    .and_then(|text| decode_eab_key(path, &text))
                    .map(|hmac_key| config.cas[ca].acme.eab = Some(Eab { kid, hmac_key })),
                FileKind::TrustedRoots { ca } => TrustedRoots::load(path)
                    .map(|roots| config.cas[ca].acme.trusted_roots = Some(roots)),
                FileKind::TsigSecret => read_tsig_secret(path).map(|secret| {
                    if let Some(Dns01Mode::Rfc2136(r)) = config.dns01.as_mut().map(|d| &mut d.mode)
                    {
                        r.secret = secret;
                    }
                }),
            }
            .map_err(|m| file.at.error(m))?;
        }
        Ok(config)
    }
}

/// The CA bundle must be readable and hold a PEM certificate; the TLS
/// client reads it again when it starts.
fn check_ca_bundle(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("{} contains no PEM certificate", path.display()));
    }
    Ok(())
}

/// Reads a secret file, refusing one that others can read (as ssh does):
/// a secret that leaked is no secret.
fn read_secret_file(path: &Path) -> Result<String, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is readable by others (mode {:04o}); a secret must be private: chmod 600 {}",
            path.display(),
            mode & 0o777,
            path.display()
        ));
    }
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Reads a base64 TSIG secret from a private file.
fn read_tsig_secret(path: &Path) -> Result<Secret, String> {
    let text = read_secret_file(path)?;
    // Whitespace (a secret wrapped over lines) is not part of base64.
    let compact: String = text.split_whitespace().collect();
    // The decode error is not shown: it could quote part of the secret.
    let secret = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|_| format!("{} does not hold a base64 TSIG secret", path.display()))?;
    if secret.is_empty() {
        return Err(format!("{} holds an empty TSIG secret", path.display()));
    }
    Ok(Secret::new(secret))
}

/// Decodes a base64url EAB HMAC key. The error names what is wrong, never
/// the offending character or its offset: either would leak the secret.
fn decode_eab_key(path: &Path, text: &str) -> Result<Secret, String> {
    let why = match base64::prelude::BASE64_URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')) {
        Ok(key) if key.is_empty() => "is empty",
        Ok(key) => return Ok(Secret::new(key)),
        Err(DecodeError::InvalidByte(..)) => {
            "holds a character outside the base64url alphabet (A-Z a-z 0-9 - _)"
        }
        Err(DecodeError::InvalidLength(_)) => "has a length no base64url text has",
        Err(DecodeError::InvalidLastSymbol(..)) => "does not end as base64url text does",
        Err(DecodeError::InvalidPadding) => "has misplaced '=' padding",
    };
    Err(format!(
        "{}: not a base64url HMAC key: the file {why} (its content is not shown: it is a secret)",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TsigAlgorithm;
    use crate::config::tests::{BASE, expect_error, parse, secret_file};

    #[test]
    fn rfc2136_is_parsed_and_its_secret_kept_out_of_debug() {
        let (_dir, secret) = secret_file(0o600);
        let text = format!(
            "{BASE}\n[dns01.rfc2136]\nserver = \"127.0.0.1:5353\"\nzone = \"Example.COM.\"\nkey_name = \"certd-key\"\nalgorithm = \"hmac-sha512\"\nsecret_file = {secret:?}\n"
        );
        let d = parse(&text).expect("valid").dns01.expect("dns01");
        let Dns01Mode::Rfc2136(r) = &d.mode else {
            panic!("expected rfc2136: {d:?}");
        };
        assert_eq!(r.server.to_string(), "127.0.0.1:5353");
        assert_eq!(r.zone.as_deref(), Some("example.com"));
        assert_eq!(r.key_name, "certd-key");
        assert_eq!(r.algorithm, TsigAlgorithm::HmacSha512);
        assert_eq!(r.secret.expose(), b"secret-bytes");
        let debug = format!("{d:?}");
        assert!(debug.contains("***"), "{debug}");
        assert!(!debug.contains("115, 101, 99"), "secret bytes in {debug}");

        // Defaults: no zone (discovered), hmac-sha256.
        let text = format!(
            "{BASE}\n[dns01.rfc2136]\nserver = \"ns1.example.com\"\nkey_name = \"k\"\nsecret_file = {secret:?}\n"
        );
        let d = parse(&text).expect("valid").dns01.expect("dns01");
        let Dns01Mode::Rfc2136(r) = &d.mode else {
            panic!("expected rfc2136");
        };
        assert_eq!(
            (r.zone.as_ref(), r.algorithm),
            (None, TsigAlgorithm::HmacSha256)
        );
        assert_eq!(r.server.to_string(), "ns1.example.com:53");
    }

    #[test]
    fn rfc2136_refuses_bad_secrets_and_values() {
        let rfc = |secret: &str, extra: &str| {
            format!(
                "{BASE}\n[dns01.rfc2136]\nserver = \"127.0.0.1:53\"\nkey_name = \"k\"\nsecret_file = {secret:?}\n{extra}"
            )
        };
        let (_dir, open) = secret_file(0o644);
        expect_error(
            &rfc(&open, ""),
            16,
            "dns01.rfc2136.secret_file",
            "chmod 600",
        );
        let (_dir2, group) = secret_file(0o640);
        expect_error(
            &rfc(&group, ""),
            16,
            "dns01.rfc2136.secret_file",
            "mode 0640",
        );
        expect_error(
            &rfc("/nonexistent/tsig.key", ""),
            16,
            "dns01.rfc2136.secret_file",
            "cannot read",
        );
        let (dir, good) = secret_file(0o600);
        std::fs::write(dir.path().join("tsig.key"), "not base64!").expect("write");
        expect_error(&rfc(&good, ""), 16, "dns01.rfc2136.secret_file", "base64");
        std::fs::write(dir.path().join("tsig.key"), "c2VjcmV0").expect("write");
        expect_error(
            &rfc(&good, "algorithm = \"hmac-md5\"\n"),
            17,
            "dns01.rfc2136.algorithm",
            "unknown TSIG algorithm",
        );
        expect_error(
            &rfc(&good, "zone = \"bad zone\"\n"),
            17,
            "dns01.rfc2136.zone",
            "not a valid DNS name",
        );
        expect_error(
            &rfc(&good, "key = \"x\"\n"),
            17,
            "dns01.rfc2136.key",
            "unknown field `key`",
        );
        let text = rfc(&good, "").replace("127.0.0.1:53", "bad host:53");
        expect_error(&text, 14, "dns01.rfc2136.server", "not a server address");
    }

    #[test]
    fn trusted_roots_must_be_a_readable_pem_file() {
        let text = BASE.replace(
            "contact = [",
            "trusted_roots = \"/nonexistent/roots.pem\"\ncontact = [",
        );
        expect_error(&text, 4, "acme.trusted_roots", "cannot read");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("roots.pem");
        std::fs::write(&path, "not PEM").expect("write");
        let text = BASE.replace(
            "contact = [",
            &format!("trusted_roots = \"{}\"\ncontact = [", path.display()),
        );
        expect_error(&text, 4, "acme.trusted_roots", "no PEM certificate");
        assert!(
            parse(BASE).expect("valid").cas[0]
                .acme
                .trusted_roots
                .is_none()
        );
    }

    /// A malformed EAB key is reported without any of its characters or
    /// their offsets (the base64 decoder's own message quotes both).
    #[test]
    fn malformed_eab_key_is_not_echoed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("eab.key");
        // Each bad key breaks base64url differently: a foreign character,
        // an impossible length, stray bits in the last symbol, padding.
        for secret in ["s3cr!tQZ", "s3crQ", "s3v", "s3=crtQZ"] {
            std::fs::write(&path, secret).expect("write key");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
            let text = BASE.replace(
                "contact = [",
                &format!(
                    "eab_kid = \"kid-1\"\neab_hmac_key_file = \"{}\"\ncontact = [",
                    path.display()
                ),
            );
            let message = match parse(&text) {
                Err(ConfigError::Invalid { key, message, .. }) => {
                    assert_eq!(key, "acme.eab_hmac_key_file", "{message}");
                    message
                }
                other => panic!("{secret}: expected an error, got {other:?}"),
            };
            assert!(message.contains("not a base64url HMAC key"), "{message}");
            let shown = message.replace(&path.display().to_string(), "");
            for c in secret
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '!')
            {
                assert!(
                    !shown.contains(&format!("{}", c as u32)),
                    "{secret}: {message}"
                );
            }
            assert!(!shown.contains("s3"), "{secret}: {message}");
            assert!(!shown.contains('!'), "{secret}: {message}");
            assert!(!shown.contains("offset"), "{secret}: {message}");
        }
    }

    /// Parsing reads no file: a configuration naming files that do not
    /// exist parses, and `resolve` reports the first, at its line and key.
    #[test]
    fn parse_reads_no_file_and_resolve_names_the_first_missing_one() {
        let text = BASE.replace(
            "contact = [",
            "ca_bundle = \"/nonexistent/ca.pem\"\neab_kid = \"k\"\n\
             eab_hmac_key_file = \"/nonexistent/eab.key\"\n\
             trusted_roots = \"/nonexistent/roots.pem\"\ncontact = [",
        ) + "[dns01.rfc2136]\nserver = \"127.0.0.1:53\"\nkey_name = \"k\"\n\
              secret_file = \"/nonexistent/tsig.key\"\n";
        let parsed = Parsed::parse(Path::new("/etc/certd/config.toml"), &text).expect("pure");
        let keys: Vec<String> = parsed
            .files
            .iter()
            .map(|f| match f.at.error(String::new()) {
                ConfigError::Invalid { line, key, .. } => format!("{line}:{key}"),
                ConfigError::Read { .. } => unreachable!("a located error"),
            })
            .collect();
        assert_eq!(
            keys,
            [
                "4:acme.ca_bundle",
                "6:acme.eab_hmac_key_file",
                "7:acme.trusted_roots",
                "19:dns01.rfc2136.secret_file"
            ]
        );
        match parsed.resolve() {
            Err(ConfigError::Invalid {
                line, key, message, ..
            }) => {
                assert_eq!((line, key.as_str()), (4, "acme.ca_bundle"), "{message}");
                assert!(message.contains("cannot read"), "{message}");
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }
}
