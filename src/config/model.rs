//! The typed configuration the rest of certd reads: one struct per
//! section, every value already parsed and every file already read. Each
//! section derives `PartialEq`, which is what the reload diff compares.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor};
use webpki::anchor_from_trusted_cert;

use crate::config::names::{CertName, DnsAlias, Identifier};
use crate::config::values::{ChallengeKind, KeyType, ServerAddr, TsigAlgorithm};

/// Where `certd` looks for its configuration when neither `--config` nor
/// `$CERTD_CONFIG` names a file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/certd/config.toml";

/// The ledger's file name inside `[storage] state_dir`.
pub const DB_FILE: &str = "certd.db";

/// A fully validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from; relative paths inside it were resolved
    /// against this file's directory.
    pub path: PathBuf,
    /// The CAs, in file order: `[acme]` (named `default`) and each
    /// `[ca.<name>]`. Never empty; names and directories are distinct.
    pub cas: Vec<CaConfig>,
    pub storage: StorageConfig,
    pub http01: Option<Http01Config>,
    pub dns01: Option<Dns01Config>,
    pub tls_alpn01: Option<TlsAlpn01Config>,
    pub reaper: ReaperConfig,
    pub daemon: DaemonConfig,
    /// Prometheus text endpoint of the daemon.
    pub metrics_listen: Option<SocketAddr>,
    pub notify: Option<NotifyConfig>,
    /// Fleet mode: several hosts sharing one ledger in PostgreSQL.
    pub fleet: Option<FleetConfig>,
    pub certificates: Vec<CertificateConfig>,
}

impl Config {
    pub fn certificate(&self, name: &str) -> Option<&CertificateConfig> {
        self.certificates.iter().find(|c| c.name.as_str() == name)
    }

    pub fn db_path(&self) -> PathBuf {
        self.storage.state_dir.join(DB_FILE)
    }

    /// The CA named `name`.
    pub fn ca(&self, name: &CaName) -> Option<&CaConfig> {
        self.cas.iter().find(|ca| ca.name == *name)
    }

    /// The CAs `c` may use, in its order of preference (`ca = [...]`).
    /// Parsing made sure each name is a configured CA.
    pub fn cas_of<'a>(&'a self, c: &'a CertificateConfig) -> impl Iterator<Item = &'a CaConfig> {
        c.ca.iter().filter_map(|name| self.ca(name))
    }

    /// The CA of the one-CA code paths: `default` if configured, else the
    /// first in the file. A stand-in until every caller picks the CA of
    /// the certificate it acts for.
    pub fn primary_ca(&self) -> &CaConfig {
        let default = CaName::default_ca();
        // Parsing refuses a configuration without a CA, so `cas` is never
        // empty and indexing the first is safe.
        self.ca(&default).unwrap_or(&self.cas[0])
    }
}

/// A CA's name in the configuration: `[ca.<name>]`, or `default` for
/// `[acme]`. Lowercase letters, digits, `-` and `_`, as the ledger and
/// `certd status` show it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CaName(String);

impl CaName {
    /// The name `[acme]` gets.
    pub const DEFAULT: &'static str = "default";

    /// `default`, the CA of `[acme]`.
    pub fn default_ca() -> Self {
        Self(Self::DEFAULT.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for CaName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = (1..=63).contains(&s.len())
            && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "{s:?} is not a CA name: use up to 63 lowercase letters, digits, '-' and '_', starting with a letter or digit"
            ))
        }
    }
}

impl fmt::Display for CaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One CA: where it is, the account certd holds there, and the limits
/// certd keeps to there.
#[derive(Debug, Clone, PartialEq)]
pub struct CaConfig {
    pub name: CaName,
    /// The table that defines it, as errors and reload reports name it:
    /// `acme` or `ca.<name>`.
    pub table: String,
    pub acme: AcmeConfig,
    /// The guard's limits at this CA.
    pub limits: CaLimits,
    /// The preset that filled the directory, if one did.
    pub preset: Option<Preset>,
}

