//! Whether certificates need attention: `certd status --check` (Nagios,
//! Icinga, cron) and the metrics share this judgement.

use std::fmt;

use crate::clock::UnixTime;
use crate::config::CertificateConfig;
use crate::ledger::{CertificateRow, LastResult};

/// The part of a certificate's lifetime left at which a failing renewal
/// becomes critical: a sixth, half of the usual renewal window (renewal
/// starts with a third left). A fraction, not a number of days, because
/// lifetimes run from 6 days (Let's Encrypt's `shortlived`) to years: a
/// fixed 7 days made the first failed renewal of a 6-day certificate
/// critical, 80 hours before it expires.
const CRITICAL_FRACTION: i64 = 6;
/// Where the ledger does not know the lifetime: critical with this little
/// left.
const CRITICAL_FALLBACK_SECS: i64 = 7 * 86_400;
/// How long past its renewal time a certificate may wait before it is
/// overdue even without a recorded failure (a stopped daemon), at most;
/// short-lived certificates get a tenth of their lifetime.
const OVERDUE_GRACE: i64 = 86_400;

/// Monitoring levels, ordered; their numbers are the exit codes (the
/// Nagios plugin convention).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    /// Nothing could be judged: a bad configuration, an unreadable ledger.
    Unknown = 3,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ok => "OK",
            Self::Warning => "WARNING",
            Self::Critical => "CRITICAL",
            Self::Unknown => "UNKNOWN",
        })
    }
}

/// Judges one configured certificate by its ledger row; the reason is set
/// for anything but OK.
pub(crate) fn assess(
    cert: &CertificateConfig,
    row: Option<&CertificateRow>,
    now: UnixTime,
) -> (Level, Option<String>) {
    let name = cert.name.as_str();
    let now = now.secs();
    let failing = row.is_some_and(|r| r.last_result == Some(LastResult::Error));
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
    if let Some(r) = row
        && r.serial.is_some()
        && r.revoked_serial == r.serial
    {
        // Revoked and still installed: clients may refuse it at any time,
        // whatever its expiry says. Critical until a replacement is in.
        return (
            Level::Critical,
            Some(format!(
                "{name}: the installed certificate (serial {}) is revoked and not yet replaced",
                r.serial.as_deref().unwrap_or_default()
            )),
        );
    }
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
    let lifetime = row
        .and_then(|r| r.not_before)
        .map(|not_before| not_after - not_before)
        .filter(|l| *l > 0);
    let critical_below = lifetime.map_or(CRITICAL_FALLBACK_SECS, |l| l / CRITICAL_FRACTION);
    if failing && not_after - now < critical_below {
        return (
            Level::Critical,
            Some(format!(
                "{name} expires in {} and renewal fails: {}",
                remaining(not_after - now),
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
    let grace = lifetime.map_or(OVERDUE_GRACE, |l| (l / 10).min(OVERDUE_GRACE));
    if now > renew_at + grace {
        return (
            Level::Warning,
            Some(format!(
                "{name} is overdue for renewal ({days_left} days left); is certd running?"
            )),
        );
    }
    (Level::Ok, None)
}

/// A remaining time as an operator reads it: days, or hours under two days.
fn remaining(secs: i64) -> String {
    if secs >= 2 * 86_400 {
        format!("{} days", secs / 86_400)
    } else {
        format!("{} hours", secs / 3600)
    }
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
            last_result: Some(if error.is_some() {
                LastResult::Error
            } else {
                LastResult::Ok
            }),
            last_error: error.map(String::from),
            next_renewal_at: Some(next),
            consecutive_failures: i64::from(error.is_some()),
            ..CertificateRow::default()
        }
    }

    #[test]
    fn a_revoked_installed_certificate_is_critical_until_replaced() {
        let c = cert();
        let now = UnixTime::from_secs(100 * 86_400);
        let mut r = row(Some(200 * 86_400), 150 * 86_400, None);
        r.serial = Some("0a".into());
        r.revoked_serial = Some("0a".into());
        let (level, why) = assess(&c, Some(&r), now);
        assert_eq!(level, Level::Critical);
        assert!(why.is_some_and(|w| w.contains("serial 0a") && w.contains("revoked")));
        // Replaced: the new serial is installed, the old one stays recorded.
        r.serial = Some("0b".into());
        assert_eq!(assess(&c, Some(&r), now).0, Level::Ok);
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

    /// A 6-day (160 h) certificate renewed at half its lifetime: one failed
    /// renewal is a warning; critical only with a sixth (a day) left.
    #[test]
    fn short_lifetimes_scale_the_thresholds() {
        let c = cert();
        let issued = 1_000_000;
        let not_after = issued + 518_400;
        let short = |now: i64, error: Option<&str>| {
            let mut r = row(Some(not_after), issued + 259_200, error);
            r.not_before = Some(issued);
            assess(&c, Some(&r), UnixTime::from_secs(now))
        };
        let (level, why) = short(issued + 260_000, Some("boom"));
        assert_eq!(level, Level::Warning, "{why:?}");
        let (level, why) = short(not_after - 80_000, Some("boom"));
        assert_eq!(level, Level::Critical, "{why:?}");
        assert!(why.is_some_and(|w| w.contains("expires in 22 hours")));
        // Overdue sooner than a day for a 6-day certificate.
        let (level, _) = short(issued + 259_200 + 60_000, None);
        assert_eq!(level, Level::Warning, "overdue");
    }
}
