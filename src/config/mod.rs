//! The configuration file: TOML in, typed and validated structs out.
//!
//! Parsing happens in two steps. Serde reads the file into `raw` structs that
//! keep the byte span of every value the second step may reject; the second
//! step turns them into the public types (`Config`, `CertificateConfig`, …),
//! whose fields are already known good: a `DnsName` is a valid name, a
//! `CertName` is safe as a directory name, a duration is a `Duration`. Every
//! error names the file, the line and column, and the key (for example
//! `certificate[2].domains[0]`), so an operator can fix it without guessing.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;
use toml::Spanned;

use crate::install::TrustedRoots;

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
    pub acme: AcmeConfig,
    pub storage: StorageConfig,
    pub http01: Option<Http01Config>,
    pub dns01: Option<Dns01Config>,
    pub tls_alpn01: Option<TlsAlpn01Config>,
    pub reaper: ReaperConfig,
    pub daemon: DaemonConfig,
    /// Prometheus text endpoint of the daemon.
    pub metrics_listen: Option<SocketAddr>,
    pub notify: Option<NotifyConfig>,
    pub certificates: Vec<CertificateConfig>,
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
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Reads a secret file, refusing one that others can read (as ssh does):
/// a secret that leaked is no secret.
pub fn read_secret_file(path: &Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
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

/// The HMACs TSIG keys can use (RFC 8945); the MD5 and SHA-1 ones are
/// deliberately absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TsigAlgorithm {
    #[default]
    HmacSha256,
    HmacSha384,
    HmacSha512,
}

impl FromStr for TsigAlgorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "hmac-sha256" => Ok(Self::HmacSha256),
            "hmac-sha384" => Ok(Self::HmacSha384),
            "hmac-sha512" => Ok(Self::HmacSha512),
            _ => Err(format!(
                "unknown TSIG algorithm {s:?}; expected hmac-sha256, hmac-sha384 or hmac-sha512"
            )),
        }
    }
}

/// A DNS server as `host:port`, `ip:port` or `[v6]:port`; the port
/// defaults to 53. Host names are resolved when used, so a server that
/// moves is found again without a restart.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerAddr {
    pub host: String,
    pub port: u16,
}

impl FromStr for ServerAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || {
            format!(
                "{s:?} is not a server address like \"192.0.2.53:53\", \"[2001:db8::53]:53\" or \"ns1.example.com:53\""
            )
        };
        if let Ok(a) = SocketAddr::from_str(s) {
            return Ok(Self {
                host: a.ip().to_string(),
                port: a.port(),
            });
        }
        if let Ok(ip) = std::net::IpAddr::from_str(s) {
            return Ok(Self {
                host: ip.to_string(),
                port: 53,
            });
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| err())?),
            None => (s, 53),
        };
        let host = host.trim_end_matches('.');
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        };
        if port == 0 || host.is_empty() || !host.split('.').all(label_ok) {
            return Err(err());
        }
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
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

/// One identifier on a certificate: a DNS name, or an IP address
/// (RFC 8738), which only http-01 and tls-alpn-01 can validate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identifier {
    Dns(DnsName),
    Ip(IpLiteral),
}

impl Identifier {
    /// The identifier as certd writes it: the lower-case name, or the
    /// address in its canonical text form (RFC 5952 for IPv6).
    pub fn as_str(&self) -> &str {
        match self {
            Self::Dns(d) => d.as_str(),
            Self::Ip(ip) => ip.as_str(),
        }
    }

    pub fn is_wildcard(&self) -> bool {
        matches!(self, Self::Dns(d) if d.is_wildcard())
    }
}

impl FromStr for Identifier {
    type Err = String;

    /// An address first: `192.0.2.1` is also a well-formed run of labels.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(ip) = IpLiteral::parse(s)? {
            return Ok(Self::Ip(ip));
        }
        s.parse().map(Self::Dns)
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An IP address for an `ip` identifier, with its canonical text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpLiteral {
    addr: IpAddr,
    text: String,
}

impl IpLiteral {
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// `Ok(None)` if `s` is not meant as an address at all; an error for
    /// one that is, but that no CA can validate.
    fn parse(s: &str) -> Result<Option<Self>, String> {
        let bare = s.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
        if s.contains('%') {
            return Err(format!(
                "{s:?}: an IPv6 zone index has no meaning on a certificate"
            ));
        }
        let Ok(addr) = bare.unwrap_or(s).parse::<IpAddr>() else {
            if bare.is_some() || s.contains(':') {
                return Err(format!("{s:?} is not a valid IP address"));
            }
            return Ok(None);
        };
        if let IpAddr::V6(v6) = addr
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            return Err(format!(
                "{s:?} is an IPv4-mapped IPv6 address; write the IPv4 address {v4}"
            ));
        }
        Ok(Some(Self {
            addr,
            text: addr.to_string(),
        }))
    }
}

/// `dns_alias`: where a certificate's dns-01 records go instead of
/// `_acme-challenge.<name>`, whose CNAME points there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsAlias {
    /// A zone: each name's record is `_acme-challenge.<name>.<zone>`, so
    /// names (and certificates) sharing the zone never share a record.
    Zone(String),
    /// A full record name (its first label starts with `_`), used for
    /// every name of the certificate: values are added, never replaced.
    Record(String),
}

impl DnsAlias {
    /// The record a challenge for `identifier` writes to.
    pub fn record_for(&self, identifier: &str) -> String {
        match self {
            Self::Zone(zone) => {
                let base = identifier.strip_prefix("*.").unwrap_or(identifier);
                format!("_acme-challenge.{}.{zone}", base.trim_end_matches('.'))
            }
            Self::Record(name) => name.clone(),
        }
    }
}

impl FromStr for DnsAlias {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = domain_like(s, true)?;
        if name.parse::<std::net::IpAddr>().is_ok() || !name.contains('.') {
            return Err(format!(
                "{s:?} is not a DNS zone or record name (expected e.g. \"validation.example.net\" or \"_acme-challenge.www.validation.example.net\")"
            ));
        }
        let first = name.split('.').next().unwrap_or("");
        if first.starts_with('_') {
            return Ok(Self::Record(name));
        }
        if name.split('.').any(|l| l.contains('_')) {
            return Err(format!(
                "{s:?}: '_' may only start the first label (a full record name like \"_acme-challenge.www.validation.example.net\")"
            ));
        }
        Ok(Self::Zone(name))
    }
}

/// A certificate's name: also the name of its directory under `cert_dir`, so
/// it is restricted to characters that are safe there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CertName(String);

impl CertName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for CertName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if s.is_empty() || s.len() > 64 {
            return Err("must be 1 to 64 characters".into());
        }
        if s.starts_with('.') || !s.chars().all(ok_char) {
            return Err(format!(
                "{s:?} may only contain letters, digits, '-', '_' and '.', and may not start with '.'"
            ));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for CertName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A DNS name as ACME accepts it: lower case, at least two labels, optionally
/// a wildcard (`*.`) as the whole first label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsName(String);

impl DnsName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }
}

