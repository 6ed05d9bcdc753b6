//! What a configuration edit changes, as one typed comparison of the whole
//! parsed configuration, section by section (the shape of rathole's
//! config watcher).
//!
//! The daemon swaps some sections in place ([`Live`]); every other setting
//! takes effect at the next start and is reported by its key. Both lists
//! come from destructuring [`Config`] field by field, with no `..`: a field
//! added to the configuration does not compile until it is placed in one
//! of them, so no setting is ever silently ignored by a reload.

use std::fmt;

use crate::config::{AcmeConfig, CaConfig, Config, DaemonConfig, StorageConfig};

/// What an edit changes: the sections swapped in place, and the keys that
/// wait for a restart.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Change {
    /// Sections of the new configuration that differ from the running one.
    pub(crate) live: Vec<Live>,
    /// Keys whose new value differs from the one the process started with.
    pub(crate) restart: Vec<String>,
}

impl Change {
    /// `new` compared with the configuration the daemon runs (`current`)
    /// for live sections, and with the one it started with (`started`)
    /// for settings read only at start: an edit undone needs no restart.
    pub(crate) fn between(started: &Config, current: &Config, new: &Config) -> Self {
        Self {
            live: Live::ALL
                .into_iter()
                .filter(|s| s.differs(current, new))
                .collect(),
            restart: restart_keys(started, new),
        }
    }
}

/// A section the running daemon takes over without a restart.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Live {
    Certificates,
    /// All of `[daemon]` but `log_level`.
    Daemon,
    Notify,
    Http01,
    TlsAlpn01,
    Dns01,
    MetricsListen,
    /// `[reaper]`, and the limits of each CA, which default to its
    /// (`CaConfig::reaper_config` combines them).
    Reaper,
}

impl Live {
    const ALL: [Self; 8] = [
        Self::Certificates,
        Self::Daemon,
        Self::Notify,
        Self::Http01,
        Self::TlsAlpn01,
        Self::Dns01,
        Self::MetricsListen,
        Self::Reaper,
    ];

    /// The key a user edits.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Self::Certificates => "certificate",
            Self::Daemon => "daemon",
            Self::Notify => "notify",
            Self::Http01 => "http01",
            Self::TlsAlpn01 => "tls_alpn01",
            Self::Dns01 => "dns01",
            Self::MetricsListen => "metrics_listen",
            Self::Reaper => "reaper",
        }
    }

    fn differs(self, a: &Config, b: &Config) -> bool {
        match self {
            Self::Certificates => a.certificates != b.certificates,
            Self::Daemon => live_daemon(&a.daemon) != live_daemon(&b.daemon),
            Self::Notify => a.notify != b.notify,
            Self::Http01 => a.http01 != b.http01,
            Self::TlsAlpn01 => a.tls_alpn01 != b.tls_alpn01,
            Self::Dns01 => a.dns01 != b.dns01,
            Self::MetricsListen => a.metrics_listen != b.metrics_listen,
            Self::Reaper => {
                a.reaper != b.reaper
                    || a.cas.iter().any(|ca| {
                        b.cas
                            .iter()
                            .find(|other| other.name == ca.name)
                            .is_some_and(|other| other.limits != ca.limits)
                    })
            }
        }
    }
}

/// Logged as the key, as operators write it.
impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.key(), f)
    }
}

/// `[daemon]` without `log_level`, which the tracing subscriber reads once.
fn live_daemon(d: &DaemonConfig) -> DaemonConfig {
    DaemonConfig {
        log_level: String::new(),
        ..d.clone()
    }
}

