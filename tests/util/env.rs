//! A scratch environment for one certd test: a Pebble of its own, a temporary
//! directory for certd's config, state and certificates, and the dns-01 hook
//! script that publishes TXT records through Pebble's DNS server.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::{CmdOutput, Pebble, PebbleOpts, TestCommand};

/// A Pebble plus a temporary directory laid out for certd.
#[derive(Debug)]
pub struct TestEnv {
    pub pebble: Pebble,
    dir: TempDir,
}

impl TestEnv {
    /// A fresh environment with a default Pebble. No config is written yet:
    /// call `write_config` (or `write_raw_config`).
    pub fn new() -> TestEnv {
        TestEnv::with_pebble_opts(PebbleOpts::default())
    }

    /// A Pebble that never reuses an authorization, so every order must
    /// validate afresh (tests of failure paths need that).
    /// Pebble with `PEBBLE_AUTHZREUSE=0`. Pebble's check is
    /// `rand.Intn(100) > percent`, so it still reuses a valid
    /// authorization 1 % of the time; a test that must see a fresh
    /// validation also sets `deactivate_valid_after_issue`.
    pub fn without_authz_reuse() -> TestEnv {
        TestEnv::with_pebble_opts(PebbleOpts {
            authz_reuse: Some(0),
            ..PebbleOpts::default()
        })
    }

    pub fn with_pebble_opts(opts: PebbleOpts) -> TestEnv {
        let pebble = Pebble::with_opts(opts);
        let dir = tempfile::Builder::new()
            .prefix("certd-test-")
            .tempdir()
            .expect("create certd temp dir");
        TestEnv { pebble, dir }
    }

    /// A second CA beside this environment's Pebble: a Pebble with roots of
    /// its own that validates at the same http-01 and tls-alpn-01 ports and
    /// resolves through the same DNS server, so one certd answers both.
    pub fn second_ca(&self, opts: PebbleOpts) -> Pebble {
        Pebble::with_opts(PebbleOpts {
            validation_ports: Some((self.pebble.http01_port(), self.pebble.tls_port())),
            dns_server: Some(opts.dns_server.unwrap_or(self.pebble.dns_addr())),
            ..opts
        })
    }

    /// The temporary directory everything below lives in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The ACME directory URL the current config names (Pebble's, or a
    /// proxy's in front of it).
    pub fn directory_url(&self) -> String {
        let text = fs::read_to_string(self.config_path()).unwrap_or_default();
        text.parse::<toml::Table>()
            .ok()
            .and_then(|t| t.get("acme")?.get("directory")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| self.pebble.directory_url())
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("certd.toml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn cert_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    pub fn dns_hook_path(&self) -> PathBuf {
        self.dir.path().join("dns-hook.sh")
    }

    /// One line per hook run: `present <record> <value>` or
    /// `cleanup <record> <value>`, so tests can check that every published
    /// record was cleaned up.
    pub fn dns_hook_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("dns-hook.log")).unwrap_or_default()
    }

    /// Writes a complete certd config pointing at this environment's Pebble,
    /// with `certificates_toml` (typically `[[certificate]]` tables) appended
    /// verbatim, and writes the dns-01 hook script it names.
    pub fn write_config(&self, certificates_toml: &str) {
        self.write_config_with_dns01(&self.dns01_hook_toml(), certificates_toml);
    }

    /// Like `write_config`, with `dns01_toml` (the `[dns01]` tables) in
    /// place of the hook section. The hook script is written all the same.
    pub fn write_config_with_dns01(&self, dns01_toml: &str, certificates_toml: &str) {
        let acme = format!(
            "[acme]\n{}",
            ca_keys(&self.pebble.directory_url(), &self.pebble.ca_bundle())
        );
        self.write_config_parts(&acme, dns01_toml, certificates_toml);
    }

    /// Like `write_config`, with one `[ca.<name>]` table per entry of
    /// `cas` (in that order) instead of `[acme]`. certd's http-01
    /// listener is where this environment's Pebble looks, which is where
    /// every `second_ca` looks too.
    pub fn write_config_cas(&self, cas: &[CaTable], certificates_toml: &str) {
        let tables: Vec<String> = cas
            .iter()
            .map(|ca| {
                format!(
                    "[ca.{}]\n{}",
                    ca.name,
                    ca_keys(&ca.directory, &ca.ca_bundle)
                )
            })
            .collect();
        let dns01 = self.dns01_hook_toml();
        self.write_config_parts(&tables.join("\n"), &dns01, certificates_toml);
    }

    /// The `[dns01]` table naming the hook that publishes in challtestsrv.
    fn dns01_hook_toml(&self) -> String {
        format!(
            r#"[dns01]
hook = {hook}
# The hook publishes in challtestsrv, so the propagation check asks it.
nameservers = ["{dns}"]
"#,
            hook = toml_path(&self.dns_hook_path()),
            dns = self.pebble.dns_addr(),
        )
    }

    /// Writes the config: the CA tables `ca_toml`, storage and the http-01
    /// listener of this environment, `dns01_toml`, then `certificates_toml`;
    /// and the hook script.
    fn write_config_parts(&self, ca_toml: &str, dns01_toml: &str, certificates_toml: &str) {
        let config = format!(
            r#"{ca_toml}
[storage]
state_dir = {state_dir}
cert_dir = {cert_dir}

[http01]
listen = "127.0.0.1:{http01_port}"

{dns01_toml}
{certificates_toml}"#,
            state_dir = toml_path(&self.state_dir()),
            cert_dir = toml_path(&self.cert_dir()),
            http01_port = self.pebble.http01_port(),
        );
        self.write_raw_config(&config);
        self.write_dns_hook();
    }

    /// Writes `text` as the config file as is, for tests of config errors.
    pub fn write_raw_config(&self, text: &str) {
        let path = self.config_path();
        fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// A `certd --config <config_path()>` command to add arguments to.
    pub fn command(&self) -> TestCommand {
        TestCommand::new(&self.config_path())
    }

    /// Runs `certd --config <config_path()> ARGS...` to completion.
    pub fn certd(&self, args: &[&str]) -> CmdOutput {
        self.command().args(args).output()
    }

    /// The hook certd runs as `hook present` / `hook cleanup` with
    /// `CERTD_DNS_RECORD` (no trailing dot), `CERTD_DNS_VALUE` and
    /// `CERTD_DOMAIN` set. It fails if challtestsrv does not take the change,
    /// so a broken DNS setup shows up as a hook failure, not a mysterious
    /// validation error.
    fn write_dns_hook(&self) {
        let script = format!(
            r#"#!/bin/sh
# dns-01 hook for certd's tests: publishes TXT records in pebble-challtestsrv.
set -eu
mgmt='{mgmt}'
log='{log}'
action="${{1:?usage: $0 present|cleanup}}"
record="${{CERTD_DNS_RECORD:?CERTD_DNS_RECORD not set}}"
value="${{CERTD_DNS_VALUE:-}}"
: "${{CERTD_DOMAIN:?CERTD_DOMAIN not set}}"
# challtestsrv wants fully qualified names.
host="${{record%.}}."
case "$action" in
present)
    curl -fsS --max-time 10 -X POST \
        -d "{{\"host\":\"$host\",\"value\":\"$value\"}}" "$mgmt/set-txt"
    ;;
cleanup)
    curl -fsS --max-time 10 -X POST -d "{{\"host\":\"$host\"}}" "$mgmt/clear-txt"
    ;;
*)
    echo "dns-hook: unknown action: $action" >&2
    exit 2
    ;;