impl FromStr for DnsName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // An internationalized name is written as read (`bücher.example`)
        // and ordered as the CA needs it, in Punycode (`xn--bcher-kva.example`).
        let name = if s.is_ascii() {
            s.trim_end_matches('.').to_ascii_lowercase()
        } else {
            idna::domain_to_ascii(s.trim_end_matches('.')).map_err(|_| {
                format!(
                    "{s:?} is not a valid internationalized domain name; \
                     write it in Punycode (xn--…) if your registrar shows it so"
                )
            })?
        };
        if name.is_empty() {
            return Err("empty domain name".into());
        }
        if name.len() > 253 {
            return Err(format!("{s:?} is longer than 253 characters"));
        }
        let labels: Vec<&str> = name.split('.').collect();
        if labels.len() < 2 {
            return Err(format!(
                "{s:?} is not a fully qualified domain name (needs at least one dot)"
            ));
        }
        for (i, label) in labels.iter().enumerate() {
            if i == 0 && *label == "*" {
                continue;
            }
            let valid = !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
            if !valid {
                return Err(format!(
                    "{s:?} is not a valid domain name (label {label:?}: letters, digits and inner '-' only, 1 to 63 characters)"
                ));
            }
        }
        // No top-level domain is numeric: `192.0.2` is a mistyped address.
        if labels
            .last()
            .is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()))
        {
            return Err(format!(
                "{s:?} is neither an IP address nor a domain name (its last label is numeric)"
            ));
        }
        if labels.len() == 2 && labels[0] == "*" {
            return Err(format!(
                "{s:?}: a wildcard needs a parent domain below the TLD"
            ));
        }
        Ok(Self(name))
    }
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The private key algorithm of a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KeyType {
    #[default]
    EcdsaP256,
    EcdsaP384,
    Rsa2048,
    Rsa3072,
    Rsa4096,
}

impl KeyType {
    const ALL: [(&'static str, KeyType); 5] = [
        ("ecdsa-p256", KeyType::EcdsaP256),
        ("ecdsa-p384", KeyType::EcdsaP384),
        ("rsa-2048", KeyType::Rsa2048),
        ("rsa-3072", KeyType::Rsa3072),
        ("rsa-4096", KeyType::Rsa4096),
    ];

    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, k)| *k == self)
            .map(|(s, _)| *s)
            .unwrap_or("ecdsa-p256")
    }
}

impl FromStr for KeyType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, k)| *k)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|(n, _)| *n).collect();
                format!(
                    "unknown key type {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// An ACME challenge type certd can solve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChallengeKind {
    Http01,
    Dns01,
    TlsAlpn01,
    /// A standing `_validation-persist` record the operator published once
    /// (draft-ietf-acme-dns-persist): nothing to write per order.
    DnsPersist01,
}

impl ChallengeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http01 => "http-01",
            Self::Dns01 => "dns-01",
            Self::TlsAlpn01 => "tls-alpn-01",
            Self::DnsPersist01 => "dns-persist-01",
        }
    }
}

impl FromStr for ChallengeKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "http-01" => Ok(Self::Http01),
            "dns-01" => Ok(Self::Dns01),
            "tls-alpn-01" => Ok(Self::TlsAlpn01),
            "dns-persist-01" => Ok(Self::DnsPersist01),
            _ => Err(format!(
                "unknown challenge type {s:?}; expected \"http-01\", \"dns-01\", \"tls-alpn-01\" or \"dns-persist-01\""
            )),
        }
    }
}

impl fmt::Display for ChallengeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    SocketAddr::from_str(s)
        .map_err(|_| format!("{s:?} is not a socket address like \"0.0.0.0:80\" or \"[::]:80\""))
}

/// Parses the durations the config file uses: a whole number followed by
/// `s`, `m`, `h` or `d` ("90s", "15m", "1h", "7d").
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || {
        format!(
            "invalid duration {s:?}; expected a number and a unit, like \"90s\", \"15m\", \"1h\" or \"7d\""
        )
    };
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| err())?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(err()),
    };
    n.checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(err)
}

/// A zone or key name: like `DnsName` but a single label is fine (a lab's
/// zone `test`, a key `certd-key`), and key names may hold underscores.
fn domain_like(s: &str, underscore: bool) -> Result<String, String> {
    let name = s.trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || (underscore && c == '_'))
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "{s:?} is not a valid DNS name (letters, digits and inner '-'{}, 1 to 63 characters a label)",
            if underscore { " or '_'" } else { "" }
        ));
    }
    Ok(name)
}

/// Reads a base64 TSIG secret from a private file.
fn read_tsig_secret(path: &Path) -> Result<Secret, String> {
    use base64::Engine;
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
    Ok(Secret(secret))
}

/// Decodes a base64url EAB HMAC key. The error names what is wrong, never
/// the offending character or its offset: either would leak the secret.
fn decode_eab_key(path: &Path, text: &str) -> Result<Secret, String> {
    use base64::{DecodeError, Engine};
    let why = match base64::prelude::BASE64_URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')) {
        Ok(key) if key.is_empty() => "is empty",
        Ok(key) => return Ok(Secret(key)),
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

/// A configuration error, located in the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the configuration file: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
}

impl Config {
    /// Reads and validates the file at `path`.
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

    /// Validates `text` as if it had been read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: raw::Config = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let at = Located::new(path, text);
            let message = e.message().trim_end();
            // A field missing from the whole file is a missing section: the
            // span covers the document, and the table above its first line
            // is not where anything is missing.
            if let Some(field) = message
                .strip_prefix("missing field `")
                .and_then(|m| m.strip_suffix('`'))
                && span.start == 0
            {
                return at.error(
                    span,
                    Some("(top level)".into()),
                    format!("the [{field}] section is missing"),
                );
            }
            let key = at.guess_key_at(span.start);
            at.error(span, None, reword(&key, message))
        })?;
        Validator {
            at: Located::new(path, text),
        }
        .config(raw)
    }

    pub fn certificate(&self, name: &str) -> Option<&CertificateConfig> {
        self.certificates.iter().find(|c| c.name.as_str() == name)
    }

    pub fn db_path(&self) -> PathBuf {
        self.storage.state_dir.join(DB_FILE)
    }
}

/// serde's wording of a type mismatch ("invalid type: map, expected a
/// sequence") in the file's terms, with the usual fix.
fn reword(key: &str, message: &str) -> String {
    let Some((found, expected)) = message
        .strip_prefix("invalid type: ")
        .and_then(|m| m.split_once(", expected "))
    else {
        return message.to_owned();
    };
    if key == "certificate" && found == "map" {
        return "`[certificate]` must be written `[[certificate]]` (double brackets), \
                one table per certificate"
            .into();
    }
    let found = match found.split_once(' ') {
        Some(("integer", n)) => format!("the number {}", n.trim_matches('`')),
        Some(("floating", n)) => format!(
            "the number {}",
            n.trim_start_matches("point ").trim_matches('`')
        ),
        Some(("string", v)) => format!("the string {v}"),
        _ if found == "map" => "a table".into(),
        _ if found == "sequence" => "a list".into(),
        _ => found.to_owned(),
    };
    let expected = match expected {
        "a sequence" => "a list in brackets, like [\"a\", \"b\"]",
        "a string" => "a quoted string",
        "i64" | "u64" | "u32" | "i32" | "usize" => "a whole number",
        "f64" => "a number",
        "a boolean" => "true or false",
        other => other,
    };
    format!("expected {expected}, found {found}")
}

/// A path from the file: relative paths are taken from the file's directory.
fn resolve_path(config_path: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_owned()
    } else {
        config_path.parent().unwrap_or(Path::new(".")).join(p)
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
pub fn peek_state_dir(path: &Path, text: &str) -> Option<PathBuf> {
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
    Some(resolve_path(path, &dir))
}

/// Resolves byte offsets in the source text to lines, columns and key paths.
struct Located<'a> {
    path: &'a Path,
    text: &'a str,
}

impl<'a> Located<'a> {
    fn new(path: &'a Path, text: &'a str) -> Self {
        Self { path, text }
    }

