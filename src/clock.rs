//! Wall-clock time as the ledger stores it (Unix seconds) and as people and
//! JSON read it (RFC 3339), and the one `Clock` certd reads it from.
//!
//! Every wall-clock reading goes through a `Clock` its owner was given, so a
//! test can set the time (`Clock::fixed`) rather than wait for it. Elapsed
//! time (timeouts, backoff sleeps) is tokio's monotonic clock, which tests
//! pause and advance instead.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serializer;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Seconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct UnixTime(i64);

impl UnixTime {
    pub fn from_secs(secs: i64) -> Self {
        Self(secs)
    }

    pub fn from_system(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            Err(e) => Self(-i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX)),
        }
    }

    pub fn secs(self) -> i64 {
        self.0
    }

    pub fn system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(self.0).unwrap_or(0))
    }

    pub fn plus(self, d: Duration) -> Self {
        Self(
            self.0
                .saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
        )
    }

    pub fn rfc3339(self) -> String {
        rfc3339(self.0)
    }
}

/// Where the wall-clock time comes from: the system, or a time a test sets.
///
/// Cheap to clone; clones of a fixed clock share one time, so a test that
/// advances its handle moves every component it handed the clock to.
#[derive(Debug, Clone, Default)]
pub struct Clock(Option<Arc<AtomicI64>>);

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Self {
        Self(None)
    }

    /// A clock that stands at `at` until it is set or advanced.
    pub fn fixed(at: UnixTime) -> Self {
        Self(Some(Arc::new(AtomicI64::new(at.secs()))))
    }

    /// The time now, in Unix seconds.
    pub fn now(&self) -> UnixTime {
        match &self.0 {
            None => UnixTime::from_system(SystemTime::now()),
            Some(at) => UnixTime(at.load(Ordering::Relaxed)),
        }
    }

    /// The time now, for APIs that take a `SystemTime` (X.509 validity).
    pub fn system_time(&self) -> SystemTime {
        match &self.0 {
            None => SystemTime::now(),
            Some(at) => UnixTime(at.load(Ordering::Relaxed)).system_time(),
        }
    }

    /// Time from now until `t`, zero if it has passed.
    pub fn until(&self, t: UnixTime) -> Duration {
        Duration::from_secs(u64::try_from(t.0 - self.now().0).unwrap_or(0))
    }

    /// Sets a fixed clock to `at`; the system clock cannot be set, and
    /// ignores it.
    pub fn set(&self, at: UnixTime) {
        if let Some(now) = &self.0 {
            now.store(at.secs(), Ordering::Relaxed);
        }
    }

    /// Moves a fixed clock forward by `d`; the system clock ignores it.
    pub fn advance(&self, d: Duration) {
        if let Some(now) = &self.0 {
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            now.fetch_add(secs, Ordering::Relaxed);
        }
    }
}

/// Formats Unix seconds as RFC 3339 (`2026-11-22T04:32:35Z`).
pub fn rfc3339(secs: i64) -> String {
    let mut out = String::with_capacity(20);
    push_rfc3339(&mut out, secs);
    out
}

/// Appends `secs` as RFC 3339 to `out`.
///
/// `certd status` writes three timestamps for each of up to 10,000
/// certificates; the date arithmetic below does that without the
/// allocation and format-description walk of the general formatter, which
/// cost a tenth of the command's time. Years outside 0000–9999 (which RFC
/// 3339 cannot write) fall back to plain seconds.
pub fn push_rfc3339(out: &mut String, secs: i64) {
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    if !(0..=9999).contains(&year) {
        out.push_str(&secs.to_string());
        return;
    }
    let mut buf = *b"0000-00-00T00:00:00Z";
    let mut put = |at: usize, width: usize, mut v: i64| {
        for i in (at..at + width).rev() {
            // v is non-negative and below 10^width, so each digit fits a u8.
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, of_day / 3600);
    put(14, 2, of_day / 60 % 60);
    put(17, 2, of_day % 60);
    // Every byte written above is an ASCII digit or one of the template's
    // ASCII separators.
    out.push_str(std::str::from_utf8(&buf).unwrap_or_default());
}

/// The proleptic Gregorian (year, month, day) of a day count from
/// 1970-01-01, after Howard Hinnant's `civil_from_days`: eras of 400
/// years, and years that begin in March so the leap day comes last.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Parses an RFC 3339 timestamp (as ACME objects carry in `expires`).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

/// Serde helper: `Option<i64>` Unix seconds as an RFC 3339 string or null.
pub fn serialize_opt_rfc3339<S: Serializer>(v: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(secs) => s.serialize_str(&rfc3339(*secs)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The arithmetic agrees with the `time` crate's formatter across four
    /// centuries, leap days and both ends of the range.
    #[test]
    fn formats_like_the_time_crate() {
        let reference = |secs: i64| {
            OffsetDateTime::from_unix_timestamp(secs)
                .expect("in range")
                .format(&Rfc3339)
                .expect("formats")
        };
        let mut samples = vec![
            0,
            -1,
            86_399,
            951_782_400,     // 2000-02-29
            4_107_542_399,   // 2100-02-28T23:59:59
            -62_167_219_200, // 0000-01-01
            253_402_300_799, // 9999-12-31T23:59:59
        ];
        // A stride that is not a multiple of a day walks every hour and
        // every day of the year over the centuries.
        let mut s = -2_208_988_800; // 1900-01-01
        while s < 7_258_118_400 {
            samples.push(s);
            s += 86_400 * 7 + 3_607;
        }
        for secs in samples {
            assert_eq!(rfc3339(secs), reference(secs), "{secs}");
        }
        assert_eq!(rfc3339(253_402_300_800), "253402300800");
    }

    #[test]
    fn a_fixed_clock_is_shared_by_its_clones() {
        let clock = Clock::fixed(UnixTime::from_secs(1_000));
        let held = clock.clone();
        clock.advance(Duration::from_secs(60));
        assert_eq!(held.now(), UnixTime::from_secs(1_060));
        held.set(UnixTime::from_secs(5));
        assert_eq!(clock.now().secs(), 5);
        assert_eq!(
            clock.until(UnixTime::from_secs(65)),
            Duration::from_secs(60)
        );
        assert_eq!(clock.until(UnixTime::from_secs(1)), Duration::ZERO);
        let system = Clock::system();
        system.set(UnixTime::from_secs(5));
        assert!(system.now().secs() > 1_700_000_000);
    }

    #[test]
    fn round_trip() {
        let s = rfc3339(1_795_000_000);
        assert_eq!(parse_rfc3339(&s), Some(1_795_000_000));
        assert!(s.ends_with('Z'));
    }
}
