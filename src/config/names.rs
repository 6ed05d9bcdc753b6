//! The rules for names in the configuration, in one place: DNS names on
//! certificates, zone and key names, server host names, certificate names,
//! and the identifiers (names or IP addresses) a certificate lists.
//!
//! A DNS label is 1 to 63 letters, digits and hyphens, neither starting nor
//! ending with a hyphen (RFC 1035 section 2.3.1, RFC 1123 section 2.1); a
//! name is at most 253 characters. Everything that checks a name calls
//! [`label_ok`], so a name refused in one place is refused in all.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// The longest name in text form: 255 octets on the wire, less the length
/// octet of the first label and the root.
pub(crate) const MAX_NAME_LEN: usize = 253;

/// The longest label (RFC 1035 section 2.3.4).
const MAX_LABEL_LEN: usize = 63;

/// Whether a label may hold `_`: service labels such as `_acme-challenge`
/// and TSIG key names do, host names do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Underscore {
    Allowed,
    Refused,
}

/// Whether `label` is a valid DNS label: 1 to 63 letters, digits and
/// hyphens (and `_` where allowed), not starting or ending with a hyphen.
pub(crate) fn label_ok(label: &str, underscore: Underscore) -> bool {
    !label.is_empty()
        && label.len() <= MAX_LABEL_LEN
        && !label.starts_with('-')
        && !label.ends_with('-')
        && label.chars().all(|c| {
            c.is_ascii_alphanumeric() || c == '-' || (underscore == Underscore::Allowed && c == '_')
        })
}

/// Whether `name` (lower case, no trailing dot) is a run of valid labels no
/// longer than a name may be; a single label is fine.
pub(crate) fn name_ok(name: &str, underscore: Underscore) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.split('.').all(|l| label_ok(l, underscore))
}

/// `s` without the dot that marks a name as fully qualified
/// (`example.com.`); a second one is an empty label, which stays to be
/// refused.
pub(crate) fn without_root(s: &str) -> &str {
    s.strip_suffix('.').unwrap_or(s)
}

/// A zone or key name: like `DnsName` but a single label is fine (a lab's
/// zone `test`, a key `certd-key`), and key names may hold underscores.
/// Lower-cased, without the trailing dot.
pub(crate) fn domain_like(s: &str, underscore: Underscore) -> Result<String, String> {
    let name = without_root(s).to_ascii_lowercase();
    if !name_ok(&name, underscore) {
        return Err(format!(
            "{s:?} is not a valid DNS name (letters, digits and inner '-'{}, 1 to 63 characters a label)",
            if underscore == Underscore::Allowed {
                " or '_'"
            } else {
                ""
            }
        ));
    }
    Ok(name)
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
        let name = domain_like(s, Underscore::Allowed)?;
        if name.parse::<IpAddr>().is_ok() || !name.contains('.') {
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
            without_root(s).to_ascii_lowercase()
        } else {
            idna::domain_to_ascii(without_root(s)).map_err(|_| {
                format!(
                    "{s:?} is not a valid internationalized domain name; \
                     write it in Punycode (xn--…) if your registrar shows it so"
                )
            })?
        };
        if name.is_empty() {
            return Err("empty domain name".into());
        }
        if name.len() > MAX_NAME_LEN {
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
            if !label_ok(label, Underscore::Refused) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{expect_error, parse, with_cert};

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

    /// The label rule every name check shares: letters, digits and inner
    /// hyphens, 1 to 63 characters; `_` only where allowed.
    #[test]
    fn labels() {
        for good in ["a", "example", "a-b", "xn--bcher-kva", "0", &"a".repeat(63)] {
            assert!(label_ok(good, Underscore::Refused), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "-",
            "a_b",
            "a b",
            "a.b",
            "*",
            &"a".repeat(64),
        ] {
            assert!(!label_ok(bad, Underscore::Refused), "{bad:?}");
        }
        assert!(label_ok("_acme-challenge", Underscore::Allowed));
        assert!(!label_ok("_a-", Underscore::Allowed));
    }

    /// `example-.com` and its kin are refused wherever a name is read: on a
    /// certificate, as a zone or key name, as a dns_alias, as a server.
    #[test]
    fn every_name_refuses_a_hyphen_at_a_label_edge() {
        for bad in [
            "example-.com",
            "-example.com",
            "www.example-.com",
            "a.-b.example",
        ] {
            let e = bad.parse::<DnsName>().expect_err(bad);
            assert!(e.contains("not a valid domain name"), "{bad}: {e}");
            assert!(bad.parse::<Identifier>().is_err(), "{bad}");
            assert!(domain_like(bad, Underscore::Refused).is_err(), "{bad}");
            assert!(domain_like(bad, Underscore::Allowed).is_err(), "{bad}");
            assert!(bad.parse::<DnsAlias>().is_err(), "{bad}");
            let server = format!("{bad}:53");
            assert!(
                server.parse::<crate::config::ServerAddr>().is_err(),
                "{bad}"
            );
        }
        assert!("zone-".parse::<DnsAlias>().is_err());
        assert_eq!(
            domain_like("zone-1.", Underscore::Refused),
            Ok("zone-1".into())
        );
    }

    #[test]
    fn name_lengths_empty_labels_and_wildcards() {
        // 253 characters is the most a name may have.
        let label = "a".repeat(63);
        let longest = format!("{label}.{label}.{label}.{}.example", "a".repeat(53));
        assert_eq!(longest.len(), 253);
        assert!(longest.parse::<DnsName>().is_ok());
        let e = format!("a{longest}").parse::<DnsName>().expect_err("254");
        assert!(e.contains("longer than 253"), "{e}");
        assert!(!name_ok(&format!("a{longest}"), Underscore::Allowed));
        for bad in ["a..example", ".a.example", "a.example..", ""] {
            assert!(bad.parse::<DnsName>().is_err(), "{bad:?}");
        }
        // A wildcard is the whole leftmost label, and only that.
        for bad in [
            "*a.example",
            "a*.example",
            "**.example",
            "a.*.example",
            "*.*.example",
        ] {
            assert!(bad.parse::<DnsName>().is_err(), "{bad}");
        }
        assert!("*.a.example".parse::<DnsName>().is_ok());
        assert!(domain_like("*.a.example", Underscore::Allowed).is_err());
    }
}