    /// Builds an error at `span`; `key` overrides the key path guessed from
    /// the text (the guess is the table header above the line plus the key
    /// on the line, e.g. `certificate[1].key_type`).
    fn error(&self, span: Range<usize>, key: Option<String>, message: String) -> ConfigError {
        let offset = span.start.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line,
            column,
            key: key.unwrap_or_else(|| self.guess_key(line_start)),
            message,
        }
    }

    /// `guess_key` for the line holding `offset`.
    fn guess_key_at(&self, offset: usize) -> String {
        let offset = offset.min(self.text.len());
        self.guess_key(self.text[..offset].rfind('\n').map_or(0, |i| i + 1))
    }

    fn guess_key(&self, line_start: usize) -> String {
        let line = self.text[line_start..].lines().next().unwrap_or("");
        let table = self.table_above(line_start);
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            return table.unwrap_or_else(|| trimmed.to_owned());
        }
        let key = line.split('=').next().unwrap_or("").trim().to_owned();
        match (table, key.is_empty()) {
            (Some(t), false) => format!("{t}.{key}"),
            (Some(t), true) => t,
            (None, false) => key,
            (None, true) => "(top level)".into(),
        }
    }

    /// The table header in force at `offset`, with an index for arrays of
    /// tables (`[[certificate]]` → `certificate[N]`).
    fn table_above(&self, offset: usize) -> Option<String> {
        let mut current = None;
        let mut counts: std::collections::HashMap<String, usize> = Default::default();
        let mut pos = 0;
        for line in self.text.split_inclusive('\n') {
            if pos > offset {
                break;
            }
            let t = line.trim();
            // Up to the first `]`: a header missing one (`[[certificate]`)
            // is the error being located, and must not name the key
            // `certificate][0]`.
            if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split(']').next()) {
                let name = name.trim().to_owned();
                let n = counts.entry(name.clone()).or_insert(0);
                current = Some(format!("{name}[{n}]"));
                *n += 1;
            } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
                current = Some(name.trim().to_owned());
            }
            pos += line.len();
        }
        current
    }
}

/// The key path of a certificate's value in errors, as
/// `certificate[3].domains[1]`; formatted only when an error is reported.
struct CertKey {
    index: usize,
    field: &'static str,
    item: Option<usize>,
}

impl fmt::Display for CertKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "certificate[{}].{}", self.index, self.field)?;
        match self.item {
            Some(i) => write!(f, "[{i}]"),
            None => Ok(()),
        }
    }
}

struct Validator<'a> {
    at: Located<'a>,
}

