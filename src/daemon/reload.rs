//! What a configuration edit changes, as one typed comparison of the whole
//! parsed configuration (the shape of rathole's config watcher).
//!
//! The daemon swaps some settings in place ([`live_changes`]). Everything
//! else is compared by [`restart_keys`] with the live parts blanked out, so
//! a setting nobody thought of is "restart needed" by construction, never
//! silently ignored.

use crate::config::{Config, DaemonConfig, ReaperConfig};

/// The settings the running daemon takes over without a restart, by the
/// key a user edits, when they differ between `old` and `new`.
pub fn live_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let daemon = |c: &Config| DaemonConfig {
        log_level: String::new(),
        ..c.daemon.clone()
    };
    let checks = [
        ("certificate", old.certificates != new.certificates),
        ("daemon", daemon(old) != daemon(new)),
        ("notify", old.notify != new.notify),
        ("http01", old.http01 != new.http01),
        ("tls_alpn01", old.tls_alpn01 != new.tls_alpn01),
        ("dns01", old.dns01 != new.dns01),
        ("metrics_listen", old.metrics_listen != new.metrics_listen),
        ("reaper", old.reaper != new.reaper),
    ];
    checks
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
}

/// The keys whose value in `new` differs from the one the process started
/// with (`started`) and that take effect only at the next start.
pub fn restart_keys(started: &Config, new: &Config) -> Vec<&'static str> {
    if frozen(started) == frozen(new) {
        return Vec::new();
    }
    let (a, b) = (started, new);
    let checks = [
        ("acme.directory", a.acme.directory != b.acme.directory),
        ("acme.contact", a.acme.contact != b.acme.contact),
        ("acme.ca_bundle", a.acme.ca_bundle != b.acme.ca_bundle),
        ("acme.eab", a.acme.eab != b.acme.eab),
        (
            "storage.state_dir",
            a.storage.state_dir != b.storage.state_dir,
        ),
        ("storage.cert_dir", a.storage.cert_dir != b.storage.cert_dir),
        ("daemon.log_level", a.daemon.log_level != b.daemon.log_level),
    ];
    let keys: Vec<&'static str> = checks
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect();
    if keys.is_empty() {
        // A field the list above does not name yet: still reported.
        vec!["configuration"]
    } else {
        keys
    }
}

/// `cfg` with every live setting (see [`live_changes`]) blanked.
fn frozen(cfg: &Config) -> Config {
    Config {
        certificates: Vec::new(),
        notify: None,
        http01: None,
        tls_alpn01: None,
        dns01: None,
        metrics_listen: None,
        daemon: DaemonConfig {
            log_level: cfg.daemon.log_level.clone(),
            ..DaemonConfig::default()
        },
        reaper: ReaperConfig::default(),
        ..cfg.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

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
            assert_eq!(live_changes(&base, &edited), *live, "{replace}");
            assert_eq!(restart_keys(&base, &edited), *restart, "{replace}");
        }
    }

    #[test]
    fn an_edit_undone_needs_no_restart() {
        let base = parse(BASE);
        let moved = parse(&BASE.replace("/var/lib/certd", "/srv/certd"));
        assert_eq!(restart_keys(&base, &moved), ["storage.state_dir"]);
        assert!(restart_keys(&base, &parse(BASE)).is_empty());
    }
}