/// The keys whose value in `new` differs from the one the process started
/// with and that take effect only at the next start.
fn restart_keys(started: &Config, new: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    let mut check = |key: &str, changed: bool| {
        if changed {
            keys.push(key.to_owned());
        }
    };
    // No `..`: every field is either live (see `Live`) or compared here.
    let Config {
        path: _, // the file reloaded is the file started with
        cas,
        storage,
        daemon,
        http01: _,
        dns01: _,
        tls_alpn01: _,
        reaper: _,
        metrics_listen: _,
        notify: _,
        fleet,
        certificates: _,
    } = started;
    // Joining or leaving a fleet moves the ledger: a restart does it.
    check("fleet", *fleet != new.fleet);
    // A CA is its account: one added, removed or moved elsewhere waits for
    // a restart, which opens (or drops) the account there.
    for ca in cas {
        match new.ca(&ca.name) {
            None => check(&ca.table, true),
            Some(now) => ca_keys(ca, now, &mut check),
        }
    }
    for ca in new.cas.iter().filter(|ca| started.ca(&ca.name).is_none()) {
        check(&ca.table, true);
    }
    let StorageConfig {
        state_dir,
        cert_dir,
    } = storage;
    check("storage.state_dir", *state_dir != new.storage.state_dir);
    check("storage.cert_dir", *cert_dir != new.storage.cert_dir);
    check("daemon.log_level", daemon.log_level != new.daemon.log_level);
    keys
}

