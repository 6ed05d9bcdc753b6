//! The man pages clap cannot write alone: `certd(1)` with what a shell user
//! and an init system need beyond the options (exit status, signals,
//! environment, files), and `certd.toml(5)`, the configuration format.
//!
//! The keys of `certd.toml(5)` are read from `config.example.toml`, the
//! annotated example the package installs as `/etc/certd/config.toml`: a
//! test checks that file against the parser, so the page cannot describe a
//! key the parser does not take, or a default it does not use.

use std::path::Path;

use clap_mangen::Man;
use clap_mangen::roff::{Inline, Roff, bold, italic, roman};

/// Every key with its default and what it means, as shipped.
const EXAMPLE: &str = include_str!("../../config.example.toml");

/// The two configurations the README starts from.
const QUICK_START: [(&str, &str); 2] = [
    (
        "A host where nginx serves port 80 (examples/nginx-webroot.toml):",
        include_str!("../../examples/nginx-webroot.toml"),
    ),
    (
        "A host with nothing on port 80, for HAProxy on :443 (examples/standalone.toml):",
        include_str!("../../examples/standalone.toml"),
    ),
];

/// Writes `certd.1` (over the one `clap_mangen::generate_to` wrote) and
/// `certd.toml.5` into `dir`.
pub(crate) fn write_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    // As `clap_mangen::generate_to` builds the command for the other pages.
    let man = Man::new(cmd.disable_help_subcommand(true));
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    certd_description().to_writer(&mut page)?;
    man.render_options_section(&mut page)?;
    man.render_subcommands_section(&mut page)?;
    certd_sections().to_writer(&mut page)?;
    man.render_version_section(&mut page)?;
    std::fs::write(dir.join("certd.1"), page)?;
    std::fs::write(dir.join("certd.toml.5"), config_page().render())
}

/// More of DESCRIPTION, after clap's one line.
fn certd_description() -> Roff {
    let mut r = Roff::new();
    para(
        &mut r,
        "certd keeps the TLS certificates of a host valid. It reads certificate jobs from \
         its configuration file (see certd.toml(5)), obtains and renews them from an ACME \
         (RFC 8555) CA, installs them atomically where web servers read them, runs reload \
         commands, and keeps a ledger (SQLite) of every ACME object it creates, so that no \
         authorization is left pending at the CA.",
    );
    para(
        &mut r,
        "certd run is the daemon, for systemd (Type=notify). The other commands act once \
         and exit; each has a page of its own, e.g. certd-renew(1). Commands that write \
         the ledger (run, renew, reap without --dry-run, revoke, authz deactivate, account \
         rollover) take the state directory's lock and refuse to run beside a daemon; \
         status, authz list, account show and reap --dry-run work alongside it.",
    );
    r
}