impl CaConfig {
    /// `base` (the `[reaper]` settings) with this CA's limits.
    pub fn reaper_config(&self, base: &ReaperConfig) -> ReaperConfig {
        let CaLimits {
            max_pending,
            failed_authz_per_identifier_per_hour,
            new_orders_per_3h,
            duplicate_certificates_per_week,
        } = self.limits;
        ReaperConfig {
            max_pending,
            failed_authz_per_identifier_per_hour,
            new_orders_per_3h,
            duplicate_certificates_per_week,
            ..base.clone()
        }
    }
}

/// The limits the guard keeps to at one CA; each defaults to `[reaper]`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaLimits {
    pub max_pending: u32,
    pub failed_authz_per_identifier_per_hour: u32,
    pub new_orders_per_3h: u32,
    pub duplicate_certificates_per_week: u32,
}

impl CaLimits {
    /// The limits `[reaper]` sets for every CA.
    pub fn of(reaper: &ReaperConfig) -> Self {
        Self {
            max_pending: reaper.max_pending,
            failed_authz_per_identifier_per_hour: reaper.failed_authz_per_identifier_per_hour,
            new_orders_per_3h: reaper.new_orders_per_3h,
            duplicate_certificates_per_week: reaper.duplicate_certificates_per_week,
        }
    }
}

/// A well-known public CA: a directory URL and whether it needs External
/// Account Binding. Nothing is fetched to know either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Preset {
    LetsEncrypt,
    LetsEncryptStaging,
    ZeroSsl,
    Google,
    Buypass,
}

impl Preset {
    pub const ALL: [Self; 5] = [
        Self::LetsEncrypt,
        Self::LetsEncryptStaging,
        Self::ZeroSsl,
        Self::Google,
        Self::Buypass,
    ];

    /// As `preset = "..."` (and a `[ca.<name>]` of that name) spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::LetsEncrypt => "letsencrypt",
            Self::LetsEncryptStaging => "letsencrypt-staging",
            Self::ZeroSsl => "zerossl",
            Self::Google => "google",
            Self::Buypass => "buypass",
        }
    }

    /// The preset called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The ACME directory URL.
    pub fn directory(self) -> Url {
        let url = match self {
            Self::LetsEncrypt => "https://acme-v02.api.letsencrypt.org/directory",
            Self::LetsEncryptStaging => "https://acme-staging-v02.api.letsencrypt.org/directory",
            Self::ZeroSsl => "https://acme.zerossl.com/v2/DV90",
            Self::Google => "https://dv.acme-v02.api.pki.goog/directory",
            Self::Buypass => "https://api.buypass.com/acme/directory",
        };
        // Invariant: each constant above is an absolute https URL (the
        // unit test `presets` parses every one).
        Url::parse(url).expect("a preset's directory is a valid URL")
    }

    /// Whether the CA refuses accounts without External Account Binding.
    pub fn needs_eab(self) -> bool {
        matches!(self, Self::ZeroSsl | Self::Google)
    }
}

/// `[fleet]`: this host is one of several sharing one ledger in
/// PostgreSQL, with a lease per certificate.
#[derive(Clone, PartialEq)]
pub struct FleetConfig {
    /// `postgres://user:password@host:port/db`. May hold a password:
    /// never logged or printed (see the `Debug` below).
    pub database_url: String,
    /// 32 random bytes, the same on every host, mode 0600: seals private
    /// keys before they reach the database.
    pub key_file: PathBuf,
    /// How long a lease lasts without renewal; the holder renews at a
    /// third of it.
    pub lease_ttl: Duration,
    /// This host's name in the fleet: the system's host name unless set.
    pub host_id: Option<String>,
    /// Where other hosts reach this host's http-01 responder, for their
    /// pre-flight; `http01.listen` unless set.
    pub advertise: Option<SocketAddr>,
}

impl fmt::Debug for FleetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry the database password.
        f.debug_struct("FleetConfig")
            .field("database_url", &"<hidden>")
            .field("key_file", &self.key_file)
            .field("lease_ttl", &self.lease_ttl)
            .field("host_id", &self.host_id)
            .field("advertise", &self.advertise)
            .finish()
    }
}

impl FleetConfig {
    /// The default `lease_ttl`.
    pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
}

/// A program told about renewals that keep failing, and recoveries.
#[derive(Debug, Clone, PartialEq)]
pub struct NotifyConfig {
    pub command: String,
    /// Consecutive failures before the first notification.
    pub after_failures: u32,
    pub timeout: Duration,
}