/// The restart-needed keys of one CA, started as `ca`, now `new`.
fn ca_keys(ca: &CaConfig, new: &CaConfig, check: &mut impl FnMut(&str, bool)) {
    let CaConfig {
        name: _,  // how both were found
        table: _, // moving [acme] into [ca.default] changes nothing
        acme,
        limits: _, // live, see `Live::Reaper`
        preset: _, // how the directory was written: `directory` compares it
    } = ca;
    let AcmeConfig {
        directory,
        contact,
        ca_bundle,
        eab,
        trusted_roots,
    } = acme;
    let key = |field: &str| format!("{}.{field}", new.table);
    check(&key("directory"), *directory != new.acme.directory);
    check(&key("contact"), *contact != new.acme.contact);
    check(&key("ca_bundle"), *ca_bundle != new.acme.ca_bundle);
    check(&key("eab"), *eab != new.acme.eab);
    check(
        &key("trusted_roots"),
        *trusted_roots != new.acme.trusted_roots,
    );
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    const BASE: &str = r#"
[acme]
directory = "https://ca.test/dir"
contact = ["mailto:a@example.com"]
[storage]
state_dir = "/var/lib/certd"
cert_dir = "/etc/certd/live"
[http01]
listen = "127.0.0.1:80"
[dns01]
hook = "/bin/true"
[reaper]
interval = "10m"
max_pending = 50
[daemon]
max_concurrent = 4
log_level = "info"
[[certificate]]
name = "a"
domains = ["a.example.test"]
challenges = ["http-01", "dns-01"]
"#;

    fn parse(text: &str) -> Config {
        match Config::parse(Path::new("/etc/certd/config.toml"), text) {
            Ok(c) => c,
            Err(e) => panic!("test config invalid: {e}\n{text}"),
        }
    }

    /// Each edit (text in BASE, replaced by) and how it must be classified.
    #[test]
    fn every_section_is_live_or_restart_needed() {
        const ADD: &str = "[[certificate]]";
        let cases: &[(&str, &str, &[&str], &[&str])] = &[
            (ADD, ADD, &[], &[]),
            (
                "\"a.example.test\"",
                "\"a.example.test\", \"b.example.test\"",
                &["certificate"],
                &[],
            ),
            ("max_concurrent = 4", "max_concurrent = 8", &["daemon"], &[]),
            (
                "log_level = \"info\"",
                "log_level = \"debug\"",
                &[],
                &["daemon.log_level"],
            ),
            (
                ADD,
                "[notify]\ncommand = \"/bin/true\"\n[[certificate]]",
                &["notify"],
                &[],
            ),
            (
                ADD,
                "[metrics]\nlisten = \"127.0.0.1:9100\"\n[[certificate]]",
                &["metrics_listen"],
                &[],
            ),
            ("interval = \"10m\"", "interval = \"1m\"", &["reaper"], &[]),
            ("max_pending = 50", "max_pending = 9", &["reaper"], &[]),
            (
                "https://ca.test/dir",
                "https://other.test/dir",
                &[],
                &["acme.directory"],
            ),
            ("mailto:a@", "mailto:b@", &[], &["acme.contact"]),
            ("/var/lib/certd", "/srv/certd", &[], &["storage.state_dir"]),
            ("/etc/certd/live", "/srv/live", &[], &["storage.cert_dir"]),
            ("127.0.0.1:80\"", "127.0.0.1:8080\"", &["http01"], &[]),
            ("/bin/true", "/bin/false", &["dns01"], &[]),
            (
                ADD,
                "[tls_alpn01]\nlisten = \"127.0.0.1:443\"\n[[certificate]]",
                &["tls_alpn01"],
                &[],
            ),
        ];
        let base = parse(BASE);
        for (find, replace, live, restart) in cases {
            assert!(BASE.contains(find), "{find}");
            let edited = parse(&BASE.replacen(find, replace, 1));
            let change = Change::between(&base, &base, &edited);
            let keys: Vec<&str> = change.live.iter().map(|s| s.key()).collect();
            assert_eq!(keys, *live, "{replace}");
            assert_eq!(change.restart, *restart, "{replace}");
        }
    }

    #[test]
    fn an_edit_undone_needs_no_restart() {
        let base = parse(BASE);
        let moved = parse(&BASE.replace("/var/lib/certd", "/srv/certd"));
        assert_eq!(
            Change::between(&base, &moved, &moved).restart,
            ["storage.state_dir"]
        );
        let undone = Change::between(&base, &moved, &parse(BASE));
        assert!(undone.restart.is_empty());
        assert_eq!(undone.live, []);
    }

    /// New trusted roots are read at the next start, and reported by their
    /// own key rather than as the whole configuration.
    #[test]
    fn trusted_roots_wait_for_a_restart_by_their_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("roots.pem");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = params.self_signed(&key).expect("root");
        std::fs::write(&path, root.pem()).expect("write roots");
        let base = parse(BASE);
        let line = format!(
            "trusted_roots = {:?}\n[storage]",
            path.display().to_string()
        );
        let edited = parse(&BASE.replacen("[storage]", &line, 1));
        let change = Change::between(&base, &base, &edited);
        assert_eq!(change.restart, ["acme.trusted_roots"]);
        assert_eq!(change.live, []);
    }

    /// A CA table waits for a restart (it is an account), by its key; its
    /// limits and a certificate's choice of CAs apply live.
    #[test]
    fn ca_tables_wait_for_a_restart_and_certificate_choices_apply_live() {
        let two = BASE.replacen("[storage]", "[ca.buypass]\nmax_pending = 10\n[storage]", 1);
        let base = parse(&two);
        let cases: &[(&str, &str, &[&str], &[String])] = &[
            (
                "[ca.buypass]",
                "[ca.other]\ndirectory = \"https://other.test/dir\"",
                &[],
                &["ca.buypass".to_owned(), "ca.other".to_owned()],
            ),
            (
                "[ca.buypass]",
                "[ca.buypass]\ncontact = [\"mailto:x@example.com\"]",
                &[],
                &["ca.buypass.contact".to_owned()],
            ),
            (
                "[ca.buypass]",
                "[ca.buypass]\ndirectory = \"https://buypass.test/dir\"",
                &[],
                &["ca.buypass.directory".to_owned()],
            ),
            // The same directory, written as a preset's: nothing changes.
            (
                "[ca.buypass]",
                "[ca.buypass]\npreset = \"buypass\"",
                &[],
                &[],
            ),
            ("max_pending = 10", "max_pending = 11", &["reaper"], &[]),
            (
                "challenges = [\"http-01\", \"dns-01\"]",
                "challenges = [\"http-01\", \"dns-01\"]\nca = [\"buypass\", \"default\"]\nsticky = true\nca_fallback_after = \"5m\"",
                &["certificate"],
                &[],
            ),
            (
                "log_level = \"info\"",
                "log_level = \"info\"\nca_fallback_after = \"2h\"",
                &["certificate", "daemon"],
                &[],
            ),
        ];
        for (find, replace, live, restart) in cases {
            assert!(two.contains(find), "{find}");
            let edited = parse(&two.replacen(find, replace, 1));
            let change = Change::between(&base, &base, &edited);
            let keys: Vec<&str> = change.live.iter().map(|s| s.key()).collect();
            assert_eq!(keys, *live, "{replace}");
            assert_eq!(change.restart, *restart, "{replace}");
        }
        // [acme] moved into [ca.default] unchanged is the same CA.
        let moved = parse(&BASE.replace("[acme]", "[ca.default]"));
        let plain = parse(BASE);
        let change = Change::between(&plain, &plain, &moved);
        assert_eq!(
            (change.live, change.restart),
            (vec![], Vec::<String>::new())
        );
    }
}