impl Validator<'_> {
    fn config(&self, raw: raw::Config) -> Result<Config, ConfigError> {
        let resolve = |p: &str| resolve_path(self.at.path, p);

        let acme = self.acme(raw.acme, &resolve)?;
        let storage = StorageConfig {
            state_dir: resolve(&raw.storage.state_dir),
            cert_dir: resolve(&raw.storage.cert_dir),
        };
        let http01 = match raw.http01 {
            None => None,
            Some(h) => {
                let listen = h
                    .listen
                    .map(|l| self.parse_spanned(&l, "http01.listen", parse_socket_addr))
                    .transpose()?;
                if listen.is_none() && h.webroot.is_none() {
                    return Err(self.at.error(
                        h.span,
                        Some("http01".into()),
                        "set `listen` (standalone responder) or `webroot` (or both)".into(),
                    ));
                }
                let webroot = h.webroot.as_deref().map(&resolve);
                // A webroot that does not exist is refused before any order
                // (`Solvers::check`), not here: parsing reads no directory,
                // and a webroot created after the file is written is fine.
                // On by default: a failed self-check costs nothing, a
                // doomed validation costs failure budget.
                let preflight = match (h.preflight, listen) {
                    (Some(false), _) => Preflight::Off,
                    (Some(true), _) | (None, Some(_)) => Preflight::On,
                    (None, None) => Preflight::IfServed,
                };
                Some(Http01Config {
                    preflight,
                    listen,
                    webroot,
                })
            }
        };
        let dns01 = raw.dns01.map(|d| self.dns01(d, &resolve)).transpose()?;
        let tls_alpn01 = match raw.tls_alpn01 {
            None => None,
            Some(t) => Some(TlsAlpn01Config {
                listen: self.parse_spanned(&t.listen, "tls_alpn01.listen", parse_socket_addr)?,
            }),
        };
        let reaper = self.reaper(raw.reaper)?;
        let daemon = self.daemon(raw.daemon)?;
        let metrics_listen = match raw.metrics {
            Some(m) => Some(self.parse_spanned(&m.listen, "metrics.listen", parse_socket_addr)?),
            None => None,
        };
        let notify = match raw.notify {
            None => None,
            Some(n) => Some(NotifyConfig {
                command: n.command,
                after_failures: match n.after_failures {
                    Some(v) => self.positive(&v, "notify.after_failures")?,
                    None => 3,
                },
                timeout: match n.timeout {
                    Some(t) => self.duration(&t, "notify.timeout")?,
                    None => Duration::from_secs(30),
                },
            }),
        };

        let mut certificates = Vec::with_capacity(raw.certificate.len());
        let mut names = HashSet::new();
        // Each (domain, key type) with the certificate that first lists it.
        let mut owners: HashMap<(String, KeyType), String> = HashMap::new();
        for (i, c) in raw.certificate.into_iter().enumerate() {
            let solvers = (http01.is_some(), dns01.is_some(), tls_alpn01.is_some());
            let spans = c
                .domains
                .get_ref()
                .iter()
                .map(|d| d.span())
                .collect::<Vec<_>>();
            let cert = self.certificate(i, c, solvers, &mut names)?;
            // Two certificates for one name and key type are two orders for
            // it, each renewed on its own, against the CA's duplicate
            // limits; which one a web server uses is left to chance. With
            // different key types they are the usual RSA-beside-ECDSA
            // setup, which web servers pick from by the client's support.
            for (j, domain) in cert.domains.iter().enumerate() {
                if let Some(first) = owners.insert(
                    (domain.as_str().to_owned(), cert.key_type),
                    cert.name.as_str().to_owned(),
                ) {
                    return Err(self.at.error(
                        spans[j].clone(),
                        Some(format!("certificate[{i}].domains[{j}]")),
                        format!(
                            "{:?} is also in certificate {first:?} with the same key type: a name belongs in one certificate per key type",
                            domain.as_str()
                        ),
                    ));
                }
            }
            certificates.push(cert);
        }

        Ok(Config {
            path: self.at.path.to_owned(),
            acme,
            storage,
            http01,
            dns01,
            tls_alpn01,
            reaper,
            daemon,
            metrics_listen,
            notify,
            certificates,
        })
    }

    fn dns01(
        &self,
        d: raw::Dns01,
        resolve: &impl Fn(&str) -> PathBuf,
    ) -> Result<Dns01Config, ConfigError> {
        let mode = match (d.hook, d.rfc2136) {
            (Some(hook), None) => Dns01Mode::Hook(resolve(hook.get_ref())),
            (None, Some(r)) => Dns01Mode::Rfc2136(self.rfc2136(r, resolve)?),
            (Some(hook), Some(_)) => {
                return Err(self.at.error(
                    hook.span(),
                    Some("dns01.hook".into()),
                    "set either `hook` or a [dns01.rfc2136] section, not both".into(),
                ));
            }
            (None, None) => {
                return Err(self.at.error(
                    d.span,
                    Some("dns01".into()),
                    "set `hook` (a program of yours) or a [dns01.rfc2136] section (dynamic update)"
                        .into(),
                ));
            }
        };
        let hook_timeout = match d.hook_timeout {
            Some(t) => self.duration(&t, "dns01.hook_timeout")?,
            None => Duration::from_secs(120),
        };
        let mut propagation = PropagationConfig::default();
        if let Some(b) = d.propagation_check {
            propagation.enabled = b;
        }
        if let Some(t) = d.propagation_timeout {
            propagation.timeout = self.duration(&t, "dns01.propagation_timeout")?;
            if propagation.timeout.is_zero() {
                return Err(self.at.error(
                    t.span(),
                    Some("dns01.propagation_timeout".into()),
                    "must be greater than zero (set propagation_check = false to skip the check)"
                        .into(),
                ));
            }
        }
        for (i, ns) in d.nameservers.iter().enumerate() {
            let key = format!("dns01.nameservers[{i}]");
            propagation
                .nameservers
                .push(self.parse_spanned(ns, &key, |s| s.parse())?);
        }
        Ok(Dns01Config {
            mode,
            hook_timeout,
            propagation,
        })
    }

    fn rfc2136(
        &self,
        r: raw::Rfc2136,
        resolve: &impl Fn(&str) -> PathBuf,
    ) -> Result<Rfc2136Config, ConfigError> {
        let server = self.parse_spanned(&r.server, "dns01.rfc2136.server", |s| s.parse())?;
        let zone = r
            .zone
            .map(|z| self.parse_spanned(&z, "dns01.rfc2136.zone", |s| domain_like(s, false)))
            .transpose()?;
        let key_name = self.parse_spanned(&r.key_name, "dns01.rfc2136.key_name", |s| {
            domain_like(s, true)
        })?;
        let algorithm = match &r.algorithm {
            Some(a) => self.parse_spanned(a, "dns01.rfc2136.algorithm", |s| s.parse())?,
            None => TsigAlgorithm::default(),
        };
        let key = "dns01.rfc2136.secret_file";
        let secret = self.parse_spanned(&r.secret_file, key, |s| read_tsig_secret(&resolve(s)))?;
        Ok(Rfc2136Config {
            server,
            zone,
            key_name,
            algorithm,
            secret,
        })
    }

    fn daemon(&self, raw: Option<raw::Daemon>) -> Result<DaemonConfig, ConfigError> {
        let mut cfg = DaemonConfig::default();
        let Some(raw) = raw else { return Ok(cfg) };
        if let Some(n) = raw.max_concurrent {
            cfg.max_concurrent = self.positive(&n, "daemon.max_concurrent")? as usize;
        }
        if let Some(f) = raw.renew_remaining {
            let v = *f.get_ref();
            if !(v > 0.0 && v < 1.0) {
                return Err(self.at.error(
                    f.span(),
                    Some("daemon.renew_remaining".into()),
                    format!("must be a fraction between 0 and 1 (exclusive), not {v}"),
                ));
            }
            cfg.renew_remaining = v;
        }
        if let Some(d) = raw.ari_interval {
            cfg.ari_interval = self.duration(&d, "daemon.ari_interval")?;
        }
        if let Some(d) = raw.backoff_min {
            cfg.backoff_min = self.duration(&d, "daemon.backoff_min")?;
        }
        if let Some(d) = raw.backoff_max {
            cfg.backoff_max = self.duration(&d, "daemon.backoff_max")?;
            if cfg.backoff_max < cfg.backoff_min {
                return Err(self.at.error(
                    d.span(),
                    Some("daemon.backoff_max".into()),
                    "must not be shorter than backoff_min".into(),
                ));
            }
        }
        if let Some(d) = raw.shutdown_grace {
            cfg.shutdown_grace = self.duration(&d, "daemon.shutdown_grace")?;
        }
        if let Some(l) = raw.log_level {
            let level = self.parse_spanned(&l, "daemon.log_level", |s| match s {
                "error" | "warn" | "info" | "debug" | "trace" => Ok(s.to_owned()),
                _ => Err(format!("{s:?}: expected error, warn, info, debug or trace")),
            })?;
            cfg.log_level = level;
        }
        Ok(cfg)
    }

    fn acme(
        &self,
        raw: raw::Acme,
        resolve: &impl Fn(&str) -> PathBuf,
    ) -> Result<AcmeConfig, ConfigError> {
        let directory = self.parse_spanned(&raw.directory, "acme.directory", |s| {
            let url = Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
            if url.scheme() != "https" {
                return Err(format!("{s:?}: the ACME directory must be an https:// URL"));
            }
            Ok(url)
        })?;
        let mut contact = Vec::new();
        for (i, c) in raw.contact.iter().enumerate() {
            let key = format!("acme.contact[{i}]");
            let value = self.parse_spanned(c, &key, |s| {
                let addr = s.strip_prefix("mailto:").ok_or_else(|| {
                    format!("{s:?} must be a mailto: URL, like \"mailto:ops@example.com\"")
                })?;
                if !addr.contains('@') || addr.contains(char::is_whitespace) {
                    return Err(format!("{s:?} is not a valid e-mail address"));
                }
                Ok(s.to_owned())
            })?;
            contact.push(value);
        }
        let ca_bundle = match raw.ca_bundle {
            None => None,
            Some(p) => {
                let path = resolve(p.get_ref());
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    self.at.error(
                        p.span(),
                        Some("acme.ca_bundle".into()),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                if !text.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(self.at.error(
                        p.span(),
                        Some("acme.ca_bundle".into()),
                        format!("{} contains no PEM certificate", path.display()),
                    ));
                }
                Some(path)
            }
        };
        let eab = match (&raw.eab_kid, &raw.eab_hmac_key_file) {
            (None, None) => None,
            (Some(kid), Some(file)) => {
                let path = resolve(file.get_ref());
                let key = read_secret_file(&path).and_then(|text| decode_eab_key(&path, &text));
                let key = key.map_err(|m| {
                    self.at
                        .error(file.span(), Some("acme.eab_hmac_key_file".into()), m)
                })?;
                Some(Eab {
                    kid: kid.get_ref().clone(),
                    hmac_key: key,
                })
            }
            (Some(kid), None) => {
                return Err(self.at.error(
                    kid.span(),
                    Some("acme.eab_kid".into()),
                    "needs eab_hmac_key_file as well".into(),
                ));
            }
            (None, Some(file)) => {
                return Err(self.at.error(
                    file.span(),
                    Some("acme.eab_hmac_key_file".into()),
                    "needs eab_kid as well".into(),
                ));
            }
        };
        let trusted_roots = match raw.trusted_roots {
            None => None,
            Some(p) => Some(TrustedRoots::load(&resolve(p.get_ref())).map_err(|m| {
                self.at
                    .error(p.span(), Some("acme.trusted_roots".into()), m)
            })?),
        };
        Ok(AcmeConfig {
            directory,
            contact,
            ca_bundle,
            eab,
            trusted_roots,
        })
    }

    fn reaper(&self, raw: Option<raw::Reaper>) -> Result<ReaperConfig, ConfigError> {
        let mut cfg = ReaperConfig::default();
        let Some(raw) = raw else { return Ok(cfg) };
        if let Some(d) = raw.pending_max_age {
            cfg.pending_max_age = self.duration(&d, "reaper.pending_max_age")?;
        }
        if let Some(d) = raw.interval {
            cfg.interval = self.duration(&d, "reaper.interval")?;
            if cfg.interval.is_zero() {
                return Err(self.at.error(
                    d.span(),
                    Some("reaper.interval".into()),
                    "must be greater than zero".into(),
                ));
            }
        }
        if let Some(n) = raw.max_pending {
            cfg.max_pending = self.positive(&n, "reaper.max_pending")?;
        }
        if let Some(n) = raw.failed_authz_per_identifier_per_hour {
            cfg.failed_authz_per_identifier_per_hour =
                self.positive(&n, "reaper.failed_authz_per_identifier_per_hour")?;
        }
        if let Some(b) = raw.deactivate_valid_after_issue {
            cfg.deactivate_valid_after_issue = b;
        }
        if let Some(n) = raw.new_orders_per_3h {
            cfg.new_orders_per_3h = self.positive(&n, "reaper.new_orders_per_3h")?;
        }
        if let Some(n) = raw.duplicate_certificates_per_week {
            cfg.duplicate_certificates_per_week =
                self.positive(&n, "reaper.duplicate_certificates_per_week")?;
        }
        Ok(cfg)
    }

    /// `solvers`: whether [http01], [dns01] and [tls_alpn01] are configured.
    fn certificate(
        &self,
        index: usize,
        raw: raw::Certificate,
        solvers: (bool, bool, bool),
        names: &mut HashSet<String>,
    ) -> Result<CertificateConfig, ConfigError> {
        let key = |field| CertKey {
            index,
            field,
            item: None,
        };
        let item = |field, i| CertKey {
            index,
            field,
            item: Some(i),
        };
        let name: CertName = self.parse_spanned(&raw.name, key("name"), |s| s.parse())?;
        if !names.insert(name.as_str().to_owned()) {
            return Err(self.at.error(
                raw.name.span(),
                Some(key("name").to_string()),
                format!("duplicate certificate name {:?}", name.as_str()),
            ));
        }

        if raw.domains.get_ref().is_empty() {
            return Err(self.at.error(
                raw.domains.span(),
                Some(key("domains").to_string()),
                "needs at least one domain".into(),
            ));
        }
        let mut domains: Vec<Identifier> = Vec::with_capacity(raw.domains.get_ref().len());
        for (i, d) in raw.domains.get_ref().iter().enumerate() {
            let domain: Identifier = self.parse_spanned(d, item("domains", i), |s| s.parse())?;
            // A linear scan: certificates list a handful of names, and a
            // set per certificate would cost more than it saves.
            if domains.contains(&domain) {
                return Err(self.at.error(
                    d.span(),
                    Some(item("domains", i).to_string()),
                    format!("duplicate identifier {:?}", domain.as_str()),
                ));
            }
            domains.push(domain);
        }

        let key_type = match &raw.key_type {
            Some(k) => self.parse_spanned(k, key("key_type"), |s| s.parse())?,
            None => KeyType::default(),
        };

        let challenges = match &raw.challenges {
            None => vec![ChallengeKind::Http01],
            Some(list) => {
                if list.get_ref().is_empty() {
                    return Err(self.at.error(
                        list.span(),
                        Some(key("challenges").to_string()),
                        "needs at least one challenge type".into(),
                    ));
                }
                let mut out = Vec::new();
                for (i, c) in list.get_ref().iter().enumerate() {
                    let kind: ChallengeKind =
                        self.parse_spanned(c, item("challenges", i), |s| s.parse())?;
                    if out.contains(&kind) {
                        return Err(self.at.error(
                            c.span(),
                            Some(item("challenges", i).to_string()),
                            format!("{kind} is listed twice"),
                        ));
                    }
                    out.push(kind);
                }
                out
            }
        };
        let challenges_span = raw
            .challenges
            .as_ref()
            .map_or(raw.name.span(), |c| c.span());
        for kind in &challenges {
            let missing = match kind {
                ChallengeKind::Http01 if !solvers.0 => Some("[http01]"),
                ChallengeKind::Dns01 if !solvers.1 => Some("[dns01]"),
                ChallengeKind::TlsAlpn01 if !solvers.2 => Some("[tls_alpn01]"),
                _ => None,
            };
            if let Some(section) = missing {
                return Err(self.at.error(
                    challenges_span.clone(),
                    Some(key("challenges").to_string()),
                    format!(
                        "certificate {:?} uses {kind} but the config has no {section} section",
                        name.as_str()
                    ),
                ));
            }
        }
        if let Some(w) = domains.iter().find(|d| d.is_wildcard())
            && !challenges
                .iter()
                .any(|k| matches!(k, ChallengeKind::Dns01 | ChallengeKind::DnsPersist01))
        {
            return Err(self.at.error(
                challenges_span,
                Some(key("challenges").to_string()),
                format!(
                    "certificate {:?} has the wildcard {:?}, which only dns-01 (or dns-persist-01) can validate; add \"dns-01\" to challenges",
                    name.as_str(),
                    w.as_str()
                ),
            ));
        }

        // RFC 8738 section 7: no dns-01 for an address. dns-01 may still
        // stand in the list for the certificate's DNS names, as long as
        // another type can validate the addresses.
        if let Some(ip) = domains.iter().find(|d| matches!(d, Identifier::Ip(_)))
            && !challenges
                .iter()
                .any(|k| matches!(k, ChallengeKind::Http01 | ChallengeKind::TlsAlpn01))
        {
            return Err(self.at.error(
                challenges_span,
                Some(key("challenges").to_string()),
                format!(
                    "certificate {:?} has the IP address {:?}, which dns-01 cannot validate (RFC 8738); use \"http-01\" or \"tls-alpn-01\"",
                    name.as_str(),
                    ip.as_str()
                ),
            ));
        }

        let reload_timeout = match &raw.reload_timeout {
            Some(t) => self.duration(t, key("reload_timeout"))?,
            None => Duration::from_secs(60),
        };

        let profile = self.profile(&raw, index)?;

        let dns_alias = match &raw.dns_alias {
            Some(a) => {
                let alias: DnsAlias = self.parse_spanned(a, key("dns_alias"), |s| s.parse())?;
                if !challenges.contains(&ChallengeKind::Dns01) {
                    return Err(self.at.error(
                        a.span(),
                        Some(key("dns_alias").to_string()),
                        format!(
                            "certificate {:?} sets dns_alias but does not use dns-01; add \"dns-01\" to challenges",
                            name.as_str()
                        ),
                    ));
                }
                Some(alias)
            }
            None => None,
        };

        Ok(CertificateConfig {
            name,
            domains,
            key_type,
            challenges,
            reload: raw.reload,
            reload_timeout,
            profile,
            reuse_key: raw.reuse_key,
            dns_alias,
        })
    }

    /// `profile` (one name or a list, best first) and `profile_required`.
    fn profile(
        &self,
        raw: &raw::Certificate,
        index: usize,
    ) -> Result<ProfilePreference, ConfigError> {
        let key = |field| CertKey {
            index,
            field,
            item: None,
        };
        let check = |value: &Spanned<String>, at: CertKey| {
            self.parse_spanned(value, at, |s| {
                if s.is_empty() || !s.chars().all(|c| c.is_ascii_graphic() && c != ',') {
                    Err(format!("{s:?} is not a profile name"))
                } else {
                    Ok(s.to_owned())
                }
            })
        };
        let mut names: Vec<String> = Vec::new();
        if let Some(profile) = &raw.profile {
            let span = profile.span();
            match profile.get_ref() {
                // The visitor sees no span of its own: the key's is the value's.
                raw::Profile::One(p) => {
                    names.push(check(&Spanned::new(span, p.clone()), key("profile"))?);
                }
                raw::Profile::List(list) if list.is_empty() => {
                    return Err(self.at.error(
                        span,
                        Some(key("profile").to_string()),
                        "an empty list; leave `profile` out to let the CA choose".into(),
                    ));
                }
                raw::Profile::List(list) => {
                    for (i, p) in list.iter().enumerate() {
                        let at = || CertKey {
                            index,
                            field: "profile",
                            item: Some(i),
                        };
                        let name = check(p, at())?;
                        if names.contains(&name) {
                            return Err(self.at.error(
                                p.span(),
                                Some(at().to_string()),
                                format!("profile {name:?} is listed twice"),
                            ));
                        }
                        names.push(name);
                    }
                }
            }
        }
        let required = match &raw.profile_required {
            None => false,
            Some(r) if *r.get_ref() && names.is_empty() => {
                return Err(self.at.error(
                    r.span(),
                    Some(key("profile_required").to_string()),
                    "is true, but no `profile` is set".into(),
                ));
            }
            Some(r) => *r.get_ref(),
        };
        Ok(ProfilePreference { names, required })
    }

    /// `key` is only formatted for an error: a configuration of 10,000
    /// certificates has 30,000 values that parse fine.
    fn parse_spanned<T>(
        &self,
        value: &Spanned<impl AsRef<str>>,
        key: impl fmt::Display,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        parse(value.get_ref().as_ref())
            .map_err(|m| self.at.error(value.span(), Some(key.to_string()), m))
    }

    fn duration(
        &self,
        value: &Spanned<String>,
        key: impl fmt::Display,
    ) -> Result<Duration, ConfigError> {
        self.parse_spanned(value, key, parse_duration)
    }

    fn positive(&self, value: &Spanned<i64>, key: &str) -> Result<u32, ConfigError> {
        u32::try_from(*value.get_ref())
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                self.at.error(
                    value.span(),
                    Some(key.to_owned()),
                    format!("must be a whole number from 1 to {}", u32::MAX),
                )
            })
    }
}