/// How `certd run` schedules work.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    /// Orders in flight at once.
    pub max_concurrent: usize,
    /// Renew when this fraction of the lifetime remains (without ARI).
    pub renew_remaining: f64,
    /// First retry delay after a failure; doubles per failure.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How often to ask the CA for a certificate's ARI window (RFC 9773);
    /// the CA's `Retry-After` shortens it.
    pub ari_interval: Duration,
    /// How long SIGTERM waits for in-flight orders.
    pub shutdown_grace: Duration,
    /// Log filter when `RUST_LOG` is unset.
    pub log_level: String,
    /// How long a CA may stay unreachable (or answer 5xx) before a
    /// certificate moves on to its next CA; each certificate may set its own.
    pub ca_fallback_after: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 4,
            renew_remaining: 1.0 / 3.0,
            backoff_min: Duration::from_secs(60),
            backoff_max: Duration::from_secs(6 * 3600),
            // Let's Encrypt's integration guide: twice a day.
            ari_interval: Duration::from_secs(12 * 3600),
            shutdown_grace: Duration::from_secs(30),
            log_level: "info".into(),
            ca_fallback_after: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AcmeConfig {
    pub directory: Url,
    pub contact: Vec<String>,
    /// Extra roots trusted for the CA's own TLS endpoint (private or test CAs).
    pub ca_bundle: Option<PathBuf>,
    /// External Account Binding, for CAs that require it.
    pub eab: Option<Eab>,
    /// The roots issued chains must lead to (`trusted_roots`), if named.
    pub trusted_roots: Option<TrustedRoots>,
}

/// An External Account Binding (RFC 8555 §7.3.4): the CA's key id and
/// the HMAC key, read from a file that only its owner may read.
#[derive(Clone, PartialEq)]
pub struct Eab {
    pub kid: String,
    pub hmac_key: Secret,
}

impl fmt::Debug for Eab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Eab")
            .field("kid", &self.kid)
            .field("hmac_key", &self.hmac_key)
            .finish()
    }
}

/// Secret bytes that never appear in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub(crate) fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StorageConfig {
    /// Holds `certd.db` and the account credentials.
    pub state_dir: PathBuf,
    /// Holds one directory per certificate.
    pub cert_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Http01Config {
    /// Address of certd's own responder (standalone mode).
    pub listen: Option<SocketAddr>,
    /// Directory served by an existing web server at `/.well-known/acme-challenge/`.
    pub webroot: Option<PathBuf>,
    /// Fetch the token over HTTP before asking the CA to validate.
    pub preflight: Preflight,
}