/// EXIT STATUS, SIGNALS, ENVIRONMENT, FILES and SEE ALSO of `certd(1)`.
fn certd_sections() -> Roff {
    let mut r = Roff::new();
    r.control("SH", ["EXIT STATUS"]);
    item(
        &mut r,
        [bold("0")],
        "Success; for certd run, a clean shutdown after SIGTERM or SIGINT.",
    );
    item(
        &mut r,
        [bold("1")],
        "A certificate or authorization operation failed: a renewal or a reload command \
         (renew), a revocation, a reaper pass the CA could not answer, a deactivation; \
         account show without an account; account rollover refused by the CA (the old \
         key stays).",
    );
    item(
        &mut r,
        [bold("2")],
        "Nothing will work until an operator acts: the configuration or the command line \
         is wrong; the state or certificate directory is unsafe (owned by another user, \
         writable by group or others); the ledger cannot be used (corrupt, unwritable, \
         locked by another certd, deleted under the daemon). The message names the file \
         and the cause, and installed certificates are left as they were.",
    );
    para(
        &mut r,
        "certd status --check has its own: 0 every certificate valid and not overdue, 1 a \
         renewal failing inside its window or overdue, 2 expired, missing, or failing with \
         less than a sixth of its lifetime left.",
    );

    r.control("SH", ["SIGNALS"]);
    para(&mut r, "Handled by certd run:");
    item(
        &mut r,
        [bold("SIGHUP")],
        "Re-read the configuration file (systemctl reload certd sends it; a change of the \
         file's content is noticed without it). An invalid file is logged with its line \
         numbers and the running configuration stays. Changes the daemon cannot apply \
         while running are named in the log and in certd status until a restart.",
    );
    item(
        &mut r,
        [bold("SIGTERM"), roman(", "), bold("SIGINT")],
        "Stop: no new orders or reloads; orders in flight stop at the next safe point and \
         their pending authorizations are deactivated, within [daemon] shutdown_grace \
         (default 30 s). Orders still running after it are abandoned and named in the \
         log; the next start settles what they left. Exit status 0.",
    );
    para(
        &mut r,
        "certd renew stops on SIGINT (Ctrl-C) as the daemon does on SIGTERM: its orders \
         are abandoned and their pending authorizations deactivated. Other signals end \
         the one-shot commands at once; what an interrupted order left is resumed or \
         settled by the next certd that writes the ledger.",
    );

    r.control("SH", ["ENVIRONMENT"]);
    item(
        &mut r,
        [bold("CERTD_CONFIG")],
        "The configuration file when --config is not given (default \
         /etc/certd/config.toml).",
    );
    item(
        &mut r,
        [bold("RUST_LOG")],
        "Log level as target=level directives, e.g. certd=debug,warn; overrides [daemon] \
         log_level. Span and field filters are not supported.",
    );
    item(
        &mut r,
        [bold("JOURNAL_STREAM")],
        "Set by systemd: text log lines then carry no timestamps (journald adds them).",
    );
    item(
        &mut r,
        [bold("NOTIFY_SOCKET")],
        "Set by systemd for Type=notify: certd run sends READY=1, RELOADING=1 and \
         STOPPING=1 there.",
    );

    r.control("SH", ["FILES"]);
    item(
        &mut r,
        [italic("/etc/certd/config.toml")],
        "The configuration, see certd.toml(5). Paths below are the packaged defaults of \
         [storage] state_dir and cert_dir.",
    );
    item(
        &mut r,
        [italic("/var/lib/certd/certd.db")],
        "The ledger (SQLite, with -wal and -shm beside it): orders, authorizations, \
         challenges, attempts. No secrets.",
    );
    item(
        &mut r,
        [italic("/var/lib/certd/certd.lock")],
        "Locked by the process writing the ledger; holds its PID.",
    );
    item(
        &mut r,
        [
            italic("/var/lib/certd/account-"),
            roman("HASH"),
            italic(".json"),
        ],
        "The account key for one CA directory URL, 0600.",
    );
    item(
        &mut r,
        [italic("/var/lib/certd/order-keys/")],
        "The key of an order between finalize and install (0600), so that a run that \
         dies in between can still collect the certificate.",
    );
    item(
        &mut r,
        [italic("/etc/certd/live/"), roman("NAME"), italic("/")],
        "One directory per certificate: fullchain.pem (certificate and chain), \
         privkey.pem (0600), cert.pem, chain.pem. They are links through current to \
         versions/TIME-SERIAL/, which one rename(2) replaces on renewal, so a reader never \
         sees a key from one issuance beside a certificate from another. The previous \
         version is kept.",
    );
    item(
        &mut r,
        [italic("/lib/systemd/system/certd.service")],
        "The unit: certd run as the user certd, sandboxed; ExecReload sends SIGHUP.",
    );
    item(
        &mut r,
        [italic("/etc/polkit-1/rules.d/50-certd.rules")],
        "Written by certd polkit-rule: lets the certd user reload the units its reload \
         commands name, and nothing else.",
    );

    r.control("SH", ["SEE ALSO"]);
    r.text([roman(
        "certd.toml(5), certd-run(1), certd-renew(1), certd-status(1), certd-check-config(1), \
         certd-authz(1), certd-reap(1), certd-account(1), certd-revoke(1), \
         certd-polkit-rule(1), systemctl(1), /usr/share/doc/certd/README.md",
    )]);
    r
}

