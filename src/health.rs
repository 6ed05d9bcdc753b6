//! Whether certificates need attention: `certd status --check` (Nagios,
//! Icinga, cron) and the metrics share this judgement.

use std::fmt;

use crate::clock::UnixTime;
use crate::config::CertificateConfig;
use crate::store::CertificateRow;

/// Days before expiry at which a failing renewal becomes critical.
const CRITICAL_DAYS: i64 = 7;
/// How long past its renewal time a certificate may wait before it is
/// overdue even without a recorded failure (a stopped daemon).
const OVERDUE_GRACE: i64 = 86_400;

/// Monitoring levels, ordered; their numbers are the exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok = 0,
    Warning = 1,
    Critical = 2,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ok => "OK",
            Self::Warning => "WARNING",
            Self::Critical => "CRITICAL",
        })
    }
}

/// Judges one configured certificate by its ledger row; the reason is set
/// for anything but OK.
pub fn assess(
    cert: &CertificateConfig,
    row: Option<&CertificateRow>,
    now: UnixTime,
) -> (Level, Option<String>) {
    let name = cert.name.as_str();
    let now = now.secs();
    let failing = row.is_some_and(|r| r.last_result.as_deref() == Some("error"));
    let error = || {
        row.and_then(|r| r.last_error.clone())
            .unwrap_or_else(|| "unknown error".into())
    };
    let Some(not_after) = row.and_then(|r| r.not_after) else {
        let why = if failing {
            format!("{name} has no certificate: {}", error())
        } else {
            format!("{name} has no certificate yet")
        };
        return (Level::Critical, Some(why));
    };
    if not_after <= now {
        return (
            Level::Critical,
            Some(format!(
                "{name} expired at {}",
                UnixTime::from_secs(not_after).rfc3339()
            )),
        );
    }
    let days_left = (not_after - now) / 86_400;
    if failing && not_after - now < CRITICAL_DAYS * 86_400 {
        return (
            Level::Critical,
            Some(format!(
                "{name} expires in {days_left} days and renewal fails: {}",
                error()
            )),
        );
    }
    let renew_at = row.and_then(|r| r.next_renewal_at).unwrap_or(not_after);
    if failing && now >= renew_at.min(not_after) {
        return (
            Level::Warning,
            Some(format!(
                "{name} renewal fails ({days_left} days left): {}",
                error()
            )),
        );
    }
    if failing {
        // A failure outside the renewal window (a forced run, a reload
        // command): worth a look, the certificate itself is fine.
        return (
            Level::Warning,
            Some(format!("{name}: last attempt failed: {}", error())),
        );
    }
    if now > renew_at + OVERDUE_GRACE {
        return (
            Level::Warning,
            Some(format!(
                "{name} is overdue for renewal ({days_left} days left); is certd running?"
            )),
        );
    }
    (Level::Ok, None)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn cert() -> CertificateConfig {
        let text = "[acme]\ndirectory = \"https://ca/dir\"\n[storage]\nstate_dir = \"s\"\ncert_dir = \"c\"\n[http01]\nlisten = \"127.0.0.1:80\"\n[[certificate]]\nname = \"w\"\ndomains = [\"a.example\"]\n";
        Config::parse(Path::new("/x.toml"), text)
            .expect("valid")
            .certificates
            .remove(0)
    }

    fn row(not_after: Option<i64>, next: i64, error: Option<&str>) -> CertificateRow {
        CertificateRow {
            name: "w".into(),
            domains: "[]".into(),
            serial: None,
            not_before: Some(0),
            not_after,
            installed_at: None,
            version: None,
            last_attempt_at: Some(0),
            last_result: Some(if error.is_some() { "error" } else { "ok" }.into()),
            last_error: error.map(String::from),
            next_renewal_at: Some(next),
            consecutive_failures: i64::from(error.is_some()),
        }
    }

    #[test]
    fn levels() {
        let c = cert();
        let now = UnixTime::from_secs(100 * 86_400);
        let level = |r: Option<CertificateRow>| assess(&c, r.as_ref(), now).0;
        assert_eq!(level(None), Level::Critical);
        assert_eq!(
            level(Some(row(Some(200 * 86_400), 150 * 86_400, None))),
            Level::Ok
        );
        assert_eq!(
            level(Some(row(Some(99 * 86_400), 0, None))),
            Level::Critical,
            "expired"
        );
        assert_eq!(
            level(Some(row(Some(130 * 86_400), 90 * 86_400, Some("boom")))),
            Level::Warning
        );
        assert_eq!(
            level(Some(row(Some(105 * 86_400), 90 * 86_400, Some("boom")))),
            Level::Critical
        );
        assert_eq!(
            level(Some(row(Some(130 * 86_400), 90 * 86_400, None))),
            Level::Warning,
            "overdue"
        );
    }
}