/// Whether certd fetches an http-01 token itself before the CA does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preflight {
    Off,
    /// A webroot by default: checked through the local web server
    /// (127.0.0.1:80, the name in `Host`) when one answers there; a host
    /// whose web server runs elsewhere is not refused for it.
    IfServed,
    /// Set, or the standalone responder: a failed fetch stops the order.
    On,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsAlpn01Config {
    /// Address of certd's own tls-alpn-01 responder (usually port 443,
    /// when no web server holds it).
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Dns01Config {
    /// How records are published: exactly one way per configuration.
    pub mode: Dns01Mode,
    /// How long a hook may run (hook mode only).
    pub hook_timeout: Duration,
    /// The check, before the CA is asked, that the record is visible.
    pub propagation: PropagationConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Dns01Mode {
    /// Program run as `hook present` and `hook cleanup`.
    Hook(PathBuf),
    /// Dynamic update (RFC 2136) signed with TSIG.
    Rfc2136(Rfc2136Config),
}

#[derive(Debug, Clone, PartialEq)]
pub struct PropagationConfig {
    pub enabled: bool,
    /// Upper bound on the wait for the record to show everywhere.
    pub timeout: Duration,
    /// Servers to ask instead of the zone's NS records (split horizon).
    pub nameservers: Vec<ServerAddr>,
}

impl Default for PropagationConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            timeout: Duration::from_secs(120),
            nameservers: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rfc2136Config {
    /// The primary server that takes updates.
    pub server: ServerAddr,
    /// The zone to update; discovered through the server's SOA if unset.
    pub zone: Option<String>,
    pub key_name: String,
    pub algorithm: TsigAlgorithm,
    pub secret: Secret,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReaperConfig {
    pub pending_max_age: Duration,
    pub interval: Duration,
    pub max_pending: u32,
    pub failed_authz_per_identifier_per_hour: u32,
    pub deactivate_valid_after_issue: bool,
    /// New orders per account in any three hours (Let's Encrypt: 300).
    pub new_orders_per_3h: u32,
    /// Certificates for exactly the same names in any seven days (Let's
    /// Encrypt: 5).
    pub duplicate_certificates_per_week: u32,
}

impl Default for ReaperConfig {
    fn default() -> Self {
        Self {
            pending_max_age: Duration::from_secs(3600),
            interval: Duration::from_secs(300),
            max_pending: 100,
            failed_authz_per_identifier_per_hour: 5,
            deactivate_valid_after_issue: false,
            new_orders_per_3h: 300,
            duplicate_certificates_per_week: 5,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CertificateConfig {
    pub name: CertName,
    /// The identifiers on the certificate: DNS names and IP addresses
    /// (RFC 8738), in configuration order.
    pub domains: Vec<Identifier>,
    pub key_type: KeyType,
    /// Challenge types in order of preference.
    pub challenges: Vec<ChallengeKind>,
    /// Shell commands run after a new certificate is installed.
    pub reload: Vec<String>,
    pub reload_timeout: Duration,
    /// The ACME profiles to ask for (`meta.profiles`), best first.
    pub profile: ProfilePreference,
    /// Keep the private key across renewals (key pinning setups).
    pub reuse_key: bool,
    /// Where dns-01 puts the TXT record instead of `_acme-challenge.<name>`
    /// (alias mode: that name is a CNAME into a zone certd may update).
    pub dns_alias: Option<DnsAlias>,
    /// The CAs to order from, best first; never empty, each configured.
    pub ca: Vec<CaName>,
    /// How long the CA tried may stay unreachable before the next one in
    /// `ca` is tried (default: `[daemon] ca_fallback_after`).
    pub ca_fallback_after: Duration,
    /// Renew at the CA that issued the installed certificate rather than
    /// at the first in `ca`.
    pub sticky: bool,
}

impl CertificateConfig {
    /// The domains as plain strings, in configuration order.
    pub fn domain_strings(&self) -> Vec<String> {
        self.domains.iter().map(|d| d.to_string()).collect()
    }

    /// Whether an IP address is among the identifiers.
    pub fn has_ip(&self) -> bool {
        self.domains.iter().any(|d| matches!(d, Identifier::Ip(_)))
    }
}

/// The profiles an operator asks for, best first, and whether one of them
/// is required. Not required (the default), a profile the CA's directory
/// does not list is skipped with a warning, and with none left the order
/// names no profile: a CA retiring a profile must not stop every renewal.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProfilePreference {
    pub names: Vec<String>,
    pub required: bool,
}

impl ProfilePreference {
    /// The preference as the ledger records it, to tell whether it changed
    /// since the installed certificate was ordered: the names in order,
    /// comma-separated, and `!` at the end when one is required.
    pub fn ledger_key(&self) -> String {
        let mut key = self.names.join(",");
        if self.required {
            key.push('!');
        }
        key
    }
}

/// Roots the operator trusts to issue certificates (`[acme] trusted_roots`):
/// a chain from the CA must end at one of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedRoots {
    path: PathBuf,
    certs: Arc<[CertificateDer<'static>]>,
}

impl TrustedRoots {
    /// Reads the PEM file at `path`; every certificate in it must be usable
    /// as a trust anchor.
    pub fn load(path: &Path) -> Result<Self, String> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: not a PEM file: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{} contains no PEM certificate", path.display()));
        }
        for (i, cert) in certs.iter().enumerate() {
            anchor_from_trusted_cert(cert).map_err(|e| {
                format!(
                    "{}: certificate {} cannot serve as a root: {e}",
                    path.display(),
                    i + 1
                )
            })?;
        }
        Ok(Self {
            path: path.to_owned(),
            certs: certs.into(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn anchors(&self) -> Vec<TrustAnchor<'_>> {
        // `load` proved every certificate converts.
        self.certs
            .iter()
            .filter_map(|c| anchor_from_trusted_cert(c).ok())
            .collect()
    }
}