/// `certd.toml(5)`.
fn config_page() -> Roff {
    let mut r = Roff::new();
    r.control(
        "TH",
        [
            "CERTD.TOML",
            "5",
            "",
            env!("CARGO_PKG_VERSION"),
            "File Formats",
        ],
    );
    r.control("SH", ["NAME"]);
    r.text([roman(
        "certd.toml - configuration of certd, the certificate renewal daemon",
    )]);
    r.control("SH", ["SYNOPSIS"]);
    r.text([italic("/etc/certd/config.toml")]);
    r.control("SH", ["DESCRIPTION"]);
    para(
        &mut r,
        "certd(1) reads one TOML file: --config FILE, else $CERTD_CONFIG, else \
         /etc/certd/config.toml. It names the CA, where certd keeps its state and installs \
         certificates, how it answers challenges, and one [[certificate]] table per \
         certificate. Unknown keys are errors.",
    );
    para(
        &mut r,
        "Relative paths are resolved against the directory of the file. Durations are a \
         number and a unit: 90s, 15m, 1h, 7d. A file that names a secret (the EAB key, the \
         TSIG secret) must be readable by its owner only (chmod 600), or certd refuses it; \
         secrets are never logged or printed.",
    );
    para(
        &mut r,
        "certd check-config validates a file and prints one line per certificate. Every \
         error names the file, line, column and key, and exits with status 2, e.g.:",
    );
    preformatted(
        &mut r,
        "certd: /etc/certd/config.toml:14:1: certificate[0].keytype: unknown field `keytype`, ...",
    );
    para(
        &mut r,
        "certd run re-reads the file when its content changes and on SIGHUP. A file that \
         does not validate is logged and the running configuration stays. The \
         certificates, [daemon] (except log_level), [notify], [metrics], [http01], \
         [tls_alpn01], [dns01], and [reaper] interval and pending_max_age apply at once; \
         any other change waits for a restart, which the log and certd status name.",
    );

    r.control("SH", ["SEVERAL CAS"]);
    para(
        &mut r,
        "[acme] names one CA, called default. For several, write one [ca.NAME] table per \
         CA (NAME: lowercase letters, digits, - and _); it takes every key [acme] takes, \
         and preset = \"NAME\" instead of directory: letsencrypt, letsencrypt-staging, \
         buypass, zerossl and google (the last two need eab_kid and eab_hmac_key_file). A \
         [ca.NAME] table named after a preset and without a directory uses that preset. \
         max_pending, failed_authz_per_identifier_per_hour, new_orders_per_3h and \
         duplicate_certificates_per_week set the limits certd keeps to at that CA \
         (default: [reaper]'s). Two tables may not name the same directory, and [acme] \
         may not stand beside [ca.default].",
    );
    para(
        &mut r,
        "In a [[certificate]], ca = [\"letsencrypt\", \"buypass\"] lists the CAs to \
         try, best first (default: the only CA, else default, else it must be set). The \
         next is tried when one cannot issue soon: unreachable longer than \
         ca_fallback_after (default: [daemon] ca_fallback_after, 1h), rate-limited past \
         the renewal deadline, or missing what the certificate needs; never after a \
         failed validation. sticky = true renews at the CA that issued the installed \
         certificate instead of the first. A certificate's ca, ca_fallback_after and \
         sticky apply at a reload; a change to a CA table waits for a restart.",
    );

    r.control("SH", ["KEYS"]);
    para(
        &mut r,
        "Each key as the annotated example installed as /etc/certd/config.toml shows it. \
         A key the example sets shows its default; a key it leaves commented out shows an \
         example value, and its text says what applies without it. Tables it leaves \
         commented out are optional.",
    );
    for table in tables(EXAMPLE) {
        r.control("SS", [table.header.as_str()]);
        if !table.about.is_empty() {
            r.text([roman(table.about.join(" "))]);
        }
        for key in &table.keys {
            r.control("TP", []);
            r.text([bold(key.name.as_str()), roman(format!(" = {}", key.value))]);
            let text = if key.about.is_empty() {
                "(see above)".to_owned()
            } else {
                key.about.join(" ")
            };
            r.text([roman(text)]);
        }
    }

    r.control("SH", ["EXAMPLES"]);
    for (title, text) in QUICK_START {
        para(&mut r, title);
        preformatted(&mut r, text.trim_end());
    }
    para(
        &mut r,
        "certd writes each certificate to cert_dir/NAME/: point nginx's ssl_certificate at \
         fullchain.pem and ssl_certificate_key at privkey.pem (Apache: \
         SSLCertificateFile, SSLCertificateKeyFile). HAProxy wants the chain and the key \
         in one file, which certd does not write: the reload command of the second \
         example builds it.",
    );

    r.control("SH", ["FILES"]);
    item(
        &mut r,
        [italic("/etc/certd/config.toml")],
        "The configuration (0640 root:certd in the package, a conffile).",
    );
    item(
        &mut r,
        [italic("/usr/share/doc/certd/README.md")],
        "Installing, the first configuration, monitoring, and what to do when a renewal \
         fails.",
    );
    r.control("SH", ["SEE ALSO"]);
    r.text([roman("certd(1), certd-check-config(1), certd-run(1)")]);
    r
}

/// One table of the annotated example: its header as written (`[acme]`,
/// `[[certificate]]`), the comment above it, and its keys.
struct Table {
    header: String,
    about: Vec<String>,
    keys: Vec<Key>,
}

/// One key, set (`key = value`) or shown commented (`# key = value`), with
/// the comment lines right above it.
struct Key {
    name: String,
    value: String,
    about: Vec<String>,
}