/// The file's shape as serde sees it. Spanned fields are checked further by
/// the `Validator`; `deny_unknown_fields` turns typos into errors.
mod raw {
    use std::ops::Range;

    use serde::Deserialize;
    use toml::Spanned;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Config {
        pub acme: Acme,
        pub storage: Storage,
        pub http01: Option<Http01>,
        pub dns01: Option<Dns01>,
        pub tls_alpn01: Option<TlsAlpn01>,
        pub reaper: Option<Reaper>,
        pub daemon: Option<Daemon>,
        pub metrics: Option<Metrics>,
        pub notify: Option<Notify>,
        #[serde(default)]
        pub certificate: Vec<Certificate>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Metrics {
        pub listen: Spanned<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Notify {
        pub command: String,
        pub after_failures: Option<Spanned<i64>>,
        pub timeout: Option<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Daemon {
        pub max_concurrent: Option<Spanned<i64>>,
        pub renew_remaining: Option<Spanned<f64>>,
        pub backoff_min: Option<Spanned<String>>,
        pub backoff_max: Option<Spanned<String>>,
        pub ari_interval: Option<Spanned<String>>,
        pub shutdown_grace: Option<Spanned<String>>,
        pub log_level: Option<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Acme {
        pub directory: Spanned<String>,
        #[serde(default)]
        pub contact: Vec<Spanned<String>>,
        pub ca_bundle: Option<Spanned<String>>,
        pub eab_kid: Option<Spanned<String>>,
        pub eab_hmac_key_file: Option<Spanned<String>>,
        pub trusted_roots: Option<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct TlsAlpn01 {
        pub listen: Spanned<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Storage {
        pub state_dir: String,
        pub cert_dir: String,
    }

    pub(super) struct Http01 {
        pub listen: Option<Spanned<String>>,
        pub webroot: Option<String>,
        pub preflight: Option<bool>,
        pub span: Range<usize>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Http01Fields {
        listen: Option<Spanned<String>>,
        webroot: Option<String>,
        preflight: Option<bool>,
    }

    // The section's own span lets "set listen or webroot" point at it.
    impl<'de> Deserialize<'de> for Http01 {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let spanned = Spanned::<Http01Fields>::deserialize(d)?;
            let span = spanned.span();
            let fields = spanned.into_inner();
            Ok(Self {
                listen: fields.listen,
                webroot: fields.webroot,
                preflight: fields.preflight,
                span,
            })
        }
    }

    pub(super) struct Dns01 {
        pub hook: Option<Spanned<String>>,
        pub hook_timeout: Option<Spanned<String>>,
        pub propagation_check: Option<bool>,
        pub propagation_timeout: Option<Spanned<String>>,
        pub nameservers: Vec<Spanned<String>>,
        pub rfc2136: Option<Rfc2136>,
        pub span: Range<usize>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Dns01Fields {
        hook: Option<Spanned<String>>,
        hook_timeout: Option<Spanned<String>>,
        propagation_check: Option<bool>,
        propagation_timeout: Option<Spanned<String>>,
        #[serde(default)]
        nameservers: Vec<Spanned<String>>,
        rfc2136: Option<Rfc2136>,
    }

    // The section's own span lets "set hook or [dns01.rfc2136]" point at it.
    impl<'de> Deserialize<'de> for Dns01 {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let spanned = Spanned::<Dns01Fields>::deserialize(d)?;
            let span = spanned.span();
            let f = spanned.into_inner();
            Ok(Self {
                hook: f.hook,
                hook_timeout: f.hook_timeout,
                propagation_check: f.propagation_check,
                propagation_timeout: f.propagation_timeout,
                nameservers: f.nameservers,
                rfc2136: f.rfc2136,
                span,
            })
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Rfc2136 {
        pub server: Spanned<String>,
        pub zone: Option<Spanned<String>>,
        pub key_name: Spanned<String>,
        pub algorithm: Option<Spanned<String>>,
        pub secret_file: Spanned<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Reaper {
        pub pending_max_age: Option<Spanned<String>>,
        pub interval: Option<Spanned<String>>,
        pub max_pending: Option<Spanned<i64>>,
        pub failed_authz_per_identifier_per_hour: Option<Spanned<i64>>,
        pub deactivate_valid_after_issue: Option<bool>,
        pub new_orders_per_3h: Option<Spanned<i64>>,
        pub duplicate_certificates_per_week: Option<Spanned<i64>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Certificate {
        pub name: Spanned<String>,
        pub domains: Spanned<Vec<Spanned<String>>>,
        pub key_type: Option<Spanned<String>>,
        pub challenges: Option<Spanned<Vec<Spanned<String>>>>,
        #[serde(default)]
        pub reload: Vec<String>,
        pub reload_timeout: Option<Spanned<String>>,
        pub profile: Option<Spanned<Profile>>,
        pub profile_required: Option<Spanned<bool>>,
        #[serde(default)]
        pub reuse_key: bool,
        pub dns_alias: Option<Spanned<String>>,
    }

    /// `profile = "name"` or `profile = ["first", "second"]`; anything
    /// else is refused by serde, with the key's position.
    pub(super) enum Profile {
        One(String),
        List(Vec<Spanned<String>>),
    }

    impl<'de> Deserialize<'de> for Profile {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visitor;
            impl<'de> serde::de::Visitor<'de> for Visitor {
                type Value = Profile;

                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str(
                        "a profile name or a list of them, best first, like [\"tlsserver\", \"classic\"]",
                    )
                }

                fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Profile, E> {
                    Ok(Profile::One(v.to_owned()))
                }

                fn visit_seq<A: serde::de::SeqAccess<'de>>(
                    self,
                    mut seq: A,
                ) -> Result<Profile, A::Error> {
                    let mut list = Vec::new();
                    while let Some(item) = seq.next_element::<Spanned<String>>()? {
                        list.push(item);
                    }
                    Ok(Profile::List(list))
                }
            }
            d.deserialize_any(Visitor)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/certd/config.toml"), text)
    }

    const BASE: &str = r#"
[acme]
directory = "https://acme.example/dir"
contact = ["mailto:ops@example.com"]

[storage]
state_dir = "state"
cert_dir = "/srv/certs"

[http01]
listen = "127.0.0.1:5002"
"#;

    fn with_cert(cert: &str) -> String {
        format!("{BASE}\n[[certificate]]\n{cert}\n")
    }

    fn expect_error(text: &str, line: usize, key: &str, needle: &str) {
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

    #[test]
    fn valid_config_resolves_relative_paths_and_defaults() {
        let cfg = parse(&with_cert(
            r#"name = "www"
domains = ["Example.COM", "www.example.com."]"#,
        ))
        .expect("valid");
        assert_eq!(cfg.storage.state_dir, Path::new("/etc/certd/state"));
        assert_eq!(cfg.storage.cert_dir, Path::new("/srv/certs"));
        let c = &cfg.certificates[0];
        assert_eq!(c.domain_strings(), ["example.com", "www.example.com"]);
        assert_eq!(c.key_type, KeyType::EcdsaP256);
        assert_eq!(c.challenges, [ChallengeKind::Http01]);
        assert_eq!(cfg.reaper.max_pending, 100);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = with_cert("name = \"www\"\ndomains = [\"a.example\"]\nkeytype = \"rsa-2048\"");
        expect_error(
            &text,
            16,
            "certificate[0].keytype",
            "unknown field `keytype`",
        );
    }

    #[test]
    fn malformed_domain_names_index() {
        let text = with_cert("name = \"www\"\ndomains = [\"a.example\", \"bad domain.example\"]");
        expect_error(
            &text,
            15,
            "certificate[0].domains[1]",
            "not a valid domain name",
        );
    }

    #[test]
    fn duplicate_names_point_at_second() {
        let text = format!(
            "{}\n[[certificate]]\nname = \"www\"\ndomains = [\"b.example\"]\n",
            with_cert("name = \"www\"\ndomains = [\"a.example\"]")
        );
        expect_error(
            &text,
            18,
            "certificate[1].name",
            "duplicate certificate name",
        );
    }

    #[test]
    fn empty_domains_and_bad_key_type() {
        expect_error(
            &with_cert("name = \"www\"\ndomains = []"),
            15,
            "certificate[0].domains",
            "at least one domain",
        );
        expect_error(
            &with_cert("name = \"www\"\ndomains = [\"a.example\"]\nkey_type = \"dsa\""),
            16,
            "certificate[0].key_type",
            "unknown key type",
        );
    }

    #[test]
    fn wrong_type_guesses_key_from_line() {
        let text = with_cert("name = \"www\"\ndomains = [\"a.example\"]\nkey_type = 5");
        expect_error(
            &text,
            16,
            "certificate[0].key_type",
            "expected a quoted string, found the number 5",
        );
    }

    #[test]
    fn bad_url_and_contact() {
        let text = BASE.replace("https://acme.example/dir", "ftp://x");
        expect_error(&text, 3, "acme.directory", "https://");
        let text = BASE.replace("mailto:ops@example.com", "ops@example.com");
        expect_error(&text, 4, "acme.contact[0]", "mailto:");
    }

    #[test]
    fn challenge_needs_its_section_and_wildcards_need_dns() {
        let text = with_cert("name = \"w\"\ndomains = [\"a.example\"]\nchallenges = [\"dns-01\"]");
        expect_error(&text, 16, "certificate[0].challenges", "no [dns01] section");
        let text = with_cert("name = \"w\"\ndomains = [\"*.a.example\"]");
        expect_error(&text, 14, "certificate[0].challenges", "only dns-01");
    }

    /// IP literals become `ip` identifiers in canonical form; what no CA
    /// can validate, or what looks like a mistyped address, is refused.
    #[test]
    fn domains_take_ip_addresses() {
        let id = |s: &str| s.parse::<Identifier>();
        assert!(matches!(id("192.0.2.1"), Ok(Identifier::Ip(ip)) if ip.as_str() == "192.0.2.1"));
        assert!(
            matches!(id("2001:DB8:0::1"), Ok(Identifier::Ip(ip)) if ip.as_str() == "2001:db8::1")
        );
        assert!(matches!(id("[::1]"), Ok(Identifier::Ip(ip)) if ip.as_str() == "::1"));
        assert!(matches!(id("www.example.com"), Ok(Identifier::Dns(_))));
        for (bad, why) in [
            ("fe80::1%eth0", "zone"),
            ("::ffff:192.0.2.1", "IPv4-mapped"),
            ("2001:db8::g", "not a valid IP address"),
            ("[a.example]", "not a valid IP address"),
            ("192.0.2", "neither an IP address nor a domain name"),
            ("192.0.2.256", "neither"),
        ] {
            let e = id(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }

        let text = with_cert("name = \"ip\"\ndomains = [\"example.com\", \"::1\", \"127.0.0.1\"]");
        let c = parse(&text).expect("valid").certificates.remove(0);
        assert_eq!(c.domain_strings(), ["example.com", "::1", "127.0.0.1"]);
        assert!(c.has_ip());
        let text = with_cert("name = \"ip\"\ndomains = [\"::1\", \"0:0::1\"]");
        expect_error(
            &text,
            15,
            "certificate[0].domains[1]",
            "duplicate identifier \"::1\"",
        );
    }

    /// dns-01 cannot validate an address (RFC 8738); it may stay in the
    /// list for the DNS names beside one that can.
    #[test]
    fn ip_addresses_need_http_or_tls_alpn() {
        let dns = "[dns01]\nhook = \"/bin/true\"\n";
        let text = format!(
            "{BASE}{dns}[[certificate]]\nname = \"ip\"\ndomains = [\"192.0.2.1\"]\nchallenges = [\"dns-01\"]\n"
        );
        expect_error(
            &text,
            17,
            "certificate[0].challenges",
            "dns-01 cannot validate",
        );
        let text = format!(
            "{BASE}{dns}[[certificate]]\nname = \"ip\"\ndomains = [\"*.a.example\", \"192.0.2.1\"]\nchallenges = [\"dns-01\", \"http-01\"]\n"
        );
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn profile_is_a_name_or_a_preference_list() {
        let profile = |extra: &str| {
            let text = with_cert(&format!("name = \"w\"\ndomains = [\"a.example\"]\n{extra}"));
            parse(&text).map(|mut c| c.certificates.remove(0).profile)
        };
        let p = profile("").expect("valid");
        assert_eq!(
            (p.names.len(), p.required, p.ledger_key()),
            (0, false, String::new())
        );
        let p = profile("profile = \"tlsserver\"").expect("valid");
        assert_eq!((p.names, p.required), (vec!["tlsserver".to_owned()], false));
        let p = profile("profile = [\"tlsserver\", \"classic\"]\nprofile_required = true")
            .expect("valid");
        assert_eq!(p.ledger_key(), "tlsserver,classic!");

        let cert =
            |extra: &str| with_cert(&format!("name = \"w\"\ndomains = [\"a.example\"]\n{extra}"));
        expect_error(
            &cert("profile = 5"),
            16,
            "certificate[0].profile",
            "a profile name or a list",
        );
        expect_error(
            &cert("profile = { a = 1 }"),
            16,
            "certificate[0].profile",
            "a profile name or a list",
        );
        expect_error(
            &cert("profile = [\"a\", 5]"),
            16,
            "certificate[0].profile",
            "found the number 5",
        );
        expect_error(
            &cert("profile = []"),
            16,
            "certificate[0].profile",
            "empty list",
        );
        expect_error(
            &cert("profile = [\"a\", \"a b\"]"),
            16,
            "certificate[0].profile[1]",
            "not a profile name",
        );
        expect_error(
            &cert("profile = [\"a\", \"a\"]"),
            16,
            "certificate[0].profile[1]",
            "listed twice",
        );
        expect_error(
            &cert("profile_required = true"),
            16,
            "certificate[0].profile_required",
            "no `profile`",
        );
        expect_error(
            &cert("profile_required = \"yes\""),
            16,
            "certificate[0].profile_required",
            "expected true or false, found the string \"yes\"",
        );
    }

    /// A 0600 file holding a base64 secret; the directory must outlive the test.
    fn secret_file(mode: u32) -> (tempfile::TempDir, String) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tsig.key");
        std::fs::write(&path, "c2VjcmV0LWJ5dGVz\n").expect("write secret");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let path = path.display().to_string();
        (dir, path)
    }

    #[test]
    fn dns01_hook_with_propagation_defaults_and_overrides() {
        let cfg = parse(&format!("{BASE}\n[dns01]\nhook = \"hooks/dns\"\n")).expect("valid");
        let d = cfg.dns01.expect("dns01");
        assert_eq!(
            d.mode,
            Dns01Mode::Hook(PathBuf::from("/etc/certd/hooks/dns"))
        );
        assert_eq!(d.propagation, PropagationConfig::default());
        assert!(d.propagation.enabled);
        assert_eq!(d.propagation.timeout, Duration::from_secs(120));

        let text = format!(
            "{BASE}\n[dns01]\nhook = \"/h\"\npropagation_check = false\npropagation_timeout = \"30s\"\nnameservers = [\"127.0.0.1:8053\", \"ns1.example.com\", \"[::1]:53\"]\n"
        );
        let p = parse(&text)
            .expect("valid")
            .dns01
            .expect("dns01")
            .propagation;
        assert!(!p.enabled);
        assert_eq!(p.timeout, Duration::from_secs(30));
        let ns: Vec<String> = p.nameservers.iter().map(|n| n.to_string()).collect();
        assert_eq!(ns, ["127.0.0.1:8053", "ns1.example.com:53", "[::1]:53"]);

        let text =
            format!("{BASE}\n[dns01]\nhook = \"/h\"\nnameservers = [\"ns1.example.com:99999\"]\n");
        expect_error(&text, 15, "dns01.nameservers[0]", "not a server address");
        let text = format!("{BASE}\n[dns01]\nhook = \"/h\"\npropagation_timeout = \"0s\"\n");
        expect_error(&text, 15, "dns01.propagation_timeout", "greater than zero");
    }

    #[test]
    fn dns_alias_is_a_zone_or_a_record_name_and_needs_dns01() {
        let cert = |extra: &str| {
            format!(
                "{BASE}\n[dns01]\nhook = \"/h\"\n\n[[certificate]]\nname = \"a\"\ndomains = [\"*.a.example\", \"a.example\"]\nchallenges = [\"dns-01\"]\n{extra}\n"
            )
        };
        let alias = |text: &str| {
            parse(text).expect("valid").certificates[0]
                .dns_alias
                .clone()
        };
        let zone = alias(&cert("dns_alias = \"Validation.Example.NET.\""));
        assert_eq!(zone, Some(DnsAlias::Zone("validation.example.net".into())));
        let zone = zone.expect("alias");
        assert_eq!(
            zone.record_for("*.a.example"),
            "_acme-challenge.a.example.validation.example.net"
        );
        let record = alias(&cert(
            "dns_alias = \"_acme-challenge.x.validation.example.net\"",
        ))
        .expect("alias");
        assert_eq!(
            record.record_for("a.example"),
            "_acme-challenge.x.validation.example.net"
        );
        assert_eq!(alias(&cert("")), None);

        for bad in ["not a zone", "net", "192.0.2.1", "a_b.example.net"] {
            let text = cert(&format!("dns_alias = {bad:?}"));
            expect_error(&text, 20, "certificate[0].dns_alias", bad);
        }
        let text = format!(
            "{BASE}\n[[certificate]]\nname = \"a\"\ndomains = [\"a.example\"]\ndns_alias = \"v.example\"\n"
        );
        expect_error(&text, 16, "certificate[0].dns_alias", "does not use dns-01");
    }

    #[test]
    fn dns_persist_01_needs_no_section_and_may_cover_wildcards() {
        let text = format!(
            "{BASE}\n[[certificate]]\nname = \"p\"\ndomains = [\"*.p.example\", \"p.example\"]\nchallenges = [\"dns-persist-01\", \"http-01\"]\n"
        );
        let cfg = parse(&text).expect("valid");
        assert_eq!(
            cfg.certificates[0].challenges,
            [ChallengeKind::DnsPersist01, ChallengeKind::Http01]
        );
        assert_eq!(ChallengeKind::DnsPersist01.as_str(), "dns-persist-01");
    }

    #[test]
    fn dns01_needs_exactly_one_of_hook_and_rfc2136() {
        let text = format!("{BASE}\n[dns01]\nhook_timeout = \"10s\"\n");
        expect_error(&text, 13, "dns01", "set `hook`");
        let (_dir, secret) = secret_file(0o600);
        let text = format!(
            "{BASE}\n[dns01]\nhook = \"/h\"\n\n[dns01.rfc2136]\nserver = \"127.0.0.1:53\"\nkey_name = \"k\"\nsecret_file = {secret:?}\n"
        );
        expect_error(&text, 14, "dns01.hook", "not both");
    }

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
    fn ari_interval_defaults_to_twice_a_day() {
        let cfg = parse(&with_cert("name = \"w\"\ndomains = [\"a.example\"]")).expect("valid");
        assert_eq!(cfg.daemon.ari_interval, Duration::from_secs(12 * 3600));
        let text = format!(
            "{}[daemon]\nari_interval = \"1h\"\n",
            with_cert("name = \"w\"\ndomains = [\"a.example\"]")
        );
        let cfg = parse(&text).expect("valid");
        assert_eq!(cfg.daemon.ari_interval, Duration::from_secs(3600));
        let bad = text.replace("\"1h\"", "\"soon\"");
        assert!(
            matches!(parse(&bad), Err(ConfigError::Invalid { key, .. }) if key == "daemon.ari_interval")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("1.5h").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
        let text = format!("{BASE}\n[reaper]\ninterval = \"5 minutes\"\n");
        expect_error(&text, 14, "reaper.interval", "invalid duration");
    }

    #[test]
    fn domain_names() {
        // Unicode names, wildcards included, are ordered in Punycode.
        let idn = |s: &str| s.parse::<DnsName>().map(|d| d.as_str().to_owned());
        assert_eq!(idn("Bücher.example."), Ok("xn--bcher-kva.example".into()));
        assert_eq!(
            idn("*.bücher.example"),
            Ok("*.xn--bcher-kva.example".into())
        );
        assert!("a.example".parse::<DnsName>().is_ok());
        assert!("*.a.example".parse::<DnsName>().is_ok());
        assert!("a.*.example".parse::<DnsName>().is_err());
        assert!("localhost".parse::<DnsName>().is_err());
        assert!("-a.example".parse::<DnsName>().is_err());
        assert!("a..example".parse::<DnsName>().is_err());
        assert!("*.com".parse::<DnsName>().is_err());
        assert!(
            format!("{}.example", "a".repeat(64))
                .parse::<DnsName>()
                .is_err()
        );
    }

    // Fuzzing: whatever the file holds, parsing ends in a config or an
    // error that names a line, never a panic.
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
        assert!(parse(BASE).expect("valid").acme.trusted_roots.is_none());
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
