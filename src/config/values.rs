//! The values the configuration file holds, parsed from their text:
//! durations, socket and server addresses, key types, challenge types, TSIG
//! algorithms, the ACME directory URL, contacts and log levels. Each parser
//! returns the message an operator reads; the caller adds file, line and key.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use reqwest::Url;

use crate::config::names::{Underscore, name_ok, without_root};

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
        if let Ok(ip) = IpAddr::from_str(s) {
            return Ok(Self {
                host: ip.to_string(),
                port: 53,
            });
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| err())?),
            None => (s, 53),
        };
        let host = without_root(host).to_ascii_lowercase();
        if port == 0 || !name_ok(&host, Underscore::Refused) {
            return Err(err());
        }
        Ok(Self { host, port })
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
            .map_or("ecdsa-p256", |(s, _)| *s)
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

pub(crate) fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    SocketAddr::from_str(s)
        .map_err(|_| format!("{s:?} is not a socket address like \"0.0.0.0:80\" or \"[::]:80\""))
}

/// Parses the durations the config file uses: a whole number followed by
/// `s`, `m`, `h` or `d` ("90s", "15m", "1h", "7d").
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
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

/// The ACME directory: an https:// URL.
pub(crate) fn parse_directory(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if url.scheme() != "https" {
        return Err(format!("{s:?}: the ACME directory must be an https:// URL"));
    }
    Ok(url)
}

/// An account contact: a `mailto:` URL with an address in it.
pub(crate) fn parse_contact(s: &str) -> Result<String, String> {
    let addr = s
        .strip_prefix("mailto:")
        .ok_or_else(|| format!("{s:?} must be a mailto: URL, like \"mailto:ops@example.com\""))?;
    if !addr.contains('@') || addr.contains(char::is_whitespace) {
        return Err(format!("{s:?} is not a valid e-mail address"));
    }
    Ok(s.to_owned())
}

/// A `log_level`: one of tracing's levels.
pub(crate) fn parse_log_level(s: &str) -> Result<String, String> {
    match s {
        "error" | "warn" | "info" | "debug" | "trace" => Ok(s.to_owned()),
        _ => Err(format!("{s:?}: expected error, warn, info, debug or trace")),
    }
}

/// An ACME profile name as the directory's `meta.profiles` lists it.
pub(crate) fn parse_profile_name(s: &str) -> Result<String, String> {
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_graphic() && c != ',') {
        Err(format!("{s:?} is not a profile name"))
    } else {
        Ok(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{BASE, expect_error};

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
}