/// The example's tables and keys. A comment belongs to the table header or
/// key right below it; a blank line or a bare `#` ends it unclaimed.
fn tables(example: &str) -> Vec<Table> {
    let mut tables: Vec<Table> = Vec::new();
    let mut comment: Vec<String> = Vec::new();
    for line in example.lines().map(str::trim) {
        let (commented, rest) = match line.strip_prefix('#') {
            Some(rest) => (true, rest.trim()),
            None => (false, line),
        };
        if rest.is_empty() {
            comment.clear();
        } else if rest.starts_with('[') && rest.ends_with(']') {
            tables.push(Table {
                header: rest.to_owned(),
                about: std::mem::take(&mut comment),
                keys: Vec::new(),
            });
        } else if let Some((name, value)) = setting(rest)
            && let Some(table) = tables.last_mut()
        {
            table.keys.push(Key {
                name: name.to_owned(),
                value: value.to_owned(),
                about: std::mem::take(&mut comment),
            });
        } else if commented {
            comment.push(rest.to_owned());
        }
    }
    tables
}

/// `key = value` where the key is a bare TOML key of lowercase letters and
/// underscores, as all of certd's are; prose never has that shape.
fn setting(line: &str) -> Option<(&str, &str)> {
    let (name, value) = line.split_once(" = ")?;
    let bare = !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_');
    bare.then_some((name, value))
}

fn para(r: &mut Roff, text: &str) {
    r.control("PP", []);
    r.text([roman(text)]);
}

fn item(r: &mut Roff, tag: impl Into<Vec<Inline>>, text: &str) {
    r.control("TP", []);
    r.text(tag);
    r.text([roman(text)]);
}

/// Lines set as they are, indented, in a fixed-width font.
fn preformatted(r: &mut Roff, text: &str) {
    r.control("RS", ["4"]);
    r.control("nf", []);
    for line in text.lines() {
        r.text([roman(line)]);
    }
    r.control("fi", []);
    r.control("RE", []);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_and_key_of_the_example_is_on_the_page() {
        let tables = tables(EXAMPLE);
        let headers: Vec<&str> = tables.iter().map(|t| t.header.as_str()).collect();
        assert_eq!(
            headers,
            [
                "[acme]",
                "[storage]",
                "[http01]",
                "[tls_alpn01]",
                "[dns01]",
                "[dns01.rfc2136]",
                "[reaper]",
                "[daemon]",
                "[metrics]",
                "[notify]",
                "[fleet]",
                "[[certificate]]",
            ]
        );
        let page = config_page().render();
        for table in &tables {
            assert!(!table.keys.is_empty(), "{} has no keys", table.header);
            for key in &table.keys {
                assert!(
                    page.contains(&format!("\\fB{}\\fR = ", key.name)),
                    "{} {} missing",
                    table.header,
                    key.name
                );
            }
        }
        let acme = &tables[0];
        let directory = &acme.keys[0];
        assert_eq!(directory.name, "directory");
        assert!(
            directory.about.join(" ").contains("required"),
            "{:?}",
            directory.about
        );
        // A comment above a table header describes the table, not a key.
        assert!(tables[3].about.join(" ").contains("tls-alpn-01"));
        assert!(!tables[3].keys[0].about.join(" ").contains("RFC 8737"));
    }

    #[test]
    fn certd_page_has_exit_status_signals_and_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_pages(
            <crate::cli::Cli as clap::CommandFactory>::command(),
            dir.path(),
        )
        .expect("write pages");
        let page = std::fs::read_to_string(dir.path().join("certd.1")).expect("certd.1");
        for heading in [
            "OPTIONS",
            "SUBCOMMANDS",
            "EXIT STATUS",
            "SIGNALS",
            "ENVIRONMENT",
            "FILES",
            "SEE ALSO",
        ] {
            assert!(
                page.contains(&format!(".SH \"{heading}\""))
                    || page.contains(&format!(".SH {heading}")),
                "{heading} missing"
            );
        }
        assert!(page.contains("certd\\-renew(1)"), "subcommand pages named");
        let config =
            std::fs::read_to_string(dir.path().join("certd.toml.5")).expect("certd.toml.5");
        assert!(
            config.starts_with(".ie") || config.contains(".TH CERTD.TOML 5"),
            "{config:.200}"
        );
        assert!(
            config.contains("webroot = \"/var/www/acme\""),
            "the quick-start examples"
        );
        for key in ["[ca.NAME]", "preset", "ca_fallback_after", "sticky"] {
            assert!(config.contains(key), "{key} on certd.toml(5)");
        }
    }
}