esac
echo "$action $record $value" >> "$log"
"#,
            mgmt = self.pebble.challtestsrv_url(),
            log = self.dir.path().join("dns-hook.log").display(),
        );
        let path = self.dns_hook_path();
        fs::write(&path, script).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    }
}

impl Default for TestEnv {
    fn default() -> TestEnv {
        TestEnv::new()
    }
}

/// One `[ca.<name>]` table of a config with several CAs: certd reaches
/// the CA at `directory` (a Pebble's, or a front's before it) over TLS
/// that chains to `ca_bundle`.
#[derive(Debug, Clone)]
pub struct CaTable {
    pub name: &'static str,
    pub directory: String,
    pub ca_bundle: PathBuf,
}

impl CaTable {
    /// The CA `name`, served by `pebble` itself.
    pub fn of(name: &'static str, pebble: &Pebble) -> CaTable {
        CaTable {
            name,
            directory: pebble.directory_url(),
            ca_bundle: pebble.ca_bundle(),
        }
    }

    /// The CA `name`, reached through a front at `directory` that stands
    /// before `pebble` and presents its TLS certificate.
    pub fn behind(name: &'static str, directory: String, pebble: &Pebble) -> CaTable {
        CaTable {
            name,
            directory,
            ca_bundle: pebble.ca_bundle(),
        }
    }
}

/// The keys of a CA table (`[acme]` or `[ca.<name>]`) for a test CA.
fn ca_keys(directory: &str, ca_bundle: &Path) -> String {
    format!(
        "directory = {}\ncontact = [\"mailto:test@example.com\"]\nca_bundle = {}\n",
        toml_str(directory),
        toml_path(ca_bundle)
    )
}

/// A TOML basic string. JSON string escaping is valid TOML for everything a
/// path or URL here can contain.
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes to JSON")
}

fn toml_path(path: &Path) -> String {
    let s = path
        .to_str()
        .unwrap_or_else(|| panic!("temp path is not UTF-8: {}", path.display()));
    toml_str(s)
}

/// `[daemon]` settings for a test that watches a daemon retry: backoff
/// from 1 s to 2 s, and a shutdown grace a test can wait out.
pub const DAEMON_RETRY_2S: &str = r#"
[daemon]
backoff_min = "1s"
backoff_max = "2s"
shutdown_grace = "10s"
"#;

/// As `DAEMON_RETRY_2S`, with retries up to 4 s apart: a few attempts
/// within a test, and a tight loop would stand out.
pub const DAEMON_RETRY_4S: &str = r#"
[daemon]
backoff_min = "1s"
backoff_max = "4s"
shutdown_grace = "10s"
"#;

/// A `[[certificate]]` table with one name.
pub fn cert_table(name: &str, domain: &str) -> String {
    format!("\n[[certificate]]\nname = \"{name}\"\ndomains = [\"{domain}\"]\n")
}
