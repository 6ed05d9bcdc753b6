//! When each certificate is due.
//!
//! A certificate is due now when no complete copy is installed, when its
//! configured domains differ from the installed certificate's, or when a
//! third of its lifetime remains; otherwise it is due at that point.

use std::fmt;

use crate::clock::UnixTime;
use crate::config::CertificateConfig;
use crate::install::{CertInfo, renewal_time};

/// Why a certificate needs a new issuance, or when it will.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    Now(Reason),
    At(UnixTime),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    NotInstalled,
    DomainsChanged,
    RenewalWindow,
    Expired,
    Forced,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotInstalled => "not installed",
            Self::DomainsChanged => "domains changed",
            Self::RenewalWindow => "in its renewal window",
            Self::Expired => "expired",
            Self::Forced => "forced",
        })
    }
}

/// Decides whether `cert` needs an order, given what is installed.
pub fn due(cert: &CertificateConfig, installed: Option<&CertInfo>, now: UnixTime) -> Due {
    let Some(info) = installed else {
        return Due::Now(Reason::NotInstalled);
    };
    let mut want = cert.domain_strings();
    want.sort();
    if want != info.dns_names {
        return Due::Now(Reason::DomainsChanged);
    }
    if now.secs() >= info.not_after {
        return Due::Now(Reason::Expired);
    }
    let at = renewal_time(info.not_before, info.not_after);
    if now >= at {
        Due::Now(Reason::RenewalWindow)
    } else {
        Due::At(at)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn cert(domains: &str) -> CertificateConfig {
        let text = format!(
            "[acme]\ndirectory = \"https://ca/dir\"\n[storage]\nstate_dir = \"s\"\ncert_dir = \"c\"\n[http01]\nlisten = \"127.0.0.1:80\"\n[[certificate]]\nname = \"w\"\ndomains = {domains}\n"
        );
        Config::parse(Path::new("/x.toml"), &text)
            .expect("valid")
            .certificates
            .remove(0)
    }

    fn info(names: &[&str], not_before: i64, not_after: i64) -> CertInfo {
        CertInfo {
            dns_names: names.iter().map(|s| s.to_string()).collect(),
            serial: "01".into(),
            not_before,
            not_after,
            spki: Vec::new(),
        }
    }

    #[test]
    fn due_reasons() {
        let c = cert("[\"b.example\", \"a.example\"]");
        let now = UnixTime::from_secs(100);
        assert_eq!(due(&c, None, now), Due::Now(Reason::NotInstalled));
        let i = info(&["a.example"], 0, 900);
        assert_eq!(due(&c, Some(&i), now), Due::Now(Reason::DomainsChanged));
        let i = info(&["a.example", "b.example"], 0, 900);
        assert_eq!(due(&c, Some(&i), now), Due::At(UnixTime::from_secs(600)));
        assert_eq!(
            due(&c, Some(&i), UnixTime::from_secs(600)),
            Due::Now(Reason::RenewalWindow)
        );
        assert_eq!(
            due(&c, Some(&i), UnixTime::from_secs(901)),
            Due::Now(Reason::Expired)
        );
    }
}
