//! The configuration file: TOML in, typed and validated structs out.
//!
//! Three steps. Serde reads the text into the `raw` shapes, which keep the
//! byte span of every value a later step may reject; `validate` turns them
//! into the typed configuration (`model`), whose fields are already known
//! good: a `DnsName` is a valid name (`names`), a duration is a `Duration`
//! (`values`). Those two are pure ([`Parsed::parse`]). Then
//! [`Parsed::resolve`] reads the files the configuration names (CA bundle,
//! EAB key, trusted roots, TSIG secret). [`Config::load`] does all three.
//! Every error names the file, the line and column, and the key (for
//! example `certificate[2].domains[0]`), so an operator can fix it without
//! guessing (`error`). `diff` tells what an edit changes, for reloads.

pub(crate) mod diff;
mod error;
mod model;
mod names;
mod raw;
mod resolve;
mod validate;
mod values;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use error::ConfigError;
pub use model::{
    AcmeConfig, CaConfig, CaLimits, CaName, CertificateConfig, Config, DB_FILE,
    DEFAULT_CONFIG_PATH, DaemonConfig, Dns01Config, Dns01Mode, Eab, FleetConfig, Http01Config,
    NotifyConfig, Preflight, Preset, ProfilePreference, PropagationConfig, ReaperConfig,
    Rfc2136Config, Secret, StorageConfig, TlsAlpn01Config, TrustedRoots,
};
pub use names::{CertName, DnsAlias, DnsName, Identifier, IpLiteral};
pub(crate) use resolve::Parsed;
pub(crate) use values::parse_duration;
pub use values::{ChallengeKind, KeyType, ServerAddr, TsigAlgorithm};

impl Config {
    /// Reads, parses and resolves the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(path, &Self::read(path)?)
    }

    /// The file's text, for `parse`.
    pub fn read(path: &Path) -> Result<String, ConfigError> {
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })
    }

    /// Parses `text` as if it had been read from `path`, then reads the
    /// files it names: [`Parsed::parse`] and [`Parsed::resolve`] in one.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        Parsed::parse(path, text)?.resolve()
    }
}

/// The `[storage] state_dir` that the text before the first
/// `[[certificate]]` names, resolved as `parse` would, without validating
/// anything.
///
/// A guess that lets `certd status` open the ledger while the whole file
/// (on a large host, 10,000 certificate tables) is still being parsed; the
/// caller compares it with the parsed configuration before trusting it.
/// `None` when there is no certificate table to skip or the head does not
/// parse on its own.
pub(crate) fn peek_state_dir(path: &Path, text: &str) -> Option<PathBuf> {
    #[derive(Deserialize)]
    struct Head {
        storage: Option<HeadStorage>,
    }
    #[derive(Deserialize)]
    struct HeadStorage {
        state_dir: Option<String>,
    }
    let mut offset = 0;
    let cut = text.split_inclusive('\n').find_map(|line| {
        let at = offset;
        offset += line.len();
        line.trim_start().starts_with("[[").then_some(at)
    })?;
    let head: Head = toml::from_str(&text[..cut]).ok()?;
    let dir = head.storage?.state_dir?;
    Some(validate::resolve_path(path, &dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/certd/config.toml"), text)
    }

    pub(super) const BASE: &str = r#"
[acme]
directory = "https://acme.example/dir"
contact = ["mailto:ops@example.com"]

[storage]
state_dir = "state"
cert_dir = "/srv/certs"

[http01]
listen = "127.0.0.1:5002"
"#;

    pub(super) fn with_cert(cert: &str) -> String {
        format!("{BASE}\n[[certificate]]\n{cert}\n")
    }

    pub(super) fn expect_error(text: &str, line: usize, key: &str, needle: &str) {
        match parse(text) {
            Err(ConfigError::Invalid {
                line: l,
                key: k,
                message,
                ..
            }) => {
                assert_eq!((l, k.as_str()), (line, key), "message: {message}");
                assert!(message.contains(needle), "{message:?} lacks {needle:?}");
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }

    /// A 0600 file holding a base64 secret; the directory must outlive the test.
    pub(super) fn secret_file(mode: u32) -> (tempfile::TempDir, String) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tsig.key");
        std::fs::write(&path, "c2VjcmV0LWJ5dGVz\n").expect("write secret");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let path = path.display().to_string();
        (dir, path)
    }

    /// The head's state directory is the one `parse` resolves, and there
    /// is no guess where the head alone cannot tell.
    #[test]
    fn peek_state_dir_agrees_with_parse_or_declines() {
        let path = Path::new("/etc/certd/config.toml");
        let text = with_cert("name = \"www\"\ndomains = [\"www.example.com\"]");
        let peeked = peek_state_dir(path, &text).expect("a head with [storage]");
        assert_eq!(peeked, parse(&text).expect("valid").storage.state_dir);
        assert_eq!(peeked, Path::new("/etc/certd/state"));
        // Nothing to skip: no guess.
        assert_eq!(peek_state_dir(path, BASE), None);
        // [storage] after the certificates: the head does not name it.
        let late = "[acme]\ndirectory = \"https://ca/dir\"\n[[certificate]]\nname = \"a\"\n\
                    domains = [\"a.example\"]\n[storage]\nstate_dir = \"/s\"\ncert_dir = \"/c\"\n";
        assert_eq!(peek_state_dir(path, late), None);
        // A line starting with [[ inside a multi-line string cuts the head
        // in the string: the head does not parse, so no guess.
        let quoted = "[acme]\ndirectory = \"https://ca/dir\"\n[storage]\nstate_dir = \"/s\"\n\
                      cert_dir = \"\"\"\n[[certificate]]\n\"\"\"\n";
        assert_eq!(peek_state_dir(path, quoted), None);
    }

    // Fuzzing: whatever the file holds, parsing ends in a config or an
    // error that names a line, never a panic.
    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        fn valid() -> String {
            with_cert(
                "name = \"www\"\ndomains = [\"a.example\", \"b.example\"]\nkey_type = \"rsa-2048\"\nchallenges = [\"http-01\"]\n[reaper]\ninterval = \"5m\"\n[daemon]\nrenew_remaining = 0.3\n",
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
                let _ = parse(&text);
            }

            #[test]
            fn mutated_configs_never_panic(edits in proptest::collection::vec((any::<usize>(), any::<char>(), 0u8..3), 1..8)) {
                let mut text: Vec<char> = valid().chars().collect();
                for (pos, c, op) in edits {
                    let i = pos % (text.len() + 1);
                    match op {
                        0 => text.insert(i, c),
                        1 if i < text.len() => { text.remove(i); }
                        _ if i < text.len() => text[i] = c,
                        _ => {}
                    }
                }
                let text: String = text.into_iter().collect();
                if let Err(ConfigError::Invalid { line, .. }) = parse(&text) {
                    prop_assert!(line >= 1 && line <= text.lines().count().max(1) + 1);
                }
            }
        }
    }
}
